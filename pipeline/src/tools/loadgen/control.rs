//! The guest's control socket: QMP-style JSON lines, one connection at a time.
//!
//! Requests are `{"execute": NAME, "arguments": {...}}` (an `"id"` is echoed
//! back, as QMP does); every request gets exactly one reply line,
//! `{"return": {...}}` or `{"error": {"class": CLASS, "desc": ...}}`, CLASS
//! `CommandNotFound` for an unknown command (as QMP, so that ferry can tell a
//! VMM without a command from one that refused it) and `GenericError`
//! otherwise. There is no greeting: the guest contract is the four commands,
//! plus `migrated`, which a completed migration sends so that the stopped
//! guest stays stopped, like QEMU's postmigrate, and `save-device-state`,
//! which writes the device state of the stopped guest to a file; ferry's
//! client (`orchestrator::guest`) reads one reply per request.
//! `qmp_capabilities` is accepted and does nothing, for QMP clients.
//!
//! Nothing a client sends may crash or wedge the guest: lines are bounded
//! ([`MAX_LINE`]), reads and writes have timeouts, and a client that
//! disconnects while the guest is stopped gets the guest resumed, so a
//! migration that died never leaves it paused.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::thread;
use std::time::{Duration, Instant};

use ferry_proto::qemu_file::QemuFileWriter;
use ferry_proto::stream::encode;
use ferry_proto::stream::SectionKind;
use ferry_proto::transport::MemTransport;
use serde_json::{json, Map, Value};

use super::meter::Meters;
use super::writers::Vcpus;

/// The longest request line accepted; longer ones are answered with an
/// error and skipped.
pub(crate) const MAX_LINE: usize = 64 << 10;

/// How often an idle listener or connection looks for a shutdown.
const POLL: Duration = Duration::from_millis(50);

/// A client that does not read its replies for this long is dropped.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves connections on `listener`, one after the other, until shutdown.
pub(crate) fn serve(listener: &UnixListener, vcpus: &Vcpus, meters: &Meters) {
    // Non-blocking, so that a shutdown is noticed without a client.
    if let Err(e) = listener.set_nonblocking(true) {
        eprintln!("ferry loadgen: control socket: {e}; shutdown may wait for a connection");
    }
    while !vcpus.is_shut_down() {
        match listener.accept() {
            Ok((stream, _)) => session(&stream, vcpus, meters),
            Err(e) if e.kind() == ErrorKind::WouldBlock => thread::sleep(POLL),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                eprintln!("ferry loadgen: control socket: accept failed: {e}");
                thread::sleep(POLL);
            }
        }
    }
}

/// Serves one connection until it closes (or shutdown); then resumes the
/// guest if the connection left it stopped.
fn session(stream: &UnixStream, vcpus: &Vcpus, meters: &Meters) {
    converse(stream, vcpus, meters);
    if !vcpus.is_shut_down() && vcpus.is_paused() && !vcpus.is_migrated() {
        vcpus.cont();
        eprintln!(
            "ferry loadgen: the control connection closed while the guest was stopped: \
             resuming it"
        );
    }
}

fn converse(mut stream: &UnixStream, vcpus: &Vcpus, meters: &Meters) {
    let setup = stream
        .set_nonblocking(false)
        .and_then(|()| stream.set_read_timeout(Some(POLL)))
        .and_then(|()| stream.set_write_timeout(Some(WRITE_TIMEOUT)));
    if let Err(e) = setup {
        eprintln!("ferry loadgen: control connection: {e}; closing it");
        return;
    }
    let mut lines = Lines::default();
    let mut buf = [0u8; 4096];
    let mut got = Vec::new();
    while !vcpus.is_shut_down() {
        let n = match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(_) => return,
        };
        lines.push(&buf[..n], &mut got);
        for line in got.drain(..) {
            let reply = match line {
                Line::Complete(text) if text.iter().all(u8::is_ascii_whitespace) => continue,
                Line::Complete(text) => request(&text, vcpus, meters),
                Line::TooLong => {
                    error_reply(None, format!("request longer than {MAX_LINE} bytes").into())
                }
            };
            let mut out = reply.to_string();
            out.push('\n');
            if stream.write_all(out.as_bytes()).is_err() {
                return;
            }
        }
    }
}

/// What [`Lines::push`] found.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    /// A line without its newline.
    Complete(Vec<u8>),
    /// A line over [`MAX_LINE`] bytes (reported once; the rest of it is
    /// dropped up to its newline).
    TooLong,
}

/// Splits a byte stream into lines of at most [`MAX_LINE`] bytes.
#[derive(Debug, Default)]
struct Lines {
    partial: Vec<u8>,
    /// Inside an over-long line that was reported already.
    discarding: bool,
}

impl Lines {
    fn push(&mut self, mut data: &[u8], out: &mut Vec<Line>) {
        while let Some(i) = data.iter().position(|&b| b == b'\n') {
            let part = &data[..i];
            if self.discarding {
                self.discarding = false;
            } else if self.partial.len() + part.len() > MAX_LINE {
                out.push(Line::TooLong);
            } else {
                self.partial.extend_from_slice(part);
                out.push(Line::Complete(std::mem::take(&mut self.partial)));
            }
            self.partial.clear();
            data = &data[i + 1..];
        }
        if !self.discarding {
            if self.partial.len() + data.len() > MAX_LINE {
                out.push(Line::TooLong);
                self.partial.clear();
                self.discarding = true;
            } else {
                self.partial.extend_from_slice(data);
            }
        }
    }
}

/// Answers one request line.
fn request(line: &[u8], vcpus: &Vcpus, meters: &Meters) -> Value {
    match serde_json::from_slice::<Value>(line) {
        Err(e) => error_reply(None, format!("malformed JSON: {e}").into()),
        Ok(v) => {
            let id = v.get("id").cloned();
            match execute(&v, vcpus, meters) {
                Ok(r) => with_id(json!({ "return": r }), id),
                Err(desc) => error_reply(id, desc),
            }
        }
    }
}

fn with_id(mut reply: Value, id: Option<Value>) -> Value {
    if let Some(id) = id {
        reply["id"] = id;
    }
    reply
}

/// A refused request: QMP's error class and a description.
#[derive(Debug)]
struct Refusal {
    class: &'static str,
    desc: String,
}

impl From<String> for Refusal {
    fn from(desc: String) -> Self {
        Self {
            class: "GenericError",
            desc,
        }
    }
}

impl From<&str> for Refusal {
    fn from(desc: &str) -> Self {
        desc.to_owned().into()
    }
}

fn error_reply(id: Option<Value>, r: Refusal) -> Value {
    with_id(json!({ "error": { "class": r.class, "desc": r.desc } }), id)
}

/// The idstr of loadgen's device section (instance 0, version 1).
pub(crate) const DEVICE_IDSTR: &str = "ferry-loadgen";

/// The machine type its configuration section names.
pub(crate) const MACHINE: &str = "loadgen";

/// Its section id: above the ids ferry's writer takes for its own sections
/// when it sends without start-time device state (1 to 3), and above any id
/// a QEMU numbers its few hundred devices with.
const DEVICE_SECTION_ID: u32 = 0x1_0000;

/// The device state of a guest that wrote `pages` pages: a configuration
/// section (machine [`MACHINE`]) and one FULL section whose body is the
/// be64 count, in the format of `ferry send --device-state`.
pub(crate) fn device_state(pages: u64) -> Vec<u8> {
    let mut f = QemuFileWriter::new(MemTransport::new());
    encode::put_configuration(&mut f, MACHINE);
    encode::put_section_start(
        &mut f,
        SectionKind::Full,
        DEVICE_SECTION_ID,
        DEVICE_IDSTR,
        0,
        1,
    )
    .expect("the idstr is shorter than 256 bytes");
    f.put_be64(pages);
    encode::put_footer(&mut f, DEVICE_SECTION_ID);
    f.into_transport()
        .expect("writing to memory does not fail")
        .take()
}

/// Writes the stopped guest's device state to `path` (absolute).
fn save_device_state(args: &Map<String, Value>, vcpus: &Vcpus) -> Result<Value, Refusal> {
    only(args, &["path"])?;
    let path = args
        .get("path")
        .ok_or("save-device-state needs \"path\"")?
        .as_str()
        .map(std::path::Path::new)
        .filter(|p| p.is_absolute())
        .ok_or("\"path\" must be an absolute path")?;
    // A running guest's state would be stale by the time it is read.
    if !vcpus.is_paused() {
        return Err("the guest is running: stop it before saving its device state".into());
    }
    let pages = vcpus.pages_written();
    std::fs::write(path, device_state(pages))
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    tracing::info!(pages, path = %path.display(), "loadgen device state saved");
    Ok(json!({}))
}

/// Runs the command in `request`.
fn execute(request: &Value, vcpus: &Vcpus, meters: &Meters) -> Result<Value, Refusal> {
    let obj = request
        .as_object()
        .ok_or("a request must be a JSON object")?;
    let command = obj
        .get("execute")
        .ok_or("a request needs \"execute\"")?
        .as_str()
        .ok_or("\"execute\" must be a string")?;
    let empty = Map::new();
    let args = match obj.get("arguments") {
        None => &empty,
        Some(Value::Object(m)) => m,
        Some(_) => return Err("\"arguments\" must be an object".into()),
    };
    match command {
        "stop" => {
            only(args, &[])?;
            if vcpus.stop() {
                tracing::info!(pages = vcpus.pages_written(), "loadgen stopped");
            }
            Ok(json!({}))
        }
        "cont" => {
            only(args, &[])?;
            if vcpus.cont() {
                tracing::info!("loadgen resumed");
            }
            Ok(json!({}))
        }
        "migrated" => {
            // The migration completed: the guest now lives on the destination
            // and stays stopped here (QEMU's postmigrate) until told `cont`.
            only(args, &[])?;
            if !vcpus.set_migrated() {
                return Err("the guest is running: stop it before marking it migrated".into());
            }
            Ok(json!({}))
        }
        "set-throttle" => {
            only(args, &["percent"])?;
            let percent = args
                .get("percent")
                .ok_or("set-throttle needs \"percent\"")?
                .as_u64()
                .filter(|p| *p <= 99)
                .ok_or("\"percent\" must be an integer from 0 to 99")?;
            vcpus.set_throttle(percent as u8);
            tracing::info!(percent, "loadgen throttle set");
            Ok(json!({}))
        }
        "query-status" => {
            only(args, &[])?;
            let now = Instant::now();
            let pages = vcpus.pages_written();
            let disk_bytes = vcpus.disk_bytes_written();
            let paused = vcpus.is_paused();
            let status = match (paused, vcpus.is_migrated()) {
                (true, true) => "postmigrate",
                (true, false) => "paused",
                _ => "running",
            };
            Ok(json!({
                "status": status,
                "running": !paused,
                "pages-written": pages,
                "dirty-rate": meters.ram.rate(now, pages),
                "throttle-percent": vcpus.throttle(),
                "disk-bytes-written": disk_bytes,
                "disk-rate": meters.disk.rate(now, disk_bytes),
            }))
        }
        "save-device-state" => save_device_state(args, vcpus),
        "qmp_capabilities" => Ok(json!({})),
        other => Err(Refusal {
            class: "CommandNotFound",
            desc: format!(
                "the command {} has not been found",
                other.chars().take(100).collect::<String>()
            ),
        }),
    }
}

/// Rejects arguments other than `allowed`.
fn only(args: &Map<String, Value>, allowed: &[&str]) -> Result<(), String> {
    match args.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(format!(
            "parameter {:?} is unexpected",
            k.chars().take(100).collect::<String>()
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(line: &str, v: &Vcpus, m: &Meters) -> Value {
        request(line.as_bytes(), v, m)
    }

    #[test]
    fn requests_are_answered_and_bad_ones_refused() {
        let (v, m) = (Vcpus::new(), Meters::new());
        let status = ask(r#"{"execute":"query-status","id":7}"#, &v, &m);
        assert_eq!(status["return"]["status"], "running");
        assert_eq!(status["id"], 7);
        assert_eq!(status["return"]["disk-bytes-written"], 0);
        assert_eq!(status["return"]["disk-rate"], 0);
        assert_eq!(ask(r#"{"execute":"stop"}"#, &v, &m), json!({"return": {}}));
        assert_eq!(
            ask(r#"{"execute":"query-status"}"#, &v, &m)["return"]["status"],
            "paused"
        );
        assert_eq!(ask(r#"{"execute":"cont"}"#, &v, &m), json!({"return": {}}));
        let t = ask(
            r#"{"execute":"set-throttle","arguments":{"percent":40}}"#,
            &v,
            &m,
        );
        assert_eq!(t, json!({"return": {}}));
        assert_eq!(v.throttle(), 40);
        for bad in [
            "{",
            "[]",
            "\u{7f}\u{0}",
            r#"{"execute":1}"#,
            r#"{"arguments":{}}"#,
            r#"{"execute":"stop","arguments":{"now":true}}"#,
            r#"{"execute":"stop","arguments":[]}"#,
            r#"{"execute":"set-throttle"}"#,
            r#"{"execute":"set-throttle","arguments":{"percent":100}}"#,
            r#"{"execute":"set-throttle","arguments":{"percent":-1}}"#,
            r#"{"execute":"set-throttle","arguments":{"percent":"5"}}"#,
        ] {
            let r = ask(bad, &v, &m);
            assert_eq!(r["error"]["class"], "GenericError", "{bad}: {r}");
            assert!(r["error"]["desc"].is_string(), "{bad}: {r}");
        }
        assert_eq!(v.throttle(), 40);
        let r = ask(r#"{"execute":"reboot"}"#, &v, &m);
        assert_eq!(r["error"]["class"], "CommandNotFound", "{r}");
    }

    #[test]
    fn device_state_is_saved_only_while_stopped_and_parses() {
        let (v, m) = (Vcpus::new(), Meters::new());
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        let req = json!({"execute": "save-device-state",
                         "arguments": {"path": path.to_str().unwrap()}})
        .to_string();
        let r = ask(&req, &v, &m);
        assert_eq!(r["error"]["class"], "GenericError", "{r}");
        assert!(!path.exists(), "a running guest's state was saved");
        for bad in [
            r#"{"execute":"save-device-state"}"#,
            r#"{"execute":"save-device-state","arguments":{"path":"rel"}}"#,
            r#"{"execute":"save-device-state","arguments":{"path":1}}"#,
        ] {
            assert_eq!(ask(bad, &v, &m)["error"]["class"], "GenericError", "{bad}");
        }
        ask(r#"{"execute":"stop"}"#, &v, &m);
        assert_eq!(ask(&req, &v, &m), json!({"return": {}}));
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes, device_state(v.pages_written()));
        let state = ferry_proto::stream::device_state::DeviceState::from_bytes(bytes).unwrap();
        assert_eq!(state.machine.as_deref(), Some(MACHINE));
        let missing = dir.path().join("no/such/dir");
        let req = json!({"execute": "save-device-state",
                         "arguments": {"path": missing.to_str().unwrap()}});
        let r = ask(&req.to_string(), &v, &m);
        assert_eq!(r["error"]["class"], "GenericError", "{r}");
    }

    #[test]
    fn lines_are_split_and_bounded() {
        let mut l = Lines::default();
        let mut out = Vec::new();
        l.push(b"ab\ncd", &mut out);
        l.push(b"e\n\n", &mut out);
        assert_eq!(
            out,
            vec![
                Line::Complete(b"ab".to_vec()),
                Line::Complete(b"cde".to_vec()),
                Line::Complete(Vec::new())
            ]
        );
        out.clear();
        let long = vec![b'x'; MAX_LINE + 1];
        l.push(&long, &mut out);
        l.push(&long, &mut out);
        l.push(b"x\nok\n", &mut out);
        assert_eq!(out, vec![Line::TooLong, Line::Complete(b"ok".to_vec())]);
        out.clear();
        let mut exact = vec![b'y'; MAX_LINE];
        exact.push(b'\n');
        l.push(&exact, &mut out);
        assert_eq!(out, vec![Line::Complete(vec![b'y'; MAX_LINE])]);
    }
}
