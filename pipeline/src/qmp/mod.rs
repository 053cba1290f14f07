//! The control plane: what a management layer (libvirt, KubeVirt, a script
//! with QEMU's `qemu.qmp`) uses to drive a running `ferry send` or `ferry
//! receive`, as it drives QEMU's migration: a QMP server (`--qmp unix:PATH`)
//! with QEMU's commands and events, and SIGINT/SIGTERM handling.
//!
//! - [`Control`]: the state the orchestrator and the server share: the
//!   figures, the parameters, the cancel request, the event subscribers.
//! - [`server`]: the socket, the greeting, negotiation and framing.
//! - [`commands`]: what each command does.
//! - [`params`]: migrate-set-parameters, checked as QEMU checks them.
//! - [`signals`]: SIGINT/SIGTERM as migrate_cancel; a second one kills.

pub mod commands;
pub mod levels;
pub mod params;
pub mod server;
pub mod signals;
pub mod windows;

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use crossbeam_channel::Sender;
use ipc_channel::ipc::IpcSender;
use qapi::qmp::{Event, MigrationStatus, MIGRATION, MIGRATION_PASS};

use crate::actors::writer;
use crate::orchestrator::stats::Figures;
pub use params::Parameters;

/// Exit status of a cancelled migration (migrate_cancel, SIGINT, SIGTERM),
/// distinct from a failure's 1.
pub const EXIT_CANCELLED: u8 = 3;

/// A migration ended because it was asked to: the error `ferry send` and
/// `ferry receive` return then; the binary exits [`EXIT_CANCELLED`].
#[derive(Debug, Clone, thiserror::Error)]
#[error("migration cancelled by {by}")]
pub struct Cancelled {
    /// migrate_cancel, or the signal's name.
    pub by: String,
}

/// The compressors a `ferry send` runs, by the parameter that sets their
/// level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compressor {
    /// `--compress`: compress-level.
    Legacy,
    /// `--multifd-compression zlib`: multifd-zlib-level.
    MultifdZlib,
    /// `--multifd-compression zstd` or `auto`: multifd-zstd-level.
    MultifdZstd,
}

impl Compressor {
    /// The command for the compress actor if `new` changed this one's level.
    fn command(self, old: &Parameters, new: &Parameters) -> Option<levels::Command> {
        let (a, b) = match self {
            Self::Legacy => (old.compress_level, new.compress_level),
            Self::MultifdZlib => (old.multifd_zlib_level, new.multifd_zlib_level),
            Self::MultifdZstd => (old.multifd_zstd_level, new.multifd_zstd_level),
        };
        (a != b).then(|| match self {
            Self::Legacy => levels::Command::CompressLevel(u32::from(b)),
            _ => levels::Command::MultifdLevel(i32::from(b)),
        })
    }
}

/// Which end of the migration this process is: the commands differ a little
/// (an incoming migration has no writer to cap).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// `ferry send`.
    Source,
    /// `ferry receive`.
    Destination,
}

/// One line for a client: an answer, or an event (counted until written).
#[derive(Debug)]
pub struct Line {
    /// The JSON text.
    pub text: String,
    /// An event: [`Control::drain`] waits for it.
    pub event: bool,
}

/// Lines queued for one client; a client that does not read them is dropped.
type Subscriber = Sender<Line>;

/// What the orchestrator and the QMP server share.
#[derive(Debug)]
pub struct Control {
    side: Side,
    figures: Mutex<Figures>,
    params: Mutex<Parameters>,
    /// Who asked for a cancel, if anyone did.
    cancel: Mutex<Option<String>>,
    cancelled: AtomicBool,
    /// 2 once a second signal asked to stop now.
    signals: AtomicU8,
    /// Set inside the signal handler itself, before the signal thread
    /// records the cancel: a system call the signal interrupted (EINTR) may
    /// fail the migration first.
    signalled: Arc<AtomicBool>,
    subscribers: Mutex<Vec<Subscriber>>,
    /// Events queued and not written yet.
    unwritten: AtomicUsize,
    /// The writer's command channel, for max-bandwidth (source only).
    writer: Mutex<Option<IpcSender<writer::Command>>>,
    /// The compress actor's command channel and the parameter that sets
    /// the level of its compressors (source only, when it compresses).
    compress: Mutex<Option<(IpcSender<levels::Command>, Compressor)>>,
    /// Actor processes to kill when a second signal cannot wait.
    pids: Mutex<Vec<u32>>,
    /// The source guest as ferry knows it: `None` without --guest-control,
    /// else whether ferry has it stopped.
    guest_stopped: Mutex<Option<bool>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicked holder leaves figures that are still worth reading.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A QMP timestamp for now (seconds and microseconds since the epoch, as
/// QEMU's `qmp_timestamp`).
pub fn timestamp() -> qapi::Timestamp {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    // The type has no constructor; its serde form is QEMU's.
    serde_json::from_value(serde_json::json!({
        "seconds": now.as_secs(),
        "microseconds": now.subsec_micros(),
    }))
    .expect("a timestamp deserializes")
}

impl Control {
    /// Shared state for a migration described by `figures` and `params`.
    pub fn new(side: Side, figures: Figures, params: Parameters) -> Arc<Self> {
        Arc::new(Self {
            side,
            figures: Mutex::new(figures),
            params: Mutex::new(params),
            cancel: Mutex::new(None),
            cancelled: AtomicBool::new(false),
            signals: AtomicU8::new(0),
            signalled: Arc::new(AtomicBool::new(false)),
            subscribers: Mutex::new(Vec::new()),
            unwritten: AtomicUsize::new(0),
            writer: Mutex::new(None),
            compress: Mutex::new(None),
            pids: Mutex::new(Vec::new()),
            guest_stopped: Mutex::new(None),
        })
    }

    /// Which end this is.
    pub fn side(&self) -> Side {
        self.side
    }

    /// The figures, locked: the orchestrator updates them, readers copy.
    pub fn figures(&self) -> MutexGuard<'_, Figures> {
        lock(&self.figures)
    }

    /// The parameters as they are now.
    pub fn params(&self) -> Parameters {
        *lock(&self.params)
    }

    /// Changes the parameters: `f` checks and applies; max-bandwidth goes to
    /// the writer at once (it takes effect at the writer's next chunk), the
    /// level of the compressors in use to the compress actor (from its next
    /// batch).
    pub fn set_params<E>(&self, f: impl FnOnce(&mut Parameters) -> Result<(), E>) -> Result<(), E> {
        let mut p = lock(&self.params);
        let before = p.max_bandwidth;
        let old = *p;
        f(&mut p)?;
        if let Some((tx, which)) = lock(&self.compress).as_ref() {
            if let Some(cmd) = which.command(&old, &p) {
                if let Err(e) = tx.send(cmd) {
                    tracing::warn!("cannot reach the compress actor to set the level: {e:?}");
                }
            }
        }
        if p.max_bandwidth != before {
            if let Some(w) = lock(&self.writer).as_ref() {
                if let Err(e) = w.send(writer::Command::SetRate(p.max_bandwidth)) {
                    tracing::warn!("cannot reach the writer to set the rate: {e:?}");
                }
            }
        }
        Ok(())
    }

    /// Hands over the compress actor's command channel, and which parameter
    /// sets its level.
    pub fn attach_compress(&self, tx: IpcSender<levels::Command>, which: Compressor) {
        *lock(&self.compress) = Some((tx, which));
    }

    /// Hands over the writer's command channel; the current cap is applied.
    pub fn attach_writer(&self, w: IpcSender<writer::Command>) {
        *lock(&self.writer) = Some(w);
    }

    /// Records whether ferry has the source guest stopped (it has one).
    pub fn set_guest_stopped(&self, stopped: bool) {
        *lock(&self.guest_stopped) = Some(stopped);
    }

    /// query-status: the guest's run state as ferry knows it. The source's
    /// guest runs until ferry stops it (`finish-migrate` while the last
    /// round goes, `postmigrate` once the destination has it, `running`
    /// again if ferry resumed it); a ferry destination is `inmigrate` until
    /// the stream loaded, then `paused` (ferry never runs a guest). `None`:
    /// a source without --guest-control, whose guest ferry cannot see.
    pub fn run_state(&self) -> Option<qapi::qmp::StatusInfo> {
        use qapi::qmp::RunState;
        let status = self.figures().status;
        let state = match (self.side, *lock(&self.guest_stopped)) {
            (Side::Destination, _) if status == MigrationStatus::completed => RunState::paused,
            (Side::Destination, _) => RunState::inmigrate,
            (Side::Source, None) => return None,
            (Side::Source, Some(false)) => RunState::running,
            (Side::Source, Some(true)) if status == MigrationStatus::completed => {
                RunState::postmigrate
            }
            (Side::Source, Some(true)) => RunState::finish_migrate,
        };
        Some(qapi::qmp::StatusInfo {
            running: state == RunState::running,
            status: state,
        })
    }

    /// Records the actors' process ids, for a second signal to kill.
    pub fn set_pids(&self, pids: Vec<u32>) {
        *lock(&self.pids) = pids;
    }

    /// Changes the status and tells every client (a MIGRATION event), unless
    /// it is the status already. A finished migration keeps its status.
    pub fn set_status(&self, status: MigrationStatus) {
        {
            let mut f = self.figures();
            if f.status == status || f.finished() {
                return;
            }
            f.status = status;
            if matches!(
                status,
                MigrationStatus::completed | MigrationStatus::failed | MigrationStatus::cancelled
            ) {
                f.end.get_or_insert_with(std::time::Instant::now);
            }
        }
        tracing::info!(?status, "migration status");
        self.emit(&Event::MIGRATION {
            data: MIGRATION { status },
            timestamp: timestamp(),
        });
    }

    /// A round begins: dirty-sync-count goes up and clients get MIGRATION_PASS.
    pub fn pass(&self) {
        let pass = {
            let mut f = self.figures();
            f.dirty_sync_count += 1;
            f.dirty_sync_count
        };
        self.emit(&Event::MIGRATION_PASS {
            data: MIGRATION_PASS { pass: pass as i64 },
            timestamp: timestamp(),
        });
    }

    /// Sends `event` to every negotiated client; one whose queue is full or
    /// closed is dropped, so a stuck client never holds up the migration.
    pub fn emit(&self, event: &Event) {
        let text = serde_json::to_string(event).expect("events serialize");
        lock(&self.subscribers).retain(|s| {
            self.unwritten.fetch_add(1, Ordering::SeqCst);
            let line = Line {
                text: text.clone(),
                event: true,
            };
            let queued = s.try_send(line).is_ok();
            if !queued {
                self.unwritten.fetch_sub(1, Ordering::SeqCst);
            }
            queued
        });
    }

    /// Removes a client's queue (it disconnected).
    pub fn unsubscribe(&self, s: &Subscriber) {
        lock(&self.subscribers).retain(|o| !o.same_channel(s));
    }

    /// A client's writer wrote an event, or dropped it with the client.
    pub fn written(&self) {
        self.unwritten.fetch_sub(1, Ordering::SeqCst);
    }

    /// Waits up to `timeout` for the events queued to reach their clients:
    /// the last MIGRATION event is written before the process exits.
    pub fn drain(&self, timeout: std::time::Duration) {
        let deadline = std::time::Instant::now() + timeout;
        while self.unwritten.load(Ordering::SeqCst) > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// Adds a client's event queue. A client that arrives during setup
    /// gets the MIGRATION `setup` event it would have seen from QEMU (which
    /// emits it as `migrate` starts), before any later status.
    pub fn subscribe(&self, s: Subscriber) {
        // Under the figures' lock, which set_status takes to change the
        // status: a later status is emitted after this, never before.
        let f = self.figures();
        if f.status == MigrationStatus::setup {
            let event = Event::MIGRATION {
                data: MIGRATION {
                    status: MigrationStatus::setup,
                },
                timestamp: timestamp(),
            };
            let text = serde_json::to_string(&event).expect("events serialize");
            self.unwritten.fetch_add(1, Ordering::SeqCst);
            if s.try_send(Line { text, event: true }).is_err() {
                self.unwritten.fetch_sub(1, Ordering::SeqCst);
            }
        }
        lock(&self.subscribers).push(s);
        drop(f);
    }

    /// Asks the orchestrator to cancel (migrate_cancel or a signal). The
    /// first request names the cause; a finished migration ignores it.
    pub fn request_cancel(&self, by: &str) {
        if self.figures().finished() {
            return;
        }
        lock(&self.cancel).get_or_insert_with(|| by.to_owned());
        self.cancelled.store(true, Ordering::SeqCst);
        self.set_status(MigrationStatus::cancelling);
    }

    /// The cancel request, if there is one.
    pub fn cancel_requested(&self) -> Option<Cancelled> {
        if !self.cancelled.load(Ordering::SeqCst) {
            return None;
        }
        lock(&self.cancel).clone().map(|by| Cancelled { by })
    }

    /// The flag the signal handler sets.
    pub fn signalled_flag(&self) -> Arc<AtomicBool> {
        self.signalled.clone()
    }

    /// A second signal: the orchestrator skips whatever can wait.
    pub fn force(&self) {
        self.signals.store(2, Ordering::SeqCst);
    }

    /// Whether a second signal asked to stop now.
    pub fn forced(&self) -> bool {
        self.signals.load(Ordering::SeqCst) >= 2
    }

    /// SIGKILLs the actor processes (a second signal's last resort).
    pub fn kill_actors(&self) {
        for &pid in lock(&self.pids).iter() {
            // SAFETY: kill(2) has no memory effects; a pid that exited and
            // was reaped meanwhile gets ESRCH, which is ignored.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
        }
    }

    /// Fails with [`Cancelled`] once a cancel was asked for.
    pub fn check_cancel(&self) -> Result<(), Cancelled> {
        self.cancel_requested().map_or(Ok(()), Err)
    }

    /// The migration's end: `completed`, `failed` (with its reason) or
    /// `cancelled`, as `result` and any cancel request say.
    pub fn finish(&self, result: &anyhow::Result<()>) {
        let status = match result {
            Ok(()) => MigrationStatus::completed,
            Err(e) if e.downcast_ref::<Cancelled>().is_some() => MigrationStatus::cancelled,
            Err(e) => {
                self.figures().error_desc = Some(format!("{e:#}"));
                MigrationStatus::failed
            }
        };
        self.set_status(status);
    }

    /// A failure after a cancel request is the cancel (the actors may have
    /// died of the same Ctrl-C); anything else stays what it is.
    pub fn explain(&self, result: anyhow::Result<()>) -> anyhow::Result<()> {
        if result.is_err() && self.signalled.load(Ordering::SeqCst) {
            // The signal thread records the cancel within microseconds.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
            while self.cancel_requested().is_none() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        match (result, self.cancel_requested()) {
            (Err(e), Some(c)) if e.downcast_ref::<Cancelled>().is_none() => {
                tracing::info!("after the cancel request: {e:#}");
                Err(c.into())
            }
            (r, _) => r,
        }
    }
}
