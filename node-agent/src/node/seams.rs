//! The kernel-facing pieces [`Node::apply`](super::Node::apply) drives, each behind a trait:
//! [`Datapath`] (the eBPF maps and the from-container attachments), [`HoldDevice`] (the hold
//! TAP and its queues), [`ContainerNet`] (a container's namespace and veth, over netlink) and
//! [`Announcer`] ("I am here now" frames). The real implementations delegate to
//! `ferry-overlay` and `ferry-announce` (`ContainerNet`'s is
//! [`HostNetwork`](crate::containers::HostNetwork)); the unit tests drive `apply` through
//! recording fakes (`node/fake.rs`) to pin the order of the calls.
//!
//! The traits live here, with their one consumer, rather than in `ferry-overlay`: they are
//! shaped by what the apply needs (a container's network side is netns + netlink + sysctls as
//! one operation, the hold device is the TAP plus the agent's queues), and `ferry-overlay`
//! stays a plain library of kernel calls.

use std::{
    collections::VecDeque,
    future::Future,
    net::Ipv4Addr,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
};

use ferry_common::{Config, Endpoint, NatKey, NatValue, Vtep};
use ferry_overlay::{datapath::DatapathError, tap::Tap};
use tracing::{info, warn};

use super::pace::{PaceReport, UdpBuffers};
use crate::{containers::Built, hold::HoldQueues, plan::LocalContainer};

/// The eBPF datapath as the apply changes it: map entries, the configuration, and
/// from-container on the host ends of container veths.
pub trait Datapath {
    type Error: std::error::Error + Send + Sync + 'static;
    fn set_endpoint(&self, ip: Ipv4Addr, ep: Endpoint) -> Result<(), Self::Error>;
    fn remove_endpoint(&self, ip: Ipv4Addr) -> Result<(), Self::Error>;
    /// Lets from-overlay accept packets from `ip`.
    fn allow_vtep(&self, ip: Ipv4Addr, vtep: Vtep) -> Result<(), Self::Error>;
    fn disallow_vtep(&self, ip: Ipv4Addr) -> Result<(), Self::Error>;
    fn set_public(&self, key: NatKey, value: NatValue) -> Result<(), Self::Error>;
    fn remove_public(&self, key: &NatKey) -> Result<(), Self::Error>;
    fn set_snat(&self, key: NatKey, value: NatValue) -> Result<(), Self::Error>;
    fn remove_snat(&self, key: &NatKey) -> Result<(), Self::Error>;
    fn set_config(&self, config: Config) -> Result<(), Self::Error>;
    /// Attaches from-container to the ingress of a container's host-side veth.
    fn attach_container(&self, host_if: &str) -> Result<(), Self::Error>;
    fn detach_container(&self, host_if: &str) -> Result<(), Self::Error>;
    /// Whether from-container is attached to `host_if`.
    fn container_attached(&self, host_if: &str) -> bool;
    /// What the maps hold now (an adopted datapath: also what an earlier agent wrote).
    fn installed(&self) -> Installed;
}

/// The keys of every map the apply writes, as the kernel holds them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Installed {
    pub endpoints: Vec<Ipv4Addr>,
    pub vteps: Vec<Ipv4Addr>,
    pub public: Vec<NatKey>,
    pub snat: Vec<NatKey>,
}

/// The hold device: the datapath redirects packets for `HOLD` endpoints to it, the agent
/// queues them (per endpoint, in arrival order) and writes them back at release. Shared with
/// the paced release's task (`pace::release_udp`), hence `Send + Sync + 'static`.
pub trait HoldDevice: Send + Sync + 'static {
    /// Starts queueing packets for `ip` (idempotent).
    fn hold(&self, ip: Ipv4Addr);
    /// The endpoints being held.
    fn held(&self) -> Vec<Ipv4Addr>;
    /// Reads every frame waiting in the device into the queues (stragglers for endpoints no
    /// longer held are written back). The device's reader task lags when the agent is busy:
    /// a release that only looked at the queues would switch the entry with frames still
    /// unread in the device, and the flow's next packets would overtake them.
    fn pull(&self);
    /// Takes the frames queued so far for `ip`, in order, and keeps holding it.
    fn drain(&self, ip: Ipv4Addr) -> VecDeque<Vec<u8>>;
    /// Stops holding `ip` and takes what is still queued, in order (later arrivals are
    /// passed on as they are read).
    fn release(&self, ip: Ipv4Addr) -> VecDeque<Vec<u8>>;
    /// Writes one frame back into the kernel: from-hold delivers it by its endpoint's entry
    /// as it stands at that moment.
    fn write_frame(&self, frame: &[u8]) -> std::io::Result<()>;
    /// Counts a paced release's outcome in the hold counters.
    fn count_paced(&self, report: &PaceReport);
}

/// The network side of local containers: a network namespace and a veth pair, one end in it.
pub trait ContainerNet {
    type Error: std::error::Error + Send + Sync + 'static;
    /// Builds container `c`'s namespace and veth, both ends operationally up. On failure,
    /// whatever was made is removed again. (from-container is the datapath's part.)
    fn create(&self, c: &LocalContainer)
    -> impl Future<Output = Result<Built, Self::Error>> + Send;
    /// Adopts container `c`'s namespace and veth as an earlier agent left them, if they are
    /// there and match `c` (`None`: build afresh). Changes nothing that carries traffic.
    fn adopt(
        &self,
        c: &LocalContainer,
    ) -> impl Future<Output = Result<Option<Built>, Self::Error>> + Send;
    /// The containers whose namespace exists on the host (this agent's naming).
    fn existing(&self) -> impl Future<Output = Vec<Ipv4Addr>> + Send;
    /// Kills every process inside container `ip`'s namespace, then deletes the veth (both
    /// ends) and the namespace's name; keeps going past errors and returns the first.
    fn delete(&self, ip: Ipv4Addr) -> impl Future<Output = Result<(), Self::Error>> + Send;
    /// Whether a built container's namespace is gone from under it (a runtime deleted the
    /// namespace it attached through CNI, e.g. Podman after a checkpoint): the apply then
    /// builds the container again if it is still wanted here.
    fn vanished(&self, _built: &Built) -> bool {
        false
    }
    /// The receive buffers of the UDP sockets in built container's namespace.
    type Buffers: UdpBuffers;
    /// For the paced release; no I/O until the first look.
    fn udp_buffers(&self, built: &Built) -> Self::Buffers;
}

/// Announcements of a container that has just arrived on this host.
pub trait Announcer {
    /// Announces, from the container's own interface and in the background, that `c` is
    /// reachable here now.
    fn announce(&self, c: &LocalContainer, built: &Built);
    /// Gateway role: announces, from the public interface and in the background, that the
    /// public addresses `ips` answer at `mac` (this host's public interface) now.
    fn announce_public(&self, mac: [u8; 6], ips: Vec<Ipv4Addr>);
    /// Gateway role: the address the internet routes the overlay's public IPv6 prefix to,
    /// when it moves between gateway-role hosts (`public6_next_hop`).
    fn public6_next_hop(&self) -> Option<std::net::Ipv6Addr> {
        None
    }
    /// Gateway role: holds the IPv6 next hop `addr` on the public interface and announces it
    /// at `mac` (unsolicited neighbour advertisements, on the announce schedule), or gives it
    /// up (`hold` false: a standby). In the background.
    fn hold_public6(&self, _mac: [u8; 6], _addr: std::net::Ipv6Addr, _hold: bool) {}
}

/// The loaded datapath, shared with the metrics handler (which reads its counters).
pub type SharedDatapath = Arc<Mutex<ferry_overlay::datapath::Datapath>>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Datapath for SharedDatapath {
    type Error = DatapathError;
    fn set_endpoint(&self, ip: Ipv4Addr, ep: Endpoint) -> Result<(), DatapathError> {
        lock(self).set_endpoint(ip, ep)
    }
    fn remove_endpoint(&self, ip: Ipv4Addr) -> Result<(), DatapathError> {
        lock(self).remove_endpoint(ip)
    }
    fn allow_vtep(&self, ip: Ipv4Addr, vtep: Vtep) -> Result<(), DatapathError> {
        lock(self).allow_vtep(ip, vtep)
    }
    fn disallow_vtep(&self, ip: Ipv4Addr) -> Result<(), DatapathError> {
        lock(self).disallow_vtep(ip)
    }
    fn set_public(&self, key: NatKey, value: NatValue) -> Result<(), DatapathError> {
        lock(self).set_public(key, value)
    }
    fn remove_public(&self, key: &NatKey) -> Result<(), DatapathError> {
        lock(self).remove_public(key)
    }
    fn set_snat(&self, key: NatKey, value: NatValue) -> Result<(), DatapathError> {
        lock(self).set_snat(key, value)
    }
    fn remove_snat(&self, key: &NatKey) -> Result<(), DatapathError> {
        lock(self).remove_snat(key)
    }
    fn set_config(&self, config: Config) -> Result<(), DatapathError> {
        lock(self).set_config(config)
    }
    fn attach_container(&self, host_if: &str) -> Result<(), DatapathError> {
        lock(self).attach_container(host_if)
    }
    fn detach_container(&self, host_if: &str) -> Result<(), DatapathError> {
        lock(self).detach_container(host_if)
    }
    fn container_attached(&self, host_if: &str) -> bool {
        lock(self)
            .container_interfaces()
            .iter()
            .any(|i| i == host_if)
    }
    fn installed(&self) -> Installed {
        let dp = lock(self);
        Installed {
            endpoints: dp.endpoints().into_iter().map(|(ip, _)| ip).collect(),
            vteps: dp.vtep_ips(),
            public: dp.public_keys(),
            snat: dp.snat_keys(),
        }
    }
}

/// The hold device and the queues behind it, shared with the task that reads the device.
pub struct Hold {
    pub tap: Tap,
    pub queues: Mutex<HoldQueues>,
}

impl Hold {
    /// Reads every frame waiting in the device and queues it (a straggler is written back),
    /// until none waits. The queues' lock is held from each read to its push, so frames read
    /// by the reader task and by a release ([`HoldDevice::pull`]) are queued in the device's
    /// order. An error other than `WouldBlock` ends the reads and is returned.
    pub fn read_waiting(&self, buf: &mut [u8]) -> std::io::Result<()> {
        loop {
            let mut queues = lock(&self.queues);
            let n = match self.tap.read_frame(buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            };
            let (verdict, back) = queues.push(buf[..n].to_vec());
            if let Some(frame) = back
                && let Err(e) = self.tap.write_frame(&frame)
            {
                warn!(error = %e, ?verdict, "passing a straggler on");
            }
        }
    }
}

impl HoldDevice for Hold {
    fn hold(&self, ip: Ipv4Addr) {
        lock(&self.queues).hold(ip);
    }
    fn held(&self) -> Vec<Ipv4Addr> {
        lock(&self.queues).held()
    }
    fn pull(&self) {
        if let Err(e) = self.read_waiting(&mut vec![0u8; 65_536]) {
            warn!(error = %e, "reading the hold device");
        }
    }
    fn drain(&self, ip: Ipv4Addr) -> VecDeque<Vec<u8>> {
        lock(&self.queues).drain(ip)
    }
    fn release(&self, ip: Ipv4Addr) -> VecDeque<Vec<u8>> {
        lock(&self.queues).release(ip)
    }
    fn write_frame(&self, frame: &[u8]) -> std::io::Result<()> {
        self.tap.write_frame(frame)
    }
    fn count_paced(&self, r: &PaceReport) {
        let c = &mut lock(&self.queues).counters;
        c.paced = c.paced.saturating_add(r.paced);
        c.pace_late = c.pace_late.saturating_add(r.late);
        c.pace_unbound = c.pace_unbound.saturating_add(r.unbound);
        c.pace_socket_drops = c.pace_socket_drops.saturating_add(r.socket_drops);
    }
}

/// Announcements sent with `ferry-announce` on the configured schedule (first round at once).
pub struct Announcements {
    pub schedule: ferry_announce::Schedule,
    /// Dual-stack overlay: the IPv6 prefix (the container's IPv6 address is announced with an
    /// unsolicited neighbour advertisement on the same schedule as the gratuitous ARP).
    pub overlay6: Option<ipnet::Ipv6Net>,
    /// Gateway role: the interface facing the internet.
    pub public_interface: Option<String>,
    /// Gateway role: the moving IPv6 next hop of the public prefix (`public6_next_hop`).
    pub public6_next_hop: Option<std::net::Ipv6Addr>,
}

impl Announcements {
    fn tally(ip: &dyn std::fmt::Display, r: ferry_announce::Result<ferry_announce::Report>) {
        match r {
            Ok(r) => {
                info!(address = %ip, sent = ?r.sent, rounds = r.rounds_ok, "announced");
                ANNOUNCED[0].fetch_add(u64::from(r.sent.arp_requests), Ordering::Relaxed);
                ANNOUNCED[1].fetch_add(u64::from(r.sent.arp_replies), Ordering::Relaxed);
                ANNOUNCED[2].fetch_add(u64::from(r.sent.neighbour_adverts), Ordering::Relaxed);
                let failed = r.rounds_planned.saturating_sub(r.rounds_ok);
                ANNOUNCED[3].fetch_add(u64::from(failed), Ordering::Relaxed);
            }
            Err(e) => {
                warn!(address = %ip, error = %e, "announcing");
                ANNOUNCED[3].fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl Announcer for Announcements {
    fn announce(&self, c: &LocalContainer, built: &Built) {
        let ann = ferry_announce::Announcement {
            interface: built.ifname.clone(),
            mac: c.mac.0,
            ipv4: vec![c.ip],
            ipv6: self
                .overlay6
                .map(|p| ferry_config::overlay_ipv6(p, c.ip))
                .into_iter()
                .collect(),
        };
        let (netns, schedule, ip) = (built.netns.clone(), self.schedule.clone(), c.ip);
        tokio::task::spawn_blocking(move || {
            Self::tally(
                &ip,
                ferry_announce::announce_in_netns(&netns, &ann, &schedule, None),
            );
        });
    }

    fn announce_public(&self, mac: [u8; 6], ips: Vec<Ipv4Addr>) {
        let Some(interface) = self.public_interface.clone() else {
            return;
        };
        if ips.is_empty() {
            return;
        }
        let what = format!("{} public address(es) on {interface}", ips.len());
        let ann = ferry_announce::Announcement {
            interface,
            mac,
            ipv4: ips,
            ipv6: Vec::new(),
        };
        let schedule = self.schedule.clone();
        // The agent's own namespace: the host's.
        tokio::task::spawn_blocking(move || {
            Self::tally(&what, ferry_announce::announce(&ann, &schedule, None));
        });
    }

    fn public6_next_hop(&self) -> Option<std::net::Ipv6Addr> {
        self.public6_next_hop
    }

    fn hold_public6(&self, mac: [u8; 6], addr: std::net::Ipv6Addr, hold: bool) {
        let Some(interface) = self.public_interface.clone() else {
            return;
        };
        let schedule = self.schedule.clone();
        tokio::spawn(async move {
            let held = async {
                let nl = ferry_overlay::netlink::Netlink::open()?;
                let index = nl.link_index(&interface).await?.ok_or_else(|| {
                    ferry_overlay::netlink::NetlinkError::NoSuchLink(interface.clone())
                })?;
                nl.hold_address6(index, &interface, addr, hold).await
            }
            .await;
            match held {
                Ok(changed) => info!(
                    address = %addr, interface, hold, changed,
                    "the public IPv6 prefix's next hop"
                ),
                Err(e) => {
                    warn!(address = %addr, interface, hold, error = %e, "holding the public IPv6 prefix's next hop");
                    ANNOUNCED[3].fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
            if !hold {
                return;
            }
            // The internet side's router still points at the host this one takes over from.
            let ann = ferry_announce::Announcement {
                interface: interface.clone(),
                mac,
                ipv4: Vec::new(),
                ipv6: vec![addr],
            };
            let _ = tokio::task::spawn_blocking(move || {
                Self::tally(&addr, ferry_announce::announce(&ann, &schedule, None));
            })
            .await;
        });
    }
}

/// This agent's announcement frames since it started, by kind (a process-wide tally: the
/// announcements run on blocking threads of their own). The last is failed rounds.
static ANNOUNCED: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];

/// `ferry_announce_frames_total` by `kind`.
pub fn announce_counters() -> [(&'static str, u64); 4] {
    let n = |i: usize| ANNOUNCED[i].load(Ordering::Relaxed);
    [
        ("garp_request", n(0)),
        ("garp_reply", n(1)),
        ("neighbour_advert", n(2)),
        ("failed", n(3)),
    ]
}
