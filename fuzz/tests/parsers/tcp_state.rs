//! A hand-off package (`POST /v1/handoff/{container}` between agents): the dumped TCP
//! connections (`ferry_tcp_repair::TcpState`, JSON with base64 queues) and the process's state,
//! decoded then validated socket by socket before it is stored.

use std::net::SocketAddr;

use ferry_agent::handoff::Package;
use ferry_fuzz::{config, largest_allocation, mutated, replay};
use ferry_tcp_repair::{ConnState, OurFin, TcpOptions, TcpState, Window, WindowScale};
use proptest::prelude::*;

const TARGET: &str = "handoff_package";
const TOKENS: &[&[u8]] = &[
    b"\"established\"",
    b"\"close_wait\"",
    b"\"fin_wait1\"",
    b"\"fin_wait2\"",
    b"\"sent\"",
    b"\"acked\"",
    b"null",
    b"true",
    b"==",
    b"AAAA",
    b"[::1]:1",
    b"\"wscale\":{\"snd\":15,\"rcv\":0},",
];

/// What the peer API does with a body: decode, then validate every socket (the error names
/// the socket, as the API's answer does).
fn accept(body: &[u8]) -> Result<Package, String> {
    let (outcome, largest) = largest_allocation(|| -> Result<Package, String> {
        let p: Package = serde_json::from_slice(body).map_err(|e| e.to_string())?;
        for (i, s) in p.sockets.iter().enumerate() {
            // Sequence arithmetic of any decoded state wraps, never overflows.
            let _ = (s.snd_una(), s.copied_seq());
            s.validate().map_err(|e| format!("sockets[{i}]: {e}"))?;
        }
        Ok(p)
    });
    assert!(
        largest <= 4096 + 4 * body.len(),
        "an allocation of {largest} bytes for a {}-byte body",
        body.len()
    );
    if let Err(e) = &outcome {
        assert!(!e.is_empty());
    }
    outcome
}

#[test]
fn the_corpus_is_read_as_its_names_say() {
    replay(TARGET, |body| accept(body).map(drop));
}

fn addr_pair() -> impl Strategy<Value = (SocketAddr, SocketAddr)> {
    prop_oneof![
        (
            any::<std::net::SocketAddrV4>(),
            any::<std::net::SocketAddrV4>()
        )
            .prop_map(|(a, b)| (a.into(), b.into())),
        (
            any::<[u8; 16]>(),
            any::<u16>(),
            any::<[u8; 16]>(),
            any::<u16>()
        )
            .prop_map(|(a, p, b, q)| (
                SocketAddr::from((std::net::Ipv6Addr::from(a), p)),
                SocketAddr::from((std::net::Ipv6Addr::from(b), q)),
            )),
    ]
}

fn tcp_state() -> impl Strategy<Value = TcpState> {
    let bytes = || proptest::collection::vec(any::<u8>(), 0..300);
    let state = prop_oneof![
        Just(ConnState::Established),
        Just(ConnState::CloseWait),
        Just(ConnState::FinWait1),
        Just(ConnState::FinWait2),
    ];
    let fin = prop_oneof![
        Just(OurFin::None),
        Just(OurFin::Unsent),
        Just(OurFin::Sent),
        Just(OurFin::Acked),
    ];
    let options = (
        any::<u32>(),
        any::<bool>(),
        any::<bool>(),
        proptest::option::of(
            (any::<u8>(), any::<u8>()).prop_map(|(snd, rcv)| WindowScale { snd, rcv }),
        ),
    )
        .prop_map(|(mss, sack, timestamps, wscale)| TcpOptions {
            mss,
            sack,
            timestamps,
            wscale,
        });
    let window = any::<[u32; 5]>().prop_map(|w| Window {
        snd_wl1: w[0],
        snd_wnd: w[1],
        max_window: w[2],
        rcv_wnd: w[3],
        rcv_wup: w[4],
    });
    (
        (
            prop_oneof![Just(TcpState::VERSION), any::<u32>()],
            state,
            addr_pair(),
            any::<[u32; 2]>(),
        ),
        (bytes(), bytes(), bytes(), fin, any::<bool>()),
        (
            options,
            proptest::option::of(any::<u32>()),
            window,
            any::<[u32; 2]>(),
            any::<bool>(),
        ),
    )
        .prop_map(
            |(
                (version, state, (local, peer), seq),
                (unacked, unsent, recv_queue, our_fin, peer_fin),
                (options, timestamp, window, bufs, reuse_addr),
            )| TcpState {
                version,
                state,
                local,
                peer,
                send_seq: seq[0],
                recv_seq: seq[1],
                unacked,
                unsent,
                recv_queue,
                our_fin,
                peer_fin,
                options,
                timestamp,
                window,
                sndbuf: bufs[0],
                rcvbuf: bufs[1],
                reuse_addr,
            },
        )
}

proptest! {
    #![proptest_config(config())]

    /// Any body: refused with a message or accepted; what is accepted re-encodes to a body
    /// that decodes to the same package and is accepted again.
    #[test]
    fn any_body_is_refused_or_round_trips(body in mutated(TARGET, TOKENS)) {
        if let Ok(p) = accept(&body) {
            let again = serde_json::to_vec(&p).expect("a package encodes");
            let back = accept(&again).expect("a re-encoded package is accepted");
            prop_assert_eq!(back, p);
        }
    }

    /// encode → decode is the identity for any state, valid or not, and validation of a
    /// decoded state gives the same verdict as of the original.
    #[test]
    fn tcp_states_round_trip(st in tcp_state()) {
        let json = serde_json::to_vec(&st).expect("encodes");
        let back: TcpState = serde_json::from_slice(&json).expect("decodes");
        prop_assert_eq!(&back, &st);
        prop_assert_eq!(back.validate().is_ok(), st.validate().is_ok());
        prop_assert_eq!((back.snd_una(), back.copied_seq()), (st.snd_una(), st.copied_seq()));
    }
}
