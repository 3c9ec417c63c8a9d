//! The eBPF programs run by the kernel on crafted frames (BPF_PROG_TEST_RUN): the real object
//! overlay/build.rs builds, loaded in a network namespace of the test's own with its maps
//! filled as an agent fills them. Each case checks the verdict (`TC_ACT_*`), the frame the
//! program left, and that exactly the expected reason counter moved, by one packet.
//!
//! What test runs cannot show: where a redirect goes (the kernel reports `TC_ACT_REDIRECT` but
//! does not carry it out, nor return the target), and from-overlay past its first check: a test
//! run's skb has no tunnel metadata and no way to be given some, so from-overlay can only be
//! seen dropping as `no_tunnel_key` here (the lab tests cover the rest).

use std::{
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
};

use etherparse::{
    ArpHardwareId, ArpOperation, ArpPacket, EtherType, Ethernet2Header, NetSlice, PacketBuilder,
    SlicedPacket, TransportSlice,
};
use ferry_overlay::{
    common::{
        Config, Endpoint, GATEWAY_MAC, NatKey, NatValue, Reason, Vtep, config_flags, flags,
        ipv4_be, kind, programs,
    },
    datapath::Datapath,
    netns::{NetNsGuard, create_named, delete_named, netns_path},
};
use ferry_tests::require_root_and_tools;

/// Verdicts of TC programs (linux/pkt_cls.h).
const TC_ACT_OK: i32 = 0;
const TC_ACT_SHOT: i32 = 2;
const TC_ACT_REDIRECT: i32 = 7;

const VNI: u32 = 4242;
const OVERLAY: [u8; 4] = [10, 244, 0, 0];
const HOST_IP: [u8; 4] = [10, 244, 1, 1];
/// Container A (sends in most cases) and B, both on this host.
const A_IP: [u8; 4] = [10, 244, 1, 2];
const A_MAC: [u8; 6] = [0x02, 0, 0, 0, 1, 2];
const B_IP: [u8; 4] = [10, 244, 1, 3];
const B_MAC: [u8; 6] = [0x02, 0, 0, 0, 1, 3];
/// Frozen here, held by the agent.
const HELD_IP: [u8; 4] = [10, 244, 1, 4];
/// On another host.
const REMOTE_IP: [u8; 4] = [10, 244, 2, 2];
const REMOTE_VTEP: [u8; 4] = [192, 0, 2, 2];
/// This host's own underlay address (`Config::self_vtep_be`).
const SELF_VTEP: [u8; 4] = [192, 0, 2, 1];
/// In the overlay, but no endpoint anywhere.
const UNKNOWN_IP: [u8; 4] = [10, 244, 9, 9];
/// Gateway: a public address and a client on the internet side.
const PUBLIC_IP: [u8; 4] = [203, 0, 113, 10];
const PUBLIC_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xee, 1];
const CLIENT_IP: [u8; 4] = [198, 51, 100, 7];
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0xcc, 1];

/// The overlay's IPv6 /96 (first 96 bits) and an internet client's IPv6 address.
const OVERLAY6: [u8; 12] = [0x20, 0x01, 0x0d, 0xb8, 0, 0xf, 0, 0, 0, 0, 0, 0];
const CLIENT6: [u8; 16] = [
    0x20, 0x01, 0x0d, 0xb8, 0xff, 0xff, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10,
];

/// Endpoint `ip`'s IPv6 address.
fn v6(ip: [u8; 4]) -> [u8; 16] {
    ferry_overlay::common::ipv6_of(OVERLAY6, ipv4_be(ip))
}

/// An Ethernet + IPv6 + TCP (SYN) frame with a correct checksum.
fn tcp6(src_mac: [u8; 6], dst_mac: [u8; 6], src: [u8; 16], dst: [u8; 16]) -> Vec<u8> {
    let payload = b"ferry6";
    let builder = PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv6(src, dst, 64)
        .tcp(40000, 80, 1, 65535)
        .syn();
    let mut frame = Vec::with_capacity(builder.size(payload.len()));
    builder
        .write(&mut frame, payload)
        .expect("building a frame");
    frame
}

/// A network namespace of the test's own, deleted on drop.
struct Netns(String);

impl Netns {
    fn create() -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "ferry-ebpf-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        create_named(&name).expect("creating the test's netns");
        Self(name)
    }

    fn ip(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["-n", &self.0])
            .args(args)
            .output()
            .expect("ip runs");
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn ifindex(&self, dev: &str) -> u32 {
        let line = self.ip(&["-o", "link", "show", "dev", dev]);
        line.split(':')
            .next()
            .and_then(|i| i.trim().parse().ok())
            .unwrap_or_else(|| panic!("no ifindex in {line:?}"))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = delete_named(&self.0) {
            eprintln!("deleting netns {}: {e}", self.0);
        }
    }
}

/// The datapath loaded in a fresh namespace that the calling thread is in while this lives.
/// Fields drop in order: the datapath, then the thread goes home, then the namespace goes.
struct Bench {
    dp: Datapath,
    _guard: NetNsGuard,
    ns: Netns,
    /// Host sides of containers A's and B's veths.
    veth_a: u32,
    veth_b: u32,
    vxlan: u32,
    hold: u32,
    public: u32,
}

/// What a program did with one frame.
struct Run {
    action: i32,
    frame: Vec<u8>,
    /// Reasons whose counters moved: (reason, packets, bytes).
    moved: Vec<(Reason, u64, u64)>,
}

impl Run {
    /// Asserts the verdict and that `reason`, and only it, counted this one frame.
    fn expect(&self, action: i32, reason: Reason, len: usize) {
        assert_eq!(
            (self.action, self.moved.as_slice()),
            (action, [(reason, 1, len as u64)].as_slice()),
            "expected action {action} and one packet counted as {}",
            reason.name()
        );
    }
}

impl Bench {
    /// A namespace with containers A's and B's veths, a VXLAN device (external), a hold TAP
    /// and a public interface; the datapath attached as an agent attaches it, with A, B, the
    /// host, a held, a remote and a forwarded endpoint.
    fn new(gateway: bool) -> Self {
        let ns = Netns::create();
        ns.ip(&[
            "link", "add", "ctra", "type", "veth", "peer", "name", "ctra-c",
        ]);
        ns.ip(&[
            "link", "add", "ctrb", "type", "veth", "peer", "name", "ctrb-c",
        ]);
        ns.ip(&[
            "link", "add", "pub0", "type", "veth", "peer", "name", "pub0-p",
        ]);
        ns.ip(&[
            "link", "add", "ferry_vx", "type", "vxlan", "external", "dstport", "4789",
        ]);
        ns.ip(&["tuntap", "add", "hold0", "mode", "tap"]);
        let guard = NetNsGuard::enter(&netns_path(&ns.0)).expect("entering the test's netns");
        let (veth_a, veth_b) = (ns.ifindex("ctra"), ns.ifindex("ctrb"));
        let (vxlan, hold, public) = (
            ns.ifindex("ferry_vx"),
            ns.ifindex("hold0"),
            ns.ifindex("pub0"),
        );
        let config = Config {
            vni: VNI,
            vxlan_ifindex: vxlan,
            tunnel_ttl: 64,
            flags: if gateway { config_flags::GATEWAY } else { 0 },
            egress_vtep_be: 0,
            overlay_net_be: ipv4_be(OVERLAY),
            overlay_mask_be: ipv4_be([255, 255, 0, 0]),
            public_ifindex: if gateway { public } else { 0 },
            public_mac: if gateway { PUBLIC_MAC } else { [0; 6] },
            vxlan_port_be: 4789u16.to_be(),
            hold_ifindex: hold,
            self_vtep_be: ipv4_be(SELF_VTEP),
            // The IPv6 prefix is set but off (no `IPV6` flag) until a test turns it on.
            overlay6_prefix: OVERLAY6,
            // No-tunnel mode off unless a test turns it on.
            underlay_ifindex: 0,
            underlay_net_be: 0,
            underlay_mask_be: 0,
            // No relay interface for announcements unless a test sets one.
            announce_ifindex: 0,
        };
        let mut dp = Datapath::attach("ferry_vx", config, None).expect("datapath attach");
        let local = |ifindex, mac| Endpoint {
            kind: kind::LOCAL,
            ifindex,
            mac,
            ..Endpoint::default()
        };
        let remote = Endpoint {
            kind: kind::REMOTE,
            vtep_be: ipv4_be(REMOTE_VTEP),
            vni: VNI,
            ..Endpoint::default()
        };
        let host = Endpoint {
            kind: kind::HOST,
            ..Endpoint::default()
        };
        let held = Endpoint {
            kind: kind::HOLD,
            ..Endpoint::default()
        };
        for (ip, ep) in [
            (A_IP, local(veth_a, A_MAC)),
            (B_IP, local(veth_b, B_MAC)),
            (HOST_IP, host),
            (HELD_IP, held),
            (REMOTE_IP, remote),
        ] {
            dp.set_endpoint(ip.into(), ep).expect("set endpoint");
        }
        dp.allow_vtep(
            REMOTE_VTEP.into(),
            Vtep {
                vni: VNI,
                host_id: 2,
            },
        )
        .expect("allow vtep");
        Self {
            dp,
            _guard: guard,
            ns,
            veth_a,
            veth_b,
            vxlan,
            hold,
            public,
        }
    }

    fn counters(&self) -> Vec<(Reason, u64, u64)> {
        self.dp
            .counters()
            .expect("reading the counters")
            .into_iter()
            .map(|c| (c.reason, c.packets, c.bytes))
            .collect()
    }

    /// Runs `program` on `frame` as if it came in on `ifindex`.
    fn run(&self, program: &'static str, ifindex: u32, frame: &[u8]) -> Run {
        let before = self.counters();
        let out = self
            .dp
            .test_run(program, ifindex, frame)
            .unwrap_or_else(|e| panic!("test run of {program}: {e}"));
        let moved = before
            .iter()
            .zip(self.counters())
            .filter(|(b, a)| **b != *a)
            .map(|(b, a)| (a.0, a.1 - b.1, a.2 - b.2))
            .collect();
        Run {
            action: out.action,
            frame: out.packet,
            moved,
        }
    }
}

impl Bench {
    /// Container A sends from `src` to `dst`: from-container must give `action` for `reason`.
    fn a_sends(&self, src: [u8; 4], dst: [u8; 4], action: i32, reason: Reason) -> Run {
        let frame = from_a(src, dst);
        let run = self.run(programs::FROM_CONTAINER, self.veth_a, &frame);
        run.expect(action, reason, frame.len());
        run
    }
}

/// An Ethernet + IPv4 + TCP (SYN) frame with correct checksums.
fn tcp(src_mac: [u8; 6], dst_mac: [u8; 6], src: ([u8; 4], u16), dst: ([u8; 4], u16)) -> Vec<u8> {
    let payload = b"ferry";
    let builder = PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv4(src.0, dst.0, 64)
        .tcp(src.1, dst.1, 1, 65535)
        .syn();
    let mut frame = Vec::with_capacity(builder.size(payload.len()));
    builder
        .write(&mut frame, payload)
        .expect("building a frame");
    frame
}

/// A UDP datagram (e.g. VXLAN-shaped: 8 bytes of header and an inner frame as payload).
fn udp(src_mac: [u8; 6], dst_mac: [u8; 6], src: ([u8; 4], u16), dst: ([u8; 4], u16)) -> Vec<u8> {
    let payload = [0x08, 0, 0, 0, 0, 0, 0x2a, 0, 0xde, 0xad, 0xbe, 0xef];
    let builder = PacketBuilder::ethernet2(src_mac, dst_mac)
        .ipv4(src.0, dst.0, 64)
        .udp(src.1, dst.1);
    let mut frame = Vec::with_capacity(builder.size(payload.len()));
    builder
        .write(&mut frame, &payload)
        .expect("building a frame");
    frame
}

/// What a container sends to `dst` (to its gateway's MAC).
fn from_a(src: [u8; 4], dst: [u8; 4]) -> Vec<u8> {
    tcp(A_MAC, GATEWAY_MAC, (src, 40000), (dst, 80))
}

/// A broadcast ARP request: who has `target`? tell `sender`.
fn arp_request(sender_mac: [u8; 6], sender: [u8; 4], target: [u8; 4]) -> Vec<u8> {
    let arp = ArpPacket::new(
        ArpHardwareId::ETHERNET,
        EtherType::IPV4,
        ArpOperation::REQUEST,
        &sender_mac,
        &sender,
        &[0; 6],
        &target,
    )
    .expect("an ARP request");
    let mut frame = Vec::new();
    PacketBuilder::ethernet2(sender_mac, [0xff; 6])
        .arp(arp)
        .write_to_vec(&mut frame)
        .expect("building an ARP frame");
    frame
}

/// Asserts `frame` is the ARP reply "`ip` is at `mac`" addressed to the requester.
fn assert_arp_reply(frame: &[u8], mac: [u8; 6], ip: [u8; 4], to_mac: [u8; 6], to_ip: [u8; 4]) {
    let (eth, rest) = Ethernet2Header::from_slice(frame).expect("an Ethernet frame");
    assert_eq!((eth.source, eth.destination), (mac, to_mac), "{eth:?}");
    assert_eq!(eth.ether_type, EtherType::ARP);
    let arp = ArpPacket::from_slice(rest)
        .expect("an ARP packet")
        .try_eth_ipv4()
        .expect("Ethernet/IPv4 ARP");
    assert_eq!(arp.operation, ArpOperation::REPLY, "{arp:?}");
    assert_eq!(
        (
            arp.sender_mac,
            arp.sender_ipv4,
            arp.target_mac,
            arp.target_ipv4
        ),
        (mac, ip, to_mac, to_ip),
        "{arp:?}"
    );
}

/// The frame's (IPv4 source, IPv4 destination, TCP ports), after checking that its IPv4
/// header and TCP checksums are right for its contents.
fn tcp_endpoints(frame: &[u8]) -> (([u8; 4], u16), ([u8; 4], u16)) {
    let p = SlicedPacket::from_ethernet(frame).expect("an Ethernet/IPv4 frame");
    let Some(NetSlice::Ipv4(ip)) = p.net else {
        panic!("not IPv4: {:?}", p.net)
    };
    let ip = ip.header();
    assert_eq!(
        ip.header_checksum(),
        ip.to_header().calc_header_checksum(),
        "IPv4 header checksum"
    );
    let Some(TransportSlice::Tcp(tcp)) = p.transport else {
        panic!("not TCP: {:?}", p.transport)
    };
    assert_eq!(
        tcp.checksum(),
        tcp.calc_checksum_ipv4(ip.source(), ip.destination())
            .expect("segment fits"),
        "TCP checksum"
    );
    (
        (ip.source(), tcp.source_port()),
        (ip.destination(), tcp.destination_port()),
    )
}

fn eth_addrs(frame: &[u8]) -> ([u8; 6], [u8; 6]) {
    let (eth, _) = Ethernet2Header::from_slice(frame).expect("an Ethernet frame");
    (eth.source, eth.destination)
}

#[test]
fn from_container_answers_arp_delivers_and_drops_by_reason() {
    if !require_root_and_tools(&["ip"]) {
        return;
    }
    let b = Bench::new(false);
    let program = programs::FROM_CONTAINER;

    // ARP for the gateway: answered in place with the gateway MAC, sent back to the container.
    let req = arp_request(A_MAC, A_IP, HOST_IP);
    let run = b.run(program, b.veth_a, &req);
    run.expect(TC_ACT_REDIRECT, Reason::ArpReply, req.len());
    assert_arp_reply(&run.frame, GATEWAY_MAC, HOST_IP, A_MAC, A_IP);

    // A gratuitous ARP (sender asks for its own address) is not answered: it is an
    // announcement, which stays on the host when no relay interface is set.
    let grat = arp_request(A_MAC, A_IP, A_IP);
    b.run(program, b.veth_a, &grat)
        .expect(TC_ACT_SHOT, Reason::DropAnnounceNoRelay, grat.len());

    // A sending as B (B lives on another veth), or from an address nobody has: spoofed.
    for src in [B_IP, UNKNOWN_IP] {
        b.a_sends(src, B_IP, TC_ACT_SHOT, Reason::DropSpoofedSource);
    }

    // To a LOCAL endpoint: straight to its veth, addressed to its MAC from the gateway's.
    let run = b.a_sends(A_IP, B_IP, TC_ACT_REDIRECT, Reason::ContainerToLocal);
    assert_eq!(eth_addrs(&run.frame), (GATEWAY_MAC, B_MAC));
    assert_eq!(
        run.frame[14..],
        from_a(A_IP, B_IP)[14..],
        "only the Ethernet header changes"
    );

    // The same the other way round (B's own veth): its source is its own.
    let f = tcp(B_MAC, GATEWAY_MAC, (B_IP, 80), (A_IP, 40000));
    let run = b.run(program, b.veth_b, &f);
    run.expect(TC_ACT_REDIRECT, Reason::ContainerToLocal, f.len());
    assert_eq!(eth_addrs(&run.frame), (GATEWAY_MAC, A_MAC));

    // To a REMOTE endpoint: to the VXLAN device (whose egress program encapsulates), as is.
    let run = b.a_sends(A_IP, REMOTE_IP, TC_ACT_REDIRECT, Reason::ContainerEncap);
    assert_eq!(run.frame, from_a(A_IP, REMOTE_IP));

    for (dst, action, reason) in [
        // The host's own overlay address: to the stack.
        (HOST_IP, TC_ACT_OK, Reason::ContainerToHost),
        // An overlay address without an endpoint.
        (UNKNOWN_IP, TC_ACT_SHOT, Reason::DropNoEndpoint),
        // Outside the overlay, and no gateway known.
        (CLIENT_IP, TC_ACT_SHOT, Reason::DropNoEgress),
        // A HOLD endpoint: to the hold device.
        (HELD_IP, TC_ACT_REDIRECT, Reason::HoldQueued),
    ] {
        b.a_sends(A_IP, dst, action, reason);
    }

    // Not IPv4 (an IPv6 ethertype): dropped.
    let mut v6 = from_a(A_IP, B_IP);
    v6[12..14].copy_from_slice(&[0x86, 0xdd]);
    b.run(program, b.veth_a, &v6)
        .expect(TC_ACT_SHOT, Reason::DropNotIpv4, v6.len());
}

#[test]
fn from_container_follows_the_endpoint_entries_as_a_migration_changes_them() {
    if !require_root_and_tools(&["ip"]) {
        return;
    }
    let mut b = Bench::new(false);

    // A is migrating away: until its connections are dumped, its source copy (a forwarding
    // pointer that keeps its veth) may still send; once frozen, what it emits is dropped.
    let mut a = Endpoint {
        kind: kind::FORWARD,
        flags: 0,
        ifindex: b.veth_a,
        vtep_be: ipv4_be(REMOTE_VTEP),
        vni: VNI,
        mac: A_MAC,
        _pad: [0; 2],
    };
    b.dp.set_endpoint(A_IP.into(), a).expect("set A");
    b.a_sends(A_IP, B_IP, TC_ACT_REDIRECT, Reason::ContainerToLocal);
    a.flags = flags::DROP_EGRESS;
    b.dp.set_endpoint(A_IP.into(), a).expect("set A");
    b.a_sends(A_IP, B_IP, TC_ACT_SHOT, Reason::DropFrozenSource);

    // A restored here but not yet released (HOLD) already sends.
    a.kind = kind::HOLD;
    a.flags = 0;
    b.dp.set_endpoint(A_IP.into(), a).expect("set A");
    b.a_sends(A_IP, B_IP, TC_ACT_REDIRECT, Reason::ContainerToLocal);

    // A held endpoint while the agent has no hold device: dropped for that reason.
    let mut config = b.dp.config().expect("config");
    config.hold_ifindex = 0;
    b.dp.set_config(config).expect("set config");
    b.a_sends(A_IP, HELD_IP, TC_ACT_SHOT, Reason::DropNoHoldDevice);

    // Once the gateway's VTEP is known, traffic for the internet goes to it (via VXLAN).
    config.hold_ifindex = b.hold;
    config.egress_vtep_be = ipv4_be([192, 0, 2, 1]);
    b.dp.set_config(config).expect("set config");
    b.a_sends(A_IP, CLIENT_IP, TC_ACT_REDIRECT, Reason::ContainerEgress);

    // Without configuration (agent not ready) everything is dropped as such.
    config.vni = 0;
    b.dp.set_config(config).expect("set config");
    b.a_sends(A_IP, CLIENT_IP, TC_ACT_SHOT, Reason::DropNoConfig);
}

#[test]
fn the_vxlan_device_programs() {
    if !require_root_and_tools(&["ip"]) {
        return;
    }
    let b = Bench::new(false);

    // to-overlay sets the tunnel key for a REMOTE endpoint and lets the device encapsulate.
    let f = from_a(A_IP, REMOTE_IP);
    let run = b.run(programs::TO_OVERLAY, b.vxlan, &f);
    run.expect(TC_ACT_OK, Reason::OverlayEncap, f.len());
    assert_eq!(run.frame, f);
    let f = from_a(A_IP, UNKNOWN_IP);
    b.run(programs::TO_OVERLAY, b.vxlan, &f)
        .expect(TC_ACT_SHOT, Reason::DropNoEndpoint, f.len());

    // from-overlay: a test run cannot carry tunnel metadata (BPF_PROG_TEST_RUN builds a bare
    // skb and its context has no tunnel fields), so the frame stops at the first check.
    let f = tcp(
        [0x02, 0, 0, 0, 2, 2],
        [0x02, 0, 0, 0, 1, 1],
        (REMOTE_IP, 40000),
        (A_IP, 80),
    );
    b.run(programs::FROM_OVERLAY, b.vxlan, &f).expect(
        TC_ACT_SHOT,
        Reason::DropNoTunnelKey,
        f.len(),
    );

    // The bench leaves nothing behind.
    let ns = netns_path(&b.ns.0);
    drop(b);
    assert!(!ns.exists(), "{} left behind", ns.display());
}

#[test]
fn from_public_translates_mapped_ports_with_correct_checksums() {
    if !require_root_and_tools(&["ip"]) {
        return;
    }
    let mut b = Bench::new(true);
    let program = programs::FROM_PUBLIC;
    let public = ipv4_be(PUBLIC_IP);
    // As the gateway host's agent maps PUBLIC_IP:80/tcp to A:8080.
    b.dp.set_public(
        NatKey::presence(public),
        NatValue {
            addr_be: public,
            ..NatValue::default()
        },
    )
    .expect("set presence");
    let tcp_key = |addr_be, port: u16| NatKey {
        addr_be,
        port_be: port.to_be(),
        proto: 6,
        _pad: 0,
    };
    let tcp_value = |addr_be, port: u16| NatValue {
        addr_be,
        port_be: port.to_be(),
        _pad: [0; 2],
    };
    b.dp.set_public(tcp_key(public, 80), tcp_value(ipv4_be(A_IP), 8080))
        .expect("set mapping");
    b.dp.set_snat(tcp_key(ipv4_be(A_IP), 8080), tcp_value(public, 80))
        .expect("set snat");

    // A client's SYN to the public address: destination translated, checksums still right,
    // sent to the container.
    let syn = tcp(CLIENT_MAC, PUBLIC_MAC, (CLIENT_IP, 40000), (PUBLIC_IP, 80));
    let run = b.run(program, b.public, &syn);
    run.expect(TC_ACT_REDIRECT, Reason::PublicDnat, syn.len());
    assert_eq!(
        tcp_endpoints(&run.frame),
        ((CLIENT_IP, 40000), (A_IP, 8080))
    );
    assert_eq!(eth_addrs(&run.frame), (GATEWAY_MAC, A_MAC));

    // A port of the public address that nothing maps: dropped.
    let f = tcp(CLIENT_MAC, PUBLIC_MAC, (CLIENT_IP, 40000), (PUBLIC_IP, 81));
    b.run(program, b.public, &f)
        .expect(TC_ACT_SHOT, Reason::DropNoPublicMapping, f.len());

    // Not a public address (the gateway's own traffic): to the stack, untouched.
    let f = tcp(
        CLIENT_MAC,
        PUBLIC_MAC,
        (CLIENT_IP, 40000),
        ([203, 0, 113, 99], 80),
    );
    let run = b.run(program, b.public, &f);
    run.expect(TC_ACT_OK, Reason::PublicPass, f.len());
    assert_eq!(run.frame, f);

    // VXLAN from the internet (whatever outer source it claims) never reaches the gateway's
    // VXLAN device: dropped and counted. Another UDP port of the gateway's own passes.
    let gw_own = [203, 0, 113, 1];
    let f = udp(CLIENT_MAC, PUBLIC_MAC, (CLIENT_IP, 40000), (gw_own, 4789));
    b.run(program, b.public, &f)
        .expect(TC_ACT_SHOT, Reason::DropVxlanFromPublic, f.len());
    let f = udp(CLIENT_MAC, PUBLIC_MAC, (CLIENT_IP, 40000), (gw_own, 4790));
    b.run(program, b.public, &f)
        .expect(TC_ACT_OK, Reason::PublicPass, f.len());

    // The control plane (on hosts' underlay addresses) is not served on the public side: the
    // gateway's own underlay address and another host's are dropped from the internet, and a
    // container may address neither.
    for (vtep, port) in [(SELF_VTEP, 7400), (REMOTE_VTEP, 7401)] {
        let f = tcp(CLIENT_MAC, PUBLIC_MAC, (CLIENT_IP, 40000), (vtep, port));
        b.run(program, b.public, &f)
            .expect(TC_ACT_SHOT, Reason::DropUnderlayFromPublic, f.len());
        let f = tcp(A_MAC, GATEWAY_MAC, (A_IP, 40000), (vtep, port));
        b.run(programs::FROM_CONTAINER, b.veth_a, &f).expect(
            TC_ACT_SHOT,
            Reason::DropContainerToUnderlay,
            f.len(),
        );
    }

    // ARP for the public address is answered with the public interface's MAC.
    let req = arp_request(CLIENT_MAC, CLIENT_IP, PUBLIC_IP);
    let run = b.run(program, b.public, &req);
    run.expect(TC_ACT_REDIRECT, Reason::ArpReply, req.len());
    assert_arp_reply(&run.frame, PUBLIC_MAC, PUBLIC_IP, CLIENT_MAC, CLIENT_IP);

    // Standing by (another gateway-role host faces the internet): the ARP goes unanswered,
    // counted; a segment that still reaches this host is translated all the same.
    let mut config = b.dp.config().expect("config");
    config.flags |= config_flags::PUBLIC_STANDBY;
    b.dp.set_config(config).expect("set config");
    let run = b.run(program, b.public, &req);
    run.expect(TC_ACT_OK, Reason::PublicStandbyArp, req.len());
    assert_eq!(run.frame, req, "left as it came");
    let run = b.run(program, b.public, &syn);
    run.expect(TC_ACT_REDIRECT, Reason::PublicDnat, syn.len());
    config.flags &= !config_flags::PUBLIC_STANDBY;
    b.dp.set_config(config).expect("set config");

    // The reply from the container (on the gateway host): source translated back, checksums
    // still right, handed to the gateway's stack.
    let reply = tcp(A_MAC, GATEWAY_MAC, (A_IP, 8080), (CLIENT_IP, 40000));
    let run = b.run(programs::FROM_CONTAINER, b.veth_a, &reply);
    run.expect(TC_ACT_OK, Reason::PublicSnat, reply.len());
    assert_eq!(
        tcp_endpoints(&run.frame),
        ((PUBLIC_IP, 80), (CLIENT_IP, 40000))
    );
}

/// A TCP segment with the SYN and/or ACK flags as asked (no payload).
fn tcp_segment(src: ([u8; 4], u16), dst: ([u8; 4], u16), syn: bool, ack: bool) -> Vec<u8> {
    let mut builder = PacketBuilder::ethernet2(A_MAC, GATEWAY_MAC)
        .ipv4(src.0, dst.0, 64)
        .tcp(src.1, dst.1, 1000, 65535);
    if syn {
        builder = builder.syn();
    }
    if ack {
        builder = builder.ack(1);
    }
    let mut frame = Vec::with_capacity(builder.size(0));
    builder.write(&mut frame, &[]).expect("building a frame");
    frame
}

/// `HOLD_SYN` on a `LOCAL` entry (a container drained before a checkpoint): a new connection's
/// SYN goes to the hold device, counted as `hold_syn`, in from-container and in from-hold (the
/// re-injection path); everything else of the container's traffic is delivered as before; and
/// without the flag the same SYN is delivered again.
#[test]
fn a_draining_endpoint_holds_new_connections_and_delivers_the_rest() {
    if !require_root_and_tools(&["ip"]) {
        return;
    }
    let mut b = Bench::new(false);
    let mut drained = Endpoint {
        kind: kind::LOCAL,
        flags: flags::HOLD_SYN,
        ifindex: b.veth_b,
        mac: B_MAC,
        ..Endpoint::default()
    };
    b.dp.set_endpoint(B_IP.into(), drained).expect("set B");
    let syn = tcp_segment((A_IP, 40000), (B_IP, 80), true, false);
    let ack = tcp_segment((A_IP, 40000), (B_IP, 80), false, true);
    let syn_ack = tcp_segment((A_IP, 80), (B_IP, 40000), true, true);

    // from-container: A opens a connection to B: held, the frame untouched (it is delivered
    // as it is later).
    let run = b.run(programs::FROM_CONTAINER, b.veth_a, &syn);
    run.expect(TC_ACT_REDIRECT, Reason::HoldSyn, syn.len());
    assert_eq!(run.frame, syn, "a held SYN is not rewritten");
    // A segment of an established connection, and the answer to a connection B opened: to B.
    for f in [&ack, &syn_ack] {
        let run = b.run(programs::FROM_CONTAINER, b.veth_a, f);
        run.expect(TC_ACT_REDIRECT, Reason::ContainerToLocal, f.len());
        assert_eq!(eth_addrs(&run.frame), (GATEWAY_MAC, B_MAC));
    }
    // Not TCP at all: to B.
    let dgram = udp(A_MAC, GATEWAY_MAC, (A_IP, 5353), (B_IP, 53));
    b.run(programs::FROM_CONTAINER, b.veth_a, &dgram).expect(
        TC_ACT_REDIRECT,
        Reason::ContainerToLocal,
        dgram.len(),
    );

    // from-hold (a frame the agent writes back) while the flag is on: the SYN waits again;
    // other segments reach the container.
    b.run(programs::FROM_HOLD, b.hold, &syn)
        .expect(TC_ACT_REDIRECT, Reason::HoldSyn, syn.len());
    b.run(programs::FROM_HOLD, b.hold, &ack).expect(
        TC_ACT_REDIRECT,
        Reason::HoldReleased,
        ack.len(),
    );

    // The drain over (flag cleared): the same SYN goes to B, from either program.
    drained.flags = 0;
    b.dp.set_endpoint(B_IP.into(), drained).expect("set B");
    b.run(programs::FROM_CONTAINER, b.veth_a, &syn).expect(
        TC_ACT_REDIRECT,
        Reason::ContainerToLocal,
        syn.len(),
    );
    b.run(programs::FROM_HOLD, b.hold, &syn).expect(
        TC_ACT_REDIRECT,
        Reason::HoldReleased,
        syn.len(),
    );

    // Draining without a hold device: dropped as such (never delivered to the listener).
    drained.flags = flags::HOLD_SYN;
    b.dp.set_endpoint(B_IP.into(), drained).expect("set B");
    let mut config = b.dp.config().expect("config");
    config.hold_ifindex = 0;
    b.dp.set_config(config).expect("set config");
    b.run(programs::FROM_CONTAINER, b.veth_a, &syn).expect(
        TC_ACT_SHOT,
        Reason::DropNoHoldDevice,
        syn.len(),
    );
}

/// On the gateway: a client's SYN through the public address to a drained container on the
/// gateway host is held too; its next segments are translated and delivered.
#[test]
fn from_public_holds_a_new_connection_to_a_draining_container() {
    if !require_root_and_tools(&["ip"]) {
        return;
    }
    let mut b = Bench::new(true);
    let public = ipv4_be(PUBLIC_IP);
    b.dp.set_public(
        NatKey::presence(public),
        NatValue {
            addr_be: public,
            ..NatValue::default()
        },
    )
    .expect("set presence");
    // The whole address: PUBLIC_IP → A.
    b.dp.set_public(
        NatKey {
            addr_be: public,
            ..NatKey::default()
        },
        NatValue {
            addr_be: ipv4_be(A_IP),
            ..NatValue::default()
        },
    )
    .expect("set mapping");
    b.dp.set_endpoint(
        A_IP.into(),
        Endpoint {
            kind: kind::LOCAL,
            flags: flags::HOLD_SYN,
            ifindex: b.veth_a,
            mac: A_MAC,
            ..Endpoint::default()
        },
    )
    .expect("set A");
    let syn = tcp(CLIENT_MAC, PUBLIC_MAC, (CLIENT_IP, 40000), (PUBLIC_IP, 80));
    let run = b.run(programs::FROM_PUBLIC, b.public, &syn);
    run.expect(TC_ACT_REDIRECT, Reason::HoldSyn, syn.len());
    // Translated before it was held: written back later, it goes to the container as is.
    assert_eq!(tcp_endpoints(&run.frame), ((CLIENT_IP, 40000), (A_IP, 80)));
    let mut ack = tcp_segment((CLIENT_IP, 40000), (PUBLIC_IP, 80), false, true);
    ack[..6].copy_from_slice(&PUBLIC_MAC);
    let run = b.run(programs::FROM_PUBLIC, b.public, &ack);
    run.expect(TC_ACT_REDIRECT, Reason::PublicDnat, ack.len());
    assert_eq!(tcp_endpoints(&run.frame), ((CLIENT_IP, 40000), (A_IP, 80)));
}

impl Bench {
    /// Turns the overlay dual-stack (and, on a gateway, IPv6 routed from the internet side
    /// when `public6`).
    fn dual_stack(&mut self, public6: bool) {
        let mut config = self.dp.config().expect("config");
        config.flags |= config_flags::IPV6;
        if public6 {
            config.flags |= config_flags::PUBLIC6;
        }
        self.dp.set_config(config).expect("set config");
    }

    /// Container A sends IPv6 from `src` to `dst`.
    fn a_sends6(&self, src: [u8; 16], dst: [u8; 16], action: i32, reason: Reason) -> Run {
        let frame = tcp6(A_MAC, GATEWAY_MAC, src, dst);
        let run = self.run(programs::FROM_CONTAINER, self.veth_a, &frame);
        run.expect(action, reason, frame.len());
        run
    }
}

/// Dual-stack: an endpoint's IPv6 address (the overlay's /96 and its IPv4 address) shares its
/// IPv4 entry, so IPv6 is delivered, encapsulated, held, spoof-checked and dropped after a
/// freeze exactly as IPv4 is; link-scoped IPv6 (MLD, DAD, router solicitations) is dropped for
/// its own reason.
#[test]
fn ipv6_shares_the_endpoint_entry_of_its_ipv4_address() {
    if !require_root_and_tools(&["ip"]) {
        return;
    }
    let mut b = Bench::new(false);
    let program = programs::FROM_CONTAINER;

    // IPv4-only overlay: IPv6 is not carried.
    let f = tcp6(A_MAC, GATEWAY_MAC, v6(A_IP), v6(B_IP));
    b.run(program, b.veth_a, &f)
        .expect(TC_ACT_SHOT, Reason::DropNotIpv4, f.len());

    b.dual_stack(false);
    let run = b.a_sends6(
        v6(A_IP),
        v6(B_IP),
        TC_ACT_REDIRECT,
        Reason::ContainerToLocal,
    );
    assert_eq!(eth_addrs(&run.frame), (GATEWAY_MAC, B_MAC));
    assert_eq!(run.frame[14..], f[14..], "only the Ethernet header changes");
    let run = b.a_sends6(
        v6(A_IP),
        v6(REMOTE_IP),
        TC_ACT_REDIRECT,
        Reason::ContainerEncap,
    );
    assert_eq!(run.frame, tcp6(A_MAC, GATEWAY_MAC, v6(A_IP), v6(REMOTE_IP)));
    b.a_sends6(v6(A_IP), v6(HELD_IP), TC_ACT_REDIRECT, Reason::HoldQueued);
    b.a_sends6(
        v6(A_IP),
        v6(UNKNOWN_IP),
        TC_ACT_SHOT,
        Reason::DropNoEndpoint,
    );
    b.a_sends6(v6(A_IP), v6(HOST_IP), TC_ACT_SHOT, Reason::DropIpv6ToHost);
    // Outside the overlay and no gateway known.
    b.a_sends6(v6(A_IP), CLIENT6, TC_ACT_SHOT, Reason::DropNoEgress);

    // Spoofing: B's IPv6 address, an address outside the prefix, an IPv4 key in IPv6 form
    // of nobody.
    let mut outside = v6(A_IP);
    outside[4] = 0xee;
    for src in [v6(B_IP), outside, v6(UNKNOWN_IP)] {
        b.a_sends6(src, v6(B_IP), TC_ACT_SHOT, Reason::DropSpoofedSource);
    }
    // Link-scoped: from a link-local or the unspecified address, or to multicast (MLD).
    let mut link_local = [0u8; 16];
    link_local[..2].copy_from_slice(&[0xfe, 0x80]);
    link_local[15] = 0x42;
    let mut mld = [0u8; 16];
    mld[..2].copy_from_slice(&[0xff, 0x02]);
    mld[15] = 0x16;
    b.a_sends6(link_local, v6(B_IP), TC_ACT_SHOT, Reason::DropIpv6LinkLocal);
    b.a_sends6([0; 16], v6(B_IP), TC_ACT_SHOT, Reason::DropIpv6LinkLocal);
    b.a_sends6(v6(A_IP), mld, TC_ACT_SHOT, Reason::DropIpv6LinkLocal);

    // A freeze marks the one entry: IPv6 from the frozen copy is dropped too.
    let a = Endpoint {
        kind: kind::FORWARD,
        flags: flags::DROP_EGRESS,
        ifindex: b.veth_a,
        vtep_be: ipv4_be(REMOTE_VTEP),
        vni: VNI,
        mac: A_MAC,
        _pad: [0; 2],
    };
    b.dp.set_endpoint(A_IP.into(), a).expect("set A");
    b.a_sends6(v6(A_IP), v6(B_IP), TC_ACT_SHOT, Reason::DropFrozenSource);
    b.a_sends(A_IP, B_IP, TC_ACT_SHOT, Reason::DropFrozenSource);

    // A's packets for the internet go to the gateway's VTEP once it is known.
    b.dp.set_endpoint(
        A_IP.into(),
        Endpoint {
            kind: kind::LOCAL,
            ifindex: b.veth_a,
            mac: A_MAC,
            ..Endpoint::default()
        },
    )
    .expect("set A");
    let mut config = b.dp.config().expect("config");
    config.egress_vtep_be = ipv4_be([192, 0, 2, 1]);
    b.dp.set_config(config).expect("set config");
    b.a_sends6(v6(A_IP), CLIENT6, TC_ACT_REDIRECT, Reason::ContainerEgress);

    // The hold device writes a held IPv6 packet back to its (now running) container.
    let f = tcp6(A_MAC, GATEWAY_MAC, v6(B_IP), v6(A_IP));
    let run = b.run(programs::FROM_HOLD, b.hold, &f);
    run.expect(TC_ACT_REDIRECT, Reason::HoldReleased, f.len());
    assert_eq!(eth_addrs(&run.frame), (GATEWAY_MAC, A_MAC));
}

/// The gateway and IPv6: the overlay's prefix is routed from the internet only with
/// `PUBLIC6`; the internet cannot pose as a container; containers' IPv6 for the internet goes
/// to the gateway's stack (forwarded, masqueraded unless routed).
#[test]
fn the_gateway_routes_the_overlays_ipv6_only_when_told_to() {
    if !require_root_and_tools(&["ip"]) {
        return;
    }
    let mut b = Bench::new(true);
    b.dual_stack(false);
    let from_client = |dst: [u8; 16]| tcp6(CLIENT_MAC, PUBLIC_MAC, CLIENT6, dst);

    let f = from_client(v6(A_IP));
    b.run(programs::FROM_PUBLIC, b.public, &f)
        .expect(TC_ACT_SHOT, Reason::DropNoPublic6, f.len());
    // The gateway's own IPv6 (its public address, neighbour discovery): to its stack.
    let mut own = CLIENT6;
    own[15] = 1;
    let f = from_client(own);
    b.run(programs::FROM_PUBLIC, b.public, &f)
        .expect(TC_ACT_OK, Reason::PublicPass, f.len());

    b.dual_stack(true);
    let f = from_client(v6(A_IP));
    let run = b.run(programs::FROM_PUBLIC, b.public, &f);
    run.expect(TC_ACT_REDIRECT, Reason::Public6Routed, f.len());
    assert_eq!(eth_addrs(&run.frame), (GATEWAY_MAC, A_MAC));
    assert_eq!(run.frame[14..], f[14..], "routed, not translated");
    let f = from_client(v6(REMOTE_IP));
    b.run(programs::FROM_PUBLIC, b.public, &f).expect(
        TC_ACT_REDIRECT,
        Reason::Public6Routed,
        f.len(),
    );
    let f = from_client(v6(UNKNOWN_IP));
    b.run(programs::FROM_PUBLIC, b.public, &f)
        .expect(TC_ACT_SHOT, Reason::DropNoEndpoint, f.len());
    // A forged container source from the internet.
    let f = tcp6(CLIENT_MAC, PUBLIC_MAC, v6(B_IP), v6(A_IP));
    b.run(programs::FROM_PUBLIC, b.public, &f).expect(
        TC_ACT_SHOT,
        Reason::DropSpoofedSource,
        f.len(),
    );

    // A container on the gateway host talking to the internet: to the gateway's stack.
    b.a_sends6(v6(A_IP), CLIENT6, TC_ACT_OK, Reason::GatewayToStack);

    // The gateway's own MLD report on the VXLAN device (IPv6 is on there): its own reason,
    // not `no_endpoint`.
    let mut mld = [0u8; 16];
    mld[..2].copy_from_slice(&[0xff, 0x02]);
    mld[15] = 0x16;
    let f = tcp6(
        [0x0e, 0xfe, 0, 0, 0, 9],
        [0x33, 0x33, 0, 0, 0, 0x16],
        [0; 16],
        mld,
    );
    b.run(programs::TO_OVERLAY, b.vxlan, &f).expect(
        TC_ACT_SHOT,
        Reason::DropIpv6LinkLocal,
        f.len(),
    );
}

/// A neighbour solicitation from `src` for `target` (with a source link-layer option when
/// `option`), checksum not filled in (the datapath does not check it).
fn ns(src_mac: [u8; 6], src: [u8; 16], target: [u8; 16], option: bool) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&[0x33, 0x33, 0xff, target[13], target[14], target[15]]);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
    let len: u16 = if option { 32 } else { 24 };
    f.extend_from_slice(&len.to_be_bytes());
    f.extend_from_slice(&[58, 255]);
    f.extend_from_slice(&src);
    let mut dst = [0u8; 16];
    dst[..2].copy_from_slice(&[0xff, 0x02]);
    dst[11..13].copy_from_slice(&[1, 0xff]);
    dst[13..].copy_from_slice(&target[13..]);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&[135, 0, 0, 0, 0, 0, 0, 0]);
    f.extend_from_slice(&target);
    if option {
        f.extend_from_slice(&[1, 1]);
        f.extend_from_slice(&src_mac);
    }
    f
}

/// The ICMPv6 checksum of an Ethernet/IPv6/ICMPv6 frame, computed here independently: zero
/// when the frame's checksum is right.
fn icmpv6_residue(f: &[u8]) -> u16 {
    let ip = &f[14..54];
    let msg = &f[54..];
    let mut words: Vec<u16> = Vec::new();
    let mut push = |b: &[u8]| {
        for c in b.chunks(2) {
            words.push(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
        }
    };
    push(&ip[8..40]);
    push(&(msg.len() as u32).to_be_bytes());
    push(&[0, 0, 0, 58]);
    push(msg);
    let mut sum: u32 = words.iter().map(|&w| u32::from(w)).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A container's neighbour solicitation is answered like its ARP: a neighbour advertisement
/// "target is at the gateway MAC", with a correct checksum, back to the container; never for
/// duplicate address detection (unspecified source).
#[test]
fn from_container_answers_ipv6_neighbour_solicitations() {
    if !require_root_and_tools(&["ip"]) {
        return;
    }
    let mut b = Bench::new(false);
    b.dual_stack(false);
    let mut gw6 = [0u8; 16];
    gw6[..2].copy_from_slice(&[0xfe, 0x80]);
    gw6[15] = 1;
    for option in [true, false] {
        let req = ns(A_MAC, v6(A_IP), gw6, option);
        let run = b.run(programs::FROM_CONTAINER, b.veth_a, &req);
        // Counted at the length it leaves with (an NS without its option grows by 8 bytes).
        run.expect(TC_ACT_REDIRECT, Reason::NdpReply, 86);
        let f = &run.frame;
        assert_eq!(f.len(), 86, "an NA with a target link-layer option");
        assert_eq!(eth_addrs(f), (GATEWAY_MAC, A_MAC));
        assert_eq!(&f[12..14], &[0x86, 0xdd]);
        assert_eq!(
            (f[18], f[19], f[20], f[21]),
            (0, 32, 58, 255),
            "length, ICMPv6, hops"
        );
        assert_eq!(&f[22..38], &gw6, "from the address asked for");
        assert_eq!(&f[38..54], &v6(A_IP), "to the asker");
        assert_eq!(
            (f[54], f[55], f[58]),
            (136, 0, 0xe0),
            "NA, router|solicited|override"
        );
        assert_eq!(&f[62..78], &gw6, "target");
        assert_eq!(&f[78..80], &[2, 1], "target link-layer address option");
        assert_eq!(&f[80..86], &GATEWAY_MAC);
        assert_eq!(icmpv6_residue(f), 0, "ICMPv6 checksum");
    }
    // Duplicate address detection: not answered, dropped as link-scoped.
    let dad = ns(A_MAC, [0; 16], v6(A_IP), false);
    b.run(programs::FROM_CONTAINER, b.veth_a, &dad).expect(
        TC_ACT_SHOT,
        Reason::DropIpv6LinkLocal,
        dad.len(),
    );
}

/// No-tunnel mode: from-container sends IPv4 for an endpoint of a same-subnet host to the
/// underlay neighbour (IPv6, and hosts of other subnets, keep the tunnel); from-underlay
/// delivers such packets when their source is an endpoint of a same-subnet host and passes
/// everything else to the stack.
#[test]
fn the_no_tunnel_mode_sends_and_accepts_untunnelled_packets_between_same_subnet_hosts() {
    if !require_root_and_tools(&["ip"]) {
        return;
    }
    let mut b = Bench::new(false);
    b.dual_stack(false);
    // Without the mode: tunnelled, and from-underlay passes everything.
    b.a_sends(A_IP, REMOTE_IP, TC_ACT_REDIRECT, Reason::ContainerEncap);
    let f = tcp(CLIENT_MAC, B_MAC, (REMOTE_IP, 5000), (A_IP, 80));
    b.run(programs::FROM_UNDERLAY, b.public, &f)
        .expect(TC_ACT_OK, Reason::UnderlayPass, f.len());

    let mut config = b.dp.config().expect("config");
    config.flags |= config_flags::DIRECT;
    config.underlay_ifindex = b.public;
    config.underlay_net_be = ipv4_be([192, 0, 2, 0]);
    config.underlay_mask_be = ipv4_be([255, 255, 255, 0]);
    b.dp.set_config(config).expect("set config");

    b.a_sends(A_IP, REMOTE_IP, TC_ACT_REDIRECT, Reason::ContainerDirect);
    b.a_sends6(
        v6(A_IP),
        v6(REMOTE_IP),
        TC_ACT_REDIRECT,
        Reason::ContainerEncap,
    );
    // From the remote container to A, untunnelled: delivered, addressed to A.
    let run = b.run(programs::FROM_UNDERLAY, b.public, &f);
    run.expect(TC_ACT_REDIRECT, Reason::UnderlayToLocal, f.len());
    assert_eq!(eth_addrs(&run.frame), (GATEWAY_MAC, A_MAC));
    // From an overlay address no same-subnet host has (nobody's, or a local container's).
    for src in [UNKNOWN_IP, B_IP] {
        let forged = tcp(CLIENT_MAC, B_MAC, (src, 5000), (A_IP, 80));
        b.run(programs::FROM_UNDERLAY, b.public, &forged).expect(
            TC_ACT_SHOT,
            Reason::DropUnderlaySource,
            forged.len(),
        );
    }
    // The host's own traffic and VXLAN: to the stack.
    for frame in [
        tcp(CLIENT_MAC, B_MAC, (REMOTE_VTEP, 5000), (SELF_VTEP, 7400)),
        udp(CLIENT_MAC, B_MAC, (REMOTE_VTEP, 5000), (SELF_VTEP, 4789)),
        arp_request(CLIENT_MAC, REMOTE_VTEP, SELF_VTEP),
    ] {
        b.run(programs::FROM_UNDERLAY, b.public, &frame).expect(
            TC_ACT_OK,
            Reason::UnderlayPass,
            frame.len(),
        );
    }
    // A host of another subnet keeps the tunnel.
    let far = Endpoint {
        kind: kind::REMOTE,
        vtep_be: ipv4_be([198, 51, 100, 9]),
        vni: VNI,
        ..Endpoint::default()
    };
    b.dp.set_endpoint(UNKNOWN_IP.into(), far).expect("set far");
    b.a_sends(A_IP, UNKNOWN_IP, TC_ACT_REDIRECT, Reason::ContainerEncap);
}

/// A container's own announcements — the gratuitous ARPs and unsolicited NA the agent sends
/// (ferry-announce's frames) — are copied out of the relay interface, as they are, and go no
/// further; without a relay interface they are dropped by reason. Only an address and MAC of
/// the container's own, from its own veth, while its entry is LOCAL: forged and early ones
/// are dropped by reason and never relayed.
#[test]
fn from_container_relays_only_a_containers_own_announcements() {
    use ferry_announce::frames::{garp_reply, garp_request, unsolicited_na};
    if !require_root_and_tools(&["ip"]) {
        return;
    }
    let mut b = Bench::new(false);
    b.dual_stack(false);
    let a6 = std::net::Ipv6Addr::from(v6(A_IP));
    let own = [
        garp_request(A_MAC, A_IP.into()),
        garp_reply(A_MAC, A_IP.into()),
        unsolicited_na(A_MAC, a6),
    ];
    let program = programs::FROM_CONTAINER;
    for f in &own {
        b.run(program, b.veth_a, f)
            .expect(TC_ACT_SHOT, Reason::DropAnnounceNoRelay, f.len());
    }

    // The relay interface: one end of a veth pair; what leaves through it is counted there
    // (IPv6 off on it, so the kernel sends nothing of its own; this thread is in the
    // namespace, whose sysctls /proc/sys/net shows).
    std::fs::write("/proc/sys/net/ipv6/conf/pub0/disable_ipv6", "1").expect("IPv6 off");
    b.ns.ip(&["link", "set", "pub0-p", "up"]);
    b.ns.ip(&["link", "set", "pub0", "up"]);
    let mut config = b.dp.config().expect("config");
    config.announce_ifindex = b.public;
    b.dp.set_config(config).expect("set config");
    let relayed = |b: &Bench| -> u64 {
        let out = b.ns.ip(&["-s", "-j", "link", "show", "dev", "pub0"]);
        let v: serde_json::Value = serde_json::from_str(&out).expect("ip -j");
        v[0]["stats64"]["tx"]["packets"]
            .as_u64()
            .expect("tx packets")
    };
    for f in &own {
        let before = relayed(&b);
        let run = b.run(program, b.veth_a, f);
        run.expect(TC_ACT_SHOT, Reason::AnnounceRelayed, f.len());
        assert_eq!(
            relayed(&b),
            before + 1,
            "one copy left through the relay interface"
        );
    }

    let before = relayed(&b);
    let b6 = std::net::Ipv6Addr::from(v6(B_IP));
    let mut other_mac = garp_request([0x02, 0, 0, 0, 9, 9], A_IP.into());
    // From A's MAC, but naming another MAC in the ARP body.
    other_mac[6..12].copy_from_slice(&A_MAC);
    let mut na_other_mac = unsolicited_na(A_MAC, a6);
    // The NA's target link-layer option names another MAC (checksum left as it is: the
    // datapath does not check it, it refuses the claim).
    na_other_mac[80..86].copy_from_slice(&B_MAC);
    for (what, f, reason) in [
        // A announcing B's addresses (B lives on another veth).
        (
            "B's IPv4",
            garp_request(A_MAC, B_IP.into()),
            Reason::DropSpoofedSource,
        ),
        (
            "B's IPv6",
            unsolicited_na(A_MAC, b6),
            Reason::DropSpoofedSource,
        ),
        // An address nobody has.
        (
            "unknown IPv4",
            garp_request(A_MAC, UNKNOWN_IP.into()),
            Reason::DropSpoofedSource,
        ),
        // Its own address at another MAC.
        ("IPv4 at another MAC", other_mac, Reason::DropSpoofedSource),
        (
            "IPv6 at another MAC",
            na_other_mac,
            Reason::DropSpoofedSource,
        ),
    ] {
        let run = b.run(program, b.veth_a, &f);
        assert_eq!(
            (run.action, run.moved.as_slice()),
            (TC_ACT_SHOT, [(reason, 1, f.len() as u64)].as_slice()),
            "{what}"
        );
    }

    // A's entry is HOLD (restored here, not yet released), then LOCAL but frozen (a source
    // whose dump started): its announcements would draw peers to the wrong copy.
    let local =
        b.dp.endpoints()
            .into_iter()
            .find(|(ip, _)| *ip == std::net::Ipv4Addr::from(A_IP));
    let (_, local) = local.expect("A's entry");
    for ep in [
        Endpoint {
            kind: kind::HOLD,
            ..local
        },
        Endpoint {
            flags: flags::DROP_EGRESS,
            ..local
        },
    ] {
        b.dp.set_endpoint(A_IP.into(), ep).expect("set endpoint");
        for f in &own {
            b.run(program, b.veth_a, f)
                .expect(TC_ACT_SHOT, Reason::DropAnnounceNotLocal, f.len());
        }
    }
    assert_eq!(relayed(&b), before, "nothing forged or early was relayed");
}

/// An agent upgraded across a change of the endpoint map's size or flags (131,072 entries,
/// preallocated, before 256 Ki not preallocated) finds the older map pinned: the datapath
/// creates the new one, copies every entry into it before any program uses it, and pins it
/// in the old one's place.
#[test]
fn an_older_pinned_endpoint_map_is_replaced_with_its_entries() {
    if !require_root_and_tools(&["ip"]) {
        return;
    }
    use aya::maps::{HashMap, MapData, MapInfo};
    let ns = Netns::create();
    ns.ip(&[
        "link", "add", "ferry_vx", "type", "vxlan", "external", "dstport", "4789",
    ]);
    let _guard = NetNsGuard::enter(&netns_path(&ns.0)).expect("entering the test's netns");
    let dir = std::path::PathBuf::from(format!("/sys/fs/bpf/ferry-test-resize-{}", ns.0));
    std::fs::create_dir_all(&dir).unwrap();
    let pinned = dir.join(ferry_overlay::common::maps::ENDPOINTS);
    let mut old: HashMap<MapData, u32, Endpoint> = HashMap::create(131_072, 0).unwrap();
    let remote = Endpoint {
        kind: kind::REMOTE,
        vtep_be: ipv4_be(REMOTE_VTEP),
        vni: VNI,
        ..Endpoint::default()
    };
    for ip in [A_IP, B_IP, REMOTE_IP] {
        old.insert(ipv4_be(ip), remote, 0).unwrap();
    }
    old.pin(&pinned).unwrap();
    let config = Config {
        vni: VNI,
        tunnel_ttl: 64,
        overlay_net_be: ipv4_be(OVERLAY),
        overlay_mask_be: ipv4_be([255, 255, 0, 0]),
        ..Config::default()
    };
    let dp = Datapath::attach("ferry_vx", config, Some(&dir));
    let result = dp.as_ref().map_err(ToString::to_string).map(|dp| {
        let info = MapInfo::from_pin(&pinned).unwrap();
        (
            dp.adoption().endpoints_copied,
            dp.endpoint_count(),
            info.max_entries(),
            info.map_flags(),
        )
    });
    drop(dp);
    let removed = ferry_overlay::datapath::remove_pins(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    let (copied, count, max, flags) = result.expect("datapath attach over the older map");
    removed.expect("removing the pins");
    assert_eq!(copied, Some(3));
    assert_eq!(count, 3);
    assert_eq!(
        (max, flags),
        (
            ferry_overlay::common::MAX_ENDPOINTS,
            ferry_overlay::common::ENDPOINTS_MAP_FLAGS
        )
    );
}
