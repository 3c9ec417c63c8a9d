//! The gateway in a real lab: public addresses translated in eBPF (whole-IP and port
//! mappings) in both directions, containers reaching the internet side, the registry's state
//! surviving a gateway restart, and bad API input refused without changing anything.
use std::{
    net::{IpAddr, Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use ferry_lab::{Lab, LabOptions};
use ferry_tests::{
    counters, delta,
    net::{EchoServer, echo_roundtrip, pattern, tcp_connect, tcp_echo, udp_echo},
    require_root_and_tools,
};
use serde_json::Value;

const TOOLS: &[&str] = &["ip", "ping", "curl", "nft"];

fn lab() -> Lab {
    ferry_tests::agents_lab(LabOptions::default())
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn v4(a: IpAddr) -> Ipv4Addr {
    match a {
        IpAddr::V4(v) => v,
        IpAddr::V6(v) => panic!("unexpected IPv6 peer {v}"),
    }
}

/// The registry as the CLI lists it: endpoints, public mappings, hosts (without the runtime
/// fields that change on their own).
fn registry(lab: &Lab) -> (Value, Value, Vec<(String, String)>) {
    let endpoints = lab.ferry_json(&["endpoint", "list"]).unwrap();
    let public = lab.ferry_json(&["public", "list"]).unwrap();
    let hosts = lab.ferry_json(&["hosts"]).unwrap();
    let mut h: Vec<(String, String)> = hosts
        .as_array()
        .or_else(|| hosts["hosts"].as_array())
        .expect("hosts is a list")
        .iter()
        .map(|h| (h["name"].to_string(), h["vtep"].to_string()))
        .collect();
    h.sort();
    (endpoints, public, h)
}

#[test]
fn internet_reaches_containers_through_public_addresses_and_replies_leave_with_them() {
    if !require_root_and_tools(TOOLS) {
        return;
    }
    let lab = lab();
    let inet = lab.netns("inet");
    let client_ip = lab.topology().internet.as_ref().unwrap().client;
    let gw_public = lab.topology().internet.as_ref().unwrap().gateway_address;
    let whole = lab.add_container("a1", ip("10.244.1.10")).unwrap();
    let ported = lab.add_container("b1", ip("10.244.2.10")).unwrap();
    lab.ferry_json(&[
        "public",
        "add",
        "--public",
        "203.0.113.130",
        "--container",
        "10.244.1.10",
    ])
    .unwrap();
    for proto in ["tcp", "udp"] {
        lab.ferry_json(&[
            "public",
            "add",
            "--public",
            &format!("203.0.113.131:8080/{proto}"),
            "--container",
            "10.244.2.10:80",
        ])
        .unwrap();
    }
    lab.sync().unwrap();
    let s_whole = EchoServer::start(&whole, 7000).unwrap();
    let s_port = EchoServer::start(&ported, 80).unwrap();
    let before = counters(&lab, "gw");

    // Inbound, whole-IP: any port. The client's connected UDP socket only accepts replies
    // from 203.0.113.130, and its TCP handshake only completes if the SYN-ACK comes from it.
    tcp_echo(&inet, SocketAddrV4::new(ip("203.0.113.130"), 7000), 1 << 20).expect("whole-IP TCP");
    udp_echo(&inet, SocketAddrV4::new(ip("203.0.113.130"), 7000), 1200).expect("whole-IP UDP");
    assert!(
        lab.ping("inet", "203.0.113.130"),
        "ICMP through a whole-IP mapping"
    );
    // Inbound, port mapping 8080 → 80, TCP and UDP.
    tcp_echo(&inet, SocketAddrV4::new(ip("203.0.113.131"), 8080), 1 << 20)
        .expect("port-mapped TCP");
    udp_echo(&inet, SocketAddrV4::new(ip("203.0.113.131"), 8080), 1200).expect("port-mapped UDP");
    // The containers saw the client's real address (no source translation inbound).
    assert!(s_whole.peers().iter().all(|p| v4(p.ip()) == client_ip));
    assert!(s_port.peers().iter().all(|p| v4(p.ip()) == client_ip));
    assert!(!s_port.peers().is_empty());

    // A port the mapping does not cover is dropped at the gateway, and counted.
    let dropped_before = counters(&lab, "gw");
    assert!(
        tcp_connect(
            &inet,
            SocketAddrV4::new(ip("203.0.113.131"), 9999),
            Duration::from_millis(700)
        )
        .is_err()
    );
    let dropped_after = counters(&lab, "gw");
    assert!(delta(&dropped_before, &dropped_after, "no_public_mapping") >= 1);

    // Outbound: the whole-IP container leaves as its public address, the port-mapped one
    // (no whole-IP mapping) is masqueraded as the gateway's own address.
    let s_inet = EchoServer::start(&inet, 9000).unwrap();
    tcp_echo(&whole, SocketAddrV4::new(client_ip, 9000), 64 << 10).expect("container → internet");
    tcp_echo(&ported, SocketAddrV4::new(client_ip, 9000), 64 << 10)
        .expect("masqueraded container → internet");
    udp_echo(&whole, SocketAddrV4::new(client_ip, 9000), 500).expect("container → internet UDP");
    let sources: Vec<Ipv4Addr> = s_inet.peers().iter().map(|p| v4(p.ip())).collect();
    assert!(sources.contains(&ip("203.0.113.130")), "{sources:?}");
    assert!(sources.contains(&gw_public), "{sources:?}");
    assert!(
        sources.iter().all(|s| !s.octets().starts_with(&[10, 244])),
        "no overlay address leaks to the internet: {sources:?}"
    );

    let after = counters(&lab, "gw");
    assert!(delta(&before, &after, "public_dnat") > 10, "{after:?}");
    assert!(delta(&before, &after, "public_snat") > 10, "{after:?}");
    assert!(
        delta(&before, &after, "arp_reply") >= 1,
        "the gateway answered ARP for them"
    );
    assert!(
        delta(&before, &after, "gateway_to_stack") >= 1,
        "masqueraded traffic"
    );
    lab.down().unwrap();
}

#[test]
fn a_gateway_restart_keeps_endpoints_and_public_mappings() {
    if !require_root_and_tools(TOOLS) {
        return;
    }
    let mut lab = lab();
    let n1 = lab.add_container("a1", ip("10.244.1.10")).unwrap();
    lab.add_container("a2", ip("10.244.2.10")).unwrap();
    lab.ferry_json(&[
        "public",
        "add",
        "--public",
        "203.0.113.130",
        "--container",
        "10.244.1.10",
    ])
    .unwrap();
    lab.ferry_json(&[
        "public",
        "add",
        "--public",
        "203.0.113.131:8080/tcp",
        "--container",
        "10.244.2.10:80",
    ])
    .unwrap();
    lab.sync().unwrap();
    let before = registry(&lab);
    assert_eq!(before.0.as_array().map(Vec::len), Some(2), "{:?}", before.0);
    assert_eq!(before.1.as_array().map(Vec::len), Some(2), "{:?}", before.1);
    let srv = EchoServer::start(&n1, 7000).unwrap();
    let inet = lab.netns("inet");
    let mut conn = tcp_connect(
        &inet,
        SocketAddrV4::new(ip("203.0.113.130"), 7000),
        Duration::from_secs(3),
    )
    .unwrap();
    echo_roundtrip(&mut conn, &pattern(10_000, 1)).unwrap();

    lab.restart_gateway().unwrap();
    assert_eq!(registry(&lab), before, "the registry survived the restart");
    // The datapath never depended on the gateway daemon: the connection kept working.
    echo_roundtrip(&mut conn, &pattern(10_000, 2)).unwrap();
    // Agents follow the restarted gateway: a new endpoint reaches them.
    let n3 = lab.add_container("b1", ip("10.244.3.10")).unwrap();
    let _srv3 = EchoServer::start(&n3, 7001).unwrap();
    tcp_echo(&n1, SocketAddrV4::new(ip("10.244.3.10"), 7001), 10_000).unwrap();
    drop(srv);
    lab.down().unwrap();
}

#[test]
fn bad_api_input_is_rejected_clearly_and_changes_nothing() {
    if !require_root_and_tools(TOOLS) {
        return;
    }
    let lab = lab();
    let n1 = lab.add_container("a1", ip("10.244.1.10")).unwrap();
    let n2 = lab.add_container("b1", ip("10.244.2.10")).unwrap();
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
    let _srv = EchoServer::start(&n2, 7000).unwrap();
    let mut conn = tcp_connect(
        &n1,
        SocketAddrV4::new(ip("10.244.2.10"), 7000),
        Duration::from_secs(3),
    )
    .unwrap();
    echo_roundtrip(&mut conn, &pattern(10_000, 1)).unwrap();
    let before = registry(&lab);
    let c_before = counters(&lab, "a1");

    // (arguments, a word the error message must contain)
    let cases: &[(&[&str], &str)] = &[
        (
            &["endpoint", "add", "--ip", "10.999.1.1", "--host", "a1"],
            "10.999.1.1",
        ),
        (
            &["endpoint", "add", "--ip", "192.168.1.1", "--host", "a1"],
            "overlay",
        ),
        (
            &["endpoint", "add", "--ip", "10.244.5.5", "--host", "nosuch"],
            "nosuch",
        ),
        (
            &["endpoint", "add", "--ip", "10.244.1.10", "--host", "a2"],
            "10.244.1.10",
        ),
        (
            &["endpoint", "add", "--ip", "10.244.255.1", "--host", "a2"],
            "10.244.255.1",
        ),
        (
            &[
                "endpoint",
                "add",
                "--ip",
                "10.244.5.5",
                "--host",
                "a1",
                "--mac",
                "01:00:5e:00:00:01",
            ],
            "mac",
        ),
        (&["endpoint", "rm", "10.244.99.99"], "10.244.99.99"),
        (
            &[
                "public",
                "add",
                "--public",
                "198.51.100.1",
                "--container",
                "10.244.1.10",
            ],
            "198.51.100.1",
        ),
        (
            &[
                "public",
                "add",
                "--public",
                "203.0.113.130",
                "--container",
                "10.244.2.10",
            ],
            "203.0.113.130",
        ),
        (
            &[
                "public",
                "add",
                "--public",
                "203.0.113.150",
                "--container",
                "10.244.77.77",
            ],
            "10.244.77.77",
        ),
        (
            &[
                "public",
                "add",
                "--public",
                "203.0.113.150:0/tcp",
                "--container",
                "10.244.2.10:80",
            ],
            "port",
        ),
        (
            &[
                "public",
                "add",
                "--public",
                "203.0.113.150:80/icmp",
                "--container",
                "10.244.2.10:80",
            ],
            "icmp",
        ),
        (&["public", "rm", "203.0.113.199"], "203.0.113.199"),
    ];
    for (args, needle) in cases {
        let out = lab.ferry(&[&["--json"], *args].concat()).unwrap();
        assert!(!out.status.success(), "{args:?} must fail");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            text.to_lowercase().contains(&needle.to_lowercase()),
            "{args:?}: message should mention {needle:?}: {text}"
        );
        assert_eq!(registry(&lab), before, "{args:?} changed the registry");
    }

    // A wrong token: refused, nothing changed.
    let bad_token = lab.state_dir().join("wrong-token");
    std::fs::write(&bad_token, "not-the-token").unwrap();
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&bad_token, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let cp = lab.control().unwrap();
    let out = lab
        .exec(
            &cp.host,
            &[
                ferry_tests::workspace_binary("ferry").to_str().unwrap(),
                "--json",
                "--gateway",
                &cp.api.to_string(),
                "--token-file",
                bad_token.to_str().unwrap(),
                "--tls-dir",
                cp.tls_dir.join("operator").to_str().unwrap(),
                "endpoint",
                "add",
                "--ip",
                "10.244.5.5",
                "--host",
                "a1",
            ],
        )
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("unauthorized"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_eq!(registry(&lab), before);

    // Connections and packets were untouched throughout.
    echo_roundtrip(&mut conn, &pattern(100_000, 2)).unwrap();
    let c_after = counters(&lab, "a1");
    for r in [
        "no_endpoint",
        "spoofed_source",
        "redirect_failed",
        "bad_kind",
    ] {
        assert_eq!(delta(&c_before, &c_after, r), 0, "{r}");
    }
    lab.down().unwrap();
}

/// VXLAN from the internet never enters the overlay, even with an outer source forged as a
/// host's underlay address (which would pass the VTEP allow-list): the gateway's public side
/// drops it before its VXLAN device sees it, and counts it (`vxlan_from_public`).
#[test]
fn vxlan_from_the_internet_is_dropped_and_counted_even_with_a_forged_source() {
    if !require_root_and_tools(&["ip", "curl", "python3"]) {
        return;
    }
    let lab = lab();
    let _diag = ferry_tests::CountersOnPanic::new(&lab);
    let c = ip("10.244.1.10");
    let ns = lab.add_container("a1", c).unwrap();
    let rx = ferry_overlay::netns::run_in(&ns, || {
        std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 9400))
    })
    .unwrap()
    .unwrap();
    rx.set_nonblocking(true).unwrap();
    let forged_src = lab.host("a1").expect("a1").address;
    let gw_public = lab.topology().internet.as_ref().unwrap().gateway_address;
    let (vni, port) = (lab.topology().vni, lab.topology().vxlan_port);
    let before = counters(&lab, "gw");
    // Outer IPv4 (source forged, IP_HDRINCL) / UDP to the VXLAN port / VXLAN (the lab's VNI) /
    // inner Ethernet / IPv4 10.244.9.9 → the container / UDP 9400, inner checksum correct:
    // without the check the container would receive it.
    let script = format!(
        r#"import socket,struct
def csum(b):
    s=sum(struct.unpack('!%dH'%(len(b)//2),b)); s=(s>>16)+(s&0xffff); s+=s>>16; return ~s&0xffff
def ip4(src,dst,proto,payload):
    h=struct.pack('!BBHHHBBH4s4s',0x45,0,20+len(payload),1,0,64,proto,0,socket.inet_aton(src),socket.inet_aton(dst))
    return h[:10]+struct.pack('!H',csum(h))+h[12:]+payload
def udp(sport,dport,payload): return struct.pack('!HHHH',sport,dport,8+len(payload),0)+payload
inner=ip4('10.244.9.9','{c}',17,udp(5555,9400,b'injected'))
frame=bytes.fromhex('0efe00000001')+bytes.fromhex('0e0000000099')+b'\x08\x00'+inner
vx=struct.pack('!II',0x08000000,{vni}<<8)+frame
pkt=ip4('{forged_src}','{gw_public}',17,udp(40000,{port},vx))
s=socket.socket(socket.AF_INET,socket.SOCK_RAW,socket.IPPROTO_RAW)
for _ in range(5): s.sendto(pkt,('{gw_public}',0))
"#
    );
    let out = lab.exec("inet", &["python3", "-c", &script]).unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = ferry_tests::wait_for(
        "the gateway counts the 5 forged VXLAN datagrams",
        Duration::from_secs(15),
        || {
            let now = counters(&lab, "gw");
            (delta(&before, &now, "vxlan_from_public") >= 5).then_some(now)
        },
    );
    assert_eq!(delta(&before, &after, "vxlan_from_public"), 5);
    for r in [
        "overlay_to_local",
        "overlay_forward",
        "unknown_vtep",
        "bad_vni",
    ] {
        assert_eq!(
            delta(&before, &after, r),
            0,
            "{r}: it never reached the overlay"
        );
    }
    let mut buf = [0u8; 64];
    assert!(
        matches!(rx.recv(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "the container received the injected datagram"
    );
    lab.down().unwrap();
}

/// Raises this process's open-file limit to its hard limit; returns it.
fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to an rlimit.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = lim.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
    lim.rlim_max
}

/// Opens `n` TCP connections to `to` from inside `ns` and keeps them (idle).
fn idle_flood(
    ns: &std::path::Path,
    to: std::net::SocketAddr,
    n: usize,
) -> Vec<std::net::TcpStream> {
    ferry_overlay::netns::run_in(ns, move || {
        (0..n)
            .filter_map(|_| std::net::TcpStream::connect_timeout(&to, Duration::from_secs(1)).ok())
            .collect::<Vec<_>>()
    })
    .unwrap()
}

/// How many of `n` TCP connections from `ns` to `to` get through (each given 100 ms).
fn reachable(ns: &std::path::Path, to: std::net::SocketAddr, n: usize) -> usize {
    ferry_overlay::netns::run_in(ns, move || {
        (0..n)
            .filter(|_| {
                std::net::TcpStream::connect_timeout(&to, Duration::from_millis(100)).is_ok()
            })
            .count()
    })
    .unwrap()
}

/// The control plane is out of reach of containers and of the internet, by the datapath: a
/// container cannot connect to its host agent's peer API or to the gateway's API
/// (`container_to_underlay`), the internet cannot connect to the gateway's API or an agent's
/// (`underlay_from_public`), every attempt dropped and counted. Against a peer on the
/// underlay itself (a compromised host), the bounded servers hold: thousands of idle
/// connections (as many as this process may open) to the gateway's API and to an agent's
/// peer API are refused beyond the per-peer cap (counted) or closed once idle past the header
/// timeout, and meanwhile `ferry hosts`, the agents' watch (a change applied everywhere) and
/// the peer API keep serving.
#[test]
fn the_control_plane_is_out_of_reach_and_holds_against_idle_floods() {
    if !require_root_and_tools(TOOLS) {
        return;
    }
    let each = usize::try_from((raise_nofile().saturating_sub(2_000)) / 2)
        .unwrap()
        .min(20_000);
    let lab = lab();
    let api = lab.control().unwrap().api;
    let c = ip("10.244.1.10");
    let container = lab.add_container("a1", c).unwrap();
    let a1 = lab.host("a1").unwrap().address;
    let peer_api = std::net::SocketAddr::new(a1.into(), 7401);

    let (a1_before, gw_before) = (counters(&lab, "a1"), counters(&lab, "gw"));
    assert_eq!(
        reachable(&container, peer_api, 20),
        0,
        "container → its agent's peer API"
    );
    assert_eq!(
        reachable(&container, api, 20),
        0,
        "container → the gateway's API"
    );
    assert_eq!(
        reachable(&lab.netns("inet"), api, 20),
        0,
        "internet → the gateway's API"
    );
    assert_eq!(
        reachable(&lab.netns("inet"), peer_api, 20),
        0,
        "internet → an agent's API"
    );
    let (a1_after, gw_after) = (counters(&lab, "a1"), counters(&lab, "gw"));
    assert!(delta(&a1_before, &a1_after, "container_to_underlay") >= 40);
    assert!(delta(&gw_before, &gw_after, "underlay_from_public") >= 40);

    // A flooding underlay peer (b1's namespace).
    let b1 = lab.netns("b1");
    let to_gateway = idle_flood(&b1, api, each);
    let to_agent = idle_flood(&b1, peer_api, each);
    eprintln!(
        "connected: {} to the gateway, {} to a1's agent",
        to_gateway.len(),
        to_agent.len()
    );

    // The control plane still serves: the CLI, a change applied by every agent (their
    // watch), and the agent's peer API (a process started in another container).
    let hosts = lab.ferry_json(&["hosts"]).unwrap();
    assert_eq!(hosts["hosts"].as_array().map(Vec::len), Some(4), "{hosts}");
    lab.add_container("a1", ip("10.244.1.11")).unwrap();
    let p = lab
        .start_process(ip("10.244.1.11"), &["/bin/sleep", "600"])
        .expect("the peer API serves during the flood");
    assert!(p.running, "{p:?}");
    // And a whole migration (checkpoint, images, restore, release) goes through.
    lab.start_process(c, &["/bin/sleep", "600"])
        .expect("a process to migrate");
    let run = lab
        .ferry_json(&["migrate", "run", "--container", "10.244.1.10", "--to", "a2"])
        .expect("a migration during the flood");
    assert_eq!(run["state"], "released", "{run}");

    // What was over the cap was refused and counted.
    let cp = lab.control().unwrap();
    let operator = cp.client_tls(ferry_lab::control::Party::Operator).unwrap();
    let metrics = ferry_overlay::netns::run_in(&lab.netns("gw"), move || {
        ferry_api::transport::Request::get("/metrics")
            .tls(operator)
            .send_blocking(api)
    })
    .unwrap()
    .expect("the gateway's metrics");
    let text = String::from_utf8_lossy(&metrics.body);
    let refused: u64 = text
        .lines()
        .find(|l| l.starts_with("ferry_gateway_api_connections_total{result=\"refused_per_peer\"}"))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no refused_per_peer counter in:\n{text}"));
    // (Accepted ones idle past the header timeout are closed during the flood, which frees
    // their slots: somewhat fewer than all but the first 64 are refused.)
    assert!(
        refused as usize > each / 2,
        "refused_per_peer {refused} of {each}"
    );

    let agent_refused: u64 = ferry_tests::metrics_text(&lab, "a1")
        .lines()
        .find(|l| {
            l.starts_with("ferry_peer_api_connections_total{")
                && l.contains("result=\"refused_per_peer\"")
        })
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse().ok())
        .expect("a1 exports ferry_peer_api_connections_total");
    assert!(
        agent_refused as usize > each / 2,
        "a1's peer API refused_per_peer {agent_refused} of {each}"
    );

    // The idle ones that were accepted are closed once idle past the header timeout.
    let open_idle = |conns: &[std::net::TcpStream]| {
        conns
            .iter()
            .filter(|s| {
                s.set_nonblocking(true).unwrap();
                let mut b = [0u8; 1];
                // WouldBlock: still open; Ok(0) or an error: closed by the server.
                matches!(
                    std::io::Read::read(&mut &**s, &mut b),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
                )
            })
            .count()
    };
    ferry_tests::wait_for(
        "the gateway closes the idle connections it accepted",
        Duration::from_secs(30),
        || (open_idle(&to_gateway) == 0).then_some(()),
    );
    ferry_tests::wait_for(
        "the agent closes the idle connections it accepted",
        Duration::from_secs(30),
        || (open_idle(&to_agent) == 0).then_some(()),
    );
    lab.down().unwrap();
}
