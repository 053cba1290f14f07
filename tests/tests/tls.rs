//! `ferry send` to `ferry receive` over TLS 1.3 with mutual authentication,
//! with certificates made at test time (rcgen): a full migration over tcp and
//! unix matches the source; a plain sender, a sender whose certificate comes
//! from another CA, and a receiver whose certificate comes from another CA or
//! names another host are all refused, by both ends, before any RAM is
//! written. An ignored test measures what TLS costs on 1 GiB.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_tests::proc::Background;
use ferry_tests::ram::{self, first_difference};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use serde_json::Value;
use tempfile::TempDir;

const MIB: usize = 1 << 20;
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

fn tempdir() -> TempDir {
    tempfile::Builder::new()
        .prefix("ferry-tls-")
        .tempdir()
        .expect("creating a temporary directory")
}

/// A CA: its certificate in `DIR/NAME-ca.pem`, and what signs with it.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    pem: PathBuf,
}

/// A certificate and its key, as files.
struct Identity {
    cert: PathBuf,
    key: PathBuf,
}

fn ca(dir: &Path, name: &str) -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, format!("{name} test CA"));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate().expect("CA key");
    let issuer = CertifiedIssuer::self_signed(params, key).expect("self-signing the CA");
    let pem = dir.join(format!("{name}-ca.pem"));
    fs::write(&pem, issuer.pem()).expect("writing the CA");
    Ca { issuer, pem }
}

/// A certificate signed by `ca` for `names` (DNS names, or IP addresses
/// which become IP SANs).
fn identity(dir: &Path, ca: &Ca, file: &str, names: &[&str]) -> Identity {
    let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
    let mut params = CertificateParams::new(names).expect("certificate parameters");
    params
        .distinguished_name
        .push(DnType::CommonName, file.to_owned());
    let key = KeyPair::generate().expect("key");
    let cert = params.signed_by(&key, &ca.issuer).expect("signing");
    let id = Identity {
        cert: dir.join(format!("{file}.pem")),
        key: dir.join(format!("{file}-key.pem")),
    };
    fs::write(&id.cert, cert.pem()).expect("writing the certificate");
    fs::write(&id.key, key.serialize_pem()).expect("writing the key");
    id
}

/// The names a receiver is reached by in these tests.
const SERVER_NAMES: &[&str] = &["localhost", "127.0.0.1", "::1", "ferry"];

/// One CA that signs a receiver and a sender certificate.
struct Pki {
    ca: Ca,
    server: Identity,
    client: Identity,
}

fn pki(dir: &Path, name: &str) -> Pki {
    let ca = ca(dir, name);
    let server = identity(dir, &ca, &format!("{name}-server"), SERVER_NAMES);
    let client = identity(dir, &ca, &format!("{name}-client"), &["ferry-sender"]);
    Pki { ca, server, client }
}

fn tls_args(id: &Identity, ca: &Path) -> Vec<String> {
    vec![
        "--tls-cert".into(),
        id.cert.display().to_string(),
        "--tls-key".into(),
        id.key.display().to_string(),
        "--tls-ca".into(),
        ca.display().to_string(),
    ]
}

fn receiver(dir: &Path, listen: &str, dest: &Path, tls: &[String]) -> (Background, String) {
    let mut args = vec![
        "receive".to_owned(),
        "--listen".to_owned(),
        listen.to_owned(),
        "--ram".to_owned(),
        format!("{},name=ram", dest.display()),
        "--stats-json".to_owned(),
        dir.join("receive.json").display().to_string(),
    ];
    args.extend_from_slice(tls);
    let mut r = Background::spawn(&args, &dir.join("receive.err")).expect("starting ferry receive");
    let uri = r
        .wait_listening(Duration::from_secs(20))
        .expect("ferry receive listens");
    (r, uri)
}

fn sender(dir: &Path, src: &Path, to: &str, extra: &[String]) -> Background {
    let mut args = vec![
        "send".to_owned(),
        "--ram".to_owned(),
        format!("{},name=ram", src.display()),
        "--to".to_owned(),
        to.to_owned(),
        "--no-progress".to_owned(),
        "--stats-json".to_owned(),
        dir.join("send.json").display().to_string(),
    ];
    args.extend_from_slice(extra);
    Background::spawn(&args, &dir.join("send.err")).expect("starting ferry send")
}

fn stats(dir: &Path, name: &str) -> Value {
    let text = fs::read_to_string(dir.join(name)).unwrap_or_else(|e| panic!("reading {name}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name} is not JSON: {e}"))
}

fn assert_same(a: &Path, b: &Path) {
    let (x, y) = (fs::read(a).expect("reading"), fs::read(b).expect("reading"));
    assert_eq!(x.len(), y.len(), "sizes differ");
    if let Some(at) = first_difference(&x, &y) {
        panic!(
            "{} differs from {} at byte {at:#x}",
            b.display(),
            a.display()
        );
    }
}

/// Runs one migration; returns (sender ok, receiver ok, sender stderr, receiver stderr).
fn run(
    dir: &Path,
    src: &Path,
    listen: &str,
    recv_tls: &[String],
    send_extra: &[String],
) -> (bool, bool, String, String) {
    let dest = dir.join("dest.ram");
    let _ = fs::remove_file(&dest);
    let (mut r, uri) = receiver(dir, listen, &dest, recv_tls);
    let mut s = sender(dir, src, &uri, send_extra);
    let sst = s.wait(RUN_TIMEOUT).expect("ferry send ends");
    let rst = r.wait(Duration::from_secs(30)).expect("ferry receive ends");
    (sst.success(), rst.success(), s.stderr(), r.stderr())
}

/// Both ends failed, the receiver wrote no RAM and did not complete.
fn assert_refused(dir: &Path, outcome: &(bool, bool, String, String)) {
    let (sok, rok, serr, rerr) = outcome;
    eprintln!("--- sender:\n{serr}--- receiver:\n{rerr}");
    assert!(!sok, "ferry send succeeded:\n{serr}");
    assert!(!rok, "ferry receive succeeded:\n{rerr}");
    assert!(
        !dir.join("dest.ram").exists(),
        "the receiver created its RAM file for a refused peer"
    );
    assert_eq!(stats(dir, "receive.json")["status"], "failed");
}

fn source(dir: &Path, size: usize) -> PathBuf {
    let src = dir.join("source.ram");
    ram::write_mixed_image(&src, size, 7).expect("writing the source RAM");
    src
}

#[test]
fn a_migration_over_tls_matches_the_source_over_tcp_and_unix() {
    let dir = tempdir();
    let d = dir.path();
    let src = source(d, 64 * MIB);
    let p = pki(d, "good");
    let recv_tls = tls_args(&p.server, &p.ca.pem);
    let send_tls = tls_args(&p.client, &p.ca.pem);
    let sock = d.join("m.sock");
    let unix = format!("unix:{}", sock.display());
    // tcp:127.0.0.1 checks the IP SAN, unix: the name "ferry".
    for (listen, compress) in [("tcp:127.0.0.1:0", false), (unix.as_str(), true)] {
        let mut extra = send_tls.clone();
        if compress {
            extra.push("--compress".into());
        }
        let (sok, rok, serr, rerr) = run(d, &src, listen, &recv_tls, &extra);
        assert!(sok, "ferry send over {listen} failed:\n{serr}");
        assert!(rok, "ferry receive on {listen} failed:\n{rerr}");
        assert!(serr.contains("RAM digests match"), "{serr}");
        assert_same(&src, &d.join("dest.ram"));
        assert_eq!(stats(d, "send.json")["return-path"], "ferry");
    }
}

#[test]
fn the_receiver_must_carry_the_name_the_sender_expects() {
    let dir = tempdir();
    let d = dir.path();
    let src = source(d, 8 * MIB);
    let p = pki(d, "named");
    let other = identity(d, &p.ca, "other-server", &["db.example"]);
    let recv_tls = tls_args(&other, &p.ca.pem);
    let send_tls = tls_args(&p.client, &p.ca.pem);

    // Signed by the right CA, but for another name than 127.0.0.1.
    let out = run(d, &src, "tcp:127.0.0.1:0", &recv_tls, &send_tls);
    assert_refused(d, &out);
    assert!(
        out.2.contains("receiver's certificate is not accepted"),
        "{}",
        out.2
    );

    // --tls-hostname names what the certificate carries.
    let mut extra = send_tls.clone();
    extra.extend(["--tls-hostname".into(), "db.example".into()]);
    let (sok, rok, serr, rerr) = run(d, &src, "tcp:127.0.0.1:0", &recv_tls, &extra);
    assert!(sok && rok, "send:\n{serr}\nreceive:\n{rerr}");
    assert_same(&src, &d.join("dest.ram"));
}

#[test]
fn a_plain_sender_is_refused_by_a_tls_receiver() {
    let dir = tempdir();
    let d = dir.path();
    let src = source(d, 64 * MIB);
    let p = pki(d, "good");
    let out = run(
        d,
        &src,
        "tcp:127.0.0.1:0",
        &tls_args(&p.server, &p.ca.pem),
        &[],
    );
    assert_refused(d, &out);
    assert!(
        out.3.contains("TLS handshake with the sender failed")
            && out.3.contains("does not speak TLS"),
        "receiver: {}",
        out.3
    );
    assert!(
        out.2.contains("expects TLS") || out.2.contains("cannot write the stream"),
        "sender: {}",
        out.2
    );
}

#[test]
fn a_sender_with_a_certificate_from_another_ca_is_refused() {
    let dir = tempdir();
    let d = dir.path();
    let src = source(d, 64 * MIB);
    let good = pki(d, "good");
    let rogue = pki(d, "rogue");
    // The rogue sender trusts the real receiver's CA, but its own certificate
    // is signed by another.
    let out = run(
        d,
        &src,
        "tcp:127.0.0.1:0",
        &tls_args(&good.server, &good.ca.pem),
        &tls_args(&rogue.client, &good.ca.pem),
    );
    assert_refused(d, &out);
    assert!(
        out.3.contains("the sender's certificate is not accepted"),
        "receiver: {}",
        out.3
    );
    assert!(
        out.2.contains("the receiver refused our certificate"),
        "sender: {}",
        out.2
    );
}

#[test]
fn a_receiver_with_a_certificate_from_another_ca_is_refused_by_the_sender() {
    let dir = tempdir();
    let d = dir.path();
    let src = source(d, 8 * MIB);
    let good = pki(d, "good");
    let rogue = pki(d, "rogue");
    let out = run(
        d,
        &src,
        "tcp:127.0.0.1:0",
        &tls_args(&rogue.server, &good.ca.pem),
        &tls_args(&good.client, &good.ca.pem),
    );
    assert_refused(d, &out);
    assert!(
        out.2.contains("the receiver's certificate is not accepted"),
        "sender: {}",
        out.2
    );
    assert!(
        out.3.contains("the sender refused our certificate"),
        "receiver: {}",
        out.3
    );
}

/// Sends SIGSTOP or SIGCONT to `pid`.
fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("running kill")
        .success();
    assert!(ok, "kill {sig} {pid} failed");
}

#[test]
fn the_stall_timeout_holds_inside_a_tls_session() {
    let dir = tempdir();
    let d = dir.path();
    let src = source(d, 256 * MIB);
    let p = pki(d, "good");
    let stall = ["--stall-timeout".to_owned(), "2".to_owned()];
    // A capped rate keeps the migration going for ~16 s.
    let slow = ["--max-bandwidth".to_owned(), "16M".to_owned()];
    for frozen in ["writer", "reader"] {
        let dest = d.join("dest.ram");
        let _ = fs::remove_file(&dest);
        let mut recv_args = tls_args(&p.server, &p.ca.pem);
        recv_args.extend_from_slice(&stall);
        let (mut r, uri) = receiver(d, "tcp:127.0.0.1:0", &dest, &recv_args);
        let mut send_args = tls_args(&p.client, &p.ca.pem);
        send_args.extend_from_slice(&stall);
        send_args.extend_from_slice(&slow);
        let mut s = sender(d, &src, &uri, &send_args);
        // Past the handshake and into the stream.
        let deadline = Instant::now() + Duration::from_secs(20);
        while fs::metadata(&dest).map_or(0, |m| m.len()) == 0 {
            assert!(Instant::now() < deadline, "the stream never started");
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(500));
        let (stopped, other) = match frozen {
            "writer" => (s.wait_actor("writer", Duration::from_secs(5)), &mut r),
            _ => (r.wait_actor("reader", Duration::from_secs(5)), &mut s),
        };
        let pid = stopped.expect("the actor to freeze");
        signal(pid, "-STOP");
        let t = Instant::now();
        let status = other
            .wait(Duration::from_secs(30))
            .expect("the other side ends");
        let took = t.elapsed();
        signal(pid, "-CONT");
        assert!(
            !status.success(),
            "the other side of a frozen {frozen} succeeded"
        );
        let err = other.stderr();
        assert!(err.contains("stalled"), "frozen {frozen}: {err}");
        // The receiver's read stalls after 2 s; the sender's write after the
        // socket buffers fill and 2 s more.
        assert!(
            took < Duration::from_secs(15),
            "frozen {frozen}: took {took:?}"
        );
        let _ = s.wait(Duration::from_secs(30));
        let _ = r.wait(Duration::from_secs(30));
    }
}

#[test]
fn tls_options_are_all_or_nothing_and_not_for_files() {
    let dir = tempdir();
    let d = dir.path();
    let src = source(d, MIB);
    let p = pki(d, "good");
    let out = ferry_tests::ferry::run_ferry(
        [
            "send",
            "--ram",
            &src.display().to_string(),
            "--to",
            "tcp:127.0.0.1:9",
            "--tls-cert",
            &p.client.cert.display().to_string(),
        ],
        Duration::from_secs(30),
    )
    .expect("running ferry send");
    assert!(!out.status.success());
    assert!(out.stderr.contains("--tls-key"), "{}", out.stderr);

    let file = format!("file:{}", d.join("s.bin").display());
    let mut args = vec![
        "send".to_owned(),
        "--ram".into(),
        src.display().to_string(),
        "--to".into(),
        file,
    ];
    args.extend(tls_args(&p.client, &p.ca.pem));
    let out = ferry_tests::ferry::run_ferry(&args, Duration::from_secs(30)).expect("running");
    assert!(!out.status.success());
    assert!(
        out.stderr.contains("only with tcp: and unix:"),
        "{}",
        out.stderr
    );
    assert!(!d.join("s.bin").exists(), "the stream file was written");

    fs::write(d.join("s.bin"), b"QEVM").expect("writing a stream file");
    let mut args = vec![
        "receive".to_owned(),
        "--listen".into(),
        format!("file:{}", d.join("s.bin").display()),
        "--ram".into(),
        d.join("dest.ram").display().to_string(),
    ];
    args.extend(tls_args(&p.server, &p.ca.pem));
    let out = ferry_tests::ferry::run_ferry(&args, Duration::from_secs(30)).expect("running");
    assert!(!out.status.success());
    assert!(
        out.stderr.contains("only with tcp: and unix:"),
        "{}",
        out.stderr
    );
}

/// What TLS costs: 1 GiB of mixed RAM in /dev/shm, raw, plain tcp against
/// TLS, three runs of each, interleaved, timed by `ferry send --stats-json`
/// (start to verified Ack). Run with `--ignored --nocapture`.
#[test]
#[ignore = "a measurement, about a minute"]
fn tls_throughput_on_one_gib() {
    // RAM files in memory: a disk-backed destination measures writeback.
    let dir = tempfile::Builder::new()
        .prefix("ferry-tls-bench-")
        .tempdir_in("/dev/shm")
        .expect("a directory in /dev/shm");
    let d = dir.path();
    let src = source(d, 1 << 30);
    let p = pki(d, "good");
    let modes = [
        ("plain tcp", Vec::new(), Vec::new()),
        (
            "tls tcp",
            tls_args(&p.server, &p.ca.pem),
            tls_args(&p.client, &p.ca.pem),
        ),
    ];
    let mut times: Vec<Vec<(f64, f64)>> = vec![Vec::new(); modes.len()];
    for _ in 0..3 {
        for (i, (name, r, s)) in modes.iter().enumerate() {
            let (sok, rok, serr, rerr) = run(d, &src, "tcp:127.0.0.1:0", r, s);
            assert!(sok && rok, "{name}: send:\n{serr}\nreceive:\n{rerr}");
            let st = stats(d, "send.json");
            let secs = st["total-time"].as_f64().unwrap() / 1000.0;
            let stream = st["ram"]["transferred"].as_f64().unwrap();
            eprintln!(
                "{name}: {secs:.2} s, {:.0} MB/s of stream, {:.0} MiB/s of RAM",
                stream / 1e6 / secs,
                1024.0 / secs
            );
            times[i].push((secs, stream));
        }
    }
    for ((name, ..), t) in modes.iter().zip(&mut times) {
        t.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (best, stream) = t[0];
        let median = t[t.len() / 2].0;
        eprintln!(
            "{name}: best {best:.2} s ({:.0} MB/s of stream, {:.0} MiB/s of RAM), median {median:.2} s",
            stream / 1e6 / best,
            1024.0 / best
        );
    }
}
