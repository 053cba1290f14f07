//! Resource promises of the `ferry` binary, checked on the real binary as a
//! user runs it: no actor outlives its orchestrator, even when a subreaper
//! (systemd, a container's init) adopts the orphans instead of init; and a
//! destination refuses RAM it cannot hold before it creates a file.

use std::fs;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ferry_proto::qemu_file::QemuFileWriter;
use ferry_proto::stream::encode::{self, RamWriter};
use ferry_proto::stream::RamBlockInfo;
use ferry_proto::transport::MemTransport;

/// How long orphans may take to notice that their orchestrator is gone.
/// Generous for a loaded 2-core machine; the death pipe needs a few ms.
const ORPHAN_GRACE: Duration = Duration::from_secs(5);

/// The tests here reap whatever child of this process ended (orphans are
/// re-parented to it), which would take another test's child: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn ferry() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ferry"));
    c.stdin(Stdio::null());
    c
}

/// Makes this test process the subreaper of everything it starts: an actor
/// whose orchestrator dies is re-parented here, not to init, so an actor
/// that looks for init as its new parent does not notice.
fn become_subreaper() {
    // SAFETY: PR_SET_CHILD_SUBREAPER takes an integer flag and touches no memory.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(
        rc,
        0,
        "prctl(PR_SET_CHILD_SUBREAPER) failed: {}",
        std::io::Error::last_os_error()
    );
}

/// A process as /proc/PID/stat shows it.
#[derive(Debug)]
struct Proc {
    pid: i32,
    ppid: i32,
    state: char,
    cmdline: String,
}

fn processes() -> Vec<Proc> {
    let mut out = Vec::new();
    for entry in fs::read_dir("/proc").expect("/proc is mounted").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        // The process may end while it is read: skip it then.
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next().and_then(|s| s.chars().next()).unwrap_or('?');
        let ppid = fields.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        let cmdline = fs::read(entry.path().join("cmdline"))
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .unwrap_or_default();
        out.push(Proc {
            pid,
            ppid,
            state,
            cmdline,
        });
    }
    out
}

/// Running children of `pid`.
fn children_of(pid: u32) -> Vec<Proc> {
    processes()
        .into_iter()
        .filter(|p| p.ppid == pid as i32 && p.state != 'Z')
        .collect()
}

/// Reaps every child of this process that has ended.
fn reap() {
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes the status into the integer we pass.
        if unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) } <= 0 {
            return;
        }
    }
}

/// Waits up to [`ORPHAN_GRACE`] for every running child of this process to
/// end; returns (and kills) those that did not. Called once the orchestrator
/// was reaped, when the only children left are its orphaned actors.
fn surviving_orphans() -> Vec<Proc> {
    let deadline = Instant::now() + ORPHAN_GRACE;
    loop {
        reap();
        let left = children_of(std::process::id());
        if left.is_empty() || Instant::now() > deadline {
            for p in &left {
                // SAFETY: kill takes a pid and a signal and touches no memory.
                unsafe { libc::kill(p.pid, libc::SIGKILL) };
            }
            reap();
            return left;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A unix socket whose peer accepts and never reads: a writer sending to it
/// blocks for good once the socket buffers are full.
fn sink(dir: &Path) -> PathBuf {
    let path = dir.join("sink.sock");
    let listener = UnixListener::bind(&path).expect("binding the sink socket");
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming().flatten() {
            held.push(conn);
        }
    });
    path
}

/// A RAM file of `size` bytes of noise: no zero page, none that shrinks.
fn noise_ram(dir: &Path, size: usize) -> PathBuf {
    let path = dir.join("src.ram");
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let bytes: Vec<u8> = (0..size / 8)
        .flat_map(|_| {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            (x ^ (x >> 29)).to_le_bytes()
        })
        .collect();
    fs::write(&path, bytes).expect("writing the source RAM");
    path
}

/// A source RAM and a destination that never reads, with this process as
/// the subreaper; one at a time.
struct Scene {
    _one: MutexGuard<'static, ()>,
    dir: tempfile::TempDir,
    ram: PathBuf,
    sock: PathBuf,
}

impl Scene {
    fn new(ram_size: usize) -> Self {
        let one = serial();
        become_subreaper();
        let dir = tempfile::tempdir().unwrap();
        let ram = noise_ram(dir.path(), ram_size);
        let sock = sink(dir.path());
        Self {
            _one: one,
            dir,
            ram,
            sock,
        }
    }

    /// `ferry send` to the socket that never reads: it runs until killed.
    fn send(&self) -> Child {
        let err = fs::File::create(self.dir.path().join("send.err")).expect("creating send.err");
        ferry()
            .arg("send")
            .arg("--ram")
            .arg(&self.ram)
            .arg("--to")
            .arg(format!("unix:{}", self.sock.display()))
            .args(["--no-progress", "--stall-timeout", "0"])
            .stderr(err)
            .spawn()
            .expect("starting ferry send")
    }

    /// Waits until `send` has `n` actor processes, `running` ones (exec'd as
    /// actors) or any (some possibly between fork and exec).
    fn wait_for_actors(&self, send: &mut Child, n: usize, running: bool) -> Vec<Proc> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let c = children_of(send.id());
            if c.len() >= n && (!running || c.iter().all(|p| p.cmdline.contains("__actor"))) {
                return c;
            }
            assert!(
                Instant::now() < deadline && send.try_wait().unwrap().is_none(),
                "ferry send did not start {n} actors (it has {c:?}): {}",
                fs::read_to_string(self.dir.path().join("send.err")).unwrap_or_default()
            );
            if running {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

#[test]
fn no_actor_outlives_a_killed_orchestrator_under_a_subreaper() {
    let scene = Scene::new(64 << 20);
    let mut send = scene.send();
    // Writer, compress and scanner: the writer blocks on a peer that never
    // reads, the others on their credits.
    let actors = scene.wait_for_actors(&mut send, 3, true);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        send.try_wait().unwrap().is_none(),
        "ferry send cannot finish against a peer that never reads"
    );
    send.kill().unwrap();
    send.wait().unwrap();
    let left = surviving_orphans();
    assert!(
        left.is_empty(),
        "{} of the {} actors outlived their orchestrator by {ORPHAN_GRACE:?}: {left:?}",
        left.len(),
        actors.len()
    );
}

#[test]
fn no_actor_outlives_an_orchestrator_killed_while_it_starts_them() {
    let scene = Scene::new(16 << 20);
    // Kill right after the first, second and third actor process appears: an
    // actor may be between fork and exec, or not yet connected back.
    for (run, started) in [1, 2, 3].into_iter().cycle().take(9).enumerate() {
        let mut send = scene.send();
        scene.wait_for_actors(&mut send, started, false);
        send.kill().unwrap();
        send.wait().unwrap();
        let left = surviving_orphans();
        assert!(
            left.is_empty(),
            "run {run}: killed after {started} actors started, these outlived it by {ORPHAN_GRACE:?}: {left:?}"
        );
    }
}

/// A complete stream whose RAM section announces `blocks` and carries no
/// page: a destination that accepts it creates each file at its block's size.
fn stream_announcing(idstr: &str, length: u64) -> Vec<u8> {
    let block = RamBlockInfo {
        idstr: idstr.into(),
        length,
    };
    let mut f = QemuFileWriter::new(MemTransport::new());
    let mut ram = RamWriter::new();
    encode::put_file_header(&mut f);
    encode::put_configuration(&mut f, "none");
    ram.put_setup_section(&mut f, 2, &[block]).unwrap();
    ram.put_end_section(&mut f, 2);
    encode::put_eof(&mut f);
    f.into_transport().unwrap().take()
}

/// `ferry receive` of `stream` from a file into `dir/pc.ram`, with `extra` options.
fn receive(dir: &Path, stream: &[u8], extra: &[&str]) -> (Output, PathBuf) {
    let _one = serial();
    let file = dir.join("stream");
    fs::write(&file, stream).unwrap();
    let ram = dir.join("pc.ram");
    let out = ferry()
        .arg("receive")
        .arg("--listen")
        .arg(format!("file:{}", file.display()))
        .arg("--ram")
        .arg(format!("{},name=pc.ram", ram.display()))
        .args(extra)
        .output()
        .expect("running ferry receive");
    (out, ram)
}

#[test]
fn ram_up_to_max_ram_size_is_received() {
    let dir = tempfile::tempdir().unwrap();
    let stream = stream_announcing("pc.ram", 2 << 20);
    let (out, ram) = receive(dir.path(), &stream, &["--max-ram-size", "2M"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(fs::metadata(&ram).unwrap().len(), 2 << 20);
}

#[test]
fn a_block_over_max_ram_size_fails_before_its_file_is_created() {
    let dir = tempfile::tempdir().unwrap();
    let stream = stream_announcing("pc.ram", 2 << 20);
    let (out, ram) = receive(dir.path(), &stream, &["--max-ram-size", "1M"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "a 2 MiB block loaded under 1M: {err}"
    );
    for part in [
        "RAM block \"pc.ram\" of 2097152 bytes",
        "above the limit of 1048576 bytes",
        "--max-ram-size",
    ] {
        assert!(err.contains(part), "the error says {part:?}: {err}");
    }
    assert!(!ram.exists(), "the RAM file was created: {err}");
}

/// The host's physical memory as the kernel reports it (MemTotal).
fn mem_total() -> u64 {
    let info = fs::read_to_string("/proc/meminfo").expect("/proc/meminfo");
    let kib: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("MemTotal in /proc/meminfo");
    kib * 1024
}

#[test]
fn by_default_ram_larger_than_the_host_fails_before_its_file_is_created() {
    let dir = tempfile::tempdir().unwrap();
    let host = mem_total();
    let stream = stream_announcing("pc.ram", host + (1 << 30));
    let (out, ram) = receive(dir.path(), &stream, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "RAM above the host's loaded: {err}");
    let limit = format!("above the limit of {host} bytes");
    assert!(err.contains(&limit), "the error says {limit:?}: {err}");
    assert!(!ram.exists(), "the RAM file was created: {err}");
}

/// How long the fake guest below takes to answer `stop`.
const STOP_TAKES: Duration = Duration::from_millis(400);

/// A guest control socket that answers every command, `stop` only after
/// [`STOP_TAKES`] (a VMM parking its vCPUs), and never dirties memory.
fn slow_stopping_guest(path: &Path) {
    use std::io::{BufRead, BufReader, Write};
    let listener = UnixListener::bind(path).expect("binding the guest socket");
    std::thread::spawn(move || {
        let Ok((conn, _)) = listener.accept() else {
            return;
        };
        let mut out = conn.try_clone().unwrap();
        for line in BufReader::new(conn).lines() {
            let Ok(line) = line else { return };
            let reply = if line.contains("\"stop\"") {
                std::thread::sleep(STOP_TAKES);
                r#"{"return":{}}"#
            } else if line.contains("query-status") {
                r#"{"return":{"status":"running","running":true}}"#
            } else {
                r#"{"return":{}}"#
            };
            if writeln!(out, "{reply}").is_err() {
                return;
            }
        }
    });
}

#[test]
fn downtime_counts_from_when_stop_is_sent() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let ram = noise_ram(dir.path(), 1 << 20);
    let log = dir.path().join("dirty.log");
    fs::write(&log, [0u8; 32]).unwrap(); // 256 pages, none dirty
    let ctl = dir.path().join("guest.sock");
    slow_stopping_guest(&ctl);
    let stats = dir.path().join("send.json");
    let out = ferry()
        .arg("send")
        .arg("--ram")
        .arg(&ram)
        .arg("--to")
        .arg(format!("file:{}", dir.path().join("stream").display()))
        .arg("--dirty-log")
        .arg(&log)
        .arg("--guest-control")
        .arg(format!("unix:{}", ctl.display()))
        .arg("--stats-json")
        .arg(&stats)
        .arg("--no-progress")
        .output()
        .expect("running ferry send");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "ferry send failed: {err}");
    let st: serde_json::Value = serde_json::from_str(&fs::read_to_string(&stats).unwrap()).unwrap();
    let downtime = st["downtime"]
        .as_u64()
        .expect("a live run reports its downtime");
    assert!(
        downtime >= STOP_TAKES.as_millis() as u64,
        "the guest paused as stop was sent, {STOP_TAKES:?} before it answered, yet the downtime is {downtime} ms: {st}"
    );
    assert_eq!(
        st["ram"]["remaining"], 0,
        "nothing was dirty at the end: {st}"
    );
}
