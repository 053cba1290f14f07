//! QEMU's multifd channels: the 64-byte channel init, the RAM packet header,
//! and the per-channel zlib / zstd streams (QEMU 10.0, `migration/multifd.h`,
//! `multifd.c`, `multifd-nocomp.c`, `multifd-zlib.c`, `multifd-zstd.c`).
//!
//! A multifd migration has one main channel (the ordinary `QEVM` stream) and
//! N extra connections to the same address. Each extra connection opens with
//! a [`ChannelInit`] and then carries packets: a fixed-size header
//! ([`PacketHeader`], 1344 bytes for 4 KiB pages) followed by
//! `next_packet_size` bytes holding the packet's normal pages, raw or
//! compressed. Zero pages travel as offsets only. SYNC packets carry nothing;
//! they pair with `MULTIFD_FLUSH` (or EOS, in QEMU's legacy mode) on the main
//! channel, where the destination waits until every channel has delivered its
//! SYNC, so a page from before the sync point never lands after one from
//! after it.
//!
//! Everything here is pure encoding and decoding; connections, threads and
//! guest memory belong to the callers.

use flate2::{Decompress, FlushCompress, FlushDecompress, Status};

use crate::stream::PAGE_SIZE;

/// First four bytes of every multifd channel and packet (`MULTIFD_MAGIC`).
pub const MAGIC: u32 = 0x1122_3344;
/// The only channel and packet version QEMU 7.2 to 10 speak (`MULTIFD_VERSION`).
pub const VERSION: u32 = 1;
/// Bytes of a [`ChannelInit`] on the wire (`MultiFDInit_t`).
pub const INIT_LEN: usize = 64;
/// Pages a packet can hold: `MULTIFD_PACKET_SIZE` (512 KiB) of 4 KiB pages.
pub const PAGES_PER_PACKET: usize = (512 << 10) / PAGE_SIZE;
/// Bytes of a packet header on the wire: 320 fixed bytes and one be64 offset
/// per page slot, whatever the packet holds.
pub const HEADER_LEN: usize = OFFSETS_AT + 8 * PAGES_PER_PACKET;
/// Largest compressed payload a QEMU receiver has room for (twice the packet
/// size); a longer one is refused before any byte of it is read.
pub const MAX_PAYLOAD: usize = 2 * PAGES_PER_PACKET * PAGE_SIZE;
/// Longest RAM block name a packet can carry (the field is 256 bytes with a NUL).
pub const MAX_BLOCK_NAME: usize = 255;

const RAMBLOCK_AT: usize = 64;
const OFFSETS_AT: usize = 320;

/// Packet flag bits (`MULTIFD_FLAG_*`).
pub mod flag {
    /// The channel's sync point.
    pub const SYNC: u32 = 0x01;
    /// The bits that name the packet's compression.
    pub const COMPRESSION_MASK: u32 = 0x3e;
    /// Payload compressed with zlib.
    pub const ZLIB: u32 = 0x02;
    /// Payload compressed with zstd.
    pub const ZSTD: u32 = 0x04;
    /// A device-state packet (VFIO), which ferry does not carry.
    pub const DEVICE_STATE: u32 = 0x40;
}

/// Malformed or unexpected multifd input.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The first four bytes are not `MULTIFD_MAGIC`.
    #[error("multifd magic is {found:#010x}, expected {MAGIC:#010x}")]
    Magic {
        /// What arrived.
        found: u32,
    },
    /// A version other than 1.
    #[error("multifd version {0} is not supported (only {VERSION})")]
    Version(u32),
    /// Flag bits ferry does not know, or a device-state packet.
    #[error("multifd packet flags {0:#x} are not supported")]
    Flags(u32),
    /// The packet's compression is not the one the channel was set up with.
    #[error("multifd packet is compressed as {found}, the channel expects {expected}")]
    CompressionMismatch {
        /// From the packet's flags.
        found: &'static str,
        /// The negotiated method.
        expected: &'static str,
    },
    /// Page counts that do not fit the packet.
    #[error(
        "multifd packet claims {normal} normal and {zero} zero pages in {alloc} slots \
         (at most {PAGES_PER_PACKET})"
    )]
    PageCount {
        /// `pages_alloc`.
        alloc: u32,
        /// `normal_pages`.
        normal: u32,
        /// `zero_pages`.
        zero: u32,
    },
    /// A payload length that cannot belong to the pages announced.
    #[error("multifd packet payload of {len} bytes for {normal} normal pages ({method})")]
    PayloadSize {
        /// `next_packet_size`.
        len: u32,
        /// `normal_pages`.
        normal: u32,
        /// The channel's compression.
        method: &'static str,
    },
    /// The block name is not NUL-terminated UTF-8.
    #[error("multifd packet's RAM block name is not a NUL-terminated UTF-8 string")]
    BlockName,
    /// A page offset that is not page aligned.
    #[error("multifd packet offset {0:#x} is not page aligned")]
    Unaligned(u64),
    /// The compressed payload is corrupt.
    #[error("multifd {method} payload is corrupt")]
    Corrupt {
        /// The channel's compression.
        method: &'static str,
        /// What the decoder said.
        #[source]
        source: std::io::Error,
    },
    /// A decompressor cannot be set up.
    #[error("cannot set up a multifd {method} decompressor")]
    Decoder {
        /// The method.
        method: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The payload decoded to more or fewer bytes than its pages.
    #[error("multifd {method} payload decodes to {got} bytes, the packet's pages are {expected}")]
    DecodedSize {
        /// The channel's compression.
        method: &'static str,
        /// Bytes produced.
        got: usize,
        /// normal_pages x 4096.
        expected: usize,
    },
}

/// How a channel's payloads are encoded (QEMU's `multifd-compression`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// Raw pages.
    None,
    /// One zlib stream per channel, a sync flush per packet.
    Zlib,
    /// One zstd frame per channel, a flush per packet.
    Zstd,
}

impl Compression {
    /// The method's flag bits.
    pub fn flag(self) -> u32 {
        match self {
            Compression::None => 0,
            Compression::Zlib => flag::ZLIB,
            Compression::Zstd => flag::ZSTD,
        }
    }

    /// QEMU's name for it.
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Zlib => "zlib",
            Compression::Zstd => "zstd",
        }
    }

    /// The method a packet's flags name.
    ///
    /// # Errors
    /// [`Error::Flags`] for bits that name none.
    pub fn from_flags(flags: u32) -> Result<Self, Error> {
        match flags & flag::COMPRESSION_MASK {
            0 => Ok(Compression::None),
            flag::ZLIB => Ok(Compression::Zlib),
            flag::ZSTD => Ok(Compression::Zstd),
            _ => Err(Error::Flags(flags)),
        }
    }
}

/// The first 64 bytes of a multifd channel (`MultiFDInit_t`): which channel
/// this is, and the source's VM uuid, which a QEMU destination compares with
/// its own `-uuid` (all zero when neither side sets one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelInit {
    /// The source VM's uuid.
    pub uuid: [u8; 16],
    /// Channel index, 0 to N-1.
    pub id: u8,
}

impl ChannelInit {
    /// The 64 bytes on the wire.
    pub fn encode(&self) -> [u8; INIT_LEN] {
        let mut b = [0u8; INIT_LEN];
        b[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&VERSION.to_be_bytes());
        b[8..24].copy_from_slice(&self.uuid);
        b[24] = self.id;
        b
    }

    /// Reads the 64 bytes a channel opens with.
    ///
    /// # Errors
    /// [`Error::Magic`] or [`Error::Version`].
    pub fn decode(b: &[u8; INIT_LEN]) -> Result<Self, Error> {
        check_magic_version(b)?;
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[8..24]);
        Ok(Self { uuid, id: b[24] })
    }
}

/// True when the first four bytes of a connection are a multifd channel's,
/// not the main stream's `QEVM`.
pub fn is_channel_magic(first: [u8; 4]) -> bool {
    u32::from_be_bytes(first) == MAGIC
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn check_magic_version(b: &[u8]) -> Result<(), Error> {
    let magic = be32(b, 0);
    if magic != MAGIC {
        return Err(Error::Magic { found: magic });
    }
    match be32(b, 4) {
        VERSION => Ok(()),
        v => Err(Error::Version(v)),
    }
}

/// A RAM packet's header (`MultiFDPacket_t`), checked against the bounds
/// the packet size allows. `offsets` holds the normal pages' byte offsets in
/// the block first, then the zero pages'.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PacketHeader {
    /// `MULTIFD_FLAG_*` bits.
    pub flags: u32,
    /// Pages whose bytes follow, in offset order.
    pub normal_pages: u32,
    /// Pages that are all zero: offsets only.
    pub zero_pages: u32,
    /// Bytes of payload after the header.
    pub next_packet_size: u32,
    /// Sequence number over all channels (the destination does not check it).
    pub packet_num: u64,
    /// The RAM block every offset belongs to (empty in a SYNC packet).
    pub block: String,
    /// Byte offsets within the block: normal pages, then zero pages.
    pub offsets: Vec<u64>,
}

impl PacketHeader {
    /// A SYNC packet: the header alone, as QEMU 9.0 and later send it.
    pub fn sync(packet_num: u64) -> Self {
        Self {
            flags: flag::SYNC,
            packet_num,
            ..Self::default()
        }
    }

    /// True for a sync point.
    pub fn is_sync(&self) -> bool {
        self.flags & flag::SYNC != 0
    }

    /// Bytes of payload that follow the header on the wire.
    pub fn payload_len(&self) -> usize {
        if self.normal_pages == 0 {
            0
        } else {
            self.next_packet_size as usize
        }
    }

    /// Offsets of the pages whose bytes are in the payload.
    pub fn normal(&self) -> &[u64] {
        &self.offsets[..self.normal_pages as usize]
    }

    /// Offsets of the pages that are all zero.
    pub fn zero(&self) -> &[u64] {
        &self.offsets[self.normal_pages as usize..]
    }

    /// Writes the fixed-size header into `out` ([`HEADER_LEN`] bytes).
    ///
    /// # Panics
    /// If the header holds more than [`PAGES_PER_PACKET`] offsets or a block
    /// name longer than [`MAX_BLOCK_NAME`]: the caller builds packets and
    /// must keep within them.
    pub fn encode(&self, out: &mut [u8; HEADER_LEN]) {
        assert!(self.offsets.len() <= PAGES_PER_PACKET, "too many pages");
        assert!(self.block.len() <= MAX_BLOCK_NAME, "block name too long");
        out.fill(0);
        out[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        out[4..8].copy_from_slice(&VERSION.to_be_bytes());
        out[8..12].copy_from_slice(&self.flags.to_be_bytes());
        let alloc = if self.offsets.is_empty() {
            0
        } else {
            PAGES_PER_PACKET as u32
        };
        out[12..16].copy_from_slice(&alloc.to_be_bytes());
        out[16..20].copy_from_slice(&self.normal_pages.to_be_bytes());
        out[20..24].copy_from_slice(&self.next_packet_size.to_be_bytes());
        out[24..32].copy_from_slice(&self.packet_num.to_be_bytes());
        out[32..36].copy_from_slice(&self.zero_pages.to_be_bytes());
        out[RAMBLOCK_AT..RAMBLOCK_AT + self.block.len()].copy_from_slice(self.block.as_bytes());
        for (i, off) in self.offsets.iter().enumerate() {
            let at = OFFSETS_AT + 8 * i;
            out[at..at + 8].copy_from_slice(&off.to_be_bytes());
        }
    }

    /// Reads and checks a header for a channel whose compression is
    /// `expected` (`None` until its first packet with pages names it; a
    /// raw packet passes on any channel):
    /// counts within the packet, a payload length that fits its pages,
    /// page-aligned offsets, a NUL-terminated block name. Whether the block
    /// exists and holds the offsets is the caller's to check.
    ///
    /// # Errors
    /// Every [`Error`] but the decoder's.
    pub fn decode(b: &[u8; HEADER_LEN], expected: Option<Compression>) -> Result<Self, Error> {
        check_magic_version(b)?;
        let flags = be32(b, 8);
        if flags & !(flag::SYNC | flag::COMPRESSION_MASK) != 0 {
            return Err(Error::Flags(flags));
        }
        let (alloc, normal, zero) = (be32(b, 12), be32(b, 16), be32(b, 32));
        let fits = alloc as usize <= PAGES_PER_PACKET && normal <= alloc && zero <= alloc - normal;
        if !fits {
            return Err(Error::PageCount {
                alloc,
                normal,
                zero,
            });
        }
        let header = Self {
            flags,
            normal_pages: normal,
            zero_pages: zero,
            next_packet_size: be32(b, 20),
            packet_num: be64(b, 24),
            block: block_name(&b[RAMBLOCK_AT..OFFSETS_AT])?,
            offsets: (0..(normal + zero) as usize)
                .map(|i| be64(b, OFFSETS_AT + 8 * i))
                .collect(),
        };
        header.check_payload(expected)?;
        if let Some(&off) = header.offsets.iter().find(|&&o| o % PAGE_SIZE as u64 != 0) {
            return Err(Error::Unaligned(off));
        }
        Ok(header)
    }

    /// The payload length must fit the pages and the channel's method. A
    /// packet without normal pages (a SYNC, or only zero pages) has no
    /// payload whatever its `next_packet_size` says: QEMU 7.2 leaves the
    /// previous packet's size there, and its receiver ignores it too.
    fn check_payload(&self, expected: Option<Compression>) -> Result<(), Error> {
        let len = self.next_packet_size;
        let found = Compression::from_flags(self.flags)?;
        let bad = || Error::PayloadSize {
            len,
            normal: self.normal_pages,
            method: found.name(),
        };
        if self.normal_pages == 0 {
            return Ok(());
        }
        // A raw packet loads on a compressed channel: ferry's `auto` mode
        // sends pages raw where compressing them does not pay (and its
        // receiver expects nothing of a channel before its first compressed
        // packet).
        if let Some(expected) = expected.filter(|&e| e != found && found != Compression::None) {
            return Err(Error::CompressionMismatch {
                found: found.name(),
                expected: expected.name(),
            });
        }
        let raw = self.normal_pages as usize * PAGE_SIZE;
        let ok = match found {
            Compression::None => len as usize == raw,
            Compression::Zlib | Compression::Zstd => len > 0 && len as usize <= MAX_PAYLOAD,
        };
        if ok {
            Ok(())
        } else {
            Err(bad())
        }
    }
}

fn block_name(field: &[u8]) -> Result<String, Error> {
    let end = field.iter().position(|&c| c == 0).ok_or(Error::BlockName)?;
    std::str::from_utf8(&field[..end])
        .map(str::to_owned)
        .map_err(|_| Error::BlockName)
}

/// One channel's compressor: a stream that lives as long as the channel, with
/// a flush at the end of every packet so the receiver can decode each packet
/// as it arrives.
pub enum Encoder {
    /// Raw pages: the payload is the pages.
    None,
    /// zlib (RFC 1950), never finished.
    Zlib(Box<flate2::Compress>),
    /// One zstd frame, never ended.
    Zstd(Box<zstd::stream::raw::Encoder<'static>>),
}

impl std::fmt::Debug for Encoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.method().name())
    }
}

impl Encoder {
    /// A compressor for `method` at `level` (zlib 0-9, zstd 1-19).
    ///
    /// # Errors
    /// The zstd library's, for a level it refuses.
    pub fn new(method: Compression, level: i32) -> std::io::Result<Self> {
        Ok(match method {
            Compression::None => Encoder::None,
            Compression::Zlib => Encoder::Zlib(Box::new(flate2::Compress::new(
                flate2::Compression::new(level.clamp(0, 9) as u32),
                true,
            ))),
            Compression::Zstd => {
                let mut z = zstd::stream::raw::Encoder::new(level)?;
                set_zstd_level(&mut z, level)?;
                Encoder::Zstd(Box::new(z))
            }
        })
    }

    /// The method.
    pub fn method(&self) -> Compression {
        match self {
            Encoder::None => Compression::None,
            Encoder::Zlib(_) => Compression::Zlib,
            Encoder::Zstd(_) => Compression::Zstd,
        }
    }

    /// Appends one packet's payload for `pages` (whole pages, concatenated)
    /// to `out`; returns its length.
    ///
    /// # Errors
    /// The compressor's; a compressor that stops making progress is an error,
    /// not a loop.
    pub fn encode(&mut self, pages: &[u8], out: &mut Vec<u8>) -> std::io::Result<usize> {
        let start = out.len();
        match self {
            Encoder::None => out.extend_from_slice(pages),
            Encoder::Zlib(c) => deflate_sync(c, pages, out)?,
            Encoder::Zstd(z) => zstd_flush(z, pages, out)?,
        }
        Ok(out.len() - start)
    }
}

fn deflate_sync(
    c: &mut flate2::Compress,
    mut input: &[u8],
    out: &mut Vec<u8>,
) -> std::io::Result<()> {
    loop {
        out.reserve(input.len() / 2 + 64);
        let (before_in, before_out) = (c.total_in(), c.total_out());
        c.compress_vec(input, out, FlushCompress::Sync)
            .map_err(std::io::Error::other)?;
        let used = (c.total_in() - before_in) as usize;
        input = &input[used..];
        let made = c.total_out() - before_out;
        // Done once every byte went in and the flush fitted in the room left.
        if input.is_empty() && out.len() < out.capacity() {
            return Ok(());
        }
        if used == 0 && made == 0 && out.len() < out.capacity() {
            return Err(std::io::Error::other("deflate made no progress"));
        }
    }
}

/// log2 of the entries in the match table ferry gives zstd at level 1: 2^15
/// (128 KiB, within a core's L2) instead of the level's 2^14 finds about 0.3%
/// more matches in guest RAM (270.6 MB against 271.5 MB for 1 GiB of ferry's
/// mixed pattern) at the same speed; 2^16 found 0.5% more but took 7% longer
/// here (`ferry bench static`: cache misses, which callgrind's instruction
/// counts had not shown). It changes nothing in the format: any zstd
/// decoder, QEMU's among them, reads the stream.
const LEVEL1_HASH_LOG: u32 = 15;

/// Sets a zstd stream's level, with ferry's match table at level 1 and the
/// level's own at any other (a level set later replaces both).
///
/// # Errors
/// The zstd library's, for a level it refuses.
pub fn set_zstd_level(
    z: &mut zstd::stream::raw::Encoder<'static>,
    level: i32,
) -> std::io::Result<()> {
    use zstd::stream::raw::CParameter;
    z.set_parameter(CParameter::CompressionLevel(level))?;
    // 0 is "the level's default".
    z.set_parameter(CParameter::HashLog(if level == 1 {
        LEVEL1_HASH_LOG
    } else {
        0
    }))
}

/// Feeds the packet to the channel's zstd stream a page at a time, as
/// QEMU's multifd-zstd does, and flushes it: zstd then gathers the pages in
/// its own window, where its block compressor runs on one contiguous prefix
/// (a whole packet handed over at once is compressed in place, and every
/// packet after the first then takes the slower two-segment "extDict" path:
/// about 5% more instructions here). Output goes straight into `out`.
fn zstd_flush(
    z: &mut zstd::stream::raw::Encoder<'static>,
    pages: &[u8],
    out: &mut Vec<u8>,
) -> std::io::Result<()> {
    use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
    for page in pages.chunks(PAGE_SIZE) {
        let mut input = InBuffer::around(page);
        while input.pos < page.len() {
            out.reserve(zstd::zstd_safe::compress_bound(page.len()));
            let (pos, before) = (out.len(), input.pos);
            z.run(&mut input, &mut OutBuffer::around_pos(out, pos))?;
            if input.pos == before && out.len() == pos {
                return Err(std::io::Error::other("zstd made no progress"));
            }
        }
    }
    loop {
        out.reserve(PAGE_SIZE);
        let pos = out.len();
        if z.flush(&mut OutBuffer::around_pos(out, pos))? == 0 {
            return Ok(());
        }
    }
}

/// One channel's decompressor, the mirror of [`Encoder`].
pub enum Decoder {
    /// Raw pages.
    None,
    /// zlib (RFC 1950), one stream for the channel's life.
    Zlib(Box<Decompress>),
    /// One zstd frame for the channel's life.
    Zstd(Box<zstd::stream::raw::Decoder<'static>>),
}

impl std::fmt::Debug for Decoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.method().name())
    }
}

impl Decoder {
    /// A decompressor for `method`.
    ///
    /// # Errors
    /// The zstd library's, if it cannot allocate its context.
    pub fn new(method: Compression) -> std::io::Result<Self> {
        Ok(match method {
            Compression::None => Decoder::None,
            Compression::Zlib => Decoder::Zlib(Box::new(Decompress::new(true))),
            Compression::Zstd => Decoder::Zstd(Box::new(zstd::stream::raw::Decoder::new()?)),
        })
    }

    /// The method.
    pub fn method(&self) -> Compression {
        match self {
            Decoder::None => Compression::None,
            Decoder::Zlib(_) => Compression::Zlib,
            Decoder::Zstd(_) => Compression::Zstd,
        }
    }

    /// Decodes one packet's `payload` into `out`, which must come out
    /// exactly full (`normal_pages` x 4096 bytes): never more is written,
    /// and less is an error.
    ///
    /// # Errors
    /// [`Error::Corrupt`] or [`Error::DecodedSize`].
    pub fn decode(&mut self, payload: &[u8], out: &mut [u8]) -> Result<(), Error> {
        let method = self.method().name();
        let got =
            match self {
                Decoder::None => {
                    let n = payload.len().min(out.len());
                    out[..n].copy_from_slice(&payload[..n]);
                    payload.len()
                }
                Decoder::Zlib(d) => inflate_sync(d, payload, out)
                    .map_err(|source| Error::Corrupt { method, source })?,
                Decoder::Zstd(z) => zstd_decode(z, payload, out)
                    .map_err(|source| Error::Corrupt { method, source })?,
            };
        if got == out.len() {
            Ok(())
        } else {
            Err(Error::DecodedSize {
                method,
                got,
                expected: out.len(),
            })
        }
    }
}

/// A channel's decompressor as ferry's receiver keeps it: raw packets are
/// copied whatever the channel's stream, and the stream starts with the
/// channel's first compressed packet (QEMU sends one method per channel;
/// ferry's `auto` mode mixes raw packets into a zstd channel).
#[derive(Debug, Default)]
pub struct ChannelDecoder {
    stream: Option<Decoder>,
}

impl ChannelDecoder {
    /// The channel's compression so far: that of its stream, `None` before
    /// its first compressed packet.
    pub fn method(&self) -> Option<Compression> {
        self.stream.as_ref().map(Decoder::method)
    }

    /// Decodes one packet's `payload`, compressed as `method` (from its
    /// flags), into `out` (`normal_pages` x 4096 bytes), as
    /// [`Decoder::decode`].
    ///
    /// # Errors
    /// [`Error::CompressionMismatch`] for a second compression on the
    /// channel, [`Error::Decoder`], and [`Decoder::decode`]'s.
    pub fn decode(
        &mut self,
        method: Compression,
        payload: &[u8],
        out: &mut [u8],
    ) -> Result<(), Error> {
        if method == Compression::None {
            return Decoder::None.decode(payload, out);
        }
        let d = match &mut self.stream {
            Some(d) if d.method() != method => {
                return Err(Error::CompressionMismatch {
                    found: method.name(),
                    expected: d.method().name(),
                })
            }
            Some(d) => d,
            None => self
                .stream
                .insert(Decoder::new(method).map_err(|source| Error::Decoder {
                    method: method.name(),
                    source,
                })?),
        };
        d.decode(payload, out)
    }
}

/// Runs `step` (one call of a streaming decoder: input left, output room ->
/// input used, output made) until `payload` is used up, into `out` and then
/// into a one-byte probe; returns the bytes made, which exceed `out.len()`
/// when the payload holds more than the pages.
fn drain(
    payload: &[u8],
    out: &mut [u8],
    mut step: impl FnMut(&[u8], &mut [u8]) -> std::io::Result<(usize, usize)>,
) -> std::io::Result<usize> {
    let (mut used, mut made) = (0, 0);
    let mut probe = [0u8; 1];
    loop {
        let room: &mut [u8] = if made < out.len() {
            &mut out[made..]
        } else {
            &mut probe
        };
        let (u, m) = step(&payload[used..], room)?;
        used += u;
        made += m;
        if made > out.len() {
            return Ok(made);
        }
        if used == payload.len() && made == out.len() {
            // The end of a flushed packet may still hold an empty block that
            // makes nothing; one more call with room confirms the end.
            let (u, m) = step(&[], &mut probe)?;
            return Ok(made + m + u);
        }
        if u == 0 && m == 0 {
            if used < payload.len() {
                return Err(std::io::Error::other(format!(
                    "{} bytes of payload left after the packet's pages",
                    payload.len() - used
                )));
            }
            return Ok(made);
        }
    }
}

fn inflate_sync(d: &mut Decompress, payload: &[u8], out: &mut [u8]) -> std::io::Result<usize> {
    drain(payload, out, |input, room| {
        let (in0, out0) = (d.total_in(), d.total_out());
        let status = d
            .decompress(input, room, FlushDecompress::Sync)
            .map_err(std::io::Error::other)?;
        if status == Status::StreamEnd {
            return Err(std::io::Error::other("the channel's zlib stream ended"));
        }
        Ok((
            (d.total_in() - in0) as usize,
            (d.total_out() - out0) as usize,
        ))
    })
}

fn zstd_decode(
    z: &mut zstd::stream::raw::Decoder<'static>,
    payload: &[u8],
    out: &mut [u8],
) -> std::io::Result<usize> {
    use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
    drain(payload, out, |input, room| {
        let mut i = InBuffer::around(input);
        let mut o = OutBuffer::around(room);
        z.run(&mut i, &mut o)?;
        Ok((i.pos, o.pos()))
    })
}

#[cfg(test)]
mod tests;
