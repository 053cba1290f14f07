//! The guest's control socket, from the migration's side: stop, cont,
//! throttle, status and the device state after `stop`, as QMP-style JSON
//! lines (see the guest contract in the README).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

/// How long the guest may take to answer; `stop` parks every vCPU first.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest device state ferry takes from a guest: QEMU's whole device
/// state (without RAM) is well under a megabyte; a larger file is a fault,
/// not something to hold in memory and push through the writer's mailbox.
pub const MAX_DEVICE_STATE: u64 = 64 << 20;

/// Errors of talking to the guest.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The socket cannot be reached or broke.
    #[error("guest control socket {path} failed")]
    Io {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The guest closed the connection: it is gone.
    #[error("the guest closed its control socket {0} (has it exited?)")]
    Closed(PathBuf),
    /// The guest refused a command.
    #[error("the guest refused {command}: {desc}")]
    Refused {
        /// The command.
        command: String,
        /// Its error class (QMP's: `GenericError`, `CommandNotFound`, ...).
        class: String,
        /// Its error description.
        desc: String,
    },
    /// The device state the guest saved cannot be read.
    #[error("cannot read the device state the guest saved to {path}")]
    DeviceStateRead {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The device state the guest saved is larger than ferry takes.
    #[error("the device state the guest saved is over {MAX_DEVICE_STATE} bytes")]
    DeviceStateTooLarge,
    /// The guest answered something that is not a QMP reply.
    #[error("the guest sent an unreadable reply to {command}: {line:?}")]
    BadReply {
        /// The command.
        command: String,
        /// What it sent.
        line: String,
    },
}

/// A connection to a guest's control socket.
#[derive(Debug)]
pub struct Guest {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// True between a successful `stop` and the next `cont`.
    stopped: bool,
}

impl Guest {
    /// Connects to `unix:PATH` (or a bare path).
    pub fn connect(uri: &str) -> Result<Self, Error> {
        let path = Path::new(uri.strip_prefix("unix:").unwrap_or(uri)).to_owned();
        let io = |source| Error::Io {
            path: path.clone(),
            source,
        };
        let s = UnixStream::connect(&path).map_err(io)?;
        s.set_read_timeout(Some(REPLY_TIMEOUT)).map_err(io)?;
        let reader = BufReader::new(s.try_clone().map_err(io)?);
        Ok(Self {
            path,
            reader,
            writer: s,
            stopped: false,
        })
    }

    fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, Error> {
        let io = |source| Error::Io {
            path: self.path.clone(),
            source,
        };
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        writeln!(self.writer, "{msg}").map_err(io)?;
        let mut line = String::new();
        let n = (&mut self.reader)
            .take(1 << 20)
            .read_line(&mut line)
            .map_err(|source| Error::Io {
                path: self.path.clone(),
                source,
            })?;
        if n == 0 {
            return Err(Error::Closed(self.path.clone()));
        }
        let bad = || Error::BadReply {
            command: command.to_owned(),
            line: line.chars().take(200).collect(),
        };
        let v: Value = serde_json::from_str(&line).map_err(|_| bad())?;
        if let Some(r) = v.get("return") {
            return Ok(r.clone());
        }
        match v.get("error") {
            Some(e) => Err(Error::Refused {
                command: command.to_owned(),
                class: e["class"].as_str().unwrap_or("GenericError").to_owned(),
                desc: e["desc"].as_str().unwrap_or("no description").to_owned(),
            }),
            None => Err(bad()),
        }
    }

    /// Stops the guest; returns once it no longer writes memory.
    pub fn stop(&mut self) -> Result<(), Error> {
        self.execute("stop", None)?;
        self.stopped = true;
        Ok(())
    }

    /// Tells a stopped guest that it now runs on the destination, so that it
    /// stays stopped when ferry disconnects (QEMU's postmigrate).
    pub fn migrated(&mut self) -> Result<(), Error> {
        self.execute("migrated", None).map(drop)
    }

    /// Resumes the guest.
    pub fn cont(&mut self) -> Result<(), Error> {
        self.execute("cont", None)?;
        self.stopped = false;
        Ok(())
    }

    /// Whether ferry stopped the guest and has not resumed it.
    pub fn is_stopped(&self) -> bool {
        self.stopped
    }

    /// Throttles the guest's vCPUs to `percent` (0 = full speed).
    pub fn set_throttle(&mut self, percent: u32) -> Result<(), Error> {
        self.execute("set-throttle", Some(json!({ "percent": percent })))
            .map(drop)
    }

    /// The guest's status object.
    pub fn query_status(&mut self) -> Result<Value, Error> {
        self.execute("query-status", None)
    }

    /// Has the stopped guest write its device state (the format of `ferry
    /// send --device-state`) into a file in `dir`, and returns its bytes, at
    /// most [`MAX_DEVICE_STATE`]. `None`: the guest has no
    /// `save-device-state` (its error class is `CommandNotFound`), so the
    /// state given at the start, if any, is all there is.
    pub fn save_device_state(&mut self, dir: &Path) -> Result<Option<Vec<u8>>, Error> {
        let file = tempfile::Builder::new()
            .prefix("ferry-device-state-")
            .tempfile_in(dir)
            .map_err(|source| Error::DeviceStateRead {
                path: dir.to_owned(),
                source,
            })?;
        let path = std::path::absolute(file.path()).unwrap_or_else(|_| file.path().to_owned());
        let arguments = json!({ "path": path.to_string_lossy() });
        match self.execute("save-device-state", Some(arguments)) {
            Err(Error::Refused { class, .. }) if class == "CommandNotFound" => return Ok(None),
            other => other?,
        };
        let read_err = |source| Error::DeviceStateRead {
            path: path.clone(),
            source,
        };
        // The guest may have replaced the file: read it by its path.
        let mut bytes = Vec::new();
        std::fs::File::open(&path)
            .and_then(|f| f.take(MAX_DEVICE_STATE + 1).read_to_end(&mut bytes))
            .map_err(read_err)?;
        if bytes.len() as u64 > MAX_DEVICE_STATE {
            return Err(Error::DeviceStateTooLarge);
        }
        Ok(Some(bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// Whether a `save_device_state` result is the expected one.
    type Check = fn(Result<Option<Vec<u8>>, Error>) -> bool;

    /// A VMM that answers one request with `reply`, first writing `size`
    /// bytes to the path the request names (if `size` is set).
    fn vmm(dir: &Path, reply: &'static str, size: Option<u64>) -> std::thread::JoinHandle<()> {
        let sock = dir.join("ctl");
        let listener = UnixListener::bind(&sock).unwrap();
        std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut line = String::new();
            BufReader::new(&s).read_line(&mut line).unwrap();
            let req: Value = serde_json::from_str(&line).unwrap();
            assert_eq!(req["execute"], "save-device-state");
            if let Some(size) = size {
                let f = std::fs::File::create(req["arguments"]["path"].as_str().unwrap()).unwrap();
                f.set_len(size).unwrap();
            }
            writeln!(&s, "{reply}").unwrap();
        })
    }

    #[test]
    fn save_device_state_reads_the_file_bounded_and_tells_a_missing_command() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("ctl");
        let cases: [(&str, Option<u64>, Check); 4] = [
            (
                r#"{"return":{}}"#,
                Some(100),
                |r| matches!(r, Ok(Some(b)) if b == vec![0; 100]),
            ),
            (
                r#"{"error":{"class":"CommandNotFound","desc":"no"}}"#,
                None,
                |r| matches!(r, Ok(None)),
            ),
            (
                r#"{"error":{"class":"GenericError","desc":"no"}}"#,
                None,
                |r| matches!(r, Err(Error::Refused { .. })),
            ),
            (r#"{"return":{}}"#, Some(MAX_DEVICE_STATE + 1), |r| {
                matches!(r, Err(Error::DeviceStateTooLarge))
            }),
        ];
        for (reply, size, ok) in cases {
            let _ = std::fs::remove_file(&sock);
            let t = vmm(dir.path(), reply, size);
            let mut g = Guest::connect(sock.to_str().unwrap()).unwrap();
            let r = g.save_device_state(dir.path());
            t.join().unwrap();
            assert!(ok(r), "{reply} {size:?}");
        }
    }
}
