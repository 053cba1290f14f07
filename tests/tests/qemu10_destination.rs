//! `ferry send` into a real QEMU 10 destination, without multifd.
//!
//! QEMU 8.2 and later refuse a ZERO record whose fill byte is not 0, wait for
//! the byte after EOF (the vmdesc trailer) before they report success, and
//! tell a source how the load went only over their return path, with a SHUT
//! message after the last byte. So: the RAM images here have pages of one
//! repeated non-zero byte, every send must leave the destination's RAM equal
//! to the source's byte for byte, `--return-path` must succeed only on SHUT 0
//! and fail within a second of a late refusal (a device section QEMU does not
//! know, placed last) with a live source guest running again, and a send
//! without a return path must say `completed-unverified`.
//!
//! QEMU 10 is taken from `$FERRY_QEMU10_PREFIX` (default /opt/qemu-10.0.2, an
//! unpacked Debian package tree, as `.ci/run` installs it). It is required:
//! without it every test here fails, naming the path.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use ferry_proto::stream::device_state::DeviceState;
use ferry_tests::ferry::{ferry_bin, run_ferry};
use ferry_tests::qemu::{none_machine_args, ram_file_args, Build, Qemu};
use ferry_tests::ram::{first_difference, write_mixed_image};
use serde_json::{json, Value};
use tempfile::TempDir;

const TIMEOUT: Duration = Duration::from_secs(120);

fn tempdir() -> TempDir {
    // RAM files live in tmpfs, as a guest's would.
    tempfile::Builder::new()
        .prefix("ferry-q10-")
        .tempdir_in("/dev/shm")
        .expect("creating a temporary directory")
}

fn pc_args(ram: &Path, size: u64) -> Vec<String> {
    let mut args: Vec<String> = ["-M", "pc", "-accel", "tcg", "-nodefaults"]
        .map(String::from)
        .into();
    args.extend(ram_file_args(ram, size));
    args
}

/// QEMU 10 with `args`, through the harness's one QMP client.
fn qemu10(name: &str, args: &[String]) -> Qemu {
    Qemu::spawn_build(Build::Qemu10, args)
        .unwrap_or_else(|e| panic!("starting QEMU 10 {name}: {e}"))
}

/// A destination started with `args` that listens on `dir/in.sock`.
fn destination(dir: &Path, args: &[String]) -> (Qemu, String) {
    let sock = dir.join("in.sock");
    let mut args = args.to_vec();
    args.extend(["-incoming".into(), format!("unix:{}", sock.display())]);
    let q = qemu10("dest", &args);
    assert!(sock.exists(), "QEMU 10 listens on {}", sock.display());
    (q, format!("unix:{}", sock.display()))
}

/// A source started (paused) with `args` migrates to a file; ferry extracts
/// its device state and RAM blocks. Returns the device state file, the
/// directory of the blocks and their names in QEMU's order.
fn from_qemu10_source(dir: &Path, args: &[String]) -> (PathBuf, PathBuf, Vec<String>) {
    let mut args = args.to_vec();
    args.push("-S".into());
    let mut src = qemu10("source", &args);
    let stream = dir.join("qemu10.mig");
    let part = dir.join("qemu10.mig.part");
    // QEMU says completed before its `cat` has finished: the rename marks the end.
    let uri = format!(
        "exec:cat > {} && mv {} {}",
        part.display(),
        part.display(),
        stream.display()
    );
    src.qmp("migrate", json!({ "uri": uri }));
    src.wait_completed();
    let deadline = Instant::now() + TIMEOUT;
    while !stream.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            stream.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let device = dir.join("device.state");
    let blocks = dir.join("blocks");
    let s = stream.to_str().expect("utf-8 path");
    let d = device.to_str().expect("utf-8 path");
    let b = blocks.to_str().expect("utf-8 path");
    run_ferry(
        [
            "inspect",
            s,
            "--extract-device-state",
            d,
            "--extract-ram",
            b,
        ],
        TIMEOUT,
    )
    .and_then(|o| o.success())
    .unwrap_or_else(|e| panic!("ferry inspect of QEMU 10's stream: {e}"));
    let report = run_ferry(["inspect", s, "--json"], TIMEOUT)
        .and_then(|o| o.success())
        .unwrap_or_else(|e| panic!("ferry inspect --json: {e}"));
    let json: Value = serde_json::from_str(&report.stdout).expect("inspect prints JSON");
    let names = json["ram_blocks"]
        .as_array()
        .expect("ram_blocks")
        .iter()
        .map(|b| b["idstr"].as_str().expect("idstr").to_owned())
        .collect();
    (device, blocks, names)
}

/// Runs `ferry send` to `to` with `extra` arguments, stats in `dir/send.json`.
fn send(dir: &Path, rams: &[String], to: &str, extra: &[&str]) -> ferry_tests::ferry::Output {
    let stats = dir.join("send.json");
    let mut args: Vec<String> = Vec::new();
    for r in rams {
        args.extend(["--ram".to_owned(), r.clone()]);
    }
    args.extend(
        [
            "--to",
            to,
            "--no-progress",
            "--stats-json",
            stats.to_str().expect("utf-8"),
        ]
        .map(String::from),
    );
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    run_ferry(std::iter::once("send".to_owned()).chain(args), TIMEOUT)
        .unwrap_or_else(|e| panic!("running ferry send: {e}"))
}

fn stats(dir: &Path) -> Value {
    let text = fs::read_to_string(dir.join("send.json")).expect("ferry wrote its statistics");
    serde_json::from_str(&text).expect("statistics are JSON")
}

/// A mixed RAM image of `mib` MiB in `dir/src.ram`, and its size. Its pages
/// of one repeated non-zero byte reach QEMU 10 only as normal pages.
fn source_ram(dir: &Path, mib: u64, seed: u64) -> (PathBuf, u64) {
    let src = dir.join("src.ram");
    write_mixed_image(&src, (mib << 20) as usize, seed).expect("writing the RAM image");
    (src, mib << 20)
}

/// `ferry send --return-path`, which must end with QEMU's SHUT 0 and a
/// destination whose migration completed.
fn send_verified(dir: &Path, q: &mut Qemu, rams: &[String], to: &str, extra: &[&str]) {
    let args: Vec<&str> = std::iter::once("--return-path")
        .chain(extra.iter().copied())
        .collect();
    let out = send(dir, rams, to, &args);
    assert!(
        out.status.success(),
        "ferry send --return-path failed: {}\nQEMU:\n{}",
        out.stderr,
        q.stderr()
    );
    assert!(out.stderr.contains("SHUT 0"), "{}", out.stderr);
    let st = stats(dir);
    assert_eq!(st["status"], "completed", "{st}");
    assert_eq!(st["return-path"], "qemu", "{st}");
    q.wait_completed();
}

fn assert_same_ram(dest: &Path, src: &Path) {
    let got = fs::read(dest).expect("reading the destination's RAM");
    let want = fs::read(src).expect("reading the source's RAM");
    assert_eq!(got.len(), want.len(), "RAM sizes");
    if let Some(at) = first_difference(&got, &want) {
        panic!("the destination's RAM differs from the source's at byte {at:#x}");
    }
}

#[test]
fn return_path_send_into_a_none_machine_succeeds_on_shut_0_with_equal_ram() {
    let dir = tempdir();
    let (src, size) = source_ram(dir.path(), 32, 31);
    let dst = dir.path().join("dst.ram");
    let (mut q, to) = destination(dir.path(), &none_machine_args(&dst, size));
    let rams = [format!("{},name=mem", src.display())];
    send_verified(dir.path(), &mut q, &rams, &to, &[]);
    assert_same_ram(&dst, &src);
}

#[test]
fn return_path_send_into_a_pc_machine_with_qemu10_device_state_succeeds_with_equal_ram() {
    let dir = tempdir();
    let (src, size) = source_ram(dir.path(), 128, 32);
    let (device, blocks, names) = from_qemu10_source(dir.path(), &pc_args(&src, size));
    assert!(names.len() >= 4, "-M pc has several RAM blocks: {names:?}");
    let rams: Vec<String> = names
        .iter()
        .map(|n| {
            let file = blocks.join(ferry_guest::load::block_file_name(n));
            format!("{},name={n}", file.display())
        })
        .collect();
    let dst = dir.path().join("dst.ram");
    let (mut q, to) = destination(dir.path(), &pc_args(&dst, size));
    let device = device.to_str().expect("utf-8 path");
    send_verified(dir.path(), &mut q, &rams, &to, &["--device-state", device]);
    assert_same_ram(&dst, &src);
}

#[test]
fn a_destination_that_dies_without_shut_fails_a_return_path_send() {
    let dir = tempdir();
    let (src, size) = source_ram(dir.path(), 32, 34);
    let (mut q, to) = destination(
        dir.path(),
        &none_machine_args(&dir.path().join("dst.ram"), size),
    );
    // Slow enough (about 5 s) that the destination dies mid-stream: once
    // it is loading.
    let killer = std::thread::spawn(move || {
        let deadline = Instant::now() + TIMEOUT;
        while q.qmp("query-migrate", json!({}))["status"] != "active" {
            assert!(
                Instant::now() < deadline,
                "the destination never started loading"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(500));
        ferry_tests::proc::kill9(q.pid());
        q
    });
    let rams = [format!("{},name=mem", src.display())];
    let out = send(
        dir.path(),
        &rams,
        &to,
        &["--return-path", "--max-bandwidth", "4M"],
    );
    let _ = killer.join();
    assert!(
        !out.status.success(),
        "ferry send succeeded: {}",
        out.stderr
    );
    assert!(
        out.stderr
            .contains("closed the connection without a SHUT message"),
        "{}",
        out.stderr
    );
    assert_eq!(stats(dir.path())["status"], "failed");
}

#[test]
fn without_a_return_path_a_qemu10_destination_leaves_the_send_unverified() {
    let dir = tempdir();
    let (src, size) = source_ram(dir.path(), 16, 33);
    let dst = dir.path().join("dst.ram");
    let (mut q, to) = destination(dir.path(), &none_machine_args(&dst, size));
    let out = send(
        dir.path(),
        &[format!("{},name=mem", src.display())],
        &to,
        &[],
    );
    assert!(out.status.success(), "ferry send failed: {}", out.stderr);
    assert!(
        out.stderr.contains("completed-unverified"),
        "{}",
        out.stderr
    );
    let st = stats(dir.path());
    assert_eq!(st["status"], "completed-unverified", "{st}");
    assert_eq!(st["return-path"], "silent", "{st}");
    // QEMU loaded it all the same: the vmdesc trailer came after EOF.
    q.wait_completed();
    assert!(
        !q.stderr().contains("Expected vmdescription"),
        "QEMU missed the vmdesc: {}",
        q.stderr()
    );
    assert_same_ram(&dst, &src);
}

/// A ferry process in the background; killed on drop.
struct Background(Child);

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn background(args: &[String], stderr: &Path) -> Background {
    let child = Command::new(ferry_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(stderr).expect("creating a log"))
        .spawn()
        .expect("starting ferry");
    Background(child)
}

/// The guest's run state, from its control socket.
fn guest_status(ctl: &Path) -> String {
    let s = UnixStream::connect(ctl).expect("connecting to the guest");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    writeln!(&s, "{}", json!({ "execute": "query-status" })).expect("asking the guest");
    let mut line = String::new();
    BufReader::new(&s)
        .read_line(&mut line)
        .expect("the guest answers");
    let v: Value = serde_json::from_str(&line).expect("a JSON reply");
    v["return"]["status"].as_str().unwrap_or("?").to_owned()
}

/// A FULL section for a device no QEMU has, with an empty body.
fn unknown_device_section(id: u32) -> Vec<u8> {
    let name = b"ferry-no-such-device";
    let mut s = vec![0x04];
    s.extend_from_slice(&id.to_be_bytes());
    s.push(name.len() as u8);
    s.extend_from_slice(name);
    s.extend_from_slice(&0u32.to_be_bytes()); // instance
    s.extend_from_slice(&1u32.to_be_bytes()); // version
    s.push(0x7e);
    s.extend_from_slice(&id.to_be_bytes());
    s
}

/// A `ferry loadgen` guest of 64 MiB that keeps dirtying its RAM, and its
/// RAM file, dirty log and control socket.
fn live_guest(d: &Path) -> (Background, [PathBuf; 3]) {
    let (ram, log, ctl) = (d.join("g.ram"), d.join("g.log"), d.join("g.sock"));
    let args = [
        "loadgen".into(),
        "--ram".into(),
        ram.display().to_string(),
        "--size".into(),
        "64M".into(),
        "--dirty-log".into(),
        log.display().to_string(),
        "--control".into(),
        format!("unix:{}", ctl.display()),
        "--dirty-rate".into(),
        "8M".into(),
    ];
    let guest = background(&args, &d.join("loadgen.err"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ctl.exists() {
        assert!(Instant::now() < deadline, "loadgen did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    (guest, [ram, log, ctl])
}

/// Waits for `sender` to exit; returns its status and how long after QEMU
/// logged its refusal it exited (zero if the refusal was logged only after
/// the exit, or never).
fn exit_after_refusal(sender: &mut Background, q: &Qemu) -> (ExitStatus, Duration) {
    let deadline = Instant::now() + TIMEOUT;
    let mut refused_at = None;
    loop {
        let now = Instant::now();
        if refused_at.is_none() && q.stderr().contains("load of migration failed") {
            refused_at = Some(now);
        }
        if let Some(status) = sender.0.try_wait().expect("waiting for ferry send") {
            return (
                status,
                now.saturating_duration_since(refused_at.unwrap_or(now)),
            );
        }
        assert!(
            now < deadline,
            "ferry send did not finish; QEMU:\n{}",
            q.stderr()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_late_refusal_fails_a_live_return_path_send_within_a_second_and_the_guest_runs() {
    let dir = tempdir();
    let d = dir.path();
    let size = 64u64 << 20;
    // Device state from a QEMU 10 source of the same command line, with an
    // unknown device placed last: QEMU refuses it after all RAM loaded.
    let (device, _, _) = from_qemu10_source(d, &none_machine_args(&d.join("qsrc.ram"), size));
    let state = fs::read(&device).expect("reading the device state");
    let mut state = DeviceState::from_bytes(state).expect("QEMU's device state parses");
    // After the sections QEMU's vmdesc sizes, carried whole; appended after
    // the file's EOF and vmdesc it would sit behind the stream's EOF.
    state.opaque.extend(unknown_device_section(1000));
    let bad = d.join("bad.state");
    fs::write(&bad, state.to_bytes()).expect("writing the device state");

    let (_guest, [ram, log, ctl]) = live_guest(d);
    let (q, to) = destination(d, &none_machine_args(&d.join("dst.ram"), size));
    let send_err = d.join("send.err");
    let args = [
        "send".into(),
        "--ram".into(),
        format!("{},name=mem", ram.display()),
        "--to".into(),
        to,
        "--return-path".into(),
        "--device-state".into(),
        bad.display().to_string(),
        "--dirty-log".into(),
        log.display().to_string(),
        "--guest-control".into(),
        format!("unix:{}", ctl.display()),
        "--no-progress".into(),
        "--stats-json".into(),
        d.join("send.json").display().to_string(),
    ];
    let mut sender = background(&args, &send_err);
    let (status, delay) = exit_after_refusal(&mut sender, &q);
    let stderr = fs::read_to_string(&send_err).unwrap_or_default();
    assert!(
        !status.success(),
        "ferry send succeeded although QEMU refused: {stderr}\nQEMU:\n{}",
        q.stderr()
    );
    assert!(
        q.stderr().contains("ferry-no-such-device"),
        "QEMU refused the unknown device: {}",
        q.stderr()
    );
    assert!(
        delay < Duration::from_secs(1),
        "ferry send exited {delay:?} after QEMU's refusal"
    );
    assert!(
        stderr.contains("the destination reported a failure (SHUT 1); see its log"),
        "ferry names what QEMU said: {stderr}"
    );
    let st = stats(d);
    assert_eq!(st["status"], "failed", "{st}");
    assert_eq!(guest_status(&ctl), "running", "the source guest runs again");
}
