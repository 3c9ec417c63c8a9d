//! `restore`: rebuilds a dumped connection in a new socket, in the calling thread's network
//! namespace. The order of the calls is the one documented in the crate docs.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use crate::error::{Context, Error, Result, Step};
use crate::state::{ConnState, KernelState, OurFin, TcpState};
use crate::sys::{
    Family, FinSegment, IntOpt, RepairOpt, RepairWindow, Sys, TCP_NO_QUEUE, TCP_RECV_QUEUE,
    TCP_REPAIR_OFF, TCP_REPAIR_ON, TCP_SEND_QUEUE, TCPOPT_MSS, TCPOPT_SACK_PERM, TCPOPT_TIMESTAMP,
    TCPOPT_WINDOW,
};

/// Options of [`restore_with_options`](crate::restore_with_options).
#[derive(Debug, Clone)]
pub struct RestoreOptions {
    /// Bind even if the local address is not configured in this network namespace yet
    /// (IP_FREEBIND / IPV6_FREEBIND). Off by default: in ferry the destination namespace has
    /// the container's address before restore, and a bind error then catches a restore in the
    /// wrong namespace. A CLOSE_WAIT socket needs the address to be local anyway (its FIN is
    /// injected over loopback).
    pub freebind: bool,
    /// How long to wait for the kernel: for the injected FIN to be processed, and for send
    /// buffer space while the never-sent tail is queued.
    pub timeout: Duration,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        RestoreOptions {
            freebind: false,
            timeout: Duration::from_secs(5),
        }
    }
}

/// Restores `st` with the raw calls of `sys`. On error the new socket is closed in repair
/// mode, so the peer sees nothing.
pub fn restore_with<S: Sys + ?Sized>(
    sys: &S,
    st: &TcpState,
    opts: &RestoreOptions,
) -> Result<OwnedFd> {
    st.validate()?;
    let fd = sys
        .socket(Family::of(&st.local))
        .ctx(Step::RestoreSocket, "socket(SOCK_STREAM, IPPROTO_TCP)")?;
    match restore_into(sys, fd.as_raw_fd(), st, opts) {
        Ok(()) => Ok(fd),
        Err(e) => {
            // If we got as far as leaving repair mode, a plain close would send a FIN or an RST.
            let _ = sys.set_int(fd.as_raw_fd(), IntOpt::Repair, TCP_REPAIR_ON);
            drop(fd);
            Err(e)
        }
    }
}

fn set<S: Sys + ?Sized>(
    sys: &S,
    fd: RawFd,
    step: Step,
    opt: IntOpt,
    val: i32,
    shown: &str,
) -> Result<()> {
    sys.set_int(fd, opt, val)
        .with_ctx(step, || format!("setsockopt({}={shown})", opt.name()))
}

fn select_queue<S: Sys + ?Sized>(sys: &S, fd: RawFd, step: Step, queue: i32) -> Result<()> {
    let name = match queue {
        TCP_RECV_QUEUE => "TCP_RECV_QUEUE",
        TCP_SEND_QUEUE => "TCP_SEND_QUEUE",
        _ => "TCP_NO_QUEUE",
    };
    set(sys, fd, step, IntOpt::RepairQueue, queue, name)
}

fn restore_into<S: Sys + ?Sized>(
    sys: &S,
    fd: RawFd,
    st: &TcpState,
    opts: &RestoreOptions,
) -> Result<()> {
    // 1. Socket options that must precede repair mode and connect().
    let step = Step::RestoreSocket;
    // SO_REUSEADDR before TCP_REPAIR: setting it afterwards would turn TCP_REPAIR's
    // SK_FORCE_REUSE (bind ignores every conflict, e.g. the listener on the same port) back into
    // plain SK_CAN_REUSE.
    set(sys, fd, step, IntOpt::ReuseAddr, 1, "1")?;
    // Buffer sizes of the original: the queues must fit (repair-mode writes fail rather than
    // wait), and the receive buffer sizes the window computed at connect().
    for (opt, val) in [
        (IntOpt::SndBufForce, st.sndbuf),
        (IntOpt::RcvBufForce, st.rcvbuf),
    ] {
        if val > 0 {
            // getsockopt reports twice what setsockopt is given.
            let half = (val / 2).min(i32::MAX as u32) as i32;
            set(sys, fd, step, opt, half, &half.to_string())?;
        }
    }
    set(sys, fd, step, IntOpt::Repair, TCP_REPAIR_ON, "1")?;

    // 2. The old local address.
    let step = Step::RestoreBind;
    if opts.freebind {
        let opt = match Family::of(&st.local) {
            Family::V4 => IntOpt::IpFreebind,
            Family::V6 => IntOpt::Ipv6Freebind,
        };
        set(sys, fd, step, opt, 1, "1")?;
    }
    sys.bind(fd, &st.local)
        .with_ctx(step, || format!("bind({})", st.local))?;

    // 3. Sequence numbers, while the socket is still CLOSE (the kernel refuses them after
    //    connect). Each queue starts where its first restored byte goes: the refills below
    //    advance rcv_nxt and write_seq to the dumped values.
    let step = Step::RestoreSeqs;
    for (queue, seq) in [
        (TCP_RECV_QUEUE, st.copied_seq()),
        (TCP_SEND_QUEUE, st.snd_una()),
    ] {
        select_queue(sys, fd, step, queue)?;
        set(
            sys,
            fd,
            step,
            IntOpt::QueueSeq,
            seq as i32,
            &seq.to_string(),
        )?;
    }

    // 4. connect() in repair mode sends no SYN: the socket is ESTABLISHED at once. It also
    //    computes the MSS the socket sends with, from the MSS clamp, which without a SYN-ACK is
    //    the 536-byte default; TCP_REPAIR_OPTIONS (step 5) changes the clamp but not the MSS in
    //    use. So the clamp goes in first as a user MSS (TCP_MAXSEG, at most 32767), cleared
    //    again after step 5.
    let user_mss = user_mss(st.options.mss);
    if let Some(mss) = user_mss {
        set(
            sys,
            fd,
            Step::RestoreConnect,
            IntOpt::MaxSeg,
            mss,
            &mss.to_string(),
        )?;
    }
    sys.connect(fd, &st.peer)
        .with_ctx(Step::RestoreConnect, || format!("connect({})", st.peer))?;

    // 5. Negotiated options (only accepted while ESTABLISHED and before any byte is queued),
    //    then our timestamp clock.
    let step = Step::RestoreOptions;
    let o = &st.options;
    let mut ropts = vec![RepairOpt {
        code: TCPOPT_MSS,
        val: o.mss,
    }];
    if let Some(ws) = o.wscale {
        ropts.push(RepairOpt {
            code: TCPOPT_WINDOW,
            val: u32::from(ws.snd) | u32::from(ws.rcv) << 16,
        });
    }
    if o.sack {
        ropts.push(RepairOpt {
            code: TCPOPT_SACK_PERM,
            val: 0,
        });
    }
    if o.timestamps {
        ropts.push(RepairOpt {
            code: TCPOPT_TIMESTAMP,
            val: 0,
        });
    }
    sys.set_repair_options(fd, &ropts)
        .with_ctx(step, || format!("setsockopt(TCP_REPAIR_OPTIONS={ropts:?})"))?;
    if user_mss.is_some() {
        set(sys, fd, step, IntOpt::MaxSeg, 0, "0")?;
    }
    if let Some(ts) = st.timestamp {
        set(sys, fd, step, IntOpt::Timestamp, ts as i32, &ts.to_string())?;
    }

    // 6. Queues: unread bytes into the receive queue, sent-unacknowledged bytes into the send
    //    queue (as already sent: retransmitted on timeout, freed by the peer's ACKs).
    let step = Step::RestoreRecvQueue;
    select_queue(sys, fd, step, TCP_RECV_QUEUE)?;
    write_repair_queue(sys, fd, step, "receive queue", &st.recv_queue)?;
    let step = Step::RestoreSendQueue;
    select_queue(sys, fd, step, TCP_SEND_QUEUE)?;
    write_repair_queue(sys, fd, step, "send queue (unacked)", &st.unacked)?;

    // 7. Window state. In CLOSE_WAIT the FIN is not in rcv_nxt yet (step 8), so move the
    //    window's left edge back by one, keeping its right edge (the kernel refuses
    //    rcv_wup > rcv_nxt).
    let mut w = RepairWindow::from(st.window);
    if st.peer_fin {
        w.rcv_wup = w.rcv_wup.wrapping_sub(1);
        w.rcv_wnd = w.rcv_wnd.wrapping_add(1);
    }
    sys.set_repair_window(fd, &w)
        .with_ctx(Step::RestoreWindow, || {
            format!("setsockopt(TCP_REPAIR_WINDOW={w:?})")
        })?;

    // 8. The peer's FIN (CLOSE_WAIT): no socket call puts a FIN in the receive queue, so a
    //    FIN+ACK "from the peer" is injected over loopback and the kernel processes it as it
    //    did the first time.
    if st.peer_fin {
        restore_peer_fin(sys, fd, st, opts)?;
    }

    // 9. Leave repair mode: in ESTABLISHED the kernel sends a window probe (only there: hence
    //    our FIN comes after), the peer answers with an ACK and both sides resume,
    //    retransmitting what the other has not acknowledged.
    let step = Step::RestoreRepairOff;
    select_queue(sys, fd, step, TCP_NO_QUEUE)?;
    set(sys, fd, step, IntOpt::Repair, TCP_REPAIR_OFF, "0")?;

    // 10. The never-sent tail, as normal data (written in repair mode it would count as sent
    //     and wait for a retransmission timeout).
    send_all(sys, fd, &st.unsent, opts.timeout)?;

    // 11. Our FIN (FIN_WAIT1/FIN_WAIT2), with a plain shutdown(): it takes the sequence number
    //     it had. Not sent before: this is its first transmission. Sent: the peer drops it as
    //     a duplicate if it had it and ACKs at once. Acknowledged (FIN_WAIT2): same, and that
    //     ACK moves the socket to FIN_WAIT2 within a round trip. (Queued as sent in repair mode
    //     instead, it would wait for a loss probe, about 1 s, or the 3 s initial RTO of a socket
    //     without an RTT sample, because no window probe is sent outside ESTABLISHED.)
    if st.our_fin != OurFin::None {
        sys.shutdown_write(fd)
            .ctx(Step::RestoreOurFin, "shutdown(SHUT_WR)")?;
    }

    // 12. Leaving repair mode reset SO_REUSEADDR; give back the application's value.
    if st.reuse_addr {
        set(sys, fd, Step::RestoreRepairOff, IntOpt::ReuseAddr, 1, "1")?;
    }
    Ok(())
}

/// The TCP_MAXSEG value that makes connect() use `mss`: the kernel takes 88..=32767 (a
/// loopback clamp of 65483 is cut to 32767: still far better than 536).
fn user_mss(mss: u32) -> Option<i32> {
    const TCP_MIN_MSS: u32 = 88;
    const MAX_TCP_WINDOW: u32 = 32767;
    (mss >= TCP_MIN_MSS).then(|| mss.min(MAX_TCP_WINDOW) as i32)
}

/// Writes `data` into the selected repair queue. The kernel may take less than asked (the
/// receive queue takes one skb per call) or fail with ENOMEM for one large allocation: then
/// smaller pieces are tried.
fn write_repair_queue<S: Sys + ?Sized>(
    sys: &S,
    fd: RawFd,
    step: Step,
    what: &'static str,
    data: &[u8],
) -> Result<()> {
    let mut off = 0;
    let mut chunk = data.len();
    while off < data.len() {
        let end = (off + chunk).min(data.len());
        match sys.send(fd, &data[off..end]) {
            Ok(0) => {
                return Err(Error::ShortQueue {
                    step,
                    what,
                    expected: data.len(),
                    got: off,
                });
            }
            Ok(n) => off += n,
            Err(e) if e.raw_os_error() == Some(libc::ENOMEM) && chunk > 1024 => chunk /= 2,
            Err(e) => {
                return Err(e).with_ctx(step, || {
                    format!("send({} bytes at offset {off} of the {what})", end - off)
                });
            }
        }
    }
    Ok(())
}

fn restore_peer_fin<S: Sys + ?Sized>(
    sys: &S,
    fd: RawFd,
    st: &TcpState,
    opts: &RestoreOptions,
) -> Result<()> {
    let step = Step::RestorePeerFin;
    let snd_wscale = st.options.wscale.map_or(0, |w| w.snd);
    let seg = FinSegment {
        from: st.peer,
        to: st.local,
        seq: st.recv_seq.wrapping_sub(1),
        ack: st.snd_una(),
        window: (st.window.snd_wnd >> snd_wscale).min(u32::from(u16::MAX)) as u16,
    };
    sys.inject_fin(&seg).with_ctx(step, || {
        format!("raw send of FIN {} -> {} seq {}", seg.from, seg.to, seg.seq)
    })?;
    // Softirq processing is normally done before sendto() returns; wait a little in case not.
    let deadline = Instant::now() + opts.timeout;
    loop {
        let state = sys.tcp_info(fd).ctx(step, "getsockopt(TCP_INFO)")?.state;
        if KernelState(state) == ConnState::CloseWait.kernel() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                step,
                what: format!(
                    "the injected FIN was not processed (state {}): is {} a local address of \
                     this network namespace, with lo up?",
                    KernelState(state),
                    st.local.ip()
                ),
            });
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Sends the never-sent tail with normal send() calls, waiting for buffer space if needed.
fn send_all<S: Sys + ?Sized>(sys: &S, fd: RawFd, data: &[u8], timeout: Duration) -> Result<()> {
    let step = Step::RestoreUnsent;
    let deadline = Instant::now() + timeout;
    let mut off = 0;
    while off < data.len() {
        match sys.send(fd, &data[off..]) {
            Ok(n) => off += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let left = deadline.saturating_duration_since(Instant::now());
                let writable = sys.wait_writable(fd, left).ctx(step, "poll(POLLOUT)")?;
                if !writable {
                    return Err(Error::Timeout {
                        step,
                        what: format!("send buffer space for {} unsent bytes", data.len() - off),
                    });
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(e).with_ctx(step, || {
                    format!(
                        "send({} bytes at offset {off} of the unsent tail)",
                        data.len() - off
                    )
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::sample;
    use crate::sys::{Call, FakeSys};

    /// The exact sequence of calls for an ESTABLISHED connection with data everywhere.
    #[test]
    fn established_order_of_operations() {
        let st = sample();
        let sys = FakeSys::new(Default::default());
        restore_with(&sys, &st, &RestoreOptions::default()).unwrap();
        use Call::*;
        use IntOpt::*;
        let w = RepairWindow::from(st.window);
        let expected = vec![
            Socket(Family::V4),
            SetInt(ReuseAddr, 1),
            SetInt(SndBufForce, (st.sndbuf / 2) as i32),
            SetInt(RcvBufForce, (st.rcvbuf / 2) as i32),
            SetInt(Repair, TCP_REPAIR_ON),
            Bind(st.local),
            SetInt(RepairQueue, TCP_RECV_QUEUE),
            SetInt(QueueSeq, st.copied_seq() as i32),
            SetInt(RepairQueue, TCP_SEND_QUEUE),
            SetInt(QueueSeq, st.snd_una() as i32),
            SetInt(MaxSeg, 1448),
            Connect(st.peer),
            SetRepairOptions(vec![
                RepairOpt {
                    code: TCPOPT_MSS,
                    val: 1448,
                },
                RepairOpt {
                    code: TCPOPT_WINDOW,
                    val: 7 | 7 << 16,
                },
                RepairOpt {
                    code: TCPOPT_SACK_PERM,
                    val: 0,
                },
                RepairOpt {
                    code: TCPOPT_TIMESTAMP,
                    val: 0,
                },
            ]),
            SetInt(MaxSeg, 0),
            SetInt(Timestamp, 123_456),
            SetInt(RepairQueue, TCP_RECV_QUEUE),
            Send(st.recv_queue.clone()),
            SetInt(RepairQueue, TCP_SEND_QUEUE),
            Send(st.unacked.clone()),
            SetRepairWindow(w),
            SetInt(RepairQueue, TCP_NO_QUEUE),
            SetInt(Repair, TCP_REPAIR_OFF),
            Send(st.unsent.clone()),
        ];
        assert_eq!(sys.calls(), expected);

        // The model ends where the dump started.
        let s = sys.socket_state();
        assert_eq!(s.write_seq, st.send_seq);
        assert_eq!(s.rcv_nxt, st.recv_seq);
        assert_eq!(s.unacked, st.unacked);
        assert_eq!(s.unsent, st.unsent);
        assert_eq!(s.recv_queue, st.recv_queue);
        assert_eq!(s.window, w);
        assert!(!s.repair);
    }

    /// A dump of the fake's restored socket gives back the same state.
    #[test]
    fn dump_of_restored_fake_round_trips() {
        for (state, our_fin, peer_fin) in [
            (ConnState::Established, OurFin::None, false),
            (ConnState::CloseWait, OurFin::None, true),
            (ConnState::FinWait1, OurFin::Unsent, false),
        ] {
            let mut st = sample();
            st.state = state;
            st.our_fin = our_fin;
            st.peer_fin = peer_fin;
            st.reuse_addr = true;
            st.window.rcv_wup = st.recv_seq;
            let sys = FakeSys::new(Default::default());
            restore_with(&sys, &st, &RestoreOptions::default()).unwrap();
            let mut again = crate::dump_with(&sys, 3).unwrap();
            // The CLOSE_WAIT window edge moved back by one before the FIN; the fake does not
            // move rcv_wup forward again as the kernel's ACK does.
            again.window = st.window;
            assert_eq!(again, st, "{state:?}");
        }
    }

    #[test]
    fn close_wait_injects_the_fin_after_the_window_with_the_edge_moved_back() {
        let mut st = sample();
        st.state = ConnState::CloseWait;
        st.peer_fin = true;
        st.window.rcv_wup = st.recv_seq; // the ACK of the FIN moved it to rcv_nxt
        let sys = FakeSys::new(Default::default());
        restore_with(&sys, &st, &RestoreOptions::default()).unwrap();
        let calls = sys.calls();
        let win = calls
            .iter()
            .position(|c| matches!(c, Call::SetRepairWindow(_)))
            .unwrap();
        let Call::SetRepairWindow(w) = &calls[win] else {
            unreachable!()
        };
        assert_eq!(w.rcv_wup, st.recv_seq - 1);
        assert_eq!(w.rcv_wnd, st.window.rcv_wnd + 1);
        let fin = calls
            .iter()
            .position(|c| matches!(c, Call::InjectFin(_)))
            .unwrap();
        let off = calls
            .iter()
            .position(|c| *c == Call::SetInt(IntOpt::Repair, TCP_REPAIR_OFF))
            .unwrap();
        assert!(win < fin && fin < off, "{calls:?}");
        let Call::InjectFin(seg) = &calls[fin] else {
            unreachable!()
        };
        assert_eq!((seg.from, seg.to), (st.peer, st.local));
        assert_eq!(seg.seq, st.recv_seq - 1);
        assert_eq!(seg.ack, st.snd_una());
        assert_eq!(seg.window, (st.window.snd_wnd >> 7) as u16);
        assert_eq!(sys.socket_state().state, 8);
    }

    #[test]
    fn our_fin_goes_out_after_repair_mode_and_the_unsent_tail() {
        for (our_fin, state) in [
            (OurFin::Unsent, ConnState::FinWait1),
            (OurFin::Sent, ConnState::FinWait1),
            (OurFin::Acked, ConnState::FinWait2),
        ] {
            let mut st = sample();
            st.state = state;
            st.our_fin = our_fin;
            if our_fin != OurFin::Unsent {
                st.send_seq -= st.unsent.len() as u32;
                st.unsent.clear();
            }
            if our_fin == OurFin::Acked {
                st.send_seq -= st.unacked.len() as u32;
                st.unacked.clear();
            }
            st.send_seq += 1;
            let sys = FakeSys::new(Default::default());
            restore_with(&sys, &st, &RestoreOptions::default()).unwrap();
            let calls = sys.calls();
            let off = calls
                .iter()
                .position(|c| *c == Call::SetInt(IntOpt::Repair, TCP_REPAIR_OFF))
                .unwrap();
            let mut tail = vec![];
            if !st.unsent.is_empty() {
                tail.push(Call::Send(st.unsent.clone()));
            }
            tail.push(Call::ShutdownWrite);
            assert_eq!(calls[off + 1..], tail, "{our_fin:?}");
            assert_eq!(sys.socket_state().write_seq, st.send_seq, "{our_fin:?}");
        }
    }

    #[test]
    fn failure_closes_in_repair_mode_with_context() {
        let st = sample();
        let sys = FakeSys::new(Default::default());
        sys.fail_on(Call::Send(st.unsent.clone()), libc::EPIPE);
        let err = restore_with(&sys, &st, &RestoreOptions::default()).unwrap_err();
        assert_eq!(err.errno(), Some(libc::EPIPE));
        assert!(
            err.to_string().starts_with("restore/unsent: send("),
            "{err}"
        );
        assert_eq!(
            sys.calls().last(),
            Some(&Call::SetInt(IntOpt::Repair, TCP_REPAIR_ON)),
            "closed in repair mode"
        );

        let sys = FakeSys::new(Default::default());
        sys.fail_on(Call::Bind(st.local), libc::EADDRNOTAVAIL);
        let err = restore_with(&sys, &st, &RestoreOptions::default()).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("restore/bind: bind(10.99.0.2:5000)"),
            "{err}"
        );
    }

    #[test]
    fn invalid_state_is_refused_before_any_call() {
        let mut st = sample();
        st.version = 99;
        let sys = FakeSys::new(Default::default());
        assert!(matches!(
            restore_with(&sys, &st, &RestoreOptions::default()),
            Err(Error::UnsupportedVersion { found: 99, .. })
        ));
        assert!(sys.calls().is_empty());
    }

    #[test]
    fn freebind_and_ipv6() {
        let mut st = sample();
        st.local = "[fd99::2]:5000".parse().unwrap();
        st.peer = "[fd99::1]:40000".parse().unwrap();
        let sys = FakeSys::new(Default::default());
        let opts = RestoreOptions {
            freebind: true,
            ..Default::default()
        };
        restore_with(&sys, &st, &opts).unwrap();
        let calls = sys.calls();
        assert_eq!(calls[0], Call::Socket(Family::V6));
        let fb = calls
            .iter()
            .position(|c| *c == Call::SetInt(IntOpt::Ipv6Freebind, 1))
            .unwrap();
        assert_eq!(calls[fb + 1], Call::Bind(st.local));
    }
}
