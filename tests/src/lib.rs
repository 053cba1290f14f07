//! Support code for ferry's integration tests: real QEMU 7.2 processes on one side,
//! the real `ferry` binary on the other. One harness for every test file:
//!
//! - [`ferry`]: find or build the workspace's `ferry` binary and run it with a timeout.
//! - [`proc`]: ferry processes in the background (here or in a network namespace),
//!   their actors, their progress, and killing them.
//! - [`guest`]: `ferry loadgen` guests and the one client of their control socket.
//! - [`migrate`]: `ferry send` / `ferry receive` command lines and the checks of
//!   their statistics against independent evidence.
//! - [`files`]: the one temporary-directory helper; JSON and file comparisons.
//! - [`qemu`]: spawn QEMU with a QMP socket, migrate to a file, load from a file; every
//!   wait has a deadline and every failure quotes QEMU's stderr.
//! - [`qmp`]: the QMP JSON-lines client underneath.
//! - [`ram`]: deterministic mixed RAM images (zero, fill, text, random pages).
//! - [`error`]: the harness's error type: a message naming the failed step.
//! - [`linux`]: a real Linux guest (Debian's kernel, busybox, an initramfs built here)
//!   under QEMU TCG, and the lines it prints on its serial console.
//! - [`netns`]: two hosts (network namespaces, shaped veth), tmpfs mounts; root only.
//!
//! What QEMU 7.2 puts on the wire and what it accepts is written down in
//! /work/notes/qemu-format.md (outside the repo); the facts this code depends on are
//! repeated in the module docs.

pub mod error;
pub mod ferry;
pub mod files;
pub mod guest;
pub mod linux;
pub mod migrate;
pub mod netns;
pub mod proc;
pub mod qemu;
pub mod qmp;
pub mod ram;
