//! The TOML files: the agent's configuration (`ferry_config::AgentConfig`), the gateway's
//! (`ferry_gateway::config::Config`) and the lab's topology (`ferry_lab::topology::Topology`,
//! whose `resolve` allocates every address).

use std::path::Path;

use ferry_config::AgentConfig;
use ferry_fuzz::{config, largest_allocation, mutated, replay};
use ferry_gateway::config::Config as GatewayConfig;
use ferry_lab::topology::Topology;
use proptest::prelude::*;

const TOKENS: &[&[u8]] = &[
    b"\n[[peers]]\nname = \"a3\"\nvtep = \"198.18.1.12\"\noverlay_ip = \"10.244.255.3\"\n",
    b"\n[[hosts]]\nname = \"x\"\ncloud = \"a\"\n",
    b"\n[gateway]\n",
    b"\n[hold]\n",
    b"\n[criu]\n",
    b"= ",
    b"\"",
    b"[]",
    b"{}",
    b"/32",
    b"/0",
    b"255.255.255.255",
    b"0.0.0.0",
    b"role = \"gateway\"\n",
    b"inf",
    b"nan",
];

/// Parses `text` with `parse`; what is accepted serialises with `to_toml` and parses back
/// equal. No panic, an error message, and no allocation out of proportion with the file.
fn check<T: PartialEq + std::fmt::Debug, E: std::fmt::Display>(
    bytes: &[u8],
    parse: impl Fn(&str) -> Result<T, E>,
    to_toml: impl Fn(&T) -> String,
) -> Result<(), String> {
    let text = String::from_utf8_lossy(bytes);
    let (parsed, largest) = largest_allocation(|| parse(&text));
    assert!(
        largest <= (1 << 20) + 64 * bytes.len(),
        "an allocation of {largest} bytes for a {}-byte file",
        bytes.len()
    );
    match parsed {
        Ok(v) => {
            let again = to_toml(&v);
            match parse(&again) {
                Ok(back) => assert_eq!(back, v, "{again}"),
                Err(e) => panic!("accepted, serialised, refused: {e}\n{again}"),
            }
            Ok(())
        }
        Err(e) => {
            let msg = e.to_string();
            assert!(!msg.is_empty());
            Err(msg)
        }
    }
}

fn agent(bytes: &[u8]) -> Result<(), String> {
    check(
        bytes,
        |t| AgentConfig::parse(Path::new("agent.toml"), t),
        AgentConfig::to_toml,
    )
}

fn gateway(bytes: &[u8]) -> Result<(), String> {
    check(bytes, GatewayConfig::parse, |c| {
        toml::to_string(c).expect("a gateway config serialises")
    })
}

fn topology(bytes: &[u8]) -> Result<(), String> {
    check(bytes, Topology::parse, Topology::to_toml)
}

#[test]
fn the_corpora_are_read_as_their_names_say() {
    replay("agent_toml", agent);
    replay("gateway_toml", gateway);
    replay("topology_toml", topology);
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn any_agent_config_is_refused_or_round_trips(bytes in mutated("agent_toml", TOKENS)) {
        let _ = agent(&bytes);
    }

    #[test]
    fn any_gateway_config_is_refused_or_round_trips(bytes in mutated("gateway_toml", TOKENS)) {
        let _ = gateway(&bytes);
    }

    #[test]
    fn any_topology_is_refused_or_round_trips(bytes in mutated("topology_toml", TOKENS)) {
        let _ = topology(&bytes);
    }
}
