//! Guest RAM files: opened, checked and mapped.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use ferry_proto::stream::{RamBlockInfo, PAGE_SIZE};
use memmap2::Mmap;
use serde::{Deserialize, Serialize};

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
    /// It cannot be opened or mapped.
    #[error("RAM file {path} cannot be read")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
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

/// Maps a RAM file read-only.
pub fn map_readonly(path: &Path) -> Result<Mmap, Error> {
    let err = |source| Error::Open {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(err)?;
    // SAFETY: the mapping is read-only and shared with the guest, which may
    // change pages under us; that is the nature of live migration and only
    // makes a page's copy stale (the dirty log resends it). We only copy bytes
    // out of it and never create references that assume they are immutable
    // beyond the copy.
    unsafe { Mmap::map(&file) }.map_err(err)
}

/// The digest both ends compute over a RAM block: XXH3-128, in hex, of every
/// page that is not all zero, each preceded by its little-endian u64 index.
///
/// Zero pages are left out so that the cost follows the memory a block holds,
/// not the size it claims: a destination skips the holes of its sparse files
/// without reading them, and a hostile stream that announces terabytes costs
/// nothing to verify.
pub fn digest(bytes: &[u8]) -> String {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    hash_pages(&mut h, 0, bytes);
    format!("{:032x}", h.digest128())
}

/// Adds the non-zero pages of `bytes`, which starts at page `first`.
fn hash_pages(h: &mut xxhash_rust::xxh3::Xxh3, first: u64, bytes: &[u8]) {
    for (i, page) in bytes.chunks(PAGE_SIZE).enumerate() {
        if !ferry_proto::stream::encode::is_zero(page) {
            h.update(&(first + i as u64).to_le_bytes());
            h.update(page);
        }
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
    use std::os::unix::fs::FileExt;
    let err = |source| Error::Open {
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(err)?;
    let mut buf = vec![0u8; 256 * PAGE_SIZE];
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for range in ranges {
        let mut at = range.start;
        while at < range.end {
            let n = (range.end - at).min(buf.len() as u64) as usize;
            file.read_exact_at(&mut buf[..n], at).map_err(err)?;
            hash_pages(&mut h, at / PAGE_SIZE as u64, &buf[..n]);
            at += n as u64;
        }
    }
    Ok(format!("{:032x}", h.digest128()))
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
