//! Acceptance tests against the real kernel: a Linux bridge with stations in their own network
//! namespaces (see `lab/mod.rs`). A container "moves" from the station `old` to the station
//! `new` (another bridge port); the peer `peer` keeps talking to it.
//!
//! Each test asserts observable effects — where the bridge forwards, what the peer's neighbour
//! cache holds, whether a datagram arrives — first *without* announcements (nothing changes)
//! and then with them.
//!
//! Needs root (namespaces, AF_PACKET). Without it: SKIP, or a failure under `CI=true`.

mod lab;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use ferry_announce::frames::{self, BROADCAST_MAC, Frame, FrameKind};
use ferry_announce::{
    Announcement, Cancel, Error, Link, Schedule, announce_in_netns, in_netns, send_once_in_netns,
};
use lab::{Lab, becomes, receives};
use pnet_packet::arp::ArpOperations;

const PEER_MAC: &str = "02:fa:00:00:00:01";
/// The container's MAC on its old host.
const M1: &str = "02:fa:00:00:00:05";
/// Its MAC after a move that changes it (and further MACs for the ARP-rule probes).
const M2: &str = "02:fa:00:00:00:55";
const MA: &str = "02:fa:00:00:0a:0a";
const MB: &str = "02:fa:00:00:0b:0b";
const MC: &str = "02:fa:00:00:0c:0c";

const PEER4: Ipv4Addr = Ipv4Addr::new(10, 98, 0, 1);
const C4: Ipv4Addr = Ipv4Addr::new(10, 98, 0, 5);
const OTHER4: Ipv4Addr = Ipv4Addr::new(10, 98, 0, 6);
const PEER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x98, 0, 0, 0, 0, 0, 1);
const C6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x98, 0, 0, 0, 0, 0, 5);
const OTHER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x98, 0, 0, 0, 0, 0, 6);
const PORT: u16 = 7000;

/// Long enough for a datagram to cross three veths and a bridge many times over.
const DELIVERY: Duration = Duration::from_secs(1);

fn mac(s: &str) -> [u8; 6] {
    frames::parse_mac(s).expect("valid MAC")
}

fn lladdr(lab: &Lab, role: &str, addr: impl Into<IpAddr>) -> Option<String> {
    lab.neighbour(role, addr.into()).and_then(|(l, _)| l)
}

fn set_arp_accept(lab: &Lab, role: &str, value: &str) {
    lab.sysctl(role, "net.ipv4.conf.all.arp_accept", value);
    lab.sysctl(role, "net.ipv4.conf.eth0.arp_accept", value);
}

/// Sends exactly one hand-made frame from `role`'s eth0.
fn send_frame(lab: &Lab, role: &str, frame: Frame) {
    in_netns(&lab.path(role), || {
        let mut link = Link::open("eth0", None)?;
        link.send(&frame)
    })
    .expect("enter netns")
    .expect("send frame");
}

/// Peer ↔ old: a datagram from peer reaches old (so peer has resolved the container's address
/// and the bridge has learned the container's MAC on old's port).
fn first_contact(lab: &Lab, peer_tx: &std::net::UdpSocket, dst: SocketAddr) {
    let old_rx = lab.udp("old", dst);
    peer_tx.send_to(b"hello old", dst).expect("send");
    assert!(
        receives(&old_rx, b"hello old", Duration::from_secs(3)),
        "the container at its old home must receive the peer's datagram"
    );
}

/// Same MAC and IP on the new host (the ferry case: the container keeps both). Without an
/// announcement the bridge keeps forwarding the MAC to the old port (its FDB entry would only
/// age out after 300 s); one round of gratuitous ARP from the new port moves it at once.
#[test]
fn bridge_relearns_moved_mac_only_after_announcement() {
    if !lab::can_run("bridge_relearns_moved_mac_only_after_announcement") {
        return;
    }
    let lab = Lab::new(&["peer", "old", "new"], false);
    lab.configure("peer", PEER_MAC, &["10.98.0.1/24"]);
    lab.configure("old", M1, &["10.98.0.5/24"]);
    // The new home's interface exists with the same MAC but stays down until the move.
    lab.ip("new", &["link", "set", "eth0", "address", M1]);
    lab.wait_port_forwarding("peer");
    lab.wait_port_forwarding("old");

    let dst = SocketAddr::new(C4.into(), PORT);
    let peer_tx = lab.udp("peer", SocketAddr::new(PEER4.into(), 0));
    first_contact(&lab, &peer_tx, dst);
    assert_eq!(
        lab.fdb_ports(M1),
        ["p-old"],
        "bridge learned M1 on old's port"
    );
    assert_eq!(lladdr(&lab, "peer", C4).as_deref(), Some(M1));

    // The move: the old copy keeps its interface (so its port and FDB entry stay, as with a
    // frozen container) but loses the address; the new copy comes up on another port.
    lab.ip("old", &["addr", "del", "10.98.0.5/24", "dev", "eth0"]);
    lab.configure("new", M1, &["10.98.0.5/24"]);
    lab.wait_port_forwarding("new");
    let new_rx = lab.udp("new", dst);

    // Without announcement: the datagram goes out of the old port and never reaches new.
    let tx_old = lab.port_tx_packets("old");
    peer_tx.send_to(b"before", dst).expect("send");
    assert!(
        !receives(&new_rx, b"before", DELIVERY),
        "without an announcement the bridge must still send M1 to the old port"
    );
    assert!(
        lab.port_tx_packets("old") > tx_old,
        "the datagram left through the old port"
    );
    assert_eq!(
        lab.fdb_ports(M1),
        ["p-old"],
        "FDB unchanged without announcement"
    );

    // Announce from the new home, default schedule.
    let ann = Announcement {
        interface: "eth0".into(),
        mac: mac(M1),
        ipv4: vec![C4],
        ipv6: vec![],
    };
    let start = Instant::now();
    let report =
        announce_in_netns(&lab.path("new"), &ann, &Schedule::default(), None).expect("announce");
    let took = start.elapsed();
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!((report.rounds_planned, report.rounds_ok), (4, 4));
    assert_eq!(report.sent.arp_requests, 4);
    assert_eq!(report.sent.arp_replies, 4);
    assert_eq!(report.sent.neighbour_adverts, 0);
    assert_eq!(report.sent.bytes, 8 * 60);
    assert!(!report.cancelled);
    // A lower bound only: a loaded machine may take longer, never shorter.
    assert!(
        took >= Duration::from_millis(450),
        "default schedule spans 450 ms, took {took:?}"
    );

    assert_eq!(
        lab.fdb_ports(M1),
        ["p-new"],
        "bridge moved M1 to new's port"
    );
    peer_tx.send_to(b"after", dst).expect("send");
    assert!(
        receives(&new_rx, b"after", DELIVERY),
        "after the announcement the peer's datagram reaches the new home"
    );
}

/// The MAC changes with the move. The peer has an entry for the address (it was talking to the
/// container) and `arp_accept = 0` (the default): its cache still says M1, so its packets go to
/// the old port; one gratuitous ARP round from the new home replaces the entry with M2.
#[test]
fn garp_updates_existing_arp_entry_with_arp_accept_0() {
    if !lab::can_run("garp_updates_existing_arp_entry_with_arp_accept_0") {
        return;
    }
    let lab = Lab::new(&["peer", "old", "new"], false);
    set_arp_accept(&lab, "peer", "0");
    lab.configure("peer", PEER_MAC, &["10.98.0.1/24"]);
    lab.configure("old", M1, &["10.98.0.5/24"]);
    lab.ip("new", &["link", "set", "eth0", "address", M2]);
    lab.wait_port_forwarding("peer");
    lab.wait_port_forwarding("old");

    let dst = SocketAddr::new(C4.into(), PORT);
    let peer_tx = lab.udp("peer", SocketAddr::new(PEER4.into(), 0));
    first_contact(&lab, &peer_tx, dst);
    assert_eq!(lladdr(&lab, "peer", C4).as_deref(), Some(M1));

    lab.ip("old", &["addr", "del", "10.98.0.5/24", "dev", "eth0"]);
    lab.configure("new", M2, &["10.98.0.5/24"]);
    lab.wait_port_forwarding("new");
    let new_rx = lab.udp("new", dst);

    peer_tx.send_to(b"before", dst).expect("send");
    assert!(
        !receives(&new_rx, b"before", DELIVERY),
        "without an announcement the peer still sends to M1"
    );
    assert_eq!(lladdr(&lab, "peer", C4).as_deref(), Some(M1));

    let ann = Announcement {
        interface: "eth0".into(),
        mac: mac(M2),
        ipv4: vec![C4],
        ipv6: vec![],
    };
    let sent = send_once_in_netns(&lab.path("new"), &ann).expect("send once");
    assert_eq!((sent.arp_requests, sent.arp_replies), (1, 1));

    assert!(
        becomes(DELIVERY, || lladdr(&lab, "peer", C4).as_deref() == Some(M2)),
        "peer's ARP entry must now say M2, it says {:?}",
        lab.neighbour("peer", C4.into())
    );
    let (_, states) = lab.neighbour("peer", C4.into()).expect("entry");
    assert!(
        states.iter().any(|s| s == "STALE" || s == "DELAY"),
        "a broadcast ARP leaves the entry STALE: {states:?}"
    );
    peer_tx.send_to(b"after", dst).expect("send");
    assert!(receives(&new_rx, b"after", DELIVERY));
}

/// How the kernel treats each ARP form, probed one frame at a time:
/// - with `arp_accept = 0` a gratuitous ARP creates no entry; with `arp_accept = 1` it does;
/// - a gratuitous request alone, and a gratuitous reply alone (THA = SHA), each replace an
///   existing entry at once, back to back (no `locktime` wait);
/// - a reply whose THA is broadcast is *not* gratuitous to Linux: within `locktime` (1 s) of
///   the last update it is ignored, after it it replaces the entry like any other ARP. That is
///   why ferry's reply carries its own MAC as THA.
#[test]
fn kernel_arp_rules_for_gratuitous_forms() {
    if !lab::can_run("kernel_arp_rules_for_gratuitous_forms") {
        return;
    }
    let lab = Lab::new(&["peer", "new"], false);
    set_arp_accept(&lab, "peer", "0");
    lab.configure("peer", PEER_MAC, &["10.98.0.1/24"]);
    lab.configure("new", M2, &["10.98.0.5/24", "10.98.0.6/24"]);
    lab.wait_port_forwarding("peer");
    lab.wait_port_forwarding("new");
    let new_path = lab.path("new");

    // Untracked address, arp_accept = 0: no entry is created.
    let other = Announcement {
        interface: "eth0".into(),
        mac: mac(M2),
        ipv4: vec![OTHER4],
        ipv6: vec![],
    };
    send_once_in_netns(&new_path, &other).expect("send");
    assert!(
        !becomes(Duration::from_millis(300), || lab
            .neighbour("peer", OTHER4.into())
            .is_some()),
        "arp_accept=0 must not create an entry from a gratuitous ARP"
    );

    // arp_accept = 1: the same announcement creates it.
    set_arp_accept(&lab, "peer", "1");
    send_once_in_netns(&new_path, &other).expect("send");
    assert!(
        becomes(DELIVERY, || lladdr(&lab, "peer", OTHER4).as_deref()
            == Some(M2)),
        "arp_accept=1 creates the entry: {:?}",
        lab.neighbour("peer", OTHER4.into())
    );
    set_arp_accept(&lab, "peer", "0");

    // An existing entry for C4 (peer talks to it).
    let dst = SocketAddr::new(C4.into(), PORT);
    let new_rx = lab.udp("new", dst);
    let peer_tx = lab.udp("peer", SocketAddr::new(PEER4.into(), 0));
    peer_tx.send_to(b"hi", dst).expect("send");
    assert!(receives(&new_rx, b"hi", DELIVERY));
    assert_eq!(lladdr(&lab, "peer", C4).as_deref(), Some(M2));

    let frame = |kind, bytes| Frame {
        kind,
        addr: C4.into(),
        bytes,
    };
    // Request alone.
    send_frame(
        &lab,
        "new",
        frame(FrameKind::GarpRequest, frames::garp_request(mac(MA), C4)),
    );
    assert!(
        becomes(DELIVERY, || lladdr(&lab, "peer", C4).as_deref() == Some(MA)),
        "a gratuitous request replaces the entry: {:?}",
        lab.neighbour("peer", C4.into())
    );
    // Reply alone, at once (inside the 1 s locktime of the previous update).
    let mb_sent = Instant::now();
    send_frame(
        &lab,
        "new",
        frame(FrameKind::GarpReply, frames::garp_reply(mac(MB), C4)),
    );
    assert!(
        becomes(DELIVERY, || lladdr(&lab, "peer", C4).as_deref() == Some(MB)),
        "a gratuitous reply (THA = SHA) replaces the entry within locktime: {:?}",
        lab.neighbour("peer", C4.into())
    );
    // Reply with THA = broadcast, inside locktime: not gratuitous, ignored. The kernel updated
    // the entry after `mb_sent`, so an override seen less than the locktime after `mb_sent`
    // happened inside it (a slow machine can only make the check weaker, never wrong).
    let bcast_reply = frames::arp_frame(ArpOperations::Reply, mac(MC), C4, BROADCAST_MAC);
    send_frame(
        &lab,
        "new",
        frame(FrameKind::GarpReply, bcast_reply.clone()),
    );
    if becomes(Duration::from_millis(200), || {
        lladdr(&lab, "peer", C4).as_deref() == Some(MC)
    }) {
        assert!(
            mb_sent.elapsed() >= Duration::from_secs(1),
            "a broadcast-THA reply within locktime must not override ({:?} after the update)",
            mb_sent.elapsed()
        );
    } else {
        assert_eq!(lladdr(&lab, "peer", C4).as_deref(), Some(MB));
    }
    // Once locktime has passed, the same frame overrides: wait until it surely has (the
    // kernel's update came after `mb_sent`; a margin covers its jiffies rounding).
    std::thread::sleep(Duration::from_millis(1200).saturating_sub(mb_sent.elapsed()));
    send_frame(&lab, "new", frame(FrameKind::GarpReply, bcast_reply));
    assert!(
        becomes(DELIVERY, || lladdr(&lab, "peer", C4).as_deref() == Some(MC)),
        "after locktime any ARP reply overrides: {:?}",
        lab.neighbour("peer", C4.into())
    );
}

/// IPv6: the MAC changes with the move; the peer's neighbour entry follows only after the
/// unsolicited NA (Override set). An NA for an address the peer has no entry for creates none
/// (hosts do not accept untracked NAs).
#[test]
fn unsolicited_na_overrides_existing_ipv6_neighbour() {
    if !lab::can_run("unsolicited_na_overrides_existing_ipv6_neighbour") {
        return;
    }
    let lab = Lab::new(&["peer", "old", "new"], true);
    lab.configure("peer", PEER_MAC, &["fd00:98::1/64"]);
    lab.configure("old", M1, &["fd00:98::5/64"]);
    lab.ip("new", &["link", "set", "eth0", "address", M2]);
    lab.wait_port_forwarding("peer");
    lab.wait_port_forwarding("old");

    let dst = SocketAddr::new(C6.into(), PORT);
    let peer_tx = lab.udp("peer", SocketAddr::new(PEER6.into(), 0));
    first_contact(&lab, &peer_tx, dst);
    assert_eq!(lladdr(&lab, "peer", C6).as_deref(), Some(M1));

    lab.ip(
        "old",
        &["-6", "addr", "del", "fd00:98::5/64", "dev", "eth0"],
    );
    lab.configure("new", M2, &["fd00:98::5/64", "fd00:98::6/64"]);
    lab.wait_port_forwarding("new");
    let new_rx = lab.udp("new", dst);
    // Let the new interface's own start-up traffic (link-local DAD, MLD, router solicitation)
    // pass: none of it may change the peer's entry.
    std::thread::sleep(Duration::from_millis(300));

    peer_tx.send_to(b"before", dst).expect("send");
    assert!(
        !receives(&new_rx, b"before", DELIVERY),
        "without an NA the peer still sends to M1"
    );
    assert_eq!(lladdr(&lab, "peer", C6).as_deref(), Some(M1));

    let ann = Announcement {
        interface: "eth0".into(),
        mac: mac(M2),
        ipv4: vec![],
        ipv6: vec![C6, OTHER6],
    };
    let report = announce_in_netns(
        &lab.path("new"),
        &ann,
        &Schedule::fixed(2, Duration::from_millis(50)),
        None,
    )
    .expect("announce");
    assert!(report.errors.is_empty(), "{:?}", report.errors);
    assert_eq!(report.sent.neighbour_adverts, 4);
    assert_eq!(report.sent.arp_requests + report.sent.arp_replies, 0);

    assert!(
        becomes(DELIVERY, || lladdr(&lab, "peer", C6).as_deref() == Some(M2)),
        "the NA's Override must replace M1 with M2: {:?}",
        lab.neighbour("peer", C6.into())
    );
    let (_, states) = lab.neighbour("peer", C6.into()).expect("entry");
    assert!(
        states.iter().any(|s| s == "STALE" || s == "DELAY"),
        "an unsolicited NA leaves the entry STALE: {states:?}"
    );
    assert_eq!(
        lab.neighbour("peer", OTHER6.into()),
        None,
        "a host creates no entry from an unsolicited NA"
    );
    peer_tx.send_to(b"after", dst).expect("send");
    assert!(receives(&new_rx, b"after", DELIVERY));
}

/// Errors and cancellation on a real interface: a down interface fails with the frame and
/// interface named; a cancelled series stops between rounds.
#[test]
fn errors_and_cancellation() {
    if !lab::can_run("errors_and_cancellation") {
        return;
    }
    let lab = Lab::new(&["new"], false);
    lab.configure("new", M2, &["10.98.0.5/24"]);
    let path = lab.path("new");
    let ann = Announcement {
        interface: "eth0".into(),
        mac: mac(M2),
        ipv4: vec![C4],
        ipv6: vec![],
    };

    // Cancelled after ~120 ms of a 100-round series 50 ms apart.
    let cancel = Cancel::new();
    let report = std::thread::scope(|s| {
        let c = cancel.clone();
        s.spawn(move || {
            std::thread::sleep(Duration::from_millis(120));
            c.cancel();
        });
        announce_in_netns(
            &path,
            &ann,
            &Schedule::fixed(100, Duration::from_millis(50)),
            Some(&cancel),
        )
        .expect("announce")
    });
    assert!(report.cancelled);
    // How many rounds ran before the cancel depends on the machine's load; that it stopped
    // long before the 100th does not.
    assert!(
        (1..100).contains(&report.rounds_ok),
        "stopped early: {report:?}"
    );
    assert_eq!(report.sent.arp_requests, report.rounds_ok);

    // Interface not found, named with what is there.
    let missing = Announcement {
        interface: "eth9".into(),
        ..ann.clone()
    };
    match send_once_in_netns(&path, &missing) {
        Err(Error::InterfaceNotFound { interface, present }) => {
            assert_eq!(interface, "eth9");
            // Listed from inside the lab namespace: only its own two interfaces.
            let mut present = present;
            present.sort();
            assert_eq!(present, ["eth0", "lo"]);
        }
        other => panic!("expected InterfaceNotFound, got {other:?}"),
    }

    // Interface down: every send fails with ENETDOWN; announce() fails as nothing went out.
    lab.ip("new", &["link", "set", "eth0", "down"]);
    let err = announce_in_netns(&path, &ann, &Schedule::fixed(2, Duration::ZERO), None)
        .expect_err("nothing can be sent on a down interface");
    match &err {
        Error::Send {
            interface,
            kind,
            addr,
            source,
        } => {
            assert_eq!(interface, "eth0");
            assert_eq!(*kind, FrameKind::GarpReply, "the last error is returned");
            assert_eq!(*addr, IpAddr::from(C4));
            assert_eq!(source.raw_os_error(), Some(libc::ENETDOWN), "{source}");
        }
        other => panic!("expected Send, got {other:?}"),
    }
    assert!(err.to_string().contains("eth0"), "{err}");

    // A path that is no namespace.
    let err = send_once_in_netns(Path::new("/run/netns/fan-no-such-ns"), &ann).unwrap_err();
    assert!(matches!(err, Error::Netns { .. }), "{err:?}");
}
