//! The writing half of a QEMUFile.

use std::io::{self, IoSlice};
use std::sync::Arc;

use flate2::Compress;

use super::hooks::{NoHooks, RamControl, RamHooks, SavePage};
use super::{Error, Latch, QemuFileReader, Result, IO_BUF_SIZE, MAX_IOV};
use crate::compress;
use crate::transport::{MemTransport, Transport};

/// One gathered piece of output.
#[derive(Debug)]
enum Chunk<'a> {
    /// A range of the internal buffer.
    Buf { start: usize, len: usize },
    /// Caller memory sent without a copy.
    Borrowed(&'a [u8]),
    /// Caller memory sent without a copy and released (madvise DONTNEED) once sent.
    Release(&'a mut [u8]),
}

impl Chunk<'_> {
    fn len(&self) -> usize {
        match self {
            Chunk::Buf { len, .. } => *len,
            Chunk::Borrowed(s) => s.len(),
            Chunk::Release(s) => s.len(),
        }
    }
}

/// Outcome of [`QemuFileWriter::put_compression_data`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compressed {
    /// The record went out: a be32 length and the zlib stream, this many bytes in all.
    Written(usize),
    /// The page did not shrink; nothing was written and the caller sends it raw.
    NotSmaller,
}

/// A QEMUFile opened for writing.
///
/// `'a` is how long memory given to [`put_buffer_async`](Self::put_buffer_async)
/// must stay borrowed: until the next flush, which the borrow checker enforces by
/// tying it to the writer itself.
pub struct QemuFileWriter<'a, T: Transport = Box<dyn Transport>> {
    transport: T,
    hooks: Box<dyn RamHooks>,
    buf: Box<[u8; IO_BUF_SIZE]>,
    buf_index: usize,
    iov: Vec<Chunk<'a>>,
    /// Bytes handed to the transport so far.
    pos: u64,
    bytes_xfer: u64,
    xfer_limit: u64,
    error: Latch,
}

impl<T: Transport> std::fmt::Debug for QemuFileWriter<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QemuFileWriter")
            .field("pos", &self.pos)
            .field("buf_index", &self.buf_index)
            .field("iovcnt", &self.iov.len())
            .field("bytes_xfer", &self.bytes_xfer)
            .field("xfer_limit", &self.xfer_limit)
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

impl<'a, T: Transport> QemuFileWriter<'a, T> {
    /// A writer over `transport`, with no RAM hooks and no rate limit.
    pub fn new(transport: T) -> Self {
        Self {
            transport,
            hooks: Box::new(NoHooks),
            buf: Box::new([0; IO_BUF_SIZE]),
            buf_index: 0,
            iov: Vec::with_capacity(MAX_IOV),
            pos: 0,
            bytes_xfer: 0,
            xfer_limit: 0,
            error: Latch::default(),
        }
    }

    /// Installs RAM control hooks.
    pub fn set_hooks(&mut self, hooks: Box<dyn RamHooks>) {
        self.hooks = hooks;
    }

    /// The transport underneath.
    pub fn transport(&self) -> &T {
        &self.transport
    }

    /// The transport underneath, for operations the QEMUFile does not wrap.
    pub fn transport_mut(&mut self) -> &mut T {
        &mut self.transport
    }

    /// The latched error, if any.
    pub fn error(&self) -> Option<&Error> {
        self.error.get()
    }

    /// Latches `err` unless an earlier error is already latched; the first error wins.
    pub fn set_error(&mut self, err: Error) {
        self.error.set(err);
    }

    fn add_to_iovec(&mut self, chunk: Chunk<'a>) {
        // Only pieces of our own buffer are merged: joining two caller borrows
        // into one slice would need them to come from one allocation, which a
        // borrow cannot promise. Adjacent released ranges are merged at release.
        if let (Chunk::Buf { start, len }, Some(Chunk::Buf { start: s, len: l })) =
            (&chunk, self.iov.last_mut())
        {
            if *s + *l == *start {
                *l += len;
                return;
            }
        }
        self.iov.push(chunk);
        if self.iov.len() >= MAX_IOV {
            self.flush();
        }
    }

    /// Sends everything gathered so far through the transport.
    ///
    /// A transport error or a short write is latched, like every error.
    pub fn flush(&mut self) {
        if self.iov.is_empty() {
            self.buf_index = 0;
            return;
        }
        let expected: usize = self.iov.iter().map(Chunk::len).sum();
        let result = {
            let slices: Vec<IoSlice<'_>> = self
                .iov
                .iter()
                .map(|c| match c {
                    Chunk::Buf { start, len } => IoSlice::new(&self.buf[*start..*start + *len]),
                    Chunk::Borrowed(s) => IoSlice::new(s),
                    Chunk::Release(s) => IoSlice::new(s),
                })
                .collect();
            self.transport.writev(&slices)
        };
        self.release_ram();
        match result {
            Ok(n) => {
                if n != expected {
                    self.set_error(Error::ShortWrite {
                        offset: self.pos,
                        written: n,
                        expected,
                    });
                }
                self.pos += n as u64;
            }
            Err(e) => self.set_error(Error::Io {
                offset: self.pos,
                source: Arc::new(e),
            }),
        }
        self.buf_index = 0;
        self.iov.clear();
    }

    /// Releases the memory of sent `Release` chunks, one madvise per contiguous run.
    fn release_ram(&mut self) {
        let mut run: Option<(usize, usize)> = None; // (start address, end address)
        for chunk in &self.iov {
            if let Chunk::Release(s) = chunk {
                let (start, end) = (s.as_ptr() as usize, s.as_ptr() as usize + s.len());
                run = match run {
                    Some((a, b)) if b == start => Some((a, end)),
                    Some(r) => {
                        discard(r);
                        Some((start, end))
                    }
                    None => Some((start, end)),
                };
            }
        }
        if let Some(r) = run {
            discard(r);
        }
    }

    /// Queues `buf` to be sent without copying it (QEMU's `qemu_put_buffer_async`
    /// with `may_free` false). The borrow lasts as long as the writer.
    pub fn put_buffer_async(&mut self, buf: &'a [u8]) {
        if self.error.is_set() || buf.is_empty() {
            return;
        }
        self.bytes_xfer += buf.len() as u64;
        self.add_to_iovec(Chunk::Borrowed(buf));
    }

    /// Queues guest memory to be sent without copying and released once sent
    /// (`may_free` true): the whole pages it covers are dropped with
    /// `madvise(MADV_DONTNEED)`, as QEMU's release-ram does for pages the
    /// destination now owns. The exclusive borrow guarantees nobody reads the
    /// memory while the kernel discards it.
    pub fn put_buffer_async_release(&mut self, buf: &'a mut [u8]) {
        if self.error.is_set() || buf.is_empty() {
            return;
        }
        self.bytes_xfer += buf.len() as u64;
        self.add_to_iovec(Chunk::Release(buf));
    }

    /// Copies `data` into the stream.
    pub fn put_buffer(&mut self, mut data: &[u8]) {
        while !data.is_empty() && !self.error.is_set() {
            let l = (IO_BUF_SIZE - self.buf_index).min(data.len());
            let start = self.buf_index;
            self.buf[start..start + l].copy_from_slice(&data[..l]);
            self.bytes_xfer += l as u64;
            self.buf_index += l;
            self.add_to_iovec(Chunk::Buf { start, len: l });
            if self.buf_index == IO_BUF_SIZE {
                self.flush();
            }
            data = &data[l..];
        }
    }

    /// Writes one byte.
    pub fn put_byte(&mut self, v: u8) {
        self.put_buffer(&[v]);
    }

    /// Writes a big-endian u16.
    pub fn put_be16(&mut self, v: u16) {
        self.put_buffer(&v.to_be_bytes());
    }

    /// Writes a big-endian u32.
    pub fn put_be32(&mut self, v: u32) {
        self.put_buffer(&v.to_be_bytes());
    }

    /// Writes a big-endian u64.
    pub fn put_be64(&mut self, v: u64) {
        self.put_buffer(&v.to_be_bytes());
    }

    /// Writes a string preceded by its one-byte length.
    pub fn put_counted_string(&mut self, s: &str) -> Result<()> {
        let len = s.len();
        if len > 255 {
            return Err(Error::StringTooLong { len });
        }
        self.put_byte(len as u8);
        self.put_buffer(s.as_bytes());
        self.error.check()
    }

    /// Writes `page` as a be32 length and one complete zlib stream at the level
    /// `compressor` was made with (QEMU's `qemu_put_compression_data`).
    ///
    /// A page whose zlib stream would not be smaller than the page is not written
    /// at all: the caller sends it raw, because a QEMU destination rejects
    /// compressed lengths above `compressBound(4096)` and gains nothing below it.
    pub fn put_compression_data(
        &mut self,
        compressor: &mut Compress,
        page: &[u8],
    ) -> Result<Compressed> {
        Ok(match self.put_compressed_record(&[], compressor, page)? {
            Some(n) => Compressed::Written(4 + n),
            None => Compressed::NotSmaller,
        })
    }

    /// Like [`put_compression_data`](Self::put_compression_data), with `prefix`
    /// (a record header) written in front, and only if the page shrinks: the
    /// header of a compressed page must not go out when the page goes raw.
    /// Returns the length of the zlib stream, or `None` when nothing was written.
    pub fn put_compressed_record(
        &mut self,
        prefix: &[u8],
        compressor: &mut Compress,
        page: &[u8],
    ) -> Result<Option<usize>> {
        self.error.check()?;
        let need = prefix.len() + 4 + page.len();
        // The bytes are placed before they are gathered, so nothing may flush
        // in between: neither a full buffer nor a full iovec list.
        if IO_BUF_SIZE - self.buf_index < need || self.iov.len() + 1 >= MAX_IOV {
            self.flush();
            self.error.check()?;
            if IO_BUF_SIZE - self.buf_index < need {
                // Only a page nearly as large as the whole buffer gets here.
                return Ok(None);
            }
        }
        // Compress straight into the buffer behind the room for prefix and length.
        let out_start = self.buf_index + prefix.len() + 4;
        let out = &mut self.buf[out_start..out_start + page.len().saturating_sub(1)];
        let Some(n) = compress::deflate_into(compressor, page, out) else {
            return Ok(None);
        };
        self.put_buffer(prefix);
        self.put_be32(n as u32);
        let start = self.buf_index;
        self.bytes_xfer += n as u64;
        self.buf_index += n;
        self.add_to_iovec(Chunk::Buf { start, len: n });
        if self.buf_index == IO_BUF_SIZE {
            self.flush();
        }
        self.error.check()?;
        Ok(Some(n))
    }

    /// Bytes written so far, flushing first (QEMU's `qemu_ftell`).
    pub fn ftell(&mut self) -> u64 {
        self.flush();
        self.pos
    }

    /// Bytes written so far, counting what is gathered but not flushed
    /// (QEMU's `qemu_ftell_fast`).
    pub fn ftell_fast(&self) -> u64 {
        self.pos + self.iov.iter().map(|c| c.len() as u64).sum::<u64>()
    }

    /// True when the bytes of this window exceed the limit, or after an error:
    /// either way the caller should stop sending for now.
    pub fn rate_limit_exceeded(&self) -> bool {
        self.error.is_set() || (self.xfer_limit > 0 && self.bytes_xfer > self.xfer_limit)
    }

    /// Bytes allowed per window; 0 means unlimited.
    pub fn rate_limit(&self) -> u64 {
        self.xfer_limit
    }

    /// Sets the bytes allowed per window; 0 means unlimited.
    pub fn set_rate_limit(&mut self, limit: u64) {
        self.xfer_limit = limit;
    }

    /// Starts a new window.
    pub fn reset_rate_limit(&mut self) {
        self.bytes_xfer = 0;
    }

    /// Bytes counted in this window.
    pub fn bytes_xfer(&self) -> u64 {
        self.bytes_xfer
    }

    /// Moves the bytes of a private buffer (a compression worker's) into this
    /// stream and empties the source (QEMU's `qemu_put_qemu_file`).
    /// Returns the number of bytes moved.
    pub fn put_qemu_file(&mut self, src: &mut QemuFileWriter<'_, MemTransport>) -> Result<usize> {
        src.flush();
        src.error.check()?;
        let bytes = src.transport.take();
        self.put_buffer(&bytes);
        self.error.check()?;
        Ok(bytes.len())
    }

    /// Runs the `before_iterate` hook; a failure is latched.
    pub fn ram_control_before_iterate(&mut self, stage: RamControl) {
        if let Err(e) = self.hooks.before_iterate(stage) {
            self.set_hook_error(e);
        }
    }

    /// Runs the `after_iterate` hook; a failure is latched.
    pub fn ram_control_after_iterate(&mut self, stage: RamControl) {
        if let Err(e) = self.hooks.after_iterate(stage) {
            self.set_hook_error(e);
        }
    }

    /// Offers a page to the `save_page` hook (QEMU's `ram_control_save_page`).
    /// Pages the hook handles count against the rate limit.
    pub fn ram_control_save_page(
        &mut self,
        block_offset: u64,
        offset: u64,
        size: usize,
    ) -> SavePage {
        let result = self.hooks.save_page(block_offset, offset, size);
        match &result {
            SavePage::NotSupported => {}
            SavePage::Delayed => self.bytes_xfer += size as u64,
            SavePage::Sent(n) => {
                self.bytes_xfer += size as u64;
                self.pos += n;
            }
            SavePage::Failed(e) => {
                self.bytes_xfer += size as u64;
                let e = io::Error::new(e.kind(), e.to_string());
                self.set_hook_error(e);
            }
        }
        result
    }

    fn set_hook_error(&mut self, e: io::Error) {
        let offset = self.ftell_fast();
        self.set_error(Error::Hook {
            offset,
            source: Arc::new(e),
        });
    }

    /// Stops the transport in both directions, waking anyone blocked on it.
    pub fn shutdown(&mut self) -> io::Result<()> {
        self.transport.shutdown()
    }

    /// Switches the transport between blocking and non-blocking.
    pub fn set_blocking(&mut self, blocking: bool) -> io::Result<()> {
        self.transport.set_blocking(blocking)
    }

    /// A reader for messages coming back from the peer, if the transport has one.
    pub fn return_path(&mut self) -> Option<QemuFileReader> {
        self.transport.return_path().map(QemuFileReader::new)
    }

    /// Flushes and closes; returns the first error of the file's whole life.
    pub fn close(mut self) -> Result<()> {
        self.flush();
        if let Err(e) = self.transport.close() {
            let offset = self.pos;
            self.set_error(Error::Io {
                offset,
                source: Arc::new(e),
            });
        }
        self.error.check()
    }

    /// Flushes and hands back the transport, or the first error.
    pub fn into_transport(mut self) -> Result<T> {
        self.flush();
        self.error.check()?;
        Ok(self.transport)
    }
}

/// Drops the whole pages inside `[start, end)`.
fn discard((start, end): (usize, usize)) {
    let page = page_size();
    let first = start.div_ceil(page) * page;
    let last = end / page * page;
    if last <= first {
        return;
    }
    // SAFETY: the range lies inside memory the writer held an exclusive borrow
    // of (`put_buffer_async_release`) and no longer reads; MADV_DONTNEED only
    // replaces its contents (zero or re-read from the backing file), it never
    // unmaps it, so the borrow's owner still holds valid memory.
    let rc = unsafe {
        libc::madvise(
            first as *mut libc::c_void,
            last - first,
            libc::MADV_DONTNEED,
        )
    };
    if rc != 0 {
        // QEMU reports and carries on: the page was sent, only the release failed.
        tracing::warn!(
            "madvise(DONTNEED) of {:#x}+{} failed: {}",
            first,
            last - first,
            io::Error::last_os_error()
        );
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n as usize
    } else {
        4096
    }
}
