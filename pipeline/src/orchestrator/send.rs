//! `ferry send`: spawns the scanner, compress and writer processes, drives
//! the rounds, and verifies the destination's digests.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ferry_proto::control::{ActorKind, BlockDigest, Chunk, Event, PageCounts, ReturnPath, Work};
use ferry_proto::stream::device_state::DeviceState;
use indicatif::{ProgressBar, ProgressStyle};
use ipc_channel::ipc;
use serde_json::json;

use super::{stats, SendArgs};
use crate::process::Supervisor;
use crate::ram::{self, BlockFile};
use crate::{compress_pool, scanner, writer};

/// Chunks in flight between the compress stage and the writer: enough to
/// keep the socket busy while the pool works, few enough to bound memory.
const CHUNK_WINDOW: u32 = 8;
/// Batches in flight between the scanner and the compress stage.
const BATCH_WINDOW: u32 = 16;

/// What the run produced, for the summary and the statistics.
struct Outcome {
    bytes: u64,
    counts: PageCounts,
    return_path: ReturnPath,
}

/// Runs `ferry send`.
pub fn run(args: SendArgs) -> anyhow::Result<()> {
    let start = Instant::now();
    crate::process::start_memory_sampler();
    let blocks = ram::source_blocks(&args.ram)?;
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
    let show_progress = args.progress || (!args.no_progress && std::io::stderr().is_terminal());
    let mut sup = Supervisor::new()?;
    let result = drive(&args, &blocks, device_state, &mut sup, start, show_progress);
    let seconds = start.elapsed().as_secs_f64();
    if let Some(path) = &args.stats_json {
        let (status, bytes, counts) = match &result {
            Ok((o, _)) => ("completed", o.bytes, o.counts),
            Err(_) => ("failed", 0, PageCounts::default()),
        };
        let setup_ms = result.as_ref().map_or(0, |(_, s)| s.as_millis() as u64);
        let remaining = if status == "completed" { 0 } else { total };
        let mut v = json!({
            "status": status,
            "total-time": (seconds * 1000.0) as u64,
            "setup-time": setup_ms,
            "ram": stats::ram(total, bytes, remaining, &counts, seconds),
            "compression": stats::compression(&counts),
            "processes": stats::processes(sup.usage()),
        });
        if let Ok((o, _)) = &result {
            v["return-path"] = serde_json::to_value(o.return_path)?;
        }
        if let Err(e) = &result {
            v["error-desc"] = json!(format!("{e:#}"));
        }
        stats::write(path, &v)?;
    }
    let (outcome, _) = result?;
    let mb = outcome.bytes as f64 / 1e6;
    eprintln!(
        "ferry: sent {} pages ({} zero, {} raw, {} compressed) in {:.1} MB, {:.2} s, {:.0} MB/s",
        outcome.counts.pages(),
        outcome.counts.zero,
        outcome.counts.raw,
        outcome.counts.compressed,
        mb,
        seconds,
        mb / seconds.max(1e-9)
    );
    match outcome.return_path {
        ReturnPath::Ferry => eprintln!("ferry: destination verified: RAM digests match"),
        ReturnPath::Silent => eprintln!(
            "ferry: the destination has no return path (a QEMU -incoming?): completion is not verified"
        ),
        ReturnPath::None => eprintln!(
            "ferry: stream written to {}; a file has no return path, so nothing was verified",
            args.to
        ),
    }
    Ok(())
}

/// Spawns the actors and runs the migration; returns the outcome and the setup time.
fn drive(
    args: &SendArgs,
    blocks: &[BlockFile],
    device_state: Option<Vec<u8>>,
    sup: &mut Supervisor,
    start: Instant,
    show_progress: bool,
) -> anyhow::Result<(Outcome, Duration)> {
    let (scan_tx, scan_rx) = ipc::channel::<scanner::Command>()?;
    let (work_tx, work_rx) = ipc::channel::<Work>()?;
    let (chunk_tx, chunk_rx) = ipc::channel::<Chunk>()?;
    let (credit_tx, credit_rx) = ipc::channel::<u32>()?;
    let (scan_credit_tx, scan_credit_rx) = ipc::channel::<u32>()?;
    let (_cmd_tx, cmd_rx) = ipc::channel::<writer::Command>()?;
    sup.spawn(
        ActorKind::Writer,
        writer::Init {
            to: args.to.to_string(),
            blocks: blocks.to_vec(),
            device_state,
            machine: args.machine.clone(),
            rate: args.max_bandwidth,
            chunks: chunk_rx,
            credits: credit_tx,
            commands: cmd_rx,
        },
    )?;
    sup.spawn(
        ActorKind::Compress,
        compress_pool::Init {
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
        },
    )?;
    let setup = start.elapsed();
    tracing::info!(pids = ?sup.pids(), "actors started");
    scan_tx.send(scanner::Command::Round {
        round: 0,
        last: true,
    })?;

    let total: u64 = blocks.iter().map(|b| b.length).sum();
    let bar = progress_bar(show_progress, total);
    let mut outcome = None;
    while outcome.is_none() {
        let Some(ev) = sup.next_event(Duration::from_millis(100))? else {
            continue;
        };
        match ev.event {
            Event::Progress { bytes, counts } => {
                bar.set_position(counts.pages() * ferry_proto::stream::PAGE_SIZE as u64);
                bar.set_message(format!(
                    "{:.0} MB sent, {} zero / {} raw / {} compressed",
                    bytes as f64 / 1e6,
                    counts.zero,
                    counts.raw,
                    counts.compressed
                ));
            }
            Event::Finished {
                bytes,
                counts,
                ack,
                return_path,
            } => {
                if let Some(ack) = ack {
                    verify(blocks, &ack.digests)?;
                }
                outcome = Some(Outcome {
                    bytes,
                    counts,
                    return_path,
                });
            }
            _ => {}
        }
    }
    bar.finish_and_clear();
    sup.wait_all(Duration::from_secs(10))?;
    Ok((outcome.expect("loop ends with an outcome"), setup))
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

/// Compares the destination's digests with the source RAM.
fn verify(blocks: &[BlockFile], theirs: &[BlockDigest]) -> anyhow::Result<()> {
    for b in blocks {
        let map = ram::map_readonly(&b.path)?;
        let ours = ram::digest(&map);
        match theirs.iter().find(|d| d.name == b.name) {
            None => bail!("the destination did not report block {:?}", b.name),
            Some(d) if d.xxh3 != ours || d.length != b.length => bail!(
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
