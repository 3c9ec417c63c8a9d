//! The lab itself (agents off): topology wiring across the router, isolation between labs,
//! teardown that leaves nothing (explicit, on panic, and by the reaper after a SIGKILLed
//! owner), and the CLI.
use std::{
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use ferry_lab::{Lab, LabOptions, Topology, leftovers};
use ferry_tests::{
    DownOnDrop, require_root_and_tools, spawn_lab_owner, wait_clean, workspace_binary,
};

const TOOLS: &[&str] = &["ip", "ping"];

/// Root, tools, and the `ferry-lab` binary (labs spawn it as their reaper).
fn ready() -> bool {
    if !require_root_and_tools(TOOLS) {
        return false;
    }
    workspace_binary("ferry-lab");
    true
}

fn default_lab() -> Lab {
    Lab::up(LabOptions {
        topology: Topology::default_lab(),
        start_agents: false,
        ..LabOptions::default()
    })
    .expect("lab up")
}

fn addr(lab: &Lab, host: &str) -> String {
    lab.host(host).expect("host").address.to_string()
}

fn stdout(lab: &Lab, node: &str, args: &[&str]) -> String {
    let out = lab.exec(node, args).expect("exec");
    assert!(
        out.status.success(),
        "{args:?} in {node}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn assert_full_mesh(lab: &Lab) {
    let hosts = ["a1", "a2", "b1", "gw"];
    for from in hosts {
        for to in hosts {
            if from != to {
                let ip = addr(lab, to);
                assert!(
                    lab.ping(from, &ip),
                    "lab {}: {from} cannot ping {to} ({ip})",
                    lab.prefix()
                );
            }
        }
    }
    assert!(
        lab.ping("inet", "203.0.113.1"),
        "lab {}: the internet client cannot ping the gateway's public address",
        lab.prefix()
    );
}

#[test]
fn default_lab_connects_every_host_across_the_router_and_leaves_nothing() {
    if !ready() {
        return;
    }
    let t = Instant::now();
    let lab = default_lab();
    let up = t.elapsed();
    eprintln!("default lab {} up in {up:?}", lab.prefix());
    let prefix = lab.prefix().to_owned();
    assert!(ferry_lab::state::is_prefix(&prefix), "{prefix}");

    // Every node has its namespace; the lab's state names them and the reaper.
    for node in ["router", "a1", "a2", "b1", "gw", "inet"] {
        assert!(lab.netns(node).exists(), "namespace of {node} missing");
        assert_eq!(
            lab.netns(node),
            Path::new(&format!("/run/netns/{prefix}-{node}"))
        );
    }
    let st = ferry_lab::state::LabState::load(&prefix)
        .unwrap()
        .expect("state.json");
    assert_eq!(st.namespaces.len(), 6, "{:?}", st.namespaces);
    let reaper = st
        .processes
        .iter()
        .find(|p| p.kind == "reaper")
        .expect("reaper recorded");
    assert!(reaper.alive(), "the reaper is not running");

    // Addresses and routes as the topology says.
    let a1 = stdout(
        &lab,
        "a1",
        &["ip", "-4", "-o", "addr", "show", "dev", "eth0"],
    );
    assert!(a1.contains("198.18.1.10/24"), "{a1}");
    let route = stdout(&lab, "b1", &["ip", "route", "show", "default"]);
    assert!(route.contains("via 198.18.2.1"), "{route}");
    let public = stdout(
        &lab,
        "gw",
        &["ip", "-4", "-o", "addr", "show", "dev", "pub0"],
    );
    assert!(public.contains("203.0.113.1/24"), "{public}");
    let inet = stdout(
        &lab,
        "inet",
        &["ip", "-4", "-o", "addr", "show", "dev", "eth0"],
    );
    assert!(inet.contains("203.0.113.10/24"), "{inet}");
    let bridges = stdout(
        &lab,
        "router",
        &["ip", "-br", "link", "show", "type", "bridge"],
    );
    for br in ["br-edge", "br-a", "br-b"] {
        assert!(bridges.contains(br), "{bridges}");
    }
    let fwd = stdout(&lab, "router", &["cat", "/proc/sys/net/ipv4/ip_forward"]);
    assert_eq!(fwd.trim(), "1");

    assert_full_mesh(&lab);
    // Cross-cloud traffic really crosses the router: with TTL 1 it dies there, while a
    // same-cloud peer (one bridge, no hop) still answers.
    let ttl1 = |to: &str| {
        lab.exec(
            "a1",
            &["ping", "-n", "-q", "-c", "1", "-W", "1", "-t", "1", to],
        )
        .unwrap()
        .status
        .success()
    };
    assert!(ttl1(&addr(&lab, "a2")), "same-cloud ping with TTL 1 failed");
    assert!(
        !ttl1(&addr(&lab, "b1")),
        "cross-cloud ping with TTL 1 did not cross a router"
    );

    // What an agent killed before it could unpin leaves in bpffs: teardown removes it.
    let pins = Path::new("/sys/fs/bpf/ferry").join(format!("{prefix}-a1"));
    std::fs::create_dir_all(pins.join("maps")).expect("mkdir on bpffs");
    assert!(
        leftovers(&prefix).iter().any(|l| l.contains("bpffs")),
        "leftovers does not see {}",
        pins.display()
    );

    let reaper_pid = reaper.pid;
    lab.down().expect("clean teardown");
    let left = leftovers(&prefix);
    assert!(left.is_empty(), "left behind: {left:?}");
    assert!(
        !Path::new(&format!("/proc/{reaper_pid}/cmdline")).exists()
            || std::fs::read_to_string(format!("/proc/{reaper_pid}/cmdline"))
                .map(|c| !c.contains(&prefix))
                .unwrap_or(true),
        "the reaper survived teardown"
    );
}

#[test]
fn two_labs_at_once_do_not_interfere() {
    if !ready() {
        return;
    }
    let (l1, l2) = std::thread::scope(|s| {
        let a = s.spawn(default_lab);
        let b = s.spawn(default_lab);
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_ne!(l1.prefix(), l2.prefix());
    // Same addresses, different namespaces.
    assert_ne!(
        std::fs::metadata(l1.netns("a1"))
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .unwrap(),
        std::fs::metadata(l2.netns("a1"))
            .map(|m| std::os::unix::fs::MetadataExt::ino(&m))
            .unwrap()
    );
    // Both work at the same time.
    std::thread::scope(|s| {
        s.spawn(|| assert_full_mesh(&l1));
        s.spawn(|| assert_full_mesh(&l2));
    });
    // A stray process in lab 2 to check that tearing down lab 1 leaves lab 2 alone.
    let mut sleeper = Command::new("sleep");
    sleeper.arg("600");
    ferry_overlay::netns::command_in(&mut sleeper, &l2.netns("b1")).unwrap();
    let mut sleeper = sleeper.spawn().unwrap();

    let p1 = l1.prefix().to_owned();
    let p2 = l2.prefix().to_owned();
    l1.down().expect("lab 1 down");
    let left = leftovers(&p1);
    assert!(left.is_empty(), "lab 1 left behind: {left:?}");
    assert!(
        sleeper.try_wait().unwrap().is_none(),
        "lab 1's teardown killed lab 2's process"
    );
    for node in ["router", "a1", "a2", "b1", "gw", "inet"] {
        assert!(l2.netns(node).exists(), "lab 2 lost {node}");
    }
    assert_full_mesh(&l2);

    // Lab 2's teardown stops the process it did not start but that lives in its namespace.
    l2.down().expect("lab 2 down");
    let status = ferry_tests::poll_until(Duration::from_secs(15), || sleeper.try_wait().unwrap())
        .unwrap_or_else(|| {
            let _ = sleeper.kill();
            let _ = sleeper.wait();
            panic!("lab 2's teardown left a process running inside its namespace");
        });
    assert!(
        !status.success(),
        "the stray process was not stopped: {status}"
    );
    let left = leftovers(&p2);
    assert!(left.is_empty(), "lab 2 left behind: {left:?}");
}

#[test]
fn a_panicking_test_still_tears_its_lab_down() {
    if !ready() {
        return;
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
        let lab = default_lab();
        tx.send(lab.prefix().to_owned()).unwrap();
        assert!(lab.ping("a1", &addr(&lab, "b1")));
        panic!("deliberate panic with lab {} up", lab.prefix());
    }));
    assert!(r.is_err());
    let prefix = rx.recv().unwrap();
    let left = leftovers(&prefix);
    assert!(left.is_empty(), "left behind after unwinding: {left:?}");
}

#[test]
fn the_reaper_cleans_up_after_a_sigkilled_owner() {
    if !ready() {
        return;
    }
    let (mut owner, prefix) = spawn_lab_owner(&[]);
    let st = ferry_lab::status(&prefix).expect("status");
    assert!(
        st.namespaces.iter().all(|n| n.exists),
        "{:?}",
        st.namespaces
    );
    assert_eq!(st.owner_pid, Some(owner.0.id() as i32));
    let reaper = st
        .processes
        .iter()
        .find(|p| p.process.kind == "reaper")
        .expect("reaper");
    assert!(reaper.alive);
    assert!(!leftovers(&prefix).is_empty());

    owner.0.kill().unwrap(); // SIGKILL: no destructor runs
    owner.0.wait().unwrap();
    let t = Instant::now();
    let left = wait_clean(&prefix, Duration::from_secs(30));
    assert!(
        left.is_empty(),
        "30 s after the owner died, still there: {left:?}"
    );
    eprintln!(
        "reaper cleaned lab {prefix} {:?} after the owner died",
        t.elapsed()
    );
}

#[test]
fn cli_up_status_exec_down() {
    if !ready() {
        return;
    }
    let bin = workspace_binary("ferry-lab");
    let out = Command::new(&bin)
        .args(["up", "--no-agents", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let up: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let prefix = up["prefix"].as_str().expect("prefix").to_owned();
    // From here on, make sure the persistent lab goes away even if an assertion fails.
    let _down = DownOnDrop(prefix.clone());
    let hosts = up["hosts"].as_array().expect("hosts");
    let b1 = hosts.iter().find(|h| h["name"] == "b1").expect("b1");
    assert_eq!(b1["address"], "198.18.2.10");
    assert_eq!(b1["namespace"], format!("{prefix}-b1"));
    assert_eq!(up["persistent"], true);

    let exec = |host: &str, cmd: &[&str]| {
        Command::new(&bin)
            .args(["exec", "--lab", &prefix, host, "--"])
            .args(cmd)
            .output()
            .unwrap()
    };
    let o = exec("a1", &["ping", "-c", "1", "-W", "2", "198.18.2.10"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    assert_eq!(exec("inet", &["sh", "-c", "exit 7"]).status.code(), Some(7));
    let o = exec("router", &["ip", "-br", "link"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("br-a"));
    assert!(!exec("nosuch", &["true"]).status.success());

    let o = Command::new(&bin)
        .args(["status", "--lab", &prefix, "--json"])
        .output()
        .unwrap();
    assert!(o.status.success());
    let st: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let ns = st["namespaces"].as_array().unwrap();
    assert_eq!(ns.len(), 6);
    assert!(ns.iter().all(|n| n["exists"] == true), "{ns:?}");

    let o = Command::new(&bin).arg("list").output().unwrap();
    assert!(
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .any(|l| l == prefix)
    );

    let o = Command::new(&bin)
        .args(["down", "--lab", &prefix])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let left = leftovers(&prefix);
    assert!(left.is_empty(), "left behind: {left:?}");
    let o = Command::new(&bin)
        .args(["status", "--lab", &prefix])
        .output()
        .unwrap();
    assert!(!o.status.success(), "status of a removed lab succeeded");
}

#[test]
fn cli_up_rejects_a_malformed_topology_naming_the_field() {
    if !ready() {
        return;
    }
    let bin = workspace_binary("ferry-lab");
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            Topology::default_lab()
                .to_toml()
                .replace("cloud = \"b\"", "cloud = \"c\""),
            "hosts[2].cloud",
        ),
        (
            Topology::default_lab()
                .to_toml()
                .replace("198.18.2.0/24", "198.18.1.0/24"),
            "clouds[2].subnet",
        ),
        (
            Topology::default_lab()
                .to_toml()
                .replace("name = \"a1\"", "name = \"A B\""),
            "hosts[0].name",
        ),
        (
            Topology::default_lab()
                .to_toml()
                .replace("vni = 4242", "vni = 0"),
            "vni",
        ),
        ("[[clouds]\nname = \"a\"\n".to_owned(), "line 1"),
    ];
    for (i, (text, needle)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("bad{i}.toml"));
        std::fs::write(&path, text).unwrap();
        let out = Command::new(&bin)
            .arg("up")
            .arg(&path)
            .arg("--no-agents")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "accepted:\n{text}");
        assert!(err.contains(needle), "{needle:?} not named in: {err}");
        assert!(
            err.contains(&format!("bad{i}.toml")),
            "file not named in: {err}"
        );
        assert!(
            out.stdout.is_empty(),
            "printed a lab: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}
