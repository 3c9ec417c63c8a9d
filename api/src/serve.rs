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
//!
//! Hand-written accept loop (hyper's own builder, hyper-util's graceful shutdown): axum's
//! `serve` has no header timeout and no connection caps.

use std::{
    collections::HashMap,
    convert::Infallible,
    future::Future,
    net::IpAddr,
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
    service::TowerToHyperService,
};
use tokio::net::TcpListener;

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

/// Serves `service` on `listener` within `limits` until `shutdown` completes, then lets the
/// requests in flight finish (at most `drain`).
pub async fn serve<S, B>(
    listener: TcpListener,
    service: S,
    limits: Limits,
    stats: Arc<Stats>,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) -> std::io::Result<()>
where
    S: tower_service::Service<
            hyper::Request<Incoming>,
            Response = hyper::Response<B>,
            Error = Infallible,
        > + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
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
        let conn = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read)
            .keep_alive(true)
            .serve_connection(
                TokioIo::new(stream),
                TowerToHyperService::new(service.clone()),
            );
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _slot = slot;
            let _ = conn.await;
        });
    }
    drop(listener);
    let _ = tokio::time::timeout(drain, graceful.shutdown()).await;
    Ok(())
}
