//! ferry's datapath. One program per attach point; each entry is a thin wrapper over a `try_`
//! function that returns the verdict and the reason, and every verdict is counted by reason.
#![no_std]
#![no_main]

mod maps;
mod packet;
mod tunnel;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT},
    helpers::bpf_redirect,
    macros::classifier,
    programs::TcContext,
};
use ferry_common::{Reason, kind};

use crate::{
    maps::{config, count, endpoint, vtep},
    packet::{ethertype, ipv4_dst, set_eth_addrs},
};

/// MAC of every host-side container veth (the container's default gateway), same on every host.
const GATEWAY_MAC: [u8; 6] = [0x0e, 0xfe, 0x00, 0x00, 0x00, 0x01];

/// `skb->pkt_type` for frames addressed to this host.
const PACKET_HOST: u32 = 0;

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
const fn redirect(reason: Reason) -> Verdict {
    Verdict {
        action: TC_ACT_REDIRECT,
        reason,
    }
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
    if ethertype(ctx)? != packet::ETH_P_IP {
        return Err(Reason::DropNotIpv4);
    }
    let dst = ipv4_dst(ctx)?;
    let ep = endpoint(dst).ok_or(Reason::DropNoEndpoint)?;
    match ep.kind {
        kind::HOST => {
            // The sender addressed the frame to its own device MAC (NOARP): accept it as ours.
            ctx.change_type(PACKET_HOST)
                .map_err(|_| Reason::DropMalformed)?;
            Ok(pass(Reason::OverlayToHost))
        }
        kind::LOCAL => {
            set_eth_addrs(ctx, &ep.mac, &GATEWAY_MAC)?;
            // SAFETY: plain helper call; the kernel validates the ifindex.
            let rc = unsafe { bpf_redirect(ep.ifindex, 0) };
            if rc as i32 == TC_ACT_REDIRECT {
                Ok(redirect(Reason::OverlayToLocal))
            } else {
                Err(Reason::DropBadKind)
            }
        }
        kind::FORWARD => {
            // Back out through the VXLAN device; to_overlay sets the new tunnel key.
            // SAFETY: plain helper call; the kernel validates the ifindex.
            let rc = unsafe { bpf_redirect(cfg.vxlan_ifindex, 0) };
            if rc as i32 == TC_ACT_REDIRECT {
                Ok(redirect(Reason::OverlayForward))
            } else {
                Err(Reason::DropBadKind)
            }
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
    if ethertype(ctx)? != packet::ETH_P_IP {
        return Err(Reason::DropNotIpv4);
    }
    let dst = ipv4_dst(ctx)?;
    let ep = endpoint(dst).ok_or(Reason::DropNoEndpoint)?;
    let reason = match ep.kind {
        kind::REMOTE => Reason::OverlayEncap,
        kind::FORWARD => Reason::OverlayForward,
        _ => return Err(Reason::DropBadKind),
    };
    tunnel::set(ctx, ep.vni, ep.vtep_be, cfg.tunnel_ttl)?;
    Ok(pass(reason))
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo<'_>) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
