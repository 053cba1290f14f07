//! The reader actor: the destination side of the stream.
//!
//! It binds the listen URI, takes one connection, parses the stream record by
//! record and writes the pages into the destination RAM files (mapped shared,
//! so what it writes is what a VMM or `cmp` sees). Compressed pages are
//! inflated by a rayon pool in batches; everything else is applied as it
//! arrives. Success is reported only once the stream reached its end (EOF
//! marker, optional vmdesc, then end of input) and checked out.
//!
//! Stream order is the only order: a later record for a page must win over an
//! earlier one, so the pending batch of compressed pages is applied before any
//! record that touches one of its pages, at every section footer and at EOF.
//!
//! ## The return path
//!
//! When the connection has a way back (tcp, unix), the reader writes on it
//! only once the peer has finished: [`ferry_proto::return_path::HELLO`] as soon as the stream
//! reached its end of input, then, after the RAM is synced and digested, one
//! JSON line, an [`Ack`] with the digests of the loaded blocks. A stream that
//! fails gets HELLO (if not said yet) and `Ack { ok: false, error }`. A ferry
//! sender therefore half-closes its end after the stream (`shutdown(SHUT_WR)`)
//! and reads: HELLO + Ack means a ferry receiver, end of input with nothing
//! before it means a silent peer such as QEMU.
//!
//! With `--tls-*` the connection must open with a TLS handshake in which the
//! sender shows a certificate signed by our CA; anything else is refused
//! before a byte of the stream is parsed, so no RAM is written for it. The
//! return path then runs inside the same TLS session.
//!
//! A stream whose first section is a `ferry-integrity` checkpoint (`ferry
//! send --integrity`) is verified checkpoint by checkpoint (see
//! [`crate::channel::integrity`]); a mismatch fails the load.
//!
//! Nothing is written earlier, on purpose: a QEMU 7.2 source never reads its
//! migration socket, and closing a tcp socket that holds unread bytes makes
//! Linux send a reset instead of a FIN *and drop whatever the source had not
//! yet transmitted*. Measured here with a HELLO written at accept: every
//! QEMU-to-receiver run ended in ECONNRESET instead of end of input, and with a
//! receiver slower than the source 3.3 MB of a 50 MB stream were lost.

mod multifd;

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{self, IoSlice};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::supervisor::messages::{ActorEvent, ActorKind, Event, PageCounts};
use ferry_guest::load::{self, RamImage};
use ferry_proto::compress;
use ferry_proto::qemu_file::{self, QemuFileReader};
use ferry_proto::return_path::{Ack, BlockDigest};
use ferry_proto::stream::command;
use ferry_proto::stream::device_state::DeviceState;
use ferry_proto::stream::integrity as checkpoint;
use ferry_proto::stream::parse::{self, BlockRecord, Item, Parser, RamRecord, SectionClass};
use ferry_proto::stream::{RamBlockInfo, SectionKind, PAGE_SIZE};
use ferry_proto::transport::Transport;
use ipc_channel::ipc::IpcSender;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::actors::blockio::{self, DiskInit, Sinks};
use crate::channel::integrity::{self, ReadTap, Verifier};
use crate::channel::tls;
use crate::channel::uri::{self, Uri};
use crate::options::{DiskSpec, RamSpec};
use crate::supervisor::error_chain;

/// How often the reader reports progress.
pub const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);

/// Most compressed pages inflated together (about 2 MiB of buffers).
pub const MAX_BATCH: usize = 256;

/// Configuration of the reader.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Init {
    /// Where the stream arrives, as a URI string (`tcp:`, `unix:`, `file:`).
    pub listen: String,
    /// RAM files by block name.
    pub ram: Vec<(String, PathBuf)>,
    /// Threads that inflate compressed pages.
    pub decompress_workers: usize,
    /// Fail a read that gets nothing for this long.
    pub stall_timeout: Option<std::time::Duration>,
    /// Require a TLS sender with a certificate signed by this CA.
    pub tls: Option<tls::Files>,
    /// Destination disks for the "block" section.
    #[serde(default)]
    pub disks: Vec<DiskInit>,
    /// Most RAM the stream may announce, in bytes.
    pub max_ram_size: u64,
    /// multifd data channels to accept beside the main stream (0: none).
    #[serde(default)]
    pub multifd_channels: u8,
    /// Where to write the configuration and device sections once the stream
    /// has loaded and verified (`ferry receive --device-state-out`).
    #[serde(default)]
    pub device_state_out: Option<PathBuf>,
}

impl Init {
    /// The reader's configuration for `ferry receive --listen URI --ram ...`.
    pub fn new(
        listen: &Uri,
        ram: &[RamSpec],
        decompress_workers: usize,
        stall_timeout: Option<std::time::Duration>,
        tls: Option<tls::Files>,
    ) -> Self {
        Self {
            stall_timeout,
            tls,
            listen: listen.to_string(),
            ram: ram
                .iter()
                .map(|s| (s.name.clone(), s.path.clone()))
                .collect(),
            decompress_workers,
            disks: Vec::new(),
            max_ram_size: u64::MAX,
            multifd_channels: 0,
            device_state_out: None,
        }
    }

    /// Refusing a stream whose RAM adds up to more than `bytes`.
    pub fn with_max_ram_size(mut self, bytes: u64) -> Self {
        self.max_ram_size = bytes;
        self
    }

    /// Writing the stream's device state to `path` once it has loaded.
    pub fn with_device_state_out(mut self, path: Option<PathBuf>) -> Self {
        self.device_state_out = path;
        self
    }

    /// Accepts `n` multifd data channels beside the main stream.
    pub fn with_multifd_channels(mut self, n: u8) -> Self {
        self.multifd_channels = n;
        self
    }

    /// With these destination disks.
    pub fn with_disks(mut self, disks: &[DiskSpec]) -> Self {
        self.disks = disks.iter().map(DiskInit::from_spec).collect();
        self
    }
}

/// Errors of the reader.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A --ram path names something other than a regular file.
    #[error("the RAM file {path} for block {block:?} is not a regular file")]
    NotAFile {
        /// The block.
        block: String,
        /// The path.
        path: PathBuf,
    },
    /// The listen URI does not parse.
    #[error("bad listen address")]
    Uri(#[source] uri::ParseError),
    /// Two --ram or --disk options name one file.
    #[error(
        "{first} and {second} are the same file: every --ram, --disk and --device-state-out \
         needs a file of its own"
    )]
    SameFile {
        /// The first option's path.
        first: PathBuf,
        /// The one naming the same file.
        second: PathBuf,
    },
    /// A path is a symlink whose target does not exist: creating the file
    /// would replace the link, and a VMM mapping the target would get nothing.
    #[error("{0} is a symlink to a file that does not exist: create the target or give its path")]
    DanglingSymlink(PathBuf),
    /// Two RAM files claim the same block.
    #[error("two --ram files are both named {0:?} (use PATH,name=BLOCK)")]
    DuplicateName(String),
    /// The decompression pool cannot be started.
    #[error("cannot start {workers} decompression threads")]
    Pool {
        /// Threads asked for.
        workers: usize,
        /// Why.
        #[source]
        source: rayon::ThreadPoolBuildError,
    },
    /// The URI cannot be bound or opened.
    #[error("cannot listen on {uri}")]
    Listen {
        /// The URI.
        uri: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The TLS files cannot be loaded.
    #[error("cannot set up TLS")]
    Tls(#[source] Box<tls::Error>),
    /// No connection could be taken (or its TLS handshake failed).
    #[error("cannot accept a connection on {uri}")]
    Accept {
        /// The URI.
        uri: String,
        /// Why.
        #[source]
        source: uri::OpenError,
    },
    /// The orchestrator cannot be told.
    #[error("cannot report to the orchestrator")]
    Report(#[source] ipc_channel::IpcError),
    /// The stream is malformed or ended early.
    #[error("cannot read the migration stream")]
    Stream(#[source] parse::Error),
    /// The stream announces more RAM than this destination takes.
    #[error("the stream's RAM does not fit this destination (ferry receive --max-ram-size)")]
    RamTooLarge(#[source] parse::Error),
    /// The stream is not what the sender wrote (`--integrity` checkpoints).
    #[error("the migration stream is corrupt")]
    Integrity(#[source] integrity::Error),
    /// A ferry sender, whose first pass sends every page, left pages of a
    /// block unsent: the destination would run on stale memory.
    #[error("RAM block {block:?}: {never_sent} of its {pages} pages were never sent, though a ferry sender sends every page")]
    NeverSent {
        /// The block.
        block: String,
        /// Pages that no record carried.
        never_sent: u64,
        /// The block's length in pages.
        pages: u64,
    },
    /// The stream announces a block that has no RAM file.
    #[error("the stream has RAM block {block:?} ({length} bytes) but no --ram file is named {block:?} (names given: {given})")]
    NoRamFile {
        /// The block.
        block: String,
        /// Its length.
        length: u64,
        /// The names of the RAM files, comma separated.
        given: String,
    },
    /// A RAM file exists with another size than its block.
    #[error("mismatched block sizes between the two ends: RAM block {block:?} is {expected} bytes in the stream but {path} is {actual} bytes")]
    SizeMismatch {
        /// The block.
        block: String,
        /// The file.
        path: PathBuf,
        /// The block's length.
        expected: u64,
        /// The file's length.
        actual: u64,
    },
    /// A RAM file cannot be created or mapped.
    #[error("cannot prepare the destination RAM")]
    Prepare(#[source] load::Error),
    /// A page cannot be applied (a corrupt compressed or XBZRLE page).
    #[error("cannot load a RAM page")]
    Load(#[source] load::Error),
    /// The multifd channels failed, or disagree with the main stream.
    #[error(transparent)]
    Multifd(#[from] multifd::Error),
    /// The peer closed without a byte: a QEMU source whose multifd channels
    /// were refused gives up like that.
    #[error(
        "the source closed the connection before sending anything (a QEMU source \
         with multifd on needs ferry receive --multifd-channels N)"
    )]
    NothingSent,
    /// A multifd sync point in a stream received without multifd channels.
    #[error(
        "at byte {0}: the source uses multifd (MULTIFD_FLUSH); \
         start ferry receive with --multifd-channels N"
    )]
    NoChannels(u64),
    /// A command the source sent that ferry receive cannot honour.
    #[error("at byte {offset}: command {cmd} ({name}) cannot be honoured: {why}")]
    Command {
        /// Offset of the command.
        offset: u64,
        /// Its number.
        cmd: u16,
        /// QEMU's name for it.
        name: &'static str,
        /// Why not.
        why: &'static str,
    },
    /// The stream ended cleanly but lacks something a migration needs.
    #[error("the stream is incomplete: {0}")]
    Incomplete(&'static str),
    /// The RAM cannot be written back to its files.
    #[error("cannot save the loaded RAM")]
    Save(#[source] load::Error),
    /// A destination disk failed, or the stream does not fit it.
    #[error(transparent)]
    Disk(blockio::Error),
    /// The digest of a loaded block cannot be completed: the pages an
    /// existing RAM file kept (the stream never sent them) cannot be read.
    #[error("cannot compute the digest of the loaded RAM")]
    Digest(#[source] load::Error),
    /// The device state cannot be written to its file.
    #[error("cannot write the device state to {path}")]
    DeviceStateOut {
        /// The file (`--device-state-out`).
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// A parse error as the reader reports it: a stream too large for this
/// destination says which limit it hit.
fn stream_error(e: parse::Error) -> Error {
    match e {
        parse::Error::RamTooLarge { .. } => Error::RamTooLarge(e),
        e => Error::Stream(e),
    }
}

/// A stream read to its end, its RAM written but not yet synced.
struct Parsed {
    bytes: u64,
    counts: PageCounts,
    image: RamImage,
    /// Integrity checkpoints verified, if the stream had them.
    checkpoints: Option<u64>,
    /// Digests of the disks, written and flushed.
    disks: Vec<BlockDigest>,
    /// The configuration and device sections, as the source sent them.
    device: DeviceState,
}

impl Parsed {
    /// Per block: its name, pages and pages received. From a sealed stream
    /// (`--integrity`: only ferry writes one, and a ferry sender's first
    /// pass covers every page), a block with pages never sent is an error.
    fn received(&mut self) -> Result<Vec<(String, u64, u64)>, Error> {
        let sealed = self.checkpoints.is_some();
        let mut out = Vec::new();
        for block in self.image.files().map_err(Error::Save)? {
            let (pages, received) = (block.pages(), block.received());
            if sealed && received < pages {
                return Err(Error::NeverSent {
                    block: block.info.idstr.clone(),
                    never_sent: pages - received,
                    pages,
                });
            }
            out.push((block.info.idstr.clone(), pages, received));
        }
        Ok(out)
    }

    /// Writes the RAM back to its files and computes the digests.
    fn finish(mut self) -> Result<Loaded, Error> {
        let received = self.received()?;
        self.image.sync().map_err(Error::Save)?;
        let digests = self
            .image
            .files()
            .map_err(Error::Save)?
            .map(|block| {
                let xxh3 = block.digest().map_err(Error::Digest)?;
                Ok(BlockDigest {
                    name: block.info.idstr.clone(),
                    length: block.info.length,
                    xxh3,
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        // Verified: the RAM files this load created take their names.
        self.image.commit().map_err(Error::Save)?;
        Ok(Loaded {
            bytes: self.bytes,
            counts: self.counts,
            digests,
            disks: self.disks,
            received,
        })
    }
}

/// What a completely loaded stream amounted to.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Loaded {
    /// Stream bytes.
    bytes: u64,
    /// Pages by kind.
    counts: PageCounts,
    /// Digests of the loaded blocks.
    digests: Vec<BlockDigest>,
    /// Digests of the disks.
    disks: Vec<BlockDigest>,
    /// Per block: name, pages, pages received.
    received: Vec<(String, u64, u64)>,
}

/// Runs the reader.
///
/// Events, in order: `Listening` (the bound address, e.g.
/// `tcp:127.0.0.1:40123`), `Progress` with 0 bytes as soon as the peer is
/// connected, `Progress` every [`PROGRESS_INTERVAL`], and `Loaded` after the
/// stream ended, checked out and was acknowledged on the return path.
pub fn run(init: Init, events: &IpcSender<ActorEvent>) -> Result<(), Error> {
    let report = |event| {
        events
            .send(ActorEvent {
                actor: ActorKind::Reader,
                event,
            })
            .map_err(Error::Report)
    };
    let uri: Uri = init.listen.parse().map_err(Error::Uri)?;
    let server = init
        .tls
        .as_ref()
        .map(tls::Server::new)
        .transpose()
        .map_err(|e| Error::Tls(Box::new(e)))?;
    let paths: Vec<&std::path::Path> = (init.ram.iter().map(|(_, p)| p.as_path()))
        .chain(init.disks.iter().map(|d| d.path.as_path()))
        .chain(init.device_state_out.as_deref())
        .collect();
    refuse_same_file(&paths)?;
    let mut loader = Loader::new(&init.ram, init.decompress_workers)?;
    loader.disks = Sinks::open(&init.disks).map_err(Error::Disk)?;
    loader.limits.max_ram_size = init.max_ram_size;
    let listener = uri.listen().map_err(|source| Error::Listen {
        uri: uri.to_string(),
        source,
    })?;
    let addr = listener
        .local_addr()
        .map_or_else(|| uri.to_string(), |a| format!("tcp:{a}"));
    report(Event::Listening { addr })?;
    let conn = if init.multifd_channels > 0 {
        let (main, data) = multifd::accept(&listener, init.multifd_channels, init.stall_timeout)?;
        loader.multifd = Some(multifd::Channels::start(data));
        main
    } else {
        listener
            .accept(init.stall_timeout, server.as_ref())
            .map_err(|source| Error::Accept {
                uri: uri.to_string(),
                source,
            })?
    };
    // One peer only; for unix sockets this also removes the socket file.
    drop(listener);
    let mut answer = Answer {
        return_path: conn.return_path,
        said_hello: false,
    };
    report(Event::Progress {
        bytes: 0,
        counts: PageCounts::default(),
    })?;
    let result = loader
        .load(conn.transport, &mut |bytes, counts| {
            report(Event::Progress { bytes, counts })
        })
        .and_then(|mut parsed| {
            // The peer has sent everything and half-closed: say hello now, so
            // a ferry sender waits for the Ack while the RAM is synced.
            answer.hello();
            if let Some(n) = parsed.checkpoints {
                eprintln!(
                    "ferry: integrity verified: {n} checkpoints cover the {} stream bytes before EOF",
                    parsed.bytes.saturating_sub(1)
                );
            }
            let device = std::mem::take(&mut parsed.device);
            let loaded = parsed.finish()?;
            if let Some(path) = &init.device_state_out {
                write_device_state(path, &device)?;
            }
            Ok(loaded)
        });
    let loaded = answer.finish(result)?;
    report(Event::Loaded {
        bytes: loaded.bytes,
        counts: loaded.counts,
        digests: loaded.digests,
        received: loaded.received,
    })
}

/// What a path names: the device and inode of an existing file (through
/// any symlink), else the real directory it would be created in and its name.
fn file_identity(path: &std::path::Path) -> io::Result<(u64, u64, PathBuf)> {
    use std::os::unix::fs::MetadataExt;
    match fs::metadata(path) {
        Ok(m) => Ok((m.dev(), m.ino(), PathBuf::new())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            let dir = match path.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => std::path::Path::new("."),
            };
            let name = path.file_name().unwrap_or_default();
            Ok((0, 0, fs::canonicalize(dir)?.join(name)))
        }
        Err(e) => Err(e),
    }
}

/// Refuses two --ram, --disk or --device-state-out paths that name the same
/// file (one would overwrite the other) and dangling symlinks, before
/// anything is created or written.
fn refuse_same_file(paths: &[&std::path::Path]) -> Result<(), Error> {
    let mut seen: Vec<((u64, u64, PathBuf), &std::path::Path)> = Vec::new();
    for &path in paths {
        if path.is_symlink() && !path.exists() {
            return Err(Error::DanglingSymlink(path.to_path_buf()));
        }
        // A path that cannot be examined fails later, where it is opened.
        let Ok(id) = file_identity(path) else {
            continue;
        };
        if let Some((_, first)) = seen.iter().find(|(other, _)| *other == id) {
            return Err(Error::SameFile {
                first: first.to_path_buf(),
                second: path.to_path_buf(),
            });
        }
        seen.push((id, path));
    }
    Ok(())
}

/// Writes the device state under a temporary name beside `path` and renames
/// it into place, so `path` exists only with a whole, verified state. The
/// integrity checkpoints of a sealed stream are left out: they belong to
/// this stream, not to the device state (the writer drops them likewise).
fn write_device_state(path: &std::path::Path, device: &DeviceState) -> Result<(), Error> {
    let err = |source| Error::DeviceStateOut {
        path: path.to_owned(),
        source,
    };
    let mut device = device.clone();
    device
        .sections
        .retain(|s| s.header.idstr != checkpoint::IDSTR);
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".ferry-device-state")
        .tempfile_in(dir)
        .map_err(err)?;
    io::Write::write_all(&mut tmp, &device.to_bytes()).map_err(err)?;
    tmp.as_file().sync_all().map_err(err)?;
    tmp.persist(path).map_err(|e| err(e.error))?;
    Ok(())
}

/// The return path, if the connection has one. Writes are best effort: a
/// QEMU source has closed its socket by the time the stream ended, and a
/// failed answer changes nothing about what was loaded.
struct Answer {
    return_path: Option<Box<dyn Transport>>,
    said_hello: bool,
}

impl Answer {
    fn write(&mut self, bytes: &[u8]) {
        let Some(rp) = self.return_path.as_mut() else {
            return;
        };
        if let Err(e) = rp.writev(&[IoSlice::new(bytes)]) {
            tracing::debug!("the peer did not take our answer: {e}");
            self.return_path = None;
        }
    }

    fn hello(&mut self) {
        if !self.said_hello {
            self.said_hello = true;
            self.write(ferry_proto::return_path::HELLO);
        }
    }

    /// Ends our direction once everything is said (over TLS, the
    /// close_notify that tells the sender the answer is complete).
    fn close(&mut self) {
        if let Some(rp) = self.return_path.as_mut() {
            let _ = rp.shutdown_write();
        }
    }

    /// Tells the peer how the load ended, and ends our direction.
    fn finish(&mut self, result: Result<Loaded, Error>) -> Result<Loaded, Error> {
        let ack = match &result {
            Ok(loaded) => Ack {
                ok: true,
                error: None,
                digests: loaded.digests.clone(),
                disks: loaded.disks.clone(),
            },
            Err(e) => Ack {
                ok: false,
                error: Some(error_chain(e)),
                digests: Vec::new(),
                disks: Vec::new(),
            },
        };
        self.ack(&ack);
        self.close();
        result
    }

    /// HELLO (unless said already) and the Ack line.
    fn ack(&mut self, ack: &Ack) {
        let mut bytes = if self.said_hello {
            Vec::new()
        } else {
            ferry_proto::return_path::HELLO.to_vec()
        };
        self.said_hello = true;
        match serde_json::to_writer(&mut bytes, ack) {
            Ok(()) => {
                bytes.push(b'\n');
                self.write(&bytes);
            }
            Err(e) => tracing::warn!("cannot encode the Ack: {e}"),
        }
    }
}

/// One compressed page waiting in the batch.
struct Slot {
    block: usize,
    page_offset: u64,
    /// Offset of the record in the stream, for errors.
    record: u64,
    data: Vec<u8>,
    page: Box<[u8; PAGE_SIZE]>,
    result: Result<(), compress::Error>,
}

impl Slot {
    fn new() -> Self {
        Self {
            block: 0,
            page_offset: 0,
            record: 0,
            data: Vec::with_capacity(compress::MAX_COMPRESSED_PAGE),
            page: Box::new([0; PAGE_SIZE]),
            result: Ok(()),
        }
    }
}

/// Parses a stream and loads it into RAM files.
struct Loader {
    files: Vec<(String, PathBuf)>,
    pool: rayon::ThreadPool,
    image: Option<RamImage>,
    slots: Vec<Slot>,
    /// Slots in use, in stream order.
    pending: usize,
    /// (block, page offset) of the pending slots.
    pending_pages: HashSet<(usize, u64)>,
    counts: PageCounts,
    /// Destination disks.
    disks: Sinks,
    /// What the stream may make this destination hold.
    limits: parse::Limits,
    /// The multifd data channels, if the source uses them.
    multifd: Option<multifd::Channels>,
    /// The kind of the RAM section being read, if one is.
    ram_section: Option<SectionKind>,
    /// A source in QEMU's legacy multifd mode syncs at every RAM EOS; a
    /// current one sends MULTIFD_FLUSH, always once in the setup section.
    flush_in_setup: bool,
    /// The configuration and device sections seen so far.
    device: DeviceState,
}

/// Where a load is in the stream, beyond what the parser tracks.
#[derive(Debug, Default)]
struct Position {
    ram_started: bool,
    ram_ended: bool,
    /// Inside an integrity checkpoint section.
    in_checkpoint: bool,
}

impl std::fmt::Debug for Loader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loader")
            .field("files", &self.files)
            .field("pending", &self.pending)
            .field("counts", &self.counts)
            .finish_non_exhaustive()
    }
}

impl Loader {
    fn new(files: &[(String, PathBuf)], workers: usize) -> Result<Self, Error> {
        for (i, (name, _)) in files.iter().enumerate() {
            if files[..i].iter().any(|(n, _)| n == name) {
                return Err(Error::DuplicateName(name.clone()));
            }
        }
        let workers = workers.max(1);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(workers)
            .thread_name(|i| format!("ferry-inflate-{i}"))
            .build()
            .map_err(|source| Error::Pool { workers, source })?;
        Ok(Self {
            files: files.to_vec(),
            pool,
            image: None,
            slots: Vec::new(),
            pending: 0,
            pending_pages: HashSet::new(),
            counts: PageCounts::default(),
            disks: Sinks::default(),
            limits: parse::Limits::default(),
            multifd: None,
            ram_section: None,
            flush_in_setup: false,
            device: DeviceState::default(),
        })
    }

    /// Reads the whole stream from `transport` into RAM; `progress(bytes,
    /// counts)` is called every [`PROGRESS_INTERVAL`].
    fn load<T: Transport>(
        &mut self,
        transport: T,
        progress: &mut dyn FnMut(u64, PageCounts) -> Result<(), Error>,
    ) -> Result<Parsed, Error> {
        let (tap, mut verifier) = ReadTap::new(transport);
        // A checkpoint's body has a known length: never search for its footer.
        let sizes = HashMap::from([(
            (checkpoint::IDSTR.to_owned(), 0),
            checkpoint::BODY_LEN as u64,
        )]);
        let mut parser = Parser::new(QemuFileReader::new(tap))
            .with_device_sizes(sizes)
            .with_limits(self.limits);
        let mut last_report = Instant::now();
        let mut pos = Position::default();
        loop {
            let at = parser.offset();
            verifier.before_item(at).map_err(Error::Integrity)?;
            let next = parser.next().map_err(|e| match self.multifd_failure() {
                // A channel's fault makes the source give up, and its main
                // stream end: the fault is the news.
                Some(fault) => Error::Multifd(fault),
                None if at == 0
                    && matches!(e, parse::Error::File(qemu_file::Error::Eof { .. })) =>
                {
                    Error::NothingSent
                }
                None => stream_error(e),
            });
            match next? {
                Item::End => break,
                item => self.item(item, at, &mut verifier, &mut pos)?,
            }
            if last_report.elapsed() >= PROGRESS_INTERVAL {
                last_report = Instant::now();
                progress(parser.offset(), self.counts)?;
            }
        }
        self.flush()?;
        let mut channel_bytes = 0;
        if let Some(channels) = self.multifd.take() {
            let carried = channels.finish()?;
            carried.add_to(&mut self.counts);
            channel_bytes = carried.bytes;
        }
        let bytes = parser.offset() + channel_bytes;
        drop(parser);
        // Every disk written and flushed before anything is acknowledged.
        let disks = self.disks.finish().map_err(Error::Disk)?;
        let image = self.image.take().ok_or(Error::Incomplete(
            "it carries no RAM block list (no MEM_SIZE record)",
        ))?;
        if pos.ram_started && !pos.ram_ended {
            return Err(Error::Incomplete(
                "the RAM section was never closed by an END part",
            ));
        }
        Ok(Parsed {
            bytes,
            counts: self.counts,
            image,
            checkpoints: verifier.verified(),
            disks,
            device: std::mem::take(&mut self.device),
        })
    }

    /// Applies one item of the stream (anything but its end).
    fn item(
        &mut self,
        item: Item<'_>,
        at: u64,
        verifier: &mut Verifier,
        pos: &mut Position,
    ) -> Result<(), Error> {
        self.device.observe(&item);
        match item {
            Item::Ram(rec) => self.ram_record(rec, at)?,
            Item::Section(h) => {
                pos.in_checkpoint = verifier.on_section(&h, at).map_err(Error::Integrity)?;
                self.ram_section = (h.class == SectionClass::Ram).then_some(h.kind);
                match (h.class, h.kind) {
                    (SectionClass::Ram, SectionKind::Start) => pos.ram_started = true,
                    (SectionClass::Ram, SectionKind::End) => pos.ram_ended = true,
                    _ => {}
                }
            }
            Item::DeviceState(body) if pos.in_checkpoint => {
                verifier.on_body(body).map_err(Error::Integrity)?
            }
            Item::Block(BlockRecord::Chunk {
                device,
                sector,
                data,
            }) => self
                .disks
                .chunk(&device, sector, data)
                .map_err(Error::Disk)?,
            Item::Command { cmd, data } => {
                if let Some(why) = command::refusal(cmd, data.len()) {
                    return Err(Error::Command {
                        offset: at,
                        cmd,
                        name: command::name(cmd),
                        why,
                    });
                }
            }
            Item::Footer { end, .. } => {
                verifier.on_footer(pos.in_checkpoint, end);
                pos.in_checkpoint = false;
                self.flush()?
            }
            Item::Eof => {
                verifier.on_eof(at).map_err(Error::Integrity)?;
                self.flush()?
            }
            Item::Block(_)
            | Item::End
            | Item::FileHeader
            | Item::Configuration { .. }
            | Item::DeviceState(_)
            | Item::OpaqueDeviceState(_)
            | Item::Vmdesc(_) => {}
        }
        Ok(())
    }

    fn ram_record(&mut self, rec: RamRecord<'_>, at: u64) -> Result<(), Error> {
        let (block, page_offset) = match rec {
            RamRecord::MemSize(blocks) => {
                // A repeated block list is identical (the parser checks that).
                if self.image.is_none() {
                    let mut image = self.open_ram(&blocks)?;
                    if let Some(channels) = &self.multifd {
                        channels.set_pages(image.shared_pages().map_err(Error::Load)?);
                    }
                    self.image = Some(image);
                }
                return Ok(());
            }
            RamRecord::MultifdFlush => {
                if self.multifd.is_none() {
                    return Err(Error::NoChannels(at));
                }
                self.flush_in_setup |= self.ram_section == Some(SectionKind::Start);
                return self.multifd_sync();
            }
            RamRecord::Eos => {
                let legacy = !self.flush_in_setup;
                if self.multifd.is_some() && legacy {
                    return self.multifd_sync();
                }
                return Ok(());
            }
            RamRecord::Zero { block, offset, .. } => {
                self.counts.zero += 1;
                (block, offset)
            }
            RamRecord::Page { block, offset, .. } => {
                self.counts.raw += 1;
                (block, offset)
            }
            RamRecord::Xbzrle { block, offset, .. } => {
                self.counts.xbzrle += 1;
                (block, offset)
            }
            RamRecord::Compressed {
                block,
                offset,
                data,
            } => {
                self.counts.compressed += 1;
                self.counts.compressed_bytes += data.len() as u64;
                if self.pending_pages.contains(&(block, offset)) {
                    self.flush()?;
                }
                self.queue(block, offset, at, data);
                if self.pending == MAX_BATCH {
                    self.flush()?;
                }
                return Ok(());
            }
        };
        if self.pending_pages.contains(&(block, page_offset)) {
            self.flush()?;
        }
        let image = self
            .image
            .as_mut()
            .ok_or(Error::Load(load::Error::NoBlocks))?;
        image.apply(&rec, at).map_err(Error::Load)
    }

    /// The first fault of a multifd channel, if one failed.
    fn multifd_failure(&self) -> Option<multifd::Error> {
        self.multifd.as_ref().and_then(multifd::Channels::failure)
    }

    /// A multifd sync point: every page before it, on the main stream and
    /// on every channel, is written before anything after it.
    fn multifd_sync(&mut self) -> Result<(), Error> {
        self.flush()?;
        if let Some(image) = &mut self.image {
            image.write_pending().map_err(Error::Load)?;
        }
        match &self.multifd {
            Some(channels) => Ok(channels.sync()?),
            None => Ok(()),
        }
    }

    /// Maps the destination RAM files for the announced blocks: every block
    /// needs a file of its name; a missing file is created at the block's
    /// size, an existing one must have exactly that size.
    fn open_ram(&self, blocks: &[RamBlockInfo]) -> Result<RamImage, Error> {
        for b in blocks {
            let Some((_, path)) = self.files.iter().find(|(n, _)| *n == b.idstr) else {
                let names: Vec<_> = self.files.iter().map(|(n, _)| format!("{n:?}")).collect();
                return Err(Error::NoRamFile {
                    block: b.idstr.clone(),
                    length: b.length,
                    given: names.join(", "),
                });
            };
            // Other errors (permissions, a missing directory) surface in open.
            if let Ok(meta) = fs::metadata(path) {
                if !meta.is_file() {
                    return Err(Error::NotAFile {
                        block: b.idstr.clone(),
                        path: path.clone(),
                    });
                }
                if meta.len() != b.length {
                    return Err(Error::SizeMismatch {
                        block: b.idstr.clone(),
                        path: path.clone(),
                        expected: b.length,
                        actual: meta.len(),
                    });
                }
            }
        }
        RamImage::open(&self.files, blocks, true).map_err(Error::Prepare)
    }

    fn queue(&mut self, block: usize, page_offset: u64, record: u64, data: &[u8]) {
        if self.slots.len() == self.pending {
            self.slots.push(Slot::new());
        }
        let slot = &mut self.slots[self.pending];
        slot.block = block;
        slot.page_offset = page_offset;
        slot.record = record;
        slot.data.clear();
        slot.data.extend_from_slice(data);
        self.pending += 1;
        self.pending_pages.insert((block, page_offset));
    }

    /// Inflates the pending compressed pages in parallel and copies them into
    /// RAM in stream order. The first bad page (in stream order) is the error.
    fn flush(&mut self) -> Result<(), Error> {
        if self.pending == 0 {
            return Ok(());
        }
        let slots = &mut self.slots[..self.pending];
        self.pending = 0;
        self.pending_pages.clear();
        self.pool.install(|| {
            slots
                .par_iter_mut()
                .with_min_len(16)
                .for_each_init(compress::decompressor, |d, s| {
                    s.result = compress::inflate_page(d, &s.data, &mut s.page);
                });
        });
        let image = self
            .image
            .as_mut()
            .ok_or(Error::Load(load::Error::NoBlocks))?;
        for s in slots.iter() {
            if let Err(e) = &s.result {
                return Err(Error::Load(load::Error::Inflate {
                    offset: s.record,
                    source: e.clone(),
                }));
            }
            let page = RamRecord::Page {
                block: s.block,
                offset: s.page_offset,
                data: &s.page[..],
            };
            image.apply(&page, s.record).map_err(Error::Load)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_guest::ram;
    use ferry_proto::qemu_file::QemuFileWriter;
    use ferry_proto::stream::encode::{self, RamWriter};
    use ferry_proto::stream::{image, ram_flag, xbzrle};
    use ferry_proto::transport::MemTransport;
    use xxhash_rust::xxh3::xxh3_64_with_seed;

    fn text_page(seed: u8) -> [u8; PAGE_SIZE] {
        let mut p = [0u8; PAGE_SIZE];
        for (i, b) in p.iter_mut().enumerate() {
            *b = b"abcdefgh"[(i / 7 + seed as usize) % 8];
        }
        p[0] = seed;
        p
    }

    fn load_bytes(
        stream: Vec<u8>,
        files: &[(String, PathBuf)],
        workers: usize,
    ) -> Result<Loaded, Error> {
        let mut loader = Loader::new(files, workers)?;
        loader
            .load(MemTransport::from_bytes(stream), &mut |_, _| Ok(()))?
            .finish()
    }

    /// Header, configuration and the START section with the block list.
    fn preamble(
        f: &mut QemuFileWriter<'_, MemTransport>,
        ram: &mut RamWriter,
        blocks: &[RamBlockInfo],
    ) {
        encode::put_file_header(f);
        encode::put_configuration(f, "none");
        ram.put_setup_section(f, 2, blocks).unwrap();
    }

    fn finish(f: QemuFileWriter<'_, MemTransport>) -> Vec<u8> {
        f.into_transport().unwrap().take()
    }

    #[test]
    fn later_records_for_a_page_win_over_pending_compressed_ones() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.ram");
        let blocks = [RamBlockInfo {
            idstr: "b".into(),
            length: 4 * PAGE_SIZE as u64,
        }];
        let mut f = QemuFileWriter::new(MemTransport::new());
        let mut ram = RamWriter::new();
        let mut c = compress::compressor(1);
        preamble(&mut f, &mut ram, &blocks);
        encode::put_section_part(&mut f, SectionKind::Part, 2);
        let (a, b, x, d) = (text_page(1), text_page(2), text_page(3), text_page(4));
        // Page 0: compressed twice in one batch, the second wins.
        ram.put_compressed_page(&mut f, &mut c, "b", 0, &a).unwrap();
        ram.put_compressed_page(&mut f, &mut c, "b", 0, &b).unwrap();
        // Page 1: compressed, then raw.
        ram.put_compressed_page(&mut f, &mut c, "b", 4096, &a)
            .unwrap();
        ram.put_page(&mut f, "b", 4096, &x).unwrap();
        // Page 2: compressed, then a fill page.
        ram.put_compressed_page(&mut f, &mut c, "b", 8192, &d)
            .unwrap();
        ram.put_zero_page(&mut f, "b", 8192, 0x11).unwrap();
        // Page 3: compressed, then an XBZRLE delta on top of it.
        ram.put_compressed_page(&mut f, &mut c, "b", 12288, &a)
            .unwrap();
        let mut e = a;
        e[100..140].fill(0x42);
        e[4000] = 0x43;
        let delta = xbzrle::encode(&a, &e);
        f.put_be64(12288 | ram_flag::XBZRLE | ram_flag::CONTINUE);
        f.put_byte(xbzrle::ENCODING_FLAG);
        f.put_be16(delta.len() as u16);
        f.put_buffer(&delta);
        ram.put_eos(&mut f);
        encode::put_footer(&mut f, 2);
        ram.put_end_section(&mut f, 2);
        encode::put_eof(&mut f);
        let loaded = load_bytes(finish(f), &[("b".into(), path.clone())], 2).unwrap();

        let got = fs::read(&path).unwrap();
        let want = [&b[..], &x[..], &[0x11; PAGE_SIZE][..], &e[..]].concat();
        assert!(got == want, "stream order was not kept");
        assert_eq!(loaded.counts.compressed, 5);
        assert_eq!(loaded.counts.raw, 1);
        assert_eq!(loaded.counts.xbzrle, 1, "XBZRLE pages are counted apart");
        assert_eq!(loaded.counts.zero, 1);
        assert_eq!(loaded.received, [("b".to_owned(), 4, 4)]);
        assert_eq!(loaded.digests.len(), 1);
        assert_eq!(loaded.digests[0].xxh3, ram::digest(&want));
    }

    fn image_stream(blocks: &[(&str, &[u8])], level: Option<u32>) -> Vec<u8> {
        let mut f = QemuFileWriter::new(MemTransport::new());
        image::write_stream(&mut f, blocks, &DeviceState::default(), "none", level).unwrap();
        finish(f)
    }

    fn mixed(pages: usize, seed: u8) -> Vec<u8> {
        (0..pages)
            .flat_map(|i| match i % 4 {
                0 => vec![0; PAGE_SIZE],
                1 => vec![seed; PAGE_SIZE],
                2 => text_page(seed.wrapping_add(i as u8)).to_vec(),
                // Noise that does not compress.
                _ => (0..PAGE_SIZE as u64)
                    .map(|j| xxh3_64_with_seed(&j.to_le_bytes(), i as u64 ^ u64::from(seed)) as u8)
                    .collect(),
            })
            .collect()
    }

    #[test]
    fn whole_streams_load_with_any_worker_count() {
        let one = mixed(700, 5);
        let two = mixed(33, 9);
        for (level, workers) in [(None, 1), (Some(1), 1), (Some(6), 3)] {
            let dir = tempfile::tempdir().unwrap();
            let files = [
                ("one".to_owned(), dir.path().join("one.ram")),
                ("two".to_owned(), dir.path().join("two.ram")),
            ];
            // An existing file of the right size is overwritten in place.
            fs::write(&files[1].1, vec![0xee; two.len()]).unwrap();
            let stream = image_stream(&[("one", &one), ("two", &two)], level);
            let len = stream.len() as u64;
            let loaded = load_bytes(stream, &files, workers).unwrap();
            assert!(fs::read(&files[0].1).unwrap() == one);
            assert!(fs::read(&files[1].1).unwrap() == two);
            assert_eq!(loaded.bytes, len);
            assert_eq!(loaded.counts.pages(), 733);
            assert_eq!(loaded.counts.compressed > 0, level.is_some());
            let names: Vec<_> = loaded.digests.iter().map(|d| d.name.as_str()).collect();
            assert_eq!(names, ["one", "two"]);
            assert_eq!(loaded.digests[0].xxh3, ram::digest(&one));
            assert_eq!(loaded.digests[1].xxh3, ram::digest(&two));
            assert_eq!(loaded.digests[1].length, two.len() as u64);
        }
    }

    #[test]
    fn every_truncation_fails() {
        let data = mixed(12, 3);
        let stream = image_stream(&[("m", &data)], Some(1));
        let dir = tempfile::tempdir().unwrap();
        let files = [("m".to_owned(), dir.path().join("m.ram"))];
        for cut in (0..stream.len()).step_by(97).chain([stream.len() - 1]) {
            let r = load_bytes(stream[..cut].to_vec(), &files, 2);
            assert!(
                r.is_err(),
                "a stream cut at {cut} of {} loaded",
                stream.len()
            );
        }
        assert!(load_bytes(stream, &files, 2).is_ok());
    }

    #[test]
    fn block_files_are_checked_against_the_block_list() {
        let data = mixed(8, 1);
        let stream = image_stream(&[("m", &data)], None);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.ram");

        let e = load_bytes(stream.clone(), &[("other".into(), path.clone())], 1).unwrap_err();
        let msg = error_chain(&e);
        assert!(msg.contains("\"m\"") && msg.contains("\"other\""), "{msg}");

        fs::write(&path, [0u8; 4096]).unwrap();
        let e = load_bytes(stream.clone(), &[("m".into(), path.clone())], 1).unwrap_err();
        let msg = error_chain(&e);
        assert!(msg.contains("mismatched block sizes"), "{msg}");
        assert!(msg.contains("32768") && msg.contains("4096"), "{msg}");
        assert_eq!(fs::metadata(&path).unwrap().len(), 4096, "file was resized");

        let files = [("m".into(), path.clone()), ("m".into(), path)];
        assert!(matches!(
            load_bytes(stream, &files, 1),
            Err(Error::DuplicateName(n)) if n == "m"
        ));
    }

    #[test]
    fn a_corrupt_compressed_page_names_its_record() {
        let data = mixed(64, 2);
        let mut stream = image_stream(&[("m", &data)], Some(1));
        // Find the 10th compressed record and break its zlib header.
        let mut parser = Parser::new(QemuFileReader::new(MemTransport::from_bytes(
            stream.clone(),
        )));
        let mut seen = 0;
        let (record, data_at) = loop {
            let at = parser.offset();
            let len = match parser.next().unwrap() {
                Item::Ram(RamRecord::Compressed { data, .. }) => data.len() as u64,
                Item::End => panic!("fewer than 10 compressed pages"),
                _ => continue,
            };
            seen += 1;
            if seen == 10 {
                break (at, parser.offset() - len);
            }
        };
        stream[data_at as usize] ^= 0xff;
        let dir = tempfile::tempdir().unwrap();
        let e = load_bytes(stream, &[("m".into(), dir.path().join("m.ram"))], 2).unwrap_err();
        let msg = error_chain(&e);
        assert!(msg.contains(&format!("at byte {record}:")), "{msg}");
    }

    #[test]
    fn a_stream_without_ram_is_incomplete() {
        let mut f = QemuFileWriter::new(MemTransport::new());
        encode::put_file_header(&mut f);
        encode::put_configuration(&mut f, "none");
        encode::put_eof(&mut f);
        let r = load_bytes(finish(f), &[("m".into(), "/nonexistent/m".into())], 1);
        assert!(matches!(r, Err(Error::Incomplete(_))), "{r:?}");
    }

    /// QEMU 10 sends SWITCHOVER_START before the last RAM section; a source
    /// with its return-path capability opens it first. Neither carries state.
    #[test]
    fn current_qemus_stateless_commands_load() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.ram");
        let blocks = [RamBlockInfo {
            idstr: "b".into(),
            length: 2 * PAGE_SIZE as u64,
        }];
        let mut f = QemuFileWriter::new(MemTransport::new());
        let mut ram = RamWriter::new();
        preamble(&mut f, &mut ram, &blocks);
        encode::put_command(&mut f, command::OPEN_RETURN_PATH, &[]);
        encode::put_command(&mut f, command::SWITCHOVER_START, &[]);
        encode::put_section_part(&mut f, SectionKind::End, 2);
        ram.put_page(&mut f, "b", PAGE_SIZE as u64, &text_page(7))
            .unwrap();
        ram.put_eos(&mut f);
        encode::put_footer(&mut f, 2);
        encode::put_eof(&mut f);
        load_bytes(finish(f), &[("b".into(), path.clone())], 1).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[PAGE_SIZE..], &text_page(7)[..]);
    }

    /// Commands that need an answer or postcopy are refused by name.
    #[test]
    fn commands_that_need_an_answer_are_refused_by_name() {
        for (cmd, payload, name) in [
            (command::PING, &[0u8, 0, 0, 1][..], "PING"),
            (command::POSTCOPY_LISTEN, &[][..], "POSTCOPY_LISTEN"),
            (command::POSTCOPY_ADVISE, &[0u8; 16][..], "POSTCOPY_ADVISE"),
        ] {
            let blocks = [RamBlockInfo {
                idstr: "b".into(),
                length: PAGE_SIZE as u64,
            }];
            let dir = tempfile::tempdir().unwrap();
            let mut f = QemuFileWriter::new(MemTransport::new());
            let mut ram = RamWriter::new();
            preamble(&mut f, &mut ram, &blocks);
            encode::put_command(&mut f, cmd, payload);
            let r = load_bytes(finish(f), &[("b".into(), dir.path().join("b.ram"))], 1);
            let msg = r.err().map(|e| e.to_string()).unwrap_or_default();
            assert!(msg.contains(name), "{name}: {msg}");
        }
    }

    /// A multifd sync point without channels to sync says what to do.
    #[test]
    fn a_multifd_flush_without_channels_asks_for_them() {
        let dir = tempfile::tempdir().unwrap();
        let blocks = [RamBlockInfo {
            idstr: "b".into(),
            length: PAGE_SIZE as u64,
        }];
        let mut f = QemuFileWriter::new(MemTransport::new());
        let mut ram = RamWriter::new();
        preamble(&mut f, &mut ram, &blocks);
        encode::put_section_part(&mut f, SectionKind::End, 2);
        ram.put_multifd_flush(&mut f);
        let r = load_bytes(finish(f), &[("b".into(), dir.path().join("b.ram"))], 1);
        let msg = r.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(msg.contains("--multifd-channels"), "{msg}");
    }

    #[test]
    fn init_survives_serde() {
        let init = Init::new(
            &"tcp:127.0.0.1:0".parse().unwrap(),
            &["/tmp/a.ram,name=pc.ram".parse().unwrap()],
            3,
            None,
            None,
        );
        let back: Init = serde_json::from_str(&serde_json::to_string(&init).unwrap()).unwrap();
        assert_eq!(back, init);
        assert_eq!(
            back.listen.parse::<Uri>().unwrap(),
            Uri::Tcp("127.0.0.1:0".into())
        );
    }
}
