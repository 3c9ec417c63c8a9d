//! `ferry-lab bench faults`: the fault matrix. Each fault is injected at each phase of a
//! `ferry migrate run` (CRIU, whole container) while a client on the internet side talks to
//! the container through its public address, and each cell reports what a user would want to
//! know: how the run ended, how many copies of the container run afterwards (must be 1), and
//! what the client saw.
//!
//! **Landing a fault in a phase** uses ferry's fault points (`ferry_api::faultpoint`): the lab
//! gives its gateway and agents `FERRY_FAULT_DIR=<lab state>/faults`; the harness arms the
//! phase's point (creates the file), starts the run, waits for `<point>.reached`, injects the
//! fault, and disarms (removes the file). No guessed sleeps: the only timed wait is a link
//! cut's own length, which is the fault.
//!
//! | phase (point) | who is paused there |
//! |---|---|
//! | `prepare` | the gateway: the prepare is persisted, the agents not yet waited for |
//! | `dump` | CRIU's hook (`ferry`) at the source: tasks frozen, freeze applied, CRIU dumping |
//! | `transfer` | the source agent: the dump is on disk, images not yet streamed |
//! | `restore` | the destination agent: images received, `criu restore` not started |
//! | `release` | the destination agent: restored, the release not yet asked for |
//!
//! | fault | what the harness does at the point |
//! |---|---|
//! | `kill-source-agent` / `kill-dest-agent` | SIGKILL to that host's agent, disarm, start it again at once (a supervisor's `Restart=always`) |
//! | `kill-gateway` | SIGKILL to the gateway daemon, disarm, start it again at once (same configuration and state directory) |
//! | `kill-etcd-member` | in a lab whose registry is on etcd (three members, one per cloud): SIGKILL to the member on the run's source host, disarm, and leave it dead until the cell converged (then it starts again from its data) |
//! | `kill-gateway-takeover` | in a lab whose registry is on etcd (three members, one per cloud) with a second gateway on a2: SIGKILL to the main gateway, disarm, and leave it dead until the cell converged: the second gateway takes the run over once the dead one's lease ends, the CLI and the agents fall back to it |
//! | `cut-gateway-etcd` | the same lab as `kill-gateway-takeover`; the main gateway's host cut off from etcd (TCP to etcd's ports of every other host refused both ways: the gateway reaches only its own host's member, which loses its peers), disarm, and leave it cut until the cell converged: the gateway stays alive and answering, stops driving the run once its lease may have lapsed, refuses changes and sends its agents away; the second gateway takes the run over |
//! | `cut-source-3s` … `cut-dest-20s` | the host's underlay link down (its port on the cloud's bridge, in the router namespace: the host loses carrier, as with a cut cable or a dead switch port), disarm, keep it down 3 s / 20 s, up again |
//! | `disk-full-dest` | the destination's CRIU work directory (a 16 MiB tmpfs the harness mounted there for this lab) filled to the last byte, disarm; it stays full until the cell ends |
//!
//! Then the harness waits (at most `--converge-timeout-secs` after the fault ended) until the
//! system has **converged**: the run is finished (`GET /v1/runs/ID`; a run the gateway no
//! longer knows counts as finished once `ferry migrate run` has exited), the container has no
//! active migration, exactly one copy runs ([`copies`]), the registry's endpoint is on the
//! host where it runs, and the client is answered again (no request older than 1 s is
//! owed on a live connection). Then the client is stopped (it drains what is owed), a fresh
//! client probes the public address, and copies, endpoint and status are read once more:
//! those final readings are the cell's figures.
//!
//! Labs: one per fault, the container migrated a1 → b1 → a1 … from cell to cell; a cell that
//! leaves the lab unhealthy (not exactly one copy, the endpoint elsewhere, a migration still
//! active) is followed by a fresh lab. Every lab is torn down and checked for leftovers.

pub mod cell;
pub mod copies;

use std::{fmt::Write as _, time::Instant};

use clap::{Args, ValueEnum};
use serde::Serialize;

use crate::{BenchError, Progress, print_report};

/// Where a fault is injected: the phases of a run, by their fault point's name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Prepare,
    Dump,
    Transfer,
    Restore,
    Release,
}

impl Phase {
    pub const ALL: [Phase; 5] = [
        Phase::Prepare,
        Phase::Dump,
        Phase::Transfer,
        Phase::Restore,
        Phase::Release,
    ];

    /// The fault point (`ferry_api::faultpoint`) that stops the run in this phase.
    pub fn point(self) -> &'static str {
        match self {
            Phase::Prepare => "prepare",
            Phase::Dump => "dump",
            Phase::Transfer => "transfer",
            Phase::Restore => "restore",
            Phase::Release => "release",
        }
    }
}

/// Which side of the migration a fault hits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Source,
    Dest,
}

/// The faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    /// SIGKILL the source host's agent, then start it again.
    KillSourceAgent,
    /// SIGKILL the destination host's agent, then start it again.
    KillDestAgent,
    /// SIGKILL the gateway daemon, then start it again.
    KillGateway,
    /// SIGKILL the main gateway of two on etcd; the other takes the run over.
    KillGatewayTakeover,
    /// SIGKILL the main gateway of two on etcd, then start it again at once (its lease still
    /// holds the run's claim).
    KillGatewayRestartEtcd,
    /// SIGKILL one etcd member of three (the one on the source host).
    KillEtcdMember,
    /// SIGKILL etcd's leader (one member of three): a change in flight was forwarded to it.
    KillEtcdLeader,
    /// The main gateway of two on etcd cut off from etcd (alive, answering); the other takes
    /// the run over.
    CutGatewayEtcd,
    /// The source host's underlay link down for 3 s.
    #[value(name = "cut-source-3s")]
    #[serde(rename = "cut-source-3s")]
    CutSource3s,
    /// The source host's underlay link down for 20 s.
    #[value(name = "cut-source-20s")]
    #[serde(rename = "cut-source-20s")]
    CutSource20s,
    /// The destination host's underlay link down for 3 s.
    #[value(name = "cut-dest-3s")]
    #[serde(rename = "cut-dest-3s")]
    CutDest3s,
    /// The destination host's underlay link down for 20 s.
    #[value(name = "cut-dest-20s")]
    #[serde(rename = "cut-dest-20s")]
    CutDest20s,
    /// The destination's CRIU work directory full.
    DiskFullDest,
}

impl Fault {
    pub const ALL: [Fault; 13] = [
        Fault::KillSourceAgent,
        Fault::KillDestAgent,
        Fault::KillGateway,
        Fault::KillGatewayTakeover,
        Fault::KillGatewayRestartEtcd,
        Fault::KillEtcdMember,
        Fault::KillEtcdLeader,
        Fault::CutGatewayEtcd,
        Fault::CutSource3s,
        Fault::CutSource20s,
        Fault::CutDest3s,
        Fault::CutDest20s,
        Fault::DiskFullDest,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Fault::KillSourceAgent => "kill-source-agent",
            Fault::KillDestAgent => "kill-dest-agent",
            Fault::KillGateway => "kill-gateway",
            Fault::KillGatewayTakeover => "kill-gateway-takeover",
            Fault::KillGatewayRestartEtcd => "kill-gateway-restart-etcd",
            Fault::KillEtcdMember => "kill-etcd-member",
            Fault::KillEtcdLeader => "kill-etcd-leader",
            Fault::CutGatewayEtcd => "cut-gateway-etcd",
            Fault::CutSource3s => "cut-source-3s",
            Fault::CutSource20s => "cut-source-20s",
            Fault::CutDest3s => "cut-dest-3s",
            Fault::CutDest20s => "cut-dest-20s",
            Fault::DiskFullDest => "disk-full-dest",
        }
    }

    /// A link cut: which side, how long.
    pub fn cut(self) -> Option<(Side, std::time::Duration)> {
        let s = std::time::Duration::from_secs;
        match self {
            Fault::CutSource3s => Some((Side::Source, s(3))),
            Fault::CutSource20s => Some((Side::Source, s(20))),
            Fault::CutDest3s => Some((Side::Dest, s(3))),
            Fault::CutDest20s => Some((Side::Dest, s(20))),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct FaultsArgs {
    /// Print exactly one JSON object on stdout instead of the table (progress stays on stderr).
    #[arg(long)]
    pub json: bool,
    /// Repetitions of every cell.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub repeat: u32,
    /// Faults to inject (repeatable; default: all).
    #[arg(long = "fault", value_enum)]
    pub faults: Vec<Fault>,
    /// Phases to inject them in (repeatable; default: all).
    #[arg(long = "phase", value_enum)]
    pub phases: Vec<Phase>,
    /// How long after the fault ended the system gets to converge before the cell is
    /// reported as not converged.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub converge_timeout_secs: u64,
    /// Client connections through the public address.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=100))]
    pub connections: u64,
    /// Milliseconds between two requests on a connection.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub interval_ms: u64,
}

impl FaultsArgs {
    pub fn faults(&self) -> Vec<Fault> {
        if self.faults.is_empty() {
            Fault::ALL.to_vec()
        } else {
            Fault::ALL
                .into_iter()
                .filter(|f| self.faults.contains(f))
                .collect()
        }
    }

    pub fn phases(&self) -> Vec<Phase> {
        if self.phases.is_empty() {
            Phase::ALL.to_vec()
        } else {
            Phase::ALL
                .into_iter()
                .filter(|p| self.phases.contains(p))
                .collect()
        }
    }
}

/// One cell: a fault at a phase, one repetition, as measured.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Cell {
    pub fault: String,
    pub phase: String,
    pub repeat: u32,
    /// `released`, `rolled_back` or `needs_attention` (the run's end as ferry reports it; a
    /// run nobody can account for is `needs_attention`).
    pub outcome: String,
    /// Copies of the container running afterwards (must be 1).
    pub copies: u32,
    /// Connections of the cell's client that were reset.
    pub resets: u64,
    /// Requests never answered × the request's size (upper bound).
    pub bytes_lost: u64,
    /// The client's longest silence on one connection during the cell.
    pub gap_ms: Option<f64>,
    /// Fault injected → converged (`None`: not converged within the timeout).
    pub converge_ms: Option<f64>,
    pub converged: bool,
    /// The invariant held: 1 copy, owning its IP and public address, 0 resets, 0 bytes lost,
    /// no wrong reply, the status names where it runs, converged.
    pub ok: bool,
    /// What broke the invariant.
    pub violations: Vec<String>,
    pub from: String,
    pub to: String,
    /// The host the one running copy is on.
    pub ends_on: Option<String>,
    /// Hosts of every running copy (`?`: a namespace no host names any more).
    pub copy_hosts: Vec<String>,
    /// Copies that exist but are stopped (a source left stopped after its dump, say).
    pub stopped_copies: u32,
    /// The registry's endpoint host for the container.
    pub endpoint_host: Option<String>,
    /// Where the run report (else the migration's record) says the container is.
    pub status_host: Option<String>,
    /// `kill-gateway-takeover`, `cut-gateway-etcd`: the run's report says another gateway
    /// took it over.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub taken_over: Option<bool>,
    /// `cut-gateway-etcd`: runs the cut-off gateway stopped driving during the cell (its
    /// `ferry_gateway_store_events_total{kind="handed_over"}`; 0 when the run had not
    /// started driving yet, as in `prepare`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handed_over: Option<u64>,
    /// A fresh client through the public address got its replies.
    pub public_reachable: bool,
    /// The fault point was reached and the fault injected.
    pub fault_landed: bool,
    pub run_id: Option<String>,
    /// The gateway's last word on the run: a run state, `lost` (it does not know the run),
    /// or `unknown` (never read).
    pub run_state: String,
    /// `ferry migrate run`'s exit code.
    pub cli_exit: Option<i32>,
    /// The run's `stopped_ms` (CRIU seizing → tasks resumed at the destination).
    pub stopped_ms: Option<f64>,
    pub mismatches: u64,
    pub unanswered: u64,
    /// The lab the cell ran in.
    pub lab: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Cell {
    /// Fills in [`Cell::ok`] and [`Cell::violations`] from the figures.
    pub fn judge(&mut self) {
        let mut v = Vec::new();
        if !self.fault_landed {
            v.push("the fault did not land".to_owned());
        }
        if self.copies != 1 {
            v.push(format!(
                "{} copies run ({})",
                self.copies,
                self.copy_hosts.join(", ")
            ));
        }
        if self.copies == 1 && self.endpoint_host != self.ends_on {
            v.push(format!(
                "runs on {} but the endpoint is on {}",
                self.ends_on.as_deref().unwrap_or("?"),
                self.endpoint_host.as_deref().unwrap_or("-")
            ));
        }
        if self.copies == 1 && self.status_host != self.ends_on {
            v.push(format!(
                "runs on {} but the status says {}",
                self.ends_on.as_deref().unwrap_or("?"),
                self.status_host.as_deref().unwrap_or("nothing")
            ));
        }
        if !self.public_reachable {
            v.push("the public address does not answer".into());
        }
        if self.taken_over == Some(false) {
            v.push("no other gateway took the run over".into());
        }
        if self.resets > 0 {
            v.push(format!("{} connections reset", self.resets));
        }
        if self.bytes_lost > 0 {
            v.push(format!("{} bytes lost", self.bytes_lost));
        }
        if self.mismatches > 0 {
            v.push(format!("{} wrong replies", self.mismatches));
        }
        if !self.converged {
            v.push("not converged".into());
        }
        self.ok = v.is_empty();
        self.violations = v;
    }
}

/// One lab the bench used, and what its teardown left.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LabRecord {
    pub prefix: String,
    pub fault: String,
    pub cells: u32,
    pub leftovers: Vec<String>,
    /// Why the next cell got a fresh lab (the last cell left this one broken, or it did not
    /// settle before the next cell).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replaced: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Params {
    pub repeat: u32,
    pub converge_timeout_secs: u64,
    pub connections: u64,
    pub interval_ms: u64,
    pub container: &'static str,
    pub public: &'static str,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub cells: Vec<Cell>,
    pub labs: Vec<LabRecord>,
    /// Cells whose invariant held / did not.
    pub passed: u32,
    pub failed: u32,
    pub params: Params,
}

impl Report {
    pub fn build(args: &FaultsArgs, cells: Vec<Cell>, labs: Vec<LabRecord>) -> Self {
        let passed = cells.iter().filter(|c| c.ok).count() as u32;
        Self {
            failed: cells.len() as u32 - passed,
            passed,
            cells,
            labs,
            params: Params {
                repeat: args.repeat,
                converge_timeout_secs: args.converge_timeout_secs,
                connections: args.connections,
                interval_ms: args.interval_ms,
                container: crate::migrate::CONTAINER,
                public: crate::migrate::PUBLIC,
            },
        }
    }

    /// Something failed: a cell's invariant, a lab's teardown.
    pub fn bad(&self) -> bool {
        self.failed > 0
            || self
                .labs
                .iter()
                .any(|l| !l.leftovers.is_empty() || l.error.is_some())
    }

    /// The table for people.
    pub fn table(&self) -> String {
        let num = |x: Option<f64>| x.map_or("-".to_owned(), |v| format!("{v:.0}"));
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:<18} {:<9} {:>3} {:<16} {:>6} {:>6} {:>8} {:>8} {:>10} {:<8} {:<4} why",
            "fault",
            "phase",
            "rep",
            "outcome",
            "copies",
            "resets",
            "lost B",
            "gap ms",
            "conv. ms",
            "ends on",
            "ok"
        );
        for c in &self.cells {
            let _ = writeln!(
                s,
                "{:<18} {:<9} {:>3} {:<16} {:>6} {:>6} {:>8} {:>8} {:>10} {:<8} {:<4} {}",
                c.fault,
                c.phase,
                c.repeat,
                c.outcome,
                c.copies,
                c.resets,
                c.bytes_lost,
                num(c.gap_ms),
                num(c.converge_ms),
                c.copy_hosts.join(","),
                if c.ok { "yes" } else { "NO" },
                c.violations.join("; ")
            );
        }
        let _ = writeln!(
            s,
            "{} cells: {} hold the invariant, {} do not (1 copy running, owning its IP and \
             public address, 0 resets, 0 bytes lost, status names its host, converged within \
             {} s of the fault's end)",
            self.cells.len(),
            self.passed,
            self.failed,
            self.params.converge_timeout_secs
        );
        for l in &self.labs {
            if !l.leftovers.is_empty() || l.error.is_some() {
                let _ = writeln!(
                    s,
                    "lab {} ({}): {}{}",
                    l.prefix,
                    l.fault,
                    l.error.as_deref().unwrap_or(""),
                    if l.leftovers.is_empty() {
                        String::new()
                    } else {
                        format!(" left behind: {}", l.leftovers.join(", "))
                    }
                );
            }
        }
        s
    }
}

/// Runs the matrix; returns the exit code (non-zero if a cell broke the invariant or a lab
/// left something behind).
pub fn run(args: &FaultsArgs) -> Result<i32, BenchError> {
    let p = Progress(Instant::now());
    let (cells, labs) = cell::run_matrix(&p, args)?;
    let report = Report::build(args, cells, labs);
    print_report(args.json, &report, || report.table())?;
    p.say(format!(
        "faults: {} cells, {} hold the invariant, {} do not",
        report.cells.len(),
        report.passed,
        report.failed
    ));
    Ok(if report.bad() { 1 } else { 0 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: FaultsArgs,
    }

    #[test]
    fn selections_keep_the_matrix_order() {
        let c = Cli::parse_from([
            "x",
            "--fault",
            "disk-full-dest",
            "--fault",
            "cut-source-3s",
            "--phase",
            "release",
            "--phase",
            "prepare",
        ]);
        assert_eq!(c.args.faults(), [Fault::CutSource3s, Fault::DiskFullDest]);
        assert_eq!(c.args.phases(), [Phase::Prepare, Phase::Release]);
        let all = Cli::parse_from(["x"]);
        assert_eq!(all.args.faults().len(), Fault::ALL.len());
        assert_eq!(Fault::ALL.len(), 13);
        assert_eq!(all.args.phases().len(), 5);
        assert!(Cli::try_parse_from(["x", "--fault", "nope"]).is_err());
        for f in Fault::ALL {
            assert_eq!(
                serde_json::to_value(f).unwrap(),
                serde_json::Value::String(f.name().into())
            );
            let parsed = Cli::parse_from(["x", "--fault", f.name()]);
            assert_eq!(parsed.args.faults(), [f]);
        }
    }

    fn good() -> Cell {
        Cell {
            fault: "kill-gateway".into(),
            phase: "dump".into(),
            outcome: "released".into(),
            copies: 1,
            ends_on: Some("b1".into()),
            copy_hosts: vec!["b1".into()],
            endpoint_host: Some("b1".into()),
            status_host: Some("b1".into()),
            public_reachable: true,
            fault_landed: true,
            converged: true,
            ..Cell::default()
        }
    }

    #[test]
    fn the_invariant_names_each_violation() {
        let mut c = good();
        c.judge();
        assert!(c.ok, "{:?}", c.violations);
        let mut two = good();
        two.copies = 2;
        two.ends_on = None;
        two.copy_hosts = vec!["a1".into(), "b1".into()];
        two.resets = 1;
        two.bytes_lost = 42;
        two.judge();
        assert!(!two.ok);
        assert_eq!(
            two.violations,
            [
                "2 copies run (a1, b1)",
                "1 connections reset",
                "42 bytes lost"
            ]
        );
        let mut elsewhere = good();
        elsewhere.endpoint_host = Some("a1".into());
        elsewhere.status_host = None;
        elsewhere.converged = false;
        elsewhere.judge();
        assert_eq!(
            elsewhere.violations,
            [
                "runs on b1 but the endpoint is on a1",
                "runs on b1 but the status says nothing",
                "not converged"
            ]
        );
    }

    #[test]
    fn the_report_counts_and_prints_every_cell() {
        let mut a = good();
        a.judge();
        let mut b = good();
        b.copies = 0;
        b.copy_hosts = vec![];
        b.ends_on = None;
        b.judge();
        let args = Cli::parse_from(["x"]).args;
        let r = Report::build(
            &args,
            vec![a, b],
            vec![LabRecord {
                prefix: "fl000001".into(),
                fault: "kill-gateway".into(),
                cells: 2,
                ..LabRecord::default()
            }],
        );
        assert_eq!((r.passed, r.failed), (1, 1));
        assert!(r.bad());
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["cells"][0]["fault"], "kill-gateway");
        assert_eq!(v["cells"][0]["copies"], 1);
        assert_eq!(v["cells"][1]["ok"], false);
        for key in [
            "outcome",
            "copies",
            "resets",
            "bytes_lost",
            "gap_ms",
            "converge_ms",
        ] {
            assert!(v["cells"][0].get(key).is_some(), "{key}");
        }
        let t = r.table();
        assert!(t.contains("0 copies run"), "{t}");
        assert!(t.contains("2 cells: 1 hold"), "{t}");
    }
}
