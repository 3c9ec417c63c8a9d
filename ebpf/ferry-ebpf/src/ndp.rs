//! IPv6 neighbour solicitation responder: the IPv6 twin of `arp.rs`. A container's neighbour
//! solicitation (for its gateway `fe80::1`, or any address: the container's only neighbour is
//! the datapath) is rewritten in place into the neighbour advertisement "target is at the
//! gateway MAC" and sent back out of the interface it came in on.
//!
//! The agent gives every dual-stack container a permanent neighbour entry for its gateway, so
//! this answers only a container whose entry went away (flushed by a process inside, or a
//! runtime that set the namespace up itself). A solicitation from the unspecified address is
//! duplicate address detection: never answered (that would make the container give its
//! address up).
//!
//! Stack: the BPF stack is 512 bytes for a program and the functions it calls together, so
//! this is a function of its own (a BPF-to-BPF call) that builds the answer in one 72-byte
//! buffer (the checksum's pseudo-header and message) and stores the rest piece by piece.

use aya_ebpf::{helpers::bpf_csum_diff, programs::TcContext};
use ferry_common::{GATEWAY_MAC, Reason};

use crate::packet::ETH_HLEN;

const IPPROTO_ICMPV6: u8 = 58;
const ND_NEIGHBOR_SOLICIT: u8 = 135;
const ND_NEIGHBOR_ADVERT: u8 = 136;
/// Router, Solicited, Override.
const NA_FLAGS: u8 = 0xe0;
/// ICMPv6 neighbour advertisement with a target link-layer address option: 24 + 8 bytes.
const NA_LEN: usize = 32;
/// The whole reply frame.
const FRAME_LEN: usize = ETH_HLEN + 40 + NA_LEN;
/// An NS's fixed part: the ICMPv6 header, reserved, the target.
const NS_MIN: u16 = 24;
const IP: usize = ETH_HLEN;
const ICMP: usize = ETH_HLEN + 40;

/// Answers the frame if it is a neighbour solicitation to answer; `None` if it is not one
/// (including DAD and a container asking about its own address).
#[inline(never)]
pub fn answer(ctx: &TcContext) -> Option<Result<crate::Verdict, Reason>> {
    // Version/class/flow, payload length, next header, hop limit.
    let fixed = ctx.load::<[u8; 8]>(IP).ok()?;
    let icmp_type = ctx.load::<[u8; 2]>(ICMP).ok()?;
    // Hop limit 255: the NS was not forwarded (RFC 4861 7.1.1).
    if fixed[6] != IPPROTO_ICMPV6
        || fixed[7] != 255
        || icmp_type != [ND_NEIGHBOR_SOLICIT, 0]
        || u16::from_be_bytes([fixed[4], fixed[5]]) < NS_MIN
    {
        return None;
    }
    // The checksum's input: pseudo-header (source, destination, length, next header) and the
    // advertisement, 72 bytes as 32-bit words for bpf_csum_diff.
    let mut buf = [0u32; 18];
    // SAFETY: buf is 72 bytes of plain data; viewed as bytes to fill it.
    let b: &mut [u8; 72] = unsafe { &mut *(buf.as_mut_ptr().cast::<[u8; 72]>()) };
    // Source of the answer: the target asked for; destination: the asker.
    let target = ctx.load::<[u8; 16]>(ICMP + 8).ok()?;
    let asker = ctx.load::<[u8; 16]>(IP + 8).ok()?;
    if u128::from_ne_bytes(asker) == 0 || asker == target {
        return None;
    }
    b[0..16].copy_from_slice(&target);
    b[16..32].copy_from_slice(&asker);
    b[35] = NA_LEN as u8;
    b[39] = IPPROTO_ICMPV6;
    b[40] = ND_NEIGHBOR_ADVERT;
    b[44] = NA_FLAGS;
    b[48..64].copy_from_slice(&target);
    // Target link-layer address option: type 2, one unit of 8 bytes, the gateway MAC.
    b[64] = 2;
    b[65] = 1;
    b[66..72].copy_from_slice(&GATEWAY_MAC);
    Some(write(ctx, &mut buf))
}

/// An unsolicited neighbour advertisement (to all nodes, Solicited clear, hop limit 255) sent
/// from the address it announces, with a target link-layer address option: `Some((endpoint
/// key of the address, or None outside the overlay's prefix; the MAC announced))`. `None`
/// for anything else (which the caller treats as link-scoped). Reads in 8-byte pieces: it
/// runs in a frame of its own that must stay small.
#[inline(always)]
pub fn unsolicited_advert(
    ctx: &TcContext,
    cfg: &ferry_common::Config,
) -> Option<(Option<u32>, [u8; 6])> {
    let fixed = ctx.load::<[u8; 8]>(IP).ok()?;
    let head = ctx.load::<[u8; 8]>(ICMP).ok()?;
    if fixed[6] != IPPROTO_ICMPV6
        || fixed[7] != 255
        || head[0] != ND_NEIGHBOR_ADVERT
        || head[1] != 0
        || head[4] & 0x40 != 0
        || u16::from_be_bytes([fixed[4], fixed[5]]) < NA_LEN as u16
    {
        return None;
    }
    let word = |off: usize| ctx.load::<u64>(off).ok();
    // To ff02::1, from the target.
    if word(IP + 24)? != u64::from_ne_bytes([0xff, 2, 0, 0, 0, 0, 0, 0])
        || word(IP + 32)? != u64::from_ne_bytes([0, 0, 0, 0, 0, 0, 0, 1])
        || word(IP + 8)? != word(ICMP + 8)?
        || word(IP + 16)? != word(ICMP + 16)?
    {
        return None;
    }
    // The option right after the target: type 2, one unit of 8 bytes.
    let opt = ctx.load::<[u8; 8]>(ICMP + 24).ok()?;
    if opt[0] != 2 || opt[1] != 1 {
        return None;
    }
    let target = ctx.load::<[u8; 16]>(ICMP + 8).ok()?;
    Some((
        cfg.overlay6_key(&target),
        [opt[2], opt[3], opt[4], opt[5], opt[6], opt[7]],
    ))
}

/// Writes the advertisement whose pseudo-header and message are in `buf` (checksum field
/// zero) over the solicitation, addressed to the asker, and sends it back.
#[inline(always)]
fn write(ctx: &TcContext, buf: &mut [u32; 18]) -> Result<crate::Verdict, Reason> {
    let asker_mac = ctx.load::<[u8; 6]>(6).map_err(|_| Reason::DropMalformed)?;
    // SAFETY: `to` is a valid buffer of the size passed (a multiple of 4); no `from`.
    let sum = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, buf.as_mut_ptr(), 72, 0) };
    if sum < 0 {
        return Err(Reason::DropRewriteFailed);
    }
    let mut s = sum as u64;
    s = (s & 0xffff_ffff) + (s >> 32);
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    // The sum was taken over the bytes as they lie in memory: store it the same way.
    let csum = (!(s as u16)).to_ne_bytes();
    if ctx.len() as usize != FRAME_LEN {
        // SAFETY: plain helper call on this program's skb.
        let rc =
            unsafe { aya_ebpf::helpers::bpf_skb_change_tail(ctx.skb.skb, FRAME_LEN as u32, 0) };
        if rc != 0 {
            return Err(Reason::DropRewriteFailed);
        }
    }
    // SAFETY: buf is 72 bytes of plain data; viewed as bytes to read it.
    let b: &[u8; 72] = unsafe { &*(buf.as_ptr().cast::<[u8; 72]>()) };
    let err = |_| Reason::DropRewriteFailed;
    ctx.store(0, &asker_mac, 0).map_err(err)?;
    ctx.store(6, &GATEWAY_MAC, 0).map_err(err)?;
    let fixed: [u8; 8] = [0x60, 0, 0, 0, 0, NA_LEN as u8, IPPROTO_ICMPV6, 255];
    ctx.store(IP, &fixed, 0).map_err(err)?;
    let addrs: &[u8; 32] = b[0..32].try_into().map_err(|_| Reason::DropMalformed)?;
    let msg: &[u8; 32] = b[40..72].try_into().map_err(|_| Reason::DropMalformed)?;
    ctx.store(IP + 8, addrs, 0).map_err(err)?;
    ctx.store(ICMP, msg, 0).map_err(err)?;
    ctx.store(ICMP + 2, &csum, 0).map_err(err)?;
    // SAFETY: the context pointer is valid for the program's run; ifindex is a plain field.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    crate::redirect_to(ifindex, Reason::NdpReply)
}
