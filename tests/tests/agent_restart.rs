//! Agents that restart without harm (issue 11, item 5), in a real lab with real agents.
//!
//! A container on a1 serves live TCP connections from a container on b1 while a1's agent is
//! restarted, once with SIGTERM (an upgrade) and once with SIGKILL (a crash): no connection is
//! reset, no reply is lost or wrong, the container's namespace (inode) and veth (ifindex) stay,
//! its process keeps running under the same PID and the new agent knows it, and the
//! datapath's counters go on from where they were. Then `ferry-agent --teardown` and the
//! lab's teardown leave no process and no namespace behind, including container processes
//! that no agent is the parent of any more.
use std::{
    collections::HashMap,
    net::Ipv4Addr,
    os::unix::fs::MetadataExt as _,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use ferry_lab::{Lab, LabOptions, procs};
use ferry_tests::{KillOnDrop, agents_lab, counters, require_root_and_tools, workspace_binary};
use serde_json::Value;

const C: &str = "10.244.1.10";
const PEER: &str = "10.244.2.10";
const PORT: &str = "7000";
const TOOLS: &[&str] = &["ip", "ss", "curl"];

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

fn inode(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().ino()
}

fn alive(pid: i32, start: u64) -> bool {
    procs::stat(pid).is_ok_and(|(state, s)| s == start && state != 'Z')
}

/// `ifindex` of `name` inside `netns`.
fn ifindex_in(lab: &Lab, netns: &Path, name: &str) -> u32 {
    let out = lab
        .exec_in(netns, &["ip", "-o", "link", "show", name])
        .unwrap();
    // "7: name@peer: <...> ..."
    String::from_utf8_lossy(&out.stdout)
        .split(':')
        .next()
        .and_then(|i| i.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {}", netns.display()))
}

use ferry_tests::workload::Workload as Client;

fn n(v: &Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("no number {k} in {v}"))
}

use ferry_tests::workload::wait_listening;

/// What must not change on a1 across an agent restart.
#[derive(Debug, PartialEq, Eq)]
struct Kept {
    netns_inode: u64,
    host_if: u32,
    eth0: u32,
    vxlan: u32,
    hold: u32,
}

fn kept(lab: &Lab, c_ns: &Path) -> Kept {
    let a1 = lab.netns("a1");
    Kept {
        netns_inode: inode(c_ns),
        host_if: ifindex_in(lab, &a1, "fc0af4010a"),
        eth0: ifindex_in(lab, c_ns, "eth0"),
        vxlan: ifindex_in(lab, &a1, "ferry_vx"),
        hold: ifindex_in(lab, &a1, "ferry_hold"),
    }
}

/// Every counter of `after` at least its value in `before` (none went back to zero).
fn assert_counters_continue(before: &HashMap<String, u64>, after: &HashMap<String, u64>) {
    for (k, v) in before {
        let now = after.get(k).copied().unwrap_or(0);
        assert!(now >= *v, "counter {k} went from {v} back to {now}");
    }
}

#[test]
fn agent_restarts_are_hitless_for_live_connections() {
    if !require_root_and_tools(TOOLS) {
        return;
    }
    let workload = workspace_binary("ferry-workload");
    let workload = workload.to_str().unwrap();
    let mut lab = agents_lab(LabOptions::default());
    let _show = ferry_tests::CountersOnPanic::new(&lab);
    let c_ns = lab.add_container("a1", ip(C)).unwrap();
    let peer_ns = lab.add_container("b1", ip(PEER)).unwrap();
    let p = lab
        .start_process(ip(C), &[workload, "serve", "--port", PORT])
        .expect("start the server");
    let start = procs::start_time(p.pid).unwrap();
    wait_listening(&lab, &c_ns, PORT);
    let before = kept(&lab, &c_ns);
    eprintln!("server {p:?}, kept {before:?}");

    // Long enough for both restarts (each: stop, start, eBPF load, first snapshot).
    let to = format!("{C}:{PORT}");
    let mut client = Client::start(
        &peer_ns,
        &[
            "client",
            "--to",
            &to,
            "--connections",
            "4",
            "--interval-ms",
            "5",
            // Until stopped below, however long the restarts take.
            "--duration-ms",
            "600000",
            "--json",
        ],
    );
    client.connected(Duration::from_secs(10));
    let log = lab.agent_log("a1");

    for (signal, name) in [(libc::SIGTERM, "SIGTERM"), (libc::SIGKILL, "SIGKILL")] {
        // Some traffic through this agent's datapath first.
        ferry_tests::keep_load_for(Duration::from_millis(800));
        let counted = counters(&lab, "a1");
        assert!(
            counted.values().any(|v| *v > 0),
            "no traffic counted on a1: {counted:?}"
        );
        let t0 = Instant::now();
        lab.restart_agent("a1", signal).unwrap();
        eprintln!("{name}: agent of a1 restarted in {:?}", t0.elapsed());
        lab.sync().unwrap();
        // The same namespace, veth, devices; the same process, known to the new agent.
        assert_eq!(kept(&lab, &c_ns), before, "after {name}");
        assert!(alive(p.pid, start), "after {name}: the server is gone");
        let known = lab.process(ip(C)).unwrap().expect("the new agent knows it");
        assert_eq!((known.pid, known.running), (p.pid, true), "{known:?}");
        assert_eq!(known.origin, "started", "{known:?}");
        assert_counters_continue(&counted, &counters(&lab, "a1"));
        assert!(
            client.running(),
            "the client ended during the {name} restart"
        );
    }
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("adopted the pinned datapath"), "{text}");
    assert!(text.contains("container network adopted"), "{text}");
    assert!(text.contains("re-adopted from the state file"), "{text}");

    let (code, s) = client.stop(Duration::from_secs(30));
    eprintln!(
        "client: {s}\nfigures: max_gap_ms {} retransmits {}",
        s["max_gap_ms"], s["retransmits"]
    );
    assert_eq!(n(&s, "resets"), 0, "{s}");
    assert_eq!(n(&s, "errors"), 0, "{s}");
    assert_eq!(n(&s, "closed_by_server"), 0, "{s}");
    assert_eq!(n(&s, "mismatches"), 0, "{s}");
    assert_eq!(n(&s, "unanswered"), 0, "{s}");
    assert_eq!(n(&s, "replies"), n(&s, "requests"), "{s}");
    assert!(n(&s, "requests") > 1000, "{s}");
    assert_eq!(n(&s, "alive"), 4, "{s}");
    assert_eq!(code, 0, "{s}");

    let prefix = lab.prefix().to_owned();
    lab.down().unwrap();
    assert!(!alive(p.pid, start), "the server outlived the lab");
    assert_eq!(
        ferry_tests::wait_clean(&prefix, Duration::from_secs(5)),
        Vec::<String>::new()
    );
}

/// Names in /run/netns that belong to lab `prefix`.
fn lab_namespaces(prefix: &str) -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with(&format!("{prefix}-")))
                .collect()
        })
        .unwrap_or_default()
}

/// `ferry-agent --teardown` removes what the agent made (refused while the agent runs); the
/// lab's teardown removes every process in the lab's namespaces — a container process whose
/// agent was SIGKILLed (no agent is its parent any more), one started behind the agent's back
/// — and every namespace.
#[test]
fn teardowns_leave_no_process_and_no_namespace() {
    if !require_root_and_tools(TOOLS) {
        return;
    }
    let agent = workspace_binary("ferry-agent");
    let mut lab = agents_lab(LabOptions::default());
    let prefix = lab.prefix().to_owned();
    let c_ns = lab.add_container("a1", ip(C)).unwrap();
    let b_ns = lab.add_container("b1", ip(PEER)).unwrap();
    let a = lab.start_process(ip(C), &["/bin/sleep", "1000"]).unwrap();
    let b = lab
        .start_process(ip(PEER), &["/bin/sleep", "1000"])
        .unwrap();
    let (a_start, b_start) = (
        procs::start_time(a.pid).unwrap(),
        procs::start_time(b.pid).unwrap(),
    );
    // A process in b1's container that no agent started (its child is reaped by us below).
    let mut cmd = Command::new("/bin/sleep");
    cmd.arg("1000").stdin(Stdio::null());
    ferry_overlay::netns::command_in(&mut cmd, &b_ns).unwrap();
    let mut stranger = KillOnDrop(cmd.spawn().unwrap());
    let stranger_pid = stranger.0.id() as i32;

    // a1's agent crashes: its container runs on, adopted by nobody until a teardown.
    lab.kill_agent("a1", libc::SIGKILL).unwrap();
    assert!(
        alive(a.pid, a_start),
        "a crash must not take the container down"
    );
    assert!(c_ns.exists());
    let config = lab.state_dir().join("a1").join("agent.toml");
    let teardown = |lab: &Lab| {
        let mut cmd = Command::new(&agent);
        cmd.arg("--config").arg(&config).arg("--teardown");
        ferry_overlay::netns::command_in(&mut cmd, &lab.netns("a1")).unwrap();
        cmd.output().unwrap()
    };
    let out = teardown(&lab);
    assert!(
        out.status.success(),
        "teardown: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !alive(a.pid, a_start),
        "teardown left the container's process"
    );
    assert!(!c_ns.exists(), "teardown left the container's namespace");
    let a1 = lab.netns("a1");
    for dev in ["ferry_vx", "ferry_hold", "fc0af4010a"] {
        let out = lab.exec_in(&a1, &["ip", "link", "show", dev]).unwrap();
        assert!(!out.status.success(), "{dev} still in a1");
    }
    let pins = Path::new("/sys/fs/bpf/ferry").join(format!("{prefix}-a1"));
    assert!(!pins.exists(), "{} still there", pins.display());

    // Refused while the agent runs.
    lab.start_agent("a1").unwrap();
    let out = teardown(&lab);
    assert!(!out.status.success(), "a teardown under a running agent");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("locked"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // b1's agent stops cleanly (SIGTERM) and leaves its container; the lab goes down.
    lab.kill_agent("b1", libc::SIGTERM).unwrap();
    assert!(
        alive(b.pid, b_start),
        "SIGTERM must not take the container down"
    );
    lab.down().unwrap();
    assert!(
        !alive(b.pid, b_start),
        "b1's container process outlived the lab"
    );
    // Killed by the lab's teardown: our wait returns (it does not block for 1000 s).
    let status = stranger.0.wait().unwrap();
    eprintln!("the stranger (PID {stranger_pid}) ended: {status:?}");
    assert_eq!(lab_namespaces(&prefix), Vec::<String>::new());
    assert_eq!(
        ferry_tests::wait_clean(&prefix, Duration::from_secs(5)),
        Vec::<String>::new()
    );
}
