//! The dirty log shared by a guest and ferry: one bit per page in a file of
//! little-endian u64 words (the vhost-user model).
//!
//! The guest sets bits with an atomic OR after writing a page; ferry takes
//! them with an atomic swap to zero, so a write that lands after the swap
//! shows up in the next round and is never lost.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use vm_memory::{MmapRegion, VolatileMemory};

/// Errors of opening a dirty log.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file cannot be opened or sized.
    #[error("dirty log {path} cannot be opened")]
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
    /// The file is too small for the guest's pages.
    #[error("dirty log {path} is {actual} bytes, {expected} are needed for {pages} pages")]
    TooSmall {
        /// The file.
        path: PathBuf,
        /// Its length.
        actual: u64,
        /// Bytes needed.
        expected: u64,
        /// Pages it must cover.
        pages: u64,
    },
}

/// A mapped dirty log covering `pages` pages.
///
/// The mapping is shared with the guest and only ever used through
/// vm-memory's atomic accessors, never as bytes.
pub struct DirtyLog {
    map: MmapRegion,
    pages: u64,
}

impl std::fmt::Debug for DirtyLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyLog")
            .field("pages", &self.pages)
            .finish()
    }
}

/// Bytes of a dirty log for `pages` pages.
pub fn log_bytes(pages: u64) -> u64 {
    pages.div_ceil(64) * 8
}

impl DirtyLog {
    /// Creates (or truncates) a clean log for `pages` pages.
    pub fn create(path: &Path, pages: u64) -> Result<Self, Error> {
        let file =
            crate::create_file(path, log_bytes(pages).max(8)).map_err(|source| Error::Open {
                path: path.to_owned(),
                source,
            })?;
        Self::map(path, file, pages)
    }

    /// Opens an existing log that must cover `pages` pages.
    pub fn open(path: &Path, pages: u64) -> Result<Self, Error> {
        let err = |source| Error::Open {
            path: path.to_owned(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(err)?;
        let actual = file.metadata().map_err(err)?.len();
        if actual < log_bytes(pages) {
            return Err(Error::TooSmall {
                path: path.to_owned(),
                actual,
                expected: log_bytes(pages),
                pages,
            });
        }
        Self::map(path, file, pages)
    }

    /// Maps the words covering `pages` (a file may be longer).
    fn map(path: &Path, file: File, pages: u64) -> Result<Self, Error> {
        let map = crate::map_shared(
            path,
            file,
            log_bytes(pages).max(8),
            libc::PROT_READ | libc::PROT_WRITE,
        )?;
        Ok(Self { map, pages })
    }

    /// Pages covered.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// Words of the log.
    fn word_count(&self) -> usize {
        log_bytes(self.pages) as usize / 8
    }

    /// Word `i`, which every process touches only atomically.
    fn word(&self, i: usize) -> &AtomicU64 {
        self.map
            .get_atomic_ref::<AtomicU64>(i * 8)
            .expect("a word inside the page-aligned mapping")
    }

    fn words(&self) -> impl Iterator<Item = &AtomicU64> {
        (0..self.word_count()).map(|i| self.word(i))
    }

    /// Marks `page` dirty (what the guest does after writing it).
    pub fn mark(&self, page: u64) {
        if page < self.pages {
            self.word((page / 64) as usize)
                .fetch_or((1u64 << (page % 64)).to_le(), Ordering::Release);
        }
    }

    /// Marks every page dirty: after a failed round nothing is known to have
    /// arrived, so everything goes again next time.
    pub fn mark_all(&self) {
        for (i, w) in self.words().enumerate() {
            let bits = (self.pages - i as u64 * 64).min(64);
            let mask = if bits == 64 {
                u64::MAX
            } else {
                (1u64 << bits) - 1
            };
            w.fetch_or(mask.to_le(), Ordering::Release);
        }
    }

    /// Takes the dirty pages in `[first, first + count)` (clearing their bits)
    /// and appends their indices, relative to `first`, to `out`.
    pub fn take_range(&self, first: u64, count: u64, out: &mut Vec<u32>) {
        let end = (first + count).min(self.pages);
        let mut page = first;
        while page < end {
            let word = page / 64;
            let lo = page % 64;
            let hi = (end - word * 64).min(64);
            let span = hi - lo;
            let mask = if span == 64 {
                u64::MAX
            } else {
                ((1u64 << span) - 1) << lo
            };
            let w = self.word(word as usize);
            // Cheap load first: most words are clean in later rounds.
            if u64::from_le(w.load(Ordering::Relaxed)) & mask != 0 {
                let mut bits = u64::from_le(w.fetch_and((!mask).to_le(), Ordering::AcqRel)) & mask;
                while bits != 0 {
                    let b = bits.trailing_zeros() as u64;
                    out.push((word * 64 + b - first) as u32);
                    bits &= bits - 1;
                }
            }
            page = word * 64 + hi;
        }
    }

    /// Clears every bit.
    pub fn clear(&self) {
        for w in self.words() {
            w.store(0, Ordering::Release);
        }
    }

    /// Number of dirty pages, without taking them.
    pub fn count(&self) -> u64 {
        self.words()
            .map(|w| u64::from_le(w.load(Ordering::Relaxed)).count_ones() as u64)
            .sum()
    }

    /// Puts back bits for `pages` (a send that failed).
    pub fn restore(&self, pages: &[u32]) {
        for &p in pages {
            self.mark(p as u64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_are_taken_once_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let log = DirtyLog::create(&path, 200).unwrap();
        for p in [0, 63, 64, 130, 199] {
            log.mark(p);
        }
        log.mark(500); // outside: ignored
        let other = DirtyLog::open(&path, 200).unwrap();
        assert_eq!(other.count(), 5);
        let mut got = Vec::new();
        other.take_range(60, 70, &mut got);
        assert_eq!(got, vec![3, 4], "pages 63 and 64, relative to 60");
        got.clear();
        other.take_range(0, 200, &mut got);
        assert_eq!(got, vec![0, 130, 199]);
        assert_eq!(log.count(), 0);
        log.mark_all();
        assert_eq!(log.count(), 200);
        assert!(matches!(
            DirtyLog::open(&path, 10_000),
            Err(Error::TooSmall { .. })
        ));
    }
}
