//! Test support for ferry's acceptance tests (real namespaces, real eBPF, real daemons).

pub mod net;
pub mod workload;

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    process::Command,
    sync::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard},
};

/// Is the effective user root? (From /proc/self/status: `Uid: real effective saved fs`.)
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

/// Path of an executable `tool` on PATH.
pub fn which(tool: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|d| d.join(tool))
        .find(|p| {
            std::fs::metadata(p)
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
}

/// Whether a test needing root and `tools` can run. If not: with `CI=true` it panics with the
/// reason (CI must never skip silently); otherwise it prints `SKIP: ...` to stderr and returns
/// false, and the test returns early.
pub fn require_root_and_tools(tools: &[&str]) -> bool {
    let mut missing = Vec::new();
    if !is_root() {
        missing.push("root (run the tests as root)".to_owned());
    }
    for t in tools {
        if which(t).is_none() {
            missing.push(format!("tool `{t}` (not on PATH)"));
        }
    }
    if missing.is_empty() {
        return true;
    }
    let why = format!("this test needs {}", missing.join(", "));
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true and {why}");
    }
    eprintln!("SKIP: {why}");
    false
}

/// Tests in one binary run side by side (`--test-threads=2`). Most of them share the
/// machine; a test that measures loss or reordering to the datagram needs it to itself: on a
/// 2-core machine a neighbour's gigabit stream starves the receiver and the backlogs, and the
/// losses that follow say nothing about the code under test.
static MACHINE: RwLock<()> = RwLock::new(());

/// Held for a test that tolerates neighbours (every lab test of a binary that has a
/// [`machine_to_itself`] test takes it first).
pub fn machine_shared() -> RwLockReadGuard<'static, ()> {
    MACHINE.read().unwrap_or_else(|e| e.into_inner())
}

/// Held for a test that counts every lost datagram: no other test of its binary runs meanwhile.
pub fn machine_to_itself() -> RwLockWriteGuard<'static, ()> {
    MACHINE.write().unwrap_or_else(|e| e.into_inner())
}

/// Packets the kernel dropped for a full per-CPU backlog (`/proc/net/softnet_stat`, second
/// column, summed over CPUs). Machine-wide: a delta is an upper bound for one test's drops.
pub fn softnet_dropped() -> u64 {
    std::fs::read_to_string("/proc/net/softnet_stat")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter_map(|v| u64::from_str_radix(v, 16).ok())
        .sum()
}

/// Packets dropped by the devices of the lab's nodes (`ip -s -j link`: rx and tx `dropped`
/// of every device in every node's namespace: veths whose peer's backlog was full, VXLAN).
pub fn lab_link_drops(lab: &ferry_lab::Lab) -> u64 {
    lab.nodes()
        .iter()
        .filter_map(|n| lab.exec(n, &["ip", "-s", "-j", "link", "show"]).ok())
        .filter_map(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
        .flat_map(|v| v.as_array().cloned().unwrap_or_default())
        .map(|dev| {
            ["rx", "tx"]
                .iter()
                .filter_map(|d| dev["stats64"][d]["dropped"].as_u64())
                .sum::<u64>()
        })
        .sum()
}

static BUILT: Mutex<Option<HashMap<String, PathBuf>>> = Mutex::new(None);

/// Path of the workspace binary `name` (e.g. `ferry-lab`, `ferry-agent`), built up to date.
///
/// `cargo test -p ferry-tests` builds only this package's dependencies as libraries, not their
/// binaries, while labs need `ferry-lab` (the reaper) and `ferry-agent`: so the first call per
/// binary runs `cargo build --bin NAME` with this test binary's profile and target directory
/// (a no-op when it is fresh). The binary lands in `target/<profile>/`, next to the test's
/// `deps/` directory, which is where `ferry_lab` looks for it. Panics if it cannot be had.
pub fn workspace_binary(name: &str) -> PathBuf {
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    let built = built.get_or_insert_with(HashMap::new);
    if let Some(p) = built.get(name) {
        return p.clone();
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> -> target/<profile>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary inside target/<profile>/deps")
        .to_owned();
    let target_dir = profile_dir.parent().expect("target dir").to_owned();
    let profile = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("debug")
        .to_owned();
    let bin = profile_dir.join(name);
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml");
    let mut cmd = Command::new(&cargo);
    cmd.args(["build", "--quiet", "--bin", name, "--manifest-path"])
        .arg(&manifest)
        .arg("--target-dir")
        .arg(&target_dir);
    // The variables Cargo sets for this test crate would reach build scripts that declare them
    // (`rerun-if-env-changed`): ring's reads CARGO_MANIFEST_DIR and CARGO_PKG_VERSION_MAJOR and
    // friends, and any change rebuilds it and everything above it (about 20 s per test binary
    // on the CI machine). Pass none of them on.
    for (key, _) in std::env::vars_os() {
        if cargo_set_for_this_crate(&key.to_string_lossy()) {
            cmd.env_remove(&key);
        }
    }
    match profile.as_str() {
        "debug" => {}
        "release" => {
            cmd.arg("--release");
        }
        other => {
            cmd.args(["--profile", other]);
        }
    }
    match cmd.output() {
        Ok(out) if out.status.success() => {}
        Ok(out) if bin.exists() => eprintln!(
            "warning: `cargo build --bin {name}` failed; using the existing {}:\n{}",
            bin.display(),
            String::from_utf8_lossy(&out.stderr)
        ),
        Ok(out) => panic!(
            "building {name} failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) if bin.exists() => eprintln!(
            "warning: cannot run cargo ({e}); using the existing {}",
            bin.display()
        ),
        Err(e) => panic!("{name} is not built and cargo cannot run: {e}"),
    }
    assert!(bin.exists(), "{} missing after building it", bin.display());
    built.insert(name.to_owned(), bin.clone());
    bin
}

/// The variables Cargo sets for the crate it builds or tests (not the user's own `CARGO_HOME`,
/// `CARGO_TARGET_DIR`, `CARGO_BUILD_*`, ...).
fn cargo_set_for_this_crate(key: &str) -> bool {
    key.starts_with("CARGO_PKG_")
        || key.starts_with("CARGO_MANIFEST_")
        || key.starts_with("CARGO_BIN_")
        || matches!(
            key,
            "CARGO_CRATE_NAME" | "CARGO_PRIMARY_PACKAGE" | "CARGO_TARGET_TMPDIR" | "OUT_DIR"
        )
}

/// A child process that is SIGKILLed and reaped when this guard drops (a failing assertion must
/// not leave, say, a lab's owner process sleeping forever).
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Tears lab `prefix` down when dropped (for labs made by `ferry-lab up`, which outlive the
/// process that asked for them); errors are ignored: the test's own assertions report them.
pub struct DownOnDrop(pub String);

impl Drop for DownOnDrop {
    fn drop(&mut self) {
        let _ = ferry_lab::teardown(&self.0);
    }
}

/// Starts `ferry-lab hold-test-lab ARGS` (a process that brings a lab up with a reaper and then
/// sleeps) and returns it with the prefix it printed: a lab owner for tests to SIGKILL.
pub fn spawn_lab_owner(args: &[&str]) -> (KillOnDrop, String) {
    use std::io::{BufRead as _, BufReader};
    let mut owner = std::process::Command::new(workspace_binary("ferry-lab"))
        .arg("hold-test-lab")
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawning ferry-lab hold-test-lab");
    let stdout = owner.stdout.take().expect("piped stdout");
    let owner = KillOnDrop(owner);
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("reading the prefix");
    let prefix = line.trim().to_owned();
    assert!(
        ferry_lab::state::is_prefix(&prefix),
        "owner printed {line:?}"
    );
    (owner, prefix)
}

/// A host agent's Prometheus text; an endpoint that cannot be read fails the test (it is not
/// a zero).
pub fn metrics_text(lab: &ferry_lab::Lab, host: &str) -> String {
    lab.agent_metrics_text(host)
        .unwrap_or_else(|e| panic!("metrics of {host}: {e}"))
}

/// A series of the lab's gateway (`series` as written in its `/metrics`, labels included,
/// e.g. `ferry_gateway_watch_answers_total{kind="delta"}`), read as the operator over TLS
/// from the gateway host's namespace. `None` if the gateway does not expose it.
pub fn gateway_metric(lab: &ferry_lab::Lab, series: &str) -> Option<u64> {
    let cp = lab.control().expect("the lab has a control plane");
    let operator = cp
        .client_tls(ferry_lab::control::Party::Operator)
        .expect("the operator's TLS identity");
    let api = cp.api;
    let resp = ferry_overlay::netns::run_in(&lab.netns(&cp.host), move || {
        ferry_api::transport::Request::get("/metrics")
            .tls(operator)
            .send_blocking(api)
    })
    .expect("entering the gateway's namespace")
    .expect("the gateway's metrics");
    let text = String::from_utf8_lossy(&resp.body);
    text.lines()
        .find(|l| {
            l.strip_prefix(series)
                .is_some_and(|rest| rest.starts_with(' '))
        })
        .and_then(|l| l.split_whitespace().last())
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| v as u64)
}

/// A host agent's datapath packet counters by reason, read from its Prometheus endpoint.
pub fn counters(lab: &ferry_lab::Lab, host: &str) -> HashMap<String, u64> {
    ferry_config::metrics::parse_packets(&metrics_text(lab, host))
        .into_iter()
        .collect()
}

/// A gauge (e.g. `ferry_endpoints`) of a host's agent: `None` when the agent does not export
/// it.
pub fn gauge(lab: &ferry_lab::Lab, host: &str, name: &str) -> Option<u64> {
    metrics_text(lab, host)
        .lines()
        .find(|l| l.starts_with(&format!("{name}{{")))
        .map(|l| {
            l.rsplit(' ')
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{host}: unparsable metric line {l:?}"))
        })
}

/// Waits up to `within` until lab `prefix` has left nothing behind; returns what is left.
pub fn wait_clean(prefix: &str, within: std::time::Duration) -> Vec<String> {
    let deadline = std::time::Instant::now() + within;
    loop {
        let left = ferry_lab::leftovers(prefix);
        if left.is_empty() || std::time::Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Polls `cond` (every few ms) until it yields a value, and returns it; after `within` the test
/// fails naming `what`. Tests wait on conditions like this, never on a fixed sleep.
pub fn wait_for<T>(what: &str, within: std::time::Duration, cond: impl FnMut() -> Option<T>) -> T {
    let start = std::time::Instant::now();
    poll_until(within, cond)
        .unwrap_or_else(|| panic!("timed out after {:?} waiting for: {what}", start.elapsed()))
}

/// Polls `cond` (every few ms) until it yields a value or `within` has passed (`None`): for
/// waits whose caller reports the failure itself (what is missing, or a clean-up first).
pub fn poll_until<T>(
    within: std::time::Duration,
    mut cond: impl FnMut() -> Option<T>,
) -> Option<T> {
    let start = std::time::Instant::now();
    loop {
        if let Some(v) = cond() {
            return Some(v);
        }
        if start.elapsed() >= within {
            return None;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Lets the workloads that are running generate traffic for `d`. This is a length of load the
/// test chooses to measure (before a move, after it, or a deliberate freeze), not a wait for
/// anything: no assertion depends on something happening within it.
pub fn keep_load_for(d: std::time::Duration) {
    std::thread::sleep(d);
}

/// While alive, prints every host agent's non-zero datapath counters and hold counters if the
/// test panics, so a failed assertion shows what the datapath did. It keeps only the hosts'
/// namespace paths, so the lab can still be taken down by value.
pub struct CountersOnPanic(Vec<(String, PathBuf)>);

impl CountersOnPanic {
    pub fn new(lab: &ferry_lab::Lab) -> Self {
        Self(
            lab.topology()
                .hosts
                .iter()
                .map(|h| (h.name.clone(), lab.netns(&h.name)))
                .collect(),
        )
    }
}

impl Drop for CountersOnPanic {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for (host, ns) in &self.0 {
            let mut cmd = Command::new("curl");
            cmd.args(["-sf", "--max-time", "5", "http://127.0.0.1:9464/metrics"]);
            let out = ferry_overlay::netns::command_in(&mut cmd, ns)
                .ok()
                .and_then(|()| cmd.output().ok());
            let Some(out) = out else {
                eprintln!("--- {host}: metrics unreadable");
                continue;
            };
            let text = String::from_utf8_lossy(&out.stdout);
            let mut lines: Vec<String> = ferry_config::metrics::parse_packets(&text)
                .into_iter()
                .filter(|(_, v)| *v > 0)
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            lines.sort();
            lines.extend(
                text.lines()
                    .filter(|l| l.starts_with("ferry_hold") && !l.ends_with(" 0"))
                    .map(str::to_owned),
            );
            eprintln!("--- datapath counters of {host}: {}", lines.join(" "));
        }
    }
}

/// How much counter `reason` grew between two readings.
pub fn delta(before: &HashMap<String, u64>, after: &HashMap<String, u64>, reason: &str) -> u64 {
    after.get(reason).copied().unwrap_or(0) - before.get(reason).copied().unwrap_or(0)
}

/// `ferry_hold_packets_total{event}` of a host's agent (0 until the event first happens).
pub fn hold_counter(lab: &ferry_lab::Lab, host: &str, event: &str) -> u64 {
    metrics_text(lab, host)
        .lines()
        .find(|l| {
            l.starts_with("ferry_hold_packets_total{") && l.contains(&format!("event=\"{event}\""))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

/// A lab with an agent on every host and the gateway daemon (their binaries built first).
pub fn agents_lab(opts: ferry_lab::LabOptions) -> ferry_lab::Lab {
    workspace_binary("ferry-lab");
    workspace_binary("ferry-agent");
    workspace_binary("ferry");
    ferry_lab::Lab::up(ferry_lab::LabOptions {
        start_agents: true,
        ..opts
    })
    .expect("lab up")
}

/// The report `ferry --json migrate run …` printed (stdout is the report whatever the exit
/// code: a rolled-back run exits 3), with its exit code; one summary line goes to stderr
/// (`what` names the call in it). Panics, quoting both streams, if stdout is not a report.
pub fn run_report(what: &str, out: &std::process::Output) -> (i32, ferry_api::run::RunReport) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let code = out.status.code().unwrap_or(-1);
    let r: ferry_api::run::RunReport = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "{what} exited {code}: unparseable report ({e}): {stdout}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    eprintln!(
        "migrate {} {} -> {} ({what}): exit {code}, {}, total {:.1} ms, stopped {:.1} ms, \
         frozen(criu) {:?} ms, image {} B, phases [{}]{}",
        r.id,
        r.from,
        r.to,
        r.state.as_str(),
        r.total_ms,
        r.stopped_ms,
        r.criu.as_ref().map(|s| s.frozen_ms),
        r.image_bytes,
        r.phases
            .iter()
            .map(|p| format!("{} {:.1}", p.name, p.ms))
            .collect::<Vec<_>>()
            .join(", "),
        r.error
            .as_ref()
            .map(|e| format!(", error: {e}"))
            .unwrap_or_default()
    );
    (code, r)
}

/// `ferry --json migrate run --container IP --to HOST`, which must end released (exit 0).
pub fn migrate_run_ok(
    lab: &ferry_lab::Lab,
    container: std::net::Ipv4Addr,
    to: &str,
) -> ferry_api::run::RunReport {
    let ip = container.to_string();
    let out = lab
        .ferry(&["--json", "migrate", "run", "--container", &ip, "--to", to])
        .expect("running ferry");
    let (code, r) = run_report(&format!("{ip} -> {to}"), &out);
    assert_eq!(code, 0, "{ip} -> {to}: {r:?}");
    r
}
