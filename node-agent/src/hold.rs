//! Held packets: bounded per-endpoint FIFOs of whole frames, filled from the hold device while
//! an endpoint is `HOLD` and emptied, in order, at release (or towards the source at abort).
//! Pure (no I/O): the agent's hold task feeds it frames and writes back what it returns.
//!
//! Across an agent restart: an agent stopped with SIGTERM saves its queues, their counters
//! included ([`HoldQueues::save`]), and the next agent loads them back before it reads the
//! hold device again ([`HoldQueues::load`]), so they are released in order as if nothing had
//! happened (`event="kept_over_restart"` counts them). Packets that reach the device while no
//! agent runs are dropped by the kernel (the device's `tx_dropped`, exported as
//! `event="device_dropped"`), and an agent killed with SIGKILL loses what it held in memory
//! (unknowable afterwards; its log says that its predecessor did not stop cleanly). Either
//! loss only happens during a migration's freeze, and TCP retransmits it.

use std::{
    collections::{BTreeMap, VecDeque},
    net::Ipv4Addr,
};

use serde::Serialize;

pub use ferry_config::{HoldLimits, HoldMode};

/// What to do with a frame read from the hold device.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Queued for its endpoint.
    Held,
    /// Dropped: the endpoint's queue is full (counted as `overflow`).
    Overflow,
    /// Dropped: drop mode (counted as `dropped`).
    Dropped,
    /// The endpoint is not held (any more): write the frame back at once (a straggler that
    /// was in flight to the device when the endpoint was released).
    PassOn,
    /// Not an IPv4 frame (counted as `malformed`).
    Malformed,
}

/// Counters, exported as `ferry_hold_packets_total{event}`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct HoldCounters {
    pub held: u64,
    pub released: u64,
    pub overflow: u64,
    pub dropped: u64,
    pub stragglers: u64,
    pub malformed: u64,
    pub bytes_held: u64,
    /// Packets saved by a stopping agent and queued again by the next one.
    pub kept_over_restart: u64,
    /// Held UDP datagrams written back by the paced release when their socket had room
    /// (not carried over an agent restart, nor are the next two).
    pub paced: u64,
    /// Held UDP datagrams written back at the paced release's deadline without room in their
    /// socket (it may have dropped them: `UdpRcvbufErrors` in the container's namespace).
    pub pace_late: u64,
    /// Held UDP datagrams for a port no socket of the container is bound to, written back at
    /// once (the container's kernel counts them as `NoPorts`).
    pub pace_unbound: u64,
    /// Datagrams the container's UDP sockets dropped (their `sk_drops`) while a paced release
    /// wrote to them: live ones included, the kernel does not tell them apart.
    pub pace_socket_drops: u64,
}

/// Why saved hold queues could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("saved hold queues: {0}")]
pub struct SavedHoldError(pub &'static str);

/// First bytes of saved hold queues.
const SAVED_MAGIC: &[u8; 8] = b"FERRYHQ1";

#[derive(Debug, Default)]
struct Queue {
    frames: VecDeque<Vec<u8>>,
    bytes: usize,
}

/// The queues of every held endpoint.
#[derive(Debug, Default)]
pub struct HoldQueues {
    limits: HoldLimits,
    queues: BTreeMap<Ipv4Addr, Queue>,
    pub counters: HoldCounters,
}

/// The endpoint an Ethernet frame is for: its IPv4 destination or, for IPv6, the last 32 bits
/// of its destination (the datapath sends the hold device IPv6 only for addresses in the
/// overlay's /96 prefix, which end in the endpoint's IPv4 address). `None`: neither.
pub fn frame_dst(frame: &[u8]) -> Option<Ipv4Addr> {
    match frame.get(12..15)? {
        [0x08, 0x00, v] if v >> 4 == 4 && frame.len() >= 34 => {
            Some(Ipv4Addr::new(frame[30], frame[31], frame[32], frame[33]))
        }
        [0x86, 0xdd, v] if v >> 4 == 6 && frame.len() >= 54 => {
            Some(Ipv4Addr::new(frame[50], frame[51], frame[52], frame[53]))
        }
        _ => None,
    }
}

impl HoldQueues {
    pub fn new(limits: HoldLimits) -> Self {
        Self {
            limits,
            ..Self::default()
        }
    }

    /// Starts holding `ip` (idempotent).
    pub fn hold(&mut self, ip: Ipv4Addr) {
        self.queues.entry(ip).or_default();
    }

    pub fn is_held(&self, ip: Ipv4Addr) -> bool {
        self.queues.contains_key(&ip)
    }

    pub fn held(&self) -> Vec<Ipv4Addr> {
        self.queues.keys().copied().collect()
    }

    /// Packets queued over all endpoints.
    pub fn total_packets(&self) -> usize {
        self.queues.values().map(|q| q.frames.len()).sum()
    }

    /// Packets and bytes queued for `ip`.
    pub fn depth(&self, ip: Ipv4Addr) -> (usize, usize) {
        self.queues
            .get(&ip)
            .map_or((0, 0), |q| (q.frames.len(), q.bytes))
    }

    /// A frame read from the hold device. Counters saturate (loaded ones may start at the top).
    pub fn push(&mut self, frame: Vec<u8>) -> (Verdict, Option<Vec<u8>>) {
        let Some(dst) = frame_dst(&frame) else {
            self.counters.malformed = self.counters.malformed.saturating_add(1);
            return (Verdict::Malformed, None);
        };
        let limits = self.limits;
        match self.queues.get_mut(&dst) {
            None => {
                self.counters.stragglers = self.counters.stragglers.saturating_add(1);
                (Verdict::PassOn, Some(frame))
            }
            Some(_) if limits.mode == HoldMode::Drop => {
                self.counters.dropped = self.counters.dropped.saturating_add(1);
                (Verdict::Dropped, None)
            }
            Some(q) => {
                if q.frames.len() >= limits.max_packets || q.bytes + frame.len() > limits.max_bytes
                {
                    self.counters.overflow = self.counters.overflow.saturating_add(1);
                    return (Verdict::Overflow, None);
                }
                q.bytes += frame.len();
                self.counters.held = self.counters.held.saturating_add(1);
                self.counters.bytes_held =
                    self.counters.bytes_held.saturating_add(frame.len() as u64);
                q.frames.push_back(frame);
                (Verdict::Held, None)
            }
        }
    }

    /// Stops holding `ip` and returns its frames in arrival order.
    pub fn release(&mut self, ip: Ipv4Addr) -> VecDeque<Vec<u8>> {
        let frames = self
            .queues
            .remove(&ip)
            .map(|q| q.frames)
            .unwrap_or_default();
        self.counters.released = self.counters.released.saturating_add(frames.len() as u64);
        frames
    }

    /// Takes every queue (the endpoints stay held) and the counters, serialized for the next
    /// agent: `FERRYHQ1`, the eight counters (u64 LE), then per held endpoint its address
    /// (4 bytes), its frame count (u32 LE) and each frame (u32 LE length, bytes), in order.
    pub fn save(&mut self) -> Vec<u8> {
        let c = self.counters;
        let mut out = Vec::with_capacity(
            64 + self
                .queues
                .values()
                .map(|q| q.bytes + 4 * q.frames.len())
                .sum::<usize>(),
        );
        out.extend_from_slice(SAVED_MAGIC);
        for n in [
            c.held,
            c.released,
            c.overflow,
            c.dropped,
            c.stragglers,
            c.malformed,
            c.bytes_held,
            c.kept_over_restart,
        ] {
            out.extend_from_slice(&n.to_le_bytes());
        }
        for (ip, q) in &mut self.queues {
            out.extend_from_slice(&ip.octets());
            out.extend_from_slice(&(q.frames.len() as u32).to_le_bytes());
            for f in q.frames.drain(..) {
                out.extend_from_slice(&(f.len() as u32).to_le_bytes());
                out.extend_from_slice(&f);
            }
            q.bytes = 0;
        }
        out
    }

    /// Loads what [`HoldQueues::save`] wrote: counters go on from the saved values, each
    /// endpoint is held, and its frames are queued ahead of anything that arrives later
    /// (within this agent's limits; beyond them `overflow`). Returns the frames queued.
    pub fn load(&mut self, bytes: &[u8]) -> Result<usize, SavedHoldError> {
        let mut r = bytes;
        let mut take = |n: usize| -> Result<&[u8], SavedHoldError> {
            if r.len() < n {
                return Err(SavedHoldError("truncated"));
            }
            let (a, b) = r.split_at(n);
            r = b;
            Ok(a)
        };
        if take(8)? != SAVED_MAGIC {
            return Err(SavedHoldError("not a hold queue file"));
        }
        let mut n = [0u64; 8];
        for v in &mut n {
            *v = u64::from_le_bytes(take(8)?.try_into().expect("8 bytes"));
        }
        let mut queued: Vec<(Ipv4Addr, Vec<Vec<u8>>)> = Vec::new();
        while let Ok(ip) = take(4) {
            let ip = Ipv4Addr::new(ip[0], ip[1], ip[2], ip[3]);
            let count = u32::from_le_bytes(take(4)?.try_into().expect("4 bytes"));
            let mut frames = Vec::new();
            for _ in 0..count {
                let len = u32::from_le_bytes(take(4)?.try_into().expect("4 bytes")) as usize;
                frames.push(take(len)?.to_vec());
            }
            queued.push((ip, frames));
        }
        // Parsed whole: only now does anything change.
        // Saturating: the saved counters are read from a file (u64::MAX must not panic).
        let c = self.counters;
        self.counters = HoldCounters {
            held: n[0].saturating_add(c.held),
            released: n[1].saturating_add(c.released),
            overflow: n[2].saturating_add(c.overflow),
            dropped: n[3].saturating_add(c.dropped),
            stragglers: n[4].saturating_add(c.stragglers),
            malformed: n[5].saturating_add(c.malformed),
            bytes_held: n[6].saturating_add(c.bytes_held),
            kept_over_restart: n[7].saturating_add(c.kept_over_restart),
            ..c
        };
        let mut total = 0;
        for (ip, frames) in queued {
            self.hold(ip);
            let q = self.queues.get_mut(&ip).expect("just held");
            for f in frames {
                if q.frames.len() >= self.limits.max_packets
                    || q.bytes + f.len() > self.limits.max_bytes
                {
                    self.counters.overflow = self.counters.overflow.saturating_add(1);
                    continue;
                }
                q.bytes += f.len();
                q.frames.push_back(f);
                self.counters.kept_over_restart = self.counters.kept_over_restart.saturating_add(1);
                total += 1;
            }
        }
        Ok(total)
    }

    /// Takes the frames queued so far for `ip` but keeps holding it.
    pub fn drain(&mut self, ip: Ipv4Addr) -> VecDeque<Vec<u8>> {
        let Some(q) = self.queues.get_mut(&ip) else {
            return VecDeque::new();
        };
        q.bytes = 0;
        let frames = std::mem::take(&mut q.frames);
        self.counters.released = self.counters.released.saturating_add(frames.len() as u64);
        frames
    }
}

#[cfg(test)]
mod saved_tests {
    use super::*;

    fn frame(dst: Ipv4Addr, tag: u8) -> Vec<u8> {
        let mut f = vec![0u8; 60];
        f[12] = 0x08;
        f[14] = 0x45;
        f[30..34].copy_from_slice(&dst.octets());
        f[59] = tag;
        f
    }

    /// Saved at one agent's exit, loaded by the next: same endpoints held, same frames in the
    /// same order, counters continued and the carried frames counted.
    #[test]
    fn queues_survive_a_save_and_load_in_order() {
        let (a, b) = (Ipv4Addr::new(10, 244, 1, 10), Ipv4Addr::new(10, 244, 1, 11));
        let mut old = HoldQueues::new(HoldLimits::default());
        old.hold(a);
        old.hold(b);
        for t in 0..5 {
            old.push(frame(a, t));
        }
        let bytes = old.save();
        assert_eq!(old.total_packets(), 0, "saving takes the frames");
        let mut new = HoldQueues::new(HoldLimits::default());
        assert_eq!(new.load(&bytes), Ok(5));
        assert_eq!(new.held(), [a, b]);
        assert_eq!(new.counters.held, 5);
        assert_eq!(new.counters.kept_over_restart, 5);
        // A frame that arrives after the restart queues behind the saved ones.
        new.push(frame(a, 9));
        let tags: Vec<u8> = new.release(a).iter().map(|f| f[59]).collect();
        assert_eq!(tags, [0, 1, 2, 3, 4, 9]);
        assert_eq!(new.load(b"short"), Err(SavedHoldError("truncated")));
        assert_eq!(
            new.load(&bytes[..bytes.len() - 3]),
            Err(SavedHoldError("truncated"))
        );
        assert_eq!(
            new.load(b"FERRYHQ2\0\0\0\0\0\0\0\0"),
            Err(SavedHoldError("not a hold queue file"))
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(dst: [u8; 4], len: usize, tag: u8) -> Vec<u8> {
        let mut f = vec![0u8; len.max(34)];
        f[12] = 0x08;
        f[13] = 0x00;
        f[14] = 0x45;
        f[30..34].copy_from_slice(&dst);
        f[len.max(34) - 1] = tag;
        f
    }

    #[test]
    fn queues_in_order_and_releases_everything_once() {
        let ip = Ipv4Addr::new(10, 244, 1, 10);
        let mut h = HoldQueues::new(HoldLimits::default());
        h.hold(ip);
        for i in 0..100u8 {
            assert_eq!(h.push(frame(ip.octets(), 1514, i)).0, Verdict::Held);
        }
        assert_eq!(h.depth(ip), (100, 151_400));
        let out = h.release(ip);
        assert_eq!(out.len(), 100);
        for (i, f) in out.iter().enumerate() {
            assert_eq!(f[1513], i as u8, "order kept");
        }
        assert!(!h.is_held(ip));
        assert_eq!(h.counters.held, 100);
        assert_eq!(h.counters.released, 100);
        // A late frame for it is passed on, not lost.
        let (v, back) = h.push(frame(ip.octets(), 100, 7));
        assert_eq!(v, Verdict::PassOn);
        assert!(back.is_some());
        assert_eq!(h.counters.stragglers, 1);
    }

    #[test]
    fn overflow_is_bounded_by_packets_and_bytes_and_counted() {
        let ip = Ipv4Addr::new(10, 244, 1, 10);
        let mut h = HoldQueues::new(HoldLimits {
            max_packets: 3,
            max_bytes: 10_000,
            ..HoldLimits::default()
        });
        h.hold(ip);
        for i in 0..5u8 {
            h.push(frame(ip.octets(), 100, i));
        }
        assert_eq!(h.depth(ip).0, 3);
        assert_eq!(h.counters.overflow, 2);
        let mut h = HoldQueues::new(HoldLimits {
            max_packets: 100,
            max_bytes: 3_000,
            ..HoldLimits::default()
        });
        h.hold(ip);
        for i in 0..5u8 {
            h.push(frame(ip.octets(), 1_000, i));
        }
        assert_eq!(h.depth(ip), (3, 3_000));
        assert_eq!(h.counters.overflow, 2);
        // The first three, in order, survive.
        let out: Vec<u8> = h.release(ip).iter().map(|f| f[999]).collect();
        assert_eq!(out, vec![0, 1, 2]);
    }

    #[test]
    fn drop_mode_drops_and_counts_and_releases_nothing() {
        let ip = Ipv4Addr::new(10, 244, 1, 10);
        let mut h = HoldQueues::new(HoldLimits {
            mode: HoldMode::Drop,
            ..HoldLimits::default()
        });
        h.hold(ip);
        for i in 0..10u8 {
            assert_eq!(h.push(frame(ip.octets(), 100, i)).0, Verdict::Dropped);
        }
        assert_eq!(h.counters.dropped, 10);
        assert!(h.release(ip).is_empty());
    }

    #[test]
    fn queues_are_per_endpoint_and_non_ipv4_is_counted() {
        let a = Ipv4Addr::new(10, 244, 1, 10);
        let b = Ipv4Addr::new(10, 244, 1, 11);
        let mut h = HoldQueues::new(HoldLimits::default());
        h.hold(a);
        h.hold(b);
        h.push(frame(a.octets(), 60, 1));
        h.push(frame(b.octets(), 60, 2));
        h.push(frame(a.octets(), 60, 3));
        assert_eq!(h.drain(a).len(), 2);
        assert!(h.is_held(a), "drain keeps holding");
        assert_eq!(h.release(b).len(), 1);
        let mut arp = frame(a.octets(), 60, 0);
        arp[13] = 0x06;
        assert_eq!(h.push(arp).0, Verdict::Malformed);
        assert_eq!(h.counters.malformed, 1);
    }

    /// A dual-stack endpoint's IPv6 frames queue with its IPv4 ones, in one order.
    #[test]
    fn ipv6_frames_queue_with_their_endpoint() {
        let a = Ipv4Addr::new(10, 244, 1, 10);
        let mut v6 = vec![0u8; 80];
        v6[12..14].copy_from_slice(&[0x86, 0xdd]);
        v6[14] = 0x60;
        v6[38..50].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0, 0xf, 0, 0, 0, 0, 0, 0]);
        v6[50..54].copy_from_slice(&a.octets());
        assert_eq!(frame_dst(&v6), Some(a));
        assert_eq!(frame_dst(&v6[..53]), None, "truncated");
        let mut h = HoldQueues::new(HoldLimits::default());
        h.hold(a);
        h.push(frame(a.octets(), 60, 1));
        h.push(v6.clone());
        h.push(frame(a.octets(), 60, 3));
        let out: Vec<_> = h.release(a).into_iter().collect();
        assert_eq!(out.len(), 3);
        assert_eq!(out[1], v6, "IPv6 keeps its place between the IPv4 frames");
    }
}
