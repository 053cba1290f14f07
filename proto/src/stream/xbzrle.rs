//! XBZRLE: QEMU's delta encoding of a page against its previous contents.
//!
//! An encoded page is a sequence of (zero run, non-zero run) pairs: a ULEB128
//! count of unchanged bytes to skip, a ULEB128 count of changed bytes, and the
//! changed bytes themselves. Counts fit in two ULEB128 bytes (below 2^14).

use super::PAGE_SIZE;

/// The encoding byte that precedes every XBZRLE record.
pub const ENCODING_FLAG: u8 = 0x01;

/// Why an encoded page cannot be applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A count is longer than two bytes or the input ends inside one.
    #[error("bad run length at byte {0} of the encoded page")]
    BadCount(usize),
    /// A run reaches past the page or past the encoded data.
    #[error("run at byte {0} of the encoded page overflows")]
    Overflow(usize),
}

fn uleb128_decode_small(src: &[u8]) -> Option<(u32, usize)> {
    let b0 = *src.first()?;
    if b0 & 0x80 == 0 {
        return Some((b0 as u32, 1));
    }
    let b1 = *src.get(1)?;
    if b1 & 0x80 != 0 {
        return None;
    }
    Some(((b0 & 0x7f) as u32 | (b1 as u32) << 7, 2))
}

fn uleb128_encode_small(out: &mut Vec<u8>, n: u32) {
    debug_assert!(n < 1 << 14);
    if n < 0x80 {
        out.push(n as u8);
    } else {
        out.push((n as u8 & 0x7f) | 0x80);
        out.push((n >> 7) as u8);
    }
}

/// Applies an encoded delta to `page` in place; returns the bytes it covered.
pub fn decode(src: &[u8], page: &mut [u8; PAGE_SIZE]) -> Result<usize, Error> {
    let (mut i, mut d) = (0usize, 0usize);
    while i < src.len() {
        if src.len() - i < 2 {
            return Err(Error::BadCount(i));
        }
        let (zrun, n) = uleb128_decode_small(&src[i..]).ok_or(Error::BadCount(i))?;
        // Only the first zero run may be empty.
        if i != 0 && zrun == 0 {
            return Err(Error::BadCount(i));
        }
        i += n;
        d += zrun as usize;
        if d > PAGE_SIZE {
            return Err(Error::Overflow(i));
        }
        if src.len() - i < 2 {
            return Err(Error::BadCount(i));
        }
        let (nzrun, n) = uleb128_decode_small(&src[i..]).ok_or(Error::BadCount(i))?;
        if nzrun == 0 {
            return Err(Error::BadCount(i));
        }
        i += n;
        let nzrun = nzrun as usize;
        if d + nzrun > PAGE_SIZE || i + nzrun > src.len() {
            return Err(Error::Overflow(i));
        }
        page[d..d + nzrun].copy_from_slice(&src[i..i + nzrun]);
        d += nzrun;
        i += nzrun;
    }
    Ok(d)
}

/// Encodes the change from `old` to `new` the way QEMU's encoder does, for
/// tests and for producing streams with XBZRLE records.
pub fn encode(old: &[u8; PAGE_SIZE], new: &[u8; PAGE_SIZE]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < PAGE_SIZE {
        let z = old[i..]
            .iter()
            .zip(&new[i..])
            .take_while(|(a, b)| a == b)
            .count();
        if i + z == PAGE_SIZE {
            break;
        }
        let nz = old[i + z..]
            .iter()
            .zip(&new[i + z..])
            .take_while(|(a, b)| a != b)
            .count();
        uleb128_encode_small(&mut out, z as u32);
        uleb128_encode_small(&mut out, nz as u32);
        out.extend_from_slice(&new[i + z..i + z + nz]);
        i += z + nz;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delta_round_trips() {
        let old = [7u8; PAGE_SIZE];
        let mut new = old;
        new[0] = 1;
        new[100..300].fill(9);
        new[PAGE_SIZE - 1] = 0;
        let enc = encode(&old, &new);
        let mut page = old;
        decode(&enc, &mut page).unwrap();
        assert_eq!(page, new);
    }

    #[test]
    fn overflowing_runs_are_rejected() {
        let mut page = [0u8; PAGE_SIZE];
        // Skip 4095, then write 2 bytes: one past the page.
        let mut enc = Vec::new();
        uleb128_encode_small(&mut enc, 4095);
        uleb128_encode_small(&mut enc, 2);
        enc.extend_from_slice(&[1, 2]);
        assert!(matches!(decode(&enc, &mut page), Err(Error::Overflow(_))));
        assert_eq!(
            decode(&[0x80, 0x80, 0x01], &mut page),
            Err(Error::BadCount(0))
        );
        assert_eq!(decode(&[0, 5, 1], &mut page), Err(Error::Overflow(2)));
    }
}
