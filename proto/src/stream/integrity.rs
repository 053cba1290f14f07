//! ferry's integrity checkpoints: a FULL section that only a ferry receiver
//! understands (a QEMU destination rejects the unknown section).
//!
//! ```text
//! 0x04  be32 section id  counted "ferry-integrity"  be32 instance 0  be32 version 1
//! be64 sequence  be64 covered length  16 bytes XXH3-128 (big endian)
//! 0x7e  be32 section id
//! ```
//!
//! Checkpoint `n` covers the stream bytes from the first byte of checkpoint
//! `n - 1` (byte 0 for the first) up to, not including, its own marker byte:
//! every byte of the stream is covered by exactly one checkpoint, the
//! checkpoints themselves included, except what follows the last one. What
//! the hash is and where checkpoints go is the business of the two ends; this
//! module only frames them.

use super::{encode, SectionKind};
use crate::qemu_file::{QemuFileWriter, Result};
use crate::transport::Transport;

/// The section's name.
pub const IDSTR: &str = "ferry-integrity";
/// The section's version.
pub const VERSION: u32 = 1;
/// Length of the section body.
pub const BODY_LEN: usize = 32;
/// Length of the whole section: header, body and footer.
pub const SECTION_LEN: usize = 1 + 4 + 1 + IDSTR.len() + 4 + 4 + BODY_LEN + 5;

/// One checkpoint: what the stream bytes since the previous one hash to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checkpoint {
    /// 0 for the first checkpoint of a stream, then one more each time.
    pub seq: u64,
    /// How many stream bytes the checkpoint covers.
    pub covered: u64,
    /// XXH3-128 of those bytes.
    pub digest: u128,
}

impl Checkpoint {
    /// The section body.
    pub fn encode(&self) -> [u8; BODY_LEN] {
        let mut b = [0u8; BODY_LEN];
        b[..8].copy_from_slice(&self.seq.to_be_bytes());
        b[8..16].copy_from_slice(&self.covered.to_be_bytes());
        b[16..].copy_from_slice(&self.digest.to_be_bytes());
        b
    }

    /// Reads a section body; `None` unless it is exactly [`BODY_LEN`] bytes.
    pub fn decode(body: &[u8]) -> Option<Self> {
        let b: &[u8; BODY_LEN] = body.try_into().ok()?;
        let be64 =
            |r: std::ops::Range<usize>| u64::from_be_bytes(b[r].try_into().unwrap_or([0; 8]));
        Some(Self {
            seq: be64(0..8),
            covered: be64(8..16),
            digest: u128::from_be_bytes(b[16..].try_into().unwrap_or([0; 16])),
        })
    }

    /// Writes the whole FULL section with id `section_id`.
    pub fn put<T: Transport>(&self, f: &mut QemuFileWriter<'_, T>, section_id: u32) -> Result<()> {
        encode::put_section_start(f, SectionKind::Full, section_id, IDSTR, 0, VERSION)?;
        f.put_buffer(&self.encode());
        encode::put_footer(f, section_id);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qemu_file::QemuFileReader;
    use crate::stream::parse::{Item, Parser, SectionClass};
    use crate::transport::MemTransport;

    #[test]
    fn a_checkpoint_parses_as_a_sized_device_section() {
        let c = Checkpoint {
            seq: 7,
            covered: 0x0102_0304_0506,
            // Footer-like bytes inside the body must not end it early.
            digest: u128::from_be_bytes([
                0x7e, 0, 0, 0, 9, 0x04, 0, 0, 0, 1, 15, b'f', b'e', b'r', b'r', b'y',
            ]),
        };
        assert_eq!(Checkpoint::decode(&c.encode()), Some(c));
        assert_eq!(Checkpoint::decode(&[0; BODY_LEN - 1]), None);

        let mut f = QemuFileWriter::new(MemTransport::new());
        encode::put_file_header(&mut f);
        encode::put_configuration(&mut f, "none");
        c.put(&mut f, 9).unwrap();
        encode::put_eof(&mut f);
        let bytes = f.into_transport().unwrap().take();
        let sizes = [((IDSTR.to_owned(), 0), BODY_LEN as u64)].into();
        let mut p = Parser::new(QemuFileReader::new(MemTransport::from_bytes(bytes)))
            .with_device_sizes(sizes);
        let mut seen = Vec::new();
        loop {
            let at = p.offset();
            match p.next().unwrap() {
                Item::Section(h) => {
                    assert_eq!((h.idstr.as_str(), h.version), (IDSTR, VERSION));
                    assert_eq!(h.class, SectionClass::Device);
                    seen.push(at);
                }
                Item::DeviceState(body) => assert_eq!(Checkpoint::decode(body), Some(c)),
                Item::Footer { end, .. } => assert_eq!(end - seen[0], SECTION_LEN as u64),
                Item::End => break,
                _ => {}
            }
        }
        assert_eq!(seen.len(), 1);
    }
}
