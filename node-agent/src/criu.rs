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
    Router,
    http::{HeaderMap, StatusCode},
    routing::post,
};
use tokio::sync::Mutex;

pub use crate::{auth::Refusal, config::CriuConfig};
use crate::{node::Node, runtime::Runtime};

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

/// The peer API's bearer-token check.
pub fn authorize(token: &str, headers: &HeaderMap) -> Result<(), Refusal> {
    crate::auth::authorize(Some(token), headers)
}

/// The routes, merged into the agents' peer API.
pub fn router(ctx: Arc<Ctx>) -> Router {
    Router::new()
        .route("/v1/checkpoint/{migration}", post(source::checkpoint))
        .route("/v1/images/{migration}", post(dest::receive))
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(ctx)
}
