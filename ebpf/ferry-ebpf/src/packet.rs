//! Bounds-checked packet access (through bpf_skb_load_bytes / store_bytes, so non-linear skbs
//! work too). Offsets are for an Ethernet frame; the IPv4 header may carry options.

use aya_ebpf::programs::TcContext;
use ferry_common::Reason;

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV6: u16 = 0x86dd;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
const ETHERTYPE_OFF: usize = 12;
/// Offsets of IPv4 header fields from the start of the frame.
pub const IPV4_FRAG_OFF: usize = ETH_HLEN + 6;
/// TTL and protocol, as one 16-bit word (for the checksum update).
pub const IPV4_TTL_OFF: usize = ETH_HLEN + 8;
pub const IPV4_PROTO_OFF: usize = ETH_HLEN + 9;
pub const IPV4_CSUM_OFF: usize = ETH_HLEN + 10;
pub const IPV4_SRC_OFF: usize = ETH_HLEN + 12;
pub const IPV4_DST_OFF: usize = ETH_HLEN + 16;
/// Offsets of IPv6 header fields from the start of the frame.
const IPV6_NEXT_OFF: usize = ETH_HLEN + 6;
pub const IPV6_HOP_OFF: usize = ETH_HLEN + 7;
const IPV6_SRC_OFF: usize = ETH_HLEN + 8;
const IPV6_DST_OFF: usize = ETH_HLEN + 24;
const IPV6_HLEN: usize = 40;

#[inline(always)]
pub fn ethertype(ctx: &TcContext) -> Result<u16, Reason> {
    ctx.load::<u16>(ETHERTYPE_OFF)
        .map(u16::from_be)
        .map_err(|_| Reason::DropMalformed)
}

/// IPv4 destination as stored on the wire (network order in memory).
#[inline(always)]
pub fn ipv4_dst(ctx: &TcContext) -> Result<u32, Reason> {
    ctx.load::<u32>(IPV4_DST_OFF)
        .map_err(|_| Reason::DropMalformed)
}

/// IPv4 source as stored on the wire (network order in memory).
#[inline(always)]
pub fn ipv4_src(ctx: &TcContext) -> Result<u32, Reason> {
    ctx.load::<u32>(IPV4_SRC_OFF)
        .map_err(|_| Reason::DropMalformed)
}

/// IPv6 source address.
#[inline(always)]
pub fn ipv6_src(ctx: &TcContext) -> Result<[u8; 16], Reason> {
    ctx.load::<[u8; 16]>(IPV6_SRC_OFF)
        .map_err(|_| Reason::DropMalformed)
}

/// IPv6 destination address.
#[inline(always)]
pub fn ipv6_dst(ctx: &TcContext) -> Result<[u8; 16], Reason> {
    ctx.load::<[u8; 16]>(IPV6_DST_OFF)
        .map_err(|_| Reason::DropMalformed)
}

/// Link-local (fe80::/10) or unspecified (::): an address that only means something on one link.
#[inline(always)]
pub fn ipv6_is_link_scoped(a: &[u8; 16]) -> bool {
    (a[0] == 0xfe && a[1] & 0xc0 == 0x80) || u128::from_ne_bytes(*a) == 0
}

#[inline(always)]
pub fn set_eth_addrs(ctx: &TcContext, dst: &[u8; 6], src: &[u8; 6]) -> Result<(), Reason> {
    ctx.store(0, dst, 0).map_err(|_| Reason::DropMalformed)?;
    ctx.store(6, src, 0).map_err(|_| Reason::DropMalformed)
}

/// Where the transport header is, for the protocols whose ports the gateway translates.
#[derive(Clone, Copy)]
pub struct L4 {
    pub proto: u8,
    /// Offset of the transport header from the start of the frame.
    pub off: usize,
    /// Offset of the transport checksum from the start of the frame.
    pub csum_off: usize,
    /// Source and destination ports, network order.
    pub sport_be: u16,
    pub dport_be: u16,
}

impl L4 {
    pub const fn is_udp(&self) -> bool {
        self.proto == IPPROTO_UDP
    }
}

/// TCP flags (offset in the TCP header) and the two `is_new_connection` looks at.
const TCP_FLAGS_OFF: usize = 13;
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// Is this IP packet a new connection's first segment: TCP, SYN without ACK? (Anything
/// unparseable is not: it goes where it went before.)
#[inline(always)]
pub fn is_new_connection(ctx: &TcContext) -> bool {
    let Ok(Some(l4)) = l4(ctx) else {
        return false;
    };
    if l4.proto != IPPROTO_TCP {
        return false;
    }
    match ctx.load::<u8>(l4.off + TCP_FLAGS_OFF) {
        Ok(f) => f & (TCP_SYN | TCP_ACK) == TCP_SYN,
        Err(_) => false,
    }
}

/// The IP packet's TCP or UDP header, if it has one in this packet (not for other protocols,
/// not for non-first fragments, which carry no transport header, and not behind IPv6
/// extension headers).
#[inline(always)]
pub fn l4(ctx: &TcContext) -> Result<Option<L4>, Reason> {
    let vihl = ctx
        .load::<u8>(ETH_HLEN)
        .map_err(|_| Reason::DropMalformed)?;
    if vihl >> 4 == 6 {
        return l4_v6(ctx);
    }
    let ihl = usize::from(vihl & 0x0f) * 4;
    if vihl >> 4 != 4 || ihl < 20 {
        return Err(Reason::DropMalformed);
    }
    let frag = ctx
        .load::<u16>(IPV4_FRAG_OFF)
        .map(u16::from_be)
        .map_err(|_| Reason::DropMalformed)?;
    if frag & 0x1fff != 0 {
        return Ok(None);
    }
    let proto = ctx
        .load::<u8>(IPV4_PROTO_OFF)
        .map_err(|_| Reason::DropMalformed)?;
    l4_at(ctx, proto, ETH_HLEN + ihl)
}

/// [`l4`] of an IPv6 packet: the transport header right after the fixed header.
#[inline(always)]
fn l4_v6(ctx: &TcContext) -> Result<Option<L4>, Reason> {
    let proto = ctx
        .load::<u8>(IPV6_NEXT_OFF)
        .map_err(|_| Reason::DropMalformed)?;
    l4_at(ctx, proto, ETH_HLEN + IPV6_HLEN)
}

/// The TCP or UDP header of protocol `proto` at `off` (either family); `None` for others.
#[inline(always)]
fn l4_at(ctx: &TcContext, proto: u8, off: usize) -> Result<Option<L4>, Reason> {
    let csum_rel = match proto {
        IPPROTO_TCP => 16,
        IPPROTO_UDP => 6,
        _ => return Ok(None),
    };
    let ports = ctx
        .load::<[u16; 2]>(off)
        .map_err(|_| Reason::DropMalformed)?;
    Ok(Some(L4 {
        proto,
        off,
        csum_off: off + csum_rel,
        sport_be: ports[0],
        dport_be: ports[1],
    }))
}
