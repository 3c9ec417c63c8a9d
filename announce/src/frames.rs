//! The announcement frames, built as bytes with `pnet_packet`. Pure: no socket, no kernel.
//!
//! Three kinds of frame, all addressed to every station on the segment:
//!
//! | kind | Ethernet dst | payload |
//! |---|---|---|
//! | [`FrameKind::GarpRequest`] | `ff:ff:ff:ff:ff:ff` | ARP op 1 (request), sender = target = the IPv4 address, SHA = own MAC, THA = `00:00:00:00:00:00` |
//! | [`FrameKind::GarpReply`] | `ff:ff:ff:ff:ff:ff` | ARP op 2 (reply), sender = target = the IPv4 address, SHA = THA = own MAC |
//! | [`FrameKind::UnsolicitedNa`] | `33:33:00:00:00:01` | IPv6 src = the address itself, dst `ff02::1`, hop limit 255; ICMPv6 136 with O=1, S=0, R=0, target = the address, Target Link-Layer Address option = own MAC |
//!
//! Why these exact fields:
//! - Both ARP forms are sent (as DESIGN.md's release step asks) because receivers differ:
//!   RFC 5227 §3 announces with requests, while some older stacks and switches only act on
//!   replies. Linux takes either (see the crate docs).
//! - The reply's THA is our own MAC, not broadcast: Linux's `arp_is_garp()` only treats a
//!   *reply* as gratuitous when `tha == sha`. A gratuitous ARP overrides an existing neighbour
//!   entry at once; any other ARP only overrides it once the entry is older than `locktime`
//!   (1 s by default). The acceptance test shows both behaviours on the running kernel.
//! - The NA follows RFC 4861 §7.2.6 (unsolicited advertisement: target = the address,
//!   Target Link-Layer Address option, Solicited clear, sent to all-nodes). The Override flag is
//!   set so receivers replace a cached link-layer address. Its source is the advertised address
//!   itself (RFC 4861 §4.4: "an address assigned to the interface from which the advertisement
//!   is sent"): that is what Linux's own `ndisc_send_na()` does when the target is one of its
//!   addresses, and it needs no link-local address (ferry's containers may have none).
//!   Router is clear: a container is a host.
//! - Every frame is at least 60 bytes (ARP is zero-padded): the Ethernet minimum without FCS, so
//!   no switch or driver sees a runt.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use pnet_datalink::MacAddr;
use pnet_packet::MutablePacket;
use pnet_packet::arp::{ArpHardwareTypes, ArpOperation, ArpOperations, MutableArpPacket};
use pnet_packet::ethernet::{EtherType, EtherTypes, MutableEthernetPacket};
use pnet_packet::icmpv6::ndp::{
    MutableNeighborAdvertPacket, NdpOption, NdpOptionTypes, NeighborAdvertFlags,
};
use pnet_packet::icmpv6::{Icmpv6Code, Icmpv6Packet, Icmpv6Types};
use pnet_packet::ip::IpNextHeaderProtocols;
use pnet_packet::ipv6::MutableIpv6Packet;

use crate::Announcement;

/// Ethernet header length (no VLAN tag).
pub const ETHERNET_HEADER_LEN: usize = 14;
/// Minimum Ethernet frame length without the FCS; shorter frames are zero-padded.
pub const ETHERNET_MIN_LEN: usize = 60;
/// ARP for IPv4 over Ethernet: 28 bytes.
pub const ARP_LEN: usize = 28;
/// IPv6 fixed header.
pub const IPV6_HEADER_LEN: usize = 40;
/// Neighbour Advertisement without options (type, code, checksum, flags, target).
pub const NA_LEN: usize = 24;
/// One Target Link-Layer Address option for Ethernet: 8 bytes (length field = 1).
pub const TLLA_OPTION_LEN: usize = 8;
/// Whole unsolicited NA frame: 14 + 40 + 24 + 8 = 86 bytes.
pub const NA_FRAME_LEN: usize = ETHERNET_HEADER_LEN + IPV6_HEADER_LEN + NA_LEN + TLLA_OPTION_LEN;
/// Hop limit that RFC 4861 §7.1.2 requires of every Neighbour Discovery message (receivers
/// drop anything else: proof it was not routed).
pub const NDISC_HOP_LIMIT: u8 = 255;

/// Ethernet broadcast.
pub const BROADCAST_MAC: [u8; 6] = [0xff; 6];
/// The all-zero MAC: the THA of a gratuitous ARP request.
pub const ZERO_MAC: [u8; 6] = [0; 6];
/// IPv6 all-nodes multicast, the destination of an unsolicited NA.
pub const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
/// Ethernet address of `ff02::1` (RFC 2464 §7: `33:33` + low 32 bits).
pub const ALL_NODES_MAC: [u8; 6] = [0x33, 0x33, 0, 0, 0, 1];

/// What a frame announces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FrameKind {
    /// Gratuitous ARP request (op 1).
    GarpRequest,
    /// Gratuitous ARP reply (op 2).
    GarpReply,
    /// Unsolicited IPv6 Neighbour Advertisement (ICMPv6 136).
    UnsolicitedNa,
}

impl fmt::Display for FrameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FrameKind::GarpRequest => "gratuitous ARP request",
            FrameKind::GarpReply => "gratuitous ARP reply",
            FrameKind::UnsolicitedNa => "unsolicited neighbour advertisement",
        })
    }
}

/// One ready-to-send Ethernet frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// What it is.
    pub kind: FrameKind,
    /// The address it announces.
    pub addr: IpAddr,
    /// The whole Ethernet frame, without FCS.
    pub bytes: Vec<u8>,
}

/// Every frame of one announcement round, in order: for each IPv4 address its request then its
/// reply, then one NA per IPv6 address.
pub fn frames(ann: &Announcement) -> Vec<Frame> {
    let mut out = Vec::with_capacity(ann.ipv4.len() * 2 + ann.ipv6.len());
    for &ip in &ann.ipv4 {
        out.push(Frame {
            kind: FrameKind::GarpRequest,
            addr: ip.into(),
            bytes: garp_request(ann.mac, ip),
        });
        out.push(Frame {
            kind: FrameKind::GarpReply,
            addr: ip.into(),
            bytes: garp_reply(ann.mac, ip),
        });
    }
    for &ip in &ann.ipv6 {
        out.push(Frame {
            kind: FrameKind::UnsolicitedNa,
            addr: ip.into(),
            bytes: unsolicited_na(ann.mac, ip),
        });
    }
    out
}

/// Gratuitous ARP request: op 1, SPA = TPA = `ip`, SHA = `mac`, THA = 00:00:00:00:00:00,
/// Ethernet broadcast. 60 bytes.
pub fn garp_request(mac: [u8; 6], ip: Ipv4Addr) -> Vec<u8> {
    arp_frame(ArpOperations::Request, mac, ip, ZERO_MAC)
}

/// Gratuitous ARP reply: op 2, SPA = TPA = `ip`, SHA = THA = `mac`, Ethernet broadcast.
/// 60 bytes. (THA = own MAC, not broadcast: see the module docs.)
pub fn garp_reply(mac: [u8; 6], ip: Ipv4Addr) -> Vec<u8> {
    arp_frame(ArpOperations::Reply, mac, ip, mac)
}

/// A broadcast ARP frame whose sender and target protocol addresses are both `ip`, with any
/// operation and target hardware address. [`garp_request`] and [`garp_reply`] are the two
/// forms ferry sends; this is public for tests that probe how receivers treat other forms.
pub fn arp_frame(op: ArpOperation, mac: [u8; 6], ip: Ipv4Addr, target_mac: [u8; 6]) -> Vec<u8> {
    let mut buf = vec![0u8; ETHERNET_MIN_LEN];
    {
        let mut eth =
            MutableEthernetPacket::new(&mut buf).expect("60 bytes hold an Ethernet header");
        write_ethernet(&mut eth, BROADCAST_MAC, mac, EtherTypes::Arp);
        let mut arp =
            MutableArpPacket::new(eth.payload_mut()).expect("46 bytes hold an ARP packet");
        arp.set_hardware_type(ArpHardwareTypes::Ethernet);
        arp.set_protocol_type(EtherTypes::Ipv4);
        arp.set_hw_addr_len(6);
        arp.set_proto_addr_len(4);
        arp.set_operation(op);
        arp.set_sender_hw_addr(MacAddr::from(mac));
        arp.set_sender_proto_addr(ip);
        arp.set_target_hw_addr(MacAddr::from(target_mac));
        arp.set_target_proto_addr(ip);
    }
    buf
}

/// Unsolicited Neighbour Advertisement for `ip` (RFC 4861 §7.2.6): Ethernet
/// `mac` → `33:33:00:00:00:01`; IPv6 `ip` → `ff02::1`, hop limit 255; ICMPv6 type 136 code 0,
/// flags O=1 S=0 R=0, target `ip`, one Target Link-Layer Address option carrying `mac`;
/// checksum over the IPv6 pseudo-header. 86 bytes.
pub fn unsolicited_na(mac: [u8; 6], ip: Ipv6Addr) -> Vec<u8> {
    let mut buf = vec![0u8; NA_FRAME_LEN];
    let icmp_len = NA_LEN + TLLA_OPTION_LEN;
    {
        let mut eth =
            MutableEthernetPacket::new(&mut buf).expect("86 bytes hold an Ethernet header");
        write_ethernet(&mut eth, ALL_NODES_MAC, mac, EtherTypes::Ipv6);
        let mut ip6 =
            MutableIpv6Packet::new(eth.payload_mut()).expect("72 bytes hold an IPv6 header");
        ip6.set_version(6);
        ip6.set_traffic_class(0);
        ip6.set_flow_label(0);
        ip6.set_payload_length(icmp_len as u16);
        ip6.set_next_header(IpNextHeaderProtocols::Icmpv6);
        ip6.set_hop_limit(NDISC_HOP_LIMIT);
        ip6.set_source(ip);
        ip6.set_destination(ALL_NODES);
        let mut na = MutableNeighborAdvertPacket::new(ip6.payload_mut())
            .expect("32 bytes hold a neighbour advertisement");
        na.set_icmpv6_type(Icmpv6Types::NeighborAdvert);
        na.set_icmpv6_code(Icmpv6Code(0));
        na.set_checksum(0);
        na.set_flags(NeighborAdvertFlags::Override);
        na.set_reserved(0);
        na.set_target_addr(ip);
        na.set_options(&[NdpOption {
            option_type: NdpOptionTypes::TargetLLAddr,
            length: 1, // in units of 8 bytes: type, length, 6-byte MAC
            data: mac.to_vec(),
        }]);
    }
    let icmp_start = ETHERNET_HEADER_LEN + IPV6_HEADER_LEN;
    let sum = {
        let icmp = Icmpv6Packet::new(&buf[icmp_start..]).expect("ICMPv6 header present");
        pnet_packet::icmpv6::checksum(&icmp, &ip, &ALL_NODES)
    };
    buf[icmp_start + 2..icmp_start + 4].copy_from_slice(&sum.to_be_bytes());
    buf
}

fn write_ethernet(eth: &mut MutableEthernetPacket<'_>, dst: [u8; 6], src: [u8; 6], ty: EtherType) {
    eth.set_destination(MacAddr::from(dst));
    eth.set_source(MacAddr::from(src));
    eth.set_ethertype(ty);
}

/// `aa:bb:cc:dd:ee:ff`, lower case (the form `ip` and `bridge` print).
pub fn mac_to_string(mac: [u8; 6]) -> String {
    MacAddr::from(mac).to_string()
}

/// Parses `aa:bb:cc:dd:ee:ff` (either case).
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut out {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pnet_packet::Packet;
    use pnet_packet::arp::ArpPacket;
    use pnet_packet::ethernet::EthernetPacket;
    use pnet_packet::icmpv6::ndp::NeighborAdvertPacket;
    use pnet_packet::ipv6::Ipv6Packet;

    const MAC: [u8; 6] = [0x02, 0x00, 0x5e, 0x10, 0x20, 0x30];
    const V4: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
    const V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x98, 0, 0, 0, 0, 0, 5);

    fn check_arp(bytes: &[u8], op: ArpOperation, tha: [u8; 6]) {
        assert_eq!(bytes.len(), ETHERNET_MIN_LEN);
        let eth = EthernetPacket::new(bytes).unwrap();
        assert_eq!(eth.get_destination(), MacAddr::broadcast());
        assert_eq!(eth.get_source(), MacAddr::from(MAC));
        assert_eq!(eth.get_ethertype(), EtherTypes::Arp);
        let arp = ArpPacket::new(eth.payload()).unwrap();
        assert_eq!(arp.get_hardware_type(), ArpHardwareTypes::Ethernet);
        assert_eq!(arp.get_protocol_type(), EtherTypes::Ipv4);
        assert_eq!(arp.get_hw_addr_len(), 6);
        assert_eq!(arp.get_proto_addr_len(), 4);
        assert_eq!(arp.get_operation(), op);
        assert_eq!(arp.get_sender_hw_addr(), MacAddr::from(MAC));
        assert_eq!(arp.get_sender_proto_addr(), V4);
        assert_eq!(arp.get_target_hw_addr(), MacAddr::from(tha));
        assert_eq!(arp.get_target_proto_addr(), V4);
        // Padding is zero.
        assert!(
            bytes[ETHERNET_HEADER_LEN + ARP_LEN..]
                .iter()
                .all(|&b| b == 0)
        );
    }

    #[test]
    fn garp_request_fields() {
        let f = garp_request(MAC, V4);
        check_arp(&f, ArpOperations::Request, ZERO_MAC);
        assert_eq!(
            u16::from_be_bytes([f[20], f[21]]),
            1,
            "ARP opcode on the wire"
        );
    }

    #[test]
    fn garp_reply_fields() {
        let f = garp_reply(MAC, V4);
        check_arp(&f, ArpOperations::Reply, MAC);
        assert_eq!(
            u16::from_be_bytes([f[20], f[21]]),
            2,
            "ARP opcode on the wire"
        );
    }

    #[test]
    fn garp_request_exact_bytes() {
        // Written out by hand from RFC 826, independent of pnet.
        let mut want = vec![
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, // dst
            0x02, 0x00, 0x5e, 0x10, 0x20, 0x30, // src
            0x08, 0x06, // ARP
            0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x01, // Ethernet/IPv4, request
            0x02, 0x00, 0x5e, 0x10, 0x20, 0x30, 10, 244, 1, 10, // SHA, SPA
            0, 0, 0, 0, 0, 0, 10, 244, 1, 10, // THA, TPA
        ];
        want.resize(60, 0);
        assert_eq!(garp_request(MAC, V4), want);
    }

    /// RFC 1071 sum over the IPv6 pseudo-header and the ICMPv6 message, written independently
    /// of pnet: a valid message sums to 0xffff (i.e. its one's complement is 0).
    fn icmpv6_sum_is_valid(src: Ipv6Addr, dst: Ipv6Addr, icmp: &[u8]) -> bool {
        let mut data = Vec::new();
        data.extend_from_slice(&src.octets());
        data.extend_from_slice(&dst.octets());
        data.extend_from_slice(&(icmp.len() as u32).to_be_bytes());
        data.extend_from_slice(&[0, 0, 0, 58]);
        data.extend_from_slice(icmp);
        if data.len() % 2 == 1 {
            data.push(0);
        }
        let mut sum: u32 = data
            .chunks(2)
            .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum == 0xffff
    }

    #[test]
    fn unsolicited_na_fields() {
        let f = unsolicited_na(MAC, V6);
        assert_eq!(f.len(), NA_FRAME_LEN);
        let eth = EthernetPacket::new(&f).unwrap();
        assert_eq!(eth.get_destination(), MacAddr::from(ALL_NODES_MAC));
        assert_eq!(eth.get_source(), MacAddr::from(MAC));
        assert_eq!(eth.get_ethertype(), EtherTypes::Ipv6);

        let ip6 = Ipv6Packet::new(eth.payload()).unwrap();
        assert_eq!(ip6.get_version(), 6);
        assert_eq!(ip6.get_traffic_class(), 0);
        assert_eq!(ip6.get_flow_label(), 0);
        assert_eq!(ip6.get_payload_length(), 32);
        assert_eq!(ip6.get_next_header(), IpNextHeaderProtocols::Icmpv6);
        assert_eq!(ip6.get_hop_limit(), 255);
        assert_eq!(ip6.get_source(), V6);
        assert_eq!(ip6.get_destination(), ALL_NODES);
        assert_eq!(ip6.payload().len(), 32);

        let na = NeighborAdvertPacket::new(ip6.payload()).unwrap();
        assert_eq!(na.get_icmpv6_type(), Icmpv6Types::NeighborAdvert);
        assert_eq!(na.get_icmpv6_type().0, 136);
        assert_eq!(na.get_icmpv6_code(), Icmpv6Code(0));
        let flags = na.get_flags();
        assert_ne!(flags & NeighborAdvertFlags::Override, 0, "Override set");
        assert_eq!(flags & NeighborAdvertFlags::Solicited, 0, "Solicited clear");
        assert_eq!(flags & NeighborAdvertFlags::Router, 0, "Router clear");
        assert_eq!(flags, 0x20, "only O, and the reserved bits zero");
        assert_eq!(na.get_reserved(), 0);
        assert_eq!(na.get_target_addr(), V6);
        let opts = na.get_options();
        assert_eq!(opts.len(), 1);
        assert_eq!(opts[0].option_type, NdpOptionTypes::TargetLLAddr);
        assert_eq!(opts[0].option_type.0, 2);
        assert_eq!(opts[0].length, 1);
        assert_eq!(opts[0].data, MAC.to_vec());

        // Checksum: pnet recomputes the same value, and an independent RFC 1071 sum over the
        // pseudo-header verifies.
        let icmp = Icmpv6Packet::new(ip6.payload()).unwrap();
        assert_ne!(icmp.get_checksum(), 0);
        assert_eq!(
            pnet_packet::icmpv6::checksum(&icmp, &V6, &ALL_NODES),
            icmp.get_checksum()
        );
        assert!(icmpv6_sum_is_valid(V6, ALL_NODES, ip6.payload()));
        // A wrong pseudo-header fails: the sum really covers the addresses.
        assert!(!icmpv6_sum_is_valid(
            Ipv6Addr::new(0xfd00, 0x98, 0, 0, 0, 0, 0, 6),
            ALL_NODES,
            ip6.payload()
        ));
    }

    #[test]
    fn na_checksum_valid_for_many_addresses() {
        for i in 0..200u16 {
            let ip = Ipv6Addr::new(0x2001, 0xdb8, i, 0xffff, i.wrapping_mul(7919), 0, 0xabcd, i);
            let mac = [0x02, i as u8, (i >> 8) as u8, 0xff, 0x00, 0x01];
            let f = unsolicited_na(mac, ip);
            assert!(icmpv6_sum_is_valid(ip, ALL_NODES, &f[54..]), "{ip}");
        }
    }

    #[test]
    fn frames_order_and_kinds() {
        let ann = Announcement {
            interface: "eth0".into(),
            mac: MAC,
            ipv4: vec![V4, Ipv4Addr::new(10, 244, 1, 11)],
            ipv6: vec![V6],
        };
        let fs = frames(&ann);
        let kinds: Vec<_> = fs.iter().map(|f| (f.kind, f.addr)).collect();
        assert_eq!(
            kinds,
            vec![
                (FrameKind::GarpRequest, IpAddr::from(V4)),
                (FrameKind::GarpReply, IpAddr::from(V4)),
                (
                    FrameKind::GarpRequest,
                    IpAddr::from(Ipv4Addr::new(10, 244, 1, 11))
                ),
                (
                    FrameKind::GarpReply,
                    IpAddr::from(Ipv4Addr::new(10, 244, 1, 11))
                ),
                (FrameKind::UnsolicitedNa, IpAddr::from(V6)),
            ]
        );
        assert_eq!(fs[4].bytes, unsolicited_na(MAC, V6));
    }

    #[test]
    fn mac_round_trip() {
        assert_eq!(mac_to_string(MAC), "02:00:5e:10:20:30");
        assert_eq!(parse_mac("02:00:5E:10:20:30"), Some(MAC));
        assert_eq!(parse_mac("02:00:5e:10:20"), None);
        assert_eq!(parse_mac("02:00:5e:10:20:30:40"), None);
        assert_eq!(parse_mac("02:00:5e:10:20:3"), None);
        assert_eq!(parse_mac("zz:00:5e:10:20:30"), None);
    }
}
