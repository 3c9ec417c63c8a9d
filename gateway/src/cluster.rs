//! What gateways on one etcd share besides the registry, and how each keeps up:
//!
//! - **the registry's changes**: a watch of the log ([`crate::etcd_store`]) applies what
//!   other gateways wrote, in version order, so this gateway's agents get it as deltas;
//! - **the agents' presence**: each gateway publishes what it knows of the agents it serves
//!   (applied version, last seen, open watches) under `<prefix>agents/<host>/<gateway>`,
//!   on a lease of its own ([`LEASE_TTL_SECS`]): a migration step driven by one gateway waits
//!   for agents that watch another, and a dead gateway's reports go with its lease.
//!
//! Each runs on a thread of its own with its own runtime (etcd's calls block; the API's
//! runtime never waits on them). A failed watch moves to the next member; a compacted
//! revision reads everything again.

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use tracing::{info, warn};

use crate::{
    etcd::{Event, Op, Txn, WatchEnd, prefix_end},
    server::{Gateway, HostRuntime, lock},
};

/// Seconds a gateway's lease lives without renewal (its presence reports go with it).
pub const LEASE_TTL_SECS: i64 = 3;
/// How often the lease is renewed, and presence published without a change to wake it.
const TICK: Duration = Duration::from_millis(500);
/// How often an agent's timestamps alone (last seen, last watch) are published: well inside
/// the coordinator's `DEAD_AFTER_MS` (1.5 s), so another gateway never takes a live agent for
/// dead.
const REFRESH: Duration = Duration::from_millis(250);

/// Starts the follower (log and presence watches) and the presence publisher of gateway
/// `me` (its API address), from etcd `revision` (where the registry was read).
pub fn spawn(g: Arc<Gateway>, members: Vec<SocketAddr>, revision: i64, me: String) {
    let Some(store) = g.store.etcd() else { return };
    let log = store.log_prefix();
    let agents = store.agents_prefix();
    let (g2, me2, agents2) = (g.clone(), me.clone(), agents.clone());
    let follower = std::thread::Builder::new()
        .name("etcd-follower".into())
        .spawn(move || {
            let Some(rt) = runtime() else { return };
            rt.block_on(async {
                tokio::join!(
                    follow_log(&g, &members, log, revision),
                    follow_agents(&g, &members, agents, &me),
                )
            });
        });
    let publisher = std::thread::Builder::new()
        .name("etcd-presence".into())
        .spawn(move || publish(&g2, &agents2, &me2));
    if let Err(e) = follower.and(publisher) {
        tracing::error!(error = %e, "etcd: no thread; other gateways' changes are applied only when this one conflicts");
    }
}

fn runtime() -> Option<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| tracing::error!(error = %e, "etcd: no runtime"))
        .ok()
}

/// What a watch's events asked for.
enum Next {
    /// Go on from this revision.
    Continue(i64),
    /// Read everything again (a gap, an entry that does not apply).
    Reload,
}

/// Watches `prefix` from `revision + 1` at each member in turn until shutdown. `on` handles
/// each batch of events; `reload` reads the state whole and says from which revision to go
/// on.
async fn follow(
    g: &Gateway,
    members: &[SocketAddr],
    prefix: &[u8],
    mut revision: i64,
    what: &str,
    mut on: impl FnMut(Vec<Event>) -> Next,
    mut reload: impl FnMut() -> Option<i64>,
) {
    let mut shutdown = g.shutdown_tx.subscribe();
    let mut at = 0usize;
    while !*shutdown.borrow() {
        let member = members[at % members.len()];
        let mut again = false;
        let from = revision + 1;
        let watched = {
            let events = |ev: Vec<Event>| match on(ev) {
                Next::Continue(r) => {
                    revision = revision.max(r);
                    true
                }
                Next::Reload => {
                    again = true;
                    false
                }
            };
            tokio::select! {
                r = crate::etcd::watch(member, prefix, from, events) => r,
                _ = shutdown.wait_for(|s| *s) => Ok(()),
            }
        };
        match watched {
            Ok(()) => {}
            Err(WatchEnd::Compacted(c)) => {
                warn!(
                    watch = what,
                    compacted = c,
                    "etcd: the revision watched from was compacted; reading it whole"
                );
                again = true;
            }
            Err(WatchEnd::Failed(e)) => {
                warn!(watch = what, error = %e, "etcd: watch failed; trying the next member");
                at += 1;
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    _ = shutdown.wait_for(|s| *s) => {}
                }
            }
        }
        if again && let Some(r) = reload() {
            revision = r;
        }
    }
}

/// Other gateways' changes, applied in version order.
async fn follow_log(g: &Arc<Gateway>, members: &[SocketAddr], prefix: Vec<u8>, revision: i64) {
    let on = |events: Vec<Event>| {
        let Some(store) = g.store.etcd() else {
            return Next::Continue(0);
        };
        let mut last = 0;
        for e in events {
            match e {
                Event::Put(kv) => {
                    let entry = store
                        .log_version(&kv.key)
                        .and_then(|v| serde_json::from_slice(&kv.value).ok().map(|e| (v, e)));
                    let Some((v, entry)) = entry else {
                        warn!(key = %String::from_utf8_lossy(&kv.key), "etcd: not a log entry; reading the registry whole");
                        return Next::Reload;
                    };
                    if let Err(e) = g.follow(v, entry, kv.mod_revision) {
                        warn!(error = %e, version = v, "etcd: applying a change failed; reading the registry whole");
                        return Next::Reload;
                    }
                    last = kv.mod_revision;
                }
                Event::Delete { mod_revision, .. } => last = mod_revision,
            }
        }
        Next::Continue(last)
    };
    let reload = || match g.reload() {
        Ok(r) => Some(r),
        Err(e) => {
            warn!(error = %e, "etcd: reading the registry failed; trying again");
            None
        }
    };
    follow(g, members, &prefix, revision, "log", on, reload).await;
}

/// `<prefix>agents/<host>/<gateway>` → (host, gateway).
fn presence_key(prefix: &[u8], key: &[u8]) -> Option<(String, String)> {
    let rest = std::str::from_utf8(key.strip_prefix(prefix)?).ok()?;
    let (host, gw) = rest.split_once('/')?;
    Some((host.to_owned(), gw.to_owned()))
}

/// Other gateways' reports of their agents.
async fn follow_agents(g: &Arc<Gateway>, members: &[SocketAddr], prefix: Vec<u8>, me: &str) {
    // Reads every report (replacing what is known) and says from which revision to watch.
    let load = || {
        let store = g.store.etcd()?;
        let r = store
            .kv()
            .range(&prefix, Some(&prefix_end(&prefix)), 0, 0)
            .map_err(|e| warn!(error = %e, "etcd: reading the agents' presence failed"))
            .ok()?;
        let mut remote = HashMap::new();
        for kv in r.kvs {
            if let (Some((host, gw)), Ok(rt)) = (
                presence_key(&prefix, &kv.key),
                serde_json::from_slice::<HostRuntime>(&kv.value),
            ) && gw != me
            {
                remote.insert((host, gw), rt);
            }
        }
        *lock(&g.remote_runtime) = remote;
        g.applied_tx.send_modify(|n| *n = n.wrapping_add(1));
        Some(r.revision)
    };
    let on = |events: Vec<Event>| {
        let mut last = 0;
        for e in events {
            let (key, rev) = match &e {
                Event::Put(kv) => (&kv.key, kv.mod_revision),
                Event::Delete { key, mod_revision } => (key, *mod_revision),
            };
            last = rev;
            let Some((host, gw)) = presence_key(&prefix, key).filter(|(_, gw)| gw != me) else {
                continue;
            };
            match e {
                Event::Put(kv) => match serde_json::from_slice::<HostRuntime>(&kv.value) {
                    Ok(rt) => {
                        lock(&g.remote_runtime).insert((host, gw), rt);
                    }
                    Err(err) => {
                        warn!(host, gateway = gw, error = %err, "etcd: unreadable presence report")
                    }
                },
                Event::Delete { .. } => {
                    info!(
                        host,
                        gateway = gw,
                        "presence report gone (that gateway's lease ended)"
                    );
                    lock(&g.remote_runtime).remove(&(host, gw));
                }
            }
        }
        g.applied_tx.send_modify(|n| *n = n.wrapping_add(1));
        Next::Continue(last)
    };
    let mut start = None;
    while start.is_none() && !*g.shutdown_tx.borrow() {
        start = load();
        if start.is_none() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    let Some(revision) = start else { return };
    follow(g, members, &prefix, revision, "agents", on, load).await;
}

/// Publishes this gateway's knowledge of its agents whenever it changes (and renews the
/// lease it is published on).
fn publish(g: &Arc<Gateway>, prefix: &[u8], me: &str) {
    let Some(rt) = runtime() else { return };
    let Some(store) = g.store.etcd() else { return };
    let kv = store.kv().clone();
    let mut applied = g.applied_tx.subscribe();
    let mut shutdown = g.shutdown_tx.subscribe();
    let mut lease = 0i64;
    let mut renewed = std::time::Instant::now();
    let mut published: HashMap<String, (HostRuntime, std::time::Instant)> = HashMap::new();
    let mut failing = false;
    // The first round at once: the lease is what a run's claim needs.
    let mut first = true;
    loop {
        let stop = !std::mem::take(&mut first)
            && rt.block_on(async {
                tokio::select! {
                    _ = applied.changed() => false,
                    _ = tokio::time::sleep(TICK) => false,
                    _ = shutdown.wait_for(|s| *s) => true,
                }
            });
        if stop {
            return;
        }
        let result = (|| {
            if lease != 0 && renewed.elapsed() >= TICK {
                if kv.keepalive(lease)? == 0 {
                    // Whatever hung on it (presence, the runs this gateway drives) is gone.
                    g.lease.store(0, std::sync::atomic::Ordering::Relaxed);
                    warn!(lease = %format!("{lease:x}"), "etcd: this gateway's lease expired; publishing presence again");
                    lease = 0;
                }
                renewed = std::time::Instant::now();
            }
            if lease == 0 {
                g.lease.store(0, std::sync::atomic::Ordering::Relaxed);
                lease = kv.grant(LEASE_TTL_SECS)?;
                renewed = std::time::Instant::now();
                published.clear();
                g.lease.store(lease, std::sync::atomic::Ordering::Relaxed);
            }
            // At once when what a step waits for moved (applied version, connected); the
            // timestamps alone at most every REFRESH (many watches re-open per change).
            let now = lock(&g.runtime).clone();
            let changed: Vec<(&String, &HostRuntime)> = now
                .iter()
                .filter(|(h, r)| match published.get(*h) {
                    None => true,
                    Some((p, at)) => {
                        p.applied_version != r.applied_version
                            || (p.open_watches > 0) != (r.open_watches > 0)
                            || (p != *r && at.elapsed() >= REFRESH)
                    }
                })
                .collect();
            for batch in changed.chunks(64) {
                let ops = batch
                    .iter()
                    .map(|(h, r)| {
                        let mut key = prefix.to_vec();
                        key.extend_from_slice(format!("{h}/{me}").as_bytes());
                        Op::PutLeased(key, serde_json::to_vec(r).expect("serialises"), lease)
                    })
                    .collect();
                kv.txn(&Txn {
                    compare: vec![],
                    success: ops,
                })?;
                for (h, r) in batch {
                    published.insert((*h).clone(), (**r, std::time::Instant::now()));
                }
            }
            Ok::<(), crate::etcd::EtcdError>(())
        })();
        match result {
            Ok(()) => failing = false,
            Err(e) => {
                if !failing {
                    warn!(error = %e, "etcd: publishing this gateway's agents failed; retrying");
                }
                failing = true;
                // A refused put may mean the lease is gone: take a new one.
                if matches!(e, crate::etcd::EtcdError::Refused { .. }) {
                    lease = 0;
                }
            }
        }
    }
}
