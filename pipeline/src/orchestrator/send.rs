//! `ferry send`: spawns the scanner, compress and writer processes, drives
//! the rounds of pre-copy, switches over when the rest fits the downtime
//! limit, and verifies the destination's digests.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::supervisor::messages::{ActorKind, Chunk, DiskChunk, Event, PageCounts, Work};
use anyhow::{anyhow, bail, Context};
use ferry_proto::return_path::{Ack, BlockDigest, ReturnPath};
use ferry_proto::stream::device_state::DeviceState;
use ferry_proto::stream::PAGE_SIZE;
use indicatif::{ProgressBar, ProgressStyle};
use ipc_channel::ipc::{self, IpcSender};
use qapi::qmp::MigrationStatus;
use serde::Serialize;
use serde_json::json;

use super::guest::Guest;
use super::{stats, SendArgs};
use crate::actors::{blockio, compress, scanner, writer};
use crate::channel::uri::Uri;
use crate::qmp::{self, Control, Parameters, Side};
use crate::supervisor::{Launched, Supervisor};
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
    /// RAM pages the guest dirtied while the round ran: the pages marked in
    /// the dirty log when the round ended (the scanner took the log as the
    /// round began).
    pub dirty_pages: u64,
    /// Bytes the guest dirtied while the round ran: `dirty_pages` and the
    /// disk chunks marked in the disks' logs.
    pub dirty_bytes: u64,
    /// The guest's RAM dirty rate over the round, bytes per second: from
    /// `dirty_pages` and the round's duration, not from what was sent.
    pub dirty_rate: f64,
    /// Stream bandwidth over the round, bytes per second.
    pub bandwidth: f64,
    /// Dirty bytes (RAM and disks) left when the round ended, counted in the
    /// logs again as the switchover is decided.
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
    /// Bytes on each multifd channel (part of `bytes`).
    channel_bytes: Vec<u64>,
    counts: PageCounts,
    return_path: Option<ReturnPath>,
    rounds: Vec<RoundStats>,
    downtime: Option<Duration>,
    throttle: u32,
}

/// The source as ferry found it: RAM blocks, device state, dirty logs and
/// the guest's control socket.
struct Source {
    blocks: Vec<BlockFile>,
    total: u64,
    device_state: Option<Vec<u8>>,
    log: Option<DirtyLog>,
    disk_logs: Vec<DirtyLog>,
    guest: Option<Guest>,
}

impl Source {
    /// Opens everything `ferry send` names and checks it before any actor starts.
    fn open(args: &SendArgs) -> anyhow::Result<Self> {
        let blocks =
            ram::source_blocks(args.ram.iter().map(|s| (s.name.as_str(), s.path.as_path())))?;
        let total: u64 = blocks.iter().map(|b| b.length).sum();
        let device_state = match &args.device_state {
            Some(path) => {
                let bytes = std::fs::read(path)
                    .with_context(|| format!("cannot read device state {}", path.display()))?;
                // A VMM that failed to write its state must not go unnoticed.
                if bytes.is_empty() {
                    bail!("device state {} is empty", path.display());
                }
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
        let disk_logs = disk_logs(args)?;
        for (i, d) in args.disk.iter().enumerate() {
            if args.disk[..i].iter().any(|o| o.name == d.name) {
                bail!(
                    "two --disk options are both named {:?} (use PATH,name=DEV)",
                    d.name
                );
            }
        }
        let guest = match &args.guest_control {
            Some(uri) => Some(Guest::connect(uri)?),
            None => None,
        };
        Ok(Self {
            blocks,
            total,
            device_state,
            log,
            disk_logs,
            guest,
        })
    }

    /// After a failure nothing sent this time is known to have arrived:
    /// every page and chunk goes again, and a guest ferry stopped runs again.
    fn recover(&mut self) {
        if let Some(log) = &self.log {
            log.mark_all();
        }
        for log in &self.disk_logs {
            log.mark_all();
        }
        if let Some(g) = self.guest.as_mut().filter(|g| g.is_stopped()) {
            if let Err(e) = g.cont() {
                eprintln!("ferry: cannot resume the guest: {e}");
            }
        }
    }

    /// Pages marked in the RAM dirty log now.
    fn ram_dirty_pages(&self) -> u64 {
        self.log.as_ref().map_or(0, DirtyLog::count)
    }

    /// Dirty bytes in the disks' logs now.
    fn disk_dirty_bytes(&self) -> u64 {
        self.disk_logs.iter().map(DirtyLog::count).sum::<u64>() * blockio::CHUNK
    }

    /// RAM bytes not on the destination, measured: the pages marked in the
    /// dirty log of a live migration (all of them after a failure), or for a
    /// single pass the RAM that no page record covered.
    fn ram_remaining(&self, ok: bool, counts: &PageCounts) -> u64 {
        match (&self.log, ok) {
            (Some(_), _) => self.ram_dirty_pages() * PAGE_SIZE as u64,
            (None, true) => self.total.saturating_sub(counts.pages() * PAGE_SIZE as u64),
            (None, false) => self.total,
        }
    }
}

/// Runs `ferry send`.
pub fn run(args: SendArgs) -> anyhow::Result<()> {
    if args.return_path && matches!(args.to, Uri::File(_)) {
        bail!("--return-path needs a tcp: or unix: destination; a file has nobody to answer");
    }
    check_multifd(&args)?;
    let start = Instant::now();
    crate::supervisor::start_memory_sampler();
    let mut src = Source::open(&args)?;
    let control = Control::new(
        Side::Source,
        stats::Figures::new(start, src.total),
        parameters(&args),
    );
    if src.guest.is_some() {
        control.set_guest_stopped(false);
    }
    let _server = super::qmp_server(args.qmp.as_deref(), &control)?;
    qmp::signals::install(control.clone()).context("cannot handle SIGINT/SIGTERM")?;
    let show_progress = args.progress || (!args.no_progress && std::io::stderr().is_terminal());
    let mut sup = Supervisor::new()?;
    let mut report = Report::default();
    let result = Migration::new(&args, &mut src, &mut sup, &mut report, start, &control)
        .and_then(|m| m.run(show_progress));
    let result = control.explain(result);
    if result.is_err() {
        sup.kill_all();
        src.recover();
        if let Some(g) = &src.guest {
            control.set_guest_stopped(g.is_stopped());
        }
    }
    control.set_pids(Vec::new());
    {
        let mut f = control.figures();
        f.remaining = src.ram_remaining(result.is_ok(), &f.counts);
    }
    control.finish(&result);
    control.drain(std::time::Duration::from_secs(1));
    if let Some(path) = &args.stats_json {
        write_stats(path, &result, &report, &control.figures(), &sup)?;
    }
    result?;
    let seconds = control.figures().total_time().as_secs_f64();
    summary(&args, &report, seconds, src.guest.is_some());
    Ok(())
}

/// The runtime parameters as the command line sets them.
fn parameters(args: &SendArgs) -> Parameters {
    let level = |l: i32| u8::try_from(l).unwrap_or(0);
    Parameters {
        max_bandwidth: args.max_bandwidth,
        downtime_limit: args.downtime_limit,
        compress_level: level(args.compress_level as i32),
        multifd_zlib_level: level(args.multifd.multifd_zlib_level),
        multifd_zstd_level: level(args.multifd.multifd_zstd_level),
        throttle_trigger_threshold: Parameters::default().throttle_trigger_threshold,
        cpu_throttle_initial: level(args.throttle_initial as i32),
        cpu_throttle_increment: level(args.throttle_increment as i32),
    }
}

/// The compressors this run uses, by the parameter that sets their level.
fn compressor(args: &SendArgs) -> Option<qmp::Compressor> {
    use super::MultifdCompression as M;
    use ferry_proto::multifd::Compression as C;
    if args.multifd.multifd_channels > 0 {
        return match args.multifd.multifd_compression {
            M::Method(C::None) => None,
            M::Method(C::Zlib) => Some(qmp::Compressor::MultifdZlib),
            M::Method(C::Zstd) | M::Auto => Some(qmp::Compressor::MultifdZstd),
        };
    }
    args.compress.then_some(qmp::Compressor::Legacy)
}

/// multifd goes over plain tcp: or unix: connections, RAM only, without
/// the legacy COMPRESS_PAGE records or ferry's integrity seal.
fn check_multifd(args: &SendArgs) -> anyhow::Result<()> {
    if args.multifd.multifd_channels == 0 {
        // Given explicitly, 0 would silently drop the compression asked for.
        if args.multifd.multifd_compression
            != super::MultifdCompression::Method(ferry_proto::multifd::Compression::None)
        {
            bail!(
                "--multifd-compression {} needs multifd channels: give --multifd-channels N \
                 with N at least 1 (0 means no multifd)",
                args.multifd.multifd_compression.name()
            );
        }
        return Ok(());
    }
    let clash = if matches!(args.to, Uri::File(_)) {
        Some(format!("a file: destination ({})", args.to))
    } else if args.tls.tls_cert.is_some() {
        Some("TLS (--tls-cert)".to_owned())
    } else if args.compress {
        Some("--compress (use --multifd-compression)".to_owned())
    } else if args.integrity {
        Some("--integrity".to_owned())
    } else if !args.disk.is_empty() {
        Some("--disk (QEMU 9.1 and later have no block migration)".to_owned())
    } else {
        None
    };
    if let Some(what) = clash {
        bail!("--multifd-channels does not work with {what}");
    }
    // QEMU fails at the first raw packet on a compressed channel.
    if args.return_path && args.multifd.multifd_compression == super::MultifdCompression::Auto {
        bail!(
            "--multifd-compression auto is for ferry receivers: a QEMU destination \
             (--return-path) refuses its raw packets on zstd channels; use none, zlib or zstd"
        );
    }
    Ok(())
}

/// The lines a successful run prints.
fn summary(args: &SendArgs, report: &Report, seconds: f64, live: bool) {
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
    if !report.channel_bytes.is_empty() {
        eprintln!(
            "ferry: {} multifd channels carried {:.1} MB of it ({})",
            report.channel_bytes.len(),
            report.channel_bytes.iter().sum::<u64>() as f64 / 1e6,
            args.multifd.multifd_compression.name()
        );
    }
    match report.return_path {
        Some(ReturnPath::Ferry) if !args.disk.is_empty() => {
            eprintln!("ferry: destination verified: RAM and disk digests match")
        }
        Some(ReturnPath::Ferry) => eprintln!("ferry: destination verified: RAM digests match"),
        Some(ReturnPath::Qemu) => {
            eprintln!("ferry: destination verified: QEMU loaded the whole stream (SHUT 0)")
        }
        Some(ReturnPath::Silent) => eprintln!(
            "ferry: completed-unverified: the destination has no return path (a QEMU -incoming? give --return-path): completion is not verified"
        ),
        _ => eprintln!(
            "ferry: stream written to {}; a file has no return path, so nothing was verified",
            args.to
        ),
    }
    if live {
        eprintln!("ferry: the source guest stays stopped (the destination owns it now)");
    }
}

/// `--stats-json`: query-migrate's final answer, and ferry's rounds, throttle
/// and processes.
fn write_stats(
    path: &std::path::Path,
    result: &anyhow::Result<()>,
    r: &Report,
    f: &stats::Figures,
    sup: &Supervisor,
) -> anyhow::Result<()> {
    let mut v = f.to_json();
    if let (true, Some(ReturnPath::Silent)) = (result.is_ok(), r.return_path) {
        v["status"] = json!("completed-unverified");
    }
    v["iterations"] = json!(r.rounds.len() + usize::from(result.is_ok()));
    v["rounds"] = serde_json::to_value(&r.rounds)?;
    v["throttle-percent"] = json!(r.throttle);
    v["rate-changes"] = serde_json::to_value(&f.rate_changes)?;
    v["processes"] = stats::processes(sup.usage());
    if let Err(e) = result {
        // query-migrate's name for why the migration failed.
        v["error-desc"] = json!(format!("{e:#}"));
    }
    if let Some(rp) = r.return_path {
        v["return-path"] = serde_json::to_value(rp)?;
    }
    stats::write(path, &v)
}

/// The orchestrator's ends of the actors' channels, and what must live as
/// long as they run.
struct Actors {
    scan: IpcSender<scanner::Command>,
    disk: Option<IpcSender<blockio::Command>>,
    /// The writer's command channel (max-bandwidth from QMP).
    writer: IpcSender<writer::Command>,
    /// The compress actor's command channel (levels from QMP).
    compress: IpcSender<qmp::levels::Command>,
    /// The disk chunk buffers shared by the blockio actor and the writer,
    /// removed when the run ends.
    _slots: Option<tempfile::NamedTempFile>,
}

/// The sender's actor processes, launched all at once (each takes
/// milliseconds to load) before any is handed its Init.
#[allow(clippy::type_complexity)]
fn launch(
    sup: &mut Supervisor,
    disks: bool,
) -> anyhow::Result<(
    Launched<writer::Init>,
    Option<Launched<blockio::Init>>,
    Launched<compress::Init>,
    Launched<scanner::Init>,
)> {
    let writer = sup.launch(ActorKind::Writer)?;
    let blockio = disks.then(|| sup.launch(ActorKind::Blockio)).transpose()?;
    let compress = sup.launch(ActorKind::Compress)?;
    Ok((writer, blockio, compress, sup.launch(ActorKind::Scanner)?))
}

impl Actors {
    /// Starts the writer, the blockio actor (with disks), the compress stage
    /// and the scanner, and hands them their Inits in that order: each one's
    /// consumer runs before it.
    fn spawn(
        args: &SendArgs,
        src: &Source,
        sup: &mut Supervisor,
        params: &Parameters,
    ) -> anyhow::Result<Self> {
        let tls = tls_init(args)?;
        let (scan_tx, scan_rx) = ipc::channel::<scanner::Command>()?;
        let (work_tx, work_rx) = ipc::channel::<Work>()?;
        let (chunk_tx, chunk_rx) = ipc::channel::<Chunk>()?;
        let (credit_tx, credit_rx) = ipc::channel::<u32>()?;
        let (scan_credit_tx, scan_credit_rx) = ipc::channel::<u32>()?;
        let (cmd_tx, cmd_rx) = ipc::channel::<writer::Command>()?;
        let has_disks = !args.disk.is_empty();
        let (disk_chunk_tx, disk_chunk_rx) = ipc::channel::<DiskChunk>()?;
        let (disk_credit_tx, disk_credit_rx) = ipc::channel::<u32>()?;
        let (disk_cmd_tx, disk_cmd_rx) = ipc::channel::<blockio::Command>()?;
        let slots = has_disks.then(disk_slots).transpose()?;
        let (writer, blockio, compress, scanner) = launch(sup, has_disks)?;
        sup.bootstrap(
            writer,
            writer::Init {
                to: args.to.to_string(),
                blocks: src.blocks.clone(),
                device_state: src.device_state.clone(),
                machine: args.machine.clone(),
                rate: params.max_bandwidth,
                stall_timeout: super::stall(args.stall_timeout),
                tls,
                integrity: args.integrity,
                return_path: args.return_path,
                chunks: chunk_rx,
                credits: credit_tx,
                commands: cmd_rx,
                disks: args.disk.iter().map(|d| d.name.clone()).collect(),
                disk_chunks: has_disks.then_some(disk_chunk_rx),
                disk_credits: has_disks.then_some(disk_credit_tx),
                disk_slots: slots.as_ref().map(|f| (f.path().to_owned(), DISK_WINDOW)),
                multifd: args.multifd.settings(),
            },
        )?;
        if let (Some(slots), Some(blockio)) = (&slots, blockio) {
            sup.bootstrap(
                blockio,
                blockio::Init {
                    disks: args.disk.iter().map(blockio::DiskInit::from_spec).collect(),
                    mailbox: disk_cmd_rx,
                    chunks: disk_chunk_tx,
                    credits: disk_credit_rx,
                    window: DISK_WINDOW,
                    slots: slots.path().to_owned(),
                },
            )?;
        }
        let (level_tx, commands) = ipc::channel::<qmp::levels::Command>()?;
        let init = compress::Init {
            blocks: src.blocks.clone(),
            level: args.compress.then_some(args.compress_level),
            workers: args.compress_workers,
            multifd: args.multifd.settings(),
            work: work_rx,
            scan_credits: scan_credit_tx,
            chunks: chunk_tx,
            credits: credit_rx,
            window: CHUNK_WINDOW,
            commands,
        };
        sup.bootstrap(compress, init)?;
        sup.bootstrap(
            scanner,
            scanner::Init {
                blocks: src.blocks.clone(),
                mailbox: scan_rx,
                work: work_tx,
                credits: scan_credit_rx,
                window: BATCH_WINDOW,
                dirty_log: args.dirty_log.clone(),
            },
        )?;
        Ok(Self {
            scan: scan_tx,
            disk: has_disks.then_some(disk_cmd_tx),
            writer: cmd_tx,
            compress: level_tx,
            _slots: slots,
        })
    }

    fn scanner(&self, cmd: scanner::Command) -> anyhow::Result<()> {
        self.scan
            .send(cmd)
            .map_err(|e| anyhow!("cannot reach the scanner: {e:?}"))
    }

    /// Sends `cmd` to the blockio actor, if there are disks.
    fn blockio(&self, cmd: blockio::Command) -> anyhow::Result<()> {
        match &self.disk {
            Some(d) => d
                .send(cmd)
                .map_err(|e| anyhow!("cannot reach the blockio actor: {e:?}")),
            None => Ok(()),
        }
    }
}

/// The shared buffers for the disk chunks in flight, in memory if /dev/shm is there.
fn disk_slots() -> anyhow::Result<tempfile::NamedTempFile> {
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
    Ok(f)
}

/// Digests to compare once the stream is complete: the destination's (from
/// its Ack) and the source's (from the scanner and the blockio actor).
#[derive(Debug, Default)]
struct Digests {
    source_ram: Option<Vec<String>>,
    source_disks: Option<Vec<BlockDigest>>,
    ack_ram: Option<Vec<BlockDigest>>,
    ack_disks: Option<Vec<BlockDigest>>,
    /// The scanner was asked for the source's RAM digests.
    digesting: bool,
}

impl Digests {
    /// Takes a digest event; false for any other event.
    fn take(&mut self, ev: &mut Event) -> bool {
        match ev {
            Event::RamDigests { digests } => self.source_ram = Some(std::mem::take(digests)),
            Event::DiskDigests { disks } => self.source_disks = Some(std::mem::take(disks)),
            _ => return false,
        }
        true
    }

    /// Whether a digest the destination's answer calls for has yet to come.
    fn waiting(&self) -> bool {
        (self.ack_ram.is_some() && self.source_ram.is_none())
            || (self.ack_disks.is_some() && self.source_disks.is_none())
    }
}

/// One migration in progress: the actors, the rounds, the switchover.
struct Migration<'a> {
    args: &'a SendArgs,
    src: &'a mut Source,
    sup: &'a mut Supervisor,
    report: &'a mut Report,
    actors: Actors,
    start: Instant,
    round: u32,
    round_start: Instant,
    /// Stream bytes when the previous round ended.
    prev_bytes: u64,
    /// Pages the scanner batched in the current round.
    scanned: u64,
    /// Pages sent before the current round began.
    round_pages_start: u64,
    /// Rounds in a row in which the guest outran the link (auto-converge).
    dirty_high: u32,
    /// When `stop` was sent to the guest: the downtime runs from here.
    stopped_at: Option<Instant>,
    digests: Digests,
    /// The figures, the parameters and the cancel request, shared with QMP.
    control: Arc<Control>,
}

impl<'a> Migration<'a> {
    /// Spawns the actors.
    fn new(
        args: &'a SendArgs,
        src: &'a mut Source,
        sup: &'a mut Supervisor,
        report: &'a mut Report,
        start: Instant,
        control: &Arc<Control>,
    ) -> anyhow::Result<Self> {
        control.check_cancel()?;
        let actors = Actors::spawn(args, src, sup, &control.params())?;
        control.attach_writer(actors.writer.clone());
        if let Some(which) = compressor(args) {
            control.attach_compress(actors.compress.clone(), which);
        }
        control.set_pids(sup.pids().into_iter().map(|(_, pid)| pid).collect());
        tracing::info!(pids = ?sup.pids(), "actors started");
        Ok(Self {
            args,
            src,
            sup,
            report,
            actors,
            start,
            round: 0,
            round_start: Instant::now(),
            prev_bytes: 0,
            scanned: 0,
            round_pages_start: 0,
            dirty_high: 0,
            stopped_at: None,
            digests: Digests::default(),
            control: control.clone(),
        })
    }

    /// Sends every page, then the rounds until the switchover, then checks
    /// the destination's digests.
    fn run(mut self, show_progress: bool) -> anyhow::Result<()> {
        let live = self.src.log.is_some();
        self.send_round(true, !live)?;
        let bar = progress_bar(show_progress, self.src.total);
        while !self.next_event(&bar)? {}
        bar.finish_and_clear();
        self.control.check_cancel()?;
        self.verify()?;
        self.sup.wait_all(Duration::from_secs(10))?;
        if let Some(g) = self.src.guest.as_mut() {
            g.migrated()?;
        }
        Ok(())
    }

    fn send_round(&mut self, all: bool, last: bool) -> anyhow::Result<()> {
        self.round_start = Instant::now();
        self.round_pages_start = self.report.counts.pages();
        self.scanned = 0;
        self.control.pass();
        let round = self.round;
        self.actors
            .scanner(scanner::Command::Round { round, all, last })?;
        self.actors
            .blockio(blockio::Command::Round { round, all, last })
    }

    /// Waits for one event and acts on it; true once the stream is finished.
    fn next_event(&mut self, bar: &ProgressBar) -> anyhow::Result<bool> {
        self.control.check_cancel()?;
        let Some(mut ev) = self.sup.next_event(Duration::from_millis(100))? else {
            if self.args.timeout > 0
                && self.stopped_at.is_none()
                && self.start.elapsed().as_secs() >= self.args.timeout
            {
                bail!("did not converge within {} s", self.args.timeout);
            }
            return Ok(false);
        };
        if self.digests.take(&mut ev.event) {
            return Ok(false);
        }
        if ev.actor == ActorKind::Writer {
            self.connected();
        }
        match ev.event {
            Event::Progress { bytes, counts } => self.progress(bar, bytes, counts),
            Event::RoundScanned { pages, .. } => self.scanned = pages,
            Event::RateChange(c) => self.control.figures().rate_changes.push(c),
            Event::RoundSent { bytes, .. } if self.stopped_at.is_none() => {
                self.report.bytes = bytes;
                self.round_sent(bytes)?;
            }
            Event::PeerLoaded => self.peer_loaded()?,
            Event::Finished {
                bytes,
                channel_bytes,
                counts,
                ack,
                return_path,
            } => {
                self.finished(ack)?;
                self.report.bytes = bytes;
                self.report.channel_bytes = channel_bytes.clone();
                self.report.counts = counts;
                let mut f = self.control.figures();
                f.progress(bytes, counts);
                f.channel_bytes = channel_bytes;
                self.report.return_path = Some(return_path);
                return Ok(true);
            }
            _ => {}
        }
        Ok(false)
    }

    /// The writer's first word: it is connected and streaming, setup is over.
    fn connected(&mut self) {
        let mut f = self.control.figures();
        if f.status != MigrationStatus::setup {
            return;
        }
        f.setup_time = Some(self.start.elapsed());
        drop(f);
        self.control.set_status(MigrationStatus::active);
    }

    /// The writer's byte and page counters, into the figures that
    /// query-migrate, the bar and `--stats-json` read.
    fn progress(&mut self, bar: &ProgressBar, bytes: u64, counts: PageCounts) {
        self.report.bytes = bytes;
        self.report.counts = counts;
        let remaining = self.remaining(&counts);
        let mut f = self.control.figures();
        f.progress(bytes, counts);
        f.remaining = remaining;
        show(bar, &f);
    }

    /// RAM bytes not on the destination: what the dirty log marks, and what
    /// the current round has yet to send of its pages (all of RAM in round
    /// 0, as QEMU counts it).
    fn remaining(&self, counts: &PageCounts) -> u64 {
        let round = if self.round == 0 {
            self.src.total / PAGE_SIZE as u64
        } else {
            self.scanned
        };
        let sent = counts.pages().saturating_sub(self.round_pages_start);
        let dirty = match self.src.log {
            Some(_) => self.src.ram_dirty_pages() * PAGE_SIZE as u64,
            None => 0,
        };
        dirty + round.saturating_sub(sent) * PAGE_SIZE as u64
    }

    /// A ferry destination has the whole stream and will send its digests:
    /// the downtime ends, and the scanner takes ours while it computes them.
    fn peer_loaded(&mut self) -> anyhow::Result<()> {
        if let Some(t) = self.stopped_at {
            self.report.downtime = Some(t.elapsed());
            self.control.figures().downtime = self.report.downtime;
        }
        self.actors.scanner(scanner::Command::Digest)?;
        self.digests.digesting = true;
        Ok(())
    }

    /// The writer is done: the scanner and the blockio actor digest the
    /// source if the destination sent digests to compare, or else stop.
    fn finished(&mut self, ack: Option<Ack>) -> anyhow::Result<()> {
        if let (Some(t), None) = (self.stopped_at, self.report.downtime) {
            self.report.downtime = Some(t.elapsed());
            self.control.figures().downtime = self.report.downtime;
        }
        if !self.digests.digesting {
            // An acknowledgement without a hello is odd, but is checked all the same.
            self.actors.scanner(match ack {
                Some(_) => scanner::Command::Digest,
                None => scanner::Command::Stop,
            })?;
        }
        if let Some(ack) = ack {
            self.digests.ack_ram = Some(ack.digests);
            if self.actors.disk.is_some() {
                self.digests.ack_disks = Some(ack.disks);
            }
        }
        self.actors.blockio(match self.digests.ack_disks {
            Some(_) => blockio::Command::Digest,
            None => blockio::Command::Stop,
        })
    }

    /// A round was written: measure it, then decide on the next round, on
    /// the switchover, or on giving up.
    fn round_sent(&mut self, bytes: u64) -> anyhow::Result<()> {
        if self.src.guest.is_none() || self.src.log.is_none() {
            return Ok(()); // not live: round 0 was the last
        }
        let r = self.measure(bytes)?;
        tracing::info!(
            round = r.round,
            sent = r.bytes,
            dirty = r.dirty_bytes,
            remaining = r.remaining,
            expected_ms = r.expected_downtime_ms,
            "round done"
        );
        self.report.rounds.push(r.clone());
        self.round += 1;
        {
            let mut f = self.control.figures();
            f.remaining = r.remaining;
            f.dirty_pages_rate = (r.dirty_rate / PAGE_SIZE as f64) as u64;
            f.expected_downtime_ms = Some(r.expected_downtime_ms);
        }
        let params = self.control.params();
        if r.expected_downtime_ms <= params.downtime_limit as f64 {
            return self.switchover(r.expected_downtime_ms);
        }
        self.give_up_if_stuck(r.expected_downtime_ms, &params)?;
        if self.args.auto_converge {
            self.auto_converge(&r, &params)?;
        }
        self.send_round(false, false)
    }

    /// The figures of the round that just ended, each measured on its own:
    /// bytes from the writer, dirty pages from the logs (which the scanner
    /// and the blockio actor took at the round's start), time from the clock.
    fn measure(&mut self, bytes: u64) -> anyhow::Result<RoundStats> {
        let duration = self.round_start.elapsed().as_secs_f64().max(1e-6);
        let dirty_pages = self.src.ram_dirty_pages();
        let dirty_bytes = dirty_pages * PAGE_SIZE as u64 + self.src.disk_dirty_bytes();
        let sent = bytes - self.prev_bytes;
        self.prev_bytes = bytes;
        let bandwidth = sent as f64 / duration;
        // Also proves the guest is still there.
        self.src
            .guest
            .as_mut()
            .expect("a live migration has a guest")
            .query_status()?;
        // What is left is measured again as the decision is made: the guest
        // kept dirtying while it answered.
        let remaining = self.src.ram_dirty_pages() * PAGE_SIZE as u64 + self.src.disk_dirty_bytes();
        let expected_downtime_ms = if remaining == 0 {
            0.0
        } else {
            remaining as f64 / bandwidth.max(1.0) * 1000.0
        };
        Ok(RoundStats {
            round: self.round,
            end: self.start.elapsed().as_secs_f64(),
            duration,
            bytes: sent,
            pages: self.scanned,
            dirty_pages,
            dirty_bytes,
            dirty_rate: (dirty_pages * PAGE_SIZE as u64) as f64 / duration,
            bandwidth,
            remaining,
            expected_downtime_ms,
            throttle: self.report.throttle,
        })
    }

    /// Stops the guest and sends the last round. The downtime clock starts
    /// as `stop` is sent: the guest may pause before it answers.
    fn switchover(&mut self, expected_ms: f64) -> anyhow::Result<()> {
        let guest = self
            .src
            .guest
            .as_mut()
            .expect("a live migration has a guest");
        self.control.figures().expected_downtime_ms = Some(expected_ms);
        let stopping = Instant::now();
        guest.stop()?;
        self.control.set_guest_stopped(true);
        self.stopped_at = Some(stopping);
        // The device state as of the stop, when the guest can save it and
        // no state captured beforehand was given (issue 13).
        let ask = self.args.device_state.is_none();
        if let Some(state) = ask
            .then(|| guest.save_device_state(&std::env::temp_dir()))
            .transpose()?
            .flatten()
        {
            self.actors
                .writer
                .send(writer::Command::DeviceState(state))
                .map_err(|e| anyhow!("cannot reach the writer: {e:?}"))?;
        }
        self.control.figures().stop_bytes = Some(self.report.bytes);
        self.control.set_status(MigrationStatus::device);
        self.send_round(false, true)
    }

    fn give_up_if_stuck(&self, expected_ms: f64, params: &Parameters) -> anyhow::Result<()> {
        if self.round >= self.args.max_iterations {
            bail!(
                "did not converge in {} rounds: {:.0} ms of dirty memory left against a {} ms limit",
                self.round,
                expected_ms,
                params.downtime_limit
            );
        }
        if self.args.timeout > 0 && self.start.elapsed().as_secs() >= self.args.timeout {
            bail!(
                "did not converge within {} s: {:.0} ms of dirty memory left against a {} ms limit",
                self.args.timeout,
                expected_ms,
                params.downtime_limit
            );
        }
        Ok(())
    }

    /// QEMU's rule: throttle the guest once it dirtied more than
    /// throttle-trigger-threshold percent (50) of what went out, two rounds
    /// in a row.
    fn auto_converge(&mut self, r: &RoundStats, params: &Parameters) -> anyhow::Result<()> {
        if r.dirty_bytes * 100 > r.bytes * u64::from(params.throttle_trigger_threshold) {
            self.dirty_high += 1;
        } else {
            self.dirty_high = 0;
        }
        if self.dirty_high < 2 {
            return Ok(());
        }
        self.dirty_high = 0;
        let throttle = &mut self.report.throttle;
        *throttle = if *throttle == 0 {
            u32::from(params.cpu_throttle_initial)
        } else {
            (*throttle + u32::from(params.cpu_throttle_increment)).min(99)
        };
        self.control.figures().throttle = *throttle;
        tracing::info!(throttle = *throttle, "auto-converge");
        let guest = self
            .src
            .guest
            .as_mut()
            .expect("a live migration has a guest");
        Ok(guest.set_throttle(*throttle)?)
    }

    /// Waits for the source's digests that the destination's answer calls
    /// for (computed while the destination computed its own), and compares.
    fn verify(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(300);
        while self.digests.waiting() {
            self.control.check_cancel()?;
            if Instant::now() > deadline {
                bail!("the source's digests did not arrive within 300 s");
            }
            if let Some(mut ev) = self.sup.next_event(Duration::from_millis(100))? {
                self.digests.take(&mut ev.event);
            }
        }
        let d = &self.digests;
        if let Some(theirs) = &d.ack_ram {
            verify(
                &self.src.blocks,
                d.source_ram.as_deref().unwrap_or_default(),
                theirs,
            )?;
        }
        if let Some(theirs) = &d.ack_disks {
            verify_disks(d.source_disks.as_deref().unwrap_or_default(), theirs)?;
        }
        Ok(())
    }
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

/// Shows the figures on the bar: RAM covered by page records, and the
/// round and bytes query-migrate reports.
fn show(bar: &ProgressBar, f: &stats::Figures) {
    if bar.is_hidden() {
        return;
    }
    bar.set_position((f.counts.pages() * PAGE_SIZE as u64).min(f.total));
    bar.set_message(format!(
        "{:?}, pass {}, {:.0} MB sent, {:.0} Mbps, {} zero / {} raw / {} compressed",
        f.status,
        f.dirty_sync_count,
        f.transferred as f64 / 1e6,
        f.ram().mbps,
        f.counts.zero,
        f.counts.raw,
        f.counts.compressed
    ));
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

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: u64 = PAGE_SIZE as u64;

    fn source(pages: u64, log: Option<DirtyLog>) -> Source {
        Source {
            blocks: Vec::new(),
            total: pages * PAGE,
            device_state: None,
            log,
            disk_logs: Vec::new(),
            guest: None,
        }
    }

    #[test]
    fn live_remaining_is_what_the_dirty_log_still_marks() {
        let dir = tempfile::tempdir().unwrap();
        let log = DirtyLog::create(&dir.path().join("log"), 200).unwrap();
        let mut src = source(200, Some(log));
        let counts = PageCounts::default();
        assert_eq!(src.ram_remaining(true, &counts), 0);
        for p in [0, 64, 199] {
            src.log.as_ref().unwrap().mark(p);
        }
        assert_eq!(src.ram_remaining(true, &counts), 3 * PAGE);
        // A failure puts every page back: all of it remains.
        src.recover();
        assert_eq!(src.ram_remaining(false, &counts), 200 * PAGE);
    }

    #[test]
    fn single_pass_remaining_is_the_ram_no_record_covered() {
        let src = source(16, None);
        let mut counts = PageCounts {
            zero: 5,
            raw: 7,
            compressed: 3,
            compressed_bytes: 1000,
            ..PageCounts::default()
        };
        assert_eq!(src.ram_remaining(true, &counts), PAGE);
        counts.raw += 1;
        assert_eq!(src.ram_remaining(true, &counts), 0);
        // Nothing sent by a failed run is known to have arrived.
        assert_eq!(src.ram_remaining(false, &counts), 16 * PAGE);
    }
}
