//! Command line of `ferry`: the gateway daemon and the orchestrators' CLI (clap structures only;
//! [`crate::commands`] runs them).
//!
//! Exit codes: 0 success, 1 failure (refused by the API, unreachable gateway, timeout, …),
//! 2 usage. With `--json`, every command prints exactly one JSON document on stdout, an
//! [`ferry_api::ErrorBody`] on failure.
use std::{net::Ipv4Addr, net::SocketAddr, path::PathBuf};

use clap::{Args, Parser, Subcommand};
use ferry_api::{ContainerAddr, MacAddr, PublicKey};

#[derive(Debug, Parser)]
#[command(
    name = "ferry",
    version,
    about = "ferry: live migration of containers, network side"
)]
pub struct Cli {
    /// Print one JSON document on stdout (errors as {"error":{"code","message"}}).
    #[arg(long, global = true)]
    pub json: bool,
    /// The gateway's API address.
    #[arg(
        long,
        global = true,
        env = "FERRY_GATEWAY",
        default_value = "127.0.0.1:7400",
        value_name = "ADDR"
    )]
    pub gateway: SocketAddr,
    /// File holding the API's bearer token.
    #[arg(
        long,
        global = true,
        env = "FERRY_TOKEN_FILE",
        default_value = "/etc/ferry/token",
        value_name = "PATH"
    )]
    pub token_file: PathBuf,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway daemon (endpoint registry, public endpoints).
    Gateway(GatewayArgs),
    /// Ask the gateway whether it is up (needs no token).
    Health,
    /// List registered hosts and whether their agents applied the current registry version.
    Hosts,
    /// Container endpoints.
    #[command(subcommand)]
    Endpoint(EndpointCommand),
    /// Public endpoints (public IP or IP:PORT/PROTO → container).
    #[command(subcommand)]
    Public(PublicCommand),
    /// Wait until every registered host has applied the registry version current now.
    Sync {
        /// Give up (exit 1, naming the hosts behind) after this long.
        #[arg(long, default_value_t = 10_000, value_name = "MS")]
        timeout_ms: u64,
    },
}

#[derive(Debug, Args)]
pub struct GatewayArgs {
    /// The daemon's TOML configuration.
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,
    /// Only validate the configuration, the token file and the stored state, then exit.
    #[arg(long)]
    pub check: bool,
}

#[derive(Debug, Subcommand)]
pub enum EndpointCommand {
    /// Register a container's overlay address on a host.
    Add {
        #[arg(long, value_name = "IP")]
        ip: Ipv4Addr,
        /// The registered host it lives on.
        #[arg(long, value_name = "NAME")]
        host: String,
        /// Default: 0e:fc: followed by the IP's four bytes.
        #[arg(long, value_name = "MAC")]
        mac: Option<MacAddr>,
    },
    /// Remove an endpoint (its public mappings are kept, so it can be re-added elsewhere).
    Rm {
        #[arg(value_name = "IP")]
        ip: Ipv4Addr,
    },
    /// List endpoints.
    List,
}

#[derive(Debug, Subcommand)]
pub enum PublicCommand {
    /// Map a public address (whole IP) or a public port to a container.
    Add {
        /// IP (whole-IP mapping) or IP:PORT/PROTO (port mapping, PROTO tcp or udp).
        #[arg(long, value_name = "IP[:PORT/PROTO]")]
        public: PublicKey,
        /// IP, or IP:PORT for a port mapping.
        #[arg(long, value_name = "IP[:PORT]")]
        container: ContainerAddr,
    },
    /// Remove a public mapping by key: IP or IP:PORT/PROTO.
    Rm {
        #[arg(value_name = "KEY")]
        key: PublicKey,
    },
    /// List public mappings.
    List,
}
