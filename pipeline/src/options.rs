//! Values of command-line options shared by the subcommands: RAM files and rates.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::actors::blockio::queue::Driver;

/// `--ram PATH[,name=BLOCK]`: a RAM block backed by a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RamSpec {
    /// The file holding the block's bytes.
    pub path: PathBuf,
    /// The block's name in the stream (QEMU's RAMBlock idstr).
    pub name: String,
}

/// `--disk PATH[,name=DEV][,driver=io_uring|virtio-blk-vhost-user][,dirty-log=PATH]`:
/// a disk (a raw image, or a vhost-user-blk socket) and its device name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskSpec {
    /// The image file, or the vhost-user socket.
    pub path: PathBuf,
    /// The device name in the "block" section.
    pub name: String,
    /// The libblkio driver.
    pub driver: Driver,
    /// The disk's dirty log (one bit per 1 MiB chunk), for a live migration.
    pub dirty_log: Option<PathBuf>,
}

impl FromStr for DiskSpec {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ParseError::Disk(s.into());
        let mut parts = s.split(',');
        let path = parts.next().filter(|p| !p.is_empty()).ok_or_else(bad)?;
        let (mut name, mut driver, mut dirty_log) = (None, Driver::IoUring, None);
        for opt in parts {
            match opt.split_once('=') {
                Some(("name", n)) if !n.is_empty() => name = Some(n.to_owned()),
                Some(("driver", d)) => driver = d.parse().map_err(|_| bad())?,
                Some(("dirty-log", p)) if !p.is_empty() => dirty_log = Some(PathBuf::from(p)),
                _ => return Err(bad()),
            }
        }
        let path = PathBuf::from(path);
        let name = match name {
            Some(n) => n,
            None => stem(&path).ok_or_else(bad)?,
        };
        if name.len() > 255 {
            return Err(ParseError::NameTooLong(name));
        }
        Ok(DiskSpec {
            path,
            name,
            driver,
            dirty_log,
        })
    }
}

/// An option value that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// `--ram` is malformed.
    #[error("{0:?}: expected PATH[,name=BLOCK]")]
    Ram(String),
    /// `--disk` is malformed.
    #[error(
        "{0:?}: expected PATH[,name=DEV][,driver=io_uring|virtio-blk-vhost-user][,dirty-log=PATH]"
    )]
    Disk(String),
    /// A block name longer than a counted string allows.
    #[error("block name {0:?} is longer than 255 bytes")]
    NameTooLong(String),
    /// A rate is malformed.
    #[error(
        "{0:?}: expected bytes per second, optionally with a K, M, G or T suffix (0 = unlimited)"
    )]
    Rate(String),
    /// A size is malformed.
    #[error("{0:?}: expected a size in bytes, optionally with a K, M, G or T suffix")]
    Size(String),
}

impl FromStr for RamSpec {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut parts = s.split(',');
        let path = parts
            .next()
            .filter(|p| !p.is_empty())
            .ok_or_else(|| ParseError::Ram(s.into()))?;
        let mut name = None;
        for opt in parts {
            match opt.split_once('=') {
                Some(("name", n)) if !n.is_empty() => name = Some(n.to_owned()),
                _ => return Err(ParseError::Ram(s.into())),
            }
        }
        let path = PathBuf::from(path);
        let name = match name {
            Some(n) => n,
            None => stem(&path).ok_or_else(|| ParseError::Ram(s.into()))?,
        };
        if name.len() > 255 {
            return Err(ParseError::NameTooLong(name));
        }
        Ok(RamSpec { path, name })
    }
}

fn stem(path: &Path) -> Option<String> {
    path.file_stem()?.to_str().map(str::to_owned)
}

/// Parses a rate in bytes per second: `0`, `1000`, `512K`, `512M`, `1G`, `1T`
/// (binary multiples, as QEMU's size suffixes).
pub fn parse_rate(s: &str) -> Result<u64, ParseError> {
    bytes(s).ok_or_else(|| ParseError::Rate(s.to_owned()))
}

/// Parses a size in bytes, with the suffixes of [`parse_rate`].
pub fn parse_size(s: &str) -> Result<u64, ParseError> {
    bytes(s).ok_or_else(|| ParseError::Size(s.to_owned()))
}

/// The host's physical memory in bytes (the most guest RAM it can take).
pub fn host_memory() -> u64 {
    // SAFETY: sysconf takes a name and touches no memory of ours.
    let (pages, page_size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    match (u64::try_from(pages), u64::try_from(page_size)) {
        (Ok(pages), Ok(size)) if pages > 0 && size > 0 => pages.saturating_mul(size),
        // Unknown: no limit beyond what the files themselves allow.
        _ => u64::MAX,
    }
}

/// A count of bytes with an optional binary suffix, or None.
fn bytes(s: &str) -> Option<u64> {
    let t = s.trim();
    let (digits, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'B' => 1,
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return None,
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    if mult == 1 {
        // Exact, even above 2^53 (a default of u64::MAX reads back).
        if let Ok(n) = digits.parse::<u64>() {
            return Some(n);
        }
    }
    let n: f64 = digits.parse().ok()?;
    if !n.is_finite() || n < 0.0 || n * mult as f64 > u64::MAX as f64 {
        return None;
    }
    Some((n * mult as f64) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_spec_defaults_the_name_to_the_stem() {
        assert_eq!(
            "/dev/shm/guest.ram".parse(),
            Ok(RamSpec {
                path: "/dev/shm/guest.ram".into(),
                name: "guest".into()
            })
        );
        assert_eq!(
            "/x/a.img,name=pc.ram".parse::<RamSpec>().unwrap().name,
            "pc.ram"
        );
        assert!("".parse::<RamSpec>().is_err());
        assert!("/x,size=3".parse::<RamSpec>().is_err());
        assert!(format!("/x,name={}", "n".repeat(256))
            .parse::<RamSpec>()
            .is_err());
    }

    #[test]
    fn disk_spec_parses_its_options() {
        let d: DiskSpec = "/x/vda.img".parse().unwrap();
        assert_eq!(
            (d.name.as_str(), d.driver, d.dirty_log),
            ("vda", Driver::IoUring, None)
        );
        let d: DiskSpec = "/x/s.sock,name=disk0,driver=virtio-blk-vhost-user,dirty-log=/l"
            .parse()
            .unwrap();
        assert_eq!(d.name, "disk0");
        assert_eq!(d.driver, Driver::VirtioBlkVhostUser);
        assert_eq!(d.dirty_log, Some(PathBuf::from("/l")));
        assert!("/x,driver=nbd".parse::<DiskSpec>().is_err());
        assert!("/x,size=1".parse::<DiskSpec>().is_err());
    }

    #[test]
    fn rates_take_binary_suffixes() {
        assert_eq!(parse_rate("0"), Ok(0));
        assert_eq!(parse_rate("1000"), Ok(1000));
        assert_eq!(parse_rate("512M"), Ok(512 << 20));
        assert_eq!(parse_rate("1g"), Ok(1 << 30));
        assert_eq!(parse_rate("1.5K"), Ok(1536));
        for bad in ["", "M", "-1", "1Q", "abc", "1e400"] {
            assert!(parse_rate(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sizes_read_back_exactly() {
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert_eq!(parse_size(&u64::MAX.to_string()), Ok(u64::MAX));
        assert_eq!(parse_size("18446744073709551615"), Ok(u64::MAX));
        assert!(matches!(parse_size("4X"), Err(ParseError::Size(_))));
        assert!(host_memory() > 1 << 20, "a host has more than 1 MiB");
    }
}
