//! ferry's node agent.
pub mod config;
