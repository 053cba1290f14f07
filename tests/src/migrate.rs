//! `ferry send` and `ferry receive` command lines, and what their `--stats-json`
//! must show after a completed migration.
//!
//! The checks compare the sender's figures with evidence it does not produce
//! itself: the destination's bytes, and the pages the next round really sent.

use std::fs;
use std::path::Path;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::proc::{ferry, Process, Spawn};
use crate::ram::PAGE_SIZE;

/// `PATH,name=NAME`, a `--ram` or `--disk` value.
pub fn named(path: &Path, name: &str) -> String {
    format!("{},name={name}", path.display())
}

/// `ferry receive --listen LISTEN --ram DEST,name=ram --stats-json STATS`.
pub fn receive_args(listen: &str, dest: &Path, stats: &Path) -> Vec<String> {
    vec![
        "receive".to_owned(),
        "--listen".into(),
        listen.into(),
        "--ram".into(),
        named(dest, "ram"),
        "--stats-json".into(),
        stats.display().to_string(),
    ]
}

/// [`receive_args`] with the statistics in `DIR/receive.json`; start it with
/// [`Spawn::start_listening`].
pub fn receive(dir: &Path, listen: &str, dest: &Path) -> Spawn {
    ferry(&receive_args(listen, dest, &dir.join("receive.json")))
}

/// `ferry send --to TO --no-progress --stats-json DIR/NAME.json`; add the RAM
/// (`--ram`, or a guest's `send_args`).
pub fn send(dir: &Path, name: &str, to: &str) -> Spawn {
    ferry(&[
        "send".to_owned(),
        "--to".into(),
        to.into(),
        "--no-progress".into(),
        "--stats-json".into(),
        dir.join(format!("{name}.json")).display().to_string(),
    ])
}

/// Waits until `bytes` of the stream have landed at the destination: the
/// receiver's reader has written that much into the RAM file (`pwrite`, by the
/// kernel's count), whatever the transport. Returns the reader's pid.
pub fn wait_landed(r: &Process, bytes: u64, timeout: Duration) -> u32 {
    let reader = r
        .wait_actor("reader", Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e}"));
    crate::proc::wait_written(reader, bytes, timeout)
        .unwrap_or_else(|e| panic!("the stream did not land: {e}"));
    reader
}

/// Waits for the sender (at most `timeout`) and then the receiver (30 s);
/// panics, quoting its stderr, unless each exits 0.
pub fn assert_both_succeed(s: &mut Process, r: &mut Process, timeout: Duration) {
    for (p, what, t) in [
        (s, "send", timeout),
        (r, "receive", Duration::from_secs(30)),
    ] {
        let st = p
            .wait(t)
            .unwrap_or_else(|e| panic!("ferry {what} did not end: {e}"));
        assert!(st.success(), "ferry {what} failed ({st}): {}", p.stderr());
    }
}

fn u64_at(v: &Value, what: &str) -> u64 {
    v.as_u64()
        .unwrap_or_else(|| panic!("{what} is not a count: {v}"))
}

/// The sender's `ram.remaining` after a completed run must be what the
/// destination really lacks: the bytes of the pages where `dest` differs from
/// `source` (none after a good migration).
pub fn assert_remaining_is_what_the_destination_lacks(stats: &Value, source: &Path, dest: &Path) {
    let (a, b) = (
        fs::read(source).expect("source"),
        fs::read(dest).expect("dest"),
    );
    let lacking = a
        .chunks(PAGE_SIZE)
        .zip(b.chunks(PAGE_SIZE).chain(std::iter::repeat(&[][..])))
        .filter(|(x, y)| x != y)
        .count()
        * PAGE_SIZE;
    let remaining = u64_at(&stats["ram"]["remaining"], "ram.remaining");
    assert_eq!(
        remaining, lacking as u64,
        "the sender says {remaining} bytes remain; the destination lacks {lacking}"
    );
}

/// The rounds of a completed live migration of `ram_pages` pages: round 0 sent
/// every page; every page the guest left dirty at the end of a round went out
/// again in the next (the final round, after the stop, is not in `rounds`: it
/// is what the page counts hold beyond them); so a guest that dirtied memory
/// made the sender send more pages than it has. With a disk (`dirty-bytes`
/// then counts disk chunks too) only the totals are compared.
pub fn assert_rounds_resend_what_was_dirty(stats: &Value, ram_pages: u64, disk: bool) {
    let rounds = stats["rounds"].as_array().expect("rounds");
    let first = rounds.first().expect("a live migration reports round 0");
    assert_eq!(
        u64_at(&stats["iterations"], "iterations"),
        rounds.len() as u64 + 1,
        "the final round follows the reported ones"
    );
    assert_eq!(u64_at(&first["pages"], "round 0 pages"), ram_pages);
    let ram = &stats["ram"];
    let sent_total: u64 = ["duplicate", "normal", "compressed"]
        .iter()
        .map(|k| u64_at(&ram[k], k))
        .sum();
    let in_rounds: u64 = rounds.iter().map(|r| u64_at(&r["pages"], "pages")).sum();
    assert!(
        sent_total > ram_pages && sent_total >= in_rounds,
        "{sent_total} pages sent in all, {in_rounds} in the reported rounds, \
         for {ram_pages} pages of a guest that wrote throughout"
    );
    if disk {
        return;
    }
    let next_pages = rounds
        .iter()
        .skip(1)
        .map(|r| u64_at(&r["pages"], "pages"))
        .chain([sent_total - in_rounds]);
    for (r, next) in rounds.iter().zip(next_pages) {
        let dirty = u64_at(&r["dirty-bytes"], "dirty-bytes") / PAGE_SIZE as u64;
        assert!(
            next >= dirty,
            "round {} ended with {dirty} dirty pages, the next sent only {next}: {stats}",
            r["round"]
        );
    }
}

/// How a sender and a receiver ended, and when, counted from a moment of the test's.
#[derive(Debug, Clone, Copy)]
pub struct Ends {
    /// The sender's exit status.
    pub send: ExitStatus,
    /// When the sender had exited.
    pub send_took: Duration,
    /// The receiver's exit status.
    pub recv: ExitStatus,
    /// When the receiver had exited.
    pub recv_took: Duration,
}

/// Waits for both to exit, watching both at once so each one's time is its
/// own; panics, quoting both, if not both end within `limit` after `since`.
pub fn wait_ends(s: &mut Process, r: &mut Process, since: Instant, limit: Duration) -> Ends {
    let (mut se, mut re) = (None, None);
    loop {
        if se.is_none() {
            se = s.try_status().unwrap().map(|st| (st, since.elapsed()));
        }
        if re.is_none() {
            re = r.try_status().unwrap().map(|st| (st, since.elapsed()));
        }
        if let (Some((send, send_took)), Some((recv, recv_took))) = (se, re) {
            return Ends {
                send,
                send_took,
                recv,
                recv_took,
            };
        }
        assert!(
            since.elapsed() < limit,
            "not both ended within {limit:?} (send {se:?}, receive {re:?})\nsend: {}\nreceive: {}",
            s.stderr(),
            r.stderr()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}
