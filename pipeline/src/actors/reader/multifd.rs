//! multifd on the destination: the main channel and N data channels
//! accepted on one address in any order, told apart by their first bytes as
//! QEMU's `migration_ioc_process_incoming` does, and one thread per data
//! channel that decodes its packets and writes their pages.
//!
//! Ordering follows QEMU's `multifd_recv_sync_main`: at a sync point on the
//! main channel (MULTIFD_FLUSH, or every RAM EOS for a source in QEMU's
//! legacy per-section mode) the loader waits until every channel has
//! delivered one SYNC packet, and each channel waits at its SYNC until all
//! have, so no page sent after a sync point is written before one sent
//! before it, whichever channel carried them.
//!
//! Each channel sums the RAM digest of the pages it writes, from the bytes it
//! has in hand, and hands the sum in when it ends: the receiver never reads
//! the RAM back for its digest.

use std::io::ErrorKind;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use ferry_guest::load::{self, SharedPages};
use ferry_guest::ram::PageDigest;
use ferry_proto::multifd::{
    self, ChannelDecoder, ChannelInit, Compression, PacketHeader, HEADER_LEN, INIT_LEN,
};
use ferry_proto::stream::{PAGE_SIZE, QEMU_VM_FILE_MAGIC};
use ferry_proto::transport::Transport;

use crate::channel::uri::{Connection, Listener, OpenError};

/// Faults of the multifd channels.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A connection could not be accepted.
    #[error("cannot accept a migration channel")]
    Accept(#[source] OpenError),
    /// A connection's first bytes could not be read.
    #[error("connection {conn} sent no channel header")]
    Header {
        /// The connection, counted from 1 in arrival order.
        conn: usize,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The first connection came, the rest did not within the stall timeout.
    #[error(
        "{got} of the {want} connections of a multifd migration arrived within {secs} s: \
         the source opened {source_channels} multifd channels, this destination expects \
         {channels} (--multifd-channels); is multifd on at the source, with \
         multifd-channels {channels}?"
    )]
    Missing {
        /// Connections that arrived.
        got: usize,
        /// Data channels among them: what the source uses, if it is done.
        source_channels: usize,
        /// Main stream and channels.
        want: usize,
        /// N.
        channels: u8,
        /// The stall timeout.
        secs: u64,
    },
    /// A connection that is neither the main stream nor a multifd channel.
    #[error("connection {conn} opens with {first:02x?}: neither \"QEVM\" nor a multifd channel")]
    Unrecognised {
        /// The connection, counted from 1.
        conn: usize,
        /// Its first four bytes.
        first: [u8; 4],
    },
    /// A second main stream.
    #[error("connection {conn} is a second main stream")]
    SecondMain {
        /// The connection, counted from 1.
        conn: usize,
    },
    /// A channel header that does not decode.
    #[error("connection {conn}: bad multifd channel header")]
    Init {
        /// The connection, counted from 1.
        conn: usize,
        /// Why.
        #[source]
        source: multifd::Error,
    },
    /// A channel id seen twice.
    #[error("multifd channel id {id} is {why} (--multifd-channels {channels})")]
    ChannelId {
        /// The id.
        id: u8,
        /// What is wrong with it.
        why: &'static str,
        /// N.
        channels: u8,
    },
    /// A channel id outside 0..N: the source uses more channels.
    #[error(
        "multifd channel id {id} is out of range: the source uses at least {} multifd channels, this \
         destination expects {channels} (--multifd-channels {channels}); both ends need \
         the same count", u16::from(*id) + 1
    )]
    TooManyChannels {
        /// The id.
        id: u8,
        /// N.
        channels: u8,
    },
    /// Reading a channel failed.
    #[error("multifd channel {channel}, at byte {offset}: read failed")]
    Io {
        /// The channel id.
        channel: u8,
        /// Bytes read on the channel before this one.
        offset: u64,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A channel ended inside a packet.
    #[error("multifd channel {channel} ended at byte {offset}, inside a packet")]
    Truncated {
        /// The channel id.
        channel: u8,
        /// Where it ended.
        offset: u64,
    },
    /// A packet that does not decode.
    #[error("multifd channel {channel}, packet at byte {offset}")]
    Packet {
        /// The channel id.
        channel: u8,
        /// The packet's offset on the channel.
        offset: u64,
        /// Why.
        #[source]
        source: multifd::Error,
    },
    /// Pages for a block the main stream did not announce (or before it did).
    #[error("multifd channel {channel}, packet at byte {offset}: RAM block {block:?} {why}")]
    Block {
        /// The channel id.
        channel: u8,
        /// The packet's offset on the channel.
        offset: u64,
        /// The block's name.
        block: String,
        /// What is wrong.
        why: &'static str,
    },
    /// Writing a packet's pages failed (or an offset lies past its block).
    #[error("multifd channel {channel}, packet at byte {offset}: its pages cannot be written")]
    Load {
        /// The channel id.
        channel: u8,
        /// The packet's offset on the channel.
        offset: u64,
        /// Why.
        #[source]
        source: load::Error,
    },
    /// The channels and the main stream disagree on the sync points.
    #[error("multifd channel {channel}: {what}")]
    Sync {
        /// The channel id.
        channel: u8,
        /// What happened.
        what: &'static str,
    },
}

/// What a source's channels carried.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    /// Pages whose bytes came raw in packets (compression "none").
    pub normal: u64,
    /// Pages whose bytes came in zlib or zstd packets.
    pub compressed: u64,
    /// Payload bytes of those packets.
    pub compressed_bytes: u64,
    /// Pages sent as all-zero offsets.
    pub zero: u64,
    /// Bytes read on all channels.
    pub bytes: u64,
}

impl Stats {
    /// Adds the other channel's figures.
    fn add(&mut self, other: &Stats) {
        self.normal += other.normal;
        self.compressed += other.compressed;
        self.compressed_bytes += other.compressed_bytes;
        self.zero += other.zero;
        self.bytes += other.bytes;
    }

    /// Adds the pages into the receiver's summary, by how they travelled, as
    /// QEMU's query-migrate counts them: a page of a compressed packet is
    /// compressed, not raw.
    pub fn add_to(&self, counts: &mut crate::supervisor::messages::PageCounts) {
        counts.raw += self.normal;
        counts.compressed += self.compressed;
        counts.compressed_bytes += self.compressed_bytes;
        counts.zero += self.zero;
    }
}

/// Reads exactly `buf.len()` bytes; `Ok(false)` when the channel ended
/// before the first of them.
fn read_full(t: &mut dyn Transport, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
    let mut got = 0;
    while got < buf.len() {
        match t.read(&mut buf[got..]) {
            Ok(0) => return Ok(Some(got)),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// One connection of a multifd migration, stalled only when none of them
/// moves: the main stream idles while the channels carry the pages, and a
/// channel may idle while the others do.
struct Watched {
    /// The bytes read to recognise the connection, given back first (the
    /// main stream's "QEVM"; none for a channel, whose init is consumed).
    head: [u8; 4],
    head_left: usize,
    inner: Box<dyn Transport>,
    /// Bytes read on every connection of the migration.
    progress: Arc<AtomicU64>,
    /// `progress` when this connection last read or waited.
    seen: u64,
}

impl Transport for Watched {
    fn writev(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        self.inner.writev(bufs)
    }
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.head_left > 0 {
            let at = self.head.len() - self.head_left;
            let n = buf.len().min(self.head_left);
            buf[..n].copy_from_slice(&self.head[at..at + n]);
            self.head_left -= n;
            return Ok(n);
        }
        loop {
            match self.inner.read(buf) {
                Ok(n) => {
                    self.seen = self.progress.fetch_add(n as u64, Ordering::Relaxed) + n as u64;
                    return Ok(n);
                }
                Err(e) if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock) => {
                    let now = self.progress.load(Ordering::Relaxed);
                    if now == self.seen {
                        return Err(e);
                    }
                    self.seen = now;
                }
                Err(e) => return Err(e),
            }
        }
    }
    fn shutdown(&mut self) -> std::io::Result<()> {
        self.inner.shutdown()
    }
    fn shutdown_write(&mut self) -> std::io::Result<()> {
        self.inner.shutdown_write()
    }
    fn return_path(&mut self) -> Option<Box<dyn Transport>> {
        self.inner.return_path()
    }
    fn close(&mut self) -> std::io::Result<()> {
        self.inner.close()
    }
}

/// The connections of one migration, in any order: the main stream, and the
/// `channels` data channels by id. The first may take as long as it takes;
/// the others must follow within the stall timeout. A read on any of them
/// stalls only when none of them made progress for the stall timeout.
pub fn accept(
    listener: &Listener,
    channels: u8,
    stall: Option<Duration>,
) -> Result<(Connection, Vec<Box<dyn Transport>>), Error> {
    let mut main = None;
    let mut data: Vec<Option<Box<dyn Transport>>> = (0..channels).map(|_| None).collect();
    let progress = Arc::new(AtomicU64::new(0));
    let watched = |inner, head: Option<[u8; 4]>| -> Box<dyn Transport> {
        Box::new(Watched {
            head: head.unwrap_or_default(),
            head_left: head.map_or(0, |h| h.len()),
            inner,
            progress: Arc::clone(&progress),
            seen: 0,
        })
    };
    let want = usize::from(channels) + 1;
    let mut deadline = None;
    for conn in 1..=want {
        let Some(mut c) = listener
            .accept_until(deadline, stall)
            .map_err(Error::Accept)?
        else {
            return Err(Error::Missing {
                got: conn - 1,
                source_channels: data.iter().filter(|c| c.is_some()).count(),
                want,
                channels,
                secs: stall.unwrap_or_default().as_secs(),
            });
        };
        deadline = stall.map(|s| std::time::Instant::now() + s);
        let mut init = [0u8; INIT_LEN];
        let header = |source| Error::Header { conn, source };
        let eof = || header(std::io::ErrorKind::UnexpectedEof.into());
        if read_full(c.transport.as_mut(), &mut init[..4])
            .map_err(header)?
            .is_some()
        {
            return Err(eof());
        }
        let first: [u8; 4] = init[..4].try_into().expect("4 bytes");
        if u32::from_be_bytes(first) == QEMU_VM_FILE_MAGIC {
            if main.is_some() {
                return Err(Error::SecondMain { conn });
            }
            c.transport = watched(c.transport, Some(first));
            main = Some(c);
            continue;
        }
        if !multifd::is_channel_magic(first) {
            return Err(Error::Unrecognised { conn, first });
        }
        if read_full(c.transport.as_mut(), &mut init[4..])
            .map_err(header)?
            .is_some()
        {
            return Err(eof());
        }
        let id = ChannelInit::decode(&init)
            .map_err(|source| Error::Init { conn, source })?
            .id;
        let bad = |why| Error::ChannelId { id, why, channels };
        let slot = data
            .get_mut(usize::from(id))
            .ok_or(Error::TooManyChannels { id, channels })?;
        if slot.is_some() {
            return Err(bad("used twice"));
        }
        *slot = Some(watched(c.transport, None));
    }
    refuse_extra_channel(listener, channels)?;
    let main = main.expect("N+1 connections, N of them data channels, so one is the main stream");
    Ok((
        main,
        data.into_iter()
            .map(|c| c.expect("every id seen"))
            .collect(),
    ))
}

/// A source with more channels than this destination expects has opened
/// them all by now, and the extra ones wait in the listen backlog: say so,
/// with both counts, instead of failing later on a channel cut short when
/// the source gives up. A connection that is not a channel is left alone.
fn refuse_extra_channel(listener: &Listener, channels: u8) -> Result<(), Error> {
    let soon = std::time::Instant::now() + Duration::from_millis(1);
    let Ok(Some(mut c)) = listener.accept_until(Some(soon), Some(Duration::from_secs(1))) else {
        return Ok(());
    };
    let mut init = [0u8; INIT_LEN];
    if !matches!(read_full(c.transport.as_mut(), &mut init), Ok(None)) {
        return Ok(());
    }
    match ChannelInit::decode(&init) {
        Ok(i) if i.id >= channels => Err(Error::TooManyChannels { id: i.id, channels }),
        _ => Ok(()),
    }
}

#[derive(Default)]
struct State {
    /// Channels waiting at their SYNC.
    arrived: usize,
    /// Bumped at every sync point, to release the waiting channels.
    generation: u64,
    /// Channels that ended (cleanly or not), in the order they did.
    ended: Vec<u8>,
    /// The first channel fault, for the loader to report.
    failed: Option<Error>,
    /// The main stream ended: a channel still waiting at a SYNC sent one
    /// nobody announced.
    closing: bool,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
    /// The RAM files, once the main stream announced them.
    pages: OnceLock<SharedPages>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A channel's SYNC: wait until the loader reaches its sync point.
    fn arrive(&self, channel: u8) -> Result<(), Error> {
        let mut s = self.lock();
        s.arrived += 1;
        let generation = s.generation;
        self.changed.notify_all();
        while s.generation == generation {
            if s.closing {
                return Err(Error::Sync {
                    channel,
                    what: "sent a SYNC the main stream never announced",
                });
            }
            s = self.changed.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
        Ok(())
    }
}

/// The running data channels of one migration.
pub struct Channels {
    shared: Arc<Shared>,
    threads: Vec<JoinHandle<Result<Stats, Error>>>,
}

impl std::fmt::Debug for Channels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channels")
            .field("channels", &self.threads.len())
            .finish_non_exhaustive()
    }
}

impl Channels {
    /// Starts one receiving thread per channel (index = channel id).
    pub fn start(transports: Vec<Box<dyn Transport>>) -> Self {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            pages: OnceLock::new(),
        });
        let threads = transports
            .into_iter()
            .enumerate()
            .map(|(id, t)| {
                let shared = Arc::clone(&shared);
                let id = u8::try_from(id).expect("at most 255 channels");
                std::thread::Builder::new()
                    .name(format!("multifd-{id}"))
                    .spawn(move || {
                        let r = receive(id, t, &shared);
                        let mut s = shared.lock();
                        s.ended.push(id);
                        let r = match r {
                            Err(e) if s.failed.is_none() => {
                                s.failed = Some(e);
                                Err(Error::Sync {
                                    channel: id,
                                    what: "failed (reported first)",
                                })
                            }
                            r => r,
                        };
                        shared.changed.notify_all();
                        r
                    })
                    .expect("spawn a multifd thread")
            })
            .collect();
        Self { shared, threads }
    }

    /// Hands the channels the RAM files, once the block list has arrived.
    pub fn set_pages(&self, pages: SharedPages) {
        let _ = self.shared.pages.set(pages);
    }

    /// A sync point of the main stream: returns once every channel has
    /// delivered its SYNC (and everything before it), and releases them.
    ///
    /// # Errors
    /// A channel's fault, or a channel that ended without its SYNC.
    pub fn sync(&self) -> Result<(), Error> {
        let n = self.threads.len();
        let mut s = self.shared.lock();
        loop {
            if let Some(e) = s.failed.take() {
                return Err(e);
            }
            if s.arrived == n {
                break;
            }
            if let Some(&channel) = s.ended.first() {
                return Err(Error::Sync {
                    channel,
                    what: "ended before the SYNC the main stream announced",
                });
            }
            s = self
                .shared
                .changed
                .wait(s)
                .unwrap_or_else(PoisonError::into_inner);
        }
        s.arrived = 0;
        s.generation += 1;
        self.shared.changed.notify_all();
        Ok(())
    }

    /// The first channel fault so far, taken.
    pub fn failure(&self) -> Option<Error> {
        self.shared.lock().failed.take()
    }

    /// The main stream ended: every channel must end too, at a packet
    /// boundary, with nothing after its last SYNC.
    ///
    /// # Errors
    /// The first channel fault.
    pub fn finish(self) -> Result<Stats, Error> {
        {
            let mut s = self.shared.lock();
            s.closing = true;
            self.shared.changed.notify_all();
        }
        let mut total = Stats::default();
        let mut first = None;
        for t in self.threads {
            match t.join().expect("a multifd thread does not panic") {
                Ok(s) => total.add(&s),
                Err(e) => {
                    first.get_or_insert(e);
                }
            }
        }
        if let Some(e) = self.shared.lock().failed.take() {
            return Err(e);
        }
        first.map_or(Ok(total), Err)
    }
}

/// One channel: packets until its end.
fn receive(channel: u8, mut t: Box<dyn Transport>, shared: &Shared) -> Result<Stats, Error> {
    let mut stats = Stats {
        bytes: INIT_LEN as u64,
        ..Stats::default()
    };
    let mut header = Box::new([0u8; HEADER_LEN]);
    let (mut payload, mut pages) = (Vec::new(), Vec::new());
    let mut decoder = ChannelDecoder::default();
    let mut since_sync = 0u64;
    // Per block, what this channel's pages add to the digest.
    let mut sums: Vec<PageDigest> = Vec::new();
    loop {
        let offset = stats.bytes;
        let io = |source| Error::Io {
            channel,
            offset,
            source,
        };
        match read_full(t.as_mut(), &mut header[..]).map_err(io)? {
            Some(0) if since_sync == 0 => {
                if let Some(ram) = shared.pages.get() {
                    ram.add_digests(&sums);
                }
                return Ok(stats);
            }
            Some(0) => {
                return Err(Error::Sync {
                    channel,
                    what: "sent pages after its last SYNC",
                })
            }
            Some(got) => {
                return Err(Error::Truncated {
                    channel,
                    offset: offset + got as u64,
                })
            }
            None => {}
        }
        let packet = |source| Error::Packet {
            channel,
            offset,
            source,
        };
        let h = PacketHeader::decode(&header, decoder.method()).map_err(packet)?;
        payload.resize(h.payload_len(), 0);
        if let Some(got) = read_full(t.as_mut(), &mut payload).map_err(io)? {
            return Err(Error::Truncated {
                channel,
                offset: offset + (HEADER_LEN + got) as u64,
            });
        }
        stats.bytes += (HEADER_LEN + payload.len()) as u64;
        let (method, normal) = decode(&mut decoder, &h, &payload, &mut pages).map_err(packet)?;
        if !h.offsets.is_empty() {
            write(channel, offset, &h, normal, shared, &mut sums)?;
            // Per packet: with auto, raw packets travel on a zstd channel.
            if method == Compression::None {
                stats.normal += u64::from(h.normal_pages);
            } else {
                stats.compressed += u64::from(h.normal_pages);
                stats.compressed_bytes += payload.len() as u64;
            }
            stats.zero += u64::from(h.zero_pages);
            since_sync += h.offsets.len() as u64;
        }
        if h.is_sync() {
            shared.arrive(channel)?;
            since_sync = 0;
        }
    }
}

/// The packet's normal pages and how they came: raw pages are written from
/// the payload as it came, a copy less; compressed ones are decoded into
/// `pages`.
fn decode<'a>(
    decoder: &mut ChannelDecoder,
    h: &PacketHeader,
    payload: &'a [u8],
    pages: &'a mut Vec<u8>,
) -> Result<(Compression, &'a [u8]), multifd::Error> {
    let len = h.normal_pages as usize * PAGE_SIZE;
    if h.normal_pages == 0 {
        return Ok((Compression::None, &[]));
    }
    let method = Compression::from_flags(h.flags)?;
    if method == Compression::None && payload.len() == len {
        return Ok((method, payload));
    }
    pages.resize(len, 0);
    decoder.decode(method, payload, pages)?;
    Ok((method, &pages[..]))
}

/// Writes one packet's pages to its block and adds them to the channel's
/// digest `sums`.
fn write(
    channel: u8,
    offset: u64,
    h: &PacketHeader,
    pages: &[u8],
    shared: &Shared,
    sums: &mut Vec<PageDigest>,
) -> Result<(), Error> {
    let block_error = |why| Error::Block {
        channel,
        offset,
        block: h.block.clone(),
        why,
    };
    let ram = shared
        .pages
        .get()
        .ok_or_else(|| block_error("came before the main stream's block list"))?;
    let block = ram
        .block(&h.block)
        .ok_or_else(|| block_error("is not in the main stream's block list"))?;
    let load = |source| Error::Load {
        channel,
        offset,
        source,
    };
    if sums.len() <= block {
        sums.resize(block + 1, PageDigest::default());
    }
    sums[block] += ram.write_pages(block, h.normal(), pages).map_err(load)?;
    sums[block] += ram.zero_pages(block, h.zero()).map_err(load)?;
    Ok(())
}
