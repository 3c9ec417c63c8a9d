//! The agents' peer API, both ends: the routes a destination agent serves on `api_listen`
//! (`POST`/`DELETE /v1/handoff/{container}`), and the little HTTP client a source agent sends
//! packages with.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, Path, State},
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::post,
};
use ferry_api::transport;
use serde_json::{Value, json};
use tracing::info;

use super::{Ctx, Package, store::StoreError};
use crate::auth::{self, Refusal, container_ip};

/// How long a transfer (connect, body, the destination's answer) may take.
pub const TRANSFER_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest answer read from a peer.
const MAX_ANSWER: usize = 1024 * 1024;

pub fn router(ctx: Arc<Ctx>) -> Router {
    let limit = usize::try_from(ctx.store.max_bytes()).unwrap_or(usize::MAX);
    Router::new()
        .route("/v1/handoff/{container}", post(receive).delete(withdrawn))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(ctx)
}

fn authorize(ctx: &Ctx, headers: &HeaderMap) -> Result<(), Refusal> {
    auth::authorize(ctx.token.as_deref(), headers)
}

/// `POST /v1/handoff/{container}`: stores a package for a claim.
async fn receive(
    State(ctx): State<Arc<Ctx>>,
    Path(container): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Response, Refusal> {
    authorize(&ctx, &headers)?;
    let c = container_ip(&container)?;
    let package: Package = serde_json::from_slice(&body)
        .map_err(|e| Refusal::bad_request(format!("the body is not a hand-off package: {e}")))?;
    if package.container != c {
        return Err(Refusal::bad_request(format!(
            "the package is for {}, the path says {c}",
            package.container
        )));
    }
    ferry_api::validate::validate_host_name(&package.from)
        .map_err(|e| Refusal::bad_request(format!("from: {e}")))?;
    for (i, s) in package.sockets.iter().enumerate() {
        s.validate()
            .map_err(|e| Refusal::bad_request(format!("sockets[{i}]: {e}")))?;
    }
    ctx.local_netns(c)
        .await
        .map_err(|e| Refusal(StatusCode::NOT_FOUND, e.code, e.message))?;
    let (n, state, bytes, from) = (
        package.sockets.len(),
        package.state.len(),
        body.len() as u64,
        package.from.clone(),
    );
    ctx.store.put(package, bytes).map_err(|e| match e {
        StoreError::Full { .. } => {
            Refusal(StatusCode::INSUFFICIENT_STORAGE, "too_large", e.to_string())
        }
        _ => Refusal(StatusCode::CONFLICT, "conflict", e.to_string()),
    })?;
    info!(%c, %from, sockets = n, state_bytes = state, bytes, "hand-off package stored");
    let answer = json!({"stored": true, "container": c.to_string(), "sockets": n,
        "state_bytes": state, "bytes": bytes});
    Ok((StatusCode::CREATED, Json(answer)).into_response())
}

/// `DELETE /v1/handoff/{container}`: drops an unclaimed package.
async fn withdrawn(
    State(ctx): State<Arc<Ctx>>,
    Path(container): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Refusal> {
    authorize(&ctx, &headers)?;
    let c = container_ip(&container)?;
    if !ctx.store.withdraw(c) {
        return Err(Refusal(
            StatusCode::NOT_FOUND,
            "no_package",
            format!("no unclaimed package for {c}"),
        ));
    }
    info!(%c, "hand-off package withdrawn by its source");
    Ok(Json(json!({"withdrawn": true, "container": c.to_string()})).into_response())
}

/// Why a request to a peer agent got no acceptable answer.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("encoding the package: {0}")]
    Encode(#[source] serde_json::Error),
    #[error("{0}")]
    Http(#[source] transport::HttpError),
    #[error("no answer within {} s", .0.as_secs())]
    Timeout(Duration),
    /// The peer answered with an error status.
    #[error(transparent)]
    Refused(#[from] ferry_api::ApiError),
}

/// One request to a peer agent; the answer, or why there is none.
async fn exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: &str,
    body: Option<Vec<u8>>,
) -> Result<transport::Response, PeerError> {
    let mut request = transport::Request::new(method, path)
        .token(token)
        .timeout(TRANSFER_TIMEOUT)
        .max_answer(MAX_ANSWER);
    if let Some(b) = body {
        request = request.json(b);
    }
    request.send(addr).await.map_err(|e| match e {
        transport::HttpError::Timeout { .. } => PeerError::Timeout(TRANSFER_TIMEOUT),
        e => PeerError::Http(e),
    })
}

fn refused(r: &transport::Response) -> PeerError {
    ferry_api::client::http_error(r.status, &r.body).into()
}

/// Sends a package to the destination agent; returns its answer once it stored it.
pub async fn send_package(addr: SocketAddr, token: &str, p: &Package) -> Result<Value, PeerError> {
    let body = serde_json::to_vec(p).map_err(PeerError::Encode)?;
    let path = format!("/v1/handoff/{}", p.container);
    let r = exchange(addr, "POST", &path, token, Some(body)).await?;
    if (200..300).contains(&r.status) {
        Ok(serde_json::from_slice(&r.body).unwrap_or(Value::Null))
    } else {
        Err(refused(&r))
    }
}

/// Asks the destination to drop an unclaimed package (best effort, after a failed transfer).
pub async fn withdraw(
    addr: SocketAddr,
    token: &str,
    container: std::net::Ipv4Addr,
) -> Result<(), PeerError> {
    let path = format!("/v1/handoff/{container}");
    let r = exchange(addr, "DELETE", &path, token, None).await?;
    if (200..300).contains(&r.status) || r.status == 404 {
        Ok(())
    } else {
        Err(refused(&r))
    }
}
