//! The scanner actor: walks the pages to send this round, finds zero pages
//! itself (before any compression) and batches the rest for the compress stage.
//!
//! It maps guest RAM read-only and scans it page by page in place, with
//! volatile loads; the other pages travel onwards as indices, never as bytes.
//! Round 0 asks each RAM file for its holes first (SEEK_DATA/SEEK_HOLE) and
//! sends them as zero pages unread. What the scanner holds does not grow with
//! the guest: one batch of indices at a time, never a list of every page.

use crate::supervisor::messages::{ActorEvent, ActorKind, Event, PageBatch, Work};
use ferry_proto::qemu_file::QemuFileWriter;
use ferry_proto::stream::encode::RamWriter;
use ferry_proto::stream::PAGE_SIZE;
use ferry_proto::transport::MemTransport;
use std::path::PathBuf;

use ipc_channel::ipc::{IpcReceiver, IpcSender};
use serde::{Deserialize, Serialize};

use crate::supervisor::ipc_error;
use ferry_guest::dirty_log::{self, DirtyLog};
use ferry_guest::ram::{self, BlockFile, GuestRam};

/// Pages per batch: 1 MiB, big enough to amortise a message, small enough to
/// keep every stage busy.
pub const BATCH_PAGES: usize = 256;

/// Pages of a hole per batch: 36 KiB of ZERO records (9 bytes a page).
const HOLE_BATCH_PAGES: u32 = 16 * BATCH_PAGES as u32;

/// Pages taken from the dirty log at once: the scanner holds at most this
/// many indices (64 KiB), whatever the guest's size.
const TAKE_PAGES: u64 = 64 * BATCH_PAGES as u64;

/// The scanner's mailbox.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Command {
    /// Send a round of pages.
    Round {
        /// Round number.
        round: u32,
        /// Every page (round 0), or only the pages taken from the dirty log.
        all: bool,
        /// Whether the stream ends after this round.
        last: bool,
    },
    /// After the last round: digest the RAM for a destination that will
    /// acknowledge, then exit. The scanner has read every page through its
    /// own mapping by then, so hashing costs no page faults.
    Digest,
    /// Exit.
    Stop,
}

/// Configuration of the scanner.
#[derive(Debug, Serialize, Deserialize)]
pub struct Init {
    /// The blocks, in send order.
    pub blocks: Vec<BlockFile>,
    /// Commands from the orchestrator.
    pub mailbox: IpcReceiver<Command>,
    /// Batches for the compress stage.
    pub work: IpcSender<Work>,
    /// One credit back per batch the compress stage has taken.
    pub credits: IpcReceiver<u32>,
    /// Batches in flight before waiting for credit: bounded, so a slow
    /// destination holds the scanner back instead of filling memory.
    pub window: u32,
    /// The guest's dirty log, covering the blocks' pages in order.
    pub dirty_log: Option<PathBuf>,
}

/// Errors of the scanner.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A RAM file cannot be mapped.
    #[error("cannot map guest RAM")]
    Map(#[from] ram::Error),
    /// A RAM file changed size under us.
    #[error("RAM file {path} is {actual} bytes, expected {expected}")]
    Resized {
        /// The file.
        path: std::path::PathBuf,
        /// Its length at the start.
        expected: u64,
        /// Its length now.
        actual: u64,
    },
    /// The compress stage is gone.
    #[error("cannot hand pages to the compress process")]
    Send(#[source] std::io::Error),
    /// The orchestrator is gone.
    #[error("lost the orchestrator's commands")]
    Mailbox(#[source] std::io::Error),
    /// The dirty log cannot be used.
    #[error("cannot use the dirty log")]
    DirtyLog(#[from] dirty_log::Error),
    /// A dirty round without a dirty log.
    #[error("round {0} asks for dirty pages but there is no dirty log")]
    NoDirtyLog(u32),
}

/// Runs the scanner until told to stop.
pub fn run(init: Init, events: &IpcSender<ActorEvent>) -> Result<(), Error> {
    let mut scanner = Scanner::new(&init)?;
    loop {
        match init
            .mailbox
            .recv()
            .map_err(|e| Error::Mailbox(ipc_error(e)))?
        {
            Command::Stop => return Ok(()),
            Command::Digest => {
                let digests = scanner.digests()?;
                let _ = events.send(ActorEvent {
                    actor: ActorKind::Scanner,
                    event: Event::RamDigests { digests },
                });
                return Ok(());
            }
            Command::Round { round, all, last } => {
                let pages = scanner.round(round, all, last)?;
                let _ = events.send(ActorEvent {
                    actor: ActorKind::Scanner,
                    event: Event::RoundScanned { round, pages },
                });
            }
        }
    }
}

/// Maps every block, which must still have the length it was announced with.
fn map_blocks(blocks: &[BlockFile]) -> Result<Vec<GuestRam>, Error> {
    blocks
        .iter()
        .map(|b| {
            let ram = GuestRam::map(&b.path)?;
            if ram.len() != b.length {
                return Err(Error::Resized {
                    path: b.path.clone(),
                    expected: b.length,
                    actual: ram.len(),
                });
            }
            Ok(ram)
        })
        .collect()
}

/// The scanner between commands: its mappings, the dirty log and where the
/// batches stand.
struct Scanner<'i> {
    init: &'i Init,
    rams: Vec<GuestRam>,
    log: Option<DirtyLog>,
    /// The next batch's sequence number.
    seq: u64,
    /// Batches that may still go before waiting for credit.
    credits: u32,
}

impl<'i> Scanner<'i> {
    fn new(init: &'i Init) -> Result<Self, Error> {
        let rams = map_blocks(&init.blocks)?;
        let total_pages: u64 = init.blocks.iter().map(BlockFile::pages).sum();
        let log = match &init.dirty_log {
            Some(path) => Some(DirtyLog::open(path, total_pages)?),
            None => None,
        };
        Ok(Self {
            init,
            rams,
            log,
            seq: 0,
            credits: init.window.max(1),
        })
    }

    /// The digest of every block, reading only its data extents: the holes
    /// read zero, which the digest leaves out, and touching them through
    /// the mapping would allocate them.
    fn digests(&self) -> Result<Vec<String>, Error> {
        self.init
            .blocks
            .iter()
            .zip(&self.rams)
            .map(|(info, ram)| {
                let mut failed = None;
                let ranges = ram::extents(&info.path, info.length)?.filter_map(|e| match e {
                    Ok(e) => e.data.then_some(e.range),
                    Err(e) => {
                        failed.get_or_insert(e);
                        None
                    }
                });
                let digest = ram.digest_ranges(ranges);
                failed.map_or(Ok(digest), |e| Err(e.into()))
            })
            .collect()
    }

    /// Sends the pages of one round and its end; returns how many pages.
    ///
    /// The scanner's own memory does not grow with the guest: round 0 walks
    /// the blocks' extents, later rounds take the dirty log a window at a
    /// time, so at most [`TAKE_PAGES`] indices are held at once.
    fn round(&mut self, round: u32, all: bool, last: bool) -> Result<u64, Error> {
        if all {
            // Round 0 sends everything: what was dirtied before it is moot,
            // what is dirtied from here on goes in the next round.
            if let Some(log) = &self.log {
                log.clear();
            }
        } else if self.log.is_none() {
            return Err(Error::NoDirtyLog(round));
        }
        let mut pages = 0u64;
        let mut first_page = 0u64;
        let mut indices: Vec<u32> = Vec::with_capacity(TAKE_PAGES as usize);
        for block in 0..self.init.blocks.len() {
            let count = self.init.blocks[block].pages();
            pages += if all {
                self.send_all(block, &mut indices)?
            } else {
                self.send_dirty(block, first_page, &mut indices)?
            };
            first_page += count;
        }
        self.send(Work::RoundEnd {
            seq: self.seq,
            round,
            last,
        })?;
        Ok(pages)
    }

    /// Round 0 of `block`: the pages of its data extents are scanned, the
    /// pages of its holes go as ZERO records without being touched (a read
    /// through the mapping would allocate them on tmpfs).
    fn send_all(&mut self, block: usize, indices: &mut Vec<u32>) -> Result<u64, Error> {
        let info = &self.init.blocks[block];
        let page = PAGE_SIZE as u64;
        let mut sent = 0u64;
        for extent in ram::extents(&info.path, info.length)? {
            let extent = extent?;
            // Page indices of a block fit u32: the stream's offsets are
            // checked against the block length at start.
            let (mut at, end) = (
                (extent.range.start / page) as u32,
                (extent.range.end / page) as u32,
            );
            while at < end {
                let n = if extent.data {
                    let n = (end - at).min(BATCH_PAGES as u32);
                    indices.clear();
                    indices.extend(at..at + n);
                    self.send_batch(block, indices)?;
                    n
                } else {
                    let n = (end - at).min(HOLE_BATCH_PAGES);
                    self.send_hole(block, at..at + n)?;
                    n
                };
                at += n;
                sent += u64::from(n);
            }
        }
        Ok(sent)
    }

    /// A later round of `block`, whose first page is `first_page` in the
    /// dirty log: its dirty pages, taken [`TAKE_PAGES`] at a time.
    fn send_dirty(
        &mut self,
        block: usize,
        first_page: u64,
        indices: &mut Vec<u32>,
    ) -> Result<u64, Error> {
        let count = self.init.blocks[block].pages();
        let mut sent = 0u64;
        let mut at = 0u64;
        while at < count {
            let n = TAKE_PAGES.min(count - at);
            indices.clear();
            if let Some(log) = &self.log {
                log.take_range(first_page + at, n, indices);
            }
            for i in indices.iter_mut() {
                *i += at as u32;
            }
            for chunk in indices.chunks(BATCH_PAGES) {
                self.send_batch(block, chunk)?;
                sent += chunk.len() as u64;
            }
            at += n;
        }
        Ok(sent)
    }

    /// Waits until a batch may go.
    fn take_credit(&mut self) -> Result<(), Error> {
        while self.credits == 0 {
            self.credits += self
                .init
                .credits
                .recv()
                .map_err(|e| Error::Send(ipc_error(e)))?;
        }
        self.credits -= 1;
        Ok(())
    }

    /// Scans `indices` of `block` and hands them on, once there is credit.
    fn send_batch(&mut self, block: usize, indices: &[u32]) -> Result<(), Error> {
        self.take_credit()?;
        let name = &self.init.blocks[block].name;
        let batch = scan_batch(self.seq, block as u32, name, &self.rams[block], indices);
        self.send(Work::Batch(batch))
    }

    /// Hands on the pages `hole` of `block`, known to read zero, as ZERO
    /// records, once there is credit.
    fn send_hole(&mut self, block: usize, hole: std::ops::Range<u32>) -> Result<(), Error> {
        self.take_credit()?;
        let name = &self.init.blocks[block].name;
        let zero_pages = u64::from(hole.end - hole.start);
        let batch = PageBatch {
            seq: self.seq,
            block: block as u32,
            zero_records: zero_records(name, hole.clone()),
            zero_pages,
            zero: hole.collect(),
            pages: Vec::new(),
        };
        self.send(Work::Batch(batch))
    }

    /// Sends `work` to the compress stage, which numbers it `seq`.
    fn send(&mut self, work: Work) -> Result<(), Error> {
        self.init
            .work
            .send(work)
            .map_err(|e| Error::Send(ipc_error(e)))?;
        self.seq += 1;
        Ok(())
    }
}

/// Splits `indices` of one block into zero pages, encoded here as ZERO
/// records, and the rest, passed on by index.
///
/// A page of one repeated non-zero byte goes on as a normal page: QEMU 8.2
/// and later refuse a ZERO record whose fill byte is not 0 ("Found a zero
/// page with value N").
fn scan_batch(seq: u64, block: u32, name: &str, ram: &GuestRam, indices: &[u32]) -> PageBatch {
    let mut pages = Vec::with_capacity(indices.len());
    let mut zero_indices = Vec::new();
    for &i in indices {
        if ram.page_fill(i) == Some(0) {
            zero_indices.push(i);
        } else {
            pages.push(i);
        }
    }
    let zero_records = zero_records(name, zero_indices.iter().copied());
    PageBatch {
        seq,
        block,
        zero_pages: (indices.len() - pages.len()) as u64,
        zero_records,
        zero: zero_indices,
        pages,
    }
}

/// ZERO records (fill byte 0) for `pages` of the block `name`.
fn zero_records(name: &str, pages: impl IntoIterator<Item = u32>) -> Vec<u8> {
    let mut zero = QemuFileWriter::new(MemTransport::new());
    let mut writer = RamWriter::new();
    for i in pages {
        // Writing to memory cannot fail, and the name was checked at start.
        let offset = u64::from(i) * PAGE_SIZE as u64;
        let _ = writer.put_zero_page(&mut zero, name, offset, 0);
    }
    zero.into_transport()
        .map(|mut t| t.take())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Round 0 over a sparse file on tmpfs: the hole's pages go as ZERO
    /// records without being touched (the file allocates nothing more), the
    /// data pages are scanned, every page is sent once.
    #[test]
    fn round_zero_sends_holes_as_zero_without_touching_them() {
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let path = dir.path().join("ram");
        let pages = 40 * BATCH_PAGES as u64;
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(pages * PAGE_SIZE as u64).unwrap();
        use std::os::unix::fs::{FileExt, MetadataExt};
        // Page 3 (data), pages 5000..5002 (data, one of them zero-filled).
        f.write_all_at(&[1u8; 10], 3 * PAGE_SIZE as u64).unwrap();
        f.write_all_at(&[2u8; PAGE_SIZE], 5000 * PAGE_SIZE as u64)
            .unwrap();
        f.write_all_at(&[0u8; PAGE_SIZE], 5001 * PAGE_SIZE as u64)
            .unwrap();
        let allocated = f.metadata().unwrap().blocks();
        let (_cmd_tx, mailbox) = ipc_channel::ipc::channel().unwrap();
        let (work, work_rx) = ipc_channel::ipc::channel().unwrap();
        let (credit_tx, credits) = ipc_channel::ipc::channel().unwrap();
        let init = Init {
            blocks: vec![BlockFile {
                name: "mem".into(),
                path: path.clone(),
                length: pages * PAGE_SIZE as u64,
            }],
            mailbox,
            work,
            credits,
            window: 1_000,
            dirty_log: None,
        };
        let mut scanner = Scanner::new(&init).unwrap();
        assert_eq!(scanner.round(0, true, true).unwrap(), pages);
        let (mut zero, mut sent) = (0, Vec::new());
        let end = loop {
            match work_rx.recv().unwrap() {
                Work::Batch(b) => {
                    zero += b.zero_pages;
                    sent.extend(b.pages);
                }
                other => break other,
            }
        };
        assert!(matches!(end, Work::RoundEnd { round: 0, .. }), "{end:?}");
        drop(credit_tx);
        assert_eq!(sent, [3, 5000]);
        assert_eq!(zero, pages - 2);
        assert_eq!(
            f.metadata().unwrap().blocks(),
            allocated,
            "holes stay holes"
        );
        // The digest reads only the data, and equals the plain one.
        let digests = scanner.digests().unwrap();
        assert_eq!(f.metadata().unwrap().blocks(), allocated);
        assert_eq!(
            digests,
            [ferry_guest::ram::digest(&std::fs::read(&path).unwrap())]
        );
    }

    #[test]
    fn only_all_zero_pages_become_zero_records() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ram");
        let mut bytes = vec![0u8; 3 * PAGE_SIZE];
        // Page 1 is one repeated non-zero byte, page 2 is not uniform.
        bytes[PAGE_SIZE..2 * PAGE_SIZE].fill(0x16);
        bytes[2 * PAGE_SIZE + 7] = 1;
        std::fs::write(&path, &bytes).unwrap();
        let ram = GuestRam::map(&path).unwrap();
        let batch = scan_batch(0, 0, "mem", &ram, &[0, 1, 2]);
        assert_eq!(batch.zero_pages, 1);
        assert_eq!(batch.pages, [1, 2]);
        // One record: be64 offset|ZERO, the counted name, fill byte 0.
        let mut want = (ferry_proto::stream::ram_flag::ZERO).to_be_bytes().to_vec();
        want.extend_from_slice(b"\x03mem\x00");
        assert_eq!(batch.zero_records, want);
    }
}
