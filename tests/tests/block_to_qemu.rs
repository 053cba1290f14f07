//! A QEMU 7.2 destination loads a ferry stream that carries RAM, device state
//! and a disk in QEMU's "block" section, and its disk image ends up equal to
//! the source's.
//!
//! QEMU loads block records only for a drive attached to a device (`-M pc
//! -accel kvm -drive if=none,id=disk0,... -device virtio-blk-pci,drive=disk0`);
//! the device state comes from a plain stream of a source QEMU with the same
//! command line. QEMU is only the destination here: as a block-migration
//! source on 7.2 it does not finish (see DESIGN.md).

use std::fs;
use std::path::Path;
use std::time::Duration;

use ferry_proto::qemu_file::QemuFileWriter;
use ferry_proto::stream::device_state::DeviceState;
use ferry_proto::stream::image::write_stream_with_disks;
use ferry_proto::transport::FileTransport;
use ferry_tests::ferry::run_ferry;
use ferry_tests::qemu::{ram_file_args, Qemu};
use ferry_tests::ram::{self, first_difference};

const TIMEOUT: Duration = Duration::from_secs(180);
const RAM: u64 = 128 << 20;
const DISK: usize = 40 << 20;

fn pc_with_disk(ram_file: &Path, image: &Path) -> Vec<String> {
    let mut args: Vec<String> = ["-M", "pc", "-accel", "kvm", "-nodefaults"]
        .map(String::from)
        .into();
    args.extend(ram_file_args(ram_file, RAM));
    args.extend([
        "-drive".into(),
        format!("if=none,id=disk0,file={},format=raw", image.display()),
        "-device".into(),
        "virtio-blk-pci,drive=disk0".into(),
    ]);
    args
}

#[test]
fn qemu_loads_ram_device_state_and_a_block_section_from_ferry() {
    let dir = tempfile::Builder::new()
        .prefix("ferry-blk-")
        .tempdir()
        .expect("creating a temporary directory");
    let d = dir.path();
    let src_ram = d.join("src.ram");
    ram::write_mixed_image(&src_ram, RAM as usize, 51).expect("writing RAM");
    // A disk of mixed 1 MiB chunks: some all zero (ZERO_BLOCK records), the rest data.
    let mut disk = ram::mixed_image(DISK, 52);
    for chunk in [3usize, 4, 17, 30] {
        disk[chunk << 20..(chunk + 1) << 20].fill(0);
    }
    let src_img = d.join("src.img");
    fs::write(&src_img, &disk).expect("writing the source image");

    // Device state from a source QEMU with the same machine and drive.
    let mut args = pc_with_disk(&src_ram, &src_img);
    args.push("-S".into());
    let mut source = Qemu::spawn(&args).unwrap_or_else(|e| panic!("starting the source: {e}"));
    let qemu_stream = d.join("qemu.mig");
    source
        .migrate_to_file(&qemu_stream, None)
        .unwrap_or_else(|e| panic!("source migrating: {e}"));
    drop(source);
    let device = d.join("device.state");
    let blocks_dir = d.join("blocks");
    let out = run_ferry(
        [
            "inspect".as_ref(),
            qemu_stream.as_os_str(),
            "--json".as_ref(),
            "--extract-device-state".as_ref(),
            device.as_os_str(),
            "--extract-ram".as_ref(),
            blocks_dir.as_os_str(),
        ],
        TIMEOUT,
    )
    .and_then(|o| o.success())
    .unwrap_or_else(|e| panic!("ferry inspect: {e}"));
    let report: serde_json::Value = serde_json::from_str(&out.stdout).expect("JSON");
    let blocks: Vec<(String, Vec<u8>)> = report["ram_blocks"]
        .as_array()
        .expect("ram_blocks")
        .iter()
        .map(|b| {
            let name = b["idstr"].as_str().expect("idstr").to_owned();
            let file = blocks_dir.join(ferry_guest::load::block_file_name(&name));
            (name, fs::read(file).expect("an extracted block"))
        })
        .collect();

    // ferry's stream: RAM (compressed), the disk as a block section, QEMU's devices.
    let state = DeviceState::from_bytes(fs::read(&device).expect("device state"))
        .expect("device state parses");
    let stream = d.join("ferry.mig");
    let mut f = QemuFileWriter::new(FileTransport(fs::File::create(&stream).expect("stream")));
    let ram_refs: Vec<(&str, &[u8])> = blocks
        .iter()
        .map(|(n, b)| (n.as_str(), b.as_slice()))
        .collect();
    write_stream_with_disks(
        &mut f,
        &ram_refs,
        &[("disk0", &disk)],
        &state,
        "none",
        Some(1),
    )
    .expect("encoding");
    f.close().expect("closing the stream");

    // `ferry inspect` sees the block section.
    let out = run_ferry(
        ["inspect".as_ref(), stream.as_os_str(), "--json".as_ref()],
        TIMEOUT,
    )
    .and_then(|o| o.success())
    .unwrap_or_else(|e| panic!("ferry inspect of ferry's stream: {e}"));
    let ours: serde_json::Value = serde_json::from_str(&out.stdout).expect("JSON");
    assert!(
        ours["sections"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["idstr"] == "block"),
        "the stream carries a block section"
    );

    // A destination with an empty image of the same size loads it.
    let dst_ram = d.join("dst.ram");
    let dst_img = d.join("dst.img");
    fs::write(&dst_img, vec![0xa5u8; DISK]).expect("writing the destination image");
    let mut args = pc_with_disk(&dst_ram, &dst_img);
    args.extend(["-incoming".into(), "defer".into()]);
    let mut dest = Qemu::spawn(&args).unwrap_or_else(|e| panic!("starting the destination: {e}"));
    dest.incoming_from_file(&stream, true)
        .unwrap_or_else(|e| panic!("QEMU loading ferry's stream: {e}"));
    drop(dest);
    let got = fs::read(&dst_img).expect("reading the destination image");
    if let Some(at) = first_difference(&got, &disk) {
        panic!("destination disk differs from the source at byte {at:#x}");
    }
    let got_ram = fs::read(&dst_ram).expect("destination RAM");
    assert!(
        first_difference(&got_ram, &fs::read(&src_ram).unwrap()).is_none(),
        "destination RAM equals the source"
    );
}
