//! The orchestrator: the `ferry` process the user runs. It checks the
//! command line, spawns the actor processes, drives the migration, watches
//! for failures and reports.

pub mod guest;
pub mod receive;
pub mod send;
pub mod stats;

use std::path::PathBuf;

use clap::Args;

use ferry_proto::multifd::Compression;

use crate::channel::tls;
use crate::channel::uri::Uri;
use crate::options::{host_memory, parse_rate, parse_size, DiskSpec, RamSpec};

/// Worker threads by default: one per core.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn parse_level(s: &str) -> Result<u32, String> {
    match s.parse::<u32>() {
        Ok(n) if n <= 9 => Ok(n),
        _ => Err(format!("{s:?}: expected a zlib level from 0 to 9")),
    }
}

fn parse_multifd_compression(s: &str) -> Result<MultifdCompression, String> {
    match s {
        "none" => Ok(MultifdCompression::Method(Compression::None)),
        "zlib" => Ok(MultifdCompression::Method(Compression::Zlib)),
        "zstd" => Ok(MultifdCompression::Method(Compression::Zstd)),
        "auto" => Ok(MultifdCompression::Auto),
        _ => Err(format!("{s:?}: expected none, zlib, zstd or auto")),
    }
}

/// `--multifd-compression`: one of QEMU's methods, or ferry's `auto`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MultifdCompression {
    /// QEMU's method of that name.
    Method(Compression),
    /// zstd channels whose packets go raw where compressing does not pay.
    Auto,
}

impl MultifdCompression {
    /// The name the flag takes.
    pub fn name(self) -> &'static str {
        match self {
            Self::Method(c) => c.name(),
            Self::Auto => "auto",
        }
    }
}

fn parse_workers(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=256).contains(&n) => Ok(n),
        _ => Err(format!("{s:?}: expected a worker count from 1 to 256")),
    }
}

/// `--tls-cert`, `--tls-key`, `--tls-ca`: all three or none.
#[derive(Debug, Clone, Default, Args)]
pub struct TlsArgs {
    /// TLS: this end's certificate (PEM, its chain may follow). With --tls-key
    /// and --tls-ca the channel is TLS 1.3 with mutual authentication, like
    /// QEMU's tls-creds-x509 with verify-peer=on: the receiver accepts only a
    /// sender whose certificate is signed by its --tls-ca, and the sender
    /// accepts only a receiver whose certificate is signed by its --tls-ca and
    /// issued for the expected name: --tls-hostname if given, else the HOST of
    /// tcp:HOST:PORT (a DNS name, or an IP address matched against the
    /// certificate's IP SANs), else "ferry" for unix:PATH. tcp: and unix: only.
    #[arg(long, value_name = "FILE", requires_all = ["tls_key", "tls_ca"])]
    pub tls_cert: Option<PathBuf>,
    /// TLS: the private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires_all = ["tls_cert", "tls_ca"])]
    pub tls_key: Option<PathBuf>,
    /// TLS: the CA certificate(s) that must have signed the peer's certificate (PEM).
    #[arg(long, value_name = "FILE", requires_all = ["tls_cert", "tls_key"])]
    pub tls_ca: Option<PathBuf>,
}

impl TlsArgs {
    /// The three files, if TLS is asked for.
    pub fn files(&self) -> Result<Option<tls::Files>, tls::Error> {
        tls::Files::from_options(
            self.tls_cert.as_deref(),
            self.tls_key.as_deref(),
            self.tls_ca.as_deref(),
        )
    }
}

/// `ferry send`
#[derive(Debug, Clone, Args)]
pub struct SendArgs {
    /// Guest RAM block: a file, and its name in the stream (default: the file's
    /// stem). Repeat for several blocks; they are sent in this order.
    #[arg(long = "ram", value_name = "PATH[,name=BLOCK]", required = true)]
    pub ram: Vec<RamSpec>,
    /// A disk to migrate in QEMU's "block" section: a raw image (io_uring) or a
    /// vhost-user-blk socket (driver=virtio-blk-vhost-user), its device name
    /// (default: the file's stem), and for a live migration its dirty log (one
    /// bit per 1 MiB chunk). Repeatable.
    #[arg(
        long = "disk",
        value_name = "PATH[,name=DEV][,driver=io_uring|virtio-blk-vhost-user][,dirty-log=PATH]"
    )]
    pub disk: Vec<DiskSpec>,
    /// Destination: tcp:HOST:PORT, unix:PATH (a `ferry receive` or a QEMU
    /// `-incoming`, QEMU 7.2 to 10), or file:PATH (a stream QEMU can load
    /// with `exec:cat`).
    #[arg(long, value_name = "URI")]
    pub to: Uri,
    /// Compress pages with zlib (COMPRESS_PAGE records; a QEMU destination
    /// needs its `compress` capability on, which QEMU 9.1 removed: QEMU 7.2
    /// to 9.0 and ferry receivers only). Pages that do not shrink go raw.
    #[arg(long)]
    pub compress: bool,
    /// zlib level for --compress.
    #[arg(long, value_name = "0-9", default_value = "1", value_parser = parse_level)]
    pub compress_level: u32,
    /// Compression threads (default: one per core).
    #[arg(long, value_name = "N", default_value_t = default_workers(), value_parser = parse_workers)]
    pub compress_workers: usize,
    /// Bandwidth cap in bytes per second, with K/M/G suffixes; 0 = unlimited.
    /// The writer paces in 100 ms windows of at least one page: caps under
    /// 40K act as 40K.
    #[arg(long, value_name = "RATE", default_value = "0", value_parser = parse_rate)]
    pub max_bandwidth: u64,
    /// Machine type for the configuration section when there is no
    /// --device-state (a QEMU destination checks it against its own -M).
    #[arg(long, value_name = "NAME", default_value = "none")]
    pub machine: String,
    /// Configuration and device sections to put in the stream, as written by
    /// `ferry receive --device-state-out` or `ferry inspect
    /// --extract-device-state`. Without it, a --guest-control guest is asked
    /// for its state right after the stop (save-device-state).
    #[arg(long, value_name = "FILE")]
    pub device_state: Option<PathBuf>,
    /// Write statistics as JSON (query-migrate vocabulary) to FILE.
    #[arg(long, value_name = "FILE")]
    pub stats_json: Option<PathBuf>,
    /// Show progress (default when stderr is a terminal).
    #[arg(long, overrides_with = "no_progress")]
    pub progress: bool,
    /// Do not show progress.
    #[arg(long)]
    pub no_progress: bool,
    /// The guest's dirty log (one bit per page, pages of the --ram blocks in
    /// order). With it the migration is live: round 0 sends every page, later
    /// rounds the pages dirtied meanwhile, until the rest fits the downtime.
    #[arg(long, value_name = "PATH", requires = "guest_control")]
    pub dirty_log: Option<PathBuf>,
    /// The guest's control socket, to stop it for the switchover, resume it if
    /// the migration fails, and throttle it.
    #[arg(long, value_name = "unix:PATH", requires = "dirty_log")]
    pub guest_control: Option<String>,
    /// Longest acceptable pause of the guest, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 300)]
    pub downtime_limit: u64,
    /// Give up (the guest keeps running) after this many rounds without
    /// converging.
    #[arg(long, value_name = "N", default_value_t = 100)]
    pub max_iterations: u32,
    /// Throttle the guest when it dirties memory faster than it can be sent.
    #[arg(long)]
    pub auto_converge: bool,
    /// First throttle, in percent of guest CPU time.
    #[arg(long, value_name = "PCT", default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=99))]
    pub throttle_initial: u32,
    /// Throttle added each time the guest still outruns the migration.
    #[arg(long, value_name = "PCT", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=99))]
    pub throttle_increment: u32,
    /// Give up (the guest keeps running) after this many seconds; 0 = never.
    #[arg(long, value_name = "SECONDS", default_value_t = 0)]
    pub timeout: u64,
    /// Fail when the connection makes no progress for this many seconds
    /// (a dead link, a peer that stopped reading); 0 = wait forever.
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    pub stall_timeout: u64,
    /// Seal the stream with integrity checkpoints: an XXH3-128 of the stream
    /// bytes after every chunk (about 1 MiB), which the receiver verifies by
    /// itself; a corrupt byte fails the migration, naming the bytes. Only with
    /// a ferry receiver: a QEMU destination rejects the stream (unknown
    /// section "ferry-integrity"). With file: the check happens when `ferry
    /// receive --listen file:` loads the file.
    #[arg(long)]
    pub integrity: bool,
    /// Verify completion with a QEMU destination (any QEMU version with a
    /// return path; tcp: or unix:): open QEMU's return path
    /// (MIG_CMD_OPEN_RETURN_PATH) and succeed only when the destination's
    /// SHUT message says it loaded everything (status 0). A SHUT with an
    /// error, or a connection closed without SHUT, fails the migration and
    /// resumes the source guest. Without it, a QEMU destination never says
    /// whether it loaded the stream: the result is "completed-unverified".
    /// Not for a ferry receiver, which verifies with RAM digests by itself.
    #[arg(long, conflicts_with = "integrity")]
    pub return_path: bool,
    // TLS settings.
    #[command(flatten)]
    pub tls: TlsArgs,
    /// TLS: the name the receiver's certificate must carry (DNS SAN, or IP
    /// SAN for an address), instead of the tcp: host or "ferry" for unix:.
    #[arg(long, value_name = "NAME", requires = "tls_cert")]
    pub tls_hostname: Option<String>,
    /// Serve QMP on this socket while the migration runs, as QEMU's monitor:
    /// query-migrate, query-migrate-parameters, migrate-set-parameters
    /// (max-bandwidth, downtime-limit, throttle-trigger-threshold,
    /// cpu-throttle-initial, cpu-throttle-increment, compress-level,
    /// multifd-zstd-level, multifd-zlib-level), query-status,
    /// migrate_cancel, and the MIGRATION and MIGRATION_PASS events. A cancel (or SIGINT/SIGTERM)
    /// resumes a guest ferry stopped and exits with status 3.
    #[arg(long, value_name = "unix:PATH")]
    pub qmp: Option<String>,
    // multifd settings.
    #[command(flatten)]
    pub multifd: MultifdArgs,
}

/// `ferry send`'s multifd settings, named after QEMU's migration parameters.
#[derive(Debug, Clone, Args)]
pub struct MultifdArgs {
    /// Send RAM pages over N extra connections to the same address, as QEMU's
    /// multifd capability with its multifd-channels parameter (QEMU's default
    /// of 2 when given without a value; 0 = off). For a QEMU destination
    /// (7.2 to 10) with the multifd capability on and the same
    /// multifd-channels and multifd-compression, or `ferry receive
    /// --multifd-channels N`. tcp: and unix: only; not with TLS, --compress,
    /// --integrity or --disk. Zero pages go in the packets' zero-page lists
    /// (QEMU 9.0+), or with --multifd-flush-after-each-section as ZERO
    /// records on the main stream.
    #[arg(long, value_name = "N", default_value_t = 0, num_args = 0..=1, default_missing_value = "2")]
    pub multifd_channels: u8,
    /// multifd compression, one stream per channel as QEMU's
    /// multifd-compression: none, zlib or zstd; or auto (ferry receivers
    /// only): zstd at --multifd-zstd-level where it pays, measured as the
    /// migration runs (the link's throughput against the compressors'), raw
    /// packets where it does not and for pages that would not shrink. A
    /// QEMU destination fails such a migration at its first raw packet.
    #[arg(long, value_name = "METHOD", default_value = "none", value_parser = parse_multifd_compression, requires = "multifd_channels")]
    pub multifd_compression: MultifdCompression,
    /// zlib level for --multifd-compression zlib (QEMU's multifd-zlib-level).
    #[arg(long, value_name = "0-9", default_value_t = 1, value_parser = clap::value_parser!(i32).range(0..=9), requires = "multifd_channels")]
    pub multifd_zlib_level: i32,
    /// zstd level for --multifd-compression zstd (QEMU's
    /// multifd-zstd-level; 0 is libzstd's default, 3).
    #[arg(long, value_name = "0-20", default_value_t = 1, value_parser = clap::value_parser!(i32).range(0..=20), requires = "multifd_channels")]
    pub multifd_zstd_level: i32,
    /// QEMU's multifd-flush-after-each-section: a sync point at every RAM
    /// section end and no MULTIFD_FLUSH record, as QEMU 7.2 to 8.0 have it,
    /// and later QEMUs on machine types up to 8.0 (pc-i440fx-7.2, say); both
    /// ends must agree. The default is the mode of QEMU 8.1 and later on
    /// their own machine types.
    #[arg(long, requires = "multifd_channels")]
    pub multifd_flush_after_each_section: bool,
}

impl MultifdArgs {
    /// The settings for the actors, with multifd on.
    pub fn settings(&self) -> Option<crate::supervisor::messages::MultifdSend> {
        (self.multifd_channels > 0).then_some(crate::supervisor::messages::MultifdSend {
            channels: self.multifd_channels,
            compression: match self.multifd_compression {
                MultifdCompression::Method(c) => c,
                MultifdCompression::Auto => Compression::Zstd,
            },
            level: match self.multifd_compression {
                MultifdCompression::Method(Compression::Zlib) => self.multifd_zlib_level,
                _ => self.multifd_zstd_level,
            },
            auto: self.multifd_compression == MultifdCompression::Auto,
            legacy_sync: self.multifd_flush_after_each_section,
            // As QEMU's machine types: legacy zero pages up to 8.2, and
            // flushing after each section only up to 8.0.
            zero_pages_in_packets: !self.multifd_flush_after_each_section,
        })
    }
}

/// `ferry receive`
#[derive(Debug, Clone, Args)]
pub struct ReceiveArgs {
    /// Where the stream arrives: tcp:HOST:PORT, unix:PATH, or file:PATH (a
    /// saved stream). A stream sealed by `ferry send --integrity` is verified
    /// as it is read, whatever the URI.
    #[arg(long, value_name = "URI")]
    pub listen: Uri,
    /// Destination RAM block: a file (created at the block's size if missing;
    /// an existing file must have exactly that size) and its name in the stream
    /// (default: the file's stem). Every block in the stream needs one. A file
    /// on huge pages (hugetlbfs, a tmpfs mounted huge=) is written through a
    /// mapping, any other with pwrite.
    #[arg(long = "ram", value_name = "PATH[,name=BLOCK]", required = true)]
    pub ram: Vec<RamSpec>,
    /// A destination disk: a raw image (io_uring) or a vhost-user-blk socket
    /// (driver=virtio-blk-vhost-user) of the same size as the source's (a
    /// smaller one fails the migration; a larger one fails the sender's digest
    /// check), and its device name (default: the file's stem). Repeatable.
    #[arg(
        long = "disk",
        value_name = "PATH[,name=DEV][,driver=io_uring|virtio-blk-vhost-user]"
    )]
    pub disk: Vec<DiskSpec>,
    /// Decompression threads (default: one per core).
    #[arg(long, value_name = "N", default_value_t = default_workers(), value_parser = parse_workers)]
    pub decompress_workers: usize,
    /// Most guest RAM to accept, in bytes with K/M/G/T suffixes (default: this
    /// host's physical memory). A stream whose RAM blocks add up to more fails,
    /// naming the block, before any RAM file is created or written.
    #[arg(long, value_name = "SIZE", default_value_t = host_memory(), value_parser = parse_size)]
    pub max_ram_size: u64,
    /// multifd data channels to accept beside the main stream, as a QEMU
    /// destination's multifd-channels parameter: the source's N connections
    /// and its main stream arrive on --listen in any order (tcp: and unix:
    /// only, without TLS). The compression (none, zlib, zstd) is read from
    /// the packets; QEMU's legacy and current sync modes are both followed.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub multifd_channels: u8,
    /// Write statistics as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub stats_json: Option<PathBuf>,
    /// Fail when the connection makes no progress for this many seconds
    /// (a dead link, a peer that stopped reading); 0 = wait forever.
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    pub stall_timeout: u64,
    // TLS settings.
    #[command(flatten)]
    pub tls: TlsArgs,
    /// Write the stream's configuration and device sections, byte for byte,
    /// to FILE (the format `ferry send --device-state` takes), once the whole
    /// stream has loaded and verified; a failed receive leaves no FILE.
    #[arg(long, value_name = "FILE")]
    pub device_state_out: Option<PathBuf>,
    /// Serve QMP on this socket: query-migrate (the incoming side's status
    /// and figures), migrate_cancel, and MIGRATION events. A cancel, SIGINT
    /// or SIGTERM fails the receive (status "cancelled", exit status 3).
    #[arg(long, value_name = "unix:PATH")]
    pub qmp: Option<String>,
}

/// Starts the QMP server of `--qmp`, if given.
pub fn qmp_server(
    uri: Option<&str>,
    control: &std::sync::Arc<crate::qmp::Control>,
) -> anyhow::Result<Option<crate::qmp::server::Server>> {
    let Some(uri) = uri else {
        return Ok(None);
    };
    let path = crate::qmp::server::parse_uri(uri)?;
    Ok(Some(crate::qmp::server::Server::start(
        &path,
        control.clone(),
    )?))
}

/// A `--stall-timeout` value as the sockets take it.
pub fn stall(secs: u64) -> Option<std::time::Duration> {
    (secs > 0).then(|| std::time::Duration::from_secs(secs))
}
