//! `ferry-workload`: a small stateful TCP service that moves itself between hosts with ferry's
//! socket hand-off, and the client that proves the move invisible to its connections.
//!
//! - [`server`]: `serve` (a request/response server whose per-connection counters are its state;
//!   exports its sockets and state to the node agent on SIGUSR1 or `export HOST` on stdin) and
//!   `claim` (the same server, rebuilt on the destination from what the agent restored).
//! - [`client`]: many connections, a numbered request on each every few milliseconds, every
//!   reply checked (exactly once, in order, counters continuous), gaps and retransmissions
//!   measured.
//! - [`redis`]: a checking client for an unmodified `redis-server` (INCR/SET/GET/APPEND/STRLEN
//!   on a few connections, every reply checked, never reconnecting), with its own RESP2 codec.
//! - [`handoff`] and [`wire`]: the client side of the agent's hand-off API (a Unix socket, JSON
//!   headers, file descriptors as SCM_RIGHTS) with std and rustix only: what any
//!   application needs to move its own connections.
pub mod client;
pub mod handoff;
pub mod measure;
pub mod memory;
pub mod redis;
pub mod server;
pub mod sys;
pub mod wire;
