//! Whole-container migration with CRIU: the agent drives the `criu` binary (dump at the
//! source, restore at the destination), moves the images between agents over the peer API,
//! and rolls back when anything fails.
//!
//! - [`cmd`]: CRIU's command lines and its statistics (pure; unit-tested).
//! - [`images`]: the image stream between agents (framing, streaming, byte counts).
//! - [`source`]: `POST /v1/checkpoint/{migration}` — dump, send, then kill or resume the source.
//! - [`dest`]: `POST /v1/images/{migration}` — receive, restore into the prepared namespace.
//! - [`resume`]: a source tree CRIU left stopped, running again (repair off, SIGCONT).
//!
//! Why the CLI and not CRIU's RPC (`criu swrk`): both start a `criu` process per dump and per
//! restore (swrk is a process too), so RPC would save only the argument parsing while adding
//! a protobuf schema to keep in step with CRIU; the CLI's stats (`--display-stats`) and log
//! file give everything the report needs. What costs time is CRIU's own start-up (its kernel
//! probes, ~20–35 ms before it seizes the tasks), which neither interface avoids; a resident
//! CRIU service that probed once would (see docs/migration.md).

pub mod cmd;
pub mod dest;
pub mod images;
pub mod resume;
pub mod source;

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::Arc,
};

use axum::{
    Json, Router,
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::post,
};
use ferry_api::ErrorBody;
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use crate::{node::Node, runtime::Runtime};

/// `[criu]` in the agent's config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CriuConfig {
    /// The `criu` binary (>= 4.2 on kernels >= 6.16). Default `/usr/local/sbin/criu`.
    #[serde(default = "default_binary")]
    pub binary: PathBuf,
    /// Where images are written (dump) and received (restore), one directory per migration,
    /// removed afterwards. Put it on tmpfs. Default `/run/ferry/criu`.
    #[serde(default = "default_work_dir")]
    pub work_dir: PathBuf,
    /// The `ferry` binary, which CRIU runs as its `--action-script`: network-lock → freeze
    /// (hold mode), post-resume → release. Default `/usr/local/bin/ferry`.
    #[serde(default = "default_action_script")]
    pub action_script: PathBuf,
    /// Keep the images and CRIU's logs of the last migration (for debugging).
    #[serde(default)]
    pub keep_images: bool,
}

impl Default for CriuConfig {
    fn default() -> Self {
        Self {
            binary: default_binary(),
            work_dir: default_work_dir(),
            action_script: default_action_script(),
            keep_images: false,
        }
    }
}

fn default_binary() -> PathBuf {
    PathBuf::from("/usr/local/sbin/criu")
}
fn default_work_dir() -> PathBuf {
    PathBuf::from("/run/ferry/criu")
}
fn default_action_script() -> PathBuf {
    PathBuf::from("/usr/local/bin/ferry")
}

/// What the checkpoint and restore handlers share.
pub struct Ctx {
    pub host: String,
    pub node: Arc<Mutex<Node>>,
    pub runtime: Runtime,
    pub token: String,
    pub token_file: PathBuf,
    pub gateway: SocketAddr,
    pub criu: CriuConfig,
    /// One CRIU operation per container at a time.
    pub busy: std::sync::Mutex<std::collections::HashSet<Ipv4Addr>>,
}

impl Ctx {
    /// Claims `ip` for one operation; released when the guard drops.
    pub fn claim(self: &Arc<Self>, ip: Ipv4Addr) -> Result<BusyGuard, Refusal> {
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        if !busy.insert(ip) {
            return Err(Refusal::new(
                StatusCode::CONFLICT,
                "conflict",
                format!(
                    "a CRIU operation on {ip} is already running on {}",
                    self.host
                ),
            ));
        }
        Ok(BusyGuard {
            ctx: self.clone(),
            ip,
        })
    }
}

pub struct BusyGuard {
    ctx: Arc<Ctx>,
    ip: Ipv4Addr,
}

impl Drop for BusyGuard {
    fn drop(&mut self) {
        self.ctx
            .busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.ip);
    }
}

/// An error answer: `{"error":{"code","message"}}` with a status.
#[derive(Debug)]
pub struct Refusal(pub StatusCode, pub &'static str, pub String);

impl Refusal {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self(status, code, message.into())
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorBody::new(self.1, self.2))).into_response()
    }
}

/// The peer API's bearer-token check (shared with the hand-off routes).
pub fn authorize(token: &str, headers: &HeaderMap) -> Result<(), Refusal> {
    crate::handoff::authorize_bearer(Some(token), headers).map_err(|(s, c, m)| Refusal(s, c, m))
}

/// The routes, merged into the agents' peer API.
pub fn router(ctx: Arc<Ctx>) -> Router {
    Router::new()
        .route("/v1/checkpoint/{migration}", post(source::checkpoint))
        .route("/v1/images/{migration}", post(dest::receive))
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(ctx)
}

/// Unix time in milliseconds (fractional).
pub fn now_unix_ms() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1e3)
        .unwrap_or(0.0)
}
