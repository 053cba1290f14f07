//! Guest RAM files: opened, checked and mapped.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use ferry_proto::stream::{RamBlockInfo, PAGE_SIZE};
use memmap2::Mmap;
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_128;

use crate::options::RamSpec;

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

/// Checks the `--ram` files of the source and describes them.
pub fn source_blocks(specs: &[RamSpec]) -> Result<Vec<BlockFile>, Error> {
    let mut out: Vec<BlockFile> = Vec::new();
    for s in specs {
        let file = File::open(&s.path).map_err(|source| Error::Open {
            path: s.path.clone(),
            source,
        })?;
        let length = file
            .metadata()
            .map_err(|source| Error::Open {
                path: s.path.clone(),
                source,
            })?
            .len();
        if length == 0 || length % PAGE_SIZE as u64 != 0 {
            return Err(Error::BadSize {
                path: s.path.clone(),
                length,
            });
        }
        if out.iter().any(|b| b.name == s.name) {
            return Err(Error::DuplicateName(s.name.clone()));
        }
        out.push(BlockFile {
            name: s.name.clone(),
            path: s.path.clone(),
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

/// The digest both ends compute over a RAM block: XXH3-128 in hex.
pub fn digest(bytes: &[u8]) -> String {
    format!("{:032x}", xxh3_128(bytes))
}
