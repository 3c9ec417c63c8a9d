//! Several hosts facing the internet: who faces it when the one the registry names falls
//! silent.
//!
//! Every gateway-role agent sends a heartbeat datagram to every registered host every
//! `heartbeat_ms` (UDP on the underlay, to each host's VTEP at the port number of the peer
//! API, `api_listen`); every agent listens. The registry names the host facing the internet
//! ([`ferry_api::public_gateway`]). When an agent has not heard that host for `dead_after_ms`,
//! it acts at once on its own view ([`effective_facing`]): the first gateway-role host by name
//! among those it hears faces the internet — that host clears its standby flag and announces
//! the public addresses, every other agent sends the containers' traffic for outside the
//! overlay to it. The standby that now faces the internet also asks the registry to record it
//! (`POST /v1/public/takeover` naming the silent host: the registry's compare on `from` lets
//! exactly one standby win), and once the registry says so the agents' own view and the
//! registry's agree again. The local view only bridges the time the registry takes (an etcd
//! election when its leader died with the host); it never outlives the silence: a host that
//! is heard again is followed as the registry says. Agents that disagree (a partition) still
//! deliver: the translation is stateless, so a public address answers through either host.
//!
//! Heartbeats are accepted only from the VTEPs of gateway-role hosts in the registry
//! (containers cannot send from underlay addresses: from-container drops what a container
//! addresses to the underlay, and its source must be its own). Anything else is counted
//! (`ignored`) and dropped.

use std::{
    collections::BTreeMap,
    net::{SocketAddr, SocketAddrV4},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use ferry_api::{Client, HostInfo, HostRole};
use ferry_config::{AgentConfig, PublicFailover};
use tokio::{net::UdpSocket, time::Instant};
use tracing::{Instrument, debug, info, warn};

use crate::node::Node;

/// The heartbeat datagram: this prefix, then the sender's host name.
const MAGIC: &[u8] = b"ferry-public-heartbeat/1 ";

/// How much longer than `dead_after` a host never heard since this agent started watching it
/// is given (agents start together: the other may not know of this host yet).
pub const NEVER_HEARD_FACTOR: u32 = 10;

/// Who faces the internet as far as this agent can tell: the host the registry names
/// (`named`), unless it has been silent — for `dead_after` since its last heartbeat, or for
/// [`NEVER_HEARD_FACTOR`] times that since `watched` if never heard — and another
/// gateway-role host is heard (or is this one): then the first of those by name. `gateways`:
/// the registry's gateway-role hosts; `heard`: their last heartbeats.
pub fn effective_facing(
    me: &str,
    gateways: &[&str],
    named: Option<&str>,
    heard: &BTreeMap<String, Instant>,
    watched: Instant,
    now: Instant,
    dead_after: Duration,
) -> Option<String> {
    let named = named?;
    let alive = |h: &str| {
        h == me
            || heard
                .get(h)
                .is_some_and(|t| now.saturating_duration_since(*t) < dead_after)
    };
    let silent = match heard.get(named) {
        _ if named == me => false,
        Some(t) => now.saturating_duration_since(*t) >= dead_after,
        None => now.saturating_duration_since(watched) >= dead_after * NEVER_HEARD_FACTOR,
    };
    if !silent {
        return Some(named.to_owned());
    }
    let mut others: Vec<&str> = gateways
        .iter()
        .copied()
        .filter(|g| *g != named && alive(g))
        .collect();
    others.sort_unstable();
    Some(others.first().copied().unwrap_or(named).to_owned())
}

/// Events, by name, for `ferry_public_failover_total{event}`.
static EVENTS: [AtomicU64; 6] = [const { AtomicU64::new(0) }; 6];
const SENT: usize = 0;
const HEARD: usize = 1;
const IGNORED: usize = 2;
const WON: usize = 3;
const LOST: usize = 4;
const FAILED: usize = 5;

fn count(i: usize) {
    EVENTS[i].fetch_add(1, Ordering::Relaxed);
}

/// `ferry_public_failover_total` by `event`: heartbeats sent, heard, ignored (not from a
/// gateway-role host's VTEP, or malformed); takeovers won, lost (another standby was first,
/// or the silent host was not the one facing the internet any more), failed (the registry
/// could not be reached).
pub fn counters() -> [(&'static str, u64); 6] {
    let n = |i: usize| EVENTS[i].load(Ordering::Relaxed);
    [
        ("heartbeat_sent", n(SENT)),
        ("heartbeat_heard", n(HEARD)),
        ("heartbeat_ignored", n(IGNORED)),
        ("takeover_won", n(WON)),
        ("takeover_lost", n(LOST)),
        ("takeover_failed", n(FAILED)),
    ]
}

/// Runs until the task is dropped (agents with a gateway).
pub async fn run(cfg: AgentConfig, client: Client, node: Arc<tokio::sync::Mutex<Node>>) {
    let settings: PublicFailover = cfg.public_failover.clone();
    let port = cfg.api_listen.port();
    let bind = SocketAddrV4::new(cfg.vtep, port);
    let socket = match UdpSocket::bind(bind).await {
        Ok(s) => s,
        Err(e) => {
            warn!(%bind, error = %e, "public failover: cannot bind the heartbeat socket; this host follows the registry alone");
            return;
        }
    };
    let gateway_role = cfg.role == HostRole::Gateway;
    info!(%bind, gateway_role, heartbeat_ms = settings.heartbeat_ms, dead_after_ms = settings.dead_after_ms, "public failover: listening for the gateway-role hosts");
    let interval = Duration::from_millis(settings.heartbeat_ms.max(10));
    let dead_after = Duration::from_millis(settings.dead_after_ms.max(settings.heartbeat_ms * 2));
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let hello = [MAGIC, cfg.host.as_bytes()].concat();
    // The registry's hosts (and the version they are of), refreshed when the node is not busy
    // applying. A copy, not the snapshot: a clone of the registry's Arc held here would make
    // the next delta copy the whole snapshot instead of editing it in place.
    let mut hosts: Option<(u64, Vec<HostInfo>)> = None;
    let mut heard: BTreeMap<String, Instant> = BTreeMap::new();
    // Since when the host the registry names has been watched.
    let mut watching: Option<(String, Instant)> = None;
    // The facing host this agent applies instead of the registry's (None: the registry's).
    let mut overriding: Option<String> = None;
    let mut takeover: Option<tokio::task::JoinHandle<()>> = None;
    let mut buf = [0u8; 128];
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            r = socket.recv_from(&mut buf) => {
                match r {
                    Ok((n, from)) => {
                        accept(&buf[..n], from, hosts.as_ref().map(|(_, h)| &h[..]), &mut heard)
                    }
                    Err(e) => debug!(error = %e, "public failover: receiving"),
                }
                continue;
            }
        }
        if let Ok(n) = node.try_lock()
            && let Some(s) = &n.registry
            && hosts.as_ref().is_none_or(|(v, _)| *v != s.version)
        {
            hosts = Some((s.version, s.hosts.clone()));
        }
        let Some((_, known)) = &hosts else {
            continue;
        };
        let gateways: Vec<&str> = known
            .iter()
            .filter(|h| h.role == HostRole::Gateway)
            .map(|h| h.name.as_str())
            .collect();
        // Heartbeats matter only where another gateway-role host could take over.
        if gateway_role && gateways.len() > 1 {
            for h in known.iter().filter(|h| h.name != cfg.host) {
                let to = SocketAddr::V4(SocketAddrV4::new(h.vtep, port));
                match socket.send_to(&hello, to).await {
                    Ok(_) => count(SENT),
                    Err(e) => debug!(%to, error = %e, "public failover: sending a heartbeat"),
                }
            }
        }
        let now = Instant::now();
        let Some(named) = ferry_api::public_gateway(known).map(|h| h.name.clone()) else {
            watching = None;
            continue;
        };
        if watching.as_ref().is_none_or(|(w, _)| *w != named) {
            watching = Some((named.clone(), now));
        }
        let watched = watching.as_ref().map_or(now, |(_, t)| *t);
        let facing = effective_facing(
            &cfg.host,
            &gateways,
            Some(&named),
            &heard,
            watched,
            now,
            dead_after,
        )
        .unwrap_or_else(|| named.clone());
        let wanted = (facing != named).then(|| facing.clone());
        if wanted != overriding {
            match &wanted {
                Some(f) => {
                    warn!(silent = %named, facing = %f, "public failover: the host facing the internet is silent; acting on this agent's own view until the registry follows")
                }
                None => info!(facing = %named, "public failover: following the registry again"),
            }
            let errors = node.lock().await.set_facing_override(&cfg, wanted.clone());
            for e in &errors {
                warn!(error = %e, "public failover: applying the public side");
            }
            if errors.is_empty() {
                overriding = wanted;
            }
        }
        // This host faces the internet by its own view: the registry must record it.
        if gateway_role && facing == cfg.host && named != cfg.host {
            if takeover.as_ref().is_some_and(|t| !t.is_finished()) {
                continue;
            }
            takeover = Some(tokio::spawn(
                take_over(client.clone(), cfg.host.clone(), named).in_current_span(),
            ));
        }
    }
}

/// Asks the registry for `me` to take the internet side over from `from`. The client moves on
/// by itself from a gateway it cannot connect to, and the agent's heartbeat from one that
/// does not answer (the dead host may have run one); a live gateway may take a while to
/// answer when the etcd leader died with the host (an election first).
async fn take_over(client: Client, me: String, from: String) {
    let at = client.addr();
    match client.public_takeover(&me, &from).await {
        Ok(t) => {
            count(WON);
            info!(version = t.version, gateway = %client.addr(), "public failover: this host faces the internet now");
        }
        Err(e) if e.code() == Some("conflict") => {
            count(LOST);
            info!(error = %e, "public failover: not taken over (another host was first)");
        }
        Err(e) => {
            count(FAILED);
            warn!(gateway = %at, error = %e, "public failover: the takeover failed; trying again");
        }
    }
}

/// A datagram: counted as heard if it comes from a gateway-role host's VTEP and names it.
fn accept(
    data: &[u8],
    from: SocketAddr,
    hosts: Option<&[HostInfo]>,
    heard: &mut BTreeMap<String, Instant>,
) {
    let named = data
        .strip_prefix(MAGIC)
        .and_then(|n| std::str::from_utf8(n).ok());
    let from_ip = match from {
        SocketAddr::V4(a) => Some(*a.ip()),
        SocketAddr::V6(_) => None,
    };
    let known = match (named, hosts, from_ip) {
        (Some(name), Some(hosts), Some(ip)) => hosts
            .iter()
            .any(|h| h.role == HostRole::Gateway && h.name == name && h.vtep == ip),
        _ => false,
    };
    match named {
        Some(name) if known => {
            count(HEARD);
            if heard.insert(name.to_owned(), Instant::now()).is_none() {
                info!(gateway = %name, "public failover: first heartbeat of a gateway-role host");
            }
        }
        _ => {
            count(IGNORED);
            debug!(%from, "public failover: a datagram that is no gateway-role host's heartbeat; ignored");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_live_gateway_faces_the_internet_when_the_named_one_falls_silent() {
        let t0 = Instant::now();
        let dead = Duration::from_millis(500);
        let at = |ms| t0 + Duration::from_millis(ms);
        let gws = ["gw", "gw2", "gw3"];
        let heard = |list: &[(&str, u64)]| -> BTreeMap<String, Instant> {
            list.iter()
                .map(|(h, ms)| ((*h).to_owned(), at(*ms)))
                .collect()
        };
        let facing = |me: &str, h: &BTreeMap<String, Instant>, now: u64| {
            effective_facing(me, &gws, Some("gw"), h, t0, at(now), dead)
        };
        let all = heard(&[("gw", 1_000), ("gw2", 1_400), ("gw3", 1_400)]);
        // Heard: the registry's.
        assert_eq!(facing("a1", &all, 1_400).as_deref(), Some("gw"));
        // The named host never takes over from itself.
        assert_eq!(
            facing("gw", &BTreeMap::new(), 99_000).as_deref(),
            Some("gw")
        );
        // Silent: the first live one by name, for everyone (gw2 counts itself alive).
        assert_eq!(facing("a1", &all, 1_500).as_deref(), Some("gw2"));
        let no_gw2 = heard(&[("gw", 1_000), ("gw3", 1_400)]);
        assert_eq!(facing("a1", &no_gw2, 1_500).as_deref(), Some("gw3"));
        assert_eq!(facing("gw3", &no_gw2, 1_500).as_deref(), Some("gw3"));
        assert_eq!(
            facing("gw2", &heard(&[("gw", 1_000)]), 1_500).as_deref(),
            Some("gw2")
        );
        // Nobody else alive: the registry's, still.
        assert_eq!(
            facing("a1", &heard(&[("gw", 1_000)]), 1_500).as_deref(),
            Some("gw")
        );
        // Never heard: ten times as long from when it was first watched.
        let only_gw2 = heard(&[("gw2", 4_900)]);
        assert_eq!(facing("a1", &only_gw2, 4_999).as_deref(), Some("gw"));
        assert_eq!(
            facing("a1", &heard(&[("gw2", 5_000)]), 5_000).as_deref(),
            Some("gw2")
        );
        // Nothing named: nothing.
        assert_eq!(
            effective_facing("a1", &gws, None, &all, t0, at(0), dead),
            None
        );
    }

    #[test]
    fn heartbeats_count_only_from_a_gateway_role_hosts_vtep() {
        let host = |name: &str, vtep: &str, role| ferry_api::HostInfo {
            name: name.into(),
            vtep: vtep.parse().unwrap(),
            overlay_ip: "10.244.255.1".parse().unwrap(),
            role,
            active_since: None,
        };
        let snap = ferry_api::Snapshot {
            version: 1,
            overlay_cidr: "10.244.0.0/16".parse().unwrap(),
            overlay6_cidr: None,
            vni: 1,
            hosts: vec![
                host("gw", "198.18.0.10", HostRole::Gateway),
                host("gw2", "198.18.2.20", HostRole::Gateway),
                host("a1", "198.18.1.10", HostRole::Host),
            ],
            endpoints: vec![],
            public: vec![],
            migrations: vec![],
        };
        let mut heard = BTreeMap::new();
        let from = |ip: &str| SocketAddr::new(ip.parse().unwrap(), 7401);
        let msg = |name: &str| [MAGIC, name.as_bytes()].concat();
        accept(
            &msg("gw"),
            from("198.18.0.10"),
            Some(&snap.hosts),
            &mut heard,
        );
        assert!(heard.contains_key("gw"));
        // A host that is not a gateway, a name that does not match its address, garbage,
        // or nothing known yet: ignored.
        accept(
            &msg("a1"),
            from("198.18.1.10"),
            Some(&snap.hosts),
            &mut heard,
        );
        accept(
            &msg("gw2"),
            from("198.18.0.10"),
            Some(&snap.hosts),
            &mut heard,
        );
        accept(b"hello", from("198.18.0.10"), Some(&snap.hosts), &mut heard);
        accept(&msg("gw2"), from("198.18.2.20"), None, &mut heard);
        assert_eq!(heard.len(), 1);
    }
}
