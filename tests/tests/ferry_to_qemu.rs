//! ferry writes a migration stream, a real QEMU 7.2 destination loads it.
//!
//! The device state (configuration, timer, globalstate, and on `-M pc` every
//! device) comes from a stream QEMU wrote with the same command line, pulled
//! out with `ferry inspect --extract-device-state`; the RAM is encoded by ferry:
//! zero and one-byte pages as ZERO records, compressible pages as
//! COMPRESS_PAGE, the rest raw. The destination's shared RAM file must then
//! equal the source's byte for byte.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_proto::qemu_file::QemuFileWriter;
use ferry_proto::stream::device_state::DeviceState;
use ferry_proto::stream::image::write_stream;
use ferry_proto::transport::FileTransport;
use ferry_tests::ferry::run_ferry;
use ferry_tests::qemu::{none_machine_args, ram_file_args, Qemu};
use ferry_tests::ram::{self, first_difference};
use tempfile::TempDir;

const TIMEOUT: Duration = Duration::from_secs(180);

fn tempdir() -> TempDir {
    tempfile::Builder::new()
        .prefix("ferry-f2q-")
        .tempdir()
        .expect("creating a temporary directory")
}

fn pc_args(ram_file: &Path, size: u64) -> Vec<String> {
    let mut args: Vec<String> = ["-M", "pc", "-accel", "kvm", "-nodefaults"]
        .map(String::from)
        .into();
    args.extend(ram_file_args(ram_file, size));
    args
}

/// A source QEMU (never started, `-S`) migrates to a file; ferry extracts its
/// device state and every RAM block. Returns (device-state file, RAM dir).
fn device_state_from_qemu(dir: &Path, args: &[String]) -> (PathBuf, PathBuf) {
    let mut args = args.to_vec();
    args.push("-S".into());
    let mut source = Qemu::spawn(&args).unwrap_or_else(|e| panic!("starting the source: {e}"));
    let stream = dir.join("qemu.mig");
    source
        .migrate_to_file(&stream, None)
        .unwrap_or_else(|e| panic!("source migrating to a file: {e}"));
    let device = dir.join("device.state");
    let blocks = dir.join("blocks");
    run_ferry(
        [
            "inspect".as_ref(),
            stream.as_os_str(),
            "--extract-device-state".as_ref(),
            device.as_os_str(),
            "--extract-ram".as_ref(),
            blocks.as_os_str(),
        ],
        TIMEOUT,
    )
    .and_then(|o| o.success())
    .unwrap_or_else(|e| panic!("ferry inspect of QEMU's stream: {e}"));
    (device, blocks)
}

/// Loads `stream` into a fresh destination started with `args` (RAM in
/// `dest_ram`) and checks that the RAM equals `expected`.
fn load_and_compare(
    args: &[String],
    stream: &Path,
    dest_ram: &Path,
    expected: &Path,
    compress: bool,
) {
    let mut args = args.to_vec();
    args.extend(["-incoming".into(), "defer".into()]);
    let mut dest = Qemu::spawn(&args).unwrap_or_else(|e| panic!("starting the destination: {e}"));
    dest.incoming_from_file(stream, compress)
        .unwrap_or_else(|e| panic!("QEMU loading ferry's stream {}: {e}", stream.display()));
    let got = fs::read(dest_ram).expect("reading the destination RAM");
    let want = fs::read(expected).expect("reading the source RAM");
    assert_eq!(got.len(), want.len());
    if let Some(at) = first_difference(&got, &want) {
        panic!("destination RAM differs from the source at byte {at:#x}");
    }
}

/// Encodes `blocks` with the library encoder into `out`.
fn encode(out: &Path, blocks: &[(String, Vec<u8>)], device: &Path, level: Option<u32>) {
    let device = DeviceState::from_bytes(fs::read(device).expect("reading the device state"))
        .expect("QEMU's device state parses");
    let file = fs::File::create(out).expect("creating the stream file");
    let mut f = QemuFileWriter::new(FileTransport(file));
    let refs: Vec<(&str, &[u8])> = blocks
        .iter()
        .map(|(n, d)| (n.as_str(), d.as_slice()))
        .collect();
    let counts = write_stream(&mut f, &refs, &device, "none", level).expect("encoding");
    f.close().expect("closing the stream file");
    assert!(
        counts.zero > 0 && counts.raw > 0,
        "mixed RAM has zero and raw pages: {counts:?}"
    );
    if level.is_some() {
        assert!(counts.compressed > 0, "text pages compress: {counts:?}");
    }
}

#[test]
fn none_machine_loads_ferry_encoded_ram_plain_and_compressed() {
    let dir = tempdir();
    let size = 64u64 << 20;
    let src_ram = dir.path().join("source.ram");
    ram::write_mixed_image(&src_ram, size as usize, 21).expect("writing the RAM image");
    let (device, _) = device_state_from_qemu(dir.path(), &none_machine_args(&src_ram, size));
    let blocks = vec![("mem".to_owned(), fs::read(&src_ram).expect("reading RAM"))];
    for level in [None, Some(1), Some(9)] {
        let stream = dir.path().join(format!("ferry-{level:?}.mig"));
        encode(&stream, &blocks, &device, level);
        let dest_ram = dir.path().join("dest.ram");
        let _ = fs::remove_file(&dest_ram);
        load_and_compare(
            &none_machine_args(&dest_ram, size),
            &stream,
            &dest_ram,
            &src_ram,
            level.is_some(),
        );
    }
}

#[test]
fn pc_machine_loads_every_ram_block_and_device_state() {
    let dir = tempdir();
    let size = 256u64 << 20;
    let src_ram = dir.path().join("source.ram");
    ram::write_mixed_image(&src_ram, size as usize, 22).expect("writing the RAM image");
    let (device, extracted) = device_state_from_qemu(dir.path(), &pc_args(&src_ram, size));
    // Every block QEMU sent (mem, the BIOS, option ROMs, ACPI tables), in its order.
    let report = run_ferry(
        [
            "inspect".as_ref(),
            dir.path().join("qemu.mig").as_os_str(),
            "--json".as_ref(),
        ],
        TIMEOUT,
    )
    .and_then(|o| o.success())
    .unwrap_or_else(|e| panic!("ferry inspect --json: {e}"));
    let json: serde_json::Value =
        serde_json::from_str(&report.stdout).expect("inspect prints JSON");
    let names: Vec<String> = json["ram_blocks"]
        .as_array()
        .expect("ram_blocks")
        .iter()
        .map(|b| b["idstr"].as_str().expect("idstr").to_owned())
        .collect();
    assert!(names.len() >= 4, "-M pc has several RAM blocks: {names:?}");
    let blocks: Vec<(String, Vec<u8>)> = names
        .iter()
        .map(|n| {
            let file = extracted.join(ferry_guest::load::block_file_name(n));
            (
                n.clone(),
                fs::read(&file).expect("reading an extracted block"),
            )
        })
        .collect();
    let stream = dir.path().join("ferry-pc.mig");
    encode(&stream, &blocks, &device, Some(1));
    let dest_ram = dir.path().join("dest.ram");
    load_and_compare(
        &pc_args(&dest_ram, size),
        &stream,
        &dest_ram,
        &src_ram,
        true,
    );
}

#[test]
fn ferry_send_to_file_with_device_state_loads_in_qemu() {
    let dir = tempdir();
    let size = 64u64 << 20;
    let src_ram = dir.path().join("source.ram");
    ram::write_mixed_image(&src_ram, size as usize, 23).expect("writing the RAM image");
    let (device, _) = device_state_from_qemu(dir.path(), &none_machine_args(&src_ram, size));
    for compress in [false, true] {
        let stream = dir.path().join(format!("send-{compress}.mig"));
        let ram_arg = format!("{},name=mem", src_ram.display());
        let to = format!("file:{}", stream.display());
        let mut args = vec![
            "send",
            "--ram",
            &ram_arg,
            "--to",
            &to,
            "--device-state",
            device.to_str().expect("utf-8 path"),
            "--compress-workers",
            "2",
        ];
        if compress {
            args.push("--compress");
        }
        let out = run_ferry(args, TIMEOUT)
            .and_then(|o| o.success())
            .unwrap_or_else(|e| panic!("ferry send --to file: {e}"));
        assert!(
            out.stderr.contains("no return path"),
            "a file target says it cannot verify: {}",
            out.stderr
        );
        let dest_ram = dir.path().join("dest.ram");
        let _ = fs::remove_file(&dest_ram);
        load_and_compare(
            &none_machine_args(&dest_ram, size),
            &stream,
            &dest_ram,
            &src_ram,
            compress,
        );
    }
}
