//! ferry's gateway: the endpoint registry and public mappings (the migration coordinator comes
//! next), and the CLI that orchestrators call.
//!
//! - [`config`]: the daemon's TOML configuration;
//! - [`registry`]: the registry as a pure state machine (validation, versions);
//! - [`store`]: its atomic persistence;
//! - [`auth`]: the bearer token;
//! - [`server`]: the HTTP API (axum);
//! - [`cli`] / [`commands`]: the `ferry` command line and what each command does.
pub mod auth;
pub mod cli;
pub mod commands;
pub mod config;
pub mod registry;
pub mod server;
pub mod store;
