//! Held packets: bounded per-endpoint FIFOs of whole frames, filled from the hold device while
//! an endpoint is `HOLD` and emptied, in order, at release (or towards the source at abort).
//! Pure (no I/O): the agent's hold task feeds it frames and writes back what it returns.

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
}

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

/// The IPv4 destination of an Ethernet frame, if it is IPv4.
pub fn frame_dst(frame: &[u8]) -> Option<Ipv4Addr> {
    if frame.len() < 34 || frame[12..14] != [0x08, 0x00] || frame[14] >> 4 != 4 {
        return None;
    }
    Some(Ipv4Addr::new(frame[30], frame[31], frame[32], frame[33]))
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

    /// A frame read from the hold device.
    pub fn push(&mut self, frame: Vec<u8>) -> (Verdict, Option<Vec<u8>>) {
        let Some(dst) = frame_dst(&frame) else {
            self.counters.malformed += 1;
            return (Verdict::Malformed, None);
        };
        let limits = self.limits;
        match self.queues.get_mut(&dst) {
            None => {
                self.counters.stragglers += 1;
                (Verdict::PassOn, Some(frame))
            }
            Some(_) if limits.mode == HoldMode::Drop => {
                self.counters.dropped += 1;
                (Verdict::Dropped, None)
            }
            Some(q) => {
                if q.frames.len() >= limits.max_packets || q.bytes + frame.len() > limits.max_bytes
                {
                    self.counters.overflow += 1;
                    return (Verdict::Overflow, None);
                }
                q.bytes += frame.len();
                self.counters.held += 1;
                self.counters.bytes_held += frame.len() as u64;
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
        self.counters.released += frames.len() as u64;
        frames
    }

    /// Takes the frames queued so far for `ip` but keeps holding it.
    pub fn drain(&mut self, ip: Ipv4Addr) -> VecDeque<Vec<u8>> {
        let Some(q) = self.queues.get_mut(&ip) else {
            return VecDeque::new();
        };
        q.bytes = 0;
        let frames = std::mem::take(&mut q.frames);
        self.counters.released += frames.len() as u64;
        frames
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
}
