//! Disks in a migration, on top of the block-IO actor ([`crate::actors::blockio::queue`]).
//!
//! - Source: the `blockio` actor process ([`run`]) owns one [`BlockIo`] per
//!   disk. For each round the orchestrator asks for, it reads the chunks to
//!   send (every 1 MiB chunk in round 0, later the chunks taken from the disk's
//!   dirty log with the same atomic swap as the RAM dirty log), in order with
//!   several reads in flight, and hands them to the writer over an ipc channel
//!   with credits (bounded memory). After the last pass (the guest is stopped)
//!   it reports a digest of each disk.
//! - Destination: [`Sinks`] writes the chunks of the "block" section through
//!   the receiver's own [`BlockIo`] per disk, several writes in flight (never
//!   two to the same chunk), flushes, and digests each disk for the Ack.

pub mod queue;

use std::collections::VecDeque;
use std::io;
use std::path::PathBuf;

use crate::supervisor::messages::{ActorEvent, ActorKind, DiskChunk, Event};
use crossbeam_channel::{bounded, Receiver};
use ferry_proto::return_path::BlockDigest;
use ferry_proto::stream::encode::is_zero;
use ipc_channel::ipc::{IpcReceiver, IpcSender};
use serde::{Deserialize, Serialize};

use crate::actors::blockio::queue::{
    BlockIo, Buffer, DeviceConfig, Driver, Mailbox, Request, ZeroFlags,
};
use crate::options::DiskSpec;
use crate::supervisor::ipc_error;
use ferry_guest::dirty_log::{self, DirtyLog};

/// The disk-migration chunk (QEMU's BLK_MIG_BLOCK_SIZE).
pub const CHUNK: u64 = 1 << 20;
/// Reads kept in flight.
const READ_AHEAD: usize = 8;
/// Writes kept in flight on the destination.
const WRITE_BEHIND: usize = 8;

/// A disk as the actors get it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInit {
    /// Device name in the stream.
    pub name: String,
    /// Image file or vhost-user socket.
    pub path: PathBuf,
    /// libblkio driver name.
    pub driver: String,
    /// Dirty log (one bit per chunk), source side only.
    pub dirty_log: Option<PathBuf>,
}

impl DiskInit {
    /// From a `--disk` option.
    pub fn from_spec(s: &DiskSpec) -> Self {
        Self {
            name: s.name.clone(),
            path: s.path.clone(),
            driver: s.driver.name().to_owned(),
            dirty_log: s.dirty_log.clone(),
        }
    }
}

/// Errors of disk migration; each names the disk.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The driver name is not one of ours.
    #[error("disk {name:?}: unknown driver {driver:?}")]
    Driver {
        /// The disk.
        name: String,
        /// The driver asked for.
        driver: String,
    },
    /// The device cannot be opened.
    #[error("disk {name:?} ({path}) cannot be opened")]
    Open {
        /// The disk.
        name: String,
        /// Its image or socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: Box<queue::Error>,
    },
    /// A request failed.
    #[error("disk {name:?}: I/O error")]
    Io {
        /// The disk.
        name: String,
        /// Why.
        #[source]
        source: Box<queue::Error>,
    },
    /// The disk's actor stopped answering.
    #[error("disk {0:?}: the block-IO actor stopped")]
    Gone(String),
    /// The dirty log cannot be used.
    #[error("disk {name:?}: cannot use its dirty log")]
    DirtyLog {
        /// The disk.
        name: String,
        /// Why.
        #[source]
        source: dirty_log::Error,
    },
    /// A dirty round for a disk without dirty log.
    #[error("round {round} asks for the dirty chunks of disk {name:?}, which has no dirty log")]
    NoDirtyLog {
        /// The round.
        round: u32,
        /// The disk.
        name: String,
    },
    /// The stream names a device that has no --disk.
    #[error(
        "the stream has disk {device:?} but no --disk is named {device:?} (names given: {given})"
    )]
    UnknownDevice {
        /// The device name in the stream.
        device: String,
        /// The names of the --disk options.
        given: String,
    },
    /// A chunk lies past the end of the destination disk.
    #[error("disk {name:?} ({path}) is too small: {capacity} bytes, but the source sends data at byte {offset}")]
    TooSmall {
        /// The disk.
        name: String,
        /// Its image or socket.
        path: PathBuf,
        /// Its capacity.
        capacity: u64,
        /// Offset of the chunk.
        offset: u64,
    },
    /// Two --disk options with one name.
    #[error("two --disk options are both named {0:?} (use PATH,name=DEV)")]
    DuplicateName(String),
    /// The shared chunk buffers cannot be mapped.
    #[error("cannot map the shared disk chunk buffers {path}")]
    Slots {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The writer is gone.
    #[error("cannot hand disk chunks to the writer")]
    Send(#[source] io::Error),
    /// The orchestrator is gone.
    #[error("lost the orchestrator's commands")]
    Mailbox(#[source] io::Error),
}

/// An open disk.
pub struct Disk {
    /// Device name.
    pub name: String,
    /// Image or socket.
    pub path: PathBuf,
    io: Option<BlockIo>,
    mailbox: Mailbox,
    /// Size in bytes.
    pub capacity: u64,
}

impl std::fmt::Debug for Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Disk")
            .field("name", &self.name)
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

type Pending<T> = Receiver<Result<T, queue::Error>>;

impl Disk {
    /// Opens `d` with its driver.
    pub fn open(d: &DiskInit, read_only: bool) -> Result<Self, Error> {
        let driver: Driver = d.driver.parse().map_err(|_| Error::Driver {
            name: d.name.clone(),
            driver: d.driver.clone(),
        })?;
        let mut config = DeviceConfig::new(driver, &d.path);
        config.read_only = read_only;
        let io = BlockIo::open(&config).map_err(|source| Error::Open {
            name: d.name.clone(),
            path: d.path.clone(),
            source: Box::new(source),
        })?;
        let capacity = io.limits().capacity;
        Ok(Self {
            name: d.name.clone(),
            path: d.path.clone(),
            mailbox: io.mailbox(),
            io: Some(io),
            capacity,
        })
    }

    /// Chunks covering the disk.
    pub fn chunks(&self) -> u64 {
        self.capacity.div_ceil(CHUNK)
    }

    fn chunk_len(&self, i: u64) -> usize {
        CHUNK.min(self.capacity - i * CHUNK) as usize
    }

    fn io(&self, source: queue::Error) -> Error {
        Error::Io {
            name: self.name.clone(),
            source: Box::new(source),
        }
    }

    fn wait<T>(&self, rx: &Pending<T>) -> Result<T, Error> {
        rx.recv()
            .map_err(|_| Error::Gone(self.name.clone()))?
            .map_err(|e| self.io(e))
    }

    /// Reads the chunks `list` in order, [`READ_AHEAD`] in flight, and gives
    /// each to `f` with its index.
    pub fn read_chunks(
        &self,
        list: impl IntoIterator<Item = u64>,
        mut f: impl FnMut(u64, Buffer) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let mut it = list.into_iter();
        let mut q: VecDeque<(u64, Pending<Buffer>)> = VecDeque::new();
        loop {
            while q.len() < READ_AHEAD {
                let Some(i) = it.next() else { break };
                let (tx, rx) = bounded(1);
                self.mailbox
                    .send(Request::Read {
                        offset: i * CHUNK,
                        len: self.chunk_len(i),
                        reply: tx,
                    })
                    .map_err(|e| self.io(e))?;
                q.push_back((i, rx));
            }
            let Some((i, rx)) = q.pop_front() else {
                return Ok(());
            };
            let buf = self.wait(&rx)?;
            f(i, buf)?;
        }
    }

    /// XXH3-128 of the whole disk, read through the device.
    pub fn digest(&self) -> Result<BlockDigest, Error> {
        let mut h = xxhash_rust::xxh3::Xxh3::new();
        self.read_chunks(0..self.chunks(), |_, buf| {
            h.update(&buf);
            Ok(())
        })?;
        Ok(BlockDigest {
            name: self.name.clone(),
            length: self.capacity,
            xxh3: format!("{:032x}", h.digest128()),
        })
    }

    /// Stops the device's actor.
    pub fn close(mut self) -> Result<(), Error> {
        if let Some(io) = self.io.take() {
            io.shutdown().map_err(|e| self.io(e))?;
        }
        Ok(())
    }
}

/// The blockio actor's mailbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Command {
    /// Send a round of chunks.
    Round {
        /// Round number.
        round: u32,
        /// Every chunk (round 0), or only the chunks taken from the dirty logs.
        all: bool,
        /// Whether the stream ends after this round.
        last: bool,
    },
    /// After the last round: digest the disks (the guest is stopped) and
    /// report them in [`Event::DiskDigests`], then exit.
    Digest,
    /// Exit.
    Stop,
}

/// Configuration of the blockio actor.
#[derive(Debug, Serialize, Deserialize)]
pub struct Init {
    /// The disks, in send order.
    pub disks: Vec<DiskInit>,
    /// Commands from the orchestrator.
    pub mailbox: IpcReceiver<Command>,
    /// Chunks for the writer.
    pub chunks: IpcSender<DiskChunk>,
    /// One credit back per chunk written.
    pub credits: IpcReceiver<u32>,
    /// Chunks in flight before waiting for credit.
    pub window: u32,
    /// The shared chunk buffers: a file of `window` chunks, mapped by the
    /// writer too (bulk bytes never go through a socket).
    pub slots: PathBuf,
}

/// Runs the source's blockio actor until the last round.
pub fn run(init: Init, events: &IpcSender<ActorEvent>) -> Result<(), Error> {
    let disks = init
        .disks
        .iter()
        .map(|d| Disk::open(d, true))
        .collect::<Result<Vec<_>, _>>()?;
    let logs = open_dirty_logs(&init.disks, &disks)?;
    let mut out = ChunkSender::new(&init)?;
    loop {
        let cmd = init
            .mailbox
            .recv()
            .map_err(|e| Error::Mailbox(ipc_error(e)))?;
        match cmd {
            Command::Stop => break,
            Command::Digest => {
                // The guest is stopped: this is what the destination must have.
                let digests = disks
                    .iter()
                    .map(Disk::digest)
                    .collect::<Result<Vec<_>, _>>()?;
                let _ = events.send(ActorEvent {
                    actor: ActorKind::Blockio,
                    event: Event::DiskDigests { disks: digests },
                });
                break;
            }
            Command::Round { round, all, last } => {
                out.round(&disks, &logs, round, all)?;
                out.end_round(round, last)?;
            }
        }
    }
    for d in disks {
        d.close()?;
    }
    Ok(())
}

/// The dirty log of each disk that has one, in the order of `disks`.
fn open_dirty_logs(inits: &[DiskInit], disks: &[Disk]) -> Result<Vec<Option<DirtyLog>>, Error> {
    inits
        .iter()
        .zip(disks)
        .map(|(d, disk)| {
            d.dirty_log
                .as_ref()
                .map(|p| DirtyLog::open(p, disk.chunks()))
                .transpose()
                .map_err(|source| Error::DirtyLog {
                    name: d.name.clone(),
                    source,
                })
        })
        .collect()
}

/// The chunks of `disk` that round `round` sends: all of them, or those taken
/// from its dirty log.
fn round_chunks(
    disk: &Disk,
    log: Option<&DirtyLog>,
    round: u32,
    all: bool,
) -> Result<Vec<u64>, Error> {
    match (all, log) {
        (true, log) => {
            // What was dirtied before the bulk phase is moot; what is
            // dirtied from here on goes in the next round.
            if let Some(log) = log {
                log.clear();
            }
            Ok((0..disk.chunks()).collect())
        }
        (false, Some(log)) => {
            let mut v = Vec::new();
            log.take_range(0, disk.chunks(), &mut v);
            Ok(v.into_iter().map(u64::from).collect())
        }
        (false, None) => Err(Error::NoDirtyLog {
            round,
            name: disk.name.clone(),
        }),
    }
}

/// Hands chunks to the writer through the shared slots, `window` at a time.
struct ChunkSender<'a> {
    chunks: &'a IpcSender<DiskChunk>,
    credits: &'a IpcReceiver<u32>,
    slots: memmap2::MmapMut,
    window: u32,
    /// Chunks sent so far.
    sent: u64,
    /// Chunks that may be sent before waiting for a credit.
    available: u32,
}

impl<'a> ChunkSender<'a> {
    fn new(init: &'a Init) -> Result<Self, Error> {
        let window = init.window.max(1);
        Ok(Self {
            chunks: &init.chunks,
            credits: &init.credits,
            slots: map_slots(&init.slots, window)?,
            window,
            sent: 0,
            available: window,
        })
    }

    /// Reads and sends the chunks of one round, disk after disk.
    fn round(
        &mut self,
        disks: &[Disk],
        logs: &[Option<DirtyLog>],
        round: u32,
        all: bool,
    ) -> Result<(), Error> {
        let started = std::time::Instant::now();
        let mut bytes = 0u64;
        for (k, (disk, log)) in disks.iter().zip(logs).enumerate() {
            let list = round_chunks(disk, log.as_ref(), round, all)?;
            disk.read_chunks(list, |i, buf| {
                bytes += buf.len() as u64;
                self.send(k as u32, i, &buf)
            })?;
        }
        let secs = started.elapsed().as_secs_f64();
        tracing::info!(
            round,
            bytes,
            secs,
            mb_per_s = bytes as f64 / 1e6 / secs.max(1e-9),
            "disk round read"
        );
        Ok(())
    }

    /// Sends chunk `i` of disk `disk` once the writer has credited a slot.
    fn send(&mut self, disk: u32, i: u64, buf: &[u8]) -> Result<(), Error> {
        while self.available == 0 {
            self.available += self.credits.recv().map_err(|e| Error::Send(ipc_error(e)))?;
        }
        self.available -= 1;
        // At most `window` chunks lack their credit, and the writer
        // credits in order: the slot of chunk n - window is free.
        let slot = (self.sent % u64::from(self.window)) as usize;
        self.sent += 1;
        let slot = if is_zero(buf) {
            None
        } else {
            let at = slot * CHUNK as usize;
            self.slots[at..at + buf.len()].copy_from_slice(buf);
            Some(slot as u32)
        };
        self.chunks
            .send(DiskChunk::Data {
                disk,
                offset: i * CHUNK,
                len: buf.len() as u32,
                slot,
            })
            .map_err(|e| Error::Send(ipc_error(e)))
    }

    fn end_round(&self, round: u32, last: bool) -> Result<(), Error> {
        self.chunks
            .send(DiskChunk::RoundEnd { round, last })
            .map_err(|e| Error::Send(ipc_error(e)))
    }
}

fn open_slots(
    path: &std::path::Path,
    window: u32,
    writable: bool,
) -> Result<(std::fs::File, usize), Error> {
    let err = |source| Error::Slots {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(writable)
        .open(path)
        .map_err(err)?;
    let len = u64::from(window) * CHUNK;
    if file.metadata().map_err(err)?.len() < len {
        return Err(err(io::Error::other(format!("shorter than {len} bytes"))));
    }
    Ok((file, len as usize))
}

/// Maps the shared chunk buffers (`window` chunks) for the blockio actor.
fn map_slots(path: &std::path::Path, window: u32) -> Result<memmap2::MmapMut, Error> {
    let (file, len) = open_slots(path, window, true)?;
    // SAFETY: the file is private to this migration: the blockio actor writes
    // a slot only while the writer does not own it (the credit protocol).
    unsafe { memmap2::MmapOptions::new().len(len).map_mut(&file) }.map_err(|source| Error::Slots {
        path: path.to_owned(),
        source,
    })
}

/// Maps the shared chunk buffers read-only, for the writer.
pub fn map_slots_readonly(path: &std::path::Path, window: u32) -> Result<memmap2::Mmap, Error> {
    let (file, len) = open_slots(path, window, false)?;
    // SAFETY: as in `map_slots`; the writer reads a slot only between the
    // chunk's message and its credit, while the blockio actor leaves it be.
    unsafe { memmap2::MmapOptions::new().len(len).map(&file) }.map_err(|source| Error::Slots {
        path: path.to_owned(),
        source,
    })
}

/// The destination's disks: chunks of the "block" section are written here.
#[derive(Debug, Default)]
pub struct Sinks {
    disks: Vec<Disk>,
    /// Writes in flight: (disk, chunk offset, reply).
    pending: VecDeque<(usize, u64, Pending<()>)>,
}

impl Sinks {
    /// Opens the destination disks (before the stream arrives, so a bad
    /// --disk fails early).
    pub fn open(inits: &[DiskInit]) -> Result<Self, Error> {
        for (i, d) in inits.iter().enumerate() {
            if inits[..i].iter().any(|o| o.name == d.name) {
                return Err(Error::DuplicateName(d.name.clone()));
            }
        }
        let disks = inits
            .iter()
            .map(|d| Disk::open(d, false))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            disks,
            pending: VecDeque::new(),
        })
    }

    /// True when no --disk was given.
    pub fn is_empty(&self) -> bool {
        self.disks.is_empty()
    }

    fn wait_one(&mut self) -> Result<(), Error> {
        if let Some((k, _, rx)) = self.pending.pop_front() {
            self.disks[k].wait(&rx)?;
        }
        Ok(())
    }

    /// Waits for every write in flight.
    pub fn drain(&mut self) -> Result<(), Error> {
        while !self.pending.is_empty() {
            self.wait_one()?;
        }
        Ok(())
    }

    /// Writes one chunk of `device` at `sector` (all zero when `data` is None).
    pub fn chunk(&mut self, device: &str, sector: u64, data: Option<&[u8]>) -> Result<(), Error> {
        let Some(k) = self.disks.iter().position(|d| d.name == device) else {
            let names: Vec<_> = self.disks.iter().map(|d| format!("{:?}", d.name)).collect();
            return Err(Error::UnknownDevice {
                device: device.to_owned(),
                given: if names.is_empty() {
                    "none".into()
                } else {
                    names.join(", ")
                },
            });
        };
        let offset = sector * 512;
        let disk = &self.disks[k];
        if offset >= disk.capacity {
            return Err(Error::TooSmall {
                name: disk.name.clone(),
                path: disk.path.clone(),
                capacity: disk.capacity,
                offset,
            });
        }
        // A QEMU source pads the last chunk: write only what fits the disk.
        let len = CHUNK.min(disk.capacity - offset);
        // Requests may complete in any order: never two to one chunk.
        if self.pending.iter().any(|(j, o, _)| *j == k && *o == offset) {
            self.drain()?;
        }
        while self.pending.len() >= WRITE_BEHIND {
            self.wait_one()?;
        }
        let disk = &self.disks[k];
        let (tx, rx) = bounded(1);
        let req = match data {
            Some(data) => {
                let mut buf = disk.mailbox.buffers().alloc(len as usize);
                buf.copy_from_slice(&data[..len as usize]);
                Request::Write {
                    offset,
                    data: buf,
                    fua: false,
                    reply: tx,
                }
            }
            None => Request::WriteZeroes {
                offset,
                len,
                flags: ZeroFlags::default(),
                reply: tx,
            },
        };
        disk.mailbox.send(req).map_err(|e| disk.io(e))?;
        self.pending.push_back((k, offset, rx));
        Ok(())
    }

    /// Waits for the writes, flushes every disk and digests it.
    pub fn finish(&mut self) -> Result<Vec<BlockDigest>, Error> {
        self.drain()?;
        for d in &self.disks {
            d.mailbox.flush().map_err(|e| d.io(e))?;
        }
        self.disks.iter().map(Disk::digest).collect()
    }
}
