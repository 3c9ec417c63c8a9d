//! `ferry-lab bench migrate`: whole-container live migration with CRIU (`ferry migrate run`),
//! as a client on the internet side sees it, in two modes side by side in one run:
//!
//! | mode (JSON key) | `--lock` | what happens to the container's packets while it is stopped |
//! |---|---|---|
//! | `hold` (`ferry`) | `hold` | ferry's hold: queued at the destination, released in order |
//! | `criu-lock` (`criu_lock`) | `criu-lock` | CRIU's own nftables network lock at the source (dropped), the endpoint switched after the restore |
//!
//! Per mode, a lab of its own (default topology, agents), container 10.244.1.10 on `a1`
//! published as 203.0.113.130 (whole IP), its server started in it through the agent, and one
//! client in the `inet` namespace for the whole mode (N connections, a request every interval
//! on each, every reply checked, `--samples` CSV of every request). The server is
//! `--workload serve` (`ferry-workload serve --port 7000`, checked by `ferry-workload client`:
//! numbered requests) or `--workload redis` (an unmodified `redis-server` on 6379, checked by
//! `ferry-workload redis-client`: INCR counters that must go on by exactly one, SET/GET/APPEND
//! whose values must come back). It runs under `--runtime agent` (the agent's own runtime) or
//! `--runtime runc` (an OCI container on the `redis` image of `ferry-lab image build`, which
//! implies `--workload redis`); the migrations then pass `--runtime` to `ferry migrate run`. After a 500 ms warm-up, `--runs` migrations
//! alternate a1 → b1, b1 → a1, … (`ferry migrate run --lock MODE`), 300 ms apart; then the
//! client is stopped (SIGTERM) and its samples are read.
//!
//! Per migration the client-visible **gap** comes from the samples: per connection, the
//! longest interval between two consecutive reply arrivals (sent + latency) that overlaps the
//! run's window `[started_unix_ms, started_unix_ms + total_ms]`; the worst connection's. The
//! **stall overhead** is gap − `stopped_ms` (the run's own figure: CRIU seizing the source's
//! tasks → the destination's tasks resumed, i.e. how long the container ran nowhere). CRIU's
//! "frozen time" (`frozen_ms`) covers only the dump at the source and is reported beside it.
//!
//! Progress on stderr; stdout carries the tables, or one JSON object (`--json`). Labs are torn
//! down at the end of each mode (also on errors: the [`Lab`] handle does it on drop). A failed
//! migration is counted (`migrations_failed`) and the bench goes on; a mode stops after
//! [`MAX_CONSECUTIVE_FAILURES`] failures in a row. Exit status non-zero if a mode failed, a
//! migration failed, or the client saw a reset, a wrong reply or a lost request.

use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::ExitStatus,
    time::{Duration, Instant},
};

use clap::Args;
use ferry_api::run::{PhaseTiming, RunReport, RunState};
use serde::Serialize;
use serde_json::Value;

use crate::{
    BenchError, Progress,
    handoff::{PAYLOAD_BYTES, request_bytes},
    print_report,
    samples::{Sample, SamplesError, read_samples},
    stats::{median, percentile_of, ratio},
    workload::{Workload, WorkloadError},
};
use ferry_lab::{Lab, LabError, LabOptions, bins::find_binary, leftovers};

/// The migrating container.
pub const CONTAINER: &str = "10.244.1.10";
/// Its public address (whole IP; the client connects to it from the `inet` namespace).
pub const PUBLIC: &str = "203.0.113.130";
/// The server's port.
pub const PORT: u16 = 7000;
/// Host in cloud A the container starts on.
pub const HOST_A: &str = "a1";
/// Host in cloud B.
pub const HOST_B: &str = "b1";
/// The client's steady run before the first migration.
const WARM_UP: Duration = Duration::from_millis(500);
/// The client's run after the last migration, before it is stopped.
const SETTLE: Duration = Duration::from_millis(1000);
/// A mode gives up after this many failed migrations in a row.
pub const MAX_CONSECUTIVE_FAILURES: u32 = 3;

/// Why a mode's set-up, a migration or the client failed (reported in the mode's summary).
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(transparent)]
    Workload(#[from] WorkloadError),
    #[error(transparent)]
    Samples(#[from] SamplesError),
    #[error("{what}: {source}")]
    Lab {
        what: &'static str,
        source: Box<LabError>,
    },
    #[error("container on {host}: {source}")]
    Container {
        host: &'static str,
        source: Box<LabError>,
    },
    #[error("{command}: {source}")]
    Ferry {
        command: String,
        source: Box<LabError>,
    },
    #[error("{0}")]
    Setup(String),
    #[error("{command}: {status} without a run report ({source}): {stdout} {stderr}")]
    NoReport {
        command: String,
        status: ExitStatus,
        stdout: String,
        stderr: String,
        source: serde_json::Error,
    },
}

#[derive(Debug, Clone, Args)]
pub struct MigrateArgs {
    /// Print exactly one JSON object on stdout instead of the tables (progress stays on stderr).
    #[arg(long)]
    pub json: bool,
    /// Migrations per mode (alternating a1 -> b1, b1 -> a1, ...).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub runs: u32,
    /// Client connections through the public address.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub connections: u64,
    /// Milliseconds between two requests on a connection.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub interval_ms: u64,
    /// Pause between two migrations (the source keeps a 2 s forwarding pointer; a migration
    /// back while it still forwards is allowed).
    #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub pause_ms: u64,
    /// The lab's control plane in plain HTTP (`insecure_plaintext`) instead of TLS: run once
    /// with and once without to compare.
    #[arg(long)]
    pub plaintext: bool,
    /// The runtime the container runs under: `agent`, `runc` (an OCI container on the
    /// `redis` image built from this machine's Debian packages) or `podman` (the same image
    /// under Podman, on the ferry-cni network; compared with Podman's own checkpoint and
    /// restore, `podman_own`, instead of `criu_lock`).
    #[arg(long, value_enum, default_value = "agent")]
    pub runtime: RuntimeArg,
    /// The server and its client: `serve` (ferry-workload's line protocol) or `redis`
    /// (redis-server, ferry-workload's redis client). Default: `serve` under the agent runtime,
    /// `redis` under runc (its image has no ferry-workload).
    #[arg(long, value_enum)]
    pub workload: Option<WorkloadArg>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RuntimeArg {
    Agent,
    Runc,
    Podman,
}

impl RuntimeArg {
    pub fn as_str(self) -> &'static str {
        match self {
            RuntimeArg::Agent => "agent",
            RuntimeArg::Runc => "runc",
            RuntimeArg::Podman => "podman",
        }
    }

    /// The two modes compared under this runtime.
    pub fn modes(self) -> [Mode; 2] {
        match self {
            RuntimeArg::Podman => [Mode::Hold, Mode::PodmanOwn],
            _ => [Mode::Hold, Mode::CriuLock],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum WorkloadArg {
    Serve,
    Redis,
}

/// redis-server's port.
pub const REDIS_PORT: u16 = 6379;

impl MigrateArgs {
    /// The workload, given the runtime: runc runs the redis image only.
    pub fn workload(&self) -> Result<WorkloadArg, String> {
        match (self.runtime, self.workload) {
            (RuntimeArg::Runc | RuntimeArg::Podman, Some(WorkloadArg::Serve)) => Err(format!(
                "--runtime {} runs the redis image (no ferry-workload in it): use --workload \
                 redis",
                self.runtime.as_str()
            )),
            (RuntimeArg::Runc | RuntimeArg::Podman, _) => Ok(WorkloadArg::Redis),
            (RuntimeArg::Agent, w) => Ok(w.unwrap_or(WorkloadArg::Serve)),
        }
    }
}

pub use ferry_lab::image::redis_args;

/// The two modes, each in a lab of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// ferry's hold.
    Hold,
    /// CRIU's nftables network lock, the network switched after the restore.
    CriuLock,
    /// What Podman users have today: `podman container checkpoint --export` on the source
    /// (CRIU's own network lock, the tree killed, its network torn down), `podman container
    /// restore --import` on the destination (ferry-cni only as the network: the address is
    /// released at the checkpoint and allocated again at the restore); no ferry migration.
    PodmanOwn,
}

impl Mode {
    pub const ALL: [Mode; 3] = [Mode::Hold, Mode::CriuLock, Mode::PodmanOwn];

    /// `ferry migrate run --lock` value (`podman_own`: CRIU's lock, Podman's default).
    pub fn lock(self) -> &'static str {
        match self {
            Mode::Hold => "hold",
            Mode::CriuLock | Mode::PodmanOwn => "criu-lock",
        }
    }

    /// Key in the JSON report and name in the tables.
    pub fn key(self) -> &'static str {
        match self {
            Mode::Hold => "ferry",
            Mode::CriuLock => "criu_lock",
            Mode::PodmanOwn => "podman_own",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Pure part: samples, gaps, percentiles, summaries (unit-tested below).

/// Reply arrival times (sent + latency), per connection, sorted. `end_unix_ms`: when the
/// client stopped; a connection with requests still unanswered after its last reply gets it
/// as a last "arrival" (it was silent until then at least).
pub fn arrivals(samples: &[Sample], end_unix_ms: Option<f64>) -> Vec<Vec<f64>> {
    let n = samples
        .iter()
        .map(|s| s.conn as usize + 1)
        .max()
        .unwrap_or(0);
    let mut per = vec![Vec::new(); n];
    let mut last_unanswered = vec![f64::NEG_INFINITY; n];
    for s in samples {
        match s.latency_ms {
            Some(l) => per[s.conn as usize].push(s.unix_ms + l),
            None => {
                let u = &mut last_unanswered[s.conn as usize];
                *u = u.max(s.unix_ms);
            }
        }
    }
    for (a, unanswered) in per.iter_mut().zip(last_unanswered) {
        a.sort_by(f64::total_cmp);
        if let Some(end) = end_unix_ms {
            let last = a.last().copied().unwrap_or(f64::NEG_INFINITY);
            if unanswered.is_finite() && unanswered >= last && end > last {
                a.push(end);
            }
        }
    }
    per
}

/// The client-visible gap of a window: the longest interval between consecutive reply
/// arrivals on one connection that overlaps `[from, to]`, over all connections, with where it
/// began. `None` if no interval overlaps the window.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gap {
    pub ms: f64,
    pub start_unix_ms: f64,
    pub conn: usize,
}

pub fn gap_in_window(arrivals: &[Vec<f64>], from: f64, to: f64) -> Option<Gap> {
    let mut best: Option<Gap> = None;
    for (conn, a) in arrivals.iter().enumerate() {
        for w in a.windows(2) {
            let (x, y) = (w[0], w[1]);
            // Overlap with [from, to]: the interval does not end before the window starts
            // nor start after it ends.
            if y >= from && x <= to && best.is_none_or(|b| y - x > b.ms) {
                best = Some(Gap {
                    ms: y - x,
                    start_unix_ms: x,
                    conn,
                });
            }
        }
    }
    best
}

fn max(v: &[f64]) -> Option<f64> {
    v.iter().copied().reduce(f64::max)
}

/// One phase's duration (ms) in a migration, by [`ferry_api::run::PHASES`] name.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct PhaseMs {
    pub prepare: Option<f64>,
    pub freeze: Option<f64>,
    pub dump: Option<f64>,
    pub transfer: Option<f64>,
    pub restore: Option<f64>,
    pub release: Option<f64>,
}

impl PhaseMs {
    pub fn of(r: &RunReport) -> Self {
        let get = |n: &str| r.phase(n).map(|p| p.ms);
        Self {
            prepare: get("prepare"),
            freeze: get("freeze"),
            dump: get("dump"),
            transfer: get("transfer"),
            restore: get("restore"),
            release: get("release"),
        }
    }

    fn fields(&self) -> [(&'static str, Option<f64>); 6] {
        [
            ("prepare", self.prepare),
            ("freeze", self.freeze),
            ("dump", self.dump),
            ("transfer", self.transfer),
            ("restore", self.restore),
            ("release", self.release),
        ]
    }

    /// p50 of each phase over `runs` (over those that have it).
    pub fn p50(runs: &[&PhaseMs]) -> Self {
        let m = |f: fn(&PhaseMs) -> Option<f64>| {
            median(&runs.iter().filter_map(|r| f(r)).collect::<Vec<_>>())
        };
        Self {
            prepare: m(|r| r.prepare),
            freeze: m(|r| r.freeze),
            dump: m(|r| r.dump),
            transfer: m(|r| r.transfer),
            restore: m(|r| r.restore),
            release: m(|r| r.release),
        }
    }
}

/// One migration, as measured.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Migration {
    pub from: String,
    pub to: String,
    /// `released`, `rolled_back`, `needs_attention`, or `error` (no report).
    pub state: String,
    pub id: Option<String>,
    pub started_unix_ms: Option<f64>,
    /// The client's gap overlapping the run's window (see the module's docs).
    pub gap_ms: Option<f64>,
    /// When that gap began relative to the run's start, and on which connection.
    pub gap_start_after_run_start_ms: Option<f64>,
    pub gap_conn: Option<usize>,
    /// The gap began before the previous migration's window ended: the same silence is
    /// (also) the previous migration's (see [`mark_shared_gaps`]).
    pub gap_overlaps_previous_run: bool,
    /// The run's `stopped_ms`: CRIU seizing the source's tasks → tasks resumed at the
    /// destination.
    pub stopped_ms: Option<f64>,
    /// CRIU's "frozen time" (the dump only).
    pub frozen_ms: Option<f64>,
    pub total_ms: Option<f64>,
    /// gap − stopped.
    pub stall_overhead_ms: Option<f64>,
    pub image_bytes: Option<u64>,
    pub phases: PhaseMs,
    /// Requests sent inside the window that were never answered.
    pub unanswered_in_window: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Migration {
    pub fn ok(&self) -> bool {
        self.state == RunState::Released.as_str()
    }

    /// Fills in a migration from its run report and the client's arrivals.
    pub fn from_report(r: &RunReport, arrivals: &[Vec<f64>], samples: &[Sample]) -> Migration {
        let (from, to) = (r.started_unix_ms, r.started_unix_ms + r.total_ms);
        let gap = gap_in_window(arrivals, from, to);
        let released = r.state == RunState::Released;
        let stopped = (r.stopped_ms > 0.0).then_some(r.stopped_ms);
        Migration {
            from: r.from.clone(),
            to: r.to.clone(),
            state: r.state.as_str().to_owned(),
            id: Some(r.id.clone()),
            started_unix_ms: Some(r.started_unix_ms),
            gap_ms: gap.map(|g| g.ms),
            gap_start_after_run_start_ms: gap.map(|g| g.start_unix_ms - from),
            gap_conn: gap.map(|g| g.conn),
            gap_overlaps_previous_run: false,
            stopped_ms: stopped,
            frozen_ms: r.criu.as_ref().map(|c| c.frozen_ms),
            total_ms: Some(r.total_ms),
            stall_overhead_ms: match (gap, stopped, released) {
                (Some(g), Some(s), true) => Some(g.ms - s),
                _ => None,
            },
            image_bytes: Some(r.image_bytes),
            phases: PhaseMs::of(r),
            unanswered_in_window: samples
                .iter()
                .filter(|s| s.latency_ms.is_none() && s.unix_ms >= from && s.unix_ms <= to)
                .count() as u64,
            error: r.error.clone(),
        }
    }
}

/// Marks the migrations whose gap began inside the previous migration's window (with a short
/// pause, one long silence overlaps two windows and counts for both).
pub fn mark_shared_gaps(migrations: &mut [Migration]) {
    let mut prev_end: Option<f64> = None;
    for m in migrations.iter_mut() {
        if let (Some(started), Some(rel), Some(end)) =
            (m.started_unix_ms, m.gap_start_after_run_start_ms, prev_end)
        {
            m.gap_overlaps_previous_run = started + rel < end;
        }
        prev_end = m
            .started_unix_ms
            .zip(m.total_ms)
            .map(|(s, t)| s + t)
            .or(prev_end);
    }
}

/// What the client reported for the whole mode.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ClientFigures {
    pub requests: u64,
    pub replies: u64,
    pub unanswered: u64,
    pub resets: u64,
    pub mismatches: u64,
    pub retransmits: u64,
    pub alive: u64,
    pub closed_by_server: u64,
    pub errors: u64,
    /// The client's own largest gap over its whole run.
    pub max_gap_ms: f64,
}

impl ClientFigures {
    pub fn from_summary(v: &Value) -> Self {
        let u = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
        Self {
            requests: u("requests"),
            replies: u("replies"),
            unanswered: u("unanswered"),
            resets: u("resets"),
            mismatches: u("mismatches"),
            retransmits: u("retransmits"),
            alive: u("alive"),
            closed_by_server: u("closed_by_server"),
            errors: u("errors"),
            max_gap_ms: v.get("max_gap_ms").and_then(Value::as_f64).unwrap_or(0.0),
        }
    }
}

/// One mode's figures: percentiles over its released migrations, counts over the client.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ModeSummary {
    /// `ferry migrate run --lock` value.
    pub lock: &'static str,
    pub gap_ms_p50: Option<f64>,
    pub gap_ms_p99: Option<f64>,
    pub gap_ms_max: Option<f64>,
    pub frozen_ms_p50: Option<f64>,
    pub stopped_ms_p50: Option<f64>,
    pub stall_overhead_ms_p50: Option<f64>,
    pub stall_overhead_ms_p99: Option<f64>,
    pub total_ms_p50: Option<f64>,
    pub image_bytes_p50: Option<f64>,
    pub phase_ms_p50: PhaseMs,
    pub resets: u64,
    pub client_retransmits: u64,
    /// Requests sent and never answered × the request's size (upper bound: the largest
    /// sequence number's length).
    pub bytes_lost: u64,
    pub mismatches: u64,
    pub migrations_ok: u64,
    pub migrations_failed: u64,
    pub client: Option<ClientFigures>,
    pub per_migration: Vec<Migration>,
    /// A registry change (`POST /v1/endpoints`) until every agent reported it applied,
    /// [`REGISTRY_CHANGES`] times before the client starts: the control plane's latency.
    pub registry_applied_ms_p50: Option<f64>,
    pub registry_applied_ms_p99: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Registry changes timed per mode (see [`ModeSummary::registry_applied_ms_p50`]).
pub const REGISTRY_CHANGES: u8 = 20;

/// Times [`REGISTRY_CHANGES`] registry changes, each from the answer of the gateway until every
/// host's agent reported the new version applied (polled every millisecond).
fn registry_latency(lab: &Lab) -> Result<Vec<f64>, MigrateError> {
    lab.api(|client| async move {
        let mut ms = Vec::new();
        for i in 0..REGISTRY_CHANGES {
            let spec = ferry_api::EndpointSpec {
                ip: Ipv4Addr::new(10, 244, 3, 100 + i),
                host: HOST_B.into(),
                mac: None,
            };
            let t = Instant::now();
            let added = client
                .add_endpoints(&[spec])
                .await
                .map_err(|e| e.to_string())?;
            let version = client.version().await.map_err(|e| e.to_string())?;
            loop {
                let hosts = client.hosts().await.map_err(|e| e.to_string())?;
                if hosts.iter().all(|h| h.applied_version >= version) {
                    break;
                }
                if t.elapsed() > Duration::from_secs(10) {
                    return Err(format!(
                        "version {version} not applied by every agent in 10 s"
                    ));
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            ms.push(t.elapsed().as_secs_f64() * 1e3);
            for e in added {
                client
                    .remove_endpoint(e.ip)
                    .await
                    .map_err(|e| e.to_string())?;
            }
        }
        Ok(ms)
    })
    .map_err(|source| MigrateError::Lab {
        what: "registry latency",
        source: Box::new(source),
    })?
    .map_err(|e| MigrateError::Lab {
        what: "registry latency",
        source: Box::new(LabError::io(
            "timing registry changes",
            std::io::Error::other(e),
        )),
    })
}

impl ModeSummary {
    pub fn build(
        mode: Mode,
        per_migration: Vec<Migration>,
        client: Option<ClientFigures>,
        connections: u64,
        error: Option<String>,
    ) -> Self {
        let ok: Vec<&Migration> = per_migration.iter().filter(|m| m.ok()).collect();
        let vals = |f: fn(&Migration) -> Option<f64>| ok.iter().filter_map(|m| f(m)).collect();
        let gaps: Vec<f64> = vals(|m| m.gap_ms);
        let overheads: Vec<f64> = vals(|m| m.stall_overhead_ms);
        let phases: Vec<&PhaseMs> = ok.iter().map(|m| &m.phases).collect();
        let c = client.clone().unwrap_or_default();
        let max_seq = c.requests / connections.max(1) + 1;
        Self {
            lock: mode.lock(),
            gap_ms_p50: median(&gaps),
            gap_ms_p99: percentile_of(&gaps, 99.0),
            gap_ms_max: max(&gaps),
            frozen_ms_p50: median(&vals(|m| m.frozen_ms)),
            stopped_ms_p50: median(&vals(|m| m.stopped_ms)),
            stall_overhead_ms_p50: median(&overheads),
            stall_overhead_ms_p99: percentile_of(&overheads, 99.0),
            total_ms_p50: median(&vals(|m| m.total_ms)),
            image_bytes_p50: median(&vals(|m| m.image_bytes.map(|b| b as f64))),
            phase_ms_p50: PhaseMs::p50(&phases),
            resets: c.resets,
            client_retransmits: c.retransmits,
            bytes_lost: c.unanswered * request_bytes(max_seq, PAYLOAD_BYTES),
            mismatches: c.mismatches,
            migrations_ok: ok.len() as u64,
            migrations_failed: (per_migration.len() - ok.len()) as u64,
            client,
            per_migration,
            registry_applied_ms_p50: None,
            registry_applied_ms_p99: None,
            error,
        }
    }

    /// Something went wrong: the mode failed, a migration failed, or the client saw a reset,
    /// a wrong reply or a lost request.
    pub fn bad(&self) -> bool {
        self.error.is_some()
            || self.migrations_failed > 0
            || self.resets > 0
            || self.mismatches > 0
            || self.bytes_lost > 0
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Ratios {
    /// criu_lock gap p50 / ferry gap p50 (> 1: ferry's client waits less).
    pub gap_p50_criu_lock_over_ferry: Option<f64>,
    /// criu_lock stall overhead p50 / ferry stall overhead p50 (only when both are positive).
    pub stall_overhead_p50_criu_lock_over_ferry: Option<f64>,
    /// podman_own gap p50 / ferry gap p50 (`--runtime podman`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gap_p50_podman_own_over_ferry: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Params {
    pub connections: u64,
    pub interval_ms: u64,
    pub payload_bytes: usize,
    pub pause_ms: u64,
    pub container: &'static str,
    pub public: &'static str,
    pub hosts: [&'static str; 2],
    /// `tls` or `plaintext` (`--plaintext`).
    pub control_plane: &'static str,
    /// `agent` or `runc`.
    pub runtime: &'static str,
    /// `serve` or `redis`.
    pub workload: &'static str,
    pub notes: [&'static str; 5],
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub runs_per_mode: u32,
    pub ferry: ModeSummary,
    /// Absent under `--runtime podman` (Podman containers move in hold mode only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub criu_lock: Option<ModeSummary>,
    /// Podman's own checkpoint/restore (`--runtime podman` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub podman_own: Option<ModeSummary>,
    pub ratios: Ratios,
    pub params: Params,
}

const NOTES: [&str; 5] = [
    "gap_ms: per migration, per client connection the longest interval between two \
     consecutive reply arrivals (sent + latency) overlapping [started_unix_ms, \
     started_unix_ms + total_ms]; the worst connection's",
    "stopped_ms: the run's figure, CRIU seizing the source's tasks -> the destination's tasks \
     resumed (the container ran nowhere); stall_overhead_ms = gap_ms - stopped_ms",
    "frozen_ms: CRIU's own 'frozen time' stat, which covers only the dump at the source \
     (not the transfer, the restore nor the network switch)",
    "p50 = median (mean of the middle two), p99 = nearest rank; over released migrations; \
     resets, retransmits, mismatches, bytes_lost: the mode's one client over all its runs",
    "gap_overlaps_previous_run: the gap began inside the previous run's window; one silence \
     spanning two runs counts for both (lengthen --pause-ms to separate them)",
];

impl Report {
    /// `other`: the second mode's summary (`criu_lock`, or `podman_own` under `--runtime
    /// podman`).
    pub fn build(args: &MigrateArgs, ferry: ModeSummary, other: ModeSummary) -> Self {
        let pos = |x: Option<f64>| x.filter(|v| *v > 0.0);
        let podman = args.runtime == RuntimeArg::Podman;
        let (criu_lock, podman_own) = if podman {
            (None, Some(other))
        } else {
            (Some(other), None)
        };
        Self {
            runs_per_mode: args.runs,
            ratios: Ratios {
                gap_p50_criu_lock_over_ferry: criu_lock
                    .as_ref()
                    .and_then(|c| ratio(c.gap_ms_p50, ferry.gap_ms_p50)),
                stall_overhead_p50_criu_lock_over_ferry: criu_lock.as_ref().and_then(|c| {
                    ratio(
                        pos(c.stall_overhead_ms_p50),
                        pos(ferry.stall_overhead_ms_p50),
                    )
                }),
                gap_p50_podman_own_over_ferry: podman_own
                    .as_ref()
                    .and_then(|c| ratio(c.gap_ms_p50, ferry.gap_ms_p50)),
            },
            ferry,
            criu_lock,
            podman_own,
            params: Params {
                connections: args.connections,
                interval_ms: args.interval_ms,
                payload_bytes: PAYLOAD_BYTES,
                pause_ms: args.pause_ms,
                container: CONTAINER,
                public: PUBLIC,
                hosts: [HOST_A, HOST_B],
                control_plane: if args.plaintext { "plaintext" } else { "tls" },
                runtime: args.runtime.as_str(),
                workload: match args.workload() {
                    Ok(WorkloadArg::Redis) => "redis",
                    _ => "serve",
                },
                notes: NOTES,
            },
        }
    }

    fn modes(&self) -> Vec<(&'static str, &ModeSummary)> {
        let mut v = vec![("ferry", &self.ferry)];
        if let Some(c) = &self.criu_lock {
            v.push(("criu_lock", c));
        }
        if let Some(c) = &self.podman_own {
            v.push(("podman_own", c));
        }
        v
    }

    /// The tables for people.
    pub fn table(&self) -> String {
        let num = |x: Option<f64>| x.map_or("-".to_owned(), |v| format!("{v:.1}"));
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:<10} {:>17} {:>11} {:>13} {:>7} {:>12} {:>10}",
            "mode",
            "gap p50/p99",
            "stopped p50",
            "stall ovh p50",
            "resets",
            "retransmits",
            "ok/failed"
        );
        for (name, m) in self.modes() {
            let _ = write!(
                s,
                "{:<10} {:>17} {:>11} {:>13} {:>7} {:>12} {:>10}",
                name,
                format!("{}/{}", num(m.gap_ms_p50), num(m.gap_ms_p99)),
                num(m.stopped_ms_p50),
                num(m.stall_overhead_ms_p50),
                m.resets,
                m.client_retransmits,
                format!("{}/{}", m.migrations_ok, m.migrations_failed),
            );
            match &m.error {
                Some(e) => {
                    let _ = writeln!(s, "  FAILED: {e}");
                }
                None => s.push('\n'),
            }
        }
        for (name, m) in self.modes() {
            let _ = writeln!(
                s,
                "{name}: registry change -> applied by every agent p50/p99 {}/{} ms (control plane: {})",
                num(m.registry_applied_ms_p50),
                num(m.registry_applied_ms_p99),
                self.params.control_plane
            );
        }
        if self.podman_own.is_some() {
            let _ = writeln!(
                s,
                "ratio podman_own/ferry: gap p50 {}",
                self.ratios
                    .gap_p50_podman_own_over_ferry
                    .map_or("-".to_owned(), |v| format!("{v:.2}")),
            );
        } else {
            let _ = writeln!(
                s,
                "ratios criu_lock/ferry: gap p50 {}, stall overhead p50 {}",
                self.ratios
                    .gap_p50_criu_lock_over_ferry
                    .map_or("-".to_owned(), |v| format!("{v:.2}")),
                self.ratios
                    .stall_overhead_p50_criu_lock_over_ferry
                    .map_or("-".to_owned(), |v| format!("{v:.2}")),
            );
        }
        s.push('\n');
        let _ = write!(s, "{:<10}", "phase p50");
        for (name, _) in PhaseMs::default().fields() {
            let _ = write!(s, " {name:>9}");
        }
        let _ = writeln!(s, " {:>9} {:>9} {:>10}", "frozen", "total", "image MB");
        for (name, m) in self.modes() {
            let _ = write!(s, "{name:<10}");
            for (_, v) in m.phase_ms_p50.fields() {
                let _ = write!(s, " {:>9}", num(v));
            }
            let _ = writeln!(
                s,
                " {:>9} {:>9} {:>10}",
                num(m.frozen_ms_p50),
                num(m.total_ms_p50),
                m.image_bytes_p50
                    .map_or("-".to_owned(), |b| format!("{:.2}", b / 1e6))
            );
        }
        let _ = writeln!(
            s,
            "ms; {} migrations per mode ({HOST_A}<->{HOST_B}), {} connections, a request every \
             {} ms; gap = longest silence between replies on one connection overlapping the \
             run; stopped = CRIU seize -> tasks resumed at the destination; stall ovh = gap - \
             stopped; frozen = CRIU's frozen stat (dump only)",
            self.runs_per_mode, self.params.connections, self.params.interval_ms
        );
        s
    }
}

// ---------------------------------------------------------------------------------------------
// The run.

fn other(host: &str) -> &'static str {
    if host == HOST_A { HOST_B } else { HOST_A }
}

/// One `ferry --json migrate run ARGS..`: the report (also of a failed run: the CLI exits
/// non-zero but still prints it), or why there is none.
pub fn migrate_run(lab: &Lab, args: &[&str]) -> Result<RunReport, MigrateError> {
    let mut all = vec!["--json", "migrate", "run"];
    all.extend_from_slice(args);
    let command = format!("ferry {}", all[1..].join(" "));
    let out = lab.ferry(&all).map_err(|source| MigrateError::Ferry {
        command: command.clone(),
        source: Box::new(source),
    })?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str::<RunReport>(stdout.trim()).map_err(|source| MigrateError::NoReport {
        command,
        status: out.status,
        stdout: stdout.trim().to_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        source,
    })
}

/// A mode's lab, server and client, and its migrations.
fn run_mode(
    p: &Progress,
    args: &MigrateArgs,
    mode: Mode,
    bin: &Path,
    code: &mut i32,
) -> ModeSummary {
    let name = mode.key();
    let fail = |e: String| {
        p.say(format!("{name}: FAILED: {e}"));
        ModeSummary::build(mode, Vec::new(), None, args.connections, Some(e))
    };
    p.say(format!("{name}: bringing up a lab with agents"));
    let lab = match Lab::up(LabOptions {
        start_agents: true,
        insecure_plaintext: args.plaintext,
        ..LabOptions::default()
    }) {
        Ok(lab) => lab,
        Err(e) => {
            *code = 1;
            return fail(format!("lab up: {e}"));
        }
    };
    let prefix = lab.prefix().to_owned();
    let summary = match measure_mode(p, args, mode, bin, &lab) {
        Ok(s) => s,
        Err(e) => fail(e.to_string()),
    };
    if summary.bad() {
        *code = 1;
    }
    p.say(format!("{name}: tearing the lab down"));
    if let Err(e) = lab.down() {
        p.say(format!("{name}: teardown: {e}"));
        *code = 1;
    }
    let left = leftovers(&prefix);
    if !left.is_empty() {
        p.say(format!("{name}: left behind: {}", left.join(", ")));
        *code = 1;
    }
    summary
}

fn measure_mode(
    p: &Progress,
    args: &MigrateArgs,
    mode: Mode,
    bin: &Path,
    lab: &Lab,
) -> Result<ModeSummary, MigrateError> {
    let name = mode.key();
    let c: Ipv4Addr = CONTAINER.parse().expect("valid address");
    let workload = args.workload().map_err(MigrateError::Setup)?;
    // Under Podman, the container (and its network, through ferry-cni) is Podman's.
    let podman_pid = if args.runtime == RuntimeArg::Podman {
        Some(start_podman(p, lab, name, mode)?)
    } else {
        lab.add_container(HOST_A, c)
            .map_err(|source| MigrateError::Container {
                host: HOST_A,
                source: Box::new(source),
            })?;
        None
    };
    // Podman alone cannot keep a public address on a container that leaves its host (the
    // gateway's IPAM gives no container an address a public mapping names): under
    // `podman_own` the client talks to the container's own address from a host of cloud a
    // (CLIENT_HOST), over the overlay.
    let (client_ns, target) = if mode == Mode::PodmanOwn {
        (lab.netns(CLIENT_HOST), CONTAINER)
    } else {
        lab.ferry_json(&[
            "public",
            "add",
            "--public",
            PUBLIC,
            "--container",
            CONTAINER,
        ])
        .map_err(|source| MigrateError::Lab {
            what: "public add",
            source: Box::new(source),
        })?;
        (lab.netns("inet"), PUBLIC)
    };
    lab.sync().map_err(|source| MigrateError::Lab {
        what: "sync",
        source: Box::new(source),
    })?;
    let bin_s = bin.to_string_lossy().into_owned();
    let port = match workload {
        WorkloadArg::Serve => PORT,
        WorkloadArg::Redis => REDIS_PORT,
    };
    let started = match (args.runtime, workload) {
        (RuntimeArg::Podman, _) => Ok(podman_pid.expect("started above")),
        (RuntimeArg::Agent, WorkloadArg::Serve) => lab
            .start_process(c, &[&bin_s, "serve", "--port", &port.to_string()])
            .map(|p| p.pid),
        (RuntimeArg::Agent, WorkloadArg::Redis) => {
            let argv = redis_args("/usr/bin/redis-server", "/tmp");
            let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
            lab.start_process(c, &argv).map(|p| p.pid)
        }
        (RuntimeArg::Runc, _) => {
            let image = ferry_lab::image::build("redis")
                .map_err(|e| MigrateError::Setup(format!("the redis image: {e}")))?;
            p.say(format!("{name}: image {}", image.path.display()));
            let argv = redis_args("/usr/bin/redis-server", "/tmp");
            let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
            lab.start_runc(c, &image.image, &argv).map(|p| p.pid)
        }
    };
    let server_pid = started.map_err(|source| MigrateError::Lab {
        what: "starting the server",
        source: Box::new(source),
    })?;
    p.say(format!(
        "{name}: lab {} up; {CONTAINER} on {HOST_A} as {PUBLIC}, server PID {} ({} runtime, {})",
        lab.prefix(),
        server_pid,
        args.runtime.as_str(),
        match workload {
            WorkloadArg::Serve => "ferry-workload serve",
            WorkloadArg::Redis => "redis-server",
        }
    ));

    let podman_id = if args.runtime == RuntimeArg::Podman {
        lab.podman(HOST_A)
            .and_then(|pm| pm.run(&["inspect", "--format", "{{.Id}}", PODMAN_NAME]))
            .ok()
    } else {
        None
    };
    let registry = registry_latency(lab)?;
    p.say(format!(
        "{name}: registry change -> applied by every agent: p50 {} ms over {} changes",
        fmt(median(&registry)),
        registry.len()
    ));

    // The client, for the whole mode (retried while the server opens its socket).
    let samples_path: PathBuf = lab.state_dir().join(format!("bench-migrate-{name}.csv"));
    let samples_arg = samples_path.to_string_lossy();
    let client_args = match workload {
        WorkloadArg::Serve => crate::workload::client_args(
            &format!("{target}:{PORT}"),
            args.connections,
            args.interval_ms,
            &["--samples", &samples_arg],
        ),
        WorkloadArg::Redis => [
            "redis-client",
            "--to",
            &format!("{target}:{REDIS_PORT}"),
            "--connections",
            &args.connections.to_string(),
            "--interval-ms",
            &args.interval_ms.to_string(),
            "--samples",
            &samples_arg,
            "--json",
        ]
        .map(str::to_owned)
        .to_vec(),
    };
    let client_args: Vec<&str> = client_args.iter().map(String::as_str).collect();
    let inet = client_ns;
    let client = Workload::start_connected(bin, &inet, &client_args, |tries, e| {
        if tries % 10 == 1 {
            p.say(format!("{name}: client not connected yet ({e}); retrying"));
        }
    })?;
    p.say(format!(
        "{name}: client connected ({} connections, a request every {} ms)",
        args.connections, args.interval_ms
    ));
    std::thread::sleep(WARM_UP);

    // The migrations.
    let mut reports: Vec<Result<RunReport, (String, String, String)>> = Vec::new();
    let mut here = HOST_A.to_owned();
    let mut failures_in_a_row = 0;
    let mut error = None;
    for i in 0..args.runs {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(args.pause_ms));
        }
        let to = other(&here);
        let t = Instant::now();
        let run_args = [
            "--quiet",
            "--container",
            CONTAINER,
            "--to",
            to,
            "--lock",
            mode.lock(),
            "--runtime",
            args.runtime.as_str(),
        ];
        let outcome = match mode {
            Mode::PodmanOwn => podman_own_migrate(lab, c, &here, to),
            _ => migrate_run(lab, &run_args),
        };
        match outcome {
            Ok(r) => {
                p.say(format!(
                    "{name}: {}/{}: {}->{}: {} in {:.1} ms (stopped {:.1} ms, criu frozen {}, \
                     image {} B){}",
                    i + 1,
                    args.runs,
                    r.from,
                    r.to,
                    r.state.as_str(),
                    r.total_ms,
                    r.stopped_ms,
                    r.criu
                        .as_ref()
                        .map_or("-".to_owned(), |c| format!("{:.1} ms", c.frozen_ms)),
                    r.image_bytes,
                    r.error.as_ref().map_or(String::new(), |e| format!(": {e}")),
                ));
                match r.state {
                    RunState::Released => {
                        if args.runtime == RuntimeArg::Podman
                            && mode == Mode::Hold
                            && let Some(id) = &podman_id
                        {
                            // Lab only: see `ferry_lab::podman::forget_stale_runc_state`.
                            let _ = ferry_lab::podman::settle_source(lab, &r.from, id);
                        }
                        here = r.to.clone();
                        failures_in_a_row = 0;
                    }
                    RunState::RolledBack => {
                        here = r.from.clone();
                        failures_in_a_row += 1;
                    }
                    _ => {
                        failures_in_a_row += 1;
                        if let Ok(h) = lab.endpoint_host(c) {
                            here = h;
                        }
                    }
                }
                reports.push(Ok(r));
            }
            Err(e) => {
                p.say(format!(
                    "{name}: {}/{}: {here}->{to}: FAILED after {:.0} ms: {e}",
                    i + 1,
                    args.runs,
                    t.elapsed().as_secs_f64() * 1e3
                ));
                failures_in_a_row += 1;
                reports.push(Err((here.clone(), to.to_owned(), e.to_string())));
                if let Ok(h) = lab.endpoint_host(c) {
                    here = h;
                }
            }
        }
        if failures_in_a_row >= MAX_CONSECUTIVE_FAILURES {
            let e = format!("stopped after {failures_in_a_row} failed migrations in a row");
            p.say(format!("{name}: {e}"));
            error = Some(e);
            break;
        }
    }

    std::thread::sleep(SETTLE);
    p.say(format!("{name}: stopping the client"));
    let (summary, ended) = client.finish(Duration::from_secs(20))?;
    let figures = ClientFigures::from_summary(&summary);
    let samples = read_samples(&samples_path)?;
    let arr = arrivals(&samples, Some(ended));
    let mut per_migration: Vec<Migration> = reports
        .iter()
        .map(|r| match r {
            Ok(r) => Migration::from_report(r, &arr, &samples),
            Err((from, to, e)) => Migration {
                from: from.clone(),
                to: to.clone(),
                state: "error".into(),
                error: Some(e.clone()),
                ..Migration::default()
            },
        })
        .collect();
    mark_shared_gaps(&mut per_migration);
    for m in &per_migration {
        if m.ok() {
            p.say(format!(
                "  {name}: {}->{}: gap {} ms (starts {} ms into the run{}), stopped {} ms, \
                 overhead {} ms, unanswered in window {}",
                m.from,
                m.to,
                fmt(m.gap_ms),
                fmt(m.gap_start_after_run_start_ms),
                if m.gap_overlaps_previous_run {
                    ", inside the previous run"
                } else {
                    ""
                },
                fmt(m.stopped_ms),
                fmt(m.stall_overhead_ms),
                m.unanswered_in_window
            ));
        }
    }
    p.say(format!(
        "{name}: client: {} requests, {} replies, {} unanswered, {} resets, {} mismatches, {} \
         retransmits, {}/{} alive, max gap {:.1} ms",
        figures.requests,
        figures.replies,
        figures.unanswered,
        figures.resets,
        figures.mismatches,
        figures.retransmits,
        figures.alive,
        args.connections,
        figures.max_gap_ms
    ));
    if error.is_none() && figures.alive != args.connections {
        error = Some(format!(
            "client: {} of {} connections alive ({} closed by the server, {} errors)",
            figures.alive, args.connections, figures.closed_by_server, figures.errors
        ));
    }
    let mut summary =
        ModeSummary::build(mode, per_migration, Some(figures), args.connections, error);
    summary.registry_applied_ms_p50 = median(&registry);
    summary.registry_applied_ms_p99 = percentile_of(&registry, 99.0);
    Ok(summary)
}

/// The container under Podman on a1 (`--runtime podman`): the redis image (built from this
/// machine's packages, one archive loaded on both hosts so it has one ID), on the ferry-cni
/// network with address CONTAINER. Under ferry (`Mode::Hold`) its CRIU configuration hands the
/// lock to ferry's hook and leaves trees stopped; under `podman_own` it has none (Podman's
/// and CRIU's defaults). Returns the server's PID.
fn start_podman(p: &Progress, lab: &Lab, name: &str, mode: Mode) -> Result<i32, MigrateError> {
    let setup = |what: &str, e: LabError| MigrateError::Setup(format!("{what}: {e}"));
    let image = ferry_lab::image::build("redis")
        .map_err(|e| MigrateError::Setup(format!("the redis image: {e}")))?;
    let tag = format!("localhost/ferry-{}", image.image);
    let archive = ferry_lab::podman::image_archive(&image.path, &tag)
        .map_err(|e| setup("the image archive", e))?;
    for h in [HOST_A, HOST_B] {
        lab.podman(h)
            .and_then(|pm| pm.load(&archive))
            .map_err(|e| setup("podman load", e))?;
    }
    p.say(format!(
        "{name}: image {tag} loaded on {HOST_A} and {HOST_B}"
    ));
    let annotation = match mode {
        Mode::Hold => Some(format!(
            "org.criu.config={}",
            lab.hook_files()
                .map_err(|e| setup("the hook's files", e))?
                .criu_conf
                .display()
        )),
        _ => None,
    };
    let mut run = vec![
        "run",
        "-d",
        "--name",
        PODMAN_NAME,
        "--network",
        ferry_lab::podman::NETWORK,
        "--ip",
        CONTAINER,
    ];
    if let Some(a) = &annotation {
        run.extend(["--annotation", a.as_str()]);
    }
    run.push(&tag);
    let argv = redis_args("/usr/bin/redis-server", "/tmp");
    run.extend(argv.iter().map(String::as_str));
    let pm = lab.podman(HOST_A).map_err(|e| setup("podman", e))?;
    pm.run(&run).map_err(|e| setup("podman run", e))?;
    let pid = pm
        .run(&["inspect", "--format", "{{.State.Pid}}", PODMAN_NAME])
        .map_err(|e| setup("podman inspect", e))?;
    pid.trim()
        .parse()
        .map_err(|e| MigrateError::Setup(format!("podman inspect: PID {pid:?}: {e}")))
}

/// Where `podman_own`'s client runs (a host namespace of cloud a, neither source nor
/// destination).
const CLIENT_HOST: &str = "a2";

/// The Podman container's name in the bench.
const PODMAN_NAME: &str = "bench-redis";

/// One migration the way Podman does it alone (`podman_own`): checkpoint --export on `from`
/// (CRIU's own network lock; the tree is killed and its network torn down, the address
/// released), the archive to `to` (same machine: nothing to copy), restore --import there
/// (the address allocated again, MAC and IP from the checkpoint); then the source's exited
/// container is removed (outside the window). Reported as a run, timed by this process.
fn podman_own_migrate(
    lab: &Lab,
    c: Ipv4Addr,
    from: &str,
    to: &str,
) -> Result<RunReport, MigrateError> {
    let archive = lab.state_dir().join("bench-podman-own.tar");
    let _ = std::fs::remove_file(&archive);
    let archive_s = archive.to_string_lossy().into_owned();
    let on = |h: &str, args: &[&str]| -> Result<String, MigrateError> {
        lab.podman(h)
            .and_then(|pm| pm.run(args))
            .map_err(|e| MigrateError::Setup(format!("on {h}: {e}")))
    };
    let phase = |name: &str, start: f64, end: f64| PhaseTiming {
        name: name.into(),
        start_unix_ms: start,
        ms: end - start,
        bytes: None,
    };
    let t0 = ferry_api::unix_ms_f64();
    let mut report = RunReport {
        id: format!("podman-{}", t0 as u64),
        container: c,
        from: from.into(),
        to: to.into(),
        lock: ferry_api::run::LockMode::CriuLock,
        memory: Default::default(),
        state: RunState::RolledBack,
        started_unix_ms: t0,
        total_ms: 0.0,
        stopped_ms: 0.0,
        phases: Vec::new(),
        events: Vec::new(),
        criu: None,
        image_bytes: 0,
        image_bytes_during_dump: 0,
        error: None,
    };
    let checkpoint = on(
        from,
        &[
            "container",
            "checkpoint",
            "--tcp-established",
            "--export",
            &archive_s,
            PODMAN_NAME,
        ],
    );
    let t1 = ferry_api::unix_ms_f64();
    report.phases.push(phase("dump", t0, t1));
    if let Err(e) = checkpoint {
        report.total_ms = t1 - t0;
        report.error = Some(e.to_string());
        return Ok(report);
    }
    report.image_bytes = std::fs::metadata(&archive).map_or(0, |m| m.len());
    let restored = on(
        to,
        &[
            "container",
            "restore",
            "--tcp-established",
            "--import",
            &archive_s,
        ],
    );
    let t2 = ferry_api::unix_ms_f64();
    report.phases.push(phase("restore", t1, t2));
    report.total_ms = t2 - t0;
    // Stopped from the dump's start to the restore's end (an upper bound: Podman reports no
    // finer moments).
    report.stopped_ms = t2 - t0;
    match restored {
        Ok(_) => {
            report.state = RunState::Released;
            on(from, &["rm", "-f", "-t", "0", PODMAN_NAME])?;
        }
        Err(e) => {
            // Back where it was, as an orchestrator would: the exited copy replaced by the
            // archive's.
            let back = on(from, &["rm", "-f", "-t", "0", PODMAN_NAME]).and_then(|_| {
                on(
                    from,
                    &[
                        "container",
                        "restore",
                        "--tcp-established",
                        "--import",
                        &archive_s,
                    ],
                )
            });
            report.error = Some(match back {
                Ok(_) => e.to_string(),
                Err(b) => format!("{e}; restoring on {from} failed too: {b}"),
            });
        }
    }
    let _ = std::fs::remove_file(&archive);
    Ok(report)
}

fn fmt(x: Option<f64>) -> String {
    x.map_or("-".to_owned(), |v| format!("{v:.1}"))
}

pub fn run(args: &MigrateArgs) -> Result<i32, BenchError> {
    let p = Progress(Instant::now());
    let bin = find_binary("ferry-workload", "ferry-workload")?;
    let bin = bin.canonicalize().unwrap_or(bin);
    find_binary("ferry", "ferry-cli")?;
    let mut code = 0;
    let [first, second] = args.runtime.modes();
    let ferry = run_mode(&p, args, first, &bin, &mut code);
    let other = run_mode(&p, args, second, &bin, &mut code);
    let report = Report::build(args, ferry, other);
    print_report(args.json, &report, || report.table())?;
    for (name, m) in report.modes() {
        if let Some(e) = &m.error {
            p.say(format!("{name} failed: {e}"));
        }
    }
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_api::run::{CriuStats, LockMode};

    /// `--runtime` picks the workload it can run; runc with `serve` is refused, naming why.
    #[test]
    fn the_runtime_chooses_the_workload() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            args: MigrateArgs,
        }
        let parse = |a: &[&str]| {
            Cli::try_parse_from(std::iter::once("bench").chain(a.iter().copied())).map(|c| c.args)
        };
        let a = parse(&[]).unwrap();
        assert_eq!(
            (a.runtime, a.workload()),
            (RuntimeArg::Agent, Ok(WorkloadArg::Serve))
        );
        let a = parse(&["--runtime", "agent", "--workload", "redis"]).unwrap();
        assert_eq!(a.workload(), Ok(WorkloadArg::Redis));
        let a = parse(&["--runtime", "runc"]).unwrap();
        assert_eq!(
            (a.runtime, a.workload()),
            (RuntimeArg::Runc, Ok(WorkloadArg::Redis))
        );
        let e = parse(&["--runtime", "runc", "--workload", "serve"])
            .unwrap()
            .workload()
            .unwrap_err();
        assert!(e.contains("use --workload redis"), "{e}");
        let a = parse(&["--runtime", "podman"]).unwrap();
        assert_eq!(
            (a.runtime.modes(), a.workload()),
            ([Mode::Hold, Mode::PodmanOwn], Ok(WorkloadArg::Redis))
        );
        assert!(parse(&["--runtime", "crun"]).is_err());
        assert_eq!(redis_args("/r", "/tmp")[..2], ["/r", "--port"]);
    }

    /// Samples of one connection answering every `every` ms with latency 1 ms, from `t0` to
    /// `t1`, except requests sent in `[s0, s1)`, answered only at `s1` (a stall).
    fn conn(conn: u32, t0: f64, t1: f64, every: f64, stall: (f64, f64)) -> Vec<Sample> {
        let mut v = Vec::new();
        let mut t = t0;
        let mut seq = 0;
        while t < t1 {
            let latency = if t >= stall.0 && t < stall.1 {
                stall.1 - t + 1.0
            } else {
                1.0
            };
            v.push(Sample {
                unix_ms: t,
                conn,
                seq,
                latency_ms: Some(latency),
            });
            seq += 1;
            t += every;
        }
        v
    }

    fn report(started: f64, total: f64, stopped: f64, state: RunState) -> RunReport {
        let ph = |name: &str, ms: f64| PhaseTiming {
            name: name.into(),
            start_unix_ms: started,
            ms,
            bytes: None,
        };
        RunReport {
            id: "m1".into(),
            container: CONTAINER.parse().unwrap(),
            from: "a1".into(),
            to: "b1".into(),
            lock: LockMode::Hold,
            memory: Default::default(),
            state,
            started_unix_ms: started,
            total_ms: total,
            stopped_ms: stopped,
            phases: vec![ph("prepare", 5.0), ph("dump", 40.0), ph("release", 2.0)],
            events: Vec::new(),
            criu: Some(CriuStats {
                frozen_ms: 30.0,
                ..CriuStats::default()
            }),
            image_bytes: 1_000_000,
            image_bytes_during_dump: 0,
            error: None,
        }
    }

    #[test]
    fn the_gap_is_the_worst_connections_longest_silence_overlapping_the_window() {
        // Two connections, replies every 5 ms; conn 0 stalls 100 ms, conn 1 stalls 150 ms
        // (from 1200 to 1350). A third, earlier stall of conn 1 (outside the window) is longer.
        let mut s = conn(0, 1000.0, 2000.0, 5.0, (1200.0, 1300.0));
        let mut c1 = conn(1, 1000.0, 1100.0, 5.0, (2000.0, 2000.0));
        c1.extend(conn(1, 1400.0, 2000.0, 5.0, (1500.0, 1650.0)));
        s.extend(c1);
        let a = arrivals(&s, None);
        assert_eq!(a.len(), 2);
        // Window around conn 0's stall only: conn 1's 1500–1650 stall is outside, but its
        // 1096–1401 silence (no requests in between) overlaps.
        let g = gap_in_window(&a, 1190.0, 1310.0).unwrap();
        assert_eq!(g.conn, 1);
        assert!((g.ms - 305.0).abs() < 1e-9, "{g:?}");
        // A window touching only conn 0's and conn 1's later stall.
        let g = gap_in_window(&a, 1500.0, 1660.0).unwrap();
        assert_eq!(g.conn, 1);
        // 1495 + 1 = 1496 -> the 1500 request answered at 1651.
        assert!((g.ms - 155.0).abs() < 1e-9, "{g:?}");
        assert!((g.start_unix_ms - 1496.0).abs() < 1e-9);
        // Steady state: the interval.
        let g = gap_in_window(&a, 1800.0, 1810.0).unwrap();
        assert!((g.ms - 5.0).abs() < 1e-9, "{g:?}");
        // Nothing overlaps a window after the last reply.
        assert_eq!(gap_in_window(&a, 5000.0, 6000.0), None);
    }

    #[test]
    fn an_unanswered_tail_stays_silent_until_the_client_ends() {
        let mut s = conn(0, 1000.0, 1100.0, 5.0, (0.0, 0.0));
        s.push(Sample {
            unix_ms: 1100.0,
            conn: 0,
            seq: 99,
            latency_ms: None,
        });
        let a = arrivals(&s, Some(1500.0));
        assert_eq!(*a[0].last().unwrap(), 1500.0);
        let g = gap_in_window(&a, 1200.0, 1300.0).unwrap();
        assert!((g.ms - 404.0).abs() < 1e-9, "{g:?}");
        // Without the end, nothing overlaps.
        assert_eq!(gap_in_window(&arrivals(&s, None), 1200.0, 1300.0), None);
    }

    #[test]
    fn a_silence_spanning_two_runs_is_marked_on_the_second() {
        let m = |started: f64, total: f64, rel: Option<f64>| Migration {
            started_unix_ms: Some(started),
            total_ms: Some(total),
            gap_start_after_run_start_ms: rel,
            ..Migration::default()
        };
        let mut v = vec![
            m(1000.0, 200.0, Some(100.0)),
            m(1300.0, 200.0, Some(-150.0)),
            m(2000.0, 200.0, Some(-10.0)),
            m(2500.0, 200.0, None),
        ];
        mark_shared_gaps(&mut v);
        let marks: Vec<bool> = v.iter().map(|m| m.gap_overlaps_previous_run).collect();
        assert_eq!(marks, [false, true, false, false]);
    }

    #[test]
    fn percentiles_and_summaries() {
        // Two migrations with a 100 ms stall each at different places, one rolled back.
        let mut s = conn(0, 1000.0, 3000.0, 5.0, (1200.0, 1300.0));
        s.extend(conn(1, 1000.0, 3000.0, 5.0, (2200.0, 2260.0)));
        s.push(Sample {
            unix_ms: 2990.0,
            conn: 1,
            seq: 1000,
            latency_ms: None,
        });
        let a = arrivals(&s, None);
        let ok1 = Migration::from_report(&report(1150.0, 300.0, 80.0, RunState::Released), &a, &s);
        assert!((ok1.gap_ms.unwrap() - 105.0).abs() < 1e-9, "{ok1:?}");
        assert!((ok1.stall_overhead_ms.unwrap() - 25.0).abs() < 1e-9);
        assert!((ok1.gap_start_after_run_start_ms.unwrap() - 46.0).abs() < 1e-9);
        assert_eq!(ok1.frozen_ms, Some(30.0));
        assert_eq!(ok1.phases.dump, Some(40.0));
        assert_eq!(ok1.phases.transfer, None);
        let ok2 = Migration::from_report(&report(2150.0, 300.0, 50.0, RunState::Released), &a, &s);
        assert!((ok2.gap_ms.unwrap() - 65.0).abs() < 1e-9, "{ok2:?}");
        let rb = Migration::from_report(&report(2800.0, 300.0, 0.0, RunState::RolledBack), &a, &s);
        assert_eq!(rb.stall_overhead_ms, None);
        assert_eq!(rb.unanswered_in_window, 1);
        assert!(!rb.ok());
        let err = Migration {
            state: "error".into(),
            ..Migration::default()
        };
        let client = ClientFigures::from_summary(&serde_json::json!({
            "requests": 800, "replies": 799, "unanswered": 1, "resets": 0, "mismatches": 0,
            "retransmits": 7, "alive": 2, "max_gap_ms": 105.0
        }));
        let m = ModeSummary::build(Mode::Hold, vec![ok1, ok2, rb, err], Some(client), 2, None);
        assert_eq!((m.migrations_ok, m.migrations_failed), (2, 2));
        assert_eq!(m.gap_ms_p50, Some(85.0));
        assert_eq!(m.gap_ms_p99, Some(105.0));
        assert_eq!(m.gap_ms_max, Some(105.0));
        assert_eq!(m.stopped_ms_p50, Some(65.0));
        assert_eq!(m.stall_overhead_ms_p50, Some(20.0));
        assert_eq!(m.stall_overhead_ms_p99, Some(25.0));
        assert_eq!(m.frozen_ms_p50, Some(30.0));
        assert_eq!(m.image_bytes_p50, Some(1e6));
        assert_eq!(m.phase_ms_p50.prepare, Some(5.0));
        assert_eq!(m.client_retransmits, 7);
        // 1 unanswered "REQ 401 <16 bytes>\n".
        assert_eq!(m.bytes_lost, request_bytes(401, PAYLOAD_BYTES));
        assert!(m.bad());

        let crit = ModeSummary {
            gap_ms_p50: Some(170.0),
            stall_overhead_ms_p50: Some(60.0),
            ..ModeSummary::default()
        };
        let args = MigrateArgs {
            json: true,
            runs: 4,
            connections: 2,
            interval_ms: 5,
            pause_ms: 300,
            plaintext: false,
            runtime: RuntimeArg::Agent,
            workload: None,
        };
        let r = Report::build(&args, m, crit);
        assert_eq!(r.params.control_plane, "tls");
        assert_eq!((r.params.runtime, r.params.workload), ("agent", "serve"));
        assert_eq!(r.ratios.gap_p50_criu_lock_over_ferry, Some(2.0));
        assert_eq!(r.ratios.stall_overhead_p50_criu_lock_over_ferry, Some(3.0));
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["runs_per_mode"], 4);
        assert_eq!(v["ferry"]["per_migration"].as_array().unwrap().len(), 4);
        assert_eq!(v["ferry"]["phase_ms_p50"]["dump"], 40.0);
        assert!(r.table().contains("criu_lock"));
    }
}
