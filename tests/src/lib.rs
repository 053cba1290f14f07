//! Support code for ferry's integration tests: real QEMU 7.2 processes on one side,
//! the real `ferry` binary on the other.
//!
//! - [`qemu`]: spawn QEMU with a QMP socket, migrate to a file, load from a file; every
//!   wait has a deadline and every failure quotes QEMU's stderr.
//! - [`qmp`]: the QMP JSON-lines client underneath.
//! - [`ram`]: deterministic mixed RAM images (zero, fill, text, random pages).
//! - [`ferry`]: find or build the workspace's `ferry` binary and run it with a timeout.
//! - [`guest_control`]: a test client of the guest's control socket.
//! - [`proc`]: ferry processes in the background, their actors, and killing them.
//! - [`error`]: the harness's error type: a message naming the failed step.
//! - [`netns`]: two hosts (network namespaces, shaped veth), guests, tmpfs mounts; root only.
//!
//! What QEMU 7.2 puts on the wire and what it accepts is written down in
//! /work/notes/qemu-format.md (outside the repo); the facts this code depends on are
//! repeated in the module docs.

pub mod error;
pub mod ferry;
pub mod guest_control;
pub mod netns;
pub mod proc;
pub mod qemu;
pub mod qmp;
pub mod ram;
