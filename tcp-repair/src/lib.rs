//! TCP repair without CRIU: dump an established TCP socket (IPv4 or IPv6) into a
//! [`TcpState`] and restore it into a new socket, on another host or in another network
//! namespace, with no reset and no byte lost or duplicated. This is the kernel's `TCP_REPAIR`
//! interface, as CRIU's libsoccr uses it; ferry's node agent uses it for the socket hand-off.
//!
//! ```no_run
//! # fn f(sock: std::net::TcpStream) -> ferry_tcp_repair::Result<()> {
//! ferry_tcp_repair::check(&sock)?; // before freezing: can this socket move?
//! let state = ferry_tcp_repair::dump(&sock)?; // repair mode: the socket is silent now
//! drop(sock); // closing in repair mode sends neither FIN nor RST
//! let json = serde_json::to_vec(&state).unwrap(); // ...to the destination...
//! let state: ferry_tcp_repair::TcpState = serde_json::from_slice(&json).unwrap();
//! let fd = ferry_tcp_repair::restore(&state)?; // in the calling thread's netns
//! # Ok(()) }
//! ```
//!
//! The network must hold the connection's packets from before [`dump`] until [`restore`]
//! (ferry's hold): a socket in repair mode still receives and acknowledges segments (verified:
//! bytes acknowledged after the dump would be lost, and [`dump`] reports
//! [`Error::Unstable`] if the queues change while it reads them), and between the close and
//! the restore the host would answer the peer with an RST.
//!
//! # What moves, what is refused
//!
//! | kernel state | moves? | notes |
//! | --- | --- | --- |
//! | ESTABLISHED | yes | |
//! | CLOSE_WAIT | yes | the peer's FIN was received: after restore, reads return the unread bytes, then end of file; we can still send |
//! | FIN_WAIT1 | yes | we shut down writing, our FIN is not acknowledged (sent or still queued behind unsent data); the peer can still send |
//! | FIN_WAIT2 | yes | our FIN was acknowledged; the peer can still send. The restored socket sends the FIN again (a duplicate the peer ACKs): FIN_WAIT1 for one round trip, then FIN_WAIT2 |
//! | LISTEN | no | nothing to move; the kernel refuses TCP_REPAIR on it anyway |
//! | SYN_SENT, SYN_RECV, NEW_SYN_RECV | no | handshake not complete |
//! | CLOSING, LAST_ACK | no | both FINs sent, ours unacknowledged: the connection is going away |
//! | TIME_WAIT, CLOSE | no | no connection left |
//!
//! Refusals come from [`check`], which [`dump`] runs first: it only reads (SO_DOMAIN, SO_TYPE,
//! SO_PROTOCOL, TCP_INFO), so a refused socket is untouched.
//!
//! Not carried: urgent (out-of-band) data; the out-of-order queue (bytes received beyond a
//! hole are dropped: not acknowledged cumulatively, the peer sends them again — if they were
//! SACKed the peer notices the reneging at its retransmission timeout); socket options other
//! than buffer sizes and SO_REUSEADDR (TCP_NODELAY, keepalive, O_NONBLOCK, marks... are the
//! caller's); congestion state (the restored socket starts with an initial window and RTO);
//! microsecond TCP timestamps (`tcp_usec_ts`). SO_SNDBUF and SO_RCVBUF are restored as fixed
//! values (as CRIU does), which turns their autotuning off.
//!
//! # Dump: order of operations
//!
//! 1. [`check`]: SO_DOMAIN/SO_TYPE/SO_PROTOCOL and TCP_INFO's state. Nothing is changed before this.
//! 2. getsockname, getpeername, SO_REUSEADDR, SO_SNDBUF, SO_RCVBUF — before repair mode, which
//!    forces sk_reuse.
//! 3. `TCP_REPAIR = 1`. From here the application can neither read nor write, the kernel sends
//!    no data and closing sends no FIN or RST — but it still accepts and ACKs incoming segments.
//! 4. Counters: TCP_INFO state; `TCP_REPAIR_QUEUE = TCP_RECV_QUEUE`, TCP_QUEUE_SEQ (rcv_nxt),
//!    SIOCINQ; `TCP_REPAIR_QUEUE = TCP_SEND_QUEUE`, TCP_QUEUE_SEQ (write_seq), SIOCOUTQ,
//!    SIOCOUTQNSD.
//! 5. TCP_INFO options and window scales, TCP_MAXSEG (the MSS clamp in repair mode),
//!    TCP_TIMESTAMP, TCP_REPAIR_WINDOW — the window before the bytes, so its `rcv_wup` is never
//!    beyond the `rcv_nxt` we restore.
//! 6. The bytes: `recv(MSG_PEEK)` of the receive queue, then of the send queue (one byte more
//!    than expected is asked, to be sure there is no more). The send queue is split at
//!    SIOCOUTQ − SIOCOUTQNSD into sent-unacknowledged and never-sent bytes; our FIN, which
//!    SIOCOUTQ counts until acknowledged and SIOCOUTQNSD while unsent, is taken out.
//! 7. The counters again: if anything moved, steps 4–7 are repeated (up to 5 times).
//! 8. `TCP_REPAIR_QUEUE = TCP_NO_QUEUE`. The socket stays in repair mode: the caller closes it
//!    (silently) or calls [`abort_dump`]. If the dump fails after step 3, it leaves repair mode
//!    again before returning the error.
//!
//! # Restore: order of operations, and why
//!
//! 1. `socket()`; SO_REUSEADDR; SO_SNDBUFFORCE/SO_RCVBUFFORCE to the dumped sizes (the queues
//!    must fit: repair-mode writes fail rather than wait; the receive buffer also sizes the
//!    window computed at connect); then `TCP_REPAIR = 1`, which sets `SK_FORCE_REUSE` so bind
//!    ignores every conflict (e.g. the application's listener on the same port). SO_REUSEADDR
//!    goes *before* TCP_REPAIR: set after, it would downgrade SK_FORCE_REUSE to SK_CAN_REUSE and
//!    bind would fail next to a listener.
//! 2. IP_FREEBIND/IPV6_FREEBIND only if [`RestoreOptions::freebind`]; `bind(local)`.
//! 3. `TCP_REPAIR_QUEUE` + `TCP_QUEUE_SEQ` for the receive queue (at the first unread byte)
//!    and the send queue (at the first unacknowledged byte). Only possible before connect.
//! 4. `TCP_MAXSEG` = the dumped MSS clamp, then `connect(peer)`: in repair mode no SYN is
//!    sent, the socket is ESTABLISHED at once. connect() also computes the MSS the socket sends
//!    with, from the clamp — without a SYN-ACK the 536-byte default, which TCP_REPAIR_OPTIONS
//!    does not recompute: without this user MSS a restored socket would send 524-byte segments
//!    for the rest of its life.
//! 5. `TCP_REPAIR_OPTIONS` (MSS, window scales, SACK, timestamps; the kernel takes them only
//!    in ESTABLISHED before any byte is queued); `TCP_MAXSEG = 0` (the user MSS has done its
//!    job); then `TCP_TIMESTAMP` (our timestamp clock goes on from the dumped value, so the
//!    peer's PAWS check accepts our segments).
//! 6. The receive queue's bytes (`TCP_REPAIR_QUEUE = TCP_RECV_QUEUE`, send), then the
//!    sent-unacknowledged bytes (`TCP_SEND_QUEUE`, send): queued as already sent, retransmitted
//!    on timeout unless the peer acknowledges them. Both move rcv_nxt/write_seq to the dumped
//!    values.
//! 7. `TCP_REPAIR_WINDOW` (in CLOSE_WAIT with the left edge one back, as rcv_nxt does not count
//!    the FIN yet).
//! 8. CLOSE_WAIT: the peer's FIN+ACK is injected through a raw socket over loopback (no socket
//!    call puts a FIN in a receive queue); the kernel processes it as the first time (CLOSE_WAIT,
//!    end of file after the queued bytes), and may ACK it again (a duplicate, harmless).
//!    Needs CAP_NET_RAW, and the local address local to this netns with `lo` up.
//! 9. `TCP_REPAIR_QUEUE = TCP_NO_QUEUE`, `TCP_REPAIR = 0`: in ESTABLISHED (only there) the
//!    kernel sends a window probe, the peer answers with an ACK, and both sides resume.
//! 10. The never-sent bytes with normal `send()` calls (in repair mode they would be marked as
//!     sent and wait for a retransmission timeout): byte order is exact since they follow the
//!     restored bytes.
//! 11. FIN_WAIT1/FIN_WAIT2: `shutdown(SHUT_WR)`. Our FIN takes the sequence number it had:
//!     never sent, this is its first transmission; already sent or acknowledged, the peer drops
//!     the duplicate and ACKs it at once, which takes a FIN_WAIT2 socket back to FIN_WAIT2
//!     within a round trip. Queued as sent in repair mode instead (libsoccr's way), it would
//!     wait for the kernel's loss probe (~1 s) or RTO: no window probe is sent outside
//!     ESTABLISHED.
//! 12. SO_REUSEADDR as the application had it (leaving repair mode cleared it).
//!
//! A restored socket has no RTT sample, so the kernel gives it the 3 s fallback RTO (loss probe
//! after 1 s): sent bytes that never reached the peer are resent at once only if later bytes
//! get SACKed (fast retransmit), else after ~1–4 s. With ferry's hold nothing is lost, so this
//! only matters when packets were dropped.
//!
//! If any step fails, the new socket is put (back) into repair mode and closed: nothing more
//! reaches the peer (no FIN, no RST), and the source can resume with [`abort_dump`].
//!
//! The raw calls are behind the [`sys::Sys`] trait: [`sys::LibcSys`] is the real one; unit tests
//! (and other crates, with the `fake` feature) use `sys::FakeSys`, which models the kernel's
//! ordering rules and records every call.

mod dump;
mod error;
mod restore;
mod state;
pub mod sys;

use std::os::fd::{AsFd, AsRawFd, OwnedFd};

pub use dump::{abort_dump_with, check_with, dump_with};
pub use error::{Error, Result, Step};
pub use restore::{RestoreOptions, restore_with};
pub use state::{ConnState, KernelState, OurFin, TcpOptions, TcpState, Window, WindowScale};

/// The refusal test alone, without touching the socket: `Ok` with its movable state, or
/// [`Error::NotMovable`] / [`Error::NotTcp`]. Use it before freezing.
pub fn check(fd: impl AsFd) -> Result<ConnState> {
    check_with(&sys::LibcSys, fd.as_fd().as_raw_fd())
}

/// Dumps an established (or supported half-closed) TCP socket. The socket is left in repair
/// mode: it sends no more data, and closing it sends neither FIN nor RST (it still ACKs what
/// arrives: hold the peer's packets). Call
/// [`abort_dump`] to let it carry on instead.
pub fn dump(fd: impl AsFd) -> Result<TcpState> {
    dump_with(&sys::LibcSys, fd.as_fd().as_raw_fd())
}

/// Takes a dumped socket out of repair mode so the connection carries on where it was (the
/// migration was aborted). The kernel sends a window probe, the peer's ACK resumes the flow.
/// SO_REUSEADDR is left cleared.
pub fn abort_dump(fd: impl AsFd) -> Result<()> {
    abort_dump_with(&sys::LibcSys, fd.as_fd().as_raw_fd())
}

/// Restores a dumped connection into a new socket in the calling thread's network namespace,
/// with [`RestoreOptions::default`]. The socket is blocking, close-on-exec, and the connection
/// is live when this returns. The original socket must be closed (or in another namespace):
/// two sockets cannot share the four-tuple.
pub fn restore(state: &TcpState) -> Result<OwnedFd> {
    restore_with(&sys::LibcSys, state, &RestoreOptions::default())
}

/// [`restore`] with options.
pub fn restore_with_options(state: &TcpState, opts: &RestoreOptions) -> Result<OwnedFd> {
    restore_with(&sys::LibcSys, state, opts)
}
