//! The running agent: sets up the host's overlay device and datapath, follows the registry
//! (containers, peers, public addresses), serves metrics and status, and tears its own state
//! down on SIGTERM / SIGINT.

use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use axum::{Json, Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use ferry_api::{Client, HostRole};
use ferry_common::{Config, config_flags, ipv4_be};
use ferry_overlay::{
    datapath::Datapath,
    netlink::{Netlink, VxlanSpec},
    nft, sys,
    tap::{HOLD_MTU, Tap},
};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{Instrument as _, info, warn};

use crate::{
    config::AgentConfig,
    containers::HostNetwork,
    fencing::Fencing,
    handoff::Handoff,
    hold::HoldQueues,
    metrics,
    node::{Announcements, Applied, Hold, Node},
    peer_api::{self, PeerApi},
    plan,
    runtime::Runtime,
    sync,
};

/// Underlay MTU minus the VXLAN overhead (outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14).
pub const OVERLAY_MTU: u32 = 1500 - 50;

#[derive(Clone)]
struct AppState {
    host: Arc<str>,
    datapath: Arc<Mutex<Datapath>>,
    node: Arc<tokio::sync::Mutex<Node>>,
    runtime: Runtime,
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

    let mut base = Config {
        vni: cfg.vni,
        vxlan_ifindex: ifindex,
        tunnel_ttl: plan::TUNNEL_TTL,
        overlay_net_be: ipv4_be(cfg.overlay_cidr.network().octets()),
        overlay_mask_be: ipv4_be(cfg.overlay_cidr.netmask().octets()),
        ..Config::default()
    };
    if cfg.role == HostRole::Gateway {
        let public = cfg
            .public_interface
            .as_deref()
            .context("a gateway needs public_interface")?;
        let idx = nl
            .link_index(public)
            .await?
            .with_context(|| format!("public_interface {public} does not exist"))?;
        let mac = nl.link_mac(idx).await?.unwrap_or_default();
        base.flags |= config_flags::GATEWAY;
        base.public_ifindex = idx;
        base.public_mac = mac
            .get(..6)
            .and_then(|m| <[u8; 6]>::try_from(m).ok())
            .with_context(|| format!("public_interface {public} has no Ethernet address"))?;
        // VXLAN arriving from the internet is dropped before the stack sees it.
        base.vxlan_port_be = cfg.vxlan_port.to_be();
        // Containers' traffic to the internet leaves through the stack (translated by the
        // datapath, or masqueraded): forwarding on, and no strict reverse-path filter on the
        // VXLAN device (translated packets arrive there with a public source address).
        sys::write_sysctl("net/ipv4/ip_forward", "1")?;
        sys::write_sysctl(
            &format!("net/ipv4/conf/{}/rp_filter", cfg.vxlan_device),
            "0",
        )?;
        if sys::read_sysctl("net/ipv4/conf/all/rp_filter").is_ok_and(|v| v == "1") {
            warn!(
                "net.ipv4.conf.all.rp_filter is strict (1): setting it to loose (2) so translated packets pass"
            );
            sys::write_sysctl("net/ipv4/conf/all/rp_filter", "2")?;
        }
        if cfg.masquerade {
            nft::ensure_masquerade(cfg.overlay_cidr, public)?;
        }
    }

    // The hold device: packets for HOLD endpoints wait behind it, in this agent.
    let tap = Tap::open(&cfg.hold_device)
        .with_context(|| format!("creating the hold device {}", cfg.hold_device))?;
    base.hold_ifindex = nl.configure_hold_device(&cfg.hold_device, HOLD_MTU).await?;
    sys::write_sysctl(
        &format!("net/ipv6/conf/{}/disable_ipv6", cfg.hold_device),
        "1",
    )?;
    let hold = Arc::new(Hold {
        tap,
        queues: Mutex::new(HoldQueues::new(cfg.hold)),
    });

    let mut dp = Datapath::attach(&cfg.vxlan_device, base, cfg.bpffs_dir.as_deref())?;
    dp.attach_hold(&cfg.hold_device)?;
    if let Some(public) = cfg.public_interface.as_deref() {
        dp.attach_public(public)?;
        info!(interface = public, "from-public attached");
    }
    let datapath = Arc::new(Mutex::new(dp));
    let mut node = Node {
        host: cfg.host.clone(),
        datapath: datapath.clone(),
        net: HostNetwork {
            nl,
            netns_prefix: cfg.container_netns_prefix.clone(),
            mtu: OVERLAY_MTU,
            host_overlay_ip: cfg.overlay_ip,
        },
        base_config: base,
        applied: Applied::default(),
        hold: Some(hold.clone()),
        hold_ifindex: base.hold_ifindex,
        announcer: Announcements {
            schedule: cfg.announce.clone(),
        },
        registry: None,
    };
    let hold_reader = tokio::spawn(read_hold_device(hold.clone()));
    let errors = node.apply(&plan::desired(&cfg, None)).await;
    if !errors.is_empty() {
        anyhow::bail!("programming the datapath: {}", errors.join("; "));
    }
    info!(
        endpoints = node.applied.endpoints.len(),
        vteps = node.applied.vteps.len(),
        "datapath attached"
    );
    let node = Arc::new(tokio::sync::Mutex::new(node));

    // The container runtime: the agent becomes a child subreaper (CRIU-restored trees are
    // reparented to it) and reaps the processes it starts or adopts.
    let runtime = Runtime::new(&cfg.host)?;
    let (handoff, peer_api) = match start_handoff(&cfg, &node, &runtime).await {
        Ok(h) => h,
        Err(e) => {
            runtime.shutdown().await;
            return Err(e);
        }
    };
    let fencing = Arc::new(Fencing {
        host: cfg.host.clone(),
        node: node.clone(),
        runtime: runtime.clone(),
        peer_port: cfg.api_listen.port(),
        token: peer_api::read_token(&cfg).ok().flatten(),
    });
    let mut background = vec![tokio::spawn(fencing.clone().run().in_current_span())];
    let follower = match &cfg.gateway {
        Some(g) => {
            let client = Client::with_token_file(g.address, &g.token_file)
                .with_context(|| format!("gateway token {}", g.token_file.display()))?;
            let span = tracing::info_span!("sync", gateway = %g.address);
            background.push(tokio::spawn(
                sync::heartbeat(cfg.host.clone(), client.clone()).instrument(span.clone()),
            ));
            Some(tokio::spawn(
                sync::follow(cfg.clone(), client, node.clone(), Some(fencing.clone()))
                    .instrument(span),
            ))
        }
        None => None,
    };
    let orphans = tokio::spawn(stop_orphans(node.clone(), runtime.clone()).in_current_span());

    let state = AppState {
        host: cfg.host.as_str().into(),
        datapath,
        node: node.clone(),
        runtime: runtime.clone(),
    };
    let app = Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/v1/health", get(|| async { "ok\n" }))
        .route("/v1/status", get(status_handler))
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind(cfg.metrics_listen).await?;
    info!(listen = %cfg.metrics_listen, "serving metrics and status");

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

    if let Some(f) = follower {
        f.abort();
        let _ = f.await;
    }
    for t in background {
        t.abort();
        let _ = t.await;
    }
    drop(fencing);
    if let Some(p) = peer_api {
        p.shutdown().await;
    }
    handoff.shutdown().await;
    // Container processes die before their namespaces go.
    runtime.shutdown().await;
    orphans.abort();
    let _ = orphans.await;
    hold_reader.abort();
    let _ = hold_reader.await;
    drop(state);
    let node = Arc::try_unwrap(node)
        .map_err(|_| anyhow::anyhow!("the node is still shared at shutdown"))?
        .into_inner();
    let mut node = node;
    node.remove_containers().await;
    // Detach (dropping the datapath closes the tcx links), then remove the device.
    let Node {
        net,
        datapath,
        hold,
        ..
    } = node;
    drop(datapath);
    drop(hold); // closing the TAP's fd removes the device
    if let Err(e) = net.nl.delete_link(&cfg.vxlan_device).await {
        warn!(error = %e, "removing vxlan device");
    }
    if cfg.role == HostRole::Gateway
        && cfg.masquerade
        && let Err(e) = nft::remove()
    {
        warn!(error = %e, "removing the masquerade table");
    }
    info!("stopped");
    Ok(())
}

/// The hand-off's Unix socket and (with a `[gateway]` token) the peer API.
async fn start_handoff(
    cfg: &AgentConfig,
    node: &Arc<tokio::sync::Mutex<Node>>,
    runtime: &Runtime,
) -> anyhow::Result<(Handoff, Option<PeerApi>)> {
    let token = peer_api::read_token(cfg)?;
    let listener = peer_api::bind(cfg, token.as_deref()).await?;
    let handoff = Handoff::start(cfg, node.clone(), token.clone())?;
    let peer_api = match (listener, token) {
        (Some(l), Some(token)) => Some(PeerApi::serve(
            l,
            cfg,
            token,
            node.clone(),
            runtime.clone(),
            &handoff,
        )),
        _ => {
            warn!(
                "no [gateway] section: no peer API, so hand-off exports cannot be sent and no \
                 package can be received, and container processes cannot be started remotely"
            );
            None
        }
    };
    Ok((handoff, peer_api))
}

/// Reads the hold device for as long as the agent runs: frames for held endpoints are queued,
/// stragglers for released ones are written straight back.
async fn read_hold_device(hold: Arc<Hold>) {
    use tokio::io::{Interest, unix::AsyncFd};
    /// Owns a reference to the device, so its fd stays open while registered.
    struct HoldFd(Arc<Hold>);
    impl std::os::fd::AsRawFd for HoldFd {
        fn as_raw_fd(&self) -> std::os::fd::RawFd {
            self.0.tap.as_raw_fd()
        }
    }
    // SAFETY: the fd belongs to the TAP inside `Hold`, which `HoldFd` keeps alive (an Arc) for
    // as long as the AsyncFd exists; `as_raw_fd` always returns that same fd.
    let registered =
        unsafe { AsyncFd::register_with_interest(HoldFd(hold.clone()), Interest::READABLE) };
    let fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            warn!(error = %e, "watching the hold device; held packets cannot be read");
            return;
        }
    };
    let mut buf = vec![0u8; 65_536];
    loop {
        let mut ready = match fd.readable().await {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "hold device");
                return;
            }
        };
        loop {
            match hold.tap.read_frame(&mut buf) {
                Ok(n) => {
                    let (verdict, back) = hold
                        .queues
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(buf[..n].to_vec());
                    if let Some(frame) = back
                        && let Err(e) = hold.tap.write_frame(&frame)
                    {
                        warn!(error = %e, ?verdict, "passing a straggler on");
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    ready.clear_ready();
                    break;
                }
                Err(e) => {
                    warn!(error = %e, "reading the hold device");
                    ready.clear_ready();
                    break;
                }
            }
        }
    }
}

/// A container the registry took off this host other than by a migration (its endpoint
/// removed): its network namespace is gone, so its process tree is stopped too, as a runtime
/// deletes a sandbox's processes with it. (A migrated container's tree was checkpointed and
/// is no longer the runtime's.)
async fn stop_orphans(node: Arc<tokio::sync::Mutex<Node>>, runtime: Runtime) {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let built: std::collections::BTreeSet<std::net::Ipv4Addr> = node
            .lock()
            .await
            .applied
            .containers
            .keys()
            .copied()
            .collect();
        for p in runtime.list() {
            if p.running && p.fenced.is_none() && !built.contains(&p.container) {
                warn!(container = %p.container, pid = p.pid, "the container left this host: stopping its process tree");
                if let Err(e) = runtime
                    .stop(p.container, std::time::Duration::from_secs(2))
                    .await
                {
                    warn!(container = %p.container, error = %e, "stopping an orphaned process tree");
                }
            }
        }
    }
}

async fn status_handler(State(s): State<AppState>) -> impl IntoResponse {
    let status = s.node.lock().await.status();
    let mut v = serde_json::to_value(status).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.insert(
            "processes".into(),
            serde_json::to_value(s.runtime.list()).unwrap_or_default(),
        );
    }
    Json(v)
}

async fn metrics_handler(State(s): State<AppState>) -> impl IntoResponse {
    let (applied_version, containers, hold, hold_device_dropped) = {
        let n = s.node.lock().await;
        let dropped = match n.hold_ifindex {
            0 => 0,
            i => n
                .net
                .nl
                .link_tx_dropped(i)
                .await
                .ok()
                .flatten()
                .unwrap_or(0),
        };
        let hold = n.hold.as_ref().map(|h| {
            let q = h.queues.lock().unwrap_or_else(|p| p.into_inner());
            (q.counters, q.held().len(), q.total_packets())
        });
        (n.applied.version, n.applied.containers.len(), hold, dropped)
    };
    let dp = match s.datapath.lock() {
        Ok(dp) => dp,
        Err(p) => p.into_inner(),
    };
    match dp.counters() {
        Ok(c) => {
            let gauges = metrics::Gauges {
                endpoints: dp.endpoint_count(),
                vteps: dp.vtep_count(),
                public: dp.public_count(),
                snat: dp.snat_count(),
                containers,
                applied_version,
                hold: hold.map(|h| h.0).unwrap_or_default(),
                held_endpoints: hold.map_or(0, |h| h.1),
                held_packets: hold.map_or(0, |h| h.2),
                hold_device_dropped,
            };
            (
                StatusCode::OK,
                [("content-type", metrics::CONTENT_TYPE)],
                metrics::render(&s.host, &c, &gauges),
            )
        }
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [("content-type", "text/plain")],
            format!("reading counters: {e}\n"),
        ),
    }
}
