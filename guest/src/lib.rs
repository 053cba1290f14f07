//! ferry-guest: guest memory that a running VMM shares with ferry.
//!
//! - [`ram`]: the source's RAM files, mapped shared, and the digest both ends compute.
//! - [`dirty_log`]: the page dirty bitmap a guest and ferry share.
//! - [`load`]: the destination's RAM files, written from a stream's RAM records.

pub mod dirty_log;
pub mod load;
pub mod ram;

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;

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
