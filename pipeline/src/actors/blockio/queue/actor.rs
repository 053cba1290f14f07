//! The actor thread: owns the libblkio queue, its completion fd and the bounce pool.
//!
//! One loop: take requests from the mailbox (up to `max_in_flight` outstanding),
//! validate and enqueue them, submit with `blkioq_do_io` (keeping the completions
//! that call returns), then sleep in poll(2) on the completion fd and the mailbox's
//! wake-up eventfd. A readable completion fd is handled the way libblkio documents:
//! reset the eventfd, disable notification, drain, re-enable, drain once more.

use std::collections::VecDeque;
use std::ffi::CStr;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{fence, AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, Errno, ReqFlags};
use crossbeam_channel::{Receiver, TryRecvError};

use super::bounce::{BounceAllocator, GROW_PAD};
use super::buffer::{Buffer, MappedRegion, SlotPool};
use super::{Error, Limits, Op, Reply, Request, Stats};

/// Completions fetched per `do_io` call.
const COMPLETION_BATCH: usize = 64;
/// How often outstanding requests are checked against the request timeout.
const DEADLINE_CHECK: Duration = Duration::from_secs(1);

/// State shared by the actor and every [`super::Mailbox`].
#[derive(Debug)]
pub(crate) struct Shared {
    /// eventfd a sender writes when the actor sleeps (or to stop it).
    wake: OwnedFd,
    /// The actor is about to sleep, or sleeps, in poll(2).
    sleeping: AtomicBool,
    /// Stop: answer queued requests with [`Error::Stopping`], finish in-flight ones, exit.
    stop: AtomicBool,
    /// The device's name for messages.
    pub(crate) device: String,
}

impl Shared {
    pub(crate) fn new(device: String) -> io::Result<Self> {
        // SAFETY: eventfd has no memory-safety preconditions.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            // SAFETY: a new descriptor nothing else owns.
            wake: unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) },
            sleeping: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            device,
        })
    }

    fn kick(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd. A full counter
        // (EAGAIN) still leaves it readable, which is all that matters.
        unsafe {
            libc::write(self.wake.as_raw_fd(), (&one as *const u64).cast(), 8);
        }
    }

    /// Called by a sender after putting a request in the channel.
    pub(crate) fn notify(&self) {
        // Pairs with the fence in `Actor::wait`: either the actor sees the request
        // in the channel, or this load sees `sleeping` and wakes it.
        fence(Ordering::SeqCst);
        if self.sleeping.load(Ordering::Relaxed) && self.sleeping.swap(false, Ordering::SeqCst) {
            self.kick();
        }
    }

    pub(crate) fn request_stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.kick();
    }
}

/// Resets an eventfd (non-blocking; nothing to read is fine).
fn drain_eventfd(fd: RawFd) {
    let mut v: u64 = 0;
    // SAFETY: reads at most 8 bytes into a live u64. Both eventfds are
    // non-blocking (ours by EFD_NONBLOCK, libblkio's by its drivers), so this never
    // blocks; errors (EAGAIN) are ignored as QEMU does.
    unsafe {
        libc::read(fd, (&mut v as *mut u64).cast(), 8);
    }
}

/// Where a request's answer goes.
enum ReplyTo {
    Buffer(Reply<Buffer>),
    Buffers(Reply<Vec<Buffer>>),
    Unit(Reply<()>),
}

impl ReplyTo {
    fn fail(self, e: Error) {
        // A sender that stopped listening is not our problem.
        match self {
            ReplyTo::Buffer(tx) => drop(tx.send(Err(e))),
            ReplyTo::Buffers(tx) => drop(tx.send(Err(e))),
            ReplyTo::Unit(tx) => drop(tx.send(Err(e))),
        }
    }

    fn succeed(self, mut bufs: Vec<Buffer>) {
        match self {
            ReplyTo::Buffer(tx) => drop(tx.send(Ok(bufs.pop().expect("a read has its buffer")))),
            ReplyTo::Buffers(tx) => drop(tx.send(Ok(bufs))),
            ReplyTo::Unit(tx) => drop(tx.send(Ok(()))),
        }
    }
}

/// A validated request, ready to be submitted (possibly after waiting for bounce
/// space).
struct Prepared {
    op: Op,
    offset: u64,
    len: u64,
    flags: ReqFlags,
    /// Source (writes) or destination (reads) buffers.
    bufs: Vec<Buffer>,
    reply: ReplyTo,
    /// The buffers are not in a registered region and the driver needs one.
    bounce: bool,
    /// A write-zeroes the device refused with ENOTSUP, done as writes from the
    /// zero region, one chunk at a time (as QEMU's block layer falls back).
    zero_fill: Option<ZeroFill>,
}

/// Progress of a write-zeroes done by writing zeroes.
#[derive(Debug, Clone, Copy)]
struct ZeroFill {
    /// Offset of the chunk being written.
    next: u64,
    /// Its length.
    chunk: u64,
    /// End of the whole request.
    end: u64,
}

/// Size of the zero region that write-zeroes fallbacks write from.
const ZERO_REGION: usize = 1 << 20;

/// A submitted request. Everything the device may touch (buffers, the bounce
/// range, the iovec array libblkio keeps a pointer to) lives here until its
/// completion is reaped.
struct InFlight {
    req: Prepared,
    bounce_off: Option<usize>,
    /// Read by libblkio (and the kernel) after submission; a boxed slice's heap
    /// storage does not move when the InFlight moves.
    iov: IovArray,
    started: Instant,
}

/// The iovec array of a submitted request.
struct IovArray(Box<[blkio::iovec]>);

// SAFETY: the iovecs point into the request's own buffers or its bounce range,
// which travel together with the array inside one InFlight; the array is never
// shared, only moved (with the whole actor, before it starts).
unsafe impl Send for IovArray {}

/// Why the actor stops early; makes one error per failed request.
#[derive(Clone)]
enum Fatal {
    Queue(Arc<blkio::Error>),
    Wait(i32),
    Timeout(Duration),
}

impl Fatal {
    fn error(&self, device: &str) -> Error {
        let device = device.to_string();
        match self {
            Fatal::Queue(source) => Error::Queue {
                device,
                source: Arc::clone(source),
            },
            Fatal::Wait(errno) => Error::Wait {
                device,
                source: io::Error::from_raw_os_error(*errno),
            },
            Fatal::Timeout(timeout) => Error::Timeout {
                device,
                timeout: *timeout,
            },
        }
    }
}

/// The actor's state; lives on the actor thread.
pub(crate) struct Actor {
    device: String,
    limits: Arc<Limits>,
    rx: Receiver<Request>,
    shared: Arc<Shared>,
    pool: Arc<SlotPool>,
    completion_fd: RawFd,
    completions: Vec<MaybeUninit<Completion>>,
    slab: Vec<Option<InFlight>>,
    free_ids: Vec<usize>,
    in_flight: usize,
    max_in_flight: usize,
    /// Requests enqueued in libblkio but not yet passed to `do_io`.
    unsubmitted: bool,
    bounce_region: Option<MappedRegion>,
    bounce: BounceAllocator,
    bounce_initial: usize,
    bounce_freed: bool,
    /// Never-written zero pages, registered; source of write-zeroes fallbacks.
    zero_region: Option<MappedRegion>,
    /// Requests waiting for bounce space, first come first served.
    waiters: VecDeque<Prepared>,
    request_timeout: Duration,
    last_deadline_check: Instant,
    stats: Stats,
    // Drop order: the queue before the Blkio instance.
    queue: Blkioq,
    blkio: Blkio,
}

pub(crate) struct ActorParts {
    pub(crate) device: String,
    pub(crate) limits: Arc<Limits>,
    pub(crate) rx: Receiver<Request>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) pool: Arc<SlotPool>,
    pub(crate) queue: Blkioq,
    pub(crate) blkio: Blkio,
    pub(crate) max_in_flight: usize,
    pub(crate) bounce_initial: usize,
    pub(crate) request_timeout: Duration,
}

impl Actor {
    pub(crate) fn new(p: ActorParts) -> Self {
        let completion_fd = p
            .queue
            .get_completion_fd()
            .expect("checked when the device was opened");
        Self {
            device: p.device,
            limits: p.limits,
            rx: p.rx,
            shared: p.shared,
            pool: p.pool,
            completion_fd,
            completions: (0..COMPLETION_BATCH)
                .map(|_| MaybeUninit::uninit())
                .collect(),
            slab: Vec::new(),
            free_ids: Vec::new(),
            in_flight: 0,
            max_in_flight: p.max_in_flight.max(1),
            unsubmitted: false,
            bounce_region: None,
            bounce: BounceAllocator::new(0),
            bounce_initial: p.bounce_initial,
            bounce_freed: false,
            zero_region: None,
            waiters: VecDeque::new(),
            request_timeout: p.request_timeout,
            last_deadline_check: Instant::now(),
            stats: Stats::default(),
            queue: p.queue,
            blkio: p.blkio,
        }
    }

    /// Runs until stopped; returns the statistics, or the error that stopped it
    /// (every outstanding request has then been answered with it).
    pub(crate) fn run(mut self) -> Result<Stats, Error> {
        let outcome = self.main_loop();
        match outcome {
            Ok(()) => {
                self.teardown();
                Ok(std::mem::take(&mut self.stats))
            }
            Err(fatal) => {
                let device = self.device.clone();
                tracing::error!(device = %device, error = %fatal.error(&device), "block-IO actor failed");
                if !self.fail_all(&fatal) {
                    // Nothing was in the device's hands: unregister as usual.
                    self.teardown();
                }
                Err(fatal.error(&device))
            }
        }
    }

    fn outstanding(&self) -> usize {
        self.in_flight + self.waiters.len()
    }

    fn main_loop(&mut self) -> Result<(), Fatal> {
        let mut stopping = false;
        loop {
            if !stopping && self.shared.stop.load(Ordering::SeqCst) {
                stopping = true;
            }
            if stopping {
                // Taken requests (in flight or waiting for bounce space) complete;
                // the rest are refused.
                while let Ok(req) = self.rx.try_recv() {
                    self.refuse(req);
                }
            } else {
                while self.outstanding() < self.max_in_flight {
                    match self.rx.try_recv() {
                        Ok(req) => self.accept(req),
                        Err(TryRecvError::Empty) => break,
                        Err(TryRecvError::Disconnected) => {
                            stopping = true;
                            break;
                        }
                    }
                }
            }
            if self.unsubmitted {
                let n = self.pump()?;
                self.stats.reaped_on_submit += n as u64;
            }
            if stopping && self.in_flight == 0 && self.waiters.is_empty() {
                return Ok(());
            }
            self.wait(stopping)?;
        }
    }

    /// Sleeps until a completion, a request or a stop; handles the completion fd.
    fn wait(&mut self, stopping: bool) -> Result<(), Fatal> {
        let can_take = !stopping && self.outstanding() < self.max_in_flight;
        if can_take {
            self.shared.sleeping.store(true, Ordering::SeqCst);
            // Pairs with the fence in `Shared::notify`.
            fence(Ordering::SeqCst);
            if !self.rx.is_empty() || self.shared.stop.load(Ordering::SeqCst) {
                self.shared.sleeping.store(false, Ordering::SeqCst);
                return Ok(());
            }
        }
        let mut fds = [
            libc::pollfd {
                fd: self.completion_fd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.shared.wake.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let timeout_ms = if self.in_flight > 0 {
            DEADLINE_CHECK.as_millis() as libc::c_int
        } else {
            -1
        };
        // SAFETY: `fds` is a live array of two pollfd structs.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        self.shared.sleeping.store(false, Ordering::SeqCst);
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(Fatal::Wait(e.raw_os_error().unwrap_or(libc::EIO)));
            }
            return Ok(());
        }
        if fds[1].revents & libc::POLLIN != 0 {
            drain_eventfd(self.shared.wake.as_raw_fd());
        }
        if fds[0].revents != 0 {
            self.on_completion_fd()?;
        }
        self.check_deadlines()
    }

    /// The completion fd is readable: reset it, then drain with notifications off,
    /// re-enable them and drain once more so a completion that raced with the
    /// re-enable is not left waiting for an event that never comes.
    fn on_completion_fd(&mut self) -> Result<(), Fatal> {
        self.stats.completion_fd_wakeups += 1;
        drain_eventfd(self.completion_fd);
        self.queue.set_completion_fd_enabled(false);
        let first = self.pump();
        self.queue.set_completion_fd_enabled(true);
        first?;
        self.pump()?;
        Ok(())
    }

    /// Calls `do_io` (which submits whatever is enqueued and returns completions)
    /// until it has nothing more to give, handling every completion it returns.
    /// Returns the number of completions handled.
    fn pump(&mut self) -> Result<usize, Fatal> {
        let mut total = 0;
        loop {
            self.unsubmitted = false;
            let n = match self.queue.do_io(&mut self.completions, 0, None, None) {
                Ok(n) => n,
                Err(e) if matches!(e.errno(), Errno::INTR | Errno::AGAIN | Errno::BUSY) => {
                    // Transient; completions reaped so far stay in libblkio's backlog.
                    self.unsubmitted = true;
                    tracing::debug!(device = %self.device, error = %e, "do_io: retrying later");
                    return Ok(total);
                }
                Err(e) => return Err(Fatal::Queue(Arc::new(e))),
            };
            for i in 0..n {
                // SAFETY: do_io initialised the first `n` elements; each is read
                // exactly once and then considered uninitialised again.
                let c = unsafe { self.completions[i].assume_init_read() };
                self.complete(c);
            }
            total += n;
            if self.bounce_freed {
                self.bounce_freed = false;
                self.kick_waiters();
            }
            if n < self.completions.len() && !self.unsubmitted {
                return Ok(total);
            }
        }
    }

    fn check_deadlines(&mut self) -> Result<(), Fatal> {
        if self.in_flight == 0 || self.last_deadline_check.elapsed() < DEADLINE_CHECK {
            return Ok(());
        }
        self.last_deadline_check = Instant::now();
        let oldest = self.slab.iter().flatten().map(|f| f.started).min();
        match oldest {
            Some(t) if t.elapsed() > self.request_timeout => {
                Err(Fatal::Timeout(self.request_timeout))
            }
            _ => Ok(()),
        }
    }

    fn refuse(&self, req: Request) {
        let e = Error::Stopping {
            device: self.device.clone(),
        };
        let (reply, _) = split(req);
        reply.fail(e);
    }

    /// Validates a request and submits it, queues it for bounce space, or answers
    /// it with an error.
    fn accept(&mut self, req: Request) {
        self.stats.requests += 1;
        match self.prepare(req) {
            Ok(p) if p.bounce => {
                self.stats.bounced += 1;
                if !self.waiters.is_empty() {
                    self.stats.bounce_waits += 1;
                }
                // Join the back of the line; `kick_waiters` serves it in order.
                self.waiters.push_back(p);
                self.kick_waiters();
            }
            Ok(p) => self.submit(p, None),
            Err((reply, e)) => {
                self.stats.errors += 1;
                reply.fail(e);
            }
        }
    }

    fn prepare(&mut self, req: Request) -> Result<Prepared, (ReplyTo, Error)> {
        let (reply, body) = split(req);
        // `read_len`: a Read whose buffer the actor allocates once the request is
        // known to be valid (never allocate what a bogus length asks for).
        let (op, offset, len, flags, bufs, read_len) = match body {
            Body::Read { offset, len } => (
                Op::Read,
                offset,
                len as u64,
                ReqFlags::empty(),
                Vec::new(),
                Some(len),
            ),
            Body::Readv { offset, bufs } => {
                let len = bufs.iter().map(|b| b.len() as u64).sum();
                (Op::Read, offset, len, ReqFlags::empty(), bufs, None)
            }
            Body::Write { offset, bufs, fua } => {
                let len = bufs.iter().map(|b| b.len() as u64).sum();
                let flags = if fua {
                    ReqFlags::FUA
                } else {
                    ReqFlags::empty()
                };
                (Op::Write, offset, len, flags, bufs, None)
            }
            Body::Flush => (Op::Flush, 0, 0, ReqFlags::empty(), Vec::new(), None),
            Body::WriteZeroes { offset, len, flags } => {
                let mut f = ReqFlags::empty();
                f.set(ReqFlags::FUA, flags.fua);
                f.set(ReqFlags::NO_UNMAP, flags.no_unmap);
                f.set(ReqFlags::NO_FALLBACK, flags.no_fallback);
                (Op::WriteZeroes, offset, len, f, Vec::new(), None)
            }
            Body::Discard { offset, len } => (
                Op::Discard,
                offset,
                len,
                ReqFlags::empty(),
                Vec::new(),
                None,
            ),
        };
        if let Err(e) = self.check_range(op, offset, len) {
            return Err((reply, e));
        }
        let mut bufs = bufs;
        if let Some(n) = read_len {
            let registered = if n <= self.pool.slot_size() {
                self.pool.try_take(n)
            } else {
                None
            };
            bufs.push(registered.unwrap_or_else(|| Buffer::zeroed(n)));
        }
        match self.check_buffers(op, offset, &bufs, len) {
            Ok(bounce) => Ok(Prepared {
                op,
                offset,
                len,
                flags,
                bufs,
                reply,
                bounce,
                zero_fill: None,
            }),
            Err(e) => Err((reply, e)),
        }
    }

    /// Read-only, empty, alignment, size and range checks.
    fn check_range(&self, op: Op, offset: u64, len: u64) -> Result<(), Error> {
        let l = &self.limits;
        let device = || self.device.clone();
        if op == Op::Flush {
            return Ok(());
        }
        if l.read_only && op != Op::Read {
            return Err(Error::ReadOnly {
                device: device(),
                op,
            });
        }
        if len == 0 {
            return Err(Error::Empty {
                device: device(),
                op,
                offset,
            });
        }
        let ra = l.request_alignment;
        if offset % ra != 0 || len % ra != 0 {
            return Err(Error::Unaligned {
                device: device(),
                op,
                offset,
                len,
                alignment: ra,
                what: "request-alignment",
            });
        }
        let (max, what) = match op {
            Op::Read | Op::Write if l.max_transfer != 0 => (l.max_request, "max-transfer"),
            Op::Read | Op::Write => (l.max_request, "the actor's max request"),
            Op::WriteZeroes => (l.max_write_zeroes_len, "max-write-zeroes-len"),
            Op::Discard => (l.max_discard_len, "max-discard-len"),
            Op::Flush => (0, ""),
        };
        if max != 0 && len > max {
            return Err(Error::TooLarge {
                device: device(),
                op,
                offset,
                len,
                max,
                what,
            });
        }
        if offset.checked_add(len).is_none_or(|end| end > l.capacity) {
            return Err(Error::OutOfRange {
                device: device(),
                op,
                offset,
                len,
                capacity: l.capacity,
            });
        }
        Ok(())
    }

    /// Buffer alignment and segment checks; returns whether the request must go
    /// through the bounce pool.
    fn check_buffers(&self, op: Op, offset: u64, bufs: &[Buffer], len: u64) -> Result<bool, Error> {
        if bufs.is_empty() {
            return Ok(false);
        }
        let l = &self.limits;
        let ba = l.buf_alignment as usize;
        for b in bufs {
            if (b.addr() as usize) % ba != 0 || b.len() % ba != 0 {
                return Err(Error::Unaligned {
                    device: self.device.clone(),
                    op,
                    offset,
                    len: b.len() as u64,
                    alignment: ba as u64,
                    what: "buf-alignment",
                });
            }
        }
        let bounce = l.needs_mem_regions
            && bufs.iter().any(|b| {
                !b.is_empty() && !b.slot_pool().is_some_and(|p| Arc::ptr_eq(p, &self.pool))
            });
        let segments = if bounce {
            segments_of(len as usize, l.max_segment_len)
        } else {
            bufs.iter()
                .map(|b| segments_of(b.len(), l.max_segment_len))
                .sum()
        };
        if segments as u64 > l.max_segments {
            return Err(Error::TooManySegments {
                device: self.device.clone(),
                op,
                offset,
                segments,
                max: l.max_segments as usize,
            });
        }
        Ok(bounce)
    }

    /// Serves waiting bounce requests in order: the front one gets space or
    /// everyone keeps waiting; the pool is replaced by a larger one only when no
    /// bounce buffer is allocated (nothing using it is in flight).
    fn kick_waiters(&mut self) {
        while let Some(front) = self.waiters.front() {
            let need = front.len as usize;
            if let Some(off) = self.bounce.try_alloc(need) {
                let p = self.waiters.pop_front().expect("front exists");
                self.submit(p, Some(off));
                continue;
            }
            if !self.bounce.is_idle() {
                // Space comes back when an in-flight bounce request completes.
                return;
            }
            if let Err(e) = self.resize_bounce(need) {
                let p = self.waiters.pop_front().expect("front exists");
                self.stats.errors += 1;
                p.reply.fail(e);
            }
        }
    }

    fn resize_bounce(&mut self, need: usize) -> Result<(), Error> {
        let first = self.bounce_region.is_none();
        let mut len = BounceAllocator::round(need) + GROW_PAD;
        if first {
            len = len.max(self.bounce_initial);
        }
        if let Some(old) = self.bounce_region.take() {
            self.blkio.unmap_mem_region(&old.blkio_region());
        }
        self.bounce.reset(0);
        let mem_err = |what, source| Error::MemRegion {
            device: self.device.clone(),
            len,
            what,
            source,
        };
        let region =
            MappedRegion::new(len, c"ferry-blockio-bounce").map_err(|e| mem_err("allocate", e))?;
        self.blkio
            .map_mem_region(&region.blkio_region())
            .map_err(|e| mem_err("map", blkio_io_error(&e)))?;
        self.bounce.reset(region.len());
        self.stats.bounce_resizes += 1;
        self.stats.bounce_pool_bytes = region.len() as u64;
        tracing::debug!(device = %self.device, bytes = region.len(), "bounce pool resized");
        self.bounce_region = Some(region);
        Ok(())
    }

    fn alloc_id(&mut self) -> usize {
        if let Some(id) = self.free_ids.pop() {
            id
        } else {
            self.slab.push(None);
            self.slab.len() - 1
        }
    }

    /// Enqueues a prepared request in libblkio; `do_io` submits it later.
    fn submit(&mut self, req: Prepared, bounce_off: Option<usize>) {
        let max_seg = self.limits.max_segment_len;
        let mut ranges: Vec<(*mut u8, usize)> = Vec::new();
        if let Some(z) = req.zero_fill {
            let region = self
                .zero_region
                .as_ref()
                .expect("zero fill implies the region");
            debug_assert!(z.chunk as usize <= region.len());
            ranges.push((region.addr(), z.chunk as usize));
        } else if let Some(off) = bounce_off {
            let region = self
                .bounce_region
                .as_ref()
                .expect("bounce space implies a pool");
            let len = req.len as usize;
            debug_assert!(off + len <= region.len());
            // SAFETY: the allocator gave this request [off, off + len) inside the
            // region, so the pointer stays in bounds.
            let base = unsafe { region.addr().add(off) };
            if req.op == Op::Write {
                let mut at = 0;
                for b in &req.bufs {
                    // SAFETY: the destination range [off + at, off + at + b.len())
                    // is inside this request's bounce range (the lengths sum to
                    // `len`) and belongs to it alone; the source is a live Buffer in
                    // different memory.
                    unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), base.add(at), b.len()) };
                    at += b.len();
                }
            }
            ranges.push((base, len));
        } else {
            ranges.extend(
                req.bufs
                    .iter()
                    .filter(|b| !b.is_empty())
                    .map(|b| (b.addr(), b.len())),
            );
        }
        let iov: Box<[blkio::iovec]> = ranges
            .into_iter()
            .flat_map(|(p, len)| split_segments(p, len, max_seg))
            .collect();
        let id = self.alloc_id();
        let (mut op, mut offset, len, mut flags) = (req.op, req.offset, req.len, req.flags);
        if let Some(z) = req.zero_fill {
            // A chunk of plain write from the zero region (FUA kept).
            (op, offset) = (Op::Write, z.next);
            flags &= ReqFlags::FUA;
        }
        // The buffers and the iovec array now live in the slab until the completion
        // with user_data == id is reaped (or are leaked if the queue dies), so the
        // pointers handed to libblkio below stay valid for the whole request.
        self.slab[id] = Some(InFlight {
            req,
            bounce_off,
            iov: IovArray(iov),
            started: Instant::now(),
        });
        let iov = &self.slab[id].as_ref().expect("just stored").iov.0;
        let q = &mut self.queue;
        match op {
            Op::Read if iov.len() == 1 => {
                q.read(offset, iov[0].iov_base.cast(), iov[0].iov_len, id, flags)
            }
            Op::Read => q.readv(offset, iov.as_ptr(), iov.len() as u32, id, flags),
            Op::Write if iov.len() == 1 => {
                q.write(offset, iov[0].iov_base.cast(), iov[0].iov_len, id, flags)
            }
            Op::Write => q.writev(offset, iov.as_ptr(), iov.len() as u32, id, flags),
            Op::Flush => q.flush(id, flags),
            Op::WriteZeroes => q.write_zeroes(offset, len, id, flags),
            Op::Discard => q.discard(offset, len, id, flags),
        }
        self.in_flight += 1;
        self.stats.max_in_flight = self.stats.max_in_flight.max(self.in_flight as u64);
        self.unsubmitted = true;
    }

    /// Handles one completion: bounce copy-out, statistics, the reply.
    fn complete(&mut self, c: Completion) {
        let Some(f) = self.slab.get_mut(c.user_data).and_then(Option::take) else {
            tracing::warn!(device = %self.device, user_data = c.user_data, "completion for no request");
            return;
        };
        self.free_ids.push(c.user_data);
        self.in_flight -= 1;
        self.stats.completed += 1;
        let InFlight {
            mut req,
            bounce_off,
            ..
        } = f;
        if let Some(off) = bounce_off {
            if c.ret == 0 && req.op == Op::Read {
                self.copy_from_bounce(off, &mut req.bufs);
            }
            self.bounce.free(off);
            self.bounce_freed = true;
        }
        if c.ret < 0 {
            return self.failed(req, &c);
        }
        if let Some(z) = req.zero_fill.as_mut() {
            z.next += z.chunk;
            if z.next < z.end {
                z.chunk = (z.end - z.next).min(z.chunk);
                self.submit(req, None);
                return;
            }
        }
        match req.op {
            Op::Read => self.stats.bytes_read += req.len,
            Op::Write => self.stats.bytes_written += req.len,
            Op::WriteZeroes => self.stats.bytes_zeroed += req.len,
            Op::Discard => self.stats.bytes_discarded += req.len,
            Op::Flush => self.stats.flushes += 1,
        }
        req.reply.succeed(req.bufs);
    }

    /// Copies a completed read out of its bounce range at `off` into `bufs`.
    fn copy_from_bounce(&self, off: usize, bufs: &mut [Buffer]) {
        let region = self
            .bounce_region
            .as_ref()
            .expect("bounce space implies a pool");
        let mut at = 0;
        for b in bufs {
            let n = b.len();
            // SAFETY: [off + at, off + at + n) lies in this request's bounce
            // range, which the device has finished writing (its completion
            // is being handled); the destination is a live Buffer we own.
            unsafe {
                std::ptr::copy_nonoverlapping(region.addr().add(off + at), b.as_mut_ptr(), n)
            };
            at += n;
        }
    }

    /// A request the device failed (`c.ret < 0`): falls back where QEMU's block
    /// layer does, otherwise answers with the device's error.
    fn failed(&mut self, req: Prepared, c: &Completion) {
        if req.op == Op::WriteZeroes
            && req.zero_fill.is_none()
            && -c.ret == libc::ENOTSUP
            && !req.flags.contains(ReqFlags::NO_FALLBACK)
        {
            self.stats.zero_fallbacks += 1;
            return self.start_zero_fill(req);
        }
        if c.ret == -libc::ENOTSUP && req.op == Op::Discard {
            // Discard is advisory; QEMU's bdrv_co_pdiscard treats ENOTSUP as done.
            // (libblkio's io_uring driver punches holes with FALLOC_FL_NO_HIDE_STALE,
            // which regular file systems refuse.)
            self.stats.discards_unsupported += 1;
            return req.reply.succeed(req.bufs);
        }
        self.stats.errors += 1;
        let detail = if c.error_msg.is_null() {
            None
        } else {
            // SAFETY: libblkio sets error_msg to null or to a `&'static CStr`
            // (Completion::for_failed_req takes one), so it is a valid
            // NUL-terminated string that lives for the whole program.
            Some(
                unsafe { CStr::from_ptr(c.error_msg) }
                    .to_string_lossy()
                    .into_owned(),
            )
        };
        req.reply.fail(Error::Io {
            device: self.device.clone(),
            op: req.op,
            offset: req.offset,
            len: req.len,
            detail,
            source: io::Error::from_raw_os_error(-c.ret),
        });
    }

    /// Starts writing zeroes for a write-zeroes the device refused.
    fn start_zero_fill(&mut self, mut req: Prepared) {
        if self.zero_region.is_none() {
            let mem_err = |what, source| Error::MemRegion {
                device: self.device.clone(),
                len: ZERO_REGION,
                what,
                source,
            };
            let region = match MappedRegion::new(ZERO_REGION, c"ferry-blockio-zeroes") {
                Ok(r) => r,
                Err(e) => return req.reply.fail(mem_err("allocate zero region", e)),
            };
            if let Err(e) = self.blkio.map_mem_region(&region.blkio_region()) {
                return req
                    .reply
                    .fail(mem_err("map zero region", blkio_io_error(&e)));
            }
            self.zero_region = Some(region);
        }
        let l = &self.limits;
        let mut chunk = (ZERO_REGION as u64).min(l.max_request);
        if l.max_segment_len != 0 {
            chunk = chunk.min(l.max_segment_len * l.max_segments);
        }
        let chunk = (chunk / l.request_alignment * l.request_alignment).max(l.request_alignment);
        req.zero_fill = Some(ZeroFill {
            next: req.offset,
            chunk: chunk.min(req.len),
            end: req.offset + req.len,
        });
        self.submit(req, None);
    }

    /// Normal exit: nothing is in flight. Unregister our regions before the queue
    /// and the Blkio instance go.
    fn teardown(&mut self) {
        debug_assert_eq!(self.in_flight, 0);
        if let Some(region) = self.bounce_region.take() {
            self.blkio.unmap_mem_region(&region.blkio_region());
        }
        if let Some(region) = self.zero_region.take() {
            self.blkio.unmap_mem_region(&region.blkio_region());
        }
        self.blkio
            .unmap_mem_region(&self.pool.region().blkio_region());
    }

    /// Fatal exit: answer everyone. Submitted requests may still be in the hands
    /// of the device, so their buffers and the bounce pool are leaked rather than
    /// freed (a leak is safe; memory reused under a late DMA is not). Returns
    /// whether anything was leaked.
    fn fail_all(&mut self, fatal: &Fatal) -> bool {
        for w in std::mem::take(&mut self.waiters) {
            w.reply.fail(fatal.error(&self.device));
        }
        while let Ok(req) = self.rx.try_recv() {
            let (reply, _) = split(req);
            reply.fail(fatal.error(&self.device));
        }
        let mut leaked = false;
        for slot in &mut self.slab {
            if let Some(f) = slot.take() {
                let InFlight { req, iov, .. } = f;
                req.reply.fail(fatal.error(&self.device));
                std::mem::forget(req.bufs);
                std::mem::forget(iov);
                leaked = true;
            }
        }
        self.in_flight = 0;
        if leaked {
            if let Some(region) = self.bounce_region.take() {
                std::mem::forget(region);
            }
            if let Some(region) = self.zero_region.take() {
                std::mem::forget(region);
            }
        }
        leaked
    }
}

/// The request's reply channel and the rest of it.
enum Body {
    Read {
        offset: u64,
        len: usize,
    },
    Readv {
        offset: u64,
        bufs: Vec<Buffer>,
    },
    Write {
        offset: u64,
        bufs: Vec<Buffer>,
        fua: bool,
    },
    Flush,
    WriteZeroes {
        offset: u64,
        len: u64,
        flags: super::ZeroFlags,
    },
    Discard {
        offset: u64,
        len: u64,
    },
}

fn split(req: Request) -> (ReplyTo, Body) {
    match req {
        Request::Read { offset, len, reply } => {
            (ReplyTo::Buffer(reply), Body::Read { offset, len })
        }
        Request::Readv {
            offset,
            bufs,
            reply,
        } => (ReplyTo::Buffers(reply), Body::Readv { offset, bufs }),
        Request::Write {
            offset,
            data,
            fua,
            reply,
        } => (
            ReplyTo::Unit(reply),
            Body::Write {
                offset,
                bufs: vec![data],
                fua,
            },
        ),
        Request::Writev {
            offset,
            bufs,
            fua,
            reply,
        } => (ReplyTo::Unit(reply), Body::Write { offset, bufs, fua }),
        Request::Flush { reply } => (ReplyTo::Unit(reply), Body::Flush),
        Request::WriteZeroes {
            offset,
            len,
            flags,
            reply,
        } => (
            ReplyTo::Unit(reply),
            Body::WriteZeroes { offset, len, flags },
        ),
        Request::Discard { offset, len, reply } => {
            (ReplyTo::Unit(reply), Body::Discard { offset, len })
        }
    }
}

/// Segments a buffer of `len` bytes needs when segments are at most `max_seg`
/// bytes (0 = unlimited).
fn segments_of(len: usize, max_seg: u64) -> usize {
    if len == 0 {
        0
    } else if max_seg == 0 {
        1
    } else {
        len.div_ceil(max_seg as usize)
    }
}

/// Splits `[p, p + len)` into iovecs of at most `max_seg` bytes (0 = unlimited).
fn split_segments(p: *mut u8, len: usize, max_seg: u64) -> Vec<blkio::iovec> {
    let step = if max_seg == 0 {
        len.max(1)
    } else {
        max_seg as usize
    };
    (0..len)
        .step_by(step)
        .map(|at| blkio::iovec {
            iov_base: p.wrapping_add(at).cast(),
            iov_len: step.min(len - at),
        })
        .collect()
}

fn blkio_io_error(e: &blkio::Error) -> io::Error {
    io::Error::new(
        io::Error::from_raw_os_error(e.errno().raw_os_error()).kind(),
        format!("{} (errno {})", e.message(), e.errno().raw_os_error()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments() {
        assert_eq!(segments_of(0, 0), 0);
        assert_eq!(segments_of(1 << 20, 0), 1);
        assert_eq!(segments_of(1 << 20, 64 << 10), 16);
        assert_eq!(segments_of((1 << 20) + 1, 64 << 10), 17);
        let base = 0x10000 as *mut u8;
        let v = split_segments(base, 100, 30);
        let lens: Vec<_> = v.iter().map(|i| i.iov_len).collect();
        assert_eq!(lens, [30, 30, 30, 10]);
        assert_eq!(v[3].iov_base as usize, 0x10000 + 90);
        assert_eq!(split_segments(base, 100, 0).len(), 1);
    }
}
