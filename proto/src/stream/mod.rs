//! The QEMU 7.2 migration stream: file header, sections, RAM and block records.
//!
//! - [`command`]: the commands a source sends the destination (QEMU_VM_COMMAND).
//! - [`encode`]: records and framing a QEMU 7.2 destination loads.
//! - [`image`]: a whole stream from unchanging RAM, in one pass.
//! - [`integrity`]: ferry's checkpoint section (`ferry send --integrity`).
//! - [`parse`]: streams QEMU 7.2 (or ferry) wrote, read trusting nothing.
//! - [`device_state`]: the opaque non-RAM sections, kept byte for byte.
//! - [`vmdesc`]: sizes of device sections from the trailer QEMU appends.
//! - [`xbzrle`]: QEMU's delta-encoded pages.

pub mod command;
pub mod device_state;
pub mod encode;
pub mod image;
pub mod integrity;
pub mod parse;
pub mod vmdesc;
pub mod xbzrle;

/// Guest page size of every stream ferry reads or writes (x86's TARGET_PAGE_SIZE).
pub const PAGE_SIZE: usize = 4096;

/// `QEVM`: the first four bytes of every stream.
pub const QEMU_VM_FILE_MAGIC: u32 = 0x5145_564d;
/// The stream version QEMU has written since 2.x.
pub const QEMU_VM_FILE_VERSION: u32 = 3;

/// Top-level markers of a stream.
pub mod marker {
    /// End of the device state.
    pub const EOF: u8 = 0x00;
    /// First part of an iterative section (RAM, block).
    pub const SECTION_START: u8 = 0x01;
    /// A middle part of an iterative section.
    pub const SECTION_PART: u8 = 0x02;
    /// The last part of an iterative section.
    pub const SECTION_END: u8 = 0x03;
    /// A whole device's state in one piece.
    pub const SECTION_FULL: u8 = 0x04;
    /// A vmstate subsection inside a section.
    pub const SUBSECTION: u8 = 0x05;
    /// The JSON description QEMU appends after EOF.
    pub const VMDESCRIPTION: u8 = 0x06;
    /// The machine configuration after the file header.
    pub const CONFIGURATION: u8 = 0x07;
    /// A command to the destination (postcopy, return path).
    pub const COMMAND: u8 = 0x08;
    /// The footer that closes every section.
    pub const SECTION_FOOTER: u8 = 0x7e;
}

/// Flags in the low bits of a RAM record's be64 header.
pub mod ram_flag {
    /// Obsolete "full" flag; QEMU 7.2 never sends it.
    pub const FULL: u64 = 0x01;
    /// A page filled with one byte (one fill byte follows).
    pub const ZERO: u64 = 0x02;
    /// The setup record: total size, then the block list.
    pub const MEM_SIZE: u64 = 0x04;
    /// A page of raw bytes.
    pub const PAGE: u64 = 0x08;
    /// End of this section's records.
    pub const EOS: u64 = 0x10;
    /// Same block as the previous record: no idstr follows.
    pub const CONTINUE: u64 = 0x20;
    /// A delta-encoded page (XBZRLE).
    pub const XBZRLE: u64 = 0x40;
    /// RDMA hook request.
    pub const HOOK: u64 = 0x80;
    /// A zlib-compressed page: be32 length and the stream.
    pub const COMPRESS_PAGE: u64 = 0x100;
    /// multifd sync point on the main channel (QEMU 8.1+): every channel's
    /// pages sent before it are in guest memory before anything after it.
    pub const MULTIFD_FLUSH: u64 = 0x200;
    /// The bits of the header that are flags rather than offset.
    pub const MASK: u64 = 0xfff;
}

/// Flags in the low bits of a block record's be64 header (migration/block.c).
pub mod block_flag {
    /// A 1 MiB chunk of a device follows.
    pub const DEVICE_BLOCK: u64 = 0x01;
    /// End of this section's records.
    pub const EOS: u64 = 0x02;
    /// Progress report: the sector field is a percentage.
    pub const PROGRESS: u64 = 0x04;
    /// The chunk is all zero and carries no data.
    pub const ZERO_BLOCK: u64 = 0x08;
    /// The bits of the header that are flags rather than sector.
    pub const MASK: u64 = 0x1ff;
}

/// Name of QEMU's RAM section.
pub const RAM_IDSTR: &str = "ram";
/// Version of the RAM section in QEMU 7.2.
pub const RAM_VERSION: u32 = 4;
/// Name of QEMU's block migration section.
pub const BLOCK_IDSTR: &str = "block";
/// Version of the block section in QEMU 7.2.
pub const BLOCK_VERSION: u32 = 1;
/// Size of one block-migration chunk.
pub const BLOCK_CHUNK_SIZE: usize = 1 << 20;
/// Sector size used by block records.
pub const SECTOR_SIZE: u64 = 512;

/// The kind of a section header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SectionKind {
    /// `QEMU_VM_SECTION_START`
    Start,
    /// `QEMU_VM_SECTION_PART`
    Part,
    /// `QEMU_VM_SECTION_END`
    End,
    /// `QEMU_VM_SECTION_FULL`
    Full,
}

impl SectionKind {
    /// The marker byte of this kind.
    pub fn marker(self) -> u8 {
        match self {
            SectionKind::Start => marker::SECTION_START,
            SectionKind::Part => marker::SECTION_PART,
            SectionKind::End => marker::SECTION_END,
            SectionKind::Full => marker::SECTION_FULL,
        }
    }

    /// The kind a marker byte stands for, if it is a section marker.
    pub fn from_marker(b: u8) -> Option<Self> {
        match b {
            marker::SECTION_START => Some(SectionKind::Start),
            marker::SECTION_PART => Some(SectionKind::Part),
            marker::SECTION_END => Some(SectionKind::End),
            marker::SECTION_FULL => Some(SectionKind::Full),
            _ => None,
        }
    }

    /// START and FULL headers carry the idstr, instance and version.
    pub fn has_identity(self) -> bool {
        matches!(self, SectionKind::Start | SectionKind::Full)
    }
}

/// A RAM block as the MEM_SIZE record announces it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RamBlockInfo {
    /// The block's name (QEMU's RAMBlock idstr, e.g. `pc.ram`).
    pub idstr: String,
    /// Its used length in bytes.
    pub length: u64,
}
