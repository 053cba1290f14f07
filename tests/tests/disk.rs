//! Live disk migration: `ferry loadgen` writes RAM and a disk throughout, and
//! `ferry send --disk` / `ferry receive --disk` move both, the disk in QEMU's
//! "block" section through libblkio (io_uring, or virtio-blk-vhost-user on
//! qemu-storage-daemon). At switchover the destination disk equals the source
//! byte for byte; a destination that cannot take the disk (too small, unknown
//! device name, out of space) fails the migration cleanly, naming the disk,
//! with the guest running.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use ferry_tests::ferry::run_ferry;
use ferry_tests::files::{assert_same_file, read_json, shm_tempdir, tempdir};
use ferry_tests::guest::{loadgen, Guest};
use ferry_tests::migrate::{self, assert_both_succeed, assert_rounds_resend_what_was_dirty, named};
use ferry_tests::netns::Tmpfs;
use ferry_tests::proc::{self, wait_until, Process};
use ferry_tests::qemu::PcWithDisk;

const RUN_TIMEOUT: Duration = Duration::from_secs(180);
const VHOST: &str = "virtio-blk-vhost-user";
const PREFIX: &str = "ferry-disk-";

/// A loadgen guest with RAM and a disk, both written throughout.
fn guest(dir: &Path, size: &str, disk_size: &str) -> Guest {
    loadgen(dir, "src", size)
        .rate("32M")
        .disk(disk_size)
        .args(&["--disk-rate", "16M"])
        .start()
        .expect("starting ferry loadgen")
}

/// `--disk IMG,name=vda,dirty-log=LOG` for the guest's own image.
fn source_disk(g: &Guest) -> String {
    let (img, log) = g.disk();
    format!("{},dirty-log={}", named(img, "vda"), log.display())
}

/// An empty destination image of `size` bytes (sparse).
fn image(path: &Path, size: u64) -> PathBuf {
    std::fs::File::create(path)
        .and_then(|f| f.set_len(size))
        .expect("creating the destination image");
    path.to_owned()
}

/// `ferry receive` with one disk given as `disk` (PATH[,options]).
fn receiver(dir: &Path, disk: &str) -> (Process, String) {
    migrate::receive(dir, "tcp:127.0.0.1:0", &dir.join("dst.ram"))
        .args(&["--disk", disk])
        .start_listening(&dir.join("receive.err"))
        .expect("starting ferry receive")
}

/// `ferry send` of the guest's RAM and one disk given as `disk`.
fn send(dir: &Path, g: &Guest, to: &str, disk: &str) -> Process {
    migrate::send(dir, "send", to)
        .args(&g.send_args())
        .args(&["--disk", disk, "--max-bandwidth", "256M"])
        .start(&dir.join("send.err"))
        .expect("starting ferry send")
}

/// A run that must succeed, then the checks of a completed migration.
fn migrate_and_compare(dir: &Path, g: &Guest, src_disk: &str, dst_disk: &str, dst_img: &Path) {
    let (mut r, uri) = receiver(dir, dst_disk);
    let mut s = send(dir, g, &uri, src_disk);
    assert_both_succeed(&mut s, &mut r, RUN_TIMEOUT);
    assert!(
        s.stderr().contains("RAM and disk digests match"),
        "{}",
        s.stderr()
    );
    // The guest stays stopped after the migration: its RAM and disk are
    // what they were at switchover.
    assert_eq!(g.status().unwrap(), "postmigrate");
    assert_same_file(&g.ram, &dir.join("dst.ram"));
    assert_same_file(g.disk().0, dst_img);
    let st = read_json(&dir.join("send.json"));
    assert_eq!(st["status"], "completed");
    let pages = std::fs::metadata(&g.ram).unwrap().len() / 4096;
    assert_rounds_resend_what_was_dirty(&st, pages, true);
}

#[test]
fn disk_and_ram_arrive_identical_while_the_guest_writes_io_uring() {
    let dir = shm_tempdir(PREFIX);
    let g = guest(dir.path(), "256M", "64M");
    let dst = image(&dir.path().join("dst.img"), 64 << 20);
    migrate_and_compare(
        dir.path(),
        &g,
        &source_disk(&g),
        &format!("{},driver=io_uring", named(&dst, "vda")),
        &dst,
    );
}

/// qemu-storage-daemon exporting an image over vhost-user-blk, killed on drop.
struct Qsd {
    child: Child,
    socket: PathBuf,
}

impl Qsd {
    /// Starts it; panics if it is not installed (it comes with QEMU 7.2, which
    /// these tests need anyway: `apt-get install qemu-system-x86 qemu-utils`).
    fn start(img: &Path, socket: PathBuf) -> Self {
        let bin = "/usr/bin/qemu-storage-daemon";
        let file = format!("driver=file,node-name=file0,filename={}", img.display());
        let export = format!(
            "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={},writable=on",
            socket.display()
        );
        let raw = "driver=raw,node-name=disk0,file=file0";
        let child = Command::new(bin)
            .args(["--blockdev", &file, "--blockdev", raw, "--export", &export])
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {bin} (install qemu-utils for it): {e}"));
        let q = Qsd { child, socket };
        wait_until(
            Duration::from_secs(20),
            "qemu-storage-daemon's socket",
            || q.socket.exists(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
        q
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
    let dir = shm_tempdir(PREFIX);
    let g = guest(dir.path(), "256M", "64M");
    let dst = image(&dir.path().join("dst.img"), 64 << 20);
    let src_q = Qsd::start(g.disk().0, dir.path().join("qsd-src.sock"));
    let dst_q = Qsd::start(&dst, dir.path().join("qsd-dst.sock"));
    migrate_and_compare(
        dir.path(),
        &g,
        &format!(
            "{},driver={VHOST},dirty-log={}",
            named(&src_q.socket, "vda"),
            g.disk().1.display()
        ),
        &format!("{},driver={VHOST}", named(&dst_q.socket, "vda")),
        &dst,
    );
}

/// A run that must fail on the destination's account, naming `needles`,
/// with the guest still running and the destination not complete.
fn fails_cleanly(dir: &Path, g: &Guest, dst_disk: &str, needles: &[&str]) {
    let (mut r, uri) = receiver(dir, dst_disk);
    let mut s = send(dir, g, &uri, &source_disk(g));
    let st = s.wait(RUN_TIMEOUT).unwrap();
    assert!(!st.success(), "send must fail: {}", s.stderr());
    for n in needles {
        assert!(s.stderr().contains(n), "names {n:?}: {}", s.stderr());
    }
    assert_eq!(g.status().unwrap(), "running");
    assert!(
        !r.wait(Duration::from_secs(30)).unwrap().success(),
        "the destination is not complete: {}",
        r.stderr()
    );
    assert_eq!(read_json(&dir.join("send.json"))["status"], "failed");
    // The guest is still alive and writing.
    assert!(proc::alive(g.proc.pid()));
}

#[test]
fn a_destination_disk_smaller_than_the_source_fails_cleanly() {
    let dir = shm_tempdir(PREFIX);
    let g = guest(dir.path(), "64M", "64M");
    let dst = image(&dir.path().join("small.img"), 32 << 20);
    fails_cleanly(
        dir.path(),
        &g,
        &named(&dst, "vda"),
        &["disk \"vda\"", "too small"],
    );
}

#[test]
fn an_unknown_device_name_fails_cleanly() {
    let dir = shm_tempdir(PREFIX);
    let g = guest(dir.path(), "64M", "16M");
    let dst = image(&dir.path().join("other.img"), 16 << 20);
    fails_cleanly(
        dir.path(),
        &g,
        &named(&dst, "vdb"),
        &["disk \"vda\"", "no --disk is named"],
    );
}

#[test]
fn a_destination_disk_that_fills_up_fails_cleanly() {
    let dir = shm_tempdir(PREFIX);
    let g = guest(dir.path(), "64M", "64M");
    let m = Tmpfs::mount(&dir.path().join("full"), "16M").expect("mounting a tmpfs (root only)");
    // Sparse: 64 MiB announced, 16 MiB of room.
    let dst = image(&m.path().join("dst.img"), 64 << 20);
    fails_cleanly(dir.path(), &g, &named(&dst, "vda"), &["disk \"vda\""]);
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
    let dir = tempdir("ferry-disk-qemu-");
    let d = dir.path();
    let src =
        PcWithDisk::new(d, 128 << 20, 40 << 20, 61, &[2, 9, 39]).unwrap_or_else(|e| panic!("{e}"));
    let stream = d.join("ferry.mig");
    let mut send = vec!["send".to_owned()];
    send.extend(src.qemu.ram_args());
    send.extend([
        "--disk".into(),
        named(&src.image, "disk0"),
        "--device-state".into(),
        src.qemu.device.display().to_string(),
        "--compress".into(),
        "--to".into(),
        format!("file:{}", stream.display()),
        "--no-progress".into(),
    ]);
    run_ferry(&send, RUN_TIMEOUT)
        .and_then(|o| o.success())
        .unwrap_or_else(|e| panic!("ferry send --disk: {e}"));
    src.load_and_compare(d, &stream)
        .unwrap_or_else(|e| panic!("{e}"));
}
