//! ferry's node agent: one per host. It owns the host's external VXLAN device and the eBPF
//! datapath, builds the network side of the containers the registry places on this host,
//! follows the registry (gateway) for peers, endpoints and public addresses, and exports the
//! datapath's counters in Prometheus text format.
//!
//! Modules depend downwards only (`a → b`: `a` uses `b`):
//!
//! ```text
//! main → cli, agent
//! agent → peer_api, handoff, cni, sync, metrics, runtime, node, plan, hold, config
//! cni (the CNI plugin's socket) → node, containers, handoff::wire, config
//! peer_api (serves the routes below on `api_listen`) → handoff, criu, drain, runtime::api
//! criu (CRIU driver)          → drain, runtime, node, auth, config
//! drain (before a dump)       → node, auth
//! fencing (stopped copies)    → criu::resume, runtime, node
//! handoff (socket hand-off)   → node, auth, config
//! runtime::api                → runtime, node, auth
//! sync (follows the registry) → fencing, node, plan, config
//! metrics                     → hold
//! node (applies a plan)       → containers, hold, plan
//! containers → plan → config
//! hold → config
//! runtime, auth               → (other crates only)
//! config = the `ferry-config` crate (types only)
//! ```
pub mod agent;
pub mod auth;
pub mod cli;
pub mod cni;
/// The agent's configuration: its own crate, so that tools can write it without the agent.
pub use ferry_config as config;
pub mod containers;
pub mod criu;
pub mod drain;
pub mod fencing;
pub mod handoff;
pub mod hold;
pub mod metrics;
pub mod node;
pub mod peer_api;
pub mod plan;
pub mod public_ha;
pub mod runtime;
pub mod sync;
