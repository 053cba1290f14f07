//! The control plane (issue 14), driven as a management layer drives QEMU:
//! through the QMP socket of `ferry send --qmp` / `ferry receive --qmp`, with
//! QEMU's own Python client library `qemu.qmp` (tests/qmp/drive.py), and with
//! raw malformed requests (tests/qmp/malformed.py).
//!
//! What must hold: query-migrate follows the migration; a bandwidth cap
//! raised mid-run takes effect at once; migrate_cancel and SIGTERM at setup,
//! in the bulk round, in a late round and after the guest was stopped each
//! leave the guest running (resumed by ferry, not by the guest's own
//! disconnect rule) and the receiver not complete, with exit status 3;
//! events arrive in QEMU's order; malformed requests get QMP errors while
//! the migration goes on.

use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ferry_tests::ferry::workspace_root;
use ferry_tests::files::{read_json, shm_tempdir};
use ferry_tests::guest::{loadgen, Guest};
use ferry_tests::migrate;
use ferry_tests::proc::Process;
use serde_json::Value;

const PREFIX: &str = "ferry-qmp-";
const RUN: Duration = Duration::from_secs(120);
/// Exit status of a cancelled migration.
const CANCELLED: i32 = 3;
/// What loadgen says when it resumes itself because its controller left
/// while the guest was stopped: ferry must have resumed it before that.
const SELF_RESUMED: &str = "the control connection closed while the guest was stopped";

/// A Python script of tests/qmp running against a QMP socket.
struct Script(Child);

fn script(name: &str, sock: &Path, args: &[String]) -> Script {
    let path = workspace_root().join("tests/qmp").join(name);
    let child = Command::new("python3")
        .arg(path)
        .arg(sock)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    Script(child)
}

impl Script {
    /// Its JSON report; panics with its stderr and `ferry`'s (the process
    /// it drove) if it failed (e.g. when `qemu.qmp` is not installed:
    /// `.ci/run` installs it).
    fn report(self, ferry: &Process) -> Value {
        let out = self.0.wait_with_output().expect("the script ran");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "the QMP script failed: {stderr}\nferry said: {}",
            ferry.stderr()
        );
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("the QMP script printed no JSON ({e}): {stderr}"))
    }
}

/// A guest, a receiver and a sender with `--qmp`, in one directory.
struct Run {
    dir: tempfile::TempDir,
    guest: Guest,
    receiver: Option<Process>,
    sender: Process,
}

impl Run {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn sender_qmp(&self) -> PathBuf {
        self.path("send.qmp")
    }
}

/// Starts a `size` guest dirtying `rate`, a `ferry receive` (with `--qmp`
/// on `receive.qmp`) unless `to` names a destination, and `ferry send --qmp
/// unix:DIR/send.qmp` with `extra` arguments.
fn start(size: &str, rate: &str, to: Option<&str>, extra: &[&str]) -> Run {
    start_with(size, rate, &[], to, &[], extra)
}

/// [`start`], with `guest` arguments for `ferry loadgen` and `receive`
/// arguments for `ferry receive`.
fn start_with(
    size: &str,
    rate: &str,
    guest: &[&str],
    to: Option<&str>,
    receive: &[&str],
    extra: &[&str],
) -> Run {
    let dir = shm_tempdir(PREFIX);
    let d = dir.path();
    let guest = loadgen(d, "src", size)
        .rate(rate)
        .args(guest)
        .start()
        .expect("starting ferry loadgen");
    let (receiver, uri) = match to {
        Some(to) => (None, to.to_owned()),
        None => {
            let qmp = format!("unix:{}", d.join("receive.qmp").display());
            let (r, uri) = migrate::receive(d, "tcp:127.0.0.1:0", &d.join("dst.ram"))
                .args(&["--qmp", &qmp])
                .args(receive)
                .start_listening(&d.join("receive.err"))
                .expect("starting ferry receive");
            (Some(r), uri)
        }
    };
    let qmp = format!("unix:{}", d.join("send.qmp").display());
    let sender = migrate::send(d, "send", &uri)
        .args(&guest.send_args())
        .args(&["--qmp", &qmp])
        .args(extra)
        .start(&d.join("send.err"))
        .expect("starting ferry send");
    Run {
        dir,
        guest,
        receiver,
        sender,
    }
}

/// The MIGRATION statuses and MIGRATION_PASS numbers of a report, in order.
fn events(report: &Value) -> Vec<(String, Value)> {
    report["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| {
            (
                e["event"].as_str().unwrap_or("").to_owned(),
                e["data"].clone(),
            )
        })
        .collect()
}

/// Events come in QEMU's order: statuses only move forward through setup,
/// active, device and an end; MIGRATION_PASS counts up by one; timestamps
/// never go back.
fn assert_in_order(report: &Value, end: &str) {
    let order = ["setup", "active", "device", "cancelling", end];
    let mut rank = 0;
    let mut pass = None;
    let mut last_ts = 0.0;
    for e in report["events"].as_array().expect("events") {
        let ts = e["timestamp"]["seconds"].as_f64().unwrap()
            + e["timestamp"]["microseconds"].as_f64().unwrap() / 1e6;
        assert!(ts >= last_ts, "timestamps go back: {report}");
        last_ts = ts;
        match e["event"].as_str() {
            Some("MIGRATION") => {
                let s = e["data"]["status"].as_str().unwrap();
                let r = order
                    .iter()
                    .position(|o| *o == s)
                    .unwrap_or_else(|| panic!("unexpected status {s}: {report}"));
                assert!(r >= rank, "status {s} after a later one: {report}");
                rank = r;
            }
            Some("MIGRATION_PASS") => {
                let p = e["data"]["pass"].as_u64().unwrap();
                if let Some(prev) = pass {
                    assert_eq!(p, prev + 1, "passes count up by one: {report}");
                }
                pass = Some(p);
            }
            other => panic!("unexpected event {other:?}: {report}"),
        }
    }
    let last = events(report)
        .into_iter()
        .rev()
        .find(|(e, _)| e == "MIGRATION");
    assert_eq!(
        last.map(|(_, d)| d["status"].clone()),
        Some(Value::from(end)),
        "the last MIGRATION event: {report}"
    );
}

/// `(t, transferred)` of the polls with `status`.
fn transferred(report: &Value, status: &str) -> Vec<(f64, u64)> {
    report["polls"]
        .as_array()
        .expect("polls")
        .iter()
        .filter(|p| p["status"] == status)
        .filter_map(|p| Some((p["t"].as_f64()?, p["transferred"].as_u64()?)))
        .collect()
}

/// A `size` guest migrated with `--max-bandwidth cap`, raised to unlimited
/// through QMP 1.5 s in; both ends succeed. Returns the run and drive.py's
/// report.
fn raise_cap_mid_run(size: &str, cap: &str) -> (Run, Value) {
    let mut run = start(size, "0", None, &["--max-bandwidth", cap]);
    let report = script(
        "drive.py",
        &run.sender_qmp(),
        &["--set".into(), r#"1.5={"max-bandwidth": 0}"#.into()],
    )
    .report(&run.sender);
    let st = run.sender.wait(RUN).unwrap();
    assert!(st.success(), "{}", run.sender.stderr());
    let r = run.receiver.as_mut().unwrap();
    assert!(r.wait(RUN).unwrap().success(), "{}", r.stderr());
    (run, report)
}

/// Seconds from the raise to the MIGRATION event "completed", in a
/// [`raise_cap_mid_run`] report.
fn completed_after_raise(report: &Value) -> f64 {
    let set_t = report["sets"][0]["t"].as_f64().expect("the cap was raised");
    let done = report["events"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["data"]["status"] == "completed")
        .unwrap_or_else(|| panic!("no completed event: {report}"));
    done["t"].as_f64().unwrap() - set_t
}

/// A low cap fills the writer's mailbox with chunks that take minutes to
/// write at that rate: the raise must not wait behind them.
#[test]
fn a_raise_from_a_low_cap_does_not_wait_behind_queued_chunks() {
    let (_run, report) = raise_cap_mid_run("64M", "200K");
    // At 200 KB/s the 64 MiB would take over five minutes.
    let finish = completed_after_raise(&report);
    assert!(
        finish < 15.0,
        "{finish:.1} s after the cap was raised; events: {}",
        report["events"]
    );
}

#[test]
fn a_cap_raised_mid_run_takes_effect_at_once_and_query_migrate_follows() {
    const CAP: f64 = 16.0 * 1048576.0;
    let (run, report) = raise_cap_mid_run("384M", "16M");

    // query-migrate while active: the writer's byte count grows.
    let active = transferred(&report, "active");
    assert!(active.len() >= 10, "polled while active: {report}");
    assert!(active.windows(2).all(|w| w[1].1 >= w[0].1), "{report}");
    let distinct = active.windows(2).filter(|w| w[1].1 > w[0].1).count();
    assert!(distinct >= 3, "transferred grew while active: {report}");

    // Capped: the rate over the first 1.5 s stays near 16 MiB/s.
    let set_t = report["sets"][0]["t"].as_f64().expect("the cap was raised");
    let before: Vec<_> = active.iter().filter(|(t, _)| *t <= set_t).collect();
    let (first, last) = (before.first().unwrap(), before.last().unwrap());
    let capped = (last.1 - first.1) as f64 / (last.0 - first.0);
    assert!(capped < CAP * 1.5, "capped rate {capped:.0} B/s: {report}");

    // Uncapped: the next report of the writer's counters (it reports every
    // 250 ms; the cap applies from its next 100 ms window) shows at least
    // four times the capped rate, and the rest goes within seconds.
    let after = report["polls"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| Some((p["t"].as_f64()?, p["transferred"].as_u64()?)))
        .find(|(t, b)| *t > set_t && (*b - last.1) as f64 > 4.0 * CAP * (*t - last.0))
        .unwrap_or_else(|| panic!("the rate never rose: {report}"));
    // query-migrate follows the orchestrator's progress reports, not the
    // writer's windows (checked on the writer's own counters below): a
    // bound of seconds, not of a window.
    assert!(
        after.0 - set_t < 3.0,
        "rate change seen {:.3} s after the set: {report}",
        after.0 - set_t
    );
    let finish = completed_after_raise(&report);
    assert!(
        finish < 10.0,
        "{finish:.1} s after the cap was raised: {report}"
    );
    assert_in_order(&report, "completed");

    // The end figures in --stats-json are query-migrate's.
    let stats = read_json(&run.path("send.json"));
    assert_rate_change_within_one_window(&stats, CAP);
    assert_eq!(stats["status"], "completed");
    assert_eq!(stats["ram"]["total"], 384u64 << 20);
    assert!(stats["ram"]["transferred"].as_u64() >= active.last().map(|a| a.1));
    assert_eq!(run.guest.status().unwrap(), "postmigrate");
}

/// `(t, compressed pages, compressed bytes)` of the polls.
fn compressed(report: &Value) -> Vec<(f64, u64, u64)> {
    report["polls"]
        .as_array()
        .expect("polls")
        .iter()
        .filter_map(|p| {
            let n = p["compressed-pages"].as_u64()?;
            Some((p["t"].as_f64()?, n, p["compressed-size"].as_u64()?))
        })
        .collect()
}

#[test]
fn a_zstd_level_raised_mid_run_compresses_the_next_packets_harder() {
    // Text-like RAM over two zstd channels at level 1, capped so that the
    // run lasts; at 1 s the level goes to 9 (a new frame on each channel).
    let mut run = start_with(
        "128M",
        "0",
        &["--pattern", "text"],
        None,
        &["--multifd-channels", "2"],
        &[
            "--max-bandwidth",
            "12M",
            "--multifd-channels",
            "2",
            "--multifd-compression",
            "zstd",
            "--multifd-zstd-level",
            "1",
        ],
    );
    let report = script(
        "drive.py",
        &run.sender_qmp(),
        &["--set".into(), r#"1.0={"multifd-zstd-level": 9}"#.into()],
    )
    .report(&run.sender);
    let st = run.sender.wait(RUN).unwrap();
    assert!(st.success(), "{}", run.sender.stderr());
    assert!(run.sender.stderr().contains("destination verified"));
    let r = run.receiver.as_mut().unwrap();
    assert!(r.wait(RUN).unwrap().success(), "{}", r.stderr());
    let set_t = report["sets"][0]["t"].as_f64().expect("the level was set");
    let polls = compressed(&report);
    // Bytes per compressed page before the change, and from a moment after
    // it (the batches in flight went at level 1) to the last poll.
    let per_page = |from: &(f64, u64, u64), to: &(f64, u64, u64)| {
        (to.2 - from.2) as f64 / (to.1 - from.1).max(1) as f64
    };
    let before: Vec<_> = polls.iter().filter(|p| p.0 <= set_t && p.1 > 0).collect();
    let after: Vec<_> = polls.iter().filter(|p| p.0 >= set_t + 0.5).collect();
    assert!(before.len() >= 2 && after.len() >= 2, "{report}");
    let (b, a) = (
        per_page(before[0], before[before.len() - 1]),
        per_page(after[0], after[after.len() - 1]),
    );
    assert!(
        a < b * 0.95,
        "bytes per page: {b:.0} at level 1, {a:.0} at 9: {report}"
    );
}

/// The writer's own counters (`rate-changes` in --stats-json: its bytes per
/// 100 ms rate window around each max-bandwidth change) show the raise
/// from `cap` to unlimited in the first window after it: the windows before
/// stay near the cap, the first one after carries four times as much.
fn assert_rate_change_within_one_window(stats: &Value, cap: f64) {
    let changes = stats["rate-changes"].as_array().expect("rate-changes");
    assert_eq!(changes.len(), 1, "one change: {stats}");
    let c = &changes[0];
    assert_eq!((c["from"].as_f64(), c["to"].as_u64()), (Some(cap), Some(0)));
    let rate =
        |w: &Value| w["bytes"].as_f64().unwrap() / (w["ms"].as_f64().unwrap().max(1.0) / 1e3);
    let before = c["before"].as_array().unwrap();
    assert!(before.len() >= 4, "windows before the change: {c}");
    // Whole windows only: the one the change cut short may be a sliver.
    let full: Vec<_> = before
        .iter()
        .filter(|w| w["ms"].as_u64() >= Some(100))
        .collect();
    let bytes: f64 = full.iter().map(|w| w["bytes"].as_f64().unwrap()).sum();
    let secs: f64 = full.iter().map(|w| w["ms"].as_f64().unwrap() / 1e3).sum();
    assert!(bytes / secs < cap * 1.5, "capped windows: {c}");
    let first = &c["after"][0];
    assert_eq!(first["start-ms"], 0, "{c}");
    assert_eq!(first["cap"], 0, "{c}");
    assert!(first["ms"].as_u64() >= Some(100), "a whole window: {c}");
    assert!(
        rate(first) > 4.0 * cap,
        "the first window after the change ran at {:.0} B/s: {c}",
        rate(first)
    );
}

/// The extra arguments that put a migration at `point` for a while.
fn scenario(point: &str) -> (&'static str, &'static str, Vec<&'static str>) {
    match point {
        // The writer cannot connect (see jammed_listener): setup lasts.
        "setup" => ("64M", "4M", vec![]),
        // Round 0 of 256 MiB at 16 MiB/s takes seconds.
        "bulk" => ("256M", "4M", vec!["--max-bandwidth", "16M"]),
        // A guest that dirties faster than the link carries never converges.
        "late" => (
            "16M",
            "32M",
            vec!["--max-bandwidth", "8M", "--downtime-limit", "1"],
        ),
        // Any limit is met after round 0; the last round then takes seconds.
        "device" => (
            "64M",
            "16M",
            vec!["--max-bandwidth", "16M", "--downtime-limit", "600000"],
        ),
        _ => unreachable!(),
    }
}

/// A tcp listener that accepts nothing more: its backlog of 0 is full with
/// one connection, so the next connect (ferry's writer) hangs in SYN
/// retries and the migration stays in setup.
fn jammed_listener() -> (TcpListener, std::net::TcpStream, String) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    // SAFETY: listen(2) on a socket this function owns; no memory is shared.
    let rc = unsafe { libc::listen(l.as_raw_fd(), 0) };
    assert_eq!(rc, 0, "listen(0)");
    let addr = l.local_addr().unwrap();
    let filler = std::net::TcpStream::connect(addr).unwrap();
    (l, filler, format!("tcp:{addr}"))
}

/// What a client saw of a migration it acted on at `point`: a client that
/// came during setup heard of it first; a late round's dirty rate; the
/// guest's run state (query-status) when the cancel came.
fn assert_what_the_client_saw(point: &str, ctx: &str, report: &Value) {
    let acted = &report["acted"];
    if point == "setup" {
        // A client that comes during setup hears of it first, as from QEMU.
        let first = events(report).into_iter().next();
        assert_eq!(
            first.map(|(e, d)| (e, d["status"].clone())),
            Some(("MIGRATION".to_owned(), Value::from("setup"))),
            "{ctx}: {report}"
        );
    }
    if point == "late" {
        // The guest dirties 32 MiB/s of its 16 MiB: query-migrate says so
        // once a round ended (at most 4096 pages per round of about 2 s).
        let rate = acted["info"]["ram"]["dirty-pages-rate"].as_u64();
        assert!(rate > Some(100), "{ctx}: dirty-pages-rate: {report}");
    }
    // query-status: the guest as ferry knows it when the cancel came.
    let state = if point == "device" {
        "finish-migrate"
    } else {
        "running"
    };
    assert_eq!(acted["run-state"]["status"], state, "{ctx}: {report}");
    assert_eq!(acted["run-state"]["running"], state == "running", "{ctx}");
    if point == "device" {
        assert_eq!(acted["info"]["status"], "device");
    }
}

fn cancel_at(point: &str, how: &str) {
    let (size, rate, extra) = scenario(point);
    let jam = (point == "setup").then(jammed_listener);
    let mut run = start(size, rate, jam.as_ref().map(|j| j.2.as_str()), &extra);
    let mut args = vec![
        "--at".to_owned(),
        point.to_owned(),
        "--do".into(),
        how.into(),
    ];
    if how == "sigterm" {
        args.extend(["--pid".into(), run.sender.pid().to_string()]);
    }
    let report = script("drive.py", &run.sender_qmp(), &args).report(&run.sender);
    let ctx = format!("{how} at {point}");
    let acted = &report["acted"];
    assert!(
        acted.is_object(),
        "{ctx}: the point was never reached: {report}"
    );
    let st = run.sender.wait(RUN).unwrap();
    assert_eq!(st.code(), Some(CANCELLED), "{ctx}: {}", run.sender.stderr());
    let why = if how == "cancel" {
        "migrate_cancel"
    } else {
        "SIGTERM"
    };
    assert!(
        run.sender
            .last_line()
            .contains(&format!("migration cancelled by {why}")),
        "{ctx}: {}",
        run.sender.stderr()
    );
    // The guest runs, and ferry resumed it (a stopped guest whose controller
    // leaves resumes itself, which would prove nothing).
    run.guest
        .wait_status("running", Duration::from_secs(10))
        .unwrap();
    assert!(
        !run.guest.proc.stderr().contains(SELF_RESUMED),
        "{ctx}: {}",
        run.guest.proc.stderr()
    );
    let stats = read_json(&run.path("send.json"));
    assert_eq!(stats["status"], "cancelled", "{ctx}: {stats}");
    assert_in_order(&report, "cancelled");
    assert_what_the_client_saw(point, &ctx, &report);
    // The destination is not complete.
    if let Some(r) = run.receiver.as_mut() {
        let rs = r.wait(RUN).unwrap();
        assert!(
            !rs.success(),
            "{ctx}: the receiver completed: {}",
            r.stderr()
        );
        let rstats = read_json(&run.path("receive.json"));
        assert_ne!(rstats["status"], "completed", "{ctx}: {rstats}");
    }
    if let Some((l, _filler, _)) = jam {
        // ferry's connection never got through: only the filler was queued.
        l.set_nonblocking(true).unwrap();
        let (first, _) = l.accept().expect("the filler");
        drop(first);
        assert!(l.accept().is_err(), "{ctx}: a connection got through");
    }
}

#[test]
fn migrate_cancel_at_setup_bulk_late_and_device_leaves_the_guest_running() {
    for point in ["setup", "bulk", "late", "device"] {
        cancel_at(point, "cancel");
    }
}

#[test]
fn sigterm_at_setup_bulk_late_and_device_leaves_the_guest_running() {
    for point in ["setup", "bulk", "late", "device"] {
        cancel_at(point, "sigterm");
    }
}

#[test]
fn malformed_requests_get_qmp_errors_and_the_migration_goes_on() {
    let mut run = start("256M", "4M", None, &["--max-bandwidth", "32M"]);
    // Two clients at once, then a reconnect.
    let watcher = script("drive.py", &run.sender_qmp(), &[]);
    for _ in 0..2 {
        let report = script("malformed.py", &run.sender_qmp(), &[]).report(&run.sender);
        let answers = report["answers"].as_array().unwrap();
        let answer = |name: &str| {
            answers
                .iter()
                .find(|a| a[0] == name)
                .map(|a| a[1].clone())
                .unwrap_or_else(|| panic!("no answer to {name}: {report}"))
        };
        let class = |name: &str| answer(name)["error"]["class"].clone();
        assert_eq!(class("before negotiation"), "CommandNotFound", "{report}");
        assert!(answer("negotiation")["return"].is_object(), "{report}");
        assert_eq!(class("bad json"), "GenericError", "{report}");
        assert_eq!(class("not an object"), "GenericError", "{report}");
        assert_eq!(class("unknown command"), "CommandNotFound", "{report}");
        assert_eq!(answer("unknown command")["id"], 1, "{report}");
        assert_eq!(class("wrong argument type"), "GenericError", "{report}");
        assert_eq!(class("unknown argument"), "GenericError", "{report}");
        assert_eq!(class("10 MB line"), "GenericError", "{report}");
        let ok = answer("valid after all that");
        assert_eq!(ok["id"], 4, "{report}");
        assert!(ok["return"]["status"].is_string(), "{report}");
    }
    let watched = watcher.report(&run.sender);
    let st = run.sender.wait(RUN).unwrap();
    assert!(st.success(), "{}", run.sender.stderr());
    assert!(run.sender.stderr().contains("destination verified"));
    let r = run.receiver.as_mut().unwrap();
    assert!(r.wait(RUN).unwrap().success(), "{}", r.stderr());
    assert_in_order(&watched, "completed");
    // The bad max-bandwidth changed nothing: the cap held.
    let stats = read_json(&run.path("send.json"));
    assert_eq!(stats["status"], "completed");
}

#[test]
fn receive_answers_query_migrate_and_sigterm_fails_it() {
    let mut run = start("256M", "4M", None, &["--max-bandwidth", "32M"]);
    let pid = run.receiver.as_ref().unwrap().pid();
    let report = script(
        "drive.py",
        &run.path("receive.qmp"),
        &[
            "--at".into(),
            "active".into(),
            "--do".into(),
            "sigterm".into(),
            "--pid".into(),
            pid.to_string(),
        ],
    )
    .report(run.receiver.as_ref().unwrap());
    let r = run.receiver.as_mut().unwrap();
    let rs = r.wait(RUN).unwrap();
    assert_eq!(rs.code(), Some(CANCELLED), "{}", r.stderr());
    let rstats = read_json(&run.path("receive.json"));
    assert_eq!(rstats["status"], "cancelled", "{rstats}");
    assert!(
        report["acted"]["info"]["ram"]["transferred"].as_u64() > Some(0),
        "{report}"
    );
    assert_eq!(
        report["acted"]["run-state"]["status"], "inmigrate",
        "{report}"
    );
    assert_in_order(&report, "cancelled");
    // The sender fails on the broken connection; the guest runs.
    let st = run.sender.wait(RUN).unwrap();
    assert_eq!(st.code(), Some(1), "{}", run.sender.stderr());
    run.guest
        .wait_status("running", Duration::from_secs(10))
        .unwrap();
}

/// A `--qmp` path where another process already serves QMP is refused:
/// replacing the socket would cut that migration's controller off.
#[test]
fn a_live_qmp_socket_is_not_taken_over() {
    let dir = shm_tempdir(PREFIX);
    let d = dir.path();
    let sock = d.join("busy.qmp");
    let _busy = std::os::unix::net::UnixListener::bind(&sock).expect("binding the busy socket");
    let ram = d.join("ram");
    std::fs::write(&ram, vec![7u8; 1 << 20]).unwrap();
    let out = ferry_tests::ferry::run_ferry(
        [
            "send".to_owned(),
            "--ram".into(),
            ram.display().to_string(),
            "--to".into(),
            format!("file:{}", d.join("out.mig").display()),
            "--qmp".into(),
            format!("unix:{}", sock.display()),
        ],
        RUN,
    )
    .expect("running ferry send");
    assert!(!out.status.success(), "ferry send took over a live socket");
    assert!(
        out.stderr.contains("another process is listening"),
        "{}",
        out.stderr
    );
    assert!(!d.join("out.mig").exists(), "a stream was written");
    // The socket is still the one the other process listens on.
    std::os::unix::net::UnixStream::connect(&sock).expect("the busy socket still answers");
}
