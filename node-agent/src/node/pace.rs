//! The paced release of held UDP datagrams.
//!
//! A release to this host writes the held frames back through the hold device. TCP needs
//! nothing more: its flow control copes with a burst (a segment beyond the receive window is
//! retransmitted by its sender). A UDP socket drops whatever does not fit its receive buffer
//! (`UdpRcvbufErrors`), and the restored copy is still stopped (fenced) when the apply
//! releases: it runs only once the release is applied (`crate::fencing`). A burst of a few
//! hundred held datagrams overran a 208 KiB buffer nobody was reading yet.
//!
//! So the datagrams of a release to a container built here are set aside ([`UdpHeld::split`]:
//! per destination port, in arrival order; everything else is written at once, in order) and
//! written by a task of their own ([`release_udp`]): it looks at the container's UDP sockets'
//! receive buffers (the [`UdpBuffers`] seam: `sock_diag` in the container's namespace, see
//! `crate::drain::SockDiag::udp_buffers`) and writes, per port, in order, as many datagrams as
//! the buffer has room for, then looks again. Datagrams for a port no socket is bound to are
//! written at once (the kernel answers them as it would have: `NoPorts`). At the deadline
//! (`[hold] udp_pace_ms`) the rest is written anyway and counted (`pace_late`): the socket
//! may drop them, as it would have without pacing.

use std::{
    collections::{BTreeMap, VecDeque},
    future::Future,
    net::Ipv4Addr,
    time::Duration,
};

use serde::Serialize;
use tokio::time::Instant;
use tracing::{info, warn};

use super::seams::HoldDevice;

/// How often a paced release looks at the receive buffers.
pub const POLL: Duration = Duration::from_millis(1);

/// A socket's receive buffer as the kernel accounts it (`ss -m`: `r` and `rb`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RcvBuf {
    /// Bytes charged to it now (`sk_rmem_alloc`: the queued datagrams' `truesize`).
    pub used: u32,
    /// Its size (`sk_rcvbuf`).
    pub size: u32,
    /// Datagrams it dropped so far (`sk_drops`).
    pub drops: u32,
}

impl RcvBuf {
    pub fn room(&self) -> u32 {
        self.size.saturating_sub(self.used)
    }

    /// What a paced release may add now: up to a quarter of the buffer; the rest is left to
    /// the datagrams arriving live meanwhile (at 100 Mbit/s, three quarters of a default
    /// 208 KiB buffer is 8 ms of them: a reader descheduled that long drops nothing).
    pub fn share(&self) -> u32 {
        (self.size / 4).saturating_sub(self.used)
    }
}

/// The seam: a container's UDP receive buffers. Made without I/O (the real one opens its
/// `sock_diag` socket at the first look).
pub trait UdpBuffers: Send + 'static {
    /// For each of `ports` that one of the container's UDP sockets is bound to (on `ip` or
    /// on any address), its receive buffer (several sockets on one port: the one with the
    /// least room). A port missing from the answer has no socket.
    fn look(
        &mut self,
        ip: Ipv4Addr,
        ports: &[u16],
    ) -> impl Future<Output = std::io::Result<BTreeMap<u16, RcvBuf>>> + Send;
}

/// What a socket will be charged for a frame written back (an estimate of the `truesize` of
/// its skb: the data rounded up to the allocator's size, with headroom and the shared info,
/// plus the `sk_buff`): 2,304 bytes for a full 1,514-byte frame.
pub fn charge(frame_len: usize) -> u32 {
    let n = (frame_len + 384).next_power_of_two() + 256;
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// The destination port of an Ethernet frame carrying a whole IPv4 UDP datagram (not a
/// fragment: those are written back at once, the kernel reassembles them).
pub fn udp_dst_port(frame: &[u8]) -> Option<u16> {
    if frame.len() < 34 || frame[12..14] != [0x08, 0x00] || frame[14] >> 4 != 4 {
        return None;
    }
    if frame[23] != 17 {
        return None;
    }
    let frag = u16::from_be_bytes([frame[20], frame[21]]);
    if frag & 0x3fff != 0 {
        return None;
    }
    let udp = 14 + usize::from(frame[14] & 0x0f) * 4;
    let port = frame.get(udp + 2..udp + 4)?;
    Some(u16::from_be_bytes([port[0], port[1]]))
}

/// Held UDP datagrams set aside for the paced release: per destination port, in order.
#[derive(Debug, Default)]
pub struct UdpHeld {
    queues: BTreeMap<u16, VecDeque<Vec<u8>>>,
    /// The sockets' drop counts (`sk_drops`) at the first look, before the switch.
    first_drops: BTreeMap<u16, u32>,
}

impl UdpHeld {
    /// Sets the UDP datagrams of `frames` aside (behind those set aside before) and returns
    /// the others, in order.
    pub fn split(&mut self, frames: impl IntoIterator<Item = Vec<u8>>) -> Vec<Vec<u8>> {
        let mut rest = Vec::new();
        for f in frames {
            match udp_dst_port(&f) {
                Some(port) => self.queues.entry(port).or_default().push_back(f),
                None => rest.push(f),
            }
        }
        rest
    }

    /// Datagrams set aside.
    pub fn len(&self) -> usize {
        self.queues.values().map(VecDeque::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.queues.values().all(VecDeque::is_empty)
    }
}

/// Writes, while the entry still holds (no live datagram reaches the sockets), what fits in
/// each socket's whole room, per port and in order; sets the rest aside for [`release_udp`]
/// (after the switch). Datagrams for a port without a socket go at once. If the buffers
/// cannot be read, everything stays set aside. Counts what it wrote.
pub async fn write_fitting<H: HoldDevice + ?Sized, B: UdpBuffers>(
    hold: &H,
    buffers: &mut B,
    ip: Ipv4Addr,
    held: &mut UdpHeld,
) {
    if held.is_empty() {
        return;
    }
    let ports: Vec<u16> = held.queues.keys().copied().collect();
    let bufs = match buffers.look(ip, &ports).await {
        Ok(b) => b,
        Err(e) => {
            warn!(container = %ip, error = %e, "reading the container's UDP receive buffers before the release");
            return;
        }
    };
    let mut r = PaceReport {
        looks: 1,
        ..PaceReport::default()
    };
    for (port, q) in &mut held.queues {
        if let Some(b) = bufs.get(port) {
            held.first_drops.entry(*port).or_insert(b.drops);
        }
        let room = bufs.get(port).map(RcvBuf::room);
        write_queue(hold, ip, q, room, &mut r);
    }
    held.queues.retain(|_, q| !q.is_empty());
    hold.count_paced(&r);
}

/// Writes from the front of `q` what fits in `room` bytes (`None`: no socket, all of it).
fn write_queue<H: HoldDevice + ?Sized>(
    hold: &H,
    ip: Ipv4Addr,
    q: &mut VecDeque<Vec<u8>>,
    room: Option<u32>,
    r: &mut PaceReport,
) {
    let Some(mut room) = room else {
        for f in q.drain(..) {
            write_one(hold, ip, &f, r);
            r.unbound += 1;
        }
        return;
    };
    while let Some(f) = q.front() {
        let c = charge(f.len());
        if c > room {
            break;
        }
        room -= c;
        let f = q.pop_front().expect("front");
        write_one(hold, ip, &f, r);
        r.paced += 1;
    }
}

fn write_one<H: HoldDevice + ?Sized>(hold: &H, ip: Ipv4Addr, f: &[u8], r: &mut PaceReport) {
    if let Err(e) = hold.write_frame(f) {
        r.failed += 1;
        warn!(container = %ip, error = %e, "re-injecting a held datagram");
    }
}

/// How a paced release went.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct PaceReport {
    /// Written when their socket had room.
    pub paced: u64,
    /// Written at the deadline without room (or without knowing it: the buffers could not be
    /// read): the socket may have dropped them (`UdpRcvbufErrors` in the container).
    pub late: u64,
    /// Written at once: no socket was bound to their port.
    pub unbound: u64,
    /// Writes that failed (logged).
    pub failed: u64,
    /// Looks at the buffers.
    pub looks: u32,
    /// From the start to the last datagram written.
    pub waited_ms: f64,
    /// Datagrams the sockets dropped from the first look (before the switch, if the release
    /// wrote there) to a poll after the last write (live ones included: the kernel does not
    /// tell them apart).
    pub socket_drops: u64,
}

/// Writes `held` back through `hold`: per port, in order, as much as the socket has room
/// for, looking again every `poll`; at `deadline` the rest at once. Counts the outcome in the
/// hold device's counters ([`HoldDevice::count_paced`]).
pub async fn release_udp<H: HoldDevice + ?Sized, B: UdpBuffers>(
    hold: &H,
    buffers: &mut B,
    ip: Ipv4Addr,
    mut held: UdpHeld,
    deadline: Duration,
    poll: Duration,
) -> PaceReport {
    let start = Instant::now();
    let end = start + deadline;
    let mut r = PaceReport::default();
    let mut first_drops = std::mem::take(&mut held.first_drops);
    let mut last_drops: BTreeMap<u16, u32> = first_drops.clone();
    let write = |f: &[u8], r: &mut PaceReport| write_one(hold, ip, f, r);
    while !held.is_empty() {
        let ports: Vec<u16> = held.queues.keys().copied().collect();
        let bufs = match buffers.look(ip, &ports).await {
            Ok(b) => b,
            Err(e) => {
                warn!(container = %ip, error = %e, datagrams = held.len(), "reading the container's UDP receive buffers; releasing the held datagrams at once");
                for f in held.queues.values_mut().flat_map(|q| q.drain(..)) {
                    write(&f, &mut r);
                    r.late += 1;
                }
                break;
            }
        };
        r.looks += 1;
        for (port, q) in &mut held.queues {
            if let Some(buf) = bufs.get(port) {
                first_drops.entry(*port).or_insert(buf.drops);
                last_drops.insert(*port, buf.drops);
            }
            write_queue(hold, ip, q, bufs.get(port).map(RcvBuf::share), &mut r);
        }
        held.queues.retain(|_, q| !q.is_empty());
        if held.is_empty() {
            break;
        }
        let now = Instant::now();
        if now >= end {
            let left = held.len();
            warn!(container = %ip, datagrams = left, deadline_ms = deadline.as_millis() as u64, "the container's UDP sockets had no room for every held datagram by the deadline; releasing the rest at once");
            for f in held.queues.values_mut().flat_map(|q| q.drain(..)) {
                write(&f, &mut r);
                r.late += 1;
            }
            break;
        }
        tokio::time::sleep_until((now + poll).min(end)).await;
    }
    r.waited_ms = start.elapsed().as_secs_f64() * 1e3;
    // One more look, a poll after the last write: what the last datagrams met is counted too.
    if !last_drops.is_empty() {
        tokio::time::sleep(poll).await;
        let ports: Vec<u16> = last_drops.keys().copied().collect();
        if let Ok(bufs) = buffers.look(ip, &ports).await {
            for (p, b) in bufs {
                last_drops.insert(p, b.drops);
            }
        }
    }
    r.socket_drops = last_drops
        .iter()
        .map(|(p, d)| u64::from(d.wrapping_sub(first_drops[p])))
        .sum();
    hold.count_paced(&r);
    info!(container = %ip, paced = r.paced, late = r.late, unbound = r.unbound, failed = r.failed, looks = r.looks, waited_ms = r.waited_ms, socket_drops = r.socket_drops, "held datagrams released, paced");
    r
}

#[cfg(test)]
mod tests {
    use super::{super::fake::*, *};

    const C: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);

    /// A fake whose entry for `ip` is LOCAL (from-hold delivers to its veth, ifindex 7).
    fn fake_with_local(ip: Ipv4Addr) -> Fake {
        use super::super::seams::Datapath as _;
        let f = Fake::default();
        let e = ferry_common::Endpoint {
            kind: ferry_common::kind::LOCAL,
            ifindex: 7,
            ..Default::default()
        };
        f.set_endpoint(ip, e).unwrap();
        f
    }

    fn writes(f: &Fake) -> Vec<(u8, Delivery)> {
        f.log()
            .into_iter()
            .filter_map(|c| match c {
                Call::Write { tag, to, .. } => Some((tag, to)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn udp_datagrams_are_set_aside_per_port_and_the_rest_kept_in_order() {
        let mut held = UdpHeld::default();
        let mut frag = udp_frame(C, 53, 9);
        frag[20] = 0x20; // more fragments
        let frames = vec![
            tcp_frame(C, 1),
            udp_frame(C, 5201, 2),
            udp_frame(C, 53, 3),
            tcp_frame(C, 4),
            udp_frame(C, 5201, 5),
            frag,
            frame(C, 6),
        ];
        let rest = held.split(frames);
        let tags: Vec<u8> = rest.iter().map(|f| f[f.len() - 1]).collect();
        assert_eq!(
            tags,
            [1, 4, 9, 6],
            "TCP, fragments, others: at once, in order"
        );
        assert_eq!(held.len(), 3);
        let per_port: Vec<(u16, Vec<u8>)> = held
            .queues
            .iter()
            .map(|(p, q)| (*p, q.iter().map(|f| f[f.len() - 1]).collect()))
            .collect();
        assert_eq!(per_port, [(53, vec![3]), (5201, vec![2, 5])]);
        assert_eq!(charge(1514), 2304);
        assert!(charge(60) < charge(1514));
    }

    /// A socket of 40 datagrams (the release fills a quarter of it at most) whose reader starts
    /// 20 ms late and then reads one every millisecond: every one of 100 held datagrams is
    /// written in order, none is dropped, and the unbound port's are written at once.
    #[tokio::test(start_paused = true)]
    async fn datagrams_are_written_as_the_socket_has_room_in_order() {
        let f = fake_with_local(C);
        let one = charge(udp_frame(C, 5201, 0).len());
        f.udp_socket(5201, 40 * one, one, Duration::from_millis(20));
        let mut held = UdpHeld::default();
        let frames = (0..100).map(|t| udp_frame(C, 5201, t));
        assert!(held.split(frames).is_empty());
        assert!(
            held.split((200..205).map(|t| udp_frame(C, 9, t)))
                .is_empty()
        );
        let mut bufs = f.clone();
        let r = release_udp(
            &f,
            &mut bufs,
            C,
            held,
            Duration::from_secs(1),
            Duration::from_millis(1),
        )
        .await;
        assert_eq!(
            (r.paced, r.late, r.unbound, r.failed),
            (100, 0, 5, 0),
            "{r:?}"
        );
        let socket = f.udp_socket_state(5201);
        assert_eq!(socket.drops, 0, "pacing overran the socket: {socket:?}");
        assert_eq!(socket.got, (0..100).collect::<Vec<u8>>(), "in order");
        let w = writes(&f);
        assert_eq!(
            w[..5].iter().map(|(t, _)| *t).collect::<Vec<_>>(),
            [200, 201, 202, 203, 204],
            "no socket on port 9: written at the first look"
        );
        assert!(
            w.iter().all(|(_, to)| *to == Delivery::Container(7)),
            "{w:?}"
        );
        // Not before the reader ran (20 ms), then at its pace (one a millisecond).
        assert!(r.waited_ms >= 100.0, "{r:?}");
        assert!(r.looks > 1);
        let c = f.hold_counters();
        assert_eq!((c.paced, c.pace_late, c.pace_unbound), (100, 0, 5));
    }

    /// A socket nobody reads: what fits in its quarter is written, the rest at the deadline,
    /// counted late (the socket takes it or drops it).
    #[tokio::test(start_paused = true)]
    async fn the_deadline_releases_the_rest_and_counts_it() {
        let f = fake_with_local(C);
        let one = charge(udp_frame(C, 5201, 0).len());
        f.udp_socket(5201, 40 * one, 0, Duration::ZERO);
        let mut held = UdpHeld::default();
        held.split((0..30).map(|t| udp_frame(C, 5201, t)));
        let t0 = Instant::now();
        let mut bufs = f.clone();
        let r = release_udp(
            &f,
            &mut bufs,
            C,
            held,
            Duration::from_millis(50),
            Duration::from_millis(1),
        )
        .await;
        // The deadline, then one last look a poll later.
        assert_eq!(t0.elapsed(), Duration::from_millis(51));
        assert_eq!((r.paced, r.late, r.unbound), (10, 20, 0), "{r:?}");
        let socket = f.udp_socket_state(5201);
        assert_eq!(
            socket.got,
            (0..30).collect::<Vec<u8>>(),
            "late, not dropped by pacing"
        );
        assert_eq!(socket.drops, 0, "{socket:?}");
        assert_eq!(f.hold_counters().pace_late, 20);
        let tags: Vec<u8> = writes(&f).iter().map(|(t, _)| *t).collect();
        assert_eq!(tags, (0..30).collect::<Vec<u8>>(), "all written, in order");
    }

    /// Buffers that cannot be read: everything is written at once, counted late.
    #[tokio::test(start_paused = true)]
    async fn unreadable_buffers_release_everything_at_once() {
        let f = Fake::default();
        f.udp_buffers_fail();
        let mut held = UdpHeld::default();
        held.split((0..5).map(|t| udp_frame(C, 5201, t)));
        let mut bufs = f.clone();
        let t0 = Instant::now();
        let r = release_udp(&f, &mut bufs, C, held, Duration::from_secs(1), POLL).await;
        assert_eq!(t0.elapsed(), Duration::ZERO);
        assert_eq!((r.paced, r.late), (0, 5));
        assert_eq!(writes(&f).len(), 5);
    }
}
