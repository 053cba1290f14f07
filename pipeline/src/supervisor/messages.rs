//! Messages between ferry's processes.
//!
//! Plain data, encoded by ipc-channel: page batches from the scanner, encoded
//! chunks for the writer and events for the orchestrator. Bulk bytes travel as
//! byte buffers inside a chunk, never one message per page.

use ferry_proto::multifd::Compression;
use ferry_proto::return_path::{Ack, BlockDigest, ReturnPath};
use serde::{Deserialize, Serialize};

/// The processes of a migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ActorKind {
    /// Walks guest RAM, finds zero pages, batches the rest.
    Scanner,
    /// Compresses (or copies) batches into stream chunks.
    Compress,
    /// Owns the connection: writes chunks in order, enforces the rate limit.
    Writer,
    /// Destination: reads and checks the stream, writes guest RAM.
    Reader,
    /// Source: reads the disks through libblkio, chunk by chunk.
    Blockio,
}

impl ActorKind {
    /// Name used in messages and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            ActorKind::Scanner => "scanner",
            ActorKind::Compress => "compress",
            ActorKind::Writer => "writer",
            ActorKind::Reader => "reader",
            ActorKind::Blockio => "blockio",
        }
    }

    /// The actor with this name.
    pub fn from_name(s: &str) -> Option<Self> {
        [
            Self::Scanner,
            Self::Compress,
            Self::Writer,
            Self::Reader,
            Self::Blockio,
        ]
        .into_iter()
        .find(|k| k.name() == s)
    }
}

/// CPU time and memory one process used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    /// User plus system CPU seconds.
    pub cpu_seconds: f64,
    /// Peak resident set size in bytes (mapped guest RAM included).
    pub peak_rss_bytes: u64,
    /// Peak anonymous memory in bytes: what the process itself allocated,
    /// without the guest RAM it maps (sampled every 50 ms).
    pub peak_anon_bytes: u64,
}

/// Pages by how they went into the stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageCounts {
    /// ZERO records.
    pub zero: u64,
    /// Raw PAGE records.
    pub raw: u64,
    /// COMPRESS_PAGE records.
    pub compressed: u64,
    /// Bytes of zlib data in them.
    pub compressed_bytes: u64,
    /// XBZRLE records (query-migrate's `xbzrle-cache.pages`).
    pub xbzrle: u64,
}

impl PageCounts {
    /// Adds `other` into `self`.
    pub fn add(&mut self, other: &PageCounts) {
        self.zero += other.zero;
        self.raw += other.raw;
        self.compressed += other.compressed;
        self.compressed_bytes += other.compressed_bytes;
        self.xbzrle += other.xbzrle;
    }

    /// All pages counted.
    pub fn pages(&self) -> u64 {
        self.zero + self.raw + self.compressed + self.xbzrle
    }
}

/// Pages of one RAM block for the compress stage: the scanner has already
/// encoded the zero pages among them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageBatch {
    /// Place in the stream; the writer emits in this order.
    pub seq: u64,
    /// Index of the block in the send order.
    pub block: u32,
    /// ZERO records for the zero pages of the batch, ready for the stream.
    #[serde(with = "serde_bytes")]
    pub zero_records: Vec<u8>,
    /// How many zero pages `zero_records` holds.
    pub zero_pages: u64,
    /// Page indices (within the block) of those zero pages, for multifd
    /// packets' zero-page lists.
    pub zero: Vec<u32>,
    /// Page indices (within the block) of the non-zero pages.
    pub pages: Vec<u32>,
}

/// What the scanner hands to the compress stage, in sequence order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Work {
    /// Pages to encode.
    Batch(PageBatch),
    /// Every page of `round` has been batched.
    RoundEnd {
        /// Place in the stream.
        seq: u64,
        /// The round.
        round: u32,
        /// The stream ends after this round.
        last: bool,
    },
}

/// multifd on the sending side, as QEMU's parameters of the same names
/// set it; the compress stage and the writer both get it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MultifdSend {
    /// Data channels beside the main stream (`multifd-channels`).
    pub channels: u8,
    /// `multifd-compression`.
    pub compression: Compression,
    /// `multifd-zlib-level` or `multifd-zstd-level`, whichever applies.
    pub level: i32,
    /// QEMU's `multifd-flush-after-each-section`: a sync point at every RAM
    /// EOS and no MULTIFD_FLUSH (machine types up to 8.0), instead of one
    /// per round with MULTIFD_FLUSH.
    pub legacy_sync: bool,
    /// QEMU's `zero-page-detection=multifd` (9.0 and later, machine types
    /// from 9.0): zero pages go as offsets in the packets' zero-page lists
    /// instead of ZERO records on the main channel. A QEMU 7.2 destination
    /// reads that field as unused and would leave such pages stale.
    pub zero_pages_in_packets: bool,
    /// ferry's `auto`: `compression` where it pays, raw packets elsewhere
    /// (ferry receivers only).
    pub auto: bool,
}

/// One multifd packet (header and payload) and the channel it goes on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Packet {
    /// The channel, 0 to N-1.
    pub channel: u8,
    /// Header and payload; the writer sets the packet number, which counts
    /// packets in the order they are written, SYNC packets included.
    #[serde(with = "serde_bytes")]
    pub bytes: Vec<u8>,
    /// The block of `raw_pages`.
    pub block: u32,
    /// Pages (indices into `block`) of a raw packet whose `bytes` are only
    /// its header: the writer copies them from its own mapping straight
    /// into the channel, once, instead of the compress stage copying them
    /// into `bytes` and every hop after it copying them again.
    pub raw_pages: Vec<u32>,
}

/// What the writer receives, in sequence order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Chunk {
    /// Encoded RAM records.
    Records {
        /// Place in the stream.
        seq: u64,
        /// The records.
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
        /// Pages they carry.
        counts: PageCounts,
    },
    /// Pages the writer sends raw straight from its own mapping of the block
    /// (no copy through the pipeline), after `zero_records`.
    RawPages {
        /// Place in the stream.
        seq: u64,
        /// Index of the block.
        block: u32,
        /// ZERO records to write first.
        #[serde(with = "serde_bytes")]
        zero_records: Vec<u8>,
        /// How many zero pages those are.
        zero_pages: u64,
        /// Page indices to send raw.
        pages: Vec<u32>,
    },
    /// With multifd: ZERO records for the main channel, and the other
    /// pages in packets, in the order they go out on their channels.
    Packets {
        /// Place in the stream.
        seq: u64,
        /// ZERO records to write on the main channel.
        #[serde(with = "serde_bytes")]
        zero_records: Vec<u8>,
        /// The packets.
        packets: Vec<Packet>,
        /// Pages they carry, zero pages included.
        counts: PageCounts,
    },
    /// End of a round: the writer closes the section part, and after the
    /// last round ends the stream.
    RoundEnd {
        /// Place in the stream.
        seq: u64,
        /// The round.
        round: u32,
        /// The stream ends after this round.
        last: bool,
    },
}

impl Chunk {
    /// Place in the stream.
    pub fn seq(&self) -> u64 {
        match self {
            Chunk::Records { seq, .. }
            | Chunk::RawPages { seq, .. }
            | Chunk::Packets { seq, .. }
            | Chunk::RoundEnd { seq, .. } => *seq,
        }
    }
}

/// What the blockio actor hands to the writer, in order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DiskChunk {
    /// One chunk of a disk (1 MiB, shorter at the end of the disk).
    Data {
        /// Index of the disk in the send order.
        disk: u32,
        /// Byte offset of the chunk.
        offset: u64,
        /// The chunk's length on the disk.
        len: u32,
        /// The slot of the shared chunk buffers that holds the chunk's
        /// bytes; `None` when it is all zero (a ZERO_BLOCK record). The slot
        /// is reused once the writer gave the chunk's credit back.
        slot: Option<u32>,
    },
    /// Every chunk of `round` has been handed over.
    RoundEnd {
        /// The round.
        round: u32,
        /// The stream ends after this round.
        last: bool,
    },
}

/// Something an actor tells the orchestrator.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Event {
    /// Reader: bound and waiting for the peer at this address.
    Listening {
        /// The bound address (for tcp ports chosen by the OS).
        addr: String,
    },
    /// Writer: the bytes of each rate window around a max-bandwidth change.
    RateChange(crate::qmp::windows::RateChange),
    /// Writer or reader: stream bytes and pages so far.
    Progress {
        /// Stream bytes.
        bytes: u64,
        /// Pages by kind.
        counts: PageCounts,
    },
    /// Scanner: every page of a round is batched.
    RoundScanned {
        /// The round.
        round: u32,
        /// Pages in it.
        pages: u64,
    },
    /// Writer: every chunk of a round is written.
    RoundSent {
        /// The round.
        round: u32,
        /// Stream bytes so far.
        bytes: u64,
    },
    /// Writer: a ferry destination has the whole stream (its HELLO arrived);
    /// the guest could run there now. Ends the measured downtime.
    PeerLoaded,
    /// Writer: the stream is complete and the peer answered (or cannot).
    Finished {
        /// Stream bytes, the multifd channels' included.
        bytes: u64,
        /// Bytes written on each multifd channel.
        channel_bytes: Vec<u64>,
        /// Pages by kind.
        counts: PageCounts,
        /// What the peer said, if it is ferry.
        ack: Option<Ack>,
        /// What kind of peer it was.
        return_path: ReturnPath,
    },
    /// Reader: the stream loaded completely and was checked.
    Loaded {
        /// Stream bytes.
        bytes: u64,
        /// Pages by kind.
        counts: PageCounts,
        /// Digests of the loaded blocks.
        digests: Vec<BlockDigest>,
        /// Per block: its name, its length in pages, and how many of them
        /// the stream sent at least once.
        received: Vec<(String, u64, u64)>,
    },
    /// Scanner: the source RAM's digests, one per block, taken after the
    /// last round was scanned (the guest is stopped then).
    RamDigests {
        /// `PageDigest`s in hex, one per block in send order.
        digests: Vec<String>,
    },
    /// Blockio: the source disks' digests, taken after the last pass (the
    /// guest is stopped then).
    DiskDigests {
        /// One per disk, in send order.
        disks: Vec<BlockDigest>,
    },
    /// The actor failed; it exits non-zero after this.
    Failed {
        /// What went wrong, with its causes.
        message: String,
    },
    /// The actor is exiting normally.
    Exiting {
        /// What it used.
        usage: Usage,
    },
}

/// An [`Event`] and who sent it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActorEvent {
    /// The sender.
    pub actor: ActorKind,
    /// What happened.
    pub event: Event,
}
