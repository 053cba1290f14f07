//! The block-IO actor: one libblkio queue driven by one thread, as QEMU's
//! block/blkio.c drives it (see `shared/reference/block-blkio.c.txt`).
//!
//! - [`BlockDevice::open`] creates the libblkio instance (`io_uring` on a raw image,
//!   O_DIRECT where the file system allows it, else buffered with a note in
//!   [`Limits::direct_fallback`]; or `virtio-blk-vhost-user` on a vhost-user-blk
//!   socket such as qemu-storage-daemon's), connects, reads and validates the
//!   limits like `blkio_refresh_limits`, and starts it.
//! - [`BlockDevice::spawn`] (or [`BlockIo::open`]) starts the actor thread. Requests
//!   ([`Request`]) arrive on a bounded crossbeam channel through a [`Mailbox`]; each
//!   is answered on its own reply channel. The actor submits with `blkioq_do_io`
//!   and keeps the completions that call returns (a `do_io` made only to submit
//!   also reaps), and reaps the rest when the completion fd (an eventfd) is
//!   readable: reset it, disable notification, drain, re-enable, drain once more.
//! - Memory: [`BufferPool`] hands out slots of a region registered with the driver,
//!   so reads and writes from them need no copy. When the driver needs memory
//!   regions (vhost-user), any other buffer goes through a bounce pool as in QEMU:
//!   first come first served, a waiter never loses its place, and the pool grows
//!   only when nothing using it is in flight.
//! - Invalid requests (unaligned, empty, too large, too many segments, past the
//!   end, writes to a read-only device) are answered with a typed [`Error`] and
//!   never reach the device.
//!
//! Requests are independent, as on any block device: two outstanding requests may
//! complete in either order, and a flush covers the writes that completed before it
//! was sent. Wait for a write's reply before sending what must follow it.

mod actor;
mod bounce;
mod buffer;
mod device;
mod error;

#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::Arc;
use std::thread::JoinHandle;

use crossbeam_channel::{bounded, Sender};

pub use buffer::{Buffer, BufferPool, BUF_ALIGN};
pub use device::{BlockDevice, DeviceConfig, Driver, Limits, UnknownDriver};
pub use error::{Error, Op};

use actor::{Actor, ActorParts, Shared};
use buffer::SlotPool;

/// The channel a request is answered on.
pub type Reply<T> = Sender<Result<T, Error>>;

/// Flags of a write-zeroes request (libblkio's `BLKIO_REQ_*`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// Durable when the request completes (`BLKIO_REQ_FUA`).
    pub fua: bool,
    /// Keep the blocks allocated (`BLKIO_REQ_NO_UNMAP`).
    pub no_unmap: bool,
    /// Fail with ENOTSUP rather than writing zero buffers when the device has no
    /// efficient way (`BLKIO_REQ_NO_FALLBACK`). Without it, a write-zeroes the device
    /// refuses with ENOTSUP (e.g. NO_UNMAP on tmpfs, which has no
    /// `FALLOC_FL_ZERO_RANGE`) is done by the actor as writes from a registered
    /// zero region, as QEMU's block layer does.
    pub no_fallback: bool,
}

/// The actor's mailbox type. Offsets and lengths are in bytes and must be
/// multiples of [`Limits::request_alignment`]; buffers' lengths must be multiples of
/// [`Limits::buf_alignment`] ([`Buffer`]s are always suitably aligned in memory).
#[derive(Debug)]
pub enum Request {
    /// Read `len` bytes at `offset` into a new buffer (a registered one when a slot
    /// is free and `len` fits, so no bounce copy).
    Read {
        /// Byte offset.
        offset: u64,
        /// Bytes to read.
        len: usize,
        /// Gets the data.
        reply: Reply<Buffer>,
    },
    /// Vectored read at `offset` into the given buffers (filled in order, each up to
    /// its `len`); they come back in the reply.
    Readv {
        /// Byte offset.
        offset: u64,
        /// Destination buffers.
        bufs: Vec<Buffer>,
        /// Gets the filled buffers.
        reply: Reply<Vec<Buffer>>,
    },
    /// Write `data` at `offset`; with `fua` it is durable when answered.
    Write {
        /// Byte offset.
        offset: u64,
        /// The data (dropped, so a registered slot is given back, once written).
        data: Buffer,
        /// Force unit access.
        fua: bool,
        /// Answered when written.
        reply: Reply<()>,
    },
    /// Vectored write of `bufs`, concatenated, at `offset`.
    Writev {
        /// Byte offset.
        offset: u64,
        /// The data, in order.
        bufs: Vec<Buffer>,
        /// Force unit access.
        fua: bool,
        /// Answered when written.
        reply: Reply<()>,
    },
    /// Make completed writes durable.
    Flush {
        /// Answered when flushed.
        reply: Reply<()>,
    },
    /// Write `len` zero bytes at `offset` without a data buffer.
    WriteZeroes {
        /// Byte offset.
        offset: u64,
        /// Bytes to zero.
        len: u64,
        /// FUA, NO_UNMAP, NO_FALLBACK.
        flags: ZeroFlags,
        /// Answered when done.
        reply: Reply<()>,
    },
    /// Discard (unmap) `len` bytes at `offset`; their contents become unspecified.
    /// A device without discard (ENOTSUP; libblkio's io_uring driver on a regular
    /// file) answers it as done, as QEMU does.
    Discard {
        /// Byte offset.
        offset: u64,
        /// Bytes to discard.
        len: u64,
        /// Answered when done.
        reply: Reply<()>,
    },
}

/// What the actor did, returned by [`BlockIo::shutdown`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    /// Requests taken from the mailbox.
    pub requests: u64,
    /// Requests the device completed (successfully or not).
    pub completed: u64,
    /// Requests answered with an error (invalid or failed).
    pub errors: u64,
    /// Bytes read.
    pub bytes_read: u64,
    /// Bytes written.
    pub bytes_written: u64,
    /// Bytes zeroed by write-zeroes.
    pub bytes_zeroed: u64,
    /// Bytes discarded.
    pub bytes_discarded: u64,
    /// Flushes completed.
    pub flushes: u64,
    /// Discards the device refused with ENOTSUP, answered as done (a discard is
    /// advisory; QEMU does the same).
    pub discards_unsupported: u64,
    /// Write-zeroes the device refused (ENOTSUP, without NO_FALLBACK) that the actor
    /// did by writing zeroes instead.
    pub zero_fallbacks: u64,
    /// Requests that went through the bounce pool.
    pub bounced: u64,
    /// Bounce requests that had to queue behind others.
    pub bounce_waits: u64,
    /// Times the bounce pool was (re)allocated.
    pub bounce_resizes: u64,
    /// The bounce pool's final size.
    pub bounce_pool_bytes: u64,
    /// Times the completion fd woke the actor.
    pub completion_fd_wakeups: u64,
    /// Completions returned by `do_io` calls made to submit (the trap: they must be
    /// kept, or their requests are never answered).
    pub reaped_on_submit: u64,
    /// Most requests in flight at once.
    pub max_in_flight: u64,
}

/// A handle for sending requests to the actor; cheap to clone, usable from any
/// thread.
#[derive(Clone)]
pub struct Mailbox {
    tx: Sender<Request>,
    shared: Arc<Shared>,
    limits: Arc<Limits>,
    buffers: BufferPool,
}

impl fmt::Debug for Mailbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Mailbox")
            .field("device", &self.shared.device)
            .field("queued", &self.tx.len())
            .finish()
    }
}

impl Mailbox {
    /// Sends a request (blocking while the mailbox is full). Fails only if the actor
    /// has stopped, in which case the request is dropped unanswered.
    pub fn send(&self, req: Request) -> Result<(), Error> {
        self.tx.send(req).map_err(|_| self.gone())?;
        self.shared.notify();
        Ok(())
    }

    fn gone(&self) -> Error {
        Error::ActorGone {
            device: self.shared.device.clone(),
        }
    }

    fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Request) -> Result<T, Error> {
        let (tx, rx) = bounded(1);
        self.send(make(tx))?;
        rx.recv().map_err(|_| self.gone())?
    }

    /// Reads `len` bytes at `offset` and waits for them.
    pub fn read(&self, offset: u64, len: usize) -> Result<Buffer, Error> {
        self.call(|reply| Request::Read { offset, len, reply })
    }

    /// Reads at `offset` into `bufs` and waits.
    pub fn readv(&self, offset: u64, bufs: Vec<Buffer>) -> Result<Vec<Buffer>, Error> {
        self.call(|reply| Request::Readv {
            offset,
            bufs,
            reply,
        })
    }

    /// Writes `data` at `offset` and waits.
    pub fn write(&self, offset: u64, data: Buffer, fua: bool) -> Result<(), Error> {
        self.call(|reply| Request::Write {
            offset,
            data,
            fua,
            reply,
        })
    }

    /// Writes `bufs` at `offset` and waits.
    pub fn writev(&self, offset: u64, bufs: Vec<Buffer>, fua: bool) -> Result<(), Error> {
        self.call(|reply| Request::Writev {
            offset,
            bufs,
            fua,
            reply,
        })
    }

    /// Flushes and waits.
    pub fn flush(&self) -> Result<(), Error> {
        self.call(|reply| Request::Flush { reply })
    }

    /// Zeroes `len` bytes at `offset` and waits.
    pub fn write_zeroes(&self, offset: u64, len: u64, flags: ZeroFlags) -> Result<(), Error> {
        self.call(|reply| Request::WriteZeroes {
            offset,
            len,
            flags,
            reply,
        })
    }

    /// Discards `len` bytes at `offset` and waits.
    pub fn discard(&self, offset: u64, len: u64) -> Result<(), Error> {
        self.call(|reply| Request::Discard { offset, len, reply })
    }

    /// The device's validated limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The device's registered buffers.
    pub fn buffers(&self) -> &BufferPool {
        &self.buffers
    }

    /// The device's name (its path) for messages.
    pub fn device(&self) -> &str {
        &self.shared.device
    }
}

/// A running actor. Dropping it stops the actor (after its in-flight requests
/// complete) and waits for the thread; [`BlockIo::shutdown`] does the same and
/// returns the outcome.
pub struct BlockIo {
    mailbox: Mailbox,
    thread: Option<JoinHandle<Result<Stats, Error>>>,
}

impl fmt::Debug for BlockIo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockIo")
            .field("device", &self.mailbox.shared.device)
            .field("limits", &self.mailbox.limits)
            .finish()
    }
}

impl BlockIo {
    /// Opens the device and starts its actor.
    pub fn open(config: &DeviceConfig) -> Result<Self, Error> {
        BlockDevice::open(config)?.spawn()
    }

    /// A mailbox for sending requests.
    pub fn mailbox(&self) -> Mailbox {
        self.mailbox.clone()
    }

    /// The device's validated limits.
    pub fn limits(&self) -> &Limits {
        &self.mailbox.limits
    }

    /// The device's registered buffers.
    pub fn buffers(&self) -> &BufferPool {
        &self.mailbox.buffers
    }

    /// Stops the actor: requests still in the mailbox are answered with
    /// [`Error::Stopping`]; those it has taken (in flight, or waiting for bounce
    /// space) complete normally. Returns the actor's
    /// statistics, or the error that stopped it earlier (e.g. [`Error::Timeout`]).
    pub fn shutdown(mut self) -> Result<Stats, Error> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> Result<Stats, Error> {
        let Some(thread) = self.thread.take() else {
            return Err(self.mailbox.gone());
        };
        self.mailbox.shared.request_stop();
        thread.join().unwrap_or_else(|_| {
            Err(Error::Thread {
                device: self.mailbox.shared.device.clone(),
                what: "panicked".into(),
            })
        })
    }
}

impl Drop for BlockIo {
    fn drop(&mut self) {
        if self.thread.is_some() {
            if let Err(e) = self.stop_and_join() {
                tracing::debug!(error = %e, "block-IO actor ended with an error");
            }
        }
    }
}

impl BlockDevice {
    /// Registers the buffer pool with the driver and starts the actor thread.
    pub fn spawn(mut self) -> Result<BlockIo, Error> {
        let device = self.name();
        let config = self.config.clone();
        let pool = SlotPool::new(config.buffer_slots, config.slot_size).map_err(|source| {
            Error::MemRegion {
                device: device.clone(),
                len: config.buffer_slots.saturating_mul(config.slot_size),
                what: "allocate registered buffers",
                source,
            }
        })?;
        let pool = Arc::new(pool);
        self.blkio
            .map_mem_region(&pool.region().blkio_region())
            .map_err(|e| Error::MemRegion {
                device: device.clone(),
                len: pool.region().len(),
                what: "register buffers with the driver",
                source: std::io::Error::from_raw_os_error(e.errno().raw_os_error()),
            })?;
        let shared = Arc::new(Shared::new(device.clone()).map_err(|e| Error::Thread {
            device: device.clone(),
            what: format!("eventfd: {e}"),
        })?);
        let limits = Arc::new(self.limits.clone());
        let (tx, rx) = bounded(config.mailbox_capacity.max(1));
        let BlockDevice { queue, blkio, .. } = self;
        let actor = Actor::new(ActorParts {
            device: device.clone(),
            limits: Arc::clone(&limits),
            rx,
            shared: Arc::clone(&shared),
            pool: Arc::clone(&pool),
            queue,
            blkio,
            max_in_flight: config.max_in_flight,
            bounce_initial: config.bounce_initial,
            request_timeout: config.request_timeout,
        });
        let thread = std::thread::Builder::new()
            .name("blockio".into())
            .spawn(move || actor.run())
            .map_err(|e| Error::Thread {
                device: device.clone(),
                what: format!("spawn: {e}"),
            })?;
        Ok(BlockIo {
            mailbox: Mailbox {
                tx,
                shared,
                limits,
                buffers: BufferPool::new(pool),
            },
            thread: Some(thread),
        })
    }
}
