//! `ferry loadgen --disk`, driven as a real process: the image and its dirty
//! log (one bit per 1 MiB chunk), disk writes that land only in chunks marked
//! dirty at the set rate, `stop` that quiesces the disk too, `cont`, the
//! throttle, and bad flag combinations.

use std::fs;
use std::path::Path;
use std::thread;
use std::time::Duration;

use ferry_tests::ferry::run_ferry;
use ferry_tests::files::{shm_tempdir, tempdir};
use ferry_tests::guest::{check_throttle, dirty_bits, loadgen, over_a_second, Guest};
use ferry_tests::proc::{wait_until, written_bytes};

const CHUNK: usize = 1 << 20;
const MIB: f64 = (1 << 20) as f64;
const PREFIX: &str = "ferry-loadgen-disk-";

/// `ferry loadgen --size 4M --disk ... --disk-size DISK_SIZE extra...`, its
/// files named after `name` in `dir`; returns once it is ready.
fn guest(dir: &Path, name: &str, disk_size: &str, extra: &[&str]) -> Guest {
    loadgen(dir, name, "4M")
        .disk(disk_size)
        .args(extra)
        .start()
        .expect("starting ferry loadgen")
}

fn image(g: &Guest) -> Vec<u8> {
    fs::read(g.disk().0).expect("reading the disk image")
}

fn log_bytes(g: &Guest) -> Vec<u8> {
    fs::read(g.disk().1).expect("reading the disk dirty log")
}

/// The disk dirty log's bits, chunk by chunk.
fn dirty_chunks(g: &Guest) -> Vec<bool> {
    dirty_bits(g.disk().1)
}

/// The guest's disk write rate, MiB/s, by the kernel's count of the bytes
/// it wrote over about a second (`/proc/PID/io`; its RAM writes go through a
/// mapping and do not count), not by its own meter.
fn measured_rate(g: &Guest) -> f64 {
    let (before, after, secs) = over_a_second(|| written_bytes(g.proc.pid()));
    (after - before) as f64 / MIB / secs
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
    let dir = shm_tempdir(PREFIX);
    // 72 chunks: the log takes two u64 words.
    let mut g = guest(dir.path(), "g72", "72M", &[]);
    let err = g.proc.stderr();
    assert!(
        err.contains(&g.disk().0.display().to_string()) && err.contains("72 chunks"),
        "the ready line does not mention the disk:\n{err}"
    );
    let img = image(&g);
    assert_eq!(img.len(), 72 * CHUNK);
    assert_eq!(fs::metadata(g.disk().1).unwrap().len(), 16);
    assert!(
        dirty_chunks(&g).iter().all(|&d| !d),
        "the disk dirty log starts clean"
    );
    // The mixed pattern: some chunks zero, most hold data.
    let zeros = img.chunks(CHUNK).filter(|c| zero(c)).count();
    assert!((3..36).contains(&zeros), "{zeros} of 72 chunks are zero");
    // Without --disk-rate nothing is written.
    thread::sleep(Duration::from_millis(200));
    let status = g.control().status();
    assert_eq!(status["disk-bytes-written"], 0, "{status}");
    assert_eq!(status["disk-rate"], 0, "{status}");
    assert!(image(&g) == img, "the image changed without a disk rate");
    assert!(dirty_chunks(&g).iter().all(|&d| !d));
    let status = g.terminate();
    assert!(status.success(), "{status}:\n{}", g.proc.stderr());

    // Another size: 65 chunks still take two words; 1 MiB takes one.
    for (size, chunks, log) in [("65M", 65, 16), ("1M", 1, 8)] {
        let g = guest(
            dir.path(),
            &format!("g{size}"),
            size,
            &["--disk-rate", "4M"],
        );
        assert_eq!(image(&g).len(), chunks * CHUNK, "--disk-size {size}");
        assert_eq!(
            fs::metadata(g.disk().1).unwrap().len(),
            log,
            "--disk-size {size}"
        );
    }
    // The same seed gives the same image.
    let a = image(&guest(dir.path(), "a", "16M", &["--seed", "5"]));
    let b = image(&guest(dir.path(), "b", "16M", &["--seed", "5"]));
    assert!(a == b, "the image is not reproducible");
}

/// Bound on the measured rate: half to one and a half times the set 32 MiB/s
/// (a busy machine may fall short; what is checked is that the rate holds,
/// not how precisely).
#[test]
fn disk_writes_land_only_in_chunks_marked_dirty_at_the_set_rate() {
    let dir = shm_tempdir(PREFIX);
    let g = guest(dir.path(), "guest", "64M", &["--disk-rate", "32M"]);
    let before = image(&g);
    let mut c = g.control();
    let rate = measured_rate(&g);
    assert!(
        (32.0 * 0.5..=32.0 * 1.5).contains(&rate),
        "measured {rate:.1} MiB/s, set 32"
    );
    assert_eq!(c.status()["pages-written"], 0, "RAM dirtied without a rate");
    // Stopped, image and log are consistent: no write in flight.
    c.command("stop", None);
    let dirty = dirty_chunks(&g);
    let after = image(&g);
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
    // ~32 MiB in writes of up to 1 MiB over 64 chunks leave few untouched;
    // a zero write over a zero chunk changes nothing, so fewer change.
    assert!(marked > 20, "only {marked} of 64 chunks are marked");
    assert!(
        changed.len() > 10,
        "only {} of 64 chunks changed",
        changed.len()
    );
    eprintln!(
        "measured {rate:.1} MiB/s (set 32 MiB/s); {marked}/64 chunks marked, {} changed",
        changed.len()
    );
}

#[test]
fn stop_quiesces_the_disk_and_cont_resumes() {
    let dir = shm_tempdir(PREFIX);
    let g = guest(
        dir.path(),
        "guest",
        "64M",
        &["--disk-rate", "32M", "--dirty-rate", "16M"],
    );
    let mut c = g.control();
    for round in 0..3 {
        c.command("stop", None);
        let written = c.status()["disk-bytes-written"].clone();
        let (img, log) = (image(&g), log_bytes(&g));
        thread::sleep(Duration::from_millis(300));
        let status = c.status();
        assert_eq!(status["status"], "paused", "round {round}: {status}");
        assert_eq!(
            status["disk-bytes-written"], written,
            "round {round}: disk written while stopped"
        );
        assert!(
            image(&g) == img,
            "round {round}: the image changed while stopped"
        );
        assert!(
            log_bytes(&g) == log,
            "round {round}: the disk log changed while stopped"
        );
        c.command("cont", None);
        assert_eq!(c.status()["status"], "running");
        // Written again: 1 MiB more by the kernel's count, and the image changed.
        let io = written_bytes(g.proc.pid());
        wait_until(Duration::from_secs(5), "disk writes after cont", || {
            written_bytes(g.proc.pid()) > io + (1 << 20) && image(&g) != img
        })
        .unwrap_or_else(|e| panic!("round {round}: {e}"));
    }
}

/// 32 MiB/s measured a second at a time, unthrottled, at 50%, and back at 0.
/// Bounds: the set rate within a factor of 1.5 either way; 50% between 0.3
/// and 0.7 of the unthrottled rate.
#[test]
fn throttle_slows_the_disk_writer_too() {
    let dir = shm_tempdir(PREFIX);
    let g = guest(dir.path(), "guest", "64M", &["--disk-rate", "32M"]);
    check_throttle(&g, 32.0, &[(50, 0.3..=0.7)], || measured_rate(&g));
}

#[test]
fn bad_disk_flag_combinations_are_refused() {
    let dir = tempdir(PREFIX);
    let p = |name: &str| dir.path().join(name).display().to_string();
    let (img, dlog, ram) = (p("disk.img"), p("disk.log"), p("guest.ram"));
    // `--disk IMAGE --disk-size SIZE --disk-dirty-log LOG`, then `more`.
    let disk = |image: &str, size: &str, more: &[&str]| -> Vec<String> {
        [
            "--disk",
            image,
            "--disk-size",
            size,
            "--disk-dirty-log",
            &dlog,
        ]
        .iter()
        .chain(more)
        .map(|s| s.to_string())
        .collect()
    };
    let owned = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<String>>();
    for (extra, what) in [
        (
            owned(&["--disk", &img, "--disk-dirty-log", &dlog]),
            "--disk needs --disk-size",
        ),
        (
            owned(&["--disk", &img, "--disk-size", "8M"]),
            "--disk needs --disk-dirty-log",
        ),
        (disk(&img, "1000000", &[]), "not a whole number of MiB"),
        (disk(&img, "1.5M", &[]), "not a whole number of MiB"),
        (disk(&img, "0", &[]), "not a whole number of MiB"),
        (owned(&["--disk-size", "8M"]), "--disk-size needs --disk"),
        (owned(&["--disk-rate", "1M"]), "--disk-rate needs --disk"),
        (
            owned(&["--disk-dirty-log", &dlog]),
            "--disk-dirty-log needs --disk",
        ),
        (disk(&img, "8M", &["--disk-rate", "fast"]), "disk-rate"),
        (disk(&ram, "8M", &[]), "given for two of"),
    ] {
        let (log, ctl) = (p("dirty.log"), format!("unix:{}", p("ctl.sock")));
        let mut args = vec![
            "loadgen".to_owned(),
            "--ram".into(),
            ram.clone(),
            "--size".into(),
            "1M".into(),
            "--dirty-log".into(),
            log,
            "--control".into(),
            ctl,
        ];
        args.extend(extra.iter().cloned());
        let out = run_ferry(&args, Duration::from_secs(20)).unwrap();
        assert!(!out.status.success(), "{extra:?} was accepted");
        assert!(out.stderr.contains(what), "{extra:?}: {}", out.stderr);
        assert!(
            !Path::new(&img).exists() && !Path::new(&dlog).exists(),
            "{extra:?}: a refused loadgen created disk files"
        );
    }
}
