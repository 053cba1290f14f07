//! `ferry send --multifd-channels N`: RAM pages in multifd packets over N
//! extra connections, none / zlib / zstd, into `ferry receive
//! --multifd-channels N` and into real QEMU 10 and 7.2 destinations with the same
//! multifd settings, and live while the guest dirties its RAM. Every run
//! must leave the destination's RAM equal to the source's byte for byte,
//! and the sender's statistics must show the bytes really went over the
//! channels.
//!
//! QEMU 10 is taken from `$FERRY_QEMU10_PREFIX` (default /opt/qemu-10.0.2,
//! as `.ci/run` installs it); the QEMU tests fail without it, naming the path.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_tests::ferry::run_ferry;
use ferry_tests::files::{assert_same_file, read_json, shm_tempdir};
use ferry_tests::guest::loadgen;
use ferry_tests::migrate::{self, assert_both_succeed, named};
use ferry_tests::qemu::{device_state_from, none_machine_args, ram_file_args, Build, Qemu};
use ferry_tests::ram::{self, first_difference, write_mixed_image, PAGE_SIZE};
use serde_json::{json, Value};

const TIMEOUT: Duration = Duration::from_secs(180);
const PREFIX: &str = "ferry-mfsend-";
/// A multifd channel's opening bytes (`MultiFDInit_t`).
const INIT_LEN: u64 = 64;
/// A multifd packet header on 4 KiB pages.
const HEADER_LEN: u64 = 1344;

/// Checks the sender's `multifd` statistics of a run with `channels`
/// channels: every channel carried packets, and (for zlib or zstd) the
/// channels carried fewer bytes than the raw pages they hold.
fn assert_channels_carried_the_pages(st: &Value, channels: usize, compression: &str) {
    let m = &st["multifd"];
    assert_eq!(m["channels"], channels, "{st}");
    let bytes: Vec<u64> = m["bytes"]
        .as_array()
        .unwrap_or_else(|| panic!("multifd.bytes: {st}"))
        .iter()
        .map(|b| b.as_u64().expect("a byte count"))
        .collect();
    assert_eq!(bytes.len(), channels, "{st}");
    for (i, b) in bytes.iter().enumerate() {
        assert!(
            *b > INIT_LEN + 4 * HEADER_LEN,
            "channel {i} carried no packets ({b} bytes): {st}"
        );
    }
    let total: u64 = bytes.iter().sum();
    assert_eq!(m["total-bytes"], total, "{st}");
    let transferred = st["ram"]["transferred"].as_u64().expect("ram.transferred");
    assert!(total < transferred, "the main stream has bytes too: {st}");
    let normal_pages =
        st["ram"]["normal"].as_u64().unwrap() + st["compression"]["pages"].as_u64().unwrap();
    let raw = normal_pages * PAGE_SIZE as u64;
    if compression == "none" {
        assert!(
            total >= raw,
            "{total} channel bytes for {raw} bytes of pages: {st}"
        );
    } else {
        assert!(
            st["compression"]["pages"].as_u64().unwrap() > 0 && total < raw,
            "{compression}: {total} channel bytes for {raw} bytes of pages: {st}"
        );
    }
}

/// `ferry send --multifd-channels N --multifd-compression C` into `ferry
/// receive --multifd-channels N`; returns the sender's statistics.
fn ferry_to_ferry(
    dir: &Path,
    src: &Path,
    channels: u8,
    compression: &str,
    extra: &[&str],
) -> Value {
    let dest = dir.join("dest.ram");
    let _ = fs::remove_file(&dest);
    let n = channels.to_string();
    let (mut r, uri) = migrate::receive(dir, "tcp:127.0.0.1:0", &dest)
        .args(&["--multifd-channels", &n])
        .start_listening(&dir.join("receive.err"))
        .expect("starting ferry receive");
    let mut s = migrate::send(dir, "send", &uri)
        .args(&["--ram", &named(src, "ram")])
        .args(&[
            "--multifd-channels",
            &n,
            "--multifd-compression",
            compression,
        ])
        .args(extra)
        .start(&dir.join("send.err"))
        .expect("starting ferry send");
    assert_both_succeed(&mut s, &mut r, TIMEOUT);
    assert!(
        s.stderr().contains("RAM digests match"),
        "ferry send reports the verified digests: {}",
        s.stderr()
    );
    assert_same_file(src, &dest);
    let st = read_json(&dir.join("send.json"));
    assert_eq!(st["status"], "completed", "{st}");
    assert_channels_carried_the_pages(&st, channels.into(), compression);
    st
}

#[test]
fn multifd_send_into_ferry_receive_with_2_and_4_channels_none_zlib_zstd() {
    let dir = shm_tempdir(PREFIX);
    let d = dir.path();
    let src = d.join("source.ram");
    let size = 256 << 20;
    ram::write_mixed_image(&src, size, 41).expect("writing 256 MiB of RAM");
    let census = ram::census(size);
    for channels in [2, 4] {
        for compression in ["none", "zlib", "zstd"] {
            let st = ferry_to_ferry(d, &src, channels, compression, &[]);
            // Zero pages are counted as such (in the packets' zero-page
            // lists); every other page went in a packet as a normal page.
            assert_eq!(st["ram"]["duplicate"], census.zero, "{st}");
            let packed = st["ram"]["normal"].as_u64().unwrap()
                + st["compression"]["pages"].as_u64().unwrap();
            assert_eq!(packed, census.fill + census.text + census.random, "{st}");
            eprintln!(
                "{channels} channels, {compression}: {} ms, {} bytes, per channel {}",
                st["total-time"], st["ram"]["transferred"], st["multifd"]["bytes"]
            );
        }
    }
}

/// A directory in tmpfs with `MIB` MiB of mixed RAM in `source.ram`.
fn source(mib: usize, seed: u64) -> (tempfile::TempDir, PathBuf) {
    let dir = shm_tempdir(PREFIX);
    let src = dir.path().join("source.ram");
    ram::write_mixed_image(&src, mib << 20, seed).expect("writing RAM");
    (dir, src)
}

#[test]
fn legacy_sync_mode_into_ferry_receive() {
    let (dir, src) = source(64, 42);
    let d = dir.path();
    ferry_to_ferry(d, &src, 3, "zlib", &["--multifd-flush-after-each-section"]);
}

/// The bandwidth cap counts the channels' bytes: 64 MiB of mixed RAM is
/// about 48 MiB on the channels, so at 24 MiB/s the run cannot take less
/// than about 2 s (minus the first window's burst), though uncapped it
/// takes a fraction of that. A cap on the main stream alone would let it
/// finish at once.
#[test]
fn the_bandwidth_cap_covers_the_channels() {
    let (dir, src) = source(64, 45);
    let d = dir.path();
    let cap = 24u64 << 20;
    let st = ferry_to_ferry(d, &src, 2, "none", &["--max-bandwidth", "24M"]);
    let bytes = st["ram"]["transferred"].as_u64().expect("transferred");
    let ms = st["total-time"].as_u64().expect("total-time");
    let floor = bytes * 1000 / cap - 200;
    assert!(
        ms >= floor,
        "{bytes} bytes in {ms} ms: faster than {cap} bytes/s allows ({floor} ms): {st}"
    );
}

#[test]
fn multifd_send_refuses_what_it_cannot_combine() {
    let dir = shm_tempdir(PREFIX);
    let d = dir.path();
    let src = d.join("source.ram");
    ram::write_mixed_image(&src, 1 << 20, 43).expect("writing RAM");
    let ram = named(&src, "ram");
    let file = format!("file:{}", d.join("out.mig").display());
    for (extra, says) in [
        (vec!["--to", "tcp:127.0.0.1:9", "--compress"], "--compress"),
        (
            vec!["--to", "tcp:127.0.0.1:9", "--integrity"],
            "--integrity",
        ),
        (vec!["--to", file.as_str()], "a file: destination"),
    ] {
        let mut args = vec!["send", "--ram", &ram, "--multifd-channels", "2"];
        args.extend(&extra);
        let out = run_ferry(&args, Duration::from_secs(30)).expect("running ferry send");
        assert!(!out.status.success(), "{extra:?} was accepted");
        assert!(
            out.stderr.contains("--multifd-channels does not work with")
                && out.stderr.contains(says),
            "{extra:?}: {}",
            out.stderr
        );
    }
    // The compression alone, without channels, is refused by the parser.
    let out = run_ferry(
        [
            "send",
            "--ram",
            &ram,
            "--to",
            "tcp:127.0.0.1:9",
            "--multifd-compression",
            "zstd",
        ],
        Duration::from_secs(30),
    )
    .expect("running ferry send");
    assert!(!out.status.success(), "{}", out.stderr);
    assert!(out.stderr.contains("--multifd-channels"), "{}", out.stderr);
}

#[test]
fn live_multifd_zstd_send_while_the_guest_dirties() {
    let dir = shm_tempdir(PREFIX);
    let d = dir.path();
    let g = loadgen(d, "src", "256M")
        .rate("64M")
        .start()
        .expect("starting ferry loadgen");
    let dest = d.join("dst.ram");
    let (mut r, uri) = migrate::receive(d, "tcp:127.0.0.1:0", &dest)
        .args(&["--multifd-channels", "2"])
        .start_listening(&d.join("receive.err"))
        .expect("starting ferry receive");
    let mut s = migrate::send(d, "send", &uri)
        .args(&g.send_args())
        .args(&[
            "--multifd-channels",
            "2",
            "--multifd-compression",
            "zstd",
            "--max-bandwidth",
            "256M",
        ])
        .start(&d.join("send.err"))
        .expect("starting ferry send");
    assert_both_succeed(&mut s, &mut r, TIMEOUT);
    assert_eq!(g.status().unwrap(), "postmigrate");
    assert_same_file(&g.ram, &dest);
    let st = read_json(&d.join("send.json"));
    assert_eq!(st["status"], "completed", "{st}");
    assert!(
        !st["rounds"].as_array().expect("rounds").is_empty(),
        "the guest dirtied pages, so there was more than one round: {st}"
    );
    assert_channels_carried_the_pages(&st, 2, "zstd");
}

// ---- QEMU destinations (adapted from qemu10_destination.rs) ----

/// Which QEMU a destination runs.
#[derive(Clone, Copy)]
enum Version {
    /// QEMU 10 from `$FERRY_QEMU10_PREFIX`.
    Qemu10,
    /// The system's QEMU 7.2.
    Qemu72,
}

/// QEMU `version` with `args`, through the harness's one QMP client.
fn start(version: Version, name: &str, args: &[String]) -> Qemu {
    let build = match version {
        Version::Qemu10 => Build::Qemu10,
        Version::Qemu72 => Build::System,
    };
    Qemu::spawn_build(build, args).unwrap_or_else(|e| panic!("starting QEMU {name}: {e}"))
}

/// A QEMU `-M none` destination with the multifd capability, `channels`
/// channels and `compression`, set before `migrate-incoming` on
/// `dir/in.sock` (`extra` QEMU arguments too); returns it and the URI.
fn multifd_destination(
    version: Version,
    dir: &Path,
    machine: Vec<String>,
    channels: u8,
    compression: &str,
    extra: &[&str],
) -> (Qemu, String) {
    let sock = dir.join("in.sock");
    let _ = fs::remove_file(&sock);
    let mut args = machine;
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    args.extend(["-incoming".into(), "defer".into()]);
    let mut q = start(version, "dest", &args);
    q.qmp(
        "migrate-set-capabilities",
        json!({ "capabilities": [{ "capability": "multifd", "state": true }] }),
    );
    q.qmp(
        "migrate-set-parameters",
        json!({ "multifd-channels": channels, "multifd-compression": compression }),
    );
    let uri = format!("unix:{}", sock.display());
    q.qmp("migrate-incoming", json!({ "uri": uri }));
    (q, uri)
}

fn assert_same_ram(dest: &Path, src: &Path) {
    let got = fs::read(dest).expect("reading the destination's RAM");
    let want = fs::read(src).expect("reading the source's RAM");
    assert_eq!(got.len(), want.len(), "RAM sizes");
    if let Some(at) = first_difference(&got, &want) {
        panic!("the destination's RAM differs from the source's at byte {at:#x}");
    }
}

/// `ferry send --return-path --multifd-channels 2` into a QEMU 10 `-M none`
/// destination set up the same way: exit 0 on SHUT 0 only, RAM equal.
fn into_qemu10(compression: &str, send_extra: &[&str], qemu_extra: &[&str]) {
    into_qemu(Version::Qemu10, 2, compression, send_extra, qemu_extra);
}

/// [`into_qemu10`] for either QEMU and any channel count.
fn into_qemu(
    version: Version,
    channels: u8,
    compression: &str,
    send_extra: &[&str],
    qemu_extra: &[&str],
) {
    let dir = shm_tempdir(PREFIX);
    let d = dir.path();
    let size = 64u64 << 20;
    let src = d.join("src.ram");
    write_mixed_image(&src, size as usize, 44).expect("writing the RAM image");
    let dst = d.join("dst.ram");
    let machine = none_machine_args(&dst, size);
    let (mut q, to) = multifd_destination(version, d, machine, channels, compression, qemu_extra);
    let stats = d.join("send.json");
    let ram = format!("{},name=mem", src.display());
    let n = channels.to_string();
    let mut args = vec![
        "send",
        "--ram",
        &ram,
        "--to",
        &to,
        "--return-path",
        "--no-progress",
        "--multifd-channels",
        &n,
        "--multifd-compression",
        compression,
        "--stats-json",
        stats.to_str().expect("utf-8"),
    ];
    args.extend(send_extra);
    let out = run_ferry(&args, TIMEOUT).expect("running ferry send");
    assert!(
        out.status.success(),
        "ferry send {compression} into QEMU failed: {}\nQEMU:\n{}",
        out.stderr,
        q.stderr()
    );
    assert!(out.stderr.contains("SHUT 0"), "{}", out.stderr);
    let st = read_json(&stats);
    assert_eq!(st["status"], "completed", "{st}");
    assert_eq!(st["return-path"], "qemu", "{st}");
    assert_channels_carried_the_pages(&st, channels.into(), compression);
    q.wait_completed();
    assert_same_ram(&dst, &src);
}

#[test]
fn multifd_none_into_qemu10() {
    into_qemu10("none", &[], &[]);
}

#[test]
fn multifd_zlib_into_qemu10() {
    into_qemu10("zlib", &["--multifd-zlib-level", "6"], &[]);
}

#[test]
fn multifd_zstd_into_qemu10() {
    into_qemu10("zstd", &["--multifd-zstd-level", "3"], &[]);
}

/// QEMU 10 loads ferry's multifd stream at every channel count the
/// ferry-to-ferry tests use (2 above, 1 and 4 here; 1 is multifd's floor).
#[test]
fn multifd_none_and_zstd_into_qemu10_with_1_and_4_channels() {
    for channels in [1, 4] {
        for compression in ["none", "zstd"] {
            into_qemu(Version::Qemu10, channels, compression, &[], &[]);
        }
    }
}

/// A QEMU 10 destination in the legacy sync mode (as machine types up to
/// 8.0 have it) takes the per-section sync points.
#[test]
fn multifd_legacy_sync_into_qemu10() {
    into_qemu10(
        "zstd",
        &["--multifd-flush-after-each-section"],
        &["-global", "migration.multifd-flush-after-each-section=on"],
    );
}

/// QEMU 7.2 knows only the legacy sync mode (and no MULTIFD_FLUSH); its
/// packet header has the same layout, zero_pages unused.
#[test]
fn multifd_legacy_sync_into_qemu72() {
    into_qemu(
        Version::Qemu72,
        2,
        "zstd",
        &["--multifd-flush-after-each-section"],
        &[],
    );
}

/// `-M pc` on both sides: every RAM block and the device state of a QEMU 10
/// source of the same command line go to a QEMU 10 destination over two
/// zstd channels; SHUT 0, and the guest RAM arrives byte for byte.
#[test]
fn multifd_zstd_into_a_qemu10_pc_with_device_state() {
    let dir = shm_tempdir(PREFIX);
    let d = dir.path();
    let size = 64u64 << 20;
    let src = d.join("src.ram");
    write_mixed_image(&src, size as usize, 45).expect("writing the RAM image");
    let pc = |ram: &Path| {
        let mut a: Vec<String> = ["-M", "pc", "-accel", "tcg", "-nodefaults"]
            .map(String::from)
            .into();
        a.extend(ram_file_args(ram, size));
        a
    };
    let extracted = device_state_from(Build::Qemu10, d, &pc(&src))
        .unwrap_or_else(|e| panic!("device state from a QEMU 10 source: {e}"));
    let dst = d.join("dst.ram");
    let (mut q, to) = multifd_destination(Version::Qemu10, d, pc(&dst), 2, "zstd", &[]);
    let device = extracted.device.to_str().expect("utf-8").to_owned();
    let mut args: Vec<String> = [
        "send",
        "--to",
        &to,
        "--return-path",
        "--no-progress",
        "--device-state",
        &device,
        "--multifd-channels",
        "2",
        "--multifd-compression",
        "zstd",
    ]
    .map(String::from)
    .into();
    args.extend(extracted.ram_args());
    let out = run_ferry(&args, TIMEOUT).expect("running ferry send");
    assert!(
        out.status.success() && out.stderr.contains("SHUT 0"),
        "ferry send into a QEMU 10 pc failed: {}\nQEMU:\n{}",
        out.stderr,
        q.stderr()
    );
    q.wait_completed();
    assert_same_ram(&dst, &src);
}

/// `--multifd-compression auto` (ferry receivers only): zstd channels that
/// also carry raw packets (the first windows of chunks go raw, the next ones
/// compressed, to compare the two; incompressible pages of compressed
/// packets go raw whatever the choice) load byte-identical, with both kinds
/// of packets on the channels.
#[test]
fn multifd_auto_mixes_raw_and_zstd_packets_into_ferry_receive() {
    let dir = shm_tempdir(PREFIX);
    let d = dir.path();
    let src = d.join("source.ram");
    ram::write_mixed_image(&src, 128 << 20, 43).expect("writing 128 MiB of RAM");
    for channels in [2, 4] {
        let st = ferry_to_ferry(d, &src, channels, "auto", &[]);
        let raw = st["ram"]["normal"].as_u64().unwrap();
        let compressed = st["compression"]["pages"].as_u64().unwrap();
        assert!(
            raw > 0 && compressed > 0,
            "{channels} channels: auto sent {raw} raw and {compressed} compressed pages: {st}"
        );
    }
}
