//! The `ferry` binary as orchestrators use it: a real daemon on a real (loopback) socket.
mod common;

use std::process::Command;

use common::{Env, FERRY, free_port};

#[test]
fn health_answers_json_and_unreachable_gateway_is_a_clear_error() {
    let env = Env::new(25_000);
    let _d = env.start();
    let v = env.ok(&["health"]);
    assert_eq!(v["status"], "ok");
    assert_eq!(v["api"], "v1");
    // Text mode, and health needs no token.
    let out = Command::new(FERRY)
        .args(["health", "--gateway", &env.addr.to_string()])
        .args(["--token-file", "/nonexistent"])
        .env("FERRY_TLS_DIR", common::pki().operator())
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.starts_with(&format!("gateway {}: ok (api v1", env.addr)),
        "{text}"
    );

    let dead = format!("127.0.0.1:{}", free_port());
    let out = Command::new(FERRY)
        .args(["health", "--json", "--gateway", &dead])
        .env("FERRY_TLS_DIR", common::pki().operator())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["error"]["code"], "unreachable", "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with(&format!("connecting to gateway {dead}")),
        "{v}"
    );
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &["endpoint", "add", "--ip", "10.244.1", "--host", "a1"][..],
        &[
            "public",
            "add",
            "--public",
            "203.0.113.130:80",
            "--container",
            "10.244.1.5",
        ],
        &["public", "rm", "203.0.113.130:80/sctp"],
        &["endpoint", "add", "--ip", "10.244.1.5"],
        &["nope"],
    ] {
        let out = Command::new(FERRY).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
    }
}
