//! `ferry gateway --config FILE`: the daemon's TOML configuration.
//!
//! ```toml
//! listen = "198.18.0.10:7400"            # API address (default 127.0.0.1:7400)
//! state_dir = "/var/lib/ferry/gateway"   # registry.json and registry.journal (default);
//!                                        # run reports
//! store = "file"                         # the registry in state_dir (default), or
//!                                        # "etcd:https://IP:2379,https://IP:2379,..." shared
//!                                        # by every gateway of the cluster (https needs
//!                                        # [etcd_tls]; http:// members: plain)
//! etcd_prefix = "/ferry/registry/"       # where in etcd (default)
//! max_connections_per_peer = 64          # open API connections one address may hold (every
//!                                        # agent holds one long poll; default 64, at most 65536)
//! max_connections = 4096                 # open API connections in all (default 4096)
//! token_file = "/etc/ferry/token"        # bearer token, mode 0600 (this is the default)
//! overlay_cidr = "10.244.0.0/16"         # container and host overlay addresses (required)
//! overlay6_cidr = "2001:db8:f::/96"       # dual-stack (optional): every agent's must match
//! vni = 4242                             # VXLAN network identifier, 1–16777215 (required)
//! public_cidrs = ["203.0.113.128/25"]    # where public addresses come from (default none)
//! watch_timeout_ms = 25000               # long-poll timeout of /v1/watch (default 25000)
//! step_timeout_ms = 5000                 # how long a migration step waits for the agents
//!                                        # (default 5000, at most 60000; per request
//!                                        # `?timeout_ms=`)
//! forward_grace_ms = 2000                # how long a released migration's source keeps
//!                                        # forwarding (default 2000)
//!
//! [ipam]                                 # the CNI plugin's addresses (optional)
//! pool = "10.244.0.0/17"                 # where they come from (default: overlay_cidr)
//! reserved = ["10.244.0.0/24"]           # never given out (default none; the pool's and
//!                                        # the overlay's network and broadcast addresses
//!                                        # and the hosts' overlay addresses never are)
//!
//! [tls]                                  # the API over TLS, client certificates required
//! ca = "/etc/ferry/tls/gateway/ca.pem"   # (ferry certs issue gateway --ip ...); without
//! cert = "/etc/ferry/tls/gateway/cert.pem" # it the gateway refuses to start unless
//! key = "/etc/ferry/tls/gateway/key.pem"   # insecure_plaintext = true
//!
//! [etcd_tls]                             # with store = "etcd:https://...": etcd's CA (best
//! ca = "/etc/ferry/etcd/ca.pem"          # one of its own, not ferry's) and this gateway's
//! cert = "/etc/ferry/etcd/cert.pem"      # client certificate there (naming the gateway's
//! key = "/etc/ferry/etcd/key.pem"        # identity)
//! ```

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::registry::{IpamPool, NetConfig};

pub const DEFAULT_WATCH_TIMEOUT_MS: u64 = 25_000;
const MAX_WATCH_TIMEOUT_MS: u64 = 3_600_000;
pub const DEFAULT_STEP_TIMEOUT_MS: u64 = 5_000;
/// Clients size their request deadline on it (`ferry_api::client::MAX_CONFIG_STEP_TIMEOUT_MS`).
pub const MAX_STEP_TIMEOUT_MS: u64 = ferry_api::client::MAX_CONFIG_STEP_TIMEOUT_MS;
pub const DEFAULT_FORWARD_GRACE_MS: u64 = 2_000;
const MAX_FORWARD_GRACE_MS: u64 = 3_600_000;
const MAX_VNI: u32 = (1 << 24) - 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    #[serde(default = "default_token_file")]
    pub token_file: PathBuf,
    /// Where the registry is kept: `file` (in `state_dir`) or `etcd:URLS`.
    #[serde(default = "default_store")]
    pub store: String,
    #[serde(default = "default_etcd_prefix")]
    pub etcd_prefix: String,
    #[serde(default = "default_per_peer")]
    pub max_connections_per_peer: usize,
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    pub overlay_cidr: Ipv4Net,
    /// Dual-stack overlay: a /96 (an endpoint's IPv6 address is it followed by its IPv4 one).
    #[serde(default)]
    pub overlay6_cidr: Option<ipnet::Ipv6Net>,
    pub vni: u32,
    #[serde(default)]
    pub public_cidrs: Vec<Ipv4Net>,
    #[serde(default = "default_watch_timeout_ms")]
    pub watch_timeout_ms: u64,
    #[serde(default = "default_step_timeout_ms")]
    pub step_timeout_ms: u64,
    #[serde(default = "default_forward_grace_ms")]
    pub forward_grace_ms: u64,
    /// The port of every agent's peer API (`api_listen`), where `ferry migrate run` asks the
    /// source agent for a checkpoint. Default 7401.
    #[serde(default = "default_agent_api_port")]
    pub agent_api_port: u16,
    /// The API over TLS with this certificate (it must name the gateway's identity and the
    /// `listen` address); agents and the CLI must present certificates from the same CA.
    #[serde(default)]
    pub tls: Option<ferry_tls::TlsFiles>,
    /// With `store = "etcd:https://..."`: this gateway's client identity towards etcd (its
    /// certificate must name the gateway's identity) and etcd's CA. Best a CA of etcd's own,
    /// so that no agent's certificate can reach the registry's store.
    #[serde(default)]
    pub etcd_tls: Option<ferry_tls::TlsFiles>,
    /// Serve plain HTTP without `[tls]`: the token, checkpoint requests and every registry
    /// change then cross the underlay in clear. For benchmarks and old set-ups only.
    #[serde(default)]
    pub insecure_plaintext: bool,
    /// The cluster-wide IPAM of the CNI plugin.
    #[serde(default)]
    pub ipam: IpamConfig,
}

/// `[ipam]`: where the CNI plugin's addresses come from.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IpamConfig {
    /// Inside `overlay_cidr`; default: all of it.
    #[serde(default)]
    pub pool: Option<Ipv4Net>,
    /// Ranges of the pool never given out.
    #[serde(default)]
    pub reserved: Vec<Ipv4Net>,
}

fn default_agent_api_port() -> u16 {
    crate::migration::runs::DEFAULT_AGENT_API_PORT
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7400))
}
fn default_state_dir() -> PathBuf {
    "/var/lib/ferry/gateway".into()
}
fn default_per_peer() -> usize {
    ferry_api::serve::Limits::default().per_peer
}
fn default_max_connections() -> usize {
    ferry_api::serve::Limits::default().total
}
fn default_store() -> String {
    "file".into()
}
fn default_etcd_prefix() -> String {
    crate::etcd_store::PREFIX.into()
}

/// Where the registry is kept ([`Config::store`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreSpec {
    /// In this directory (`file` alone: `state_dir`).
    File(Option<PathBuf>),
    Etcd(crate::etcd::Members),
}

impl std::str::FromStr for StoreSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "file" {
            return Ok(StoreSpec::File(None));
        }
        if let Some(path) = s.strip_prefix("file:") {
            if path.is_empty() {
                return Err("file: wants a directory (file:PATH)".into());
            }
            return Ok(StoreSpec::File(Some(path.into())));
        }
        if let Some(urls) = s.strip_prefix("etcd:") {
            return urls.parse().map(StoreSpec::Etcd);
        }
        Err(format!(
            "store {s:?}: want \"file\", \"file:PATH\" or \"etcd:https://IP:PORT[,...]\""
        ))
    }
}

impl Config {
    /// The parsed [`Config::store`] (validated at load).
    pub fn store_spec(&self) -> StoreSpec {
        self.store
            .parse()
            .expect("validated when the config was loaded")
    }
}

fn default_token_file() -> PathBuf {
    "/etc/ferry/token".into()
}
fn default_watch_timeout_ms() -> u64 {
    DEFAULT_WATCH_TIMEOUT_MS
}
fn default_step_timeout_ms() -> u64 {
    DEFAULT_STEP_TIMEOUT_MS
}
fn default_forward_grace_ms() -> u64 {
    DEFAULT_FORWARD_GRACE_MS
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {}: {source}", path.display())]
    Invalid {
        path: PathBuf,
        #[source]
        source: InvalidConfig,
    },
}

/// Why a config's text is refused.
#[derive(Debug, thiserror::Error)]
pub enum InvalidConfig {
    #[error("{}", .0.to_string().trim())]
    Toml(#[from] toml::de::Error),
    #[error("overlay_cidr {cidr} has host bits set: did you mean {}?", cidr.trunc())]
    OverlayHostBits { cidr: Ipv4Net },
    #[error("overlay_cidr {cidr} is too small: want a prefix of /30 or shorter")]
    OverlayTooSmall { cidr: Ipv4Net },
    #[error(
        "overlay6_cidr {cidr} is not an aligned /96: an endpoint's IPv6 address is the prefix \
         followed by its IPv4 address"
    )]
    Overlay6 { cidr: ipnet::Ipv6Net },
    #[error("vni {vni} is out of range: want 1–{max}", max = MAX_VNI)]
    Vni { vni: u32 },
    #[error("public_cidrs[{index}] {cidr} has host bits set: did you mean {}?", cidr.trunc())]
    PublicHostBits { index: usize, cidr: Ipv4Net },
    #[error("public_cidrs[{index}] {cidr} overlaps overlay_cidr {overlay}")]
    PublicOverlapsOverlay {
        index: usize,
        cidr: Ipv4Net,
        overlay: Ipv4Net,
    },
    #[error("public_cidrs[{index}] {cidr} overlaps public_cidrs[{other_index}] {other}")]
    PublicOverlap {
        index: usize,
        cidr: Ipv4Net,
        other_index: usize,
        other: Ipv4Net,
    },
    #[error(
        "no [tls] section: the API would be plain text on the underlay; give [tls] ca, cert \
         and key (ferry certs issue gateway) or set insecure_plaintext = true"
    )]
    NoTls,
    #[error("both [tls] and insecure_plaintext = true: choose one")]
    TlsAndPlaintext,
    #[error("ipam.pool {pool} has host bits set: did you mean {}?", pool.trunc())]
    PoolHostBits { pool: Ipv4Net },
    #[error("ipam.pool {pool} is not inside overlay_cidr {overlay}")]
    PoolOutsideOverlay { pool: Ipv4Net, overlay: Ipv4Net },
    #[error("ipam.pool {pool} is too small: want a prefix of /30 or shorter")]
    PoolTooSmall { pool: Ipv4Net },
    #[error("ipam.reserved[{index}] {cidr} has host bits set: did you mean {}?", cidr.trunc())]
    ReservedHostBits { index: usize, cidr: Ipv4Net },
    #[error("ipam.reserved[{index}] {cidr} is not inside ipam.pool {pool}")]
    ReservedOutsidePool {
        index: usize,
        cidr: Ipv4Net,
        pool: Ipv4Net,
    },
    #[error("store: {0}")]
    Store(String),
    #[error("etcd_prefix {0:?}: want an absolute key prefix ending in '/' (e.g. /ferry/registry/)")]
    EtcdPrefix(String),
    #[error("{field} {value} is out of range: want {min}–{max}")]
    OutOfRange {
        field: &'static str,
        value: u64,
        min: u64,
        max: u64,
    },
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text).map_err(|source| ConfigError::Invalid {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Parses and validates.
    pub fn parse(text: &str) -> Result<Self, InvalidConfig> {
        let c: Config = toml::from_str(text)?;
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<(), InvalidConfig> {
        let spec = self
            .store
            .parse::<StoreSpec>()
            .map_err(InvalidConfig::Store)?;
        match (&spec, &self.etcd_tls) {
            (StoreSpec::Etcd(m), None) if m.1 == crate::etcd::Scheme::Https => {
                return Err(InvalidConfig::Store(
                    "etcd over https needs [etcd_tls] (ca, cert, key)".into(),
                ));
            }
            (StoreSpec::Etcd(m), Some(_)) if m.1 == crate::etcd::Scheme::Http => {
                return Err(InvalidConfig::Store(
                    "[etcd_tls] is given but the etcd members are http://: use https://".into(),
                ));
            }
            (StoreSpec::File(_), Some(_)) => {
                return Err(InvalidConfig::Store(
                    "[etcd_tls] is given but the store is not etcd".into(),
                ));
            }
            _ => {}
        }
        if !self.etcd_prefix.starts_with('/') || !self.etcd_prefix.ends_with('/') {
            return Err(InvalidConfig::EtcdPrefix(self.etcd_prefix.clone()));
        }
        for (field, value) in [
            ("max_connections_per_peer", self.max_connections_per_peer),
            ("max_connections", self.max_connections),
        ] {
            if !(1..=65_536).contains(&value) {
                return Err(InvalidConfig::OutOfRange {
                    field,
                    value: value as u64,
                    min: 1,
                    max: 65_536,
                });
            }
        }
        let o = self.overlay_cidr;
        if o.trunc() != o {
            return Err(InvalidConfig::OverlayHostBits { cidr: o });
        }
        if o.prefix_len() > 30 {
            return Err(InvalidConfig::OverlayTooSmall { cidr: o });
        }
        if let Some(p) = self.overlay6_cidr
            && (p.prefix_len() != 96 || p.trunc() != p)
        {
            return Err(InvalidConfig::Overlay6 { cidr: p });
        }
        if self.vni == 0 || self.vni > MAX_VNI {
            return Err(InvalidConfig::Vni { vni: self.vni });
        }
        for (index, p) in self.public_cidrs.iter().enumerate() {
            if p.trunc() != *p {
                return Err(InvalidConfig::PublicHostBits { index, cidr: *p });
            }
            if p.contains(&o) || o.contains(p) {
                return Err(InvalidConfig::PublicOverlapsOverlay {
                    index,
                    cidr: *p,
                    overlay: o,
                });
            }
            if let Some((other_index, q)) = self
                .public_cidrs
                .iter()
                .enumerate()
                .take(index)
                .find(|(_, q)| q.contains(p) || p.contains(*q))
            {
                return Err(InvalidConfig::PublicOverlap {
                    index,
                    cidr: *p,
                    other_index,
                    other: *q,
                });
            }
        }
        let range = |field, value, min, max| {
            if value < min || value > max {
                Err(InvalidConfig::OutOfRange {
                    field,
                    value,
                    min,
                    max,
                })
            } else {
                Ok(())
            }
        };
        range(
            "watch_timeout_ms",
            self.watch_timeout_ms,
            1,
            MAX_WATCH_TIMEOUT_MS,
        )?;
        range(
            "step_timeout_ms",
            self.step_timeout_ms,
            1,
            MAX_STEP_TIMEOUT_MS,
        )?;
        range(
            "forward_grace_ms",
            self.forward_grace_ms,
            0,
            MAX_FORWARD_GRACE_MS,
        )?;
        let pool = self.ipam.pool.unwrap_or(o);
        if pool.trunc() != pool {
            return Err(InvalidConfig::PoolHostBits { pool });
        }
        if !o.contains(&pool) {
            return Err(InvalidConfig::PoolOutsideOverlay { pool, overlay: o });
        }
        if pool.prefix_len() > 30 {
            return Err(InvalidConfig::PoolTooSmall { pool });
        }
        for (index, r) in self.ipam.reserved.iter().enumerate() {
            if r.trunc() != *r {
                return Err(InvalidConfig::ReservedHostBits { index, cidr: *r });
            }
            if !pool.contains(r) {
                return Err(InvalidConfig::ReservedOutsidePool {
                    index,
                    cidr: *r,
                    pool,
                });
            }
        }
        match (&self.tls, self.insecure_plaintext) {
            (None, false) => Err(InvalidConfig::NoTls),
            (Some(_), true) => Err(InvalidConfig::TlsAndPlaintext),
            _ => Ok(()),
        }
    }

    pub fn net(&self) -> NetConfig {
        NetConfig {
            overlay_cidr: self.overlay_cidr,
            overlay6_cidr: self.overlay6_cidr,
            vni: self.vni,
            public_cidrs: self.public_cidrs.clone(),
            forward_grace_ms: self.forward_grace_ms,
            ipam: IpamPool {
                pool: self.ipam.pool.unwrap_or(self.overlay_cidr),
                reserved: self.ipam.reserved.clone(),
            },
        }
    }

    pub fn watch_timeout(&self) -> Duration {
        Duration::from_millis(self.watch_timeout_ms)
    }

    pub fn step_timeout(&self) -> Duration {
        Duration::from_millis(self.step_timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
listen = "198.18.0.10:7400"
state_dir = "/var/lib/ferry/gateway"
token_file = "/etc/ferry/token"
overlay_cidr = "10.244.0.0/16"
vni = 4242
public_cidrs = ["203.0.113.128/25"]
watch_timeout_ms = 25000
step_timeout_ms = 7000
forward_grace_ms = 1500

[tls]
ca = "/etc/ferry/tls/ca.pem"
cert = "/etc/ferry/tls/cert.pem"
key = "/etc/ferry/tls/key.pem"

[ipam]
pool = "10.244.0.0/17"
reserved = ["10.244.0.0/24"]
"#;

    /// etcd over https needs `[etcd_tls]`, which makes sense only with https members; http
    /// and https members do not mix.
    #[test]
    fn etcd_tls_goes_with_https_members_and_only_with_them() {
        let base = "overlay_cidr = \"10.244.0.0/16\"\nvni = 4242\ninsecure_plaintext = true\n";
        let tls =
            "\n[etcd_tls]\nca = \"/e/ca.pem\"\ncert = \"/e/cert.pem\"\nkey = \"/e/key.pem\"\n";
        let with = |store: &str, etcd_tls: bool| {
            Config::parse(&format!(
                "store = \"{store}\"\n{base}{}",
                if etcd_tls { tls } else { "" }
            ))
        };
        let https = "etcd:https://198.18.0.10:2379,https://198.18.1.10:2379";
        let http = "etcd:http://198.18.0.10:2379";
        let c = with(https, true).unwrap();
        let StoreSpec::Etcd(m) = c.store_spec() else {
            panic!("etcd")
        };
        assert_eq!(m.1, crate::etcd::Scheme::Https);
        assert_eq!(
            m.to_string(),
            "https://198.18.0.10:2379,https://198.18.1.10:2379"
        );
        assert!(with(http, false).is_ok());
        for (store, etcd_tls, want) in [
            (https, false, "needs [etcd_tls]"),
            (http, true, "use https"),
            ("file", true, "not etcd"),
            (
                "etcd:https://198.18.0.10:2379,http://198.18.1.10:2379",
                true,
                "every member over https",
            ),
            ("etcd:ftp://198.18.0.10:2379", true, "want https://"),
        ] {
            let e = with(store, etcd_tls).expect_err(store).to_string();
            assert!(e.contains(want), "{store} {etcd_tls}: {e}");
        }
    }

    #[test]
    fn full_example_parses() {
        let c = Config::parse(FULL).unwrap();
        assert_eq!(c.listen, "198.18.0.10:7400".parse().unwrap());
        assert_eq!(c.overlay_cidr, "10.244.0.0/16".parse().unwrap());
        assert_eq!(c.vni, 4242);
        assert_eq!(c.public_cidrs, vec!["203.0.113.128/25".parse().unwrap()]);
        assert_eq!(c.watch_timeout(), Duration::from_secs(25));
        assert_eq!(c.step_timeout(), Duration::from_secs(7));
        assert_eq!(c.net().forward_grace_ms, 1500);
        assert_eq!(c.net().ipam.pool, "10.244.0.0/17".parse().unwrap());
        assert_eq!(
            c.net().ipam.reserved,
            vec!["10.244.0.0/24".parse().unwrap()]
        );
        assert_eq!(c.tls.unwrap().key, PathBuf::from("/etc/ferry/tls/key.pem"));
    }

    #[test]
    fn plain_text_is_refused_unless_asked_for() {
        let base = "overlay_cidr = \"10.244.0.0/16\"\nvni = 1\n";
        let e = Config::parse(base).unwrap_err().to_string();
        assert!(
            e.contains("no [tls] section") && e.contains("insecure_plaintext"),
            "{e}"
        );
        let both = FULL.replace("[tls]", "insecure_plaintext = true\n\n[tls]");
        let e = Config::parse(&both).unwrap_err().to_string();
        assert!(e.contains("choose one"), "{e}");
        assert!(Config::parse(&format!("{base}insecure_plaintext = true\n")).is_ok());
    }

    #[test]
    fn defaults() {
        let c =
            Config::parse("overlay_cidr = \"10.244.0.0/16\"\nvni = 1\ninsecure_plaintext = true\n")
                .unwrap();
        assert_eq!(c.listen, default_listen());
        assert_eq!(c.state_dir, PathBuf::from("/var/lib/ferry/gateway"));
        assert_eq!(c.token_file, PathBuf::from("/etc/ferry/token"));
        assert!(c.public_cidrs.is_empty());
        assert_eq!(c.overlay6_cidr, None, "IPv4 only unless told");
        assert_eq!(c.watch_timeout_ms, DEFAULT_WATCH_TIMEOUT_MS);
        assert_eq!(c.step_timeout_ms, 5000);
        assert_eq!(c.forward_grace_ms, 2000);
        // The pool is the whole overlay, nothing reserved.
        assert_eq!(c.net().ipam.pool, c.overlay_cidr);
        assert!(c.net().ipam.reserved.is_empty());
    }

    #[test]
    fn rejects_with_the_field_named() {
        let base = "overlay_cidr = \"10.244.0.0/16\"\nvni = 4242\n";
        for (extra_or_replacement, want) in [
            (format!("{base}bogus = 1\n"), "unknown field `bogus`"),
            ("vni = 4242\n".to_string(), "missing field `overlay_cidr`"),
            (
                "overlay_cidr = \"10.244.0.0/33\"\nvni = 1\n".into(),
                "overlay_cidr",
            ),
            (
                "overlay_cidr = \"10.244.1.0/16\"\nvni = 1\n".into(),
                "host bits set: did you mean 10.244.0.0/16",
            ),
            (
                "overlay_cidr = \"10.244.0.0/31\"\nvni = 1\n".into(),
                "too small",
            ),
            (
                format!("{base}overlay6_cidr = \"2001:db8:f::/64\"\n"),
                "overlay6_cidr 2001:db8:f::/64 is not an aligned /96",
            ),
            (
                format!("{base}overlay6_cidr = \"2001:db8:f::1/96\"\n"),
                "not an aligned /96",
            ),
            (
                "overlay_cidr = \"10.244.0.0/16\"\nvni = 0\n".into(),
                "vni 0 is out of range",
            ),
            (
                "overlay_cidr = \"10.244.0.0/16\"\nvni = 16777216\n".into(),
                "vni 16777216 is out of range",
            ),
            (
                format!("{base}public_cidrs = [\"10.244.3.0/24\"]\n"),
                "overlaps overlay_cidr",
            ),
            (
                format!("{base}public_cidrs = [\"203.0.113.0/24\", \"203.0.113.128/25\"]\n"),
                "public_cidrs[1] 203.0.113.128/25 overlaps public_cidrs[0]",
            ),
            (
                format!("{base}public_cidrs = [\"203.0.113.129/25\"]\n"),
                "public_cidrs[0] 203.0.113.129/25 has host bits set",
            ),
            (
                format!("{base}watch_timeout_ms = 0\n"),
                "watch_timeout_ms 0",
            ),
            (format!("{base}listen = \"nope\"\n"), "listen"),
            (format!("{base}step_timeout_ms = 0\n"), "step_timeout_ms 0"),
            (
                format!("{base}step_timeout_ms = 60001\n"),
                "step_timeout_ms 60001 is out of range",
            ),
            (
                format!("{base}forward_grace_ms = 3600001\n"),
                "forward_grace_ms 3600001",
            ),
            (
                format!("{base}[ipam]\npool = \"10.244.1.0/16\"\n"),
                "ipam.pool 10.244.1.0/16 has host bits set",
            ),
            (
                format!("{base}[ipam]\npool = \"10.245.0.0/24\"\n"),
                "ipam.pool 10.245.0.0/24 is not inside overlay_cidr 10.244.0.0/16",
            ),
            (
                format!("{base}[ipam]\npool = \"10.244.0.0/31\"\n"),
                "ipam.pool 10.244.0.0/31 is too small",
            ),
            (
                format!("{base}[ipam]\npool = \"10.244.0.0/24\"\nreserved = [\"10.244.1.0/28\"]\n"),
                "ipam.reserved[0] 10.244.1.0/28 is not inside ipam.pool 10.244.0.0/24",
            ),
            (
                format!("{base}[ipam]\nreserved = [\"10.244.1.1/28\"]\n"),
                "ipam.reserved[0] 10.244.1.1/28 has host bits set",
            ),
            (format!("{base}[ipam]\nsize = 3\n"), "unknown field `size`"),
        ] {
            let e = Config::parse(&extra_or_replacement)
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{extra_or_replacement:?}: {e}");
        }
    }

    #[test]
    fn load_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("gw.toml");
        let e = Config::load(&p).unwrap_err();
        assert!(e.to_string().contains("gw.toml"), "{e}");
        std::fs::write(&p, "vni = \"x\"").unwrap();
        let e = Config::load(&p).unwrap_err();
        assert!(
            e.to_string().contains("gw.toml") && e.to_string().contains("vni"),
            "{e}"
        );
    }
}
