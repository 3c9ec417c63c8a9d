//! `ferry`: the orchestrators' command line ([`cli`]: the clap structures; [`commands`]: what
//! each command does; [`runcmd`]: `ferry migrate run` and CRIU's action script; [`certs`]: the
//! cluster's TLS material), and
//! `ferry gateway`, which runs the daemon of the ferry-gateway library.
use std::process::ExitCode;

mod certs;
mod cli;
mod commands;
mod hook;
mod runcmd;

use clap::Parser as _;
use cli::Cli;

fn main() -> ExitCode {
    // Run by CRIU as its --action-script (no arguments, CRTOOLS_SCRIPT_ACTION set).
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args.len() == 1 && std::env::var_os("CRTOOLS_SCRIPT_ACTION").is_some() {
        args.push("action-script".into());
    }
    let cli = Cli::parse_from(args);
    init_tracing();
    commands::run(cli)
}

fn init_tracing() {
    use std::io::IsTerminal as _;
    use tracing_subscriber::{EnvFilter, fmt};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}
