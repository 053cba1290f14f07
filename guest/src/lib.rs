//! ferry-guest: guest memory that a running VMM shares with ferry.
//!
//! - [`ram`]: the source's RAM files, mapped shared, and the digest both ends compute.
//! - [`dirty_log`]: the page dirty bitmap a guest and ferry share.
//! - [`load`]: the destination's RAM files, written from a stream's RAM records.
//!
//! Memory that another process writes while ferry reads it (the guest's RAM,
//! the dirty log) is mapped only as vm-memory regions and reached only
//! through volatile copies and loads or atomics: a Rust reference over it
//! would promise the compiler bytes that do not change, which the guest
//! breaks.

pub mod dirty_log;
pub mod load;
pub mod ram;

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use vm_memory::mmap::MmapRegionError;
use vm_memory::{FileOffset, MmapRegion};

/// A file that cannot be mapped.
#[derive(Debug, thiserror::Error)]
#[error("{} cannot be mapped", path.display())]
pub struct MapError {
    /// The file.
    pub path: PathBuf,
    /// Why.
    #[source]
    pub source: MmapRegionError,
}

/// Maps the first `len` bytes of `file` shared, with `prot`. Memory that
/// another process shares is mapped only here, as a vm-memory region, so it
/// is reached only through volatile and atomic accessors, never as `&[u8]`.
fn map_shared(path: &Path, file: File, len: u64, prot: i32) -> Result<MmapRegion, MapError> {
    MmapRegion::build(
        Some(FileOffset::new(file, 0)),
        len as usize,
        prot,
        libc::MAP_SHARED,
    )
    .map_err(|source| MapError {
        path: path.to_owned(),
        source,
    })
}

/// Creates (or truncates) the file at `path` as `len` zero bytes, sparse,
/// open for reading and writing: a guest's RAM, disk or dirty log starts
/// that way, and a mapping for writing needs the file readable too.
pub fn create_file(path: &Path, len: u64) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    file.set_len(len)?;
    Ok(file)
}
