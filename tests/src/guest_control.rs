//! The guest's control socket from a test: QMP-style JSON lines, as `ferry
//! loadgen` serves them.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

/// Bytes in a MiB, for rates.
const MIB: f64 = (1u64 << 20) as f64;

/// How long the guest may take to answer.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// A client of a guest's control socket (no greeting; one reply line per
/// request), as `ferry loadgen` serves it. Panics on failure: it is for tests.
#[derive(Debug)]
pub struct GuestControl {
    /// The reading half, for tests that read raw lines.
    pub reader: BufReader<UnixStream>,
    /// The writing half, for tests that send raw bytes.
    pub writer: UnixStream,
}

impl GuestControl {
    pub fn connect(sock: &Path) -> GuestControl {
        let s = UnixStream::connect(sock)
            .unwrap_or_else(|e| panic!("connecting to {}: {e}", sock.display()));
        s.set_read_timeout(Some(REPLY_TIMEOUT)).unwrap();
        GuestControl {
            reader: BufReader::new(s.try_clone().unwrap()),
            writer: s,
        }
    }

    /// Sends `bytes` (a newline is added) and returns the reply line as JSON.
    pub fn raw(&mut self, bytes: &[u8]) -> Value {
        self.writer.write_all(bytes).unwrap();
        self.writer.write_all(b"\n").unwrap();
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .expect("a reply within the timeout");
        assert!(n > 0, "the control socket closed instead of replying");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("reply {line:?} is not JSON: {e}"))
    }

    /// Runs `command`; returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Value {
        let mut request = json!({ "execute": command });
        if let Some(a) = arguments {
            request["arguments"] = a;
        }
        let reply = self.raw(request.to_string().as_bytes());
        match reply.get("return") {
            Some(r) => r.clone(),
            None => panic!("{command} failed: {reply}"),
        }
    }

    pub fn status(&mut self) -> Value {
        self.execute("query-status", None)
    }

    pub fn pages_written(&mut self) -> u64 {
        self.status()["pages-written"]
            .as_u64()
            .expect("pages-written")
    }

    pub fn rate_mib(&mut self) -> f64 {
        self.status()["dirty-rate"].as_f64().expect("dirty-rate") / MIB
    }

    /// Bytes the guest's disk writer has written.
    pub fn disk_bytes(&mut self) -> u64 {
        self.status()["disk-bytes-written"]
            .as_u64()
            .expect("disk-bytes-written")
    }

    /// The guest's measured disk write rate, MiB/s.
    pub fn disk_rate_mib(&mut self) -> f64 {
        self.status()["disk-rate"].as_f64().expect("disk-rate") / MIB
    }
}
