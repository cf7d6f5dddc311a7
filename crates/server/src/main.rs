//! The `meridian` binary: runs a node and talks to running nodes.
//!
//! - `meridian start`: runs a node until Ctrl-C or SIGTERM.
//! - `meridian init --host ADDR`: initializes a cluster through one of its nodes.
//! - `meridian status --host ADDR`: prints a node's view of the cluster.
//! - `meridian kv get|put|delete|scan --host ADDR`: the key-value API, for tests and
//!   debugging; requests follow the leader hint of `NotLeader` errors.
//! - `meridian txn --host ADDR OPERATION...`: one read-write transaction (or, with
//!   `--read-only`, `--as-of`, `--max-staleness`, a read-only one), for tests and debugging.
//!
//! `main` stays thin: it parses flags, sets up logging and hands over to the node crate or the
//! client commands in `commands.rs`.

mod commands;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = commands::Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(commands::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
