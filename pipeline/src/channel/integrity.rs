//! Integrity checkpoints for ferry-to-ferry streams (`ferry send --integrity`).
//!
//! The sender hashes every stream byte it hands to the transport
//! ([`WriteTap`]) and, at chosen points, writes a
//! [`ferry_proto::stream::integrity`] checkpoint: the XXH3-128 of the bytes
//! since the previous checkpoint's first byte. It writes one right after the
//! configuration section (covering the file header), one after every chunk of
//! pages (about 1 MiB raw, 256 pages), and one just before EOF, so every byte
//! but the final EOF marker is covered. Pages are copied into the stream buffer
//! before they are hashed, so a guest writing a page while it is sent cannot
//! make the hash disagree with the bytes on the wire.
//!
//! The receiver ([`ReadTap`] and [`Verifier`]) keeps the bytes it has read
//! but not yet hashed, and hashes them up to the offset the parser reached
//! before each item, so a checkpoint's header offset is an exact boundary
//! however far the reader buffered ahead. It detects the mode by itself: a
//! stream whose first section is a checkpoint is checked to the end (every
//! checkpoint in sequence, the last one right before EOF); any other stream
//! is not, and the tap stops copying.

use std::io::{self, IoSlice};
use std::sync::{Arc, Mutex, MutexGuard};

use ferry_proto::stream::integrity::{self, Checkpoint};
use ferry_proto::stream::parse::SectionHeader;
use ferry_proto::stream::SectionKind;
use ferry_proto::transport::Transport;
use xxhash_rust::xxh3::Xxh3;

/// The calls a tap hands to the transport it wraps unchanged: a tap only
/// watches the bytes that go one way.
macro_rules! pass_through {
    () => {
        fn shutdown(&mut self) -> io::Result<()> {
            self.inner.shutdown()
        }
        fn shutdown_write(&mut self) -> io::Result<()> {
            self.inner.shutdown_write()
        }
        fn set_blocking(&mut self, blocking: bool) -> io::Result<()> {
            self.inner.set_blocking(blocking)
        }
        fn return_path(&mut self) -> Option<Box<dyn Transport>> {
            self.inner.return_path()
        }
        fn close(&mut self) -> io::Result<()> {
            self.inner.close()
        }
    };
}

/// An integrity failure: the stream is not what the sender wrote.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A checkpoint's hash or length disagrees with the bytes received.
    #[error("integrity check failed at checkpoint {seq} (byte {end}): stream bytes {start}..{end} ({len} bytes) do not match the sender's checksum; the stream was altered in transit or on disk")]
    Mismatch {
        /// The checkpoint.
        seq: u64,
        /// First byte it covers.
        start: u64,
        /// Its own offset: the end of what it covers.
        end: u64,
        /// Bytes received in that range.
        len: u64,
    },
    /// A checkpoint out of order (one was lost or repeated).
    #[error(
        "integrity checkpoint at byte {offset} has sequence number {found}, expected {expected}"
    )]
    Sequence {
        /// Its offset.
        offset: u64,
        /// The sequence number it should have.
        expected: u64,
        /// The one it has.
        found: u64,
    },
    /// A checkpoint that is not a well-formed version-1 FULL section.
    #[error("integrity checkpoint at byte {offset} is malformed: {what}")]
    Malformed {
        /// Its offset.
        offset: u64,
        /// What is wrong.
        what: &'static str,
    },
    /// A checkpoint in a stream that did not start with one.
    #[error("integrity checkpoint at byte {offset} in a stream whose first checkpoint is missing")]
    Unexpected {
        /// Its offset.
        offset: u64,
    },
    /// Bytes between the last checkpoint and EOF.
    #[error("stream bytes {start}..{end} before EOF are not covered by an integrity checkpoint")]
    Unsealed {
        /// First byte not covered.
        start: u64,
        /// The EOF marker's offset.
        end: u64,
    },
    /// The tap had fewer bytes than the parser consumed (a bug).
    #[error("integrity: byte {offset} was parsed but never read")]
    Internal {
        /// The offset asked for.
        offset: u64,
    },
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The hash of the bytes written since the last checkpoint.
#[derive(Default)]
struct Running {
    hasher: Xxh3,
    len: u64,
}

/// A transport that hashes every byte it writes, for [`Sealer`].
pub struct WriteTap<T> {
    inner: T,
    running: Arc<Mutex<Running>>,
}

impl<T> std::fmt::Debug for WriteTap<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteTap").finish_non_exhaustive()
    }
}

/// Makes the checkpoints of what a [`WriteTap`] wrote.
pub struct Sealer {
    running: Arc<Mutex<Running>>,
    seq: u64,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

impl<T: Transport> WriteTap<T> {
    /// Wraps `inner`; the sealer makes checkpoints of what went through it.
    pub fn new(inner: T) -> (Self, Sealer) {
        let running = Arc::new(Mutex::new(Running::default()));
        (
            Self {
                inner,
                running: running.clone(),
            },
            Sealer { running, seq: 0 },
        )
    }
}

impl Sealer {
    /// The checkpoint of everything written since the previous one. Call it
    /// right after a flush, so that nothing is still buffered above the tap.
    pub fn seal(&mut self) -> Checkpoint {
        let mut r = lock(&self.running);
        let c = Checkpoint {
            seq: self.seq,
            covered: r.len,
            digest: r.hasher.digest128(),
        };
        r.hasher.reset();
        r.len = 0;
        self.seq += 1;
        c
    }

    /// Checkpoints made so far.
    pub fn count(&self) -> u64 {
        self.seq
    }
}

impl<T: Transport> Transport for WriteTap<T> {
    fn writev(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let n = self.inner.writev(bufs)?;
        // Hash what was written, which is what the peer will read.
        let mut r = lock(&self.running);
        let mut left = n;
        for b in bufs {
            let take = left.min(b.len());
            r.hasher.update(&b[..take]);
            left -= take;
            if left == 0 {
                break;
            }
        }
        r.len += n as u64;
        Ok(n)
    }
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf)
    }
    pass_through!();
}

/// Bytes read and not yet hashed.
struct Backlog {
    /// Still copying reads (until the stream proves to have no checkpoints).
    on: bool,
    bytes: Vec<u8>,
    /// Index in `bytes` of the first byte not hashed.
    pos: usize,
    /// Stream offset of `bytes[pos]`.
    offset: u64,
    hasher: Xxh3,
}

impl Backlog {
    /// Hashes the bytes up to stream offset `to`.
    fn advance(&mut self, to: u64) -> Result<(), Error> {
        let n = usize::try_from(to.saturating_sub(self.offset)).unwrap_or(usize::MAX);
        if n > self.bytes.len() - self.pos {
            return Err(Error::Internal { offset: to });
        }
        self.hasher.update(&self.bytes[self.pos..self.pos + n]);
        self.pos += n;
        self.offset += n as u64;
        if self.pos == self.bytes.len() {
            self.bytes.clear();
            self.pos = 0;
        } else if self.pos > 1 << 20 {
            self.bytes.drain(..self.pos);
            self.pos = 0;
        }
        Ok(())
    }
}

/// A transport that keeps what it reads for a [`Verifier`].
pub struct ReadTap<T> {
    inner: T,
    backlog: Arc<Mutex<Backlog>>,
}

impl<T> std::fmt::Debug for ReadTap<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadTap").finish_non_exhaustive()
    }
}

impl<T: Transport> ReadTap<T> {
    /// Wraps `inner`; the verifier checks the checkpoints against what was read.
    pub fn new(inner: T) -> (Self, Verifier) {
        let backlog = Arc::new(Mutex::new(Backlog {
            on: true,
            bytes: Vec::new(),
            pos: 0,
            offset: 0,
            hasher: Xxh3::new(),
        }));
        (
            Self {
                inner,
                backlog: backlog.clone(),
            },
            Verifier {
                backlog,
                mode: Mode::Detect,
            },
        )
    }
}

impl<T: Transport> Transport for ReadTap<T> {
    fn writev(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.inner.writev(bufs)
    }
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let mut b = lock(&self.backlog);
        if b.on {
            b.bytes.extend_from_slice(&buf[..n]);
        }
        Ok(n)
    }
    pass_through!();
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Before the first section: is it a checkpoint?
    Detect,
    /// The stream has no checkpoints.
    Off,
    /// Checking.
    On {
        /// Sequence number of the next checkpoint.
        next: u64,
        /// Offset of the last checkpoint: where the next one's coverage starts.
        from: u64,
        /// The checkpoint whose body comes next: its offset and what the
        /// received bytes hash to.
        open: Option<(u64, Checkpoint)>,
        /// Offset just past the last checkpoint's footer.
        sealed_to: u64,
    },
}

/// Checks a stream's checkpoints against the bytes a [`ReadTap`] read. Feed
/// it the parser's items in order: [`Verifier::before_item`] with the offset
/// before each `Parser::next`, then the matching `on_*` call.
pub struct Verifier {
    backlog: Arc<Mutex<Backlog>>,
    mode: Mode,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// Checkpoints verified so far, if the stream has them.
    pub fn verified(&self) -> Option<u64> {
        match self.mode {
            Mode::On { next, .. } => Some(next),
            _ => None,
        }
    }

    /// Hashes what the parser consumed up to `at`, the offset before the next item.
    pub fn before_item(&mut self, at: u64) -> Result<(), Error> {
        if self.mode == Mode::Off {
            return Ok(());
        }
        lock(&self.backlog).advance(at)
    }

    fn off(&mut self) {
        self.mode = Mode::Off;
        let mut b = lock(&self.backlog);
        b.on = false;
        b.bytes = Vec::new();
        b.pos = 0;
    }

    /// A section header at offset `at`; true if it is a checkpoint (its body
    /// goes to [`Verifier::on_body`]).
    pub fn on_section(&mut self, h: &SectionHeader, at: u64) -> Result<bool, Error> {
        let is_checkpoint = h.idstr == integrity::IDSTR;
        if self.mode == Mode::Detect {
            if !is_checkpoint {
                self.off();
                return Ok(false);
            }
            self.mode = Mode::On {
                next: 0,
                from: 0,
                open: None,
                sealed_to: 0,
            };
        }
        let Mode::On { from, open, .. } = &mut self.mode else {
            return match is_checkpoint {
                true => Err(Error::Unexpected { offset: at }),
                false => Ok(false),
            };
        };
        if !is_checkpoint {
            return Ok(false);
        }
        if h.kind != SectionKind::Full {
            return Err(Error::Malformed {
                offset: at,
                what: "not a FULL section",
            });
        }
        if h.version != integrity::VERSION || h.instance != 0 {
            return Err(Error::Malformed {
                offset: at,
                what: "unknown version or instance",
            });
        }
        let mut b = lock(&self.backlog);
        let got = Checkpoint {
            seq: 0, // compared separately
            covered: at - *from,
            digest: b.hasher.digest128(),
        };
        b.hasher.reset();
        *open = Some((at, got));
        *from = at;
        Ok(true)
    }

    /// The body of the checkpoint just announced by `on_section`.
    pub fn on_body(&mut self, body: &[u8]) -> Result<(), Error> {
        let Mode::On { next, open, .. } = &mut self.mode else {
            return Ok(());
        };
        let Some((at, got)) = open.take() else {
            return Ok(());
        };
        let sent = Checkpoint::decode(body).ok_or(Error::Malformed {
            offset: at,
            what: "body is not 32 bytes",
        })?;
        if sent.seq != *next {
            return Err(Error::Sequence {
                offset: at,
                expected: *next,
                found: sent.seq,
            });
        }
        if sent.covered != got.covered || sent.digest != got.digest {
            return Err(Error::Mismatch {
                seq: sent.seq,
                start: at - got.covered,
                end: at,
                len: got.covered,
            });
        }
        *next += 1;
        Ok(())
    }

    /// A section footer ending at `end`.
    pub fn on_footer(&mut self, id_is_checkpoint: bool, end: u64) {
        if let Mode::On { sealed_to, .. } = &mut self.mode {
            if id_is_checkpoint {
                *sealed_to = end;
            }
        }
    }

    /// The EOF marker at offset `at`: the last checkpoint must end right there.
    pub fn on_eof(&mut self, at: u64) -> Result<(), Error> {
        match self.mode {
            Mode::Detect => {
                self.off();
                Ok(())
            }
            Mode::On { sealed_to, .. } if sealed_to != at => Err(Error::Unsealed {
                start: sealed_to,
                end: at,
            }),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::qemu_file::{QemuFileReader, QemuFileWriter};
    use ferry_proto::stream::encode;
    use ferry_proto::stream::parse::{Item, Parser};
    use ferry_proto::transport::MemTransport;

    /// A stream: header, configuration, checkpoints between device sections.
    fn stream(sections: usize) -> Vec<u8> {
        let (tap, mut sealer) = WriteTap::new(MemTransport::new());
        let mut f = QemuFileWriter::new(tap);
        encode::put_file_header(&mut f);
        encode::put_configuration(&mut f, "none");
        for i in 0..sections {
            f.flush();
            sealer.seal().put(&mut f, 100).unwrap();
            encode::put_section_start(&mut f, SectionKind::Full, 1, "dev", i as u32, 1).unwrap();
            f.put_buffer(&[i as u8; 3000]);
            encode::put_footer(&mut f, 1);
        }
        f.flush();
        sealer.seal().put(&mut f, 100).unwrap();
        encode::put_eof(&mut f);
        f.into_transport().unwrap().inner.take()
    }

    fn check(bytes: Vec<u8>) -> Result<Option<u64>, String> {
        let (tap, mut v) = ReadTap::new(MemTransport::from_bytes(bytes));
        // The "dev" sections are sized as a vmdesc would size them.
        let mut sizes: std::collections::HashMap<_, _> =
            [((integrity::IDSTR.to_owned(), 0), integrity::BODY_LEN as u64)].into();
        sizes.extend((0..8).map(|i| (("dev".to_owned(), i), 3000)));
        let mut p = Parser::new(QemuFileReader::new(tap)).with_device_sizes(sizes);
        let mut in_checkpoint = false;
        loop {
            let at = p.offset();
            v.before_item(at).map_err(|e| e.to_string())?;
            match p.next().map_err(|e| e.to_string())? {
                Item::Section(h) => {
                    in_checkpoint = v.on_section(&h, at).map_err(|e| e.to_string())?
                }
                Item::DeviceState(b) if in_checkpoint => v.on_body(b).map_err(|e| e.to_string())?,
                Item::Footer { end, .. } => v.on_footer(in_checkpoint, end),
                Item::Eof => v.on_eof(at).map_err(|e| e.to_string())?,
                Item::End => return Ok(v.verified()),
                _ => {}
            }
        }
    }

    #[test]
    fn checkpoints_verify_and_every_flipped_byte_is_caught() {
        let good = stream(3);
        assert_eq!(check(good.clone()), Ok(Some(4)));
        // Every byte but the EOF marker is covered: a flip either fails the
        // parse or a checkpoint, never passes.
        for i in 0..good.len() - 1 {
            let mut bad = good.clone();
            bad[i] ^= 0x10;
            match check(bad) {
                Err(_) => {}
                // A first section that no longer names the checkpoint makes
                // an unsealed stream whose device state (no vmdesc sizes
                // it) is carried whole; the reader then finds no RAM in it.
                Ok(None) if (17..17 + 5 + 1 + integrity::IDSTR.len()).contains(&i) => {}
                other => panic!("flip at {i} of {}: {other:?}", good.len()),
            }
        }
        let mut bad = good.clone();
        bad[2000] ^= 1;
        let e = check(bad).unwrap_err();
        assert!(e.contains("integrity check failed at checkpoint 1"), "{e}");
    }

    #[test]
    fn a_stream_without_checkpoints_is_not_checked() {
        let mut f = QemuFileWriter::new(MemTransport::new());
        encode::put_file_header(&mut f);
        encode::put_configuration(&mut f, "none");
        encode::put_section_start(&mut f, SectionKind::Full, 1, "dev", 0, 1).unwrap();
        f.put_buffer(&[1; 3000]);
        encode::put_footer(&mut f, 1);
        encode::put_eof(&mut f);
        let bytes = f.into_transport().unwrap().take();
        assert_eq!(check(bytes), Ok(None));
    }

    #[test]
    fn a_missing_last_checkpoint_is_caught() {
        let good = stream(2);
        // Cut the last checkpoint out: the device section before it is unsealed.
        let cut = good.len() - 1 - integrity::SECTION_LEN;
        let bad = [&good[..cut], &good[good.len() - 1..]].concat();
        let e = check(bad).unwrap_err();
        assert!(e.contains("not covered by an integrity checkpoint"), "{e}");
    }
}
