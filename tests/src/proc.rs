//! ferry processes in the background: started, watched, killed.
//!
//! - [`ferry`] / [`Spawn`]: `ferry ARGS...`, optionally inside a network namespace
//!   (`ip netns exec NAME ferry ...`, which execs without forking, so the pid is
//!   ferry's and its actors are its children), with extra environment (e.g.
//!   `RUST_LOG=ferry=info` to see rounds and guest stops), stderr to a file.
//! - [`Process`]: the running process. Killed (SIGKILL; its actors follow by their
//!   parent-death signal) on drop. Its actors are the children whose command line is
//!   `ferry __actor KIND ...`.
//! - Observable progress instead of sleeps: [`written_bytes`] reads what a process
//!   has written so far (`/proc/PID/io`), so a test can act "once the stream is
//!   flowing" rather than "1.5 s after the start" on a machine of unknown speed.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::bail;
use crate::error::{Context, Result};
use crate::ferry::try_ferry_bin;

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

    /// Starts it (stderr to `stderr`) and waits until it says where it listens
    /// (`ferry receive`); returns the process and that URI.
    pub fn start_listening(self, stderr: &Path) -> Result<(Process, String)> {
        let mut p = self.start(stderr)?;
        let uri = p.wait_listening(Duration::from_secs(30))?;
        Ok((p, uri))
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

    /// What it wrote to stderr so far, ANSI colours removed.
    pub fn stderr(&self) -> String {
        strip_ansi(&fs::read_to_string(&self.stderr).unwrap_or_default())
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

    /// Waits until its stderr contains `needle`; fails if it exits first or
    /// after `timeout`.
    pub fn wait_for(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.stderr().contains(needle) {
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
        let deadline = Instant::now() + timeout;
        self.wait_for("listening on ", timeout)?;
        // stderr is unbuffered: the line may have been read half written.
        loop {
            let text = self.stderr();
            let line = text
                .split_once("listening on ")
                .and_then(|(_, rest)| rest.split_once('\n'))
                .and_then(|(line, _)| line.split_whitespace().next())
                .map(str::to_owned);
            match line {
                Some(uri) => return Ok(uri),
                _ if Instant::now() > deadline => {
                    bail!("no whole \"listening on\" line within {timeout:?}:\n{text}")
                }
                _ => thread::sleep(Duration::from_millis(5)),
            }
        }
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

    /// Waits until no process holds its stderr file open any more: an actor that
    /// outlived its orchestrator would (they inherit stderr).
    pub fn wait_released(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let holders = holders(&self.stderr);
            if holders.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "processes {holders:?} still hold ferry's stderr {timeout:?} after it exited"
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Pid of its actor process `kind` (scanner, compress, writer, reader).
    pub fn actor(&self, kind: &str) -> Option<u32> {
        children(self.pid()).into_iter().find(|&pid| {
            let cmd = cmdline(pid);
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

    /// Sends `signal` (e.g. `libc::SIGTERM`) to the process itself.
    pub fn signal(&self, signal: i32) {
        send_signal(self.pid(), signal);
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

/// Pids whose parent is `pid`.
pub fn children(pid: u32) -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&p| parent(p) == Some(pid))
        .collect()
}

fn parent(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; fields after its closing parenthesis don't.
    let rest = &stat[stat.rfind(')')? + 2..];
    rest.split(' ').nth(1)?.parse().ok()
}

/// Pids of the processes that have `path` open.
fn holders(path: &Path) -> Vec<u32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let pids = dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok());
    pids.filter(|pid| {
        fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|fds| {
            fds.filter_map(|fd| fs::read_link(fd.ok()?.path()).ok())
                .any(|target| target == path)
        })
    })
    .collect()
}

/// The command line of `pid`, empty if it is gone.
pub fn cmdline(pid: u32) -> Vec<String> {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            b.split(|&c| c == 0)
                .filter(|s| !s.is_empty())
                .map(|s| String::from_utf8_lossy(s).into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// True while `pid` exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            !s.rsplit(')')
                .next()
                .unwrap_or("")
                .trim_start()
                .starts_with('Z')
        })
        .unwrap_or(false)
}

fn send_signal(pid: u32, signal: i32) {
    // SAFETY: kill has no memory-safety preconditions; a stale pid at worst
    // hits nothing (tests only signal their own children).
    unsafe {
        libc::kill(pid as libc::pid_t, signal);
    }
}

/// Sends SIGKILL to `pid`.
pub fn kill9(pid: u32) {
    send_signal(pid, libc::SIGKILL);
}

/// Sends SIGSTOP (`freeze`) or SIGCONT to `pid`.
pub fn freeze(pid: u32, freeze: bool) {
    send_signal(pid, if freeze { libc::SIGSTOP } else { libc::SIGCONT });
}

/// Waits until none of `pids` is alive.
pub fn wait_gone(pids: &[u32], timeout: Duration) -> Result<()> {
    wait_until(timeout, "the processes to exit", || {
        pids.iter().all(|&p| !alive(p))
    })
    .with_context(|| {
        let left: Vec<_> = pids.iter().filter(|&&p| alive(p)).collect();
        format!("processes still alive: {left:?}")
    })
}

/// What `pid` has written so far by the kernel's count (`wchar` of
/// `/proc/PID/io`, all threads): bytes passed to `write`, `writev` and
/// `pwrite` (a writer's `writev` to its socket, a reader's `pwrite` into the
/// destination RAM file), but not to `send`/`sendmsg`, which std's sockets use
/// for plain `write` calls; 0 once the process is gone.
pub fn written_bytes(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/io"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("wchar: ")?.trim().parse().ok())
        .unwrap_or(0)
}

/// Waits until `pid` has written at least `bytes` ([`written_bytes`]): the
/// observable sign that a stream is flowing, on a machine of any speed.
pub fn wait_written(pid: u32, bytes: u64, timeout: Duration) -> Result<()> {
    wait_until(timeout, "the stream to flow", || {
        written_bytes(pid) >= bytes
    })
    .with_context(|| format!("pid {pid} wrote {} bytes, not {bytes}", written_bytes(pid)))
}

/// Polls `done` every 10 ms until it holds; fails naming `what` after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut done: impl FnMut() -> bool) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !done() {
        if Instant::now() > deadline {
            bail!("waited {timeout:?} for {what}");
        }
        thread::sleep(Duration::from_millis(10));
    }
    Ok(())
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
