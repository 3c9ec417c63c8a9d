//! The runtime's routes on the agents' peer API (`api_listen`, the `[gateway]` bearer token):
//!
//! | method | path | body → answer |
//! |---|---|---|
//! | POST | /v1/containers/{ip}/start | `StartRequest` → `ContainerProcess` (201) |
//! | GET | /v1/containers/{ip} | → `ContainerProcess` |
//! | DELETE | /v1/containers/{ip}/process | → `ContainerProcess` (stopped: SIGTERM, SIGKILL after 2 s) |
//!
//! A start request names its runtime (`"runtime": "agent"`, the default, or `"runc"`, which
//! needs `"image"`: a root file system in the agent's images directory); see
//! [`super::driver`].
//!
//! Errors are `{"error":{"code","message"}}`: 404 `not_local` (the container's network
//! namespace is not built on this host), 409 `conflict` (it already has a running process),
//! 400 `bad_request` (an unknown runtime among them), 404 `no_process`, 404 `no_image` (runc:
//! the image is not on this host), 501 `runtime_unavailable` (runc not installed here), 500
//! `spawn_failed` (with the errno's or runc's text), 401 `unauthorized`.

use std::{sync::Arc, time::Duration};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{Path, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{delete, get, post},
};
use ferry_api::run::StartRequest;
use tokio::sync::Mutex;

use super::{Runtime, RuntimeError};
use crate::{
    auth::{Refusal, authorize, container_ip},
    node::Node,
};

/// How long `DELETE /v1/containers/{ip}/process` waits after SIGTERM before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(2);

#[derive(Clone)]
struct Api {
    runtime: Runtime,
    node: Arc<Mutex<Node>>,
    token: Option<Arc<str>>,
}

impl From<RuntimeError> for Refusal {
    fn from(e: RuntimeError) -> Self {
        let status =
            StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        Refusal(status, e.code(), e.to_string())
    }
}

pub fn router(runtime: Runtime, node: Arc<Mutex<Node>>, token: Option<String>) -> Router {
    let api = Api {
        runtime,
        node,
        token: token.map(Into::into),
    };
    Router::new()
        .route("/v1/containers/{ip}/start", post(start))
        .route("/v1/containers/{ip}", get(show))
        .route("/v1/containers/{ip}/process", delete(stop))
        .with_state(api)
}

fn check(api: &Api, headers: &HeaderMap) -> Result<(), Refusal> {
    authorize(api.token.as_deref(), headers)
}

/// `POST /v1/containers/{ip}/start`.
async fn start(
    State(api): State<Api>,
    Path(ip): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Refusal> {
    check(&api, &headers)?;
    let ip = container_ip(&ip)?;
    let req: StartRequest = serde_json::from_slice(&body).map_err(|e| {
        Refusal::bad_request(format!(
            "the body is not a start request ({{\"argv\":[...],\"env\":[[k,v],...],\
             \"runtime\":\"agent|runc\",\"image\":NAME}}): {e}"
        ))
    })?;
    let netns = {
        let node = api.node.lock().await;
        node.applied
            .containers
            .get(&ip)
            .map(|(_, built)| built.netns.clone())
    };
    let Some(netns) = netns else {
        return Err(RuntimeError::NotLocal {
            ip,
            host: api.runtime.host().to_owned(),
        }
        .into());
    };
    let p = api.runtime.start(ip, &netns, &req).await?;
    Ok((StatusCode::CREATED, Json(p)).into_response())
}

/// `GET /v1/containers/{ip}`.
async fn show(
    State(api): State<Api>,
    Path(ip): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Refusal> {
    check(&api, &headers)?;
    let ip = container_ip(&ip)?;
    match api.runtime.get(ip) {
        Some(p) => Ok(Json(p).into_response()),
        None => Err(RuntimeError::NoProcess {
            ip,
            host: api.runtime.host().to_owned(),
        }
        .into()),
    }
}

/// `DELETE /v1/containers/{ip}/process`.
async fn stop(
    State(api): State<Api>,
    Path(ip): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Refusal> {
    check(&api, &headers)?;
    let ip = container_ip(&ip)?;
    let p = api.runtime.stop(ip, STOP_GRACE).await?;
    Ok(Json(p).into_response())
}
