//! Opening a device with libblkio: create, set properties, connect, read and
//! validate the limits (as QEMU's `blkio_refresh_limits`), start, take queue 0.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use blkio::{Blkio, Blkioq, Errno};

use super::buffer::page_size;
use super::Error;

/// The libblkio drivers ferry uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Driver {
    /// `io_uring` on a raw image file or block device.
    IoUring,
    /// `virtio-blk-vhost-user` on a vhost-user-blk server's unix socket (for example
    /// `qemu-storage-daemon --export type=vhost-user-blk`).
    VirtioBlkVhostUser,
}

impl Driver {
    /// libblkio's name of the driver.
    pub fn name(self) -> &'static str {
        match self {
            Driver::IoUring => "io_uring",
            Driver::VirtioBlkVhostUser => "virtio-blk-vhost-user",
        }
    }
}

impl fmt::Display for Driver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A driver name that is not one of ours.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown block driver {0:?} (expected io_uring or virtio-blk-vhost-user)")]
pub struct UnknownDriver(pub String);

impl FromStr for Driver {
    type Err = UnknownDriver;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "io_uring" | "io-uring" | "iouring" => Ok(Driver::IoUring),
            "virtio-blk-vhost-user" | "vhost-user" => Ok(Driver::VirtioBlkVhostUser),
            other => Err(UnknownDriver(other.to_string())),
        }
    }
}

/// How to open a device and run its actor.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    /// The libblkio driver.
    pub driver: Driver,
    /// The image file (io_uring) or the vhost-user socket.
    pub path: PathBuf,
    /// io_uring: open with O_DIRECT; if the file system refuses it, the device is
    /// opened buffered instead and [`Limits::direct_fallback`] says why.
    /// (vhost-user servers decide their own caching.)
    pub direct: bool,
    /// Open read-only: writes, write-zeroes and discards fail with
    /// [`Error::ReadOnly`].
    pub read_only: bool,
    /// io_uring `num-entries` / virtio `queue-size` (a power of two for virtio).
    pub queue_size: u32,
    /// Registered buffers handed out by [`super::BufferPool`] (and used for reads).
    pub buffer_slots: usize,
    /// Size of one registered buffer (1 MiB: the disk-migration chunk).
    pub slot_size: usize,
    /// Initial size of the bounce pool (grown on demand when nothing is in flight);
    /// used only by drivers that need memory regions.
    pub bounce_initial: usize,
    /// Largest read or write accepted when the device reports no `max-transfer`.
    pub max_request: usize,
    /// Requests the mailbox holds before senders block.
    pub mailbox_capacity: usize,
    /// Requests the actor keeps outstanding (submitted or waiting for bounce space)
    /// before it stops taking more from the mailbox.
    pub max_in_flight: usize,
    /// A request outstanding this long means the device stopped answering (e.g.
    /// the vhost-user server died): the actor fails everything and stops.
    pub request_timeout: Duration,
}

impl DeviceConfig {
    /// Defaults for `driver` on `path`.
    pub fn new(driver: Driver, path: impl Into<PathBuf>) -> Self {
        Self {
            driver,
            path: path.into(),
            direct: true,
            read_only: false,
            queue_size: 128,
            buffer_slots: 64,
            slot_size: 1 << 20,
            bounce_initial: 4 << 20,
            max_request: 32 << 20,
            mailbox_capacity: 256,
            max_in_flight: 128,
            request_timeout: Duration::from_secs(30),
        }
    }

    /// io_uring on a raw image, O_DIRECT where allowed.
    pub fn io_uring(path: impl Into<PathBuf>) -> Self {
        Self::new(Driver::IoUring, path)
    }

    /// virtio-blk-vhost-user on a vhost-user-blk socket.
    pub fn vhost_user(socket: impl Into<PathBuf>) -> Self {
        Self::new(Driver::VirtioBlkVhostUser, socket)
    }
}

/// The device's properties after connecting, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Size of the device in bytes (`capacity`).
    pub capacity: u64,
    /// Offsets and lengths must be multiples of this (`request-alignment`, a power
    /// of two).
    pub request_alignment: u64,
    /// Preferred request size, 0 if none (`optimal-io-size`).
    pub optimal_io_size: u64,
    /// Largest read or write the device takes, 0 if unlimited (`max-transfer`).
    pub max_transfer: u64,
    /// Largest read or write the actor takes: `max-transfer`, or
    /// [`DeviceConfig::max_request`] when that is unlimited.
    pub max_request: u64,
    /// Buffer addresses and lengths must be multiples of this (`buf-alignment`).
    pub buf_alignment: u64,
    /// Preferred buffer alignment (`optimal-buf-alignment`).
    pub optimal_buf_alignment: u64,
    /// Most segments in one request (`max-segments`).
    pub max_segments: u64,
    /// Longest segment, 0 if unlimited (`max-segment-len`); the actor splits
    /// buffers at this length.
    pub max_segment_len: u64,
    /// Longest write-zeroes, 0 if unlimited (`max-write-zeroes-len`).
    pub max_write_zeroes_len: u64,
    /// Longest discard, 0 if unlimited (`max-discard-len`).
    pub max_discard_len: u64,
    /// Preferred discard alignment (`discard-alignment`).
    pub discard_alignment: u64,
    /// Memory regions must be aligned to this (`mem-region-alignment`).
    pub mem_region_alignment: u64,
    /// Buffers must lie in registered memory regions (`needs-mem-regions`).
    pub needs_mem_regions: bool,
    /// Memory regions need an fd (`needs-mem-region-fd`).
    pub needs_mem_region_fd: bool,
    /// The device implements FUA itself (`supports-fua-natively`); otherwise libblkio
    /// emulates it with a flush.
    pub supports_fua_natively: bool,
    /// Writes are cached and need a flush to be durable (`flush-needed`).
    pub flush_needed: bool,
    /// The device is read-only.
    pub read_only: bool,
    /// io_uring: the file is open with O_DIRECT.
    pub direct: bool,
    /// io_uring: why O_DIRECT was asked for but not used.
    pub direct_fallback: Option<String>,
    /// The actor's queue size (`num-entries` / `queue-size`).
    pub queue_size: u32,
}

/// A connected and started libblkio device with its one queue, not yet driven by an
/// actor. [`BlockDevice::spawn`] hands it to a new actor thread.
pub struct BlockDevice {
    pub(crate) config: DeviceConfig,
    pub(crate) limits: Limits,
    // Field order: the queue goes before the Blkio instance (as libblkio requires
    // queues to be dropped first, it also keeps an Arc, but be explicit).
    pub(crate) queue: Blkioq,
    pub(crate) blkio: Blkio,
}

impl fmt::Debug for BlockDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BlockDevice")
            .field("driver", &self.config.driver)
            .field("path", &self.config.path)
            .field("limits", &self.limits)
            .finish()
    }
}

struct Setup<'a> {
    path: &'a Path,
    driver: Driver,
}

impl Setup<'_> {
    fn err(&self, step: impl Into<String>) -> impl FnOnce(blkio::Error) -> Error + '_ {
        let step = step.into();
        move |source| Error::Setup {
            path: self.path.to_owned(),
            driver: self.driver.name(),
            step,
            source,
        }
    }

    fn limit(&self, name: &'static str, value: u64, reason: impl Into<String>) -> Error {
        Error::InvalidLimit {
            path: self.path.to_owned(),
            name,
            value,
            reason: reason.into(),
        }
    }

    fn create(&self, config: &DeviceConfig, direct: bool) -> Result<Blkio, Error> {
        let mut b = Blkio::new(self.driver.name()).map_err(self.err("create"))?;
        let path = self.path.to_str().ok_or_else(|| {
            self.err("set \"path\"")(blkio::Error::new(Errno::INVAL, "path is not UTF-8"))
        })?;
        b.set_str("path", path).map_err(self.err("set \"path\""))?;
        if config.read_only {
            b.set_bool("read-only", true)
                .map_err(self.err("set \"read-only\""))?;
        }
        if self.driver == Driver::IoUring && direct {
            b.set_bool("direct", true)
                .map_err(self.err("set \"direct\""))?;
        }
        Ok(b)
    }

    fn get_i32(&self, b: &Blkio, name: &'static str) -> Result<i64, Error> {
        b.get_i32(name)
            .map(i64::from)
            .map_err(self.err(format!("get \"{name}\"")))
    }

    fn get_u64(&self, b: &Blkio, name: &'static str) -> Result<u64, Error> {
        b.get_u64(name).map_err(self.err(format!("get \"{name}\"")))
    }

    fn get_bool(&self, b: &Blkio, name: &'static str) -> Result<bool, Error> {
        b.get_bool(name)
            .map_err(self.err(format!("get \"{name}\"")))
    }

    /// A non-negative int property as u64.
    fn get_count(&self, b: &Blkio, name: &'static str) -> Result<u64, Error> {
        let v = self.get_i32(b, name)?;
        u64::try_from(v).map_err(|_| self.limit(name, v as u64, "must not be negative"))
    }

    /// An int property that must be at least 1, as u64.
    fn get_positive(&self, b: &Blkio, name: &'static str) -> Result<u64, Error> {
        let v = self.get_i32(b, name)?;
        if v < 1 {
            return Err(self.limit(name, v as u64, "must be positive"));
        }
        Ok(v as u64)
    }

    /// Checks that an alignment is one a page-aligned buffer always meets.
    fn within_page(&self, name: &'static str, v: u64) -> Result<u64, Error> {
        if !v.is_power_of_two() || v > page_size() as u64 {
            return Err(self.limit(
                name,
                v,
                format!(
                    "must be a power of 2 no larger than the page size ({})",
                    page_size()
                ),
            ));
        }
        Ok(v)
    }

    /// `request-alignment`, `optimal-io-size` and `max-transfer`, checked as
    /// QEMU's `blkio_refresh_limits` does.
    fn request_limits(&self, b: &Blkio) -> Result<(u64, u64, u64), Error> {
        let request_alignment = self.get_i32(b, "request-alignment")?;
        if request_alignment < 1
            || request_alignment >= i64::from(i32::MAX)
            || !(request_alignment as u64).is_power_of_two()
        {
            return Err(self.limit(
                "request-alignment",
                request_alignment as u64,
                "must be a power of 2 less than INT_MAX",
            ));
        }
        let ra = request_alignment as u64;

        let optimal_io_size = self.get_count(b, "optimal-io-size")?;
        if optimal_io_size > i32::MAX as u64 || optimal_io_size % ra != 0 {
            return Err(self.limit(
                "optimal-io-size",
                optimal_io_size,
                format!("must be a multiple of {ra}"),
            ));
        }

        let max_transfer = self.get_count(b, "max-transfer")?;
        if max_transfer % ra != 0 || (optimal_io_size != 0 && max_transfer % optimal_io_size != 0) {
            return Err(self.limit(
                "max-transfer",
                max_transfer,
                format!("must be a multiple of {ra} and {optimal_io_size} (if non-zero)"),
            ));
        }
        Ok((ra, optimal_io_size, max_transfer))
    }

    /// Reads and validates the limits, following QEMU's `blkio_refresh_limits`
    /// (request-alignment a power of two below INT_MAX, optimal-io-size and
    /// max-transfer multiples, positive buf-alignment, optimal-buf-alignment and
    /// max-segments), plus what the actor relies on: page-aligned buffers suffice,
    /// the capacity is a whole number of aligned blocks.
    fn limits(&self, b: &Blkio, config: &DeviceConfig) -> Result<Limits, Error> {
        let (ra, optimal_io_size, max_transfer) = self.request_limits(b)?;
        let buf_alignment =
            self.within_page("buf-alignment", self.get_positive(b, "buf-alignment")?)?;
        let optimal_buf_alignment = self.get_positive(b, "optimal-buf-alignment")?;
        let max_segments = self.get_positive(b, "max-segments")?;

        let max_segment_len = self.get_count(b, "max-segment-len")?;
        if max_segment_len != 0 && (max_segment_len < buf_alignment || max_segment_len % ra != 0) {
            return Err(self.limit(
                "max-segment-len",
                max_segment_len,
                format!("must be 0 or a multiple of {ra} of at least {buf_alignment}"),
            ));
        }

        let mem_region_alignment = self.within_page(
            "mem-region-alignment",
            self.get_u64(b, "mem-region-alignment")?,
        )?;

        let capacity = self.get_u64(b, "capacity")?;
        if capacity % ra != 0 {
            return Err(self.limit(
                "capacity",
                capacity,
                format!("must be a multiple of the request alignment {ra}"),
            ));
        }

        let max_request = if max_transfer != 0 {
            max_transfer
        } else {
            let cap = (config.max_request as u64).min(i32::MAX as u64);
            (cap / ra * ra).max(ra)
        };

        Ok(Limits {
            capacity,
            request_alignment: ra,
            optimal_io_size,
            max_transfer,
            max_request,
            buf_alignment,
            optimal_buf_alignment,
            max_segments,
            max_segment_len,
            max_write_zeroes_len: self.get_u64(b, "max-write-zeroes-len")?,
            max_discard_len: self.get_u64(b, "max-discard-len")?,
            discard_alignment: self.get_count(b, "discard-alignment")?,
            mem_region_alignment,
            needs_mem_regions: self.get_bool(b, "needs-mem-regions")?,
            needs_mem_region_fd: self.get_bool(b, "needs-mem-region-fd")?,
            supports_fua_natively: self.get_bool(b, "supports-fua-natively")?,
            flush_needed: self.get_bool(b, "flush-needed")?,
            read_only: self.get_bool(b, "read-only")?,
            direct: self.driver == Driver::IoUring && self.get_bool(b, "direct")?,
            direct_fallback: None,
            queue_size: config.queue_size,
        })
    }
}

impl BlockDevice {
    /// Opens, connects and starts the device described by `config`, and validates
    /// its limits.
    pub fn open(config: &DeviceConfig) -> Result<Self, Error> {
        let setup = Setup {
            path: &config.path,
            driver: config.driver,
        };
        let want_direct = config.driver == Driver::IoUring && config.direct;
        let mut blkio = setup.create(config, want_direct)?;
        let mut fallback = None;
        let connected = if want_direct && test_hooks::refuse_direct() {
            Err(blkio::Error::new(
                Errno::INVAL,
                "Invalid argument (O_DIRECT refused by a test hook)",
            ))
        } else {
            blkio.connect()
        };
        if let Err(e) = connected {
            // O_DIRECT refused by the file system (EINVAL from open(2)): retry
            // buffered, with a fresh instance so nothing of the failed attempt stays.
            if want_direct && e.errno() == Errno::INVAL {
                let why = format!("O_DIRECT refused ({}); using buffered I/O", e.message());
                let mut buffered = setup.create(config, false)?;
                buffered.connect().map_err(setup.err("connect"))?;
                tracing::warn!(path = %config.path.display(), "{why}");
                fallback = Some(why);
                blkio = buffered;
            } else {
                return Err(setup.err("connect")(e));
            }
        }

        let mut limits = setup.limits(&blkio, config)?;
        limits.direct_fallback = fallback;

        let queue_size = i32::try_from(config.queue_size.max(1)).unwrap_or(i32::MAX);
        match config.driver {
            Driver::IoUring => blkio
                .set_i32("num-entries", queue_size)
                .map_err(setup.err("set \"num-entries\""))?,
            Driver::VirtioBlkVhostUser => {
                let max = blkio
                    .get_i32("max-queue-size")
                    .map_err(setup.err("get \"max-queue-size\""))?;
                // A power of two no larger than what the device offers.
                let mut q = (queue_size as u32).next_power_of_two().min(1 << 15) as i32;
                while q > max && q > 1 {
                    q /= 2;
                }
                limits.queue_size = q as u32;
                blkio
                    .set_i32("queue-size", q)
                    .map_err(setup.err("set \"queue-size\""))?;
            }
        }
        blkio
            .set_i32("num-queues", 1)
            .map_err(setup.err("set \"num-queues\""))?;

        let mut started = blkio.start().map_err(setup.err("start"))?;
        if started.queues.is_empty() {
            return Err(setup.err("start")(blkio::Error::new(
                Errno::NODEV,
                "the driver started no queue",
            )));
        }
        let mut queue = started.queues.swap_remove(0);
        if queue.get_completion_fd().is_none() {
            return Err(setup.err("get completion fd")(blkio::Error::new(
                Errno::NOTSUP,
                "the queue has no completion fd",
            )));
        }
        // virtio queues start with notifications off; QEMU turns them on here too.
        queue.set_completion_fd_enabled(true);

        tracing::debug!(
            driver = %config.driver,
            path = %config.path.display(),
            ?limits,
            "block device started"
        );
        Ok(Self {
            config: config.clone(),
            limits,
            queue,
            blkio,
        })
    }

    /// The validated limits.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The configuration it was opened with.
    pub fn config(&self) -> &DeviceConfig {
        &self.config
    }

    /// A short name for messages: the path.
    pub fn name(&self) -> String {
        self.config.path.display().to_string()
    }
}

/// Lets tests take the O_DIRECT fallback path on a kernel whose file systems all
/// accept O_DIRECT (tmpfs does since Linux 6.6).
pub(crate) mod test_hooks {
    #[cfg(test)]
    thread_local! {
        static REFUSE_DIRECT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    /// Makes `BlockDevice::open` on this thread see O_DIRECT refused (EINVAL).
    #[cfg(test)]
    pub(crate) fn set_refuse_direct(on: bool) {
        REFUSE_DIRECT.with(|c| c.set(on));
    }

    #[cfg(test)]
    pub(crate) fn refuse_direct() -> bool {
        REFUSE_DIRECT.with(|c| c.get())
    }

    #[cfg(not(test))]
    pub(crate) fn refuse_direct() -> bool {
        false
    }
}
