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
}

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
            if p.len() != 2 {
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
    pub vni: u32,
    pub hosts: Vec<HostInfo>,
    pub endpoints: Vec<Endpoint>,
    pub public: Vec<PublicMapping>,
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
    /// `unknown_host`, `unknown_endpoint`, `unknown_public`, `duplicate_endpoint`,
    /// `duplicate_public`, `conflict`, `not_found`, `internal`.
    pub code: String,
    /// For people: names the offending field or value.
    pub message: String,
}

impl ErrorBody {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            error: ErrorDetail {
                code: code.into(),
                message: message.into(),
            },
        }
    }
}

/// The stable error codes of [`ErrorDetail::code`], with the HTTP status each is answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// 401: missing or wrong bearer token.
    Unauthorized,
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
    /// 409: the request collides with other state (addresses, MACs, roles, reverse NAT, …).
    Conflict,
    /// 404: no such route.
    NotFound,
    /// 500: the gateway failed (e.g. could not persist); nothing changed.
    Internal,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 11] = [
        ErrorCode::Unauthorized,
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
    ];

    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorCode::Unauthorized => "unauthorized",
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
        }
    }

    /// The HTTP status this code is normally answered with.
    pub const fn http_status(self) -> u16 {
        match self {
            ErrorCode::Unauthorized => 401,
            ErrorCode::BadRequest | ErrorCode::InvalidAddress => 400,
            ErrorCode::UnknownHost
            | ErrorCode::UnknownEndpoint
            | ErrorCode::UnknownPublic
            | ErrorCode::NotFound => 404,
            ErrorCode::DuplicateEndpoint | ErrorCode::DuplicatePublic | ErrorCode::Conflict => 409,
            ErrorCode::Internal => 500,
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

/// Query of `GET /v1/watch?host=NAME&after=N`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchQuery {
    /// The registered host asking (its agent).
    pub host: String,
    /// The snapshot version the agent has applied (0: none).
    pub after: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_status_round_trips_and_rejects_unknown_fields() {
        let s = HostStatus {
            info: HostInfo {
                name: "a1".into(),
                vtep: "198.18.1.10".parse().unwrap(),
                overlay_ip: "10.244.255.1".parse().unwrap(),
                role: HostRole::Gateway,
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
