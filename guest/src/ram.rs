//! Guest RAM files: opened, checked and mapped.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use ferry_proto::stream::{RamBlockInfo, PAGE_SIZE};
use serde::{Deserialize, Serialize};
use vm_memory::{MmapRegion, VolatileMemory, VolatileSlice};

/// A RAM block of the source: its name, file and length.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockFile {
    /// Name in the stream.
    pub name: String,
    /// Backing file.
    pub path: PathBuf,
    /// Length in bytes (a whole number of pages).
    pub length: u64,
}

impl BlockFile {
    /// The block as the MEM_SIZE record announces it.
    pub fn info(&self) -> RamBlockInfo {
        RamBlockInfo {
            idstr: self.name.clone(),
            length: self.length,
        }
    }

    /// Pages in the block.
    pub fn pages(&self) -> u64 {
        self.length / PAGE_SIZE as u64
    }
}

/// A RAM file that cannot serve as a block.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// It cannot be opened, or its length read.
    #[error("RAM file {path} cannot be read")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// It cannot be mapped.
    #[error(transparent)]
    Map(#[from] crate::MapError),
    /// It is empty or not a whole number of pages.
    #[error("RAM file {path} is {length} bytes, not a non-zero multiple of {PAGE_SIZE}")]
    BadSize {
        /// The file.
        path: PathBuf,
        /// Its length.
        length: u64,
    },
    /// Two blocks share a name.
    #[error("two RAM files are both named {0:?} (use PATH,name=BLOCK)")]
    DuplicateName(String),
}

/// Checks the source's RAM files, given as (block name, file) pairs, and
/// describes them.
pub fn source_blocks<'a>(
    specs: impl IntoIterator<Item = (&'a str, &'a Path)>,
) -> Result<Vec<BlockFile>, Error> {
    let mut out: Vec<BlockFile> = Vec::new();
    for (name, path) in specs {
        let file = File::open(path).map_err(|source| Error::Open {
            path: path.to_owned(),
            source,
        })?;
        let length = file
            .metadata()
            .map_err(|source| Error::Open {
                path: path.to_owned(),
                source,
            })?
            .len();
        if length == 0 || length % PAGE_SIZE as u64 != 0 {
            return Err(Error::BadSize {
                path: path.to_owned(),
                length,
            });
        }
        if out.iter().any(|b| b.name == name) {
            return Err(Error::DuplicateName(name.to_owned()));
        }
        out.push(BlockFile {
            name: name.to_owned(),
            path: path.to_owned(),
            length,
        });
    }
    Ok(out)
}

/// A RAM file mapped read-only and shared with the guest, which keeps
/// writing it while ferry reads.
///
/// No Rust reference ever spans the mapping: bytes leave it only through
/// vm-memory's volatile slices, into private buffers (or as a volatile scan),
/// so a page that changes under a read is a stale copy, which the dirty log
/// resends, never undefined behaviour.
pub struct GuestRam {
    region: MmapRegion,
}

impl std::fmt::Debug for GuestRam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestRam")
            .field("len", &self.region.size())
            .finish_non_exhaustive()
    }
}

impl GuestRam {
    /// Maps the whole RAM file at `path` read-only.
    pub fn map(path: &Path) -> Result<Self, Error> {
        let err = |source| Error::Open {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(err)?;
        let len = file.metadata().map_err(err)?.len();
        // A guest that truncates its RAM file under us makes reads fault
        // (SIGBUS): the contract of every VMM's RAM file, as for the guest.
        let region = crate::map_shared(path, file, len, libc::PROT_READ)?;
        Ok(Self { region })
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.region.size() as u64
    }

    /// True for an empty mapping (never: an empty file does not map).
    pub fn is_empty(&self) -> bool {
        self.region.size() == 0
    }

    /// Page `index`, for volatile access, if the mapping has it.
    pub fn page(&self, index: u32) -> Option<VolatileSlice<'_>> {
        self.region
            .get_slice(index as usize * PAGE_SIZE, PAGE_SIZE)
            .ok()
    }

    /// Pages `first..first + count`, for volatile access (or a writev
    /// straight from the mapping), if the mapping has them all.
    pub fn pages(&self, first: u32, count: u32) -> Option<VolatileSlice<'_>> {
        self.region
            .get_slice(first as usize * PAGE_SIZE, count as usize * PAGE_SIZE)
            .ok()
    }

    /// Copies page `index` into `buf` and returns it, if the mapping has it:
    /// the copy holds still while compressors, hashes and sockets read it.
    pub fn read_page<'b>(
        &self,
        index: u32,
        buf: &'b mut [u8; PAGE_SIZE],
    ) -> Option<&'b [u8; PAGE_SIZE]> {
        self.page(index)?.copy_to(&mut buf[..]);
        Some(buf)
    }

    /// The fill byte of page `index` if it is one byte repeated (most often
    /// zero), read in place with volatile loads: the scanner looks at every
    /// page and copies none.
    pub fn page_fill(&self, index: u32) -> Option<u8> {
        let page = self.page(index)?;
        let words = page.get_array_ref::<u64>(0, PAGE_SIZE / 8).ok()?;
        let first = words.load(0);
        // One byte repeated in every lane of the first word, or no fill.
        if first != u64::from_ne_bytes([first as u8; 8]) {
            return None;
        }
        // Eight words at a time: a page that is not uniform differs early.
        for block in 0..PAGE_SIZE / 64 {
            let differs = (0..8).fold(0, |acc, w| acc | (words.load(block * 8 + w) ^ first));
            if differs != 0 {
                return None;
            }
        }
        Some(first as u8)
    }

    /// [`digest`] of the mapped block, hashed from private copies.
    pub fn digest(&self) -> String {
        self.digest_ranges(std::iter::once(0..self.len()))
    }

    /// [`digest`] of the mapped block whose data lies in `ranges` (ascending,
    /// page aligned, e.g. the data [`Extents`]); the rest is known to be zero
    /// and is not touched, so a sparse file's holes stay unallocated.
    pub fn digest_ranges(&self, ranges: impl IntoIterator<Item = std::ops::Range<u64>>) -> String {
        self.sum_ranges(ranges).to_hex()
    }

    /// The [`PageDigest`] sum of the pages in `ranges` (byte ranges, page
    /// aligned), hashed from private copies; pages past the end count nothing.
    pub fn sum_ranges(&self, ranges: impl IntoIterator<Item = std::ops::Range<u64>>) -> PageDigest {
        let mut d = PageDigest::default();
        let mut buf = [0u8; PAGE_SIZE];
        let page = PAGE_SIZE as u64;
        for range in ranges {
            for index in range.start / page..range.end.min(self.len()).div_ceil(page) {
                if let Some(bytes) = self.read_page(index as u32, &mut buf) {
                    d.add(index, bytes);
                }
            }
        }
        d
    }
}

/// A run of a RAM file: bytes `range` (page aligned) that hold data, or a
/// hole that reads zero without being allocated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extent {
    /// Byte range in the file, page aligned.
    pub range: std::ops::Range<u64>,
    /// True for data, false for a hole.
    pub data: bool,
}

/// The data and the holes of a RAM file, in file order, found with
/// `lseek(SEEK_DATA/SEEK_HOLE)` as QEMU's `bdrv_co_block_status` does for
/// files: reading a hole through a shared mapping of tmpfs would allocate
/// it, so a sender skips holes and sends them as zero pages.
///
/// A file system without hole reporting answers with one data extent. The
/// answer is a snapshot: a guest that writes into a hole afterwards marks
/// the page in its dirty log, and the next round sends it.
#[derive(Debug)]
pub struct Extents {
    file: File,
    path: PathBuf,
    /// Where the next extent starts.
    at: u64,
    /// Where the walk ends.
    end: u64,
    /// The file's counted length.
    len: u64,
}

/// The extents of the RAM file at `path`, whose first `len` bytes count.
///
/// # Errors
/// [`Error::Open`] when the file cannot be opened.
pub fn extents(path: &Path, len: u64) -> Result<Extents, Error> {
    let file = File::open(path).map_err(|source| Error::Open {
        path: path.to_owned(),
        source,
    })?;
    Ok(Extents {
        file,
        path: path.to_owned(),
        at: 0,
        end: len,
        len,
    })
}

impl Extents {
    /// Walks `range` next (clamped to the file's counted length): the
    /// extents that overlap it, cut to it.
    pub fn within(&mut self, range: std::ops::Range<u64>) -> &mut Self {
        self.at = range.start;
        self.end = range.end.min(self.len);
        self
    }

    /// `lseek(whence)` from `at`: `Ok(None)` when there is no such offset
    /// before the end (ENXIO).
    fn seek(&self, at: u64, whence: i32) -> io::Result<Option<u64>> {
        use std::os::fd::AsRawFd;
        let at = libc::off_t::try_from(at).map_err(|_| io::ErrorKind::InvalidInput)?;
        // SAFETY: lseek on a descriptor this struct owns; it moves only the
        // file offset, which nothing else here uses.
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), at, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        }
    }

    /// The extent starting at `self.at`.
    fn next_extent(&self) -> io::Result<Extent> {
        let page = PAGE_SIZE as u64;
        let (at, len) = (self.at, self.end);
        let data = match self.seek(at, libc::SEEK_DATA) {
            Ok(d) => d.unwrap_or(len).min(len),
            // No hole reporting here: all data.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => at,
            Err(e) => return Err(e),
        };
        // A hole ends at a page boundary at or before the data.
        let hole_end = data / page * page;
        if hole_end > at {
            return Ok(Extent {
                range: at..hole_end,
                data: false,
            });
        }
        let hole = match self.seek(at, libc::SEEK_HOLE) {
            Ok(h) => h.unwrap_or(len).min(len),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => len,
            Err(e) => return Err(e),
        };
        // Data runs to the page boundary at or after the hole.
        let end = hole
            .div_ceil(page)
            .saturating_mul(page)
            .max(at + page)
            .min(len);
        Ok(Extent {
            range: at..end,
            data: true,
        })
    }
}

impl Iterator for Extents {
    type Item = Result<Extent, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.at >= self.end {
            return None;
        }
        match self.next_extent() {
            Ok(e) => {
                self.at = e.range.end;
                Some(Ok(e))
            }
            Err(source) => {
                self.at = self.end;
                Some(Err(Error::Open {
                    path: self.path.clone(),
                    source,
                }))
            }
        }
    }
}

/// The digest both ends compute over a RAM block, in hex: the sum, modulo
/// 2^128, of every non-zero page's [`PageDigest`].
///
/// Zero pages are left out so that the cost follows the memory a block holds,
/// not the size it claims: a destination skips the holes of its sparse files
/// without reading them, and a hostile stream that announces terabytes costs
/// nothing to verify.
pub fn digest(bytes: &[u8]) -> String {
    let mut d = PageDigest::default();
    d.add_pages(0, bytes);
    d.to_hex()
}

/// A running RAM digest: the sum, modulo 2^128, of XXH3-128 (seeded with the
/// page's index in its block) over every page that is not all zero.
///
/// A sum rather than one hash over the block in order, so that it does not
/// depend on the order pages are seen in: a sender adds each page while it
/// scans it for zero, a receiver while it writes it, in whatever order its
/// channels deliver, and a page sent again is taken out
/// ([`PageDigest::remove`]) with its old contents and added with its new ones.
/// It guards against corruption and lost or misplaced pages, not against an
/// adversary (TLS does that).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PageDigest(u128);

impl PageDigest {
    /// What page `index` with contents `page` adds: 0 for an all-zero page.
    pub fn of_page(index: u64, page: &[u8]) -> Self {
        if ferry_proto::stream::encode::is_zero(page) {
            Self(0)
        } else {
            Self(xxhash_rust::xxh3::xxh3_128_with_seed(page, index))
        }
    }

    /// Adds page `index` with contents `page`.
    pub fn add(&mut self, index: u64, page: &[u8]) {
        *self += Self::of_page(index, page);
    }

    /// Takes out page `index` with contents `page`, added before.
    pub fn remove(&mut self, index: u64, page: &[u8]) {
        self.0 = self.0.wrapping_sub(Self::of_page(index, page).0);
    }

    /// Adds the pages of `bytes`, which starts at page `first`.
    pub fn add_pages(&mut self, first: u64, bytes: &[u8]) {
        for (i, page) in bytes.chunks(PAGE_SIZE).enumerate() {
            self.add(first + i as u64, page);
        }
    }

    /// The digest as ferry reports it: 32 hex digits.
    pub fn to_hex(self) -> String {
        format!("{:032x}", self.0)
    }
}

impl std::ops::AddAssign for PageDigest {
    fn add_assign(&mut self, other: Self) {
        self.0 = self.0.wrapping_add(other.0);
    }
}

impl std::iter::Sum for PageDigest {
    fn sum<I: Iterator<Item = Self>>(iter: I) -> Self {
        iter.fold(Self::default(), |mut a, b| {
            a += b;
            a
        })
    }
}

/// [`digest`] of a RAM file whose data lies in `ranges` (ascending, page
/// aligned); the rest is known to be zero and is not read.
///
/// Reads with pread into one buffer: on tmpfs that costs half of what
/// faulting in a new mapping of the file would, and the holes of a sparse
/// file read as zero without being allocated.
pub fn digest_file(
    path: &Path,
    ranges: impl IntoIterator<Item = std::ops::Range<u64>>,
) -> Result<String, Error> {
    file_page_digest(path, ranges).map(PageDigest::to_hex)
}

/// The [`PageDigest`] sum of the pages of the RAM file at `path` that lie in
/// `ranges` (ascending, page aligned), read with pread as [`digest_file`]
/// does: a receiver adds it for the pages of an existing file that the
/// stream never overwrote.
///
/// # Errors
/// [`Error::Open`] when the file cannot be opened or read.
pub fn file_page_digest(
    path: &Path,
    ranges: impl IntoIterator<Item = std::ops::Range<u64>>,
) -> Result<PageDigest, Error> {
    use std::os::unix::fs::FileExt;
    let err = |source| Error::Open {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(err)?;
    let mut buf = vec![0u8; 256 * PAGE_SIZE];
    let mut d = PageDigest::default();
    for range in ranges {
        let mut at = range.start;
        while at < range.end {
            let n = (range.end - at).min(buf.len() as u64) as usize;
            file.read_exact_at(&mut buf[..n], at).map_err(err)?;
            d.add_pages(at / PAGE_SIZE as u64, &buf[..n]);
            at += n as u64;
        }
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_digest_does_not_depend_on_order_and_takes_pages_out() {
        let mut bytes = vec![0u8; 8 * PAGE_SIZE];
        for (i, b) in bytes.iter_mut().enumerate() {
            if (i / PAGE_SIZE) % 3 != 0 {
                *b = (i * 7 % 251) as u8;
            }
        }
        let pages: Vec<&[u8]> = bytes.chunks(PAGE_SIZE).collect();
        let mut backwards = PageDigest::default();
        for (i, page) in pages.iter().enumerate().rev() {
            backwards.add(i as u64, page);
        }
        assert_eq!(backwards.to_hex(), digest(&bytes));
        // Page 4 sent again with other contents: out with the old, in with the new.
        let mut changed = bytes.clone();
        changed[4 * PAGE_SIZE..5 * PAGE_SIZE].fill(9);
        backwards.remove(4, pages[4]);
        backwards.add(4, &changed[4 * PAGE_SIZE..5 * PAGE_SIZE]);
        assert_eq!(backwards.to_hex(), digest(&changed));
        assert_ne!(digest(&changed), digest(&bytes));
        // The same page at another index counts differently.
        let mut moved = vec![0u8; 8 * PAGE_SIZE];
        moved[..PAGE_SIZE].copy_from_slice(pages[1]);
        let mut at_one = vec![0u8; 8 * PAGE_SIZE];
        at_one[PAGE_SIZE..2 * PAGE_SIZE].copy_from_slice(pages[1]);
        assert_ne!(digest(&moved), digest(&at_one));
    }

    #[test]
    fn sparse_digest_equals_the_plain_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sparse.ram");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.set_len(8 << 20).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(&[7u8; 4096], 3 << 20).unwrap();
        f.write_all_at(&[9u8; 100], (8 << 20) - 100).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(
            digest_file(&path, std::iter::once(0..8 << 20)).unwrap(),
            digest(&bytes)
        );
        // Ranges that leave out only zero pages give the same digest.
        assert_eq!(
            digest_file(&path, [2 << 20..4 << 20, 6 << 20..8 << 20]).unwrap(),
            digest(&bytes)
        );
        assert_ne!(
            digest_file(&path, std::iter::once(0..2 << 20)).unwrap(),
            digest(&bytes)
        );
    }

    /// A sparse 64 MiB file in `dir` with a few bytes of data at each of
    /// `at`; returns its path and length.
    fn sparse_file(dir: &Path, at: &[u64]) -> (PathBuf, u64) {
        use std::os::unix::fs::FileExt;
        let path = dir.join("sparse.ram");
        let f = std::fs::File::create(&path).unwrap();
        let len = 64 << 20;
        f.set_len(len).unwrap();
        for &a in at {
            f.write_all_at(&[7u8; 10][..(len - a).min(10) as usize], a)
                .unwrap();
        }
        (path, len)
    }

    #[test]
    fn extents_find_the_data_of_a_sparse_file_and_cover_it_all() {
        let dir = tempfile::tempdir().unwrap();
        let (path, len) = sparse_file(dir.path(), &[5 << 20, (64 << 20) - 1]);
        let got: Vec<Extent> = extents(&path, len).unwrap().map(Result::unwrap).collect();
        // Contiguous, page aligned, covering the file.
        assert_eq!(got.first().unwrap().range.start, 0);
        assert_eq!(got.last().unwrap().range.end, len);
        for w in got.windows(2) {
            assert_eq!(w[0].range.end, w[1].range.start);
        }
        let data = |at: u64| {
            got.iter()
                .find(|e| e.range.contains(&at))
                .is_some_and(|e| e.data)
        };
        assert!(data(5 << 20) && data(len - 1), "{got:?}");
        let data_bytes: u64 = got
            .iter()
            .filter(|e| e.data)
            .map(|e| e.range.end - e.range.start)
            .sum();
        // The directory may be on a file system without hole reporting: then
        // it is all data, and that is a correct answer too.
        if data_bytes < len {
            assert!(!data(0) && !data(32 << 20), "{got:?}");
        }
        let ram = GuestRam::map(&path).unwrap();
        let ranges = got.iter().filter(|e| e.data).map(|e| e.range.clone());
        assert_eq!(ram.digest_ranges(ranges), ram.digest());
    }

    #[test]
    fn extents_within_a_range_cover_that_range_alone() {
        let dir = tempfile::tempdir().unwrap();
        let (path, len) = sparse_file(dir.path(), &[5 << 20, 40 << 20]);
        let mut all = extents(&path, len).unwrap();
        let range = (4 << 20)..(8 << 20);
        let got: Vec<Extent> = all.within(range.clone()).map(Result::unwrap).collect();
        assert_eq!(got.first().unwrap().range.start, range.start, "{got:?}");
        assert_eq!(got.last().unwrap().range.end, range.end, "{got:?}");
        for w in got.windows(2) {
            assert_eq!(w[0].range.end, w[1].range.start);
        }
        assert!(got.iter().any(|e| e.data && e.range.contains(&(5 << 20))));
        // The same walker goes on to another range, and past the end is cut.
        let tail: Vec<Extent> = all
            .within((60 << 20)..(len + (1 << 20)))
            .map(Result::unwrap)
            .collect();
        assert_eq!(tail.last().unwrap().range.end, len, "{tail:?}");
        assert_eq!(all.within(0..0).count(), 0);
    }

    #[test]
    fn guest_ram_is_read_through_private_copies_and_volatile_scans() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("guest.ram");
        let mut bytes = vec![0u8; 4 * PAGE_SIZE];
        bytes[PAGE_SIZE..2 * PAGE_SIZE].fill(0x5a);
        bytes[2 * PAGE_SIZE + 17] = 1;
        bytes[4 * PAGE_SIZE - 1] = 3;
        std::fs::write(&path, &bytes).unwrap();
        let ram = GuestRam::map(&path).unwrap();
        assert_eq!(ram.len(), bytes.len() as u64);
        let fills: Vec<_> = (0..4).map(|i| ram.page_fill(i)).collect();
        assert_eq!(fills, [Some(0), Some(0x5a), None, None]);
        assert_eq!(ram.page_fill(4), None, "past the end");
        let mut buf = [0u8; PAGE_SIZE];
        assert_eq!(
            ram.read_page(2, &mut buf).unwrap()[..],
            bytes[2 * PAGE_SIZE..3 * PAGE_SIZE]
        );
        assert!(ram.read_page(4, &mut buf).is_none());
        assert_eq!(ram.digest(), digest(&bytes));
        // The guest writes on: the mapping sees it.
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&[0x5a], PAGE_SIZE as u64 + 100).unwrap();
        file.write_all_at(&[9], 100).unwrap();
        assert_eq!(ram.page_fill(1), Some(0x5a));
        assert_eq!(ram.page_fill(0), None);
    }
}
