//! The agent's container runtime in a real lab: `ferry-workload serve` started in container
//! 10.244.1.10 on a1 through the agent's peer API is PID 1 of a new PID namespace, in the
//! container's network namespace and a private mount namespace, a session leader with
//! stdio on /dev/null, a child of the agent; it serves a client in another container; a second
//! start is a conflict, an unknown container is not local, a missing program fails to spawn
//! and leaves nothing behind; DELETE stops it; an agent that stops leaves it running, and the
//! lab's teardown kills what runs.
use std::{
    collections::HashSet,
    net::Ipv4Addr,
    os::unix::fs::MetadataExt as _,
    path::Path,
    time::{Duration, Instant},
};

use ferry_lab::{Lab, LabOptions, procs};
use ferry_tests::{agents_lab, require_root_and_tools, workspace_binary};
use serde_json::Value;

const C: &str = "10.244.1.10";
const PEER: &str = "10.244.2.10";
const PORT: &str = "7000";

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

/// Fields of /proc/PID/stat after the command name: [state, ppid, pgrp, session, ...].
fn stat_fields(pid: i32) -> Vec<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &text[text.rfind(')').unwrap() + 1..];
    rest.split_whitespace().map(str::to_owned).collect()
}

fn ns_link(pid: i32, ns: &str) -> String {
    std::fs::read_link(format!("/proc/{pid}/ns/{ns}"))
        .unwrap()
        .display()
        .to_string()
}

fn agent_pid(lab: &Lab, host: &str) -> i32 {
    ferry_lab::status(lab.prefix())
        .unwrap()
        .processes
        .iter()
        .find(|p| p.process.kind == "agent" && p.process.host.as_deref() == Some(host))
        .unwrap_or_else(|| panic!("no agent of {host}"))
        .process
        .pid
}

/// Processes inside a network namespace.
fn pids_in(netns: &Path) -> Vec<i32> {
    let ids: HashSet<(u64, u64)> = [procs::ns_id(netns).unwrap()].into();
    procs::pids_in_netns(&ids)
}

/// The process is gone, its PID reused, or it is a zombie (an orphan whose agent exited is
/// reaped by init, in its own time).
fn gone(pid: i32, start: u64) -> bool {
    procs::stat(pid).map_or(true, |(state, s)| s != start || state == 'Z')
}

/// `ferry-workload client` in `netns` against the container: passes (exit 0) within a few
/// tries (the server may still be opening its socket).
fn client_passes(lab: &Lab, netns: &Path, workload: &str) -> Value {
    let to = format!("{C}:{PORT}");
    let mut last = String::new();
    let passed = ferry_tests::poll_until(Duration::from_secs(15), || {
        let out = lab
            .exec_in(
                netns,
                &[
                    workload,
                    "client",
                    "--to",
                    &to,
                    "--connections",
                    "4",
                    "--interval-ms",
                    "10",
                    "--duration-ms",
                    "500",
                    "--json",
                ],
            )
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        if out.status.success() {
            return Some(serde_json::from_str(stdout.trim()).unwrap());
        }
        last = format!(
            "{:?}: {stdout} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        None
    });
    passed.unwrap_or_else(|| panic!("the client never passed: {last}"))
}

/// The error's text: it ends with the API's `(code, HTTP status)`.
fn error_code(e: &ferry_lab::LabError) -> String {
    e.to_string()
}

#[test]
fn the_agent_runs_a_container_process_criu_can_move() {
    if !require_root_and_tools(&["ip", "curl"]) {
        return;
    }
    let workload = workspace_binary("ferry-workload");
    let workload = workload.to_str().unwrap();
    let lab = agents_lab(LabOptions::default());
    let c_ns = lab.add_container("a1", ip(C)).unwrap();
    let peer_ns = lab.add_container("b1", ip(PEER)).unwrap();

    // Start: the agent of the container's host (a1) answers 201 with the process.
    let p = lab
        .start_process(ip(C), &[workload, "serve", "--port", PORT])
        .expect("start");
    eprintln!("started {p:?}");
    assert_eq!(p.container, ip(C));
    assert!(p.running && p.ended.is_none(), "{p:?}");
    assert_eq!(p.origin, "started");
    assert_eq!(p.argv, [workload, "serve", "--port", PORT]);
    let pid = p.pid;
    let start = procs::start_time(pid).unwrap();
    let agent = agent_pid(&lab, "a1");

    // Its shape, from /proc.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let nspid: Vec<&str> = status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .unwrap()
        .split_whitespace()
        .collect();
    assert_eq!(nspid, [pid.to_string().as_str(), "1"], "NSpid: {nspid:?}");
    let stat = stat_fields(pid);
    assert_eq!(stat[1], agent.to_string(), "the agent is the parent");
    assert_eq!(stat[3], pid.to_string(), "a session leader (sid == pid)");
    assert_eq!(stat[2], pid.to_string(), "its own process group");
    let ns_ino = std::fs::metadata(format!("/proc/{pid}/ns/net"))
        .unwrap()
        .ino();
    assert_eq!(
        ns_ino,
        std::fs::metadata(&c_ns).unwrap().ino(),
        "in the container's network namespace"
    );
    assert_ne!(ns_link(pid, "pid"), ns_link(agent, "pid"), "a new PID ns");
    assert_ne!(
        ns_link(pid, "mnt"),
        ns_link(agent, "mnt"),
        "a private mount ns (secrets.rs checks what it hides)"
    );
    for fd in 0..3 {
        let target = std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap();
        assert_eq!(target, Path::new("/dev/null"), "fd {fd}");
    }
    assert_eq!(
        std::fs::read_link(format!("/proc/{pid}/cwd")).unwrap(),
        Path::new("/")
    );
    let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
    let environ: Vec<String> = environ
        .split(|b| *b == 0)
        .filter(|v| !v.is_empty())
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .collect();
    assert_eq!(
        environ,
        ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
    );
    let fds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    eprintln!("fds of the server: {fds:?}");

    // It serves a client in another container, on another host in another cloud.
    let summary = client_passes(&lab, &peer_ns, workload);
    eprintln!("client: {summary}");

    // The agent knows it: GET, and /v1/status.
    let known = lab.process(ip(C)).unwrap().expect("a process");
    assert_eq!(known, p);
    let out = lab
        .exec("a1", &["curl", "-sf", "http://127.0.0.1:9464/v1/status"])
        .unwrap();
    let st: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st["processes"][0]["pid"], pid, "{st}");
    assert_eq!(st["processes"][0]["running"], true, "{st}");

    // A second start is a conflict, and changes nothing.
    let e = lab
        .start_process(ip(C), &[workload, "serve", "--port", "7001"])
        .unwrap_err();
    assert!(error_code(&e).contains("(conflict, HTTP 409)"), "{e}");
    assert!(!gone(pid, start));
    assert_eq!(lab.process(ip(C)).unwrap().as_ref(), Some(&p));

    // Not built here: an unknown container, and a container of another host.
    let e = lab
        .start_process_on("a1", ip("10.244.9.9"), &["/bin/sleep", "10"])
        .unwrap_err();
    assert!(error_code(&e).contains("(not_local, HTTP 404)"), "{e}");
    let e = lab
        .start_process_on("a2", ip(C), &["/bin/sleep", "10"])
        .unwrap_err();
    assert!(error_code(&e).contains("(not_local, HTTP 404)"), "{e}");

    // Bad requests.
    for argv in [&[][..], &["sleep", "10"][..]] {
        let e = lab.start_process(ip(PEER), argv).unwrap_err();
        assert!(error_code(&e).contains("(bad_request, HTTP 400)"), "{e}");
    }
    let (status, body) = lab
        .agent_request(
            "b1",
            "POST",
            &format!("/v1/containers/{PEER}/start"),
            Some(br#"{"argv":["/bin/true"],"bogus":1}"#),
        )
        .unwrap();
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));
    // No TLS, no service; TLS without the token, no service either.
    let b1 = lab.host("b1").unwrap().address;
    let operator = lab
        .control()
        .unwrap()
        .client_tls(ferry_lab::control::Party::Operator)
        .unwrap();
    let addr = std::net::SocketAddr::new(b1.into(), 7401);
    let path = format!("/v1/containers/{PEER}");
    let no_token = ferry_overlay::netns::run_in(&lab.netns("b1"), move || {
        ferry_api::transport::Request::get(path)
            .tls(operator)
            .send_blocking(addr)
    })
    .unwrap()
    .unwrap();
    assert_eq!(no_token.status, 401);
    let out = lab
        .exec(
            "b1",
            &[
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &format!("http://{b1}:7401/v1/containers/{PEER}"),
            ],
        )
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "400",
        "plain HTTP: tls_required"
    );

    // A program that does not exist: spawn_failed with the errno's text, nothing left.
    let e = lab
        .start_process(ip(PEER), &["/nonexistent/program", "x"])
        .unwrap_err();
    let msg = error_code(&e);
    assert!(msg.contains("(spawn_failed, HTTP 500)"), "{msg}");
    assert!(msg.contains("No such file or directory"), "{msg}");
    assert_eq!(lab.process(ip(PEER)).unwrap(), None);
    assert_eq!(pids_in(&peer_ns), Vec::<i32>::new());

    // DELETE stops it: SIGTERM (ferry-workload exits 0 on it; a PID 1 without a handler
    // would ignore it and get SIGKILL after 2 s: the runtime's unit test covers that).
    let t0 = Instant::now();
    let stopped = lab.stop_process(ip(C)).unwrap();
    eprintln!("stopped in {:?}: {stopped:?}", t0.elapsed());
    assert_eq!(stopped.pid, pid);
    assert!(!stopped.running, "{stopped:?}");
    let ended = stopped.ended.clone().unwrap_or_default();
    assert!(
        ended.starts_with("killed by ") || ended.starts_with("exited "),
        "{ended}"
    );
    assert!(gone(pid, start), "PID {pid} still there");
    assert_eq!(pids_in(&c_ns), Vec::<i32>::new());
    // It stays listed, ended, until the next start.
    assert_eq!(lab.process(ip(C)).unwrap(), Some(stopped.clone()));
    let e = lab.stop_process(ip("10.244.2.10")).unwrap_err();
    assert!(error_code(&e).contains("(no_process, HTTP 404)"), "{e}");

    // Start again (the slot is free), and one on b1 too. An agent that stops (SIGTERM, as
    // an upgrade does) leaves its containers' processes running (the next agent re-adopts
    // them, see agent_restart.rs); the lab's teardown kills them with the namespaces.
    let p2 = lab
        .start_process(ip(C), &[workload, "serve", "--port", PORT])
        .unwrap();
    assert_ne!(p2.pid, pid);
    let p3 = lab
        .start_process(ip(PEER), &["/bin/sleep", "1000"])
        .unwrap();
    let (s2, s3) = (
        procs::start_time(p2.pid).unwrap(),
        procs::start_time(p3.pid).unwrap(),
    );
    client_passes(&lab, &peer_ns, workload);

    // An endpoint removed from the registry (not migrated): its namespace goes, and its
    // process tree with it.
    let gone_ip = ip("10.244.1.20");
    lab.add_container("a2", gone_ip).unwrap();
    lab.sync().unwrap();
    let p4 = lab.start_process(gone_ip, &["/bin/sleep", "1000"]).unwrap();
    let s4 = procs::start_time(p4.pid).unwrap();
    lab.ferry_json(&["endpoint", "rm", "10.244.1.20"]).unwrap();
    ferry_tests::wait_for(
        &format!("the process of the removed endpoint to stop: {p4:?}"),
        Duration::from_secs(10),
        || gone(p4.pid, s4).then_some(()),
    );

    let log = lab.agent_log("a1");
    // SAFETY: kill(2) on the a1 agent's PID, read from the lab's state just now.
    assert_eq!(unsafe { libc::kill(agent, libc::SIGTERM) }, 0);
    // The agent is the lab's child: it stays a zombie until the lab reaps it.
    ferry_tests::wait_for("the agent of a1 to stop", Duration::from_secs(15), || {
        (!procs::stat(agent).is_ok_and(|(state, _)| state != 'Z')).then_some(())
    });
    assert!(
        !gone(p2.pid, s2),
        "a1's container process did not survive its agent's SIGTERM"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("process trees left running for the next agent"),
        "agent log:\n{text}"
    );
    lab.down().unwrap();
    assert!(gone(p2.pid, s2), "a1's container process survived the lab");
    assert!(gone(p3.pid, s3), "b1's container process survived the lab");
}
