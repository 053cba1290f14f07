//! `ferry send` to `ferry receive`, end to end with the real binary: 1 GiB of
//! mixed RAM over tcp and unix, raw and compressed, with 1 and 2 workers; a
//! bandwidth cap that holds, by the sender's own per-round figures; and every
//! process of either side killed mid-transfer, which must end both sides
//! cleanly.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use ferry_tests::files::{assert_same_file, read_json, shm_tempdir, tempdir};
use ferry_tests::guest::loadgen;
use ferry_tests::migrate::{self, assert_remaining_is_what_the_destination_lacks, named};
use ferry_tests::proc::{self, wait_written, Process};
use ferry_tests::ram;
use serde_json::Value;

const GIB: usize = 1 << 30;
const RUN_TIMEOUT: Duration = Duration::from_secs(300);
const PREFIX: &str = "ferry-e2e-";

/// A receiver listening on `listen` (use port 0 for tcp), writing `dest`.
fn receiver(dir: &Path, listen: &str, dest: &Path, workers: usize) -> (Process, String) {
    migrate::receive(dir, listen, dest)
        .args(&["--decompress-workers", &workers.to_string()])
        .start_listening(&dir.join("receive.err"))
        .expect("starting ferry receive")
}

fn sender(dir: &Path, src: &Path, to: &str, extra: &[&str]) -> Process {
    migrate::send(dir, "send", to)
        .args(&["--ram", &named(src, "ram")])
        .args(extra)
        .start(&dir.join("send.err"))
        .expect("starting ferry send")
}

/// One full migration; returns the sender's statistics.
fn migrate(dir: &Path, src: &Path, listen: &str, compress: bool, workers: usize) -> Value {
    let dest = dir.join("dest.ram");
    let _ = fs::remove_file(&dest);
    let (mut r, uri) = receiver(dir, listen, &dest, workers);
    let w = workers.to_string();
    let mut extra = vec!["--compress-workers", &w];
    if compress {
        extra.push("--compress");
    }
    let mut s = sender(dir, src, &uri, &extra);
    let sst = s.wait(RUN_TIMEOUT).expect("ferry send ends");
    let rst = r.wait(Duration::from_secs(30)).expect("ferry receive ends");
    assert!(sst.success(), "ferry send failed: {}", s.stderr());
    assert!(rst.success(), "ferry receive failed: {}", r.stderr());
    assert!(
        s.stderr().contains("RAM digests match"),
        "ferry send reports the verified digests: {}",
        s.stderr()
    );
    assert_same_file(src, &dest);
    let st = read_json(&dir.join("send.json"));
    assert_eq!(st["status"], "completed");
    assert_eq!(st["ram"]["total"], GIB as u64);
    assert_remaining_is_what_the_destination_lacks(&st, src, &dest);
    let census = ram::census(GIB);
    // Only all-zero pages go as ZERO records (QEMU 8.2+ refuses another
    // fill byte); pages of one other byte go as normal pages.
    assert_eq!(
        st["ram"]["duplicate"], census.zero,
        "ZERO records for mixed RAM"
    );
    if compress {
        assert!(st["compression"]["pages"].as_u64().unwrap() > 0);
    } else {
        assert_eq!(st["compression"]["pages"], 0);
    }
    for p in ["orchestrator", "scanner", "compress", "writer"] {
        assert!(
            st["processes"][p]["peak-rss-bytes"].as_u64().unwrap() > 0,
            "{p} usage: {st}"
        );
    }
    st
}

#[test]
fn one_gib_of_mixed_ram_over_tcp_and_unix() {
    let dir = tempdir(PREFIX);
    let src = dir.path().join("source.ram");
    ram::write_mixed_image(&src, GIB, 31).expect("writing 1 GiB of RAM");
    let sock = dir.path().join("m.sock");
    let unix = format!("unix:{}", sock.display());
    for listen in ["tcp:127.0.0.1:0", unix.as_str()] {
        for compress in [false, true] {
            for workers in [1, 2] {
                let st = migrate(dir.path(), &src, listen, compress, workers);
                eprintln!(
                    "{listen} compress={compress} workers={workers}: {} ms, {} bytes",
                    st["total-time"], st["ram"]["transferred"]
                );
            }
        }
    }
}

/// The cap is checked on round 0 of a live migration of a guest that writes
/// nothing: the sender's own figures for that round (`rounds[0].bytes` over
/// `rounds[0].duration`, from the round's start to its last byte written)
/// leave out process start-up, the final round and the digests. Random pages
/// make the stream as big as the RAM: 320 MiB at 96 MiB/s is about 3.3 s.
/// Bounds: at most 10% over the cap (what a token bucket may overshoot by
/// its burst); at least half of it, so a cap that throttles far below the
/// set rate fails too, while a busy machine that falls somewhat short does not.
#[test]
fn bandwidth_cap_holds_on_a_long_round() {
    let dir = shm_tempdir(PREFIX);
    let d = dir.path();
    let g = loadgen(d, "src", "320M")
        .args(&["--pattern", "random"])
        .start()
        .expect("starting ferry loadgen");
    let dest = d.join("dest.ram");
    let (mut r, uri) = receiver(d, "tcp:127.0.0.1:0", &dest, 2);
    let cap = f64::from(96u32 << 20);
    let mut s = migrate::send(d, "send", &uri)
        .args(&g.send_args())
        .args(&["--max-bandwidth", "96M"])
        .start(&d.join("send.err"))
        .expect("starting ferry send");
    assert!(
        s.wait(RUN_TIMEOUT).expect("send ends").success(),
        "{}",
        s.stderr()
    );
    assert!(r
        .wait(Duration::from_secs(30))
        .expect("receive ends")
        .success());
    assert_same_file(&g.ram, &dest);
    let st = read_json(&d.join("send.json"));
    let round0 = &st["rounds"][0];
    let bytes = round0["bytes"].as_f64().expect("round 0 bytes");
    let secs = round0["duration"].as_f64().expect("round 0 duration");
    assert!(
        bytes >= f64::from(320u32 << 20) && secs >= 2.0,
        "round 0 must carry the whole RAM over 2 s or more to measure: {round0}"
    );
    let rate = bytes / secs;
    eprintln!(
        "cap {cap} B/s, round 0 at {rate:.0} B/s over {secs:.2} s ({:+.1}%)",
        (rate / cap - 1.0) * 100.0
    );
    assert!(
        rate <= cap * 1.10 && rate >= cap * 0.5,
        "round 0 ran at {rate:.0} B/s against a cap of {cap} B/s"
    );
}

/// Kills `kind` (an actor, or `orchestrator`) of one side once a capped
/// migration of 256 MiB has written `8 MiB`, then checks that the side
/// exits non-zero naming it (an actor's death is noticed within `PROMPT`,
/// far below the 60 s default stall timeout), that the other side fails
/// too, and that no ferry process is left.
fn kill_and_check(kind: &str, on_sender: bool) {
    const PROMPT: Duration = Duration::from_secs(5);
    let dir = tempdir(PREFIX);
    let src = dir.path().join("source.ram");
    ram::write_mixed_image(&src, 256 << 20, 41).expect("writing RAM");
    let dest = dir.path().join("dest.ram");
    let (mut r, uri) = receiver(dir.path(), "tcp:127.0.0.1:0", &dest, 2);
    let mut s = sender(
        dir.path(),
        &src,
        &uri,
        &["--max-bandwidth", "20M", "--compress"],
    );
    let mut all: Vec<u32> = vec![r.pid(), s.pid()];
    for k in ["scanner", "compress", "writer"] {
        all.push(s.wait_actor(k, Duration::from_secs(20)).unwrap());
    }
    all.push(r.wait_actor("reader", Duration::from_secs(20)).unwrap());
    let writer = s.actor("writer").expect("the writer runs");
    wait_written(writer, 8 << 20, Duration::from_secs(30)).unwrap();
    let victim = match (kind, on_sender) {
        ("orchestrator", true) => s.pid(),
        ("orchestrator", false) => r.pid(),
        (k, true) => s.actor(k).expect("actor is running"),
        (k, false) => r.actor(k).expect("actor is running"),
    };
    let t = Instant::now();
    proc::kill9(victim);
    let (side, other) = if on_sender {
        (&mut s, &mut r)
    } else {
        (&mut r, &mut s)
    };
    let st = side
        .wait(Duration::from_secs(10))
        .expect("the killed side ends");
    let took = t.elapsed();
    assert!(!st.success(), "{kind} killed, yet the side exited 0");
    if kind != "orchestrator" {
        assert!(took < PROMPT, "noticed {kind}'s death after {took:?}");
        let err = side.stderr();
        assert!(
            err.contains(kind) && err.contains("signal 9"),
            "names {kind}: {err}"
        );
    }
    let ost = other
        .wait(Duration::from_secs(30))
        .expect("the other side ends");
    assert!(
        !ost.success(),
        "the other side must not report success: {}",
        other.stderr()
    );
    proc::wait_gone(&all, Duration::from_secs(5)).expect("no ferry process is left behind");
}

#[test]
fn sigkill_of_each_sender_process_fails_cleanly() {
    for kind in ["scanner", "compress", "writer", "orchestrator"] {
        kill_and_check(kind, true);
    }
}

#[test]
fn sigkill_of_each_receiver_process_fails_cleanly() {
    for kind in ["reader", "orchestrator"] {
        kill_and_check(kind, false);
    }
}
