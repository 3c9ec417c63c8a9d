//! The CNI plugin's inputs (`ferry_cni::spec`): the network configuration a runtime writes on
//! its stdin, and the request the agent reads on its CNI socket (`ferry_cni::proto`).

use ferry_cni::{
    ErrorCode,
    proto::Request,
    spec::{self, Version},
};
use ferry_fuzz::{config, largest_allocation, mutated, replay};
use proptest::prelude::*;

const TARGET: &str = "cni_conf";
const TOKENS: &[&[u8]] = &[
    b"\"cniVersion\":\"0.4.0\",",
    b"\"runtimeConfig\":{\"ips\":[\"10.244.1.5/16\"]},",
    b"\"args\":{\"cni\":{\"mac\":\"02:00:00:00:00:01\"}},",
    b"\"type\":\"bridge\",",
    b"\"agent\":\"rel\",",
    b"fd00::1/64",
    b"null",
    b"[]",
];

/// A configuration is accepted (then its fields keep the spec's rules) or refused with one of
/// the spec's codes for configurations and a message; the answer's version is always one the
/// plugin speaks.
fn parse(bytes: &[u8]) -> Result<(), String> {
    let v = spec::answer_version(bytes);
    assert!(Version::ALL.contains(&v));
    match spec::parse_netconf(bytes) {
        Ok(c) => {
            spec::validate_network_name(&c.name).expect("an accepted name is valid");
            assert!(c.agent.is_absolute() && c.agent.as_os_str().len() < 108);
            assert_eq!(c.version, v, "the answer is in the configuration's version");
            Ok(())
        }
        Err(e) => {
            assert!(
                matches!(
                    e.code,
                    ErrorCode::IncompatibleVersion
                        | ErrorCode::UnsupportedField
                        | ErrorCode::Decode
                        | ErrorCode::InvalidConfig
                ),
                "{e}"
            );
            assert!(!e.msg.is_empty());
            Err(e.to_string())
        }
    }
}

#[test]
fn the_corpus_is_read_as_its_names_say() {
    replay(TARGET, parse);
}

proptest! {
    #![proptest_config(config())]

    /// Mutated configurations: refused with a code and a message, or accepted with their rules
    /// kept; never a large allocation.
    #[test]
    fn any_mutated_configuration_is_refused_or_keeps_the_rules(bytes in mutated(TARGET, TOKENS)) {
        let (_, largest) = largest_allocation(|| parse(&bytes));
        prop_assert!(largest <= 64 * bytes.len().max(1024), "{largest} bytes for {} bytes of input", bytes.len());
    }

    /// The agent's side: a request header decodes or is refused, and what decodes re-encodes
    /// to itself.
    #[test]
    fn any_mutated_request_decodes_to_itself_or_is_refused(bytes in mutated(TARGET, TOKENS)) {
        if let Ok(r) = serde_json::from_slice::<Request>(&bytes) {
            let again: Request = serde_json::from_slice(&serde_json::to_vec(&r).unwrap()).unwrap();
            prop_assert_eq!(again, r);
        }
    }

    /// `CNI_ARGS` of any shape: parsed or refused as an invalid environment.
    #[test]
    fn any_cni_args_are_parsed_or_refused(s in "[A-Za-z0-9=;:./_-]{0,40}") {
        if let Err(e) = spec::CniArgs::parse(&s) {
            prop_assert_eq!(e.code, ErrorCode::InvalidEnv);
        }
    }
}
