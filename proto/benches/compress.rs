//! `put_compression_data` per 4 KiB page: zero, guest-like text and random
//! pages, as the compression workers call it.

use std::hint::black_box;
use std::io::{self, IoSlice};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ferry_proto::compress;
use ferry_proto::qemu_file::{Compressed, QemuFileWriter};
use ferry_proto::stream::PAGE_SIZE;
use ferry_proto::transport::Transport;

/// A transport that drops what it is given, so only the QEMUFile and zlib count.
struct Sink;

impl Transport for Sink {
    fn writev(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        Ok(bufs.iter().map(|b| b.len()).sum())
    }
    fn read(&mut self, _buf: &mut [u8]) -> io::Result<usize> {
        Ok(0)
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

const WORDS: &[&str] = &[
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "for",
    "on",
    "with",
    "that",
    "request",
    "response",
    "user",
    "session",
    "connection",
    "timeout",
    "error",
    "warning",
    "info",
    "debug",
    "kernel",
    "memory",
    "page",
    "cache",
    "disk",
    "write",
    "read",
    "file",
    "directory",
    "process",
    "thread",
    "started",
    "stopped",
    "failed",
    "accepted",
    "closed",
    "client",
    "server",
    "port",
    "address",
    "service",
    "database",
    "query",
    "transaction",
    "commit",
    "rollback",
    "index",
    "table",
    "value",
    "config",
    "loaded",
    "module",
    "network",
    "interface",
    "packet",
    "bytes",
    "received",
    "sent",
    "queue",
    "worker",
    "job",
    "scheduled",
    "completed",
    "retry",
    "status",
    "http",
    "GET",
    "POST",
    "/api/v1/orders",
    "/static/app.js",
    "Mozilla/5.0",
    "json",
    "token",
];

/// Guest-like text: log lines, prose and key=value pairs with timestamps,
/// numbers, hex and identifiers of varying length; no short period repeats.
fn text_page(rng: &mut Rng) -> Vec<u8> {
    let mut out = String::with_capacity(PAGE_SIZE + 256);
    while out.len() < PAGE_SIZE {
        match rng.below(4) {
            0 => {
                // A log line.
                out.push_str(&format!(
                    "2024-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z host{} {}[{}]: ",
                    1 + rng.below(12),
                    1 + rng.below(28),
                    rng.below(24),
                    rng.below(60),
                    rng.below(60),
                    rng.below(1000),
                    rng.below(16),
                    WORDS[rng.below(WORDS.len())],
                    rng.below(65536)
                ));
                for _ in 0..4 + rng.below(10) {
                    out.push_str(WORDS[rng.below(WORDS.len())]);
                    out.push(' ');
                }
                out.push('\n');
            }
            1 => {
                // Prose.
                for i in 0..8 + rng.below(20) {
                    let w = WORDS[rng.below(WORDS.len())];
                    if i == 0 {
                        let mut c = w.chars();
                        out.extend(c.next().map(|c| c.to_ascii_uppercase()));
                        out.push_str(c.as_str());
                    } else {
                        out.push_str(w);
                    }
                    out.push(if rng.below(9) == 0 { ',' } else { ' ' });
                }
                out.push_str(".\n");
            }
            2 => {
                // key=value pairs with numbers and hex.
                for _ in 0..3 + rng.below(5) {
                    out.push_str(&format!(
                        "{}={} ",
                        WORDS[rng.below(WORDS.len())],
                        match rng.below(3) {
                            0 => format!("{}", rng.next() % 10_000_000),
                            1 => format!("0x{:x}", rng.next() >> 20),
                            _ => format!("{:.3}", (rng.next() % 100_000) as f64 / 7.0),
                        }
                    ));
                }
                out.push('\n');
            }
            _ => {
                // A path or identifier.
                out.push_str(&format!(
                    "/var/lib/{}/{}-{:08x}.{}\n",
                    WORDS[rng.below(WORDS.len())],
                    WORDS[rng.below(WORDS.len())],
                    rng.next() as u32,
                    ["log", "db", "json", "tmp"][rng.below(4)]
                ));
            }
        }
    }
    let mut bytes = out.into_bytes();
    bytes.truncate(PAGE_SIZE);
    bytes
}

fn random_page(rng: &mut Rng) -> Vec<u8> {
    (0..PAGE_SIZE / 8)
        .flat_map(|_| rng.next().to_le_bytes())
        .collect()
}

fn bench(c: &mut Criterion) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    // Distinct pages, cycled, so the bench does not replay one page from cache.
    let text: Vec<Vec<u8>> = (0..64).map(|_| text_page(&mut rng)).collect();
    let random: Vec<Vec<u8>> = (0..64).map(|_| random_page(&mut rng)).collect();
    let zero = vec![vec![0u8; PAGE_SIZE]];

    // Report how well the text compresses, so the figures can be compared.
    let mut out = [0u8; PAGE_SIZE - 1];
    for level in [1, 6] {
        let mut comp = compress::compressor(level);
        let total: usize = text
            .iter()
            .map(|p| compress::deflate_into(&mut comp, p, &mut out).unwrap_or(PAGE_SIZE))
            .sum();
        eprintln!(
            "text pages at level {level}: {:.1}% of their size",
            100.0 * total as f64 / (text.len() * PAGE_SIZE) as f64
        );
    }

    let mut group = c.benchmark_group("put_compression_data");
    group.throughput(Throughput::Bytes(PAGE_SIZE as u64));
    let cases: [(&str, &[Vec<u8>], u32); 5] = [
        ("zero", &zero, 1),
        ("text", &text, 1),
        ("text", &text, 6),
        ("random", &random, 1),
        ("random", &random, 6),
    ];
    for (name, pages, level) in cases {
        group.bench_function(BenchmarkId::new(name, format!("level{level}")), |b| {
            let mut f = QemuFileWriter::new(Sink);
            let mut comp = compress::compressor(level);
            let mut i = 0;
            b.iter(|| {
                let page = &pages[i % pages.len()];
                i += 1;
                let r = f.put_compression_data(&mut comp, black_box(page)).unwrap();
                black_box(matches!(r, Compressed::Written(_)))
            });
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
