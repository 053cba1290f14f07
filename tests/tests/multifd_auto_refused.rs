//! `--multifd-compression auto` mixes raw packets into zstd channels, which
//! only a ferry receiver loads: toward a QEMU destination (`--return-path`)
//! ferry send refuses it up front, naming why, instead of failing mid-run.

use std::time::Duration;

use ferry_tests::ferry::run_ferry;
use ferry_tests::files::shm_tempdir;
use ferry_tests::migrate::named;
use ferry_tests::ram;

#[test]
fn auto_toward_a_qemu_destination_is_refused() {
    let dir = shm_tempdir("ferry-mfauto-");
    let d = dir.path();
    let src = d.join("source.ram");
    ram::write_mixed_image(&src, 1 << 20, 46).expect("writing RAM");
    let ram = named(&src, "ram");
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
    let to = format!("tcp:{}", listener.local_addr().expect("its address"));
    let args = [
        "send",
        "--ram",
        &ram,
        "--to",
        &to,
        "--return-path",
        "--multifd-channels",
        "2",
        "--multifd-compression",
        "auto",
    ];
    let out = run_ferry(args, Duration::from_secs(30)).expect("running ferry send");
    assert!(!out.status.success(), "auto into QEMU was accepted");
    assert!(
        out.stderr
            .contains("--multifd-compression auto is for ferry receivers"),
        "{}",
        out.stderr
    );
    // Refused before connecting: the listener never saw a connection.
    listener.set_nonblocking(true).expect("non-blocking");
    assert!(listener.accept().is_err(), "ferry send connected first");
}
