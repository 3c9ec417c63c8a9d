//! The gateway's side of a migration, in reading order:
//!
//! 1. [`transitions`]: the state machine itself, pure (an `impl Registry` block, unit-tested
//!    without root or I/O): prepare → freeze → release, abort from prepared or frozen, the
//!    end of a released migration's forwarding grace;
//! 2. [`coordinator`]: the `/v1/migrations` routes that apply one step each, persist it, wait
//!    until the agents concerned have applied it, roll back a prepare or freeze they did not
//!    apply in time, and end forwarding graces on a timer;
//! 3. [`runs`]: the run driver (`ferry migrate run`): prepare, then the source agent's CRIU
//!    checkpoint (whose action script calls freeze; the destination calls release), abort on
//!    any failure.
//!
//! The agents' side is in ferry-agent; the CLI's (`ferry migrate …`, the CRIU action script)
//! in ferry-cli.
pub mod coordinator;
pub mod runs;
pub mod takeover;
pub mod transitions;
