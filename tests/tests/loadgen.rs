//! `ferry loadgen`, the synthetic guest, driven as a real process: its files,
//! its dirty rate and working set, `stop` that really stops every write,
//! `cont`, the throttle, the resume when a controller vanishes, malformed
//! requests, and a clean exit on SIGTERM.

use std::fs;
use std::io::{BufRead, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use ferry_tests::ferry::run_ferry;
use ferry_tests::guest_control::GuestControl as Control;
use ferry_tests::proc::Background;
use serde_json::{json, Value};
use tempfile::TempDir;

const PAGE: usize = 4096;
const MIB: f64 = (1 << 20) as f64;

/// A running `ferry loadgen` in its own temporary directory.
struct Guest {
    proc: Background,
    ram: PathBuf,
    log: PathBuf,
    sock: PathBuf,
    // Last: removed after the process is killed.
    _dir: TempDir,
}

impl Guest {
    /// Starts `ferry loadgen --size SIZE extra...`; returns once it is ready.
    fn start(size: &str, extra: &[&str]) -> Guest {
        let dir = tempfile::Builder::new()
            .prefix("ferry-loadgen-")
            .tempdir()
            .expect("creating a temporary directory");
        let d = dir.path();
        let (ram, log, sock) = (d.join("guest.ram"), d.join("dirty.log"), d.join("ctl.sock"));
        let mut args = vec![
            "loadgen".to_owned(),
            "--ram".to_owned(),
            ram.display().to_string(),
            "--size".to_owned(),
            size.to_owned(),
            "--dirty-log".to_owned(),
            log.display().to_string(),
            "--control".to_owned(),
            format!("unix:{}", sock.display()),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Guest::spawn(dir, &args, ram, log, sock)
    }

    fn spawn(dir: TempDir, args: &[String], ram: PathBuf, log: PathBuf, sock: PathBuf) -> Guest {
        let proc = Background::spawn(args, &dir.path().join("loadgen.err"))
            .expect("starting ferry loadgen");
        proc.wait_stderr("ferry loadgen: ready:", Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("ferry loadgen not ready: {e}"));
        Guest {
            proc,
            ram,
            log,
            sock,
            _dir: dir,
        }
    }

    fn control(&self) -> Control {
        Control::connect(&self.sock)
    }

    /// The dirty log's bits, page by page.
    fn dirty_pages(&self) -> Vec<bool> {
        let bytes = fs::read(&self.log).expect("reading the dirty log");
        bytes
            .chunks_exact(8)
            .flat_map(|w| {
                let w = u64::from_le_bytes(w.try_into().unwrap());
                (0..64).map(move |b| w >> b & 1 == 1)
            })
            .collect()
    }

    fn ram(&self) -> Vec<u8> {
        fs::read(&self.ram).expect("reading the RAM file")
    }

    /// SIGTERM; returns the exit status.
    fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: kill has no memory-safety preconditions; the pid is our own
        // child, still unwaited (so not reused).
        unsafe {
            libc::kill(self.proc.pid() as libc::pid_t, libc::SIGTERM);
        }
        self.proc
            .wait(Duration::from_secs(10))
            .expect("ferry loadgen exits on SIGTERM")
    }
}

fn zero(page: &[u8]) -> bool {
    page.iter().all(|&b| b == 0)
}

#[test]
fn files_have_the_right_sizes_and_the_patterns_character() {
    // 32 MiB + one page + a bit: rounded down to 8193 pages.
    let size = (32 << 20) + PAGE + 1000;
    let dir = tempfile::Builder::new()
        .prefix("ferry-loadgen-")
        .tempdir()
        .unwrap();
    // A stale socket from a killed loadgen is replaced.
    let sock = dir.path().join("ctl.sock");
    drop(UnixListener::bind(&sock).unwrap());
    let (ram, log) = (dir.path().join("guest.ram"), dir.path().join("dirty.log"));
    fs::write(&ram, vec![0xaa; 3 * PAGE]).unwrap();
    let args: Vec<String> = [
        "loadgen",
        "--ram",
        ram.to_str().unwrap(),
        "--size",
        &size.to_string(),
        "--dirty-log",
        log.to_str().unwrap(),
        "--control",
        &format!("unix:{}", sock.display()),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut g = Guest::spawn(dir, &args, ram, log, sock);
    assert!(
        g.proc.stderr().contains("8193 pages"),
        "{}",
        g.proc.stderr()
    );
    let mem = g.ram();
    assert_eq!(mem.len(), 8193 * PAGE);
    assert_eq!(
        fs::metadata(&g.log).unwrap().len(),
        8193u64.div_ceil(64) * 8
    );
    assert!(
        g.dirty_pages().iter().all(|&d| !d),
        "the dirty log starts clean"
    );
    let zeros = mem.chunks(PAGE).filter(|p| zero(p)).count();
    let share = zeros as f64 / 8193.0;
    assert!(
        (0.3..0.5).contains(&share),
        "mixed: {zeros} of 8193 pages are zero"
    );
    // Without --dirty-rate nothing is written.
    thread::sleep(Duration::from_millis(200));
    assert_eq!(g.control().pages_written(), 0);
    assert!(g.ram() == mem, "RAM changed without a dirty rate");
    // A second loadgen on the same socket refuses before touching the files.
    let out = run_ferry(
        [
            "loadgen",
            "--ram",
            g.ram.to_str().unwrap(),
            "--size",
            "1M",
            "--dirty-log",
            g.log.to_str().unwrap(),
            "--control",
            &format!("unix:{}", g.sock.display()),
        ],
        Duration::from_secs(20),
    )
    .unwrap();
    assert!(
        !out.status.success() && out.stderr.contains("in use"),
        "{}",
        out.stderr
    );
    assert!(g.ram() == mem, "a refused loadgen changed the RAM file");
    assert_eq!(
        fs::metadata(&g.log).unwrap().len(),
        8193u64.div_ceil(64) * 8
    );
    // SIGTERM: exit 0, socket gone.
    let status = g.terminate();
    assert!(status.success(), "{status}:\n{}", g.proc.stderr());
    assert!(!g.sock.exists(), "the control socket is left behind");
    assert!(g.proc.stderr().contains("exiting"), "{}", g.proc.stderr());

    let g = Guest::start("1M", &["--pattern", "zero"]);
    assert!(g.ram().chunks(PAGE).all(zero), "zero pattern");
    let g = Guest::start("1M", &["--pattern", "random"]);
    assert!(!g.ram().chunks(PAGE).any(zero), "random pattern");
    let g = Guest::start("1M", &["--pattern", "text"]);
    let text = g.ram();
    assert!(
        text.iter()
            .all(|&b| b.is_ascii_alphanumeric() || b" \n".contains(&b)),
        "text pattern"
    );
}

#[test]
fn bad_options_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ram = dir.path().join("r");
    let log = dir.path().join("l");
    let ctl = format!("unix:{}", dir.path().join("s").display());
    for (extra, what) in [
        (&["--size", "4000"][..], "less than one page"),
        (&["--size", "1M", "--working-set", "0"][..], "working-set"),
        (&["--size", "1M", "--working-set", "1.5"][..], "working-set"),
        (&["--size", "1M", "--threads", "0"][..], "threads"),
        (&["--size", "1M", "--dirty-rate", "fast"][..], "dirty-rate"),
    ] {
        let mut args = vec![
            "loadgen",
            "--ram",
            ram.to_str().unwrap(),
            "--dirty-log",
            log.to_str().unwrap(),
            "--control",
            &ctl,
        ];
        args.extend_from_slice(extra);
        let out = run_ferry(&args, Duration::from_secs(20)).unwrap();
        assert!(!out.status.success(), "{extra:?} was accepted");
        assert!(out.stderr.contains(what), "{extra:?}: {}", out.stderr);
    }
    let not_a_socket = dir.path().join("plain");
    fs::write(&not_a_socket, "keep me").unwrap();
    for (control, what) in [
        ("tcp:localhost:4444".to_owned(), "unix:PATH"),
        (format!("unix:{}", not_a_socket.display()), "not a socket"),
    ] {
        let out = run_ferry(
            [
                "loadgen",
                "--ram",
                ram.to_str().unwrap(),
                "--size",
                "1M",
                "--dirty-log",
                log.to_str().unwrap(),
                "--control",
                &control,
            ],
            Duration::from_secs(20),
        )
        .unwrap();
        assert!(
            !out.status.success() && out.stderr.contains(what),
            "{control}: {}",
            out.stderr
        );
    }
    assert_eq!(fs::read_to_string(&not_a_socket).unwrap(), "keep me");
}

#[test]
fn dirties_only_the_working_set_at_the_set_rate() {
    let g = Guest::start(
        "32M",
        &[
            "--dirty-rate",
            "64M",
            "--working-set",
            "0.25",
            "--threads",
            "2",
        ],
    );
    let ws = 8192 / 4;
    let before = g.ram();
    let mut c = g.control();
    thread::sleep(Duration::from_millis(1300));
    let rate = c.rate_mib();
    let dirty = g.dirty_pages();
    let after = g.ram();
    assert!(
        (64.0 * 0.8..=64.0 * 1.2).contains(&rate),
        "measured {rate:.1} MiB/s, set 64"
    );
    let inside = dirty[..ws].iter().filter(|&&d| d).count();
    let outside = dirty[ws..].iter().filter(|&&d| d).count();
    assert_eq!(outside, 0, "pages beyond the working set are marked dirty");
    // ~21000 writes at random over 2048 pages leave few untouched.
    assert!(inside > ws * 9 / 10, "only {inside} of {ws} pages dirty");
    assert!(
        before[ws * PAGE..] == after[ws * PAGE..],
        "pages beyond the working set changed"
    );
    let changed = (0..ws)
        .filter(|&p| before[p * PAGE..(p + 1) * PAGE] != after[p * PAGE..(p + 1) * PAGE])
        .count();
    assert!(changed > 0, "no page of the working set changed");
    eprintln!("measured {rate:.1} MiB/s (set 64 MiB/s), {inside}/{ws} pages dirty");
}

#[test]
fn stop_stops_every_write_and_cont_resumes() {
    let g = Guest::start("32M", &["--dirty-rate", "64M", "--threads", "2"]);
    let mut c = g.control();
    thread::sleep(Duration::from_millis(300));
    for round in 0..3 {
        assert_eq!(c.execute("stop", None), json!({}));
        let written = c.pages_written();
        let (ram, log) = (g.ram(), fs::read(&g.log).unwrap());
        thread::sleep(Duration::from_millis(300));
        let status = c.status();
        assert_eq!(status["status"], "paused", "round {round}: {status}");
        assert_eq!(status["running"], false);
        assert_eq!(
            status["pages-written"], written,
            "round {round}: written while stopped"
        );
        assert!(g.ram() == ram, "round {round}: RAM changed while stopped");
        assert!(
            fs::read(&g.log).unwrap() == log,
            "round {round}: dirty log changed while stopped"
        );
        // A second stop is harmless.
        assert_eq!(c.execute("stop", None), json!({}));
        assert_eq!(c.execute("cont", None), json!({}));
        thread::sleep(Duration::from_millis(300));
        let status = c.status();
        assert_eq!(status["status"], "running");
        let more = status["pages-written"].as_u64().unwrap();
        // 300 ms at 64 MiB/s is ~4900 pages.
        assert!(
            more > written + 2000,
            "round {round}: {written} -> {more} after cont"
        );
    }
}

#[test]
fn throttle_slows_the_writers_in_proportion() {
    let g = Guest::start("32M", &["--dirty-rate", "64M"]);
    let mut c = g.control();
    thread::sleep(Duration::from_millis(1200));
    let full = c.rate_mib();
    assert!(
        (64.0 * 0.8..=64.0 * 1.2).contains(&full),
        "unthrottled: {full:.1} MiB/s"
    );
    let set = c.execute("set-throttle", Some(json!({ "percent": 50 })));
    assert_eq!(set, json!({}));
    thread::sleep(Duration::from_millis(1500));
    let status = c.status();
    assert_eq!(status["throttle-percent"], 50);
    let half = status["dirty-rate"].as_f64().unwrap() / MIB;
    assert!(
        (32.0 * 0.75..=32.0 * 1.25).contains(&half),
        "throttle 50%: {half:.1} MiB/s (unthrottled {full:.1})"
    );
    c.execute("set-throttle", Some(json!({ "percent": 90 })));
    thread::sleep(Duration::from_millis(1500));
    let tenth = c.rate_mib();
    assert!(
        (6.4 * 0.6..=6.4 * 1.4).contains(&tenth),
        "throttle 90%: {tenth:.1} MiB/s"
    );
    c.execute("set-throttle", Some(json!({ "percent": 0 })));
    thread::sleep(Duration::from_millis(1500));
    let back = c.rate_mib();
    assert!(
        (64.0 * 0.8..=64.0 * 1.2).contains(&back),
        "throttle back to 0: {back:.1} MiB/s"
    );
    eprintln!("unthrottled {full:.1}, 50%: {half:.1}, 90%: {tenth:.1}, back to 0: {back:.1} MiB/s");
}

#[test]
fn a_controller_that_disconnects_while_stopped_resumes_the_guest() {
    let g = Guest::start("8M", &["--dirty-rate", "64M"]);
    let mut c = g.control();
    c.execute("stop", None);
    assert_eq!(c.status()["status"], "paused");
    drop(c);
    let mut c = g.control();
    let deadline = Instant::now() + Duration::from_secs(2);
    while c.status()["status"] != "running" {
        assert!(
            Instant::now() < deadline,
            "still paused 2 s after the controller left"
        );
        thread::sleep(Duration::from_millis(20));
    }
    let n = c.pages_written();
    thread::sleep(Duration::from_millis(200));
    assert!(c.pages_written() > n, "running but not writing");
    assert!(g.proc.stderr().contains("resuming"), "{}", g.proc.stderr());
    // A controller that leaves a running guest leaves it running.
    drop(c);
    let mut c = g.control();
    assert_eq!(c.status()["status"], "running");
}

#[test]
fn malformed_requests_get_errors_and_the_socket_keeps_working() {
    let g = Guest::start("4M", &["--dirty-rate", "1M"]);
    let mut c = g.control();
    let long = vec![b'{'; 200_000];
    let bad: Vec<&[u8]> = vec![
        b"{",
        b"not json",
        b"\xff\xfe\x00",
        b"[1,2]",
        b"{}",
        b"{\"execute\":42}",
        b"{\"execute\":\"reboot\"}",
        b"{\"execute\":\"query-status\",\"arguments\":5}",
        b"{\"execute\":\"stop\",\"arguments\":{\"force\":true}}",
        b"{\"execute\":\"set-throttle\"}",
        b"{\"execute\":\"set-throttle\",\"arguments\":{\"percent\":100}}",
        b"{\"execute\":\"set-throttle\",\"arguments\":{\"percent\":-5}}",
        b"{\"execute\":\"set-throttle\",\"arguments\":{\"percent\":\"50\"}}",
        b"{\"execute\":\"set-throttle\",\"arguments\":{\"percent\":12.5}}",
        &long,
    ];
    for line in bad {
        let reply = c.raw(line);
        let shown = String::from_utf8_lossy(&line[..line.len().min(60)]).into_owned();
        assert_eq!(reply["error"]["class"], "GenericError", "{shown}: {reply}");
        assert!(reply["error"]["desc"].is_string(), "{shown}: {reply}");
        assert!(reply.get("return").is_none(), "{shown}: {reply}");
    }
    // Still serving, on the same connection, with nothing changed.
    let status = c.status();
    assert_eq!(status["status"], "running");
    assert_eq!(status["throttle-percent"], 0);
    // An id is echoed; two requests in one write get two replies in order.
    let reply = c.raw(br#"{"execute":"query-status","id":"a"}"#);
    assert_eq!(reply["id"], "a");
    c.writer
        .write_all(b"{\"execute\":\"stop\",\"id\":1}\n{\"execute\":\"cont\",\"id\":2}\n")
        .unwrap();
    for id in [1, 2] {
        let mut line = String::new();
        c.reader.read_line(&mut line).unwrap();
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v, json!({"return": {}, "id": id}));
    }
    // A client that sends half a line and hangs up does not wedge the socket.
    {
        let mut s = UnixStream::connect(&g.sock).unwrap();
        s.write_all(b"{\"execute\":\"sto").unwrap();
    }
    drop(c);
    let mut c = g.control();
    assert_eq!(
        c.execute("set-throttle", Some(json!({"percent": 99}))),
        json!({})
    );
    assert_eq!(c.status()["throttle-percent"], 99);
}
