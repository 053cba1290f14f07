//! Hostile streams against the real receive path (`ferry receive --listen
//! file:`): each malformed stream is refused with its expected error, naming
//! the byte offset, and never marks the destination complete; a stream that
//! announces a huge RAM block does not make the receiver allocate it.

use std::fs;
use std::path::Path;
use std::time::Duration;

use ferry_proto::qemu_file::QemuFileWriter;
use ferry_proto::stream::encode::{self, RamWriter};
use ferry_proto::stream::{RamBlockInfo, SectionKind, PAGE_SIZE};
use ferry_proto::transport::MemTransport;
use ferry_tests::ferry::run_ferry;
use ferry_tests::files::tempdir;
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(60);
const PAGES: u64 = 16;

/// Where the parts of the base stream are, to aim mutations at them.
#[derive(Debug, Default)]
struct Layout {
    /// Offset of every section marker, and of EOF.
    boundaries: Vec<usize>,
    /// Offset of the RAM START marker.
    ram_start: usize,
    /// Offset of the first PART marker.
    part: usize,
    /// Offset of the START section's footer.
    start_footer: usize,
    /// Offset of the first page record's be64 header.
    first_page: usize,
    /// Offset of the compressed page's be32 length.
    compressed_len: usize,
}

type Writer = QemuFileWriter<'static, MemTransport>;

fn pos(f: &mut Writer) -> usize {
    f.ftell_fast() as usize
}

/// A valid stream: one 16-page block "mem" (a raw, a zero, a compressed page
/// and the rest raw), a device section, EOF.
fn base() -> (Vec<u8>, Layout) {
    let mut l = Layout::default();
    let mut f: Writer = QemuFileWriter::new(MemTransport::new());
    let blocks = [RamBlockInfo {
        idstr: "mem".into(),
        length: PAGES * PAGE_SIZE as u64,
    }];
    encode::put_file_header(&mut f);
    encode::put_configuration(&mut f, "none");
    let mut ram = RamWriter::new();
    l.ram_start = pos(&mut f);
    l.boundaries.push(l.ram_start);
    encode::put_section_start(&mut f, SectionKind::Start, 2, "ram", 0, 4).unwrap();
    ram.put_mem_size(&mut f, &blocks).unwrap();
    ram.put_eos(&mut f);
    l.start_footer = pos(&mut f);
    encode::put_footer(&mut f, 2);
    l.part = pos(&mut f);
    l.boundaries.push(l.part);
    encode::put_section_part(&mut f, SectionKind::Part, 2);
    let text: Vec<u8> = b"hostile input "
        .iter()
        .copied()
        .cycle()
        .take(PAGE_SIZE)
        .collect();
    let mut c = ferry_proto::compress::compressor(1);
    for p in 0..PAGES {
        let off = p * PAGE_SIZE as u64;
        if p == 0 {
            l.first_page = pos(&mut f);
        }
        match p {
            1 => ram.put_zero_page(&mut f, "mem", off, 0).unwrap(),
            2 => {
                // header (8 bytes, CONTINUE) then the be32 length.
                l.compressed_len = pos(&mut f) + 8;
                ram.put_compressed_page(&mut f, &mut c, "mem", off, &text)
                    .unwrap();
            }
            _ => ram
                .put_page(&mut f, "mem", off, &[p as u8 + 1; PAGE_SIZE])
                .unwrap(),
        }
    }
    ram.put_eos(&mut f);
    encode::put_footer(&mut f, 2);
    l.boundaries.push(pos(&mut f));
    encode::put_section_part(&mut f, SectionKind::End, 2);
    ram.put_eos(&mut f);
    encode::put_footer(&mut f, 2);
    l.boundaries.push(pos(&mut f));
    encode::put_section_start(&mut f, SectionKind::Full, 0, "timer", 0, 2).unwrap();
    f.put_buffer(&[0u8; 24]);
    encode::put_footer(&mut f, 0);
    l.boundaries.push(pos(&mut f));
    encode::put_eof(&mut f);
    (f.into_transport().unwrap().take(), l)
}

/// Runs `ferry receive --listen file:` on `stream`; returns (success, stderr, stats).
fn receive(dir: &Path, name: &str, stream: &[u8]) -> (bool, String, Value) {
    let file = dir.join(format!("{name}.mig"));
    fs::write(&file, stream).unwrap();
    let dest = dir.join(format!("{name}.ram"));
    let stats = dir.join(format!("{name}.json"));
    let out = run_ferry(
        [
            "receive".to_owned(),
            "--listen".to_owned(),
            format!("file:{}", file.display()),
            "--ram".to_owned(),
            format!("{},name=mem", dest.display()),
            "--stats-json".to_owned(),
            stats.display().to_string(),
        ],
        TIMEOUT,
    )
    .expect("running ferry receive");
    let st = fs::read_to_string(&stats)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null);
    let _ = fs::remove_file(&dest);
    (out.status.success(), out.stderr, st)
}

fn refused(dir: &Path, name: &str, stream: &[u8], expect: &[&str]) {
    let (ok, err, st) = receive(dir, name, stream);
    assert!(!ok, "{name}: a malformed stream was accepted");
    assert_eq!(st["status"], "failed", "{name}: stats say {st}");
    let errors: Vec<&str> = err
        .lines()
        .filter(|l| !l.contains("listening on"))
        .collect();
    assert_eq!(errors.len(), 1, "{name}: one line: {err}");
    for e in expect {
        assert!(err.contains(e), "{name}: expected {e:?} in {err:?}");
    }
}

#[test]
fn the_base_stream_loads() {
    let dir = tempdir("ferry-malformed-");
    let (s, _) = base();
    let (ok, err, st) = receive(dir.path(), "base", &s);
    assert!(ok, "{err}");
    assert_eq!(st["status"], "completed");
}

#[test]
fn truncation_at_every_section_boundary_names_the_offset() {
    let dir = tempdir("ferry-malformed-");
    let (s, l) = base();
    for (i, &cut) in l.boundaries.iter().chain([s.len() - 1].iter()).enumerate() {
        refused(
            dir.path(),
            &format!("cut{i}"),
            &s[..cut],
            &["unexpected end of stream", &format!("at byte {cut}")],
        );
    }
}

/// `s` with `bytes` written over it at `at`.
fn with(s: &[u8], at: usize, bytes: &[u8]) -> Vec<u8> {
    let mut m = s.to_vec();
    m[at..at + bytes.len()].copy_from_slice(bytes);
    m
}

/// Flipped bits in headers.
fn bad_headers(d: &Path, s: &[u8], l: &Layout) {
    refused(
        d,
        "magic",
        &with(s, 0, &[b'Q' ^ 0x20]),
        &["at byte 0", "bad magic"],
    );
    refused(
        d,
        "version",
        &with(s, 7, &[4]),
        &["at byte 4", "stream version 4"],
    );
    refused(
        d,
        "marker",
        &with(s, l.ram_start, &[0x09]),
        &[
            &format!("at byte {}", l.ram_start),
            "unknown section type 0x09",
        ],
    );
    refused(
        d,
        "section-id",
        &with(s, l.part + 1, &77u32.to_be_bytes()),
        &[
            &format!("at byte {}", l.part),
            "section id 77 was never started",
        ],
    );
    refused(
        d,
        "footer",
        &with(s, l.start_footer, &[0x7f]),
        &[&format!("at byte {}", l.start_footer), "missing footer"],
    );
}

/// Lengths that lie, an offset past the end of the block, an unknown flag,
/// and a block list that does not add up.
fn bad_records(d: &Path, s: &[u8], l: &Layout) {
    refused(
        d,
        "compressed-too-long",
        &with(s, l.compressed_len, &5000u32.to_be_bytes()),
        &[&format!("at byte {}", l.compressed_len), "exceeds 4110"],
    );
    // The rest of the zlib stream is then read as the next record.
    refused(
        d,
        "compressed-short",
        &with(s, l.compressed_len, &10u32.to_be_bytes()),
        &["at byte"],
    );
    let past = (PAGES * PAGE_SIZE as u64) | 0x08;
    refused(
        d,
        "offset-past-end",
        &with(s, l.first_page, &past.to_be_bytes()),
        &[
            &format!("at byte {}", l.first_page),
            "past the end of block \"mem\"",
        ],
    );
    refused(
        d,
        "unknown-flag",
        &with(s, l.first_page, &0x400u64.to_be_bytes()),
        &[
            &format!("at byte {}", l.first_page),
            "unknown RAM record flags 0x400",
        ],
    );
    // MULTIFD_FLUSH is known, but without multifd channels it is refused
    // with what to do about it.
    refused(
        d,
        "multifd-flush",
        &with(s, l.first_page, &0x200u64.to_be_bytes()),
        &[&format!("at byte {}", l.first_page), "--multifd-channels"],
    );
    let mem_size = l.ram_start + 1 + 4 + 4 + 4 + 4;
    let total = (PAGES * PAGE_SIZE as u64 * 2) | 0x04;
    refused(
        d,
        "mem-size",
        &with(s, mem_size, &total.to_be_bytes()),
        &["RAM blocks add up to"],
    );
}

#[test]
fn malformed_streams_get_their_expected_errors() {
    let dir = tempdir("ferry-malformed-");
    let (s, l) = base();
    bad_headers(dir.path(), &s, &l);
    bad_records(dir.path(), &s, &l);
}

#[test]
fn a_block_record_for_an_unknown_device_is_refused() {
    let dir = tempdir("ferry-malformed-");
    let (s, l) = base();
    // Splice a block section with a chunk for device "nosuch" before the
    // device section (after it, it would be device state no vmdesc sizes).
    let eof = l.boundaries[l.boundaries.len() - 2];
    let mut f: Writer = QemuFileWriter::new(MemTransport::new());
    encode::put_section_start(&mut f, SectionKind::Start, 3, "block", 0, 1).unwrap();
    encode::put_block_chunk(&mut f, "nosuch", 0, &[7u8; 1 << 20]).unwrap();
    encode::put_block_eos(&mut f);
    encode::put_footer(&mut f, 3);
    let block = f.into_transport().unwrap().take();
    let mut m = s[..eof].to_vec();
    m.extend_from_slice(&block);
    m.extend_from_slice(&s[eof..]);
    refused(dir.path(), "unknown-device", &m, &["nosuch"]);
}

#[test]
fn a_huge_announced_block_is_not_allocated() {
    let dir = tempdir("ferry-malformed-");
    // 1 TiB announced, one page sent at its very end.
    let huge: u64 = 1 << 40;
    let mut f: Writer = QemuFileWriter::new(MemTransport::new());
    encode::put_file_header(&mut f);
    encode::put_configuration(&mut f, "none");
    let mut ram = RamWriter::new();
    encode::put_section_start(&mut f, SectionKind::Start, 2, "ram", 0, 4).unwrap();
    ram.put_mem_size(
        &mut f,
        &[RamBlockInfo {
            idstr: "mem".into(),
            length: huge,
        }],
    )
    .unwrap();
    ram.put_eos(&mut f);
    encode::put_footer(&mut f, 2);
    encode::put_section_part(&mut f, SectionKind::End, 2);
    ram.put_page(&mut f, "mem", huge - PAGE_SIZE as u64, &[9u8; PAGE_SIZE])
        .unwrap();
    ram.put_eos(&mut f);
    encode::put_footer(&mut f, 2);
    encode::put_eof(&mut f);
    let s = f.into_transport().unwrap().take();
    let (ok, err, st) = receive(dir.path(), "huge", &s);
    // Whether the file system takes a 4 TiB sparse file or not, the reader's
    // own memory stays small.
    if ok {
        let anon = st["processes"]["reader"]["peak-anon-bytes"]
            .as_u64()
            .unwrap_or_else(|| panic!("no reader memory figure: {st}"));
        assert!(anon < 64 << 20, "the reader used {anon} bytes of memory");
    } else {
        assert!(err.contains("mem"), "a clear error naming the block: {err}");
    }
}
