//! `ferry demo`: a real migration between two local ferry processes, on
//! built-in defaults, for a first run on a new machine.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;

use tempfile::TempDir;

use crate::options::parse_rate;
use crate::tools::bench::{wait_for, Killed};
use crate::tools::pattern;

/// `ferry demo`
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// Guest RAM size (K/M/G suffixes).
    #[arg(long, default_value = "1G", value_parser = parse_rate)]
    pub size: u64,
    /// Compress pages on the way.
    #[arg(long)]
    pub compress: bool,
    /// Work in DIR and keep the files (default: a temporary directory).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

/// Runs the demo: writes a mixed RAM image, starts `ferry receive` on a unix
/// socket, runs `ferry send` to it, and checks the copy byte for byte.
pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    let size = args.size / 4096 * 4096;
    if size == 0 {
        bail!("--size must be at least one page");
    }
    let (dir, _tmp) = work_dir(&args)?;
    let src = dir.join("source.ram");
    let dst = dir.join("destination.ram");
    let sock = dir.join("migrate.sock");
    let _ = std::fs::remove_file(&dst);
    pattern::write_guest_ram(&src, size, "ferry demo")?;

    let exe = std::env::current_exe()?;
    let mut receiver = Killed(
        Command::new(&exe)
            .args(["receive", "--listen"])
            .arg(format!("unix:{}", sock.display()))
            .arg("--ram")
            .arg(format!("{},name=ram", dst.display()))
            .arg("--stats-json")
            .arg(dir.join("receive-stats.json"))
            .spawn()
            .context("cannot start ferry receive")?,
    );
    wait_for(
        &sock,
        &mut receiver.0,
        "ferry receive",
        Duration::from_secs(10),
    )?;
    let start = Instant::now();
    send(&exe, &src, &sock, &dir, args.compress)?;
    let rstatus = receiver.0.wait()?;
    if !rstatus.success() {
        bail!("ferry receive failed ({rstatus})");
    }
    let secs = start.elapsed().as_secs_f64();
    if !same_contents(&src, &dst)? {
        bail!("{} differs from {}", dst.display(), src.display());
    }
    eprintln!(
        "ferry demo: migrated {} MiB in {:.2} s ({:.0} MB/s); {} is identical to the source",
        size >> 20,
        secs,
        size as f64 / 1e6 / secs,
        dst.display()
    );
    // A temporary directory is gone when the demo returns: name it only if kept.
    if args.dir.is_some() {
        eprintln!(
            "ferry demo: statistics in {}",
            dir.join("send-stats.json").display()
        );
    }
    Ok(())
}

/// The directory the demo works in: `--dir`, or a temporary one (returned too,
/// to be removed when dropped).
fn work_dir(args: &DemoArgs) -> anyhow::Result<(PathBuf, Option<TempDir>)> {
    if let Some(d) = &args.dir {
        std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
        return Ok((d.clone(), None));
    }
    // Guest RAM lives in tmpfs on a real host too; a disk would time the disk.
    let base = Path::new("/dev/shm");
    let tmp = if base.is_dir() {
        tempfile::Builder::new()
            .prefix("ferry-demo-")
            .tempdir_in(base)?
    } else {
        tempfile::Builder::new().prefix("ferry-demo-").tempdir()?
    };
    Ok((tmp.path().to_owned(), Some(tmp)))
}

/// Runs `ferry send` from `src` to the receiver on `sock`.
fn send(exe: &Path, src: &Path, sock: &Path, dir: &Path, compress: bool) -> anyhow::Result<()> {
    let mut send = Command::new(exe);
    send.arg("send")
        .arg("--ram")
        .arg(format!("{},name=ram", src.display()))
        .arg("--to")
        .arg(format!("unix:{}", sock.display()))
        .arg("--stats-json")
        .arg(dir.join("send-stats.json"));
    if compress {
        send.arg("--compress");
    }
    let status = send.status().context("cannot start ferry send")?;
    if !status.success() {
        bail!("ferry send failed ({status})");
    }
    Ok(())
}

fn same_contents(a: &Path, b: &Path) -> anyhow::Result<bool> {
    let (mut fa, mut fb) = (File::open(a)?, File::open(b)?);
    if fa.metadata()?.len() != fb.metadata()?.len() {
        return Ok(false);
    }
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = fa.read(&mut ba)?;
        if n == 0 {
            return Ok(true);
        }
        fb.read_exact(&mut bb[..n])?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
    }
}
