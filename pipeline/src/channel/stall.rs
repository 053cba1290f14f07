//! Stall detection: a connection whose peer makes no progress for the stall
//! timeout (`--stall-timeout`) fails with an error that says so, within one
//! timeout rather than two or three.

use std::io;
use std::net::TcpStream;
use std::time::Duration;

use ferry_proto::transport::Transport;

/// A transport whose peer made no progress for the stall timeout: the
/// socket's timeout error, said in words a user can act on.
#[derive(Debug)]
pub struct Stall<T> {
    inner: T,
    secs: u64,
    /// When bytes last moved. A connection the kernel gave up on
    /// (TCP_USER_TIMEOUT) may surface as a broken pipe on the next write: if
    /// nothing moved for the stall timeout, that too is the stall.
    last_progress: std::time::Instant,
}

impl<T> Stall<T> {
    /// Wraps `inner`; its errors after `timeout` without progress are stalls.
    pub fn new(inner: T, timeout: Duration) -> Self {
        Self {
            inner,
            secs: timeout.as_secs(),
            last_progress: std::time::Instant::now(),
        }
    }

    fn map(&self, e: io::Error) -> io::Error {
        // The kernel's own give-up comes a little after the last write that
        // still fit in the socket buffer, so half the timeout counts.
        let quiet = self.last_progress.elapsed() >= Duration::from_secs(self.secs) / 2;
        let stalled = match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => true,
            // What the kernel reports when it gives up on the connection
            // depends on why: a reset, or the route that went away with a link.
            io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::NetworkUnreachable
            | io::ErrorKind::HostUnreachable => quiet,
            _ => false,
        };
        if !stalled {
            return e;
        }
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "the connection stalled: no progress for {} s (--stall-timeout)",
                self.secs
            ),
        )
    }
}

impl<T: Transport> Transport for Stall<T> {
    fn writev(&mut self, bufs: &[std::io::IoSlice<'_>]) -> io::Result<usize> {
        let r = self.inner.writev(bufs).map_err(|e| self.map(e));
        if matches!(r, Ok(n) if n > 0) {
            self.last_progress = std::time::Instant::now();
        }
        r
    }
    unsafe fn writev_raw(&mut self, iov: &[libc::iovec]) -> io::Result<usize> {
        // SAFETY: the caller's contract, passed on unchanged.
        let r = unsafe { self.inner.writev_raw(iov) }.map_err(|e| self.map(e));
        if matches!(r, Ok(n) if n > 0) {
            self.last_progress = std::time::Instant::now();
        }
        r
    }
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let r = self.inner.read(buf).map_err(|e| self.map(e));
        if matches!(r, Ok(n) if n > 0) {
            self.last_progress = std::time::Instant::now();
        }
        r
    }
    fn shutdown(&mut self) -> io::Result<()> {
        self.inner.shutdown()
    }
    fn shutdown_write(&mut self) -> io::Result<()> {
        self.inner.shutdown_write()
    }
    fn return_path(&mut self) -> Option<Box<dyn Transport>> {
        self.inner.return_path()
    }
    fn close(&mut self) -> io::Result<()> {
        self.inner.close()
    }
}

/// Bounds how long sent data may stay unacknowledged (TCP_USER_TIMEOUT).
/// SO_SNDTIMEO alone restarts with every write that copies a few bytes into
/// a socket buffer with room left, so a dead link took two or three stall
/// timeouts to notice; with this the connection fails after one.
pub fn set_user_timeout(s: &TcpStream, stall: Option<Duration>) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let Some(d) = stall else { return Ok(()) };
    let ms = libc::c_uint::try_from(d.as_millis()).unwrap_or(libc::c_uint::MAX);
    // SAFETY: setsockopt reads exactly size_of::<c_uint>() bytes from a valid
    // c_uint on our stack, for a socket we own.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_USER_TIMEOUT,
            (&ms as *const libc::c_uint).cast(),
            std::mem::size_of::<libc::c_uint>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
