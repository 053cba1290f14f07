//! A QEMU 7.2 process driven over QMP, as a migration source or destination.
//!
//! Facts this code relies on (checked on qemu-system-x86_64 7.2.22, see
//! /work/notes/qemu-format.md):
//! - a destination that cannot load a stream prints "load of migration failed" and
//!   exits with status 1: there is no "failed" state to poll, QMP just closes;
//! - a destination fed an empty (or missing) file waits in "inmigrate" forever;
//! - a source reports "completed" before its `exec:` child has been reaped, so the file
//!   is written as `FILE.part` and renamed by the shell when `cat` has finished;
//! - COMPRESS_PAGE records load only with the `compress` capability on.
//!
//! Hence every wait has a deadline and every failure carries QEMU's stderr.

use std::ffi::OsStr;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tempfile::TempDir;

use crate::bail;
use crate::error::{Context, Error, Result};
use crate::qmp::Qmp;

/// Default deadline for a whole migration (QEMU's own compress path does ~60 MB/s
/// per thread here, so 64 MiB at level 9 takes about a second; CI machines are slower).
pub const MIGRATION_TIMEOUT: Duration = Duration::from_secs(120);

/// How long QEMU may take to open its QMP socket.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);

/// How often migration state is polled.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// The QEMU binary: `$FERRY_QEMU` or `qemu-system-x86_64` from PATH.
pub fn qemu_binary() -> PathBuf {
    std::env::var_os("FERRY_QEMU")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64"))
}

/// Which QEMU a test runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Build {
    /// The system's QEMU 7.2 (Debian 12), or `$FERRY_QEMU`.
    System,
    /// QEMU 10.0.2 unpacked into `$FERRY_QEMU10_PREFIX` (default
    /// /opt/qemu-10.0.2) by `.ci/run`, beside the system's.
    Qemu10,
}

/// The QEMU 10 install tree; panics naming what is missing.
pub fn qemu10_prefix() -> PathBuf {
    let prefix = std::env::var_os("FERRY_QEMU10_PREFIX")
        .map_or_else(|| PathBuf::from("/opt/qemu-10.0.2"), PathBuf::from);
    let bin = prefix.join("usr/bin/qemu-system-x86_64");
    assert!(
        bin.is_file(),
        "QEMU 10 is missing: no {} (set FERRY_QEMU10_PREFIX, or install it as .ci/run does)",
        bin.display()
    );
    prefix
}

impl Build {
    /// The command that starts this QEMU, before the test's own arguments.
    fn command(self) -> Command {
        match self {
            Build::System => Command::new(qemu_binary()),
            Build::Qemu10 => {
                let prefix = qemu10_prefix();
                let mut c = Command::new(prefix.join("usr/bin/qemu-system-x86_64"));
                c.env(
                    "QEMU_MODULE_DIR",
                    prefix.join("usr/lib/x86_64-linux-gnu/qemu"),
                )
                .arg("-L")
                .arg(prefix.join("usr/share/qemu"))
                .arg("-L")
                .arg(prefix.join("usr/share/seabios"));
                c
            }
        }
    }
}

/// Arguments for a RAM block backed by `ram_file` (shared, so the file *is* guest RAM:
/// a source migrates its contents, a destination's file receives the loaded pages).
/// The block's idstr in the stream is `mem`. `size` must be a whole number of MiB.
pub fn ram_file_args(ram_file: &Path, size: u64) -> Vec<String> {
    assert!(
        size > 0 && size % (1 << 20) == 0,
        "RAM size {size} is not a whole number of MiB"
    );
    vec![
        "-m".into(),
        format!("{}M", size >> 20),
        "-object".into(),
        format!(
            "memory-backend-file,id=mem,size={size},mem-path={},share=on",
            // QEMU option syntax: a literal comma is written twice.
            ram_file.display().to_string().replace(',', ",,")
        ),
        "-machine".into(),
        "memory-backend=mem".into(),
    ]
}

/// The RAM blocks of `-M pc -nodefaults` besides `mem` (QEMU 7.2 and 10).
pub const PC_BLOCKS: [&str; 5] = [
    "/rom@etc/acpi/tables",
    "pc.bios",
    "pc.rom",
    "/rom@etc/table-loader",
    "/rom@etc/acpi/rsdp",
];

/// `ferry receive --ram` options for `mem` (`dir/mem.ram`) and, on a pc,
/// its ROM blocks (`dir/rom<i>.ram`).
pub fn receive_ram_args(dir: &Path, pc: bool) -> Vec<String> {
    let mut args = vec![
        "--ram".to_owned(),
        format!("{},name=mem", dir.join("mem.ram").display()),
    ];
    if pc {
        for (i, block) in PC_BLOCKS.iter().enumerate() {
            args.push("--ram".into());
            args.push(format!(
                "{},name={block}",
                dir.join(format!("rom{i}.ram")).display()
            ));
        }
    }
    args
}

/// Arguments for the smallest machine: `-M none -nodefaults` with RAM from `ram_file`.
pub fn none_machine_args(ram_file: &Path, size: u64) -> Vec<String> {
    let mut args = vec!["-M".into(), "none".into(), "-nodefaults".into()];
    args.extend(ram_file_args(ram_file, size));
    args
}

/// Arguments for `-M pc -accel kvm -nodefaults` with RAM from `ram_file`: every device a
/// PC has, so the device state is realistic. Panics without /dev/kvm (KVM is a
/// prerequisite of these tests, as QEMU 7.2 is; TCG would take minutes).
pub fn pc_machine_args(ram_file: &Path, size: u64) -> Vec<String> {
    assert!(
        Path::new("/dev/kvm").exists(),
        "this test needs /dev/kvm (a -M pc guest under KVM); run it on a host with KVM"
    );
    let mut args: Vec<String> = ["-M", "pc", "-accel", "kvm", "-nodefaults"]
        .map(String::from)
        .into();
    args.extend(ram_file_args(ram_file, size));
    args
}

/// Arguments that attach `image` (raw) as drive `disk0` of a virtio-blk device: QEMU
/// 7.2 loads block-migration records only for a drive attached to a device.
pub fn virtio_disk_args(image: &Path) -> Vec<String> {
    vec![
        "-drive".into(),
        format!("if=none,id=disk0,file={},format=raw", image.display()),
        "-device".into(),
        "virtio-blk-pci,drive=disk0".into(),
    ]
}

/// What [`device_state_from_qemu`] took out of a QEMU source's stream.
#[derive(Debug)]
pub struct Extracted {
    /// QEMU's whole stream.
    pub stream: PathBuf,
    /// The device state (configuration and every device section).
    pub device: PathBuf,
    /// Every RAM block, in QEMU's order: its name and the file holding it.
    pub blocks: Vec<(String, PathBuf)>,
}

impl Extracted {
    /// `--ram FILE,name=BLOCK` for every block, for `ferry send`.
    pub fn ram_args(&self) -> Vec<String> {
        self.blocks
            .iter()
            .flat_map(|(n, f)| ["--ram".to_owned(), format!("{},name={n}", f.display())])
            .collect()
    }
}

/// Migrates a source QEMU started with `args` plus `-S` (never run, so its RAM is
/// exactly its file) to `DIR/qemu.mig`, and extracts the device state
/// (`DIR/device.state`) and every RAM block (`DIR/blocks/`) with `ferry inspect`.
pub fn device_state_from_qemu(dir: &Path, args: &[String]) -> Result<Extracted> {
    device_state_from(Build::System, dir, args)
}

/// [`device_state_from_qemu`] for the QEMU `build`.
pub fn device_state_from(build: Build, dir: &Path, args: &[String]) -> Result<Extracted> {
    let mut args = args.to_vec();
    args.push("-S".into());
    let stream = dir.join("qemu.mig");
    Qemu::spawn_build(build, &args)
        .context("starting the source QEMU")?
        .migrate_to_file(&stream, None)
        .context("source QEMU migrating to a file")?;
    let device = dir.join("device.state");
    let blocks_dir = dir.join("blocks");
    let out = crate::ferry::run_ferry(
        [
            "inspect".as_ref(),
            stream.as_os_str(),
            "--json".as_ref(),
            "--extract-device-state".as_ref(),
            device.as_os_str(),
            "--extract-ram".as_ref(),
            blocks_dir.as_os_str(),
        ],
        MIGRATION_TIMEOUT,
    )
    .and_then(|o| o.success())
    .context("ferry inspect of QEMU's stream")?;
    let report: Value = serde_json::from_str(&out.stdout)?;
    let Some(list) = report["ram_blocks"].as_array() else {
        bail!("ferry inspect --json has no ram_blocks: {report}");
    };
    let blocks = list
        .iter()
        .map(|b| {
            let name = b["idstr"].as_str().unwrap_or_default().to_owned();
            let file = blocks_dir.join(ferry_guest::load::block_file_name(&name));
            (name, file)
        })
        .collect();
    Ok(Extracted {
        stream,
        device,
        blocks,
    })
}

/// A `-M pc` source with mixed RAM and a mixed virtio disk, its device state
/// extracted: what a test needs to make a stream with a block section that a QEMU
/// destination with the same command line loads.
#[derive(Debug)]
pub struct PcWithDisk {
    /// Guest RAM size.
    pub ram_size: u64,
    /// The source's RAM file.
    pub ram: PathBuf,
    /// The source's disk image.
    pub image: PathBuf,
    /// The disk's bytes: 1 MiB chunks of mixed data, some all zero.
    pub disk: Vec<u8>,
    /// The source's stream, device state and RAM blocks.
    pub qemu: Extracted,
}

impl PcWithDisk {
    /// Writes RAM (`ram_size`, seed `seed`) and a disk (`disk_size`, seed `seed + 1`,
    /// the 1 MiB chunks `zero_chunks` all zero) into `dir`, and extracts the device
    /// state from a source QEMU with that machine and drive.
    pub fn new(
        dir: &Path,
        ram_size: u64,
        disk_size: usize,
        seed: u64,
        zero_chunks: &[usize],
    ) -> Result<Self> {
        let ram = dir.join("src.ram");
        crate::ram::write_mixed_image(&ram, ram_size as usize, seed)?;
        let mut disk = crate::ram::mixed_image(disk_size, seed + 1);
        for chunk in zero_chunks {
            disk[chunk << 20..(chunk + 1) << 20].fill(0);
        }
        let image = dir.join("src.img");
        fs::write(&image, &disk).context("writing the source image")?;
        let qemu = device_state_from_qemu(dir, &Self::args(&ram, ram_size, &image))?;
        Ok(PcWithDisk {
            ram_size,
            ram,
            image,
            disk,
            qemu,
        })
    }

    fn args(ram: &Path, size: u64, image: &Path) -> Vec<String> {
        let mut args = pc_machine_args(ram, size);
        args.extend(virtio_disk_args(image));
        args
    }

    /// Loads `stream` into a destination with the same machine, whose RAM file and
    /// disk image (filled with 0xa5) are in `dir`; fails unless both end up equal to
    /// the source's.
    pub fn load_and_compare(&self, dir: &Path, stream: &Path) -> Result<()> {
        let (ram, image) = (dir.join("dst.ram"), dir.join("dst.img"));
        fs::write(&image, vec![0xa5u8; self.disk.len()]).context("writing the image")?;
        let mut args = Self::args(&ram, self.ram_size, &image);
        args.extend(["-incoming".into(), "defer".into()]);
        Qemu::spawn(&args)
            .context("starting the destination")?
            .incoming_from_file(stream, true)
            .context("QEMU loading ferry's stream")?;
        let got = fs::read(&image).context("reading the destination image")?;
        if let Some(at) = crate::ram::first_difference(&got, &self.disk) {
            bail!("the destination disk differs from the source at byte {at:#x}");
        }
        let (got, want) = (fs::read(&ram)?, fs::read(&self.ram)?);
        if let Some(at) = crate::ram::first_difference(&got, &want) {
            bail!("the destination RAM differs from the source at byte {at:#x}");
        }
        Ok(())
    }
}

/// A running QEMU. Killed (SIGKILL) and reaped on drop.
#[derive(Debug)]
pub struct Qemu {
    child: Child,
    qmp: Qmp,
    stderr_path: PathBuf,
    /// Deadline for [`Qemu::migrate_to_file`] and [`Qemu::incoming_from_file`].
    pub migration_timeout: Duration,
    /// Holds the QMP socket and the stderr log; removed after the child is dead.
    dir: TempDir,
}

impl Qemu {
    /// Start QEMU with `args` plus `-display none` and a QMP socket in a fresh temporary
    /// directory, and complete the QMP handshake.
    pub fn spawn<I, S>(args: I) -> Result<Qemu>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        Self::spawn_build(Build::System, args)
    }

    /// [`Qemu::spawn`] for the QEMU `build`.
    pub fn spawn_build<I, S>(build: Build, args: I) -> Result<Qemu>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let dir = tempfile::Builder::new()
            .prefix("ferry-qemu-")
            .tempdir()
            .context("creating a temporary directory for QEMU")?;
        let socket = dir.path().join("qmp.sock");
        let stderr_path = dir.path().join("stderr.log");
        let stderr = fs::File::create(&stderr_path).context("creating QEMU's stderr log")?;
        let mut command = build.command();
        let binary = PathBuf::from(command.get_program());
        command
            .args(args)
            .arg("-display")
            .arg("none")
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", socket.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        let child = command.spawn().map_err(|e| {
            Error::msg(format!(
                "cannot start {} ({e}); QEMU 7.2 is required: apt-get install qemu-system-x86 (see .ci/run)",
                binary.display()
            ))
        })?;
        let mut starting = Starting {
            child: Some(child),
            stderr_path: &stderr_path,
        };
        let qmp = starting.connect(&socket)?;
        let child = starting
            .child
            .take()
            .expect("child present until connected");
        drop(starting);
        Ok(Qemu {
            child,
            qmp,
            stderr_path,
            migration_timeout: MIGRATION_TIMEOUT,
            dir,
        })
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Directory private to this QEMU (for its socket and logs; tests may use it too).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Everything QEMU wrote to stderr so far.
    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr_path)
            .unwrap_or_else(|e| format!("<stderr unreadable: {e}>"))
    }

    /// Exit status, if QEMU has exited.
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Run a QMP command; on failure the error includes QEMU's exit status and stderr.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        match self.qmp.execute(command, arguments) {
            Ok(v) => Ok(v),
            Err(e) => Err(self.explain(e)),
        }
    }

    /// QMP events received so far (MIGRATION needs the `events` capability).
    pub fn take_events(&mut self) -> Vec<Value> {
        self.qmp.take_events()
    }

    /// Poll `query-migrate` until its status is `status`; returns the last reply.
    /// Fails at once on "failed"/"cancelled" (unless that is what was asked for), when
    /// QEMU exits, or when `timeout` passes.
    pub fn wait_migration(&mut self, status: &str, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let info = self
                .execute("query-migrate", None)
                .map_err(|e| Error::msg(format!("waiting for migration status {status:?}: {e}")))?;
            let now = info.get("status").and_then(Value::as_str).unwrap_or("");
            if now == status {
                return Ok(info);
            }
            if matches!(now, "failed" | "cancelled") {
                let desc = info.get("error-desc").and_then(Value::as_str).unwrap_or("");
                return Err(self.explain(Error::msg(format!(
                    "migration {now} while waiting for {status:?}: {desc}"
                ))));
            }
            if Instant::now() >= deadline {
                return Err(self.explain(Error::msg(format!(
                    "migration status still {now:?} after {timeout:?} (waiting for {status:?}); last query-migrate: {info}"
                ))));
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// Migrate to `path` with `exec:`; `compress` = Some((threads, level)) turns on
    /// QEMU's compress capability. Returns once the file is complete, with the final
    /// `query-migrate` reply.
    pub fn migrate_to_file(&mut self, path: &Path, compress: Option<(u8, u8)>) -> Result<Value> {
        if let Some((threads, level)) = compress {
            self.set_capability("compress", true)?;
            self.execute(
                "migrate-set-parameters",
                Some(json!({ "compress-threads": threads, "compress-level": level })),
            )?;
        }
        let mut part = path.as_os_str().to_owned();
        part.push(".part");
        let part = PathBuf::from(part);
        let _ = fs::remove_file(path);
        // `completed` is reported before QEMU reaps `cat`: the rename marks the real end.
        let uri = format!(
            "exec:cat > {} && mv {} {}",
            shell_quote(&part),
            shell_quote(&part),
            shell_quote(path)
        );
        self.execute("migrate", Some(json!({ "uri": uri })))?;
        let timeout = self.migration_timeout;
        let deadline = Instant::now() + timeout;
        let info = self
            .wait_migration("completed", timeout)
            .with_context(|| format!("migrating to {}", path.display()))?;
        while !path.exists() {
            if Instant::now() >= deadline {
                return Err(self.explain(Error::msg(format!(
                    "migration completed but {} did not appear within {timeout:?}",
                    path.display()
                ))));
            }
            thread::sleep(POLL_INTERVAL);
        }
        Ok(info)
    }

    /// Load a stream from `path` into this QEMU, which must have been started with
    /// `-incoming defer`. `compress` turns on the capability COMPRESS_PAGE needs.
    /// Returns the final `query-migrate` reply ("completed").
    pub fn incoming_from_file(&mut self, path: &Path, compress: bool) -> Result<Value> {
        // `cat` of a missing file leaves QEMU waiting forever: say so now instead.
        if !path.is_file() {
            bail!("incoming stream {} does not exist", path.display());
        }
        if compress {
            self.set_capability("compress", true)?;
        }
        let uri = format!("exec:cat {}", shell_quote(path));
        self.execute("migrate-incoming", Some(json!({ "uri": uri })))?;
        let timeout = self.migration_timeout;
        self.wait_migration("completed", timeout)
            .with_context(|| format!("loading {} into QEMU", path.display()))
    }

    /// Turn one migration capability on or off.
    /// [`Qemu::execute`] for a test: the reply's `return`, or a panic naming
    /// the command and quoting QEMU's stderr.
    pub fn qmp(&mut self, command: &str, arguments: Value) -> Value {
        self.execute(command, Some(arguments))
            .unwrap_or_else(|e| panic!("QMP {command}: {e}"))
    }

    /// Waits until query-migrate says `completed`; panics on anything else
    /// within [`MIGRATION_TIMEOUT`].
    pub fn wait_completed(&mut self) {
        if let Err(e) = self.wait_migration("completed", MIGRATION_TIMEOUT) {
            panic!("{e}");
        }
    }

    pub fn set_capability(&mut self, name: &str, state: bool) -> Result<()> {
        self.execute(
            "migrate-set-capabilities",
            Some(json!({ "capabilities": [{ "capability": name, "state": state }] })),
        )?;
        Ok(())
    }

    /// Add QEMU's exit status (if it exited) and stderr to an error.
    fn explain(&mut self, e: Error) -> Error {
        // A destination that failed exits right after closing QMP: give it a moment.
        let mut status = self.try_exit_status();
        for _ in 0..20 {
            if status.is_some() {
                break;
            }
            thread::sleep(Duration::from_millis(10));
            status = self.try_exit_status();
        }
        let status = match status {
            Some(s) => format!("QEMU exited ({s})"),
            None => "QEMU still running".to_string(),
        };
        Error::msg(format!(
            "{e}\n  {status}; QEMU stderr:\n{}",
            indent(&self.stderr())
        ))
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        // Child::kill sends SIGKILL; wait reaps it so no zombie outlives the test.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A child that has not finished its QMP handshake yet: killed on error.
struct Starting<'a> {
    child: Option<Child>,
    stderr_path: &'a Path,
}

impl Starting<'_> {
    fn connect(&mut self, socket: &Path) -> Result<Qmp> {
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            let child = self.child.as_mut().expect("child present until connected");
            if let Ok(Some(status)) = child.try_wait() {
                bail!(
                    "QEMU exited during startup ({status}); stderr:\n{}",
                    indent(&fs::read_to_string(self.stderr_path).unwrap_or_default())
                );
            }
            if socket.exists() {
                if let Ok(qmp) = Qmp::connect(socket) {
                    return Ok(qmp);
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "QEMU did not open its QMP socket {} within {STARTUP_TIMEOUT:?}; stderr:\n{}",
                    socket.display(),
                    indent(&fs::read_to_string(self.stderr_path).unwrap_or_default())
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Starting<'_> {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Quote a path for `/bin/sh` (QEMU runs `exec:` URIs with `sh -c`).
pub fn shell_quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', r"'\''"))
}

/// `text` indented by four spaces for a failure message (`<empty>` if blank).
pub fn indent(text: &str) -> String {
    let text = text.trim_end();
    if text.is_empty() {
        return "    <empty>".to_string();
    }
    text.lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_survives_quotes_and_spaces() {
        assert_eq!(shell_quote(Path::new("/tmp/a b")), "'/tmp/a b'");
        assert_eq!(shell_quote(Path::new("/tmp/it's")), r"'/tmp/it'\''s'");
    }

    #[test]
    fn none_machine_has_backend() {
        let args = none_machine_args(Path::new("/tmp/r"), 64 << 20);
        assert!(args.contains(&"64M".to_string()));
        assert!(args
            .iter()
            .any(|a| a.starts_with("memory-backend-file,id=mem,size=67108864,")));
    }
}
