//! Writing a stream a QEMU destination loads: QEMU 7.2, and with fill byte 0
//! in ZERO records and the vmdesc trailer, QEMU 8.2 to 10.
//!
//! The free functions write the framing (file header, configuration, section
//! headers and footers, EOF); [`RamWriter`] writes RAM records and keeps track
//! of the CONTINUE rule, which depends on the record written before.

use flate2::Compress;

use super::{block_flag, marker, ram_flag, RamBlockInfo, SectionKind, PAGE_SIZE};
use super::{QEMU_VM_FILE_MAGIC, QEMU_VM_FILE_VERSION};
use super::{RAM_IDSTR, RAM_VERSION};
use crate::qemu_file::{QemuFileWriter, Result};
use crate::transport::Transport;

/// Writes the `QEVM` magic and stream version 3.
pub fn put_file_header<T: Transport>(f: &mut QemuFileWriter<'_, T>) {
    f.put_be32(QEMU_VM_FILE_MAGIC);
    f.put_be32(QEMU_VM_FILE_VERSION);
}

/// Writes a configuration section naming the machine type (QEMU checks that
/// it equals its own, e.g. `none` or `pc-i440fx-7.2`).
pub fn put_configuration<T: Transport>(f: &mut QemuFileWriter<'_, T>, machine: &str) {
    f.put_byte(marker::CONFIGURATION);
    f.put_be32(machine.len() as u32);
    f.put_buffer(machine.as_bytes());
}

/// Writes a START or FULL section header.
pub fn put_section_start<T: Transport>(
    f: &mut QemuFileWriter<'_, T>,
    kind: SectionKind,
    id: u32,
    idstr: &str,
    instance: u32,
    version: u32,
) -> Result<()> {
    debug_assert!(kind.has_identity());
    f.put_byte(kind.marker());
    f.put_be32(id);
    f.put_counted_string(idstr)?;
    f.put_be32(instance);
    f.put_be32(version);
    Ok(())
}

/// Writes a PART or END section header.
pub fn put_section_part<T: Transport>(f: &mut QemuFileWriter<'_, T>, kind: SectionKind, id: u32) {
    debug_assert!(!kind.has_identity());
    f.put_byte(kind.marker());
    f.put_be32(id);
}

/// Writes the footer that closes section `id`.
pub fn put_footer<T: Transport>(f: &mut QemuFileWriter<'_, T>, id: u32) {
    f.put_byte(marker::SECTION_FOOTER);
    f.put_be32(id);
}

/// Writes the end-of-state marker.
pub fn put_eof<T: Transport>(f: &mut QemuFileWriter<'_, T>) {
    f.put_byte(marker::EOF);
}

/// Writes a command to the destination (`QEMU_VM_COMMAND`, see
/// [`super::command`]); QEMU flushes after each, so the caller should too.
///
/// # Panics
/// If `payload` is longer than the be16 length can say.
pub fn put_command<T: Transport>(f: &mut QemuFileWriter<'_, T>, cmd: u16, payload: &[u8]) {
    let len = u16::try_from(payload.len()).expect("command payload fits a be16 length");
    f.put_byte(marker::COMMAND);
    f.put_be16(cmd);
    f.put_be16(len);
    f.put_buffer(payload);
}

/// The vmdesc trailer ferry writes after EOF. QEMU (7.2 and 10 alike)
/// reads the byte after EOF before it reports success, and only skips the
/// JSON: without a trailer it waits for that byte, or reports a failure if
/// the connection ends. The device list is empty because ferry cannot
/// describe device sections it only copies.
pub const MINIMAL_VMDESC: &[u8] = br#"{"page_size":4096,"devices":[]}"#;

/// Writes the JSON trailer that describes the device sections.
pub fn put_vmdesc<T: Transport>(f: &mut QemuFileWriter<'_, T>, json: &[u8]) {
    f.put_byte(marker::VMDESCRIPTION);
    f.put_be32(json.len() as u32);
    f.put_buffer(json);
}

/// How a page went into the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageEncoding {
    /// As a ZERO record with this fill byte.
    Zero(u8),
    /// As a raw PAGE record.
    Raw,
    /// As a COMPRESS_PAGE record of this many bytes of zlib stream.
    Compressed(usize),
}

/// Writes RAM records, naming the block only when it changes (the CONTINUE rule).
///
/// Start a new `RamWriter` for every buffer whose bytes may land after records
/// of another writer, such as a compression worker's private QEMUFile: its first
/// record then names its block explicitly.
#[derive(Debug, Default, Clone)]
pub struct RamWriter {
    last_block: Option<String>,
}

impl RamWriter {
    /// A writer whose first record names its block.
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds the record header in `out`: be64 offset|flags, then the counted
    /// idstr unless the block is the same as the last record's.
    fn header(&mut self, block: &str, offset: u64, flags: u64, out: &mut Vec<u8>) {
        debug_assert_eq!(offset & ram_flag::MASK, 0, "offsets are page aligned");
        let same = self.last_block.as_deref() == Some(block);
        let flags = if same {
            flags | ram_flag::CONTINUE
        } else {
            flags
        };
        out.extend_from_slice(&(offset | flags).to_be_bytes());
        if !same {
            out.push(block.len() as u8);
            out.extend_from_slice(block.as_bytes());
            self.last_block = Some(block.to_owned());
        }
    }

    fn put_header<T: Transport>(
        &mut self,
        f: &mut QemuFileWriter<'_, T>,
        block: &str,
        offset: u64,
        flags: u64,
    ) -> Result<()> {
        if block.len() > 255 {
            return Err(crate::qemu_file::Error::StringTooLong { len: block.len() });
        }
        let mut h = Vec::with_capacity(9 + block.len());
        self.header(block, offset, flags, &mut h);
        f.put_buffer(&h);
        Ok(())
    }

    /// Writes the setup record: the total size and every block's name and length.
    pub fn put_mem_size<T: Transport>(
        &mut self,
        f: &mut QemuFileWriter<'_, T>,
        blocks: &[RamBlockInfo],
    ) -> Result<()> {
        let total: u64 = blocks.iter().map(|b| b.length).sum();
        f.put_be64(total | ram_flag::MEM_SIZE);
        for b in blocks {
            f.put_counted_string(&b.idstr)?;
            f.put_be64(b.length);
        }
        Ok(())
    }

    /// Writes a page filled with `fill` as a two-byte-payload ZERO record.
    pub fn put_zero_page<T: Transport>(
        &mut self,
        f: &mut QemuFileWriter<'_, T>,
        block: &str,
        offset: u64,
        fill: u8,
    ) -> Result<()> {
        self.put_header(f, block, offset, ram_flag::ZERO)?;
        f.put_byte(fill);
        Ok(())
    }

    /// Writes a raw page. The page is copied into the stream's buffer.
    pub fn put_page<T: Transport>(
        &mut self,
        f: &mut QemuFileWriter<'_, T>,
        block: &str,
        offset: u64,
        page: &[u8],
    ) -> Result<()> {
        debug_assert_eq!(page.len(), PAGE_SIZE);
        self.put_header(f, block, offset, ram_flag::PAGE)?;
        f.put_buffer(page);
        Ok(())
    }

    /// Writes a raw page without copying it: the writer borrows the page until
    /// it is flushed.
    pub fn put_page_async<'a, T: Transport>(
        &mut self,
        f: &mut QemuFileWriter<'a, T>,
        block: &str,
        offset: u64,
        page: &'a [u8],
    ) -> Result<()> {
        debug_assert_eq!(page.len(), PAGE_SIZE);
        self.put_header(f, block, offset, ram_flag::PAGE)?;
        f.put_buffer_async(page);
        Ok(())
    }

    /// Writes a page compressed, or raw when it does not shrink.
    pub fn put_compressed_page<T: Transport>(
        &mut self,
        f: &mut QemuFileWriter<'_, T>,
        compressor: &mut Compress,
        block: &str,
        offset: u64,
        page: &[u8],
    ) -> Result<PageEncoding> {
        debug_assert_eq!(page.len(), PAGE_SIZE);
        if block.len() > 255 {
            return Err(crate::qemu_file::Error::StringTooLong { len: block.len() });
        }
        // The header is only known to be right once the page has shrunk, so it
        // is built aside and written together with the compressed bytes.
        let mut probe = self.clone();
        let mut h = Vec::with_capacity(9 + block.len());
        probe.header(block, offset, ram_flag::COMPRESS_PAGE, &mut h);
        match f.put_compressed_record(&h, compressor, page)? {
            Some(n) => {
                *self = probe;
                Ok(PageEncoding::Compressed(n))
            }
            None => {
                self.put_page(f, block, offset, page)?;
                Ok(PageEncoding::Raw)
            }
        }
    }

    /// Writes the end-of-section record.
    pub fn put_eos<T: Transport>(&mut self, f: &mut QemuFileWriter<'_, T>) {
        f.put_be64(ram_flag::EOS);
    }

    /// Writes the multifd sync point (`RAM_SAVE_FLAG_MULTIFD_FLUSH`): sent
    /// after every multifd channel wrote its SYNC packet.
    pub fn put_multifd_flush<T: Transport>(&mut self, f: &mut QemuFileWriter<'_, T>) {
        f.put_be64(ram_flag::MULTIFD_FLUSH);
    }

    /// Opens the RAM section as QEMU's ram_save_setup does: START section
    /// `id` with the block list, then EOS and the footer.
    pub fn put_setup_section<T: Transport>(
        &mut self,
        f: &mut QemuFileWriter<'_, T>,
        id: u32,
        blocks: &[RamBlockInfo],
    ) -> Result<()> {
        put_section_start(f, SectionKind::Start, id, RAM_IDSTR, 0, RAM_VERSION)?;
        self.put_mem_size(f, blocks)?;
        self.put_eos(f);
        put_footer(f, id);
        Ok(())
    }

    /// Closes the RAM section with an END part that holds no page.
    pub fn put_end_section<T: Transport>(&mut self, f: &mut QemuFileWriter<'_, T>, id: u32) {
        put_section_part(f, SectionKind::End, id);
        self.put_eos(f);
        put_footer(f, id);
    }
}

/// Writes one 1 MiB chunk of a disk as a block record; a chunk that is all
/// zero goes as ZERO_BLOCK without data. A shorter last chunk is padded: a
/// QEMU destination always reads a whole chunk and writes what fits the disk.
pub fn put_block_chunk<T: Transport>(
    f: &mut QemuFileWriter<'_, T>,
    device: &str,
    sector: u64,
    chunk: &[u8],
) -> Result<()> {
    let zero = is_zero(chunk);
    let mut flags = block_flag::DEVICE_BLOCK;
    if zero {
        flags |= block_flag::ZERO_BLOCK;
    }
    f.put_be64((sector << 9) | flags);
    f.put_counted_string(device)?;
    if !zero {
        let chunk = &chunk[..chunk.len().min(super::BLOCK_CHUNK_SIZE)];
        f.put_buffer(chunk);
        let pad = super::BLOCK_CHUNK_SIZE - chunk.len();
        if pad > 0 {
            f.put_buffer(&vec![0u8; pad]);
        }
    }
    Ok(())
}

/// Writes the end-of-section record of a block section.
pub fn put_block_eos<T: Transport>(f: &mut QemuFileWriter<'_, T>) {
    f.put_be64(block_flag::EOS);
}

/// True when every byte of `data` is zero; word-wise, the hot check of the scanner.
pub fn is_zero(data: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: every bit pattern is a valid u64, and align_to only hands out
        // the correctly aligned middle part.
        unsafe { data.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0)
        && tail.iter().all(|&b| b == 0)
        && words
            .chunks(8)
            .all(|c| c.iter().fold(0, |acc, &w| acc | w) == 0)
}

/// The fill byte of a page made of one repeated byte, if it is one.
pub fn uniform_fill(page: &[u8]) -> Option<u8> {
    let first = *page.first()?;
    if first == 0 {
        return is_zero(page).then_some(0);
    }
    page.iter().all(|&b| b == first).then_some(first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_minimal_vmdesc_names_the_page_size_and_no_device() {
        let v: serde_json::Value = serde_json::from_slice(MINIMAL_VMDESC).unwrap();
        assert_eq!(v["page_size"], PAGE_SIZE);
        assert!(super::super::vmdesc::section_sizes(MINIMAL_VMDESC)
            .unwrap()
            .is_empty());
    }
}
