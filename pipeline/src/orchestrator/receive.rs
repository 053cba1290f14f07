//! `ferry receive`: one reader process, watched until the stream is loaded.
//!
//! stderr gets one line when the reader is listening (`ferry: listening on
//! tcp:127.0.0.1:PORT`), then one summary line on success; a failure is
//! returned as one error (the binary prints it on one line and exits 1).
//! `--stats-json` is written either way, with `"status": "completed"` or
//! `"failed"`.

use std::time::{Duration, Instant};

use crate::supervisor::messages::{ActorKind, Event, PageCounts, Usage};
use ferry_proto::return_path::BlockDigest;
use serde_json::{json, Value};

use anyhow::{bail, Context};

use super::{stats, ReceiveArgs};
use crate::actors::reader;
use crate::channel::tls;
use crate::channel::uri::Uri;
use crate::qmp::{self, Control, Side};
use crate::supervisor::{self, Supervisor};
use qapi::qmp::MigrationStatus;
use std::sync::Arc;

/// How long one wait for an event lasts; also how soon a dead reader is noticed.
const POLL: Duration = Duration::from_millis(100);

/// How long the reader may take to exit after it reported the load.
const EXIT_TIMEOUT: Duration = Duration::from_secs(30);

/// What the orchestrator learnt from the reader.
#[derive(Debug, Default)]
struct Outcome {
    /// When the peer connected (the reader's first progress report).
    connected: Option<Instant>,
    /// When the reader reported the load.
    finished: Option<Instant>,
    /// Stream bytes and pages so far.
    bytes: u64,
    counts: PageCounts,
    /// Set once the stream was loaded and checked.
    digests: Option<Vec<BlockDigest>>,
    /// --ram files that existed before the load.
    pre_existing: Vec<String>,
    /// Per block: name, pages, pages the stream sent at least once.
    received: Vec<(String, u64, u64)>,
}

/// Runs `ferry receive`.
pub fn run(args: ReceiveArgs) -> anyhow::Result<()> {
    let started = Instant::now();
    supervisor::start_memory_sampler();
    // A RAM file that exists before the load (a VMM's pre-allocated memory)
    // is written in place; a new one only appears once the stream verified.
    let mut outcome = Outcome {
        pre_existing: args
            .ram
            .iter()
            .filter(|r| r.path.exists())
            .map(|r| r.path.display().to_string())
            .collect(),
        ..Outcome::default()
    };
    let mut sup = Supervisor::new()?;
    let control = Control::new(
        Side::Destination,
        stats::Figures::new(started, 0),
        qmp::Parameters::default(),
    );
    let _server = super::qmp_server(args.qmp.as_deref(), &control)?;
    qmp::signals::install(control.clone()).context("cannot handle SIGINT/SIGTERM")?;
    let result = supervise(&mut sup, &args, &mut outcome, &control);
    let result = control.explain(result);
    if result.is_err() {
        let pids = sup.pids();
        sup.kill_all();
        remove_partial_files(&args, &pids);
    }
    control.set_pids(Vec::new());
    control.finish(&result);
    control.drain(std::time::Duration::from_secs(1));
    let end = outcome.finished.unwrap_or_else(Instant::now);
    let elapsed = end.duration_since(outcome.connected.unwrap_or(started));
    let mut stats = stats(&outcome, result.is_ok(), elapsed, sup.usage());
    if let Err(e) = &result {
        // "failed" or "cancelled", as query-migrate says, and why.
        stats["status"] = serde_json::to_value(control.figures().status)?;
        stats["error-desc"] = json!(format!("{e:#}"));
    }
    let written = args
        .stats_json
        .as_deref()
        .map(|path| stats::write(path, &stats))
        .transpose();
    result?;
    written?;
    let secs = elapsed.as_secs_f64();
    let c = &outcome.counts;
    eprintln!(
        "ferry: received {} bytes in {:.2} s ({:.1} MB/s): {} zero, {} raw, {} compressed ({} bytes), {} xbzrle pages",
        outcome.bytes,
        secs,
        outcome.bytes as f64 / 1e6 / secs.max(1e-9),
        c.zero,
        c.raw,
        c.compressed,
        c.compressed_bytes,
        c.xbzrle
    );
    // A QEMU source can end a stream that never sent some pages (a lone
    // multifd main channel) and QEMU would load it: say so, loudly.
    for (name, pages, received) in &outcome.received {
        if received < pages {
            eprintln!(
                "ferry: warning: RAM block {name:?}: {} of its {pages} pages were never sent; they hold what the destination file held before",
                pages - received
            );
        }
    }
    Ok(())
}

/// Starts the reader and follows it until it has loaded the stream and exited.
fn supervise(
    sup: &mut Supervisor,
    args: &ReceiveArgs,
    out: &mut Outcome,
    control: &Arc<Control>,
) -> anyhow::Result<()> {
    let tls = args.tls.files()?;
    if let Some(files) = &tls {
        if matches!(args.listen, Uri::File(_)) {
            bail!(
                "--tls-cert/--tls-key/--tls-ca work only with tcp: and unix:, not {}",
                args.listen
            );
        }
        // Fail on unreadable files before spawning anything.
        tls::Server::new(files).context("cannot set up TLS")?;
    }
    if args.multifd_channels > 0 && (tls.is_some() || matches!(args.listen, Uri::File(_))) {
        bail!("--multifd-channels works only on tcp: and unix: without TLS");
    }
    let init = reader::Init::new(
        &args.listen,
        &args.ram,
        args.decompress_workers,
        super::stall(args.stall_timeout),
        tls,
    )
    .with_disks(&args.disk)
    .with_max_ram_size(args.max_ram_size)
    .with_multifd_channels(args.multifd_channels)
    .with_device_state_out(args.device_state_out.clone());
    control.check_cancel()?;
    sup.spawn(ActorKind::Reader, init)?;
    control.set_pids(sup.pids().into_iter().map(|(_, pid)| pid).collect());
    loop {
        control.check_cancel()?;
        let Some(ev) = sup.next_event(POLL)? else {
            continue;
        };
        match ev.event {
            Event::Listening { addr } => eprintln!("ferry: listening on {addr}"),
            Event::Progress { bytes, counts } => {
                out.connected.get_or_insert_with(Instant::now);
                out.bytes = bytes;
                out.counts = counts;
                incoming(control, out, bytes, counts);
            }
            Event::Loaded {
                bytes,
                counts,
                digests,
                received,
            } => {
                out.finished = Some(Instant::now());
                out.bytes = bytes;
                out.counts = counts;
                control.figures().total = digests.iter().map(|d| d.length).sum();
                incoming(control, out, bytes, counts);
                out.digests = Some(digests);
                out.received = received;
            }
            Event::Exiting { .. } => break,
            _ => {}
        }
    }
    if out.digests.is_none() {
        anyhow::bail!("the reader exited without loading the stream");
    }
    sup.wait_all(EXIT_TIMEOUT)?;
    Ok(())
}

/// The incoming side's figures for query-migrate: active from the first
/// bytes, with the reader's byte and page counts.
fn incoming(control: &Control, out: &Outcome, bytes: u64, counts: PageCounts) {
    {
        let mut f = control.figures();
        if let Some(t) = out.connected {
            let start = f.start;
            f.setup_time.get_or_insert_with(|| t.duration_since(start));
        }
        f.progress(bytes, counts);
        f.remaining = 0;
    }
    control.set_status(MigrationStatus::active);
}

/// The statistics in query-migrate's vocabulary. `mbps` is megabits per
/// second, as QEMU reports it; `total-time` runs from the connection to the
/// end of the load. `ram.blocks` gives, per block, its length in pages, the
/// pages the stream sent at least once (any kind, zero pages too) and the
/// pages it never sent (0 for every complete precopy stream).
fn stats(out: &Outcome, ok: bool, elapsed: Duration, actors: &[(ActorKind, Usage)]) -> Value {
    let digests = out.digests.as_deref().unwrap_or_default();
    let secs = elapsed.as_secs_f64();
    let mbps = if secs > 0.0 {
        out.bytes as f64 * 8.0 / 1e6 / secs
    } else {
        0.0
    };
    json!({
        "status": if ok { "completed" } else { "failed" },
        "total-time": elapsed.as_millis() as u64,
        "ram": {
            "total": digests.iter().map(|d| d.length).sum::<u64>(),
            "transferred": out.bytes,
            "duplicate": out.counts.zero,
            "normal": out.counts.raw,
            "compressed": out.counts.compressed,
            "compressed-size": out.counts.compressed_bytes,
            "blocks": out.received.iter().map(|(name, pages, received)| json!({
                "name": name,
                "pages": pages,
                "received": received,
                "never-sent": pages - received,
            })).collect::<Vec<_>>(),
        },
        "xbzrle-cache": { "pages": out.counts.xbzrle },
        "mbps": mbps,
        "digests": digests,
        // After a failure these hold whatever part of the load reached them.
        "possibly-partial-ram-files": if ok { &[][..] } else { &out.pre_existing[..] },
        "processes": stats::processes(actors),
    })
}

/// Removes the RAM files a killed reader was writing under their temporary
/// names (a reader that fails by itself removes its own): a failed or
/// cancelled receive leaves no file a VMM could take for a guest.
fn remove_partial_files(args: &ReceiveArgs, pids: &[(ActorKind, u32)]) {
    for (_, pid) in pids.iter().filter(|(k, _)| *k == ActorKind::Reader) {
        for ram in &args.ram {
            let partial = ferry_guest::load::partial_name(&ram.path, *pid);
            if let Err(e) = std::fs::remove_file(&partial) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!("cannot remove {}: {e}", partial.display());
                }
            }
        }
    }
}
