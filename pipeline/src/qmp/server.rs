//! The QMP server: a unix socket speaking QEMU's Machine Protocol, so that
//! QMP clients (QEMU's Python `qemu.qmp`, libvirt, `qapi` in Rust) drive
//! ferry as they drive QEMU (docs/interop/qmp-spec.rst): a greeting,
//! `qmp_capabilities` negotiation, one JSON object a request, `return` or
//! `error` answers with the request's `id`, and events with timestamps.
//!
//! Every client has a reader thread and a writer thread; answers and events
//! go through one bounded queue per client, so a client that stops reading
//! loses its connection but never holds up the migration. Requests are read
//! one line at a time, at most [`MAX_REQUEST`] bytes: a longer one is
//! skipped to its newline and answered with a GenericError.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use qapi::ErrorClass;
use serde_json::{json, Map, Value};

use super::commands::{self, Failure};
use super::{Control, Line};

/// Longest request line, bytes.
pub const MAX_REQUEST: usize = 1 << 20;
/// Answers and events queued for one client before it is dropped.
const QUEUE: usize = 1024;
/// How long a write to a client may block.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Errors of setting up the server.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `--qmp` is not `unix:PATH`.
    #[error("--qmp {0:?}: expected unix:PATH")]
    Uri(String),
    /// Something that is not a socket is in the way.
    #[error("--qmp {0}: the path exists and is not a socket")]
    NotSocket(PathBuf),
    /// A live server (another ferry, a QEMU) already answers there.
    #[error("--qmp {0}: another process is listening on this socket")]
    InUse(PathBuf),
    /// The socket cannot be bound.
    #[error("--qmp {path}: cannot listen")]
    Bind {
        /// The socket.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// `--qmp unix:PATH`: the socket path.
pub fn parse_uri(s: &str) -> Result<PathBuf, Error> {
    match s.strip_prefix("unix:") {
        Some(p) if !p.is_empty() => Ok(PathBuf::from(p)),
        _ => Err(Error::Uri(s.to_owned())),
    }
}

/// A listening QMP server; the socket file goes when it is dropped.
#[derive(Debug)]
pub struct Server {
    path: PathBuf,
}

impl Server {
    /// Listens on `path` (a stale socket there is replaced, a live one is
    /// refused: taking it over would cut a running migration's controller
    /// off) and serves every client on its own threads until the process exits.
    pub fn start(path: &Path, control: Arc<Control>) -> Result<Self, Error> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(Error::NotSocket(path.to_owned()));
            }
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                return Err(Error::InUse(path.to_owned()));
            }
            let _ = std::fs::remove_file(path);
        }
        let listener = UnixListener::bind(path).map_err(|source| Error::Bind {
            path: path.to_owned(),
            source,
        })?;
        std::thread::Builder::new()
            .name("qmp-accept".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    match conn {
                        Ok(s) => {
                            let c = control.clone();
                            let spawned = std::thread::Builder::new()
                                .name("qmp-client".into())
                                .spawn(move || {
                                    if let Err(e) = serve(s, &c) {
                                        tracing::debug!("QMP client: {e}");
                                    }
                                });
                            if let Err(e) = spawned {
                                tracing::warn!("QMP: cannot start a client thread: {e}");
                            }
                        }
                        Err(e) => tracing::warn!("QMP: accept failed: {e}"),
                    }
                }
            })
            .map_err(|source| Error::Bind {
                path: path.to_owned(),
                source,
            })?;
        Ok(Self {
            path: path.to_owned(),
        })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Serves one client until it disconnects.
fn serve(stream: UnixStream, control: &Arc<Control>) -> io::Result<()> {
    stream.set_write_timeout(Some(WRITE_TIMEOUT))?;
    let (tx, rx) = crossbeam_channel::bounded::<Line>(QUEUE);
    let mut out = stream.try_clone()?;
    let c = control.clone();
    let writer = std::thread::Builder::new()
        .name("qmp-write".into())
        .spawn(move || {
            let mut ok = true;
            for line in rx {
                if ok {
                    let text = line.text + "\r\n";
                    ok = out.write_all(text.as_bytes()).is_ok();
                    if !ok {
                        // The reader sees the closed socket too.
                        let _ = out.shutdown(std::net::Shutdown::Both);
                    }
                }
                if line.event {
                    c.written();
                }
            }
        })?;
    let greeting = json!({ "QMP": { "version": commands::version(), "capabilities": [] } });
    let _ = tx.send(Line {
        text: greeting.to_string(),
        event: false,
    });
    let mut reader = BufReader::new(stream);
    let mut negotiated = false;
    let mut subscribed = false;
    let mut line = Vec::new();
    loop {
        let answer = match read_request(&mut reader, &mut line) {
            Ok(Request::Eof) | Err(_) => break,
            Ok(Request::TooLong(n)) => Some(error(
                None,
                &Failure::generic(format!(
                    "JSON parse error, request of {n} bytes is longer than the {MAX_REQUEST} allowed"
                )),
            )),
            Ok(Request::Line) => answer(control, &line, &mut negotiated),
        };
        if let Some(text) = answer {
            if tx.try_send(Line { text, event: false }).is_err() {
                break; // not reading its answers
            }
        }
        if negotiated && !subscribed {
            // After the negotiation's answer: events never come before it.
            control.subscribe(tx.clone());
            subscribed = true;
        }
    }
    control.unsubscribe(&tx);
    drop(tx);
    let _ = writer.join();
    Ok(())
}

/// What one read gave.
#[derive(Debug, PartialEq, Eq)]
enum Request {
    /// A request is in the buffer: a balanced JSON object or array, or a
    /// line of anything else (which then fails to parse).
    Line,
    /// A request longer than [`MAX_REQUEST`] was skipped up to its newline:
    /// this many bytes.
    TooLong(usize),
    /// The client closed.
    Eof,
}

/// Where the splitter is inside a JSON text.
#[derive(Debug, Default)]
struct Depth {
    nesting: u32,
    in_string: bool,
    escaped: bool,
}

impl Depth {
    fn step(&mut self, b: u8) {
        if self.in_string {
            match (self.escaped, b) {
                (true, _) => self.escaped = false,
                (false, b'\\') => self.escaped = true,
                (false, b'"') => self.in_string = false,
                _ => {}
            }
            return;
        }
        match b {
            b'"' => self.in_string = true,
            b'{' | b'[' => self.nesting += 1,
            b'}' | b']' => self.nesting = self.nesting.saturating_sub(1),
            _ => {}
        }
    }

    fn outside(&self) -> bool {
        self.nesting == 0 && !self.in_string
    }
}

/// Reads one request into `msg`, as QEMU's JSON streamer splits its input:
/// by balanced braces, not by lines (`qemu.qmp` sends no newline). A request
/// longer than [`MAX_REQUEST`] is dropped byte by byte up to the next
/// newline, so memory stays bounded and the client can go on after it.
fn read_request(r: &mut impl BufRead, msg: &mut Vec<u8>) -> io::Result<Request> {
    msg.clear();
    let mut depth = Depth::default();
    let mut skipped = 0usize;
    loop {
        let buf = r.fill_buf()?;
        if buf.is_empty() {
            return Ok(match (skipped, msg.is_empty()) {
                (0, true) => Request::Eof,
                (0, false) => Request::Line,
                (n, _) => Request::TooLong(n),
            });
        }
        let mut used = 0;
        let mut done = None;
        for &b in buf {
            used += 1;
            if skipped > 0 {
                skipped += 1;
                if b == b'\n' {
                    done = Some(Request::TooLong(skipped));
                    break;
                }
                continue;
            }
            if msg.is_empty() && depth.outside() && b.is_ascii_whitespace() {
                continue; // between requests
            }
            depth.step(b);
            msg.push(b);
            if msg.len() > MAX_REQUEST {
                skipped = msg.len();
                msg.clear();
                if b == b'\n' {
                    done = Some(Request::TooLong(skipped));
                    break;
                }
            } else if depth.outside() && matches!(b, b'}' | b']' | b'\n') {
                done = Some(Request::Line);
                break;
            }
        }
        r.consume(used);
        if let Some(d) = done {
            return Ok(d);
        }
    }
}

/// The answer to one request line, if it gets one.
fn answer(control: &Arc<Control>, line: &[u8], negotiated: &mut bool) -> Option<String> {
    let v: Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(e) => {
            return Some(error(
                None,
                &Failure::generic(format!("JSON parse error, {e}")),
            ))
        }
    };
    let Value::Object(req) = v else {
        return Some(error(
            None,
            &Failure::generic("QMP input must be a JSON object"),
        ));
    };
    let id = req.get("id").cloned();
    let (name, args) = match parse(&req) {
        Ok(x) => x,
        Err(f) => return Some(error(id, &f)),
    };
    let result = if !*negotiated {
        if name == "qmp_capabilities" {
            capabilities(&args).map(|()| {
                *negotiated = true;
                json!({})
            })
        } else {
            Err(Failure {
                class: ErrorClass::CommandNotFound,
                desc: "Expecting capabilities negotiation with 'qmp_capabilities'".into(),
            })
        }
    } else if name == "qmp_capabilities" {
        Err(Failure {
            class: ErrorClass::CommandNotFound,
            desc: "Capabilities negotiation is already complete, command ignored".into(),
        })
    } else {
        commands::execute(control, &name, &args)
    };
    Some(match result {
        Ok(ret) => {
            let mut a = json!({ "return": ret });
            if let Some(id) = id {
                a["id"] = id;
            }
            a.to_string()
        }
        Err(f) => error(id, &f),
    })
}

/// The command name and arguments of a request object, checked as QEMU's
/// dispatcher checks them (qapi/qmp-dispatch.c).
fn parse(req: &Map<String, Value>) -> Result<(String, Map<String, Value>), Failure> {
    if req.contains_key("exec-oob") {
        return Err(Failure::generic("Out-of-band execution is not supported"));
    }
    if let Some(k) = req
        .keys()
        .find(|k| !matches!(k.as_str(), "execute" | "arguments" | "id"))
    {
        return Err(Failure::generic(format!(
            "QMP input member '{k}' is unexpected"
        )));
    }
    let name = match req.get("execute") {
        Some(Value::String(s)) => s.clone(),
        Some(_) => {
            return Err(Failure::generic(
                "QMP input member 'execute' must be a string",
            ))
        }
        None => return Err(Failure::generic("QMP input lacks member 'execute'")),
    };
    let args = match req.get("arguments") {
        None => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => {
            return Err(Failure::generic(
                "QMP input member 'arguments' must be an object",
            ))
        }
    };
    Ok((name, args))
}

/// qmp_capabilities' `enable`: ferry offers no capability (no out-of-band).
fn capabilities(args: &Map<String, Value>) -> Result<(), Failure> {
    for (k, v) in args {
        match (k.as_str(), v) {
            ("enable", Value::Array(caps)) => {
                if let Some(c) = caps.first() {
                    return Err(Failure::generic(format!(
                        "Capability '{}' not available",
                        c.as_str().unwrap_or("?")
                    )));
                }
            }
            _ => return Err(Failure::generic(format!("Parameter '{k}' is unexpected"))),
        }
    }
    Ok(())
}

/// An error answer, in qapi's form.
fn error(id: Option<Value>, f: &Failure) -> String {
    let e = qapi::Error {
        class: f.class.clone(),
        desc: f.desc.clone(),
        id,
    };
    serde_json::to_string(&e).expect("errors serialize")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(input: &[u8]) -> Vec<Result<String, usize>> {
        let mut r = BufReader::with_capacity(4096, input);
        let mut line = Vec::new();
        let mut got = Vec::new();
        loop {
            match read_request(&mut r, &mut line).unwrap() {
                Request::Eof => return got,
                Request::TooLong(n) => got.push(Err(n)),
                Request::Line => got.push(Ok(String::from_utf8(line.clone()).unwrap())),
            }
        }
    }

    #[test]
    fn requests_are_split_by_braces_and_a_long_one_is_skipped() {
        let mut input = b"{\"a\":\"}{\\\"\"}{\"n\":{\"m\":[1]}} \r\n".to_vec();
        input.extend(b"{\"s\":\"");
        input.extend(std::iter::repeat_n(b'x', MAX_REQUEST + 10));
        input.extend(b"\"}\nnot json\n{\"b\":2}{\"c\":3}");
        assert_eq!(
            read_all(&input),
            vec![
                Ok("{\"a\":\"}{\\\"\"}".into()),
                Ok("{\"n\":{\"m\":[1]}}".into()),
                Err(MAX_REQUEST + 19),
                Ok("not json\n".into()),
                Ok("{\"b\":2}".into()),
                Ok("{\"c\":3}".into())
            ]
        );
    }

    #[test]
    fn requests_are_checked_as_qemu_checks_them() {
        let p = |v: Value| parse(v.as_object().unwrap()).map_err(|f| f.desc);
        assert_eq!(
            p(json!({"arguments": {}})).unwrap_err(),
            "QMP input lacks member 'execute'"
        );
        assert_eq!(
            p(json!({"execute": 1})).unwrap_err(),
            "QMP input member 'execute' must be a string"
        );
        assert_eq!(
            p(json!({"execute": "x", "arguments": []})).unwrap_err(),
            "QMP input member 'arguments' must be an object"
        );
        assert_eq!(
            p(json!({"execute": "x", "foo": 1})).unwrap_err(),
            "QMP input member 'foo' is unexpected"
        );
        assert_eq!(p(json!({"execute": "x", "id": 7})).unwrap().0, "x");
    }
}
