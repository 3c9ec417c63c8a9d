//! Whole-container migration with CRIU: the agent drives the `criu` binary (dump at the
//! source, restore at the destination), moves the images between agents over the peer API,
//! and rolls back when anything fails.
//!
//! - [`cmd`]: CRIU's command lines and its statistics (pure; unit-tested).
//! - [`images`]: the image stream between agents (framing, streaming, byte counts).
//! - [`source`]: `POST /v1/checkpoint/{migration}` — dump, send, then kill or resume the source.
//! - [`dest`]: `POST /v1/images/{migration}` — receive, restore into the prepared namespace.
//! - [`resume`]: a source tree CRIU left stopped, running again (repair off, SIGCONT).
//! - [`lazy`]: post-copy memory (CRIU's lazy pages between the two agents).
//! - [`kdat`]: CRIU's kernel-feature cache on a tmpfs, so no restore probes the kernel.
//!
//! Neither side resumes or kills a stopped copy itself: each marks its tree fenced in the
//! runtime, and [`crate::fencing`] acts on the registry's decision (released or aborted).
//!
//! Why the CLI and not CRIU's RPC (`criu swrk`): both start a `criu` process per dump and per
//! restore (swrk is a process too), so RPC would save only the argument parsing while adding
//! a protobuf schema to keep in step with CRIU; the CLI's stats (`--display-stats`) and log
//! file give everything the report needs. CRIU's own start-up (its kernel probes, 50–70 ms
//! on a loaded machine) is avoided by neither interface; its cache on a tmpfs does
//! ([`kdat`], docs/migration.md).

pub mod cmd;
pub mod dest;
pub mod images;
pub mod kdat;
pub mod lazy;
pub mod resume;
pub mod source;
pub mod udpq;

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
use ferry_api::run::RestoreStatus;
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
    /// This host's TLS files, for CRIU's action script (`None`: plain HTTP).
    pub tls: Option<ferry_tls::TlsFiles>,
    pub gateway: SocketAddr,
    /// Other gateways serving the same registry (`[gateway] fallbacks`).
    pub fallbacks: Vec<SocketAddr>,
    pub criu: CriuConfig,
    /// Restores on this host, by migration: how far each got (`GET /v1/restores/{id}`).
    pub restores: std::sync::Mutex<std::collections::BTreeMap<String, RestoreStatus>>,
}

impl Ctx {
    /// Claims `ip` for one CRIU operation (the runtime's claim); released when the guard
    /// drops.
    pub fn claim(&self, ip: Ipv4Addr) -> Result<crate::runtime::Claim, Refusal> {
        self.runtime.claim(ip).ok_or_else(|| {
            Refusal::new(
                StatusCode::CONFLICT,
                "conflict",
                format!(
                    "a CRIU operation on {ip} is already running on {}",
                    self.host
                ),
            )
        })
    }

    /// The phase of migration `id` in this host's snapshot (`None`: not there — aborted, or
    /// its grace over).
    pub async fn phase_here(&self, id: &str) -> Option<ferry_api::MigrationPhase> {
        let node = self.node.lock().await;
        node.registry
            .as_ref()
            .and_then(|s| s.migrations.iter().find(|m| m.id == id))
            .map(|m| m.phase)
    }

    /// Records how far the restore of `migration` got (kept for the last 100).
    pub fn restore_status(&self, migration: &str, f: impl FnOnce(&mut RestoreStatus)) {
        let mut r = self.restores.lock().unwrap_or_else(|p| p.into_inner());
        let s = r
            .entry(migration.to_owned())
            .or_insert_with(|| RestoreStatus {
                migration: migration.to_owned(),
                state: "none".into(),
                bytes: 0,
                error: None,
            });
        f(s);
        while r.len() > 100 {
            // Ids are m<n>: drop the oldest by number.
            let oldest = r
                .keys()
                .min_by_key(|k| ferry_api::migration_seq(k).unwrap_or(0))
                .cloned();
            match oldest {
                Some(k) => r.remove(&k),
                None => break,
            };
        }
    }
}

/// The `{migration}` of a path: an id as the gateway makes them (`m<n>`), checked before it
/// names anything — a work directory (`<work_dir>/<id>-dump`), a restore's status, a log field.
pub fn migration_param(id: &str) -> Result<(), Refusal> {
    ferry_api::validate::validate_migration_id(id)
        .map(drop)
        .map_err(|e| Refusal::bad_request(format!("path: {e}")))
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
        .route("/v1/restores/{migration}", axum::routing::get(dest::status))
        .layer(axum::extract::DefaultBodyLimit::disable())
        .with_state(ctx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migration_ids_in_paths_are_checked_before_use() {
        migration_param("m12").unwrap();
        // What axum hands a handler for `/v1/checkpoint/..%2F..%2Fetc`, and friends.
        for bad in ["../../etc", "..", "m1/../../x", "", "m0", "m1-dump"] {
            let e = migration_param(bad).unwrap_err();
            assert_eq!(
                (e.0, e.1),
                (StatusCode::BAD_REQUEST, "bad_request"),
                "{bad:?}"
            );
            assert!(
                e.2.contains(&format!("{bad:?} is not m<number>")),
                "{bad:?}: {}",
                e.2
            );
        }
    }
}
