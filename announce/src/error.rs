//! Errors, each with the context needed to act on it (which interface, which frame, which
//! namespace).

use std::io;
use std::net::IpAddr;
use std::path::PathBuf;

use crate::frames::FrameKind;

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why an announcement could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The [`Announcement`](crate::Announcement) itself is unusable (bad MAC, multicast address,
    /// nothing to announce, bad interface name).
    #[error("invalid announcement for {interface:?}: {reason}")]
    InvalidAnnouncement {
        /// The interface named in the announcement.
        interface: String,
        /// What is wrong.
        reason: String,
    },

    /// The [`Schedule`](crate::Schedule) is out of range.
    #[error("invalid announcement schedule: {0}")]
    InvalidSchedule(String),

    /// No interface of that name in the calling thread's network namespace.
    #[error(
        "interface {interface:?} not found in this thread's network namespace \
         (present: {present:?}); was the announcement run inside the container's netns?"
    )]
    InterfaceNotFound {
        /// The name looked for.
        interface: String,
        /// The interfaces that are there.
        present: Vec<String>,
    },

    /// Opening an `AF_PACKET` socket was refused: the caller lacks `CAP_NET_RAW` in the
    /// user namespace that owns the network namespace.
    #[error("no permission to open an AF_PACKET socket on {interface:?} (needs CAP_NET_RAW)")]
    PermissionDenied {
        /// The interface.
        interface: String,
        /// The refusal.
        #[source]
        source: io::Error,
    },

    /// Any other failure to open or bind the `AF_PACKET` socket.
    #[error("cannot open an AF_PACKET socket on {interface:?}")]
    Open {
        /// The interface.
        interface: String,
        /// The cause.
        #[source]
        source: io::Error,
    },

    /// `pnet_datalink` returned a channel that is not an Ethernet channel.
    #[error("pnet_datalink gave no Ethernet channel for {interface:?}")]
    UnsupportedChannel {
        /// The interface.
        interface: String,
    },

    /// The kernel refused one frame (interface down: "Network is down", queue full, …).
    #[error("sending the {kind} for {addr} on {interface:?} failed")]
    Send {
        /// The interface.
        interface: String,
        /// Which frame.
        kind: FrameKind,
        /// The address it announced.
        addr: IpAddr,
        /// The cause.
        #[source]
        source: io::Error,
    },

    /// Opening the namespace file or `setns(CLONE_NEWNET)` into it failed.
    #[error("cannot enter the network namespace {path:?}")]
    Netns {
        /// The namespace file (e.g. `/run/netns/NAME` or `/proc/PID/ns/net`).
        path: PathBuf,
        /// The cause (`EPERM` without `CAP_SYS_ADMIN`, `EINVAL` if not a netns file, …).
        #[source]
        source: io::Error,
    },

    /// The thread that worked inside the namespace panicked.
    #[error("the thread running inside network namespace {path:?} panicked: {message}")]
    ThreadPanicked {
        /// The namespace file.
        path: PathBuf,
        /// The panic message, if it was a string.
        message: String,
    },
}
