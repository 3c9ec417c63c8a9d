//! The socket hand-off API: a process moves its own established TCP connections, plus any
//! state it likes, to the same container on another host, without CRIU. The source process
//! hands its sockets to its agent, which dumps them with TCP repair (`ferry-tcp-repair`) and
//! sends them to the destination agent; there the new process claims them and gets sockets
//! restored inside the container's network namespace, in the same order, with the state.
//!
//! It runs inside a ferry migration: `ferry migrate prepare` (the destination builds the
//! container and holds its packets), `ferry migrate freeze` (every host sends to the
//! destination; the source forwards there and drops what the old copy emits), then **export**
//! on the source and **claim** on the destination, then `ferry migrate release`. An export is
//! refused unless the container's migration to that host is frozen and applied here: a socket
//! in repair mode still acknowledges what arrives, so a dump taken while packets still reach
//! it would lose those bytes.
//!
//! # The Unix socket (`handoff_socket`, mode 0600)
//!
//! One request per connection, one reply. A message (both directions) is
//!
//! ```text
//! u32 big-endian L | L bytes: JSON header | ⌈fds/253⌉ carrier bytes | state_len bytes
//! ```
//!
//! where the header's `fds` field (absent: 0) counts the file descriptors, sent as
//! SCM_RIGHTS on the carrier bytes, at most 253 per carrier, in order; and `state_len`
//! (absent: 0) is the length of the payload that follows. A client needs no more than std and
//! rustix: `ferry_workload::wire` is one.
//!
//! - **export** (source): `{"op":"export","container":"10.244.1.10","to":"b1","fds":N,
//!   "state_len":S}` + N established TCP sockets + S bytes of opaque state. The agent checks
//!   every socket first (TCP, a movable state, the container's own address) and refuses the
//!   whole request, naming the first bad socket's index and state, before touching any;
//!   checks the migration; dumps them all (if one fails, those already dumped leave repair mode
//!   again); sends `{container, from, sockets: [TcpState], state: base64}` to the destination
//!   agent; and answers `{"ok":true,"sockets":N,"state_bytes":S,"dump_ms":..,"transfer_ms":..}`
//!   only once the destination stored it. If the transfer fails every socket leaves repair mode
//!   and the process can carry on. After `ok` the sockets are in repair mode: the process closes
//!   them (nothing is sent) and exits.
//! - **claim** (destination): `{"op":"claim","container":"10.244.1.10","timeout_ms":5000}`. The
//!   container must be built on this host (prepared). The agent waits up to `timeout_ms`
//!   (default 5000, at most 60000) for the package, restores every socket inside the
//!   container's network namespace (on a thread that enters it), and answers
//!   `{"ok":true,"sockets":N,"fds":N,"state_len":S,"restore_ms":..,"waited_ms":..}` + the N sockets in
//!   the exported order + the state. A package is handed out once; if the restore or the
//!   reply fails the restored sockets are put back into repair mode and closed (silently) and
//!   the package can be claimed again.
//! - Errors: `{"ok":false,"error":{"code":"...","message":"..."}}` (plus `"socket": i` when one
//!   socket is the reason). Codes: `bad_request` (malformed header, missing or unknown field,
//!   descriptors or state where none belong), `unknown_op`, `wrong_fd_count`, `not_local` (the
//!   container is not built on this host), `not_movable` (a socket that is not an established
//!   TCP connection of the container), `unknown_host`, `wrong_destination`, `not_frozen`,
//!   `no_peer_api` (no token: this agent has no `[gateway]`), `dump_failed`, `transfer_failed`,
//!   `no_package`, `already_claimed`, `being_claimed`, `restore_failed`, `internal`. A refused
//!   request changed nothing.
//!
//! # The peer API (`api_listen`, HTTP, the `[gateway]` token)
//!
//! `POST /v1/handoff/{container}` with a [`Package`] stores it (201) for a claim; refused
//! unless the container is built here (404 `not_local`) and the packages waiting fit in
//! `handoff_max_bytes` (507 `too_large`). `DELETE /v1/handoff/{container}` drops an unclaimed
//! package (a source rolling back a transfer whose answer it never got). Every agent must use
//! the same `api_listen` port: a source reaches the destination at the destination's VTEP (from
//! the registry snapshot, else the static `peers`) and its own `api_listen` port.

mod claim;
mod export;
mod peer;
mod server;
pub mod store;
pub mod wire;

use std::{
    net::{Ipv4Addr, SocketAddr},
    os::unix::fs::{FileTypeExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use ferry_api::MigrationPhase;
use serde_json::{Value, json};
use tokio::{
    net::UnixListener,
    sync::{Mutex, watch},
    task::JoinHandle,
};
use tracing::{Instrument as _, info, warn};

pub use peer::PeerError;
pub use store::Package;

use crate::{
    config::{AgentConfig, Peer},
    node::Node,
};

/// Largest state a process may export (and a claim may return).
pub const MAX_STATE_LEN: usize = 64 * 1024 * 1024;

/// Why a request was refused: `{"ok":false,"error":{"code","message"[,"socket"]}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HandoffError {
    pub code: &'static str,
    pub message: String,
    /// The index of the socket that is the reason, if one is.
    pub socket: Option<usize>,
}

impl HandoffError {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            socket: None,
        }
    }

    fn at_socket(mut self, i: usize) -> Self {
        self.socket = Some(i);
        self
    }

    /// The reply header.
    pub fn to_json(&self) -> Value {
        let mut error = json!({"code": self.code, "message": self.message});
        if let Some(i) = self.socket {
            error["socket"] = i.into();
        }
        json!({"ok": false, "error": error})
    }
}

/// Milliseconds, to the microsecond, for replies.
fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// What the hand-off tasks share.
pub(crate) struct Ctx {
    host: String,
    node: Arc<Mutex<Node>>,
    store: store::Store,
    /// The `[gateway]` token; also guards the peer API. None: no peer API.
    token: Option<String>,
    /// Our `api_listen` port, assumed to be every agent's.
    api_port: u16,
    peers: Vec<Peer>,
    /// Dual-stack overlay: its IPv6 prefix (a container's connections may use either address).
    overlay6: Option<ipnet::Ipv6Net>,
}

impl Ctx {
    /// The network namespace of a container built on this host.
    async fn local_netns(&self, ip: Ipv4Addr) -> Result<PathBuf, HandoffError> {
        let node = self.node.lock().await;
        node.applied
            .containers
            .get(&ip)
            .map(|(_, built)| built.netns.clone())
            .ok_or_else(|| {
                HandoffError::new(
                    "not_local",
                    format!(
                        "container {ip} is not built on host {} (a destination builds it with \
                         `ferry migrate prepare --container {ip} --to {}`)",
                        self.host, self.host
                    ),
                )
            })
    }

    fn token(&self) -> Result<&str, HandoffError> {
        self.token.as_deref().ok_or_else(|| {
            HandoffError::new(
                "no_peer_api",
                format!(
                    "host {} has no [gateway] section, so no token and no peer API: it cannot \
                     send packages to other agents",
                    self.host
                ),
            )
        })
    }

    /// The peer API of host `to`: its VTEP (registry, else static peers) and our API port.
    async fn destination(&self, to: &str) -> Result<SocketAddr, HandoffError> {
        let from_registry = {
            let node = self.node.lock().await;
            node.registry
                .as_ref()
                .and_then(|s| s.hosts.iter().find(|h| h.name == to).map(|h| h.vtep))
        };
        from_registry
            .or_else(|| self.peers.iter().find(|p| p.name == to).map(|p| p.vtep))
            .map(|vtep| SocketAddr::new(vtep.into(), self.api_port))
            .ok_or_else(|| {
                HandoffError::new(
                    "unknown_host",
                    format!("host {to:?} is neither in the registry nor among the static peers"),
                )
            })
    }

    /// The container's migration to `to` must be frozen, and applied by this agent.
    async fn require_frozen(&self, ip: Ipv4Addr, to: &str) -> Result<(), HandoffError> {
        let node = self.node.lock().await;
        let not_frozen = |m: String| HandoffError::new("not_frozen", m);
        let Some(snap) = node.registry.as_ref() else {
            return Err(not_frozen(format!(
                "host {} has no registry snapshot yet, so no frozen migration of {ip}",
                self.host
            )));
        };
        let why_first = "a socket in repair mode still acknowledges what arrives, so dumping \
                         before the freeze would lose those bytes";
        let m = snap
            .migrations
            .iter()
            .find(|m| m.container == ip && m.phase.is_active());
        match m {
            None => Err(not_frozen(format!(
                "container {ip} has no active migration: run `ferry migrate prepare --container \
                 {ip} --to {to}` and `ferry migrate freeze --container {ip}` first ({why_first})"
            ))),
            Some(m) if m.to != to => Err(HandoffError::new(
                "wrong_destination",
                format!("migration {} moves {ip} to {}, not to {to}", m.id, m.to),
            )),
            Some(m) if m.from != self.host => Err(HandoffError::new(
                "not_local",
                format!(
                    "migration {} moves {ip} from {}, not from this host ({})",
                    m.id, m.from, self.host
                ),
            )),
            Some(m) if m.phase != MigrationPhase::Frozen => Err(not_frozen(format!(
                "migration {} of {ip} is {}: run `ferry migrate freeze --container {ip}` first \
                 ({why_first})",
                m.id, m.phase
            ))),
            Some(m) if node.applied.version != snap.version => Err(not_frozen(format!(
                "migration {} is frozen in the registry (version {}) but this agent has applied \
                 only version {}: retry in a moment",
                m.id, snap.version, node.applied.version
            ))),
            Some(_) => Ok(()),
        }
    }
}

/// The running hand-off service: the Unix socket server, and the routes it adds to the peer
/// API (served by [`crate::peer_api`]).
pub struct Handoff {
    ctx: Arc<Ctx>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    socket: PathBuf,
}

impl Handoff {
    /// Binds the Unix socket and serves it. `token` is the `[gateway]` token: without one this
    /// agent has no peer API, so it can neither send nor receive packages.
    pub fn start(
        cfg: &AgentConfig,
        node: Arc<Mutex<Node>>,
        token: Option<String>,
    ) -> anyhow::Result<Self> {
        let ctx = Arc::new(Ctx {
            host: cfg.host.clone(),
            node,
            store: store::Store::new(cfg.handoff_max_bytes),
            token,
            api_port: cfg.api_listen.port(),
            peers: cfg.peers.clone(),
            overlay6: cfg.overlay6_cidr,
        });
        let unix = bind_unix(&cfg.handoff_socket)?;
        let (stop, stop_rx) = watch::channel(false);
        let serving = server::serve(unix, ctx.clone(), stop_rx);
        let task = tokio::spawn(serving.in_current_span());
        info!(socket = %cfg.handoff_socket.display(), "serving the hand-off socket");
        Ok(Self {
            ctx,
            stop,
            task,
            socket: cfg.handoff_socket.clone(),
        })
    }

    /// The peer API's routes for hand-off packages (`/v1/handoff/{container}`).
    pub fn routes(&self) -> axum::Router {
        peer::router(self.ctx.clone())
    }

    /// Stops serving (requests in progress are dropped), and removes the socket file.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
        if let Err(e) = std::fs::remove_file(&self.socket) {
            warn!(error = %e, socket = %self.socket.display(), "removing the hand-off socket");
        }
    }
}

/// Binds the hand-off socket (mode 0600), replacing a stale one nobody serves.
fn bind_unix(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        ferry_api::private::create_dir(dir)
            .with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                anyhow::bail!(
                    "handoff_socket {} is served by another process (another agent?)",
                    path.display()
                );
            }
            std::fs::remove_file(path)
                .with_context(|| format!("removing the stale {}", path.display()))?;
        }
        Ok(_) => anyhow::bail!(
            "handoff_socket {} exists and is not a socket",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("handoff_socket {}", path.display())),
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod 600 {}", path.display()))?;
    Ok(listener)
}
