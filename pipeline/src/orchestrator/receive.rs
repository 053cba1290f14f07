//! `ferry receive`.

use super::ReceiveArgs;

/// Runs `ferry receive`.
pub fn run(_args: ReceiveArgs) -> anyhow::Result<()> {
    anyhow::bail!("ferry receive is not implemented yet")
}
