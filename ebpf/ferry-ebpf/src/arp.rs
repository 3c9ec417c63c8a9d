//! ARP responder: answers a request in place (turns it into the reply) and sends it back out
//! of the interface it came in on.

use aya_ebpf::programs::TcContext;
use ferry_common::Reason;

use crate::packet::ETH_HLEN;

const ARP_LEN: usize = 28;
const ARPOP_REQUEST: u16 = 1;
const ARPOP_REPLY: u16 = 2;

/// An Ethernet/IPv4 ARP request.
pub struct Request {
    raw: [u8; ARP_LEN],
}

impl Request {
    /// The address asked for (network order in memory).
    pub fn target_be(&self) -> u32 {
        u32::from_ne_bytes([self.raw[24], self.raw[25], self.raw[26], self.raw[27]])
    }
}

/// What an Ethernet/IPv4 ARP packet is.
pub enum Arp {
    /// A request for someone else's address.
    Request(Request),
    /// A reply.
    Reply,
}

/// A gratuitous ARP (request or reply, sender address = target address): the sender announces
/// its own address. `Some((address, MAC))` (address in network order in memory).
#[inline(always)]
pub fn gratuitous(ctx: &TcContext) -> Option<(u32, [u8; 6])> {
    let raw = ctx.load::<[u8; ARP_LEN]>(ETH_HLEN).ok()?;
    let op = u16::from_be_bytes([raw[6], raw[7]]);
    if raw[0..6] != [0, 1, 8, 0, 6, 4]
        || !matches!(op, ARPOP_REQUEST | ARPOP_REPLY)
        || raw[14..18] != raw[24..28]
    {
        return None;
    }
    let mut mac = [0u8; 6];
    mac.copy_from_slice(&raw[8..14]);
    Some((
        u32::from_ne_bytes([raw[14], raw[15], raw[16], raw[17]]),
        mac,
    ))
}

/// Parses ARP; anything but a request or a reply (gratuitous announcements, which
/// `gratuitous` sees first, other hardware or protocol types) is `DropArpIgnored`.
#[inline(always)]
pub fn parse(ctx: &TcContext) -> Result<Arp, Reason> {
    let raw = ctx
        .load::<[u8; ARP_LEN]>(ETH_HLEN)
        .map_err(|_| Reason::DropMalformed)?;
    let htype = u16::from_be_bytes([raw[0], raw[1]]);
    let ptype = u16::from_be_bytes([raw[2], raw[3]]);
    let op = u16::from_be_bytes([raw[6], raw[7]]);
    let gratuitous = raw[14..18] == raw[24..28];
    if htype != 1 || ptype != 0x0800 || raw[4] != 6 || raw[5] != 4 || gratuitous {
        return Err(Reason::DropArpIgnored);
    }
    match op {
        ARPOP_REQUEST => Ok(Arp::Request(Request { raw })),
        ARPOP_REPLY => Ok(Arp::Reply),
        _ => Err(Reason::DropArpIgnored),
    }
}

/// Rewrites the request into the reply "target is at `mac`", addressed to the requester.
#[inline(always)]
pub fn reply(ctx: &TcContext, req: &Request, mac: &[u8; 6]) -> Result<(), Reason> {
    let r = &req.raw;
    let mut eth = [0u8; ETH_HLEN];
    eth[0..6].copy_from_slice(&r[8..14]);
    eth[6..12].copy_from_slice(mac);
    eth[12] = 0x08;
    eth[13] = 0x06;
    let mut arp = [0u8; ARP_LEN];
    arp[0..6].copy_from_slice(&r[0..6]);
    arp[6..8].copy_from_slice(&ARPOP_REPLY.to_be_bytes());
    arp[8..14].copy_from_slice(mac);
    arp[14..18].copy_from_slice(&r[24..28]);
    arp[18..24].copy_from_slice(&r[8..14]);
    arp[24..28].copy_from_slice(&r[14..18]);
    ctx.store(0, &eth, 0).map_err(|_| Reason::DropMalformed)?;
    ctx.store(ETH_HLEN, &arp, 0)
        .map_err(|_| Reason::DropMalformed)
}
