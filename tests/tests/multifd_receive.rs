//! `ferry receive --multifd-channels 2` against hand-made multifd sources over
//! real sockets: a well-formed one loads, and channels that disagree with the
//! main stream or with their own bounds fail with the channel and the byte
//! offset named, never a hang and never exit 0.
//!
//! The main stream is QEMU 10's shape: the RAM setup section with MULTIFD_FLUSH
//! before its EOS, an END section with MULTIFD_FLUSH, EOF and a vmdesc. Each
//! channel opens with its 64-byte init and answers every flush with a SYNC.

use std::io::Write;
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use ferry_proto::multifd::{self, ChannelInit, Compression, Encoder, PacketHeader, HEADER_LEN};
use ferry_proto::qemu_file::QemuFileWriter;
use ferry_proto::stream::encode::{self, RamWriter};
use ferry_proto::stream::{RamBlockInfo, SectionKind, PAGE_SIZE};
use ferry_proto::transport::MemTransport;
use ferry_tests::files::{assert_same_bytes, shm_tempdir};
use ferry_tests::proc::ferry;

const PAGES: u64 = 64;
const TIMEOUT: Duration = Duration::from_secs(30);

/// The main stream: one block "ram" of [`PAGES`] pages, no page records of
/// its own (the channels carry them), two sync points.
fn main_stream() -> Vec<u8> {
    let mut f = QemuFileWriter::new(MemTransport::new());
    let mut ram = RamWriter::new();
    let blocks = [RamBlockInfo {
        idstr: "ram".into(),
        length: PAGES * PAGE_SIZE as u64,
    }];
    encode::put_file_header(&mut f);
    encode::put_configuration(&mut f, "none");
    encode::put_section_start(&mut f, SectionKind::Start, 2, "ram", 0, 4).unwrap();
    ram.put_mem_size(&mut f, &blocks).unwrap();
    ram.put_multifd_flush(&mut f);
    ram.put_eos(&mut f);
    encode::put_footer(&mut f, 2);
    encode::put_section_part(&mut f, SectionKind::End, 2);
    ram.put_multifd_flush(&mut f);
    ram.put_eos(&mut f);
    encode::put_footer(&mut f, 2);
    encode::put_eof(&mut f);
    encode::put_vmdesc(&mut f, br#"{"page_size":4096,"devices":[]}"#);
    f.into_transport().unwrap().take()
}

/// Page `i` of the guest: text-like bytes that differ from page to page.
fn page(i: u64) -> Vec<u8> {
    (0..PAGE_SIZE)
        .map(|b| b"multifd "[b % 8] ^ (i as u8))
        .collect()
}

/// A packet of `offsets` (normal pages) of `block`, compressed on `enc`.
fn packet(block: &str, offsets: &[u64], enc: &mut Encoder) -> Vec<u8> {
    let data: Vec<u8> = offsets
        .iter()
        .flat_map(|&o| page(o / PAGE_SIZE as u64))
        .collect();
    let mut payload = Vec::new();
    enc.encode(&data, &mut payload).unwrap();
    let h = PacketHeader {
        flags: enc.method().flag(),
        normal_pages: offsets.len() as u32,
        next_packet_size: payload.len() as u32,
        block: block.into(),
        offsets: offsets.to_vec(),
        ..PacketHeader::default()
    };
    let mut out = header(&h);
    out.extend_from_slice(&payload);
    out
}

fn header(h: &PacketHeader) -> Vec<u8> {
    let mut b = [0u8; HEADER_LEN];
    h.encode(&mut b);
    b.to_vec()
}

fn sync() -> Vec<u8> {
    header(&PacketHeader::sync(0))
}

/// Channel `id`: its init, a SYNC for the setup flush, its half of the
/// pages (even or odd), and a SYNC for the final flush.
fn channel(id: u8, method: Compression) -> Vec<u8> {
    let mut enc = Encoder::new(method, 1).unwrap();
    let mut out = ChannelInit { uuid: [0; 16], id }.encode().to_vec();
    out.extend(sync());
    let mine: Vec<u64> = (0..PAGES)
        .filter(|p| p % 2 == u64::from(id))
        .map(|p| p * PAGE_SIZE as u64)
        .collect();
    out.extend(packet("ram", &mine, &mut enc));
    out.extend(sync());
    out
}

/// `ferry receive --multifd-channels 2` into `ram` (block `name`) on a port of
/// its own, with a stall timeout of `stall` seconds.
fn receive_args(ram: &Path, name: &str, stall: u32) -> Vec<String> {
    [
        "receive",
        "--listen",
        "tcp:127.0.0.1:0",
        "--ram",
        &format!("{},name={name}", ram.display()),
        "--multifd-channels",
        "2",
        "--stall-timeout",
        &stall.to_string(),
    ]
    .map(String::from)
    .into()
}

/// Runs `ferry receive --multifd-channels 2`, connects the three channels in
/// the order channel 1, main, channel 0, writes them, and returns the
/// receiver's exit status and stderr.
fn run(main: &[u8], channels: [Vec<u8>; 2], dir: &Path) -> (bool, String) {
    let (mut receiver, uri) = ferry(&receive_args(&dir.join("ram.ram"), "ram", 10))
        .start_listening(&dir.join("receive.log"))
        .expect("ferry receive starts");
    let addr = uri.trim_start_matches("tcp:");
    let connect = || TcpStream::connect(addr).expect("connecting to ferry receive");
    let [c0, c1] = channels;
    let mut sockets = [(connect(), c1), (connect(), main.to_vec()), (connect(), c0)];
    // A receiver that failed closes its end: later writes may then fail,
    // which is what the fault cases expect.
    for (s, bytes) in &mut sockets {
        let _ = s.write_all(bytes);
    }
    drop(sockets);
    let status = receiver.wait(TIMEOUT).expect("ferry receive ends");
    (status.success(), receiver.stderr())
}

fn expect_failure(main: &[u8], channels: [Vec<u8>; 2], needles: &[&str]) {
    let dir = shm_tempdir("ferry-mfrecv-");
    let (ok, stderr) = run(main, channels, dir.path());
    assert!(!ok, "ferry receive succeeded on a bad source:\n{stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "no {needle:?} in:\n{stderr}");
    }
}

#[test]
fn two_channels_in_any_order_load_every_page() {
    for method in [Compression::None, Compression::Zlib, Compression::Zstd] {
        let dir = shm_tempdir("ferry-mfrecv-");
        let (ok, stderr) = run(
            &main_stream(),
            [channel(0, method), channel(1, method)],
            dir.path(),
        );
        assert!(ok, "{method:?}: {stderr}");
        let want: Vec<u8> = (0..PAGES).flat_map(page).collect();
        assert_same_bytes(&want, &dir.path().join("ram.ram"));
    }
}

#[test]
fn a_channel_without_its_sync_fails_naming_the_sync() {
    let mut short = channel(1, Compression::None);
    short.truncate(short.len() - HEADER_LEN);
    expect_failure(
        &main_stream(),
        [channel(0, Compression::None), short],
        &["multifd channel 1", "SYNC"],
    );
}

#[test]
fn a_packet_for_an_unknown_block_names_channel_and_offset() {
    let mut c1 = ChannelInit {
        uuid: [0; 16],
        id: 1,
    }
    .encode()
    .to_vec();
    c1.extend(sync());
    let mut enc = Encoder::new(Compression::None, 0).unwrap();
    c1.extend(packet("nope", &[0], &mut enc));
    expect_failure(
        &main_stream(),
        [channel(0, Compression::None), c1],
        &["multifd channel 1", "at byte 1408", "\"nope\""],
    );
}

#[test]
fn an_offset_past_the_block_names_channel_and_offset() {
    let mut c0 = ChannelInit {
        uuid: [0; 16],
        id: 0,
    }
    .encode()
    .to_vec();
    c0.extend(sync());
    let mut enc = Encoder::new(Compression::Zstd, 1).unwrap();
    c0.extend(packet("ram", &[PAGES * PAGE_SIZE as u64], &mut enc));
    expect_failure(
        &main_stream(),
        [c0, channel(1, Compression::None)],
        &[
            "multifd channel 0",
            "at byte 1408",
            "not a whole page inside",
        ],
    );
}

#[test]
fn a_page_count_above_the_packet_is_refused() {
    let mut c0 = ChannelInit {
        uuid: [0; 16],
        id: 0,
    }
    .encode()
    .to_vec();
    c0.extend(sync());
    let mut bad = header(&PacketHeader {
        normal_pages: 1,
        next_packet_size: PAGE_SIZE as u32,
        block: "ram".into(),
        offsets: vec![0],
        ..PacketHeader::default()
    });
    bad[12..16].copy_from_slice(&(multifd::PAGES_PER_PACKET as u32 + 1).to_be_bytes());
    c0.extend(bad);
    c0.extend(page(0));
    expect_failure(
        &main_stream(),
        [c0, channel(1, Compression::None)],
        &["multifd channel 0", "at byte 1408", "slots"],
    );
}

#[test]
fn a_payload_that_inflates_to_the_wrong_length_is_refused() {
    let mut c1 = ChannelInit {
        uuid: [0; 16],
        id: 1,
    }
    .encode()
    .to_vec();
    c1.extend(sync());
    let mut enc = Encoder::new(Compression::Zlib, 1).unwrap();
    let two = page(1).repeat(2);
    let mut payload = Vec::new();
    enc.encode(&two, &mut payload).unwrap();
    c1.extend(header(&PacketHeader {
        flags: Compression::Zlib.flag(),
        normal_pages: 1,
        next_packet_size: payload.len() as u32,
        block: "ram".into(),
        offsets: vec![PAGE_SIZE as u64],
        ..PacketHeader::default()
    }));
    c1.extend(payload);
    expect_failure(
        &main_stream(),
        [channel(0, Compression::None), c1],
        &["multifd channel 1", "at byte 1408", "decodes to"],
    );
}

#[test]
fn a_channel_id_beyond_the_count_is_refused() {
    let mut c = channel(0, Compression::None);
    c[24] = 2;
    expect_failure(
        &main_stream(),
        [channel(0, Compression::None), c],
        &["id 2", "out of range"],
    );
}

/// A source with multifd off (only the main stream comes) fails within the
/// stall timeout, saying how many connections came, instead of waiting.
#[test]
fn channels_that_never_come_fail_within_the_stall_timeout() {
    let dir = shm_tempdir("ferry-mfrecv-");
    let (mut receiver, uri) = ferry(&receive_args(&dir.path().join("ram.ram"), "ram", 2))
        .start_listening(&dir.path().join("receive.log"))
        .expect("ferry receive starts");
    let mut main = TcpStream::connect(uri.trim_start_matches("tcp:")).expect("connecting");
    let _ = main.write_all(&main_stream());
    let status = receiver.wait(TIMEOUT).expect("ferry receive ends");
    assert!(!status.success());
    let stderr = receiver.stderr();
    assert!(stderr.contains("1 of the 3 connections"), "{stderr}");
}

/// While the channels carry the pages the main stream is quiet: a transfer
/// longer than the stall timeout must not count as a stall on it.
#[test]
fn a_quiet_main_stream_is_not_a_stall_while_the_channels_move() {
    let dir = shm_tempdir("ferry-mfrecv-");
    let d = dir.path();
    let src = d.join("src.ram");
    ferry_tests::ram::write_mixed_image(&src, 32 << 20, 9).expect("writing the source RAM");
    let (mut receiver, uri) = ferry(&receive_args(&d.join("dst.ram"), "src", 2))
        .start_listening(&d.join("receive.log"))
        .expect("ferry receive starts");
    // About 20 MB of non-zero pages at 4 MiB/s: five seconds, over twice the
    // receiver's stall timeout, nearly all of it on the channels.
    let send = [
        "send".to_owned(),
        "--ram".into(),
        src.display().to_string(),
        "--to".into(),
        uri,
        "--multifd-channels".into(),
        "2".into(),
        "--max-bandwidth".into(),
        "4M".into(),
        "--no-progress".into(),
    ];
    let mut sender = ferry(&send)
        .start(&d.join("send.log"))
        .expect("ferry send starts");
    let sent = sender.wait(TIMEOUT * 2).expect("ferry send ends");
    let received = receiver.wait(TIMEOUT).expect("ferry receive ends");
    assert!(
        sent.success() && received.success(),
        "send: {}\nreceive: {}",
        sender.stderr(),
        receiver.stderr()
    );
    ferry_tests::files::assert_same_file(&src, &d.join("dst.ram"));
}
