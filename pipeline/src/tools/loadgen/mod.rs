//! `ferry loadgen`: the synthetic guest every live-migration test and
//! benchmark runs against.
//!
//! It implements the guest contract of DESIGN.md, so ferry cannot tell it
//! from a VMM:
//!
//! - RAM: a file filled per `--pattern`, mapped shared, so ferry's scanner
//!   sees every write as it happens.
//! - Dirty log: one bit per page; writer threads ("vCPUs", [`writers`]) write
//!   a page first and set its bit after, with an atomic OR. They dirty pages at
//!   a set rate within a working set, the way QEMU's guestperf stress does
//!   (XOR the page with a fixed random page), so a migration has a known,
//!   steady load to converge against.
//! - Control: a unix socket speaking QMP-style JSON lines ([`control`]):
//!   `stop` (replied to only once no writer can write any more), `cont`,
//!   `set-throttle` (QEMU's CPU throttle: writers sleep in proportion) and
//!   `query-status` (with the dirty rate and the disk write rate measured
//!   over the last second). A controller that disconnects while the guest is
//!   stopped resumes it: a migration that died must never leave its guest
//!   paused.
//! - Disk (optional, `--disk`): a raw image file and its dirty log, one bit
//!   per 1 MiB chunk ([`disk`]). A disk writer thread writes blocks of 4 KiB
//!   to 1 MiB at a set rate and marks the chunks after writing; `stop`,
//!   `cont` and the throttle apply to it as to the vCPUs.
//!
//! It runs until SIGTERM or SIGINT, then exits 0 and removes its socket.

mod control;
mod disk;
mod meter;
mod writers;

use std::fs;
use std::io;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use ferry_proto::stream::PAGE_SIZE;
use memmap2::MmapMut;

use crate::options::parse_rate;
use crate::tools::pattern::{self, Pattern, XorShift};
use ferry_guest::dirty_log::{self, DirtyLog};

use disk::{Disk, DiskWriter, CHUNK};
use meter::Meters;
use writers::{Vcpus, Writer};

/// `ferry loadgen` options.
#[derive(Debug, Clone, Args)]
pub struct LoadgenArgs {
    /// The guest RAM file to create (or truncate); e.g. under /dev/shm.
    #[arg(long, value_name = "PATH")]
    pub ram: PathBuf,
    /// RAM size, with an optional K, M or G suffix; rounded down to whole 4 KiB pages.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub size: u64,
    /// The dirty log to create (clean): one bit per page, little-endian u64 words.
    #[arg(long, value_name = "PATH")]
    pub dirty_log: PathBuf,
    /// The control socket, `unix:PATH` (a stale socket file there is replaced).
    #[arg(long, value_name = "unix:PATH", value_parser = parse_control)]
    pub control: PathBuf,
    /// Bytes per second to dirty, in total over all writer threads
    /// (K, M, G suffixes; 0 = no dirtying).
    #[arg(long, value_name = "RATE", default_value = "0", value_parser = parse_rate)]
    pub dirty_rate: u64,
    /// The share of RAM that is written: the first FRACTION of its pages
    /// (0 < FRACTION <= 1).
    #[arg(long, value_name = "FRACTION", default_value_t = 1.0, value_parser = parse_fraction)]
    pub working_set: f64,
    /// What the RAM holds before it is dirtied.
    #[arg(long, value_enum, default_value_t = Pattern::Mixed)]
    pub pattern: Pattern,
    /// Writer threads ("vCPUs"); they share the rate and split the working set.
    #[arg(long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub threads: u32,
    /// Seed of the RAM contents, of the XOR page and of the page choice
    /// (and of the disk's contents and writes).
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub seed: u64,
    /// A raw disk image to create (or truncate) and fill per --pattern;
    /// needs --disk-size and --disk-dirty-log.
    #[arg(long, value_name = "PATH")]
    pub disk: Option<PathBuf>,
    /// Disk size: a whole number of MiB, with an optional K, M or G suffix.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub disk_size: Option<u64>,
    /// Bytes per second written to the disk, in blocks of 4 KiB to 1 MiB
    /// (K, M, G suffixes; 0 = no disk writes, the default).
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    pub disk_rate: Option<u64>,
    /// The disk's dirty log to create (clean): one bit per 1 MiB chunk,
    /// little-endian u64 words.
    #[arg(long, value_name = "PATH")]
    pub disk_dirty_log: Option<PathBuf>,
}

/// Why a synthetic guest cannot start.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `--size` is below one page.
    #[error("--size {0} is less than one page ({PAGE_SIZE} bytes)")]
    TooSmall(u64),
    /// `--working-set` is outside (0, 1].
    #[error("--working-set {0} is not in (0, 1]")]
    WorkingSet(f64),
    /// `--threads` is 0.
    #[error("--threads must be at least 1")]
    NoThreads,
    /// The RAM file cannot be created, sized or mapped.
    #[error("RAM file {path} cannot be created")]
    Ram {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The dirty log cannot be created.
    #[error(transparent)]
    DirtyLog(#[from] dirty_log::Error),
    /// A disk option is missing one it needs.
    #[error("{0} needs {1}")]
    DiskNeeds(&'static str, &'static str),
    /// `--disk-size` is not a positive whole number of MiB.
    #[error("--disk-size {0} is not a whole number of MiB (a multiple of 1048576 bytes, at least 1 MiB)")]
    DiskSize(u64),
    /// Two of the files to create are the same path.
    #[error("{0} is given for two of --ram, --dirty-log, --disk and --disk-dirty-log")]
    SamePath(PathBuf),
    /// The disk image cannot be created or filled.
    #[error("disk image {path} cannot be created")]
    Disk {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The disk's dirty log cannot be created.
    #[error("the disk's dirty log cannot be created")]
    DiskDirtyLog(#[source] dirty_log::Error),
    /// Something that is not a socket sits where the control socket goes;
    /// it is not ours to delete.
    #[error("{0} exists and is not a socket; not replacing it")]
    NotSocket(PathBuf),
    /// A live process answers on the control socket already.
    #[error("control socket {0} is in use by a running process")]
    InUse(PathBuf),
    /// The control socket cannot be bound.
    #[error("control socket {path} cannot be bound")]
    Bind {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// SIGTERM/SIGINT handlers cannot be installed.
    #[error("signal handlers cannot be installed")]
    Signal(#[source] io::Error),
    /// A thread cannot be started.
    #[error("a loadgen thread cannot be started")]
    Spawn(#[source] io::Error),
}

/// `--size`: like a rate, a number with an optional binary suffix.
fn parse_size(s: &str) -> Result<u64, String> {
    parse_rate(s).map_err(|_| format!("{s:?}: expected bytes, optionally with a K, M or G suffix"))
}

/// `--control unix:PATH`.
fn parse_control(s: &str) -> Result<PathBuf, String> {
    match s.strip_prefix("unix:") {
        Some(p) if !p.is_empty() => Ok(PathBuf::from(p)),
        _ => Err(format!("{s:?}: expected unix:PATH")),
    }
}

/// `--working-set`: a fraction in (0, 1].
fn parse_fraction(s: &str) -> Result<f64, String> {
    match s.trim().parse::<f64>() {
        Ok(f) if f > 0.0 && f <= 1.0 => Ok(f),
        _ => Err(format!("{s:?}: expected a fraction in (0, 1], e.g. 0.25")),
    }
}

/// Set from the SIGTERM/SIGINT handler; polled by the main thread.
static SIGNALLED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_signal: libc::c_int) {
    // An atomic store is async-signal-safe; everything else happens on the
    // main thread once it sees the flag.
    SIGNALLED.store(true, Ordering::SeqCst);
}

/// Makes SIGTERM and SIGINT ask for a clean exit instead of killing the
/// process, so the control socket gets removed.
fn install_signal_handlers() -> Result<(), Error> {
    let handler = on_signal as extern "C" fn(libc::c_int);
    for signal in [libc::SIGTERM, libc::SIGINT] {
        // SAFETY: `on_signal` is an `extern "C" fn(c_int)` that only stores
        // to a static atomic, which is async-signal-safe; it touches no
        // memory that Rust code could be borrowing.
        let previous = unsafe { libc::signal(signal, handler as libc::sighandler_t) };
        if previous == libc::SIG_ERR {
            return Err(Error::Signal(io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// Runs the synthetic guest until SIGTERM or SIGINT.
pub fn run(args: LoadgenArgs) -> anyhow::Result<()> {
    let guest = Guest::create(&args)?;
    install_signal_handlers()?;
    guest.run(&args).context("loadgen failed")
}

/// The checked disk options.
#[derive(Debug)]
struct DiskOptions<'a> {
    image: &'a Path,
    size: u64,
    log: &'a Path,
}

/// Checks the disk options: all of --disk, --disk-size and --disk-dirty-log
/// or none (and no --disk-rate without --disk), a size of whole MiB.
fn disk_options(args: &LoadgenArgs) -> Result<Option<DiskOptions<'_>>, Error> {
    let Some(image) = &args.disk else {
        let given = [
            (args.disk_size.is_some(), "--disk-size"),
            (args.disk_rate.is_some(), "--disk-rate"),
            (args.disk_dirty_log.is_some(), "--disk-dirty-log"),
        ];
        return match given.iter().find(|(g, _)| *g) {
            Some((_, name)) => Err(Error::DiskNeeds(name, "--disk PATH")),
            None => Ok(None),
        };
    };
    let size = args
        .disk_size
        .ok_or(Error::DiskNeeds("--disk", "--disk-size SIZE"))?;
    let log = args
        .disk_dirty_log
        .as_deref()
        .ok_or(Error::DiskNeeds("--disk", "--disk-dirty-log PATH"))?;
    if size == 0 || size % CHUNK != 0 {
        return Err(Error::DiskSize(size));
    }
    let paths = [args.ram.as_path(), &args.dirty_log, image, log];
    for (i, p) in paths.iter().enumerate() {
        if paths[i + 1..].contains(p) {
            return Err(Error::SamePath(p.to_path_buf()));
        }
    }
    Ok(Some(DiskOptions { image, size, log }))
}

/// The guest's RAM, dirty log, disk and control socket, set up and not yet
/// running.
struct Guest {
    ram: MmapMut,
    log: DirtyLog,
    pages: u64,
    working_set: u64,
    disk: Option<Disk>,
    listener: UnixListener,
    socket: SocketFile,
}

impl Guest {
    /// Creates and fills the RAM file (and the disk image), creates clean
    /// dirty logs and binds the control socket.
    fn create(args: &LoadgenArgs) -> Result<Self, Error> {
        if !(args.working_set > 0.0 && args.working_set <= 1.0) {
            return Err(Error::WorkingSet(args.working_set));
        }
        if args.threads == 0 {
            return Err(Error::NoThreads);
        }
        let page = PAGE_SIZE as u64;
        let pages = args.size / page;
        if pages == 0 {
            return Err(Error::TooSmall(args.size));
        }
        let working_set = ((pages as f64 * args.working_set) as u64).clamp(1, pages);
        let disk_options = disk_options(args)?;
        // Before touching the files: a guest still running there owns them.
        clear_stale_socket(&args.control)?;
        let ram = create_ram(&args.ram, pages * page, args.pattern, args.seed)?;
        let log = DirtyLog::create(&args.dirty_log, pages)?;
        let disk = match disk_options {
            Some(d) => Some(Disk::create(
                d.image,
                d.size,
                d.log,
                args.pattern,
                args.seed,
            )?),
            None => None,
        };
        // Last: a client that finds the socket finds the RAM filled.
        let (listener, socket) = bind_control(&args.control)?;
        Ok(Self {
            ram,
            log,
            pages,
            working_set,
            disk,
            listener,
            socket,
        })
    }

    /// Starts the writers and the control socket; returns after a signal,
    /// once every thread has stopped.
    fn run(mut self, args: &LoadgenArgs) -> Result<(), Error> {
        let vcpus = Vcpus::new();
        let meters = Meters::new();
        let xor = xor_page(args.seed);
        let disk_rate = args.disk_rate.unwrap_or(0);
        let ready = self.ready_line(args);
        let writers = share_out(
            &mut self.ram,
            self.working_set,
            args,
            &xor,
            &self.log,
            &vcpus,
        );
        let disk_writer = self
            .disk
            .as_ref()
            .filter(|_| disk_rate > 0)
            .map(|disk| DiskWriter {
                disk,
                rate: disk_rate as f64,
                vcpus: &vcpus,
                seed: args.seed ^ 0x6469_736b_7772_6974,
            });
        let started = Instant::now();
        thread::scope(|scope| {
            let spawned = spawn_all(scope, writers, disk_writer, &self.listener, &vcpus, &meters);
            if spawned.is_ok() {
                meters.record(Instant::now(), 0, 0);
                eprintln!("{ready}");
                sample_until_signalled(&vcpus, &meters);
            }
            // Also after a failed spawn: the threads already running must end
            // for the scope to return.
            vcpus.shutdown();
            spawned
        })?;
        eprintln!("{}", exit_line(&vcpus, started, self.disk.is_some()));
        Ok(())
    }

    /// What the guest says once it runs: its sizes, rates and files.
    fn ready_line(&self, args: &LoadgenArgs) -> String {
        let threads = (self.working_set as usize).div_ceil(share_pages(self.working_set, args));
        let disk_line = match (&self.disk, &args.disk, &args.disk_dirty_log) {
            (Some(disk), Some(image), Some(log)) => format!(
                ", disk {}: {} ({} chunks of 1 MiB), disk rate {}/s, disk dirty log {}",
                image.display(),
                mib(disk.size()),
                disk.chunks(),
                mib(args.disk_rate.unwrap_or(0)),
                log.display()
            ),
            _ => String::new(),
        };
        format!(
            "ferry loadgen: ready: {}, {} pages, working set {} pages, dirty rate {}/s, \
             {threads} writer thread(s){disk_line}, control unix:{}",
            mib(self.pages * PAGE_SIZE as u64),
            self.pages,
            self.working_set,
            mib(args.dirty_rate),
            self.socket.0.display()
        )
    }
}

/// Pages of the working set each writer owns.
fn share_pages(working_set: u64, args: &LoadgenArgs) -> usize {
    (working_set as usize).div_ceil(args.threads as usize)
}

/// One writer per contiguous share of the working set, so no two threads
/// ever write the same page; each dirties its share of the rate.
fn share_out<'a>(
    ram: &'a mut [u8],
    working_set: u64,
    args: &LoadgenArgs,
    xor: &'a [u8],
    log: &'a DirtyLog,
    vcpus: &'a Vcpus,
) -> Vec<Writer<'a>> {
    let share_pages = share_pages(working_set, args);
    let rate_pages = args.dirty_rate as f64 / PAGE_SIZE as f64;
    ram[..working_set as usize * PAGE_SIZE]
        .chunks_mut(share_pages * PAGE_SIZE)
        .enumerate()
        .map(|(i, share)| Writer {
            first_page: (i * share_pages) as u64,
            rate: rate_pages * (share.len() / PAGE_SIZE) as f64 / working_set as f64,
            pages: share,
            xor,
            log,
            vcpus,
            seed: args.seed ^ (i as u64 + 1).wrapping_mul(0x2545_f491_4f6c_dd1d),
        })
        .collect()
}

/// Samples the written pages and disk bytes for the meters every
/// [`meter::INTERVAL`] until SIGTERM or SIGINT.
fn sample_until_signalled(vcpus: &Vcpus, meters: &Meters) {
    let mut last_sample = Instant::now();
    while !SIGNALLED.load(Ordering::SeqCst) {
        thread::sleep(Duration::from_millis(20));
        if last_sample.elapsed() >= meter::INTERVAL {
            last_sample = Instant::now();
            meters.record(
                last_sample,
                vcpus.pages_written(),
                vcpus.disk_bytes_written(),
            );
        }
    }
}

/// What the guest says on its way out: what it wrote, and how fast.
fn exit_line(vcpus: &Vcpus, started: Instant, disk: bool) -> String {
    let written = vcpus.pages_written();
    let disk_written = vcpus.disk_bytes_written();
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    let disk_line = if disk {
        format!(
            "; {} written to the disk ({}/s on average)",
            mib(disk_written),
            mib((disk_written as f64 / secs) as u64)
        )
    } else {
        String::new()
    };
    format!(
        "ferry loadgen: exiting on a signal: {written} pages written in {secs:.1} s \
         ({}/s on average){disk_line}",
        mib((written as f64 * PAGE_SIZE as f64 / secs) as u64)
    )
}

/// Starts the writer threads, the disk writer and the control thread inside
/// `scope`.
fn spawn_all<'scope, 'env>(
    scope: &'scope thread::Scope<'scope, 'env>,
    writers: Vec<Writer<'env>>,
    disk_writer: Option<DiskWriter<'env>>,
    listener: &'env UnixListener,
    vcpus: &'env Vcpus,
    meters: &'env Meters,
) -> Result<(), Error> {
    for (i, writer) in writers.into_iter().enumerate() {
        thread::Builder::new()
            .name(format!("loadgen-writer-{i}"))
            .spawn_scoped(scope, move || writer.run())
            .map_err(Error::Spawn)?;
    }
    if let Some(disk_writer) = disk_writer {
        thread::Builder::new()
            .name("loadgen-disk".into())
            .spawn_scoped(scope, move || disk_writer.run())
            .map_err(Error::Spawn)?;
    }
    thread::Builder::new()
        .name("loadgen-control".into())
        .spawn_scoped(scope, move || control::serve(listener, vcpus, meters))
        .map_err(Error::Spawn)?;
    Ok(())
}

/// Creates (or truncates) the RAM file, sizes it and fills it per `pattern`.
fn create_ram(path: &Path, len: u64, pattern: Pattern, seed: u64) -> Result<MmapMut, Error> {
    let err = |source| Error::Ram {
        path: path.to_owned(),
        source,
    };
    let file = ferry_guest::create_file(path, len).map_err(err)?;
    // SAFETY: this process is the guest and the RAM is its own: we just
    // created and sized the file, and every write to it goes through this
    // one mapping, split into disjoint slices per writer thread. Other
    // processes (ferry) map it too and only read it, through volatile
    // accesses, so nothing outside this process changes the bytes these
    // slices promise to own. If someone truncated the file under us,
    // accesses would fault (SIGBUS), which is the contract of any VMM's RAM
    // file.
    let mut map = unsafe { MmapMut::map_mut(&file) }.map_err(err)?;
    // A truncated file reads as zeros already; writing zeros would only
    // allocate every page.
    if pattern != Pattern::Zero {
        pattern::fill(&mut map, pattern, seed);
    }
    Ok(map)
}

/// The fixed random page writers XOR into the pages they dirty.
fn xor_page(seed: u64) -> Vec<u8> {
    let mut rng = XorShift::new(seed ^ 0x6c6f_6164_6765_6e21);
    let mut page = vec![0u8; PAGE_SIZE];
    for w in page.chunks_exact_mut(8) {
        w.copy_from_slice(&rng.next_u64().to_le_bytes());
    }
    page
}

/// The control socket's file: removed when dropped, so a clean exit (or a
/// failed start) leaves nothing behind.
#[derive(Debug)]
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// Removes a stale control socket left by a process that was killed;
/// refuses if a live process answers there or the file is not a socket.
fn clear_stale_socket(path: &Path) -> Result<(), Error> {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !meta.file_type().is_socket() {
        return Err(Error::NotSocket(path.to_owned()));
    }
    if UnixStream::connect(path).is_ok() {
        return Err(Error::InUse(path.to_owned()));
    }
    fs::remove_file(path).map_err(|source| Error::Bind {
        path: path.to_owned(),
        source,
    })
}

/// Binds the control socket at `path`.
fn bind_control(path: &Path) -> Result<(UnixListener, SocketFile), Error> {
    let listener = UnixListener::bind(path).map_err(|source| Error::Bind {
        path: path.to_owned(),
        source,
    })?;
    Ok((listener, SocketFile(path.to_owned())))
}

/// `bytes` in MiB for messages: "64 MiB", "0.5 MiB".
fn mib(bytes: u64) -> String {
    let m = bytes as f64 / (1 << 20) as f64;
    if m.fract() == 0.0 {
        format!("{m:.0} MiB")
    } else {
        format!("{m:.1} MiB")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_values_parse() {
        assert_eq!(parse_control("unix:/run/g.sock"), Ok("/run/g.sock".into()));
        assert!(parse_control("unix:").is_err());
        assert!(parse_control("tcp:a:1").is_err());
        assert_eq!(parse_fraction("0.25"), Ok(0.25));
        assert_eq!(parse_fraction("1"), Ok(1.0));
        for bad in ["0", "-0.5", "1.01", "NaN", "x"] {
            assert!(parse_fraction(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert!(parse_size("2Q").is_err());
        assert_eq!(mib(64 << 20), "64 MiB");
        assert_eq!(mib(512 << 10), "0.5 MiB");
    }
}
