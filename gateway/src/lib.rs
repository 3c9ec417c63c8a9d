//! ferry's gateway daemon: the endpoint registry, public mappings and the migration coordinator.
//!
//! - [`config`]: the daemon's TOML configuration;
//! - [`registry`]: the registry as a pure state machine (validation, versions);
//! - [`store`]: its atomic persistence;
//! - [`auth`]: the bearer token;
//! - [`server`]: the HTTP API (axum);
//! - [`coordinator`]: the migration routes, the wait for agents, rollbacks, grace timer.
//!
//! The `ferry` command line (ferry-cli) runs the daemon with [`server::run`].
pub mod auth;
pub mod config;
pub mod coordinator;
pub mod registry;
pub mod runs;
pub mod server;
pub mod store;
