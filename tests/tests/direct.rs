//! The no-tunnel mode (`direct_routing`) in a real lab: between hosts of one cloud (one
//! underlay subnet) IPv4 packets go untunnelled, to the other host's MAC; IPv6, and anything
//! across clouds, keeps the VXLAN tunnel. A container moved with CRIU from a host of the client's cloud to another cloud
//! and back keeps its connections while the path changes from direct to tunnelled and back.
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    time::Duration,
};

use ferry_lab::{Lab, LabOptions, Topology};
use ferry_tests::{
    counters, delta,
    net::{EchoServer, tcp_echo, udp_echo},
    require_root_and_tools,
};

const PORT: u16 = 7000;

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn direct_lab() -> Lab {
    ferry_tests::agents_lab(LabOptions {
        topology: Topology {
            direct_routing: true,
            ..Topology::default_lab()
        },
        ..LabOptions::default()
    })
}

fn v6(lab: &Lab, ip: Ipv4Addr) -> Ipv6 {
    ferry_config::overlay_ipv6(lab.topology().overlay6_cidr.unwrap(), ip)
}

type Ipv6 = std::net::Ipv6Addr;

#[test]
fn same_cloud_hosts_talk_without_the_tunnel_and_other_clouds_through_it() {
    if !require_root_and_tools(&["ip"]) {
        return;
    }
    let lab = direct_lab();
    let (c1, c2, c4) = (ip("10.244.1.10"), ip("10.244.1.20"), ip("10.244.2.10"));
    let n1 = lab.add_container("a1", c1).unwrap();
    let n2 = lab.add_container("a2", c2).unwrap();
    let n4 = lab.add_container("b1", c4).unwrap();
    lab.sync().unwrap();
    let _s2 = EchoServer::start(&n2, PORT).unwrap();
    let _s4 = EchoServer::start(&n4, PORT).unwrap();
    let _s1 = EchoServer::start(&n1, PORT).unwrap();

    // a1 → a2 (one cloud): IPv4 untunnelled both ways.
    let (a1, a2) = (counters(&lab, "a1"), counters(&lab, "a2"));
    let sa = SocketAddr::new(IpAddr::V4(c2), PORT);
    tcp_echo(&n1, sa, 1 << 20).unwrap_or_else(|e| panic!("TCP to {sa}: {e}"));
    udp_echo(&n1, sa, 1200).unwrap_or_else(|e| panic!("UDP to {sa}: {e}"));
    let (a1_after, a2_after) = (counters(&lab, "a1"), counters(&lab, "a2"));
    assert!(
        delta(&a1, &a1_after, "container_direct") > 20,
        "{a1_after:?}"
    );
    assert!(
        delta(&a2, &a2_after, "container_direct") > 20,
        "replies: {a2_after:?}"
    );
    assert!(
        delta(&a2, &a2_after, "underlay_to_local") > 20,
        "{a2_after:?}"
    );
    assert!(
        delta(&a1, &a1_after, "underlay_to_local") > 20,
        "{a1_after:?}"
    );
    assert_eq!(
        delta(&a1, &a1_after, "container_encap"),
        0,
        "nothing tunnelled between a1 and a2"
    );

    // IPv6 between the same hosts keeps the tunnel (the neighbour is resolved by IPv4).
    let a1 = counters(&lab, "a1");
    let sa = SocketAddr::new(IpAddr::V6(v6(&lab, c2)), PORT);
    tcp_echo(&n1, sa, 256 << 10).unwrap_or_else(|e| panic!("TCP to {sa}: {e}"));
    udp_echo(&n1, sa, 1200).unwrap_or_else(|e| panic!("UDP to {sa}: {e}"));
    let a1_after = counters(&lab, "a1");
    assert!(delta(&a1, &a1_after, "container_encap") > 0);
    assert_eq!(delta(&a1, &a1_after, "container_direct"), 0);

    // a1 → b1 (another cloud): through the tunnel.
    let a1 = counters(&lab, "a1");
    tcp_echo(&n1, SocketAddr::new(IpAddr::V4(c4), PORT), 256 << 10).unwrap();
    let a1_after = counters(&lab, "a1");
    assert!(delta(&a1, &a1_after, "container_encap") > 0);
    assert_eq!(delta(&a1, &a1_after, "container_direct"), 0);
    for reason in ["underlay_source", "redirect_failed", "no_endpoint"] {
        assert_eq!(delta(&a2, &counters(&lab, "a2"), reason), 0, "{reason}");
    }
    lab.down().unwrap();
}

/// A client on a2 talks to a container on a1 (direct), which moves to b1 (tunnelled) and back
/// (direct again): no reset, nothing lost.
#[test]
fn a_container_moves_between_a_direct_and_a_tunnelled_path_with_its_connections() {
    if !require_root_and_tools(&["ip", "ss", "criu"]) {
        return;
    }
    let _machine = ferry_tests::machine_shared();
    let workload = ferry_tests::workspace_binary("ferry-workload");
    let lab = direct_lab();
    let (c, client_ip) = (ip("10.244.1.10"), ip("10.244.1.20"));
    let ns = lab.add_container("a1", c).unwrap();
    let client_ns = lab.add_container("a2", client_ip).unwrap();
    lab.sync().unwrap();
    lab.start_process(c, &[workload.to_str().unwrap(), "serve", "--port", "7000"])
        .expect("start the server");
    ferry_tests::workload::wait_listening(&lab, &ns, 7000);
    let client = ferry_tests::workload::Workload::client(&client_ns, "10.244.1.10:7000", 3);
    ferry_tests::keep_load_for(Duration::from_millis(500));
    for to in ["b1", "a1"] {
        ferry_tests::migrate_run_ok(&lab, c, to);
        let before = counters(&lab, "a2");
        ferry_tests::keep_load_for(Duration::from_millis(500));
        let after = counters(&lab, "a2");
        let (direct, tunnelled) = (
            delta(&before, &after, "container_direct"),
            delta(&before, &after, "container_encap"),
        );
        if to == "b1" {
            assert!(
                tunnelled > 0 && direct == 0,
                "to b1: {direct} direct, {tunnelled} tunnelled"
            );
        } else {
            assert!(
                direct > 0 && tunnelled == 0,
                "back on a1: {direct} direct, {tunnelled} tunnelled"
            );
        }
    }
    let (code, s) = client.stop(Duration::from_secs(20));
    eprintln!("client: {s}");
    ferry_tests::workload::assert_client_clean("client on a2", code, &s, 3);
    lab.down().unwrap();
}
