//! Two hosts on one machine, and the host-level faults around them. Needs root.
//!
//! - [`TwoHosts`]: two network namespaces (`ferry-<pid>-<n>-a` and `-b`) joined by a
//!   veth pair (`veth-a` 10.77.n.1/24 in A, `veth-b` 10.77.n.2/24 in B), both ends
//!   shaped with a `tbf` qdisc; the link can be reshaped or cut mid-run. Drop deletes
//!   both namespaces (which destroys the veth pair); namespaces left behind by a test
//!   process that was killed are swept by the next one.
//! - Processes run inside a namespace with [`crate::proc::Spawn::netns`].
//! - [`Tmpfs`]: a small tmpfs mounted on a directory (full-disk and read-only-file
//!   faults), unmounted on drop.
//! - [`established`]: whether a TCP connection on a port exists in a process's
//!   network namespace (`/proc/PID/net/tcp`).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use crate::bail;
use crate::error::{Context, Error, Result};
use crate::proc::wait_until;

/// Namespace pairs made by this process so far (part of their names).
static NEXT: AtomicU32 = AtomicU32::new(0);

/// Fails unless we run as root (namespaces, qdiscs and mounts need it).
pub fn require_root() -> Result<()> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("this test needs root: it creates network namespaces, qdiscs and mounts");
    }
    Ok(())
}

/// Runs `program args...` to completion; fails quoting its stderr.
pub fn run(program: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Two network namespaces joined by a shaped veth pair. Deleted on drop.
#[derive(Debug)]
pub struct TwoHosts {
    /// Namespace of host A (the source).
    pub a: String,
    /// Namespace of host B (the destination).
    pub b: String,
    /// A's address on the link, e.g. `10.77.3.1`.
    pub addr_a: String,
    /// B's address on the link, e.g. `10.77.3.2`.
    pub addr_b: String,
    /// Namespaces that exist (and must be deleted).
    made: Vec<String>,
}

/// The veth end inside A.
pub const DEV_A: &str = "veth-a";
/// The veth end inside B.
pub const DEV_B: &str = "veth-b";

impl TwoHosts {
    /// Creates the namespaces and the link, shaped to `rate` (tc syntax, e.g.
    /// `200mbit`) in both directions.
    pub fn new(rate: &str) -> Result<Self> {
        require_root()?;
        sweep_stale();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("ferry-{}-{n}", std::process::id());
        let subnet = format!("10.77.{}", n % 250);
        let mut hosts = TwoHosts {
            a: format!("{prefix}-a"),
            b: format!("{prefix}-b"),
            addr_a: format!("{subnet}.1"),
            addr_b: format!("{subnet}.2"),
            made: Vec::new(),
        };
        // On any failure below, dropping `hosts` deletes what was made.
        for ns in [hosts.a.clone(), hosts.b.clone()] {
            run("ip", &["netns", "add", &ns])?;
            hosts.made.push(ns);
        }
        let (a, b) = (hosts.a.as_str(), hosts.b.as_str());
        run(
            "ip",
            &[
                "link", "add", DEV_A, "netns", a, "type", "veth", "peer", "name", DEV_B, "netns", b,
            ],
        )?;
        for (ns, dev, addr) in [(a, DEV_A, &hosts.addr_a), (b, DEV_B, &hosts.addr_b)] {
            run(
                "ip",
                &["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev],
            )?;
            run("ip", &["-n", ns, "link", "set", "lo", "up"])?;
            run("ip", &["-n", ns, "link", "set", dev, "up"])?;
        }
        hosts.shape(rate)?;
        Ok(hosts)
    }

    /// (Re)shapes both ends of the link to `rate` with a token bucket
    /// (`tc qdisc replace ... root tbf rate RATE burst 1mb latency 50ms`).
    pub fn shape(&self, rate: &str) -> Result<()> {
        for (ns, dev) in [(&self.a, DEV_A), (&self.b, DEV_B)] {
            run(
                "ip",
                &[
                    "netns", "exec", ns, "tc", "qdisc", "replace", "dev", dev, "root", "tbf",
                    "rate", rate, "burst", "1mb", "latency", "50ms",
                ],
            )?;
        }
        Ok(())
    }

    /// Cuts the link: `ip link set veth-a down` inside A (B loses carrier too).
    pub fn cut(&self) -> Result<()> {
        run("ip", &["-n", &self.a, "link", "set", DEV_A, "down"])
    }

    /// `tcp:ADDR_B:PORT`, a listen address on host B.
    pub fn uri_b(&self, port: u16) -> String {
        format!("tcp:{}:{port}", self.addr_b)
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        for ns in self.made.drain(..) {
            let _ = run("ip", &["netns", "del", &ns]);
        }
    }
}

/// Deletes `ferry-<pid>-<n>-{a,b}` namespaces whose test process is gone (it was
/// killed before its drop guards ran).
fn sweep_stale() {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return;
    };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let parts: Vec<&str> = name.split('-').collect();
        let ours = parts.len() == 4
            && parts[0] == "ferry"
            && parts[2].bytes().all(|c| c.is_ascii_digit())
            && matches!(parts[3], "a" | "b");
        let Some(pid) = parts.get(1).and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if ours && !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = run("ip", &["netns", "del", name]);
        }
    }
}

/// A tmpfs mounted on a directory; unmounted on drop.
#[derive(Debug)]
pub struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// `mount -t tmpfs -o size=SIZE tmpfs DIR`, creating DIR.
    pub fn mount(dir: &Path, size: &str) -> Result<Self> {
        require_root()?;
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let d = dir
            .to_str()
            .ok_or_else(|| Error::msg("the mount point is not UTF-8"))?;
        run(
            "mount",
            &["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs", d],
        )?;
        Ok(Tmpfs {
            dir: dir.to_owned(),
        })
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Makes it read-only (`mount -o remount,ro`): even root cannot write.
    pub fn remount_ro(&self) -> Result<()> {
        let d = self
            .dir
            .to_str()
            .ok_or_else(|| Error::msg("the mount point is not UTF-8"))?;
        run("mount", &["-o", "remount,ro", d])
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let Some(d) = self.dir.to_str() else { return };
        if run("umount", &[d]).is_err() {
            // Still busy (a process that outlived the test): detach it now,
            // the kernel frees it when the last user is gone.
            let _ = run("umount", &["-l", d]);
        }
    }
}

/// True when an established TCP connection with local or remote `port`
/// exists in the network namespace of process `pid`.
pub fn established(pid: u32, port: u16) -> bool {
    let hex = format!(":{port:04X}");
    ["tcp", "tcp6"].iter().any(|t| {
        fs::read_to_string(format!("/proc/{pid}/net/{t}"))
            .unwrap_or_default()
            .lines()
            .skip(1)
            .any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 3 && f[3] == "01" && (f[1].ends_with(&hex) || f[2].ends_with(&hex))
            })
    })
}

/// Waits until [`established`] holds.
pub fn wait_established(pid: u32, port: u16, timeout: Duration) -> Result<()> {
    wait_until(timeout, &format!("a TCP connection on port {port}"), || {
        established(pid, port)
    })
}

/// The port of a `tcp:HOST:PORT` URI.
pub fn port_of(uri: &str) -> Result<u16> {
    uri.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| Error::msg(format!("{uri:?} has no port")))
}
