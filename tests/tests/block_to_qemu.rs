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
use std::time::Duration;

use ferry_proto::qemu_file::QemuFileWriter;
use ferry_proto::stream::device_state::DeviceState;
use ferry_proto::stream::image::write_stream_with_disks;
use ferry_proto::transport::FileTransport;
use ferry_tests::ferry::run_ferry;
use ferry_tests::files::tempdir;
use ferry_tests::qemu::PcWithDisk;

const TIMEOUT: Duration = Duration::from_secs(180);

#[test]
fn qemu_loads_ram_device_state_and_a_block_section_from_ferry() {
    let dir = tempdir("ferry-blk-");
    let d = dir.path();
    // Some chunks all zero (ZERO_BLOCK records), the rest data.
    let src = PcWithDisk::new(d, 128 << 20, 40 << 20, 51, &[3, 4, 17, 30])
        .unwrap_or_else(|e| panic!("{e}"));
    let blocks: Vec<(String, Vec<u8>)> = src
        .qemu
        .blocks
        .iter()
        .map(|(n, file)| (n.clone(), fs::read(file).expect("an extracted block")))
        .collect();

    // ferry's stream: RAM (compressed), the disk as a block section, QEMU's devices.
    let state = DeviceState::from_bytes(fs::read(&src.qemu.device).expect("device state"))
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
        &[("disk0", &src.disk)],
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

    // A destination with an image of the same size (other contents) loads it.
    src.load_and_compare(d, &stream)
        .unwrap_or_else(|e| panic!("{e}"));
}
