//! Applying RAM records to guest memory backed by files.
//!
//! Each RAM block is a file of the block's length mapped shared, so what the
//! loader writes is what a VMM (or `cmp`) sees. Files are created sparse: a
//! block the stream announces costs disk and memory only for pages it sends.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use flate2::Decompress;
use memmap2::MmapMut;

use super::parse::RamRecord;
use super::{xbzrle, RamBlockInfo, PAGE_SIZE};
use crate::compress;

/// Errors of loading RAM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A RAM file could not be created, sized or mapped.
    #[error("RAM file {path} cannot be prepared")]
    File {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
    /// A RAM file has another size than the block the stream announces.
    #[error("RAM file {path} is {actual} bytes but block {idstr:?} is {expected}")]
    SizeMismatch {
        /// The file.
        path: PathBuf,
        /// The block.
        idstr: String,
        /// The block's length.
        expected: u64,
        /// The file's length.
        actual: u64,
    },
    /// The stream announces a block the destination has no file for.
    #[error("stream has RAM block {0:?}, which the destination does not have")]
    UnknownBlock(String),
    /// A compressed page does not inflate to one page.
    #[error("at byte {offset}: compressed page cannot be inflated")]
    Inflate {
        /// Offset of the record.
        offset: u64,
        /// Why.
        #[source]
        source: compress::Error,
    },
    /// An XBZRLE delta does not apply.
    #[error("at byte {offset}: XBZRLE page cannot be decoded")]
    Xbzrle {
        /// Offset of the record.
        offset: u64,
        /// Why.
        #[source]
        source: xbzrle::Error,
    },
    /// Two blocks would be extracted to the same file.
    #[error("RAM blocks {a:?} and {b:?} would both be written to {file}")]
    NameCollision {
        /// The file name.
        file: String,
        /// One block.
        a: String,
        /// The other.
        b: String,
    },
    /// A page record arrived before the block list.
    #[error("RAM page arrived before the block list")]
    NoBlocks,
    /// Writing the mapping back failed.
    #[error("RAM file {path} cannot be synced")]
    Sync {
        /// The file.
        path: PathBuf,
        /// What the OS said.
        #[source]
        source: io::Error,
    },
}

/// Result of loading.
pub type Result<T> = std::result::Result<T, Error>;

struct Block {
    info: RamBlockInfo,
    path: PathBuf,
    map: MmapMut,
    /// The file was created here, so every page not yet written reads zero.
    fresh: bool,
    /// Pages written so far in a fresh file, as 512-page bitmaps by 2 MiB
    /// region: sized by what the stream sends, never by what it claims.
    written: std::collections::HashMap<u64, [u64; 8]>,
}

impl Block {
    /// Records that the page at `offset` was written.
    fn mark_written(&mut self, offset: u64) {
        if self.fresh {
            let page = offset / PAGE_SIZE as u64;
            let bits = self.written.entry(page / 512).or_default();
            bits[(page % 512 / 64) as usize] |= 1 << (page % 64);
        }
    }

    /// True when the page at `offset` of a fresh file was never written, so it
    /// reads zero without being touched (and allocated).
    fn untouched(&self, offset: u64) -> bool {
        let page = offset / PAGE_SIZE as u64;
        self.fresh
            && self
                .written
                .get(&(page / 512))
                .is_none_or(|bits| bits[(page % 512 / 64) as usize] & (1 << (page % 64)) == 0)
    }
}

/// Guest RAM as a set of shared file mappings, one per RAM block.
pub struct RamImage {
    blocks: Vec<Block>,
    inflater: Decompress,
}

impl std::fmt::Debug for RamImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.blocks.iter().map(|b| (&b.info.idstr, &b.path)))
            .finish()
    }
}

/// The file name a block is extracted to: its idstr with `/` made safe.
pub fn block_file_name(idstr: &str) -> String {
    let name: String = idstr
        .trim_start_matches('/')
        .chars()
        .map(|c| if c == '/' { '_' } else { c })
        .collect();
    format!("{name}.ram")
}

fn map_file(path: &Path, info: &RamBlockInfo, create: bool) -> Result<Block> {
    let err = |source| Error::File {
        path: path.to_owned(),
        source,
    };
    // Only a file this call creates is sized: an existing file of another
    // size is a mismatch between the two ends, never silently resized.
    let exists = path.exists();
    let file: File = OpenOptions::new()
        .read(true)
        .write(true)
        .create(create)
        .truncate(false)
        .open(path)
        .map_err(err)?;
    let actual = file.metadata().map_err(err)?.len();
    if !exists && actual == 0 {
        file.set_len(info.length).map_err(err)?;
    } else if actual != info.length {
        return Err(Error::SizeMismatch {
            path: path.to_owned(),
            idstr: info.idstr.clone(),
            expected: info.length,
            actual,
        });
    }
    // SAFETY: the mapping is shared with the file, which ferry owns for the
    // run; other processes that map it (a VMM, a test) only read it or write
    // whole pages, and every access here goes through bounds-checked slices.
    let map = unsafe { MmapMut::map_mut(&file) }.map_err(err)?;
    Ok(Block {
        info: info.clone(),
        path: path.to_owned(),
        map,
        fresh: !exists,
        written: Default::default(),
    })
}

/// The page at `offset` of block `block`. The parser has checked the bounds.
fn page(blocks: &mut [Block], block: usize, offset: u64) -> Result<&mut [u8; PAGE_SIZE]> {
    let b = blocks.get_mut(block).ok_or(Error::NoBlocks)?;
    b.mark_written(offset);
    let start = offset as usize;
    let slice = &mut b.map[start..start + PAGE_SIZE];
    Ok(slice.try_into().expect("slice is one page long"))
}

impl RamImage {
    /// Creates `DIR/<idstr>.ram` for every block; the files must not exist yet.
    pub fn create_in_dir(dir: &Path, blocks: &[RamBlockInfo]) -> Result<Self> {
        let mut names: Vec<(String, &str)> = Vec::new();
        for b in blocks {
            let file = block_file_name(&b.idstr);
            // Two blocks in one file would truncate each other's mapping.
            if let Some((_, other)) = names.iter().find(|(f, _)| *f == file) {
                return Err(Error::NameCollision {
                    file,
                    a: (*other).to_owned(),
                    b: b.idstr.clone(),
                });
            }
            names.push((file, &b.idstr));
        }
        let blocks = blocks
            .iter()
            .zip(&names)
            .map(|(b, (file, _))| {
                // Extraction starts from zero: pages the stream never sends are zero.
                let path = dir.join(file);
                match std::fs::remove_file(&path) {
                    Err(e) if e.kind() != io::ErrorKind::NotFound => {
                        Err(Error::File { path, source: e })
                    }
                    _ => map_file(&path, b, true),
                }
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            blocks,
            inflater: compress::decompressor(),
        })
    }

    /// Maps existing files for the announced blocks. `files` pairs block names
    /// with paths; every announced block needs one, of exactly its length, or
    /// is created at that length when `create` is set.
    pub fn open(
        files: &[(String, PathBuf)],
        blocks: &[RamBlockInfo],
        create: bool,
    ) -> Result<Self> {
        let blocks = blocks
            .iter()
            .map(|b| {
                let (_, path) = files
                    .iter()
                    .find(|(name, _)| *name == b.idstr)
                    .ok_or_else(|| Error::UnknownBlock(b.idstr.clone()))?;
                map_file(path, b, create)
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            blocks,
            inflater: compress::decompressor(),
        })
    }

    /// Applies one record; `offset` is its place in the stream, for errors.
    pub fn apply(&mut self, record: &RamRecord<'_>, offset: u64) -> Result<()> {
        match *record {
            RamRecord::MemSize(_) | RamRecord::Eos => {}
            RamRecord::Zero {
                block,
                offset: at,
                fill,
            } => {
                let b = self.blocks.get(block).ok_or(Error::NoBlocks)?;
                // A zero page never written in a new file is already zero:
                // reading it would only allocate it.
                if fill == 0 && b.untouched(at) {
                    return Ok(());
                }
                let page = page(&mut self.blocks, block, at)?;
                if fill != 0 || !crate::stream::encode::is_zero(page) {
                    page.fill(fill);
                }
            }
            RamRecord::Page {
                block,
                offset: at,
                data,
            } => page(&mut self.blocks, block, at)?.copy_from_slice(data),
            RamRecord::Compressed {
                block,
                offset: at,
                data,
            } => {
                let page = page(&mut self.blocks, block, at)?;
                compress::inflate_page(&mut self.inflater, data, page)
                    .map_err(|source| Error::Inflate { offset, source })?;
            }
            RamRecord::Xbzrle {
                block,
                offset: at,
                data,
            } => {
                xbzrle::decode(data, page(&mut self.blocks, block, at)?)
                    .map_err(|source| Error::Xbzrle { offset, source })?;
            }
        }
        Ok(())
    }

    /// The blocks and the files behind them.
    pub fn files(&self) -> impl Iterator<Item = (&RamBlockInfo, &Path)> {
        self.blocks.iter().map(|b| (&b.info, b.path.as_path()))
    }

    /// Writes the mappings back to their files.
    pub fn sync(&self) -> Result<()> {
        for b in &self.blocks {
            b.map.flush().map_err(|source| Error::Sync {
                path: b.path.clone(),
                source,
            })?;
        }
        Ok(())
    }
}
