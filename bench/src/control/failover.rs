//! `ferry-lab bench control`'s `"failover"`: what a gateway's death costs, in a lab whose
//! registry is on etcd (three members, one per cloud) with a second gateway daemon on b1.
//!
//! A container on a1 serves `ferry-workload` behind a public address; a client on the internet
//! side talks to it through the gateway host (a request every 5 ms on 2 connections). Then
//! the main gateway daemon (on gw, where a1's, a2's and gw's agents watch) is SIGKILLed, and:
//! - `public_ms`: the longest time a request of the client waited for its answer from the
//!   kill until a2's agent applied a change made through the other gateway, and at least a
//!   second (the client reports every 50 ms; the public side is
//!   the gateway host's datapath, not the daemon: this says whether the daemon's death touches
//!   it);
//! - `agent_ms`: from the kill to a2's agent applying an endpoint added through b1's gateway
//!   (its watch failing over, its delta applied);
//! - `migration_ok`, `migration_ms`: `ferry migrate run` of the container to b1 (CRIU), its
//!   CLI pointed at both gateways (it falls back to b1's), released, one copy, the endpoint on
//!   b1;
//! - `resets`: the client's connections reset over all of it (must be 0).

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use ferry_api::EndpointSpec;
use ferry_lab::{Lab, LabOptions, Topology, bins::find_binary};
use serde::Serialize;

use crate::{
    BenchError, Progress,
    workload::{Stream, Workload, client_args},
};

const CONTAINER: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
const PUBLIC: &str = "203.0.113.130";
const PORT: u16 = 7000;
/// The host of the second gateway.
const SECOND: &str = "b1";
/// The endpoint added through the second gateway.
const ADDED: Ipv4Addr = Ipv4Addr::new(10, 244, 3, 3);
const DEADLINE: Duration = Duration::from_secs(60);
/// How long after the kill the client's waits are watched (at least).
const PUBLIC_WINDOW: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Serialize)]
pub struct Failover {
    pub public_ms: f64,
    pub resets: u64,
    pub agent_ms: f64,
    pub migration_ok: bool,
    pub migration_ms: f64,
}

fn failed(what: &str, e: impl std::fmt::Display) -> BenchError {
    BenchError::failed(format!("failover: {what}: {e}"))
}

pub(crate) fn measure(p: &Progress) -> Result<Failover, BenchError> {
    let bin = find_binary("ferry-workload", "ferry-workload")?;
    let mut lab = Lab::up(LabOptions {
        topology: Topology {
            etcd: true,
            extra_gateways: vec![SECOND.into()],
            ..Topology::default()
        },
        start_agents: true,
        ..LabOptions::default()
    })?;
    p.say(format!(
        "failover: lab {} up (etcd, a second gateway on {SECOND})",
        lab.prefix()
    ));
    let r = run(p, &mut lab, &bin);
    let down = lab.down();
    let r = r?;
    down?;
    Ok(r)
}

fn run(p: &Progress, lab: &mut Lab, bin: &std::path::Path) -> Result<Failover, BenchError> {
    lab.add_container("a1", CONTAINER)?;
    lab.ferry_json(&[
        "public",
        "add",
        "--public",
        PUBLIC,
        "--container",
        &CONTAINER.to_string(),
    ])?;
    lab.sync()?;
    let b = bin.to_string_lossy().into_owned();
    lab.start_process_on("a1", CONTAINER, &[&b, "serve", "--port", &PORT.to_string()])?;
    let args = client_args(&format!("{PUBLIC}:{PORT}"), 2, 5, &["--progress-ms", "50"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let client = Workload::start_connected(bin, &lab.netns(ferry_lab::INET), &args, |_, _| {})
        .map_err(|e| failed("client", e))?;
    // Answered before anything happens.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = client
            .next_json(
                Stream::Stderr,
                deadline.saturating_duration_since(Instant::now()),
            )
            .map_err(|e| failed("client", e))?;
        if v["event"] == "progress" && v["replies"].as_u64().unwrap_or(0) > 0 {
            break;
        }
    }
    let second = lab.extra_gateway(SECOND)?;

    p.say("failover: SIGKILL to the main gateway daemon");
    let t0 = Instant::now();
    lab.kill_gateway(libc::SIGKILL)?;
    // A change through the second gateway, applied by a2 (whose agent watched the dead one).
    let spec = EndpointSpec {
        ip: ADDED,
        host: "a2".into(),
        mac: None,
    };
    let v = lab
        .api_at(&second, move |c| async move {
            c.add_endpoints(&[spec]).await?;
            c.version().await
        })?
        .map_err(|e| failed("adding an endpoint through the second gateway", e))?;
    let mut public_ms: f64 = 0.0;
    let agent_ms = loop {
        while let Ok(e) = client.next_json(Stream::Stderr, Duration::ZERO) {
            if e["event"] == "progress" {
                public_ms = public_ms.max(e["oldest_outstanding_ms"].as_f64().unwrap_or(0.0));
            }
        }
        let hosts = lab
            .api_at(&second, |c| async move { c.hosts().await })?
            .map_err(|e| failed("hosts", e))?;
        if hosts
            .iter()
            .any(|h| h.info.name == "a2" && h.applied_version >= v)
        {
            break t0.elapsed().as_secs_f64() * 1e3;
        }
        if t0.elapsed() > DEADLINE {
            return Err(failed(
                "a2's agent",
                format!("did not apply version {v} within {DEADLINE:?}"),
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    p.say(format!(
        "failover: a2 applied a change through {SECOND}'s gateway {agent_ms:.0} ms after the kill"
    ));
    // The public side watched for at least a second after the kill.
    while t0.elapsed() < PUBLIC_WINDOW {
        if let Ok(e) = client.next_json(Stream::Stderr, PUBLIC_WINDOW.saturating_sub(t0.elapsed()))
            && e["event"] == "progress"
        {
            public_ms = public_ms.max(e["oldest_outstanding_ms"].as_f64().unwrap_or(0.0));
        }
    }

    // A migration with the main gateway dead: the CLI falls back to the second.
    let t1 = Instant::now();
    let out = lab.ferry(&[
        "--json",
        "migrate",
        "run",
        "--quiet",
        "--container",
        &CONTAINER.to_string(),
        "--to",
        SECOND,
    ])?;
    let migration_ms = t1.elapsed().as_secs_f64() * 1e3;
    let report: Option<ferry_api::run::RunReport> = serde_json::from_slice(&out.stdout).ok();
    let released = report
        .as_ref()
        .is_some_and(|r| r.state == ferry_api::run::RunState::Released);
    let on_second = lab.endpoint_host(CONTAINER).ok().as_deref() == Some(SECOND);
    if !(out.status.success() && released) {
        p.say(format!(
            "failover: migrate run: {} {}",
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let (summary, _) = client
        .finish(Duration::from_secs(20))
        .map_err(|e| failed("client", e))?;
    let resets = summary["resets"].as_u64().unwrap_or(u64::MAX);
    lab.start_gateway()?;
    Ok(Failover {
        public_ms,
        resets,
        agent_ms,
        migration_ok: out.status.success() && released && on_second && resets == 0,
        migration_ms,
    })
}
