//! Real-kernel tests: dump a server socket in namespace `b`, close it, restore it in `b`
//! (listener still open), and check the client in `a` never notices: no RST, every byte once
//! and in order in both directions. Needs root (see `common::require_root`).

mod common;

use std::io::Write;
use std::net::{IpAddr, Shutdown, SocketAddr, TcpStream};
use std::time::Duration;

use common::*;
use ferry_tcp_repair::{ConnState, Error, KernelState, OurFin, TcpState};

/// Stream seeds: client → server and server → client.
const C2S: u8 = 1;
const S2C: u8 = 2;

/// Serializes to JSON and back, as the state travels between hosts.
fn over_the_wire(st: &TcpState) -> TcpState {
    let json = serde_json::to_string(st).unwrap();
    serde_json::from_str(&json).unwrap()
}

/// Closes the dumped server socket (silent: repair mode) and restores it in the server's
/// namespace while both sides hold; releases the holds in ferry's order.
fn move_server(lab: &Lab, server: TcpStream, st: &TcpState) -> TcpStream {
    let mss = info(&server).snd_mss;
    lab.hold(Side::Server, true);
    let fins = lab.counter(Side::Server, "fin_out");
    drop(server);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(
        lab.counter(Side::Server, "fin_out"),
        fins,
        "close in repair mode sent a FIN"
    );
    assert_eq!(
        lab.counter(Side::Server, "rst_out"),
        0,
        "close in repair mode sent an RST"
    );

    // The client may hear us again: the window probe sent when repair mode ends gets through.
    lab.hold(Side::Client, false);
    let st = over_the_wire(st);
    let fd = lab
        .in_ns(Side::Server, || ferry_tcp_repair::restore(&st))
        .unwrap_or_else(|e| panic!("restore: {e}"));
    lab.hold(Side::Server, false);
    let s = TcpStream::from(fd);
    assert_eq!(
        info(&s).snd_mss,
        mss,
        "the restored socket sends with the original MSS"
    );
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(15))).unwrap();
    s
}

/// Client and server each read and write concurrently, `n_c2s` and `n_s2c` more bytes
/// after what is already in flight (`c2s_done`/`s2c_done` bytes of each stream were written
/// before, and `c2s_read`/`s2c_read` read).
struct Exchange {
    c2s_written: usize,
    c2s_read: usize,
    s2c_written: usize,
    s2c_read: usize,
}

impl Exchange {
    /// Reads what is in flight and writes `more` bytes each way, then checks all arrived.
    fn run(&mut self, client: &TcpStream, server: &TcpStream, more_c2s: usize, more_s2c: usize) {
        let (mut cr, mut cw) = (client.try_clone().unwrap(), client.try_clone().unwrap());
        let (mut sr, mut sw) = (server.try_clone().unwrap(), server.try_clone().unwrap());
        let c2s_total = self.c2s_written + more_c2s;
        let s2c_total = self.s2c_written + more_s2c;
        let (c2s_read, s2c_read) = (self.c2s_read, self.s2c_read);
        let (c2s_written, s2c_written) = (self.c2s_written, self.s2c_written);
        std::thread::scope(|s| {
            s.spawn(move || {
                cw.write_all(&pattern(C2S, c2s_written, more_c2s)).unwrap();
            });
            s.spawn(move || {
                sw.write_all(&pattern(S2C, s2c_written, more_s2c)).unwrap();
            });
            s.spawn(move || expect_bytes(&mut sr, C2S, c2s_read, c2s_total - c2s_read));
            s.spawn(move || expect_bytes(&mut cr, S2C, s2c_read, s2c_total - s2c_read));
        });
        *self = Exchange {
            c2s_written: c2s_total,
            c2s_read: c2s_total,
            s2c_written: s2c_total,
            s2c_read: s2c_total,
        };
    }
}

/// Puts `n` client bytes in the server's receive queue (acknowledged, unread).
fn fill_server_recv_queue(client: &mut TcpStream, offset: usize, n: usize) {
    client.write_all(&pattern(C2S, offset, n)).unwrap();
    wait_until("the server to acknowledge everything", 5, || {
        outq(client) == 0
    });
}

/// Holds the client's incoming TCP and has the server write: some is sent (and lost in the
/// hold: unacknowledged), the rest waits for the congestion window (never sent).
fn fill_server_send_queue(lab: &Lab, server: &TcpStream, offset: usize) -> usize {
    lab.hold(Side::Client, true);
    let n = write_nonblocking(server, S2C, offset, 4 << 20);
    std::thread::sleep(Duration::from_millis(30));
    n
}

fn migrate_established(net: Net) {
    let lab = Lab::new();
    let (mut client, server, _listener) = lab.connect(net);
    const N1: usize = 40_000;
    fill_server_recv_queue(&mut client, 0, N1);
    let m = fill_server_send_queue(&lab, &server, 0);

    ferry_tcp_repair::check(&server).unwrap();
    let st = ferry_tcp_repair::dump(&server).unwrap_or_else(|e| panic!("dump: {e}"));
    eprintln!(
        "dumped: recv {} unacked {} unsent {} (written {m}), mss {}, options {:?}",
        st.recv_queue.len(),
        st.unacked.len(),
        st.unsent.len(),
        st.options.mss,
        st.options
    );
    assert_eq!(st.state, ConnState::Established);
    assert_eq!(st.recv_queue, pattern(C2S, 0, N1), "receive queue");
    assert!(!st.unacked.is_empty(), "nothing sent-unacknowledged");
    assert!(!st.unsent.is_empty(), "nothing unsent");
    assert_eq!(st.unacked.len() + st.unsent.len(), m);
    assert_eq!(
        [st.unacked.clone(), st.unsent.clone()].concat(),
        pattern(S2C, 0, m)
    );
    let expected_local = match (net, lab.addr(Side::Server, net == Net::V6)) {
        (Net::Mapped, IpAddr::V4(v4)) => IpAddr::V6(v4.to_ipv6_mapped()),
        (_, ip) => ip,
    };
    assert_eq!(st.local.ip(), expected_local);
    assert!(st.options.timestamps && st.options.sack && st.options.wscale.is_some());

    let server = move_server(&lab, server, &st);
    assert_eq!(info(&server).state, KernelState::ESTABLISHED.0);

    let mut x = Exchange {
        c2s_written: N1,
        c2s_read: 0,
        s2c_written: m,
        s2c_read: 0,
    };
    x.run(&client, &server, 100_000, 100_000);
    // The client's view: the same connection, still established, every byte received once.
    let ci = info(&client);
    assert_eq!(ci.state, KernelState::ESTABLISHED.0);
    assert_eq!(ci.bytes_received, (m + 100_000) as u64);
    assert!(so_error(&client).is_none());
    eprintln!(
        "client retransmissions {}, server's {}",
        ci.total_retrans,
        info(&server).total_retrans
    );

    server.shutdown(Shutdown::Write).unwrap();
    expect_eof_after(&mut client, S2C, x.s2c_written, 0);
    client.shutdown(Shutdown::Write).unwrap();
    let mut server = server;
    expect_eof_after(&mut server, C2S, x.c2s_written, 0);
    lab.assert_no_rst();
}

#[test]
fn established_ipv4_moves_with_data_in_flight_both_ways() {
    if require_root("established_ipv4") {
        migrate_established(Net::V4);
    }
}

#[test]
fn established_ipv6_moves_with_data_in_flight_both_ways() {
    if require_root("established_ipv6") {
        migrate_established(Net::V6);
    }
}

#[test]
fn established_v4_mapped_ipv6_socket_moves() {
    if require_root("established_v4_mapped") {
        migrate_established(Net::Mapped);
    }
}

/// The peer shut down its sending side: the server is in CLOSE_WAIT with unread bytes before
/// the FIN, and still has bytes to send.
fn migrate_close_wait(net: Net) {
    let lab = Lab::new();
    let (mut client, server, _listener) = lab.connect(net);
    const N1: usize = 30_000;
    fill_server_recv_queue(&mut client, 0, N1);
    client.shutdown(Shutdown::Write).unwrap();
    wait_until("CLOSE_WAIT", 5, || {
        info(&server).state == KernelState::CLOSE_WAIT.0
    });
    let m = fill_server_send_queue(&lab, &server, 0);

    let st = ferry_tcp_repair::dump(&server).unwrap_or_else(|e| panic!("dump: {e}"));
    assert_eq!(st.state, ConnState::CloseWait);
    assert!(st.peer_fin);
    assert_eq!(st.recv_queue, pattern(C2S, 0, N1));
    assert_eq!(st.unacked.len() + st.unsent.len(), m);

    let mut server = move_server(&lab, server, &st);
    assert_eq!(info(&server).state, KernelState::CLOSE_WAIT.0);
    // The unread bytes, then end of file: once, at the right place.
    expect_eof_after(&mut server, C2S, 0, N1);

    // Our direction still works.
    let mut cr = client.try_clone().unwrap();
    let more = 50_000;
    std::thread::scope(|s| {
        s.spawn(|| expect_bytes(&mut cr, S2C, 0, m + more));
        server.write_all(&pattern(S2C, m, more)).unwrap();
    });
    assert!(so_error(&client).is_none());
    server.shutdown(Shutdown::Write).unwrap();
    expect_eof_after(&mut client, S2C, m + more, 0);
    wait_until("the server's FIN to be acknowledged", 5, || {
        info(&server).state == KernelState::CLOSE.0
    });
    lab.assert_no_rst();
}

#[test]
fn close_wait_ipv4_moves_and_eof_is_seen_after_the_data() {
    if require_root("close_wait_ipv4") {
        migrate_close_wait(Net::V4);
    }
}

#[test]
fn close_wait_ipv6_moves_and_eof_is_seen_after_the_data() {
    if require_root("close_wait_ipv6") {
        migrate_close_wait(Net::V6);
    }
}

#[test]
fn close_wait_v4_mapped_ipv6_socket_moves() {
    if require_root("close_wait_v4_mapped") {
        migrate_close_wait(Net::Mapped);
    }
}

/// We shut down our sending side and the peer acknowledged the FIN (FIN_WAIT2); the peer
/// keeps sending.
#[test]
fn fin_wait2_moves_and_the_peer_keeps_sending() {
    if !require_root("fin_wait2") {
        return;
    }
    let lab = Lab::new();
    let (mut client, server, _listener) = lab.connect(Net::V4);
    const K: usize = 10_000;
    (&server).write_all(&pattern(S2C, 0, K)).unwrap();
    server.shutdown(Shutdown::Write).unwrap();
    expect_eof_after(&mut client, S2C, 0, K);
    wait_until("FIN_WAIT2", 5, || {
        info(&server).state == KernelState::FIN_WAIT2.0
    });
    const N1: usize = 30_000;
    fill_server_recv_queue(&mut client, 0, N1);

    let st = ferry_tcp_repair::dump(&server).unwrap_or_else(|e| panic!("dump: {e}"));
    assert_eq!((st.state, st.our_fin), (ConnState::FinWait2, OurFin::Acked));
    assert!(st.unacked.is_empty() && st.unsent.is_empty());
    assert_eq!(st.recv_queue, pattern(C2S, 0, N1));

    let mut server = move_server(&lab, server, &st);
    // The restored socket sends its FIN again; the peer ACKs the duplicate.
    wait_until("FIN_WAIT2 again", 5, || {
        info(&server).state == KernelState::FIN_WAIT2.0
    });

    let more = 60_000;
    std::thread::scope(|s| {
        s.spawn(|| expect_eof_after(&mut server, C2S, 0, N1 + more));
        client.write_all(&pattern(C2S, N1, more)).unwrap();
        client.shutdown(Shutdown::Write).unwrap();
    });
    assert!(so_error(&client).is_none());
    wait_until("the client to close", 5, || {
        info(&client).state == KernelState::CLOSE.0
    });
    lab.assert_no_rst();
}

/// We shut down our sending side while the peer was not acknowledging: FIN_WAIT1 with
/// unacknowledged bytes and either unsent bytes with the FIN behind them, or the FIN sent.
fn migrate_fin_wait1(fin_sent: bool) {
    let lab = Lab::new();
    let (mut client, server, _listener) = lab.connect(Net::V4);
    const N1: usize = 20_000;
    fill_server_recv_queue(&mut client, 0, N1);
    lab.hold(Side::Client, true);
    // A few segments fit in the initial congestion window: everything goes out, FIN included.
    let want = if fin_sent { 3_000 } else { 4 << 20 };
    let m = write_nonblocking(&server, S2C, 0, want);
    server.shutdown(Shutdown::Write).unwrap();
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(info(&server).state, KernelState::FIN_WAIT1.0);

    let st = ferry_tcp_repair::dump(&server).unwrap_or_else(|e| panic!("dump: {e}"));
    assert_eq!(st.state, ConnState::FinWait1);
    if fin_sent {
        assert_eq!(st.our_fin, OurFin::Sent);
        assert_eq!((st.unacked.len(), st.unsent.len()), (m, 0));
    } else {
        assert_eq!(st.our_fin, OurFin::Unsent);
        assert!(!st.unacked.is_empty() && !st.unsent.is_empty());
        assert_eq!(st.unacked.len() + st.unsent.len(), m);
    }
    assert_eq!(
        [st.unacked.clone(), st.unsent.clone()].concat(),
        pattern(S2C, 0, m)
    );

    let mut server = move_server(&lab, server, &st);
    expect_eof_after(&mut client, S2C, 0, m);
    wait_until("FIN_WAIT2", 5, || {
        info(&server).state == KernelState::FIN_WAIT2.0
    });
    let more = 40_000;
    std::thread::scope(|s| {
        s.spawn(|| expect_eof_after(&mut server, C2S, 0, N1 + more));
        client.write_all(&pattern(C2S, N1, more)).unwrap();
        client.shutdown(Shutdown::Write).unwrap();
    });
    assert!(so_error(&client).is_none());
    lab.assert_no_rst();
}

#[test]
fn fin_wait1_with_unsent_data_moves() {
    if require_root("fin_wait1_unsent") {
        migrate_fin_wait1(false);
    }
}

#[test]
fn fin_wait1_with_fin_sent_moves() {
    if require_root("fin_wait1_fin_sent") {
        migrate_fin_wait1(true);
    }
}

fn assert_refused(err: Error, state: KernelState) {
    match err {
        Error::NotMovable { state: s, .. } => assert_eq!(s, state, "{err}"),
        other => panic!("expected NotMovable({state}), got {other}"),
    }
}

#[test]
fn listen_syn_sent_and_last_ack_are_refused_untouched() {
    if !require_root("refusal") {
        return;
    }
    let lab = Lab::new();
    let (mut client, server, listener) = lab.connect(Net::V4);

    // LISTEN: refused, and it still accepts.
    assert_refused(
        ferry_tcp_repair::check(&listener).unwrap_err(),
        KernelState::LISTEN,
    );
    let err = ferry_tcp_repair::dump(&listener).unwrap_err();
    assert!(err.to_string().contains("LISTEN"), "{err}");
    assert_refused(err, KernelState::LISTEN);
    let port = listener.local_addr().unwrap().port();
    let srv = SocketAddr::new(lab.addr(Side::Server, false), port);
    let c2 = lab.in_ns(Side::Client, || TcpStream::connect(srv).unwrap());
    let (s2, _) = listener.accept().unwrap();
    drop((c2, s2));

    // SYN_SENT: the server holds, so the handshake stays pending.
    lab.hold(Side::Server, true);
    let syn = lab.in_ns(Side::Client, || connect_nonblocking(srv));
    assert_eq!(info(&syn).state, KernelState::SYN_SENT.0);
    assert_refused(
        ferry_tcp_repair::check(&syn).unwrap_err(),
        KernelState::SYN_SENT,
    );
    assert_refused(
        ferry_tcp_repair::dump(&syn).unwrap_err(),
        KernelState::SYN_SENT,
    );
    lab.hold(Side::Server, false);
    // Untouched: its SYN retransmission completes the handshake.
    wait_until("the held connect to complete", 5, || {
        info(&syn).state == KernelState::ESTABLISHED.0
    });
    let (s3, _) = listener.accept().unwrap();
    drop((syn, s3));

    // LAST_ACK: the client closed, the server closed too, its FIN is held.
    client.shutdown(Shutdown::Write).unwrap();
    wait_until("CLOSE_WAIT", 5, || {
        info(&server).state == KernelState::CLOSE_WAIT.0
    });
    lab.hold(Side::Client, true);
    server.shutdown(Shutdown::Write).unwrap();
    assert_eq!(info(&server).state, KernelState::LAST_ACK.0);
    assert_refused(
        ferry_tcp_repair::dump(&server).unwrap_err(),
        KernelState::LAST_ACK,
    );
    lab.hold(Side::Client, false);
    expect_eof_after(&mut client, S2C, 0, 0);
    wait_until("the server's FIN to be acknowledged", 5, || {
        info(&server).state == KernelState::CLOSE.0
    });
    lab.assert_no_rst();
}

/// A migration aborted after the dump: the original socket leaves repair mode and the
/// connection carries on.
#[test]
fn abort_after_dump_keeps_the_original_working() {
    if !require_root("abort") {
        return;
    }
    let lab = Lab::new();
    let (mut client, server, _listener) = lab.connect(Net::V4);
    const N1: usize = 40_000;
    fill_server_recv_queue(&mut client, 0, N1);
    let m = fill_server_send_queue(&lab, &server, 0);

    let st = ferry_tcp_repair::dump(&server).unwrap();
    assert_eq!(st.recv_queue.len(), N1);
    assert!(!st.unacked.is_empty() && !st.unsent.is_empty());
    lab.hold(Side::Client, false);
    ferry_tcp_repair::abort_dump(&server).unwrap();

    let mut x = Exchange {
        c2s_written: N1,
        c2s_read: 0,
        s2c_written: m,
        s2c_read: 0,
    };
    x.run(&client, &server, 50_000, 50_000);
    assert_eq!(info(&client).state, KernelState::ESTABLISHED.0);
    assert!(so_error(&client).is_none() && so_error(&server).is_none());
    // A second dump works too (nothing was left half-done), and so does a second abort.
    ferry_tcp_repair::dump(&server).unwrap();
    ferry_tcp_repair::abort_dump(&server).unwrap();
    x.run(&client, &server, 1_000, 1_000);
    lab.assert_no_rst();
}

/// A restore in a namespace where the local address does not exist fails cleanly (and
/// sends nothing); with `freebind` it binds anyway.
#[test]
fn restore_without_the_address_fails_with_context() {
    if !require_root("restore_no_address") {
        return;
    }
    let lab = Lab::new();
    let (mut client, server, _listener) = lab.connect(Net::V4);
    fill_server_recv_queue(&mut client, 0, 1_000);
    let st = ferry_tcp_repair::dump(&server).unwrap();
    // Namespace a has 10.99.0.1, not the server's 10.99.0.2.
    let err = lab
        .in_ns(Side::Client, || ferry_tcp_repair::restore(&st))
        .unwrap_err();
    assert_eq!(err.errno(), Some(libc::EADDRNOTAVAIL), "{err}");
    assert!(
        err.to_string().starts_with("restore/bind: bind(10.99.0.2:"),
        "{err}"
    );
    ferry_tcp_repair::abort_dump(&server).unwrap();
    let mut server = server;
    expect_bytes(&mut server, C2S, 0, 1_000);
    lab.assert_no_rst();
}
