//! The guest's disk: a raw image file, its dirty log (one bit per 1 MiB
//! chunk, the RAM dirty log's rules) and the thread that writes to it.
//!
//! The image starts with reproducible contents: per 1 MiB chunk, a copy of
//! one of a few chunks filled per `--pattern` and stamped with the chunk's
//! number; with the mixed pattern a quarter of the chunks stay zero (holes
//! of the sparse file), as on a real disk with free space.
//!
//! The disk writer writes blocks of 4 KiB to 1 MiB (4 KiB aligned, at a
//! random offset, never past the end) at a set rate with `pwrite`, and after
//! each write marks every chunk it touched: write first, mark after, so a
//! migration that takes the bit and then reads the chunk sees the write. An
//! eighth of the writes are zeros; the others carry data stamped with the
//! write's sequence number and offset, so every write changes what it covers.
//! It writes only between [`Vcpus::enter`] and [`Vcpus::leave_disk`] and
//! looks at `stopping` before each write, so `stop` quiesces it as it does
//! the vCPUs, and it sleeps off the throttle the same way ([`Pacer`]).

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use ferry_proto::stream::{BLOCK_CHUNK_SIZE, PAGE_SIZE};

use crate::tools::pattern::{self, Pattern, XorShift};
use ferry_guest::dirty_log::DirtyLog;

use super::writers::{Pacer, Vcpus, MAX_BATCH};
use super::Error;

/// One bit of the disk's dirty log covers this many bytes.
pub(crate) const CHUNK: u64 = BLOCK_CHUNK_SIZE as u64;

/// The smallest write, and the alignment of every write.
const BLOCK: u64 = 4096;

/// The largest write.
const MAX_WRITE: u64 = CHUNK;

/// Distinct chunk contents the image starts with (before stamping).
const TEMPLATES: usize = 8;

/// The share of chunks, in percent, that start zero with the mixed pattern.
const ZERO_CHUNKS_PERCENT: u64 = 25;

/// One in this many disk writes writes zeros.
const ZERO_WRITE_ONE_IN: u64 = 8;

/// The disk image, open for writing, and its dirty log.
#[derive(Debug)]
pub(crate) struct Disk {
    file: File,
    size: u64,
    log: DirtyLog,
}

impl Disk {
    /// Creates (or truncates) the image at `path`, `size` bytes (whole
    /// chunks), fills it per `pattern` and `seed`, and creates a clean dirty
    /// log at `log_path` with one bit per chunk.
    pub(crate) fn create(
        path: &Path,
        size: u64,
        log_path: &Path,
        pattern: Pattern,
        seed: u64,
    ) -> Result<Self, Error> {
        debug_assert!(size > 0 && size % CHUNK == 0);
        let err = |source| Error::Disk {
            path: path.to_owned(),
            source,
        };
        let file = ferry_guest::create_file(path, size).map_err(err)?;
        fill_image(&file, size, pattern, seed).map_err(err)?;
        let log = DirtyLog::create(log_path, size / CHUNK).map_err(Error::DiskDirtyLog)?;
        Ok(Self { file, size, log })
    }

    /// Size in bytes.
    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    /// Chunks, i.e. bits of the dirty log.
    pub(crate) fn chunks(&self) -> u64 {
        self.size / CHUNK
    }

    /// Writes `data` at `at`, then marks every chunk the write touched, even
    /// when it failed (part of it may have landed).
    fn write(&self, at: u64, data: &[u8]) -> io::Result<()> {
        let result = self.file.write_all_at(data, at);
        let end = at + data.len() as u64;
        for chunk in at / CHUNK..end.div_ceil(CHUNK) {
            self.log.mark(chunk);
        }
        result
    }
}

/// Fills a freshly truncated (all-zero, sparse) image of `size` bytes.
fn fill_image(file: &File, size: u64, pattern: Pattern, seed: u64) -> io::Result<()> {
    if pattern == Pattern::Zero {
        return Ok(());
    }
    let mut rng = XorShift::new(seed ^ 0x6469_736b_2169_6d67);
    let templates: Vec<(Vec<u8>, Vec<bool>)> = (0..TEMPLATES)
        .map(|_| {
            let mut chunk = vec![0u8; CHUNK as usize];
            pattern::fill(&mut chunk, pattern, rng.next_u64());
            // Uniform pages (zero or one repeated byte) stay so; the others
            // get the chunk's stamp.
            let stamped = chunk
                .chunks_exact(PAGE_SIZE)
                .map(|p| p.iter().any(|&b| b != p[0]))
                .collect();
            (chunk, stamped)
        })
        .collect();
    let mut buf = vec![0u8; CHUNK as usize];
    for chunk in 0..size / CHUNK {
        let r = rng.next_u64();
        if pattern == Pattern::Mixed && r % 100 < ZERO_CHUNKS_PERCENT {
            continue;
        }
        let (template, stamped) = &templates[(r >> 32) as usize % TEMPLATES];
        buf.copy_from_slice(template);
        for (page, _) in buf
            .chunks_exact_mut(PAGE_SIZE)
            .zip(stamped)
            .filter(|(_, &s)| s)
        {
            page[..8].copy_from_slice(&chunk.to_le_bytes());
        }
        file.write_all_at(&buf, chunk * CHUNK)?;
    }
    Ok(())
}

/// One write: `len` bytes at `at`, zeros or data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Io {
    at: u64,
    len: u64,
    zero: bool,
}

impl Io {
    /// A random write within a disk of `blocks` 4 KiB blocks (at least one).
    fn pick(rng: &mut XorShift, blocks: u64) -> Self {
        let r = rng.next_u64();
        let n = (1 + r % (MAX_WRITE / BLOCK)).min(blocks);
        let first = rng.next_u64() % (blocks - n + 1);
        Self {
            at: first * BLOCK,
            len: n * BLOCK,
            zero: (r >> 32) % ZERO_WRITE_ONE_IN == 0,
        }
    }
}

/// The disk writer thread's work.
pub(crate) struct DiskWriter<'a> {
    pub(crate) disk: &'a Disk,
    /// Bytes per second to write.
    pub(crate) rate: f64,
    pub(crate) vcpus: &'a Vcpus,
    /// Seeds the writes' sizes, offsets and data.
    pub(crate) seed: u64,
}

impl DiskWriter<'_> {
    /// Writes to the disk until shutdown (or until a write fails).
    pub(crate) fn run(self) {
        let blocks = self.disk.size() / BLOCK;
        if blocks == 0 || self.rate <= 0.0 {
            self.vcpus.idle();
            return;
        }
        let mut rng = XorShift::new(self.seed);
        let mut data = vec![0u8; MAX_WRITE as usize];
        pattern::fill(&mut data, Pattern::Mixed, rng.next_u64());
        let zeros = vec![0u8; MAX_WRITE as usize];
        // Never owe less than the largest write, or it would never come due.
        let mut pacer = Pacer::new(self.vcpus, self.rate, MAX_WRITE as f64);
        let mut next = Io::pick(&mut rng, blocks);
        let mut seq = 0u64;
        loop {
            let Some(waited) = self.vcpus.enter() else {
                return;
            };
            let now = pacer.start(waited);
            let mut bytes = 0u64;
            let mut kept_up = true;
            let mut failed = None;
            while pacer.due() >= next.len as f64 {
                if self.vcpus.stopping() || now.elapsed() >= MAX_BATCH {
                    kept_up = false;
                    break;
                }
                let len = next.len as usize;
                let buf = if next.zero {
                    &zeros[..len]
                } else {
                    seq += 1;
                    stamp(&mut data[..len], seq, next.at);
                    &data[..len]
                };
                if let Err(e) = self.disk.write(next.at, buf) {
                    failed = Some(e);
                    break;
                }
                pacer.spend(next.len as f64);
                bytes += next.len;
                next = Io::pick(&mut rng, blocks);
            }
            self.vcpus.leave_disk(bytes);
            if let Some(e) = failed {
                eprintln!(
                    "ferry loadgen: a disk write of {} bytes at {} failed: {e}; \
                     writing no more to the disk",
                    next.len, next.at
                );
                self.vcpus.idle();
                return;
            }
            pacer.rest(kept_up);
        }
    }
}

/// Stamps each 4 KiB block of `data` (to be written at `at`) with the
/// write's sequence number and the block's offset.
fn stamp(data: &mut [u8], seq: u64, at: u64) {
    for (i, block) in data.chunks_exact_mut(BLOCK as usize).enumerate() {
        block[..8].copy_from_slice(&seq.to_le_bytes());
        block[8..16].copy_from_slice(&(at + i as u64 * BLOCK).to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_aligned_within_the_disk_and_of_every_size() {
        let mut rng = XorShift::new(7);
        for blocks in [256u64, 257, 1000, 4096] {
            let (mut small, mut large, mut zero) = (false, false, 0);
            for _ in 0..20_000 {
                let io = Io::pick(&mut rng, blocks);
                assert_eq!(io.at % BLOCK, 0);
                assert!(io.len >= BLOCK && io.len <= MAX_WRITE && io.len % BLOCK == 0);
                assert!(
                    io.at + io.len <= blocks * BLOCK,
                    "{io:?} past {blocks} blocks"
                );
                small |= io.len == BLOCK;
                large |= io.len == MAX_WRITE;
                zero += u32::from(io.zero);
            }
            assert!(small && large, "sizes from 4 KiB to 1 MiB");
            assert!((1500..3500).contains(&zero), "{zero} zero writes of 20000");
        }
    }

    #[test]
    fn writes_mark_every_chunk_they_touch() {
        let dir = tempfile::tempdir().unwrap();
        let (img, log) = (dir.path().join("img"), dir.path().join("log"));
        let disk = Disk::create(&img, 4 * CHUNK, &log, Pattern::Mixed, 3).unwrap();
        assert_eq!(std::fs::metadata(&img).unwrap().len(), 4 * CHUNK);
        assert_eq!(disk.chunks(), 4);
        assert_eq!(disk.log.count(), 0);
        disk.write(CHUNK - BLOCK, &[1u8; 2 * BLOCK as usize])
            .unwrap();
        let mut got = Vec::new();
        disk.log.take_range(0, 4, &mut got);
        assert_eq!(got, vec![0, 1]);
        disk.write(3 * CHUNK, &[2u8; CHUNK as usize]).unwrap();
        got.clear();
        disk.log.take_range(0, 4, &mut got);
        assert_eq!(got, vec![3]);
        let image = std::fs::read(&img).unwrap();
        assert_eq!(image[(CHUNK - BLOCK) as usize], 1);
        assert_eq!(image[(3 * CHUNK) as usize], 2);
    }

    #[test]
    fn the_image_is_reproducible_and_mixed() {
        let dir = tempfile::tempdir().unwrap();
        let image = |seed, name: &str| {
            let (img, log) = (dir.path().join(name), dir.path().join("log"));
            Disk::create(&img, 64 * CHUNK, &log, Pattern::Mixed, seed).unwrap();
            std::fs::read(&img).unwrap()
        };
        let a = image(1, "a");
        assert!(a == image(1, "b"), "same seed, same image");
        assert!(a != image(2, "c"), "another seed, another image");
        let zero = a
            .chunks_exact(CHUNK as usize)
            .filter(|c| c.iter().all(|&b| b == 0))
            .count();
        assert!((5..30).contains(&zero), "{zero} of 64 chunks zero");
        // Chunks made from the same template differ by their stamps.
        let mut chunks: Vec<&[u8]> = a.chunks_exact(CHUNK as usize).collect();
        chunks.retain(|c| c.iter().any(|&b| b != 0));
        let n = chunks.len();
        chunks.sort();
        chunks.dedup();
        assert_eq!(chunks.len(), n, "two data chunks are identical");
    }
}
