//! Feeds arbitrary bytes to the stream parser and applies every RAM record to
//! a RAM image in a temporary directory, until the parser ends or fails.
//! When the input carries a vmdesc trailer, parses it a second time with the
//! device-section sizes that trailer gives, as `ferry inspect` does.
#![no_main]

use std::collections::HashMap;

use ferry_proto::qemu_file::QemuFileReader;
use ferry_guest::load::RamImage;
use ferry_proto::stream::parse::{Item, Limits, Parser, RamRecord};
use ferry_proto::stream::vmdesc;
use ferry_proto::transport::MemTransport;
use libfuzzer_sys::fuzz_target;

/// Announced RAM above this is parsed but not applied.
const MAX_RAM: u64 = 64 << 20;

/// Parses `data` to the end or the first error; returns the vmdesc trailer.
fn run(data: &[u8], sizes: HashMap<(String, u32), u64>) -> Option<Vec<u8>> {
    let limits = Limits {
        max_device_section: 1 << 20,
        max_vmdesc: 1 << 20,
        ..Limits::default()
    };
    let mut p = Parser::new(QemuFileReader::new(MemTransport::from_bytes(data.to_vec())))
        .with_limits(limits)
        .with_device_sizes(sizes);
    let mut dir = None;
    let mut image: Option<RamImage> = None;
    let mut trailer = None;
    // Every item but an empty device body takes at least one byte, and an
    // empty body is followed by a five-byte footer: more items is a loop.
    let max_items = 2 * data.len() + 4;
    let mut items = 0;
    loop {
        items += 1;
        assert!(
            items <= max_items,
            "parser loops: {items} items from {} bytes",
            data.len()
        );
        let at = p.offset();
        match p.next() {
            Ok(Item::End) => {
                // The end stays the end, and it is the end of the input.
                assert!(matches!(p.next(), Ok(Item::End)));
                assert_eq!(p.offset(), data.len() as u64, "End before the last byte");
                return trailer;
            }
            Err(e) => {
                assert!(
                    e.offset() <= data.len() as u64,
                    "error offset past the input: {e:?}"
                );
                // Errors are latched.
                assert!(p.next().is_err());
                return trailer;
            }
            Ok(Item::Ram(rec)) => {
                if let RamRecord::MemSize(blocks) = &rec {
                    let total = blocks
                        .iter()
                        .map(|b| b.length)
                        .fold(0u64, u64::saturating_add);
                    if image.is_none() && total <= MAX_RAM {
                        let d = dir.get_or_insert_with(|| tempfile::tempdir().unwrap());
                        image = RamImage::create_in_dir(d.path(), blocks).ok();
                    }
                }
                if let Some(img) = image.as_mut() {
                    let _ = img.apply(&rec, at);
                }
            }
            Ok(Item::Vmdesc(json)) => trailer = Some(json.to_vec()),
            Ok(_) => {}
        }
        assert!(p.offset() <= data.len() as u64);
    }
}

fuzz_target!(|data: &[u8]| {
    if let Some(json) = run(data, HashMap::new()) {
        if let Ok(sizes) = vmdesc::section_sizes(&json) {
            if !sizes.is_empty() {
                run(data, sizes);
            }
        }
    }
});
