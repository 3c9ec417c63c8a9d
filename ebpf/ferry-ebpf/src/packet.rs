//! Bounds-checked packet access (through bpf_skb_load_bytes / store_bytes, so non-linear skbs
//! work too). Offsets are for an Ethernet frame with an IPv4 header.

use aya_ebpf::programs::TcContext;
use ferry_common::Reason;

pub const ETH_HLEN: usize = 14;
pub const ETH_P_IP: u16 = 0x0800;
const ETHERTYPE_OFF: usize = 12;
const IPV4_DST_OFF: usize = ETH_HLEN + 16;

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

#[inline(always)]
pub fn set_eth_addrs(ctx: &TcContext, dst: &[u8; 6], src: &[u8; 6]) -> Result<(), Reason> {
    ctx.store(0, dst, 0).map_err(|_| Reason::DropMalformed)?;
    ctx.store(6, src, 0).map_err(|_| Reason::DropMalformed)
}
