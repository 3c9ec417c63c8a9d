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
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use axum::{
    Json, Router,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
    routing::{get, post},
};
use ferry_api::{
    ApiError, Client, ErrorCode,
    run::{
        CheckpointAnswer, CheckpointRequest, PHASES, PhaseTiming, RunEvent, RunReport, RunRequest,
        RunState,
    },
    transport::{HttpError, Request},
};
use tracing::{error, info, warn};

use crate::server::{ApiFailure, ApiJson, Gateway, PathParam, lock};

/// Default port of every agent's peer API.
pub const DEFAULT_AGENT_API_PORT: u16 = 7401;
/// How long a checkpoint (dump, transfer, restore, release) may take.
const CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(600);
/// Reports kept (the newest).
const KEEP: usize = 200;

#[derive(Default)]
pub struct Runs {
    reports: Mutex<HashMap<String, RunReport>>,
    order: Mutex<Vec<String>>,
    /// The gateway's own API address and the agents' port, set at start.
    endpoint: OnceLock<(SocketAddr, u16)>,
}

impl Runs {
    pub fn configure(&self, listen: SocketAddr, agent_api_port: u16) {
        let _ = self.endpoint.set((listen, agent_api_port));
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut RunReport)) {
        if let Some(r) = lock(&self.reports).get_mut(id) {
            f(r);
        }
    }

    fn insert(&self, r: RunReport) {
        let id = r.id.clone();
        lock(&self.reports).insert(id.clone(), r);
        let mut order = lock(&self.order);
        order.push(id);
        if order.len() > KEEP {
            let old = order.remove(0);
            lock(&self.reports).remove(&old);
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
        Ok((Client::new(addr, Some(self.token().to_owned())), port))
    }
}

/// `POST /v1/runs`.
async fn start(
    State(g): State<Arc<Gateway>>,
    ApiJson(req): ApiJson<RunRequest>,
) -> Result<Response, ApiFailure> {
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
    let started = ferry_api::unix_ms_f64();
    let step = client
        .prepare_migration(req.container, &req.to, None)
        .await
        .map_err(relay)?;
    let m = step.migration;
    if lock(&g.runs.reports)
        .get(&m.id)
        .is_some_and(|r| r.state == RunState::Running)
    {
        return Err(ApiFailure::new(
            ErrorCode::Conflict,
            format!("migration {} is already being run", m.id),
        ));
    }
    if m.from != from || !step.changed {
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
        error: None,
    };
    g.runs.insert(report.clone());
    info!(migration = %m.id, container = %m.container, from = %m.from, to = %m.to, lock = req.lock.as_str(), "run started");
    let checkpoint = CheckpointRequest {
        container: m.container,
        to: m.to.clone(),
        to_api: SocketAddr::new(to_vtep.into(), agent_port),
        lock: req.lock,
        fail: req.fail,
    };
    let source = SocketAddr::new(from_vtep.into(), agent_port);
    tokio::spawn(drive(g.clone(), client, m.id.clone(), source, checkpoint));
    Ok((StatusCode::ACCEPTED, Json(report)).into_response())
}

/// The rest of a run, after prepare.
async fn drive(
    g: Arc<Gateway>,
    client: Client,
    id: String,
    source: SocketAddr,
    req: CheckpointRequest,
) {
    let answer = checkpoint(source, g.token(), &id, &req).await;
    let (state, error) = match answer {
        Ok(a) => {
            g.runs.update(&id, |r| {
                for p in &a.phases {
                    if r.phase(&p.name).is_none() {
                        r.phases.push(p.clone());
                    }
                }
                r.criu = a.criu.clone();
                r.image_bytes = a.image_bytes;
                if a.stopped_until_unix_ms > a.stopped_from_unix_ms && a.stopped_from_unix_ms > 0.0
                {
                    r.stopped_ms = a.stopped_until_unix_ms - a.stopped_from_unix_ms;
                }
            });
            if a.ok {
                (RunState::Released, None)
            } else if a.resumed {
                let why = a.error.unwrap_or_else(|| "failed".into());
                abort(&g, &client, &id, why).await
            } else {
                (
                    RunState::NeedsAttention,
                    Some(a.error.unwrap_or_else(|| "failed".into())),
                )
            }
        }
        Err(why) => abort(&g, &client, &id, why.to_string()).await,
    };
    let done = ferry_api::unix_ms_f64();
    g.runs.update(&id, |r| {
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
    match state {
        RunState::Released => info!(migration = %id, "run done"),
        _ => warn!(migration = %id, state = state.as_str(), error = ?error, "run failed"),
    }
}

/// Rolls a failed run back: the migration is aborted (a repeated abort is harmless).
async fn abort(
    g: &Arc<Gateway>,
    client: &Client,
    id: &str,
    why: String,
) -> (RunState, Option<String>) {
    warn!(migration = %id, error = %why, "run failed: aborting");
    g.runs.update(id, |r| {
        r.events
            .push(event("info", format!("failed: {why}; aborting")))
    });
    match client.abort_migration(id, None).await {
        Ok(_) => (RunState::RolledBack, Some(why)),
        Err(e) => {
            error!(migration = %id, error = %e, "abort failed");
            (
                RunState::NeedsAttention,
                Some(format!("{why}; then the abort failed: {e}")),
            )
        }
    }
}

/// `POST /v1/checkpoint/{id}` to the source agent.
async fn checkpoint(
    agent: SocketAddr,
    token: &str,
    id: &str,
    req: &CheckpointRequest,
) -> Result<CheckpointAnswer, CheckpointError> {
    let body = serde_json::to_vec(req).map_err(CheckpointError::Encode)?;
    let r = Request::post(format!("/v1/checkpoint/{id}"))
        .token(token)
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
    lock(&g.runs.reports)
        .get(&id)
        .cloned()
        .map(Json)
        .ok_or_else(|| {
            ApiFailure::new(
                ErrorCode::UnknownMigration,
                format!("no run has id {id:?} (runs are kept in memory, the last {KEEP})"),
            )
        })
}

/// `POST /v1/runs/{id}/events`: progress from agents and from CRIU's action script.
async fn add_event(
    State(g): State<Arc<Gateway>>,
    PathParam(id): PathParam,
    ApiJson(e): ApiJson<RunEvent>,
) -> Result<Json<serde_json::Value>, ApiFailure> {
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
    if let Some(p) = &e.phase {
        if !PHASES.contains(&p.name.as_str()) {
            return Err(ApiFailure::bad_request(format!(
                "unknown phase {:?}: one of {PHASES:?}",
                p.name
            )));
        }
        if r.phase(&p.name).is_none() {
            r.phases.push(p.clone());
        }
    }
    if r.events.len() < 10_000 {
        r.events.push(e);
    }
    Ok(Json(serde_json::json!({"ok": true})))
}
