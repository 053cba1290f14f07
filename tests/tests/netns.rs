//! Two hosts: the receiver in one network namespace, the guest and `ferry send` in
//! another, joined by a veth pair shaped with a token bucket. A live migration across
//! the link completes with a verified copy; a link cut mid-migration is noticed by both
//! sides within `--stall-timeout`, and the guest runs on. Needs root (CI runs as root).

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use ferry_tests::netns::{self, ferry, Guest, Process, TwoHosts};
use ferry_tests::proc;
use ferry_tests::ram::first_difference;
use serde_json::Value;
use tempfile::TempDir;

/// The port the receiver listens on in host B (a fresh namespace: always free).
const PORT: u16 = 4444;

fn tempdir() -> TempDir {
    // Guest RAM lives in tmpfs, as on a real host; /dev/shm is shared by the
    // namespaces (`ip netns exec` changes the network, not the files).
    tempfile::Builder::new()
        .prefix("ferry-netns-")
        .tempdir_in("/dev/shm")
        .expect("creating a temporary directory")
}

fn json(path: &Path) -> Value {
    let text =
        fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    serde_json::from_str(&text).expect("statistics are JSON")
}

/// `ferry receive` in host B, listening on B's address.
fn receiver(hosts: &TwoHosts, dir: &Path, stall: &str) -> (Process, String) {
    let dest = dir.join("dst.ram");
    let mut r = ferry(&[
        "receive",
        "--listen",
        &hosts.uri_b(PORT),
        "--ram",
        &format!("{},name=ram", dest.display()),
        "--stall-timeout",
        stall,
        "--stats-json",
        &dir.join("receive.json").display().to_string(),
    ])
    .netns(Some(&hosts.b))
    .start(&dir.join("receive.err"))
    .expect("starting ferry receive in host B");
    let uri = r
        .wait_listening(Duration::from_secs(20))
        .expect("the receiver listens");
    assert_eq!(uri, hosts.uri_b(PORT));
    (r, dest.display().to_string())
}

/// `ferry send` of `g` in host A to `uri`.
fn sender(hosts: &TwoHosts, dir: &Path, g: &Guest, uri: &str, stall: &str) -> Process {
    ferry(&[
        "send",
        "--to",
        uri,
        "--no-progress",
        "--stall-timeout",
        stall,
        "--stats-json",
        &dir.join("send.json").display().to_string(),
    ])
    .args(&g.send_args())
    .netns(Some(&hosts.a))
    .start(&dir.join("send.err"))
    .expect("starting ferry send in host A")
}

#[test]
fn live_migration_across_a_shaped_link() {
    // 200 Mbit/s = 25 MB/s: round 0 of a 128 MiB mixed guest (~60% non-zero
    // pages) takes about 3 s; the guest dirties 4 MB/s meanwhile.
    let hosts = TwoHosts::new("200mbit").expect("two hosts");
    let dir = tempdir();
    let g = Guest::start(dir.path(), "guest", Some(&hosts.a), "128M", "4M", &[])
        .expect("starting the guest in host A");
    let (mut r, dest) = receiver(&hosts, dir.path(), "10");
    let mut s = sender(&hosts, dir.path(), &g, &hosts.uri_b(PORT), "10");
    let st = s.wait(Duration::from_secs(120)).expect("send ends");
    assert!(st.success(), "ferry send failed: {}", s.stderr());
    let rt = r.wait(Duration::from_secs(30)).expect("receive ends");
    assert!(rt.success(), "ferry receive failed: {}", r.stderr());
    assert!(
        s.stderr().contains("RAM digests match"),
        "the sender verified the copy: {}",
        s.stderr()
    );
    assert_eq!(g.status().expect("query-status"), "postmigrate");
    let (a, b) = (fs::read(&g.ram).unwrap(), fs::read(&dest).unwrap());
    assert_eq!(a.len(), b.len());
    if let Some(at) = first_difference(&a, &b) {
        panic!("the destination differs from the source at byte {at:#x}");
    }

    let st = json(&dir.path().join("send.json"));
    assert_eq!(st["status"], "completed", "{st}");
    assert_eq!(st["return-path"], "ferry", "{st}");
    assert_eq!(
        json(&dir.path().join("receive.json"))["status"],
        "completed"
    );
    // The bytes went through the shaped link, not some faster path: round 0's
    // stream rate stays under the 25 MB/s of the token bucket.
    let round0 = &st["rounds"][0];
    let bw = round0["bandwidth"].as_f64().expect("round 0 bandwidth");
    eprintln!(
        "round 0: {:.1} MB/s over {:.2} s; total {} ms, downtime {} ms",
        bw / 1e6,
        round0["duration"].as_f64().unwrap_or(0.0),
        st["total-time"],
        st["downtime"]
    );
    assert!(
        bw <= 25e6 * 1.05,
        "round 0 ran at {bw:.0} B/s over a 25 MB/s link"
    );
}

#[test]
fn a_cut_link_fails_both_sides_within_the_stall_timeout() {
    // 80 Mbit/s = 10 MB/s: round 0 of 128 MiB lasts ~8 s; the link goes down
    // 1.5 s into it.
    const STALL: u64 = 3;
    let hosts = TwoHosts::new("80mbit").expect("two hosts");
    let dir = tempdir();
    let g = Guest::start(dir.path(), "guest", Some(&hosts.a), "128M", "4M", &[])
        .expect("starting the guest in host A");
    let (mut r, _) = receiver(&hosts, dir.path(), &STALL.to_string());
    let mut s = sender(
        &hosts,
        dir.path(),
        &g,
        &hosts.uri_b(PORT),
        &STALL.to_string(),
    );
    let mut pids = vec![s.pid(), r.pid()];
    for kind in ["scanner", "compress", "writer"] {
        pids.push(s.wait_actor(kind, Duration::from_secs(20)).unwrap());
    }
    pids.push(r.wait_actor("reader", Duration::from_secs(20)).unwrap());
    netns::wait_established(r.pid(), PORT, Duration::from_secs(20)).expect("connected");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(s.try_status().unwrap().is_none(), "{}", s.stderr());
    assert!(r.try_status().unwrap().is_none(), "{}", r.stderr());

    let cut = Instant::now();
    hosts.cut().expect("cutting the link");
    // Both sides are watched at once: each must end on its own stall timer.
    let (mut s_end, mut r_end) = (None, None);
    while s_end.is_none() || r_end.is_none() {
        assert!(
            cut.elapsed() < Duration::from_secs(STALL + 20),
            "still running {:?} after the cut:\nsend: {}\nreceive: {}",
            cut.elapsed(),
            s.stderr(),
            r.stderr()
        );
        if s_end.is_none() {
            s_end = s.try_status().unwrap().map(|st| (st, cut.elapsed()));
        }
        if r_end.is_none() {
            r_end = r.try_status().unwrap().map(|st| (st, cut.elapsed()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let ((st, s_took), (rt, r_took)) = (s_end.unwrap(), r_end.unwrap());
    let (s_err, r_err) = (s.last_line(), r.last_line());
    eprintln!("sender: {} after {s_took:?}: {s_err}", netns::describe(st));
    eprintln!(
        "receiver: {} after {r_took:?}: {r_err}",
        netns::describe(rt)
    );
    let limit = Duration::from_secs(STALL + 3);

    // Nothing stopped the guest, and a failed migration leaves it running.
    g.wait_status("running", Duration::from_secs(5))
        .expect("the guest runs on");
    assert!(!rt.success(), "the receiver completed a cut stream");
    assert!(
        r_err.contains("stall"),
        "the receiver names a stall: {r_err}"
    );
    assert!(
        r_took <= limit,
        "the receiver noticed the cut after {r_took:?}"
    );
    assert!(!r.stderr().contains("ferry: received"), "{}", r.stderr());
    assert_eq!(json(&dir.path().join("receive.json"))["status"], "failed");
    assert!(!st.success(), "send succeeded over a cut link");
    assert_eq!(json(&dir.path().join("send.json"))["status"], "failed");
    proc::wait_gone(&pids, Duration::from_secs(5)).expect("no ferry process is left");
    // The sender names the dead link: a stall (no progress for the timeout),
    // or, when the kernel drops the route with the link first, the network
    // that became unreachable; either way within the stall timeout.
    assert!(
        s_err.contains("stall") || s_err.contains("unreachable"),
        "the sender names the dead link: {s_err}"
    );
    assert!(
        s_took <= limit,
        "the sender noticed the cut after {s_took:?} (--stall-timeout {STALL})"
    );
}
