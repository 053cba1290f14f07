//! `ferry bench static`: QEMU 10 and ferry side by side on the same
//! unchanging guest RAM, each into its own real receiver (QEMU 10
//! `-incoming`, `ferry receive`), interleaved, medians of `--runs`.
//!
//! Both ends run in private network namespaces, so the bytes on the wire
//! are the link's own counters (every byte both ways, TCP/IP headers
//! included) and no other process's traffic mixes in: on the fast link one
//! namespace's loopback, on the slow one a veth pair between two namespaces
//! shaped with `tbf`, as tests/src/netns.rs does. CPU seconds are each
//! process's rusage, its threads and reaped children included (ferry's actor
//! processes are children of `ferry send` and `ferry receive`).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};
use serde_json::{json, Value};

use super::plot;
use super::qmp::Qmp;
use super::wait_for;
use crate::options::parse_rate;
use crate::tools::pattern;

/// `ferry bench static`
#[derive(Debug, Clone, Args)]
pub struct StaticArgs {
    /// Guest RAM size (a whole number of MiB).
    #[arg(long, default_value = "1G", value_parser = parse_rate)]
    size: u64,
    /// multifd channels of every multifd scenario, QEMU's and ferry's.
    #[arg(long, default_value_t = 2)]
    channels: u8,
    /// Runs of each scenario (interleaved); the table shows medians.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// The link: `fast` is loopback inside one network namespace, `slow` a
    /// veth pair between two namespaces shaped to `--rate` with tbf.
    #[arg(long, value_enum, default_value_t = Link::Fast)]
    link: Link,
    /// The slow link's rate (tc syntax).
    #[arg(long, default_value = "1gbit")]
    rate: String,
    /// Directory for the RAM files (tmpfs keeps disk speed out of the figures).
    #[arg(long, default_value = "/dev/shm")]
    dir: PathBuf,
    /// QEMU 10's install tree (its usr/bin/qemu-system-x86_64).
    #[arg(long, default_value = "/opt/qemu-10.0.2")]
    qemu10_prefix: PathBuf,
    /// Run only ferry's scenarios.
    #[arg(long)]
    no_qemu: bool,
    /// Where the plot (static-LINK.svg) goes.
    #[arg(long, default_value = "bench-static")]
    out: PathBuf,
}

/// Which link the migrations cross.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Link {
    /// Loopback, unlimited.
    Fast,
    /// A tbf-shaped veth pair between two namespaces.
    Slow,
}

/// One way to migrate the RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    QemuPlain,
    QemuMultifd(&'static str),
    Ferry(&'static str),
}

impl Scenario {
    fn name(self, channels: u8) -> String {
        match self {
            Self::QemuPlain => "QEMU 10 plain".into(),
            Self::QemuMultifd("none") => format!("QEMU 10 multifd {channels}ch none"),
            Self::QemuMultifd(c) => format!("QEMU 10 multifd {channels}ch {c} level 1"),
            Self::Ferry("none") => format!("ferry multifd {channels}ch raw"),
            Self::Ferry("auto") => format!("ferry multifd {channels}ch auto"),
            Self::Ferry(c) => format!("ferry multifd {channels}ch {c} level 1"),
        }
    }
}

/// One measured migration.
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    seconds: f64,
    wire_bytes: u64,
    cpu_seconds: f64,
    peak_anon: Option<u64>,
}

/// Runs the scenarios `runs` times each, interleaved, and prints medians,
/// ratios against issue 12's goals, and one SVG plot.
pub fn run(a: StaticArgs) -> anyhow::Result<()> {
    let size = a.size / (1 << 20) * (1 << 20);
    if size == 0 || a.runs == 0 || a.channels == 0 {
        bail!("--size must be at least 1 MiB, --runs and --channels at least 1");
    }
    let dir = super::work_dir(&a.dir, "ferry-bench-")?;
    let ram = dir.path().join("src.ram");
    pattern::write_guest_ram(&ram, size, "bench static")?;
    let net = Net::new(a.link, &a.rate)?;
    let mut scenarios = Vec::new();
    if !a.no_qemu {
        scenarios.extend([
            Scenario::QemuPlain,
            Scenario::QemuMultifd("none"),
            Scenario::QemuMultifd("zstd"),
        ]);
    }
    scenarios.extend([
        Scenario::Ferry("none"),
        Scenario::Ferry("zstd"),
        Scenario::Ferry("auto"),
    ]);
    let mut samples = vec![Vec::new(); scenarios.len()];
    let mut port = 4400u16;
    for run in 0..a.runs {
        for (s, out) in scenarios.iter().zip(&mut samples) {
            port += 1;
            let r = Run {
                a: &a,
                net: &net,
                src: &ram,
                dst: &dir.path().join("dst.ram"),
                dir: dir.path(),
                size,
                port,
            };
            let sample = r
                .scenario(*s)
                .with_context(|| format!("{} (run {})", s.name(a.channels), run + 1))?;
            tracing::info!(scenario = s.name(a.channels), ?sample, "measured");
            out.push(sample);
        }
    }
    let rows: Vec<(String, Sample)> = scenarios
        .iter()
        .zip(&samples)
        .map(|(s, v)| (s.name(a.channels), median(v)))
        .collect();
    print!("{}", table(&a, size, &rows));
    print!("{}", ratios(&a, &scenarios, &rows));
    std::fs::create_dir_all(&a.out)?;
    let file = a.out.join(format!("static-{}.svg", link_name(a.link)));
    let svg = plot::bars(
        &format!(
            "ferry bench static, {} link, {} MiB mixed RAM, medians of {}",
            link_name(a.link),
            size >> 20,
            a.runs
        ),
        &rows.iter().map(|r| r.0.clone()).collect::<Vec<_>>(),
        &[
            ("wall s", rows.iter().map(|r| r.1.seconds).collect()),
            (
                "MB on the wire",
                rows.iter().map(|r| r.1.wire_bytes as f64 / 1e6).collect(),
            ),
        ],
    );
    std::fs::write(&file, svg).with_context(|| format!("cannot write {}", file.display()))?;
    println!("plot: {}", file.display());
    Ok(())
}

fn link_name(l: Link) -> &'static str {
    match l {
        Link::Fast => "fast",
        Link::Slow => "slow",
    }
}

/// The median of each figure on its own.
fn median(v: &[Sample]) -> Sample {
    fn mid(mut x: Vec<f64>) -> f64 {
        x.sort_by(f64::total_cmp);
        let n = x.len();
        if n % 2 == 1 {
            x[n / 2]
        } else {
            (x[n / 2 - 1] + x[n / 2]) / 2.0
        }
    }
    Sample {
        seconds: mid(v.iter().map(|s| s.seconds).collect()),
        wire_bytes: mid(v.iter().map(|s| s.wire_bytes as f64).collect()) as u64,
        cpu_seconds: mid(v.iter().map(|s| s.cpu_seconds).collect()),
        peak_anon: v.iter().filter_map(|s| s.peak_anon).max(),
    }
}

fn table(a: &StaticArgs, size: u64, rows: &[(String, Sample)]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{} link, {} MiB mixed RAM, medians of {} interleaved runs",
        link_name(a.link),
        size >> 20,
        a.runs
    );
    let _ = writeln!(
        s,
        "{:<36} {:>8} {:>14} {:>10} {:>15}",
        "scenario", "wall s", "MB on the wire", "CPU s", "peak anon MiB"
    );
    for (name, r) in rows {
        let _ = writeln!(
            s,
            "{:<36} {:>8.2} {:>14.1} {:>10.2} {:>15}",
            name,
            r.seconds,
            r.wire_bytes as f64 / 1e6,
            r.cpu_seconds,
            r.peak_anon
                .map_or("-".to_owned(), |b| format!("{:.1}", b as f64 / 1048576.0))
        );
    }
    s
}

/// The ratios of issue 12's goals that this link's rows can show.
fn ratios(a: &StaticArgs, scenarios: &[Scenario], rows: &[(String, Sample)]) -> String {
    let get = |s: Scenario| scenarios.iter().position(|&x| x == s).map(|i| rows[i].1);
    let (raw, zstd, auto) = (
        get(Scenario::Ferry("none")),
        get(Scenario::Ferry("zstd")),
        get(Scenario::Ferry("auto")),
    );
    let (q_none, q_zstd) = (
        get(Scenario::QemuMultifd("none")),
        get(Scenario::QemuMultifd("zstd")),
    );
    let mut s = String::new();
    let mut line = |what: &str, v: f64, goal: f64| {
        let ok = if v <= goal { "met" } else { "NOT met" };
        let _ = writeln!(s, "{what}: {v:.3} (goal <= {goal}) {ok}");
    };
    let t = |x: Sample| x.seconds;
    let b = |x: Sample| x.wire_bytes as f64;
    match a.link {
        Link::Fast => {
            if let (Some(f), Some(q)) = (raw, q_none) {
                line("ferry raw / QEMU multifd none, wall", t(f) / t(q), 0.8);
            }
            if let (Some(f), Some(q)) = (zstd, q_zstd) {
                line("ferry zstd / QEMU multifd zstd, wall", t(f) / t(q), 0.8);
                line("ferry zstd / QEMU multifd zstd, bytes", b(f) / b(q), 1.0);
            }
            if let (Some(f), Some(r)) = (auto, raw) {
                line("ferry auto / ferry raw, wall", t(f) / t(r), 1.1);
            }
        }
        Link::Slow => {
            if let (Some(q), Some(z)) = (q_zstd, zstd) {
                let best = auto.filter(|x| t(*x) < t(z)).unwrap_or(z);
                line(
                    "ferry compressed (best of zstd, auto) / QEMU multifd zstd, wall",
                    t(best) / t(q),
                    0.9,
                );
                line(
                    "ferry compressed (same) / QEMU multifd zstd, bytes",
                    b(best) / b(q),
                    1.0,
                );
            }
            if let (Some(f), Some(r), Some(z)) = (auto, raw, zstd) {
                let best = t(r).min(t(z));
                line(
                    "ferry auto / ferry best fixed setting, wall",
                    t(f) / best,
                    1.1,
                );
            }
        }
    }
    s
}

/// The namespaces the migrations run in; deleted on drop.
struct Net {
    /// Namespace of the source.
    src: String,
    /// Namespace of the destination.
    dst: String,
    /// The destination's address.
    dst_addr: String,
    /// The device (in `src`) whose counters are the bytes on the wire.
    dev: &'static str,
    made: Vec<String>,
}

impl Net {
    fn new(link: Link, rate: &str) -> anyhow::Result<Self> {
        let base = format!("ferry-bench-{}", std::process::id());
        let mut net = Net {
            src: format!("{base}-a"),
            dst: format!("{base}-a"),
            dst_addr: "127.0.0.1".into(),
            dev: "lo",
            made: Vec::new(),
        };
        ip(&["netns", "add", &net.src])?;
        net.made.push(net.src.clone());
        ip(&["-n", &net.src, "link", "set", "lo", "up"])?;
        if link == Link::Slow {
            net.dst = format!("{base}-b");
            ip(&["netns", "add", &net.dst])?;
            net.made.push(net.dst.clone());
            ip(&["-n", &net.dst, "link", "set", "lo", "up"])?;
            let (a, b) = (net.src.as_str(), net.dst.as_str());
            ip(&[
                "link", "add", "veth-a", "netns", a, "type", "veth", "peer", "name", "veth-b",
                "netns", b,
            ])?;
            for (ns, dev, addr) in [(a, "veth-a", "10.78.0.1"), (b, "veth-b", "10.78.0.2")] {
                ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
                ip(&["-n", ns, "link", "set", dev, "up"])?;
                ip(&[
                    "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf",
                    "rate", rate, "burst", "1mb", "latency", "50ms",
                ])?;
            }
            net.dst_addr = "10.78.0.2".into();
            net.dev = "veth-a";
        }
        Ok(net)
    }

    /// Bytes the counted device has sent and received so far.
    fn bytes(&self) -> anyhow::Result<u64> {
        let out = Command::new("ip")
            .args(["-n", &self.src, "-s", "-j", "link", "show", self.dev])
            .output()?;
        let v: Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("cannot read the counters of {}", self.dev))?;
        let st = &v[0]["stats64"];
        match (st["tx"]["bytes"].as_u64(), st["rx"]["bytes"].as_u64()) {
            // Loopback counts every byte once as sent and once as received.
            (Some(tx), Some(_)) if self.dev == "lo" => Ok(tx),
            (Some(tx), Some(rx)) => Ok(tx + rx),
            _ => bail!("no byte counters for {}: {v}", self.dev),
        }
    }

    /// `program` in namespace `ns` (`ip netns exec` execs it: same pid).
    fn command(ns: &str, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).arg(program);
        c.stdin(Stdio::null());
        c
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in self.made.drain(..) {
            let _ = ip(&["netns", "del", &ns]);
        }
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("cannot run ip (the benchmark needs root and iproute2)")?;
    if !out.status.success() {
        bail!(
            "`ip {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A process of a run, killed and reaped on drop unless reaped already.
struct Proc {
    child: Option<Child>,
    what: &'static str,
}

impl Proc {
    fn spawn(cmd: &mut Command, what: &'static str) -> anyhow::Result<Self> {
        let child = cmd
            .stderr(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {what}"))?;
        Ok(Self {
            child: Some(child),
            what,
        })
    }

    fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("not reaped yet")
    }

    /// Waits for the process to exit; returns whether it succeeded and its
    /// CPU seconds (user + system, threads and reaped children included).
    fn reap(mut self) -> anyhow::Result<(bool, f64)> {
        let child = self.child.take().expect("reaped once");
        let pid = child.id() as libc::pid_t;
        // std's Child would reap it too; it must not after wait4 has.
        std::mem::forget(child);
        let mut status = 0;
        // SAFETY: an all-zero rusage is a valid value of this plain C struct.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `pid` is our own unreaped child; `status` and `ru` are
        // valid for writes for the duration of the call.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
        if r != pid {
            bail!(
                "cannot wait for {}: {}",
                self.what,
                std::io::Error::last_os_error()
            );
        }
        let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
        Ok((ok, secs(ru.ru_utime) + secs(ru.ru_stime)))
    }

    /// Waits at most `timeout` for the process to exit.
    fn exited_within(&mut self, timeout: Duration) -> anyhow::Result<bool> {
        let deadline = Instant::now() + timeout;
        loop {
            // SAFETY: waitid with WNOWAIT only looks at our own child's state
            // and leaves it to be reaped by `reap`; `info` is valid for writes.
            let exited = unsafe {
                let mut info: libc::siginfo_t = std::mem::zeroed();
                libc::waitid(
                    libc::P_PID,
                    self.child().id(),
                    &mut info,
                    libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
                ) == 0
                    && info.si_pid() != 0
            };
            if exited {
                return Ok(true);
            }
            if Instant::now() > deadline {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One migration's setting.
struct Run<'a> {
    a: &'a StaticArgs,
    net: &'a Net,
    src: &'a Path,
    dst: &'a Path,
    dir: &'a Path,
    size: u64,
    port: u16,
}

/// Longest a single migration may take.
const TIMEOUT: Duration = Duration::from_secs(300);

impl Run<'_> {
    fn scenario(&self, s: Scenario) -> anyhow::Result<Sample> {
        // Every run loads into a fresh destination file, as a new guest would.
        let _ = std::fs::remove_file(self.dst);
        let before = self.net.bytes()?;
        let mut sample = match s {
            Scenario::QemuPlain => self.qemu(None)?,
            Scenario::QemuMultifd(c) => self.qemu(Some(c))?,
            Scenario::Ferry(c) => self.ferry(c)?,
        };
        sample.wire_bytes = self.net.bytes()? - before;
        Ok(sample)
    }

    fn uri(&self) -> String {
        format!("tcp:{}:{}", self.net.dst_addr, self.port)
    }

    /// A QEMU 10 `-M none` over `ram`, in namespace `ns`, with its QMP
    /// socket `name`.sock; multifd set up if `multifd`.
    fn qemu_process(
        &self,
        ns: &str,
        ram: &Path,
        name: &str,
        multifd: Option<&str>,
        incoming: bool,
    ) -> anyhow::Result<(Proc, Qmp)> {
        let p = &self.a.qemu10_prefix;
        let sock = self.dir.join(format!("{name}.sock"));
        let _ = std::fs::remove_file(&sock);
        let mut cmd = Net::command(ns, &p.join("usr/bin/qemu-system-x86_64"));
        cmd.env("QEMU_MODULE_DIR", p.join("usr/lib/x86_64-linux-gnu/qemu"))
            .arg("-L")
            .arg(p.join("usr/share/qemu"))
            .args(["-M", "none", "-nodefaults", "-display", "none", "-S"])
            .arg("-m")
            .arg(format!("{}M", self.size >> 20))
            .arg("-object")
            .arg(format!(
                "memory-backend-file,id=mem,size={},mem-path={},share=on",
                self.size,
                ram.display()
            ))
            .args(["-machine", "memory-backend=mem", "-qmp"])
            .arg(format!("unix:{},server=on,wait=off", sock.display()));
        if incoming {
            cmd.args(["-incoming", "defer"]);
        }
        let mut proc = Proc::spawn(&mut cmd, "QEMU 10")?;
        wait_for(&sock, proc.child(), "QEMU 10", Duration::from_secs(20))?;
        let mut q = Qmp::connect(&sock)?;
        if let Some(c) = multifd {
            q.execute(
                "migrate-set-capabilities",
                json!({"capabilities": [{"capability": "multifd", "state": true}]}),
            )?;
            q.execute(
                "migrate-set-parameters",
                json!({"multifd-channels": self.a.channels, "multifd-compression": c,
                       "multifd-zstd-level": 1, "multifd-zlib-level": 1}),
            )?;
        }
        Ok((proc, q))
    }

    fn qemu(&self, multifd: Option<&str>) -> anyhow::Result<Sample> {
        let net = self.net;
        let (dst, mut qd) = self.qemu_process(&net.dst, self.dst, "dst", multifd, true)?;
        let (src, mut qs) = self.qemu_process(&net.src, self.src, "src", multifd, false)?;
        qs.execute("migrate-set-parameters", json!({"max-bandwidth": 0}))?;
        qd.execute("migrate-incoming", json!({"uri": self.uri()}))?;
        let start = Instant::now();
        qs.execute("migrate", json!({"uri": self.uri()}))?;
        for (q, end) in [(&mut qs, "source"), (&mut qd, "destination")] {
            loop {
                let info = q.execute("query-migrate", json!({}))?;
                match info["status"].as_str() {
                    Some("completed") => break,
                    Some("failed" | "cancelled") => bail!("QEMU {end} failed: {info}"),
                    _ if start.elapsed() > TIMEOUT => bail!("QEMU {end} timed out: {info}"),
                    _ => std::thread::sleep(Duration::from_millis(2)),
                }
            }
        }
        let seconds = start.elapsed().as_secs_f64();
        let mut cpu = 0.0;
        for (mut q, p) in [(qs, src), (qd, dst)] {
            let _ = q.execute("quit", json!({}));
            cpu += p.reap()?.1;
        }
        Ok(Sample {
            seconds,
            cpu_seconds: cpu,
            ..Sample::default()
        })
    }

    fn ferry(&self, compression: &str) -> anyhow::Result<Sample> {
        let exe = std::env::current_exe()?;
        let ch = self.a.channels.to_string();
        let stats = [self.dir.join("send.json"), self.dir.join("receive.json")];
        let mut recv = Proc::spawn(
            Net::command(&self.net.dst, &exe)
                .arg("receive")
                .arg("--listen")
                .arg(self.uri())
                .arg("--ram")
                .arg(format!("{},name=mem", self.dst.display()))
                .args(["--multifd-channels", &ch])
                .arg("--stats-json")
                .arg(&stats[1]),
            "ferry receive",
        )?;
        wait_listening(&mut recv, self.port)?;
        let start = Instant::now();
        let send = Proc::spawn(
            Net::command(&self.net.src, &exe)
                .arg("send")
                .arg("--ram")
                .arg(format!("{},name=mem", self.src.display()))
                .arg("--to")
                .arg(self.uri())
                .args(["--no-progress", "--multifd-channels", &ch])
                .args(["--multifd-compression", compression])
                .arg("--stats-json")
                .arg(&stats[0]),
            "ferry send",
        )?;
        let (sent, cpu_send) = send.reap()?;
        if !recv.exited_within(Duration::from_secs(30))? {
            bail!("ferry receive did not exit after the sender");
        }
        let (received, cpu_recv) = recv.reap()?;
        let seconds = start.elapsed().as_secs_f64();
        if !(sent && received) {
            bail!("ferry migration failed (send ok: {sent}, receive ok: {received})");
        }
        let mut peak = None;
        for f in &stats {
            let v: Value = serde_json::from_str(&std::fs::read_to_string(f)?)?;
            let p = v["processes"]
                .as_object()
                .into_iter()
                .flatten()
                .filter_map(|(_, p)| p["peak-anon-bytes"].as_u64())
                .max();
            peak = peak.max(p);
        }
        Ok(Sample {
            seconds,
            cpu_seconds: cpu_send + cpu_recv,
            peak_anon: peak,
            ..Sample::default()
        })
    }
}

/// Waits until `p` listens on TCP `port` in its network namespace
/// (`/proc/PID/net/tcp` shows the namespace of PID).
fn wait_listening(p: &mut Proc, port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let needle = format!(":{port:04X} 00000000:0000 0A");
    let path = format!("/proc/{}/net/tcp", p.child().id());
    loop {
        if std::fs::read_to_string(&path).is_ok_and(|t| t.contains(&needle)) {
            return Ok(());
        }
        if let Some(status) = p.child().try_wait()? {
            bail!("{} exited early ({status})", p.what);
        }
        if Instant::now() > deadline {
            bail!("{} did not listen on port {port} within 20 s", p.what);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
