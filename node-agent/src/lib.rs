//! ferry's node agent: one per host. It owns the host's external VXLAN device and the eBPF
//! datapath attached to it, keeps the datapath maps in line with what it knows of the other
//! hosts, and exports the datapath's counters in Prometheus text format.
pub mod agent;
pub mod cli;
pub mod config;
pub mod metrics;
pub mod plan;
