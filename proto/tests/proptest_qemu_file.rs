//! Property tests of the QEMUFile primitives: whatever sequence of writes goes
//! through a `QemuFileWriter`, a `QemuFileReader` gives the same values back,
//! through whole reads or through a transport that returns short reads.

use std::io::{self, IoSlice};

use ferry_proto::compress::{self, MAX_COMPRESSED_PAGE};
use ferry_proto::qemu_file::{Compressed, Error, QemuFileReader, QemuFileWriter, IO_BUF_SIZE};
use ferry_proto::stream::PAGE_SIZE;
use ferry_proto::transport::{MemTransport, Transport};
use proptest::prelude::*;

/// One write operation and the data it writes.
#[derive(Debug, Clone)]
enum Op {
    Byte(u8),
    Be16(u16),
    Be32(u32),
    Be64(u64),
    Buffer(Vec<u8>),
    BufferAsync(Vec<u8>),
    Str(String),
    Compress {
        page: Vec<u8>,
        level: u32,
    },
    /// `ftell`, which flushes.
    Flush,
}

/// How the reader takes back one operation's bytes.
#[derive(Debug, Clone, Copy)]
enum ReadMode {
    /// The typed getter, `get_buffer` for buffers.
    Get,
    /// `get_buffer_in_place`.
    InPlace,
    /// `peek_buffer` (when it fits the buffer), then `skip`.
    PeekThenSkip,
    /// `skip` without looking.
    Skip,
}

fn text_page(seed: u64) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "kernel",
        "page",
        "migration",
        "the",
        "of",
        "dirty",
        "ram",
        "block",
        "qemu",
        "guest",
        "error",
        "ok",
        "vcpu",
        "iothread",
        "sched",
        "irq",
    ];
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(PAGE_SIZE + 32);
    while out.len() < PAGE_SIZE {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        match x % 7 {
            0 => out.extend_from_slice(format!("{} ", x % 100_000).as_bytes()),
            1 => out.push(b'\n'),
            _ => {
                out.extend_from_slice(WORDS[(x >> 8) as usize % WORDS.len()].as_bytes());
                out.push(b' ');
            }
        }
    }
    out.truncate(PAGE_SIZE);
    out
}

fn page_strategy() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        any::<u8>().prop_map(|b| vec![b; PAGE_SIZE]),
        any::<u64>().prop_map(text_page),
        proptest::collection::vec(any::<u8>(), PAGE_SIZE),
    ]
}

fn buffer_strategy() -> impl Strategy<Value = Vec<u8>> {
    // Mostly small buffers, some crossing the 32 KiB buffer, up to 100 KB.
    prop_oneof![
        4 => proptest::collection::vec(any::<u8>(), 0..64),
        2 => proptest::collection::vec(any::<u8>(), 0..5000),
        1 => (0usize..=100_000, any::<u8>())
            .prop_map(|(n, seed)| (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect()),
    ]
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => any::<u8>().prop_map(Op::Byte),
        2 => any::<u16>().prop_map(Op::Be16),
        2 => any::<u32>().prop_map(Op::Be32),
        2 => any::<u64>().prop_map(Op::Be64),
        3 => buffer_strategy().prop_map(Op::Buffer),
        2 => buffer_strategy().prop_map(Op::BufferAsync),
        2 => "[a-z0-9/._ é]{0,255}"
            .prop_map(|s: String| {
                // Keep at most 255 bytes (multi-byte characters make it longer).
                let mut s = s;
                while s.len() > 255 {
                    s.pop();
                }
                Op::Str(s)
            }),
        2 => (page_strategy(), prop_oneof![Just(1u32), Just(6), Just(9)])
            .prop_map(|(page, level)| Op::Compress { page, level }),
        1 => Just(Op::Flush),
    ]
}

fn read_mode_strategy() -> impl Strategy<Value = ReadMode> {
    prop_oneof![
        Just(ReadMode::Get),
        Just(ReadMode::InPlace),
        Just(ReadMode::PeekThenSkip),
        Just(ReadMode::Skip),
    ]
}

/// The zlib record `put_compression_data` writes for `page`, computed aside,
/// or `None` when the page does not shrink.
fn compressed_record(page: &[u8], level: u32) -> Option<Vec<u8>> {
    let mut out = vec![0u8; PAGE_SIZE - 1];
    let n = compress::deflate_into(&mut compress::compressor(level), page, &mut out)?;
    let mut rec = (n as u32).to_be_bytes().to_vec();
    rec.extend_from_slice(&out[..n]);
    Some(rec)
}

/// The bytes each operation must put on the wire.
fn expected_bytes(op: &Op) -> Vec<u8> {
    match op {
        Op::Byte(v) => vec![*v],
        Op::Be16(v) => v.to_be_bytes().to_vec(),
        Op::Be32(v) => v.to_be_bytes().to_vec(),
        Op::Be64(v) => v.to_be_bytes().to_vec(),
        Op::Buffer(b) | Op::BufferAsync(b) => b.clone(),
        Op::Str(s) => {
            let mut v = vec![s.len() as u8];
            v.extend_from_slice(s.as_bytes());
            v
        }
        Op::Compress { page, level } => compressed_record(page, *level).unwrap_or_default(),
        Op::Flush => Vec::new(),
    }
}

/// Writes `ops`, checking the byte accounting after each one; returns the stream.
fn write_ops(ops: &[Op]) -> Vec<u8> {
    let mut f = QemuFileWriter::new(MemTransport::new());
    let mut compressors: Vec<_> = (0..=9).map(compress::compressor).collect();
    let mut total = 0u64;
    for op in ops {
        match op {
            Op::Byte(v) => f.put_byte(*v),
            Op::Be16(v) => f.put_be16(*v),
            Op::Be32(v) => f.put_be32(*v),
            Op::Be64(v) => f.put_be64(*v),
            Op::Buffer(b) => f.put_buffer(b),
            Op::BufferAsync(b) => f.put_buffer_async(b),
            Op::Str(s) => f.put_counted_string(s).unwrap(),
            Op::Compress { page, level } => {
                let got = f
                    .put_compression_data(&mut compressors[*level as usize], page)
                    .unwrap();
                match compressed_record(page, *level) {
                    Some(rec) => {
                        assert_eq!(got, Compressed::Written(rec.len()));
                        assert!(rec.len() - 4 < PAGE_SIZE);
                    }
                    None => assert_eq!(got, Compressed::NotSmaller),
                }
            }
            Op::Flush => {
                assert_eq!(f.ftell(), total);
                // Everything gathered went through: only whole flushes reach memory.
                assert_eq!(f.transport().bytes().len() as u64, total);
            }
        }
        total += expected_bytes(op).len() as u64;
        assert_eq!(f.ftell_fast(), total, "ftell_fast after {op:?}");
        assert!(f.error().is_none());
    }
    assert_eq!(f.bytes_xfer(), total);
    assert_eq!(f.ftell(), total);
    let out = f.into_transport().unwrap().take();
    assert_eq!(out.len() as u64, total);
    out
}

/// A read-only transport that hands out at most `sizes[i]` bytes on its i-th
/// read (cycling), like a socket delivering a stream in dribbles.
struct ShortReads {
    data: Vec<u8>,
    pos: usize,
    sizes: Vec<usize>,
    calls: usize,
}

impl Transport for ShortReads {
    fn writev(&mut self, _bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        Err(io::ErrorKind::Unsupported.into())
    }
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let limit = self.sizes[self.calls % self.sizes.len()];
        self.calls += 1;
        let n = limit.min(buf.len()).min(self.data.len() - self.pos);
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Reads `ops` back from `r`, which must hold exactly `stream`.
fn read_ops<T: Transport>(
    r: &mut QemuFileReader<T>,
    stream: &[u8],
    ops: &[Op],
    modes: &[ReadMode],
    peeks: &[(usize, usize)],
) {
    let mut pos = 0usize;
    for (i, op) in ops.iter().enumerate() {
        let want = expected_bytes(op);
        let mode = modes[i % modes.len()];
        assert_eq!(r.offset(), pos as u64);

        // A peek anywhere ahead that fits the buffer sees the stream's bytes.
        let (a, b) = peeks[i % peeks.len()];
        let rest = stream.len() - pos;
        if rest > 0 {
            let off = a % rest.min(IO_BUF_SIZE);
            let size = b % (rest.min(IO_BUF_SIZE) - off + 1);
            let seen = r.peek_buffer(size, off).unwrap();
            assert_eq!(seen, &stream[pos + off..pos + off + size]);
        }

        match (op, mode) {
            (Op::Flush, _) => {}
            (_, ReadMode::Skip) => r.skip(want.len() as u64).unwrap(),
            (_, ReadMode::PeekThenSkip) if want.len() <= IO_BUF_SIZE => {
                assert_eq!(r.peek_buffer(want.len(), 0).unwrap(), &want[..]);
                r.skip(want.len() as u64).unwrap();
            }
            (Op::Byte(v), _) => assert_eq!(r.get_byte().unwrap(), *v),
            (Op::Be16(v), _) => assert_eq!(r.get_be16().unwrap(), *v),
            (Op::Be32(v), _) => assert_eq!(r.get_be32().unwrap(), *v),
            (Op::Be64(v), _) => assert_eq!(r.get_be64().unwrap(), *v),
            (Op::Str(s), _) => assert_eq!(&r.get_counted_string().unwrap(), s),
            (Op::Compress { page, .. }, _) if !want.is_empty() => {
                let len = r.get_be32().unwrap() as usize;
                assert!(len <= MAX_COMPRESSED_PAGE);
                let mut scratch = vec![0u8; len];
                let zlib = match mode {
                    ReadMode::InPlace => r.get_buffer_in_place(&mut scratch).unwrap(),
                    _ => {
                        r.get_buffer(&mut scratch).unwrap();
                        &scratch[..]
                    }
                };
                let mut back = [0u8; PAGE_SIZE];
                compress::inflate_page(&mut compress::decompressor(), zlib, &mut back).unwrap();
                assert_eq!(&back[..], &page[..]);
            }
            (Op::Compress { .. }, _) => {}
            (Op::Buffer(_) | Op::BufferAsync(_), ReadMode::InPlace) => {
                let mut scratch = vec![0u8; want.len()];
                assert_eq!(r.get_buffer_in_place(&mut scratch).unwrap(), &want[..]);
            }
            (Op::Buffer(_) | Op::BufferAsync(_), _) => {
                let mut got = vec![0u8; want.len()];
                r.get_buffer(&mut got).unwrap();
                assert_eq!(got, want);
            }
        }
        pos += want.len();
        assert_eq!(
            r.offset(),
            pos as u64,
            "offset after {op:?} read as {mode:?}"
        );
    }
    assert_eq!(pos, stream.len());
    assert!(r.at_end().unwrap());
    // Reading past the end is an error naming the end, and it stays latched.
    assert!(matches!(r.get_byte(), Err(Error::Eof { offset }) if offset == pos as u64));
    assert!(matches!(r.skip(0), Err(Error::Eof { .. })));
    assert!(matches!(r.peek_buffer(0, 0), Err(Error::Eof { .. })));
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn operations_round_trip(
        ops in proptest::collection::vec(op_strategy(), 0..40),
        modes in proptest::collection::vec(read_mode_strategy(), 1..16),
        peeks in proptest::collection::vec((any::<usize>(), any::<usize>()), 1..8),
        sizes in proptest::collection::vec(1usize..=9000, 1..12),
    ) {
        let stream = write_ops(&ops);
        let expected: Vec<u8> = ops.iter().flat_map(expected_bytes).collect();
        prop_assert_eq!(&stream, &expected);

        let mut whole = QemuFileReader::new(MemTransport::from_bytes(stream.clone()));
        read_ops(&mut whole, &stream, &ops, &modes, &peeks);

        let mut dribble = QemuFileReader::new(ShortReads {
            data: stream.clone(),
            pos: 0,
            sizes,
            calls: 0,
        });
        read_ops(&mut dribble, &stream, &ops, &modes, &peeks);
    }

    /// One-byte reads are the hardest case for the refill logic.
    #[test]
    fn one_byte_reads_give_the_same_values(
        ops in proptest::collection::vec(op_strategy(), 0..12),
        modes in proptest::collection::vec(read_mode_strategy(), 1..8),
    ) {
        let stream = write_ops(&ops);
        let mut r = QemuFileReader::new(ShortReads { data: stream.clone(), pos: 0, sizes: vec![1], calls: 0 });
        read_ops(&mut r, &stream, &ops, &modes, &[(0, 0)]);
    }

    /// A truncated stream reads back up to the cut and then fails with Eof
    /// at exactly the cut, whichever getter hits it.
    #[test]
    fn truncation_is_eof_at_the_cut(
        ops in proptest::collection::vec(op_strategy(), 1..20),
        cut in any::<proptest::sample::Index>(),
        sizes in proptest::collection::vec(1usize..=5000, 1..6),
    ) {
        let stream = write_ops(&ops);
        prop_assume!(!stream.is_empty());
        let cut = cut.index(stream.len());
        let mut r = QemuFileReader::new(ShortReads {
            data: stream[..cut].to_vec(), pos: 0, sizes, calls: 0,
        });
        let mut got = vec![0u8; stream.len()];
        let err = r.get_buffer(&mut got).unwrap_err();
        prop_assert!(matches!(err, Error::Eof { offset } if offset == cut as u64), "{err:?}");
        // The bytes before the cut were all delivered before the error.
        prop_assert_eq!(&got[..cut], &stream[..cut]);
    }
}

#[test]
fn peek_past_the_buffer_is_a_typed_error() {
    let mut r = QemuFileReader::new(MemTransport::from_bytes(vec![0; 3 * IO_BUF_SIZE]));
    assert!(matches!(
        r.peek_buffer(IO_BUF_SIZE, 1),
        Err(Error::PeekTooLarge { size, offset: 1 }) if size == IO_BUF_SIZE
    ));
    assert!(matches!(
        r.peek_buffer(1, usize::MAX),
        Err(Error::PeekTooLarge { .. })
    ));
    // A peek error is not latched: the whole buffer can still be peeked.
    assert_eq!(r.peek_buffer(IO_BUF_SIZE, 0).unwrap().len(), IO_BUF_SIZE);
}
