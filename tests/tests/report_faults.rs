//! Faults found in public reports (issue 13), each as its kind: real QEMU
//! streams, and the same streams with one declaration changed.

use std::path::Path;
use std::time::Duration;

use ferry_tests::ferry::run_ferry;
use ferry_tests::files::{read_json, shm_tempdir};
use ferry_tests::proc::ferry;
use ferry_tests::qemu::{ram_file_args, Build, Qemu};
use ferry_tests::ram::write_mixed_image;
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(120);
const RAM: u64 = 32 << 20;

/// The RAM blocks of `-M pc -nodefaults` besides `mem` (QEMU 7.2 and 10).
const PC_BLOCKS: [&str; 5] = [
    "/rom@etc/acpi/tables",
    "pc.bios",
    "pc.rom",
    "/rom@etc/table-loader",
    "/rom@etc/acpi/rsdp",
];

/// `--ram` for `mem` and, on a pc, its ROM blocks, files in `d`.
fn ram_args(d: &Path, pc: bool) -> Vec<String> {
    let mut args = vec![
        "--ram".to_owned(),
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
    args
}

/// With x-ignore-shared, QEMU sends no page of a shared RAM block (its file
/// is moved by someone else) and gives each block's address in MEM_SIZE.
/// `ferry receive` reads that, leaves the destination's `mem` file as it was
/// (no page written, none zeroed) and keeps the device state.
fn ignore_shared(build: Build, machine: &str) {
    let dir = shm_tempdir("ferry-ignore-shared-");
    let d = dir.path();
    let source = d.join("source.ram");
    write_mixed_image(&source, RAM as usize, 21).unwrap();
    let mut args: Vec<String> = vec!["-M".into(), machine.into(), "-nodefaults".into()];
    args.extend(["-S".into(), "-accel".into(), "tcg".into()]);
    args.extend(ram_file_args(&source, RAM));
    let mut qemu = Qemu::spawn_build(build, &args).expect("starting the source");
    qemu.set_capability("x-ignore-shared", true)
        .expect("x-ignore-shared");
    // The destination's file, as whoever moved it left it: not the source's.
    let dest = d.join("mem.ram");
    std::fs::write(&dest, vec![0xa5u8; RAM as usize]).unwrap();
    let state = d.join("device.state");
    let stats = d.join("stats.json");
    let mut recv = vec![
        "receive".to_owned(),
        "--listen".into(),
        "tcp:127.0.0.1:0".into(),
        "--device-state-out".into(),
        state.display().to_string(),
        "--stats-json".into(),
        stats.display().to_string(),
    ];
    recv.extend(ram_args(d, machine != "none"));
    let (mut receiver, addr) = ferry(&recv)
        .start_listening(&d.join("receive.log"))
        .expect("starting ferry receive");
    qemu.qmp("migrate", json!({ "uri": addr }));
    let what = format!("{build:?} {machine} x-ignore-shared");
    qemu.wait_migration("completed", TIMEOUT)
        .unwrap_or_else(|e| panic!("{what}: {e}\nferry: {}", receiver.stderr()));
    let status = receiver.wait(TIMEOUT).expect("ferry receive ends");
    assert!(status.success(), "{what}: {}", receiver.stderr());
    let got = std::fs::read(&dest).unwrap();
    assert!(
        got.iter().all(|&b| b == 0xa5),
        "{what}: ferry wrote into the shared block"
    );
    let st = read_json(&stats);
    assert!(
        st["ram"]["transferred"].as_u64().unwrap() < 1 << 20,
        "{what}: under 1 MB moves, got {st}"
    );
    let bytes = std::fs::read(&state).expect("device state written");
    assert!(
        bytes.windows(15).any(|w| w == b"x-ignore-shared"),
        "{what}: the configuration kept its capability list"
    );
}

#[test]
fn x_ignore_shared_streams_from_qemu72_load() {
    ignore_shared(Build::System, "none");
    ignore_shared(Build::System, "pc");
}

#[test]
fn x_ignore_shared_streams_from_qemu10_load() {
    ignore_shared(Build::Qemu10, "none");
    ignore_shared(Build::Qemu10, "pc");
}

/// A saved `-M none` stream of QEMU 7.2 (paused, 1 MiB of RAM) in `d`.
fn none_stream(d: &Path) -> Vec<u8> {
    let ram = d.join("src.ram");
    write_mixed_image(&ram, 1 << 20, 9).unwrap();
    let mut args: Vec<String> = vec![
        "-M".into(),
        "none".into(),
        "-nodefaults".into(),
        "-S".into(),
    ];
    args.extend(ram_file_args(&ram, 1 << 20));
    let stream = d.join("qemu.mig");
    Qemu::spawn(&args)
        .expect("starting the source")
        .migrate_to_file(&stream, None)
        .expect("migrating to a file");
    std::fs::read(&stream).unwrap()
}

/// `stream` with a configuration/target-page-bits subsection of `bits`
/// after the machine name (where QEMU puts it, before other subsections).
fn with_page_bits(stream: &[u8], bits: u32) -> Vec<u8> {
    let name_len = u32::from_be_bytes(stream[9..13].try_into().unwrap()) as usize;
    let at = 13 + name_len;
    let sub = b"configuration/target-page-bits";
    let mut ins = vec![0x05, sub.len() as u8];
    ins.extend_from_slice(sub);
    ins.extend_from_slice(&1u32.to_be_bytes());
    ins.extend_from_slice(&bits.to_be_bytes());
    [&stream[..at], &ins[..], &stream[at..]].concat()
}

/// `stream` with its vmdesc's page_size replaced by `size`.
fn with_vmdesc_page_size(stream: &[u8], size: u64) -> Vec<u8> {
    let p = (1..stream.len() - 5)
        .rev()
        .find(|&p| {
            let len = u32::from_be_bytes(stream[p + 1..p + 5].try_into().unwrap()) as usize;
            stream[p - 1] == 0 && stream[p] == 6 && p + 5 + len == stream.len()
        })
        .expect("a vmdesc");
    let mut v: serde_json::Value = serde_json::from_slice(&stream[p + 5..]).unwrap();
    v["page_size"] = json!(size);
    let json = serde_json::to_vec(&v).unwrap();
    let mut out = stream[..=p].to_vec();
    out.extend_from_slice(&(json.len() as u32).to_be_bytes());
    out.extend_from_slice(&json);
    out
}

/// `ferry receive` and `ferry inspect` of `bytes`: both refuse, naming the
/// stream's page size and ferry's, and no RAM file is left.
fn refuses_page_size(d: &Path, name: &str, bytes: &[u8], size: u64) {
    let stream = d.join(format!("{name}.mig"));
    std::fs::write(&stream, bytes).unwrap();
    let ram = d.join(format!("{name}.ram"));
    let o = run_ferry(
        [
            "receive".to_owned(),
            "--listen".into(),
            format!("file:{}", stream.display()),
            "--ram".into(),
            format!("{},name=mem", ram.display()),
        ],
        TIMEOUT,
    )
    .expect("running ferry receive");
    assert!(!o.status.success(), "{name}: loaded as 4 KiB pages");
    for part in [format!("{size}-byte pages"), "4096-byte pages".to_owned()] {
        assert!(
            o.stderr.contains(&part),
            "{name}: {:?} lacks {part}",
            o.stderr
        );
    }
    let o = run_ferry(["inspect".as_ref(), stream.as_os_str()], TIMEOUT).unwrap();
    assert!(!o.status.success(), "{name}: inspect accepted it");
    assert!(
        o.stderr.contains(&format!("{size}-byte pages")),
        "{}",
        o.stderr
    );
}

#[test]
fn a_page_size_other_than_4k_is_refused_naming_both() {
    let dir = shm_tempdir("ferry-page-size-");
    let d = dir.path();
    let clean = none_stream(d);
    // QEMU refuses the report's sample itself.
    let sample = with_page_bits(&clean, 16);
    let bad = d.join("bits16.mig");
    std::fs::write(&bad, &sample).unwrap();
    let mut args: Vec<String> = vec!["-M".into(), "none".into(), "-nodefaults".into()];
    args.extend(ram_file_args(&d.join("qemu-dest.ram"), 1 << 20));
    args.extend(["-incoming".into(), "defer".into()]);
    let mut q = Qemu::spawn(&args).expect("starting a destination");
    let e = q.incoming_from_file(&bad, false).unwrap_err().to_string();
    assert!(e.contains("TARGET_PAGE_BITS is 16"), "{e}");

    refuses_page_size(d, "bits16", &sample, 65536);
    refuses_page_size(d, "bits13", &with_page_bits(&clean, 13), 8192);
    refuses_page_size(d, "vmdesc64k", &with_vmdesc_page_size(&clean, 65536), 65536);
    // The declaration of ferry's own page size loads.
    let ok = d.join("bits12.mig");
    std::fs::write(&ok, with_page_bits(&clean, 12)).unwrap();
    run_ferry(["inspect".as_ref(), ok.as_os_str()], TIMEOUT)
        .and_then(|o| o.success())
        .expect("target-page-bits 12 is ferry's own");
}
