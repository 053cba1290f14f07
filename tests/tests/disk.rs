//! Live disk migration: `ferry loadgen` writes RAM and a disk throughout, and
//! `ferry send --disk` / `ferry receive --disk` move both, the disk in QEMU's
//! "block" section through libblkio (io_uring, or virtio-blk-vhost-user on
//! qemu-storage-daemon). At switchover the destination disk equals the source
//! byte for byte; a destination that cannot take the disk (too small, unknown
//! device name, out of space) fails the migration cleanly, naming the disk,
//! with the guest running.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_tests::proc::Background;
use ferry_tests::ram::first_difference;
use serde_json::{json, Value};
use tempfile::TempDir;

const RUN_TIMEOUT: Duration = Duration::from_secs(180);
const VHOST: &str = "virtio-blk-vhost-user";

fn tempdir() -> TempDir {
    tempfile::Builder::new()
        .prefix("ferry-disk-")
        .tempdir_in("/dev/shm")
        .expect("creating a temporary directory")
}

/// A loadgen guest with RAM and a disk, both written throughout.
struct Guest {
    proc: Background,
    ram: PathBuf,
    log: PathBuf,
    ctl: PathBuf,
    disk: PathBuf,
    disk_log: PathBuf,
}

fn guest(dir: &Path, size: &str, disk_size: &str) -> Guest {
    let ram = dir.join("src.ram");
    let log = dir.join("dirty.log");
    let ctl = dir.join("guest.sock");
    let disk = dir.join("src.img");
    let disk_log = dir.join("disk.log");
    let args: Vec<String> = [
        "loadgen",
        "--ram",
        &ram.display().to_string(),
        "--size",
        size,
        "--dirty-log",
        &log.display().to_string(),
        "--control",
        &format!("unix:{}", ctl.display()),
        "--dirty-rate",
        "32M",
        "--disk",
        &disk.display().to_string(),
        "--disk-size",
        disk_size,
        "--disk-rate",
        "16M",
        "--disk-dirty-log",
        &disk_log.display().to_string(),
    ]
    .map(String::from)
    .into();
    let proc = Background::spawn(&args, &dir.join("loadgen.err")).expect("starting ferry loadgen");
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
        disk,
        disk_log,
    }
}

fn status(ctl: &Path) -> String {
    let s = UnixStream::connect(ctl).expect("connecting to the guest");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    writeln!(&s, "{}", json!({ "execute": "query-status" })).unwrap();
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).unwrap();
    let v: Value = serde_json::from_str(&line).expect("a JSON reply");
    v["return"]["status"].as_str().unwrap_or("?").to_owned()
}

/// `ferry receive` with one disk given as `disk` (PATH[,options]).
fn receiver(dir: &Path, disk: &str) -> (Background, String, PathBuf) {
    let dest = dir.join("dst.ram");
    let mut r = Background::spawn(
        &[
            "receive".to_owned(),
            "--listen".to_owned(),
            "tcp:127.0.0.1:0".to_owned(),
            "--ram".to_owned(),
            format!("{},name=ram", dest.display()),
            "--disk".to_owned(),
            disk.to_owned(),
        ],
        &dir.join("receive.err"),
    )
    .expect("starting ferry receive");
    let uri = r
        .wait_listening(Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("receiver listens: {e}: {}", r.stderr()));
    (r, uri, dest)
}

/// `ferry send` of the guest's RAM and one disk given as `disk`.
fn send(dir: &Path, g: &Guest, to: &str, disk: &str) -> Background {
    let args: Vec<String> = [
        "send",
        "--ram",
        &format!("{},name=ram", g.ram.display()),
        "--to",
        to,
        "--dirty-log",
        &g.log.display().to_string(),
        "--guest-control",
        &format!("unix:{}", g.ctl.display()),
        "--disk",
        disk,
        "--max-bandwidth",
        "256M",
        "--no-progress",
        "--stats-json",
        &dir.join("send.json").display().to_string(),
    ]
    .map(String::from)
    .into();
    Background::spawn(&args, &dir.join("send.err")).expect("starting ferry send")
}

fn stats(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("send.json")).expect("stats"))
        .expect("stats are JSON")
}

fn assert_same(what: &str, a: &Path, b: &Path) {
    let (a, b) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert_eq!(a.len(), b.len(), "{what}: sizes differ");
    if let Some(at) = first_difference(&a, &b) {
        panic!("{what}: the destination differs from the source at byte {at:#x}");
    }
}

/// A run that must succeed, then the checks of a completed migration.
fn migrate_and_compare(dir: &Path, g: &Guest, src_disk: &str, dst_disk: &str, dst_img: &Path) {
    let (mut r, uri, dest) = receiver(dir, dst_disk);
    let mut s = send(dir, g, &uri, src_disk);
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
    assert!(
        s.stderr().contains("RAM and disk digests match"),
        "{}",
        s.stderr()
    );
    // The guest stays stopped after the migration: its RAM and disk are
    // what they were at switchover.
    assert_eq!(status(&g.ctl), "postmigrate");
    assert_same("RAM", &g.ram, &dest);
    assert_same("disk", &g.disk, dst_img);
    let st = stats(dir);
    assert_eq!(st["status"], "completed");
    let rounds = st["rounds"].as_array().unwrap();
    assert!(
        !rounds.is_empty(),
        "a writing guest needs more than one round"
    );
}

#[test]
fn disk_and_ram_arrive_identical_while_the_guest_writes_io_uring() {
    let dir = tempdir();
    let g = guest(dir.path(), "256M", "64M");
    let dst = dir.path().join("dst.img");
    std::fs::File::create(&dst)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    migrate_and_compare(
        dir.path(),
        &g,
        &format!(
            "{},name=vda,dirty-log={}",
            g.disk.display(),
            g.disk_log.display()
        ),
        &format!("{},name=vda,driver=io_uring", dst.display()),
        &dst,
    );
}

/// qemu-storage-daemon exporting an image over vhost-user-blk, killed on drop.
struct Qsd {
    child: Child,
    socket: PathBuf,
}

impl Qsd {
    fn start(img: &Path, socket: PathBuf) -> Option<Self> {
        let bin = [
            "/usr/bin/qemu-storage-daemon",
            "/usr/local/bin/qemu-storage-daemon",
        ]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists());
        let Some(bin) = bin else {
            eprintln!("qemu-storage-daemon not found: skipping the vhost-user test");
            return None;
        };
        let child = Command::new(bin)
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=file0,filename={}",
                img.display()
            ))
            .arg("--blockdev")
            .arg("driver=raw,node-name=disk0,file=file0")
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={},writable=on",
                socket.display()
            ))
            .stdin(Stdio::null())
            .spawn()
            .expect("starting qemu-storage-daemon");
        let q = Qsd { child, socket };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !q.socket.exists() {
            assert!(
                Instant::now() < deadline,
                "qemu-storage-daemon did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(q)
    }
}

impl Drop for Qsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn disk_and_ram_arrive_identical_while_the_guest_writes_vhost_user() {
    let dir = tempdir();
    let g = guest(dir.path(), "256M", "64M");
    let dst = dir.path().join("dst.img");
    std::fs::File::create(&dst)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let Some(src_q) = Qsd::start(&g.disk, dir.path().join("src.sock")) else {
        return;
    };
    let Some(dst_q) = Qsd::start(&dst, dir.path().join("dst.sock")) else {
        return;
    };
    migrate_and_compare(
        dir.path(),
        &g,
        &format!(
            "{},name=vda,driver={VHOST},dirty-log={}",
            src_q.socket.display(),
            g.disk_log.display()
        ),
        &format!("{},name=vda,driver={VHOST}", dst_q.socket.display()),
        &dst,
    );
}

/// A run that must fail on the destination's account, naming `needles`,
/// with the guest still running and the destination not complete.
fn fails_cleanly(dir: &Path, g: &Guest, dst_disk: &str, needles: &[&str]) {
    let (mut r, uri, _) = receiver(dir, dst_disk);
    let mut s = send(
        dir,
        g,
        &uri,
        &format!(
            "{},name=vda,dirty-log={}",
            g.disk.display(),
            g.disk_log.display()
        ),
    );
    let st = s.wait(RUN_TIMEOUT).unwrap();
    assert!(!st.success(), "send must fail: {}", s.stderr());
    for n in needles {
        assert!(s.stderr().contains(n), "names {n:?}: {}", s.stderr());
    }
    assert_eq!(status(&g.ctl), "running");
    assert!(
        !r.wait(Duration::from_secs(30)).unwrap().success(),
        "the destination is not complete: {}",
        r.stderr()
    );
    assert_eq!(stats(dir)["status"], "failed");
    // The guest is still alive and writing.
    assert!(ferry_tests::proc::alive(g.proc.pid()));
}

#[test]
fn a_destination_disk_smaller_than_the_source_fails_cleanly() {
    let dir = tempdir();
    let g = guest(dir.path(), "64M", "64M");
    let dst = dir.path().join("small.img");
    std::fs::File::create(&dst)
        .unwrap()
        .set_len(32 << 20)
        .unwrap();
    fails_cleanly(
        dir.path(),
        &g,
        &format!("{},name=vda", dst.display()),
        &["disk \"vda\"", "too small"],
    );
}

#[test]
fn an_unknown_device_name_fails_cleanly() {
    let dir = tempdir();
    let g = guest(dir.path(), "64M", "16M");
    let dst = dir.path().join("other.img");
    std::fs::File::create(&dst)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    fails_cleanly(
        dir.path(),
        &g,
        &format!("{},name=vdb", dst.display()),
        &["disk \"vda\"", "no --disk is named"],
    );
}

/// A small tmpfs mounted for the test (root only), unmounted on drop.
struct Mount(PathBuf);

impl Mount {
    fn tmpfs(at: &Path, size: &str) -> Option<Self> {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("cannot mount a tmpfs (not root?): skipping");
        }
        ok.then(|| Mount(at.to_owned()))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_destination_disk_that_fills_up_fails_cleanly() {
    let dir = tempdir();
    let g = guest(dir.path(), "64M", "64M");
    let Some(m) = Mount::tmpfs(&dir.path().join("full"), "16M") else {
        return;
    };
    let dst = m.0.join("dst.img");
    // Sparse: 64 MiB announced, 16 MiB of room.
    std::fs::File::create(&dst)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    fails_cleanly(
        dir.path(),
        &g,
        &format!("{},name=vda", dst.display()),
        &["disk \"vda\""],
    );
    let err = std::fs::read_to_string(dir.path().join("send.err")).unwrap();
    assert!(
        err.contains("No space left") || err.contains("ENOSPC") || err.contains("os error 28"),
        "names the cause: {err}"
    );
}

/// Interop: a QEMU 7.2 destination (`-M pc` with the drive attached to a
/// virtio-blk device) loads what `ferry send --disk` writes: RAM, device
/// state, and the disk in the "block" section, one PART per chunk,
/// interleaved with RAM.
#[test]
fn qemu_loads_a_disk_sent_by_ferry_send() {
    use ferry_tests::ferry::run_ferry;
    use ferry_tests::qemu::{ram_file_args, Qemu};
    use ferry_tests::ram as test_ram;
    const RAM: u64 = 128 << 20;
    const DISK: usize = 40 << 20;
    if !Path::new("/dev/kvm").exists() {
        eprintln!("no /dev/kvm: skipping");
        return;
    }
    let pc_with_disk = |ram_file: &Path, image: &Path| -> Vec<String> {
        let mut args: Vec<String> = ["-M", "pc", "-accel", "kvm", "-nodefaults"]
            .map(String::from)
            .into();
        args.extend(ram_file_args(ram_file, RAM));
        args.extend([
            "-drive".into(),
            format!("if=none,id=disk0,file={},format=raw", image.display()),
            "-device".into(),
            "virtio-blk-pci,drive=disk0".into(),
        ]);
        args
    };
    let timeout = Duration::from_secs(180);
    let dir = tempfile::Builder::new()
        .prefix("ferry-disk-qemu-")
        .tempdir()
        .expect("creating a temporary directory");
    let d = dir.path();
    let src_ram = d.join("src.ram");
    test_ram::write_mixed_image(&src_ram, RAM as usize, 61).expect("writing RAM");
    let mut disk = test_ram::mixed_image(DISK, 62);
    for chunk in [2usize, 9, 39] {
        disk[chunk << 20..(chunk + 1) << 20].fill(0);
    }
    let src_img = d.join("src.img");
    std::fs::write(&src_img, &disk).expect("writing the source image");

    // Device state (and the RAM blocks' names) from a source QEMU with the
    // same command line.
    let mut args = pc_with_disk(&src_ram, &src_img);
    args.push("-S".into());
    let mut source = Qemu::spawn(&args).unwrap_or_else(|e| panic!("starting the source: {e}"));
    let qemu_stream = d.join("qemu.mig");
    source
        .migrate_to_file(&qemu_stream, None)
        .unwrap_or_else(|e| panic!("source migrating: {e}"));
    drop(source);
    let device = d.join("device.state");
    let blocks_dir = d.join("blocks");
    let out = run_ferry(
        [
            "inspect".as_ref(),
            qemu_stream.as_os_str(),
            "--json".as_ref(),
            "--extract-device-state".as_ref(),
            device.as_os_str(),
            "--extract-ram".as_ref(),
            blocks_dir.as_os_str(),
        ],
        timeout,
    )
    .and_then(|o| o.success())
    .unwrap_or_else(|e| panic!("ferry inspect: {e}"));
    let report: Value = serde_json::from_str(&out.stdout).expect("JSON");
    let mut send: Vec<String> = vec!["send".into()];
    for b in report["ram_blocks"].as_array().expect("ram_blocks") {
        let name = b["idstr"].as_str().expect("idstr");
        let file = blocks_dir.join(ferry_guest::load::block_file_name(name));
        send.extend(["--ram".into(), format!("{},name={name}", file.display())]);
    }
    let stream = d.join("ferry.mig");
    send.extend([
        "--disk".into(),
        format!("{},name=disk0", src_img.display()),
        "--device-state".into(),
        device.display().to_string(),
        "--compress".into(),
        "--to".into(),
        format!("file:{}", stream.display()),
        "--no-progress".into(),
    ]);
    run_ferry(send.iter().map(String::as_str), timeout)
        .and_then(|o| o.success())
        .unwrap_or_else(|e| panic!("ferry send --disk: {e}"));

    let dst_ram = d.join("dst.ram");
    let dst_img = d.join("dst.img");
    std::fs::write(&dst_img, vec![0xa5u8; DISK]).expect("writing the destination image");
    let mut args = pc_with_disk(&dst_ram, &dst_img);
    args.extend(["-incoming".into(), "defer".into()]);
    let mut dest = Qemu::spawn(&args).unwrap_or_else(|e| panic!("starting the destination: {e}"));
    dest.incoming_from_file(&stream, true)
        .unwrap_or_else(|e| panic!("QEMU loading ferry's stream: {e}"));
    drop(dest);
    let got = std::fs::read(&dst_img).expect("reading the destination image");
    if let Some(at) = first_difference(&got, &disk) {
        panic!("destination disk differs from the source at byte {at:#x}");
    }
    let got_ram = std::fs::read(&dst_ram).expect("destination RAM");
    assert!(
        first_difference(&got_ram, &std::fs::read(&src_ram).unwrap()).is_none(),
        "destination RAM equals the source"
    );
}
