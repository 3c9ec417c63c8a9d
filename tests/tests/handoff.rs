//! The socket hand-off in a real lab: a stateful server (`ferry-workload serve`) in container
//! 10.244.1.10 on a1 moves to b1 (another cloud) with its 50 client connections and their
//! counters, driven by `ferry migrate prepare|freeze|release` around the workload's own
//! export (source) and claim (destination). A client on the internet side, through the
//! container's public address, checks every reply: none lost, none twice, in order, counters
//! continuing, no connection reset; a second one does the same over the container's own IPv6
//! address (the lab is dual-stack), so IPv4-mapped and IPv6 connections move together. And
//! every refusal changes nothing.
use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, TcpListener, TcpStream, UdpSocket},
    os::fd::AsFd as _,
    path::Path,
    process::{ChildStdin, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use ferry_lab::{Lab, LabOptions};
use ferry_tests::{KillOnDrop, require_root_and_tools, workspace_binary};
use ferry_workload::handoff::{self, HandoffError};
use serde_json::{Value, json};

const C: &str = "10.244.1.10";
const PUBLIC: &str = "203.0.113.130";
const PORT: u16 = 7000;
const CONNECTIONS: usize = 50;
/// Connections of the IPv6 client (beside the IPv4 client's).
const CONNECTIONS6: usize = 10;

fn lab() -> Lab {
    workspace_binary("ferry-lab");
    workspace_binary("ferry-agent");
    workspace_binary("ferry");
    workspace_binary("ferry-workload");
    Lab::up(LabOptions {
        start_agents: true,
        ..LabOptions::default()
    })
    .expect("lab up")
}

fn c() -> Ipv4Addr {
    C.parse().unwrap()
}

fn step(lab: &Lab, args: &[&str]) -> Value {
    lab.ferry_json(args)
        .unwrap_or_else(|e| panic!("ferry {args:?}: {e}"))
}

/// A process this test started inside a namespace: its stdout and stderr lines arrive on
/// channels; SIGKILLed (by PID) and reaped when dropped.
struct Proc {
    child: KillOnDrop,
    stdin: Option<ChildStdin>,
    out: mpsc::Receiver<String>,
    err: mpsc::Receiver<String>,
    name: String,
}

impl Proc {
    fn start(ns: &Path, args: &[&str]) -> Self {
        let mut cmd = Command::new(workspace_binary("ferry-workload"));
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        ferry_overlay::netns::command_in(&mut cmd, ns).unwrap();
        let mut child = cmd.spawn().expect("spawning ferry-workload");
        let lines = |r: Box<dyn std::io::Read + Send>| {
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                for line in BufReader::new(r).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
            rx
        };
        let out = lines(Box::new(child.stdout.take().unwrap()));
        let err = lines(Box::new(child.stderr.take().unwrap()));
        Self {
            stdin: child.stdin.take(),
            child: KillOnDrop(child),
            out,
            err,
            name: format!("ferry-workload {}", args.first().unwrap_or(&"")),
        }
    }

    fn pid(&self) -> u32 {
        self.child.0.id()
    }

    /// The next JSON line on `rx`.
    fn json_from(name: &str, rx: &mpsc::Receiver<String>, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = rx
                .recv_timeout(left)
                .unwrap_or_else(|e| panic!("{name}: no line within {timeout:?}: {e}"));
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                return v;
            }
            eprintln!("{name}: {line}");
        }
    }

    fn next(&self, timeout: Duration) -> Value {
        Self::json_from(&self.name, &self.out, timeout)
    }

    fn next_err(&self, timeout: Duration) -> Value {
        Self::json_from(&self.name, &self.err, timeout)
    }

    fn say(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin");
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill {sig} {}", self.pid());
    }

    fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let name = self.name.clone();
        ferry_tests::wait_for(&format!("{name} to exit"), timeout, || {
            self.child.0.try_wait().unwrap()
        })
    }
}

fn f(v: &Value, k: &str) -> f64 {
    v.get(k)
        .and_then(Value::as_f64)
        .unwrap_or_else(|| panic!("no number `{k}` in {v}"))
}

fn u(v: &Value, k: &str) -> u64 {
    v.get(k)
        .and_then(Value::as_u64)
        .unwrap_or_else(|| panic!("no integer `{k}` in {v}"))
}

#[test]
fn a_server_moves_across_clouds_with_its_connections_and_state() {
    if !require_root_and_tools(&["ip", "kill"]) {
        return;
    }
    let lab = lab();
    let on_a1 = lab.add_container("a1", c()).unwrap();
    step(
        &lab,
        &["public", "add", "--public", PUBLIC, "--container", C],
    );
    lab.sync().unwrap();

    let a1_sock = lab.handoff_socket("a1");
    let b1_sock = lab.handoff_socket("b1");
    let port = PORT.to_string();
    let mut server = Proc::start(
        &on_a1,
        &[
            "serve",
            "--port",
            &port,
            "--handoff-socket",
            a1_sock.to_str().unwrap(),
            "--container",
            C,
        ],
    );
    assert_eq!(server.next(Duration::from_secs(5))["event"], "listening");
    let to = format!("{PUBLIC}:{PORT}");
    let n = CONNECTIONS.to_string();
    let client = Proc::start(
        &lab.netns("inet"),
        &[
            "client",
            "--to",
            &to,
            "--connections",
            &n,
            "--interval-ms",
            "5",
            "--json",
        ],
    );
    let connected = client.next_err(Duration::from_secs(15));
    assert_eq!(connected["connections"], CONNECTIONS, "{connected}");
    let prefix6 = lab
        .topology()
        .overlay6_cidr
        .expect("the default lab is dual-stack");
    let to6 = format!("[{}]:{PORT}", ferry_config::overlay_ipv6(prefix6, c()));
    let n6 = CONNECTIONS6.to_string();
    let client6 = Proc::start(
        &lab.netns("inet"),
        &[
            "client",
            "--to",
            &to6,
            "--connections",
            &n6,
            "--interval-ms",
            "5",
            "--json",
        ],
    );
    let connected6 = client6.next_err(Duration::from_secs(15));
    assert_eq!(connected6["connections"], CONNECTIONS6, "{connected6}");
    let total = (CONNECTIONS + CONNECTIONS6) as u64;
    ferry_tests::keep_load_for(Duration::from_millis(1000));

    // Without a frozen migration the agent refuses before touching a socket; the server
    // goes on serving (the client's checks below cover that stretch too).
    server.say("export b1");
    let refused = server.next(Duration::from_secs(10));
    assert_eq!(refused["ok"], false, "{refused}");
    assert_eq!(refused["error"]["code"], "not_frozen", "{refused}");
    assert_eq!(refused["resumed"], true);
    ferry_tests::keep_load_for(Duration::from_millis(500));

    // The move.
    let t0 = Instant::now();
    step(
        &lab,
        &["migrate", "prepare", "--container", C, "--to", "b1"],
    );
    let on_b1 = lab.container_netns("b1", c());
    assert!(on_b1.exists(), "prepare built the container on b1");
    let t_freeze = Instant::now();
    step(&lab, &["migrate", "freeze", "--container", C]);
    let freeze_ms = t_freeze.elapsed().as_secs_f64() * 1e3;
    server.say("export b1");
    let exported = server.next(Duration::from_secs(30));
    assert_eq!(exported["ok"], true, "{exported}");
    assert_eq!(u(&exported, "sockets"), total, "{exported}");
    assert!(
        server.wait(Duration::from_secs(5)).success(),
        "the source exits 0"
    );
    let dest = Proc::start(
        &on_b1,
        &[
            "claim",
            "--port",
            &port,
            "--handoff-socket",
            b1_sock.to_str().unwrap(),
            "--container",
            C,
            "--timeout-ms",
            "5000",
        ],
    );
    let claimed = dest.next(Duration::from_secs(15));
    assert_eq!(claimed["ok"], true, "{claimed}");
    assert_eq!(u(&claimed, "sockets"), total, "{claimed}");
    let t_release = Instant::now();
    step(&lab, &["migrate", "release", "--container", C]);
    let release_ms = t_release.elapsed().as_secs_f64() * 1e3;
    let network_frozen_ms = t_freeze.elapsed().as_secs_f64() * 1e3;
    let total_ms = t0.elapsed().as_secs_f64() * 1e3;
    assert_eq!(dest.next(Duration::from_secs(5))["event"], "listening");

    // A package is handed out once.
    let again = handoff::claim(&b1_sock, c(), 200).unwrap_err();
    assert_eq!(again.code, "already_claimed", "{again}");

    // Let the client run on at the destination, then stop it and read its summary.
    ferry_tests::keep_load_for(Duration::from_secs(2));
    client.signal("-TERM");
    client6.signal("-TERM");
    let summary = client.next(Duration::from_secs(15));
    let summary6 = client6.next(Duration::from_secs(15));
    eprintln!("IPv6 client: {summary6}");
    for (k, want) in [
        ("connections", CONNECTIONS6 as u64),
        ("alive", CONNECTIONS6 as u64),
        ("resets", 0),
        ("closed_by_server", 0),
        ("errors", 0),
        ("mismatches", 0),
        ("unanswered", 0),
    ] {
        assert_eq!(u(&summary6, k), want, "IPv6 client {k}: {summary6}");
    }
    assert_eq!(
        u(&summary6, "requests"),
        u(&summary6, "replies"),
        "{summary6}"
    );
    let processes_frozen_ms =
        (u(&claimed, "serving_unix_ms") - u(&exported, "stopped_unix_ms")) as f64;
    let mut shown = summary.clone();
    let per_conn = shown
        .as_object_mut()
        .and_then(|o| o.remove("max_gap_ms_per_connection"))
        .unwrap_or_default();
    let per_conn: Vec<f64> = per_conn
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default();
    shown["max_gap_ms_smallest_connection"] =
        json!(per_conn.iter().copied().fold(f64::INFINITY, f64::min));
    let report = json!({
        "client": shown,
        "export": exported,
        "claim": claimed,
        "freeze_step_ms": freeze_ms,
        "release_step_ms": release_ms,
        "network_frozen_ms": network_frozen_ms,
        "processes_frozen_ms": processes_frozen_ms,
        "prepare_to_release_ms": total_ms,
    });
    eprintln!(
        "hand-off across clouds: {}",
        serde_json::to_string_pretty(&report).unwrap()
    );

    assert_eq!(u(&summary, "connections"), CONNECTIONS as u64);
    assert_eq!(
        u(&summary, "alive"),
        CONNECTIONS as u64,
        "every connection survived"
    );
    assert_eq!(u(&summary, "resets"), 0, "no connection was reset");
    assert_eq!(u(&summary, "closed_by_server"), 0);
    assert_eq!(u(&summary, "errors"), 0);
    assert_eq!(
        u(&summary, "mismatches"),
        0,
        "every reply exactly once, in order, counters continuous: {}",
        summary["mismatch_examples"]
    );
    assert_eq!(u(&summary, "unanswered"), 0, "every request was answered");
    assert_eq!(u(&summary, "requests"), u(&summary, "replies"));
    // The counters moved: the destination answered requests whose counters continue from
    // the source's (checked per reply by the client), after the source had served many.
    assert!(u(&exported, "served") > 1000, "{exported}");
    // The largest silence a client saw is the frozen window plus little: no retransmission
    // back-off (seconds) and no reset.
    let gap = f(&summary, "max_gap_ms");
    assert!(
        gap < network_frozen_ms + 1000.0,
        "largest gap {gap} ms, network frozen {network_frozen_ms} ms"
    );
    drop(dest);
    lab.down().unwrap();
}

/// Sockets of the test's own inside container C: a listener on C:7100, a connection to it
/// (both ends local to C), a UDP socket, and a loopback connection.
struct Sockets {
    listener: TcpListener,
    accepted: TcpStream,
    client: TcpStream,
    udp: UdpSocket,
    lo_accepted: TcpStream,
    _lo_client: TcpStream,
}

fn sockets_in(ns: &Path) -> Sockets {
    ferry_overlay::netns::run_in(ns, || -> std::io::Result<Sockets> {
        let listener = TcpListener::bind((c(), 7100))?;
        let client = TcpStream::connect((c(), 7100))?;
        let (accepted, _) = listener.accept()?;
        let lo = TcpListener::bind((Ipv4Addr::LOCALHOST, 7101))?;
        let lo_client = TcpStream::connect((Ipv4Addr::LOCALHOST, 7101))?;
        let (lo_accepted, _) = lo.accept()?;
        Ok(Sockets {
            listener,
            accepted,
            client,
            udp: UdpSocket::bind((c(), 7102))?,
            lo_accepted,
            _lo_client: lo_client,
        })
    })
    .unwrap()
    .unwrap()
}

/// A raw request (any header, any descriptors).
fn raw(sock: &Path, header: Value, fds: &[std::os::fd::BorrowedFd<'_>]) -> HandoffError {
    handoff::request(sock, &header, fds, &[], Duration::from_secs(10))
        .map(|m| panic!("accepted: {}", m.header))
        .unwrap_err()
}

#[test]
fn refusals_change_nothing() {
    if !require_root_and_tools(&["ip"]) {
        return;
    }
    let lab = lab();
    let on_a1 = lab.add_container("a1", c()).unwrap();
    let a1_sock = lab.handoff_socket("a1");
    let b1_sock = lab.handoff_socket("b1");
    let mut s = sockets_in(&on_a1);

    // A listening socket passed as a connection: the whole export is refused, naming it.
    let e = handoff::export(
        &a1_sock,
        c(),
        "b1",
        &[s.accepted.as_fd(), s.listener.as_fd()],
        b"x",
    )
    .unwrap_err();
    assert_eq!(e.code, "not_movable", "{e}");
    assert!(
        e.message.contains("socket 1") && e.message.contains("LISTEN"),
        "{e}"
    );
    // Not TCP, and a connection that is not the container's own address.
    let e = handoff::export(&a1_sock, c(), "b1", &[s.udp.as_fd()], b"").unwrap_err();
    assert!(
        e.code == "not_movable" && e.message.contains("not a TCP socket"),
        "{e}"
    );
    let e = handoff::export(
        &a1_sock,
        c(),
        "b1",
        &[s.accepted.as_fd(), s.lo_accepted.as_fd()],
        b"",
    )
    .unwrap_err();
    assert!(
        e.code == "not_movable" && e.message.contains("127.0.0.1"),
        "{e}"
    );
    // Good sockets, but no frozen migration: refused before any dump.
    let e = handoff::export(&a1_sock, c(), "b1", &[s.accepted.as_fd()], b"").unwrap_err();
    assert_eq!(e.code, "not_frozen", "{e}");
    // A container this host does not have.
    let e = handoff::export(&a1_sock, "10.244.9.9".parse().unwrap(), "b1", &[], b"").unwrap_err();
    assert_eq!(e.code, "not_local", "{e}");
    // Protocol errors.
    let e = raw(&a1_sock, json!({"op": "dance"}), &[]);
    assert_eq!(e.code, "unknown_op", "{e}");
    let e = raw(&a1_sock, json!({"container": C}), &[]);
    assert_eq!(e.code, "bad_request", "{e}");
    let e = raw(
        &a1_sock,
        json!({"op": "export", "container": C, "to": "b1", "fds": 2}),
        &[s.accepted.as_fd()],
    );
    assert_eq!(e.code, "wrong_fd_count", "{e}");
    let e = raw(
        &a1_sock,
        json!({"op": "export", "container": C, "to": "b1", "fds": 0, "colour": 1}),
        &[],
    );
    assert!(
        e.code == "bad_request" && e.message.contains("colour"),
        "{e}"
    );
    {
        // Not JSON at all.
        let mut u = std::os::unix::net::UnixStream::connect(&a1_sock).unwrap();
        u.write_all(&5u32.to_be_bytes()).unwrap();
        u.write_all(b"{nope").unwrap();
        let reply = ferry_workload::wire::recv_message(&u, 1 << 20).unwrap();
        assert_eq!(
            reply.header["error"]["code"], "bad_request",
            "{}",
            reply.header
        );
    }

    // Nothing was frozen: the connection still carries bytes both ways.
    s.client.write_all(b"ping").unwrap();
    let mut buf = [0u8; 4];
    s.accepted
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    s.accepted.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"ping");
    s.accepted.write_all(b"pong").unwrap();
    s.client
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    s.client.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"pong");

    // Claims: not built here, then built (prepared) but nothing exported.
    let e = handoff::claim(&b1_sock, c(), 100).unwrap_err();
    assert_eq!(e.code, "not_local", "{e}");
    step(
        &lab,
        &["migrate", "prepare", "--container", C, "--to", "b1"],
    );
    let t = Instant::now();
    let e = handoff::claim(&b1_sock, c(), 300).unwrap_err();
    assert_eq!(e.code, "no_package", "{e}");
    assert!(
        t.elapsed() >= Duration::from_millis(300),
        "the claim waited"
    );
    // Exporting to another host than the migration's.
    step(&lab, &["migrate", "freeze", "--container", C]);
    let e = handoff::export(&a1_sock, c(), "a2", &[s.accepted.as_fd()], b"").unwrap_err();
    assert_eq!(e.code, "wrong_destination", "{e}");
    step(&lab, &["migrate", "abort", "--container", C]);
    lab.down().unwrap();
}

/// One move of the workload (a1 → b1) with the hand-off and an extra freeze, while a
/// stop-and-wait client (one request in flight, like an RPC caller) talks to it through the
/// public address. Returns (the client's longest wait for a reply, the network-frozen window),
/// in ms, after checking every reply and that the connection was never reset.
fn move_with_freeze(lab: &Lab, extra: Duration) -> (f64, f64) {
    let on_a1 = lab.add_container("a1", c()).unwrap();
    step(
        lab,
        &["public", "add", "--public", PUBLIC, "--container", C],
    );
    lab.sync().unwrap();
    let port = PORT.to_string();
    let a1_sock = lab.handoff_socket("a1");
    let b1_sock = lab.handoff_socket("b1");
    let mut server = Proc::start(
        &on_a1,
        &[
            "serve",
            "--port",
            &port,
            "--handoff-socket",
            a1_sock.to_str().unwrap(),
            "--container",
            C,
        ],
    );
    assert_eq!(server.next(Duration::from_secs(5))["event"], "listening");

    // The client: connect from the internet side, then request, wait for the reply, repeat.
    let to: std::net::SocketAddr = format!("{PUBLIC}:{PORT}").parse().unwrap();
    let stream = ferry_overlay::netns::run_in(&lab.netns("inet"), move || {
        TcpStream::connect_timeout(&to, Duration::from_secs(3))
    })
    .unwrap()
    .unwrap();
    stream.set_nodelay(true).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let st = stop.clone();
    let client = std::thread::spawn(move || -> Result<(u64, f64), String> {
        let mut reader = BufReader::new(stream.try_clone().map_err(|e| e.to_string())?);
        let mut w = stream;
        let (mut seq, mut worst) = (0u64, 0f64);
        while !st.load(std::sync::atomic::Ordering::Relaxed) {
            seq += 1;
            let t = Instant::now();
            writeln!(w, "REQ {seq} x").map_err(|e| format!("request {seq}: {e}"))?;
            let mut line = String::new();
            reader
                .read_line(&mut line)
                .map_err(|e| format!("reply {seq}: {e}"))?;
            let want = format!("RES {seq} {seq}");
            if line.trim() != want {
                return Err(format!("reply {seq}: {line:?}, want {want:?}"));
            }
            worst = worst.max(t.elapsed().as_secs_f64() * 1e3);
            ferry_tests::keep_load_for(Duration::from_millis(5)); // the client's pace
        }
        Ok((seq, worst))
    });
    ferry_tests::keep_load_for(Duration::from_millis(500));

    step(lab, &["migrate", "prepare", "--container", C, "--to", "b1"]);
    step(lab, &["migrate", "freeze", "--container", C]);
    let t_frozen = Instant::now();
    ferry_tests::keep_load_for(extra);
    server.say("export b1");
    let exported = server.next(Duration::from_secs(30));
    assert_eq!(exported["ok"], true, "{exported}");
    assert!(server.wait(Duration::from_secs(5)).success());
    let dest = Proc::start(
        &lab.container_netns("b1", c()),
        &[
            "claim",
            "--port",
            &port,
            "--handoff-socket",
            b1_sock.to_str().unwrap(),
            "--container",
            C,
        ],
    );
    assert_eq!(dest.next(Duration::from_secs(15))["ok"], true);
    step(lab, &["migrate", "release", "--container", C]);
    let frozen_ms = t_frozen.elapsed().as_secs_f64() * 1e3;
    ferry_tests::keep_load_for(Duration::from_secs(3));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (requests, worst) = client
        .join()
        .unwrap()
        .expect("every reply, in order, no reset");
    assert!(requests > 100, "{requests} requests");
    drop(dest);
    (worst, frozen_ms)
}

#[test]
fn a_one_second_freeze_costs_the_freeze_with_hold_and_the_back_off_with_drop() {
    if !require_root_and_tools(&["ip", "kill"]) {
        return;
    }
    workspace_binary("ferry-workload");
    let extra = Duration::from_millis(1000);
    let hold_lab = ferry_tests::agents_lab(LabOptions::default());
    let (hold_gap, hold_frozen) = move_with_freeze(&hold_lab, extra);
    hold_lab.down().unwrap();
    let drop_lab = ferry_tests::agents_lab(LabOptions {
        hold_limits: ferry_config::HoldLimits {
            mode: ferry_config::HoldMode::Drop,
            ..Default::default()
        },
        ..LabOptions::default()
    });
    let (drop_gap, drop_frozen) = move_with_freeze(&drop_lab, extra);
    drop_lab.down().unwrap();
    let (hold_over, drop_over) = (hold_gap - hold_frozen, drop_gap - drop_frozen);
    eprintln!(
        "1 s freeze, stop-and-wait client: hold: wait {hold_gap:.1} ms for {hold_frozen:.1} ms \
         frozen (overhead {hold_over:.1}); drop: wait {drop_gap:.1} ms for {drop_frozen:.1} ms \
         frozen (overhead {drop_over:.1})"
    );
    // Both waited out the freeze itself...
    assert!(hold_gap >= 900.0 && drop_gap >= 900.0);
    // ...but only the drop mode also waited for the client's retransmission back-off (its
    // retransmissions at +0.2, +0.6, +1.4 s: the first after the release comes late), while the
    // held request was answered as soon as the container ran again.
    assert!(
        drop_over > hold_over + 100.0,
        "hold overhead {hold_over:.1} ms, drop overhead {drop_over:.1} ms"
    );
}
