//! Dual-stack containers in a real lab (the default topology is dual-stack: overlay
//! 10.244.0.0/16 and 2001:db8:f::/96, an endpoint's IPv6 address being the /96 followed by its
//! IPv4 address). IPv4 and IPv6, TCP and UDP, between containers on one host, across hosts and
//! across clouds; the internet client over IPv6 through the gateway, routed (the default) or
//! masqueraded; forged IPv6 sources dropped and counted.
use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    path::Path,
    time::Duration,
};

use ferry_lab::{Lab, LabOptions, Topology};
use ferry_tests::{
    counters, delta,
    net::{EchoServer, tcp_connect, tcp_echo, udp_echo},
    require_root_and_tools,
};

const TOOLS: &[&str] = &["ip", "nft"];
const PORT: u16 = 7000;

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

/// Endpoint `ip`'s IPv6 address in `lab`.
fn v6(lab: &Lab, ip: Ipv4Addr) -> Ipv6Addr {
    let prefix = lab
        .topology()
        .overlay6_cidr
        .expect("the default lab is dual-stack");
    ferry_config::overlay_ipv6(prefix, ip)
}

/// Echoes TCP (256 KiB) and UDP from `from` to `to` over both families; returns the two
/// addresses the server saw (IPv4, IPv6).
fn both_families(lab: &Lab, from: &Path, to: Ipv4Addr, server: &EchoServer) -> Vec<IpAddr> {
    let before = server.peers().len();
    for addr in [IpAddr::V4(to), IpAddr::V6(v6(lab, to))] {
        let sa = SocketAddr::new(addr, PORT);
        tcp_echo(from, sa, 256 << 10).unwrap_or_else(|e| panic!("TCP to {sa}: {e}"));
        udp_echo(from, sa, 1200).unwrap_or_else(|e| panic!("UDP to {sa}: {e}"));
    }
    let mut seen: Vec<IpAddr> = server.peers()[before..].iter().map(|p| p.ip()).collect();
    seen.dedup();
    seen
}

#[test]
fn dual_stack_containers_talk_over_both_families_on_one_host_across_hosts_and_clouds() {
    if !require_root_and_tools(TOOLS) {
        return;
    }
    let lab = ferry_tests::agents_lab(LabOptions::default());
    let (c1, c2, c3, c4) = (
        ip("10.244.1.10"),
        ip("10.244.1.11"),
        ip("10.244.1.20"),
        ip("10.244.2.10"),
    );
    let n1 = lab.add_container("a1", c1).unwrap();
    let n2 = lab.add_container("a1", c2).unwrap();
    let n3 = lab.add_container("a2", c3).unwrap();
    let n4 = lab.add_container("b1", c4).unwrap();
    lab.sync().unwrap();
    let servers: Vec<EchoServer> = [&n1, &n2, &n3, &n4]
        .iter()
        .map(|n| EchoServer::start(n, PORT).unwrap())
        .collect();
    let before = [counters(&lab, "a1"), counters(&lab, "b1")];

    // c1 → c2 (same host), c1 → c3 (another host, same cloud), c1 → c4 (another cloud), and
    // back: each server sees the client's own address of the family used (no translation).
    for (from, from_ip, to, server) in [
        (&n1, c1, c2, &servers[1]),
        (&n1, c1, c3, &servers[2]),
        (&n1, c1, c4, &servers[3]),
        (&n4, c4, c1, &servers[0]),
        (&n3, c3, c4, &servers[3]),
    ] {
        let seen = both_families(&lab, from, to, server);
        assert_eq!(
            seen,
            vec![IpAddr::V4(from_ip), IpAddr::V6(v6(&lab, from_ip))],
            "{from_ip} → {to}"
        );
    }
    let after = [counters(&lab, "a1"), counters(&lab, "b1")];
    assert!(delta(&before[0], &after[0], "container_to_local") > 0);
    assert!(delta(&before[0], &after[0], "container_encap") > 0);
    assert!(delta(&before[1], &after[1], "overlay_to_local") > 0);
    for reason in ["no_endpoint", "not_ipv4", "spoofed_source", "malformed"] {
        assert_eq!(
            delta(&before[0], &after[0], reason),
            0,
            "{reason} on a1: {after:?}"
        );
    }

    // c3 loses its gateway's permanent neighbour entry (a process inside flushed it): its
    // solicitation is answered by the datapath, as ARP is, and IPv6 goes on.
    let ndp_before = counters(&lab, "a2");
    lab.exec_in(&n3, &["ip", "-6", "neigh", "del", "fe80::1", "dev", "eth0"])
        .unwrap();
    udp_echo(&n3, SocketAddr::new(IpAddr::V6(v6(&lab, c4)), PORT), 300)
        .expect("IPv6 after the gateway's neighbour entry was deleted");
    assert!(delta(&ndp_before, &counters(&lab, "a2"), "ndp_reply") >= 1);
    let neigh = lab
        .exec_in(&n3, &["ip", "-6", "neigh", "show", "fe80::1"])
        .unwrap();
    let neigh = String::from_utf8_lossy(&neigh.stdout);
    assert!(neigh.contains("0e:fe:00:00:00:01"), "{neigh}");

    // Forged IPv6 sources from c1: another container's IPv6 address (c2's, on the same host),
    // and one outside the overlay's prefix. Each datagram is dropped at c1's veth and
    // counted; c4 sees nothing.
    let forged = [v6(&lab, c2), "2001:db8:9::1".parse().unwrap()];
    for f in forged {
        lab.exec_in(
            &n1,
            &[
                "ip",
                "-6",
                "addr",
                "add",
                &format!("{f}/128"),
                "dev",
                "eth0",
                "nodad",
            ],
        )
        .unwrap();
    }
    let seen_before = servers[3].peers().len();
    let spoofed_before = counters(&lab, "a1");
    for f in forged {
        let to = SocketAddr::new(IpAddr::V6(v6(&lab, c4)), PORT);
        let sock = ferry_overlay::netns::run_in(&n1, move || {
            UdpSocket::bind(SocketAddr::new(IpAddr::V6(f), 0))
        })
        .unwrap()
        .unwrap();
        for _ in 0..3 {
            sock.send_to(b"forged", to).unwrap();
        }
    }
    ferry_tests::wait_for(
        "six forged datagrams counted at a1",
        Duration::from_secs(10),
        || (delta(&spoofed_before, &counters(&lab, "a1"), "spoofed_source") >= 6).then_some(()),
    );
    // With the forged addresses gone again (they would win source address selection), c1's
    // own traffic flows, and c4 never saw a forged source.
    for f in forged {
        lab.exec_in(
            &n1,
            &[
                "ip",
                "-6",
                "addr",
                "del",
                &format!("{f}/128"),
                "dev",
                "eth0",
            ],
        )
        .unwrap();
    }
    udp_echo(&n1, SocketAddr::new(IpAddr::V6(v6(&lab, c4)), PORT), 100).unwrap();
    let late: Vec<IpAddr> = servers[3].peers()[seen_before..]
        .iter()
        .map(|p| p.ip())
        .collect();
    assert!(
        late.iter().all(|a| !forged.contains(&match a {
            IpAddr::V6(v) => *v,
            IpAddr::V4(_) => Ipv6Addr::UNSPECIFIED,
        })),
        "{late:?}"
    );
    drop(servers);
    lab.down().unwrap();
}

#[test]
fn the_internet_reaches_dual_stack_containers_over_ipv6_through_the_gateway() {
    if !require_root_and_tools(TOOLS) {
        return;
    }
    let lab = ferry_tests::agents_lab(LabOptions::default());
    let inet = lab.netns("inet");
    let client6 = lab
        .topology()
        .internet
        .as_ref()
        .and_then(|i| i.ipv6.as_ref())
        .expect("the default lab's internet speaks IPv6")
        .client;
    let (c1, c4) = (ip("10.244.1.10"), ip("10.244.2.10"));
    let n1 = lab.add_container("a1", c1).unwrap();
    let n4 = lab.add_container("b1", c4).unwrap();
    lab.sync().unwrap();
    let s1 = EchoServer::start(&n1, PORT).unwrap();
    let before = counters(&lab, "gw");

    // Inbound: the containers' IPv6 addresses are routed (public6), the client's address
    // arrives untouched.
    let sa = SocketAddr::new(IpAddr::V6(v6(&lab, c1)), PORT);
    tcp_echo(&inet, sa, 1 << 20).expect("internet → container, TCP over IPv6");
    udp_echo(&inet, sa, 1200).expect("internet → container, UDP over IPv6");
    assert!(
        s1.peers().iter().all(|p| p.ip() == IpAddr::V6(client6)),
        "{:?}",
        s1.peers()
    );
    // Outbound: the container's own IPv6 address reaches the internet (no masquerade).
    let s_inet = EchoServer::start(&inet, 9000).unwrap();
    let to = SocketAddr::new(IpAddr::V6(client6), 9000);
    tcp_echo(&n4, to, 64 << 10).expect("container → internet over IPv6");
    udp_echo(&n4, to, 500).expect("container → internet, UDP over IPv6");
    assert!(
        s_inet
            .peers()
            .iter()
            .all(|p| p.ip() == IpAddr::V6(v6(&lab, c4))),
        "{:?}",
        s_inet.peers()
    );
    // A container address nobody has, from the internet: dropped at the gateway, counted.
    let nobody = SocketAddr::new(IpAddr::V6(v6(&lab, ip("10.244.9.9"))), PORT);
    assert!(tcp_connect(&inet, nobody, Duration::from_millis(500)).is_err());
    let after = counters(&lab, "gw");
    assert!(delta(&before, &after, "public6_routed") > 10, "{after:?}");
    assert!(delta(&before, &after, "gateway_to_stack") > 10, "{after:?}");
    assert!(delta(&before, &after, "no_endpoint") >= 1, "{after:?}");
    lab.down().unwrap();
}

/// With `public6 = false` the gateway does not route the overlay's IPv6 from the internet
/// (dropped as `no_public6`) and masquerades containers' IPv6 behind its own address.
#[test]
fn without_public6_containers_ipv6_is_masqueraded_and_unreachable_from_the_internet() {
    if !require_root_and_tools(TOOLS) {
        return;
    }
    let mut topology = Topology::default_lab();
    topology.internet.as_mut().unwrap().public6 = false;
    let lab = ferry_tests::agents_lab(LabOptions {
        topology,
        ..LabOptions::default()
    });
    let inet = lab.netns("inet");
    let v6_inet = lab
        .topology()
        .internet
        .as_ref()
        .and_then(|i| i.ipv6.clone())
        .unwrap();
    let c1 = ip("10.244.1.10");
    let n1 = lab.add_container("a1", c1).unwrap();
    lab.sync().unwrap();
    let _s1 = EchoServer::start(&n1, PORT).unwrap();
    let before = counters(&lab, "gw");
    let sa = SocketAddr::new(IpAddr::V6(v6(&lab, c1)), PORT);
    assert!(
        tcp_connect(&inet, sa, Duration::from_millis(700)).is_err(),
        "the overlay's IPv6 is not routed from the internet"
    );
    assert!(delta(&before, &counters(&lab, "gw"), "no_public6") >= 1);

    let s_inet = EchoServer::start(&inet, 9000).unwrap();
    let to = SocketAddr::new(IpAddr::V6(v6_inet.client), 9000);
    tcp_echo(&n1, to, 64 << 10).expect("masqueraded container → internet over IPv6");
    udp_echo(&n1, to, 500).expect("masqueraded UDP over IPv6");
    assert!(
        s_inet
            .peers()
            .iter()
            .all(|p| p.ip() == IpAddr::V6(v6_inet.gateway_address)),
        "the internet sees the gateway's address: {:?}",
        s_inet.peers()
    );
    lab.down().unwrap();
}

/// A dual-stack container moved with CRIU (`ferry migrate run`) across clouds and back while
/// one client talks to it over IPv4 (through its public IPv4 address, translated) and one over
/// IPv6 (its own address, routed): both see every reply, no reset; the destination announced
/// the container's IPv6 address with unsolicited neighbour advertisements from its interface,
/// and a peer on the destination's L2 segment relearned it. That peer is the cloud's router
/// (its bridge `br-<cloud>` is the segment the hosts' underlay interfaces share; the lab's
/// agents relay containers' own announcements out of them, `announce_relay`): before each
/// move it caches the container's addresses at a stale MAC, and after it has them at the
/// container's MAC, the bridge's FDB at the destination's port.
#[test]
fn a_dual_stack_container_moves_with_criu_under_ipv4_and_ipv6_clients() {
    if !require_root_and_tools(&["ip", "ss", "criu", "nft", "bridge"]) {
        return;
    }
    let _machine = ferry_tests::machine_shared();
    let workload = ferry_tests::workspace_binary("ferry-workload");
    let lab = ferry_tests::agents_lab(LabOptions::default());
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
    lab.start_process(c, &[workload.to_str().unwrap(), "serve", "--port", "7000"])
        .expect("start the server");
    ferry_tests::workload::wait_listening(&lab, &ns, 7000);
    let client = |to: String| ferry_tests::workload::Workload::client(&lab.netns("inet"), &to, 3);
    let c4 = client("203.0.113.130:7000".to_owned());
    let c6 = client(format!("[{}]:7000", v6(&lab, c)));
    ferry_tests::keep_load_for(Duration::from_millis(500));

    let announced = |host: &str| announce_count(&lab, host, "neighbour_advert");
    let addr6 = v6(&lab, c);
    for to in ["b1", "a1"] {
        let segment = format!("br-{}", lab.host(to).unwrap().cloud);
        // The peer cached both addresses at a MAC nobody has.
        for addr in [IpAddr::V4(c), IpAddr::V6(addr6)] {
            router_neigh_replace(&lab, &segment, addr, STALE_MAC);
        }
        let na_before = announced(to);
        ferry_tests::migrate_run_ok(&lab, c, to);
        assert_eq!(lab.endpoint_host(c).unwrap(), to);
        // The destination announced the IPv6 address from the container's interface, on the
        // same schedule as the gratuitous ARP.
        ferry_tests::wait_for(
            &format!("{to} announced {c}'s IPv6 address"),
            Duration::from_secs(10),
            || (announced(to) > na_before).then_some(()),
        );
        let mac = container_mac(&lab, to, c);
        for addr in [IpAddr::V6(addr6), IpAddr::V4(c)] {
            ferry_tests::wait_for(
                &format!("the router relearns {addr} on {segment} at {mac}"),
                Duration::from_secs(10),
                || {
                    (router_neigh(&lab, &segment, addr).as_deref() == Some(mac.as_str()))
                        .then_some(())
                },
            );
        }
        assert_eq!(
            fdb_port(&lab, &segment, &mac).as_deref(),
            Some(format!("v-{to}").as_str()),
            "the segment's bridge forwards {mac} to {to}'s port"
        );
        ferry_tests::keep_load_for(Duration::from_millis(500));
    }

    for (name, w) in [("IPv4", c4), ("IPv6", c6)] {
        let (code, s) = w.stop(Duration::from_secs(20));
        eprintln!("{name} client: {s}");
        ferry_tests::workload::assert_client_clean(name, code, &s, 3);
    }
    lab.down().unwrap();
}

/// What the router caches before a move: a MAC no station has.
const STALE_MAC: &str = "02:00:5e:00:53:99";

fn router(lab: &Lab, args: &[&str]) -> String {
    let out = lab.exec("router", args).expect("running in the router");
    assert!(
        out.status.success(),
        "{args:?} in the router: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Makes the router's neighbour entry for `addr` on `dev` a stale one at `mac`.
fn router_neigh_replace(lab: &Lab, dev: &str, addr: IpAddr, mac: &str) {
    let a = addr.to_string();
    router(
        lab,
        &[
            "ip", "neigh", "replace", &a, "lladdr", mac, "dev", dev, "nud", "stale",
        ],
    );
}

/// The MAC of the router's neighbour entry for `addr` on `dev`.
fn router_neigh(lab: &Lab, dev: &str, addr: IpAddr) -> Option<String> {
    let a = addr.to_string();
    let out = router(lab, &["ip", "-j", "neigh", "show", &a, "dev", dev]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("ip -j neigh");
    v.get(0)?.get("lladdr")?.as_str().map(str::to_owned)
}

/// The port of bridge `br` whose FDB holds `mac`.
fn fdb_port(lab: &Lab, br: &str, mac: &str) -> Option<String> {
    let out = router(lab, &["bridge", "-j", "fdb", "show", "br", br]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("bridge -j fdb");
    v.as_array()?
        .iter()
        .find(|e| e.get("mac").and_then(|m| m.as_str()) == Some(mac))
        .and_then(|e| e.get("ifname")?.as_str().map(str::to_owned))
}

/// The MAC of container `c`'s `eth0` on `host`.
fn container_mac(lab: &Lab, host: &str, c: Ipv4Addr) -> String {
    let out = lab
        .exec_in(
            &lab.container_netns(host, c),
            &["ip", "-j", "link", "show", "eth0"],
        )
        .expect("ip link in the container");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j link");
    v[0]["address"].as_str().expect("a MAC").to_owned()
}

/// `ferry_announce_frames_total{kind=KIND}` of a host's agent.
fn announce_count(lab: &Lab, host: &str, kind: &str) -> u64 {
    let want = format!("ferry_announce_frames_total{{host=\"{host}\",kind=\"{kind}\"}}");
    ferry_tests::metrics_text(lab, host)
        .lines()
        .find_map(|l| l.strip_prefix(&want))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}
