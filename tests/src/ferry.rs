//! Finding, building and running the `ferry` binary from this workspace.
//!
//! The tests live in their own crate, so cargo neither builds `ferry` for them nor sets
//! `CARGO_BIN_EXE_ferry` (that needs the tests beside the binary in `pipeline/`, or
//! artifact dependencies, which are nightly-only). The binary is the one cargo puts
//! next to the test executable's profile (`target/<profile>/deps/<test>` ->
//! `target/<profile>/ferry`).
//!
//! Whether it is up to date is cargo's question, not ours: under cargo (`$CARGO` is
//! set) the first call in a test process runs `$CARGO build -p ferry --bin ferry` with
//! the same profile and target directory. After `cargo test --workspace`, which builds
//! every workspace binary anyway, that is a no-op (0.2 s measured); after `cargo test -p
//! ferry-tests` alone it rebuilds a stale binary with cargo's own freshness check (once:
//! `-p` and `--workspace` unify dependency features differently, so switching between
//! them rebuilds the binary, as it rebuilds ring and rcgen). This is the simplest
//! correct choice: comparing file times ourselves missed changes outside the
//! directories we listed and rebuilt for touched-but-unchanged files, and moving the
//! tests into `pipeline/` for `CARGO_BIN_EXE_ferry` would make the binary's crate carry
//! QEMU interop tests and their harness. Run by hand (no `$CARGO`), a test executable
//! uses the binary that is there and fails, saying so, if there is none.

use std::ffi::OsStr;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{mpsc, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

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
    if let Some(cargo) = std::env::var_os("CARGO") {
        build(Path::new(&cargo), &target, &profile)?;
    }
    if !bin.is_file() {
        bail!(
            "{} does not exist: build it with `cargo build -p ferry` (same profile), or run the tests with cargo",
            bin.display()
        );
    }
    Ok(bin)
}

fn build(cargo: &Path, target: &Path, profile: &str) -> Result<()> {
    let mut command = Command::new(cargo);
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
        .with_context(|| format!("running {} build", cargo.display()))?;
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
