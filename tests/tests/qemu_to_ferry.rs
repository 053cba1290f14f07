//! QEMU 7.2 writes a migration stream, `ferry inspect` reads it back.
//!
//! The source is `-M none` with 64 MiB of mixed RAM in a shared file and `-S`, so the
//! RAM at migration time is exactly the file: ferry's extracted RAM must equal it byte
//! for byte. Three streams: plain (ZERO + PAGE records), and QEMU's compress capability
//! at levels 1 and 9 (ZERO + COMPRESS_PAGE; random pages compress to 4107 bytes and
//! records arrive out of address order, from two compression threads).
//!
//! CLI contract under test:
//! `ferry inspect STREAM [--json] [--extract-ram DIR] [--extract-device-state FILE]`;
//! exit 1 with one line on stderr for an invalid stream.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_tests::ferry::run_ferry;
use ferry_tests::qemu::{none_machine_args, Qemu};
use ferry_tests::ram::{self, census, first_difference, PAGE_SIZE};
use serde_json::Value;
use tempfile::TempDir;

const RAM_SIZE: u64 = 64 << 20;
const INSPECT_TIMEOUT: Duration = Duration::from_secs(120);

/// A QEMU-made stream and the RAM image it carries.
struct Stream {
    dir: TempDir,
    ram: PathBuf,
    path: PathBuf,
}

/// Migrate a `-M none` guest with mixed RAM (seed `seed`) to a file.
fn qemu_stream(compress: Option<(u8, u8)>, seed: u64) -> Stream {
    let dir = ferry_tests::files::tempdir("ferry-q2f-");
    let ram = dir.path().join("source.ram");
    ram::write_mixed_image(&ram, RAM_SIZE as usize, seed).expect("writing the RAM image");
    let mut args = none_machine_args(&ram, RAM_SIZE);
    args.push("-S".into());
    let mut qemu = Qemu::spawn(&args).unwrap_or_else(|e| panic!("starting the QEMU source: {e}"));
    let path = dir.path().join("stream.mig");
    qemu.migrate_to_file(&path, compress)
        .unwrap_or_else(|e| panic!("QEMU migrating to {}: {e}", path.display()));
    Stream { dir, ram, path }
}

/// `ferry inspect STREAM --json --extract-ram DIR`: the parsed report and DIR.
fn inspect(stream: &Stream) -> (Value, PathBuf) {
    let out = stream.dir.path().join("extracted");
    fs::create_dir_all(&out).expect("creating the extraction directory");
    let args = [
        "inspect".as_ref(),
        stream.path.as_os_str(),
        "--json".as_ref(),
        "--extract-ram".as_ref(),
        out.as_os_str(),
    ];
    let output = run_ferry(args, INSPECT_TIMEOUT)
        .and_then(|o| o.success())
        .unwrap_or_else(|e| panic!("ferry inspect {}: {e}", stream.path.display()));
    let report: Value = serde_json::from_str(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "ferry inspect --json printed something that is not JSON ({e}):\n{}",
            output.stdout
        )
    });
    (report, out)
}

fn u64_at(v: &Value, key: &str) -> u64 {
    v.get(key)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("report field {key:?} missing or not an unsigned integer in {v}"))
}

fn str_at<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("report field {key:?} missing or not a string in {v}"))
}

/// Header, section list and RAM block list, as QEMU 7.2 writes them for `-M none`.
fn check_structure(report: &Value, stream_len: u64) {
    assert_eq!(u64_at(report, "version"), 3, "stream version");
    assert_eq!(str_at(report, "machine"), "none", "machine name");

    let blocks = report["ram_blocks"]
        .as_array()
        .expect("ram_blocks is an array");
    assert_eq!(blocks.len(), 1, "one RAM block expected: {blocks:?}");
    assert_eq!(str_at(&blocks[0], "idstr"), "mem");
    assert_eq!(u64_at(&blocks[0], "length"), RAM_SIZE);

    let sections = report["sections"].as_array().expect("sections is an array");
    let mut last_end = 0;
    for s in sections {
        let (start, end) = (u64_at(s, "start"), u64_at(s, "end"));
        assert!(start < end, "section with start >= end: {s}");
        assert!(
            start >= last_end,
            "sections overlap or are out of order at {s}"
        );
        assert!(
            end <= stream_len,
            "section ends past the stream ({stream_len}): {s}"
        );
        last_end = end;
    }
    let find = |ty: &str, idstr: &str| {
        sections
            .iter()
            .find(|s| str_at(s, "type") == ty && str_at(s, "idstr") == idstr)
            .unwrap_or_else(|| panic!("no {ty} section {idstr:?} in {sections:?}"))
    };
    let ram_start = find("start", "ram");
    assert_eq!(u64_at(ram_start, "version"), 4, "ram section version");
    let ram_id = u64_at(ram_start, "id");
    assert_eq!(u64_at(find("end", "ram"), "id"), ram_id, "ram END id");
    for s in sections.iter().filter(|s| str_at(s, "type") == "part") {
        assert_eq!(
            u64_at(s, "id"),
            ram_id,
            "PART of a section other than ram: {s}"
        );
    }
    assert_eq!(u64_at(find("full", "timer"), "version"), 2);
    assert_eq!(u64_at(find("full", "globalstate"), "version"), 1);
}

/// Page counters: every page sent at least once, of the expected record kinds.
fn check_pages(report: &Value, compressed: bool) {
    let pages = &report["pages"];
    let (zero, raw, comp) = (
        u64_at(pages, "zero"),
        u64_at(pages, "raw"),
        u64_at(pages, "compressed"),
    );
    let expected = census(RAM_SIZE as usize);
    let nonzero = expected.fill + expected.text + expected.random;
    assert!(
        zero >= expected.zero,
        "zero pages {zero} < {}",
        expected.zero
    );
    assert!(
        raw + comp >= nonzero,
        "raw {raw} + compressed {comp} < {nonzero} non-zero pages"
    );
    assert!(
        zero + raw + comp <= 2 * (RAM_SIZE / PAGE_SIZE as u64),
        "implausibly many pages: {pages}"
    );
    assert_eq!(u64_at(pages, "xbzrle"), 0, "QEMU did not use XBZRLE");
    let ratio = pages["compressed_ratio"]
        .as_f64()
        .unwrap_or_else(|| panic!("compressed_ratio missing or not a number in {pages}"));
    assert!(ratio.is_finite(), "compressed_ratio {ratio}");
    let bytes = u64_at(pages, "compressed_bytes");
    if compressed {
        // QEMU 7.2 compresses every non-zero page except the first page of a block.
        assert!(
            comp >= nonzero - 1,
            "compressed pages {comp} < {}",
            nonzero - 1
        );
        assert!(raw <= 1, "QEMU sent {raw} raw pages with compress on");
        assert!(
            bytes > 0 && bytes <= comp * 4110,
            "compressed_bytes {bytes} for {comp} pages"
        );
        assert!(ratio > 0.0, "compressed_ratio {ratio}");
    } else {
        assert_eq!(comp, 0, "compressed pages in a plain stream");
        assert!(raw >= nonzero, "raw pages {raw} < {nonzero}");
        assert_eq!(bytes, 0, "compressed_bytes in a plain stream");
    }
}

/// DIR/mem.ram must equal the source's RAM file.
fn check_extracted_ram(out: &Path, source: &Path) {
    let got_path = out.join("mem.ram");
    let got = fs::read(&got_path)
        .unwrap_or_else(|e| panic!("reading extracted RAM {}: {e}", got_path.display()));
    let want = fs::read(source).expect("reading the source RAM image");
    if let Some(at) = first_difference(&got, &want) {
        panic!(
            "extracted RAM differs from the source at byte {at} (page {}, kind {:?}); lengths {} vs {}",
            at / PAGE_SIZE,
            ram::page_kind(at / PAGE_SIZE),
            got.len(),
            want.len()
        );
    }
}

fn roundtrip(compress: Option<(u8, u8)>, seed: u64) {
    let stream = qemu_stream(compress, seed);
    let stream_len = fs::metadata(&stream.path).expect("stream metadata").len();
    let (report, out) = inspect(&stream);
    check_structure(&report, stream_len);
    check_pages(&report, compress.is_some());
    check_extracted_ram(&out, &stream.ram);
}

#[test]
fn plain_stream_extracts_exact_ram() {
    roundtrip(None, 1);
}

#[test]
fn compressed_level1_stream_extracts_exact_ram() {
    roundtrip(Some((2, 1)), 2);
}

#[test]
fn compressed_level9_stream_extracts_exact_ram() {
    roundtrip(Some((2, 9)), 3);
}

/// Exit status 1 and exactly one line on stderr.
fn assert_rejected(path: &Path, what: &str) {
    let output = run_ferry(
        ["inspect".as_ref(), path.as_os_str(), "--json".as_ref()],
        INSPECT_TIMEOUT,
    )
    .unwrap_or_else(|e| panic!("running ferry inspect on {what}: {e}"));
    assert_eq!(
        output.status.code(),
        Some(1),
        "ferry inspect on {what}: want exit 1, got {}; stderr:\n{}",
        output.status,
        output.stderr
    );
    let lines: Vec<_> = output
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "ferry inspect on {what}: want one stderr line, got:\n{}",
        output.stderr
    );
}

#[test]
fn invalid_streams_are_rejected_with_one_line() {
    let stream = qemu_stream(None, 4);
    let bytes = fs::read(&stream.path).expect("reading the stream");
    let dir = stream.dir.path();

    let garbage = dir.join("garbage.mig");
    fs::write(&garbage, b"this is not a migration stream\n").unwrap();
    assert_rejected(&garbage, "a text file");

    let empty = dir.join("empty.mig");
    fs::write(&empty, b"").unwrap();
    assert_rejected(&empty, "an empty file");

    let truncated = dir.join("truncated.mig");
    fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    assert_rejected(&truncated, "a stream cut in half");

    // Right header, then a section type QEMU 7.2 never writes.
    let mut bad_section = bytes[..17].to_vec(); // "QEVM", version 3, configuration "none"
    bad_section.push(0x42);
    let bad = dir.join("bad-section.mig");
    fs::write(&bad, &bad_section).unwrap();
    assert_rejected(&bad, "a stream with an unknown section type");
}
