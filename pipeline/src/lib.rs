//! ferry: live migration of a running guest's memory and disks, speaking
//! QEMU 7.2's migration stream.
//!
//! - [`inspect`]: read a stream, print its sections and pages, extract RAM and
//!   device state.

pub mod inspect;
