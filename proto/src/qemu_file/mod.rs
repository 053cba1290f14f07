//! QEMUFile: the buffered byte stream every migration record goes through.
//!
//! The semantics follow QEMU's `migration/qemu-file.c`: a 32 KiB buffer, a list
//! of up to 64 iovecs that coalesces adjacent buffers, writes flushed through the
//! transport's `writev`, the first error latched and returned by every later call,
//! and byte accounting for the rate limit. Writing and reading are separate types
//! because a QEMUFile is only ever one or the other.

mod hooks;
mod reader;
mod writer;

use std::io;
use std::sync::Arc;

pub use hooks::{NoHooks, RamControl, RamHooks, SavePage};
pub use reader::QemuFileReader;
pub use writer::{Compressed, QemuFileWriter};

/// Size of the internal buffer (QEMU's `IO_BUF_SIZE`).
pub const IO_BUF_SIZE: usize = 32768;

/// Most iovecs gathered before a flush (QEMU's `MAX_IOV_SIZE`).
pub const MAX_IOV: usize = 64;

/// Errors of a QEMUFile. Cloneable because the first error is latched and
/// handed back by every later operation.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// The transport failed.
    #[error("transport error at byte {offset}")]
    Io {
        /// Stream offset of the failed operation.
        offset: u64,
        /// What the transport reported.
        #[source]
        source: Arc<io::Error>,
    },
    /// The transport accepted fewer bytes than it was given.
    #[error("short write at byte {offset}: {written} of {expected} bytes")]
    ShortWrite {
        /// Stream offset where the flush began.
        offset: u64,
        /// Bytes the transport took.
        written: usize,
        /// Bytes it was given.
        expected: usize,
    },
    /// The stream ended before the bytes a record needs.
    #[error("unexpected end of stream at byte {offset}")]
    Eof {
        /// Offset of the first missing byte.
        offset: u64,
    },
    /// A counted string must fit its one-byte length.
    #[error("counted string of {len} bytes is longer than 255")]
    StringTooLong {
        /// The string's length.
        len: usize,
    },
    /// A counted string read from the stream is not UTF-8.
    #[error("counted string at byte {offset} is not valid UTF-8")]
    InvalidString {
        /// Offset of the string's length byte.
        offset: u64,
    },
    /// Peeks are served from the buffer, so they cannot reach past it.
    #[error("peek of {size} bytes at {offset} reaches past the {IO_BUF_SIZE}-byte buffer")]
    PeekTooLarge {
        /// Bytes asked for.
        size: usize,
        /// Distance from the read position.
        offset: usize,
    },
    /// A RAM control hook failed.
    #[error("RAM control hook failed at byte {offset}")]
    Hook {
        /// Stream offset when the hook ran.
        offset: u64,
        /// The hook's error.
        #[source]
        source: Arc<io::Error>,
    },
    /// The source stream asked for a RAM load hook that this side does not have.
    #[error("stream at byte {offset} needs a RAM load hook and none is installed")]
    NoLoadHook {
        /// Stream offset of the request.
        offset: u64,
    },
}

/// Result of QEMUFile operations.
pub type Result<T> = std::result::Result<T, Error>;

/// The first error of a QEMUFile's life: once set it stays, and every later
/// operation hands it back, as QEMU's `qemu_file_set_error` does.
#[derive(Debug, Default)]
struct Latch(Option<Error>);

impl Latch {
    fn get(&self) -> Option<&Error> {
        self.0.as_ref()
    }

    /// Keeps `err` unless an earlier error is latched: the first one wins.
    fn set(&mut self, err: Error) {
        if self.0.is_none() {
            self.0 = Some(err);
        }
    }

    fn is_set(&self) -> bool {
        self.0.is_some()
    }

    /// The latched error, as the result of an operation.
    fn check(&self) -> Result<()> {
        match &self.0 {
            Some(e) => Err(e.clone()),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests;
