//! Several gateways on one etcd, in a lab (topology `etcd` and `extra_gateways`): three etcd
//! members (one per cloud), the main gateway on gw and a second one on b1. b1's agent watches
//! the gateway of its own cloud, the others the main one; changes made through either reach
//! every agent, a migration step driven by the main gateway waits for b1's agent through what
//! b1's gateway publishes, a run driven by b1's gateway gets the progress of a source that
//! follows the main one, and when b1's gateway dies its agent carries on with the main one.
//! The same change sent through both at once wins once; with etcd unreachable both refuse
//! changes and still serve reads.

use std::{net::Ipv4Addr, time::Duration};

use ferry_lab::{LabOptions, Topology, control::ControlPlane};
use ferry_tests::{agents_lab, require_root_and_tools, wait_for};

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

/// `host` as `cp`'s gateway sees it: (applied version, connected).
fn seen(lab: &ferry_lab::Lab, cp: &ControlPlane, host: &'static str) -> Option<(u64, bool)> {
    let hosts = lab
        .api_at(cp, |c| async move { c.hosts().await })
        .ok()?
        .ok()?;
    hosts
        .into_iter()
        .find(|h| h.info.name == host)
        .map(|h| (h.applied_version, h.connected))
}

fn version(lab: &ferry_lab::Lab, cp: &ControlPlane) -> Option<u64> {
    lab.api_at(cp, |c| async move { c.version().await })
        .ok()?
        .ok()
}

/// The lab of these tests: etcd (three members), the main gateway on gw and a second on b1,
/// agents running; with both gateways' control planes.
fn two_gateways() -> (ferry_lab::Lab, ControlPlane, ControlPlane) {
    let lab = agents_lab(LabOptions {
        topology: Topology {
            etcd: true,
            extra_gateways: vec!["b1".into()],
            ..Topology::default()
        },
        ..LabOptions::default()
    });
    let main = lab.control().unwrap();
    let b1gw = lab.extra_gateway("b1").unwrap();
    (lab, main, b1gw)
}

/// Waits until both gateways serve one version.
fn same_version(lab: &ferry_lab::Lab, main: &ControlPlane, b1gw: &ControlPlane) {
    wait_for(
        "both gateways at one version",
        Duration::from_secs(20),
        || {
            let v = version(lab, main)?;
            (version(lab, b1gw)? == v).then_some(())
        },
    );
}

#[test]
fn agents_follow_the_gateway_of_their_cloud_and_carry_on_when_it_dies() {
    if !require_root_and_tools(&["ip", "nft", "etcd", "criu"]) {
        return;
    }
    let (mut lab, main, b1gw) = two_gateways();
    let link = ControlPlane::agent_link(lab.prefix(), lab.topology(), "b1").unwrap();
    assert_eq!(
        link.address, b1gw.api,
        "b1's agent uses its own cloud's gateway"
    );
    assert_eq!(link.fallbacks, vec![main.api]);

    // b1's agent watches b1's gateway; the main gateway learns of it through etcd.
    wait_for(
        "b1's gateway serves b1's agent",
        Duration::from_secs(20),
        || seen(&lab, &b1gw, "b1").filter(|(_, c)| *c),
    );
    wait_for(
        "the main gateway sees b1's agent connected (through b1's gateway)",
        Duration::from_secs(20),
        || seen(&lab, &main, "b1").filter(|(_, c)| *c),
    );

    // A change through the main gateway reaches b1's agent through b1's gateway: `ferry
    // sync` on the main gateway waits for every agent, b1's included.
    let c = ip("10.244.1.10");
    lab.add_container("a1", c).unwrap();
    let v = version(&lab, &main).unwrap();
    assert_eq!(seen(&lab, &b1gw, "b1").map(|s| s.0), Some(v));

    // A migration driven by the main gateway: each step waits for b1's agent, which reports
    // to b1's gateway only.
    for step in [
        vec![
            "migrate",
            "prepare",
            "--container",
            "10.244.1.10",
            "--to",
            "b1",
        ],
        vec!["migrate", "freeze", "--container", "10.244.1.10"],
        vec!["migrate", "release", "--container", "10.244.1.10"],
    ] {
        lab.ferry_json(&step)
            .unwrap_or_else(|e| panic!("ferry {step:?}: {e}"));
    }
    assert_eq!(lab.endpoint_host(c).unwrap(), "b1");
    assert!(lab.container_netns("b1", c).exists());

    // A whole-container run driven by b1's gateway: the source, a1's agent, follows the main
    // gateway, which does not hold the run; the agent's progress goes on to b1's gateway,
    // which writes it into the run's report.
    let c3 = ip("10.244.1.30");
    lab.add_container("a1", c3).unwrap();
    lab.start_process(c3, &["/bin/sleep", "1000"]).unwrap();
    let req: ferry_api::run::RunRequest =
        serde_json::from_value(serde_json::json!({"container": c3, "to": "a2"})).unwrap();
    let id = lab
        .api_at(&b1gw, move |c| async move { c.start_run(&req).await })
        .unwrap()
        .unwrap_or_else(|e| panic!("run through b1's gateway: {e}"))
        .id;
    let report = wait_for(
        "the run driven by b1's gateway ends",
        Duration::from_secs(120),
        || {
            let id = id.clone();
            lab.api_at(&b1gw, move |c| async move { c.run(&id).await })
                .ok()?
                .ok()
                .filter(|r| r.state.finished())
        },
    );
    assert_eq!(
        report.state,
        ferry_api::run::RunState::Released,
        "{report:?}\nagent log: {}",
        lab.agent_log("a1").display()
    );
    assert!(
        report
            .events
            .iter()
            .any(|e| e.kind == "phase" && e.message.starts_with("dump:")),
        "the source's dump event reached the driving gateway: {:?}",
        report.events
    );
    assert_eq!(lab.endpoint_host(c3).unwrap(), "a2");

    // b1's gateway dies: b1's agent moves to the main gateway, and changes still reach it.
    lab.kill_extra_gateway("b1", libc::SIGKILL).unwrap();
    let c2 = ip("10.244.2.20");
    lab.add_container("b1", c2).unwrap();
    wait_for(
        "the main gateway serves b1's agent itself",
        Duration::from_secs(20),
        || {
            let v = version(&lab, &main)?;
            lab.api_at(&main, |c| async move { c.hosts().await })
                .ok()?
                .ok()?
                .into_iter()
                .find(|h| h.info.name == "b1" && h.applied_version == v && h.connected)
        },
    );

    // Back: b1's gateway reads the registry from etcd and serves the same version.
    lab.start_extra_gateway("b1").unwrap();
    let v = version(&lab, &main).unwrap();
    assert_eq!(version(&lab, &b1gw), Some(v));
    let endpoints = lab
        .api_at(&b1gw, |c| async move { c.endpoints().await })
        .unwrap()
        .unwrap();
    assert!(endpoints.iter().any(|e| e.ip == c2 && e.host == "b1"));
    lab.down().unwrap();
}

/// Two hosts facing the internet (topology `Topology::two_public_gateways`: gw, and gw2
/// standing by on the same segment, a gateway daemon on each, the registry on etcd). gw is
/// powered off (its processes SIGKILLed, its interfaces down) while an internet client holds a
/// connection to a public address: gw2 hears gw fall silent, takes the internet side over
/// through the registry, announces the public address; the agents send the containers'
/// traffic out through gw2. The client's connection carries on, every byte in order, and a
/// new connection is answered through gw2. The same over IPv6 (the containers' own addresses,
/// routed from the internet): gw2 takes over the next hop the internet routes them to.
#[test]
fn a_gateway_host_powered_off_hands_the_public_side_to_the_standby() {
    use std::net::SocketAddrV4;

    use ferry_tests::{
        counters, delta,
        net::{EchoServer, echo_roundtrip, pattern, tcp_connect, tcp_echo},
    };
    if !require_root_and_tools(&["ip", "nft", "etcd"]) {
        return;
    }
    let mut lab = agents_lab(LabOptions {
        topology: Topology::two_public_gateways(),
        ..LabOptions::default()
    });
    let public = SocketAddrV4::new(ip("203.0.113.130"), 7000);
    let c = ip("10.244.1.10");
    let ns = lab.add_container("a1", c).unwrap();
    lab.ferry_json(&[
        "public",
        "add",
        "--public",
        "203.0.113.130",
        "--container",
        "10.244.1.10",
    ])
    .unwrap();
    lab.sync().unwrap();
    let _srv = EchoServer::start(&ns, 7000).unwrap();
    let inet = lab.netns(ferry_lab::INET);
    let before_gw2 = counters(&lab, "gw2");
    let mut conn = tcp_connect(&inet, public, Duration::from_secs(5)).unwrap();
    echo_roundtrip(&mut conn, &pattern(10_000, 1)).unwrap();
    // IPv6: the container's own address, routed from the internet (public6) through the next
    // hop the host facing the internet holds (`public6_next_hop`).
    let public6 = std::net::SocketAddr::new(
        ferry_config::overlay_ipv6(
            lab.topology()
                .overlay6_cidr
                .expect("the default lab is dual-stack"),
            c,
        )
        .into(),
        7000,
    );
    let mut conn6 = tcp_connect(&inet, public6, Duration::from_secs(5)).unwrap();
    echo_roundtrip(&mut conn6, &pattern(10_000, 4)).unwrap();
    let gw = counters(&lab, "gw");
    let gw2 = counters(&lab, "gw2");
    assert!(gw["public_dnat"] > 0, "the client talks through gw: {gw:?}");
    assert_eq!(
        delta(&before_gw2, &gw2, "public_dnat"),
        0,
        "not through gw2 yet"
    );
    assert!(
        delta(&before_gw2, &gw2, "public_standby_arp") >= 1,
        "gw2 heard the client's ARP and left it to gw"
    );

    let facing = |lab: &ferry_lab::Lab, cp: &ControlPlane| {
        let hosts = lab
            .api_at(cp, |c| async move { c.hosts().await })
            .unwrap()
            .unwrap();
        ferry_api::public_gateway(hosts.iter().map(|h| &h.info)).map(|h| h.name.clone())
    };
    let gw2_gateway = lab.extra_gateway("gw2").unwrap();
    assert_eq!(facing(&lab, &gw2_gateway).as_deref(), Some("gw"));
    // Bad takeovers are refused and change nothing.
    for (args, want) in [
        (
            ["--host", "a1", "--from", "gw"],
            "does not have role gateway",
        ),
        (["--host", "gw2", "--from", "b1"], "gw faces it"),
        (["--host", "nope", "--from", "gw"], "not registered"),
    ] {
        let out = lab
            .ferry(&[&["public", "takeover"][..], &args[..]].concat())
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(want),
            "{args:?}: {err}"
        );
    }
    assert_eq!(facing(&lab, &gw2_gateway).as_deref(), Some("gw"));

    // Steady state: every agent has heard the gateway-role hosts.
    lab.wait_public_heartbeats(&["gw2", "a1", "a2", "b1"], Duration::from_secs(20))
        .unwrap();

    let t0 = std::time::Instant::now();
    let killed = lab.power_off("gw").unwrap();
    assert!(killed.contains(&"agent".to_owned()), "{killed:?}");
    // The same connection: every byte back, in order (the socket's read timeout is 10 s).
    echo_roundtrip(&mut conn, &pattern(10_000, 2)).expect("the connection survives gw");
    let took = t0.elapsed();
    eprintln!("first round trip after powering gw off: {took:?}");
    if took > Duration::from_secs(2) {
        // Slow: say why (the agents' view of the failover).
        for h in ["gw2", "a1"] {
            let log = std::fs::read_to_string(lab.agent_log(h)).unwrap_or_default();
            for l in log.lines().filter(|l| {
                [
                    "public failover",
                    "egress gateway",
                    "another gateway",
                    "heartbeat",
                ]
                .iter()
                .any(|k| l.contains(k))
            }) {
                eprintln!("{h}: {l}");
            }
        }
    }
    echo_roundtrip(&mut conn, &pattern(100_000, 3)).expect("and goes on");
    // The IPv6 connection too: gw2 took the next hop over and announced it.
    let t6 = std::time::Instant::now();
    echo_roundtrip(&mut conn6, &pattern(10_000, 5)).expect("the IPv6 connection survives gw");
    eprintln!(
        "IPv6 round trip after the IPv4 one: {:?} (since power-off {:?})",
        t6.elapsed(),
        t0.elapsed()
    );
    // The registry records that gw2 faces the internet (the traffic did not wait for it: an
    // etcd leader that died with gw delays the record by an election); gw2 translates both
    // ways now.
    ferry_tests::wait_for(
        "the registry to say gw2 faces the internet",
        Duration::from_secs(30),
        || (facing(&lab, &gw2_gateway).as_deref() == Some("gw2")).then_some(()),
    );
    let after = counters(&lab, "gw2");
    assert!(delta(&gw2, &after, "public_dnat") > 0, "{after:?}");
    assert!(delta(&gw2, &after, "public_snat") > 0, "{after:?}");
    let won = lab.agent_metric(
        "gw2",
        "ferry_public_failover_total{host=\"gw2\",event=\"takeover_won\"}",
    );
    assert!(won.is_some_and(|n| n >= 1), "takeovers won by gw2: {won:?}");
    // A new connection, answered through gw2, over both families.
    tcp_echo(&inet, public, 50_000).expect("a new connection through gw2");
    tcp_echo(&inet, public6, 50_000).expect("a new IPv6 connection through gw2");
    let routed6 = counters(&lab, "gw2");
    assert!(delta(&after, &routed6, "public6_routed") > 0, "{routed6:?}");
    drop(conn);
    drop(conn6);
    lab.down().unwrap();
}

/// Adds endpoint `ip` on `host` through `cp`'s gateway.
fn add(
    lab: &ferry_lab::Lab,
    cp: &ControlPlane,
    ip: Ipv4Addr,
    host: &'static str,
) -> Result<Vec<ferry_api::Endpoint>, ferry_api::ApiError> {
    lab.api_at(cp, move |c| async move {
        c.add_endpoints(&[ferry_api::EndpointSpec {
            ip,
            host: host.into(),
            mac: None,
        }])
        .await
    })
    .unwrap()
}

/// The host of endpoint `ip` as `cp`'s gateway serves it.
fn endpoint_on(lab: &ferry_lab::Lab, cp: &ControlPlane, ip: Ipv4Addr) -> Option<String> {
    lab.api_at(cp, |c| async move { c.endpoints().await })
        .unwrap()
        .unwrap()
        .into_iter()
        .find(|e| e.ip == ip)
        .map(|e| e.host)
}

/// Two gateways on one etcd, the same change sent to both at once: one wins, the other is
/// refused, and both then serve the winner's version. Then the main gateway is cut off from
/// etcd (alive): it refuses changes as `cut_off`, clients and agents move to the other one,
/// and it catches up once the cut ends. Then etcd is unreachable (every member killed): a
/// change through either gateway is refused (`store_unavailable` or `cut_off`, "not
/// applied"), reads are still served from what each gateway holds, and once the members are
/// back the refused change is nowhere.
#[test]
fn a_conflicting_change_wins_once_and_an_unreachable_store_refuses_changes() {
    if !require_root_and_tools(&["ip", "nft", "etcd"]) {
        return;
    }
    let (mut lab, main, b1gw) = two_gateways();
    // etcd answers TLS only, and only to certificates of its own CA: not plain HTTP, not an
    // agent's identity (the lab's CA), but the gateways' etcd identity.
    let (member_host, member) = ferry_lab::control::etcd_members(lab.topology())[0].clone();
    let ns = lab.netns(&member_host);
    let health = |tls: Option<std::sync::Arc<rustls::ClientConfig>>| {
        let ns = ns.clone();
        ferry_overlay::netns::run_in(&ns, move || {
            let r = ferry_api::transport::Request::get("/health");
            let r = match tls {
                Some(t) => r.tls(Some(t)),
                None => r.plain(),
            };
            r.timeout(Duration::from_secs(3))
                .send_blocking(member)
                .map(|a| a.status)
        })
        .unwrap()
    };
    let agent = main
        .client_tls(ferry_lab::control::Party::Host("a1"))
        .unwrap()
        .expect("the lab speaks TLS");
    assert!(
        health(None).is_ok_and(|s| s != 200) || health(None).is_err(),
        "plain HTTP refused"
    );
    assert!(
        health(Some(agent)).is_err(),
        "an agent's certificate is refused"
    );
    assert_eq!(
        health(lab.etcd_client_tls().unwrap()).ok(),
        Some(200),
        "the gateways' etcd identity is served"
    );
    // Both gateways know both hosts (b1's learns a1's and a2's registrations from etcd).
    wait_for(
        "both gateways know a1 and a2",
        Duration::from_secs(20),
        || {
            [&main, &b1gw]
                .iter()
                .all(|cp| seen(&lab, cp, "a1").is_some() && seen(&lab, cp, "a2").is_some())
                .then_some(())
        },
    );
    for i in 0..8u8 {
        let ip = Ipv4Addr::new(10, 244, 9, 10 + i);
        // The same address for a1 through the main gateway and for a2 through b1's, at once.
        let (a, b) = std::thread::scope(|s| {
            let a = s.spawn(|| add(&lab, &main, ip, "a1"));
            let b = s.spawn(|| add(&lab, &b1gw, ip, "a2"));
            (a.join().unwrap(), b.join().unwrap())
        });
        let winner = match (&a, &b) {
            (Ok(_), Err(e)) | (Err(e), Ok(_)) => {
                assert_eq!(
                    e.code(),
                    Some("duplicate_endpoint"),
                    "round {i}: the loser is refused by name: {e}"
                );
                if a.is_ok() { "a1" } else { "a2" }
            }
            other => panic!("round {i}: want exactly one winner, got {other:?}"),
        };
        same_version(&lab, &main, &b1gw);
        for cp in [&main, &b1gw] {
            assert_eq!(
                endpoint_on(&lab, cp, ip).as_deref(),
                Some(winner),
                "round {i}: {} serves the winner",
                cp.host
            );
        }
    }

    // The main gateway cut off from etcd (alive and answering; its host's member loses its
    // peers): once it counts its lease as lapsed it refuses changes at once (`cut_off`, not
    // applied), a client that knows both gateways gets its change made through b1's, the
    // agents that followed it follow b1's, and reads from it are what it holds.
    lab.cut_from_etcd(&main.host, true).unwrap();
    let probe = ip("10.244.9.51");
    let e = wait_for(
        "the cut-off gateway refuses changes as cut_off",
        Duration::from_secs(30),
        || match add(&lab, &main, probe, "a1") {
            Err(e) if e.code() == Some("cut_off") => Some(e),
            _ => None,
        },
    );
    assert!(e.to_string().contains("not applied"), "a clear error: {e}");
    let moved = ip("10.244.9.50");
    let made = lab
        .api(move |c| async move {
            c.add_endpoints(&[ferry_api::EndpointSpec {
                ip: moved,
                host: "a1".into(),
                mac: None,
            }])
            .await
        })
        .unwrap()
        .expect("a client with both gateways: made through b1's");
    assert_eq!(made[0].host, "a1");
    let v_moved = version(&lab, &b1gw).unwrap();
    assert_eq!(endpoint_on(&lab, &b1gw, moved).as_deref(), Some("a1"));
    assert_eq!(endpoint_on(&lab, &main, moved), None, "gw cannot know it");
    // a1's agent watched gw: it follows b1's gateway now, and applied the change.
    wait_for(
        "a1's agent applies, through b1's gateway, a change gw cannot see",
        Duration::from_secs(30),
        || seen(&lab, &b1gw, "a1").filter(|(v, c)| *c && *v >= v_moved),
    );
    lab.cut_from_etcd(&main.host, false).unwrap();
    same_version(&lab, &main, &b1gw);
    assert_eq!(endpoint_on(&lab, &main, moved).as_deref(), Some("a1"));
    assert_eq!(
        endpoint_on(&lab, &main, probe),
        None,
        "the refused change never happened"
    );

    // etcd unreachable (every member gone): changes refused, reads served.
    let members: Vec<String> = ferry_lab::control::etcd_members(lab.topology())
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    assert_eq!(members.len(), 3, "{members:?}");
    let v = version(&lab, &main).unwrap();
    for m in &members {
        lab.kill_etcd_member(m).unwrap();
    }
    let refused = ip("10.244.9.99");
    for cp in [&main, &b1gw] {
        let e = add(&lab, cp, refused, "a1").expect_err("a change without etcd");
        // Refused by etcd's client, or at once once the gateway counts itself cut off.
        assert!(
            matches!(e.code(), Some("store_unavailable" | "cut_off")),
            "{}: {e}",
            cp.host
        );
        assert!(e.to_string().contains("not applied"), "a clear error: {e}");
        // Reads are served from what the gateway holds.
        assert_eq!(version(&lab, cp), Some(v), "{} still answers", cp.host);
        assert_eq!(endpoint_on(&lab, cp, refused), None);
    }
    let names: Vec<&str> = members.iter().map(String::as_str).collect();
    lab.start_etcd_members(&names).unwrap();
    // Back: changes are taken again, and the refused one never happened.
    let after = ip("10.244.9.100");
    wait_for(
        "a change taken once the quorum is back",
        Duration::from_secs(60),
        || add(&lab, &main, after, "a1").ok(),
    );
    same_version(&lab, &main, &b1gw);
    for cp in [&main, &b1gw] {
        assert_eq!(
            endpoint_on(&lab, cp, refused),
            None,
            "{}: nothing half-applied",
            cp.host
        );
        assert_eq!(endpoint_on(&lab, cp, after).as_deref(), Some("a1"));
    }
    lab.down().unwrap();
}
