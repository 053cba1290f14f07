//! The fault matrix: one test per row of deploy/FAULTS.md.
//!
//! Every ferry process of either side is killed with SIGKILL at four points of a live
//! migration of a dirtying `ferry loadgen` guest:
//!
//! - setup: all actors of both sides run and the TCP connection is established;
//! - bulk: 1.5 s into round 0 (the full copy);
//! - late round: right after round 1 ended, in round 2 of a guest that outruns the link;
//! - after stop: the switchover stopped the guest (its log says `loadgen stopped`) and
//!   the final round is on the wire.
//!
//! Each row checks the guest (running again, never left paused; `postmigrate` only
//! after a completed migration), both exit statuses, that the receiver never reports a
//! completed load, that the side that lost a process names it, that the other side
//! fails promptly on the broken connection (well before `--stall-timeout`), and that
//! no ferry process is left. Further rows: a receiver RAM file that cannot be written
//! (read-only, a directory, a full tmpfs), a peer that closes the socket, a second
//! sender at a busy receiver, and the link's bandwidth dropping mid-run.
//!
//! `query-status` cannot tell "paused" during a migration: the guest's control socket
//! serves one client at a time and `ferry send` holds it. The guest's own log
//! (`RUST_LOG=ferry=info`) says when it stopped and resumed.
//!
//! Set `FERRY_FAULTS_MD=FILE` to append each row's outcome to FILE as a markdown
//! table row. Needs root (mounts, namespaces).

use std::fs;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::ExitStatus;
use std::thread;
use std::time::{Duration, Instant};

use ferry_tests::netns::{
    describe, ferry, port_of, strip_ansi, wait_established, Guest, Process, Tmpfs, TwoHosts,
};
use ferry_tests::proc;
use ferry_tests::ram::first_difference;
use serde_json::Value;
use tempfile::TempDir;

/// Both sides' --stall-timeout: far above how fast a broken connection must be
/// noticed, so a row that only ends by the stall timer shows up as slow.
const STALL: &str = "10";
/// How soon the side that did not lose a process must fail.
const PROMPT: Duration = Duration::from_secs(5);

fn tempdir() -> TempDir {
    tempfile::Builder::new()
        .prefix("ferry-faults-")
        .tempdir_in("/dev/shm")
        .expect("creating a temporary directory")
}

fn json(path: &Path) -> Option<Value> {
    let text = fs::read_to_string(path).ok()?;
    Some(serde_json::from_str(&text).expect("statistics are JSON"))
}

/// `ferry receive --listen LISTEN --ram DEST,name=ram`, here or in `ns`.
fn receiver(dir: &Path, dest: &Path, listen: &str, ns: Option<&str>) -> (Process, String) {
    let mut r = ferry(&[
        "receive",
        "--listen",
        listen,
        "--ram",
        &format!("{},name=ram", dest.display()),
        "--stall-timeout",
        STALL,
        "--stats-json",
        &dir.join("receive.json").display().to_string(),
    ])
    .netns(ns)
    .start(&dir.join("receive.err"))
    .expect("starting ferry receive");
    let uri = r
        .wait_listening(Duration::from_secs(20))
        .expect("the receiver listens");
    (r, uri)
}

/// `ferry send` of guest `g` to `to`, logging rounds (`RUST_LOG=ferry=info`).
fn sender(
    dir: &Path,
    name: &str,
    g: &Guest,
    to: &str,
    extra: &[&str],
    ns: Option<&str>,
) -> Process {
    ferry(&[
        "send",
        "--to",
        to,
        "--no-progress",
        "--stall-timeout",
        STALL,
        "--stats-json",
        &dir.join(format!("{name}.json")).display().to_string(),
    ])
    .args(&g.send_args())
    .args(extra)
    .netns(ns)
    .info_log()
    .start(&dir.join(format!("{name}.err")))
    .expect("starting ferry send")
}

/// How each process ended and when, counted from `since`.
struct Ends {
    send: ExitStatus,
    send_took: Duration,
    recv: ExitStatus,
    recv_took: Duration,
}

/// Waits for both to exit (at most `limit` after `since`), watching both at once.
fn watch(s: &mut Process, r: &mut Process, since: Instant, limit: Duration) -> Ends {
    let (mut se, mut re) = (None, None);
    loop {
        if se.is_none() {
            se = s.try_status().unwrap().map(|st| (st, since.elapsed()));
        }
        if re.is_none() {
            re = r.try_status().unwrap().map(|st| (st, since.elapsed()));
        }
        if let (Some((send, send_took)), Some((recv, recv_took))) = (se, re) {
            return Ends {
                send,
                send_took,
                recv,
                recv_took,
            };
        }
        assert!(
            since.elapsed() < limit,
            "not both ended within {limit:?} (send {se:?}, receive {re:?})\nsend: {}\nreceive: {}",
            s.stderr(),
            r.stderr()
        );
        thread::sleep(Duration::from_millis(10));
    }
}

/// `text` with what changes from run to run replaced: temporary directories
/// by `DIR`; pids, ports and byte offsets by `N`.
fn anon(text: &str) -> String {
    const TMP: &str = "/dev/shm/ferry-faults-";
    let mut dirs = String::new();
    let mut rest = text;
    while let Some(at) = rest.find(TMP) {
        dirs.push_str(&rest[..at]);
        dirs.push_str("DIR");
        let tail = &rest[at + TMP.len()..];
        rest = &tail[tail.find(['/', ' ']).unwrap_or(tail.len())..];
    }
    dirs.push_str(rest);
    let mut out = String::new();
    let mut rest = dirs.as_str();
    while let Some(c) = rest.chars().next() {
        let numbered = ["pid ", "byte ", "127.0.0.1:"]
            .iter()
            .any(|p| out.ends_with(p));
        if numbered && c.is_ascii_digit() {
            let n = rest
                .find(|d: char| !d.is_ascii_digit())
                .unwrap_or(rest.len());
            out.push('N');
            rest = &rest[n..];
        } else {
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    out
}

/// Prints the row (and appends it to `$FERRY_FAULTS_MD`).
fn row(fault: &str, guest: &str, send: &str, recv: &str) {
    let line = format!(
        "| {fault} | {guest} | {} | {} |",
        anon(send).replace('|', "\\|"),
        anon(recv).replace('|', "\\|")
    );
    eprintln!("{line}");
    if let Some(path) = std::env::var_os("FERRY_FAULTS_MD") {
        let mut f = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("opening $FERRY_FAULTS_MD");
        writeln!(f, "{line}").expect("writing $FERRY_FAULTS_MD");
    }
}

/// `exit 1 after 0.3 s: ferry: ...` for the table.
fn outcome(status: ExitStatus, took: Duration, p: &Process) -> String {
    format!(
        "{} after {:.1} s: `{}`",
        describe(status),
        took.as_secs_f64(),
        p.last_line()
    )
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Sender,
    Receiver,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Point {
    Setup,
    Bulk,
    LateRound,
    AfterStop,
}

impl Point {
    /// The guest (`--size`, `--dirty-rate`, `--working-set`) and the sender's
    /// extra flags that make the point reachable and long enough to hit.
    fn scenario(
        self,
    ) -> (
        &'static str,
        &'static str,
        &'static str,
        &'static [&'static str],
    ) {
        match self {
            // Round 0 (~40 MB of non-zero pages at 8 MB/s) lasts ~5 s.
            Point::Setup | Point::Bulk => ("64M", "4M", "1", &["--max-bandwidth", "8M"]),
            // Dirties 64 MB/s over 32 MiB against a 32 MB/s link: never
            // converges, rounds of ~0.8 s go on until the kill.
            Point::LateRound => (
                "64M",
                "64M",
                "0.5",
                &["--max-bandwidth", "32M", "--max-iterations", "1000"],
            ),
            // After round 0 (~2.5 s) about 32 MiB are dirty: ~2 s at 16 MB/s,
            // under the 10 s downtime limit, so the guest stops and the final
            // round takes ~2 s.
            Point::AfterStop => (
                "64M",
                "32M",
                "0.5",
                &["--max-bandwidth", "16M", "--downtime-limit", "10000"],
            ),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Point::Setup => "setup",
            Point::Bulk => "bulk (round 0)",
            Point::LateRound => "late round (round 2+)",
            Point::AfterStop => "after stop (guest paused)",
        }
    }
}

/// One row of the SIGKILL matrix: `kind` (an actor, or `orchestrator`) of
/// `side` is killed at `point`.
fn kill_row(side: Side, kind: &str, point: Point) {
    let dir = tempdir();
    let (size, rate, ws, extra) = point.scenario();
    let mut g = Guest::start(
        dir.path(),
        "guest",
        None,
        size,
        rate,
        &["--working-set", ws],
    )
    .expect("starting the guest");
    let dest = dir.path().join("dst.ram");
    let (mut r, uri) = receiver(dir.path(), &dest, "tcp:127.0.0.1:0", None);
    let port = port_of(&uri).unwrap();
    let mut s = sender(dir.path(), "send", &g, &uri, extra, None);
    let mut pids = vec![s.pid(), r.pid()];
    for k in ["scanner", "compress", "writer"] {
        pids.push(s.wait_actor(k, Duration::from_secs(20)).unwrap());
    }
    pids.push(r.wait_actor("reader", Duration::from_secs(20)).unwrap());
    wait_established(r.pid(), port, Duration::from_secs(20)).unwrap();
    match point {
        Point::Setup => {}
        Point::Bulk => {
            thread::sleep(Duration::from_millis(1500));
            assert!(
                !strip_ansi(&s.stderr()).contains("round done"),
                "round 0 ended before the kill: {}",
                s.stderr()
            );
        }
        Point::LateRound => s
            .wait_for("round done round=1 ", Duration::from_secs(30))
            .unwrap(),
        Point::AfterStop => g
            .proc
            .wait_for("loadgen stopped", Duration::from_secs(30))
            .unwrap(),
    }
    assert!(
        s.try_status().unwrap().is_none(),
        "send ended: {}",
        s.stderr()
    );
    assert!(
        r.try_status().unwrap().is_none(),
        "receive ended: {}",
        r.stderr()
    );
    let victim = match (side, kind) {
        (Side::Sender, "orchestrator") => s.pid(),
        (Side::Receiver, "orchestrator") => r.pid(),
        (Side::Sender, k) => s.actor(k).expect("the actor runs"),
        (Side::Receiver, k) => r.actor(k).expect("the actor runs"),
    };
    let killed = Instant::now();
    proc::kill9(victim);
    let e = watch(&mut s, &mut r, killed, Duration::from_secs(30));
    let (st, took, other_st, other_took, p, other) = match side {
        Side::Sender => (e.send, e.send_took, e.recv, e.recv_took, &s, &r),
        Side::Receiver => (e.recv, e.recv_took, e.send, e.send_took, &r, &s),
    };

    // The side that lost a process fails, naming it (a killed orchestrator
    // just dies: its actors follow it, by PR_SET_PDEATHSIG).
    assert!(!st.success(), "{kind} killed, yet its side exited 0");
    if kind == "orchestrator" {
        assert_eq!(st.signal(), Some(9), "{st}");
    } else {
        let err = p.last_line();
        assert!(
            err.contains(kind) && err.contains("signal 9"),
            "names the killed {kind}: {err}"
        );
        assert!(took < Duration::from_secs(2), "noticed after {took:?}");
    }
    // The other side fails on the broken connection, not by its stall timer.
    assert!(
        !other_st.success(),
        "the other side must not succeed: {}",
        other.stderr()
    );
    assert!(
        other_took < PROMPT,
        "the other side failed only after {other_took:?}: {}",
        other.last_line()
    );
    // The destination never reports a completed load.
    assert!(!r.stderr().contains("ferry: received"), "{}", r.stderr());
    if let Some(st) = json(&dir.path().join("receive.json")) {
        assert_eq!(st["status"], "failed", "{st}");
    }
    if let Some(st) = json(&dir.path().join("send.json")) {
        assert_eq!(st["status"], "failed", "{st}");
    }
    // The guest runs: never stopped before the switchover, resumed after it.
    g.wait_status("running", Duration::from_secs(5))
        .expect("the guest runs after the failure");
    let glog = strip_ansi(&g.proc.stderr());
    let resumed = match (point, side, kind) {
        (Point::AfterStop, Side::Sender, "orchestrator") => {
            assert!(
                glog.contains("closed while the guest was stopped: resuming it"),
                "the guest resumed itself: {glog}"
            );
            "running (resumed itself when the control connection closed)"
        }
        (Point::AfterStop, ..) => {
            assert!(
                glog.contains("loadgen resumed"),
                "ferry resumed the guest: {glog}"
            );
            "running (resumed by `ferry send`)"
        }
        _ => {
            assert!(!glog.contains("loadgen stopped"), "{glog}");
            "running (never stopped)"
        }
    };
    proc::wait_gone(&pids, Duration::from_secs(5)).expect("no ferry process is left");
    let dead = "killed (signal 9); its actors die with it".to_owned();
    let (side_name, send, recv) = match (side, kind) {
        (Side::Sender, "orchestrator") => ("sender", dead, outcome(e.recv, e.recv_took, &r)),
        (Side::Receiver, "orchestrator") => ("receiver", outcome(e.send, e.send_took, &s), dead),
        (Side::Sender, _) => (
            "sender",
            outcome(e.send, e.send_took, &s),
            outcome(e.recv, e.recv_took, &r),
        ),
        (Side::Receiver, _) => (
            "receiver",
            outcome(e.send, e.send_took, &s),
            outcome(e.recv, e.recv_took, &r),
        ),
    };
    row(
        &format!("SIGKILL {side_name} {kind}, {}", point.name()),
        resumed,
        &send,
        &recv,
    );
}

macro_rules! kill_rows {
    ($($name:ident: $side:ident $kind:literal $point:ident;)*) => {
        $(
            #[test]
            fn $name() {
                kill_row(Side::$side, $kind, Point::$point);
            }
        )*
    };
}

kill_rows! {
    setup_sender_orchestrator: Sender "orchestrator" Setup;
    setup_sender_scanner: Sender "scanner" Setup;
    setup_sender_compress: Sender "compress" Setup;
    setup_sender_writer: Sender "writer" Setup;
    setup_receiver_orchestrator: Receiver "orchestrator" Setup;
    setup_receiver_reader: Receiver "reader" Setup;
    bulk_sender_orchestrator: Sender "orchestrator" Bulk;
    bulk_sender_scanner: Sender "scanner" Bulk;
    bulk_sender_compress: Sender "compress" Bulk;
    bulk_sender_writer: Sender "writer" Bulk;
    bulk_receiver_orchestrator: Receiver "orchestrator" Bulk;
    bulk_receiver_reader: Receiver "reader" Bulk;
    late_round_sender_orchestrator: Sender "orchestrator" LateRound;
    late_round_sender_scanner: Sender "scanner" LateRound;
    late_round_sender_compress: Sender "compress" LateRound;
    late_round_sender_writer: Sender "writer" LateRound;
    late_round_receiver_orchestrator: Receiver "orchestrator" LateRound;
    late_round_receiver_reader: Receiver "reader" LateRound;
    // The orchestrator killed while the guest is stopped: the guest resumes
    // itself when the control connection closes.
    after_stop_sender_orchestrator_guest_resumes_itself: Sender "orchestrator" AfterStop;
    after_stop_sender_scanner: Sender "scanner" AfterStop;
    after_stop_sender_compress: Sender "compress" AfterStop;
    after_stop_sender_writer: Sender "writer" AfterStop;
    after_stop_receiver_orchestrator: Receiver "orchestrator" AfterStop;
    after_stop_receiver_reader: Receiver "reader" AfterStop;
}

/// A migration whose receiver cannot write `dest`: the receiver fails saying
/// `needle` (or, with `signal`, its reader dies of that signal), the sender
/// fails, the guest runs on. Returns nothing; prints the row.
fn unwritable_row(fault: &str, dir: &Path, dest: &Path, needle: &str) {
    let g = Guest::start(dir, "guest", None, "64M", "4M", &[]).expect("starting the guest");
    let (mut r, uri) = receiver(dir, dest, "tcp:127.0.0.1:0", None);
    let mut s = sender(dir, "send", &g, &uri, &["--max-bandwidth", "64M"], None);
    let start = Instant::now();
    let e = watch(&mut s, &mut r, start, Duration::from_secs(30));
    let (rerr, serr) = (r.last_line(), s.last_line());
    assert!(!e.recv.success(), "the receiver succeeded: {}", r.stderr());
    assert!(
        rerr.contains(needle),
        "the receiver says {needle:?}: {rerr}"
    );
    // An error the reader reports, never a signal that kills it.
    assert!(!rerr.contains("signal"), "killed by a signal: {rerr}");
    assert!(!r.stderr().contains("ferry: received"), "{}", r.stderr());
    assert!(!e.send.success(), "the sender succeeded: {}", s.stderr());
    assert!(
        e.send_took < e.recv_took + PROMPT,
        "the sender failed {:?} after the receiver",
        e.send_took.saturating_sub(e.recv_took)
    );
    g.wait_status("running", Duration::from_secs(5))
        .expect("the guest runs on");
    row(
        fault,
        "running (never stopped)",
        &outcome(e.send, e.send_took, &s),
        &outcome(e.recv, e.recv_took, &r),
    );
    eprintln!("sender: {serr}\nreceiver: {rerr}");
}

#[test]
fn receiver_ram_file_read_only() {
    // Root writes through file modes, so the file sits on a read-only mount.
    let dir = tempdir();
    let mnt = dir.path().join("ro");
    fs::create_dir(&mnt).unwrap();
    let tmpfs = Tmpfs::mount(&mnt, "80m").expect("mounting a tmpfs");
    let dest = tmpfs.path().join("dst.ram");
    fs::File::create(&dest)
        .and_then(|f| f.set_len(64 << 20))
        .expect("creating the RAM file");
    tmpfs.remount_ro().expect("remounting read-only");
    unwritable_row(
        "receiver RAM file read-only (existing, right size, on a read-only mount)",
        dir.path(),
        &dest,
        "Read-only file system",
    );
}

#[test]
fn receiver_ram_file_is_a_directory() {
    let dir = tempdir();
    let dest = dir.path().join("dst.ram");
    fs::create_dir(&dest).unwrap();
    // The receiver names the path and says what is wrong with it.
    unwritable_row(
        "receiver RAM file is a directory",
        dir.path(),
        &dest,
        "is not a regular file",
    );
}

#[test]
fn receiver_ram_file_on_a_full_tmpfs() {
    // 64 MiB of guest RAM (~40 MB of non-zero pages) into an 8 MiB tmpfs: the
    // file is created sparse, and once the tmpfs is full the reader's writes
    // fail with ENOSPC, named with the file (pages go in with pwrite, so
    // this is an error, not a SIGBUS).
    let dir = tempdir();
    let mnt = dir.path().join("small");
    fs::create_dir(&mnt).unwrap();
    let tmpfs = Tmpfs::mount(&mnt, "8m").expect("mounting a tmpfs");
    let dest = tmpfs.path().join("dst.ram");
    unwritable_row(
        "receiver RAM file on a full tmpfs (8 MiB for 64 MiB)",
        dir.path(),
        &dest,
        "No space left on device",
    );
}

#[test]
fn peer_closes_the_socket() {
    // A fake receiver: accepts, reads 1 MiB, closes (with unread bytes in its
    // buffer, so the kernel answers the sender with a reset).
    let dir = tempdir();
    let g = Guest::start(dir.path(), "guest", None, "64M", "4M", &[]).expect("starting the guest");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let fake = thread::spawn(move || {
        let (mut c, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 64 << 10];
        let mut got = 0;
        while got < 1 << 20 {
            match c.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
        drop(c);
        (Instant::now(), got)
    });
    let mut s = sender(
        dir.path(),
        "send",
        &g,
        &format!("tcp:{addr}"),
        &["--max-bandwidth", "16M"],
        None,
    );
    let st = s.wait(Duration::from_secs(30)).expect("send ends");
    let ended = Instant::now();
    let (closed, got) = fake.join().unwrap();
    let took = ended.duration_since(closed);
    let err = s.last_line();
    assert!(got >= 1 << 20, "the fake receiver read {got} bytes");
    assert!(!st.success(), "send succeeded into a closed socket");
    assert!(took < Duration::from_secs(3), "noticed after {took:?}");
    assert!(
        err.contains("writer") && err.contains(&format!("tcp:{addr}")),
        "names the writer and the destination: {err}"
    );
    g.wait_status("running", Duration::from_secs(5))
        .expect("the guest runs on");
    assert_eq!(
        json(&dir.path().join("send.json")).unwrap()["status"],
        "failed"
    );
    row(
        "peer closes the socket after 1 MiB (fake receiver)",
        "running (never stopped)",
        &outcome(st, took, &s),
        "(a test socket: accepted, read 1 MiB, closed)",
    );
}

#[test]
fn a_second_sender_at_a_busy_receiver() {
    let dir = tempdir();
    let g1 = Guest::start(dir.path(), "guest1", None, "64M", "4M", &[]).expect("guest 1");
    let g2 = Guest::start(dir.path(), "guest2", None, "64M", "0", &[]).expect("guest 2");
    let dest = dir.path().join("dst.ram");
    let (mut r, uri) = receiver(dir.path(), &dest, "tcp:127.0.0.1:0", None);
    let port = port_of(&uri).unwrap();
    // ~40 MB at 16 MB/s: the first migration runs for ~3 s.
    let mut s1 = sender(
        dir.path(),
        "send1",
        &g1,
        &uri,
        &["--max-bandwidth", "16M"],
        None,
    );
    wait_established(r.pid(), port, Duration::from_secs(20)).unwrap();
    thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    let mut s2 = sender(dir.path(), "send2", &g2, &uri, &[], None);
    let st2 = s2
        .wait(Duration::from_secs(20))
        .expect("the second send ends");
    let took2 = t.elapsed();
    let err2 = s2.last_line();
    assert!(
        !st2.success(),
        "the second sender succeeded: {}",
        s2.stderr()
    );
    assert!(took2 < PROMPT, "the second sender failed after {took2:?}");
    assert!(err2.contains("cannot connect"), "a clear failure: {err2}");
    g2.wait_status("running", Duration::from_secs(5))
        .expect("the second guest runs on");
    // The first migration is undisturbed.
    let e = watch(&mut s1, &mut r, t, Duration::from_secs(60));
    assert!(e.send.success(), "the first send failed: {}", s1.stderr());
    assert!(e.recv.success(), "the receiver failed: {}", r.stderr());
    assert_eq!(g1.status().unwrap(), "postmigrate");
    let (a, b) = (fs::read(&g1.ram).unwrap(), fs::read(&dest).unwrap());
    assert!(first_difference(&a, &b).is_none() && a.len() == b.len());
    row(
        "second sender connects to a busy receiver",
        "first: postmigrate (migrated); second: running",
        &format!(
            "first: {}; second: {}",
            outcome(e.send, e.send_took, &s1),
            outcome(st2, took2, &s2)
        ),
        &outcome(e.recv, e.recv_took, &r),
    );
}

#[test]
fn the_link_bandwidth_drops_mid_run() {
    // ferry has no runtime control of --max-bandwidth; what can change mid-run
    // is the link. Round 0 starts at 400 Mbit/s (50 MB/s) and the link drops to
    // 80 Mbit/s (10 MB/s) 300 ms in: the migration slows down and completes.
    let hosts = TwoHosts::new("400mbit").expect("two hosts");
    let dir = tempdir();
    let g = Guest::start(dir.path(), "guest", Some(&hosts.a), "64M", "1M", &[])
        .expect("starting the guest in host A");
    let dest = dir.path().join("dst.ram");
    let (mut r, uri) = receiver(dir.path(), &dest, &hosts.uri_b(4444), Some(&hosts.b));
    let mut s = sender(dir.path(), "send", &g, &uri, &[], Some(&hosts.a));
    wait_established(r.pid(), 4444, Duration::from_secs(20)).unwrap();
    thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    hosts.shape("80mbit").expect("reshaping the link");
    let e = watch(&mut s, &mut r, t, Duration::from_secs(60));
    assert!(e.send.success(), "send failed: {}", s.stderr());
    assert!(e.recv.success(), "receive failed: {}", r.stderr());
    assert_eq!(g.status().unwrap(), "postmigrate");
    let (a, b) = (fs::read(&g.ram).unwrap(), fs::read(&dest).unwrap());
    assert!(first_difference(&a, &b).is_none() && a.len() == b.len());
    let st = json(&dir.path().join("send.json")).unwrap();
    let bw0 = st["rounds"][0]["bandwidth"].as_f64().unwrap();
    assert!(bw0 < 30e6, "round 0 did not slow down: {bw0:.0} B/s");
    row(
        "link bandwidth drops 5x mid-run (tc, 400 to 80 Mbit/s); ferry's own cap has no runtime control",
        "postmigrate (migrated)",
        &format!(
            "{} (round 0 at {:.1} MB/s)",
            outcome(e.send, e.send_took, &s),
            bw0 / 1e6
        ),
        &outcome(e.recv, e.recv_took, &r),
    );
}

#[test]
fn the_sender_names_the_broken_connection_when_the_receiver_dies() {
    // When the connection breaks, the writer fails and its siblings fail in
    // turn on their channels to it. The sender must report the cause (the
    // writer's error, which names the destination), not an echo such as
    // "compress failed: cannot hand chunks to the writer process:
    // Disconnected". Three runs, as the two reports race.
    for _ in 0..3 {
        let dir = tempdir();
        let g = Guest::start(dir.path(), "guest", None, "64M", "4M", &[]).expect("guest");
        let dest = dir.path().join("dst.ram");
        let (r, uri) = receiver(dir.path(), &dest, "tcp:127.0.0.1:0", None);
        let mut s = sender(
            dir.path(),
            "send",
            &g,
            &uri,
            &["--max-bandwidth", "8M"],
            None,
        );
        let reader = r.wait_actor("reader", Duration::from_secs(20)).unwrap();
        s.wait_actor("writer", Duration::from_secs(20)).unwrap();
        wait_established(r.pid(), port_of(&uri).unwrap(), Duration::from_secs(20)).unwrap();
        thread::sleep(Duration::from_millis(500));
        proc::kill9(reader);
        let st = s.wait(Duration::from_secs(20)).expect("send ends");
        let err = s.last_line();
        assert!(!st.success());
        assert!(
            err.contains("writer failed") && err.contains(&uri),
            "the sender names the broken connection to {uri}: {err}"
        );
    }
}
