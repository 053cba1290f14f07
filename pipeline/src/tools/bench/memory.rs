//! `ferry bench memory`: how much memory of its own each ferry process uses
//! while migrating a large, mostly empty guest, and what that projects to at
//! 1 TiB.
//!
//! A guest's RAM file is made sparse on tmpfs at each size, with the same
//! data (`--data`, spread over the file) and holes elsewhere, and migrated
//! ferry to ferry over a unix socket into a fresh destination file, once
//! with a single stream and once with multifd channels. Each process reports
//! its peak anonymous RSS (`RssAnon` of /proc/self/status, sampled every
//! 50 ms and at exit): its own allocations, without the guest RAM it maps
//! or writes, which is file memory. Peak RSS (VmHWM, mapped guest pages
//! included) is printed beside it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serde_json::Value;

use super::{wait_for, Killed};
use crate::options::parse_rate;

/// The budget every process must stay under, for guests up to 1 TiB.
const BUDGET: u64 = 128 << 20;

/// `ferry bench memory`
#[derive(Debug, Clone, Args)]
pub struct MemoryArgs {
    /// Guest RAM sizes, comma separated (sparse files: only `--data` is
    /// allocated); the projection to 1 TiB fits a line through the smallest
    /// and the largest.
    #[arg(long, default_value = "8G,64G", value_delimiter = ',', value_parser = parse_rate)]
    size: Vec<u64>,
    /// Bytes of data in each guest, in 64 runs spread over the file, half
    /// random, half one repeated byte.
    #[arg(long, default_value = "64M", value_parser = parse_rate)]
    data: u64,
    /// Fill every page instead (the guest is as large as the data: watch
    /// the tmpfs, which holds both ends' files).
    #[arg(long)]
    full: bool,
    /// multifd channels of the second migration of each size (0: skip it).
    #[arg(long, default_value_t = 2)]
    multifd_channels: u8,
    /// Directory for the RAM files: tmpfs, where reading a hole would
    /// allocate it.
    #[arg(long, default_value = "/dev/shm")]
    dir: PathBuf,
    /// Give up on one migration after this many seconds.
    #[arg(long, default_value_t = 300)]
    timeout: u64,
}

/// The peak memory of one process of one migration.
struct Peak {
    process: String,
    anon: u64,
    rss: u64,
}

/// One migration measured.
struct Run {
    size: u64,
    mode: String,
    seconds: f64,
    peaks: Vec<Peak>,
}

/// Runs every size and mode and prints the table and the projection.
pub fn run(a: MemoryArgs) -> anyhow::Result<()> {
    if a.size.is_empty() {
        bail!("--size needs at least one size");
    }
    let mut runs = Vec::new();
    for &size in &a.size {
        let size = size / (2 << 20) * (2 << 20);
        let data = if a.full { size } else { a.data };
        if size < data.max(2 << 20) {
            bail!("--size {size} is smaller than --data {}", a.data);
        }
        let dir = super::work_dir(&a.dir, "ferry-bench-memory-")?;
        let src = dir.path().join("guest.ram");
        sparse_guest(&src, size, data)?;
        let multifd = (a.multifd_channels > 0).then_some(a.multifd_channels);
        for channels in std::iter::once(0).chain(multifd) {
            runs.push(migrate(&a, &src, dir.path(), size, channels)?);
        }
    }
    print_table(&runs);
    print_projection(&runs);
    Ok(())
}

/// Writes a sparse file of `size` bytes with `data` bytes in 64 runs.
fn sparse_guest(path: &Path, size: u64, data: u64) -> anyhow::Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.set_len(size)?;
    let run = (data / 64).max(4096) as usize / 4096 * 4096;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut buf = vec![0u8; run];
    for i in 0..64u64 {
        let (random, fill) = buf.split_at_mut(run / 2);
        for b in random.chunks_mut(8) {
            // xorshift64: cheap bytes that do not compress.
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
        }
        fill.fill(i as u8 + 1);
        let at = (size / 64 * i) / 4096 * 4096;
        f.write_all_at(&buf, at)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Migrates `src` into a fresh file with `channels` multifd channels (0: a
/// single stream) and reads both ends' statistics.
fn migrate(a: &MemoryArgs, src: &Path, dir: &Path, size: u64, channels: u8) -> anyhow::Result<Run> {
    let dst = dir.join(format!("dest-{channels}.ram"));
    let sock = dir.join(format!("ferry-{channels}.sock"));
    let (send_stats, recv_stats) = (
        dir.join(format!("send-{channels}.json")),
        dir.join(format!("receive-{channels}.json")),
    );
    let exe = std::env::current_exe()?;
    let multifd = (channels > 0).then(|| channels.to_string());
    let mut receive = Command::new(&exe);
    receive
        .arg("receive")
        .arg("--listen")
        .arg(format!("unix:{}", sock.display()))
        .arg("--ram")
        .arg(format!("{},name=mem", dst.display()))
        .args(["--max-ram-size", "2T", "--stats-json"])
        .arg(&recv_stats)
        .stderr(Stdio::null());
    if let Some(n) = &multifd {
        receive.args(["--multifd-channels", n]);
    }
    let mut receiver = Killed(receive.spawn().context("starting ferry receive")?);
    wait_for(
        &sock,
        &mut receiver.0,
        "ferry receive",
        Duration::from_secs(20),
    )?;
    let mut send = Command::new(&exe);
    send.arg("send")
        .arg("--ram")
        .arg(format!("{},name=mem", src.display()))
        .arg("--to")
        .arg(format!("unix:{}", sock.display()))
        .args(["--no-progress", "--stats-json"])
        .arg(&send_stats)
        .stderr(Stdio::null());
    if let Some(n) = &multifd {
        send.args(["--multifd-channels", n]);
    }
    let start = Instant::now();
    let mut sender = Killed(send.spawn().context("starting ferry send")?);
    let deadline = start + Duration::from_secs(a.timeout);
    for (child, what) in [
        (&mut sender, "ferry send"),
        (&mut receiver, "ferry receive"),
    ] {
        let status = loop {
            if let Some(s) = child.0.try_wait()? {
                break s;
            }
            if Instant::now() > deadline {
                bail!("{what} did not finish within {} s", a.timeout);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if !status.success() {
            bail!("{what} failed ({status})");
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let mut all = peaks("send", &send_stats)?;
    all.extend(peaks("receive", &recv_stats)?);
    std::fs::remove_file(&dst).ok();
    Ok(Run {
        size,
        mode: match channels {
            0 => "single stream".into(),
            n => format!("multifd {n}"),
        },
        seconds,
        peaks: all,
    })
}

/// The per-process peaks of one end's `--stats-json`.
fn peaks(end: &str, stats: &Path) -> anyhow::Result<Vec<Peak>> {
    let v: Value = serde_json::from_str(
        &std::fs::read_to_string(stats).with_context(|| format!("reading {}", stats.display()))?,
    )?;
    if v["status"] != "completed" {
        bail!("{end}: status {} in {}", v["status"], stats.display());
    }
    let mut out: Vec<Peak> = v["processes"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(name, p)| Peak {
            process: format!("{end} {name}"),
            anon: p["peak-anon-bytes"].as_u64().unwrap_or(0),
            rss: p["peak-rss-bytes"].as_u64().unwrap_or(0),
        })
        .collect();
    out.sort_by(|a, b| a.process.cmp(&b.process));
    Ok(out)
}

fn mib(b: u64) -> f64 {
    b as f64 / f64::from(1 << 20)
}

fn print_table(runs: &[Run]) {
    println!(
        "{:>8}  {:<14} {:>7}  {:<22} {:>14} {:>13}",
        "guest", "mode", "wall s", "process", "peak anon MiB", "peak RSS MiB"
    );
    for r in runs {
        for (i, p) in r.peaks.iter().enumerate() {
            let (size, mode, secs) = if i == 0 {
                (
                    format!("{} GiB", r.size >> 30),
                    r.mode.clone(),
                    format!("{:.2}", r.seconds),
                )
            } else {
                Default::default()
            };
            println!(
                "{size:>8}  {mode:<14} {secs:>7}  {:<22} {:>14.1} {:>13.1}",
                p.process,
                mib(p.anon),
                mib(p.rss)
            );
        }
    }
}

/// Fits each process's peak anon through the smallest and the largest
/// guest of each mode and extends the line to 1 TiB.
fn print_projection(runs: &[Run]) {
    const TIB: f64 = (1u64 << 40) as f64;
    println!();
    println!(
        "projected peak anon at 1 TiB (line through the smallest and largest guest), budget {} MiB:",
        BUDGET >> 20
    );
    let mut worst = 0.0f64;
    let mut modes: Vec<&str> = runs.iter().map(|r| r.mode.as_str()).collect();
    modes.sort_unstable();
    modes.dedup();
    for mode in modes {
        let of_mode: Vec<&Run> = runs.iter().filter(|r| r.mode == mode).collect();
        let (Some(lo), Some(hi)) = (
            of_mode.iter().min_by_key(|r| r.size),
            of_mode.iter().max_by_key(|r| r.size),
        ) else {
            continue;
        };
        for p in &hi.peaks {
            let low = lo
                .peaks
                .iter()
                .find(|q| q.process == p.process)
                .map_or(p.anon, |q| q.anon);
            let slope = if hi.size > lo.size {
                (p.anon as f64 - low as f64).max(0.0) / (hi.size - lo.size) as f64
            } else {
                0.0
            };
            let at_tib = p.anon as f64 + slope * (TIB - hi.size as f64).max(0.0);
            worst = worst.max(at_tib);
            println!(
                "  {mode:<14} {:<22} {:>8.1} MiB  ({:.3} bytes per page)",
                p.process,
                at_tib / f64::from(1 << 20),
                slope * 4096.0
            );
        }
    }
    println!(
        "largest: {:.1} MiB, {}",
        worst / f64::from(1 << 20),
        if worst <= BUDGET as f64 {
            "within the budget"
        } else {
            "OVER the budget"
        }
    );
}
