//! Live migration against `ferry loadgen`, a guest that keeps dirtying its
//! memory while it is copied: the copy must equal the source at switchover,
//! a guest that outruns the link converges only with auto-converge, and a
//! guest or receiver that dies mid-migration ends everything cleanly with the
//! guest (if alive) running.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_tests::proc::{self, Background};
use ferry_tests::ram::first_difference;
use serde_json::{json, Value};
use tempfile::TempDir;

const RUN_TIMEOUT: Duration = Duration::from_secs(180);

fn tempdir() -> TempDir {
    // Guest RAM lives in tmpfs, as on a real host.
    tempfile::Builder::new()
        .prefix("ferry-live-")
        .tempdir_in("/dev/shm")
        .expect("creating a temporary directory")
}

/// A loadgen guest and the paths around it.
struct Guest {
    proc: Background,
    ram: PathBuf,
    log: PathBuf,
    ctl: PathBuf,
}

fn guest(dir: &Path, size: &str, rate: &str) -> Guest {
    let ram = dir.join("src.ram");
    let log = dir.join("dirty.log");
    let ctl = dir.join("guest.sock");
    let proc = Background::spawn(
        &[
            "loadgen".to_owned(),
            "--ram".to_owned(),
            ram.display().to_string(),
            "--size".to_owned(),
            size.to_owned(),
            "--dirty-log".to_owned(),
            log.display().to_string(),
            "--control".to_owned(),
            format!("unix:{}", ctl.display()),
            "--dirty-rate".to_owned(),
            rate.to_owned(),
        ],
        &dir.join("loadgen.err"),
    )
    .expect("starting ferry loadgen");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ctl.exists() {
        assert!(
            Instant::now() < deadline,
            "loadgen did not start: {}",
            proc.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Guest {
        proc,
        ram,
        log,
        ctl,
    }
}

/// Asks the guest one QMP-style question.
fn ask(ctl: &Path, command: &str) -> Value {
    let s = UnixStream::connect(ctl).expect("connecting to the guest");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    writeln!(&s, "{}", json!({ "execute": command })).unwrap();
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).unwrap();
    serde_json::from_str(&line).expect("a JSON reply")
}

fn receiver(dir: &Path) -> (Background, String, PathBuf) {
    let dest = dir.join("dst.ram");
    let mut r = Background::spawn(
        &[
            "receive".to_owned(),
            "--listen".to_owned(),
            "tcp:127.0.0.1:0".to_owned(),
            "--ram".to_owned(),
            format!("{},name=ram", dest.display()),
        ],
        &dir.join("receive.err"),
    )
    .expect("starting ferry receive");
    let uri = r
        .wait_listening(Duration::from_secs(20))
        .expect("receiver listens");
    (r, uri, dest)
}

fn send(dir: &Path, g: &Guest, to: &str, extra: &[&str]) -> Background {
    let mut args: Vec<String> = [
        "send",
        "--ram",
        &format!("{},name=ram", g.ram.display()),
        "--to",
        to,
        "--dirty-log",
        &g.log.display().to_string(),
        "--guest-control",
        &format!("unix:{}", g.ctl.display()),
        "--no-progress",
        "--stats-json",
        &dir.join("send.json").display().to_string(),
    ]
    .map(String::from)
    .into();
    args.extend(extra.iter().map(|s| s.to_string()));
    Background::spawn(&args, &dir.join("send.err")).expect("starting ferry send")
}

fn stats(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("send.json")).expect("stats"))
        .expect("stats are JSON")
}

fn status(ctl: &Path) -> String {
    ask(ctl, "query-status")["return"]["status"]
        .as_str()
        .unwrap_or("?")
        .to_owned()
}

#[test]
fn destination_equals_source_at_switchover_while_the_guest_dirties() {
    for compress in [false, true] {
        let dir = tempdir();
        let g = guest(dir.path(), "512M", "128M");
        let (mut r, uri, dest) = receiver(dir.path());
        let mut extra = vec!["--max-bandwidth", "512M"];
        if compress {
            extra.push("--compress");
        }
        let mut s = send(dir.path(), &g, &uri, &extra);
        assert!(
            s.wait(RUN_TIMEOUT).unwrap().success(),
            "send: {}",
            s.stderr()
        );
        assert!(
            r.wait(Duration::from_secs(30)).unwrap().success(),
            "receive: {}",
            r.stderr()
        );
        // The guest stays stopped after a completed migration, so its RAM is
        // what it was at switchover.
        assert_eq!(status(&g.ctl), "postmigrate");
        let (a, b) = (
            std::fs::read(&g.ram).unwrap(),
            std::fs::read(&dest).unwrap(),
        );
        if let Some(at) = first_difference(&a, &b) {
            panic!("destination differs from the source at byte {at:#x}");
        }
        let st = stats(dir.path());
        assert_eq!(st["status"], "completed");
        let rounds = st["rounds"].as_array().unwrap();
        assert!(
            !rounds.is_empty(),
            "a dirtying guest needs more than one round"
        );
        assert!(
            rounds[0]["dirty-rate"].as_f64().unwrap() > 10e6,
            "the guest dirtied memory: {st}"
        );
        assert!(st["downtime"].as_u64().is_some() && st["expected-downtime"].as_u64().is_some());
    }
}

#[test]
fn a_guest_that_outruns_the_link_converges_only_with_auto_converge() {
    let dir = tempdir();
    let g = guest(dir.path(), "64M", "128M");
    // Without auto-converge: the guest dirties twice as fast as the link sends.
    let (mut r, uri, _) = receiver(dir.path());
    let mut s = send(
        dir.path(),
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
        status(&g.ctl),
        "running",
        "a failed migration leaves the guest running"
    );
    assert_eq!(stats(dir.path())["status"], "failed");

    // With auto-converge the throttle brings the dirty rate under the link.
    let (mut r, uri, dest) = receiver(dir.path());
    let mut s = send(
        dir.path(),
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
    assert!(
        s.wait(RUN_TIMEOUT).unwrap().success(),
        "send: {}",
        s.stderr()
    );
    assert!(
        r.wait(Duration::from_secs(30)).unwrap().success(),
        "receive: {}",
        r.stderr()
    );
    let st = stats(dir.path());
    assert!(
        st["throttle-percent"].as_u64().unwrap() >= 30,
        "the guest was throttled: {st}"
    );
    assert_eq!(
        std::fs::read(&g.ram).unwrap(),
        std::fs::read(&dest).unwrap()
    );
}

#[test]
fn a_killed_guest_fails_the_migration_cleanly() {
    let dir = tempdir();
    let g = guest(dir.path(), "256M", "64M");
    let (mut r, uri, _) = receiver(dir.path());
    let mut s = send(dir.path(), &g, &uri, &["--max-bandwidth", "32M"]);
    let writer = s.wait_actor("writer", Duration::from_secs(20)).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
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
    let dir = tempdir();
    let g = guest(dir.path(), "256M", "64M");
    let (mut r, uri, _) = receiver(dir.path());
    let mut s = send(dir.path(), &g, &uri, &["--max-bandwidth", "32M"]);
    let reader = r.wait_actor("reader", Duration::from_secs(20)).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    proc::kill9(reader);
    let t = Instant::now();
    let st = s.wait(Duration::from_secs(30)).unwrap();
    assert!(!st.success(), "send must fail: {}", s.stderr());
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "noticed after {:?}",
        t.elapsed()
    );
    assert_eq!(status(&g.ctl), "running");
    assert!(!r.wait(Duration::from_secs(10)).unwrap().success());
}
