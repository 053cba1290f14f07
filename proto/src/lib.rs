//! ferry-proto: the bytes of a live migration, with no processes and no threads.
//!
//! - [`transport`]: byte pipes under a QEMUFile (tcp, unix, file, fd, memory).
//! - [`qemu_file`]: QEMU's buffered migration stream, for writing and reading.
//! - [`compress`]: one guest page to one zlib stream and back, within QEMU's bounds.
//! - [`multifd`]: QEMU's multifd channels: channel init, packet header, zlib and zstd streams.
//! - [`stream`]: the QEMU 7.2 wire format: encoder, parser, vmdesc, device state.
//! - [`return_path`]: what a ferry receiver answers on the migration connection.

pub mod compress;
pub mod multifd;
pub mod qemu_file;
pub mod return_path;
pub mod stream;
pub mod transport;
