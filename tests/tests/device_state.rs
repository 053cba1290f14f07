//! Device state end to end: a QEMU source's configuration and device sections
//! go through `ferry receive --device-state-out` and `ferry send
//! --device-state` into a QEMU destination, which loads them; between two
//! ferries the sender's file reaches the receiver's byte for byte.
//!
//! Sources are paused (`-S`, TCG) `-M pc` machines with the whole PC device
//! set, their RAM a shared file of mixed pages, so the destination's RAM must
//! equal it and every device section must load where QEMU checks each one
//! against its own devices (a section cut short, or one byte off, fails QEMU's
//! load with "error while loading state").
//!
//! A live migration from a `ferry loadgen` guest carries the device state the
//! guest saves after `stop`, not a start-time capture.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_tests::ferry::run_ferry;
use ferry_tests::files::{assert_same_file, shm_tempdir};
use ferry_tests::guest::loadgen;
use ferry_tests::migrate;
use ferry_tests::proc::{self, ferry, Process};
use ferry_tests::qemu::{ram_file_args, receive_ram_args, Build, Qemu};
use ferry_tests::ram::write_mixed_image;
use serde_json::json;
use tempfile::TempDir;

const RAM: u64 = 64 << 20;
const TIMEOUT: Duration = Duration::from_secs(120);

/// How the source sends.
#[derive(Debug, Clone, Copy)]
enum Mode {
    Precopy,
    Multifd(u8, &'static str),
}

/// `-M machine -nodefaults -accel tcg` with RAM from `ram`, plus `extra`.
fn machine_args(machine: &str, ram: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = ["-M", machine, "-nodefaults", "-accel", "tcg"]
        .map(String::from)
        .into();
    args.extend(ram_file_args(ram, RAM));
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// Every block of a pc machine as `--ram FILE,name=BLOCK`, files in `d`.
fn pc_ram_args(d: &Path) -> Vec<String> {
    receive_ram_args(d, true)
}

/// `ferry receive` of a pc machine into `d`, writing its device state to `out`.
fn receive(d: &Path, mode: Mode, out: &Path) -> (Process, String) {
    let mut args = vec![
        "receive".to_owned(),
        "--listen".into(),
        "tcp:127.0.0.1:0".into(),
        "--device-state-out".into(),
        out.display().to_string(),
    ];
    args.extend(pc_ram_args(d));
    if let Mode::Multifd(channels, _) = mode {
        args.extend(["--multifd-channels".into(), channels.to_string()]);
    }
    ferry(&args)
        .start_listening(&d.join("receive.log"))
        .unwrap_or_else(|e| panic!("starting ferry receive: {e}"))
}

/// QEMU `build` (machine `machine`, paused) migrates live into `ferry receive
/// --device-state-out`; `ferry send --device-state` writes a stream of the
/// received RAM and that state; a fresh QEMU of the same build and machine
/// loads it. Returns the directory and its device-state file.
fn qemu_through_ferry_to_qemu(build: Build, machine: &str, mode: Mode) -> (TempDir, PathBuf) {
    let dir = shm_tempdir("ferry-devstate-");
    let d = dir.path().to_owned();
    let source_ram = d.join("source.ram");
    write_mixed_image(&source_ram, RAM as usize, 11).expect("writing the source RAM");
    let mut qemu = Qemu::spawn_build(build, machine_args(machine, &source_ram, &["-S"]))
        .unwrap_or_else(|e| panic!("starting the {build:?} source ({machine}): {e}"));
    let state = d.join("device.state");
    let (mut receiver, addr) = receive(&d, mode, &state);
    if let Mode::Multifd(channels, compression) = mode {
        qemu.set_capability("multifd", true).expect("multifd");
        qemu.qmp(
            "migrate-set-parameters",
            json!({"multifd-channels": channels, "multifd-compression": compression}),
        );
    }
    qemu.qmp("migrate", json!({ "uri": addr }));
    let what = format!("{build:?} {machine} {mode:?}");
    qemu.wait_migration("completed", TIMEOUT)
        .unwrap_or_else(|e| panic!("{what}: {e}\nferry: {}", receiver.stderr()));
    let status = receiver.wait(TIMEOUT).expect("ferry receive ends");
    assert!(status.success(), "{what}: {}", receiver.stderr());
    assert_same_file(&source_ram, &d.join("mem.ram"));
    let bytes = std::fs::read(&state).expect("the device state was written");
    assert!(
        bytes.len() > 10_000,
        "{what}: a pc machine's device state is tens of KB, got {}",
        bytes.len()
    );
    drop(qemu);

    let stream = d.join("ferry.mig");
    let mut send = vec![
        "send".to_owned(),
        "--to".into(),
        format!("file:{}", stream.display()),
        "--device-state".into(),
        state.display().to_string(),
    ];
    send.extend(pc_ram_args(&d));
    run_ferry(&send, TIMEOUT)
        .and_then(|o| o.success())
        .unwrap_or_else(|e| panic!("{what}: ferry send --device-state: {e}"));
    let dest_ram = d.join("dest.ram");
    let mut dest = Qemu::spawn_build(
        build,
        machine_args(machine, &dest_ram, &["-S", "-incoming", "defer"]),
    )
    .expect("starting the destination");
    dest.incoming_from_file(&stream, false)
        .unwrap_or_else(|e| panic!("{what}: QEMU loading the relayed stream: {e}"));
    assert_same_file(&source_ram, &dest_ram);
    // The loaded machine runs: its devices took the state.
    dest.qmp("cont", json!({}));
    let status = dest.qmp("query-status", json!({}));
    assert_eq!(status["status"], "running", "{what}: {status}");
    (dir, state)
}

#[test]
fn qemu72_pc_through_receive_and_send_into_qemu72() {
    qemu_through_ferry_to_qemu(Build::System, "pc", Mode::Precopy);
}

#[test]
fn qemu10_pc_through_receive_and_send_into_qemu10() {
    qemu_through_ferry_to_qemu(Build::Qemu10, "pc-i440fx-10.0", Mode::Precopy);
}

#[test]
fn qemu10_multifd_pc_through_receive_and_send_into_qemu10() {
    qemu_through_ferry_to_qemu(Build::Qemu10, "pc-i440fx-10.0", Mode::Multifd(2, "zstd"));
}

/// ferry to ferry: what `ferry send --device-state` takes is what `ferry
/// receive --device-state-out` writes, byte for byte; a receive that fails
/// writes no file.
#[test]
fn ferry_to_ferry_carries_the_device_state_byte_for_byte() {
    let (_source, state) = qemu_through_ferry_to_qemu(Build::System, "pc", Mode::Precopy);
    let dir = shm_tempdir("ferry-devstate-f2f-");
    let d = dir.path();
    let ram = d.join("guest.ram");
    write_mixed_image(&ram, 8 << 20, 5).expect("writing RAM");
    let out = d.join("out.state");
    let (mut receiver, addr) = ferry(&[
        "receive".to_owned(),
        "--listen".into(),
        "tcp:127.0.0.1:0".into(),
        "--ram".into(),
        format!("{},name=guest", d.join("dest.ram").display()),
        "--device-state-out".into(),
        out.display().to_string(),
    ])
    .start_listening(&d.join("receive.log"))
    .expect("starting ferry receive");
    // `ferry send` of the guest's RAM and `state` to `to`.
    let send = |to: String, what: &str| {
        run_ferry(
            [
                "send".to_owned(),
                "--ram".into(),
                format!("{},name=guest", ram.display()),
                "--device-state".into(),
                state.display().to_string(),
                "--to".into(),
                to,
            ],
            TIMEOUT,
        )
        .and_then(|o| o.success())
        .unwrap_or_else(|e| panic!("{what}: {e}"))
    };
    send(addr, "ferry send");
    assert!(receiver.wait(TIMEOUT).expect("receive ends").success());
    assert_same_file(&ram, &d.join("dest.ram"));
    assert_same_file(&state, &out);

    // A stream cut short: no device state file, and nothing left under a
    // temporary name either.
    let stream = d.join("whole.mig");
    send(format!("file:{}", stream.display()), "ferry send to a file");
    let mut bytes = std::fs::read(&stream).unwrap();
    bytes.truncate(bytes.len() - 100);
    let cut = d.join("cut.mig");
    std::fs::write(&cut, bytes).unwrap();
    let cut_out = d.join("cut.state");
    let o = run_ferry(
        [
            "receive".to_owned(),
            "--listen".into(),
            format!("file:{}", cut.display()),
            "--ram".into(),
            format!("{},name=guest", d.join("cut.ram").display()),
            "--device-state-out".into(),
            cut_out.display().to_string(),
        ],
        TIMEOUT,
    )
    .expect("ferry receive runs");
    assert!(!o.status.success(), "a cut stream loaded: {}", o.stderr);
    assert!(!cut_out.exists(), "a failed receive wrote the device state");
    let left: Vec<_> = std::fs::read_dir(d)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("device-state"))
        .collect();
    assert!(left.is_empty(), "temporary files left: {left:?}");
}

/// Where a device section's body starts in `stream`: after the FULL header
/// naming `idstr` (marker, be32 id, counted idstr, be32 instance and
/// version). Returns (section id, body offset).
fn section_body(stream: &[u8], idstr: &str) -> (u32, usize) {
    let mut name = vec![idstr.len() as u8];
    name.extend_from_slice(idstr.as_bytes());
    let at = stream
        .windows(name.len())
        .position(|w| w == &name[..])
        .unwrap_or_else(|| panic!("no section {idstr:?} in the stream"));
    assert_eq!(stream[at - 5], 0x04, "{idstr} is a FULL section");
    let id = u32::from_be_bytes(stream[at - 4..at].try_into().unwrap());
    (id, at + name.len() + 8)
}

/// `7e <id> 00 06 <len>`: a footer of section `id`, the EOF marker and a
/// vmdesc header, which is what a parser that searches for footers takes
/// for the end of the device state.
fn fake_end(id: u32, len: u32) -> Vec<u8> {
    let mut b = vec![0x7e];
    b.extend_from_slice(&id.to_be_bytes());
    b.extend_from_slice(&[0x00, 0x06]);
    b.extend_from_slice(&len.to_be_bytes());
    b
}

/// Loads `stream` into a fresh QEMU `build` with `args` (plus `-S -incoming
/// defer`); panics with QEMU's reason if it does not load.
fn qemu_loads(build: Build, args: Vec<String>, stream: &Path, what: &str) {
    let mut args = args;
    args.extend(["-S".into(), "-incoming".into(), "defer".into()]);
    let mut q = Qemu::spawn_build(build, &args).expect("starting the destination");
    q.incoming_from_file(stream, false)
        .unwrap_or_else(|e| panic!("{what}: QEMU does not load it: {e}"));
}

/// `ferry receive` of a saved stream with `--device-state-out`; returns
/// whether it succeeded and its stderr.
fn receive_file(stream: &Path, ram: &[String], out: &Path) -> (bool, String) {
    let mut args = vec![
        "receive".to_owned(),
        "--listen".into(),
        format!("file:{}", stream.display()),
        "--device-state-out".into(),
        out.display().to_string(),
    ];
    args.extend(ram.iter().cloned());
    let o = run_ferry(&args, TIMEOUT).expect("running ferry receive");
    (o.status.success(), o.stderr)
}

/// The device state file holds the stream's configuration (right after its
/// 8-byte header) and then, byte for byte, the stream's last bytes: the
/// device sections, EOF and vmdesc (or only the sections and EOF's absence
/// when `trailer` is false).
fn assert_is_the_streams_device_state(state: &[u8], stream: &[u8], trailer: bool) {
    let config = state
        .iter()
        .zip(&stream[8..])
        .take_while(|(a, b)| a == b)
        .count();
    assert!(config > 5, "the state starts with the configuration");
    let rest = &state[config..];
    // Without a trailer the file ends before the stream's EOF marker.
    let end = if trailer {
        stream.len()
    } else {
        stream.len() - 1
    };
    assert!(rest.len() < end, "the state is shorter than the stream");
    assert_eq!(
        rest,
        &stream[end - rest.len()..end],
        "the device state is not the stream's tail"
    );
    assert_eq!(rest[0], 0x04, "the tail starts with a FULL section");
}

/// One sample of issue 13: `fake` written into the body of section `idstr`
/// at `body_at` of a saved QEMU `build` stream of machine `args`; QEMU still
/// loads it, and ferry receive → ferry send relays it into a QEMU that
/// loads it, the device state byte for byte the stream's.
fn fake_end_in_device_bytes(build: Build, args: Vec<String>, ram: &Path, idstr: &str, at: usize) {
    let dir = shm_tempdir("ferry-fake-end-");
    let d = dir.path();
    let stream = d.join("qemu.mig");
    let mut source = args.clone();
    source.push("-S".into());
    Qemu::spawn_build(build, &source)
        .expect("starting the source")
        .migrate_to_file(&stream, None)
        .expect("source migrating to a file");
    let clean = std::fs::read(&stream).unwrap();
    let (id, body) = section_body(&clean, idstr);
    let at = body + at;
    // Short: after the fake "vmdesc" the stream goes on. Long: the fake
    // length covers the rest of the stream exactly.
    let rest = (clean.len() - at - 11) as u32;
    // Without the vmdesc, the state is carried whole after the configuration.
    for (name, len, vmdesc) in [
        ("short", 16, true),
        ("to-the-end", rest, true),
        ("no-vmdesc", 16, false),
    ] {
        let what = format!("{build:?} {idstr} {name}");
        let mut bytes = clean.clone();
        bytes[at..at + 11].copy_from_slice(&fake_end(id, len));
        if !vmdesc {
            bytes.truncate(vmdesc_start(&bytes));
        }
        let planted = d.join(format!("{name}.mig"));
        std::fs::write(&planted, &bytes).unwrap();
        if vmdesc {
            let dest = d.join(format!("{name}.dest.ram"));
            qemu_loads(build, machine_with_ram(&args, ram, &dest), &planted, &what);
        }

        let state = d.join(format!("{name}.state"));
        let ram_args = block_args(d, name, &planted);
        let (ok, err) = receive_file(&planted, &ram_args, &state);
        assert!(ok, "{what}: ferry receive: {err}");
        let got = std::fs::read(&state).expect("device state written");
        assert_is_the_streams_device_state(&got, &bytes, vmdesc);

        let relayed = d.join(format!("{name}.relayed.mig"));
        let mut send = vec![
            "send".to_owned(),
            "--to".into(),
            format!("file:{}", relayed.display()),
            "--device-state".into(),
            state.display().to_string(),
        ];
        send.extend(ram_args);
        run_ferry(&send, TIMEOUT)
            .and_then(|o| o.success())
            .unwrap_or_else(|e| panic!("{what}: ferry send --device-state: {e}"));
        let dest = d.join(format!("{name}.relayed.ram"));
        qemu_loads(build, machine_with_ram(&args, ram, &dest), &relayed, &what);
        assert_same_file(&d.join(format!("{name}.mem.ram")), &dest);
    }
}

/// Where the vmdesc marker is in a QEMU stream: after the EOF marker, with a
/// be32 length that reaches exactly the end.
fn vmdesc_start(stream: &[u8]) -> usize {
    (1..stream.len() - 5)
        .rev()
        .find(|&p| {
            let len = u32::from_be_bytes(stream[p + 1..p + 5].try_into().unwrap()) as usize;
            stream[p - 1] == 0 && stream[p] == 6 && p + 5 + len == stream.len()
        })
        .expect("QEMU's stream ends with a vmdesc")
}

/// `args` with the RAM file `ram` replaced by `dest`.
fn machine_with_ram(args: &[String], ram: &Path, dest: &Path) -> Vec<String> {
    let ram = ram.display().to_string();
    args.iter()
        .map(|a| a.replace(&ram, &dest.display().to_string()))
        .collect()
}

/// `--ram` for every block `ferry inspect` finds in `stream`, files named
/// `d/<name>.<block>.ram` (`mem` is `d/<name>.mem.ram`).
fn block_args(d: &Path, name: &str, stream: &Path) -> Vec<String> {
    let o = run_ferry(
        ["inspect".as_ref(), stream.as_os_str(), "--json".as_ref()],
        TIMEOUT,
    )
    .and_then(|o| o.success())
    .expect("ferry inspect");
    let report: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    report["ram_blocks"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|b| {
            let block = b["idstr"].as_str().unwrap();
            let file = d.join(format!("{name}.{}.ram", block.replace('/', "_")));
            [
                "--ram".to_owned(),
                format!("{},name={block}", file.display()),
            ]
        })
        .collect()
}

/// Issue 13's `-M none` sample: the unused tail of globalstate's runstate
/// buffer (a be32 size, then 100 bytes holding "prelaunch" and zeros) holds
/// a fake footer, EOF and vmdesc header.
#[test]
fn a_fake_end_in_globalstate_does_not_split_the_device_state() {
    let dir = shm_tempdir("ferry-fake-none-");
    let ram = dir.path().join("src.ram");
    write_mixed_image(&ram, 1 << 20, 3).unwrap();
    let mut args: Vec<String> = vec!["-M".into(), "none".into(), "-nodefaults".into()];
    args.extend(ram_file_args(&ram, 1 << 20));
    fake_end_in_device_bytes(Build::System, args, &ram, "globalstate", 4 + 60);
}

/// The same in the RTC's CMOS bytes of a real `-M pc` (guest-writable
/// through ports 0x70/0x71), QEMU 7.2 and QEMU 10.
#[test]
fn a_fake_end_in_rtc_cmos_does_not_split_the_device_state() {
    for build in [Build::System, Build::Qemu10] {
        let dir = shm_tempdir("ferry-fake-pc-");
        let ram = dir.path().join("src.ram");
        write_mixed_image(&ram, RAM as usize, 4).unwrap();
        let args = machine_args("pc", &ram, &[]);
        fake_end_in_device_bytes(build, args, &ram, "mc146818rtc", 0x60);
    }
}

/// The be64 write counter in the `ferry-loadgen` section of a device-state
/// file or stream.
fn loadgen_counter(state: &[u8]) -> u64 {
    let (_, body) = section_body(state, "ferry-loadgen");
    u64::from_be_bytes(state[body..body + 8].try_into().unwrap())
}

/// A live migration carries the device state the guest saved after `stop`
/// (`save-device-state`), not the file captured at the start: the received
/// state's counter is what the stopped guest reports, and a capture taken at
/// the start (what a sender reading the state once would send) holds a
/// smaller one.
#[test]
fn a_live_migration_carries_the_device_state_after_stop() {
    let dir = shm_tempdir("ferry-devstate-live-");
    let d = dir.path();
    let g = loadgen(d, "src", "64M")
        .rate("32M")
        .start()
        .expect("starting ferry loadgen");
    let stale = d.join("start.state");
    let start_pages = {
        let mut c = g.control();
        c.execute("stop", None).expect("stop");
        c.execute(
            "save-device-state",
            Some(json!({ "path": stale.display().to_string() })),
        )
        .expect("save-device-state while stopped");
        c.execute("cont", None).expect("cont");
        loadgen_counter(&std::fs::read(&stale).unwrap())
    };
    proc::wait_until(Duration::from_secs(20), "the guest to write on", || {
        g.control().status()["pages-written"].as_u64().unwrap() > start_pages + 1000
    })
    .unwrap();
    let out = d.join("received.state");
    let mut args = migrate::receive_args("tcp:127.0.0.1:0", &d.join("dst.ram"), &d.join("r.json"));
    args.extend(["--device-state-out".into(), out.display().to_string()]);
    let (mut r, uri) = ferry(&args)
        .start_listening(&d.join("receive.err"))
        .expect("starting ferry receive");
    let mut s = migrate::send(d, "send", &uri)
        .args(&g.send_args())
        .start(&d.join("send.err"))
        .expect("starting ferry send");
    migrate::assert_both_succeed(&mut s, &mut r, TIMEOUT);
    let status = g.control().status();
    assert_eq!(status["status"], "postmigrate");
    let stopped_pages = status["pages-written"].as_u64().unwrap();
    let received = std::fs::read(&out).expect("the received device state");
    assert_eq!(
        loadgen_counter(&received),
        stopped_pages,
        "counter after stop"
    );
    assert!(
        stopped_pages > start_pages,
        "{stopped_pages} <= {start_pages}"
    );
    assert_same_file(&g.ram, &d.join("dst.ram"));
}
