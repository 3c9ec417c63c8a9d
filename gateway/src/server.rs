//! The gateway daemon's HTTP API. For now: health and metrics; the registry, public endpoints
//! and the migration coordinator build on this server.

use std::{net::SocketAddr, path::Path, time::Instant};

use axum::{Json, Router, routing::get};
use serde::{Deserialize, Serialize};
use tokio::signal::unix::{SignalKind, signal};
use tracing::info;

pub const API_VERSION: &str = "v1";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Health {
    pub status: String,
    pub api: String,
    pub version: String,
}

pub async fn serve(listen: SocketAddr, state_dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(state_dir)
        .map_err(|e| anyhow::anyhow!("creating state dir {}: {e}", state_dir.display()))?;
    let started = Instant::now();
    let app = Router::new()
        .route(
            "/v1/health",
            get(|| async {
                Json(Health {
                    status: "ok".into(),
                    api: API_VERSION.into(),
                    version: env!("CARGO_PKG_VERSION").into(),
                })
            }),
        )
        .route(
            "/metrics",
            get(move || async move {
                format!(
                    "# HELP ferry_gateway_uptime_seconds Seconds since the gateway started.\n\
                     # TYPE ferry_gateway_uptime_seconds gauge\n\
                     ferry_gateway_uptime_seconds {:.3}\n",
                    started.elapsed().as_secs_f64()
                )
            }),
        );
    let listener = tokio::net::TcpListener::bind(listen).await?;
    info!(%listen, state_dir = %state_dir.display(), "gateway listening");
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        })
        .await?;
    info!("gateway stopped");
    Ok(())
}

/// A minimal HTTP/1.0 GET for the CLI (no client stack needed for a local API).
pub async fn get_json<T: for<'de> Deserialize<'de>>(
    addr: SocketAddr,
    path: &str,
) -> anyhow::Result<T> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| anyhow::anyhow!("connecting to gateway {addr}: {e}"))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await?;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("malformed HTTP response from {addr}"))?;
    let status = head.split_whitespace().nth(1).unwrap_or("?");
    if status != "200" {
        anyhow::bail!("gateway {addr} answered {status}: {}", body.trim());
    }
    Ok(serde_json::from_str(body)?)
}
