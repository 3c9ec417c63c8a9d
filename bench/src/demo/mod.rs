//! `ferry-lab demo`: ferry's main job shown end to end in a lab. The default lab comes up with
//! an agent on every host and the gateway's registry; every host reaches every other over the
//! eBPF VXLAN overlay; containers are placed through the registry, talk across hosts and
//! clouds, and are reached from the internet side through public addresses. Then the live
//! migration: `web` runs a stateful server (`ferry-workload serve`), a client on the internet
//! keeps 4 connections busy through web's public address, and `ferry migrate run` moves the
//! whole container with CRIU to the other cloud and back: every reply must arrive, right and in
//! order, with no reset. The runs' timeline is printed and the client's per-request latencies,
//! with the runs' phases, are drawn as an SVG (`--plot`). The datapath counters show what
//! crossed, and the lab is torn down with nothing left behind.

mod containers;
mod migration;
pub mod plot;
pub mod timeline;

use std::{
    collections::BTreeMap,
    convert::Infallible,
    path::PathBuf,
    time::{Duration, Instant},
};

pub use migration::MigrationReport;

use ferry_lab::{Lab, LabError, LabOptions, Topology, clock::wait_until, leftovers};

/// Where the plot goes unless told (relative to the current directory).
pub const DEFAULT_PLOT: &str = "ferry-demo.svg";

/// How to run the demo.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub topology: Topology,
    /// Print the report as JSON on stdout (progress stays on stderr).
    pub json: bool,
    /// Where to write the latency plot (default [`DEFAULT_PLOT`]).
    pub plot: Option<PathBuf>,
}

/// What the demo measured (printed as a table, or as JSON with `--json`).
#[derive(Debug, serde::Serialize)]
pub struct DemoReport {
    pub prefix: String,
    pub lab_up_ms: u64,
    /// (from, to) → average RTT over the overlay in µs; `None` if unreachable.
    pub overlay_rtt_us: BTreeMap<String, Option<u64>>,
    /// Containers and public addresses (topologies with a gateway).
    pub containers: Option<containers::ContainersReport>,
    /// The live migration: runs, the client's summary, the plot (topologies with a gateway).
    pub migration: Option<MigrationReport>,
    /// host → non-zero datapath counters (reason → packets).
    pub counters: BTreeMap<String, BTreeMap<String, u64>>,
    pub teardown_ms: u64,
    pub leftovers: Vec<String>,
}

impl DemoReport {
    pub fn ok(&self) -> bool {
        self.overlay_rtt_us.values().all(Option::is_some)
            && self
                .containers
                .as_ref()
                .is_none_or(containers::ContainersReport::ok)
            && self.migration.as_ref().is_none_or(MigrationReport::ok)
            && self.containers.is_some() == self.migration.is_some()
            && self.leftovers.is_empty()
    }
}

fn step(json: bool, t0: Instant, msg: &str) {
    if !json {
        eprintln!("[{:>7.3}s] {msg}", t0.elapsed().as_secs_f64());
    }
}

/// The demo with the plot at [`DEFAULT_PLOT`].
pub fn run(topology: Topology, json: bool) -> Result<DemoReport, LabError> {
    run_with(DemoOptions {
        topology,
        json,
        plot: None,
    })
}

pub fn run_with(opts: DemoOptions) -> Result<DemoReport, LabError> {
    let DemoOptions {
        topology,
        json,
        plot,
    } = opts;
    let plot = plot.unwrap_or_else(|| PathBuf::from(DEFAULT_PLOT));
    let t0 = Instant::now();
    step(
        json,
        t0,
        "bringing up the lab: namespaces, router, clouds, gateway, internet, agents",
    );
    let lab = Lab::up(LabOptions {
        topology,
        start_agents: true,
        ..LabOptions::default()
    })?;
    let prefix = lab.prefix().to_owned();
    let lab_up_ms = lab.up_duration().as_millis() as u64;
    step(json, t0, &format!("lab {prefix} up in {lab_up_ms} ms"));
    let hosts: Vec<_> = lab.topology().hosts.clone();
    if !json {
        eprintln!(
            "  {:<6} {:<6} {:<15} {:<15}",
            "host", "cloud", "underlay", "overlay"
        );
        for h in &hosts {
            eprintln!(
                "  {:<6} {:<6} {:<15} {:<15}",
                h.name, h.cloud, h.address, h.overlay_ip
            );
        }
    }

    step(
        json,
        t0,
        "every host pings every other host's overlay address (eBPF VXLAN)",
    );
    let mut overlay_rtt_us = BTreeMap::new();
    for from in &hosts {
        let mut line = Vec::new();
        for to in hosts.iter().filter(|h| h.name != from.name) {
            let rtt = ping_avg_us(&lab, &from.name, &to.overlay_ip.to_string());
            let cross = if from.cloud == to.cloud { "" } else { "*" };
            line.push(match rtt {
                Some(us) => format!("{}{cross} {us} µs", to.name),
                None => format!("{}{cross} UNREACHABLE", to.name),
            });
            overlay_rtt_us.insert(format!("{}->{}", from.name, to.name), rtt);
        }
        if !json {
            eprintln!("  {:>4} → {}", from.name, line.join(" · "));
        }
    }
    if !json {
        eprintln!("  (* across clouds)");
    }

    let (containers, migration) = if lab.control().is_some() {
        let mut c = containers::run(&lab, json, t0)?;
        let m = migration::run(&lab, json, t0, &plot);
        c.moved_reachable = m.replies_while_away > 0
            && m.runs
                .first()
                .is_some_and(|r| r.state == ferry_api::run::RunState::Released);
        (Some(c), Some(m))
    } else {
        (None, None)
    };

    step(
        json,
        t0,
        "datapath counters (per reason, from each agent's /metrics)",
    );
    let mut counters = BTreeMap::new();
    for h in &hosts {
        let c = agent_counters(&lab, &h.name);
        if !json {
            let line: Vec<_> = c.iter().map(|(r, n)| format!("{r}={n}")).collect();
            eprintln!("  {:<4} {}", h.name, line.join(" "));
        }
        counters.insert(h.name.clone(), c);
    }

    step(json, t0, "tearing down");
    let t = Instant::now();
    lab.down()?;
    let teardown_ms = t.elapsed().as_millis() as u64;
    let left = leftovers(&prefix);
    step(
        json,
        t0,
        &format!(
            "torn down in {teardown_ms} ms; left behind: {}",
            if left.is_empty() {
                "nothing".to_owned()
            } else {
                left.join(", ")
            }
        ),
    );
    Ok(DemoReport {
        prefix,
        lab_up_ms,
        overlay_rtt_us,
        containers,
        migration,
        counters,
        teardown_ms,
        leftovers: left,
    })
}

fn ping_avg_us(lab: &Lab, from: &str, to: &str) -> Option<u64> {
    let out = lab
        .exec(
            from,
            &["ping", "-c", "3", "-i", "0.05", "-W", "1", "-q", to],
        )
        .ok()?;
    if !out.status.success() {
        return None;
    }
    // "rtt min/avg/max/mdev = 0.050/0.070/0.090/0.010 ms"
    let text = String::from_utf8_lossy(&out.stdout);
    let stats = text.lines().find(|l| l.contains("min/avg/max"))?;
    let avg_ms: f64 = stats
        .split('=')
        .nth(1)?
        .trim()
        .split('/')
        .nth(1)?
        .parse()
        .ok()?;
    Some((avg_ms * 1000.0).round() as u64)
}

fn agent_counters(lab: &Lab, host: &str) -> BTreeMap<String, u64> {
    let Ok(metrics) = wait_until(Duration::from_secs(2), Duration::from_millis(100), || {
        let out = lab.exec(host, &["curl", "-sf", "http://127.0.0.1:9464/metrics"]);
        Ok::<_, Infallible>(out.ok().filter(|o| o.status.success()))
    });
    let Some(out) = metrics else {
        return BTreeMap::new();
    };
    ferry_config::metrics::parse_packets(&String::from_utf8_lossy(&out.stdout))
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .collect()
}
