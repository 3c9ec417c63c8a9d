//! The agents' peer API (`api_listen`, HTTP, the `[gateway]` bearer token): one server for the
//! routes of the socket hand-off (packages), the container runtime and CRIU. Other agents (and
//! the gateway's run driver) call it; an agent without `[gateway]` has no token and serves none.

use std::sync::Arc;

use anyhow::Context as _;
use tokio::{
    net::TcpListener,
    sync::{Mutex, watch},
    task::JoinHandle,
};
use tracing::{Instrument as _, info, warn};

use crate::{config::AgentConfig, criu, handoff::Handoff, node::Node, runtime::Runtime};

/// The `[gateway]` token, which also guards the peer API; `None` without `[gateway]`.
pub fn read_token(cfg: &AgentConfig) -> anyhow::Result<Option<String>> {
    cfg.gateway
        .as_ref()
        .map(|g| {
            ferry_api::client::read_token_file(&g.token_file)
                .with_context(|| format!("hand-off token {}", g.token_file.display()))
        })
        .transpose()
}

/// Binds `api_listen` when there is a token to guard it.
pub async fn bind(cfg: &AgentConfig, token: Option<&str>) -> anyhow::Result<Option<TcpListener>> {
    match token {
        Some(_) => {
            Ok(Some(TcpListener::bind(cfg.api_listen).await.with_context(
                || format!("binding api_listen {}", cfg.api_listen),
            )?))
        }
        None => Ok(None),
    }
}

/// The running peer API.
pub struct PeerApi {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    /// What its bounded server accepted and refused.
    pub connections: Arc<ferry_api::serve::Stats>,
}

impl PeerApi {
    /// Serves the hand-off's, the runtime's and CRIU's routes on `listener`.
    pub fn serve(
        listener: TcpListener,
        cfg: &AgentConfig,
        token: String,
        node: Arc<Mutex<Node>>,
        runtime: Runtime,
        handoff: &Handoff,
    ) -> Self {
        let mut app = handoff.routes().merge(crate::runtime::api::router(
            runtime.clone(),
            node.clone(),
            Some(token.clone()),
        ));
        // Whole-container migration with CRIU (checkpoint, images, restore).
        if let Some(g) = &cfg.gateway {
            let criu = Arc::new(criu::Ctx {
                host: cfg.host.clone(),
                node,
                runtime,
                token,
                token_file: g.token_file.clone(),
                gateway: g.address,
                criu: cfg.criu.clone(),
                restores: std::sync::Mutex::new(Default::default()),
            });
            app = app.merge(criu::router(criu));
        }
        let (stop, mut rx) = watch::channel(false);
        let stats = Arc::new(ferry_api::serve::Stats::default());
        let connections = stats.clone();
        let serving = async move {
            let served = ferry_api::serve::serve(
                listener,
                app,
                ferry_api::serve::Limits::default(),
                stats,
                async move {
                    let _ = rx.wait_for(|s| *s).await;
                },
                std::time::Duration::from_secs(5),
            )
            .await;
            if let Err(e) = served {
                warn!(error = %e, "the peer API stopped");
            }
        };
        let task = tokio::spawn(serving.in_current_span());
        info!(listen = %cfg.api_listen, "serving the peer API (hand-off packages, container processes)");
        Self {
            stop,
            task,
            connections,
        }
    }

    /// Stops serving (requests in progress are dropped).
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}
