//! `ferry bench`: scenarios that print their figures.
//!
//! `static` migrates one unchanging guest RAM file with QEMU 7.2 and with
//! ferry, side by side in one run, into the same kind of sink: a TCP socket on
//! loopback whose reader discards what it gets.

mod cap_change;
mod live;
mod plot;
mod qmp;

use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde_json::{json, Value};

use crate::options::parse_rate;
use crate::tools::pattern;

/// `ferry bench`
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Clone, Subcommand)]
enum Scenario {
    /// Unchanging mixed RAM: QEMU 7.2 plain and compressed against ferry raw and
    /// compressed, each into a discarding TCP sink on loopback.
    Static(StaticArgs),
    /// Live migration of a 2 GiB `ferry loadgen` guest under a 1 GiB/s cap at
    /// several dirty rates, with and without compression and auto-converge;
    /// prints a table and writes one SVG plot per scenario.
    Live(live::LiveArgs),
}

#[derive(Debug, Clone, Args)]
struct StaticArgs {
    /// Guest RAM size (a whole number of MiB).
    #[arg(long, default_value = "2G", value_parser = parse_rate)]
    size: u64,
    /// Compression threads for both QEMU and ferry.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Directory for the RAM file (tmpfs keeps disk speed out of the figures).
    #[arg(long, default_value = "/dev/shm")]
    dir: PathBuf,
    /// The QEMU 7.2 binary.
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: PathBuf,
    /// Run only ferry's scenarios.
    #[arg(long)]
    no_qemu: bool,
}

/// Runs a benchmark scenario.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.scenario {
        Scenario::Static(a) => run_static(a),
        Scenario::Live(a) => live::run(a),
    }
}

/// One measured migration.
struct Row {
    name: String,
    seconds: f64,
    stream_bytes: u64,
    peak_anon: Option<u64>,
}

/// A loopback TCP listener that reads one connection to its end and counts.
struct Sink {
    addr: String,
    reader: JoinHandle<std::io::Result<u64>>,
}

impl Sink {
    fn start() -> anyhow::Result<Self> {
        let l = TcpListener::bind("127.0.0.1:0")?;
        let addr = l.local_addr()?.to_string();
        let reader = std::thread::spawn(move || {
            let (mut s, _) = l.accept()?;
            let mut buf = vec![0u8; 1 << 20];
            let mut n = 0u64;
            loop {
                match s.read(&mut buf)? {
                    0 => return Ok(n),
                    k => n += k as u64,
                }
            }
        });
        Ok(Self { addr, reader })
    }

    fn bytes(self) -> anyhow::Result<u64> {
        Ok(self
            .reader
            .join()
            .map_err(|_| anyhow::anyhow!("sink thread panicked"))??)
    }
}

fn run_static(a: StaticArgs) -> anyhow::Result<()> {
    let size = a.size / (1 << 20) * (1 << 20);
    if size == 0 {
        bail!("--size must be at least 1 MiB");
    }
    let dir = tempfile::Builder::new()
        .prefix("ferry-bench-")
        .tempdir_in(&a.dir)?;
    let ram = dir.path().join("guest.ram");
    pattern::write_guest_ram(&ram, size, "bench static")?;
    let mut rows = Vec::new();
    if !a.no_qemu {
        rows.push(qemu_run(&a, &ram, size, None, dir.path())?);
        rows.push(qemu_run(&a, &ram, size, Some(a.workers), dir.path())?);
    }
    rows.push(ferry_run(&ram, false, a.workers, dir.path())?);
    rows.push(ferry_run(&ram, true, a.workers, dir.path())?);

    println!(
        "{:<34} {:>8} {:>10} {:>11} {:>15}",
        "scenario", "wall s", "RAM GB/s", "stream MB", "peak anon MiB"
    );
    for r in &rows {
        println!(
            "{:<34} {:>8.2} {:>10.2} {:>11.1} {:>15}",
            r.name,
            r.seconds,
            size as f64 / 1e9 / r.seconds,
            r.stream_bytes as f64 / 1e6,
            r.peak_anon.map_or("-".to_owned(), |b| format!(
                "{:.1}",
                b as f64 / (1 << 20) as f64
            ))
        );
    }
    let find = |p: &str| {
        rows.iter()
            .find(|r| r.name.starts_with(p))
            .map(|r| r.seconds)
    };
    if let (Some(q), Some(f)) = (find("qemu compress"), find("ferry compress")) {
        println!(
            "ferry compressed / QEMU compressed wall time: {:.2} (target <= 0.33)",
            f / q
        );
    }
    if let (Some(q), Some(f)) = (find("qemu plain"), find("ferry raw")) {
        println!(
            "ferry raw / QEMU plain throughput: {:.2} (target >= 1)",
            q / f
        );
    }
    if let Some(f) = find("ferry raw") {
        println!(
            "ferry raw throughput: {:.2} GB/s (target >= 2)",
            size as f64 / 1e9 / f
        );
    }
    Ok(())
}

/// A helper process (QEMU, `ferry receive`, `ferry loadgen`) of a benchmark or
/// the demo: killed and reaped when the run ends, however it ends, so a failed
/// run leaves no process behind. Killing one that has already been waited for
/// is a no-op.
pub(crate) struct Killed(pub(crate) Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until `child` creates `path` (its socket: it is ready), failing if it
/// exits first or takes longer than `timeout`.
pub(crate) fn wait_for(
    path: &Path,
    child: &mut Child,
    what: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        if let Some(status) = child.try_wait()? {
            bail!("{what} exited early ({status})");
        }
        if Instant::now() > deadline {
            bail!(
                "{what} did not create {} within {timeout:?}",
                path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn qemu_run(
    a: &StaticArgs,
    ram: &Path,
    size: u64,
    compress: Option<usize>,
    dir: &Path,
) -> anyhow::Result<Row> {
    let sock = dir.join(format!("qmp-{}.sock", compress.is_some()));
    let child = Command::new(&a.qemu)
        .args(["-M", "none", "-nodefaults", "-display", "none", "-S"])
        .arg("-m")
        .arg(format!("{}M", size >> 20))
        .arg("-object")
        .arg(format!(
            "memory-backend-file,id=mem,size={size},mem-path={},share=on",
            ram.display()
        ))
        .args(["-machine", "memory-backend=mem", "-qmp"])
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .stdin(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {}", a.qemu.display()))?;
    let mut child = Killed(child);
    wait_for(&sock, &mut child.0, "QEMU", Duration::from_secs(20))?;
    let mut q = qmp::Qmp::connect(&sock)?;
    q.execute("migrate-set-parameters", json!({"max-bandwidth": 0}))?;
    if let Some(threads) = compress {
        q.execute(
            "migrate-set-capabilities",
            json!({"capabilities": [{"capability": "compress", "state": true}]}),
        )?;
        q.execute(
            "migrate-set-parameters",
            json!({"compress-threads": threads, "compress-level": 1}),
        )?;
    }
    let sink = Sink::start()?;
    let start = Instant::now();
    q.execute("migrate", json!({"uri": format!("tcp:{}", sink.addr)}))?;
    let info: Value = loop {
        let info = q.execute("query-migrate", json!({}))?;
        match info["status"].as_str() {
            Some("completed") => break info,
            Some("failed") | Some("cancelled") => bail!("QEMU migration failed: {info}"),
            _ => std::thread::sleep(Duration::from_millis(5)),
        }
    };
    let seconds = start.elapsed().as_secs_f64();
    drop(child);
    let stream_bytes = sink.bytes()?;
    tracing::info!(%info, "QEMU finished");
    Ok(Row {
        name: match compress {
            Some(t) => format!("qemu compress {t} threads, level 1"),
            None => "qemu plain".into(),
        },
        seconds,
        stream_bytes,
        peak_anon: None,
    })
}

fn ferry_run(ram: &Path, compress: bool, workers: usize, dir: &Path) -> anyhow::Result<Row> {
    let sink = Sink::start()?;
    let stats = dir.join("ferry-stats.json");
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.arg("send")
        .arg("--ram")
        .arg(format!("{},name=mem", ram.display()))
        .arg("--to")
        .arg(format!("tcp:{}", sink.addr))
        .args(["--no-progress", "--compress-workers", &workers.to_string()])
        .arg("--stats-json")
        .arg(&stats)
        .stderr(Stdio::null());
    if compress {
        cmd.arg("--compress");
    }
    let start = Instant::now();
    let status = cmd.status()?;
    let seconds = start.elapsed().as_secs_f64();
    if !status.success() {
        bail!("ferry send failed ({status})");
    }
    let stream_bytes = sink.bytes()?;
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&stats)?)?;
    let peak_anon = v["processes"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(_, p)| p["peak-anon-bytes"].as_u64())
        .max();
    Ok(Row {
        name: if compress {
            format!("ferry compress {workers} workers, level 1")
        } else {
            "ferry raw".into()
        },
        seconds,
        stream_bytes,
        peak_anon,
    })
}
