//! Behaviour of the QEMUFile over in-memory and failing transports.

use std::io::{self, IoSlice};

use super::*;
use crate::compress;
use crate::transport::{MemTransport, Transport};

/// A transport that accepts `budget` bytes and then writes short or fails.
struct Limited {
    budget: usize,
    fail: bool,
    out: Vec<u8>,
}

impl Transport for Limited {
    fn writev(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        let mut n = 0;
        for b in bufs {
            let take = b.len().min(self.budget);
            self.out.extend_from_slice(&b[..take]);
            self.budget -= take;
            n += take;
        }
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if n < total && self.fail {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "peer gone"));
        }
        Ok(n)
    }
    fn read(&mut self, _buf: &mut [u8]) -> io::Result<usize> {
        Ok(0)
    }
}

fn written(f: QemuFileWriter<'_, MemTransport>) -> Vec<u8> {
    f.into_transport().unwrap().take()
}

#[test]
fn primitives_are_big_endian() {
    let mut f = QemuFileWriter::new(MemTransport::new());
    f.put_byte(0xab);
    f.put_be16(0x0102);
    f.put_be32(0x0304_0506);
    f.put_be64(0x0708_090a_0b0c_0d0e);
    f.put_counted_string("ram").unwrap();
    assert_eq!(
        written(f),
        [0xab, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 3, b'r', b'a', b'm']
    );
}

#[test]
fn counted_string_of_256_bytes_is_a_typed_error() {
    let mut f = QemuFileWriter::new(MemTransport::new());
    let long = "x".repeat(256);
    assert!(matches!(
        f.put_counted_string(&long),
        Err(Error::StringTooLong { len: 256 })
    ));
    f.put_counted_string(&"y".repeat(255)).unwrap();
    assert_eq!(written(f).len(), 256);
}

#[test]
fn adjacent_buffer_writes_share_one_iovec() {
    let mut f = QemuFileWriter::new(MemTransport::new());
    for i in 0..1000u32 {
        f.put_be32(i);
    }
    // 4000 bytes through put_be32 coalesce into one entry: nothing flushed yet.
    assert_eq!(f.ftell_fast(), 4000);
    assert_eq!(f.transport().bytes().len(), 0);
    assert_eq!(f.ftell(), 4000);
    assert_eq!(f.transport().bytes().len(), 4000);
}

#[test]
fn sixty_four_async_buffers_force_a_flush() {
    let pages: Vec<[u8; 16]> = (0..64u8).map(|i| [i; 16]).collect();
    let mut f = QemuFileWriter::new(MemTransport::new());
    for p in &pages[..63] {
        f.put_buffer_async(p);
    }
    assert_eq!(f.transport().bytes().len(), 0, "63 entries stay gathered");
    f.put_buffer_async(&pages[63]);
    assert_eq!(
        f.transport().bytes().len(),
        64 * 16,
        "the 64th entry flushes"
    );
}

#[test]
fn full_buffer_flushes_and_ftell_counts_everything() {
    let data: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
    let mut f = QemuFileWriter::new(MemTransport::new());
    f.put_buffer(&data);
    assert!(f.transport().bytes().len() >= IO_BUF_SIZE);
    assert_eq!(f.ftell_fast(), data.len() as u64);
    assert_eq!(written(f), data);
}

#[test]
fn short_write_latches_and_later_puts_do_nothing() {
    let mut f = QemuFileWriter::new(Limited {
        budget: 10,
        fail: false,
        out: Vec::new(),
    });
    f.put_buffer(&[1; 20]);
    f.flush();
    let first = f.error().cloned().expect("short write latched");
    assert!(matches!(
        first,
        Error::ShortWrite {
            written: 10,
            expected: 20,
            ..
        }
    ));
    f.put_buffer(&[2; 20]);
    f.flush();
    assert_eq!(
        f.transport().out.len(),
        10,
        "puts after an error are dropped"
    );
    assert!(matches!(f.close(), Err(Error::ShortWrite { .. })));
}

#[test]
fn first_error_wins() {
    let mut f = QemuFileWriter::new(Limited {
        budget: 0,
        fail: true,
        out: Vec::new(),
    });
    f.put_byte(1);
    f.flush();
    f.set_error(Error::Eof { offset: 99 });
    assert!(matches!(f.close(), Err(Error::Io { offset: 0, .. })));
}

#[test]
fn rate_limit_counts_bytes_per_window() {
    let mut f = QemuFileWriter::new(MemTransport::new());
    f.set_rate_limit(100);
    f.put_buffer(&[0; 100]);
    assert!(!f.rate_limit_exceeded());
    f.put_byte(0);
    assert!(f.rate_limit_exceeded());
    f.reset_rate_limit();
    assert!(!f.rate_limit_exceeded());
    f.set_rate_limit(0);
    f.put_buffer(&[0; 1000]);
    assert!(!f.rate_limit_exceeded(), "0 is unlimited");
}

#[test]
fn compression_data_round_trips_and_incompressible_pages_are_refused() {
    let text: Vec<u8> = b"migration ".iter().copied().cycle().take(4096).collect();
    let mut c = compress::compressor(1);
    let mut f = QemuFileWriter::new(MemTransport::new());
    let Compressed::Written(n) = f.put_compression_data(&mut c, &text).unwrap() else {
        panic!("text compresses");
    };
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let random: Vec<u8> = (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    assert_eq!(
        f.put_compression_data(&mut c, &random).unwrap(),
        Compressed::NotSmaller
    );
    let bytes = written(f);
    assert_eq!(bytes.len(), n, "nothing was written for the random page");
    let len = u32::from_be_bytes(bytes[..4].try_into().unwrap()) as usize;
    assert_eq!(len + 4, n);
    let mut page = [0u8; 4096];
    compress::inflate_page(&mut compress::decompressor(), &bytes[4..], &mut page).unwrap();
    assert_eq!(&page[..], &text[..]);
}

#[test]
fn compressed_records_survive_many_puts_without_reordering() {
    // Enough records to cross buffer and iovec boundaries many times.
    let pages: Vec<Vec<u8>> = (0..200u32)
        .map(|i| {
            format!("page {i} ")
                .into_bytes()
                .into_iter()
                .cycle()
                .take(4096)
                .collect()
        })
        .collect();
    let mut c = compress::compressor(1);
    let mut f = QemuFileWriter::new(MemTransport::new());
    for (i, p) in pages.iter().enumerate() {
        f.put_be32(i as u32);
        f.put_buffer_async(&p[..7]);
        assert!(f
            .put_compressed_record(&[0xee], &mut c, p)
            .unwrap()
            .is_some());
    }
    let bytes = written(f);
    let mut r = QemuFileReader::new(MemTransport::from_bytes(bytes));
    let mut d = compress::decompressor();
    for (i, p) in pages.iter().enumerate() {
        assert_eq!(r.get_be32().unwrap(), i as u32);
        let mut head = [0u8; 7];
        r.get_buffer(&mut head).unwrap();
        assert_eq!(&head, &p[..7]);
        assert_eq!(r.get_byte().unwrap(), 0xee);
        let len = r.get_be32().unwrap() as usize;
        let mut z = vec![0u8; len];
        r.get_buffer(&mut z).unwrap();
        let mut page = [0u8; 4096];
        compress::inflate_page(&mut d, &z, &mut page).unwrap();
        assert_eq!(&page[..], &p[..]);
    }
    assert!(r.at_end().unwrap());
}

#[test]
fn put_qemu_file_moves_and_resets_the_private_buffer() {
    let mut private = QemuFileWriter::new(MemTransport::new());
    private.put_buffer(&[7; 40_000]);
    private.put_be32(1);
    let mut main = QemuFileWriter::new(MemTransport::new());
    main.put_byte(9);
    assert_eq!(main.put_qemu_file(&mut private).unwrap(), 40_004);
    assert_eq!(private.ftell_fast(), 40_004, "position keeps counting");
    assert_eq!(private.transport().bytes().len(), 0);
    assert_eq!(main.put_qemu_file(&mut private).unwrap(), 0);
    let bytes = written(main);
    assert_eq!(bytes.len(), 40_005);
    assert_eq!(bytes[0], 9);
    assert_eq!(&bytes[40_001..], &[0, 0, 0, 1]);
}

#[test]
fn released_pages_are_sent_then_dropped() {
    let page = 4096;
    let mut map = memmap2::MmapMut::map_anon(page * 3).unwrap();
    map.fill(0x5a);
    {
        let mut f = QemuFileWriter::new(MemTransport::new());
        let (a, rest) = map.split_at_mut(page);
        let (b, _) = rest.split_at_mut(page);
        f.put_buffer_async_release(a);
        f.put_buffer_async_release(b);
        let sent = written(f);
        assert_eq!(sent, vec![0x5a; 2 * page]);
    }
    // Private anonymous memory reads back as zero after MADV_DONTNEED.
    assert!(map[..2 * page].iter().all(|&b| b == 0));
    assert!(map[2 * page..].iter().all(|&b| b == 0x5a));
}

#[test]
fn reader_reports_eof_with_offset_and_latches_it() {
    let mut r = QemuFileReader::new(MemTransport::from_bytes(vec![0, 0, 0, 5, 1, 2]));
    assert_eq!(r.get_be32().unwrap(), 5);
    assert!(matches!(r.get_be32(), Err(Error::Eof { offset: 6 })));
    assert!(matches!(r.get_byte(), Err(Error::Eof { offset: 6 })));
    assert!(r.close().is_err());
}

#[test]
fn reader_peeks_skips_and_reads_in_place() {
    let data: Vec<u8> = (0..80_000u32).map(|i| (i % 251) as u8).collect();
    let mut r = QemuFileReader::new(MemTransport::from_bytes(data.clone()));
    assert_eq!(r.peek_byte(10).unwrap(), 10);
    assert_eq!(r.peek_buffer(3, 1).unwrap(), &[1, 2, 3]);
    r.skip(40_000).unwrap();
    assert_eq!(r.offset(), 40_000);
    let mut scratch = vec![0u8; 4096];
    let page = r.get_buffer_in_place(&mut scratch).unwrap().to_vec();
    assert_eq!(page, &data[40_000..44_096]);
    let mut big = vec![0u8; IO_BUF_SIZE];
    let got = r.get_buffer_in_place(&mut big).unwrap().to_vec();
    assert_eq!(got, &data[44_096..44_096 + IO_BUF_SIZE]);
    assert!(matches!(
        r.peek_buffer(IO_BUF_SIZE, 1),
        Err(Error::PeekTooLarge { .. })
    ));
}

/// A reader that hands out one byte per call, like a slow socket.
struct Trickle(Vec<u8>, usize);

impl Transport for Trickle {
    fn writev(&mut self, _bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        Ok(0)
    }
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.1 == self.0.len() || buf.is_empty() {
            return Ok(0);
        }
        buf[0] = self.0[self.1];
        self.1 += 1;
        Ok(1)
    }
}

#[test]
fn short_reads_are_looped_over() {
    let mut r = QemuFileReader::new(Trickle(
        b"\x03abc\x00\x00\x00\x00\x00\x00\x01\x00".to_vec(),
        0,
    ));
    assert_eq!(r.get_counted_string().unwrap(), "abc");
    assert_eq!(r.get_be64().unwrap(), 256);
    assert!(r.at_end().unwrap());
}

#[test]
fn load_hook_without_hooks_fails_only_when_requested() {
    let mut r = QemuFileReader::new(MemTransport::new());
    r.ram_control_load_hook(RamControl::Round).unwrap();
    assert!(matches!(
        r.ram_control_load_hook(RamControl::Hook),
        Err(Error::NoLoadHook { .. })
    ));
}

#[test]
fn save_page_hook_results_are_accounted() {
    struct Rdma;
    impl RamHooks for Rdma {
        fn save_page(&mut self, _b: u64, offset: u64, _size: usize) -> SavePage {
            if offset == 0 {
                SavePage::Sent(10)
            } else {
                SavePage::Delayed
            }
        }
    }
    let mut f = QemuFileWriter::new(MemTransport::new());
    assert!(matches!(
        f.ram_control_save_page(0, 0, 4096),
        SavePage::NotSupported
    ));
    assert_eq!(f.bytes_xfer(), 0);
    f.set_hooks(Box::new(Rdma));
    assert!(matches!(
        f.ram_control_save_page(0, 0, 4096),
        SavePage::Sent(10)
    ));
    assert!(matches!(
        f.ram_control_save_page(0, 4096, 4096),
        SavePage::Delayed
    ));
    assert_eq!(f.bytes_xfer(), 8192);
    assert_eq!(f.ftell(), 10);
}
