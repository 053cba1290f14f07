//! A real Linux guest: Debian's kernel and busybox-static booted under QEMU (TCG), with
//! an initramfs built here and its serial console read back as lines.
//!
//! `.ci/run` unpacks the Debian packages `linux-image-6.1.*-amd64` and `busybox-static`
//! into `$FERRY_GUEST_PREFIX` (default /opt/ferry-guest): `PREFIX/boot/vmlinuz-*` and
//! `PREFIX/bin/busybox`. They are required: [`GuestFiles::find`] panics naming what is
//! missing and `.ci/run`.
//!
//! The initramfs (newc cpio, uncompressed) holds busybox, [`INIT`] and a deterministic
//! data file of [`DATA_SIZE`] bytes (a mixed image, [`crate::ram::mixed_image`]), so
//! the guest's file is known to the test, md5 and all. What the guest prints on its
//! console (`ttyS0`, a file on the host), one line each:
//!
//! - `FERRY BOOTED`: once, when init starts (a second one means the guest rebooted);
//! - `MD5 INIT <hex>`: the data file's md5 when the guest first read it;
//! - `TICK <n>`: a counter, every 100 ms, from 0;
//! - `MD5 START <n>`, then `MD5 OK <n>` or `MD5 BAD <n> <hex>`: the n-th re-check of
//!   the md5, one after the other with a second's pause;
//! - `DIRTY <n>`: every 64th pass of a loop that copies 4 MiB of the data file at a
//!   moving offset into a 16 MiB tmpfs file every 50 ms (RAM dirtied continuously,
//!   never with the same bytes twice in a row).

use std::fmt;
use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use cpio::newc::{trailer, Builder, ModeFileType};

use crate::bail;
use crate::error::{Context, Error, Result};
use crate::qemu::{indent, Build, Qemu};

/// Size of the guest's data file: 64 MiB.
pub const DATA_SIZE: usize = 64 << 20;

/// Seed of the data file's mixed image.
const DATA_SEED: u64 = 13;

/// The guest's RAM: 256 MiB holds the kernel, the initramfs while it is unpacked (data
/// file included) and the unpacked files, with room to spare.
pub const GUEST_RAM: &str = "256M";

/// How often [`Guest::wait_console`] reads the console file.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// The init script: busybox's shell, the protocol in the module docs.
pub const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs -o size=32m dirty /tmp
echo "FERRY BOOTED"
init=$(md5sum /data.bin)
init=${init%% *}
echo "MD5 INIT $init"
(
    n=0
    while :; do
        echo "MD5 START $n"
        m=$(md5sum /data.bin)
        m=${m%% *}
        if [ "$m" = "$init" ]; then echo "MD5 OK $n"; else echo "MD5 BAD $n $m"; fi
        n=$((n + 1))
        sleep 1
    done
) &
(
    k=0
    while :; do
        dd if=/data.bin of=/tmp/dirty bs=64k count=64 skip=$((k * 7 % 960)) \
            seek=$((k % 4 * 64)) conv=notrunc 2>/dev/null
        if [ $((k % 64)) -eq 0 ]; then echo "DIRTY $k"; fi
        k=$((k + 1))
        usleep 50000
    done
) &
i=0
while :; do
    echo "TICK $i"
    i=$((i + 1))
    usleep 100000
done
"#;

/// The kernel command line: console on the first serial port, no kernel chatter
/// between the guest's lines, no reboot on a panic (QEMU runs with `-no-reboot`).
const APPEND: &str = "console=ttyS0 quiet loglevel=1 panic=-1";

/// The unpacked Debian packages a guest boots from.
#[derive(Debug, Clone)]
pub struct GuestFiles {
    /// `PREFIX/boot/vmlinuz-*` (the newest if there are several).
    pub kernel: PathBuf,
    /// `PREFIX/bin/busybox`, statically linked.
    pub busybox: PathBuf,
}

impl GuestFiles {
    /// The kernel and busybox under `$FERRY_GUEST_PREFIX` (default /opt/ferry-guest);
    /// panics naming the missing file and `.ci/run`, which installs them.
    pub fn find() -> GuestFiles {
        let prefix = std::env::var_os("FERRY_GUEST_PREFIX")
            .map_or_else(|| PathBuf::from("/opt/ferry-guest"), PathBuf::from);
        let hint = "run .ci/run (it unpacks Debian's linux-image-*-amd64 and busybox-static \
                    there), or set FERRY_GUEST_PREFIX";
        let boot = prefix.join("boot");
        let mut kernels: Vec<PathBuf> = fs::read_dir(&boot)
            .map(|dir| {
                dir.filter_map(|e| e.ok().map(|e| e.path()))
                    .filter(|p| {
                        p.file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(|n| n.starts_with("vmlinuz-"))
                    })
                    .collect()
            })
            .unwrap_or_default();
        kernels.sort();
        let Some(kernel) = kernels.pop() else {
            panic!("no guest kernel: no {}/vmlinuz-*; {hint}", boot.display());
        };
        let busybox = prefix.join("bin/busybox");
        assert!(
            busybox.is_file(),
            "no guest busybox: no {}; {hint}",
            busybox.display()
        );
        GuestFiles { kernel, busybox }
    }
}

/// The guest's data file: [`DATA_SIZE`] bytes of mixed pages (zero, one repeated
/// byte, text, random), a pure function of its seed.
pub fn data_file() -> Vec<u8> {
    crate::ram::mixed_image(DATA_SIZE, DATA_SEED)
}

/// The md5 of `bytes` in lowercase hex, from the host's `md5sum` (coreutils): the
/// guest's `MD5 INIT` line must say the same.
pub fn md5_hex(bytes: &[u8]) -> Result<String> {
    let mut child = Command::new("md5sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("starting md5sum")?;
    let mut stdin = child.stdin.take().expect("stdin is piped");
    let writer = thread::scope(|s| {
        let w = s.spawn(move || stdin.write_all(bytes));
        let out = child.wait_with_output();
        (w.join(), out)
    });
    let (written, out) = writer;
    written
        .map_err(|_| Error::msg("md5sum's writer thread panicked"))?
        .context("writing to md5sum")?;
    let out = out.context("running md5sum")?;
    let text = String::from_utf8_lossy(&out.stdout);
    match text.split_whitespace().next() {
        Some(hex) if out.status.success() && hex.len() == 32 => Ok(hex.to_owned()),
        _ => bail!("md5sum failed ({}): {text}", out.status),
    }
}

/// Writes the guest's initramfs to `path`: a newc cpio (what the kernel unpacks into
/// its rootfs) of the mount points, `/dev/console`, `/bin/busybox`, [`INIT`] as
/// `/init` and `data` as `/data.bin`.
pub fn write_initramfs(path: &Path, busybox: &Path, data: &[u8]) -> Result<()> {
    let busybox = fs::read(busybox).with_context(|| format!("reading {}", busybox.display()))?;
    let file = fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut archive = Archive {
        out: BufWriter::new(file),
        ino: 0,
    };
    let written = (|| -> std::io::Result<()> {
        for dir in ["bin", "dev", "proc", "sys", "tmp"] {
            archive.add(entry(dir, 0o755, ModeFileType::Directory), &[])?;
        }
        // The kernel opens /dev/console (char 5:1) for init's stdio before anything
        // is mounted.
        let console = entry("dev/console", 0o600, ModeFileType::Char);
        archive.add(console.rdev_major(5).rdev_minor(1), &[])?;
        archive.add(entry("bin/busybox", 0o755, ModeFileType::Regular), &busybox)?;
        archive.add(entry("init", 0o755, ModeFileType::Regular), INIT.as_bytes())?;
        archive.add(entry("data.bin", 0o644, ModeFileType::Regular), data)?;
        trailer(&mut archive.out)?;
        archive.out.flush()
    })();
    written.with_context(|| format!("writing the initramfs {}", path.display()))
}

/// A newc archive being written: entries get inode numbers 1, 2, ...
struct Archive {
    out: BufWriter<fs::File>,
    ino: u32,
}

impl Archive {
    /// Appends `entry` (numbered here) with contents `bytes`.
    fn add(&mut self, entry: Builder, bytes: &[u8]) -> std::io::Result<()> {
        self.ino += 1;
        let size = u32::try_from(bytes.len()).map_err(std::io::Error::other)?;
        let mut w = entry.ino(self.ino).write(&mut self.out, size);
        w.write_all(bytes)?;
        w.finish()?;
        Ok(())
    }
}

/// An archive entry: `name` relative to the root, permission bits `mode`, of type
/// `kind`.
fn entry(name: &str, mode: u32, kind: ModeFileType) -> Builder {
    Builder::new(name).mode(mode).set_mode_file_type(kind)
}

/// The machine every guest runs on, source and destination alike: `-M pc` under TCG,
/// [`GUEST_RAM`], no default devices, the kernel booted directly from `initrd`, its
/// console on the first serial port, written to `serial`.
pub fn machine_args(files: &GuestFiles, initrd: &Path, serial: &Path) -> Vec<String> {
    let mut args: Vec<String> = [
        "-M",
        "pc",
        "-accel",
        "tcg",
        "-m",
        GUEST_RAM,
        "-nodefaults",
        "-no-reboot",
    ]
    .map(String::from)
    .into();
    args.extend([
        "-kernel".into(),
        files.kernel.display().to_string(),
        "-initrd".into(),
        initrd.display().to_string(),
        "-append".into(),
        APPEND.into(),
        "-serial".into(),
        format!("file:{}", serial.display()),
    ]);
    args
}

/// One line the guest printed (see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Line {
    /// `FERRY BOOTED`.
    Booted,
    /// `MD5 INIT <hex>`.
    Md5Init(String),
    /// `TICK <n>`.
    Tick(u64),
    /// `MD5 START <n>`.
    Md5Start(u64),
    /// `MD5 OK <n>`.
    Md5Ok(u64),
    /// `MD5 BAD <n> <hex>`.
    Md5Bad(u64, String),
    /// `DIRTY <n>`.
    Dirty(u64),
}

impl Line {
    /// The line `text` is, if it is one of the guest's (kernel messages and a line
    /// cut by a migration's stop are not).
    pub fn parse(text: &str) -> Option<Line> {
        let words: Vec<&str> = text.split_whitespace().collect();
        let num = |w: &str| w.parse::<u64>().ok();
        match words.as_slice() {
            ["FERRY", "BOOTED"] => Some(Line::Booted),
            ["MD5", "INIT", hex] => Some(Line::Md5Init((*hex).to_owned())),
            ["TICK", n] => num(n).map(Line::Tick),
            ["MD5", "START", n] => num(n).map(Line::Md5Start),
            ["MD5", "OK", n] => num(n).map(Line::Md5Ok),
            ["MD5", "BAD", n, hex] => num(n).map(|n| Line::Md5Bad(n, (*hex).to_owned())),
            ["DIRTY", n] => num(n).map(Line::Dirty),
            _ => None,
        }
    }
}

/// What a guest printed so far on its console.
#[derive(Debug, Clone, Default)]
pub struct Console {
    /// The whole log, lossily decoded.
    pub text: String,
    /// The guest's lines in it, in order.
    pub lines: Vec<Line>,
}

impl Console {
    /// Reads the console log `path` (empty if it does not exist yet).
    pub fn read(path: &Path) -> Console {
        let text = fs::read(path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        // Only whole lines: the last one may still be being written.
        let complete = text.rfind('\n').map_or("", |end| &text[..end]);
        let lines = complete.lines().filter_map(Line::parse).collect();
        Console { text, lines }
    }

    /// The first `TICK` number.
    pub fn first_tick(&self) -> Option<u64> {
        self.lines.iter().find_map(|l| match l {
            Line::Tick(n) => Some(*n),
            _ => None,
        })
    }

    /// The last `TICK` number.
    pub fn last_tick(&self) -> Option<u64> {
        self.lines.iter().rev().find_map(|l| match l {
            Line::Tick(n) => Some(*n),
            _ => None,
        })
    }

    /// The `MD5 INIT` value.
    pub fn md5_init(&self) -> Option<&str> {
        self.lines.iter().find_map(|l| match l {
            Line::Md5Init(hex) => Some(hex.as_str()),
            _ => None,
        })
    }

    /// How many times the guest said `FERRY BOOTED`.
    pub fn boots(&self) -> usize {
        self.lines.iter().filter(|l| **l == Line::Booted).count()
    }

    /// Every `MD5 BAD` line.
    pub fn bad_checks(&self) -> Vec<&Line> {
        self.lines
            .iter()
            .filter(|l| matches!(l, Line::Md5Bad(..)))
            .collect()
    }

    /// The numbers of the md5 checks that both started and ended `OK` in this log.
    pub fn whole_ok_checks(&self) -> Vec<u64> {
        self.lines
            .iter()
            .filter_map(|l| match l {
                Line::Md5Ok(n) if self.lines.contains(&Line::Md5Start(*n)) => Some(*n),
                _ => None,
            })
            .collect()
    }

    /// The last `lines` lines of the log, indented, for a failure message.
    pub fn tail(&self, lines: usize) -> String {
        let all: Vec<&str> = self.text.lines().collect();
        indent(&all[all.len().saturating_sub(lines)..].join("\n"))
    }
}

/// A QEMU running (or about to run) the guest, and its console log.
#[derive(Debug)]
pub struct Guest {
    /// The QEMU process.
    pub qemu: Qemu,
    /// Its console log.
    pub serial: PathBuf,
    /// Its name in failure messages ("source", "destination 1", ...).
    pub name: String,
}

impl Guest {
    /// Starts QEMU `build` with `args` (from [`machine_args`], plus `extra`), console
    /// to `serial`.
    pub fn start(
        build: Build,
        name: &str,
        args: &[String],
        serial: &Path,
        extra: &[&str],
    ) -> Result<Guest> {
        let mut all = args.to_vec();
        all.extend(extra.iter().map(|s| (*s).to_owned()));
        let qemu =
            Qemu::spawn_build(build, &all).with_context(|| format!("starting the {name}"))?;
        Ok(Guest {
            qemu,
            serial: serial.to_owned(),
            name: name.to_owned(),
        })
    }

    /// What the guest printed so far.
    pub fn console(&self) -> Console {
        Console::read(&self.serial)
    }

    /// Polls the console until `ready` returns a value; fails after `timeout`, when
    /// QEMU exits, or when the guest reports a bad md5 or a second boot, quoting the
    /// console's tail and QEMU's stderr.
    pub fn wait_console<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut ready: impl FnMut(&Console) -> Option<T>,
    ) -> Result<T> {
        let deadline = Instant::now() + timeout;
        loop {
            let console = self.console();
            if let Some(v) = ready(&console) {
                return Ok(v);
            }
            let fault = if !console.bad_checks().is_empty() {
                Some("the guest's md5 check failed".to_owned())
            } else if console.boots() > 1 {
                Some("the guest rebooted".to_owned())
            } else if let Some(status) = self.qemu.try_exit_status() {
                Some(format!("QEMU exited ({status})"))
            } else if Instant::now() >= deadline {
                Some(format!("not within {timeout:?}"))
            } else {
                None
            };
            if let Some(fault) = fault {
                return Err(self.explain(&format!("{}: waiting for {what}: {fault}", self.name)));
            }
            thread::sleep(POLL_INTERVAL);
        }
    }

    /// `message`, the console's tail and QEMU's stderr, for a failure.
    pub fn explain(&self, message: &str) -> Error {
        Error::msg(format!(
            "{message}\n  {} console ({}), last lines:\n{}\n  {} QEMU stderr:\n{}",
            self.name,
            self.serial.display(),
            self.console().tail(25),
            self.name,
            indent(&self.qemu.stderr())
        ))
    }
}

impl fmt::Display for Line {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Line::Booted => write!(f, "FERRY BOOTED"),
            Line::Md5Init(hex) => write!(f, "MD5 INIT {hex}"),
            Line::Tick(n) => write!(f, "TICK {n}"),
            Line::Md5Start(n) => write!(f, "MD5 START {n}"),
            Line::Md5Ok(n) => write!(f, "MD5 OK {n}"),
            Line::Md5Bad(n, hex) => write!(f, "MD5 BAD {n} {hex}"),
            Line::Dirty(n) => write!(f, "DIRTY {n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_guest_line_parses_back() {
        let lines = [
            Line::Booted,
            Line::Md5Init("0123456789abcdef0123456789abcdef".into()),
            Line::Tick(41),
            Line::Md5Start(3),
            Line::Md5Ok(3),
            Line::Md5Bad(4, "ffff".into()),
            Line::Dirty(128),
        ];
        for line in lines {
            assert_eq!(Line::parse(&line.to_string()), Some(line));
        }
    }

    #[test]
    fn cut_lines_and_kernel_messages_are_not_guest_lines() {
        for text in [
            "TIC",
            "K 57",
            "TICK",
            "TICK x",
            "[ 1.0] reboot: Power down",
            "",
        ] {
            assert_eq!(Line::parse(text), None, "{text:?}");
        }
    }

    #[test]
    fn a_console_log_counts_only_whole_lines() {
        let dir = crate::files::tempdir("ferry-console-");
        let log = dir.path().join("serial.log");
        fs::write(
            &log,
            "FERRY BOOTED\nTICK 0\nMD5 START 0\nTICK 1\nMD5 OK 0\nTICK 2",
        )
        .unwrap();
        let c = Console::read(&log);
        assert_eq!((c.first_tick(), c.last_tick()), (Some(0), Some(1)));
        assert_eq!(c.whole_ok_checks(), vec![0]);
        assert_eq!(c.boots(), 1);
    }

    #[test]
    fn the_initramfs_is_a_newc_archive_busybox_can_list() {
        let files = GuestFiles::find();
        let dir = crate::files::tempdir("ferry-initrd-");
        let initrd = dir.path().join("initrd.cpio");
        write_initramfs(&initrd, &files.busybox, b"data").unwrap();
        let out = Command::new(&files.busybox)
            .args(["cpio", "-t", "-F"])
            .arg(&initrd)
            .output()
            .unwrap();
        let listed = String::from_utf8_lossy(&out.stdout);
        let names: Vec<&str> = listed.lines().collect();
        assert_eq!(
            names,
            [
                "bin",
                "dev",
                "proc",
                "sys",
                "tmp",
                "dev/console",
                "bin/busybox",
                "init",
                "data.bin"
            ],
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
