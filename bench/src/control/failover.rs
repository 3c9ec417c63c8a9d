//! `ferry-lab bench control`'s `"failover"`: what losing a gateway host costs, in a lab whose
//! registry is on etcd (three members, one per cloud) with two hosts facing the internet
//! (`Topology::two_public_gateways`: gw, and gw2 standing by, each running a gateway daemon).
//!
//! A container on a1 serves `ferry-workload` behind a public address; a client on the internet
//! side talks to it through gw (a request every 5 ms on 2 connections). Then gw is powered off
//! (every process on it SIGKILLed: its agent, the main gateway daemon, an etcd member — maybe
//! the leader —, and its interfaces set down), and:
//! - `public_ms`: the longest time a request of the client waited for its answer, from the
//!   power-off until a second after gw2 faces the internet (the client reports every 50 ms);
//! - `takeover_ms`: from the power-off until the registry says gw2 faces the internet (gw2
//!   heard gw fall silent and took over); `etcd_leader_lost`: whether etcd's leader died with
//!   gw (the takeover's write then waits for an election);
//! - `agent_ms`: from the power-off to a2's agent applying an endpoint added through gw2's
//!   gateway (its watch failing over, its delta applied);
//! - `migration_ok`, `migration_ms`: `ferry migrate run` of the container to b1 (CRIU), its
//!   CLI pointed at both gateways (it falls back to gw2's), released, one copy, the endpoint on
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
/// The standby gateway host (also running a gateway daemon).
const SECOND: &str = "gw2";
/// Where the container migrates with gw dead.
const DESTINATION: &str = "b1";
/// The endpoint added through the second gateway.
const ADDED: Ipv4Addr = Ipv4Addr::new(10, 244, 3, 3);
const DEADLINE: Duration = Duration::from_secs(60);
/// How long after the takeover the client's waits are still watched.
const PUBLIC_WINDOW: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Serialize)]
pub struct Failover {
    pub public_ms: f64,
    pub resets: u64,
    pub takeover_ms: f64,
    pub etcd_leader_lost: bool,
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
        topology: Topology::two_public_gateways(),
        start_agents: true,
        ..LabOptions::default()
    })?;
    p.say(format!(
        "failover: lab {} up (etcd, {SECOND} standing by on the internet side)",
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

    // Steady state: every agent has heard the gateway-role hosts.
    lab.wait_public_heartbeats(&[SECOND, "a1", "a2", "b1"], Duration::from_secs(20))?;
    let leader_lost = etcd_leader_on(lab, "gw");
    p.say("failover: gw powered off");
    let t0 = Instant::now();
    lab.power_off("gw")?;
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
    let mut watch = |client: &Workload, wait: Duration| {
        while let Ok(e) = client.next_json(Stream::Stderr, wait) {
            if e["event"] == "progress" {
                public_ms = public_ms.max(e["oldest_outstanding_ms"].as_f64().unwrap_or(0.0));
            }
            if !wait.is_zero() {
                break;
            }
        }
    };
    let (mut agent_ms, mut takeover_ms) = (None, None);
    while agent_ms.is_none() || takeover_ms.is_none() {
        watch(&client, Duration::ZERO);
        let hosts = lab
            .api_at(&second, |c| async move { c.hosts().await })?
            .map_err(|e| failed("hosts", e))?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        if agent_ms.is_none()
            && hosts
                .iter()
                .any(|h| h.info.name == "a2" && h.applied_version >= v)
        {
            agent_ms = Some(ms);
        }
        if takeover_ms.is_none()
            && ferry_api::public_gateway(hosts.iter().map(|h| &h.info))
                .is_some_and(|h| h.name == SECOND)
        {
            takeover_ms = Some(ms);
        }
        if t0.elapsed() > DEADLINE {
            return Err(failed(
                "the failover",
                format!(
                    "within {DEADLINE:?}: a2 applied version {v}: {}; {SECOND} faces the internet: {}",
                    agent_ms.is_some(),
                    takeover_ms.is_some()
                ),
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let (agent_ms, takeover_ms) = (
        agent_ms.unwrap_or_default(),
        takeover_ms.unwrap_or_default(),
    );
    p.say(format!(
        "failover: {SECOND} faces the internet {takeover_ms:.0} ms after the power-off (etcd leader lost: {leader_lost}); a2 applied a change through {SECOND}'s gateway after {agent_ms:.0} ms"
    ));
    if takeover_ms > 2_000.0 && !leader_lost {
        // Not the etcd election: say what the standby saw.
        let log = std::fs::read_to_string(lab.agent_log(SECOND)).unwrap_or_default();
        for l in log.lines().filter(|l| l.contains("public failover")) {
            p.say(format!("failover: {SECOND}: {l}"));
        }
    }
    // The public side watched for a while after the takeover.
    let until = Instant::now() + PUBLIC_WINDOW;
    while Instant::now() < until {
        watch(&client, until.saturating_duration_since(Instant::now()));
    }

    // A migration with the main gateway dead: the CLI falls back to the second.
    let t1 = Instant::now();
    let out = lab.ferry_from(
        SECOND,
        &[
            "--json",
            "migrate",
            "run",
            "--quiet",
            "--container",
            &CONTAINER.to_string(),
            "--to",
            DESTINATION,
        ],
    )?;
    let migration_ms = t1.elapsed().as_secs_f64() * 1e3;
    let report: Option<ferry_api::run::RunReport> = serde_json::from_slice(&out.stdout).ok();
    let released = report
        .as_ref()
        .is_some_and(|r| r.state == ferry_api::run::RunState::Released);
    // Asked of gw2's gateway: the main one died with gw.
    let on_second = lab
        .api_at(&second, |c| async move { c.endpoints().await })
        .ok()
        .and_then(Result::ok)
        .is_some_and(|eps| {
            eps.iter()
                .any(|e| e.ip == CONTAINER && e.host == DESTINATION)
        });
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
    Ok(Failover {
        public_ms,
        resets,
        takeover_ms,
        etcd_leader_lost: leader_lost,
        agent_ms,
        migration_ok: out.status.success() && released && on_second && resets == 0,
        migration_ms,
    })
}

/// Whether etcd's leader is the member on `host` (its JSON gateway's status of a member names
/// the member and the leader). `false` when it cannot tell.
fn etcd_leader_on(lab: &Lab, host: &str) -> bool {
    let Some(addr) = ferry_lab::control::etcd_members(lab.topology())
        .into_iter()
        .find(|(h, _)| h == host)
        .map(|(_, a)| a)
    else {
        return false;
    };
    let status = match lab.etcd_client_tls() {
        Ok(Some(tls)) => {
            ferry_api::transport::Request::post("/v3/maintenance/status").tls(Some(tls))
        }
        Ok(None) => ferry_api::transport::Request::post("/v3/maintenance/status").plain(),
        Err(_) => return false,
    };
    let status = status.json(b"{}".to_vec()).timeout(Duration::from_secs(3));
    let Ok(answer) =
        ferry_overlay::netns::run_in(&lab.netns(host), move || status.send_blocking(addr))
    else {
        return false;
    };
    let Ok(Ok(answer)) = answer.map(|a| serde_json::from_slice::<serde_json::Value>(&a.body))
    else {
        return false;
    };
    let id = &answer["header"]["member_id"];
    !id.is_null() && *id == answer["leader"]
}
