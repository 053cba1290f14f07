//! Zero pages in multifd packets' zero-page lists (QEMU 9.0's
//! `zero-page-detection=multifd`), ferry to ferry: the receiver must clear
//! them in a destination file that already holds data, since it cannot
//! assume fresh RAM there, and the main stream no longer carries them as
//! ZERO records.

use std::fs;
use std::time::Duration;

use ferry_tests::files::{assert_same_file, read_json, shm_tempdir};
use ferry_tests::migrate::{self, assert_both_succeed, named};
use ferry_tests::ram::{self, PAGE_SIZE};

const TIMEOUT: Duration = Duration::from_secs(180);

#[test]
fn zero_pages_in_packets_clear_a_destination_that_holds_data() {
    let dir = shm_tempdir("ferry-mfzero-");
    let d = dir.path();
    let size = 64 << 20;
    let src = d.join("source.ram");
    ram::write_mixed_image(&src, size, 45).expect("writing 64 MiB of RAM");
    let census = ram::census(size);
    assert!(census.zero > 1000, "the image has zero pages: {census:?}");
    for compression in ["none", "zstd"] {
        // Every byte of the destination is stale: a zero page left alone
        // would show as 0xa5 bytes.
        let dest = d.join("dest.ram");
        fs::write(&dest, vec![0xa5u8; size]).expect("writing the stale destination");
        let (mut r, uri) = migrate::receive(d, "tcp:127.0.0.1:0", &dest)
            .args(&["--multifd-channels", "2"])
            .start_listening(&d.join("receive.err"))
            .expect("starting ferry receive");
        let mut s = migrate::send(d, "send", &uri)
            .args(&["--ram", &named(&src, "ram")])
            .args(&[
                "--multifd-channels",
                "2",
                "--multifd-compression",
                compression,
            ])
            .start(&d.join("send.err"))
            .expect("starting ferry send");
        assert_both_succeed(&mut s, &mut r, TIMEOUT);
        assert_same_file(&src, &dest);
        let st = read_json(&d.join("send.json"));
        assert_eq!(st["status"], "completed", "{st}");
        assert_eq!(st["ram"]["duplicate"], census.zero, "{st}");
        // As ZERO records the zero pages alone would take 9 bytes each on
        // the main stream; in the packets they take 8 each on the channels.
        let main = st["ram"]["transferred"].as_u64().unwrap()
            - st["multifd"]["total-bytes"].as_u64().unwrap();
        assert!(
            main < census.zero * 9 / 4,
            "{compression}: {main} bytes on the main stream for {} zero pages of {} bytes: {st}",
            census.zero,
            PAGE_SIZE
        );
    }
}
