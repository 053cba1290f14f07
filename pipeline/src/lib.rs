//! ferry: live migration of a running guest's memory and disks, speaking
//! QEMU's migration stream.
//!
//! The `ferry` binary runs as several processes (see `shared/DESIGN.md`):
//!
//! - [`orchestrator`]: `ferry send` / `ferry receive`; drives rounds, the guest and switchover.
//! - [`actors`]: the processes it spawns: scanner, compress, writer, reader, blockio.
//! - [`supervisor`]: spawning actor processes, watching them, and the messages between them.
//! - [`channel`]: the migration connection: URIs, stall detection, TLS, integrity checkpoints.
//! - [`qmp`]: the control plane: QMP server (`--qmp`), runtime parameters, cancel, signals.
//! - [`tools`]: inspect, loadgen, demo, bench.
//! - [`options`]: command-line values shared by the subcommands.
//!
//! Guest memory (RAM files, the dirty log, the loader) is the `ferry-guest`
//! crate; the bytes on the wire are `ferry-proto`.

pub mod actors;
pub mod channel;
pub mod options;
pub mod orchestrator;
pub mod qmp;
pub mod supervisor;
pub mod tools;
