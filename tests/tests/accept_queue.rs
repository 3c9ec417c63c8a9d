//! Servers that accept many short connections, migrated with CRIU (`ferry migrate run`) in a
//! real lab, and the checks before a dump (docs/migration.md, "Before the dump: the drain").
//!
//! - `python3 -m http.server` in a container of the agent's runtime, under a client on the
//!   internet side that opens a new connection per request (4 threads), moved across clouds
//!   and back: every request answered, no connection refused or reset. Without the drain
//!   CRIU refused the listener's queued connections and every run rolled back.
//! - A listener that never accepts: the run fails before anything is frozen, naming the
//!   listener; its waiting connections (and one made during the drain) are intact afterwards.
//!   Then the drain alone through the peer API (`POST`/`DELETE /v1/containers/{ip}/drain`, the
//!   entry point for a CRIU `pre-dump` hook).
//! - A UNIX socket whose peer is outside the container: refused before anything is frozen,
//!   naming both ends; the connection still works.
use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpStream},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use ferry_api::run::{PHASES, RunReport, RunState};
use ferry_lab::{Lab, LabOptions, control::Party};
use ferry_overlay::netns::NetNsGuard;
use ferry_tests::{
    CountersOnPanic, agents_lab, counters, delta, require_root_and_tools, wait_for,
    workload::wait_listening,
};

const C: &str = "10.244.1.10";
const PUBLIC: &str = "203.0.113.130";
const TOOLS: &[&str] = &["ip", "ss", "criu", "curl"];

fn c() -> Ipv4Addr {
    C.parse().unwrap()
}

/// Debian's python3 (the one setup.sh installs; not a version manager's shim).
fn python() -> PathBuf {
    let p = PathBuf::from("/usr/bin/python3");
    assert!(p.exists(), "/usr/bin/python3 needed");
    p
}

/// A lab with container C on a1 and its public address.
fn lab_with_container() -> (Lab, PathBuf) {
    let lab = agents_lab(LabOptions::default());
    let ns = lab.add_container("a1", c()).expect("container on a1");
    lab.ferry_json(&["public", "add", "--public", PUBLIC, "--container", C])
        .expect("public add");
    lab.sync().unwrap();
    (lab, ns)
}

/// `ferry --json migrate run --container C --to HOST`: exit code and report.
fn migrate(lab: &Lab, to: &str) -> (i32, RunReport) {
    let args = ["--json", "migrate", "run", "--container", C, "--to", to];
    let out = lab.ferry(&args).expect("running ferry");
    let (code, report) = ferry_tests::run_report(&format!("ferry {args:?}"), &out);
    for e in report
        .events
        .iter()
        .filter(|e| e.message.starts_with("drain"))
    {
        eprintln!("  {}", e.message);
    }
    (code, report)
}

fn migrate_ok(lab: &Lab, from: &str, to: &str) -> RunReport {
    let (code, r) = migrate(lab, to);
    assert_eq!(
        r.state,
        RunState::Released,
        "{from} -> {to}: {r:?}\nagent logs: {} {}",
        lab.agent_log(from).display(),
        lab.agent_log(to).display()
    );
    assert_eq!(code, 0, "{r:?}");
    let names: Vec<&str> = r.phases.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, PHASES, "{r:?}");
    r
}

/// A run refused or rolled back before anything was frozen: exit 3, no dump, no image.
fn migrate_refused(lab: &Lab, to: &str) -> RunReport {
    let (code, r) = migrate(lab, to);
    assert_eq!(r.state, RunState::RolledBack, "{r:?}");
    assert_eq!(code, 3, "{r:?}");
    assert!(
        !r.phases.iter().any(|p| p.name == "dump"),
        "nothing was dumped: {r:?}"
    );
    assert_eq!((r.stopped_ms, r.image_bytes), (0.0, 0), "{r:?}");
    assert_eq!(lab.endpoint_host(c()).unwrap(), "a1");
    r
}

/// The container's process, running (not stopped) on `host`.
fn running_on(lab: &Lab, host: &str) -> ferry_api::run::ContainerProcess {
    assert_eq!(lab.endpoint_host(c()).unwrap(), host);
    let p = lab
        .process(c())
        .unwrap()
        .unwrap_or_else(|| panic!("no process for {C} on {host}"));
    assert!(p.running && p.fenced.is_none(), "{p:?}");
    let (state, _) = ferry_lab::procs::stat(p.pid).expect("its /proc entry");
    assert!(!matches!(state, 'T' | 't' | 'Z'), "{p:?} is {state}");
    p
}

/// What the per-request client saw.
#[derive(Debug, Default, Clone)]
struct Tally {
    requests: u64,
    answered: u64,
    /// connect() failed (refused, reset, timed out).
    connect_errors: u64,
    /// ECONNRESET (or EPIPE) on an established connection.
    resets: u64,
    /// Any other failure, or an answer that is not `200`.
    other: u64,
    first_errors: Vec<String>,
    /// The slowest request, connect to last byte.
    max_ms: f64,
    /// Requests answered after `mark` was set (by the restored servers).
    answered_after_mark: u64,
}

impl Tally {
    fn add(&mut self, o: &Tally) {
        self.requests += o.requests;
        self.answered += o.answered;
        self.connect_errors += o.connect_errors;
        self.resets += o.resets;
        self.other += o.other;
        self.first_errors.extend(o.first_errors.iter().cloned());
        self.max_ms = self.max_ms.max(o.max_ms);
        self.answered_after_mark += o.answered_after_mark;
    }

    fn error(&mut self, what: String) {
        if self.first_errors.len() < 5 {
            self.first_errors.push(what);
        }
    }
}

/// `threads` threads in namespace `ns`, each opening a new connection per request (an HTTP/1.0
/// GET, read to the end) to `to`, one after the other, until stopped.
struct PerRequestClient {
    stop: Arc<AtomicBool>,
    mark: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Tally>>,
}

impl PerRequestClient {
    fn start(ns: &Path, to: SocketAddrV4, threads: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let mark = Arc::new(AtomicBool::new(false));
        let threads = (0..threads)
            .map(|_| {
                let (ns, stop, mark) = (ns.to_owned(), stop.clone(), mark.clone());
                std::thread::spawn(move || {
                    let _in = NetNsGuard::enter(&ns).expect("entering the client's namespace");
                    let mut t = Tally::default();
                    while !stop.load(Ordering::Relaxed) {
                        one_request(to, &mut t, mark.load(Ordering::Relaxed));
                    }
                    t
                })
            })
            .collect();
        Self {
            stop,
            mark,
            threads,
        }
    }

    fn finish(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Tally::default();
        for t in self.threads {
            all.add(&t.join().expect("a client thread"));
        }
        all
    }
}

fn one_request(to: SocketAddrV4, t: &mut Tally, marked: bool) {
    use std::io::ErrorKind::{BrokenPipe, ConnectionReset};
    t.requests += 1;
    let t0 = Instant::now();
    let mut s = match TcpStream::connect_timeout(&to.into(), Duration::from_secs(10)) {
        Ok(s) => s,
        Err(e) => {
            t.connect_errors += 1;
            t.error(format!("connect: {e}"));
            return;
        }
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = s.set_write_timeout(Some(Duration::from_secs(10)));
    let mut answer = Vec::new();
    let r = s
        .write_all(b"GET / HTTP/1.0\r\nHost: ferry\r\n\r\n")
        .and_then(|()| s.read_to_end(&mut answer));
    match r {
        Ok(_) if answer.starts_with(b"HTTP/1.0 200") => {
            t.answered += 1;
            if marked {
                t.answered_after_mark += 1;
            }
            t.max_ms = t.max_ms.max(t0.elapsed().as_secs_f64() * 1e3);
        }
        Ok(n) => {
            t.other += 1;
            let head = String::from_utf8_lossy(&answer[..n.min(40)]).into_owned();
            t.error(format!("answer {head:?}"));
        }
        Err(e) if matches!(e.kind(), ConnectionReset | BrokenPipe) => {
            t.resets += 1;
            t.error(format!("reset: {e}"));
        }
        Err(e) => {
            t.other += 1;
            t.error(format!("{e}"));
        }
    }
}

/// `python3 -m http.server` (a thread per connection, HTTP/1.0: one request per connection)
/// under four threads that connect per request, moved a1 → b1 (across clouds) and back.
#[test]
fn a_server_accepting_a_connection_per_request_moves_across_clouds_and_back() {
    if !require_root_and_tools(TOOLS) {
        return;
    }
    let (lab, ns) = lab_with_container();
    let _counters = CountersOnPanic::new(&lab);
    let py = python();
    let p = lab
        .start_process(
            c(),
            &[
                py.to_str().unwrap(),
                "-m",
                "http.server",
                "--bind",
                "0.0.0.0",
                "8000",
            ],
        )
        .expect("start http.server");
    eprintln!("http.server: {p:?}");
    wait_listening(&lab, &ns, 8000);
    let to = SocketAddrV4::new(PUBLIC.parse().unwrap(), 8000);
    let client = PerRequestClient::start(&lab.netns("inet"), to, 4);
    ferry_tests::keep_load_for(Duration::from_millis(500));
    let (a1_before, b1_before) = (counters(&lab, "a1"), counters(&lab, "b1"));

    let there = migrate_ok(&lab, "a1", "b1");
    assert_eq!(running_on(&lab, "b1").origin, "restored");
    ferry_tests::keep_load_for(Duration::from_millis(300));
    let back = migrate_ok(&lab, "b1", "a1");
    assert_eq!(running_on(&lab, "a1").origin, "restored");
    client.mark.store(true, Ordering::Relaxed);
    ferry_tests::keep_load_for(Duration::from_millis(300));
    let t = client.finish();

    // New connections that arrived while a source drained waited in its hold device.
    let held = delta(&a1_before, &counters(&lab, "a1"), "hold_syn")
        + delta(&b1_before, &counters(&lab, "b1"), "hold_syn");
    eprintln!(
        "requests {} answered {} (after the runs {}), slowest {:.1} ms, SYNs held by the \
         drains {held}; stopped_ms {:.1} / {:.1}",
        t.requests, t.answered, t.answered_after_mark, t.max_ms, there.stopped_ms, back.stopped_ms
    );
    assert_eq!(
        (t.connect_errors, t.resets, t.other),
        (0, 0, 0),
        "every request answered, nothing refused or reset: {t:?}"
    );
    assert_eq!(t.answered, t.requests, "{t:?}");
    assert!(
        t.answered_after_mark > 0,
        "the restored server answers: {t:?}"
    );
    assert!(held > 0, "the drains held new connections' SYNs");
}

/// The server: listens (backlog 64) and accepts nothing until the go file exists; then echoes
/// one line per connection.
const NEVER_ACCEPTS: &str = r#"
import os, socket, sys, time
go = sys.argv[1]
l = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("0.0.0.0", 7200))
l.listen(64)
while not os.path.exists(go):
    time.sleep(0.02)
while True:
    s, _ = l.accept()
    d = s.recv(100)
    s.sendall(b"echo " + d)
    s.close()
"#;

/// A listener whose queue never drains: the run fails within `[criu] drain_timeout_ms`
/// (2 s), before anything is frozen, naming the listener; the container runs on at the source
/// and its waiting connections, one of them made while the drain held new ones, are intact.
/// Then the drain alone through the peer API: drained once the server accepts; a connection
/// made meanwhile is held, and delivered when the drain is ended.
#[test]
fn a_listener_that_never_accepts_fails_the_run_before_anything_is_frozen() {
    if !require_root_and_tools(TOOLS) {
        return;
    }
    let (lab, ns) = lab_with_container();
    let _counters = CountersOnPanic::new(&lab);
    let go = std::env::temp_dir().join(format!("ferry-accept-go-{}", lab.prefix()));
    let _ = std::fs::remove_file(&go);
    let p = lab
        .start_process(
            c(),
            &[
                python().to_str().unwrap(),
                "-c",
                NEVER_ACCEPTS,
                go.to_str().unwrap(),
            ],
        )
        .expect("start the server");
    wait_listening(&lab, &ns, 7200);
    let to = SocketAddrV4::new(PUBLIC.parse().unwrap(), 7200);
    let inet = lab.netns("inet");
    let connect = |i: usize| {
        let mut s = ferry_tests::net::tcp_connect(&inet, to, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
        s.write_all(format!("hello {i}\n").as_bytes()).unwrap();
        s
    };
    let mut waiting: Vec<TcpStream> = (0..3).map(connect).collect();
    let queued = || {
        let out = lab.exec_in(&ns, &["ss", "-Hltn", "sport = :7200"]).unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.split_whitespace()
            .nth(1)
            .and_then(|q| q.parse::<u32>().ok())
    };
    wait_for(
        "three connections in the accept queue",
        Duration::from_secs(10),
        || (queued() == Some(3)).then_some(()),
    );
    let before = counters(&lab, "a1");

    // The run, and meanwhile a new connection every 20 ms: one made while the drain is on
    // waits in the hold device (hold_syn) and is delivered when the drain ends.
    let handle = Lab::attach(lab.prefix()).unwrap();
    let run = std::thread::spawn(move || migrate_refused(&handle, "b1"));
    while !run.is_finished() {
        waiting.push(connect(waiting.len()));
        ferry_tests::keep_load_for(Duration::from_millis(20));
    }
    let r = run.join().unwrap();
    let e = r.error.clone().unwrap_or_default();
    assert!(
        e.contains("did not drain within 2000 ms: listener 0.0.0.0:7200 still has")
            && e.contains("connection(s) waiting to be accepted")
            && e.contains("nothing was frozen"),
        "{e}"
    );
    let held = delta(&before, &counters(&lab, "a1"), "hold_syn");
    eprintln!(
        "{} connections; SYNs held by the drain: {held}",
        waiting.len()
    );
    assert!(held >= 1, "a connection made during the drain waited");

    // Nothing froze: the same process runs on a1, nothing was ever dropped as a frozen
    // copy's output.
    let after = running_on(&lab, "a1");
    assert_eq!((after.pid, after.origin.as_str()), (p.pid, "started"));
    assert_eq!(delta(&before, &counters(&lab, "a1"), "frozen_source"), 0);
    // Every connection is intact: once the server accepts, each gets its echo.
    std::fs::write(&go, b"go").unwrap();
    for (i, s) in waiting.iter_mut().enumerate() {
        let mut got = String::new();
        s.read_to_string(&mut got)
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
        assert_eq!(got, format!("echo hello {i}\n"));
    }
    let _ = std::fs::remove_file(&go);

    // The drain alone, as a CRIU `pre-dump` hook would ask for it: the operator may (as for
    // the other container routes), another host may not. The server accepts now: drained.
    let route = format!("/v1/containers/{C}/drain");
    let (status, body) = lab
        .agent_request_as(Party::Host("b1"), "a1", "POST", &route, None)
        .unwrap();
    assert_eq!(status, 403, "{}", String::from_utf8_lossy(&body));
    let (status, body) = lab
        .agent_request_as(Party::Operator, "a1", "POST", &route, None)
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    assert_eq!(status, 200, "{v}");
    assert!(v["drained"]["looks"].as_u64() >= Some(1), "{v}");
    // While it is on, a new connection waits in the hold device; ending the drain delivers it.
    let before = counters(&lab, "a1");
    let inet = lab.netns("inet");
    let late = std::thread::spawn(move || {
        let mut s = ferry_tests::net::tcp_connect(&inet, to, Duration::from_secs(10))?;
        s.write_all(b"late\n")?;
        let mut got = String::new();
        s.read_to_string(&mut got).map(|_| got)
    });
    wait_for(
        "the late connection's SYN held",
        Duration::from_secs(10),
        || (delta(&before, &counters(&lab, "a1"), "hold_syn") > 0).then_some(()),
    );
    let (status, body) = lab
        .agent_request_as(Party::Operator, "a1", "DELETE", &route, None)
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    assert_eq!(status, 200, "{v}");
    assert!(v["delivered"].as_u64() >= Some(1), "{v}");
    assert_eq!(
        late.join().unwrap().expect("the late connection"),
        "echo late\n"
    );
    // Ended: a second DELETE finds no drain.
    let (status, body) = lab
        .agent_request_as(Party::Operator, "a1", "DELETE", &route, None)
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    assert_eq!((status, v.get("delivered")), (200, None), "{v}");
}

/// The container's process: connects to the UNIX socket at argv[1] and echoes what comes.
const UNIX_CLIENT: &str = r#"
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
while True:
    d = s.recv(100)
    if not d:
        break
    s.sendall(d)
"#;

/// A UNIX socket whose peer is a process outside the container (here: this test): the run
/// is refused before anything is frozen, naming the container's socket and the peer (its path
/// and the process holding it); the connection works on.
#[test]
fn a_unix_socket_to_a_peer_outside_is_refused_before_anything_is_frozen() {
    if !require_root_and_tools(TOOLS) {
        return;
    }
    let (lab, _ns) = lab_with_container();
    let path = std::env::temp_dir().join(format!("ferry-unix-peer-{}.sock", lab.prefix()));
    let _ = std::fs::remove_file(&path);
    let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind");
    let p = lab
        .start_process(
            c(),
            &[
                python().to_str().unwrap(),
                "-c",
                UNIX_CLIENT,
                path.to_str().unwrap(),
            ],
        )
        .expect("start the container's process");
    let (mut peer, _) = listener.accept().expect("the container connects");
    peer.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let before = counters(&lab, "a1");

    let r = migrate_refused(&lab, "b1");
    let e = r.error.clone().unwrap_or_default();
    let me = std::process::id();
    for want in [
        "unix_peer_outside",
        "its UNIX socket inode",
        "is connected to UNIX socket inode",
        &format!("({})", path.display()),
        &format!("held by pid {me} "),
        "outside the container",
        "refused before anything is frozen",
    ] {
        assert!(e.contains(want), "{want:?} not in: {e}");
    }
    // Untouched: the same process runs on a1, no drain was started, the connection works.
    let after = running_on(&lab, "a1");
    assert_eq!((after.pid, after.origin.as_str()), (p.pid, "started"));
    assert_eq!(delta(&before, &counters(&lab, "a1"), "frozen_source"), 0);
    peer.write_all(b"ping").unwrap();
    let mut got = [0u8; 4];
    peer.read_exact(&mut got).expect("the echo");
    assert_eq!(&got, b"ping");
    drop(peer);
    let _ = std::fs::remove_file(&path);
}
