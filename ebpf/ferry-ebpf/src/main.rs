//! ferry's datapath. One program per attach point; each entry is a thin wrapper over a `try_`
//! function that returns the verdict and the reason, and every verdict is counted by reason.
#![no_std]
#![no_main]

mod arp;
mod maps;
mod nat;
mod ndp;
mod object;
mod packet;
mod tunnel;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, bpf_redir_neigh},
    helpers::{bpf_clone_redirect, bpf_redirect, bpf_redirect_neigh, bpf_redirect_peer},
    macros::classifier,
    programs::TcContext,
};
use ferry_common::{Config, Endpoint, GATEWAY_MAC, NatKey, Reason, config_flags, flags, kind};

use crate::{
    maps::{config, count, endpoint, vtep},
    packet::{
        ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, ethertype, ipv4_dst, ipv4_src, ipv6_dst,
        ipv6_is_link_scoped, ipv6_src, set_eth_addrs,
    },
};

/// `skb->pkt_type` for frames addressed to this host.
const PACKET_HOST: u32 = 0;

/// A packet's addresses as the endpoint map knows them. IPv4 addresses are their own keys;
/// an IPv6 address has one when it lies in the overlay's IPv6 prefix (the endpoint's IPv4
/// address is its last 32 bits), so one entry serves both families.
struct Addrs {
    v6: bool,
    /// Source: the IPv4 address, or an overlay IPv6 address's key.
    src: Option<u32>,
    /// Destination, likewise.
    dst: Option<u32>,
    /// Whether the destination is an overlay address (IPv4 in the overlay CIDR, IPv6 in the
    /// overlay prefix): what no endpoint has is then dropped, not sent to the internet.
    dst_in_overlay: bool,
}

/// The IP packet's addresses (after the Ethernet header). Not IP, or IPv6 on an IPv4-only
/// overlay: `not_ipv4`.
#[inline(always)]
fn addrs(ctx: &TcContext, cfg: &Config) -> Result<Addrs, Reason> {
    match ethertype(ctx)? {
        ETH_P_IP => addrs_v4(ctx, cfg),
        ETH_P_IPV6 if cfg.flags & config_flags::IPV6 != 0 => {
            Ok(addrs_v6(cfg, &ipv6_src(ctx)?, &ipv6_dst(ctx)?))
        }
        _ => Err(Reason::DropNotIpv4),
    }
}

#[inline(always)]
fn addrs_v4(ctx: &TcContext, cfg: &Config) -> Result<Addrs, Reason> {
    let dst = ipv4_dst(ctx)?;
    Ok(Addrs {
        v6: false,
        src: Some(ipv4_src(ctx)?),
        dst: Some(dst),
        dst_in_overlay: cfg.in_overlay(dst),
    })
}

/// [`addrs`] of IPv6 addresses already read.
#[inline(always)]
fn addrs_v6(cfg: &Config, src: &[u8; 16], dst: &[u8; 16]) -> Addrs {
    let dst = cfg.overlay6_key(dst);
    Addrs {
        v6: true,
        src: cfg.overlay6_key(src),
        dst,
        dst_in_overlay: dst.is_some(),
    }
}

/// A verdict and why.
struct Verdict {
    action: i32,
    reason: Reason,
}

const fn pass(reason: Reason) -> Verdict {
    Verdict {
        action: TC_ACT_OK,
        reason,
    }
}

/// Checks a redirect helper's answer.
#[inline(always)]
fn redirected(rc: i64, reason: Reason) -> Result<Verdict, Reason> {
    if rc as i32 == TC_ACT_REDIRECT {
        Ok(Verdict {
            action: TC_ACT_REDIRECT,
            reason,
        })
    } else {
        Err(Reason::DropRedirectFailed)
    }
}

#[inline(always)]
fn redirect_to(ifindex: u32, reason: Reason) -> Result<Verdict, Reason> {
    // SAFETY: plain helper call; the kernel validates the ifindex.
    redirected(unsafe { bpf_redirect(ifindex, 0) }, reason)
}

fn finish(ctx: &TcContext, r: Result<Verdict, Reason>) -> i32 {
    match r {
        Ok(v) => {
            count(v.reason, ctx.len());
            v.action
        }
        Err(reason) => {
            count(reason, ctx.len());
            TC_ACT_SHOT
        }
    }
}

/// ifindex of the device the program runs on.
#[inline(always)]
fn ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: the context pointer is valid for the program's run; ifindex is a plain field.
    unsafe { (*ctx.skb.skb).ifindex }
}

/// Sends a packet on towards an endpoint: into a local container's veth, or to the VXLAN
/// device, whose egress program (to-overlay) encapsulates it to the host the endpoint lives on
/// (one place sets tunnel keys: the redirect runs the device's egress hook).
/// `local`/`encap` name the reason counted for each outcome.
#[inline(always)]
fn deliver(
    ctx: &TcContext,
    cfg: &Config,
    ep: &Endpoint,
    local: Reason,
    encap: Reason,
) -> Result<Verdict, Reason> {
    match ep.kind {
        kind::LOCAL if draining(ctx, ep) => hold_as(cfg, Reason::HoldSyn),
        kind::LOCAL => {
            set_eth_addrs(ctx, &ep.mac, &GATEWAY_MAC)?;
            // Straight into the container's end of the veth (its namespace's ingress), as if
            // its eth0 had received it: no pass through the host veth's transmit and backlog.
            // The frame is addressed to the container now, so it is for that host.
            ctx.change_type(PACKET_HOST)
                .map_err(|_| Reason::DropMalformed)?;
            // SAFETY: plain helper call; the kernel validates the ifindex (a veth here).
            redirected(unsafe { bpf_redirect_peer(ep.ifindex, 0) }, local)
        }
        kind::REMOTE | kind::FORWARD => redirect_to(cfg.vxlan_ifindex, encap),
        kind::HOLD => hold(cfg),
        _ => Err(Reason::DropBadKind),
    }
}

/// A `HOLD` endpoint (frozen, or not yet restored here): the packet goes to the agent's hold
/// device, where the agent queues it until release (bounded, overflow counted there).
#[inline(always)]
fn hold(cfg: &Config) -> Result<Verdict, Reason> {
    hold_as(cfg, Reason::HoldQueued)
}

/// To the agent's hold device, counted as `reason`.
#[inline(always)]
fn hold_as(cfg: &Config, reason: Reason) -> Result<Verdict, Reason> {
    if cfg.hold_ifindex == 0 {
        return Err(Reason::DropNoHoldDevice);
    }
    redirect_to(cfg.hold_ifindex, reason)
}

/// A `LOCAL` endpoint being drained before a checkpoint (`HOLD_SYN`), and this packet opens a
/// new connection (SYN without ACK): it waits in the hold device instead of reaching the
/// container's listener, so the listener's queues can empty before CRIU dumps it.
#[inline(always)]
fn draining(ctx: &TcContext, ep: &Endpoint) -> bool {
    ep.flags & flags::HOLD_SYN != 0 && packet::is_new_connection(ctx)
}

/// Sending a packet that arrived from the overlay back into it (a forwarding pointer, or a
/// host that no longer has the endpoint): decrement the inner TTL so that hosts with stale,
/// mutually pointing entries cannot bounce a packet forever.
#[inline(always)]
fn decrement_ttl(ctx: &TcContext, v6: bool) -> Result<(), Reason> {
    if v6 {
        // IPv6 has no header checksum.
        let hops = ctx
            .load::<u8>(packet::IPV6_HOP_OFF)
            .map_err(|_| Reason::DropMalformed)?;
        if hops <= 1 {
            return Err(Reason::DropTtlExceeded);
        }
        return ctx
            .store(packet::IPV6_HOP_OFF, &(hops - 1), 0)
            .map_err(|_| Reason::DropRewriteFailed);
    }
    let ttl_proto = ctx
        .load::<u16>(packet::IPV4_TTL_OFF)
        .map_err(|_| Reason::DropMalformed)?;
    let ttl = u16::from_be(ttl_proto) >> 8;
    if ttl <= 1 {
        return Err(Reason::DropTtlExceeded);
    }
    let new = (u16::from_be(ttl_proto) - 0x0100).to_be();
    ctx.l3_csum_replace(
        packet::IPV4_CSUM_OFF,
        u64::from(ttl_proto),
        u64::from(new),
        2,
    )
    .map_err(|_| Reason::DropRewriteFailed)?;
    ctx.store(packet::IPV4_TTL_OFF, &new, 0)
        .map_err(|_| Reason::DropRewriteFailed)
}

/// Gateway: a container's packet for the internet side. With a public address its source is
/// translated; either way it is handed to the gateway's stack, which routes it out of the
/// public interface (and masquerades containers without a public address).
///
/// Why not redirect straight to the public interface: a decapsulated skb may carry
/// CHECKSUM_COMPLETE state, which an ingress→egress redirect keeps while the receiver then
/// distrusts the packet's (correct) checksum; the stack's forwarding path clears that state
/// (skb_forward_csum). Measured in the lab: redirected UDP replies were dropped as checksum
/// errors by the client.
///
/// IPv6 is not translated: the overlay's prefix is either routed publicly or masqueraded by
/// the gateway's stack (see `config_flags::PUBLIC6`).
#[inline(always)]
fn to_internet(ctx: &TcContext, a: &Addrs) -> Result<Verdict, Reason> {
    let l4 = packet::l4(ctx)?;
    let translated = match a.src {
        Some(src_be) if !a.v6 => nat::snat(ctx, src_be, &l4)?,
        _ => false,
    };
    let reason = if translated {
        Reason::PublicSnat
    } else {
        Reason::GatewayToStack
    };
    ctx.change_type(PACKET_HOST)
        .map_err(|_| Reason::DropMalformed)?;
    Ok(pass(reason))
}

/// TC ingress of the VXLAN device: packets other hosts encapsulated to us.
#[classifier]
pub fn from_overlay(ctx: TcContext) -> i32 {
    let r = try_from_overlay(&ctx);
    finish(&ctx, r)
}

fn try_from_overlay(ctx: &TcContext) -> Result<Verdict, Reason> {
    let cfg = config()?;
    let key = tunnel::get(ctx)?;
    if key.tunnel_id != cfg.vni {
        return Err(Reason::DropBadVni);
    }
    let peer = vtep(tunnel::remote_be(&key)).ok_or(Reason::DropUnknownVtep)?;
    if peer.vni != key.tunnel_id {
        return Err(Reason::DropBadVni);
    }
    let a = addrs(ctx, cfg)?;
    let Some(ep) = a.dst.and_then(endpoint) else {
        if !a.dst_in_overlay && cfg.flags & config_flags::GATEWAY != 0 {
            return to_internet(ctx, &a);
        }
        if a.v6 && !a.dst_in_overlay {
            return Err(Reason::DropIpv6Outside);
        }
        return Err(Reason::DropNoEndpoint);
    };
    match ep.kind {
        kind::HOST if a.v6 => Err(Reason::DropIpv6ToHost),
        kind::HOST => {
            // The sender addressed the frame to its own device MAC (NOARP): accept it as ours.
            ctx.change_type(PACKET_HOST)
                .map_err(|_| Reason::DropMalformed)?;
            Ok(pass(Reason::OverlayToHost))
        }
        kind::LOCAL | kind::HOLD => {
            deliver(ctx, cfg, &ep, Reason::OverlayToLocal, Reason::DropBadKind)
        }
        // A forwarding pointer never sends a packet back to the host it came from: that host
        // only sends us this endpoint's packets when the move was aborted and it drains what
        // it held back here (possibly before this host has switched back to LOCAL). The
        // pointer keeps the local veth, so deliver there.
        kind::FORWARD if tunnel::remote_be(&key) == ep.vtep_be && ep.ifindex != 0 => {
            let mut local = ep;
            local.kind = kind::LOCAL;
            deliver(
                ctx,
                cfg,
                &local,
                Reason::OverlayToLocal,
                Reason::DropBadKind,
            )
        }
        // Back out through the VXLAN device to the endpoint's (new) host.
        kind::FORWARD | kind::REMOTE => {
            decrement_ttl(ctx, a.v6)?;
            let reason = if ep.kind == kind::FORWARD {
                Reason::OverlayForward
            } else {
                Reason::HoldForwarded
            };
            deliver(ctx, cfg, &ep, Reason::DropBadKind, reason)
        }
        _ => Err(Reason::DropBadKind),
    }
}

/// TC egress of the VXLAN device: packets routed into the overlay get their tunnel key here.
#[classifier]
pub fn to_overlay(ctx: TcContext) -> i32 {
    let r = try_to_overlay(&ctx);
    finish(&ctx, r)
}

fn try_to_overlay(ctx: &TcContext) -> Result<Verdict, Reason> {
    let cfg = config()?;
    let a = addrs(ctx, cfg)?;
    let Some(ep) = a.dst.and_then(endpoint) else {
        // The host's own link-scoped IPv6 on the device (a dual-stack gateway's MLD reports
        // once forwarding is on): nothing to carry.
        if a.v6 && !a.dst_in_overlay {
            let dst = ipv6_dst(ctx)?;
            if dst[0] == 0xff || ipv6_is_link_scoped(&dst) {
                return Err(Reason::DropIpv6LinkLocal);
            }
        }
        if !a.dst_in_overlay && cfg.egress_vtep_be != 0 {
            tunnel::set(ctx, cfg.vni, cfg.egress_vtep_be, cfg.tunnel_ttl)?;
            return Ok(pass(Reason::OverlayEgress));
        }
        return Err(Reason::DropNoEndpoint);
    };
    let reason = match ep.kind {
        kind::REMOTE => Reason::OverlayEncap,
        kind::FORWARD => Reason::OverlayForward,
        // A hold being drained towards another host (see from-hold).
        kind::HOLD if ep.vtep_be != 0 => Reason::HoldForwarded,
        // The host's stack routed IPv6 for a container on this very host into the overlay
        // (the gateway's masqueraded replies: IPv6 has no per-container routes, the prefix
        // goes to this device): to the container's veth (egress: its peer receives it).
        kind::LOCAL if a.v6 => {
            set_eth_addrs(ctx, &ep.mac, &GATEWAY_MAC)?;
            return redirect_to(ep.ifindex, Reason::OverlayToLocal);
        }
        kind::HOLD if a.v6 => return hold(cfg),
        _ => return Err(Reason::DropBadKind),
    };
    tunnel::set(ctx, ep.vni, ep.vtep_be, cfg.tunnel_ttl)?;
    Ok(pass(reason))
}

/// TC ingress of the host side of a container's veth: everything the container sends.
#[classifier]
pub fn from_container(ctx: TcContext) -> i32 {
    let r = try_from_container(&ctx);
    finish(&ctx, r)
}

fn try_from_container(ctx: &TcContext) -> Result<Verdict, Reason> {
    let cfg = config()?;
    let a = match ethertype(ctx)? {
        ETH_P_IP => addrs_v4(ctx, cfg)?,
        ETH_P_IPV6 if cfg.flags & config_flags::IPV6 != 0 => {
            // As for ARP: the container's only neighbour is its gateway, the same MAC on
            // every host (the agent also makes its entry permanent).
            if let Some(answered) = ndp::answer(ctx) {
                return answered;
            }
            if let Some(announced) = announcement6(ctx, cfg) {
                return announced;
            }
            // MLD, router solicitations, duplicate address detection: link-scoped, nothing
            // to route.
            let (src, dst) = (ipv6_src(ctx)?, ipv6_dst(ctx)?);
            if ipv6_is_link_scoped(&src) || dst[0] == 0xff {
                return Err(Reason::DropIpv6LinkLocal);
            }
            addrs_v6(cfg, &src, &dst)
        }
        ETH_P_ARP => {
            if let Some(announced) = announcement4(ctx, cfg) {
                return announced;
            }
            return answer_arp(ctx);
        }
        _ => return Err(Reason::DropNotIpv4),
    };
    // An IPv6 source outside the overlay prefix is nobody's endpoint: spoofed.
    match a.src.and_then(endpoint) {
        Some(me) if me.ifindex == ifindex(ctx) && me.flags & flags::DROP_EGRESS != 0 => {
            return Err(Reason::DropFrozenSource);
        }
        // HOLD: restored here, not yet released; what it sends already goes out. FORWARD
        // without DROP_EGRESS: the source copy of a migrating container before its
        // connections are dumped (it may still answer what reached it before the freeze).
        Some(me)
            if matches!(me.kind, kind::LOCAL | kind::HOLD | kind::FORWARD)
                && me.ifindex == ifindex(ctx) => {}
        _ => return Err(Reason::DropSpoofedSource),
    }
    // The underlay is IPv4.
    if let Some(dst) = a.dst
        && !a.v6
        && is_underlay(cfg, dst)
    {
        return Err(Reason::DropContainerToUnderlay);
    }
    if let Some(ep) = a.dst.and_then(endpoint) {
        if ep.kind == kind::HOST {
            if a.v6 {
                return Err(Reason::DropIpv6ToHost);
            }
            return Ok(pass(Reason::ContainerToHost));
        }
        // IPv4 only: the neighbour is resolved by its IPv4 address, and the kernel does not
        // send an IPv6 packet to an IPv4 next hop (tried: the packets never arrived), so
        // IPv6 keeps the tunnel.
        if ep.kind == kind::REMOTE && !a.v6 && direct(cfg, ep.vtep_be) {
            return to_neighbour(cfg, ep.vtep_be);
        }
        return deliver(
            ctx,
            cfg,
            &ep,
            Reason::ContainerToLocal,
            Reason::ContainerEncap,
        );
    }
    if a.dst_in_overlay {
        return Err(Reason::DropNoEndpoint);
    }
    if cfg.flags & config_flags::GATEWAY != 0 {
        return to_internet(ctx, &a);
    }
    if cfg.egress_vtep_be == 0 {
        return Err(Reason::DropNoEgress);
    }
    // to-overlay encapsulates it to the gateway.
    redirect_to(cfg.vxlan_ifindex, Reason::ContainerEgress)
}

/// A container's ARP. Its only neighbour is its default gateway: every host answers with the
/// same MAC, so the container's neighbour cache stays valid wherever it runs. Not inlined: its
/// buffers get a stack frame of their own, which keeps from-container's under the limit.
#[inline(never)]
fn answer_arp(ctx: &TcContext) -> Result<Verdict, Reason> {
    match arp::parse(ctx)? {
        arp::Arp::Request(req) => {
            arp::reply(ctx, &req, &GATEWAY_MAC)?;
            redirect_to(ifindex(ctx), Reason::ArpReply)
        }
        arp::Arp::Reply => Ok(pass(Reason::ArpToHost)),
    }
}

/// A container's gratuitous ARP (see `announcement`); `None` if the frame is not one. Not
/// inlined: a call of its own next to `answer_arp`'s (the stack limit counts the frames along
/// a chain of calls).
#[inline(never)]
fn announcement4(ctx: &TcContext, cfg: &Config) -> Option<Result<Verdict, Reason>> {
    let (key, mac) = arp::gratuitous(ctx)?;
    Some(announcement(ctx, cfg, Some(key), mac))
}

/// A container's unsolicited NA (see `announcement`); `None` if the frame is not one. Not
/// inlined, like `answer_arp`: its own stack frame.
#[inline(never)]
fn announcement6(ctx: &TcContext, cfg: &Config) -> Option<Result<Verdict, Reason>> {
    let (key, mac) = ndp::unsolicited_advert(ctx, cfg)?;
    Some(announcement(ctx, cfg, key, mac))
}

/// A container announcing an address (gratuitous ARP, unsolicited NA; `key` is the endpoint
/// it names, `mac` the MAC it names). Only the endpoint's own address and MAC, from its own
/// veth, while the entry says it runs here; then copied out of the relay interface, if any,
/// for peers on that segment that cache the address (the announcement itself ends here: the
/// container's only neighbour on its veth is the datapath).
#[inline(always)]
fn announcement(
    ctx: &TcContext,
    cfg: &Config,
    key: Option<u32>,
    mac: [u8; 6],
) -> Result<Verdict, Reason> {
    let src_mac = ctx.load::<[u8; 6]>(6).map_err(|_| Reason::DropMalformed)?;
    let me = match key.and_then(endpoint) {
        Some(me) if me.ifindex == ifindex(ctx) => me,
        _ => return Err(Reason::DropSpoofedSource),
    };
    if me.kind != kind::LOCAL || me.flags & flags::DROP_EGRESS != 0 {
        return Err(Reason::DropAnnounceNotLocal);
    }
    let m = mac48(&me.mac);
    if m != mac48(&mac) || m != mac48(&src_mac) {
        return Err(Reason::DropSpoofedSource);
    }
    if cfg.announce_ifindex == 0 {
        return Err(Reason::DropAnnounceNoRelay);
    }
    // SAFETY: plain helper call on this program's skb; the kernel checks the ifindex.
    let rc = unsafe { bpf_clone_redirect(ctx.skb.skb, cfg.announce_ifindex, 0) };
    if rc != 0 {
        return Err(Reason::DropRedirectFailed);
    }
    Ok(Verdict {
        action: TC_ACT_SHOT,
        reason: Reason::AnnounceRelayed,
    })
}

/// A MAC as one number (compared without a byte loop).
#[inline(always)]
fn mac48(m: &[u8; 6]) -> u64 {
    u64::from_ne_bytes([m[0], m[1], m[2], m[3], m[4], m[5], 0, 0])
}

/// No-tunnel mode: is the host at underlay address `vtep_be` on this host's own subnet?
#[inline(always)]
fn direct(cfg: &Config, vtep_be: u32) -> bool {
    cfg.flags & config_flags::DIRECT != 0
        && cfg.underlay_ifindex != 0
        && vtep_be & cfg.underlay_mask_be == cfg.underlay_net_be
}

/// Sends the packet as it is to the same-subnet host at `vtep_be`: out of the underlay
/// interface to that host's MAC (the kernel resolves the neighbour and writes the Ethernet
/// header).
#[inline(always)]
fn to_neighbour(cfg: &Config, vtep_be: u32) -> Result<Verdict, Reason> {
    let mut nh = bpf_redir_neigh {
        nh_family: AF_INET,
        __bindgen_anon_1: aya_ebpf::bindings::bpf_redir_neigh__bindgen_ty_1 { ipv4_nh: vtep_be },
    };
    // SAFETY: nh is a valid bpf_redir_neigh of the size passed; the kernel checks the ifindex.
    let rc = unsafe {
        bpf_redirect_neigh(
            cfg.underlay_ifindex,
            &mut nh,
            core::mem::size_of::<bpf_redir_neigh>() as i32,
            0,
        )
    };
    redirected(rc, Reason::ContainerDirect)
}

const AF_INET: u32 = 2;

/// TC ingress of the host's underlay interface, attached in no-tunnel mode only: packets a
/// same-subnet host sent without a tunnel go to the endpoint they are for; everything else
/// (the host's own traffic, VXLAN) goes on to the stack.
#[classifier]
pub fn from_underlay(ctx: TcContext) -> i32 {
    let r = try_from_underlay(&ctx);
    finish(&ctx, r)
}

fn try_from_underlay(ctx: &TcContext) -> Result<Verdict, Reason> {
    let cfg = config()?;
    if cfg.flags & config_flags::DIRECT == 0 {
        return Ok(pass(Reason::UnderlayPass));
    }
    let Ok(a) = addrs(ctx, cfg) else {
        return Ok(pass(Reason::UnderlayPass));
    };
    if !a.dst_in_overlay {
        return Ok(pass(Reason::UnderlayPass));
    }
    // The source must be an endpoint living on a same-subnet host (the one that sent it
    // without a tunnel). An L2 neighbour could forge it, as it could forge a VXLAN packet's
    // outer source: the underlay is trusted alike in both modes.
    match a.src.and_then(endpoint) {
        Some(src) if src.kind == kind::REMOTE && direct(cfg, src.vtep_be) => {}
        _ => return Err(Reason::DropUnderlaySource),
    }
    let ep = a.dst.and_then(endpoint).ok_or(Reason::DropNoEndpoint)?;
    match ep.kind {
        kind::HOST if a.v6 => Err(Reason::DropIpv6ToHost),
        kind::HOST => Ok(pass(Reason::OverlayToHost)),
        kind::LOCAL | kind::HOLD => {
            deliver(ctx, cfg, &ep, Reason::UnderlayToLocal, Reason::DropBadKind)
        }
        // Not here (any more): on through the tunnel, as from-overlay does.
        kind::FORWARD | kind::REMOTE => {
            decrement_ttl(ctx, a.v6)?;
            deliver(ctx, cfg, &ep, Reason::DropBadKind, Reason::HoldForwarded)
        }
        _ => Err(Reason::DropBadKind),
    }
}

/// Is `ip_be` a host's underlay address (this host's own, or a known VTEP)? The control plane
/// listens there; neither containers nor the internet may address it.
#[inline(always)]
fn is_underlay(cfg: &Config, ip_be: u32) -> bool {
    (cfg.self_vtep_be != 0 && ip_be == cfg.self_vtep_be) || vtep(ip_be).is_some()
}

/// TC ingress of the gateway's internet-facing interface: ARP and traffic for public
/// addresses are translated to the container; the rest is the gateway's own.
#[classifier]
pub fn from_public(ctx: TcContext) -> i32 {
    let r = try_from_public(&ctx);
    finish(&ctx, r)
}

fn try_from_public(ctx: &TcContext) -> Result<Verdict, Reason> {
    let cfg = config()?;
    match ethertype(ctx)? {
        ETH_P_IP => {}
        ETH_P_ARP => {
            let Ok(arp::Arp::Request(req)) = arp::parse(ctx) else {
                return Ok(pass(Reason::PublicPass));
            };
            if maps::public_entry(&NatKey::presence(req.target_be())).is_none() {
                return Ok(pass(Reason::PublicPass));
            }
            if cfg.flags & config_flags::PUBLIC_STANDBY != 0 {
                return Ok(pass(Reason::PublicStandbyArp));
            }
            arp::reply(ctx, &req, &cfg.public_mac)?;
            return redirect_to(ifindex(ctx), Reason::ArpReply);
        }
        ETH_P_IPV6 if cfg.flags & config_flags::IPV6 != 0 => return from_public_v6(ctx, cfg),
        _ => return Ok(pass(Reason::PublicPass)),
    }
    let dst = ipv4_dst(ctx)?;
    let l4 = packet::l4(ctx)?;
    let Some(container) = nat::dnat(ctx, dst, &l4)? else {
        // Not for a container: the gateway's own. Never the overlay (a first fragment carries
        // the port; without it the rest is never reassembled).
        if l4.as_ref().is_some_and(|l| {
            l.is_udp() && cfg.vxlan_port_be != 0 && l.dport_be == cfg.vxlan_port_be
        }) {
            return Err(Reason::DropVxlanFromPublic);
        }
        if is_underlay(cfg, dst) {
            return Err(Reason::DropUnderlayFromPublic);
        }
        return Ok(pass(Reason::PublicPass));
    };
    let ep = endpoint(container).ok_or(Reason::DropNoEndpoint)?;
    if ep.kind == kind::HOST {
        return Err(Reason::DropBadKind);
    }
    deliver(ctx, cfg, &ep, Reason::PublicDnat, Reason::PublicDnat)
}

/// from-public, IPv6: the overlay's prefix is routed (when `PUBLIC6`), not translated. What is
/// not for it is the gateway's own (its neighbour discovery, masqueraded replies).
#[inline(always)]
fn from_public_v6(ctx: &TcContext, cfg: &Config) -> Result<Verdict, Reason> {
    let Some(container) = cfg.overlay6_key(&ipv6_dst(ctx)?) else {
        return Ok(pass(Reason::PublicPass));
    };
    if cfg.flags & config_flags::PUBLIC6 == 0 {
        return Err(Reason::DropNoPublic6);
    }
    // The internet cannot speak for a container.
    if cfg.overlay6_key(&ipv6_src(ctx)?).is_some() {
        return Err(Reason::DropSpoofedSource);
    }
    let ep = endpoint(container).ok_or(Reason::DropNoEndpoint)?;
    if ep.kind == kind::HOST {
        return Err(Reason::DropIpv6ToHost);
    }
    deliver(ctx, cfg, &ep, Reason::Public6Routed, Reason::Public6Routed)
}

/// TC ingress of the agent's hold device: the held packets the agent writes back, in order.
/// Delivered by the endpoint's entry as it stands: still `HOLD` at release (the agent switches
/// the entry to `LOCAL` only after the queue is written, so nothing overtakes it), or `REMOTE`
/// after an abort (back to the source).
#[classifier]
pub fn from_hold(ctx: TcContext) -> i32 {
    let r = try_from_hold(&ctx);
    finish(&ctx, r)
}

fn try_from_hold(ctx: &TcContext) -> Result<Verdict, Reason> {
    let cfg = config()?;
    let a = addrs(ctx, cfg)?;
    let ep = a.dst.and_then(endpoint).ok_or(Reason::DropNoEndpoint)?;
    match ep.kind {
        // Draining towards another host (an abort: back to the source) while new packets
        // still queue behind: to-overlay encapsulates by the entry's VTEP.
        kind::HOLD if ep.vtep_be != 0 => redirect_to(cfg.vxlan_ifindex, Reason::HoldForwarded),
        // A container being drained: a new connection waits (the agent clears the flag
        // before it writes the held SYNs back to this container).
        kind::LOCAL if draining(ctx, &ep) => hold_as(cfg, Reason::HoldSyn),
        // Straight to the container (otherwise never back into the hold device).
        kind::LOCAL | kind::HOLD => {
            set_eth_addrs(ctx, &ep.mac, &GATEWAY_MAC)?;
            ctx.change_type(PACKET_HOST)
                .map_err(|_| Reason::DropMalformed)?;
            // SAFETY: plain helper call; the kernel validates the ifindex.
            redirected(
                unsafe { bpf_redirect_peer(ep.ifindex, 0) },
                Reason::HoldReleased,
            )
        }
        kind::REMOTE | kind::FORWARD => redirect_to(cfg.vxlan_ifindex, Reason::HoldForwarded),
        kind::HOST if a.v6 => Err(Reason::DropIpv6ToHost),
        kind::HOST => Ok(pass(Reason::OverlayToHost)),
        _ => Err(Reason::DropBadKind),
    }
}
