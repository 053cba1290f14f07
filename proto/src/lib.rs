//! ferry-proto: the bytes of a live migration, with no processes and no threads.
//!
//! - [`transport`]: byte pipes under a QEMUFile (tcp, unix, file, fd, memory).
//! - [`qemu_file`]: QEMU's buffered migration stream, for writing and reading.
//! - [`compress`]: one guest page to one zlib stream and back, within QEMU's bounds.
//! - [`control`]: messages between ferry's processes and across the return path.
//! - [`stream`]: the QEMU 7.2 wire format: encoder, parser, RAM loader, vmdesc.

pub mod compress;
pub mod control;
pub mod qemu_file;
pub mod stream;
pub mod transport;
