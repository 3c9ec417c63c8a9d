//! `ferry-workload redis-client` against a real `redis-server`: a clean run passes, and a
//! server killed mid-run is reported (never hidden by a reconnect) with exit status 2.
//!
//! Skipped with a message when `redis-server` is not installed, unless `CI=true`.

use std::{
    net::{SocketAddr, TcpListener, TcpStream},
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

const CLIENT: &str = env!("CARGO_BIN_EXE_ferry-workload");

/// A `redis-server` this test started; killed (by its PID) and reaped when dropped.
struct Redis {
    child: Option<Child>,
    addr: SocketAddr,
}

impl Redis {
    /// Starts one on a free loopback port, or `None` (after printing why) if redis-server is
    /// not installed and this is not CI.
    fn start() -> Option<Self> {
        if Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .status()
            .is_err()
        {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "redis-server is not installed (and CI=true): apt-get install redis-server"
            );
            eprintln!("SKIPPED: redis-server is not installed");
            return None;
        }
        // The port is free when picked; another process could take it before redis binds, so
        // try a few.
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port();
            let mut r = Redis {
                child: Some(
                    Command::new("redis-server")
                        .args(["--port", &port.to_string()])
                        .args(["--bind", "127.0.0.1"])
                        .args(["--save", ""])
                        .args(["--appendonly", "no"])
                        .args(["--daemonize", "no"])
                        .args(["--protected-mode", "no"])
                        .args(["--logfile", ""])
                        .stdin(Stdio::null())
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .spawn()
                        .expect("spawning redis-server"),
                ),
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
            };
            let t = Instant::now();
            while t.elapsed() < Duration::from_secs(10) {
                if let Some(status) = r.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                    eprintln!("redis-server on port {port} exited early ({status}); retrying");
                    r.child = None;
                    break;
                }
                if TcpStream::connect(r.addr).is_ok() {
                    return Some(r);
                }
                thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("could not start redis-server");
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILLs it by its PID and reaps it.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on the PID of our own unreaped child: it cannot have been reused.
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGKILL) };
            let _ = c.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
    }
}

fn client(addr: SocketAddr, duration_ms: u64, extra: &[&str]) -> Command {
    let mut c = Command::new(CLIENT);
    c.args(["redis-client", "--to", &addr.to_string(), "--json"])
        .args(["--duration-ms", &duration_ms.to_string()])
        .args(extra)
        .stdin(Stdio::null());
    c
}

fn summary(out: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout.lines().last().unwrap_or_else(|| {
        panic!(
            "no summary; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    serde_json::from_str(line).unwrap_or_else(|e| panic!("summary {line:?}: {e}"))
}

fn n(s: &Value, k: &str) -> u64 {
    s[k].as_u64()
        .unwrap_or_else(|| panic!("{k} missing in {s}"))
}

#[test]
fn clean_run_passes_and_a_killed_server_fails() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    let samples = std::env::temp_dir().join(format!("ferry-redis-samples-{}.csv", redis.pid()));

    // 1. A clean second: every reply right.
    let out = client(
        redis.addr,
        1000,
        &["--connections", "3", "--samples", samples.to_str().unwrap()],
    )
    .output()
    .expect("running the client");
    let s = summary(&out);
    assert_eq!(out.status.code(), Some(0), "{s}");
    assert!(n(&s, "replies") > 0, "{s}");
    assert_eq!(n(&s, "replies"), n(&s, "requests"), "{s}");
    for k in [
        "mismatches",
        "errors",
        "resets",
        "closed_by_server",
        "reconnects",
        "unanswered",
    ] {
        assert_eq!(n(&s, k), 0, "{k}: {s}");
    }
    assert_eq!(n(&s, "connections"), 3);
    assert_eq!(n(&s, "alive"), 3);
    let counters = s["final_counter"].as_array().expect("final_counter");
    assert_eq!(counters.len(), 3);
    assert!(counters.iter().all(|c| c.as_u64() > Some(0)), "{s}");
    for k in [
        "max_gap_ms",
        "p50_gap_ms",
        "p99_gap_ms",
        "max_latency_ms",
        "p50_latency_ms",
    ] {
        assert!(s[k].as_f64().is_some(), "{k}: {s}");
    }
    let csv = std::fs::read_to_string(&samples).expect("samples");
    let _ = std::fs::remove_file(&samples);
    let mut rows = csv.lines();
    assert_eq!(rows.next(), Some("unix_ms,conn,seq,latency_ms"));
    assert_eq!(rows.count() as u64, n(&s, "requests"));

    // 2. The server dies mid-run: the client must say so, not reconnect, and exit 2.
    let child = client(redis.addr, 5000, &[])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("running the client");
    thread::sleep(Duration::from_millis(500));
    redis.kill();
    let t = Instant::now();
    let out = child.wait_with_output().expect("waiting for the client");
    let s = summary(&out);
    assert_eq!(out.status.code(), Some(2), "{s}");
    assert!(n(&s, "replies") > 0, "{s}");
    assert!(n(&s, "resets") + n(&s, "closed_by_server") > 0, "{s}");
    assert_eq!(n(&s, "alive"), 0, "{s}");
    assert_eq!(n(&s, "reconnects"), 0, "{s}");
    assert_eq!(n(&s, "mismatches"), 0, "{s}");
    // With every connection gone it stops at once instead of running out its 5 s.
    assert!(t.elapsed() < Duration::from_secs(4), "{s}");
}
