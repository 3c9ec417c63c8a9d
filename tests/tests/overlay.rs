//! The eBPF overlay in a real lab: agents on every host, VXLAN between namespaces across a
//! router, and the per-reason counters read from each agent's Prometheus endpoint.
use ferry_lab::{Lab, LabOptions, Topology};
use ferry_tests::{counters, delta, require_root_and_tools};

/// Sends raw VXLAN datagrams (VNI `vni`, an inner Ethernet+IPv4 frame) from `from` to `to_ip`.
fn send_vxlan(lab: &Lab, from: &str, to_ip: &str, vni: u32, count: u32) {
    let script = format!(
        "import socket,struct\n\
         hdr=struct.pack('!II',0x08000000,{vni}<<8)\n\
         eth=bytes(6)+bytes(6)+b'\\x08\\x00'\n\
         ip=bytes([0x45,0,0,20,0,0,0,0,64,17,0,0,10,244,99,1,10,244,255,1])\n\
         s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
         [s.sendto(hdr+eth+ip,('{to_ip}',4789)) for _ in range({count})]\n"
    );
    let out = lab
        .exec(from, &["python3", "-c", &script])
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn hosts_talk_over_the_ebpf_overlay_and_counters_move() {
    if !require_root_and_tools(&["ip", "ping", "curl", "python3"]) {
        return;
    }
    ferry_tests::workspace_binary("ferry-lab");
    ferry_tests::workspace_binary("ferry-agent");
    let lab = Lab::up(LabOptions {
        topology: Topology::default_lab(),
        start_agents: true,
        ..LabOptions::default()
    })
    .expect("lab up");
    let hosts = ["a1", "a2", "b1", "gw"];
    let before: Vec<_> = hosts.iter().map(|h| counters(&lab, h)).collect();

    // Every host reaches every other host's overlay address (same cloud and across clouds).
    for from in hosts {
        for to in hosts {
            if from != to {
                let ip = lab.host(to).expect("host").overlay_ip.to_string();
                assert!(
                    lab.ping(from, &ip),
                    "{from} cannot reach {to} ({ip}) over the overlay"
                );
            }
        }
    }
    let after: Vec<_> = hosts.iter().map(|h| counters(&lab, h)).collect();
    for (i, h) in hosts.iter().enumerate() {
        // Each host sent one echo request to each of 3 peers and answered 3 (ping -c 1 each).
        assert!(
            delta(&before[i], &after[i], "overlay_encap") >= 6,
            "{h}: {:?}",
            after[i]
        );
        assert!(
            delta(&before[i], &after[i], "overlay_to_host") >= 6,
            "{h}: {:?}",
            after[i]
        );
        assert_eq!(delta(&before[i], &after[i], "unknown_vtep"), 0, "{h}");
    }

    // VXLAN from a VTEP that is not a ferry host (the router) is dropped and counted; with the
    // wrong VNI it is dropped for that reason.
    let a1 = lab.host("a1").expect("a1").address.to_string();
    let before = counters(&lab, "a1");
    send_vxlan(&lab, "router", &a1, 4242, 5);
    send_vxlan(&lab, "router", &a1, 999, 7);
    // The datagrams are counted as the receive path gets to them: wait until all 12 are.
    let after = ferry_tests::wait_for(
        "a1 counts the 12 foreign VXLAN datagrams",
        std::time::Duration::from_secs(15),
        || {
            let now = counters(&lab, "a1");
            (delta(&before, &now, "unknown_vtep") + delta(&before, &now, "bad_vni") >= 12)
                .then_some(now)
        },
    );
    assert_eq!(delta(&before, &after, "unknown_vtep"), 5, "{after:?}");
    assert_eq!(delta(&before, &after, "bad_vni"), 7, "{after:?}");
    assert_eq!(delta(&before, &after, "overlay_to_host"), 0, "{after:?}");

    let prefix = lab.prefix().to_owned();
    lab.down().expect("down");
    assert!(ferry_lab::leftovers(&prefix).is_empty());
}
