//! Parsing and applying a 64 MiB RAM stream from memory: a third raw pages,
//! a third compressed text pages, a third zero pages.

use std::hint::black_box;
use std::io::Cursor;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ferry_guest::load::RamImage;
use ferry_proto::compress;
use ferry_proto::qemu_file::{QemuFileReader, QemuFileWriter};
use ferry_proto::stream::encode::{self, RamWriter};
use ferry_proto::stream::parse::{Item, Parser, RamRecord};
use ferry_proto::stream::{RamBlockInfo, SectionKind, PAGE_SIZE, RAM_IDSTR, RAM_VERSION};
use ferry_proto::transport::{MemTransport, ReadTransport};
use proptest::prelude::Rng;
use proptest::test_runner::{RngAlgorithm, TestRng};

const RAM: usize = 64 << 20;

fn text_page(rng: &mut TestRng) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "request", "user", "session", "timeout", "error", "kernel", "memory", "page", "disk",
        "process", "thread", "failed", "client", "server", "port", "query", "commit", "bytes",
    ];
    let mut out = String::with_capacity(PAGE_SIZE + 64);
    while out.len() < PAGE_SIZE {
        let r = rng.next_u64();
        match r % 6 {
            0 => out.push_str(&format!("{} ", r >> 40)),
            1 => out.push('\n'),
            _ => {
                out.push_str(WORDS[(r >> 8) as usize % WORDS.len()]);
                out.push(' ');
            }
        }
    }
    let mut b = out.into_bytes();
    b.truncate(PAGE_SIZE);
    b
}

/// The stream: file header, one RAM section with one 64 MiB block, EOF.
fn build_stream() -> Vec<u8> {
    let mut rng = TestRng::deterministic_rng(RngAlgorithm::XorShift);
    let blocks = [RamBlockInfo {
        idstr: "pc.ram".into(),
        length: RAM as u64,
    }];
    let mut f = QemuFileWriter::new(MemTransport::new());
    let mut comp = compress::compressor(1);
    encode::put_file_header(&mut f);
    encode::put_configuration(&mut f, "none");
    encode::put_section_start(&mut f, SectionKind::Start, 0, RAM_IDSTR, 0, RAM_VERSION).unwrap();
    let mut w = RamWriter::new();
    w.put_mem_size(&mut f, &blocks).unwrap();
    for i in 0..RAM / PAGE_SIZE {
        let offset = (i * PAGE_SIZE) as u64;
        match i % 3 {
            0 => {
                let page: Vec<u8> = (0..PAGE_SIZE / 8)
                    .flat_map(|_| rng.next_u64().to_le_bytes())
                    .collect();
                w.put_page(&mut f, "pc.ram", offset, &page).unwrap();
            }
            1 => {
                let page = text_page(&mut rng);
                let how = w
                    .put_compressed_page(&mut f, &mut comp, "pc.ram", offset, &page)
                    .unwrap();
                assert!(matches!(how, encode::PageEncoding::Compressed(_)));
            }
            _ => w.put_zero_page(&mut f, "pc.ram", offset, 0).unwrap(),
        }
    }
    w.put_eos(&mut f);
    encode::put_footer(&mut f, 0);
    encode::put_eof(&mut f);
    f.into_transport().unwrap().take()
}

/// Parses `stream` to the end, applying every RAM record to `image`
/// (created on the first MEM_SIZE if there is none yet). Returns the pages.
fn load(stream: &[u8], dir: &std::path::Path, image: &mut Option<RamImage>) -> usize {
    let mut p = Parser::new(QemuFileReader::new(ReadTransport(Cursor::new(stream))));
    let mut pages = 0;
    loop {
        let at = p.offset();
        match p.next().unwrap() {
            Item::End => return pages,
            Item::Ram(rec) => {
                if let RamRecord::MemSize(blocks) = &rec {
                    if image.is_none() {
                        *image = Some(RamImage::create_in_dir(dir, blocks).unwrap());
                    }
                }
                if !matches!(rec, RamRecord::MemSize(_) | RamRecord::Eos) {
                    pages += 1;
                }
                image.as_mut().unwrap().apply(&rec, at).unwrap();
            }
            _ => {}
        }
    }
}

fn bench(c: &mut Criterion) {
    let stream = build_stream();
    eprintln!(
        "stream: {} bytes for {} MiB of RAM",
        stream.len(),
        RAM >> 20
    );
    // Memory-backed files when there are any, so the disk does not count.
    let dir = if std::path::Path::new("/dev/shm").is_dir() {
        tempfile::tempdir_in("/dev/shm").unwrap()
    } else {
        tempfile::tempdir().unwrap()
    };
    let mut image = None;
    assert_eq!(load(&stream, dir.path(), &mut image), RAM / PAGE_SIZE);

    let mut group = c.benchmark_group("decode");
    group.sample_size(10);
    group.throughput(Throughput::Bytes(stream.len() as u64));
    group.bench_function("parse_apply_64MiB_mixed", |b| {
        b.iter(|| black_box(load(&stream, dir.path(), &mut image)));
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
