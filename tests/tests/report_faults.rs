//! Faults found in public reports (issue 13), each as its kind: real QEMU
//! streams, and the same streams with one declaration changed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_proto::transport::MemTransport;
use ferry_tests::ferry::run_ferry;
use ferry_tests::files::{read_json, shm_tempdir};
use ferry_tests::proc::ferry;
use ferry_tests::qemu::{ram_file_args, receive_ram_args, Build, Qemu};
use ferry_tests::ram::write_mixed_image;
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(120);
const RAM: u64 = 32 << 20;

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
    recv.extend(receive_ram_args(d, machine != "none"));
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

/// A stream of one 4-page block `mem` whose page 1 is a COMPRESS_PAGE
/// record carrying `payload` (the rest raw pages).
fn with_compressed_payload(payload: &[u8]) -> Vec<u8> {
    use ferry_proto::qemu_file::QemuFileWriter;
    use ferry_proto::stream::encode::{self, RamWriter};
    use ferry_proto::stream::{RamBlockInfo, SectionKind};
    use ferry_proto::transport::MemTransport;
    let mut f = QemuFileWriter::new(MemTransport::new());
    encode::put_file_header(&mut f);
    encode::put_configuration(&mut f, "none");
    let info = [RamBlockInfo {
        idstr: "mem".into(),
        length: 4 * 4096,
    }];
    let mut ram = RamWriter::new();
    ram.put_setup_section(&mut f, 2, &info).unwrap();
    encode::put_section_part(&mut f, SectionKind::Part, 2);
    ram.put_page(&mut f, "mem", 0, &[1; 4096]).unwrap();
    // Not CONTINUE: the record names its block again.
    f.put_be64(4096 | 0x100);
    f.put_byte(3);
    f.put_buffer(b"mem");
    f.put_be32(payload.len() as u32);
    f.put_buffer(payload);
    ram.put_page(&mut f, "mem", 2 * 4096, &[2; 4096]).unwrap();
    ram.put_page(&mut f, "mem", 3 * 4096, &[3; 4096]).unwrap();
    ram.put_eos(&mut f);
    encode::put_footer(&mut f, 2);
    ram.put_end_section(&mut f, 2);
    encode::put_eof(&mut f);
    encode::put_vmdesc(&mut f, encode::MINIMAL_VMDESC);
    f.into_transport().unwrap().take()
}

/// A zlib stream of a text page, as QEMU's compress threads write it.
fn zlib_page() -> Vec<u8> {
    let page: Vec<u8> = b"a page of text "
        .iter()
        .copied()
        .cycle()
        .take(4096)
        .collect();
    let mut c = ferry_proto::compress::compressor(1);
    let mut out = vec![0u8; 4095];
    let n = ferry_proto::compress::deflate_into(&mut c, &page, &mut out).unwrap();
    out.truncate(n);
    out
}

/// `ferry inspect` (without --extract-ram) decodes every compressed page it
/// counts, as `ferry receive` does: raw deflate, gzip and a stream that
/// inflates short fail both, naming the record's offset; zlib passes both.
#[test]
fn inspect_refuses_the_compressed_pages_receive_refuses() {
    let dir = shm_tempdir("ferry-inspect-pages-");
    let d = dir.path();
    let zlib = zlib_page();
    let raw_deflate = zlib[2..zlib.len() - 4].to_vec();
    let mut gzip = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
    gzip.extend_from_slice(&raw_deflate);
    gzip.extend_from_slice(&[0; 8]);
    let short = {
        // One page of 2 KiB: a complete zlib stream that inflates short.
        let mut c = ferry_proto::compress::compressor(1);
        let mut out = vec![0u8; 4095];
        let n =
            ferry_proto::compress::deflate_into(&mut c, &[7u8; 4096][..2048], &mut out).unwrap();
        out.truncate(n);
        out
    };
    for (name, payload, ok) in [
        ("zlib", zlib.clone(), true),
        ("raw-deflate", raw_deflate, false),
        ("gzip", gzip, false),
        ("short", short, false),
        ("cut", zlib[..zlib.len() / 2].to_vec(), false),
    ] {
        let stream = d.join(format!("{name}.mig"));
        std::fs::write(&stream, with_compressed_payload(&payload)).unwrap();
        let inspect = run_ferry(["inspect".as_ref(), stream.as_os_str()], TIMEOUT).unwrap();
        let receive = run_ferry(
            [
                "receive".to_owned(),
                "--listen".into(),
                format!("file:{}", stream.display()),
                "--ram".into(),
                format!("{},name=mem", d.join(format!("{name}.ram")).display()),
            ],
            TIMEOUT,
        )
        .unwrap();
        assert_eq!(inspect.status.success(), ok, "{name}: {}", inspect.stderr);
        assert_eq!(receive.status.success(), ok, "{name}: {}", receive.stderr);
        if !ok {
            assert!(
                inspect
                    .stderr
                    .contains("compressed page cannot be inflated"),
                "{name}: {}",
                inspect.stderr
            );
        }
    }
}

/// Two --ram options naming one file, directly or through a symlink, for two
/// blocks: refused before anything is written; the same for --disk.
#[test]
fn two_options_naming_one_file_are_refused_before_writing() {
    let dir = shm_tempdir("ferry-same-file-");
    let d = dir.path();
    let (stream, file, link) = same_file_setup(d);
    let fresh = d.join("new.ram");
    for (what, a, b, flag) in [
        ("same path", &file, &file, "--ram"),
        ("a symlink", &file, &link, "--ram"),
        ("a file not yet created", &fresh, &fresh, "--ram"),
        ("a disk", &file, &link, "--disk"),
    ] {
        let mut args = vec![
            "receive".to_owned(),
            "--listen".into(),
            format!("file:{}", stream.display()),
            "--ram".into(),
            format!("{},name=a", a.display()),
        ];
        if flag == "--ram" {
            args.extend(["--ram".into(), format!("{},name=b", b.display())]);
        } else {
            args.extend([
                "--ram".into(),
                format!("{},name=b", d.join("b.ram").display()),
            ]);
            args.extend(["--disk".into(), format!("{},name=disk0", b.display())]);
        }
        let o = run_ferry(&args, TIMEOUT).unwrap();
        assert!(!o.status.success(), "{what}: accepted");
        assert!(
            o.stderr.contains("are the same file"),
            "{what}: {}",
            o.stderr
        );
        assert_eq!(
            std::fs::read(&file).unwrap(),
            [9u8; 8192],
            "{what}: written"
        );
        assert!(!fresh.exists(), "{what}: created");
    }
}

/// The two-block stream, an existing RAM file `one.ram` of 9s, and a
/// symlink `link.ram` to it, in `d`.
fn same_file_setup(d: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let stream = two_block_stream(d);
    let file = d.join("one.ram");
    std::fs::write(&file, [9u8; 8192]).unwrap();
    let link = d.join("link.ram");
    std::os::unix::fs::symlink(&file, &link).unwrap();
    (stream, file, link)
}

/// A stream of two 8 KiB blocks, "a" and "b", in `d`.
fn two_block_stream(d: &Path) -> PathBuf {
    let stream = d.join("two.mig");
    let mut f =
        ferry_proto::qemu_file::QemuFileWriter::new(ferry_proto::transport::MemTransport::new());
    let blocks: [(&str, &[u8]); 2] = [("a", &[1u8; 8192]), ("b", &[2u8; 8192])];
    ferry_proto::stream::image::write_stream(&mut f, &blocks, &Default::default(), "none", None)
        .unwrap();
    std::fs::write(&stream, f.into_transport().unwrap().take()).unwrap();
    stream
}

/// `--device-state-out` naming a RAM file, and a `--ram` path that is a
/// symlink to nothing: refused before anything is written.
#[test]
fn device_state_out_on_ram_and_dangling_symlinks_are_refused() {
    let dir = shm_tempdir("ferry-same-file-");
    let d = dir.path();
    let (stream, file, link) = same_file_setup(d);
    // Block "a" in `a`, "b" in a new file, and `extra`.
    let receive = |a: &Path, extra: &[String]| {
        let mut args = vec![
            "receive".to_owned(),
            "--listen".into(),
            format!("file:{}", stream.display()),
            "--ram".into(),
            format!("{},name=a", a.display()),
            "--ram".into(),
            format!("{},name=b", d.join("b.ram").display()),
        ];
        args.extend_from_slice(extra);
        run_ferry(&args, TIMEOUT).unwrap()
    };
    // The device state may not land on a RAM file either.
    let o = receive(
        &file,
        &["--device-state-out".into(), link.display().to_string()],
    );
    assert!(
        !o.status.success(),
        "--device-state-out on a RAM file: accepted"
    );
    assert!(o.stderr.contains("are the same file"), "{}", o.stderr);
    assert_eq!(std::fs::read(&file).unwrap(), [9u8; 8192]);
    // A symlink to a file that does not exist would be replaced by a new
    // file, and a VMM mapping its target would get nothing.
    let target = d.join("missing").join("mem");
    let dangling = d.join("dangling.ram");
    std::os::unix::fs::symlink(&target, &dangling).unwrap();
    let o = receive(&dangling, &[]);
    assert!(!o.status.success(), "a dangling symlink: accepted");
    assert!(
        o.stderr.contains("symlink to a file that does not exist"),
        "{}",
        o.stderr
    );
    assert!(dangling.is_symlink(), "the symlink was replaced");
    assert!(!d.join("b.ram").exists(), "b.ram created");
}

/// A failed receive leaves no new RAM file (nor its temporary name) at the
/// destination; a file that existed is named in --stats-json as possibly
/// partial. The same stream whole creates the file, with its content.
#[test]
fn a_failed_receive_leaves_no_new_ram_file() {
    let dir = shm_tempdir("ferry-partial-");
    let d = dir.path();
    let mut f =
        ferry_proto::qemu_file::QemuFileWriter::new(ferry_proto::transport::MemTransport::new());
    let a: Vec<u8> = (0..64 * 4096).map(|i| (i % 251) as u8).collect();
    let b = vec![5u8; 64 * 4096];
    let blocks: [(&str, &[u8]); 2] = [("a", &a), ("b", &b)];
    ferry_proto::stream::image::write_stream(&mut f, &blocks, &Default::default(), "none", None)
        .unwrap();
    let whole = f.into_transport().unwrap().take();
    let cut = d.join("cut.mig");
    std::fs::write(&cut, &whole[..whole.len() - 3 * 4096]).unwrap();
    let full = d.join("whole.mig");
    std::fs::write(&full, &whole).unwrap();
    let existing = d.join("b.ram");
    std::fs::write(&existing, vec![0u8; b.len()]).unwrap();
    let fresh = d.join("a.ram");
    let stats = d.join("stats.json");
    let receive = |stream: &Path| {
        run_ferry(
            [
                "receive".to_owned(),
                "--listen".into(),
                format!("file:{}", stream.display()),
                "--ram".into(),
                format!("{},name=a", fresh.display()),
                "--ram".into(),
                format!("{},name=b", existing.display()),
                "--stats-json".into(),
                stats.display().to_string(),
            ],
            TIMEOUT,
        )
        .unwrap()
    };
    let o = receive(&cut);
    assert!(!o.status.success(), "a cut stream loaded");
    let left: Vec<String> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("a.ram"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    let st = read_json(&stats);
    assert_eq!(st["status"], "failed");
    assert_eq!(
        st["possibly-partial-ram-files"],
        json!([existing.display().to_string()]),
        "{st}"
    );
    let o = receive(&full);
    assert!(o.status.success(), "{}", o.stderr);
    assert_eq!(std::fs::read(&fresh).unwrap(), a);
    assert_eq!(std::fs::read(&existing).unwrap(), b);
    assert_eq!(read_json(&stats)["possibly-partial-ram-files"], json!([]));
}

/// A receive cancelled mid-stream (SIGTERM kills its reader) leaves neither
/// the new RAM file nor its temporary name behind.
#[test]
fn a_cancelled_receive_leaves_no_partial_ram_file() {
    let dir = shm_tempdir("ferry-cancelled-");
    let d = dir.path();
    let source = d.join("source.ram");
    write_mixed_image(&source, RAM as usize, 5).unwrap();
    let dest_dir = d.join("dest");
    std::fs::create_dir(&dest_dir).unwrap();
    let dest = dest_dir.join("mem.ram");
    let (mut receiver, addr) = ferry(&[
        "receive".to_owned(),
        "--listen".into(),
        "tcp:127.0.0.1:0".into(),
        "--ram".into(),
        format!("{},name=mem", dest.display()),
    ])
    .start_listening(&d.join("receive.log"))
    .expect("starting ferry receive");
    let mut sender = ferry(&[
        "send".to_owned(),
        "--ram".into(),
        format!("{},name=mem", source.display()),
        "--to".into(),
        addr,
        "--max-bandwidth".into(),
        "4M".into(),
        "--no-progress".into(),
    ])
    .start(&d.join("send.log"))
    .expect("starting ferry send");
    let entries = || std::fs::read_dir(&dest_dir).unwrap().count();
    ferry_tests::proc::wait_until(TIMEOUT, "the receiver's RAM file", || entries() > 0)
        .unwrap_or_else(|e| panic!("{e}\n{}", receiver.stderr()));
    receiver.signal(15);
    let status = receiver.wait(TIMEOUT).expect("ferry receive ends");
    assert_eq!(status.code(), Some(3), "{}", receiver.stderr());
    let left: Vec<_> = std::fs::read_dir(&dest_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    let sent = sender.wait(TIMEOUT).expect("ferry send ends");
    assert!(
        !sent.success(),
        "the sender succeeded into a cancelled receive"
    );
}

/// Bytes a closure writes through a QEMUFile.
fn written(
    w: impl FnOnce(&mut ferry_proto::qemu_file::QemuFileWriter<'_, MemTransport>),
) -> Vec<u8> {
    let mut f = ferry_proto::qemu_file::QemuFileWriter::new(MemTransport::new());
    w(&mut f);
    f.into_transport().unwrap().take()
}

/// A stream that announces block "a" of 16 pages and "b" of 4 but sends
/// only pages 0..4 of "a" (two raw, two zero) and all of "b"; `sealed`, it
/// carries ferry's integrity checkpoints, which only a ferry sender writes
/// (after the configuration and right before EOF, each hashing the bytes
/// since the previous one's first byte).
fn partial_stream(sealed: bool) -> Vec<u8> {
    use ferry_proto::stream::encode::{self, RamWriter};
    use ferry_proto::stream::integrity::Checkpoint;
    use ferry_proto::stream::{RamBlockInfo, SectionKind};
    let head = written(|f| {
        encode::put_file_header(f);
        encode::put_configuration(f, "none");
    });
    let blocks = [("a", 16u64), ("b", 4)].map(|(n, pages)| RamBlockInfo {
        idstr: n.into(),
        length: pages * 4096,
    });
    let ram = written(|f| {
        let mut w = RamWriter::new();
        w.put_setup_section(f, 2, &blocks).unwrap();
        encode::put_section_part(f, SectionKind::Part, 2);
        for (block, page) in [
            ("a", 0u64),
            ("a", 1),
            ("b", 0),
            ("b", 1),
            ("b", 2),
            ("b", 3),
        ] {
            w.put_page(f, block, page * 4096, &[page as u8 + 1; 4096])
                .unwrap();
        }
        w.put_zero_page(f, "a", 2 * 4096, 0).unwrap();
        w.put_zero_page(f, "a", 3 * 4096, 0).unwrap();
        w.put_eos(f);
        encode::put_footer(f, 2);
        w.put_end_section(f, 2);
    });
    let eof = written(encode::put_eof);
    if !sealed {
        return [head, ram, eof].concat();
    }
    let checkpoint = |seq: u64, covered: &[u8]| {
        written(|f| {
            Checkpoint {
                seq,
                covered: covered.len() as u64,
                digest: xxhash_rust::xxh3::xxh3_128(covered),
            }
            .put(f, 1)
            .unwrap()
        })
    };
    let first = checkpoint(0, &head);
    let second = checkpoint(1, &[&first[..], &ram[..]].concat());
    [head, first, ram, second, eof].concat()
}

/// Pages never sent. A source that ends its stream without sending some
/// pages (QEMU 10 with multifd on, its channels refused, sends only the
/// main channel's records) loads as a success: each block's pages, pages
/// received and pages never sent are in --stats-json, and stderr warns. A
/// sealed stream comes from a ferry sender, whose first pass sends every
/// page: the same holes are an error naming the block and the count, and
/// no RAM file is created.
#[test]
fn pages_never_sent_are_reported_and_fail_a_ferry_stream() {
    let dir = shm_tempdir("ferry-never-sent-");
    let d = dir.path();
    let stats = d.join("stats.json");
    let receive = |name: &str, stream: Vec<u8>| {
        let path = d.join(name);
        std::fs::write(&path, stream).unwrap();
        let _ = std::fs::remove_file(d.join("a.ram"));
        let _ = std::fs::remove_file(d.join("b.ram"));
        run_ferry(
            [
                "receive".to_owned(),
                "--listen".into(),
                format!("file:{}", path.display()),
                "--ram".into(),
                format!("{},name=a", d.join("a.ram").display()),
                "--ram".into(),
                format!("{},name=b", d.join("b.ram").display()),
                "--stats-json".into(),
                stats.display().to_string(),
            ],
            TIMEOUT,
        )
        .unwrap()
    };
    let o = receive("plain.mig", partial_stream(false));
    assert!(o.status.success(), "{}", o.stderr);
    let st = read_json(&stats);
    assert_eq!(
        st["ram"]["blocks"],
        json!([
            {"name": "a", "pages": 16, "received": 4, "never-sent": 12},
            {"name": "b", "pages": 4, "received": 4, "never-sent": 0},
        ]),
        "{st}"
    );
    assert!(
        o.stderr
            .contains("\"a\": 12 of its 16 pages were never sent"),
        "{}",
        o.stderr
    );
    let mut want = vec![0u8; 16 * 4096];
    want[..4096].fill(1);
    want[4096..8192].fill(2);
    assert_eq!(std::fs::read(d.join("a.ram")).unwrap(), want);

    let o = receive("sealed.mig", partial_stream(true));
    assert!(!o.status.success(), "a ferry stream with holes loaded");
    assert!(
        o.stderr.contains(
            "\"a\": 12 of its 16 pages were never sent, though a ferry sender sends every page"
        ),
        "{}",
        o.stderr
    );
    let st = read_json(&stats);
    assert_eq!(st["status"], "failed");
    let why = st["error-desc"].as_str().unwrap_or_default();
    assert!(why.contains("never sent"), "error-desc: {st}");
    assert!(!d.join("a.ram").exists(), "the failed load left a.ram");
}
