//! Applying RAM records to guest memory backed by files.
//!
//! Each RAM block is a file of the block's length, so what the loader writes
//! is what a VMM (or `cmp`) sees. Files are created sparse: a block the stream
//! announces costs disk and memory only for pages it sends. Pages go in with
//! pwrite, neighbours gathered into one call: on tmpfs that skips the page
//! fault and the zeroing a store through a mapping costs per new page, and a
//! full file system is an error (ENOSPC) instead of a SIGBUS. Measured
//! against a shared mapping for the multifd threads (issue 12, 1 GiB, two
//! channels): a copy into the mapping, with or without `MADV_POPULATE_WRITE`,
//! or a read from the socket straight into it, each cost the receiver
//! 0.1-0.15 CPU s more than pwrite, which pays for its inode lock less than a
//! mapping pays tmpfs for clearing every page it faults in.
//!
//! Every thread that writes pages keeps the [`crate::ram::PageDigest`] of
//! what it wrote ([`LoadedBlock::digest`]), so the digest needs no read-back.
//!
//! A file that refuses write(2) (hugetlbfs) is mapped instead, and from then
//! on used only through that mapping, with volatile copies: the file is never
//! written two ways at once.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use flate2::Decompress;
use vm_memory::{MmapRegion, VolatileMemory, VolatileSlice};

use ferry_proto::compress;
use ferry_proto::stream::parse::RamRecord;
use ferry_proto::stream::{xbzrle, RamBlockInfo, PAGE_SIZE};

use crate::ram::{self as guest_ram, PageDigest};

/// Errors of loading RAM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A RAM file could not be created or sized.
    #[error("RAM file {path} cannot be prepared")]
    File {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// It cannot be mapped.
    #[error(transparent)]
    Map(#[from] crate::MapError),
    /// A RAM file has another size than the block the stream announces.
    #[error("RAM file {path} is {actual} bytes but block {idstr:?} is {expected}")]
    SizeMismatch {
        /// The file.
        path: PathBuf,
        /// The block.
        idstr: String,
        /// The block's length.
        expected: u64,
        /// The file's length.
        actual: u64,
    },
    /// The stream announces a block the destination has no file for.
    #[error("stream has RAM block {0:?}, which the destination does not have")]
    UnknownBlock(String),
    /// A compressed page does not inflate to one page.
    #[error("at byte {offset}: compressed page cannot be inflated")]
    Inflate {
        /// Offset of the record.
        offset: u64,
        /// Why.
        #[source]
        source: compress::Error,
    },
    /// An XBZRLE delta does not apply.
    #[error("at byte {offset}: XBZRLE page cannot be decoded")]
    Xbzrle {
        /// Offset of the record.
        offset: u64,
        /// Why.
        #[source]
        source: xbzrle::Error,
    },
    /// Two blocks would be extracted to the same file.
    #[error("RAM blocks {a:?} and {b:?} would both be written to {file}")]
    NameCollision {
        /// The file name.
        file: String,
        /// One block.
        a: String,
        /// The other.
        b: String,
    },
    /// A page record arrived before the block list.
    #[error("RAM page arrived before the block list")]
    NoBlocks,
    /// A page that is not a whole, aligned page inside its block (the parser
    /// checks this; a caller that skips it gets this instead of a longer file).
    #[error("page at {offset:#x} is not a whole page inside RAM block {idstr:?}")]
    BadPage {
        /// The block.
        idstr: String,
        /// Offset of the page in the block.
        offset: u64,
    },
    /// Reading a page back from a RAM file failed.
    #[error("cannot read RAM file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// Writing pages to a RAM file failed.
    #[error("cannot write RAM file {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// The pages an existing RAM file kept (the stream never sent them)
    /// cannot be read for the block's digest.
    #[error("cannot read the pages the stream left in place, for the digest")]
    Digest(#[source] guest_ram::Error),
    /// Writing the pages back to storage failed.
    #[error("RAM file {path} cannot be synced")]
    Sync {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
}

/// Result of loading.
pub type Result<T> = std::result::Result<T, Error>;

/// Pages received so far, of every kind (a zero page too): one bit a page,
/// as QEMU's `receivedmap` (migration/ram.c), kept for every block so a
/// stream that never sends some pages is seen ([`LoadedBlock::received`]).
/// In a fresh file an unset bit is also a hole that reads zero. An anonymous
/// mapping whose memory the kernel allocates only where a bit is first set,
/// so the cost follows what the stream sends (at most 32 MiB for a 1 TiB
/// block sent in full), never what it claims. Shared, lock-free, with the
/// threads that write multifd pages ([`SharedPages`]).
#[derive(Clone, Default)]
struct Received(Option<Arc<MmapRegion>>);

impl std::fmt::Debug for Received {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Received").finish_non_exhaustive()
    }
}

impl Received {
    /// A clean bitmap for a block of `length` bytes.
    fn new(path: &Path, length: u64) -> Result<Self> {
        let words = (length / PAGE_SIZE as u64).div_ceil(64).max(1) as usize;
        let map = MmapRegion::new(words * 8).map_err(|source| crate::MapError {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self(Some(Arc::new(map))))
    }

    /// The word holding page `page`'s bit, if the bitmap covers it.
    fn word(&self, page: u64) -> Option<&AtomicU64> {
        let map = self.0.as_ref()?;
        map.get_atomic_ref::<AtomicU64>(usize::try_from(page / 64).ok()? * 8)
            .ok()
    }

    /// Pages the bitmap covers.
    fn pages(&self) -> u64 {
        self.0.as_ref().map_or(0, |m| m.size() as u64 * 8)
    }

    /// The first page in `from..end` whose bit is `set`, or `end`.
    fn find(&self, from: u64, end: u64, set: bool) -> u64 {
        let mut page = from;
        while page < end {
            let Some(w) = self.word(page) else { return end };
            let w = w.load(Ordering::Acquire);
            let bits = if set { w } else { !w } & (u64::MAX << (page % 64));
            if bits != 0 {
                return (page / 64 * 64 + u64::from(bits.trailing_zeros())).min(end);
            }
            page = (page / 64 + 1) * 64;
        }
        end
    }

    /// How many of the first `pages` pages were received.
    fn count(&self, pages: u64) -> u64 {
        let mut n = 0;
        let mut page = 0;
        while page < pages {
            let Some(w) = self.word(page) else { break };
            let left = pages - page;
            let mask = if left >= 64 {
                u64::MAX
            } else {
                (1 << left) - 1
            };
            n += u64::from((w.load(Ordering::Acquire) & mask).count_ones());
            page += 64;
        }
        n
    }

    /// The runs of the first `pages` pages whose bit is `set` (received or
    /// not), as ascending byte ranges.
    fn runs(&self, set: bool, pages: u64) -> impl Iterator<Item = std::ops::Range<u64>> + '_ {
        let end = pages.min(self.pages());
        let mut page = 0;
        std::iter::from_fn(move || {
            let start = self.find(page, end, set);
            if start >= end {
                return None;
            }
            page = self.find(start, end, !set);
            Some(start * PAGE_SIZE as u64..page * PAGE_SIZE as u64)
        })
    }
}

/// Marks the page at `offset` received.
fn mark(received: &Received, offset: u64) {
    let page = offset / PAGE_SIZE as u64;
    if let Some(w) = received.word(page) {
        w.fetch_or(1 << (page % 64), Ordering::AcqRel);
    }
}

/// True when the page at `offset` was never marked received.
fn unmarked(received: &Received, offset: u64) -> bool {
    let page = offset / PAGE_SIZE as u64;
    received
        .word(page)
        .is_none_or(|w| w.load(Ordering::Acquire) & (1 << (page % 64)) == 0)
}

struct Block {
    info: RamBlockInfo,
    path: PathBuf,
    file: Arc<File>,
    /// Pages go in with pwrite and come back with pread, except in a file
    /// on huge pages ([`wants_mapping`]) or one that refuses write(2): that
    /// is mapped, and used only through the mapping (by the multifd
    /// threads too).
    map: Option<Arc<MmapRegion>>,
    /// The file was created here, so every page not yet written reads zero.
    fresh: bool,
    /// Pages received so far.
    received: Received,
    /// The [`PageDigest`] of the pages this thread wrote, old contents of
    /// pages written again taken out.
    digest: PageDigest,
    /// Where a fresh file goes once the stream verified ([`RamImage::commit`]);
    /// until then it lives at `path`, a temporary name beside it.
    destination: Option<PathBuf>,
}

impl Drop for Block {
    fn drop(&mut self) {
        // A file created for a load that never verified is not a guest's.
        if self.destination.is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl Block {
    /// `len` bytes at `at` in the mapping, if the file is used through one.
    fn mapped_page(&self, at: u64, len: usize) -> Option<VolatileSlice<'_>> {
        mapped(self.map.as_deref(), at, len)
    }

    /// Maps the file, for good: it lives on huge pages or refuses write(2).
    fn map(&mut self) -> Result<()> {
        let file = self.file.try_clone().map_err(|source| Error::File {
            path: self.path.clone(),
            source,
        })?;
        let map = crate::map_shared(
            &self.path,
            file,
            self.info.length,
            libc::PROT_READ | libc::PROT_WRITE,
        )?;
        self.map = Some(Arc::new(map));
        Ok(())
    }

    /// Records that the page at `offset` was received.
    fn mark_received(&self, offset: u64) {
        mark(&self.received, offset);
    }

    /// True when the page at `offset` of a fresh file was never received, so
    /// it reads zero without being touched (and allocated).
    fn untouched(&self, offset: u64) -> bool {
        self.fresh && unmarked(&self.received, offset)
    }
}

/// A block of a [`RamImage`], read back after loading.
#[derive(Debug)]
pub struct LoadedBlock<'a> {
    /// What the stream announced.
    pub info: &'a RamBlockInfo,
    /// The file behind it.
    pub path: &'a Path,
    received: Received,
    fresh: bool,
    /// What every writing thread added up.
    digest: PageDigest,
}

impl LoadedBlock<'_> {
    /// The block's length in pages.
    pub fn pages(&self) -> u64 {
        self.info.length / PAGE_SIZE as u64
    }

    /// How many of its pages the stream sent at least once, in a record of
    /// any kind (a zero page too). A complete precopy stream sends every page
    /// in its first pass; fewer means the pages left were never sent.
    pub fn received(&self) -> u64 {
        self.received.count(self.pages())
    }

    /// The byte ranges of the file that may hold data, ascending: for a file
    /// this load created, the runs of pages the stream sent (every other
    /// page is a hole that reads zero); for a file that existed before, all
    /// of it.
    pub fn data_ranges(&self) -> Vec<std::ops::Range<u64>> {
        self.data_runs().collect()
    }

    /// [`LoadedBlock::data_ranges`] one at a time, read from the bitmap as
    /// they are asked for: a fragmented 1 TiB block would need gigabytes to
    /// hold them all.
    pub fn data_runs(&self) -> Box<dyn Iterator<Item = std::ops::Range<u64>> + '_> {
        if self.fresh {
            Box::new(self.received.runs(true, self.pages()))
        } else {
            Box::new(std::iter::once(0..self.info.length))
        }
    }

    /// The block's [`crate::ram::digest`] (32 hex digits), from the sums the
    /// loader and the multifd threads kept while they wrote the pages, with
    /// the old contents of every page written again taken out: nothing is
    /// read back, except, in a file that existed before the load, the pages
    /// the stream never sent (none, for a complete precopy stream).
    ///
    /// # Errors
    /// [`Error::Digest`] when those pages cannot be read.
    pub fn digest(&self) -> Result<String> {
        let mut d = self.digest;
        if !self.fresh {
            let kept = self.received.runs(false, self.pages());
            d += guest_ram::file_page_digest(self.path, kept).map_err(Error::Digest)?;
        }
        Ok(d.to_hex())
    }
}

/// Most bytes gathered for one pwrite.
const RUN_BYTES: usize = 32 * PAGE_SIZE;

/// Whole pages waiting to be written to consecutive offsets of one block:
/// a stream often sends neighbouring pages one after another.
#[derive(Default)]
struct Run {
    block: usize,
    start: u64,
    bytes: Vec<u8>,
}

/// Guest RAM as a set of files, one per RAM block.
pub struct RamImage {
    blocks: Vec<Block>,
    /// Per block, the digest sums the multifd threads handed in as they ended.
    channel_digests: Arc<Mutex<Vec<PageDigest>>>,
    inflater: Decompress,
    /// Written before any page is read back, so the stream's order is kept.
    run: Run,
}

impl std::fmt::Debug for RamImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.blocks.iter().map(|b| (&b.info.idstr, &b.path)))
            .finish()
    }
}

/// The file name a block is extracted to: its idstr with `/` made safe.
pub fn block_file_name(idstr: &str) -> String {
    let name: String = idstr
        .trim_start_matches('/')
        .chars()
        .map(|c| if c == '/' { '_' } else { c })
        .collect();
    format!("{name}.ram")
}

/// The temporary name a new RAM file is written under, beside `path`, by
/// the process `pid`: whoever kills that process removes it.
pub fn partial_name(path: &Path, pid: u32) -> PathBuf {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    path.with_file_name(format!(".{name}.ferry-partial-{pid}"))
}

/// Removes the temporary files of earlier loads into `path` whose process
/// is gone ([`partial_name`] with a pid that /proc does not list): a
/// receiver killed with SIGKILL cannot remove its own, and on tmpfs each
/// holds guest RAM. A live process's file, or one whose pid was reused, is
/// left alone.
fn remove_orphaned_partials(path: &Path) {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else {
        return;
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let prefix = format!(".{}.ferry-partial-", name.to_string_lossy());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let file = entry.file_name();
        let Some(pid) = file
            .to_str()
            .and_then(|f| f.strip_prefix(&prefix))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new("/proc").join(pid.to_string()).exists()
            && std::fs::remove_file(entry.path()).is_ok()
        {
            tracing::info!(file = %entry.path().display(), pid, "removed an orphaned partial RAM file");
        }
    }
}

/// Maps a destination's RAM file; one it creates goes under a temporary
/// name until [`RamImage::commit`].
fn map_file(path: &Path, info: &RamBlockInfo, create: bool) -> Result<Block> {
    if create && !path.exists() {
        // Written under a temporary name: a failed load leaves no file a VMM
        // could take for a guest at the destination path.
        let temp = partial_name(path, std::process::id());
        let _ = std::fs::remove_file(&temp);
        remove_orphaned_partials(path);
        let mut block = map_at(&temp, info, true)?;
        block.destination = Some(path.to_owned());
        return Ok(block);
    }
    map_at(path, info, create)
}

fn map_at(path: &Path, info: &RamBlockInfo, create: bool) -> Result<Block> {
    let err = |source| Error::File {
        path: path.to_owned(),
        source,
    };
    // Only a file this call creates is sized: an existing file of another
    // size is a mismatch between the two ends, never silently resized.
    let exists = path.exists();
    let file: File = OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(false)
        .open(path)
        .map_err(err)?;
    let actual = file.metadata().map_err(err)?.len();
    if !exists && actual == 0 {
        file.set_len(info.length).map_err(err)?;
    } else if actual != info.length {
        return Err(Error::SizeMismatch {
            path: path.to_owned(),
            idstr: info.idstr.clone(),
            expected: info.length,
            actual,
        });
    }
    let mapped = wants_mapping(&file);
    let mut block = Block {
        info: info.clone(),
        path: path.to_owned(),
        file: Arc::new(file),
        map: None,
        fresh: !exists,
        received: Received::new(path, info.length)?,
        digest: PageDigest::default(),
        destination: None,
    };
    if mapped {
        block.map()?;
    }
    Ok(block)
}

/// `len` bytes at `at` of `map`, if the file is used through a mapping and
/// it has them.
fn mapped(map: Option<&MmapRegion>, at: u64, len: usize) -> Option<VolatileSlice<'_>> {
    map.and_then(|m| m.get_slice(at as usize, len).ok())
}

/// Whether pages go into `file` through a mapping rather than pwrite(2): on
/// a file system whose pages are huge (its block size says so: hugetlbfs,
/// tmpfs mounted `huge=`). hugetlbfs has no write(2) at all, and on a huge
/// tmpfs 4 KiB pwrites into a new file spend their time clearing huge
/// folios: `ferry receive` of 1 GiB spent 2.3 CPU-seconds in memset there
/// (perf) and took 1.98 s where QEMU 10, which receives into its mapping,
/// took 0.51 s. A mapping clears each huge page once, at its fault. On 4 KiB
/// pages pwrite stays: a mapping pays a fault and a page clear per page
/// there.
fn wants_mapping(file: &File) -> bool {
    use std::os::unix::fs::MetadataExt;
    file.metadata()
        .is_ok_and(|m| m.blksize() > PAGE_SIZE as u64)
}

impl RamImage {
    /// Creates `DIR/<idstr>.ram` for every block; the files must not exist yet.
    pub fn create_in_dir(dir: &Path, blocks: &[RamBlockInfo]) -> Result<Self> {
        let mut names: Vec<(String, &str)> = Vec::new();
        for b in blocks {
            let file = block_file_name(&b.idstr);
            // Two blocks in one file would truncate each other's mapping.
            if let Some((_, other)) = names.iter().find(|(f, _)| *f == file) {
                return Err(Error::NameCollision {
                    file,
                    a: (*other).to_owned(),
                    b: b.idstr.clone(),
                });
            }
            names.push((file, &b.idstr));
        }
        let blocks = blocks
            .iter()
            .zip(&names)
            .map(|(b, (file, _))| {
                // Extraction starts from zero: pages the stream never sends are zero.
                let path = dir.join(file);
                match std::fs::remove_file(&path) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => {
                        Err(Error::File { path, source: e })
                    }
                    _ => map_at(&path, b, true),
                }
            })
            .collect::<Result<_>>()?;
        Ok(Self::with_blocks(blocks))
    }

    /// Maps existing files for the announced blocks. `files` pairs block names
    /// with paths; every announced block needs one, of exactly its length, or
    /// is created at that length when `create` is set: under a temporary name
    /// beside its path, renamed by [`RamImage::commit`] and removed if the
    /// image is dropped uncommitted.
    pub fn open(
        files: &[(String, PathBuf)],
        blocks: &[RamBlockInfo],
        create: bool,
    ) -> Result<Self> {
        let blocks = blocks
            .iter()
            .map(|b| {
                let (_, path) = files
                    .iter()
                    .find(|(name, _)| *name == b.idstr)
                    .ok_or_else(|| Error::UnknownBlock(b.idstr.clone()))?;
                map_file(path, b, create)
            })
            .collect::<Result<_>>()?;
        Ok(Self::with_blocks(blocks))
    }

    fn with_blocks(blocks: Vec<Block>) -> Self {
        Self {
            channel_digests: Arc::new(Mutex::new(vec![PageDigest::default(); blocks.len()])),
            blocks,
            inflater: compress::decompressor(),
            run: Run::default(),
        }
    }

    /// Applies one record; `offset` is its place in the stream, for errors.
    pub fn apply(&mut self, record: &RamRecord<'_>, offset: u64) -> Result<()> {
        match *record {
            RamRecord::MemSize(_) | RamRecord::Eos | RamRecord::MultifdFlush => Ok(()),
            RamRecord::Zero {
                block,
                offset: at,
                fill,
            } => {
                let b = self.locate(block, at)?;
                // A zero page never received in a new file is already zero:
                // writing it would only allocate it.
                if fill == 0 && b.untouched(at) {
                    b.mark_received(at);
                    return Ok(());
                }
                let mut page = [fill; PAGE_SIZE];
                if fill == 0 {
                    self.read_page(block, at, &mut page)?;
                    if ferry_proto::stream::encode::is_zero(&page) {
                        self.blocks[block].mark_received(at);
                        return Ok(());
                    }
                    page.fill(0);
                }
                self.write_page(block, at, &page)
            }
            RamRecord::Page {
                block,
                offset: at,
                data,
            } => self.write_page(block, at, data),
            RamRecord::Compressed {
                block,
                offset: at,
                data,
            } => {
                let mut page = [0; PAGE_SIZE];
                compress::inflate_page(&mut self.inflater, data, &mut page)
                    .map_err(|source| Error::Inflate { offset, source })?;
                self.write_page(block, at, &page)
            }
            RamRecord::Xbzrle {
                block,
                offset: at,
                data,
            } => {
                let mut page = [0; PAGE_SIZE];
                self.read_page(block, at, &mut page)?;
                xbzrle::decode(data, &mut page)
                    .map_err(|source| Error::Xbzrle { offset, source })?;
                self.write_page(block, at, &page)
            }
        }
    }

    /// The block, if `at` is the offset of a whole page inside it.
    fn locate(&self, block: usize, at: u64) -> Result<&Block> {
        let b = self.blocks.get(block).ok_or(Error::NoBlocks)?;
        if at % PAGE_SIZE as u64 != 0
            || at
                .checked_add(PAGE_SIZE as u64)
                .is_none_or(|end| end > b.info.length)
        {
            return Err(Error::BadPage {
                idstr: b.info.idstr.clone(),
                offset: at,
            });
        }
        Ok(b)
    }

    /// Reads the page at `at` as it stands, pending writes included. A hole
    /// reads zero without being allocated.
    fn read_page(&mut self, block: usize, at: u64, page: &mut [u8; PAGE_SIZE]) -> Result<()> {
        self.write_run()?;
        let b = self.locate(block, at)?;
        if let Some(mapped) = b.mapped_page(at, PAGE_SIZE) {
            mapped.copy_to(&mut page[..]);
            return Ok(());
        }
        b.file
            .read_exact_at(page, at)
            .map_err(|source| Error::Read {
                path: b.path.clone(),
                source,
            })
    }

    /// Writes a whole page, gathered with its neighbours into one pwrite,
    /// and adds it to the block's digest; a page written before (a later
    /// round) is first taken out with the contents it had.
    fn write_page(&mut self, block: usize, at: u64, data: &[u8]) -> Result<()> {
        if data.len() != PAGE_SIZE {
            return Err(Error::BadPage {
                idstr: self.locate(block, at)?.info.idstr.clone(),
                offset: at,
            });
        }
        let index = at / PAGE_SIZE as u64;
        if !unmarked(&self.locate(block, at)?.received, at) {
            let mut old = [0u8; PAGE_SIZE];
            self.read_page(block, at, &mut old)?;
            self.blocks[block].digest.remove(index, &old);
        }
        self.blocks[block].digest.add(index, data);
        if let Some(mapped) = self.locate(block, at)?.mapped_page(at, PAGE_SIZE) {
            mapped.copy_from(data);
            self.blocks[block].mark_received(at);
            return Ok(());
        }
        let run = &self.run;
        if !run.bytes.is_empty()
            && (run.block != block
                || run.start + run.bytes.len() as u64 != at
                || run.bytes.len() == RUN_BYTES)
        {
            self.write_run()?;
        }
        if self.run.bytes.is_empty() {
            self.run.block = block;
            self.run.start = at;
        }
        self.run.bytes.extend_from_slice(data);
        self.blocks[block].mark_received(at);
        Ok(())
    }

    /// Writes the gathered run to its file.
    fn write_run(&mut self) -> Result<()> {
        if self.run.bytes.is_empty() {
            return Ok(());
        }
        let Run {
            block,
            start,
            ref bytes,
        } = self.run;
        let b = &mut self.blocks[block];
        match b.file.write_all_at(bytes, start) {
            Ok(()) => {}
            // hugetlbfs has no write(2): from here on, through the mapping.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::InvalidInput | io::ErrorKind::Unsupported
                ) =>
            {
                b.map()?;
                let mapped = b.mapped_page(start, bytes.len()).ok_or(Error::BadPage {
                    idstr: b.info.idstr.clone(),
                    offset: start,
                })?;
                mapped.copy_from(bytes);
            }
            Err(source) => {
                return Err(Error::Write {
                    path: b.path.clone(),
                    source,
                })
            }
        }
        self.run.bytes.clear();
        Ok(())
    }

    /// Writes the pages gathered so far to their files: at a multifd sync
    /// point, before other threads may write the same pages.
    ///
    /// # Errors
    /// [`Error::Write`].
    pub fn write_pending(&mut self) -> Result<()> {
        self.write_run()
    }

    /// A handle that writes pages from other threads (multifd channels),
    /// sharing this image's files and its record of received pages. Pending
    /// pages are written first.
    ///
    /// # Errors
    /// [`Error::Write`].
    pub fn shared_pages(&mut self) -> Result<SharedPages> {
        self.write_run()?;
        let blocks = self
            .blocks
            .iter()
            .map(|b| SharedBlock {
                info: b.info.clone(),
                path: b.path.clone(),
                file: Arc::clone(&b.file),
                map: b.map.clone(),
                fresh: b.fresh,
                received: b.received.clone(),
            })
            .collect();
        Ok(SharedPages {
            blocks,
            digests: Arc::clone(&self.channel_digests),
        })
    }

    /// The loaded blocks, for reading back: every page applied so far is
    /// written first.
    pub fn files(&mut self) -> Result<impl Iterator<Item = LoadedBlock<'_>>> {
        self.write_run()?;
        let channels = self
            .channel_digests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        Ok(self.blocks.iter().zip(channels).map(|(b, c)| {
            let mut digest = b.digest;
            digest += c;
            LoadedBlock {
                info: &b.info,
                path: &b.path,
                received: b.received.clone(),
                fresh: b.fresh,
                digest,
            }
        }))
    }

    /// Writes every page applied so far to the files.
    pub fn sync(&mut self) -> Result<()> {
        self.write_run()?;
        for b in &self.blocks {
            // For a mapped file too: on Linux msync(MS_SYNC) is this fsync.
            b.file.sync_data().map_err(|source| Error::Sync {
                path: b.path.clone(),
                source,
            })?;
        }
        Ok(())
    }
}

#[derive(Debug)]
struct SharedBlock {
    info: RamBlockInfo,
    path: PathBuf,
    file: Arc<File>,
    /// The image's mapping of the file, when it is used through one.
    map: Option<Arc<MmapRegion>>,
    fresh: bool,
    received: Received,
}

/// Pages written from threads beside the loader's (QEMU's multifd receive
/// threads write guest RAM directly, too). Each call writes through at once;
/// the caller orders calls with the stream's sync points, so a page is never
/// written by two threads between two of them.
#[derive(Debug, Clone)]
pub struct SharedPages {
    blocks: Arc<[SharedBlock]>,
    /// The [`RamImage`]'s sums of what the threads wrote, per block.
    digests: Arc<Mutex<Vec<PageDigest>>>,
}

impl SharedPages {
    /// The index of the block named `idstr`.
    pub fn block(&self, idstr: &str) -> Option<usize> {
        self.blocks.iter().position(|b| b.info.idstr == idstr)
    }

    /// The length of block `block`, in bytes.
    pub fn length(&self, block: usize) -> u64 {
        self.blocks[block].info.length
    }

    fn checked(&self, block: usize, offsets: &[u64]) -> Result<&SharedBlock> {
        let b = self.blocks.get(block).ok_or(Error::NoBlocks)?;
        match offsets.iter().find(|&&o| {
            o % PAGE_SIZE as u64 != 0
                || o.checked_add(PAGE_SIZE as u64)
                    .is_none_or(|end| end > b.info.length)
        }) {
            Some(&offset) => Err(Error::BadPage {
                idstr: b.info.idstr.clone(),
                offset,
            }),
            None => Ok(b),
        }
    }

    /// Writes `data`, one whole page per offset in `offsets` and in that
    /// order, to block `block`; neighbouring pages go in one pwrite. Returns
    /// what the pages change in the block's digest: each page added, and a
    /// page received before (a later round) taken out with its old contents,
    /// read back first. The caller sums these and hands the sum in with
    /// [`SharedPages::add_digests`].
    ///
    /// # Errors
    /// [`Error::BadPage`] for an offset outside the block or a `data` that is
    /// not one page per offset (checked before anything is written),
    /// [`Error::Read`] and [`Error::Write`].
    pub fn write_pages(&self, block: usize, offsets: &[u64], data: &[u8]) -> Result<PageDigest> {
        let b = self.checked(block, offsets)?;
        if data.len() != offsets.len() * PAGE_SIZE {
            return Err(Error::BadPage {
                idstr: b.info.idstr.clone(),
                offset: offsets.first().copied().unwrap_or(0),
            });
        }
        let mut delta = PageDigest::default();
        let mut i = 0;
        while i < offsets.len() {
            let mut n = 1;
            while i + n < offsets.len() && offsets[i + n] == offsets[i] + (n * PAGE_SIZE) as u64 {
                n += 1;
            }
            let run = &offsets[i..i + n];
            let bytes = &data[i * PAGE_SIZE..(i + n) * PAGE_SIZE];
            b.take_out_old(run, &mut delta)?;
            b.write_at(bytes, offsets[i])?;
            for (&o, page) in run.iter().zip(bytes.chunks_exact(PAGE_SIZE)) {
                mark(&b.received, o);
                delta.add(o / PAGE_SIZE as u64, page);
            }
            i += n;
        }
        Ok(delta)
    }

    /// Makes the pages at `offsets` of block `block` zero: a page of a fresh
    /// file that was never received already is, and stays a hole. Returns
    /// what that changes in the block's digest, as
    /// [`SharedPages::write_pages`] does.
    ///
    /// # Errors
    /// As [`SharedPages::write_pages`].
    pub fn zero_pages(&self, block: usize, offsets: &[u64]) -> Result<PageDigest> {
        let b = self.checked(block, offsets)?;
        const ZERO: [u8; PAGE_SIZE] = [0; PAGE_SIZE];
        let mut delta = PageDigest::default();
        for &o in offsets {
            let untouched = b.fresh && unmarked(&b.received, o);
            if untouched {
                mark(&b.received, o);
                continue;
            }
            b.take_out_old(&[o], &mut delta)?;
            b.write_at(&ZERO, o)?;
            mark(&b.received, o);
        }
        Ok(delta)
    }

    /// Adds a thread's digest sums, per block index (as returned by
    /// [`SharedPages::write_pages`] and [`SharedPages::zero_pages`], added
    /// up), to the image's: once, when the thread has written its last page.
    pub fn add_digests(&self, sums: &[PageDigest]) {
        let mut all = self.digests.lock().unwrap_or_else(PoisonError::into_inner);
        for (total, &sum) in all.iter_mut().zip(sums) {
            *total += sum;
        }
    }
}

impl SharedBlock {
    fn write_error(&self, source: io::Error) -> Error {
        Error::Write {
            path: self.path.clone(),
            source,
        }
    }

    /// Takes the pages at `offsets` that were received before out of
    /// `delta`, with the contents they have now.
    fn take_out_old(&self, offsets: &[u64], delta: &mut PageDigest) -> Result<()> {
        let mut old = [0u8; PAGE_SIZE];
        for &o in offsets.iter().filter(|&&o| !unmarked(&self.received, o)) {
            match mapped(self.map.as_deref(), o, PAGE_SIZE) {
                Some(mapped) => {
                    mapped.copy_to(&mut old[..]);
                }
                None => self
                    .file
                    .read_exact_at(&mut old, o)
                    .map_err(|source| Error::Read {
                        path: self.path.clone(),
                        source,
                    })?,
            };
            delta.remove(o / PAGE_SIZE as u64, &old);
        }
        Ok(())
    }

    /// Writes `bytes` at `at`, through the mapping if there is one.
    fn write_at(&self, bytes: &[u8], at: u64) -> Result<()> {
        match mapped(self.map.as_deref(), at, bytes.len()) {
            Some(mapped) => {
                mapped.copy_from(bytes);
                Ok(())
            }
            None => self
                .file
                .write_all_at(bytes, at)
                .map_err(|source| self.write_error(source)),
        }
    }
}

impl RamImage {
    /// Gives every file this image created its destination name: call it
    /// once the stream has loaded and verified. Files that existed before
    /// were written in place (and may hold a partial load after a failure).
    pub fn commit(&mut self) -> Result<()> {
        self.write_run()?;
        for b in &mut self.blocks {
            if let Some(dest) = b.destination.take() {
                std::fs::rename(&b.path, &dest).map_err(|source| Error::File {
                    path: dest.clone(),
                    source,
                })?;
                b.path = dest;
            }
        }
        Ok(())
    }
}

impl Drop for RamImage {
    fn drop(&mut self) {
        // A caller that never syncs (an extraction that stops early) still
        // finds every applied page in the files.
        let _ = self.write_run();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh image of one 4-page block "pc.ram", used through a mapping.
    fn mapped_image() -> (tempfile::TempDir, RamBlockInfo, RamImage) {
        let dir = tempfile::tempdir().unwrap();
        let info = RamBlockInfo {
            idstr: "pc.ram".into(),
            length: 4 * PAGE_SIZE as u64,
        };
        let mut image = RamImage::create_in_dir(dir.path(), std::slice::from_ref(&info)).unwrap();
        image.blocks[0].map().unwrap();
        (dir, info, image)
    }

    /// The path a file that refuses write(2) takes (hugetlbfs, which a test
    /// machine rarely has): pages go in and come back through the mapping.
    #[test]
    fn a_mapped_file_is_written_and_read_through_the_mapping() {
        let (dir, info, mut image) = mapped_image();
        let page = [7u8; PAGE_SIZE];
        let at = PAGE_SIZE as u64;
        let put = |image: &mut RamImage, record: RamRecord<'_>| image.apply(&record, 0).unwrap();
        put(
            &mut image,
            RamRecord::Page {
                block: 0,
                offset: at,
                data: &page,
            },
        );
        put(
            &mut image,
            RamRecord::Zero {
                block: 0,
                offset: 3 * at,
                fill: 9,
            },
        );
        // A zero record reads the page back first: it is not zero, so it is written.
        put(
            &mut image,
            RamRecord::Zero {
                block: 0,
                offset: at,
                fill: 0,
            },
        );
        put(
            &mut image,
            RamRecord::Page {
                block: 0,
                offset: 2 * at,
                data: &page,
            },
        );
        image.sync().unwrap();
        let path = dir.path().join(block_file_name(&info.idstr));
        let mut want = vec![0u8; 4 * PAGE_SIZE];
        want[2 * PAGE_SIZE..3 * PAGE_SIZE].fill(7);
        want[3 * PAGE_SIZE..].fill(9);
        assert_eq!(std::fs::read(path).unwrap(), want);
        assert!(image.blocks[0].map.is_some(), "the block left its mapping");
        // Page 1, written and then zeroed, was taken out of the digest.
        let digest = image.files().unwrap().next().unwrap().digest().unwrap();
        assert_eq!(digest, guest_ram::digest(&want));
    }

    /// A receiver killed with SIGKILL leaves its partial file behind; the
    /// next load into the same path removes it, and leaves a live
    /// process's and another destination's alone.
    #[test]
    fn orphaned_partial_files_of_the_same_destination_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("ram.ram");
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let orphan = partial_name(&dest, dead);
        let live = partial_name(&dest, 1);
        let other = partial_name(&dir.path().join("other.ram"), dead);
        for f in [&orphan, &live, &other] {
            std::fs::write(f, b"left behind").unwrap();
        }
        let info = RamBlockInfo {
            idstr: "ram".into(),
            length: PAGE_SIZE as u64,
        };
        let image = RamImage::open(&[("ram".to_owned(), dest)], &[info], true).unwrap();
        assert!(!orphan.exists(), "the dead process's partial file stayed");
        assert!(live.exists() && other.exists());
        drop(image);
    }

    /// The multifd threads of a mapped file (huge pages) write, rewrite and
    /// zero through the image's mapping, never pwrite: a file that refuses
    /// write(2) (hugetlbfs) loads, and the digest takes a rewritten page
    /// out with the contents the mapping held.
    #[test]
    fn multifd_threads_write_a_mapped_file_through_the_mapping() {
        let (dir, info, mut image) = mapped_image();
        let path = dir.path().join(block_file_name(&info.idstr));
        // From here write(2) on the file fails, as on hugetlbfs: a pwrite
        // would surface as an error.
        let read_only = File::open(&path).unwrap();
        image.blocks[0].file = Arc::new(read_only);
        let shared = image.shared_pages().unwrap();
        let at = |p: u64| p * PAGE_SIZE as u64;
        let mut sum = shared
            .write_pages(0, &[at(0), at(1)], &[5u8; 2 * PAGE_SIZE])
            .unwrap();
        sum += shared.write_pages(0, &[at(1)], &[6u8; PAGE_SIZE]).unwrap();
        sum += shared.zero_pages(0, &[at(0), at(3)]).unwrap();
        shared.add_digests(&[sum]);
        let mut want = vec![0u8; 4 * PAGE_SIZE];
        want[PAGE_SIZE..2 * PAGE_SIZE].fill(6);
        assert_eq!(std::fs::read(&path).unwrap(), want);
        let digest = image.files().unwrap().next().unwrap().digest().unwrap();
        assert_eq!(digest, guest_ram::digest(&want));
    }

    /// Every kind of page record counts as received, a zero page left as a
    /// hole and a multifd page too, in a fresh file as in an existing one;
    /// a page sent twice counts once.
    #[test]
    fn pages_received_are_counted_per_block_whatever_their_kind() {
        let dir = tempfile::tempdir().unwrap();
        let pages = 130u64;
        let info = |name: &str| RamBlockInfo {
            idstr: name.into(),
            length: pages * PAGE_SIZE as u64,
        };
        let existing = dir.path().join("old.ram");
        std::fs::write(&existing, vec![3u8; (pages as usize) * PAGE_SIZE]).unwrap();
        let files = [
            ("new".to_owned(), dir.path().join("new.ram")),
            ("old".to_owned(), existing),
        ];
        let mut image = RamImage::open(&files, &[info("new"), info("old")], true).unwrap();
        let page = [7u8; PAGE_SIZE];
        let at = |p: u64| p * PAGE_SIZE as u64;
        for block in 0..2 {
            let records = [
                RamRecord::Page {
                    block,
                    offset: at(0),
                    data: &page,
                },
                RamRecord::Page {
                    block,
                    offset: at(0),
                    data: &page,
                },
                RamRecord::Zero {
                    block,
                    offset: at(64),
                    fill: 0,
                },
                RamRecord::Zero {
                    block,
                    offset: at(129),
                    fill: 4,
                },
            ];
            for r in &records {
                image.apply(r, 0).unwrap();
            }
        }
        let shared = image.shared_pages().unwrap();
        shared
            .write_pages(1, &[at(5), at(6)], &[1u8; 2 * PAGE_SIZE])
            .unwrap();
        shared.zero_pages(0, &[at(7), at(0)]).unwrap();
        // An offset whose end wraps past 2^64 is outside the block too.
        let wraps = u64::MAX - (PAGE_SIZE as u64 - 1);
        for offsets in [[wraps], [pages * PAGE_SIZE as u64]] {
            assert!(matches!(
                shared.zero_pages(0, &offsets),
                Err(Error::BadPage { offset, .. }) if offset == offsets[0]
            ));
            assert!(matches!(
                shared.write_pages(0, &offsets, &[1u8; PAGE_SIZE]),
                Err(Error::BadPage { .. })
            ));
        }
        let got: Vec<(u64, u64)> = image
            .files()
            .unwrap()
            .map(|b| (b.pages(), b.received()))
            .collect();
        assert_eq!(got, [(pages, 4), (pages, 5)]);
    }

    /// The digest the writers keep equals the one read from the final file:
    /// pages written again (by the loader or a channel, raw or zero) are
    /// taken out with their old contents, and an existing file's pages that
    /// the stream never sent count with what they hold.
    #[test]
    fn the_kept_digest_equals_the_final_files() {
        let dir = tempfile::tempdir().unwrap();
        let pages = 70u64;
        let info = |name: &str| RamBlockInfo {
            idstr: name.into(),
            length: pages * PAGE_SIZE as u64,
        };
        let existing = dir.path().join("old.ram");
        let old: Vec<u8> = (0..pages as usize * PAGE_SIZE)
            .map(|i| (i / PAGE_SIZE % 5) as u8)
            .collect();
        std::fs::write(&existing, &old).unwrap();
        let files = [
            ("new".to_owned(), dir.path().join("new.ram")),
            ("old".to_owned(), existing),
        ];
        let mut image = RamImage::open(&files, &[info("new"), info("old")], true).unwrap();
        let at = |p: u64| p * PAGE_SIZE as u64;
        let page = |seed: u8| [seed; PAGE_SIZE];
        for block in 0..2 {
            // Round one on the main stream; page 3 twice in one run.
            for (p, seed) in [(2, 1), (3, 2), (3, 4), (4, 0), (9, 5)] {
                let data = page(seed);
                let r = RamRecord::Page {
                    block,
                    offset: at(p),
                    data: &data,
                };
                image.apply(&r, 0).unwrap();
            }
            let fill = RamRecord::Zero {
                block,
                offset: at(9),
                fill: 0,
            };
            image.apply(&fill, 0).unwrap();
        }
        // Later rounds on two channels, over pages the loader wrote.
        let shared = image.shared_pages().unwrap();
        // Per block, the sums of two channels.
        let mut one = [PageDigest::default(); 2];
        let mut two = [PageDigest::default(); 2];
        for block in 0..2 {
            one[block] += shared
                .write_pages(block, &[at(2), at(3), at(10)], &[6u8; 3 * PAGE_SIZE])
                .unwrap();
            two[block] += shared.zero_pages(block, &[at(3), at(11), at(1)]).unwrap();
            one[block] += shared
                .write_pages(block, &[at(11), at(20), at(11)], &[7u8; 3 * PAGE_SIZE])
                .unwrap();
        }
        shared.add_digests(&[one[0]]);
        shared.add_digests(&[two[0]]);
        // The main stream again, after the channels.
        let data = page(8);
        let r = RamRecord::Page {
            block: 0,
            offset: at(20),
            data: &data,
        };
        image.apply(&r, 0).unwrap();
        // Channel sums for block 1 were left out: its digest must differ.
        let got: Vec<(String, String)> = image
            .files()
            .unwrap()
            .map(|b| {
                let file = std::fs::read(b.path).unwrap();
                (b.digest().unwrap(), guest_ram::digest(&file))
            })
            .collect();
        assert_eq!(got[0].0, got[0].1);
        assert_ne!(got[1].0, got[1].1);
        shared.add_digests(&[PageDigest::default(), one[1]]);
        shared.add_digests(&[PageDigest::default(), two[1]]);
        for b in image.files().unwrap() {
            let file = std::fs::read(b.path).unwrap();
            assert_eq!(
                b.digest().unwrap(),
                guest_ram::digest(&file),
                "{}",
                b.info.idstr
            );
        }
    }
}
