//! The `ferry` command.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Live migration of a running guest's memory and disks, speaking QEMU 7.2's
/// migration stream.
#[derive(Debug, Parser)]
#[command(name = "ferry", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Migrate guest RAM to a `ferry receive`, a QEMU 7.2 `-incoming`, or a file.
    ///
    /// Runs as separate processes: a scanner (zero pages, batches), a
    /// compression pool, and a writer that owns the connection and the
    /// bandwidth cap. With a ferry receiver, succeeds only when the
    /// destination's RAM digests match the source's.
    Send(ferry::orchestrator::SendArgs),
    /// Receive a migration stream (from `ferry send` or QEMU 7.2) into RAM files.
    ///
    /// Reports success only after the whole stream, up to EOF, was read and
    /// checked; answers a ferry sender with the digests of the RAM it loaded.
    Receive(ferry::orchestrator::ReceiveArgs),
    /// Migrate a built-in 1 GiB guest between two local ferry processes and
    /// check the copy: the quickest way to see ferry work.
    Demo(ferry::tools::demo::DemoArgs),
    /// Run a benchmark scenario and print its figures.
    Bench(ferry::tools::bench::BenchArgs),
    /// Run a synthetic guest: a RAM file dirtied at a set rate, its dirty log
    /// and a QMP-style control socket (stop, cont, set-throttle, query-status).
    ///
    /// The guest every live-migration test and benchmark runs against. Runs
    /// until SIGTERM or SIGINT, then exits 0 and removes its socket.
    Loadgen(ferry::tools::loadgen::LoadgenArgs),
    /// Run one actor process (used by ferry itself).
    #[command(name = "__actor", hide = true)]
    Actor {
        /// scanner, compress, writer or reader.
        kind: String,
        /// The orchestrator's ipc server name.
        server: String,
    },
    /// Print a migration stream's sections and page counts; extract its RAM
    /// and device state.
    ///
    /// Reads streams written by QEMU 7.2 (plain or with the compress
    /// capability) or by ferry. An invalid stream exits with status 1 and one
    /// line naming the byte offset and what is wrong.
    Inspect {
        /// The stream: a file, or `-` for standard input.
        stream: PathBuf,
        /// Print the report as JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Write each RAM block to DIR/<idstr>.ram ('/' in names becomes '_').
        #[arg(long, value_name = "DIR")]
        extract_ram: Option<PathBuf>,
        /// Write the configuration section and every non-RAM, non-block section,
        /// byte for byte, to FILE (for `ferry send --device-state`).
        #[arg(long, value_name = "FILE")]
        extract_device_state: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if let Command::Actor { kind, server } = cli.command {
        return ExitCode::from(ferry::actors::run(&kind, server) as u8);
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the error and its causes.
            eprintln!("ferry: {}", chain(&e));
            // A cancel (migrate_cancel, SIGINT, SIGTERM) is not a failure.
            match e.downcast_ref::<ferry::qmp::Cancelled>() {
                Some(_) => ExitCode::from(ferry::qmp::EXIT_CANCELLED),
                None => ExitCode::FAILURE,
            }
        }
    }
}

fn chain(e: &anyhow::Error) -> String {
    e.chain()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ")
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Send(args) => ferry::orchestrator::send::run(args),
        Command::Receive(args) => ferry::orchestrator::receive::run(args),
        Command::Demo(args) => ferry::tools::demo::run(args),
        Command::Bench(args) => ferry::tools::bench::run(args),
        Command::Loadgen(args) => ferry::tools::loadgen::run(args),
        Command::Actor { .. } => unreachable!("handled before"),
        Command::Inspect {
            stream,
            json,
            extract_ram,
            extract_device_state,
        } => {
            let report = ferry::tools::inspect::run(&ferry::tools::inspect::Options {
                stream,
                extract_ram,
                extract_device_state,
            })?;
            let mut out = std::io::stdout().lock();
            if json {
                serde_json::to_writer_pretty(&mut out, &report)?;
                writeln!(out)?;
            } else {
                ferry::tools::inspect::print_table(&report, &mut out)?;
            }
            Ok(())
        }
    }
}
