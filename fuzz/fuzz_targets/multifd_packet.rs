//! One multifd channel on arbitrary input, as `ferry receive` reads it: the
//! 64-byte channel init, then packets (1344-byte header, payload) decoded with
//! the channel's one decoder. Nothing may panic, allocate beyond the packet
//! bounds, or decode to other than the announced pages.
#![no_main]

use ferry_proto::multifd::{ChannelInit, Compression, Decoder, PacketHeader, HEADER_LEN, INIT_LEN};
use ferry_proto::stream::PAGE_SIZE;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((init, mut rest)) = data.split_first_chunk::<INIT_LEN>() else {
        return;
    };
    let _ = ChannelInit::decode(init);
    let mut decoder: Option<Decoder> = None;
    let mut pages = Vec::new();
    while let Some((header, tail)) = rest.split_first_chunk::<HEADER_LEN>() {
        let Ok(h) = PacketHeader::decode(header, decoder.as_ref().map(Decoder::method)) else {
            return;
        };
        assert!(h.offsets.len() <= ferry_proto::multifd::PAGES_PER_PACKET);
        assert!(h.payload_len() <= ferry_proto::multifd::MAX_PAYLOAD);
        let Some((payload, tail)) = tail.split_at_checked(h.payload_len()) else {
            return;
        };
        rest = tail;
        if h.normal_pages == 0 {
            continue;
        }
        let method = Compression::from_flags(h.flags).expect("decode checked the flags");
        let d = decoder.get_or_insert_with(|| Decoder::new(method).expect("a decoder"));
        pages.resize(h.normal_pages as usize * PAGE_SIZE, 0);
        if d.decode(payload, &mut pages).is_err() {
            return;
        }
    }
});
