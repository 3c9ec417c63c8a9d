//! The agent's configuration file (TOML).
//!
//! ```toml
//! host = "a1"
//! vtep = "198.18.1.10"          # this host's underlay address (outer source of VXLAN)
//! overlay_ip = "10.244.255.1"   # this host's own address inside the overlay
//! overlay_cidr = "10.244.0.0/16"
//! # overlay6_cidr = "2001:db8:f::/96" # dual-stack: each endpoint's IPv6 address is this /96
//! #                                   # followed by its IPv4 address (the same on every host)
//! vni = 4242
//! vxlan_port = 4789
//! vxlan_device = "ferry_vx"
//! metrics_listen = "127.0.0.1:9464"
//! bpffs_dir = "/sys/fs/bpf/ferry/fl1234ab-a1"
//!
//! role = "host"                # or "gateway" (translates public addresses, carries egress)
//! container_netns_prefix = "ferry-c-"
//! # public_interface = "pub"   # gateway only: the internet-facing interface
//! # masquerade = true          # gateway only: containers without a public address leave as
//! #                            # the gateway's own address (nftables masquerade)
//! # direct_routing = false     # no tunnel to hosts of this host's own underlay subnet
//! # announce_relay = "eth0"    # copy containers' own announcements (gratuitous ARP,
//! #                            # unsolicited NA) out of this interface, for L2 peers there
//! # public6 = false            # gateway only, with overlay6_cidr: route the overlay's IPv6
//! #                            # prefix from the internet (containers' IPv6 addresses are
//! #                            # public); false: IPv6 egress masqueraded, inbound dropped
//! # public6_next_hop = "2001:db8:ffff::1"  # with public6 and a standby: the next hop the
//! #                            # internet routes the prefix to, held by the facing host
//!
//! handoff_socket = "/run/ferry/handoff.sock"  # the socket hand-off API (local processes)
//! api_listen = "198.18.1.10:7401"            # the peer API (other agents); same port everywhere
//! handoff_max_bytes = 268435456              # hand-off packages kept waiting for a claim
//! cni_socket = "/run/ferry/cni.sock"         # ferry-cni's way in (optional; needs [gateway])
//! cni_network = "ferry"                      # the CNI network name served (default "ferry")
//! state_dir = "/run/ferry/agent"             # what a restarted agent adopts (process trees, ...)
//!
//! [runtime]                     # the agent's own containers (optional)
//! uid_base = 0                  # 0: uid 0 (no capabilities); else uid_base + offset in overlay_cidr
//! hide = ["/etc/ferry", "/var/lib/ferry", "/run/ferry", "/run/ferry-lab"]
//! runc = "/usr/sbin/runc"       # runtime = runc containers (OCI, own root file system)
//! images_dir = "/var/cache/ferry/rootfs"   # their root file systems, by image name
//!
//! [gateway]                     # the registry this agent follows (optional)
//! address = "198.18.0.10:7400"
//! token_file = "/etc/ferry/token"
//!
//! [tls]                         # required with [gateway] (or insecure_plaintext = true):
//! ca = "/etc/ferry/tls/a1/ca.pem"     # this host's certificate (ferry certs issue host:a1
//! cert = "/etc/ferry/tls/a1/cert.pem" # --ip 198.18.1.10); the peer API and every call to
//! key = "/etc/ferry/tls/a1/key.pem"   # the gateway and other agents use it
//!
//! [[peers]]
//! name = "a2"
//! vtep = "198.18.1.11"
//! overlay_ip = "10.244.255.2"
//! ```

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
};

use ferry_api::HostRole;
use ipnet::{Ipv4Net, Ipv6Net};
use serde::{Deserialize, Serialize};

mod criu;
mod hold;
pub mod metrics;
mod runtime;

pub use criu::CriuConfig;
pub use hold::{HoldLimits, HoldMode};
pub use runtime::{DEFAULT_IMAGES_DIR, PodmanConfig, RuntimeConfig};

/// Default UDP port of VXLAN (IANA).
pub const DEFAULT_VXLAN_PORT: u16 = 4789;
/// Default name of the host's external-mode VXLAN device.
pub const DEFAULT_VXLAN_DEVICE: &str = "ferry_vx";
/// Default VXLAN network identifier.
pub const DEFAULT_VNI: u32 = 4242;
/// Default address of the Prometheus endpoint (inside the host's network namespace).
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9464";
/// Default path of the socket hand-off API's Unix socket.
pub const DEFAULT_HANDOFF_SOCKET: &str = "/run/ferry/handoff.sock";
/// Default port of the agents' peer API (every agent must use the same one).
pub const DEFAULT_API_PORT: u16 = 7401;
/// Default bound of the hand-off packages an agent keeps waiting for a claim (256 MiB).
pub const DEFAULT_HANDOFF_MAX_BYTES: u64 = 256 * 1024 * 1024;
/// Default directory of the agent's own state (runtime records, held packets kept over a
/// restart, the lock that keeps a second agent off the host).
pub const DEFAULT_STATE_DIR: &str = "/run/ferry/agent";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Name of this host (used in logs and metrics).
    pub host: String,
    /// This host's underlay IPv4 address: the VTEP other hosts encapsulate to.
    pub vtep: Ipv4Addr,
    /// This host's own address inside the overlay (assigned to the VXLAN device).
    pub overlay_ip: Ipv4Addr,
    /// The overlay CIDR every container and host overlay address lives in.
    pub overlay_cidr: Ipv4Net,
    /// Dual-stack overlay: a /96 IPv6 prefix; an endpoint's IPv6 address is the prefix followed
    /// by its IPv4 address. `None`: IPv4 only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay6_cidr: Option<Ipv6Net>,
    #[serde(default = "default_vni")]
    pub vni: u32,
    #[serde(default = "default_vxlan_port")]
    pub vxlan_port: u16,
    #[serde(default = "default_vxlan_device")]
    pub vxlan_device: String,
    #[serde(default = "default_metrics_listen")]
    pub metrics_listen: SocketAddr,
    /// Where this agent pins its eBPF maps (one directory per host: several lab hosts share
    /// one bpffs). `None`: nothing is pinned.
    #[serde(default)]
    pub bpffs_dir: Option<PathBuf>,
    /// Other hosts known at start (the gateway pushes changes later).
    #[serde(default)]
    pub peers: Vec<Peer>,
    /// `host` runs containers; `gateway` also translates public addresses and carries the
    /// containers' traffic to and from the internet side.
    #[serde(default)]
    pub role: HostRole,
    /// Containers' network namespaces are named `<prefix><a>-<b>-<c>-<d>` after their address.
    #[serde(default = "default_container_netns_prefix")]
    pub container_netns_prefix: String,
    /// Gateway role: the internet-facing interface (from-public is attached to it).
    #[serde(default)]
    pub public_interface: Option<String>,
    /// Gateway role: masquerade containers that have no public address.
    #[serde(default = "default_true")]
    pub masquerade: bool,
    /// Gateway role, with `overlay6_cidr`: the overlay's IPv6 prefix is routed from the
    /// internet side (containers' IPv6 addresses are public, never translated). Off: IPv6 from
    /// the internet to the overlay is dropped (`no_public6`) and containers' IPv6 egress is
    /// masqueraded (with `masquerade`).
    #[serde(default)]
    pub public6: bool,
    /// Gateway role, with `public6` and more than one gateway-role host: the address the
    /// internet routes the overlay's IPv6 prefix to. The host facing the internet holds it on
    /// its public interface (and announces it with an unsolicited neighbour advertisement
    /// when it takes over); a standby does not. Without it, the next hop is whatever address
    /// the operator configured on the gateway, and a standby cannot take the IPv6 side over.
    #[serde(default)]
    pub public6_next_hop: Option<std::net::Ipv6Addr>,
    /// No-tunnel mode: packets for endpoints on hosts of this host's own underlay subnet go
    /// there untunnelled (the underlay must carry overlay addresses between those hosts: one
    /// L2 segment); the VXLAN tunnel stays for every other host.
    #[serde(default)]
    pub direct_routing: bool,
    /// The gateway (registry) this agent registers with and follows.
    #[serde(default)]
    pub gateway: Option<GatewayLink>,
    /// Name of the hold device (a TAP this agent creates; held packets wait behind it).
    #[serde(default = "default_hold_device")]
    pub hold_device: String,
    /// Per-endpoint limits of the hold queues.
    #[serde(default)]
    pub hold: HoldLimits,
    /// When a held container is released here: gratuitous ARP (request and reply) and, with
    /// IPv6, unsolicited neighbour advertisements from its own interface, on this schedule
    /// (default: at once, then 50, 200, 450 ms).
    #[serde(default)]
    pub announce: ferry_announce::Schedule,
    /// A host interface on an L2 segment whose stations (switches, routers, other machines)
    /// may cache a container's addresses: a container's own announcements (the ones above,
    /// and any it sends itself) are copied out of it, so those stations relearn where the
    /// container is. The datapath relays only an address and MAC of the container's own,
    /// from its own veth, while it runs here. None (default): announcements stay on the host
    /// (`announce_no_relay`); ferry's L3 overlay does not need them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub announce_relay: Option<String>,
    /// The socket hand-off API (`ferry_agent::handoff`): the Unix socket (mode 0600) through
    /// which a process exports its established TCP sockets and state, and the new process on the
    /// destination claims them. Processes in containers reach it through the shared mount
    /// namespace. Default `/run/ferry/handoff.sock`.
    #[serde(default = "default_handoff_socket")]
    pub handoff_socket: PathBuf,
    /// The agents' peer API (HTTP, the `[gateway]` token): where other agents send hand-off
    /// packages for containers built here. A source agent reaches a destination at the
    /// destination's VTEP and *this* port, so every agent must use the same port. Served only
    /// with a `[gateway]` section. Default `0.0.0.0:7401`.
    #[serde(default = "default_api_listen")]
    pub api_listen: SocketAddr,
    /// Bytes of hand-off packages (encoded) kept in memory waiting for a claim, all containers
    /// together; a package beyond it is refused. Default 256 MiB.
    #[serde(default = "default_handoff_max_bytes")]
    pub handoff_max_bytes: u64,
    /// Whole-container migration: the `criu` binary, the image directory, the action script.
    #[serde(default)]
    pub criu: CriuConfig,
    /// The agent's own state, kept across restarts: the runtime's process trees
    /// (`runtime.json`), packets held at a SIGTERM (`hold-queue.bin`) and a lock file (one
    /// agent per directory). Default `/run/ferry/agent`.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// This host's TLS identity: the peer API is served over TLS with it (client certificates
    /// required) and every call to the gateway and to other agents presents it. Required with
    /// `[gateway]` unless `insecure_plaintext`.
    #[serde(default)]
    pub tls: Option<ferry_tls::TlsFiles>,
    /// Speak plain HTTP to the gateway and other agents (no `[tls]`): the token, checkpoint
    /// requests and images then cross the underlay in clear. For benchmarks only.
    #[serde(default)]
    pub insecure_plaintext: bool,
    /// The container runtime's isolation: the containers' uids, what they cannot see.
    #[serde(default)]
    pub runtime: RuntimeConfig,
    /// The CNI plugin's Unix socket (mode 0600, root only): a runtime's `ferry-cni` (its
    /// network configuration's `"agent"`) asks this agent over it to wire containers. Needs
    /// `[gateway]` (addresses come from the gateway's IPAM). None: no CNI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cni_socket: Option<PathBuf>,
    /// The CNI network this agent serves: a network configuration with another `name` is
    /// refused (CNI error 7). Default `ferry`.
    #[serde(default = "default_cni_network")]
    pub cni_network: String,
    /// Role gateway, with other gateway-role hosts: how this agent watches the host facing the
    /// internet and when it takes over (`ferry_agent::public_ha`).
    #[serde(default)]
    pub public_failover: PublicFailover,
}

/// `[public_failover]`: heartbeats between gateway-role hosts (UDP on the underlay, to each
/// one's VTEP at `api_listen`'s port number).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublicFailover {
    /// Interval between heartbeats. Default 100 ms.
    #[serde(default = "default_heartbeat_ms")]
    pub heartbeat_ms: u64,
    /// Silence after which a standby asks the registry to take the internet side over (at
    /// least two heartbeats). Default 500 ms.
    #[serde(default = "default_dead_after_ms")]
    pub dead_after_ms: u64,
}

fn default_heartbeat_ms() -> u64 {
    100
}
fn default_dead_after_ms() -> u64 {
    500
}

impl Default for PublicFailover {
    fn default() -> Self {
        Self {
            heartbeat_ms: default_heartbeat_ms(),
            dead_after_ms: default_dead_after_ms(),
        }
    }
}

/// Default name of the CNI network an agent serves.
pub const DEFAULT_CNI_NETWORK: &str = "ferry";

fn default_cni_network() -> String {
    DEFAULT_CNI_NETWORK.to_owned()
}

/// How the agent reaches the gateway's API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayLink {
    pub address: SocketAddr,
    /// File holding the shared bearer token.
    pub token_file: PathBuf,
    /// Other gateways serving the same registry (gateways on one etcd): the agent's watch,
    /// registration and heartbeats move to the next when the one it uses cannot be reached,
    /// and keep their place (a delta from the version applied, not the whole registry).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fallbacks: Vec<SocketAddr>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    pub name: String,
    pub vtep: Ipv4Addr,
    pub overlay_ip: Ipv4Addr,
}

/// The uid (and gid) of container `ip`'s processes: 0 if `uid_base` is 0, else `uid_base` +
/// the address's offset in `overlay` (see [`RuntimeConfig::uid_base`]).
/// The IPv6 address of endpoint `ip` under the overlay's /96 prefix: the prefix followed by the
/// IPv4 address (what the datapath keys both families by; see `ferry_common::ipv6_of`).
pub fn overlay_ipv6(prefix: Ipv6Net, ip: Ipv4Addr) -> Ipv6Addr {
    let mut o = prefix.network().octets();
    o[12..].copy_from_slice(&ip.octets());
    Ipv6Addr::from(o)
}

pub fn container_uid(uid_base: u32, overlay: Ipv4Net, ip: Ipv4Addr) -> u32 {
    if uid_base == 0 {
        return 0;
    }
    let offset =
        u32::from(ip).wrapping_sub(u32::from(overlay.network())) & !u32::from(overlay.netmask());
    uid_base.saturating_add(offset)
}

/// Default prefix of container network namespace names.
pub const DEFAULT_CONTAINER_NETNS_PREFIX: &str = "ferry-c-";

fn default_container_netns_prefix() -> String {
    DEFAULT_CONTAINER_NETNS_PREFIX.to_owned()
}
/// Default name of the hold device.
pub const DEFAULT_HOLD_DEVICE: &str = "ferry_hold";

fn default_hold_device() -> String {
    DEFAULT_HOLD_DEVICE.to_owned()
}
fn default_true() -> bool {
    true
}
fn default_vni() -> u32 {
    DEFAULT_VNI
}
fn default_vxlan_port() -> u16 {
    DEFAULT_VXLAN_PORT
}
fn default_vxlan_device() -> String {
    DEFAULT_VXLAN_DEVICE.to_owned()
}
fn default_handoff_socket() -> PathBuf {
    PathBuf::from(DEFAULT_HANDOFF_SOCKET)
}
fn default_api_listen() -> SocketAddr {
    SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), DEFAULT_API_PORT)
}
fn default_handoff_max_bytes() -> u64 {
    DEFAULT_HANDOFF_MAX_BYTES
}
fn default_state_dir() -> PathBuf {
    PathBuf::from(DEFAULT_STATE_DIR)
}
fn default_metrics_listen() -> SocketAddr {
    DEFAULT_METRICS_LISTEN.parse().expect("valid default")
}

/// Name of a container's network namespace.
pub fn container_netns_name(prefix: &str, ip: Ipv4Addr) -> String {
    let o = ip.octets();
    format!("{prefix}{}-{}-{}-{}", o[0], o[1], o[2], o[3])
}

/// The container address a namespace name stands for, if `name` is one of `prefix`'s
/// ([`container_netns_name`] backwards).
pub fn parse_container_netns_name(prefix: &str, name: &str) -> Option<Ipv4Addr> {
    let rest = name.strip_prefix(prefix)?;
    let mut octets = [0u8; 4];
    let mut parts = rest.split('-');
    for o in &mut octets {
        let p = parts.next()?;
        // Canonical decimal only, so the name round-trips.
        if p.is_empty() || (p.len() > 1 && p.starts_with('0')) {
            return None;
        }
        *o = p.parse().ok()?;
    }
    parts.next().is_none().then(|| Ipv4Addr::from(octets))
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("{path}: field `{field}`: {problem}")]
    Invalid {
        path: PathBuf,
        field: String,
        problem: String,
    },
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
        config
            .validate()
            .map_err(|(field, problem)| ConfigError::Invalid {
                path: path.to_owned(),
                field,
                problem,
            })?;
        Ok(config)
    }

    /// Endpoint `ip`'s IPv6 address on a dual-stack overlay.
    pub fn ipv6_of(&self, ip: Ipv4Addr) -> Option<Ipv6Addr> {
        self.overlay6_cidr.map(|p| overlay_ipv6(p, ip))
    }

    /// The uid (and gid) of container `ip`'s processes: 0, or `[runtime] uid_base` + the
    /// address's offset in `overlay_cidr` (the same on every host).
    pub fn container_uid(&self, ip: Ipv4Addr) -> u32 {
        container_uid(self.runtime.uid_base, self.overlay_cidr, ip)
    }

    /// What no container may see: `[runtime] hide` and every secret this configuration names
    /// (the state directory, CRIU's images, the token file, the hand-off socket's directory).
    pub fn container_hidden_paths(&self) -> Vec<PathBuf> {
        let mut v = self.runtime.hide.clone();
        v.push(self.state_dir.clone());
        v.push(self.criu.work_dir.clone());
        if let Some(g) = &self.gateway {
            v.push(g.token_file.clone());
        }
        if let Some(dir) = self.handoff_socket.parent() {
            v.push(dir.to_owned());
        }
        if let Some(dir) = self.cni_socket.as_deref().and_then(Path::parent) {
            v.push(dir.to_owned());
        }
        v
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("AgentConfig always serialises")
    }

    /// Checks what serde cannot: returns the offending field and the problem.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let err = |f: &str, p: String| Err((f.to_owned(), p));
        if self.host.is_empty() {
            return err("host", "must not be empty".into());
        }
        if self.vni == 0 || self.vni > 0x00ff_ffff {
            return err(
                "vni",
                format!("{} is not a 24-bit VNI (1..=16777215)", self.vni),
            );
        }
        if self.vxlan_port == 0 {
            return err("vxlan_port", "must not be 0".into());
        }
        if self.vxlan_device.is_empty() || self.vxlan_device.len() > 15 {
            return err(
                "vxlan_device",
                format!(
                    "{:?} is not a valid interface name (1..=15 bytes)",
                    self.vxlan_device
                ),
            );
        }
        if let Some(p) = self.overlay6_cidr {
            if p.prefix_len() != 96 {
                return err(
                    "overlay6_cidr",
                    format!(
                        "{p} is not a /96: an endpoint's IPv6 address is the prefix followed by its IPv4 address"
                    ),
                );
            }
            if p.network() != p.addr() {
                return err(
                    "overlay6_cidr",
                    format!("{p} has host bits set: did you mean {}?", p.trunc()),
                );
            }
        }
        if self.public6 && self.overlay6_cidr.is_none() {
            return err("public6", "needs overlay6_cidr".into());
        }
        if let Some(a) = self.public6_next_hop {
            if !self.public6 || self.public_interface.is_none() {
                return err(
                    "public6_next_hop",
                    "needs public6 and public_interface (a gateway-role host)".into(),
                );
            }
            if a.is_unspecified() || a.is_loopback() || a.is_multicast() {
                return err("public6_next_hop", format!("{a} is not a unicast address"));
            }
        }
        if !self.overlay_cidr.contains(&self.overlay_ip) {
            return err(
                "overlay_ip",
                format!(
                    "{} is outside overlay_cidr {}",
                    self.overlay_ip, self.overlay_cidr
                ),
            );
        }
        if self.overlay_cidr.contains(&self.vtep) {
            return err(
                "vtep",
                format!(
                    "{} is inside the overlay {}: the underlay must be separate",
                    self.vtep, self.overlay_cidr
                ),
            );
        }
        if self.container_netns_prefix.is_empty()
            || self.container_netns_prefix.contains('/')
            || self.container_netns_prefix.len() > 200
        {
            return err(
                "container_netns_prefix",
                format!(
                    "{:?} must be 1..=200 bytes without '/'",
                    self.container_netns_prefix
                ),
            );
        }
        let sock = self.handoff_socket.as_os_str().len();
        if !self.handoff_socket.is_absolute() || sock >= 108 {
            return err(
                "handoff_socket",
                format!(
                    "{} must be an absolute path shorter than 108 bytes (a Unix socket address)",
                    self.handoff_socket.display()
                ),
            );
        }
        if let Some(c) = &self.cni_socket {
            if !c.is_absolute() || c.as_os_str().len() >= 108 {
                return err(
                    "cni_socket",
                    format!(
                        "{} must be an absolute path shorter than 108 bytes (a Unix socket \
                         address)",
                        c.display()
                    ),
                );
            }
            if self.gateway.is_none() {
                return err(
                    "cni_socket",
                    "needs [gateway]: the CNI plugin's addresses come from the gateway's IPAM"
                        .into(),
                );
            }
        }
        if let Err(e) = ferry_cni::spec::validate_network_name(&self.cni_network) {
            return err("cni_network", e);
        }
        if self.api_listen.port() == 0 {
            return err(
                "api_listen",
                "needs a fixed port (the same on every agent)".into(),
            );
        }
        if !self.state_dir.is_absolute() {
            return err(
                "state_dir",
                format!("{} must be an absolute path", self.state_dir.display()),
            );
        }
        if self.handoff_max_bytes == 0 {
            return err("handoff_max_bytes", "must not be 0".into());
        }
        match (&self.tls, self.insecure_plaintext, &self.gateway) {
            (Some(_), true, _) => {
                return err(
                    "insecure_plaintext",
                    "and [tls] both given: choose one".into(),
                );
            }
            (None, false, Some(_)) => {
                return err(
                    "tls",
                    "required with [gateway]: the peer API and the watch would be plain text on \
                     the underlay; give [tls] ca, cert and key (ferry certs issue host:NAME) or set \
                     insecure_plaintext = true"
                        .into(),
                );
            }
            _ => {}
        }
        let span = 1u64 << (32 - self.overlay_cidr.prefix_len());
        if u64::from(self.runtime.uid_base) + span > u64::from(u32::MAX) {
            return err(
                "runtime.uid_base",
                format!(
                    "{} must leave room for the {span} addresses of overlay_cidr below 2^32 - 1",
                    self.runtime.uid_base
                ),
            );
        }
        if let Some(p) = self.runtime.hide.iter().find(|p| !p.is_absolute()) {
            return err(
                "runtime.hide",
                format!("{} must be an absolute path", p.display()),
            );
        }
        match (self.role, &self.public_interface) {
            (HostRole::Gateway, None) => {
                return err(
                    "public_interface",
                    "required when role = \"gateway\"".into(),
                );
            }
            (HostRole::Host, Some(_)) => {
                return err(
                    "public_interface",
                    "only a host with role = \"gateway\" has one".into(),
                );
            }
            (_, Some(i)) if i.is_empty() || i.len() > 15 => {
                return err(
                    "public_interface",
                    format!("{i:?} is not a valid interface name (1..=15 bytes)"),
                );
            }
            _ => {}
        }
        if let Some(i) = &self.announce_relay
            && (i.is_empty() || i.len() > 15 || i.contains(['/', ' ']) || i == "." || i == "..")
        {
            return err(
                "announce_relay",
                format!("{i:?} is not a valid interface name (1..=15 bytes, no '/' or space)"),
            );
        }
        for (i, p) in self.peers.iter().enumerate() {
            if !self.overlay_cidr.contains(&p.overlay_ip) {
                return err(
                    &format!("peers[{i}].overlay_ip"),
                    format!(
                        "{} is outside overlay_cidr {}",
                        p.overlay_ip, self.overlay_cidr
                    ),
                );
            }
            if p.overlay_ip == self.overlay_ip || p.vtep == self.vtep {
                return err(
                    &format!("peers[{i}]"),
                    format!("peer {} has this host's own address", p.name),
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
host = "a1"
vtep = "198.18.1.10"
overlay_ip = "10.244.255.1"
overlay_cidr = "10.244.0.0/16"

[[peers]]
name = "a2"
vtep = "198.18.1.11"
overlay_ip = "10.244.255.2"
"#;

    #[test]
    fn parses_with_defaults_and_round_trips() {
        let c = AgentConfig::parse(Path::new("t.toml"), GOOD).unwrap();
        assert_eq!(c.vni, DEFAULT_VNI);
        assert_eq!(c.vxlan_device, DEFAULT_VXLAN_DEVICE);
        assert_eq!(c.peers.len(), 1);
        assert_eq!(c.handoff_socket, Path::new(DEFAULT_HANDOFF_SOCKET));
        assert_eq!(c.api_listen.port(), DEFAULT_API_PORT);
        assert_eq!(c.handoff_max_bytes, DEFAULT_HANDOFF_MAX_BYTES);
        assert_eq!(c.state_dir, Path::new(DEFAULT_STATE_DIR));
        assert_eq!(
            (c.cni_socket.as_deref(), c.cni_network.as_str()),
            (None, "ferry")
        );
        let again = AgentConfig::parse(Path::new("t.toml"), &c.to_toml()).unwrap();
        assert_eq!(c, again);
    }

    #[test]
    fn announce_relay_names_an_interface() {
        let c = AgentConfig::parse(Path::new("t.toml"), GOOD).unwrap();
        assert_eq!(c.announce_relay, None, "off by default");
        let with = GOOD.replace("host = \"a1\"", "host = \"a1\"\nannounce_relay = \"eth0\"");
        let c = AgentConfig::parse(Path::new("t.toml"), &with).unwrap();
        assert_eq!(c.announce_relay.as_deref(), Some("eth0"));
        assert_eq!(
            AgentConfig::parse(Path::new("t.toml"), &c.to_toml()).unwrap(),
            c
        );
        for bad in ["", "a-name-longer-than-15", "a/b", ".."] {
            let text = GOOD.replace(
                "host = \"a1\"",
                &format!("host = \"a1\"\nannounce_relay = {bad:?}"),
            );
            let e = AgentConfig::parse(Path::new("t.toml"), &text)
                .unwrap_err()
                .to_string();
            assert!(e.contains("announce_relay"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn containers_get_one_uid_each_and_the_secrets_are_listed() {
        let c = AgentConfig::parse(Path::new("t.toml"), GOOD).unwrap();
        assert_eq!(c.runtime, RuntimeConfig::default());
        assert_eq!(c.container_uid(Ipv4Addr::new(10, 244, 1, 10)), 0);
        let mut c2 = c.clone();
        c2.runtime.uid_base = 1_000_000;
        assert_eq!(
            c2.container_uid(Ipv4Addr::new(10, 244, 1, 10)),
            1_000_000 + 266
        );
        assert_eq!(c2.container_uid(Ipv4Addr::new(10, 244, 0, 1)), 1_000_001);
        let hidden = c.container_hidden_paths();
        for p in [
            "/etc/ferry",
            "/run/ferry-lab",
            DEFAULT_STATE_DIR,
            "/run/ferry/criu",
        ] {
            assert!(hidden.iter().any(|h| h == Path::new(p)), "{p}: {hidden:?}");
        }
        let custom = format!("{GOOD}\n[runtime]\nuid_base = 5000\nhide = [\"/srv/keys\"]\n");
        let c = AgentConfig::parse(Path::new("t.toml"), &custom).unwrap();
        assert_eq!(c.container_uid(Ipv4Addr::new(10, 244, 0, 7)), 5007);
        assert_eq!(c.container_hidden_paths()[0], Path::new("/srv/keys"));
        for bad in ["uid_base = 4294967000", "hide = [\"relative\"]"] {
            let text = format!("{GOOD}\n[runtime]\n{bad}\n");
            let e = AgentConfig::parse(Path::new("t.toml"), &text)
                .unwrap_err()
                .to_string();
            assert!(e.contains("runtime."), "{bad}: {e}");
        }
    }

    #[test]
    fn container_netns_names_round_trip() {
        let ip = Ipv4Addr::new(10, 244, 1, 10);
        let name = container_netns_name("fl1234ab-a1-c-", ip);
        assert_eq!(name, "fl1234ab-a1-c-10-244-1-10");
        assert_eq!(
            parse_container_netns_name("fl1234ab-a1-c-", &name),
            Some(ip)
        );
        for bad in [
            "fl1234ab-a2-c-10-244-1-10",
            "fl1234ab-a1-c-10-244-1",
            "fl1234ab-a1-c-10-244-1-10-1",
            "fl1234ab-a1-c-10-244-01-10",
            "fl1234ab-a1-c-10-244-1-256",
            "fl1234ab-a1-c-10-244--10",
        ] {
            assert_eq!(
                parse_container_netns_name("fl1234ab-a1-c-", bad),
                None,
                "{bad}"
            );
        }
    }

    #[test]
    fn rejects_bad_fields_by_name() {
        let bad = GOOD.replace("10.244.255.1", "10.99.0.1");
        let e = AgentConfig::parse(Path::new("t.toml"), &bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("overlay_ip"), "{e}");
        let bad = format!("vni = 0\n{GOOD}");
        let e = AgentConfig::parse(Path::new("t.toml"), &bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("vni"), "{e}");
        let bad = format!("colour = 1\n{GOOD}");
        let e = AgentConfig::parse(Path::new("t.toml"), &bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("colour"), "{e}");
        let bad = GOOD.replace("vtep = \"198.18.1.11\"", "vtep = \"198.18.1.10\"");
        let e = AgentConfig::parse(Path::new("t.toml"), &bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("peers[0]"), "{e}");
        let bad = format!("handoff_socket = \"run/h.sock\"\n{GOOD}");
        let e = AgentConfig::parse(Path::new("t.toml"), &bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("handoff_socket"), "{e}");
        let bad = format!("cni_socket = \"/run/ferry/cni.sock\"\n{GOOD}");
        let e = AgentConfig::parse(Path::new("t.toml"), &bad)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("cni_socket") && e.contains("needs [gateway]"),
            "{e}"
        );
        let bad = format!("cni_network = \"a b\"\n{GOOD}");
        let e = AgentConfig::parse(Path::new("t.toml"), &bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("cni_network"), "{e}");
        let bad = format!("api_listen = \"0.0.0.0:0\"\n{GOOD}");
        let e = AgentConfig::parse(Path::new("t.toml"), &bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("api_listen"), "{e}");
        let bad = format!("role = \"gateway\"\n{GOOD}");
        let e = AgentConfig::parse(Path::new("t.toml"), &bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("public_interface"), "{e}");
        let good = format!("role = \"gateway\"\npublic_interface = \"pub\"\n{GOOD}");
        let c = AgentConfig::parse(Path::new("t.toml"), &good).unwrap();
        assert_eq!(c.role, HostRole::Gateway);
        assert!(c.masquerade);
    }
}
