//! The migration connection and the layers stacked on it.
//!
//! - [`uri`]: QEMU's URI forms (`tcp:`, `unix:`, `file:`, `fd:`), opened as a connection.
//! - [`stall`]: a connection without progress for the stall timeout fails.
//! - [`tls`]: TLS 1.3 with mutual authentication on tcp: and unix: channels.
//! - [`integrity`]: checkpoints that let a ferry receiver verify the stream bytes.

pub mod integrity;
pub mod stall;
pub mod tls;
pub mod uri;
