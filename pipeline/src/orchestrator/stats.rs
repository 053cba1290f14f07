//! Statistics in the query-migrate / domjobinfo vocabulary: the running
//! figures ([`Figures`]) that `query-migrate`, the progress bar and
//! `--stats-json` all read, as QEMU's own QAPI types.

use std::path::Path;
use std::time::{Duration, Instant};

use ferry_proto::stream::PAGE_SIZE;
use qapi::qmp::{MigrationInfo, MigrationStats, MigrationStatus};

use crate::supervisor::messages::{ActorKind, PageCounts, Usage};
use serde_json::{json, Map, Value};

/// CPU seconds and peak RSS of each process, the orchestrator included.
pub fn processes(actors: &[(ActorKind, Usage)]) -> Value {
    let mut m = Map::new();
    let me = crate::supervisor::usage();
    for (name, u) in
        std::iter::once(("orchestrator", &me)).chain(actors.iter().map(|(k, u)| (k.name(), u)))
    {
        m.insert(
            name.to_owned(),
            json!({
                "cpu-seconds": u.cpu_seconds,
                "peak-rss-bytes": u.peak_rss_bytes,
                "peak-anon-bytes": u.peak_anon_bytes,
            }),
        );
    }
    Value::Object(m)
}

/// The `compression` object of query-migrate.
pub fn compression(counts: &PageCounts) -> Value {
    let rate = if counts.compressed_bytes > 0 {
        (counts.compressed * ferry_proto::stream::PAGE_SIZE as u64) as f64
            / counts.compressed_bytes as f64
    } else {
        0.0
    };
    json!({
        "pages": counts.compressed,
        "compressed-size": counts.compressed_bytes,
        "compression-rate": rate,
    })
}

/// The `multifd` object: bytes per channel and in all (these are part of
/// `ram.transferred` too).
pub fn multifd(channel_bytes: &[u64]) -> Value {
    json!({
        "channels": channel_bytes.len(),
        "bytes": channel_bytes,
        "total-bytes": channel_bytes.iter().sum::<u64>(),
    })
}

/// Writes `stats` to `path` as pretty JSON.
pub fn write(path: &Path, stats: &Value) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(stats)?;
    std::fs::write(path, text + "\n").map_err(|e| {
        anyhow::anyhow!(e).context(format!("cannot write statistics to {}", path.display()))
    })
}

/// The figures of one migration as it runs, in query-migrate's terms: the
/// one source that `query-migrate`, the progress bar and `--stats-json` read.
#[derive(Debug, Clone)]
pub struct Figures {
    /// QEMU's migration status.
    pub status: MigrationStatus,
    /// When the migration started (the command ran, or the peer connected).
    pub start: Instant,
    /// When it ended (completed, failed or cancelled): total-time stops here.
    pub end: Option<Instant>,
    /// Spawning the actors and connecting.
    pub setup_time: Option<Duration>,
    /// From `stop` to the destination having the whole stream.
    pub downtime: Option<Duration>,
    /// Downtime the last round's figures predicted, milliseconds.
    pub expected_downtime_ms: Option<f64>,
    /// RAM bytes of every block.
    pub total: u64,
    /// Stream bytes so far, the multifd channels' included.
    pub transferred: u64,
    /// RAM bytes not on the destination yet (dirty, or not sent).
    pub remaining: u64,
    /// Pages by kind.
    pub counts: PageCounts,
    /// Bytes on each multifd channel.
    pub channel_bytes: Vec<u64>,
    /// Rounds begun (QEMU's dirty-sync-count: one dirty-log sync each).
    pub dirty_sync_count: u64,
    /// The guest's dirty rate over the last round, pages per second.
    pub dirty_pages_rate: u64,
    /// `transferred` when the guest was stopped: the rest is downtime-bytes.
    pub stop_bytes: Option<u64>,
    /// Guest throttle, percent.
    pub throttle: u32,
    /// Why the migration failed.
    pub error_desc: Option<String>,
    /// The writer's windows around each max-bandwidth change.
    pub rate_changes: Vec<crate::qmp::windows::RateChange>,
    /// The last two samples of (time, transferred, pages) for the rates.
    rate: RateSample,
}

/// Stream and page rates over the last sample interval, as QEMU's `mbps` and
/// `pages-per-second` are the rates of the latest iteration.
#[derive(Debug, Clone)]
struct RateSample {
    at: Instant,
    bytes: u64,
    pages: u64,
    /// Bytes per second.
    bandwidth: f64,
    pages_per_second: f64,
}

/// Shortest interval a rate is measured over: the writer reports progress
/// every 250 ms, the orchestrator polls every 100 ms.
const RATE_INTERVAL: Duration = Duration::from_millis(200);

impl Figures {
    /// A migration in `setup` since `start`, of `total` RAM bytes.
    pub fn new(start: Instant, total: u64) -> Self {
        Self {
            status: MigrationStatus::setup,
            start,
            end: None,
            setup_time: None,
            downtime: None,
            expected_downtime_ms: None,
            total,
            transferred: 0,
            remaining: total,
            counts: PageCounts::default(),
            channel_bytes: Vec::new(),
            dirty_sync_count: 0,
            dirty_pages_rate: 0,
            stop_bytes: None,
            throttle: 0,
            error_desc: None,
            rate_changes: Vec::new(),
            rate: RateSample {
                at: start,
                bytes: 0,
                pages: 0,
                bandwidth: 0.0,
                pages_per_second: 0.0,
            },
        }
    }

    /// Records stream bytes and page counts, and the rates since the last sample.
    pub fn progress(&mut self, bytes: u64, counts: PageCounts) {
        self.transferred = bytes;
        self.counts = counts;
        let now = Instant::now();
        let dt = now.duration_since(self.rate.at);
        if dt >= RATE_INTERVAL {
            let secs = dt.as_secs_f64();
            self.rate.bandwidth = bytes.saturating_sub(self.rate.bytes) as f64 / secs;
            self.rate.pages_per_second =
                counts.pages().saturating_sub(self.rate.pages) as f64 / secs;
            self.rate.at = now;
            self.rate.bytes = bytes;
            self.rate.pages = counts.pages();
        }
    }

    /// Milliseconds since the start, up to the end once there is one.
    pub fn total_time(&self) -> Duration {
        self.end
            .unwrap_or_else(Instant::now)
            .duration_since(self.start)
    }

    /// Whether the migration is over (completed, failed or cancelled).
    pub fn finished(&self) -> bool {
        matches!(
            self.status,
            MigrationStatus::completed | MigrationStatus::failed | MigrationStatus::cancelled
        )
    }

    /// The `ram` object of query-migrate (QEMU's MigrationStats).
    pub fn ram(&self) -> MigrationStats {
        let secs = self.total_time().as_secs_f64();
        // While it runs: the latest interval's rate, as QEMU; at the end:
        // the average over the whole migration.
        let bandwidth = if self.finished() || self.rate.bandwidth == 0.0 {
            self.transferred as f64 / secs.max(1e-9)
        } else {
            self.rate.bandwidth
        };
        let stop = self.stop_bytes.unwrap_or(self.transferred);
        MigrationStats {
            transferred: self.transferred as i64,
            remaining: self.remaining as i64,
            total: self.total as i64,
            duplicate: self.counts.zero as i64,
            // QEMU 7.2's accounting: compressed pages count apart.
            normal: self.counts.raw as i64,
            normal_bytes: (self.counts.raw * PAGE_SIZE as u64) as i64,
            dirty_pages_rate: self.dirty_pages_rate as i64,
            mbps: bandwidth * 8.0 / 1e6,
            dirty_sync_count: self.dirty_sync_count as i64,
            postcopy_requests: 0,
            page_size: PAGE_SIZE as i64,
            multifd_bytes: self.channel_bytes.iter().sum(),
            pages_per_second: self.rate.pages_per_second as u64,
            precopy_bytes: stop,
            downtime_bytes: self.transferred.saturating_sub(stop),
            postcopy_bytes: 0,
            dirty_sync_missed_zero_copy: 0,
        }
    }

    /// query-migrate's answer (QEMU's MigrationInfo).
    pub fn info(&self) -> MigrationInfo {
        let ms = |d: Duration| d.as_millis() as i64;
        let running = !matches!(self.status, MigrationStatus::setup);
        MigrationInfo {
            status: Some(self.status),
            total_time: Some(ms(self.total_time())),
            setup_time: self.setup_time.map(ms),
            downtime: self.downtime.map(ms),
            expected_downtime: self.expected_downtime_ms.map(|e| e as i64),
            ram: running.then(|| self.ram()),
            cpu_throttle_percentage: (self.throttle > 0).then_some(i64::from(self.throttle)),
            error_desc: self.error_desc.clone(),
            ..MigrationInfo::default()
        }
    }

    /// query-migrate's answer as JSON, with the figures QEMU 9.1 dropped
    /// from its schema and ferry still has: `compression` (QEMU 7.2's
    /// CompressionStats) and `multifd` (bytes per channel).
    pub fn to_json(&self) -> Value {
        let mut v = serde_json::to_value(self.info()).expect("MigrationInfo serializes");
        if !matches!(self.status, MigrationStatus::setup) {
            v["ram"]["compressed"] = self.counts.compressed.into();
            v["compression"] = compression(&self.counts);
            if !self.channel_bytes.is_empty() {
                v["multifd"] = multifd(&self.channel_bytes);
            }
        }
        v
    }
}
