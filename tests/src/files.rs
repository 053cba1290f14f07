//! Temporary directories and the files tests compare.

use std::fs;
use std::path::Path;

use serde_json::Value;
use tempfile::TempDir;

use crate::ram::first_difference;

/// A fresh temporary directory named `PREFIX...` in the system's temporary
/// directory; removed on drop.
pub fn tempdir(prefix: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .expect("creating a temporary directory")
}

/// Like [`tempdir`], in /dev/shm: guest RAM lives in tmpfs, as on a real host
/// (and a disk-backed destination would measure writeback). /dev/shm is also
/// shared by network namespaces (`ip netns exec` changes the network, not the
/// files).
pub fn shm_tempdir(prefix: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/dev/shm")
        .expect("creating a temporary directory in /dev/shm")
}

/// A JSON file (ferry's `--stats-json`), parsed; panics naming the file.
pub fn read_json(path: &Path) -> Value {
    let text =
        fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not JSON ({e}):\n{text}", path.display()))
}

/// Panics unless `copy` holds the same bytes as `source`, naming the first
/// byte that differs.
pub fn assert_same_file(source: &Path, copy: &Path) {
    let read = |p: &Path| fs::read(p).unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
    assert_same_bytes(&read(source), copy);
}

/// Panics unless the file `copy` holds `want`, naming the first byte that differs.
pub fn assert_same_bytes(want: &[u8], copy: &Path) {
    let got = fs::read(copy).unwrap_or_else(|e| panic!("reading {}: {e}", copy.display()));
    if let Some(at) = first_difference(&got, want) {
        panic!(
            "{} differs from the source at byte {at:#x} (lengths {} and {})",
            copy.display(),
            got.len(),
            want.len()
        );
    }
}
