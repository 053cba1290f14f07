//! `ferry loadgen --disk`, driven as a real process: the image and its dirty
//! log (one bit per 1 MiB chunk), disk writes that land only in chunks marked
//! dirty at the set rate, `stop` that quiesces the disk too, `cont`, the
//! throttle, and bad flag combinations.

use std::fs;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use ferry_tests::ferry::run_ferry;
use ferry_tests::guest_control::GuestControl as Control;
use ferry_tests::proc::Background;
use serde_json::json;
use tempfile::TempDir;

const CHUNK: usize = 1 << 20;
const MIB: f64 = (1 << 20) as f64;

/// A running `ferry loadgen` with a disk, in its own temporary directory.
struct Guest {
    proc: Background,
    disk: PathBuf,
    disk_log: PathBuf,
    sock: PathBuf,
    // Last: removed after the process is killed.
    _dir: TempDir,
}

impl Guest {
    /// Starts `ferry loadgen --size 4M --disk ... --disk-size DISK_SIZE
    /// extra...`; returns once it is ready.
    fn start(disk_size: &str, extra: &[&str]) -> Guest {
        let dir = tempfile::Builder::new()
            .prefix("ferry-loadgen-disk-")
            .tempdir()
            .expect("creating a temporary directory");
        let d = dir.path();
        let (disk, disk_log, sock) = (d.join("disk.img"), d.join("disk.log"), d.join("ctl.sock"));
        let mut args: Vec<String> = vec![
            "loadgen".into(),
            "--ram".into(),
            d.join("guest.ram").display().to_string(),
            "--size".into(),
            "4M".into(),
            "--dirty-log".into(),
            d.join("dirty.log").display().to_string(),
            "--control".into(),
            format!("unix:{}", sock.display()),
            "--disk".into(),
            disk.display().to_string(),
            "--disk-size".into(),
            disk_size.into(),
            "--disk-dirty-log".into(),
            disk_log.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let proc =
            Background::spawn(&args, &d.join("loadgen.err")).expect("starting ferry loadgen");
        proc.wait_stderr("ferry loadgen: ready:", Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("ferry loadgen not ready: {e}"));
        Guest {
            proc,
            disk,
            disk_log,
            sock,
            _dir: dir,
        }
    }

    fn control(&self) -> Control {
        Control::connect(&self.sock)
    }

    fn image(&self) -> Vec<u8> {
        fs::read(&self.disk).expect("reading the disk image")
    }

    fn log_bytes(&self) -> Vec<u8> {
        fs::read(&self.disk_log).expect("reading the disk dirty log")
    }

    /// The disk dirty log's bits, chunk by chunk.
    fn dirty_chunks(&self) -> Vec<bool> {
        self.log_bytes()
            .chunks_exact(8)
            .flat_map(|w| {
                let w = u64::from_le_bytes(w.try_into().unwrap());
                (0..64).map(move |b| w >> b & 1 == 1)
            })
            .collect()
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

fn zero(chunk: &[u8]) -> bool {
    chunk.iter().all(|&b| b == 0)
}

/// Chunks that differ between two images of the same size.
fn changed_chunks(before: &[u8], after: &[u8]) -> Vec<usize> {
    assert_eq!(before.len(), after.len(), "the image changed size");
    before
        .chunks(CHUNK)
        .zip(after.chunks(CHUNK))
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(i, _)| i)
        .collect()
}

#[test]
fn the_image_and_its_log_have_the_right_sizes() {
    // 72 chunks: the log takes two u64 words.
    let mut g = Guest::start("72M", &[]);
    let err = g.proc.stderr();
    assert!(
        err.contains(&g.disk.display().to_string()) && err.contains("72 chunks"),
        "the ready line does not mention the disk:\n{err}"
    );
    let image = g.image();
    assert_eq!(image.len(), 72 * CHUNK);
    assert_eq!(fs::metadata(&g.disk_log).unwrap().len(), 16);
    assert!(
        g.dirty_chunks().iter().all(|&d| !d),
        "the disk dirty log starts clean"
    );
    // The mixed pattern: some chunks zero, most hold data.
    let zeros = image.chunks(CHUNK).filter(|c| zero(c)).count();
    assert!((3..36).contains(&zeros), "{zeros} of 72 chunks are zero");
    // Without --disk-rate nothing is written.
    thread::sleep(Duration::from_millis(200));
    let status = g.control().status();
    assert_eq!(status["disk-bytes-written"], 0, "{status}");
    assert_eq!(status["disk-rate"], 0, "{status}");
    assert!(g.image() == image, "the image changed without a disk rate");
    assert!(g.dirty_chunks().iter().all(|&d| !d));
    let status = g.terminate();
    assert!(status.success(), "{status}:\n{}", g.proc.stderr());

    // Another size: 65 chunks still take two words; 1 MiB takes one.
    for (size, chunks, log) in [("65M", 65, 16), ("1M", 1, 8)] {
        let g = Guest::start(size, &["--disk-rate", "4M"]);
        assert_eq!(g.image().len(), chunks * CHUNK, "--disk-size {size}");
        assert_eq!(
            fs::metadata(&g.disk_log).unwrap().len(),
            log,
            "--disk-size {size}"
        );
    }
    // The same seed gives the same image.
    let a = Guest::start("16M", &["--seed", "5"]).image();
    let b = Guest::start("16M", &["--seed", "5"]).image();
    assert!(a == b, "the image is not reproducible");
}

#[test]
fn disk_writes_land_only_in_chunks_marked_dirty_at_the_set_rate() {
    let g = Guest::start("64M", &["--disk-rate", "32M"]);
    let before = g.image();
    let mut c = g.control();
    thread::sleep(Duration::from_millis(1300));
    let status = c.status();
    let rate = status["disk-rate"].as_f64().unwrap() / MIB;
    assert!(
        (32.0 * 0.75..=32.0 * 1.25).contains(&rate),
        "measured {rate:.1} MiB/s, set 32: {status}"
    );
    assert_eq!(status["pages-written"], 0, "RAM dirtied without a rate");
    // Stopped, image and log are consistent: no write in flight.
    assert_eq!(c.execute("stop", None), json!({}));
    let written = c.disk_bytes();
    let dirty = g.dirty_chunks();
    let after = g.image();
    let changed = changed_chunks(&before, &after);
    let unmarked: Vec<_> = changed.iter().filter(|&&i| !dirty[i]).collect();
    assert!(
        unmarked.is_empty(),
        "chunks {unmarked:?} changed but are not marked in the disk log"
    );
    assert!(
        dirty[64..].iter().all(|&d| !d),
        "bits beyond the disk's 64 chunks are set"
    );
    let marked = dirty.iter().filter(|&&d| d).count();
    // ~42 MiB in writes of up to 1 MiB over 64 chunks leave few untouched;
    // a zero write over a zero chunk changes nothing, so fewer change.
    assert!(marked > 40, "only {marked} of 64 chunks are marked");
    assert!(
        changed.len() > 30,
        "only {} of 64 chunks changed",
        changed.len()
    );
    assert!(
        (20 << 20..80 << 20).contains(&written),
        "{written} bytes written in ~1.3 s at 32 MiB/s"
    );
    eprintln!(
        "measured {rate:.1} MiB/s (set 32 MiB/s); {written} bytes written, \
         {marked}/64 chunks marked, {} changed",
        changed.len()
    );
}

#[test]
fn stop_quiesces_the_disk_and_cont_resumes() {
    let g = Guest::start("64M", &["--disk-rate", "32M", "--dirty-rate", "16M"]);
    let mut c = g.control();
    thread::sleep(Duration::from_millis(300));
    for round in 0..3 {
        assert_eq!(c.execute("stop", None), json!({}));
        let written = c.disk_bytes();
        let (image, log) = (g.image(), g.log_bytes());
        thread::sleep(Duration::from_millis(300));
        let status = c.status();
        assert_eq!(status["status"], "paused", "round {round}: {status}");
        assert_eq!(
            status["disk-bytes-written"], written,
            "round {round}: disk written while stopped"
        );
        assert!(
            g.image() == image,
            "round {round}: the image changed while stopped"
        );
        assert!(
            g.log_bytes() == log,
            "round {round}: the disk log changed while stopped"
        );
        assert_eq!(c.execute("cont", None), json!({}));
        thread::sleep(Duration::from_millis(300));
        let status = c.status();
        assert_eq!(status["status"], "running");
        let more = status["disk-bytes-written"].as_u64().unwrap();
        // 300 ms at 32 MiB/s is ~9.6 MiB.
        assert!(
            more > written + (3 << 20),
            "round {round}: {written} -> {more} bytes after cont"
        );
        assert!(
            g.image() != image,
            "round {round}: the image did not change after cont"
        );
    }
}

#[test]
fn throttle_slows_the_disk_writer_too() {
    let g = Guest::start("64M", &["--disk-rate", "32M"]);
    let mut c = g.control();
    thread::sleep(Duration::from_millis(1200));
    let full = c.disk_rate_mib();
    assert!(
        (32.0 * 0.75..=32.0 * 1.25).contains(&full),
        "unthrottled: {full:.1} MiB/s"
    );
    let set = c.execute("set-throttle", Some(json!({ "percent": 50 })));
    assert_eq!(set, json!({}));
    thread::sleep(Duration::from_millis(1500));
    let half = c.disk_rate_mib();
    assert!(
        (16.0 * 0.7..=16.0 * 1.3).contains(&half),
        "throttle 50%: {half:.1} MiB/s (unthrottled {full:.1})"
    );
    c.execute("set-throttle", Some(json!({ "percent": 0 })));
    thread::sleep(Duration::from_millis(1500));
    let back = c.disk_rate_mib();
    assert!(
        (32.0 * 0.75..=32.0 * 1.25).contains(&back),
        "throttle back to 0: {back:.1} MiB/s"
    );
    eprintln!("disk: unthrottled {full:.1}, 50%: {half:.1}, back to 0: {back:.1} MiB/s");
}

#[test]
fn bad_disk_flag_combinations_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = |name: &str| dir.path().join(name).display().to_string();
    let (img, dlog) = (p("disk.img"), p("disk.log"));
    let ram = p("guest.ram");
    for (extra, what) in [
        (
            vec!["--disk", &img, "--disk-dirty-log", &dlog],
            "--disk needs --disk-size",
        ),
        (
            vec!["--disk", &img, "--disk-size", "8M"],
            "--disk needs --disk-dirty-log",
        ),
        (
            vec![
                "--disk",
                &img,
                "--disk-size",
                "1000000",
                "--disk-dirty-log",
                &dlog,
            ],
            "not a whole number of MiB",
        ),
        (
            vec![
                "--disk",
                &img,
                "--disk-size",
                "1.5M",
                "--disk-dirty-log",
                &dlog,
            ],
            "not a whole number of MiB",
        ),
        (
            vec![
                "--disk",
                &img,
                "--disk-size",
                "0",
                "--disk-dirty-log",
                &dlog,
            ],
            "not a whole number of MiB",
        ),
        (vec!["--disk-size", "8M"], "--disk-size needs --disk"),
        (vec!["--disk-rate", "1M"], "--disk-rate needs --disk"),
        (
            vec!["--disk-dirty-log", &dlog],
            "--disk-dirty-log needs --disk",
        ),
        (
            vec![
                "--disk",
                &img,
                "--disk-size",
                "8M",
                "--disk-dirty-log",
                &dlog,
                "--disk-rate",
                "fast",
            ],
            "disk-rate",
        ),
        (
            vec![
                "--disk",
                &ram,
                "--disk-size",
                "8M",
                "--disk-dirty-log",
                &dlog,
            ],
            "given for two of",
        ),
    ] {
        let (log, ctl) = (p("dirty.log"), format!("unix:{}", p("ctl.sock")));
        let mut args = vec![
            "loadgen",
            "--ram",
            &ram,
            "--size",
            "1M",
            "--dirty-log",
            &log,
            "--control",
            &ctl,
        ];
        args.extend_from_slice(&extra);
        let out = run_ferry(&args, Duration::from_secs(20)).unwrap();
        assert!(!out.status.success(), "{extra:?} was accepted");
        assert!(out.stderr.contains(what), "{extra:?}: {}", out.stderr);
        assert!(
            !Path::new(&img).exists() && !Path::new(&dlog).exists(),
            "{extra:?}: a refused loadgen created disk files"
        );
    }
}
