//! Types shared between ferry's eBPF programs and user space.
//!
//! Every map key and value is `#[repr(C)]` with explicit padding and no `bool`, so the layout
//! the verifier sees is the one user space writes. IPv4 addresses are stored as they appear on
//! the wire: a `u32` whose in-memory bytes are the address in network order (`_be` suffix). In
//! user space, convert with [`ipv4_be`] / [`ipv4_from_be`].
#![no_std]

/// Maximum number of endpoints (container or host overlay addresses) per host.
pub const MAX_ENDPOINTS: u32 = 131_072;
/// Maximum number of VTEPs (hosts) allowed to send VXLAN to this host.
pub const MAX_VTEPS: u32 = 4_096;

/// Names of the maps, as user space finds them in the object.
pub mod maps {
    pub const COUNTERS: &str = "FERRY_COUNTERS";
    pub const ENDPOINTS: &str = "FERRY_ENDPOINTS";
    pub const VTEPS: &str = "FERRY_VTEPS";
    pub const CONFIG: &str = "FERRY_CONFIG";
}

/// Names of the programs in the object: one per attach point.
pub mod programs {
    /// TC ingress of the host's VXLAN device: decapsulated packets from other hosts.
    pub const FROM_OVERLAY: &str = "from_overlay";
    /// TC egress of the host's VXLAN device: packets the host routes into the overlay.
    pub const TO_OVERLAY: &str = "to_overlay";
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
    pub _pad: u32,
}

/// Per-reason packet and byte counter (a per-CPU array indexed by [`Reason`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

/// Why a packet was passed, redirected or dropped. Every verdict the datapath gives has one.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// from-overlay: for this host's own overlay address, handed to the stack.
    OverlayToHost = 0,
    /// to-overlay: encapsulated to a remote host.
    OverlayEncap = 1,
    /// to-overlay: re-encapsulated along a forwarding pointer.
    OverlayForward = 2,
    /// from-overlay: delivered to a local container.
    OverlayToLocal = 3,
    /// drop: a packet on the VXLAN device carried no tunnel metadata.
    DropNoTunnelKey = 4,
    /// drop: outer source is not in the VTEP allow-list.
    DropUnknownVtep = 5,
    /// drop: VNI differs from the host's (or the VTEP's) VNI.
    DropBadVni = 6,
    /// drop: no endpoint entry for the inner destination.
    DropNoEndpoint = 7,
    /// drop: not IPv4 (the overlay is IPv4-only for now).
    DropNotIpv4 = 8,
    /// drop: truncated or malformed header.
    DropMalformed = 9,
    /// drop: setting the tunnel key failed.
    DropTunnelKeyFailed = 10,
    /// drop: the endpoint kind is not valid at this attach point.
    DropBadKind = 11,
    /// drop: configuration map empty (agent not ready).
    DropNoConfig = 12,
}

impl Reason {
    /// Number of reasons (length of the counter array).
    pub const COUNT: u32 = 13;
    /// Every reason, in index order.
    pub const ALL: [Reason; Self::COUNT as usize] = [
        Reason::OverlayToHost,
        Reason::OverlayEncap,
        Reason::OverlayForward,
        Reason::OverlayToLocal,
        Reason::DropNoTunnelKey,
        Reason::DropUnknownVtep,
        Reason::DropBadVni,
        Reason::DropNoEndpoint,
        Reason::DropNotIpv4,
        Reason::DropMalformed,
        Reason::DropTunnelKeyFailed,
        Reason::DropBadKind,
        Reason::DropNoConfig,
    ];

    /// Stable name used in metrics labels.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::OverlayToHost => "overlay_to_host",
            Reason::OverlayEncap => "overlay_encap",
            Reason::OverlayForward => "overlay_forward",
            Reason::OverlayToLocal => "overlay_to_local",
            Reason::DropNoTunnelKey => "no_tunnel_key",
            Reason::DropUnknownVtep => "unknown_vtep",
            Reason::DropBadVni => "bad_vni",
            Reason::DropNoEndpoint => "no_endpoint",
            Reason::DropNotIpv4 => "not_ipv4",
            Reason::DropMalformed => "malformed",
            Reason::DropTunnelKeyFailed => "tunnel_key_failed",
            Reason::DropBadKind => "bad_kind",
            Reason::DropNoConfig => "no_config",
        }
    }

    /// Whether this reason is a drop.
    pub const fn is_drop(self) -> bool {
        (self as u32) >= (Reason::DropNoTunnelKey as u32)
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<Endpoint>(), 4 * 5 + 8);
        assert_eq!(size_of::<Vtep>(), 8);
        assert_eq!(size_of::<Config>(), 16);
        assert_eq!(size_of::<Counter>(), 16);
    }

    #[test]
    fn reasons_are_dense_and_named_uniquely() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as u32, i as u32);
            for other in &Reason::ALL[i + 1..] {
                assert_ne!(r.name(), other.name());
            }
        }
        assert!(!Reason::OverlayEncap.is_drop());
        assert!(Reason::DropUnknownVtep.is_drop());
    }

    #[test]
    fn address_conversion_keeps_wire_order() {
        let v = ipv4_be([10, 244, 0, 1]);
        assert_eq!(v.to_ne_bytes(), [10, 244, 0, 1]);
        assert_eq!(ipv4_from_be(v), [10, 244, 0, 1]);
        assert_eq!(u32::from_be(v), 0x0af4_0001);
    }
}
