//! Guest RAM on huge pages, as VMMs back it in production: `ferry receive`
//! into a file on hugetlbfs, which has no write(2) (pwrite fails with
//! EINVAL), on the main stream and over multifd channels, whose threads
//! write through the receiver's mapping. The test mounts a hugetlbfs of its
//! own and raises `vm.nr_hugepages` for it (both undone at the end): it
//! needs root, as the network-namespace tests do.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use ferry_tests::files::{assert_same_file, shm_tempdir};
use ferry_tests::migrate::{self, assert_both_succeed, named};
use ferry_tests::ram::write_mixed_image;

const TIMEOUT: Duration = Duration::from_secs(120);
const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";
/// 2 MiB pages the test reserves: one destination of [`SIZE`] at a time.
const PAGES: u64 = 40;
const SIZE: usize = 64 << 20;

/// A hugetlbfs mounted in a temporary directory, with `PAGES` more huge
/// pages in the pool; unmounted and the pool restored on drop.
struct HugeMount {
    dir: PathBuf,
    _parent: tempfile::TempDir,
    pool_before: u64,
}

impl HugeMount {
    fn new() -> Self {
        let pool = |s: String| s.trim().parse::<u64>().expect("nr_hugepages is a number");
        let pool_before = pool(fs::read_to_string(NR_HUGEPAGES).expect("reading nr_hugepages"));
        fs::write(NR_HUGEPAGES, (pool_before + PAGES).to_string())
            .expect("raising vm.nr_hugepages (the test needs root)");
        let got = pool(fs::read_to_string(NR_HUGEPAGES).expect("reading nr_hugepages"));
        let parent = tempfile::tempdir().expect("a temporary directory");
        let dir = parent.path().join("huge");
        fs::create_dir(&dir).expect("creating the mount point");
        let mount = HugeMount {
            dir,
            _parent: parent,
            pool_before,
        };
        assert!(
            got >= pool_before + PAGES,
            "the kernel found {got} huge pages, not {}: memory too fragmented",
            pool_before + PAGES
        );
        let st = Command::new("mount")
            .args(["-t", "hugetlbfs", "-o", "pagesize=2M", "none"])
            .arg(&mount.dir)
            .status()
            .expect("running mount");
        assert!(st.success(), "mounting hugetlbfs failed ({st})");
        mount
    }
}

impl Drop for HugeMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
        let _ = fs::write(NR_HUGEPAGES, self.pool_before.to_string());
    }
}

/// `ferry send` of `src` into `ferry receive` writing `dst`, with
/// `channels` multifd channels (0: the main stream only).
fn migrate(dir: &Path, src: &Path, dst: &Path, channels: u8) {
    let n = channels.to_string();
    let multifd: &[&str] = if channels > 0 {
        &["--multifd-channels", &n]
    } else {
        &[]
    };
    let (mut r, addr) = migrate::receive(dir, "tcp:127.0.0.1:0", dst)
        .args(multifd)
        .start_listening(&dir.join("receive.err"))
        .expect("starting ferry receive");
    let mut s = migrate::send(dir, "send", &addr)
        .args(&["--ram", &named(src, "ram")])
        .args(multifd)
        .start(&dir.join("send.err"))
        .expect("starting ferry send");
    assert_both_succeed(&mut s, &mut r, TIMEOUT);
}

#[test]
fn receive_into_hugetlbfs_on_the_main_stream_and_over_multifd() {
    let huge = HugeMount::new();
    let work = shm_tempdir("ferry-huge-");
    let src = work.path().join("src.ram");
    write_mixed_image(&src, SIZE, 61).expect("writing the source RAM");
    // The premise: this file system refuses write(2).
    let probe = huge.dir.join("probe");
    let f = fs::File::create(&probe).expect("creating a file on hugetlbfs");
    f.set_len(2 << 20).expect("sizing it");
    let refused = std::os::unix::fs::FileExt::write_at(&f, &[1], 0);
    assert!(refused.is_err(), "hugetlbfs took a pwrite");
    drop(f);
    fs::remove_file(&probe).expect("removing the probe");
    for channels in [0, 2] {
        let dst = huge.dir.join("dst.ram");
        migrate(work.path(), &src, &dst, channels);
        assert_same_file(&src, &dst);
        fs::remove_file(&dst).expect("freeing the huge pages");
    }
}
