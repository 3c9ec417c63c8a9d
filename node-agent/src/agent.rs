//! The running agent: sets up the host's overlay device and datapath, follows the registry
//! (containers, peers, public addresses), serves metrics and status.
//!
//! Restarts are hitless: on SIGTERM / SIGINT the agent stops *without* tearing anything down —
//! containers, their processes, namespaces and veths, the pinned datapath (programs stay
//! attached), the VXLAN device and the persistent hold device all stay — and saves what it
//! holds in memory (held packets) for the next agent. A SIGKILLed agent leaves the same, minus
//! the held packets. On start the agent adopts what is there ([`run`]); [`teardown`]
//! (`ferry-agent --teardown`) is the explicit removal of everything.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use anyhow::Context as _;
use axum::{Json, Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use ferry_api::{Client, HostRole};
use ferry_common::{Config, config_flags, flags, ipv4_be, kind};
use ferry_overlay::{
    datapath::Datapath,
    netlink::{Netlink, VxlanSpec},
    nft, sys,
    tap::{HOLD_MTU, Tap},
};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{Instrument as _, info, warn};

use crate::{
    cni::Cni,
    config::AgentConfig,
    containers::{self, ATTACHMENTS_FILE, Attachments, HostNetwork},
    fencing::Fencing,
    handoff::Handoff,
    hold::HoldQueues,
    metrics,
    node::{Announcements, Applied, Hold, Leftovers, Node},
    peer_api::{self, PeerApi},
    plan,
    runtime::{Isolation, RuncOptions, Runtime, store::write_atomic},
    sync,
};

/// Held packets a stopping agent saved for the next one (in the state directory).
pub const HOLD_QUEUE_FILE: &str = "hold-queue.bin";
/// Written by an agent that stopped cleanly (SIGTERM), removed by the next one at start.
pub const CLEAN_STOP_FILE: &str = "clean-stop";
/// The lock that keeps a second agent (or a teardown) off a running agent's host.
pub const LOCK_FILE: &str = "agent.lock";

/// Takes the state directory's lock (`flock`, released when the process exits however it
/// exits): one agent per host, and no teardown under a running agent.
fn lock_state_dir(dir: &Path) -> anyhow::Result<std::fs::File> {
    use std::os::fd::AsRawFd as _;
    ferry_api::private::create_dir(dir)
        .with_context(|| format!("creating the state directory {}", dir.display()))?;
    let path = dir.join(LOCK_FILE);
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock(2) on an fd we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        anyhow::bail!(
            "{} is locked: another ferry-agent runs with this state directory ({})",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(f)
}

/// Underlay MTU minus the VXLAN overhead (outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14).
pub const OVERLAY_MTU: u32 = 1500 - 50;

#[derive(Clone)]
struct AppState {
    host: Arc<str>,
    datapath: Arc<Mutex<Datapath>>,
    node: Arc<tokio::sync::Mutex<Node>>,
    runtime: Runtime,
    /// The peer API's bounded server's counts (none without a peer API).
    peer_connections: Option<Arc<ferry_api::serve::Stats>>,
}

/// Runs the agent until SIGTERM / SIGINT. What an earlier agent left is adopted, not rebuilt:
/// the VXLAN device (if it matches), the hold device (persistent), the pinned maps and links
/// (the programs are swapped in place), endpoints being held (from the map: queueing resumes
/// before the device is read), the held packets a stopping agent saved, the runtime's process
/// trees (its state file, then every container namespace scanned), and — as the registry's
/// snapshot asks for them — the containers' namespaces and veths.
/// Loads this host's TLS identity (`[tls]`), refusing a certificate for another party, and
/// makes it the identity of every request this process sends.
fn load_tls(cfg: &AgentConfig) -> anyhow::Result<Option<ferry_tls::Tls>> {
    let Some(files) = &cfg.tls else {
        if cfg.gateway.is_some() {
            warn!(
                "insecure_plaintext: the peer API and the watch are plain HTTP; the token and images cross the underlay in clear"
            );
        }
        return Ok(None);
    };
    let tls = ferry_tls::Tls::load(files).context("TLS")?;
    let me = ferry_tls::Identity::Host(cfg.host.clone());
    if tls.identity() != &me {
        anyhow::bail!(
            "TLS: {} names {}, not host {} (issue one with ferry certs issue host:{})",
            files.cert.display(),
            tls.identity(),
            cfg.host,
            cfg.host
        );
    }
    ferry_api::transport::set_process_tls(tls.client_config());
    Ok(Some(tls))
}

/// CRIU's kernel-feature cache on a tmpfs (`crate::criu::kdat`): without it every restore
/// probes the kernel inside the container's frozen window.
async fn prepare_criu_cache(binary: std::path::PathBuf) {
    use crate::criu::kdat::KdatCache;
    let shown = binary.display().to_string();
    match tokio::task::spawn_blocking(move || crate::criu::kdat::prepare_for(&binary)).await {
        Ok(KdatCache::Ready { file }) => {
            info!(criu = shown, cache = %file.display(), "CRIU's kernel-feature cache is on a tmpfs")
        }
        Ok(KdatCache::Mounted { file }) => info!(
            criu = shown,
            cache = %file.display(),
            "mounted a tmpfs for CRIU's kernel-feature cache (its directory was on disk)"
        ),
        Ok(KdatCache::Unusable { file, why }) => warn!(
            criu = shown,
            cache = ?file,
            why,
            "CRIU cannot cache its kernel probes: every dump and restore probes the kernel \
             (tens of ms; the restore's inside the container's frozen window)"
        ),
        Err(e) => warn!(error = %e, "preparing CRIU's kernel-feature cache"),
    }
}

/// Larger initial TCP windows on the agents' own connections (`ferry_overlay::peer_window`);
/// kept attached while the agent runs. A failure only costs speed across a WAN: logged.
fn attach_peer_window(cfg: &AgentConfig) -> Option<ferry_overlay::peer_window::PeerWindow> {
    let window = cfg.criu.peer_initial_window;
    if window == 0 {
        return None;
    }
    match ferry_overlay::peer_window::PeerWindow::attach_own(cfg.api_listen.port(), window) {
        Ok(p) => {
            info!(cgroup = %p.cgroup().display(), port = cfg.api_listen.port(), window, "the agents' connections start with larger TCP windows");
            Some(p)
        }
        Err(e) => {
            // With its causes (aya keeps the errno there).
            let error = format!("{:#}", anyhow::Error::new(e));
            warn!(
                error,
                window,
                "the agents' connections keep the kernel's initial TCP windows (slower image transfers across a WAN)"
            );
            None
        }
    }
}

pub async fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    let tls = load_tls(&cfg)?;
    let _lock = lock_state_dir(&cfg.state_dir)?;
    if cfg.gateway.is_some() && cfg.criu.binary.exists() {
        prepare_criu_cache(cfg.criu.binary.clone()).await;
    }
    let _peer_window = if cfg.gateway.is_some() {
        attach_peer_window(&cfg)
    } else {
        None
    };
    let clean_stop = cfg.state_dir.join(CLEAN_STOP_FILE);
    let previous_stopped_cleanly = clean_stop.exists();
    let _ = std::fs::remove_file(&clean_stop);
    let nl = Netlink::open()?;
    let spec = VxlanSpec {
        name: cfg.vxlan_device.clone(),
        port: cfg.vxlan_port,
        mtu: OVERLAY_MTU,
        overlay_ip: cfg.overlay_ip,
        overlay_cidr: cfg.overlay_cidr,
    };
    let (ifindex, vxlan_kept) = nl.ensure_vxlan(&spec).await?;
    // IPv6 on the device would only emit ND/MLD noise into the datapath: off, except on a
    // dual-stack gateway, whose stack forwards containers' IPv6 to and from the internet
    // through it (no addresses, no router advertisements: see `gateway_ipv6`).
    let gateway6 = cfg.role == HostRole::Gateway && cfg.overlay6_cidr.is_some();
    if !gateway6 {
        sys::write_sysctl(
            &format!("net/ipv6/conf/{}/disable_ipv6", cfg.vxlan_device),
            "1",
        )?;
    }
    info!(device = %cfg.vxlan_device, ifindex, port = cfg.vxlan_port, kept = vxlan_kept, "vxlan device ready");

    let mut base = Config {
        vni: cfg.vni,
        vxlan_ifindex: ifindex,
        tunnel_ttl: plan::TUNNEL_TTL,
        overlay_net_be: ipv4_be(cfg.overlay_cidr.network().octets()),
        overlay_mask_be: ipv4_be(cfg.overlay_cidr.netmask().octets()),
        // Neither containers nor the internet may address a host's underlay address.
        self_vtep_be: ipv4_be(cfg.vtep.octets()),
        ..Config::default()
    };
    // No-tunnel mode: the underlay interface (the one holding the VTEP address) and its
    // subnet; hosts inside it get packets untunnelled.
    let underlay = if cfg.direct_routing {
        let (index, prefix_len, name) = nl
            .address_owner(cfg.vtep)
            .await?
            .with_context(|| format!("direct_routing: no interface holds vtep {}", cfg.vtep))?;
        let net = ipnet::Ipv4Net::new(cfg.vtep, prefix_len)
            .with_context(|| format!("vtep {} has prefix length {prefix_len}", cfg.vtep))?
            .trunc();
        base.flags |= config_flags::DIRECT;
        base.underlay_ifindex = index;
        base.underlay_net_be = ipv4_be(net.network().octets());
        base.underlay_mask_be = ipv4_be(net.netmask().octets());
        info!(interface = %name, subnet = %net, "no-tunnel mode towards hosts of this subnet");
        Some(name)
    } else {
        None
    };
    if let Some(p) = cfg.overlay6_cidr {
        base.flags |= config_flags::IPV6;
        base.overlay6_prefix
            .copy_from_slice(&p.network().octets()[..12]);
    }
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
        if let Some(p) = cfg.overlay6_cidr {
            gateway_ipv6(&nl, &cfg, ifindex, p).await?;
            if cfg.public6 {
                base.flags |= config_flags::PUBLIC6;
            }
        }
        if cfg.masquerade {
            let masq6 = cfg.overlay6_cidr.filter(|_| !cfg.public6);
            nft::ensure_masquerade(cfg.overlay_cidr, masq6, public)?;
        }
    }

    // Containers' own announcements are copied out of this interface (for L2 peers there).
    if let Some(relay) = cfg.announce_relay.as_deref() {
        base.announce_ifindex = nl
            .link_index(relay)
            .await?
            .with_context(|| format!("announce_relay: interface {relay} does not exist"))?;
        info!(interface = relay, "containers' announcements relayed");
    }

    // The hold device: packets for HOLD endpoints wait behind it, in this agent. Persistent:
    // it stays (same ifindex, from-hold attached) when this agent stops.
    let tap = Tap::open_persistent(&cfg.hold_device)
        .with_context(|| format!("opening the hold device {}", cfg.hold_device))?;
    base.hold_ifindex = nl.configure_hold_device(&cfg.hold_device, HOLD_MTU).await?;
    sys::write_sysctl(
        &format!("net/ipv6/conf/{}/disable_ipv6", cfg.hold_device),
        "1",
    )?;

    let mut dp = Datapath::attach(&cfg.vxlan_device, base, cfg.bpffs_dir.as_deref())?;
    dp.attach_hold(&cfg.hold_device)?;
    if let Some(u) = &underlay {
        dp.attach_underlay(u)?;
    }
    if let Some(public) = cfg.public_interface.as_deref() {
        dp.attach_public(public)?;
        info!(interface = public, "from-public attached");
    }
    let adoption = dp.adoption().clone();
    let adopted = !adoption.maps_reused.is_empty();
    if adopted {
        info!(
            maps = ?adoption.maps_reused,
            links = adoption.links_adopted.len(),
            links_dropped = ?adoption.links_dropped,
            previous_stopped_cleanly,
            "adopted the pinned datapath of an earlier agent (entries and counters go on)"
        );
    }
    // What the kernel says about endpoints being held and old copies being silenced.
    let mut queues = HoldQueues::new(cfg.hold);
    let mut dumped = BTreeSet::new();
    for (ip, mut e) in dp.endpoints() {
        if e.kind == kind::HOLD {
            queues.hold(ip);
        }
        // A drain dies with the agent that started it (and its checkpoint with it): the
        // container takes new connections again at once. SYNs the earlier agent saved are
        // loaded below and delivered by the first apply.
        if e.kind == kind::LOCAL && e.flags & flags::HOLD_SYN != 0 {
            e.flags &= !flags::HOLD_SYN;
            match dp.set_endpoint(ip, e) {
                Ok(()) => info!(%ip, "a drain the earlier agent left: ended"),
                Err(err) => warn!(%ip, error = %err, "ending a drain the earlier agent left"),
            }
        }
        if e.kind == kind::FORWARD && e.flags & flags::DROP_EGRESS != 0 {
            dumped.insert(ip);
        }
    }
    restore_held(
        &cfg.state_dir,
        &mut queues,
        adopted,
        previous_stopped_cleanly,
    );
    let egress_vtep = adoption
        .previous_config
        .map(|c| c.egress_vtep_be)
        .filter(|v| *v != 0)
        .map(|v| std::net::Ipv4Addr::from(u32::from_be(v)));
    // A gateway-role host that stood by keeps standing by until the registry says otherwise.
    let public_standby = adoption
        .previous_config
        .is_some_and(|c| c.flags & ferry_common::config_flags::PUBLIC_STANDBY != 0);
    let hold = Arc::new(Hold {
        tap,
        queues: Mutex::new(queues),
    });
    let datapath = Arc::new(Mutex::new(dp));
    // Containers living in a CNI runtime's namespace (before any apply builds them).
    let attached = Attachments::load(cfg.state_dir.join(ATTACHMENTS_FILE));
    let mut node = Node {
        host: cfg.host.clone(),
        datapath: datapath.clone(),
        net: HostNetwork {
            nl,
            netns_prefix: cfg.container_netns_prefix.clone(),
            mtu: OVERLAY_MTU,
            host_overlay_ip: cfg.overlay_ip,
            overlay6: cfg.overlay6_cidr,
            attached: attached.clone(),
        },
        base_config: base,
        applied: Applied {
            dumped,
            egress_vtep,
            public_standby,
            ..Applied::default()
        },
        hold: Some(hold.clone()),
        hold_ifindex: base.hold_ifindex,
        announcer: Announcements {
            schedule: cfg.announce.clone(),
            overlay6: cfg.overlay6_cidr,
            public_interface: cfg
                .public_interface
                .clone()
                .filter(|_| cfg.role == HostRole::Gateway),
            public6_next_hop: cfg
                .public6_next_hop
                .filter(|_| cfg.role == HostRole::Gateway),
        },
        registry: None,
        leftovers: if cfg.gateway.is_some() {
            Leftovers::AfterRegistry
        } else {
            Leftovers::AfterNextApply
        },
        udp_pace: std::time::Duration::from_millis(cfg.hold.udp_pace_ms),
        pacers: Vec::new(),
        facing_override: None,
        planned: None,
    };
    let hold_reader = tokio::spawn(read_hold_device(hold.clone()));
    // The static configuration alone does not know the containers: on an adopted datapath
    // that follows a registry, its apply would end holds the registry still wants. The
    // datapath goes on as the earlier agent left it until the first snapshot is applied.
    if adopted && cfg.gateway.is_some() {
        info!("adopted datapath: waiting for the registry before changing anything");
    } else {
        let errors = node.apply(&plan::desired(&cfg, None)).await;
        if !errors.is_empty() {
            anyhow::bail!("programming the datapath: {}", errors.join("; "));
        }
    }
    info!(
        endpoints = node.applied.endpoints.len(),
        vteps = node.applied.vteps.len(),
        "datapath attached"
    );
    let node = Arc::new(tokio::sync::Mutex::new(node));

    // The container runtime: the agent becomes a child subreaper (CRIU-restored trees are
    // reparented to it) and reaps the processes it starts or adopts.
    let runtime = Runtime::new(
        &cfg.host,
        Some(&cfg.state_dir),
        Isolation::from_config(&cfg),
        Some(RuncOptions::from_config(&cfg)),
    )?;
    adopt_unrecorded_processes(&cfg, &runtime, &attached).await;
    let server_tls = tls.as_ref().map(|t| t.server_config());
    let (handoff, peer_api) = match start_handoff(&cfg, &node, &runtime, server_tls).await {
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
    let client = match &cfg.gateway {
        Some(g) => Some(
            Client::with_token_file(g.address, &g.token_file)
                .with_context(|| format!("gateway token {}", g.token_file.display()))?
                .with_fallbacks(&g.fallbacks),
        ),
        None => None,
    };
    // ferry-cni's way in (it needs the gateway's IPAM: the configuration insists on one).
    let cni = match &client {
        Some(c) => Cni::start(&cfg, node.clone(), c.clone(), attached.clone())?,
        None => None,
    };
    let follower = match (&cfg.gateway, client) {
        (Some(g), Some(client)) => {
            let span = tracing::info_span!("sync", gateway = %g.address);
            background.push(tokio::spawn(
                sync::heartbeat(cfg.host.clone(), client.clone()).instrument(span.clone()),
            ));
            // Every agent listens for the gateway-role hosts (gateway-role agents also send).
            background.push(tokio::spawn(
                crate::public_ha::run(cfg.clone(), client.clone(), node.clone())
                    .instrument(span.clone()),
            ));
            Some(tokio::spawn(
                sync::follow(cfg.clone(), client, node.clone(), Some(fencing.clone()))
                    .instrument(span),
            ))
        }
        _ => None,
    };
    let orphans = tokio::spawn(
        stop_orphans(node.clone(), runtime.clone(), cfg.gateway.is_some()).in_current_span(),
    );

    let state = AppState {
        host: cfg.host.as_str().into(),
        datapath,
        node: node.clone(),
        runtime: runtime.clone(),
        peer_connections: peer_api.as_ref().map(|p| p.connections.clone()),
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
    ferry_api::serve::serve(
        listener,
        app,
        ferry_api::serve::Limits::default(),
        // Read-only metrics on loopback (out of containers' reach): plain, for scrapers.
        None,
        Arc::default(),
        async move {
            tokio::select! {
                _ = term.recv() => info!("SIGTERM"),
                _ = int.recv() => info!("SIGINT"),
            }
        },
        std::time::Duration::from_secs(5),
    )
    .await?;

    if let Some(c) = cni {
        c.shutdown().await;
    }
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
    // Nothing is torn down: the containers' processes go on (the next agent re-adopts them).
    runtime.detach().await;
    orphans.abort();
    let _ = orphans.await;
    hold_reader.abort();
    let _ = hold_reader.await;
    save_held(&cfg.state_dir, &hold);
    drop(state);
    drop(node);
    // The datapath's maps and links stay pinned (programs attached), the hold device is
    // persistent, the VXLAN device and the masquerade table stay.
    if let Err(e) = write_atomic(&clean_stop, b"") {
        warn!(error = %e, path = %clean_stop.display(), "marking the stop as clean");
    }
    info!("stopped; containers, datapath and devices left in place for the next agent");
    Ok(())
}

/// Held packets a SIGTERMed agent saved: loaded (ahead of anything the device delivers now)
/// and the file removed. Without one, after an agent that did not stop cleanly, whatever it
/// held in memory is lost (said in the log; counting it is impossible afterwards).
fn restore_held(dir: &Path, queues: &mut HoldQueues, adopted: bool, clean: bool) {
    let path = dir.join(HOLD_QUEUE_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => {
            match queues.load(&bytes) {
                Ok(n) => {
                    info!(packets = n, held = ?queues.held(), "held packets of the previous agent queued again")
                }
                Err(e) => {
                    warn!(error = %e, path = %path.display(), "saved held packets unreadable: dropped")
                }
            }
            let _ = std::fs::remove_file(&path);
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if adopted && !clean && !queues.held().is_empty() {
                warn!(held = ?queues.held(), "the previous agent did not stop cleanly: packets it held in memory are lost (TCP retransmits them)");
            }
        }
        Err(e) => warn!(error = %e, path = %path.display(), "reading saved held packets"),
    }
}

/// At a clean stop: the held packets, saved for the next agent (none: no file).
fn save_held(dir: &Path, hold: &Hold) {
    let mut q = hold.queues.lock().unwrap_or_else(|p| p.into_inner());
    let (held, packets) = (q.held(), q.total_packets());
    if held.is_empty() {
        return;
    }
    let bytes = q.save();
    let path = dir.join(HOLD_QUEUE_FILE);
    match write_atomic(&path, &bytes) {
        Ok(()) => {
            info!(?held, packets, path = %path.display(), "held packets saved for the next agent")
        }
        Err(e) => warn!(error = %e, ?held, packets, "saving held packets: they are lost"),
    }
}

/// Processes inside this agent's container namespaces that the runtime has no record of
/// (the agent died between a spawn and the state's write) are adopted. A CNI container's
/// namespace is its runtime's, and so are its processes: they are left alone.
async fn adopt_unrecorded_processes(cfg: &AgentConfig, runtime: &Runtime, attached: &Attachments) {
    let prefix = cfg.container_netns_prefix.clone();
    let cni: BTreeSet<std::net::Ipv4Addr> = attached.all().iter().map(|a| a.ip).collect();
    let found = tokio::task::spawn_blocking(move || {
        containers::existing_containers(&prefix)
            .into_iter()
            .filter(|ip| !cni.contains(ip))
            .filter_map(|ip| {
                let path =
                    ferry_overlay::netns::netns_path(&plan::container_netns_name(&prefix, ip));
                let pids = ferry_overlay::netns::pids_in(&path).ok()?;
                (!pids.is_empty()).then_some((ip, pids))
            })
            .collect::<Vec<_>>()
    })
    .await
    .unwrap_or_default();
    for (ip, pids) in found {
        runtime.adopt_found(ip, &pids);
    }
}

/// `ferry-agent --teardown`: removes everything the agent of this configuration made, whether
/// or not it still runs… except that it refuses while one runs (the state directory's lock):
/// every process inside each container namespace (found by scanning /proc, not only the
/// runtime's records) is killed, then the namespaces and veths go, the pinned datapath
/// (detaching the programs), the hold device, the VXLAN device, the masquerade table, and
/// the agent's state files. Run it inside the host's network namespace. Keeps going past
/// errors and reports all of them.
pub async fn teardown(cfg: AgentConfig) -> anyhow::Result<()> {
    let lock = lock_state_dir(&cfg.state_dir)?;
    let mut errors: Vec<String> = Vec::new();
    let runtime = Runtime::new(
        &cfg.host,
        Some(&cfg.state_dir),
        Isolation::from_config(&cfg),
        Some(RuncOptions::from_config(&cfg)),
    )?;
    runtime.shutdown().await;
    let nl = Netlink::open()?;
    let net = HostNetwork {
        nl,
        netns_prefix: cfg.container_netns_prefix.clone(),
        mtu: OVERLAY_MTU,
        host_overlay_ip: cfg.overlay_ip,
        overlay6: cfg.overlay6_cidr,
        attached: Attachments::load(cfg.state_dir.join(ATTACHMENTS_FILE)),
    };
    for ip in containers::existing_containers(&cfg.container_netns_prefix) {
        use crate::node::seams::ContainerNet as _;
        match net.delete(ip).await {
            Ok(()) => info!(container = %ip, "container removed"),
            Err(e) => errors.push(e.to_string()),
        }
    }
    // A CNI container's namespace is its runtime's: only the agent's name for it goes.
    errors.extend(net.detach_all().await.into_iter().map(|e| e.to_string()));
    if let Some(dir) = &cfg.bpffs_dir {
        match ferry_overlay::datapath::remove_pins(dir) {
            Ok(()) => info!(dir = %dir.display(), "datapath unpinned (programs detached)"),
            Err(e) => errors.push(e.to_string()),
        }
    }
    match net.nl.link_index(&cfg.hold_device).await {
        Ok(idx) => {
            if let Err(e) = Tap::remove(&cfg.hold_device, idx.is_some()) {
                errors.push(format!("removing the hold device {}: {e}", cfg.hold_device));
            }
        }
        Err(e) => errors.push(e.to_string()),
    }
    if let Err(e) = net.nl.delete_link(&cfg.vxlan_device).await {
        errors.push(e.to_string());
    }
    if cfg.role == HostRole::Gateway
        && cfg.masquerade
        && let Err(e) = nft::remove()
    {
        errors.push(format!("removing the masquerade table: {e}"));
    }
    let files: Vec<PathBuf> = [
        crate::runtime::store::FILE,
        HOLD_QUEUE_FILE,
        CLEAN_STOP_FILE,
        ATTACHMENTS_FILE,
        LOCK_FILE,
    ]
    .iter()
    .map(|f| cfg.state_dir.join(f))
    .collect();
    for f in files {
        if let Err(e) = std::fs::remove_file(&f)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            errors.push(format!("removing {}: {e}", f.display()));
        }
    }
    // runc's state and the bundles of its containers (deleted by the runtime's shutdown).
    let runc_dir = cfg.state_dir.join("runc");
    if let Err(e) = std::fs::remove_dir_all(&runc_dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        errors.push(format!("removing {}: {e}", runc_dir.display()));
    }
    drop(lock);
    // The directory itself, if nothing else lives in it.
    let _ = std::fs::remove_dir(&cfg.state_dir);
    if errors.is_empty() {
        info!("torn down");
        Ok(())
    } else {
        anyhow::bail!("teardown incomplete: {}", errors.join("; "))
    }
}

/// The hand-off's Unix socket and (with a `[gateway]` token) the peer API.
async fn start_handoff(
    cfg: &AgentConfig,
    node: &Arc<tokio::sync::Mutex<Node>>,
    runtime: &Runtime,
    tls: Option<Arc<rustls::ServerConfig>>,
) -> anyhow::Result<(Handoff, Option<PeerApi>)> {
    let token = peer_api::read_token(cfg)?;
    let listener = peer_api::bind(cfg, token.as_deref()).await?;
    let handoff = Handoff::start(cfg, node.clone(), token.clone())?;
    let peer_api = match (listener, token) {
        (Some(l), Some(token)) => Some(PeerApi::serve(
            l,
            cfg,
            token,
            tls,
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
        if let Err(e) = hold.read_waiting(&mut buf) {
            warn!(error = %e, "reading the hold device");
        }
        ready.clear_ready();
    }
}

/// A container the registry took off this host other than by a migration (its endpoint
/// removed): its network namespace is gone, so its process tree is stopped too, as a runtime
/// deletes a sandbox's processes with it. (A migrated container's tree was checkpointed and
/// is no longer the runtime's.) A restarted agent that follows a registry knows its
/// containers only once it has applied a snapshot: nothing is stopped before that.
async fn stop_orphans(node: Arc<tokio::sync::Mutex<Node>>, runtime: Runtime, registry: bool) {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let built: std::collections::BTreeSet<std::net::Ipv4Addr> = {
            let n = node.lock().await;
            if registry && n.applied.version == 0 {
                continue;
            }
            n.applied.containers.keys().copied().collect()
        };
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
    let (applied_version, containers, hold, hold_device_dropped, [endpoints, vteps, public, snat]) = {
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
        // The maps' sizes as the agent wrote them (its applied record): walking the kernel's
        // maps key by key would hold the datapath's lock, and this worker thread, for
        // 250,000 syscalls at 250,000 endpoints.
        let a = &n.applied;
        let sizes = [
            a.endpoints.len(),
            a.vteps.len(),
            a.public.len(),
            a.snat.len(),
        ];
        (a.version, a.containers.len(), hold, dropped, sizes)
    };
    let dp = match s.datapath.lock() {
        Ok(dp) => dp,
        Err(p) => p.into_inner(),
    };
    match dp.counters() {
        Ok(c) => {
            let gauges = metrics::Gauges {
                endpoints,
                vteps,
                public,
                snat,
                containers,
                applied_version,
                hold: hold.map(|h| h.0).unwrap_or_default(),
                held_endpoints: hold.map_or(0, |h| h.1),
                held_packets: hold.map_or(0, |h| h.2),
                hold_device_dropped,
                peer_connections: s.peer_connections.as_ref().map_or_else(
                    || ferry_api::serve::Stats::default().by_result(),
                    |c| c.by_result(),
                ),
                udp_carry: crate::criu::udpq::counters(),
                announce: crate::node::seams::announce_counters(),
                public_failover: crate::public_ha::counters(),
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

/// A dual-stack gateway's IPv6: forwarding on, IPv6 on the VXLAN device without addresses,
/// duplicate address detection or router advertisements, and the overlay's prefix routed to
/// it (the stack forwards containers' IPv6 out of the public interface, and masqueraded
/// replies back into the overlay, where to-overlay finds each container's host).
async fn gateway_ipv6(
    nl: &Netlink,
    cfg: &AgentConfig,
    vxlan_ifindex: u32,
    prefix: ipnet::Ipv6Net,
) -> anyhow::Result<()> {
    let dev = &cfg.vxlan_device;
    sys::ipv6_static(dev)?;
    // `all` turns forwarding on for every interface (and off router solicitations there).
    sys::write_sysctl("net/ipv6/conf/all/forwarding", "1")?;
    nl.set_up(vxlan_ifindex, dev).await?;
    nl.replace_route6(prefix, vxlan_ifindex, dev).await?;
    info!(device = %dev, %prefix, public6 = cfg.public6, "gateway carries the overlay's IPv6");
    Ok(())
}
