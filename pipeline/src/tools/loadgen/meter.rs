//! The measured dirty rates: pages (and disk bytes) written over the last
//! second.
//!
//! A migration decides when to throttle and when to switch over from the
//! rate the guest really achieves, not the one it was asked for (a writer can
//! fall behind on a busy host), so `query-status` reports what was measured.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use ferry_proto::stream::PAGE_SIZE;

/// How often the main thread records a sample.
pub(crate) const INTERVAL: Duration = Duration::from_millis(100);

/// The window the rate is measured over.
const WINDOW: Duration = Duration::from_secs(1);

/// The guest's two meters: RAM (counting pages) and disk (counting bytes).
#[derive(Debug)]
pub(crate) struct Meters {
    pub(crate) ram: Meter,
    pub(crate) disk: Meter,
}

impl Meters {
    pub(crate) fn new() -> Self {
        Self {
            ram: Meter::new(PAGE_SIZE as u64),
            disk: Meter::new(1),
        }
    }

    /// Records that `pages` pages and `disk_bytes` disk bytes had been
    /// written by `now`.
    pub(crate) fn record(&self, now: Instant, pages: u64, disk_bytes: u64) {
        self.ram.record(now, pages);
        self.disk.record(now, disk_bytes);
    }
}

/// Samples of (time, units written so far), oldest first, covering a bit
/// more than [`WINDOW`].
#[derive(Debug)]
pub(crate) struct Meter {
    samples: Mutex<VecDeque<(Instant, u64)>>,
    /// Bytes per unit counted.
    unit: u64,
}

impl Meter {
    /// A meter counting units of `unit` bytes.
    pub(crate) fn new(unit: u64) -> Self {
        Self {
            samples: Mutex::new(VecDeque::new()),
            unit,
        }
    }

    /// Records that `count` units had been written by `now`.
    pub(crate) fn record(&self, now: Instant, count: u64) {
        let mut s = self.samples.lock().unwrap_or_else(PoisonError::into_inner);
        s.push_back((now, count));
        // Keep the newest sample at least WINDOW old; drop the older ones.
        while s.len() > 1 && s[1].0 + WINDOW <= now {
            s.pop_front();
        }
    }

    /// Bytes per second written between the newest sample at least a second
    /// old (or the oldest sample, early on) and (`now`, `count`).
    pub(crate) fn rate(&self, now: Instant, count: u64) -> u64 {
        let s = self.samples.lock().unwrap_or_else(PoisonError::into_inner);
        let base = s
            .iter()
            .rev()
            .find(|(t, _)| *t + WINDOW <= now)
            .or_else(|| s.front());
        let Some(&(then, before)) = base else {
            return 0;
        };
        let secs = now.saturating_duration_since(then).as_secs_f64();
        if secs < 0.01 {
            return 0;
        }
        (count.saturating_sub(before) as f64 * self.unit as f64 / secs) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_spans_the_last_second() {
        let m = Meter::new(PAGE_SIZE as u64);
        let t0 = Instant::now();
        assert_eq!(m.rate(t0, 0), 0);
        // 100 pages per 100 ms for 3 s.
        for i in 0..=30u64 {
            m.record(t0 + INTERVAL * i as u32, i * 100);
        }
        let now = t0 + Duration::from_millis(3050);
        let r = m.rate(now, 3050);
        assert!(
            (r as f64 - 1000.0 * 4096.0).abs() < 1000.0 * 4096.0 * 0.02,
            "{r}"
        );
        // Early on, the rate covers what there is.
        let m = Meter::new(PAGE_SIZE as u64);
        m.record(t0, 0);
        let r = m.rate(t0 + Duration::from_millis(500), 500);
        assert_eq!(r, 1000 * 4096);
    }
}
