//! The registry through the `ferry` CLI (`--json`), `ferry sync`, persistence across restarts,
//! and the daemon's refusals to start.
mod common;

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use common::{Env, FERRY, block, read};
use serde_json::{Value, json};

#[test]
fn endpoints_and_public_mappings_through_the_cli() {
    let env = Env::new(25_000);
    let _d = env.start();
    env.register_hosts();

    let v = env.ok(&["endpoint", "add", "--ip", "10.244.1.5", "--host", "a1"]);
    assert_eq!(
        v,
        json!({"ip": "10.244.1.5", "host": "a1", "mac": "0e:fc:0a:f4:01:05"})
    );
    let v = env.ok(&[
        "endpoint",
        "add",
        "--ip",
        "10.244.2.7",
        "--host",
        "b1",
        "--mac",
        "02:00:00:00:02:07",
    ]);
    assert_eq!(v["mac"], "02:00:00:00:02:07");
    let list = env.ok(&["endpoint", "list"]);
    let ips: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["ip"].as_str().unwrap())
        .collect();
    assert_eq!(ips, ["10.244.1.5", "10.244.2.7"]);

    let v = env.ok(&[
        "public",
        "add",
        "--public",
        "203.0.113.130",
        "--container",
        "10.244.1.5",
    ]);
    assert_eq!(
        v,
        json!({"public": "203.0.113.130", "container": "10.244.1.5"})
    );
    let v = env.ok(&[
        "public",
        "add",
        "--public",
        "203.0.113.131:443/tcp",
        "--container",
        "10.244.2.7:8443",
    ]);
    assert_eq!(
        v,
        json!({"public": "203.0.113.131", "public_port": 443, "container": "10.244.2.7",
               "container_port": 8443, "proto": "tcp"})
    );
    assert_eq!(
        env.ok(&["public", "list"]).as_array().unwrap().len(),
        2,
        "two mappings"
    );

    // Refusals: exit 1, the API's code and message.
    let m = env.fails(
        &["endpoint", "add", "--ip", "10.244.1.5", "--host", "b1"],
        "duplicate_endpoint",
    );
    assert_eq!(m, "endpoint 10.244.1.5 already exists on host a1");
    let m = env.fails(
        &["endpoint", "add", "--ip", "10.244.1.9", "--host", "zz"],
        "unknown_host",
    );
    assert!(m.contains("\"zz\""), "{m}");
    env.fails(
        &[
            "public",
            "add",
            "--public",
            "198.51.100.1",
            "--container",
            "10.244.2.7",
        ],
        "invalid_address",
    );
    env.fails(&["public", "rm", "203.0.113.200"], "unknown_public");
    env.fails(&["endpoint", "rm", "10.244.9.9"], "unknown_endpoint");
    // A port on one side only is caught by the CLI itself.
    let m = env.fails(
        &[
            "public",
            "add",
            "--public",
            "203.0.113.140:80/tcp",
            "--container",
            "10.244.2.7",
        ],
        "usage",
    );
    assert!(m.contains("needs one too"), "{m}");

    // Text mode.
    let out = env.ferry(&["endpoint", "list"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.starts_with("IP          HOST  MAC\n10.244.1.5  a1    0e:fc:0a:f4:01:05\n"),
        "{text}"
    );
    let out = env.ferry(&["endpoint", "add", "--ip", "10.244.1.5", "--host", "a1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains(
            "ferry: endpoint 10.244.1.5 already exists on host a1 (duplicate_endpoint, HTTP 409)"
        ),
        "{err}"
    );

    // Removal: the port mapping by key (with its '/'), the endpoint (its mapping stays).
    let v = env.ok(&["public", "rm", "203.0.113.131:443/tcp"]);
    assert_eq!(v["public_port"], 443);
    let v = env.ok(&["endpoint", "rm", "10.244.1.5"]);
    assert_eq!(v["host"], "a1");
    let public = env.ok(&["public", "list"]);
    assert_eq!(
        public,
        json!([{"public": "203.0.113.130", "container": "10.244.1.5"}])
    );
    // Move: re-add the endpoint on another host; the mapping follows it.
    env.ok(&["endpoint", "add", "--ip", "10.244.1.5", "--host", "b1"]);
    let out = env.ferry(&["public", "list"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("203.0.113.130  10.244.1.5  b1"), "{text}");

    // hosts: the registry version and each host's state.
    let v = env.ok(&["hosts"]);
    assert_eq!(v["version"], env.version());
    let names: Vec<&str> = v["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["a1", "b1", "gw"]);
    assert_eq!(v["hosts"][2]["role"], "gateway");
}

/// A stand-in agent: follows the registry with watches, as `ferry-agent` does.
fn fake_agent(env: &Env, host: &'static str, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    let c = env.client();
    std::thread::spawn(move || {
        let mut after = 0;
        while !stop.load(Ordering::SeqCst) {
            match block(c.watch(host, after, Duration::from_secs(30))) {
                Ok(s) => after = s.version,
                Err(_) => return,
            }
        }
    })
}

#[test]
fn sync_waits_for_every_agent() {
    let env = Env::new(300);
    let _d = env.start();
    let v = env.ok(&["sync"]);
    assert_eq!(v["hosts"], json!([]), "no hosts: nothing to wait for");
    env.register_hosts();

    // No agent runs: sync times out naming the hosts behind.
    let m = env.fails(&["sync", "--timeout-ms", "300"], "sync_timeout");
    assert!(
        m.contains("3 of 3 hosts have not applied registry version 3"),
        "{m}"
    );
    assert!(m.contains("a1 (applied 0, not connected, last seen"), "{m}");

    let stop = Arc::new(AtomicBool::new(false));
    let agents: Vec<_> = ["a1", "b1"]
        .into_iter()
        .map(|h| fake_agent(&env, h, stop.clone()))
        .collect();
    // gw has no agent yet.
    let m = env.fails(&["sync", "--timeout-ms", "500"], "sync_timeout");
    assert!(
        m.contains("1 of 3 hosts") && m.contains("gw (applied 0"),
        "{m}"
    );
    assert!(!m.contains("a1 ("), "{m}");

    let gw = fake_agent(&env, "gw", stop.clone());
    let v = env.ok(&["sync", "--timeout-ms", "10000"]);
    assert_eq!(v["version"], 3);
    assert_eq!(v["hosts"], json!(["a1", "b1", "gw"]));

    // After a change, sync waits for the agents to catch up with it.
    env.ok(&["endpoint", "add", "--ip", "10.244.1.5", "--host", "a1"]);
    let v = env.ok(&["sync", "--timeout-ms", "10000"]);
    assert_eq!(v["version"], 4);
    let hosts = block(env.client().hosts()).unwrap();
    assert!(hosts.iter().all(|h| h.applied_version == 4), "{hosts:?}");
    let out = env.ferry(&["hosts"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("4/4 in sync"), "{text}");

    stop.store(true, Ordering::SeqCst);
    for a in agents.into_iter().chain([gw]) {
        a.join().unwrap();
    }
}

#[test]
fn state_survives_a_restart() {
    let env = Env::new(300);
    let d = env.start();
    env.register_hosts();
    env.ok(&["endpoint", "add", "--ip", "10.244.1.5", "--host", "a1"]);
    env.ok(&[
        "endpoint",
        "add",
        "--ip",
        "10.244.2.5",
        "--host",
        "b1",
        "--mac",
        "02:00:00:00:02:05",
    ]);
    env.ok(&[
        "public",
        "add",
        "--public",
        "203.0.113.130",
        "--container",
        "10.244.1.5",
    ]);
    env.ok(&[
        "public",
        "add",
        "--public",
        "203.0.113.131:53/udp",
        "--container",
        "10.244.2.5:5353",
    ]);
    // A removed endpoint whose mapping is kept must survive too.
    env.ok(&["endpoint", "rm", "10.244.1.5"]);
    // a1's agent reports version 8 applied (the watch waits out the 300 ms).
    block(env.client().watch("a1", 8, Duration::from_secs(10))).unwrap();
    let before = (
        env.version(),
        env.ok(&["endpoint", "list"]),
        env.ok(&["public", "list"]),
        env.ok(&["hosts"])["hosts"].clone(),
    );
    assert_eq!(before.0, 8);

    let status = d.terminate();
    assert!(status.success(), "{status}");
    let (code, v) = env.ferry_json(&["endpoint", "list"]);
    assert_eq!((code, &v["error"]["code"]), (1, &json!("unreachable")));

    let _d = env.start();
    let after = (
        env.version(),
        env.ok(&["endpoint", "list"]),
        env.ok(&["public", "list"]),
        env.ok(&["hosts"])["hosts"].clone(),
    );
    assert_eq!(after.0, before.0);
    assert_eq!(after.1, before.1);
    assert_eq!(after.2, before.2);
    // Host information persists; what agents reported is runtime only.
    let strip = |hosts: &Value| -> Vec<Value> {
        hosts
            .as_array()
            .unwrap()
            .iter()
            .map(|h| json!([h["name"], h["vtep"], h["overlay_ip"], h["role"]]))
            .collect()
    };
    assert_eq!(strip(&after.3), strip(&before.3));
    assert_eq!(before.3[0]["applied_version"], 8);
    assert_eq!(after.3[0]["applied_version"], 0);
    // And the registry carries on from there.
    env.ok(&["endpoint", "add", "--ip", "10.244.1.5", "--host", "b1"]);
    assert_eq!(env.version(), 9);
}

/// Runs `ferry gateway --config` expecting it to refuse to start: exit 1 and stderr.
fn refuses_to_start(env: &Env) -> String {
    let mut d = env.spawn();
    let status = d.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(1), "{}", d.log_text());
    d.log_text()
}

#[test]
fn corrupt_state_is_refused_and_left_alone() {
    let env = Env::new(25_000);
    fs::create_dir_all(&env.state_dir).unwrap();
    let garbage = b"{\"format\":1,\"version\":3,\"hosts\":[";
    fs::write(env.state_file(), garbage).unwrap();
    let log = refuses_to_start(&env);
    let path = env.state_file().display().to_string();
    assert!(log.contains(&path), "{log}");
    assert!(
        log.contains("is not a valid registry state") && log.contains("line 1 column"),
        "{log}"
    );
    assert_eq!(read(&env.state_file()), garbage);
    let m = env.fails(
        &[
            "gateway",
            "--config",
            env.config.to_str().unwrap(),
            "--check",
        ],
        "invalid_config",
    );
    assert!(m.contains(&path), "{m}");

    // A well-formed state that does not fit the config (an endpoint outside overlay_cidr).
    let state = json!({"format": 1, "version": 2,
        "hosts": [{"name": "a1", "vtep": "198.18.1.10", "overlay_ip": "10.244.255.1"}],
        "endpoints": [{"ip": "10.99.0.5", "host": "a1", "mac": "0e:fc:0a:63:00:05"}],
        "public": []});
    fs::write(env.state_file(), state.to_string()).unwrap();
    let log = refuses_to_start(&env);
    assert!(
        log.contains("ip 10.99.0.5 is outside overlay_cidr 10.244.0.0/16"),
        "{log}"
    );
    assert_eq!(read(&env.state_file()), state.to_string().as_bytes());
}

#[test]
fn token_file_must_exist_be_private_and_not_empty() {
    let env = Env::new(25_000);
    let config = env.config.to_str().unwrap().to_string();
    let v = env.ok(&["gateway", "--config", &config, "--check"]);
    assert_eq!(v["state_exists"], false);
    assert!(
        !env.state_dir.exists(),
        "--check must not create the state dir"
    );

    fs::set_permissions(&env.token_file, fs::Permissions::from_mode(0o644)).unwrap();
    let log = refuses_to_start(&env);
    assert!(
        log.contains("has mode 0644") && log.contains("chmod 600"),
        "{log}"
    );
    let m = env.fails(
        &["gateway", "--config", &config, "--check"],
        "invalid_config",
    );
    assert!(m.contains("mode 0644"), "{m}");

    fs::set_permissions(&env.token_file, fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(&env.token_file, "\n").unwrap();
    let log = refuses_to_start(&env);
    assert!(log.contains("empty"), "{log}");

    fs::remove_file(&env.token_file).unwrap();
    let log = refuses_to_start(&env);
    assert!(log.contains(&env.token_file.display().to_string()), "{log}");
    assert!(log.contains("No such file"), "{log}");
}

#[test]
fn bad_config_is_refused_with_the_field_named() {
    let env = Env::new(25_000);
    let text = fs::read_to_string(&env.config).unwrap();
    fs::write(&env.config, format!("{text}colour = \"blue\"\n")).unwrap();
    let m = env.fails(
        &[
            "gateway",
            "--config",
            env.config.to_str().unwrap(),
            "--check",
        ],
        "invalid_config",
    );
    assert!(m.contains("unknown field `colour`"), "{m}");
    let log = refuses_to_start(&env);
    assert!(log.contains("unknown field `colour`"), "{log}");
    let out = Command::new(FERRY)
        .args(["gateway", "--config", "/nonexistent/gw.toml", "--check"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/gw.toml"));
}
