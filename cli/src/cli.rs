//! Command line of `ferry`: the gateway daemon and the orchestrators' CLI (clap structures only;
//! [`crate::commands`] runs them).
//!
//! Exit codes: 0 success, 1 failure (refused by the API, unreachable gateway, timeout, …),
//! 2 usage; `ferry migrate` adds 3 (failed, rolled back) and 4 (failed, needs attention), see
//! [`MIGRATE_EXIT_CODES`]. With `--json`, every command prints exactly one JSON document on
//! stdout, an [`ferry_api::ErrorBody`] on failure.
use std::{net::Ipv4Addr, net::SocketAddr, path::PathBuf};

use clap::{Args, Parser, Subcommand};
use ferry_api::{ContainerAddr, MAX_STEP_TIMEOUT_MS, MacAddr, PublicKey};

/// The exit codes of `ferry migrate` (shown by `ferry migrate --help`).
pub const MIGRATE_EXIT_CODES: &str = "\
Steps: prepare → (CRIU checkpoint starts) freeze → (dump, transfer, restore) release; abort
instead of release if anything failed. Each step answers once the agents it concerns have
applied it (at most --timeout-ms, default the gateway's step_timeout_ms). A step repeated
answers the migration unchanged. freeze, release and abort find the migration by --container
(its active migration, else its latest) or by --id.

Exit codes:
  0  success: the step is in effect (or was already)
  1  error, nothing changed: bad input, unknown container, host or migration, a step out of
     order (bad_phase), a conflict, an unreachable gateway
  2  usage error
  3  failed, rolled back: the agents did not apply a prepare or freeze in time, so the
     gateway aborted the migration and the agents that had acted on it applied the abort;
     the container stays on its source host
  4  failed, needs attention: a step was persisted but not confirmed and not undone (a
     release or abort the agents did not apply in time, an automatic abort not applied in
     time, a lost answer); see `ferry migrate status` and `ferry hosts`";

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
    /// The gateway's API address; several gateways serving one registry (etcd),
    /// comma-separated: a request that cannot reach one goes to the next.
    #[arg(
        long,
        global = true,
        env = "FERRY_GATEWAY",
        default_value = "127.0.0.1:7400",
        value_name = "ADDR[,ADDR...]"
    )]
    pub gateway: Gateways,
    /// File holding the API's bearer token.
    #[arg(
        long,
        global = true,
        env = "FERRY_TOKEN_FILE",
        default_value = "/etc/ferry/token",
        value_name = "PATH"
    )]
    pub token_file: PathBuf,
    /// This client's TLS identity: `ca.pem`, `cert.pem` and `key.pem` (ferry certs issue).
    #[arg(
        long,
        global = true,
        env = "FERRY_TLS_DIR",
        default_value = "/etc/ferry/tls/operator",
        value_name = "DIR"
    )]
    pub tls_dir: PathBuf,
    /// The CA's certificate, instead of DIR/ca.pem.
    #[arg(long, global = true, env = "FERRY_TLS_CA", value_name = "PATH")]
    pub tls_ca: Option<PathBuf>,
    /// This client's certificate, instead of DIR/cert.pem.
    #[arg(long, global = true, env = "FERRY_TLS_CERT", value_name = "PATH")]
    pub tls_cert: Option<PathBuf>,
    /// This client's private key (mode 0600), instead of DIR/key.pem.
    #[arg(long, global = true, env = "FERRY_TLS_KEY", value_name = "PATH")]
    pub tls_key: Option<PathBuf>,
    /// Speak plain HTTP to a gateway configured with insecure_plaintext = true.
    #[arg(long, global = true, env = "FERRY_INSECURE_PLAINTEXT")]
    pub insecure_plaintext: bool,
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The TLS files this client presents.
    pub fn tls_files(&self) -> ferry_tls::TlsFiles {
        let d = ferry_tls::TlsFiles::in_dir(&self.tls_dir);
        ferry_tls::TlsFiles {
            ca: self.tls_ca.clone().unwrap_or(d.ca),
            cert: self.tls_cert.clone().unwrap_or(d.cert),
            key: self.tls_key.clone().unwrap_or(d.key),
        }
    }
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
    /// Migrate a container to another host, one step at a time (orchestrators' pre/post
    /// migration steps).
    #[command(subcommand, after_help = MIGRATE_EXIT_CODES)]
    Migrate(MigrateCommand),
    /// CRIU's action script (`criu dump|restore --action-script $(which ferry)`; `ferry`
    /// with no arguments under CRIU does the same): network-lock at dump → freeze,
    /// network-unlock at dump (a failed dump) → abort, post-resume at restore → release.
    /// The migration: FERRY_MIGRATION (its id) or FERRY_CONTAINER (its container's active
    /// one); the side: FERRY_CRIU_SIDE=dump|restore, else the parent criu's command.
    ActionScript,
    /// The cluster's TLS material: a CA, and a certificate per party (operator, gateway, each
    /// host).
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Wait until every registered host has applied the registry version current now.
    Sync {
        /// Give up (exit 1, naming the hosts behind) after this long.
        #[arg(long, default_value_t = 10_000, value_name = "MS")]
        timeout_ms: u64,
    },
}

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Make the cluster's CA: DIR/ca.pem and DIR/ca-key.pem (0600; keep it off the hosts).
    Init {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Validity in days.
        #[arg(long, default_value_t = 3650)]
        days: u32,
    },
    /// Issue one party's certificate from the CA in --ca-dir into --out (ca.pem, cert.pem,
    /// key.pem 0600, the directory 0700). Issue again and restart the party to rotate.
    Issue {
        /// The CA's directory (ferry certs init).
        #[arg(long, value_name = "DIR")]
        ca_dir: PathBuf,
        /// Where to write the party's files.
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        /// Who the certificate is for: `operator` (the orchestrators' CLI), `gateway`, or
        /// `host:NAME` (a host's agent). The gateway and hosts serve: give --ip.
        #[arg(value_name = "PARTY")]
        party: String,
        /// An address the party's server is reached at (repeatable).
        #[arg(long, value_name = "IP")]
        ip: Vec<std::net::IpAddr>,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
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
    /// Where the registry is kept, overriding the config's `store`: `file:DIR` (one gateway)
    /// or `etcd:https://IP:PORT[,...]` (any number of gateways share it; `[etcd_tls]` in the
    /// configuration; `http://` members are spoken to in plain HTTP).
    #[arg(long, value_name = "file:PATH|etcd:URLS")]
    pub store: Option<String>,
    /// Copy the file store in DIR (registry.json and its journal) into the etcd store, then
    /// exit; refused if etcd already holds a registry.
    #[arg(long, value_name = "DIR", conflicts_with = "check")]
    pub import: Option<PathBuf>,
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
    /// Hand the internet side to another gateway-role host (maintenance of the one facing it
    /// now): it answers ARP for the public addresses and containers leave through it. A
    /// standby does this by itself when the host facing the internet falls silent.
    Takeover {
        /// The gateway-role host to face the internet.
        #[arg(long, value_name = "HOST")]
        host: String,
        /// The host facing it now (refused if another does: nothing changes behind your back).
        #[arg(long, value_name = "HOST")]
        from: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum MigrateCommand {
    /// Step 1: the destination builds the container's network side and holds its packets;
    /// traffic still goes to the source.
    #[command(after_help = MIGRATE_EXIT_CODES)]
    Prepare {
        /// The container endpoint's IP.
        #[arg(long, value_name = "IP")]
        container: Ipv4Addr,
        /// The destination host.
        #[arg(long, value_name = "HOST")]
        to: String,
        #[command(flatten)]
        wait: StepWait,
    },
    /// Step 2 (as the checkpoint starts): everyone sends to the destination, which holds; the
    /// source forwards there and drops what the frozen copy still emits.
    #[command(after_help = MIGRATE_EXIT_CODES)]
    Freeze(StepArgs),
    /// Step 3 (once restored): the endpoint moves to the destination, which re-injects the
    /// held packets and announces; the source forwards stragglers for a grace period.
    #[command(after_help = MIGRATE_EXIT_CODES)]
    Release(StepArgs),
    /// Roll back a prepared or frozen migration: the container stays on its source.
    #[command(after_help = MIGRATE_EXIT_CODES)]
    Abort(StepArgs),
    /// The whole migration with CRIU, run by the gateway: prepare, freeze, dump, transfer,
    /// restore, release (or abort on any failure). Progress on stderr; at the end a per-phase
    /// report. Exit 0 released, 3 rolled back (the container runs on at its source), 4 needs
    /// attention, 1 refused.
    #[command(after_help = MIGRATE_EXIT_CODES)]
    Run {
        /// The container endpoint's IP (its agent runs its process tree).
        #[arg(long, value_name = "IP")]
        container: Ipv4Addr,
        /// The destination host.
        #[arg(long, value_name = "HOST")]
        to: String,
        /// How packets are kept while the container is stopped: `hold` (ferry) or
        /// `criu-lock` (CRIU's own nftables lock, the network switched after the restore).
        #[arg(long, value_enum, default_value = "hold")]
        lock: LockArg,
        /// Fault injection (tests, drills): CRIU fails the dump or the restore on purpose.
        #[arg(long, value_enum, hide = true)]
        fail: Option<FailArg>,
        /// The runtime the container is expected to run under (`agent`, `runc`, or `podman`:
        /// a Podman container on a ferry-cni network, moved with Podman's own checkpoint and
        /// restore); the run is refused before anything is frozen if it runs under another.
        /// Default: whichever runs it (its agent knows).
        #[arg(long, value_enum)]
        runtime: Option<RuntimeArg>,
        /// How the memory moves: `copy` (all of it while the container is stopped) or `lazy`
        /// (post-copy: the container runs at the destination as soon as everything but its
        /// memory moved; the pages follow on demand and in the background, and the run ends
        /// when the last one arrived). `lazy` needs the agent runtime.
        #[arg(long, value_enum, default_value = "copy")]
        memory: MemoryArg,
        /// No progress lines on stderr.
        #[arg(long, short)]
        quiet: bool,
    },
    /// Show migrations: those in progress (default), a container's latest (--container), or
    /// all of them with the history (--all).
    Status {
        /// Only this container's migrations.
        #[arg(long, value_name = "IP")]
        container: Option<Ipv4Addr>,
        /// Include finished ones (aborted, released).
        #[arg(long)]
        all: bool,
        /// Deadline of the request (ms).
        #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..=MAX_STEP_TIMEOUT_MS))]
        timeout_ms: Option<u64>,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum LockArg {
    Hold,
    CriuLock,
}

impl From<LockArg> for ferry_api::run::LockMode {
    fn from(l: LockArg) -> Self {
        match l {
            LockArg::Hold => Self::Hold,
            LockArg::CriuLock => Self::CriuLock,
        }
    }
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum MemoryArg {
    Copy,
    Lazy,
}

impl From<MemoryArg> for ferry_api::run::MemoryMode {
    fn from(m: MemoryArg) -> Self {
        match m {
            MemoryArg::Copy => Self::Copy,
            MemoryArg::Lazy => Self::Lazy,
        }
    }
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum RuntimeArg {
    Agent,
    Runc,
    Podman,
}

impl From<RuntimeArg> for ferry_api::run::RuntimeKind {
    fn from(r: RuntimeArg) -> Self {
        match r {
            RuntimeArg::Agent => Self::Agent,
            RuntimeArg::Runc => Self::Runc,
            RuntimeArg::Podman => Self::Podman,
        }
    }
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum FailArg {
    Dump,
    Restore,
}

impl From<FailArg> for ferry_api::run::FailAt {
    fn from(f: FailArg) -> Self {
        match f {
            FailArg::Dump => Self::Dump,
            FailArg::Restore => Self::Restore,
        }
    }
}

/// How long a step waits for the agents.
#[derive(Debug, Args)]
pub struct StepWait {
    /// Wait at most this long for the agents to apply the step (default: the gateway's
    /// step_timeout_ms).
    #[arg(long, value_name = "MS", value_parser = clap::value_parser!(u64).range(1..=MAX_STEP_TIMEOUT_MS))]
    pub timeout_ms: Option<u64>,
}

/// Which migration a step is for.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct MigrationTarget {
    /// The container's active migration (or else its latest, for a repeated step).
    #[arg(long, value_name = "IP")]
    pub container: Option<Ipv4Addr>,
    /// The migration's id (m<n>).
    #[arg(long, value_name = "ID")]
    pub id: Option<String>,
}

#[derive(Debug, Args)]
pub struct StepArgs {
    #[command(flatten)]
    pub target: MigrationTarget,
    #[command(flatten)]
    pub wait: StepWait,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn migrate_targets() {
        let c = Cli::try_parse_from(["ferry", "migrate", "freeze", "--container", "10.244.1.5"])
            .unwrap();
        let Command::Migrate(MigrateCommand::Freeze(a)) = c.command else {
            panic!("{c:?}")
        };
        assert_eq!(a.target.container, Some("10.244.1.5".parse().unwrap()));
        let c = Cli::try_parse_from([
            "ferry",
            "--json",
            "migrate",
            "release",
            "--id",
            "m3",
            "--timeout-ms",
            "250",
        ])
        .unwrap();
        assert!(c.json);
        let Command::Migrate(MigrateCommand::Release(a)) = c.command else {
            panic!("{c:?}")
        };
        assert_eq!(
            (a.target.id.as_deref(), a.wait.timeout_ms),
            (Some("m3"), Some(250))
        );
        for bad in [
            &["ferry", "migrate", "freeze"][..],
            &[
                "ferry",
                "migrate",
                "abort",
                "--id",
                "m1",
                "--container",
                "10.244.1.5",
            ],
            &[
                "ferry",
                "migrate",
                "freeze",
                "--id",
                "m1",
                "--timeout-ms",
                "0",
            ],
            &["ferry", "migrate", "prepare", "--container", "10.244.1.5"],
        ] {
            let e = Cli::try_parse_from(bad).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad:?}");
        }
        let help = Cli::command()
            .find_subcommand_mut("migrate")
            .unwrap()
            .render_help()
            .to_string();
        assert!(help.contains("3  failed, rolled back"), "{help}");
    }
}

/// `--gateway ADDR[,ADDR...]`: the first is asked first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gateways(pub Vec<SocketAddr>);

impl std::str::FromStr for Gateways {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let addrs = s
            .split(',')
            .map(str::trim)
            .filter(|a| !a.is_empty())
            .map(|a| {
                a.parse::<SocketAddr>()
                    .map_err(|e| format!("{a:?}: want IP:PORT ({e})"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if addrs.is_empty() {
            return Err("no gateway address".into());
        }
        Ok(Gateways(addrs))
    }
}

impl Gateways {
    pub fn first(&self) -> SocketAddr {
        self.0[0]
    }
    pub fn rest(&self) -> &[SocketAddr] {
        &self.0[1..]
    }
}
