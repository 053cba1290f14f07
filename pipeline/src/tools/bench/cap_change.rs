//! `ferry bench live`'s cap-change scenario: a live migration starts under a
//! 16 MiB/s cap, and a management client raises the cap to unlimited
//! through `ferry send --qmp` (with the `qapi` crate's QMP client, as a Rust
//! management layer would), while it polls query-migrate every 50 ms. It
//! prints the rate before and after, and how soon the writer's byte counter
//! (query-migrate's `transferred`) showed the change, and plots the rate and
//! the cap against time.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use qapi::qmp::{migrate_set_parameters, query_migrate, MigrateSetParameters, MigrationStatus};

use super::live::{send_command, start, LiveArgs};
use super::plot::{self, Series};

/// The cap the migration starts with, bytes per second.
const CAP: u64 = 16 << 20;
/// How long it runs capped once active.
const CAPPED: Duration = Duration::from_secs(2);
/// How often query-migrate is polled.
const POLL: Duration = Duration::from_millis(50);

/// One query-migrate answer: seconds since the start, stream bytes, status.
type Sample = (f64, u64, MigrationStatus);

/// Runs the scenario in a fresh directory under `a.dir`; prints its figures
/// and writes `cap_change.svg` to `a.out`.
pub fn run(a: &LiveArgs) -> anyhow::Result<()> {
    eprintln!("bench live: cap change 16 MiB/s -> unlimited through QMP");
    let dir = super::work_dir(&a.dir, "ferry-cap-")?;
    let d = dir.path();
    let exe = std::env::current_exe()?;
    let ctl = d.join("guest.sock");
    let mut guest = Command::new(&exe);
    guest
        .args([
            "loadgen",
            "--size",
            &a.size.to_string(),
            "--dirty-rate",
            "0",
        ])
        .arg("--ram")
        .arg(d.join("src.ram"))
        .arg("--dirty-log")
        .arg(d.join("dirty.log"))
        .arg("--control")
        .arg(format!("unix:{}", ctl.display()));
    let _guest = start(&mut guest, &ctl, "ferry loadgen")?;
    let sock = d.join("migrate.sock");
    let mut receive = Command::new(&exe);
    receive
        .args(["receive", "--listen"])
        .arg(format!("unix:{}", sock.display()))
        .arg("--ram")
        .arg(format!("{},name=ram", d.join("dst.ram").display()));
    let _receiver = start(&mut receive, &sock, "ferry receive")?;
    let qmp = d.join("send.qmp");
    let mut send = send_command(&exe, d);
    send.args([
        "--max-bandwidth",
        &CAP.to_string(),
        "--no-progress",
        "--qmp",
    ])
    .arg(format!("unix:{}", qmp.display()));
    let mut sender = start(&mut send, &qmp, "ferry send")?;
    let (samples, raised) = drive(&qmp)?;
    let status = sender.0.wait()?;
    if !status.success() {
        bail!("ferry send failed ({status})");
    }
    report(&samples, raised);
    plot_rate(a, &samples, raised)
}

/// Polls query-migrate until the migration ends, raising the cap to
/// unlimited [`CAPPED`] after it became active; returns the samples and the
/// time of the raise.
fn drive(qmp: &Path) -> anyhow::Result<(Vec<Sample>, f64)> {
    let stream = UnixStream::connect(qmp).context("cannot connect to ferry's QMP socket")?;
    let mut q = qapi::Qmp::from_stream(&stream);
    q.handshake().context("QMP negotiation")?;
    let t0 = Instant::now();
    let (mut samples, mut active, mut raised) = (Vec::new(), None, None);
    loop {
        let info = match q.execute(&query_migrate {}) {
            Ok(info) => info,
            Err(_) if !samples.is_empty() => break, // ferry exited
            Err(e) => return Err(e).context("query-migrate"),
        };
        let t = t0.elapsed().as_secs_f64();
        let status = info.status.unwrap_or(MigrationStatus::none);
        let bytes = info.ram.map_or(0, |r| r.transferred as u64);
        samples.push((t, bytes, status));
        if matches!(
            status,
            MigrationStatus::completed | MigrationStatus::failed | MigrationStatus::cancelled
        ) {
            break;
        }
        let since = *active.get_or_insert(t);
        if raised.is_none() && t - since >= CAPPED.as_secs_f64() {
            let p = MigrateSetParameters {
                max_bandwidth: Some(0),
                ..MigrateSetParameters::default()
            };
            q.execute(&migrate_set_parameters(p))
                .context("migrate-set-parameters")?;
            raised = Some(t0.elapsed().as_secs_f64());
        }
        std::thread::sleep(POLL);
    }
    let raised = raised.context("the migration ended before the cap was raised")?;
    Ok((samples, raised))
}

/// Rate in MiB/s between consecutive samples whose byte counts differ (the
/// writer reports its counter every 250 ms), at the later sample's time.
fn rates(samples: &[Sample]) -> Vec<(f64, f64)> {
    let mut out = Vec::new();
    let mut prev: Option<&Sample> = None;
    for s in samples {
        if let Some(p) = prev {
            if s.1 != p.1 {
                out.push((s.0, (s.1 - p.1) as f64 / (s.0 - p.0) / 1048576.0));
                prev = Some(s);
            }
        } else if s.1 > 0 {
            prev = Some(s);
        }
    }
    out
}

fn report(samples: &[Sample], raised: f64) {
    let r = rates(samples);
    let mean = |f: &dyn Fn(f64) -> bool| {
        let v: Vec<f64> = r.iter().filter(|p| f(p.0)).map(|p| p.1).collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    let capped = mean(&|t| t <= raised);
    let uncapped = mean(&|t| t > raised);
    let seen = r
        .iter()
        .find(|p| p.0 > raised && p.1 > 4.0 * (CAP >> 20) as f64)
        .map(|p| p.0 - raised);
    let end = samples.last().map_or(0.0, |s| s.0);
    println!("cap change 16 MiB/s -> unlimited (QMP migrate-set-parameters)");
    println!("  capped rate        {capped:>8.1} MiB/s (cap 16)");
    println!("  uncapped rate      {uncapped:>8.1} MiB/s");
    match seen {
        Some(s) => println!(
            "  change seen after  {:>8.0} ms (writer's counter, reported every 250 ms)",
            s * 1000.0
        ),
        None => println!("  change seen after         - (the rate never rose 4x)"),
    }
    println!(
        "  finished after     {:>8.2} s from the raise",
        end - raised
    );
}

fn plot_rate(a: &LiveArgs, samples: &[Sample], raised: f64) -> anyhow::Result<()> {
    let end = samples.last().map_or(raised, |s| s.0);
    let cap = (CAP >> 20) as f64;
    let file = a.out.join("cap_change.svg");
    let svg = plot::svg(
        "cap raised from 16 MiB/s to unlimited through QMP",
        "seconds",
        &Series {
            label: "stream MiB/s (query-migrate)".into(),
            points: rates(samples),
            colour: "steelblue",
        },
        &Series {
            label: "cap MiB/s (0 = unlimited)".into(),
            points: vec![(0.0, cap), (raised, cap), (raised, 0.0), (end, 0.0)],
            colour: "firebrick",
        },
    );
    std::fs::write(&file, svg).with_context(|| format!("cannot write {}", file.display()))?;
    println!("  plot               {}", file.display());
    Ok(())
}
