//! Sending: an `AF_PACKET` socket through `pnet_datalink`, and entering a network namespace.
//!
//! # Namespaces
//!
//! `pnet_datalink::interfaces()` (getifaddrs, a netlink socket) and `pnet_datalink::channel()`
//! (`socket(AF_PACKET, SOCK_RAW, ETH_P_ALL)` bound to the interface's index) both work in the
//! network namespace **of the calling thread** at the moment of the call: Linux creates every
//! socket in `current->nsproxy->net_ns`, which `setns(2)` changes per thread. A socket keeps its
//! namespace for life, wherever it is used from afterwards.
//!
//! So [`send_once`] and [`announce`] must run on a thread that is already in the container's
//! namespace; [`announce_in_netns`] and [`send_once_in_netns`] do that for you: they spawn a
//! scoped thread, `setns(fd, CLONE_NEWNET)` it into the namespace file, do the work there and
//! let the thread end — the caller's thread never changes namespace. From async code, call
//! them inside `tokio::task::spawn_blocking`.

use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::time::{Duration, Instant};

use pnet_datalink::{Channel, Config, DataLinkReceiver, DataLinkSender};

use crate::Announcement;
use crate::error::{Error, Result};
use crate::frames::{self, Frame, FrameKind};
use crate::schedule::{Cancel, Schedule};

/// A send that does not complete in this time fails (the socket is otherwise blocking-free).
const WRITE_TIMEOUT: Duration = Duration::from_secs(1);

/// Frames that the kernel accepted, by kind.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sent {
    /// Gratuitous ARP requests.
    pub arp_requests: u32,
    /// Gratuitous ARP replies.
    pub arp_replies: u32,
    /// Unsolicited neighbour advertisements.
    pub neighbour_adverts: u32,
    /// Bytes of all those frames (Ethernet header included, FCS not).
    pub bytes: u64,
}

impl Sent {
    /// All frames.
    pub fn frames(&self) -> u32 {
        self.arp_requests + self.arp_replies + self.neighbour_adverts
    }

    fn count(&mut self, frame: &Frame) {
        match frame.kind {
            FrameKind::GarpRequest => self.arp_requests += 1,
            FrameKind::GarpReply => self.arp_replies += 1,
            FrameKind::UnsolicitedNa => self.neighbour_adverts += 1,
        }
        self.bytes += frame.bytes.len() as u64;
    }

    fn add(&mut self, other: Sent) {
        self.arp_requests += other.arp_requests;
        self.arp_replies += other.arp_replies;
        self.neighbour_adverts += other.neighbour_adverts;
        self.bytes += other.bytes;
    }
}

/// What an [`announce`] did.
#[derive(Debug, Default)]
pub struct Report {
    /// Rounds the schedule asked for.
    pub rounds_planned: u32,
    /// Rounds in which every frame went out.
    pub rounds_ok: u32,
    /// Rounds in which at least one frame failed (see `errors`).
    pub rounds_failed: u32,
    /// Frames sent, over all rounds.
    pub sent: Sent,
    /// Whether a [`Cancel`] stopped the series before its end.
    pub cancelled: bool,
    /// Every failed send, in order (a failure does not stop the series: the next round may
    /// well go through, e.g. once the interface is up).
    pub errors: Vec<Error>,
    /// From the start of round 0 to the end of the last round sent.
    pub elapsed: Duration,
}

/// An open `AF_PACKET` socket on one interface of the calling thread's namespace.
pub struct Link {
    interface: String,
    tx: Box<dyn DataLinkSender>,
    // pnet opens one socket for both directions; the receiving half is kept only so the
    // socket's lifetime is obvious. Nothing reads it: what it queues is dropped with it.
    _rx: Box<dyn DataLinkReceiver>,
}

impl Link {
    /// Finds `interface` in the calling thread's network namespace and opens a socket on it.
    /// Logs a warning if the interface's own MAC is not `expected_mac` (frames are still sent
    /// with the announced MAC as their source).
    pub fn open(interface: &str, expected_mac: Option<[u8; 6]>) -> Result<Link> {
        let all = pnet_datalink::interfaces();
        let Some(iface) = all.iter().find(|i| i.name == interface) else {
            return Err(Error::InterfaceNotFound {
                interface: interface.to_owned(),
                present: all.into_iter().map(|i| i.name).collect(),
            });
        };
        if let (Some(want), Some(have)) = (expected_mac, iface.mac)
            && have.octets() != want
        {
            tracing::warn!(
                interface,
                interface_mac = %have,
                announced_mac = %frames::mac_to_string(want),
                "announcing a MAC that is not the interface's own"
            );
        }
        let config = Config {
            write_buffer_size: frames::NA_FRAME_LEN,
            read_buffer_size: frames::ETHERNET_MIN_LEN,
            read_timeout: Some(Duration::ZERO),
            write_timeout: Some(WRITE_TIMEOUT),
            promiscuous: false,
            ..Config::default()
        };
        match pnet_datalink::channel(iface, config) {
            Ok(Channel::Ethernet(tx, rx)) => Ok(Link {
                interface: interface.to_owned(),
                tx,
                _rx: rx,
            }),
            Ok(_) => Err(Error::UnsupportedChannel {
                interface: interface.to_owned(),
            }),
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => Err(Error::PermissionDenied {
                interface: interface.to_owned(),
                source: e,
            }),
            Err(e) => Err(Error::Open {
                interface: interface.to_owned(),
                source: e,
            }),
        }
    }

    /// The interface name.
    pub fn interface(&self) -> &str {
        &self.interface
    }

    /// Sends one frame.
    pub fn send(&mut self, frame: &Frame) -> Result<()> {
        let res = self.tx.send_to(&frame.bytes, None).unwrap_or_else(|| {
            Err(io::Error::other(
                "pnet_datalink returned no result for the send",
            ))
        });
        res.map_err(|source| Error::Send {
            interface: self.interface.clone(),
            kind: frame.kind,
            addr: frame.addr,
            source,
        })
    }

    /// Sends every frame, going on past failures; returns what went out and what failed.
    pub fn send_all(&mut self, frames: &[Frame]) -> (Sent, Vec<Error>) {
        let mut sent = Sent::default();
        let mut errors = Vec::new();
        for frame in frames {
            match self.send(frame) {
                Ok(()) => sent.count(frame),
                Err(e) => errors.push(e),
            }
        }
        (sent, errors)
    }
}

/// One round: every frame of `ann` (see [`frames::frames`]) on `ann.interface`, from the
/// calling thread's network namespace. Fails on the first frame the kernel refuses (the other
/// frames are still tried).
pub fn send_once(ann: &Announcement) -> Result<Sent> {
    ann.validate()?;
    let mut link = Link::open(&ann.interface, Some(ann.mac))?;
    let (sent, errors) = link.send_all(&frames::frames(ann));
    match errors.into_iter().next() {
        Some(e) => Err(e),
        None => Ok(sent),
    }
}

/// Sends `schedule.count` rounds on `ann.interface` from the calling thread's network
/// namespace, sleeping between rounds; stops early when `cancel` is cancelled.
///
/// The socket is opened once. Errors opening it (interface not found, no permission) fail at
/// once. A frame that fails to send is recorded in [`Report::errors`] and the series goes on;
/// the call fails only if **no** frame at all went out (then with the last error).
pub fn announce(
    ann: &Announcement,
    schedule: &Schedule,
    cancel: Option<&Cancel>,
) -> Result<Report> {
    ann.validate()?;
    schedule.validate()?;
    let mut link = Link::open(&ann.interface, Some(ann.mac))?;
    let frames = frames::frames(ann);
    let mut report = Report {
        rounds_planned: schedule.count,
        ..Report::default()
    };
    let never = Cancel::new();
    let cancel = cancel.unwrap_or(&never);
    let start = Instant::now();
    for (round, offset) in schedule.offsets().into_iter().enumerate() {
        if cancel.sleep_until(start + offset) {
            report.cancelled = true;
            break;
        }
        let (sent, errors) = link.send_all(&frames);
        report.sent.add(sent);
        if errors.is_empty() {
            report.rounds_ok += 1;
        } else {
            tracing::warn!(
                interface = %ann.interface,
                round,
                failed = errors.len(),
                first_error = %error_chain(&errors[0]),
                "announcement round incomplete"
            );
            report.rounds_failed += 1;
            report.errors.extend(errors);
        }
        report.elapsed = start.elapsed();
    }
    tracing::debug!(interface = %ann.interface, ?report, "announced");
    if report.sent.frames() == 0
        && let Some(e) = report.errors.pop()
    {
        return Err(e);
    }
    Ok(report)
}

/// [`announce`] from inside the network namespace at `path` (`/run/netns/NAME`,
/// `/proc/PID/ns/net`, …), on a thread of its own; the calling thread stays where it is.
pub fn announce_in_netns(
    path: &Path,
    ann: &Announcement,
    schedule: &Schedule,
    cancel: Option<&Cancel>,
) -> Result<Report> {
    // Check before spawning: an invalid request should not need the namespace.
    ann.validate()?;
    schedule.validate()?;
    in_netns(path, || announce(ann, schedule, cancel))?
}

/// [`send_once`] from inside the network namespace at `path`.
pub fn send_once_in_netns(path: &Path, ann: &Announcement) -> Result<Sent> {
    ann.validate()?;
    in_netns(path, || send_once(ann))?
}

/// Runs `f` on a new thread that first joins the network namespace at `path`
/// (`setns(CLONE_NEWNET)`, which needs `CAP_SYS_ADMIN`). Sockets that `f` creates belong to
/// that namespace and may be returned and used from anywhere. The thread ends with `f`, so no
/// thread is ever left in the wrong namespace.
pub fn in_netns<T, F>(path: &Path, f: F) -> Result<T>
where
    T: Send,
    F: FnOnce() -> T + Send,
{
    let ns = std::fs::File::open(path).map_err(|source| Error::Netns {
        path: path.to_owned(),
        source,
    })?;
    std::thread::scope(|scope| {
        let worker = std::thread::Builder::new()
            .name("ferry-announce-netns".into())
            .spawn_scoped(scope, move || {
                // SAFETY: `ns` is an open file for the whole call; setns only reads the
                // descriptor and changes this (new, dedicated) thread's namespace.
                let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                if rc != 0 {
                    return Err(io::Error::last_os_error());
                }
                drop(ns);
                Ok(f())
            })
            .map_err(|source| Error::Netns {
                path: path.to_owned(),
                source,
            })?;
        match worker.join() {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(source)) => Err(Error::Netns {
                path: path.to_owned(),
                source,
            }),
            Err(panic) => Err(Error::ThreadPanicked {
                path: path.to_owned(),
                message: panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default(),
            }),
        }
    })
}

/// `error: cause: cause` on one line.
pub(crate) fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cur = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn ann(interface: &str) -> Announcement {
        Announcement {
            interface: interface.into(),
            mac: [0x02, 0, 0, 0, 0, 1],
            ipv4: vec![Ipv4Addr::new(10, 0, 0, 1)],
            ipv6: vec![],
        }
    }

    #[test]
    fn missing_interface_is_named() {
        // Works without root: getifaddrs needs no privilege.
        let err = send_once(&ann("fan-nonexist0")).unwrap_err();
        match &err {
            Error::InterfaceNotFound { interface, present } => {
                assert_eq!(interface, "fan-nonexist0");
                assert!(present.iter().any(|p| p == "lo"), "{present:?}");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(err.to_string().contains("fan-nonexist0"));
    }

    #[test]
    fn bad_netns_path_is_named() {
        let err =
            send_once_in_netns(Path::new("/nonexistent/fan-netns"), &ann("eth0")).unwrap_err();
        assert!(matches!(err, Error::Netns { .. }), "{err:?}");
        assert!(err.to_string().contains("/nonexistent/fan-netns"));
        // A file that is not a namespace: setns fails with EINVAL.
        let err = send_once_in_netns(Path::new("/proc/self/status"), &ann("eth0")).unwrap_err();
        assert!(matches!(err, Error::Netns { .. }), "{err:?}");
    }

    #[test]
    fn in_netns_reports_panics() {
        let err =
            in_netns(Path::new("/proc/self/ns/net"), || -> () { panic!("boom") }).unwrap_err();
        match err {
            Error::ThreadPanicked { message, .. } => assert_eq!(message, "boom"),
            // Without CAP_SYS_ADMIN setns into our own namespace still needs the capability.
            Error::Netns { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn sent_counts() {
        let a = Announcement {
            ipv6: vec!["fd00::1".parse().unwrap()],
            ..ann("eth0")
        };
        let mut s = Sent::default();
        for f in frames::frames(&a) {
            s.count(&f);
        }
        assert_eq!(
            s,
            Sent {
                arp_requests: 1,
                arp_replies: 1,
                neighbour_adverts: 1,
                bytes: 60 + 60 + 86
            }
        );
        assert_eq!(s.frames(), 3);
    }
}
