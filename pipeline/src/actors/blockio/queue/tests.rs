//! Tests of the block-IO actor against real devices: io_uring on raw images in
//! /dev/shm (tmpfs) and /tmp, and virtio-blk-vhost-user on qemu-storage-daemon.
//!
//! Every wait has a deadline; qemu-storage-daemon is owned by PID and killed when
//! its guard drops.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError};

use super::*;
use crate::tools::bench::{wait_for, Killed};

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;
/// Deadline for any one reply.
const REPLY: Duration = Duration::from_secs(30);

/// Deterministic bytes for `len` bytes at `offset`, varied by `seed`.
fn pattern(offset: u64, len: usize, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len);
    let mut word = 0u64;
    for i in 0..len as u64 {
        let pos = offset + i;
        if i == 0 || pos % 8 == 0 {
            let mut x = (pos / 8) ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            word = x ^ (x >> 31);
        }
        out.push((word >> ((pos % 8) * 8)) as u8);
    }
    out
}

/// A raw image of `size` bytes in `dir`, removed on drop.
fn image(dir: &str, size: u64) -> tempfile::NamedTempFile {
    let f = tempfile::Builder::new()
        .prefix("ferry-blockio-")
        .suffix(".raw")
        .tempfile_in(dir)
        .expect("create image");
    f.as_file().set_len(size).expect("size image");
    f
}

fn wait<T>(rx: &Receiver<Result<T, Error>>) -> Result<T, Error> {
    match rx.recv_timeout(REPLY) {
        Ok(r) => r,
        Err(RecvTimeoutError::Disconnected) => Err(Error::ActorGone {
            device: "(reply dropped)".into(),
        }),
        Err(RecvTimeoutError::Timeout) => panic!("no reply within {REPLY:?}"),
    }
}

fn read(mb: &Mailbox, offset: u64, len: usize) -> Result<Buffer, Error> {
    let (tx, rx) = bounded(1);
    mb.send(Request::Read {
        offset,
        len,
        reply: tx,
    })?;
    wait(&rx)
}

fn write(mb: &Mailbox, offset: u64, data: Buffer, fua: bool) -> Result<(), Error> {
    let (tx, rx) = bounded(1);
    mb.send(Request::Write {
        offset,
        data,
        fua,
        reply: tx,
    })?;
    wait(&rx)
}

fn unit(mb: &Mailbox, make: impl FnOnce(Reply<()>) -> Request) -> Result<(), Error> {
    let (tx, rx) = bounded(1);
    mb.send(make(tx))?;
    wait(&rx)
}

/// Offsets and sizes from 4 KiB to 1 MiB, some crossing 1 MiB boundaries.
fn cases() -> Vec<(u64, usize)> {
    vec![
        (0, 4 * KIB),
        (4 * KIB as u64, 8 * KIB),
        (64 * KIB as u64, 64 * KIB),
        ((MIB - 4 * KIB) as u64, 256 * KIB),
        (2 * MIB as u64, MIB),
        ((3 * MIB + 512 * KIB) as u64, MIB),
        ((7 * MIB) as u64, 128 * KIB),
    ]
}

/// Writes every case (alternating heap and registered buffers), reads each back.
fn round_trip(io: &BlockIo, seed: u64) {
    let mb = io.mailbox();
    for (i, &(off, len)) in cases().iter().enumerate() {
        let data = pattern(off, len, seed);
        let mut buf = if i % 2 == 0 {
            Buffer::from_slice(&data)
        } else {
            let mut b = io.buffers().alloc(len);
            b.copy_from_slice(&data);
            b
        };
        assert_eq!(buf.len(), len);
        buf.resize(len);
        write(&mb, off, buf, i % 3 == 0).unwrap_or_else(|e| panic!("write {off}+{len}: {e}"));
    }
    for &(off, len) in &cases() {
        let got = read(&mb, off, len).unwrap_or_else(|e| panic!("read {off}+{len}: {e}"));
        assert_eq!(got.len(), len);
        assert!(
            got[..] == pattern(off, len, seed)[..],
            "data at {off}+{len} differs"
        );
    }
    // Vectored: three buffers of different kinds, read back vectored too.
    let off = (5 * MIB) as u64;
    let parts = [4 * KIB, 60 * KIB, 192 * KIB];
    let mut bufs = Vec::new();
    let mut at = off;
    for (i, &n) in parts.iter().enumerate() {
        let mut b = if i == 1 {
            io.buffers().alloc(n)
        } else {
            Buffer::zeroed(n)
        };
        b.copy_from_slice(&pattern(at, n, seed));
        bufs.push(b);
        at += n as u64;
    }
    unit(&mb, |reply| Request::Writev {
        offset: off,
        bufs,
        fua: false,
        reply,
    })
    .expect("writev");
    let dest: Vec<Buffer> = parts.iter().rev().map(|&n| Buffer::zeroed(n)).collect();
    let (tx, rx) = bounded(1);
    mb.send(Request::Readv {
        offset: off,
        bufs: dest,
        reply: tx,
    })
    .unwrap();
    let got = wait(&rx).expect("readv");
    let flat: Vec<u8> = got.iter().flat_map(|b| b.iter().copied()).collect();
    assert!(
        flat == pattern(off, flat.len(), seed),
        "vectored data differs"
    );

    mb.flush().expect("flush");
}

/// Write-zeroes (all flag combinations the device accepts) and discard.
fn zeroes_and_discard(io: &BlockIo) {
    let mb = io.mailbox();
    let off = (8 * MIB) as u64;
    let len = MIB;
    write(&mb, off, Buffer::from_slice(&pattern(off, len, 7)), false).unwrap();
    mb.write_zeroes(off + 4096, 64 * 1024, ZeroFlags::default())
        .expect("write-zeroes");
    let got = read(&mb, off, len).unwrap();
    let expect = pattern(off, len, 7);
    assert!(got[..4096] == expect[..4096], "before the zeroed range");
    assert!(
        got[4096..4096 + 65536].iter().all(|&b| b == 0),
        "zeroed range"
    );
    assert!(
        got[4096 + 65536..] == expect[4096 + 65536..],
        "after the zeroed range"
    );

    for flags in [
        ZeroFlags {
            fua: true,
            ..Default::default()
        },
        ZeroFlags {
            no_unmap: true,
            ..Default::default()
        },
        ZeroFlags {
            no_fallback: true,
            ..Default::default()
        },
    ] {
        write(&mb, off, Buffer::from_slice(&pattern(off, len, 8)), false).unwrap();
        match mb.write_zeroes(off, len as u64, flags) {
            Ok(()) => {
                let got = read(&mb, off, len).unwrap();
                assert!(got.iter().all(|&b| b == 0), "zeroed with {flags:?}");
            }
            // NO_FALLBACK may be refused; it must be a typed error.
            Err(Error::Io {
                op: Op::WriteZeroes,
                source,
                ..
            }) if flags.no_fallback && source.raw_os_error() == Some(libc::ENOTSUP) => {}
            Err(e) => panic!("write-zeroes {flags:?}: {e:?}"),
        }
    }

    write(&mb, off, Buffer::from_slice(&pattern(off, len, 9)), false).unwrap();
    // Discard: contents unspecified afterwards; a device without discard answers
    // it as done.
    mb.discard(off, len as u64)
        .unwrap_or_else(|e| panic!("discard: {e:?}"));
    read(&mb, off, len).expect("read after discard");
}

/// Invalid requests are typed errors and the actor keeps serving.
fn invalid_requests(io: &BlockIo) {
    let mb = io.mailbox();
    let l = io.limits().clone();
    let ra = l.request_alignment;
    if ra > 1 {
        let e = read(&mb, ra / 2, ra as usize).unwrap_err();
        assert!(
            matches!(
                e,
                Error::Unaligned {
                    op: Op::Read,
                    what: "request-alignment",
                    ..
                }
            ),
            "{e}"
        );
        let e = write(&mb, 0, Buffer::zeroed(ra as usize + ra as usize / 2), false).unwrap_err();
        assert!(matches!(e, Error::Unaligned { op: Op::Write, .. }), "{e}");
        let e = mb
            .write_zeroes(ra / 2, ra, ZeroFlags::default())
            .unwrap_err();
        assert!(
            matches!(
                e,
                Error::Unaligned {
                    op: Op::WriteZeroes,
                    ..
                }
            ),
            "{e}"
        );
    } else {
        eprintln!("request-alignment is 1 (buffered): no unaligned request to test");
    }
    let too_big = l.max_request as usize + ra as usize;
    let e = read(&mb, 0, too_big).unwrap_err();
    assert!(matches!(e, Error::TooLarge { op: Op::Read, .. }), "{e}");
    assert!(e.to_string().contains("exceeds the maximum"), "{e}");
    let e = write(&mb, 0, Buffer::zeroed(too_big), false).unwrap_err();
    assert!(matches!(e, Error::TooLarge { op: Op::Write, .. }), "{e}");
    let e = read(&mb, l.capacity - ra, 2 * ra as usize).unwrap_err();
    assert!(matches!(e, Error::OutOfRange { .. }), "{e}");
    let e = read(&mb, u64::MAX - ra + 1, ra as usize).unwrap_err();
    assert!(
        matches!(e, Error::OutOfRange { .. } | Error::Unaligned { .. }),
        "{e}"
    );
    let e = read(&mb, 0, 0).unwrap_err();
    assert!(matches!(e, Error::Empty { .. }), "{e}");
    // Still serving.
    read(&mb, 0, 4096).expect("read after invalid requests");
}

/// 256 writes then 256 reads, all outstanding at once from several threads.
fn concurrent(io: &BlockIo, seed: u64) {
    const N: usize = 256;
    let span = 16 * KIB;
    let mb = io.mailbox();
    let (tx, rx) = bounded(N);
    std::thread::scope(|s| {
        for t in 0..4 {
            let mb = mb.clone();
            let tx = tx.clone();
            s.spawn(move || {
                for i in (t..N).step_by(4) {
                    let off = (16 * MIB + i * span) as u64;
                    let len = 4 * KIB * (1 + i % 4);
                    mb.send(Request::Write {
                        offset: off,
                        data: Buffer::from_slice(&pattern(off, len, seed)),
                        fua: false,
                        reply: tx.clone(),
                    })
                    .unwrap();
                }
            });
        }
    });
    drop(tx);
    for _ in 0..N {
        wait(&rx).expect("concurrent write");
    }
    let mut replies = Vec::new();
    for i in 0..N {
        let (tx, rx) = bounded(1);
        let off = (16 * MIB + i * span) as u64;
        let len = 4 * KIB * (1 + i % 4);
        mb.send(Request::Read {
            offset: off,
            len,
            reply: tx,
        })
        .unwrap();
        replies.push((off, len, rx));
    }
    for (off, len, rx) in replies {
        let got = wait(&rx).expect("concurrent read");
        assert!(
            got[..] == pattern(off, len, seed)[..],
            "data at {off}+{len}"
        );
    }
}

fn check_image_file(path: &Path, off: u64, expect: &[u8]) {
    let mut f = File::open(path).unwrap();
    f.seek(SeekFrom::Start(off)).unwrap();
    let mut got = vec![0; expect.len()];
    f.read_exact(&mut got).unwrap();
    assert!(got == expect, "image file differs at {off}");
}

fn io_uring_suite(dir: &str) {
    let img = image(dir, 64 * MIB as u64);
    let cfg = DeviceConfig::io_uring(img.path());
    let io = BlockIo::open(&cfg).unwrap_or_else(|e| panic!("open io_uring in {dir}: {e:#?}"));
    let l = io.limits().clone();
    eprintln!("io_uring in {dir}: {l:#?}");
    assert_eq!(l.capacity, 64 * MIB as u64);
    assert!(l.request_alignment.is_power_of_two());
    assert!(!l.needs_mem_regions);
    assert!(
        l.direct || l.direct_fallback.is_some(),
        "direct was asked for"
    );
    if l.direct {
        assert!(
            l.request_alignment >= 512,
            "O_DIRECT needs aligned requests"
        );
    }
    round_trip(&io, 1);
    check_image_file(img.path(), 2 * MIB as u64, &pattern(2 * MIB as u64, MIB, 1));
    zeroes_and_discard(&io);
    invalid_requests(&io);
    concurrent(&io, 2);
    let stats = io.shutdown().expect("clean shutdown");
    eprintln!("io_uring in {dir}: {stats:#?}");
    assert_eq!(stats.bounced, 0, "io_uring needs no bounce buffers");
    assert!(stats.completion_fd_wakeups > 0);
    // `concurrent` queues 256 requests before it waits for a reply, and the
    // actor takes up to its max-in-flight (128) from the mailbox at once, so 128
    // is what an idle machine shows. The bound is 2: only an actor that finished
    // each request before taking the next (or a scheduler that let it catch up
    // with the senders 256 times in a row) stays at 1.
    assert!(
        stats.max_in_flight >= 2,
        "requests were never outstanding together: {stats:?}"
    );
    // Completions returned by the do_io calls made to submit (the trap) are
    // counted in stats.reaped_on_submit; how many depends on timing, but every
    // request above was answered, so none was lost.
}

#[test]
fn io_uring_dev_shm() {
    io_uring_suite("/dev/shm");
}

#[test]
fn io_uring_tmp() {
    io_uring_suite("/tmp");
}

#[test]
fn io_uring_buffered_when_direct_is_off() {
    let img = image("/tmp", 8 * MIB as u64);
    let mut cfg = DeviceConfig::io_uring(img.path());
    cfg.direct = false;
    let io = BlockIo::open(&cfg).unwrap();
    assert!(!io.limits().direct);
    assert_eq!(io.limits().request_alignment, 1);
    let mb = io.mailbox();
    write(&mb, 0, Buffer::from_slice(&pattern(0, 4096, 3)), false).unwrap();
    assert!(read(&mb, 0, 4096).unwrap()[..] == pattern(0, 4096, 3)[..]);
    io.shutdown().unwrap();
}

#[test]
fn direct_fallback_when_o_direct_is_refused() {
    // Find out whether this kernel's tmpfs takes O_DIRECT (Linux >= 6.6 does).
    let img = image("/dev/shm", 4 * MIB as u64);
    let probe = OpenOptions::new()
        .read(true)
        .custom_flags_direct()
        .open(img.path());
    let io = BlockIo::open(&DeviceConfig::io_uring(img.path())).unwrap();
    match probe {
        Ok(_) => {
            assert!(io.limits().direct, "O_DIRECT works here, so it is used");
            assert_eq!(io.limits().direct_fallback, None);
            eprintln!("tmpfs accepts O_DIRECT on this kernel: no fallback needed");
        }
        Err(e) => {
            assert_eq!(e.raw_os_error(), Some(libc::EINVAL));
            assert!(!io.limits().direct);
            let note = io.limits().direct_fallback.clone().expect("a note");
            assert!(note.contains("O_DIRECT refused"), "{note}");
        }
    }
    io.shutdown().unwrap();

    // Take the fallback path regardless of what this kernel accepts.
    device::test_hooks::set_refuse_direct(true);
    let opened = BlockIo::open(&DeviceConfig::io_uring(img.path()));
    device::test_hooks::set_refuse_direct(false);
    let io = opened.expect("falls back to buffered I/O");
    let l = io.limits().clone();
    assert!(!l.direct, "buffered after the fallback");
    assert_eq!(l.request_alignment, 1);
    let note = l.direct_fallback.expect("the fallback is noted");
    assert!(
        note.contains("O_DIRECT refused") && note.contains("buffered"),
        "{note}"
    );
    let mb = io.mailbox();
    write(
        &mb,
        4096,
        Buffer::from_slice(&pattern(4096, 8192, 4)),
        false,
    )
    .unwrap();
    assert!(read(&mb, 4096, 8192).unwrap()[..] == pattern(4096, 8192, 4)[..]);
    io.shutdown().unwrap();
}

trait DirectFlag {
    fn custom_flags_direct(&mut self) -> &mut Self;
}

impl DirectFlag for OpenOptions {
    fn custom_flags_direct(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_DIRECT)
    }
}

#[test]
fn small_max_request_and_read_only() {
    let img = image("/tmp", 8 * MIB as u64);
    let mut cfg = DeviceConfig::io_uring(img.path());
    cfg.max_request = MIB;
    let io = BlockIo::open(&cfg).unwrap();
    assert_eq!(io.limits().max_request, MIB as u64);
    let mb = io.mailbox();
    read(&mb, 0, MIB).expect("1 MiB is allowed");
    let e = read(&mb, 0, 2 * MIB).unwrap_err();
    assert!(
        matches!(e, Error::TooLarge { len, max, .. } if len == 2 * MIB as u64 && max == MIB as u64),
        "{e}"
    );
    io.shutdown().unwrap();

    let mut cfg = DeviceConfig::io_uring(img.path());
    cfg.read_only = true;
    let io = BlockIo::open(&cfg).unwrap();
    assert!(io.limits().read_only);
    let mb = io.mailbox();
    let e = write(&mb, 0, Buffer::zeroed(4096), false).unwrap_err();
    assert!(matches!(e, Error::ReadOnly { op: Op::Write, .. }), "{e}");
    let e = mb.discard(0, 4096).unwrap_err();
    assert!(
        matches!(
            e,
            Error::ReadOnly {
                op: Op::Discard,
                ..
            }
        ),
        "{e}"
    );
    read(&mb, 0, 4096).unwrap();
    io.shutdown().unwrap();
}

#[test]
fn open_errors_are_typed() {
    let e = BlockIo::open(&DeviceConfig::io_uring("/nonexistent/ferry.raw")).unwrap_err();
    assert!(matches!(e, Error::Setup { .. }), "{e:?}");
    assert!(e.to_string().contains("/nonexistent/ferry.raw"), "{e}");
    assert!(std::error::Error::source(&e).is_some());
    let e = BlockIo::open(&DeviceConfig::vhost_user("/nonexistent/ferry.sock")).unwrap_err();
    assert!(matches!(e, Error::Setup { .. }), "{e:?}");
}

#[test]
fn mailbox_after_shutdown_reports_actor_gone() {
    let img = image("/dev/shm", 4 * MIB as u64);
    let io = BlockIo::open(&DeviceConfig::io_uring(img.path())).unwrap();
    let mb = io.mailbox();
    let buffers = io.buffers().clone();
    let registered = buffers.try_registered(4096).expect("a free slot");
    io.shutdown().unwrap();
    // A registered buffer outlives the actor safely.
    assert_eq!(registered.len(), 4096);
    drop(registered);
    let e = read(&mb, 0, 4096).unwrap_err();
    assert!(matches!(e, Error::ActorGone { .. }), "{e}");
}

#[test]
fn buffer_pool_slots_come_back() {
    let img = image("/dev/shm", 4 * MIB as u64);
    let mut cfg = DeviceConfig::io_uring(img.path());
    cfg.buffer_slots = 2;
    let io = BlockIo::open(&cfg).unwrap();
    let pool = io.buffers().clone();
    assert_eq!(pool.slots(), 2);
    let a = pool.try_registered(MIB).unwrap();
    let b = pool.try_registered(100).unwrap();
    assert!(a.is_registered() && b.is_registered());
    assert!(pool.try_registered(1).is_none());
    assert!(!pool.alloc(4096).is_registered(), "falls back to the heap");
    assert!(pool.try_registered(MIB + 1).is_none(), "larger than a slot");
    let t = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        drop(a);
    });
    let c = pool
        .registered_timeout(4096, Duration::from_secs(10))
        .expect("a slot is given back");
    t.join().unwrap();
    assert!(c.is_registered());
    drop((b, c));
    assert_eq!(pool.free_slots(), 2);
    io.shutdown().unwrap();
}

/// qemu-storage-daemon exporting an image over vhost-user-blk, killed on drop.
struct Qsd {
    child: Killed,
    socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Qsd {
    /// The daemon's binary. The vhost-user tests need it and must not pass
    /// without it: CI installs it with QEMU (`qemu-system-x86` pulls in
    /// `qemu-system-common`).
    fn binary() -> PathBuf {
        const PLACES: [&str; 2] = [
            "/usr/bin/qemu-storage-daemon",
            "/usr/local/bin/qemu-storage-daemon",
        ];
        PLACES
            .iter()
            .map(PathBuf::from)
            .find(|p| p.exists())
            .unwrap_or_else(|| {
                panic!(
                    "qemu-storage-daemon is not installed (looked in {PLACES:?}); the \
                     vhost-user tests need it (Debian: apt-get install qemu-system-common)"
                )
            })
    }

    fn start(img: &Path) -> Self {
        let bin = Self::binary();
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("vhost-user-blk.sock");
        let child = Command::new(bin)
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=file0,filename={}",
                img.display()
            ))
            .arg("--blockdev")
            .arg("driver=raw,node-name=disk0,file=file0")
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=exp0,node-name=disk0,addr.type=unix,addr.path={},writable=on",
                socket.display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn qemu-storage-daemon");
        let mut qsd = Self {
            child: Killed(child),
            socket,
            _dir: dir,
        };
        wait_for(
            &qsd.socket,
            &mut qsd.child.0,
            "qemu-storage-daemon",
            Duration::from_secs(10),
        )
        .unwrap_or_else(|e| panic!("{e:#}"));
        qsd
    }

    /// Kills the daemon now (our own child, by PID) rather than on drop.
    fn kill(&mut self) {
        let _ = self.child.0.kill();
        let _ = self.child.0.wait();
    }
}

#[test]
fn vhost_user_round_trip_through_bounce_pool() {
    let img = image("/dev/shm", 64 * MIB as u64);
    let qsd = Qsd::start(img.path());
    let mut cfg = DeviceConfig::vhost_user(&qsd.socket);
    // Small, so concurrent bounce requests must wait and the pool must grow.
    cfg.bounce_initial = 256 * KIB;
    cfg.buffer_slots = 8;
    let io = BlockIo::open(&cfg).unwrap_or_else(|e| panic!("open vhost-user: {e:#?}"));
    let l = io.limits().clone();
    eprintln!("vhost-user: {l:#?}");
    assert!(
        l.needs_mem_regions,
        "qemu-storage-daemon's export needs mem regions"
    );
    assert_eq!(l.capacity, 64 * MIB as u64);
    assert!(
        l.request_alignment > 1,
        "virtio-blk works in sectors, so `invalid_requests` checks unaligned requests here"
    );

    // Registered buffers: no bounce.
    let mb = io.mailbox();
    let off = (20 * MIB) as u64;
    let mut b = io.buffers().try_registered(MIB).unwrap();
    b.copy_from_slice(&pattern(off, MIB, 11));
    write(&mb, off, b, false).unwrap();
    let dest = io.buffers().try_registered(MIB).unwrap();
    let (tx, rx) = bounded(1);
    mb.send(Request::Readv {
        offset: off,
        bufs: vec![dest],
        reply: tx,
    })
    .unwrap();
    let got = wait(&rx).unwrap();
    assert!(got[0].is_registered());
    assert!(got[0][..] == pattern(off, MIB, 11)[..]);
    drop(got);

    round_trip(&io, 5);
    check_image_file(img.path(), 2 * MIB as u64, &pattern(2 * MIB as u64, MIB, 5));
    zeroes_and_discard(&io);
    invalid_requests(&io);
    concurrent(&io, 6);

    // FIFO fairness: a large bounce request between many small ones completes.
    let (tx, rx) = bounded(64);
    for i in 0..48u64 {
        let (off, len) = if i == 10 {
            ((40 * MIB) as u64, 4 * MIB)
        } else {
            ((32 * MIB) as u64 + i * 64 * KIB as u64, 64 * KIB)
        };
        mb.send(Request::Write {
            offset: off,
            data: Buffer::from_slice(&pattern(off, len, 12)),
            fua: false,
            reply: tx.clone(),
        })
        .unwrap();
    }
    for _ in 0..48 {
        wait(&rx).expect("fair bounce write");
    }
    let got = read(&mb, (40 * MIB) as u64, 4 * MIB).unwrap();
    assert!(got[..] == pattern((40 * MIB) as u64, 4 * MIB, 12)[..]);

    let stats = io.shutdown().expect("clean shutdown");
    eprintln!("vhost-user: {stats:#?}");
    assert!(
        stats.bounced > 0,
        "heap buffers went through the bounce pool"
    );
    // `concurrent` queues 256 heap writes (about 2.5 MiB) and the fairness
    // check 48 more, against a 256 KiB pool: a request waits unless the daemon,
    // another process, finished every earlier one before the actor took the
    // next (an idle machine shows about 150 waits).
    assert!(stats.bounce_waits > 0, "some bounce requests queued");
    // The first pool (256 KiB) cannot hold the 4 MiB write: it was replaced.
    assert!(stats.bounce_resizes >= 2, "the pool grew when idle");
    assert!(stats.bounce_pool_bytes >= 4 * MIB as u64);
    assert!(stats.completion_fd_wakeups > 0);
    drop(qsd);
}

#[test]
fn vhost_user_server_gone_is_a_timeout() {
    let img = image("/dev/shm", 16 * MIB as u64);
    let mut qsd = Qsd::start(img.path());
    let mut cfg = DeviceConfig::vhost_user(&qsd.socket);
    cfg.request_timeout = Duration::from_secs(2);
    let io = BlockIo::open(&cfg).unwrap();
    let mb = io.mailbox();
    read(&mb, 0, 4096).expect("read while the server runs");
    qsd.kill();
    let started = Instant::now();
    let e = read(&mb, 0, 4096).unwrap_err();
    eprintln!("after the server died: {e} (after {:?})", started.elapsed());
    assert!(
        matches!(
            e,
            Error::Timeout { .. } | Error::Io { .. } | Error::Queue { .. }
        ),
        "{e:?}"
    );
    let e = io.shutdown().unwrap_err();
    assert!(
        matches!(e, Error::Timeout { .. } | Error::Queue { .. }),
        "{e:?}"
    );
    let e = read(&mb, 0, 4096).unwrap_err();
    assert!(matches!(e, Error::ActorGone { .. }), "{e}");
}

/// An image of 1 GiB of non-zero bytes in /tmp, synced (so the read measures
/// the device, not the page cache's dirty pages).
fn measurement_image() -> tempfile::NamedTempFile {
    let img = image("/tmp", 0);
    let mut f = OpenOptions::new().write(true).open(img.path()).unwrap();
    let chunk: Vec<u8> = (0..MIB).map(|i| (i * 7 + i / 4096) as u8).collect();
    for _ in 0..1024 {
        f.write_all(&chunk).unwrap();
    }
    f.sync_all().unwrap();
    img
}

/// MB/s of `dd if=PATH of=/dev/null bs=1M iflag=direct`, the yardstick.
fn dd_rate(path: &Path, size: u64) -> f64 {
    let t = Instant::now();
    let out = Command::new("dd")
        .arg(format!("if={}", path.display()))
        .args(["of=/dev/null", "bs=1M", "iflag=direct"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let secs = t.elapsed().as_secs_f64();
    eprintln!(
        "dd: {}",
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .last()
            .unwrap_or("")
    );
    size as f64 / secs / 1e6
}

/// MB/s of reading `chunks` 1 MiB chunks in order through the actor, `depth`
/// reads in flight.
fn actor_rate(mb: &Mailbox, chunks: u64, depth: usize) -> f64 {
    let t = Instant::now();
    let (tx, rx) = bounded(depth);
    let send = |chunk: u64| {
        mb.send(Request::Read {
            offset: chunk * MIB as u64,
            len: MIB,
            reply: tx.clone(),
        })
        .unwrap();
    };
    let mut next = 0u64;
    while next < chunks.min(depth as u64) {
        send(next);
        next += 1;
    }
    for _ in 0..chunks {
        let buf = wait(&rx).unwrap();
        assert_eq!(buf.len(), MIB);
        drop(buf);
        if next < chunks {
            send(next);
            next += 1;
        }
    }
    (chunks * MIB as u64) as f64 / t.elapsed().as_secs_f64() / 1e6
}

/// 1 MiB sequential reads of a 1 GiB image with io_uring O_DIRECT, against
/// `dd if=IMG of=/dev/null bs=1M iflag=direct`. Run with
/// `cargo test --release -p ferry blockio::queue::tests::measure -- --ignored --nocapture`;
/// FERRY_BLOCKIO_IMG=PATH uses an existing image instead of writing one in /tmp.
#[test]
#[ignore = "measurement; writes a 1 GiB image"]
fn measure_sequential_read() {
    let (path, _keep) = match std::env::var_os("FERRY_BLOCKIO_IMG") {
        Some(p) => (PathBuf::from(p), None),
        None => {
            let img = measurement_image();
            (img.path().to_owned(), Some(img))
        }
    };
    let size = std::fs::metadata(&path).unwrap().len();
    let chunks = size / MIB as u64;
    let io = BlockIo::open(&DeviceConfig::io_uring(&path)).unwrap();
    assert!(io.limits().direct, "measurement wants O_DIRECT");
    let mb = io.mailbox();
    let _ = actor_rate(&mb, chunks, 4); // warm-up
    let mut lines = Vec::new();
    for round in 0..2 {
        let d = dd_rate(&path, size);
        let [q1, q4, q8] = [1, 4, 8].map(|depth| actor_rate(&mb, chunks, depth));
        lines.push(format!(
            "round {round}: dd iflag=direct {d:.0} MB/s; actor QD1 {q1:.0} MB/s, QD4 {q4:.0} MB/s, QD8 {q8:.0} MB/s"
        ));
    }
    let stats = io.shutdown().unwrap();
    for l in lines {
        eprintln!("{l}");
    }
    eprintln!("{stats:#?}");
}

#[test]
fn shutdown_answers_every_request() {
    let img = image("/dev/shm", 16 * MIB as u64);
    let io = BlockIo::open(&DeviceConfig::io_uring(img.path())).unwrap();
    let mb = io.mailbox();
    let (tx, rx) = bounded(200);
    for i in 0..200u64 {
        mb.send(Request::Read {
            offset: (i % 16) * MIB as u64,
            len: 64 * KIB,
            reply: tx.clone(),
        })
        .unwrap();
    }
    drop(tx);
    let stats = io.shutdown().unwrap();
    let (mut ok, mut refused) = (0, 0);
    for _ in 0..200 {
        match wait(&rx) {
            Ok(b) => {
                assert_eq!(b.len(), 64 * KIB);
                ok += 1;
            }
            Err(Error::Stopping { .. }) => refused += 1,
            Err(e) => panic!("{e:?}"),
        }
    }
    // Every request got exactly one answer (`wait` panics on a missing one), and
    // the ones answered with data are the ones the actor counts as read.
    assert_eq!(ok, stats.bytes_read / (64 * KIB) as u64);
    eprintln!("shutdown: {ok} reads completed, {refused} refused");
}
