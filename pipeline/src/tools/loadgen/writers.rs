//! The guest's "vCPUs": threads that dirty pages at a set rate, and the run
//! state (`stop`, `cont`, throttle) they obey. The disk writer
//! ([`super::disk`]) obeys the same state and paces itself the same way
//! ([`Pacer`]).
//!
//! Each writer owns a disjoint, contiguous share of the working set. It
//! paces itself in short slices: every [`SLICE`] it works out from the
//! elapsed time how many pages are due, writes them (XOR with a fixed random
//! page, as QEMU's guestperf stress does) and marks each in the dirty log
//! after writing it. Pacing by elapsed time rather than by counting sleeps
//! keeps the rate right when sleeps overshoot on a busy host.
//!
//! `stop` must guarantee that no page is written after its reply, or a
//! migration's final copy could miss a write. Writers therefore write only
//! between [`Vcpus::enter`] and [`Vcpus::leave`]; `stop` marks the guest
//! paused and waits until no writer is inside, and a writer inside checks a
//! flag before each page (the disk writer: before each disk write), so the
//! wait lasts at most one write.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use ferry_proto::stream::PAGE_SIZE;

use crate::tools::pattern::XorShift;
use ferry_guest::dirty_log::DirtyLog;

/// How often a writer wakes to write the pages that came due.
const SLICE: Duration = Duration::from_millis(2);

/// The longest a writer writes before it looks at the clock (and the
/// throttle) again, when it cannot keep up with its rate.
pub(super) const MAX_BATCH: Duration = Duration::from_millis(5);

/// Seconds of due pages a writer may owe; beyond that (a writer descheduled
/// for long, or one that cannot keep up) the debt is forgiven, so it never
/// bursts to catch up.
const MAX_DEBT_SECS: f64 = 0.1;

/// QEMU's CPU_THROTTLE_TIMESLICE_NS: with throttle p, a vCPU sleeps
/// p/(100-p) of the time it ran, about every timeslice.
const TIMESLICE: Duration = Duration::from_millis(10);

/// The most oversleeping a writer carries over to shorten later naps.
const MAX_OWED: Duration = Duration::from_millis(200);

/// How long a writer throttled by `percent` sleeps after running for `ran`.
fn throttle_share(ran: Duration, percent: u8) -> Duration {
    let p = u32::from(percent.min(99));
    ran * p / (100 - p)
}

/// The guest's run state, shared by the writers and the control socket.
#[derive(Debug)]
pub(crate) struct Vcpus {
    state: Mutex<State>,
    /// Signalled on every change of `state` and of the throttle.
    changed: Condvar,
    /// True from `stop` until `cont`: a writer inside checks it per page.
    stopping: AtomicBool,
    throttle: AtomicU8,
    pages_written: AtomicU64,
    disk_bytes_written: AtomicU64,
}

#[derive(Debug, Default)]
struct State {
    paused: bool,
    /// Paused because the guest now runs on the destination (QEMU's
    /// postmigrate): closing the control connection does not resume it.
    migrated: bool,
    /// Writers between `enter` and `leave`.
    busy: usize,
    shutdown: bool,
}

impl Vcpus {
    pub(crate) fn new() -> Self {
        Self {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            stopping: AtomicBool::new(false),
            throttle: AtomicU8::new(0),
            pages_written: AtomicU64::new(0),
            disk_bytes_written: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock; if it did, the state is
        // still consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.changed
            .wait(guard)
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Pauses every writer; returns once none is writing and none will until
    /// [`Vcpus::cont`]. Returns whether the guest was running.
    pub(crate) fn stop(&self) -> bool {
        let mut s = self.lock();
        let was_running = !s.paused;
        s.paused = true;
        self.stopping.store(true, Ordering::SeqCst);
        while s.busy > 0 {
            s = self.wait(s);
        }
        was_running
    }

    /// Lets the writers go on. Returns whether the guest was paused.
    pub(crate) fn cont(&self) -> bool {
        let mut s = self.lock();
        let was_paused = s.paused;
        s.paused = false;
        s.migrated = false;
        self.stopping.store(false, Ordering::SeqCst);
        drop(s);
        self.changed.notify_all();
        was_paused
    }

    /// True between `stop` and `cont`.
    pub(crate) fn is_paused(&self) -> bool {
        self.lock().paused
    }

    /// Marks a stopped guest as migrated; false if it is running.
    pub(crate) fn set_migrated(&self) -> bool {
        let mut s = self.lock();
        s.migrated = s.paused;
        s.migrated
    }

    /// True when the guest was stopped for a migration that completed.
    pub(crate) fn is_migrated(&self) -> bool {
        self.lock().migrated
    }

    /// Ends every writer (at its next look at the state).
    pub(crate) fn shutdown(&self) {
        self.lock().shutdown = true;
        self.changed.notify_all();
    }

    /// True once [`Vcpus::shutdown`] was called.
    pub(crate) fn is_shut_down(&self) -> bool {
        self.lock().shutdown
    }

    /// Sets the throttle, 0..=99 percent.
    pub(crate) fn set_throttle(&self, percent: u8) {
        self.throttle.store(percent.min(99), Ordering::SeqCst);
        // Wake writers sleeping off the old throttle.
        let _guard = self.lock();
        self.changed.notify_all();
    }

    /// The throttle in percent.
    pub(crate) fn throttle(&self) -> u8 {
        self.throttle.load(Ordering::SeqCst)
    }

    /// Pages written since the start.
    pub(crate) fn pages_written(&self) -> u64 {
        self.pages_written.load(Ordering::SeqCst)
    }

    /// Disk bytes written since the start.
    pub(crate) fn disk_bytes_written(&self) -> u64 {
        self.disk_bytes_written.load(Ordering::SeqCst)
    }

    /// True from `stop` until `cont`: a writer inside must not start another
    /// write.
    pub(super) fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Waits while paused, then counts the caller as writing. `None` on
    /// shutdown; otherwise whether it had to wait.
    pub(super) fn enter(&self) -> Option<bool> {
        let mut s = self.lock();
        let mut waited = false;
        while s.paused && !s.shutdown {
            waited = true;
            s = self.wait(s);
        }
        if s.shutdown {
            return None;
        }
        s.busy += 1;
        Some(waited)
    }

    /// Counts the caller as no longer writing, after it wrote `pages`.
    pub(super) fn leave(&self, pages: u64) {
        self.pages_written.fetch_add(pages, Ordering::SeqCst);
        self.exit();
    }

    /// Counts the disk writer as no longer writing, after it wrote `bytes`.
    pub(super) fn leave_disk(&self, bytes: u64) {
        self.disk_bytes_written.fetch_add(bytes, Ordering::SeqCst);
        self.exit();
    }

    /// The end of [`Vcpus::leave`]: the counters are up to date before
    /// `stop` can see the writer out.
    fn exit(&self) {
        let mut s = self.lock();
        s.busy -= 1;
        if s.busy == 0 && s.paused {
            drop(s);
            self.changed.notify_all();
        }
    }

    /// Sleeps off the throttle for a writer that ran for `ran`: the
    /// throttle's share of the time, p/(100-p) of the run time, less `owed`
    /// (time overslept before). Cut short by a pause, a shutdown or a lower
    /// throttle. Returns the time it slept.
    fn nap(&self, ran: Duration, owed: Duration) -> Duration {
        let start = Instant::now();
        let mut s = self.lock();
        loop {
            if s.shutdown || s.paused {
                break;
            }
            let end = start + throttle_share(ran, self.throttle()).saturating_sub(owed);
            let now = Instant::now();
            if now >= end {
                break;
            }
            s = self
                .changed
                .wait_timeout(s, end - now)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        start.elapsed()
    }

    /// Waits until shutdown (a writer with nothing to write).
    pub(super) fn idle(&self) {
        let mut s = self.lock();
        while !s.shutdown {
            s = self.wait(s);
        }
    }
}

/// Paces one writer thread at `rate` units (pages, bytes) per second, in
/// slices: each slice credits the time since the last, the writer does what
/// is due (or stops early), and [`Pacer::rest`] sleeps off the throttle or
/// until the next slice.
pub(super) struct Pacer<'a> {
    vcpus: &'a Vcpus,
    rate: f64,
    /// The most a writer may owe; beyond it the debt is forgiven.
    max_debt: f64,
    /// Units due and not yet done.
    due: f64,
    /// When time was last credited.
    last: Instant,
    /// Time run since the last throttle nap.
    ran: Duration,
    /// Time overslept in throttle naps, to be taken off the next naps.
    owed: Duration,
}

impl<'a> Pacer<'a> {
    /// A pacer for `rate` units per second that never owes more than
    /// `max_debt` units (nor less than [`MAX_DEBT_SECS`] of them).
    pub(super) fn new(vcpus: &'a Vcpus, rate: f64, max_debt: f64) -> Self {
        Self {
            vcpus,
            rate,
            max_debt: max_debt.max(rate * MAX_DEBT_SECS),
            due: 0.0,
            last: Instant::now(),
            ran: Duration::ZERO,
            owed: Duration::ZERO,
        }
    }

    /// Starts a slice, right after [`Vcpus::enter`] (`waited` is what it
    /// returned): credits the time since the last slice. Returns the slice's
    /// start.
    pub(super) fn start(&mut self, waited: bool) -> Instant {
        let now = Instant::now();
        if waited {
            // Paused time earns nothing.
            self.last = now;
            self.ran = Duration::ZERO;
            self.owed = Duration::ZERO;
            self.due = 0.0;
        }
        let elapsed = now - self.last;
        self.last = now;
        self.ran += elapsed;
        self.due = (self.due + self.rate * elapsed.as_secs_f64()).min(self.max_debt);
        now
    }

    /// Units due.
    pub(super) fn due(&self) -> f64 {
        self.due
    }

    /// Counts `done` units as done.
    pub(super) fn spend(&mut self, done: f64) {
        self.due -= done;
    }

    /// Ends a slice, after [`Vcpus::leave`]: sleeps off the throttle, or
    /// until the next slice if the writer `kept_up` (did all that was due).
    pub(super) fn rest(&mut self, kept_up: bool) {
        let throttle = self.vcpus.throttle();
        if throttle == 0 {
            // Unthrottled time is owed nothing: a throttle set later
            // counts from when it was set.
            self.ran = Duration::ZERO;
            self.owed = Duration::ZERO;
        }
        if throttle > 0 && self.ran >= TIMESLICE {
            // On a busy host a nap overshoots; the next naps are
            // shortened by as much, so the share of time asleep is right.
            let slept = self.vcpus.nap(self.ran, self.owed);
            let share = throttle_share(self.ran, self.vcpus.throttle());
            self.owed = (self.owed + slept).saturating_sub(share).min(MAX_OWED);
            // Throttled time earns nothing either.
            self.last = Instant::now();
            self.ran = Duration::ZERO;
        } else if kept_up {
            // Nothing more is due before the next slice.
            thread::sleep(SLICE);
        }
    }
}

/// One writer thread's work.
pub(crate) struct Writer<'a> {
    /// Its share of the working set (whole pages).
    pub(crate) pages: &'a mut [u8],
    /// The guest page number of `pages[0]`.
    pub(crate) first_page: u64,
    /// Pages per second to dirty.
    pub(crate) rate: f64,
    /// The page XORed into each page written.
    pub(crate) xor: &'a [u8],
    pub(crate) log: &'a DirtyLog,
    pub(crate) vcpus: &'a Vcpus,
    /// Seeds the choice of pages.
    pub(crate) seed: u64,
}

impl Writer<'_> {
    /// Dirties pages until shutdown.
    pub(crate) fn run(self) {
        let count = (self.pages.len() / PAGE_SIZE) as u64;
        if count == 0 || self.rate <= 0.0 {
            self.vcpus.idle();
            return;
        }
        let mut pacer = Pacer::new(self.vcpus, self.rate, 1.0);
        let mut rng = XorShift::new(self.seed);
        loop {
            let Some(waited) = self.vcpus.enter() else {
                return;
            };
            let now = pacer.start(waited);
            let todo = pacer.due() as u64;
            let mut done = 0u64;
            while done < todo {
                if self.vcpus.stopping() {
                    break;
                }
                if done % 64 == 63 && now.elapsed() >= MAX_BATCH {
                    break;
                }
                let page = rng.next_u64() % count;
                let at = page as usize * PAGE_SIZE;
                for (b, x) in self.pages[at..at + PAGE_SIZE].iter_mut().zip(self.xor) {
                    *b ^= *x;
                }
                // Write first, mark after: a scan that takes the bit then
                // copies the page sees this write.
                self.log.mark(self.first_page + page);
                done += 1;
            }
            pacer.spend(done as f64);
            self.vcpus.leave(done);
            pacer.rest(done == todo);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn stop_waits_for_writers_inside_and_cont_releases_them() {
        let v = Arc::new(Vcpus::new());
        assert_eq!(v.enter(), Some(false));
        let stopper = {
            let v = Arc::clone(&v);
            thread::spawn(move || v.stop())
        };
        thread::sleep(Duration::from_millis(50));
        assert!(
            !stopper.is_finished(),
            "stop returned while a writer was inside"
        );
        v.leave(3);
        assert!(stopper.join().unwrap());
        assert!(v.is_paused());
        assert_eq!(v.pages_written(), 3);
        let enterer = {
            let v = Arc::clone(&v);
            thread::spawn(move || v.enter())
        };
        thread::sleep(Duration::from_millis(50));
        assert!(!enterer.is_finished(), "a writer entered a paused guest");
        assert!(v.cont());
        assert_eq!(enterer.join().unwrap(), Some(true));
        v.leave(0);
        v.shutdown();
        assert_eq!(v.enter(), None);
    }
}
