//! The writer actor: the only owner of the connection and of the bandwidth
//! budget.
//!
//! It frames the stream (header, configuration, RAM sections, device state,
//! EOF), writes chunks strictly in sequence order so that an older copy of a
//! page can never overtake a newer one, enforces the rate limit in QEMU's
//! 100 ms windows, and listens on the return path for a ferry receiver's
//! acknowledgement, or with `--return-path` for a QEMU destination's SHUT.
//!
//! With TLS the connection is a TLS session in both directions (see
//! [`crate::channel::tls`]); with `--integrity` the writer seals the stream with
//! checkpoints (see [`crate::channel::integrity`]) after the configuration, after
//! every chunk (closing the RAM section part around it) and before EOF.
//!
//! With multifd it also owns the N data channels: it opens them right after
//! the main stream's header, writes each chunk's packets on their channels,
//! and at every sync point (the RAM setup section, each round's end, the END
//! section; in QEMU's legacy mode every RAM EOS) writes a SYNC packet on
//! every channel before the main channel's MULTIFD_FLUSH or EOS, so the
//! destination never lets a page of one round land after one of the next.
//! The bandwidth budget counts every channel's bytes.

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::supervisor::messages::{
    ActorEvent, ActorKind, Chunk, DiskChunk, Event, MultifdSend, Packet, PageCounts,
};
use crossbeam_channel::{select, Receiver};
use ferry_proto::multifd::{self, ChannelInit, PacketHeader, HEADER_LEN};
use ferry_proto::qemu_file::{self, QemuFileWriter};
use ferry_proto::return_path::{self, Ack, QemuMessage, ReturnPath};
use ferry_proto::stream::device_state::DeviceState;
use ferry_proto::stream::encode::{self, RamWriter};
use ferry_proto::stream::{
    block_flag, command, parse, RamBlockInfo, SectionKind, BLOCK_CHUNK_SIZE, BLOCK_IDSTR,
    BLOCK_VERSION, PAGE_SIZE, RAM_IDSTR, RAM_VERSION, SECTOR_SIZE,
};
use ferry_proto::transport::Transport;
use ipc_channel::ipc::{IpcReceiver, IpcSender};
use serde::{Deserialize, Serialize};

use crate::channel::integrity::{Sealer, WriteTap};
use crate::channel::tls;
use crate::channel::uri::{self, Uri};
use ferry_guest::ram::{self, BlockFile, GuestRam};

/// QEMU's rate-limit window.
const WINDOW: Duration = Duration::from_millis(100);
/// How long a ferry receiver may take to acknowledge after EOF, or a QEMU
/// destination to send its SHUT.
const ACK_TIMEOUT: Duration = Duration::from_secs(120);
/// How long to wait for a silent peer (QEMU) to close after EOF.
const SILENT_TIMEOUT: Duration = Duration::from_secs(10);
/// Out-of-order chunks held before the gap is declared a bug.
const MAX_REORDER: usize = 4096;

/// Commands from the orchestrator.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Command {
    /// New bandwidth cap in bytes per second (0 = unlimited).
    SetRate(u64),
    /// The device state the guest saved after `stop` (the `--device-state`
    /// file format), replacing the start-time one's device sections; sent
    /// before the last round starts, so it is in hand before `finish`. The
    /// configuration section went out at the start and stays.
    DeviceState(#[serde(with = "serde_bytes")] Vec<u8>),
}

/// TLS settings of the sending end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsInit {
    /// Certificate, key and CA.
    pub files: tls::Files,
    /// The name the receiver's certificate must carry, instead of the tcp: host.
    pub hostname: Option<String>,
}

impl TlsInit {
    /// Loads the files into a client setup.
    pub fn client(&self) -> Result<tls::Client, tls::Error> {
        tls::Client::new(&self.files, self.hostname.as_deref())
    }
}

/// Configuration of the writer.
#[derive(Debug, Serialize, Deserialize)]
pub struct Init {
    /// Destination URI.
    pub to: String,
    /// The blocks, in send order.
    pub blocks: Vec<BlockFile>,
    /// Device-state file contents (`ferry inspect --extract-device-state`).
    pub device_state: Option<Vec<u8>>,
    /// Machine name for the configuration section without device state.
    pub machine: String,
    /// Bandwidth cap in bytes per second (0 = unlimited).
    pub rate: u64,
    /// Fail a write that makes no progress for this long.
    pub stall_timeout: Option<Duration>,
    /// TLS on the connection, if set.
    pub tls: Option<TlsInit>,
    /// Seal the stream with integrity checkpoints (a ferry receiver only).
    pub integrity: bool,
    /// Open QEMU's return path and take the destination's SHUT as the
    /// verdict (a QEMU destination only).
    pub return_path: bool,
    /// Chunks from the compress stage.
    pub chunks: IpcReceiver<Chunk>,
    /// One credit back per chunk written.
    pub credits: IpcSender<u32>,
    /// Commands from the orchestrator.
    pub commands: IpcReceiver<Command>,
    /// Device names of the disks, in the blockio actor's order (none: no
    /// block section).
    pub disks: Vec<String>,
    /// Disk chunks from the blockio actor (with `disks`).
    pub disk_chunks: Option<IpcReceiver<DiskChunk>>,
    /// One credit back per disk chunk written.
    pub disk_credits: Option<IpcSender<u32>>,
    /// The shared disk chunk buffers and how many chunks they hold.
    pub disk_slots: Option<(std::path::PathBuf, u32)>,
    /// multifd data channels to open beside the main stream.
    pub multifd: Option<MultifdSend>,
}

/// Everything that reaches the writer, on one queue.
#[derive(Debug)]
pub enum Mail {
    /// A chunk from the compress stage.
    Chunk(Chunk),
    /// A command from the orchestrator.
    Command(Command),
    /// A disk chunk from the blockio actor.
    Disk(DiskChunk),
}

/// Errors of the writer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The URI is not valid.
    #[error("bad destination")]
    Uri(#[from] uri::ParseError),
    /// The device-state file is not valid.
    #[error("bad device state")]
    DeviceState(#[source] parse::Error),
    /// The device state saved after `stop` reuses a section id of this stream.
    #[error("the device state saved after stop uses section id {0}, which this stream's RAM, block or checkpoint section took")]
    AfterStopSectionId(u32),
    /// The TLS files cannot be loaded.
    #[error("cannot set up TLS")]
    Tls(#[source] Box<tls::Error>),
    /// Cannot connect to the destination.
    #[error("cannot connect to {uri}")]
    Connect {
        /// The destination.
        uri: String,
        /// Why.
        #[source]
        source: uri::OpenError,
    },
    /// Guest RAM cannot be mapped.
    #[error("cannot map guest RAM")]
    Map(#[from] ram::Error),
    /// Writing the stream failed.
    #[error("cannot write the stream to {uri}")]
    Write {
        /// The destination.
        uri: String,
        /// Why.
        #[source]
        source: qemu_file::Error,
    },
    /// The destination reported a failure.
    #[error("the destination failed: {0}")]
    Rejected(String),
    /// The destination closed the connection without acknowledging.
    #[error("the destination closed the connection before acknowledging the stream")]
    NoAck,
    /// A QEMU destination's SHUT said it failed. QEMU's status is a mere
    /// boolean; its reason is only in its own log.
    #[error("the destination reported a failure (SHUT {0}); see its log")]
    DestinationFailed(u32),
    /// A QEMU destination said it was done before the stream was.
    #[error("the destination sent SHUT 0 before the stream was complete")]
    EarlyShut,
    /// A QEMU destination closed its return path without a SHUT: it died,
    /// or failed before it opened the return path.
    #[error("the destination closed the connection without a SHUT message: it failed or died; see its log")]
    NoShut,
    /// A QEMU destination sent no SHUT in time after the stream ended.
    #[error("the destination sent no SHUT message within {0} s after the stream ended")]
    NoShutWithin(u64),
    /// What came back on QEMU's return path is not a precopy message.
    #[error("the destination's return path is not QEMU's (is it a ferry receiver? --return-path is for QEMU destinations)")]
    QemuReturnPath(#[source] return_path::Error),
    /// The destination sent something that is not an acknowledgement.
    #[error("the destination sent an unreadable acknowledgement: {0:?}")]
    BadAck(String),
    /// The TLS session failed while the stream was under way (an alert
    /// from the receiver, a record that does not authenticate).
    #[error(transparent)]
    Session(io::Error),
    /// A plain-text sender met a receiver that wants TLS.
    #[error("the destination answered with a TLS alert: it expects TLS (give --tls-cert, --tls-key and --tls-ca)")]
    PeerWantsTls,
    /// Chunks arrived with a gap in their sequence.
    #[error("chunk {0} never arrived")]
    SequenceGap(u64),
    /// A chunk names a block or page that does not exist.
    #[error("chunk {seq} names page {page} of block {block}, which does not exist")]
    BadChunk {
        /// The chunk.
        seq: u64,
        /// Block index.
        block: u32,
        /// Page index.
        page: u32,
    },
    /// The shared disk chunk buffers cannot be mapped.
    #[error("cannot map the disk chunk buffers")]
    Slots(#[source] Box<crate::actors::blockio::Error>),
    /// A disk chunk names a disk that does not exist.
    #[error("disk chunk for disk {0}, which does not exist")]
    BadDisk(u32),
    /// A multifd channel cannot be opened.
    #[error("cannot open multifd channel {channel} to {uri}")]
    ChannelConnect {
        /// The channel.
        channel: u8,
        /// The destination.
        uri: String,
        /// Why.
        #[source]
        source: uri::OpenError,
    },
    /// Writing a multifd channel failed.
    #[error("cannot write multifd channel {channel} to {uri}")]
    ChannelWrite {
        /// The channel.
        channel: u8,
        /// The destination.
        uri: String,
        /// Why.
        #[source]
        source: qemu_file::Error,
    },
    /// A multifd chunk reached a writer without multifd channels, or names
    /// a channel that does not exist.
    #[error("chunk {seq} has a packet for multifd channel {channel}, which does not exist")]
    BadChannel {
        /// The chunk.
        seq: u64,
        /// The channel.
        channel: u8,
    },
    /// The compress stage or orchestrator is gone.
    #[error("lost the {0} channel")]
    Channel(&'static str, #[source] io::Error),
}

/// What the return-path thread saw.
#[derive(Debug)]
enum Reply {
    Hello,
    Ack(Ack),
    Garbage(String),
    /// The TLS session failed (an alert, a bad record).
    Failed(io::Error),
    Closed,
    /// QEMU's SHUT and its status.
    Shut(u32),
    /// QEMU's return path ended without a SHUT.
    NoShut,
    /// QEMU's return path carried something a precopy source cannot take.
    BadMessage(return_path::Error),
}

impl Reply {
    /// What a reply on QEMU's return path means, once the stream is
    /// complete (`done`) or before: only a SHUT 0 after the end is success.
    fn qemu_verdict(self, done: bool) -> Result<(), Error> {
        match self {
            Reply::Shut(0) if done => Ok(()),
            Reply::Shut(0) => Err(Error::EarlyShut),
            Reply::Shut(status) => Err(Error::DestinationFailed(status)),
            Reply::BadMessage(e) => Err(Error::QemuReturnPath(e)),
            Reply::Failed(e) => Err(Error::Session(e)),
            _ => Err(Error::NoShut),
        }
    }

    /// A TLS record (alert 0x15 or handshake 0x16, version 3.x) where a line
    /// of text was expected: the peer speaks TLS and we do not.
    fn is_tls_record(line: &str) -> bool {
        let b = line.as_bytes();
        b.len() >= 3 && matches!(b[0], 0x15 | 0x16) && b[1] == 3 && b[2] <= 4
    }
}

/// `Read` over a transport, for line-based parsing of the return path.
struct TransportRead(Box<dyn Transport>);

impl Read for TransportRead {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

/// Replies the return-path thread may queue while the writer is busy (in a
/// long writev, say): beyond it the thread waits, and so does the peer.
const REPLY_QUEUE: usize = 16;

/// The longest return-path line: an acknowledgement is one line of JSON
/// with a digest per block, far below this.
const MAX_LINE: u64 = 64 << 10;

/// Starts the thread that reads the return path; its replies come on a
/// bounded queue, so a peer that talks without end costs no memory.
fn spawn_return_path(rp: Box<dyn Transport>, tls: bool) -> Receiver<Reply> {
    let (tx, rx) = crossbeam_channel::bounded(REPLY_QUEUE);
    std::thread::spawn(move || read_return_path(rp, &tx, tls));
    rx
}

/// Starts the thread that reads QEMU's return path: one reply, the SHUT or
/// why there is none.
fn spawn_qemu_return_path(rp: Box<dyn Transport>, tls: bool) -> Receiver<Reply> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    std::thread::spawn(move || {
        let _ = tx.send(read_qemu_return_path(rp, tls));
    });
    rx
}

/// Reads QEMU's return path up to its SHUT. PONG and SWITCHOVER_ACK carry
/// nothing a precopy source acts on; an end or a failed read before SHUT
/// means the destination is gone without a verdict.
fn read_qemu_return_path(rp: Box<dyn Transport>, tls: bool) -> Reply {
    let mut r = TransportRead(rp);
    loop {
        match return_path::read_qemu_message(&mut r) {
            Ok(Some(QemuMessage::Shut(status))) => return Reply::Shut(status),
            Ok(Some(QemuMessage::Pong(_) | QemuMessage::SwitchoverAck)) => {}
            Err(return_path::Error::Io(e)) if tls && e.kind() == io::ErrorKind::InvalidData => {
                return Reply::Failed(e)
            }
            Ok(None) | Err(return_path::Error::Io(_) | return_path::Error::Truncated) => {
                return Reply::NoShut
            }
            Err(e) => return Reply::BadMessage(e),
        }
    }
}

/// Reads the return path. Over TLS, a failed session (`InvalidData`, what
/// [`tls::SessionError`] comes as) is reported as such; any other end of the
/// return path is a close, as for a peer that never answers. A line longer
/// than [`MAX_LINE`] is garbage, and the last thing read.
fn read_return_path(rp: Box<dyn Transport>, tx: &crossbeam_channel::Sender<Reply>, tls: bool) {
    let mut r = BufReader::new(TransportRead(rp));
    let mut line = String::new();
    loop {
        line.clear();
        // Bound the line: the peer is not trusted.
        let read = (&mut r).take(MAX_LINE).read_line(&mut line);
        let too_long = matches!(read, Ok(n) if n as u64 == MAX_LINE && !line.ends_with('\n'));
        let reply = match read {
            Err(e) if tls && e.kind() == io::ErrorKind::InvalidData => Reply::Failed(e),
            Ok(0) | Err(_) => Reply::Closed,
            Ok(_) if line.as_bytes() == ferry_proto::return_path::HELLO => Reply::Hello,
            Ok(_) => match serde_json::from_str::<Ack>(line.trim_end()) {
                Ok(ack) => Reply::Ack(ack),
                Err(_) => Reply::Garbage(line.chars().take(200).collect()),
            },
        };
        let closed = matches!(reply, Reply::Closed | Reply::Failed(_));
        if tx.send(reply).is_err() || closed || too_long {
            return;
        }
    }
}

/// Spreads writes over 100 ms windows of `rate / 10` bytes, with the
/// accounting of the QEMUFile (QEMU's `qemu_file_rate_limit`).
struct Limiter {
    rate: u64,
    /// The newest `max-bandwidth` asked for and not yet applied
    /// ([`NO_REQUEST`] if none), set by the command forwarder as the command
    /// arrives: the command itself queues behind the chunks already in the
    /// mailbox, which at a low cap take seconds or minutes to write.
    requested: Arc<AtomicU64>,
    window_start: Instant,
    /// Bytes written on the multifd channels in this window: the main
    /// stream's file counts its own.
    extra: u64,
}

/// [`Limiter::requested`] when no change is waiting.
const NO_REQUEST: u64 = u64::MAX;

impl Limiter {
    fn new(requested: Arc<AtomicU64>) -> Self {
        Self {
            rate: 0,
            requested,
            window_start: Instant::now(),
            extra: 0,
        }
    }

    fn set_rate<T: Transport>(&mut self, f: &mut QemuFileWriter<'_, T>, rate: u64) {
        self.rate = rate;
        // Under 10 bytes/s a window's share rounds to 0, which the QEMUFile
        // reads as "no limit": keep at least one byte a window. A window
        // writes at least one slice (a page), so caps under 40 KiB/s act as
        // 40 KiB/s.
        f.set_rate_limit(if rate == 0 { 0 } else { (rate / 10).max(1) });
    }

    /// The largest piece to write between checks: small against the window's
    /// budget, so that one piece cannot overshoot it by much.
    fn slice(&self) -> usize {
        match self.rate {
            0 => 1 << 20,
            r => ((r / 10 / 32) as usize).clamp(PAGE_SIZE, 256 << 10),
        }
    }

    /// Applies the newest requested rate, if one is waiting.
    fn take_request<T: Transport>(&mut self, f: &mut QemuFileWriter<'_, T>) {
        let r = self.requested.swap(NO_REQUEST, Ordering::AcqRel);
        if r != NO_REQUEST {
            self.set_rate(f, r);
        }
    }

    /// Sleeps while this window's budget is spent; a rate asked for
    /// meanwhile applies from the next check (at most one window later).
    fn throttle<T: Transport>(&mut self, f: &mut QemuFileWriter<'_, T>) {
        loop {
            self.take_request(f);
            if self.rate == 0 {
                return;
            }
            let now = Instant::now();
            if now >= self.window_start + WINDOW {
                // Stay on the window grid unless we were idle for longer.
                self.window_start = if now < self.window_start + 2 * WINDOW {
                    self.window_start + WINDOW
                } else {
                    now
                };
                f.reset_rate_limit();
                self.extra = 0;
            }
            let spent = f.bytes_xfer() + self.extra;
            if f.error().is_some() || f.rate_limit() == 0 || spent <= f.rate_limit() {
                return;
            }
            std::thread::sleep((self.window_start + WINDOW).saturating_duration_since(now));
        }
    }
}

fn forward<T: serde::Serialize + serde::de::DeserializeOwned + Send + 'static>(
    rx: IpcReceiver<T>,
    tx: crossbeam_channel::Sender<Mail>,
    wrap: fn(T) -> Mail,
) {
    std::thread::spawn(move || {
        while let Ok(m) = rx.recv() {
            if tx.send(wrap(m)).is_err() {
                return;
            }
        }
    });
}

/// The writer's own read-only mappings of the RAM blocks, in send order.
fn map_blocks(blocks: &[BlockFile]) -> Result<Vec<GuestRam>, Error> {
    Ok(blocks
        .iter()
        .map(|b| GuestRam::map(&b.path))
        .collect::<Result<Vec<_>, _>>()?)
}

/// Runs the writer until the stream is complete and acknowledged.
pub fn run(mut init: Init, events: &IpcSender<ActorEvent>) -> Result<(), Error> {
    let to: Uri = init.to.parse()?;
    let device = device_state(init.device_state.take())?;
    let maps = map_blocks(&init.blocks)?;
    let link = Link::open(&to, &init)?;
    let slots = init
        .disk_slots
        .as_ref()
        .map(|(path, window)| crate::actors::blockio::map_slots_readonly(path, *window))
        .transpose()
        .map_err(|e| Error::Slots(Box::new(e)))?;
    let (mail, requested) = gather_mail(init.chunks, init.commands, init.disk_chunks);
    let section_id = device.free_section_id();
    let mut w = Writer {
        f: QemuFileWriter::new(link.transport),
        uri: to.to_string(),
        blocks: &init.blocks,
        maps: &maps,
        limiter: Limiter::new(requested),
        counts: PageCounts::default(),
        section_id,
        in_part: false,
        sealer: link.sealer,
        checkpoint_id: section_id + 1,
        events,
        last_progress: Instant::now(),
        disks: &init.disks,
        slots: slots.as_deref().unwrap_or_default(),
        block_id: section_id + 2,
        ram_done: None,
        disk_done: None,
        return_path: init.return_path,
        multifd: None,
        windows: crate::qmp::windows::Windows::new(WINDOW, init.rate, 0),
        after_stop: None,
    };
    w.limiter.set_rate(&mut w.f, init.rate);
    let channels = init.multifd.map(|m| (m, init.stall_timeout));
    w.start(&device, &init.machine, &to, channels)?;
    let streamed = w.stream(
        &mail,
        &init.credits,
        init.disk_credits.as_ref(),
        link.replies.as_ref(),
    );
    explained(streamed, link.replies.as_ref())?;
    let change = w.windows.finish(Instant::now(), w.sent());
    w.report_change(change);
    let device = w.device_at_end(&mail, device)?;
    let channel_bytes = w.finish(&device)?;
    let (bytes, counts) = (w.f.ftell() + channel_bytes.iter().sum::<u64>(), w.counts);
    if let Some(s) = &w.sealer {
        tracing::info!(checkpoints = s.count(), "stream sealed");
    }
    // Tell the peer the stream is over; it can still answer on the return path.
    let _ = w.f.transport_mut().shutdown_write();
    let transport = w.f.into_transport().map_err(|source| Error::Write {
        uri: to.to_string(),
        source,
    })?;
    // Every page is on the wire: unmapping the RAM now, beside the wait for
    // the acknowledgement, overlaps the teardown of its page tables with the
    // destination's digest instead of adding it to the end of the migration.
    std::thread::spawn(move || drop(maps));
    let (ack, return_path) = verdict(
        &to,
        transport,
        bytes,
        link.replies,
        events,
        init.return_path,
    )?;
    let _ = events.send(ActorEvent {
        actor: ActorKind::Writer,
        event: Event::Finished {
            bytes,
            channel_bytes,
            counts,
            ack,
            return_path,
        },
    });
    Ok(())
}

/// The device state to send, without the checkpoints of a sealed stream it
/// was extracted from: they would be stale here (and fail the receiver's
/// check).
fn device_state(bytes: Option<Vec<u8>>) -> Result<DeviceState, Error> {
    let mut device = match bytes {
        Some(bytes) => DeviceState::from_bytes(bytes).map_err(Error::DeviceState)?,
        None => DeviceState::default(),
    };
    device
        .sections
        .retain(|s| s.header.idstr != ferry_proto::stream::integrity::IDSTR);
    Ok(device)
}

/// The connection as the writer uses it: the stream (tapped for sealing
/// with `--integrity`) and the replies read off the return path.
struct Link {
    transport: Box<dyn Transport>,
    sealer: Option<Sealer>,
    replies: Option<Receiver<Reply>>,
}

impl Link {
    fn open(to: &Uri, init: &Init) -> Result<Self, Error> {
        let client = init
            .tls
            .as_ref()
            .map(TlsInit::client)
            .transpose()
            .map_err(|e| Error::Tls(Box::new(e)))?;
        let conn = to
            .connect(Duration::from_secs(10), init.stall_timeout, client.as_ref())
            .map_err(|source| Error::Connect {
                uri: to.to_string(),
                source,
            })?;
        let replies = conn.return_path.map(|rp| match init.return_path {
            true => spawn_qemu_return_path(rp, conn.tls),
            false => spawn_return_path(rp, conn.tls),
        });
        let (transport, sealer): (Box<dyn Transport>, _) = if init.integrity {
            let (tap, sealer) = WriteTap::new(conn.transport);
            (Box::new(tap), Some(sealer))
        } else {
            (conn.transport, None)
        };
        Ok(Self {
            transport,
            sealer,
            replies,
        })
    }
}

/// Puts chunks, commands and disk chunks on one queue; a `max-bandwidth`
/// change is also posted at once to the returned cell, for the limiter.
fn gather_mail(
    chunks: IpcReceiver<Chunk>,
    commands: IpcReceiver<Command>,
    disk_chunks: Option<IpcReceiver<DiskChunk>>,
) -> (Receiver<Mail>, Arc<AtomicU64>) {
    let (mail_tx, mail) = crossbeam_channel::bounded(64);
    let requested = Arc::new(AtomicU64::new(NO_REQUEST));
    forward(chunks, mail_tx.clone(), Mail::Chunk);
    let tx = mail_tx.clone();
    let posted = Arc::clone(&requested);
    std::thread::spawn(move || {
        while let Ok(c) = commands.recv() {
            if let Command::SetRate(r) = c {
                posted.store(r, Ordering::Release);
            }
            if tx.send(Mail::Command(c)).is_err() {
                return;
            }
        }
    });
    if let Some(rx) = disk_chunks {
        forward(rx, mail_tx, Mail::Disk);
    }
    (mail, requested)
}

/// A failed write, explained: a receiver that gives up (a disk too small,
/// an I/O error on its side) says why before it closes, and that beats our
/// broken pipe.
fn explained(streamed: Result<(), Error>, replies: Option<&Receiver<Reply>>) -> Result<(), Error> {
    if let (Err(Error::Write { .. } | Error::ChannelWrite { .. }), Some(rx)) = (&streamed, replies)
    {
        rejection(rx)?;
    }
    streamed
}

/// After a failed write: the receiver's reason, if it gives one within 2 s.
fn rejection(rx: &Receiver<Reply>) -> Result<(), Error> {
    let deadline = Instant::now() + Duration::from_secs(2);
    while let Ok(r) = rx.recv_deadline(deadline) {
        match r {
            Reply::Ack(ack) if !ack.ok => {
                return Err(Error::Rejected(ack.error.unwrap_or_default()))
            }
            r @ (Reply::Shut(_) | Reply::NoShut | Reply::BadMessage(_)) => {
                return r.qemu_verdict(false)
            }
            Reply::Closed | Reply::Failed(_) => break,
            _ => {}
        }
    }
    Ok(())
}

/// Closes a file, or waits for the peer's verdict on the stream.
fn verdict(
    to: &Uri,
    mut transport: Box<dyn Transport>,
    bytes: u64,
    replies: Option<Receiver<Reply>>,
    events: &IpcSender<ActorEvent>,
    qemu: bool,
) -> Result<(Option<Ack>, ReturnPath), Error> {
    match replies {
        _ if matches!(to, Uri::File(_)) => {
            transport.close().map_err(|e| Error::Write {
                uri: to.to_string(),
                source: qemu_file::Error::Io {
                    offset: bytes,
                    source: std::sync::Arc::new(e),
                },
            })?;
            Ok((None, ReturnPath::None))
        }
        None => Ok((None, ReturnPath::Silent)),
        Some(rx) if qemu => await_shut(&rx),
        Some(rx) => await_ack(&rx, events),
    }
}

/// Waits for a QEMU destination's SHUT after EOF: status 0 is the only
/// success.
fn await_shut(rx: &Receiver<Reply>) -> Result<(Option<Ack>, ReturnPath), Error> {
    match rx.recv_timeout(ACK_TIMEOUT) {
        Ok(r) => r.qemu_verdict(true).map(|()| (None, ReturnPath::Qemu)),
        Err(crossbeam_channel::RecvTimeoutError::Disconnected) => Err(Error::NoShut),
        Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
            Err(Error::NoShutWithin(ACK_TIMEOUT.as_secs()))
        }
    }
}

/// Waits for the verdict after EOF: an acknowledgement from a ferry receiver
/// (which said hello), or the close of a peer that never answers (QEMU).
fn await_ack(
    rx: &Receiver<Reply>,
    events: &IpcSender<ActorEvent>,
) -> Result<(Option<Ack>, ReturnPath), Error> {
    let mut ferry = false;
    let start = Instant::now();
    loop {
        let limit = if ferry { ACK_TIMEOUT } else { SILENT_TIMEOUT };
        let left = limit.saturating_sub(start.elapsed());
        match rx.recv_timeout(left) {
            Ok(Reply::Hello) => {
                ferry = true;
                let _ = events.send(ActorEvent {
                    actor: ActorKind::Writer,
                    event: Event::PeerLoaded,
                });
            }
            Ok(Reply::Ack(ack)) if ack.ok => return Ok((Some(ack), ReturnPath::Ferry)),
            Ok(Reply::Ack(ack)) => {
                return Err(Error::Rejected(
                    ack.error.unwrap_or_else(|| "no reason given".into()),
                ))
            }
            Ok(Reply::Garbage(line)) if Reply::is_tls_record(&line) => {
                return Err(Error::PeerWantsTls)
            }
            Ok(Reply::Garbage(line)) => return Err(Error::BadAck(line)),
            Ok(Reply::Failed(e)) => return Err(Error::Session(e)),
            Ok(r @ (Reply::Shut(_) | Reply::NoShut | Reply::BadMessage(_))) => {
                return r.qemu_verdict(true).map(|()| (None, ReturnPath::Qemu))
            }
            Ok(Reply::Closed) | Err(_) if ferry => return Err(Error::NoAck),
            Ok(Reply::Closed) | Err(_) => return Ok((None, ReturnPath::Silent)),
        }
    }
}

/// Chunks that arrived ahead of their turn, and whose turn it is.
#[derive(Default)]
struct Reorder {
    pending: BTreeMap<u64, Chunk>,
    next: u64,
}

/// The return path as the writer hears it while streaming: `None` once it
/// has closed.
struct Replies<'r>(Option<&'r Receiver<Reply>>);

impl Replies<'_> {
    /// Acts on one reply: a receiver that gives up says why before it
    /// closes. After the close the return path is no longer listened to: a
    /// disconnected channel is always ready, and `select!` would spin on it.
    fn hear(&mut self, reply: Result<Reply, crossbeam_channel::RecvError>) -> Result<(), Error> {
        match reply {
            Ok(Reply::Ack(ack)) if !ack.ok => Err(Error::Rejected(ack.error.unwrap_or_default())),
            Ok(Reply::Failed(e)) => Err(Error::Session(e)),
            Ok(Reply::Garbage(line)) if Reply::is_tls_record(&line) => Err(Error::PeerWantsTls),
            Ok(r @ (Reply::Shut(_) | Reply::NoShut | Reply::BadMessage(_))) => {
                r.qemu_verdict(false)
            }
            Ok(Reply::Closed) | Err(_) => {
                self.0 = None;
                Ok(())
            }
            Ok(_) => Ok(()),
        }
    }
}

/// The next mail, hearing the return path while waiting for it.
fn next_mail(mail: &Receiver<Mail>, replies: &mut Replies<'_>) -> Result<Mail, Error> {
    let lost = |_| Error::Channel("compress", io::Error::other("closed before the last round"));
    loop {
        let Some(rx) = replies.0 else {
            return mail.recv().map_err(lost);
        };
        select! {
            recv(mail) -> m => return m.map_err(lost),
            recv(rx) -> r => replies.hear(r)?,
        }
    }
}

/// Writes a multifd packet with raw pages on the channel `f`, at byte `at`
/// of it (advanced by what is written): its `header`, then `pages` of `map`
/// straight from the mapping, with one writev per slice of the rate budget
/// (one iovec per run of adjacent pages) instead of a copy into the
/// channel's buffer, as QEMU's multifd writes guest RAM with `writev`.
/// Multifd channels are always plain tcp: or unix: sockets (TLS and
/// `--integrity`, which need the bytes in hand, are refused with channels),
/// so only the kernel reads these bytes. Every byte counts against the
/// bandwidth budget of `main`. A write error is latched in `f`, as the
/// QEMUFile does; `Err(page)` is a page past the mapping's end.
fn put_raw_packet(
    f: &mut QemuFileWriter<'_>,
    limiter: &mut Limiter,
    main: &mut QemuFileWriter<'_>,
    at: &mut u64,
    header: &[u8],
    map: &GuestRam,
    pages: &[u32],
) -> Result<(), u32> {
    // What is buffered (an earlier packet, a SYNC) goes first.
    f.flush();
    let per_write = (limiter.slice() / PAGE_SIZE).max(1);
    let mut head = header;
    let mut iov = Vec::with_capacity(per_write.min(pages.len()) + 1);
    for group in pages.chunks(per_write) {
        if f.error().is_some() {
            return Ok(());
        }
        iov.clear();
        iov.push(libc::iovec {
            iov_base: head.as_ptr().cast_mut().cast(),
            iov_len: head.len(),
        });
        // One raw iovec per run of adjacent pages, never `&[u8]`: the guest
        // may be writing these pages.
        let mut rest = group;
        while let Some(&first) = rest.first() {
            let n = rest
                .iter()
                .zip(first..)
                .take_while(|(&page, want)| page == *want)
                .count();
            let run = map.pages(first, n as u32).ok_or(first)?;
            iov.push(libc::iovec {
                iov_base: run.ptr_guard().as_ptr().cast_mut().cast(),
                iov_len: run.len(),
            });
            rest = &rest[n..];
        }
        let expected = head.len() + group.len() * PAGE_SIZE;
        limiter.throttle(main);
        // SAFETY: `head` is borrowed for the call; every run lies inside the
        // mapping (`map.pages` checked its bounds), which the writer keeps
        // mapped for its whole life; the transport only hands the iovecs to
        // writev(2), and the kernel copies the bytes.
        match unsafe { f.transport_mut().writev_raw(&iov) } {
            Ok(n) if n == expected => {}
            Ok(written) => f.set_error(qemu_file::Error::ShortWrite {
                offset: *at,
                written,
                expected,
            }),
            Err(e) => f.set_error(qemu_file::Error::Io {
                offset: *at,
                source: std::sync::Arc::new(e),
            }),
        }
        limiter.extra += expected as u64;
        *at += expected as u64;
        head = &[];
    }
    Ok(())
}

struct Writer<'m, 'e> {
    f: QemuFileWriter<'m>,
    uri: String,
    blocks: &'m [BlockFile],
    maps: &'m [GuestRam],
    limiter: Limiter,
    counts: PageCounts,
    section_id: u32,
    in_part: bool,
    /// Makes the integrity checkpoints, with `--integrity`.
    sealer: Option<Sealer>,
    /// The checkpoints' section id.
    checkpoint_id: u32,
    events: &'e IpcSender<ActorEvent>,
    last_progress: Instant,
    /// Disk device names (empty: no block section).
    disks: &'m [String],
    /// The shared disk chunk buffers.
    slots: &'m [u8],
    /// The block section's id.
    block_id: u32,
    /// The last RAM round written, and whether it was the last.
    ram_done: Option<(u32, bool)>,
    /// The last disk round written.
    disk_done: Option<(u32, bool)>,
    /// Open QEMU's return path.
    return_path: bool,
    /// The multifd data channels, once open.
    multifd: Option<Channels<'m>>,
    /// Bytes per rate window around each max-bandwidth change.
    windows: crate::qmp::windows::Windows,
    /// The device state saved after `stop` ([`Command::DeviceState`]).
    after_stop: Option<Vec<u8>>,
}

/// The multifd data channels as the writer drives them.
struct Channels<'m> {
    files: Vec<QemuFileWriter<'m>>,
    /// Bytes written on each.
    bytes: Vec<u64>,
    /// A sync point at every RAM EOS (QEMU's legacy mode).
    legacy: bool,
    /// The next packet's number: QEMU counts every packet, SYNC included,
    /// over all channels.
    packet_num: u64,
}

impl<'m> Channels<'m> {
    /// Connects the N channels to the main stream's address, each opening
    /// with its `MultiFDInit` at once: a QEMU destination peeks at the first
    /// bytes of every connection to tell the channels from the main stream.
    fn open(to: &Uri, stall: Option<Duration>, m: &MultifdSend) -> Result<Self, Error> {
        let mut files = Vec::with_capacity(m.channels.into());
        for id in 0..m.channels {
            let conn = to
                .connect(Duration::from_secs(10), stall, None)
                .map_err(|source| Error::ChannelConnect {
                    channel: id,
                    uri: to.to_string(),
                    source,
                })?;
            let mut f = QemuFileWriter::new(conn.transport);
            f.put_buffer(&ChannelInit { uuid: [0; 16], id }.encode());
            f.flush();
            files.push(f);
        }
        Ok(Self {
            bytes: vec![multifd::INIT_LEN as u64; files.len()],
            files,
            legacy: m.legacy_sync,
            packet_num: 0,
        })
    }

    fn sent(&self) -> u64 {
        self.bytes.iter().sum()
    }

    /// The first channel error, if any.
    fn error(&self, uri: &str) -> Result<(), Error> {
        for (id, f) in self.files.iter().enumerate() {
            if let Some(e) = f.error() {
                return Err(Error::ChannelWrite {
                    channel: id as u8,
                    uri: uri.to_owned(),
                    source: e.clone(),
                });
            }
        }
        Ok(())
    }

    /// A SYNC packet on every channel, on the wire before the main channel
    /// names the sync point.
    fn sync(&mut self) {
        let mut header = [0u8; HEADER_LEN];
        for (f, bytes) in self.files.iter_mut().zip(&mut self.bytes) {
            PacketHeader::sync(self.packet_num).encode(&mut header);
            self.packet_num += 1;
            f.put_buffer(&header);
            f.flush();
            *bytes += HEADER_LEN as u64;
        }
    }

    /// Ends every channel after the stream: nothing follows the last sync.
    /// Returns the bytes written on each.
    fn close(self) -> Vec<u64> {
        for mut f in self.files {
            f.flush();
            let _ = f.transport_mut().shutdown_write();
        }
        self.bytes
    }
}

impl<'m> Writer<'m, '_> {
    fn check(&self) -> Result<(), Error> {
        match self.f.error() {
            Some(e) => Err(Error::Write {
                uri: self.uri.clone(),
                source: e.clone(),
            }),
            None => self.multifd.as_ref().map_or(Ok(()), |m| m.error(&self.uri)),
        }
    }

    /// Stream bytes so far, the multifd channels' included.
    fn sent(&self) -> u64 {
        self.f.ftell_fast() + self.multifd.as_ref().map_or(0, Channels::sent)
    }

    /// A RAM EOS. At a sync point (`round_end`, or every EOS in QEMU's
    /// legacy mode) with multifd, the channels' SYNC packets come first and,
    /// in the current mode, MULTIFD_FLUSH; the main stream is then flushed
    /// too, since the destination's channels wait at their SYNC until its
    /// main channel reaches the sync point.
    fn put_ram_eos(&mut self, round_end: bool) {
        let mut ram = RamWriter::new();
        let Some(m) = self.multifd.as_mut().filter(|m| m.legacy || round_end) else {
            ram.put_eos(&mut self.f);
            return;
        };
        m.sync();
        if !m.legacy {
            ram.put_multifd_flush(&mut self.f);
        }
        ram.put_eos(&mut self.f);
        self.f.flush();
    }

    /// A multifd chunk: its ZERO records on the main channel, its packets
    /// on theirs.
    fn write_packets(
        &mut self,
        seq: u64,
        zero_records: &[u8],
        packets: Vec<Packet>,
    ) -> Result<(), Error> {
        if !zero_records.is_empty() {
            self.open_part();
            self.limiter.throttle(&mut self.f);
            self.f.put_buffer(zero_records);
        }
        packets
            .into_iter()
            .try_for_each(|p| self.put_packet(seq, p))
    }

    /// Writes one packet on its channel, numbered in write order, under the
    /// one bandwidth budget.
    fn put_packet(&mut self, seq: u64, p: Packet) -> Result<(), Error> {
        let bad = || Error::BadChannel {
            seq,
            channel: p.channel,
        };
        let m = self.multifd.as_mut().ok_or_else(bad)?;
        let f = m.files.get_mut(usize::from(p.channel)).ok_or_else(bad)?;
        let mut bytes = p.bytes;
        if bytes.len() < HEADER_LEN {
            return Err(bad());
        }
        bytes[24..32].copy_from_slice(&m.packet_num.to_be_bytes());
        m.packet_num += 1;
        if !p.raw_pages.is_empty() {
            let map = self.maps.get(p.block as usize).ok_or(Error::BadChunk {
                seq,
                block: p.block,
                page: 0,
            })?;
            let at = &mut m.bytes[usize::from(p.channel)];
            return put_raw_packet(
                f,
                &mut self.limiter,
                &mut self.f,
                at,
                &bytes,
                map,
                &p.raw_pages,
            )
            .map_err(|page| Error::BadChunk {
                seq,
                block: p.block,
                page,
            });
        }
        for piece in bytes.chunks(self.limiter.slice()) {
            self.limiter.throttle(&mut self.f);
            f.put_buffer(piece);
            self.limiter.extra += piece.len() as u64;
        }
        m.bytes[usize::from(p.channel)] += bytes.len() as u64;
        Ok(())
    }

    fn wrap(&self, source: qemu_file::Error) -> Error {
        Error::Write {
            uri: self.uri.clone(),
            source,
        }
    }

    /// With `--integrity`, seals what was written since the last checkpoint.
    /// Never inside a section.
    fn checkpoint(&mut self) -> Result<(), Error> {
        if self.sealer.is_none() {
            return Ok(());
        }
        debug_assert!(!self.in_part);
        self.f.flush();
        self.check()?;
        let Some(c) = self.sealer.as_mut().map(Sealer::seal) else {
            return Ok(());
        };
        c.put(&mut self.f, self.checkpoint_id)
            .map_err(|e| self.wrap(e))
    }

    /// Header, with multifd the data channels (after the header, which a
    /// QEMU destination peeks at before it accepts another connection),
    /// configuration, with `--return-path` the command that opens QEMU's
    /// return path (QEMU flushes after it; so do we), and the RAM section's
    /// setup part.
    fn start(
        &mut self,
        device: &DeviceState,
        machine: &str,
        to: &Uri,
        multifd: Option<(MultifdSend, Option<Duration>)>,
    ) -> Result<(), Error> {
        encode::put_file_header(&mut self.f);
        if let Some((m, stall)) = multifd {
            self.f.flush();
            self.multifd = Some(Channels::open(to, stall, &m)?);
        }
        device.put_configuration(&mut self.f, machine);
        if self.return_path {
            encode::put_command(&mut self.f, command::OPEN_RETURN_PATH, &[]);
            self.f.flush();
        }
        self.checkpoint()?;
        let f = &mut self.f;
        let infos: Vec<RamBlockInfo> = self.blocks.iter().map(BlockFile::info).collect();
        let id = self.section_id;
        encode::put_section_start(f, SectionKind::Start, id, RAM_IDSTR, 0, RAM_VERSION)
            .map_err(|e| self.wrap(e))?;
        let mut ram = RamWriter::new();
        ram.put_mem_size(&mut self.f, &infos)
            .map_err(|e| self.wrap(e))?;
        self.put_ram_eos(true);
        encode::put_footer(&mut self.f, id);
        if !self.disks.is_empty() {
            let bid = self.block_id;
            encode::put_section_start(
                &mut self.f,
                SectionKind::Start,
                bid,
                BLOCK_IDSTR,
                0,
                BLOCK_VERSION,
            )
            .map_err(|e| self.wrap(e))?;
            encode::put_block_eos(&mut self.f);
            encode::put_footer(&mut self.f, bid);
        }
        self.f.flush();
        self.check()
    }

    /// One disk chunk as a block PART section of its own (the RAM part, if
    /// open, is closed first), under the same bandwidth budget as RAM.
    fn write_disk_chunk(
        &mut self,
        disk: u32,
        offset: u64,
        len: u32,
        slot: Option<u32>,
    ) -> Result<(), Error> {
        let bytes: &'m [u8] = match slot {
            None => &[],
            Some(s) => {
                let at = s as usize * BLOCK_CHUNK_SIZE;
                let slots: &'m [u8] = self.slots;
                slots
                    .get(at..at + (len as usize).min(BLOCK_CHUNK_SIZE))
                    .ok_or(Error::BadDisk(disk))?
            }
        };
        let name = self.disks.get(disk as usize).ok_or(Error::BadDisk(disk))?;
        self.close_part();
        self.limiter.throttle(&mut self.f);
        encode::put_section_part(&mut self.f, SectionKind::Part, self.block_id);
        let sector = offset / SECTOR_SIZE;
        let mut flags = block_flag::DEVICE_BLOCK;
        if bytes.is_empty() {
            flags |= block_flag::ZERO_BLOCK;
        }
        self.f.put_be64((sector << 9) | flags);
        self.f.put_counted_string(name).map_err(|e| self.wrap(e))?;
        if !bytes.is_empty() {
            let data = &bytes[..(len as usize).min(bytes.len()).min(BLOCK_CHUNK_SIZE)];
            for piece in data.chunks(self.limiter.slice()) {
                self.limiter.throttle(&mut self.f);
                self.f.put_buffer(piece);
            }
            // A short last chunk is padded: a destination reads whole chunks.
            let pad = BLOCK_CHUNK_SIZE - data.len();
            if pad > 0 {
                self.f.put_buffer(&vec![0u8; pad]);
            }
        }
        encode::put_block_eos(&mut self.f);
        encode::put_footer(&mut self.f, self.block_id);
        self.checkpoint()?;
        self.check()
    }

    /// A round is sent once both its RAM and its disk parts are; returns
    /// true after the last round.
    fn round_done(&mut self) -> Result<bool, Error> {
        let Some((round, last)) = self.ram_done else {
            return Ok(false);
        };
        if !self.disks.is_empty() && self.disk_done != Some((round, last)) {
            return Ok(false);
        }
        self.ram_done = None;
        self.disk_done = None;
        self.f.flush();
        self.check()?;
        let _ = self.events.send(ActorEvent {
            actor: ActorKind::Writer,
            event: Event::RoundSent {
                round,
                bytes: self.sent(),
            },
        });
        Ok(last)
    }

    /// Writes chunks in sequence order until the last round ends.
    fn stream(
        &mut self,
        mail: &Receiver<Mail>,
        credits: &IpcSender<u32>,
        disk_credits: Option<&IpcSender<u32>>,
        replies: Option<&Receiver<Reply>>,
    ) -> Result<(), Error> {
        let mut order = Reorder::default();
        let mut replies = Replies(replies);
        loop {
            let done = match next_mail(mail, &mut replies)? {
                Mail::Command(Command::SetRate(r)) => {
                    // The newest request, which the limiter may have applied
                    // already while this command waited behind chunks.
                    self.limiter.take_request(&mut self.f);
                    let change = self.windows.set_cap(Instant::now(), self.sent(), r);
                    self.report_change(change);
                    false
                }
                Mail::Command(Command::DeviceState(b)) => {
                    self.after_stop = Some(b);
                    false
                }
                Mail::Disk(DiskChunk::Data {
                    disk,
                    offset,
                    len,
                    slot,
                }) => {
                    self.write_disk_chunk(disk, offset, len, slot)?;
                    if let Some(c) = disk_credits {
                        // The blockio actor exits after its last round.
                        let _ = c.send(1);
                    }
                    self.progress();
                    false
                }
                Mail::Disk(DiskChunk::RoundEnd { round, last }) => {
                    self.disk_done = Some((round, last));
                    self.round_done()?
                }
                Mail::Chunk(c) => self.write_in_order(c, &mut order, credits)?,
            };
            if done {
                return Ok(());
            }
        }
    }

    /// Writes `c` and every chunk it unblocks, in sequence order; returns
    /// true after the last round.
    fn write_in_order(
        &mut self,
        c: Chunk,
        order: &mut Reorder,
        credits: &IpcSender<u32>,
    ) -> Result<bool, Error> {
        order.pending.insert(c.seq(), c);
        if order.pending.len() > MAX_REORDER {
            return Err(Error::SequenceGap(order.next));
        }
        while let Some(c) = order.pending.remove(&order.next) {
            order.next += 1;
            let counts_credit = !matches!(c, Chunk::RoundEnd { .. });
            if self.write_chunk(c)? && self.round_done()? {
                return Ok(true);
            }
            if counts_credit {
                // The compress stage exits once it has handed over its last
                // chunk; a credit nobody reads is fine.
                let _ = credits.send(1);
            }
            self.progress();
        }
        Ok(false)
    }

    /// Hands a finished record of a rate change to the orchestrator.
    fn report_change(&self, change: Option<crate::qmp::windows::RateChange>) {
        if let Some(c) = change {
            let _ = self.events.send(ActorEvent {
                actor: ActorKind::Writer,
                event: Event::RateChange(c),
            });
        }
    }

    fn progress(&mut self) {
        let change = self.windows.observe(Instant::now(), self.sent());
        self.report_change(change);
        if self.last_progress.elapsed() >= Duration::from_millis(250) {
            self.last_progress = Instant::now();
            let _ = self.events.send(ActorEvent {
                actor: ActorKind::Writer,
                event: Event::Progress {
                    bytes: self.sent(),
                    counts: self.counts,
                },
            });
        }
    }

    fn open_part(&mut self) {
        if !self.in_part {
            encode::put_section_part(&mut self.f, SectionKind::Part, self.section_id);
            self.in_part = true;
        }
    }

    fn close_part(&mut self) {
        self.close_part_at(false);
    }

    /// Closes the RAM part, at the end of a round a sync point.
    fn close_part_at(&mut self, round_end: bool) {
        if self.in_part {
            self.put_ram_eos(round_end);
            encode::put_footer(&mut self.f, self.section_id);
            self.in_part = false;
        }
    }

    /// Writes one chunk; returns true at the end of a RAM round.
    fn write_chunk(&mut self, c: Chunk) -> Result<bool, Error> {
        match c {
            Chunk::Records { bytes, counts, .. } => {
                self.open_part();
                for piece in bytes.chunks(self.limiter.slice()) {
                    self.limiter.throttle(&mut self.f);
                    self.f.put_buffer(piece);
                }
                self.counts.add(&counts);
            }
            Chunk::RawPages {
                seq,
                block,
                zero_records,
                zero_pages,
                pages,
            } => {
                self.open_part();
                self.limiter.throttle(&mut self.f);
                self.f.put_buffer(&zero_records);
                let (Some(info), Some(map)) = (
                    self.blocks.get(block as usize),
                    self.maps.get(block as usize),
                ) else {
                    return Err(Error::BadChunk {
                        seq,
                        block,
                        page: 0,
                    });
                };
                let mut ram = RamWriter::new();
                let per_check = (self.limiter.slice() / PAGE_SIZE).max(1);
                let mut buf = [0u8; PAGE_SIZE];
                for (n, &i) in pages.iter().enumerate() {
                    let off = i as usize * PAGE_SIZE;
                    let page = map.read_page(i, &mut buf).ok_or(Error::BadChunk {
                        seq,
                        block,
                        page: i,
                    })?;
                    if n % per_check == 0 {
                        self.limiter.throttle(&mut self.f);
                    }
                    ram.put_page(&mut self.f, &info.name, off as u64, page)
                        .map_err(|e| self.wrap(e))?;
                }
                self.counts.zero += zero_pages;
                self.counts.raw += pages.len() as u64;
            }
            Chunk::Packets {
                seq,
                zero_records,
                packets,
                counts,
            } => {
                self.write_packets(seq, &zero_records, packets)?;
                self.counts.add(&counts);
            }
            Chunk::RoundEnd { round, last, .. } => {
                // With --integrity the chunk before was sealed already.
                if self.multifd.is_some() {
                    // Every round ends at a sync point, in a RAM part.
                    self.open_part();
                }
                self.close_part_at(true);
                self.f.flush();
                self.check()?;
                self.ram_done = Some((round, last));
                return Ok(true);
            }
        }
        if self.sealer.is_some() {
            self.close_part();
            self.checkpoint()?;
        }
        self.check()?;
        Ok(false)
    }

    /// The device state to end the stream with: the one saved after `stop`
    /// if the orchestrator sent it, else the start-time one. Its sections must
    /// not use the ids this stream's own sections took at the start.
    fn device_at_end(
        &mut self,
        mail: &Receiver<Mail>,
        start: DeviceState,
    ) -> Result<DeviceState, Error> {
        // A command sent before the last round cannot trail its chunks by
        // much; take one that is still queued (nothing else is left to do).
        while let Ok(m) = mail.try_recv() {
            if let Mail::Command(Command::DeviceState(b)) = m {
                self.after_stop = Some(b);
            }
        }
        let Some(bytes) = self.after_stop.take() else {
            return Ok(start);
        };
        let device = device_state(Some(bytes))?;
        let taken = [self.section_id, self.checkpoint_id, self.block_id];
        match device
            .sections
            .iter()
            .find(|s| taken.contains(&s.header.id))
        {
            Some(s) => Err(Error::AfterStopSectionId(s.header.id)),
            None => Ok(device),
        }
    }

    /// The RAM section's last part, the device sections, EOF and the vmdesc
    /// trailer (which QEMU reads before it reports success).
    /// Returns the bytes written on each multifd channel, which it closes.
    fn finish(&mut self, device: &DeviceState) -> Result<Vec<u64>, Error> {
        self.close_part();
        encode::put_section_part(&mut self.f, SectionKind::End, self.section_id);
        self.put_ram_eos(true);
        encode::put_footer(&mut self.f, self.section_id);
        if !self.disks.is_empty() {
            encode::put_section_part(&mut self.f, SectionKind::End, self.block_id);
            encode::put_block_eos(&mut self.f);
            encode::put_footer(&mut self.f, self.block_id);
        }
        device.put_sections(&mut self.f).map_err(|e| self.wrap(e))?;
        self.checkpoint()?;
        encode::put_eof(&mut self.f);
        encode::put_vmdesc(&mut self.f, device.vmdesc_json());
        self.f.flush();
        self.check()?;
        Ok(self.multifd.take().map(Channels::close).unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    /// A peer that never stops talking: `text` over and over, counting the
    /// bytes it has handed out.
    struct Chatter {
        text: &'static [u8],
        at: usize,
        served: Arc<AtomicU64>,
    }

    impl Chatter {
        fn start(text: &'static [u8]) -> (Receiver<Reply>, Arc<AtomicU64>) {
            let served = Arc::new(AtomicU64::new(0));
            let peer = Chatter {
                text,
                at: 0,
                served: served.clone(),
            };
            (spawn_return_path(Box::new(peer), false), served)
        }
    }

    impl Transport for Chatter {
        fn writev(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
            Ok(bufs.iter().map(|b| b.len()).sum())
        }

        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            for b in buf.iter_mut() {
                *b = self.text[self.at];
                self.at = (self.at + 1) % self.text.len();
            }
            self.served.fetch_add(buf.len() as u64, Ordering::Relaxed);
            Ok(buf.len())
        }
    }

    /// What `BufReader` reads ahead of the line it hands out.
    const READ_AHEAD: u64 = 8 << 10;

    #[test]
    fn a_peer_that_talks_while_the_writer_is_busy_is_held_back() {
        let line = b"not an acknowledgement\n";
        let (rx, served) = Chatter::start(line);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !rx.is_full() {
            assert!(
                Instant::now() < deadline,
                "the reply queue never filled: is it bounded?"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        // Give a queue that grows the time to show it.
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(rx.len(), REPLY_QUEUE);
        let bound = (REPLY_QUEUE as u64 + 2) * line.len() as u64 + READ_AHEAD;
        let read = served.load(Ordering::Relaxed);
        assert!(
            read <= bound,
            "read {read} bytes of the peer's chatter, more than {bound}"
        );
    }

    #[test]
    fn an_endless_line_is_garbage_and_the_last_thing_read() {
        let (rx, served) = Chatter::start(b"x");
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(Reply::Garbage(text)) => assert_eq!(text, "x".repeat(200)),
            other => panic!("expected garbage, got {other:?}"),
        }
        assert!(
            matches!(
                rx.recv_timeout(Duration::from_secs(30)),
                Err(crossbeam_channel::RecvTimeoutError::Disconnected)
            ),
            "the return path is still read after an endless line"
        );
        let read = served.load(Ordering::Relaxed);
        assert!(
            read <= MAX_LINE + READ_AHEAD,
            "read {read} bytes of one line"
        );
    }

    /// What the QEMU return-path reader makes of `bytes`.
    fn qemu_reply(bytes: &[u8]) -> Reply {
        let rp = ferry_proto::transport::MemTransport::from_bytes(bytes.to_vec());
        read_qemu_return_path(Box::new(rp), false)
    }

    #[test]
    fn qemu_return_path_succeeds_only_on_shut_0() {
        // PONG and SWITCHOVER_ACK first, as a QEMU with switchover-ack sends.
        let ok = [
            &[0u8, 2, 0, 4, 0, 0, 0, 1][..],
            &[0, 7, 0, 0],
            &[0, 1, 0, 4, 0, 0, 0, 0],
        ]
        .concat();
        assert!(matches!(qemu_reply(&ok), Reply::Shut(0)));
        assert!(qemu_reply(&ok).qemu_verdict(true).is_ok());

        let shut1 = [0, 1, 0, 4, 0, 0, 0, 1];
        let e = qemu_reply(&shut1)
            .qemu_verdict(true)
            .expect_err("SHUT 1 is a failure");
        assert_eq!(
            e.to_string(),
            "the destination reported a failure (SHUT 1); see its log"
        );

        // A close before SHUT, even after a PONG.
        let pong_only = [0, 2, 0, 4, 0, 0, 0, 1];
        assert!(matches!(qemu_reply(&pong_only), Reply::NoShut));
        assert!(matches!(
            qemu_reply(&pong_only).qemu_verdict(true),
            Err(Error::NoShut)
        ));
    }

    #[test]
    fn a_ferry_receiver_or_postcopy_on_qemus_return_path_is_a_protocol_error() {
        for bytes in [ferry_proto::return_path::HELLO, &[0, 4, 0, 12][..]] {
            let reply = qemu_reply(bytes);
            assert!(matches!(reply, Reply::BadMessage(_)), "{reply:?}");
            let verdict = reply.qemu_verdict(true);
            assert!(
                matches!(verdict, Err(Error::QemuReturnPath(_))),
                "{verdict:?}"
            );
        }
    }

    #[test]
    fn a_shut_before_the_stream_ends_stops_the_writer() {
        let (tx, rx) = crossbeam_channel::bounded(1);
        tx.send(Reply::Shut(0)).unwrap();
        let mut replies = Replies(Some(&rx));
        assert!(matches!(replies.hear(rx.recv()), Err(Error::EarlyShut)));
        tx.send(Reply::Shut(1)).unwrap();
        assert!(matches!(
            replies.hear(rx.recv()),
            Err(Error::DestinationFailed(1))
        ));
        tx.send(Reply::NoShut).unwrap();
        assert!(matches!(replies.hear(rx.recv()), Err(Error::NoShut)));
    }

    #[test]
    fn a_closed_return_path_is_no_longer_listened_to() {
        let (tx, rx) = crossbeam_channel::bounded(1);
        let mut replies = Replies(Some(&rx));
        replies.hear(Ok(Reply::Hello)).unwrap();
        assert!(replies.0.is_some(), "a hello closes nothing");
        replies.hear(Ok(Reply::Closed)).unwrap();
        assert!(replies.0.is_none(), "still listening after the close");

        let mut replies = Replies(Some(&rx));
        drop(tx);
        replies.hear(rx.recv()).unwrap();
        assert!(
            replies.0.is_none(),
            "still listening to a disconnected return path"
        );
        // Without the return path, mail still comes through.
        let (mail_tx, mail) = crossbeam_channel::bounded(1);
        mail_tx.send(Mail::Command(Command::SetRate(7))).unwrap();
        assert!(matches!(
            next_mail(&mail, &mut replies),
            Ok(Mail::Command(Command::SetRate(7)))
        ));
    }
}
