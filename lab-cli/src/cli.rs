//! The `ferry-lab` command line (clap derive); [`crate::commands`] runs it.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "ferry-lab",
    version,
    about = "Labs of network namespaces standing for hosts, clouds, a gateway and the internet"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// ferry's main job in a lab: bring up the default lab with agents, start a stateful
    /// container on a1 with a public address and a client on the internet side, live-migrate
    /// it with CRIU to cloud b and back, print the timeline and plot the client's latency.
    Demo {
        /// Topology file (TOML); default: the built-in topology.
        topology: Option<PathBuf>,
        /// Print the report as JSON on stdout (progress stays on stderr).
        #[arg(long)]
        json: bool,
        /// Where to write the plot of the client's per-request latency (SVG).
        #[arg(long, value_name = "PATH", default_value = ferry_bench::demo::DEFAULT_PLOT)]
        plot: PathBuf,
    },
    /// Bring a lab up; it stays until `ferry-lab down`. Prints its prefix.
    Up {
        /// Topology file (TOML); default: the built-in topology.
        topology: Option<PathBuf>,
        /// Do not start a ferry-agent in each host.
        #[arg(long)]
        no_agents: bool,
        /// Print the prefix, namespaces and addresses as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Tear a lab down (processes, namespaces, bpffs pins, state).
    Down {
        /// The lab (default: the only lab present).
        #[arg(long, conflicts_with = "all")]
        lab: Option<String>,
        /// Every lab on this machine.
        #[arg(long)]
        all: bool,
    },
    /// Namespaces, addresses and agents of a lab.
    Status {
        #[arg(long)]
        lab: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Run a command inside a node's namespace (`ip netns exec`); exits with its status.
    /// FERRY_GATEWAY, FERRY_TOKEN_FILE and FERRY_TLS_* (the operator's identity) point at the
    /// lab's gateway, so `ferry` works there.
    Exec {
        #[arg(long)]
        lab: Option<String>,
        /// A host name, `router` or `inet`.
        host: String,
        /// The command and its arguments (after `--`).
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Run Podman on a lab host, as on that machine: the host's own storage and
    /// containers.conf, its CNI network `ferry` (ferry-cni, talking to the host's agent);
    /// exits with Podman's status. Containers started with
    /// `--network ferry --annotation org.criu.config=<state>/criu-ferry.conf` run ferry's
    /// hook under `podman container checkpoint|restore`.
    Podman {
        #[arg(long)]
        lab: Option<String>,
        /// A host name.
        host: String,
        /// Podman's arguments (after `--`).
        #[arg(last = true, required = true)]
        args: Vec<String>,
    },
    /// Start a process tree in a container (PID 1 of a new PID namespace, in the container's
    /// network namespace), through the agent of the host the container lives on: the agent's
    /// own runtime, or an OCI container under runc (`--runtime runc --image NAME`).
    Run {
        #[arg(long)]
        lab: Option<String>,
        /// The container's overlay address.
        #[arg(long)]
        container: std::net::Ipv4Addr,
        /// Print the process as JSON.
        #[arg(long)]
        json: bool,
        /// `agent` (the agent's own runtime) or `runc` (an OCI container with its own root
        /// file system).
        #[arg(long, default_value = "agent", value_parser = parse_runtime)]
        runtime: ferry_api::run::RuntimeKind,
        /// runc: the root file system, an image name in the agents' images directory (see
        /// `ferry-lab image build`).
        #[arg(long)]
        image: Option<String>,
        /// The program (absolute path) and its arguments (after `--`).
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
    /// Root file systems for runc containers, built from this machine's Debian packages
    /// (no registry) and cached in /var/cache/ferry/rootfs.
    Image {
        #[command(subcommand)]
        action: ImageAction,
    },
    /// Stop, start or restart one host's agent (as an upgrade or a crash would): its
    /// containers, namespaces and datapath stay as the agent leaves them.
    Agent {
        #[arg(long)]
        lab: Option<String>,
        /// The host whose agent it is.
        #[arg(long)]
        host: String,
        #[command(subcommand)]
        action: AgentAction,
    },
    /// Restart the lab's gateway daemon (same configuration and state directory).
    RestartGateway {
        #[arg(long)]
        lab: Option<String>,
        /// SIGKILL (a crash) instead of SIGTERM.
        #[arg(long)]
        hard: bool,
    },
    /// Benchmarks in a lab of their own (torn down at the end).
    Bench {
        #[command(subcommand)]
        what: ferry_bench::BenchCmd,
    },
    /// Labs present on this machine.
    List {
        #[arg(long)]
        json: bool,
    },
    /// The lab's shaped links between clouds (delay, jitter, loss, rate): what they are,
    /// their counters, and a measurement against what they should deliver.
    Links {
        #[command(subcommand)]
        action: LinksAction,
    },
    /// The links' forwarder (started by the lab in its router namespace).
    #[command(hide = true)]
    WanForward {
        #[arg(long)]
        config: PathBuf,
    },
    /// Wait for the owner process to exit, then tear its lab down if it is still there.
    #[command(hide = true)]
    Reap {
        #[arg(long)]
        lab: String,
        #[arg(long)]
        owner: i32,
        /// The owner's start time (field 22 of /proc/PID/stat), against PID reuse.
        #[arg(long)]
        owner_start: Option<u64>,
    },
    /// For tests: bring a lab up the way the library does (with a reaper), print its prefix,
    /// then sleep until killed.
    #[command(hide = true)]
    HoldTestLab {
        topology: Option<PathBuf>,
        #[arg(long)]
        agents: bool,
    },
}

fn parse_runtime(s: &str) -> Result<ferry_api::run::RuntimeKind, String> {
    s.parse()
        .map_err(|e: ferry_api::run::UnknownRuntime| e.to_string())
}

#[derive(Debug, Clone, Subcommand)]
pub enum ImageAction {
    /// Build an image (or find it in the cache: the name carries a key of the packages'
    /// versions); prints its name and directory.
    Build {
        /// The recipe: `redis` (redis-server, busybox and their libraries).
        name: String,
        /// Print the image as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, Subcommand)]
pub enum LinksAction {
    /// Each direction of each link: its properties and counters (packets forwarded, lost by
    /// the loss draw, dropped at the rate limit).
    Show {
        #[arg(long)]
        lab: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Measure each link (ping RTT and its spread, iperf3 throughput, loss from the
    /// counters) from a host of one cloud to a host of the other, and print configured vs
    /// measured with the relative error. Exits 1 if a figure is outside its tolerance.
    Check {
        #[arg(long)]
        lab: Option<String>,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        opts: ferry_bench::links::CheckArgs,
    },
}

#[derive(Debug, Clone, Copy, Subcommand)]
pub enum AgentAction {
    /// Send a signal to the agent and wait until it exited.
    Kill {
        /// SIGKILL (a crash) instead of SIGTERM (an upgrade).
        #[arg(long)]
        hard: bool,
    },
    /// Start the agent again with its configuration; waits until it serves.
    Start,
    /// Kill, then start.
    Restart {
        /// SIGKILL (a crash) instead of SIGTERM (an upgrade).
        #[arg(long)]
        hard: bool,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent_and_parses() {
        Cli::command().debug_assert();
        let c = Cli::try_parse_from([
            "ferry-lab",
            "exec",
            "--lab",
            "fl000000",
            "a1",
            "--",
            "ip",
            "-br",
            "a",
        ])
        .unwrap();
        match c.command {
            Cmd::Exec { lab, host, cmd } => {
                assert_eq!(lab.as_deref(), Some("fl000000"));
                assert_eq!(host, "a1");
                assert_eq!(cmd, ["ip", "-br", "a"]);
            }
            other => panic!("{other:?}"),
        }
        assert!(Cli::try_parse_from(["ferry-lab", "down", "--lab", "fl000000", "--all"]).is_err());
        assert!(Cli::try_parse_from(["ferry-lab", "exec", "a1"]).is_err());
        let c = Cli::try_parse_from([
            "ferry-lab",
            "run",
            "--container",
            "10.244.1.10",
            "--json",
            "--",
            "/bin/sleep",
            "--help",
        ])
        .unwrap();
        match c.command {
            Cmd::Run {
                lab,
                container,
                json,
                argv,
                runtime,
                image,
            } => {
                assert_eq!(runtime, ferry_api::run::RuntimeKind::Agent);
                assert_eq!(image, None);
                assert_eq!(lab, None);
                assert_eq!(container, std::net::Ipv4Addr::new(10, 244, 1, 10));
                assert!(json);
                assert_eq!(argv, ["/bin/sleep", "--help"]);
            }
            other => panic!("{other:?}"),
        }
        assert!(Cli::try_parse_from(["ferry-lab", "run", "--container", "10.244.1.10"]).is_err());
        let c = Cli::try_parse_from([
            "ferry-lab",
            "run",
            "--container",
            "10.244.1.10",
            "--runtime",
            "runc",
            "--image",
            "redis-00",
            "--",
            "/usr/bin/redis-server",
        ])
        .unwrap();
        assert!(matches!(
            c.command,
            Cmd::Run { runtime: ferry_api::run::RuntimeKind::Runc, image: Some(ref i), .. } if i == "redis-00"
        ));
        let e = Cli::try_parse_from([
            "ferry-lab",
            "run",
            "--container",
            "10.244.1.10",
            "--runtime",
            "crun",
            "--",
            "/x",
        ])
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("unknown runtime \"crun\": want agent, runc or podman"),
            "{e}"
        );
        let c = Cli::try_parse_from(["ferry-lab", "image", "build", "redis", "--json"]).unwrap();
        assert!(matches!(
            c.command,
            Cmd::Image { action: ImageAction::Build { ref name, json: true } } if name == "redis"
        ));
        let c = Cli::try_parse_from([
            "ferry-lab",
            "links",
            "check",
            "--lab",
            "fl000000",
            "--pings",
            "10",
            "--seconds",
            "0",
            "--link",
            "a,b",
            "--json",
        ])
        .unwrap();
        match c.command {
            Cmd::Links {
                action:
                    LinksAction::Check {
                        lab,
                        json: true,
                        opts,
                    },
            } => {
                assert_eq!(lab.as_deref(), Some("fl000000"));
                assert_eq!((opts.pings, opts.seconds), (10, 0));
                assert_eq!(opts.link.as_deref(), Some("a,b"));
            }
            other => panic!("{other:?}"),
        }
        let e = Cli::try_parse_from(["ferry-lab", "links", "check", "--seconds", "2"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("want 0 (no throughput runs) or 3 to 600"), "{e}");
        assert!(Cli::try_parse_from(["ferry-lab", "links", "check", "--pings", "1"]).is_err());
        let c = Cli::try_parse_from(["ferry-lab", "links", "show"]).unwrap();
        assert!(matches!(
            c.command,
            Cmd::Links {
                action: LinksAction::Show {
                    lab: None,
                    json: false
                }
            }
        ));
        let c = Cli::try_parse_from(["ferry-lab", "bench", "links", "--profile", "lan", "--json"])
            .unwrap();
        match c.command {
            Cmd::Bench {
                what: ferry_bench::BenchCmd::Links(a),
            } => {
                assert_eq!(a.profile, "lan");
                assert!(a.json && a.topology.is_none());
                assert_eq!((a.check.pings, a.check.seconds), (100, 5));
            }
            other => panic!("{other:?}"),
        }
        let c =
            Cli::try_parse_from(["ferry-lab", "up", "t.toml", "--no-agents", "--json"]).unwrap();
        assert!(matches!(
            c.command,
            Cmd::Up {
                no_agents: true,
                json: true,
                ..
            }
        ));
    }
}
