//! `compress::inflate_page` on arbitrary input: never panics, accepts exactly
//! the zlib streams that inflate to one page (checked against miniz_oxide, an
//! independent inflater), and round-trips pages built from the input.
#![no_main]

use ferry_proto::compress::{self, MAX_COMPRESSED_PAGE};
use ferry_proto::stream::PAGE_SIZE;
use libfuzzer_sys::fuzz_target;
use miniz_oxide::inflate::core::inflate_flags::{
    TINFL_FLAG_COMPUTE_ADLER32, TINFL_FLAG_PARSE_ZLIB_HEADER,
    TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF,
};
use miniz_oxide::inflate::core::{decompress, DecompressorOxide};
use miniz_oxide::inflate::TINFLStatus;

/// miniz_oxide's verdict: the page when `data` starts with one complete zlib
/// stream (checksum checked) of exactly one page. Like zlib's `uncompress`,
/// which QEMU uses, bytes after the end of the stream are ignored.
fn reference(data: &[u8]) -> Option<Vec<u8>> {
    let mut r = DecompressorOxide::new();
    // One byte more than a page tells an exact page from a longer stream.
    let mut out = vec![0u8; PAGE_SIZE + 1];
    let flags = TINFL_FLAG_PARSE_ZLIB_HEADER
        | TINFL_FLAG_COMPUTE_ADLER32
        | TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF;
    let (status, consumed, written) = decompress(&mut r, data, &mut out, 0, flags);
    if status != TINFLStatus::Done || written != PAGE_SIZE || consumed < 6 {
        return None;
    }
    out.truncate(PAGE_SIZE);
    // Check the trailer here too: not every miniz_oxide version reports a
    // mismatch.
    let trailer = u32::from_be_bytes(data[consumed - 4..consumed].try_into().unwrap());
    (adler32(&out) == trailer).then_some(out)
}

fn adler32(data: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for &x in data {
        a = (a + u32::from(x)) % 65521;
        b = (b + a) % 65521;
    }
    b << 16 | a
}

fuzz_target!(|data: &[u8]| {
    let mut page = [0u8; PAGE_SIZE];
    let got = compress::inflate_page(&mut compress::decompressor(), data, &mut page);
    if data.len() > MAX_COMPRESSED_PAGE {
        assert!(matches!(got, Err(compress::Error::TooLong { .. })));
    } else {
        match (&got, reference(data)) {
            (Ok(()), Some(v)) => assert_eq!(&v[..], &page[..], "inflaters disagree on the bytes"),
            (Ok(()), None) => panic!("inflate_page accepted what miniz_oxide rejects"),
            (Err(e), Some(_)) => panic!("inflate_page rejected a one-page stream: {e:?}"),
            (Err(_), None) => {}
        }
    }

    // Round trip: a page made from the input, at a level the input picks.
    if let Some((&level, rest)) = data.split_first() {
        let mut src = [0u8; PAGE_SIZE];
        for (i, b) in src.iter_mut().enumerate() {
            // Repeat the input with runs, so pages compress to varied degrees.
            *b = if rest.is_empty() {
                level
            } else {
                rest[(i / (1 + level as usize % 8)) % rest.len()]
            };
        }
        let mut c = compress::compressor(u32::from(level % 10));
        // zlib-rs at level 1 can expand incompressible data by ~5%: beyond
        // QEMU's bound, which is why ferry sends pages that do not shrink raw.
        let mut out = [0u8; 2 * PAGE_SIZE];
        let n = compress::deflate_into(&mut c, &src, &mut out).expect("a page fits in two pages");
        let mut back = [0u8; PAGE_SIZE];
        let got = compress::inflate_page(&mut compress::decompressor(), &out[..n], &mut back);
        if n > MAX_COMPRESSED_PAGE {
            // QEMU's bound holds on the receive side too.
            assert!(matches!(got, Err(compress::Error::TooLong { .. })), "{got:?}");
        } else {
            got.unwrap();
            assert_eq!(back, src);
        }
    }
});
