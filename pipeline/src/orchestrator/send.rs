//! `ferry send`: spawns the scanner, compress and writer processes, drives
//! the rounds of pre-copy, switches over when the rest fits the downtime
//! limit, and verifies the destination's digests.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use crate::supervisor::messages::{ActorKind, Chunk, DiskChunk, Event, PageCounts, Work};
use anyhow::{anyhow, bail, Context};
use ferry_proto::return_path::{BlockDigest, ReturnPath};
use ferry_proto::stream::device_state::DeviceState;
use ferry_proto::stream::PAGE_SIZE;
use indicatif::{ProgressBar, ProgressStyle};
use ipc_channel::ipc::{self, IpcSender};
use serde::Serialize;
use serde_json::json;

use super::guest::Guest;
use super::{stats, SendArgs};
use crate::actors::{blockio, compress, scanner, writer};
use crate::channel::uri::Uri;
use crate::supervisor::Supervisor;
use ferry_guest::dirty_log::DirtyLog;
use ferry_guest::ram::{self, BlockFile};

/// Chunks in flight between the compress stage and the writer: enough to
/// keep the socket busy while the pool works, few enough to bound memory.
const CHUNK_WINDOW: u32 = 8;
/// Batches in flight between the scanner and the compress stage.
const BATCH_WINDOW: u32 = 16;
/// Disk chunks (1 MiB each) in flight between the blockio actor and the writer.
const DISK_WINDOW: u32 = 16;

/// Opens the disks' dirty logs for a live migration (every disk needs one).
fn disk_logs(args: &SendArgs) -> anyhow::Result<Vec<DirtyLog>> {
    if args.dirty_log.is_none() {
        return Ok(Vec::new());
    }
    args.disk
        .iter()
        .map(|d| {
            let Some(path) = &d.dirty_log else {
                bail!(
                    "disk {:?} has no dirty log: a live migration (--dirty-log) needs --disk {},dirty-log=PATH",
                    d.name,
                    d.path.display()
                );
            };
            // The log's own length bounds the chunks it covers; the blockio
            // actor checks it against the disk's capacity.
            let len = std::fs::metadata(path)
                .with_context(|| format!("disk {:?}: cannot open its dirty log {}", d.name, path.display()))?
                .len();
            DirtyLog::open(path, len * 8)
                .with_context(|| format!("disk {:?}: cannot open its dirty log", d.name))
        })
        .collect()
}

/// One round of pre-copy, as `--stats-json` reports it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RoundStats {
    /// Round number (0 sends every page).
    pub round: u32,
    /// Seconds since the start of the migration when the round ended.
    pub end: f64,
    /// Seconds the round took.
    pub duration: f64,
    /// Stream bytes of the round.
    pub bytes: u64,
    /// Pages the round sent.
    pub pages: u64,
    /// Bytes the guest dirtied while the round ran.
    pub dirty_bytes: u64,
    /// The guest's dirty rate over the round, bytes per second.
    pub dirty_rate: f64,
    /// Stream bandwidth over the round, bytes per second.
    pub bandwidth: f64,
    /// Dirty bytes left when the round ended.
    pub remaining: u64,
    /// Downtime if the switchover happened now, milliseconds.
    pub expected_downtime_ms: f64,
    /// Guest throttle during the round, percent.
    pub throttle: u32,
}

/// What a run produced.
#[derive(Debug, Default)]
struct Report {
    bytes: u64,
    counts: PageCounts,
    return_path: Option<ReturnPath>,
    setup: Duration,
    rounds: Vec<RoundStats>,
    downtime: Option<Duration>,
    expected_downtime_ms: Option<f64>,
    throttle: u32,
}

/// Runs `ferry send`.
pub fn run(args: SendArgs) -> anyhow::Result<()> {
    let start = Instant::now();
    crate::supervisor::start_memory_sampler();
    let blocks = ram::source_blocks(args.ram.iter().map(|s| (s.name.as_str(), s.path.as_path())))?;
    let total: u64 = blocks.iter().map(|b| b.length).sum();
    let device_state = match &args.device_state {
        Some(path) => {
            let bytes = std::fs::read(path)
                .with_context(|| format!("cannot read device state {}", path.display()))?;
            DeviceState::from_bytes(bytes.clone())
                .with_context(|| format!("device state {} is not valid", path.display()))?;
            Some(bytes)
        }
        None => None,
    };
    let log = match &args.dirty_log {
        Some(path) => Some(DirtyLog::open(path, total / PAGE_SIZE as u64)?),
        None => None,
    };
    let disk_logs = disk_logs(&args)?;
    for (i, d) in args.disk.iter().enumerate() {
        if args.disk[..i].iter().any(|o| o.name == d.name) {
            bail!(
                "two --disk options are both named {:?} (use PATH,name=DEV)",
                d.name
            );
        }
    }
    let mut guest = match &args.guest_control {
        Some(uri) => Some(Guest::connect(uri)?),
        None => None,
    };
    let show_progress = args.progress || (!args.no_progress && std::io::stderr().is_terminal());
    let mut sup = Supervisor::new()?;
    let mut report = Report::default();
    let result = drive(
        &args,
        &blocks,
        device_state,
        log.as_ref(),
        &disk_logs,
        guest.as_mut(),
        &mut sup,
        &mut report,
        start,
        show_progress,
    );
    if result.is_err() {
        // Nothing sent this time is known to have arrived.
        sup.kill_all();
        if let Some(log) = &log {
            log.mark_all();
        }
        for log in &disk_logs {
            log.mark_all();
        }
        if let Some(g) = guest.as_mut().filter(|g| g.is_stopped()) {
            if let Err(e) = g.cont() {
                eprintln!("ferry: cannot resume the guest: {e}");
            }
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    if let Some(path) = &args.stats_json {
        write_stats(path, &result, &report, total, seconds, &sup)?;
    }
    result?;
    let mb = report.bytes as f64 / 1e6;
    eprintln!(
        "ferry: sent {} pages ({} zero, {} raw, {} compressed) in {:.1} MB, {:.2} s, {:.0} MB/s{}",
        report.counts.pages(),
        report.counts.zero,
        report.counts.raw,
        report.counts.compressed,
        mb,
        seconds,
        mb / seconds.max(1e-9),
        match report.downtime {
            Some(d) => format!(
                ", {} rounds, downtime {} ms",
                report.rounds.len() + 1,
                d.as_millis()
            ),
            None => String::new(),
        }
    );
    match report.return_path {
        Some(ReturnPath::Ferry) if !args.disk.is_empty() => {
            eprintln!("ferry: destination verified: RAM and disk digests match")
        }
        Some(ReturnPath::Ferry) => eprintln!("ferry: destination verified: RAM digests match"),
        Some(ReturnPath::Silent) => eprintln!(
            "ferry: the destination has no return path (a QEMU -incoming?): completion is not verified"
        ),
        _ => eprintln!(
            "ferry: stream written to {}; a file has no return path, so nothing was verified",
            args.to
        ),
    }
    if guest.is_some() {
        eprintln!("ferry: the source guest stays stopped (the destination owns it now)");
    }
    Ok(())
}

fn write_stats(
    path: &std::path::Path,
    result: &anyhow::Result<()>,
    r: &Report,
    total: u64,
    seconds: f64,
    sup: &Supervisor,
) -> anyhow::Result<()> {
    let ok = result.is_ok();
    let mut v = json!({
        "status": if ok { "completed" } else { "failed" },
        "total-time": (seconds * 1000.0) as u64,
        "setup-time": r.setup.as_millis() as u64,
        "ram": stats::ram(total, r.bytes, if ok { 0 } else { total }, &r.counts, seconds),
        "compression": stats::compression(&r.counts),
        "iterations": r.rounds.len() + usize::from(ok),
        "rounds": r.rounds,
        "throttle-percent": r.throttle,
        "processes": stats::processes(sup.usage()),
    });
    if let Some(d) = r.downtime {
        v["downtime"] = json!(d.as_millis() as u64);
    }
    if let Some(e) = r.expected_downtime_ms {
        v["expected-downtime"] = json!(e as u64);
    }
    if let Some(rp) = r.return_path {
        v["return-path"] = serde_json::to_value(rp)?;
    }
    if let Err(e) = result {
        v["error-desc"] = json!(format!("{e:#}"));
    }
    stats::write(path, &v)
}

/// The live part of a run: rounds, convergence, switchover.
struct Rounds<'a> {
    args: &'a SendArgs,
    log: Option<&'a DirtyLog>,
    disk_logs: &'a [DirtyLog],
    guest: Option<&'a mut Guest>,
    scan: IpcSender<scanner::Command>,
    disk: Option<IpcSender<blockio::Command>>,
    start: Instant,
    round: u32,
    round_start: Instant,
    prev_bytes: u64,
    dirty_high: u32,
    stopped_at: Option<Instant>,
}

impl Rounds<'_> {
    fn send_round(&mut self, all: bool, last: bool) -> anyhow::Result<()> {
        self.round_start = Instant::now();
        self.scan
            .send(scanner::Command::Round {
                round: self.round,
                all,
                last,
            })
            .map_err(|e| anyhow!("cannot reach the scanner: {e:?}"))?;
        if let Some(d) = &self.disk {
            d.send(blockio::Command::Round {
                round: self.round,
                all,
                last,
            })
            .map_err(|e| anyhow!("cannot reach the blockio actor: {e:?}"))?;
        }
        Ok(())
    }

    /// A round was written: decide on the next one, or on the switchover.
    fn round_sent(&mut self, bytes: u64, pages: u64, report: &mut Report) -> anyhow::Result<()> {
        let (Some(log), Some(guest)) = (self.log, self.guest.as_deref_mut()) else {
            return Ok(()); // not live: round 0 was the last
        };
        let duration = self.round_start.elapsed().as_secs_f64().max(1e-6);
        let sent = bytes - self.prev_bytes;
        self.prev_bytes = bytes;
        let bandwidth = sent as f64 / duration;
        let dirty = log.count() * PAGE_SIZE as u64
            + self.disk_logs.iter().map(DirtyLog::count).sum::<u64>() * blockio::CHUNK;
        let expected_ms = if dirty == 0 {
            0.0
        } else {
            dirty as f64 / bandwidth.max(1.0) * 1000.0
        };
        // Also proves the guest is still there.
        guest.query_status()?;
        report.rounds.push(RoundStats {
            round: self.round,
            end: self.start.elapsed().as_secs_f64(),
            duration,
            bytes: sent,
            pages,
            dirty_bytes: dirty,
            dirty_rate: dirty as f64 / duration,
            bandwidth,
            remaining: dirty,
            expected_downtime_ms: expected_ms,
            throttle: report.throttle,
        });
        tracing::info!(round = self.round, sent, dirty, expected_ms, "round done");
        self.round += 1;
        if expected_ms <= self.args.downtime_limit as f64 {
            report.expected_downtime_ms = Some(expected_ms);
            guest.stop()?;
            self.stopped_at = Some(Instant::now());
            return self.send_round(false, true);
        }
        if self.round >= self.args.max_iterations {
            bail!(
                "did not converge in {} rounds: {:.0} ms of dirty memory left against a {} ms limit",
                self.round,
                expected_ms,
                self.args.downtime_limit
            );
        }
        if self.args.timeout > 0 && self.start.elapsed().as_secs() >= self.args.timeout {
            bail!(
                "did not converge within {} s: {:.0} ms of dirty memory left against a {} ms limit",
                self.args.timeout,
                expected_ms,
                self.args.downtime_limit
            );
        }
        if self.args.auto_converge {
            // QEMU's rule: the guest dirtied more than half of what went out,
            // two rounds in a row.
            if dirty * 2 > sent {
                self.dirty_high += 1;
            } else {
                self.dirty_high = 0;
            }
            if self.dirty_high >= 2 {
                self.dirty_high = 0;
                report.throttle = if report.throttle == 0 {
                    self.args.throttle_initial
                } else {
                    (report.throttle + self.args.throttle_increment).min(99)
                };
                guest.set_throttle(report.throttle)?;
                tracing::info!(throttle = report.throttle, "auto-converge");
            }
        }
        self.send_round(false, false)
    }
}

/// Spawns the actors and runs the migration.
#[allow(clippy::too_many_arguments)]
fn drive(
    args: &SendArgs,
    blocks: &[BlockFile],
    device_state: Option<Vec<u8>>,
    log: Option<&DirtyLog>,
    disk_logs: &[DirtyLog],
    guest: Option<&mut Guest>,
    sup: &mut Supervisor,
    report: &mut Report,
    start: Instant,
    show_progress: bool,
) -> anyhow::Result<()> {
    let tls = tls_init(args)?;
    let (scan_tx, scan_rx) = ipc::channel::<scanner::Command>()?;
    let (work_tx, work_rx) = ipc::channel::<Work>()?;
    let (chunk_tx, chunk_rx) = ipc::channel::<Chunk>()?;
    let (credit_tx, credit_rx) = ipc::channel::<u32>()?;
    let (scan_credit_tx, scan_credit_rx) = ipc::channel::<u32>()?;
    let (_cmd_tx, cmd_rx) = ipc::channel::<writer::Command>()?;
    let has_disks = !args.disk.is_empty();
    let (disk_chunk_tx, disk_chunk_rx) = ipc::channel::<DiskChunk>()?;
    let (disk_credit_tx, disk_credit_rx) = ipc::channel::<u32>()?;
    let (disk_cmd_tx, disk_cmd_rx) = ipc::channel::<blockio::Command>()?;
    // Shared chunk buffers between the blockio actor and the writer, removed
    // when the run ends.
    let slots = if has_disks {
        let dir = ["/dev/shm".into(), std::env::temp_dir()]
            .into_iter()
            .find(|d: &std::path::PathBuf| d.is_dir())
            .unwrap_or_else(std::env::temp_dir);
        let f = tempfile::Builder::new()
            .prefix("ferry-disk-slots-")
            .tempfile_in(dir)
            .context("cannot create the disk chunk buffers")?;
        f.as_file()
            .set_len(u64::from(DISK_WINDOW) * blockio::CHUNK)
            .context("cannot size the disk chunk buffers")?;
        Some(f)
    } else {
        None
    };
    let slots_path = slots.as_ref().map(|f| f.path().to_owned());
    sup.spawn(
        ActorKind::Writer,
        writer::Init {
            to: args.to.to_string(),
            blocks: blocks.to_vec(),
            device_state,
            machine: args.machine.clone(),
            rate: args.max_bandwidth,
            stall_timeout: super::stall(args.stall_timeout),
            tls: tls.clone(),
            integrity: args.integrity,
            chunks: chunk_rx,
            credits: credit_tx,
            commands: cmd_rx,
            disks: args.disk.iter().map(|d| d.name.clone()).collect(),
            disk_chunks: has_disks.then_some(disk_chunk_rx),
            disk_credits: has_disks.then_some(disk_credit_tx),
            disk_slots: slots_path.clone().map(|p| (p, DISK_WINDOW)),
        },
    )?;
    if has_disks {
        sup.spawn(
            ActorKind::Blockio,
            blockio::Init {
                disks: args.disk.iter().map(blockio::DiskInit::from_spec).collect(),
                mailbox: disk_cmd_rx,
                chunks: disk_chunk_tx,
                credits: disk_credit_rx,
                window: DISK_WINDOW,
                slots: slots_path.clone().unwrap_or_default(),
            },
        )?;
    }
    sup.spawn(
        ActorKind::Compress,
        compress::Init {
            blocks: blocks.to_vec(),
            level: args.compress.then_some(args.compress_level),
            workers: args.compress_workers,
            work: work_rx,
            scan_credits: scan_credit_tx,
            chunks: chunk_tx,
            credits: credit_rx,
            window: CHUNK_WINDOW,
        },
    )?;
    sup.spawn(
        ActorKind::Scanner,
        scanner::Init {
            blocks: blocks.to_vec(),
            mailbox: scan_rx,
            work: work_tx,
            credits: scan_credit_rx,
            window: BATCH_WINDOW,
            dirty_log: args.dirty_log.clone(),
        },
    )?;
    report.setup = start.elapsed();
    tracing::info!(pids = ?sup.pids(), "actors started");

    let live = log.is_some();
    let mut rounds = Rounds {
        args,
        log,
        disk_logs,
        guest,
        scan: scan_tx,
        disk: has_disks.then_some(disk_cmd_tx),
        start,
        round: 0,
        round_start: Instant::now(),
        prev_bytes: 0,
        dirty_high: 0,
        stopped_at: None,
    };
    rounds.send_round(true, !live)?;

    let total: u64 = blocks.iter().map(|b| b.length).sum();
    let bar = progress_bar(show_progress, total);
    let mut scanned = 0u64;
    let mut source_disks: Option<Vec<BlockDigest>> = None;
    let mut source_ram: Option<Vec<String>> = None;
    let mut digesting = false;
    let mut ack_ram: Option<Vec<BlockDigest>> = None;
    let mut ack_disks: Option<Vec<BlockDigest>> = None;
    loop {
        let Some(ev) = sup.next_event(Duration::from_millis(100))? else {
            if args.timeout > 0
                && rounds.stopped_at.is_none()
                && start.elapsed().as_secs() >= args.timeout
            {
                bail!("did not converge within {} s", args.timeout);
            }
            continue;
        };
        match ev.event {
            Event::Progress { bytes, counts } => {
                report.bytes = bytes;
                report.counts = counts;
                bar.set_position((counts.pages() * PAGE_SIZE as u64).min(total));
                bar.set_message(format!(
                    "round {}, {:.0} MB sent, {} zero / {} raw / {} compressed",
                    rounds.round,
                    bytes as f64 / 1e6,
                    counts.zero,
                    counts.raw,
                    counts.compressed
                ));
            }
            Event::RoundScanned { pages, .. } => scanned = pages,
            Event::DiskDigests { disks } => source_disks = Some(disks),
            Event::RamDigests { digests } => source_ram = Some(digests),
            Event::RoundSent { bytes, .. } if rounds.stopped_at.is_none() => {
                report.bytes = bytes;
                rounds.round_sent(bytes, scanned, report)?;
            }
            Event::PeerLoaded => {
                if let Some(t) = rounds.stopped_at {
                    report.downtime = Some(t.elapsed());
                }
                // A ferry destination has the whole stream and will send its
                // digests: take ours while it computes them.
                rounds
                    .scan
                    .send(scanner::Command::Digest)
                    .map_err(|e| anyhow!("cannot reach the scanner: {e:?}"))?;
                digesting = true;
            }
            Event::Finished {
                bytes,
                counts,
                ack,
                return_path,
            } => {
                if let (Some(t), None) = (rounds.stopped_at, report.downtime) {
                    report.downtime = Some(t.elapsed());
                }
                if !digesting {
                    // Without an acknowledgement to check the scanner just
                    // exits (an acknowledgement without a hello is odd, but
                    // is checked all the same).
                    let cmd = if ack.is_some() {
                        scanner::Command::Digest
                    } else {
                        scanner::Command::Stop
                    };
                    rounds
                        .scan
                        .send(cmd)
                        .map_err(|e| anyhow!("cannot reach the scanner: {e:?}"))?;
                }
                if let Some(ack) = ack {
                    ack_ram = Some(ack.digests);
                    if has_disks {
                        ack_disks = Some(ack.disks);
                    }
                }
                if let Some(d) = &rounds.disk {
                    // Digest the source disks only for a destination that
                    // reported its own.
                    let cmd = if ack_disks.is_some() {
                        blockio::Command::Digest
                    } else {
                        blockio::Command::Stop
                    };
                    d.send(cmd)
                        .map_err(|e| anyhow!("cannot reach the blockio actor: {e:?}"))?;
                }
                report.bytes = bytes;
                report.counts = counts;
                report.return_path = Some(return_path);
                break;
            }
            _ => {}
        }
    }
    bar.finish_and_clear();
    // The scanner digests the source RAM once the destination has the whole
    // stream, the blockio actor the source disks after the last pass: both
    // while the destination computes its own.
    let deadline = Instant::now() + Duration::from_secs(300);
    while (ack_ram.is_some() && source_ram.is_none())
        || (ack_disks.is_some() && source_disks.is_none())
    {
        if Instant::now() > deadline {
            bail!("the source's digests did not arrive within 300 s");
        }
        if let Some(ev) = sup.next_event(Duration::from_millis(100))? {
            match ev.event {
                Event::RamDigests { digests } => source_ram = Some(digests),
                Event::DiskDigests { disks } => source_disks = Some(disks),
                _ => {}
            }
        }
    }
    if let Some(theirs) = ack_ram {
        verify(blocks, source_ram.as_deref().unwrap_or_default(), &theirs)?;
    }
    if let Some(theirs) = ack_disks {
        verify_disks(source_disks.as_deref().unwrap_or_default(), &theirs)?;
    }
    sup.wait_all(Duration::from_secs(10))?;
    if let Some(g) = rounds.guest {
        g.migrated()?;
    }
    Ok(())
}

/// The writer's TLS settings, checked: the files load, the URI is a socket.
fn tls_init(args: &SendArgs) -> anyhow::Result<Option<writer::TlsInit>> {
    let Some(files) = args.tls.files()? else {
        return Ok(None);
    };
    if matches!(args.to, Uri::File(_)) {
        bail!(
            "--tls-cert/--tls-key/--tls-ca work only with tcp: and unix:, not {}",
            args.to
        );
    }
    let init = writer::TlsInit {
        files,
        hostname: args.tls_hostname.clone(),
    };
    // Fail on unreadable files before spawning anything.
    init.client().context("cannot set up TLS")?;
    Ok(Some(init))
}

fn progress_bar(show: bool, total: u64) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta} {msg}",
        )
        .expect("template is valid")
        .progress_chars("=> "),
    );
    bar
}

/// Compares the destination's disk digests with the source's.
fn verify_disks(ours: &[BlockDigest], theirs: &[BlockDigest]) -> anyhow::Result<()> {
    for o in ours {
        match theirs.iter().find(|d| d.name == o.name) {
            None => bail!("the destination did not report disk {:?}", o.name),
            Some(d) if d.length != o.length => bail!(
                "disk {:?} is {} bytes on the destination but {} here",
                o.name,
                d.length,
                o.length
            ),
            Some(d) if d.xxh3 != o.xxh3 => bail!(
                "disk {:?} differs on the destination (digest {} there, {} here)",
                o.name,
                d.xxh3,
                o.xxh3
            ),
            Some(_) => {}
        }
    }
    Ok(())
}

/// Compares the destination's digests with the source RAM's (`ours`, one per block).
fn verify(blocks: &[BlockFile], ours: &[String], theirs: &[BlockDigest]) -> anyhow::Result<()> {
    if ours.len() != blocks.len() {
        bail!(
            "the scanner digested {} RAM blocks, not {}",
            ours.len(),
            blocks.len()
        );
    }
    for (b, ours) in blocks.iter().zip(ours) {
        match theirs.iter().find(|d| d.name == b.name) {
            None => bail!("the destination did not report block {:?}", b.name),
            Some(d) if d.xxh3 != *ours || d.length != b.length => bail!(
                "RAM block {:?} differs on the destination (digest {} there, {} here)",
                b.name,
                d.xxh3,
                ours
            ),
            Some(_) => {}
        }
    }
    Ok(())
}
