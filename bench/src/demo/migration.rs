//! The live migration of the demo: `ferry-workload serve` runs as `web`'s process tree (started
//! through its agent's runtime), a `ferry-workload client` on the internet side keeps 4
//! connections busy through web's public address, and `ferry migrate run` moves the whole
//! container with CRIU to the other cloud and, a second later, back. The client checks every
//! reply; its per-request samples become an SVG ([`super::plot`]) and the runs a timeline
//! ([`super::timeline`]).

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use ferry_api::run::{RunReport, RunState};
use serde_json::Value;

use super::{
    containers::{WEB, WEB_HOST, WEB_PUBLIC},
    plot, step, timeline,
};
use crate::{
    migrate::{MigrateError, REDIS_PORT, migrate_run},
    samples::{Sample, client_gap_ms, read_samples},
    workload::{Stream, Workload, WorkloadError},
};
use ferry_lab::{
    Lab, LabError,
    bins::find_binary,
    clock::{ms, wait_until},
};

/// Client connections and the interval between requests on each.
pub const CONNECTIONS: usize = 4;
pub const INTERVAL_MS: u64 = 5;
/// Where the container goes, and the pause around the runs.
pub const AWAY: &str = "b1";
const WARM_UP: Duration = Duration::from_millis(700);
const BETWEEN: Duration = Duration::from_secs(1);
const SETTLE: Duration = Duration::from_millis(700);

/// Why the live migration could not be shown to its end (reported in the demo's report).
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error(transparent)]
    Workload(#[from] WorkloadError),
    #[error(transparent)]
    Run(#[from] MigrateError),
    #[error("{what}: {source}")]
    Lab {
        what: &'static str,
        source: Box<LabError>,
    },
    #[error("nothing listens on :{port} in {netns} after {timeout:?}", netns = .netns.display())]
    NotListening {
        port: u16,
        netns: PathBuf,
        timeout: Duration,
    },
    #[error("run {run} did not release: {why}")]
    NotReleased { run: usize, why: String },
    #[error("the redis image: {0}")]
    Image(#[from] ferry_lab::image::ImageError),
}

/// What the live migration showed.
#[derive(Debug, serde::Serialize)]
pub struct MigrationReport {
    pub container: Ipv4Addr,
    pub public: String,
    /// `ferry migrate run`'s reports, in order (a1 → b1, b1 → a1).
    pub runs: Vec<RunReport>,
    /// Per run: the longest silence a client connection saw around it (ms).
    pub client_gap_ms: Vec<f64>,
    /// `ferry-workload redis-client --json`'s summary.
    pub client: Option<Value>,
    /// Every connection alive, every reply right and in order, nothing unanswered.
    pub client_ok: bool,
    /// Requests recorded in the samples.
    pub samples: usize,
    /// The SVG written (absolute path).
    pub plot: Option<PathBuf>,
    /// Replies from web while it ran on the other cloud (between the runs).
    pub replies_while_away: usize,
    /// What went wrong, if anything did outside the runs and the client's checks.
    pub error: Option<String>,
}

impl Default for MigrationReport {
    fn default() -> Self {
        Self {
            container: WEB,
            public: SocketAddrV4::new(WEB_PUBLIC, REDIS_PORT).to_string(),
            runs: Vec::new(),
            client_gap_ms: Vec::new(),
            client: None,
            client_ok: false,
            samples: 0,
            plot: None,
            replies_while_away: 0,
            error: None,
        }
    }
}

impl MigrationReport {
    pub fn ok(&self) -> bool {
        self.error.is_none()
            && self.runs.len() == 2
            && self.runs.iter().all(|r| r.state == RunState::Released)
            && self.client_ok
    }
}

/// The client's own verdict (as `ferry-workload client`'s `passed`).
pub fn client_passed(summary: &Value) -> bool {
    let replies = summary.get("replies").and_then(Value::as_u64);
    ferry_workload::client::passed(summary) && replies.is_some_and(|r| r > 0)
}

/// Waits until something listens on TCP `port` in `ns` (without connecting to it).
fn wait_listening(
    lab: &Lab,
    ns: &Path,
    port: u16,
    timeout: Duration,
) -> Result<(), MigrationError> {
    let filter = format!("sport = :{port}");
    let listening = wait_until(timeout, Duration::from_millis(50), || {
        let out = lab
            .exec_in(ns, &["ss", "-Hltn", &filter])
            .map_err(|source| MigrationError::Lab {
                what: "ss",
                source: Box::new(source),
            })?;
        Ok::<_, MigrationError>(
            (!String::from_utf8_lossy(&out.stdout).trim().is_empty()).then_some(()),
        )
    })?;
    listening.ok_or_else(|| MigrationError::NotListening {
        port,
        netns: ns.to_owned(),
        timeout,
    })
}

/// Runs the live migration (see the module docs) and writes the plot to `plot_path`.
pub fn run(lab: &Lab, json: bool, t0: Instant, plot_path: &Path) -> MigrationReport {
    let mut report = MigrationReport::default();
    let samples_path = lab.state_dir().join("demo-samples.csv");
    if let Err(e) = moves(lab, json, t0, &samples_path, &mut report) {
        report.error = Some(e.to_string());
    }
    // Samples, gaps and the plot, with whatever was measured.
    let samples = match read_samples(&samples_path) {
        Ok(s) => s,
        Err(e) => {
            if report.client.is_some() {
                report.error.get_or_insert(format!("samples: {e}"));
            }
            Vec::new()
        }
    };
    report.samples = samples.len();
    report.client_gap_ms = report
        .runs
        .iter()
        .map(|r| {
            let gap = client_gap_ms(&samples, r.started_unix_ms, r.started_unix_ms + r.total_ms);
            (gap * 1e3).round() / 1e3
        })
        .collect();
    if let [first, second] = &report.runs[..] {
        let (from, to) = (
            first.started_unix_ms + first.total_ms,
            second.started_unix_ms,
        );
        report.replies_while_away = samples
            .iter()
            .filter(|s| s.latency_ms.is_some() && s.unix_ms > from && s.unix_ms < to)
            .count();
    }
    if !report.runs.is_empty() || !samples.is_empty() {
        let svg = plot::latency_svg(
            &samples,
            &report.runs,
            &format!(
                "ferry: web ({WEB}) live-migrated {WEB_HOST} → {AWAY} → {WEB_HOST}, {CONNECTIONS} connections, a request every {INTERVAL_MS} ms on each"
            ),
        );
        let abs = std::path::absolute(plot_path).unwrap_or_else(|_| plot_path.to_owned());
        match svg.map(|svg| std::fs::write(&abs, svg)) {
            Ok(Ok(())) => report.plot = Some(abs),
            Ok(Err(e)) => {
                report
                    .error
                    .get_or_insert(format!("writing {}: {e}", abs.display()));
            }
            Err(e) => {
                report.error.get_or_insert(e.to_string());
            }
        }
    }
    if !json {
        print_report(&report, &samples);
    }
    report
}

/// Starts the workload and the client, runs the two migrations, stops the client.
fn moves(
    lab: &Lab,
    json: bool,
    t0: Instant,
    samples_path: &Path,
    report: &mut MigrationReport,
) -> Result<(), MigrationError> {
    let bin =
        find_binary("ferry-workload", "ferry-workload").map_err(|source| MigrationError::Lab {
            what: "the workload",
            source: Box::new(source),
        })?;
    let bin = std::path::absolute(&bin).unwrap_or(bin);
    step(
        json,
        t0,
        "the OCI image `redis` (redis-server and its libraries from this machine's Debian packages, no registry; cached)",
    );
    let image = ferry_lab::image::build("redis")?;
    if !json {
        eprintln!("  {} ({})", image.image, image.path.display());
    }
    step(
        json,
        t0,
        &format!(
            "web runs redis-server in an OCI container under runc (its own root file system, mount, PID, IPC and UTS namespaces, cgroup), started through {WEB_HOST}'s agent"
        ),
    );
    let argv = ferry_lab::image::redis_args("/usr/bin/redis-server", "/tmp");
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let p = lab
        .start_runc(WEB, &image.image, &argv)
        .map_err(|source| MigrationError::Lab {
            what: "starting redis-server in web under runc",
            source: Box::new(source),
        })?;
    if !json {
        eprintln!("  {WEB}: PID {} on {WEB_HOST} ({}, runc)", p.pid, p.origin);
    }
    let inet = lab.netns(ferry_lab::INET);
    let public = SocketAddrV4::new(WEB_PUBLIC, REDIS_PORT);
    wait_listening(
        lab,
        &lab.container_netns(WEB_HOST, WEB),
        REDIS_PORT,
        Duration::from_secs(10),
    )?;

    step(
        json,
        t0,
        &format!(
            "the internet client opens {CONNECTIONS} redis connections to {public} and sends INCR + a payload SET/GET every {INTERVAL_MS} ms on each, checking every reply"
        ),
    );
    let to = public.to_string();
    let (n, interval) = (CONNECTIONS.to_string(), INTERVAL_MS.to_string());
    let samples = samples_path.to_string_lossy().into_owned();
    let client = Workload::start(
        &bin,
        &inet,
        &[
            "redis-client",
            "--to",
            &to,
            "--connections",
            &n,
            "--interval-ms",
            &interval,
            "--samples",
            &samples,
            "--json",
        ],
        false,
    )?;
    client.next_json(Stream::Stderr, Duration::from_secs(15))?;
    std::thread::sleep(WARM_UP);

    let result = (|| {
        for (i, to) in [AWAY, WEB_HOST].into_iter().enumerate() {
            if i > 0 {
                std::thread::sleep(BETWEEN);
            }
            step(
                json,
                t0,
                &format!(
                    "live migration {}: web (processes, memory, connections) → {to}",
                    i + 1
                ),
            );
            let t = Instant::now();
            let c = WEB.to_string();
            let args = ["--container", &c, "--to", to, "--runtime", "runc"];
            if !json {
                eprintln!("  $ ferry migrate run {}", args.join(" "));
            }
            let r = migrate_run(lab, &args)?;
            if !json {
                eprintln!(
                    "  {} {} → {}: {} in {:.0} ms ({:.0} ms for the call)",
                    r.id,
                    r.from,
                    r.to,
                    r.state.as_str(),
                    r.total_ms,
                    ms(t.elapsed())
                );
            }
            let released = r.state == RunState::Released;
            let why = r.error.clone();
            report.runs.push(r);
            if !released {
                return Err(MigrationError::NotReleased {
                    run: i + 1,
                    why: why.unwrap_or_else(|| "no error given".into()),
                });
            }
        }
        Ok(())
    })();
    std::thread::sleep(SETTLE);
    step(
        json,
        t0,
        "stopping the client (it waits for the replies still owed)",
    );
    client.signal(libc::SIGTERM)?;
    let summary = client.next_json(Stream::Stdout, Duration::from_secs(20))?;
    report.client_ok = client_passed(&summary);
    report.client = Some(summary);
    // The workload stops with the lab; stop it now for a clean exit where it runs.
    if let Err(e) = lab.stop_process(WEB)
        && !json
    {
        eprintln!("  stopping the workload: {e}");
    }
    result
}

fn print_report(r: &MigrationReport, samples: &[Sample]) {
    let t0 = samples
        .iter()
        .map(|s| s.unix_ms)
        .reduce(f64::min)
        .or_else(|| r.runs.first().map(|x| x.started_unix_ms))
        .unwrap_or(0.0);
    if !r.runs.is_empty() {
        eprintln!("  timeline (ms since the client's first request):");
        for line in timeline::timeline(&r.runs, t0).lines() {
            eprintln!("    {line}");
        }
        eprintln!();
        for line in timeline::phase_table(&r.runs).lines() {
            eprintln!("    {line}");
        }
        for (run, gap) in r.runs.iter().zip(&r.client_gap_ms) {
            eprintln!(
                "  {} {} → {}: the client's longest silence {gap:.0} ms (phases {:.0} ms in all)",
                run.id, run.from, run.to, run.total_ms
            );
        }
    }
    if let Some(c) = &r.client {
        let n = |k: &str| c.get(k).and_then(Value::as_u64).unwrap_or(0);
        let f = |k: &str| c.get(k).and_then(Value::as_f64).unwrap_or(0.0);
        eprintln!(
            "  client: {}/{} connections alive, {} requests, {} replies, {} unanswered, {} wrong or out of order, {} resets, {} retransmits; latency p50 {:.2} ms, max {:.0} ms → {}",
            n("alive"),
            n("connections"),
            n("requests"),
            n("replies"),
            n("unanswered"),
            n("mismatches"),
            n("resets"),
            n("retransmits"),
            f("p50_latency_ms"),
            f("max_latency_ms"),
            if r.client_ok {
                "every reply right, in order, on the same connections"
            } else {
                "FAILED"
            }
        );
        if let Some(ex) = c.get("mismatch_examples").and_then(Value::as_array) {
            for e in ex.iter().filter_map(Value::as_str) {
                eprintln!("    {e}");
            }
        }
        eprintln!(
            "  {} replies came from web on {AWAY} between the runs",
            r.replies_while_away
        );
    }
    if let Some(p) = &r.plot {
        eprintln!(
            "  plot: {} ({} requests; open it in a browser)",
            p.display(),
            r.samples
        );
    }
    if let Some(e) = &r.error {
        eprintln!("  FAILED: {e}");
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::demo::plot::tests::run;

    #[test]
    fn the_client_passes_only_with_every_reply_right() {
        let good = json!({"connections": 4, "alive": 4, "replies": 800, "resets": 0,
            "mismatches": 0, "errors": 0, "closed_by_server": 0, "unanswered": 0});
        assert!(client_passed(&good));
        for (k, v) in [
            ("resets", 1),
            ("mismatches", 2),
            ("unanswered", 1),
            ("alive", 3),
            ("replies", 0),
            ("closed_by_server", 1),
        ] {
            let mut bad = good.clone();
            bad[k] = json!(v);
            assert!(!client_passed(&bad), "{k}");
        }
        assert!(!client_passed(&json!({})));
    }

    #[test]
    fn the_report_needs_two_released_runs_and_a_clean_client() {
        let ok = MigrationReport {
            runs: vec![
                run("m1", "a1", "b1", 1000.0, &[("prepare", 1.0)]),
                run("m2", "b1", "a1", 3000.0, &[("prepare", 1.0)]),
            ],
            client_ok: true,
            ..MigrationReport::default()
        };
        assert!(ok.ok());
        let mut rolled_back = MigrationReport {
            runs: ok.runs.clone(),
            client_ok: true,
            ..MigrationReport::default()
        };
        rolled_back.runs[1].state = RunState::RolledBack;
        assert!(!rolled_back.ok());
        let one = MigrationReport {
            runs: ok.runs[..1].to_vec(),
            client_ok: true,
            ..MigrationReport::default()
        };
        assert!(!one.ok());
        let client = MigrationReport {
            runs: ok.runs.clone(),
            ..MigrationReport::default()
        };
        assert!(!client.ok());
        let json = serde_json::to_value(&ok).unwrap();
        assert_eq!(json["runs"][0]["from"], "a1");
        assert_eq!(json["container"], "10.244.1.10");
        assert_eq!(json["public"], "203.0.113.130:6379");
    }
}
