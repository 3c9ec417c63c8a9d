//! ferry's node agent: one per host. It owns the host's external VXLAN device and the eBPF
//! datapath, builds the network side of the containers the registry places on this host,
//! follows the registry (gateway) for peers, endpoints and public addresses, and exports the
//! datapath's counters in Prometheus text format.
pub mod agent;
pub mod cli;
pub mod config;
pub mod containers;
pub mod criu;
pub mod handoff;
pub mod hold;
pub mod metrics;
pub mod node;
pub mod plan;
pub mod runtime;
pub mod sync;
