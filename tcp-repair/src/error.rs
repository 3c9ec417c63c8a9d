//! Errors: every failed raw call says which step of dump/restore it was, which call or option,
//! and the errno.

use std::fmt;
use std::io;

use crate::state::KernelState;

/// The step of [`check`](crate::check), [`dump`](crate::dump), [`abort_dump`](crate::abort_dump)
/// or [`restore`](crate::restore) that failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// `check`: reading the socket's kind and TCP state (nothing changed).
    Check,
    /// `dump`: reading addresses and socket options before repair mode.
    DumpSocket,
    /// `dump`: `TCP_REPAIR = 1`.
    DumpRepairOn,
    /// `dump`: TCP_INFO, TCP_MAXSEG, TCP_TIMESTAMP, TCP_REPAIR_WINDOW.
    DumpOptions,
    /// `dump`: sequence number and bytes of the receive queue.
    DumpRecvQueue,
    /// `dump`: sequence number and bytes of the send queue.
    DumpSendQueue,
    /// `dump` failed after repair mode was on: turning it off again.
    DumpRollback,
    /// `abort_dump`: leaving repair mode.
    Abort,
    /// `restore`: the state is not restorable (version, invariants).
    Validate,
    /// `restore`: socket(), buffer sizes, SO_REUSEADDR, TCP_REPAIR = 1.
    RestoreSocket,
    /// `restore`: bind() to the old local address.
    RestoreBind,
    /// `restore`: TCP_QUEUE_SEQ of both queues (before connect).
    RestoreSeqs,
    /// `restore`: connect() in repair mode (no SYN is sent).
    RestoreConnect,
    /// `restore`: TCP_REPAIR_OPTIONS and TCP_TIMESTAMP.
    RestoreOptions,
    /// `restore`: refilling the receive queue.
    RestoreRecvQueue,
    /// `restore`: refilling the sent-but-unacknowledged part of the send queue.
    RestoreSendQueue,
    /// `restore`: our FIN, for FIN_WAIT1/FIN_WAIT2.
    RestoreOurFin,
    /// `restore`: TCP_REPAIR_WINDOW.
    RestoreWindow,
    /// `restore`: the peer's FIN, for CLOSE_WAIT (a segment injected over loopback).
    RestorePeerFin,
    /// `restore`: `TCP_REPAIR = 0` (the kernel sends a window probe).
    RestoreRepairOff,
    /// `restore`: sending the never-sent tail of the send queue as normal data.
    RestoreUnsent,
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = match self {
            Step::Check => "check",
            Step::DumpSocket => "dump/socket",
            Step::DumpRepairOn => "dump/repair-on",
            Step::DumpOptions => "dump/options",
            Step::DumpRecvQueue => "dump/recv-queue",
            Step::DumpSendQueue => "dump/send-queue",
            Step::DumpRollback => "dump/rollback",
            Step::Abort => "abort",
            Step::Validate => "restore/validate",
            Step::RestoreSocket => "restore/socket",
            Step::RestoreBind => "restore/bind",
            Step::RestoreSeqs => "restore/queue-seqs",
            Step::RestoreConnect => "restore/connect",
            Step::RestoreOptions => "restore/options",
            Step::RestoreRecvQueue => "restore/recv-queue",
            Step::RestoreSendQueue => "restore/send-queue",
            Step::RestoreOurFin => "restore/our-fin",
            Step::RestoreWindow => "restore/window",
            Step::RestorePeerFin => "restore/peer-fin",
            Step::RestoreRepairOff => "restore/repair-off",
            Step::RestoreUnsent => "restore/unsent",
        };
        f.write_str(s)
    }
}

/// Everything that can go wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A raw call failed.
    #[error("{step}: {op}: {source}")]
    Sys {
        /// Which step.
        step: Step,
        /// Which call, with its option and value, e.g. `setsockopt(TCP_REPAIR_QUEUE=TCP_SEND_QUEUE)`.
        op: String,
        /// The errno (`source.raw_os_error()`).
        #[source]
        source: io::Error,
    },
    /// The descriptor is not a TCP socket.
    #[error("{step}: not a TCP socket (domain {domain}, type {ty}, protocol {protocol})")]
    NotTcp {
        /// Which step.
        step: Step,
        /// SO_DOMAIN.
        domain: i32,
        /// SO_TYPE.
        ty: i32,
        /// SO_PROTOCOL.
        protocol: i32,
    },
    /// The socket is in a TCP state that cannot be moved. Nothing was changed.
    #[error("{step}: a socket in state {state} cannot be moved: {reason}")]
    NotMovable {
        /// Which step.
        step: Step,
        /// The kernel's TCP state.
        state: KernelState,
        /// Why.
        reason: &'static str,
    },
    /// The queues kept changing while they were read: packets still reach the socket.
    #[error(
        "{step}: the {queue} queue kept changing while it was read ({attempts} attempts): \
         hold the connection's packets before dumping"
    )]
    Unstable {
        /// Which step.
        step: Step,
        /// "receive" or "send".
        queue: &'static str,
        /// How many reads were tried.
        attempts: u32,
    },
    /// The kernel returned fewer (or more) queue bytes than it reported.
    #[error("{step}: {what}: expected {expected} bytes, got {got}")]
    ShortQueue {
        /// Which step.
        step: Step,
        /// What was read or written.
        what: &'static str,
        /// Bytes expected.
        expected: usize,
        /// Bytes actually read or written.
        got: usize,
    },
    /// A serialized state written by a version of this crate we cannot read.
    #[error(
        "{step}: TcpState version {found} is not supported (this build reads version {supported})"
    )]
    UnsupportedVersion {
        /// Which step.
        step: Step,
        /// The state's `version`.
        found: u32,
        /// [`TcpState::VERSION`](crate::TcpState::VERSION).
        supported: u32,
    },
    /// A state whose fields contradict each other.
    #[error("{step}: invalid TcpState: {0}", step = Step::Validate)]
    Invalid(String),
    /// Waited too long for the kernel (e.g. for the injected FIN to be processed).
    #[error("{step}: timed out: {what}")]
    Timeout {
        /// Which step.
        step: Step,
        /// What did not happen in time.
        what: String,
    },
}

impl Error {
    /// The errno of a failed raw call, if this error is one.
    pub fn errno(&self) -> Option<i32> {
        match self {
            Error::Sys { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

/// Result of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Adds the step and the call to an `io::Result`.
pub(crate) trait Context<T> {
    fn ctx(self, step: Step, op: impl Into<String>) -> Result<T>;
    fn with_ctx<F: FnOnce() -> String>(self, step: Step, op: F) -> Result<T>;
}

impl<T> Context<T> for io::Result<T> {
    fn ctx(self, step: Step, op: impl Into<String>) -> Result<T> {
        self.map_err(|source| Error::Sys {
            step,
            op: op.into(),
            source,
        })
    }

    fn with_ctx<F: FnOnce() -> String>(self, step: Step, op: F) -> Result<T> {
        self.map_err(|source| Error::Sys {
            step,
            op: op(),
            source,
        })
    }
}
