//! The lab with agents: real `ferry-agent`s configured and reaped with their lab, and stand-in
//! agents (through `FERRY_BIN_DIR`) for the failure paths: one that dies at start, one that
//! ignores SIGTERM.
use std::{
    os::unix::fs::PermissionsExt,
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use ferry_config::AgentConfig;
use ferry_lab::{Lab, LabOptions, Topology, leftovers};
use ferry_tests::{
    DownOnDrop, require_root_and_tools, spawn_lab_owner, wait_clean, workspace_binary,
};

/// A directory holding an executable `ferry-agent` with the given shell script.
fn fake_agent(script: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("ferry-agent");
    std::fs::write(&bin, script).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

#[test]
fn real_agents_are_configured_and_go_away_with_the_lab() {
    if !require_root_and_tools(&["ip", "ping"]) {
        return;
    }
    workspace_binary("ferry-lab");
    workspace_binary("ferry-agent");
    let lab = Lab::up(LabOptions {
        topology: Topology::default_lab(),
        start_agents: true,
        ..LabOptions::default()
    })
    .expect("lab with agents up");
    let prefix = lab.prefix().to_owned();
    eprintln!("lab {prefix} with agents up in {:?}", lab.up_duration());
    let st = ferry_lab::status(&prefix).unwrap();
    let agents: Vec<_> = st
        .processes
        .iter()
        .filter(|p| p.process.kind == "agent")
        .collect();
    assert_eq!(agents.len(), 4, "{agents:?}");
    assert!(agents.iter().all(|a| a.alive), "{agents:?}");

    for host in ["a1", "a2", "b1", "gw"] {
        let path = lab.state_dir().join(host).join("agent.toml");
        let cfg = AgentConfig::load(&path).expect("agent.toml parses");
        let h = lab.host(host).unwrap();
        assert_eq!(cfg.host, host);
        assert_eq!(cfg.vtep, h.address);
        assert_eq!(cfg.overlay_ip, h.overlay_ip);
        assert_eq!(cfg.vni, 4242);
        assert_eq!(
            cfg.bpffs_dir.as_deref(),
            Some(Path::new(&format!("/sys/fs/bpf/ferry/{prefix}-{host}")))
        );
        let mut peers: Vec<_> = cfg.peers.iter().map(|p| p.name.as_str()).collect();
        peers.sort();
        let mut want: Vec<_> = ["a1", "a2", "b1", "gw"]
            .into_iter()
            .filter(|n| *n != host)
            .collect();
        want.sort();
        assert_eq!(peers, want);
        // The agent runs in its host's namespace.
        let agent = agents
            .iter()
            .find(|a| a.process.host.as_deref() == Some(host))
            .unwrap();
        let ns = |p: &Path| std::fs::metadata(p).map(|m| std::os::unix::fs::MetadataExt::ino(&m));
        assert_eq!(
            ns(Path::new(&format!("/proc/{}/ns/net", agent.process.pid))).unwrap(),
            ns(&lab.netns(host)).unwrap(),
            "agent of {host} is not in {host}'s namespace"
        );
    }
    lab.down().expect("clean teardown");
    let left = leftovers(&prefix);
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn the_reaper_stops_the_agents_of_a_sigkilled_owner() {
    if !require_root_and_tools(&["ip"]) {
        return;
    }
    workspace_binary("ferry-agent");
    let (mut owner, prefix) = spawn_lab_owner(&["--agents"]);
    let st = ferry_lab::status(&prefix).unwrap();
    let agents: Vec<i32> = st
        .processes
        .iter()
        .filter(|p| p.process.kind == "agent" && p.alive)
        .map(|p| p.process.pid)
        .collect();
    assert_eq!(agents.len(), 4, "{:?}", st.processes);

    owner.0.kill().unwrap();
    owner.0.wait().unwrap();
    let left = wait_clean(&prefix, Duration::from_secs(30));
    assert!(
        left.is_empty(),
        "10 s after the owner died, still there: {left:?}"
    );
    for pid in agents {
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(
            state.is_empty() || state.contains(") Z"),
            "agent {pid} still runs: {state}"
        );
    }
}

#[test]
fn an_agent_that_dies_at_start_fails_up_with_its_log_and_leaves_nothing() {
    if !require_root_and_tools(&["ip"]) {
        return;
    }
    let bin = workspace_binary("ferry-lab");
    let fake = fake_agent("#!/bin/sh\necho \"stand-in agent: refusing $*\" >&2\nexit 3\n");
    let out = Command::new(&bin)
        .args(["up", "--json"])
        .env("FERRY_BIN_DIR", fake.path())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "up succeeded with a dying agent");
    assert!(
        err.contains("stand-in agent: refusing --config"),
        "no log tail: {err}"
    );
    assert!(err.contains("exited"), "{err}");
    // The error names the agent's log, which names the lab: nothing of it may be left.
    let at = err.find("/run/ferry-lab/").expect("log path in the error");
    let prefix = &err[at + "/run/ferry-lab/".len()..][..8];
    assert!(ferry_lab::state::is_prefix(prefix), "{prefix}");
    let left = leftovers(prefix);
    assert!(left.is_empty(), "the failed lab left: {left:?}");
}

#[test]
fn an_agent_ignoring_sigterm_is_killed_at_teardown() {
    if !require_root_and_tools(&["ip", "python3"]) {
        return;
    }
    let bin = workspace_binary("ferry-lab");
    let fake = fake_agent(
        r#"#!/bin/sh
exec python3 -c '
import signal, http.server
signal.signal(signal.SIGTERM, signal.SIG_IGN)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"up 1\n")
    def log_message(self, *a): pass
http.server.HTTPServer(("127.0.0.1", 9464), H).serve_forever()
'
"#,
    );
    let out = Command::new(&bin)
        .args(["up", "--json"])
        .env("FERRY_BIN_DIR", fake.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let up: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let prefix = up["prefix"].as_str().unwrap().to_owned();
    let _down = DownOnDrop(prefix.clone());
    let procs = up["processes"].as_array().unwrap();
    let agents: Vec<_> = procs.iter().filter(|p| p["kind"] == "agent").collect();
    assert_eq!(agents.len(), 4, "{procs:?}");
    assert!(procs.iter().all(|a| a["alive"] == true), "{procs:?}");
    assert_eq!(
        procs.iter().filter(|p| p["kind"] == "gateway").count(),
        1,
        "the gateway daemon runs too: {procs:?}"
    );

    let t = Instant::now();
    let o = Command::new(&bin)
        .args(["down", "--lab", &prefix])
        .output()
        .unwrap();
    let took = t.elapsed();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // A lower bound only (a loaded machine can make it longer, never shorter).
    assert!(
        took >= Duration::from_millis(2900),
        "down took {took:?}: the SIGTERM grace period was not honoured"
    );
    let left = leftovers(&prefix);
    assert!(left.is_empty(), "left behind: {left:?}");
}

/// The congestion window a new TCP connection from `netns` to `to` starts with (`TCP_INFO`
/// right after the handshake, before any data).
fn initial_cwnd(netns: &Path, to: std::net::SocketAddr) -> u32 {
    ferry_overlay::netns::run_in(netns, move || {
        let s = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("connecting to {to}: {e}"));
        // SAFETY: an all-zero tcp_info is valid; getsockopt writes at most `len` bytes into it.
        let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
        // SAFETY: a live socket, a buffer of `len` bytes.
        let r = unsafe {
            libc::getsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&s),
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                (&raw mut info).cast(),
                &mut len,
            )
        };
        assert_eq!(r, 0, "TCP_INFO: {}", std::io::Error::last_os_error());
        info.tcpi_snd_cwnd
    })
    .expect("entering the host's namespace")
}

/// Each agent attaches `ferry_peer_window` (sock_ops) to its cgroup, which the lab's agents
/// share with this test: a connection to an agent's API port starts with the configured window
/// (`[criu] peer_initial_window`, 64), one to any other port (the gateway's API) with the
/// kernel's 10.
#[test]
fn the_agents_connections_start_with_the_configured_tcp_window() {
    if !require_root_and_tools(&["ip"]) {
        return;
    }
    let lab = ferry_tests::agents_lab(LabOptions::default());
    let cfg = AgentConfig::load(&lab.state_dir().join("a1").join("agent.toml")).unwrap();
    assert_eq!(cfg.criu.peer_initial_window, 64);
    let b1 = std::net::SocketAddr::new(
        lab.host("b1").unwrap().address.into(),
        ferry_lab::lab::AGENT_API_PORT,
    );
    let gateway = lab.control().expect("a gateway").api;
    let a1 = lab.netns("a1");
    assert_eq!(initial_cwnd(&a1, b1), 64, "to b1's agent");
    assert_eq!(initial_cwnd(&a1, gateway), 10, "to the gateway's API");
    let log = std::fs::read_to_string(lab.agent_log("a1")).unwrap_or_default();
    assert!(log.contains("start with larger TCP windows"), "{log}");
    let prefix = lab.prefix().to_owned();
    lab.down().expect("clean teardown");
    assert!(leftovers(&prefix).is_empty());
}
