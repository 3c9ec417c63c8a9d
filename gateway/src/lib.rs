//! ferry's gateway daemon as a library: the endpoint registry, public mappings and the
//! migration coordinator.
//!
//! - [`config`]: the daemon's TOML configuration;
//! - [`registry`]: the registry as a pure state machine (validation, versions), one module per
//!   concern;
//! - [`store`]: its atomic persistence (a file store, or [`etcd_store`] on etcd through
//!   [`etcd`] for several gateways);
//! - [`watch`]: what changed between versions, so agents get deltas, not whole snapshots;
//! - [`auth`]: the bearer token;
//! - [`server`]: the HTTP API (axum);
//! - [`migration`]: the gateway's side of a migration: the pure transitions, the coordinator
//!   (routes, the wait for agents, rollbacks, grace timer) and the run driver;
//! - [`metrics`]: the Prometheus metrics (prometheus-client);
//! - [`daemon`]: start-up ([`serve`], [`check`]).
//!
//! The `ferry` command line (ferry-cli) runs the daemon with [`serve`].
pub mod auth;
pub mod cluster;
pub mod config;
pub mod daemon;
pub mod etcd;
pub mod etcd_store;
pub mod metrics;
pub mod migration;
pub mod registry;
pub mod server;
pub mod shared_map;
pub mod store;
pub mod watch;

pub use daemon::{CheckReport, StartError, check, serve};
