//! Pure: what the datapath must hold, given the agent's configuration and the registry's
//! latest snapshot, and the difference to what it holds now. Tested without root.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use ferry_api::{HostRole, MacAddr, MigrationPhase, Snapshot};
use ferry_common::{Endpoint, NatKey, NatValue, Vtep, ipv4_be, kind};

use crate::config::AgentConfig;

pub use crate::config::container_netns_name;

/// Default TTL of the outer IPv4 header.
pub const TUNNEL_TTL: u32 = 64;

/// IANA-reserved protocol number marking "this address is public" in the public map (defined
/// with the map's key type, `NatKey::presence`).
pub const PRESENCE_PROTO: u8 = ferry_common::NatKey::PRESENCE_PROTO;

/// A container this host must run the network side of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalContainer {
    pub ip: Ipv4Addr,
    pub mac: MacAddr,
}

/// The desired state of this host's datapath.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Desired {
    /// Endpoint entries that do not depend on a local veth: this host (`HOST`) and everything
    /// living elsewhere (`REMOTE`). Local containers get their `LOCAL` entries once their veth
    /// exists (see [`local_entry`]).
    pub endpoints: BTreeMap<Ipv4Addr, Endpoint>,
    pub vteps: BTreeMap<Ipv4Addr, Vtep>,
    pub containers: BTreeMap<Ipv4Addr, LocalContainer>,
    /// Gateway only: public → container, plus one presence marker per public address.
    pub public: BTreeMap<NatKey, NatValue>,
    /// Gateway only: container → public.
    pub snat: BTreeMap<NatKey, NatValue>,
    /// Where containers' packets for outside the overlay go (the VTEP of the gateway-role host
    /// facing the internet, [`ferry_api::public_gateway`]); `None` on a gateway-role host or
    /// while no gateway is registered.
    pub egress_vtep: Option<Ipv4Addr>,
    /// Gateway role only: another gateway-role host faces the internet; this one translates
    /// what still reaches it but answers no ARP for the public addresses.
    pub public_standby: bool,
    /// Local containers whose entry is `HOLD` (a migration's destination before release):
    /// their packets are queued.
    pub hold: BTreeSet<Ipv4Addr>,
    /// Local containers built for a prepared migration to this host: their entry stays the
    /// registry's (`REMOTE` → the source) until the freeze makes it `HOLD`.
    pub staged: BTreeSet<Ipv4Addr>,
    /// Local containers whose entry is a forwarding pointer to another host's VTEP (a
    /// migration's source from freeze until the grace period after release): what reaches
    /// this host is sent on, what the frozen copy emits is dropped.
    pub forward: BTreeMap<Ipv4Addr, Ipv4Addr>,
    /// The registry version this was computed from (0: configuration only).
    pub version: u64,
    /// The VNI in use.
    pub vni: u32,
    /// Endpoints the snapshot places on hosts it does not list (ignored, reported), in
    /// address order.
    pub orphans: Vec<Ipv4Addr>,
    /// A plan patched from the previous one ([`patch`]): what may differ from it. `None`:
    /// anything may (a plan made afresh), and the apply compares everything.
    pub touched: Option<Touched>,
}

/// What a [`patch`] recomputed: the apply compares only these against what it applied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Touched {
    /// Addresses whose endpoint entry, local container, hold, staging or forwarding pointer
    /// was computed again.
    pub endpoints: BTreeSet<Ipv4Addr>,
    /// The translations (public and SNAT maps) were computed again.
    pub translations: bool,
}

/// Name → (VTEP, overlay address) of every host a plan knows: the static peers, then the
/// registry's (which wins on conflicts).
type Hosts = BTreeMap<String, (Ipv4Addr, Ipv4Addr)>;

fn hosts_of(cfg: &AgentConfig, snap: Option<&Snapshot>) -> Hosts {
    let mut hosts: Hosts = cfg
        .peers
        .iter()
        .map(|p| (p.name.clone(), (p.vtep, p.overlay_ip)))
        .collect();
    if let Some(s) = snap {
        for h in &s.hosts {
            hosts.insert(h.name.clone(), (h.vtep, h.overlay_ip));
        }
    }
    hosts
}

/// Whether `name` / `vtep` is this host (its own entry is `HOST`, it is no peer).
fn is_me(cfg: &AgentConfig, name: &str, vtep: Ipv4Addr) -> bool {
    name == cfg.host || vtep == cfg.vtep
}

/// The registry's record of `ip`: by binary search when the snapshot is in the gateway's
/// order (`sorted`), else by a walk.
fn record(s: &Snapshot, ip: Ipv4Addr, sorted: bool) -> Option<&ferry_api::Endpoint> {
    if sorted {
        s.endpoints
            .binary_search_by_key(&ip, |e| e.ip)
            .ok()
            .map(|i| &s.endpoints[i])
    } else {
        s.endpoints.iter().find(|e| e.ip == ip)
    }
}

fn is_sorted(s: &Snapshot) -> bool {
    s.endpoints.windows(2).all(|w| w[0].ip < w[1].ip)
}

fn remote(vtep: Ipv4Addr, vni: u32) -> Endpoint {
    Endpoint {
        kind: kind::REMOTE,
        vtep_be: ipv4_be(vtep.octets()),
        vni,
        ..Endpoint::default()
    }
}

/// The entry of a local container whose host-side veth has index `ifindex`: `LOCAL`, or
/// `HOLD` / a forwarding pointer while it migrates (both keep the veth's index and the MAC:
/// the hold device delivers by them at release, and from-container recognises the frozen
/// copy by them).
pub fn local_entry(d: &Desired, c: &LocalContainer, ifindex: u32) -> Endpoint {
    let mut e = Endpoint {
        kind: kind::LOCAL,
        ifindex,
        mac: c.mac.0,
        ..Endpoint::default()
    };
    if d.hold.contains(&c.ip) {
        e.kind = kind::HOLD;
    } else if let Some(vtep) = d.forward.get(&c.ip) {
        // The source process may still answer what reached it before the freeze (a hand-off
        // exports later): its output goes on until its connections are dumped, when the agent
        // adds DROP_EGRESS (see `Node::mark_dumped`).
        e.kind = kind::FORWARD;
        e.vtep_be = ipv4_be(vtep.octets());
        e.vni = d.vni;
    }
    e
}

/// Key of the public / SNAT maps for an address and optional (port, protocol).
pub fn nat_key(addr: Ipv4Addr, port: Option<(u16, u8)>) -> NatKey {
    let (port_be, proto) = port.map_or((0, 0), |(p, proto)| (p.to_be(), proto));
    NatKey {
        addr_be: ipv4_be(addr.octets()),
        port_be,
        proto,
        _pad: 0,
    }
}

fn nat_value(addr: Ipv4Addr, port: Option<u16>) -> NatValue {
    NatValue {
        addr_be: ipv4_be(addr.octets()),
        port_be: port.map_or(0, u16::to_be),
        _pad: [0; 2],
    }
}

/// The desired state: static peers from the configuration, overlaid by the snapshot.
pub fn desired(cfg: &AgentConfig, snap: Option<&Snapshot>) -> Desired {
    let vni = snap.map_or(cfg.vni, |s| s.vni);
    let mut d = Desired {
        version: snap.map_or(0, |s| s.version),
        vni,
        ..Desired::default()
    };
    d.endpoints.insert(
        cfg.overlay_ip,
        Endpoint {
            kind: kind::HOST,
            ..Endpoint::default()
        },
    );
    let hosts = hosts_of(cfg, snap);
    for (i, (name, (vtep, overlay_ip))) in hosts.iter().enumerate() {
        let host_id = u32::try_from(i + 1).unwrap_or(u32::MAX);
        if is_me(cfg, name, *vtep) {
            continue;
        }
        d.vteps.insert(*vtep, Vtep { vni, host_id });
        if *overlay_ip != cfg.overlay_ip {
            d.endpoints.insert(*overlay_ip, remote(*vtep, vni));
        }
    }
    let Some(s) = snap else {
        return d;
    };
    set_facing(
        &mut d,
        cfg,
        s,
        ferry_api::public_gateway(&s.hosts).map(|g| g.name.as_str()),
    );
    let mut remotes: Vec<(Ipv4Addr, Endpoint)> = Vec::with_capacity(s.endpoints.len());
    for ep in &s.endpoints {
        if ep.host == cfg.host {
            d.containers.insert(
                ep.ip,
                LocalContainer {
                    ip: ep.ip,
                    mac: ep.mac,
                },
            );
        } else if let Some((vtep, _)) = hosts.get(&ep.host) {
            remotes.push((ep.ip, remote(*vtep, vni)));
        } else {
            d.orphans.push(ep.ip);
        }
    }
    add_sorted(&mut d.endpoints, remotes);
    d.orphans.sort_unstable();
    d.orphans.dedup();
    let sorted = is_sorted(s);
    for m in &s.migrations {
        place_migration(&mut d, cfg, s, &hosts, m, sorted);
    }
    translations(&mut d, cfg, s);
    d
}

/// One migration's part of the plan (its container's entries): the destination builds the
/// container and holds it until release; from freeze on everyone else points at the
/// destination and the source forwards to it.
fn place_migration(
    d: &mut Desired,
    cfg: &AgentConfig,
    s: &Snapshot,
    hosts: &Hosts,
    m: &ferry_api::Migration,
    sorted: bool,
) {
    let Some(ep) = record(s, m.container, sorted) else {
        return;
    };
    let Some((to_vtep, _)) = hosts.get(&m.to) else {
        return;
    };
    let vni = d.vni;
    let me_from = m.from == cfg.host;
    let me_to = m.to == cfg.host;
    let container = LocalContainer {
        ip: m.container,
        mac: ep.mac,
    };
    match m.phase {
        // Prepared: the destination builds the container, but its entry still points at
        // the source (its own containers reach the migrating one there).
        MigrationPhase::Prepared if me_to => {
            d.containers.insert(m.container, container);
            d.staged.insert(m.container);
        }
        // Frozen: the destination holds from the first half of the freeze on.
        MigrationPhase::Frozen if me_to => {
            d.endpoints.remove(&m.container);
            d.containers.insert(m.container, container);
            d.hold.insert(m.container);
        }
        // The first half of a freeze changes nothing but the destination.
        MigrationPhase::Frozen if m.switch_pending => {}
        MigrationPhase::Frozen | MigrationPhase::Released if me_from => {
            d.endpoints.remove(&m.container);
            d.containers.insert(m.container, container);
            d.forward.insert(m.container, *to_vtep);
        }
        MigrationPhase::Frozen if !me_to => {
            d.endpoints.insert(m.container, remote(*to_vtep, vni));
        }
        _ => {}
    }
}

/// Gateway role only: both directions of every public mapping, and one presence marker per
/// public address (computed afresh).
fn translations(d: &mut Desired, cfg: &AgentConfig, s: &Snapshot) {
    d.public.clear();
    d.snat.clear();
    if cfg.role != HostRole::Gateway {
        return;
    }
    for m in &s.public {
        let port = match (m.public_port, m.container_port, m.proto) {
            (Some(pp), Some(cp), Some(proto)) => Some((pp, cp, proto.number())),
            _ => None,
        };
        d.public.insert(
            nat_key(m.public, Some((0, PRESENCE_PROTO))),
            nat_value(m.public, None),
        );
        match port {
            Some((pp, cp, proto)) => {
                d.public.insert(
                    nat_key(m.public, Some((pp, proto))),
                    nat_value(m.container, Some(cp)),
                );
                d.snat.insert(
                    nat_key(m.container, Some((cp, proto))),
                    nat_value(m.public, Some(pp)),
                );
            }
            None => {
                d.public
                    .insert(nat_key(m.public, None), nat_value(m.container, None));
                d.snat
                    .insert(nat_key(m.container, None), nat_value(m.public, None));
            }
        }
    }
}

/// Everything the plan holds for address `ip`, computed again from `s`, as [`desired`] would
/// (the property test `a_patched_plan_is_the_plan_made_afresh` holds them to it): a host's own
/// entry, the registry's record, then that container's migrations in order.
fn place(d: &mut Desired, cfg: &AgentConfig, s: &Snapshot, hosts: &Hosts, ip: Ipv4Addr) {
    d.endpoints.remove(&ip);
    d.containers.remove(&ip);
    d.hold.remove(&ip);
    d.staged.remove(&ip);
    d.forward.remove(&ip);
    if let Ok(i) = d.orphans.binary_search(&ip) {
        d.orphans.remove(i);
    }
    if ip == cfg.overlay_ip {
        d.endpoints.insert(
            ip,
            Endpoint {
                kind: kind::HOST,
                ..Endpoint::default()
            },
        );
    } else if let Some((vtep, _)) = hosts
        .iter()
        .rev()
        .find(|(name, (vtep, overlay_ip))| *overlay_ip == ip && !is_me(cfg, name, *vtep))
        .map(|(_, v)| v)
    {
        d.endpoints.insert(ip, remote(*vtep, d.vni));
    }
    if let Some(ep) = record(s, ip, true) {
        if ep.host == cfg.host {
            d.containers.insert(ip, LocalContainer { ip, mac: ep.mac });
        } else if let Some((vtep, _)) = hosts.get(&ep.host) {
            d.endpoints.insert(ip, remote(*vtep, d.vni));
        } else if let Err(i) = d.orphans.binary_search(&ip) {
            d.orphans.insert(i, ip);
        }
    }
    for m in s.migrations.iter().filter(|m| m.container == ip) {
        place_migration(d, cfg, s, hosts, m, true);
    }
}

/// `d`, the plan of the snapshot a delta applies to, patched into the plan of `s` (that
/// snapshot with `delta` applied; `before`: the migrations of the snapshot it applied to).
/// Only what the delta touches is computed again — the addresses of its endpoints, the
/// containers whose migrations changed, the translations if it changes a public mapping —
/// so a change costs O(its size × log n), not a plan of the whole registry. Returns false
/// (and leaves `d` as it was) when the delta changes what every entry depends on (hosts,
/// the VNI) or `d` is not the plan it applies to: plan afresh then. `s`'s endpoints must be
/// in the gateway's order.
pub fn patch(
    d: &mut Desired,
    cfg: &AgentConfig,
    s: &Snapshot,
    delta: &ferry_api::SnapshotDelta,
    before: &[ferry_api::Migration],
) -> bool {
    if d.version != delta.from
        || s.version != delta.version
        || d.vni != s.vni
        || !delta.hosts.is_empty()
        || !delta.hosts_removed.is_empty()
    {
        return false;
    }
    let hosts = hosts_of(cfg, Some(s));
    let mut touched: BTreeSet<Ipv4Addr> = delta
        .endpoints
        .iter()
        .map(|e| e.ip)
        .chain(delta.endpoints_removed.iter().copied())
        .collect();
    fn by_container(ms: &[ferry_api::Migration]) -> BTreeMap<Ipv4Addr, Vec<&ferry_api::Migration>> {
        let mut g: BTreeMap<Ipv4Addr, Vec<&ferry_api::Migration>> = BTreeMap::new();
        for m in ms {
            g.entry(m.container).or_default().push(m);
        }
        g
    }
    let (was, now) = (by_container(before), by_container(&s.migrations));
    for ip in was.keys().chain(now.keys()) {
        if was.get(ip) != now.get(ip) {
            touched.insert(*ip);
        }
    }
    for ip in &touched {
        place(d, cfg, s, &hosts, *ip);
    }
    let retranslate = !delta.public.is_empty() || !delta.public_removed.is_empty();
    if retranslate {
        translations(d, cfg, s);
    }
    d.version = s.version;
    d.egress_vtep = None;
    d.public_standby = false;
    set_facing(
        d,
        cfg,
        s,
        ferry_api::public_gateway(&s.hosts).map(|g| g.name.as_str()),
    );
    d.touched = Some(Touched {
        endpoints: touched,
        translations: retranslate,
    });
    true
}

/// The public side when `facing` (a gateway-role host of `s`) faces the internet: on a
/// gateway-role host, whether it stands by; on any other, where the containers' traffic for
/// outside the overlay goes. The registry decides `facing` ([`ferry_api::public_gateway`]);
/// the agent's own view replaces it while that host is silent (`crate::public_ha`).
pub fn set_facing(d: &mut Desired, cfg: &AgentConfig, s: &Snapshot, facing: Option<&str>) {
    let Some(g) = facing
        .and_then(|f| s.hosts.iter().find(|h| h.name == f))
        .filter(|h| h.role == HostRole::Gateway)
    else {
        return;
    };
    d.egress_vtep = None;
    d.public_standby = false;
    if cfg.role == HostRole::Gateway {
        d.public_standby = g.name != cfg.host;
    } else if g.name != cfg.host {
        d.egress_vtep = Some(g.vtep);
    }
}

/// Inserts `entries` into `map`, overriding what it holds (as inserting them one by one
/// would). With `entries` in increasing key order (a snapshot's endpoints are), the map is
/// built in one pass from the merged sequence instead of tens of thousands of inserts.
fn add_sorted<V>(map: &mut BTreeMap<Ipv4Addr, V>, entries: Vec<(Ipv4Addr, V)>) {
    if !entries.windows(2).all(|w| w[0].0 < w[1].0) {
        map.extend(entries);
        return;
    }
    let old = std::mem::take(map);
    let mut merged = Vec::with_capacity(old.len() + entries.len());
    let mut old = old.into_iter().peekable();
    for (k, v) in entries {
        while let Some((ok, _)) = old.peek() {
            if *ok > k {
                break;
            }
            let (ok, ov) = old.next().expect("peeked");
            if ok < k {
                merged.push((ok, ov));
            }
        }
        merged.push((k, v));
    }
    merged.extend(old);
    // Sorted and without duplicates: `collect` builds the tree in bulk.
    *map = merged.into_iter().collect();
}

/// What to change to go from `have` to `want`: entries to insert or replace, keys to remove.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diff<K, V> {
    pub upsert: Vec<(K, V)>,
    pub remove: Vec<K>,
}

impl<K, V> Diff<K, V> {
    pub fn is_empty(&self) -> bool {
        self.upsert.is_empty() && self.remove.is_empty()
    }
}

/// One ordered walk of both maps (a lookup per entry instead cost a third of an agent's time
/// per change at 65,536 endpoints): upserts and removals, each in key order.
pub fn diff<K: Ord + Clone, V: PartialEq + Clone>(
    have: &BTreeMap<K, V>,
    want: &BTreeMap<K, V>,
) -> Diff<K, V> {
    use std::cmp::Ordering;
    let (mut upsert, mut remove) = (Vec::new(), Vec::new());
    let (mut h, mut w) = (have.iter().peekable(), want.iter().peekable());
    loop {
        match (h.peek(), w.peek()) {
            (None, None) => break,
            (Some((hk, _)), None) => {
                remove.push((*hk).clone());
                h.next();
            }
            (None, Some((wk, wv))) => {
                upsert.push(((*wk).clone(), (*wv).clone()));
                w.next();
            }
            (Some((hk, hv)), Some((wk, wv))) => match hk.cmp(wk) {
                Ordering::Less => {
                    remove.push((*hk).clone());
                    h.next();
                }
                Ordering::Greater => {
                    upsert.push(((*wk).clone(), (*wv).clone()));
                    w.next();
                }
                Ordering::Equal => {
                    if hv != wv {
                        upsert.push(((*wk).clone(), (*wv).clone()));
                    }
                    h.next();
                    w.next();
                }
            },
        }
    }
    Diff { upsert, remove }
}

/// Containers to create (new, or whose MAC changed: recreated) and to delete.
pub fn container_changes(
    have: &BTreeMap<Ipv4Addr, LocalContainer>,
    want: &BTreeMap<Ipv4Addr, LocalContainer>,
) -> (Vec<LocalContainer>, Vec<Ipv4Addr>) {
    let d = diff(have, want);
    let recreated: BTreeSet<Ipv4Addr> = d
        .upsert
        .iter()
        .filter(|(ip, _)| have.contains_key(ip))
        .map(|(ip, _)| *ip)
        .collect();
    let mut delete = d.remove;
    delete.extend(recreated);
    delete.sort();
    (d.upsert.into_iter().map(|(_, c)| c).collect(), delete)
}

/// Name of the host side of a container's veth: `fc` + the address in hex (10 bytes, well
/// within IFNAMSIZ, unique per address).
pub fn container_host_if(ip: Ipv4Addr) -> String {
    format!("fc{:08x}", u32::from(ip))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::config::Peer;
    use ferry_api::{Endpoint as ApiEndpoint, HostInfo, Proto, PublicSpec};

    /// Host a1 (VTEP 198.18.1.10, overlay 10.244.255.1) in 10.244.0.0/16, with `role`.
    pub(crate) fn cfg(role: HostRole) -> AgentConfig {
        let mut c = AgentConfig::parse(
            std::path::Path::new("t.toml"),
            r#"
host = "a1"
vtep = "198.18.1.10"
overlay_ip = "10.244.255.1"
overlay_cidr = "10.244.0.0/16"
"#,
        )
        .unwrap();
        c.role = role;
        if role == HostRole::Gateway {
            c.public_interface = Some("pub".into());
        }
        c
    }

    fn host(name: &str, last: u8, role: HostRole) -> HostInfo {
        HostInfo {
            name: name.into(),
            vtep: Ipv4Addr::new(198, 18, 1, last),
            overlay_ip: Ipv4Addr::new(10, 244, 255, last - 9),
            role,
            active_since: None,
        }
    }

    fn ep(ip: [u8; 4], host: &str) -> ApiEndpoint {
        let ip = Ipv4Addr::from(ip);
        ApiEndpoint {
            ip,
            host: host.into(),
            mac: MacAddr::for_container(ip),
        }
    }

    fn snap() -> Snapshot {
        Snapshot {
            version: 7,
            overlay_cidr: "10.244.0.0/16".parse().unwrap(),
            overlay6_cidr: None,
            vni: 4242,
            hosts: vec![
                host("a1", 10, HostRole::Host),
                host("a2", 11, HostRole::Host),
                host("gw", 12, HostRole::Gateway),
            ],
            endpoints: vec![
                ep([10, 244, 1, 5], "a1"),
                ep([10, 244, 2, 5], "a2"),
                ep([10, 244, 9, 9], "ghost"),
            ],
            migrations: vec![],
            public: vec![
                PublicSpec {
                    public: "203.0.113.130".parse().unwrap(),
                    public_port: None,
                    container: "10.244.1.5".parse().unwrap(),
                    container_port: None,
                    proto: None,
                },
                PublicSpec {
                    public: "203.0.113.131".parse().unwrap(),
                    public_port: Some(8080),
                    container: "10.244.2.5".parse().unwrap(),
                    container_port: Some(80),
                    proto: Some(Proto::Tcp),
                },
            ],
        }
    }

    #[test]
    fn config_only_plan_has_host_and_static_peers() {
        let mut c = cfg(HostRole::Host);
        c.peers.push(Peer {
            name: "a2".into(),
            vtep: "198.18.1.11".parse().unwrap(),
            overlay_ip: "10.244.255.2".parse().unwrap(),
        });
        let d = desired(&c, None);
        assert_eq!(d.endpoints.len(), 2);
        assert_eq!(d.endpoints[&c.overlay_ip].kind, kind::HOST);
        let a2 = d.endpoints[&"10.244.255.2".parse().unwrap()];
        assert_eq!(a2.kind, kind::REMOTE);
        assert_eq!(a2.vtep_be, ipv4_be([198, 18, 1, 11]));
        assert_eq!(d.vteps.len(), 1);
        assert!(d.containers.is_empty());
        assert_eq!(d.egress_vtep, None);
    }

    #[test]
    fn snapshot_places_endpoints_locally_or_remotely() {
        let d = desired(&cfg(HostRole::Host), Some(&snap()));
        assert_eq!(d.version, 7);
        let local: Ipv4Addr = "10.244.1.5".parse().unwrap();
        let remote_ip: Ipv4Addr = "10.244.2.5".parse().unwrap();
        assert_eq!(d.containers[&local].mac, MacAddr::for_container(local));
        assert!(
            !d.endpoints.contains_key(&local),
            "LOCAL entries come later"
        );
        assert_eq!(d.endpoints[&remote_ip].kind, kind::REMOTE);
        assert_eq!(d.endpoints[&remote_ip].vtep_be, ipv4_be([198, 18, 1, 11]));
        assert_eq!(d.orphans, vec!["10.244.9.9".parse::<Ipv4Addr>().unwrap()]);
        // Every other host's VTEP is allowed; our own is not.
        assert_eq!(d.vteps.len(), 2);
        assert!(!d.vteps.contains_key(&"198.18.1.10".parse().unwrap()));
        assert_eq!(d.egress_vtep, Some("198.18.1.12".parse().unwrap()));
        // Public mappings only matter on the gateway.
        assert!(d.public.is_empty() && d.snat.is_empty());
    }

    #[test]
    fn gateway_gets_both_nat_directions_and_presence_markers() {
        let mut c = cfg(HostRole::Gateway);
        c.host = "gw".into();
        c.vtep = "198.18.1.12".parse().unwrap();
        c.overlay_ip = "10.244.255.3".parse().unwrap();
        let d = desired(&c, Some(&snap()));
        assert_eq!(d.egress_vtep, None);
        let pub1: Ipv4Addr = "203.0.113.130".parse().unwrap();
        let pub2: Ipv4Addr = "203.0.113.131".parse().unwrap();
        // 2 presence markers + 1 whole-IP + 1 port mapping.
        assert_eq!(d.public.len(), 4);
        assert!(
            d.public
                .contains_key(&nat_key(pub1, Some((0, PRESENCE_PROTO))))
        );
        let whole = d.public[&nat_key(pub1, None)];
        assert_eq!(whole.addr_be, ipv4_be([10, 244, 1, 5]));
        assert_eq!(whole.port_be, 0);
        let port = d.public[&nat_key(pub2, Some((8080, 6)))];
        assert_eq!(port.addr_be, ipv4_be([10, 244, 2, 5]));
        assert_eq!(u16::from_be(port.port_be), 80);
        let back = d.snat[&nat_key("10.244.2.5".parse().unwrap(), Some((80, 6)))];
        assert_eq!(back.addr_be, ipv4_be([203, 0, 113, 131]));
        assert_eq!(u16::from_be(back.port_be), 8080);
        assert_eq!(d.snat.len(), 2);
    }

    #[test]
    fn the_gateway_facing_the_internet_carries_egress_and_the_other_stands_by() {
        let mut s = snap();
        s.hosts.push(host("gw2", 13, HostRole::Gateway));
        let gw_cfg = |name: &str, last: u8| {
            let mut c = cfg(HostRole::Gateway);
            c.host = name.into();
            c.vtep = Ipv4Addr::new(198, 18, 1, last);
            c.overlay_ip = Ipv4Addr::new(10, 244, 255, last - 9);
            c
        };
        // No takeover yet: the first by name faces the internet.
        let d = desired(&cfg(HostRole::Host), Some(&s));
        assert_eq!(d.egress_vtep, Some("198.18.1.12".parse().unwrap()));
        assert!(!desired(&gw_cfg("gw", 12), Some(&s)).public_standby);
        let standby = desired(&gw_cfg("gw2", 13), Some(&s));
        assert!(standby.public_standby);
        assert_eq!(standby.egress_vtep, None);
        // Both translate: the standby still holds every public entry.
        assert_eq!(standby.public.len(), 4);
        // gw2 took over.
        s.hosts[3].active_since = Some(8);
        let d = desired(&cfg(HostRole::Host), Some(&s));
        assert_eq!(d.egress_vtep, Some("198.18.1.13".parse().unwrap()));
        assert!(desired(&gw_cfg("gw", 12), Some(&s)).public_standby);
        assert!(!desired(&gw_cfg("gw2", 13), Some(&s)).public_standby);
    }

    mod patched {
        //! The patched plan against the plan made afresh, over random snapshots and deltas.
        use proptest::prelude::*;

        use super::*;

        const NAMES: [&str; 5] = ["a1", "a2", "b1", "gw", "zz"];
        const PHASES: [MigrationPhase; 4] = [
            MigrationPhase::Prepared,
            MigrationPhase::Frozen,
            MigrationPhase::Released,
            MigrationPhase::Aborted,
        ];

        /// Addresses that collide: containers, and the hosts' overlay addresses (10.244.255.1–4).
        fn addr() -> impl Strategy<Value = Ipv4Addr> {
            (prop::sample::select(vec![1u8, 2, 255]), 0u8..12)
                .prop_map(|(c, d)| Ipv4Addr::new(10, 244, c, d))
        }

        fn record() -> impl Strategy<Value = (Ipv4Addr, ApiEndpoint)> {
            (addr(), 0usize..5, any::<u8>()).prop_map(|(ip, h, m)| {
                (
                    ip,
                    ApiEndpoint {
                        ip,
                        host: NAMES[h].into(),
                        mac: MacAddr([0x0e, 0, 0, 0, 1, m]),
                    },
                )
            })
        }

        fn mapping() -> impl Strategy<Value = PublicSpec> {
            (0u8..4, prop::option::of(1u16..3), addr()).prop_map(|(p, port, c)| PublicSpec {
                public: Ipv4Addr::new(203, 0, 113, p),
                public_port: port,
                container: c,
                container_port: port.map(|p| p + 100),
                proto: port.map(|_| Proto::Tcp),
            })
        }

        fn migrations() -> impl Strategy<Value = Vec<ferry_api::Migration>> {
            prop::collection::vec(
                (addr(), 0usize..5, 0usize..5, 0usize..4, any::<bool>()),
                0..4,
            )
            .prop_map(|v| {
                v.into_iter()
                    .enumerate()
                    .map(|(i, (ip, f, t, p, pending))| ferry_api::Migration {
                        switch_pending: pending,
                        ..ferry_api::Migration::new(
                            format!("m{i}"),
                            ip,
                            NAMES[f],
                            NAMES[t],
                            PHASES[p],
                        )
                    })
                    .collect()
            })
        }

        fn hosts() -> impl Strategy<Value = Vec<HostInfo>> {
            prop::collection::btree_set(0usize..4, 1..5).prop_map(|set| {
                set.into_iter()
                    .map(|i| {
                        let role = if NAMES[i] == "gw" {
                            HostRole::Gateway
                        } else {
                            HostRole::Host
                        };
                        host(NAMES[i], 10 + i as u8, role)
                    })
                    .collect()
            })
        }

        prop_compose! {
            fn snapshot()(
                hosts in hosts(),
                eps in prop::collection::btree_map(addr(), (0usize..5, any::<u8>()), 0..30),
                public in prop::collection::vec(mapping(), 0..4),
                migrations in migrations(),
            ) -> Snapshot {
                let mut public: BTreeMap<ferry_api::PublicKey, PublicSpec> =
                    public.into_iter().map(|m| (m.public_key(), m)).collect();
                Snapshot {
                    version: 5,
                    overlay_cidr: "10.244.0.0/16".parse().unwrap(),
                    overlay6_cidr: None,
                    vni: 7,
                    hosts,
                    endpoints: eps
                        .into_iter()
                        .map(|(ip, (h, m))| ApiEndpoint {
                            ip,
                            host: NAMES[h].into(),
                            mac: MacAddr([0x0e, 0, 0, 0, 1, m]),
                        })
                        .collect(),
                    public: std::mem::take(&mut public).into_values().collect(),
                    migrations,
                }
            }
        }

        prop_compose! {
            /// A delta from version 5: endpoints upserted and removed, sometimes the
            /// migrations or a public mapping changed, rarely a host.
            fn delta()(
                upserts in prop::collection::vec(record(), 0..8),
                removed in prop::collection::vec(addr(), 0..4),
                migrations in prop::option::weighted(0.5, migrations()),
                public in prop::collection::vec(mapping(), 0..2),
                public_removed in prop::collection::vec(mapping(), 0..2),
                new_host in prop::option::weighted(0.1, 0usize..4),
            ) -> (ferry_api::SnapshotDelta, Option<Vec<ferry_api::Migration>>) {
                (ferry_api::SnapshotDelta {
                    from: 5,
                    version: 6,
                    overlay_cidr: "10.244.0.0/16".parse().unwrap(),
                    overlay6_cidr: None,
                    vni: 7,
                    hosts: new_host.map(|i| host(NAMES[i], 20 + i as u8, HostRole::Host)).into_iter().collect(),
                    hosts_removed: Vec::new(),
                    endpoints: upserts.into_iter().map(|(_, e)| e).collect(),
                    endpoints_removed: removed,
                    public,
                    public_removed: public_removed.iter().map(PublicSpec::key).collect(),
                    migrations: Vec::new(),
                }, migrations)
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]
            /// Whatever the delta, the patched plan is the plan made afresh from the new
            /// snapshot (for a worker and for the gateway), or the patch declines (hosts
            /// changed) and leaves the plan alone.
            #[test]
            fn a_patched_plan_is_the_plan_made_afresh(
                base in snapshot(),
                (mut d, migrations) in delta(),
                gateway in any::<bool>(),
            ) {
                d.migrations = migrations.unwrap_or_else(|| base.migrations.clone());
                let cfg = cfg(if gateway { HostRole::Gateway } else { HostRole::Host });
                let new = d.apply_to(&base).unwrap();
                let old = desired(&cfg, Some(&base));
                let mut patched = old.clone();
                if patch(&mut patched, &cfg, &new, &d, &base.migrations) {
                    prop_assert!(d.hosts.is_empty());
                    let touched = patched.touched.take().unwrap();
                    prop_assert_eq!(&patched, &desired(&cfg, Some(&new)));
                    // What was not touched did not change.
                    for (ip, e) in &old.endpoints {
                        if !touched.endpoints.contains(ip) {
                            prop_assert_eq!(patched.endpoints.get(ip), Some(e));
                        }
                    }
                    if !touched.translations {
                        prop_assert_eq!(&patched.public, &old.public);
                    }
                } else {
                    prop_assert!(!d.hosts.is_empty());
                    prop_assert_eq!(patched, old);
                }
            }
        }
    }

    fn migration(phase: MigrationPhase) -> ferry_api::Migration {
        ferry_api::Migration {
            created_unix_ms: 1,
            updated_unix_ms: 1,
            ..ferry_api::Migration::new("m1", "10.244.1.5".parse().unwrap(), "a1", "a2", phase)
        }
    }

    fn on(host: &str, last: u8) -> AgentConfig {
        let mut c = cfg(HostRole::Host);
        c.host = host.into();
        c.vtep = Ipv4Addr::new(198, 18, 1, last);
        c.overlay_ip = Ipv4Addr::new(10, 244, 255, last - 9);
        c
    }

    #[test]
    fn migration_phases_place_hold_and_forwarding_pointers() {
        let ip: Ipv4Addr = "10.244.1.5".parse().unwrap();
        let (a1, a2, gw) = (on("a1", 10), on("a2", 11), on("gw", 12));
        let a2_vtep = ipv4_be([198, 18, 1, 11]);
        let a1_vtep = ipv4_be([198, 18, 1, 10]);
        let with = |phase, host: &str| {
            let mut s = snap();
            s.migrations = vec![migration(phase)];
            s.endpoints[0].host = host.into();
            s
        };

        // Prepared: a2 builds it but does not hold: its entry still points at a1 (a2's own
        // containers reach it there); a1 keeps it; the rest still sends to a1.
        let s = with(MigrationPhase::Prepared, "a1");
        let d = desired(&a2, Some(&s));
        assert!(d.containers.contains_key(&ip) && d.staged.contains(&ip) && d.hold.is_empty());
        assert_eq!(
            (d.endpoints[&ip].kind, d.endpoints[&ip].vtep_be),
            (kind::REMOTE, a1_vtep),
            "the registry's entry, not the built veth's"
        );
        let d = desired(&a1, Some(&s));
        assert!(d.containers.contains_key(&ip) && d.hold.is_empty() && d.forward.is_empty());
        assert_eq!(desired(&gw, Some(&s)).endpoints[&ip].vtep_be, a1_vtep);

        // Frozen, first half: a2 holds; nobody else changes yet.
        let mut s = with(MigrationPhase::Frozen, "a1");
        s.migrations[0].switch_pending = true;
        let d = desired(&a2, Some(&s));
        assert!(d.hold.contains(&ip) && !d.staged.contains(&ip));
        assert!(
            !d.endpoints.contains_key(&ip),
            "its entry comes from the built veth"
        );
        let d = desired(&a1, Some(&s));
        assert!(
            d.containers.contains_key(&ip) && d.forward.is_empty(),
            "a1 still LOCAL"
        );
        assert_eq!(desired(&gw, Some(&s)).endpoints[&ip].vtep_be, a1_vtep);

        // Frozen: everyone sends to a2, a1 forwards there and drops its copy's output.
        let s = with(MigrationPhase::Frozen, "a1");
        assert!(desired(&a2, Some(&s)).hold.contains(&ip));
        let d = desired(&a1, Some(&s));
        assert_eq!(d.forward.get(&ip), Some(&"198.18.1.11".parse().unwrap()));
        let e = local_entry(&d, &d.containers[&ip], 42);
        assert_eq!(
            (e.kind, e.flags, e.vtep_be, e.ifindex),
            (kind::FORWARD, 0, a2_vtep, 42)
        );
        let g = desired(&gw, Some(&s));
        assert_eq!(
            (g.endpoints[&ip].kind, g.endpoints[&ip].vtep_be),
            (kind::REMOTE, a2_vtep)
        );

        // Released: the endpoint lives on a2 (LOCAL there), a1 still forwards.
        let s = with(MigrationPhase::Released, "a2");
        let d = desired(&a2, Some(&s));
        assert!(d.containers.contains_key(&ip) && d.hold.is_empty());
        assert_eq!(local_entry(&d, &d.containers[&ip], 7).kind, kind::LOCAL);
        assert!(desired(&a1, Some(&s)).forward.contains_key(&ip));
        assert_eq!(desired(&gw, Some(&s)).endpoints[&ip].vtep_be, a2_vtep);

        // Gone from the snapshot (grace over, or aborted): back to plain placement.
        let mut s = snap();
        s.endpoints[0].host = "a1".into();
        assert!(!desired(&a2, Some(&s)).containers.contains_key(&ip));
        assert!(desired(&a1, Some(&s)).forward.is_empty());
    }

    #[test]
    fn sorted_entries_override_as_single_inserts_would() {
        let ip = |n: u8| Ipv4Addr::new(10, 0, 0, n);
        for (have, add) in [
            (vec![1, 5, 9], vec![2, 5, 10]),
            (vec![], vec![1, 2]),
            (vec![3], vec![]),
            (vec![1, 2, 3], vec![1, 2, 3]),
            (vec![7, 8], vec![1, 2]),
            (vec![1, 2], vec![3, 2]), // not sorted: inserted one by one
        ] {
            let start: BTreeMap<Ipv4Addr, &str> = have.iter().map(|n| (ip(*n), "old")).collect();
            let entries: Vec<(Ipv4Addr, &str)> = add.iter().map(|n| (ip(*n), "new")).collect();
            let mut want = start.clone();
            for (k, v) in entries.clone() {
                want.insert(k, v);
            }
            let mut got = start;
            add_sorted(&mut got, entries);
            assert_eq!(got, want, "{have:?} + {add:?}");
        }
    }

    /// The ordered walk gives what a lookup per entry gives, on maps of every overlap.
    #[test]
    fn diff_by_walk_matches_diff_by_lookup() {
        let mut x = 0x9e37_79b9u64;
        let mut roll = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        for _ in 0..300 {
            let map = |roll: &mut dyn FnMut(u64) -> u64| -> BTreeMap<u8, u8> {
                (0..roll(40))
                    .map(|_| (roll(60) as u8, roll(3) as u8))
                    .collect()
            };
            let (have, want) = (map(&mut roll), map(&mut roll));
            let d = diff(&have, &want);
            let upsert: Vec<(u8, u8)> = want
                .iter()
                .filter(|(k, v)| have.get(k) != Some(v))
                .map(|(k, v)| (*k, *v))
                .collect();
            let remove: Vec<u8> = have
                .keys()
                .filter(|k| !want.contains_key(k))
                .copied()
                .collect();
            assert_eq!(
                (d.upsert, d.remove),
                (upsert, remove),
                "{have:?} → {want:?}"
            );
        }
    }

    #[test]
    fn diff_finds_inserts_changes_and_removals() {
        let have: BTreeMap<u32, u32> = [(1, 1), (2, 2), (3, 3)].into();
        let want: BTreeMap<u32, u32> = [(2, 2), (3, 30), (4, 4)].into();
        let d = diff(&have, &want);
        assert_eq!(d.upsert, vec![(3, 30), (4, 4)]);
        assert_eq!(d.remove, vec![1]);
        assert!(diff(&want, &want).is_empty());
    }

    #[test]
    fn a_changed_mac_recreates_the_container() {
        let ip: Ipv4Addr = "10.244.1.5".parse().unwrap();
        let other: Ipv4Addr = "10.244.1.6".parse().unwrap();
        let c = |ip, mac| LocalContainer { ip, mac };
        let have = BTreeMap::from([
            (ip, c(ip, MacAddr::for_container(ip))),
            (other, c(other, MacAddr::for_container(other))),
        ]);
        let want = BTreeMap::from([(ip, c(ip, MacAddr([0x0e, 1, 2, 3, 4, 5])))]);
        let (create, delete) = container_changes(&have, &want);
        assert_eq!(create, vec![c(ip, MacAddr([0x0e, 1, 2, 3, 4, 5]))]);
        assert_eq!(delete, vec![ip, other]);
    }

    #[test]
    fn names_fit_the_kernel_limits() {
        let ip: Ipv4Addr = "10.244.255.254".parse().unwrap();
        assert_eq!(container_host_if(ip), "fc0af4fffe");
        assert!(container_host_if(ip).len() <= 15);
        assert_eq!(container_netns_name("x-", ip), "x-10-244-255-254");
    }
}
