//! The CNI plugin's socket (`cni_socket`, mode 0600, root only): `ferry-cni`, executed by a
//! container runtime, asks this agent to wire, check or unwire a container's network
//! namespace. The protocol is `ferry_cni::proto` (JSON + the namespace as `SCM_RIGHTS`); one
//! operation runs at a time.
//!
//! **ADD** (nothing is changed before every field is checked):
//! 1. the network's name, container id, interface name, MAC (unicast, not ferry's own) and
//!    address (inside the overlay) are checked; the descriptor must be a network namespace,
//!    not the host's, without an interface of that name;
//! 2. the gateway's IPAM gives the address (or honours the one asked for) — or answers that
//!    it is the address of a container whose migration to this host is prepared or frozen:
//!    then the new namespace is attached to that prepared, held endpoint (step 6);
//! 3. the runtime's namespace is bind-mounted at the agent's name for the container
//!    (`/run/netns/<prefix><ip>`) and recorded as an [`Attachment`] — before the endpoint is
//!    registered, so the agent's apply builds the veth into it instead of creating a
//!    namespace ([`crate::containers`]);
//! 4. the endpoint is registered on this host (with the MAC asked for, if any);
//! 5. the agent waits until its own apply has built the container (veth up on both ends,
//!    from-container attached, entry `LOCAL`) and answers the result. Any failure after step 2
//!    undoes everything: the lease and the endpoint are released in one change, the removal is
//!    applied (the veth goes), the name is unmounted;
//! 6. attach to a migration: the veth's container end moves from the prepared namespace into
//!    the runtime's (address, MAC, routes, neighbour re-applied), the agent's name is
//!    re-pointed at it, the host end stays — its entry stays `HOLD` (or the source's
//!    `REMOTE` while prepared), so nothing is delivered into the new namespace before the
//!    release. The migration itself is not touched.
//!
//! **DEL** is idempotent: unknown container → success. If this host owns the endpoint and no
//! migration involves it, the lease and the endpoint are released (one change), the removal
//! applied, the name unmounted. If the endpoint lives on another host now, or migrates (the
//! source's runtime deletes its copy after a checkpoint; a destination's restore gave up),
//! only the local attachment goes: the registry entry of a container that runs elsewhere is
//! never removed from here.
//!
//! **CHECK**: the attachment exists, the agent's name is the namespace given, the host end is
//! up, and inside the interface has the MAC, the /32 and the default route as ADD left them.

use std::{
    net::Ipv4Addr,
    os::{
        fd::{AsFd as _, BorrowedFd, OwnedFd},
        unix::fs::{FileTypeExt as _, PermissionsExt as _},
    },
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use ferry_api::{
    ApiError, Client, EndpointSpec, IpamAllocateRequest, IpamAllocation, IpamReleaseRequest,
    MacAddr, MigrationPhase,
};
use ferry_cni::{
    CniError, ErrorCode,
    proto::{Op, Reply, Request},
    spec::{self, Attached},
};
use ferry_overlay::{
    netlink::{CONTAINER_GATEWAY, Netlink},
    netns,
};
use ipnet::Ipv4Net;
use tokio::{
    net::{UnixListener, UnixStream},
    sync::{Mutex, watch},
    task::{JoinHandle, JoinSet},
};
use tracing::{Instrument as _, info, warn};

use crate::{
    config::AgentConfig,
    containers::{Attachment, Attachments, Built, GATEWAY_MAC},
    handoff::wire,
    node::Node,
    plan::LocalContainer,
};

/// How long an ADD or DEL waits for this agent to apply its registry change.
const APPLY_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a client has to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the waits look at what the agent applied.
const POLL: Duration = Duration::from_millis(5);

/// What the CNI tasks share.
struct Ctx {
    host: String,
    network: String,
    overlay: Ipv4Net,
    /// Dual-stack: the overlay's IPv6 prefix (results carry the container's IPv6 address).
    overlay6: Option<ipnet::Ipv6Net>,
    /// For re-applying the registry after a DEL (see [`del`]).
    cfg: AgentConfig,
    node: Arc<Mutex<Node>>,
    client: Client,
    attached: Attachments,
    /// One CNI operation at a time (two ADDs of one container never race).
    busy: Mutex<()>,
}

/// The running CNI server.
pub struct Cni {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    socket: PathBuf,
}

impl Cni {
    /// Binds `cni_socket` (mode 0600) and serves it; `None` without one.
    pub fn start(
        cfg: &AgentConfig,
        node: Arc<Mutex<Node>>,
        client: Client,
        attached: Attachments,
    ) -> anyhow::Result<Option<Self>> {
        let Some(socket) = cfg.cni_socket.clone() else {
            return Ok(None);
        };
        let listener = bind(&socket)?;
        let ctx = Arc::new(Ctx {
            host: cfg.host.clone(),
            network: cfg.cni_network.clone(),
            overlay: cfg.overlay_cidr,
            overlay6: cfg.overlay6_cidr,
            cfg: cfg.clone(),
            node,
            client,
            attached,
            busy: Mutex::new(()),
        });
        let (stop, stop_rx) = watch::channel(false);
        let task = tokio::spawn(serve(listener, ctx, stop_rx).in_current_span());
        info!(socket = %socket.display(), network = %cfg.cni_network, "serving the CNI socket");
        Ok(Some(Self { stop, task, socket }))
    }

    /// Stops serving (an operation in progress is dropped) and removes the socket file.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        if let Err(e) = std::fs::remove_file(&self.socket) {
            warn!(error = %e, socket = %self.socket.display(), "removing the CNI socket");
        }
    }
}

/// Binds the socket (mode 0600), replacing a stale one nobody serves.
fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        ferry_api::private::create_dir(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                anyhow::bail!(
                    "cni_socket {} is served by another process (another agent?)",
                    path.display()
                );
            }
            std::fs::remove_file(path)
                .with_context(|| format!("removing the stale {}", path.display()))?;
        }
        Ok(_) => anyhow::bail!("cni_socket {} exists and is not a socket", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("cni_socket {}", path.display())),
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 600 {}", path.display()))?;
    Ok(listener)
}

async fn serve(listener: UnixListener, ctx: Arc<Ctx>, mut stop: watch::Receiver<bool>) {
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            _ = stop.changed() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tasks.spawn(handle(ctx.clone(), stream).in_current_span());
                }
                Err(e) => {
                    warn!(error = %e, "accepting a CNI connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    tasks.shutdown().await;
}

fn err(code: ErrorCode, msg: impl Into<String>) -> CniError {
    CniError::new(code, msg)
}

async fn handle(ctx: Arc<Ctx>, stream: UnixStream) {
    let reply = match read_request(&stream).await {
        Ok((req, fd)) => {
            let span = tracing::info_span!("cni", op = ?req.op, container = %req.container_id, ifname = %req.ifname);
            let _one = ctx.busy.lock().await;
            match dispatch(&ctx, &req, fd).instrument(span.clone()).await {
                Ok(attached) => {
                    span.in_scope(|| info!(ip = ?attached.as_ref().map(|a| a.ip), "done"));
                    Reply::ok(attached)
                }
                Err(e) => {
                    span.in_scope(|| warn!(code = e.code.number(), error = %e.msg, "refused"));
                    Reply::error(&e)
                }
            }
        }
        Err(e) => {
            warn!(code = e.code.number(), error = %e.msg, "unreadable CNI request");
            Reply::error(&e)
        }
    };
    let header = serde_json::to_value(&reply).unwrap_or_default();
    if let Err(e) = wire::send(&stream, &header, &[], &[]).await {
        warn!(error = %e, "answering the CNI plugin");
    }
}

async fn read_request(stream: &UnixStream) -> Result<(Request, Option<OwnedFd>), CniError> {
    match stream.peer_cred() {
        Ok(c) if c.uid() == 0 => {}
        Ok(c) => {
            return Err(err(
                ErrorCode::Refused,
                format!("uid {} may not use the CNI socket: root only", c.uid()),
            ));
        }
        Err(e) => return Err(err(ErrorCode::Io, format!("peer credentials: {e}"))),
    }
    let msg = match tokio::time::timeout(READ_TIMEOUT, wire::recv(stream, 0)).await {
        Ok(Ok(m)) => m,
        Ok(Err(e)) if e.is_malformed() => {
            return Err(err(ErrorCode::Decode, format!("reading the request: {e}")));
        }
        Ok(Err(e)) => return Err(err(ErrorCode::Io, format!("reading the request: {e}"))),
        Err(_) => {
            return Err(err(
                ErrorCode::Io,
                format!("no complete request within {} s", READ_TIMEOUT.as_secs()),
            ));
        }
    };
    let req: Request = serde_json::from_value(msg.header).map_err(|e| {
        err(
            ErrorCode::Decode,
            format!("the request is not understood: {e}"),
        )
    })?;
    let mut fds = msg.fds;
    let want = usize::from(req.op != Op::Del);
    if fds.len() != want || req.fds != want {
        return Err(err(
            ErrorCode::Decode,
            format!(
                "{:?} carries {} descriptor(s) (header says {}): want {want}",
                req.op,
                fds.len(),
                req.fds
            ),
        ));
    }
    Ok((req, fds.pop()))
}

async fn dispatch(
    ctx: &Ctx,
    req: &Request,
    fd: Option<OwnedFd>,
) -> Result<Option<Attached>, CniError> {
    check_request(ctx, req)?;
    match (req.op, fd) {
        (Op::Add, Some(fd)) => add(ctx, req, fd.as_fd()).await.map(Some),
        (Op::Check, Some(fd)) => check(ctx, req, fd.as_fd()).await.map(|()| None),
        (Op::Del, None) => del(ctx, req).await.map(|()| None),
        _ => unreachable!("read_request checked the descriptors"),
    }
}

/// The fields every operation carries.
fn check_request(ctx: &Ctx, req: &Request) -> Result<(), CniError> {
    if req.network != ctx.network {
        return Err(err(
            ErrorCode::InvalidConfig,
            format!(
                "network {:?} is not served by the ferry agent of host {} (it serves {:?}: \
                 its cni_network)",
                req.network, ctx.host, ctx.network
            ),
        ));
    }
    spec::validate_container_id(&req.container_id)
        .map_err(|e| err(ErrorCode::InvalidEnv, format!("CNI_CONTAINERID: {e}")))?;
    spec::validate_ifname(&req.ifname)
        .map_err(|e| err(ErrorCode::InvalidEnv, format!("CNI_IFNAME: {e}")))?;
    Ok(())
}

/// The MAC asked for, checked as the registry would.
fn requested_mac(req: &Request) -> Result<Option<MacAddr>, CniError> {
    let Some(s) = &req.mac else {
        return Ok(None);
    };
    let mac: MacAddr = s
        .parse()
        .map_err(|e: String| err(ErrorCode::InvalidConfig, format!("mac: {e}")))?;
    let why = if mac.is_zero() {
        Some("is all zeros")
    } else if !mac.is_unicast() {
        Some("is a multicast address: want a unicast MAC")
    } else if mac.is_ferry_reserved() {
        Some("is reserved: ferry's gateway and VXLAN devices use 0e:fe:…")
    } else {
        None
    };
    match why {
        Some(why) => Err(err(ErrorCode::AddressNotUsable, format!("mac {mac} {why}"))),
        None => Ok(Some(mac)),
    }
}

/// The namespace given must be one, not the host's, and free of `ifname`.
async fn check_namespace(fd: BorrowedFd<'_>, ifname: &str) -> Result<(), CniError> {
    if !netns::is_netns(fd) {
        return Err(err(
            ErrorCode::InvalidEnv,
            "CNI_NETNS is not a network namespace",
        ));
    }
    let own = netns::ns_id(Path::new("/proc/self/ns/net")).ok();
    if netns::fd_ns_id(fd).ok() == own {
        return Err(err(
            ErrorCode::InvalidEnv,
            "CNI_NETNS is the host's own network namespace, not a container's",
        ));
    }
    let inner = Netlink::open_in(&netns::fd_path(fd))
        .await
        .map_err(|e| err(ErrorCode::Io, format!("inside the namespace: {e}")))?;
    if inner
        .link_index(ifname)
        .await
        .map_err(|e| err(ErrorCode::Io, format!("inside the namespace: {e}")))?
        .is_some()
    {
        return Err(err(
            ErrorCode::InterfaceExists,
            format!("the container's namespace already has an interface {ifname}"),
        ));
    }
    Ok(())
}

/// A gateway error as a CNI error: conflicts are "in use", unusable addresses are named, an
/// unreachable gateway is "try again later".
fn gateway_error(what: &str, e: ApiError) -> CniError {
    let code = match e.code() {
        Some("conflict" | "duplicate_endpoint") => ErrorCode::AddressInUse,
        Some("invalid_address") => ErrorCode::AddressNotUsable,
        // This host is not (yet) registered: its agent is still starting.
        Some("unknown_host") => ErrorCode::TryAgainLater,
        Some(_) => ErrorCode::Refused,
        None => match e {
            ApiError::Connect { .. }
            | ApiError::Timeout { .. }
            | ApiError::Io { .. }
            | ApiError::Protocol { .. } => ErrorCode::TryAgainLater,
            _ => ErrorCode::Io,
        },
    };
    err(code, format!("{what}: {e}"))
}

fn attached_result(
    ip: Ipv4Addr,
    overlay6: Option<ipnet::Ipv6Net>,
    built: &Built,
    migration: Option<String>,
) -> Attached {
    Attached {
        ip6: overlay6.map(|p| ferry_config::overlay_ipv6(p, ip)),
        gateway6: overlay6.map(|_| ferry_overlay::netlink::CONTAINER_GATEWAY6),
        ip,
        prefix_len: 32,
        gateway: CONTAINER_GATEWAY,
        ifname: built.ifname.clone(),
        mac: built.mac.clone(),
        host_if: built.host_if.clone(),
        host_mac: MacAddr(GATEWAY_MAC).to_string(),
        migration,
    }
}

/// The IPv4 address an ADD asks for: `ip`, or the one an IPv6 address asked for carries (its
/// last 32 bits, on a dual-stack overlay). Both given: they must be one endpoint's.
fn requested_ip(
    overlay6: Option<ipnet::Ipv6Net>,
    req: &Request,
) -> Result<Option<Ipv4Addr>, CniError> {
    let Some(ip6) = req.ip6 else {
        return Ok(req.ip);
    };
    let Some(prefix) = overlay6 else {
        return Err(err(
            ErrorCode::AddressNotUsable,
            format!("ip {ip6}: the overlay is IPv4 only (no overlay6_cidr)"),
        ));
    };
    if !prefix.contains(&ip6) {
        return Err(err(
            ErrorCode::AddressNotUsable,
            format!("ip {ip6} is outside the overlay's IPv6 prefix {prefix}"),
        ));
    }
    let o = ip6.octets();
    let v4 = Ipv4Addr::new(o[12], o[13], o[14], o[15]);
    match req.ip {
        Some(ip) if ip != v4 => Err(err(
            ErrorCode::AddressNotUsable,
            format!(
                "ips {ip} and {ip6} are not one endpoint's (its IPv6 address would be {})",
                ferry_config::overlay_ipv6(prefix, ip)
            ),
        )),
        _ => Ok(Some(v4)),
    }
}

async fn add(ctx: &Ctx, req: &Request, fd: BorrowedFd<'_>) -> Result<Attached, CniError> {
    let mac = requested_mac(req)?;
    let requested = requested_ip(ctx.overlay6, req)?;
    if let Some(ip) = requested
        && !ctx.overlay.contains(&ip)
    {
        return Err(err(
            ErrorCode::AddressNotUsable,
            format!("ip {ip} is outside the overlay {}", ctx.overlay),
        ));
    }
    if let Some(a) = ctx.attached.find(&req.container_id, &req.ifname) {
        return Err(err(
            ErrorCode::Refused,
            format!(
                "container {} has {} attached already (address {}): DEL it first",
                req.container_id, req.ifname, a.ip
            ),
        ));
    }
    check_namespace(fd, &req.ifname).await?;
    let alloc = ctx
        .client
        .ipam_allocate(&IpamAllocateRequest {
            host: ctx.host.clone(),
            container_id: req.container_id.clone(),
            ifname: req.ifname.clone(),
            ip: requested,
        })
        .await
        .map_err(|e| gateway_error("the gateway's IPAM", e))?;
    if alloc.migration.is_some() {
        return attach_to_migration(ctx, req, fd, mac, alloc).await;
    }
    let ip = alloc.ip;
    if !alloc.changed
        && let Some(node) = left_by_its_runtime(ctx, ip).await
    {
        return reattach(ctx, req, fd, mac, ip, node).await;
    }
    info!(%ip, new = alloc.changed, "address allocated");
    let mut registered = false;
    match add_new(ctx, req, fd, ip, mac, &mut registered).await {
        Ok(a) => Ok(a),
        // Only what this ADD made is undone: a lease it did not create (a repeated request)
        // and an endpoint it did not register stay as they were.
        Err(e) => Err(undo_add(ctx, req, ip, alloc.changed || registered, e).await),
    }
}

/// Attaches, registers, waits; `registered` says whether the endpoint is this ADD's.
async fn add_new(
    ctx: &Ctx,
    req: &Request,
    fd: BorrowedFd<'_>,
    ip: Ipv4Addr,
    mac: Option<MacAddr>,
    registered: &mut bool,
) -> Result<Attached, CniError> {
    let a = Attachment {
        ip,
        container_id: req.container_id.clone(),
        ifname: req.ifname.clone(),
        network: req.network.clone(),
        netns_dev: 0,
        netns_ino: 0,
        runtime_netns: req.netns.clone(),
    };
    {
        let node = ctx.node.lock().await;
        node.net.attach(a, fd).await.map_err(|e| {
            // The agent has a container of that address already (an endpoint the registry
            // placed here before the lease): the address is not this container's to take.
            let code = if e.is_already_exists() {
                ErrorCode::AddressInUse
            } else {
                ErrorCode::Io
            };
            err(code, format!("attaching the namespace: {e}"))
        })?;
    }
    ctx.client
        .add_endpoints(&[EndpointSpec {
            ip,
            host: ctx.host.clone(),
            mac,
        }])
        .await
        .map_err(|e| gateway_error("registering the endpoint", e))?;
    *registered = true;
    // The registry's version now is at least the registration's.
    let version = ctx
        .client
        .version()
        .await
        .map_err(|e| gateway_error("the registry's version", e))?;
    let built = wait_built(ctx, ip, version).await?;
    Ok(attached_result(ip, ctx.overlay6, &built, None))
}

/// Waits until this agent's apply has built container `ip` into its attached namespace.
/// Fails as soon as the agent applied a snapshot of `version` or newer without building it.
async fn wait_built(ctx: &Ctx, ip: Ipv4Addr, version: u64) -> Result<Built, CniError> {
    let deadline = tokio::time::Instant::now() + APPLY_TIMEOUT;
    loop {
        {
            let n = ctx.node.lock().await;
            if let Some((_, b)) = n.applied.containers.get(&ip) {
                return Ok(b.clone());
            }
            let seen = n.registry.as_ref().map_or(0, |s| s.version);
            if seen >= version {
                let why = ctx
                    .attached
                    .take_error(ip)
                    .unwrap_or_else(|| "see the agent's log".into());
                return Err(err(
                    ErrorCode::Io,
                    format!("building the network of {ip} failed: {why}"),
                ));
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(err(
                ErrorCode::TryAgainLater,
                format!(
                    "the agent did not apply registry version {version} within {} s",
                    APPLY_TIMEOUT.as_secs()
                ),
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Waits until this agent applied a snapshot of `version` or newer without container `ip`.
async fn wait_removed(ctx: &Ctx, ip: Ipv4Addr, version: u64) -> Result<(), CniError> {
    let deadline = tokio::time::Instant::now() + APPLY_TIMEOUT;
    loop {
        {
            let n = ctx.node.lock().await;
            let seen = n.registry.as_ref().map_or(0, |s| s.version);
            if seen >= version && !n.applied.containers.contains_key(&ip) {
                return Ok(());
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(err(
                ErrorCode::TryAgainLater,
                format!(
                    "the agent did not remove {ip} (registry version {version}) within {} s",
                    APPLY_TIMEOUT.as_secs()
                ),
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// A failed ADD leaves nothing: the lease and the endpoint (`release`: if this ADD made
/// either) are released in one change, the agent applies the removal (the veth goes), the
/// name is unmounted. What could not be undone is added to the error's details.
async fn undo_add(ctx: &Ctx, req: &Request, ip: Ipv4Addr, release: bool, e: CniError) -> CniError {
    let mut left = Vec::new();
    let released = if release {
        ctx.client
            .ipam_release(&IpamReleaseRequest {
                host: ctx.host.clone(),
                container_id: req.container_id.clone(),
                ip,
            })
            .await
    } else {
        Ok(ferry_api::IpamRelease {
            ip,
            lease: None,
            endpoint: None,
            changed: false,
            version: 0,
        })
    };
    match released {
        Ok(r) => {
            if r.endpoint.is_some()
                && let Err(w) = wait_removed(ctx, ip, r.version).await
            {
                left.push(w.msg);
            }
        }
        Err(r) => left.push(format!("releasing {ip}: {r}")),
    }
    {
        let node = ctx.node.lock().await;
        // Normally gone with the endpoint's removal; if that was not applied, the veth goes
        // now (it is the agent's; the namespace is the runtime's).
        if !node.applied.containers.contains_key(&ip)
            && let Err(d) = node
                .net
                .nl
                .delete_link(&crate::plan::container_host_if(ip))
                .await
        {
            left.push(d.to_string());
        }
        if let Err(d) = node.net.detach(ip).await {
            left.push(d.to_string());
        }
    }
    if left.is_empty() {
        info!(%ip, "failed ADD undone");
        e
    } else {
        warn!(%ip, left = ?left, "a failed ADD could not be undone entirely");
        let details = format!("cleaning up failed too: {}", left.join("; "));
        e.with_details(details)
    }
}

/// ADD on a migration's destination: the runtime's namespace replaces the prepared one (see
/// the module's doc, step 6). Nothing is allocated or registered.
async fn attach_to_migration(
    ctx: &Ctx,
    req: &Request,
    fd: BorrowedFd<'_>,
    mac: Option<MacAddr>,
    alloc: IpamAllocation,
) -> Result<Attached, CniError> {
    let ip = alloc.ip;
    let id = alloc.migration.unwrap_or_default();
    if let (Some(want), Some(ep)) = (mac, &alloc.endpoint)
        && want != ep.mac
    {
        return Err(err(
            ErrorCode::Refused,
            format!(
                "{ip} arrives with migration {id} with MAC {}, not {want}",
                ep.mac
            ),
        ));
    }
    // The prepare reaches this agent through its watch: wait until it built the container.
    let deadline = tokio::time::Instant::now() + APPLY_TIMEOUT;
    let mut node = loop {
        let n = ctx.node.lock().await;
        let arrived = n.registry.as_ref().is_some_and(|s| {
            s.migrations.iter().any(|m| {
                m.id == id
                    && m.to == ctx.host
                    && matches!(m.phase, MigrationPhase::Prepared | MigrationPhase::Frozen)
            })
        });
        if arrived && n.applied.containers.contains_key(&ip) {
            break n;
        }
        drop(n);
        if tokio::time::Instant::now() >= deadline {
            return Err(err(
                ErrorCode::TryAgainLater,
                format!(
                    "{ip} arrives with migration {id}, but this agent has not built it within \
                     {} s",
                    APPLY_TIMEOUT.as_secs()
                ),
            ));
        }
        tokio::time::sleep(POLL).await;
    };
    let what = format!("migration {id}");
    let built = attach_built(ctx, req, fd, &mut node, ip, &what).await?;
    info!(%ip, migration = %id, "attached to the prepared container; its packets stay held until the release");
    Ok(attached_result(ip, ctx.overlay6, &built, Some(id)))
}

/// The agent's lock if container `ip` is an endpoint of this host that no runtime has
/// attached and whose (agent-made) namespace runs nothing: a container whose runtime let go
/// of it while a migration held its endpoint here (Podman's DEL after its checkpoint; a
/// destination's restore that gave up), and that the migration left here (aborted). Its
/// runtime, restoring it here, takes it back as it was: same endpoint, veth, MAC and
/// public mappings; nothing is registered or removed.
async fn left_by_its_runtime(ctx: &Ctx, ip: Ipv4Addr) -> Option<tokio::sync::MutexGuard<'_, Node>> {
    let node = ctx.node.lock().await;
    let snap = node.registry.as_ref()?;
    let here = snap
        .endpoints
        .iter()
        .any(|e| e.ip == ip && e.host == ctx.host);
    let migrating = snap
        .migrations
        .iter()
        .any(|m| m.container == ip && m.phase.is_active());
    let (_, built) = node.applied.containers.get(&ip)?;
    let idle = netns::pids_in(&built.netns).is_ok_and(|p| p.is_empty());
    (here && !migrating && idle && ctx.attached.get(ip).is_none()).then_some(node)
}

/// ADD of a container that its runtime restores on the host it left (see
/// [`left_by_its_runtime`]): the runtime's namespace replaces the agent's.
async fn reattach(
    ctx: &Ctx,
    req: &Request,
    fd: BorrowedFd<'_>,
    mac: Option<MacAddr>,
    ip: Ipv4Addr,
    mut node: tokio::sync::MutexGuard<'_, Node>,
) -> Result<Attached, CniError> {
    let ep_mac = node
        .registry
        .as_ref()
        .and_then(|s| s.endpoints.iter().find(|e| e.ip == ip).map(|e| e.mac));
    if let (Some(want), Some(have)) = (mac, ep_mac)
        && want != have
    {
        return Err(err(
            ErrorCode::Refused,
            format!("{ip} lives on this host with MAC {have}, not {want}"),
        ));
    }
    let built = attach_built(ctx, req, fd, &mut node, ip, "its endpoint on this host").await?;
    info!(%ip, container = %req.container_id, "the runtime took its container back on this host");
    Ok(attached_result(ip, ctx.overlay6, &built, None))
}

/// Moves the veth of the built container `ip` (its agent-made or prepared namespace) into
/// the runtime's namespace `fd` and records the attachment; `what` names the container's
/// situation in errors.
async fn attach_built(
    ctx: &Ctx,
    req: &Request,
    fd: BorrowedFd<'_>,
    node: &mut tokio::sync::MutexGuard<'_, Node>,
    ip: Ipv4Addr,
    what: &str,
) -> Result<Built, CniError> {
    let (c, built): (LocalContainer, Built) = node.applied.containers[&ip].clone();
    if let Some(a) = ctx.attached.get(ip) {
        return Err(err(
            ErrorCode::AddressInUse,
            format!(
                "{ip} ({what}) is attached already, to container {} ({})",
                a.container_id, a.ifname
            ),
        ));
    }
    let pids = netns::pids_in(&built.netns).unwrap_or_default();
    if !pids.is_empty() {
        return Err(err(
            ErrorCode::Refused,
            format!(
                "the namespace of {ip} ({what}) already runs processes {pids:?}: it was \
                 restored by another runtime"
            ),
        ));
    }
    let a = Attachment {
        ip,
        container_id: req.container_id.clone(),
        ifname: req.ifname.clone(),
        network: req.network.clone(),
        netns_dev: 0,
        netns_ino: 0,
        runtime_netns: req.netns.clone(),
    };
    let a = node
        .net
        .attach_prepared(&c, &built, a, fd)
        .await
        .map_err(|e| err(ErrorCode::Io, format!("attaching to {what}: {e}")))?;
    let entry = node
        .applied
        .containers
        .get_mut(&ip)
        .expect("held under the lock");
    entry.1.ifname = a.ifname.clone();
    Ok(entry.1.clone())
}

/// Where the registry (as this agent last saw it) puts an attached container.
#[derive(Debug, PartialEq, Eq)]
enum Owner {
    /// On this host, no migration involves it: the DEL releases it.
    Here,
    /// On another host, or migrating: the DEL only detaches locally.
    Elsewhere(String),
    /// Not an endpoint (an ADD that failed half-way, or removed by the operator).
    Nowhere,
}

fn owner(host: &str, snap: Option<&ferry_api::Snapshot>, ip: Ipv4Addr) -> Owner {
    let Some(s) = snap else {
        return Owner::Nowhere;
    };
    if let Some(m) = s
        .migrations
        .iter()
        .find(|m| m.container == ip && m.phase.is_active())
    {
        return Owner::Elsewhere(format!(
            "migration {} ({} → {}, {}) involves it",
            m.id, m.from, m.to, m.phase
        ));
    }
    match s.endpoints.iter().find(|e| e.ip == ip) {
        Some(e) if e.host == host => Owner::Here,
        Some(e) => Owner::Elsewhere(format!("it lives on host {} now", e.host)),
        None => Owner::Nowhere,
    }
}

async fn del(ctx: &Ctx, req: &Request) -> Result<(), CniError> {
    let Some(a) = ctx.attached.find(&req.container_id, &req.ifname) else {
        info!("nothing attached: done");
        return Ok(());
    };
    let ip = a.ip;
    let snap = ctx.node.lock().await.registry.clone();
    let release = match owner(&ctx.host, snap.as_deref(), ip) {
        Owner::Elsewhere(why) => {
            info!(%ip, %why, "detaching locally only: the registry entry stays");
            false
        }
        Owner::Here | Owner::Nowhere => true,
    };
    if release {
        let r = ctx
            .client
            .ipam_release(&IpamReleaseRequest {
                host: ctx.host.clone(),
                container_id: req.container_id.clone(),
                ip,
            })
            .await;
        match r {
            Ok(r) if r.endpoint.is_some() => wait_removed(ctx, ip, r.version).await?,
            Ok(_) => {}
            // The gateway knows better than this agent's snapshot: it moved or migrates.
            Err(e) if e.code() == Some("conflict") => {
                info!(%ip, error = %e, "the gateway keeps the endpoint: detaching locally only");
            }
            Err(e) => return Err(gateway_error("releasing the address", e)),
        }
    }
    let mut node = ctx.node.lock().await;
    node.net
        .detach(ip)
        .await
        .map_err(|e| err(ErrorCode::Io, format!("detaching {ip}: {e}")))?;
    // A container the registry still wants here (a migration's destination whose restore
    // gave up; a source whose runtime deleted its copy after the checkpoint) gets an
    // agent-made namespace again now, held as before, so a runtime's next ADD (a restore
    // tried again; a rollback restoring on the source) attaches to it.
    if node.applied.containers.contains_key(&ip) {
        let want = node.desired(&ctx.cfg, node.registry.as_deref());
        let errors = node.apply(&want).await;
        if errors.is_empty() {
            info!(%ip, "still wanted here: rebuilt in a namespace of the agent's");
        } else {
            warn!(%ip, ?errors, "rebuilding a container its runtime let go of");
        }
    }
    Ok(())
}

async fn check(ctx: &Ctx, req: &Request, fd: BorrowedFd<'_>) -> Result<(), CniError> {
    let Some(a) = ctx.attached.find(&req.container_id, &req.ifname) else {
        return Err(err(
            ErrorCode::UnknownContainer,
            format!(
                "container {} has no {} attached on host {}",
                req.container_id, req.ifname, ctx.host
            ),
        ));
    };
    let node = ctx.node.lock().await;
    let Some((c, built)) = node.applied.containers.get(&a.ip) else {
        return Err(err(
            ErrorCode::NotAsAdded,
            format!(
                "{} of container {} ({}) has no network on host {} any more (endpoint removed?)",
                req.ifname, req.container_id, a.ip, ctx.host
            ),
        ));
    };
    let problems = node
        .net
        .check(c, built, fd)
        .await
        .map_err(|e| err(ErrorCode::Io, format!("checking {}: {e}", a.ip)))?;
    if problems.is_empty() {
        Ok(())
    } else {
        Err(err(
            ErrorCode::NotAsAdded,
            format!("{} of {}: {}", req.ifname, a.ip, problems.join("; ")),
        ))
    }
}

#[cfg(test)]
mod tests {
    use ferry_api::{Endpoint, Migration, MigrationPhase, Snapshot};

    use super::*;

    /// An IPv6 address asked for names its IPv4 endpoint; both given must agree.
    #[test]
    fn an_ipv6_address_asked_for_is_its_ipv4_endpoints() {
        let p: ipnet::Ipv6Net = "2001:db8:f::/96".parse().unwrap();
        let mut r = req(None);
        assert_eq!(requested_ip(Some(p), &r).unwrap(), None);
        r.ip6 = Some("2001:db8:f::af4:105".parse().unwrap());
        let v4 = Some(Ipv4Addr::new(10, 244, 1, 5));
        assert_eq!(requested_ip(Some(p), &r).unwrap(), v4);
        r.ip = v4;
        assert_eq!(requested_ip(Some(p), &r).unwrap(), v4);
        r.ip = Some(Ipv4Addr::new(10, 244, 1, 6));
        let e = requested_ip(Some(p), &r).unwrap_err();
        assert!(e.msg.contains("not one endpoint's"), "{e}");
        assert!(
            requested_ip(None, &r)
                .unwrap_err()
                .msg
                .contains("IPv4 only")
        );
        r.ip6 = Some("2001:db8:9::af4:106".parse().unwrap());
        r.ip = None;
        assert!(
            requested_ip(Some(p), &r)
                .unwrap_err()
                .msg
                .contains("outside")
        );
    }

    fn req(mac: Option<&str>) -> Request {
        Request {
            op: Op::Add,
            cni_version: "1.0.0".into(),
            network: "ferry".into(),
            container_id: "c1".into(),
            ifname: "eth0".into(),
            netns: None,
            ip: None,
            ip6: None,
            mac: mac.map(str::to_owned),
            fds: 1,
        }
    }

    #[test]
    fn a_requested_mac_is_checked_as_the_registry_would() {
        assert_eq!(requested_mac(&req(None)), Ok(None));
        assert_eq!(
            requested_mac(&req(Some("02:00:00:00:00:01")))
                .unwrap()
                .map(|m| m.to_string()),
            Some("02:00:00:00:00:01".into())
        );
        for (mac, code, want) in [
            (
                "00:00:00:00:00:00",
                ErrorCode::AddressNotUsable,
                "all zeros",
            ),
            (
                "01:00:5e:00:00:01",
                ErrorCode::AddressNotUsable,
                "multicast",
            ),
            ("0e:fe:00:00:00:01", ErrorCode::AddressNotUsable, "reserved"),
            ("0e:fe", ErrorCode::InvalidConfig, "invalid MAC"),
        ] {
            let e = requested_mac(&req(Some(mac))).unwrap_err();
            assert_eq!(e.code, code, "{mac}: {e}");
            assert!(e.msg.contains(want), "{mac}: {e}");
        }
    }

    #[test]
    fn gateway_answers_become_cni_codes() {
        let http = |code: &str| ApiError::Http {
            status: 409,
            code: Some(code.into()),
            message: "m".into(),
            migration: None,
        };
        for (code, want) in [
            ("conflict", ErrorCode::AddressInUse),
            ("duplicate_endpoint", ErrorCode::AddressInUse),
            ("invalid_address", ErrorCode::AddressNotUsable),
            ("unknown_host", ErrorCode::TryAgainLater),
            ("forbidden", ErrorCode::Refused),
        ] {
            assert_eq!(gateway_error("x", http(code)).code, want, "{code}");
        }
        let down = ApiError::Connect {
            addr: "198.18.0.10:7400".parse().unwrap(),
            source: std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        };
        let e = gateway_error("the gateway's IPAM", down);
        assert_eq!(e.code, ErrorCode::TryAgainLater);
        assert!(e.msg.starts_with("the gateway's IPAM: "), "{e}");
    }

    /// DEL releases only a container this host owns and no migration involves.
    #[test]
    fn del_releases_only_what_lives_here_and_does_not_migrate() {
        let ip: Ipv4Addr = "10.244.0.5".parse().unwrap();
        let ep = |host: &str| Endpoint {
            ip,
            host: host.into(),
            mac: MacAddr::for_container(ip),
        };
        let snap = |host: &str, phase: Option<MigrationPhase>| Snapshot {
            version: 3,
            overlay_cidr: "10.244.0.0/16".parse().unwrap(),
            overlay6_cidr: None,
            vni: 4242,
            hosts: vec![],
            endpoints: vec![ep(host)],
            public: vec![],
            migrations: phase
                .map(|p| Migration::new("m1", ip, "a1", "b1", p))
                .into_iter()
                .collect(),
        };
        assert_eq!(owner("a1", Some(&snap("a1", None)), ip), Owner::Here);
        assert_eq!(owner("a1", None, ip), Owner::Nowhere);
        let other: Ipv4Addr = "10.244.0.6".parse().unwrap();
        assert_eq!(owner("a1", Some(&snap("a1", None)), other), Owner::Nowhere);
        for (host, on, phase, why) in [
            ("a1", "b1", None, "lives on host b1"),
            ("a1", "a1", Some(MigrationPhase::Frozen), "migration m1"),
            ("b1", "a1", Some(MigrationPhase::Prepared), "migration m1"),
        ] {
            match owner(host, Some(&snap(on, phase)), ip) {
                Owner::Elsewhere(w) => assert!(w.contains(why), "{w}"),
                o => panic!("{host}: {o:?}"),
            }
        }
        // Released (forwarding grace): the destination owns it, the source does not.
        let released = snap("b1", Some(MigrationPhase::Released));
        assert_eq!(owner("b1", Some(&released), ip), Owner::Here);
        assert!(matches!(
            owner("a1", Some(&released), ip),
            Owner::Elsewhere(_)
        ));
    }
}
