//! ferry-guest: guest memory that a running VMM shares with ferry.
//!
//! - [`ram`]: the source's RAM files, mapped shared, and the digest both ends compute.
//! - [`dirty_log`]: the page dirty bitmap a guest and ferry share.
//! - [`load`]: the destination's RAM files, written from a stream's RAM records.

pub mod dirty_log;
pub mod load;
pub mod ram;
