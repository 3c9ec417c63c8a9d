//! The `ferry-lab` command line.

use std::{
    io::Write,
    os::unix::process::ExitStatusExt,
    path::PathBuf,
    process::{Command, ExitStatus},
    time::Duration,
};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use serde::Serialize;

use ferry_lab::{
    INET, Lab, LabOptions, LabStatus, ROUTER, Topology, list_labs, netns_name, reap,
    state::{self, LabState},
    status, teardown,
    teardown::only_lab,
};

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
    /// FERRY_GATEWAY and FERRY_TOKEN_FILE point at the lab's gateway, so `ferry` works there.
    Exec {
        #[arg(long)]
        lab: Option<String>,
        /// A host name, `router` or `inet`.
        host: String,
        /// The command and its arguments (after `--`).
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Start a process tree in a container (PID 1 of a new PID namespace, in the container's
    /// network namespace), through the agent of the host the container lives on.
    Run {
        #[arg(long)]
        lab: Option<String>,
        /// The container's overlay address.
        #[arg(long)]
        container: std::net::Ipv4Addr,
        /// Print the process as JSON.
        #[arg(long)]
        json: bool,
        /// The program (absolute path) and its arguments (after `--`).
        #[arg(last = true, required = true)]
        argv: Vec<String>,
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

#[derive(Serialize)]
struct UpReport {
    up_ms: u64,
    state_dir: PathBuf,
    #[serde(flatten)]
    status: LabStatus,
}

/// Runs the command; returns the process exit code.
pub fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Cmd::Demo {
            topology,
            json,
            plot,
        } => {
            let report = ferry_bench::demo::run_with(ferry_bench::demo::DemoOptions {
                topology: load_topology(topology)?,
                json,
                plot: Some(plot),
            })?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            }
            Ok(if report.ok() { 0 } else { 1 })
        }
        Cmd::Up {
            topology,
            no_agents,
            json,
        } => {
            let topology = load_topology(topology)?;
            let lab = Lab::up_persistent(LabOptions {
                topology,
                start_agents: !no_agents,
                ..LabOptions::default()
            })?;
            let up_ms = lab.up_duration().as_millis() as u64;
            let state_dir = lab.state_dir();
            let prefix = lab.detach();
            if json {
                let report = UpReport {
                    up_ms,
                    state_dir,
                    status: status(&prefix)?,
                };
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!("{prefix}");
            }
            Ok(0)
        }
        Cmd::Down { lab, all } => {
            let labs = if all { list_labs() } else { vec![pick(lab)?] };
            let mut failed = Vec::new();
            for prefix in &labs {
                match teardown(prefix) {
                    Ok(()) => eprintln!("{prefix}: down"),
                    Err(e) => {
                        eprintln!("{e}");
                        failed.push(prefix.clone());
                    }
                }
            }
            if failed.is_empty() {
                Ok(0)
            } else {
                bail!("teardown failed for {}", failed.join(", "))
            }
        }
        Cmd::Status { lab, json } => {
            let prefix = pick(lab)?;
            let s = status(&prefix)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                print_status(&s);
            }
            Ok(0)
        }
        Cmd::Exec { lab, host, cmd } => {
            let prefix = pick(lab)?;
            check_node(&prefix, &host)?;
            let ns = netns_name(&prefix, &host);
            let mut c = Command::new("ip");
            c.args(["netns", "exec", &ns]).args(&cmd);
            // So that `ferry-lab exec gw -- ferry hosts` talks to this lab's gateway.
            if let Some(st) = LabState::load(&prefix)?
                && let Some(cp) = ferry_lab::control::ControlPlane::of(&prefix, &st.topology)
            {
                c.env("FERRY_GATEWAY", cp.api.to_string())
                    .env("FERRY_TOKEN_FILE", &cp.token_file);
            }
            let status = c
                .status()
                .with_context(|| format!("running `ip netns exec {ns} ...`"))?;
            Ok(exit_code(status))
        }
        Cmd::Run {
            lab,
            container,
            json,
            argv,
        } => {
            let lab = Lab::attach(&pick(lab)?)?;
            let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
            let p = lab.start_process(container, &argv)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&p)?);
            } else {
                println!(
                    "container {}: PID {} ({}{}) {}",
                    p.container,
                    p.pid,
                    p.origin,
                    if p.running { ", running" } else { "" },
                    p.argv.join(" ")
                );
                if let Some(e) = &p.ended {
                    println!("  ended: {e}");
                }
            }
            Ok(0)
        }
        Cmd::Bench { what } => Ok(ferry_bench::run(what)?),
        Cmd::List { json } => {
            let labs = list_labs();
            if json {
                println!("{}", serde_json::to_string_pretty(&labs)?);
            } else {
                for l in labs {
                    println!("{l}");
                }
            }
            Ok(0)
        }
        Cmd::Reap {
            lab,
            owner,
            owner_start,
        } => {
            reap(&lab, owner, owner_start)?;
            Ok(0)
        }
        Cmd::HoldTestLab { topology, agents } => {
            let topology = load_topology(topology)?;
            let lab = Lab::up(LabOptions {
                topology,
                start_agents: agents,
                ..LabOptions::default()
            })?;
            let mut out = std::io::stdout().lock();
            writeln!(out, "{}", lab.prefix())?;
            out.flush()?;
            drop(out);
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
    }
}

fn load_topology(path: Option<PathBuf>) -> anyhow::Result<Topology> {
    Ok(match path {
        Some(p) => Topology::load(&p)?,
        None => Topology::default_lab(),
    })
}

fn pick(lab: Option<String>) -> anyhow::Result<String> {
    match lab {
        Some(l) => {
            state::check_prefix(&l)?;
            Ok(l)
        }
        None => Ok(only_lab()?),
    }
}

/// Checks that `node` is a node of lab `prefix` (by its recorded topology, else by its
/// namespace existing).
fn check_node(prefix: &str, node: &str) -> anyhow::Result<()> {
    match LabState::load(prefix)? {
        Some(st) => {
            let nodes = ferry_lab::lab::nodes(&st.topology);
            if !nodes.iter().any(|n| n == node) {
                bail!(
                    "lab {prefix} has no node {node:?} (nodes: {})",
                    nodes.join(", ")
                );
            }
        }
        None => {
            let path = ferry_overlay::netns::netns_path(&netns_name(prefix, node));
            if !path.exists() {
                bail!(
                    "lab {prefix} has no node {node:?} ({} is missing)",
                    path.display()
                );
            }
        }
    }
    Ok(())
}

fn exit_code(status: ExitStatus) -> i32 {
    status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1)
}

fn print_status(s: &LabStatus) {
    let kind = match s.persistent {
        Some(true) => "persistent".to_owned(),
        Some(false) => format!("owned by PID {}", s.owner_pid.unwrap_or(0)),
        None => "no state directory: partly torn down?".to_owned(),
    };
    println!("lab {} ({kind})", s.prefix);
    println!("namespaces:");
    for n in &s.namespaces {
        println!(
            "  {:<20} {}",
            n.name,
            if n.exists { "present" } else { "MISSING" }
        );
    }
    if !s.hosts.is_empty() {
        println!("hosts:");
        for h in &s.hosts {
            let host = &h.host;
            let public = host
                .public_address
                .map(|p| format!("  public {p}"))
                .unwrap_or_default();
            println!(
                "  {:<10} {:<8} cloud {:<12} {}/{}  overlay {}{public}  netns {}",
                host.name,
                host.role.to_string(),
                host.cloud,
                host.address,
                host.prefix_len,
                host.overlay_ip,
                h.namespace
            );
        }
        println!(
            "  {:<10} router (one bridge per cloud)  netns {}",
            ROUTER,
            netns_name(&s.prefix, ROUTER)
        );
    }
    if let Some(c) = &s.internet_client {
        println!(
            "  {:<10} internet client {c}  netns {}",
            INET,
            netns_name(&s.prefix, INET)
        );
    }
    if !s.processes.is_empty() {
        println!("processes:");
        for p in &s.processes {
            println!(
                "  {:<7} {:<10} PID {:<8} {}",
                p.process.kind,
                p.process.host.as_deref().unwrap_or("-"),
                p.process.pid,
                if p.alive { "alive" } else { "dead" }
            );
        }
    }
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
            } => {
                assert_eq!(lab, None);
                assert_eq!(container, std::net::Ipv4Addr::new(10, 244, 1, 10));
                assert!(json);
                assert_eq!(argv, ["/bin/sleep", "--help"]);
            }
            other => panic!("{other:?}"),
        }
        assert!(Cli::try_parse_from(["ferry-lab", "run", "--container", "10.244.1.10"]).is_err());
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

    #[test]
    fn bad_lab_names_are_refused() {
        assert!(pick(Some("../etc".into())).is_err());
        assert!(pick(Some("fl3a9c1e".into())).is_ok());
    }
}
