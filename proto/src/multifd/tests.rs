use super::*;

fn pages(n: usize, seed: u8) -> Vec<u8> {
    // Text-like bytes that compress, with a per-page twist so pages differ.
    (0..n * PAGE_SIZE)
        .map(|i| b"migration stream "[i % 17].wrapping_add(seed ^ (i / PAGE_SIZE) as u8))
        .collect()
}

fn header_bytes(h: &PacketHeader) -> Box<[u8; HEADER_LEN]> {
    let mut b = Box::new([0u8; HEADER_LEN]);
    h.encode(&mut b);
    b
}

#[test]
fn header_is_qemus_size_and_layout() {
    assert_eq!(HEADER_LEN, 1344);
    let h = PacketHeader {
        flags: flag::ZSTD,
        normal_pages: 2,
        zero_pages: 1,
        next_packet_size: 999,
        packet_num: 0x0102_0304_0506_0708,
        block: "pc.ram".into(),
        offsets: vec![0x1000, 0x3000, 0x8000],
    };
    let b = header_bytes(&h);
    assert_eq!(&b[0..4], &[0x11, 0x22, 0x33, 0x44]);
    assert_eq!(be32(&b[..], 12), 128, "pages_alloc is the packet's slots");
    assert_eq!(be32(&b[..], 20), 999, "next_packet_size at byte 20");
    assert_eq!(be64(&b[..], 24), 0x0102_0304_0506_0708, "packet_num at 24");
    assert_eq!(be32(&b[..], 32), 1, "zero_pages at 32, after packet_num");
    assert_eq!(&b[64..71], b"pc.ram\0");
    assert_eq!(be64(&b[..], 320 + 16), 0x8000, "zero pages' offsets follow");
    assert_eq!(
        PacketHeader::decode(&b, Some(Compression::Zstd)).unwrap(),
        h
    );
}

#[test]
fn init_round_trips_and_rejects_the_main_stream() {
    let init = ChannelInit {
        uuid: [7; 16],
        id: 3,
    };
    let b = init.encode();
    assert!(is_channel_magic(b[..4].try_into().unwrap()));
    assert_eq!(ChannelInit::decode(&b).unwrap(), init);
    let mut qevm = [0u8; INIT_LEN];
    qevm[..4].copy_from_slice(b"QEVM");
    assert!(!is_channel_magic(*b"QEVM"));
    assert!(matches!(
        ChannelInit::decode(&qevm),
        Err(Error::Magic { found: 0x5145_564d })
    ));
    let mut v2 = b;
    v2[7] = 2;
    assert!(matches!(ChannelInit::decode(&v2), Err(Error::Version(2))));
}

#[test]
fn hostile_headers_are_refused() {
    let good = PacketHeader {
        flags: 0,
        normal_pages: 1,
        zero_pages: 0,
        next_packet_size: PAGE_SIZE as u32,
        packet_num: 1,
        block: "ram".into(),
        offsets: vec![0],
    };
    type Spoil = Box<dyn Fn(&mut [u8; HEADER_LEN])>;
    let cases: Vec<(&str, Spoil)> = vec![
        (
            "too many slots",
            Box::new(|b| b[12..16].copy_from_slice(&129u32.to_be_bytes())),
        ),
        (
            "normal over slots",
            Box::new(|b| b[16..20].copy_from_slice(&200u32.to_be_bytes())),
        ),
        (
            "zero past slots",
            Box::new(|b| b[32..36].copy_from_slice(&128u32.to_be_bytes())),
        ),
        (
            "payload not the pages",
            Box::new(|b| b[20..24].copy_from_slice(&4097u32.to_be_bytes())),
        ),
        (
            "device state",
            Box::new(|b| b[8..12].copy_from_slice(&flag::DEVICE_STATE.to_be_bytes())),
        ),
        (
            "zlib on a raw channel",
            Box::new(|b| b[8..12].copy_from_slice(&flag::ZLIB.to_be_bytes())),
        ),
        ("unterminated name", Box::new(|b| b[64..320].fill(b'a'))),
        (
            "unaligned offset",
            Box::new(|b| b[320..328].copy_from_slice(&5u64.to_be_bytes())),
        ),
        ("bad magic", Box::new(|b| b[0] = 0)),
    ];
    for (what, spoil) in cases {
        let mut b = header_bytes(&good);
        spoil(&mut b);
        assert!(
            PacketHeader::decode(&b, Some(Compression::None)).is_err(),
            "{what} was accepted"
        );
    }
    assert!(PacketHeader::decode(&header_bytes(&good), Some(Compression::None)).is_ok());
}

#[test]
fn sync_packets_carry_nothing() {
    let s = PacketHeader::sync(9);
    let b = header_bytes(&s);
    assert_eq!(be32(&b[..], 8), flag::SYNC);
    assert_eq!(be32(&b[..], 12), 0, "no slots in a sync");
    let back = PacketHeader::decode(&b, Some(Compression::Zstd)).unwrap();
    assert!(back.is_sync());
    assert!(back.normal().is_empty() && back.zero().is_empty());
    // QEMU 7.2 leaves the last packet's size in a packet without pages; no
    // payload follows it.
    let mut stale = header_bytes(&s);
    stale[20..24].copy_from_slice(&113_397u32.to_be_bytes());
    let back = PacketHeader::decode(&stale, Some(Compression::Zlib)).unwrap();
    assert_eq!(back.payload_len(), 0);
}

/// Packets of one channel share one stream: each decodes on its own, in
/// order, to exactly its pages.
fn round_trip(method: Compression, level: i32) {
    let mut enc = Encoder::new(method, level).unwrap();
    let mut dec = Decoder::new(method).unwrap();
    for (n, seed) in [(1, 1u8), (128, 2), (3, 3), (128, 2)] {
        let input = pages(n, seed);
        let mut payload = Vec::new();
        let len = enc.encode(&input, &mut payload).unwrap();
        assert_eq!(len, payload.len());
        if method != Compression::None {
            assert!(len < input.len() / 4, "{method:?} did not compress: {len}");
            assert!(len <= MAX_PAYLOAD);
        }
        let mut out = vec![0u8; input.len()];
        dec.decode(&payload, &mut out).unwrap();
        assert!(out == input, "{method:?} packet of {n} pages differs");
    }
}

#[test]
fn every_method_round_trips_packet_by_packet() {
    round_trip(Compression::None, 0);
    round_trip(Compression::Zlib, 1);
    round_trip(Compression::Zstd, 1);
    round_trip(Compression::Zstd, 19);
}

#[test]
fn a_payload_for_other_pages_is_an_error() {
    for method in [Compression::Zlib, Compression::Zstd] {
        let mut enc = Encoder::new(method, 1).unwrap();
        let mut payload = Vec::new();
        enc.encode(&pages(2, 5), &mut payload).unwrap();
        // Announced as one page: the payload holds two.
        let mut one = vec![0u8; PAGE_SIZE];
        let err = Decoder::new(method)
            .unwrap()
            .decode(&payload, &mut one)
            .unwrap_err();
        assert!(
            matches!(err, Error::DecodedSize { .. }),
            "{method:?}: {err}"
        );
        // Announced as three pages: the payload falls short.
        let mut three = vec![0u8; 3 * PAGE_SIZE];
        let err = Decoder::new(method)
            .unwrap()
            .decode(&payload, &mut three)
            .unwrap_err();
        assert!(
            matches!(err, Error::DecodedSize { .. }),
            "{method:?}: {err}"
        );
        // Garbage.
        let mut page = vec![0u8; PAGE_SIZE];
        let err = Decoder::new(method)
            .unwrap()
            .decode(&[0xde, 0xad, 0xbe, 0xef, 1, 2, 3], &mut page)
            .unwrap_err();
        assert!(
            matches!(err, Error::Corrupt { .. } | Error::DecodedSize { .. }),
            "{method:?}: {err}"
        );
    }
}

/// ferry's `auto` mode: raw packets between a channel's zstd packets load
/// without touching its stream, a channel whose first packets were raw
/// starts its stream later, and a second compression on one channel is
/// refused.
#[test]
fn a_channel_decoder_mixes_raw_packets_into_one_compressed_stream() {
    let mut enc = Encoder::new(Compression::Zstd, 1).unwrap();
    let mut dec = ChannelDecoder::default();
    let mut out = vec![0u8; 4 * PAGE_SIZE];
    for (i, compressed) in [false, true, false, false, true, true, false]
        .into_iter()
        .enumerate()
    {
        let p = pages(4, i as u8);
        let (method, payload) = if compressed {
            let mut v = Vec::new();
            enc.encode(&p, &mut v).unwrap();
            (Compression::Zstd, v)
        } else {
            (Compression::None, p.clone())
        };
        dec.decode(method, &payload, &mut out).unwrap();
        assert_eq!(out, p, "packet {i}");
    }
    assert_eq!(dec.method(), Some(Compression::Zstd));
    let err = dec.decode(Compression::Zlib, &[0x78, 0x01], &mut out);
    assert!(
        matches!(
            err,
            Err(Error::CompressionMismatch {
                found: "zlib",
                expected: "zstd"
            })
        ),
        "{err:?}"
    );
    // The header check lets a raw packet through on a zstd channel, and a
    // zlib one not.
    let mut h = PacketHeader {
        normal_pages: 1,
        next_packet_size: PAGE_SIZE as u32,
        block: "pc.ram".into(),
        offsets: vec![0],
        ..PacketHeader::default()
    };
    PacketHeader::decode(&header_bytes(&h), Some(Compression::Zstd)).unwrap();
    h.flags = flag::ZLIB;
    h.next_packet_size = 10;
    assert!(matches!(
        PacketHeader::decode(&header_bytes(&h), Some(Compression::Zstd)),
        Err(Error::CompressionMismatch { .. })
    ));
}
