//! Finding, building and running the `ferry` binary from this workspace.
//!
//! The tests live in their own crate, so cargo neither builds `ferry` for them nor sets
//! `CARGO_BIN_EXE_ferry`. The binary is looked up next to the test executable
//! (`target/<profile>/deps/<test>` -> `target/<profile>/ferry`), and built with the
//! cargo that runs the tests (`$CARGO`, same profile, same target dir) when it is
//! missing or older than the workspace sources. The build runs once per test process.

use std::ffi::OsStr;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{mpsc, OnceLock};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use crate::bail;
use crate::error::{Context, Error, Result};

/// The workspace root (this crate is `<root>/tests`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests crate has a parent directory")
        .to_path_buf()
}

/// Path of an up-to-date `ferry` binary; panics with the build log if it cannot be had.
pub fn ferry_bin() -> PathBuf {
    match try_ferry_bin() {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    }
}

/// Like [`ferry_bin`], returning the error instead of panicking. The first call in a
/// process does the (possible) build; later calls return the same outcome.
pub fn try_ferry_bin() -> Result<PathBuf> {
    static BIN: OnceLock<std::result::Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| locate_or_build().map_err(|e| e.to_string()))
        .clone()
        .map_err(Error::msg)
}

/// Where cargo put the test executable's profile: `(target_dir, profile_dir_name)`.
fn profile_dir() -> Result<(PathBuf, String)> {
    let exe = std::env::current_exe().context("finding the test executable")?;
    // target/<profile>/deps/<test-binary>
    let deps = exe.parent().context_none("test executable has no parent")?;
    let profile = deps
        .parent()
        .context_none("test executable is not under target/<profile>/deps")?;
    let name = profile
        .file_name()
        .and_then(OsStr::to_str)
        .context_none("profile directory has no name")?
        .to_string();
    let target = profile
        .parent()
        .context_none("profile directory has no parent")?
        .to_path_buf();
    Ok((target, name))
}

fn locate_or_build() -> Result<PathBuf> {
    let (target, profile) = profile_dir()?;
    let bin = target.join(&profile).join("ferry");
    if is_fresh(&bin)? {
        return Ok(bin);
    }
    build(&target, &profile)?;
    if !bin.is_file() {
        bail!("cargo build succeeded but {} does not exist", bin.display());
    }
    Ok(bin)
}

/// True when `bin` exists and is newer than every source file of the workspace.
fn is_fresh(bin: &Path) -> Result<bool> {
    let Ok(meta) = fs::metadata(bin) else {
        return Ok(false);
    };
    let built = meta
        .modified()
        .context("reading the ferry binary's mtime")?;
    let root = workspace_root();
    let mut newest = SystemTime::UNIX_EPOCH;
    for file in ["Cargo.toml", "Cargo.lock"] {
        newest = newest.max(mtime(&root.join(file)));
    }
    for dir in ["proto", "pipeline"] {
        newest = newest.max(newest_under(&root.join(dir))?);
    }
    Ok(built >= newest)
}

fn mtime(path: &Path) -> SystemTime {
    fs::metadata(path)
        .and_then(|m| m.modified())
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

/// Newest mtime of `Cargo.toml` and `*.rs` files below `dir` (skipping `target`).
fn newest_under(dir: &Path) -> Result<SystemTime> {
    let mut newest = SystemTime::UNIX_EPOCH;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = match fs::read_dir(&d) {
            Ok(e) => e,
            Err(_) => continue,
        };
        for entry in entries {
            let path = entry
                .with_context(|| format!("listing {}", d.display()))?
                .path();
            if path.is_dir() {
                if path.file_name() != Some(OsStr::new("target")) {
                    stack.push(path);
                }
            } else if path.extension() == Some(OsStr::new("rs"))
                || path.file_name() == Some(OsStr::new("Cargo.toml"))
            {
                newest = newest.max(mtime(&path));
            }
        }
    }
    Ok(newest)
}

fn build(target: &Path, profile: &str) -> Result<()> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = Command::new(&cargo);
    command
        .current_dir(workspace_root())
        .args(["build", "-p", "ferry", "--bin", "ferry", "--target-dir"])
        .arg(target);
    match profile {
        "debug" => {}
        "release" => {
            command.arg("--release");
        }
        other => {
            command.args(["--profile", other]);
        }
    }
    let output = command
        .output()
        .with_context(|| format!("running {} build", Path::new(&cargo).display()))?;
    if !output.status.success() {
        bail!(
            "building the ferry binary failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// What a finished `ferry` run produced.
#[derive(Debug)]
pub struct Output {
    /// Exit status.
    pub status: ExitStatus,
    /// Everything written to stdout.
    pub stdout: String,
    /// Everything written to stderr.
    pub stderr: String,
}

impl Output {
    /// Fail unless the exit status is 0, quoting the command's stderr.
    pub fn success(self) -> Result<Output> {
        if !self.status.success() {
            bail!(
                "ferry exited with {}; stderr:\n{}",
                self.status,
                self.stderr.trim_end()
            );
        }
        Ok(self)
    }
}

/// Run `ferry args...`, killing it after `timeout`. Captures stdout and stderr.
pub fn run_ferry<I, S>(args: I, timeout: Duration) -> Result<Output>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let bin = try_ferry_bin()?;
    let args: Vec<_> = args.into_iter().map(|a| a.as_ref().to_owned()).collect();
    let shown = format!(
        "ferry {}",
        args.iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let mut child = Command::new(&bin)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    // Drain both pipes on threads so a chatty ferry cannot block on a full pipe.
    let out = drain(child.stdout.take());
    let err = drain(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().context("waiting for ferry")? {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = err.collect();
            bail!("`{shown}` did not finish within {timeout:?}; stderr so far:\n{stderr}");
        }
        thread::sleep(Duration::from_millis(20));
    };
    Ok(Output {
        status,
        stdout: out.collect(),
        stderr: err.collect(),
    })
}

/// Text read from a child's pipe on a background thread.
struct Drain(mpsc::Receiver<String>);

impl Drain {
    /// The text, once the pipe closes. A grandchild that inherited the pipe could keep
    /// it open after ferry exits, so give up after a few seconds rather than hang.
    fn collect(self) -> String {
        self.0
            .recv_timeout(Duration::from_secs(5))
            .unwrap_or_else(|_| "<pipe still open 5 s after exit: output lost>".into())
    }
}

fn drain<R: Read + Send + 'static>(pipe: Option<R>) -> Drain {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut text = Vec::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_end(&mut text);
        }
        let _ = tx.send(String::from_utf8_lossy(&text).into_owned());
    });
    Drain(rx)
}

/// `Option` to [`Result`] with a message.
trait ContextNone<T> {
    fn context_none(self, what: &str) -> Result<T>;
}

impl<T> ContextNone<T> for Option<T> {
    fn context_none(self, what: &str) -> Result<T> {
        self.ok_or_else(|| Error::msg(what))
    }
}
