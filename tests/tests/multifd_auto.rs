//! `ferry send --multifd-compression auto` into `ferry receive`: zstd
//! channels that also carry raw packets (the first windows of chunks go raw,
//! the next ones compressed, to compare the two, and incompressible pages of
//! compressed packets go raw whatever the choice). The
//! destination must equal the source byte for byte, and the sender's
//! statistics must show both kinds of packets went over the channels.

use std::fs;
use std::path::Path;
use std::time::Duration;

use ferry_tests::files::{assert_same_file, read_json, shm_tempdir};
use ferry_tests::migrate::{self, assert_both_succeed, named};
use ferry_tests::ram;
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(180);

fn auto_to_ferry(dir: &Path, src: &Path, channels: u8) -> Value {
    let dest = dir.join("dest.ram");
    let _ = fs::remove_file(&dest);
    let n = channels.to_string();
    let (mut r, uri) = migrate::receive(dir, "tcp:127.0.0.1:0", &dest)
        .args(&["--multifd-channels", &n])
        .start_listening(&dir.join("receive.err"))
        .expect("starting ferry receive");
    let mut s = migrate::send(dir, "send", &uri)
        .args(&["--ram", &named(src, "ram")])
        .args(&["--multifd-channels", &n, "--multifd-compression", "auto"])
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
    st
}

#[test]
fn auto_streams_mix_raw_and_zstd_packets_and_load_byte_identical() {
    let dir = shm_tempdir("ferry-mfauto-");
    let d = dir.path();
    let src = d.join("source.ram");
    let size = 128 << 20;
    ram::write_mixed_image(&src, size, 43).expect("writing 128 MiB of RAM");
    let census = ram::census(size);
    for channels in [2, 4] {
        let st = auto_to_ferry(d, &src, channels);
        let raw = st["ram"]["normal"].as_u64().unwrap();
        let compressed = st["compression"]["pages"].as_u64().unwrap();
        assert!(
            raw > 0 && compressed > 0,
            "{channels} channels: auto sent {raw} raw and {compressed} compressed pages: {st}"
        );
        assert_eq!(st["ram"]["duplicate"], census.zero, "{st}");
        assert_eq!(
            raw + compressed,
            census.fill + census.text + census.random,
            "{st}"
        );
        let channel_bytes = st["multifd"]["total-bytes"].as_u64().unwrap();
        assert!(
            channel_bytes < (raw + compressed) * ram::PAGE_SIZE as u64,
            "compressed packets shrank the channels' bytes: {st}"
        );
        eprintln!(
            "{channels} channels, auto: {} ms, {raw} raw and {compressed} compressed pages, {channel_bytes} channel bytes",
            st["total-time"]
        );
    }
}
