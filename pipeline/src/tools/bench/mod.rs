//! `ferry bench`: scenarios that print their figures.
//!
//! `static` migrates one unchanging guest RAM file with QEMU 10 and with
//! ferry, side by side in one run, each into its own real receiver (see
//! side.rs); `live` migrates a guest that keeps writing.

mod cap_change;
mod live;
mod memory;
mod plot;
mod qmp;
mod side;

use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};

/// `ferry bench`
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Debug, Clone, Subcommand)]
enum Scenario {
    /// Unchanging mixed RAM: QEMU 10 plain and multifd (none, zstd) against
    /// ferry multifd (raw, zstd, auto), each into its real receiver, on a fast
    /// (loopback) or slow (shaped veth) link; medians, goal ratios, one SVG.
    Static(side::StaticArgs),
    /// Live migration of a 2 GiB `ferry loadgen` guest under a 1 GiB/s cap at
    /// several dirty rates, with and without compression and auto-converge;
    /// prints a table and writes one SVG plot per scenario.
    Live(live::LiveArgs),
    /// Peak memory of every ferry process, both ends, migrating sparse guests
    /// of several sizes (default 8 and 64 GiB), projected to 1 TiB.
    Memory(memory::MemoryArgs),
}

/// Runs a benchmark scenario.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.scenario {
        Scenario::Static(a) => side::run(a),
        Scenario::Live(a) => live::run(a),
        Scenario::Memory(a) => memory::run(a),
    }
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

/// A fresh working directory `PREFIX*` under `parent` (`--dir`), created
/// with its parents if need be; removed when dropped.
fn work_dir(parent: &Path, prefix: &str) -> anyhow::Result<tempfile::TempDir> {
    std::fs::create_dir_all(parent)
        .and_then(|()| tempfile::Builder::new().prefix(prefix).tempdir_in(parent))
        .with_context(|| format!("cannot create a working directory in {}", parent.display()))
}
