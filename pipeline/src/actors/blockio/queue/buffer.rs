//! I/O buffers: page-aligned heap buffers and slots of a registered memory region.
//!
//! Drivers that need memory regions (`needs-mem-regions`, e.g. virtio-blk-vhost-user)
//! can only reach memory registered with `blkio_map_mem_region`. The actor registers
//! one region cut into fixed-size slots ([`BufferPool`]); a [`Buffer`] taken from it
//! goes to the device without a bounce copy. Any other buffer is bounced through the
//! actor's bounce pool (see `bounce.rs`).

use std::alloc::{self, Layout};
use std::ffi::CStr;
use std::fmt;
use std::io;
use std::ops::{Deref, DerefMut};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Alignment of every [`Buffer`]: a page, which is at least the `buf-alignment` of
/// every libblkio driver (the actor checks it at start).
pub const BUF_ALIGN: usize = 4096;

/// The page size, used to size memory regions.
pub(crate) fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if v > 0 {
        v as usize
    } else {
        4096
    }
}

/// A shared mapping of a memfd: memory libblkio can register as a mem region
/// (vhost-user passes the fd to the server, which maps the same pages and, like
/// any virtio device, writes only into the buffers of read requests in flight).
#[derive(Debug)]
pub(crate) struct MappedRegion {
    addr: NonNull<u8>,
    len: usize,
    fd: OwnedFd,
}

// SAFETY: the mapping is plain memory owned by this value; it has no thread
// affinity. Who may touch which bytes is decided by the owners of the region
// (slots handed out exclusively, bounce ranges owned by the actor thread).
unsafe impl Send for MappedRegion {}
// SAFETY: as above; `&MappedRegion` only exposes the address and length.
unsafe impl Sync for MappedRegion {}

impl MappedRegion {
    /// Maps `len` bytes (> 0, rounded up to a page) of a new memfd, zero-filled.
    pub(crate) fn new(len: usize, name: &CStr) -> io::Result<Self> {
        let page = page_size();
        let len = len.max(1).div_ceil(page) * page;
        // SAFETY: `name` is a valid NUL-terminated string; the flags are valid.
        let raw = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: memfd_create returned a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let size =
            libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        // SAFETY: `fd` is an open memfd owned by us.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), size) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh shared mapping of `len` bytes of our memfd at an address
        // the kernel picks; it aliases no Rust object.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let addr =
            NonNull::new(p.cast::<u8>()).ok_or_else(|| io::Error::other("mmap returned null"))?;
        Ok(Self { addr, len, fd })
    }

    pub(crate) fn addr(&self) -> *mut u8 {
        self.addr.as_ptr()
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The region as libblkio describes it (the same value for map and unmap).
    pub(crate) fn blkio_region(&self) -> blkio::MemoryRegion {
        blkio::MemoryRegion {
            addr: self.addr.as_ptr() as usize,
            iova: 0,
            len: self.len,
            fd: self.fd.as_raw_fd(),
            fd_offset: 0,
            flags: 0,
        }
    }
}

impl Drop for MappedRegion {
    fn drop(&mut self) {
        // SAFETY: `addr`/`len` are exactly the mapping created in `new`; every
        // borrower (Buffer slots, bounce ranges) holds this region alive, so nothing
        // uses the memory any more. The fd is closed by OwnedFd.
        unsafe {
            libc::munmap(self.addr.as_ptr().cast(), self.len);
        }
    }
}

/// The registered region cut into `slots` slots of `slot_size` bytes.
pub(crate) struct SlotPool {
    region: MappedRegion,
    slot_size: usize,
    slots: usize,
    free: Mutex<Vec<usize>>,
    available: Condvar,
}

impl fmt::Debug for SlotPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SlotPool")
            .field("slot_size", &self.slot_size)
            .field("slots", &self.slots)
            .finish()
    }
}

impl SlotPool {
    pub(crate) fn new(slots: usize, slot_size: usize) -> io::Result<Self> {
        let slot_size = slot_size.max(1).div_ceil(BUF_ALIGN) * BUF_ALIGN;
        let total = slots
            .checked_mul(slot_size)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        let region = MappedRegion::new(total.max(BUF_ALIGN), c"ferry-blockio-buffers")?;
        Ok(Self {
            region,
            slot_size,
            slots,
            // Popped from the back: hand out low slots first.
            free: Mutex::new((0..slots).rev().collect()),
            available: Condvar::new(),
        })
    }

    pub(crate) fn region(&self) -> &MappedRegion {
        &self.region
    }

    fn lock_free(&self) -> std::sync::MutexGuard<'_, Vec<usize>> {
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn slot_buffer(self: &Arc<Self>, index: usize, len: usize) -> Buffer {
        // SAFETY: index < slots, so the slot lies inside the mapping.
        let ptr = unsafe { self.region.addr().add(index * self.slot_size) };
        Buffer {
            // SAFETY: derived from the non-null mapping address.
            ptr: unsafe { NonNull::new_unchecked(ptr) },
            len,
            cap: self.slot_size,
            owner: Owner::Slot {
                pool: Arc::clone(self),
                index,
            },
        }
    }

    pub(crate) fn slot_size(&self) -> usize {
        self.slot_size
    }

    pub(crate) fn try_take(self: &Arc<Self>, len: usize) -> Option<Buffer> {
        if len > self.slot_size {
            return None;
        }
        let index = self.lock_free().pop()?;
        Some(self.slot_buffer(index, len))
    }

    fn take_timeout(self: &Arc<Self>, len: usize, timeout: Duration) -> Option<Buffer> {
        if len > self.slot_size || self.slots == 0 {
            return None;
        }
        let deadline = Instant::now() + timeout;
        let mut free = self.lock_free();
        loop {
            if let Some(index) = free.pop() {
                drop(free);
                return Some(self.slot_buffer(index, len));
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            free = self
                .available
                .wait_timeout(free, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn give_back(&self, index: usize) {
        self.lock_free().push(index);
        self.available.notify_one();
    }

    fn free_slots(&self) -> usize {
        self.lock_free().len()
    }
}

enum Owner {
    Heap { layout: Layout },
    Slot { pool: Arc<SlotPool>, index: usize },
}

/// An owned, page-aligned I/O buffer: either on the heap or a slot of a device's
/// registered region (see [`BufferPool`]). Dereferences to its `len` bytes.
///
/// All of its bytes are always initialised (heap buffers start zeroed, slots start
/// as zero-filled memfd pages and keep old contents when reused).
pub struct Buffer {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
    owner: Owner,
}

// SAFETY: a Buffer exclusively owns its bytes (a heap allocation or a slot no one
// else holds); nothing ties it to a thread.
unsafe impl Send for Buffer {}
// SAFETY: `&Buffer` gives only shared `&[u8]` access.
unsafe impl Sync for Buffer {}

impl fmt::Debug for Buffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Buffer")
            .field("len", &self.len)
            .field("capacity", &self.cap)
            .field("registered", &self.is_registered())
            .finish()
    }
}

impl Buffer {
    /// A zero-filled heap buffer of `len` bytes, aligned to [`BUF_ALIGN`].
    pub fn zeroed(len: usize) -> Self {
        let layout = Self::layout(len);
        // SAFETY: the layout has a non-zero size.
        let p = unsafe { alloc::alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(p) else {
            alloc::handle_alloc_error(layout)
        };
        Self {
            ptr,
            len,
            cap: layout.size(),
            owner: Owner::Heap { layout },
        }
    }

    /// A heap buffer holding a copy of `data`.
    pub fn from_slice(data: &[u8]) -> Self {
        let mut b = Self::zeroed(data.len());
        b.copy_from_slice(data);
        b
    }

    fn layout(len: usize) -> Layout {
        let size = len.max(1).div_ceil(BUF_ALIGN) * BUF_ALIGN;
        Layout::from_size_align(size, BUF_ALIGN).expect("buffer size overflows a Layout")
    }

    /// Bytes in use.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Bytes the buffer can hold without reallocating.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Sets the length, keeping the allocation (the bytes up to `len` are whatever
    /// the buffer last held).
    ///
    /// # Panics
    /// If `len` exceeds [`Buffer::capacity`].
    pub fn resize(&mut self, len: usize) {
        assert!(
            len <= self.cap,
            "Buffer::resize({len}) beyond capacity {}",
            self.cap
        );
        self.len = len;
    }

    /// Whether the buffer is a slot of some device's registered region.
    pub fn is_registered(&self) -> bool {
        matches!(self.owner, Owner::Slot { .. })
    }

    /// The registered pool this buffer belongs to, if any.
    pub(crate) fn slot_pool(&self) -> Option<&Arc<SlotPool>> {
        match &self.owner {
            Owner::Slot { pool, .. } => Some(pool),
            Owner::Heap { .. } => None,
        }
    }

    pub(crate) fn addr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Deref for Buffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: `ptr` is valid for `cap >= len` initialised bytes owned by this
        // buffer, and `&self` excludes writers.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for Buffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`, and `&mut self` makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        match &self.owner {
            Owner::Heap { layout } => {
                // SAFETY: allocated in `zeroed` with exactly this layout.
                unsafe { alloc::dealloc(self.ptr.as_ptr(), *layout) }
            }
            Owner::Slot { pool, index } => pool.give_back(*index),
        }
    }
}

/// Hands out buffers from a device's registered region; cheap to clone and usable
/// from any thread.
///
/// With a driver that needs memory regions (vhost-user), reads into and writes from
/// these buffers need no bounce copy; with io_uring they still save the page faults
/// of fresh allocations.
#[derive(Clone)]
pub struct BufferPool {
    pool: Arc<SlotPool>,
}

impl fmt::Debug for BufferPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BufferPool")
            .field("slot_size", &self.pool.slot_size)
            .field("slots", &self.pool.slots)
            .field("free", &self.pool.free_slots())
            .finish()
    }
}

impl BufferPool {
    pub(crate) fn new(pool: Arc<SlotPool>) -> Self {
        Self { pool }
    }

    /// The size of one registered buffer (the largest `len` it can serve).
    pub fn slot_size(&self) -> usize {
        self.pool.slot_size
    }

    /// The number of registered buffers.
    pub fn slots(&self) -> usize {
        self.pool.slots
    }

    /// Registered buffers not handed out right now.
    pub fn free_slots(&self) -> usize {
        self.pool.free_slots()
    }

    /// A registered buffer of `len` bytes if one is free, else a heap buffer (which
    /// the actor bounces when the driver needs memory regions).
    pub fn alloc(&self, len: usize) -> Buffer {
        self.try_registered(len)
            .unwrap_or_else(|| Buffer::zeroed(len))
    }

    /// A registered buffer of `len` bytes, or `None` if `len` exceeds the slot size
    /// or all slots are in use.
    pub fn try_registered(&self, len: usize) -> Option<Buffer> {
        self.pool.try_take(len)
    }

    /// A registered buffer of `len` bytes, waiting up to `timeout` for a slot to be
    /// given back; `None` on timeout or if `len` exceeds the slot size.
    pub fn registered_timeout(&self, len: usize, timeout: Duration) -> Option<Buffer> {
        self.pool.take_timeout(len, timeout)
    }
}
