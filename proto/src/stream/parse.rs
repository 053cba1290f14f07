//! Reading a migration stream record by record, trusting nothing.
//!
//! [`Parser`] is a pull parser: each [`Parser::next`] returns one [`Item`]
//! borrowed from its buffers, so memory stays bounded by [`Limits`] whatever
//! the stream claims. Every error names the byte offset where the stream went
//! wrong.

use std::collections::HashMap;

use super::{block_flag, marker, ram_flag, RamBlockInfo, SectionKind};
use super::{BLOCK_CHUNK_SIZE, BLOCK_IDSTR, BLOCK_VERSION, PAGE_SIZE, RAM_IDSTR, RAM_VERSION};
use super::{QEMU_VM_FILE_MAGIC, QEMU_VM_FILE_VERSION};
use crate::compress::MAX_COMPRESSED_PAGE;
use crate::qemu_file::{self, QemuFileReader, IO_BUF_SIZE};
use crate::transport::Transport;

/// Errors of parsing a stream. Each names the offset of the offending byte.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// Reading failed, or the stream ended early.
    #[error(transparent)]
    File(#[from] qemu_file::Error),
    /// The file does not start with `QEVM`.
    #[error("at byte {offset}: bad magic {found:#010x}, expected QEVM")]
    BadMagic {
        /// Offset of the magic.
        offset: u64,
        /// What was there.
        found: u32,
    },
    /// A stream version other than 3.
    #[error("at byte {offset}: stream version {found} is not supported (expected 3)")]
    BadVersion {
        /// Offset of the version.
        offset: u64,
        /// What was there.
        found: u32,
    },
    /// A top-level byte that starts nothing known.
    #[error("at byte {offset}: unknown section type {byte:#04x}")]
    UnknownMarker {
        /// Offset of the byte.
        offset: u64,
        /// The byte.
        byte: u8,
    },
    /// A PART or END for a section that never started.
    #[error("at byte {offset}: section id {id} was never started")]
    UnknownSectionId {
        /// Offset of the section header.
        offset: u64,
        /// The id.
        id: u32,
    },
    /// A section version this parser does not know.
    #[error("at byte {offset}: section {idstr:?} version {version} is not supported")]
    UnsupportedVersion {
        /// Offset of the section header.
        offset: u64,
        /// The section's name.
        idstr: String,
        /// Its version.
        version: u32,
    },
    /// A section did not end with `0x7e` and its id.
    #[error("at byte {offset}: missing footer of section {id}")]
    MissingFooter {
        /// Where the footer should be.
        offset: u64,
        /// The section's id.
        id: u32,
    },
    /// The configuration section is malformed.
    #[error("at byte {offset}: bad configuration section: {what}")]
    BadConfiguration {
        /// Offset of the problem.
        offset: u64,
        /// What is wrong.
        what: String,
    },
    /// A RAM record with flags that are unknown or make no sense together.
    #[error("at byte {offset}: unknown RAM record flags {flags:#x}")]
    UnknownRamFlags {
        /// Offset of the record.
        offset: u64,
        /// The flag bits.
        flags: u64,
    },
    /// A block record with unknown flags.
    #[error("at byte {offset}: unknown block record flags {flags:#x}")]
    UnknownBlockFlags {
        /// Offset of the record.
        offset: u64,
        /// The flag bits.
        flags: u64,
    },
    /// A page for a RAM block the stream never announced.
    #[error("at byte {offset}: unknown RAM block {idstr:?}")]
    UnknownRamBlock {
        /// Offset of the record.
        offset: u64,
        /// The block name.
        idstr: String,
    },
    /// A CONTINUE record with no block before it.
    #[error("at byte {offset}: RAM record continues a block but no block came before")]
    ContinueWithoutBlock {
        /// Offset of the record.
        offset: u64,
    },
    /// A page that does not lie inside its block.
    #[error("at byte {offset}: page at {page_offset:#x} lies past the end of block {idstr:?} ({length:#x} bytes)")]
    OffsetPastBlock {
        /// Offset of the record.
        offset: u64,
        /// The block.
        idstr: String,
        /// The page's offset in the block.
        page_offset: u64,
        /// The block's length.
        length: u64,
    },
    /// A page record before the block list.
    #[error("at byte {offset}: RAM page before the MEM_SIZE record")]
    PageBeforeMemSize {
        /// Offset of the record.
        offset: u64,
    },
    /// The block list does not add up to the total it announced.
    #[error("at byte {offset}: RAM blocks add up to {sum:#x}, announced total is {total:#x}")]
    MemSizeMismatch {
        /// Offset of the record.
        offset: u64,
        /// Sum of block lengths.
        sum: u64,
        /// Announced total.
        total: u64,
    },
    /// The RAM blocks add up to more than the destination takes
    /// ([`Limits::max_ram_size`]).
    #[error("at byte {offset}: RAM block {idstr:?} of {length} bytes brings the RAM to {total} bytes, above the limit of {limit} bytes")]
    RamTooLarge {
        /// Offset of the MEM_SIZE record.
        offset: u64,
        /// The block that crossed the limit.
        idstr: String,
        /// Its length.
        length: u64,
        /// The blocks' lengths up to and including it.
        total: u64,
        /// The limit.
        limit: u64,
    },
    /// A second block list that differs from the first.
    #[error("at byte {offset}: RAM block list changed mid-stream")]
    MemSizeChanged {
        /// Offset of the record.
        offset: u64,
    },
    /// More of something than any real stream has.
    #[error("at byte {offset}: {what} exceeds the limit of {limit}")]
    LimitExceeded {
        /// Offset of the problem.
        offset: u64,
        /// What overflowed.
        what: &'static str,
        /// The limit.
        limit: u64,
    },
    /// A compressed page longer than compressBound(4096).
    #[error("at byte {offset}: compressed page of {len} bytes exceeds {MAX_COMPRESSED_PAGE}")]
    CompressedTooLong {
        /// Offset of the record.
        offset: u64,
        /// The announced length.
        len: u32,
    },
    /// An XBZRLE record that is not well formed.
    #[error("at byte {offset}: bad XBZRLE record: {what}")]
    BadXbzrle {
        /// Offset of the record.
        offset: u64,
        /// What is wrong.
        what: &'static str,
    },
    /// An RDMA hook record, which needs a transport ferry does not have.
    #[error("at byte {offset}: RAM hook records (RDMA) are not supported")]
    HookUnsupported {
        /// Offset of the record.
        offset: u64,
    },
    /// The vmdesc trailer is malformed.
    #[error("at byte {offset}: bad vmdesc trailer: {what}")]
    BadVmdesc {
        /// Offset of the trailer.
        offset: u64,
        /// What is wrong.
        what: &'static str,
    },
    /// Bytes after the end of the stream.
    #[error("at byte {offset}: unexpected data after the end of the stream")]
    TrailingData {
        /// Offset of the first extra byte.
        offset: u64,
    },
    /// A page size other than ferry's 4 KiB: every page offset and length
    /// would be read wrong.
    #[error("at byte {offset}: the stream's {source_of} declares {stream}-byte pages; ferry supports only {PAGE_SIZE}-byte pages")]
    PageSize {
        /// Offset of the declaration.
        offset: u64,
        /// Where: the configuration's target-page-bits, or the vmdesc.
        source_of: &'static str,
        /// The page size it declares, in bytes.
        stream: u64,
    },
    /// A RAM or block section among the device sections: its records would
    /// have to be found inside bytes ferry carries without understanding.
    #[error("at byte {offset}: section {idstr:?} comes after the device state; ferry reads RAM and block sections only before it")]
    SectionAfterDeviceState {
        /// Offset of the section header.
        offset: u64,
        /// The section's name.
        idstr: String,
    },
}

impl Error {
    /// The stream offset the error is about.
    pub fn offset(&self) -> u64 {
        match self {
            Error::File(e) => match e {
                qemu_file::Error::Io { offset, .. }
                | qemu_file::Error::ShortWrite { offset, .. }
                | qemu_file::Error::Eof { offset }
                | qemu_file::Error::InvalidString { offset }
                | qemu_file::Error::Hook { offset, .. }
                | qemu_file::Error::NoLoadHook { offset } => *offset,
                qemu_file::Error::StringTooLong { .. } | qemu_file::Error::PeekTooLarge { .. } => 0,
            },
            Error::BadMagic { offset, .. }
            | Error::BadVersion { offset, .. }
            | Error::UnknownMarker { offset, .. }
            | Error::UnknownSectionId { offset, .. }
            | Error::UnsupportedVersion { offset, .. }
            | Error::MissingFooter { offset, .. }
            | Error::BadConfiguration { offset, .. }
            | Error::UnknownRamFlags { offset, .. }
            | Error::UnknownBlockFlags { offset, .. }
            | Error::UnknownRamBlock { offset, .. }
            | Error::ContinueWithoutBlock { offset }
            | Error::OffsetPastBlock { offset, .. }
            | Error::PageBeforeMemSize { offset }
            | Error::MemSizeMismatch { offset, .. }
            | Error::RamTooLarge { offset, .. }
            | Error::MemSizeChanged { offset }
            | Error::LimitExceeded { offset, .. }
            | Error::CompressedTooLong { offset, .. }
            | Error::BadXbzrle { offset, .. }
            | Error::HookUnsupported { offset }
            | Error::BadVmdesc { offset, .. }
            | Error::SectionAfterDeviceState { offset, .. }
            | Error::PageSize { offset, .. }
            | Error::TrailingData { offset } => *offset,
        }
    }
}

/// Result of parsing.
pub type Result<T> = std::result::Result<T, Error>;

/// Bounds on what a stream may make the parser hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest opaque device section body.
    pub max_device_section: usize,
    /// Largest vmdesc trailer.
    pub max_vmdesc: usize,
    /// Most bytes from the first device section to the end of the stream
    /// (device sections, EOF and vmdesc), which the parser holds at once.
    pub max_device_tail: usize,
    /// Most RAM blocks in the block list.
    pub max_ram_blocks: usize,
    /// Most distinct sections.
    pub max_sections: usize,
    /// Most RAM, in bytes, that the block list may add up to: a destination
    /// creates its RAM files at the sizes the stream announces, so it says
    /// here what it can hold.
    pub max_ram_size: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_device_section: 16 << 20,
            max_vmdesc: 16 << 20,
            max_device_tail: 64 << 20,
            max_ram_blocks: 4096,
            max_sections: 65536,
            max_ram_size: u64::MAX,
        }
    }
}

/// What a section carries, decided by its idstr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SectionClass {
    /// QEMU's "ram" section: RAM records.
    Ram,
    /// QEMU's "block" section: disk chunks.
    Block,
    /// Anything else: opaque device state.
    Device,
}

/// A section header, with the identity of its section resolved for PART/END.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SectionHeader {
    /// START, PART, END or FULL.
    #[serde(rename = "type")]
    pub kind: SectionKind,
    /// The section id.
    pub id: u32,
    /// The section's name.
    pub idstr: String,
    /// Its instance number.
    pub instance: u32,
    /// Its version.
    pub version: u32,
    /// What it carries (follows from `idstr`, so not serialized).
    #[serde(skip)]
    pub class: SectionClass,
    /// Offset of its marker byte.
    pub start: u64,
}

/// One RAM record.
#[derive(Debug, PartialEq, Eq)]
pub enum RamRecord<'p> {
    /// The block list (the setup record).
    MemSize(Vec<RamBlockInfo>),
    /// A page of one repeated byte.
    Zero {
        /// Index into the block list.
        block: usize,
        /// Offset of the page in its block.
        offset: u64,
        /// The byte.
        fill: u8,
    },
    /// A raw page.
    Page {
        /// Index into the block list.
        block: usize,
        /// Offset of the page in its block.
        offset: u64,
        /// The page's 4096 bytes.
        data: &'p [u8],
    },
    /// A zlib-compressed page (at most 4110 bytes; not yet inflated).
    Compressed {
        /// Index into the block list.
        block: usize,
        /// Offset of the page in its block.
        offset: u64,
        /// The zlib stream.
        data: &'p [u8],
    },
    /// An XBZRLE delta against the page's previous contents.
    Xbzrle {
        /// Index into the block list.
        block: usize,
        /// Offset of the page in its block.
        offset: u64,
        /// The encoded delta.
        data: &'p [u8],
    },
    /// multifd sync point: the pages every multifd channel sent before its
    /// SYNC packet must be loaded before the next record.
    MultifdFlush,
    /// End of this section's records.
    Eos,
}

/// One block-migration record.
#[derive(Debug, PartialEq, Eq)]
pub enum BlockRecord<'p> {
    /// A 1 MiB chunk of a device; `data` is `None` for an all-zero chunk.
    Chunk {
        /// The device name.
        device: String,
        /// First sector of the chunk.
        sector: u64,
        /// The chunk, unless it is all zero.
        data: Option<&'p [u8]>,
    },
    /// Progress report (percent).
    Progress(u64),
    /// End of this section's records.
    Eos,
}

/// One piece of a stream.
#[derive(Debug)]
pub enum Item<'p> {
    /// The file header; always version 3.
    FileHeader,
    /// The configuration section.
    Configuration {
        /// The machine type it names.
        machine: String,
        /// The whole section as it was on the wire, marker byte included.
        raw: &'p [u8],
    },
    /// A section header.
    Section(SectionHeader),
    /// A record of a RAM section.
    Ram(RamRecord<'p>),
    /// A record of a block section.
    Block(BlockRecord<'p>),
    /// The opaque body of a device section (between header and footer).
    DeviceState(&'p [u8]),
    /// Device state ferry cannot split into sections (no vmdesc sizes it):
    /// the rest of the section whose header came last, and every byte after
    /// it up to the EOF marker, carried as they are.
    OpaqueDeviceState(&'p [u8]),
    /// The footer closing section `id`; `end` is the offset just past it.
    Footer {
        /// The section id.
        id: u32,
        /// Offset just past the footer.
        end: u64,
    },
    /// A command to the destination (postcopy, return path).
    Command {
        /// Command number.
        cmd: u16,
        /// Its payload.
        data: &'p [u8],
    },
    /// The end-of-state marker.
    Eof,
    /// The JSON trailer after EOF.
    Vmdesc(&'p [u8]),
    /// Nothing more: the stream ended where it may end.
    End,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    FileHeader,
    Configuration,
    Top,
    InSection {
        id: u32,
        class: SectionClass,
    },
    Footer {
        id: u32,
    },
    AfterEof,
    /// In the buffered device-state tail: the body of section `id` is next.
    TailBody {
        id: u32,
    },
    /// In the tail: the footer of section `id` is next.
    TailFooter {
        id: u32,
    },
    /// In the tail: a section header or the EOF marker is next.
    TailTop,
    /// In the tail: after the EOF marker.
    TailVmdesc,
    Done,
}

/// The device-state tail of a stream: every byte from the body of the first
/// device section the caller did not size up to the end of input. Device
/// sections carry no length, and their bytes are the guest's, so they are
/// never searched for a footer: they are sized from the vmdesc trailer at
/// the very end, and whatever the vmdesc does not size is carried opaque.
#[derive(Debug, Default)]
struct Tail {
    buf: Vec<u8>,
    /// Stream offset of `buf[0]`.
    base: u64,
    /// Read position in `buf`.
    pos: usize,
    /// Index of the EOF marker (`buf.len()` in a fragment that has none).
    eof: usize,
    /// Where bytes carried whole end: `eof`, or the start of a section the
    /// caller sized that closes the state (an integrity checkpoint).
    opaque_end: usize,
    /// Where the vmdesc JSON is in `buf`.
    vmdesc: Option<std::ops::Range<usize>>,
    /// Body lengths by (idstr, instance): the vmdesc's and the caller's.
    sizes: HashMap<(String, u32), u64>,
}

#[derive(Debug, Clone)]
struct Known {
    idstr: String,
    instance: u32,
    version: u32,
    class: SectionClass,
}

/// Pull parser for a migration stream.
///
/// Items borrow only the parser's scratch buffer, so the parse state can latch
/// an error while an item is out: after an error, every call fails the same way.
pub struct Parser<T: Transport = Box<dyn Transport>> {
    core: Core<T>,
    scratch: Vec<u8>,
    failed: Option<Error>,
}

/// Everything of the parser but the buffer items borrow.
struct Core<T: Transport> {
    f: QemuFileReader<T>,
    state: State,
    limits: Limits,
    sections: HashMap<u32, Known>,
    /// Body lengths of device sections by (idstr, instance), from a vmdesc.
    device_sizes: HashMap<(String, u32), u64>,
    blocks: Vec<RamBlockInfo>,
    /// The block of the last page record; CONTINUE refers to it, across
    /// section boundaries as in QEMU.
    last_block: Option<usize>,
    /// Parsing a device-state file: no file header, no EOF, ends after a section.
    fragment: bool,
    /// The device-state tail, once the stream reached it.
    tail: Option<Tail>,
    /// The configuration lists x-ignore-shared: MEM_SIZE gives each block's
    /// guest address after its length (QEMU's parse_ramblock).
    ignore_shared: bool,
}

impl<T: Transport> std::fmt::Debug for Parser<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parser")
            .field("offset", &self.core.f.offset())
            .field("state", &self.core.state)
            .finish_non_exhaustive()
    }
}

impl<T: Transport> Parser<T> {
    /// A parser at the start of a stream, with default limits.
    pub fn new(f: QemuFileReader<T>) -> Self {
        Self {
            core: Core {
                f,
                state: State::FileHeader,
                limits: Limits::default(),
                sections: HashMap::new(),
                // ferry's own checkpoint section has a fixed length: a sealed
                // stream opens with one, before its RAM.
                device_sizes: HashMap::from([(
                    (super::integrity::IDSTR.to_owned(), 0),
                    super::integrity::BODY_LEN as u64,
                )]),
                blocks: Vec::new(),
                last_block: None,
                fragment: false,
                tail: None,
                ignore_shared: false,
            },
            scratch: Vec::new(),
            failed: None,
        }
    }

    /// A parser for a device-state file (what `ferry inspect
    /// --extract-device-state` writes): a configuration section and whole
    /// sections, with no file header and no EOF marker.
    pub fn fragment(f: QemuFileReader<T>) -> Self {
        let mut p = Self::new(f);
        p.core.state = State::Configuration;
        p.core.fragment = true;
        p
    }

    /// Replaces the limits.
    pub fn with_limits(mut self, limits: Limits) -> Self {
        self.core.limits = limits;
        self
    }

    /// Gives the body length of device sections, keyed by (idstr, instance),
    /// as computed from a vmdesc trailer, beside ferry's checkpoint section,
    /// which is always sized. A length holds only when the footer is right
    /// after it; otherwise the section and the rest are carried whole.
    pub fn with_device_sizes(mut self, sizes: HashMap<(String, u32), u64>) -> Self {
        self.core.device_sizes.extend(sizes);
        self
    }

    /// The RAM blocks announced so far.
    pub fn ram_blocks(&self) -> &[RamBlockInfo] {
        &self.core.blocks
    }

    /// Offset of the next byte to be parsed.
    pub fn offset(&self) -> u64 {
        match &self.core.tail {
            Some(t) => t.base + t.pos as u64,
            None => self.core.f.offset(),
        }
    }

    /// The reader underneath, for the caller to close or inspect.
    pub fn into_reader(self) -> QemuFileReader<T> {
        self.core.f
    }

    /// Parses the next item. After an error, every call returns that error.
    // Items borrow the parser's buffer, so this cannot be `Iterator::next`.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<Item<'_>> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        match self.core.step(&mut self.scratch) {
            Ok(item) => Ok(item),
            Err(e) => {
                self.failed = Some(e.clone());
                Err(e)
            }
        }
    }
}

impl<T: Transport> Core<T> {
    fn step<'s>(&mut self, scratch: &'s mut Vec<u8>) -> Result<Item<'s>> {
        match self.state {
            State::FileHeader => self.file_header(),
            State::Configuration => {
                if self.f.peek_available(1)?.first() == Some(&marker::CONFIGURATION) {
                    return self.configuration(scratch);
                }
                self.state = State::Top;
                self.top(scratch)
            }
            State::Top => self.top(scratch),
            State::InSection { id, class } => match class {
                SectionClass::Ram => self.ram_record(scratch, id),
                SectionClass::Block => self.block_record(scratch, id),
                SectionClass::Device => self.device_state(scratch, id),
            },
            State::Footer { id } => self.footer(id),
            State::AfterEof => self.after_eof(scratch),
            State::TailBody { id } => self.tail_body(scratch, id),
            State::TailFooter { id } => self.tail_footer(id),
            State::TailTop => self.tail_top(scratch),
            State::TailVmdesc => self.tail_vmdesc(scratch),
            State::Done => {
                let offset = self.f.offset();
                if self.f.at_end()? {
                    Ok(Item::End)
                } else {
                    Err(Error::TrailingData { offset })
                }
            }
        }
    }

    fn file_header<'s>(&mut self) -> Result<Item<'s>> {
        let magic = self.f.get_be32()?;
        if magic != QEMU_VM_FILE_MAGIC {
            return Err(Error::BadMagic {
                offset: 0,
                found: magic,
            });
        }
        let version = self.f.get_be32()?;
        if version != QEMU_VM_FILE_VERSION {
            return Err(Error::BadVersion {
                offset: 4,
                found: version,
            });
        }
        self.state = State::Configuration;
        Ok(Item::FileHeader)
    }

    /// The configuration: the machine name, then the subsections QEMU 7.2 may add.
    fn configuration<'s>(&mut self, scratch: &'s mut Vec<u8>) -> Result<Item<'s>> {
        let start = self.f.offset();
        let bad = |offset, what: &str| Error::BadConfiguration {
            offset,
            what: what.to_owned(),
        };
        let mut raw = vec![self.f.get_byte()?];
        let len = self.f.get_be32()?;
        raw.extend_from_slice(&len.to_be_bytes());
        if len > 255 {
            return Err(bad(start + 1, "machine name longer than 255 bytes"));
        }
        let mut name = vec![0u8; len as usize];
        self.f.get_buffer(&mut name)?;
        raw.extend_from_slice(&name);
        let machine =
            String::from_utf8(name).map_err(|_| bad(start + 5, "machine name is not UTF-8"))?;
        while self.f.peek_byte(0)? == marker::SUBSECTION {
            let sub_at = self.f.offset();
            raw.push(self.f.get_byte()?);
            let sub = self.f.get_counted_string()?;
            raw.push(sub.len() as u8);
            raw.extend_from_slice(sub.as_bytes());
            let version = self.f.get_be32()?;
            raw.extend_from_slice(&version.to_be_bytes());
            match sub.as_str() {
                "configuration/target-page-bits" => {
                    let at = self.f.offset();
                    let v = self.f.get_be32()?;
                    raw.extend_from_slice(&v.to_be_bytes());
                    if 1u64.checked_shl(v) != Some(PAGE_SIZE as u64) {
                        return Err(Error::PageSize {
                            offset: at,
                            source_of: "configuration (target-page-bits)",
                            stream: 1u64.checked_shl(v).unwrap_or(0),
                        });
                    }
                }
                "configuration/uuid" => {
                    let mut uuid = [0u8; 16];
                    self.f.get_buffer(&mut uuid)?;
                    raw.extend_from_slice(&uuid);
                }
                "configuration/capabilities" => {
                    let count = self.f.get_be32()?;
                    raw.extend_from_slice(&count.to_be_bytes());
                    if count > 64 {
                        return Err(bad(sub_at, "more than 64 capabilities"));
                    }
                    for _ in 0..count {
                        let cap = self.f.get_counted_string()?;
                        raw.push(cap.len() as u8);
                        raw.extend_from_slice(cap.as_bytes());
                        self.ignore_shared |= cap == "x-ignore-shared";
                    }
                }
                _ => return Err(bad(sub_at, &format!("unknown subsection {sub:?}"))),
            }
        }
        self.state = State::Top;
        *scratch = raw;
        Ok(Item::Configuration {
            machine,
            raw: &scratch[..],
        })
    }

    fn top<'s>(&mut self, scratch: &'s mut Vec<u8>) -> Result<Item<'s>> {
        let offset = self.f.offset();
        if self.fragment && self.f.at_end()? {
            self.state = State::Done;
            return Ok(Item::End);
        }
        let byte = self.f.get_byte()?;
        if let Some(kind) = SectionKind::from_marker(byte) {
            return self.section_header(kind, offset);
        }
        match byte {
            marker::EOF => {
                self.state = State::AfterEof;
                Ok(Item::Eof)
            }
            marker::COMMAND => {
                let cmd = self.f.get_be16()?;
                let len = self.f.get_be16()? as usize;
                Ok(Item::Command {
                    cmd,
                    data: self.read_into(scratch, len)?,
                })
            }
            _ => Err(Error::UnknownMarker { offset, byte }),
        }
    }

    fn section_header<'s>(&mut self, kind: SectionKind, offset: u64) -> Result<Item<'s>> {
        let id = self.f.get_be32()?;
        let known = if kind.has_identity() {
            let idstr = self.f.get_counted_string()?;
            let instance = self.f.get_be32()?;
            let version = self.f.get_be32()?;
            self.register(id, idstr, instance, version, offset)?
        } else {
            self.sections
                .get(&id)
                .cloned()
                .ok_or(Error::UnknownSectionId { offset, id })?
        };
        self.state = State::InSection {
            id,
            class: known.class,
        };
        Ok(Item::Section(SectionHeader {
            kind,
            id,
            idstr: known.idstr,
            instance: known.instance,
            version: known.version,
            class: known.class,
            start: offset,
        }))
    }

    /// Records the identity a START or FULL header gives section `id`.
    fn register(
        &mut self,
        id: u32,
        idstr: String,
        instance: u32,
        version: u32,
        offset: u64,
    ) -> Result<Known> {
        let class = match idstr.as_str() {
            RAM_IDSTR => SectionClass::Ram,
            BLOCK_IDSTR => SectionClass::Block,
            _ => SectionClass::Device,
        };
        let supported = match class {
            SectionClass::Ram => version == RAM_VERSION,
            SectionClass::Block => version == BLOCK_VERSION,
            SectionClass::Device => true,
        };
        if !supported {
            return Err(Error::UnsupportedVersion {
                offset,
                idstr,
                version,
            });
        }
        if !self.sections.contains_key(&id) && self.sections.len() >= self.limits.max_sections {
            return Err(Error::LimitExceeded {
                offset,
                what: "number of sections",
                limit: self.limits.max_sections as u64,
            });
        }
        let known = Known {
            idstr,
            instance,
            version,
            class,
        };
        self.sections.insert(id, known.clone());
        Ok(known)
    }

    fn footer<'s>(&mut self, id: u32) -> Result<Item<'s>> {
        let offset = self.f.offset();
        if self.f.peek_buffer(5, 0)? != footer_bytes(id) {
            return Err(Error::MissingFooter { offset, id });
        }
        self.f.skip(5)?;
        self.state = State::Top;
        Ok(Item::Footer {
            id,
            end: offset + 5,
        })
    }

    fn after_eof<'s>(&mut self, scratch: &'s mut Vec<u8>) -> Result<Item<'s>> {
        let offset = self.f.offset();
        if self.f.at_end()? {
            self.state = State::Done;
            return Ok(Item::End);
        }
        let b = self.f.get_byte()?;
        if b != marker::VMDESCRIPTION {
            return Err(Error::TrailingData { offset });
        }
        let len = self.f.get_be32()? as usize;
        if len > self.limits.max_vmdesc {
            return Err(Error::LimitExceeded {
                offset,
                what: "vmdesc length",
                limit: self.limits.max_vmdesc as u64,
            });
        }
        let vmdesc = self.read_into(scratch, len)?;
        if let Some(size) = super::vmdesc::page_size(vmdesc).filter(|&s| s != PAGE_SIZE as u64) {
            return Err(Error::PageSize {
                offset,
                source_of: "vmdesc (page_size)",
                stream: size,
            });
        }
        self.state = State::Done;
        Ok(Item::Vmdesc(vmdesc))
    }

    fn ram_record<'s>(&mut self, scratch: &'s mut Vec<u8>, id: u32) -> Result<Item<'s>> {
        let offset = self.f.offset();
        let header = self.f.get_be64()?;
        let flags = header & ram_flag::MASK;
        let addr = header & !ram_flag::MASK;
        let kind = flags & !ram_flag::CONTINUE;
        match kind {
            ram_flag::MEM_SIZE => return self.mem_size(addr, offset),
            ram_flag::EOS => {
                self.state = State::Footer { id };
                return Ok(Item::Ram(RamRecord::Eos));
            }
            ram_flag::MULTIFD_FLUSH => return Ok(Item::Ram(RamRecord::MultifdFlush)),
            ram_flag::HOOK => return Err(Error::HookUnsupported { offset }),
            ram_flag::ZERO | ram_flag::PAGE | ram_flag::COMPRESS_PAGE | ram_flag::XBZRLE => {}
            _ => return Err(Error::UnknownRamFlags { offset, flags }),
        }
        let block = self.page_block(flags, offset)?;
        let info = &self.blocks[block];
        if addr
            .checked_add(PAGE_SIZE as u64)
            .is_none_or(|end| end > info.length)
        {
            return Err(Error::OffsetPastBlock {
                offset,
                idstr: info.idstr.clone(),
                page_offset: addr,
                length: info.length,
            });
        }
        let record = match kind {
            ram_flag::ZERO => RamRecord::Zero {
                block,
                offset: addr,
                fill: self.f.get_byte()?,
            },
            ram_flag::PAGE => RamRecord::Page {
                block,
                offset: addr,
                data: self.read_into(scratch, PAGE_SIZE)?,
            },
            ram_flag::COMPRESS_PAGE => {
                let len = self.compressed_len()?;
                RamRecord::Compressed {
                    block,
                    offset: addr,
                    data: self.read_into(scratch, len)?,
                }
            }
            _ => {
                let len = self.xbzrle_len()?;
                RamRecord::Xbzrle {
                    block,
                    offset: addr,
                    data: self.read_into(scratch, len)?,
                }
            }
        };
        Ok(Item::Ram(record))
    }

    /// Reads the next `len` bytes into `scratch`.
    fn read_into<'s>(&mut self, scratch: &'s mut Vec<u8>, len: usize) -> Result<&'s [u8]> {
        scratch.resize(len, 0);
        self.f.get_buffer(&mut scratch[..])?;
        Ok(&scratch[..])
    }

    /// The length of a COMPRESS_PAGE record's zlib data, bounded as QEMU does.
    fn compressed_len(&mut self) -> Result<usize> {
        let offset = self.f.offset();
        let len = self.f.get_be32()?;
        if len as usize > MAX_COMPRESSED_PAGE {
            return Err(Error::CompressedTooLong { offset, len });
        }
        Ok(len as usize)
    }

    /// The encoding flag and length of an XBZRLE record; a delta never
    /// spans more than a page.
    fn xbzrle_len(&mut self) -> Result<usize> {
        let offset = self.f.offset();
        if self.f.get_byte()? != super::xbzrle::ENCODING_FLAG {
            return Err(Error::BadXbzrle {
                offset,
                what: "unknown encoding flag",
            });
        }
        let len = self.f.get_be16()? as usize;
        if len > PAGE_SIZE {
            return Err(Error::BadXbzrle {
                offset,
                what: "encoded length above one page",
            });
        }
        Ok(len)
    }

    /// Resolves the block of a page record: the previous one for CONTINUE,
    /// else the named one.
    fn page_block(&mut self, flags: u64, offset: u64) -> Result<usize> {
        if flags & ram_flag::CONTINUE != 0 {
            return self
                .last_block
                .ok_or(Error::ContinueWithoutBlock { offset });
        }
        let idstr = self.f.get_counted_string()?;
        if self.blocks.is_empty() {
            return Err(Error::PageBeforeMemSize { offset });
        }
        let block = self
            .blocks
            .iter()
            .position(|b| b.idstr == idstr)
            .ok_or(Error::UnknownRamBlock { offset, idstr })?;
        self.last_block = Some(block);
        Ok(block)
    }

    fn mem_size<'s>(&mut self, total: u64, offset: u64) -> Result<Item<'s>> {
        let mut blocks = Vec::new();
        let mut sum = 0u64;
        while sum < total {
            if blocks.len() >= self.limits.max_ram_blocks {
                return Err(Error::LimitExceeded {
                    offset,
                    what: "number of RAM blocks",
                    limit: self.limits.max_ram_blocks as u64,
                });
            }
            let idstr = self.f.get_counted_string()?;
            let length = self.f.get_be64()?;
            if self.ignore_shared {
                // The block's guest address; a destination QEMU checks it
                // against its own shared blocks, ferry has no address map.
                self.f.get_be64()?;
            }
            sum = sum.saturating_add(length);
            if length == 0 || sum > total {
                break;
            }
            if sum > self.limits.max_ram_size {
                return Err(Error::RamTooLarge {
                    offset,
                    idstr,
                    length,
                    total: sum,
                    limit: self.limits.max_ram_size,
                });
            }
            blocks.push(RamBlockInfo { idstr, length });
        }
        if sum != total {
            return Err(Error::MemSizeMismatch { offset, sum, total });
        }
        if !self.blocks.is_empty() && self.blocks != blocks {
            return Err(Error::MemSizeChanged { offset });
        }
        self.blocks = blocks;
        Ok(Item::Ram(RamRecord::MemSize(self.blocks.clone())))
    }

    fn block_record<'s>(&mut self, scratch: &'s mut Vec<u8>, id: u32) -> Result<Item<'s>> {
        let offset = self.f.offset();
        let header = self.f.get_be64()?;
        let flags = header & block_flag::MASK;
        let sector = header >> 9;
        if flags == block_flag::EOS {
            self.state = State::Footer { id };
            return Ok(Item::Block(BlockRecord::Eos));
        }
        if flags == block_flag::PROGRESS {
            return Ok(Item::Block(BlockRecord::Progress(sector)));
        }
        let zero = match flags {
            block_flag::DEVICE_BLOCK => false,
            f if f == block_flag::DEVICE_BLOCK | block_flag::ZERO_BLOCK => true,
            _ => return Err(Error::UnknownBlockFlags { offset, flags }),
        };
        let device = self.f.get_counted_string()?;
        let data = if zero {
            None
        } else {
            Some(self.read_into(scratch, BLOCK_CHUNK_SIZE)?)
        };
        Ok(Item::Block(BlockRecord::Chunk {
            device,
            sector,
            data,
        }))
    }

    /// Reads a device section's body: exactly the length the caller gave for
    /// it when its footer follows, or else, as for every section whose bytes
    /// are the guest's, from the buffered tail of the stream.
    fn device_state<'s>(&mut self, scratch: &'s mut Vec<u8>, id: u32) -> Result<Item<'s>> {
        let sized = self
            .sections
            .get(&id)
            .and_then(|k| self.device_sizes.get(&(k.idstr.clone(), k.instance)))
            .copied();
        // A caller's length holds only with the footer right behind it; a
        // wrong one is never a reason to search the guest's bytes.
        let fits = sized
            .and_then(|l| usize::try_from(l).ok())
            .filter(|&l| l <= self.limits.max_device_section)
            .filter(|&l| l.checked_add(5).is_some_and(|n| n <= IO_BUF_SIZE));
        if let Some(len) = fits {
            let window = self.f.peek_available(len + 5)?;
            if window.len() == len + 5 && window[len..] == footer_bytes(id) {
                self.read_into(scratch, len)?;
                self.state = State::Footer { id };
                return Ok(Item::DeviceState(&scratch[..]));
            }
        }
        self.read_tail()?;
        self.tail_body(scratch, id)
    }

    /// Reads the rest of the input into the tail and finds its EOF marker
    /// and vmdesc trailer. Without a trailer a stream must end with the EOF
    /// marker; a device-state file may end anywhere.
    fn read_tail(&mut self) -> Result<()> {
        let base = self.f.offset();
        let limit = self.limits.max_device_tail;
        let mut buf = Vec::new();
        loop {
            let window = self.f.peek_available(IO_BUF_SIZE)?;
            if window.is_empty() {
                break;
            }
            if buf.len() + window.len() > limit {
                return Err(Error::LimitExceeded {
                    offset: base,
                    what: "device state (sections, EOF and vmdesc)",
                    limit: limit as u64,
                });
            }
            buf.extend_from_slice(window);
            let n = window.len() as u64;
            self.f.skip(n)?;
        }
        let vmdesc = super::vmdesc::trailer_range(&buf);
        let eof = match &vmdesc {
            Some(json) => json.start - 6,
            None if self.fragment => buf.len(),
            None => buf.len().saturating_sub(1),
        };
        // Without a vmdesc only the end says the state is whole: a footer
        // marker 5 bytes before it and (in a stream) EOF as the last byte.
        // A stream cut on a footer or anywhere else fails here.
        let whole = vmdesc.is_some()
            || (eof >= 5
                && (self.fragment || buf[eof] == marker::EOF)
                && buf[eof - 5] == marker::SECTION_FOOTER);
        if !whole {
            return Err(qemu_file::Error::Eof {
                offset: base + buf.len() as u64,
            }
            .into());
        }
        if let Some(r) = &vmdesc {
            if let Some(size) = super::vmdesc::page_size(&buf[r.clone()]) {
                if size != PAGE_SIZE as u64 {
                    return Err(Error::PageSize {
                        offset: base + r.start as u64 - 5,
                        source_of: "vmdesc (page_size)",
                        stream: size,
                    });
                }
            }
        }
        let mut sizes = vmdesc
            .as_ref()
            .and_then(|r| super::vmdesc::section_sizes(&buf[r.clone()]).ok())
            .unwrap_or_default();
        sizes.extend(self.device_sizes.iter().map(|(k, v)| (k.clone(), *v)));
        let opaque_end = self.closing_section(&buf[..eof]).unwrap_or(eof);
        self.tail = Some(Tail {
            buf,
            base,
            pos: 0,
            eof,
            opaque_end,
            vmdesc,
            sizes,
        });
        Ok(())
    }

    /// Where a section the caller sized starts when it is the last thing in
    /// `state` and one of its kind came before the tail: a sealed stream's
    /// last checkpoint, which must not be carried whole with the device
    /// state before it.
    fn closing_section(&self, state: &[u8]) -> Option<usize> {
        self.device_sizes
            .iter()
            .find_map(|((idstr, instance), &len)| {
                self.sections.values().find(|k| &k.idstr == idstr)?;
                let header = 14 + idstr.len();
                let start = state
                    .len()
                    .checked_sub(header + usize::try_from(len).ok()? + 5)?;
                let (kind, id, identity, n) = tail_header(&state[start..])?;
                let (name, inst, _) = identity?;
                (kind == SectionKind::Full
                    && n == header
                    && name == *idstr
                    && inst == *instance
                    && state[state.len() - 5..] == footer_bytes(id))
                .then_some(start)
            })
    }

    /// The body of section `id` from the tail: its vmdesc size when a
    /// footer sits right behind it, else everything up to the EOF marker.
    fn tail_body<'s>(&mut self, scratch: &'s mut Vec<u8>, id: u32) -> Result<Item<'s>> {
        let known = self.sections.get(&id).cloned();
        let t = self.tail.as_mut().expect("tail states follow read_tail");
        let len = known
            .and_then(|k| t.sizes.get(&(k.idstr, k.instance)).copied())
            .and_then(|l| usize::try_from(l).ok());
        let fits = len.filter(|&l| {
            l.checked_add(5).is_some_and(|n| t.pos + n <= t.eof)
                && t.buf[t.pos + l..t.pos + l + 5] == footer_bytes(id)
        });
        scratch.clear();
        match fits {
            Some(l) => {
                scratch.extend_from_slice(&t.buf[t.pos..t.pos + l]);
                t.pos += l;
                self.state = State::TailFooter { id };
                Ok(Item::DeviceState(&scratch[..]))
            }
            None => {
                let end = t.opaque_stop();
                scratch.extend_from_slice(&t.buf[t.pos..end]);
                t.pos = end;
                self.state = State::TailTop;
                Ok(Item::OpaqueDeviceState(&scratch[..]))
            }
        }
    }

    fn tail_footer<'s>(&mut self, id: u32) -> Result<Item<'s>> {
        let t = self.tail.as_mut().expect("tail states follow read_tail");
        t.pos += 5;
        self.state = State::TailTop;
        Ok(Item::Footer {
            id,
            end: t.base + t.pos as u64,
        })
    }

    /// The next section header in the tail, or its EOF marker. A header
    /// that does not parse is carried opaque with the rest: only a section
    /// the vmdesc sized and a footer confirmed comes before it.
    fn tail_top<'s>(&mut self, scratch: &'s mut Vec<u8>) -> Result<Item<'s>> {
        let t = self.tail.as_mut().expect("tail states follow read_tail");
        let offset = t.base + t.pos as u64;
        if t.pos == t.eof {
            if t.eof == t.buf.len() {
                self.state = State::Done;
                return Ok(Item::End);
            }
            t.pos += 1;
            self.state = match t.vmdesc {
                Some(_) => State::TailVmdesc,
                None => State::Done,
            };
            return Ok(Item::Eof);
        }
        let Some((kind, id, identity, len)) = tail_header(&t.buf[t.pos..t.eof]) else {
            let end = t.opaque_stop();
            scratch.clear();
            scratch.extend_from_slice(&t.buf[t.pos..end]);
            t.pos = end;
            return Ok(Item::OpaqueDeviceState(&scratch[..]));
        };
        t.pos += len;
        let known = match identity {
            Some((idstr, instance, version)) => {
                self.register(id, idstr, instance, version, offset)?
            }
            None => self
                .sections
                .get(&id)
                .cloned()
                .ok_or(Error::UnknownSectionId { offset, id })?,
        };
        if known.class != SectionClass::Device {
            return Err(Error::SectionAfterDeviceState {
                offset,
                idstr: known.idstr,
            });
        }
        self.state = State::TailBody { id };
        Ok(Item::Section(SectionHeader {
            kind,
            id,
            idstr: known.idstr,
            instance: known.instance,
            version: known.version,
            class: known.class,
            start: offset,
        }))
    }

    fn tail_vmdesc<'s>(&mut self, scratch: &'s mut Vec<u8>) -> Result<Item<'s>> {
        let t = self.tail.as_mut().expect("tail states follow read_tail");
        let json = t.vmdesc.clone().expect("TailVmdesc only with a vmdesc");
        if json.len() > self.limits.max_vmdesc {
            return Err(Error::LimitExceeded {
                offset: t.base + json.start as u64 - 5,
                what: "vmdesc length",
                limit: self.limits.max_vmdesc as u64,
            });
        }
        scratch.clear();
        scratch.extend_from_slice(&t.buf[json.clone()]);
        t.pos = json.end;
        self.state = State::Done;
        Ok(Item::Vmdesc(&scratch[..]))
    }
}

impl Tail {
    /// Where bytes carried whole from the read position end.
    fn opaque_stop(&self) -> usize {
        if self.opaque_end > self.pos {
            self.opaque_end
        } else {
            self.eof
        }
    }
}

/// A section header at the start of `b`: kind, id, identity (idstr,
/// instance, version) for START and FULL, and its length; `None` if `b`
/// does not start with a whole one.
#[allow(clippy::type_complexity)]
fn tail_header(b: &[u8]) -> Option<(SectionKind, u32, Option<(String, u32, u32)>, usize)> {
    let be32 = |at: usize| Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?));
    let kind = SectionKind::from_marker(*b.first()?)?;
    let id = be32(1)?;
    if !kind.has_identity() {
        return Some((kind, id, None, 5));
    }
    let n = *b.get(5)? as usize;
    let idstr = std::str::from_utf8(b.get(6..6 + n)?).ok()?.to_owned();
    let (instance, version) = (be32(6 + n)?, be32(10 + n)?);
    Some((kind, id, Some((idstr, instance, version)), 14 + n))
}

fn footer_bytes(id: u32) -> [u8; 5] {
    let b = id.to_be_bytes();
    [marker::SECTION_FOOTER, b[0], b[1], b[2], b[3]]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qemu_file::QemuFileWriter;
    use crate::stream::encode::{self, RamWriter};
    use crate::transport::MemTransport;

    /// A stream that opens the RAM section with `blocks` (name, length).
    fn announcing(blocks: &[(&str, u64)]) -> Vec<u8> {
        let infos = blocks.iter().map(|&(idstr, length)| RamBlockInfo {
            idstr: idstr.into(),
            length,
        });
        let mut f = QemuFileWriter::new(MemTransport::new());
        encode::put_file_header(&mut f);
        encode::put_configuration(&mut f, "none");
        let infos: Vec<_> = infos.collect();
        RamWriter::new()
            .put_setup_section(&mut f, 2, &infos)
            .unwrap();
        f.into_transport().unwrap().take()
    }

    /// Parses up to the block list: the blocks, or the error.
    fn block_list(stream: Vec<u8>, limits: Limits) -> Result<Vec<RamBlockInfo>> {
        let mut p =
            Parser::new(QemuFileReader::new(MemTransport::from_bytes(stream))).with_limits(limits);
        loop {
            if let Item::Ram(RamRecord::MemSize(blocks)) = p.next()? {
                return Ok(blocks);
            }
        }
    }

    fn ram_limit(max_ram_size: u64) -> Limits {
        Limits {
            max_ram_size,
            ..Limits::default()
        }
    }

    #[test]
    fn ram_up_to_the_limit_parses() {
        let stream = announcing(&[("pc.ram", 3 << 20), ("vga.vram", 1 << 20)]);
        let blocks = block_list(stream, ram_limit(4 << 20)).unwrap();
        assert_eq!(blocks.len(), 2);
        assert_eq!(blocks[1].length, 1 << 20);
    }

    #[test]
    fn a_block_over_the_ram_limit_is_named_with_its_size_and_the_limit() {
        let stream = announcing(&[("pc.ram", 3 << 20), ("vga.vram", 2 << 20)]);
        let e = block_list(stream, ram_limit(4 << 20)).unwrap_err();
        match &e {
            Error::RamTooLarge {
                idstr,
                length,
                total,
                limit,
                ..
            } => {
                assert_eq!(idstr, "vga.vram");
                assert_eq!((*length, *total, *limit), (2 << 20, 5 << 20, 4 << 20));
            }
            other => panic!("expected RamTooLarge, got {other:?}"),
        }
        let msg = e.to_string();
        for part in ["\"vga.vram\"", "2097152", "4194304"] {
            assert!(msg.contains(part), "{msg} names {part}");
        }
    }

    #[test]
    fn the_limit_counts_all_blocks_not_each_alone() {
        let stream = announcing(&[("a", 1 << 62), ("b", 1 << 62)]);
        let e = block_list(stream, ram_limit(1 << 62)).unwrap_err();
        assert!(
            matches!(&e, Error::RamTooLarge { idstr, .. } if idstr == "b"),
            "{e:?}"
        );
    }

    /// header, configuration, RAM setup and END, then `devices` (idstr,
    /// body) as FULL sections with ids from 10, EOF and, if given, a vmdesc.
    fn with_devices(devices: &[(&str, Vec<u8>)], vmdesc: Option<&str>) -> Vec<u8> {
        let mut f = QemuFileWriter::new(MemTransport::new());
        encode::put_file_header(&mut f);
        encode::put_configuration(&mut f, "none");
        let info = [RamBlockInfo {
            idstr: "mem".into(),
            length: PAGE_SIZE as u64,
        }];
        let mut ram = RamWriter::new();
        ram.put_setup_section(&mut f, 2, &info).unwrap();
        encode::put_section_part(&mut f, SectionKind::End, 2);
        ram.put_eos(&mut f);
        encode::put_footer(&mut f, 2);
        for (i, (idstr, body)) in devices.iter().enumerate() {
            let id = 10 + i as u32;
            encode::put_section_start(&mut f, SectionKind::Full, id, idstr, 0, 1).unwrap();
            f.put_buffer(body);
            encode::put_footer(&mut f, id);
        }
        encode::put_eof(&mut f);
        if let Some(json) = vmdesc {
            encode::put_vmdesc(&mut f, json.as_bytes());
        }
        f.into_transport().unwrap().take()
    }

    /// Every item's device-state view: (idstr, body) of sized sections, and
    /// the opaque bytes.
    #[allow(clippy::type_complexity)]
    fn device_items(stream: Vec<u8>) -> Result<(Vec<(String, Vec<u8>)>, Vec<u8>)> {
        let mut p = Parser::new(QemuFileReader::new(MemTransport::from_bytes(stream)));
        let (mut sized, mut opaque, mut name) = (Vec::new(), Vec::new(), String::new());
        loop {
            match p.next()? {
                Item::Section(h) if h.class == SectionClass::Device => name = h.idstr,
                Item::DeviceState(b) => sized.push((name.clone(), b.to_vec())),
                Item::OpaqueDeviceState(b) => opaque.extend_from_slice(b),
                Item::End => return Ok((sized, opaque)),
                _ => {}
            }
        }
    }

    /// A body whose bytes look like its own footer, EOF and a vmdesc header.
    fn lure(id: u32, len: u32) -> Vec<u8> {
        let mut b = vec![0u8; 20];
        b.push(marker::SECTION_FOOTER);
        b.extend_from_slice(&id.to_be_bytes());
        b.extend_from_slice(&[marker::EOF, marker::VMDESCRIPTION]);
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(&[0u8; 20]);
        b
    }

    const TWO_DEVICES: &str = r#"{"page_size":4096,"devices":[
        {"name":"a","instance_id":0,"fields":[{"name":"x","size":51}]},
        {"name":"b","instance_id":0,"fields":[{"name":"y","size":3}]}]}"#;

    #[test]
    fn device_sections_are_sized_by_the_vmdesc_not_by_lookalike_footers() {
        for len in [4, 30, 1000] {
            let devices = [("a", lure(10, len)), ("b", vec![1, 2, 3])];
            let (sized, opaque) = device_items(with_devices(&devices, Some(TWO_DEVICES))).unwrap();
            assert_eq!(
                sized,
                [("a".into(), lure(10, len)), ("b".into(), vec![1, 2, 3])]
            );
            assert!(opaque.is_empty());
        }
    }

    #[test]
    fn without_a_vmdesc_the_device_state_is_carried_whole_to_eof() {
        let devices = [("a", lure(10, 4)), ("b", vec![1, 2, 3])];
        let stream = with_devices(&devices, None);
        let (sized, opaque) = device_items(stream.clone()).unwrap();
        assert!(sized.is_empty());
        // The first section's header came as an item; the rest is whole.
        let body_at = stream.len() - 1 - opaque.len();
        assert_eq!(opaque, stream[body_at..stream.len() - 1]);
        assert_eq!(&opaque[..lure(10, 4).len()], &lure(10, 4)[..]);
    }

    #[test]
    fn a_stream_cut_inside_the_device_state_fails() {
        let devices = [("a", lure(10, 4)), ("b", vec![1, 2, 3])];
        let whole = with_devices(&devices, Some(TWO_DEVICES));
        let eof = whole.len() - TWO_DEVICES.len() - 6;
        // Two headers of one-letter idstrs, the bodies, two footers.
        let first_device = eof - (2 * 15 + 51 + 3 + 2 * 5);
        let mut accepted = Vec::new();
        for cut in first_device + 14..whole.len() {
            if device_items(whole[..cut].to_vec()).is_ok() {
                accepted.push(cut);
            }
        }
        // Without its vmdesc a stream is whole when it ends in a footer and
        // EOF: at its real end, and (the limit of a stream without a vmdesc)
        // where the guest's bytes read so.
        let lure_end = first_device + 15 + 20 + 6;
        assert_eq!(accepted, [lure_end, eof + 1]);
    }

    #[test]
    fn a_device_state_file_splits_again_as_the_stream_did() {
        use crate::stream::device_state::DeviceState;
        let devices = [("a", lure(10, 4)), ("b", vec![1, 2, 3])];
        for vmdesc in [Some(TWO_DEVICES), None] {
            let mut p = Parser::new(QemuFileReader::new(MemTransport::from_bytes(with_devices(
                &devices, vmdesc,
            ))));
            let mut state = DeviceState::default();
            loop {
                let item = p.next().unwrap();
                if matches!(item, Item::End) {
                    break;
                }
                state.observe(&item);
            }
            assert_eq!(state.sections.len(), if vmdesc.is_some() { 2 } else { 0 });
            let again = DeviceState::from_bytes(state.to_bytes()).unwrap();
            assert_eq!(again.sections.len(), state.sections.len());
            assert_eq!(again.opaque, state.opaque);
            assert_eq!(again.to_bytes(), state.to_bytes());
        }
    }
}
