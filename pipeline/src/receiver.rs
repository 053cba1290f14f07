//! The reader actor: the destination side of the stream.

use ferry_proto::control::ActorEvent;
use ipc_channel::ipc::IpcSender;
use serde::{Deserialize, Serialize};

/// Configuration of the reader.
#[derive(Debug, Serialize, Deserialize)]
pub struct Init {}

/// Errors of the reader.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Not written yet.
    #[error("not implemented")]
    Unimplemented,
}

/// Runs the reader.
pub fn run(_init: Init, _events: &IpcSender<ActorEvent>) -> Result<(), Error> {
    Err(Error::Unimplemented)
}
