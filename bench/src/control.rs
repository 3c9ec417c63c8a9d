//! `ferry-lab bench control`: how fast a registry change reaches the agents, against the
//! registry's size and the number of watchers, in a lab of its own.
//!
//! The lab's four real agents (a1, a2, b1, gw) follow the gateway as always; `--watchers`
//! simulated watchers besides them hold the same long poll open (`GET /v1/watch?…&delta=true`
//! as host `phantom`, a registered host without an agent that also carries the registry's
//! endpoints). They run in the hosts' namespaces (one thread per namespace, entered before its
//! runtime starts), spread evenly: the bench's labs let the gateway take [`PER_PEER`]
//! connections per peer address (`max_connections_per_peer`; the default is 64), so the bench
//! takes at most [`MAX_WATCHERS`]. Per row (`--endpoints` × `--watchers`), `--changes`
//! changes (one endpoint added or removed on `phantom`), each measured from just before its
//! request to:
//! - a simulated watcher's receipt of the answer carrying its version (parsed JSON);
//! - a real agent's report that it applied it (the gateway's `applied_version`, polled every
//!   few milliseconds: that is the column's resolution).
//!
//! Also per row: the bytes the gateway sent per watch answer during the changes (its
//! `ferry_gateway_watch_bytes_total`), next to the size of a whole snapshot.
//!
//! `--stores file,etcd`: each store in a lab of its own, side by side in one run (etcd: the
//! topology's `etcd`, a member in the first host of each cloud, so every change commits
//! across clouds). With etcd the lab runs a second gateway on b1 ([`FOLLOWER`]), as a
//! deployment with one gateway per cloud would: the changes go through the main one, and
//! b1's agent and the simulated watchers in b1's namespace follow the second, which applies
//! each change from etcd's log before it answers them (the `follower_ms` columns). With etcd, `"failover"`: what losing a gateway host costs, in a lab of its
//! own with two hosts facing the internet ([`failover`]).

use std::{
    collections::HashMap,
    fmt::Write as _,
    net::Ipv4Addr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use clap::Args;
use ferry_api::{Client, EndpointSpec, HostInfo, HostRole};
use ferry_lab::{Lab, LabOptions, Topology, control::Party};
use serde::Serialize;

use crate::{BenchError, Progress, print_report, stats::percentile_of};

pub mod failover;

/// Most endpoints a row may hold: the agents' map, less room for the hosts and the changes.
const MAX_BENCH_ENDPOINTS: u32 = ferry_overlay::common::MAX_ENDPOINTS - 1_144;

/// The gateway's `max_connections_per_peer` in the bench's labs.
pub const PER_PEER: usize = 320;
/// Watchers the bench can hold open: 4 namespaces × (the connections per peer, less the real
/// agent's own and the polling's).
pub const MAX_WATCHERS: u32 = 4 * 250;
/// The namespaces the simulated watchers run in.
const WATCHER_HOSTS: [&str; 4] = ["a1", "a2", "b1", "gw"];
/// The lab's real agents.
const AGENTS: [&str; 4] = ["a1", "a2", "b1", "gw"];
/// The host of the second gateway in the etcd labs (its cloud's agent and watchers use it).
const FOLLOWER: &str = "b1";
/// The registered host without an agent.
const PHANTOM: &str = "phantom";
/// The endpoint the measured changes add and remove (beyond the phantom's endpoints, which
/// start at 10.241.0.0).
const CHANGED: Ipv4Addr = Ipv4Addr::new(10, 250, 0, 1);
/// How long one change may take to reach everyone before the bench gives up.
const CHANGE_DEADLINE: Duration = Duration::from_secs(120);

/// `ferry-lab bench control`.
#[derive(Debug, Clone, Args)]
pub struct ControlArgs {
    /// Registry sizes: endpoints on `phantom` (comma-separated; at most 261,000, the agents'
    /// map holds 262,144 with the hosts and the changes).
    #[arg(long, value_delimiter = ',', default_value = "1000,65536")]
    pub endpoints: Vec<u32>,
    /// Simulated watchers besides the 4 real agents (comma-separated; at most 1000).
    #[arg(long, value_delimiter = ',', default_value = "0,50,200")]
    pub watchers: Vec<u32>,
    /// Changes measured per row.
    #[arg(long, default_value_t = 20)]
    pub changes: u32,
    /// The registry's stores to measure, each in a lab of its own (comma-separated: file,
    /// etcd).
    #[arg(long, value_delimiter = ',', default_value = "file,etcd")]
    pub stores: Vec<Store>,
    /// Skip the gateway failover measurement (made when `etcd` is among `--stores`).
    #[arg(long)]
    pub no_failover: bool,
    /// Print exactly one JSON object on stdout instead of the table (progress on stderr).
    #[arg(long)]
    pub json: bool,
}

/// Where the gateway keeps the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Store {
    File,
    Etcd,
}

impl Store {
    fn name(self) -> &'static str {
        match self {
            Store::File => "file",
            Store::Etcd => "etcd",
        }
    }
}

/// One row: a registry size and a number of watchers.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub store: &'static str,
    pub endpoints: u32,
    /// Simulated watchers plus the real agents.
    pub watchers: u32,
    /// Change to applied (agents) or received (simulated watchers), over all of them and
    /// every change.
    pub applied_ms_p50: f64,
    pub applied_ms_p99: f64,
    /// The real agents alone (applied and reported).
    pub agents_applied_ms_p50: f64,
    pub agents_applied_ms_p99: f64,
    /// The simulated watchers and the agent that follow the second gateway (etcd only;
    /// included in the figures above too): how many, and their change to applied.
    pub follower_watchers: u32,
    pub follower_ms_p50: Option<f64>,
    pub follower_ms_p99: Option<f64>,
    /// Bytes per watch answer during the changes, and of a whole snapshot.
    pub bytes_per_answer: u64,
    pub snapshot_bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub rows: Vec<Row>,
    /// What losing a gateway host costs ([`failover`]); measured with `etcd` in
    /// `--stores` unless `--no-failover`.
    pub failover: Option<failover::Failover>,
    pub changes_per_row: u32,
}

pub fn run(args: &ControlArgs) -> Result<i32, BenchError> {
    let p = Progress(Instant::now());
    if let Some(w) = args.watchers.iter().find(|w| **w > MAX_WATCHERS) {
        return Err(BenchError::failed(format!(
            "--watchers {w}: at most {MAX_WATCHERS} (the lab's gateway allows {PER_PEER} connections per peer)"
        )));
    }
    if let Some(n) = args
        .endpoints
        .iter()
        .find(|n| **n > MAX_BENCH_ENDPOINTS || **n == 0)
    {
        return Err(BenchError::failed(format!(
            "--endpoints {n}: 1 to {MAX_BENCH_ENDPOINTS} (the agents' map holds {} with the \
             hosts and the changes)",
            ferry_overlay::common::MAX_ENDPOINTS
        )));
    }
    if args.changes == 0 {
        return Err(BenchError::failed("--changes must be at least 1"));
    }
    raise_nofile();
    if args.stores.is_empty() {
        return Err(BenchError::failed("--stores: at least one of file, etcd"));
    }
    let mut rows = Vec::new();
    for &store in &args.stores {
        // 261,000 endpoints do not fit a /16 next to the hosts: a /12.
        let lab = Lab::up(LabOptions {
            topology: Topology {
                overlay_cidr: "10.240.0.0/12".parse().expect("valid"),
                etcd: store == Store::Etcd,
                extra_gateways: if store == Store::Etcd {
                    vec![FOLLOWER.into()]
                } else {
                    Vec::new()
                },
                gateway_connections_per_peer: Some(PER_PEER),
                ..Topology::default()
            },
            start_agents: true,
            ..LabOptions::default()
        })?;
        p.say(format!("lab {} up (store: {})", lab.prefix(), store.name()));
        let r = measure(&p, args, &lab, store);
        let down = lab.down();
        rows.extend(r?);
        down?;
    }
    let failover = if args.stores.contains(&Store::Etcd) && !args.no_failover {
        Some(failover::measure(&p)?)
    } else {
        None
    };
    let report = Report {
        rows,
        failover,
        changes_per_row: args.changes,
    };
    print_report(args.json, &report, || table(&report))?;
    Ok(0)
}

fn api<T: Send + 'static, F, Fut>(lab: &Lab, f: F) -> Result<T, BenchError>
where
    F: FnOnce(Client) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, ferry_api::ApiError>>,
{
    lab.api(f)?
        .map_err(|e| BenchError::failed(format!("gateway API: {e}")))
}

fn measure(
    p: &Progress,
    args: &ControlArgs,
    lab: &Lab,
    store: Store,
) -> Result<Vec<Row>, BenchError> {
    api(lab, |c| async move {
        c.register_host(&HostInfo {
            name: PHANTOM.into(),
            vtep: "198.18.2.99".parse().expect("valid"),
            overlay_ip: "10.255.255.99".parse().expect("valid"),
            role: HostRole::Host,
            active_since: None,
        })
        .await
    })?;
    let mut sizes = args.endpoints.clone();
    sizes.sort_unstable();
    let mut watchers = args.watchers.clone();
    watchers.sort_unstable();
    let mut have = 0u32;
    let mut rows = Vec::new();
    for n in sizes {
        p.say(format!("registry: {n} endpoints on {PHANTOM}"));
        grow(lab, have, n)?;
        have = n;
        let v = api(lab, |c| async move { c.version().await })?;
        wait_agents(lab, v)?;
        let snapshot_bytes = api(lab, |c| async move {
            c.watch(PHANTOM, 0, Duration::from_secs(60)).await
        })
        .map(|s| serde_json::to_vec(&s).map_or(0, |b| b.len() as u64))?;
        for &w in &watchers {
            p.say(format!("{n} endpoints, {w} simulated watchers + 4 agents"));
            let mut r = row(lab, args.changes, n, w, snapshot_bytes)?;
            r.store = store.name();
            rows.push(r);
        }
    }
    Ok(rows)
}

/// Adds endpoints `from..to` (as offsets from 10.241.0.0) on the phantom host.
fn grow(lab: &Lab, from: u32, to: u32) -> Result<(), BenchError> {
    let base = u32::from(Ipv4Addr::new(10, 241, 0, 0));
    let mut at = from;
    while at < to {
        let end = to.min(at + ferry_api::validate::MAX_ENDPOINTS_PER_REQUEST as u32);
        let specs: Vec<EndpointSpec> = (at..end)
            .map(|i| EndpointSpec {
                ip: Ipv4Addr::from(base + i),
                host: PHANTOM.into(),
                mac: None,
            })
            .collect();
        api(lab, move |c| async move { c.add_endpoints(&specs).await })?;
        at = end;
    }
    Ok(())
}

/// Waits until every real agent reported version `v` applied (before a row; the rows' own
/// changes are timed by [`drive`]).
fn wait_agents(lab: &Lab, v: u64) -> Result<(), BenchError> {
    let deadline = Instant::now() + CHANGE_DEADLINE;
    loop {
        let hosts = api(lab, |c| async move { c.hosts().await })?;
        let applied: Vec<String> = hosts
            .into_iter()
            .filter(|h| AGENTS.contains(&h.info.name.as_str()) && h.applied_version >= v)
            .map(|h| h.info.name)
            .collect();
        if applied.len() == AGENTS.len() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(BenchError::failed(format!(
                "agents did not apply version {v} within {} s (applied: {applied:?})",
                CHANGE_DEADLINE.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The simulated watchers of `WATCHER_HOSTS[i]`: `count` spread evenly over the four.
fn share(count: u32, i: usize) -> u32 {
    count / 4 + u32::from((i as u32) < count % 4)
}

/// Versions seen by the simulated watchers: version → receipt instants, each with whether
/// the watcher follows the second gateway.
type Seen = Arc<Mutex<HashMap<u64, Vec<(Instant, bool)>>>>;

/// The simulated watchers of one row: a thread per namespace, each entering it before its
/// runtime starts (no `setns` around an `.await`); dropped, they stop.
struct Watchers {
    stop: tokio::sync::watch::Sender<bool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Watchers {
    fn start(lab: &Lab, count: u32, seen: &Seen) -> Result<Self, BenchError> {
        let (stop, _) = tokio::sync::watch::channel(false);
        let cp = lab
            .control()
            .ok_or_else(|| BenchError::failed("no gateway"))?;
        let tls = cp.client_tls(Party::Operator)?;
        let follower = lab.extra_gateway(FOLLOWER).ok().map(|g| g.api);
        let mut threads = Vec::new();
        for (i, host) in WATCHER_HOSTS.iter().enumerate() {
            let mine = share(count, i);
            if mine == 0 {
                continue;
            }
            let via = follower.filter(|_| *host == FOLLOWER);
            let client = Client::with_token_file(via.unwrap_or(cp.api), &cp.token_file)
                .map_err(|e| BenchError::failed(format!("client: {e}")))?
                .with_tls(tls.clone());
            let netns = lab.netns(host);
            let (seen, mut stop_rx) = (seen.clone(), stop.subscribe());
            threads.push(std::thread::spawn(move || {
                // The thread stays in the namespace until it ends (the guard lives as long).
                let _in = match ferry_overlay::netns::NetNsGuard::enter(&netns) {
                    Ok(g) => g,
                    Err(e) => {
                        eprintln!("watchers in {}: {e}", netns.display());
                        return;
                    }
                };
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        eprintln!("watchers' runtime: {e}");
                        return;
                    }
                };
                rt.block_on(async move {
                    let mut tasks = tokio::task::JoinSet::new();
                    for _ in 0..mine {
                        tasks.spawn(watch(client.clone(), seen.clone(), via.is_some()));
                    }
                    let _ = stop_rx.wait_for(|s| *s).await;
                    tasks.abort_all();
                });
            }));
        }
        Ok(Self { stop, threads })
    }
}

impl Drop for Watchers {
    fn drop(&mut self) {
        self.stop.send_replace(true);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One simulated watcher: the agent's long poll, answered as deltas after the first snapshot.
async fn watch(client: Client, seen: Seen, follower: bool) {
    let mut after = 0;
    // Its own connection, kept open between polls, as an agent's.
    let mut watcher = client.watcher();
    loop {
        let answer = if after == 0 {
            watcher
                .watch(PHANTOM, 0, Duration::from_secs(90))
                .await
                .map(|s| s.version)
        } else {
            watcher
                .watch_update(PHANTOM, after, Duration::from_secs(90))
                .await
                .map(|u| u.version())
        };
        match answer {
            Ok(v) => {
                if v != after {
                    seen.lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .entry(v)
                        .or_default()
                        .push((Instant::now(), follower));
                }
                after = v;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

fn watch_bytes(lab: &Lab) -> Result<(u64, u64), BenchError> {
    let cp = lab
        .control()
        .ok_or_else(|| BenchError::failed("no gateway"))?;
    let tls = cp.client_tls(Party::Operator)?;
    let api_addr = cp.api;
    let resp = ferry_overlay::netns::run_in(&lab.netns(&cp.host), move || {
        ferry_api::transport::Request::get("/metrics")
            .tls(tls)
            .send_blocking(api_addr)
    })?
    .map_err(|e| BenchError::failed(format!("the gateway's metrics: {e}")))?;
    let text = String::from_utf8_lossy(&resp.body);
    let sum = |prefix: &str| -> u64 {
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    };
    Ok((
        sum("ferry_gateway_watch_bytes_total{"),
        sum("ferry_gateway_watch_answers_total{"),
    ))
}

fn row(
    lab: &Lab,
    changes: u32,
    endpoints: u32,
    simulated: u32,
    snapshot_bytes: u64,
) -> Result<Row, BenchError> {
    let seen: Seen = Arc::default();
    let watchers = Watchers::start(lab, simulated, &seen)?;
    // Every simulated watcher has its first snapshot before the first change.
    let deadline = Instant::now() + CHANGE_DEADLINE;
    let v0 = api(lab, |c| async move { c.version().await })?;
    loop {
        let n = seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&v0)
            .map_or(0, Vec::len);
        if n >= simulated as usize {
            break;
        }
        if Instant::now() > deadline {
            return Err(BenchError::failed(format!(
                "{n} of {simulated} watchers connected"
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let (bytes0, answers0) = watch_bytes(lab)?;
    // The changes and the polling run from one thread in the gateway's namespace, with one
    // client: each poll is one request, nothing to set up.
    let cp = lab
        .control()
        .ok_or_else(|| BenchError::failed("no gateway"))?;
    let operator = |api| -> Result<Client, BenchError> {
        Ok(Client::with_token_file(api, &cp.token_file)
            .map_err(|e| BenchError::failed(format!("client: {e}")))?
            .with_tls(cp.client_tls(Party::Operator)?))
    };
    let client = operator(cp.api)?;
    let follower = match lab.extra_gateway(FOLLOWER) {
        Ok(g) => Some(operator(g.api)?),
        Err(_) => None,
    };
    let seen2 = seen.clone();
    let Applied {
        all,
        agents,
        follower,
    } = ferry_overlay::netns::run_in(&lab.netns(&cp.host), move || {
        ferry_api::transport::block_on(drive(client, follower, changes, simulated, seen2))
    })?
    .map_err(|e| BenchError::io("the bench's runtime", e))??;
    let follower_watchers = if lab.extra_gateway(FOLLOWER).is_ok() {
        // The namespace's share of the watchers (see `Watchers::start`), and its agent.
        let i = WATCHER_HOSTS
            .iter()
            .position(|h| *h == FOLLOWER)
            .unwrap_or(0);
        share(simulated, i) + 1
    } else {
        0
    };
    drop(watchers);
    let (bytes1, answers1) = watch_bytes(lab)?;
    let round = |x: f64| (x * 100.0).round() / 100.0;
    Ok(Row {
        store: "file",
        endpoints,
        watchers: simulated + AGENTS.len() as u32,
        applied_ms_p50: round(percentile_of(&all, 50.0).unwrap_or(0.0)),
        applied_ms_p99: round(percentile_of(&all, 99.0).unwrap_or(0.0)),
        agents_applied_ms_p50: round(percentile_of(&agents, 50.0).unwrap_or(0.0)),
        agents_applied_ms_p99: round(percentile_of(&agents, 99.0).unwrap_or(0.0)),
        follower_watchers,
        follower_ms_p50: percentile_of(&follower, 50.0).map(round),
        follower_ms_p99: percentile_of(&follower, 99.0).map(round),
        bytes_per_answer: (bytes1 - bytes0) / (answers1 - answers0).max(1),
        snapshot_bytes,
    })
}

/// Milliseconds from a change's request to its receipt or application, over every change.
#[derive(Default)]
struct Applied {
    /// Every simulated watcher and real agent.
    all: Vec<f64>,
    /// The real agents.
    agents: Vec<f64>,
    /// Those that follow the second gateway.
    follower: Vec<f64>,
}

/// Makes `changes` changes through `c`; for each, the milliseconds from just before its
/// request until each simulated watcher received it and each agent reported it applied. An
/// agent's report is read from every gateway (`follower`: the second one, if the lab runs
/// it), so that an agent of the second gateway is timed when that gateway knows, not when its
/// report reached the first through etcd.
async fn drive(
    c: Client,
    follower: Option<Client>,
    changes: u32,
    simulated: u32,
    seen: Seen,
) -> Result<Applied, BenchError> {
    let api = |e: ferry_api::ApiError| BenchError::failed(format!("gateway API: {e}"));
    let mut out = Applied::default();
    for k in 0..changes {
        let t0 = Instant::now();
        if k % 2 == 0 {
            c.add_endpoints(&[EndpointSpec {
                ip: CHANGED,
                host: PHANTOM.into(),
                mac: None,
            }])
            .await
            .map_err(api)?;
        } else {
            c.remove_endpoint(CHANGED).await.map_err(api)?;
        }
        let v = c.version().await.map_err(api)?;
        let ms = |t: Instant| t.duration_since(t0).as_secs_f64() * 1e3;
        let mut applied: HashMap<String, Instant> = HashMap::new();
        loop {
            let mut hosts = c.hosts().await.map_err(api)?;
            if let Some(f) = &follower {
                hosts.extend(f.hosts().await.map_err(api)?);
            }
            let now = Instant::now();
            for h in hosts {
                if AGENTS.contains(&h.info.name.as_str()) && h.applied_version >= v {
                    applied.entry(h.info.name).or_insert(now);
                }
            }
            let got = seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get(&v)
                .cloned()
                .unwrap_or_default();
            if applied.len() == AGENTS.len() && got.len() >= simulated as usize {
                out.agents.extend(applied.values().map(|t| ms(*t)));
                out.all.extend(applied.values().map(|t| ms(*t)));
                out.all.extend(got.iter().map(|(t, _)| ms(*t)));
                if follower.is_some() {
                    out.follower.extend(applied.get(FOLLOWER).map(|t| ms(*t)));
                    out.follower
                        .extend(got.iter().filter(|(_, f)| *f).map(|(t, _)| ms(*t)));
                }
                break;
            }
            if now > t0 + CHANGE_DEADLINE {
                return Err(BenchError::failed(format!(
                    "version {v}: {} of 4 agents applied it, {} of {simulated} watchers got it",
                    applied.len(),
                    got.len()
                )));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    Ok(out)
}

fn table(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<6} {:>9} {:>9} {:>12} {:>12} {:>14} {:>14} {:>24} {:>10} {:>12}",
        "store",
        "endpoints",
        "watchers",
        "applied p50",
        "applied p99",
        "agents p50",
        "agents p99",
        "2nd gateway's p50/p99",
        "B/answer",
        "snapshot B"
    );
    for row in &r.rows {
        let follower = match (row.follower_ms_p50, row.follower_ms_p99) {
            (Some(a), Some(b)) => format!("{a:.1}/{b:.1}ms ({})", row.follower_watchers),
            _ => "-".into(),
        };
        let _ = writeln!(
            s,
            "{:<6} {:>9} {:>9} {:>10.1}ms {:>10.1}ms {:>12.1}ms {:>12.1}ms {:>24} {:>10} {:>12}",
            row.store,
            row.endpoints,
            row.watchers,
            row.applied_ms_p50,
            row.applied_ms_p99,
            row.agents_applied_ms_p50,
            row.agents_applied_ms_p99,
            follower,
            row.bytes_per_answer,
            row.snapshot_bytes
        );
    }
    let _ = writeln!(s, "{} changes per row", r.changes_per_row);
    if let Some(f) = &r.failover {
        let _ = writeln!(
            s,
            "gateway host failover (gw powered off, gw2 standing by, registry on etcd): gw2 \
             faces the internet after {:.0} ms (etcd leader lost with gw: {}); the public \
             address's longest wait {:.0} ms, {} resets; an agent of the dead gateway applied a \
             change through the other {:.0} ms after the power-off; a migration with it dead: \
             {} ({:.0} ms)",
            f.takeover_ms,
            if f.etcd_leader_lost { "yes" } else { "no" },
            f.public_ms,
            f.resets,
            f.agent_ms,
            if f.migration_ok { "ok" } else { "FAILED" },
            f.migration_ms
        );
    }
    s
}

/// Raises this process's open-file limit to its hard limit: a thousand watches are a thousand
/// sockets here and in the lab's gateway (which inherits the limit).
fn raise_nofile() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the limit into `lim`, a valid rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return;
    }
    lim.rlim_cur = lim.rlim_max;
    // SAFETY: setrlimit reads `lim`, a valid rlimit; raising the soft limit to the hard one
    // needs no privilege.
    let _ = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
}
