//! Deterministic "mixed" guest RAM images.
//!
//! A migration test needs RAM that exercises every page path at once: all-zero pages
//! (QEMU sends ZERO records), pages of one repeated non-zero byte (QEMU 7.2 does not
//! detect those: they go as PAGE / COMPRESS_PAGE), text-like pages that zlib shrinks a
//! lot, and random pages that zlib cannot shrink (QEMU's level 1 makes them 4107 bytes).
//! The pattern repeats every 8 pages so every RAM size above 32 KiB has all four kinds,
//! and block boundaries of any power-of-two size see each kind.
//!
//! The generator is a fixed xorshift64 so an image is a pure function of (size, seed);
//! /work/notes/tools/mkram.py is the same algorithm in Python, which is how the QEMU
//! fixture streams were made. [`tests::pinned_checksum`] keeps the two in step.

use std::fs;
use std::io::Write;
use std::path::Path;

use crate::error::{Context, Result};

/// Target page size of x86 QEMU and of ferry.
pub const PAGE_SIZE: usize = 4096;

/// Words for text-like pages: short, repetitive, so zlib finds matches quickly.
const WORDS: [&[u8]; 16] = [
    b"migration",
    b"page",
    b"stream",
    b"qemu",
    b"ferry",
    b"dirty",
    b"bitmap",
    b"zlib",
    b"section",
    b"device",
    b"the",
    b"of",
    b"and",
    b"memory",
    b"guest",
    b"host",
];

/// What one page of a mixed image holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageKind {
    /// 4096 zero bytes.
    Zero,
    /// 4096 copies of this non-zero byte.
    Fill(u8),
    /// Words from a small dictionary separated by spaces: very compressible.
    Text,
    /// xorshift output: incompressible.
    Random,
}

/// The kind of page `index` in every mixed image (it does not depend on the seed).
pub fn page_kind(index: usize) -> PageKind {
    match index % 8 {
        0 | 4 => PageKind::Zero,
        1 => PageKind::Fill((index % 255) as u8 + 1),
        2 | 5 | 6 => PageKind::Text,
        _ => PageKind::Random,
    }
}

/// Counts of each page kind in an image, for checking a decoder's statistics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Census {
    /// All-zero pages.
    pub zero: u64,
    /// One-byte fill pages.
    pub fill: u64,
    /// Text-like pages.
    pub text: u64,
    /// Random pages.
    pub random: u64,
}

/// How many pages of each kind an image of `size` bytes has.
pub fn census(size: usize) -> Census {
    let mut c = Census::default();
    for i in 0..size / PAGE_SIZE {
        match page_kind(i) {
            PageKind::Zero => c.zero += 1,
            PageKind::Fill(_) => c.fill += 1,
            PageKind::Text => c.text += 1,
            PageKind::Random => c.random += 1,
        }
    }
    c
}

/// xorshift64 (13, 7, 17): tiny, fast, and identical in the Python fixture generator.
#[derive(Debug, Clone)]
pub struct Xorshift64(u64);

impl Xorshift64 {
    /// A generator; seed 0 (a fixed point of xorshift) is replaced by a constant.
    pub fn new(seed: u64) -> Self {
        Xorshift64(if seed == 0 {
            0x9E37_79B9_7F4A_7C15
        } else {
            seed
        })
    }

    /// The next 64-bit value.
    pub fn next_u64(&mut self) -> u64 {
        let mut s = self.0;
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        self.0 = s;
        s
    }
}

/// A mixed image of `size` bytes (rounded down to whole pages; the tail stays zero).
pub fn mixed_image(size: usize, seed: u64) -> Vec<u8> {
    let mut rng = Xorshift64::new(seed);
    let mut image = vec![0u8; size];
    for (index, page) in image.chunks_exact_mut(PAGE_SIZE).enumerate() {
        fill_page(page, page_kind(index), &mut rng);
    }
    image
}

/// Write a mixed image to `path` (created or truncated).
pub fn write_mixed_image(path: &Path, size: usize, seed: u64) -> Result<()> {
    let image = mixed_image(size, seed);
    let mut file =
        fs::File::create(path).with_context(|| format!("creating RAM image {}", path.display()))?;
    file.write_all(&image)
        .with_context(|| format!("writing RAM image {}", path.display()))?;
    Ok(())
}

fn fill_page(page: &mut [u8], kind: PageKind, rng: &mut Xorshift64) {
    match kind {
        PageKind::Zero => {}
        PageKind::Fill(b) => page.fill(b),
        PageKind::Text => {
            let mut at = 0;
            while at < page.len() {
                let word = WORDS[(rng.next_u64() % WORDS.len() as u64) as usize];
                for &b in word.iter().chain(b" ") {
                    if at < page.len() {
                        page[at] = b;
                    }
                    at += 1;
                }
            }
        }
        PageKind::Random => {
            for chunk in page.chunks_exact_mut(8) {
                chunk.copy_from_slice(&rng.next_u64().to_le_bytes());
            }
        }
    }
}

/// Offset of the first byte where `a` and `b` differ (or where the shorter one ends).
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    if let Some(i) = a.iter().zip(b).position(|(x, y)| x != y) {
        return Some(i);
    }
    (a.len() != b.len()).then(|| a.len().min(b.len()))
}

/// The digest ferry reports for a RAM block (its `ram::digest`): the sum,
/// modulo 2^128, of XXH3-128 seeded with the page's index over every page that
/// is not all zero, in hex. Written out again here so the tests check ferry
/// against the definition, not against itself.
pub fn ferry_digest(bytes: &[u8]) -> String {
    let sum = bytes
        .chunks(PAGE_SIZE)
        .enumerate()
        .filter(|(_, page)| page.iter().any(|&b| b != 0))
        .fold(0u128, |sum, (i, page)| {
            sum.wrapping_add(xxhash_rust::xxh3::xxh3_128_with_seed(page, i as u64))
        });
    format!("{sum:032x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// FNV-1a over the image: pins the generator so the fixtures in /work/fixtures
    /// (made by mkram.py) can be regenerated from Rust byte for byte.
    fn fnv1a(data: &[u8]) -> u64 {
        data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
    }

    #[test]
    fn pinned_checksum() {
        // Value computed by /work/notes/tools/mkram.py for (1 MiB, seed 1).
        assert_eq!(fnv1a(&mixed_image(1 << 20, 1)), 0x9880_0860_b517_6311);
    }

    #[test]
    fn every_kind_present_and_counted() {
        let size = 64 * PAGE_SIZE;
        let image = mixed_image(size, 7);
        let c = census(size);
        assert_eq!(c.zero + c.fill + c.text + c.random, 64);
        for (i, page) in image.chunks_exact(PAGE_SIZE).enumerate() {
            match page_kind(i) {
                PageKind::Zero => assert!(page.iter().all(|&b| b == 0)),
                PageKind::Fill(f) => assert!(f != 0 && page.iter().all(|&b| b == f)),
                PageKind::Text => {
                    assert!(page.iter().all(|b| b.is_ascii_lowercase() || *b == b' '))
                }
                PageKind::Random => assert!(page.iter().any(|&b| b != 0)),
            }
        }
    }

    #[test]
    fn seed_changes_content() {
        assert_ne!(
            mixed_image(16 * PAGE_SIZE, 1),
            mixed_image(16 * PAGE_SIZE, 2)
        );
        assert_eq!(
            mixed_image(16 * PAGE_SIZE, 3),
            mixed_image(16 * PAGE_SIZE, 3)
        );
    }

    #[test]
    fn first_difference_finds_offsets() {
        assert_eq!(first_difference(b"abc", b"abc"), None);
        assert_eq!(first_difference(b"abc", b"abd"), Some(2));
        assert_eq!(first_difference(b"ab", b"abc"), Some(2));
    }
}
