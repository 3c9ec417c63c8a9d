//! The plugin ↔ agent protocol on the agent's CNI socket (`cni_socket`, mode 0600, root only).
//!
//! One request per connection, one reply, in the framing of the agent's local sockets
//! (`ferry_workload::wire`: `u32 big-endian length | JSON header | carrier bytes`, descriptors
//! as `SCM_RIGHTS`). That framing is the project's own, already shared by the hand-off API and
//! tested both ways; no maintained crate frames JSON together with `SCM_RIGHTS` on a stream.
//!
//! - Request header: a [`Request`], `"fds": 1` for `add` and `check` with the container's
//!   network namespace (the runtime's `CNI_NETNS`, opened by the plugin) as the descriptor —
//!   the path may live in a mount namespace the agent does not share, the descriptor does not
//!   depend on it — and `"fds": 0` for `del` (its namespace may be gone).
//! - Reply header: a [`Reply`]: `{"result": Attached}` for `add`, `{}` for `del` and `check`,
//!   or `{"error": {"code", "msg", "details"}}` with a CNI error code.

use std::{net::Ipv4Addr, path::PathBuf};

use serde::{Deserialize, Serialize};

use crate::spec::{Attached, CniError, ErrorCode};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Add,
    Del,
    Check,
}

/// What the plugin asks the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub op: Op,
    /// The configuration's `cniVersion` (for the agent's logs; the plugin formats the answer).
    pub cni_version: String,
    /// The network's `name`: the agent refuses one it does not serve.
    pub network: String,
    pub container_id: String,
    pub ifname: String,
    /// The runtime's path of the namespace (logs and the result's `sandbox`; the agent uses
    /// the descriptor).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns: Option<PathBuf>,
    /// The address asked for (`ips` capability, `args.cni.ips` or `CNI_ARGS` `IP`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<Ipv4Addr>,
    /// The IPv6 address asked for with it (a runtime restoring a dual-stack container).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip6: Option<std::net::Ipv6Addr>,
    /// The MAC asked for, `aa:bb:cc:dd:ee:ff`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Descriptors that follow (the framing's count): 1 with the namespace, else 0.
    #[serde(default)]
    pub fds: usize,
}

/// A CNI error as the agent sends it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplyError {
    pub code: u32,
    pub msg: String,
    #[serde(default)]
    pub details: String,
}

/// The agent's answer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reply {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Attached>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<ReplyError>,
}

impl Reply {
    pub fn ok(result: Option<Attached>) -> Self {
        Self {
            result,
            error: None,
        }
    }

    pub fn error(e: &CniError) -> Self {
        Self {
            result: None,
            error: Some(ReplyError {
                code: e.code.number(),
                msg: e.msg.clone(),
                details: e.details.clone(),
            }),
        }
    }

    /// The answer as the plugin acts on it.
    pub fn into_result(self) -> Result<Option<Attached>, CniError> {
        match self.error {
            None => Ok(self.result),
            Some(e) => {
                let code = ErrorCode::from_number(e.code).unwrap_or(ErrorCode::Io);
                Err(CniError::new(code, e.msg).with_details(e.details))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_replies_round_trip() {
        let r = Request {
            op: Op::Add,
            cni_version: "1.0.0".into(),
            network: "ferry".into(),
            container_id: "abc".into(),
            ifname: "eth0".into(),
            netns: Some("/run/netns/x".into()),
            ip: Some(Ipv4Addr::new(10, 244, 0, 5)),
            ip6: None,
            mac: None,
            fds: 1,
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["op"], "add");
        assert!(v.get("mac").is_none());
        assert_eq!(serde_json::from_value::<Request>(v).unwrap(), r);
        assert!(
            serde_json::from_str::<Request>(r#"{"op":"add","bogus":1}"#)
                .unwrap_err()
                .to_string()
                .contains("unknown field")
        );

        let e = CniError::new(ErrorCode::AddressInUse, "in use").with_details("d");
        let back = serde_json::from_value::<Reply>(serde_json::to_value(Reply::error(&e)).unwrap())
            .unwrap()
            .into_result()
            .unwrap_err();
        assert_eq!(back, e);
        // An unknown code from a newer agent is still an error.
        let odd = Reply {
            result: None,
            error: Some(ReplyError {
                code: 999,
                msg: "m".into(),
                details: String::new(),
            }),
        };
        assert_eq!(odd.into_result().unwrap_err().code, ErrorCode::Io);
        assert_eq!(Reply::ok(None).into_result(), Ok(None));
    }
}
