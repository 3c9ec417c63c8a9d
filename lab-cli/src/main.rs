//! `ferry-lab`: build, inspect and tear down labs of network namespaces.
use clap::Parser as _;

mod cli;
mod commands;
mod links;

fn main() {
    use std::io::IsTerminal as _;
    use tracing_subscriber::{EnvFilter, fmt};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    let cli = cli::Cli::parse();
    match commands::run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("ferry-lab: {e:#}");
            std::process::exit(1);
        }
    }
}
