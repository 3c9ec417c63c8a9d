//! "I am here now": announcements sent from a restored container's own interface, so that
//! everything on a shared L2 segment relearns where it lives at once.
//!
//! After a container is restored on a new host (DESIGN.md, migration step 4, `release`),
//! switches and bridges still forward its MAC to the old port (a Linux bridge forgets a learned
//! address only after `ageing_time`, 300 s by default) and peers may still cache an old MAC for
//! its addresses. One round of announcements fixes both:
//!
//! - for each IPv4 address, a gratuitous ARP **request** and a gratuitous ARP **reply**;
//! - for each IPv6 address, an unsolicited **Neighbour Advertisement** with Override set.
//!
//! Every frame is broadcast (or sent to all-nodes) with the container's MAC as Ethernet
//! source: a learning bridge moves the MAC to the port it arrived on, and peers that cache the
//! address update it. [`frames`] documents each field and why.
//!
//! # What receivers do with them (Linux; `tests/kernel.rs` shows each point on 6.18)
//!
//! - **Bridge FDB**: any frame relearns its source MAC on the port it came in by, at once
//!   (static entries excepted). This part needs no cooperation from the peers.
//! - **ARP cache**, `net.ipv4.conf.*.arp_accept = 0` (the default): an **existing** entry is
//!   replaced by a gratuitous ARP, request or reply, and at once: a gratuitous ARP bypasses
//!   the 1 s `locktime` that shields an entry from other unsolicited ARP (kernel
//!   `arp_process()`: `override = locktime passed || is_garp`). The entry becomes `STALE`
//!   (broadcast ARP never proves reachability). A gratuitous ARP **creates** no entry unless
//!   `arp_accept = 1` (or 2, with the sender in one of the receiver's subnets: kernel docs, not
//!   tested here). Linux counts a *reply* as gratuitous only if its THA equals its SHA
//!   (`arp_is_garp()`); a reply with a broadcast THA is ignored for 1 s after the entry's last
//!   update, and only then overrides it.
//! - **IPv6 neighbour cache**: an existing entry takes the NA's link-layer address because
//!   Override is set, and becomes `STALE`; a `FAILED` entry is left alone (kernel
//!   `ndisc_recv_na()`). An NA never creates an entry on a host; only a router
//!   (`forwarding = 1`) with `accept_untracked_na` does. Hosts with `drop_unsolicited_na = 1`
//!   ignore it. A host that still holds the address itself only logs "advertised our address"
//!   (or fails DAD if the address is still tentative there).
//!
//! So a peer that was talking to the container (and has an entry) follows it at once; a peer
//! that was not needs nothing.
//!
//! # Use
//!
//! ```no_run
//! use ferry_announce::{Announcement, Schedule, announce_in_netns};
//! use std::path::Path;
//!
//! let ann = Announcement {
//!     interface: "eth0".into(),
//!     mac: [0x02, 0x00, 0x0a, 0xf4, 0x01, 0x0a],
//!     ipv4: vec!["10.244.1.10".parse()?],
//!     ipv6: vec![],
//! };
//! let report = announce_in_netns(Path::new("/run/netns/c1"), &ann, &Schedule::default(), None)?;
//! assert_eq!(report.sent.arp_requests, 4);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Sockets open in the calling thread's network namespace: see [`send`] for why
//! [`announce_in_netns`] exists. Needs `CAP_NET_RAW` (and `CAP_SYS_ADMIN` for the `setns`).

pub mod error;
pub mod frames;
pub mod schedule;
pub mod send;

use std::net::{Ipv4Addr, Ipv6Addr};

pub use error::{Error, Result};
pub use frames::{Frame, FrameKind};
pub use schedule::{Cancel, Schedule};
pub use send::{
    Link, Report, Sent, announce, announce_in_netns, in_netns, send_once, send_once_in_netns,
};

/// Longest Linux interface name (`IFNAMSIZ` - 1).
pub const MAX_INTERFACE_NAME: usize = 15;

/// What to announce, and from where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Announcement {
    /// The container's interface, in the namespace the announcement runs in (`eth0`).
    pub interface: String,
    /// The container's MAC: Ethernet source, ARP sender hardware address, NA target
    /// link-layer address. Must be unicast and not all zero.
    pub mac: [u8; 6],
    /// IPv4 addresses to announce (unicast, not loopback, not 0.0.0.0 or 255.255.255.255).
    pub ipv4: Vec<Ipv4Addr>,
    /// IPv6 addresses to announce (unicast, not `::` or `::1`).
    pub ipv6: Vec<Ipv6Addr>,
}

impl Announcement {
    /// Checks the interface name, the MAC and every address; at least one address is needed.
    pub fn validate(&self) -> Result<()> {
        let bad = |reason: String| {
            Err(Error::InvalidAnnouncement {
                interface: self.interface.clone(),
                reason,
            })
        };
        let name = &self.interface;
        if name.is_empty()
            || name.len() > MAX_INTERFACE_NAME
            || name == "."
            || name == ".."
            || name
                .bytes()
                .any(|b| b == b'/' || b == 0 || b.is_ascii_whitespace())
        {
            return bad(format!("{name:?} is not a valid interface name"));
        }
        if self.mac[0] & 1 == 1 {
            return bad(format!(
                "MAC {} is a multicast address",
                frames::mac_to_string(self.mac)
            ));
        }
        if self.mac == frames::ZERO_MAC {
            return bad("MAC 00:00:00:00:00:00 is not an address".into());
        }
        if self.ipv4.is_empty() && self.ipv6.is_empty() {
            return bad("no address to announce".into());
        }
        for ip in &self.ipv4 {
            if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() || ip.is_loopback() {
                return bad(format!("{ip} is not a unicast address"));
            }
        }
        for ip in &self.ipv6 {
            if ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() {
                return bad(format!("{ip} is not a unicast address"));
            }
        }
        Ok(())
    }

    /// The frames of one round (see [`frames::frames`]).
    pub fn frames(&self) -> Vec<Frame> {
        frames::frames(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> Announcement {
        Announcement {
            interface: "eth0".into(),
            mac: [0x02, 0, 0, 0, 0, 1],
            ipv4: vec![Ipv4Addr::new(10, 244, 1, 10)],
            ipv6: vec!["fd00::5".parse().unwrap()],
        }
    }

    #[test]
    fn validation() {
        good().validate().unwrap();
        let cases: Vec<(Announcement, &str)> = vec![
            (
                Announcement {
                    interface: String::new(),
                    ..good()
                },
                "not a valid interface name",
            ),
            (
                Announcement {
                    interface: "a-very-long-interface".into(),
                    ..good()
                },
                "not a valid interface name",
            ),
            (
                Announcement {
                    interface: "eth/0".into(),
                    ..good()
                },
                "not a valid interface name",
            ),
            (
                Announcement {
                    mac: [0x01, 0, 0x5e, 0, 0, 1],
                    ..good()
                },
                "multicast",
            ),
            (
                Announcement {
                    mac: [0; 6],
                    ..good()
                },
                "not an address",
            ),
            (
                Announcement {
                    ipv4: vec![],
                    ipv6: vec![],
                    ..good()
                },
                "no address",
            ),
            (
                Announcement {
                    ipv4: vec![Ipv4Addr::BROADCAST],
                    ..good()
                },
                "255.255.255.255 is not a unicast",
            ),
            (
                Announcement {
                    ipv4: vec![Ipv4Addr::new(224, 0, 0, 1)],
                    ..good()
                },
                "not a unicast",
            ),
            (
                Announcement {
                    ipv6: vec!["ff02::1".parse().unwrap()],
                    ..good()
                },
                "not a unicast",
            ),
            (
                Announcement {
                    ipv6: vec![Ipv6Addr::UNSPECIFIED],
                    ..good()
                },
                "not a unicast",
            ),
        ];
        for (ann, want) in cases {
            let err = ann.validate().unwrap_err();
            assert!(matches!(err, Error::InvalidAnnouncement { .. }), "{err:?}");
            assert!(err.to_string().contains(want), "{err} should say {want:?}");
        }
    }

    #[test]
    fn invalid_announcement_fails_before_any_socket() {
        let ann = Announcement {
            ipv4: vec![],
            ipv6: vec![],
            ..good()
        };
        assert!(matches!(
            send_once(&ann),
            Err(Error::InvalidAnnouncement { .. })
        ));
        assert!(matches!(
            announce(&ann, &Schedule::default(), None),
            Err(Error::InvalidAnnouncement { .. })
        ));
        let bad_schedule = Schedule {
            count: 0,
            ..Schedule::default()
        };
        assert!(matches!(
            announce(&good(), &bad_schedule, None),
            Err(Error::InvalidSchedule(_))
        ));
    }
}
