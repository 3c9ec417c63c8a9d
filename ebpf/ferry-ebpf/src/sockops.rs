//! `ferry_peer_window`: the initial TCP windows of the agents' own connections (sock_ops,
//! attached by each agent to its cgroup). A connection whose local or remote port is the
//! agents' API port (the image stream between two agents, the gateway's calls) starts with a
//! congestion window of `INIT_WINDOW` segments instead of the kernel's 10, and advertises a
//! receive window of as many segments from its first segment. Across a WAN a fresh connection
//! otherwise spends several round trips growing both windows before it carries the images of a
//! frozen container at the link's rate. Every other connection is left alone.
#![no_std]
#![no_main]

mod object;

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_RWND_INIT,
    },
    helpers::bpf_setsockopt,
    macros::sock_ops,
    programs::SockOpsContext,
};

/// The agents' API port (host order), set by the loader; 0: the program does nothing.
#[unsafe(no_mangle)]
static PEER_PORT: u32 = 0;
/// Initial congestion and receive window, in segments, set by the loader.
#[unsafe(no_mangle)]
static INIT_WINDOW: u32 = 0;

/// `SOL_TCP`.
const SOL_TCP: i32 = 6;
/// `TCP_BPF_IW` (include/uapi/linux/bpf.h): the initial congestion window; only before the
/// connection sent data, so at the established callbacks.
const TCP_BPF_IW: i32 = 1001;

#[sock_ops]
pub fn ferry_peer_window(ctx: SockOpsContext) -> u32 {
    // SAFETY: both are plain u32 globals the loader may rewrite before loading; read them
    // volatile so the compiler keeps the loads.
    let (port, window) = unsafe {
        (
            core::ptr::read_volatile(&PEER_PORT),
            core::ptr::read_volatile(&INIT_WINDOW),
        )
    };
    if port == 0 || window == 0 {
        return 1;
    }
    // `remote_port` is in network order in the upper half of the word, `local_port` in host
    // order (include/uapi/linux/bpf.h, struct bpf_sock_ops).
    let remote = u32::from_be(ctx.remote_port());
    if remote != port && ctx.local_port() != port {
        return 1;
    }
    match ctx.op() {
        BPF_SOCK_OPS_RWND_INIT => ctx.set_reply(window),
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB | BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            let mut iw = window as i32;
            // SAFETY: `ctx.ops` is the program's own context; the value is a live local of
            // the size given. A refusal (data already sent) leaves the kernel's window.
            let _ = unsafe {
                bpf_setsockopt(
                    ctx.ops.cast(),
                    SOL_TCP,
                    TCP_BPF_IW,
                    (&raw mut iw).cast(),
                    core::mem::size_of::<i32>() as i32,
                )
            };
        }
        _ => {}
    }
    1
}
