//! The scanner actor: walks the pages to send this round, finds zero pages
//! itself (before any compression) and batches the rest for the compress stage.
//!
//! It maps guest RAM read-only and scans it page by page in place, with
//! volatile loads; the other pages travel onwards as indices, never as bytes.

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
                let digests = scanner.rams.iter().map(GuestRam::digest).collect();
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

    /// Sends the pages of one round and its end; returns how many pages.
    fn round(&mut self, round: u32, all: bool, last: bool) -> Result<u64, Error> {
        if all {
            // Round 0 sends everything: what was dirtied before it is moot,
            // what is dirtied from here on goes in the next round.
            if let Some(log) = &self.log {
                log.clear();
            }
        }
        let mut pages = 0u64;
        let mut first_page = 0u64;
        let mut indices: Vec<u32> = Vec::new();
        for (block, info) in self.init.blocks.iter().enumerate() {
            indices.clear();
            match (all, &self.log) {
                (true, _) => indices.extend(0..info.pages() as u32),
                (false, Some(log)) => log.take_range(first_page, info.pages(), &mut indices),
                (false, None) => return Err(Error::NoDirtyLog(round)),
            }
            first_page += info.pages();
            for chunk in indices.chunks(BATCH_PAGES) {
                self.send_batch(block, chunk)?;
                pages += chunk.len() as u64;
            }
        }
        self.send(Work::RoundEnd {
            seq: self.seq,
            round,
            last,
        })?;
        Ok(pages)
    }

    /// Scans `indices` of `block` and hands them on, once there is credit.
    fn send_batch(&mut self, block: usize, indices: &[u32]) -> Result<(), Error> {
        while self.credits == 0 {
            self.credits += self
                .init
                .credits
                .recv()
                .map_err(|e| Error::Send(ipc_error(e)))?;
        }
        self.credits -= 1;
        let name = &self.init.blocks[block].name;
        let batch = scan_batch(self.seq, block as u32, name, &self.rams[block], indices);
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
    let mut zero = QemuFileWriter::new(MemTransport::new());
    let mut writer = RamWriter::new();
    let mut zero_pages = 0;
    let mut pages = Vec::with_capacity(indices.len());
    let mut zero_indices = Vec::new();
    for &i in indices {
        if ram.page_fill(i) == Some(0) {
            // Writing to memory cannot fail, and the name was checked at start.
            let offset = u64::from(i) * PAGE_SIZE as u64;
            let _ = writer.put_zero_page(&mut zero, name, offset, 0);
            zero_pages += 1;
            zero_indices.push(i);
        } else {
            pages.push(i);
        }
    }
    let zero_records = zero
        .into_transport()
        .map(|mut t| t.take())
        .unwrap_or_default();
    PageBatch {
        seq,
        block,
        zero_records,
        zero_pages,
        zero: zero_indices,
        pages,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
