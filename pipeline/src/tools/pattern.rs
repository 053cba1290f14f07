//! Synthetic guest memory: pages that look like a real guest's to a migration.
//!
//! A real guest's RAM is largely zero (free memory), with some pages of one
//! repeated byte, much text-like data (code, heap, page cache) that zlib
//! shrinks about 3x, and some incompressible data (compressed files, crypto).

use std::path::Path;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use ferry_proto::stream::PAGE_SIZE;

/// What the pages of a synthetic guest contain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum Pattern {
    /// About 40% zero, 10% one repeated byte, 35% text-like, 15% random.
    Mixed,
    /// All zero.
    Zero,
    /// All text-like.
    Text,
    /// All random (incompressible).
    Random,
}

/// A small, fast PRNG; reproducible from its seed.
#[derive(Debug, Clone)]
pub struct XorShift(u64);

impl XorShift {
    /// A generator for `seed` (any value, 0 included).
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

const WORDS: &[&str] = &[
    "the",
    "migration",
    "page",
    "guest",
    "memory",
    "kernel",
    "struct",
    "return",
    "if",
    "else",
    "for",
    "while",
    "int",
    "char",
    "void",
    "static",
    "const",
    "error",
    "buffer",
    "device",
    "queue",
    "request",
    "offset",
    "length",
    "block",
    "sector",
    "virtio",
    "irq",
    "pci",
    "ram",
];

/// Fills one page of kind `pattern`; `index` and `rng` pick its contents.
pub fn fill_page(page: &mut [u8], pattern: Pattern, index: u64, rng: &mut XorShift) {
    debug_assert_eq!(page.len(), PAGE_SIZE);
    let kind = match pattern {
        Pattern::Mixed => match rng.next_u64() % 100 {
            0..40 => Pattern::Zero,
            40..50 => {
                page.fill((index % 255 + 1) as u8);
                return;
            }
            50..85 => Pattern::Text,
            _ => Pattern::Random,
        },
        other => other,
    };
    match kind {
        Pattern::Zero => page.fill(0),
        Pattern::Random => {
            for w in page.chunks_exact_mut(8) {
                w.copy_from_slice(&rng.next_u64().to_le_bytes());
            }
        }
        Pattern::Text | Pattern::Mixed => {
            let mut at = 0;
            let mut num = [0u8; 6];
            while at < page.len() {
                let r = rng.next_u64();
                let piece: &[u8] = match r >> 60 {
                    0 => {
                        // A number and a space, written without allocating.
                        let mut n = (r >> 40 & 0xffff) as u32;
                        let mut i = num.len() - 1;
                        num[i] = b' ';
                        loop {
                            i -= 1;
                            num[i] = b'0' + (n % 10) as u8;
                            n /= 10;
                            if n == 0 {
                                break;
                            }
                        }
                        &num[i..]
                    }
                    1 => b"\n    ",
                    _ => WORDS[(r % WORDS.len() as u64) as usize].as_bytes(),
                };
                let n = piece.len().min(page.len() - at);
                page[at..at + n].copy_from_slice(&piece[..n]);
                at += n;
                if at < page.len() && r >> 60 > 1 {
                    page[at] = b' ';
                    at += 1;
                }
            }
        }
    }
}

/// Fills `buf` (a whole number of pages) page by page.
pub fn fill(buf: &mut [u8], pattern: Pattern, seed: u64) {
    let mut rng = XorShift::new(seed);
    for (i, page) in buf.chunks_exact_mut(PAGE_SIZE).enumerate() {
        fill_page(page, pattern, i as u64, &mut rng);
    }
}

/// Writes the guest RAM image that the demo and the benchmarks migrate (mixed
/// pages, seed 1), saying so on stderr first: a few GiB take seconds.
pub fn write_guest_ram(path: &Path, size: u64, tool: &str) -> anyhow::Result<()> {
    eprintln!(
        "{tool}: writing {} MiB of mixed guest RAM to {}",
        size >> 20,
        path.display()
    );
    write_image(path, size, Pattern::Mixed, 1)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Creates (or truncates) `path` at `size` bytes and fills it with `pattern`.
fn write_image(path: &Path, size: u64, pattern: Pattern, seed: u64) -> std::io::Result<()> {
    // Mapping for writing needs the file open for reading too.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    file.set_len(size)?;
    // SAFETY: the demo and the benchmarks (the only callers) write their image
    // in their own temporary directory, or the demo's --dir, before they start
    // any process that maps it: nothing of ferry's maps or truncates the file
    // while this mapping lives.
    let mut map = unsafe { memmap2::MmapMut::map_mut(&file) }?;
    fill(&mut map, pattern, seed);
    map.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::stream::encode::uniform_fill;

    #[test]
    fn mixed_has_every_kind_in_about_the_right_share() {
        let mut buf = vec![0u8; 4096 * PAGE_SIZE];
        fill(&mut buf, Pattern::Mixed, 7);
        let pages: Vec<&[u8]> = buf.chunks(PAGE_SIZE).collect();
        let zero = pages.iter().filter(|p| uniform_fill(p) == Some(0)).count();
        let fill_pages = pages
            .iter()
            .filter(|p| matches!(uniform_fill(p), Some(b) if b != 0))
            .count();
        assert!((1400..1900).contains(&zero), "zero pages: {zero}");
        assert!(
            (250..550).contains(&fill_pages),
            "repeated-byte pages: {fill_pages}"
        );
        let mut again = vec![0u8; 4096 * PAGE_SIZE];
        fill(&mut again, Pattern::Mixed, 7);
        assert_eq!(buf, again, "the same seed gives the same memory");
    }
}
