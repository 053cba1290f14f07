//! `ferry loadgen` guests and their control socket.
//!
//! - [`Loadgen`] / [`Guest`]: a synthetic guest started with its files in a test's
//!   directory (`NAME.ram`, `NAME.log`, `NAME.sock`, `NAME.err`, and with a disk
//!   `NAME.img`, `NAME.disk.log`), optionally inside a network namespace, logging
//!   at `info` (its stops and resumes show on stderr).
//! - [`GuestControl`]: a client of the control socket: QMP-style JSON lines, no
//!   greeting, one reply line per request. The socket serves one connection at a
//!   time, so while `ferry send` holds it [`Guest::status`] gets no answer: watch the
//!   guest's own log instead (`loadgen stopped` / `loadgen resumed`).
//! - [`dirty_bits`]: a dirty log file read bit by bit, to measure what the guest
//!   does from outside rather than by its own meter.

use std::ffi::OsString;
use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use crate::bail;
use crate::error::{Context, Error, Result};
use crate::proc::{ferry, Process};

/// How long a guest may take to answer on a connection a test holds.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// A `ferry loadgen` command line, not started yet.
#[derive(Debug, Clone)]
pub struct Loadgen {
    dir: PathBuf,
    name: String,
    ns: Option<String>,
    args: Vec<OsString>,
    disk: bool,
}

/// `ferry loadgen --size SIZE` with its files in `dir`, named after `name`.
pub fn loadgen(dir: &Path, name: &str, size: &str) -> Loadgen {
    Loadgen {
        dir: dir.to_owned(),
        name: name.to_owned(),
        ns: None,
        args: vec!["--size".into(), size.into()],
        disk: false,
    }
}

impl Loadgen {
    /// `--dirty-rate RATE` (bytes a second, with a unit: `4M`).
    pub fn rate(self, rate: &str) -> Self {
        self.args(&["--dirty-rate", rate])
    }

    /// Further loadgen arguments.
    pub fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(OsString::from));
        self
    }

    /// A disk image of `size` with its dirty log (`--disk NAME.img --disk-size SIZE
    /// --disk-dirty-log NAME.disk.log`).
    pub fn disk(mut self, size: &str) -> Self {
        self.disk = true;
        let (img, log) = (self.file("img"), self.file("disk.log"));
        self.args.extend([
            "--disk".into(),
            img.into(),
            "--disk-size".into(),
            size.into(),
            "--disk-dirty-log".into(),
            log.into(),
        ]);
        self
    }

    /// Runs it inside network namespace `ns` (None: here).
    pub fn netns(mut self, ns: Option<&str>) -> Self {
        self.ns = ns.map(str::to_owned);
        self
    }

    fn file(&self, ext: &str) -> PathBuf {
        self.dir.join(format!("{}.{ext}", self.name))
    }

    /// Starts it; returns once it says it is ready.
    pub fn start(self) -> Result<Guest> {
        let g = Guest {
            ram: self.file("ram"),
            log: self.file("log"),
            ctl: self.file("sock"),
            disk: self.disk.then(|| (self.file("img"), self.file("disk.log"))),
            proc: self.spawn()?,
        };
        Ok(g)
    }

    fn spawn(&self) -> Result<Process> {
        let control = format!("unix:{}", self.file("sock").display());
        let mut p = ferry(&[
            OsString::from("loadgen"),
            "--ram".into(),
            self.file("ram").into(),
            "--dirty-log".into(),
            self.file("log").into(),
            "--control".into(),
            control.into(),
        ])
        .args(&self.args)
        .netns(self.ns.as_deref())
        .info_log()
        .start(&self.file("err"))?;
        p.wait_for("ferry loadgen: ready:", Duration::from_secs(60))
            .context("starting ferry loadgen")?;
        Ok(p)
    }
}

/// A running `ferry loadgen` guest.
#[derive(Debug)]
pub struct Guest {
    /// The loadgen process (stderr at `info` level: stops and resumes).
    pub proc: Process,
    /// Its RAM file.
    pub ram: PathBuf,
    /// Its dirty log.
    pub log: PathBuf,
    /// Its control socket.
    pub ctl: PathBuf,
    /// Its disk image and the image's dirty log, if it has a disk.
    pub disk: Option<(PathBuf, PathBuf)>,
}

impl Guest {
    /// `ferry send` arguments for this guest: `--ram RAM,name=ram --dirty-log LOG
    /// --guest-control unix:CTL`.
    pub fn send_args(&self) -> Vec<String> {
        vec![
            "--ram".into(),
            format!("{},name=ram", self.ram.display()),
            "--dirty-log".into(),
            self.log.display().to_string(),
            "--guest-control".into(),
            format!("unix:{}", self.ctl.display()),
        ]
    }

    /// The disk image and its dirty log; panics for a guest without a disk.
    pub fn disk(&self) -> (&Path, &Path) {
        let (img, log) = self.disk.as_ref().expect("the guest has a disk");
        (img, log)
    }

    /// A control connection the test holds (panics if the guest does not accept).
    pub fn control(&self) -> GuestControl {
        GuestControl::connect(&self.ctl, REPLY_TIMEOUT)
            .unwrap_or_else(|e| panic!("connecting to the guest: {e}"))
    }

    /// `query-status`'s `status` (`running`, `paused`, `postmigrate`) on a
    /// connection of its own. Fails if the guest does not answer within 2 s (it
    /// serves one client at a time: a running `ferry send` holds it).
    pub fn status(&self) -> Result<String> {
        let mut c = GuestControl::connect(&self.ctl, Duration::from_secs(2))?;
        let v = c.execute("query-status", None)?;
        v["status"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| Error::msg(format!("query-status answered {v}")))
    }

    /// Waits until the status is `want`; fails with the last answer after `timeout`.
    pub fn wait_status(&self, want: &str, timeout: Duration) -> Result<()> {
        let mut last = None;
        crate::proc::wait_until(timeout, &format!("the guest to be {want}"), || {
            let got = self.status();
            let done = matches!(&got, Ok(s) if s == want);
            last = Some(got);
            done
        })
        .with_context(|| format!("last answer {last:?}"))
    }

    /// Its RAM as it is now.
    pub fn ram_bytes(&self) -> Vec<u8> {
        fs::read(&self.ram).expect("reading the guest's RAM file")
    }

    /// SIGTERM; returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        self.proc.signal(libc::SIGTERM);
        self.proc
            .wait(Duration::from_secs(10))
            .expect("ferry loadgen exits on SIGTERM")
    }
}

/// The bits of a dirty log file (one per page, or per 1 MiB chunk of a disk).
pub fn dirty_bits(log: &Path) -> Vec<bool> {
    let bytes = fs::read(log).expect("reading a dirty log");
    bytes
        .chunks_exact(8)
        .flat_map(|w| {
            let w = u64::from_le_bytes(w.try_into().expect("8 bytes"));
            (0..64).map(move |b| w >> b & 1 == 1)
        })
        .collect()
}

/// Samples `what` now and one second later: the two samples and the seconds
/// between them, for a rate measured from outside the guest.
pub fn over_a_second<T>(mut what: impl FnMut() -> T) -> (T, T, f64) {
    let (t0, before) = (std::time::Instant::now(), what());
    std::thread::sleep(Duration::from_secs(1));
    let after = what();
    (before, after, t0.elapsed().as_secs_f64())
}

/// Measures a rate (`measure`, MiB/s) unthrottled, at each throttle of
/// `levels`, and back at 0, letting each setting settle for 300 ms. Panics
/// unless the unthrottled rates are within a factor of 1.5 of `set` and each
/// throttled one is within its range of ratios to the unthrottled rate.
/// Generous on purpose: what is checked is that the throttle takes effect in
/// proportion, on a machine that may be busy, not how precisely.
pub fn check_throttle(
    g: &Guest,
    set: f64,
    levels: &[(u32, std::ops::RangeInclusive<f64>)],
    mut measure: impl FnMut() -> f64,
) {
    let mut c = g.control();
    let mut at = |percent: u32| {
        c.command("set-throttle", Some(json!({ "percent": percent })));
        assert_eq!(c.status()["throttle-percent"], percent);
        std::thread::sleep(Duration::from_millis(300));
        measure()
    };
    let full = at(0);
    let throttled: Vec<(u32, f64)> = levels.iter().map(|(p, _)| (*p, at(*p))).collect();
    let back = at(0);
    eprintln!("unthrottled {full:.1}, {throttled:?}, back to 0: {back:.1} MiB/s");
    for (what, rate) in [("unthrottled", full), ("back to 0", back)] {
        assert!(
            (set / 1.5..=set * 1.5).contains(&rate),
            "{what}: {rate:.1} MiB/s, set {set}"
        );
    }
    for ((percent, rate), (_, range)) in throttled.iter().zip(levels) {
        assert!(
            range.contains(&(rate / full)),
            "throttle {percent}%: {rate:.1} MiB/s (unthrottled {full:.1})"
        );
    }
}

/// How many page writes, spread uniformly at random over the pages of a
/// dirty log region, turn the set bits `before` into those `after` (bits are
/// only ever set): `k` writes leave a clean page clean with probability
/// `(1 - 1/n)^k ~ e^(-k/n)`, so `k = n ln(clean before / clean after)`. This
/// measures a guest's write rate from outside, by its effect, where its own
/// meter could be wrong; it is exact for uniform writes while few bits are
/// set and degrades as the region fills, so keep the region under about half full.
pub fn page_writes(before: &[bool], after: &[bool]) -> f64 {
    let n = before.len() as f64;
    let clean = |bits: &[bool]| bits.iter().filter(|&&d| !d).count() as f64;
    let (c0, c1) = (clean(before), clean(after));
    assert!(
        c1 >= 1.0,
        "the region filled up: measure a shorter interval"
    );
    n * (c0 / c1).ln()
}

/// A client of a guest's control socket.
#[derive(Debug)]
pub struct GuestControl {
    /// The reading half, for tests that read raw lines.
    pub reader: BufReader<UnixStream>,
    /// The writing half, for tests that send raw bytes.
    pub writer: UnixStream,
}

impl GuestControl {
    /// Connects; each reply may then take up to `timeout`.
    pub fn connect(sock: &Path, timeout: Duration) -> Result<GuestControl> {
        let s = UnixStream::connect(sock)
            .with_context(|| format!("connecting to {}", sock.display()))?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        Ok(GuestControl {
            reader: BufReader::new(s.try_clone()?),
            writer: s,
        })
    }

    /// Sends `bytes` (a newline is added) and returns the reply line as JSON.
    pub fn raw(&mut self, bytes: &[u8]) -> Result<Value> {
        self.writer.write_all(bytes)?;
        self.writer.write_all(b"\n")?;
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .context("the guest did not answer (is another client connected?)")?;
        if n == 0 {
            bail!("the control socket closed instead of replying");
        }
        serde_json::from_str(&line).with_context(|| format!("reply {line:?} is not JSON"))
    }

    /// Runs `command`; returns its `return` value, or fails with the error reply.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        let mut request = json!({ "execute": command });
        if let Some(a) = arguments {
            request["arguments"] = a;
        }
        let reply = self.raw(request.to_string().as_bytes())?;
        match reply.get("return") {
            Some(r) => Ok(r.clone()),
            None => bail!("{command} failed: {reply}"),
        }
    }

    /// `query-status`'s whole answer.
    pub fn status(&mut self) -> Value {
        self.execute("query-status", None)
            .unwrap_or_else(|e| panic!("query-status: {e}"))
    }

    /// Runs `command`, which must answer `{}`.
    pub fn command(&mut self, command: &str, arguments: Option<Value>) {
        let r = self
            .execute(command, arguments)
            .unwrap_or_else(|e| panic!("{command}: {e}"));
        assert_eq!(r, json!({}), "{command} answered {r}");
    }
}
