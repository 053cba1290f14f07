//! ferry to ferry over multifd channels, live: `ferry send
//! --multifd-channels N` from a `ferry loadgen` guest that keeps dirtying
//! its RAM into `ferry receive --multifd-channels N`. The destination must
//! equal the stopped guest byte for byte, both ends must count the pages
//! alike, and one channel cut in the middle (by a TCP proxy this test runs,
//! which drops that one connection) must fail the whole migration on both
//! ends, naming the channel, with the guest left running and the
//! destination not complete, within a deadline.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use ferry_proto::multifd::{self, ChannelInit, INIT_LEN};
use ferry_tests::ferry::run_ferry;
use ferry_tests::files::{assert_same_file, read_json, shm_tempdir};
use ferry_tests::guest::{loadgen, Guest};
use ferry_tests::migrate::{self, assert_both_succeed, named};
use ferry_tests::proc::Process;
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(180);
const PREFIX: &str = "ferry-mfferry-";
/// How soon both ends must give up once a channel is cut: the default
/// --stall-timeout is 60 s, so failing within this shows that the cut, not
/// the stall timer, ended the run.
const PROMPT: Duration = Duration::from_secs(15);

fn guest(dir: &Path, size: &str, rate: &str) -> Guest {
    loadgen(dir, "src", size)
        .rate(rate)
        .start()
        .expect("starting ferry loadgen")
}

/// `ferry receive --multifd-channels N` into `DIR/dst.ram`.
fn receiver(dir: &Path, channels: u8) -> (Process, String) {
    migrate::receive(dir, "tcp:127.0.0.1:0", &dir.join("dst.ram"))
        .args(&["--multifd-channels", &channels.to_string()])
        .start_listening(&dir.join("receive.err"))
        .expect("starting ferry receive")
}

/// `ferry send` of the guest with N channels and `compression`.
fn sender(
    dir: &Path,
    g: &Guest,
    to: &str,
    channels: u8,
    compression: &str,
    extra: &[&str],
) -> Process {
    migrate::send(dir, "send", to)
        .args(&g.send_args())
        .args(&[
            "--multifd-channels",
            &channels.to_string(),
            "--multifd-compression",
            compression,
        ])
        .args(extra)
        .start(&dir.join("send.err"))
        .expect("starting ferry send")
}

fn pages(v: &Value) -> u64 {
    v.as_u64()
        .unwrap_or_else(|| panic!("a page count, not {v}"))
}

/// Both ends counted every page alike: zero pages on the main stream, the
/// others raw (compression none) or compressed (zstd), over all rounds.
fn assert_counts_agree(send: &Value, receive: &Value, compression: &str) {
    let (s, r) = (&send["ram"], &receive["ram"]);
    assert_eq!(
        s["duplicate"], r["duplicate"],
        "zero pages: {send}\n{receive}"
    );
    let sent_compressed = pages(&send["compression"]["pages"]);
    assert_eq!(
        pages(&r["normal"]),
        pages(&s["normal"]),
        "raw: {send}\n{receive}"
    );
    assert_eq!(
        pages(&r["compressed"]),
        sent_compressed,
        "compressed: {send}\n{receive}"
    );
    if compression == "none" {
        assert_eq!(sent_compressed, 0, "{send}");
        assert!(pages(&r["normal"]) > 0, "{receive}");
    } else {
        assert_eq!(
            pages(&r["normal"]),
            0,
            "every packet was {compression}: {receive}"
        );
        assert!(pages(&r["compressed"]) > 0, "{receive}");
        assert!(
            pages(&r["compressed-size"]) < pages(&r["compressed"]) * 4096,
            "{receive}"
        );
    }
}

#[test]
fn live_multifd_ferry_to_ferry_with_2_and_4_channels_none_and_zstd_equals_the_source() {
    for channels in [2u8, 4] {
        for compression in ["none", "zstd"] {
            let dir = shm_tempdir(PREFIX);
            let d = dir.path();
            let g = guest(d, "256M", "64M");
            let (mut r, uri) = receiver(d, channels);
            let mut s = sender(
                d,
                &g,
                &uri,
                channels,
                compression,
                &["--max-bandwidth", "256M"],
            );
            assert_both_succeed(&mut s, &mut r, TIMEOUT);
            assert!(s.stderr().contains("RAM digests match"), "{}", s.stderr());
            // Stopped after a completed migration: its RAM is what it was at
            // switchover.
            assert_eq!(g.status().unwrap(), "postmigrate");
            assert_same_file(&g.ram, &d.join("dst.ram"));
            let (st, rt) = (
                read_json(&d.join("send.json")),
                read_json(&d.join("receive.json")),
            );
            assert_eq!(st["status"], "completed", "{st}");
            assert_eq!(rt["status"], "completed", "{rt}");
            assert!(
                st["rounds"].as_array().is_some_and(|r| !r.is_empty()),
                "the guest dirtied pages while the first round ran: {st}"
            );
            let bytes = st["multifd"]["bytes"].as_array().expect("multifd.bytes");
            assert_eq!(bytes.len(), usize::from(channels), "{st}");
            assert!(
                bytes.iter().all(|b| b.as_u64().unwrap_or(0) > 1 << 20),
                "every channel carried pages: {st}"
            );
            assert_counts_agree(&st, &rt, compression);
        }
    }
}

/// A TCP proxy in front of the receiver that forwards every connection and
/// cuts the one of multifd channel `channel` (both directions, both sides)
/// once `after` bytes of it went through.
struct Proxy {
    addr: String,
    /// When the cut happened.
    cut: Arc<Mutex<Option<Instant>>>,
}

impl Proxy {
    fn start(upstream: &str, channel: u8, after: u64) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the proxy");
        let addr = format!("tcp:{}", listener.local_addr().unwrap());
        let upstream = upstream.trim_start_matches("tcp:").to_owned();
        let cut = Arc::new(Mutex::new(None));
        let cut2 = Arc::clone(&cut);
        thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(server) = TcpStream::connect(&upstream) else {
                    return;
                };
                let (mut c, mut s) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                thread::spawn(move || {
                    let _ = std::io::copy(&mut s, &mut c);
                    let _ = c.shutdown(Shutdown::Write);
                });
                let cut = Arc::clone(&cut2);
                thread::spawn(move || forward(client, server, channel, after, &cut));
            }
        });
        Self { addr, cut }
    }

    fn cut_at(&self) -> Option<Instant> {
        *self.cut.lock().unwrap()
    }
}

/// Copies the sender's bytes to the receiver, cutting both connections of
/// channel `channel` after `after` bytes.
fn forward(
    mut client: TcpStream,
    mut server: TcpStream,
    channel: u8,
    after: u64,
    cut: &Mutex<Option<Instant>>,
) {
    let mut init = [0u8; INIT_LEN];
    if client.read_exact(&mut init[..4]).is_err() {
        return;
    }
    let first: [u8; 4] = init[..4].try_into().unwrap();
    let mut target = false;
    let mut head = 4;
    if multifd::is_channel_magic(first) {
        if client.read_exact(&mut init[4..]).is_err() {
            return;
        }
        head = INIT_LEN;
        target = ChannelInit::decode(&init).is_ok_and(|i| i.id == channel);
    }
    if server.write_all(&init[..head]).is_err() {
        return;
    }
    let mut sent = head as u64;
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match client.read(&mut buf) {
            Ok(0) | Err(_) => {
                let _ = server.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => n,
        };
        if target && sent + n as u64 >= after {
            let keep = (after - sent.min(after)) as usize;
            let _ = server.write_all(&buf[..keep]);
            let _ = client.shutdown(Shutdown::Both);
            let _ = server.shutdown(Shutdown::Both);
            *cut.lock().unwrap() = Some(Instant::now());
            return;
        }
        if server.write_all(&buf[..n]).is_err() {
            let _ = client.shutdown(Shutdown::Both);
            return;
        }
        sent += n as u64;
    }
}

/// Waits for `p` to exit, at most `PROMPT` after `since`; returns its stderr.
fn assert_fails_promptly(p: &mut Process, what: &str, since: Instant) -> String {
    let left = PROMPT.saturating_sub(since.elapsed()) + Duration::from_millis(500);
    let status = p
        .wait(left)
        .unwrap_or_else(|e| panic!("{what} did not end within {PROMPT:?} of the cut: {e}"));
    assert!(!status.success(), "{what} must fail: {}", p.stderr());
    p.stderr()
}

#[test]
fn a_channel_cut_mid_run_fails_the_whole_migration_on_both_ends() {
    for (channels, compression, cut) in [(2u8, "none", 1u8), (4, "zstd", 2)] {
        let dir = shm_tempdir(PREFIX);
        let d = dir.path();
        let g = guest(d, "256M", "32M");
        let (mut r, uri) = receiver(d, channels);
        // Slow enough that the cut lands well inside the first round.
        let proxy = Proxy::start(&uri, cut, 4 << 20);
        let mut s = sender(
            d,
            &g,
            &proxy.addr,
            channels,
            compression,
            &["--max-bandwidth", "24M"],
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        let at = loop {
            if let Some(at) = proxy.cut_at() {
                break at;
            }
            assert!(
                s.try_status().unwrap().is_none(),
                "send ended before the cut: {}",
                s.stderr()
            );
            assert!(
                Instant::now() < deadline,
                "channel {cut} never carried 4 MiB"
            );
            thread::sleep(Duration::from_millis(20));
        };
        let send_err = assert_fails_promptly(&mut s, "ferry send", at);
        let recv_err = assert_fails_promptly(&mut r, "ferry receive", at);
        let named = format!("multifd channel {cut}");
        assert!(
            recv_err.contains(&named),
            "the receiver names {named}: {recv_err}"
        );
        assert!(
            send_err.contains(&named),
            "the sender names {named}: {send_err}"
        );
        assert_eq!(
            g.status().unwrap(),
            "running",
            "a failed migration leaves the guest running"
        );
        assert_eq!(read_json(&d.join("send.json"))["status"], "failed");
        assert_eq!(read_json(&d.join("receive.json"))["status"], "failed");
    }
}

#[test]
fn a_channel_count_mismatch_names_both_counts() {
    let dir = shm_tempdir(PREFIX);
    let d = dir.path();
    let src = d.join("src.ram");
    ferry_tests::ram::write_mixed_image(&src, 8 << 20, 7).expect("writing RAM");
    let (mut r, uri) = receiver(d, 2);
    let mut s = migrate::send(d, "send", &uri)
        .args(&["--ram", &named(&src, "ram"), "--multifd-channels", "4"])
        .start(&d.join("send.err"))
        .expect("starting ferry send");
    let since = Instant::now();
    let recv_err = assert_fails_promptly(&mut r, "ferry receive", since);
    assert!(
        recv_err.contains("expects 2") && recv_err.contains("the source uses at least"),
        "{recv_err}"
    );
    assert_fails_promptly(&mut s, "ferry send", since);
    assert_eq!(read_json(&d.join("receive.json"))["status"], "failed");
}

#[test]
fn multifd_compression_without_channels_is_refused() {
    let dir = shm_tempdir(PREFIX);
    let src = dir.path().join("src.ram");
    ferry_tests::ram::write_mixed_image(&src, 1 << 20, 8).expect("writing RAM");
    let ram = named(&src, "ram");
    let out = run_ferry(
        [
            "send",
            "--ram",
            &ram,
            "--to",
            "tcp:127.0.0.1:9",
            "--multifd-channels",
            "0",
            "--multifd-compression",
            "zstd",
        ],
        Duration::from_secs(30),
    )
    .expect("running ferry send");
    assert!(!out.status.success(), "accepted: {}", out.stderr);
    assert!(
        out.stderr
            .contains("--multifd-compression zstd needs multifd channels"),
        "{}",
        out.stderr
    );
}

/// A sparse source's holes are sent as zero without being read (the source
/// file allocates nothing more), and land as zero even in a destination
/// file that existed before full of other bytes: single stream and multifd.
#[test]
fn a_sparse_source_clears_the_holes_of_an_existing_destination() {
    use std::os::unix::fs::{FileExt, MetadataExt};
    for channels in [0u8, 2] {
        let dir = shm_tempdir(PREFIX);
        let d = dir.path();
        let (src, dest) = (d.join("src.ram"), d.join("dst.ram"));
        let size = 64u64 << 20;
        let f = std::fs::File::create(&src).unwrap();
        f.set_len(size).unwrap();
        for (i, at) in [0u64, 5 << 20, 33 << 20, size - 8192]
            .into_iter()
            .enumerate()
        {
            f.write_all_at(&vec![i as u8 + 1; 8192], at).unwrap();
        }
        let allocated = f.metadata().unwrap().blocks();
        std::fs::write(&dest, vec![0xaa; size as usize]).unwrap();
        let n = channels.to_string();
        let multifd: &[&str] = if channels > 0 {
            &["--multifd-channels", &n]
        } else {
            &[]
        };
        let (mut r, uri) = migrate::receive(d, "tcp:127.0.0.1:0", &dest)
            .args(multifd)
            .start_listening(&d.join("receive.err"))
            .expect("starting ferry receive");
        let mut s = migrate::send(d, "send", &uri)
            .args(&["--ram", &named(&src, "ram")])
            .args(multifd)
            .start(&d.join("send.err"))
            .expect("starting ferry send");
        assert_both_succeed(&mut s, &mut r, TIMEOUT);
        assert_same_file(&src, &dest);
        assert_eq!(
            f.metadata().unwrap().blocks(),
            allocated,
            "the source's holes stayed holes"
        );
        let st = read_json(&d.join("send.json"));
        assert_eq!(
            pages(&st["ram"]["duplicate"]),
            size / 4096 - 8,
            "every page of a hole went as a zero page: {st}"
        );
    }
}
