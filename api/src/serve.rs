//! Every HTTP server of ferry (the gateway's API, the agents' peer API and metrics) goes
//! through [`serve`]: bounded, so that a flood of idle or slow connections — from the
//! internet, or from a container — cannot starve the peers that matter.
//!
//! - **Header and idle timeout** ([`Limits::header_read`]): a connection must send a complete
//!   request head within this time, counted from the moment the server waits for one — so an
//!   idle keep-alive connection is closed after it too. (A request in flight, e.g. a long-poll
//!   watch, is not idle.)
//! - **Per-peer cap** ([`Limits::per_peer`]): connections from one IP address beyond it are
//!   closed at once (and counted: [`Stats::refused_per_peer`]).
//! - **Total cap** ([`Limits::total`]): beyond it new connections are closed at once
//!   ([`Stats::refused_total`]), so the process keeps file descriptors for its own work.
//! - Body limits stay the router's (axum's `DefaultBodyLimit`; the image stream has its own).
//! - **TLS** (with a server configuration): the first byte must open a TLS handshake, which must
//!   finish within the header timeout with a client certificate from the cluster's CA; the
//!   caller's [`Caller`] (its identity) is put into every request's extensions for the
//!   routers' authorisation. A plain-HTTP request is answered with a clear `400
//!   tls_required` and closed ([`Stats::refused_plaintext`]); a failed handshake is logged
//!   with its reason and counted ([`Stats::refused_tls`]).
//!
//! Hand-written accept loop (hyper's own builder, hyper-util's graceful shutdown): axum's
//! `serve` has no header timeout and no connection caps.

use std::{
    collections::HashMap,
    convert::Infallible,
    future::Future,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use hyper::{body::Incoming, server::conn::http1};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};
use tracing::warn;

pub use ferry_tls::Identity;

/// What [`serve`] serves: a service of hyper requests that never fails (an axum `Router`).
pub trait HttpService<B>:
    tower_service::Service<
        hyper::Request<Incoming>,
        Response = hyper::Response<B>,
        Error = Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + 'static
{
}

impl<S, B> HttpService<B> for S where
    S: tower_service::Service<
            hyper::Request<Incoming>,
            Response = hyper::Response<B>,
            Error = Infallible,
            Future: Send + 'static,
        > + Clone
        + Send
        + 'static
{
}

/// The body of its answers.
pub trait ResponseBody:
    hyper::body::Body<Data: Send, Error: Into<Box<dyn std::error::Error + Send + Sync>>>
    + Send
    + 'static
{
}

impl<B> ResponseBody for B where
    B: hyper::body::Body<Data: Send, Error: Into<Box<dyn std::error::Error + Send + Sync>>>
        + Send
        + 'static
{
}

/// Who made a request: put into every request's extensions by [`serve`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub addr: SocketAddr,
    /// The identity its client certificate names; `None` on a plain-HTTP server.
    pub identity: Option<Identity>,
}

/// The body of the answer to a plain-HTTP request on a TLS port.
const TLS_REQUIRED: &str = "{\"error\":{\"code\":\"tls_required\",\"message\":\"this port speaks \
TLS only: connect with TLS and a client certificate from the cluster's CA (ferry certs)\"}}";

/// The bounds of one server.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub header_read: Duration,
    pub per_peer: usize,
    pub total: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_read: Duration::from_secs(10),
            per_peer: 64,
            total: 4096,
        }
    }
}

/// What a server refused (for metrics and tests).
#[derive(Debug, Default)]
pub struct Stats {
    pub accepted: AtomicU64,
    pub refused_per_peer: AtomicU64,
    pub refused_total: AtomicU64,
    /// A plain-HTTP request on a TLS server.
    pub refused_plaintext: AtomicU64,
    /// A failed TLS handshake (no client certificate, another CA's, an expired one...).
    pub refused_tls: AtomicU64,
}

impl Stats {
    /// Every counter by its metric label: `accepted`, `refused_per_peer`, `refused_total`,
    /// `refused_plaintext`, `refused_tls`.
    pub fn by_result(&self) -> [(&'static str, u64); 5] {
        let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("accepted", n(&self.accepted)),
            ("refused_per_peer", n(&self.refused_per_peer)),
            ("refused_total", n(&self.refused_total)),
            ("refused_plaintext", n(&self.refused_plaintext)),
            ("refused_tls", n(&self.refused_tls)),
        ]
    }
}

/// Open connections, by peer address.
#[derive(Default)]
struct Open {
    by_peer: HashMap<IpAddr, usize>,
    total: usize,
}

struct Slot {
    open: Arc<Mutex<Open>>,
    peer: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut o = self.open.lock().unwrap_or_else(|p| p.into_inner());
        o.total = o.total.saturating_sub(1);
        if let Some(n) = o.by_peer.get_mut(&self.peer) {
            *n -= 1;
            if *n == 0 {
                o.by_peer.remove(&self.peer);
            }
        }
    }
}

/// Serves `service` on `listener` within `limits` (over TLS with `tls`) until `shutdown`
/// completes, then lets the requests in flight finish (at most `drain`).
#[allow(clippy::too_many_arguments)]
pub async fn serve<S, B>(
    listener: TcpListener,
    service: S,
    limits: Limits,
    tls: Option<Arc<rustls::ServerConfig>>,
    stats: Arc<Stats>,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) -> std::io::Result<()>
where
    S: HttpService<B>,
    B: ResponseBody,
{
    let open = Arc::new(Mutex::new(Open::default()));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                // EMFILE and friends: back off a moment instead of spinning.
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let slot = {
            let mut o = open.lock().unwrap_or_else(|p| p.into_inner());
            let n = o.by_peer.get(&peer.ip()).copied().unwrap_or(0);
            if o.total >= limits.total {
                stats.refused_total.fetch_add(1, Ordering::Relaxed);
                continue; // dropping the stream closes it
            }
            if n >= limits.per_peer {
                stats.refused_per_peer.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            o.total += 1;
            *o.by_peer.entry(peer.ip()).or_default() += 1;
            Slot {
                open: open.clone(),
                peer: peer.ip(),
            }
        };
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        let _ = stream.set_nodelay(true);
        let watcher = graceful.watcher();
        let (service, stats, tls) = (service.clone(), stats.clone(), tls.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let Some(tls) = tls else {
                let caller = Caller {
                    addr: peer,
                    identity: None,
                };
                let conn = connection(stream, service, caller, limits);
                let _ = watcher.watch(conn).await;
                return;
            };
            let Some((stream, identity)) = accept_tls(stream, peer, tls, limits, &stats).await
            else {
                return;
            };
            let caller = Caller {
                addr: peer,
                identity: Some(identity),
            };
            let _ = watcher
                .watch(connection(stream, service, caller, limits))
                .await;
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(drain, graceful.shutdown()).await;
    Ok(())
}

/// One HTTP/1.1 connection serving `service`, with `caller` in every request's extensions.
fn connection<S, B, I>(
    io: I,
    service: S,
    caller: Caller,
    limits: Limits,
) -> impl hyper_util::server::graceful::GracefulConnection + Send + 'static
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: HttpService<B>,
    B: ResponseBody,
{
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(caller.clone());
        let mut service = service.clone();
        async move {
            std::future::poll_fn(|cx| service.poll_ready(cx)).await?;
            service.call(req).await
        }
    });
    http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read)
        .keep_alive(true)
        .serve_connection(TokioIo::new(io), service)
}

/// The TLS handshake of an accepted connection, within the header timeout; a plain-HTTP
/// request gets [`TLS_REQUIRED`]. `None`: refused (counted, and logged with its reason).
async fn accept_tls(
    stream: TcpStream,
    peer: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    limits: Limits,
    stats: &Stats,
) -> Option<(tokio_rustls::server::TlsStream<TcpStream>, Identity)> {
    let mut first = [0u8; 1];
    match tokio::time::timeout(limits.header_read, stream.peek(&mut first)).await {
        Ok(Ok(1)) => {}
        _ => return None, // closed, failed or silent: not worth a word
    }
    // 0x16: a TLS record of type handshake.
    if first[0] != 0x16 {
        stats.refused_plaintext.fetch_add(1, Ordering::Relaxed);
        let mut stream = stream;
        let _ = tokio::time::timeout(limits.header_read, async {
            let answer = format!(
                "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n\
                 Connection: close\r\nContent-Length: {}\r\n\r\n{TLS_REQUIRED}",
                TLS_REQUIRED.len()
            );
            let _ = stream.write_all(answer.as_bytes()).await;
            let _ = stream.shutdown().await;
        })
        .await;
        return None;
    }
    let accepted = tokio::time::timeout(
        limits.header_read,
        tokio_rustls::TlsAcceptor::from(tls)
            .accept(stream)
            .into_fallible(),
    )
    .await;
    let refused = |reason: String| {
        stats.refused_tls.fetch_add(1, Ordering::Relaxed);
        warn!(%peer, %reason, "TLS handshake refused");
        None
    };
    let stream = match accepted {
        Ok(Ok(s)) => s,
        Ok(Err((e, io))) => {
            // The alert is sent: close our side and read what the client already sent (its
            // request, in TLS 1.3), so the kernel ends with a FIN, not a reset that could
            // destroy the alert before the client reads why it was refused.
            tokio::spawn(linger(io, limits.header_read));
            return refused(e.to_string());
        }
        Err(_) => return refused("no complete handshake within the header timeout".into()),
    };
    let identity = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(|c| Identity::of_certificate(c));
    match identity {
        Some(Ok(id)) => Some((stream, id)),
        Some(Err(e)) => refused(e.to_string()),
        None => refused("no client certificate".into()),
    }
}

/// Shuts the write side and drains the read side until the peer closes (at most `within`, at
/// most 1 MiB), then drops the connection.
async fn linger(mut io: TcpStream, within: std::time::Duration) {
    use tokio::io::AsyncReadExt as _;
    let _ = io.shutdown().await;
    let mut buf = [0u8; 4096];
    let mut left = 1usize << 20;
    let _ = tokio::time::timeout(within, async {
        while left > 0 {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}
