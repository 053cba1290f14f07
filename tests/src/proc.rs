//! ferry processes running in the background: started, watched, killed.
//!
//! End-to-end tests run `ferry receive` and `ferry send` side by side, look
//! for their actor processes in /proc (children whose command line is
//! `ferry __actor KIND ...`) and kill them to test failure handling.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::bail;
use crate::error::{Context, Result};
use crate::ferry::try_ferry_bin;

/// A ferry process whose stderr goes to a file. Killed on drop.
#[derive(Debug)]
pub struct Background {
    child: Child,
    stderr: PathBuf,
}

impl Background {
    /// Starts `ferry args...`, stderr to `stderr`.
    pub fn spawn<S: AsRef<std::ffi::OsStr>>(args: &[S], stderr: &Path) -> Result<Self> {
        let bin = try_ferry_bin()?;
        let err = fs::File::create(stderr).context("creating the stderr file")?;
        let child = Command::new(bin)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .spawn()
            .context("starting ferry")?;
        Ok(Self {
            child,
            stderr: stderr.to_owned(),
        })
    }

    /// Its pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What it wrote to stderr so far.
    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits until its stderr contains `needle`; fails if it exits first or
    /// the time runs out.
    pub fn wait_stderr(&self, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while !self.stderr().contains(needle) {
            if !alive(self.pid()) {
                bail!(
                    "ferry exited before printing {needle:?}:\n{}",
                    self.stderr()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "ferry did not print {needle:?} within {timeout:?}:\n{}",
                    self.stderr()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// Waits for `ferry receive` to say where it listens; returns that URI.
    pub fn wait_listening(&mut self, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(uri) = self
                .stderr()
                .lines()
                .find_map(|l| l.split("listening on ").nth(1))
                .map(|s| s.split_whitespace().next().unwrap_or("").to_owned())
            {
                return Ok(uri);
            }
            if let Some(status) = self.child.try_wait().context("polling ferry")? {
                bail!(
                    "ferry exited ({status}) before listening:\n{}",
                    self.stderr()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "ferry did not listen within {timeout:?}:\n{}",
                    self.stderr()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the exit; kills it after `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().context("polling ferry")? {
                return Ok(status);
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
                    "no {kind} process under pid {} within {timeout:?}",
                    self.pid()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Background {
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

/// Sends SIGKILL to `pid`.
pub fn kill9(pid: u32) {
    // SAFETY: kill has no memory-safety preconditions; a stale pid at worst
    // hits nothing (tests only kill their own children).
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGKILL);
    }
}

/// Waits until none of `pids` is alive.
pub fn wait_gone(pids: &[u32], timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while pids.iter().any(|&p| alive(p)) {
        if Instant::now() > deadline {
            let left: Vec<_> = pids.iter().filter(|&&p| alive(p)).collect();
            bail!("processes still alive after {timeout:?}: {left:?}");
        }
        thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}
