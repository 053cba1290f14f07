//! The harness against QEMU alone (no ferry): QEMU source -> file -> QEMU destination.
//!
//! These pin down the QEMU 7.2 behaviour the other tests build on: a share=on RAM file
//! on the destination ends up equal to the source's, COMPRESS_PAGE needs the compress
//! capability on the destination, a failed load ends the QEMU process, and an empty
//! stream never finishes (so only the harness's deadline ends the wait).

use std::fs;
use std::path::Path;
use std::time::Duration;

use ferry_tests::files::{assert_same_file, tempdir};
use ferry_tests::qemu::{none_machine_args, Qemu};
use ferry_tests::ram;

const RAM_SIZE: u64 = 16 << 20;

/// Migrate mixed RAM from a `-M none -S` source to `stream`; returns the RAM file.
fn make_stream(dir: &Path, stream: &Path, compress: Option<(u8, u8)>) -> std::path::PathBuf {
    let ram_file = dir.join("source.ram");
    ram::write_mixed_image(&ram_file, RAM_SIZE as usize, 11).expect("writing the RAM image");
    let mut args = none_machine_args(&ram_file, RAM_SIZE);
    args.push("-S".into());
    let mut source = Qemu::spawn(&args).unwrap_or_else(|e| panic!("starting the source: {e}"));
    source
        .migrate_to_file(stream, compress)
        .unwrap_or_else(|e| panic!("source migrating to a file: {e}"));
    ram_file
}

/// A `-M none` destination waiting for `migrate-incoming`, RAM in `dir/dest.ram`.
fn destination(dir: &Path) -> Qemu {
    let ram_file = dir.join("dest.ram");
    fs::File::create(&ram_file)
        .and_then(|f| f.set_len(RAM_SIZE))
        .expect("creating the destination RAM file");
    let mut args = none_machine_args(&ram_file, RAM_SIZE);
    args.extend(["-incoming".into(), "defer".into()]);
    Qemu::spawn(&args).unwrap_or_else(|e| panic!("starting the destination: {e}"))
}

#[test]
fn qemu_to_qemu_plain_and_compressed() {
    for compress in [None, Some((2, 1))] {
        let dir = tempdir("ferry-harness-");
        let stream = dir.path().join("stream.mig");
        let source_ram = make_stream(dir.path(), &stream, compress);
        let mut dest = destination(dir.path());
        dest.incoming_from_file(&stream, compress.is_some())
            .unwrap_or_else(|e| panic!("destination loading ({compress:?}): {e}"));
        assert_same_file(&source_ram, &dir.path().join("dest.ram"));
    }
}

#[test]
fn compressed_stream_needs_the_capability() {
    let dir = tempdir("ferry-harness-");
    let stream = dir.path().join("stream.mig");
    make_stream(dir.path(), &stream, Some((1, 1)));
    let mut dest = destination(dir.path());
    let err = dest
        .incoming_from_file(&stream, false)
        .expect_err("a destination without the compress capability must refuse COMPRESS_PAGE");
    let text = err.to_string();
    assert!(
        text.contains("unexpected compressed page") && text.contains("QEMU exited"),
        "error should quote QEMU's reason and exit: {text}"
    );
}

#[test]
fn empty_stream_hits_the_deadline() {
    let dir = tempdir("ferry-harness-");
    let stream = dir.path().join("empty.mig");
    fs::write(&stream, b"").unwrap();
    let mut dest = destination(dir.path());
    dest.migration_timeout = Duration::from_secs(2);
    let err = dest
        .incoming_from_file(&stream, false)
        .expect_err("an empty stream cannot complete");
    let text = err.to_string();
    assert!(
        text.contains("after 2s") && text.contains("QEMU still running"),
        "error should say the wait timed out: {text}"
    );
}

#[test]
fn missing_stream_fails_before_qemu_waits() {
    let dir = tempdir("ferry-harness-");
    let mut dest = destination(dir.path());
    let err = dest
        .incoming_from_file(&dir.path().join("nope.mig"), false)
        .expect_err("a missing stream file must be refused");
    assert!(err.to_string().contains("does not exist"), "{err}");
}
