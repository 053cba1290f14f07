//! SIGINT and SIGTERM: the first cancels the migration as migrate_cancel
//! does (the orchestrator stops the actors, resumes a guest it stopped and
//! exits [`super::EXIT_CANCELLED`]); a second one within a second asks for
//! no more patience: if the orchestrator has not exited a moment later
//! (stuck on a guest that does not answer, say), the actors are killed and
//! the process exits at once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use super::Control;

/// How close two signals must be for the second to force the exit.
const SECOND_SIGNAL: Duration = Duration::from_secs(1);
/// How long the orchestrator has to finish its own cleanup (resume the
/// guest first) after a second signal.
const GRACE: Duration = Duration::from_millis(500);

/// Installs the handlers; signals are taken on a thread of their own.
pub fn install(control: Arc<Control>) -> std::io::Result<()> {
    for sig in [SIGINT, SIGTERM] {
        signal_hook::flag::register(sig, control.signalled_flag())?;
    }
    let mut signals = Signals::new([SIGINT, SIGTERM])?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut last: Option<Instant> = None;
            for sig in signals.forever() {
                let name = if sig == SIGINT { "SIGINT" } else { "SIGTERM" };
                let second = last.is_some_and(|t| t.elapsed() < SECOND_SIGNAL);
                last = Some(Instant::now());
                if !second {
                    eprintln!("ferry: {name}: cancelling the migration (again within 1 s to kill at once)");
                    control.request_cancel(name);
                    continue;
                }
                eprintln!("ferry: {name} again: stopping now");
                control.force();
                std::thread::sleep(GRACE);
                control.kill_actors();
                std::process::exit(i32::from(super::EXIT_CANCELLED));
            }
        })?;
    Ok(())
}
