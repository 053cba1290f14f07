//! `ferry loadgen`, the synthetic guest, driven as a real process: its files,
//! its dirty rate and working set, `stop` that really stops every write,
//! `cont`, the throttle, the resume when a controller vanishes, malformed
//! requests, and a clean exit on SIGTERM.
//!
//! Rates are measured from outside, by the dirty log's bits (see
//! [`page_writes`]), not by loadgen's own meter, with generous bounds: the
//! machine running the tests may be busy, and what is checked is that the rate
//! and the throttle take effect, not how precisely (a benchmark's job).

use std::fs;
use std::io::{BufRead, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::thread;
use std::time::Duration;

use ferry_tests::ferry::run_ferry;
use ferry_tests::files::{shm_tempdir, tempdir};
use ferry_tests::guest::{check_throttle, dirty_bits, loadgen, over_a_second, page_writes, Guest};
use ferry_tests::proc::wait_until;
use serde_json::{json, Value};

const PAGE: usize = 4096;
const MIB: f64 = (1 << 20) as f64;
const PREFIX: &str = "ferry-loadgen-";

fn zero(page: &[u8]) -> bool {
    page.iter().all(|&b| b == 0)
}

/// The guest's write rate over pages `[0, pages)` of its RAM, MiB/s, measured
/// over about a second by the bits it sets in its dirty log.
fn measured_rate(g: &Guest, pages: usize) -> f64 {
    let (before, after, secs) = over_a_second(|| dirty_bits(&g.log));
    page_writes(&before[..pages], &after[..pages]) * PAGE as f64 / MIB / secs
}

/// Waits until the guest's RAM differs from `ram`: it writes again.
fn wait_written(g: &Guest, ram: &[u8], what: &str) {
    wait_until(Duration::from_secs(5), what, || g.ram_bytes() != ram)
        .unwrap_or_else(|e| panic!("{e}"));
}

/// Starts a guest whose RAM file and socket are left over from an earlier,
/// killed loadgen.
fn guest_over_stale_files(dir: &Path, size: usize) -> Guest {
    // A stale socket from a killed loadgen is replaced.
    drop(UnixListener::bind(dir.join("guest.sock")).unwrap());
    fs::write(dir.join("guest.ram"), vec![0xaa; 3 * PAGE]).unwrap();
    loadgen(dir, "guest", &size.to_string())
        .start()
        .expect("starting ferry loadgen")
}

/// A second loadgen on the same socket refuses before touching the files.
fn a_second_loadgen_is_refused(g: &Guest) {
    let mem = g.ram_bytes();
    let log_len = fs::metadata(&g.log).unwrap().len();
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
            &format!("unix:{}", g.ctl.display()),
        ],
        Duration::from_secs(20),
    )
    .unwrap();
    assert!(
        !out.status.success() && out.stderr.contains("in use"),
        "{}",
        out.stderr
    );
    assert!(
        g.ram_bytes() == mem,
        "a refused loadgen changed the RAM file"
    );
    assert_eq!(fs::metadata(&g.log).unwrap().len(), log_len);
}

#[test]
fn files_have_the_right_sizes_and_the_patterns_character() {
    // 32 MiB + one page + a bit: rounded down to 8193 pages.
    let dir = tempdir(PREFIX);
    let mut g = guest_over_stale_files(dir.path(), (32 << 20) + PAGE + 1000);
    assert!(
        g.proc.stderr().contains("8193 pages"),
        "{}",
        g.proc.stderr()
    );
    let mem = g.ram_bytes();
    assert_eq!(mem.len(), 8193 * PAGE);
    assert_eq!(
        fs::metadata(&g.log).unwrap().len(),
        8193u64.div_ceil(64) * 8
    );
    assert!(
        dirty_bits(&g.log).iter().all(|&d| !d),
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
    assert_eq!(g.control().status()["pages-written"], 0);
    assert!(g.ram_bytes() == mem, "RAM changed without a dirty rate");
    a_second_loadgen_is_refused(&g);
    // SIGTERM: exit 0, socket gone.
    let status = g.terminate();
    assert!(status.success(), "{status}:\n{}", g.proc.stderr());
    assert!(!g.ctl.exists(), "the control socket is left behind");
    assert!(g.proc.stderr().contains("exiting"), "{}", g.proc.stderr());

    let pattern = |name: &str| {
        loadgen(dir.path(), name, "1M")
            .args(&["--pattern", name])
            .start()
            .expect("starting ferry loadgen")
            .ram_bytes()
    };
    assert!(pattern("zero").chunks(PAGE).all(zero), "zero pattern");
    assert!(!pattern("random").chunks(PAGE).any(zero), "random pattern");
    assert!(
        pattern("text")
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || b" \n".contains(&b)),
        "text pattern"
    );
}

#[test]
fn bad_options_are_refused() {
    let dir = tempdir(PREFIX);
    let ram = dir.path().join("r");
    let log = dir.path().join("l");
    let ctl = format!("unix:{}", dir.path().join("s").display());
    for (extra, what) in [
        (&["--size", "4000"][..], "less than one page"),
        (&["--size", "1M", "--working-set", "0"][..], "working-set"),
        (&["--size", "1M", "--working-set", "1.5"][..], "working-set"),
        (&["--size", "1M", "--threads", "0"][..], "threads"),
        (&["--size", "1M", "--dirty-rate", "fast"][..], "dirty-rate"),
        (
            &["--size", "1M", "--control", "tcp:localhost:4444"][..],
            "unix:PATH",
        ),
    ] {
        let mut args = vec![
            "loadgen",
            "--ram",
            ram.to_str().unwrap(),
            "--dirty-log",
            log.to_str().unwrap(),
        ];
        if !extra.contains(&"--control") {
            args.extend(["--control", &ctl]);
        }
        args.extend_from_slice(extra);
        let out = run_ferry(&args, Duration::from_secs(20)).unwrap();
        assert!(!out.status.success(), "{extra:?} was accepted");
        assert!(out.stderr.contains(what), "{extra:?}: {}", out.stderr);
    }
    let not_a_socket = dir.path().join("plain");
    fs::write(&not_a_socket, "keep me").unwrap();
    let control = format!("unix:{}", not_a_socket.display());
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
        !out.status.success() && out.stderr.contains("not a socket"),
        "{control}: {}",
        out.stderr
    );
    assert_eq!(fs::read_to_string(&not_a_socket).unwrap(), "keep me");
}

/// 16 MiB/s over a working set of 16384 pages (a quarter of 256 MiB): about
/// 4096 writes in the measured second, so the working set stays mostly clean
/// and the bit count measures the rate. Bound: half to one and a half times
/// the set rate.
#[test]
fn dirties_only_the_working_set_at_the_set_rate() {
    let dir = shm_tempdir(PREFIX);
    let g = loadgen(dir.path(), "guest", "256M")
        .rate("16M")
        .args(&["--working-set", "0.25", "--threads", "2"])
        .start()
        .expect("starting ferry loadgen");
    let ws = 65536 / 4;
    let before = g.ram_bytes();
    let rate = measured_rate(&g, ws);
    let dirty = dirty_bits(&g.log);
    let after = g.ram_bytes();
    assert!(
        (16.0 * 0.5..=16.0 * 1.5).contains(&rate),
        "measured {rate:.1} MiB/s, set 16"
    );
    let outside = dirty[ws..].iter().filter(|&&d| d).count();
    assert_eq!(outside, 0, "pages beyond the working set are marked dirty");
    assert!(
        before[ws * PAGE..] == after[ws * PAGE..],
        "pages beyond the working set changed"
    );
    let changed = (0..ws)
        .filter(|&p| before[p * PAGE..(p + 1) * PAGE] != after[p * PAGE..(p + 1) * PAGE])
        .count();
    let marked = dirty[..ws].iter().filter(|&&d| d).count();
    assert!(
        changed > 0 && changed <= marked,
        "{changed} pages changed, {marked} marked dirty"
    );
    eprintln!("measured {rate:.1} MiB/s (set 16 MiB/s), {marked}/{ws} pages dirty");
}

#[test]
fn stop_stops_every_write_and_cont_resumes() {
    let dir = shm_tempdir(PREFIX);
    let g = loadgen(dir.path(), "guest", "32M")
        .rate("64M")
        .args(&["--threads", "2"])
        .start()
        .expect("starting ferry loadgen");
    let mut c = g.control();
    for round in 0..3 {
        c.command("stop", None);
        let written = c.status()["pages-written"].clone();
        let (ram, log) = (g.ram_bytes(), fs::read(&g.log).unwrap());
        thread::sleep(Duration::from_millis(300));
        let status = c.status();
        assert_eq!(status["status"], "paused", "round {round}: {status}");
        assert_eq!(status["running"], false);
        assert_eq!(
            status["pages-written"], written,
            "round {round}: written while stopped"
        );
        assert!(
            g.ram_bytes() == ram,
            "round {round}: RAM changed while stopped"
        );
        assert!(
            fs::read(&g.log).unwrap() == log,
            "round {round}: dirty log changed while stopped"
        );
        // A second stop is harmless.
        c.command("stop", None);
        c.command("cont", None);
        assert_eq!(c.status()["status"], "running");
        wait_written(&g, &ram, &format!("round {round}: RAM written after cont"));
    }
}

/// 32 MiB/s over 65536 pages, measured a second at a time: unthrottled, at
/// 50% and 90%, and back at 0. Bounds: the set rate within a factor of 1.5
/// either way; 50% between 0.3 and 0.7 of the unthrottled rate, 90% between
/// 0.02 and 0.25 of it.
#[test]
fn throttle_slows_the_writers_in_proportion() {
    let dir = shm_tempdir(PREFIX);
    let g = loadgen(dir.path(), "guest", "256M")
        .rate("32M")
        .start()
        .expect("starting ferry loadgen");
    check_throttle(&g, 32.0, &[(50, 0.3..=0.7), (90, 0.02..=0.25)], || {
        measured_rate(&g, 65536)
    });
}

#[test]
fn a_controller_that_disconnects_while_stopped_resumes_the_guest() {
    let dir = shm_tempdir(PREFIX);
    let g = loadgen(dir.path(), "guest", "8M")
        .rate("64M")
        .start()
        .expect("starting ferry loadgen");
    let mut c = g.control();
    c.command("stop", None);
    assert_eq!(c.status()["status"], "paused");
    let ram = g.ram_bytes();
    drop(c);
    let mut c = g.control();
    wait_until(Duration::from_secs(2), "the guest to resume", || {
        c.status()["status"] == "running"
    })
    .unwrap_or_else(|e| panic!("still paused after the controller left: {e}"));
    wait_written(&g, &ram, "RAM written after the resume");
    assert!(g.proc.stderr().contains("resuming"), "{}", g.proc.stderr());
    // A controller that leaves a running guest leaves it running.
    drop(c);
    let mut c = g.control();
    assert_eq!(c.status()["status"], "running");
}

#[test]
fn malformed_requests_get_errors_and_the_socket_keeps_working() {
    let dir = shm_tempdir(PREFIX);
    let g = loadgen(dir.path(), "guest", "4M")
        .rate("1M")
        .start()
        .expect("starting ferry loadgen");
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
        let reply = c.raw(line).unwrap();
        let shown = String::from_utf8_lossy(&line[..line.len().min(60)]).into_owned();
        // QMP's class for an unknown command, which ferry send relies on.
        let class = if shown.contains("reboot") {
            "CommandNotFound"
        } else {
            "GenericError"
        };
        assert_eq!(reply["error"]["class"], class, "{shown}: {reply}");
        assert!(reply["error"]["desc"].is_string(), "{shown}: {reply}");
        assert!(reply.get("return").is_none(), "{shown}: {reply}");
    }
    // Still serving, on the same connection, with nothing changed.
    let status = c.status();
    assert_eq!(status["status"], "running");
    assert_eq!(status["throttle-percent"], 0);
    // An id is echoed; two requests in one write get two replies in order.
    let reply = c.raw(br#"{"execute":"query-status","id":"a"}"#).unwrap();
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
        let mut s = UnixStream::connect(&g.ctl).unwrap();
        s.write_all(b"{\"execute\":\"sto").unwrap();
    }
    drop(c);
    let mut c = g.control();
    c.command("set-throttle", Some(json!({"percent": 99})));
    assert_eq!(c.status()["throttle-percent"], 99);
}
