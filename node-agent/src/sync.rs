//! Following the registry: the agent registers its host with the gateway, then holds a watch
//! (long poll) open. The gateway answers as soon as its version moves past the one the agent
//! has applied: with a delta from that version (the entries that changed, applied to the
//! snapshot the agent holds), or the whole snapshot on first contact and whenever the gateway
//! cannot vouch for a delta (restarted, the agent too far behind). Every change reaches every
//! agent at once, and an agent that missed changes (restart, network cut, gateway restart)
//! converges from any state.

use std::{sync::Arc, time::Duration};

use ferry_api::{Client, HostInfo, WatchUpdate};
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

/// How often at most the agent leaves a gateway that refuses its heartbeat because it is cut
/// off from the registry's store.
const SENT_AWAY_EVERY: Duration = Duration::from_secs(2);

/// Heartbeats until the task is dropped (failures are the gateway's to notice). With
/// several gateways, one that does not answer a heartbeat in time, or answers that it is cut
/// off from the registry's store (`cut_off`), is left for the next: the client's
/// clones (the watch's too, see [`follow`]) move with it.
pub async fn heartbeat(host: String, client: Client) {
    let mut tick = tokio::time::interval(HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sent_away = None;
    loop {
        tick.tick().await;
        let at = client.addr();
        // Only silence moves: a gateway that answers, even with an error (this host not
        // registered yet), is alive.
        let failed = match tokio::time::timeout(HEARTBEAT_TIMEOUT, client.heartbeat(&host)).await {
            Ok(Ok(_)) => None,
            // A gateway cut off from its store (etcd) may be behind: follow another one. Not
            // more often than every SENT_AWAY_EVERY, so with every gateway cut off (etcd
            // down) the agent stays on one for a while rather than hopping at each beat.
            Ok(Err(e)) if e.code() == Some("cut_off") => {
                if sent_away.is_none_or(|t: tokio::time::Instant| t.elapsed() >= SENT_AWAY_EVERY) {
                    sent_away = Some(tokio::time::Instant::now());
                    Some(e.to_string())
                } else {
                    None
                }
            }
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

/// A delta that does not apply (not expected: the gateway answers deltas from the version
/// asked for): the next watch asks for the whole snapshot.
async fn mismatch(node: &Mutex<Node>, why: &str) {
    warn!(error = %why, "a registry delta that does not apply; asking for the whole snapshot");
    node.lock().await.registry = None;
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
    // The watch's own connection, kept open between long polls.
    let mut watcher = client.watcher();
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
                    Some(_) => watcher.watch_update(&cfg.host, after, WATCH_TIMEOUT).await,
                    None => watcher
                        .watch(&cfg.host, after, WATCH_TIMEOUT)
                        .await
                        .map(WatchUpdate::Snapshot),
                }
            };
            let Some(update) = unless_moved(&client, at, watch).await else {
                info!(from = %at, to = %client.addr(), "watching another gateway");
                continue;
            };
            let update = match update {
                Ok(u) => u,
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
            let (vni, cidr, cidr6) = match &update {
                WatchUpdate::Snapshot(s) => (s.vni, s.overlay_cidr, s.overlay6_cidr),
                WatchUpdate::Delta(d) => (d.vni, d.overlay_cidr, d.overlay6_cidr),
            };
            if vni != cfg.vni || cidr != cfg.overlay_cidr || cidr6 != cfg.overlay6_cidr {
                warn!(
                    registry_vni = vni,
                    registry_cidr = %cidr,
                    registry_cidr6 = ?cidr6,
                    "the registry's overlay differs from this agent's configuration; ignoring it"
                );
                tokio::time::sleep(BACKOFF_MAX).await;
                continue;
            }
            let kind = match &update {
                WatchUpdate::Delta(_) => "delta",
                WatchUpdate::Snapshot(_) => "snapshot",
            };
            let t0 = std::time::Instant::now();
            // A fenced copy that the new snapshot makes the owner resumes before its held
            // packets are written back, without the node's lock (it takes it): that needs the
            // new snapshot before the lock, hence a copy. Otherwise (no copy fenced here: the
            // common case) the delta edits the registry's snapshot in place, under the lock.
            let fenced = fencing.as_ref().is_some_and(|f| f.any_fenced());
            // Until the node's lock is held (another task may hold it: a CNI call, a scrape).
            let locked: Duration;
            let (mut n, snap, delta, before) = match update {
                WatchUpdate::Snapshot(mut s) => {
                    // The gateway sends them in order; the plan's and the next delta's binary
                    // searches rely on it.
                    if !s.endpoints.windows(2).all(|w| w[0].ip < w[1].ip) {
                        s.endpoints.sort_by_key(|e| e.ip);
                    }
                    drop(base);
                    if let Some(f) = &fencing {
                        f.resume_before_release(&s).await;
                    }
                    let n = node.lock().await;
                    locked = t0.elapsed();
                    if seen == Some(s.version) && n.applied.version == s.version {
                        debug!(version = s.version, "no change");
                        continue;
                    }
                    (n, Arc::new(s), None, Vec::new())
                }
                WatchUpdate::Delta(d) if fenced => {
                    let merged = base
                        .as_deref()
                        .map(|b| (d.apply_to(b), b.migrations.clone()));
                    drop(base);
                    let (s, before) = match merged {
                        Some((Ok(s), before)) => (s, before),
                        Some((Err(e), _)) => {
                            mismatch(&node, &e.to_string()).await;
                            continue;
                        }
                        None => {
                            mismatch(&node, "no snapshot to apply it to").await;
                            continue;
                        }
                    };
                    if let Some(f) = &fencing {
                        f.resume_before_release(&s).await;
                    }
                    let n = node.lock().await;
                    locked = t0.elapsed();
                    (n, Arc::new(s), Some(d), before)
                }
                WatchUpdate::Delta(d) => {
                    // Ours dropped first: the registry's copy is then normally the only one
                    // (a reader holding it a moment makes `make_mut` copy it).
                    drop(base);
                    let mut n = node.lock().await;
                    locked = t0.elapsed();
                    let Some(mut reg) = n.registry.take() else {
                        drop(n);
                        mismatch(&node, "no snapshot to apply it to").await;
                        continue;
                    };
                    let before = reg.migrations.clone();
                    if let Err(e) = d.apply_in_place(Arc::make_mut(&mut reg)) {
                        drop(n);
                        mismatch(&node, &e.to_string()).await;
                        continue;
                    }
                    (n, reg, Some(d), before)
                }
            };
            let merged = t0.elapsed();
            if !snap.hosts.iter().any(|h| h.name == cfg.host) {
                warn!("this host is missing from the registry's snapshot; registering again");
                continue 'register;
            }
            seen = Some(snap.version);
            let t1 = std::time::Instant::now();
            let want = n.plan_update(&cfg, &snap, delta.as_ref().map(|d| (d, before.as_slice())));
            let planned = t1.elapsed();
            let touched = want.touched.as_ref().map(|t| t.endpoints.len());
            // Recorded under the same lock as its apply: whoever sees this version as
            // received (the CNI plugin's wait for its container) sees it applied too.
            n.registry = Some(snap.clone());
            let t2 = std::time::Instant::now();
            let errors = n.apply(&want).await;
            let applied = t2.elapsed();
            n.planned = Some(want);
            drop(n);
            if let Some(f) = &fencing {
                f.reconcile().await;
            }
            let ms = |d: Duration| d.as_secs_f64() * 1e3;
            info!(
                version = snap.version,
                kind,
                touched,
                wait_ms = ms(locked),
                merge_ms = ms(merged - locked),
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
