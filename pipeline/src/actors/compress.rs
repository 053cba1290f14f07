//! The compress actor: turns page batches into stream chunks with a rayon pool.
//!
//! Each worker copies its pages, one at a time, from its own read-only
//! mapping of guest RAM into a private 4 KiB buffer (as QEMU does: a page the
//! guest changes under deflate must never yield a stream that fails to
//! inflate) and writes records into a private QEMUFile over memory; the
//! batch's buffers are then merged with `put_qemu_file`, in batch order, into
//! one chunk for the writer. Without compression the pool would only copy, so
//! batches go on to the writer as page indices and the writer copies the pages
//! from its own mapping straight into the stream: one copy, and one process
//! hop, fewer on the hot path.
//!
//! With multifd the non-zero pages of a batch go into packets of at most
//! [`PAGES_PER_PACKET`] pages, dealt round robin over the channels, and
//! toward QEMU 9.0+ and ferry receivers the zero pages into the packets'
//! zero-page lists (QEMU's `zero-page-detection=multifd`) instead of ZERO
//! records on the main channel. Each channel has one compression stream
//! for the whole migration, as in QEMU, owned by one encoder thread that
//! takes the channel's share of each batch in batch order, so a channel's
//! packets are encoded in the order the writer sends them. Up to
//! `IN_FLIGHT` batches are in the threads at once, so no channel waits
//! for another's packet or for the writer's credit; chunks still leave in
//! batch order, round ends included, so round N's packets all reach the
//! writer (and its sync point) before round N+1's. A raw packet leaves
//! here as its header and its page indices: the writer copies the pages
//! from its own mapping into the channel. With `--multifd-compression auto`
//! (see `Auto`) each window of chunks goes all raw or all zstd, whichever
//! moved guest RAM faster when last tried.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::ops::Range;
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::Arc;
use std::time::Instant;

use crate::supervisor::messages::{
    ActorEvent, Chunk, MultifdSend, Packet, PageBatch, PageCounts, Work,
};
use ferry_proto::multifd::{
    self, Compression, Encoder, PacketHeader, HEADER_LEN, PAGES_PER_PACKET,
};
use ferry_proto::qemu_file::QemuFileWriter;
use ferry_proto::stream::encode::{PageEncoding, RamWriter};
use ferry_proto::stream::PAGE_SIZE;
use ferry_proto::transport::MemTransport;
use ferry_proto::{compress, qemu_file};
use ipc_channel::ipc::{IpcReceiver, IpcSender};
use ipc_channel::IpcError;
use ipc_channel::TryRecvError;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::supervisor::ipc_error;
use ferry_guest::ram::{self, BlockFile, GuestRam};

/// Configuration of the compress stage.
#[derive(Debug, Serialize, Deserialize)]
pub struct Init {
    /// The blocks, in send order.
    pub blocks: Vec<BlockFile>,
    /// zlib level, or `None` to send pages raw.
    pub level: Option<u32>,
    /// Threads in the pool.
    pub workers: usize,
    /// Pages go in multifd packets (`level` is then unused).
    pub multifd: Option<MultifdSend>,
    /// Batches from the scanner (the mailbox).
    pub work: IpcReceiver<Work>,
    /// One credit back to the scanner per batch taken.
    pub scan_credits: IpcSender<u32>,
    /// Chunks for the writer.
    pub chunks: IpcSender<Chunk>,
    /// Credits from the writer: one per chunk it has written.
    pub credits: IpcReceiver<u32>,
    /// Chunks that may be in flight to the writer before waiting for credit.
    pub window: u32,
    /// Level changes from migrate-set-parameters, applied from the next
    /// batch on.
    pub commands: IpcReceiver<crate::qmp::levels::Command>,
}

/// Errors of the compress stage.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Guest RAM cannot be mapped.
    #[error("cannot map guest RAM")]
    Map(#[from] ram::Error),
    /// The rayon pool cannot be built.
    #[error("cannot start {0} compression threads")]
    Pool(usize, #[source] rayon::ThreadPoolBuildError),
    /// A batch names a block or page that does not exist.
    #[error("batch {seq} names page {page} of block {block}, which does not exist")]
    BadBatch {
        /// The batch.
        seq: u64,
        /// The block index.
        block: u32,
        /// The page index.
        page: u32,
    },
    /// Encoding into memory failed.
    #[error("cannot encode batch {seq}")]
    Encode {
        /// The batch.
        seq: u64,
        /// Why.
        #[source]
        source: qemu_file::Error,
    },
    /// A multifd compressor cannot be set up.
    #[error("cannot set up {method} compression at level {level} for multifd")]
    Encoder {
        /// The method.
        method: &'static str,
        /// The level asked for.
        level: i32,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A block name does not fit a multifd packet header.
    #[error("block name {0:?} is longer than the {max} bytes a multifd packet holds", max = multifd::MAX_BLOCK_NAME)]
    BlockName(String),
    /// Compressing a multifd packet failed.
    #[error("cannot compress a multifd packet of batch {seq} for channel {channel}")]
    Packet {
        /// The batch.
        seq: u64,
        /// The channel.
        channel: u8,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A channel's encoder thread cannot be started.
    #[error("cannot start the encoder thread of multifd channel {0}")]
    Thread(usize, #[source] std::io::Error),
    /// The scanner's channel broke.
    #[error("lost the scanner's batches")]
    Work(#[source] std::io::Error),
    /// The writer is gone.
    #[error("cannot hand chunks to the writer process")]
    Send(#[source] std::io::Error),
}

thread_local! {
    /// Each pool thread keeps one compressor per level for its whole life.
    static COMPRESSOR: RefCell<Option<(u32, compress::Compress)>> = const { RefCell::new(None) };
}

/// Runs the compress stage until the scanner's channel closes.
pub fn run(init: Init, _events: &IpcSender<ActorEvent>) -> Result<(), Error> {
    let maps = init
        .blocks
        .iter()
        .map(|b| GuestRam::map(&b.path))
        .collect::<Result<Vec<_>, _>>()?;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(init.workers)
        .thread_name(|i| format!("compress-{i}"))
        .build()
        .map_err(|e| Error::Pool(init.workers, e))?;
    let maps = Arc::new(maps);
    let blocks: Arc<[BlockFile]> = init.blocks.clone().into();
    let mut packets = init
        .multifd
        .map(|m| Packets::new(&m, &init.blocks, &maps, &blocks))
        .transpose()?;
    let mut out = Out {
        chunks: &init.chunks,
        credits: &init.credits,
        left: init.window.max(1),
    };
    let mut pending: VecDeque<Pending> = VecDeque::new();
    let mut level = init.level;
    loop {
        // Take work while the channels' encoder threads have room; once the
        // scanner has nothing ready, hand the oldest chunk to the writer.
        let work = if pending.len() >= IN_FLIGHT {
            None
        } else if pending.is_empty() {
            match init.work.recv() {
                Ok(w) => Some(w),
                // The scanner finished and closed its end.
                Err(IpcError::Disconnected) => return Ok(()),
                Err(e) => return Err(Error::Work(ipc_error(e))),
            }
        } else {
            match init.work.try_recv() {
                Ok(w) => Some(w),
                Err(TryRecvError::Empty | TryRecvError::IpcError(IpcError::Disconnected)) => None,
                Err(TryRecvError::IpcError(e)) => return Err(Error::Work(ipc_error(e))),
            }
        };
        let Some(work) = work else {
            let front = pending.pop_front().expect("pending is not empty");
            let chunk = match (front, &mut packets) {
                (Pending::Ready(c), _) => c,
                (Pending::Packets(p), Some(packets)) => packets.collect(p)?,
                (Pending::Packets(_), None) => unreachable!("packets only come with multifd"),
            };
            out.send(chunk, packets.as_mut().and_then(|p| p.auto.as_mut()))?;
            continue;
        };
        let next = match work {
            Work::RoundEnd { seq, round, last } => {
                Pending::Ready(Chunk::RoundEnd { seq, round, last })
            }
            Work::Batch(batch) => {
                // The scanner may be gone after its last batch; that is fine.
                let _ = init.scan_credits.send(1);
                check(&batch, &maps)?;
                relevel(&init.commands, &mut level, packets.as_mut());
                match (&mut packets, level) {
                    (Some(p), _) => Pending::Packets(p.start(batch)?),
                    (None, None) => Pending::Ready(Chunk::RawPages {
                        seq: batch.seq,
                        block: batch.block,
                        zero_records: batch.zero_records,
                        zero_pages: batch.zero_pages,
                        pages: batch.pages,
                    }),
                    (None, Some(level)) => {
                        let name = &init.blocks[batch.block as usize].name;
                        let map = &maps[batch.block as usize];
                        Pending::Ready(
                            pool.install(|| encode(&batch, name, map, level, init.workers))?,
                        )
                    }
                }
            }
        };
        pending.push_back(next);
    }
}

/// Applies the level changes that came since the last batch: the legacy
/// level at once, the channels' at their next packet.
fn relevel(
    commands: &IpcReceiver<crate::qmp::levels::Command>,
    level: &mut Option<u32>,
    packets: Option<&mut Packets>,
) {
    use crate::qmp::levels::Command;
    let mut multifd = None;
    // An orchestrator gone is the end of the run, which the work channel tells.
    while let Ok(cmd) = commands.try_recv() {
        match cmd {
            Command::CompressLevel(l) if level.is_some() => *level = Some(l),
            Command::MultifdLevel(l) => multifd = Some(l),
            Command::CompressLevel(_) => {}
        }
    }
    if let (Some(l), Some(p)) = (multifd, packets) {
        tracing::info!(level = l, "multifd compression level changed");
        p.relevel = Some(l);
    }
}

/// Batches taken from the scanner and not yet handed to the writer: enough
/// to keep every channel's encoder busy while the oldest waits for credit.
const IN_FLIGHT: usize = 4;

/// A chunk on its way to the writer, in stream order.
enum Pending {
    /// Made already.
    Ready(Chunk),
    /// Its packets are being encoded on the channels' threads.
    Packets(Started),
}

/// The writer's end and its credit.
struct Out<'a> {
    chunks: &'a IpcSender<Chunk>,
    credits: &'a IpcReceiver<u32>,
    left: u32,
}

impl Out<'_> {
    /// Hands `chunk` to the writer, waiting for credit unless it ends a round.
    fn send(&mut self, chunk: Chunk, auto: Option<&mut Auto>) -> Result<(), Error> {
        if !matches!(chunk, Chunk::RoundEnd { .. }) {
            while self.left == 0 {
                self.left += self.credits.recv().map_err(|e| Error::Send(ipc_error(e)))?;
            }
            self.left -= 1;
            if let Some(a) = auto {
                a.chunk_sent(&chunk, Instant::now());
            }
        }
        self.chunks
            .send(chunk)
            .map_err(|e| Error::Send(ipc_error(e)))
    }
}

fn check(batch: &PageBatch, maps: &[GuestRam]) -> Result<(), Error> {
    let bad = |page| Error::BadBatch {
        seq: batch.seq,
        block: batch.block,
        page,
    };
    let map = maps.get(batch.block as usize).ok_or(bad(0))?;
    let pages = (map.len() / PAGE_SIZE as u64) as u32;
    match batch.pages.iter().find(|&&p| p >= pages) {
        Some(&p) => Err(bad(p)),
        None => Ok(()),
    }
}

/// Compresses a batch on the pool: one private QEMUFile per worker, merged in
/// page order behind the scanner's ZERO records.
fn encode(
    batch: &PageBatch,
    name: &str,
    map: &GuestRam,
    level: u32,
    workers: usize,
) -> Result<Chunk, Error> {
    let per_worker = batch.pages.len().div_ceil(workers.max(1)).max(1);
    let parts: Vec<(QemuFileWriter<'static, MemTransport>, PageCounts)> = batch
        .pages
        .par_chunks(per_worker)
        .map(|pages| encode_part(pages, name, map, level))
        .collect::<Result<_, _>>()
        .map_err(|source| Error::Encode {
            seq: batch.seq,
            source,
        })?;
    let mut out = QemuFileWriter::new(MemTransport::new());
    out.put_buffer(&batch.zero_records);
    let mut counts = PageCounts {
        zero: batch.zero_pages,
        ..PageCounts::default()
    };
    for (mut part, c) in parts {
        out.put_qemu_file(&mut part)
            .map_err(|source| Error::Encode {
                seq: batch.seq,
                source,
            })?;
        counts.add(&c);
    }
    let bytes = out
        .into_transport()
        .map_err(|source| Error::Encode {
            seq: batch.seq,
            source,
        })?
        .take();
    Ok(Chunk::Records {
        seq: batch.seq,
        bytes,
        counts,
    })
}

fn encode_part(
    pages: &[u32],
    name: &str,
    map: &GuestRam,
    level: u32,
) -> Result<(QemuFileWriter<'static, MemTransport>, PageCounts), qemu_file::Error> {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().is_none_or(|(l, _)| *l != level) {
            *slot = Some((level, compress::compressor(level)));
        }
        let (_, c) = slot.as_mut().expect("just set");
        let mut f = QemuFileWriter::new(MemTransport::new());
        // A fresh writer names the block in its first record: the bytes before
        // it in the chunk come from another writer.
        let mut ram = RamWriter::new();
        let mut counts = PageCounts::default();
        let mut buf = [0u8; PAGE_SIZE];
        for &i in pages {
            let off = i as usize * PAGE_SIZE;
            let page = map
                .read_page(i, &mut buf)
                .expect("`check` saw every index inside the block");
            if compress::looks_incompressible(page) {
                ram.put_page(&mut f, name, off as u64, page)?;
                counts.raw += 1;
                continue;
            }
            match ram.put_compressed_page(&mut f, c, name, off as u64, page)? {
                PageEncoding::Compressed(n) => {
                    counts.compressed += 1;
                    counts.compressed_bytes += n as u64;
                }
                PageEncoding::Raw => counts.raw += 1,
                PageEncoding::Zero(_) => counts.zero += 1,
            }
        }
        Ok((f, counts))
    })
}

/// The multifd channels' encoder threads and whose turn it is.
struct Packets {
    lanes: Vec<Lane>,
    /// Zero pages go in the packets' zero-page lists.
    zero_in_packets: bool,
    next: usize,
    /// With `auto`, which packets to compress.
    auto: Option<Auto>,
    /// A level for every channel's next packet (migrate-set-parameters).
    relevel: Option<i32>,
}

/// One channel's encoder thread: it owns the channel's compression stream
/// and takes the channel's share of each batch in batch order, so the
/// channel's packets are encoded in the order the writer sends them while
/// the other channels, and later batches, go on in parallel.
struct Lane {
    jobs: SyncSender<Job>,
    done: Receiver<Result<Share, Error>>,
}

/// A channel's encoded share of a batch: each packet's place in the batch
/// and what it became.
type Share = Vec<(usize, Vec<Encoded>)>;

/// One channel's share of a batch: its packets' places in the batch and
/// their pages (ranges of `pages`).
struct Job {
    seq: u64,
    channel: u8,
    block: u32,
    pages: Arc<Vec<u32>>,
    /// The batch's zero pages, when they go in the packets.
    zero: Arc<Vec<u32>>,
    slots: Vec<Slot>,
    /// A new level for the channel's compressor, from this job on.
    level: Option<i32>,
}

/// One packet to build: its place in the batch's packets, its normal pages
/// (a range of the job's `pages`), its zero pages (of `zero`), and how
/// they go out.
type Slot = (usize, Range<usize>, Range<usize>, Mode);

/// A batch whose packets the lanes are encoding.
struct Started {
    seq: u64,
    block: u32,
    zero_records: Vec<u8>,
    zero_pages: u64,
    /// The channel of each packet, in batch order.
    channel_of: Vec<usize>,
}

/// How one packet's pages go out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// As the channel's method says (QEMU's way: every packet alike).
    Method,
    /// Raw, on a compressed channel (`auto`).
    Raw,
    /// Compressed, but pages that look incompressible go in a raw packet
    /// of their own (`auto`).
    Split,
}

/// One encoded packet.
struct Encoded {
    bytes: Vec<u8>,
    /// Pages the writer appends raw from its own mapping.
    raw_pages: Vec<u32>,
    pages: usize,
    /// Its payload is compressed.
    compressed: bool,
}

/// `--multifd-compression auto`: per window of [`AUTO_WINDOW`] chunks,
/// either every packet raw or every packet compressed (its incompressible
/// pages still raw), whichever moved guest RAM faster when last tried. The
/// rate is measured, not modelled: pages handed to the writer per second,
/// which the link, the compressors and, on a shared host, the receiver all
/// bound. A link's and a compressor's throughput cannot be told apart from
/// the sender when the link is a loopback that the same cores drive, so
/// `auto` compares the two ways end to end: the first windows try raw, then
/// compressed, and every [`AUTO_PROBE`] windows the other way is tried
/// again, so a link that slows down or speeds up mid-run is followed. A try
/// that moves less than half as fast as the way in use makes the wait for
/// the next one four times as long, up to [`AUTO_PROBE_MAX`]: each try costs
/// two windows the slow way, which kept `auto` more than 10% behind the
/// better fixed setting (doubling still left it at 1.10-1.11), and a
/// difference of 2x or more is not noise. A try that wins starts the count
/// again. The window after a switch is not measured: the chunks already in
/// flight under the writer's credit belong to the other way.
#[derive(Debug)]
struct Auto {
    /// Whether this window compresses.
    compress: bool,
    /// Guest bytes per second of each way, raw and compressed, when last
    /// measured.
    rate: [Option<f64>; 2],
    /// Windows since the last switch.
    since_switch: u64,
    /// Windows between tries of the way not in use.
    probe_every: u64,
    /// The way in use is being tried: its first measured window decides
    /// the next `probe_every`.
    trying: bool,
    window_bytes: u64,
    window_start: Instant,
    window_chunks: u32,
}

/// Chunks per decision window of `auto`.
const AUTO_WINDOW: u32 = 8;
/// Every this many windows `auto` tries the way it is not using, at first.
const AUTO_PROBE: u64 = 32;
/// The longest wait between tries: 256 windows, 2 GiB of guest RAM (17 s of
/// raw pages on a 1 Gbit/s link).
const AUTO_PROBE_MAX: u64 = 8 * AUTO_PROBE;

impl Auto {
    fn new(now: Instant) -> Self {
        Self {
            compress: false,
            rate: [None, None],
            since_switch: 0,
            probe_every: AUTO_PROBE,
            trying: false,
            window_bytes: 0,
            window_start: now,
            window_chunks: 0,
        }
    }

    /// How the next packet goes out.
    fn next(&mut self) -> Mode {
        if self.compress {
            Mode::Split
        } else {
            Mode::Raw
        }
    }

    /// A chunk went to the writer; at the end of a window, measures it and
    /// picks the next window's way.
    fn chunk_sent(&mut self, chunk: &Chunk, now: Instant) {
        if let Chunk::Packets { counts, .. } = chunk {
            self.window_bytes += (counts.raw + counts.compressed) * PAGE_SIZE as u64;
        }
        self.window_chunks += 1;
        if self.window_chunks < AUTO_WINDOW {
            return;
        }
        let wall = now
            .saturating_duration_since(self.window_start)
            .as_secs_f64()
            .max(1e-6);
        let way = usize::from(self.compress);
        self.since_switch += 1;
        if self.since_switch >= 2 {
            self.rate[way] = Some(self.window_bytes as f64 / wall);
        }
        let switch = match self.rate {
            // Measure the other way once this one has been measured.
            [Some(_), None] | [None, Some(_)] => self.rate[way].is_some(),
            [Some(raw), Some(compressed)] => {
                let (this, other) = match way {
                    1 => (compressed, raw),
                    _ => (raw, compressed),
                };
                if self.trying && self.since_switch >= 2 {
                    self.trying = false;
                    self.probe_every = if this < other / 2.0 {
                        (self.probe_every * 4).min(AUTO_PROBE_MAX)
                    } else if this > other {
                        AUTO_PROBE
                    } else {
                        self.probe_every
                    };
                }
                (this < other && self.since_switch >= 2) || self.since_switch >= self.probe_every
            }
            [None, None] => false,
        };
        if switch {
            // A switch away from the slower way is not a try; any other is.
            self.trying = !matches!(self.rate, [Some(raw), Some(compressed)]
                if (compressed > raw) != self.compress);
            self.compress = !self.compress;
            self.since_switch = 0;
        }
        tracing::debug!(
            compress = self.compress,
            rate = ?self.rate,
            "auto"
        );
        self.window_bytes = 0;
        self.window_chunks = 0;
        self.window_start = now;
    }
}

impl Packets {
    fn new(
        m: &MultifdSend,
        blocks: &[BlockFile],
        maps: &Arc<Vec<GuestRam>>,
        names: &Arc<[BlockFile]>,
    ) -> Result<Self, Error> {
        if let Some(b) = blocks
            .iter()
            .find(|b| b.name.len() > multifd::MAX_BLOCK_NAME)
        {
            return Err(Error::BlockName(b.name.clone()));
        }
        let lanes = (0..m.channels.max(1))
            .map(|channel| {
                let enc =
                    Encoder::new(m.compression, m.level).map_err(|source| Error::Encoder {
                        method: m.compression.name(),
                        level: m.level,
                        source,
                    })?;
                Lane::spawn(
                    usize::from(channel),
                    enc,
                    Arc::clone(maps),
                    Arc::clone(names),
                )
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            lanes,
            zero_in_packets: m.zero_pages_in_packets,
            next: 0,
            auto: m.auto.then(|| Auto::new(Instant::now())),
            relevel: None,
        })
    }

    /// Deals the batch's pages into packets of even size (full ones and a
    /// short last one would load the channels unevenly), round robin over
    /// the channels, and hands each channel its share. With zero pages in
    /// the packets, every packet gets an even share of them too, after its
    /// normal pages, as QEMU's `multifd_send_zero_page_detect` orders them.
    fn start(&mut self, batch: PageBatch) -> Result<Started, Error> {
        let n = self.lanes.len();
        let (zero, zero_records) = if self.zero_in_packets {
            (batch.zero, Vec::new())
        } else {
            (Vec::new(), batch.zero_records)
        };
        let (normal, zeros) = (batch.pages.len(), zero.len());
        let packets = (normal + zeros).div_ceil(PAGES_PER_PACKET);
        let share = |all: usize| all.div_ceil(packets.max(1));
        let normal_of =
            |k: usize| (k * share(normal)).min(normal)..((k + 1) * share(normal)).min(normal);
        let zero_counts = zero_shares((0..packets).map(|k| normal_of(k).len()), zeros);
        let mut slots: Vec<Vec<Slot>> = vec![Vec::new(); n];
        let mut channel_of = Vec::new();
        let mut z = 0;
        for (k, zk) in zero_counts.into_iter().enumerate() {
            let (nr, zr) = (normal_of(k), z..z + zk);
            z += zk;
            if nr.is_empty() && zr.is_empty() {
                continue;
            }
            let mode = self.auto.as_mut().map_or(Mode::Method, Auto::next);
            slots[self.next].push((channel_of.len(), nr, zr, mode));
            channel_of.push(self.next);
            self.next = (self.next + 1) % n;
        }
        let pages = Arc::new(batch.pages);
        let zero = Arc::new(zero);
        let level = self.relevel.take();
        for (channel, (lane, slots)) in self.lanes.iter().zip(slots).enumerate() {
            let job = Job {
                seq: batch.seq,
                channel: channel as u8,
                block: batch.block,
                pages: Arc::clone(&pages),
                zero: Arc::clone(&zero),
                slots,
                level,
            };
            lane.jobs
                .send(job)
                .map_err(|_| lane.gone(batch.seq, channel))?;
        }
        Ok(Started {
            seq: batch.seq,
            block: batch.block,
            zero_records,
            zero_pages: batch.zero_pages,
            channel_of,
        })
    }

    /// Waits for every channel's share of `s` and puts its packets back in
    /// batch order.
    fn collect(&mut self, s: Started) -> Result<Chunk, Error> {
        let mut packets: Vec<Vec<Encoded>> = Vec::new();
        packets.resize_with(s.channel_of.len(), Vec::new);
        let mut counts = PageCounts {
            zero: s.zero_pages,
            ..PageCounts::default()
        };
        for (channel, lane) in self.lanes.iter().enumerate() {
            let made = lane.done.recv().map_err(|_| lane.gone(s.seq, channel))??;
            for (i, made) in made {
                for e in &made {
                    if e.compressed {
                        counts.compressed += e.pages as u64;
                        counts.compressed_bytes += (e.bytes.len() - HEADER_LEN) as u64;
                    } else {
                        counts.raw += e.pages as u64;
                    }
                }
                packets[i] = made;
            }
        }
        let block = s.block;
        let packets = packets
            .into_iter()
            .zip(s.channel_of)
            .flat_map(|(made, channel)| {
                made.into_iter().map(move |e| Packet {
                    channel: channel as u8,
                    bytes: e.bytes,
                    block,
                    raw_pages: e.raw_pages,
                })
            })
            .collect();
        Ok(Chunk::Packets {
            seq: s.seq,
            zero_records: s.zero_records,
            packets,
            counts,
        })
    }
}

/// How many of `zeros` zero pages go in each packet, given each packet's
/// normal pages: an even share, then what is left in the room the packets
/// still have; there is room for all when the packets were counted for
/// normal and zero pages together.
fn zero_shares(normal: impl Iterator<Item = usize>, zeros: usize) -> Vec<usize> {
    let room: Vec<usize> = normal.map(|n| PAGES_PER_PACKET - n).collect();
    let even = zeros.div_ceil(room.len().max(1));
    let mut counts: Vec<usize> = room.iter().map(|&r| r.min(even)).collect();
    let mut left = zeros.saturating_sub(counts.iter().sum());
    for (c, r) in counts.iter_mut().zip(&room) {
        let more = (r - *c).min(left);
        *c += more;
        left -= more;
    }
    // Round up, the even shares can take more than there are.
    let mut over = counts.iter().sum::<usize>().saturating_sub(zeros);
    for c in counts.iter_mut().rev() {
        let less = (*c).min(over);
        *c -= less;
        over -= less;
    }
    counts
}

impl Lane {
    fn spawn(
        channel: usize,
        mut enc: Encoder,
        maps: Arc<Vec<GuestRam>>,
        blocks: Arc<[BlockFile]>,
    ) -> Result<Self, Error> {
        let (jobs, job_rx) = mpsc::sync_channel::<Job>(IN_FLIGHT);
        let (done_tx, done) = mpsc::channel();
        std::thread::Builder::new()
            .name(format!("multifd-enc-{channel}"))
            .spawn(move || {
                // A level change waits for the channel's next compressed packet.
                let mut level = None;
                // Ends when `Packets` drops its sender or stops listening.
                for job in job_rx {
                    level = job.level.or(level);
                    let name = &blocks[job.block as usize].name;
                    let map = &maps[job.block as usize];
                    let made = job
                        .slots
                        .into_iter()
                        .map(|(i, r, z, mode)| {
                            let (pages, zero) = (&job.pages[r], &job.zero[z]);
                            let enc = (&mut enc, &mut level);
                            Ok((i, packets_of(enc, name, map, pages, zero, mode)?))
                        })
                        .collect::<std::io::Result<Vec<_>>>()
                        .map_err(|source| Error::Packet {
                            seq: job.seq,
                            channel: job.channel,
                            source,
                        });
                    if done_tx.send(made).is_err() {
                        return;
                    }
                }
            })
            .map_err(|e| Error::Thread(channel, e))?;
        Ok(Self { jobs, done })
    }

    /// The error for a lane whose thread ended (it panicked).
    fn gone(&self, seq: u64, channel: usize) -> Error {
        Error::Packet {
            seq,
            channel: channel as u8,
            source: std::io::Error::other("the channel's encoder thread ended"),
        }
    }
}

/// One slot's packets: the pages (copied out of guest RAM first, as QEMU
/// does, so the guest cannot change them under the compressor) in one
/// packet as `mode` says, or with [`Mode::Split`] in up to two: the pages
/// that look compressible compressed, the others raw. The `zero` pages go
/// in the first packet's zero-page list.
fn packets_of(
    (enc, level): (&mut Encoder, &mut Option<i32>),
    name: &str,
    map: &GuestRam,
    pages: &[u32],
    zero: &[u32],
    mode: Mode,
) -> std::io::Result<Vec<Encoded>> {
    let raw_only = mode == Mode::Raw || enc.method() == Compression::None;
    if raw_only {
        return Ok(vec![packet(None, name, pages, zero, &[])?]);
    }
    let mut raw = vec![0u8; pages.len() * PAGE_SIZE];
    for (&i, dst) in pages.iter().zip(raw.chunks_exact_mut(PAGE_SIZE)) {
        map.read_page(i, dst.try_into().expect("a page"))
            .expect("`check` saw every index inside the block");
    }
    if mode == Mode::Method {
        return Ok(vec![packet(Some((enc, level)), name, pages, zero, &raw)?]);
    }
    let (mut dense, mut sparse) = (Vec::new(), (Vec::new(), Vec::new()));
    for (&i, page) in pages.iter().zip(raw.chunks_exact(PAGE_SIZE)) {
        if compress::looks_incompressible(page) {
            dense.push(i);
        } else {
            sparse.0.push(i);
            sparse.1.extend_from_slice(page);
        }
    }
    let mut out = Vec::with_capacity(2);
    if !sparse.0.is_empty() {
        out.push(packet(
            Some((enc, level)),
            name,
            &sparse.0,
            zero,
            &sparse.1,
        )?);
    }
    if !dense.is_empty() || out.is_empty() {
        let zero = if out.is_empty() { zero } else { &[] };
        out.push(packet(None, name, &dense, zero, &[])?);
    }
    Ok(out)
}

/// One packet: the header, then `raw` (the `pages`' bytes) as `enc` makes
/// them; without `enc` only the header, the writer adds the pages. A
/// compressed packet without normal pages keeps its method's flag and has
/// no payload, as QEMU's receiver asserts.
fn packet(
    enc: Option<(&mut Encoder, &mut Option<i32>)>,
    name: &str,
    pages: &[u32],
    zero: &[u32],
    raw: &[u8],
) -> std::io::Result<Encoded> {
    let mut out = vec![0u8; HEADER_LEN];
    let compressed = enc.is_some();
    let (flags, len, raw_pages) = match enc {
        Some((enc, _)) if pages.is_empty() => (enc.method().flag(), 0, Vec::new()),
        Some((enc, level)) => {
            let len = crate::qmp::levels::encode(enc, level, raw, &mut out)?;
            (enc.method().flag(), len, Vec::new())
        }
        None => (0, pages.len() * PAGE_SIZE, pages.to_vec()),
    };
    let header = PacketHeader {
        flags,
        normal_pages: pages.len() as u32,
        zero_pages: zero.len() as u32,
        next_packet_size: len as u32,
        block: name.to_owned(),
        offsets: pages
            .iter()
            .chain(zero)
            .map(|&i| u64::from(i) * PAGE_SIZE as u64)
            .collect(),
        ..PacketHeader::default()
    };
    header.encode((&mut out[..HEADER_LEN]).try_into().expect("header length"));
    Ok(Encoded {
        bytes: out,
        raw_pages,
        pages: pages.len(),
        compressed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::multifd::Decoder;

    /// Runs `auto` over `windows` windows of 1 MiB chunks, each window
    /// taking `secs(window, compressed)`; returns the way of each window.
    fn auto_run(windows: usize, secs: impl Fn(usize, bool) -> f64) -> Vec<bool> {
        let mut now = Instant::now();
        let mut auto = Auto::new(now);
        let chunk = Chunk::Packets {
            seq: 0,
            zero_records: Vec::new(),
            packets: Vec::new(),
            counts: PageCounts {
                raw: 256,
                ..PageCounts::default()
            },
        };
        let mut ways = Vec::with_capacity(windows);
        for w in 0..windows {
            let way = matches!(auto.next(), Mode::Split);
            ways.push(way);
            now += std::time::Duration::from_secs_f64(secs(w, way));
            for _ in 0..AUTO_WINDOW {
                auto.chunk_sent(&chunk, now);
            }
        }
        ways
    }

    #[test]
    fn auto_tries_a_way_that_loses_by_far_less_and_less_often() {
        // Compressing is 3x slower throughout (a fast link): after the
        // first try, the tries come 32, 128, then 256 windows apart.
        let ways = auto_run(1024, |_, c| if c { 0.03 } else { 0.01 });
        let tries: Vec<usize> = ways
            .windows(2)
            .enumerate()
            .filter(|(_, w)| !w[0] && w[1])
            .map(|(i, _)| i + 1)
            .collect();
        let gaps: Vec<usize> = tries.windows(2).map(|t| t[1] - t[0]).collect();
        assert!(gaps.len() >= 3, "{tries:?}");
        assert!(gaps.windows(2).all(|g| g[1] >= g[0]), "{gaps:?}");
        assert_eq!(
            *gaps.last().unwrap(),
            (AUTO_PROBE_MAX + 2) as usize,
            "{gaps:?}"
        );
        // Each try is two windows compressed: the settle and the measure.
        let compressed = ways.iter().filter(|&&c| c).count();
        assert_eq!(compressed, 2 * tries.len(), "{tries:?}");
    }

    #[test]
    fn auto_follows_a_link_that_slows_down_after_backing_off() {
        // Raw wins by far for 600 windows, then the link slows to a tenth
        // and compressing wins: auto switches within one longest wait.
        let ways = auto_run(1200, |w, c| match (c, w < 600) {
            (false, true) => 0.01,
            (false, false) => 0.1,
            (true, _) => 0.03,
        });
        let first = (600..1200).find(|&w| ways[w..].iter().take(20).all(|&c| c));
        let first = first.expect("auto stays with compressing once it wins");
        assert!(
            first <= 600 + AUTO_PROBE_MAX as usize + 4,
            "switched at {first}"
        );
        // Once compressing wins, a try of raw that loses by far backs off again.
        assert!(ways[first..].iter().filter(|&&c| !c).count() <= 12);
    }

    #[test]
    fn auto_keeps_trying_every_32_windows_when_the_ways_are_close() {
        // Compressing is 1.5x slower: not by far, so the wait stays 32.
        let ways = auto_run(300, |_, c| if c { 0.015 } else { 0.01 });
        let tries = ways.windows(2).filter(|w| !w[0] && w[1]).count();
        assert!(tries >= 8, "{tries} tries in 300 windows");
    }

    /// Two channels of `method` over one block "b" holding `bytes`, in a
    /// file of the returned directory.
    fn packets_over(
        bytes: &[u8],
        method: Compression,
        zero_pages_in_packets: bool,
    ) -> (tempfile::TempDir, Packets) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.ram");
        std::fs::write(&path, bytes).unwrap();
        let maps = Arc::new(vec![GuestRam::map(&path).unwrap()]);
        let blocks: Arc<[BlockFile]> = vec![BlockFile {
            name: "b".into(),
            path,
            length: bytes.len() as u64,
        }]
        .into();
        let m = MultifdSend {
            channels: 2,
            compression: method,
            level: 1,
            legacy_sync: false,
            auto: false,
            zero_pages_in_packets,
        };
        let p = Packets::new(&m, &blocks, &maps, &blocks).unwrap();
        (dir, p)
    }

    /// Decodes `pk` on its channel's decoder, its raw pages taken from
    /// `bytes` as the writer takes them from its mapping, and checks that
    /// its normal pages are the very pages it names.
    fn decode_packet(
        pk: &Packet,
        method: Compression,
        bytes: &[u8],
        decoders: &mut [Decoder; 2],
    ) -> PacketHeader {
        let head: &[u8; HEADER_LEN] = pk.bytes[..HEADER_LEN].try_into().unwrap();
        let h = PacketHeader::decode(head, Some(method)).unwrap();
        let mut payload = pk.bytes[HEADER_LEN..].to_vec();
        for &i in &pk.raw_pages {
            let at = i as usize * PAGE_SIZE;
            payload.extend_from_slice(&bytes[at..at + PAGE_SIZE]);
        }
        assert_eq!(payload.len(), h.payload_len());
        if h.normal_pages > 0 {
            let mut out = vec![0u8; h.normal_pages as usize * PAGE_SIZE];
            decoders[usize::from(pk.channel)]
                .decode(&payload, &mut out)
                .unwrap();
            for (off, page) in h.normal().iter().zip(out.chunks(PAGE_SIZE)) {
                let at = *off as usize;
                assert_eq!(page, &bytes[at..at + PAGE_SIZE], "{method:?} {off}");
            }
        }
        h
    }

    /// Packets of a batch decode, on one decoder per channel in the order
    /// of each channel's packets, to the very pages they name; the packets
    /// are even, alternate channels, and the stream carries over batches.
    #[test]
    fn packets_decode_per_channel_to_their_pages() {
        for method in [Compression::None, Compression::Zlib, Compression::Zstd] {
            let pages = 300u32;
            let bytes: Vec<u8> = (0..pages as usize * PAGE_SIZE)
                .map(|i| ((i / PAGE_SIZE) as u8).wrapping_mul(7) ^ (i % 251) as u8)
                .collect();
            let (_dir, mut p) = packets_over(&bytes, method, false);
            let mut decoders = [Decoder::new(method).unwrap(), Decoder::new(method).unwrap()];
            let mut seen = Vec::new();
            for (seq, range) in [(0u64, 0..pages), (1, 0..40)] {
                let batch = PageBatch {
                    seq,
                    block: 0,
                    zero_records: Vec::new(),
                    zero_pages: 0,
                    zero: Vec::new(),
                    pages: range.collect(),
                };
                let started = p.start(batch).unwrap();
                let Chunk::Packets { packets, .. } = p.collect(started).unwrap() else {
                    panic!("not packets");
                };
                for pk in packets {
                    let h = decode_packet(&pk, method, &bytes, &mut decoders);
                    assert_eq!(h.block, "b");
                    seen.push((pk.channel, h.normal_pages));
                }
            }
            // 300 pages: three packets of 100; then one of 40. Round robin
            // carries on from one batch to the next.
            assert_eq!(seen, [(0, 100), (1, 100), (0, 100), (1, 40)], "{method:?}");
        }
    }

    /// With zero pages in the packets, every page of a batch is named by
    /// exactly one packet, zero pages only in zero-page lists and without
    /// payload; no packet holds more than it may, and a packet of zero
    /// pages alone on a compressed channel keeps the flag with no payload.
    #[test]
    fn zero_pages_go_in_the_packets_zero_lists() {
        let pages = 600u32;
        let bytes: Vec<u8> = (0..pages as usize * PAGE_SIZE)
            .map(|i| ((i / PAGE_SIZE) as u8) ^ (i % 13) as u8 | 1)
            .collect();
        for method in [Compression::None, Compression::Zstd] {
            let (_dir, mut p) = packets_over(&bytes, method, true);
            let mut decoders = [Decoder::new(method).unwrap(), Decoder::new(method).unwrap()];
            // Mostly normal, mostly zero, zero only, and a split (129 + 127)
            // whose even shares rounded up would overfill a packet.
            let cases: [(Vec<u32>, Vec<u32>); 4] = [
                (
                    (0..300).filter(|i| i % 3 != 0).collect(),
                    (0..300).filter(|i| i % 3 == 0).collect(),
                ),
                ((0..20).collect(), (20..400).collect()),
                (Vec::new(), (0..200).collect()),
                ((0..129).collect(), (129..256).collect()),
            ];
            for (seq, (normal, zero)) in cases.into_iter().enumerate() {
                let batch = PageBatch {
                    seq: seq as u64,
                    block: 0,
                    zero_records: vec![1, 2, 3],
                    zero_pages: zero.len() as u64,
                    zero: zero.clone(),
                    pages: normal.clone(),
                };
                let started = p.start(batch).unwrap();
                let Chunk::Packets {
                    packets,
                    zero_records,
                    counts,
                    ..
                } = p.collect(started).unwrap()
                else {
                    panic!("not packets");
                };
                assert!(
                    zero_records.is_empty(),
                    "no ZERO records on the main channel"
                );
                // No more packets than the pages need: headers cost 1344 bytes.
                let need = (normal.len() + zero.len()).div_ceil(PAGES_PER_PACKET);
                assert_eq!(packets.len(), need, "{method:?} case {seq}");
                assert_eq!(counts.zero, zero.len() as u64);
                let (mut got_normal, mut got_zero) = (Vec::new(), Vec::new());
                for pk in packets {
                    let h = decode_packet(&pk, method, &bytes, &mut decoders);
                    assert!(h.offsets.len() <= PAGES_PER_PACKET);
                    assert_eq!(h.flags, method.flag(), "{method:?}");
                    if h.normal_pages == 0 {
                        assert_eq!(pk.bytes.len(), HEADER_LEN, "zero pages have no payload");
                    }
                    got_normal.extend(h.normal().iter().map(|o| (o / PAGE_SIZE as u64) as u32));
                    got_zero.extend(h.zero().iter().map(|o| (o / PAGE_SIZE as u64) as u32));
                }
                got_normal.sort_unstable();
                got_zero.sort_unstable();
                assert_eq!(
                    (got_normal, got_zero),
                    (normal, zero),
                    "{method:?} case {seq}"
                );
            }
        }
    }
}
