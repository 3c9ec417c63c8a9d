//! Podman containers with ferry as their network (ferry-cni, Podman's CNI backend) and as
//! CRIU's hook, moved two ways under one live redis client on the internet side (through the
//! container's public address, checking every reply):
//! - by an orchestrator's script (`scripts/podman-migrate.sh`): `ferry migrate prepare`,
//!   `podman container checkpoint --export --tcp-established` on the source (CRIU's
//!   network-lock hook freezes), the archive to the destination, `podman container restore
//!   --import --tcp-established` there (its CNI ADD attaches to the prepared, held endpoint; the
//!   post-resume hook releases and continues the tree CRIU left stopped);
//! - by `ferry migrate run --runtime podman` (the agents run Podman's checkpoint and restore,
//!   the gateway decides), including a restore that fails and rolls back to the source's copy.
//!
//! Each host has its own Podman storage; the image comes from the host's Debian packages (no
//! registry).
use std::{
    net::Ipv4Addr,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use ferry_api::run::{PHASES, RunReport, RunState, RuntimeKind};
use ferry_lab::{Lab, LabOptions};
use ferry_tests::{agents_lab, require_root_and_tools, wait_for, workspace_binary};
use serde_json::Value;

const PUBLIC: &str = "203.0.113.131";
const TOOLS: &[&str] = &[
    "ip",
    "ss",
    "criu",
    "runc",
    "podman",
    "redis-server",
    "busybox",
];

/// redis-server as the image has it, its data directory on the container's own tmpfs
/// (`/tmp`).
fn redis() -> Vec<String> {
    ferry_lab::image::redis_args("/usr/bin/redis-server", "/tmp")
}

fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("no number {k} in {v}"))
}

/// The script, run as an orchestrator would on the gateway host (where `ferry` reaches the
/// gateway), with each side's Podman through `ferry-lab podman`.
fn podman_migrate(lab: &Lab, name: &str, from: &str, to: &str) {
    let out = run_script(lab, name, from, to, None);
    assert!(
        out.status.success(),
        "podman-migrate.sh {name} {from} -> {to} failed ({}); agent logs: {} {}",
        out.status,
        lab.agent_log(from).display(),
        lab.agent_log(to).display()
    );
}

/// The script with the destination's Podman replaced by `dst_podman` if given (a fault).
fn run_script(
    lab: &Lab,
    name: &str,
    from: &str,
    to: &str,
    dst_podman: Option<&str>,
) -> std::process::Output {
    let lab_bin = workspace_binary("ferry-lab");
    let ferry = workspace_binary("ferry");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/podman-migrate.sh");
    let cp = lab.control().expect("control plane");
    let podman_on = |h: &str| format!("{} podman --lab {} {h} --", lab_bin.display(), lab.prefix());
    let mut cmd = Command::new("bash");
    cmd.arg(&script)
        .args([name, to])
        .envs(cp.cli_env())
        .env("SRC_PODMAN", podman_on(from))
        .env(
            "DST_PODMAN",
            dst_podman.map_or_else(|| podman_on(to), str::to_owned),
        )
        // One machine: the destination reads the archive where the source wrote it.
        .env("COPY", "true")
        .env("FERRY", &ferry)
        .env("WORK_DIR", lab.state_dir())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null());
    ferry_overlay::netns::command_in(&mut cmd, &lab.netns(&cp.host)).expect("netns");
    let out = cmd.output().expect("running podman-migrate.sh");
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("podman-migrate.sh {name} {from} -> {to}:\n{stderr}");
    out
}

/// `ferry --json migrate run --runtime podman --container IP --to HOST [extra]`: exit code and
/// report.
fn migrate_run(lab: &Lab, ip: Ipv4Addr, to: &str, extra: &[&str]) -> (i32, RunReport) {
    let from = lab.endpoint_host(ip).unwrap();
    let ip = ip.to_string();
    let mut args = vec![
        "--json",
        "migrate",
        "run",
        "--runtime",
        "podman",
        "--container",
        &ip,
        "--to",
        to,
    ];
    args.extend_from_slice(extra);
    let out = lab.ferry(&args).expect("running ferry");
    report(lab, &from, to, extra, &out)
}

/// `ferry migrate run --runtime podman` with fault point `point` armed: once a process
/// reaches it, `victim`'s agent is killed (SIGKILL) and started again, and the point is
/// disarmed; the run goes on with the restarted agent.
fn migrate_run_killing(
    lab: &mut Lab,
    ip: Ipv4Addr,
    to: &str,
    point: &str,
    victim: &str,
) -> (i32, RunReport) {
    let from = lab.endpoint_host(ip).unwrap();
    let dir = lab.fault_dir();
    let armed = dir.join(point);
    let reached = dir.join(format!("{point}.reached"));
    let _ = std::fs::remove_file(&reached);
    std::fs::write(&armed, b"").expect("arming the fault point");
    let ip_s = ip.to_string();
    let child = lab
        .ferry_command(&[
            "--json",
            "migrate",
            "run",
            "--runtime",
            "podman",
            "--container",
            &ip_s,
            "--to",
            to,
        ])
        .expect("the ferry command")
        .spawn()
        .expect("starting ferry");
    let hit =
        ferry_lab::clock::wait_until(Duration::from_secs(60), Duration::from_millis(10), || {
            Ok::<_, std::io::Error>(reached.exists().then_some(()))
        });
    if !matches!(hit, Ok(Some(()))) {
        let _ = std::fs::remove_file(&armed);
        panic!(
            "fault point {point} not reached: {:?}",
            child.wait_with_output()
        );
    }
    eprintln!("{point} reached: killing {victim}'s agent");
    lab.restart_agent(victim, libc::SIGKILL)
        .expect("restarting the agent");
    std::fs::remove_file(&armed).expect("disarming");
    let out = child.wait_with_output().expect("ferry");
    let what = format!("{victim}'s agent killed at {point}");
    report(lab, &from, to, &[&what], &out)
}

/// The run report `ferry --json migrate run` printed; a released run settles the source.
fn report(
    lab: &Lab,
    from: &str,
    to: &str,
    extra: &[&str],
    out: &std::process::Output,
) -> (i32, RunReport) {
    let (code, r) =
        ferry_tests::run_report(&format!("migrate run --runtime podman {extra:?}"), out);
    if r.state == RunState::Released
        && let Some(id) =
            inspect(lab, to, "redis").and_then(|c| c["Id"].as_str().map(str::to_owned))
    {
        // Two lab hosts share one machine's cgroups (see the function's doc); not needed
        // between separate machines.
        let stale = ferry_lab::podman::settle_source(lab, from, &id).expect("settling the source");
        eprintln!("the source's stale runc state removed: {stale}");
    }
    (code, r)
}

/// The container's state on `host` (`podman inspect`), if it exists there.
fn inspect(lab: &Lab, host: &str, name: &str) -> Option<Value> {
    let out = lab
        .podman(host)
        .unwrap()
        .command(&["container", "inspect", name])
        .unwrap()
        .output()
        .unwrap();
    if !out.status.success() {
        return None;
    }
    let v: Value = serde_json::from_slice(&out.stdout).expect("inspect json");
    v.as_array().and_then(|a| a.first().cloned())
}

/// A run from a1 to b1 that rolled back: the source's same tree (`pid`) runs again on a1,
/// nothing of the container is left in b1's Podman; then some load on it.
fn assert_rolled_back_to(lab: &Lab, ip: Ipv4Addr, pid: i64, (code, r): (i32, RunReport)) {
    assert_eq!((code, r.state), (3, RunState::RolledBack), "{r:?}");
    assert_eq!(
        running_on(lab, "a1", "redis", ip),
        pid,
        "the same tree resumed"
    );
    wait_for("nothing left on b1", Duration::from_secs(20), || {
        inspect(lab, "b1", "redis").is_none().then_some(())
    });
    ferry_tests::keep_load_for(Duration::from_millis(500));
}

fn running_on(lab: &Lab, host: &str, name: &str, ip: Ipv4Addr) -> i64 {
    assert_eq!(lab.endpoint_host(ip).unwrap(), host);
    let c = inspect(lab, host, name).unwrap_or_else(|| panic!("no container {name} on {host}"));
    assert_eq!(c["State"]["Running"], true, "{c}");
    let pid = c["State"]["Pid"].as_i64().expect("pid");
    // In its own mount namespace, on its own root file system.
    let mnt = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/mnt")).unwrap();
    assert_ne!(mnt(&pid.to_string()), mnt("self"), "{c}");
    pid
}

#[test]
fn a_podman_container_moves_across_clouds_and_back_with_the_orchestrator_script() {
    if !require_root_and_tools(TOOLS) {
        return;
    }
    workspace_binary("ferry-workload");
    workspace_binary("ferry-cni");
    let image = ferry_lab::image::build("redis").expect("building the redis image");
    let tag = format!("localhost/ferry-{}", image.image);
    let archive = ferry_lab::podman::image_archive(&image.path, &tag).expect("image archive");
    let mut lab = agents_lab(LabOptions::default());
    let hook = lab.hook_files().expect("hook files");
    for h in ["a1", "b1"] {
        lab.podman(h).unwrap().load(&archive).expect("podman load");
    }
    let annotation = format!("org.criu.config={}", hook.criu_conf.display());
    let mut run = vec![
        "run",
        "-d",
        "--name",
        "redis",
        "--network",
        ferry_lab::podman::NETWORK,
        "--annotation",
        &annotation,
        &tag,
    ];
    let argv = redis();
    run.extend(argv.iter().map(String::as_str));
    let id = lab.podman("a1").unwrap().run(&run).expect("podman run");
    let c = inspect(&lab, "a1", "redis").expect("the container");
    let ip: Ipv4Addr = c["NetworkSettings"]["Networks"][ferry_lab::podman::NETWORK]["IPAddress"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no ferry address in {c}"));
    let mac = c["NetworkSettings"]["Networks"][ferry_lab::podman::NETWORK]["MacAddress"].clone();
    eprintln!("podman container {id} on a1: {ip} {mac}");
    let ns = lab.container_netns("a1", ip);
    ferry_tests::workload::wait_listening(&lab, &ns, 6379);
    lab.ferry_json(&[
        "public",
        "add",
        "--public",
        PUBLIC,
        "--container",
        &ip.to_string(),
    ])
    .expect("public add");
    lab.sync().unwrap();

    // The gateway's token is nowhere in the container's file system.
    let cp = lab.control().unwrap();
    let token = cp.token_file.to_string_lossy().into_owned();
    let out = lab
        .podman("a1")
        .unwrap()
        .command(&["exec", "redis", "cat", &token])
        .unwrap()
        .output()
        .unwrap();
    assert!(!out.status.success(), "the container read {token}");

    let client = ferry_tests::workload::Workload::start(
        &lab.netns("inet"),
        &[
            "redis-client",
            "--to",
            &format!("{PUBLIC}:6379"),
            "--connections",
            "2",
            "--interval-ms",
            "5",
            "--duration-ms",
            "600000",
            "--json",
        ],
    );
    client.connected(Duration::from_secs(10));
    ferry_tests::keep_load_for(Duration::from_millis(500));

    podman_migrate(&lab, "redis", "a1", "b1");
    running_on(&lab, "b1", "redis", ip);
    let moved = inspect(&lab, "b1", "redis").unwrap();
    assert_eq!(
        moved["NetworkSettings"]["Networks"][ferry_lab::podman::NETWORK]["MacAddress"],
        mac,
        "{moved}"
    );
    assert!(
        inspect(&lab, "a1", "redis").is_none(),
        "the source's copy is gone"
    );
    ferry_tests::keep_load_for(Duration::from_millis(500));

    // Back with `ferry migrate run --runtime podman`: the agents run Podman.
    let (code, r) = migrate_run(&lab, ip, "a1", &[]);
    assert_eq!(
        (code, r.state),
        (0, RunState::Released),
        "{r:?}\nagent logs: {} {}",
        lab.agent_log("b1").display(),
        lab.agent_log("a1").display()
    );
    let names: Vec<&str> = r.phases.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, PHASES, "{r:?}");
    assert!(r.image_bytes > 0, "{r:?}");
    assert!(
        r.criu.as_ref().is_some_and(|s| s.frozen_ms > 0.0),
        "CRIU's figures from Podman's --print-stats: {r:?}"
    );
    let pid = running_on(&lab, "a1", "redis", ip);
    let p = lab.process(ip).unwrap().expect("the agent knows the tree");
    assert_eq!(
        (p.runtime, p.pid as i64),
        (RuntimeKind::Podman, pid),
        "{p:?}"
    );
    wait_for("b1's copy is gone", Duration::from_secs(10), || {
        inspect(&lab, "b1", "redis").is_none().then_some(())
    });
    ferry_tests::keep_load_for(Duration::from_millis(500));

    // A restore that fails at the destination rolls back: the source's stopped copy runs
    // again, the same tree; nothing of it is left in b1's Podman.
    let run = migrate_run(&lab, ip, "b1", &["--fail", "restore"]);
    assert_rolled_back_to(&lab, ip, pid, run);

    // The orchestrator's first restore fails at the destination after Podman's CNI ADD
    // attached it (CRIU's post-restore hook fails once): Podman's DEL leaves the prepared,
    // held endpoint, and the second try attaches to it again and releases. Nothing reset.
    ferry_api::faultpoint::arm_once_in(&lab.fault_dir(), ferry_api::faultpoint::FAIL_POST_RESTORE)
        .expect("arming the fault");
    let out = run_script(&lab, "redis", "a1", "b1", None);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the retry must succeed: {stderr}");
    assert!(stderr.contains("restore failed (try 1 of 2)"), "{stderr}");
    running_on(&lab, "b1", "redis", ip);
    assert!(inspect(&lab, "a1", "redis").is_none());
    ferry_tests::keep_load_for(Duration::from_millis(500));
    let (code, r) = migrate_run(&lab, ip, "a1", &[]);
    assert_eq!((code, r.state), (0, RunState::Released), "{r:?}");
    running_on(&lab, "a1", "redis", ip);

    // The orchestrator's restore fails at the destination (its Podman is gone): the script
    // aborts and restores the archive on the source, whose network is still there; the
    // container runs on a1 again, with the same address, and nothing is reset.
    let out = run_script(&lab, "redis", "a1", "b1", Some("false"));
    assert!(!out.status.success(), "the script must fail");
    let pid = running_on(&lab, "a1", "redis", ip);
    assert!(inspect(&lab, "b1", "redis").is_none());
    ferry_tests::keep_load_for(Duration::from_millis(500));
    // And it still moves with ferry afterwards.
    let (code, r) = migrate_run(&lab, ip, "b1", &[]);
    assert_eq!((code, r.state), (0, RunState::Released), "{r:?}");
    assert_ne!(running_on(&lab, "b1", "redis", ip), pid);
    let (code, r) = migrate_run(&lab, ip, "a1", &[]);
    assert_eq!((code, r.state), (0, RunState::Released), "{r:?}");
    running_on(&lab, "a1", "redis", ip);

    // An agent killed mid-run and started again: the source's after Podman's checkpoint
    // (the tree stopped, its images on disk), the destination's before Podman's restore.
    // Either way the run rolls back and the source's same tree runs again; one copy.
    for (point, victim) in [("transfer", "a1"), ("restore", "b1")] {
        let pid = running_on(&lab, "a1", "redis", ip);
        let run = migrate_run_killing(&mut lab, ip, "b1", point, victim);
        assert_rolled_back_to(&lab, ip, pid, run);
    }
    let (code, r) = migrate_run(&lab, ip, "b1", &[]);
    assert_eq!((code, r.state), (0, RunState::Released), "{r:?}");
    let (code, r) = migrate_run(&lab, ip, "a1", &[]);
    assert_eq!((code, r.state), (0, RunState::Released), "{r:?}");

    // Refused before anything is frozen: criu-lock (a Podman container's lock is its CRIU
    // configuration's), and an address no container has.
    let (code, r) = migrate_run(&lab, ip, "b1", &["--lock", "criu-lock"]);
    assert_eq!((code, r.state), (3, RunState::RolledBack), "{r:?}");
    assert!(
        r.error.as_deref().is_some_and(|e| e.contains("hold mode")),
        "{r:?}"
    );
    running_on(&lab, "a1", "redis", ip);

    // The client: every command answered, counters exact (the client checks each INCR),
    // nothing reset, both connections alive through both moves.
    let (code, s) = client.stop(Duration::from_secs(20));
    assert_eq!(u(&s, "resets"), 0, "{s}");
    assert_eq!(u(&s, "reconnects"), 0, "{s}");
    assert_eq!(u(&s, "errors"), 0, "{s}");
    assert_eq!(u(&s, "mismatches"), 0, "{s}");
    assert_eq!(u(&s, "alive"), 2, "{s}");
    assert_eq!(code, 0, "{s}");
    eprintln!("client max_gap_ms {}", s["max_gap_ms"]);
    wait_for("the public address answers", Duration::from_secs(5), || {
        lab.exec("inet", &["redis-cli", "-h", PUBLIC, "-p", "6379", "ping"])
            .ok()
            .filter(|o| String::from_utf8_lossy(&o.stdout).contains("PONG"))
    });
}
