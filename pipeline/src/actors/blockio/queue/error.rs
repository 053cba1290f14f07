//! The block-IO actor's error type.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// What a request asked the device to do (for error messages and statistics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// A read (one buffer or vectored).
    Read,
    /// A write (one buffer or vectored).
    Write,
    /// A cache flush.
    Flush,
    /// A write of zeroes without a data buffer.
    WriteZeroes,
    /// A discard (unmap).
    Discard,
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::WriteZeroes => "write-zeroes",
            Op::Discard => "discard",
        })
    }
}

/// Errors of opening a block device and of its requests.
///
/// Opening errors name the device (`path`); request errors name the device, the
/// operation and the byte range, so a caller can pass them on as they are.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// libblkio refused a property, or failed to connect or start the driver.
    #[error("{path}: {driver}: {step}")]
    Setup {
        /// The image file or vhost-user socket.
        path: PathBuf,
        /// The libblkio driver name.
        driver: &'static str,
        /// What was being done, e.g. `connect` or `set "num-entries"`.
        step: String,
        /// libblkio's error.
        #[source]
        source: blkio::Error,
    },
    /// A property read after connecting violates what the actor relies on
    /// (the checks of QEMU's `blkio_refresh_limits`, and a few more).
    #[error("{path}: invalid \"{name}\" value {value}: {reason}")]
    InvalidLimit {
        /// The device.
        path: PathBuf,
        /// The libblkio property.
        name: &'static str,
        /// Its value.
        value: u64,
        /// The rule it breaks.
        reason: String,
    },
    /// Memory for registered buffers or the bounce pool could not be created or
    /// registered with the driver.
    #[error("{device}: memory region of {len} bytes: {what}")]
    MemRegion {
        /// The device.
        device: String,
        /// The region's size.
        len: usize,
        /// What failed.
        what: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The offset or length of a request is not a multiple of the device's
    /// request alignment (`request-alignment`), or a buffer's address or length is
    /// not a multiple of `buf-alignment`.
    #[error(
        "{device}: {op} at offset {offset} of {len} bytes is not aligned to {alignment} ({what})"
    )]
    Unaligned {
        /// The device.
        device: String,
        /// The request.
        op: Op,
        /// Its offset.
        offset: u64,
        /// Its length.
        len: u64,
        /// The alignment it misses.
        alignment: u64,
        /// Which rule: `request-alignment` or `buf-alignment`.
        what: &'static str,
    },
    /// A request of zero bytes.
    #[error("{device}: {op} at offset {offset} has length 0")]
    Empty {
        /// The device.
        device: String,
        /// The request.
        op: Op,
        /// Its offset.
        offset: u64,
    },
    /// A request longer than the device (or the actor) takes in one go.
    #[error("{device}: {op} at offset {offset} of {len} bytes exceeds the maximum of {max} bytes ({what})")]
    TooLarge {
        /// The device.
        device: String,
        /// The request.
        op: Op,
        /// Its offset.
        offset: u64,
        /// Its length.
        len: u64,
        /// The largest accepted length.
        max: u64,
        /// Which limit: `max-transfer`, `max-write-zeroes-len`, ...
        what: &'static str,
    },
    /// A request with more segments than the device's `max-segments`.
    #[error("{device}: {op} at offset {offset} needs {segments} segments, the device takes {max}")]
    TooManySegments {
        /// The device.
        device: String,
        /// The request.
        op: Op,
        /// Its offset.
        offset: u64,
        /// Segments it needs (buffers split at `max-segment-len`).
        segments: usize,
        /// `max-segments`.
        max: usize,
    },
    /// A request reaching past the end of the device.
    #[error("{device}: {op} of {len} bytes at offset {offset} ends beyond the capacity of {capacity} bytes")]
    OutOfRange {
        /// The device.
        device: String,
        /// The request.
        op: Op,
        /// Its offset.
        offset: u64,
        /// Its length.
        len: u64,
        /// The device's capacity.
        capacity: u64,
    },
    /// A write, write-zeroes or discard on a device opened read-only.
    #[error("{device}: {op} on a read-only device")]
    ReadOnly {
        /// The device.
        device: String,
        /// The request.
        op: Op,
    },
    /// The device completed the request with an error.
    #[error("{device}: {op} of {len} bytes at offset {offset} failed{}", detail.as_ref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Io {
        /// The device.
        device: String,
        /// The request.
        op: Op,
        /// Its offset.
        offset: u64,
        /// Its length.
        len: u64,
        /// libblkio's message, when it gave one.
        detail: Option<String>,
        /// The errno the request completed with.
        #[source]
        source: io::Error,
    },
    /// libblkio's queue itself failed (`blkioq_do_io` returned an error): the actor
    /// stops and every outstanding request gets this error.
    #[error("{device}: the request queue failed")]
    Queue {
        /// The device.
        device: String,
        /// libblkio's error (shared by all the requests it fails).
        #[source]
        source: Arc<blkio::Error>,
    },
    /// Waiting on the completion fd or the mailbox's wake-up fd failed.
    #[error("{device}: waiting for completions")]
    Wait {
        /// The device.
        device: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A request has been outstanding longer than the configured timeout (for
    /// instance the vhost-user server went away): the actor stops.
    #[error("{device}: a request has been outstanding for more than {timeout:?}; the device stopped answering")]
    Timeout {
        /// The device.
        device: String,
        /// The configured request timeout.
        timeout: Duration,
    },
    /// The actor is stopping and takes no new requests.
    #[error("{device}: the block-IO actor is stopping")]
    Stopping {
        /// The device.
        device: String,
    },
    /// The actor has stopped: the request was not taken, or its reply never came.
    #[error("{device}: the block-IO actor has stopped")]
    ActorGone {
        /// The device.
        device: String,
    },
    /// The actor thread could not be started, or it panicked.
    #[error("{device}: block-IO actor thread: {what}")]
    Thread {
        /// The device.
        device: String,
        /// What happened.
        what: String,
    },
}
