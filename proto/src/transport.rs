//! Byte transports under a QEMUFile: the equivalent of QEMU's `QEMUFileOps`.
//!
//! A [`Transport`] moves bytes and nothing else; buffering, error latching and
//! accounting live in [`crate::qemu_file`]. Implementations exist for TCP, unix
//! sockets, files, inherited file descriptors and memory (the private buffer of
//! a compression worker).

use std::fs::File;
use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;

/// A byte pipe that a QEMUFile reads from or writes to.
///
/// Only `writev` and `read` are required; the rest default to "not supported",
/// like the optional members of `QEMUFileOps`.
pub trait Transport: Send {
    /// Writes every byte of `bufs` or fails. Returns the number of bytes written,
    /// which callers compare with the total to detect a short write.
    fn writev(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;

    /// Reads some bytes; `Ok(0)` means end of stream.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize>;

    /// Stops reading and writing, waking a peer or thread blocked on the transport.
    fn shutdown(&mut self) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }

    /// Ends the writing direction only: the peer reads end of stream while
    /// it can still answer on the return path.
    fn shutdown_write(&mut self) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }

    /// Switches between blocking and non-blocking operation.
    fn set_blocking(&mut self, _blocking: bool) -> io::Result<()> {
        Ok(())
    }

    /// A transport for the opposite direction, if this one has a peer that can answer.
    fn return_path(&mut self) -> Option<Box<dyn Transport>> {
        None
    }

    /// Releases the transport; errors from here are reported by `QemuFile::close`.
    fn close(&mut self) -> io::Result<()> {
        Ok(())
    }

    /// Writes every byte `iov` points at, as [`Transport::writev`], for
    /// memory that must not become a `&[u8]`: guest RAM that the guest
    /// process may write meanwhile (QEMU's multifd writes it with writev(2)
    /// too; a page torn by a guest write is resent after the dirty log marks
    /// it). Only a transport on a file descriptor that writes the bytes out
    /// untouched (a plain socket) can; the others answer `Unsupported`
    /// (multifd channels, its one caller, are always plain sockets).
    ///
    /// # Safety
    /// Every iovec's `iov_base` must be valid for reads of `iov_len` bytes
    /// until the call returns.
    unsafe fn writev_raw(&mut self, _iov: &[libc::iovec]) -> io::Result<usize> {
        Err(io::ErrorKind::Unsupported.into())
    }
}

impl<T: Transport + ?Sized> Transport for Box<T> {
    fn writev(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        (**self).writev(bufs)
    }
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (**self).read(buf)
    }
    fn shutdown(&mut self) -> io::Result<()> {
        (**self).shutdown()
    }
    fn shutdown_write(&mut self) -> io::Result<()> {
        (**self).shutdown_write()
    }
    fn set_blocking(&mut self, blocking: bool) -> io::Result<()> {
        (**self).set_blocking(blocking)
    }
    fn return_path(&mut self) -> Option<Box<dyn Transport>> {
        (**self).return_path()
    }
    fn close(&mut self) -> io::Result<()> {
        (**self).close()
    }
    unsafe fn writev_raw(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: the caller's contract, passed on unchanged.
        unsafe { (**self).writev_raw(iov) }
    }
}

/// [`Transport::writev_raw`] on a descriptor: writev(2) until every byte is
/// out, after partial writes and interruptions, at most `IOV_MAX` iovecs a
/// call.
///
/// # Safety
/// As [`Transport::writev_raw`].
unsafe fn writev_fd(fd: std::os::fd::RawFd, iov: &[libc::iovec]) -> io::Result<usize> {
    const IOV_MAX: usize = 1024;
    let mut rest: Vec<libc::iovec> = iov.iter().filter(|v| v.iov_len > 0).copied().collect();
    let mut from = 0;
    let mut done = 0usize;
    while from < rest.len() {
        let batch = &rest[from..rest.len().min(from + IOV_MAX)];
        // SAFETY: `batch` is a live slice of at most IOV_MAX iovecs, each
        // readable for its length (the caller's contract, and the advancing
        // below only moves bases forward within them).
        let n = unsafe { libc::writev(fd, batch.as_ptr(), batch.len() as libc::c_int) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            break;
        }
        let mut n = n as usize;
        done += n;
        while n > 0 {
            let v = &mut rest[from];
            if n >= v.iov_len {
                n -= v.iov_len;
                from += 1;
            } else {
                // SAFETY: `n` < the iovec's length: the new base stays
                // inside the memory the caller vouched for.
                v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n) }.cast();
                v.iov_len -= n;
                n = 0;
            }
        }
    }
    Ok(done)
}

/// Writes all of `bufs`, retrying after partial writes.
///
/// Returns early (with fewer bytes than asked) only when the writer accepts
/// nothing, which the QEMUFile layer reports as a short write.
fn write_all_vectored<W: Write + ?Sized>(w: &mut W, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    let mut owned: Vec<IoSlice<'_>> = bufs.to_vec();
    let mut rest: &mut [IoSlice<'_>] = &mut owned;
    let mut done = 0usize;
    while !rest.is_empty() {
        match w.write_vectored(rest) {
            Ok(0) => break,
            Ok(n) => {
                done += n;
                IoSlice::advance_slices(&mut rest, n);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

fn read_retrying<R: Read + ?Sized>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match r.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// A stream socket (TCP or unix); its return path is a second handle on the
/// same socket.
#[derive(Debug)]
pub struct SocketTransport<S>(pub S);

/// A TCP connection.
pub type TcpTransport = SocketTransport<TcpStream>;

/// A unix stream socket.
pub type UnixTransport = SocketTransport<UnixStream>;

/// The calls of a stream socket that a transport needs beyond reading and
/// writing; std has them on each socket type but in no trait.
pub trait Socket: Read + Write + AsRawFd + Send + Sized + 'static {
    /// See [`TcpStream::shutdown`].
    fn shutdown(&self, how: Shutdown) -> io::Result<()>;
    /// See [`TcpStream::set_nonblocking`].
    fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()>;
    /// See [`TcpStream::try_clone`].
    fn try_clone(&self) -> io::Result<Self>;
}

macro_rules! socket {
    ($t:ty) => {
        impl Socket for $t {
            fn shutdown(&self, how: Shutdown) -> io::Result<()> {
                <$t>::shutdown(self, how)
            }
            fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
                <$t>::set_nonblocking(self, nonblocking)
            }
            fn try_clone(&self) -> io::Result<Self> {
                <$t>::try_clone(self)
            }
        }
    };
}
socket!(TcpStream);
socket!(UnixStream);

impl<S: Socket> Transport for SocketTransport<S> {
    fn writev(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        write_all_vectored(&mut self.0, bufs)
    }
    unsafe fn writev_raw(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: the caller's contract; the descriptor is the socket's own.
        unsafe { writev_fd(self.0.as_raw_fd(), iov) }
    }
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        read_retrying(&mut self.0, buf)
    }
    fn shutdown(&mut self) -> io::Result<()> {
        self.0.shutdown(Shutdown::Both)
    }
    fn shutdown_write(&mut self) -> io::Result<()> {
        self.0.shutdown(Shutdown::Write)
    }
    fn set_blocking(&mut self, blocking: bool) -> io::Result<()> {
        self.0.set_nonblocking(!blocking)
    }
    fn return_path(&mut self) -> Option<Box<dyn Transport>> {
        self.0
            .try_clone()
            .ok()
            .map(|s| Box::new(SocketTransport(s)) as _)
    }
}

/// A regular file, a pipe or any other file descriptor (stdin, an inherited fd).
/// Files have no peer, so no return path.
#[derive(Debug)]
pub struct FileTransport(pub File);

impl FileTransport {
    /// Wraps a file descriptor handed to us by a parent process.
    pub fn from_fd(fd: OwnedFd) -> Self {
        Self(File::from(fd))
    }
}

impl Transport for FileTransport {
    fn writev(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        write_all_vectored(&mut self.0, bufs)
    }
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        read_retrying(&mut self.0, buf)
    }
    fn close(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

/// Bytes in memory: the private buffer of a compression worker, or a stream under test.
///
/// Writes append; reads consume from the front.
#[derive(Debug, Default, Clone)]
pub struct MemTransport {
    data: Vec<u8>,
    read_pos: usize,
}

impl MemTransport {
    /// An empty transport to write into.
    pub fn new() -> Self {
        Self::default()
    }

    /// A transport that reads `data` and then reports end of stream.
    pub fn from_bytes(data: Vec<u8>) -> Self {
        Self { data, read_pos: 0 }
    }

    /// The bytes written so far and not yet read.
    pub fn bytes(&self) -> &[u8] {
        &self.data[self.read_pos..]
    }

    /// Takes the unread bytes, leaving the transport empty.
    pub fn take(&mut self) -> Vec<u8> {
        let mut out = std::mem::take(&mut self.data);
        if self.read_pos > 0 {
            out.drain(..self.read_pos);
            self.read_pos = 0;
        }
        out
    }
}

impl Transport for MemTransport {
    fn writev(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let total = bufs.iter().map(|b| b.len()).sum();
        self.data.reserve(total);
        for b in bufs {
            self.data.extend_from_slice(b);
        }
        Ok(total)
    }
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let avail = &self.data[self.read_pos..];
        let n = avail.len().min(buf.len());
        buf[..n].copy_from_slice(&avail[..n]);
        self.read_pos += n;
        Ok(n)
    }
}

/// Any reader as a read-only transport (stdin, a `Cursor`, a decompressing reader).
#[derive(Debug)]
pub struct ReadTransport<R>(pub R);

impl<R: Read + Send> Transport for ReadTransport<R> {
    fn writev(&mut self, _bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "transport is read-only",
        ))
    }
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        read_retrying(&mut self.0, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer that accepts at most `chunk` bytes per call, like a congested socket.
    struct Dribble {
        out: Vec<u8>,
        chunk: usize,
    }

    impl Write for Dribble {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let n = buf.len().min(self.chunk);
            self.out.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn vectored_write_survives_partial_writes() {
        let parts: Vec<Vec<u8>> = (0..7u8).map(|i| vec![i; i as usize * 3]).collect();
        let slices: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
        let mut w = Dribble {
            out: Vec::new(),
            chunk: 5,
        };
        let n = write_all_vectored(&mut w, &slices).unwrap();
        assert_eq!(n, parts.iter().map(Vec::len).sum::<usize>());
        assert_eq!(w.out, parts.concat());
    }

    #[test]
    fn mem_transport_reads_what_was_written() {
        let mut t = MemTransport::new();
        t.writev(&[IoSlice::new(b"abc"), IoSlice::new(b"def")])
            .unwrap();
        let mut buf = [0u8; 4];
        assert_eq!(t.read(&mut buf).unwrap(), 4);
        assert_eq!(&buf, b"abcd");
        assert_eq!(t.take(), b"ef");
        assert_eq!(t.read(&mut buf).unwrap(), 0);
    }

    #[test]
    fn unix_socket_has_a_return_path() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut ta = SocketTransport(a);
        let mut tb = SocketTransport(b);
        let mut back = tb.return_path().expect("sockets have a return path");
        ta.writev(&[IoSlice::new(b"ping")]).unwrap();
        let mut buf = [0u8; 4];
        assert_eq!(tb.read(&mut buf).unwrap(), 4);
        back.writev(&[IoSlice::new(b"pong")]).unwrap();
        assert_eq!(ta.read(&mut buf).unwrap(), 4);
        assert_eq!(&buf, b"pong");
    }
}
