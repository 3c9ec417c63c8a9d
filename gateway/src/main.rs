use std::process::ExitCode;

use clap::Parser as _;
use ferry_gateway::{cli::Cli, commands};

fn main() -> ExitCode {
    let cli = Cli::parse();
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
