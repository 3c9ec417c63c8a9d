//! The migration coordinator against the real `ferry` binary on loopback: `ferry migrate`
//! steps, their exit codes, and fake agents that follow the registry through
//! `GET /v1/watch` (re-watching with the version they got, as a real agent reports what it
//! applied).
mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use common::{Env, api, block, read};
use ferry_api::{EndpointSpec, MigrationPhase, Snapshot};
use serde_json::{Value, json};

#[derive(Debug, Clone, Copy)]
enum Behaviour {
    /// Applies every snapshot at once.
    Apply,
    /// Applies snapshots until one carries a migration in this phase; from then on it keeps
    /// failing: it re-watches every 50 ms reporting its last good version (what a real agent
    /// does when applying fails).
    FailFrom(MigrationPhase),
}

/// A fake agent of one host: a thread that watches and re-watches with the version it got.
struct FakeAgent {
    stop: Arc<AtomicBool>,
    applied: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl FakeAgent {
    fn start(env: &Env, host: &str, behaviour: Behaviour) -> Self {
        let client = env.client();
        let host = host.to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let applied = Arc::new(AtomicU64::new(0));
        let (stop2, applied2) = (stop.clone(), applied.clone());
        let thread = std::thread::spawn(move || {
            block(async move {
                let mut after = 0;
                let mut failing = false;
                while !stop2.load(Ordering::Relaxed) {
                    match client.watch(&host, after, Duration::from_secs(10)).await {
                        Ok(snap) => {
                            if let Behaviour::FailFrom(p) = behaviour
                                && snap.migrations.iter().any(|m| m.phase == p)
                            {
                                failing = true;
                            }
                            if failing {
                                tokio::time::sleep(Duration::from_millis(50)).await;
                            } else {
                                after = snap.version;
                                applied2.store(after, Ordering::Relaxed);
                            }
                        }
                        // The gateway is restarting: retry.
                        Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                    }
                }
            })
        });
        Self {
            stop,
            applied,
            thread: Some(thread),
        }
    }

    fn applied(&self) -> u64 {
        self.applied.load(Ordering::Relaxed)
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Waits (at most 10 s) until `cond` holds.
#[track_caller]
fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Hosts a1, b1, gw; endpoints 10.244.1.5 on a1 and 10.244.2.5 on b1.
fn setup(env: &Env) {
    env.register_hosts();
    block(env.client().add_endpoints(&[
        EndpointSpec {
            ip: "10.244.1.5".parse().unwrap(),
            host: "a1".into(),
            mac: None,
        },
        EndpointSpec {
            ip: "10.244.2.5".parse().unwrap(),
            host: "b1".into(),
            mac: None,
        },
    ]))
    .unwrap();
}

/// Starts agents and waits until each applied the current version.
fn agents(env: &Env, list: &[(&str, Behaviour)]) -> Vec<FakeAgent> {
    let v = env.version();
    let agents: Vec<FakeAgent> = list
        .iter()
        .map(|(h, b)| FakeAgent::start(env, h, *b))
        .collect();
    for (a, (h, b)) in agents.iter().zip(list) {
        if matches!(b, Behaviour::Apply) {
            wait_until(&format!("agent {h} at version {v}"), || a.applied() >= v);
        }
    }
    agents
}

fn all_apply() -> Vec<(&'static str, Behaviour)> {
    vec![
        ("a1", Behaviour::Apply),
        ("b1", Behaviour::Apply),
        ("gw", Behaviour::Apply),
    ]
}

/// `ferry --json migrate ARGS`: exit code and document.
fn migrate(env: &Env, args: &[&str]) -> (i32, Value) {
    let mut all = vec!["migrate"];
    all.extend_from_slice(args);
    env.ferry_json(&all)
}

#[track_caller]
fn migrate_ok(env: &Env, args: &[&str]) -> Value {
    let (code, v) = migrate(env, args);
    assert_eq!(code, 0, "ferry migrate {args:?}: {v}");
    v
}

/// `ferry migrate ARGS` that must exit `exit` with error `code`; the message.
#[track_caller]
fn migrate_fails(env: &Env, args: &[&str], exit: i32, code: &str) -> (String, Value) {
    let (got, v) = migrate(env, args);
    assert_eq!(got, exit, "ferry migrate {args:?}: {v}");
    assert_eq!(v["error"]["code"], code, "ferry migrate {args:?}: {v}");
    (v["error"]["message"].as_str().unwrap().to_string(), v)
}

fn snapshot(env: &Env) -> Snapshot {
    block(env.client().watch("a1", 0, Duration::from_secs(5))).unwrap()
}

fn endpoint_host(env: &Env, ip: &str) -> String {
    block(env.client().endpoints())
        .unwrap()
        .into_iter()
        .find(|e| e.ip.to_string() == ip)
        .unwrap()
        .host
}

fn metrics(env: &Env) -> String {
    common::metrics(env.addr)
}

#[test]
fn full_migration_prepare_freeze_release_with_agents() {
    let env = Env::with_extra(500, "forward_grace_ms = 800\n");
    let _d = env.start();
    setup(&env);
    let _agents = agents(&env, &all_apply());
    let v0 = env.version();

    let v = migrate_ok(
        &env,
        &[
            "prepare",
            "--container",
            "10.244.1.5",
            "--to",
            "b1",
            "--timeout-ms",
            "5000",
        ],
    );
    assert_eq!(v["changed"], true, "{v}");
    assert_eq!(v["version"], v0 + 1, "{v}");
    assert_eq!(v["hosts"], json!(["a1", "b1"]), "{v}");
    let m = &v["migration"];
    assert_eq!(
        (&m["id"], &m["phase"], &m["from"], &m["to"]),
        (&json!("m1"), &json!("prepared"), &json!("a1"), &json!("b1"))
    );
    assert!(v["applied_ms"].as_u64().unwrap() < 5000);
    assert_eq!(snapshot(&env).migrations[0].phase, MigrationPhase::Prepared);
    assert_eq!(endpoint_host(&env, "10.244.1.5"), "a1");

    // freeze waits for every connected agent, the gateway host's included.
    let v = migrate_ok(&env, &["freeze", "--container", "10.244.1.5"]);
    assert_eq!(v["migration"]["phase"], "frozen", "{v}");
    assert_eq!(v["hosts"], json!(["a1", "b1", "gw"]), "{v}");
    // Two versions: the destination holds, then everyone points at it.
    assert_eq!(v["version"], v0 + 3);
    assert_eq!(endpoint_host(&env, "10.244.1.5"), "a1");

    let v = migrate_ok(&env, &["release", "--container", "10.244.1.5"]);
    let m = &v["migration"];
    assert_eq!(m["phase"], "released", "{v}");
    assert_eq!(v["hosts"], json!(["a1", "b1", "gw"]), "{v}");
    let released = m["released_unix_ms"].as_u64().unwrap();
    assert_eq!(m["forward_until_unix_ms"].as_u64().unwrap(), released + 800);
    let release_version = v["version"].as_u64().unwrap();
    assert_eq!(release_version, v0 + 4);
    // The endpoint moved in the same change, and the source still forwards.
    assert_eq!(endpoint_host(&env, "10.244.1.5"), "b1");
    let s = snapshot(&env);
    assert_eq!(s.version, release_version);
    assert_eq!(s.migrations.len(), 1);
    assert_eq!(s.migrations[0].phase, MigrationPhase::Released);
    let out = env.ferry(&["migrate", "status"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("m1  10.244.1.5  a1 → b1    released") && text.contains("a1 forwards for"),
        "{text}"
    );

    // After the grace the gateway drops it with a new version, which the agents apply.
    wait_until("the forwarding grace to end", || {
        env.version() == release_version + 1
    });
    let s = snapshot(&env);
    assert!(s.migrations.is_empty(), "{s:?}");
    assert_eq!(s.version, release_version + 1);
    // History: still listed and answerable; a repeated release changes nothing.
    let all = migrate_ok(&env, &["status", "--all"]);
    assert_eq!(all.as_array().unwrap().len(), 1);
    assert_eq!(all[0]["phase"], "released");
    assert_eq!(migrate_ok(&env, &["status"]), json!([]));
    let out = env.ferry(&["migrate", "status"]);
    assert_eq!(
        String::from_utf8(out.stdout).unwrap().trim(),
        "no migrations in progress"
    );
    let v = migrate_ok(&env, &["release", "--container", "10.244.1.5"]);
    assert_eq!(
        (v["changed"].clone(), v["hosts"].clone()),
        (json!(false), json!([]))
    );
    let (s, one) = api(env.addr, "GET", "/v1/migrations/m1", None);
    assert_eq!((s, &one["phase"]), (200, &json!("released")));

    let m = metrics(&env);
    for want in [
        "ferry_gateway_migration_steps_total{step=\"prepare\",result=\"ok\"} 1",
        "ferry_gateway_migration_steps_total{step=\"freeze\",result=\"ok\"} 1",
        "ferry_gateway_migration_steps_total{step=\"release\",result=\"ok\"} 1",
        "ferry_gateway_migration_steps_total{step=\"release\",result=\"unchanged\"} 1",
        "ferry_gateway_migrations{phase=\"released\"} 0",
        "ferry_gateway_migration_step_apply_seconds_count{step=\"freeze\"} 1",
    ] {
        assert!(m.contains(want), "{want} missing:\n{m}");
    }
}

#[test]
fn a_step_no_agent_applies_is_rolled_back_exit_3() {
    let env = Env::new(500);
    let _d = env.start();
    setup(&env);
    // No agents at all.
    let v0 = env.version();
    let (msg, v) = migrate_fails(
        &env,
        &[
            "prepare",
            "--container",
            "10.244.1.5",
            "--to",
            "b1",
            "--timeout-ms",
            "300",
        ],
        3,
        "rolled_back",
    );
    assert!(
        msg.contains("prepare of migration m1 (10.244.1.5, a1 → b1)")
            && msg.contains("was not applied within 300 ms by a1 (applied 0 of")
            && msg.contains("no agent had applied the migration")
            && msg.contains("the container stays on a1"),
        "{msg}"
    );
    let f = &v["error"]["migration"];
    assert_eq!(f["step"], "prepare", "{v}");
    assert_eq!(f["migration"]["phase"], "aborted", "{v}");
    let lagging: Vec<&str> = f["lagging"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["host"].as_str().unwrap())
        .collect();
    assert_eq!(lagging, ["a1", "b1"]);
    // prepare, then the automatic abort: two versions; nothing left in the snapshot.
    assert_eq!(env.version(), v0 + 2);
    assert!(snapshot(&env).migrations.is_empty());
    assert_eq!(endpoint_host(&env, "10.244.1.5"), "a1");
    let st = migrate_ok(&env, &["status", "--container", "10.244.1.5"]);
    assert_eq!(st[0]["phase"], "aborted", "{st}");
    // Text mode says where it runs: the registry's endpoint host.
    let out = env.ferry(&["migrate", "status", "--container", "10.244.1.5"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("10.244.1.5 runs on a1"), "{text}");
    // Text mode: message on stderr, exit 3.
    let out = env.ferry(&[
        "migrate",
        "prepare",
        "--container",
        "10.244.1.5",
        "--to",
        "b1",
        "--timeout-ms",
        "100",
    ]);
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("ferry: migration m2 is now aborted"), "{err}");
    let m = metrics(&env);
    assert!(
        m.contains(
            "ferry_gateway_migration_steps_total{step=\"prepare\",result=\"rolled_back\"} 2"
        ),
        "{m}"
    );
}

#[test]
fn a_freeze_a_connected_agent_fails_to_apply_is_rolled_back_exit_3() {
    let env = Env::new(500);
    let _d = env.start();
    setup(&env);
    // gw's agent is connected but fails from the prepare on: it never applied the migration,
    // so the rollback does not wait for it.
    let _agents = agents(
        &env,
        &[
            ("a1", Behaviour::Apply),
            ("b1", Behaviour::Apply),
            ("gw", Behaviour::FailFrom(MigrationPhase::Prepared)),
        ],
    );
    let v = migrate_ok(
        &env,
        &["prepare", "--container", "10.244.1.5", "--to", "b1"],
    );
    assert_eq!(v["hosts"], json!(["a1", "b1"]));
    let (msg, v) = migrate_fails(
        &env,
        &["freeze", "--container", "10.244.1.5", "--timeout-ms", "400"],
        3,
        "rolled_back",
    );
    assert!(
        msg.contains("freeze of migration m1")
            && msg.contains("by gw (applied")
            && msg.contains("a1, b1 applied the abort"),
        "{msg}"
    );
    assert_eq!(v["error"]["migration"]["migration"]["phase"], "aborted");
    assert!(
        v["error"]["migration"]["migration"]["frozen_unix_ms"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert!(snapshot(&env).migrations.is_empty());
    assert_eq!(endpoint_host(&env, "10.244.1.5"), "a1");
    // Nothing more can be done with it.
    let (msg, _) = migrate_fails(&env, &["release", "--id", "m1"], 1, "bad_phase");
    assert!(msg.contains("migration m1 is aborted"), "{msg}");
}

#[test]
fn an_abort_the_agents_do_not_apply_needs_attention_exit_4() {
    let env = Env::new(500);
    let _d = env.start();
    setup(&env);
    // b1 (the destination) applies the prepare, then fails: the automatic abort must be
    // applied by it too, and is not.
    let _agents = agents(
        &env,
        &[
            ("a1", Behaviour::Apply),
            ("b1", Behaviour::FailFrom(MigrationPhase::Frozen)),
            ("gw", Behaviour::Apply),
        ],
    );
    migrate_ok(
        &env,
        &["prepare", "--container", "10.244.1.5", "--to", "b1"],
    );
    let (msg, v) = migrate_fails(
        &env,
        &["freeze", "--container", "10.244.1.5", "--timeout-ms", "300"],
        4,
        "needs_attention",
    );
    assert!(
        msg.contains("the gateway aborted the migration")
            && msg.contains("did not apply the abort within 300 ms: b1"),
        "{msg}"
    );
    let f = &v["error"]["migration"];
    assert_eq!(f["migration"]["phase"], "aborted");
    assert_eq!(f["rollback_lagging"][0]["host"], "b1", "{v}");
}

#[test]
fn a_release_the_agents_do_not_apply_needs_attention_exit_4() {
    let env = Env::new(500);
    let _d = env.start();
    setup(&env);
    let _agents = agents(
        &env,
        &[
            ("a1", Behaviour::Apply),
            ("b1", Behaviour::FailFrom(MigrationPhase::Released)),
            ("gw", Behaviour::Apply),
        ],
    );
    migrate_ok(
        &env,
        &["prepare", "--container", "10.244.1.5", "--to", "b1"],
    );
    migrate_ok(&env, &["freeze", "--container", "10.244.1.5"]);
    let (msg, v) = migrate_fails(
        &env,
        &[
            "release",
            "--container",
            "10.244.1.5",
            "--timeout-ms",
            "300",
        ],
        4,
        "needs_attention",
    );
    assert!(
        msg.contains("the endpoint is on b1 now") && msg.contains("A release is not rolled back"),
        "{msg}"
    );
    // No rollback after a release: it stays released, the endpoint on b1.
    assert_eq!(v["error"]["migration"]["migration"]["phase"], "released");
    assert_eq!(endpoint_host(&env, "10.244.1.5"), "b1");
    let (msg, _) = migrate_fails(&env, &["abort", "--id", "m1"], 1, "bad_phase");
    assert!(
        msg.contains("too late to abort; migrate back instead"),
        "{msg}"
    );
}

#[test]
fn out_of_order_and_repeated_steps() {
    let env = Env::new(500);
    let _d = env.start();
    setup(&env);
    let _agents = agents(&env, &all_apply());

    // Refusals before anything exists.
    migrate_fails(
        &env,
        &["prepare", "--container", "10.244.9.9", "--to", "b1"],
        1,
        "unknown_endpoint",
    );
    migrate_fails(
        &env,
        &["prepare", "--container", "10.244.1.5", "--to", "zz"],
        1,
        "unknown_host",
    );
    let (msg, _) = migrate_fails(
        &env,
        &["prepare", "--container", "10.244.1.5", "--to", "a1"],
        1,
        "bad_request",
    );
    assert!(msg.contains("already on host a1"), "{msg}");
    let (msg, _) = migrate_fails(
        &env,
        &["freeze", "--container", "10.244.1.5"],
        1,
        "unknown_migration",
    );
    assert!(
        msg.contains("container 10.244.1.5 has no migration"),
        "{msg}"
    );
    migrate_fails(&env, &["freeze", "--id", "m7"], 1, "unknown_migration");

    let first = migrate_ok(
        &env,
        &["prepare", "--container", "10.244.1.5", "--to", "b1"],
    );
    let version = env.version();
    let file = read(&env.state_file());
    // The same prepare again: 200, unchanged, same version.
    let again = migrate_ok(
        &env,
        &["prepare", "--container", "10.244.1.5", "--to", "b1"],
    );
    assert_eq!(again["changed"], false);
    assert_eq!(again["migration"], first["migration"]);
    assert_eq!(again["version"], first["version"]);
    // Out of order, conflicts: exit 1, nothing changed.
    let (msg, _) = migrate_fails(
        &env,
        &["release", "--container", "10.244.1.5"],
        1,
        "bad_phase",
    );
    assert_eq!(msg, "migration m1 is prepared: freeze it before release");
    let (msg, _) = migrate_fails(
        &env,
        &["prepare", "--container", "10.244.1.5", "--to", "gw"],
        1,
        "conflict",
    );
    assert!(msg.contains("migration m1 (prepared, a1 → b1)"), "{msg}");
    let e = env.fails(&["endpoint", "rm", "10.244.1.5"], "conflict");
    assert!(
        e.contains("endpoint 10.244.1.5 is being migrated (migration m1"),
        "{e}"
    );
    let e = env.fails(&["endpoint", "rm", "10.244.1.5"], "conflict");
    assert!(e.contains("abort or finish the migration first"), "{e}");
    let (s, v) = api(env.addr, "DELETE", "/v1/hosts/b1", None);
    assert_eq!((s, &v["error"]["code"]), (409, &json!("conflict")), "{v}");
    assert_eq!(env.version(), version);
    assert_eq!(read(&env.state_file()), file);

    // freeze by id, twice.
    let v = migrate_ok(&env, &["freeze", "--id", "m1"]);
    assert_eq!(
        (v["changed"].clone(), v["version"].clone()),
        (json!(true), json!(version + 2))
    );
    let v = migrate_ok(&env, &["freeze", "--container", "10.244.1.5"]);
    assert_eq!(v["changed"], false);
    assert_eq!(v["version"], version + 2);
    assert_eq!(v["hosts"], json!(["a1", "b1", "gw"]));
    let (msg, _) = migrate_fails(
        &env,
        &["prepare", "--container", "10.244.1.5", "--to", "b1"],
        1,
        "bad_phase",
    );
    assert!(msg.contains("migration m1 is frozen"), "{msg}");

    migrate_ok(&env, &["release", "--container", "10.244.1.5"]);
    let version = env.version();
    let (msg, _) = migrate_fails(
        &env,
        &["freeze", "--container", "10.244.1.5"],
        1,
        "bad_phase",
    );
    assert!(msg.contains("migration m1 is released"), "{msg}");
    let (msg, _) = migrate_fails(
        &env,
        &["abort", "--container", "10.244.1.5"],
        1,
        "bad_phase",
    );
    assert_eq!(
        msg,
        "migration m1 is released: too late to abort; migrate back instead"
    );
    let v = migrate_ok(&env, &["release", "--container", "10.244.1.5"]);
    assert_eq!(v["changed"], false);
    assert_eq!(env.version(), version);

    // Abort is repeatable too; --json with a usage error still exits 2.
    migrate_ok(
        &env,
        &["prepare", "--container", "10.244.2.5", "--to", "a1"],
    );
    let v = migrate_ok(&env, &["abort", "--container", "10.244.2.5"]);
    assert_eq!(
        (v["changed"].clone(), v["migration"]["phase"].clone()),
        (json!(true), json!("aborted"))
    );
    let v = migrate_ok(&env, &["abort", "--container", "10.244.2.5"]);
    assert_eq!(v["changed"], false);
    for bad in [
        &["migrate", "freeze"][..],
        &[
            "migrate",
            "freeze",
            "--id",
            "m1",
            "--container",
            "10.244.1.5",
        ],
        &["migrate", "abort", "--id", "m1", "--timeout-ms", "0"],
    ] {
        let out = env.ferry(bad);
        assert_eq!(out.status.code(), Some(2), "{bad:?}");
    }

    // The HTTP side of refusals.
    for (method, path, body, status, code) in [
        ("GET", "/v1/migrations/m99", None, 404, "unknown_migration"),
        ("POST", "/v1/migrations/m1/bogus", None, 404, "not_found"),
        (
            "POST",
            "/v1/migrations?timeout_ms=0",
            Some(r#"{"container":"10.244.1.5","to":"a1"}"#),
            400,
            "bad_request",
        ),
        (
            "POST",
            "/v1/migrations?wait=1",
            Some(r#"{"container":"10.244.1.5","to":"a1"}"#),
            400,
            "bad_request",
        ),
        (
            "POST",
            "/v1/migrations",
            Some(r#"{"container":"10.244.1.5","to":"a1","from":"b1"}"#),
            400,
            "bad_request",
        ),
        (
            "POST",
            "/v1/migrations/m1/freeze?timeout_ms=600001",
            None,
            400,
            "bad_request",
        ),
    ] {
        let (s, v) = api(env.addr, method, path, body);
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (status, Some(code)),
            "{method} {path}: {v}"
        );
    }
    let (s, v) = api(env.addr, "GET", "/v1/migrations?container=10.244.2.5", None);
    assert_eq!(s, 200);
    assert_eq!(v.as_array().unwrap().len(), 1);
    let (_, v) = api(env.addr, "GET", "/v1/migrations?active=true", None);
    assert_eq!(v, json!([]));
}

#[test]
fn a_restart_mid_migration_keeps_it_and_release_works_after() {
    let env = Env::new(500);
    let d = env.start();
    setup(&env);
    let agents = agents(&env, &all_apply());
    migrate_ok(
        &env,
        &["prepare", "--container", "10.244.1.5", "--to", "b1"],
    );
    let frozen = migrate_ok(&env, &["freeze", "--container", "10.244.1.5"]);
    let version = env.version();
    assert!(d.terminate().success());

    let d = env.start();
    assert_eq!(env.version(), version);
    let st = migrate_ok(&env, &["status"]);
    assert_eq!(st, json!([frozen["migration"]]));
    assert_eq!(snapshot(&env).migrations[0].phase, MigrationPhase::Frozen);
    // The agents re-sync through their watch; the orchestrator continues.
    for a in &agents {
        wait_until("agents to re-sync", || a.applied() >= version);
    }
    let v = migrate_ok(&env, &["release", "--container", "10.244.1.5"]);
    assert_eq!(v["migration"]["phase"], "released");
    assert_eq!(v["version"], version + 1);
    assert_eq!(endpoint_host(&env, "10.244.1.5"), "b1");

    // A prepared one survives a restart too, and can be aborted after it.
    migrate_ok(
        &env,
        &["prepare", "--container", "10.244.2.5", "--to", "gw"],
    );
    assert!(d.terminate().success());
    let _d = env.start();
    let v = migrate_ok(&env, &["abort", "--container", "10.244.2.5"]);
    assert_eq!(v["migration"]["phase"], "aborted");
    assert_eq!(endpoint_host(&env, "10.244.2.5"), "b1");
    let ids: Vec<String> = migrate_ok(&env, &["status", "--all"])
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["m1", "m2"]);
}

#[test]
fn migrate_help_documents_the_exit_codes() {
    let env = Env::new(500);
    for args in [&["migrate", "--help"][..], &["migrate", "freeze", "--help"]] {
        let out = env.ferry(args);
        assert!(out.status.success());
        let text = String::from_utf8(out.stdout).unwrap();
        for want in [
            "Exit codes:",
            "3  failed, rolled back",
            "4  failed, needs attention",
        ] {
            assert!(text.contains(want), "{args:?}: {text}");
        }
    }
}
