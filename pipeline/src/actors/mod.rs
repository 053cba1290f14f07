//! The actor processes of a migration, each with one entry point (`run`), one
//! mailbox (its bootstrap message and channels) and one error type.
//!
//! - [`scanner`]: walks guest RAM, finds zero pages, batches the rest.
//! - [`compress`]: compresses (or passes on) batches with a rayon pool.
//! - [`writer`]: owns the connection and the bandwidth budget.
//! - [`reader`]: the destination: parses, decompresses, writes guest RAM.
//! - [`blockio`]: the block-IO actor: disks read and written through libblkio.

pub mod blockio;
pub mod compress;
pub mod reader;
pub mod scanner;
pub mod writer;

use crate::supervisor::{self, messages::ActorKind};

/// Runs the actor process `kind` (the hidden `ferry __actor KIND SERVER`);
/// returns its exit code.
pub fn run(kind: &str, server: String) -> i32 {
    match ActorKind::from_name(kind) {
        Some(ActorKind::Scanner) => supervisor::run_child(ActorKind::Scanner, server, scanner::run),
        Some(ActorKind::Compress) => {
            supervisor::run_child(ActorKind::Compress, server, compress::run)
        }
        Some(ActorKind::Writer) => supervisor::run_child(ActorKind::Writer, server, writer::run),
        Some(ActorKind::Reader) => supervisor::run_child(ActorKind::Reader, server, reader::run),
        Some(ActorKind::Blockio) => supervisor::run_child(ActorKind::Blockio, server, blockio::run),
        None => {
            eprintln!("ferry: unknown actor {kind:?}");
            2
        }
    }
}
