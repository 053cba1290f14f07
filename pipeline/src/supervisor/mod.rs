//! Actor processes: the `ferry` binary re-executed as one actor, wired up
//! with ipc-channel, and watched by the orchestrator.
//!
//! The orchestrator spawns `ferry __actor KIND SERVER`; the child connects to
//! the one-shot server named SERVER and receives its [`Bootstrap`]: the actor's
//! own configuration and channels, plus the shared event channel back to the
//! orchestrator.
//!
//! No actor outlives its orchestrator, however the orchestrator ends and
//! whoever adopts the orphans (init, or a subreaper such as systemd or a
//! container's init): every actor's stdin is the read end of a pipe whose
//! only write end the orchestrator holds (close-on-exec, so no child
//! inherits it). When the orchestrator dies the kernel closes that end, the
//! actor's watcher thread reads end of file and the actor exits at once. An
//! actor started after its orchestrator died reads end of file at once too,
//! which a parent-death signal set after exec could not promise.

pub mod messages;

use std::io::{self, Read};
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::supervisor::messages::{ActorEvent, ActorKind, Event, Usage};
use ipc_channel::ipc::{self, IpcOneShotServer, IpcReceiver, IpcSender};
use ipc_channel::TryRecvError;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The hidden subcommand that runs an actor.
pub const ACTOR_SUBCOMMAND: &str = "__actor";

/// How long a spawned actor has to connect back.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What a child receives when it starts.
#[derive(Debug, Serialize, Deserialize)]
pub struct Bootstrap<I> {
    /// Where to report events.
    pub events: IpcSender<ActorEvent>,
    /// The actor's configuration and channels.
    pub init: I,
}

/// Errors of running actor processes.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A process could not be started.
    #[error("cannot start the {actor} process")]
    Spawn {
        /// Which.
        actor: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A process did not connect back in time or its channel broke at start.
    #[error("the {actor} process did not start: {reason}")]
    Bootstrap {
        /// Which.
        actor: &'static str,
        /// Why.
        reason: String,
    },
    /// The temporary directory (TMPDIR) is not usable.
    #[error("cannot use the temporary directory {path} (set TMPDIR to a writable directory)")]
    TempDir {
        /// The directory.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The ipc machinery failed.
    #[error("ipc channel failed")]
    Ipc(#[source] io::Error),
    /// The pipe that ends the actors with the orchestrator cannot be made.
    #[error("cannot create the pipe that ties the actors' lives to this process")]
    DeathPipe(#[source] io::Error),
    /// An actor reported an error.
    #[error("{actor} failed: {message}")]
    Failed {
        /// Which.
        actor: &'static str,
        /// Its message.
        message: String,
    },
    /// An actor process died without reporting.
    #[error("{actor} process (pid {pid}) {status}")]
    Died {
        /// Which.
        actor: &'static str,
        /// Its pid.
        pid: u32,
        /// How it ended.
        status: String,
    },
}

fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (_, Some(libc::SIGBUS)) => format!(
            "was killed by signal {} (SIGBUS: a page of a mapped file could not be \
             written; is its file system full?)",
            libc::SIGBUS
        ),
        (_, Some(sig)) => format!("was killed by signal {sig}"),
        (Some(code), _) => format!("exited with status {code}"),
        _ => "ended".into(),
    }
}

/// An actor process started by [`Supervisor::launch`], not yet handed its
/// `Init`.
#[must_use = "a launched actor waits for its Init: bootstrap it"]
pub struct Launched<I> {
    actor: &'static str,
    pid: u32,
    /// The child's bootstrap sender once it connects, or why it did not.
    connected: crossbeam_channel::Receiver<Result<IpcSender<Bootstrap<I>>, ipc_channel::IpcError>>,
    started: Instant,
}

impl<I> std::fmt::Debug for Launched<I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (pid {}, launched)", self.actor, self.pid)
    }
}

struct Actor {
    kind: ActorKind,
    child: Child,
    /// Set once the actor said it is exiting normally.
    exiting: bool,
    exited: bool,
}

/// The orchestrator's view of its actor processes.
pub struct Supervisor {
    actors: Vec<Actor>,
    events_tx: IpcSender<ActorEvent>,
    events_rx: IpcReceiver<ActorEvent>,
    usage: Vec<(ActorKind, Usage)>,
    /// Events taken from the channel early (see `check_children`), oldest first.
    queued: std::collections::VecDeque<ActorEvent>,
    /// The read end of the death pipe, handed to every actor as its stdin.
    death_pipe: OwnedFd,
    /// The only write end of the death pipe: closed when this process ends.
    _alive: OwnedFd,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.actors.iter().map(|a| (a.kind, a.child.id())))
            .finish()
    }
}

impl Supervisor {
    /// A supervisor with no actors yet.
    pub fn new() -> Result<Self, Error> {
        // ipc-channel rendezvous through files in the temporary directory and
        // panics if it cannot create them: say so plainly instead.
        let tmp = std::env::temp_dir();
        tempfile::tempfile_in(&tmp).map_err(|source| Error::TempDir { path: tmp, source })?;
        let (events_tx, events_rx) = ipc::channel().map_err(Error::Ipc)?;
        let (death_pipe, alive) = death_pipe().map_err(Error::DeathPipe)?;
        Ok(Self {
            actors: Vec::new(),
            events_tx,
            events_rx,
            usage: Vec::new(),
            queued: Default::default(),
            death_pipe,
            _alive: alive,
        })
    }

    /// Starts an actor process and hands it `init`.
    pub fn spawn<I: Serialize + DeserializeOwned + Send + 'static>(
        &mut self,
        kind: ActorKind,
        init: I,
    ) -> Result<u32, Error> {
        let launched = self.launch(kind)?;
        self.bootstrap(launched, init)
    }

    /// Starts an actor process, which then loads and connects back while
    /// the caller launches the next: a process takes milliseconds to start,
    /// and launching them all before bootstrapping any overlaps those.
    pub fn launch<I: Serialize + DeserializeOwned + Send + 'static>(
        &mut self,
        kind: ActorKind,
    ) -> Result<Launched<I>, Error> {
        let actor = kind.name();
        let (server, name) =
            IpcOneShotServer::<IpcSender<Bootstrap<I>>>::new().map_err(Error::Ipc)?;
        let exe = std::env::current_exe().map_err(|source| Error::Spawn { actor, source })?;
        let stdin = self
            .death_pipe
            .try_clone()
            .map_err(|source| Error::Spawn { actor, source })?;
        let child = Command::new(exe)
            .args([ACTOR_SUBCOMMAND, actor, &name])
            .stdin(Stdio::from(stdin))
            .spawn()
            .map_err(|source| Error::Spawn { actor, source })?;
        let pid = child.id();
        self.actors.push(Actor {
            kind,
            child,
            exiting: false,
            exited: false,
        });
        // accept() blocks until the child connects; wait for it on a thread so
        // a child that dies first cannot hang us.
        let (tx, connected) = crossbeam_channel::bounded(1);
        std::thread::spawn(move || {
            let _ = tx.send(server.accept().map(|(_, sender)| sender));
        });
        Ok(Launched {
            actor,
            pid,
            connected,
            started: Instant::now(),
        })
    }

    /// Waits for a launched actor to connect and hands it `init`.
    pub fn bootstrap<I: Serialize + DeserializeOwned + Send + 'static>(
        &mut self,
        launched: Launched<I>,
        init: I,
    ) -> Result<u32, Error> {
        let Launched {
            actor,
            pid,
            connected,
            started,
        } = launched;
        let deadline = started + CONNECT_TIMEOUT;
        let sender = loop {
            match connected.recv_timeout(Duration::from_millis(50)) {
                Ok(Ok(sender)) => break sender,
                Ok(Err(e)) => return Err(self.start_failed(actor, format!("{e:?}"))),
                Err(_) => {
                    self.check_children()?;
                    if Instant::now() > deadline {
                        return Err(Error::Bootstrap {
                            actor,
                            reason: "it did not connect within 10 s".into(),
                        });
                    }
                }
            }
        };
        if let Err(e) = sender.send(Bootstrap {
            events: self.events_tx.clone(),
            init,
        }) {
            return Err(self.start_failed(actor, format!("{e:?}")));
        }
        tracing::debug!(actor, pid, "actor started");
        Ok(pid)
    }

    /// Why `actor` did not start: a child that died while it was being
    /// wired up (killed, say) is reported as that death, which is what a
    /// broken bootstrap channel means then.
    fn start_failed(&mut self, actor: &'static str, reason: String) -> Error {
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline {
            if let Err(died) = self.check_children() {
                return died;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Error::Bootstrap { actor, reason }
    }

    /// Process ids of the actors, by kind.
    pub fn pids(&self) -> Vec<(ActorKind, u32)> {
        self.actors.iter().map(|a| (a.kind, a.child.id())).collect()
    }

    /// Fails if an actor process has ended without saying it would.
    fn check_children(&mut self) -> Result<(), Error> {
        for i in 0..self.actors.len() {
            if self.actors[i].exited {
                continue;
            }
            let Ok(Some(status)) = self.actors[i].child.try_wait() else {
                continue;
            };
            // What the actor sent before it ended is in the channel by now:
            // take it, so that its Exiting (or its Failed) still counts.
            self.drain();
            let a = &mut self.actors[i];
            a.exited = true;
            if a.exiting && status.success() {
                continue;
            }
            let failed = self.queued.iter().find_map(|ev| match &ev.event {
                Event::Failed { message } if ev.actor == a.kind => Some(message.clone()),
                _ => None,
            });
            return Err(match failed {
                Some(message) => Error::Failed {
                    actor: a.kind.name(),
                    message,
                },
                None => Error::Died {
                    actor: a.kind.name(),
                    pid: a.child.id(),
                    status: describe(status),
                },
            });
        }
        Ok(())
    }

    /// Moves every event already in the channel to the queue.
    fn drain(&mut self) {
        while let Ok(ev) = self.events_rx.try_recv() {
            self.note(&ev);
            self.queued.push_back(ev);
        }
    }

    /// Bookkeeping done once per event, when it leaves the channel.
    fn note(&mut self, ev: &ActorEvent) {
        if let Event::Exiting { usage } = &ev.event {
            self.usage.push((ev.actor, *usage));
            for a in self.actors.iter_mut().filter(|a| a.kind == ev.actor) {
                a.exiting = true;
            }
        }
    }

    /// The next event, waiting up to `timeout`. Fails as soon as an actor
    /// reports a failure or a process dies, naming it.
    pub fn next_event(&mut self, timeout: Duration) -> Result<Option<ActorEvent>, Error> {
        let ev = match self.queued.pop_front() {
            Some(ev) => ev,
            None => match self.events_rx.try_recv_timeout(timeout) {
                Ok(ev) => {
                    self.note(&ev);
                    ev
                }
                Err(TryRecvError::Empty) => {
                    self.check_children()?;
                    return Ok(None);
                }
                Err(TryRecvError::IpcError(e)) => {
                    return Err(Error::Ipc(io::Error::other(format!("{e:?}"))))
                }
            },
        };
        if let Event::Failed { message } = &ev.event {
            let failed = Error::Failed {
                actor: ev.actor.name(),
                message: message.clone(),
            };
            return Err(self.root_cause(ev.actor, failed));
        }
        self.check_children()?;
        Ok(Some(ev))
    }

    /// An actor's failure is often only the echo of another's: a stage that
    /// loses its channel because the writer hit a dead connection, or because
    /// a sibling was killed. Within a moment, a sibling killed by a signal is
    /// the cause; otherwise a failure reported by the connection's owner
    /// (writer or reader) beats the first report.
    fn root_cause(&mut self, reporter: ActorKind, first: Error) -> Error {
        use std::os::unix::process::ExitStatusExt;
        let owns_connection = |k| matches!(k, ActorKind::Writer | ActorKind::Reader);
        let (mut cause, mut certain) = (first, owns_connection(reporter));
        let deadline = Instant::now() + Duration::from_millis(200);
        loop {
            for a in self
                .actors
                .iter_mut()
                .filter(|a| a.kind != reporter && !a.exited)
            {
                if let Ok(Some(status)) = a.child.try_wait() {
                    a.exited = true;
                    if status.signal().is_some() {
                        return Error::Died {
                            actor: a.kind.name(),
                            pid: a.child.id(),
                            status: describe(status),
                        };
                    }
                }
            }
            while let Ok(ev) = self.events_rx.try_recv() {
                self.note(&ev);
                match &ev.event {
                    Event::Failed { message } if !certain && owns_connection(ev.actor) => {
                        cause = Error::Failed {
                            actor: ev.actor.name(),
                            message: message.clone(),
                        };
                        certain = true;
                    }
                    Event::Failed { .. } => {}
                    _ => self.queued.push_back(ev),
                }
            }
            if Instant::now() >= deadline {
                return cause;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for every actor to exit normally, collecting their usage.
    pub fn wait_all(&mut self, timeout: Duration) -> Result<(), Error> {
        let deadline = Instant::now() + timeout;
        while self.actors.iter().any(|a| !a.exited) {
            // An actor sends its last event, then exits: a short poll sees
            // the exit as it happens (every run ends here, and 20 ms polls
            // added 20-40 ms to each).
            self.next_event(Duration::from_millis(1))?;
            if Instant::now() > deadline {
                let a = self
                    .actors
                    .iter()
                    .find(|a| !a.exited)
                    .expect("one is running");
                return Err(Error::Died {
                    actor: a.kind.name(),
                    pid: a.child.id(),
                    status: "did not exit in time".into(),
                });
            }
        }
        Ok(())
    }

    /// CPU and memory of the actors that exited normally.
    pub fn usage(&self) -> &[(ActorKind, Usage)] {
        &self.usage
    }

    /// Kills every actor that is still running and reaps it.
    pub fn kill_all(&mut self) {
        for a in &mut self.actors {
            if !a.exited {
                let _ = a.child.kill();
                let _ = a.child.wait();
                a.exited = true;
            }
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// This process's CPU time and peak RSS.
pub fn usage() -> Usage {
    // SAFETY: getrusage only writes into the struct we pass, which is zeroed
    // and of the right type.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    sample_anon();
    Usage {
        cpu_seconds: secs(ru.ru_utime) + secs(ru.ru_stime),
        peak_rss_bytes: ru.ru_maxrss as u64 * 1024,
        peak_anon_bytes: PEAK_ANON.load(Ordering::Relaxed),
    }
}

/// Highest RssAnon seen by [`sample_anon`].
static PEAK_ANON: AtomicU64 = AtomicU64::new(0);

/// Records the current anonymous RSS. The kernel keeps a peak only for the
/// whole RSS (VmHWM), which counts every touched page of mapped guest RAM;
/// the memory ferry itself uses is the anonymous part.
fn sample_anon() {
    let kib = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("RssAnon:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        });
    if let Some(kib) = kib {
        PEAK_ANON.fetch_max(kib * 1024, Ordering::Relaxed);
    }
}

/// Samples the anonymous RSS every 50 ms for the life of the process.
pub fn start_memory_sampler() {
    std::thread::spawn(|| loop {
        sample_anon();
        std::thread::sleep(Duration::from_millis(50));
    });
}

/// A pipe, both ends close-on-exec: (read end, write end).
fn death_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [-1; 2];
    // SAFETY: pipe2 writes two file descriptors into the array we pass, which
    // has room for exactly two.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both are open descriptors that nothing
    // else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Ends this actor process as soon as its orchestrator is gone: stdin is the
/// read end of the orchestrator's death pipe, which nobody ever writes to, so
/// a read returns only at end of file, when the orchestrator's end closed
/// (or at once, if it closed before this process started).
fn die_with_orchestrator() {
    std::thread::spawn(|| {
        let mut stdin = io::stdin();
        let mut byte = [0u8; 1];
        loop {
            match stdin.read(&mut byte) {
                Ok(0) => break,
                Err(e) if e.kind() != io::ErrorKind::Interrupted => break,
                _ => {}
            }
        }
        // SAFETY: _exit ends the process without running any more of its
        // code (no destructors, no atexit handlers that could wait on locks
        // held by the threads it stops); it touches no memory of ours.
        unsafe { libc::_exit(1) }
    });
}

/// Runs an actor in a child process: connects to the orchestrator, receives
/// the bootstrap, runs `body`, and reports how it ended. Returns the exit code.
pub fn run_child<I, E, F>(kind: ActorKind, server: String, body: F) -> i32
where
    I: Serialize + DeserializeOwned,
    E: std::error::Error,
    F: FnOnce(I, &IpcSender<ActorEvent>) -> Result<(), E>,
{
    die_with_orchestrator();
    start_memory_sampler();
    let boot: Bootstrap<I> = match bootstrap(server) {
        Ok(b) => b,
        Err(e) => {
            eprintln!(
                "ferry {}: cannot connect to the orchestrator: {e}",
                kind.name()
            );
            return 1;
        }
    };
    let events = boot.events;
    match body(boot.init, &events) {
        Ok(()) => {
            let _ = events.send(ActorEvent {
                actor: kind,
                event: Event::Exiting { usage: usage() },
            });
            0
        }
        Err(e) => {
            let _ = events.send(ActorEvent {
                actor: kind,
                event: Event::Failed {
                    message: error_chain(&e),
                },
            });
            1
        }
    }
}

/// An ipc-channel error as an I/O error, for `#[source]` fields.
pub fn ipc_error(e: impl std::fmt::Debug) -> io::Error {
    io::Error::other(format!("{e:?}"))
}

/// An error and its causes on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn bootstrap<I: Serialize + DeserializeOwned>(server: String) -> io::Result<Bootstrap<I>> {
    let (tx, rx) = ipc::channel::<Bootstrap<I>>()?;
    let connect = IpcSender::<IpcSender<Bootstrap<I>>>::connect(server)?;
    connect
        .send(tx)
        .map_err(|e| io::Error::other(format!("{e:?}")))?;
    rx.recv().map_err(|e| io::Error::other(format!("{e:?}")))
}
