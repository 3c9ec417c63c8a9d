//! Types shared between ferry's eBPF programs and user space.
//!
//! Every map key and value is `#[repr(C)]` with explicit padding and no `bool`, so the layout
//! the verifier sees is the one user space writes. IPv4 addresses are stored as they appear on
//! the wire: a `u32` whose in-memory bytes are the address in network order (`_be` suffix). In
//! user space, convert with [`ipv4_be`] / [`ipv4_from_be`].
#![no_std]

/// Maximum number of endpoints (container or host overlay addresses) per host: every host
/// holds an entry for every endpoint of the registry.
pub const MAX_ENDPOINTS: u32 = 262_144;

/// Flags of the endpoint map: not preallocated (`BPF_F_NO_PREALLOC`), so its memory follows
/// the registry (about 100 bytes per entry) rather than its capacity (27 MB per host at
/// 262,144 entries, for a lab host holding a handful).
pub const ENDPOINTS_MAP_FLAGS: u32 = 1;
/// Maximum number of VTEPs (hosts) allowed to send VXLAN to this host.
pub const MAX_VTEPS: u32 = 4_096;

/// MAC of every host-side container veth (the containers' default gateway), the same on every
/// host: the datapath answers the containers' ARP with it, and sets it as the source of what it
/// delivers to them.
pub const GATEWAY_MAC: [u8; 6] = [0x0e, 0xfe, 0x00, 0x00, 0x00, 0x01];

/// Names of the maps, as user space finds them in the object.
pub mod maps {
    pub const COUNTERS: &str = "FERRY_COUNTERS";
    pub const ENDPOINTS: &str = "FERRY_ENDPOINTS";
    pub const VTEPS: &str = "FERRY_VTEPS";
    pub const CONFIG: &str = "FERRY_CONFIG";
    pub const PUBLIC: &str = "FERRY_PUBLIC";
    pub const SNAT: &str = "FERRY_SNAT";
}

/// Maximum number of public mappings (each direction) on the gateway.
pub const MAX_PUBLIC: u32 = 65_536;

/// Names of the programs in the object: one per attach point.
pub mod programs {
    /// TC ingress of the host's VXLAN device: decapsulated packets from other hosts.
    pub const FROM_OVERLAY: &str = "from_overlay";
    /// TC egress of the host's VXLAN device: packets the host routes into the overlay.
    pub const TO_OVERLAY: &str = "to_overlay";
    /// TC ingress of the host side of each container's veth: what the container sends.
    pub const FROM_CONTAINER: &str = "from_container";
    /// TC ingress of the gateway's internet-facing interface: traffic for public addresses.
    pub const FROM_PUBLIC: &str = "from_public";
    /// TC ingress of the agent's hold device (a TAP): held packets the agent re-injects.
    pub const FROM_HOLD: &str = "from_hold";
    /// TC ingress of the host's underlay interface (no-tunnel mode only): untunnelled packets
    /// from hosts of the same underlay subnet.
    pub const FROM_UNDERLAY: &str = "from_underlay";
}

/// What an endpoint entry tells the datapath to do with a packet for that address.
pub mod kind {
    /// The host's own overlay address: hand to the host's stack.
    pub const HOST: u32 = 1;
    /// A container on this host: deliver to `ifindex` (the host side of its veth).
    pub const LOCAL: u32 = 2;
    /// On another host: encapsulate to `vtep` with `vni`.
    pub const REMOTE: u32 = 3;
    /// Frozen or not yet restored here: queue the packet.
    pub const HOLD: u32 = 4;
    /// Used to live here and moved: re-encapsulate to `vtep` (forwarding pointer).
    pub const FORWARD: u32 = 5;
}

/// Endpoint flags.
pub mod flags {
    /// Drop what the (frozen) source copy of this endpoint still emits.
    pub const DROP_EGRESS: u32 = 1 << 0;
    /// `LOCAL` only: the container is being drained before a checkpoint. A new connection's
    /// first segment (TCP SYN without ACK) for it goes to the hold device instead of the
    /// container (counted as `hold_syn`); everything else is delivered as usual. The agent
    /// writes the held SYNs back once the entry says where the container is (the destination
    /// after the freeze, or here again if the checkpoint does not happen).
    pub const HOLD_SYN: u32 = 1 << 1;
}

/// Value of the endpoint map, keyed by the endpoint's IPv4 address (`u32`, network order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Endpoint {
    /// One of [`kind`].
    pub kind: u32,
    /// Bit set of [`flags`].
    pub flags: u32,
    /// `LOCAL`: ifindex of the host-side veth.
    pub ifindex: u32,
    /// `REMOTE`/`FORWARD`: underlay address of the target host (network order).
    pub vtep_be: u32,
    /// `REMOTE`/`FORWARD`: VXLAN network identifier.
    pub vni: u32,
    /// `LOCAL`: the container's MAC address.
    pub mac: [u8; 6],
    pub _pad: [u8; 2],
}

/// Value of the VTEP allow-list, keyed by a peer's underlay IPv4 (network order).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Vtep {
    /// The VNI this peer must use.
    pub vni: u32,
    /// Index of the host in the registry (for metrics; 0 if unknown).
    pub host_id: u32,
}

/// Bits of [`Config::flags`].
pub mod config_flags {
    /// This host is the gateway: it translates public addresses and carries the containers'
    /// traffic to and from the internet side.
    pub const GATEWAY: u32 = 1 << 0;
    /// The overlay is dual-stack: [`super::Config::overlay6_prefix`] is set, IPv6 packets
    /// whose addresses lie in it are carried like IPv4 ones.
    pub const IPV6: u32 = 1 << 1;
    /// Gateway only: the overlay's IPv6 prefix is routed from the internet side (containers'
    /// IPv6 addresses are public, not translated). Without it, IPv6 from the internet to the
    /// overlay is dropped (`no_public6`) and containers reach the internet masqueraded.
    pub const PUBLIC6: u32 = 1 << 2;
    /// No-tunnel mode: packets for endpoints on hosts of this host's own underlay subnet
    /// ([`super::Config::underlay_net_be`]) are sent to that host as they are (the underlay
    /// neighbour's MAC, `bpf_redirect_neigh`), not encapsulated; the tunnel stays for every
    /// other host, and for holds and forwarding pointers.
    pub const DIRECT: u32 = 1 << 3;
    /// Gateway only: another gateway-role host faces the internet. This one still translates
    /// what reaches it (stateless: either host may), but answers no ARP for the public
    /// addresses (counted `public_standby_arp`), so the internet side's neighbours keep the
    /// host that faces it.
    pub const PUBLIC_STANDBY: u32 = 1 << 4;
}

/// Single-entry array: the host's datapath configuration.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Config {
    /// VNI this host accepts.
    pub vni: u32,
    /// ifindex of the host's VXLAN device.
    pub vxlan_ifindex: u32,
    /// TTL of the outer header.
    pub tunnel_ttl: u32,
    /// Bit set of [`config_flags`].
    pub flags: u32,
    /// Underlay address of the gateway (network order): where containers' packets for
    /// addresses outside the overlay are encapsulated to. 0: no gateway known.
    pub egress_vtep_be: u32,
    /// The overlay CIDR (network and mask, network order).
    pub overlay_net_be: u32,
    pub overlay_mask_be: u32,
    /// Gateway only: ifindex of the internet-facing interface.
    pub public_ifindex: u32,
    /// Gateway only: MAC of the internet-facing interface (answers ARP for public addresses).
    pub public_mac: [u8; 6],
    /// The overlay's VXLAN UDP port (network order). On the gateway, a datagram to it that
    /// arrives on the internet-facing interface is dropped (`vxlan_from_public`): the overlay is
    /// accepted only from the underlay. 0: no such check.
    pub vxlan_port_be: u16,
    /// ifindex of the agent's hold device (a TAP): `HOLD` endpoints' packets go there.
    /// 0: no hold device (held packets are dropped as `no_hold_device`).
    pub hold_ifindex: u32,
    /// This host's own underlay address (network order). With the other hosts' VTEPs (the
    /// `FERRY_VTEPS` map) it is what containers and the internet may not address
    /// (`container_to_underlay`, `underlay_from_public`). 0: unknown, no such check for it.
    pub self_vtep_be: u32,
    /// With [`config_flags::IPV6`]: the first 96 bits of the overlay's IPv6 prefix. An
    /// endpoint's IPv6 address is this prefix followed by its IPv4 address, so both families
    /// share one endpoint entry (keyed by the IPv4 address): a move switches both at once.
    pub overlay6_prefix: [u8; 12],
    /// With [`config_flags::DIRECT`]: the underlay interface and its subnet (network order).
    pub underlay_ifindex: u32,
    pub underlay_net_be: u32,
    pub underlay_mask_be: u32,
    /// ifindex of the interface a container's own announcements (gratuitous ARP, unsolicited
    /// NA) are copied out of, for peers on that L2 segment (the agent's `announce_relay`).
    /// 0: none; they stay on the host (`announce_no_relay`).
    pub announce_ifindex: u32,
}

impl Config {
    /// Whether `ip_be` lies inside the overlay CIDR.
    #[inline(always)]
    pub const fn in_overlay(&self, ip_be: u32) -> bool {
        ip_be & self.overlay_mask_be == self.overlay_net_be
    }

    /// The endpoint key (IPv4, network order) of an IPv6 address inside the overlay's IPv6
    /// prefix; `None` outside it or when the overlay is IPv4-only.
    #[inline(always)]
    pub fn overlay6_key(&self, addr: &[u8; 16]) -> Option<u32> {
        if self.flags & config_flags::IPV6 == 0 {
            return None;
        }
        let mut i = 0;
        while i < 12 {
            if addr[i] != self.overlay6_prefix[i] {
                return None;
            }
            i += 1;
        }
        Some(u32::from_ne_bytes([addr[12], addr[13], addr[14], addr[15]]))
    }
}

/// The IPv6 address of the endpoint `ip_be` (network order) under a /96 overlay prefix.
pub const fn ipv6_of(prefix: [u8; 12], ip_be: u32) -> [u8; 16] {
    let v4 = ip_be.to_ne_bytes();
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 12 {
        out[i] = prefix[i];
        i += 1;
    }
    out[12] = v4[0];
    out[13] = v4[1];
    out[14] = v4[2];
    out[15] = v4[3];
    out
}

/// Key of the public-address maps: an address, and for port mappings a port and protocol
/// (port 0 and proto 0 for a whole-IP mapping).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default, Hash)]
pub struct NatKey {
    /// IPv4 address, network order.
    pub addr_be: u32,
    /// Port, network order; 0 for whole-IP.
    pub port_be: u16,
    /// IP protocol (6 TCP, 17 UDP); 0 for whole-IP.
    pub proto: u8,
    pub _pad: u8,
}

impl NatKey {
    /// Protocol of the marker entry saying "this address is public" (answer ARP for it, drop
    /// what no mapping matches). 255 is IANA-reserved, so it never collides with a port mapping.
    pub const PRESENCE_PROTO: u8 = 255;

    /// The marker entry of public address `addr_be`.
    pub const fn presence(addr_be: u32) -> Self {
        Self {
            addr_be,
            port_be: 0,
            proto: Self::PRESENCE_PROTO,
            _pad: 0,
        }
    }
}

/// Value of the public-address maps: what the address (and port) is rewritten to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct NatValue {
    /// IPv4 address, network order.
    pub addr_be: u32,
    /// Port, network order; 0 keeps the port (whole-IP).
    pub port_be: u16,
    pub _pad: [u8; 2],
}

/// Per-reason packet and byte counter (a per-CPU array indexed by [`Reason`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

/// Whether a reason stands for a packet going on (passed to the stack or redirected) or dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReasonKind {
    Pass,
    Drop,
}

/// Defines [`Reason`] and everything derived from its one list: the enum (with stable
/// `#[repr(u32)]` indices: the counters map is indexed by them), `COUNT`, `ALL`, `name()`,
/// `kind()` and `description()`.
macro_rules! reasons {
    ($($variant:ident = $index:literal, $kind:ident, $name:literal, $description:literal;)*) => {
        /// Why a packet was passed, redirected or dropped. Every verdict the datapath gives has
        /// one, and each is counted (packets and bytes) in the per-CPU counters map at its index.
        #[repr(u32)]
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub enum Reason {
            $(#[doc = $description] $variant = $index,)*
        }

        impl Reason {
            /// Number of reasons (length of the counter array).
            pub const COUNT: u32 = [$($index),*].len() as u32;
            /// Every reason, in index order.
            pub const ALL: [Reason; Self::COUNT as usize] = [$(Reason::$variant),*];

            /// Stable name used in metrics labels.
            pub const fn name(self) -> &'static str {
                match self {
                    $(Reason::$variant => $name,)*
                }
            }

            /// Whether the packet went on or was dropped.
            pub const fn kind(self) -> ReasonKind {
                match self {
                    $(Reason::$variant => reasons!(@kind $kind),)*
                }
            }

            /// One line saying where the reason is given and what happened to the packet.
            pub const fn description(self) -> &'static str {
                match self {
                    $(Reason::$variant => $description,)*
                }
            }
        }
    };
    (@kind pass) => { ReasonKind::Pass };
    (@kind drop) => { ReasonKind::Drop };
}

// The one list of reasons: variant = index (never renumber: dashboards and the counters map
// use it), pass or drop, metrics name, description. Append new reasons at the end.
reasons! {
    OverlayToHost = 0, pass, "overlay_to_host",
        "from-overlay: for this host's own overlay address, handed to the stack.";
    OverlayEncap = 1, pass, "overlay_encap", "to-overlay: encapsulated to a remote host.";
    OverlayForward = 2, pass, "overlay_forward",
        "to-overlay: re-encapsulated along a forwarding pointer.";
    OverlayToLocal = 3, pass, "overlay_to_local", "from-overlay: delivered to a local container.";
    DropNoTunnelKey = 4, drop, "no_tunnel_key",
        "a packet on the VXLAN device carried no tunnel metadata.";
    DropUnknownVtep = 5, drop, "unknown_vtep", "outer source is not in the VTEP allow-list.";
    DropBadVni = 6, drop, "bad_vni", "VNI differs from the host's (or the VTEP's) VNI.";
    DropNoEndpoint = 7, drop, "no_endpoint", "no endpoint entry for the inner destination.";
    DropNotIpv4 = 8, drop, "not_ipv4",
        "neither IPv4 nor, on a dual-stack overlay, IPv6 (or an IPv6 header the datapath does \
        not parse).";
    DropMalformed = 9, drop, "malformed", "truncated or malformed header.";
    DropTunnelKeyFailed = 10, drop, "tunnel_key_failed", "setting the tunnel key failed.";
    DropBadKind = 11, drop, "bad_kind", "the endpoint kind is not valid at this attach point.";
    DropNoConfig = 12, drop, "no_config", "configuration map empty (agent not ready).";
    ContainerToLocal = 13, pass, "container_to_local",
        "from-container: to a container on the same host.";
    ContainerEncap = 14, pass, "container_encap",
        "from-container: encapsulated to the host the destination lives on.";
    ContainerToHost = 15, pass, "container_to_host",
        "from-container: to this host's own overlay address.";
    ContainerEgress = 16, pass, "container_egress",
        "from-container: outside the overlay, encapsulated to the gateway.";
    ArpReply = 17, pass, "arp_reply",
        "from-container / from-public: ARP request answered by the datapath.";
    PublicDnat = 18, pass, "public_dnat",
        "from-public: public address translated to the container's, sent on to it.";
    PublicSnat = 19, pass, "public_snat",
        "gateway: container's address translated to its public one, sent out to the internet.";
    OverlayEgress = 20, pass, "overlay_egress",
        "to-overlay: outside the overlay, encapsulated to the gateway.";
    GatewayToStack = 21, pass, "gateway_to_stack",
        "gateway: container traffic without a public address, handed to the stack (masquerade).";
    PublicPass = 22, pass, "public_pass",
        "from-public: not for a public address (the gateway's own traffic), to the stack.";
    DropSpoofedSource = 23, drop, "spoofed_source",
        "a container sent from an address that is not its own.";
    DropArpIgnored = 24, drop, "arp_ignored",
        "ARP that is not a request the datapath answers (e.g. gratuitous).";
    DropNoPublicMapping = 25, drop, "no_public_mapping",
        "for a public address, but no mapping for this port / protocol.";
    DropNoEgress = 26, drop, "no_egress", "outside the overlay and no gateway to send it to.";
    DropRedirectFailed = 27, drop, "redirect_failed",
        "the redirect helper refused the target device.";
    DropRewriteFailed = 28, drop, "rewrite_failed", "rewriting addresses or checksums failed.";
    ArpToHost = 29, pass, "arp_to_host",
        "from-container: an ARP reply to the host's own request (the host resolving the \
        container's address for its /32 route), handed to the stack.";
    HoldQueued = 30, pass, "hold_queued",
        "to a `HOLD` endpoint: queued by the agent (redirected to its hold device).";
    HoldReleased = 31, pass, "hold_released",
        "from-hold: a re-injected packet delivered to its (now running) container.";
    HoldForwarded = 32, pass, "hold_forwarded",
        "from-hold / from-overlay: a packet sent on to the endpoint's host (re-injected after an \
        abort, or arriving at a host that no longer has the endpoint).";
    DropFrozenSource = 33, drop, "frozen_source",
        "the frozen source copy of a migrating container still emitted this.";
    DropNoHoldDevice = 34, drop, "no_hold_device",
        "A `HOLD` endpoint but no hold device configured.";
    DropTtlExceeded = 35, drop, "ttl_exceeded",
        "re-encapsulated too often (inner TTL ran out: a forwarding loop).";
    DropVxlanFromPublic = 36, drop, "vxlan_from_public",
        "from-public: a datagram to the overlay's VXLAN port arrived from the internet (the \
        overlay is accepted only from the underlay; a forged outer source would pass the VTEP \
        allow-list).";
    DropContainerToUnderlay = 37, drop, "container_to_underlay",
        "from-container: a container addressed a host's underlay address (where the gateway's \
        API and the agents' peer APIs listen): the control plane is out of containers' reach.";
    DropUnderlayFromPublic = 38, drop, "underlay_from_public",
        "from-public: a packet from the internet addressed a host's underlay address (the \
        gateway's API, the agents' peer APIs): the control plane is not served on the public side.";
    HoldSyn = 39, pass, "hold_syn",
        "to a `LOCAL` endpoint being drained before a checkpoint (`HOLD_SYN`): a new connection's \
        SYN queued by the agent (redirected to its hold device) instead of reaching the \
        container's listener; delivered where the container runs once the checkpoint is over.";
    DropIpv6LinkLocal = 40, drop, "ipv6_link_local",
        "from-container: IPv6 from a link-local or unspecified source, or to a multicast \
        address (MLD reports, router solicitations, duplicate address detection): the \
        container's only neighbour is its gateway, whose entry is permanent, and the overlay \
        routes no multicast. to-overlay: the host's own link-scoped IPv6 on the VXLAN device \
        (a dual-stack gateway's MLD reports).";
    DropIpv6Outside = 41, drop, "ipv6_outside",
        "IPv6 whose overlay side (a container's source, or the destination arriving from the \
        overlay on a host that is not the gateway) is outside the overlay's IPv6 prefix.";
    Public6Routed = 42, pass, "public6_routed",
        "from-public: IPv6 for a container's address (the overlay's IPv6 prefix is routed, not \
        translated), sent on to it.";
    DropNoPublic6 = 43, drop, "no_public6",
        "from-public: IPv6 for the overlay's prefix, but the gateway does not route it from the \
        internet (`public6` off): containers are reached over IPv6 only from inside.";
    DropIpv6ToHost = 44, drop, "ipv6_to_host",
        "IPv6 for a host's own overlay address: hosts have IPv4 overlay addresses only.";
    NdpReply = 45, pass, "ndp_reply",
        "from-container: IPv6 neighbour solicitation answered by the datapath with the gateway \
        MAC (the IPv6 twin of arp_reply).";
    ContainerDirect = 46, pass, "container_direct",
        "from-container: to an endpoint on a host of the same underlay subnet, sent there as it \
        is (no-tunnel mode).";
    UnderlayToLocal = 47, pass, "underlay_to_local",
        "from-underlay: an untunnelled packet from a same-subnet host, delivered to a local \
        container (or held, or sent on where the endpoint now lives).";
    UnderlayPass = 48, pass, "underlay_pass",
        "from-underlay: not untunnelled overlay traffic (the host's own, VXLAN): to the stack.";
    DropUnderlaySource = 49, drop, "underlay_source",
        "from-underlay: an untunnelled overlay packet whose source is not an endpoint of a \
        same-subnet host.";
    AnnounceRelayed = 50, pass, "announce_relayed",
        "from-container: the container's announcement of its own address and MAC (gratuitous \
        ARP, unsolicited NA) while it runs here, copied out of the relay interface for peers \
        on that L2 segment (the original goes no further).";
    DropAnnounceNoRelay = 51, drop, "announce_no_relay",
        "from-container: the container's announcement of its own address, with no relay \
        interface configured (ferry's L3 overlay does not need it: every host answers for the \
        gateway with the same MAC).";
    DropAnnounceNotLocal = 52, drop, "announce_not_local",
        "from-container: an announcement from a copy that is not the one serving the address \
        (restored but not yet released, frozen, or being moved away): relaying it would draw \
        peers to the wrong copy.";
    PublicStandbyArp = 53, pass, "public_standby_arp",
        "from-public: an ARP request for a public address on a gateway that stands by \
        (`PUBLIC_STANDBY`: another gateway-role host faces the internet), left unanswered \
        (handed to the stack, which does not answer for it either).";
}

impl Reason {
    /// Whether this reason is a drop.
    pub const fn is_drop(self) -> bool {
        matches!(self.kind(), ReasonKind::Drop)
    }
}

/// IPv4 address octets → the `u32` the datapath uses as key (bytes in network order).
pub const fn ipv4_be(octets: [u8; 4]) -> u32 {
    u32::from_ne_bytes(octets)
}

/// The datapath's `u32` → IPv4 address octets.
pub const fn ipv4_from_be(v: u32) -> [u8; 4] {
    v.to_ne_bytes()
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all are #[repr(C)], Copy, made of integers and byte arrays with explicit padding;
    // every bit pattern is valid.
    unsafe impl aya::Pod for super::Endpoint {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Vtep {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Config {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Counter {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::NatKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::NatValue {}
}

#[cfg(test)]
mod tests {
    extern crate std;

    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<Endpoint>(), 4 * 5 + 8);
        assert_eq!(size_of::<Vtep>(), 8);
        assert_eq!(size_of::<Config>(), 4 * 8 + 8 + 4 + 4 + 12 + 12 + 4);
        assert_eq!(size_of::<NatKey>(), 8);
        assert_eq!(size_of::<NatValue>(), 8);
        assert_eq!(size_of::<Counter>(), 16);
    }

    #[test]
    fn reasons_are_dense_and_named_uniquely() {
        assert_eq!(Reason::ALL.len(), Reason::COUNT as usize);
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as u32, i as u32, "{r:?} is not at its index");
            for other in &Reason::ALL[i + 1..] {
                assert_ne!(r.name(), other.name());
            }
            assert!(
                r.name()
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "metrics name {:?} is not snake_case",
                r.name()
            );
            assert!(!r.description().is_empty(), "{r:?} has no description");
        }
    }

    #[test]
    fn drops_are_the_drop_variants() {
        assert!(!Reason::OverlayEncap.is_drop());
        assert!(Reason::DropUnknownVtep.is_drop());
        assert!(!Reason::PublicSnat.is_drop());
        assert_eq!(Reason::DropSpoofedSource.kind(), ReasonKind::Drop);
        for r in Reason::ALL {
            assert_eq!(
                r.is_drop(),
                std::format!("{r:?}").starts_with("Drop"),
                "{r:?}"
            );
        }
    }

    #[test]
    fn indices_stay_where_dashboards_expect_them() {
        assert_eq!(Reason::OverlayToHost as u32, 0);
        assert_eq!(Reason::DropSpoofedSource as u32, 23);
        assert_eq!(Reason::DropTtlExceeded as u32, 35);
        assert_eq!(Reason::DropNoEndpoint.name(), "no_endpoint");
    }

    #[test]
    fn an_ipv6_address_in_the_prefix_keys_its_ipv4_endpoint() {
        let prefix = [0x20, 0x01, 0x0d, 0xb8, 0, 0xf, 0, 0, 0, 0, 0, 0];
        let ip = ipv4_be([10, 244, 1, 10]);
        let v6 = ipv6_of(prefix, ip);
        assert_eq!(&v6[12..], &[10, 244, 1, 10]);
        let mut cfg = Config {
            overlay6_prefix: prefix,
            ..Config::default()
        };
        assert_eq!(cfg.overlay6_key(&v6), None, "IPv4-only overlay");
        cfg.flags |= config_flags::IPV6;
        assert_eq!(cfg.overlay6_key(&v6), Some(ip));
        let mut outside = v6;
        outside[5] ^= 1;
        assert_eq!(cfg.overlay6_key(&outside), None);
    }

    #[test]
    fn address_conversion_keeps_wire_order() {
        let v = ipv4_be([10, 244, 0, 1]);
        assert_eq!(v.to_ne_bytes(), [10, 244, 0, 1]);
        assert_eq!(ipv4_from_be(v), [10, 244, 0, 1]);
        assert_eq!(u32::from_be(v), 0x0af4_0001);
    }
}
