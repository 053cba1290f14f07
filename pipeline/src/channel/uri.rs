//! Migration URIs in QEMU's forms: `tcp:HOST:PORT`, `unix:PATH`, `file:PATH`,
//! and opening them, with TLS on the two socket forms if asked.

use super::stall::{set_user_timeout, Stall};
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use ferry_proto::transport::{FileTransport, SocketTransport, Transport};

use crate::channel::tls::{self, Socket};

/// Where a migration stream goes or comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Uri {
    /// `tcp:HOST:PORT`
    Tcp(String),
    /// `unix:PATH`
    Unix(PathBuf),
    /// `file:PATH`: a stream saved to or loaded from a file.
    File(PathBuf),
}

/// A URI that is not one of the three forms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a migration URI: expected tcp:HOST:PORT, unix:PATH or file:PATH")]
pub struct ParseError(String);

impl FromStr for Uri {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ParseError(s.to_owned());
        let (scheme, rest) = s.split_once(':').ok_or_else(bad)?;
        if rest.is_empty() {
            return Err(bad());
        }
        match scheme {
            "tcp" => {
                let (host, port) = rest.rsplit_once(':').ok_or_else(bad)?;
                if host.is_empty() || port.parse::<u16>().is_err() {
                    return Err(bad());
                }
                Ok(Uri::Tcp(rest.to_owned()))
            }
            "unix" => Ok(Uri::Unix(rest.into())),
            "file" => Ok(Uri::File(rest.into())),
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for Uri {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Uri::Tcp(a) => write!(f, "tcp:{a}"),
            Uri::Unix(p) => write!(f, "unix:{}", p.display()),
            Uri::File(p) => write!(f, "file:{}", p.display()),
        }
    }
}

/// Why a channel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The socket or file.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// The TLS handshake or setup (boxed: it is large, and rare).
    #[error(transparent)]
    Tls(Box<tls::Error>),
    /// TLS asked for on a file.
    #[error("TLS works only on tcp: and unix: channels, not on {0}")]
    TlsOnFile(String),
}

impl From<tls::Error> for OpenError {
    fn from(e: tls::Error) -> Self {
        OpenError::Tls(Box::new(e))
    }
}

/// An open migration channel: the stream, and the way back if the peer has one.
pub struct Connection {
    /// The stream.
    pub transport: Box<dyn Transport>,
    /// The return path; `None` for files.
    pub return_path: Option<Box<dyn Transport>>,
    /// The channel is a TLS session (both directions).
    pub tls: bool,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("return_path", &self.return_path.is_some())
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

fn with_return_path<T: Transport + 'static>(mut t: T) -> Connection {
    let return_path = t.return_path();
    Connection {
        transport: Box::new(t),
        return_path,
        tls: false,
    }
}

/// A socket's channel, with timeouts reported as stalls.
fn stalling<T: Transport + 'static>(t: T, stall: Option<Duration>) -> Connection {
    stalling_conn(with_return_path(t), stall)
}

fn stalling_conn(mut conn: Connection, stall: Option<Duration>) -> Connection {
    if let Some(d) = stall {
        conn.transport = Box::new(Stall::new(conn.transport, d));
    }
    conn
}

impl Uri {
    /// The HOST of `tcp:HOST:PORT` (brackets of an IPv6 address removed).
    pub fn host(&self) -> Option<&str> {
        match self {
            Uri::Tcp(addr) => addr
                .rsplit_once(':')
                .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']')),
            _ => None,
        }
    }

    /// Opens the sending end: connects to a listener, or creates the file.
    /// With `stall`, a write that makes no progress for that long fails.
    /// With `tls`, the socket carries a TLS session whose handshake must
    /// finish within `timeout`.
    pub fn connect(
        &self,
        timeout: Duration,
        stall: Option<Duration>,
        tls: Option<&tls::Client>,
    ) -> Result<Connection, OpenError> {
        let socket = match self {
            Uri::Tcp(addr) => {
                let mut last =
                    io::Error::new(io::ErrorKind::NotFound, "address resolves to nothing");
                let mut found = None;
                for a in addr.to_socket_addrs()? {
                    match TcpStream::connect_timeout(&a, timeout) {
                        Ok(s) => {
                            s.set_nodelay(true)?;
                            set_user_timeout(&s, stall)?;
                            found = Some(s);
                            break;
                        }
                        Err(e) => last = e,
                    }
                }
                Socket::Tcp(found.ok_or(last)?)
            }
            Uri::Unix(path) => Socket::Unix(UnixStream::connect(path)?),
            Uri::File(path) => {
                if tls.is_some() {
                    return Err(OpenError::TlsOnFile(self.to_string()));
                }
                let f = OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(path)?;
                return Ok(Connection {
                    transport: Box::new(FileTransport(f)),
                    return_path: None,
                    tls: false,
                });
            }
        };
        match (tls, socket) {
            (None, Socket::Tcp(s)) => {
                s.set_write_timeout(stall)?;
                Ok(stalling(SocketTransport(s), stall))
            }
            (None, Socket::Unix(s)) => {
                s.set_write_timeout(stall)?;
                Ok(stalling(SocketTransport(s), stall))
            }
            (Some(client), socket) => {
                let name = client.server_name(self.host())?;
                let t = client.connect(socket, name, Some(timeout))?;
                t.set_timeouts(None, stall)?;
                Ok(tls_connection(t, stall))
            }
        }
    }

    /// Opens the receiving end without waiting for a peer: binds the socket
    /// (so a port in use fails here), or opens the file.
    pub fn listen(&self) -> io::Result<Listener> {
        match self {
            Uri::Tcp(addr) => Ok(Listener::Tcp(TcpListener::bind(addr.as_str())?)),
            Uri::Unix(path) => {
                // A stale socket file from an earlier run would make bind fail.
                if std::fs::symlink_metadata(path)
                    .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
                {
                    let _ = std::fs::remove_file(path);
                }
                Ok(Listener::Unix(UnixListener::bind(path)?, path.clone()))
            }
            Uri::File(path) => Ok(Listener::File(File::open(path)?)),
        }
    }
}

/// A TLS session as a channel: the return path is another handle on it.
fn tls_connection(t: tls::TlsTransport, stall: Option<Duration>) -> Connection {
    let mut conn = with_return_path(t);
    conn.tls = true;
    stalling_conn(conn, stall)
}

/// The receiving end before a peer arrives.
#[derive(Debug)]
pub enum Listener {
    /// A bound TCP socket.
    Tcp(TcpListener),
    /// A bound unix socket and its path (removed on drop).
    Unix(UnixListener, PathBuf),
    /// An open file.
    File(File),
}

impl Listener {
    /// Waits for the peer (or takes the file) and returns the channel. With
    /// `stall`, a read that gets nothing for that long fails. With `tls`, the
    /// peer must complete a TLS handshake (within `stall`, if set) with a
    /// certificate the server accepts.
    pub fn accept(
        &self,
        stall: Option<Duration>,
        tls: Option<&tls::Server>,
    ) -> Result<Connection, OpenError> {
        let socket = match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nodelay(true)?;
                Socket::Tcp(s)
            }
            Listener::Unix(l, _) => Socket::Unix(l.accept()?.0),
            Listener::File(f) => {
                if tls.is_some() {
                    return Err(OpenError::TlsOnFile("a file".into()));
                }
                return Ok(Connection {
                    transport: Box::new(FileTransport(f.try_clone()?)),
                    return_path: None,
                    tls: false,
                });
            }
        };
        match (tls, socket) {
            (None, Socket::Tcp(s)) => {
                s.set_read_timeout(stall)?;
                Ok(stalling(SocketTransport(s), stall))
            }
            (None, Socket::Unix(s)) => {
                s.set_read_timeout(stall)?;
                Ok(stalling(SocketTransport(s), stall))
            }
            (Some(server), socket) => {
                let t = server.accept(socket, stall)?;
                t.set_timeouts(stall, None)?;
                Ok(tls_connection(t, stall))
            }
        }
    }

    /// Waits for a peer until `deadline` (`None`: for ever), then as
    /// [`Listener::accept`]; `Ok(None)` when the deadline passed first.
    /// Sockets only: a file is always there.
    pub fn accept_until(
        &self,
        deadline: Option<std::time::Instant>,
        stall: Option<Duration>,
    ) -> Result<Option<Connection>, OpenError> {
        let Some(deadline) = deadline else {
            return self.accept(stall, None).map(Some);
        };
        let fd = match self {
            Listener::Tcp(l) => l.as_fd(),
            Listener::Unix(l, _) => l.as_fd(),
            Listener::File(_) => return self.accept(stall, None).map(Some),
        };
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            let mut fds = [poll_in(fd)];
            let ms = libc::c_int::try_from(left.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
            // SAFETY: `fds` is one valid pollfd on our stack, for a listening
            // socket this listener owns, and poll reads and writes only it.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, ms) };
            if n > 0 {
                return self.accept(stall, None).map(Some);
            }
            if n < 0 && io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
                return Err(io::Error::last_os_error().into());
            }
        }
    }

    /// The local address, for `tcp:HOST:0` listeners.
    pub fn local_addr(&self) -> Option<String> {
        match self {
            Listener::Tcp(l) => l.local_addr().ok().map(|a| a.to_string()),
            _ => None,
        }
    }
}

fn poll_in(fd: std::os::fd::BorrowedFd<'_>) -> libc::pollfd {
    use std::os::fd::AsRawFd;
    libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_three_forms_and_rejects_the_rest() {
        assert_eq!(
            "tcp:127.0.0.1:4444".parse(),
            Ok(Uri::Tcp("127.0.0.1:4444".into()))
        );
        assert_eq!("tcp:[::1]:4444".parse(), Ok(Uri::Tcp("[::1]:4444".into())));
        assert_eq!(
            "unix:/run/m.sock".parse(),
            Ok(Uri::Unix("/run/m.sock".into()))
        );
        assert_eq!("file:/tmp/s".parse(), Ok(Uri::File("/tmp/s".into())));
        for bad in [
            "",
            "tcp:",
            "tcp:host",
            "tcp:host:99999",
            "exec:cat",
            "/tmp/x",
            "unix:",
        ] {
            assert!(bad.parse::<Uri>().is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn the_host_of_a_tcp_uri_names_the_tls_server() {
        let host = |s: &str| s.parse::<Uri>().unwrap().host().map(str::to_owned);
        assert_eq!(host("tcp:localhost:4444").as_deref(), Some("localhost"));
        assert_eq!(host("tcp:127.0.0.1:4444").as_deref(), Some("127.0.0.1"));
        assert_eq!(host("tcp:[::1]:4444").as_deref(), Some("::1"));
        assert_eq!(host("unix:/run/m.sock"), None);
    }
}
