//! Following the registry: the agent registers its host with the gateway, then holds a watch
//! (long poll) open. The gateway answers as soon as its version moves past the one the agent
//! has applied: with a delta from that version (the entries that changed, applied to the
//! snapshot the agent holds), or the whole snapshot on first contact and whenever the gateway
//! cannot vouch for a delta (restarted, the agent too far behind). Every change reaches every
//! agent at once, and an agent that missed changes (restart, network cut, gateway restart)
//! converges from any state.

use std::{sync::Arc, time::Duration};

use ferry_api::{Client, HostInfo, Snapshot, WatchUpdate};
use tokio::sync::Mutex;
use tracing::{debug, info, warn};

use crate::{config::AgentConfig, fencing::Fencing, node::Node};

/// How long a watch may stay open before the agent asks again (the gateway answers first).
const WATCH_TIMEOUT: Duration = Duration::from_secs(60);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// How often the agent tells the gateway it is alive (see the gateway's `DEAD_AFTER_MS`).
pub const HEARTBEAT: Duration = Duration::from_millis(250);

/// How long a heartbeat may take before the gateway counts as gone (a live gateway answers in
/// milliseconds; a dead host answers nothing at all, not even a refusal).
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_millis(400);

/// Heartbeats until the task is dropped (failures are the gateway's to notice). With
/// several gateways, one that does not answer a heartbeat in time is left for the next: the
/// client's clones (the watch's too, see [`follow`]) move with it.
pub async fn heartbeat(host: String, client: Client) {
    let mut tick = tokio::time::interval(HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let at = client.addr();
        // Only silence moves: a gateway that answers, even with an error (this host not
        // registered yet), is alive.
        let failed = match tokio::time::timeout(HEARTBEAT_TIMEOUT, client.heartbeat(&host)).await {
            Ok(Ok(_)) => None,
            Ok(Err(e @ ferry_api::ApiError::Http { .. })) => {
                debug!(error = %e, "heartbeat refused");
                None
            }
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some(format!("no answer within {HEARTBEAT_TIMEOUT:?}")),
        };
        if let Some(e) = failed {
            debug!(gateway = %at, error = %e, "heartbeat not delivered");
            if client.move_on_from(at) {
                warn!(gateway = %at, next = %client.addr(), error = %e, "the gateway did not answer a heartbeat; moving to the next");
            }
        }
    }
}

/// `fut`, or `None` as soon as `client` moved to another gateway than `at` (its heartbeat saw
/// `at` go silent): a long poll on a dead host would otherwise wait out its whole timeout.
async fn unless_moved<T>(
    client: &Client,
    at: std::net::SocketAddr,
    fut: impl Future<Output = T>,
) -> Option<T> {
    let moved = async {
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if client.addr() != at {
                return;
            }
        }
    };
    tokio::select! {
        r = fut => Some(r),
        () = moved => None,
    }
}

/// Runs until the task is dropped. After every applied snapshot, `fencing` acts on the
/// decisions it carries before the agent reports the version (so a host that reports a
/// release runs the container).
pub async fn follow(
    cfg: AgentConfig,
    client: Client,
    node: Arc<Mutex<Node>>,
    fencing: Option<Arc<Fencing>>,
) {
    let me = HostInfo {
        name: cfg.host.clone(),
        vtep: cfg.vtep,
        overlay_ip: cfg.overlay_ip,
        role: cfg.role,
        active_since: None,
    };
    let mut backoff = BACKOFF_MIN;
    'register: loop {
        match client.register_host(&me).await {
            Ok(_) => {
                info!(gateway = %client.addr(), "registered with the gateway");
                backoff = BACKOFF_MIN;
            }
            Err(e) => {
                warn!(gateway = %client.addr(), error = %e, "registering; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        }
        // The version last seen from the registry (applied or not).
        let mut seen: Option<u64> = None;
        loop {
            // A delta needs the snapshot it applies to: the one last applied.
            let (after, base) = {
                let n = node.lock().await;
                let base = n
                    .registry
                    .clone()
                    .filter(|r| r.version == n.applied.version && n.applied.version > 0);
                (n.applied.version, base)
            };
            let at = client.addr();
            let watch = async {
                match &base {
                    Some(_) => client.watch_update(&cfg.host, after, WATCH_TIMEOUT).await,
                    None => client
                        .watch(&cfg.host, after, WATCH_TIMEOUT)
                        .await
                        .map(WatchUpdate::Snapshot),
                }
            };
            let Some(update) = unless_moved(&client, at, watch).await else {
                info!(from = %at, to = %client.addr(), "watching another gateway");
                continue;
            };
            let kind = match &update {
                Ok(WatchUpdate::Delta(_)) => "delta",
                _ => "snapshot",
            };
            let t0 = std::time::Instant::now();
            let update = update.map(|u| match (u, &base) {
                (WatchUpdate::Snapshot(s), _) => Ok(s),
                (WatchUpdate::Delta(d), Some(b)) => d.apply_to(b),
                (WatchUpdate::Delta(d), None) => Err(ferry_api::DeltaMismatch {
                    from: d.from,
                    have: 0,
                }),
            });
            let merged = t0.elapsed();
            let snap: Snapshot = match update {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    // Not expected (the gateway answers deltas from the version asked for):
                    // the next watch asks for the whole snapshot.
                    warn!(error = %e, "a registry delta that does not apply; asking for the whole snapshot");
                    node.lock().await.registry = None;
                    continue;
                }
                Err(e) if e.code() == Some("unknown_host") => {
                    warn!("the gateway does not know this host (any more); registering again");
                    continue 'register;
                }
                Err(e) => {
                    warn!(error = %e, "watching the registry; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            };
            backoff = BACKOFF_MIN;
            if snap.vni != cfg.vni
                || snap.overlay_cidr != cfg.overlay_cidr
                || snap.overlay6_cidr != cfg.overlay6_cidr
            {
                warn!(
                    registry_vni = snap.vni,
                    registry_cidr = %snap.overlay_cidr,
                    registry_cidr6 = ?snap.overlay6_cidr,
                    "the registry's overlay differs from this agent's configuration; ignoring it"
                );
                tokio::time::sleep(BACKOFF_MAX).await;
                continue;
            }
            if !snap.hosts.iter().any(|h| h.name == cfg.host) {
                warn!("this host is missing from the registry's snapshot; registering again");
                continue 'register;
            }
            let mut n = node.lock().await;
            if seen == Some(snap.version) && n.applied.version == snap.version {
                debug!(version = snap.version, "no change");
                continue;
            }
            seen = Some(snap.version);
            // Shared from here on (kept as the base of the next delta): never copied.
            let snap = Arc::new(snap);
            let t1 = std::time::Instant::now();
            let want = n.desired(&cfg, Some(&*snap));
            let planned = t1.elapsed();
            if let Some(f) = &fencing {
                // A copy released here runs before its held packets are written back.
                drop(n);
                f.resume_before_release(&snap).await;
                n = node.lock().await;
            }
            // Recorded under the same lock as its apply: whoever sees this version as
            // received (the CNI plugin's wait for its container) sees it applied too.
            n.registry = Some(snap.clone());
            let t2 = std::time::Instant::now();
            let errors = n.apply(&want).await;
            let applied = t2.elapsed();
            drop(n);
            if let Some(f) = &fencing {
                f.reconcile().await;
            }
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            info!(
                version = snap.version,
                kind,
                merge_ms = ms(merged),
                plan_ms = ms(planned),
                apply_ms = ms(applied),
                total_ms = ms(t0.elapsed()),
                "registry update handled"
            );
            if !errors.is_empty() {
                for e in &errors {
                    warn!(version = snap.version, error = %e, "applying the registry");
                }
                // Retry what failed (the next watch answers at once: we are still behind).
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}
