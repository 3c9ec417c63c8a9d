//! OCI containers under runc, migrated by `ferry migrate run` in a real lab: redis-server in
//! its own root file system (an image built from the host's Debian packages, no registry),
//! its own mount, PID, IPC and UTS namespaces and cgroups, in the network namespace the agent
//! built, moved across clouds and back under a live redis client through its public address;
//! a failed dump and a failed restore roll back to the source's copy; bad input is refused
//! clearly. Timing figures are printed for the log, never asserted.
use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use ferry_api::run::{ContainerProcess, PHASES, RunReport, RunState, RuntimeKind};
use ferry_lab::{Lab, LabOptions};
use ferry_tests::{agents_lab, require_root_and_tools, workload::Workload, workspace_binary};
use serde_json::Value;

const C: &str = "10.244.1.10";
const PUBLIC: &str = "203.0.113.130";
const TOOLS: &[&str] = &["ip", "ss", "criu", "runc", "redis-server", "busybox"];

fn c() -> Ipv4Addr {
    C.parse().unwrap()
}

/// redis-server as the image has it, its data directory on the container's own tmpfs
/// (`/tmp`).
fn redis() -> Vec<String> {
    ferry_lab::image::redis_args("/usr/bin/redis-server", "/tmp")
}

/// A lab with container C on a1 and its public address, the redis image built (or found in
/// the cache), and redis-server started in C under runc.
fn lab_with_runc_redis() -> (Lab, PathBuf, ferry_lab::image::Image, ContainerProcess) {
    workspace_binary("ferry-workload");
    let image = ferry_lab::image::build("redis").expect("building the redis image");
    eprintln!(
        "image {} ({} packages, {} built now: {})",
        image.path.display(),
        image.packages.len(),
        image.files.len(),
        image.built
    );
    let lab = agents_lab(LabOptions::default());
    let ns = lab.add_container("a1", c()).expect("container on a1");
    lab.ferry_json(&["public", "add", "--public", PUBLIC, "--container", C])
        .expect("public add");
    lab.sync().unwrap();
    let p = lab
        .start_runc(
            c(),
            &image.image,
            &redis().iter().map(String::as_str).collect::<Vec<_>>(),
        )
        .expect("start redis-server under runc");
    eprintln!("redis under runc: {p:?}");
    assert_eq!(p.runtime, RuntimeKind::Runc);
    assert_eq!(p.image.as_deref(), Some(image.image.as_str()));
    ferry_tests::workload::wait_listening(&lab, &ns, 6379);
    (lab, ns, image, p)
}

/// `ferry --json migrate run --container C --to HOST [extra]`: exit code and report.
fn migrate(lab: &Lab, to: &str, extra: &[&str]) -> (i32, RunReport) {
    let mut args = vec!["--json", "migrate", "run", "--container", C, "--to", to];
    args.extend_from_slice(extra);
    let t0 = Instant::now();
    let out = lab.ferry(&args).expect("running ferry");
    eprintln!("wall {:?}", t0.elapsed());
    ferry_tests::run_report(&format!("ferry {args:?}"), &out)
}

fn migrate_ok(lab: &Lab, from: &str, to: &str) -> RunReport {
    let (code, r) = migrate(lab, to, &["--runtime", "runc"]);
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
    assert!(r.image_bytes > 0, "{r:?}");
    assert!(
        r.criu.as_ref().is_some_and(|s| s.frozen_ms > 0.0),
        "CRIU's figures from its stats image: {r:?}"
    );
    r
}

/// The container's process as the agent of `host` knows it: running there, under runc.
fn running_on(lab: &Lab, host: &str) -> ContainerProcess {
    assert_eq!(lab.endpoint_host(c()).unwrap(), host);
    let p = lab
        .process(c())
        .unwrap()
        .unwrap_or_else(|| panic!("no process for {C} on {host}"));
    assert!(p.running && p.fenced.is_none(), "{p:?}");
    assert_eq!(p.runtime, RuntimeKind::Runc, "{p:?}");
    p
}

fn ns_of(pid: &str, ns: &str) -> PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).unwrap()
}

/// `pid` is an OCI container's PID 1 on `image`: in its own mount, PID, IPC and UTS
/// namespaces (not the agent's, which are this test's), its root the image, in the
/// container's network namespace, in a cgroup of its own.
fn assert_contained(lab: &Lab, host: &str, pid: i32, image: &ferry_lab::image::Image) {
    let p = pid.to_string();
    for ns in ["mnt", "pid", "ipc", "uts"] {
        assert_ne!(ns_of(&p, ns), ns_of("self", ns), "{ns} namespace of {pid}");
    }
    let container_net =
        ferry_lab::procs::ns_id(&lab.container_netns(host, c())).expect("container netns");
    assert_eq!(
        ferry_lab::procs::ns_id(Path::new(&format!("/proc/{p}/ns/net"))).unwrap(),
        container_net,
        "in the container's network namespace"
    );
    let status = std::fs::read_to_string(format!("/proc/{p}/status")).unwrap();
    let nspid = status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .unwrap()
        .split_whitespace()
        .last()
        .unwrap()
        .to_owned();
    assert_eq!(nspid, "1", "PID 1 of its PID namespace");
    // Its root is the image (its manifest, its own /etc/passwd), not the host's.
    let root = PathBuf::from(format!("/proc/{p}/root"));
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(root.join(".ferry-image.json")).unwrap()).unwrap();
    assert_eq!(manifest["image"], image.image.as_str());
    assert_eq!(
        std::fs::read(root.join("etc/passwd")).unwrap(),
        std::fs::read(image.path.join("etc/passwd")).unwrap()
    );
    assert!(!root.join("usr/bin/cargo").exists() && !root.join("root/.cargo").exists());
    let mounts = std::fs::read_to_string(format!("/proc/{p}/mountinfo")).unwrap();
    let root_mount = mounts
        .lines()
        .find(|l| l.split(' ').nth(4) == Some("/"))
        .unwrap();
    assert!(
        root_mount.contains(" ro,") || root_mount.contains(" ro "),
        "{root_mount}"
    );
    for dir in ["/dev", "/tmp"] {
        assert!(
            mounts
                .lines()
                .any(|l| l.split(' ').nth(4) == Some(dir) && l.contains(" - tmpfs ")),
            "{dir} is a tmpfs: {mounts}"
        );
    }
    let cgroup = std::fs::read_to_string(format!("/proc/{p}/cgroup")).unwrap();
    let id = lab
        .container_netns(host, c())
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(
        cgroup
            .lines()
            .any(|l| l.contains("freezer:") && l.ends_with(&format!("ferry/{id}"))),
        "a cgroup of its own: {cgroup}"
    );
    assert!(status.lines().any(|l| l == "NoNewPrivs:\t1"), "{status}");
}

/// The redis client through the public address, with its per-request samples.
/// A redis client through the public address, running until the test stops it.
fn redis_client(lab: &Lab, samples: &Path) -> Workload {
    let to = format!("{PUBLIC}:6379");
    let client = Workload::start(
        &lab.netns("inet"),
        &[
            "redis-client",
            "--to",
            &to,
            "--connections",
            "2",
            "--interval-ms",
            "5",
            "--duration-ms",
            "600000",
            "--samples",
            samples.to_str().unwrap(),
            "--json",
        ],
    );
    client.connected(Duration::from_secs(10));
    client
}

fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("no number {k} in {v}"))
}

/// Nothing reset, lost, wrong or reconnected; every connection alive.
fn assert_redis_clean(code: i32, s: &Value) {
    for k in ["reconnects", "resets", "errors", "mismatches", "unanswered"] {
        assert_eq!(u(s, k), 0, "{k}: {s}");
    }
    assert_eq!(u(s, "alive"), 2, "{s}");
    assert!(u(s, "requests") > 0, "{s}");
    assert_eq!(code, 0, "{s}");
}

/// Answered requests per connection sent before `t0` and after `t1` (Unix ms).
fn answered_around(samples: &Path, t0: f64, t1: f64) -> ([u64; 2], [u64; 2]) {
    let csv = std::fs::read_to_string(samples).unwrap();
    let (mut before, mut after) = ([0u64; 2], [0u64; 2]);
    for line in csv.lines() {
        let cols: Vec<&str> = line.split(',').collect();
        let Some(t) = cols.first().and_then(|t| t.parse::<f64>().ok()) else {
            continue;
        };
        let conn: usize = cols[1].parse().unwrap();
        let answered = cols.get(3).is_some_and(|l| !l.trim().is_empty());
        if answered && t < t0 {
            before[conn] += 1;
        }
        if answered && t > t1 {
            after[conn] += 1;
        }
    }
    (before, after)
}

#[test]
fn runc_redis_moves_across_clouds_and_back_with_a_live_client() {
    if !require_root_and_tools(TOOLS) {
        return;
    }
    let (lab, _ns, image, started) = lab_with_runc_redis();
    assert_contained(&lab, "a1", started.pid, &image);
    let samples = std::env::temp_dir().join(format!("ferry-runc-redis-{}.csv", lab.prefix()));
    let client = redis_client(&lab, &samples);
    ferry_tests::keep_load_for(Duration::from_millis(700));

    let there = migrate_ok(&lab, "a1", "b1");
    let on_b1 = running_on(&lab, "b1");
    assert_eq!(on_b1.origin, "restored");
    assert_contained(&lab, "b1", on_b1.pid, &image);
    ferry_tests::keep_load_for(Duration::from_millis(500));
    let back = migrate_ok(&lab, "b1", "a1");
    let on_a1 = running_on(&lab, "a1");
    assert_eq!(on_a1.origin, "restored");
    assert_contained(&lab, "a1", on_a1.pid, &image);
    // The source's copy goes once the destination runs (the fencing kills it, silently:
    // its sockets are in repair mode): nothing of C stays on b1.
    ferry_tests::wait_for(
        "b1's stopped copy killed once a1 runs the container",
        Duration::from_secs(10),
        || {
            let Ok(id) = ferry_lab::procs::ns_id(&lab.container_netns("b1", c())) else {
                return Some(());
            };
            ferry_lab::procs::pids_in_netns(&std::collections::HashSet::from([id]))
                .is_empty()
                .then_some(())
        },
    );

    ferry_tests::keep_load_for(Duration::from_millis(500));
    let (code, s) = client.stop(Duration::from_secs(20));
    let (before, after) = answered_around(
        &samples,
        there.started_unix_ms,
        back.started_unix_ms + back.total_ms,
    );
    let _ = std::fs::remove_file(&samples);
    eprintln!(
        "runc redis: max_gap_ms {}, stopped_ms {:.1} / {:.1}; answered {before:?} before, \
         {after:?} after",
        s["max_gap_ms"], there.stopped_ms, back.stopped_ms
    );
    assert_redis_clean(code, &s);
    // Every INCR was exactly the previous value + 1 (the client counts a mismatch
    // otherwise), and the counters went on past what was answered before the first move:
    // the restored server's memory carried them.
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
            "connection {i}: {} answered after",
            after[i]
        );
        assert!(
            finals[i] > before[i] / 5 + 1,
            "connection {i}: final counter {} with {} answered before the moves",
            finals[i],
            before[i]
        );
    }
    // The lab goes with everything runc made: containers, their cgroups, its state.
    let prefix = lab.prefix().to_owned();
    lab.down().expect("lab down");
    let left = ferry_lab::leftovers(&prefix);
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn runc_failed_dump_and_failed_restore_roll_back() {
    if !require_root_and_tools(TOOLS) {
        return;
    }
    let (lab, _ns, image, started) = lab_with_runc_redis();
    let samples = std::env::temp_dir().join(format!("ferry-runc-fail-{}.csv", lab.prefix()));
    let client = redis_client(&lab, &samples);
    ferry_tests::keep_load_for(Duration::from_millis(500));
    for fail in ["dump", "restore"] {
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
        let p = ferry_tests::wait_for(
            &format!("after --fail {fail}: the source's copy runs again"),
            Duration::from_secs(10),
            || {
                lab.process(c())
                    .ok()
                    .flatten()
                    .filter(|p| p.running && p.fenced.is_none())
            },
        );
        assert_eq!(p.pid, started.pid, "--fail {fail}: the same tree resumed");
        assert_eq!(p.origin, "started");
        assert_eq!(lab.endpoint_host(c()).unwrap(), "a1");
        // b1 keeps nothing: no process in its copy of the namespace.
        ferry_tests::wait_for(
            &format!("--fail {fail}: nothing of the container left on b1"),
            Duration::from_secs(10),
            || {
                let Ok(id) = ferry_lab::procs::ns_id(&lab.container_netns("b1", c())) else {
                    return Some(());
                };
                ferry_lab::procs::pids_in_netns(&std::collections::HashSet::from([id]))
                    .is_empty()
                    .then_some(())
            },
        );
        ferry_tests::keep_load_for(Duration::from_millis(500));
    }
    let r = migrate_ok(&lab, "a1", "b1");
    eprintln!("then released, stopped_ms {:.1}", r.stopped_ms);
    let on_b1 = running_on(&lab, "b1");
    assert_contained(&lab, "b1", on_b1.pid, &image);
    ferry_tests::keep_load_for(Duration::from_millis(500));
    let (code, s) = client.stop(Duration::from_secs(20));
    let _ = std::fs::remove_file(&samples);
    eprintln!("max_gap_ms {}", s["max_gap_ms"]);
    assert_redis_clean(code, &s);
}

/// Start requests the agent must refuse, each with a clear error and nothing started; a
/// migration that names the wrong runtime is refused before anything is frozen.
#[test]
fn runc_bad_input_is_refused_clearly() {
    if !require_root_and_tools(TOOLS) {
        return;
    }
    let (lab, _ns, image, started) = lab_with_runc_redis();
    let idle: Ipv4Addr = "10.244.1.11".parse().unwrap();
    lab.add_container("a1", idle).expect("idle container");
    lab.sync().unwrap();
    let path = format!("/v1/containers/{idle}/start");
    let start = |body: Value| {
        let (status, answer) = lab
            .agent_request("a1", "POST", &path, Some(body.to_string().as_bytes()))
            .unwrap();
        let v: Value = serde_json::from_slice(&answer).unwrap_or(Value::Null);
        (
            status,
            v["error"]["code"].as_str().unwrap_or("").to_owned(),
            v["error"]["message"].as_str().unwrap_or("").to_owned(),
        )
    };
    let redis = redis();
    for (body, want_status, want_code, want_msg) in [
        (
            serde_json::json!({"argv": redis, "runtime": "lxc"}),
            400,
            "bad_request",
            "unknown variant `lxc`",
        ),
        (
            serde_json::json!({"argv": redis, "runtime": "podman"}),
            400,
            "bad_request",
            "Podman starts its containers itself",
        ),
        (
            serde_json::json!({"argv": redis, "runtime": "runc"}),
            400,
            "bad_request",
            "runtime runc needs an image",
        ),
        (
            serde_json::json!({"argv": redis, "runtime": "runc", "image": "redis-0000000000000000"}),
            404,
            "no_image",
            "image redis-0000000000000000 is not on host a1",
        ),
        (
            serde_json::json!({"argv": redis, "runtime": "runc", "image": "../../etc"}),
            400,
            "bad_request",
            "want the name of a directory in the images directory",
        ),
        (
            serde_json::json!({"argv": ["redis-server"], "runtime": "runc", "image": image.image}),
            400,
            "bad_request",
            "is not an absolute path",
        ),
        (
            serde_json::json!({"argv": redis, "image": image.image}),
            400,
            "bad_request",
            "an image is for runtime runc",
        ),
    ] {
        let (status, code, msg) = start(body.clone());
        assert_eq!(
            (status, code.as_str()),
            (want_status, want_code),
            "{body}: {msg}"
        );
        assert!(msg.contains(want_msg), "{body}: {msg}");
    }
    // Nothing was started for the idle container.
    let (status, _) = lab
        .agent_request("a1", "GET", &format!("/v1/containers/{idle}"), None)
        .unwrap();
    assert_eq!(status, 404);

    // The redis container runs under runc: a run that expects the agent runtime is refused
    // by the source before anything is frozen, and the container runs on untouched.
    let (code, r) = migrate(&lab, "b1", &["--runtime", "agent"]);
    assert_eq!(r.state, RunState::RolledBack, "{r:?}");
    assert_eq!(code, 3, "{r:?}");
    let e = r.error.clone().unwrap_or_default();
    assert!(
        e.contains("wrong_runtime") && e.contains("runs under the runc runtime"),
        "{e}"
    );
    assert!(r.phase("dump").is_none(), "nothing was dumped: {r:?}");
    let p = running_on(&lab, "a1");
    assert_eq!(p.pid, started.pid);
    assert_eq!(p.origin, "started");
    // `ferry migrate run --runtime` takes only known runtimes.
    let out = lab
        .ferry(&[
            "migrate",
            "run",
            "--container",
            C,
            "--to",
            "b1",
            "--runtime",
            "lxc",
        ])
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("invalid value 'lxc' for '--runtime"),
        "{stderr}"
    );
    assert_eq!(running_on(&lab, "a1").pid, started.pid);
}
