//! `ferry-lab demo`: ferry's main job shown end to end in a lab. Today: the default lab comes
//! up with an agent on every host and the gateway's registry; every host reaches every other
//! over the eBPF VXLAN overlay; containers are placed through the registry, talk across hosts
//! and clouds, and are reached from the internet side through public addresses; one container
//! is moved by hand to another cloud and stays reachable at its public address; the datapath
//! counters show what crossed, and the lab is torn down with nothing left behind.

mod containers;

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use crate::{Lab, LabError, LabOptions, Topology, leftovers};

/// What the demo measured (printed as a table, or as JSON with `--json`).
#[derive(Debug, serde::Serialize)]
pub struct DemoReport {
    pub prefix: String,
    pub lab_up_ms: u64,
    /// (from, to) → average RTT over the overlay in µs; `None` if unreachable.
    pub overlay_rtt_us: BTreeMap<String, Option<u64>>,
    /// Containers, public addresses and a move by hand (topologies with a gateway).
    pub containers: Option<containers::ContainersReport>,
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
            && self.leftovers.is_empty()
    }
}

fn step(json: bool, t0: Instant, msg: &str) {
    if !json {
        eprintln!("[{:>7.3}s] {msg}", t0.elapsed().as_secs_f64());
    }
}

pub fn run(topology: Topology, json: bool) -> Result<DemoReport, LabError> {
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
        for to in &hosts {
            if from.name == to.name {
                continue;
            }
            let rtt = ping_avg_us(&lab, &from.name, &to.overlay_ip.to_string());
            if !json {
                let cross = if from.cloud == to.cloud {
                    "same cloud "
                } else {
                    "cross-cloud"
                };
                match rtt {
                    Some(us) => {
                        eprintln!("  {:>4} → {:<4} {cross} {:>7} µs", from.name, to.name, us)
                    }
                    None => eprintln!("  {:>4} → {:<4} {cross} UNREACHABLE", from.name, to.name),
                }
            }
            overlay_rtt_us.insert(format!("{}->{}", from.name, to.name), rtt);
        }
    }

    let containers = if lab.control().is_some() {
        Some(containers::run(&lab, json, t0)?)
    } else {
        None
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
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        if let Ok(out) = lab.exec(host, &["curl", "-sf", "http://127.0.0.1:9464/metrics"])
            && out.status.success()
        {
            return ferry_agent::metrics::parse_packets(&String::from_utf8_lossy(&out.stdout))
                .into_iter()
                .filter(|(_, n)| *n > 0)
                .collect();
        }
        if Instant::now() > deadline {
            return BTreeMap::new();
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
