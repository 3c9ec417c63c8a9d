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

use aya_ebpf::{helpers::bpf_csum_diff, programs::TcContext};
use ferry_common::Reason;

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
const NS_MIN: usize = 24;

/// A neighbour solicitation's addresses and the asker's MAC.
pub struct Solicitation {
    asker_mac: [u8; 6],
    asker: [u8; 16],
    target: [u8; 16],
}

/// Is this IPv6 frame a neighbour solicitation with a unicast (not unspecified) source? `None`
/// for anything else, including one too short to be an NS.
#[inline(always)]
pub fn solicitation(ctx: &TcContext) -> Option<Solicitation> {
    let head = ctx.load::<[u8; ETH_HLEN + 40 + NS_MIN]>(0).ok()?;
    let ip = &head[ETH_HLEN..];
    let icmp = &head[ETH_HLEN + 40..];
    let payload = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
    // Hop limit 255: the NS was not forwarded (RFC 4861 7.1.1).
    if ip[6] != IPPROTO_ICMPV6 || ip[7] != 255 || icmp[0] != ND_NEIGHBOR_SOLICIT || icmp[1] != 0 {
        return None;
    }
    if payload < NS_MIN {
        return None;
    }
    let mut s = Solicitation {
        asker_mac: [0; 6],
        asker: [0; 16],
        target: [0; 16],
    };
    s.asker_mac.copy_from_slice(&head[6..12]);
    s.asker.copy_from_slice(&ip[8..24]);
    s.target.copy_from_slice(&icmp[8..24]);
    // Duplicate address detection, or a container asking about itself: not ours to answer.
    if u128::from_ne_bytes(s.asker) == 0 || s.asker == s.target {
        return None;
    }
    Some(s)
}

/// Rewrites the frame into the advertisement "`s.target` is at `mac`", addressed to the asker
/// (trimming or growing it to the advertisement's length), with its ICMPv6 checksum.
#[inline(always)]
pub fn advertise(ctx: &TcContext, s: &Solicitation, mac: &[u8; 6]) -> Result<(), Reason> {
    if ctx.len() as usize != FRAME_LEN {
        // SAFETY: plain helper call on this program's skb.
        let rc =
            unsafe { aya_ebpf::helpers::bpf_skb_change_tail(ctx.skb.skb, FRAME_LEN as u32, 0) };
        if rc != 0 {
            return Err(Reason::DropRewriteFailed);
        }
    }
    let mut f = [0u8; FRAME_LEN];
    f[0..6].copy_from_slice(&s.asker_mac);
    f[6..12].copy_from_slice(mac);
    f[12] = 0x86;
    f[13] = 0xdd;
    let ip = ETH_HLEN;
    f[ip] = 0x60;
    f[ip + 5] = NA_LEN as u8;
    f[ip + 6] = IPPROTO_ICMPV6;
    f[ip + 7] = 255;
    f[ip + 8..ip + 24].copy_from_slice(&s.target);
    f[ip + 24..ip + 40].copy_from_slice(&s.asker);
    let na = ip + 40;
    f[na] = ND_NEIGHBOR_ADVERT;
    f[na + 4] = NA_FLAGS;
    f[na + 8..na + 24].copy_from_slice(&s.target);
    // Target link-layer address option: type 2, 1 unit of 8 bytes.
    f[na + 24] = 2;
    f[na + 25] = 1;
    f[na + 26..na + 32].copy_from_slice(mac);
    let csum = checksum(&f)?;
    f[na + 2..na + 4].copy_from_slice(&csum);
    ctx.store(0, &f, 0).map_err(|_| Reason::DropRewriteFailed)
}

/// The ICMPv6 checksum of the advertisement in `f` (its checksum field zero): the one's
/// complement sum over the pseudo-header (addresses, length, next header) and the message.
#[inline(always)]
fn checksum(f: &[u8; FRAME_LEN]) -> Result<[u8; 2], Reason> {
    // Pseudo-header (40 bytes) then the message (32): 72 bytes, a multiple of 4.
    let mut buf = [0u32; 18];
    // SAFETY: buf is 72 bytes of plain data; viewed as bytes to fill it.
    let bytes: &mut [u8; 72] = unsafe { &mut *(buf.as_mut_ptr().cast::<[u8; 72]>()) };
    bytes[0..32].copy_from_slice(&f[ETH_HLEN + 8..ETH_HLEN + 40]);
    bytes[35] = NA_LEN as u8;
    bytes[39] = IPPROTO_ICMPV6;
    bytes[40..72].copy_from_slice(&f[ETH_HLEN + 40..]);
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
    Ok((!(s as u16)).to_ne_bytes())
}
