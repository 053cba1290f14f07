//! The fault matrix: one test per row of deploy/FAULTS.md.
//!
//! Every ferry process of either side is killed with SIGKILL at four points of a live
//! migration of a dirtying `ferry loadgen` guest:
//!
//! - setup: all actors of both sides run and the TCP connection is established;
//! - bulk: in round 0 (the full copy), once its writer has written 4 MiB;
//! - late round: right after round 1 ended, in round 2 of a guest that outruns the link;
//! - after stop: the switchover stopped the guest (its log says `loadgen stopped`) and
//!   the final round (~4 s at the capped rate) is on the wire; both sides are
//!   checked to be running right before the kill, so a kill that came too late fails
//!   saying so instead of testing the wrong thing.
//!
//! Each row checks the guest (running again, never left paused; `postmigrate` only
//! after a completed migration), both exit statuses, that the receiver never reports a
//! completed load, that the side that lost a process names it, and that both sides
//! fail within `PROMPT` (5 s, half the 10 s `--stall-timeout`: the death notice and
//! the broken connection end the run, not the stall timer; generous for a busy
//! machine), and that no ferry process is left. Further rows: a receiver RAM file that cannot be written
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

use ferry_tests::files::{assert_same_file, read_json, shm_tempdir};
use ferry_tests::guest::{loadgen, Guest};
use ferry_tests::migrate::{self, wait_ends, wait_landed, Ends};
use ferry_tests::netns::{port_of, wait_established, Tmpfs, TwoHosts};
use ferry_tests::proc::{self, describe, wait_written, Process};
use tempfile::TempDir;

/// Both sides' --stall-timeout: far above how fast a broken connection must be
/// noticed, so a row that only ends by the stall timer shows up as slow.
const STALL: &str = "10";
/// How soon each side must fail once a process is gone: the side that lost
/// one by its death notice, the other by the broken connection. Half the
/// stall timeout: failing within it shows that the stall timer did not end
/// the run, with room for a busy two-core machine.
const PROMPT: Duration = Duration::from_secs(5);

/// Temporary directories: in /dev/shm, named so that [`anon`] finds them.
const PREFIX: &str = "ferry-faults-";

/// `ferry receive --listen LISTEN --ram DEST,name=ram`, here or in `ns`.
fn receiver(dir: &Path, dest: &Path, listen: &str, ns: Option<&str>) -> (Process, String) {
    migrate::receive(dir, listen, dest)
        .args(&["--stall-timeout", STALL])
        .netns(ns)
        .start_listening(&dir.join("receive.err"))
        .expect("starting ferry receive")
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
    migrate::send(dir, name, to)
        .args(&["--stall-timeout", STALL])
        .args(&g.send_args())
        .args(extra)
        .netns(ns)
        .info_log()
        .start(&dir.join(format!("{name}.err")))
        .expect("starting ferry send")
}

/// A guest of `size` dirtying `rate`, in `dir` (optionally in namespace `ns`).
fn guest(dir: &Path, name: &str, ns: Option<&str>, size: &str, rate: &str) -> Guest {
    loadgen(dir, name, size)
        .rate(rate)
        .netns(ns)
        .start()
        .expect("starting the guest")
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
            // After round 0 (~5 s) all 32 MiB of the working set are dirty:
            // ~4 s at 8 MB/s, under the 10 s downtime limit, so the guest
            // stops and the final round takes ~4 s: the kill lands in it.
            Point::AfterStop => (
                "64M",
                "32M",
                "0.5",
                &["--max-bandwidth", "8M", "--downtime-limit", "10000"],
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

    /// Waits until the migration is at this point, by what can be observed:
    /// the connection, bytes on the wire, a round's log line, the guest's own
    /// log saying it stopped.
    fn reach(self, g: &mut Guest, s: &mut Process) {
        let writer = s.actor("writer").expect("the writer runs");
        match self {
            Point::Setup => {}
            Point::Bulk => {
                wait_written(writer, 4 << 20, Duration::from_secs(30)).expect("round 0 under way");
                assert!(
                    !s.stderr().contains("round done"),
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
    }
}

/// A migration of a dirtying guest, both sides and all actors running.
struct Run {
    dir: TempDir,
    g: Guest,
    s: Process,
    r: Process,
    /// Every ferry process of both sides.
    pids: Vec<u32>,
}

impl Run {
    fn start(point: Point) -> Run {
        let dir = shm_tempdir(PREFIX);
        let (size, rate, ws, extra) = point.scenario();
        let g = loadgen(dir.path(), "guest", size)
            .rate(rate)
            .args(&["--working-set", ws])
            .start()
            .expect("starting the guest");
        let dest = dir.path().join("dst.ram");
        let (r, uri) = receiver(dir.path(), &dest, "tcp:127.0.0.1:0", None);
        let s = sender(dir.path(), "send", &g, &uri, extra, None);
        let mut pids = vec![s.pid(), r.pid()];
        for k in ["scanner", "compress", "writer"] {
            pids.push(s.wait_actor(k, Duration::from_secs(20)).unwrap());
        }
        pids.push(r.wait_actor("reader", Duration::from_secs(20)).unwrap());
        wait_established(r.pid(), port_of(&uri).unwrap(), Duration::from_secs(20)).unwrap();
        Run { dir, g, s, r, pids }
    }

    /// SIGKILL to `kind` of `side`, both sides still running; how both ended.
    fn kill(&mut self, side: Side, kind: &str) -> Ends {
        let (s, r) = (&mut self.s, &mut self.r);
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
        wait_ends(s, r, killed, Duration::from_secs(30))
    }

    /// `DIR/NAME.json`, which a side writes unless its orchestrator was killed.
    fn stats(&self, name: &str, killed_orchestrator: bool) {
        let path = self.dir.path().join(format!("{name}.json"));
        if killed_orchestrator {
            assert!(!path.exists(), "a killed orchestrator wrote {name}.json");
        } else {
            let st = read_json(&path);
            assert_eq!(st["status"], "failed", "{st}");
        }
    }
}

/// The side that lost a process fails, naming it (a killed orchestrator just
/// dies: its actors follow it, by their parent-death signal), within
/// `PROMPT`; the other side fails on the broken connection within `PROMPT`
/// too, not by its stall timer; the destination never completes.
fn check_sides(run: &Run, e: &Ends, side: Side, kind: &str) {
    let (st, took, other_st, other_took, p, other) = match side {
        Side::Sender => (e.send, e.send_took, e.recv, e.recv_took, &run.s, &run.r),
        Side::Receiver => (e.recv, e.recv_took, e.send, e.send_took, &run.r, &run.s),
    };
    assert!(!st.success(), "{kind} killed, yet its side exited 0");
    if kind == "orchestrator" {
        assert_eq!(st.signal(), Some(9), "{st}");
    } else {
        let err = p.last_line();
        assert!(
            err.contains(kind) && err.contains("signal 9"),
            "names the killed {kind}: {err}"
        );
        assert!(took < PROMPT, "noticed after {took:?}");
    }
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
    assert!(
        !run.r.stderr().contains("ferry: received"),
        "{}",
        run.r.stderr()
    );
    let orchestrator = kind == "orchestrator";
    run.stats("receive", orchestrator && side == Side::Receiver);
    run.stats("send", orchestrator && side == Side::Sender);
}

/// The guest runs: never stopped before the switchover, resumed after it
/// (by `ferry send`, or by itself when a killed sender's control connection
/// closed). Returns how, for the table.
fn check_guest(g: &Guest, point: Point, side: Side, kind: &str) -> &'static str {
    g.wait_status("running", Duration::from_secs(5))
        .expect("the guest runs after the failure");
    let glog = g.proc.stderr();
    match (point, side, kind) {
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
    }
}

/// One row of the SIGKILL matrix: `kind` (an actor, or `orchestrator`) of
/// `side` is killed at `point`.
fn kill_row(side: Side, kind: &str, point: Point) {
    let mut run = Run::start(point);
    point.reach(&mut run.g, &mut run.s);
    let e = run.kill(side, kind);
    check_sides(&run, &e, side, kind);
    let resumed = check_guest(&run.g, point, side, kind);
    proc::wait_gone(&run.pids, Duration::from_secs(5)).expect("no ferry process is left");
    let dead = "killed (signal 9); its actors die with it".to_owned();
    let send = outcome(e.send, e.send_took, &run.s);
    let recv = outcome(e.recv, e.recv_took, &run.r);
    let (side_name, send, recv) = match (side, kind) {
        (Side::Sender, "orchestrator") => ("sender", dead, recv),
        (Side::Receiver, "orchestrator") => ("receiver", send, dead),
        (Side::Sender, _) => ("sender", send, recv),
        (Side::Receiver, _) => ("receiver", send, recv),
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
    let g = guest(dir, "guest", None, "64M", "4M");
    let (mut r, uri) = receiver(dir, dest, "tcp:127.0.0.1:0", None);
    let mut s = sender(dir, "send", &g, &uri, &["--max-bandwidth", "64M"], None);
    let start = Instant::now();
    let e = wait_ends(&mut s, &mut r, start, Duration::from_secs(30));
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
    let dir = shm_tempdir(PREFIX);
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
    let dir = shm_tempdir(PREFIX);
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
    let dir = shm_tempdir(PREFIX);
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
    let dir = shm_tempdir(PREFIX);
    let g = guest(dir.path(), "guest", None, "64M", "4M");
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
    assert!(took < PROMPT, "noticed after {took:?}");
    assert!(
        err.contains("writer") && err.contains(&format!("tcp:{addr}")),
        "names the writer and the destination: {err}"
    );
    g.wait_status("running", Duration::from_secs(5))
        .expect("the guest runs on");
    let json = read_json(&dir.path().join("send.json"));
    assert_eq!(json["status"], "failed");
    let why = json["error-desc"].as_str().unwrap_or_default();
    assert!(why.contains("writer"), "error-desc: {json}");
    row(
        "peer closes the socket after 1 MiB (fake receiver)",
        "running (never stopped)",
        &outcome(st, took, &s),
        "(a test socket: accepted, read 1 MiB, closed)",
    );
}

#[test]
fn a_second_sender_at_a_busy_receiver() {
    let dir = shm_tempdir(PREFIX);
    let g1 = guest(dir.path(), "guest1", None, "64M", "4M");
    let g2 = guest(dir.path(), "guest2", None, "64M", "0");
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
    wait_landed(&r, 1 << 20, Duration::from_secs(30));
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
    let e = wait_ends(&mut s1, &mut r, t, Duration::from_secs(60));
    assert!(e.send.success(), "the first send failed: {}", s1.stderr());
    assert!(e.recv.success(), "the receiver failed: {}", r.stderr());
    assert_eq!(g1.status().unwrap(), "postmigrate");
    assert_same_file(&g1.ram, &dest);
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
    // 80 Mbit/s (10 MB/s) once 4 MiB went out: the migration slows down and
    // completes.
    let hosts = TwoHosts::new("400mbit").expect("two hosts");
    let dir = shm_tempdir(PREFIX);
    let g = guest(dir.path(), "guest", Some(&hosts.a), "64M", "1M");
    let dest = dir.path().join("dst.ram");
    let (mut r, uri) = receiver(dir.path(), &dest, &hosts.uri_b(4444), Some(&hosts.b));
    let mut s = sender(dir.path(), "send", &g, &uri, &[], Some(&hosts.a));
    wait_established(r.pid(), 4444, Duration::from_secs(20)).unwrap();
    let writer = s.wait_actor("writer", Duration::from_secs(5)).unwrap();
    wait_written(writer, 4 << 20, Duration::from_secs(30)).expect("round 0 flows");
    let t = Instant::now();
    hosts.shape("80mbit").expect("reshaping the link");
    let e = wait_ends(&mut s, &mut r, t, Duration::from_secs(60));
    assert!(e.send.success(), "send failed: {}", s.stderr());
    assert!(e.recv.success(), "receive failed: {}", r.stderr());
    assert_eq!(g.status().unwrap(), "postmigrate");
    assert_same_file(&g.ram, &dest);
    let st = read_json(&dir.path().join("send.json"));
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
        let dir = shm_tempdir(PREFIX);
        let g = guest(dir.path(), "guest", None, "64M", "4M");
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
        let reader = wait_landed(&r, 2 << 20, Duration::from_secs(30));
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
