//! A minimal QMP client over a unix socket.
//!
//! QMP is JSON lines: a greeting, then `{"execute": ..., "id": n}` answered by
//! `{"return": ...}` or `{"error": {"class", "desc"}}`, with asynchronous
//! `{"event": ...}` lines interleaved. Every read has a deadline: a QEMU 7.2 destination
//! that fails to load a stream exits at once (the socket then reads EOF), and one fed an
//! empty stream waits forever, so a blocking read without a deadline could hang CI.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::bail;
use crate::error::{Context, Error, Result};

/// How long one QMP command may take before it counts as hung.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// A connected QMP session (after the `qmp_capabilities` handshake).
#[derive(Debug)]
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
    /// Events received so far, oldest first (drained by [`Qmp::take_events`]).
    events: Vec<Value>,
}

impl Qmp {
    /// Connect to `socket`, read the greeting and negotiate capabilities.
    pub fn connect(socket: &Path) -> Result<Qmp> {
        let stream = UnixStream::connect(socket)
            .with_context(|| format!("connecting to QMP socket {}", socket.display()))?;
        let writer = stream.try_clone().context("cloning the QMP socket")?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
            next_id: 0,
            events: Vec::new(),
        };
        let greeting = qmp.read_message(Instant::now() + COMMAND_TIMEOUT)?;
        if greeting.get("QMP").is_none() {
            bail!("QMP greeting expected, got {greeting}");
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    /// Run `command` with optional `arguments`; returns the `return` value.
    /// A QMP `error` reply becomes an [`Error`] naming the command and QEMU's `desc`.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        self.execute_timeout(command, arguments, COMMAND_TIMEOUT)
    }

    /// [`Qmp::execute`] with an explicit deadline for the reply.
    pub fn execute_timeout(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let mut request = json!({ "execute": command, "id": id });
        if let Some(args) = arguments {
            request["arguments"] = args;
        }
        let mut line = serde_json::to_vec(&request)?;
        line.push(b'\n');
        self.writer
            .write_all(&line)
            .with_context(|| format!("sending QMP command {command}"))?;

        let deadline = Instant::now() + timeout;
        loop {
            let msg = self
                .read_message(deadline)
                .with_context(|| format!("waiting for the reply to QMP command {command}"))?;
            if msg.get("event").is_some() {
                self.events.push(msg);
                continue;
            }
            if msg.get("id").and_then(Value::as_u64) != Some(id) {
                continue;
            }
            if let Some(ret) = msg.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = msg.get("error") {
                let desc = err.get("desc").and_then(Value::as_str).unwrap_or("?");
                bail!("QMP command {command} failed: {desc}");
            }
            bail!("QMP reply to {command} has neither return nor error: {msg}");
        }
    }

    /// Events seen so far (e.g. MIGRATION, RESUME); clears the list.
    pub fn take_events(&mut self) -> Vec<Value> {
        std::mem::take(&mut self.events)
    }

    fn read_message(&mut self, deadline: Instant) -> Result<Value> {
        let mut line = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!("no QMP message within the deadline");
            }
            self.reader
                .get_ref()
                .set_read_timeout(Some(left))
                .context("setting the QMP read timeout")?;
            match self.reader.read_line(&mut line) {
                Ok(0) => bail!("QMP connection closed by QEMU (did it exit?)"),
                Ok(_) if line.ends_with('\n') => break,
                Ok(_) => continue,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    bail!("no QMP message within the deadline")
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::msg(format!("reading from QMP: {e}"))),
            }
        }
        serde_json::from_str(line.trim_end())
            .with_context(|| format!("QMP sent a line that is not JSON: {line:?}"))
    }
}
