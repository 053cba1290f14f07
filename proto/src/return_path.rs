//! The return path between two ferries: what a ferry receiver writes back on
//! the migration connection once it has read the whole stream.
//!
//! A QEMU destination sends none of this; a ferry sender tells the two apart
//! by [`HELLO`].

use serde::{Deserialize, Serialize};

/// A RAM block's digest, as both ends compute it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockDigest {
    /// Block name.
    pub name: String,
    /// Block length.
    pub length: u64,
    /// XXH3-128 of its contents, in hex.
    pub xxh3: String,
}

/// The line a ferry receiver sends on the return path once it has read the
/// whole stream, just before its [`Ack`], so the sender knows to wait for the
/// verdict (a QEMU destination sends nothing). It is not sent earlier because a
/// QEMU *source* never reads its socket, and unread bytes make its close a reset.
pub const HELLO: &[u8] = b"FERRY-RETURN-PATH 1\n";

/// The receiver's verdict, one JSON line on the return path after EOF.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// True when the whole stream loaded and checked out.
    pub ok: bool,
    /// Why not, if not.
    pub error: Option<String>,
    /// Digest of each RAM block after loading.
    pub digests: Vec<BlockDigest>,
    /// Digest of each disk after loading and flushing (name = device name).
    #[serde(default)]
    pub disks: Vec<BlockDigest>,
}

/// Whether the peer answers on a return path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReturnPath {
    /// A ferry receiver: it acknowledged with digests.
    Ferry,
    /// A peer that never answers (QEMU): completion is not verified.
    Silent,
    /// A file: nobody to answer.
    None,
}
