//! Command line of `ferry`: the gateway daemon and the orchestrators' CLI.
use std::{net::SocketAddr, path::PathBuf};

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "ferry",
    version,
    about = "ferry: live migration of containers, network side"
)]
pub struct Cli {
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway daemon (endpoint registry, public endpoints, migration coordinator).
    Gateway {
        /// Address of the API.
        #[arg(long, default_value = "127.0.0.1:7400", env = "FERRY_GATEWAY_LISTEN")]
        listen: SocketAddr,
        /// Directory for the gateway's persistent state.
        #[arg(
            long,
            default_value = "/var/lib/ferry/gateway",
            env = "FERRY_GATEWAY_STATE"
        )]
        state_dir: PathBuf,
    },
    /// Ask a gateway whether it is up.
    Health {
        /// The gateway's API address.
        #[arg(long, default_value = "127.0.0.1:7400", env = "FERRY_GATEWAY")]
        gateway: SocketAddr,
    },
}
