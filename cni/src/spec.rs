//! The CNI specification's side of the plugin: versions, the invocation (environment
//! variables), the network configuration on stdin, the error object and the result, in each
//! supported version's format. Pure: no I/O here, so every rule is unit-tested.
//!
//! Supported: CNI 1.0.0, 0.4.0, 0.3.1 and 0.3.0 (`CHECK` from 0.4.0 on, as the spec says).
//! A result or an error is written in the format of the configuration's own `cniVersion`.

use std::{fmt, net::Ipv4Addr, path::PathBuf};

use serde::Deserialize;
use serde_json::{Value, json};

/// The plugin's `type` in a network configuration.
pub const PLUGIN_TYPE: &str = "ferry-cni";
/// The newest version spoken (used when the configuration names none that can be read).
pub const LATEST: Version = Version::V1_0_0;
/// Longest container id accepted (runtimes use 64 hex digits).
pub const CONTAINER_ID_MAX: usize = 256;
/// Longest interface name (IFNAMSIZ - 1).
pub const IFNAME_MAX: usize = 15;
/// Largest network configuration read from stdin.
pub const MAX_CONFIG_LEN: usize = 1024 * 1024;

/// A CNI specification version this plugin speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Version {
    V0_3_0,
    V0_3_1,
    V0_4_0,
    V1_0_0,
}

impl Version {
    pub const ALL: [Version; 4] = [
        Version::V0_3_0,
        Version::V0_3_1,
        Version::V0_4_0,
        Version::V1_0_0,
    ];

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.as_str() == s)
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Version::V0_3_0 => "0.3.0",
            Version::V0_3_1 => "0.3.1",
            Version::V0_4_0 => "0.4.0",
            Version::V1_0_0 => "1.0.0",
        }
    }

    /// `CHECK` exists from 0.4.0 on.
    pub fn has_check(self) -> bool {
        self >= Version::V0_4_0
    }

    /// Before 1.0.0 every IP configuration carried `"version": "4"`.
    fn ip_version_field(self) -> bool {
        self < Version::V1_0_0
    }

    fn supported_list() -> String {
        Self::ALL
            .iter()
            .map(|v| v.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The spec's error codes (1–99 are the spec's; 100 and up are ferry's own).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// 1: the configuration's `cniVersion` is not one this plugin speaks.
    IncompatibleVersion,
    /// 2: a field this plugin does not support (an IPv6 address, a second address).
    UnsupportedField,
    /// 3: the container (its network namespace) is unknown or does not exist.
    UnknownContainer,
    /// 4: a `CNI_*` environment variable is missing or invalid.
    InvalidEnv,
    /// 5: an I/O failure (talking to the agent, the agent's own kernel calls).
    Io,
    /// 6: the network configuration (or an answer) could not be decoded.
    Decode,
    /// 7: the network configuration is invalid, or names a network this host does not serve.
    InvalidConfig,
    /// 11: a transient condition: the agent is down, the gateway unreachable, the change not
    /// applied in time. Retrying later may succeed.
    TryAgainLater,
    /// 100: the address (or MAC) asked for is in use by another container.
    AddressInUse,
    /// 101: the address (or MAC) asked for can never be given: outside the pool, reserved,
    /// not unicast; or the pool is exhausted.
    AddressNotUsable,
    /// 102: the interface name is already taken inside the container's namespace.
    InterfaceExists,
    /// 103: `CHECK` found the container's network not as `ADD` left it.
    NotAsAdded,
    /// 104: the agent or the gateway refused the request (not this host's, not permitted).
    Refused,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 13] = [
        ErrorCode::IncompatibleVersion,
        ErrorCode::UnsupportedField,
        ErrorCode::UnknownContainer,
        ErrorCode::InvalidEnv,
        ErrorCode::Io,
        ErrorCode::Decode,
        ErrorCode::InvalidConfig,
        ErrorCode::TryAgainLater,
        ErrorCode::AddressInUse,
        ErrorCode::AddressNotUsable,
        ErrorCode::InterfaceExists,
        ErrorCode::NotAsAdded,
        ErrorCode::Refused,
    ];

    pub const fn number(self) -> u32 {
        match self {
            ErrorCode::IncompatibleVersion => 1,
            ErrorCode::UnsupportedField => 2,
            ErrorCode::UnknownContainer => 3,
            ErrorCode::InvalidEnv => 4,
            ErrorCode::Io => 5,
            ErrorCode::Decode => 6,
            ErrorCode::InvalidConfig => 7,
            ErrorCode::TryAgainLater => 11,
            ErrorCode::AddressInUse => 100,
            ErrorCode::AddressNotUsable => 101,
            ErrorCode::InterfaceExists => 102,
            ErrorCode::NotAsAdded => 103,
            ErrorCode::Refused => 104,
        }
    }

    pub fn from_number(n: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.number() == n)
    }
}

/// A CNI error: what the plugin prints on stdout (in the configuration's version) before it
/// exits non-zero.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg} (CNI error {})", code.number())]
pub struct CniError {
    pub code: ErrorCode,
    /// One sentence naming the problem and the offending value.
    pub msg: String,
    /// More context (may be empty).
    pub details: String,
}

impl CniError {
    pub fn new(code: ErrorCode, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    /// The spec's error object.
    pub fn to_json(&self, version: &str) -> Value {
        json!({
            "cniVersion": version,
            "code": self.code.number(),
            "msg": self.msg,
            "details": self.details,
        })
    }
}

fn err<T>(code: ErrorCode, msg: impl Into<String>) -> Result<T, CniError> {
    Err(CniError::new(code, msg))
}

/// `CNI_COMMAND`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Version,
}

impl Command {
    pub fn parse(s: &str) -> Result<Self, CniError> {
        match s {
            "ADD" => Ok(Command::Add),
            "DEL" => Ok(Command::Del),
            "CHECK" => Ok(Command::Check),
            "VERSION" => Ok(Command::Version),
            other => err(
                ErrorCode::InvalidEnv,
                format!(
                    "CNI_COMMAND {other:?} is not supported: ferry-cni speaks CNI {} (ADD, DEL, \
                     CHECK, VERSION)",
                    Version::supported_list()
                ),
            ),
        }
    }
}

/// What `CNI_ARGS` (`KEY=VALUE;...`) asks for. Only `IP` and `MAC` are read; other keys
/// (`IgnoreUnknown`, `K8S_POD_NAME`, ...) are ignored whatever `IgnoreUnknown` says, because
/// runtimes pass their own keys.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs {
    pub ip: Option<String>,
    pub mac: Option<String>,
}

impl CniArgs {
    pub fn parse(s: &str) -> Result<Self, CniError> {
        let mut a = CniArgs::default();
        for pair in s.split(';').filter(|p| !p.is_empty()) {
            let Some((k, v)) = pair.split_once('=') else {
                return err(
                    ErrorCode::InvalidEnv,
                    format!("CNI_ARGS: {pair:?} is not KEY=VALUE"),
                );
            };
            match k {
                "IP" => a.ip = Some(v.to_owned()),
                "MAC" => a.mac = Some(v.to_owned()),
                _ => {}
            }
        }
        Ok(a)
    }
}

/// An ADD, DEL or CHECK as the environment describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    pub command: Command,
    pub container_id: String,
    /// `CNI_NETNS`: required for ADD and CHECK; DEL may come after the namespace is gone.
    pub netns: Option<PathBuf>,
    pub ifname: String,
    pub args: CniArgs,
}

/// Reads the invocation from the environment (`var` looks a variable up). `VERSION` needs
/// nothing but `CNI_COMMAND`.
pub fn invocation(var: &dyn Fn(&str) -> Option<String>) -> Result<Invocation, CniError> {
    let get = |name: &str| var(name).filter(|v| !v.is_empty());
    let need = |name: &str, why: &str| {
        get(name).ok_or_else(|| {
            CniError::new(ErrorCode::InvalidEnv, format!("{name} is not set: {why}"))
        })
    };
    let command = Command::parse(&need("CNI_COMMAND", "want ADD, DEL, CHECK or VERSION")?)?;
    if command == Command::Version {
        return Ok(Invocation {
            command,
            container_id: String::new(),
            netns: None,
            ifname: String::new(),
            args: CniArgs::default(),
        });
    }
    let container_id = need("CNI_CONTAINERID", "the runtime names the container")?;
    validate_container_id(&container_id)
        .map_err(|e| CniError::new(ErrorCode::InvalidEnv, format!("CNI_CONTAINERID: {e}")))?;
    let ifname = need("CNI_IFNAME", "the runtime names the container's interface")?;
    validate_ifname(&ifname)
        .map_err(|e| CniError::new(ErrorCode::InvalidEnv, format!("CNI_IFNAME: {e}")))?;
    // The spec requires CNI_PATH; this plugin calls no other plugin, so its value is unused.
    need("CNI_PATH", "the spec requires it (where plugins live)")?;
    let netns = get("CNI_NETNS").map(PathBuf::from);
    match &netns {
        None if command != Command::Del => {
            return err(
                ErrorCode::InvalidEnv,
                "CNI_NETNS is not set: ADD and CHECK need the container's network namespace",
            );
        }
        Some(p) if !p.is_absolute() => {
            return err(
                ErrorCode::InvalidEnv,
                format!("CNI_NETNS {} is not an absolute path", p.display()),
            );
        }
        _ => {}
    }
    let args = CniArgs::parse(&get("CNI_ARGS").unwrap_or_default())?;
    Ok(Invocation {
        command,
        container_id,
        netns,
        ifname,
        args,
    })
}

/// A container id (libcni's rule): `[A-Za-z0-9][A-Za-z0-9_.-]*`, at most 256 characters.
pub fn validate_container_id(id: &str) -> Result<(), String> {
    let ok_first = id.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    if !ok_first {
        return Err(format!(
            "container id {id:?} must start with a letter or digit"
        ));
    }
    if id.len() > CONTAINER_ID_MAX {
        return Err(format!(
            "container id of {} characters: at most {CONTAINER_ID_MAX}",
            id.len()
        ));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-')))
    {
        return Err(format!(
            "container id {id:?} contains {c:?}: only letters, digits, '_', '.' and '-'"
        ));
    }
    Ok(())
}

/// An interface name (libcni's rule): 1–15 bytes, not `.` or `..`, without `/`, `:` or
/// whitespace.
pub fn validate_ifname(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("interface name is empty".into());
    }
    if name.len() > IFNAME_MAX {
        return Err(format!(
            "interface name {name:?} is {} bytes long: at most {IFNAME_MAX}",
            name.len()
        ));
    }
    if name == "." || name == ".." {
        return Err(format!("interface name {name:?} is not allowed"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| *c == '/' || *c == ':' || c.is_whitespace() || c.is_control())
    {
        return Err(format!("interface name {name:?} contains {c:?}"));
    }
    Ok(())
}

/// A network name (libcni's rule): `[A-Za-z0-9][A-Za-z0-9_.-]*`.
pub fn validate_network_name(name: &str) -> Result<(), String> {
    let ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "network name {name:?} is not [A-Za-z0-9][A-Za-z0-9_.-]*"
        ))
    }
}

/// A MAC address `aa:bb:cc:dd:ee:ff` (hex pairs; the agent checks that it is usable).
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    let bad = || format!("{s:?} is not a MAC address (six hex pairs like 0e:fc:0a:f4:01:05)");
    if parts.len() != 6 {
        return Err(bad());
    }
    let mut m = [0u8; 6];
    for (o, p) in m.iter_mut().zip(parts) {
        if p.len() != 2 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad());
        }
        *o = u8::from_str_radix(p, 16).map_err(|_| bad())?;
    }
    Ok(m)
}

/// The address a runtime asks for (`10.244.1.5/16` or `10.244.1.5`). The prefix length is
/// not kept: ferry gives every container its address as a /32 with an on-link default
/// gateway (the same on every host), whatever subnet the runtime thinks in.
pub fn parse_requested_ip(field: &str, s: &str) -> Result<Ipv4Addr, CniError> {
    let (addr, prefix) = match s.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (s, None),
    };
    if addr.contains(':') {
        return err(
            ErrorCode::UnsupportedField,
            format!("{field}: {s:?} is IPv6: want the IPv4 address (the IPv6 one follows from it)"),
        );
    }
    let ip: Ipv4Addr = addr.parse().map_err(|_| {
        CniError::new(
            ErrorCode::InvalidConfig,
            format!("{field}: {s:?} is not an IPv4 address (a.b.c.d or a.b.c.d/len)"),
        )
    })?;
    if let Some(p) = prefix
        && !p.parse::<u8>().is_ok_and(|p| p <= 32)
    {
        return err(
            ErrorCode::InvalidConfig,
            format!("{field}: {s:?} has a prefix length that is not 0–32"),
        );
    }
    Ok(ip)
}

/// An IPv6 address asked for (`addr` or `addr/len`, any prefix length).
pub fn parse_requested_ip6(field: &str, s: &str) -> Result<std::net::Ipv6Addr, CniError> {
    let (addr, prefix) = match s.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (s, None),
    };
    let ip: std::net::Ipv6Addr = addr.parse().map_err(|_| {
        CniError::new(
            ErrorCode::InvalidConfig,
            format!("{field}: {s:?} is not an IPv6 address"),
        )
    })?;
    if let Some(p) = prefix
        && !p.parse::<u8>().is_ok_and(|p| p <= 128)
    {
        return err(
            ErrorCode::InvalidConfig,
            format!("{field}: {s:?} has a prefix length that is not 0–128"),
        );
    }
    Ok(ip)
}

#[derive(Debug, Default, Deserialize)]
struct RawRuntimeConfig {
    #[serde(default)]
    ips: Option<Vec<String>>,
    #[serde(default)]
    mac: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct RawArgs {
    #[serde(default)]
    cni: Option<RawRuntimeConfig>,
}

/// The fields of a network configuration this plugin reads; every other field (`capabilities`,
/// `prevResult`, `dns`, ...) is accepted and ignored, as the spec wants.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawNetConf {
    name: String,
    #[serde(rename = "type")]
    plugin_type: String,
    #[serde(default)]
    agent: Option<PathBuf>,
    #[serde(default)]
    agents: Option<Vec<RawAgentByNetns>>,
    #[serde(default)]
    runtime_config: Option<RawRuntimeConfig>,
    #[serde(default)]
    args: Option<RawArgs>,
}

/// One entry of `"agents"`: the agent of the host whose network namespace is `netns`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAgentByNetns {
    netns: PathBuf,
    socket: PathBuf,
}

/// A ferry network configuration, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConf {
    pub version: Version,
    pub name: String,
    /// The local agent's CNI socket (`"agent"`; empty when `"agents"` names them by
    /// namespace).
    pub agent: PathBuf,
    /// `"agents"`: on a machine that carries several hosts, each in its own network namespace
    /// (a lab), the agent of each: (the host's namespace, its socket). The plugin talks to
    /// the one whose namespace it runs in ([`NetConf::socket`]). One configuration for every
    /// host, so a runtime's cached configuration (Podman keeps one per container ID and
    /// interface in /var/lib/cni, shared by the machine) reaches the right agent whichever
    /// host cached it.
    pub agents: Vec<(PathBuf, PathBuf)>,
    /// The address asked for: `runtimeConfig.ips` (the `ips` capability), else
    /// `args.cni.ips`.
    pub ip: Option<Ipv4Addr>,
    /// The IPv6 address asked for with it (dual-stack overlays: it must be the IPv4 address's
    /// IPv6 one, which the agent checks).
    pub ip6: Option<std::net::Ipv6Addr>,
    /// The MAC asked for: `runtimeConfig.mac` (the `mac` capability), else `args.cni.mac`.
    pub mac: Option<[u8; 6]>,
}

/// The `cniVersion` of a configuration, as written (for the answer's format), if it has a
/// readable one: used to answer even a configuration that fails later checks in its version.
pub fn config_version(stdin: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(stdin).ok()?;
    v.get("cniVersion")?.as_str().map(str::to_owned)
}

/// The version for answers: the configuration's, if supported, else [`LATEST`].
pub fn answer_version(stdin: &[u8]) -> Version {
    config_version(stdin)
        .and_then(|v| Version::parse(&v))
        .unwrap_or(LATEST)
}

/// Parses and checks a network configuration.
pub fn parse_netconf(stdin: &[u8]) -> Result<NetConf, CniError> {
    if stdin.iter().all(u8::is_ascii_whitespace) {
        return err(
            ErrorCode::Decode,
            "no network configuration on stdin (want the JSON network configuration)",
        );
    }
    let value: Value = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(
            ErrorCode::Decode,
            format!("the network configuration is not JSON: {e}"),
        )
    })?;
    if !value.is_object() {
        return err(
            ErrorCode::Decode,
            "the network configuration is not a JSON object",
        );
    }
    let version = match value.get("cniVersion") {
        None => {
            return err(
                ErrorCode::IncompatibleVersion,
                format!(
                    "the network configuration has no cniVersion: ferry-cni speaks {}",
                    Version::supported_list()
                ),
            );
        }
        Some(Value::String(s)) => Version::parse(s).ok_or_else(|| {
            CniError::new(
                ErrorCode::IncompatibleVersion,
                format!(
                    "cniVersion {s:?} is not supported: ferry-cni speaks {}",
                    Version::supported_list()
                ),
            )
        })?,
        Some(other) => {
            return err(
                ErrorCode::InvalidConfig,
                format!("cniVersion {other} is not a string"),
            );
        }
    };
    let raw: RawNetConf = serde_json::from_value(value).map_err(|e| {
        CniError::new(
            ErrorCode::InvalidConfig,
            format!("invalid network configuration: {e}"),
        )
    })?;
    if raw.plugin_type != PLUGIN_TYPE {
        return err(
            ErrorCode::InvalidConfig,
            format!(
                "the network configuration's type is {:?}: this plugin is {PLUGIN_TYPE:?}",
                raw.plugin_type
            ),
        );
    }
    validate_network_name(&raw.name).map_err(|e| CniError::new(ErrorCode::InvalidConfig, e))?;
    let agents: Vec<(PathBuf, PathBuf)> = raw
        .agents
        .unwrap_or_default()
        .into_iter()
        .map(|a| (a.netns, a.socket))
        .collect();
    let agent = match (raw.agent, agents.is_empty()) {
        (Some(a), _) => a,
        (None, false) => PathBuf::new(),
        (None, true) => {
            return err(
                ErrorCode::InvalidConfig,
                format!(
                    "network {:?} has no \"agent\": want the path of the local ferry agent's \
                     CNI socket (its cni_socket, e.g. /run/ferry/cni.sock)",
                    raw.name
                ),
            );
        }
    };
    let sockets = std::iter::once(&agent)
        .filter(|a| !a.as_os_str().is_empty())
        .chain(agents.iter().map(|(_, s)| s));
    for socket in sockets {
        if !socket.is_absolute() || socket.as_os_str().len() >= 108 {
            return err(
                ErrorCode::InvalidConfig,
                format!(
                    "agent {} must be an absolute path shorter than 108 bytes (a Unix socket)",
                    socket.display()
                ),
            );
        }
    }
    if let Some((netns, _)) = agents.iter().find(|(n, _)| !n.is_absolute()) {
        return err(
            ErrorCode::InvalidConfig,
            format!("agents: netns {} must be an absolute path", netns.display()),
        );
    }
    let rc = raw.runtime_config.unwrap_or_default();
    let from_args = raw.args.and_then(|a| a.cni).unwrap_or_default();
    let (ips, ips_field) = match (rc.ips, from_args.ips) {
        (Some(v), _) => (v, "runtimeConfig.ips"),
        (None, Some(v)) => (v, "args.cni.ips"),
        (None, None) => (Vec::new(), ""),
    };
    // One IPv4 address and, on a dual-stack overlay, its IPv6 one (a runtime restoring a
    // checkpoint asks for both addresses the first ADD gave).
    let (v6s, v4s): (Vec<&String>, Vec<&String>) = ips.iter().partition(|s| s.contains(':'));
    if v4s.len() > 1 || v6s.len() > 1 {
        return err(
            ErrorCode::UnsupportedField,
            format!(
                "{ips_field}: {} addresses asked for: ferry gives an interface one IPv4 address \
                 and, on a dual-stack overlay, its IPv6 address",
                ips.len()
            ),
        );
    }
    let ip = v4s
        .first()
        .map(|s| parse_requested_ip(ips_field, s))
        .transpose()?;
    let ip6 = v6s
        .first()
        .map(|s| parse_requested_ip6(ips_field, s))
        .transpose()?;
    let (mac, mac_field) = match (rc.mac, from_args.mac) {
        (Some(m), _) => (Some(m), "runtimeConfig.mac"),
        (None, Some(m)) => (Some(m), "args.cni.mac"),
        (None, None) => (None, ""),
    };
    let mac = mac
        .map(|m| parse_mac(&m))
        .transpose()
        .map_err(|e| CniError::new(ErrorCode::InvalidConfig, format!("{mac_field}: {e}")))?;
    Ok(NetConf {
        version,
        name: raw.name,
        agent,
        agents,
        ip,
        ip6,
        mac,
    })
}

/// A namespace's identity: (device, inode) of its nsfs file.
pub type NsId = (u64, u64);

impl NetConf {
    /// The agent's socket for a plugin running in the network namespace `own`: the `"agents"`
    /// entry whose namespace is `own` (`id_of` reads a path's identity), else `"agent"`.
    pub fn socket(
        &self,
        own: Option<NsId>,
        id_of: impl Fn(&std::path::Path) -> Option<NsId>,
    ) -> Result<&std::path::Path, CniError> {
        if let Some(own) = own
            && let Some((_, s)) = self.agents.iter().find(|(n, _)| id_of(n) == Some(own))
        {
            return Ok(s);
        }
        if self.agent.as_os_str().is_empty() {
            return err(
                ErrorCode::InvalidConfig,
                format!(
                    "network {:?}: none of its \"agents\" runs in this network namespace, and \
                     it has no \"agent\"",
                    self.name
                ),
            );
        }
        Ok(&self.agent)
    }
}

/// What `ADD` configured, as the agent reports it (see [`crate::proto`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Attached {
    /// The container's address and its prefix length (32: ferry's containers have no subnet).
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
    /// The container's default gateway (on-link, the same on every host).
    pub gateway: Ipv4Addr,
    /// The container interface's name and MAC.
    pub ifname: String,
    pub mac: String,
    /// The host end of the container's veth and its MAC.
    pub host_if: String,
    pub host_mac: String,
    /// The prepared migration this ADD attached to (the address arrives from another host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<String>,
    /// Dual-stack overlay: the container's IPv6 address (a /128) and its gateway (link-local).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip6: Option<std::net::Ipv6Addr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway6: Option<std::net::Ipv6Addr>,
}

/// The spec's result for `ADD`, in `version`'s format: the host end and the container's
/// interface (in `sandbox`, the runtime's namespace path), one address on the latter with
/// its gateway, the default route, no DNS.
pub fn result_json(version: Version, a: &Attached, sandbox: &str) -> Value {
    let mut ip = json!({
        "address": format!("{}/{}", a.ip, a.prefix_len),
        "gateway": a.gateway.to_string(),
        "interface": 1,
    });
    if version.ip_version_field() {
        ip["version"] = json!("4");
    }
    let mut ips = vec![ip];
    let mut routes = vec![json!({"dst": "0.0.0.0/0", "gw": a.gateway.to_string()})];
    if let (Some(ip6), Some(gw6)) = (a.ip6, a.gateway6) {
        let mut v6 = json!({
            "address": format!("{ip6}/128"),
            "gateway": gw6.to_string(),
            "interface": 1,
        });
        if version.ip_version_field() {
            v6["version"] = json!("6");
        }
        ips.push(v6);
        routes.push(json!({"dst": "::/0", "gw": gw6.to_string()}));
    }
    json!({
        "cniVersion": version.as_str(),
        "interfaces": [
            {"name": a.host_if, "mac": a.host_mac},
            {"name": a.ifname, "mac": a.mac, "sandbox": sandbox},
        ],
        "ips": ips,
        "routes": routes,
        "dns": {},
    })
}

/// The answer to `VERSION`.
pub fn version_json(version: Version) -> Value {
    json!({
        "cniVersion": version.as_str(),
        "supportedVersions": Version::ALL.iter().map(|v| v.as_str()).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let v: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| v.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone())
    }

    const ADD: &[(&str, &str)] = &[
        ("CNI_COMMAND", "ADD"),
        ("CNI_CONTAINERID", "3f2a9c"),
        ("CNI_NETNS", "/run/netns/x"),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/opt/cni/bin"),
    ];

    #[test]
    fn the_environment_is_read_and_checked_by_name() {
        let inv = invocation(&env(ADD)).unwrap();
        assert_eq!(inv.command, Command::Add);
        assert_eq!(
            inv.netns.as_deref(),
            Some(std::path::Path::new("/run/netns/x"))
        );
        assert_eq!(inv.args, CniArgs::default());
        let v = invocation(&env(&[("CNI_COMMAND", "VERSION")])).unwrap();
        assert_eq!(v.command, Command::Version);

        let without = |name: &str| -> Vec<(&str, &str)> {
            ADD.iter().copied().filter(|(k, _)| *k != name).collect()
        };
        for (missing, want) in [
            ("CNI_COMMAND", "CNI_COMMAND is not set"),
            ("CNI_CONTAINERID", "CNI_CONTAINERID is not set"),
            ("CNI_IFNAME", "CNI_IFNAME is not set"),
            ("CNI_PATH", "CNI_PATH is not set"),
            ("CNI_NETNS", "CNI_NETNS is not set"),
        ] {
            let e = invocation(&env(&without(missing))).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidEnv, "{missing}");
            assert!(e.msg.contains(want), "{missing}: {e}");
        }
        // DEL may come after the namespace is gone.
        let mut del = without("CNI_NETNS");
        del[0] = ("CNI_COMMAND", "DEL");
        assert_eq!(invocation(&env(&del)).unwrap().netns, None);

        let with = |k: &'static str, v: &'static str| -> Vec<(&str, &str)> {
            let mut e = without(k);
            e.push((k, v));
            e
        };
        for (k, v, want) in [
            ("CNI_COMMAND", "GC", "\"GC\" is not supported"),
            ("CNI_CONTAINERID", "-x", "must start with a letter or digit"),
            ("CNI_CONTAINERID", "a/b", "contains '/'"),
            ("CNI_IFNAME", "averyveryverylong0", "at most 15"),
            ("CNI_IFNAME", "..", "not allowed"),
            ("CNI_IFNAME", "eth 0", "contains ' '"),
            ("CNI_NETNS", "netns/x", "not an absolute path"),
            (
                "CNI_ARGS",
                "IgnoreUnknown=1;junk",
                "\"junk\" is not KEY=VALUE",
            ),
        ] {
            let e = invocation(&env(&with(k, v))).unwrap_err();
            assert_eq!(e.code, ErrorCode::InvalidEnv, "{k}={v}");
            assert!(e.msg.contains(want), "{k}={v}: {e}");
        }
        let inv = invocation(&env(&with(
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAME=p;IP=10.244.0.9;MAC=02:00:00:00:00:09",
        )))
        .unwrap();
        assert_eq!(inv.args.ip.as_deref(), Some("10.244.0.9"));
        assert_eq!(inv.args.mac.as_deref(), Some("02:00:00:00:00:09"));
    }

    const CONF: &str = r#"{"cniVersion":"1.0.0","name":"ferry","type":"ferry-cni",
        "agent":"/run/ferry/cni.sock","capabilities":{"ips":true,"mac":true},
        "prevResult":{"cniVersion":"1.0.0"}, "somethingElse": [1, 2]}"#;

    #[test]
    fn a_configuration_is_parsed_with_its_capabilities() {
        let c = parse_netconf(CONF.as_bytes()).unwrap();
        assert_eq!(c.version, Version::V1_0_0);
        assert_eq!(c.name, "ferry");
        assert_eq!(c.agent, PathBuf::from("/run/ferry/cni.sock"));
        assert_eq!((c.ip, c.mac), (None, None));

        let with_rc = CONF.replace(
            "\"somethingElse\"",
            r#""runtimeConfig":{"ips":["10.244.1.5/16"],"mac":"02:00:0a:f4:01:05","portMappings":[]},
               "args":{"cni":{"ips":["10.244.9.9"]}},"somethingElse""#,
        );
        let c = parse_netconf(with_rc.as_bytes()).unwrap();
        assert_eq!(
            c.ip,
            Some(Ipv4Addr::new(10, 244, 1, 5)),
            "runtimeConfig wins"
        );
        assert_eq!(c.mac, Some([2, 0, 0x0a, 0xf4, 1, 5]));
        let args_only = CONF.replace(
            "\"somethingElse\"",
            r#""args":{"cni":{"ips":["10.244.9.9"],"mac":"02:00:00:00:00:01"}},"somethingElse""#,
        );
        let c = parse_netconf(args_only.as_bytes()).unwrap();
        assert_eq!(c.ip, Some(Ipv4Addr::new(10, 244, 9, 9)));
        assert_eq!(c.ip6, None);
        // A runtime restoring a dual-stack container asks for both of its addresses.
        let both = CONF.replace(
            "\"somethingElse\"",
            r#""runtimeConfig":{"ips":["10.244.0.1/32","2001:db8:f::af4:1/128"]},"x""#,
        );
        let d = parse_netconf(both.as_bytes()).unwrap();
        assert_eq!(d.ip, Some(Ipv4Addr::new(10, 244, 0, 1)));
        assert_eq!(d.ip6, Some("2001:db8:f::af4:1".parse().unwrap()));
        assert_eq!(c.mac, Some([2, 0, 0, 0, 0, 1]));
        for v in ["0.3.0", "0.3.1", "0.4.0"] {
            let old = CONF.replace("1.0.0", v);
            assert_eq!(parse_netconf(old.as_bytes()).unwrap().version.as_str(), v);
        }
    }

    #[test]
    fn bad_configurations_get_the_specs_codes() {
        use ErrorCode::*;
        let cases: Vec<(String, ErrorCode, &str)> = vec![
            ("".into(), Decode, "no network configuration"),
            ("{\"cniVersion\":".into(), Decode, "not JSON"),
            ("[1]".into(), Decode, "not a JSON object"),
            (
                CONF.replace("\"cniVersion\":\"1.0.0\",", ""),
                IncompatibleVersion,
                "no cniVersion",
            ),
            (
                CONF.replace("1.0.0", "0.2.0"),
                IncompatibleVersion,
                "cniVersion \"0.2.0\" is not supported",
            ),
            (
                CONF.replace("\"name\":\"ferry\",", ""),
                InvalidConfig,
                "missing field `name`",
            ),
            (
                CONF.replace("\"type\":\"ferry-cni\"", "\"type\":\"bridge\""),
                InvalidConfig,
                "type is \"bridge\"",
            ),
            (
                CONF.replace("\"name\":\"ferry\"", "\"name\":\"fe rry\""),
                InvalidConfig,
                "network name \"fe rry\"",
            ),
            (
                CONF.replace("\"agent\":\"/run/ferry/cni.sock\",", ""),
                InvalidConfig,
                "has no \"agent\"",
            ),
            (
                CONF.replace("/run/ferry/cni.sock", "cni.sock"),
                InvalidConfig,
                "must be an absolute path",
            ),
            (
                CONF.replace(
                    "\"somethingElse\"",
                    r#""runtimeConfig":{"ips":"10.0.0.1"},"x""#,
                ),
                InvalidConfig,
                "invalid network configuration",
            ),
            (
                CONF.replace(
                    "\"somethingElse\"",
                    r#""runtimeConfig":{"ips":["fd00::1/64","fd00::2"]},"x""#,
                ),
                UnsupportedField,
                "2 addresses",
            ),
            (
                CONF.replace(
                    "\"somethingElse\"",
                    r#""runtimeConfig":{"ips":["fd00::zz"]},"x""#,
                ),
                InvalidConfig,
                "is not an IPv6 address",
            ),
            (
                CONF.replace(
                    "\"somethingElse\"",
                    r#""runtimeConfig":{"ips":["10.0.0.1","10.0.0.2"]},"x""#,
                ),
                UnsupportedField,
                "2 addresses",
            ),
            (
                CONF.replace(
                    "\"somethingElse\"",
                    r#""runtimeConfig":{"ips":["10.0.0.300"]},"x""#,
                ),
                InvalidConfig,
                "runtimeConfig.ips: \"10.0.0.300\" is not an IPv4 address",
            ),
            (
                CONF.replace(
                    "\"somethingElse\"",
                    r#""runtimeConfig":{"ips":["10.0.0.3/33"]},"x""#,
                ),
                InvalidConfig,
                "prefix length",
            ),
            (
                CONF.replace(
                    "\"somethingElse\"",
                    r#""runtimeConfig":{"mac":"02:00:00:00:00"},"x""#,
                ),
                InvalidConfig,
                "runtimeConfig.mac: \"02:00:00:00:00\" is not a MAC address",
            ),
        ];
        for (text, code, want) in cases {
            let e = parse_netconf(text.as_bytes()).unwrap_err();
            assert_eq!(e.code, code, "{text}: {e}");
            assert!(e.msg.contains(want), "{text}: {e}");
        }
    }

    fn attached() -> Attached {
        Attached {
            ip6: None,
            gateway6: None,
            ip: Ipv4Addr::new(10, 244, 0, 5),
            prefix_len: 32,
            gateway: Ipv4Addr::new(169, 254, 1, 1),
            ifname: "eth0".into(),
            mac: "0e:fc:0a:f4:00:05".into(),
            host_if: "fc0af40005".into(),
            host_mac: "0e:fe:00:00:00:01".into(),
            migration: None,
        }
    }

    #[test]
    fn one_configuration_for_several_hosts_names_each_agent_by_namespace() {
        let conf = br#"{"cniVersion":"1.0.0","name":"ferry","type":"ferry-cni",
            "agents":[{"netns":"/run/netns/l-a1","socket":"/run/l/a1/cni.sock"},
                      {"netns":"/run/netns/l-b1","socket":"/run/l/b1/cni.sock"}]}"#;
        let c = parse_netconf(conf).unwrap();
        let id_of = |p: &std::path::Path| match p.to_str() {
            Some("/run/netns/l-a1") => Some((1, 10)),
            Some("/run/netns/l-b1") => Some((1, 11)),
            _ => None,
        };
        let sock = |own| c.socket(own, id_of).map(|p| p.display().to_string());
        assert_eq!(sock(Some((1, 11))).unwrap(), "/run/l/b1/cni.sock");
        assert_eq!(sock(Some((1, 10))).unwrap(), "/run/l/a1/cni.sock");
        let e = sock(Some((1, 99))).unwrap_err();
        assert!(e.msg.contains("none of its \"agents\""), "{e:?}");
        // With "agent" too, a namespace not listed talks to it.
        let conf = br#"{"cniVersion":"1.0.0","name":"ferry","type":"ferry-cni",
            "agent":"/run/ferry/cni.sock",
            "agents":[{"netns":"/run/netns/l-a1","socket":"/run/l/a1/cni.sock"}]}"#;
        let c = parse_netconf(conf).unwrap();
        assert_eq!(
            c.socket(Some((1, 99)), id_of).unwrap(),
            std::path::Path::new("/run/ferry/cni.sock")
        );
        let bad = br#"{"cniVersion":"1.0.0","name":"ferry","type":"ferry-cni",
            "agents":[{"netns":"l-a1","socket":"/run/l/a1/cni.sock"}]}"#;
        let e = parse_netconf(bad).unwrap_err();
        assert!(e.msg.contains("must be an absolute path"), "{e:?}");
    }

    #[test]
    fn a_dual_stack_result_has_both_addresses_and_default_routes() {
        let mut a = attached();
        a.ip6 = Some("2001:db8:f::af4:5".parse().unwrap());
        a.gateway6 = Some("fe80::1".parse().unwrap());
        let r = result_json(Version::V1_0_0, &a, "/run/netns/x");
        assert_eq!(
            r["ips"][1],
            json!({"address": "2001:db8:f::af4:5/128", "gateway": "fe80::1", "interface": 1})
        );
        assert_eq!(r["routes"][1], json!({"dst": "::/0", "gw": "fe80::1"}));
        let r = result_json(Version::V0_4_0, &a, "/run/netns/x");
        assert_eq!(r["ips"][1]["version"], "6");
        assert_eq!(r["ips"][0]["version"], "4");
    }

    #[test]
    fn results_follow_the_configurations_version() {
        let r = result_json(Version::V1_0_0, &attached(), "/run/netns/x");
        assert_eq!(
            r,
            json!({
                "cniVersion": "1.0.0",
                "interfaces": [
                    {"name": "fc0af40005", "mac": "0e:fe:00:00:00:01"},
                    {"name": "eth0", "mac": "0e:fc:0a:f4:00:05", "sandbox": "/run/netns/x"},
                ],
                "ips": [{"address": "10.244.0.5/32", "gateway": "169.254.1.1", "interface": 1}],
                "routes": [{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}],
                "dns": {},
            })
        );
        for v in [Version::V0_3_0, Version::V0_3_1, Version::V0_4_0] {
            let r = result_json(v, &attached(), "/run/netns/x");
            assert_eq!(r["cniVersion"], v.as_str());
            assert_eq!(r["ips"][0]["version"], "4", "{v}");
            assert_eq!(r["ips"][0]["address"], "10.244.0.5/32");
        }
        assert!(Version::V0_4_0.has_check() && !Version::V0_3_1.has_check());
        let v = version_json(Version::V0_4_0);
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(
            v["supportedVersions"],
            json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0"])
        );
        assert_eq!(
            answer_version(CONF.replace("1.0.0", "0.3.1").as_bytes()),
            Version::V0_3_1
        );
        assert_eq!(answer_version(b"garbage"), LATEST);
    }

    #[test]
    fn errors_are_the_specs_object() {
        let e = CniError::new(ErrorCode::AddressInUse, "10.244.0.5 is in use").with_details("x");
        assert_eq!(
            e.to_json("0.4.0"),
            json!({"cniVersion": "0.4.0", "code": 100, "msg": "10.244.0.5 is in use", "details": "x"})
        );
        for c in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_number(c.number()), Some(c));
        }
        assert_eq!(ErrorCode::from_number(8), None);
    }
}
