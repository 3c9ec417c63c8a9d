//! The wire types. Every struct denies unknown fields, so a typo in a request is an error, not
//! a silently ignored field.

use std::{fmt, net::Ipv4Addr, str::FromStr};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

/// Path prefix of this API version.
pub const API_PREFIX: &str = "/v1";
/// The API version string reported by `/v1/health`.
pub const API_VERSION: &str = "v1";

/// `GET /v1/health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Health {
    pub status: String,
    pub api: String,
    pub version: String,
}

/// What a host is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum HostRole {
    /// Runs containers.
    #[default]
    Host,
    /// Faces the internet: public addresses are translated here, containers leave through it.
    /// Several hosts may have this role: one faces the internet at a time, the others stand
    /// by ([`public_gateway`]).
    Gateway,
}

/// An agent's registration (`POST /v1/hosts`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostInfo {
    /// Host name: 1–32 characters of `[a-z0-9-]`, starting with a letter or digit.
    pub name: String,
    /// The host's underlay address, the VXLAN tunnel endpoint other hosts encapsulate to.
    pub vtep: Ipv4Addr,
    /// The host's own address inside the overlay.
    pub overlay_ip: Ipv4Addr,
    #[serde(default)]
    pub role: HostRole,
    /// Role `gateway` only, and the registry's to set (a registration's value is ignored, the
    /// stored one kept): the registry version at which this host took over the internet side
    /// (`POST /v1/public/takeover`). See [`public_gateway`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_since: Option<u64>,
}

/// Of several hosts with role `gateway`, the one facing the internet now: it answers ARP for
/// the public addresses and containers leave through it (the others translate what still
/// reaches them, but stay silent). The latest to take over (`active_since`); before any
/// takeover, the first by name. Agents and the registry decide it the same way.
pub fn public_gateway<'a>(hosts: impl IntoIterator<Item = &'a HostInfo>) -> Option<&'a HostInfo> {
    hosts
        .into_iter()
        .filter(|h| h.role == HostRole::Gateway)
        .max_by(|a, b| {
            a.active_since
                .unwrap_or(0)
                .cmp(&b.active_since.unwrap_or(0))
                .then_with(|| b.name.cmp(&a.name))
        })
}

/// Body of `POST /v1/public/takeover`: `host` (role `gateway`) takes the internet side over
/// from `from`, the gateway host facing it now (refused with `conflict` if that is another:
/// of two standbys taking over from the same dead host, one wins).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublicTakeoverRequest {
    pub host: String,
    pub from: String,
}

/// Answer of `POST /v1/public/takeover`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublicTakeover {
    /// The host facing the internet now.
    pub host: HostInfo,
    /// The registry version that says so.
    pub version: u64,
}

/// A registered host as the gateway sees it (`GET /v1/hosts`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostStatus {
    #[serde(flatten)]
    pub info: HostInfo,
    /// The newest snapshot version this host's agent reported as applied.
    pub applied_version: u64,
    /// Unix time (ms) of the agent's last request; 0 if never seen since the gateway started.
    pub last_seen_unix_ms: u64,
    /// Whether the agent currently holds a watch open.
    pub connected: bool,
}

/// A MAC address, written `0e:fc:0a:f4:01:05` in JSON.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// The MAC ferry gives a container that asked for none: locally administered, unicast,
    /// `0e:fc:` followed by the IPv4 address.
    pub fn for_container(ip: Ipv4Addr) -> Self {
        let o = ip.octets();
        Self([0x0e, 0xfc, o[0], o[1], o[2], o[3]])
    }
    pub fn is_unicast(&self) -> bool {
        self.0[0] & 1 == 0
    }
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 6]
    }
    /// In `0e:fe:…`, the prefix ferry keeps for its own interfaces: the gateway MAC every
    /// host-side container veth carries (`ferry_common::GATEWAY_MAC`, `0e:fe:00:00:00:01`) and
    /// each host's VXLAN device (`ferry_overlay::netlink::vxlan_mac`, `0e:fe:` + its overlay
    /// address). A container with such a MAC would be taken for the host side (its own
    /// neighbour entry for the gateway, the kernel's VXLAN loop check), so endpoints cannot have
    /// one.
    pub fn is_ferry_reserved(&self) -> bool {
        self.0[..2] == RESERVED_MAC_PREFIX
    }
}

/// The first two bytes of the MACs ferry keeps for itself (see [`MacAddr::is_ferry_reserved`]).
pub const RESERVED_MAC_PREFIX: [u8; 2] = [0x0e, 0xfe];

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for MacAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(format!(
                "invalid MAC address {s:?}: want six hex pairs like 0e:fc:0a:f4:01:05"
            ));
        }
        let mut m = [0u8; 6];
        for (i, p) in parts.iter().enumerate() {
            // `from_str_radix` alone would also take a sign ("+f").
            if p.len() != 2 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!(
                    "invalid MAC address {s:?}: {p:?} is not a hex pair"
                ));
            }
            m[i] = u8::from_str_radix(p, 16)
                .map_err(|_| format!("invalid MAC address {s:?}: {p:?} is not a hex pair"))?;
        }
        Ok(Self(m))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A container endpoint to create (`POST /v1/endpoints`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSpec {
    /// The container's overlay address (inside the overlay CIDR, not a host's overlay address).
    pub ip: Ipv4Addr,
    /// The registered host it lives on.
    pub host: String,
    /// Default: [`MacAddr::for_container`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<MacAddr>,
}

/// Body of `POST /v1/endpoints`: one or many, applied all or nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointsRequest {
    pub endpoints: Vec<EndpointSpec>,
}

/// A container endpoint in the registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    pub host: String,
    pub mac: MacAddr,
}

/// Transport protocol of a port mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// IANA protocol number.
    pub const fn number(self) -> u8 {
        match self {
            Proto::Tcp => 6,
            Proto::Udp => 17,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

impl FromStr for Proto {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tcp" => Ok(Proto::Tcp),
            "udp" => Ok(Proto::Udp),
            _ => Err(format!("invalid protocol {s:?}: want tcp or udp")),
        }
    }
}

/// A public endpoint to create (`POST /v1/public`). Either whole-IP (no ports, no proto: every
/// packet to `public` goes to `container`, and the container's traffic leaves as `public`), or
/// a port mapping (`public_port`, `container_port` and `proto` all set).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublicSpec {
    pub public: Ipv4Addr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_port: Option<u16>,
    pub container: Ipv4Addr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container_port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proto: Option<Proto>,
}

/// A public endpoint in the registry (same fields as the request once validated).
pub type PublicMapping = PublicSpec;

impl PublicSpec {
    /// The mapping's identity: `203.0.113.130` (whole IP) or `203.0.113.130:8080/tcp`.
    pub fn key(&self) -> String {
        match (self.public_port, self.proto) {
            (Some(p), Some(proto)) => format!("{}:{p}/{proto}", self.public),
            _ => self.public.to_string(),
        }
    }

    /// Whether this is a whole-IP (1:1) mapping.
    pub fn is_whole_ip(&self) -> bool {
        self.public_port.is_none()
    }
}

/// What every agent needs to program its datapath (`GET /v1/watch`). Sent whole, so an agent
/// that missed changes (or restarted) converges from any state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Snapshot {
    /// Increases by one with every change; persisted with the state.
    pub version: u64,
    pub overlay_cidr: Ipv4Net,
    /// Dual-stack overlay: the /96 each endpoint's IPv6 address lives in (the prefix followed
    /// by its IPv4 address). Every agent must be configured with the same.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay6_cidr: Option<ipnet::Ipv6Net>,
    pub vni: u32,
    pub hosts: Vec<HostInfo>,
    pub endpoints: Vec<Endpoint>,
    pub public: Vec<PublicMapping>,
    /// Migrations the agents must act on: every `prepared` or `frozen` one, and `released`
    /// ones until their forwarding grace period ends. (Aborted and finished ones are history,
    /// listed by `GET /v1/migrations`, not here.)
    #[serde(default)]
    pub migrations: Vec<Migration>,
}

/// What changed in the registry between two versions (`GET /v1/watch?…&delta=true`): the
/// hosts, endpoints and public mappings added or changed (whole) and the keys of those removed,
/// plus the whole list of migrations (live ones only: a handful). Its size follows the change,
/// not the registry. Applied to the snapshot of version `from` it gives the snapshot of
/// `version` ([`SnapshotDelta::apply_to`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotDelta {
    /// The version of the snapshot this applies to (the agent's).
    pub from: u64,
    /// The version it gives.
    pub version: u64,
    pub overlay_cidr: Ipv4Net,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay6_cidr: Option<ipnet::Ipv6Net>,
    pub vni: u32,
    /// Added or changed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<HostInfo>,
    /// Names of hosts removed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts_removed: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<Endpoint>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints_removed: Vec<Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub public: Vec<PublicMapping>,
    /// Keys ([`PublicMapping::key`]) of mappings removed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub public_removed: Vec<String>,
    /// Every migration of the new snapshot (as [`Snapshot::migrations`]).
    #[serde(default)]
    pub migrations: Vec<Migration>,
}

/// Why a [`SnapshotDelta`] does not apply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a delta from version {from} does not apply to a snapshot of version {have}")]
pub struct DeltaMismatch {
    pub from: u64,
    pub have: u64,
}

impl SnapshotDelta {
    /// The snapshot of `self.version`, from `base` (the snapshot of `self.from`), in the
    /// gateway's order (hosts by name, endpoints by address, mappings by key).
    pub fn apply_to(&self, base: &Snapshot) -> Result<Snapshot, DeltaMismatch> {
        use std::collections::BTreeMap;
        if base.version != self.from {
            return Err(DeltaMismatch {
                from: self.from,
                have: base.version,
            });
        }
        let mut hosts: BTreeMap<&str, &HostInfo> =
            base.hosts.iter().map(|h| (h.name.as_str(), h)).collect();
        for name in &self.hosts_removed {
            hosts.remove(name.as_str());
        }
        hosts.extend(self.hosts.iter().map(|h| (h.name.as_str(), h)));
        let mut endpoints: BTreeMap<Ipv4Addr, &Endpoint> =
            base.endpoints.iter().map(|e| (e.ip, e)).collect();
        for ip in &self.endpoints_removed {
            endpoints.remove(ip);
        }
        endpoints.extend(self.endpoints.iter().map(|e| (e.ip, e)));
        let mut public: BTreeMap<crate::PublicKey, &PublicMapping> =
            base.public.iter().map(|p| (p.public_key(), p)).collect();
        for key in &self.public_removed {
            public.retain(|_, p| p.key() != *key);
        }
        public.extend(self.public.iter().map(|p| (p.public_key(), p)));
        Ok(Snapshot {
            version: self.version,
            overlay_cidr: self.overlay_cidr,
            overlay6_cidr: self.overlay6_cidr,
            vni: self.vni,
            hosts: hosts.into_values().cloned().collect(),
            endpoints: endpoints.into_values().cloned().collect(),
            public: public.into_values().cloned().collect(),
            migrations: self.migrations.clone(),
        })
    }
}

/// Above this many endpoint changes, [`SnapshotDelta::apply_in_place`] merges the lists in one
/// pass instead of editing them entry by entry (each edit moves the list's tail).
const IN_PLACE_MAX: usize = 64;

impl SnapshotDelta {
    /// [`Self::apply_to`] on `base` itself, which must be in the gateway's order (endpoints by
    /// address, as every snapshot the gateway sends and every [`Self::apply_to`] result is):
    /// each changed endpoint is found by binary search and replaced, inserted or removed where
    /// it is, so a change costs O(log n) lookups and moving the list's tail (a memmove), not a
    /// copy of the snapshot. A large change (more than 64 endpoints) is merged in one pass.
    /// Hosts and public mappings (few; a change to them is rare) are rebuilt when the delta
    /// touches them.
    pub fn apply_in_place(&self, base: &mut Snapshot) -> Result<(), DeltaMismatch> {
        use std::collections::BTreeMap;
        if base.version != self.from {
            return Err(DeltaMismatch {
                from: self.from,
                have: base.version,
            });
        }
        if !self.hosts.is_empty() || !self.hosts_removed.is_empty() {
            let mut hosts: BTreeMap<String, HostInfo> = std::mem::take(&mut base.hosts)
                .into_iter()
                .map(|h| (h.name.clone(), h))
                .collect();
            for name in &self.hosts_removed {
                hosts.remove(name);
            }
            hosts.extend(self.hosts.iter().map(|h| (h.name.clone(), h.clone())));
            base.hosts = hosts.into_values().collect();
        }
        let eps = &mut base.endpoints;
        if self.endpoints.len() + self.endpoints_removed.len() > IN_PLACE_MAX {
            let mut all: BTreeMap<Ipv4Addr, Endpoint> =
                std::mem::take(eps).into_iter().map(|e| (e.ip, e)).collect();
            for ip in &self.endpoints_removed {
                all.remove(ip);
            }
            all.extend(self.endpoints.iter().map(|e| (e.ip, e.clone())));
            *eps = all.into_values().collect();
        } else {
            for ip in &self.endpoints_removed {
                if let Ok(i) = eps.binary_search_by_key(ip, |e| e.ip) {
                    eps.remove(i);
                }
            }
            for e in &self.endpoints {
                match eps.binary_search_by_key(&e.ip, |x| x.ip) {
                    Ok(i) => eps[i] = e.clone(),
                    Err(i) => eps.insert(i, e.clone()),
                }
            }
        }
        if !self.public.is_empty() || !self.public_removed.is_empty() {
            let mut public: BTreeMap<crate::PublicKey, PublicMapping> =
                std::mem::take(&mut base.public)
                    .into_iter()
                    .map(|p| (p.public_key(), p))
                    .collect();
            for key in &self.public_removed {
                public.retain(|_, p| p.key() != *key);
            }
            public.extend(self.public.iter().map(|p| (p.public_key(), p.clone())));
            base.public = public.into_values().collect();
        }
        base.version = self.version;
        base.overlay_cidr = self.overlay_cidr;
        base.overlay6_cidr = self.overlay6_cidr;
        base.vni = self.vni;
        base.migrations.clone_from(&self.migrations);
        Ok(())
    }
}

/// The answer of `GET /v1/watch?…&delta=true`: a delta from the agent's version when the
/// gateway still knows what changed since, else the whole snapshot (first contact, a
/// restarted gateway, an agent too far behind).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum WatchUpdate {
    Snapshot(Snapshot),
    Delta(SnapshotDelta),
}

impl WatchUpdate {
    /// The version the update brings.
    pub fn version(&self) -> u64 {
        match self {
            WatchUpdate::Snapshot(s) => s.version,
            WatchUpdate::Delta(d) => d.version,
        }
    }
}

/// Where a migration stands. Steps go prepare → freeze → release; abort is possible from
/// `prepared` and `frozen`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MigrationPhase {
    /// The destination built the container's network side and holds its packets; traffic
    /// still flows to the source.
    Prepared,
    /// Everyone sends to the destination, which holds; the source forwards to it and drops
    /// what the frozen copy emits.
    Frozen,
    /// The container runs at the destination (the endpoint's host is now `to`); held packets
    /// were re-injected; the source forwards stragglers until `forward_until_unix_ms`.
    Released,
    /// Rolled back: the container stays at `from`; the destination sent what it held there.
    Aborted,
}

/// One migration of one container endpoint between two registered hosts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Migration {
    /// Unique, assigned by the gateway (`m<n>`).
    pub id: String,
    /// The container endpoint's address.
    pub container: Ipv4Addr,
    /// Source and destination hosts.
    pub from: String,
    pub to: String,
    pub phase: MigrationPhase,
    pub created_unix_ms: u64,
    pub updated_unix_ms: u64,
    /// When the phase became `frozen` / `released` (0: not yet).
    #[serde(default)]
    pub frozen_unix_ms: u64,
    #[serde(default)]
    pub released_unix_ms: u64,
    /// `released`: until when the source keeps its forwarding pointer.
    #[serde(default)]
    pub forward_until_unix_ms: u64,
    /// `frozen`, first half: the destination holds, nobody points at it yet (the next
    /// version switches everyone else to it). See `docs/migration.md`, "Holding from the
    /// freeze".
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub switch_pending: bool,
    /// The gateway runs this migration (`ferry migrate run`, `POST /v1/runs`): a restarted
    /// gateway resumes it even if the run's report was never written.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub run: bool,
}

/// Body of `POST /v1/migrations` (the prepare step).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationRequest {
    pub container: Ipv4Addr,
    pub to: String,
    /// Set by the gateway's own runs (see [`Migration::run`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub run: bool,
}

impl MigrationPhase {
    pub const fn as_str(self) -> &'static str {
        match self {
            MigrationPhase::Prepared => "prepared",
            MigrationPhase::Frozen => "frozen",
            MigrationPhase::Released => "released",
            MigrationPhase::Aborted => "aborted",
        }
    }

    /// `prepared` or `frozen`: the migration can still go on or be aborted, and it is the
    /// container's only active one.
    pub const fn is_active(self) -> bool {
        matches!(self, MigrationPhase::Prepared | MigrationPhase::Frozen)
    }
}

impl fmt::Display for MigrationPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Migration {
    /// A migration in `phase` with no timestamps yet (what the registry fills in).
    pub fn new(
        id: impl Into<String>,
        container: Ipv4Addr,
        from: impl Into<String>,
        to: impl Into<String>,
        phase: MigrationPhase,
    ) -> Self {
        Self {
            id: id.into(),
            container,
            from: from.into(),
            to: to.into(),
            phase,
            created_unix_ms: 0,
            updated_unix_ms: 0,
            frozen_unix_ms: 0,
            released_unix_ms: 0,
            forward_until_unix_ms: 0,
            switch_pending: false,
            run: false,
        }
    }

    /// The number in the id (`m12` → 12), by which migrations are ordered.
    pub fn seq(&self) -> Option<u64> {
        migration_seq(&self.id)
    }
}

/// The number of a migration id `m<n>` (n ≥ 1, no leading zero), if it is one.
pub fn migration_seq(id: &str) -> Option<u64> {
    let digits = id.strip_prefix('m')?;
    if digits.is_empty() || digits.starts_with('0') || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// A migration step (`prepare`, `freeze`, `release`, `abort`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MigrationStepKind {
    Prepare,
    Freeze,
    Release,
    Abort,
}

impl MigrationStepKind {
    pub const ALL: [MigrationStepKind; 4] = [
        MigrationStepKind::Prepare,
        MigrationStepKind::Freeze,
        MigrationStepKind::Release,
        MigrationStepKind::Abort,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            MigrationStepKind::Prepare => "prepare",
            MigrationStepKind::Freeze => "freeze",
            MigrationStepKind::Release => "release",
            MigrationStepKind::Abort => "abort",
        }
    }

    /// The phase this step puts a migration in.
    pub const fn phase(self) -> MigrationPhase {
        match self {
            MigrationStepKind::Prepare => MigrationPhase::Prepared,
            MigrationStepKind::Freeze => MigrationPhase::Frozen,
            MigrationStepKind::Release => MigrationPhase::Released,
            MigrationStepKind::Abort => MigrationPhase::Aborted,
        }
    }
}

impl fmt::Display for MigrationStepKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The answer of a successful migration step (`POST /v1/migrations` and
/// `POST /v1/migrations/{id}/freeze|release|abort`): the step is persisted and the agents of
/// `hosts` reported (through their watch) that they applied `version`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationStep {
    /// The migration after the step.
    pub migration: Migration,
    /// The registry version that carries the migration's current phase.
    pub version: u64,
    /// False when the step was a repetition of the current one: nothing changed (no new
    /// version), the answer came once `hosts` had applied `version`.
    pub changed: bool,
    /// The hosts whose agents were waited for (sorted).
    pub hosts: Vec<String>,
    /// How long they took to report `version` as applied, from the moment the step was
    /// persisted (ms).
    pub applied_ms: u64,
}

/// A host that had not applied a version in time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostLag {
    pub host: String,
    /// The version its agent last reported as applied.
    pub applied_version: u64,
    /// The version it was waited for.
    pub wanted_version: u64,
    /// Whether its agent held a watch open when the wait ended.
    pub connected: bool,
}

/// Where things stand after a migration step that changed the registry but failed: attached to
/// the error answers with code `rolled_back` and `needs_attention`
/// ([`ErrorDetail::migration`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationFailure {
    /// The step that failed.
    pub step: MigrationStepKind,
    /// The migration as it is now (`aborted` after a rollback).
    pub migration: Migration,
    /// The registry version now.
    pub version: u64,
    /// Hosts that did not apply the failed step in time (the reason of the failure).
    pub lagging: Vec<HostLag>,
    /// After an automatic abort: hosts that did not apply the abort in time (non-empty only
    /// with `needs_attention`).
    #[serde(default)]
    pub rollback_lagging: Vec<HostLag>,
    /// Time from persisting the step to this answer (ms).
    pub waited_ms: u64,
}

/// Body of every error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorDetail {
    /// Stable, machine-readable: `unauthorized`, `bad_request`, `invalid_address`,
    /// `unknown_host`, `unknown_endpoint`, `unknown_public`, `unknown_migration`,
    /// `duplicate_endpoint`, `duplicate_public`, `conflict`, `bad_phase`, `not_found`,
    /// `rolled_back`, `needs_attention`, `internal`.
    pub code: String,
    /// For people: names the offending field or value.
    pub message: String,
    /// With `rolled_back` and `needs_attention`: the migration and the hosts that lagged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<Box<MigrationFailure>>,
}

impl ErrorBody {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            error: ErrorDetail {
                code: code.into(),
                message: message.into(),
                migration: None,
            },
        }
    }

    /// Attaches where a failed migration step left things.
    pub fn with_migration(mut self, failure: MigrationFailure) -> Self {
        self.error.migration = Some(Box::new(failure));
        self
    }
}

/// The stable error codes of [`ErrorDetail::code`], with the HTTP status each is answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// 401: missing or wrong bearer token.
    Unauthorized,
    /// 403: the caller's identity (its certificate) may not make this request: a host acting
    /// as another, or a host calling what only the operator or the gateway may.
    Forbidden,
    /// 400 (413/415/405 for an oversized body, a wrong content type, a wrong method): the
    /// request is malformed (JSON, unknown field, bad host name, bad port, …).
    BadRequest,
    /// 400: an address is outside its allowed range or not usable (multicast, broadcast, …).
    InvalidAddress,
    /// 404: the named host is not registered.
    UnknownHost,
    /// 404: no endpoint has that IP.
    UnknownEndpoint,
    /// 404: no public mapping has that key.
    UnknownPublic,
    /// 409: the endpoint IP is already registered (or repeated inside one request).
    DuplicateEndpoint,
    /// 409: a public mapping with that key already exists.
    DuplicatePublic,
    /// 409: the request collides with other state (addresses, MACs, roles, reverse NAT, an
    /// active migration, …).
    Conflict,
    /// 404: no such route.
    NotFound,
    /// 500: the gateway failed (e.g. could not persist); nothing changed.
    Internal,
    /// 404: no migration has that id (or it left the history).
    UnknownMigration,
    /// 409: the migration is not in a phase where this step applies (release before freeze,
    /// anything after abort, …); nothing changed.
    BadPhase,
    /// 504: the step was persisted but the agents did not apply it in time, so the gateway
    /// aborted the migration and the agents that had acted on it applied the abort: the step
    /// failed, everything went back (the container stays on `from`).
    RolledBack,
    /// 504: a step was persisted but could not be confirmed, and could not be (or must not
    /// be) undone: a release the agents did not apply in time, an abort (explicit or
    /// automatic) not applied in time, a gateway shutting down during the wait. Look at
    /// `ferry migrate status` and the lagging hosts.
    NeedsAttention,
    /// 503: the registry's store (etcd) could not be reached or did not confirm the change:
    /// it was not applied (or, when the message says so, its outcome is unknown: it shows in
    /// the registry once this gateway reads it back). Reads are still served.
    StoreUnavailable,
    /// 503: this gateway is cut off from the registry's store (it has not heard etcd's
    /// quorum for longer than its lease may live): it refused the request at once, nothing
    /// was applied, and another gateway serves it. Clients with other gateways ask the next
    /// one; agents follow another one.
    CutOff,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 18] = [
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::BadRequest,
        ErrorCode::InvalidAddress,
        ErrorCode::UnknownHost,
        ErrorCode::UnknownEndpoint,
        ErrorCode::UnknownPublic,
        ErrorCode::DuplicateEndpoint,
        ErrorCode::DuplicatePublic,
        ErrorCode::Conflict,
        ErrorCode::NotFound,
        ErrorCode::Internal,
        ErrorCode::UnknownMigration,
        ErrorCode::BadPhase,
        ErrorCode::RolledBack,
        ErrorCode::NeedsAttention,
        ErrorCode::StoreUnavailable,
        ErrorCode::CutOff,
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::InvalidAddress => "invalid_address",
            ErrorCode::UnknownHost => "unknown_host",
            ErrorCode::UnknownEndpoint => "unknown_endpoint",
            ErrorCode::UnknownPublic => "unknown_public",
            ErrorCode::DuplicateEndpoint => "duplicate_endpoint",
            ErrorCode::DuplicatePublic => "duplicate_public",
            ErrorCode::Conflict => "conflict",
            ErrorCode::NotFound => "not_found",
            ErrorCode::Internal => "internal",
            ErrorCode::UnknownMigration => "unknown_migration",
            ErrorCode::BadPhase => "bad_phase",
            ErrorCode::RolledBack => "rolled_back",
            ErrorCode::NeedsAttention => "needs_attention",
            ErrorCode::StoreUnavailable => "store_unavailable",
            ErrorCode::CutOff => "cut_off",
        }
    }

    /// The HTTP status this code is normally answered with.
    pub const fn http_status(self) -> u16 {
        match self {
            ErrorCode::Unauthorized => 401,
            ErrorCode::Forbidden => 403,
            ErrorCode::BadRequest | ErrorCode::InvalidAddress => 400,
            ErrorCode::UnknownHost
            | ErrorCode::UnknownEndpoint
            | ErrorCode::UnknownPublic
            | ErrorCode::UnknownMigration
            | ErrorCode::NotFound => 404,
            ErrorCode::DuplicateEndpoint
            | ErrorCode::DuplicatePublic
            | ErrorCode::Conflict
            | ErrorCode::BadPhase => 409,
            ErrorCode::Internal => 500,
            ErrorCode::RolledBack | ErrorCode::NeedsAttention => 504,
            ErrorCode::StoreUnavailable | ErrorCode::CutOff => 503,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ErrorCode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| format!("unknown error code {s:?}"))
    }
}

/// `GET /v1/version`: the registry's current version (the version of the next [`Snapshot`]).
/// `ferry sync` and `ferry hosts` compare it with each [`HostStatus::applied_version`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryVersion {
    pub version: u64,
}

/// Query of `POST /v1/migrations` and `POST /v1/migrations/{id}/{step}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StepQuery {
    /// How long to wait for the agents (ms, 1–[`MAX_STEP_TIMEOUT_MS`]); default: the
    /// gateway's `step_timeout_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// Largest `timeout_ms` of a step.
pub const MAX_STEP_TIMEOUT_MS: u64 = 600_000;

/// Query of `GET /v1/migrations`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationsQuery {
    /// Only this container's migrations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<Ipv4Addr>,
    /// Only active (`prepared`, `frozen`) migrations.
    #[serde(default)]
    pub active: bool,
}

/// Query of `GET /v1/watch?host=NAME&after=N`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchQuery {
    /// The registered host asking (its agent).
    pub host: String,
    /// The snapshot version the agent has applied (0: none).
    pub after: u64,
    /// Answer a [`WatchUpdate`]: a delta from `after` when possible (the caller holds the
    /// snapshot of `after`). Without it: the whole [`Snapshot`].
    #[serde(default)]
    pub delta: bool,
}

/// Body of `POST /v1/ipam/allocate`: an address from the gateway's pool for interface
/// `ifname` of container `container_id` on `host` (a CNI `ADD`). `ip`: this address, if it is
/// free — or if it is the address of a container with a prepared (or frozen) migration to
/// `host`, which then arrives there (answered with [`IpamAllocation::migration`], nothing
/// allocated). Repeating a request for the same container, interface and host answers the
/// same lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IpamAllocateRequest {
    pub host: String,
    /// The runtime's container id (`CNI_CONTAINERID`'s rules).
    pub container_id: String,
    /// The container's interface (`CNI_IFNAME`'s rules).
    pub ifname: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<Ipv4Addr>,
}

/// An address of the pool held for a container (`GET /v1/ipam`). It outlives the container's
/// endpoint (an endpoint removed by the operator does not free it); it is freed by
/// `POST /v1/ipam/release`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IpamLease {
    pub ip: Ipv4Addr,
    /// The host that asked for it (the endpoint, once registered, may move: it decides).
    pub host: String,
    pub container_id: String,
    pub ifname: String,
}

/// Answer of `POST /v1/ipam/allocate` (201: a new lease; 200: repeated, or a migration's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IpamAllocation {
    pub ip: Ipv4Addr,
    /// The new (or repeated) lease; `None` when the address is a migrating container's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<IpamLease>,
    /// The prepared or frozen migration that brings this address to the asking host: its
    /// endpoint exists already (see `endpoint`), the host attaches the new namespace to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<String>,
    /// With `migration`: the migrating endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<Endpoint>,
    /// Whether the registry changed (a new lease).
    pub changed: bool,
}

/// Body of `POST /v1/ipam/release`: the address of container `container_id` on `host` is
/// free again (a CNI `DEL`). Its endpoint, if it lives on `host` and does not migrate, is
/// removed in the same change; one that lives elsewhere (it migrated away) or is migrating
/// is refused (409 `conflict`): nothing changes. Nothing to release answers 200 unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IpamReleaseRequest {
    pub host: String,
    pub container_id: String,
    pub ip: Ipv4Addr,
}

/// Answer of `POST /v1/ipam/release`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IpamRelease {
    pub ip: Ipv4Addr,
    /// The lease freed, if there was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<IpamLease>,
    /// The endpoint removed with it, if there was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<Endpoint>,
    /// Whether the registry changed (and its version with it).
    pub changed: bool,
    /// The registry's version after the request (the agent waits until it applied it).
    pub version: u64,
}

/// `GET /v1/ipam`: the pool and what is held in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IpamStatus {
    pub pool: Ipv4Net,
    /// Ranges of the pool never given out (besides the pool's and the overlay's network and
    /// broadcast addresses and the hosts' overlay addresses).
    pub reserved: Vec<Ipv4Net>,
    pub leases: Vec<IpamLease>,
    /// Addresses of the pool that could be given out now.
    pub free: u64,
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn endpoint(last: u8, host: u8) -> Endpoint {
        Endpoint {
            ip: Ipv4Addr::new(10, 244, 0, last),
            host: format!("h{host}"),
            mac: MacAddr([0x0e, 0, 0, 0, host, last]),
        }
    }

    fn host(n: u8) -> HostInfo {
        HostInfo {
            name: format!("h{n}"),
            vtep: Ipv4Addr::new(192, 168, 0, n),
            overlay_ip: Ipv4Addr::new(10, 244, 255, n),
            role: HostRole::Host,
            active_since: None,
        }
    }

    fn mapping(last: u8, port: Option<u16>, container: u8) -> PublicMapping {
        PublicMapping {
            public: Ipv4Addr::new(203, 0, 113, last),
            public_port: port,
            container: Ipv4Addr::new(10, 244, 0, container),
            container_port: port,
            proto: port.map(|_| Proto::Tcp),
        }
    }

    prop_compose! {
        /// A snapshot in the gateway's order, from a small address space (so changes collide
        /// with what is there).
        fn snapshot()(
            eps in prop::collection::btree_map(any::<u8>(), 0u8..4, 0..200),
            hosts in prop::collection::btree_set(0u8..6, 0..4),
            public in prop::collection::btree_map((0u8..8, prop::option::of(1u16..4)), any::<u8>(), 0..6),
        ) -> Snapshot {
            Snapshot {
                version: 7,
                overlay_cidr: "10.244.0.0/16".parse().unwrap(),
                overlay6_cidr: None,
                vni: 42,
                hosts: hosts.into_iter().map(host).collect(),
                endpoints: eps.into_iter().map(|(ip, h)| endpoint(ip, h)).collect(),
                public: {
                    let mut v: Vec<PublicMapping> =
                        public.into_iter().map(|((l, p), c)| mapping(l, p, c)).collect();
                    v.sort_by_key(PublicMapping::public_key);
                    v
                },
                migrations: Vec::new(),
            }
        }
    }

    prop_compose! {
        /// A delta from version 7, of 0 to 150 endpoint changes (both sides of
        /// `IN_PLACE_MAX`), some hosts and mappings.
        fn delta()(
            eps in prop::collection::vec((any::<u8>(), 0u8..4), 0..100),
            removed in prop::collection::vec(any::<u8>(), 0..50),
            hosts in prop::collection::vec(0u8..6, 0..3),
            hosts_removed in prop::collection::vec(0u8..6, 0..2),
            public in prop::collection::vec(((0u8..8, prop::option::of(1u16..4)), any::<u8>()), 0..3),
            public_removed in prop::collection::vec((0u8..8, prop::option::of(1u16..4)), 0..3),
        ) -> SnapshotDelta {
            SnapshotDelta {
                from: 7,
                version: 8,
                overlay_cidr: "10.244.0.0/16".parse().unwrap(),
                overlay6_cidr: None,
                vni: 42,
                hosts: hosts.into_iter().map(host).collect(),
                hosts_removed: hosts_removed.into_iter().map(|n| format!("h{n}")).collect(),
                endpoints: eps.into_iter().map(|(ip, h)| endpoint(ip, h)).collect(),
                endpoints_removed: removed.into_iter().map(|l| Ipv4Addr::new(10, 244, 0, l)).collect(),
                public: public.into_iter().map(|((l, p), c)| mapping(l, p, c)).collect(),
                public_removed: public_removed.into_iter().map(|(l, p)| mapping(l, p, 0).key()).collect(),
                migrations: Vec::new(),
            }
        }
    }

    proptest! {
        /// Editing the snapshot in place gives what building a new one gives, and keeps the
        /// endpoints in order (the next edit's binary search relies on it).
        #[test]
        fn a_delta_applied_in_place_is_the_delta_applied(base in snapshot(), d in delta()) {
            let want = d.apply_to(&base).unwrap();
            let mut got = base.clone();
            d.apply_in_place(&mut got).unwrap();
            prop_assert_eq!(&got, &want);
            prop_assert!(got.endpoints.windows(2).all(|w| w[0].ip < w[1].ip));
            let mut stale = base.clone();
            stale.version = 6;
            prop_assert!(d.apply_in_place(&mut stale).is_err());
            prop_assert_eq!(stale.endpoints, base.endpoints);
        }
    }

    #[test]
    fn host_status_round_trips_and_rejects_unknown_fields() {
        let s = HostStatus {
            info: HostInfo {
                name: "a1".into(),
                vtep: "198.18.1.10".parse().unwrap(),
                overlay_ip: "10.244.255.1".parse().unwrap(),
                role: HostRole::Gateway,
                active_since: None,
            },
            applied_version: 3,
            last_seen_unix_ms: 5,
            connected: true,
        };
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.contains(r#""name":"a1""#) && json.contains(r#""role":"gateway""#));
        assert_eq!(serde_json::from_str::<HostStatus>(&json).unwrap(), s);
        let extra = json.replacen('{', r#"{"bogus":1,"#, 1);
        assert!(serde_json::from_str::<HostStatus>(&extra).is_err());
    }

    #[test]
    fn requests_reject_unknown_fields_and_default_role() {
        let h: HostInfo = serde_json::from_str(
            r#"{"name":"a1","vtep":"198.18.1.10","overlay_ip":"10.244.255.1"}"#,
        )
        .unwrap();
        assert_eq!(h.role, HostRole::Host);
        let e =
            serde_json::from_str::<EndpointSpec>(r#"{"ip":"10.244.1.5","host":"a1","mca":"x"}"#)
                .unwrap_err();
        assert!(e.to_string().contains("unknown field `mca`"), "{e}");
    }

    #[test]
    fn macs() {
        let m = MacAddr::for_container("10.244.1.5".parse().unwrap());
        assert_eq!(m.to_string(), "0e:fc:0a:f4:01:05");
        assert_eq!("0e:fc:0a:f4:01:05".parse::<MacAddr>().unwrap(), m);
        assert!(m.is_unicast() && !m.is_zero());
        assert!(!"01:00:5e:00:00:01".parse::<MacAddr>().unwrap().is_unicast());
        assert!("0e:fc:0a:f4:01".parse::<MacAddr>().is_err());
        assert!("0e:fc:0a:f4:01:5".parse::<MacAddr>().is_err());
        assert!("0e:fc:0a:f4:01:zz".parse::<MacAddr>().is_err());
        assert_eq!(serde_json::to_string(&m).unwrap(), r#""0e:fc:0a:f4:01:05""#);
    }

    #[test]
    fn migration_ids_and_answers() {
        assert_eq!(migration_seq("m1"), Some(1));
        assert_eq!(migration_seq("m1234"), Some(1234));
        for bad in [
            "",
            "m",
            "m0",
            "m01",
            "1",
            "M1",
            "m1x",
            "m-1",
            "m99999999999999999999999",
        ] {
            assert_eq!(migration_seq(bad), None, "{bad:?}");
        }
        let m = Migration {
            created_unix_ms: 1,
            updated_unix_ms: 2,
            frozen_unix_ms: 2,
            ..Migration::new(
                "m3",
                "10.244.1.5".parse().unwrap(),
                "a1",
                "b1",
                MigrationPhase::Frozen,
            )
        };
        assert_eq!(m.seq(), Some(3));
        let step = MigrationStep {
            migration: m.clone(),
            version: 9,
            changed: true,
            hosts: vec!["a1".into(), "b1".into()],
            applied_ms: 12,
        };
        let json = serde_json::to_string(&step).unwrap();
        assert!(json.contains(r#""phase":"frozen""#), "{json}");
        assert_eq!(serde_json::from_str::<MigrationStep>(&json).unwrap(), step);

        // Error bodies: the migration detail only when present.
        let plain = ErrorBody::new("bad_phase", "x");
        assert!(!serde_json::to_string(&plain).unwrap().contains("migration"));
        let b = ErrorBody::new(ErrorCode::RolledBack.as_str(), "timed out").with_migration(
            MigrationFailure {
                step: MigrationStepKind::Freeze,
                migration: Migration {
                    phase: MigrationPhase::Aborted,
                    ..m
                },
                version: 10,
                lagging: vec![HostLag {
                    host: "b1".into(),
                    applied_version: 8,
                    wanted_version: 9,
                    connected: false,
                }],
                rollback_lagging: vec![],
                waited_ms: 5000,
            },
        );
        let json = serde_json::to_string(&b).unwrap();
        assert!(json.contains(r#""step":"freeze""#), "{json}");
        assert_eq!(serde_json::from_str::<ErrorBody>(&json).unwrap(), b);
        for k in MigrationStepKind::ALL {
            assert_eq!(
                serde_json::to_string(&k).unwrap(),
                format!("\"{}\"", k.as_str())
            );
        }
        assert_eq!(MigrationStepKind::Release.phase(), MigrationPhase::Released);
        assert!(MigrationPhase::Frozen.is_active() && !MigrationPhase::Released.is_active());
    }

    #[test]
    fn error_codes() {
        for c in ErrorCode::ALL {
            assert_eq!(c.as_str().parse::<ErrorCode>().unwrap(), c);
            assert!((400..600).contains(&c.http_status()));
        }
        let b = ErrorBody::new(ErrorCode::Conflict.as_str(), "x");
        assert_eq!(
            serde_json::to_string(&b).unwrap(),
            r#"{"error":{"code":"conflict","message":"x"}}"#
        );
    }
}
