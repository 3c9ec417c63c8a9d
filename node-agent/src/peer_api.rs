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
        tls: Option<Arc<rustls::ServerConfig>>,
        node: Arc<Mutex<Node>>,
        runtime: Runtime,
        handoff: &Handoff,
    ) -> Self {
        let node_for_auth = node.clone();
        let mut app = handoff.routes().merge(crate::runtime::api::router(
            runtime.clone(),
            node.clone(),
            Some(token.clone()),
        ));
        // Whole-container migration with CRIU (checkpoint, images, restore).
        if let Some(g) = &cfg.gateway {
            // The drain before a dump, for a dump someone else runs (see `crate::drain`).
            app = app.merge(crate::drain::router(crate::drain::DrainApi {
                host: cfg.host.clone(),
                token: token.clone(),
                node: node.clone(),
                bound: if cfg.criu.drain_timeout_ms == 0 {
                    crate::config::CriuConfig::default().drain_timeout()
                } else {
                    cfg.criu.drain_timeout()
                },
            }));
            let criu = Arc::new(criu::Ctx {
                host: cfg.host.clone(),
                node,
                runtime,
                token,
                token_file: g.token_file.clone(),
                tls: cfg.tls.clone(),
                gateway: g.address,
                fallbacks: g.fallbacks.clone(),
                criu: cfg.criu.clone(),
                restores: std::sync::Mutex::new(Default::default()),
            });
            app = app.merge(criu::router(criu));
        }
        // Over TLS: who may call what (the bearer token is each route's own check).
        let app = app.route_layer(axum::middleware::from_fn_with_state(
            (cfg.host.clone(), node_for_auth),
            permit_caller,
        ));
        let (stop, mut rx) = watch::channel(false);
        let stats = Arc::new(ferry_api::serve::Stats::default());
        let connections = stats.clone();
        let serving = async move {
            let served = ferry_api::serve::serve(
                listener,
                app,
                ferry_api::serve::Limits::default(),
                tls,
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

/// The peer API's gate over TLS: the caller's identity against [`crate::auth::permit`] and this
/// host's registry snapshot (which migrations it takes part in). Plain HTTP (no identity): the
/// routes' token check only.
async fn permit_caller(
    axum::extract::State((me, node)): axum::extract::State<(String, Arc<Mutex<Node>>)>,
    params: axum::extract::RawPathParams,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    let Some(ferry_api::serve::Caller {
        addr,
        identity: Some(identity),
    }) = req.extensions().get::<ferry_api::serve::Caller>().cloned()
    else {
        return next.run(req).await;
    };
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(String::new, |p| p.as_str().to_owned());
    let ask = crate::auth::PeerAsk {
        method: req.method().as_str(),
        route: &route,
        param: params.iter().next().map(|(_, v)| v),
    };
    let verdict = {
        let node = node.lock().await;
        let migrations = node
            .registry
            .as_ref()
            .map_or(&[][..], |s| &s.migrations[..]);
        crate::auth::permit(&me, &identity, ask, migrations)
    };
    match verdict {
        Ok(()) => next.run(req).await,
        Err(why) => {
            warn!(caller = %identity, peer = %addr, method = %req.method(), %route, reason = %why, "forbidden peer request");
            crate::auth::Refusal::new(axum::http::StatusCode::FORBIDDEN, "forbidden", why)
                .into_response()
        }
    }
}
