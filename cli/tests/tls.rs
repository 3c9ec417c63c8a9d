//! The gateway's API over TLS, as an attacker and a careless operator would meet it: plain
//! HTTP, no client certificate, another cluster's, an expired one, and a host's certificate
//! used to act as another host or as the operator. Each is refused with a clear error and
//! changes nothing. A real daemon on a real (loopback) socket.
mod common;

use std::{net::IpAddr, sync::Arc, time::Duration};

use common::{Env, block, pki};
use ferry_api::{Client, HostInfo, HostRole, transport::Request};
use ferry_tls::{Ca, Identity, Validity};
use rustls::{
    ClientConfig, RootCertStore,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
};
use serde_json::Value;

fn host(name: &str, vtep: [u8; 4]) -> HostInfo {
    HostInfo {
        name: name.into(),
        vtep: vtep.into(),
        overlay_ip: [10, 244, 255, vtep[3]].into(),
        role: HostRole::Host,
        active_since: None,
    }
}

/// A client configuration from PEM text, without [`ferry_tls::Tls::load`]'s own checks (so an
/// expired certificate reaches the server).
fn raw_client(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let chain = vec![CertificateDer::from_pem_slice(cert_pem.as_bytes()).unwrap()];
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    Arc::new(
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .unwrap(),
    )
}

fn metric(text: &str, result: &str) -> u64 {
    let key = format!("ferry_gateway_api_connections_total{{result=\"{result}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {key} in:\n{text}"))
}

fn version(env: &Env) -> u64 {
    block(env.client().version()).unwrap()
}

#[test]
fn without_the_right_certificate_nothing_gets_in() {
    let env = Env::new(25_000);
    let _d = env.start();
    block(env.client().register_host(&host("a1", [198, 18, 1, 10]))).unwrap();
    let before = version(&env);
    let state_before = std::fs::read(env.state_file()).unwrap();

    // Plain HTTP, even with the right token: a clear refusal, as HTTP.
    let r = Request::get("/v1/hosts")
        .plain()
        .token(common::TOKEN)
        .send_blocking(env.addr)
        .unwrap();
    let v: Value = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(
        (r.status, &v["error"]["code"]),
        (400, &"tls_required".into()),
        "{v}"
    );
    assert!(
        v["error"]["message"].as_str().unwrap().contains("TLS only"),
        "{v}"
    );

    // The CLI told to speak plain text gets the same answer.
    let out = env.ferry(&["--json", "--insecure-plaintext", "hosts"]);
    assert_eq!(out.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["error"]["code"], "tls_required", "{v}");

    // No client certificate: the handshake is refused.
    let roots = {
        let mut r = RootCertStore::empty();
        r.add(CertificateDer::from_pem_slice(pki().ca.cert_pem().as_bytes()).unwrap())
            .unwrap();
        r
    };
    let anonymous = Arc::new(
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    );
    let e = Request::get("/v1/hosts")
        .tls(Some(anonymous))
        .token(common::TOKEN)
        .timeout(Duration::from_secs(10))
        .send_blocking(env.addr)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("TLS") && e.contains("refused this client"),
        "{e}"
    );

    // Another cluster's operator: refused both ways (the CLI names the reason).
    let other = Ca::generate("another cluster", Validity::days(1)).unwrap();
    let dir = env.dir.path().join("intruder");
    let issued = other
        .issue(&Identity::Operator, &[], Validity::days(1))
        .unwrap();
    ferry_tls::write_party(&dir, &other, &issued).unwrap();
    let out = env.ferry(&["--json", "--tls-dir", dir.to_str().unwrap(), "hosts"]);
    assert_eq!(out.status.code(), Some(1));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["error"]["code"], "tls", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("certificate"),
        "{v}"
    );
    // ... even with our CA's root (it trusts our server, our server does not trust it).
    let ours_root = raw_client(&pki().ca.cert_pem(), &issued.cert_pem, &issued.key_pem);
    let e = Request::get("/v1/hosts")
        .tls(Some(ours_root))
        .token(common::TOKEN)
        .send_blocking(env.addr)
        .unwrap_err()
        .to_string();
    assert!(e.contains("refused this client"), "{e}");

    // Our CA, but expired: the CLI refuses to use it, the server refuses it too.
    let now = std::time::SystemTime::now();
    let past = Validity {
        not_before: now - Duration::from_secs(3 * 86_400),
        not_after: now - Duration::from_secs(86_400),
    };
    let old = pki().ca.issue(&Identity::Operator, &[], past).unwrap();
    let dir = env.dir.path().join("expired");
    ferry_tls::write_party(&dir, &pki().ca, &old).unwrap();
    let out = env.ferry(&["--json", "--tls-dir", dir.to_str().unwrap(), "hosts"]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["error"]["code"], "tls", "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("expired"),
        "{v}"
    );
    let e = Request::get("/v1/hosts")
        .tls(Some(raw_client(
            &pki().ca.cert_pem(),
            &old.cert_pem,
            &old.key_pem,
        )))
        .token(common::TOKEN)
        .send_blocking(env.addr)
        .unwrap_err()
        .to_string();
    assert!(e.contains("refused this client"), "{e}");

    // Nothing changed; every refusal was counted.
    assert_eq!(version(&env), before);
    assert_eq!(std::fs::read(env.state_file()).unwrap(), state_before);
    let text = String::from_utf8(
        Request::get("/metrics")
            .send_blocking(env.addr)
            .unwrap()
            .body
            .to_vec(),
    )
    .unwrap();
    assert_eq!(metric(&text, "refused_plaintext"), 2);
    assert!(metric(&text, "refused_tls") >= 3, "{text}");
    let log = std::fs::read_to_string(env.log()).unwrap();
    assert!(log.contains("TLS handshake refused"), "{log}");
    assert!(!log.contains(common::TOKEN), "the token is in the log");
}

#[test]
fn a_host_acts_only_as_itself() {
    let env = Env::new(25_000);
    let _d = env.start();
    let op = env.client();
    block(op.register_host(&host("a1", [198, 18, 1, 10]))).unwrap();
    block(op.register_host(&host("b1", [198, 18, 1, 11]))).unwrap();
    let before = version(&env);

    let lo: IpAddr = [127, 0, 0, 1].into();
    let a1_dir = pki().party("host-a1", Identity::Host("a1".into()), &[lo]);
    let a1 =
        Client::new(env.addr, Some(common::TOKEN.into())).with_tls(Some(pki().client(&a1_dir)));

    // What an agent does, as itself: allowed.
    block(a1.heartbeat("a1")).unwrap();
    block(a1.register_host(&host("a1", [198, 18, 1, 10]))).unwrap();
    block(a1.version()).unwrap();

    // As another host, or as the operator: 403, naming why; nothing changes.
    let forbidden = |r: Result<_, ferry_api::ApiError>, want: &str| {
        let e = r.map(|_: serde_json::Value| ()).unwrap_err();
        assert_eq!(
            (e.status(), e.code()),
            (Some(403), Some("forbidden")),
            "{e}"
        );
        assert!(e.to_string().contains(want), "{want}: {e}");
    };
    let json = |r: Result<ferry_api::HostStatus, ferry_api::ApiError>| {
        r.map(|s| serde_json::to_value(s).unwrap())
    };
    forbidden(json(block(a1.heartbeat("b1"))), "as host b1");
    forbidden(
        json(block(a1.register_host(&host("b1", [198, 18, 1, 12])))),
        "may not register host b1",
    );
    forbidden(
        block(a1.watch("b1", 0, Duration::from_secs(1))).map(|s| serde_json::to_value(s).unwrap()),
        "as host b1",
    );
    forbidden(json(block(a1.remove_host("b1"))), "only the operator");
    // The CNI plugin's work only on itself: endpoints and addresses of another host are not.
    forbidden(
        block(a1.add_endpoints(&[ferry_api::EndpointSpec {
            ip: [10, 244, 1, 5].into(),
            host: "b1".into(),
            mac: None,
        }]))
        .map(|s| serde_json::to_value(s).unwrap()),
        "may not register an endpoint on host b1",
    );
    forbidden(
        block(a1.ipam_allocate(&ferry_api::IpamAllocateRequest {
            host: "b1".into(),
            container_id: "c1".into(),
            ifname: "eth0".into(),
            ip: None,
        }))
        .map(|s| serde_json::to_value(s).unwrap()),
        "may not allocate an address on host b1",
    );
    forbidden(
        block(a1.ipam()).map(|s| serde_json::to_value(s).unwrap()),
        "only the operator",
    );
    // Listing migrations is allowed (CRIU's hook under Podman finds its container's; every
    // host's watch has them all anyway).
    block(a1.migrations()).unwrap();
    forbidden(
        block(a1.abort_migration("m1", None)).map(|s| serde_json::to_value(s).unwrap()),
        "takes no part",
    );
    // a1's own re-registration changed nothing either (the same information).
    assert_eq!(version(&env), before);
}

#[test]
fn ferry_certs_makes_a_ca_and_each_partys_files() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    let certs = |args: &[&str]| {
        let out = std::process::Command::new(common::FERRY)
            .arg("--json")
            .arg("certs")
            .args(args)
            .output()
            .unwrap();
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "ferry certs {args:?}: {e}: {} {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (out.status.code(), v)
    };
    let (code, v) = certs(&["init", "--dir", ca.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{v}");
    // A second init would split the cluster's trust: refused.
    let (code, v) = certs(&["init", "--dir", ca.to_str().unwrap()]);
    assert_eq!(
        (code, v["error"]["code"].as_str()),
        (Some(1), Some("conflict")),
        "{v}"
    );

    let a1 = dir.path().join("a1");
    let (code, v) = certs(&[
        "issue",
        "--ca-dir",
        ca.to_str().unwrap(),
        "--out",
        a1.to_str().unwrap(),
        "host:a1",
        "--ip",
        "198.18.1.10",
    ]);
    assert_eq!(code, Some(0), "{v}");
    assert_eq!(v["identity"], "spiffe://ferry/host/a1", "{v}");
    let tls = ferry_tls::Tls::load_dir(&a1).unwrap();
    assert_eq!(tls.identity(), &Identity::Host("a1".into()));
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&a1.join("key.pem")), 0o600);
    assert_eq!(mode(&a1), 0o700);
    assert_eq!(mode(&ca.join("ca-key.pem")), 0o600);

    // A server without an address, a bad host name, an unknown party: refused, nothing
    // written.
    for (args, want) in [
        (vec!["gateway"], "--ip"),
        (vec!["host:A/1", "--ip", "198.18.1.11"], "not a host name"),
        (vec!["a1"], "name the party"),
    ] {
        let out = dir.path().join("x");
        let mut all = vec![
            "issue",
            "--ca-dir",
            ca.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        all.extend(args);
        let (code, v) = certs(&all);
        assert_eq!(code, Some(1), "{v}");
        assert!(
            v["error"]["message"].as_str().unwrap().contains(want),
            "{want}: {v}"
        );
        assert!(!out.exists());
    }
}
