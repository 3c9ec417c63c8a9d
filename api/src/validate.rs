//! Validation and parsing shared by the gateway (which enforces the rules) and the CLI (which
//! parses the same forms from its arguments, so both give the same messages).
//!
//! Every error is an enum whose message is a sentence naming the offending value, ready to be
//! shown to a person.

use std::{fmt, net::Ipv4Addr, str::FromStr};

use crate::{
    run::{PAGES_PHASE, PHASES, RunEvent},
    types::{Proto, PublicSpec, migration_seq},
};

/// Longest host name.
pub const HOST_NAME_MAX: usize = 32;

/// Why a host name is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostNameError {
    #[error("host name is empty: want 1–32 characters of [a-z0-9-]")]
    Empty,
    #[error("host name {name:?} is {len} characters long: at most {HOST_NAME_MAX}")]
    TooLong { name: String, len: usize },
    #[error("host name {name:?} contains {c:?}: only a-z, 0-9 and '-' are allowed")]
    Character { name: String, c: char },
    #[error("host name {name:?} starts with '-': it must start with a letter or digit")]
    LeadingDash { name: String },
}

/// Why a port number is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortError {
    #[error("port 0 is not a valid port: want 1–65535")]
    Zero,
    #[error("invalid port {text:?}: want a number 1–65535")]
    Invalid { text: String },
}

/// Why a public endpoint (`IP` or `IP:PORT/PROTO`) does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublicKeyError {
    #[error("invalid public address {text:?}: not an IPv4 address")]
    Address { text: String },
    #[error("invalid public endpoint {text:?}: a protocol needs a port (IP:PORT/PROTO)")]
    ProtocolWithoutPort { text: String },
    #[error(
        "invalid public endpoint {text:?}: a port needs a protocol (IP:PORT/tcp or IP:PORT/udp)"
    )]
    PortWithoutProtocol { text: String },
    #[error("invalid public endpoint {text:?}: {source}")]
    Port {
        text: String,
        #[source]
        source: PortError,
    },
    /// `reason` is [`Proto`]'s parse error.
    #[error("invalid public endpoint {text:?}: {reason}")]
    Protocol { text: String, reason: String },
}

/// Why a container address (`IP` or `IP:PORT`) does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ContainerAddrError {
    #[error("invalid container address {text:?}: not an IPv4 address")]
    Address { text: String },
    #[error("invalid container address {text:?}: {source}")]
    Port {
        text: String,
        #[source]
        source: PortError,
    },
}

/// Why `ferry public add --public P --container C` is not a mapping.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PublicSpecError {
    #[error(
        "public endpoint {public} has a port, so the container needs one too ({container}:PORT)"
    )]
    ContainerNeedsPort {
        public: PublicKey,
        container: ContainerAddr,
    },
    #[error(
        "container {container} has a port, so the public endpoint needs one too \
         ({public}:PORT/PROTO)"
    )]
    PublicNeedsPort {
        public: PublicKey,
        container: ContainerAddr,
    },
}

/// A host name is 1–32 characters of `[a-z0-9-]`, starting with a letter or a digit.
pub fn validate_host_name(name: &str) -> Result<(), HostNameError> {
    if name.is_empty() {
        return Err(HostNameError::Empty);
    }
    if name.len() > HOST_NAME_MAX {
        return Err(HostNameError::TooLong {
            name: name.into(),
            len: name.len(),
        });
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        return Err(HostNameError::Character {
            name: name.into(),
            c,
        });
    }
    if name.starts_with('-') {
        return Err(HostNameError::LeadingDash { name: name.into() });
    }
    Ok(())
}

/// Why `ip` cannot be a unicast host address, if it cannot: unspecified, loopback, multicast,
/// limited broadcast.
pub fn non_unicast_reason(ip: Ipv4Addr) -> Option<&'static str> {
    if ip.is_unspecified() {
        Some("the unspecified address")
    } else if ip.is_loopback() {
        Some("a loopback address")
    } else if ip.is_multicast() {
        Some("a multicast address")
    } else if ip.is_broadcast() {
        Some("the broadcast address")
    } else {
        None
    }
}

/// Why `ip` cannot be a host's underlay address (a VTEP), if it cannot: what
/// [`non_unicast_reason`] refuses, "this network" (`0.0.0.0/8`) and link-local addresses
/// (`169.254.0.0/16`, never routed between hosts).
pub fn underlay_reason(ip: Ipv4Addr) -> Option<&'static str> {
    if let Some(why) = non_unicast_reason(ip) {
        Some(why)
    } else if ip.octets()[0] == 0 {
        Some("in 0.0.0.0/8 (\"this network\")")
    } else if ip.is_link_local() {
        Some("a link-local address")
    } else {
        None
    }
}

/// Why a migration id (in a path) is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("migration id {id:?} is not m<number> (like m12)")]
pub struct MigrationIdError {
    pub id: String,
}

/// A migration id as the gateway makes them: `m<n>`, n ≥ 1 without a leading zero. Checked
/// before an id names anything (a registry entry, a CRIU work directory, a log field).
pub fn validate_migration_id(id: &str) -> Result<u64, MigrationIdError> {
    migration_seq(id).ok_or_else(|| MigrationIdError { id: id.into() })
}

/// Most endpoints in one `POST /v1/endpoints`.
pub const MAX_ENDPOINTS_PER_REQUEST: usize = 65_536;
/// Longest `message` of a run event (an agent's progress line, a CRIU error).
pub const MAX_EVENT_MESSAGE: usize = 16 * 1024;
/// The kinds of a run event.
pub const EVENT_KINDS: [&str; 5] = ["phase", "progress", "info", "done", "failed"];

/// Why a run event (`POST /v1/runs/{id}/events`) is refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RunEventError {
    #[error("kind {kind:?} is not one of {EVENT_KINDS:?}")]
    Kind { kind: String },
    #[error("message is {len} bytes long: at most {MAX_EVENT_MESSAGE}")]
    MessageTooLong { len: usize },
    #[error("phase.name {name:?} is not one of {PHASES:?} or {PAGES_PHASE:?}")]
    Phase { name: String },
    #[error("{field} {value} is not a finite number ≥ 0")]
    Number { field: &'static str, value: f64 },
}

/// Checks a run event's fields (the numbers are times and durations in ms: finite, ≥ 0).
pub fn validate_run_event(e: &RunEvent) -> Result<(), RunEventError> {
    if !EVENT_KINDS.contains(&e.kind.as_str()) {
        return Err(RunEventError::Kind {
            kind: e.kind.clone(),
        });
    }
    if e.message.len() > MAX_EVENT_MESSAGE {
        return Err(RunEventError::MessageTooLong {
            len: e.message.len(),
        });
    }
    let mut numbers = vec![("unix_ms", e.unix_ms)];
    if let Some(p) = &e.phase {
        if !PHASES.contains(&p.name.as_str()) && p.name != PAGES_PHASE {
            return Err(RunEventError::Phase {
                name: p.name.clone(),
            });
        }
        numbers.extend([("phase.start_unix_ms", p.start_unix_ms), ("phase.ms", p.ms)]);
    }
    if let Some(c) = &e.criu {
        numbers.extend([
            ("criu.frozen_ms", c.frozen_ms),
            ("criu.freezing_ms", c.freezing_ms),
            ("criu.memory_dump_ms", c.memory_dump_ms),
            ("criu.memory_write_ms", c.memory_write_ms),
            ("criu.restore_ms", c.restore_ms),
        ]);
    }
    match numbers
        .into_iter()
        .find(|(_, v)| !(v.is_finite() && *v >= 0.0))
    {
        Some((field, value)) => Err(RunEventError::Number { field, value }),
        None => Ok(()),
    }
}

/// Parses a port number (1–65535).
pub fn parse_port(s: &str) -> Result<u16, PortError> {
    match s.parse::<u16>() {
        Ok(0) => Err(PortError::Zero),
        Ok(p) => Ok(p),
        Err(_) => Err(PortError::Invalid { text: s.into() }),
    }
}

/// The identity of a public mapping: a whole public IP, or `(public IP, port, proto)`.
///
/// Written `203.0.113.130` or `203.0.113.130:8080/tcp` (the same text as
/// [`PublicSpec::key`]); the CLI's `--public` takes the same form. Orders by address first, a
/// whole-IP key before the port keys of the same address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey {
    pub public: Ipv4Addr,
    pub port: Option<(u16, Proto)>,
}

impl PublicKey {
    pub fn is_whole_ip(&self) -> bool {
        self.port.is_none()
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some((port, proto)) => write!(f, "{}:{port}/{proto}", self.public),
            None => write!(f, "{}", self.public),
        }
    }
}

impl FromStr for PublicKey {
    type Err = PublicKeyError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let address = |ip: &str| {
            ip.parse()
                .map_err(|_| PublicKeyError::Address { text: ip.into() })
        };
        let Some((ip, rest)) = s.split_once(':') else {
            if s.contains('/') {
                return Err(PublicKeyError::ProtocolWithoutPort { text: s.into() });
            }
            return Ok(Self {
                public: address(s)?,
                port: None,
            });
        };
        let public = address(ip)?;
        let Some((port, proto)) = rest.split_once('/') else {
            return Err(PublicKeyError::PortWithoutProtocol { text: s.into() });
        };
        let port = parse_port(port).map_err(|source| PublicKeyError::Port {
            text: s.into(),
            source,
        })?;
        let proto: Proto = proto.parse().map_err(|reason| PublicKeyError::Protocol {
            text: s.into(),
            reason,
        })?;
        Ok(Self {
            public,
            port: Some((port, proto)),
        })
    }
}

impl PublicSpec {
    /// The mapping's key as a value (see [`PublicKey`]). For a spec with a port but no
    /// protocol (invalid, rejected by the gateway) the port is ignored.
    pub fn public_key(&self) -> PublicKey {
        PublicKey {
            public: self.public,
            port: self.public_port.zip(self.proto),
        }
    }
}

/// A container address as the CLI's `--container` takes it: `IP` or `IP:PORT`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContainerAddr {
    pub ip: Ipv4Addr,
    pub port: Option<u16>,
}

impl fmt::Display for ContainerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(p) => write!(f, "{}:{p}", self.ip),
            None => write!(f, "{}", self.ip),
        }
    }
}

impl FromStr for ContainerAddr {
    type Err = ContainerAddrError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let address = |ip: &str| {
            ip.parse()
                .map_err(|_| ContainerAddrError::Address { text: ip.into() })
        };
        match s.split_once(':') {
            None => Ok(Self {
                ip: address(s)?,
                port: None,
            }),
            Some((ip, port)) => Ok(Self {
                ip: address(ip)?,
                port: Some(parse_port(port).map_err(|source| ContainerAddrError::Port {
                    text: s.into(),
                    source,
                })?),
            }),
        }
    }
}

/// Builds the request of `ferry public add --public P --container C`: both with a port (a port
/// mapping, protocol from `P`) or both without (whole IP).
pub fn public_spec(
    public: PublicKey,
    container: ContainerAddr,
) -> Result<PublicSpec, PublicSpecError> {
    match (public.port, container.port) {
        (None, None) => Ok(PublicSpec {
            public: public.public,
            public_port: None,
            container: container.ip,
            container_port: None,
            proto: None,
        }),
        (Some((public_port, proto)), Some(container_port)) => Ok(PublicSpec {
            public: public.public,
            public_port: Some(public_port),
            container: container.ip,
            container_port: Some(container_port),
            proto: Some(proto),
        }),
        (Some(_), None) => Err(PublicSpecError::ContainerNeedsPort { public, container }),
        (None, Some(_)) => Err(PublicSpecError::PublicNeedsPort { public, container }),
    }
}

/// Percent-encodes one path segment or query value (everything but RFC 3986 unreserved
/// characters).
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names() {
        for ok in ["a", "a1", "0", "gw-1", "a-", &"x".repeat(32)] {
            validate_host_name(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for (bad, why) in [
            ("", "empty"),
            ("-a", "starts with '-'"),
            ("A1", "contains 'A'"),
            ("a_1", "contains '_'"),
            ("a.b", "contains '.'"),
            ("é", "contains 'é'"),
            (&"x".repeat(33), "33 characters"),
        ] {
            let e = validate_host_name(bad).unwrap_err();
            assert!(e.to_string().contains(why), "{bad:?}: {e}");
        }
    }

    #[test]
    fn non_unicast() {
        assert!(non_unicast_reason("0.0.0.0".parse().unwrap()).is_some());
        assert!(non_unicast_reason("127.0.0.2".parse().unwrap()).is_some());
        assert!(non_unicast_reason("224.0.0.1".parse().unwrap()).is_some());
        assert!(non_unicast_reason("255.255.255.255".parse().unwrap()).is_some());
        assert_eq!(non_unicast_reason("198.18.1.10".parse().unwrap()), None);
    }

    #[test]
    fn public_keys_parse_print_and_order() {
        let whole: PublicKey = "203.0.113.130".parse().unwrap();
        assert_eq!(whole.port, None);
        assert_eq!(whole.to_string(), "203.0.113.130");
        let port: PublicKey = "203.0.113.130:8080/tcp".parse().unwrap();
        assert_eq!(port.port, Some((8080, Proto::Tcp)));
        assert_eq!(port.to_string(), "203.0.113.130:8080/tcp");
        let udp: PublicKey = "203.0.113.130:53/udp".parse().unwrap();
        assert!(whole < udp && udp < port, "whole IP first, then by port");
        let lower: PublicKey = "203.0.113.9:80/tcp".parse().unwrap();
        assert!(lower < whole, "numeric address order, not text order");

        for (bad, why) in [
            ("203.0.113.130:8080", "needs a protocol"),
            ("203.0.113.130/tcp", "needs a port"),
            ("203.0.113.130:0/tcp", "port 0"),
            ("203.0.113.130:70000/tcp", "invalid port \"70000\""),
            ("203.0.113.130:80/sctp", "invalid protocol \"sctp\""),
            ("203.0.113:80/tcp", "not an IPv4 address"),
            ("", "not an IPv4 address"),
        ] {
            let e = bad.parse::<PublicKey>().unwrap_err();
            assert!(e.to_string().contains(why), "{bad:?}: {e}");
        }
    }

    #[test]
    fn spec_key_matches_public_key() {
        let spec = PublicSpec {
            public: "203.0.113.130".parse().unwrap(),
            public_port: Some(443),
            container: "10.244.1.5".parse().unwrap(),
            container_port: Some(8443),
            proto: Some(Proto::Tcp),
        };
        assert_eq!(spec.key(), spec.public_key().to_string());
        assert_eq!(spec.key().parse::<PublicKey>().unwrap(), spec.public_key());
    }

    #[test]
    fn container_addrs() {
        let c: ContainerAddr = "10.244.1.5".parse().unwrap();
        assert_eq!(c.port, None);
        let c: ContainerAddr = "10.244.1.5:8080".parse().unwrap();
        assert_eq!(c.port, Some(8080));
        assert_eq!(c.to_string(), "10.244.1.5:8080");
        assert!(
            "10.244.1.5:x"
                .parse::<ContainerAddr>()
                .unwrap_err()
                .to_string()
                .contains("invalid port")
        );
        assert!(
            "10.244.1:80"
                .parse::<ContainerAddr>()
                .unwrap_err()
                .to_string()
                .contains("not an IPv4")
        );
    }

    #[test]
    fn cli_public_specs() {
        let p = |s: &str| s.parse::<PublicKey>().unwrap();
        let c = |s: &str| s.parse::<ContainerAddr>().unwrap();
        let spec = public_spec(p("203.0.113.130"), c("10.244.1.5")).unwrap();
        assert!(spec.is_whole_ip());
        assert_eq!(spec.proto, None);
        let spec = public_spec(p("203.0.113.130:80/udp"), c("10.244.1.5:8080")).unwrap();
        assert_eq!(
            (spec.public_port, spec.container_port, spec.proto),
            (Some(80), Some(8080), Some(Proto::Udp))
        );
        let e = public_spec(p("203.0.113.130:80/tcp"), c("10.244.1.5")).unwrap_err();
        assert!(e.to_string().contains("container needs one too"), "{e}");
        let e = public_spec(p("203.0.113.130"), c("10.244.1.5:80")).unwrap_err();
        assert!(
            e.to_string().contains("public endpoint needs one too"),
            "{e}"
        );
    }

    #[test]
    fn percent_encoding() {
        assert_eq!(
            percent_encode("203.0.113.130:80/tcp"),
            "203.0.113.130%3A80%2Ftcp"
        );
        assert_eq!(percent_encode("a-1_b~c"), "a-1_b~c");
        assert_eq!(percent_encode("a b&c"), "a%20b%26c");
    }

    #[test]
    fn underlay_addresses() {
        for (ip, want) in [
            ("0.0.0.0", Some("the unspecified address")),
            ("0.1.2.3", Some("in 0.0.0.0/8")),
            ("127.0.0.1", Some("a loopback address")),
            ("169.254.1.1", Some("a link-local address")),
            ("224.0.0.5", Some("a multicast address")),
            ("255.255.255.255", Some("the broadcast address")),
            ("198.18.1.10", None),
            ("10.0.0.1", None),
            ("203.0.113.5", None),
        ] {
            let got = underlay_reason(ip.parse().unwrap());
            match want {
                Some(w) => assert!(got.is_some_and(|g| g.contains(w)), "{ip}: {got:?}"),
                None => assert_eq!(got, None, "{ip}"),
            }
        }
    }

    #[test]
    fn migration_ids() {
        assert_eq!(validate_migration_id("m12"), Ok(12));
        for bad in [
            "", "m", "m0", "m01", "../m1", "m1/../x", "m1%2F..", "M1", "m-1", "m1 ",
        ] {
            let e = validate_migration_id(bad).unwrap_err();
            assert!(
                e.to_string().contains(&format!("{bad:?} is not m<number>")),
                "{bad:?}: {e}"
            );
        }
    }

    #[test]
    fn run_events() {
        use crate::run::{CriuStats, PhaseTiming};
        let ok = RunEvent {
            unix_ms: 1.0,
            kind: "phase".into(),
            message: "dump: 3 ms".into(),
            phase: Some(PhaseTiming {
                name: "dump".into(),
                start_unix_ms: 1.0,
                ms: 3.0,
                bytes: None,
            }),
            bytes: Some(5),
            criu: Some(CriuStats::default()),
        };
        validate_run_event(&ok).unwrap();
        let phase = |name: &str, ms: f64| {
            Some(PhaseTiming {
                name: name.into(),
                start_unix_ms: 1.0,
                ms,
                bytes: None,
            })
        };
        let cases: Vec<(RunEvent, &str)> = vec![
            (
                RunEvent {
                    kind: "pwned".into(),
                    ..ok.clone()
                },
                "kind \"pwned\" is not one of",
            ),
            (
                RunEvent {
                    message: "x".repeat(MAX_EVENT_MESSAGE + 1),
                    ..ok.clone()
                },
                "message is 16385 bytes long",
            ),
            (
                RunEvent {
                    phase: phase("../dump", 1.0),
                    ..ok.clone()
                },
                "phase.name \"../dump\" is not one of",
            ),
            (
                RunEvent {
                    phase: phase("dump", -1.0),
                    ..ok.clone()
                },
                "phase.ms -1 is not a finite number",
            ),
            (
                RunEvent {
                    unix_ms: f64::INFINITY,
                    ..ok.clone()
                },
                "unix_ms inf is not a finite number",
            ),
            (
                RunEvent {
                    criu: Some(CriuStats {
                        restore_ms: -5.0,
                        ..CriuStats::default()
                    }),
                    ..ok.clone()
                },
                "criu.restore_ms -5",
            ),
        ];
        for (e, want) in cases {
            let got = validate_run_event(&e).unwrap_err().to_string();
            assert!(got.contains(want), "want {want:?}, got {got:?}");
        }
    }
}
