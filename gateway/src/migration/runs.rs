//! Whole-container migrations (`ferry migrate run`): the gateway runs the sequence so that it
//! goes on (and rolls back) even if the caller goes away.
//!
//! 1. prepare (the coordinator's own step: the destination builds the container's network
//!    side and holds);
//! 2. `POST /v1/checkpoint/{id}` to the source agent, which dumps with CRIU — in hold mode
//!    CRIU runs `ferry` as its action script, which calls freeze at network-lock — streams
//!    the images to the destination agent, which restores and calls release (criu-lock mode:
//!    freeze + release, the switch after the restore);
//! 3. on any failure, abort: the destination sends what it held back to the source, whose
//!    tree runs again (CRIU resumed it after a failed dump; the source agent resumed it after
//!    a failed transfer or restore).
//!
//! Steps are called through the gateway's own API (a client to itself), so a run is exactly
//! what an orchestrator calling the steps would do. Agents send progress to
//! `POST /v1/runs/{id}/events`; `GET /v1/runs/{id}` is polled by the CLI.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use ferry_api::{
    ApiError, Client, ErrorCode, MigrationPhase,
    run::{
        CheckpointAnswer, CheckpointRequest, MemoryMode, PHASES, PhaseTiming, RestoreStatus,
        RunEvent, RunReport, RunRequest, RunState,
    },
    transport::{HttpError, Request},
};
use tracing::{error, info, warn};

use crate::server::{
    ApiFailure, ApiJson, Gateway, PathParam, host_name_param, lock, migration_id_param,
};

/// Default port of every agent's peer API.
pub const DEFAULT_AGENT_API_PORT: u16 = 7401;
/// How long a checkpoint (dump, transfer, restore, release) may take.
const CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(600);
/// Reports kept (the newest).
const KEEP: usize = 200;

#[derive(Default)]
pub struct Runs {
    pub(crate) reports: Mutex<HashMap<String, RunReport>>,
    order: Mutex<Vec<String>>,
    /// The gateway's own API address and the agents' port, set at start.
    endpoint: OnceLock<(SocketAddr, u16)>,
    /// `<state_dir>/runs`: one `<id>.json` per report, rewritten (atomically) on every
    /// change, so a restarted gateway still answers `GET /v1/runs/{id}` and resumes the runs
    /// that were running. (What a run decides — released or aborted — is the registry's
    /// migration phase, persisted with the registry before anyone acts on it; the report
    /// only tells the story.)
    dir: OnceLock<PathBuf>,
    /// With the registry on etcd: reports go there instead ([`super::takeover`]).
    etcd: OnceLock<super::takeover::ReportWriter>,
    /// With the registry on etcd: the containers whose run this gateway claimed, and the
    /// lease each claim is on ([`super::takeover::claim`]).
    claims: Mutex<HashMap<std::net::Ipv4Addr, i64>>,
    /// Runs this gateway stopped driving because its lease may have lapsed (cut off from
    /// etcd's quorum): their reports here stop where it stopped; another gateway's, in etcd,
    /// go on.
    handed: Mutex<std::collections::HashSet<String>>,
}

impl Runs {
    /// Reports go to etcd (gateways sharing a registry).
    pub(crate) fn configure_etcd(&self, w: super::takeover::ReportWriter) {
        let _ = self.etcd.set(w);
    }

    /// Gives container `c`'s claim (on `lease`) up after the reports already queued
    /// (`false`: reports are not in etcd).
    pub(crate) fn release_after_reports(
        &self,
        c: std::net::Ipv4Addr,
        me: &str,
        lease: i64,
    ) -> bool {
        match self.etcd.get() {
            Some(w) => {
                w.release(c, me, lease);
                true
            }
            None => false,
        }
    }

    /// Container `c`'s run is this gateway's, claimed on `lease`.
    pub(crate) fn claimed(&self, c: std::net::Ipv4Addr, lease: i64) {
        lock(&self.claims).insert(c, lease);
    }

    /// Container `c`'s run is no longer this gateway's: the lease its claim was on.
    pub(crate) fn unclaimed(&self, c: std::net::Ipv4Addr) -> Option<i64> {
        lock(&self.claims).remove(&c)
    }

    /// Whether this gateway holds a claim on container `c`'s run.
    pub(crate) fn drives(&self, c: std::net::Ipv4Addr) -> bool {
        lock(&self.claims).contains_key(&c)
    }

    fn claim_lease(&self, c: std::net::Ipv4Addr) -> Option<i64> {
        lock(&self.claims).get(&c).copied()
    }

    /// Whether this gateway stopped driving run `id` (cut off from etcd's quorum).
    pub(crate) fn handed_over(&self, id: &str) -> bool {
        lock(&self.handed).contains(id)
    }

    /// This gateway's name among gateways sharing a registry: its API address.
    pub(crate) fn me(&self) -> String {
        self.endpoint
            .get()
            .map_or_else(String::new, |(a, _)| a.to_string())
    }

    pub fn configure(&self, listen: SocketAddr, agent_api_port: u16, dir: Option<PathBuf>) {
        let _ = self.endpoint.set((listen, agent_api_port));
        if let Some(d) = dir {
            let _ = self.dir.set(d);
        }
    }

    /// Loads the persisted reports; returns the ids of those still running.
    pub fn load(&self) -> Vec<String> {
        let Some(dir) = self.dir.get() else {
            return vec![];
        };
        if let Err(e) = ferry_api::private::create_dir(dir) {
            error!(dir = %dir.display(), error = %e, "creating the runs directory");
            return vec![];
        }
        let mut loaded: Vec<RunReport> = std::fs::read_dir(dir)
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .filter_map(|e| {
                let bytes = std::fs::read(e.path()).ok()?;
                match serde_json::from_slice::<RunReport>(&bytes) {
                    Ok(r) => Some(r),
                    Err(err) => {
                        warn!(file = %e.path().display(), error = %err, "ignoring an unreadable run report");
                        None
                    }
                }
            })
            .collect();
        loaded.sort_by_key(|r| ferry_api::migration_seq(&r.id).unwrap_or(0));
        let running = loaded
            .iter()
            .filter(|r| r.state == RunState::Running)
            .map(|r| r.id.clone())
            .collect();
        for r in loaded {
            self.insert(r);
        }
        running
    }

    fn save(&self, r: &RunReport) {
        if let Some(w) = self.etcd.get() {
            // Only the driver writes a run's story (the claim's lease fences the write).
            match self.claim_lease(r.container) {
                Some(lease) => w.save(r, lease),
                None => {
                    tracing::debug!(migration = %r.id, "run report kept here only: this gateway does not drive the run")
                }
            }
            return;
        }
        let Some(dir) = self.dir.get() else { return };
        let path = dir.join(format!("{}.json", r.id));
        let written = serde_json::to_vec(r)
            .map_err(std::io::Error::other)
            .and_then(|b| crate::store::write_atomic(&path, &b));
        if let Err(e) = written {
            error!(migration = %r.id, file = %path.display(), error = %e, "persisting the run report");
        }
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut RunReport)) {
        let copy = {
            let mut reports = lock(&self.reports);
            let Some(r) = reports.get_mut(id) else { return };
            f(r);
            r.clone()
        };
        self.save(&copy);
    }

    fn insert(&self, r: RunReport) {
        let id = r.id.clone();
        self.save(&r);
        lock(&self.reports).insert(id.clone(), r);
        let mut order = lock(&self.order);
        order.push(id);
        if order.len() > KEEP {
            let old = order.remove(0);
            lock(&self.reports).remove(&old);
            if let Some(dir) = self.dir.get() {
                let _ = std::fs::remove_file(dir.join(format!("{old}.json")));
            }
        }
    }
}

fn event(kind: &str, message: String) -> RunEvent {
    RunEvent {
        unix_ms: ferry_api::unix_ms_f64(),
        kind: kind.into(),
        message,
        phase: None,
        bytes: None,
        criu: None,
    }
}

/// An API error from the gateway's own client, answered as is.
fn relay(e: ApiError) -> ApiFailure {
    match e {
        ApiError::Http {
            status,
            code,
            message,
            ..
        } => {
            let code = code
                .and_then(|c| ErrorCode::ALL.into_iter().find(|k| k.as_str() == c))
                .unwrap_or(ErrorCode::Internal);
            ApiFailure::new(code, message)
                .with_status(StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY))
        }
        other => ApiFailure::new(ErrorCode::Internal, other.to_string()),
    }
}

pub(crate) fn routes() -> Router<Arc<Gateway>> {
    Router::new()
        .route("/v1/runs", post(start))
        .route("/v1/runs/{id}", get(one))
        .route("/v1/runs/{id}/events", post(add_event))
}

impl Gateway {
    fn self_client(&self) -> Result<(Client, u16), ApiFailure> {
        let (addr, port) = self.runs.endpoint.get().copied().ok_or_else(|| {
            ApiFailure::new(ErrorCode::Internal, "runs are not configured".to_string())
        })?;
        let client = Client::new(addr, Some(self.token().to_owned())).with_tls(self.client_tls());
        Ok((client, port))
    }
}

/// `POST /v1/runs`.
async fn start(
    State(g): State<Arc<Gateway>>,
    ApiJson(req): ApiJson<RunRequest>,
) -> Result<Response, ApiFailure> {
    host_name_param("to", &req.to)?;
    let (client, agent_port) = g.self_client()?;
    // Refuse what cannot run before preparing anything.
    let reg = g.current();
    let from = reg
        .endpoints()
        .find(|e| e.ip == req.container)
        .map(|e| e.host.clone())
        .ok_or_else(|| {
            ApiFailure::new(
                ErrorCode::UnknownEndpoint,
                format!("no endpoint has IP {}", req.container),
            )
        })?;
    let vtep = |name: &str| reg.host(name).map(|h| h.vtep);
    let (Some(from_vtep), Some(to_vtep)) = (vtep(&from), vtep(&req.to)) else {
        return Err(ApiFailure::new(
            ErrorCode::UnknownHost,
            format!("no host named {:?} is registered", req.to),
        ));
    };
    drop(reg);
    // One run of a container at a time. A lazy run goes on after its release until the last
    // page arrived: the memory is still split between two hosts, it cannot move again yet.
    if let Some(id) = lock(&g.runs.reports)
        .values()
        .find(|r| {
            r.container == req.container
                && r.state == RunState::Running
                && !g.runs.handed_over(&r.id)
        })
        .map(|r| r.id.clone())
    {
        return Err(ApiFailure::new(
            ErrorCode::Conflict,
            format!(
                "container {}'s run {id} is still going (a lazy run moves the memory after \
                 the release): wait for it to end",
                req.container
            ),
        ));
    }
    // Gateways sharing a registry: this one drives the container's run, or none.
    let me = g.runs.me();
    match super::takeover::claim(&g, req.container, &me).await? {
        super::takeover::Claimed::Theirs(who) => {
            return Err(ApiFailure::new(
                ErrorCode::Conflict,
                format!(
                    "container {}'s run is driven by gateway {who}: wait for it to end",
                    req.container
                ),
            ));
        }
        super::takeover::Claimed::Ours(_)
        | super::takeover::Claimed::OursAgain(_)
        | super::takeover::Claimed::NotShared => {}
    }
    let unclaim = |g: &Arc<Gateway>| super::takeover::release(g, req.container, &me);
    let started = ferry_api::unix_ms_f64();
    let step = match client.prepare_run_migration(req.container, &req.to).await {
        Ok(s) => s,
        Err(e) => {
            unclaim(&g);
            return Err(relay(e));
        }
    };
    let m = step.migration;
    if lock(&g.runs.reports)
        .get(&m.id)
        .is_some_and(|r| r.state == RunState::Running)
    {
        unclaim(&g);
        return Err(ApiFailure::new(
            ErrorCode::Conflict,
            format!("migration {} is already being run", m.id),
        ));
    }
    if m.from != from || !step.changed {
        unclaim(&g);
        return Err(ApiFailure::new(
            ErrorCode::Conflict,
            format!(
                "container {} already has migration {} ({}) to {}: finish or abort it first",
                m.container, m.id, m.phase, m.to
            ),
        ));
    }
    let prepare = PhaseTiming {
        name: "prepare".into(),
        start_unix_ms: started,
        ms: ferry_api::unix_ms_f64() - started,
        bytes: None,
    };
    let report = RunReport {
        id: m.id.clone(),
        container: m.container,
        from: m.from.clone(),
        to: m.to.clone(),
        lock: req.lock,
        memory: req.memory,
        state: RunState::Running,
        started_unix_ms: started,
        total_ms: 0.0,
        stopped_ms: 0.0,
        phases: vec![prepare.clone()],
        events: vec![event(
            "phase",
            format!(
                "prepare: {:.1} ms ({} holds for {})",
                prepare.ms, m.to, m.container
            ),
        )],
        criu: None,
        image_bytes: 0,
        image_bytes_during_dump: 0,
        error: None,
    };
    g.runs.insert(report.clone());
    info!(migration = %m.id, container = %m.container, from = %m.from, to = %m.to, lock = req.lock.as_str(), memory = req.memory.as_str(), "run started");
    let checkpoint = CheckpointRequest {
        container: m.container,
        to: m.to.clone(),
        to_api: SocketAddr::new(to_vtep.into(), agent_port),
        lock: req.lock,
        fail: req.fail,
        runtime: req.runtime,
        memory: req.memory,
    };
    let source = SocketAddr::new(from_vtep.into(), agent_port);
    tokio::spawn(drive(g.clone(), client, m.id.clone(), source, checkpoint));
    Ok((StatusCode::ACCEPTED, Json(report)).into_response())
}

/// How often a run's driver checks that it may still drive it.
const FENCE_POLL: Duration = Duration::from_millis(50);

/// Runs `rest` (what is left of run `id`, of container `c`) while this gateway may drive it.
/// With the registry on etcd, once the lease its claim is on may have lapsed (this gateway cut
/// off from etcd's quorum: [`crate::cluster::Quorum`]), `rest` is dropped where it is and the
/// run handed over, before etcd can let the lease go: the gateway that claims the container
/// next resumes the run from the registry. What `rest` had asked of the agents goes on
/// there, as after this gateway's death.
async fn while_driving(
    g: &Arc<Gateway>,
    id: &str,
    c: std::net::Ipv4Addr,
    rest: impl Future<Output = ()>,
) {
    if g.store.etcd().is_none() {
        rest.await;
        return;
    }
    let lapsed = async {
        while g.runs.claim_lease(c).is_some_and(|l| g.quorum.holds(l)) {
            tokio::time::sleep(FENCE_POLL).await;
        }
    };
    tokio::select! {
        biased;
        () = rest => {}
        () = lapsed => hand_over(g, id, c),
    }
}

/// This gateway stops driving run `id` (see [`while_driving`]): its claim is forgotten here
/// (the lease ends it in etcd), its report here says why and stops there.
fn hand_over(g: &Gateway, id: &str, c: std::net::Ipv4Addr) {
    let lease = g.runs.unclaimed(c).unwrap_or(0);
    lock(&g.runs.handed).insert(id.to_owned());
    g.metrics.count_store("handed_over");
    let quiet_ms = g.cut_off().map_or(0, |d| d.as_millis() as u64);
    warn!(
        migration = %id, container = %c, lease = %format!("{lease:x}"), quiet_ms,
        "this gateway may have lost its etcd lease (cut off from the quorum): it stops driving the run; the gateway that claims it next finishes it"
    );
    if let Some(r) = lock(&g.runs.reports).get_mut(id) {
        r.events.push(event(
            "info",
            format!(
                "gateway {} has not heard etcd's quorum for {quiet_ms} ms, so its lease may \
                 have lapsed: it stops driving the run; the gateway that claims it next \
                 finishes it (its report is in etcd)",
                g.runs.me()
            ),
        ));
    }
}

/// The rest of a run, after prepare, while this gateway may drive it ([`while_driving`]).
async fn drive(
    g: Arc<Gateway>,
    client: Client,
    id: String,
    source: SocketAddr,
    req: CheckpointRequest,
) {
    let c = req.container;
    let rest = drive_rest(g.clone(), client, id.clone(), source, req);
    while_driving(&g, &id, c, rest).await;
}

/// The rest of a run, after prepare: the checkpoint (raced against the source agent's death
/// and against a decision taken elsewhere), then [`resolve`].
async fn drive_rest(
    g: Arc<Gateway>,
    client: Client,
    id: String,
    source: SocketAddr,
    req: CheckpointRequest,
) {
    let from = g
        .current()
        .migration(&id)
        .map(|m| m.from.clone())
        .unwrap_or_default();
    let to = req.to.clone();
    let ck = checkpoint(&g, source, &id, &req);
    tokio::pin!(ck);
    let (answer, lost) = tokio::select! {
        a = &mut ck => (Some(a), None),
        why = decided_or_end_dead(&g, &id, &from, &to) => {
            warn!(migration = %id, why, "resolving the run without the source agent's answer");
            g.runs.update(&id, |r| r.events.push(event("info", format!("{why}: resolving the run from the registry"))));
            // Decided elsewhere (the destination's release): the answer, with its figures,
            // is normally a moment behind.
            if why == DECIDED && req.memory == MemoryMode::Lazy {
                // Released, but the pages still come from the source: the run ends when the
                // last one arrived (the source's answer), or when the source is lost.
                tokio::select! {
                    a = &mut ck => (Some(a), Some(why)),
                    () = end_dead(&g, &from) => (None, Some(PAGES_SOURCE_LOST)),
                }
            } else if why == DECIDED {
                (tokio::time::timeout(ANSWER_GRACE, &mut ck).await.ok(), Some(why))
            } else {
                (None, Some(why))
            }
        }
    };
    let why = match answer {
        Some(Ok(a)) => {
            g.runs.update(&id, |r| {
                for p in &a.phases {
                    if r.phase(&p.name).is_none() {
                        r.phases.push(p.clone());
                    }
                }
                r.criu = a.criu.clone();
                r.image_bytes = a.image_bytes;
                r.image_bytes_during_dump = a.image_bytes_during_dump;
                if a.stopped_until_unix_ms > a.stopped_from_unix_ms && a.stopped_from_unix_ms > 0.0
                {
                    r.stopped_ms = a.stopped_until_unix_ms - a.stopped_from_unix_ms;
                }
            });
            a.error
        }
        Some(Err(e)) => Some(e.to_string()),
        None => Some(lost.unwrap_or(DECIDED).to_owned()),
    };
    let to_api = req.to_api;
    let (state, error) = resolve(&g, &client, &id, to_api, why).await;
    finish(&g, &id, state, error);
}

/// A report for run `m` made from the registry alone (its own report was never written).
fn stub(m: &ferry_api::Migration, note: String) -> RunReport {
    RunReport {
        id: m.id.clone(),
        container: m.container,
        from: m.from.clone(),
        to: m.to.clone(),
        lock: ferry_api::run::LockMode::Hold,
        memory: Default::default(),
        state: RunState::Running,
        started_unix_ms: m.created_unix_ms as f64,
        total_ms: 0.0,
        stopped_ms: 0.0,
        phases: vec![],
        events: vec![event("info", note)],
        criu: None,
        image_bytes: 0,
        image_bytes_during_dump: 0,
        error: None,
    }
}

/// Active migrations the gateway runs (`Migration::run`) that have no report: one is made for
/// each (so `GET /v1/runs/{id}` answers), and their ids returned.
pub(crate) fn unreported(g: &Gateway) -> Vec<String> {
    let reg = g.current();
    let mut ids = Vec::new();
    for l in reg.live_migrations() {
        let m = &l.migration;
        if !m.run || !m.phase.is_active() || lock(&g.runs.reports).contains_key(&m.id) {
            continue;
        }
        g.runs.insert(stub(
            m,
            format!(
                "found {} in the registry without a report (the gateway stopped during its start)",
                m.phase
            ),
        ));
        ids.push(m.id.clone());
    }
    ids
}

/// Makes run `id` this gateway's (taken over from a gateway that is gone): its report as
/// etcd holds it (or a new one, as [`unreported`] makes), running.
pub(crate) fn adopt(g: &Gateway, id: &str, report: Option<RunReport>) {
    let taken = event(
        "info",
        format!("gateway {} takes the run over", g.runs.me()),
    );
    lock(&g.runs.handed).remove(id);
    match report {
        Some(mut r) => {
            r.state = RunState::Running;
            r.events.push(taken);
            lock(&g.runs.reports).remove(id);
            g.runs.insert(r);
        }
        None => {
            let reg = g.current();
            let Some(m) = reg.migration(id) else { return };
            let mut r = stub(
                m,
                format!("found {} in the registry without a report", m.phase),
            );
            r.events.push(taken);
            lock(&g.runs.reports).remove(id);
            g.runs.insert(r);
        }
    }
}

/// Resumes a run a restarted gateway found running (or one taken over from a gateway that is
/// gone, `why`): the checkpoint request died with the old gateway, so the run is resolved
/// from the registry (and the destination's word).
pub(crate) fn resume(g: &Arc<Gateway>, id: String, why: &'static str) {
    let Ok((client, agent_port)) = g.self_client() else {
        return;
    };
    let reg = g.current();
    let to_api = reg
        .migration(&id)
        .and_then(|m| reg.host(&m.to))
        .map(|h| SocketAddr::new(h.vtep.into(), agent_port));
    drop(reg);
    info!(migration = %id, why, "resuming a run");
    g.runs.update(&id, |r| {
        r.events.push(event(
            "info",
            format!("{why}: resuming the run from the registry"),
        ))
    });
    let container = lock(&g.runs.reports).get(&id).map(|r| r.container);
    let g = g.clone();
    tokio::spawn(async move {
        let rest = async {
            let (state, error) = match to_api {
                Some(to_api) => resolve(&g, &client, &id, to_api, Some(why.into())).await,
                None => (
                    RunState::NeedsAttention,
                    Some(format!(
                        "migration {id} or its destination host is no longer in the registry"
                    )),
                ),
            };
            finish(&g, &id, state, error);
        };
        match container {
            Some(c) => while_driving(&g, &id, c, rest).await,
            None => rest.await,
        }
    });
}

const DECIDED: &str = "the migration was decided";
const SOURCE_LOST: &str = "the source agent is not answering";
const DESTINATION_LOST: &str = "the destination agent is not answering";
/// A lazy-memory run whose source was lost after the release, before the last page.
const PAGES_SOURCE_LOST: &str = "the source agent is not answering, and the destination may lack pages of the container's memory";
/// How long the source's answer is still awaited once the migration was decided.
const ANSWER_GRACE: Duration = Duration::from_secs(2);

/// Returns when migration `id` is no longer active (decided by someone else) or when the
/// source or the destination agent is taken for dead.
/// Returns when `host` is dead (its agent not answering).
async fn end_dead(g: &Gateway, host: &str) {
    while !g.host_dead(host) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn decided_or_end_dead(g: &Gateway, id: &str, from: &str, to: &str) -> &'static str {
    loop {
        let active = g
            .current()
            .migration(id)
            .is_some_and(|m| m.phase.is_active());
        if !active {
            return DECIDED;
        }
        if g.host_dead(from) {
            return SOURCE_LOST;
        }
        if g.host_dead(to) {
            return DESTINATION_LOST;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How long a released run waits for its destination to confirm that its copy runs (and an
/// aborted one for its source), before it says needs_attention. The agents still converge
/// afterwards, whenever they come back.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(60);
/// A destination that receives images without progress for this long is given up on.
const STALL_TIMEOUT: Duration = Duration::from_secs(5);

/// Drives migration `id` to a decision and waits until the owner confirmed it (the
/// destination applied the release, or the source applied the abort):
/// - `prepared`: abort (the checkpoint is over, or never started);
/// - `frozen`: ask the destination how far its restore got (`GET /v1/restores/{id}`): while
///   it restores, or receives with progress, wait for its release; otherwise abort;
/// - `released`/`aborted`: wait for the owner's agent, then the run is over.
async fn resolve(
    g: &Arc<Gateway>,
    client: &Client,
    id: &str,
    to_api: SocketAddr,
    why: Option<String>,
) -> (RunState, Option<String>) {
    let mut progress: Option<(u64, Instant)> = None;
    let mut decided_at: Option<(Instant, u64)> = None;
    loop {
        let reg = g.current();
        let Some(m) = reg.migration(id).cloned() else {
            return (
                RunState::NeedsAttention,
                Some(format!("migration {id} is no longer in the registry")),
            );
        };
        let live = reg.live_migration(id).map(|l| l.phase_version);
        let version = reg.version();
        drop(reg);
        match m.phase {
            MigrationPhase::Released | MigrationPhase::Aborted => {
                let (at, target) =
                    *decided_at.get_or_insert((Instant::now(), live.unwrap_or(version)));
                let owner = if m.phase == MigrationPhase::Released {
                    &m.to
                } else {
                    &m.from
                };
                let confirmed = g.host_applied(owner) >= target;
                if confirmed {
                    return if m.phase == MigrationPhase::Released {
                        (RunState::Released, None)
                    } else {
                        (
                            RunState::RolledBack,
                            Some(why.clone().unwrap_or_else(|| "aborted".into())),
                        )
                    };
                }
                if at.elapsed() >= CONFIRM_TIMEOUT {
                    let (state, copy) = if m.phase == MigrationPhase::Released {
                        (
                            "released",
                            format!(
                                "its restored copy on {} stays stopped until that agent applies the release; {} keeps its stopped copy until then",
                                m.to, m.from
                            ),
                        )
                    } else {
                        (
                            "aborted",
                            format!(
                                "its stopped copy on {} resumes when that agent applies the abort",
                                m.from
                            ),
                        )
                    };
                    return (
                        RunState::NeedsAttention,
                        Some(format!(
                            "migration {id} is {state}, but the agent of {owner} has not applied it within {} s ({}): {copy}",
                            CONFIRM_TIMEOUT.as_secs(),
                            if g.host_dead(owner) {
                                "not answering"
                            } else {
                                "lagging"
                            },
                        )),
                    );
                }
            }
            MigrationPhase::Prepared => {
                abort_once(g, client, id, why.as_deref()).await;
            }
            MigrationPhase::Frozen => {
                let dest_dead = g.host_dead(&m.to);
                let status = if dest_dead {
                    None
                } else {
                    restore_status(g, to_api, id).await
                };
                let wait = match &status {
                    Some(s) if s.state == "restoring" || s.state == "restored" => true,
                    Some(s) if s.state == "receiving" => {
                        let now = Instant::now();
                        match progress {
                            Some((b, t)) if b == s.bytes => now.duration_since(t) < STALL_TIMEOUT,
                            _ => {
                                progress = Some((s.bytes, now));
                                true
                            }
                        }
                    }
                    _ => false,
                };
                if !wait {
                    let state = status.map_or_else(
                        || format!("{} is not answering", m.to),
                        |s| format!("its restore on {} is {}", m.to, s.state),
                    );
                    let reason = format!(
                        "{}; {state}",
                        why.as_deref().unwrap_or("the checkpoint ended")
                    );
                    abort_once(g, client, id, Some(&reason)).await;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// One abort request (the registry refuses it if the migration was released meanwhile).
async fn abort_once(g: &Arc<Gateway>, client: &Client, id: &str, why: Option<&str>) {
    let why = why.unwrap_or("failed");
    warn!(migration = %id, error = %why, "run failed: aborting");
    g.runs.update(id, |r| {
        r.events
            .push(event("info", format!("failed: {why}; aborting")))
    });
    if let Err(e) = client.abort_migration(id, None).await {
        warn!(migration = %id, error = %e, "abort not confirmed yet");
    }
}

/// `GET /v1/restores/{id}` on the destination agent (`None`: no answer within 1 s).
async fn restore_status(g: &Gateway, agent: SocketAddr, id: &str) -> Option<RestoreStatus> {
    let r = Request::get(format!("/v1/restores/{id}"))
        .token(g.token())
        .tls(g.client_tls())
        .timeout(Duration::from_secs(1))
        .send(agent)
        .await
        .ok()?;
    if !r.is_success() {
        return None;
    }
    serde_json::from_slice(&r.body).ok()
}

/// Writes the run's end into its report.
fn finish(g: &Arc<Gateway>, id: &str, state: RunState, error: Option<String>) {
    let done = ferry_api::unix_ms_f64();
    g.runs.update(id, |r| {
        r.phases.sort_by_key(|p| {
            PHASES
                .iter()
                .position(|n| *n == p.name)
                .unwrap_or(PHASES.len())
        });
        r.total_ms = done - r.started_unix_ms;
        r.state = state;
        let summary = match state {
            RunState::Released => format!(
                "released: {} runs on {} ({:.1} ms in all, stopped {:.1} ms)",
                r.container, r.to, r.total_ms, r.stopped_ms
            ),
            RunState::RolledBack => format!(
                "rolled_back: {} runs on {}: {}",
                r.container,
                r.from,
                error.clone().unwrap_or_default()
            ),
            _ => format!("{}: {}", state.as_str(), error.clone().unwrap_or_default()),
        };
        let kind = if state == RunState::Released {
            "done"
        } else {
            "failed"
        };
        r.events.push(event(kind, summary));
        r.error = error.clone();
    });
    // Gateways sharing a registry: the container's run is no longer ours to drive.
    let container = lock(&g.runs.reports).get(id).map(|r| r.container);
    if let Some(c) = container {
        super::takeover::release(g, c, &g.runs.me());
    }
    match state {
        RunState::Released => info!(migration = %id, "run done"),
        _ => warn!(migration = %id, state = state.as_str(), error = ?error, "run failed"),
    }
}

/// `POST /v1/checkpoint/{id}` to the source agent.
async fn checkpoint(
    g: &Gateway,
    agent: SocketAddr,
    id: &str,
    req: &CheckpointRequest,
) -> Result<CheckpointAnswer, CheckpointError> {
    let body = serde_json::to_vec(req).map_err(CheckpointError::Encode)?;
    let r = Request::post(format!("/v1/checkpoint/{id}"))
        .token(g.token())
        .tls(g.client_tls())
        .json(body)
        .timeout(CHECKPOINT_TIMEOUT)
        .max_answer(16 << 20)
        .send(agent)
        .await
        .map_err(|e| match e {
            HttpError::Connect { source, .. } => CheckpointError::Connect { agent, source },
            HttpError::Timeout { .. } => CheckpointError::Timeout,
            e => CheckpointError::Answer(e),
        })?;
    if !r.is_success() {
        return Err(CheckpointError::Refused(r.error()));
    }
    serde_json::from_slice(&r.body).map_err(CheckpointError::Decode)
}

/// Why the source agent's checkpoint gave no answer (the texts are the run report's).
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("encoding the checkpoint request: {0}")]
    Encode(#[source] serde_json::Error),
    #[error("connecting to the source agent {agent}: {source}")]
    Connect {
        agent: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("the source agent did not answer within {} s", CHECKPOINT_TIMEOUT.as_secs())]
    Timeout,
    #[error("reading the source agent's answer: {0}")]
    Answer(#[source] HttpError),
    #[error("the source agent refused the checkpoint: {0}")]
    Refused(ferry_api::ApiError),
    #[error("the source agent's answer: {0}")]
    Decode(#[source] serde_json::Error),
}

/// `GET /v1/runs/{id}`.
async fn one(
    State(g): State<Arc<Gateway>>,
    PathParam(id): PathParam,
) -> Result<Json<RunReport>, ApiFailure> {
    migration_id_param(&id)?;
    let local = lock(&g.runs.reports).get(&id).cloned();
    let handed = g.runs.handed_over(&id);
    let report = match local {
        Some(r) if !handed => Some(r),
        // Gateways sharing a registry: another may drive it (or took it over from this one,
        // whose report stops where it handed the run over).
        local => {
            if let Some(f) = g.refuse_if_cut_off(&format!(
                "run {id}'s report is in etcd (another gateway drives the run{})",
                if handed {
                    ", taken over from this one"
                } else {
                    ""
                }
            )) {
                return Err(f);
            }
            match super::takeover::read_report(&g, &id).await {
                Some(r) => {
                    if handed && r.state.finished() {
                        lock(&g.runs.reports).insert(id.clone(), r.clone());
                        lock(&g.runs.handed).remove(&id);
                    }
                    Some(r)
                }
                None => local,
            }
        }
    };
    report.map(Json).ok_or_else(|| {
        ApiFailure::new(
            ErrorCode::UnknownMigration,
            format!("no run has id {id:?} (the last {KEEP} runs are kept)"),
        )
    })
}

/// `POST /v1/runs/{id}/events`: progress from agents and from CRIU's action script.
async fn add_event(
    State(g): State<Arc<Gateway>>,
    PathParam(id): PathParam,
    ApiJson(e): ApiJson<RunEvent>,
) -> Result<Json<serde_json::Value>, ApiFailure> {
    migration_id_param(&id)?;
    ferry_api::validate::validate_run_event(&e)
        .map_err(|e| ApiFailure::bad_request(format!("run event: {e}")))?;
    // A run this gateway handed over is driven by another one, which writes its report: an
    // event kept here would be lost with this copy. Refused as unknown, so a client with
    // several gateways takes it on to the driver.
    if g.runs.handed_over(&id) {
        return Err(ApiFailure::new(
            ErrorCode::UnknownMigration,
            format!("run {id} was handed over to another gateway"),
        ));
    }
    let mut reports = lock(&g.runs.reports);
    let r = reports.get_mut(&id).ok_or_else(|| {
        ApiFailure::new(ErrorCode::UnknownMigration, format!("no run has id {id:?}"))
    })?;
    if r.state.finished() {
        return Err(ApiFailure::new(
            ErrorCode::BadPhase,
            format!("run {id} is {}: no more events", r.state.as_str()),
        ));
    }
    if let Some(p) = &e.phase
        && r.phase(&p.name).is_none()
    {
        r.phases.push(p.clone());
    }
    if r.events.len() < 10_000 {
        r.events.push(e);
    }
    Ok(Json(serde_json::json!({"ok": true})))
}
