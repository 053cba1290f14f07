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
use ferry_tests::files::{assert_same_file, tempdir};
use ferry_tests::qemu::{device_state_from_qemu, none_machine_args, pc_machine_args, Qemu};
use ferry_tests::ram;

const TIMEOUT: Duration = Duration::from_secs(180);
const PREFIX: &str = "ferry-f2q-";

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
    assert_same_file(expected, dest_ram);
}

/// [`load_and_compare`] for a fresh `-M none` destination, RAM in `DIR/dest.ram`.
fn load_into_none(dir: &Path, size: u64, stream: &Path, expected: &Path, compress: bool) {
    let dest_ram = dir.join("dest.ram");
    let _ = fs::remove_file(&dest_ram);
    let args = none_machine_args(&dest_ram, size);
    load_and_compare(&args, stream, &dest_ram, expected, compress);
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

/// A `-M none` source with mixed RAM (`seed`) in `DIR/source.ram`: that
/// file and the device state extracted from the source's stream.
fn none_source(dir: &Path, size: u64, seed: u64) -> (PathBuf, PathBuf) {
    let src_ram = dir.join("source.ram");
    ram::write_mixed_image(&src_ram, size as usize, seed).expect("writing the RAM image");
    let device = device_state_from_qemu(dir, &none_machine_args(&src_ram, size))
        .unwrap_or_else(|e| panic!("{e}"))
        .device;
    (src_ram, device)
}

#[test]
fn none_machine_loads_ferry_encoded_ram_plain_and_compressed() {
    let dir = tempdir(PREFIX);
    let size = 64u64 << 20;
    let (src_ram, device) = none_source(dir.path(), size, 21);
    let blocks = vec![("mem".to_owned(), fs::read(&src_ram).expect("reading RAM"))];
    for level in [None, Some(1), Some(9)] {
        let stream = dir.path().join(format!("ferry-{level:?}.mig"));
        encode(&stream, &blocks, &device, level);
        load_into_none(dir.path(), size, &stream, &src_ram, level.is_some());
    }
}

#[test]
fn pc_machine_loads_every_ram_block_and_device_state() {
    let dir = tempdir(PREFIX);
    let size = 256u64 << 20;
    let src_ram = dir.path().join("source.ram");
    ram::write_mixed_image(&src_ram, size as usize, 22).expect("writing the RAM image");
    let qemu = device_state_from_qemu(dir.path(), &pc_machine_args(&src_ram, size))
        .unwrap_or_else(|e| panic!("{e}"));
    // Every block QEMU sent (mem, the BIOS, option ROMs, ACPI tables), in its order.
    assert!(
        qemu.blocks.len() >= 4,
        "-M pc has several RAM blocks: {:?}",
        qemu.blocks
    );
    let blocks: Vec<(String, Vec<u8>)> = qemu
        .blocks
        .iter()
        .map(|(n, file)| (n.clone(), fs::read(file).expect("an extracted block")))
        .collect();
    let stream = dir.path().join("ferry-pc.mig");
    encode(&stream, &blocks, &qemu.device, Some(1));
    let dest_ram = dir.path().join("dest.ram");
    load_and_compare(
        &pc_machine_args(&dest_ram, size),
        &stream,
        &dest_ram,
        &src_ram,
        true,
    );
}

#[test]
fn ferry_send_to_file_with_device_state_loads_in_qemu() {
    let dir = tempdir(PREFIX);
    let size = 64u64 << 20;
    let (src_ram, device) = none_source(dir.path(), size, 23);
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
        load_into_none(dir.path(), size, &stream, &src_ram, compress);
    }
}
