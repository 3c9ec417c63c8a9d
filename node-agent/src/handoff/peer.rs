//! The agents' peer API, both ends: the routes a destination agent serves on `api_listen`
//! (`POST`/`DELETE /v1/handoff/{container}`), and the little HTTP client a source agent sends
//! packages with.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, Path, State},
    http::{HeaderMap, StatusCode, header::AUTHORIZATION},
    response::{IntoResponse, Response},
    routing::post,
};
use ferry_api::{ErrorBody, transport};
use serde_json::{Value, json};
use tracing::info;

use super::{Ctx, Package, store::StoreError};

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

/// An error answer: `{"error":{"code","message"}}` with a status.
struct Refusal(StatusCode, &'static str, String);

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorBody::new(self.1, self.2))).into_response()
    }
}

/// Compares in time that depends only on the lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u64;
    for i in 0..a.len().max(b.len()) {
        let (x, y) = (
            a.get(i).copied().unwrap_or(0),
            b.get(i).copied().unwrap_or(0),
        );
        diff |= u64::from(std::hint::black_box(x ^ y));
    }
    diff == 0
}

fn authorize(ctx: &Ctx, headers: &HeaderMap) -> Result<(), Refusal> {
    authorize_bearer(ctx.token.as_deref(), headers).map_err(|(s, c, m)| Refusal(s, c, m))
}

/// The peer API's bearer-token check (also used by the runtime's routes): the status, code
/// and message of the refusal.
pub(crate) fn authorize_bearer(
    token: Option<&str>,
    headers: &HeaderMap,
) -> Result<(), (StatusCode, &'static str, String)> {
    let unauthorized = |m: &str| (StatusCode::UNAUTHORIZED, "unauthorized", m.to_owned());
    let token = token.ok_or_else(|| unauthorized("this agent has no token"))?;
    let given = headers
        .get(AUTHORIZATION)
        .map(|v| v.as_bytes())
        .ok_or_else(|| unauthorized("missing Authorization header: want `Bearer <token>`"))?;
    let given = given
        .strip_prefix(b"Bearer ")
        .ok_or_else(|| unauthorized("the Authorization header is not `Bearer <token>`"))?;
    if constant_time_eq(given.trim_ascii(), token.as_bytes()) {
        Ok(())
    } else {
        Err(unauthorized("wrong bearer token"))
    }
}

fn bad_request(message: String) -> Refusal {
    Refusal(StatusCode::BAD_REQUEST, "bad_request", message)
}

fn container_ip(s: &str) -> Result<std::net::Ipv4Addr, Refusal> {
    s.parse().map_err(|_| {
        bad_request(format!(
            "{s:?} in the path is not an IPv4 container address"
        ))
    })
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
        .map_err(|e| bad_request(format!("the body is not a hand-off package: {e}")))?;
    if package.container != c {
        return Err(bad_request(format!(
            "the package is for {}, the path says {c}",
            package.container
        )));
    }
    for (i, s) in package.sockets.iter().enumerate() {
        s.validate()
            .map_err(|e| bad_request(format!("sockets[{i}]: {e}")))?;
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

/// One request to a peer agent; the answer, or why there is none.
async fn exchange(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: &str,
    body: Option<Vec<u8>>,
) -> Result<transport::Response, String> {
    let mut request = transport::Request::new(method, path)
        .token(token)
        .timeout(TRANSFER_TIMEOUT)
        .max_answer(MAX_ANSWER);
    if let Some(b) = body {
        request = request.json(b);
    }
    request.send(addr).await.map_err(|e| match e {
        transport::HttpError::Timeout { .. } => {
            format!("no answer within {} s", TRANSFER_TIMEOUT.as_secs())
        }
        e => e.to_string(),
    })
}

fn refused(r: &transport::Response) -> String {
    ferry_api::client::http_error(r.status, &r.body).to_string()
}

/// Sends a package to the destination agent; returns its answer once it stored it.
pub async fn send_package(addr: SocketAddr, token: &str, p: &Package) -> Result<Value, String> {
    let body = serde_json::to_vec(p).map_err(|e| format!("encoding the package: {e}"))?;
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
) -> Result<(), String> {
    let path = format!("/v1/handoff/{container}");
    let r = exchange(addr, "DELETE", &path, token, None).await?;
    if (200..300).contains(&r.status) || r.status == 404 {
        Ok(())
    } else {
        Err(refused(&r))
    }
}
