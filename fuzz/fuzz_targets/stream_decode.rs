//! Feeds arbitrary bytes to the stream parser and applies every RAM record to
//! a RAM image in a temporary directory, until the parser ends or fails.
#![no_main]

use std::collections::HashSet;

use ferry_proto::qemu_file::QemuFileReader;
use ferry_proto::stream::load::{block_file_name, RamImage};
use ferry_proto::stream::parse::{Item, Limits, Parser, RamRecord};
use ferry_proto::stream::RamBlockInfo;
use ferry_proto::transport::MemTransport;
use libfuzzer_sys::fuzz_target;

/// Announced RAM above this is parsed but not applied.
const MAX_RAM: u64 = 64 << 20;

/// Whether to map the announced blocks. Block lists whose names share a file
/// (`a` and `/a` both become `a.ram`) are skipped: ferry-proto maps the file
/// twice and the shorter block truncates the longer one's mapping (SIGBUS);
/// the reproducer is in artifacts-kept/. Set FERRY_FUZZ_COLLIDING=1 to load
/// them anyway.
fn loadable(blocks: &[RamBlockInfo]) -> bool {
    let total = blocks
        .iter()
        .map(|b| b.length)
        .fold(0u64, u64::saturating_add);
    if total > MAX_RAM {
        return false;
    }
    if std::env::var_os("FERRY_FUZZ_COLLIDING").is_some() {
        return true;
    }
    let mut names = HashSet::new();
    blocks
        .iter()
        .all(|b| names.insert(block_file_name(&b.idstr)))
}

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        max_device_section: 1 << 20,
        max_vmdesc: 1 << 20,
        ..Limits::default()
    };
    let mut p = Parser::new(QemuFileReader::new(MemTransport::from_bytes(data.to_vec())))
        .with_limits(limits);
    let mut dir = None;
    let mut image: Option<RamImage> = None;
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
                // The end stays the end.
                assert!(matches!(p.next(), Ok(Item::End)));
                assert_eq!(p.offset(), data.len() as u64, "End before the last byte");
                break;
            }
            Err(e) => {
                assert!(
                    e.offset() <= data.len() as u64,
                    "error offset past the input: {e:?}"
                );
                break;
            }
            Ok(Item::Ram(rec)) => {
                if let RamRecord::MemSize(blocks) = &rec {
                    if image.is_none() && loadable(blocks) {
                        let d = dir.get_or_insert_with(|| tempfile::tempdir().unwrap());
                        image = RamImage::create_in_dir(d.path(), blocks).ok();
                    }
                }
                if let Some(img) = image.as_mut() {
                    let _ = img.apply(&rec, at);
                }
            }
            Ok(_) => {}
        }
        assert!(p.offset() <= data.len() as u64);
    }
});
