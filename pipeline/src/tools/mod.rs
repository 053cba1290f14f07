//! Subcommands beside the migration itself.
//!
//! - [`inspect`]: `ferry inspect`, a stream's sections, pages and device state.
//! - [`loadgen`]: `ferry loadgen`, the synthetic guest (RAM, dirty log, control socket).
//! - [`demo`]: `ferry demo`, a local migration on built-in defaults.
//! - [`bench`]: `ferry bench`, scenarios that print their figures.
//! - [`pattern`]: synthetic guest memory for loadgen, the demo and the benchmarks.

pub mod bench;
pub mod demo;
pub mod inspect;
pub mod loadgen;
pub mod pattern;
