//! The lab's errors: every variant carries what was being done and to what.

use std::{path::PathBuf, process::ExitStatus};

use crate::topology::TopologyError;

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("ferry-lab needs root (network namespaces, veths, bpffs): run it as root")]
    NotRoot,
    #[error(transparent)]
    Topology(#[from] TopologyError),
    #[error(
        "binary `{name}` not found (looked at: {}); build it (`cargo build -p {package}`) or set FERRY_BIN_DIR",
        .searched.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    BinaryNotFound {
        name: String,
        package: String,
        searched: Vec<PathBuf>,
    },
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: ExitStatus,
        stderr: String,
    },
    #[error(transparent)]
    NetNs(#[from] ferry_overlay::netns::NetNsError),
    #[error("gateway daemon {problem}; tail of {log}:\n{tail}")]
    GatewayFailed {
        problem: String,
        log: PathBuf,
        tail: String,
    },
    #[error("the WAN links' forwarder {problem}; tail of {log}:\n{tail}")]
    WanForwarder {
        problem: String,
        log: PathBuf,
        tail: String,
    },
    #[error("`ferry {args}` failed: {message}")]
    Ferry { args: String, message: String },
    #[error(
        "agent of host {host} exited ({status}) before serving metrics; tail of {log}:\n{tail}"
    )]
    AgentDied {
        host: String,
        status: ExitStatus,
        log: PathBuf,
        tail: String,
    },
    #[error(
        "agent of host {host} did not answer on http://{listen}/metrics within {secs} s; tail of {log}:\n{tail}"
    )]
    AgentTimeout {
        host: String,
        listen: std::net::SocketAddr,
        secs: u64,
        log: PathBuf,
        tail: String,
    },
    #[error("lab {prefix} has no node {name:?} (nodes: {known})")]
    UnknownNode {
        prefix: String,
        name: String,
        known: String,
    },
    #[error("state of lab {prefix} ({path}): {problem}")]
    State {
        prefix: String,
        path: PathBuf,
        problem: String,
    },
    #[error("{0:?} is not a lab name (expected `fl` + 6 hex digits, e.g. fl3a9c1e)")]
    BadPrefix(String),
    #[error("no lab {0} on this machine")]
    NoSuchLab(String),
    #[error("{0}")]
    Ambiguous(String),
    #[error(transparent)]
    Teardown(#[from] TeardownError),
    #[error("{error}\n(and tearing the half-built lab down failed too: {teardown})")]
    UpAndTeardown {
        error: Box<LabError>,
        teardown: TeardownError,
    },
}

impl LabError {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Self::Io {
            context: context.into(),
            source,
        }
    }
}

/// Teardown keeps going on errors and reports every one of them.
#[derive(Debug, thiserror::Error)]
#[error("tearing down lab {prefix}: {} error(s): {}", .errors.len(), .errors.join("; "))]
pub struct TeardownError {
    pub prefix: String,
    pub errors: Vec<String>,
}
