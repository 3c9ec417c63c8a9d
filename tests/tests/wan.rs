//! WAN links between clouds (no netem on this kernel: TUN devices and a forwarder in the
//! router namespace, see netns-lab/src/wan.rs): a lab with the `wan` profile between clouds a
//! and b delivers its delay, spread, rate and loss within generous bands of the configured
//! figures, leaves traffic inside a cloud alone, accounts for every packet, and its forwarder
//! goes with the lab — explicitly, and when the lab's owner dies.
use std::{
    process::Command,
    time::{Duration, Instant},
};

use ferry_bench::links::{CheckArgs, check};
use ferry_lab::{Lab, LabOptions, Topology, lab::WAN_FORWARDER, state::LabState, topology};
use ferry_tests::{
    DownOnDrop, require_root_and_tools, spawn_lab_owner, wait_clean, wait_for, workspace_binary,
};

const TOOLS: &[&str] = &["ip", "ping", "iperf3"];

/// The default topology with a `wan` link between clouds a and b.
fn wan_topology() -> Topology {
    ferry_bench::links::with_link(Topology::default_lab(), "a", "b", "wan").expect("valid")
}

fn forwarder(prefix: &str) -> ferry_lab::procs::ProcRecord {
    LabState::load(prefix)
        .expect("state")
        .expect("a state file")
        .processes
        .into_iter()
        .find(|p| p.kind == WAN_FORWARDER)
        .expect("the forwarder is recorded")
}

#[test]
fn wan_link_delivers_its_delay_rate_and_loss_and_only_between_the_clouds() {
    if !require_root_and_tools(TOOLS) {
        return;
    }
    workspace_binary("ferry-lab");
    let lab = Lab::up(LabOptions {
        topology: wan_topology(),
        start_agents: false,
        ..LabOptions::default()
    })
    .expect("lab up");
    let prefix = lab.prefix().to_owned();
    let wan = topology::profile("wan").unwrap();
    let fwd = forwarder(&prefix);
    assert!(fwd.alive(), "the forwarder is not running");

    // Configured vs measured: RTT, its spread, the UDP rate, the loss; then one TCP flow.
    let report = check(
        &lab,
        &CheckArgs {
            pings: 50,
            seconds: 3,
            link: None,
        },
    )
    .expect("measuring the link");
    assert_eq!(report.links.len(), 1);
    let l = &report.links[0];
    assert_eq!(l.error, None, "{l:?}");
    assert_eq!((l.from_host.as_str(), l.to_host.as_str()), ("a1", "b1"));
    let rtt = l.rtt.as_ref().expect("RTT measured");
    let configured_rtt = 2.0 * wan.delay_ms;
    let ratio = rtt.p50_ms / configured_rtt;
    assert!(
        (0.95..=1.15).contains(&ratio),
        "RTT p50 {} ms for a configured {configured_rtt} ms: {rtt:?}",
        rtt.p50_ms
    );
    assert!(
        rtt.min_ms >= configured_rtt - 2.0 * wan.jitter_ms - 0.1,
        "a reply came back sooner than the link allows: {rtt:?}"
    );
    let spread = rtt.sd_ms / rtt.expected_sd_ms;
    assert!(
        (0.3..=3.0).contains(&spread),
        "RTT spread {} ms for an expected {} ms: {rtt:?}",
        rtt.sd_ms,
        rtt.expected_sd_ms
    );
    // The lab's own path (to the far cloud's router, not shaped) is nothing like the link.
    assert!(
        rtt.base_ms < 0.05 * configured_rtt,
        "the router's own address is delayed: {rtt:?}"
    );
    let udp = l.udp.as_ref().expect("UDP rate measured");
    let ratio = udp.measured_mbit / udp.expected_mbit;
    assert!(
        (0.9..=1.05).contains(&ratio),
        "UDP delivered {} Mbit/s for an expected {} Mbit/s: {udp:?}",
        udp.measured_mbit,
        udp.expected_mbit
    );
    let loss = l.loss.as_ref().expect("loss counted");
    assert!(loss.packets > 10_000, "{loss:?}");
    assert!(
        loss.ok,
        "{} lost of {} for a probability of {}: {loss:?}",
        loss.lost, loss.packets, loss.configured
    );
    let drops = l.drops.as_ref().expect("drops counted");
    assert!(
        drops.queue > 0,
        "UDP offered above the rate must fill the buffer: {drops:?}"
    );
    assert_eq!(
        (drops.ring, drops.overflow, drops.write_errors),
        (0, 0, 0),
        "{drops:?}"
    );
    let tcp = l.tcp.as_ref().expect("TCP measured");
    assert!(
        tcp.measured_mbit <= tcp.payload_rate_mbit.unwrap() * 1.05,
        "TCP beat the rate: {tcp:?}"
    );
    // (Not `report.ok`: its tolerances are the bench's, tighter than these bands, and the
    // suite runs two lab tests at a time on two cores.)

    // Every packet the forwarder read is accounted for once nothing is in flight.
    let stats = wait_for("the link to go idle", Duration::from_secs(5), || {
        let s = lab.link_stats().expect("link stats");
        s.iter().all(|d| d.forwarder.held_bytes == 0).then_some(s)
    });
    assert_eq!(stats.len(), 2);
    for d in &stats {
        let f = &d.forwarder;
        assert!(f.rx_packets > 0, "{d:?}");
        assert_eq!(
            f.rx_packets,
            f.queue_drops + f.lost_packets + f.overflow_packets + f.tx_packets,
            "{d:?}"
        );
    }

    // Hosts of one cloud share its bridge: not shaped.
    let a2 = lab.host("a2").unwrap().address.to_string();
    let out = lab
        .exec(
            "a1",
            &["ping", "-n", "-c", "10", "-i", "0.02", "-W", "2", &a2],
        )
        .unwrap();
    let same_cloud = ferry_bench::links::parse_ping(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(same_cloud.len(), 10, "{out:?}");
    let p50 = ferry_bench::stats::median(&same_cloud).unwrap();
    assert!(
        p50 < 0.05 * configured_rtt,
        "a1 → a2 (one cloud) takes {p50} ms"
    );

    lab.down().expect("teardown");
    assert_eq!(
        wait_clean(&prefix, Duration::from_secs(5)),
        Vec::<String>::new()
    );
    assert!(!fwd.alive(), "the forwarder outlived its lab");
}

/// `ferry-lab up` with links, `links show` / `links check` on it, `down`; then a library lab
/// whose owner is SIGKILLed: its reaper takes the forwarder with it.
#[test]
fn the_forwarder_goes_with_its_lab_and_the_cli_reports_it() {
    if !require_root_and_tools(TOOLS) {
        return;
    }
    let bin = workspace_binary("ferry-lab");
    let dir = tempfile::tempdir().unwrap();
    let topo = dir.path().join("wan.toml");
    std::fs::write(&topo, wan_topology().to_toml()).unwrap();

    let out = Command::new(&bin)
        .args(["up", "--no-agents"])
        .arg(&topo)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let prefix = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let _down = DownOnDrop(prefix.clone());
    let fwd = forwarder(&prefix);
    assert!(fwd.alive());

    let out = Command::new(&bin)
        .args(["links", "show", "--json", "--lab", &prefix])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    let dirs = v.as_array().expect("one entry per direction");
    assert_eq!(dirs.len(), 2, "{v}");
    assert_eq!(
        (dirs[0]["from"].as_str(), dirs[0]["to"].as_str()),
        (Some("a"), Some("b"))
    );
    assert_eq!(dirs[0]["forwarder"]["name"], "a→b");
    assert_eq!(dirs[0]["tun"], "wl0-0");
    assert_eq!(dirs[1]["delay_ms"], 30.0);

    // RTT only (no throughput runs): one JSON object, within tolerance.
    let out = Command::new(&bin)
        .args([
            "links",
            "check",
            "--json",
            "--lab",
            &prefix,
            "--pings",
            "50",
            "--seconds",
            "0",
        ])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(
        out.status.success(),
        v["ok"].as_bool().expect("ok"),
        "the exit status follows the verdict: {v}"
    );
    assert_eq!(v["links"][0]["link"], "a–b", "{v}");
    assert!(
        v["links"][0].get("udp").is_none(),
        "--seconds 0 runs no iperf3: {v}"
    );
    let rtt = &v["links"][0]["rtt"];
    let ratio = rtt["p50_ms"].as_f64().unwrap() / 60.0;
    assert!((0.95..=1.15).contains(&ratio), "{v}");
    // A link the lab does not have is an error, not a silent pass.
    let out = Command::new(&bin)
        .args([
            "links",
            "check",
            "--lab",
            &prefix,
            "--link",
            "a,edge",
            "--seconds",
            "0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no link between a and edge"),
        "{out:?}"
    );

    let out = Command::new(&bin)
        .args(["down", "--lab", &prefix])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        wait_clean(&prefix, Duration::from_secs(5)),
        Vec::<String>::new()
    );
    assert!(!fwd.alive(), "`ferry-lab down` left the forwarder running");

    // The owner of a library lab dies: the reaper tears the lab down, forwarder included.
    let (mut owner, prefix) = spawn_lab_owner(&[topo.to_str().unwrap()]);
    let _down = DownOnDrop(prefix.clone());
    let fwd = forwarder(&prefix);
    assert!(fwd.alive());
    let t = Instant::now();
    owner.0.kill().unwrap();
    owner.0.wait().unwrap();
    assert_eq!(
        wait_clean(&prefix, Duration::from_secs(10)),
        Vec::<String>::new()
    );
    assert!(!fwd.alive(), "the reaper left the forwarder running");
    eprintln!("reaped in {:?}", t.elapsed());
}
