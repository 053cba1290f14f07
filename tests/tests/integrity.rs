//! `ferry send --integrity`: checkpoints in the stream that a ferry receiver
//! verifies by itself. A migration with it succeeds (raw and compressed, over
//! tcp); one byte flipped inside a raw page of a saved stream fails the load
//! with an integrity error naming the bytes, while without --integrity the
//! same flip loads "successfully" and only the RAM digest (what the sender
//! compares in the Ack) shows the damage.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_proto::qemu_file::QemuFileReader;
use ferry_proto::stream::parse::{Item, Parser, RamRecord};
use ferry_proto::transport::FileTransport;
use ferry_tests::ferry::{run_ferry, Output};
use ferry_tests::files::{assert_same_file, read_json, tempdir};
use ferry_tests::migrate::{self, named, receive_args};
use ferry_tests::ram::{self, ferry_digest, first_difference};

const MIB: usize = 1 << 20;
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

const PREFIX: &str = "ferry-integrity-";

fn source(dir: &Path, size: usize) -> PathBuf {
    let src = dir.join("source.ram");
    ram::write_mixed_image(&src, size, 11).expect("writing the source RAM");
    src
}

fn ferry(args: &[String]) -> Output {
    run_ferry(args, RUN_TIMEOUT).expect("running ferry")
}

fn send_args(src: &Path, to: &str, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "send".to_owned(),
        "--ram".into(),
        named(src, "ram"),
        "--to".into(),
        to.into(),
        "--no-progress".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// The number in "integrity verified: N checkpoints".
fn checkpoints_verified(stderr: &str) -> Option<u64> {
    stderr
        .split("integrity verified: ")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[test]
fn a_migration_with_integrity_succeeds() {
    let dir = tempdir(PREFIX);
    let d = dir.path();
    let src = source(d, 64 * MIB);
    for compress in [false, true] {
        let dest = d.join("dest.ram");
        let _ = fs::remove_file(&dest);
        let (mut r, uri) = migrate::receive(d, "tcp:127.0.0.1:0", &dest)
            .start_listening(&d.join("receive.err"))
            .expect("starting ferry receive");
        let mut extra = vec!["--integrity"];
        if compress {
            extra.push("--compress");
        }
        let mut s = migrate::send(d, "send", &uri)
            .args(&["--ram", &named(&src, "ram")])
            .args(&extra)
            .start(&d.join("send.err"))
            .expect("starting ferry send");
        let sst = s.wait(RUN_TIMEOUT).expect("ferry send ends");
        let rst = r.wait(Duration::from_secs(30)).expect("ferry receive ends");
        assert!(sst.success(), "ferry send failed: {}", s.stderr());
        assert!(rst.success(), "ferry receive failed: {}", r.stderr());
        assert!(s.stderr().contains("RAM digests match"), "{}", s.stderr());
        assert_same_file(&src, &dest);
        // One checkpoint after the configuration, one per chunk (at most 256
        // pages, so at least 64 for 64 MiB), one before EOF.
        let n = checkpoints_verified(&r.stderr())
            .unwrap_or_else(|| panic!("no integrity report: {}", r.stderr()));
        assert!(n >= 66, "{n} checkpoints for 64 MiB (compress={compress})");
    }
}

/// Offset of a data byte in the middle of the `nth` raw page record.
fn raw_page_byte(stream: &Path, nth: usize) -> u64 {
    let file = fs::File::open(stream).expect("opening the stream");
    let mut p = Parser::new(QemuFileReader::new(FileTransport(file)));
    let mut seen = 0;
    loop {
        let is_page = match p.next().expect("parsing the stream") {
            Item::Ram(RamRecord::Page { .. }) => true,
            Item::End => panic!("fewer than {nth} raw pages"),
            _ => false,
        };
        if is_page {
            seen += 1;
            if seen == nth {
                // The page's 4096 bytes end where the parser stands.
                return p.offset() - 2048;
            }
        }
    }
}

fn flip(path: &Path, at: u64) {
    let mut bytes = fs::read(path).expect("reading the stream");
    bytes[at as usize] ^= 0x01;
    fs::write(path, bytes).expect("writing the stream");
}

/// The sealed stream, flipped at a raw page: refused, naming the bytes
/// around the flip.
fn sealed_flip_is_refused(d: &Path, sealed: &Path) {
    let dest = d.join("dest.ram");
    let listen = format!("file:{}", sealed.display());
    let at = raw_page_byte(sealed, 1000);
    flip(sealed, at);
    let _ = fs::remove_file(&dest);
    let out = ferry(&receive_args(&listen, &dest, &d.join("sealed.json")));
    assert!(!out.status.success(), "a corrupt sealed stream loaded");
    assert!(
        out.stderr.contains("integrity check failed at checkpoint"),
        "{}",
        out.stderr
    );
    let range = out
        .stderr
        .split("stream bytes ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.split_once(".."))
        .map(|(a, b)| (a.parse::<u64>().unwrap(), b.parse::<u64>().unwrap()))
        .unwrap_or_else(|| panic!("no byte range in: {}", out.stderr));
    assert!(
        range.0 <= at && at < range.1,
        "flip at {at} outside {range:?}"
    );
    assert!(
        range.1 - range.0 < 2 * MIB as u64,
        "a checkpoint covers {range:?}"
    );
    assert_eq!(read_json(&d.join("sealed.json"))["status"], "failed");
}

/// The plain stream, flipped at a raw page: the parser cannot tell, the load
/// "succeeds", and only the digest of the loaded RAM differs from the source's.
fn plain_flip_shows_only_in_the_digest(d: &Path, plain: &Path, source_bytes: &[u8]) {
    let dest = d.join("dest.ram");
    let at = raw_page_byte(plain, 1000);
    flip(plain, at);
    let _ = fs::remove_file(&dest);
    let listen = format!("file:{}", plain.display());
    let out = ferry(&receive_args(&listen, &dest, &d.join("plain.json")));
    out.success()
        .expect("a flipped raw page is undetectable by the parser");
    let st = read_json(&d.join("plain.json"));
    assert_eq!(st["status"], "completed");
    let loaded = fs::read(&dest).expect("reading the destination");
    let diff = first_difference(&loaded, source_bytes).expect("the flip reached RAM");
    assert!(
        first_difference(&loaded[diff + 1..], &source_bytes[diff + 1..]).is_none(),
        "more than one byte differs"
    );
    assert_ne!(
        st["digests"][0]["xxh3"].as_str(),
        Some(ferry_digest(source_bytes).as_str()),
        "the digest a sender would compare shows the damage"
    );
    assert_eq!(
        st["digests"][0]["xxh3"].as_str(),
        Some(ferry_digest(&loaded).as_str())
    );
}

#[test]
fn a_flipped_byte_is_caught_by_the_checkpoints_and_otherwise_only_by_the_digests() {
    let dir = tempdir(PREFIX);
    let d = dir.path();
    let src = source(d, 16 * MIB);
    let source_bytes = fs::read(&src).expect("reading the source");
    let sealed = d.join("sealed.stream");
    let plain = d.join("plain.stream");
    for (file, extra) in [(&sealed, vec!["--integrity"]), (&plain, vec![])] {
        let to = format!("file:{}", file.display());
        ferry(&send_args(&src, &to, &extra))
            .success()
            .expect("ferry send to a file");
    }
    // Only the sealed stream carries checkpoints.
    for (file, sealed_stream) in [(&sealed, true), (&plain, false)] {
        let out = ferry(&[
            "inspect".to_owned(),
            "--json".into(),
            file.display().to_string(),
        ])
        .success()
        .expect("ferry inspect");
        assert_eq!(out.stdout.contains("ferry-integrity"), sealed_stream);
    }
    // Untouched, the sealed file loads and verifies.
    let listen = format!("file:{}", sealed.display());
    let out = ferry(&receive_args(
        &listen,
        &d.join("dest.ram"),
        &d.join("ok.json"),
    ));
    let out = out.success().expect("loading the sealed stream");
    assert!(
        checkpoints_verified(&out.stderr).is_some(),
        "{}",
        out.stderr
    );
    sealed_flip_is_refused(d, &sealed);
    plain_flip_shows_only_in_the_digest(d, &plain, &source_bytes);
}
