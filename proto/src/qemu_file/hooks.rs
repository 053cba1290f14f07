//! RAM control hooks: where a transport such as RDMA takes over page transfer.
//!
//! ferry's transports need none, so every method has a no-op default; the
//! QEMUFile calls them at the same points QEMU does.

use std::io;

/// The stage a RAM control hook is called for (QEMU's `RAM_CONTROL_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RamControl {
    /// Before the first pass over RAM.
    Setup,
    /// Before or after one pass.
    Round,
    /// The source asked the destination for its hook (`RAM_SAVE_FLAG_HOOK`).
    Hook,
    /// After the last pass.
    Finish,
    /// A RAM block is registered on the destination.
    BlockReg,
}

/// What a `save_page` hook did with a page.
#[derive(Debug)]
pub enum SavePage {
    /// The hook does not transfer pages; the caller writes the page itself.
    NotSupported,
    /// The hook queued the page and will send it later.
    Delayed,
    /// The hook sent the page, using this many bytes of the stream.
    Sent(u64),
    /// The hook failed.
    Failed(io::Error),
}

/// Hooks around RAM migration (QEMU's `QEMUFileHooks`).
pub trait RamHooks: Send {
    /// Called before each pass over RAM on the source.
    fn before_iterate(&mut self, _stage: RamControl) -> io::Result<()> {
        Ok(())
    }

    /// Called after each pass over RAM on the source.
    fn after_iterate(&mut self, _stage: RamControl) -> io::Result<()> {
        Ok(())
    }

    /// Called on the destination; `None` means no load hook is installed.
    fn load_hook(&mut self, _stage: RamControl) -> Option<io::Result<()>> {
        None
    }

    /// Offers a page to the hook before the caller writes it into the stream.
    fn save_page(&mut self, _block_offset: u64, _offset: u64, _size: usize) -> SavePage {
        SavePage::NotSupported
    }
}

/// The hooks of every ferry transport: none.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoHooks;

impl RamHooks for NoHooks {}
