//! A recording fake of every seam of [`Node::apply`](super::Node::apply): one [`Fake`] plays
//! the datapath, the hold device, the container network and the announcer. It logs each call
//! that succeeded, in order, fails the calls it is told to, and models what the order
//! matters for: the endpoint map, the hold queues, and where from-hold sends a frame written
//! back (by the entry as it stands at that moment, as the eBPF program does).

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    net::Ipv4Addr,
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard},
};

use ferry_common::{Config, Endpoint, NatKey, NatValue, Vtep, flags, kind};

use super::{
    pace::{PaceReport, RcvBuf, UdpBuffers, charge, udp_dst_port},
    seams::{Announcer, ContainerNet, Datapath, HoldDevice, Installed},
};
use crate::{
    containers::Built,
    hold::{HoldCounters, HoldLimits, HoldQueues, frame_dst},
    plan::{LocalContainer, container_host_if},
};

/// Where from-hold sent a frame written back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// To the container behind this host-side veth.
    Container(u32),
    /// Encapsulated to this VTEP (network order).
    Vtep(u32),
    Host,
    Dropped,
    /// Back into the hold device: the entry is `LOCAL` with `HOLD_SYN` (every fake frame
    /// counts as a SYN here), so writing it back would only queue it again.
    Diverted,
}

/// A call that reached the fake kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    AllowVtep(Ipv4Addr),
    DisallowVtep(Ipv4Addr),
    SetEndpoint {
        ip: Ipv4Addr,
        kind: u32,
        flags: u32,
        vtep_be: u32,
    },
    RemoveEndpoint(Ipv4Addr),
    SetPublic(NatKey),
    RemovePublic(NatKey),
    SetSnat(NatKey),
    RemoveSnat(NatKey),
    SetConfig {
        egress_vtep_be: u32,
    },
    Attach(String),
    Detach(String),
    CreateNet(Ipv4Addr),
    /// An earlier agent's namespace and veth taken over as they are.
    AdoptNet(Ipv4Addr),
    DeleteNet(Ipv4Addr),
    Hold(Ipv4Addr),
    Release(Ipv4Addr),
    /// A frame written back through the hold device (`tag`: its last byte).
    Write {
        dst: Ipv4Addr,
        tag: u8,
        to: Delivery,
    },
    /// A frame that arrived from the overlay and was delivered at once (not held).
    Arrived {
        dst: Ipv4Addr,
        tag: u8,
        to: Delivery,
    },
    Announce(Ipv4Addr),
    AnnouncePublic(Vec<Ipv4Addr>),
    /// The public IPv6 prefix's next hop held (true) or given up.
    HoldPublic6(std::net::Ipv6Addr, bool),
}

/// The error of a call the fake was told to fail.
#[derive(Debug, thiserror::Error)]
#[error("injected failure of {0:?}")]
pub struct Injected(pub Call);

type Matcher = Box<dyn Fn(&Call) -> bool + Send>;

#[derive(Default)]
struct World {
    log: Vec<Call>,
    failures: Vec<Call>,
    /// Each fails the first call it matches, then is gone.
    fail_once: Vec<Matcher>,
    endpoints: BTreeMap<Ipv4Addr, Endpoint>,
    attached: BTreeSet<String>,
    vteps: BTreeSet<Ipv4Addr>,
    /// Containers' network sides: ifindex and MAC.
    nets: BTreeMap<Ipv4Addr, (u32, String)>,
    next_ifindex: u32,
    queues: HoldQueues,
    /// Frames that reach the hold device while a held endpoint's entry is being switched
    /// away from HOLD (in flight when the switch happens).
    in_flight_at_switch: BTreeMap<Ipv4Addr, Vec<Vec<u8>>>,
    /// Frames in the hold device that the agent's reader has not read yet (it lags).
    unread: VecDeque<Vec<u8>>,
    /// Frames that arrive for an endpoint while the agent writes one back, routed by the entry
    /// at that moment (HOLD: queued behind).
    arriving: BTreeMap<Ipv4Addr, VecDeque<Vec<u8>>>,
    /// UDP sockets of the containers, by port: what a datagram delivered to a container meets.
    udp: BTreeMap<u16, UdpSocket>,
    /// Looks at the UDP buffers fail.
    udp_fail: bool,
    /// The announcer's `public6_next_hop`.
    public6_next_hop: Option<std::net::Ipv6Addr>,
}

/// A UDP socket and its reader: `per_ms` bytes read a millisecond from `starts` on (the
/// reader may still be stopped before).
#[derive(Debug, Clone)]
pub struct UdpSocket {
    pub size: u32,
    pub used: u32,
    pub per_ms: u32,
    pub starts: tokio::time::Instant,
    pub last: tokio::time::Instant,
    /// Datagrams dropped because the buffer was full.
    pub drops: u64,
    /// Tags of the datagrams queued, in order.
    pub got: Vec<u8>,
}

impl UdpSocket {
    /// The reader's progress until now.
    fn advance(&mut self) {
        let now = tokio::time::Instant::now();
        let from = self.last.max(self.starts);
        if now > from {
            let read = u128::from(self.per_ms) * (now - from).as_micros() / 1000;
            self.used = self
                .used
                .saturating_sub(u32::try_from(read).unwrap_or(u32::MAX));
        }
        self.last = now.max(self.last);
    }
}

impl World {
    /// Logs `call` unless a failure was injected for it.
    fn call(&mut self, call: Call) -> Result<(), Injected> {
        if let Some(i) = self.fail_once.iter().position(|m| m(&call)) {
            drop(self.fail_once.remove(i));
            self.failures.push(call.clone());
            return Err(Injected(call));
        }
        self.log.push(call);
        Ok(())
    }

    /// What from-hold does with a frame for `dst` (see `try_from_hold`).
    fn route(&self, dst: Ipv4Addr) -> Delivery {
        match self.endpoints.get(&dst) {
            Some(e) if e.kind == kind::HOLD && e.vtep_be != 0 => Delivery::Vtep(e.vtep_be),
            Some(e) if e.kind == kind::LOCAL && e.flags & flags::HOLD_SYN != 0 => {
                Delivery::Diverted
            }
            Some(e) if e.kind == kind::LOCAL || e.kind == kind::HOLD => {
                Delivery::Container(e.ifindex)
            }
            Some(e) if e.kind == kind::REMOTE || e.kind == kind::FORWARD => {
                Delivery::Vtep(e.vtep_be)
            }
            Some(e) if e.kind == kind::HOST => Delivery::Host,
            _ => Delivery::Dropped,
        }
    }
}

/// Every seam at once; clones share one world.
#[derive(Clone)]
pub struct Fake(Arc<Mutex<World>>);

impl Default for Fake {
    fn default() -> Self {
        Self(Arc::new(Mutex::new(World {
            queues: HoldQueues::new(HoldLimits::default()),
            next_ifindex: 100,
            ..World::default()
        })))
    }
}

impl Fake {
    fn world(&self) -> MutexGuard<'_, World> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The announcer is configured with a moving public IPv6 next hop.
    pub fn set_public6_next_hop(&self, addr: std::net::Ipv6Addr) {
        self.world().public6_next_hop = Some(addr);
    }

    /// The calls that succeeded, in order.
    pub fn log(&self) -> Vec<Call> {
        self.world().log.clone()
    }

    /// The calls that failed (as told), in order.
    pub fn failures(&self) -> Vec<Call> {
        self.world().failures.clone()
    }

    pub fn clear_log(&self) {
        self.world().log.clear();
    }

    /// Fails the next call that `m` matches (once).
    pub fn fail_once(&self, m: impl Fn(&Call) -> bool + Send + 'static) {
        self.world().fail_once.push(Box::new(m));
    }

    pub fn endpoint(&self, ip: Ipv4Addr) -> Option<Endpoint> {
        self.world().endpoints.get(&ip).copied()
    }

    pub fn is_attached(&self, host_if: &str) -> bool {
        self.world().attached.contains(host_if)
    }

    /// What an earlier agent left on the host: container `c`'s namespace and veth (ifindex),
    /// from-container attached to it, and the entries it wrote.
    pub fn left_by_earlier_agent(
        &self,
        c: &LocalContainer,
        ifindex: u32,
        entries: &[(Ipv4Addr, Endpoint)],
    ) {
        let mut w = self.world();
        w.nets.insert(c.ip, (ifindex, c.mac.to_string()));
        w.next_ifindex = w.next_ifindex.max(ifindex);
        w.attached.insert(container_host_if(c.ip));
        for (ip, e) in entries {
            w.endpoints.insert(*ip, *e);
        }
    }

    /// Whether container `ip`'s network side exists.
    pub fn has_net(&self, ip: Ipv4Addr) -> bool {
        self.world().nets.contains_key(&ip)
    }

    /// Frames that reached the hold device for a held endpoint.
    pub fn held_frames(&self, ip: Ipv4Addr, tags: impl IntoIterator<Item = u8>) {
        let mut w = self.world();
        for t in tags {
            w.queues.push(frame(ip, t));
        }
    }

    /// Whole frames that reached the hold device (for held endpoints).
    pub fn held_raw(&self, frames: impl IntoIterator<Item = Vec<u8>>) {
        let mut w = self.world();
        for f in frames {
            w.queues.push(f);
        }
    }

    /// Frames for `ip` that reached the hold device but that its reader has not read yet.
    pub fn unread_in_device(&self, ip: Ipv4Addr, tags: impl IntoIterator<Item = u8>) {
        let mut w = self.world();
        for t in tags {
            w.unread.push_back(frame(ip, t));
        }
    }

    /// A frame that arrives for `ip` while the agent writes the next frame back.
    pub fn arrives_while_writing(&self, ip: Ipv4Addr, tag: u8) {
        self.world()
            .arriving
            .entry(ip)
            .or_default()
            .push_back(frame(ip, tag));
    }

    /// A UDP socket on `port` in the containers, of `size` bytes, whose reader takes
    /// `per_ms` bytes a millisecond once `stopped_for` has passed.
    pub fn udp_socket(&self, port: u16, size: u32, per_ms: u32, stopped_for: std::time::Duration) {
        let now = tokio::time::Instant::now();
        self.world().udp.insert(
            port,
            UdpSocket {
                size,
                used: 0,
                per_ms,
                starts: now + stopped_for,
                last: now,
                drops: 0,
                got: Vec::new(),
            },
        );
    }

    pub fn udp_socket_state(&self, port: u16) -> UdpSocket {
        self.world().udp[&port].clone()
    }

    /// Every later look at the UDP buffers fails.
    pub fn udp_buffers_fail(&self) {
        self.world().udp_fail = true;
    }

    pub fn hold_counters(&self) -> HoldCounters {
        self.world().queues.counters
    }

    /// A frame in flight to the hold device when `ip`'s entry stops saying HOLD.
    pub fn in_flight_at_switch(&self, ip: Ipv4Addr, tag: u8) {
        self.world()
            .in_flight_at_switch
            .entry(ip)
            .or_default()
            .push(frame(ip, tag));
    }
}

/// Whether an entry sends (the fake's) frames to the hold device: `HOLD`, or `LOCAL` with
/// `HOLD_SYN` (every fake frame counts as a new connection's SYN).
fn holds(e: &Endpoint) -> bool {
    e.kind == kind::HOLD || (e.kind == kind::LOCAL && e.flags & flags::HOLD_SYN != 0)
}

/// A TCP segment for `dst` whose last byte is `tag`.
pub fn tcp_frame(dst: Ipv4Addr, tag: u8) -> Vec<u8> {
    let mut f = frame(dst, tag);
    f[23] = 6;
    f
}

/// A full-sized UDP datagram (1,400 bytes of payload) for `dst:port` whose last byte is `tag`.
pub fn udp_frame(dst: Ipv4Addr, port: u16, tag: u8) -> Vec<u8> {
    let mut f = vec![0u8; 14 + 20 + 8 + 1400];
    f[12] = 0x08;
    f[14] = 0x45;
    f[23] = 17;
    f[30..34].copy_from_slice(&dst.octets());
    f[36..38].copy_from_slice(&port.to_be_bytes());
    let n = f.len();
    f[n - 1] = tag;
    f
}

/// An IPv4 frame for `dst` whose last byte is `tag`.
pub fn frame(dst: Ipv4Addr, tag: u8) -> Vec<u8> {
    let mut f = vec![0u8; 60];
    f[12] = 0x08;
    f[14] = 0x45;
    f[30..34].copy_from_slice(&dst.octets());
    f[59] = tag;
    f
}

impl Datapath for Fake {
    type Error = Injected;
    fn set_endpoint(&self, ip: Ipv4Addr, ep: Endpoint) -> Result<(), Injected> {
        let mut w = self.world();
        w.call(Call::SetEndpoint {
            ip,
            kind: ep.kind,
            flags: ep.flags,
            vtep_be: ep.vtep_be,
        })?;
        let was_holding = w.endpoints.get(&ip).is_some_and(holds);
        w.endpoints.insert(ip, ep);
        if was_holding && !holds(&ep) {
            for f in w.in_flight_at_switch.remove(&ip).unwrap_or_default() {
                w.queues.push(f);
            }
        }
        Ok(())
    }
    fn remove_endpoint(&self, ip: Ipv4Addr) -> Result<(), Injected> {
        let mut w = self.world();
        w.call(Call::RemoveEndpoint(ip))?;
        w.endpoints.remove(&ip);
        Ok(())
    }
    fn allow_vtep(&self, ip: Ipv4Addr, _: Vtep) -> Result<(), Injected> {
        let mut w = self.world();
        w.call(Call::AllowVtep(ip))?;
        w.vteps.insert(ip);
        Ok(())
    }
    fn disallow_vtep(&self, ip: Ipv4Addr) -> Result<(), Injected> {
        let mut w = self.world();
        w.call(Call::DisallowVtep(ip))?;
        w.vteps.remove(&ip);
        Ok(())
    }
    fn set_public(&self, key: NatKey, _: NatValue) -> Result<(), Injected> {
        self.world().call(Call::SetPublic(key))
    }
    fn remove_public(&self, key: &NatKey) -> Result<(), Injected> {
        self.world().call(Call::RemovePublic(*key))
    }
    fn set_snat(&self, key: NatKey, _: NatValue) -> Result<(), Injected> {
        self.world().call(Call::SetSnat(key))
    }
    fn remove_snat(&self, key: &NatKey) -> Result<(), Injected> {
        self.world().call(Call::RemoveSnat(*key))
    }
    fn set_config(&self, config: Config) -> Result<(), Injected> {
        self.world().call(Call::SetConfig {
            egress_vtep_be: config.egress_vtep_be,
        })
    }
    fn attach_container(&self, host_if: &str) -> Result<(), Injected> {
        let mut w = self.world();
        w.call(Call::Attach(host_if.to_owned()))?;
        w.attached.insert(host_if.to_owned());
        Ok(())
    }
    fn detach_container(&self, host_if: &str) -> Result<(), Injected> {
        let mut w = self.world();
        // As the real one: detaching what is not attached is an error.
        if !w.attached.contains(host_if) {
            return Err(Injected(Call::Detach(host_if.to_owned())));
        }
        w.call(Call::Detach(host_if.to_owned()))?;
        w.attached.remove(host_if);
        Ok(())
    }
    fn container_attached(&self, host_if: &str) -> bool {
        self.is_attached(host_if)
    }
    fn installed(&self) -> Installed {
        let w = self.world();
        Installed {
            endpoints: w.endpoints.keys().copied().collect(),
            vteps: w.vteps.iter().copied().collect(),
            public: Vec::new(),
            snat: Vec::new(),
        }
    }
}

impl HoldDevice for Fake {
    fn hold(&self, ip: Ipv4Addr) {
        let mut w = self.world();
        if !w.queues.is_held(ip) {
            w.log.push(Call::Hold(ip));
        }
        w.queues.hold(ip);
    }
    fn held(&self) -> Vec<Ipv4Addr> {
        self.world().queues.held()
    }
    fn pull(&self) {
        let unread = std::mem::take(&mut self.world().unread);
        for f in unread {
            let back = self.world().queues.push(f).1;
            if let Some(f) = back {
                // A straggler: written back at once, as the real reader does.
                let _ = self.write_frame(&f);
            }
        }
    }
    fn drain(&self, ip: Ipv4Addr) -> VecDeque<Vec<u8>> {
        self.world().queues.drain(ip)
    }
    fn release(&self, ip: Ipv4Addr) -> VecDeque<Vec<u8>> {
        let mut w = self.world();
        w.log.push(Call::Release(ip));
        w.queues.release(ip)
    }
    fn write_frame(&self, f: &[u8]) -> std::io::Result<()> {
        let mut w = self.world();
        let dst = frame_dst(f).ok_or_else(|| std::io::Error::other("not IPv4"))?;
        let to = w.route(dst);
        w.call(Call::Write {
            dst,
            tag: f[f.len() - 1],
            to,
        })
        .map_err(std::io::Error::other)?;
        if matches!(to, Delivery::Container(_))
            && let Some(port) = udp_dst_port(f)
            && let Some(s) = w.udp.get_mut(&port)
        {
            s.advance();
            let c = charge(f.len());
            if s.used + c > s.size {
                s.drops += 1;
            } else {
                s.used += c;
                s.got.push(f[f.len() - 1]);
            }
        }
        let next = w.arriving.get_mut(&dst).and_then(VecDeque::pop_front);
        if let Some(next) = next {
            // By the entry as it stands: queued behind while it holds, else delivered.
            let holding = w.endpoints.get(&dst).is_some_and(holds) && w.queues.is_held(dst);
            if holding {
                w.queues.push(next);
            } else {
                let to = w.route(dst);
                w.log.push(Call::Arrived {
                    dst,
                    tag: next[next.len() - 1],
                    to,
                });
            }
        }
        Ok(())
    }
    fn count_paced(&self, r: &PaceReport) {
        let c = &mut self.world().queues.counters;
        c.paced += r.paced;
        c.pace_late += r.late;
        c.pace_unbound += r.unbound;
        c.pace_socket_drops += r.socket_drops;
    }
}

impl UdpBuffers for Fake {
    async fn look(
        &mut self,
        _ip: Ipv4Addr,
        ports: &[u16],
    ) -> std::io::Result<BTreeMap<u16, RcvBuf>> {
        let mut w = self.world();
        if w.udp_fail {
            return Err(std::io::Error::other("injected: sock_diag"));
        }
        let mut out = BTreeMap::new();
        for p in ports {
            if let Some(s) = w.udp.get_mut(p) {
                s.advance();
                out.insert(
                    *p,
                    RcvBuf {
                        used: s.used,
                        size: s.size,
                        drops: u32::try_from(s.drops).unwrap_or(u32::MAX),
                    },
                );
            }
        }
        Ok(out)
    }
}

impl ContainerNet for Fake {
    type Error = Injected;
    type Buffers = Fake;
    fn udp_buffers(&self, _: &Built) -> Fake {
        self.clone()
    }
    async fn create(&self, c: &LocalContainer) -> Result<Built, Injected> {
        let mut w = self.world();
        w.call(Call::CreateNet(c.ip))?;
        w.next_ifindex += 1;
        let ifindex = w.next_ifindex;
        w.nets.insert(c.ip, (ifindex, c.mac.to_string()));
        Ok(Built {
            ip: c.ip,
            mac: c.mac.to_string(),
            netns: PathBuf::from(format!("/run/netns/fake-{}", c.ip)),
            host_if: container_host_if(c.ip),
            ifindex,
            ifname: ferry_overlay::netlink::CONTAINER_IF.into(),
        })
    }
    async fn adopt(&self, c: &LocalContainer) -> Result<Option<Built>, Injected> {
        let mut w = self.world();
        let Some((ifindex, mac)) = w.nets.get(&c.ip).cloned() else {
            return Ok(None);
        };
        if mac != c.mac.to_string() {
            return Ok(None);
        }
        w.call(Call::AdoptNet(c.ip))?;
        Ok(Some(Built {
            ip: c.ip,
            mac,
            netns: PathBuf::from(format!("/run/netns/fake-{}", c.ip)),
            host_if: container_host_if(c.ip),
            ifindex,
            ifname: ferry_overlay::netlink::CONTAINER_IF.into(),
        }))
    }
    async fn existing(&self) -> Vec<Ipv4Addr> {
        self.world().nets.keys().copied().collect()
    }
    async fn delete(&self, ip: Ipv4Addr) -> Result<(), Injected> {
        let mut w = self.world();
        w.call(Call::DeleteNet(ip))?;
        w.nets.remove(&ip);
        Ok(())
    }
}

impl Announcer for Fake {
    fn announce(&self, c: &LocalContainer, _: &Built) {
        self.world().log.push(Call::Announce(c.ip));
    }
    fn announce_public(&self, _: [u8; 6], ips: Vec<Ipv4Addr>) {
        self.world().log.push(Call::AnnouncePublic(ips));
    }
    fn public6_next_hop(&self) -> Option<std::net::Ipv6Addr> {
        self.world().public6_next_hop
    }
    fn hold_public6(&self, _: [u8; 6], addr: std::net::Ipv6Addr, hold: bool) {
        self.world().log.push(Call::HoldPublic6(addr, hold));
    }
}
