//! Two hosts: the receiver in one network namespace, the guest and `ferry send` in
//! another, joined by a veth pair shaped with a token bucket. A live migration across
//! the link completes with a verified copy; a link cut mid-migration is noticed by both
//! sides within `--stall-timeout`, and the guest runs on. Needs root (CI runs as root).

use std::path::Path;
use std::time::{Duration, Instant};

use ferry_tests::files::{assert_same_file, read_json, shm_tempdir};
use ferry_tests::guest::{loadgen, Guest};
use ferry_tests::migrate::{self, wait_ends};
use ferry_tests::netns::{self, TwoHosts};
use ferry_tests::proc::{self, wait_written, Process};

/// The port the receiver listens on in host B (a fresh namespace: always free).
const PORT: u16 = 4444;
const PREFIX: &str = "ferry-netns-";

/// A 128 MiB guest dirtying 4 MB/s in host A.
fn guest(hosts: &TwoHosts, dir: &Path) -> Guest {
    loadgen(dir, "guest", "128M")
        .rate("4M")
        .netns(Some(&hosts.a))
        .start()
        .expect("starting the guest in host A")
}

/// `ferry receive` in host B, listening on B's address.
fn receiver(hosts: &TwoHosts, dir: &Path, stall: &str) -> Process {
    let (r, uri) = migrate::receive(dir, &hosts.uri_b(PORT), &dir.join("dst.ram"))
        .args(&["--stall-timeout", stall])
        .netns(Some(&hosts.b))
        .start_listening(&dir.join("receive.err"))
        .expect("starting ferry receive in host B");
    assert_eq!(uri, hosts.uri_b(PORT));
    r
}

/// `ferry send` of `g` in host A to host B.
fn sender(hosts: &TwoHosts, dir: &Path, g: &Guest, stall: &str) -> Process {
    migrate::send(dir, "send", &hosts.uri_b(PORT))
        .args(&["--stall-timeout", stall])
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
    let dir = shm_tempdir(PREFIX);
    let g = guest(&hosts, dir.path());
    let mut r = receiver(&hosts, dir.path(), "10");
    let mut s = sender(&hosts, dir.path(), &g, "10");
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
    assert_same_file(&g.ram, &dir.path().join("dst.ram"));

    let st = read_json(&dir.path().join("send.json"));
    assert_eq!(st["status"], "completed", "{st}");
    assert_eq!(st["return-path"], "ferry", "{st}");
    assert_eq!(
        read_json(&dir.path().join("receive.json"))["status"],
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
    // once 8 MiB of it went out. Bound: the stall timer (3 s) plus 3 s for a
    // busy machine.
    const STALL: u64 = 3;
    let hosts = TwoHosts::new("80mbit").expect("two hosts");
    let dir = shm_tempdir(PREFIX);
    let g = guest(&hosts, dir.path());
    let mut r = receiver(&hosts, dir.path(), &STALL.to_string());
    let mut s = sender(&hosts, dir.path(), &g, &STALL.to_string());
    let mut pids = vec![s.pid(), r.pid()];
    for kind in ["scanner", "compress", "writer"] {
        pids.push(s.wait_actor(kind, Duration::from_secs(20)).unwrap());
    }
    pids.push(r.wait_actor("reader", Duration::from_secs(20)).unwrap());
    netns::wait_established(r.pid(), PORT, Duration::from_secs(20)).expect("connected");
    wait_written(pids[4], 8 << 20, Duration::from_secs(30)).expect("the stream flows");
    assert!(s.try_status().unwrap().is_none(), "{}", s.stderr());
    assert!(r.try_status().unwrap().is_none(), "{}", r.stderr());

    let cut = Instant::now();
    hosts.cut().expect("cutting the link");
    // Both sides are watched at once: each must end on its own stall timer.
    let e = wait_ends(&mut s, &mut r, cut, Duration::from_secs(STALL + 20));
    let (st, s_took, rt, r_took) = (e.send, e.send_took, e.recv, e.recv_took);
    let (s_err, r_err) = (s.last_line(), r.last_line());
    eprintln!("sender: {} after {s_took:?}: {s_err}", proc::describe(st));
    eprintln!("receiver: {} after {r_took:?}: {r_err}", proc::describe(rt));
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
    assert_eq!(
        read_json(&dir.path().join("receive.json"))["status"],
        "failed"
    );
    assert!(!st.success(), "send succeeded over a cut link");
    assert_eq!(read_json(&dir.path().join("send.json"))["status"], "failed");
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
