//! `ferry send` to `ferry receive`, end to end with the real binary: 1 GiB of
//! mixed RAM over tcp and unix, raw and compressed, with 1 and 2 workers; a
//! bandwidth cap held within 10%; and every process of either side killed
//! mid-transfer, which must end both sides cleanly.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_tests::proc::{self, Background};
use ferry_tests::ram::{self, first_difference};
use serde_json::Value;
use tempfile::TempDir;

const GIB: usize = 1 << 30;
const RUN_TIMEOUT: Duration = Duration::from_secs(300);

fn tempdir() -> TempDir {
    tempfile::Builder::new()
        .prefix("ferry-e2e-")
        .tempdir()
        .expect("creating a temporary directory")
}

/// A receiver listening on `listen` (use port 0 for tcp), writing `dest`.
fn receiver(dir: &Path, listen: &str, dest: &Path, workers: usize) -> (Background, String) {
    let mut r = Background::spawn(
        &[
            "receive".to_owned(),
            "--listen".to_owned(),
            listen.to_owned(),
            "--ram".to_owned(),
            format!("{},name=ram", dest.display()),
            "--decompress-workers".to_owned(),
            workers.to_string(),
            "--stats-json".to_owned(),
            dir.join("receive.json").display().to_string(),
        ],
        &dir.join("receive.err"),
    )
    .expect("starting ferry receive");
    let uri = r
        .wait_listening(Duration::from_secs(20))
        .expect("ferry receive listens");
    (r, uri)
}

fn sender(dir: &Path, src: &Path, to: &str, extra: &[&str]) -> Background {
    let mut args = vec![
        "send".to_owned(),
        "--ram".to_owned(),
        format!("{},name=ram", src.display()),
        "--to".to_owned(),
        to.to_owned(),
        "--no-progress".to_owned(),
        "--stats-json".to_owned(),
        dir.join("send.json").display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    Background::spawn(&args, &dir.join("send.err")).expect("starting ferry send")
}

fn stats(dir: &Path, name: &str) -> Value {
    let text = fs::read_to_string(dir.join(name)).unwrap_or_else(|e| panic!("reading {name}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name} is not JSON: {e}"))
}

fn assert_same(a: &Path, b: &Path) {
    let (x, y) = (fs::read(a).expect("reading"), fs::read(b).expect("reading"));
    assert_eq!(
        x.len(),
        y.len(),
        "{} and {} differ in size",
        a.display(),
        b.display()
    );
    if let Some(at) = first_difference(&x, &y) {
        panic!(
            "{} differs from {} at byte {at:#x}",
            b.display(),
            a.display()
        );
    }
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
    assert_same(src, &dest);
    let st = stats(dir, "send.json");
    assert_eq!(st["status"], "completed");
    assert_eq!(st["ram"]["total"], GIB as u64);
    assert_eq!(st["ram"]["remaining"], 0);
    assert!(
        st["ram"]["duplicate"].as_u64().unwrap() > 0,
        "mixed RAM has zero pages"
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
    let dir = tempdir();
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

#[test]
fn bandwidth_cap_holds_within_ten_percent() {
    let dir = tempdir();
    let src = dir.path().join("source.ram");
    // Random pages: the stream is as big as the RAM, so 320 MiB at 96 MiB/s
    // takes about 3.3 s.
    let size = 320usize << 20;
    let image: Vec<u8> = {
        let mut rng = ram::Xorshift64::new(5);
        (0..size / 8)
            .flat_map(|_| rng.next_u64().to_le_bytes())
            .collect()
    };
    fs::write(&src, &image).expect("writing RAM");
    let dest = dir.path().join("dest.ram");
    let (mut r, uri) = receiver(dir.path(), "tcp:127.0.0.1:0", &dest, 2);
    let cap: u64 = 96 << 20;
    let start = Instant::now();
    let mut s = sender(dir.path(), &src, &uri, &["--max-bandwidth", "96M"]);
    assert!(
        s.wait(RUN_TIMEOUT).expect("send ends").success(),
        "{}",
        s.stderr()
    );
    let elapsed = start.elapsed().as_secs_f64();
    assert!(r
        .wait(Duration::from_secs(30))
        .expect("receive ends")
        .success());
    assert_same(&src, &dest);
    let st = stats(dir.path(), "send.json");
    let bytes = st["ram"]["transferred"].as_u64().unwrap() as f64;
    let secs = st["total-time"].as_u64().unwrap() as f64 / 1000.0;
    assert!(
        secs >= 3.0,
        "the transfer must last 3 s or more to measure: {secs} s"
    );
    let rate = bytes / secs;
    let err = (rate - cap as f64).abs() / cap as f64;
    eprintln!("cap {cap} B/s, measured {rate:.0} B/s over {secs:.2} s ({elapsed:.2} s wall), error {:.1}%", err * 100.0);
    assert!(
        err <= 0.10,
        "measured {rate:.0} B/s against a cap of {cap} B/s"
    );
}

/// Starts a slow migration (capped) of 256 MiB; returns (dir, src, receiver, sender).
fn slow_migration() -> (TempDir, PathBuf, Background, Background) {
    let dir = tempdir();
    let src = dir.path().join("source.ram");
    ram::write_mixed_image(&src, 256 << 20, 41).expect("writing RAM");
    let dest = dir.path().join("dest.ram");
    let (r, uri) = receiver(dir.path(), "tcp:127.0.0.1:0", &dest, 2);
    let s = sender(
        dir.path(),
        &src,
        &uri,
        &["--max-bandwidth", "20M", "--compress"],
    );
    (dir, src, r, s)
}

/// Kills `victim`, then checks that `side` (the killed process's side) exits
/// non-zero within a second or two naming it, that the other side fails
/// too, and that no ferry process is left.
fn kill_and_check(kind: &str, on_sender: bool) {
    let (_dir, _src, mut r, mut s) = slow_migration();
    let mut all: Vec<u32> = vec![r.pid(), s.pid()];
    for k in ["scanner", "compress", "writer"] {
        all.push(
            s.wait_actor(k, Duration::from_secs(20))
                .expect("sender actor"),
        );
    }
    all.push(
        r.wait_actor("reader", Duration::from_secs(20))
            .expect("reader actor"),
    );
    std::thread::sleep(Duration::from_millis(1500));
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
        assert!(
            took < Duration::from_secs(2),
            "noticed {kind}'s death after {took:?}"
        );
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
