//! Statistics in the query-migrate / domjobinfo vocabulary, for `--stats-json`.

use std::path::Path;

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

/// The `ram` and `compression` objects of query-migrate.
pub fn ram(
    total: u64,
    transferred: u64,
    remaining: u64,
    counts: &PageCounts,
    seconds: f64,
) -> Value {
    let mbps = if seconds > 0.0 {
        transferred as f64 * 8.0 / 1e6 / seconds
    } else {
        0.0
    };
    json!({
        "total": total,
        "transferred": transferred,
        "remaining": remaining,
        "duplicate": counts.zero,
        "normal": counts.raw,
        "normal-bytes": counts.raw * ferry_proto::stream::PAGE_SIZE as u64,
        "compressed": counts.compressed,
        "mbps": mbps,
    })
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
