//! `ferry receive` end to end: streams from the library's reference encoder over
//! unix and tcp sockets, streams from a live QEMU 7.2 source, and the ways a
//! load must fail (truncation, a corrupt page, RAM files that do not fit, a port
//! in use, a killed reader process).
//!
//! CLI contract under test:
//! `ferry receive --listen URI --ram PATH[,name=BLOCK]... [--decompress-workers N]
//! [--stats-json FILE]`. stderr: `ferry: listening on URI` once bound, then one
//! summary line (exit 0) or one error line (exit 1). On a socket, the receiver
//! answers after the stream: `FERRY-RETURN-PATH 1\n` and one JSON `Ack` line.

use std::ffi::OsString;
use std::fs;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::ExitStatus;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use ferry_proto::qemu_file::{QemuFileReader, QemuFileWriter};
use ferry_proto::return_path::{Ack, HELLO};
use ferry_proto::stream::device_state::DeviceState;
use ferry_proto::stream::image::{self, PageCounts};
use ferry_proto::stream::parse::{Item, Parser, RamRecord};
use ferry_proto::transport::MemTransport;
use ferry_tests::ferry::run_ferry;
use ferry_tests::files::{assert_same_bytes, assert_same_file, read_json, tempdir};
use ferry_tests::proc::{self, ferry, Process};
use ferry_tests::qemu::{none_machine_args, Qemu};
use ferry_tests::ram::{self, ferry_digest};
use serde_json::json;

/// Deadline for a whole `ferry receive` run.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);
/// How long ferry may take to bind and say so.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(30);
const PREFIX: &str = "ferry-receive-";

fn os(s: impl Into<OsString>) -> OsString {
    s.into()
}

/// `PATH,name=BLOCK` for `--ram`.
fn ram_arg(path: &Path, name: &str) -> OsString {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(",name={name}"));
    s
}

/// Starts `ferry receive ARGS...` (stderr to `DIR/receive.err`); returns it
/// and the address it listens on.
fn start(dir: &Path, args: &[OsString]) -> (Process, String) {
    ferry(&[os("receive")])
        .args(args)
        .start(&dir.join("receive.err"))
        .and_then(|mut p| Ok((p.wait_listening(LISTEN_TIMEOUT)?, p)))
        .map(|(uri, p)| (p, uri))
        .unwrap_or_else(|e| panic!("ferry receive did not listen: {e}"))
}

/// Waits for ferry to exit; returns its status and every stderr line. Also
/// checks that no process of it keeps stderr open afterwards (an actor that
/// outlived the orchestrator would).
fn finish(p: &mut Process, timeout: Duration) -> (ExitStatus, Vec<String>) {
    let status = p.wait(timeout).unwrap_or_else(|e| panic!("{e}"));
    p.wait_released(Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("{e} ({status}); stderr:\n{}", p.stderr()));
    (status, p.stderr().lines().map(str::to_owned).collect())
}

/// The one line of a failed run that is not the listening line.
fn error_line(stderr: &[String]) -> &str {
    let rest: Vec<&String> = stderr
        .iter()
        .filter(|l| !l.starts_with("ferry: listening on "))
        .collect();
    assert_eq!(
        rest.len(),
        1,
        "expected exactly one error line on stderr, got:\n{}",
        stderr.join("\n")
    );
    let line = rest[0].as_str();
    assert!(line.starts_with("ferry: "), "error line: {line}");
    line
}

/// A complete stream of `blocks` from the reference encoder.
fn stream_bytes(blocks: &[(&str, &[u8])], level: Option<u32>) -> (Vec<u8>, PageCounts) {
    let mut f = QemuFileWriter::new(MemTransport::new());
    let counts = image::write_stream(&mut f, blocks, &DeviceState::default(), "none", level)
        .expect("encoding a stream");
    let bytes = f.into_transport().expect("flushing the stream").take();
    (bytes, counts)
}

/// A connection to a listening `ferry receive`.
enum Peer {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Peer {
    fn connect(addr: &str) -> Peer {
        let peer = if let Some(path) = addr.strip_prefix("unix:") {
            Peer::Unix(UnixStream::connect(path).expect("connecting to the unix socket"))
        } else if let Some(hostport) = addr.strip_prefix("tcp:") {
            Peer::Tcp(TcpStream::connect(hostport).expect("connecting over tcp"))
        } else {
            panic!("unexpected listen address {addr:?}")
        };
        let timeout = Some(RUN_TIMEOUT);
        match &peer {
            Peer::Unix(s) => s.set_read_timeout(timeout),
            Peer::Tcp(s) => s.set_read_timeout(timeout),
        }
        .expect("setting a read timeout");
        peer
    }

    fn stream(&mut self) -> &mut dyn ReadWrite {
        match self {
            Peer::Unix(s) => s,
            Peer::Tcp(s) => s,
        }
    }

    /// Ends our half of the connection: the receiver sees end of input.
    fn finish(&self) {
        let _ = match self {
            Peer::Unix(s) => s.shutdown(Shutdown::Write),
            Peer::Tcp(s) => s.shutdown(Shutdown::Write),
        };
    }

    /// Everything the receiver writes back until it closes (or resets) the
    /// connection.
    fn reply(&mut self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match self.stream().read(&mut buf) {
                Ok(0) => return out,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    panic!("no end of the reply within {RUN_TIMEOUT:?}")
                }
                // A receiver that failed closes with our data unread: a reset
                // after what it wrote.
                Err(_) => return out,
            }
        }
    }

    /// Writes `bytes` (stopping quietly if the receiver went away), ends our
    /// half and returns the reply.
    fn exchange(mut self, bytes: &[u8]) -> Vec<u8> {
        let _ = self.stream().write_all(bytes);
        self.finish();
        self.reply()
    }
}

trait ReadWrite: Read + Write {}
impl<T: Read + Write> ReadWrite for T {}

/// The Ack in a reply, which must be HELLO and one JSON line, or nothing.
fn parse_reply(reply: &[u8]) -> Option<Ack> {
    if reply.is_empty() {
        return None;
    }
    let text = String::from_utf8_lossy(reply);
    let rest = reply
        .strip_prefix(HELLO)
        .unwrap_or_else(|| panic!("reply does not start with HELLO: {text:?}"));
    let line = rest
        .strip_suffix(b"\n")
        .unwrap_or_else(|| panic!("reply does not end with a newline: {text:?}"));
    assert!(
        !line.contains(&b'\n'),
        "more than one line after HELLO: {text:?}"
    );
    Some(serde_json::from_slice(line).unwrap_or_else(|e| panic!("Ack is not JSON ({e}): {text:?}")))
}

/// (a) Reference streams over unix and tcp, plain and compressed: the RAM
/// files equal the source, the Ack carries the right digests, the statistics
/// add up.
fn round_trip(listen: &str, level: Option<u32>) {
    let dir = tempdir(PREFIX);
    let big = ram::mixed_image(8 << 20, 21);
    let small = ram::mixed_image(256 << 10, 22);
    let (stream, counts) = stream_bytes(&[("pc.ram", &big), ("tail", &small)], level);

    // One destination file exists (with other contents), one is created.
    let dest_big = dir.path().join("dest-big.ram");
    let dest_small = dir.path().join("dest-small.ram");
    fs::write(&dest_big, vec![0x5a; big.len()]).unwrap();
    let stats = dir.path().join("stats.json");
    let listen = listen.replace("DIR", &dir.path().display().to_string());
    let (mut recv, addr) = start(
        dir.path(),
        &[
            os("--listen"),
            os(&listen),
            os("--ram"),
            ram_arg(&dest_big, "pc.ram"),
            os("--ram"),
            ram_arg(&dest_small, "tail"),
            os("--decompress-workers"),
            os("2"),
            os("--stats-json"),
            stats.clone().into_os_string(),
        ],
    );
    if listen.ends_with(":0") {
        assert!(
            !addr.ends_with(":0"),
            "listening address {addr} is not the bound port"
        );
    } else {
        assert_eq!(addr, listen);
    }
    let reply = Peer::connect(&addr).exchange(&stream);
    let (status, stderr) = finish(&mut recv, RUN_TIMEOUT);
    assert!(
        status.success(),
        "ferry receive failed ({status}):\n{}",
        stderr.join("\n")
    );

    assert_same_bytes(&big, &dest_big);
    assert_same_bytes(&small, &dest_small);

    let ack = parse_reply(&reply).expect("a ferry receiver answers on the return path");
    assert!(ack.ok && ack.error.is_none(), "{ack:?}");
    let want = [("pc.ram", &big), ("tail", &small)];
    assert_eq!(ack.digests.len(), 2, "{ack:?}");
    for (d, (name, data)) in ack.digests.iter().zip(want) {
        assert_eq!(d.name, name);
        assert_eq!(d.length, data.len() as u64);
        assert_eq!(d.xxh3, ferry_digest(data), "digest of {name}");
    }

    let summary = stderr.last().expect("a summary line");
    assert!(
        summary.starts_with(&format!("ferry: received {} bytes", stream.len())),
        "summary: {summary}"
    );
    let s = read_json(&stats);
    assert_eq!(s["status"], "completed", "{s}");
    let ram = &s["ram"];
    assert_eq!(ram["total"], (big.len() + small.len()) as u64, "{s}");
    assert_eq!(ram["transferred"], stream.len() as u64, "{s}");
    assert_eq!(ram["duplicate"], counts.zero, "{s}");
    assert_eq!(ram["normal"], counts.raw, "{s}");
    assert_eq!(ram["compressed"], counts.compressed, "{s}");
    assert_eq!(ram["compressed-size"], counts.compressed_bytes, "{s}");
    assert_eq!(counts.compressed > 0, level.is_some());
    assert_eq!(s["digests"][0]["xxh3"], ferry_digest(&big).as_str(), "{s}");
    assert!(s["mbps"].as_f64().is_some_and(|m| m > 0.0), "{s}");
    assert!(s["total-time"].as_u64().is_some(), "{s}");
    for p in ["reader", "orchestrator"] {
        let u = &s["processes"][p];
        assert!(u["cpu-seconds"].as_f64().is_some(), "{p}: {s}");
        assert!(
            u["peak-rss-bytes"].as_u64().is_some_and(|b| b > 0),
            "{p}: {s}"
        );
    }
}

#[test]
fn unix_plain_stream_loads() {
    round_trip("unix:DIR/m.sock", None);
}

#[test]
fn unix_compressed_stream_loads() {
    round_trip("unix:DIR/m.sock", Some(1));
}

#[test]
fn tcp_plain_stream_loads() {
    round_trip("tcp:127.0.0.1:0", None);
}

#[test]
fn tcp_compressed_stream_loads() {
    round_trip("tcp:127.0.0.1:0", Some(6));
}

/// A saved stream: `--listen file:PATH` loads it; there is no one to answer.
#[test]
fn file_stream_loads() {
    let dir = tempdir(PREFIX);
    let data = ram::mixed_image(1 << 20, 23);
    let (stream, _) = stream_bytes(&[("mem", &data)], Some(1));
    let path = dir.path().join("stream.mig");
    fs::write(&path, &stream).unwrap();
    let dest = dir.path().join("dest.ram");
    let mut uri = os("file:");
    uri.push(&path);
    let out = run_ferry(
        [
            os("receive"),
            os("--listen"),
            uri,
            os("--ram"),
            ram_arg(&dest, "mem"),
        ],
        RUN_TIMEOUT,
    )
    .and_then(|o| o.success())
    .unwrap_or_else(|e| panic!("{e}"));
    assert_same_bytes(&data, &dest);
    assert!(out.stderr.contains("ferry: received"), "{}", out.stderr);
}

/// Starts `ferry receive` on a unix socket in `dir` for one block `mem` in
/// `dest`, sends `bytes`, and returns (status, stderr, Ack).
fn receive_bytes(dir: &Path, dest: &Path, bytes: &[u8]) -> (ExitStatus, Vec<String>, Option<Ack>) {
    let sock = dir.join("r.sock");
    let stats = dir.join("stats.json");
    let mut uri = os("unix:");
    uri.push(&sock);
    let (mut recv, addr) = start(
        dir,
        &[
            os("--listen"),
            uri,
            os("--ram"),
            ram_arg(dest, "mem"),
            os("--stats-json"),
            stats.clone().into_os_string(),
        ],
    );
    let reply = Peer::connect(&addr).exchange(bytes);
    let (status, stderr) = finish(&mut recv, RUN_TIMEOUT);
    let ack = parse_reply(&reply);
    if !status.success() {
        assert_eq!(
            read_json(&stats)["status"],
            "failed",
            "stats of a failed run"
        );
    }
    (status, stderr, ack)
}

fn assert_failed(status: ExitStatus, stderr: &[String], ack: &Option<Ack>, needle: &str) {
    assert_eq!(status.code(), Some(1), "stderr:\n{}", stderr.join("\n"));
    let line = error_line(stderr);
    assert!(line.contains(needle), "error line lacks {needle:?}: {line}");
    if let Some(ack) = ack {
        assert!(!ack.ok && ack.digests.is_empty(), "{ack:?}");
        let error = ack.error.as_deref().unwrap_or_default();
        assert!(
            error.contains(needle),
            "Ack error lacks {needle:?}: {error}"
        );
    }
}

/// (b) A connection closed mid-way, and one closed just before the EOF marker
/// (all RAM there, the end missing): both fail, naming where the stream ended.
#[test]
fn truncated_streams_fail() {
    let data = ram::mixed_image(2 << 20, 24);
    let (stream, _) = stream_bytes(&[("mem", &data)], Some(1));
    assert_eq!(
        stream.last(),
        Some(&0),
        "the reference stream ends with EOF"
    );
    for cut in [stream.len() / 2, stream.len() - 1] {
        let dir = tempdir(PREFIX);
        let dest = dir.path().join("dest.ram");
        let (status, stderr, ack) = receive_bytes(dir.path(), &dest, &stream[..cut]);
        assert_failed(
            status,
            &stderr,
            &ack,
            &format!("unexpected end of stream at byte {cut}"),
        );
    }
}

/// (c) A compressed page that is not a zlib stream: the error names the
/// record's offset.
#[test]
fn corrupt_compressed_page_fails_naming_its_offset() {
    let data = ram::mixed_image(2 << 20, 25);
    let (mut stream, _) = stream_bytes(&[("mem", &data)], Some(1));
    let mut parser = Parser::new(QemuFileReader::new(MemTransport::from_bytes(
        stream.clone(),
    )));
    let mut seen = 0;
    let (record, data_at) = loop {
        let at = parser.offset();
        let len = match parser.next().expect("parsing the reference stream") {
            Item::Ram(RamRecord::Compressed { data, .. }) => data.len() as u64,
            Item::End => panic!("fewer than 100 compressed pages"),
            _ => continue,
        };
        seen += 1;
        if seen == 100 {
            break (at, parser.offset() - len);
        }
    };
    // 0x78 (deflate, 32 KiB window) becomes 0x87: not a zlib header.
    stream[data_at as usize] ^= 0xff;
    let dir = tempdir(PREFIX);
    let (status, stderr, ack) = receive_bytes(dir.path(), &dir.path().join("dest.ram"), &stream);
    assert_failed(
        status,
        &stderr,
        &ack,
        &format!("at byte {record}: compressed page"),
    );
}

/// (d) A destination RAM file of another size than the block: one line naming
/// both sizes, and the file is left alone.
#[test]
fn ram_file_of_the_wrong_size_fails() {
    let data = ram::mixed_image(1 << 20, 26);
    let (stream, _) = stream_bytes(&[("mem", &data)], None);
    let dir = tempdir(PREFIX);
    let dest = dir.path().join("dest.ram");
    fs::write(&dest, vec![7u8; 12 * 4096]).unwrap();
    let (status, stderr, ack) = receive_bytes(dir.path(), &dest, &stream);
    assert_failed(status, &stderr, &ack, "mismatched block sizes");
    let line = error_line(&stderr);
    assert!(line.contains("1048576") && line.contains("49152"), "{line}");
    assert_eq!(
        fs::read(&dest).unwrap(),
        vec![7u8; 12 * 4096],
        "the file was changed"
    );
}

/// (d) A block without a RAM file of its name: the error names the block and
/// the names that were given.
#[test]
fn block_without_a_ram_file_fails() {
    let data = ram::mixed_image(1 << 20, 27);
    let (stream, _) = stream_bytes(&[("pc.ram", &data)], None);
    let dir = tempdir(PREFIX);
    let (status, stderr, ack) = receive_bytes(dir.path(), &dir.path().join("dest.ram"), &stream);
    assert_failed(status, &stderr, &ack, "RAM block \"pc.ram\"");
    assert!(error_line(&stderr).contains("\"mem\""), "{stderr:?}");
}

/// (e) A port in use: exit 1 with one line naming the address.
#[test]
fn port_in_use_fails() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("binding a port");
    let port = taken.local_addr().unwrap().port();
    let dir = tempdir(PREFIX);
    let out = run_ferry(
        [
            os("receive"),
            os("--listen"),
            os(format!("tcp:127.0.0.1:{port}")),
            os("--ram"),
            ram_arg(&dir.path().join("dest.ram"), "mem"),
        ],
        Duration::from_secs(30),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(out.status.code(), Some(1), "stderr:\n{}", out.stderr);
    let lines: Vec<String> = out.stderr.lines().map(str::to_owned).collect();
    let line = error_line(&lines);
    assert!(
        line.contains(&format!("cannot listen on tcp:127.0.0.1:{port}")) && line.contains("in use"),
        "{line}"
    );
}

/// (f) QEMU 7.2 as the source, migrating live over tcp to `ferry receive`.
fn from_qemu(compress: Option<(u8, u8)>) {
    const SIZE: u64 = 64 << 20;
    let dir = tempdir(PREFIX);
    let source = dir.path().join("source.ram");
    ram::write_mixed_image(&source, SIZE as usize, 31).expect("writing the RAM image");
    let dest = dir.path().join("dest.ram");
    let stats = dir.path().join("stats.json");
    let (mut recv, addr) = start(
        dir.path(),
        &[
            os("--listen"),
            os("tcp:127.0.0.1:0"),
            os("--ram"),
            ram_arg(&dest, "mem"),
            os("--stats-json"),
            stats.clone().into_os_string(),
        ],
    );

    let mut args = none_machine_args(&source, SIZE);
    args.push("-S".into());
    let mut qemu = Qemu::spawn(&args).unwrap_or_else(|e| panic!("starting the QEMU source: {e}"));
    if let Some((threads, level)) = compress {
        qemu.set_capability("compress", true)
            .unwrap_or_else(|e| panic!("{e}"));
        qemu.execute(
            "migrate-set-parameters",
            Some(json!({ "compress-threads": threads, "compress-level": level })),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    }
    qemu.execute("migrate", Some(json!({ "uri": addr })))
        .unwrap_or_else(|e| panic!("{e}"));
    qemu.wait_migration("completed", RUN_TIMEOUT)
        .unwrap_or_else(|e| panic!("QEMU migrating to ferry: {e}"));
    let (status, stderr) = finish(&mut recv, RUN_TIMEOUT);
    assert!(
        status.success(),
        "ferry receive failed ({status}):\n{}",
        stderr.join("\n")
    );
    assert_same_file(&source, &dest);
    let s = read_json(&stats);
    assert_eq!(s["status"], "completed", "{s}");
    let count = |k: &str| {
        s["ram"][k]
            .as_u64()
            .unwrap_or_else(|| panic!("no ram.{k}: {s}"))
    };
    assert_eq!(count("compressed") > 0, compress.is_some(), "{s}");
    // QEMU 7.2 sends ZERO records for all-zero pages only, each at least once.
    let zero = ram::census(SIZE as usize).zero;
    assert!(
        count("duplicate") >= zero,
        "fewer than {zero} ZERO records: {s}"
    );
}

#[test]
fn qemu_source_plain() {
    from_qemu(None);
}

#[test]
fn qemu_source_compressed() {
    from_qemu(Some((2, 1)));
}

/// (g) The reader process killed mid-transfer: `ferry receive` notices within
/// 5 s (generous for a busy machine, far from the stall timer's 60 s), names
/// the reader, and leaves no process behind.
#[test]
fn killed_reader_is_reported() {
    let dir = tempdir(PREFIX);
    let data = ram::mixed_image(4 << 20, 28);
    let (stream, _) = stream_bytes(&[("mem", &data)], None);
    let mut uri = os("unix:");
    uri.push(dir.path().join("k.sock"));
    let (mut recv, addr) = start(
        dir.path(),
        &[
            os("--listen"),
            uri,
            os("--ram"),
            ram_arg(&dir.path().join("dest.ram"), "mem"),
        ],
    );
    let reader = recv
        .wait_actor("reader", LISTEN_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));

    // 16 KiB every 10 ms: the 4 MiB stream would take several seconds.
    let mut peer = Peer::connect(&addr);
    let (sent_tx, sent_rx) = mpsc::channel();
    let writer = thread::spawn(move || {
        for chunk in stream.chunks(16 << 10) {
            if peer.stream().write_all(chunk).is_err() {
                return;
            }
            let _ = sent_tx.send(());
            thread::sleep(Duration::from_millis(10));
        }
    });
    for _ in 0..20 {
        sent_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("the stream is being written");
    }
    proc::kill9(reader);
    let killed = Instant::now();
    let (status, stderr) = finish(&mut recv, Duration::from_secs(10));
    let took = killed.elapsed();
    assert!(
        !status.success(),
        "ferry receive succeeded without its reader"
    );
    // Far below the 60 s default stall timeout: the death notice ended it.
    assert!(
        took < Duration::from_secs(5),
        "noticed the dead reader only after {took:?}"
    );
    let line = error_line(&stderr);
    assert!(
        line.contains("reader") && line.contains("signal 9"),
        "{line}"
    );
    proc::wait_gone(&[reader, recv.pid()], Duration::from_secs(2))
        .expect("no ferry process is left behind");
    writer.join().expect("the writer thread");
}
