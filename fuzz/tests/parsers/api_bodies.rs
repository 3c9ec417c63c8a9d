//! API request bodies: decoded as the gateway's and the agents' handlers decode them
//! (`serde_json` into `ferry_api` types), then validated by the gateway's registry
//! (`Registry::apply`, a pure state machine). Whatever is accepted must re-encode, decode to
//! the same value and be accepted again, and leave a registry that keeps its invariants.

use std::{collections::BTreeSet, net::Ipv4Addr};

use ferry_api::{
    ContainerAddr, EndpointsRequest, HostInfo, HostRole, IpamAllocateRequest, IpamReleaseRequest,
    MacAddr, MigrationRequest, PublicKey, PublicSpec, Snapshot,
    run::{CheckpointRequest, RunRequest, StartRequest},
    validate::validate_host_name,
};
use ferry_fuzz::{Seed, config, corpus, mutated};
use ferry_gateway::{
    registry::{NetConfig, Registry, Request},
    store::PersistedState,
};
use proptest::prelude::*;
use serde::{Serialize, de::DeserializeOwned};
use serde_json::{Map, Value, json};

const TARGET: &str = "api_bodies";
const TOKENS: &[&[u8]] = &[
    b"\"mac\":\"0e:fe:00:00:00:01\",",
    b"\"role\":\"gateway\",",
    b"\"run\":true,",
    b"null",
    b"\"\"",
    b"{}",
    b"[]",
    b"10.244.1.11",
    b"203.0.113.255",
];

fn net() -> NetConfig {
    NetConfig {
        overlay_cidr: "10.244.0.0/16".parse().unwrap(),
        overlay6_cidr: None,
        vni: 4242,
        public_cidrs: vec!["203.0.113.128/25".parse().unwrap()],
        forward_grace_ms: 2000,
        ipam: ferry_gateway::registry::IpamPool::whole("10.244.0.0/16".parse().unwrap()),
    }
}

/// Four hosts (one the gateway), two endpoints, one public address.
fn base() -> Registry {
    let mut r = Registry::new(net());
    let host = |name: &str, vtep: &str, overlay: &str, role| HostInfo {
        name: name.into(),
        vtep: vtep.parse().unwrap(),
        overlay_ip: overlay.parse().unwrap(),
        role,
        active_since: None,
    };
    for h in [
        host("a1", "198.18.1.10", "10.244.255.1", HostRole::Host),
        host("a2", "198.18.1.11", "10.244.255.2", HostRole::Host),
        host("b1", "198.18.2.10", "10.244.255.3", HostRole::Host),
        host("gw", "198.18.0.10", "10.244.255.4", HostRole::Gateway),
    ] {
        r.apply(Request::RegisterHost(h)).expect("host");
    }
    let eps: EndpointsRequest = serde_json::from_value(json!({"endpoints": [
        {"ip": "10.244.1.10", "host": "a1"},
        {"ip": "10.244.2.20", "host": "b1", "mac": "02:00:00:00:00:20"},
    ]}))
    .unwrap();
    r.apply(Request::AddEndpoints(eps.endpoints))
        .expect("endpoints");
    let p: PublicSpec =
        serde_json::from_value(json!({"public": "203.0.113.130", "container": "10.244.1.10"}))
            .unwrap();
    r.apply(Request::AddPublic(p)).expect("public");
    r
}

/// Decodes `body` as `T`; if it decodes, re-encoding gives a body that decodes to the same.
fn decode<T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug>(
    body: &[u8],
) -> Result<T, String> {
    let v: T = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    let again = serde_json::to_vec(&v).expect("encodes");
    let back: T = serde_json::from_slice(&again).expect("a re-encoded body decodes");
    assert_eq!(back, v);
    Ok(v)
}

/// What the registry promises about everything it accepted.
fn check_invariants(r: &Registry) {
    let net = r.net();
    let host_ips: BTreeSet<Ipv4Addr> = r.hosts().map(|h| h.overlay_ip).collect();
    for h in r.hosts() {
        validate_host_name(&h.name).expect("a registered host name is valid");
        assert!(net.overlay_cidr.contains(&h.overlay_ip), "{h:?}");
    }
    let mut macs = BTreeSet::new();
    for e in r.endpoints() {
        let c = net.overlay_cidr;
        assert!(
            c.contains(&e.ip) && e.ip != c.network() && e.ip != c.broadcast(),
            "{e:?}"
        );
        assert!(
            !host_ips.contains(&e.ip),
            "endpoint on a host's overlay address: {e:?}"
        );
        assert!(
            r.host(&e.host).is_some(),
            "endpoint on an unknown host: {e:?}"
        );
        assert!(
            e.mac.is_unicast() && !e.mac.is_zero() && !e.mac.is_ferry_reserved(),
            "endpoint MAC {} accepted",
            e.mac
        );
        assert!(macs.insert(e.mac), "MAC {} twice", e.mac);
    }
    for l in r.leases() {
        assert!(
            net.ipam.pool.contains(&l.ip) && !host_ips.contains(&l.ip),
            "lease outside the pool or on a host's address: {l:?}"
        );
        if let Some(e) = r.endpoints().find(|e| e.ip == l.ip) {
            assert_eq!(
                e.host, l.host,
                "a new lease on another host's endpoint: {l:?}"
            );
        }
        ferry_cni::spec::validate_container_id(&l.container_id).expect("a leased id is valid");
        ferry_cni::spec::validate_ifname(&l.ifname).expect("a leased ifname is valid");
    }
    for p in r.public() {
        assert!(
            net.public_cidrs.iter().any(|c| c.contains(&p.public)),
            "public address outside public_cidrs: {p:?}"
        );
        let ported = [
            p.public_port.is_some(),
            p.container_port.is_some(),
            p.proto.is_some(),
        ];
        assert!(ported == [true; 3] || ported == [false; 3], "{p:?}");
        assert!(
            p.public_port != Some(0) && p.container_port != Some(0),
            "{p:?}"
        );
    }
    // What agents decode (the snapshot) and what the gateway reads back (its state file).
    let snap = r.snapshot(1_000);
    let back: Snapshot = serde_json::from_slice(&serde_json::to_vec(&snap).unwrap()).unwrap();
    assert_eq!(back, snap);
    let stored = serde_json::to_vec(&r.to_persisted()).unwrap();
    let loaded: PersistedState = serde_json::from_slice(&stored).unwrap();
    let reloaded = Registry::from_persisted(r.net().clone(), loaded).expect("the state reloads");
    assert_eq!(&reloaded, r);
}

/// `body` as the request of `kind`, applied to [`base`]: accepted (then applied again from its
/// re-encoding with the same result) or refused with a message and nothing changed.
fn apply(kind: &str, body: &[u8]) -> Result<(), String> {
    let request = |body: &[u8]| -> Result<Option<Request>, String> {
        Ok(match kind {
            "hosts" => Some(Request::RegisterHost(decode::<HostInfo>(body)?)),
            "endpoints" => Some(Request::AddEndpoints(
                decode::<EndpointsRequest>(body)?.endpoints,
            )),
            "public" => Some(Request::AddPublic(decode::<PublicSpec>(body)?)),
            "allocate" => Some(Request::Allocate(decode::<IpamAllocateRequest>(body)?)),
            "release" => Some(Request::Release(decode::<IpamReleaseRequest>(body)?)),
            "migrations" => {
                let m = decode::<MigrationRequest>(body)?;
                Some(Request::PrepareMigration {
                    container: m.container,
                    to: m.to,
                    now_ms: 1_000,
                    run: m.run,
                })
            }
            // Decoded by the gateway (runs) and the agents (checkpoint, start) and checked
            // against live state there: decoding and re-encoding is what is checked here.
            "runs" => decode::<RunRequest>(body).map(|_| None)?,
            "checkpoint" => decode::<CheckpointRequest>(body).map(|_| None)?,
            "start" => decode::<StartRequest>(body).map(|_| None)?,
            other => panic!("no body kind {other:?}"),
        })
    };
    let Some(req) = request(body)? else {
        return Ok(());
    };
    let before = base();
    let mut r = before.clone();
    match r.apply(req) {
        Ok(change) => {
            check_invariants(&r);
            let again = match request(body)? {
                Some(Request::RegisterHost(h)) => {
                    Request::RegisterHost(decode(&serde_json::to_vec(&h).unwrap())?)
                }
                Some(other) => other,
                None => unreachable!(),
            };
            let mut r2 = before.clone();
            assert_eq!(
                r2.apply(again),
                Ok(change),
                "the same body applied twice differs"
            );
            Ok(())
        }
        Err(e) => {
            assert_eq!(r, before, "a refused request changed the registry");
            assert!(!e.message.is_empty());
            Err(e.to_string())
        }
    }
}

const KINDS: &[&str] = &[
    "hosts",
    "endpoints",
    "public",
    "allocate",
    "release",
    "migrations",
    "runs",
    "checkpoint",
    "start",
];

fn kind_of(seed: &Seed) -> &'static str {
    KINDS
        .iter()
        .find(|k| seed.name.contains(&format!("-{k}-")))
        .unwrap_or_else(|| panic!("corpus file {} names no body kind", seed.name))
}

#[test]
fn the_corpus_is_read_as_its_names_say() {
    base()
        .apply(Request::ExpireMigrations { now_ms: 0 })
        .expect("base registry");
    check_invariants(&base());
    let mut wrong = Vec::new();
    for seed in corpus(TARGET) {
        match (seed.expect_ok(), apply(kind_of(&seed), &seed.bytes)) {
            (Some(true), Err(e)) => wrong.push(format!("{}: refused: {e}", seed.name)),
            (Some(false), Ok(())) => wrong.push(format!("{}: accepted", seed.name)),
            _ => {}
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

fn pool(items: &'static [Value]) -> impl Strategy<Value = Option<Value>> + Clone {
    proptest::option::weighted(0.85, proptest::sample::select(items.to_vec()))
}

macro_rules! values {
    ($($v:expr),* $(,)?) => {{
        static V: std::sync::LazyLock<Vec<Value>> = std::sync::LazyLock::new(|| vec![$(json!($v)),*]);
        V.as_slice()
    }};
}

/// A JSON body of `kind` with each field drawn from boundary and near-miss values (or
/// missing), sometimes with an unknown field.
fn body(kind: &'static str) -> BoxedStrategy<Vec<u8>> {
    let names = values![
        "a1",
        "a2",
        "b1",
        "gw",
        "a3",
        "new-host",
        "",
        "-x",
        "A1",
        "a.b",
        "é",
        "x".repeat(32),
        "x".repeat(33),
        7,
        Value::Null
    ];
    let ips = values![
        "10.244.1.10",
        "10.244.1.11",
        "10.244.2.20",
        "10.244.255.1",
        "10.244.255.9",
        "10.244.0.0",
        "10.244.255.255",
        "10.9.0.1",
        "198.18.1.10",
        "198.18.1.13",
        "0.0.0.0",
        "127.0.0.1",
        "224.0.0.1",
        "255.255.255.255",
        "203.0.113.130",
        "203.0.113.131",
        "203.0.113.128",
        "203.0.113.255",
        "203.0.113.1",
        "1.2.3",
        " 10.244.1.11",
        "x",
        1,
        Value::Null
    ];
    let macs = values![
        "02:00:00:00:00:01",
        "02:00:00:00:00:20",
        "0e:fc:0a:f4:01:0b",
        "0e:fe:00:00:00:01",
        "0e:fe:12:34:56:78",
        "01:00:5e:00:00:01",
        "00:00:00:00:00:00",
        "ff:ff:ff:ff:ff:ff",
        "02:AB:cd:00:00:01",
        "+2:00:00:00:00:01",
        "02:00:00:00:00",
        "02-00-00-00-00-01",
        Value::Null
    ];
    let ports = values![0, 1, 80, 443, 65535, 65536, -1, "80", 1.5, Value::Null];
    let protos = values!["tcp", "udp", "sctp", "TCP", "", Value::Null];
    let roles = values!["host", "gateway", "router", Value::Null];
    let bools = values![true, false, 0, Value::Null];
    let sockets = values![
        "198.18.2.10:7401",
        "198.18.2.10:0",
        "198.18.2.10",
        "[::1]:7401"
    ];
    let locks = values!["hold", "criu-lock", "criu_lock"];
    let argvs = values![
        ["/bin/srv"],
        Vec::<String>::new(),
        ["/bin/sh", "-c", "echo"],
        "x"
    ];
    let ids = values![
        "c1",
        "3f2a9c",
        "a.b_c-d",
        "",
        "-x",
        "a/b",
        "x".repeat(257),
        7,
        Value::Null
    ];
    let ifnames = values![
        "eth0",
        "net1",
        "",
        "..",
        "a b",
        "a:b",
        "x".repeat(16),
        Value::Null
    ];
    let extra = proptest::option::weighted(0.1, Just(("x".to_owned(), json!(1))));
    let object = |fields: Vec<(&'static str, Option<Value>)>, extra: Option<(String, Value)>| {
        let mut m: Map<String, Value> = fields
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| (k.to_owned(), v)))
            .collect();
        if let Some((k, v)) = extra {
            m.insert(k, v);
        }
        Value::Object(m)
    };
    let value = match kind {
        "hosts" => (pool(names), pool(ips), pool(ips), pool(roles), extra)
            .prop_map(move |(n, v, o, r, x)| {
                object(
                    vec![("name", n), ("vtep", v), ("overlay_ip", o), ("role", r)],
                    x,
                )
            })
            .boxed(),
        "endpoints" => proptest::collection::vec(
            (pool(ips), pool(names), pool(macs), extra.clone())
                .prop_map(move |(i, h, m, x)| object(vec![("ip", i), ("host", h), ("mac", m)], x)),
            0..4,
        )
        .prop_map(|eps| json!({ "endpoints": eps }))
        .boxed(),
        "public" => (
            pool(ips),
            pool(ports),
            pool(ips),
            pool(ports),
            pool(protos),
            extra,
        )
            .prop_map(move |(p, pp, c, cp, pr, x)| {
                object(
                    vec![
                        ("public", p),
                        ("public_port", pp),
                        ("container", c),
                        ("container_port", cp),
                        ("proto", pr),
                    ],
                    x,
                )
            })
            .boxed(),
        "allocate" => (pool(names), pool(ids), pool(ifnames), pool(ips), extra)
            .prop_map(move |(h, c, i, ip, x)| {
                object(
                    vec![("host", h), ("container_id", c), ("ifname", i), ("ip", ip)],
                    x,
                )
            })
            .boxed(),
        "release" => (pool(names), pool(ids), pool(ips), extra)
            .prop_map(move |(h, c, ip, x)| {
                object(vec![("host", h), ("container_id", c), ("ip", ip)], x)
            })
            .boxed(),
        "migrations" => (pool(ips), pool(names), pool(bools), extra)
            .prop_map(move |(c, t, r, x)| object(vec![("container", c), ("to", t), ("run", r)], x))
            .boxed(),
        "runs" | "checkpoint" => (pool(ips), pool(names), pool(sockets), pool(locks), extra)
            .prop_map(move |(c, t, a, l, x)| {
                let mut f = vec![("container", c), ("to", t), ("lock", l)];
                if kind == "checkpoint" {
                    f.push(("to_api", a));
                }
                object(f, x)
            })
            .boxed(),
        _ => (pool(argvs), extra)
            .prop_map(move |(a, x)| object(vec![("argv", a)], x))
            .boxed(),
    };
    value.prop_map(|v| serde_json::to_vec(&v).unwrap()).boxed()
}

proptest! {
    #![proptest_config(config())]

    /// Bodies built from boundary values, for every kind.
    #[test]
    fn any_built_body_is_refused_or_accepted_again_from_its_encoding(
        (kind, bytes) in proptest::sample::select(KINDS).prop_flat_map(|k| (Just(k), body(k)))
    ) {
        let _ = apply(kind, &bytes);
    }

    /// Mutations of the corpus, tried as every kind of body.
    #[test]
    fn any_mutated_body_is_refused_or_accepted_again_from_its_encoding(bytes in mutated(TARGET, TOKENS)) {
        for kind in KINDS {
            let _ = apply(kind, &bytes);
        }
    }

    /// Path parameters and CLI arguments: what parses prints back to the same value, and a
    /// MAC is accepted only in its canonical form (hex pairs, either case).
    #[test]
    fn path_parameters_parse_to_their_printed_form(s in "[0-9a-fA-F:+/. tcpudx-]{0,24}") {
        if let Ok(k) = s.parse::<PublicKey>() {
            prop_assert_eq!(k.to_string().parse::<PublicKey>(), Ok(k));
        }
        if let Ok(c) = s.parse::<ContainerAddr>() {
            prop_assert_eq!(c.to_string().parse::<ContainerAddr>(), Ok(c));
        }
        if let Ok(m) = s.parse::<MacAddr>() {
            prop_assert_eq!(m.to_string(), s.to_ascii_lowercase());
        }
    }
}
