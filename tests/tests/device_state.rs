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

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_tests::ferry::run_ferry;
use ferry_tests::files::{assert_same_file, shm_tempdir};
use ferry_tests::proc::{ferry, Process};
use ferry_tests::qemu::{ram_file_args, Build, Qemu};
use ferry_tests::ram::write_mixed_image;
use serde_json::json;
use tempfile::TempDir;

const RAM: u64 = 64 << 20;
const TIMEOUT: Duration = Duration::from_secs(120);

/// The RAM blocks of `-M pc -nodefaults` besides `mem` (QEMU 7.2 and 10).
const PC_BLOCKS: [&str; 5] = [
    "/rom@etc/acpi/tables",
    "pc.bios",
    "pc.rom",
    "/rom@etc/table-loader",
    "/rom@etc/acpi/rsdp",
];

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
    let mut args = vec![
        "--ram".to_owned(),
        format!("{},name=mem", d.join("mem.ram").display()),
    ];
    for (i, block) in PC_BLOCKS.iter().enumerate() {
        args.push("--ram".into());
        args.push(format!(
            "{},name={block}",
            d.join(format!("rom{i}.ram")).display()
        ));
    }
    args
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
    run_ferry(
        [
            "send".to_owned(),
            "--ram".into(),
            format!("{},name=guest", ram.display()),
            "--device-state".into(),
            state.display().to_string(),
            "--to".into(),
            addr,
        ],
        TIMEOUT,
    )
    .and_then(|o| o.success())
    .expect("ferry send");
    assert!(receiver.wait(TIMEOUT).expect("receive ends").success());
    assert_same_file(&ram, &d.join("dest.ram"));
    assert_same_file(&state, &out);

    // A stream cut short: no device state file, and nothing left under a
    // temporary name either.
    let stream = d.join("whole.mig");
    run_ferry(
        [
            "send".to_owned(),
            "--ram".into(),
            format!("{},name=guest", ram.display()),
            "--device-state".into(),
            state.display().to_string(),
            "--to".into(),
            format!("file:{}", stream.display()),
        ],
        TIMEOUT,
    )
    .and_then(|o| o.success())
    .expect("ferry send to a file");
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
