//! Migration URIs in QEMU's forms: `tcp:HOST:PORT`, `unix:PATH`, `file:PATH`.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use ferry_proto::transport::{FileTransport, TcpTransport, Transport, UnixTransport};

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

/// An open migration channel: the stream, and the way back if the peer has one.
pub struct Connection {
    /// The stream.
    pub transport: Box<dyn Transport>,
    /// The return path; `None` for files.
    pub return_path: Option<Box<dyn Transport>>,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("return_path", &self.return_path.is_some())
            .finish_non_exhaustive()
    }
}

fn with_return_path<T: Transport + 'static>(mut t: T) -> Connection {
    let return_path = t.return_path();
    Connection {
        transport: Box::new(t),
        return_path,
    }
}

/// A transport whose peer made no progress for the stall timeout: the
/// socket's timeout error, said in words a user can act on.
struct Stall<T> {
    inner: T,
    secs: u64,
}

impl<T> Stall<T> {
    fn map(&self, e: io::Error) -> io::Error {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "the connection stalled: no progress for {} s (--stall-timeout)",
                    self.secs
                ),
            ),
            _ => e,
        }
    }
}

impl<T: Transport> Transport for Stall<T> {
    fn writev(&mut self, bufs: &[std::io::IoSlice<'_>]) -> io::Result<usize> {
        self.inner.writev(bufs).map_err(|e| self.map(e))
    }
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf).map_err(|e| self.map(e))
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

/// A socket's channel, with timeouts reported as stalls.
fn stalling<T: Transport + 'static>(t: T, stall: Option<Duration>) -> Connection {
    let mut conn = with_return_path(t);
    if let Some(d) = stall {
        conn.transport = Box::new(Stall {
            inner: conn.transport,
            secs: d.as_secs(),
        });
    }
    conn
}

impl Uri {
    /// Opens the sending end: connects to a listener, or creates the file.
    /// With `stall`, a write that makes no progress for that long fails.
    pub fn connect(&self, timeout: Duration, stall: Option<Duration>) -> io::Result<Connection> {
        match self {
            Uri::Tcp(addr) => {
                let mut last =
                    io::Error::new(io::ErrorKind::NotFound, "address resolves to nothing");
                for a in addr.to_socket_addrs()? {
                    match TcpStream::connect_timeout(&a, timeout) {
                        Ok(s) => {
                            s.set_nodelay(true)?;
                            s.set_write_timeout(stall)?;
                            return Ok(stalling(TcpTransport(s), stall));
                        }
                        Err(e) => last = e,
                    }
                }
                Err(last)
            }
            Uri::Unix(path) => {
                let s = UnixStream::connect(path)?;
                s.set_write_timeout(stall)?;
                Ok(stalling(UnixTransport(s), stall))
            }
            Uri::File(path) => {
                let f = OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .open(path)?;
                Ok(Connection {
                    transport: Box::new(FileTransport(f)),
                    return_path: None,
                })
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
    /// `stall`, a read that gets nothing for that long fails.
    pub fn accept(&self, stall: Option<Duration>) -> io::Result<Connection> {
        match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nodelay(true)?;
                s.set_read_timeout(stall)?;
                Ok(stalling(TcpTransport(s), stall))
            }
            Listener::Unix(l, _) => {
                let (s, _) = l.accept()?;
                s.set_read_timeout(stall)?;
                Ok(stalling(UnixTransport(s), stall))
            }
            Listener::File(f) => Ok(Connection {
                transport: Box::new(FileTransport(f.try_clone()?)),
                return_path: None,
            }),
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
}
