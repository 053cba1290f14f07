//! A real Linux guest migrated live through ferry: Debian's kernel and busybox booted
//! under QEMU TCG (`-M pc`, 256 MiB), its init keeping a 64 MiB file with its md5,
//! dirtying RAM continuously and printing a counter on the serial console (see
//! `ferry_tests::linux`).
//!
//! Each hop: the running guest migrates live from its QEMU into `ferry receive
//! --device-state-out` (RAM blocks to files, the device state to a file), `ferry send
//! --device-state` moves both into a fresh destination QEMU of the same version and
//! command line (`-incoming defer`, `-S`), which is resumed with `cont`. The counter
//! must go on from where the source stopped (not from 0: no reboot), and an md5 check
//! that ran wholly on the destination must say OK.
//!
//! QEMU 7.2: a plain hop, then the destination migrates on through a `--compress` hop.
//! QEMU 10: a hop with two multifd channels on both legs (QEMU's `multifd` capability
//! on the source and the destination), then a plain one. Every `ferry send` opens the
//! return path and succeeds only on the destination's SHUT 0.
//!
//! And the check can fail: one page of the data file changed between `ferry receive`
//! and `ferry send` makes the resumed guest print `MD5 BAD`.
//!
//! The kernel and busybox come from `.ci/run` (`$FERRY_GUEST_PREFIX`); without them
//! every test here fails, saying so.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_tests::ferry::{ferry_bin, run_ferry};
use ferry_tests::files::{read_json, shm_tempdir};
use ferry_tests::linux::{self, Console, Guest, GuestFiles};
use ferry_tests::proc::ferry;
use ferry_tests::qemu::Build;
use ferry_tests::ram;
use serde_json::{json, Value};
use tempfile::TempDir;

/// Boot to the first md5 and a few counter lines: 10 s under TCG on this machine when
/// idle, 30-40 s with four other builds running.
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);
/// One migration leg (256 MiB over loopback, the guest dirtying).
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(90);
/// A resumed guest's first lines and one whole md5 check (about 2 s under TCG).
const RESUME_TIMEOUT: Duration = Duration::from_secs(60);

/// How a hop moves the guest: the `ferry send` options and the QEMU capabilities
/// they need on both ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hop {
    /// Plain precopy both legs.
    Plain,
    /// Plain into ferry; `ferry send --compress` into a QEMU with `compress` on.
    Compress,
    /// Multifd with this many channels on both legs.
    Multifd(u8),
}

/// The initramfs of one test and what its data file's md5 is.
struct Image {
    build: Build,
    start: Instant,
    dir: TempDir,
    files: GuestFiles,
    initrd: PathBuf,
    md5: String,
}

impl Image {
    fn new(build: Build) -> Image {
        let start = Instant::now();
        let files = GuestFiles::find();
        // Any build of the binary happens now, not while a guest waits.
        ferry_bin();
        let dir = shm_tempdir("ferry-linux-");
        let data = linux::data_file();
        let md5 = linux::md5_hex(&data).unwrap_or_else(|e| panic!("{e}"));
        let initrd = dir.path().join("initrd.cpio");
        linux::write_initramfs(&initrd, &files.busybox, &data).unwrap_or_else(|e| panic!("{e}"));
        let image = Image {
            build,
            start,
            dir,
            files,
            initrd,
            md5,
        };
        image.step("initramfs written");
        image
    }

    /// Prints how long the test has run at `what` (shown with `--nocapture`: where
    /// the time of a slow run went).
    fn step(&self, what: &str) {
        let secs = self.start.elapsed().as_secs_f64();
        eprintln!("[{secs:6.1}s] {:?}: {what}", self.build);
    }

    /// The command line of a guest whose console goes to `serial`.
    fn args(&self, serial: &Path) -> Vec<String> {
        linux::machine_args(&self.files, &self.initrd, serial)
    }

    /// Boots the source and waits until it has checked in: its first md5 equal to
    /// the host's, the counter going, RAM being dirtied.
    fn boot(&self) -> Guest {
        let build = self.build;
        let serial = self.dir.path().join("source.serial");
        let mut guest = Guest::start(build, "source", &self.args(&serial), &serial, &[])
            .unwrap_or_else(|e| panic!("{e}"));
        let md5 = guest
            .wait_console(
                "the first md5, 5 ticks and a dirtying pass",
                BOOT_TIMEOUT,
                |c| {
                    let ready = c.last_tick()? >= 5
                        && c.lines.iter().any(|l| matches!(l, linux::Line::Dirty(_)));
                    ready.then(|| c.md5_init().map(str::to_owned)).flatten()
                },
            )
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            md5, self.md5,
            "the guest's md5 of its data file is not the host's"
        );
        self.step("source booted");
        guest
    }
}

/// The RAM blocks `guest`'s QEMU has, in its order (HMP `info ramblock`: a header
/// line, then one block a line, its name first).
fn ram_blocks(guest: &mut Guest) -> Vec<String> {
    let out = guest.qemu.qmp(
        "human-monitor-command",
        json!({ "command-line": "info ramblock" }),
    );
    let text = out.as_str().unwrap_or_default();
    let blocks: Vec<String> = text
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect();
    assert!(
        blocks.iter().any(|b| b == "pc.ram"),
        "info ramblock has no pc.ram: {text}"
    );
    blocks
}

/// Sets QEMU's capabilities for `hop` on one end of a leg into or out of ferry:
/// `multifd` on or off (a destination of a multifd hop that migrates on keeps it
/// otherwise), `compress` on a `--compress` hop's destination.
fn capabilities(guest: &mut Guest, hop: Hop, sender_side: bool) {
    let multifd = matches!(hop, Hop::Multifd(_));
    let set = |guest: &mut Guest, name: &str, on: bool| {
        if let Err(e) = guest.qemu.set_capability(name, on) {
            panic!("{}", guest.explain(&format!("setting {name} to {on}: {e}")));
        }
    };
    set(guest, "multifd", multifd);
    if let Hop::Multifd(channels) = hop {
        guest.qemu.qmp(
            "migrate-set-parameters",
            json!({ "multifd-channels": channels }),
        );
    }
    if hop == Hop::Compress && !sender_side {
        set(guest, "compress", true);
    }
}

/// One hop: `src` migrates live into `ferry receive`, `ferry send` moves what it
/// received into a fresh destination (the same QEMU and command line), which is
/// resumed. Returns the destination, running; fails unless the guest went on where it
/// stopped with its md5 OK.
fn hop(image: &Image, src: &mut Guest, hop: Hop, n: usize) -> Guest {
    let (mut dst, stopped_at) = move_guest(image, src, hop, n, None);
    assert_continues(&mut dst, stopped_at);
    image.step(&format!("hop {n}: destination ran on, md5 OK"));
    dst
}

/// [`hop`] up to `cont`; with `tamper`, every copy of that page in the received
/// `pc.ram` gets one byte flipped before `ferry send` reads it. Returns the resumed
/// destination and the source's last counter value.
fn move_guest(
    image: &Image,
    src: &mut Guest,
    hop: Hop,
    n: usize,
    tamper: Option<&[u8]>,
) -> (Guest, u64) {
    let build = image.build;
    let d = image.dir.path().join(format!("hop{n}"));
    fs::create_dir_all(&d).expect("creating the hop's directory");
    let blocks = ram_blocks(src);
    let device = d.join("device.state");
    let files: Vec<PathBuf> = blocks
        .iter()
        .map(|b| d.join(ferry_guest::load::block_file_name(b)))
        .collect();
    let rams: Vec<String> = blocks
        .iter()
        .zip(&files)
        .flat_map(|(b, f)| ["--ram".to_owned(), format!("{},name={b}", f.display())])
        .collect();
    let (stopped_at, info) = into_ferry(src, hop, &d, &rams, &device);
    image.step(&format!(
        "hop {n} ({hop:?}): in ferry, source stopped at TICK {stopped_at}; \
         QEMU sent {} bytes in {} ms, downtime {} ms, {} dirty-log syncs",
        info["ram"]["transferred"],
        info["total-time"],
        info["downtime"],
        info["ram"]["dirty-sync-count"]
    ));
    let serial = d.join("destination.serial");
    let mut dst = Guest::start(
        build,
        &format!("destination {n}"),
        &image.args(&serial),
        &serial,
        &["-S", "-incoming", "defer"],
    )
    .unwrap_or_else(|e| panic!("{e}"));
    capabilities(&mut dst, hop, false);
    if let Some(page) = tamper {
        flip_every_copy(&d.join(ferry_guest::load::block_file_name("pc.ram")), page);
    }
    let sock = d.join("in.sock");
    let to = format!("unix:{}", sock.display());
    dst.qemu.qmp("migrate-incoming", json!({ "uri": to }));
    send(&mut dst, hop, &d, &rams, &device, &to);
    image.step(&format!("hop {n}: destination loaded"));
    // Nothing the source wrote is needed any more: free the tmpfs.
    for f in &files {
        let _ = fs::remove_file(f);
    }
    dst.qemu.qmp("cont", json!({}));
    (dst, stopped_at)
}

/// Flips the first byte of every 4 KiB page of the RAM file `ram` that equals `page`;
/// panics if there is none.
fn flip_every_copy(ram: &Path, page: &[u8]) {
    let mut bytes = fs::read(ram).unwrap_or_else(|e| panic!("reading {}: {e}", ram.display()));
    let mut copies = 0;
    for chunk in bytes.chunks_exact_mut(page.len()) {
        if chunk == page {
            chunk[0] ^= 0xff;
            copies += 1;
        }
    }
    assert!(
        copies > 0,
        "the data file's page is not in {}",
        ram.display()
    );
    fs::write(ram, &bytes).unwrap_or_else(|e| panic!("writing {}: {e}", ram.display()));
}

/// Migrates `src` live into `ferry receive` (`rams`: its `--ram` options), device
/// state to `device`; returns the last counter value the source printed before it
/// stopped and QEMU's last `query-migrate`, after checking that the guest counted
/// while it migrated and that QEMU sent rounds after the first pass (a live
/// migration).
fn into_ferry(src: &mut Guest, hop: Hop, d: &Path, rams: &[String], device: &Path) -> (u64, Value) {
    let mut args = vec![
        "receive".to_owned(),
        "--listen".into(),
        "tcp:127.0.0.1:0".into(),
        "--device-state-out".into(),
        device.display().to_string(),
    ];
    args.extend_from_slice(rams);
    if let Hop::Multifd(channels) = hop {
        args.extend(["--multifd-channels".into(), channels.to_string()]);
    }
    let (mut receiver, addr) = ferry(&args)
        .start_listening(&d.join("receive.log"))
        .unwrap_or_else(|e| panic!("starting ferry receive: {e}"));
    capabilities(src, hop, true);
    // 128 MiB/s: the first pass over the guest's RAM takes over a second, long
    // enough for the guest to count and dirty pages QEMU then sends again, short
    // enough for the test (QEMU 7.2's default, 32 MiB/s, would take 8 s).
    src.qemu.qmp(
        "migrate-set-parameters",
        json!({ "max-bandwidth": 128u64 << 20, "downtime-limit": 500 }),
    );
    let before = src.console().last_tick().unwrap_or(0);
    src.qemu.qmp("migrate", json!({ "uri": addr }));
    let info = src
        .qemu
        .wait_migration("completed", MIGRATION_TIMEOUT)
        .unwrap_or_else(|e| {
            panic!(
                "{}\nferry receive:\n{}",
                src.explain(&e.to_string()),
                receiver.stderr()
            )
        });
    let status = receiver
        .wait(MIGRATION_TIMEOUT)
        .unwrap_or_else(|e| panic!("ferry receive did not end: {e}"));
    assert!(
        status.success(),
        "ferry receive failed: {}",
        receiver.stderr()
    );
    assert!(
        device.is_file(),
        "ferry receive wrote no {}",
        device.display()
    );
    let syncs = info["ram"]["dirty-sync-count"].as_u64().unwrap_or(0);
    assert!(
        syncs >= 3,
        "QEMU synced its dirty log {syncs} times: no round after the first pass; query-migrate: {info}"
    );
    let console = src.console();
    let stopped_at = console.last_tick().expect("the source printed ticks");
    assert!(
        stopped_at > before,
        "the source printed no tick while it migrated (TICK {before} before, {stopped_at} after); query-migrate: {info}\n{}",
        console.tail(10)
    );
    (stopped_at, info)
}

/// `ferry send --return-path` of the received blocks (`rams`: `--ram` options) and
/// device state into `dst` at `to`; waits until the destination completed the load.
fn send(dst: &mut Guest, hop: Hop, d: &Path, rams: &[String], device: &Path, to: &str) {
    let mut args = vec![
        "send".to_owned(),
        "--to".into(),
        to.into(),
        "--device-state".into(),
        device.display().to_string(),
        "--no-progress".into(),
        "--stats-json".into(),
        d.join("send.json").display().to_string(),
        "--return-path".into(),
    ];
    args.extend_from_slice(rams);
    match hop {
        Hop::Plain => {}
        Hop::Compress => args.push("--compress".into()),
        Hop::Multifd(channels) => {
            args.extend(["--multifd-channels".into(), channels.to_string()]);
        }
    }
    let out = run_ferry(&args, MIGRATION_TIMEOUT).unwrap_or_else(|e| panic!("ferry send: {e}"));
    assert!(
        out.status.success(),
        "{}",
        dst.explain(&format!("ferry send ({hop:?}) failed: {}", out.stderr))
    );
    dst.qemu
        .wait_migration("completed", MIGRATION_TIMEOUT)
        .unwrap_or_else(|e| panic!("{}", dst.explain(&e.to_string())));
    let st = read_json(&d.join("send.json"));
    assert_eq!(st["status"], "completed", "{st}");
    assert!(out.stderr.contains("SHUT 0"), "no SHUT 0: {}", out.stderr);
}

/// The resumed `dst` must go on counting after `stopped_at` (the first counter line
/// within two of it: a line cut by the stop is lost), without a reboot, and pass an
/// md5 check that started and ended on it.
fn assert_continues(dst: &mut Guest, stopped_at: u64) {
    let first = dst
        .wait_console(
            "the first tick after cont",
            RESUME_TIMEOUT,
            Console::first_tick,
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let console = dst.console();
    if !(stopped_at < first && first <= stopped_at + 2) || console.boots() > 0 {
        panic!(
            "{}",
            dst.explain(&format!(
                "the destination's counter starts at {first} (boots: {}), the source stopped at {stopped_at}",
                console.boots()
            ))
        );
    }
    let check = dst
        .wait_console(
            "an md5 check wholly on the destination",
            RESUME_TIMEOUT,
            |c| c.whole_ok_checks().first().copied(),
        )
        .unwrap_or_else(|e| panic!("{e}"));
    let last = dst.console().last_tick().unwrap_or(first);
    assert!(
        last > first,
        "{}",
        dst.explain(&format!(
            "the counter stopped at {last} (md5 check {check} OK)"
        ))
    );
}

#[test]
fn qemu72_guest_through_ferry_plain_then_compressed() {
    let image = Image::new(Build::System);
    let mut src = image.boot();
    let mut dst1 = hop(&image, &mut src, Hop::Plain, 1);
    drop(src);
    let _dst2 = hop(&image, &mut dst1, Hop::Compress, 2);
}

#[test]
fn qemu10_guest_through_ferry_over_two_multifd_channels_then_plain() {
    let image = Image::new(Build::Qemu10);
    let mut src = image.boot();
    let mut dst1 = hop(&image, &mut src, Hop::Multifd(2), 1);
    drop(src);
    let _dst2 = hop(&image, &mut dst1, Hop::Plain, 2);
}

/// The md5 check is real: one page of the data file changed between `ferry receive`
/// and `ferry send` (a random page, so no other page equals it by chance) makes the
/// resumed guest report BAD.
#[test]
fn a_data_page_changed_in_transit_makes_the_guest_report_a_bad_md5() {
    let image = Image::new(Build::System);
    let mut src = image.boot();
    let index = 8 * 1000 + 7;
    assert_eq!(ram::page_kind(index), ram::PageKind::Random);
    let data = linux::data_file();
    let page = &data[index * ram::PAGE_SIZE..(index + 1) * ram::PAGE_SIZE];
    let (mut dst, _) = move_guest(&image, &mut src, Hop::Plain, 1, Some(page));
    let bad = dst
        .wait_console("an MD5 BAD line", RESUME_TIMEOUT, |c| {
            c.bad_checks().first().map(|l| l.to_string())
        })
        .unwrap_or_else(|e| panic!("{e}"));
    image.step(&format!("the destination said {bad}"));
}
