//! The fault matrix (`ferry-lab bench faults`, docs/benchmarks.md "Fault matrix"), one
//! repetition of every fault at every phase of a CRIU migration with a live client, and the
//! invariant every cell must keep: exactly one copy of the container runs afterwards; it owns
//! its IP (the registry's endpoint is where it runs) and its public address (a fresh client
//! through the gateway is answered); the cell's client saw no reset, lost no byte and got no
//! wrong reply; the run's status names the host where it runs; the system converged within
//! the timeout; and every lab, torn down, left nothing behind.
//!
//! The faults land deterministically through ferry's fault points (`FERRY_FAULT_DIR`). Each
//! test runs one group of faults in labs of its own (the bench reuses a lab while it stays
//! healthy), so two groups run side by side under `--test-threads=2`. A failing test prints
//! every cell that broke the invariant and why, not only the first.
//!
//! `FERRY_FAULTS_CONVERGE_SECS` (default 20) bounds how long after the fault ended a cell may
//! take to converge.
use std::process::Command;

use ferry_tests::{require_root_and_tools, workspace_binary};
use serde_json::Value;

const PHASES: [&str; 5] = ["prepare", "dump", "transfer", "restore", "release"];
const TOOLS: &[&str] = &["ip", "nft", "criu", "mount"];

/// Runs `ferry-lab bench faults --json` for `faults` at every phase; its report.
fn matrix(faults: &[&str]) -> Value {
    workspace_binary("ferry-agent");
    workspace_binary("ferry");
    workspace_binary("ferry-workload");
    let converge = std::env::var("FERRY_FAULTS_CONVERGE_SECS").unwrap_or_else(|_| "20".into());
    let mut cmd = Command::new(workspace_binary("ferry-lab"));
    cmd.args([
        "bench",
        "faults",
        "--json",
        "--converge-timeout-secs",
        &converge,
    ]);
    for f in faults {
        cmd.args(["--fault", f]);
    }
    let out = cmd.output().expect("running ferry-lab bench faults");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stderr}");
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "ferry-lab bench faults {faults:?} ({}): no JSON report ({e}): {stdout}",
            out.status
        )
    })
}

/// Every cell of `faults` × every phase is there and keeps the invariant; every lab left
/// nothing behind. Panics with every violation.
fn assert_invariant(r: &Value, faults: &[&str]) {
    let cells = r["cells"].as_array().expect("cells");
    let mut problems = Vec::new();
    for f in faults {
        for ph in PHASES {
            let found: Vec<&Value> = cells
                .iter()
                .filter(|c| c["fault"] == *f && c["phase"] == ph)
                .collect();
            if found.len() != 1 {
                problems.push(format!("{f} at {ph}: {} cells in the report", found.len()));
            }
        }
    }
    for c in cells {
        let mut why = Vec::new();
        let n = |k: &str| c[k].as_u64().unwrap_or(u64::MAX);
        if n("copies") != 1 {
            why.push(format!("{} copies run ({})", c["copies"], c["copy_hosts"]));
        } else {
            let ends_on = &c["ends_on"];
            if !ends_on.is_string() {
                why.push("its one copy runs in a namespace no host names".to_owned());
            }
            if c["endpoint_host"] != *ends_on {
                why.push(format!(
                    "runs on {ends_on} but the registry's endpoint is on {}",
                    c["endpoint_host"]
                ));
            }
            if c["status_host"] != *ends_on {
                why.push(format!(
                    "runs on {ends_on} but the status says {}",
                    c["status_host"]
                ));
            }
        }
        if c["public_reachable"] != true {
            why.push("its public address does not answer a new client".to_owned());
        }
        for k in ["resets", "bytes_lost", "mismatches"] {
            if n(k) != 0 {
                why.push(format!("{k} = {}", c[k]));
            }
        }
        if c["converged"] != true {
            why.push("did not converge".to_owned());
        }
        if c["fault_landed"] != true {
            why.push("the fault did not land".to_owned());
        }
        if (c["fault"] == "kill-gateway-takeover" || c["fault"] == "cut-gateway-etcd")
            && c["taken_over"] != true
        {
            why.push("no other gateway took the run over".to_owned());
        }
        for k in ["outcome", "gap_ms", "converge_ms"] {
            if c.get(k).is_none() {
                why.push(format!("no {k} in the report"));
            }
        }
        // The bench judges the same invariant; both must agree.
        if (c["ok"] == true) != why.is_empty() {
            why.push(format!(
                "the bench says ok = {}, violations {}",
                c["ok"], c["violations"]
            ));
        }
        if !why.is_empty() {
            problems.push(format!(
                "{} at {}: outcome {}, run {}{}: {}",
                c["fault"].as_str().unwrap_or("?"),
                c["phase"].as_str().unwrap_or("?"),
                c["outcome"],
                c["run_state"],
                c.get("error")
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default(),
                why.join("; ")
            ));
        }
    }
    for l in r["labs"].as_array().expect("labs") {
        if l["leftovers"].as_array().is_none_or(|v| !v.is_empty()) || l.get("error").is_some() {
            problems.push(format!("lab {}: {l}", l["prefix"]));
        }
    }
    assert!(
        problems.is_empty(),
        "{} of {} cells (or labs) broke the invariant:\n  {}",
        problems.len(),
        cells.len(),
        problems.join("\n  ")
    );
}

fn run(faults: &[&str]) {
    if !require_root_and_tools(TOOLS) {
        return;
    }
    let r = matrix(faults);
    assert_invariant(&r, faults);
}

#[test]
fn an_agent_killed_and_restarted_at_any_phase_leaves_one_copy_and_no_client_harm() {
    run(&["kill-source-agent", "kill-dest-agent"]);
}

/// The gateway SIGKILLed and started again at once: alone with its state file, and as the
/// driving gateway of two on etcd (back while its old lease still holds the run's claim).
#[test]
fn the_gateway_killed_and_restarted_at_any_phase_leaves_one_copy_and_no_client_harm() {
    if !require_root_and_tools(&["etcd"]) {
        return;
    }
    run(&["kill-gateway", "kill-gateway-restart-etcd"]);
}

/// Two gateways on etcd (three members, one per cloud): the one driving the run is killed
/// at each phase and stays dead; the other takes the run over once the dead one's lease
/// ended (the report says so: `taken_over`), the CLI and the agents fall back to it.
#[test]
fn the_gateway_driving_a_run_killed_for_good_at_any_phase_another_one_finishes_it() {
    if !require_root_and_tools(&["etcd"]) {
        return;
    }
    run(&["kill-gateway-takeover"]);
}

/// Two gateways on etcd: the one driving the run is cut off from etcd at each phase (alive
/// and answering, its host's member without peers) until the cell converged. It stops
/// driving once its lease may have lapsed, refuses changes, sends its agents away; the
/// other gateway takes the run over (`taken_over`) and finishes it: one copy, no reset.
#[test]
fn the_gateway_driving_a_run_cut_off_from_etcd_at_any_phase_stops_and_another_one_finishes_it() {
    if !require_root_and_tools(&["etcd", "nft"]) {
        return;
    }
    let r = matrix(&["cut-gateway-etcd"]);
    assert_invariant(&r, &["cut-gateway-etcd"]);
    // Once its run was under way (after the prepare), the cut-off gateway stopped driving it.
    for c in r["cells"].as_array().expect("cells") {
        if c["phase"] != "prepare" {
            assert!(
                c["handed_over"].as_u64().is_some_and(|n| n >= 1),
                "the cut-off gateway handed the run over: {c}"
            );
        }
    }
}

/// The registry on a three-member etcd (one per cloud): the member on the source host, and
/// in a lab of its own etcd's leader, is killed at each phase and stays dead until the cell
/// converged; the run goes on (released).
#[test]
fn one_etcd_member_of_three_killed_at_any_phase_stops_nothing() {
    if !require_root_and_tools(&["etcd"]) {
        return;
    }
    let faults = ["kill-etcd-member", "kill-etcd-leader"];
    let r = matrix(&faults);
    assert_invariant(&r, &faults);
    for c in r["cells"].as_array().expect("cells") {
        assert_eq!(c["outcome"], "released", "nothing stops: {c}");
    }
}

#[test]
fn a_3s_link_cut_at_any_phase_leaves_one_copy_and_no_client_harm() {
    run(&["cut-source-3s", "cut-dest-3s"]);
}

#[test]
fn a_20s_link_cut_at_any_phase_leaves_one_copy_and_no_client_harm() {
    run(&["cut-source-20s", "cut-dest-20s"]);
}

#[test]
fn a_full_destination_disk_at_any_phase_leaves_one_copy_and_no_client_harm() {
    run(&["disk-full-dest"]);
}
