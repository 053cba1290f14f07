//! The writer's own record of a bandwidth change: the bytes it wrote in each
//! rate window (QEMU's 100 ms `qemu_file_rate_limit` window) just before and
//! just after a `migrate-set-parameters max-bandwidth`, so that a change
//! "within one window" can be checked from the writer's counters rather than
//! from a client's polling. Bounded: [`KEPT`] windows each side of a change,
//! and [`MAX_CHANGES`] changes per migration.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Windows kept on each side of a change.
pub const KEPT: usize = 8;
/// Changes recorded per migration; later ones are not.
pub const MAX_CHANGES: usize = 16;

/// One rate window as the writer lived it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct Window {
    /// Start, milliseconds relative to the change (negative before it).
    pub start_ms: i64,
    /// Length, milliseconds: at least the window's 100 ms, longer when no
    /// chunk ended sooner (the counters are read between chunks).
    pub ms: u64,
    /// Stream bytes written in it, multifd channels included.
    pub bytes: u64,
    /// The cap in force, bytes per second (0 = unlimited).
    pub cap: u64,
}

/// One max-bandwidth change and the windows around it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct RateChange {
    /// The cap before, bytes per second (0 = unlimited).
    pub from: u64,
    /// The cap after.
    pub to: u64,
    /// Up to [`KEPT`] windows before the change, oldest first.
    pub before: Vec<Window>,
    /// Up to [`KEPT`] windows from the change on; the first starts at it.
    pub after: Vec<Window>,
}

/// A change whose after-windows are still being written.
#[derive(Debug)]
struct Open {
    at: Instant,
    change: RateChange,
}

/// The writer's window bookkeeping.
#[derive(Debug)]
pub struct Windows {
    window: Duration,
    cap: u64,
    /// The current window: its start and the byte count then.
    start: Instant,
    start_bytes: u64,
    /// Closed windows, newest last: (start, ms, bytes, cap).
    recent: VecDeque<(Instant, u64, u64, u64)>,
    open: Option<Open>,
    changes: usize,
}

impl Windows {
    /// Windows of `window` from now, at `bytes` written, under `cap`.
    pub fn new(window: Duration, cap: u64, bytes: u64) -> Self {
        Self {
            window,
            cap,
            start: Instant::now(),
            start_bytes: bytes,
            recent: VecDeque::with_capacity(KEPT + 1),
            open: None,
            changes: 0,
        }
    }

    /// The byte counter read at `now`: closes the window if it is over.
    /// Returns a change whose after-windows are all written.
    pub fn observe(&mut self, now: Instant, bytes: u64) -> Option<RateChange> {
        if now.duration_since(self.start) < self.window {
            return None;
        }
        self.close(now, bytes);
        let full = self
            .open
            .as_ref()
            .is_some_and(|o| o.change.after.len() >= KEPT);
        if full {
            return self.open.take().map(|o| o.change);
        }
        None
    }

    /// The cap becomes `cap` at `now`, at `bytes` written: the current
    /// window ends here (it may be short), and the change is recorded.
    /// Returns an earlier change still open, cut short by this one.
    pub fn set_cap(&mut self, now: Instant, bytes: u64, cap: u64) -> Option<RateChange> {
        self.close(now, bytes);
        let previous = self.open.take().map(|o| o.change);
        if self.changes < MAX_CHANGES {
            self.changes += 1;
            let before = self
                .recent
                .iter()
                .map(|&(s, ms, b, c)| window(s, now, ms, b, c))
                .collect();
            self.open = Some(Open {
                at: now,
                change: RateChange {
                    from: self.cap,
                    to: cap,
                    before,
                    after: Vec::new(),
                },
            });
        }
        self.cap = cap;
        previous
    }

    /// The stream ended at `bytes`: the change still open, with what it has.
    pub fn finish(&mut self, now: Instant, bytes: u64) -> Option<RateChange> {
        if now > self.start {
            self.close(now, bytes);
        }
        self.open.take().map(|o| o.change)
    }

    fn close(&mut self, now: Instant, bytes: u64) {
        let ms = now.duration_since(self.start).as_millis() as u64;
        let written = bytes.saturating_sub(self.start_bytes);
        if let Some(o) = self.open.as_mut() {
            o.change
                .after
                .push(window(self.start, o.at, ms, written, self.cap));
        }
        if self.recent.len() == KEPT {
            self.recent.pop_front();
        }
        self.recent.push_back((self.start, ms, written, self.cap));
        self.start = now;
        self.start_bytes = bytes;
    }
}

/// A window starting at `start`, timed against the change at `at`.
fn window(start: Instant, at: Instant, ms: u64, bytes: u64, cap: u64) -> Window {
    let start_ms = if start >= at {
        start.duration_since(at).as_millis() as i64
    } else {
        -(at.duration_since(start).as_millis() as i64)
    };
    Window {
        start_ms,
        ms,
        bytes,
        cap,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const W: Duration = Duration::from_millis(100);

    #[test]
    fn a_change_keeps_the_windows_around_it() {
        let t0 = Instant::now();
        let mut w = Windows::new(W, 1000, 0);
        w.start = t0;
        // Twelve windows of 100 bytes under the old cap: eight are kept.
        for i in 1..=12u64 {
            assert!(w.observe(t0 + W * i as u32, 100 * i).is_none());
        }
        // A window too short to close changes nothing.
        assert!(w.observe(t0 + W * 12 + W / 2, 1250).is_none());
        let at = t0 + W * 12 + W / 2;
        assert!(w.set_cap(at, 1250, 0).is_none());
        let mut bytes = 1250;
        let mut done = None;
        for i in 1..=KEPT as u32 {
            bytes += 10_000;
            done = w.observe(at + W * i, bytes);
            assert_eq!(done.is_some(), i == KEPT as u32);
        }
        let c = done.unwrap();
        assert_eq!((c.from, c.to), (1000, 0));
        // The partial window before the change is the last "before" one.
        assert_eq!(c.before.len(), KEPT);
        let last = c.before.last().unwrap();
        assert_eq!((last.start_ms, last.ms, last.bytes), (-50, 50, 50));
        assert!(c.before.iter().all(|b| b.cap == 1000 && b.start_ms < 0));
        assert_eq!(c.after.len(), KEPT);
        assert_eq!(c.after[0].start_ms, 0);
        assert!(c
            .after
            .iter()
            .all(|a| a.bytes == 10_000 && a.ms == 100 && a.cap == 0));
        // Nothing is open any more.
        assert!(w.finish(at + W * 20, bytes).is_none());
    }

    #[test]
    fn the_end_or_a_second_change_closes_an_open_change_and_changes_are_bounded() {
        let t0 = Instant::now();
        let mut w = Windows::new(W, 0, 0);
        w.start = t0;
        assert!(w.set_cap(t0 + W, 10, 5).is_none());
        let cut = w.set_cap(t0 + W * 2, 20, 6).expect("the first change");
        assert_eq!((cut.from, cut.to, cut.after.len()), (0, 5, 1));
        let end = w.finish(t0 + W * 3, 30).expect("the second change");
        assert_eq!((end.from, end.to), (5, 6));
        let mut opened = 0;
        for i in 0..40u32 {
            w.set_cap(t0 + W * (4 + i), u64::from(i), u64::from(i));
            opened += usize::from(w.open.is_some());
        }
        assert_eq!(opened, MAX_CHANGES - 2);
    }
}
