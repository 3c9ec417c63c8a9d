//! Gateways on a real etcd cluster (three members of Debian's etcd-server on loopback): two
//! gateways serve one registry; the same conflicting change sent to both wins once; a member
//! lost changes nothing; etcd unreachable refuses changes and keeps reads; a file store moves
//! into etcd with one command.

mod common;

use std::{
    sync::{Arc, Barrier},
    time::{Duration, Instant},
};

use common::{Env, block, etcd::Cluster};
use ferry_api::{EndpointSpec, WatchUpdate};

fn ep(ip: &str, host: &str) -> EndpointSpec {
    EndpointSpec {
        ip: ip.parse().unwrap(),
        host: host.into(),
        mac: None,
    }
}

fn gateway_on(cluster: &Cluster) -> Env {
    Env::with_extra(30_000, &format!("store = \"{}\"", cluster.store()))
}

/// Waits (at most 20 s) until `env` serves `version`.
#[track_caller]
fn wait_version(env: &Env, version: u64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let v = env.version();
        if v >= version {
            assert_eq!(v, version, "went past {version}");
            return;
        }
        assert!(
            Instant::now() < deadline,
            "gateway {} stuck at version {v}, want {version}",
            env.addr
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn endpoints(env: &Env) -> Vec<(String, String)> {
    block(env.client().endpoints())
        .unwrap()
        .into_iter()
        .map(|e| (e.ip.to_string(), e.host))
        .collect()
}

#[test]
fn two_gateways_share_one_registry_and_a_conflicting_change_wins_once() {
    if !common::etcd::require_etcd() {
        return;
    }
    let cluster = Cluster::start(3);
    let (a, b) = (gateway_on(&cluster), gateway_on(&cluster));
    let (_da, _db) = (a.start(), b.start());

    // Made through A, served by B; B's watchers get it as a delta.
    a.register_hosts();
    let v = a.version();
    wait_version(&b, v);
    let before = block(b.client().watch("a1", 0, Duration::from_secs(30))).unwrap();
    assert_eq!(before.version, v);
    let watcher = {
        let c = b.client();
        std::thread::spawn(move || block(c.watch_update("a1", v, Duration::from_secs(30))))
    };
    block(a.client().add_endpoints(&[ep("10.244.1.5", "a1")])).unwrap();
    let WatchUpdate::Delta(d) = watcher.join().unwrap().unwrap() else {
        panic!("B's watcher at a version B logged gets a delta");
    };
    assert_eq!((d.from, d.version), (v, v + 1));
    assert_eq!(d.endpoints.len(), 1, "{d:?}");
    assert_eq!(d.endpoints[0].ip.to_string(), "10.244.1.5");
    // What B knows of the agents it serves reaches A (a migration step A drives waits for
    // agents that watch B): a1 reported version v applied to B.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let hosts = block(a.client().hosts()).unwrap();
        let a1 = hosts.iter().find(|h| h.info.name == "a1").unwrap();
        if a1.applied_version == v {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "A never learnt that a1 applied {v} through B: {a1:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // The same address for two containers, sent to both at the same instant: exactly one
    // wins, the other is refused by the registry's own rule, and both end the same.
    for round in 0..12u32 {
        let ip = format!("10.244.2.{}", 10 + round);
        let go = Arc::new(Barrier::new(2));
        let send = |env: &Env, host: &'static str| {
            let (c, go, ip) = (env.client(), go.clone(), ip.clone());
            std::thread::spawn(move || {
                go.wait();
                block(c.add_endpoints(&[ep(&ip, host)]))
            })
        };
        let (ta, tb) = (send(&a, "a1"), send(&b, "b1"));
        let (ra, rb) = (ta.join().unwrap(), tb.join().unwrap());
        assert!(
            ra.is_ok() != rb.is_ok(),
            "round {round}: exactly one wins: {ra:?} / {rb:?}"
        );
        let lost = ra.err().or(rb.err()).unwrap();
        assert_eq!(
            lost.code(),
            Some("duplicate_endpoint"),
            "round {round}: {lost}"
        );
        let va = a.version();
        wait_version(&b, va);
        assert_eq!(endpoints(&a), endpoints(&b), "round {round}");
        let owners = endpoints(&a).into_iter().filter(|(e, _)| *e == ip).count();
        assert_eq!(owners, 1, "round {round}: {ip} registered once");
    }

    let conflicts: f64 = [&a, &b]
        .iter()
        .map(|g| common::metric(g, "ferry_gateway_store_events_total{kind=\"conflict\"}"))
        .sum();
    let remote = common::metric(&b, "ferry_gateway_store_events_total{kind=\"remote\"}");
    assert!(remote >= 1.0, "B applied A's changes");
    eprintln!(
        "12 simultaneous conflicting changes: {conflicts} lost the version in etcd and were retried"
    );

    // A restarted gateway reads the registry back from etcd.
    let v = b.version();
    let want = endpoints(&b);
    drop(_da);
    let _da = a.start();
    assert_eq!(a.version(), v);
    assert_eq!(endpoints(&a), want);
}

#[test]
fn a_lost_member_stops_nothing_and_etcd_unreachable_refuses_changes_but_serves_reads() {
    if !common::etcd::require_etcd() {
        return;
    }
    let mut cluster = Cluster::start(3);
    let (a, b) = (gateway_on(&cluster), gateway_on(&cluster));
    let (_da, _db) = (a.start(), b.start());
    a.register_hosts();

    // One member of three killed (whichever the gateways talk to first): changes go on
    // through A and reach B.
    cluster.kill(0);
    for i in 0..5 {
        block(
            a.client()
                .add_endpoints(&[ep(&format!("10.244.1.{}", 20 + i), "a1")]),
        )
        .unwrap_or_else(|e| panic!("change {i} with a member down: {e}"));
    }
    wait_version(&b, a.version());
    assert_eq!(endpoints(&a), endpoints(&b));

    // No member left: a change is refused with a clear error and changes nothing; reads are
    // served from what the gateway holds.
    cluster.kill(1);
    cluster.kill(2);
    let (v, want) = (a.version(), endpoints(&a));
    let e = block(a.client().add_endpoints(&[ep("10.244.1.99", "a1")])).unwrap_err();
    assert_eq!(e.code(), Some("store_unavailable"), "{e}");
    assert!(e.to_string().contains("etcd unreachable"), "{e}");
    assert!(e.to_string().contains("not applied"), "{e}");
    assert_eq!(a.version(), v);
    assert_eq!(endpoints(&a), want, "reads are served");
    let watched = block(a.client().watch("a1", 0, Duration::from_secs(30))).unwrap();
    assert_eq!(watched.version, v);

    // etcd back: nothing half-applied, and changes go on.
    for i in 0..3 {
        cluster.restart(i);
    }
    cluster.wait_healthy(&[0, 1, 2]);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match block(b.client().add_endpoints(&[ep("10.244.1.98", "b1")])) {
            Ok(_) => break,
            Err(e) if e.code() == Some("store_unavailable") && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("after etcd came back: {e}"),
        }
    }
    wait_version(&a, v + 1);
    let now = endpoints(&a);
    assert!(
        !now.iter().any(|(ip, _)| ip == "10.244.1.99"),
        "the refused change is absent"
    );
    assert!(now.iter().any(|(ip, _)| ip == "10.244.1.98"));
}

#[test]
fn a_file_store_moves_into_etcd_with_one_command() {
    if !common::etcd::require_etcd() {
        return;
    }
    let file = Env::new(30_000);
    let d = file.start();
    file.register_hosts();
    block(
        file.client()
            .add_endpoints(&[ep("10.244.1.5", "a1"), ep("10.244.1.6", "b1")]),
    )
    .unwrap();
    let (v, want) = (file.version(), endpoints(&file));
    assert_eq!(d.terminate().code(), Some(0));

    let cluster = Cluster::start(1);
    let config = file.config.to_str().unwrap();
    let dir = file.state_dir.to_str().unwrap();
    let store = cluster.store();
    let out = file.ok(&[
        "gateway", "--config", config, "--store", &store, "--import", dir,
    ]);
    assert_eq!(out["version"], v, "{out}");
    assert_eq!(out["endpoints"], 2, "{out}");
    // Twice: refused, nothing written.
    let again = file.fails(
        &[
            "gateway", "--config", config, "--store", &store, "--import", dir,
        ],
        "import_failed",
    );
    assert!(again.contains("already holds a registry"), "{again}");

    let g = gateway_on(&cluster);
    let _dg = g.start();
    assert_eq!(g.version(), v);
    assert_eq!(endpoints(&g), want);
    block(g.client().add_endpoints(&[ep("10.244.1.7", "a1")])).unwrap();
    assert_eq!(g.version(), v + 1);
}
