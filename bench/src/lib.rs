//! ferry's demo and benchmarks, each in a lab of its own (built with [`ferry_lab`] and torn
//! down at the end):
//! - [`demo`]: ferry's main job end to end, with a live migration and a latency plot;
//! - [`control`]: how fast a registry change reaches the agents, against the registry's size
//!   and the number of watchers;
//! - [`datapath`]: throughput and request/response latency, ferry vs two baselines;
//! - [`handoff`]: a stateful server handed off between clouds, hold vs drop;
//! - [`migrate`]: whole-container live migration with CRIU, hold vs CRIU's network lock;
//! - [`links`]: the lab's shaped links between clouds measured against their configuration;
//! - [`scale`]: the gap against the container's memory, per link profile and memory mode;
//! - [`faults`]: the fault matrix: agents and the gateway killed, links cut, a full disk, at
//!   each phase of a CRIU migration, and whether exactly one copy runs afterwards.
//!
//! `ferry-lab demo` and `ferry-lab bench ...` (package `ferry-lab-cli`) call into this crate;
//! [`BenchCmd`] is the `bench` subcommand as the binary parses it.

pub mod control;
pub mod datapath;
pub mod demo;
pub mod faults;
pub mod handoff;
pub mod links;
pub mod migrate;
pub mod samples;
pub mod scale;
pub mod stats;
pub mod workload;

use std::{
    process::{Command, Output, Stdio},
    time::Instant,
};

use clap::Subcommand;
use ferry_lab::LabError;

/// `ferry-lab bench ...`
#[derive(Debug, Subcommand)]
pub enum BenchCmd {
    /// Throughput and request/response latency between containers on two hosts: ferry vs a
    /// kernel-VXLAN + bridge overlay (flannel) vs routed veths, side by side in one lab.
    Datapath(datapath::DatapathArgs),
    /// A stateful server moving between clouds with its connections (socket hand-off): the
    /// gap a client on the internet sees, with ferry's hold queues and with drop (a network
    /// lock), for several freeze lengths.
    Handoff(handoff::HandoffArgs),
    /// Whole-container live migration with CRIU (`ferry migrate run`), ferry's hold vs CRIU's
    /// own network lock: the gap a client on the internet sees, the time the container ran
    /// nowhere, and the phases.
    Migrate(migrate::MigrateArgs),
    /// The fault matrix: each fault (an agent or the gateway SIGKILLed and restarted, a host's
    /// link cut for 3 s or 20 s, the destination's disk full) at each phase of `ferry migrate
    /// run`, with a live client: the outcome, the copies running afterwards (must be 1),
    /// resets, bytes lost, the client's longest gap and the time to converge.
    Faults(faults::FaultsArgs),
    /// Shaped links between clouds (delay, jitter, loss, rate) in a lab of their own: ping RTT
    /// and its spread, iperf3 throughput and the loss counted, configured vs measured with
    /// the relative error.
    Links(links::LinksArgs),
    /// The client's gap against the container's memory: memory size × link profile × memory
    /// mode (copy, lazy) × lock (hold, criu-lock), with the time until the last page arrived
    /// and the bytes over the link; a table, an SVG plot, `--json`; `--quick` for CI.
    Scale(scale::ScaleArgs),
    /// The control plane: change-to-applied latency (p50/p99 over the real agents and
    /// simulated watchers) against the registry's size and the number of watchers, and the
    /// bytes per watch answer against a whole snapshot; a table, `--json`.
    Control(control::ControlArgs),
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error(transparent)]
    Lab(#[from] LabError),
    #[error(transparent)]
    NetNs(#[from] ferry_overlay::netns::NetNsError),
    #[error("serialising the report: {0}")]
    Report(#[source] serde_json::Error),
    #[error("{0}")]
    Failed(String),
}

impl BenchError {
    /// An I/O error with what was being done (the lab's own variant: one shape for both).
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Lab(LabError::io(context, source))
    }

    pub fn failed(msg: impl Into<String>) -> Self {
        Self::Failed(msg.into())
    }
}

/// Runs a command to completion (stdin closed, output captured); fails on a non-zero exit.
pub(crate) fn run_checked(cmd: &mut Command) -> Result<Output, BenchError> {
    let shown = format!("{cmd:?}").replace('"', "");
    let out = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| BenchError::io(format!("running {shown}"), e))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(LabError::Command {
            command: shown,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        }
        .into())
    }
}

/// Prints a benchmark's report on stdout: exactly one JSON object with `--json`, else its table.
pub(crate) fn print_report(
    json: bool,
    report: &impl serde::Serialize,
    table: impl FnOnce() -> String,
) -> Result<(), BenchError> {
    if json {
        let text = serde_json::to_string_pretty(report).map_err(BenchError::Report)?;
        println!("{text}");
    } else {
        print!("{}", table());
    }
    Ok(())
}

/// Progress on stderr, with the time since the start.
pub(crate) struct Progress(pub(crate) Instant);

impl Progress {
    pub(crate) fn say(&self, msg: impl AsRef<str>) {
        eprintln!(
            "[{:>8.3}s] {}",
            self.0.elapsed().as_secs_f64(),
            msg.as_ref()
        );
    }
}

/// Runs a `bench` subcommand; returns the exit code (non-zero if any mode failed).
pub fn run(cmd: BenchCmd) -> Result<i32, BenchError> {
    match cmd {
        BenchCmd::Datapath(args) => datapath::run(&args),
        BenchCmd::Handoff(args) => handoff::run(&args),
        BenchCmd::Migrate(args) => migrate::run(&args),
        BenchCmd::Faults(args) => faults::run(&args),
        BenchCmd::Links(args) => links::run(&args),
        BenchCmd::Scale(args) => scale::run(&args),
        BenchCmd::Control(args) => control::run(&args),
    }
}
