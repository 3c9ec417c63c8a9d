//! ferry's gateway: the endpoint registry, public mappings and the migration coordinator, and
//! the CLI that orchestrators call.
//!
//! - [`config`]: the daemon's TOML configuration;
//! - [`registry`]: the registry as a pure state machine (validation, versions);
//! - [`store`]: its atomic persistence;
//! - [`auth`]: the bearer token;
//! - [`server`]: the HTTP API (axum);
//! - [`coordinator`]: the migration routes, the wait for agents, rollbacks, grace timer;
//! - [`cli`] / [`commands`]: the `ferry` command line and what each command does.
pub mod auth;
pub mod cli;
pub mod commands;
pub mod config;
pub mod coordinator;
pub mod registry;
pub mod runcmd;
pub mod runs;
pub mod server;
pub mod store;
