//! One guest page to one zlib stream and back, with QEMU's bounds.
//!
//! QEMU compresses each page as a complete zlib stream (deflateReset per page)
//! and the destination inflates it into exactly one page. Both directions here
//! work on caller-provided buffers so the hot path allocates nothing.

pub use flate2::{Compress, Decompress};
use flate2::{Compression, FlushCompress, FlushDecompress, Status};

use crate::stream::PAGE_SIZE;

/// The largest compressed page QEMU accepts: `compressBound(4096)`.
pub const MAX_COMPRESSED_PAGE: usize = PAGE_SIZE + (PAGE_SIZE >> 12) + (PAGE_SIZE >> 14) + 13;

/// Errors of inflating a page received from the wire.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The compressed length is above what QEMU would ever send.
    #[error("compressed page of {len} bytes exceeds the {MAX_COMPRESSED_PAGE}-byte bound")]
    TooLong {
        /// Length announced on the wire.
        len: usize,
    },
    /// The bytes are not a valid zlib stream.
    #[error("compressed page is not a valid zlib stream: {0}")]
    Corrupt(String),
    /// The stream inflated to something other than one page.
    #[error("compressed page inflates to {got} bytes instead of {PAGE_SIZE}")]
    WrongSize {
        /// Bytes produced before the stream ended or the page filled.
        got: usize,
    },
}

/// A compressor for pages at `level` (0-9), producing zlib streams as QEMU does.
pub fn compressor(level: u32) -> Compress {
    Compress::new(Compression::new(level.min(9)), true)
}

/// A decompressor for pages produced by [`compressor`] or by QEMU.
pub fn decompressor() -> Decompress {
    Decompress::new(true)
}

/// A cheap guess that `page` will not shrink: 64 bytes sampled across it are
/// nearly all different, as in random or already-compressed data. Such
/// pages go raw without spending a deflate on them; text, code and sparse
/// pages repeat bytes far more often.
pub fn looks_incompressible(page: &[u8]) -> bool {
    let mut seen = [0u64; 4];
    let mut distinct = 0;
    let step = (page.len() / 64).max(1);
    for &b in page.iter().step_by(step).take(64) {
        let (w, bit) = ((b >> 6) as usize, 1u64 << (b & 63));
        if seen[w] & bit == 0 {
            seen[w] |= bit;
            distinct += 1;
        }
    }
    distinct >= 52
}

/// Compresses `page` into `out` as one complete zlib stream.
///
/// Returns the compressed length, or `None` when the stream does not fit in
/// `out`; callers size `out` one byte below the page so that `None` means
/// "not smaller, send it raw".
pub fn deflate_into(c: &mut Compress, page: &[u8], out: &mut [u8]) -> Option<usize> {
    c.reset();
    match c.compress(page, out, FlushCompress::Finish) {
        Ok(Status::StreamEnd) => Some(c.total_out() as usize),
        _ => None,
    }
}

/// Inflates one compressed page into `page`, which it must fill exactly.
pub fn inflate_page(
    d: &mut Decompress,
    input: &[u8],
    page: &mut [u8; PAGE_SIZE],
) -> Result<(), Error> {
    if input.len() > MAX_COMPRESSED_PAGE {
        return Err(Error::TooLong { len: input.len() });
    }
    d.reset(true);
    // One spare byte tells "exactly a page" from "more than a page".
    let mut spare = [0u8; 1];
    let status = d
        .decompress(input, page, FlushDecompress::Finish)
        .map_err(|e| Error::Corrupt(e.to_string()))?;
    let got = d.total_out() as usize;
    match status {
        Status::StreamEnd if got == PAGE_SIZE => Ok(()),
        Status::StreamEnd => Err(Error::WrongSize { got }),
        _ if got == PAGE_SIZE => {
            let consumed = d.total_in() as usize;
            let more = d
                .decompress(&input[consumed..], &mut spare, FlushDecompress::Finish)
                .map_err(|e| Error::Corrupt(e.to_string()))?;
            let extra = d.total_out() as usize - PAGE_SIZE;
            match more {
                Status::StreamEnd if extra == 0 => Ok(()),
                _ if extra > 0 => Err(Error::WrongSize {
                    got: PAGE_SIZE + extra,
                }),
                _ => Err(Error::Corrupt("stream is truncated".into())),
            }
        }
        _ => Err(Error::WrongSize { got }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text_page() -> Vec<u8> {
        b"the quick brown fox jumps over the lazy dog 0123456789\n"
            .iter()
            .copied()
            .cycle()
            .take(PAGE_SIZE)
            .collect()
    }

    fn random_page(seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..PAGE_SIZE)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn text_round_trips_at_every_level() {
        let page = text_page();
        for level in 0..=9 {
            let mut c = compressor(level);
            let mut out = [0u8; PAGE_SIZE - 1];
            let n = deflate_into(&mut c, &page, &mut out);
            if level == 0 {
                assert_eq!(n, None, "stored blocks never shrink a page");
                continue;
            }
            let n = n.expect("text shrinks");
            let mut back = [0u8; PAGE_SIZE];
            inflate_page(&mut decompressor(), &out[..n], &mut back).unwrap();
            assert_eq!(&back[..], &page[..]);
        }
    }

    #[test]
    fn the_guess_tells_random_from_text() {
        assert!(looks_incompressible(&random_page(3)));
        assert!(!looks_incompressible(&text_page()));
        assert!(!looks_incompressible(&[0u8; PAGE_SIZE]));
    }

    #[test]
    fn random_page_does_not_shrink() {
        let mut out = [0u8; PAGE_SIZE - 1];
        assert_eq!(
            deflate_into(&mut compressor(1), &random_page(7), &mut out),
            None
        );
    }

    #[test]
    fn wrong_sizes_are_rejected() {
        let mut c = compressor(6);
        let mut big = vec![0u8; 8192];
        let n = deflate_into(&mut c, &[b'a'; 8192], &mut big).unwrap();
        let mut page = [0u8; PAGE_SIZE];
        assert_eq!(
            inflate_page(&mut decompressor(), &big[..n], &mut page),
            Err(Error::WrongSize { got: PAGE_SIZE + 1 })
        );
        let n = deflate_into(&mut c, &[b'a'; 100], &mut big).unwrap();
        assert_eq!(
            inflate_page(&mut decompressor(), &big[..n], &mut page),
            Err(Error::WrongSize { got: 100 })
        );
        assert!(matches!(
            inflate_page(&mut decompressor(), &[0x78, 0x01, 0xff, 0xff], &mut page),
            Err(Error::Corrupt(_))
        ));
        assert_eq!(
            inflate_page(
                &mut decompressor(),
                &[0; MAX_COMPRESSED_PAGE + 1],
                &mut page
            ),
            Err(Error::TooLong {
                len: MAX_COMPRESSED_PAGE + 1
            })
        );
    }
}
