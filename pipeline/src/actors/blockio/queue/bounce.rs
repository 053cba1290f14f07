//! The bounce-buffer pool, as in QEMU's block/blkio.c.
//!
//! One registered memory region; allocations are kept sorted by address and a new
//! one takes the first hole that fits (a linear search, as QEMU does). Requests wait
//! in FIFO order (kept by the actor): a request that finds others waiting does not
//! even try, and a waiter that is retried and still does not fit stays at the front,
//! so it never loses its place. The region is replaced by a larger one only when no
//! bounce buffer is allocated, i.e. nothing using the pool is in flight.

use std::collections::BTreeMap;

use super::buffer::BUF_ALIGN;

/// Extra bytes added when the pool grows, to make resizes rarer (QEMU: 128 KiB).
pub(crate) const GROW_PAD: usize = 128 * 1024;

/// First-fit allocation of byte ranges within a pool of `len` bytes.
#[derive(Debug, Default)]
pub(crate) struct BounceAllocator {
    len: usize,
    /// offset -> length of each allocated range.
    allocs: BTreeMap<usize, usize>,
}

impl BounceAllocator {
    pub(crate) fn new(len: usize) -> Self {
        Self {
            len,
            allocs: BTreeMap::new(),
        }
    }

    /// Whether nothing is allocated (the only time the pool may be resized).
    pub(crate) fn is_idle(&self) -> bool {
        self.allocs.is_empty()
    }

    /// Rounds an allocation to the buffer alignment.
    pub(crate) fn round(bytes: usize) -> usize {
        bytes.max(1).div_ceil(BUF_ALIGN) * BUF_ALIGN
    }

    /// The offset of a new range of `bytes` (rounded to [`BUF_ALIGN`]), or `None` if no
    /// hole fits.
    pub(crate) fn try_alloc(&mut self, bytes: usize) -> Option<usize> {
        let bytes = Self::round(bytes);
        let mut addr = 0usize;
        for (&start, &len) in &self.allocs {
            if bytes <= start - addr {
                break;
            }
            addr = start + len;
        }
        if bytes > self.len.saturating_sub(addr) {
            return None;
        }
        self.allocs.insert(addr, bytes);
        Some(addr)
    }

    /// Frees the range at `offset`.
    pub(crate) fn free(&mut self, offset: usize) {
        let removed = self.allocs.remove(&offset);
        debug_assert!(
            removed.is_some(),
            "bounce range at {offset} was not allocated"
        );
    }

    /// Sets a new pool size. Only valid while idle.
    pub(crate) fn reset(&mut self, len: usize) {
        assert!(self.is_idle(), "bounce pool resized while in use");
        self.len = len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: usize = BUF_ALIGN;

    #[test]
    fn first_fit_and_holes() {
        let mut a = BounceAllocator::new(10 * K);
        assert_eq!(a.try_alloc(3 * K), Some(0));
        assert_eq!(a.try_alloc(3 * K), Some(3 * K));
        assert_eq!(a.try_alloc(3 * K), Some(6 * K));
        assert_eq!(a.try_alloc(2 * K), None, "only 1 page left");
        assert_eq!(a.try_alloc(1), Some(9 * K), "rounded to a page");
        a.free(3 * K);
        assert_eq!(a.try_alloc(4 * K), None, "hole of 3 pages");
        assert_eq!(a.try_alloc(2 * K), Some(3 * K), "first hole that fits");
        assert_eq!(a.try_alloc(K), Some(5 * K));
        a.free(0);
        a.free(3 * K);
        a.free(5 * K);
        a.free(6 * K);
        a.free(9 * K);
        assert!(a.is_idle());
        a.reset(20 * K);
        assert_eq!(a.try_alloc(20 * K), Some(0));
    }

    #[test]
    #[should_panic(expected = "resized while in use")]
    fn no_resize_while_in_use() {
        let mut a = BounceAllocator::new(4 * K);
        a.try_alloc(K).unwrap();
        a.reset(8 * K);
    }
}
