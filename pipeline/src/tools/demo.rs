//! `ferry demo`: a real migration between two local ferry processes, on
//! built-in defaults, for a first run on a new machine.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;

use crate::options::parse_rate;
use crate::tools::pattern::{self, Pattern};

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
    let tmp;
    let dir = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
            d.clone()
        }
        None => {
            // Guest RAM lives in tmpfs on a real host too; a disk would time the disk.
            let base = Path::new("/dev/shm");
            tmp = if base.is_dir() {
                tempfile::Builder::new()
                    .prefix("ferry-demo-")
                    .tempdir_in(base)?
            } else {
                tempfile::Builder::new().prefix("ferry-demo-").tempdir()?
            };
            tmp.path().to_owned()
        }
    };
    let src = dir.join("source.ram");
    let dst = dir.join("destination.ram");
    let sock = dir.join("migrate.sock");
    let _ = std::fs::remove_file(&dst);
    eprintln!(
        "ferry demo: writing {} MiB of mixed guest RAM to {}",
        size >> 20,
        src.display()
    );
    pattern::write_image(&src, size, Pattern::Mixed, 1)
        .with_context(|| format!("cannot write {}", src.display()))?;

    let exe = std::env::current_exe()?;
    let mut receiver = Reaped(
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
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        if let Some(status) = receiver.0.try_wait()? {
            bail!("ferry receive exited early ({status})");
        }
        if Instant::now() > deadline {
            bail!(
                "ferry receive did not listen on {} within 10 s",
                sock.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let start = Instant::now();
    let mut send = Command::new(&exe);
    send.arg("send")
        .arg("--ram")
        .arg(format!("{},name=ram", src.display()))
        .arg("--to")
        .arg(format!("unix:{}", sock.display()))
        .arg("--stats-json")
        .arg(dir.join("send-stats.json"));
    if args.compress {
        send.arg("--compress");
    }
    let status = send.status().context("cannot start ferry send")?;
    if !status.success() {
        bail!("ferry send failed ({status})");
    }
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

/// Kills and reaps the child if the demo fails before it ends.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
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
