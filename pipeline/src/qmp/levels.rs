//! Compression levels changed by migrate-set-parameters while the compress
//! actor runs (`compress-level`, `multifd-zlib-level`, `multifd-zstd-level`),
//! applied to the streams already open so that the destination, a ferry
//! receiver or QEMU, decodes on without noticing anything but the sizes.
//!
//! - zlib (one deflate stream per multifd channel, Z_SYNC_FLUSH after each
//!   packet, as QEMU's multifd-zlib.c): `deflateParams` between packets;
//!   the next packet is at the new level. Only between levels that use
//!   the same deflate function ([`zlib_family`]): across them
//!   `deflateParams` must emit a block, which flate2 gives it no room
//!   for, so migrate-set-parameters refuses such a change (see
//!   [`super::params`]).
//! - zstd (one endless frame per channel, flushed after each packet, as
//!   QEMU's multifd-zstd.c): libzstd takes a new level only for a new frame
//!   in single-threaded mode, so the next packet ends the frame (at the old
//!   level) and the packets after it are a new frame at the new level; a
//!   zstd decoder starts the next frame by itself.
//! - legacy `--compress` pages are each their own deflate stream: the next
//!   batch simply uses the new level.

use std::io;

use ferry_proto::multifd::Encoder;
use serde::{Deserialize, Serialize};
use zstd::stream::raw::{InBuffer, Operation, OutBuffer};

/// The deflate function a zlib level uses in zlib-rs (flate2's backend
/// here; its configuration table, as zlib-ng's): 0 stores, 1 quick, 2 fast,
/// 3-6 medium, 7-9 slow. A running stream changes level only within one.
pub fn zlib_family(level: u8) -> u8 {
    match level {
        0..=2 => level,
        3..=6 => 3,
        _ => 4,
    }
}

/// What the orchestrator tells the compress actor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// zlib level (0-9) of `--compress` pages, from the next batch on.
    CompressLevel(u32),
    /// Level of the multifd channels' compressor (zlib 0-9, zstd 0-20),
    /// from each channel's next packet on (zstd: the one after).
    MultifdLevel(i32),
}

/// Encodes one packet's `pages` on `enc`, appending to `out`, after
/// applying the level in `next` if there is one (taken). Returns the
/// payload's length.
///
/// # Errors
/// The compressor's: a level zlib or zstd refuses, or a failed encode.
pub fn encode(
    enc: &mut Encoder,
    next: &mut Option<i32>,
    pages: &[u8],
    out: &mut Vec<u8>,
) -> io::Result<usize> {
    let Some(level) = next.take() else {
        return enc.encode(pages, out);
    };
    match enc {
        Encoder::None => enc.encode(pages, out),
        Encoder::Zlib(c) => {
            // The previous packet ended with a sync flush: nothing pending.
            c.set_level(flate2::Compression::new(level.clamp(0, 9) as u32))
                .map_err(io::Error::other)?;
            enc.encode(pages, out)
        }
        Encoder::Zstd(z) => {
            let n = end_frame(z, pages, out)?;
            ferry_proto::multifd::set_zstd_level(z, level)?;
            Ok(n)
        }
    }
}

/// Compresses `pages` and ends the frame, so that the next packet starts a
/// new frame, which takes the level set meanwhile.
fn end_frame(
    z: &mut zstd::stream::raw::Encoder<'static>,
    pages: &[u8],
    out: &mut Vec<u8>,
) -> io::Result<usize> {
    let start = out.len();
    let mut input = InBuffer::around(pages);
    let mut chunk = vec![0u8; zstd::zstd_safe::CCtx::out_size().max(64 << 10)];
    while input.pos < pages.len() {
        let mut o = OutBuffer::around(&mut chunk[..]);
        let before = input.pos;
        z.run(&mut input, &mut o)?;
        let n = o.pos();
        if n == 0 && input.pos == before {
            return Err(io::Error::other("zstd made no progress"));
        }
        out.extend_from_slice(&chunk[..n]);
    }
    loop {
        let mut o = OutBuffer::around(&mut chunk[..]);
        let left = z.finish(&mut o, true)?;
        let n = o.pos();
        out.extend_from_slice(&chunk[..n]);
        if left == 0 {
            return Ok(out.len() - start);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_proto::multifd::{Compression, Decoder};

    const PAGE: usize = 4096;

    /// 128 pages (a full multifd packet) that compress to a size that
    /// depends on the level: text-like, with repeats at long distances.
    fn pages(seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        let words: Vec<Vec<u8>> = (0..64)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                format!("w{:x} ", x % 4096).into_bytes()
            })
            .collect();
        let mut v = Vec::with_capacity(128 * PAGE);
        while v.len() < 128 * PAGE {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            v.extend_from_slice(&words[(x % 64) as usize]);
        }
        v.truncate(128 * PAGE);
        v
    }

    /// Decodes a zstd payload as QEMU's multifd-zstd receiver does: one
    /// page of output at a time, calling the decoder while it wants more,
    /// has input and the page is not full; every page must come out whole.
    fn qemu_zstd_recv(d: &mut zstd::stream::raw::Decoder<'static>, payload: &[u8]) -> Vec<u8> {
        let mut input = InBuffer::around(payload);
        let mut all = vec![0u8; 128 * PAGE];
        for page in all.chunks_mut(PAGE) {
            let mut o = OutBuffer::around(page);
            loop {
                let ret = d.run(&mut input, &mut o).expect("QEMU would fail here");
                if !(ret > 0 && input.pos < payload.len() && o.pos() < PAGE) {
                    assert!(ret == 0 || o.pos() == PAGE, "a short page");
                    break;
                }
            }
            assert_eq!(o.pos(), PAGE, "a short page");
        }
        all
    }

    #[test]
    fn zstd_level_changes_between_packets_decode_as_qemu_and_ferry_decode() {
        let mut enc = Encoder::new(Compression::Zstd, 1).unwrap();
        let mut qemu = zstd::stream::raw::Decoder::new().unwrap();
        let mut ferry = Decoder::new(Compression::Zstd).unwrap();
        let mut next = None;
        let mut sizes = Vec::new();
        // Level 1, a change to 19 (this packet ends the frame), 19, back to 1.
        for (i, change) in [None, Some(19), None, None, Some(1), None, None]
            .into_iter()
            .enumerate()
        {
            if let Some(l) = change {
                next = Some(l);
            }
            let p = pages(7); // the same pages each time: sizes compare
            let mut out = Vec::new();
            encode(&mut enc, &mut next, &p, &mut out).unwrap();
            assert_eq!(qemu_zstd_recv(&mut qemu, &out), p, "packet {i}, QEMU's way");
            let mut back = vec![0u8; p.len()];
            ferry.decode(&out, &mut back).unwrap();
            assert_eq!(back, p, "packet {i}, ferry's decoder");
            sizes.push(out.len());
        }
        // The packets after the raise are smaller than before it, and
        // the ones after the drop are back to level 1's size.
        assert!(sizes[2] < sizes[0], "{sizes:?}");
        assert!(sizes[3] < sizes[0], "{sizes:?}");
        assert!(sizes[6] > sizes[3], "{sizes:?}");
    }

    #[test]
    fn zlib_level_changes_take_effect_at_the_next_packet() {
        let mut enc = Encoder::new(Compression::Zlib, 3).unwrap();
        let mut dec = Decoder::new(Compression::Zlib).unwrap();
        let mut next = None;
        let mut sizes = Vec::new();
        for change in [None, Some(6), None, Some(3), None] {
            if let Some(l) = change {
                next = Some(l);
            }
            let p = pages(11);
            let mut out = Vec::new();
            encode(&mut enc, &mut next, &p, &mut out).unwrap();
            let mut back = vec![0u8; p.len()];
            dec.decode(&out, &mut back).unwrap();
            assert_eq!(back, p);
            sizes.push(out.len());
        }
        assert!(sizes[1] < sizes[0], "{sizes:?}");
        assert!(sizes[3] > sizes[2], "{sizes:?}");
        // Across families the change fails, typed, and the stream goes on.
        let mut next = Some(9);
        let mut out = Vec::new();
        assert!(encode(&mut enc, &mut next, &pages(11), &mut out).is_err());
        let mut out = Vec::new();
        encode(&mut enc, &mut None, &pages(11), &mut out).unwrap();
        let mut back = vec![0u8; 128 * PAGE];
        dec.decode(&out, &mut back).unwrap();
        assert_eq!(back, pages(11));
    }
}
