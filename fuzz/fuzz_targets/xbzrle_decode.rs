//! `xbzrle::decode` on arbitrary input, against a line-by-line port of QEMU's
//! `xbzrle_decode_buffer`; and encode/decode round trips of page pairs built
//! from the input.
#![no_main]

use ferry_proto::stream::xbzrle;
use ferry_proto::stream::PAGE_SIZE;
use libfuzzer_sys::fuzz_target;

/// QEMU's `uleb128_decode_small` (util/cutils.c); the caller guarantees two bytes.
fn uleb128_decode_small(src: &[u8]) -> Option<(u32, usize)> {
    if src[0] & 0x80 == 0 {
        return Some((u32::from(src[0]), 1));
    }
    if src[1] & 0x80 != 0 {
        return None;
    }
    Some((u32::from(src[0] & 0x7f) | u32::from(src[1]) << 7, 2))
}

/// QEMU 7.2's `xbzrle_decode_buffer` (migration/xbzrle.c), ported as written.
fn qemu_decode(src: &[u8], dst: &mut [u8]) -> Option<usize> {
    let (slen, dlen) = (src.len(), dst.len());
    let (mut i, mut d) = (0usize, 0usize);
    while i < slen {
        if slen - i < 2 {
            return None;
        }
        let (count, ret) = uleb128_decode_small(&src[i..])?;
        if i != 0 && count == 0 {
            return None;
        }
        i += ret;
        d += count as usize;
        if d > dlen {
            return None;
        }
        if slen - i < 2 {
            return None;
        }
        let (count, ret) = uleb128_decode_small(&src[i..])?;
        if count == 0 {
            return None;
        }
        i += ret;
        let count = count as usize;
        if d + count > dlen || i + count > slen {
            return None;
        }
        dst[d..d + count].copy_from_slice(&src[i..i + count]);
        d += count;
        i += count;
    }
    Some(d)
}

fuzz_target!(|data: &[u8]| {
    let base: [u8; PAGE_SIZE] = std::array::from_fn(|i| (i * 7 % 251) as u8);
    let mut page = base;
    let mut reference = base;
    let got = xbzrle::decode(data, &mut page);
    let want = qemu_decode(data, &mut reference);
    match (got, want) {
        (Ok(d), Some(w)) => {
            assert_eq!(d, w);
            assert_eq!(page, reference);
        }
        (Err(_), None) => {}
        (got, want) => panic!("decode {got:?}, QEMU's decoder {want:?}"),
    }

    // Round trip: `new` is `old` with the input written over it at a stride.
    if let Some((&stride, rest)) = data.split_first() {
        let old = base;
        let mut new = old;
        let stride = 1 + stride as usize;
        for (k, &b) in rest.iter().enumerate() {
            new[(k * stride) % PAGE_SIZE] = b;
        }
        let enc = xbzrle::encode(&old, &new);
        let mut p = old;
        let d = xbzrle::decode(&enc, &mut p).unwrap();
        assert!(d <= PAGE_SIZE);
        assert_eq!(p, new);
        let mut q = old;
        assert_eq!(qemu_decode(&enc, &mut q), Some(d));
    }
});
