//! QEMU migrating live over tcp into `ferry receive`: QEMU 7.2 and QEMU 10,
//! plain precopy and multifd, `-M none` and `-M pc`.
//!
//! Every source is paused (`-S`) with its RAM in a shared file of mixed pages,
//! so the RAM it migrates is exactly that file: ferry's copy of the `mem` block
//! must equal it byte for byte. Paused is still a live migration on the wire:
//! QEMU's iterative sections, its switchover (QEMU 10 sends SWITCHOVER_START on
//! 10.0 machine types) and, with multifd, its channels and sync points.
//!
//! QEMU 10 on `pc-i440fx-7.2` keeps 7.2's behaviour (no SWITCHOVER_START,
//! zero pages on the main channel, a multifd sync at every RAM section's end);
//! on 10.0 machine types it sends MULTIFD_FLUSH and zero pages in packets.

use std::path::Path;
use std::time::Duration;

use ferry_tests::files::{assert_same_file, shm_tempdir};
use ferry_tests::proc::{ferry, Process};
use ferry_tests::qemu::{ram_file_args, Build, Qemu};
use ferry_tests::ram::write_mixed_image;
use serde_json::json;

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

/// One migration: QEMU `build` on machine `machine` into `ferry receive`,
/// then the received `mem` block compared with the source's RAM file.
fn migrate(build: Build, machine: &str, mode: Mode) {
    let dir = shm_tempdir("ferry-qlive-");
    let d = dir.path();
    let source_ram = d.join("source.ram");
    write_mixed_image(&source_ram, RAM as usize, 7).expect("writing the source RAM");
    let mut args: Vec<String> = vec![
        "-M".into(),
        machine.into(),
        "-nodefaults".into(),
        "-S".into(),
    ];
    if machine != "none" {
        args.extend(["-accel".into(), "tcg".into()]);
    }
    args.extend(ram_file_args(&source_ram, RAM));
    let mut qemu = Qemu::spawn_build(build, &args)
        .unwrap_or_else(|e| panic!("starting the {build:?} source ({machine}): {e}"));
    let (mut receiver, addr) = receive(d, machine != "none", mode);
    if let Mode::Multifd(channels, compression) = mode {
        qemu.set_capability("multifd", true)
            .expect("multifd capability");
        qemu.execute(
            "migrate-set-parameters",
            Some(json!({"multifd-channels": channels, "multifd-compression": compression})),
        )
        .expect("multifd parameters");
    }
    qemu.execute("migrate", Some(json!({ "uri": addr })))
        .expect("starting the migration");
    let what = format!("{build:?} {machine} {mode:?}");
    qemu.wait_migration("completed", TIMEOUT)
        .unwrap_or_else(|e| panic!("{what}: {e}\nferry: {}", receiver.stderr()));
    let status = receiver.wait(TIMEOUT).expect("ferry receive ends");
    assert!(
        status.success(),
        "{what}: ferry receive failed: {}",
        receiver.stderr()
    );
    assert_same_file(&source_ram, &d.join("mem.ram"));
}

/// `ferry receive` for the source's blocks, listening on a port of its own.
fn receive(d: &Path, pc: bool, mode: Mode) -> (Process, String) {
    let mut args = vec![
        "receive".to_owned(),
        "--listen".into(),
        "tcp:127.0.0.1:0".into(),
        "--ram".into(),
        format!("{},name=mem", d.join("mem.ram").display()),
    ];
    if pc {
        for (i, block) in PC_BLOCKS.iter().enumerate() {
            args.push("--ram".into());
            args.push(format!(
                "{},name={block}",
                d.join(format!("rom{i}.ram")).display()
            ));
        }
    }
    if let Mode::Multifd(channels, _) = mode {
        args.extend(["--multifd-channels".into(), channels.to_string()]);
    }
    ferry(&args)
        .start_listening(&d.join("receive.log"))
        .unwrap_or_else(|e| panic!("starting ferry receive: {e}"))
}

#[test]
fn qemu72_precopy_none_and_pc() {
    migrate(Build::System, "none", Mode::Precopy);
    migrate(Build::System, "pc", Mode::Precopy);
}

#[test]
fn qemu10_precopy_none_pc_and_pc_i440fx_7_2() {
    migrate(Build::Qemu10, "none", Mode::Precopy);
    migrate(Build::Qemu10, "pc-i440fx-10.0", Mode::Precopy);
    migrate(Build::Qemu10, "pc-i440fx-7.2", Mode::Precopy);
}

#[test]
fn qemu10_multifd_2_and_4_channels_none_zlib_zstd() {
    for channels in [2, 4] {
        for compression in ["none", "zlib", "zstd"] {
            migrate(
                Build::Qemu10,
                "pc-i440fx-10.0",
                Mode::Multifd(channels, compression),
            );
        }
    }
}

/// QEMU's legacy multifd mode: a sync at the end of every RAM section and no
/// MULTIFD_FLUSH, as QEMU 7.2 and QEMU 10 on a 7.2 machine type send.
#[test]
fn legacy_multifd_from_qemu72_and_qemu10_on_a_7_2_machine() {
    migrate(Build::Qemu10, "pc-i440fx-7.2", Mode::Multifd(2, "zstd"));
    migrate(Build::System, "pc", Mode::Multifd(2, "zlib"));
}
