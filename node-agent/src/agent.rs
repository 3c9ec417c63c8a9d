//! The running agent: sets up the host's overlay device and datapath, serves metrics, and
//! tears its own state down on SIGTERM / SIGINT.

use std::sync::{Arc, Mutex};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use ferry_common::Config;
use ferry_overlay::{
    datapath::Datapath,
    netlink::{Netlink, VxlanSpec},
    sys,
};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{info, warn};

use crate::{config::AgentConfig, metrics, plan};

/// Underlay MTU minus the VXLAN overhead (outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14).
pub const OVERLAY_MTU: u32 = 1500 - 50;

#[derive(Clone)]
struct AppState {
    host: Arc<str>,
    datapath: Arc<Mutex<Datapath>>,
}

pub async fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    let nl = Netlink::open()?;
    let spec = VxlanSpec {
        name: cfg.vxlan_device.clone(),
        port: cfg.vxlan_port,
        mtu: OVERLAY_MTU,
        overlay_ip: cfg.overlay_ip,
        overlay_cidr: cfg.overlay_cidr,
    };
    let ifindex = nl.ensure_vxlan(&spec).await?;
    // The overlay is IPv4; IPv6 on the device would only emit ND/MLD noise into the datapath.
    sys::write_sysctl(
        &format!("net/ipv6/conf/{}/disable_ipv6", cfg.vxlan_device),
        "1",
    )?;
    info!(device = %cfg.vxlan_device, ifindex, port = cfg.vxlan_port, "vxlan device ready");

    let mut dp = Datapath::attach(
        &cfg.vxlan_device,
        Config {
            vni: cfg.vni,
            vxlan_ifindex: ifindex,
            tunnel_ttl: plan::TUNNEL_TTL,
            _pad: 0,
        },
        cfg.bpffs_dir.as_deref(),
    )?;
    let p = plan::plan(&cfg);
    for (ip, ep) in &p.endpoints {
        dp.set_endpoint(*ip, *ep)?;
    }
    for (ip, v) in &p.vteps {
        dp.allow_vtep(*ip, *v)?;
    }
    info!(
        endpoints = p.endpoints.len(),
        vteps = p.vteps.len(),
        "datapath attached"
    );

    let state = AppState {
        host: cfg.host.as_str().into(),
        datapath: Arc::new(Mutex::new(dp)),
    };
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/v1/health", get(|| async { "ok\n" }))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind(cfg.metrics_listen).await?;
    info!(listen = %cfg.metrics_listen, "serving metrics");

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            tokio::select! {
                _ = term.recv() => info!("SIGTERM"),
                _ = int.recv() => info!("SIGINT"),
            }
        })
        .await?;

    // Detach first (dropping the datapath closes the tcx links), then remove the device.
    drop(state);
    if let Err(e) = nl.delete_link(&cfg.vxlan_device).await {
        warn!(error = %e, "removing vxlan device");
    }
    info!("stopped");
    Ok(())
}

async fn metrics_handler(State(s): State<AppState>) -> impl IntoResponse {
    let dp = match s.datapath.lock() {
        Ok(dp) => dp,
        Err(p) => p.into_inner(),
    };
    match dp.counters() {
        Ok(c) => (
            StatusCode::OK,
            [("content-type", "text/plain; version=0.0.4")],
            metrics::render(&s.host, &c, dp.endpoint_count(), dp.vtep_count()),
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [("content-type", "text/plain")],
            format!("reading counters: {e}\n"),
        ),
    }
}
