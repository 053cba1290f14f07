//! Writing a whole stream from RAM that does not change: one pass, one thread.
//!
//! This is the reference encoder: the multi-process pipeline produces the same
//! records from many workers, and the tests use this to feed QEMU.

use super::device_state::DeviceState;
use super::encode::{self, PageEncoding, RamWriter};
use super::{RamBlockInfo, SectionKind, PAGE_SIZE};
use super::{BLOCK_CHUNK_SIZE, BLOCK_IDSTR, BLOCK_VERSION, SECTOR_SIZE};
use crate::compress;
use crate::qemu_file::{QemuFileWriter, Result};
use crate::transport::Transport;

/// How pages went out.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PageCounts {
    /// Pages sent as ZERO records (all zero: QEMU 8.2 and later refuse any
    /// other fill byte).
    pub zero: u64,
    /// Pages sent raw.
    pub raw: u64,
    /// Pages sent compressed.
    pub compressed: u64,
    /// Bytes of zlib streams in the compressed pages.
    pub compressed_bytes: u64,
}

/// Writes a complete stream of `blocks` (name and contents, a whole number of
/// pages each), with `device` spliced in and pages compressed at `level` if set.
pub fn write_stream<T: Transport>(
    f: &mut QemuFileWriter<'_, T>,
    blocks: &[(&str, &[u8])],
    device: &DeviceState,
    machine: &str,
    level: Option<u32>,
) -> Result<PageCounts> {
    write_stream_with_disks(f, blocks, &[], device, machine, level)
}

/// Like [`write_stream`], with disks (device name and contents) in QEMU's
/// "block" section after the RAM: whole 1 MiB chunks, zero chunks without data.
pub fn write_stream_with_disks<T: Transport>(
    f: &mut QemuFileWriter<'_, T>,
    blocks: &[(&str, &[u8])],
    disks: &[(&str, &[u8])],
    device: &DeviceState,
    machine: &str,
    level: Option<u32>,
) -> Result<PageCounts> {
    let id = device.free_section_id();
    let infos: Vec<RamBlockInfo> = blocks
        .iter()
        .map(|(name, data)| RamBlockInfo {
            idstr: (*name).to_owned(),
            length: data.len() as u64,
        })
        .collect();
    encode::put_file_header(f);
    device.put_configuration(f, machine);

    let mut ram = RamWriter::new();
    ram.put_setup_section(f, id, &infos)?;

    encode::put_section_part(f, SectionKind::Part, id);
    let mut counts = PageCounts::default();
    let mut compressor = level.map(compress::compressor);
    for (name, data) in blocks {
        for (i, page) in data.chunks_exact(PAGE_SIZE).enumerate() {
            let offset = (i * PAGE_SIZE) as u64;
            let how = if encode::is_zero(page) {
                ram.put_zero_page(f, name, offset, 0)?;
                PageEncoding::Zero(0)
            } else if let Some(c) = compressor.as_mut() {
                ram.put_compressed_page(f, c, name, offset, page)?
            } else {
                ram.put_page(f, name, offset, page)?;
                PageEncoding::Raw
            };
            match how {
                PageEncoding::Zero(_) => counts.zero += 1,
                PageEncoding::Raw => counts.raw += 1,
                PageEncoding::Compressed(n) => {
                    counts.compressed += 1;
                    counts.compressed_bytes += n as u64;
                }
            }
        }
    }
    ram.put_eos(f);
    encode::put_footer(f, id);
    ram.put_end_section(f, id);

    if !disks.is_empty() {
        let bid = id + 1;
        encode::put_section_start(f, SectionKind::Start, bid, BLOCK_IDSTR, 0, BLOCK_VERSION)?;
        encode::put_block_eos(f);
        encode::put_footer(f, bid);
        encode::put_section_part(f, SectionKind::Part, bid);
        for (name, data) in disks {
            for (i, chunk) in data.chunks(BLOCK_CHUNK_SIZE).enumerate() {
                let sector = (i * BLOCK_CHUNK_SIZE) as u64 / SECTOR_SIZE;
                encode::put_block_chunk(f, name, sector, chunk)?;
            }
        }
        encode::put_block_eos(f);
        encode::put_footer(f, bid);
        encode::put_section_part(f, SectionKind::End, bid);
        encode::put_block_eos(f);
        encode::put_footer(f, bid);
    }

    device.put_sections(f)?;
    encode::put_eof(f);
    f.flush();
    f.error().cloned().map_or(Ok(counts), Err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::MemTransport;

    #[test]
    fn a_page_of_one_non_zero_byte_goes_as_a_normal_page() {
        let mut ram = vec![0u8; 2 * PAGE_SIZE];
        ram[PAGE_SIZE..].fill(0x16);
        let mut f = QemuFileWriter::new(MemTransport::new());
        let counts = write_stream(
            &mut f,
            &[("mem", &ram)],
            &DeviceState::default(),
            "none",
            None,
        )
        .unwrap();
        assert_eq!((counts.zero, counts.raw), (1, 1));
        let counts = write_stream(
            &mut f,
            &[("mem", &ram)],
            &DeviceState::default(),
            "none",
            Some(1),
        )
        .unwrap();
        assert_eq!((counts.zero, counts.compressed), (1, 1));
    }
}
