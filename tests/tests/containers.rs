//! Containers on the eBPF overlay, in a real lab: agents build each container's namespace and
//! veth when the gateway's registry places it on their host; containers talk over TCP and UDP
//! on one host, across hosts and across clouds; an endpoint moved by hand is reachable at its
//! new place; a container spoofing its source address is dropped and counted; the endpoint map
//! holds 250,000 entries (a change to it still reaches every agent as a delta).
use std::{
    net::{Ipv4Addr, SocketAddrV4},
    path::Path,
    time::Duration,
};

use ferry_lab::{Lab, LabOptions, Topology, state::LabState};
use ferry_tests::{
    counters, delta, gauge,
    net::{EchoServer, echo_roundtrip, pattern, tcp_connect, tcp_echo, udp_echo},
    require_root_and_tools,
};

const TOOLS: &[&str] = &["ip", "ping", "curl"];

fn lab() -> Lab {
    ferry_tests::agents_lab(LabOptions::default())
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn agent_pids(lab: &Lab) -> Vec<(String, i32)> {
    let st = LabState::load(lab.prefix()).unwrap().unwrap();
    let mut v: Vec<(String, i32)> = st
        .processes
        .iter()
        .filter(|p| p.kind == "agent")
        .map(|p| (p.host.clone().unwrap_or_default(), p.pid))
        .collect();
    v.sort();
    v
}

/// TCP (1 MiB, so full-size segments cross the overlay) and UDP (a 1,400-byte datagram) from
/// `from` to an echo server at `to_ip`.
fn check_pair(from: &Path, to_ip: Ipv4Addr, port: u16, what: &str) {
    tcp_echo(from, SocketAddrV4::new(to_ip, port), 1 << 20)
        .unwrap_or_else(|e| panic!("{what}: TCP: {e}"));
    udp_echo(from, SocketAddrV4::new(to_ip, port), 1400)
        .unwrap_or_else(|e| panic!("{what}: UDP: {e}"));
}

#[test]
fn containers_talk_on_one_host_across_hosts_and_across_clouds() {
    if !require_root_and_tools(TOOLS) {
        return;
    }
    let lab = lab();
    let (c1, c2, c3, c4) = (
        ip("10.244.1.10"),
        ip("10.244.1.11"),
        ip("10.244.2.10"),
        ip("10.244.3.10"),
    );
    let n1 = lab.add_container("a1", c1).unwrap();
    let n2 = lab.add_container("a1", c2).unwrap();
    let n3 = lab.add_container("a2", c3).unwrap();
    let n4 = lab.add_container("b1", c4).unwrap();
    let servers: Vec<EchoServer> = [&n1, &n2, &n3, &n4]
        .iter()
        .map(|n| EchoServer::start(n, 7000).unwrap())
        .collect();
    let before_a1 = counters(&lab, "a1");
    let before_b1 = counters(&lab, "b1");
    // Every host's counters once the containers exist: the drops checked below are those of
    // the traffic (a packet that reached a host before it learned of a container being
    // added is counted, and is not what this test is about).
    let before: Vec<_> = ["a1", "a2", "b1", "gw"]
        .into_iter()
        .map(|h| (h, counters(&lab, h)))
        .collect();

    check_pair(&n1, c2, 7000, "same host (a1 → a1)");
    check_pair(&n1, c3, 7000, "across hosts in cloud a (a1 → a2)");
    check_pair(&n1, c4, 7000, "across clouds (a1 → b1)");
    check_pair(&n4, c1, 7000, "across clouds (b1 → a1)");
    check_pair(&n3, c2, 7000, "across hosts (a2 → a1)");

    // Every server saw its clients' real container addresses (no translation in the overlay).
    let peers_of_c4: Vec<Ipv4Addr> = servers[3]
        .peers()
        .iter()
        .map(|p| match p.ip() {
            std::net::IpAddr::V4(v4) => v4,
            other => panic!("unexpected peer {other}"),
        })
        .collect();
    assert!(peers_of_c4.iter().all(|p| *p == c1), "{peers_of_c4:?}");

    // The datapath, not the host stack, carried it.
    let after_a1 = counters(&lab, "a1");
    let after_b1 = counters(&lab, "b1");
    assert!(
        delta(&before_a1, &after_a1, "container_to_local") > 10,
        "{after_a1:?}"
    );
    assert!(delta(&before_a1, &after_a1, "container_encap") > 10);
    assert!(delta(&before_a1, &after_a1, "overlay_to_local") > 10);
    assert!(delta(&before_b1, &after_b1, "overlay_to_local") > 10);
    // The gateway's neighbour entry is permanent: no container had to ARP for it.
    assert_eq!(
        delta(&before_a1, &after_a1, "arp_reply") + delta(&before_b1, &after_b1, "arp_reply"),
        0
    );
    // A container whose entry is gone (flushed by its owner) still gets the answer.
    let del = lab
        .exec_in(&n1, &["ip", "neigh", "del", "169.254.1.1", "dev", "eth0"])
        .unwrap();
    assert!(del.status.success(), "{del:?}");
    check_pair(&n1, c4, 7000, "across clouds after an ARP (a1 → b1)");
    assert!(delta(&after_a1, &counters(&lab, "a1"), "arp_reply") >= 1);
    for (host, was) in &before {
        let c = counters(&lab, host);
        for r in [
            "spoofed_source",
            "no_endpoint",
            "redirect_failed",
            "rewrite_failed",
        ] {
            assert_eq!(delta(was, &c, r), 0, "{host}: {r} (now {c:?})");
        }
    }
    // Hosts reach containers too (a /32 route to each local veth, the overlay for the rest).
    assert!(lab.ping("a1", "10.244.1.10"));
    assert!(lab.ping("a2", "10.244.3.10"));
    assert_eq!(gauge(&lab, "a1", "ferry_containers"), Some(2));
    drop(servers);
    lab.down().unwrap();
}

#[test]
fn endpoint_moved_by_hand_is_reachable_at_its_new_place_without_restarting_agents() {
    if !require_root_and_tools(TOOLS) {
        return;
    }
    let lab = lab();
    let moving = ip("10.244.7.7");
    let peer = ip("10.244.2.20");
    let mac = "0e:aa:bb:cc:dd:ee";
    let pids = agent_pids(&lab);
    lab.ferry_json(&[
        "endpoint",
        "add",
        "--ip",
        "10.244.7.7",
        "--host",
        "a1",
        "--mac",
        mac,
    ])
    .unwrap();
    lab.sync().unwrap();
    let on_a1 = lab.container_netns("a1", moving);
    let peer_ns = lab.add_container("a2", peer).unwrap();
    lab.ferry_json(&[
        "public",
        "add",
        "--public",
        "203.0.113.140",
        "--container",
        "10.244.7.7",
    ])
    .unwrap();
    lab.sync().unwrap();
    {
        let _srv = EchoServer::start(&on_a1, 7100).unwrap();
        check_pair(&peer_ns, moving, 7100, "before the move");
    }

    // Move: remove on a1, add on b1 (another cloud) with the same IP and MAC.
    lab.ferry_json(&["endpoint", "rm", "10.244.7.7"]).unwrap();
    lab.ferry_json(&[
        "endpoint",
        "add",
        "--ip",
        "10.244.7.7",
        "--host",
        "b1",
        "--mac",
        mac,
    ])
    .unwrap();
    lab.sync().unwrap();
    assert!(!on_a1.exists(), "a1 removed its copy");
    let on_b1 = lab.container_netns("b1", moving);
    assert!(on_b1.exists(), "b1 built the container");
    let link = lab
        .exec_in(&on_b1, &["ip", "-o", "link", "show", "eth0"])
        .unwrap();
    assert!(
        String::from_utf8_lossy(&link.stdout).contains(mac),
        "same MAC at the new place: {}",
        String::from_utf8_lossy(&link.stdout)
    );

    let _srv = EchoServer::start(&on_b1, 7100).unwrap();
    check_pair(
        &peer_ns,
        moving,
        7100,
        "container on a2 → moved container on b1",
    );
    assert!(lab.ping("a1", "10.244.7.7"), "old host reaches it");
    assert!(lab.ping("gw", "10.244.7.7"), "gateway reaches it");
    // The internet reaches it through its unchanged public address.
    tcp_echo(
        &lab.netns("inet"),
        SocketAddrV4::new(ip("203.0.113.140"), 7100),
        64 << 10,
    )
    .expect("internet → public address → moved container");
    assert_eq!(agent_pids(&lab), pids, "no agent restarted");
    lab.down().unwrap();
}

#[test]
fn a_container_spoofing_its_source_is_dropped_and_counted() {
    if !require_root_and_tools(TOOLS) {
        return;
    }
    let lab = lab();
    let n1 = lab.add_container("a1", ip("10.244.1.10")).unwrap();
    let n2 = lab.add_container("a2", ip("10.244.2.10")).unwrap();
    let _srv = EchoServer::start(&n2, 7000).unwrap();
    // A second address the registry never gave it.
    let out = lab
        .exec_in(&n1, &["ip", "addr", "add", "10.244.9.9/32", "dev", "eth0"])
        .unwrap();
    assert!(out.status.success());
    let before = counters(&lab, "a1");
    let out = lab
        .exec_in(
            &n1,
            &[
                "ping",
                "-n",
                "-q",
                "-c",
                "3",
                "-i",
                "0.2",
                "-W",
                "1",
                "-I",
                "10.244.9.9",
                "10.244.2.10",
            ],
        )
        .unwrap();
    assert!(!out.status.success(), "spoofed pings must not be answered");
    let after = counters(&lab, "a1");
    assert!(delta(&before, &after, "spoofed_source") >= 3);
    // Its real address still works.
    check_pair(&n1, ip("10.244.2.10"), 7000, "real address after spoofing");
    lab.down().unwrap();
}

#[test]
fn a_registry_of_250k_endpoints_fills_every_agent_and_a_change_is_a_delta() {
    if !require_root_and_tools(TOOLS) {
        return;
    }
    // 250,000 endpoints do not fit in a /16 next to the hosts: use a /12 overlay.
    let topology = Topology {
        overlay_cidr: "10.240.0.0/12".parse().unwrap(),
        ..Topology::default()
    };
    let lab = ferry_tests::agents_lab(LabOptions {
        topology,
        ..LabOptions::default()
    });
    let n1 = lab.add_container("a1", ip("10.240.1.10")).unwrap();
    let n2 = lab.add_container("b1", ip("10.240.2.10")).unwrap();
    // A connection made before the map fills up must survive it.
    let _srv0 = EchoServer::start(&n2, 7000).unwrap();
    let mut conn = tcp_connect(
        &n1,
        SocketAddrV4::new(ip("10.240.2.10"), 7000),
        Duration::from_secs(3),
    )
    .unwrap();
    echo_roundtrip(&mut conn, &pattern(1000, 1)).unwrap();
    // A host that never runs an agent, holding 250,000 endpoints (from 10.241.0.0), sent in
    // batches of 62,500 (a request takes at most 65,536).
    const N: u32 = 250_000;
    const BATCH: u32 = 62_500;
    let added = lab
        .api(|c| async move {
            c.register_host(&ferry_api::HostInfo {
                name: "phantom".into(),
                vtep: "198.18.2.99".parse().unwrap(),
                overlay_ip: "10.255.255.99".parse().unwrap(),
                role: ferry_api::HostRole::Host,
                active_since: None,
            })
            .await?;
            let mut added = 0;
            for from in (0..N).step_by(BATCH as usize) {
                let specs: Vec<ferry_api::EndpointSpec> = (from..from + BATCH)
                    .map(|i| ferry_api::EndpointSpec {
                        ip: Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 241, 0, 0)) + i),
                        host: "phantom".into(),
                        mac: None,
                    })
                    .collect();
                added += c.add_endpoints(&specs).await?.len();
            }
            Ok::<_, ferry_api::ApiError>(added)
        })
        .unwrap()
        .expect("registering 250,000 endpoints");
    assert_eq!(added, N as usize);
    // (`ferry sync` would wait for the phantom host too: wait for the real agents.)
    let t0 = std::time::Instant::now();
    for host in ["a1", "a2", "b1", "gw"] {
        ferry_tests::wait_for(
            &format!("{host} to hold all 250,000 endpoints"),
            Duration::from_secs(600),
            || gauge(&lab, host, "ferry_endpoints").filter(|&n| n > u64::from(N)),
        );
    }
    eprintln!("4 agents applied 250,000 endpoints in {:?}", t0.elapsed());

    // One more endpoint reaches every agent as a delta: a few hundred bytes each, where the
    // whole registry is megabytes.
    let series = |what: &str, kind: &str| {
        let name = format!("ferry_gateway_watch_{what}_total{{kind=\"{kind}\"}}");
        ferry_tests::gateway_metric(&lab, &name).unwrap_or_else(|| panic!("no {name}"))
    };
    let snapshot_bytes = lab
        .api(|c| async move { c.watch("phantom", 0, Duration::from_secs(60)).await })
        .unwrap()
        .map(|s| serde_json::to_vec(&s).unwrap().len())
        .expect("a whole snapshot");
    let hosts = ["a1", "a2", "b1", "gw"];
    let held: Vec<u64> = hosts
        .iter()
        .map(|h| gauge(&lab, h, "ferry_endpoints").unwrap())
        .collect();
    let before = [
        series("answers", "delta"),
        series("bytes", "delta"),
        series("answers", "snapshot"),
    ];
    lab.api(|c| async move {
        c.add_endpoints(&[ferry_api::EndpointSpec {
            ip: "10.250.0.1".parse().unwrap(),
            host: "phantom".into(),
            mac: None,
        }])
        .await
    })
    .unwrap()
    .expect("one more endpoint");
    for (host, n) in hosts.iter().zip(held) {
        ferry_tests::wait_for(
            &format!("{host} to hold the new endpoint"),
            Duration::from_secs(60),
            || gauge(&lab, host, "ferry_endpoints").filter(|&m| m == n + 1),
        );
    }
    let (answers, bytes) = (
        series("answers", "delta") - before[0],
        series("bytes", "delta") - before[1],
    );
    eprintln!(
        "delta watch: {answers} answers, {bytes} bytes in all; a whole snapshot: {snapshot_bytes} bytes"
    );
    assert!(answers >= 4, "each of the 4 agents got a delta ({answers})");
    assert!(
        bytes / answers * 1000 < snapshot_bytes as u64,
        "a delta ({} bytes) is under 0.1 % of the snapshot ({snapshot_bytes} bytes)",
        bytes / answers
    );
    assert_eq!(
        series("answers", "snapshot") - before[2],
        0,
        "no agent needed the whole snapshot"
    );
    let _srv = EchoServer::start(&n2, 7001).unwrap();
    check_pair(&n1, ip("10.240.2.10"), 7001, "with a full endpoint map");
    echo_roundtrip(&mut conn, &pattern(100_000, 2)).expect("the earlier connection survives");
    lab.down().unwrap();
}

/// A container that has just been placed can send and receive at once: its first datagrams
/// (sent once each, never retried) arrive, it never has to ARP for its gateway (the entry is
/// permanent, the MAC being the same on every host), and the host's side needs no ARP either.
/// Before, a new container's first ARP could be lost while its veth was still coming up, and
/// the kernel asks again only after a second.
#[test]
fn a_container_started_and_immediately_sent_to_receives_its_first_packets() {
    if !require_root_and_tools(TOOLS) {
        return;
    }
    use std::net::UdpSocket;
    let lab = lab();
    let _diag = ferry_tests::CountersOnPanic::new(&lab);
    let before_a1 = counters(&lab, "a1");
    let before_b1 = counters(&lab, "b1");
    let (rx_ip, tx_ip) = (ip("10.244.1.20"), ip("10.244.3.20"));
    let rx_ns = lab.add_container("a1", rx_ip).unwrap();
    let rx =
        ferry_overlay::netns::run_in(&rx_ns, || UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 9300)))
            .unwrap()
            .unwrap();
    let tx_ns = lab.add_container("b1", tx_ip).unwrap();
    // At once: no wait, no warm-up, each datagram sent exactly once.
    ferry_overlay::netns::run_in(&tx_ns, move || -> std::io::Result<()> {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        for i in 0u8..3 {
            s.send_to(&[i; 64], SocketAddrV4::new(rx_ip, 9300))?;
        }
        Ok(())
    })
    .unwrap()
    .unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut buf = [0u8; 128];
    for i in 0u8..3 {
        let (n, from) = rx
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("datagram {i} of the new container: {e}"));
        assert_eq!((n, buf[0], from.ip()), (64, i, std::net::IpAddr::V4(tx_ip)));
    }
    // The gateway's neighbour entry is permanent in both containers, the container's on the
    // host side of its veth: nothing had to be resolved.
    for (host, ns, peer) in [
        ("a1", &rx_ns, ferry_overlay::netlink::CONTAINER_GATEWAY),
        ("b1", &tx_ns, ferry_overlay::netlink::CONTAINER_GATEWAY),
    ] {
        let out = lab
            .exec_in(
                ns,
                &[
                    "ip",
                    "-4",
                    "neigh",
                    "show",
                    &peer.to_string(),
                    "dev",
                    "eth0",
                ],
            )
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("lladdr 0e:fe:00:00:00:01") && text.contains("PERMANENT"),
            "{host}: the container's gateway entry is permanent: {text:?}"
        );
    }
    let host_side = lab
        .exec("a1", &["ip", "-4", "neigh", "show", &rx_ip.to_string()])
        .unwrap();
    assert!(
        String::from_utf8_lossy(&host_side.stdout).contains("PERMANENT"),
        "a1's entry for its container is permanent: {}",
        String::from_utf8_lossy(&host_side.stdout)
    );
    let (after_a1, after_b1) = (counters(&lab, "a1"), counters(&lab, "b1"));
    assert_eq!(
        delta(&before_b1, &after_b1, "arp_reply"),
        0,
        "the sending container never asked for its gateway's MAC"
    );
    assert_eq!(delta(&before_a1, &after_a1, "arp_reply"), 0);
    lab.down().unwrap();
}
