//! The return path: what the destination writes back on the migration
//! connection.
//!
//! A ferry receiver writes text lines once it has read the whole stream: a
//! ferry sender tells it apart from a silent QEMU by [`HELLO`]. A QEMU
//! destination talks only when the source opened QEMU's own return path
//! (`MIG_CMD_OPEN_RETURN_PATH`), in binary messages: [`read_qemu_message`].

use std::io::{self, Read};

use serde::{Deserialize, Serialize};

/// A RAM block's digest, as both ends compute it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockDigest {
    /// Block name.
    pub name: String,
    /// Block length.
    pub length: u64,
    /// Sum modulo 2^128 of XXH3-128, seeded with the page index, over its
    /// non-zero pages (ferry-guest's `PageDigest`), in hex.
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
    /// A QEMU destination on its return path: its SHUT said it loaded everything.
    Qemu,
    /// A peer that never answers (QEMU without a return path): completion
    /// is not verified.
    Silent,
    /// A file: nobody to answer.
    None,
}

/// QEMU's return-path message types (`enum mig_rp_message_type` in
/// migration/migration.h); the rest are postcopy's.
pub mod qemu_message {
    /// The destination is done: be32 status, 0 when everything loaded.
    pub const SHUT: u16 = 1;
    /// The answer to a PING: be32, the ping's value.
    pub const PONG: u16 = 2;
    /// The destination's devices agree to the switchover (`switchover-ack`).
    pub const SWITCHOVER_ACK: u16 = 7;
    /// The longest payload QEMU's own source accepts.
    pub const MAX_LEN: u16 = 512;
}

/// A message a QEMU destination sends a precopy source on the return path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QemuMessage {
    /// The destination ends the migration: 0 when it loaded the whole
    /// stream, anything else (QEMU only ever says 1) when it failed.
    Shut(u32),
    /// The answer to a PING, with the ping's value.
    Pong(u32),
    /// The destination agrees to the switchover.
    SwitchoverAck,
}

/// Why QEMU's return path could not be read.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The connection failed while a message was read.
    #[error("cannot read the return path")]
    Io(#[source] io::Error),
    /// The connection ended in the middle of a message.
    #[error("the return path ended in the middle of a message")]
    Truncated,
    /// A message longer than QEMU ever sends.
    #[error("return-path message type {kind} is {len} bytes long, more than {max}", max = qemu_message::MAX_LEN)]
    TooLong {
        /// Its type.
        kind: u16,
        /// Its length.
        len: u16,
    },
    /// A known message of the wrong length.
    #[error("return-path message type {kind} is {len} bytes long, not {expected}")]
    BadLength {
        /// Its type.
        kind: u16,
        /// Its length.
        len: u16,
        /// The length of that type.
        expected: u16,
    },
    /// A message a precopy source does not expect (postcopy's) or does not know.
    #[error("unexpected return-path message type {kind} ({name})")]
    Unexpected {
        /// Its type.
        kind: u16,
        /// QEMU's name for it, or "unknown".
        name: &'static str,
    },
}

/// QEMU's name of return-path message `kind`.
fn qemu_message_name(kind: u16) -> &'static str {
    match kind {
        qemu_message::SHUT => "SHUT",
        qemu_message::PONG => "PONG",
        3 => "REQ_PAGES_ID",
        4 => "REQ_PAGES",
        5 => "RECV_BITMAP",
        6 => "RESUME_ACK",
        qemu_message::SWITCHOVER_ACK => "SWITCHOVER_ACK",
        _ => "unknown",
    }
}

/// Reads one of QEMU's return-path messages (be16 type, be16 length,
/// payload); `None` when the connection ends between messages.
///
/// # Errors
/// A failed read, a message cut short, or one a precopy source cannot take.
pub fn read_qemu_message(r: &mut impl Read) -> Result<Option<QemuMessage>, Error> {
    let mut header = [0u8; 4];
    if !read_all(r, &mut header)? {
        return Ok(None);
    }
    let kind = u16::from_be_bytes([header[0], header[1]]);
    let len = u16::from_be_bytes([header[2], header[3]]);
    if len > qemu_message::MAX_LEN {
        return Err(Error::TooLong { kind, len });
    }
    let expected = match kind {
        qemu_message::SHUT | qemu_message::PONG => 4,
        qemu_message::SWITCHOVER_ACK => 0,
        _ => {
            return Err(Error::Unexpected {
                kind,
                name: qemu_message_name(kind),
            })
        }
    };
    if len != expected {
        return Err(Error::BadLength {
            kind,
            len,
            expected,
        });
    }
    let mut payload = vec![0u8; usize::from(len)];
    if !read_all(r, &mut payload)? && len > 0 {
        return Err(Error::Truncated);
    }
    let be32 = || u32::from_be_bytes([payload[0], payload[1], payload[2], payload[3]]);
    Ok(Some(match kind {
        qemu_message::SHUT => QemuMessage::Shut(be32()),
        qemu_message::PONG => QemuMessage::Pong(be32()),
        _ => QemuMessage::SwitchoverAck,
    }))
}

/// Fills `buf`; false if the input ended before its first byte.
fn read_all(r: &mut impl Read, buf: &mut [u8]) -> Result<bool, Error> {
    let mut at = 0;
    while at < buf.len() {
        match r.read(&mut buf[at..]) {
            Ok(0) if at == 0 => return Ok(false),
            Ok(0) => return Err(Error::Truncated),
            Ok(n) => at += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::Io(e)),
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(bytes: &[u8]) -> Result<Option<QemuMessage>, Error> {
        read_qemu_message(&mut &bytes[..])
    }

    #[test]
    fn shut_pong_and_switchover_ack_are_read() {
        assert_eq!(
            read(&[0, 1, 0, 4, 0, 0, 0, 0]).unwrap(),
            Some(QemuMessage::Shut(0))
        );
        assert_eq!(
            read(&[0, 1, 0, 4, 0, 0, 0, 1]).unwrap(),
            Some(QemuMessage::Shut(1))
        );
        assert_eq!(
            read(&[0, 2, 0, 4, 0, 0, 0, 9]).unwrap(),
            Some(QemuMessage::Pong(9))
        );
        assert_eq!(
            read(&[0, 7, 0, 0]).unwrap(),
            Some(QemuMessage::SwitchoverAck)
        );
        assert_eq!(read(&[]).unwrap(), None);
    }

    #[test]
    fn postcopy_unknown_cut_and_oversized_messages_are_errors() {
        let e = read(&[0, 4, 0, 12]).unwrap_err();
        assert!(e.to_string().contains("REQ_PAGES"), "{e}");
        assert!(matches!(
            read(&[0, 0, 0, 0]),
            Err(Error::Unexpected { kind: 0, .. })
        ));
        assert!(matches!(read(&[0, 1, 0, 4, 0, 0]), Err(Error::Truncated)));
        assert!(matches!(read(&[0, 1]), Err(Error::Truncated)));
        assert!(matches!(
            read(&[0, 1, 0, 2, 0, 0]),
            Err(Error::BadLength { expected: 4, .. })
        ));
        assert!(matches!(
            read(&[0, 2, 2, 1]),
            Err(Error::TooLong { len: 513, .. })
        ));
    }
}
