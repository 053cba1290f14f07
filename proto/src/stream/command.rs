//! The commands a source sends inside the stream (`QEMU_VM_COMMAND`: be16
//! command, be16 length, payload), as QEMU 10.0 numbers them
//! (`migration/savevm.c`, `enum qemu_vm_cmd`), and what a precopy
//! destination that keeps no return path open can do with each.

/// `MIG_CMD_OPEN_RETURN_PATH`: the destination should answer on the connection.
pub const OPEN_RETURN_PATH: u16 = 1;
/// `MIG_CMD_PING`: the destination answers PONG on the return path.
pub const PING: u16 = 2;
/// `MIG_CMD_POSTCOPY_ADVISE`.
pub const POSTCOPY_ADVISE: u16 = 3;
/// `MIG_CMD_POSTCOPY_LISTEN`.
pub const POSTCOPY_LISTEN: u16 = 4;
/// `MIG_CMD_POSTCOPY_RUN`.
pub const POSTCOPY_RUN: u16 = 5;
/// `MIG_CMD_POSTCOPY_RAM_DISCARD`.
pub const POSTCOPY_RAM_DISCARD: u16 = 6;
/// `MIG_CMD_PACKAGED`: a nested stream (postcopy).
pub const PACKAGED: u16 = 7;
/// `MIG_CMD_ENABLE_COLO`.
pub const ENABLE_COLO: u16 = 8;
/// `MIG_CMD_POSTCOPY_RESUME`.
pub const POSTCOPY_RESUME: u16 = 9;
/// `MIG_CMD_RECV_BITMAP`.
pub const RECV_BITMAP: u16 = 10;
/// `MIG_CMD_SWITCHOVER_START` (QEMU 10.0): the source stopped the guest and
/// starts the final pass. No payload and nothing to answer.
pub const SWITCHOVER_START: u16 = 11;

/// QEMU's name for command `cmd`, for messages.
pub fn name(cmd: u16) -> &'static str {
    match cmd {
        OPEN_RETURN_PATH => "OPEN_RETURN_PATH",
        PING => "PING",
        POSTCOPY_ADVISE => "POSTCOPY_ADVISE",
        POSTCOPY_LISTEN => "POSTCOPY_LISTEN",
        POSTCOPY_RUN => "POSTCOPY_RUN",
        POSTCOPY_RAM_DISCARD => "POSTCOPY_RAM_DISCARD",
        PACKAGED => "PACKAGED",
        ENABLE_COLO => "ENABLE_COLO",
        POSTCOPY_RESUME => "POSTCOPY_RESUME",
        RECV_BITMAP => "RECV_BITMAP",
        SWITCHOVER_START => "SWITCHOVER_START",
        _ => "unknown",
    }
}

/// Why a precopy destination without a return path cannot honour `cmd`, or
/// `None` when the command carries nothing it must act on.
///
/// OPEN_RETURN_PATH alone asks for nothing yet; the PING that a QEMU source
/// with the `return-path` capability sends right after it needs a PONG.
pub fn refusal(cmd: u16, len: usize) -> Option<&'static str> {
    match (cmd, len) {
        (SWITCHOVER_START, 0) | (OPEN_RETURN_PATH, 0) => None,
        (SWITCHOVER_START | OPEN_RETURN_PATH, _) => {
            Some("a command that carries no payload has one")
        }
        (PING, _) => Some(
            "it needs an answer on the return path, which ferry receive does not give \
             (turn the source's return-path capability off)",
        ),
        (POSTCOPY_ADVISE..=PACKAGED | POSTCOPY_RESUME | RECV_BITMAP, _) => {
            Some("postcopy is not supported (turn the source's postcopy-ram capability off)")
        }
        (ENABLE_COLO, _) => Some("COLO is not supported"),
        _ => Some("the command is unknown"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_stateless_commands_pass() {
        assert_eq!(refusal(SWITCHOVER_START, 0), None);
        assert_eq!(refusal(OPEN_RETURN_PATH, 0), None);
        assert!(refusal(SWITCHOVER_START, 4).is_some());
        for cmd in [
            0,
            PING,
            POSTCOPY_ADVISE,
            POSTCOPY_LISTEN,
            POSTCOPY_RUN,
            PACKAGED,
            12,
            999,
        ] {
            assert!(refusal(cmd, 4).is_some(), "command {cmd} passed");
        }
        assert!(refusal(PING, 4).unwrap().contains("return path"));
        assert_eq!(name(POSTCOPY_LISTEN), "POSTCOPY_LISTEN");
    }
}
