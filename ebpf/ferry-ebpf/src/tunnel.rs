//! Tunnel metadata of the external (collect_md) VXLAN device.

use core::mem::{size_of, zeroed};

use aya_ebpf::{
    bindings::bpf_tunnel_key,
    helpers::{bpf_skb_get_tunnel_key, bpf_skb_set_tunnel_key},
    programs::TcContext,
};
use ferry_common::Reason;

#[inline(always)]
pub fn get(ctx: &TcContext) -> Result<bpf_tunnel_key, Reason> {
    // SAFETY: bpf_tunnel_key is plain data; all-zero is valid.
    let mut key: bpf_tunnel_key = unsafe { zeroed() };
    // SAFETY: key is a valid, writable buffer of the size passed.
    let rc = unsafe {
        bpf_skb_get_tunnel_key(ctx.skb.skb, &mut key, size_of::<bpf_tunnel_key>() as u32, 0)
    };
    if rc < 0 {
        Err(Reason::DropNoTunnelKey)
    } else {
        Ok(key)
    }
}

/// The outer source address in the datapath's key form (network order in memory).
#[inline(always)]
pub fn remote_be(key: &bpf_tunnel_key) -> u32 {
    // SAFETY: an IPv4 key (no BPF_F_TUNINFO_IPV6) fills remote_ipv4, in host order.
    u32::to_be(unsafe { key.__bindgen_anon_1.remote_ipv4 })
}

#[inline(always)]
pub fn set(ctx: &TcContext, vni: u32, vtep_be: u32, ttl: u32) -> Result<(), Reason> {
    // SAFETY: bpf_tunnel_key is plain data; all-zero is valid.
    let mut key: bpf_tunnel_key = unsafe { zeroed() };
    key.tunnel_id = vni;
    key.__bindgen_anon_1.remote_ipv4 = u32::from_be(vtep_be);
    key.tunnel_ttl = ttl as u8;
    // SAFETY: key is a valid buffer of the size passed.
    let rc = unsafe {
        bpf_skb_set_tunnel_key(ctx.skb.skb, &mut key, size_of::<bpf_tunnel_key>() as u32, 0)
    };
    if rc < 0 {
        Err(Reason::DropTunnelKeyFailed)
    } else {
        Ok(())
    }
}
