//! The reading half of a QEMUFile.

use std::io;
use std::sync::Arc;

use super::hooks::{NoHooks, RamControl, RamHooks};
use super::{Error, Latch, QemuFileWriter, Result, IO_BUF_SIZE};
use crate::transport::Transport;

/// A QEMUFile opened for reading.
///
/// Every getter returns exactly what it asked for or an error; the end of the
/// input is an error ([`Error::Eof`]) naming the offset of the first missing
/// byte, and it stays latched like every other error.
pub struct QemuFileReader<T: Transport = Box<dyn Transport>> {
    transport: T,
    hooks: Box<dyn RamHooks>,
    buf: Box<[u8; IO_BUF_SIZE]>,
    buf_index: usize,
    buf_size: usize,
    /// Bytes taken from the transport so far (the offset of `buf[buf_size]`).
    pos: u64,
    error: Latch,
}

impl<T: Transport> std::fmt::Debug for QemuFileReader<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QemuFileReader")
            .field("offset", &self.offset())
            .field("buffered", &(self.buf_size - self.buf_index))
            .field("error", &self.error)
            .finish_non_exhaustive()
    }
}

impl<T: Transport> QemuFileReader<T> {
    /// A reader over `transport` with no RAM hooks.
    pub fn new(transport: T) -> Self {
        Self {
            transport,
            hooks: Box::new(NoHooks),
            buf: Box::new([0; IO_BUF_SIZE]),
            buf_index: 0,
            buf_size: 0,
            pos: 0,
            error: Latch::default(),
        }
    }

    /// Installs RAM control hooks.
    pub fn set_hooks(&mut self, hooks: Box<dyn RamHooks>) {
        self.hooks = hooks;
    }

    /// The transport underneath.
    pub fn transport_mut(&mut self) -> &mut T {
        &mut self.transport
    }

    /// Offset in the stream of the next byte a getter returns.
    pub fn offset(&self) -> u64 {
        self.pos - (self.buf_size - self.buf_index) as u64
    }

    /// The latched error, if any.
    pub fn error(&self) -> Option<&Error> {
        self.error.get()
    }

    /// Latches `err` unless an earlier error is already latched; the first error wins.
    pub fn set_error(&mut self, err: Error) {
        self.error.set(err);
    }

    /// Moves unread bytes to the front and reads more behind them.
    /// Returns how many bytes arrived; 0 after latching an error.
    fn fill_buffer(&mut self) -> usize {
        self.fill_buffer_inner(true)
    }

    /// Like `fill_buffer`; at the end of the stream it latches an error only
    /// if `latch_eof`. A non-blocking transport with nothing to read yet
    /// is waited for: "nothing yet" is not the end.
    fn fill_buffer_inner(&mut self, latch_eof: bool) -> usize {
        loop {
            match self.try_fill(latch_eof) {
                Some(n) => return n,
                None => std::thread::sleep(std::time::Duration::from_millis(1)),
            }
        }
    }

    /// One read; `None` when a non-blocking transport has nothing yet.
    fn try_fill(&mut self, latch_eof: bool) -> Option<usize> {
        let pending = self.buf_size - self.buf_index;
        if pending > 0 && self.buf_index > 0 {
            self.buf.copy_within(self.buf_index..self.buf_size, 0);
        }
        self.buf_index = 0;
        self.buf_size = pending;
        match self.transport.read(&mut self.buf[pending..]) {
            Ok(0) => {
                if latch_eof {
                    self.set_error(Error::Eof { offset: self.pos });
                }
                Some(0)
            }
            Ok(n) => {
                self.buf_size += n;
                self.pos += n as u64;
                Some(n)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
            Err(e) => {
                self.set_error(Error::Io {
                    offset: self.pos,
                    source: Arc::new(e),
                });
                Some(0)
            }
        }
    }

    /// Makes `need` bytes available from the read position, reading as often as
    /// short reads require.
    fn ensure(&mut self, need: usize) -> Result<()> {
        debug_assert!(need <= IO_BUF_SIZE);
        while self.buf_size - self.buf_index < need {
            self.error.check()?;
            self.fill_buffer();
        }
        Ok(())
    }

    /// True when the stream has ended exactly here: no byte is buffered and the
    /// transport reports end of stream. Unlike a getter, this does not latch an error.
    pub fn at_end(&mut self) -> Result<bool> {
        Ok(self.peek_available(1)?.is_empty())
    }

    /// Returns up to `size` bytes from the read position without consuming them;
    /// fewer only when the stream ends first. Reaching the end here is not an
    /// error, so a parser can look ahead at the tail of a stream.
    pub fn peek_available(&mut self, size: usize) -> Result<&[u8]> {
        self.error.check()?;
        let size = size.min(IO_BUF_SIZE);
        while self.buf_size - self.buf_index < size {
            if self.fill_buffer_inner(false) == 0 {
                self.error.check()?;
                break;
            }
        }
        let n = (self.buf_size - self.buf_index).min(size);
        Ok(&self.buf[self.buf_index..self.buf_index + n])
    }

    /// Returns `size` bytes starting `offset` bytes past the read position,
    /// without consuming them.
    pub fn peek_buffer(&mut self, size: usize, offset: usize) -> Result<&[u8]> {
        self.error.check()?;
        if offset.checked_add(size).is_none_or(|end| end > IO_BUF_SIZE) {
            return Err(Error::PeekTooLarge { size, offset });
        }
        self.ensure(offset + size)?;
        let start = self.buf_index + offset;
        Ok(&self.buf[start..start + size])
    }

    /// Returns the byte `offset` bytes past the read position without consuming it.
    pub fn peek_byte(&mut self, offset: usize) -> Result<u8> {
        Ok(self.peek_buffer(1, offset)?[0])
    }

    /// Consumes `size` bytes.
    pub fn skip(&mut self, mut size: u64) -> Result<()> {
        self.error.check()?;
        while size > 0 {
            if self.buf_index == self.buf_size {
                self.ensure(1)?;
            }
            let n = ((self.buf_size - self.buf_index) as u64).min(size) as usize;
            self.buf_index += n;
            size -= n as u64;
        }
        Ok(())
    }

    /// Fills `out` completely from the stream.
    pub fn get_buffer(&mut self, out: &mut [u8]) -> Result<()> {
        self.error.check()?;
        let mut done = 0;
        while done < out.len() {
            if self.buf_index == self.buf_size {
                self.ensure(1)?;
            }
            let n = (self.buf_size - self.buf_index).min(out.len() - done);
            out[done..done + n].copy_from_slice(&self.buf[self.buf_index..self.buf_index + n]);
            self.buf_index += n;
            done += n;
        }
        Ok(())
    }

    /// Reads `scratch.len()` bytes, returning them straight from the internal
    /// buffer when they fit in it and copying into `scratch` otherwise (QEMU's
    /// `qemu_get_buffer_in_place`). The slice is valid until the next call.
    pub fn get_buffer_in_place<'s>(&'s mut self, scratch: &'s mut [u8]) -> Result<&'s [u8]> {
        let size = scratch.len();
        if size < IO_BUF_SIZE {
            self.error.check()?;
            self.ensure(size)?;
            let start = self.buf_index;
            self.buf_index += size;
            return Ok(&self.buf[start..start + size]);
        }
        self.get_buffer(scratch)?;
        Ok(scratch)
    }

    /// Reads one byte.
    pub fn get_byte(&mut self) -> Result<u8> {
        let b = self.peek_byte(0)?;
        self.buf_index += 1;
        Ok(b)
    }

    fn get_array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.peek_buffer(N, 0)?);
        self.buf_index += N;
        Ok(a)
    }

    /// Reads a big-endian u16.
    pub fn get_be16(&mut self) -> Result<u16> {
        self.get_array().map(u16::from_be_bytes)
    }

    /// Reads a big-endian u32.
    pub fn get_be32(&mut self) -> Result<u32> {
        self.get_array().map(u32::from_be_bytes)
    }

    /// Reads a big-endian u64.
    pub fn get_be64(&mut self) -> Result<u64> {
        self.get_array().map(u64::from_be_bytes)
    }

    /// Reads a string preceded by its one-byte length.
    pub fn get_counted_string(&mut self) -> Result<String> {
        let offset = self.offset();
        let len = self.get_byte()? as usize;
        let bytes = self.peek_buffer(len, 0)?.to_vec();
        self.buf_index += len;
        String::from_utf8(bytes).map_err(|_| Error::InvalidString { offset })
    }

    /// Runs the destination's RAM load hook (QEMU's `ram_control_load_hook`).
    /// Without a hook, only an explicit request from the source is an error.
    pub fn ram_control_load_hook(&mut self, stage: RamControl) -> Result<()> {
        let offset = self.offset();
        match self.hooks.load_hook(stage) {
            Some(Err(e)) => self.set_error(Error::Hook {
                offset,
                source: Arc::new(e),
            }),
            None if stage == RamControl::Hook => self.set_error(Error::NoLoadHook { offset }),
            _ => {}
        }
        self.error.check()
    }

    /// Stops the transport in both directions, waking anyone blocked on it.
    pub fn shutdown(&mut self) -> io::Result<()> {
        self.transport.shutdown()
    }

    /// Switches the transport between blocking and non-blocking.
    pub fn set_blocking(&mut self, blocking: bool) -> io::Result<()> {
        self.transport.set_blocking(blocking)
    }

    /// A writer for answers to the peer, if the transport has one.
    pub fn return_path(&mut self) -> Option<QemuFileWriter<'static>> {
        self.transport.return_path().map(QemuFileWriter::new)
    }

    /// Closes the transport; returns the first error of the file's whole life.
    pub fn close(mut self) -> Result<()> {
        if let Err(e) = self.transport.close() {
            let offset = self.offset();
            self.set_error(Error::Io {
                offset,
                source: Arc::new(e),
            });
        }
        self.error.check()
    }
}
