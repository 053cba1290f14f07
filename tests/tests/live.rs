//! Live migration against `ferry loadgen`, a guest that keeps dirtying its
//! memory while it is copied: the copy must equal the source at switchover,
//! a guest that outruns the link converges only with auto-converge, and a
//! guest or receiver that dies mid-migration ends everything cleanly with the
//! guest (if alive) running.

use std::path::Path;
use std::time::{Duration, Instant};

use ferry_tests::files::{assert_same_file, read_json, shm_tempdir};
use ferry_tests::guest::{loadgen, Guest};
use ferry_tests::migrate::{
    self, assert_both_succeed, assert_remaining_is_what_the_destination_lacks,
    assert_rounds_resend_what_was_dirty,
};
use ferry_tests::proc::{self, wait_written, Process};

const RUN_TIMEOUT: Duration = Duration::from_secs(180);
const PREFIX: &str = "ferry-live-";
/// How much of the stream must have gone out before a test kills something
/// "mid-migration": the observable sign that the copy is under way.
const UNDER_WAY: u64 = 16 << 20;
/// How soon the sender must fail once its peer is gone: the default
/// --stall-timeout is 60 s, so failing within this shows that the broken
/// connection, not the stall timer, ended the run.
const PROMPT: Duration = Duration::from_secs(5);

fn guest(dir: &Path, size: &str, rate: &str) -> Guest {
    loadgen(dir, "src", size)
        .rate(rate)
        .start()
        .expect("starting ferry loadgen")
}

fn receiver(dir: &Path) -> (Process, String) {
    migrate::receive(dir, "tcp:127.0.0.1:0", &dir.join("dst.ram"))
        .start_listening(&dir.join("receive.err"))
        .expect("starting ferry receive")
}

fn send(dir: &Path, g: &Guest, to: &str, extra: &[&str]) -> Process {
    migrate::send(dir, "send", to)
        .args(&g.send_args())
        .args(extra)
        .start(&dir.join("send.err"))
        .expect("starting ferry send")
}

#[test]
fn destination_equals_source_at_switchover_while_the_guest_dirties() {
    for compress in [false, true] {
        let dir = shm_tempdir(PREFIX);
        let d = dir.path();
        let g = guest(d, "512M", "128M");
        let (mut r, uri) = receiver(d);
        let mut extra = vec!["--max-bandwidth", "512M"];
        if compress {
            extra.push("--compress");
        }
        let mut s = send(d, &g, &uri, &extra);
        assert_both_succeed(&mut s, &mut r, RUN_TIMEOUT);
        // The guest stays stopped after a completed migration, so its RAM is
        // what it was at switchover.
        assert_eq!(g.status().unwrap(), "postmigrate");
        let dest = d.join("dst.ram");
        assert_same_file(&g.ram, &dest);
        let st = read_json(&d.join("send.json"));
        assert_eq!(st["status"], "completed");
        assert_remaining_is_what_the_destination_lacks(&st, &g.ram, &dest);
        assert_rounds_resend_what_was_dirty(&st, (512 << 20) / 4096, false);
        let (downtime, total) = (st["downtime"].as_u64(), st["total-time"].as_u64());
        assert!(
            matches!((downtime, total), (Some(d), Some(t)) if d <= t),
            "downtime within the run: {st}"
        );
    }
}

#[test]
fn a_guest_that_outruns_the_link_converges_only_with_auto_converge() {
    let dir = shm_tempdir(PREFIX);
    let d = dir.path();
    let g = guest(d, "64M", "128M");
    // Without auto-converge: the guest dirties twice as fast as the link sends.
    let (mut r, uri) = receiver(d);
    let mut s = send(
        d,
        &g,
        &uri,
        &["--max-bandwidth", "64M", "--max-iterations", "6"],
    );
    let st = s.wait(RUN_TIMEOUT).unwrap();
    assert!(!st.success(), "it must not converge: {}", s.stderr());
    assert!(s.stderr().contains("did not converge"), "{}", s.stderr());
    assert!(
        !r.wait(Duration::from_secs(30)).unwrap().success(),
        "the destination is not complete"
    );
    assert_eq!(
        g.status().unwrap(),
        "running",
        "a failed migration leaves the guest running"
    );
    let st = read_json(&d.join("send.json"));
    assert_eq!(st["status"], "failed");
    assert_eq!(st["rounds"].as_array().map(Vec::len), Some(6), "{st}");

    // With auto-converge the throttle brings the dirty rate under the link.
    let (mut r, uri) = receiver(d);
    let mut s = send(
        d,
        &g,
        &uri,
        &[
            "--max-bandwidth",
            "64M",
            "--max-iterations",
            "40",
            "--auto-converge",
            "--throttle-initial",
            "30",
            "--throttle-increment",
            "20",
        ],
    );
    assert_both_succeed(&mut s, &mut r, RUN_TIMEOUT);
    let st = read_json(&d.join("send.json"));
    assert!(
        st["throttle-percent"].as_u64().unwrap() >= 30,
        "the guest was throttled: {st}"
    );
    let throttle = g.control().status()["throttle-percent"].clone();
    assert_eq!(throttle, st["throttle-percent"], "the guest's own throttle");
    assert_same_file(&g.ram, &d.join("dst.ram"));
}

/// A migration of a 256 MiB guest capped at 32 MiB/s, caught once `UNDER_WAY`
/// bytes of it went out: returns the guest, the receiver, the sender and the
/// pid of `actor` of the side given.
fn under_way(dir: &Path, actor: (bool, &str)) -> (Guest, Process, Process, u32) {
    let g = guest(dir, "256M", "64M");
    let (r, uri) = receiver(dir);
    let s = send(dir, &g, &uri, &["--max-bandwidth", "32M"]);
    let writer = s.wait_actor("writer", Duration::from_secs(20)).unwrap();
    wait_written(writer, UNDER_WAY, Duration::from_secs(30)).unwrap();
    let side = if actor.0 { &s } else { &r };
    let pid = side.wait_actor(actor.1, Duration::from_secs(5)).unwrap();
    (g, r, s, pid)
}

#[test]
fn a_killed_guest_fails_the_migration_cleanly() {
    let dir = shm_tempdir(PREFIX);
    let (g, mut r, mut s, writer) = under_way(dir.path(), (true, "writer"));
    proc::kill9(g.proc.pid());
    let st = s.wait(Duration::from_secs(30)).unwrap();
    assert!(!st.success());
    assert!(
        s.stderr().contains("guest"),
        "names the guest: {}",
        s.stderr()
    );
    assert!(
        !r.wait(Duration::from_secs(30)).unwrap().success(),
        "the destination is not complete"
    );
    proc::wait_gone(&[writer], Duration::from_secs(5)).unwrap();
}

#[test]
fn a_killed_receiver_leaves_the_guest_running() {
    let dir = shm_tempdir(PREFIX);
    let (g, mut r, mut s, reader) = under_way(dir.path(), (false, "reader"));
    proc::kill9(reader);
    let t = Instant::now();
    let st = s.wait(Duration::from_secs(30)).unwrap();
    assert!(!st.success(), "send must fail: {}", s.stderr());
    assert!(t.elapsed() < PROMPT, "noticed after {:?}", t.elapsed());
    assert_eq!(g.status().unwrap(), "running");
    assert!(!r.wait(Duration::from_secs(10)).unwrap().success());
}
