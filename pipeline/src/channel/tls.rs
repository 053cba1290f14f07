//! TLS 1.3 on tcp: and unix: channels, with mutual authentication like QEMU's
//! `tls-creds-x509` with `verify-peer=on`.
//!
//! Both ends give `--tls-cert`, `--tls-key` and `--tls-ca` (PEM files). The
//! receiver (the TLS server) takes only a sender whose certificate is signed
//! by its CA; the sender (the TLS client) takes only a receiver whose
//! certificate is signed by its CA and is issued for the name it expects:
//! `--tls-hostname` if given, else the HOST of `tcp:HOST:PORT` (a DNS name, or
//! an address matched against the certificate's IP SANs), else
//! [`DEFAULT_NAME`] for `unix:PATH`. Session tickets and resumption are off:
//! one migration is one full handshake.
//!
//! ## One session, two directions
//!
//! The stream goes one way and the return path the other, from two threads
//! on the sender (the writer and the return-path reader). Both directions
//! share one rustls connection behind a mutex, and nobody blocks on the
//! socket while holding it:
//!
//! - a reader takes plaintext under the lock; when there is none it drops the
//!   lock, reads ciphertext from the (blocking) socket, and feeds it to rustls
//!   under the lock again;
//! - a writer encrypts under the lock into its own buffer, takes the socket's
//!   write lock *before* dropping the session lock (so records reach the
//!   socket in the order they were sealed), and writes without the session
//!   lock.
//!
//! A reader blocked in `read(2)` therefore never stops the writer, and the
//! socket timeouts (`--stall-timeout`) keep their meaning. A fatal TLS error
//! seen by either direction is latched and reported by both, so a sender
//! whose writes fail because the receiver refused its certificate says so
//! instead of "broken pipe".

use std::fmt;
use std::io::{self, IoSlice, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ferry_proto::transport::Transport;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, InvalidDnsNameError, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{AlertDescription, ClientConfig, Connection, RootCertStore, ServerConfig};
use serde::{Deserialize, Serialize};

/// The name a receiver's certificate must carry when the sender connects
/// over a unix socket and is given no `--tls-hostname`.
pub const DEFAULT_NAME: &str = "ferry";

/// How long a sender whose certificate was refused may keep writing before
/// the refusing receiver closes (so the sender reads the alert, not a reset).
const LINGER: Duration = Duration::from_secs(2);

/// How long a failed write waits for the other direction to read the alert
/// that explains it.
const EXPLAIN_WAIT: Duration = Duration::from_secs(1);

/// Socket reads, in bytes.
const READ_CHUNK: usize = 64 << 10;

/// `--tls-cert`, `--tls-key`, `--tls-ca`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Files {
    /// This end's certificate (its chain may follow), PEM.
    pub cert: PathBuf,
    /// Its private key, PEM.
    pub key: PathBuf,
    /// The CA that signs the peer's certificate, PEM.
    pub ca: PathBuf,
}

impl Files {
    /// The three files if all are given, `None` if none is.
    pub fn from_options(
        cert: Option<&Path>,
        key: Option<&Path>,
        ca: Option<&Path>,
    ) -> Result<Option<Self>, Error> {
        match (cert, key, ca) {
            (None, None, None) => Ok(None),
            (Some(cert), Some(key), Some(ca)) => Ok(Some(Self {
                cert: cert.to_owned(),
                key: key.to_owned(),
                ca: ca.to_owned(),
            })),
            _ => Err(Error::Incomplete),
        }
    }
}

/// Which end the peer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Peer {
    /// We are the receiver; the peer sends.
    Sender,
    /// We are the sender; the peer receives.
    Receiver,
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Peer::Sender => "sender",
            Peer::Receiver => "receiver",
        })
    }
}

/// Errors of setting up TLS.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Some but not all of the three files were given.
    #[error("TLS needs all three of --tls-cert, --tls-key and --tls-ca")]
    Incomplete,
    /// A PEM file cannot be read.
    #[error("cannot read the {what} from {path}")]
    Pem {
        /// What the file should hold.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: pem::Error,
    },
    /// A certificate file holds no certificate.
    #[error("{path} holds no PEM certificate")]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// A CA certificate cannot be used as a trust anchor.
    #[error("the CA certificate in {path} is not usable")]
    BadCa {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rustls::Error,
    },
    /// The certificate and key do not go together, or are not usable.
    #[error("the certificate {cert} and the key {key} do not make a usable identity (does the key belong to the certificate?)")]
    Identity {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// Why.
        #[source]
        source: rustls::Error,
    },
    /// The client-certificate verifier cannot be built.
    #[error("cannot set up the verification of senders' certificates")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    /// A name that cannot be a TLS server name.
    #[error("{name:?} is not a valid TLS server name (use --tls-hostname)")]
    ServerName {
        /// The name.
        name: String,
        /// Why.
        #[source]
        source: InvalidDnsNameError,
    },
    /// rustls refused the configuration or the session.
    #[error("cannot start a TLS session")]
    Start(#[source] rustls::Error),
    /// The handshake failed: the peer is not who we accept, or refused us.
    #[error("TLS handshake with the {peer} failed: {why}")]
    Handshake {
        /// Who the peer is.
        peer: Peer,
        /// What it most likely means.
        why: String,
        /// What happened.
        #[source]
        source: io::Error,
    },
}

/// A failure of an established session, carried by the `io::Error`s of a
/// [`TlsTransport`] (kind `InvalidData`).
#[derive(Debug, thiserror::Error)]
#[error("the TLS session with the {peer} failed: {why}")]
pub struct SessionError {
    /// Who the peer is.
    pub peer: Peer,
    /// What it most likely means.
    pub why: String,
    /// What rustls saw.
    #[source]
    pub source: rustls::Error,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certificates(path: &Path, what: &'static str) -> Result<Vec<CertificateDer<'static>>, Error> {
    let pem_err = |source| Error::Pem {
        what,
        path: path.to_owned(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(pem_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_err)?;
    if certs.is_empty() {
        return Err(Error::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>, Error> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| Error::Pem {
        what: "private key",
        path: path.to_owned(),
        source,
    })
}

fn roots(path: &Path) -> Result<Arc<RootCertStore>, Error> {
    let mut store = RootCertStore::empty();
    for c in certificates(path, "CA certificate")? {
        store.add(c).map_err(|source| Error::BadCa {
            path: path.to_owned(),
            source,
        })?;
    }
    Ok(Arc::new(store))
}

/// The sending end's TLS setup.
#[derive(Debug, Clone)]
pub struct Client {
    config: Arc<ClientConfig>,
    hostname: Option<String>,
}

impl Client {
    /// Loads the files; `hostname` overrides the name the receiver's
    /// certificate must carry.
    pub fn new(files: &Files, hostname: Option<&str>) -> Result<Self, Error> {
        let roots = roots(&files.ca)?;
        let certs = certificates(&files.cert, "certificate")?;
        let key = private_key(&files.key)?;
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(Error::Start)?
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)
            .map_err(|source| Error::Identity {
                cert: files.cert.clone(),
                key: files.key.clone(),
                source,
            })?;
        config.resumption = rustls::client::Resumption::disabled();
        let client = Self {
            config: Arc::new(config),
            hostname: hostname.map(str::to_owned),
        };
        if let Some(h) = &client.hostname {
            client.server_name(None)?;
            tracing::debug!(hostname = h, "TLS server name set");
        }
        Ok(client)
    }

    /// The name the receiver's certificate must carry: `--tls-hostname`, else
    /// `host` (the HOST of a tcp: URI), else [`DEFAULT_NAME`].
    pub fn server_name(&self, host: Option<&str>) -> Result<ServerName<'static>, Error> {
        let name = self
            .hostname
            .as_deref()
            .or(host)
            .unwrap_or(DEFAULT_NAME)
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        ServerName::try_from(name.clone()).map_err(|source| Error::ServerName { name, source })
    }

    /// Runs the handshake on a connected socket.
    pub fn connect(
        &self,
        socket: Socket,
        name: ServerName<'static>,
        timeout: Option<Duration>,
    ) -> Result<TlsTransport, Error> {
        let conn =
            rustls::ClientConnection::new(self.config.clone(), name).map_err(Error::Start)?;
        handshake(conn.into(), socket, Peer::Receiver, timeout)
    }
}

/// The receiving end's TLS setup.
#[derive(Debug, Clone)]
pub struct Server {
    config: Arc<ServerConfig>,
}

impl Server {
    /// Loads the files.
    pub fn new(files: &Files) -> Result<Self, Error> {
        let roots = roots(&files.ca)?;
        let certs = certificates(&files.cert, "certificate")?;
        let key = private_key(&files.key)?;
        let provider = provider();
        // Mandatory client authentication: anonymous senders are refused.
        let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(Error::Verifier)?;
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(Error::Start)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key)
            .map_err(|source| Error::Identity {
                cert: files.cert.clone(),
                key: files.key.clone(),
                source,
            })?;
        // Nothing to resume; and a peer that never reads (a QEMU source)
        // must not be left holding unread tickets.
        config.send_tls13_tickets = 0;
        config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        Ok(Self {
            config: Arc::new(config),
        })
    }

    /// Runs the handshake on an accepted socket. A refused peer gets the TLS
    /// alert and a moment to read it before the socket closes.
    pub fn accept(&self, socket: Socket, timeout: Option<Duration>) -> Result<TlsTransport, Error> {
        let conn = rustls::ServerConnection::new(self.config.clone()).map_err(Error::Start)?;
        handshake(conn.into(), socket, Peer::Sender, timeout)
    }
}

/// A connected stream socket.
#[derive(Debug)]
pub enum Socket {
    /// TCP.
    Tcp(TcpStream),
    /// A unix stream socket.
    Unix(UnixStream),
}

impl Socket {
    fn try_clone(&self) -> io::Result<Self> {
        Ok(match self {
            Socket::Tcp(s) => Socket::Tcp(s.try_clone()?),
            Socket::Unix(s) => Socket::Unix(s.try_clone()?),
        })
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Socket::Tcp(s) => s.shutdown(how),
            Socket::Unix(s) => s.shutdown(how),
        }
    }

    fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> io::Result<()> {
        match self {
            Socket::Tcp(s) => {
                s.set_read_timeout(read)?;
                s.set_write_timeout(write)
            }
            Socket::Unix(s) => {
                s.set_read_timeout(read)?;
                s.set_write_timeout(write)
            }
        }
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => s.read(buf),
            Socket::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => s.write(buf),
            Socket::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// What a TLS error most likely means, for someone who set up the certificates.
fn explain_tls(peer: Peer, e: &rustls::Error) -> String {
    use rustls::Error as E;
    use AlertDescription as A;
    match e {
        E::InvalidCertificate(_) => match peer {
            Peer::Receiver => "the receiver's certificate is not accepted: it must be signed by our --tls-ca and issued for the name we expect (the tcp: host, \"ferry\" for unix:, or --tls-hostname)".into(),
            Peer::Sender => "the sender's certificate is not accepted: it must be signed by our --tls-ca".into(),
        },
        E::NoCertificatesPresented => format!("the {peer} presented no certificate"),
        E::AlertReceived(
            A::UnknownCA
            | A::BadCertificate
            | A::UnsupportedCertificate
            | A::CertificateRevoked
            | A::CertificateExpired
            | A::CertificateUnknown
            | A::CertificateRequired
            | A::AccessDenied
            // A certificate's signature that does not verify.
            | A::DecryptError,
        ) => format!("the {peer} refused our certificate (is it signed by the {peer}'s --tls-ca, and issued for the right name?)"),
        E::AlertReceived(a) => format!("the {peer} ended the session with alert {a:?}"),
        E::InvalidMessage(_)
        | E::InappropriateMessage { .. }
        | E::InappropriateHandshakeMessage { .. } => format!(
            "the {peer} does not speak TLS (is it running without --tls-cert/--tls-key/--tls-ca?)"
        ),
        E::DecryptError => "a record failed authentication: the data was altered in transit".into(),
        _ => format!("TLS with the {peer} failed"),
    }
}

fn explain_io(peer: Peer, e: &io::Error) -> String {
    if let Some(t) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        return explain_tls(peer, t);
    }
    match e.kind() {
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => format!(
            "the {peer} closed the connection (does it use TLS, and accept our certificate? see its log)"
        ),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            format!("the {peer} did not complete the handshake in time")
        }
        _ => "the connection failed".into(),
    }
}

fn handshake(
    mut conn: Connection,
    mut socket: Socket,
    peer: Peer,
    timeout: Option<Duration>,
) -> Result<TlsTransport, Error> {
    let fail = |source: io::Error| Error::Handshake {
        peer,
        why: explain_io(peer, &source),
        source,
    };
    socket.set_timeouts(timeout, timeout).map_err(fail)?;
    // The transport bounds what it hands over per call.
    conn.set_buffer_limit(None);
    while conn.is_handshaking() {
        if let Err(e) = conn.complete_io(&mut socket) {
            // complete_io's last-gasp write may leave the alert behind a
            // queued record: send all of it, so the peer learns why.
            while conn.wants_write() {
                if !matches!(conn.write_tls(&mut socket), Ok(n) if n > 0) {
                    break;
                }
            }
            if peer == Peer::Sender {
                linger(&mut socket);
            }
            return Err(fail(e));
        }
    }
    TlsTransport::new(conn, socket, peer).map_err(fail)
}

/// After refusing a sender: end our side (the alert is out), then read and
/// drop what it still sends for a moment, so our close does not become a
/// reset that could discard the alert before the sender reads it.
fn linger(socket: &mut Socket) {
    let _ = socket.shutdown(Shutdown::Write);
    let _ = socket.set_timeouts(Some(Duration::from_millis(100)), None);
    let deadline = Instant::now() + LINGER;
    let mut buf = vec![0u8; READ_CHUNK];
    while Instant::now() < deadline {
        match socket.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(_) => return,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The rustls session and what was read for it.
struct State {
    conn: Connection,
    /// Ciphertext read from the socket, from `pos` on not yet given to rustls.
    pending: Vec<u8>,
    pos: usize,
    /// The socket reached end of input; `eof_fed` once rustls was told.
    eof: bool,
    eof_fed: bool,
    /// The first fatal TLS error, reported by both directions.
    failed: Option<rustls::Error>,
}

fn session_error(peer: Peer, e: &rustls::Error) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        SessionError {
            peer,
            why: explain_tls(peer, e),
            source: e.clone(),
        },
    )
}

impl State {
    fn process(&mut self, peer: Peer) -> io::Result<()> {
        if let Err(e) = self.conn.process_new_packets() {
            let err = session_error(peer, &e);
            self.failed = Some(e);
            return Err(err);
        }
        Ok(())
    }

    /// Decrypted bytes into `buf` (`Some(0)`: the peer ended the session),
    /// or `None` when more ciphertext is needed from the socket.
    fn take_plaintext(&mut self, peer: Peer, buf: &mut [u8]) -> io::Result<Option<usize>> {
        loop {
            match self.conn.reader().read(buf) {
                Ok(n) => return Ok(Some(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("the {peer} closed the connection without ending the TLS session (no close_notify): what it sent may be cut short"),
                    ))
                }
                Err(e) => return Err(e),
            }
            if let Some(e) = &self.failed {
                return Err(session_error(peer, e));
            }
            if self.pos < self.pending.len() {
                let n = self.conn.read_tls(&mut &self.pending[self.pos..])?;
                // Nothing is taken after the peer's close_notify.
                self.pos = if n == 0 {
                    self.pending.len()
                } else {
                    self.pos + n
                };
                if self.pos == self.pending.len() {
                    self.pending.clear();
                    self.pos = 0;
                }
                self.process(peer)?;
            } else if self.eof && !self.eof_fed {
                self.eof_fed = true;
                self.conn.read_tls(&mut io::empty())?;
                self.process(peer)?;
            } else if self.eof_fed {
                return Err(io::ErrorKind::UnexpectedEof.into());
            } else {
                return Ok(None);
            }
        }
    }

    /// Everything rustls has sealed, appended to `out`.
    fn drain_tls(&mut self, out: &mut Vec<u8>) -> io::Result<()> {
        while self.conn.wants_write() {
            self.conn.write_tls(out)?;
        }
        Ok(())
    }
}

struct Shared {
    peer: Peer,
    state: Mutex<State>,
    /// The socket for writes; held while writing so records stay in order.
    wsock: Mutex<Socket>,
    /// The socket for reads; held while reading so ciphertext stays in order.
    rsock: Mutex<Socket>,
    /// For shutdown and timeouts, which must not wait for a blocked thread.
    ctl: Socket,
}

/// One direction (or both) of a TLS session; [`Transport::return_path`]
/// gives another handle on the same session.
pub struct TlsTransport {
    shared: Arc<Shared>,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
}

impl fmt::Debug for TlsTransport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsTransport")
            .field("peer", &self.shared.peer)
            .finish_non_exhaustive()
    }
}

impl TlsTransport {
    fn new(conn: Connection, socket: Socket, peer: Peer) -> io::Result<Self> {
        let shared = Shared {
            peer,
            state: Mutex::new(State {
                conn,
                pending: Vec::new(),
                pos: 0,
                eof: false,
                eof_fed: false,
                failed: None,
            }),
            wsock: Mutex::new(socket.try_clone()?),
            rsock: Mutex::new(socket.try_clone()?),
            ctl: socket,
        };
        Ok(Self::handle(Arc::new(shared)))
    }

    fn handle(shared: Arc<Shared>) -> Self {
        Self {
            shared,
            rbuf: Vec::new(),
            wbuf: Vec::new(),
        }
    }

    /// Sets the socket's timeouts for the session (the handshake had its own).
    pub fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> io::Result<()> {
        self.shared.ctl.set_timeouts(read, write)
    }

    /// A write failed: if the peer explained why with an alert, which the
    /// other direction may be reading right now, report that instead.
    fn explain_write(&self, e: io::Error) -> io::Error {
        if !matches!(
            e.kind(),
            io::ErrorKind::BrokenPipe
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::ConnectionAborted
        ) {
            return e;
        }
        let deadline = Instant::now() + EXPLAIN_WAIT;
        loop {
            if let Some(f) = &lock(&self.shared.state).failed {
                return session_error(self.shared.peer, f);
            }
            if Instant::now() >= deadline {
                return e;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Writes what the session sealed, in order, without holding the session.
    fn send_sealed(&mut self, st: MutexGuard<'_, State>, out: &[u8]) -> io::Result<()> {
        let mut w = lock(&self.shared.wsock);
        drop(st);
        let r = w.write_all(out);
        drop(w);
        r.map_err(|e| self.explain_write(e))
    }
}

impl Transport for TlsTransport {
    fn writev(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        if bufs.iter().all(|b| b.is_empty()) {
            return Ok(0);
        }
        let shared = self.shared.clone();
        let mut out = std::mem::take(&mut self.wbuf);
        out.clear();
        let mut st = lock(&shared.state);
        if let Some(e) = &st.failed {
            return Err(session_error(shared.peer, e));
        }
        // No buffer limit: rustls takes it all, in full-size records.
        let n = st.conn.writer().write_vectored(bufs)?;
        st.drain_tls(&mut out)?;
        let r = self.send_sealed(st, &out);
        if out.capacity() <= 4 << 20 {
            self.wbuf = out;
        }
        r.map(|()| n)
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let shared = self.shared.clone();
        let mut rsock = lock(&shared.rsock);
        if self.rbuf.is_empty() {
            self.rbuf = vec![0; READ_CHUNK];
        }
        loop {
            if let Some(n) = lock(&shared.state).take_plaintext(shared.peer, buf)? {
                return Ok(n);
            }
            let n = loop {
                match rsock.read(&mut self.rbuf) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    other => break other?,
                }
            };
            let mut st = lock(&shared.state);
            if n == 0 {
                st.eof = true;
            } else {
                st.pending.extend_from_slice(&self.rbuf[..n]);
            }
        }
    }

    fn shutdown(&mut self) -> io::Result<()> {
        self.shared.ctl.shutdown(Shutdown::Both)
    }

    /// Ends the session in our direction (close_notify), then the socket's
    /// writing side; the peer can still answer.
    fn shutdown_write(&mut self) -> io::Result<()> {
        let shared = self.shared.clone();
        let mut out = Vec::new();
        let mut st = lock(&shared.state);
        st.conn.send_close_notify();
        st.drain_tls(&mut out)?;
        self.send_sealed(st, &out)?;
        shared.ctl.shutdown(Shutdown::Write)
    }

    fn return_path(&mut self) -> Option<Box<dyn Transport>> {
        Some(Box::new(Self::handle(self.shared.clone())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

    /// A CA in `dir` and a function to sign certificates with it.
    struct TestCa {
        issuer: CertifiedIssuer<'static, KeyPair>,
        pem: PathBuf,
    }

    fn test_ca(dir: &Path, name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("{name} CA"));
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let pem = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&pem, issuer.pem()).unwrap();
        TestCa { issuer, pem }
    }

    fn files(dir: &Path, ca: &TestCa, trust: &TestCa, name: &str, sans: &[&str]) -> Files {
        let sans: Vec<String> = sans.iter().map(|s| s.to_string()).collect();
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(sans)
            .unwrap()
            .signed_by(&key, &ca.issuer)
            .unwrap();
        let f = Files {
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}-key.pem")),
            ca: trust.pem.clone(),
        };
        std::fs::write(&f.cert, cert.pem()).unwrap();
        std::fs::write(&f.key, key.serialize_pem()).unwrap();
        f
    }

    /// Handshakes a client and a server over a socket pair; returns both results.
    fn pair(
        client: &Files,
        server: &Files,
    ) -> (Result<TlsTransport, Error>, Result<TlsTransport, Error>) {
        let (a, b) = UnixStream::pair().unwrap();
        let server = Server::new(server).unwrap();
        let t = std::thread::spawn(move || {
            server.accept(Socket::Unix(b), Some(Duration::from_secs(10)))
        });
        let client = Client::new(client, None).unwrap();
        let name = client.server_name(None).unwrap();
        let c = client.connect(Socket::Unix(a), name, Some(Duration::from_secs(10)));
        (c, t.join().unwrap())
    }

    fn chain(e: &dyn std::error::Error) -> String {
        crate::supervisor::error_chain(e)
    }

    #[test]
    fn both_directions_work_at_once_and_end_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let ca = test_ca(dir.path(), "ca");
        let s = files(dir.path(), &ca, &ca, "server", &[DEFAULT_NAME]);
        let c = files(dir.path(), &ca, &ca, "client", &["sender"]);
        let (client, server) = pair(&c, &s);
        let (mut client, mut server) = (client.unwrap(), server.unwrap());
        let mut client_rp = client.return_path().unwrap();
        let mut server_rp = server.return_path().unwrap();
        // The client's return path blocks in read while the client writes
        // 8 MiB: the writer must not wait for the reader.
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut buf = [0u8; 100];
            loop {
                match client_rp.read(&mut buf).unwrap() {
                    0 => return got,
                    n => got.extend_from_slice(&buf[..n]),
                }
            }
        });
        let data: Vec<u8> = (0..8 << 20).map(|i: u32| (i * 7 % 251) as u8).collect();
        let sink = std::thread::spawn(move || {
            let mut got = Vec::new();
            let mut buf = vec![0u8; 40000];
            loop {
                match server.read(&mut buf).unwrap() {
                    0 => break,
                    n => got.extend_from_slice(&buf[..n]),
                }
            }
            server_rp.writev(&[IoSlice::new(b"ack\n")]).unwrap();
            server_rp.shutdown_write().unwrap();
            got
        });
        for piece in data.chunks(300_000) {
            let (a, b) = piece.split_at(piece.len() / 3);
            assert_eq!(
                client.writev(&[IoSlice::new(a), IoSlice::new(b)]).unwrap(),
                piece.len()
            );
        }
        client.shutdown_write().unwrap();
        assert!(sink.join().unwrap() == data, "the stream arrived altered");
        assert_eq!(reader.join().unwrap(), b"ack\n");
    }

    #[test]
    fn a_peer_from_another_ca_is_refused_with_a_reason_on_both_sides() {
        let dir = tempfile::tempdir().unwrap();
        let good = test_ca(dir.path(), "good");
        let rogue = test_ca(dir.path(), "rogue");
        let s = files(dir.path(), &good, &good, "server", &[DEFAULT_NAME]);
        let c = files(dir.path(), &good, &good, "client", &["sender"]);

        // The receiver's certificate is signed by a CA the sender does not trust.
        let rogue_s = files(dir.path(), &rogue, &good, "rogue-server", &[DEFAULT_NAME]);
        let (client, server) = pair(&c, &rogue_s);
        let e = chain(&client.unwrap_err());
        assert!(e.contains("receiver's certificate is not accepted"), "{e}");
        let e = chain(&server.unwrap_err());
        assert!(e.contains("the sender refused our certificate"), "{e}");

        // The sender's certificate is signed by a CA the receiver does not
        // trust: the sender learns it from the alert, on its next read.
        let rogue_c = files(dir.path(), &rogue, &good, "rogue-client", &["sender"]);
        let (client, server) = pair(&rogue_c, &s);
        let e = chain(&server.unwrap_err());
        assert!(
            e.contains("the sender's certificate is not accepted"),
            "{e}"
        );
        let mut client = client.unwrap();
        let e = client.read(&mut [0u8; 10]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(
            chain(&e).contains("the receiver refused our certificate"),
            "{}",
            chain(&e)
        );
    }

    #[test]
    fn all_three_files_or_none() {
        let p = Path::new("/x");
        assert!(matches!(Files::from_options(None, None, None), Ok(None)));
        assert!(matches!(
            Files::from_options(Some(p), Some(p), Some(p)),
            Ok(Some(_))
        ));
        for (a, b, c) in [
            (Some(p), None, None),
            (None, Some(p), Some(p)),
            (Some(p), Some(p), None),
        ] {
            assert!(matches!(
                Files::from_options(a, b, c),
                Err(Error::Incomplete)
            ));
        }
    }

    #[test]
    fn missing_files_are_named() {
        let files = Files {
            cert: "/nonexistent/c.pem".into(),
            key: "/nonexistent/k.pem".into(),
            ca: "/nonexistent/ca.pem".into(),
        };
        let e = Server::new(&files).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/ca.pem"), "{e}");
    }
}
