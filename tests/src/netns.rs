//! Two hosts on one machine, and the host-level faults around them. Needs root.
//!
//! - [`TwoHosts`]: two network namespaces (`ferry-<pid>-<n>-a` and `-b`) joined by a
//!   veth pair (`veth-a` 10.77.n.1/24 in A, `veth-b` 10.77.n.2/24 in B), both ends
//!   shaped with a `tbf` qdisc; the link can be reshaped or cut mid-run. Drop deletes
//!   both namespaces (which destroys the veth pair); namespaces left behind by a test
//!   process that was killed are swept by the next one.
//! - [`Spawn`] / [`Process`]: `ferry ARGS...`, optionally inside a namespace
//!   (`ip netns exec NAME ferry ...`, which execs without forking, so the pid is
//!   ferry's and its actors are its children), with extra environment (e.g.
//!   `RUST_LOG=ferry=info` to see rounds and guest stops), stderr to a file. Killed
//!   (SIGKILL; its actors follow by PR_SET_PDEATHSIG) on drop.
//! - [`Guest`]: a `ferry loadgen` guest and its QMP-style control socket. The socket
//!   serves one connection at a time, so while `ferry send` holds it,
//!   [`Guest::status`] gets no answer: watch the guest's own log instead
//!   (`loadgen stopped` / `loadgen resumed` at `RUST_LOG=ferry=info`).
//! - [`Tmpfs`]: a small tmpfs mounted on a directory (full-disk and read-only-file
//!   faults), unmounted on drop.
//! - [`established`]: whether a TCP connection on a port exists in a process's
//!   network namespace (`/proc/PID/net/tcp`).

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::bail;
use crate::error::{Context, Error, Result};
use crate::ferry::try_ferry_bin;
use crate::proc;

/// Namespace pairs made by this process so far (part of their names).
static NEXT: AtomicU32 = AtomicU32::new(0);

/// Fails unless we run as root (namespaces, qdiscs and mounts need it).
pub fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("this test needs root: it creates network namespaces, qdiscs and mounts");
    }
    Ok(())
}

/// Runs `program args...` to completion; fails quoting its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Two network namespaces joined by a shaped veth pair. Deleted on drop.
#[derive(Debug)]
pub struct TwoHosts {
    /// Namespace of host A (the source).
    pub a: String,
    /// Namespace of host B (the destination).
    pub b: String,
    /// A's address on the link, e.g. `10.77.3.1`.
    pub addr_a: String,
    /// B's address on the link, e.g. `10.77.3.2`.
    pub addr_b: String,
    /// Namespaces that exist (and must be deleted).
    made: Vec<String>,
}

/// The veth end inside A.
pub const DEV_A: &str = "veth-a";
/// The veth end inside B.
pub const DEV_B: &str = "veth-b";

impl TwoHosts {
    /// Creates the namespaces and the link, shaped to `rate` (tc syntax, e.g.
    /// `200mbit`) in both directions.
    pub fn new(rate: &str) -> Result<Self> {
        require_root()?;
        sweep_stale();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("ferry-{}-{n}", std::process::id());
        let subnet = format!("10.77.{}", n % 250);
        let mut hosts = TwoHosts {
            a: format!("{prefix}-a"),
            b: format!("{prefix}-b"),
            addr_a: format!("{subnet}.1"),
            addr_b: format!("{subnet}.2"),
            made: Vec::new(),
        };
        // On any failure below, dropping `hosts` deletes what was made.
        for ns in [hosts.a.clone(), hosts.b.clone()] {
            run("ip", &["netns", "add", &ns])?;
            hosts.made.push(ns);
        }
        let (a, b) = (hosts.a.as_str(), hosts.b.as_str());
        run(
            "ip",
            &[
                "link", "add", DEV_A, "netns", a, "type", "veth", "peer", "name", DEV_B, "netns", b,
            ],
        )?;
        for (ns, dev, addr) in [(a, DEV_A, &hosts.addr_a), (b, DEV_B, &hosts.addr_b)] {
            run(
                "ip",
                &["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev],
            )?;
            run("ip", &["-n", ns, "link", "set", "lo", "up"])?;
            run("ip", &["-n", ns, "link", "set", dev, "up"])?;
        }
        hosts.shape(rate)?;
        Ok(hosts)
    }

    /// (Re)shapes both ends of the link to `rate` with a token bucket
    /// (`tc qdisc replace ... root tbf rate RATE burst 1mb latency 50ms`).
    pub fn shape(&self, rate: &str) -> Result<()> {
        for (ns, dev) in [(&self.a, DEV_A), (&self.b, DEV_B)] {
            run(
                "ip",
                &[
                    "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf",
                    "rate", rate, "burst", "1mb", "latency", "50ms",
                ],
            )?;
        }
        Ok(())
    }

    /// Cuts the link: `ip link set veth-a down` inside A (B loses carrier too).
    pub fn cut(&self) -> Result<()> {
        run("ip", &["-n", &self.a, "link", "set", DEV_A, "down"])
    }

    /// `tcp:ADDR_B:PORT`, a listen address on host B.
    pub fn uri_b(&self, port: u16) -> String {
        format!("tcp:{}:{port}", self.addr_b)
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        for ns in self.made.drain(..) {
            let _ = run("ip", &["netns", "del", &ns]);
        }
    }
}

/// Deletes `ferry-<pid>-<n>-{a,b}` namespaces whose test process is gone (it was
/// killed before its drop guards ran).
fn sweep_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let parts: Vec<&str> = name.split('-').collect();
        let ours = parts.len() == 4
            && parts[0] == "ferry"
            && parts[2].bytes().all(|c| c.is_ascii_digit())
            && matches!(parts[3], "a" | "b");
        let Some(pid) = parts.get(1).and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if ours && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = run("ip", &["netns", "del", name]);
        }
    }
}

/// A `ferry` command line to start: where (a namespace or here), with what
/// environment.
#[derive(Debug, Clone)]
pub struct Spawn {
    ns: Option<String>,
    env: Vec<(OsString, OsString)>,
    args: Vec<OsString>,
}

/// `ferry args...`, not started yet.
pub fn ferry<S: AsRef<OsStr>>(args: &[S]) -> Spawn {
    Spawn {
        ns: None,
        env: Vec::new(),
        args: args.iter().map(|a| a.as_ref().to_owned()).collect(),
    }
}

impl Spawn {
    /// Runs it inside network namespace `ns` (None: here).
    pub fn netns(mut self, ns: Option<&str>) -> Self {
        self.ns = ns.map(str::to_owned);
        self
    }

    /// Adds arguments.
    pub fn args<S: AsRef<OsStr>>(mut self, args: &[S]) -> Self {
        self.args.extend(args.iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Sets an environment variable.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// `RUST_LOG=ferry=info` without colours: rounds (`round done round=N`) and
    /// guest stops (`loadgen stopped`) show up on stderr.
    pub fn info_log(self) -> Self {
        self.env("RUST_LOG", "ferry=info").env("NO_COLOR", "1")
    }

    /// Starts it, stderr to `stderr`.
    pub fn start(self, stderr: &Path) -> Result<Process> {
        let bin = try_ferry_bin()?;
        let mut cmd = match &self.ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&bin);
                c
            }
            None => Command::new(&bin),
        };
        let err =
            fs::File::create(stderr).with_context(|| format!("creating {}", stderr.display()))?;
        let child = cmd
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .context("starting ferry")?;
        Ok(Process {
            child,
            stderr: stderr.to_owned(),
            status: None,
        })
    }
}

/// A running ferry process (orchestrator or loadgen). Killed on drop.
#[derive(Debug)]
pub struct Process {
    child: Child,
    stderr: PathBuf,
    status: Option<ExitStatus>,
}

impl Process {
    /// Its pid (ferry's own, also inside a namespace).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What it wrote to stderr so far.
    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Its last line that starts with `ferry` (the one-line error or summary
    /// rather than a log line).
    pub fn last_line(&self) -> String {
        self.stderr()
            .lines()
            .rev()
            .find(|l| l.starts_with("ferry"))
            .unwrap_or("")
            .to_owned()
    }

    /// Its exit status once it has exited.
    pub fn try_status(&mut self) -> Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self.child.try_wait().context("polling ferry")?;
        }
        Ok(self.status)
    }

    /// Waits until its stderr contains `needle` (ANSI colours ignored); fails
    /// if it exits first or after `timeout`.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if strip_ansi(&self.stderr()).contains(needle) {
                return Ok(());
            }
            if let Some(st) = self.try_status()? {
                bail!(
                    "ferry exited ({st}) before saying {needle:?}:\n{}",
                    self.stderr()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "ferry did not say {needle:?} within {timeout:?}:\n{}",
                    self.stderr()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for `ferry receive` to say where it listens; returns that URI.
    pub fn wait_listening(&mut self, timeout: Duration) -> Result<String> {
        self.wait_for("listening on ", timeout)?;
        let text = self.stderr();
        Ok(text
            .lines()
            .find_map(|l| l.split("listening on ").nth(1))
            .and_then(|s| s.split_whitespace().next())
            .unwrap_or("")
            .to_owned())
    }

    /// Waits for the exit; kills it and fails after `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_status()? {
                return Ok(st);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("ferry did not exit within {timeout:?}:\n{}", self.stderr());
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Pid of its actor process `kind` (scanner, compress, writer, reader).
    pub fn actor(&self, kind: &str) -> Option<u32> {
        proc::children(self.pid()).into_iter().find(|&pid| {
            let cmd = proc::cmdline(pid);
            cmd.get(1).map(String::as_str) == Some("__actor")
                && cmd.get(2).map(String::as_str) == Some(kind)
        })
    }

    /// Waits until actor `kind` is running; returns its pid.
    pub fn wait_actor(&self, kind: &str, timeout: Duration) -> Result<u32> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(pid) = self.actor(kind) {
                return Ok(pid);
            }
            if Instant::now() > deadline {
                bail!(
                    "no {kind} process under pid {} within {timeout:?}:\n{}",
                    self.pid(),
                    self.stderr()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL to the process itself.
    pub fn kill9(&self) {
        proc::kill9(self.pid());
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `text` without ANSI escape sequences (`ESC [ ... letter`).
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// How a process ended, for tables: `exit 1`, `signal 9`.
pub fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit {c}"),
        (_, Some(s)) => format!("signal {s}"),
        _ => status.to_string(),
    }
}

/// A `ferry loadgen` guest: its RAM, dirty log and control socket.
#[derive(Debug)]
pub struct Guest {
    /// The loadgen process (stderr at `info` level: stops and resumes).
    pub proc: Process,
    /// Its RAM file.
    pub ram: PathBuf,
    /// Its dirty log.
    pub log: PathBuf,
    /// Its control socket.
    pub ctl: PathBuf,
}

impl Guest {
    /// Starts `ferry loadgen --size SIZE --dirty-rate RATE EXTRA...` with its
    /// files in `dir` (named `NAME.ram`, `NAME.log`, `NAME.sock`, `NAME.err`),
    /// inside `ns` if given; returns once its control socket exists.
    pub fn start(
        dir: &Path,
        name: &str,
        ns: Option<&str>,
        size: &str,
        rate: &str,
        extra: &[&str],
    ) -> Result<Guest> {
        let ram = dir.join(format!("{name}.ram"));
        let log = dir.join(format!("{name}.log"));
        let ctl = dir.join(format!("{name}.sock"));
        let mut proc = ferry(&["loadgen", "--size", size, "--dirty-rate", rate])
            .args(&[
                OsStr::new("--ram"),
                ram.as_os_str(),
                OsStr::new("--dirty-log"),
                log.as_os_str(),
                OsStr::new("--control"),
            ])
            .args(&[format!("unix:{}", ctl.display())])
            .args(extra)
            .netns(ns)
            .info_log()
            .start(&dir.join(format!("{name}.err")))?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ctl.exists() {
            if let Some(st) = proc.try_status()? {
                bail!("loadgen exited ({st}):\n{}", proc.stderr());
            }
            if Instant::now() > deadline {
                bail!("loadgen did not start within 60 s:\n{}", proc.stderr());
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(Guest {
            proc,
            ram,
            log,
            ctl,
        })
    }

    /// `ferry send` arguments for this guest: `--ram RAM,name=ram --dirty-log LOG
    /// --guest-control unix:CTL`.
    pub fn send_args(&self) -> Vec<String> {
        vec![
            "--ram".into(),
            format!("{},name=ram", self.ram.display()),
            "--dirty-log".into(),
            self.log.display().to_string(),
            "--guest-control".into(),
            format!("unix:{}", self.ctl.display()),
        ]
    }

    /// Asks the guest one QMP-style command. Fails if the socket does not
    /// answer within 2 s (it serves one client at a time: a running `ferry
    /// send` holds it).
    pub fn ask(&self, command: &str) -> Result<Value> {
        let s = UnixStream::connect(&self.ctl).context("connecting to the guest")?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.set_write_timeout(Some(Duration::from_secs(2)))?;
        writeln!(&s, "{}", json!({ "execute": command }))?;
        let mut line = String::new();
        BufReader::new(&s)
            .read_line(&mut line)
            .context("the guest did not answer (is another client connected?)")?;
        Ok(serde_json::from_str(&line)?)
    }

    /// `query-status`'s `status`: `running`, `paused` or `postmigrate`.
    pub fn status(&self) -> Result<String> {
        let v = self.ask("query-status")?;
        v["return"]["status"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| Error::msg(format!("query-status answered {v}")))
    }

    /// Waits until the status is `want`; fails with the last answer after `timeout`.
    pub fn wait_status(&self, want: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.status();
            match &got {
                Ok(s) if s == want => return Ok(()),
                _ if Instant::now() > deadline => {
                    bail!("the guest is not {want} after {timeout:?}: {got:?}")
                }
                _ => thread::sleep(Duration::from_millis(50)),
            }
        }
    }
}

/// A tmpfs mounted on a directory; unmounted on drop.
#[derive(Debug)]
pub struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// `mount -t tmpfs -o size=SIZE tmpfs DIR` (DIR must exist).
    pub fn mount(dir: &Path, size: &str) -> Result<Self> {
        require_root()?;
        let d = dir
            .to_str()
            .ok_or_else(|| Error::msg("the mount point is not UTF-8"))?;
        run(
            "mount",
            &["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs", d],
        )?;
        Ok(Tmpfs {
            dir: dir.to_owned(),
        })
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Makes it read-only (`mount -o remount,ro`): even root cannot write.
    pub fn remount_ro(&self) -> Result<()> {
        let d = self
            .dir
            .to_str()
            .ok_or_else(|| Error::msg("the mount point is not UTF-8"))?;
        run("mount", &["-o", "remount,ro", d])
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let Some(d) = self.dir.to_str() else { return };
        if run("umount", &[d]).is_err() {
            // Still busy (a process that outlived the test): detach it now,
            // the kernel frees it when the last user is gone.
            let _ = run("umount", &["-l", d]);
        }
    }
}

/// True when an established TCP connection with local or remote `port`
/// exists in the network namespace of process `pid`.
pub fn established(pid: u32, port: u16) -> bool {
    let hex = format!(":{port:04X}");
    ["tcp", "tcp6"].iter().any(|t| {
        fs::read_to_string(format!("/proc/{pid}/net/{t}"))
            .unwrap_or_default()
            .lines()
            .skip(1)
            .any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 3 && f[3] == "01" && (f[1].ends_with(&hex) || f[2].ends_with(&hex))
            })
    })
}

/// Waits until [`established`] holds.
pub fn wait_established(pid: u32, port: u16, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !established(pid, port) {
        if Instant::now() > deadline {
            bail!("no TCP connection on port {port} within {timeout:?}");
        }
        thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// The port of a `tcp:HOST:PORT` URI.
pub fn port_of(uri: &str) -> Result<u16> {
    uri.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| Error::msg(format!("{uri:?} has no port")))
}
