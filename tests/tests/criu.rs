//! Whole-container migration with CRIU (`ferry migrate run`) in a real lab: the container's
//! process tree (PID 1 of its own PID namespace, started by the agent) is checkpointed at the
//! source, its images streamed to the destination agent and restored there, the endpoint
//! switched with ferry's hold. Live clients on the internet side (through the container's
//! public address) check every reply: `ferry-workload serve` across clouds and back, an
//! unmodified redis-server, a server whose unread and unacknowledged bytes sit in its socket
//! queues during the move, failed dumps and restores that roll back, and ten moves in a row.
//! Timing figures are printed for the log, never asserted.
use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use ferry_api::run::{PHASES, RunReport, RunState};
use ferry_lab::{Lab, LabOptions};
use ferry_tests::{agents_lab, net, require_root_and_tools, wait_for, workspace_binary};
use serde_json::Value;

const C: &str = "10.244.1.10";
const PUBLIC: &str = "203.0.113.130";
const TOOLS: &[&str] = &["ip", "ss", "criu", "redis-server"];

fn c() -> Ipv4Addr {
    C.parse().unwrap()
}

/// A lab with container C on a1, its public address, and `ferry-workload` built.
fn lab_with_container() -> (Lab, PathBuf) {
    workspace_binary("ferry-workload");
    let lab = agents_lab(LabOptions::default());
    let ns = lab.add_container("a1", c()).expect("container on a1");
    lab.ferry_json(&["public", "add", "--public", PUBLIC, "--container", C])
        .expect("public add");
    lab.sync().unwrap();
    (lab, ns)
}

/// `ferry --json migrate run --container C --to HOST [extra]`: the exit code and the report
/// (stdout is the report whatever the exit code: a rolled-back run exits 3).
fn migrate(lab: &Lab, to: &str, extra: &[&str]) -> (i32, RunReport) {
    let mut args = vec!["--json", "migrate", "run", "--container", C, "--to", to];
    args.extend_from_slice(extra);
    let t0 = Instant::now();
    let out = lab.ferry(&args).expect("running ferry");
    eprintln!("wall {:?}", t0.elapsed());
    ferry_tests::run_report(&format!("ferry {args:?}"), &out)
}

/// A migration that must be released, with all six phases and some image bytes.
fn migrate_ok(lab: &Lab, from: &str, to: &str) -> RunReport {
    let (code, r) = migrate(lab, to, &[]);
    assert_eq!(
        r.state,
        RunState::Released,
        "{from} -> {to}: {r:?}\nagent logs: {} {}",
        lab.agent_log(from).display(),
        lab.agent_log(to).display()
    );
    assert_eq!(code, 0, "{r:?}");
    assert_eq!(r.from, from);
    assert_eq!(r.to, to);
    let names: Vec<&str> = r.phases.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, PHASES, "{r:?}");
    assert!(r.image_bytes > 0, "{r:?}");
    assert!(r.error.is_none(), "{r:?}");
    r
}

use ferry_tests::workload::wait_listening;

use ferry_tests::workload::Workload as Client;

fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("no number {k} in {v}"))
}

/// The `ferry-workload serve` client checks: nothing reset, lost or wrong, all alive.
fn assert_client_clean(code: i32, s: &Value, connections: u64) {
    ferry_tests::workload::assert_client_clean("client", code, s, connections);
}

/// `ferry-workload serve --port PORT` in container C, and a client from the internet through
/// the public address until the test stops it, connected.
fn serve_and_client(lab: &Lab, ns: &Path) -> (i32, Client) {
    let workload = workspace_binary("ferry-workload");
    let p = lab
        .start_process(
            c(),
            &[workload.to_str().unwrap(), "serve", "--port", "7000"],
        )
        .expect("start the server");
    eprintln!("server: {p:?}");
    wait_listening(lab, ns, 7000);
    let to = format!("{PUBLIC}:7000");
    let client = Client::start(
        &lab.netns("inet"),
        &[
            "client",
            "--to",
            &to,
            "--connections",
            "4",
            "--interval-ms",
            "5",
            // Until the test stops it (`Client::stop`), however long the moves take.
            "--duration-ms",
            "600000",
            "--json",
        ],
    );
    client.connected(Duration::from_secs(10));
    (p.pid, client)
}

fn running_on(lab: &Lab, host: &str) -> ferry_api::run::ContainerProcess {
    assert_eq!(lab.endpoint_host(c()).unwrap(), host);
    let p = lab
        .process(c())
        .unwrap()
        .unwrap_or_else(|| panic!("no process for {C} on {host}"));
    assert!(p.running, "{p:?}");
    assert!(
        std::path::Path::new(&format!("/proc/{}", p.pid)).exists(),
        "{p:?}"
    );
    p
}

#[test]
fn workload_moves_across_clouds_and_back_with_live_clients() {
    if !require_root_and_tools(TOOLS) {
        return;
    }
    let _machine = ferry_tests::machine_shared();
    let (lab, ns) = lab_with_container();
    let (pid, client) = serve_and_client(&lab, &ns);
    let dev = dev_listing(pid);
    assert!(
        dev.iter().any(|l| l.starts_with("null c 666 0:0 1:3 ")),
        "{dev:#?}"
    );
    ferry_tests::keep_load_for(Duration::from_millis(700));

    let there = migrate_ok(&lab, "a1", "b1");
    let on_b1 = running_on(&lab, "b1");
    eprintln!("on b1: {on_b1:?}");
    assert_eq!(on_b1.origin, "restored");
    // The container's empty /dev/shm came through CRIU's empty-tmpfs record (no tar,
    // scripts/criu-patches/0003): same mode, still empty. Something in it for the way back,
    // which goes through tar.
    use std::os::unix::fs::PermissionsExt;
    let shm = |pid: i32| PathBuf::from(format!("/proc/{pid}/root/dev/shm"));
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    // Its /dev (device nodes, symlinks) came through CRIU's tmpfs record too, entry for
    // entry as tar kept it.
    assert_eq!(dev_listing(on_b1.pid), dev, "the restored /dev");
    assert_eq!(
        mode(&shm(on_b1.pid)),
        0o1777,
        "the restored /dev/shm's mode"
    );
    assert_eq!(std::fs::read_dir(shm(on_b1.pid)).unwrap().count(), 0);
    std::fs::write(shm(on_b1.pid).join("kept"), b"moved with the tmpfs").unwrap();
    ferry_tests::keep_load_for(Duration::from_millis(500));
    let back = migrate_ok(&lab, "b1", "a1");
    let on_a1 = running_on(&lab, "a1");
    eprintln!("back on a1: {on_a1:?} (first started as PID {pid})");
    assert_eq!(on_a1.origin, "restored");
    // PID 1 of its own PID namespace again.
    let status = std::fs::read_to_string(format!("/proc/{}/status", on_a1.pid)).unwrap();
    let nspid: Vec<&str> = status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(nspid.last(), Some(&"1"), "NSpid: {nspid:?}");
    assert_eq!(dev_listing(on_a1.pid), dev, "/dev after the way back");
    assert_eq!(mode(&shm(on_a1.pid)), 0o1777);
    assert_eq!(
        std::fs::read(shm(on_a1.pid).join("kept")).unwrap(),
        b"moved with the tmpfs"
    );

    // CRIU cached its kernel probes: set-up builds it to keep the cache in /run/criu, the
    // agents put that directory on a tmpfs, and the dumps and restores wrote the cache there
    // (no restore probes the kernel inside the frozen window).
    let criu = std::fs::read(ferry_tests::which("criu").unwrap()).unwrap();
    assert!(
        criu.windows(20).any(|w| w == b"/run/criu/criu.kdat\0"),
        "the installed CRIU does not keep its cache in /run/criu (built without \
         RUNDIR=/run/criu: run scripts/setup.sh)"
    );
    let fs = std::process::Command::new("stat")
        .args(["-f", "-c", "%T", "/run/criu"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&fs.stdout).trim(), "tmpfs");
    let kdat = std::fs::metadata("/run/criu/criu.kdat").expect("CRIU's cache after two moves");
    assert!(kdat.len() > 0);

    // Load on the restored server, then the client ends.
    ferry_tests::keep_load_for(Duration::from_millis(500));
    let (code, s) = client.stop(Duration::from_secs(20));
    eprintln!(
        "figures: max_gap_ms {} retransmits {}, stopped_ms {:.1} / {:.1}",
        s["max_gap_ms"], s["retransmits"], there.stopped_ms, back.stopped_ms
    );
    assert_client_clean(code, &s, 4);
}

/// Every entry of a process's /dev (not into /dev/shm, a tmpfs of its own): name, type,
/// mode, owner, device number, link target and mtime (not /dev/shm's).
fn dev_listing(pid: i32) -> Vec<String> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let root = PathBuf::from(format!("/proc/{pid}/root/dev"));
    let mut out = Vec::new();
    let mut todo = vec![PathBuf::new()];
    while let Some(rel) = todo.pop() {
        for e in std::fs::read_dir(root.join(&rel)).unwrap() {
            let e = e.unwrap();
            let name = rel.join(e.file_name());
            let m = std::fs::symlink_metadata(e.path()).unwrap();
            let t = m.file_type();
            let kind = if t.is_dir() {
                "d"
            } else if t.is_symlink() {
                "l"
            } else if t.is_char_device() {
                "c"
            } else if t.is_block_device() {
                "b"
            } else {
                "f"
            };
            let target = std::fs::read_link(e.path())
                .map(|p| p.display().to_string())
                .unwrap_or_default();
            let rdev = m.rdev();
            out.push(format!(
                "{} {kind} {:o} {}:{} {}:{} {target} {}",
                name.display(),
                m.mode() & 0o7777,
                m.uid(),
                m.gid(),
                libc::major(rdev),
                libc::minor(rdev),
                // /dev/shm's root is a tmpfs of its own, written to by the test.
                if name == Path::new("shm") {
                    0
                } else {
                    m.mtime()
                }
            ));
            if t.is_dir() && name != Path::new("shm") {
                todo.push(name);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn redis_server_moves_with_a_live_client() {
    if !require_root_and_tools(TOOLS) {
        return;
    }
    let _machine = ferry_tests::machine_shared();
    let (lab, ns) = lab_with_container();
    let redis = ferry_tests::which("redis-server").unwrap();
    let p = lab
        .start_process(
            c(),
            &[
                redis.to_str().unwrap(),
                "--port",
                "6379",
                "--bind",
                "0.0.0.0",
                "--protected-mode",
                "no",
                "--daemonize",
                "no",
                "--supervised",
                "no",
                "--save",
                "",
                "--appendonly",
                "no",
                "--logfile",
                "",
            ],
        )
        .expect("start redis-server");
    eprintln!("redis: {p:?}");
    wait_listening(&lab, &ns, 6379);
    let samples = std::env::temp_dir().join(format!("ferry-criu-redis-{}.csv", lab.prefix()));
    let to = format!("{PUBLIC}:6379");
    let client = Client::start(
        &lab.netns("inet"),
        &[
            "redis-client",
            "--to",
            &to,
            "--connections",
            "2",
            "--interval-ms",
            "5",
            // Runs until stopped below: how long the move takes is not this test's business.
            "--duration-ms",
            "600000",
            "--samples",
            samples.to_str().unwrap(),
            "--json",
        ],
    );
    client.connected(Duration::from_secs(10));
    ferry_tests::keep_load_for(Duration::from_millis(800));
    let r = migrate_ok(&lab, "a1", "b1");
    let on_b1 = running_on(&lab, "b1");
    assert_eq!(on_b1.origin, "restored");
    ferry_tests::keep_load_for(Duration::from_millis(500));
    let (code, s) = client.stop(Duration::from_secs(20));

    // Requests sent after the run ended were answered (by the restored server, whose
    // counters the client checks to go on by exactly one).
    let end_ms = r.started_unix_ms + r.total_ms;
    let csv = std::fs::read_to_string(&samples).unwrap();
    let _ = std::fs::remove_file(&samples);
    let (mut before, mut after) = ([0u64; 2], [0u64; 2]);
    for line in csv.lines() {
        let cols: Vec<&str> = line.split(',').collect();
        let Some(t) = cols.first().and_then(|t| t.parse::<f64>().ok()) else {
            continue;
        };
        let conn: usize = cols[1].parse().unwrap();
        let answered = cols.get(3).is_some_and(|l| !l.trim().is_empty());
        if answered && t < r.started_unix_ms {
            before[conn] += 1;
        }
        if answered && t > end_ms {
            after[conn] += 1;
        }
    }
    eprintln!(
        "redis: {before:?} answered before the run, {after:?} after it (per connection); \
         max_gap_ms {}, stopped_ms {:.1}",
        s["max_gap_ms"], r.stopped_ms
    );
    assert_eq!(u(&s, "reconnects"), 0, "{s}");
    assert_eq!(u(&s, "resets"), 0, "{s}");
    assert_eq!(u(&s, "errors"), 0, "{s}");
    assert_eq!(u(&s, "mismatches"), 0, "{s}");
    assert_eq!(u(&s, "alive"), 2, "{s}");
    assert_eq!(code, 0, "{s}");
    // Each connection's counter: INCR is one command in five, each checked by the client to
    // be exactly the previous value + 1; so a final counter beyond what the requests answered
    // before the run could reach went on in the restored server's memory.
    let finals: Vec<u64> = s["final_counter"]
        .as_array()
        .unwrap_or_else(|| panic!("final_counter in {s}"))
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(finals.len(), 2, "{s}");
    for i in 0..2 {
        assert!(
            after[i] >= 10,
            "connection {i}: {} answered after the run",
            after[i]
        );
        assert!(
            finals[i] > before[i] / 5 + 1,
            "connection {i}: final counter {} with {} answered before the run",
            finals[i],
            before[i]
        );
    }
}

/// Bytes the server sends right after accepting: far more than the client's receive window
/// while it reads nothing, so at the dump most of them are still in the server's send queue
/// (unsent or unacknowledged).
const B_LEN: usize = 1 << 20;

/// The server: accepts one connection, sends `B_LEN` bytes of pattern B (on a thread: it
/// blocks while the client does not read), reads nothing until the go file exists, then reads
/// exactly 64 KiB and echoes them after B.
const HOLDING_SERVER: &str = r#"
import os, socket, sys, threading, time
go, n = sys.argv[1], int(sys.argv[2])
l = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("0.0.0.0", 7100))
l.listen(1)
s, _ = l.accept()
t = threading.Thread(target=lambda: s.sendall(bytes((i * 7 + 3) % 251 for i in range(n))))
t.start()
while not os.path.exists(go):
    time.sleep(0.05)
buf = b""
while len(buf) < 65536:
    d = s.recv(65536 - len(buf))
    if not d:
        break
    buf += d
t.join()
s.sendall(buf)
while True:
    time.sleep(3600)
"#;

#[test]
fn unread_and_unacked_data_moves_intact() {
    if !require_root_and_tools(TOOLS) {
        return;
    }
    let _machine = ferry_tests::machine_shared();
    let (lab, ns) = lab_with_container();
    let python = Path::new("/usr/bin/python3");
    assert!(python.exists(), "/usr/bin/python3 needed");
    let go = std::env::temp_dir().join(format!("ferry-criu-go-{}", lab.prefix()));
    let _ = std::fs::remove_file(&go);
    let p = lab
        .start_process(
            c(),
            &[
                python.to_str().unwrap(),
                "-c",
                HOLDING_SERVER,
                go.to_str().unwrap(),
                &B_LEN.to_string(),
            ],
        )
        .expect("start the python server");
    eprintln!("python server: {p:?}");
    wait_listening(&lab, &ns, 7100);

    let to = SocketAddrV4::new(PUBLIC.parse().unwrap(), 7100);
    let mut s = net::tcp_connect(&lab.netns("inet"), to, Duration::from_secs(5)).expect("connect");
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let a: Vec<u8> = (0..65536u32).map(|i| ((i * 13 + 5) % 241) as u8).collect();
    let b: Vec<u8> = (0..B_LEN as u32)
        .map(|i| ((i * 7 + 3) % 251) as u8)
        .collect();
    s.write_all(&a)
        .expect("writing 64 KiB the server does not read yet");
    let ss = |ns: &Path| {
        let out = lab
            .exec_in(ns, &["ss", "-tnei", "( sport = :7100 or dport = :7100 )"])
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // (Recv-Q, Send-Q) of the server's connection.
    let queues = |text: &str| -> (u64, u64) {
        let l = text
            .lines()
            .find(|l| l.starts_with("ESTAB"))
            .unwrap_or_else(|| panic!("no connection in {text}"));
        let f: Vec<&str> = l.split_whitespace().collect();
        (f[1].parse().unwrap(), f[2].parse().unwrap())
    };
    // Wait until the bytes have settled into the queues, then show them.
    let before = ferry_tests::wait_for(
        "the client's 64 KiB in the server's receive queue, B in its send queue",
        Duration::from_secs(15),
        || {
            let text = ss(&ns);
            let (r, w) = queues(&text);
            (r == 65536 && w > 0).then_some(text)
        },
    );
    eprintln!("container sockets before the run:\n{before}");
    let (recv_q, send_q) = queues(&before);
    assert_eq!(
        recv_q, 65536,
        "the server's receive queue holds the client's bytes"
    );
    assert!(send_q > 0, "the server's send queue holds some of B");

    let r = migrate_ok(&lab, "a1", "b1");
    eprintln!("stopped_ms {:.1}", r.stopped_ms);
    let on_b1 = running_on(&lab, "b1");
    assert_eq!(on_b1.origin, "restored");
    let after = ss(&lab.container_netns("b1", c()));
    eprintln!("container sockets after the run (b1):\n{after}");
    // The unread bytes are all there; the send queue still holds B (the server's sending
    // thread may have queued more since: the restored socket's buffer limits differ).
    let (recv_after, send_after) = queues(&after);
    assert_eq!(recv_after, recv_q, "the server's receive queue as it was");
    assert!(send_after > 0, "the server's send queue still holds B");

    std::fs::write(&go, b"go").unwrap();
    let mut got = vec![0u8; B_LEN + 65536];
    let t_read = Instant::now();
    let read = s.read_exact(&mut got);
    let _ = std::fs::remove_file(&go);
    read.expect("reading B and the echo of A after the move");
    eprintln!(
        "read {} B after the go in {:?}; container sockets now (b1):\n{}",
        got.len(),
        t_read.elapsed(),
        ss(&lab.container_netns("b1", c()))
    );
    if let Some(k) = (0..B_LEN).find(|&k| got[k] != b[k]) {
        panic!("pattern B (queued during the move) differs first at byte {k}");
    }
    if let Some(k) = (0..65536).find(|&k| got[B_LEN + k] != a[k]) {
        panic!("the echo of A (unread during the move) differs first at byte {k}");
    }
    // Still the same connection, still alive.
    assert!(running_on(&lab, "b1").running);
}

#[test]
fn failed_dump_and_failed_restore_roll_back() {
    if !require_root_and_tools(TOOLS) {
        return;
    }
    let _machine = ferry_tests::machine_shared();
    let (lab, ns) = lab_with_container();
    let (pid, client) = serve_and_client(&lab, &ns);
    ferry_tests::keep_load_for(Duration::from_millis(500));

    for (fail, wait) in [("dump", 500), ("restore", 500)] {
        let (code, r) = migrate(&lab, "b1", &["--fail", fail]);
        assert_eq!(
            r.state,
            RunState::RolledBack,
            "--fail {fail}: {r:?}\nagent logs: {} {}",
            lab.agent_log("a1").display(),
            lab.agent_log("b1").display()
        );
        assert_eq!(code, 3, "--fail {fail}: {r:?}");
        assert!(r.error.is_some(), "{r:?}");
        let p = running_on(&lab, "a1");
        eprintln!("after --fail {fail}: {p:?}");
        assert_eq!(p.pid, pid, "--fail {fail}: the source's tree resumed");
        assert_eq!(p.origin, "started");
        ferry_tests::keep_load_for(Duration::from_millis(wait));
    }
    let r = migrate_ok(&lab, "a1", "b1");
    eprintln!("then released, stopped_ms {:.1}", r.stopped_ms);
    assert_eq!(running_on(&lab, "b1").origin, "restored");

    // Load on the restored server, then the client ends.
    ferry_tests::keep_load_for(Duration::from_millis(500));
    let (code, s) = client.stop(Duration::from_secs(20));
    eprintln!("max_gap_ms {}", s["max_gap_ms"]);
    assert_client_clean(code, &s, 4);
}

/// The source opens the images' connection to the destination's agent before it drains or
/// dumps: a destination it cannot reach (here: its agent's port refuses the source host, while
/// the gateway still reaches both) is found while the container still runs. Nothing is frozen,
/// the run rolls back, the client sees nothing; once the port is open again the same move works.
#[test]
fn an_unreachable_destination_agent_is_found_before_anything_freezes() {
    if !require_root_and_tools(&["ip", "ss", "criu", "nft"]) {
        return;
    }
    let _machine = ferry_tests::machine_shared();
    let (lab, ns) = lab_with_container();
    let (pid, client) = serve_and_client(&lab, &ns);
    ferry_tests::keep_load_for(Duration::from_millis(300));
    let a1 = lab.topology().host("a1").unwrap().address.to_string();
    let nft = |args: &str| {
        let out = lab.exec("b1", &["nft", args]).expect("nft");
        assert!(out.status.success(), "nft {args}: {out:?}");
    };
    nft("add table inet ferry_test");
    nft("add chain inet ferry_test input { type filter hook input priority -10 ; }");
    nft(&format!(
        "add rule inet ferry_test input ip saddr {a1} tcp dport {} reject with tcp reset",
        ferry_lab::lab::AGENT_API_PORT
    ));

    let (code, r) = migrate(&lab, "b1", &[]);
    assert_eq!(r.state, RunState::RolledBack, "{r:?}");
    assert_eq!(code, 3, "{r:?}");
    let e = r.error.clone().unwrap_or_default();
    assert!(
        e.contains("cannot be reached") && e.contains("nothing was frozen"),
        "{e}"
    );
    let names: Vec<&str> = r.phases.iter().map(|p| p.name.as_str()).collect();
    assert!(!names.contains(&"dump"), "CRIU ran: {names:?}");
    assert_eq!(r.stopped_ms, 0.0, "{r:?}");
    let p = running_on(&lab, "a1");
    assert_eq!((p.pid, p.origin.as_str()), (pid, "started"), "{p:?}");

    nft("delete table inet ferry_test");
    ferry_tests::keep_load_for(Duration::from_millis(300));
    let r = migrate_ok(&lab, "a1", "b1");
    eprintln!("then released, stopped_ms {:.1}", r.stopped_ms);
    ferry_tests::keep_load_for(Duration::from_millis(300));
    let (code, s) = client.stop(Duration::from_secs(20));
    assert_client_clean(code, &s, 4);
}

#[test]
fn ten_migrations_in_a_row() {
    if !require_root_and_tools(TOOLS) {
        return;
    }
    let _machine = ferry_tests::machine_shared();
    let (lab, ns) = lab_with_container();
    // Long enough for ten runs on a slow machine; SIGTERM ends it early (it then drains).
    let (_pid, client) = serve_and_client(&lab, &ns);
    ferry_tests::keep_load_for(Duration::from_millis(500));
    let paws_before = client_tcp_stat(&lab, "PAWSEstab");
    let mut stopped = Vec::new();
    let t0 = Instant::now();
    for i in 0..10 {
        let (from, to) = if i % 2 == 0 {
            ("a1", "b1")
        } else {
            ("b1", "a1")
        };
        let r = migrate_ok(&lab, from, to);
        stopped.push(r.stopped_ms);
        running_on(&lab, to);
        ferry_tests::keep_load_for(Duration::from_millis(300));
    }
    eprintln!(
        "ten runs in {:?}; stopped_ms: {:?}",
        t0.elapsed(),
        stopped
            .iter()
            .map(|s| format!("{s:.1}"))
            .collect::<Vec<_>>()
    );
    // End the client now: SIGTERM (it stops sending and drains what is owed).
    let (code, s) = client.stop(Duration::from_secs(20));
    eprintln!("max_gap_ms {}", s["max_gap_ms"]);
    assert_client_clean(code, &s, 4);
    // Not one segment of a restored connection was discarded by the client as older than
    // what it had already seen (PAWS): the source's kernel emitted nothing after the
    // checkpoint took the connections' timestamps. Such a discard costs the restored socket
    // a retransmission timeout (a first RTO of 1 s: it has no RTT sample yet).
    let paws = client_tcp_stat(&lab, "PAWSEstab") - paws_before;
    assert_eq!(
        paws, 0,
        "the client discarded {paws} segments of restored connections (PAWS)"
    );
}

/// The MSS the container's busiest connection on port 5201 sends with (`ss -ti`: `mss:`),
/// in its namespace on `host`.
fn sending_mss(lab: &ferry_lab::Lab, host: &str) -> u32 {
    let ns = lab.container_netns(host, c());
    let out = lab
        .exec_in(
            &ns,
            &["ss", "-Htin", "state", "established", "sport = :5201"],
        )
        .expect("ss");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // One info line per connection (indented): the data connection has sent the most.
    let field = |line: &str, name: &str| -> Option<u64> {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .and_then(|v| v.parse().ok())
    };
    text.lines()
        .filter(|l| l.starts_with(char::is_whitespace))
        .filter_map(|l| Some((field(l, "mss:")?, field(l, "bytes_sent:").unwrap_or(0))))
        .max_by_key(|(_, sent)| *sent)
        .map(|(mss, _)| mss as u32)
        .unwrap_or_else(|| panic!("no connection on port 5201 in {}: {text}", ns.display()))
}

/// A TcpExt counter (`/proc/net/netstat`) of the internet namespace, where the client runs.
fn client_tcp_stat(lab: &ferry_lab::Lab, name: &str) -> i64 {
    let out = lab
        .exec("inet", &["cat", "/proc/net/netstat"])
        .expect("netstat");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines = text.lines();
    while let (Some(head), Some(values)) = (lines.next(), lines.next()) {
        if !head.starts_with("TcpExt:") {
            continue;
        }
        let names = head.split_whitespace().skip(1);
        let values = values.split_whitespace().skip(1);
        for (n, v) in names.zip(values) {
            if n == name {
                return v.parse().expect("a number");
            }
        }
    }
    panic!("no TcpExt {name} in /proc/net/netstat: {text}");
}

/// `ferry --json ARGS`: the exit code and the JSON on stdout (a report or an error body).
fn ferry_any(lab: &Lab, args: &[&str]) -> (i32, Value) {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = lab.ferry(&all).expect("running ferry");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let v = serde_json::from_str(stdout.trim()).unwrap_or(Value::Null);
    (out.status.code().unwrap_or(-1), v)
}

/// Bad requests to `ferry migrate run` and to the agents' checkpoint and image APIs get a
/// clear error, change nothing, and a live client through the public address notices nothing;
/// a real migration still works afterwards.
#[test]
fn migrate_run_refuses_bad_input_and_leaves_connections_intact() {
    if !require_root_and_tools(TOOLS) {
        return;
    }
    let _machine = ferry_tests::machine_shared();
    let (lab, ns) = lab_with_container();
    let (pid, client) = serve_and_client(&lab, &ns);
    let code_of = |v: &Value| v["error"]["code"].as_str().unwrap_or("").to_owned();

    // Unknown container, unknown host, the host it is on: refused before anything is prepared.
    for (args, want) in [
        (
            vec!["migrate", "run", "--container", "10.244.9.9", "--to", "b1"],
            "unknown_endpoint",
        ),
        (
            vec!["migrate", "run", "--container", C, "--to", "nosuch"],
            "unknown_host",
        ),
        (
            vec!["migrate", "run", "--container", C, "--to", "a1"],
            "bad_request",
        ),
    ] {
        let (code, v) = ferry_any(&lab, &args);
        assert_eq!(code, 1, "{args:?}: {v}");
        assert_eq!(code_of(&v), want, "{args:?}: {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{v}"
        );
    }
    // Not an address at all: a usage error.
    let (code, _) = ferry_any(
        &lab,
        &["migrate", "run", "--container", "nope", "--to", "b1"],
    );
    assert_eq!(code, 2);
    let (code, v) = ferry_any(&lab, &["migrate", "status"]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(
        v.as_array().map(Vec::len),
        Some(0),
        "nothing was prepared: {v}"
    );

    // A container with no process to checkpoint: the run rolls back, naming why.
    let idle = "10.244.1.11";
    lab.add_container("a1", idle.parse().unwrap())
        .expect("idle container");
    lab.sync().unwrap();
    let (code, v) = ferry_any(&lab, &["migrate", "run", "--container", idle, "--to", "b1"]);
    assert_eq!(code, 3, "{v}");
    assert_eq!(v["state"], "rolled_back", "{v}");
    assert!(
        v["error"]
            .as_str()
            .is_some_and(|e| e.contains("no_process")),
        "{v}"
    );
    assert_eq!(lab.endpoint_host(idle.parse().unwrap()).unwrap(), "a1");

    // The agents' APIs (as the gateway, their only caller of these routes): an unknown
    // migration, a body that is not a request, a stream that is not an image stream.
    let gw = ferry_lab::control::Party::Gateway;
    let (status, body) = lab
        .agent_request_as(gw, "a1", "POST", "/v1/checkpoint/m999", Some(b"{}"))
        .unwrap();
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
    let req = serde_json::json!({
        "container": C, "to": "b1", "to_api": "198.18.2.10:7401", "lock": "hold"
    })
    .to_string();
    let (status, body) = lab
        .agent_request_as(
            gw,
            "a1",
            "POST",
            "/v1/checkpoint/m999",
            Some(req.as_bytes()),
        )
        .unwrap();
    let body = String::from_utf8_lossy(&body).into_owned();
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("unknown_migration"), "{body}");
    let (status, body) = lab
        .agent_request_as(
            gw,
            "b1",
            "POST",
            "/v1/images/m999",
            Some(b"GET / HTTP/1.1\r\n\r\n"),
        )
        .unwrap();
    let body = String::from_utf8_lossy(&body).into_owned();
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("unknown_migration"), "{body}");
    // A migration id that is not `m<n>` never names a work directory: refused as such.
    for (host, method, path, body) in [
        (
            "a1",
            "POST",
            "/v1/checkpoint/..%2F..%2Ftmp%2Fx",
            Some(req.as_bytes()),
        ),
        ("b1", "POST", "/v1/images/..%2Fx", Some(&b"FERRYIMG1\n"[..])),
        ("b1", "GET", "/v1/restores/..", None),
    ] {
        let (status, answer) = lab.agent_request_as(gw, host, method, path, body).unwrap();
        let answer = String::from_utf8_lossy(&answer).into_owned();
        assert_eq!(status, 400, "{method} {path}: {answer}");
        assert!(
            answer.contains("is not m<number>"),
            "{method} {path}: {answer}"
        );
    }
    // The server was never touched.
    let p = running_on(&lab, "a1");
    assert_eq!(p.pid, pid);

    // Two runs of the same container at once: one moves it, the other is refused.
    let lab = std::sync::Arc::new(lab);
    let l2 = lab.clone();
    let first = std::thread::spawn(move || {
        ferry_any(&l2, &["migrate", "run", "--container", C, "--to", "b1"])
    });
    let (code2, v2) = ferry_any(&lab, &["migrate", "run", "--container", C, "--to", "b1"]);
    let (code1, v1) = first.join().unwrap();
    // Whichever reached the gateway first moves it; the other is refused.
    let (winner, loser) = if code1 == 0 {
        ((code1, v1), (code2, v2))
    } else {
        ((code2, v2), (code1, v1))
    };
    assert_eq!(winner.0, 0, "one run moves it: {}", winner.1);
    assert_eq!(winner.1["state"], "released", "{}", winner.1);
    assert_eq!(loser.0, 1, "the other run is refused: {}", loser.1);
    running_on(&lab, "b1");

    // Load on the restored server, then the client ends.
    ferry_tests::keep_load_for(Duration::from_millis(500));
    let (code, s) = client.stop(Duration::from_secs(20));
    assert_client_clean(code, &s, 4);
}

/// Hosts (a1, b1) where a process of container C runs (not stopped): must be exactly one.
fn running_copies(lab: &Lab) -> Vec<String> {
    ["a1", "b1"]
        .into_iter()
        .filter(|h| {
            let Ok(id) = ferry_lab::procs::ns_id(&lab.container_netns(h, c())) else {
                return false;
            };
            ferry_lab::procs::pids_in_netns(&std::collections::HashSet::from([id]))
                .into_iter()
                .any(|p| matches!(ferry_lab::procs::stat(p), Ok((s, _)) if !matches!(s, 'T' | 't' | 'Z' | 'X')))
        })
        .map(str::to_owned)
        .collect()
}

/// A tmpfs record (CRIU patch 0003) forged between the transfer and the restore, so that an
/// entry would be created through a symlink pointing out of the container: the restore refuses
/// it, the run rolls back, the source's copy runs on, and nothing is written where the symlink
/// points.
#[test]
fn a_forged_tmpfs_record_fails_the_restore_and_writes_nothing_outside() {
    if !require_root_and_tools(TOOLS) {
        return;
    }
    let _machine = ferry_tests::machine_shared();
    let (lab, ns) = lab_with_container();
    let (pid, client) = serve_and_client(&lab, &ns);
    let outside = tempfile::tempdir().unwrap();
    let armed = lab.fault_dir().join("restore");
    let reached = lab.fault_dir().join("restore.reached");
    std::fs::write(&armed, b"").unwrap();
    let handle = Lab::attach(lab.prefix()).unwrap();
    let run = std::thread::spawn(move || migrate(&handle, "b1", &[]));
    wait_for(
        "the destination holds the images before criu restore",
        Duration::from_secs(30),
        || reached.exists().then_some(()),
    );
    // Every tmpfs record of the images becomes: the root, a symlink `l` to a directory
    // outside, and `l/planted` (a file through the symlink).
    let mut forged = 0;
    for e in walk(&lab.criu_work_dir("b1")) {
        let bytes = std::fs::read(&e).unwrap_or_default();
        if bytes.starts_with(b"ferry-tmpfs-tree-v1\0") {
            std::fs::write(&e, forged_record(outside.path())).unwrap();
            forged += 1;
        }
    }
    std::fs::remove_file(&armed).unwrap();
    let (code, r) = run.join().unwrap();
    assert!(forged > 0, "no tmpfs record among the images");
    assert_eq!(r.state, RunState::RolledBack, "{r:?}");
    assert_eq!(code, 3);
    assert!(
        std::fs::read_dir(outside.path()).unwrap().next().is_none(),
        "the forged record wrote outside the container"
    );
    assert_eq!(running_on(&lab, "a1").pid, pid, "the source's copy runs on");
    let (code, s) = client.stop(Duration::from_secs(20));
    assert_client_clean(code, &s, 4);
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// A tmpfs record (`struct tree_hdr`, then `struct tree_ent`s with their path and target, as
/// in scripts/criu-patches/0003) with a file created through a symlink to `outside`.
fn forged_record(outside: &Path) -> Vec<u8> {
    let entry = |mode: u32, path: &str, target: &str| {
        let mut e = Vec::new();
        for v in [mode, 0, 0, 0] {
            e.extend_from_slice(&v.to_ne_bytes());
        }
        e.extend_from_slice(&0u64.to_ne_bytes()); // rdev
        e.extend_from_slice(&0i64.to_ne_bytes()); // mtime
        e.extend_from_slice(&(path.len() as u16).to_ne_bytes());
        e.extend_from_slice(&(target.len() as u16).to_ne_bytes());
        e.extend_from_slice(&0u32.to_ne_bytes());
        e.extend_from_slice(path.as_bytes());
        e.extend_from_slice(target.as_bytes());
        e
    };
    let mut r = b"ferry-tmpfs-tree-v1\0".to_vec();
    r.extend_from_slice(&3u32.to_ne_bytes());
    r.extend(entry(libc::S_IFDIR | 0o1777, "", ""));
    r.extend(entry(
        libc::S_IFLNK | 0o777,
        "l",
        &outside.display().to_string(),
    ));
    r.extend(entry(libc::S_IFREG | 0o644, "l/planted", ""));
    r
}

/// The gateway SIGKILLed right after each transition it persists (prepare, each half of the
/// freeze, release, abort) and started again: the run resumes on its own to a terminal state
/// (`released` or `rolled_back`, never lost), exactly one copy runs, on the registry's
/// endpoint host, and the client sees no reset and no lost byte.
#[test]
fn a_gateway_killed_after_each_persisted_transition_resumes_the_run() {
    if !require_root_and_tools(TOOLS) {
        return;
    }
    let _machine = ferry_tests::machine_shared();
    let (mut lab, ns) = lab_with_container();
    let (_pid, client) = serve_and_client(&lab, &ns);
    let mut here = "a1";
    for (point, extra) in [
        ("prepare", &[][..]),
        ("frozen", &[][..]),
        ("switched", &[][..]),
        ("released", &[][..]),
        ("aborted", &["--fail", "restore"][..]),
    ] {
        let to = if here == "a1" { "b1" } else { "a1" };
        let armed = lab.fault_dir().join(point);
        let reached = lab.fault_dir().join(format!("{point}.reached"));
        std::fs::write(&armed, b"").unwrap();
        let handle = Lab::attach(lab.prefix()).unwrap();
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let run = std::thread::spawn(move || {
            let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
            migrate(&handle, to, &extra)
        });
        wait_for(
            &format!("the gateway reaches {point}"),
            Duration::from_secs(30),
            || reached.exists().then_some(()),
        );
        lab.kill_gateway(libc::SIGKILL).unwrap();
        std::fs::remove_file(&armed).unwrap();
        std::fs::remove_file(&reached).unwrap();
        lab.start_gateway().unwrap();
        let (code, r) = run.join().unwrap();
        assert!(
            matches!(r.state, RunState::Released | RunState::RolledBack),
            "killed at {point}: the run must end on its own: {r:?}"
        );
        let owner = lab.endpoint_host(c()).unwrap();
        let expected = if r.state == RunState::Released {
            to
        } else {
            here
        };
        assert_eq!(owner, expected, "killed at {point}: {r:?}");
        assert_eq!(code, if r.state == RunState::Released { 0 } else { 3 });
        wait_for(
            &format!("killed at {point}: exactly one copy runs, on {owner}"),
            Duration::from_secs(30),
            || (running_copies(&lab) == [owner.clone()]).then_some(()),
        );
        assert!(running_on(&lab, &owner).running);
        eprintln!(
            "killed at {point}: {} ({} → {to}), one copy on {owner}",
            r.state.as_str(),
            here
        );
        if r.state == RunState::Released {
            here = to;
        }
    }
    let (code, s) = client.stop(Duration::from_secs(90));
    assert_client_clean(code, &s, 4);
}

/// `Udp: RcvbufErrors` in the network namespace of process `pid`: datagrams its sockets
/// dropped for want of room.
fn udp_rcvbuf_errors(pid: i32) -> u64 {
    let snmp = std::fs::read_to_string(format!("/proc/{pid}/net/snmp")).expect("snmp");
    ferry_bench::links::parse_rcvbuf_errors(&snmp).expect("Udp RcvbufErrors")
}

/// `Udp: InDatagrams` in the network namespace of process `pid`.
fn udp_in_datagrams(pid: i32) -> u64 {
    let snmp = std::fs::read_to_string(format!("/proc/{pid}/net/snmp")).expect("snmp");
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (udp.next().unwrap(), udp.next().unwrap());
    let i = names
        .split_whitespace()
        .position(|n| n == "InDatagrams")
        .unwrap();
    values.split_whitespace().nth(i).unwrap().parse().unwrap()
}

/// A child process killed (and reaped) if the test ends before it exits.
struct Child(std::process::Child);
impl Drop for Child {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A UDP receiver (iperf3's server in the container, default 208 KiB socket buffer) migrated
/// under 100 Mbit/s from the internet: the hold queues the datagrams of the freeze (hundreds,
/// several socket buffers' worth), and the release writes them back only as the restored
/// socket has room — it is read only once the restored copy runs — so the restored socket
/// drops none (`UdpRcvbufErrors` in the container's namespace on the destination stays 0).
/// What waited in the socket at the checkpoint (CRIU saves no UDP queue) travels with the
/// images and is written back before the release: iperf3 counts no datagram lost beyond
/// what the kernel counted as dropped by the socket (it lost 150–314 per move before).
/// iperf3's server in the container, listening on port 5201.
fn start_iperf3_server(lab: &Lab, ns: &Path) -> ferry_api::run::ContainerProcess {
    let iperf3 = iperf3_path();
    // iperf3 makes a temporary file per stream: in the container only /dev/shm is writable.
    let server = lab
        .start_process(
            c(),
            &[
                "/usr/bin/env",
                "TMPDIR=/dev/shm",
                iperf3.to_str().unwrap(),
                "-s",
                "-p",
                "5201",
            ],
        )
        .expect("start iperf3 -s");
    wait_listening(lab, ns, 5201);
    server
}

/// iperf3's UDP server in the container on a1, and a client sending 100 Mbit/s to it for
/// 6 s from the internet, flowing: the server, the client, its JSON output to come.
fn udp_stream(
    lab: &Lab,
    ns: &Path,
) -> (
    ferry_api::run::ContainerProcess,
    Child,
    std::sync::mpsc::Receiver<String>,
) {
    let server = start_iperf3_server(lab, ns);
    let mut cmd = std::process::Command::new("iperf3");
    cmd.args([
        "-c",
        PUBLIC,
        "-p",
        "5201",
        "-u",
        "-b",
        "100M",
        "-l",
        "1380",
        "-t",
        "6",
        "-J",
        "--get-server-output",
    ])
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped());
    ferry_overlay::netns::command_in(&mut cmd, &lab.netns("inet")).unwrap();
    let mut client = Child(cmd.spawn().expect("iperf3 client"));
    let mut stdout = client.0.stdout.take().unwrap();
    let (tx, output) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        let _ = tx.send(s);
    });
    // Traffic flows into the container (a second's worth at 100 Mbit/s).
    let flowing = ferry_tests::poll_until(Duration::from_secs(10), || {
        (udp_in_datagrams(server.pid) > 8_000).then_some(())
    });
    if flowing.is_none() {
        let _ = client.0.kill();
        let _ = client.0.wait();
        let mut err = String::new();
        let _ = client.0.stderr.take().unwrap().read_to_string(&mut err);
        panic!(
            "no datagrams reach the container ({} so far); iperf3 client: {} {err}",
            udp_in_datagrams(server.pid),
            output
                .recv_timeout(Duration::from_secs(5))
                .unwrap_or_default()
        );
    }
    (server, client, output)
}

/// The receive buffer (`ss -m`: `rb`) of the container's UDP socket on port 5201, on `host`.
fn udp_socket_rb(lab: &Lab, host: &str) -> u64 {
    let ns = lab.container_netns(host, c());
    let out = lab
        .exec_in(&ns, &["ss", "-Huanm", "sport = :5201"])
        .expect("ss");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.split(|ch: char| ch == ',' || ch == '(' || ch.is_whitespace())
        .find_map(|w| w.strip_prefix("rb").and_then(|v| v.parse().ok()))
        .unwrap_or_else(|| panic!("no UDP socket on port 5201 on {host}: {text}"))
}

/// `ferry_udp_carry_datagrams_total{event}` of `host`'s agent.
fn udp_carry_counter(lab: &Lab, host: &str, event: &str) -> u64 {
    ferry_tests::metrics_text(lab, host)
        .lines()
        .find(|l| {
            l.starts_with("ferry_udp_carry_datagrams_total{")
                && l.contains(&format!("event=\"{event}\""))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            panic!("{host} exports no ferry_udp_carry_datagrams_total{{event={event}}}")
        })
}

#[test]
fn a_udp_receiver_keeps_the_released_datagrams() {
    if !require_root_and_tools(&["ip", "ss", "criu", "iperf3"]) {
        return;
    }
    let _machine = ferry_tests::machine_to_itself();
    let (lab, ns) = lab_with_container();
    let (server, mut client, output) = udp_stream(&lab, &ns);
    let rb = udp_socket_rb(&lab, "a1");
    let steady = udp_rcvbuf_errors(server.pid);
    // The source's socket drops, sampled until its namespace is gone (after the hold began
    // nothing reaches it: the last sample is its total).
    let source_drops = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(steady));
    let sampler = {
        let (drops, pid) = (source_drops.clone(), server.pid);
        // Until the source's tree is gone (killed once the destination runs it).
        std::thread::spawn(move || {
            ferry_tests::poll_until(Duration::from_secs(60), || {
                let Ok(snmp) = std::fs::read_to_string(format!("/proc/{pid}/net/snmp")) else {
                    return Some(());
                };
                if let Some(n) = ferry_bench::links::parse_rcvbuf_errors(&snmp) {
                    drops.store(n, std::sync::atomic::Ordering::Relaxed);
                }
                None
            })
        })
    };
    // Drops on the way (full backlogs, devices), to tell them from the sockets' own.
    let (softnet_before, links_before) = (
        ferry_tests::softnet_dropped(),
        ferry_tests::lab_link_drops(&lab),
    );
    let r = migrate_ok(&lab, "a1", "b1");
    let restored = running_on(&lab, "b1");
    // The checkpoint widened the socket's buffer; the restored one has its own size back.
    assert_eq!(
        udp_socket_rb(&lab, "b1"),
        rb,
        "the restored socket's receive buffer"
    );
    let json = output
        .recv_timeout(Duration::from_secs(30))
        .expect("the iperf3 client ends within 30 s");
    let status = client.0.wait().expect("iperf3 client");
    let v: Value = serde_json::from_str(&json)
        .unwrap_or_else(|e| panic!("iperf3's output is not JSON ({e}): {json}"));
    assert!(status.success(), "iperf3 client: {status}: {json}");
    // The receiver's figures, as iperf3's client reports them.
    let sum = &v["end"]["sum"];
    let dropped = udp_rcvbuf_errors(restored.pid);
    let held = ferry_tests::hold_counter(&lab, "b1", "held");
    let paced = ferry_tests::hold_counter(&lab, "b1", "paced");
    let late = ferry_tests::hold_counter(&lab, "b1", "pace_late");
    let while_paced = ferry_tests::hold_counter(&lab, "b1", "pace_socket_dropped");
    eprintln!(
        "figures: held {held} paced {paced} pace_late {late}; UdpRcvbufErrors on the source \
         before the move {steady}, on the destination {dropped} ({while_paced} while the \
         release wrote); iperf3: {} of {} datagrams lost; stopped_ms {:.1}",
        sum["lost_packets"], sum["packets"], r.stopped_ms
    );
    let log = std::fs::read_to_string(lab.agent_log("b1")).unwrap_or_default();
    for l in log
        .lines()
        .filter(|l| l.contains("paced") || l.contains("resumed"))
    {
        eprintln!("b1: {l}");
    }
    // The freeze held the datagrams of a few socket buffers, and the release paced them all,
    // none at the deadline.
    assert!(held >= 200, "{held} datagrams held: {json}");
    assert_eq!(
        paced, held,
        "every held datagram goes through the paced release"
    );
    assert_eq!(late, 0, "datagrams released at the deadline without room");
    // Released at once, about as many as were held were dropped (859 of 896, 1,298 of 1,277
    // in two runs). Paced, the socket drops none of them; but the kernel's counters (the
    // socket's own sk_drops while the release wrote, and UdpRcvbufErrors) also count live
    // datagrams dropped while a loaded machine deschedules the receiver (0 on a quiet
    // machine, 18 of about 1,000 once with a benchmark running beside the test): bounds far
    // below what an unpaced release drops, rather than zero.
    assert!(
        while_paced * 4 < held,
        "the socket dropped {while_paced} datagrams while the release wrote {held}"
    );
    assert!(
        dropped * 4 < held,
        "the restored socket dropped {dropped} datagrams (UdpRcvbufErrors) of {held} held"
    );
    // The datagrams waiting in the source's socket went along and were all written back
    // (the agents' counters), and nothing was lost that the kernel did not count: as a
    // socket drop, or on the way (a full backlog, a device's drop; on a quiet machine 0).
    let carried = udp_carry_counter(&lab, "a1", "carried");
    assert_eq!(
        udp_carry_counter(&lab, "b1", "written_back"),
        carried,
        "b1 wrote back every datagram a1 carried"
    );
    assert_eq!(udp_carry_counter(&lab, "a1", "not_carried"), 0);
    assert_eq!(udp_carry_counter(&lab, "b1", "lost"), 0);

    let lost = sum["lost_packets"].as_u64().expect("iperf3's lost_packets");
    let on_the_way = ferry_tests::softnet_dropped().saturating_sub(softnet_before)
        + ferry_tests::lab_link_drops(&lab).saturating_sub(links_before);
    // The source's tree is killed once the destination runs it: its sampler ends.
    sampler.join().expect("sampler");
    let source = source_drops.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "figures: {carried} datagrams carried over with the images; iperf3 lost {lost}; the \
         source's socket dropped {source} (on a loaded machine), the restored one {dropped}, \
         backlogs and devices {on_the_way}"
    );
    assert!(
        carried > 0,
        "no datagram waited in the socket at the checkpoint"
    );
    assert!(
        lost <= source + dropped + on_the_way,
        "iperf3 lost {lost} datagrams; the sockets dropped {source} (source) and {dropped} \
         (destination), backlogs and devices {on_the_way}: {json}"
    );
}

/// The same UDP receiver, and the restore fails: the source's tree runs on with its queue
/// (read, not taken, by the checkpoint) and its own receive buffer size.
///
/// What it loses is printed, not asserted: the datagrams held meanwhile go back to the
/// source unpaced (the destination cannot see the source's socket) while the resumed tree
/// still reads its queue, and the socket drops part of them — 452 to 2,040 in nine runs,
/// mostly counted by the socket, up to 652 not (left for a later change, as is iperf3's
/// server exiting 1 at the end of one run in three after a rollback, with or without the
/// UDP carry-over).
#[test]
fn a_udp_receiver_rolled_back_keeps_its_queue_and_its_buffer() {
    if !require_root_and_tools(&["ip", "ss", "criu", "iperf3"]) {
        return;
    }
    let _machine = ferry_tests::machine_shared();
    let (lab, ns) = lab_with_container();
    let (server, mut client, output) = udp_stream(&lab, &ns);
    let rb = udp_socket_rb(&lab, "a1");
    let steady = udp_rcvbuf_errors(server.pid);
    let (code, r) = migrate(&lab, "b1", &["--fail", "restore"]);
    assert_eq!(r.state, RunState::RolledBack, "{r:?}");
    assert_eq!(code, 3, "{r:?}");
    assert_eq!(
        running_on(&lab, "a1").pid,
        server.pid,
        "the source's tree runs on"
    );
    // CRIU's dump saw the widened buffer; the tree that runs on has its own.
    assert_eq!(udp_socket_rb(&lab, "a1"), rb, "the socket's receive buffer");
    assert!(
        udp_carry_counter(&lab, "a1", "carried") > 0,
        "a1's agent read the UDP queues"
    );
    let json = output
        .recv_timeout(Duration::from_secs(30))
        .expect("the iperf3 client ends within 30 s");
    let _ = client.0.wait();
    let v: Value = serde_json::from_str(&json).unwrap_or_default();
    // The namespace's counter (the server may have ended).
    let snmp = lab
        .exec_in(&lab.container_netns("a1", c()), &["cat", "/proc/net/snmp"])
        .expect("snmp");
    let dropped = ferry_bench::links::parse_rcvbuf_errors(&String::from_utf8_lossy(&snmp.stdout))
        .unwrap_or(0)
        .saturating_sub(steady);
    eprintln!(
        "figures: rolled back; iperf3 lost {} of {}; the socket dropped {dropped}",
        v["end"]["sum"]["lost_packets"], v["end"]["sum"]["packets"]
    );
}

/// The path of `iperf3`, which the runtime wants absolute.
fn iperf3_path() -> PathBuf {
    std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .map(|d| Path::new(d).join("iperf3"))
        .find(|p| p.is_file())
        .expect("iperf3 in PATH")
}

/// A bulk sender (iperf3's server in the container, sending to the client: `iperf3 -R`)
/// migrated four times under its load: the client discards no segment of a restored
/// connection as older than one it has seen (`TcpExtPAWSEstab` does not move).
///
/// The counter measures the lab as much as the migration: a path that reorders segments by
/// a few milliseconds makes the sender retransmit spuriously, and the client counts each
/// late original as a PAWS discard. The lab keeps every flow on one CPU (RPS, see
/// `docs/lab.md`); without it this test counted +1 to +25 in runs with no migration at all.
#[test]
fn a_bulk_sender_migrated_repeatedly_draws_no_paws_discard() {
    if !require_root_and_tools(&["ip", "ss", "criu", "iperf3"]) {
        return;
    }
    let _machine = ferry_tests::machine_to_itself();
    let (lab, ns) = lab_with_container();
    start_iperf3_server(&lab, &ns);
    // The lab's premise: the client's interface steers flows (RPS).
    // (`ip netns exec` mounts the namespace's own sysfs.)
    let rps = std::process::Command::new("ip")
        .args(["netns", "exec", &lab.netns_name("inet")])
        .args(["cat", "/sys/class/net/eth0/queues/rx-0/rps_cpus"])
        .output()
        .expect("reading the client's RPS mask");
    let rps = String::from_utf8_lossy(&rps.stdout).trim().replace(',', "");
    assert!(
        rps.chars().any(|c| c != '0'),
        "the lab's client interface has no RPS mask ({rps:?}): flows may be reordered"
    );
    let paws_before = client_tcp_stat(&lab, "PAWSEstab");
    let mut cmd = std::process::Command::new("iperf3");
    cmd.args(["-c", PUBLIC, "-p", "5201", "-R", "-t", "8", "-J"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    ferry_overlay::netns::command_in(&mut cmd, &lab.netns("inet")).unwrap();
    let mut client = Child(cmd.spawn().expect("iperf3 client"));
    let mut stdout = client.0.stdout.take().unwrap();
    let (tx, output) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        let _ = tx.send(s);
    });
    // The data connection is established and sending.
    wait_for("iperf3's data connection", Duration::from_secs(10), || {
        let out = lab
            .exec_in(
                &ns,
                &["ss", "-Htn", "state", "established", "sport = :5201"],
            )
            .unwrap();
        (String::from_utf8_lossy(&out.stdout).lines().count() >= 2).then_some(())
    });
    // The data connection's MSS before: every restored copy sends segments as large.
    let mss_before = sending_mss(&lab, "a1");
    let mut stopped = Vec::new();
    for i in 0..4 {
        let (from, to) = if i % 2 == 0 {
            ("a1", "b1")
        } else {
            ("b1", "a1")
        };
        let r = migrate_ok(&lab, from, to);
        stopped.push(r.stopped_ms);
        running_on(&lab, to);
        let mss = sending_mss(&lab, to);
        assert_eq!(
            mss, mss_before,
            "the data connection restored on {to} sends {mss}-byte segments, not {mss_before} \
             (CRIU's restore left the 536-byte default in use: scripts/criu-patches)"
        );
    }
    let json = output
        .recv_timeout(Duration::from_secs(30))
        .expect("the iperf3 client ends within 30 s");
    let status = client.0.wait().expect("iperf3 client");
    assert!(status.success(), "iperf3 client: {status}: {json}");
    let v: Value = serde_json::from_str(&json)
        .unwrap_or_else(|e| panic!("iperf3's output is not JSON ({e}): {json}"));
    let paws = client_tcp_stat(&lab, "PAWSEstab") - paws_before;
    let intervals: Vec<String> = v["intervals"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|i| {
                    format!(
                        "{:.0}",
                        i["sum"]["bits_per_second"].as_f64().unwrap_or(0.0) / 1e6
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    eprintln!(
        "figures: PAWSEstab +{paws}; stopped_ms {stopped:?}; Mbit/s per second {intervals:?}; received {} bytes",
        v["end"]["sum_received"]["bytes"]
    );
    assert_eq!(
        paws, 0,
        "the client discarded {paws} segments of restored connections (PAWS)"
    );
}
