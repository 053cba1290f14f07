//! `ferry bench live`: pre-copy against a guest that keeps dirtying memory,
//! in the spirit of QEMU's guestperf.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use serde_json::Value;

use super::plot::{self, Series};
use super::{wait_for, Killed};
use crate::options::parse_rate;

/// `ferry bench live`
#[derive(Debug, Clone, Args)]
pub struct LiveArgs {
    /// Guest RAM size.
    #[arg(long, default_value = "2G", value_parser = parse_rate)]
    pub(crate) size: u64,
    /// Bandwidth cap of every migration.
    #[arg(long, default_value = "1G", value_parser = parse_rate)]
    bandwidth: u64,
    /// Guest dirty rates to run, comma separated.
    #[arg(long, default_value = "0,64M,256M,512M", value_delimiter = ',', value_parser = parse_rate)]
    rates: Vec<u64>,
    /// Downtime limit, milliseconds.
    #[arg(long, default_value_t = 300)]
    downtime_limit: u64,
    /// Give up on a scenario after this many seconds.
    #[arg(long, default_value_t = 30)]
    timeout: u64,
    /// Where the plots go.
    #[arg(long, default_value = "bench-live")]
    pub(crate) out: PathBuf,
    /// Directory for guest RAM (tmpfs keeps the disk out of the figures).
    #[arg(long, default_value = "/dev/shm")]
    pub(crate) dir: PathBuf,
    /// Run only the cap-change scenario: a 16 MiB/s cap raised to unlimited
    /// through the QMP socket mid-run (it also runs after the others).
    #[arg(long)]
    cap_change: bool,
}

struct Outcome {
    name: String,
    converged: bool,
    total_s: f64,
    downtime_ms: Option<u64>,
    expected_ms: Option<u64>,
    iterations: u64,
    sent: u64,
    throttle: u64,
    /// CPU seconds of the compress process.
    compress_cpu: f64,
}

impl Outcome {
    /// The figures of `ferry send`'s statistics `v` (absent ones as 0).
    fn from_stats(name: String, converged: bool, v: &Value) -> Self {
        Self {
            name,
            converged,
            total_s: v["total-time"].as_f64().unwrap_or(0.0) / 1000.0,
            downtime_ms: v["downtime"].as_u64(),
            expected_ms: v["expected-downtime"].as_u64(),
            iterations: v["iterations"].as_u64().unwrap_or(0),
            sent: v["ram"]["transferred"].as_u64().unwrap_or(0),
            throttle: v["throttle-percent"].as_u64().unwrap_or(0),
            compress_cpu: v["processes"]["compress"]["cpu-seconds"]
                .as_f64()
                .unwrap_or(0.0),
        }
    }
}

/// Runs every scenario and prints the table.
pub fn run(a: LiveArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&a.out)
        .with_context(|| format!("cannot create {}", a.out.display()))?;
    if a.cap_change {
        return super::cap_change::run(&a);
    }
    let mut rows = Vec::new();
    for &rate in &a.rates {
        for compress in [false, true] {
            for auto in [false, true] {
                rows.push(scenario(&a, rate, compress, auto)?);
            }
        }
    }
    println!(
        "{:<36} {:>9} {:>8} {:>9} {:>9} {:>6} {:>9} {:>8}",
        "scenario", "converged", "total s", "downtime", "expected", "iters", "sent MB", "throttle"
    );
    for r in &rows {
        println!(
            "{:<36} {:>9} {:>8.2} {:>9} {:>9} {:>6} {:>9.1} {:>7}%",
            r.name,
            if r.converged { "yes" } else { "no" },
            r.total_s,
            r.downtime_ms.map_or("-".into(), |d| format!("{d} ms")),
            r.expected_ms.map_or("-".into(), |d| format!("{d} ms")),
            r.iterations,
            r.sent as f64 / 1e6,
            r.throttle
        );
    }
    let limit = a.downtime_limit + 50;
    let over: Vec<_> = rows
        .iter()
        .filter(|r| r.converged && r.downtime_ms.is_some_and(|d| d > limit))
        .map(|r| r.name.as_str())
        .collect();
    println!(
        "downtime within {} ms + 50 ms in every converged scenario: {}",
        a.downtime_limit,
        if over.is_empty() {
            "yes".to_owned()
        } else {
            format!("NO: {over:?}")
        }
    );
    let ideal = a.size as f64 / a.bandwidth as f64;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    for r in rows.iter().filter(|r| r.name.starts_with("dirty 0 ")) {
        // Compression is bound by the CPU, not the link, when the compress
        // process alone needs more CPU time than the link needs wall time.
        let cpu_bound = r.compress_cpu / cores as f64 > ideal;
        println!(
            "{}: total {:.2} s = {:.2}x size/bandwidth ({:.2} s; target <= 1.2x){}",
            r.name,
            r.total_s,
            r.total_s / ideal,
            ideal,
            if cpu_bound {
                format!(
                    "; CPU-bound: compressing took {:.1} CPU-s on {cores} cores",
                    r.compress_cpu
                )
            } else {
                String::new()
            }
        );
    }
    println!("plots in {}", a.out.display());
    super::cap_change::run(&a)
}

fn scenario(a: &LiveArgs, rate: u64, compress: bool, auto: bool) -> anyhow::Result<Outcome> {
    let name = format!(
        "dirty {} MiB/s{}{}",
        rate >> 20,
        if compress { ", compress" } else { "" },
        if auto { ", auto-converge" } else { "" }
    );
    eprintln!("bench live: {name}");
    let dir = super::work_dir(&a.dir, "ferry-live-")?;
    let d = dir.path();
    let exe = std::env::current_exe()?;
    let ctl = d.join("guest.sock");
    let _guest = start(
        Command::new(&exe)
            .arg("loadgen")
            .arg("--ram")
            .arg(d.join("src.ram"))
            .arg("--size")
            .arg(a.size.to_string())
            .arg("--dirty-log")
            .arg(d.join("dirty.log"))
            .arg("--control")
            .arg(format!("unix:{}", ctl.display()))
            .arg("--dirty-rate")
            .arg(rate.to_string()),
        &ctl,
        "ferry loadgen",
    )?;
    let sock = d.join("migrate.sock");
    let _receiver = start(
        Command::new(&exe)
            .arg("receive")
            .arg("--listen")
            .arg(format!("unix:{}", sock.display()))
            .arg("--ram")
            .arg(format!("{},name=ram", d.join("dst.ram").display())),
        &sock,
        "ferry receive",
    )?;
    let stats = d.join("send.json");
    let mut send = send_command(&exe, d);
    send.arg("--max-bandwidth")
        .arg(a.bandwidth.to_string())
        .arg("--downtime-limit")
        .arg(a.downtime_limit.to_string())
        .arg("--timeout")
        .arg(a.timeout.to_string())
        .arg("--no-progress")
        .arg("--stats-json")
        .arg(&stats)
        .stderr(Stdio::null());
    if compress {
        send.arg("--compress");
    }
    if auto {
        send.arg("--auto-converge");
    }
    let status = send.status().context("cannot run ferry send")?;
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&stats)?)?;
    let converged = status.success() && v["status"] == "completed";
    plot_scenario(a, &name, converged, &v)?;
    Ok(Outcome::from_stats(name, converged, &v))
}

/// `ferry send` of the guest in `d` (`src.ram`, `dirty.log`, `guest.sock`)
/// to the receiver on `d/migrate.sock`; add the scenario's options.
pub(super) fn send_command(exe: &Path, d: &Path) -> Command {
    let mut send = Command::new(exe);
    send.arg("send")
        .arg("--ram")
        .arg(format!("{},name=ram", d.join("src.ram").display()))
        .arg("--to")
        .arg(format!("unix:{}", d.join("migrate.sock").display()))
        .arg("--dirty-log")
        .arg(d.join("dirty.log"))
        .arg("--guest-control")
        .arg(format!("unix:{}", d.join("guest.sock").display()));
    send
}

/// Starts a helper ferry process (its stderr silenced: the figures are the
/// output) and waits until it has created `ready`, its socket.
pub(super) fn start(cmd: &mut Command, ready: &Path, what: &str) -> anyhow::Result<Killed> {
    let child = cmd
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {what}"))?;
    let mut child = Killed(child);
    wait_for(ready, &mut child.0, what, Duration::from_secs(60))?;
    Ok(child)
}

/// Plots the remaining dirty memory and the throttle of one scenario against
/// time, from `ferry send`'s statistics `v`, in the output directory.
fn plot_scenario(a: &LiveArgs, name: &str, converged: bool, v: &Value) -> anyhow::Result<()> {
    let rounds = v["rounds"].as_array().cloned().unwrap_or_default();
    let total_mib = (a.size >> 20) as f64;
    let setup = v["setup-time"].as_f64().unwrap_or(0.0) / 1000.0;
    let mut remaining = vec![(0.0, total_mib), (setup, total_mib)];
    let mut throttle = vec![(0.0, 0.0)];
    for r in &rounds {
        let t = r["end"].as_f64().unwrap_or(0.0);
        remaining.push((t, r["remaining"].as_f64().unwrap_or(0.0) / (1 << 20) as f64));
        throttle.push((t, r["throttle"].as_f64().unwrap_or(0.0)));
    }
    if converged {
        let t = v["total-time"].as_f64().unwrap_or(0.0) / 1000.0;
        remaining.push((t, 0.0));
        throttle.push((t, v["throttle-percent"].as_f64().unwrap_or(0.0)));
    }
    let file = a.out.join(format!(
        "{}.svg",
        name.replace([' ', ',', '/'], "_").replace("__", "_")
    ));
    let svg = plot::svg(
        &format!(
            "{name}: {}",
            if converged {
                "converged"
            } else {
                "did not converge"
            }
        ),
        "seconds",
        &Series {
            label: "remaining dirty MiB".into(),
            points: remaining,
            colour: "steelblue",
        },
        &Series {
            label: "throttle %".into(),
            points: throttle,
            colour: "firebrick",
        },
    );
    std::fs::write(&file, svg).with_context(|| format!("cannot write {}", file.display()))
}
