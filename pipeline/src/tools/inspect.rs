//! `ferry inspect`: what a migration stream contains, and its RAM and device
//! state pulled out into files.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use ferry_guest::load::{self, RamImage};
use ferry_proto::compress;
use ferry_proto::qemu_file::QemuFileReader;
use ferry_proto::stream::device_state::DeviceState;
use ferry_proto::stream::parse::{self, Item, Parser, RamRecord, SectionHeader};
use ferry_proto::stream::{integrity, xbzrle, RamBlockInfo, PAGE_SIZE};
use ferry_proto::transport::{FileTransport, ReadTransport, Transport};
use serde::Serialize;

/// What to inspect and what to extract.
#[derive(Debug, Clone)]
pub struct Options {
    /// The stream file, or `-` for standard input.
    pub stream: PathBuf,
    /// Write each RAM block to `DIR/<idstr>.ram`.
    pub extract_ram: Option<PathBuf>,
    /// Write the configuration and device sections to this file.
    pub extract_device_state: Option<PathBuf>,
}

/// Errors of `ferry inspect`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The stream file cannot be opened.
    #[error("cannot open {path}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The stream is not a valid migration stream.
    #[error("invalid stream")]
    Stream(#[from] parse::Error),
    /// RAM cannot be extracted (or a page in the stream is corrupt).
    #[error("cannot load RAM")]
    Load(#[from] load::Error),
    /// An output file cannot be written.
    #[error("cannot write {path}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// One row of the section table: a section and where it ends.
#[derive(Debug, Clone, Serialize)]
pub struct SectionRow {
    /// The section's header.
    #[serde(flatten)]
    pub header: SectionHeader,
    /// Offset just past the footer.
    pub end: u64,
}

/// Pages by how they travelled.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Pages {
    /// ZERO records (a page of one repeated byte).
    pub zero: u64,
    /// Raw PAGE records.
    pub raw: u64,
    /// COMPRESS_PAGE records.
    pub compressed: u64,
    /// XBZRLE records.
    pub xbzrle: u64,
    /// Bytes of zlib data in the compressed pages.
    pub compressed_bytes: u64,
    /// Page bytes per compressed byte among compressed pages (QEMU's
    /// compression-rate); 0 when no page was compressed.
    pub compressed_ratio: f64,
}

/// Everything `ferry inspect` reports.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// Stream version (always 3).
    pub version: u32,
    /// Machine type from the configuration section.
    pub machine: Option<String>,
    /// Sections in stream order.
    pub sections: Vec<SectionRow>,
    /// RAM blocks of the MEM_SIZE record.
    pub ram_blocks: Vec<RamBlockInfo>,
    /// Page counts.
    pub pages: Pages,
    /// Whether a vmdesc trailer followed EOF.
    pub vmdesc: bool,
    /// Bytes of device state no vmdesc sized, carried whole (from the
    /// header of the first such section to the EOF marker).
    pub opaque_device_bytes: u64,
    /// Length of the stream in bytes.
    pub bytes: u64,
}

/// The stream file, or standard input. The parser sizes device sections
/// from the vmdesc trailer itself, the same way from a pipe as from a file.
fn open(path: &Path) -> Result<Box<dyn Transport>, Error> {
    if path == Path::new("-") {
        return Ok(Box::new(ReadTransport(io::stdin())));
    }
    let file = File::open(path).map_err(|source| Error::Open {
        path: path.to_owned(),
        source,
    })?;
    Ok(Box::new(FileTransport(file)))
}

/// Reads the whole stream, extracting what `opts` asks for.
pub fn run(opts: &Options) -> Result<Report, Error> {
    let transport = open(&opts.stream)?;
    // A checkpoint of `ferry send --integrity` has a known length.
    let sizes = std::collections::HashMap::from([(
        (integrity::IDSTR.to_owned(), 0),
        integrity::BODY_LEN as u64,
    )]);
    let mut parser = Parser::new(QemuFileReader::new(transport)).with_device_sizes(sizes);
    let mut report = Report::default();
    let mut device = DeviceState::default();
    let mut ram: Option<RamImage> = None;
    let mut open_section: Option<SectionHeader> = None;
    let mut check = PageCheck::new();
    loop {
        let offset = parser.offset();
        let item = parser.next()?;
        device.observe(&item);
        match &item {
            Item::FileHeader => report.version = ferry_proto::stream::QEMU_VM_FILE_VERSION,
            Item::Configuration { machine, .. } => report.machine = Some(machine.clone()),
            Item::Section(h) => open_section = Some(h.clone()),
            Item::Footer { end, .. } => {
                if let Some(h) = open_section.take() {
                    report.sections.push(SectionRow {
                        header: h,
                        end: *end,
                    });
                }
            }
            Item::Ram(rec) => {
                count(&mut report.pages, rec);
                if let RamRecord::MemSize(blocks) = rec {
                    report.ram_blocks = blocks.to_vec();
                    if let Some(dir) = &opts.extract_ram {
                        if ram.is_none() {
                            std::fs::create_dir_all(dir).map_err(|source| Error::Write {
                                path: dir.clone(),
                                source,
                            })?;
                            ram = Some(RamImage::create_in_dir(dir, blocks)?);
                        }
                    }
                }
                match ram.as_mut() {
                    Some(image) => image.apply(rec, offset)?,
                    None => check.page(rec, offset)?,
                }
            }
            Item::Vmdesc(_) => report.vmdesc = true,
            Item::OpaqueDeviceState(bytes) => {
                // The section whose header came last is part of it.
                let header = open_section.take().map_or(0, |h| offset - h.start);
                report.opaque_device_bytes += header + bytes.len() as u64;
            }
            Item::End => break,
            Item::Block(_) | Item::DeviceState(_) | Item::Command { .. } | Item::Eof => {}
        }
    }
    report.bytes = parser.offset();
    let p = &mut report.pages;
    if p.compressed_bytes > 0 {
        p.compressed_ratio = (p.compressed * PAGE_SIZE as u64) as f64 / p.compressed_bytes as f64;
    }
    if let Some(image) = &mut ram {
        image.sync()?;
    }
    if let Some(path) = &opts.extract_device_state {
        std::fs::write(path, device.to_bytes()).map_err(|source| Error::Write {
            path: path.clone(),
            source,
        })?;
    }
    Ok(report)
}

/// Decodes every encoded page a stream carries, as `ferry receive` does,
/// when no RAM is extracted: a page that would fail the load fails inspect.
struct PageCheck {
    inflater: compress::Decompress,
    page: Box<[u8; PAGE_SIZE]>,
}

impl PageCheck {
    fn new() -> Self {
        Self {
            inflater: compress::decompressor(),
            page: Box::new([0; PAGE_SIZE]),
        }
    }

    /// An XBZRLE delta is checked against a zero page: whether it decodes
    /// depends on its runs, not on the page it applies to.
    fn page(&mut self, rec: &RamRecord<'_>, offset: u64) -> Result<(), Error> {
        match rec {
            RamRecord::Compressed { data, .. } => {
                compress::inflate_page(&mut self.inflater, data, &mut self.page)
                    .map_err(|source| load::Error::Inflate { offset, source })?
            }
            RamRecord::Xbzrle { data, .. } => {
                self.page.fill(0);
                xbzrle::decode(data, &mut self.page)
                    .map_err(|source| load::Error::Xbzrle { offset, source })?;
            }
            _ => {}
        }
        Ok(())
    }
}

fn count(p: &mut Pages, rec: &RamRecord<'_>) {
    match rec {
        RamRecord::Zero { .. } => p.zero += 1,
        RamRecord::Page { .. } => p.raw += 1,
        RamRecord::Compressed { data, .. } => {
            p.compressed += 1;
            p.compressed_bytes += data.len() as u64;
        }
        RamRecord::Xbzrle { .. } => p.xbzrle += 1,
        RamRecord::MemSize(_) | RamRecord::Eos | RamRecord::MultifdFlush => {}
    }
}

/// Prints the report as a human-readable table.
pub fn print_table(r: &Report, out: &mut impl Write) -> io::Result<()> {
    writeln!(
        out,
        "QEVM version {}, machine {}, {} bytes{}",
        r.version,
        r.machine
            .as_deref()
            .map_or("(none)".into(), |m| format!("{m:?}")),
        r.bytes,
        if r.vmdesc { ", vmdesc trailer" } else { "" }
    )?;
    writeln!(
        out,
        "{:<6} {:>5}  {:<28} {:>4} {:>4}  {:>12} {:>12}",
        "type", "id", "idstr", "inst", "ver", "start", "end"
    )?;
    for SectionRow { header: s, end } in &r.sections {
        let kind = serde_json::to_value(s.kind).ok();
        writeln!(
            out,
            "{:<6} {:>5}  {:<28} {:>4} {:>4}  {:>12} {:>12}",
            kind.as_ref().and_then(|v| v.as_str()).unwrap_or("?"),
            s.id,
            s.idstr,
            s.instance,
            s.version,
            s.start,
            end
        )?;
    }
    if r.opaque_device_bytes > 0 {
        writeln!(
            out,
            "device state carried whole (no vmdesc sizes it): {} bytes",
            r.opaque_device_bytes
        )?;
    }
    for b in &r.ram_blocks {
        writeln!(out, "RAM block {:<28} {:>14} bytes", b.idstr, b.length)?;
    }
    let p = &r.pages;
    writeln!(
        out,
        "pages: {} zero, {} raw, {} compressed ({} bytes, ratio {:.2}), {} xbzrle",
        p.zero, p.raw, p.compressed, p.compressed_bytes, p.compressed_ratio, p.xbzrle
    )
}
