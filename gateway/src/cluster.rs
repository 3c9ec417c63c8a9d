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
///
/// Long enough that an election (a second or two: the leader's host cut off) does not make
/// a gateway take its own lease for lapsed ([`Quorum`]): a new leader extends every lease, but
/// no renewal is answered until it is elected.
pub const LEASE_TTL_SECS: i64 = 5;
/// How much earlier than etcd a gateway takes its own lease for lapsed: the lease's clock
/// starts when etcd's leader got the renewal, this gateway counts from when it sent it, and
/// the margin covers the clocks' rates and an action already under way.
pub const LEASE_MARGIN: Duration = Duration::from_secs(1);

/// What this gateway knows of its contact with etcd's quorum. A lease grant or renewal is
/// answered only by a leader that a quorum follows; the gateway counts its lease valid until
/// the renewal's send time plus the TTL, less [`LEASE_MARGIN`]. Before that instant etcd
/// cannot have let the lease (and what hangs on it: the runs this gateway drives) go; after
/// it, this gateway is **cut off**: it stops driving runs, refuses changes at once, and sends
/// its agents to another gateway, because what it holds may be behind.
#[derive(Debug)]
pub struct Quorum {
    inner: std::sync::Mutex<QuorumState>,
}

#[derive(Debug, Clone, Copy)]
struct QuorumState {
    /// The lease held (0: none).
    lease: i64,
    /// When the last answer from a quorum was asked for.
    heard: std::time::Instant,
    /// Until when that answer vouches for the lease.
    fresh_until: std::time::Instant,
    /// When contact came back after the last time the gateway was cut off.
    recovered: Option<std::time::Instant>,
}

impl Default for Quorum {
    fn default() -> Self {
        Self::new(std::time::Instant::now())
    }
}

impl Quorum {
    /// A gateway that read the registry from a quorum at `read` (its start), with no lease yet.
    pub fn new(read: std::time::Instant) -> Self {
        Self {
            inner: std::sync::Mutex::new(QuorumState {
                lease: 0,
                heard: read,
                fresh_until: read + ttl(LEASE_TTL_SECS),
                recovered: None,
            }),
        }
    }

    fn state(&self) -> QuorumState {
        *self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Lease `lease` was granted or renewed (`ttl_secs` left), by a request sent at `sent`.
    pub fn heard(&self, lease: i64, sent: std::time::Instant, ttl_secs: i64) {
        let mut s = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = std::time::Instant::now().max(sent);
        if now >= s.fresh_until {
            // It was cut off until this answer.
            s.recovered = Some(now);
        }
        if s.lease != lease {
            // A new lease: nothing that hung on the old one is this gateway's any more.
            s.fresh_until = sent;
        }
        s.lease = lease;
        s.heard = s.heard.max(sent);
        s.fresh_until = s.fresh_until.max(sent + ttl(ttl_secs));
    }

    /// The lease is gone (etcd said it expired).
    pub fn lost(&self) {
        let mut s = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        s.lease = 0;
    }

    /// The lease this gateway may still act on at `now` (`None`: none, or it may have lapsed).
    pub fn fresh_lease_at(&self, now: std::time::Instant) -> Option<i64> {
        let s = self.state();
        (s.lease != 0 && now < s.fresh_until).then_some(s.lease)
    }

    pub fn fresh_lease(&self) -> Option<i64> {
        self.fresh_lease_at(std::time::Instant::now())
    }

    /// Whether `lease` is still the one held and may not have lapsed.
    pub fn holds(&self, lease: i64) -> bool {
        self.fresh_lease() == Some(lease)
    }

    /// Since when this gateway may be behind: `None` while it is in contact, else how long
    /// ago it last heard a quorum.
    pub fn cut_off_at(&self, now: std::time::Instant) -> Option<Duration> {
        let s = self.state();
        (now >= s.fresh_until).then(|| now.saturating_duration_since(s.heard))
    }

    pub fn cut_off(&self) -> Option<Duration> {
        self.cut_off_at(std::time::Instant::now())
    }

    /// Whether this gateway was cut off at any time since `t` (or is now).
    pub fn cut_off_since(&self, t: std::time::Instant) -> bool {
        let now = std::time::Instant::now();
        let s = self.state();
        now >= s.fresh_until || s.recovered.is_some_and(|r| r >= t)
    }
}

fn ttl(secs: i64) -> Duration {
    Duration::from_secs(u64::try_from(secs).unwrap_or(0)).saturating_sub(LEASE_MARGIN)
}
/// How often the lease is renewed, and presence published without a change to wake it.
const TICK: Duration = Duration::from_millis(500);
/// How often an agent's timestamps alone (last seen, last watch) are published: well inside
/// the coordinator's `DEAD_AFTER_MS` (1.5 s), so another gateway never takes a live agent for
/// dead.
const REFRESH: Duration = Duration::from_millis(250);

/// Starts the follower (log and presence watches) and the presence publisher of gateway
/// `me` (its API address), from etcd `revision` (where the registry was read).
pub fn spawn(
    g: Arc<Gateway>,
    members: Vec<SocketAddr>,
    tls: Option<Arc<rustls::ClientConfig>>,
    revision: i64,
    me: String,
) {
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
                    follow_log(&g, &members, tls.as_ref(), log, revision),
                    follow_agents(&g, &members, tls.as_ref(), agents, &me),
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
#[allow(clippy::too_many_arguments)]
async fn follow(
    g: &Gateway,
    members: &[SocketAddr],
    tls: Option<&Arc<rustls::ClientConfig>>,
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
                r = crate::etcd::watch(member, tls, prefix, from, events) => r,
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
async fn follow_log(
    g: &Arc<Gateway>,
    members: &[SocketAddr],
    tls: Option<&Arc<rustls::ClientConfig>>,
    prefix: Vec<u8>,
    revision: i64,
) {
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
    follow(g, members, tls, &prefix, revision, "log", on, reload).await;
}

/// `<prefix>agents/<host>/<gateway>` → (host, gateway).
fn presence_key(prefix: &[u8], key: &[u8]) -> Option<(String, String)> {
    let rest = std::str::from_utf8(key.strip_prefix(prefix)?).ok()?;
    let (host, gw) = rest.split_once('/')?;
    Some((host.to_owned(), gw.to_owned()))
}

/// Other gateways' reports of their agents.
async fn follow_agents(
    g: &Arc<Gateway>,
    members: &[SocketAddr],
    tls: Option<&Arc<rustls::ClientConfig>>,
    prefix: Vec<u8>,
    me: &str,
) {
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
    follow(g, members, tls, &prefix, revision, "agents", on, load).await;
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
                let sent = std::time::Instant::now();
                let left = kv.keepalive(lease)?;
                if left == 0 {
                    // Whatever hung on it (presence, the runs this gateway drives) is gone.
                    g.quorum.lost();
                    warn!(lease = %format!("{lease:x}"), "etcd: this gateway's lease expired; publishing presence again");
                    lease = 0;
                } else {
                    g.quorum.heard(lease, sent, left);
                }
                renewed = sent;
            }
            if lease == 0 {
                let sent = std::time::Instant::now();
                lease = kv.grant(LEASE_TTL_SECS)?;
                g.quorum.heard(lease, sent, LEASE_TTL_SECS);
                renewed = sent;
                published.clear();
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

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::{LEASE_MARGIN, LEASE_TTL_SECS, Quorum};

    const TTL: Duration = Duration::from_secs(LEASE_TTL_SECS as u64);

    #[test]
    fn a_lease_is_acted_on_until_its_renewals_send_time_plus_the_ttl_less_the_margin() {
        let t0 = Instant::now();
        let q = Quorum::new(t0);
        // The registry was read at t0: in touch, but no lease to drive a run on.
        assert_eq!(q.fresh_lease_at(t0), None);
        assert_eq!(q.cut_off_at(t0), None);
        q.heard(7, t0, LEASE_TTL_SECS);
        let edge = t0 + TTL - LEASE_MARGIN;
        assert_eq!(q.fresh_lease_at(edge - Duration::from_millis(1)), Some(7));
        assert_eq!(
            q.fresh_lease_at(edge),
            None,
            "lapsed before etcd can let it go"
        );
        assert_eq!(q.cut_off_at(edge), Some(TTL - LEASE_MARGIN));
        // A renewal sent later (answered) moves the edge; one sent earlier does not move it back.
        let t1 = t0 + Duration::from_secs(1);
        q.heard(7, t1, LEASE_TTL_SECS);
        q.heard(7, t0, LEASE_TTL_SECS);
        assert_eq!(q.fresh_lease_at(edge), Some(7));
        assert_eq!(q.cut_off_at(edge), None);
        assert_eq!(q.fresh_lease_at(t1 + TTL - LEASE_MARGIN), None);
    }

    #[test]
    fn a_new_lease_does_not_inherit_the_old_ones_time_and_a_lost_lease_is_not_acted_on() {
        let t0 = Instant::now();
        let q = Quorum::new(t0);
        q.heard(1, t0 + Duration::from_secs(2), LEASE_TTL_SECS);
        // etcd says lease 1 expired; this gateway is still in touch.
        q.lost();
        let t = t0 + Duration::from_secs(3);
        assert_eq!(q.fresh_lease_at(t), None);
        assert_eq!(q.cut_off_at(t), None);
        // A new lease granted by a request sent at t counts from t, not from lease 1's
        // edge (t0 + 2 + TTL - margin, later than lease 2's with a 2 s TTL).
        q.heard(2, t, 2);
        assert_eq!(q.fresh_lease_at(t), Some(2));
        let lease2_edge = t + Duration::from_secs(2) - LEASE_MARGIN;
        assert!(lease2_edge < t0 + Duration::from_secs(2) + TTL - LEASE_MARGIN);
        assert_eq!(q.fresh_lease_at(lease2_edge), None);
    }

    #[test]
    fn a_gateway_that_never_hears_a_quorum_after_its_start_is_cut_off() {
        let t0 = Instant::now();
        let q = Quorum::new(t0);
        let later = t0 + Duration::from_secs(10);
        assert_eq!(q.cut_off_at(later), Some(Duration::from_secs(10)));
        assert_eq!(q.fresh_lease_at(later), None);
    }
}
