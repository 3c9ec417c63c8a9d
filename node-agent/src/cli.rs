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
    /// Remove everything this configuration's agent made (its containers' processes,
    /// namespaces and veths, the pinned datapath, the hold and VXLAN devices, its state) and
    /// exit. Refused while the agent runs. (Stopping the agent leaves all of it in place.)
    #[arg(long, conflicts_with = "check")]
    pub teardown: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}
