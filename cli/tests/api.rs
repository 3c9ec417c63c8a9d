//! The gateway's HTTP API against the real daemon: authentication, validation (every refusal
//! changes nothing), watches, metrics, concurrent changes.
mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use common::{Env, api, block, raw, read};
use ferry_api::{EndpointSpec, PublicSpec};
use serde_json::{Value, json};

/// Everything the API shows of the registry.
fn state(env: &Env) -> Value {
    let c = env.client();
    let hosts: Vec<Value> = block(c.hosts())
        .unwrap()
        .into_iter()
        .map(|h| serde_json::to_value(h.info).unwrap())
        .collect();
    json!({
        "version": env.version(),
        "hosts": hosts,
        "endpoints": block(c.endpoints()).unwrap(),
        "public": block(c.public()).unwrap(),
    })
}

fn ep(ip: &str, host: &str) -> EndpointSpec {
    EndpointSpec {
        ip: ip.parse().unwrap(),
        host: host.into(),
        mac: None,
    }
}

#[test]
fn wrong_or_missing_token_is_401_and_changes_nothing() {
    let env = Env::new(25_000);
    let _d = env.start();
    env.register_hosts();
    let before = state(&env);
    let file_before = read(&env.state_file());

    let body = r#"{"endpoints":[{"ip":"10.244.1.5","host":"a1"}]}"#;
    for auth in [
        None,
        Some("Bearer wrong"),
        Some("Bearer t0ken-for-tests-0123456789abcdeX"),
        Some("Bearer t0ken-for-tests-0123456789abcde"),
        Some("Basic dDBrZW4="),
        Some(common::TOKEN),
    ] {
        let mut headers = vec![("Content-Type", "application/json")];
        if let Some(a) = auth {
            headers.push(("Authorization", a));
        }
        for (method, path, body) in [
            ("POST", "/v1/endpoints", Some(body)),
            ("DELETE", "/v1/hosts/a1", None),
            ("GET", "/v1/endpoints", None),
            ("GET", "/v1/version", None),
            ("GET", "/v1/watch?host=a1&after=0", None),
            (
                "POST",
                "/v1/public",
                Some(r#"{"public":"203.0.113.130","container":"10.244.1.5"}"#),
            ),
        ] {
            let (status, v, head) = raw(env.addr, method, path, &headers, body);
            assert_eq!(status, 401, "{auth:?} {method} {path}: {v}");
            assert_eq!(v["error"]["code"], "unauthorized", "{v}");
            assert!(
                head.to_ascii_lowercase()
                    .contains("www-authenticate: bearer"),
                "{head}"
            );
        }
    }
    // The CLI with a wrong token file.
    let bad = env.dir.path().join("bad-token");
    std::fs::write(&bad, "nope\n").unwrap();
    let out = std::process::Command::new(common::FERRY)
        .args([
            "--json",
            "endpoint",
            "add",
            "--ip",
            "10.244.1.5",
            "--host",
            "a1",
        ])
        .args(["--gateway", &env.addr.to_string(), "--token-file"])
        .arg(&bad)
        .arg("--tls-dir")
        .arg(common::pki().operator())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["error"]["code"], "unauthorized", "{v}");

    assert_eq!(state(&env), before);
    assert_eq!(read(&env.state_file()), file_before);
    // Health and metrics need no token.
    let (s, v, _) = raw(env.addr, "GET", "/v1/health", &[], None);
    assert_eq!((s, &v["status"]), (200, &json!("ok")));
    let (s, _, _) = raw(env.addr, "GET", "/metrics", &[], None);
    assert_eq!(s, 200);
}

/// method, path, body, status, code, text the message must contain.
type Case<'a> = (&'a str, &'a str, Option<String>, u16, &'a str, &'a str);

/// Sends each case: its status, code and message, and the registry's version unchanged.
fn refused_each(env: &Env, cases: &[Case<'_>]) {
    let version = env.version();
    for (method, path, body, status, code, want) in cases {
        let (s, v) = api(env.addr, method, path, body.as_deref());
        let shown = body.as_deref().map(|b| &b[..b.len().min(120)]);
        assert_eq!(s, *status, "{method} {path} {shown:?}: {v}");
        assert_eq!(v["error"]["code"], *code, "{method} {path} {shown:?}: {v}");
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains(want),
            "{method} {path} {shown:?}: {msg:?} lacks {want:?}"
        );
        assert_eq!(
            env.version(),
            version,
            "{method} {path} changed the version"
        );
    }
}

#[test]
fn bad_requests_are_refused_with_clear_messages_and_change_nothing() {
    let env = Env::new(25_000);
    let _d = env.start();
    env.register_hosts();
    let c = env.client();
    block(c.add_endpoints(&[ep("10.244.1.5", "a1"), ep("10.244.2.5", "b1")])).unwrap();
    block(c.add_public(&PublicSpec {
        public: "203.0.113.130".parse().unwrap(),
        public_port: None,
        container: "10.244.1.5".parse().unwrap(),
        container_port: None,
        proto: None,
    }))
    .unwrap();
    let before = state(&env);
    let file_before = read(&env.state_file());

    let host = |name: &str, vtep: &str, ov: &str, role: &str| {
        format!(r#"{{"name":"{name}","vtep":"{vtep}","overlay_ip":"{ov}","role":"{role}"}}"#)
    };
    let cases: Vec<Case<'_>> = vec![
        // hosts
        ("POST", "/v1/hosts", Some(host("A1", "198.18.9.1", "10.244.255.9", "host")), 400, "bad_request", "host name \"A1\" contains 'A'"),
        ("POST", "/v1/hosts", Some(host("c1", "10.244.9.1", "10.244.255.9", "host")), 400, "invalid_address", "vtep 10.244.9.1 is inside overlay_cidr 10.244.0.0/16"),
        ("POST", "/v1/hosts", Some(host("c1", "224.0.0.5", "10.244.255.9", "host")), 400, "invalid_address", "vtep 224.0.0.5 is a multicast address"),
        ("POST", "/v1/hosts", Some(host("c1", "198.18.9.1", "10.245.0.1", "host")), 400, "invalid_address", "overlay_ip 10.245.0.1 is outside overlay_cidr"),
        ("POST", "/v1/hosts", Some(host("c1", "198.18.1.10", "10.244.255.9", "host")), 409, "conflict", "vtep 198.18.1.10 is already host a1's vtep"),
        ("POST", "/v1/hosts", Some(host("c1", "198.18.9.1", "10.244.1.5", "host")), 409, "conflict", "endpoint 10.244.1.5 on host a1"),
        // A takeover of the internet side: only by a gateway-role host that is registered,
        // from the one facing it now.
        ("POST", "/v1/public/takeover", Some(r#"{"host":"a1","from":"gw"}"#.into()), 400, "bad_request", "host a1 does not have role gateway"),
        ("POST", "/v1/public/takeover", Some(r#"{"host":"zz","from":"gw"}"#.into()), 404, "unknown_host", "host \"zz\" is not registered"),
        ("POST", "/v1/public/takeover", Some(r#"{"host":"gw"}"#.into()), 400, "bad_request", "missing field `from`"),
        ("POST", "/v1/hosts", Some(host("c1", "198.18.9.1", "10.244.255.9", "router")), 400, "bad_request", "unknown variant `router`"),
        ("POST", "/v1/hosts", Some(r#"{"name":"c1","vtep":"198.18.9.1","overlay_ip":"10.244.255.9","color":"red"}"#.into()), 400, "bad_request", "unknown field `color`"),
        ("POST", "/v1/hosts", Some(r#"{"name":"c1","vtep":"198.18.9","overlay_ip":"10.244.255.9"}"#.into()), 400, "bad_request", "vtep: invalid IPv4 address syntax"),
        ("POST", "/v1/hosts", Some("{not json".into()), 400, "bad_request", "request body is not valid JSON"),
        ("DELETE", "/v1/hosts/a1", None, 409, "conflict", "host a1 still has 1 endpoint(s) (10.244.1.5)"),
        ("DELETE", "/v1/hosts/zz", None, 404, "unknown_host", "host \"zz\" is not registered"),
        // endpoints
        ("POST", "/v1/endpoints", Some(r#"{"endpoints":[{"ip":"10.244.1.6","host":"a1"},{"ip":"10.244.1.7","host":"zz"}]}"#.into()), 404, "unknown_host", "endpoints[1]: host \"zz\" (of endpoint 10.244.1.7) is not registered"),
        ("POST", "/v1/endpoints", Some(r#"{"endpoints":[{"ip":"10.244.1.6","host":"a1"},{"ip":"10.244.1.6","host":"b1"}]}"#.into()), 409, "duplicate_endpoint", "endpoints[1]: ip 10.244.1.6 appears twice in the request (also endpoints[0])"),
        ("POST", "/v1/endpoints", Some(r#"{"endpoints":[{"ip":"10.244.1.5","host":"b1"}]}"#.into()), 409, "duplicate_endpoint", "endpoint 10.244.1.5 already exists on host a1"),
        ("POST", "/v1/endpoints", Some(r#"{"endpoints":[{"ip":"10.245.0.1","host":"a1"}]}"#.into()), 400, "invalid_address", "ip 10.245.0.1 is outside overlay_cidr 10.244.0.0/16"),
        ("POST", "/v1/endpoints", Some(r#"{"endpoints":[{"ip":"10.244.255.3","host":"a1"}]}"#.into()), 409, "conflict", "ip 10.244.255.3 is host b1's overlay_ip"),
        ("POST", "/v1/endpoints", Some(r#"{"endpoints":[{"ip":"10.244.1.6","host":"a1","mac":"0e:fc:0a:f4:01:05"}]}"#.into()), 409, "conflict", "mac 0e:fc:0a:f4:01:05 of endpoint 10.244.1.6 is already endpoint 10.244.1.5's"),
        ("POST", "/v1/endpoints", Some(r#"{"endpoints":[{"ip":"10.244.1.6","host":"a1","mac":"0e:fc:0a:f4:01"}]}"#.into()), 400, "bad_request", "invalid MAC address"),
        ("POST", "/v1/endpoints", Some(r#"{"endpoints":[{"ip":"10.244.1.6","host":"a1","mac":"03:00:00:00:00:01"}]}"#.into()), 400, "invalid_address", "multicast"),
        ("POST", "/v1/endpoints", Some(r#"{"endpoints":[{"ip":"10.244.1.6","host":"a1","mac":"0e:fe:00:00:00:01"}]}"#.into()), 400, "invalid_address", "is reserved: ferry's gateway and VXLAN devices"),
        ("POST", "/v1/endpoints", Some(r#"{"endpoints":[{"ip":"10.244.1","host":"a1"}]}"#.into()), 400, "bad_request", "endpoints[0].ip"),
        ("POST", "/v1/endpoints", Some(r#"{"endpoints":[]}"#.into()), 400, "bad_request", "the list is empty"),
        ("POST", "/v1/endpoints", Some(r#"{"endpoint":[]}"#.into()), 400, "bad_request", "unknown field `endpoint`"),
        ("DELETE", "/v1/endpoints/10.244.9.9", None, 404, "unknown_endpoint", "no endpoint has ip 10.244.9.9"),
        ("DELETE", "/v1/endpoints/not-an-ip", None, 400, "bad_request", "endpoint \"not-an-ip\" in the path is not an IPv4 address"),
        // public
        ("POST", "/v1/public", Some(r#"{"public":"198.51.100.7","container":"10.244.2.5"}"#.into()), 400, "invalid_address", "public 198.51.100.7 is outside public_cidrs (public_cidrs are 203.0.113.128/25)"),
        ("POST", "/v1/public", Some(r#"{"public":"203.0.113.140","public_port":80,"container":"10.244.2.5","proto":"tcp"}"#.into()), 400, "bad_request", "got public_port 80, container_port absent, proto tcp"),
        ("POST", "/v1/public", Some(r#"{"public":"203.0.113.140","public_port":0,"container":"10.244.2.5","container_port":80,"proto":"tcp"}"#.into()), 400, "bad_request", "public_port 0 is not a port"),
        ("POST", "/v1/public", Some(r#"{"public":"203.0.113.140","public_port":70000,"container":"10.244.2.5","container_port":80,"proto":"tcp"}"#.into()), 400, "bad_request", "public_port"),
        ("POST", "/v1/public", Some(r#"{"public":"203.0.113.140","container":"10.244.9.9"}"#.into()), 404, "unknown_endpoint", "container 10.244.9.9 is not a registered endpoint"),
        ("POST", "/v1/public", Some(r#"{"public":"203.0.113.130","container":"10.244.2.5"}"#.into()), 409, "duplicate_public", "public endpoint 203.0.113.130 already exists (→ 10.244.1.5)"),
        ("POST", "/v1/public", Some(r#"{"public":"203.0.113.130","public_port":80,"container":"10.244.2.5","container_port":80,"proto":"tcp"}"#.into()), 409, "conflict", "public address 203.0.113.130 is already mapped whole to 10.244.1.5"),
        ("POST", "/v1/public", Some(r#"{"public":"203.0.113.141","container":"10.244.1.5"}"#.into()), 409, "conflict", "container 10.244.1.5 already has whole-IP mapping 203.0.113.130"),
        ("DELETE", "/v1/public/203.0.113.131", None, 404, "unknown_public", "no public mapping has key 203.0.113.131"),
        ("DELETE", "/v1/public/203.0.113.130:80/tcp", None, 404, "unknown_public", "no public mapping has key 203.0.113.130:80/tcp"),
        ("DELETE", "/v1/public/203.0.113.130:80", None, 400, "bad_request", "a port needs a protocol"),
        // watch
        ("GET", "/v1/watch?host=zz&after=0", None, 404, "unknown_host", "host \"zz\" is not registered"),
        ("GET", "/v1/watch?host=a1&after=x", None, 400, "bad_request", "invalid query"),
        ("GET", "/v1/watch?host=a1&after=-1", None, 400, "bad_request", "invalid query"),
        ("GET", "/v1/watch?host=a1", None, 400, "bad_request", "missing field `after`"),
        ("GET", "/v1/watch?host=a1&after=0&since=1", None, 400, "bad_request", "unknown field `since`"),
        // routing
        ("GET", "/v1/nope", None, 404, "not_found", "no route GET /v1/nope"),
        ("PUT", "/v1/hosts", Some("{}".into()), 405, "bad_request", "method PUT is not allowed on /v1/hosts"),
    ];
    refused_each(&env, &cases);
    // Without a JSON content type.
    let auth = common::bearer();
    let (s, v, _) = raw(
        env.addr,
        "POST",
        "/v1/endpoints",
        &[("Authorization", &auth)],
        Some(r#"{"endpoints":[{"ip":"10.244.1.6","host":"a1"}]}"#),
    );
    assert_eq!(
        (s, &v["error"]["code"]),
        (415, &json!("bad_request")),
        "{v}"
    );

    assert_eq!(
        state(&env),
        before,
        "a refused request changed the registry"
    );
    assert_eq!(read(&env.state_file()), file_before);
}

/// The review of every field (docs/security.md, "Validation"): what an attacker or a careless
/// orchestrator would send — names with path separators, ids that are not ids, addresses that
/// cannot be a host's, out-of-range numbers, oversized lists, free-form strings — each refused
/// with its 4xx naming the field, and nothing changed (the version, the state file).
#[test]
fn every_field_is_checked_and_a_refusal_changes_nothing() {
    let env = Env::new(25_000);
    let _d = env.start();
    env.register_hosts();
    let c = env.client();
    block(c.add_endpoints(&[ep("10.244.1.5", "a1"), ep("10.244.2.5", "b1")])).unwrap();
    let before = state(&env);
    let file_before = read(&env.state_file());

    let host = |name: &str, vtep: &str| {
        format!(r#"{{"name":"{name}","vtep":"{vtep}","overlay_ip":"10.244.255.9"}}"#)
    };
    let too_many: Vec<Value> = (0..65_537u32)
        .map(|i| json!({"ip": std::net::Ipv4Addr::from(0x0af4_0000 + 256 + i).to_string(), "host": "a1"}))
        .collect();
    let event = |kind: &str, extra: &str| {
        format!(r#"{{"unix_ms":1.0,"kind":"{kind}","message":"x"{extra}}}"#)
    };
    let cases: Vec<Case<'_>> = vec![
        // host names: in bodies, paths and queries
        (
            "POST",
            "/v1/hosts",
            Some(host("../a1", "198.18.9.1")),
            400,
            "bad_request",
            "name: host name \"../a1\" contains '.'",
        ),
        (
            "POST",
            "/v1/hosts",
            Some(host("a/b", "198.18.9.1")),
            400,
            "bad_request",
            "contains '/'",
        ),
        (
            "DELETE",
            "/v1/hosts/..%2Fa1",
            None,
            400,
            "bad_request",
            "host name in the path: host name \"../a1\" contains '.'",
        ),
        (
            "POST",
            "/v1/hosts/A1/heartbeat",
            None,
            400,
            "bad_request",
            "host name in the path: host name \"A1\" contains 'A'",
        ),
        (
            "GET",
            "/v1/watch?host=..%2Fa1&after=0",
            None,
            400,
            "bad_request",
            "host: host name \"../a1\"",
        ),
        (
            "GET",
            "/v1/watch?host=&after=0",
            None,
            400,
            "bad_request",
            "host: host name is empty",
        ),
        // underlay addresses
        (
            "POST",
            "/v1/hosts",
            Some(host("c1", "169.254.7.1")),
            400,
            "invalid_address",
            "vtep 169.254.7.1 is a link-local address",
        ),
        (
            "POST",
            "/v1/hosts",
            Some(host("c1", "0.1.2.3")),
            400,
            "invalid_address",
            "vtep 0.1.2.3 is in 0.0.0.0/8",
        ),
        (
            "POST",
            "/v1/hosts",
            Some(host("c1", "127.0.0.1")),
            400,
            "invalid_address",
            "vtep 127.0.0.1 is a loopback address",
        ),
        (
            "POST",
            "/v1/hosts",
            Some(host("c1", "203.0.113.140")),
            400,
            "invalid_address",
            "vtep 203.0.113.140 is inside public_cidrs 203.0.113.128/25",
        ),
        // list lengths
        (
            "POST",
            "/v1/endpoints",
            Some(json!({"endpoints": too_many}).to_string()),
            400,
            "bad_request",
            "endpoints: 65537 in one request: at most 65536",
        ),
        // migrations: the destination's name, ids in paths, timeouts
        (
            "POST",
            "/v1/migrations",
            Some(r#"{"container":"10.244.1.5","to":"../b1"}"#.into()),
            400,
            "bad_request",
            "to: host name \"../b1\"",
        ),
        (
            "GET",
            "/v1/migrations/..%2Fm1",
            None,
            400,
            "bad_request",
            "path: migration id \"../m1\" is not m<number>",
        ),
        (
            "POST",
            "/v1/migrations/m01/freeze",
            None,
            400,
            "bad_request",
            "migration id \"m01\" is not m<number>",
        ),
        (
            "POST",
            "/v1/migrations/x/release",
            None,
            400,
            "bad_request",
            "migration id \"x\"",
        ),
        (
            "POST",
            "/v1/migrations/..%2F..%2Fm1/abort",
            None,
            400,
            "bad_request",
            "migration id \"../../m1\"",
        ),
        (
            "POST",
            "/v1/migrations?timeout_ms=18446744073709551615",
            Some(r#"{"container":"10.244.1.5","to":"b1"}"#.into()),
            400,
            "bad_request",
            "timeout_ms 18446744073709551615 is out of range",
        ),
        (
            "POST",
            "/v1/migrations?timeout_ms=99999999999999999999999",
            Some(r#"{"container":"10.244.1.5","to":"b1"}"#.into()),
            400,
            "bad_request",
            "invalid query",
        ),
        (
            "POST",
            "/v1/migrations",
            Some(r#"{"container":"0.0.0.0","to":"b1"}"#.into()),
            404,
            "unknown_endpoint",
            "container 0.0.0.0 is not a registered endpoint",
        ),
        // runs: ids, names, events
        (
            "POST",
            "/v1/runs",
            Some(r#"{"container":"10.244.1.5","to":"B1"}"#.into()),
            400,
            "bad_request",
            "to: host name \"B1\" contains 'B'",
        ),
        (
            "POST",
            "/v1/runs",
            Some(r#"{"container":"10.244.1.5","to":"b1","lock":"none"}"#.into()),
            400,
            "bad_request",
            "unknown variant `none`",
        ),
        (
            "GET",
            "/v1/runs/..%2Fm1",
            None,
            400,
            "bad_request",
            "migration id \"../m1\"",
        ),
        (
            "POST",
            "/v1/runs/m1%2F..%2Fx/events",
            Some(event("info", "")),
            400,
            "bad_request",
            "migration id \"m1/../x\"",
        ),
        (
            "POST",
            "/v1/runs/m1/events",
            Some(event("pwned", "")),
            400,
            "bad_request",
            "run event: kind \"pwned\" is not one of",
        ),
        (
            "POST",
            "/v1/runs/m1/events",
            Some(event("info", r#","colour":1"#)),
            400,
            "bad_request",
            "unknown field `colour`",
        ),
        (
            "POST",
            "/v1/runs/m1/events",
            Some(event(
                "phase",
                r#","phase":{"name":"../dump","start_unix_ms":1.0,"ms":1.0}"#,
            )),
            400,
            "bad_request",
            "phase.name \"../dump\"",
        ),
        (
            "POST",
            "/v1/runs/m1/events",
            Some(event(
                "phase",
                r#","phase":{"name":"dump","start_unix_ms":1.0,"ms":-3.0}"#,
            )),
            400,
            "bad_request",
            "phase.ms -3 is not a finite number",
        ),
        (
            "POST",
            "/v1/runs/m1/events",
            Some(
                json!({"unix_ms": 1.0, "kind": "info", "message": "x".repeat(16 * 1024 + 1)})
                    .to_string(),
            ),
            400,
            "bad_request",
            "message is 16385 bytes long",
        ),
        (
            "POST",
            "/v1/runs/m1/events",
            Some(event("info", "")),
            404,
            "unknown_migration",
            "no run has id \"m1\"",
        ),
    ];
    refused_each(&env, &cases);
    assert_eq!(
        state(&env),
        before,
        "a refused request changed the registry"
    );
    assert_eq!(read(&env.state_file()), file_before);
    let (s, v) = api(env.addr, "GET", "/v1/migrations", None);
    assert_eq!(
        (s, v),
        (200, json!([])),
        "a refused prepare left a migration"
    );
}

#[test]
fn changes_bump_the_version_once_and_reregistration_is_idempotent() {
    let env = Env::new(25_000);
    let _d = env.start();
    assert_eq!(env.version(), 0);
    env.register_hosts();
    assert_eq!(env.version(), 3);
    let h = r#"{"name":"a1","vtep":"198.18.1.10","overlay_ip":"10.244.255.1"}"#;
    let (s, v) = api(env.addr, "POST", "/v1/hosts", Some(h));
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        env.version(),
        3,
        "identical re-registration bumped the version"
    );
    let moved = r#"{"name":"a1","vtep":"198.18.1.11","overlay_ip":"10.244.255.1"}"#;
    let (s, v) = api(env.addr, "POST", "/v1/hosts", Some(moved));
    assert_eq!((s, &v["vtep"]), (200, &json!("198.18.1.11")), "{v}");
    assert_eq!(env.version(), 4);
    let new = r#"{"name":"c1","vtep":"198.18.3.10","overlay_ip":"10.244.255.5"}"#;
    let (s, v) = api(env.addr, "POST", "/v1/hosts", Some(new));
    assert_eq!((s, &v["name"]), (201, &json!("c1")), "{v}");
    let (s, v) = api(
        env.addr,
        "POST",
        "/v1/endpoints",
        Some(
            r#"{"endpoints":[{"ip":"10.244.1.5","host":"a1"},{"ip":"10.244.1.6","host":"c1","mac":"02:00:00:00:00:06"}]}"#,
        ),
    );
    assert_eq!(s, 201, "{v}");
    assert_eq!(v[0]["mac"], "0e:fc:0a:f4:01:05");
    assert_eq!(v[1]["mac"], "02:00:00:00:00:06");
    assert_eq!(env.version(), 6, "a batch is one change");
    let (s, v) = api(env.addr, "DELETE", "/v1/hosts/gw", None);
    assert_eq!((s, &v["name"]), (200, &json!("gw")), "{v}");
    assert_eq!(env.version(), 7);
    // The public key's '/' may be sent raw or encoded.
    let c = env.client();
    for (pp, cp) in [(80u16, 8080u16), (81, 8081)] {
        block(c.add_public(&PublicSpec {
            public: "203.0.113.131".parse().unwrap(),
            public_port: Some(pp),
            container: "10.244.1.5".parse().unwrap(),
            container_port: Some(cp),
            proto: Some(ferry_api::Proto::Tcp),
        }))
        .unwrap();
    }
    let (s, v) = api(env.addr, "DELETE", "/v1/public/203.0.113.131:80/tcp", None);
    assert_eq!((s, &v["public_port"]), (200, &json!(80)), "{v}");
    let (s, v) = api(
        env.addr,
        "DELETE",
        "/v1/public/203.0.113.131%3A81%2Ftcp",
        None,
    );
    assert_eq!((s, &v["public_port"]), (200, &json!(81)), "{v}");
    assert_eq!(env.version(), 11);
}

#[test]
fn concurrent_changes_each_take_one_version() {
    let env = Env::new(25_000);
    let _d = env.start();
    env.register_hosts();
    let v0 = env.version();
    let threads: Vec<_> = (0..24)
        .map(|i| {
            let c = env.client();
            std::thread::spawn(move || {
                block(c.add_endpoints(&[ep(&format!("10.244.3.{}", i + 1), "a1")])).unwrap()
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(env.version(), v0 + 24);
    assert_eq!(block(env.client().endpoints()).unwrap().len(), 24);
    // On disk: registry.json and the journal of changes since, as a restart reads them.
    let on_disk = ferry_gateway::store::read_state(&env.state_dir)
        .unwrap()
        .unwrap();
    assert_eq!(on_disk.version, v0 + 24);
    assert_eq!(on_disk.endpoints.len(), 24);
    let journal = std::fs::read_to_string(env.state_dir.join("registry.journal")).unwrap();
    // Version 1 (the first host) was written whole; every change since is one record.
    assert_eq!(
        journal.lines().count() as u64,
        v0 + 24 - 1,
        "each change is one journal record"
    );
}

#[test]
fn watch_answers_at_once_when_the_agent_is_behind_or_ahead() {
    let env = Env::new(20_000);
    let _d = env.start();
    env.register_hosts();
    let c = env.client();
    block(c.add_endpoints(&[ep("10.244.1.5", "a1")])).unwrap();
    let v = env.version();
    let t = Instant::now();
    let snap = block(c.watch("a1", 0, Duration::from_secs(30))).unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "waited {:?}",
        t.elapsed()
    );
    assert_eq!(snap.version, v);
    assert_eq!(snap.vni, 4242);
    assert_eq!(snap.overlay_cidr.to_string(), "10.244.0.0/16");
    let names: Vec<&str> = snap.hosts.iter().map(|h| h.name.as_str()).collect();
    assert_eq!(names, ["a1", "b1", "gw"]);
    assert_eq!(snap.endpoints.len(), 1);
    let a1 = |c: &ferry_api::Client| {
        block(c.hosts())
            .unwrap()
            .into_iter()
            .find(|h| h.info.name == "a1")
            .unwrap()
    };
    assert_eq!(a1(&c).applied_version, 0);
    assert!(a1(&c).last_seen_unix_ms > 0);

    // An agent that claims a version the registry never had (state reset) gets the current
    // snapshot at once and is not counted as in sync.
    let t = Instant::now();
    let snap = block(c.watch("a1", v + 100, Duration::from_secs(30))).unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "waited {:?}",
        t.elapsed()
    );
    assert_eq!(snap.version, v);
    assert_eq!(a1(&c).applied_version, 0);
}

#[test]
fn watch_waits_out_the_timeout_when_current() {
    let env = Env::new(800);
    let _d = env.start();
    env.register_hosts();
    let v = env.version();
    let c = env.client();
    let watcher = {
        let c = c.clone();
        std::thread::spawn(move || {
            let t = Instant::now();
            let s = block(c.watch("b1", v, Duration::from_secs(30))).unwrap();
            (t.elapsed(), s)
        })
    };
    // While it waits, the host shows as connected and in sync.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let b1 = block(c.hosts())
            .unwrap()
            .into_iter()
            .find(|h| h.info.name == "b1")
            .unwrap();
        if b1.connected {
            assert_eq!(b1.applied_version, v);
            break;
        }
        assert!(Instant::now() < deadline, "b1 never showed as connected");
        std::thread::sleep(Duration::from_millis(10));
    }
    let (waited, snap) = watcher.join().unwrap();
    assert_eq!(snap.version, v);
    assert!(
        waited >= Duration::from_millis(700),
        "answered after {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(10),
        "answered after {waited:?}"
    );
    let b1 = block(c.hosts())
        .unwrap()
        .into_iter()
        .find(|h| h.info.name == "b1")
        .unwrap();
    assert!(
        !b1.connected,
        "the watch ended but b1 still shows connected"
    );
}

#[test]
fn watch_returns_after_a_change_with_the_new_version() {
    let env = Env::new(60_000);
    let _d = env.start();
    env.register_hosts();
    let v = env.version();
    let c = env.client();
    let changed = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (c, changed) = (c.clone(), changed.clone());
        std::thread::spawn(move || {
            let s = block(c.watch("a1", v, Duration::from_secs(120))).unwrap();
            (changed.load(Ordering::SeqCst), s)
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !block(c.hosts())
        .unwrap()
        .iter()
        .any(|h| h.info.name == "a1" && h.connected)
    {
        assert!(Instant::now() < deadline, "the watch never started waiting");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        !watcher.is_finished(),
        "the watch answered before any change"
    );
    changed.store(true, Ordering::SeqCst);
    block(c.add_endpoints(&[ep("10.244.1.5", "a1")])).unwrap();
    let (after_change, snap) = watcher.join().unwrap();
    assert!(after_change, "the watch answered before the change");
    assert_eq!(snap.version, v + 1);
    assert_eq!(snap.endpoints.len(), 1);
    assert_eq!(snap.endpoints[0].ip.to_string(), "10.244.1.5");
}

#[test]
fn sigterm_ends_open_watches_and_the_daemon() {
    let env = Env::new(60_000);
    let d = env.start();
    env.register_hosts();
    let v = env.version();
    let c = env.client();
    let watcher = {
        let c = c.clone();
        std::thread::spawn(move || block(c.watch("gw", v, Duration::from_secs(120))))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !block(c.hosts())
        .unwrap()
        .iter()
        .any(|h| h.info.name == "gw" && h.connected)
    {
        assert!(Instant::now() < deadline, "the watch never started waiting");
        std::thread::sleep(Duration::from_millis(10));
    }
    let t = Instant::now();
    let status = d.terminate();
    assert!(status.success(), "{status}");
    let snap = watcher.join().unwrap().expect("the open watch is answered");
    assert_eq!(snap.version, v);
    assert!(t.elapsed() < Duration::from_secs(10));
}

#[test]
fn metrics_count_what_matters() {
    let env = Env::new(25_000);
    let _d = env.start();
    env.register_hosts();
    let c = env.client();
    block(c.add_endpoints(&[ep("10.244.1.5", "a1"), ep("10.244.1.6", "b1")])).unwrap();
    let v = env.version();
    // a1's agent is current, b1's is not.
    block(c.watch("b1", 0, Duration::from_secs(30))).unwrap();
    let watcher = {
        let c = c.clone();
        std::thread::spawn(move || block(c.watch("a1", v, Duration::from_secs(60))))
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !block(c.hosts())
        .unwrap()
        .iter()
        .any(|h| h.info.name == "a1" && h.connected)
    {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(10));
    }
    let (_, _, _) = raw(env.addr, "GET", "/v1/endpoints", &[], None);
    let text = common::metrics(env.addr);
    for line in [
        "ferry_gateway_hosts 3\n",
        "ferry_gateway_endpoints 2\n",
        "ferry_gateway_public_mappings 0\n",
        &format!("ferry_gateway_registry_version {v}\n"),
        "ferry_gateway_hosts_in_sync 1\n",
        "ferry_gateway_hosts_connected 1\n",
        "ferry_gateway_api_requests_total{route=\"POST /v1/hosts\",status=\"201\"} 3\n",
        "ferry_gateway_api_requests_total{route=\"POST /v1/endpoints\",status=\"201\"} 1\n",
        "ferry_gateway_api_requests_total{route=\"GET /v1/endpoints\",status=\"401\"} 1\n",
        "# TYPE ferry_gateway_uptime_seconds gauge\n",
    ] {
        assert!(text.contains(line), "{line:?} missing from:\n{text}");
    }
    drop(watcher);
}

#[test]
fn a_batch_of_65536_endpoints_is_one_change() {
    let env = Env::new(25_000);
    // 65,536 endpoints do not fit in a /16 next to the hosts.
    let text = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(&env.config, text.replace("10.244.0.0/16", "10.240.0.0/12")).unwrap();
    let _d = env.start();
    env.register_hosts();
    let c = env.client().timeout(Duration::from_secs(60));
    let specs: Vec<EndpointSpec> = (0..65_536u32)
        .map(|i| EndpointSpec {
            ip: std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 241, 0, 0)) + i),
            host: "a1".into(),
            mac: None,
        })
        .collect();
    let added = block(c.add_endpoints(&specs)).unwrap();
    assert_eq!(added.len(), 65_536);
    let snap = block(c.watch("b1", 0, Duration::from_secs(60))).unwrap();
    assert_eq!(snap.version, 4);
    assert_eq!(snap.endpoints.len(), 65_536);
    block(c.add_endpoints(&[ep("10.244.1.5", "b1")])).unwrap();
    assert_eq!(env.version(), 5);
}

/// The CNI plugin's IPAM over HTTP: a lease is 201, its repeat 200 unchanged, a taken or
/// unusable address a 409 / 400 naming why, a release frees the lease and the host's endpoint
/// in one change; leases and the round-robin cursor survive a restart.
#[test]
fn ipam_allocates_releases_and_survives_a_restart() {
    let env = Env::with_extra(
        25_000,
        "[ipam]\npool = \"10.244.8.0/24\"\nreserved = [\"10.244.8.0/28\"]\n",
    );
    let d = env.start();
    env.register_hosts();
    let alloc = |body: &str| api(env.addr, "POST", "/v1/ipam/allocate", Some(body));
    let (s, v) = alloc(r#"{"host":"a1","container_id":"c1","ifname":"eth0"}"#);
    assert_eq!(
        (s, &v["ip"], &v["changed"]),
        (201, &json!("10.244.8.16"), &json!(true)),
        "{v}"
    );
    let v1 = env.version();
    let (s, v) = alloc(r#"{"host":"a1","container_id":"c1","ifname":"eth0"}"#);
    assert_eq!(
        (s, &v["ip"], &v["changed"]),
        (200, &json!("10.244.8.16"), &json!(false)),
        "{v}"
    );
    assert_eq!(env.version(), v1, "a repeat changes nothing");
    let (s, v) = alloc(r#"{"host":"b1","container_id":"c2","ifname":"eth0","ip":"10.244.8.40"}"#);
    assert_eq!((s, &v["ip"]), (201, &json!("10.244.8.40")), "{v}");
    refused_each(
        &env,
        &[
            (
                "POST",
                "/v1/ipam/allocate",
                Some(
                    r#"{"host":"b1","container_id":"c3","ifname":"eth0","ip":"10.244.8.16"}"#
                        .into(),
                ),
                409,
                "conflict",
                "ip 10.244.8.16 is allocated to container c1 (eth0) on host a1",
            ),
            (
                "POST",
                "/v1/ipam/allocate",
                Some(
                    r#"{"host":"b1","container_id":"c3","ifname":"eth0","ip":"10.244.8.3"}"#.into(),
                ),
                400,
                "invalid_address",
                "ip 10.244.8.3 is reserved (ipam.reserved 10.244.8.0/28)",
            ),
            (
                "POST",
                "/v1/ipam/allocate",
                Some(r#"{"host":"zz","container_id":"c3","ifname":"eth0"}"#.into()),
                404,
                "unknown_host",
                "host \"zz\" is not registered",
            ),
            (
                "POST",
                "/v1/ipam/allocate",
                Some(r#"{"host":"a1","container_id":"c3"}"#.into()),
                400,
                "bad_request",
                "missing field `ifname`",
            ),
            (
                "POST",
                "/v1/ipam/release",
                Some(r#"{"host":"b1","container_id":"c9","ip":"10.244.8.16"}"#.into()),
                409,
                "conflict",
                "is allocated to container c1 on host a1, not to c9 on b1",
            ),
        ],
    );
    // The lease's endpoint is registered, then released with it in one change.
    let (s, v) = api(
        env.addr,
        "POST",
        "/v1/endpoints",
        Some(r#"{"endpoints":[{"ip":"10.244.8.16","host":"a1"}]}"#),
    );
    assert_eq!(s, 201, "{v}");
    let before = env.version();
    let (s, v) = api(
        env.addr,
        "POST",
        "/v1/ipam/release",
        Some(r#"{"host":"a1","container_id":"c1","ip":"10.244.8.16"}"#),
    );
    assert_eq!(
        (s, &v["changed"], &v["endpoint"]["host"]),
        (200, &json!(true), &json!("a1")),
        "{v}"
    );
    assert_eq!(v["version"], json!(before + 1));
    assert!(block(env.client().endpoints()).unwrap().is_empty());
    let (s, v) = api(
        env.addr,
        "POST",
        "/v1/ipam/release",
        Some(r#"{"host":"a1","container_id":"c1","ip":"10.244.8.16"}"#),
    );
    assert_eq!(
        (s, &v["changed"]),
        (200, &json!(false)),
        "DEL twice is fine: {v}"
    );

    let status = block(env.client().ipam()).unwrap();
    assert_eq!(status.leases.len(), 1);
    assert_eq!(status.free, 256 - 16 - 1 - 1);
    assert!(d.terminate().success());
    let _d = env.start();
    assert_eq!(
        block(env.client().ipam()).unwrap(),
        status,
        "leases persisted"
    );
    // The cursor too: the next address follows the last one chosen (.16); a lost cursor
    // would hand out the freed .16 again.
    let (s, v) = alloc(r#"{"host":"a1","container_id":"c4","ifname":"eth0"}"#);
    assert_eq!((s, &v["ip"]), (201, &json!("10.244.8.17")), "{v}");
}

/// `&delta=true`: from a version the gateway logged, the answer is a delta holding only the
/// change (applied to the old snapshot it gives the new one); from 0, and after a restart of
/// the gateway (its log is in memory), the whole snapshot; at the current version the long
/// poll ends with an empty delta.
#[test]
fn watch_answers_deltas_from_logged_versions_and_snapshots_otherwise() {
    use ferry_api::WatchUpdate;
    let env = Env::new(800);
    let d = env.start();
    env.register_hosts();
    let c = env.client();
    block(c.add_endpoints(&[ep("10.244.1.5", "a1"), ep("10.244.1.6", "b1")])).unwrap();
    let old = block(c.watch("a1", 0, Duration::from_secs(30))).unwrap();
    let WatchUpdate::Snapshot(first) =
        block(c.watch_update("a1", 0, Duration::from_secs(30))).unwrap()
    else {
        panic!("from 0: the whole snapshot");
    };
    assert_eq!(first, old);

    block(c.add_endpoints(&[ep("10.244.1.7", "b1")])).unwrap();
    block(c.remove_endpoint("10.244.1.5".parse().unwrap())).unwrap();
    let now = block(c.watch("a1", 0, Duration::from_secs(30))).unwrap();
    let WatchUpdate::Delta(delta) =
        block(c.watch_update("a1", old.version, Duration::from_secs(30))).unwrap()
    else {
        panic!("from a logged version: a delta");
    };
    assert_eq!((delta.from, delta.version), (old.version, old.version + 2));
    assert_eq!(
        delta.endpoints.len(),
        1,
        "only the added endpoint: {delta:?}"
    );
    assert_eq!(
        delta.endpoints_removed,
        ["10.244.1.5".parse::<std::net::Ipv4Addr>().unwrap()]
    );
    assert!(
        delta.hosts.is_empty() && delta.public.is_empty(),
        "{delta:?}"
    );
    assert_eq!(delta.apply_to(&old).unwrap(), now);
    assert!(
        delta.apply_to(&now).is_err(),
        "a delta applies only to its own base"
    );

    // Nothing new: the long poll (800 ms) ends with an empty delta.
    let WatchUpdate::Delta(empty) =
        block(c.watch_update("a1", now.version, Duration::from_secs(30))).unwrap()
    else {
        panic!("at the current version: an empty delta");
    };
    assert_eq!((empty.from, empty.version), (now.version, now.version));
    assert!(empty.endpoints.is_empty() && empty.endpoints_removed.is_empty());

    // A restarted gateway has no log: the whole snapshot, the same registry.
    drop(d);
    let _d = env.start();
    let WatchUpdate::Snapshot(after_restart) =
        block(c.watch_update("a1", old.version, Duration::from_secs(30))).unwrap()
    else {
        panic!("after a restart: the whole snapshot");
    };
    assert_eq!(after_restart.endpoints, now.endpoints);
    assert_eq!(after_restart.version, now.version);
}
