//! ferry's gateway: the endpoint registry, public endpoints and the migration coordinator
//! (grown by later issues), and the CLI that orchestrators call.
pub mod cli;
pub mod server;
