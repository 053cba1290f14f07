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

impl Uri {
    /// Opens the sending end: connects to a listener, or creates the file.
    pub fn connect(&self, timeout: Duration) -> io::Result<Connection> {
        match self {
            Uri::Tcp(addr) => {
                let mut last =
                    io::Error::new(io::ErrorKind::NotFound, "address resolves to nothing");
                for a in addr.to_socket_addrs()? {
                    match TcpStream::connect_timeout(&a, timeout) {
                        Ok(s) => {
                            s.set_nodelay(true)?;
                            return Ok(with_return_path(TcpTransport(s)));
                        }
                        Err(e) => last = e,
                    }
                }
                Err(last)
            }
            Uri::Unix(path) => Ok(with_return_path(UnixTransport(UnixStream::connect(path)?))),
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
    /// Waits for the peer (or takes the file) and returns the channel.
    pub fn accept(&self) -> io::Result<Connection> {
        match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nodelay(true)?;
                Ok(with_return_path(TcpTransport(s)))
            }
            Listener::Unix(l, _) => {
                let (s, _) = l.accept()?;
                Ok(with_return_path(UnixTransport(s)))
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
