//! Hold and release in a real lab, driven through the coordinator's steps
//! (`ferry migrate prepare|freeze|release|abort`): while a container is frozen its packets are
//! held at the destination and released in order at release (or sent back to the source at
//! abort) — none lost, none duplicated, none reordered. A UDP stream with sequence numbers
//! makes every one of those visible.
use std::{
    net::{Ipv4Addr, SocketAddrV4, UdpSocket},
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use ferry_lab::{Lab, LabOptions};
use ferry_tests::{CountersOnPanic, counters, delta, gauge, require_root_and_tools, wait_for};

const PORT: u16 = 9100;
/// Deadline for every wait: generous, because a loaded 2-core machine is slow, and nothing is
/// timed by it (each wait ends as soon as its condition holds).
const DEADLINE: Duration = Duration::from_secs(15);

fn lab() -> Lab {
    ferry_tests::agents_lab(LabOptions::default())
}

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

/// Receives sequence-numbered datagrams in a namespace; records them in arrival order.
struct Receiver {
    got: Arc<Mutex<Vec<u64>>>,
    stop: Arc<AtomicBool>,
    t: Option<JoinHandle<()>>,
}

impl Receiver {
    fn start(ns: &Path) -> Self {
        let s = ferry_overlay::netns::run_in(ns, || UdpSocket::bind((Ipv4Addr::UNSPECIFIED, PORT)))
            .unwrap()
            .unwrap();
        // Released packets arrive as one burst: a default receive buffer (~90 datagrams of
        // this size) would overflow in the receiving socket, not in ferry.
        let size: libc::c_int = 32 << 20;
        // SAFETY: setsockopt with a valid fd, a pointer to a c_int and its size.
        let rc = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&s),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&raw const size).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "SO_RCVBUFFORCE");
        s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
        let got = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (g, st) = (got.clone(), stop.clone());
        let t = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !st.load(Ordering::Relaxed) {
                if let Ok(n) = s.recv(&mut buf)
                    && n >= 8
                {
                    g.lock()
                        .unwrap()
                        .push(u64::from_be_bytes(buf[..8].try_into().unwrap()));
                }
            }
        });
        Self {
            got,
            stop,
            t: Some(t),
        }
    }

    fn got(&self) -> Vec<u64> {
        self.got.lock().unwrap().clone()
    }

    fn len(&self) -> usize {
        self.got.lock().unwrap().len()
    }

    /// Waits until this receiver has `n` datagrams more than it had at `from`.
    fn wait_more(&self, what: &str, from: usize, n: usize) {
        wait_for(what, DEADLINE, || (self.len() >= from + n).then_some(()));
    }
}

/// Waits until the receivers together hold `total` datagrams, or the deadline passes (then
/// the caller's checks say what is missing).
fn settle(total: u64, rx: &[&Receiver]) {
    ferry_tests::poll_until(DEADLINE, || {
        (rx.iter().map(|r| r.len() as u64).sum::<u64>() >= total).then_some(())
    });
}

/// A host's hold queue length; the gauge must be exported.
fn queued(lab: &Lab, host: &str) -> u64 {
    gauge(lab, host, "ferry_hold_queued_packets")
        .unwrap_or_else(|| panic!("{host} exports ferry_hold_queued_packets"))
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.t.take() {
            let _ = t.join();
        }
    }
}

/// Sends datagram n (8-byte sequence number + padding to `size`) every `every`, from `ns`.
struct Sender {
    sent: Arc<Mutex<u64>>,
    stop: Arc<AtomicBool>,
    t: Option<JoinHandle<()>>,
}

impl Sender {
    fn start(ns: &Path, to: SocketAddrV4, every: Duration, size: usize) -> Self {
        let s = ferry_overlay::netns::run_in(ns, move || {
            let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
            s.connect(to)?;
            Ok::<_, std::io::Error>(s)
        })
        .unwrap()
        .unwrap();
        let sent = Arc::new(Mutex::new(0u64));
        let stop = Arc::new(AtomicBool::new(false));
        let (n, st) = (sent.clone(), stop.clone());
        let t = std::thread::spawn(move || {
            let mut buf = vec![0u8; size.max(8)];
            let mut i = 0u64;
            while !st.load(Ordering::Relaxed) {
                buf[..8].copy_from_slice(&i.to_be_bytes());
                if s.send(&buf).is_ok() {
                    i += 1;
                    *n.lock().unwrap() = i;
                }
                ferry_tests::keep_load_for(every); // the stream's pace
            }
        });
        Self {
            sent,
            stop,
            t: Some(t),
        }
    }

    fn stop(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.t.take() {
            let _ = t.join();
        }
        *self.sent.lock().unwrap()
    }
}

/// `ferry migrate STEP --container 10.244.1.10 [--to HOST]`.
fn migrate(lab: &Lab, step_name: &str, to: Option<&str>) -> serde_json::Value {
    let mut args = vec!["migrate", step_name, "--container", "10.244.1.10"];
    if let Some(to) = to {
        args.extend(["--to", to]);
    }
    step(lab, &args)
}

fn step(lab: &Lab, args: &[&str]) -> serde_json::Value {
    lab.ferry_json(args)
        .unwrap_or_else(|e| panic!("ferry {args:?}: {e}"))
}

/// Every number 0..sent exactly once over the receivers; returns how many arrived after a
/// higher number (reordered). Holding keeps the queue's order; the one place a packet can be
/// overtaken is the switch itself (a packet already on its way to the hold device when the
/// entry flips is passed on right after newer ones), so a handful at most.
fn assert_each_once(sent: u64, parts: &[Vec<u64>]) -> usize {
    let mut all: Vec<u64> = parts.iter().flatten().copied().collect();
    let mut reordered = 0;
    for p in parts {
        let mut max = None;
        for &n in p {
            if max.is_some_and(|m| n < m) {
                reordered += 1;
            }
            max = max.max(Some(n));
        }
    }
    all.sort_unstable();
    let want: Vec<u64> = (0..sent).collect();
    let missing: Vec<u64> = want
        .iter()
        .filter(|n| all.binary_search(n).is_err())
        .copied()
        .collect();
    assert!(
        missing.is_empty(),
        "lost {} datagrams: {:?}…",
        missing.len(),
        &missing[..missing.len().min(20)]
    );
    assert_eq!(all.len() as u64, sent, "duplicates");
    reordered
}

/// Container C (10.244.1.10) on a1 with a receiver, and a peer container on b1.
struct Scene {
    c: Ipv4Addr,
    peer: std::path::PathBuf,
    old: Receiver,
}

fn scene(lab: &Lab) -> Scene {
    let c = ip("10.244.1.10");
    let on_a1 = lab.add_container("a1", c).unwrap();
    let peer = lab.add_container("b1", ip("10.244.3.10")).unwrap();
    let old = Receiver::start(&on_a1);
    Scene { c, peer, old }
}

/// The scene with a stream of `size`-byte datagrams every 2 ms from the peer to C, once C
/// receives it.
fn streaming(lab: &Lab, size: usize) -> (Scene, Sender) {
    let sc = scene(lab);
    let tx = Sender::start(
        &sc.peer,
        SocketAddrV4::new(sc.c, PORT),
        Duration::from_millis(2),
        size,
    );
    sc.old
        .wait_more("the container on a1 receives the stream", 0, 20);
    (sc, tx)
}

#[test]
fn frozen_packets_are_held_at_the_destination_and_released_in_order() {
    if !require_root_and_tools(&["ip", "curl"]) {
        return;
    }
    let lab = lab();
    let _diag = CountersOnPanic::new(&lab);
    let (Scene { c, old, .. }, tx) = streaming(&lab, 1400);

    migrate(&lab, "prepare", Some("a2"));
    let on_a2 = lab.container_netns("a2", c);
    assert!(on_a2.exists(), "prepare built the container on a2");
    // The "restored" process: listening at the destination before release.
    let new = Receiver::start(&on_a2);
    let before = counters(&lab, "a2");
    migrate(&lab, "freeze", None);
    let held = wait_for(
        "a2 holds 100 of the frozen container's packets",
        DEADLINE,
        || Some(queued(&lab, "a2")).filter(|&n| n >= 100),
    );
    assert!(
        new.got().is_empty(),
        "nothing reaches the destination before release"
    );
    migrate(&lab, "release", None);
    new.wait_more(
        "the destination receives the held packets and the stream after release",
        0,
        held as usize + 20,
    );
    let sent = tx.stop();
    settle(sent, &[&old, &new]);

    let (old_got, new_got) = (old.got(), new.got());
    assert!(!old_got.is_empty() && !new_got.is_empty());
    assert!(
        old_got.last() < new_got.first(),
        "the source got the early part, the destination the rest"
    );
    let reordered = assert_each_once(sent, &[old_got, new_got]);
    eprintln!("sent {sent}, held {held}, reordered {reordered}");
    assert!(reordered <= 3, "{reordered} reordered");
    let after = counters(&lab, "a2");
    assert!(delta(&before, &after, "hold_queued") >= held);
    assert!(delta(&before, &after, "hold_released") >= held);
    assert_eq!(queued(&lab, "a2"), 0);
    lab.down().unwrap();
}

#[test]
fn abort_after_freeze_sends_the_held_packets_back_to_the_source() {
    if !require_root_and_tools(&["ip", "curl"]) {
        return;
    }
    let lab = lab();
    let _diag = CountersOnPanic::new(&lab);
    let (Scene { c, old, .. }, tx) = streaming(&lab, 200);
    migrate(&lab, "prepare", Some("b1"));
    migrate(&lab, "freeze", None);
    let held = wait_for("b1 holds 50 packets", DEADLINE, || {
        Some(queued(&lab, "b1")).filter(|&n| n >= 50)
    });
    let at_abort = old.len();
    migrate(&lab, "abort", None);
    old.wait_more(
        "the source receives the held packets and the stream after abort",
        at_abort,
        held as usize + 20,
    );
    let sent = tx.stop();
    settle(sent, &[&old]);
    // The source got every datagram, the held ones included.
    let reordered = assert_each_once(sent, &[old.got()]);
    eprintln!("sent {sent}, held {held}, reordered {reordered}");
    assert!(reordered <= 3, "{reordered} reordered");
    assert!(
        !lab.container_netns("b1", c).exists(),
        "b1 removed what it prepared"
    );
    lab.down().unwrap();
}

#[test]
fn hold_queue_overflow_is_counted_and_tcp_recovers() {
    if !require_root_and_tools(&["ip", "curl"]) {
        return;
    }
    use ferry_tests::net::{EchoServer, echo_roundtrip, pattern, tcp_connect};
    let lab = ferry_tests::agents_lab(LabOptions {
        hold_limits: ferry_config::HoldLimits {
            max_packets: 20,
            max_bytes: 1 << 20,
            ..Default::default()
        },
        ..LabOptions::default()
    });
    let _diag = CountersOnPanic::new(&lab);
    let c = ip("10.244.1.10");
    let on_a1 = lab.add_container("a1", c).unwrap();
    let peer = lab.add_container("b1", ip("10.244.3.10")).unwrap();
    let _srv = EchoServer::start(&on_a1, 7000).unwrap();
    let mut conn = tcp_connect(&peer, SocketAddrV4::new(c, 7000), Duration::from_secs(3)).unwrap();
    echo_roundtrip(&mut conn, &pattern(10_000, 1)).unwrap();
    // A UDP stream too, so more than 20 packets arrive while frozen.
    let tx = Sender::start(
        &peer,
        SocketAddrV4::new(c, PORT),
        Duration::from_millis(2),
        200,
    );

    migrate(&lab, "prepare", Some("a2"));
    migrate(&lab, "freeze", None);
    // TCP data sent into the freeze: some of it overflows the 20-packet queue.
    let mut writer = conn.try_clone().unwrap();
    let data = pattern(200_000, 9);
    let w = std::thread::spawn(move || {
        use std::io::Write as _;
        writer.write_all(&data)
    });
    wait_for(
        "the 20-packet queue overflows and says so",
        DEADLINE,
        || (ferry_tests::hold_counter(&lab, "a2", "overflow") > 0).then_some(()),
    );
    assert_eq!(queued(&lab, "a2"), 20, "the queue is full, not over");
    migrate(&lab, "abort", None);
    let _ = tx.stop();
    // TCP retransmits what the overflow dropped: every byte comes back, in order.
    let mut back = vec![0u8; 200_000];
    use std::io::Read as _;
    conn.read_exact(&mut back).expect("the connection recovers");
    assert_eq!(back, pattern(200_000, 9));
    w.join().unwrap().unwrap();
    echo_roundtrip(&mut conn, &pattern(10_000, 3)).unwrap();
    lab.down().unwrap();
}

#[test]
fn drop_mode_drops_what_arrives_while_frozen_and_counts_it() {
    if !require_root_and_tools(&["ip", "curl"]) {
        return;
    }
    let lab = ferry_tests::agents_lab(LabOptions {
        hold_limits: ferry_config::HoldLimits {
            mode: ferry_config::HoldMode::Drop,
            ..Default::default()
        },
        ..LabOptions::default()
    });
    let _diag = CountersOnPanic::new(&lab);
    let (Scene { old, .. }, tx) = streaming(&lab, 200);
    migrate(&lab, "prepare", Some("a2"));
    migrate(&lab, "freeze", None);
    wait_for("a2 drops 50 packets while frozen", DEADLINE, || {
        (ferry_tests::hold_counter(&lab, "a2", "dropped") >= 50).then_some(())
    });
    migrate(&lab, "abort", None);
    let at_abort = old.len();
    old.wait_more("the source receives the stream after abort", at_abort, 20);
    let sent = tx.stop();
    let dropped = ferry_tests::hold_counter(&lab, "a2", "dropped");
    ferry_tests::poll_until(DEADLINE, || {
        ((old.len() as u64) + dropped >= sent).then_some(())
    });
    let got = old.got();
    // Nothing else is lost: what was not dropped (and counted) arrived.
    assert_eq!(
        got.len() as u64 + dropped,
        sent,
        "sent {sent}, got {}, dropped {dropped}",
        got.len()
    );
    lab.down().unwrap();
}

#[test]
fn out_of_order_duplicate_and_malformed_steps_are_refused_without_effect() {
    if !require_root_and_tools(&["ip", "curl"]) {
        return;
    }
    let lab = lab();
    let _diag = CountersOnPanic::new(&lab);
    let (Scene { old, .. }, tx) = streaming(&lab, 200);
    // (arguments, exit code, error code) — each refused, and the stream to the container on
    // a1 goes on untouched.
    let refused: &[(&[&str], i32, &str)] = &[
        (&["migrate", "freeze", "--container", "10.244.1.10"], 1, ""),
        (&["migrate", "release", "--container", "10.244.1.10"], 1, ""),
        (
            &[
                "migrate",
                "prepare",
                "--container",
                "10.244.1.10",
                "--to",
                "a1",
            ],
            1,
            "a1",
        ),
        (
            &[
                "migrate",
                "prepare",
                "--container",
                "10.244.1.10",
                "--to",
                "nosuch",
            ],
            1,
            "nosuch",
        ),
        (
            &[
                "migrate",
                "prepare",
                "--container",
                "10.244.99.99",
                "--to",
                "a2",
            ],
            1,
            "10.244.99.99",
        ),
        (
            &[
                "migrate",
                "prepare",
                "--container",
                "not-an-ip",
                "--to",
                "a2",
            ],
            2,
            "",
        ),
    ];
    let check = |args: &[&str], code: i32, needle: &str| {
        let out = lab.ferry(&[&["--json"], args].concat()).unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {text}");
        assert!(
            text.contains(needle),
            "{args:?} should mention {needle:?}: {text}"
        );
    };
    for (args, code, needle) in refused {
        check(args, *code, needle);
    }
    // Steps out of order once a migration exists; a repeated step changes nothing.
    let p1 = migrate(&lab, "prepare", Some("a2"));
    let p2 = migrate(&lab, "prepare", Some("a2"));
    assert_eq!(p1["migration"]["id"], p2["migration"]["id"]);
    assert_eq!(
        p1["version"], p2["version"],
        "a repeated prepare bumps nothing"
    );
    check(
        &["migrate", "release", "--container", "10.244.1.10"],
        1,
        "bad_phase",
    );
    check(
        &[
            "migrate",
            "prepare",
            "--container",
            "10.244.1.10",
            "--to",
            "b1",
        ],
        1,
        "conflict",
    );
    migrate(&lab, "abort", None);
    check(
        &["migrate", "release", "--container", "10.244.1.10"],
        1,
        "bad_phase",
    );
    let now = old.len();
    old.wait_more("the container on a1 still receives the stream", now, 20);
    let sent = tx.stop();
    settle(sent, &[&old]);
    // Nothing was frozen: every datagram reached the container on a1, in order.
    let reordered = assert_each_once(sent, &[old.got()]);
    assert_eq!(reordered, 0);
    assert_eq!(ferry_tests::hold_counter(&lab, "a2", "held"), 0);
    lab.down().unwrap();
}

/// Holding starts at the freeze, not at prepare: while the migration is only prepared, a
/// container on the destination host still reaches the migrating one at its source (a
/// stream from a2 keeps arriving at a1), and a2's hold queue stays empty; the freeze then
/// holds that stream too.
#[test]
fn a_prepared_destination_still_reaches_the_container_at_its_source() {
    if !require_root_and_tools(&["ip", "curl"]) {
        return;
    }
    let lab = lab();
    let _diag = CountersOnPanic::new(&lab);
    let Scene { c, old, .. } = scene(&lab);
    let neighbour = lab.add_container("a2", ip("10.244.2.20")).unwrap();
    let tx = Sender::start(
        &neighbour,
        SocketAddrV4::new(c, PORT),
        Duration::from_millis(2),
        200,
    );
    old.wait_more("the container on a1 receives the stream from a2", 0, 20);

    migrate(&lab, "prepare", Some("a2"));
    assert!(
        lab.container_netns("a2", c).exists(),
        "prepare built it on a2"
    );
    let at_prepare = old.len();
    old.wait_more(
        "a2's own container still reaches the prepared container at a1",
        at_prepare,
        100,
    );
    assert_eq!(queued(&lab, "a2"), 0, "nothing is held while only prepared");

    migrate(&lab, "freeze", None);
    wait_for(
        "a2 holds its own container's stream once frozen",
        DEADLINE,
        || (queued(&lab, "a2") >= 20).then_some(()),
    );
    migrate(&lab, "abort", None);
    let sent = tx.stop();
    settle(sent, &[&old]);
    assert_each_once(sent, &[old.got()]);
    lab.down().unwrap();
}
