//! Before CRIU dumps a container: its listeners drained, and no UNIX socket leading out.
//!
//! CRIU cannot dump a listening TCP socket with connections waiting in its accept queue
//! (`In-flight connection … --skip-in-flight`, which would drop them), and does not dump the
//! half-open ones (SYN_RECV request socks): the handshake's last ACK would reach the restored
//! listener and draw a reset. A server that accepts many short connections almost always has
//! some. So the source drains the container first ([`before_dump`]):
//!
//! 1. its `LOCAL` entry gets `HOLD_SYN` ([`Node::start_drain`]): new connections' SYNs wait
//!    in this host's hold device; everything else flows, the server runs and accepts;
//! 2. the agent waits, bounded (`[criu] drain_timeout_ms`), until every listening TCP socket
//!    in the container's network namespace has an empty accept queue and none is half-open
//!    ([`wait_drained`] over the [`Sockets`] seam; the real one is `sock_diag`);
//! 3. drained: the dump goes on; the freeze's switch makes the entry `FORWARD` and the held
//!    SYNs follow it to the destination (the apply's release steps), which holds them until
//!    its release. Not drained: the checkpoint fails before anything is frozen, the SYNs are
//!    delivered here ([`Node::end_drain`]), nothing is reset.
//!
//! And a UNIX socket whose peer no process of the container holds cannot be moved (CRIU fails
//! the dump after it froze the tasks): [`check_unix_peers`] refuses the checkpoint before.
//!
//! `sock_diag` by `netlink-packet-sock-diag` (the rust-netlink family's, the same
//! `netlink-packet-core` as our rtnetlink), over a netlink socket opened inside the
//! container's namespace (a socket keeps the namespace it was made in: no `setns` around an
//! `.await`).

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    extract::{Path as UrlPath, State},
    http::{HeaderMap, StatusCode},
    routing::post,
};
use netlink_packet_core::{
    NLM_F_DUMP, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_sock_diag::{
    AF_INET, AF_INET6, IPPROTO_TCP, IPPROTO_UDP, SockDiagMessage,
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags, nlas::Nla as InetNla},
    unix::{ShowFlags, StateFlags as UnixStates, UnixRequest, nlas::UnixDiagName},
};
use serde::Serialize;
use tokio::sync::Mutex;
use tracing::{info, warn};

use crate::{
    auth::{Refusal, authorize, container_ip},
    node::{
        DrainStartError, Node,
        pace::{RcvBuf, UdpBuffers},
    },
};

/// How often the queues are looked at while draining.
pub const POLL: Duration = Duration::from_millis(2);
/// A drain started through the peer API (`POST /v1/containers/{ip}/drain`, e.g. from a CRIU
/// `pre-dump` hook) that no freeze follows ends by itself after this long.
pub const API_DRAIN_LEASE: Duration = Duration::from_secs(30);

const TCP_SYN_RECV: u8 = 3;
const TCP_LISTEN: u8 = 10;

/// A listening TCP socket and the connections waiting in its accept queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Listener {
    pub local: SocketAddr,
    pub queued: u32,
}

/// What the listeners of a namespace hold, at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Backlog {
    pub listeners: Vec<Listener>,
    /// Half-open connections (SYN_RECV): (local, remote).
    pub half_open: Vec<(SocketAddr, SocketAddr)>,
}

impl Backlog {
    /// Nothing waiting to be accepted and nothing half-open.
    pub fn drained(&self) -> bool {
        self.half_open.is_empty() && self.listeners.iter().all(|l| l.queued == 0)
    }

    /// The listener with the most connections pending (queued, plus half-open to its port),
    /// and those two counts.
    pub fn worst(&self) -> Option<(SocketAddr, u32, u32)> {
        let half_open = |l: &Listener| {
            self.half_open
                .iter()
                .filter(|(local, _)| {
                    local.port() == l.local.port()
                        && (l.local.ip().is_unspecified() || same_ip(l.local.ip(), local.ip()))
                })
                .count() as u32
        };
        let mut best: Option<(SocketAddr, u32, u32)> = None;
        for l in &self.listeners {
            let h = half_open(l);
            if l.queued + h > 0 && best.is_none_or(|(_, q, hh)| l.queued + h > q + hh) {
                best = Some((l.local, l.queued, h));
            }
        }
        // Half-open connections to a port nothing listens on any more.
        best.or_else(|| self.half_open.first().map(|(local, _)| (*local, 0, 1)))
    }
}

/// `a` and `b` are the same address (an IPv4-mapped IPv6 one too).
fn same_ip(a: IpAddr, b: IpAddr) -> bool {
    let v4 = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    v4(a) == v4(b)
}

/// The seam: what the drain looks at. The real one is [`SockDiag`]; the unit tests script
/// one.
pub trait Sockets {
    /// The TCP listeners and half-open connections of the namespace, now.
    fn backlog(&mut self) -> std::io::Result<Backlog>;
}

/// How a wait went.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Drained {
    /// From the first look to the drained one.
    pub waited_ms: f64,
    /// How often the queues were looked at.
    pub looks: u32,
    /// Listening sockets seen at the end.
    pub listeners: usize,
}

/// Why [`wait_drained`] gave up.
#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    #[error("reading the sockets: {0}")]
    Read(#[from] std::io::Error),
    #[error("not drained after {waited:?}")]
    NotDrained { waited: Duration, last: Backlog },
}

/// Looks at the queues every `every` until they are drained, for `bound` at most (one more
/// look at the bound itself: a queue that empties just then counts).
pub async fn wait_drained<S: Sockets>(
    sockets: &mut S,
    bound: Duration,
    every: Duration,
) -> Result<Drained, WaitError> {
    let start = tokio::time::Instant::now();
    let deadline = start + bound;
    let mut looks = 0;
    loop {
        let b = sockets.backlog()?;
        looks += 1;
        if b.drained() {
            return Ok(Drained {
                waited_ms: start.elapsed().as_secs_f64() * 1e3,
                looks,
                listeners: b.listeners.len(),
            });
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Err(WaitError::NotDrained {
                waited: now - start,
                last: b,
            });
        }
        tokio::time::sleep_until((now + every).min(deadline)).await;
    }
}

/// Why a container could not be drained (nothing was frozen; the container runs on here).
#[derive(Debug, thiserror::Error)]
pub enum DrainError {
    #[error("draining container {ip}: {source}")]
    Start {
        ip: Ipv4Addr,
        source: DrainStartError,
    },
    #[error("draining container {ip}: opening sock_diag in {}: {source}", netns.display())]
    Open {
        ip: Ipv4Addr,
        netns: PathBuf,
        source: std::io::Error,
    },
    #[error("draining container {ip}: {source}")]
    Read {
        ip: Ipv4Addr,
        source: std::io::Error,
    },
    #[error(
        "container {ip} did not drain within {} ms: listener {listener} still has {queued} connection(s) waiting to be accepted and {half_open} half-open (the server is not accepting them); CRIU cannot move them, so nothing was frozen: the container runs on here and the {held} held connection attempt(s) were delivered to it",
        bound.as_millis()
    )]
    NotDrained {
        ip: Ipv4Addr,
        bound: Duration,
        listener: SocketAddr,
        queued: u32,
        half_open: u32,
        held: usize,
    },
}

impl DrainError {
    /// The error code of the peer API's answer.
    pub fn code(&self) -> &'static str {
        match self {
            DrainError::Start {
                source: DrainStartError::NoEntry(_) | DrainStartError::NotLocal { .. },
                ..
            } => "not_local",
            DrainError::Start {
                source: DrainStartError::AlreadyDraining(_),
                ..
            } => "conflict",
            DrainError::NotDrained { .. } => "not_drained",
            _ => "internal",
        }
    }

    fn status(&self) -> StatusCode {
        match self.code() {
            "not_local" => StatusCode::NOT_FOUND,
            "conflict" | "not_drained" => StatusCode::CONFLICT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// Drains container `ip` (network namespace `netns`) before its dump: new connections held,
/// then the wait. On success the drain stays on (the freeze's switch, or the caller's
/// [`Node::end_drain_of`], ends it) and its number is returned; on failure it has been ended
/// (the held SYNs delivered here). `bound` zero: no drain.
pub async fn before_dump(
    node: &Mutex<Node>,
    ip: Ipv4Addr,
    netns: &Path,
    bound: Duration,
) -> Result<Option<(u64, Drained)>, DrainError> {
    if bound.is_zero() {
        return Ok(None);
    }
    let mut sockets = SockDiag::open_in(netns)
        .await
        .map_err(|source| DrainError::Open {
            ip,
            netns: netns.to_owned(),
            source,
        })?;
    let number = node
        .lock()
        .await
        .start_drain(ip)
        .map_err(|source| DrainError::Start { ip, source })?;
    let waited = Instant::now();
    match wait_drained(&mut sockets, bound, POLL).await {
        Ok(d) => {
            info!(container = %ip, waited_ms = d.waited_ms, looks = d.looks, listeners = d.listeners, "drained: no connection waits in a listener");
            Ok(Some((number, d)))
        }
        Err(e) => {
            let held = node.lock().await.end_drain_of(ip, number).unwrap_or(0);
            let e = match e {
                WaitError::Read(source) => DrainError::Read { ip, source },
                WaitError::NotDrained { last, .. } => {
                    let (listener, queued, half_open) =
                        last.worst()
                            .unwrap_or((SocketAddr::new(IpAddr::V4(ip), 0), 0, 0));
                    DrainError::NotDrained {
                        ip,
                        bound,
                        listener,
                        queued,
                        half_open,
                        held,
                    }
                }
            };
            warn!(container = %ip, waited_ms = waited.elapsed().as_secs_f64() * 1e3, error = %e, "not drained");
            Err(e)
        }
    }
}

/// `sock_diag` over a netlink socket made inside a container's network namespace.
pub struct SockDiag {
    socket: netlink_sys::Socket,
    seq: u32,
}

impl SockDiag {
    /// Opens the socket on a thread inside `netns` (the socket stays in that namespace).
    pub async fn open_in(netns: &Path) -> std::io::Result<Self> {
        ferry_overlay::netns::run_in_async(netns, Self::open_here)
            .await
            .map_err(std::io::Error::other)?
    }

    /// Opens the socket in the calling thread's namespace.
    pub fn open_here() -> std::io::Result<Self> {
        let mut socket = netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_SOCK_DIAG)?;
        socket.bind_auto()?;
        socket.connect(&netlink_sys::SocketAddr::new(0, 0))?;
        Ok(Self { socket, seq: 0 })
    }

    /// One dump request; every answer.
    fn dump(&mut self, request: SockDiagMessage) -> std::io::Result<Vec<SockDiagMessage>> {
        self.seq = self.seq.wrapping_add(1);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        header.sequence_number = self.seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(request));
        packet.finalize();
        let mut buf = vec![0; packet.buffer_len()];
        packet.serialize(&mut buf);
        self.socket.send(&buf, 0)?;
        let mut out = Vec::new();
        let mut rx = vec![0u8; 1 << 16];
        loop {
            let n = self.socket.recv(&mut &mut rx[..], 0)?;
            let mut off = 0;
            while off < n {
                let msg = NetlinkMessage::<SockDiagMessage>::deserialize(&rx[off..n])
                    .map_err(|e| std::io::Error::other(format!("sock_diag answer: {e}")))?;
                let len = msg.header.length as usize;
                match msg.payload {
                    NetlinkPayload::Done(_) => return Ok(out),
                    NetlinkPayload::Error(e) => {
                        return Err(e.to_io());
                    }
                    NetlinkPayload::InnerMessage(m) => out.push(m),
                    _ => {}
                }
                if len == 0 {
                    break;
                }
                off += (len + 3) & !3;
            }
        }
    }

    /// UNIX sockets of the namespace: inode → (name, peer inode).
    pub fn unix_sockets(&mut self) -> std::io::Result<BTreeMap<u64, UnixSocket>> {
        let answers = self.dump(SockDiagMessage::UnixRequest(UnixRequest {
            state_flags: UnixStates::from_bits_retain(u32::MAX),
            inode: 0,
            show_flags: ShowFlags::NAME | ShowFlags::PEER,
            cookie: [0xff; 8],
        }))?;
        Ok(answers
            .into_iter()
            .filter_map(|m| match m {
                SockDiagMessage::UnixResponse(r) => Some((
                    u64::from(r.header.inode),
                    UnixSocket {
                        name: r.name().map(describe_name),
                        peer: r.peer().filter(|p| *p != 0).map(u64::from),
                    },
                )),
                _ => None,
            })
            .collect())
    }
}

impl SockDiag {
    /// The receive buffers of the UDP sockets (IPv4, and IPv6 ones that take IPv4 too) bound
    /// to one of `ports` on `ip` or on any address; several on one port: the one with the
    /// least room.
    pub fn udp_buffers(
        &mut self,
        ip: Ipv4Addr,
        ports: &[u16],
    ) -> std::io::Result<BTreeMap<u16, RcvBuf>> {
        let mut out: BTreeMap<u16, RcvBuf> = BTreeMap::new();
        for (family, id) in [
            (AF_INET, SocketId::new_v4()),
            (AF_INET6, SocketId::new_v6()),
        ] {
            let answers = self.dump(SockDiagMessage::InetRequest(InetRequest {
                family,
                protocol: IPPROTO_UDP,
                extensions: ExtensionFlags::SKMEMINFO,
                states: StateFlags::all(),
                socket_id: id,
            }))?;
            for m in answers {
                let SockDiagMessage::InetResponse(r) = m else {
                    continue;
                };
                let id = &r.header.socket_id;
                let local = id.source_address;
                if !ports.contains(&id.source_port)
                    || !(local.is_unspecified() || same_ip(local, IpAddr::V4(ip)))
                {
                    continue;
                }
                let Some(mem) = r.nlas.iter().find_map(|n| match n {
                    InetNla::MemInfo(m) => Some(RcvBuf {
                        used: m.receive_queue,
                        size: m.receive_queue_max,
                        drops: m.drops,
                    }),
                    _ => None,
                }) else {
                    continue;
                };
                out.entry(id.source_port)
                    .and_modify(|b| {
                        if mem.room() < b.room() {
                            *b = mem;
                        }
                    })
                    .or_insert(mem);
            }
        }
        Ok(out)
    }
}

/// A container's UDP receive buffers over `sock_diag` in its namespace (the paced release's
/// seam, [`UdpBuffers`]): the socket is opened at the first look, each look runs on the
/// blocking pool.
pub struct NetnsUdpBuffers {
    pub netns: PathBuf,
    diag: Option<SockDiag>,
}

impl NetnsUdpBuffers {
    pub fn new(netns: PathBuf) -> Self {
        Self { netns, diag: None }
    }
}

impl UdpBuffers for NetnsUdpBuffers {
    async fn look(
        &mut self,
        ip: Ipv4Addr,
        ports: &[u16],
    ) -> std::io::Result<BTreeMap<u16, RcvBuf>> {
        let mut diag = match self.diag.take() {
            Some(d) => d,
            None => SockDiag::open_in(&self.netns).await?,
        };
        let ports = ports.to_vec();
        let (diag, found) = tokio::task::spawn_blocking(move || {
            let found = diag.udp_buffers(ip, &ports);
            (diag, found)
        })
        .await
        .map_err(std::io::Error::other)?;
        self.diag = Some(diag);
        found
    }
}

impl Sockets for SockDiag {
    fn backlog(&mut self) -> std::io::Result<Backlog> {
        let mut b = Backlog::default();
        for (family, id) in [
            (AF_INET, SocketId::new_v4()),
            (AF_INET6, SocketId::new_v6()),
        ] {
            let answers = self.dump(SockDiagMessage::InetRequest(InetRequest {
                family,
                protocol: IPPROTO_TCP,
                extensions: ExtensionFlags::empty(),
                states: StateFlags::LISTEN | StateFlags::SYN_RECV,
                socket_id: id,
            }))?;
            for m in answers {
                let SockDiagMessage::InetResponse(r) = m else {
                    continue;
                };
                let h = &r.header;
                let local = SocketAddr::new(h.socket_id.source_address, h.socket_id.source_port);
                let remote = SocketAddr::new(
                    h.socket_id.destination_address,
                    h.socket_id.destination_port,
                );
                match h.state {
                    TCP_LISTEN => b.listeners.push(Listener {
                        local,
                        queued: h.recv_queue,
                    }),
                    TCP_SYN_RECV => b.half_open.push((local, remote)),
                    _ => {}
                }
            }
        }
        Ok(b)
    }
}

/// A UNIX socket as `unix_diag` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnixSocket {
    /// Its bound name (a path, or `@name` for an abstract one).
    pub name: Option<String>,
    /// The inode of its peer, if connected.
    pub peer: Option<u64>,
}

fn describe_name(n: &UnixDiagName) -> String {
    match n {
        UnixDiagName::Pathname(p) => p.to_string_lossy().into_owned(),
        UnixDiagName::Abstract(a) => format!("@{}", String::from_utf8_lossy(a)),
    }
}

/// Who holds a socket: a process and one of its descriptors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    pub pid: i32,
    pub fd: i32,
}

/// One UNIX socket of the container whose peer is not the container's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutsidePeer {
    pub socket: u64,
    pub holder: Holder,
    pub peer: u64,
}

/// Pure: the container's UNIX sockets (by inode, `held`) whose peer no process of the
/// container holds, in inode order.
pub fn outside_peers(
    held: &BTreeMap<u64, Holder>,
    unix: &BTreeMap<u64, UnixSocket>,
) -> Vec<OutsidePeer> {
    held.iter()
        .filter_map(|(ino, holder)| {
            let peer = unix.get(ino)?.peer?;
            (!held.contains_key(&peer)).then(|| OutsidePeer {
                socket: *ino,
                holder: holder.clone(),
                peer,
            })
        })
        .collect()
}

/// Why the checkpoint is refused (nothing was frozen).
#[derive(Debug, thiserror::Error)]
pub enum UnixPeerError {
    #[error(
        "container {ip}: its UNIX socket inode {inode} ({socket}; pid {pid} fd {fd}) is connected to UNIX socket inode {peer_inode} ({peer}), {holder}; CRIU cannot move one end of a connection without the other, so the checkpoint is refused before anything is frozen"
    )]
    Outside {
        ip: Ipv4Addr,
        socket: String,
        inode: u64,
        pid: i32,
        fd: i32,
        peer: String,
        peer_inode: u64,
        holder: String,
    },
    #[error("container {ip}: looking at its UNIX sockets: {source}")]
    Read {
        ip: Ipv4Addr,
        source: std::io::Error,
    },
}

/// The socket inodes the processes `pids` hold (from /proc/PID/fd).
fn socket_inodes(pids: &[i32]) -> BTreeMap<u64, Holder> {
    let mut out = BTreeMap::new();
    for &pid in pids {
        let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for e in dir.flatten() {
            let Some(fd) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            if let Some(ino) = std::fs::read_link(e.path()).ok().and_then(|l| {
                l.to_str()?
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .parse::<u64>()
                    .ok()
            }) {
                out.entry(ino).or_insert(Holder { pid, fd });
            }
        }
    }
    out
}

/// Who outside holds socket `ino`: a process (PID, comm), or none (`None`: not yet
/// accepted, or in flight).
fn find_holder(ino: u64) -> Option<(i32, String)> {
    let me = std::process::id() as i32;
    let pids: Vec<i32> = std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .filter(|p| *p != me)
                .collect()
        })
        .unwrap_or_default();
    pids.into_iter().find_map(|pid| {
        socket_inodes(&[pid]).contains_key(&ino).then(|| {
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            (pid, comm.trim().to_owned())
        })
    })
}

/// A socket's name for a message: its path or abstract name, or "unnamed".
fn shown(name: Option<&str>) -> String {
    name.map_or_else(|| "unnamed".to_owned(), str::to_owned)
}

/// Refuses a checkpoint of container `ip` (its processes `pids`, its network namespace
/// `netns`) if one of them holds a UNIX socket whose peer no process of the container holds.
/// The peer is looked for in the container's namespace and in the agent's own (a host
/// daemon's).
pub async fn check_unix_peers(
    ip: Ipv4Addr,
    pids: Vec<i32>,
    netns: &Path,
) -> Result<(), UnixPeerError> {
    let read = |source| UnixPeerError::Read { ip, source };
    let mut inside = SockDiag::open_in(netns).await.map_err(read)?;
    let found = tokio::task::spawn_blocking(move || -> std::io::Result<_> {
        let held = socket_inodes(&pids);
        let mut unix = inside.unix_sockets()?;
        // The agent's own namespace too: a socket a host process handed in, or the peer (a
        // host daemon's socket) whose name the error should say.
        if let Ok(mut here) = SockDiag::open_here()
            && let Ok(more) = here.unix_sockets()
        {
            for (k, v) in more {
                unix.entry(k).or_insert(v);
            }
        }
        let bad = outside_peers(&held, &unix);
        let Some(first) = bad.first().cloned() else {
            return Ok(None);
        };
        let holder = find_holder(first.peer);
        // The peer's name: from the namespace of the process that holds it, if it is in none
        // of the two looked at.
        if !unix.contains_key(&first.peer)
            && let Some((pid, _)) = &holder
        {
            let ns = PathBuf::from(format!("/proc/{pid}/ns/net"));
            if let Ok(Ok(mut theirs)) = ferry_overlay::netns::run_in(&ns, SockDiag::open_here)
                && let Ok(more) = theirs.unix_sockets()
            {
                unix.extend(more);
            }
        }
        let name = |ino: u64| shown(unix.get(&ino).and_then(|s| s.name.as_deref()));
        let holder = match holder {
            Some((pid, comm)) => format!("held by pid {pid} ({comm}) outside the container"),
            None => "held by no process (not yet accepted, or in flight)".to_owned(),
        };
        Ok(Some((
            first.clone(),
            name(first.socket),
            name(first.peer),
            holder,
            bad.len(),
        )))
    })
    .await
    .map_err(|e| read(std::io::Error::other(e)))?
    .map_err(read)?;
    let Some((o, socket, peer, holder, count)) = found else {
        return Ok(());
    };
    let e = UnixPeerError::Outside {
        ip,
        socket,
        inode: o.socket,
        pid: o.holder.pid,
        fd: o.holder.fd,
        peer,
        peer_inode: o.peer,
        holder,
    };
    warn!(container = %ip, sockets = count, error = %e, "checkpoint refused: a UNIX socket leads out of the container");
    Err(e)
}

/// The drain's routes on the peer API (with the other container routes: the gateway and the
/// operator may call them, see `auth::permit`).
pub struct DrainApi {
    pub host: String,
    pub token: String,
    pub node: Arc<Mutex<Node>>,
    /// `[criu] drain_timeout_ms` (its default if that is 0: asked for, a drain waits).
    pub bound: Duration,
}

pub fn router(api: DrainApi) -> Router {
    Router::new()
        .route(
            "/v1/containers/{ip}/drain",
            post(drain_route).delete(end_drain_route),
        )
        .with_state(Arc::new(api))
}

/// `POST /v1/containers/{ip}/drain`: the drain alone, for a dump someone else runs (e.g. a
/// CRIU `pre-dump` hook). Drained: 200 with the figures; the drain stays on until the freeze's
/// switch, `DELETE /v1/containers/{ip}/drain`, or [`API_DRAIN_LEASE`]. Not drained: 409
/// `not_drained` (the drain is over, the held SYNs delivered).
async fn drain_route(
    State(api): State<Arc<DrainApi>>,
    UrlPath(ip): UrlPath<String>,
    headers: HeaderMap,
) -> Result<Json<DrainAnswer>, Refusal> {
    authorize(Some(&api.token), &headers)?;
    let ip = container_ip(&ip)?;
    let netns = {
        let node = api.node.lock().await;
        node.applied
            .containers
            .get(&ip)
            .map(|(_, b)| b.netns.clone())
    }
    .ok_or_else(|| {
        Refusal::new(
            StatusCode::NOT_FOUND,
            "not_local",
            format!("container {ip} is not built on host {}", api.host),
        )
    })?;
    let (number, drained) = before_dump(&api.node, ip, &netns, api.bound)
        .await
        .map_err(|e| Refusal::new(e.status(), e.code(), e.to_string()))?
        .ok_or_else(|| Refusal::bad_request("a drain needs a bound above zero"))?;
    let node = api.node.clone();
    tokio::spawn(async move {
        tokio::time::sleep(API_DRAIN_LEASE).await;
        if let Some(n) = node.lock().await.end_drain_of(ip, number) {
            warn!(container = %ip, delivered = n, "a drain asked for through the API was not followed by a freeze: ended");
        }
    });
    Ok(Json(DrainAnswer {
        container: ip,
        drained: Some(drained),
        delivered: None,
    }))
}

/// `DELETE /v1/containers/{ip}/drain`: ends a drain (the held SYNs delivered here).
async fn end_drain_route(
    State(api): State<Arc<DrainApi>>,
    UrlPath(ip): UrlPath<String>,
    headers: HeaderMap,
) -> Result<Json<DrainAnswer>, Refusal> {
    authorize(Some(&api.token), &headers)?;
    let ip = container_ip(&ip)?;
    let delivered = api.node.lock().await.end_drain(ip);
    Ok(Json(DrainAnswer {
        container: ip,
        drained: None,
        delivered,
    }))
}

/// The drain routes' answer.
#[derive(Debug, Serialize)]
pub struct DrainAnswer {
    pub container: Ipv4Addr,
    /// `POST`: how the wait went.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drained: Option<Drained>,
    /// `DELETE`: the held SYNs delivered (absent: no drain was on).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivered: Option<usize>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scripted backlogs, one per look; the last one repeats.
    struct Script(Vec<Backlog>, usize);

    impl Sockets for Script {
        fn backlog(&mut self) -> std::io::Result<Backlog> {
            let b = self.0[self.1.min(self.0.len() - 1)].clone();
            self.1 += 1;
            Ok(b)
        }
    }

    fn listener(port: u16, queued: u32) -> Listener {
        Listener {
            local: SocketAddr::new("0.0.0.0".parse().unwrap(), port),
            queued,
        }
    }

    fn half_open(port: u16) -> (SocketAddr, SocketAddr) {
        (
            SocketAddr::new("10.244.1.10".parse().unwrap(), port),
            "203.0.113.7:40000".parse().unwrap(),
        )
    }

    fn backlog(listeners: &[(u16, u32)], half: &[u16]) -> Backlog {
        Backlog {
            listeners: listeners.iter().map(|(p, q)| listener(*p, *q)).collect(),
            half_open: half.iter().map(|p| half_open(*p)).collect(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn waits_until_queued_and_half_open_connections_are_gone() {
        let mut s = Script(
            vec![
                backlog(&[(8000, 3), (22, 0)], &[8000]),
                backlog(&[(8000, 1), (22, 0)], &[8000]),
                // The queue is empty, but one connection is still half-open: not yet.
                backlog(&[(8000, 0), (22, 0)], &[8000]),
                backlog(&[(8000, 0), (22, 0)], &[]),
            ],
            0,
        );
        let d = wait_drained(&mut s, Duration::from_secs(2), Duration::from_millis(2))
            .await
            .unwrap();
        assert_eq!(d.looks, 4);
        assert_eq!(d.listeners, 2);
        assert!((d.waited_ms - 6.0).abs() < 0.5, "{d:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_namespace_without_listeners_is_drained_at_once() {
        let mut s = Script(vec![Backlog::default()], 0);
        let d = wait_drained(&mut s, Duration::from_secs(2), Duration::from_millis(2))
            .await
            .unwrap();
        assert_eq!((d.looks, d.waited_ms), (1, 0.0));
    }

    #[tokio::test(start_paused = true)]
    async fn gives_up_at_the_bound_naming_the_fullest_listener() {
        let stuck = backlog(&[(22, 0), (7000, 2), (8000, 4)], &[7000, 7000, 7000]);
        let mut s = Script(vec![stuck.clone()], 0);
        let e = wait_drained(&mut s, Duration::from_millis(100), Duration::from_millis(2))
            .await
            .unwrap_err();
        let WaitError::NotDrained { waited, last } = e else {
            panic!("{e:?}")
        };
        assert_eq!(waited, Duration::from_millis(100));
        assert_eq!(last, stuck);
        // 7000: 2 queued + 3 half-open beats 8000's 4 queued.
        assert_eq!(last.worst(), Some(("0.0.0.0:7000".parse().unwrap(), 2, 3)));
        // One look at the bound itself: 51 looks for 100 ms every 2 ms.
        assert_eq!(s.1, 51);
    }

    #[tokio::test(start_paused = true)]
    async fn a_queue_that_empties_at_the_bound_still_counts() {
        let mut s = Script(
            vec![
                backlog(&[(8000, 1)], &[]),
                backlog(&[(8000, 1)], &[]),
                backlog(&[(8000, 0)], &[]),
            ],
            0,
        );
        let d = wait_drained(&mut s, Duration::from_millis(4), Duration::from_millis(3))
            .await
            .unwrap();
        assert_eq!(d.looks, 3);
        assert!((d.waited_ms - 4.0).abs() < 0.5, "{d:?}");
    }

    #[test]
    fn half_open_connections_count_for_the_listener_of_their_port() {
        let b = Backlog {
            listeners: vec![Listener {
                local: "[::]:8000".parse().unwrap(),
                queued: 0,
            }],
            half_open: vec![(
                "[::ffff:10.244.1.10]:8000".parse().unwrap(),
                "[::ffff:203.0.113.7]:40000".parse().unwrap(),
            )],
        };
        assert!(!b.drained());
        assert_eq!(b.worst(), Some(("[::]:8000".parse().unwrap(), 0, 1)));
        assert!(same_ip(
            "10.244.1.10".parse().unwrap(),
            "::ffff:10.244.1.10".parse().unwrap()
        ));
    }

    #[test]
    fn only_peers_outside_the_container_are_reported() {
        let holder = |pid, fd| Holder { pid, fd };
        // 10 ↔ 11: a pair inside; 12 → 99: a peer nobody in the container holds; 13: a
        // listener (no peer); 14 → 0-less: unconnected.
        let held = BTreeMap::from([
            (10, holder(1, 3)),
            (11, holder(7, 4)),
            (12, holder(7, 5)),
            (13, holder(1, 6)),
            (14, holder(1, 7)),
        ]);
        let sock = |peer: Option<u64>| UnixSocket { name: None, peer };
        let unix = BTreeMap::from([
            (10, sock(Some(11))),
            (11, sock(Some(10))),
            (12, sock(Some(99))),
            (13, sock(None)),
            (14, sock(None)),
            (99, sock(Some(12))),
        ]);
        assert_eq!(
            outside_peers(&held, &unix),
            [OutsidePeer {
                socket: 12,
                holder: holder(7, 5),
                peer: 99
            }]
        );
        // Sockets the dump did not show (another namespace's, or not UNIX) are not judged.
        assert!(outside_peers(&BTreeMap::from([(50, holder(1, 9))]), &unix).is_empty());
    }
}
