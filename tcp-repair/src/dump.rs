//! `check`, `dump`, `abort_dump`.

use std::os::fd::RawFd;

use crate::error::{Context, Error, Result, Step};
use crate::state::{ConnState, KernelState, OurFin, TcpOptions, TcpState, WindowScale};
use crate::sys::{
    IntOpt, QueueLen, Sys, TCP_NO_QUEUE, TCP_RECV_QUEUE, TCP_REPAIR_OFF, TCP_REPAIR_ON,
    TCP_SEND_QUEUE, TCPI_OPT_SACK, TCPI_OPT_TIMESTAMPS, TCPI_OPT_WSCALE,
};

/// How many times dump re-reads the queues when they change under it.
const ATTEMPTS: u32 = 5;

/// The refusal test alone: is `fd` a TCP socket in a state that can be moved? Reads only
/// (SO_DOMAIN, SO_TYPE, SO_PROTOCOL, TCP_INFO); the socket is not touched.
pub fn check_with<S: Sys + ?Sized>(sys: &S, fd: RawFd) -> Result<ConnState> {
    let step = Step::Check;
    let get = |opt: IntOpt| {
        sys.get_int(fd, opt)
            .with_ctx(step, || format!("getsockopt({})", opt.name()))
    };
    let (domain, ty, protocol) = (
        get(IntOpt::Domain)?,
        get(IntOpt::Type)?,
        get(IntOpt::Protocol)?,
    );
    if !matches!(domain, libc::AF_INET | libc::AF_INET6)
        || ty != libc::SOCK_STREAM
        || protocol != libc::IPPROTO_TCP
    {
        return Err(Error::NotTcp {
            step,
            domain,
            ty,
            protocol,
        });
    }
    let info = sys.tcp_info(fd).ctx(step, "getsockopt(TCP_INFO)")?;
    movable(step, info.state)
}

fn movable(step: Step, state: u8) -> Result<ConnState> {
    let state = KernelState(state);
    ConnState::from_kernel(state).map_err(|reason| Error::NotMovable {
        step,
        state,
        reason,
    })
}

/// Dumps `fd` and leaves it in repair mode: from here on the kernel sends no data for it (it
/// still ACKs incoming segments), and closing it sends neither FIN nor RST. On error the socket is taken out of repair mode again
/// (best effort) and works as before.
pub fn dump_with<S: Sys + ?Sized>(sys: &S, fd: RawFd) -> Result<TcpState> {
    check_with(sys, fd)?;

    let step = Step::DumpSocket;
    let local = sys.local_addr(fd).ctx(step, "getsockname")?;
    let peer = sys.peer_addr(fd).ctx(step, "getpeername")?;
    // Read before repair mode: TCP_REPAIR=1 forces sk_reuse, hiding the application's value.
    let reuse_addr = sys
        .get_int(fd, IntOpt::ReuseAddr)
        .ctx(step, "getsockopt(SO_REUSEADDR)")?
        != 0;
    let sndbuf = sys
        .get_int(fd, IntOpt::SndBuf)
        .ctx(step, "getsockopt(SO_SNDBUF)")? as u32;
    let rcvbuf = sys
        .get_int(fd, IntOpt::RcvBuf)
        .ctx(step, "getsockopt(SO_RCVBUF)")? as u32;

    sys.set_int(fd, IntOpt::Repair, TCP_REPAIR_ON)
        .ctx(Step::DumpRepairOn, "setsockopt(TCP_REPAIR=1)")?;

    let base = TcpState {
        version: TcpState::VERSION,
        state: ConnState::Established,
        local,
        peer,
        send_seq: 0,
        recv_seq: 0,
        unacked: vec![],
        unsent: vec![],
        recv_queue: vec![],
        our_fin: OurFin::None,
        peer_fin: false,
        options: TcpOptions {
            mss: 0,
            sack: false,
            timestamps: false,
            wscale: None,
        },
        timestamp: None,
        window: Default::default(),
        sndbuf,
        rcvbuf,
        reuse_addr,
    };
    match dump_repaired(sys, fd, base) {
        Ok(st) => Ok(st),
        Err(e) => {
            // Leave the socket as we found it. The first error is the one worth reporting.
            let _ = sys.set_int(fd, IntOpt::RepairQueue, TCP_NO_QUEUE);
            let _ = sys.set_int(fd, IntOpt::Repair, TCP_REPAIR_OFF);
            Err(e)
        }
    }
}

/// Queue counters: if they are the same before and after the bytes are read, the bytes match
/// the sequence numbers.
#[derive(Debug, PartialEq, Eq)]
struct Counters {
    state: u8,
    recv_seq: u32,
    inq: u32,
    send_seq: u32,
    outq: u32,
    not_sent: u32,
}

fn select_queue<S: Sys + ?Sized>(sys: &S, fd: RawFd, step: Step, queue: i32) -> Result<()> {
    let name = match queue {
        TCP_RECV_QUEUE => "TCP_RECV_QUEUE",
        TCP_SEND_QUEUE => "TCP_SEND_QUEUE",
        _ => "TCP_NO_QUEUE",
    };
    sys.set_int(fd, IntOpt::RepairQueue, queue)
        .with_ctx(step, || format!("setsockopt(TCP_REPAIR_QUEUE={name})"))
}

fn counters<S: Sys + ?Sized>(sys: &S, fd: RawFd) -> Result<Counters> {
    let state = sys
        .tcp_info(fd)
        .ctx(Step::DumpOptions, "getsockopt(TCP_INFO)")?
        .state;
    let len = |step: Step, q: QueueLen| {
        sys.queue_len(fd, q)
            .with_ctx(step, || format!("ioctl({})", q.name()))
    };

    let step = Step::DumpRecvQueue;
    select_queue(sys, fd, step, TCP_RECV_QUEUE)?;
    let recv_seq = sys
        .get_int(fd, IntOpt::QueueSeq)
        .ctx(step, "getsockopt(TCP_QUEUE_SEQ)")? as u32;
    let inq = len(step, QueueLen::Inq)?;

    let step = Step::DumpSendQueue;
    select_queue(sys, fd, step, TCP_SEND_QUEUE)?;
    let send_seq = sys
        .get_int(fd, IntOpt::QueueSeq)
        .ctx(step, "getsockopt(TCP_QUEUE_SEQ)")? as u32;
    let outq = len(step, QueueLen::Outq)?;
    let not_sent = len(step, QueueLen::OutqNotSent)?;
    Ok(Counters {
        state,
        recv_seq,
        inq,
        send_seq,
        outq,
        not_sent,
    })
}

/// Peeks exactly `len` bytes of the selected queue (asks for one more to be sure there are
/// not more).
fn peek_exact<S: Sys + ?Sized>(
    sys: &S,
    fd: RawFd,
    step: Step,
    what: &'static str,
    len: usize,
) -> Result<Vec<u8>> {
    if len == 0 {
        return Ok(vec![]);
    }
    let mut buf = vec![0u8; len + 1];
    let got = sys
        .peek(fd, &mut buf)
        .with_ctx(step, || format!("recv(MSG_PEEK, {} bytes)", len + 1))?;
    if got != len {
        return Err(Error::ShortQueue {
            step,
            what,
            expected: len,
            got,
        });
    }
    buf.truncate(len);
    Ok(buf)
}

fn dump_repaired<S: Sys + ?Sized>(sys: &S, fd: RawFd, mut st: TcpState) -> Result<TcpState> {
    let mut last_queue = "receive";
    for _ in 0..ATTEMPTS {
        let before = counters(sys, fd)?;
        let conn = movable(Step::DumpOptions, before.state)?;

        let step = Step::DumpOptions;
        let info = sys.tcp_info(fd).ctx(step, "getsockopt(TCP_INFO)")?;
        // In repair mode TCP_MAXSEG reads the MSS clamp (what TCP_REPAIR_OPTIONS sets).
        let mss = sys
            .get_int(fd, IntOpt::MaxSeg)
            .ctx(step, "getsockopt(TCP_MAXSEG)")? as u32;
        let timestamps = info.options & TCPI_OPT_TIMESTAMPS != 0;
        st.options = TcpOptions {
            mss,
            sack: info.options & TCPI_OPT_SACK != 0,
            timestamps,
            wscale: (info.options & TCPI_OPT_WSCALE != 0).then_some(WindowScale {
                snd: info.snd_wscale,
                rcv: info.rcv_wscale,
            }),
        };
        st.timestamp = if timestamps {
            Some(
                sys.get_int(fd, IntOpt::Timestamp)
                    .ctx(step, "getsockopt(TCP_TIMESTAMP)")? as u32,
            )
        } else {
            None
        };
        st.window = sys
            .repair_window(fd)
            .ctx(step, "getsockopt(TCP_REPAIR_WINDOW)")?
            .into();

        // Our FIN takes a sequence number: SIOCOUTQ counts it until it is acknowledged,
        // SIOCOUTQNSD while it is not sent (it is always behind the last data byte).
        let our_fin = match conn {
            ConnState::FinWait1 if before.not_sent == 0 => OurFin::Sent,
            ConnState::FinWait1 => OurFin::Unsent,
            ConnState::FinWait2 => OurFin::Acked,
            ConnState::Established | ConnState::CloseWait => OurFin::None,
        };
        let fin_in_outq = u32::from(matches!(our_fin, OurFin::Unsent | OurFin::Sent));
        let fin_in_not_sent = u32::from(our_fin == OurFin::Unsent);
        let (Some(data), Some(unsent)) = (
            before.outq.checked_sub(fin_in_outq),
            before.not_sent.checked_sub(fin_in_not_sent),
        ) else {
            return Err(Error::Invalid(format!(
                "kernel reported SIOCOUTQ={} SIOCOUTQNSD={} in state {}",
                before.outq,
                before.not_sent,
                KernelState(before.state)
            )));
        };
        let Some(unacked) = data.checked_sub(unsent) else {
            return Err(Error::Invalid(format!(
                "SIOCOUTQNSD={} above SIOCOUTQ={}",
                before.not_sent, before.outq
            )));
        };

        let step = Step::DumpRecvQueue;
        select_queue(sys, fd, step, TCP_RECV_QUEUE)?;
        let recv_queue = peek_exact(sys, fd, step, "receive queue", before.inq as usize)?;
        let step = Step::DumpSendQueue;
        select_queue(sys, fd, step, TCP_SEND_QUEUE)?;
        let mut send = peek_exact(sys, fd, step, "send queue", data as usize)?;

        let after = counters(sys, fd)?;
        if after != before {
            last_queue = if (after.recv_seq, after.inq) != (before.recv_seq, before.inq) {
                "receive"
            } else {
                "send"
            };
            continue;
        }
        select_queue(sys, fd, Step::DumpSendQueue, TCP_NO_QUEUE)?;

        st.state = conn;
        st.send_seq = before.send_seq;
        st.recv_seq = before.recv_seq;
        st.unsent = send.split_off(unacked as usize);
        st.unacked = send;
        st.recv_queue = recv_queue;
        st.our_fin = our_fin;
        st.peer_fin = conn == ConnState::CloseWait;
        return Ok(st);
    }
    Err(Error::Unstable {
        step: if last_queue == "receive" {
            Step::DumpRecvQueue
        } else {
            Step::DumpSendQueue
        },
        queue: last_queue,
        attempts: ATTEMPTS,
    })
}

/// Takes a dumped socket out of repair mode, so it carries on as if nothing happened (a
/// migration was aborted). The kernel sends a window probe; the peer answers with an ACK.
/// SO_REUSEADDR is cleared by leaving repair mode (see the crate docs).
pub fn abort_dump_with<S: Sys + ?Sized>(sys: &S, fd: RawFd) -> Result<()> {
    sys.set_int(fd, IntOpt::Repair, TCP_REPAIR_OFF)
        .ctx(Step::Abort, "setsockopt(TCP_REPAIR=0)")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sys::{Call, FakeSocket, FakeSys, RepairWindow};

    fn established() -> FakeSocket {
        FakeSocket {
            state: 1,
            options: TCPI_OPT_SACK | TCPI_OPT_TIMESTAMPS | TCPI_OPT_WSCALE,
            snd_wscale: 7,
            rcv_wscale: 9,
            write_seq: 5000,
            rcv_nxt: 9000,
            recv_queue: b"hello".to_vec(),
            unacked: b"abc".to_vec(),
            unsent: b"defg".to_vec(),
            mss: 1448,
            timestamp: 777,
            window: RepairWindow {
                snd_wl1: 8990,
                snd_wnd: 1000,
                max_window: 2000,
                rcv_wnd: 3000,
                rcv_wup: 9000,
            },
            local: Some("10.99.0.2:5000".parse().unwrap()),
            peer: Some("10.99.0.1:40000".parse().unwrap()),
            reuse_addr: true,
            ..FakeSocket::default()
        }
    }

    #[test]
    fn dump_reads_everything_and_stays_in_repair_mode() {
        let sys = FakeSys::new(established());
        let st = dump_with(&sys, 3).unwrap();
        assert_eq!(st.state, ConnState::Established);
        assert_eq!(st.send_seq, 5000);
        assert_eq!(st.recv_seq, 9000);
        assert_eq!(st.unacked, b"abc");
        assert_eq!(st.unsent, b"defg");
        assert_eq!(st.recv_queue, b"hello");
        assert_eq!(st.snd_una(), 5000 - 7);
        assert_eq!(st.copied_seq(), 9000 - 5);
        assert_eq!(st.options.wscale, Some(WindowScale { snd: 7, rcv: 9 }));
        assert!(st.options.sack && st.options.timestamps);
        assert_eq!(st.timestamp, Some(777));
        assert_eq!(st.window.rcv_wnd, 3000);
        assert!(st.reuse_addr);
        let s = sys.socket_state();
        assert!(s.repair, "dump leaves the socket in repair mode");
        assert_eq!(s.repair_queue, TCP_NO_QUEUE);
        st.validate().unwrap();

        // SO_REUSEADDR is read before TCP_REPAIR=1, TCP_INFO (check) before anything changes.
        let calls = sys.calls();
        let pos = |c: &Call| calls.iter().position(|x| x == c).unwrap();
        assert!(pos(&Call::GetInt(IntOpt::ReuseAddr)) < pos(&Call::SetInt(IntOpt::Repair, 1)));
        assert!(pos(&Call::TcpInfo) < pos(&Call::SetInt(IntOpt::Repair, 1)));
        assert!(
            !calls[..pos(&Call::SetInt(IntOpt::Repair, 1))]
                .iter()
                .any(Call::mutates)
        );
    }

    #[test]
    fn dump_of_half_closed_states_accounts_for_fins() {
        // CLOSE_WAIT: rcv_nxt counts the peer's FIN, SIOCINQ does not.
        let mut s = established();
        s.state = 8;
        s.peer_fin = true;
        let st = dump_with(&FakeSys::new(s), 3).unwrap();
        assert_eq!((st.state, st.peer_fin), (ConnState::CloseWait, true));
        assert_eq!(st.copied_seq(), 9000 - 5 - 1);

        // FIN_WAIT1, FIN behind unsent data.
        let mut s = established();
        s.state = 4;
        s.our_fin = Some(false);
        let st = dump_with(&FakeSys::new(s), 3).unwrap();
        assert_eq!(st.our_fin, OurFin::Unsent);
        assert_eq!(
            (st.unacked.as_slice(), st.unsent.as_slice()),
            (&b"abc"[..], &b"defg"[..])
        );
        assert_eq!(st.snd_una(), 5000 - 1 - 7);

        // FIN_WAIT1, FIN sent.
        let mut s = established();
        s.state = 4;
        s.unsent.clear();
        s.our_fin = Some(true);
        let st = dump_with(&FakeSys::new(s), 3).unwrap();
        assert_eq!(st.our_fin, OurFin::Sent);
        assert_eq!((st.unacked.as_slice(), st.unsent.len()), (&b"abc"[..], 0));

        // FIN_WAIT2: everything acknowledged, FIN too.
        let mut s = established();
        s.state = 5;
        s.unacked.clear();
        s.unsent.clear();
        s.our_fin = Some(true);
        s.our_fin_acked = true;
        let st = dump_with(&FakeSys::new(s), 3).unwrap();
        assert_eq!(st.our_fin, OurFin::Acked);
        assert_eq!(st.snd_una(), 5000 - 1);
        st.validate().unwrap();
    }

    #[test]
    fn refused_states_touch_nothing() {
        for (state, name) in [
            (10, "LISTEN"),
            (2, "SYN_SENT"),
            (3, "SYN_RECV"),
            (6, "TIME_WAIT"),
            (7, "CLOSE"),
            (9, "LAST_ACK"),
            (11, "CLOSING"),
            (12, "NEW_SYN_RECV"),
        ] {
            let sys = FakeSys::new(FakeSocket {
                state,
                ..established()
            });
            let err = dump_with(&sys, 3).unwrap_err();
            assert!(
                matches!(err, Error::NotMovable { state: KernelState(s), .. } if s == state),
                "{err}"
            );
            assert!(err.to_string().contains(name), "{err}");
            assert!(check_with(&sys, 3).is_err());
            assert!(
                !sys.calls().iter().any(Call::mutates),
                "{name}: {:?}",
                sys.calls()
            );
            assert_eq!(
                sys.socket_state(),
                FakeSocket {
                    state,
                    ..established()
                }
            );
        }
    }

    #[test]
    fn not_tcp_is_refused() {
        let sys = FakeSys::new(FakeSocket {
            protocol: libc::IPPROTO_UDP,
            ..established()
        });
        assert!(matches!(check_with(&sys, 3), Err(Error::NotTcp { .. })));
    }

    #[test]
    fn failure_in_repair_mode_rolls_back() {
        let sys = FakeSys::new(established());
        sys.fail_on(Call::GetRepairWindow, libc::ENOPROTOOPT);
        let err = dump_with(&sys, 3).unwrap_err();
        assert_eq!(err.errno(), Some(libc::ENOPROTOOPT));
        let msg = err.to_string();
        assert!(
            msg.contains("dump/options") && msg.contains("TCP_REPAIR_WINDOW"),
            "{msg}"
        );
        assert!(!sys.socket_state().repair, "repair mode left on error");
    }

    #[test]
    fn abort_leaves_repair_mode() {
        let sys = FakeSys::new(established());
        dump_with(&sys, 3).unwrap();
        abort_dump_with(&sys, 3).unwrap();
        assert!(!sys.socket_state().repair);
        assert_eq!(sys.calls().last(), Some(&Call::SetInt(IntOpt::Repair, 0)));
    }
}
