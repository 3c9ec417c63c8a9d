//! Lab topologies: the TOML a user writes ([`Topology`]) and the fully resolved form the lab
//! builds ([`LabTopology`]: every address allocated, every cross-reference checked).
//!
//! Everything here is pure: no root, no kernel.
//!
//! ```toml
//! overlay_cidr = "10.244.0.0/16"   # default
//! overlay6_cidr = "2001:db8:f::/96" # optional: dual-stack containers (a /96; each endpoint's
//!                                   # IPv6 address is it followed by the IPv4 address)
//! vni = 4242                       # default
//! vxlan_port = 4789                # default
//!
//! [[clouds]]
//! name = "a"
//! subnet = "198.18.1.0/24"         # the cloud's router holds .1
//!
//! [[hosts]]
//! name = "a1"                      # <= 10 chars of [a-z0-9-]
//! cloud = "a"
//! address = "198.18.1.10"          # optional: else .10, .11, ... in order within the cloud
//! role = "host"                    # or "gateway"
//! overlay_ip = "10.244.255.1"      # optional: else last /24 of overlay_cidr, host index + 1
//!
//! [internet]                       # optional
//! subnet = "203.0.113.0/24"        # default
//! gateway = "gw"                   # default; a host with role "gateway"; it gets .1
//! client = "203.0.113.10"          # optional: default .10
//! subnet6 = "2001:db8:ffff::/64"   # optional: the internet side speaks IPv6 too (gateway ::1,
//!                                  # client ::10, the client routes overlay6_cidr via ::1)
//! public6 = false                  # with overlay6_cidr and subnet6: the gateway routes the
//!                                  # overlay's IPv6 prefix from the internet (else masquerades)
//!
//! [[links]]                        # optional: a shaped link between two clouds
//! between = ["a", "b"]
//! profile = "wan"                  # optional: lan, wan or intercontinental (see [`PROFILES`])
//! delay_ms = 30                    # one-way, each direction; overrides the profile's
//! jitter_ms = 2                    # the one-way delay varies within delay ± jitter
//! loss = 0.0001                    # probability that a packet is lost, each direction
//! rate_mbit = 200                  # each direction; absent: not rate-limited
//! queue_ms = 60                    # the bottleneck's buffer, in time at the rate
//! ```
//!
//! Traffic between two clouds without a `[[links]]` entry, and between hosts of one cloud, is
//! not shaped (a bridge and the router's forwarding: well under a millisecond). How a link is
//! built without netem: [`crate::wan`] and docs/lab.md, "WAN links".

use std::{
    collections::HashMap,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

/// The built-in default topology (also shipped as `netns-lab/topologies/default.toml`).
pub const DEFAULT_TOPOLOGY_TOML: &str = include_str!("../topologies/default.toml");

/// Longest host name: namespaces are `<prefix>-<host>` and the router-side veth is `v-<host>`.
pub const MAX_HOST_NAME: usize = 10;
/// Longest cloud name: the router's bridge is `br-<cloud>` and interface names have <= 15 bytes.
pub const MAX_CLOUD_NAME: usize = 12;
/// Names that are lab nodes of their own and cannot be host names.
pub const RESERVED_NAMES: [&str; 2] = ["router", "inet"];

/// First host number allocated within a cloud (`.10`).
const FIRST_HOST: u32 = 10;

#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("reading topology {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// TOML syntax or shape (unknown field, wrong type, missing field): toml's own message,
    /// which carries the line and column.
    #[error("{origin}: {source}")]
    Parse {
        origin: String,
        source: toml::de::Error,
    },
    /// A value serde accepted but the lab cannot build; `field` is its path in the file
    /// (e.g. `hosts[2].cloud`).
    #[error("{origin}{field}: {problem}")]
    Invalid {
        origin: String,
        field: String,
        problem: String,
    },
}

impl TopologyError {
    fn invalid(field: impl Into<String>, problem: impl Into<String>) -> Self {
        Self::Invalid {
            origin: String::new(),
            field: field.into(),
            problem: problem.into(),
        }
    }

    /// The offending field, for validation errors.
    pub fn field(&self) -> Option<&str> {
        match self {
            Self::Invalid { field, .. } => Some(field),
            _ => None,
        }
    }

    fn with_origin(self, path: &Path) -> Self {
        match self {
            Self::Invalid { field, problem, .. } => Self::Invalid {
                origin: format!("{}: ", path.display()),
                field,
                problem,
            },
            Self::Parse { source, .. } => Self::Parse {
                origin: path.display().to_string(),
                source,
            },
            other => other,
        }
    }
}

/// What a host is for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    #[default]
    Host,
    Gateway,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Host => "host",
            Role::Gateway => "gateway",
        })
    }
}

/// A topology as written in TOML.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    #[serde(default = "default_overlay_cidr")]
    pub overlay_cidr: Ipv4Net,
    /// Dual-stack overlay: a /96 IPv6 prefix (see the agent's `overlay6_cidr`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay6_cidr: Option<Ipv6Net>,
    #[serde(default = "default_vni")]
    pub vni: u32,
    #[serde(default = "default_vxlan_port")]
    pub vxlan_port: u16,
    /// No-tunnel mode between hosts of one cloud (the agents' `direct_routing`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub direct_routing: bool,
    /// The agents copy containers' own announcements out of the hosts' underlay interface
    /// (the agents' `announce_relay`): the cloud's bridge and router are the L2 peers that
    /// relearn where a container is.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub announce_relay: bool,
    /// The gateway keeps the registry in etcd: the lab starts a member in the first host of
    /// every cloud (on its underlay address, ports 2379/2380) and the gateway uses them all.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub etcd: bool,
    /// Hosts that also run a gateway daemon serving the same registry (needs `etcd`), on
    /// their underlay address: agents use the gateway of their own cloud, the others as
    /// fallbacks.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_gateways: Vec<String>,
    /// The gateways' `max_connections_per_peer` (default: the gateway's own, 64): the
    /// control-plane benchmark holds hundreds of watches from one namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_connections_per_peer: Option<usize>,
    pub clouds: Vec<CloudSpec>,
    pub hosts: Vec<HostSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub internet: Option<InternetSpec>,
    /// Shaped links between clouds (delay, jitter, loss, rate).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<LinkSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CloudSpec {
    pub name: String,
    /// The cloud's underlay subnet; its router holds the first address (.1).
    pub subnet: Ipv4Net,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostSpec {
    pub name: String,
    pub cloud: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<Ipv4Addr>,
    #[serde(default)]
    pub role: Role,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay_ip: Option<Ipv4Addr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InternetSpec {
    #[serde(default = "default_internet_subnet")]
    pub subnet: Ipv4Net,
    #[serde(default = "default_internet_gateway")]
    pub gateway: String,
    /// More hosts facing the internet (role gateway), standing by: each gets a public
    /// interface on the internet's segment (the subnet's 2nd, 3rd… address; the segment is then
    /// a bridge in the client's namespace) and takes the internet side over when the host
    /// facing it falls silent (the registry decides which one faces it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub standby_gateways: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<Ipv4Addr>,
    /// Addresses the gateway may hand out as public endpoints (default: the upper half of
    /// `subnet`). Must lie inside `subnet` and hold neither the gateway's nor the client's
    /// address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_pool: Option<Ipv4Net>,
    /// The internet side's IPv6 subnet (a /64 or shorter): the gateway's public interface
    /// gets its first address, the client its tenth.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subnet6: Option<Ipv6Net>,
    /// The gateway routes the overlay's IPv6 prefix from the internet side (needs
    /// `overlay6_cidr` and `subnet6`); otherwise it masquerades containers' IPv6.
    #[serde(default)]
    pub public6: bool,
}

fn default_overlay_cidr() -> Ipv4Net {
    "10.244.0.0/16".parse().expect("valid")
}
fn default_vni() -> u32 {
    4242
}
fn default_vxlan_port() -> u16 {
    4789
}
fn default_internet_subnet() -> Ipv4Net {
    "203.0.113.0/24".parse().expect("valid")
}
fn default_internet_gateway() -> String {
    "gw".to_owned()
}

/// A resolved topology: what the lab builds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabTopology {
    #[serde(default)]
    pub direct_routing: bool,
    #[serde(default)]
    pub announce_relay: bool,
    /// The etcd members: the first host of each cloud (empty: the gateway's file store).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub etcd: Vec<String>,
    /// Hosts that also run a gateway daemon (on etcd).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra_gateways: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway_connections_per_peer: Option<usize>,
    pub overlay_cidr: Ipv4Net,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay6_cidr: Option<Ipv6Net>,
    pub vni: u32,
    pub vxlan_port: u16,
    pub clouds: Vec<Cloud>,
    pub hosts: Vec<Host>,
    pub internet: Option<Internet>,
    /// Shaped links between clouds, in the file's order (absent in the state of labs made
    /// before links existed).
    #[serde(default)]
    pub links: Vec<Link>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cloud {
    pub name: String,
    pub subnet: Ipv4Net,
    /// The router's address in this cloud (first address of the subnet).
    pub router: Ipv4Addr,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Host {
    pub name: String,
    pub cloud: String,
    pub role: Role,
    /// Underlay address (on `eth0`); also the host's VTEP.
    pub address: Ipv4Addr,
    /// Prefix length of the cloud's subnet.
    pub prefix_len: u8,
    /// The cloud router's address: the host's default route.
    pub router: Ipv4Addr,
    /// The host's own address inside the overlay.
    pub overlay_ip: Ipv4Addr,
    /// For the host facing the internet: its public address (on `pub0`).
    pub public_address: Option<Ipv4Addr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Internet {
    pub subnet: Ipv4Net,
    /// The host facing the internet.
    pub gateway: String,
    /// The gateway's public address (first address of the subnet).
    pub gateway_address: Ipv4Addr,
    /// Further hosts facing the internet, standing by, and their public addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub standby: Vec<(String, Ipv4Addr)>,
    /// The client's address (in the `inet` namespace).
    pub client: Ipv4Addr,
    /// Public endpoint addresses.
    pub public_pool: Ipv4Net,
    /// The internet side's IPv6, if any: (subnet, gateway's address, client's address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<InternetV6>,
    /// The gateway routes the overlay's IPv6 prefix from the internet side.
    #[serde(default)]
    pub public6: bool,
}

impl Internet {
    /// The public address of host `name` if it faces the internet (the gateway or a standby).
    pub fn public_address(&self, name: &str) -> Option<Ipv4Addr> {
        if self.gateway == name {
            return Some(self.gateway_address);
        }
        self.standby
            .iter()
            .find(|(h, _)| h == name)
            .map(|(_, a)| *a)
    }

    /// Every host facing the internet: the gateway first, then the standbys.
    pub fn facing(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.gateway.as_str()).chain(self.standby.iter().map(|(h, _)| h.as_str()))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InternetV6 {
    pub subnet: Ipv6Net,
    /// The gateway's address on its public interface (first of the subnet).
    pub gateway_address: std::net::Ipv6Addr,
    /// The client's address (tenth of the subnet).
    pub client: std::net::Ipv6Addr,
}

impl LabTopology {
    pub fn host(&self, name: &str) -> Option<&Host> {
        self.hosts.iter().find(|h| h.name == name)
    }
    pub fn cloud(&self, name: &str) -> Option<&Cloud> {
        self.clouds.iter().find(|c| c.name == name)
    }
    /// The shaped link between clouds `a` and `b` (either order), if any.
    pub fn link(&self, a: &str, b: &str) -> Option<&Link> {
        self.links.iter().find(|l| l.joins(a, b))
    }
}

impl Default for Topology {
    fn default() -> Self {
        Self::default_lab()
    }
}

impl Topology {
    /// The built-in default topology.
    pub fn default_lab() -> Self {
        Self::parse(DEFAULT_TOPOLOGY_TOML).expect("the built-in default topology is valid")
    }

    /// The default topology with two hosts facing the internet: the registry on etcd, a
    /// second gateway-role host `gw2` in cloud b standing by on the internet's segment, and a
    /// gateway daemon on it too (so the control plane outlives gw).
    pub fn two_public_gateways() -> Self {
        let mut t = Self::default_lab();
        t.etcd = true;
        t.hosts.push(HostSpec {
            name: "gw2".into(),
            cloud: "b".into(),
            address: None,
            role: Role::Gateway,
            overlay_ip: None,
        });
        t.extra_gateways = vec!["gw2".into()];
        if let Some(inet) = &mut t.internet {
            inet.standby_gateways = vec!["gw2".into()];
        }
        t
    }

    /// Parses and validates a topology.
    pub fn parse(text: &str) -> Result<Self, TopologyError> {
        let topology: Self = toml::from_str(text).map_err(|source| TopologyError::Parse {
            origin: "topology".to_owned(),
            source,
        })?;
        topology.resolve()?;
        Ok(topology)
    }

    /// Reads, parses and validates a topology file; errors name the file.
    pub fn load(path: &Path) -> Result<Self, TopologyError> {
        let text = std::fs::read_to_string(path).map_err(|source| TopologyError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|e| e.with_origin(path))
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a topology always serialises")
    }

    /// Checks everything serde cannot and allocates every address.
    pub fn resolve(&self) -> Result<LabTopology, TopologyError> {
        use TopologyError as E;
        if self.vni == 0 || self.vni > 0x00ff_ffff {
            return Err(E::invalid(
                "vni",
                format!("{} is not a 24-bit VNI (1..=16777215)", self.vni),
            ));
        }
        if self.vxlan_port == 0 {
            return Err(E::invalid("vxlan_port", "must not be 0"));
        }
        check_aligned("overlay_cidr", self.overlay_cidr)?;
        if self.overlay_cidr.prefix_len() > 24 {
            return Err(E::invalid(
                "overlay_cidr",
                format!(
                    "{} is smaller than a /24 (hosts' overlay addresses come from its last /24)",
                    self.overlay_cidr
                ),
            ));
        }

        // Clouds.
        if self.clouds.is_empty() {
            return Err(E::invalid("clouds", "at least one cloud is required"));
        }
        let mut clouds: Vec<Cloud> = Vec::with_capacity(self.clouds.len());
        for (i, c) in self.clouds.iter().enumerate() {
            check_name(
                &format!("clouds[{i}].name"),
                &c.name,
                MAX_CLOUD_NAME,
                "cloud",
            )?;
            if let Some(j) = self.clouds[..i].iter().position(|o| o.name == c.name) {
                return Err(E::invalid(
                    format!("clouds[{i}].name"),
                    format!("duplicate cloud name {:?} (also clouds[{j}])", c.name),
                ));
            }
            let field = format!("clouds[{i}].subnet");
            check_aligned(&field, c.subnet)?;
            if c.subnet.prefix_len() > 28 {
                return Err(E::invalid(
                    &field,
                    format!(
                        "{} is too small: a cloud needs at least a /28 (router .1, hosts from .10)",
                        c.subnet
                    ),
                ));
            }
            if let Some(j) = self.clouds[..i]
                .iter()
                .position(|o| overlaps(o.subnet, c.subnet))
            {
                return Err(E::invalid(
                    &field,
                    format!(
                        "{} overlaps clouds[{j}].subnet ({})",
                        c.subnet, self.clouds[j].subnet
                    ),
                ));
            }
            if overlaps(self.overlay_cidr, c.subnet) {
                return Err(E::invalid(
                    "overlay_cidr",
                    format!(
                        "{} overlaps the underlay clouds[{i}].subnet ({}): the overlay must be separate",
                        self.overlay_cidr, c.subnet
                    ),
                ));
            }
            clouds.push(Cloud {
                name: c.name.clone(),
                subnet: c.subnet,
                router: nth(c.subnet, 1),
            });
        }

        // Hosts: names, clouds, explicit addresses first.
        if self.hosts.is_empty() {
            return Err(E::invalid("hosts", "at least one host is required"));
        }
        if self.hosts.len() > 254 {
            return Err(E::invalid(
                "hosts",
                format!("{} hosts: at most 254 are supported", self.hosts.len()),
            ));
        }
        let mut cloud_of: Vec<usize> = Vec::with_capacity(self.hosts.len());
        let mut taken: HashMap<Ipv4Addr, usize> = HashMap::new();
        for (i, h) in self.hosts.iter().enumerate() {
            check_name(&format!("hosts[{i}].name"), &h.name, MAX_HOST_NAME, "host")?;
            if RESERVED_NAMES.contains(&h.name.as_str()) {
                return Err(E::invalid(
                    format!("hosts[{i}].name"),
                    format!("{:?} is reserved (the lab has a node of that name)", h.name),
                ));
            }
            if let Some(j) = self.hosts[..i].iter().position(|o| o.name == h.name) {
                return Err(E::invalid(
                    format!("hosts[{i}].name"),
                    format!("duplicate host name {:?} (also hosts[{j}])", h.name),
                ));
            }
            let Some(ci) = clouds.iter().position(|c| c.name == h.cloud) else {
                return Err(E::invalid(
                    format!("hosts[{i}].cloud"),
                    format!("unknown cloud {:?}", h.cloud),
                ));
            };
            cloud_of.push(ci);
            if let Some(addr) = h.address {
                let field = format!("hosts[{i}].address");
                let cloud = &clouds[ci];
                check_host_address(
                    &field,
                    addr,
                    cloud.subnet,
                    &format!("cloud {:?}", cloud.name),
                )?;
                if addr == cloud.router {
                    return Err(E::invalid(
                        field,
                        format!("{addr} is the router's address in cloud {:?}", cloud.name),
                    ));
                }
                if let Some(&j) = taken.get(&addr) {
                    return Err(E::invalid(
                        field,
                        format!(
                            "duplicate address {addr} (also hosts[{j}] {:?})",
                            self.hosts[j].name
                        ),
                    ));
                }
                taken.insert(addr, i);
            }
        }

        // Allocate the missing underlay addresses: .10, .11, ... skipping taken ones.
        let mut next: Vec<u32> = vec![FIRST_HOST; clouds.len()];
        let mut addresses: Vec<Ipv4Addr> = Vec::with_capacity(self.hosts.len());
        for (i, h) in self.hosts.iter().enumerate() {
            let ci = cloud_of[i];
            let addr = match h.address {
                Some(a) => a,
                None => {
                    let subnet = clouds[ci].subnet;
                    loop {
                        let n = next[ci];
                        next[ci] += 1;
                        if n >= host_count(subnet) {
                            return Err(E::invalid(
                                format!("hosts[{i}].address"),
                                format!(
                                    "cloud {:?} ({subnet}) has no free address left to allocate",
                                    clouds[ci].name
                                ),
                            ));
                        }
                        let a = nth(subnet, n);
                        if let std::collections::hash_map::Entry::Vacant(e) = taken.entry(a) {
                            e.insert(i);
                            break a;
                        }
                    }
                }
            };
            addresses.push(addr);
        }

        // Overlay addresses.
        let last24 = nth(self.overlay_cidr, host_count(self.overlay_cidr) + 1 - 256);
        let mut overlay_taken: HashMap<Ipv4Addr, usize> = HashMap::new();
        let mut overlay_ips = Vec::with_capacity(self.hosts.len());
        for (i, h) in self.hosts.iter().enumerate() {
            let field = format!("hosts[{i}].overlay_ip");
            let ip = match h.overlay_ip {
                Some(ip) => {
                    check_host_address(&field, ip, self.overlay_cidr, "overlay_cidr")?;
                    ip
                }
                None => Ipv4Addr::from(u32::from(last24) + i as u32 + 1),
            };
            if let Some(&j) = overlay_taken.get(&ip) {
                return Err(E::invalid(
                    field,
                    format!(
                        "duplicate overlay address {ip} (also hosts[{j}] {:?})",
                        self.hosts[j].name
                    ),
                ));
            }
            overlay_taken.insert(ip, i);
            overlay_ips.push(ip);
        }

        // The internet.
        let internet = match &self.internet {
            None => None,
            Some(inet) => {
                check_aligned("internet.subnet", inet.subnet)?;
                if inet.subnet.prefix_len() > 30 {
                    return Err(E::invalid(
                        "internet.subnet",
                        format!("{} is too small (at least a /30)", inet.subnet),
                    ));
                }
                if overlaps(inet.subnet, self.overlay_cidr) {
                    return Err(E::invalid(
                        "internet.subnet",
                        format!(
                            "{} overlaps overlay_cidr ({})",
                            inet.subnet, self.overlay_cidr
                        ),
                    ));
                }
                if let Some(j) = clouds.iter().position(|c| overlaps(c.subnet, inet.subnet)) {
                    return Err(E::invalid(
                        "internet.subnet",
                        format!(
                            "{} overlaps clouds[{j}].subnet ({})",
                            inet.subnet, clouds[j].subnet
                        ),
                    ));
                }
                let Some(gi) = self.hosts.iter().position(|h| h.name == inet.gateway) else {
                    return Err(E::invalid(
                        "internet.gateway",
                        format!("unknown host {:?}", inet.gateway),
                    ));
                };
                if self.hosts[gi].role != Role::Gateway {
                    return Err(E::invalid(
                        "internet.gateway",
                        format!(
                            "host {:?} (hosts[{gi}]) has role \"{}\", not \"gateway\"",
                            inet.gateway, self.hosts[gi].role
                        ),
                    ));
                }
                let gateway_address = nth(inet.subnet, 1);
                let mut standby = Vec::new();
                for (i, g) in inet.standby_gateways.iter().enumerate() {
                    let field = format!("internet.standby_gateways[{i}]");
                    let Some(hi) = self.hosts.iter().position(|h| h.name == *g) else {
                        return Err(E::invalid(field, format!("unknown host {g:?}")));
                    };
                    if self.hosts[hi].role != Role::Gateway {
                        return Err(E::invalid(
                            field,
                            format!(
                                "host {g:?} (hosts[{hi}]) has role \"{}\", not \"gateway\"",
                                self.hosts[hi].role
                            ),
                        ));
                    }
                    if *g == inet.gateway || inet.standby_gateways[..i].contains(g) {
                        return Err(E::invalid(
                            field,
                            format!("{g:?} faces the internet already"),
                        ));
                    }
                    let n = u32::try_from(i).unwrap_or(u32::MAX).saturating_add(2);
                    if n >= host_count(inet.subnet) {
                        return Err(E::invalid(
                            field,
                            format!("no address left in {}", inet.subnet),
                        ));
                    }
                    standby.push((g.clone(), nth(inet.subnet, n)));
                }
                let client = match inet.client {
                    Some(c) => {
                        check_host_address("internet.client", c, inet.subnet, "internet.subnet")?;
                        if c == gateway_address || standby.iter().any(|(_, a)| *a == c) {
                            return Err(E::invalid(
                                "internet.client",
                                format!("{c} is a gateway's public address"),
                            ));
                        }
                        c
                    }
                    None => {
                        let n = if host_count(inet.subnet) > FIRST_HOST {
                            FIRST_HOST
                        } else {
                            2
                        };
                        nth(inet.subnet, n)
                    }
                };
                let public_pool = match inet.public_pool {
                    Some(p) => p,
                    None => {
                        let len = (inet.subnet.prefix_len() + 1).min(32);
                        let upper = u32::from(inet.subnet.network())
                            | (1u32 << (32 - u32::from(len))).min(u32::MAX >> 1);
                        Ipv4Net::new(Ipv4Addr::from(upper), len).expect("valid prefix")
                    }
                };
                if !inet.subnet.contains(&public_pool) {
                    return Err(E::invalid(
                        "internet.public_pool",
                        format!(
                            "{public_pool} is not inside internet.subnet {}",
                            inet.subnet
                        ),
                    ));
                }
                if standby.iter().any(|(_, a)| *a == client) {
                    return Err(E::invalid(
                        "internet.standby_gateways",
                        format!("a standby's public address is the client's ({client})"),
                    ));
                }
                let standby_addresses = standby.iter().map(|(_, a)| ("gateway's", *a));
                for (what, a) in [("gateway's", gateway_address), ("client's", client)]
                    .into_iter()
                    .chain(standby_addresses)
                {
                    if public_pool.contains(&a) {
                        return Err(E::invalid(
                            "internet.public_pool",
                            format!("{public_pool} holds the {what} address {a}"),
                        ));
                    }
                }
                let ipv6 = match inet.subnet6 {
                    None => None,
                    Some(s6) => {
                        if s6.prefix_len() > 64 || s6.network() != s6.addr() {
                            return Err(E::invalid(
                                "internet.subnet6",
                                format!("{s6} is not an aligned /64 or shorter"),
                            ));
                        }
                        if self
                            .overlay6_cidr
                            .is_some_and(|o| s6.contains(&o) || o.contains(&s6))
                        {
                            return Err(E::invalid(
                                "internet.subnet6",
                                format!("{s6} overlaps overlay6_cidr"),
                            ));
                        }
                        let at = |n: u128| std::net::Ipv6Addr::from(u128::from(s6.network()) + n);
                        Some(InternetV6 {
                            subnet: s6,
                            gateway_address: at(1),
                            client: at(10),
                        })
                    }
                };
                if inet.public6 && (ipv6.is_none() || self.overlay6_cidr.is_none()) {
                    return Err(E::invalid(
                        "internet.public6",
                        "needs overlay6_cidr and internet.subnet6".to_owned(),
                    ));
                }
                Some(Internet {
                    subnet: inet.subnet,
                    gateway: inet.gateway.clone(),
                    gateway_address,
                    standby,
                    client,
                    public_pool,
                    ipv6,
                    public6: inet.public6,
                })
            }
        };

        let hosts: Vec<Host> = self
            .hosts
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let cloud = &clouds[cloud_of[i]];
                Host {
                    name: h.name.clone(),
                    cloud: cloud.name.clone(),
                    role: h.role,
                    address: addresses[i],
                    prefix_len: cloud.subnet.prefix_len(),
                    router: cloud.router,
                    overlay_ip: overlay_ips[i],
                    public_address: internet
                        .as_ref()
                        .and_then(|inet| inet.public_address(&h.name)),
                }
            })
            .collect();

        let links = self
            .links
            .iter()
            .enumerate()
            .map(|(i, l)| resolve_link(i, l, &self.links[..i], &clouds))
            .collect::<Result<Vec<_>, _>>()?;

        if let Some(o) = self.overlay6_cidr
            && (o.prefix_len() != 96 || o.network() != o.addr())
        {
            return Err(E::invalid(
                "overlay6_cidr",
                format!("{o} is not an aligned /96"),
            ));
        }
        let etcd = if self.etcd {
            if internet.is_none() {
                return Err(E::invalid(
                    "etcd",
                    "etcd is the gateway's store: the topology needs an [internet] side with a gateway"
                        .to_owned(),
                ));
            }
            clouds
                .iter()
                .filter_map(|c: &Cloud| hosts.iter().find(|h: &&Host| h.cloud == c.name))
                .map(|h| h.name.clone())
                .collect()
        } else {
            Vec::new()
        };
        for (i, g) in self.extra_gateways.iter().enumerate() {
            let field = format!("extra_gateways[{i}]");
            if !self.etcd {
                return Err(E::invalid(
                    field,
                    "several gateways share the registry through etcd: set etcd = true",
                ));
            }
            if !hosts.iter().any(|h| h.name == *g) {
                return Err(E::invalid(field, format!("unknown host {g:?}")));
            }
            if internet.as_ref().is_some_and(|i| i.gateway == *g) {
                return Err(E::invalid(field, format!("{g:?} already runs the gateway")));
            }
            if self.extra_gateways[..i].contains(g) {
                return Err(E::invalid(field, format!("{g:?} twice")));
            }
        }
        Ok(LabTopology {
            direct_routing: self.direct_routing,
            announce_relay: self.announce_relay,
            etcd,
            extra_gateways: self.extra_gateways.clone(),
            gateway_connections_per_peer: self.gateway_connections_per_peer,
            overlay_cidr: self.overlay_cidr,
            overlay6_cidr: self.overlay6_cidr,
            vni: self.vni,
            vxlan_port: self.vxlan_port,
            clouds,
            hosts,
            internet,
            links,
        })
    }
}

/// A shaped link between two clouds as written in TOML: a profile, numbers, or a profile
/// with some of its numbers overridden. Every property applies to each direction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinkSpec {
    /// The two clouds (distinct, in any order).
    pub between: Vec<String>,
    /// A named profile ([`PROFILES`]): `lan`, `wan` or `intercontinental`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// One-way delay, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_ms: Option<f64>,
    /// The one-way delay varies within `delay_ms ± jitter_ms` (never reordering packets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jitter_ms: Option<f64>,
    /// Probability that a packet is lost (0 to 1), independently per packet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    /// Rate limit, Mbit/s (10^6 bit/s); absent (and no profile): not rate-limited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_mbit: Option<f64>,
    /// The bottleneck's buffer, as the time it takes to drain at the rate (needs a rate);
    /// default: one round trip (2 × delay_ms), at least [`MIN_DEFAULT_QUEUE_MS`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_ms: Option<f64>,
}

/// What a link does to each direction's packets.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LinkProps {
    pub delay_ms: f64,
    pub jitter_ms: f64,
    pub loss: f64,
    /// `None`: not rate-limited.
    pub rate_mbit: Option<f64>,
}

/// The named link profiles. Rates are modest on purpose: a lab's links are emulated by one
/// process on a small machine, and a profile must be delivered faithfully there (measured
/// figures: docs/benchmarks.md, "WAN links").
pub const PROFILES: [(&str, LinkProps); 3] = [
    // Two clouds in one metro area (e.g. availability zones): 1 ms RTT.
    (
        "lan",
        LinkProps {
            delay_ms: 0.5,
            jitter_ms: 0.05,
            loss: 0.0,
            rate_mbit: Some(300.0),
        },
    ),
    // Two regions of one continent: 60 ms RTT.
    (
        "wan",
        LinkProps {
            delay_ms: 30.0,
            jitter_ms: 2.0,
            loss: 0.0001,
            rate_mbit: Some(200.0),
        },
    ),
    // Across an ocean: 150 ms RTT.
    (
        "intercontinental",
        LinkProps {
            delay_ms: 75.0,
            jitter_ms: 5.0,
            loss: 0.0002,
            rate_mbit: Some(100.0),
        },
    ),
];

/// The profile named `name`.
pub fn profile(name: &str) -> Option<LinkProps> {
    PROFILES.iter().find(|(n, _)| *n == name).map(|(_, p)| *p)
}

/// Longest one-way delay a link may have (10 s).
pub const MAX_DELAY_MS: f64 = 10_000.0;
/// Lowest and highest rate, Mbit/s (100 kbit/s to 100 Gbit/s).
pub const MIN_RATE_MBIT: f64 = 0.1;
pub const MAX_RATE_MBIT: f64 = 100_000.0;
/// The shortest default bottleneck buffer, ms at the rate: a short link still needs some
/// buffer for TCP's bursts, and for a UDP sender's on a busy machine (measured: a 10 ms
/// buffer at 500 Mbit/s lost 13 % of the rate to a bursty iperf3, 30 ms lost 4 %).
pub const MIN_DEFAULT_QUEUE_MS: f64 = 20.0;

/// A resolved link: every property known.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Link {
    /// The two clouds, as the topology names them.
    pub between: [String; 2],
    /// The profile it started from, if any.
    pub profile: Option<String>,
    pub delay_ms: f64,
    pub jitter_ms: f64,
    pub loss: f64,
    pub rate_mbit: Option<f64>,
    /// The bottleneck's buffer (ms at the rate); `Some` exactly when `rate_mbit` is.
    pub queue_ms: Option<f64>,
}

impl Link {
    /// Does this link join clouds `a` and `b` (either order)?
    pub fn joins(&self, a: &str, b: &str) -> bool {
        (self.between[0] == a && self.between[1] == b)
            || (self.between[0] == b && self.between[1] == a)
    }

    /// `a–b`: how messages name the link.
    pub fn name(&self) -> String {
        format!("{}–{}", self.between[0], self.between[1])
    }

    pub fn props(&self) -> LinkProps {
        LinkProps {
            delay_ms: self.delay_ms,
            jitter_ms: self.jitter_ms,
            loss: self.loss,
            rate_mbit: self.rate_mbit,
        }
    }
}

/// Checks links[i] (`earlier` are the links before it) and fills in its properties.
fn resolve_link(
    i: usize,
    l: &LinkSpec,
    earlier: &[LinkSpec],
    clouds: &[Cloud],
) -> Result<Link, TopologyError> {
    use TopologyError as E;
    let f = |name: &str| format!("links[{i}].{name}");
    let [a, b] = match l.between.as_slice() {
        [a, b] => [a.clone(), b.clone()],
        other => {
            return Err(E::invalid(
                f("between"),
                format!(
                    "names {} cloud(s): a link joins exactly two, e.g. between = [\"a\", \"b\"]",
                    other.len()
                ),
            ));
        }
    };
    for name in [&a, &b] {
        if !clouds.iter().any(|c| &c.name == name) {
            return Err(E::invalid(
                f("between"),
                format!(
                    "unknown cloud {name:?} (clouds: {})",
                    clouds
                        .iter()
                        .map(|c| c.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
    }
    if a == b {
        return Err(E::invalid(
            f("between"),
            format!(
                "joins cloud {a:?} to itself: hosts of one cloud share its bridge, their traffic is not shaped"
            ),
        ));
    }
    if let Some(j) = earlier.iter().position(|o| {
        o.between.len() == 2
            && ((o.between[0] == a && o.between[1] == b)
                || (o.between[0] == b && o.between[1] == a))
    }) {
        return Err(E::invalid(
            f("between"),
            format!("clouds {a:?} and {b:?} already have a link (links[{j}])"),
        ));
    }
    let base = match &l.profile {
        Some(p) => profile(p).ok_or_else(|| {
            E::invalid(
                f("profile"),
                format!(
                    "unknown profile {p:?} (profiles: {})",
                    PROFILES.map(|(n, _)| n).join(", ")
                ),
            )
        })?,
        None => {
            if l.delay_ms.is_none()
                && l.jitter_ms.is_none()
                && l.loss.is_none()
                && l.rate_mbit.is_none()
            {
                return Err(E::invalid(
                    format!("links[{i}]"),
                    "sets nothing: give a profile (lan, wan, intercontinental) or at least one of delay_ms, jitter_ms, loss, rate_mbit",
                ));
            }
            LinkProps {
                delay_ms: 0.0,
                jitter_ms: 0.0,
                loss: 0.0,
                rate_mbit: None,
            }
        }
    };
    let number = |name: &str, v: f64, lo: f64, hi: f64, unit: &str| {
        if v.is_finite() && v >= lo && v <= hi {
            Ok(v)
        } else {
            Err(E::invalid(
                f(name),
                format!("{v} is out of range ({lo} to {hi}{unit})"),
            ))
        }
    };
    let delay_ms = number(
        "delay_ms",
        l.delay_ms.unwrap_or(base.delay_ms),
        0.0,
        MAX_DELAY_MS,
        " ms",
    )?;
    let jitter_ms = number(
        "jitter_ms",
        l.jitter_ms.unwrap_or(base.jitter_ms),
        0.0,
        MAX_DELAY_MS,
        " ms",
    )?;
    if jitter_ms > delay_ms {
        return Err(E::invalid(
            f("jitter_ms"),
            format!(
                "{jitter_ms} ms is more than the link's delay ({delay_ms} ms): a packet cannot arrive before it was sent"
            ),
        ));
    }
    let loss = number("loss", l.loss.unwrap_or(base.loss), 0.0, 1.0, "")?;
    let rate_mbit = match l.rate_mbit.or(base.rate_mbit) {
        Some(r) => Some(number(
            "rate_mbit",
            r,
            MIN_RATE_MBIT,
            MAX_RATE_MBIT,
            " Mbit/s",
        )?),
        None => None,
    };
    let queue_ms = match (l.queue_ms, rate_mbit) {
        (Some(_), None) => {
            return Err(E::invalid(
                f("queue_ms"),
                "is the buffer in front of a rate limit: set rate_mbit too (or a profile)",
            ));
        }
        (Some(q), Some(_)) => {
            if !(q.is_finite() && q > 0.0 && q <= MAX_DELAY_MS) {
                return Err(E::invalid(
                    f("queue_ms"),
                    format!("{q} is out of range (more than 0, at most {MAX_DELAY_MS} ms)"),
                ));
            }
            Some(q)
        }
        (None, Some(_)) => Some((2.0 * delay_ms).max(MIN_DEFAULT_QUEUE_MS)),
        (None, None) => None,
    };
    Ok(Link {
        between: [a, b],
        profile: l.profile.clone(),
        delay_ms,
        jitter_ms,
        loss,
        rate_mbit,
        queue_ms,
    })
}

/// Address number `n` of `net` (0 = network address).
fn nth(net: Ipv4Net, n: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(net.network()) + n)
}

/// Number of the broadcast address of `net` (= count of addresses - 1).
fn host_count(net: Ipv4Net) -> u32 {
    u32::from(net.broadcast()) - u32::from(net.network())
}

fn overlaps(a: Ipv4Net, b: Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

fn check_aligned(field: &str, net: Ipv4Net) -> Result<(), TopologyError> {
    if net.addr() != net.network() {
        return Err(TopologyError::invalid(
            field,
            format!("{net} has host bits set (did you mean {}?)", net.trunc()),
        ));
    }
    Ok(())
}

fn check_host_address(
    field: &str,
    addr: Ipv4Addr,
    net: Ipv4Net,
    what: &str,
) -> Result<(), TopologyError> {
    if !net.contains(&addr) {
        return Err(TopologyError::invalid(
            field,
            format!("{addr} is outside {what} ({net})"),
        ));
    }
    if addr == net.network() || addr == net.broadcast() {
        return Err(TopologyError::invalid(
            field,
            format!("{addr} is the network or broadcast address of {net}"),
        ));
    }
    Ok(())
}

fn check_name(field: &str, name: &str, max: usize, what: &str) -> Result<(), TopologyError> {
    let ok = !name.is_empty()
        && name.len() <= max
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(TopologyError::invalid(
            field,
            format!(
                "{name:?} is not a valid {what} name (1 to {max} characters of [a-z0-9-], not starting with '-')"
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        Topology::parse(text).unwrap_err().to_string()
    }

    fn invalid_field(text: &str) -> String {
        match Topology::parse(text).unwrap_err() {
            TopologyError::Invalid { field, .. } => field,
            other => panic!("expected a validation error, got: {other}"),
        }
    }

    const SMALL: &str = r#"
[[clouds]]
name = "a"
subnet = "198.18.1.0/24"
[[clouds]]
name = "b"
subnet = "198.18.2.0/24"
[[hosts]]
name = "a1"
cloud = "a"
[[hosts]]
name = "b1"
cloud = "b"
"#;

    #[test]
    fn default_lab_resolves_as_documented() {
        let t = Topology::default_lab();
        assert_eq!(t.overlay_cidr, "10.244.0.0/16".parse::<Ipv4Net>().unwrap());
        assert_eq!((t.vni, t.vxlan_port), (4242, 4789));
        let r = t.resolve().unwrap();
        let names: Vec<_> = r.clouds.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["edge", "a", "b"]);
        assert_eq!(r.cloud("a").unwrap().router, Ipv4Addr::new(198, 18, 1, 1));
        let h = |n: &str| r.host(n).unwrap().clone();
        assert_eq!(h("a1").address, Ipv4Addr::new(198, 18, 1, 10));
        assert_eq!(h("a2").address, Ipv4Addr::new(198, 18, 1, 11));
        assert_eq!(h("b1").address, Ipv4Addr::new(198, 18, 2, 10));
        assert_eq!(h("gw").address, Ipv4Addr::new(198, 18, 0, 10));
        assert_eq!(h("b1").router, Ipv4Addr::new(198, 18, 2, 1));
        assert_eq!(h("b1").prefix_len, 24);
        assert_eq!(h("a1").overlay_ip, Ipv4Addr::new(10, 244, 255, 1));
        assert_eq!(h("a2").overlay_ip, Ipv4Addr::new(10, 244, 255, 2));
        assert_eq!(h("b1").overlay_ip, Ipv4Addr::new(10, 244, 255, 3));
        assert_eq!(h("gw").overlay_ip, Ipv4Addr::new(10, 244, 255, 4));
        assert_eq!(h("gw").role, Role::Gateway);
        assert_eq!(h("a1").role, Role::Host);
        assert_eq!(h("gw").public_address, Some(Ipv4Addr::new(203, 0, 113, 1)));
        assert_eq!(h("a1").public_address, None);
        let inet = r.internet.unwrap();
        assert_eq!(inet.gateway, "gw");
        assert_eq!(inet.client, Ipv4Addr::new(203, 0, 113, 10));
        assert_eq!(inet.gateway_address, Ipv4Addr::new(203, 0, 113, 1));
    }

    #[test]
    fn a_standby_gateway_faces_the_internet_too() {
        let t = Topology::two_public_gateways();
        assert_eq!(Topology::parse(&t.to_toml()).unwrap(), t);
        let r = t.resolve().unwrap();
        let inet = r.internet.clone().unwrap();
        assert_eq!(
            inet.standby,
            vec![("gw2".to_owned(), Ipv4Addr::new(203, 0, 113, 2))]
        );
        assert_eq!(inet.facing().collect::<Vec<_>>(), ["gw", "gw2"]);
        assert_eq!(
            r.host("gw2").unwrap().public_address,
            Some(Ipv4Addr::new(203, 0, 113, 2))
        );
        assert_eq!(r.host("b1").unwrap().public_address, None);
        // A standby must be a gateway-role host, known, and not twice.
        for (standby, want) in [
            ("b1", "internet.standby_gateways[0]: host \"b1\""),
            ("zz", "internet.standby_gateways[0]: unknown host \"zz\""),
            (
                "gw",
                "internet.standby_gateways[0]: \"gw\" faces the internet already",
            ),
        ] {
            let mut t = Topology::two_public_gateways();
            t.internet.as_mut().unwrap().standby_gateways = vec![standby.into()];
            let e = t.resolve().unwrap_err().to_string();
            assert!(e.contains(want), "{standby}: {e}");
        }
    }

    #[test]
    fn defaults_fill_in_and_round_trip() {
        let t = Topology::parse(SMALL).unwrap();
        assert_eq!(t.vni, 4242);
        assert_eq!(t.vxlan_port, 4789);
        assert_eq!(t.overlay_cidr.to_string(), "10.244.0.0/16");
        assert!(t.internet.is_none());
        assert_eq!(Topology::parse(&t.to_toml()).unwrap(), t);
        let d = Topology::default_lab();
        assert_eq!(Topology::parse(&d.to_toml()).unwrap(), d);
        // [internet] with every field defaulted.
        let text = format!(
            "{SMALL}[[clouds]]\nname = \"edge\"\nsubnet = \"198.18.0.0/24\"\n\
             [[hosts]]\nname = \"gw\"\ncloud = \"edge\"\nrole = \"gateway\"\n[internet]\n"
        );
        let r = Topology::parse(&text).unwrap().resolve().unwrap();
        let inet = r.internet.unwrap();
        assert_eq!(inet.subnet.to_string(), "203.0.113.0/24");
        assert_eq!(inet.client, Ipv4Addr::new(203, 0, 113, 10));
    }

    #[test]
    fn allocation_skips_explicit_addresses_and_honours_overlay_ip() {
        let text = r#"
overlay_cidr = "10.50.0.0/16"
[[clouds]]
name = "a"
subnet = "198.18.1.0/24"
[[hosts]]
name = "x"
cloud = "a"
[[hosts]]
name = "y"
cloud = "a"
address = "198.18.1.11"
overlay_ip = "10.50.7.7"
[[hosts]]
name = "z"
cloud = "a"
"#;
        let r = Topology::parse(text).unwrap().resolve().unwrap();
        let addr = |n: &str| r.host(n).unwrap().address;
        assert_eq!(addr("x"), Ipv4Addr::new(198, 18, 1, 10));
        assert_eq!(addr("y"), Ipv4Addr::new(198, 18, 1, 11));
        assert_eq!(addr("z"), Ipv4Addr::new(198, 18, 1, 12));
        let ov = |n: &str| r.host(n).unwrap().overlay_ip;
        assert_eq!(ov("x"), Ipv4Addr::new(10, 50, 255, 1));
        assert_eq!(ov("y"), Ipv4Addr::new(10, 50, 7, 7));
        assert_eq!(ov("z"), Ipv4Addr::new(10, 50, 255, 3));
    }

    #[test]
    fn syntax_errors_keep_line_and_column() {
        let e = err("overlay_cidr = \"10.244.0.0/16\"\n[[clouds]\nname = 1\n");
        assert!(e.contains("line 2"), "{e}");
        assert!(e.contains("column"), "{e}");
    }

    #[test]
    fn unknown_fields_and_bad_types_are_named() {
        let e = err(&format!("colour = \"red\"\n{SMALL}"));
        assert!(e.contains("colour"), "{e}");
        let e = err(&SMALL.replace("cloud = \"a\"", "cloud = \"a\"\nram = 4"));
        assert!(e.contains("ram"), "{e}");
        let e = err(&SMALL.replace("198.18.1.0/24", "198.18.1.0/33"));
        assert!(e.contains("line"), "{e}");
        let e = err(&format!("vni = -1\n{SMALL}"));
        assert!(e.contains("vni"), "{e}");
        let e = err(&SMALL.replace("name = \"b1\"\n", ""));
        assert!(e.contains("name"), "{e}");
        let e = err(&SMALL.replace("cloud = \"b\"", "cloud = \"b\"\nrole = \"router\""));
        assert!(e.contains("role") || e.contains("router"), "{e}");
        let e = err("[[clouds]]\nname = \"a\"\nsubnet = \"198.18.1.0/24\"\n");
        assert!(e.contains("hosts"), "{e}");
    }

    /// Each malformed topology is rejected, with the message naming the field.
    #[test]
    fn validation_errors_name_the_field() {
        let cases: Vec<(String, &str, &str)> = vec![
            (
                SMALL.replace("cloud = \"b\"", "cloud = \"c\""),
                "hosts[1].cloud",
                "unknown cloud \"c\"",
            ),
            (
                SMALL.replace("198.18.2.0/24", "198.18.1.0/25"),
                "clouds[1].subnet",
                "overlaps clouds[0].subnet",
            ),
            (
                SMALL.replace("\"a1\"", "\"A B\""),
                "hosts[0].name",
                "\"A B\" is not a valid host name",
            ),
            (
                SMALL.replace("\"a1\"", "\"abcdefghijk\""),
                "hosts[0].name",
                "not a valid host name",
            ),
            (
                SMALL.replace("\"b1\"", "\"a1\""),
                "hosts[1].name",
                "duplicate host name",
            ),
            (
                SMALL.replace("\"b1\"", "\"router\""),
                "hosts[1].name",
                "reserved",
            ),
            (
                SMALL.replace("name = \"b\"", "name = \"a\""),
                "clouds[1].name",
                "duplicate cloud name",
            ),
            (
                SMALL.replace("name = \"b\"", "name = \"Cloud_B\""),
                "clouds[1].name",
                "not a valid cloud name",
            ),
            (
                SMALL.replace("name = \"b\"", "name = \"thirteenchars\""),
                "clouds[1].name",
                "not a valid cloud name",
            ),
            (
                SMALL.replace("cloud = \"a\"", "cloud = \"a\"\naddress = \"198.18.2.10\""),
                "hosts[0].address",
                "outside cloud \"a\"",
            ),
            (
                SMALL.replace("cloud = \"a\"", "cloud = \"a\"\naddress = \"198.18.1.1\""),
                "hosts[0].address",
                "router",
            ),
            (
                SMALL.replace("cloud = \"a\"", "cloud = \"a\"\naddress = \"198.18.1.255\""),
                "hosts[0].address",
                "broadcast",
            ),
            (
                format!(
                    "{}[[hosts]]\nname = \"a2\"\ncloud = \"a\"\naddress = \"198.18.1.10\"\n",
                    SMALL.replace("cloud = \"a\"", "cloud = \"a\"\naddress = \"198.18.1.10\"")
                ),
                "hosts[2].address",
                "duplicate address 198.18.1.10",
            ),
            (
                format!("overlay_cidr = \"198.18.0.0/16\"\n{SMALL}"),
                "overlay_cidr",
                "overlaps the underlay clouds[0].subnet",
            ),
            (
                format!("overlay_cidr = \"10.244.0.0/25\"\n{SMALL}"),
                "overlay_cidr",
                "smaller than a /24",
            ),
            (
                format!("overlay_cidr = \"10.244.1.0/16\"\n{SMALL}"),
                "overlay_cidr",
                "host bits",
            ),
            (
                SMALL.replace("198.18.2.0/24", "198.18.2.7/24"),
                "clouds[1].subnet",
                "host bits",
            ),
            (
                SMALL.replace("198.18.2.0/24", "198.18.2.0/29"),
                "clouds[1].subnet",
                "too small",
            ),
            (format!("vni = 0\n{SMALL}"), "vni", "24-bit"),
            (format!("vni = 16777216\n{SMALL}"), "vni", "24-bit"),
            (format!("vxlan_port = 0\n{SMALL}"), "vxlan_port", "0"),
            (
                SMALL.replace("cloud = \"b\"", "cloud = \"b\"\noverlay_ip = \"10.9.0.1\""),
                "hosts[1].overlay_ip",
                "outside overlay_cidr",
            ),
            (
                SMALL.replace(
                    "cloud = \"b\"",
                    "cloud = \"b\"\noverlay_ip = \"10.244.255.1\"",
                ),
                "hosts[1].overlay_ip",
                "duplicate overlay address",
            ),
            (
                format!("{SMALL}[internet]\ngateway = \"a1\"\n"),
                "internet.gateway",
                "not \"gateway\"",
            ),
            (
                format!("{SMALL}[internet]\n"),
                "internet.gateway",
                "unknown host \"gw\"",
            ),
            (
                format!("{SMALL}[internet]\nsubnet = \"198.18.0.0/16\"\n"),
                "internet.subnet",
                "overlaps clouds[0].subnet",
            ),
            (
                format!(
                    "{}[internet]\ngateway = \"b1\"\nclient = \"203.0.114.10\"\n",
                    SMALL.replace("cloud = \"b\"", "cloud = \"b\"\nrole = \"gateway\"")
                ),
                "internet.client",
                "outside internet.subnet",
            ),
            (
                format!(
                    "{}[internet]\ngateway = \"b1\"\nclient = \"203.0.113.1\"\n",
                    SMALL.replace("cloud = \"b\"", "cloud = \"b\"\nrole = \"gateway\"")
                ),
                "internet.client",
                "gateway's public address",
            ),
            (
                "clouds = []\nhosts = []\n".to_owned(),
                "clouds",
                "at least one",
            ),
            (
                "hosts = []\n[[clouds]]\nname = \"a\"\nsubnet = \"198.18.1.0/24\"\n".to_owned(),
                "hosts",
                "at least one",
            ),
        ];
        for (text, field, needle) in cases {
            let e = Topology::parse(&text).unwrap_err();
            let msg = e.to_string();
            assert_eq!(
                e.field(),
                Some(field),
                "wrong field in {msg:?} for:\n{text}"
            );
            assert!(
                msg.starts_with(&format!("{field}: ")),
                "message does not lead with the field: {msg:?}"
            );
            assert!(msg.contains(needle), "{msg:?} lacks {needle:?}");
        }
    }

    fn with_links(links: &str) -> String {
        format!("{SMALL}[[clouds]]\nname = \"c\"\nsubnet = \"198.18.3.0/24\"\n{links}")
    }

    #[test]
    fn links_take_a_profile_numbers_or_both() {
        let text = with_links(
            "[[links]]\nbetween = [\"a\", \"b\"]\nprofile = \"wan\"\n\
             [[links]]\nbetween = [\"c\", \"a\"]\ndelay_ms = 5\nloss = 0.01\n\
             [[links]]\nbetween = [\"b\", \"c\"]\nprofile = \"intercontinental\"\nrate_mbit = 20\nqueue_ms = 40.5\n",
        );
        let t = Topology::parse(&text).unwrap();
        assert_eq!(Topology::parse(&t.to_toml()).unwrap(), t, "{}", t.to_toml());
        let r = t.resolve().unwrap();
        let wan = r.link("b", "a").unwrap();
        assert_eq!(wan.profile.as_deref(), Some("wan"));
        assert_eq!(wan.props(), profile("wan").unwrap());
        assert_eq!(wan.queue_ms, Some(60.0), "one round trip by default");
        let ca = r.link("a", "c").unwrap();
        assert_eq!(ca.between, ["c".to_owned(), "a".to_owned()]);
        assert_eq!(
            (
                ca.delay_ms,
                ca.jitter_ms,
                ca.loss,
                ca.rate_mbit,
                ca.queue_ms
            ),
            (5.0, 0.0, 0.01, None, None)
        );
        let bc = r.link("c", "b").unwrap();
        let ic = profile("intercontinental").unwrap();
        assert_eq!(
            (
                bc.delay_ms,
                bc.jitter_ms,
                bc.loss,
                bc.rate_mbit,
                bc.queue_ms
            ),
            (ic.delay_ms, ic.jitter_ms, ic.loss, Some(20.0), Some(40.5))
        );
        assert_eq!(bc.name(), "b–c");
        // Without links nothing is shaped, and the file round-trips without a `links` key.
        let small = Topology::parse(SMALL).unwrap();
        assert!(small.resolve().unwrap().links.is_empty());
        assert!(!small.to_toml().contains("links"));
        // A short link gets the minimum default buffer.
        let r = Topology::parse(&with_links(
            "[[links]]\nbetween = [\"a\", \"b\"]\nprofile = \"lan\"\n",
        ))
        .unwrap()
        .resolve()
        .unwrap();
        assert_eq!(r.links[0].queue_ms, Some(MIN_DEFAULT_QUEUE_MS));
    }

    #[test]
    fn every_profile_is_valid_and_documented_rates_are_modest() {
        for (name, p) in PROFILES {
            let text = with_links(&format!(
                "[[links]]\nbetween = [\"a\", \"b\"]\nprofile = \"{name}\"\n"
            ));
            let r = Topology::parse(&text).unwrap().resolve().unwrap();
            assert_eq!(r.links[0].props(), p, "{name}");
            assert!(p.jitter_ms <= p.delay_ms, "{name}");
            assert!(p.rate_mbit.is_some_and(|r| r <= 300.0), "{name}");
        }
        assert_eq!(PROFILES.map(|(n, _)| n), ["lan", "wan", "intercontinental"]);
    }

    /// Each malformed link is rejected, naming the field.
    #[test]
    fn link_errors_name_the_field() {
        let cases: Vec<(&str, &str, &str)> = vec![
            (
                "[[links]]\nbetween = [\"a\"]\nprofile = \"wan\"\n",
                "links[0].between",
                "names 1 cloud(s)",
            ),
            (
                "[[links]]\nbetween = [\"a\", \"b\", \"c\"]\nprofile = \"wan\"\n",
                "links[0].between",
                "exactly two",
            ),
            (
                "[[links]]\nbetween = [\"a\", \"x\"]\nprofile = \"wan\"\n",
                "links[0].between",
                "unknown cloud \"x\" (clouds: a, b, c)",
            ),
            (
                "[[links]]\nbetween = [\"a\", \"a\"]\nprofile = \"wan\"\n",
                "links[0].between",
                "to itself",
            ),
            (
                "[[links]]\nbetween = [\"a\", \"b\"]\nprofile = \"wan\"\n\
                 [[links]]\nbetween = [\"b\", \"a\"]\nprofile = \"lan\"\n",
                "links[1].between",
                "already have a link (links[0])",
            ),
            (
                "[[links]]\nbetween = [\"a\", \"b\"]\nprofile = \"satellite\"\n",
                "links[0].profile",
                "unknown profile \"satellite\" (profiles: lan, wan, intercontinental)",
            ),
            (
                "[[links]]\nbetween = [\"a\", \"b\"]\n",
                "links[0]",
                "sets nothing",
            ),
            (
                "[[links]]\nbetween = [\"a\", \"b\"]\ndelay_ms = -1\n",
                "links[0].delay_ms",
                "-1 is out of range (0 to 10000 ms)",
            ),
            (
                "[[links]]\nbetween = [\"a\", \"b\"]\ndelay_ms = 20000\n",
                "links[0].delay_ms",
                "out of range",
            ),
            (
                "[[links]]\nbetween = [\"a\", \"b\"]\ndelay_ms = nan\n",
                "links[0].delay_ms",
                "NaN is out of range",
            ),
            (
                "[[links]]\nbetween = [\"a\", \"b\"]\ndelay_ms = 5\njitter_ms = 6\n",
                "links[0].jitter_ms",
                "more than the link's delay (5 ms)",
            ),
            (
                "[[links]]\nbetween = [\"a\", \"b\"]\nprofile = \"lan\"\njitter_ms = 1\n",
                "links[0].jitter_ms",
                "more than the link's delay (0.5 ms)",
            ),
            (
                "[[links]]\nbetween = [\"a\", \"b\"]\njitter_ms = -0.5\n",
                "links[0].jitter_ms",
                "out of range",
            ),
            (
                "[[links]]\nbetween = [\"a\", \"b\"]\nloss = 1.5\n",
                "links[0].loss",
                "1.5 is out of range (0 to 1)",
            ),
            (
                "[[links]]\nbetween = [\"a\", \"b\"]\nloss = -0.1\n",
                "links[0].loss",
                "out of range",
            ),
            (
                "[[links]]\nbetween = [\"a\", \"b\"]\nrate_mbit = 0\n",
                "links[0].rate_mbit",
                "0 is out of range (0.1 to 100000 Mbit/s)",
            ),
            (
                "[[links]]\nbetween = [\"a\", \"b\"]\nrate_mbit = inf\n",
                "links[0].rate_mbit",
                "out of range",
            ),
            (
                "[[links]]\nbetween = [\"a\", \"b\"]\ndelay_ms = 3\nqueue_ms = 10\n",
                "links[0].queue_ms",
                "set rate_mbit too",
            ),
            (
                "[[links]]\nbetween = [\"a\", \"b\"]\nprofile = \"wan\"\nqueue_ms = 0\n",
                "links[0].queue_ms",
                "out of range",
            ),
        ];
        for (links, field, needle) in cases {
            let text = with_links(links);
            let e = Topology::parse(&text).unwrap_err();
            let msg = e.to_string();
            assert_eq!(
                e.field(),
                Some(field),
                "wrong field in {msg:?} for:\n{links}"
            );
            assert!(
                msg.starts_with(&format!("{field}: ")),
                "message does not lead with the field: {msg:?}"
            );
            assert!(msg.contains(needle), "{msg:?} lacks {needle:?}");
        }
        // Shape errors come from serde with the line: an unknown key, a wrong type.
        let e = err(&with_links(
            "[[links]]\nbetween = [\"a\", \"b\"]\nprofile = \"wan\"\nbandwidth = 3\n",
        ));
        assert!(e.contains("bandwidth") && e.contains("line"), "{e}");
        let e = err(&with_links(
            "[[links]]\nbetween = \"a,b\"\nprofile = \"wan\"\n",
        ));
        assert!(e.contains("between") || e.contains("sequence"), "{e}");
        let e = err(&with_links(
            "[[links]]\nbetween = [\"a\", \"b\"]\ndelay_ms = \"30ms\"\n",
        ));
        assert!(e.contains("line"), "{e}");
    }

    #[test]
    fn full_cloud_reports_no_free_address() {
        let mut text = "[[clouds]]\nname = \"a\"\nsubnet = \"198.18.1.0/28\"\n".to_owned();
        // .10 .. .14 are free in a /28 (.15 is broadcast): the 6th host does not fit.
        for i in 0..6 {
            text.push_str(&format!("[[hosts]]\nname = \"h{i}\"\ncloud = \"a\"\n"));
        }
        assert_eq!(invalid_field(&text), "hosts[5].address");
        let e = err(&text);
        assert!(e.contains("no free address"), "{e}");
    }

    #[test]
    fn load_names_the_file() {
        let dir = std::env::temp_dir().join(format!("ferry-lab-topo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.toml");
        std::fs::write(&path, SMALL.replace("cloud = \"b\"", "cloud = \"zz\"")).unwrap();
        let e = Topology::load(&path).unwrap_err().to_string();
        assert!(e.contains("bad.toml"), "{e}");
        assert!(e.contains("hosts[1].cloud"), "{e}");
        let e = Topology::load(&dir.join("missing.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.toml"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn shipped_default_file_is_the_built_in_one() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("topologies/default.toml");
        assert_eq!(Topology::load(&path).unwrap(), Topology::default_lab());
    }
}
