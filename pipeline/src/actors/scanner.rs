//! The scanner actor: walks the pages to send this round, finds zero pages
//! itself (before any compression) and batches the rest for the compress stage.
//!
//! It maps guest RAM read-only and reads each page once per round: round 0
//! copies it into a private page buffer, decides zero or not there and adds
//! its [`PageDigest`] to its region's sum, so the digest a ferry destination
//! checks costs no second pass over RAM ([`RegionSums`]); later rounds scan
//! in place with volatile loads. The pages travel onwards as indices, never
//! as bytes. Round 0 asks each RAM file for its holes first
//! (SEEK_DATA/SEEK_HOLE) and sends them as zero pages unread. What the scanner
//! holds grows with the guest by 16 bytes and a bit per MiB (16 MiB at 1 TiB):
//! one batch of indices at a time, never a list of every page.

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
use ferry_guest::ram::{self, BlockFile, GuestRam, PageDigest};

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
    /// acknowledge, then exit. Only the regions a later round rescanned are
    /// read again ([`RegionSums::finish`]), through the scanner's own
    /// mapping, which has them faulted in already.
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
    /// A block's regions went stale after its mapping was released.
    #[error("block {0:?} was unmapped before its digest")]
    Unmapped(String),
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
    /// The running digest of each block, by region.
    sums: Vec<RegionSums>,
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
        let sums = init
            .blocks
            .iter()
            .map(|b| RegionSums::new(b.pages()))
            .collect();
        Ok(Self {
            init,
            rams,
            sums,
            log,
            seq: 0,
            credits: init.window.max(1),
        })
    }

    /// The digest of every block: the sums of the regions no later round
    /// rescanned, and the stale regions hashed again, reading only their
    /// data extents: the holes read zero, which the digest leaves out, and
    /// touching them through the mapping would allocate them.
    fn digests(&self) -> Result<Vec<String>, Error> {
        self.init
            .blocks
            .iter()
            .zip(&self.sums)
            .enumerate()
            .map(|(i, (info, sums))| {
                let span = sums.stale_span();
                if span.is_empty() {
                    return Ok(sums.fresh().to_hex());
                }
                // Regions go stale only in rounds that take a dirty log, and
                // the mappings go early only without one.
                let ram = self
                    .rams
                    .get(i)
                    .ok_or_else(|| Error::Unmapped(info.name.clone()))?;
                let mut failed = None;
                let mut extents = ram::extents(&info.path, info.length)?;
                // Only the span of the stale regions is walked: on tmpfs
                // SEEK_HOLE steps through every page it passes (a 1 GiB
                // file took 14 ms with nothing stale).
                let ranges = extents.within(span).filter_map(|e| match e {
                    Ok(e) => e.data.then_some(e.range),
                    Err(e) => {
                        failed.get_or_insert(e);
                        None
                    }
                });
                let digest = sums.finish(ram, ranges).to_hex();
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
            for sums in &mut self.sums {
                sums.reset();
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
        if last && self.log.is_none() {
            // Without a dirty log nothing is read again (round 0's sums are
            // the digest): the page tables of every mapped page go now,
            // beside the end of the transfer, instead of in this process's
            // exit, which the end of the migration waits for (about 20 ms
            // a GiB here).
            let rams = std::mem::take(&mut self.rams);
            std::thread::spawn(move || drop(rams));
        }
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
                    self.send_batch(block, indices, Pass::First)?;
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
                self.send_batch(block, chunk, Pass::Again)?;
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
    fn send_batch(&mut self, block: usize, indices: &[u32], pass: Pass) -> Result<(), Error> {
        self.take_credit()?;
        let name = &self.init.blocks[block].name;
        let ram = self
            .rams
            .get(block)
            .ok_or_else(|| Error::Unmapped(name.clone()))?;
        let sums = &mut self.sums[block];
        let batch = scan_batch(self.seq, block as u32, name, ram, indices, sums, pass);
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

/// Which scan of a page this is since round 0 began.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// Round 0: the page is read once, into a private buffer, and hashed.
    First,
    /// A later round: its region goes stale, the page is scanned in place.
    Again,
}

/// A page buffer aligned for word-wise zero checks and hashing.
#[repr(C, align(64))]
struct PageBuf([u8; PAGE_SIZE]);

/// Splits `indices` of one block into zero pages, encoded here as ZERO
/// records, and the rest, passed on by index; on the [`Pass::First`] scan
/// the non-zero pages are hashed into `sums` from the same single read.
///
/// A page of one repeated non-zero byte goes on as a normal page: QEMU 8.2
/// and later refuse a ZERO record whose fill byte is not 0 ("Found a zero
/// page with value N").
fn scan_batch(
    seq: u64,
    block: u32,
    name: &str,
    ram: &GuestRam,
    indices: &[u32],
    sums: &mut RegionSums,
    pass: Pass,
) -> PageBatch {
    let mut pages = Vec::with_capacity(indices.len());
    let mut zero_indices = Vec::new();
    let mut buf = PageBuf([0; PAGE_SIZE]);
    for &i in indices {
        let zero = match pass {
            Pass::First => match ram.read_page(i, &mut buf.0) {
                Some(bytes) if !ferry_proto::stream::encode::is_zero(bytes) => {
                    sums.add(i, PageDigest::of_page(u64::from(i), bytes));
                    false
                }
                Some(_) => true,
                // Past the end: the stream's check at start rules it out;
                // sent on as a page, the writer reports it.
                None => false,
            },
            Pass::Again => {
                sums.mark_stale(i);
                ram.page_fill(i) == Some(0)
            }
        };
        if zero {
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

/// Pages per digest region: 1 MiB, 16 bytes of sum and a stale bit each.
const REGION_PAGES: u32 = 256;

/// A block's running digest: one [`PageDigest`] sum per region of
/// [`REGION_PAGES`] pages, filled by round 0's scan, and a stale bit per
/// region that a later round rescanned.
///
/// Why the sums of the regions that are not stale equal a hash of the final
/// RAM (guest stopped, last round sent): take a page whose last write W
/// before the stop changed it, and the guest's mark M of it, which follows W
/// (the guest ORs its bit with release ordering after writing). Round 0
/// clears the whole log before it asks for extents or reads a page. If M
/// came before that clear, so did W, and round 0's read (and its extent
/// query, which then saw data, not a hole) sees W. If M came after it, the
/// bit is set from M until a take: the last round takes every bit after the
/// guest stopped, so some round takes it after M with an acquiring swap and
/// then rescans the page, which marks its region stale. So a page whose final
/// contents differ from what round 0 hashed is always in a stale region, and
/// [`RegionSums::finish`] hashes those again from the mapping. A failed
/// round (bits put back, `mark_all`) ends this scanner process: the next
/// attempt starts a new one at round 0, whose sums start from zero
/// ([`RegionSums::reset`]). Without a dirty log there is one round and the
/// RAM holds still by contract ("sent once"): what round 0 read is final.
/// Holes found with SEEK_HOLE add nothing: they read zero, which counts 0.
#[derive(Debug)]
struct RegionSums {
    sums: Vec<PageDigest>,
    /// One bit per region, 64 regions a word.
    stale: Vec<u64>,
}

impl RegionSums {
    /// Sums for a block of `pages` pages, all zero and fresh.
    fn new(pages: u64) -> Self {
        let regions = pages.div_ceil(u64::from(REGION_PAGES)) as usize;
        Self {
            sums: vec![PageDigest::default(); regions],
            stale: vec![0; regions.div_ceil(64)],
        }
    }

    /// Forgets everything: round 0 (re)starts.
    fn reset(&mut self) {
        self.sums.fill(PageDigest::default());
        self.stale.fill(0);
    }

    /// Adds what page `index` contributes.
    fn add(&mut self, index: u32, digest: PageDigest) {
        if let Some(sum) = self.sums.get_mut((index / REGION_PAGES) as usize) {
            *sum += digest;
        }
    }

    /// The region of page `index` must be hashed again at the end.
    fn mark_stale(&mut self, index: u32) {
        let region = (index / REGION_PAGES) as usize;
        if let Some(word) = self.stale.get_mut(region / 64) {
            *word |= 1 << (region % 64);
        }
    }

    /// Bytes from the first stale region's start to the last one's end;
    /// empty when none is stale.
    fn stale_span(&self) -> std::ops::Range<u64> {
        let region_bytes = u64::from(REGION_PAGES) * PAGE_SIZE as u64;
        let mut stale = (0..self.sums.len()).filter(|&r| self.is_stale(r));
        let Some(first) = stale.next() else {
            return 0..0;
        };
        let last = stale.next_back().unwrap_or(first);
        first as u64 * region_bytes..(last as u64 + 1) * region_bytes
    }

    /// The sum of the regions no later round rescanned.
    fn fresh(&self) -> PageDigest {
        (0..self.sums.len())
            .filter(|&r| !self.is_stale(r))
            .map(|r| self.sums[r])
            .sum()
    }

    fn is_stale(&self, region: usize) -> bool {
        self.stale
            .get(region / 64)
            .is_some_and(|w| w & (1 << (region % 64)) != 0)
    }

    /// The block's digest: the sums of the fresh regions, plus the stale
    /// regions hashed from `ram` where they overlap `data` (the block's data
    /// extents, ascending byte ranges, page aligned; the rest reads zero).
    fn finish(
        &self,
        ram: &GuestRam,
        data: impl Iterator<Item = std::ops::Range<u64>>,
    ) -> PageDigest {
        let region_bytes = u64::from(REGION_PAGES) * PAGE_SIZE as u64;
        let fresh = self.fresh();
        let stale = data.flat_map(|range| {
            let regions = range.start / region_bytes..range.end.div_ceil(region_bytes);
            regions
                .filter(|&r| self.is_stale(r as usize))
                .map(move |r| {
                    let (start, end) = (r * region_bytes, (r + 1) * region_bytes);
                    start.max(range.start)..end.min(range.end)
                })
        });
        let mut total = ram.sum_ranges(stale);
        total += fresh;
        total
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

    /// A scanner's configuration for the one block "mem" of `pages` pages in
    /// `path`, with the other ends of its channels: the work, the mailbox and
    /// the credits (a window of 1000 batches).
    fn one_block(
        path: &std::path::Path,
        pages: u64,
        dirty_log: Option<PathBuf>,
    ) -> (Init, IpcReceiver<Work>, IpcSender<Command>, IpcSender<u32>) {
        let (cmd_tx, mailbox) = ipc_channel::ipc::channel().unwrap();
        let (work, work_rx) = ipc_channel::ipc::channel().unwrap();
        let (credit_tx, credits) = ipc_channel::ipc::channel().unwrap();
        let init = Init {
            blocks: vec![BlockFile {
                name: "mem".into(),
                path: path.to_owned(),
                length: pages * PAGE_SIZE as u64,
            }],
            mailbox,
            work,
            credits,
            window: 1_000,
            dirty_log,
        };
        (init, work_rx, cmd_tx, credit_tx)
    }

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
        let (init, work_rx, _cmd_tx, credit_tx) = one_block(&path, pages, None);
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

    /// Drains the compress stage's side of `rx` until the last round's end,
    /// on its own thread (a round's batches outgrow the socket's buffer).
    fn drain(rx: ipc_channel::ipc::IpcReceiver<Work>) -> std::thread::JoinHandle<u32> {
        std::thread::spawn(move || {
            let mut rounds = 0;
            loop {
                match rx.recv().unwrap() {
                    Work::Batch(_) => {}
                    Work::RoundEnd { last, .. } => {
                        rounds += 1;
                        if last {
                            return rounds;
                        }
                    }
                }
            }
        })
    }

    /// A live send: the guest writes (and marks) pages between rounds and
    /// during the last one's lead-up; the digest the scanner gives at the end
    /// equals the plain digest of the final file, while only the regions a
    /// later round rescanned are read again.
    #[test]
    fn digest_after_dirty_rounds_equals_the_final_file() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir_in("/dev/shm").unwrap();
        let path = dir.path().join("ram");
        let regions = 10u64;
        let pages = regions * u64::from(REGION_PAGES);
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(pages * PAGE_SIZE as u64).unwrap();
        // Data in regions 0..4 (every third page), regions 4.. a hole.
        for p in (0..4 * u64::from(REGION_PAGES)).step_by(3) {
            f.write_all_at(&[p as u8 | 1; 64], p * PAGE_SIZE as u64)
                .unwrap();
        }
        let log_path = dir.path().join("log");
        let log = DirtyLog::create(&log_path, pages).unwrap();
        let (init, work_rx, _cmd_tx, _credit_tx) = one_block(&path, pages, Some(log_path));
        let mut scanner = Scanner::new(&init).unwrap();
        let drained = drain(work_rx);
        // What the guest wrote before round 0 is marked but moot.
        log.mark(7);
        let write = |page: u64, bytes: &[u8]| {
            f.write_all_at(bytes, page * PAGE_SIZE as u64).unwrap();
            log.mark(page);
        };
        scanner.round(0, true, false).unwrap();
        // Round 1's pages: a data page changed, one zeroed, one written in
        // the hole (region 6).
        write(3, &[0xaa; 100]);
        write(6, &[0; PAGE_SIZE]);
        write(6 * u64::from(REGION_PAGES) + 5, &[0x42; 10]);
        assert_eq!(scanner.round(1, false, false).unwrap(), 3);
        // The last round (guest stopped): page 3 again, and region 2.
        write(3, &[0x55; 7]);
        write(2 * u64::from(REGION_PAGES) + 1, &[9; PAGE_SIZE]);
        assert_eq!(scanner.round(2, false, true).unwrap(), 2);
        assert_eq!(drained.join().unwrap(), 3);
        let stale: Vec<usize> = (0..regions as usize)
            .filter(|&r| scanner.sums[0].is_stale(r))
            .collect();
        assert_eq!(stale, [0, 2, 6]);
        let digests = scanner.digests().unwrap();
        let final_bytes = std::fs::read(&path).unwrap();
        assert_eq!(digests, [ferry_guest::ram::digest(&final_bytes)]);
        // A write the log never hears of, in a fresh region, is not read
        // again: the sums from round 0 stand for it.
        f.write_all_at(&[1; 8], (u64::from(REGION_PAGES) + 2) * PAGE_SIZE as u64)
            .unwrap();
        assert_eq!(scanner.digests().unwrap(), digests);
        // In a stale region it is.
        f.write_all_at(&[1; 8], 2 * PAGE_SIZE as u64).unwrap();
        let mut now = final_bytes;
        now[2 * PAGE_SIZE..2 * PAGE_SIZE + 8].fill(1);
        assert_eq!(scanner.digests().unwrap(), [ferry_guest::ram::digest(&now)]);
        assert_ne!(scanner.digests().unwrap(), digests);
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
        let mut sums = RegionSums::new(3);
        let batch = scan_batch(0, 0, "mem", &ram, &[0, 1, 2], &mut sums, Pass::First);
        assert_eq!(batch.zero_pages, 1);
        assert_eq!(
            sums.finish(&ram, std::iter::empty()).to_hex(),
            ferry_guest::ram::digest(&bytes)
        );
        assert_eq!(batch.pages, [1, 2]);
        // One record: be64 offset|ZERO, the counted name, fill byte 0.
        let mut want = (ferry_proto::stream::ram_flag::ZERO).to_be_bytes().to_vec();
        want.extend_from_slice(b"\x03mem\x00");
        assert_eq!(batch.zero_records, want);
    }
}
