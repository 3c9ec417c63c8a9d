//! Runs a parsed `ferry-lab` command: the lab's commands through [`ferry_lab`], the demo and
//! the benchmarks through [`ferry_bench`].

use std::{
    io::Write,
    os::unix::process::ExitStatusExt,
    path::PathBuf,
    process::{Command, ExitStatus},
    time::Duration,
};

use anyhow::{Context, bail};
use serde::Serialize;

use crate::cli::{AgentAction, Cli, Cmd, ImageAction};
use ferry_lab::{
    INET, Lab, LabOptions, LabStatus, ROUTER, Topology, list_labs, netns_name, reap,
    state::{self, LabState},
    status, teardown,
    teardown::only_lab,
};

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
                c.envs(cp.cli_env());
            }
            let status = c
                .status()
                .with_context(|| format!("running `ip netns exec {ns} ...`"))?;
            Ok(exit_code(status))
        }
        Cmd::Podman { lab, host, args } => {
            let lab = Lab::attach(&pick(lab)?)?;
            lab.hook_files()?;
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let status = lab
                .podman(&host)?
                .command(&args)?
                .stdin(std::process::Stdio::inherit())
                .status()
                .with_context(|| format!("running podman on {host}"))?;
            Ok(exit_code(status))
        }
        Cmd::Agent { lab, host, action } => {
            let mut lab = Lab::attach(&pick(lab)?)?;
            let sig = |hard: bool| if hard { libc::SIGKILL } else { libc::SIGTERM };
            match action {
                AgentAction::Kill { hard } => lab.kill_agent(&host, sig(hard))?,
                AgentAction::Start => lab.start_agent(&host)?,
                AgentAction::Restart { hard } => lab.restart_agent(&host, sig(hard))?,
            }
            Ok(0)
        }
        Cmd::RestartGateway { lab, hard } => {
            let mut lab = Lab::attach(&pick(lab)?)?;
            lab.restart_gateway_with(if hard { libc::SIGKILL } else { libc::SIGTERM })?;
            Ok(0)
        }
        Cmd::Run {
            lab,
            container,
            json,
            argv,
            runtime,
            image,
        } => {
            let lab = Lab::attach(&pick(lab)?)?;
            let host = lab.endpoint_host(container)?;
            let req = ferry_api::run::StartRequest {
                argv,
                env: Vec::new(),
                runtime,
                image,
            };
            let p = lab.start_request(&host, container, &req)?;
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
        Cmd::Image {
            action: ImageAction::Build { name, json },
        } => {
            let t0 = std::time::Instant::now();
            let image = ferry_lab::image::build(&name)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&image)?);
            } else {
                eprintln!(
                    "{} {} in {:.0} ms ({} packages, {} files)",
                    if image.built { "built" } else { "cached:" },
                    image.path.display(),
                    t0.elapsed().as_secs_f64() * 1e3,
                    image.packages.len(),
                    image.files.len()
                );
                println!("{}", image.image);
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
        Cmd::WanForward { config } => {
            ferry_lab::wan::run_forwarder(&config)?;
            Ok(0)
        }
        Cmd::Links { action } => crate::links::run(action),
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

pub(crate) fn pick(lab: Option<String>) -> anyhow::Result<String> {
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
    if !s.links.is_empty() {
        println!("links (shaped by the router's forwarder; `ferry-lab links show`):");
        for l in &s.links {
            println!(
                "  {:<24} {:<16} delay {} ms ± {} ms, loss {}, rate {}",
                l.name(),
                l.profile.as_deref().unwrap_or("custom"),
                l.delay_ms,
                l.jitter_ms,
                l.loss,
                l.rate_mbit
                    .map(|r| format!("{r} Mbit/s, buffer {} ms", l.queue_ms.unwrap_or(0.0)))
                    .unwrap_or_else(|| "unlimited".into())
            );
        }
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

    #[test]
    fn bad_lab_names_are_refused() {
        assert!(pick(Some("../etc".into())).is_err());
        assert!(pick(Some("fl3a9c1e".into())).is_ok());
    }
}
