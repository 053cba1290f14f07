//! ferry: live migration of a running guest's memory and disks, speaking
//! QEMU 7.2's migration stream.
//!
//! The `ferry` binary runs as several processes (see `shared/DESIGN.md`):
//!
//! - [`orchestrator`]: `ferry send` / `ferry receive`; spawns and watches the actors.
//! - [`scanner`]: walks guest RAM, finds zero pages, batches the rest.
//! - [`compress_pool`]: compresses (or passes on) batches with a rayon pool.
//! - [`writer`]: owns the connection and the bandwidth budget.
//! - [`receiver`]: the destination: parses, decompresses, writes guest RAM.
//! - [`disk`]: disk migration: the source's blockio actor process, the destination's disk sinks.
//! - [`blockio`]: the block-IO actor: one libblkio queue (io_uring or vhost-user) and its completion fd.
//! - [`process`]: spawning actor processes and supervising them.
//! - [`inspect`]: `ferry inspect`.
//! - [`loadgen`]: `ferry loadgen`, the synthetic guest (RAM, dirty log, control socket).
//! - [`demo`]: `ferry demo`, a local migration on built-in defaults.
//! - [`bench`]: `ferry bench`, scenarios that print their figures.
//! - [`pattern`]: synthetic guest memory.
//! - [`dirty_log`]: the page dirty bitmap a guest and ferry share.
//! - [`tls`]: TLS 1.3 with mutual authentication on tcp: and unix: channels.
//! - [`integrity`]: checkpoints that let a ferry receiver verify the stream bytes.
//! - [`uri`], [`options`], [`ram`]: command-line values and RAM files.

pub mod bench;
pub mod blockio;
pub mod compress_pool;
pub mod demo;
pub mod dirty_log;
pub mod disk;
pub mod inspect;
pub mod integrity;
pub mod loadgen;
pub mod options;
pub mod orchestrator;
pub mod pattern;
pub mod process;
pub mod ram;
pub mod receiver;
pub mod scanner;
pub mod tls;
pub mod uri;
pub mod writer;

/// Runs the actor process `kind` (the hidden `ferry __actor KIND SERVER`);
/// returns its exit code.
pub fn run_actor(kind: &str, server: String) -> i32 {
    use ferry_proto::control::ActorKind;
    match ActorKind::from_name(kind) {
        Some(ActorKind::Scanner) => process::run_child(ActorKind::Scanner, server, scanner::run),
        Some(ActorKind::Compress) => {
            process::run_child(ActorKind::Compress, server, compress_pool::run)
        }
        Some(ActorKind::Writer) => process::run_child(ActorKind::Writer, server, writer::run),
        Some(ActorKind::Reader) => process::run_child(ActorKind::Reader, server, receiver::run),
        Some(ActorKind::Blockio) => process::run_child(ActorKind::Blockio, server, disk::run),
        None => {
            eprintln!("ferry: unknown actor {kind:?}");
            2
        }
    }
}
