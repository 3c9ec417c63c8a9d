//! Several gateways on one etcd, in a lab (topology `etcd` and `extra_gateways`): three etcd
//! members (one per cloud), the main gateway on gw and a second one on b1. b1's agent watches
//! the gateway of its own cloud, the others the main one; changes made through either reach
//! every agent, a migration step driven by the main gateway waits for b1's agent through what
//! b1's gateway publishes, and when b1's gateway dies its agent carries on with the main one.

use std::{net::Ipv4Addr, time::Duration};

use ferry_lab::{LabOptions, Topology, control::ControlPlane};
use ferry_tests::{agents_lab, require_root_and_tools, wait_for};

fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

/// `host` as `cp`'s gateway sees it: (applied version, connected).
fn seen(lab: &ferry_lab::Lab, cp: &ControlPlane, host: &'static str) -> Option<(u64, bool)> {
    let hosts = lab
        .api_at(cp, |c| async move { c.hosts().await })
        .ok()?
        .ok()?;
    hosts
        .into_iter()
        .find(|h| h.info.name == host)
        .map(|h| (h.applied_version, h.connected))
}

fn version(lab: &ferry_lab::Lab, cp: &ControlPlane) -> Option<u64> {
    lab.api_at(cp, |c| async move { c.version().await })
        .ok()?
        .ok()
}

#[test]
fn agents_follow_the_gateway_of_their_cloud_and_carry_on_when_it_dies() {
    if !require_root_and_tools(&["ip", "nft", "etcd"]) {
        return;
    }
    let mut lab = agents_lab(LabOptions {
        topology: Topology {
            etcd: true,
            extra_gateways: vec!["b1".into()],
            ..Topology::default()
        },
        ..LabOptions::default()
    });
    let main = lab.control().unwrap();
    let b1gw = lab.extra_gateway("b1").unwrap();
    let link = ControlPlane::agent_link(lab.prefix(), lab.topology(), "b1").unwrap();
    assert_eq!(
        link.address, b1gw.api,
        "b1's agent uses its own cloud's gateway"
    );
    assert_eq!(link.fallbacks, vec![main.api]);

    // b1's agent watches b1's gateway; the main gateway learns of it through etcd.
    wait_for(
        "b1's gateway serves b1's agent",
        Duration::from_secs(20),
        || seen(&lab, &b1gw, "b1").filter(|(_, c)| *c),
    );
    wait_for(
        "the main gateway sees b1's agent connected (through b1's gateway)",
        Duration::from_secs(20),
        || seen(&lab, &main, "b1").filter(|(_, c)| *c),
    );

    // A change through the main gateway reaches b1's agent through b1's gateway: `ferry
    // sync` on the main gateway waits for every agent, b1's included.
    let c = ip("10.244.1.10");
    lab.add_container("a1", c).unwrap();
    let v = version(&lab, &main).unwrap();
    assert_eq!(seen(&lab, &b1gw, "b1").map(|s| s.0), Some(v));

    // A migration driven by the main gateway: each step waits for b1's agent, which reports
    // to b1's gateway only.
    for step in [
        vec![
            "migrate",
            "prepare",
            "--container",
            "10.244.1.10",
            "--to",
            "b1",
        ],
        vec!["migrate", "freeze", "--container", "10.244.1.10"],
        vec!["migrate", "release", "--container", "10.244.1.10"],
    ] {
        lab.ferry_json(&step)
            .unwrap_or_else(|e| panic!("ferry {step:?}: {e}"));
    }
    assert_eq!(lab.endpoint_host(c).unwrap(), "b1");
    assert!(lab.container_netns("b1", c).exists());

    // b1's gateway dies: b1's agent moves to the main gateway, and changes still reach it.
    lab.kill_extra_gateway("b1", libc::SIGKILL).unwrap();
    let c2 = ip("10.244.2.20");
    lab.add_container("b1", c2).unwrap();
    wait_for(
        "the main gateway serves b1's agent itself",
        Duration::from_secs(20),
        || {
            let v = version(&lab, &main)?;
            lab.api_at(&main, |c| async move { c.hosts().await })
                .ok()?
                .ok()?
                .into_iter()
                .find(|h| h.info.name == "b1" && h.applied_version == v && h.connected)
        },
    );

    // Back: b1's gateway reads the registry from etcd and serves the same version.
    lab.start_extra_gateway("b1").unwrap();
    let v = version(&lab, &main).unwrap();
    assert_eq!(version(&lab, &b1gw), Some(v));
    let endpoints = lab
        .api_at(&b1gw, |c| async move { c.endpoints().await })
        .unwrap()
        .unwrap();
    assert!(endpoints.iter().any(|e| e.ip == c2 && e.host == "b1"));
    lab.down().unwrap();
}
