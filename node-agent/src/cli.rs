//! Command line of `ferry-agent`.
use std::path::PathBuf;

use clap::{Parser, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "ferry-agent",
    version,
    about = "ferry's node agent (one per host)"
)]
pub struct Cli {
    /// Agent configuration (TOML).
    #[arg(long, short, env = "FERRY_AGENT_CONFIG")]
    pub config: PathBuf,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, env = "FERRY_LOG_FORMAT")]
    pub log_format: LogFormat,
    /// Check the configuration and exit.
    #[arg(long)]
    pub check: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}
