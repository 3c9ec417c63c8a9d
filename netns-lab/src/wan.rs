//! WAN links between clouds, without netem (this kernel has neither netem nor fq).
//!
//! For each direction of each `[[links]]` entry the router namespace gets:
//! - a persistent TUN device `wl<k>-<d>` (link `k`, direction `d`: 0 is `between[0]` →
//!   `between[1]`, 1 the reverse) and a policy rule: packets that came in on the source
//!   cloud's bridge and go to the other cloud's subnet are routed into the TUN device (table
//!   `1000 + 2k + d`);
//! - one thread of the lab's forwarder (`ferry-lab wan-forward`, one process per lab, in the
//!   router namespace) that reads each packet from the TUN device as it comes and timestamps
//!   it, then plays the link: the packet queues for the line (at the rate, behind the packets
//!   before it; a full bottleneck buffer drops it), is lost with the link's probability, and
//!   is written back into the same TUN device once it has crossed (serialised, plus the delay
//!   and the jitter). Written back, the packet enters the router as received on the TUN
//!   device: the policy rule (which names the bridge) no longer matches and the main table
//!   forwards it to the destination cloud's bridge.
//!
//! The rate is computed, not timed: each packet's departure is `max(arrival, previous
//! departure) + size / rate` (IP bytes), so a thread that wakes late releases a burst but the
//! rate stays exact on average. The kernel's TBF was the first choice and was measured: it
//! dequeues from a softirq that a busy 2-core machine defers to ksoftirqd, and time lost there
//! is throughput lost (437 of 500 Mbit/s delivered while its queue was full). The threads run
//! SCHED_FIFO (low priority: they only ever block or forward what is due), so scheduling noise
//! stays in the tens of microseconds.
//!
//! The forwarder releases packets strictly in arrival order (one FIFO per direction). Jitter
//! is a smooth random curve, not a per-packet draw: the extra delay moves linearly between
//! random values in `[-jitter, +jitter]` drawn every [`jitter_period`] (at least 4 × jitter, so
//! the curve's slope stays within ±0.5 and a later packet can never be due before an earlier
//! one). Packets are never reordered, and under load the mean delay stays the configured one.
//!
//! Every packet dropped is counted with its reason: `queue_drops` (the bottleneck's buffer was
//! full), `lost_packets` (the loss draw), `overflow_packets` (the forwarder's holding cap,
//! [`MAX_HELD_BYTES`]), `write_errors` (the kernel refused it back), and `ring_drops` (the
//! kernel's TUN queue was full: the forwarder fell behind).
//!
//! Everything above the forwarder's system calls is pure and unit-tested here; the lab builds
//! links in [`crate::lab`] and `tests/tests/wan.rs` measures them.

use std::{
    collections::VecDeque,
    io::{self, Read as _, Write as _},
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    os::unix::net::{UnixListener, UnixStream},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::topology::{LabTopology, Link};

/// First routing table (and rule preference) of the links' directions.
pub const TABLE_BASE: u32 = 1000;
/// The TUN devices' transmit queue (packets waiting for the forwarder to read them: 10,000
/// is 0.3 s at 500 Mbit/s of full-size packets).
pub const TUN_TXQUEUELEN: u32 = 10_000;
/// Smallest bottleneck buffer: a few full-size packets.
pub const MIN_QUEUE_BYTES: u64 = 8192;
/// What the forwarder holds per direction at most (delayed packets); beyond it packets are
/// dropped and counted as `overflow`. 64 MiB is 2.6 s at 200 Mbit/s.
pub const MAX_HELD_BYTES: u64 = 64 << 20;
/// The forwarder threads' SCHED_FIFO priority (low: above every normal thread, below the
/// kernel's own real-time threads).
pub const RT_PRIORITY: libc::c_int = 10;
/// Shortest jitter period.
pub const MIN_JITTER_PERIOD: Duration = Duration::from_millis(10);

/// One direction of a link as the router builds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DirectionPlan {
    /// Index of the link in the topology's `links`.
    pub link: usize,
    /// 0: `between[0]` → `between[1]`; 1: the reverse.
    pub dir: u8,
    pub from: String,
    pub to: String,
    pub tun: String,
    pub table: u32,
    pub from_bridge: String,
    pub to_subnet: Ipv4Net,
    pub delay_ms: f64,
    pub jitter_ms: f64,
    pub loss: f64,
    pub rate_mbit: Option<f64>,
    /// The bottleneck's buffer, bytes (`Some` with a rate).
    pub queue_bytes: Option<u64>,
}

impl DirectionPlan {
    /// `a→b`.
    pub fn name(&self) -> String {
        format!("{}→{}", self.from, self.to)
    }
}

/// The TUN device of link `k`, direction `d`.
pub fn tun_name(k: usize, d: u8) -> String {
    format!("wl{k}-{d}")
}

/// Bytes per second of `mbit` Mbit/s.
fn bytes_per_sec(mbit: f64) -> f64 {
    mbit * 1e6 / 8.0
}

/// Every direction of every link of `t`, in order.
pub fn plan(t: &LabTopology) -> Vec<DirectionPlan> {
    let mut v = Vec::new();
    for (k, l) in t.links.iter().enumerate() {
        for d in 0..2u8 {
            let (from, to) = if d == 0 {
                (&l.between[0], &l.between[1])
            } else {
                (&l.between[1], &l.between[0])
            };
            let Some(to_cloud) = t.cloud(to) else {
                continue; // a resolved topology always has it
            };
            v.push(DirectionPlan {
                link: k,
                dir: d,
                from: from.clone(),
                to: to.clone(),
                tun: tun_name(k, d),
                table: TABLE_BASE + 2 * k as u32 + u32::from(d),
                from_bridge: format!("br-{from}"),
                to_subnet: to_cloud.subnet,
                delay_ms: l.delay_ms,
                jitter_ms: l.jitter_ms,
                loss: l.loss,
                rate_mbit: l.rate_mbit,
                queue_bytes: queue_bytes(l),
            });
        }
    }
    v
}

/// The bottleneck's buffer: `queue_ms` at the rate, at least [`MIN_QUEUE_BYTES`].
pub fn queue_bytes(l: &Link) -> Option<u64> {
    let (rate, q) = (l.rate_mbit?, l.queue_ms?);
    Some(((bytes_per_sec(rate) * q / 1000.0) as u64).max(MIN_QUEUE_BYTES))
}

/// The router's `ip -b` lines: TUN devices, routing tables, policy rules.
pub fn ip_batch(plan: &[DirectionPlan]) -> String {
    let mut s = String::new();
    for d in plan {
        s.push_str(&format!(
            "tuntap add dev {tun} mode tun\n\
             link set dev {tun} txqueuelen {TUN_TXQUEUELEN} up\n\
             route add {subnet} dev {tun} table {table}\n\
             rule add pref {table} iif {br} to {subnet} table {table}\n",
            tun = d.tun,
            subnet = d.to_subnet,
            table = d.table,
            br = d.from_bridge,
        ));
    }
    s
}

/// What `ferry-lab wan-forward --config PATH` reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForwarderConfig {
    /// Where it answers with its counters (JSON) once every TUN device is open.
    pub stats_socket: PathBuf,
    pub directions: Vec<ForwardDirection>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ForwardDirection {
    /// `a→b`.
    pub name: String,
    pub tun: String,
    pub delay_us: u64,
    pub jitter_us: u64,
    pub loss: f64,
    /// Bits per second; absent: no rate limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_bps: Option<u64>,
    /// The bottleneck's buffer (with a rate).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_bytes: Option<u64>,
    pub max_held_bytes: u64,
    /// Seed of the loss and jitter draws (default: from the kernel's random source).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

/// The forwarder's configuration for `plan`.
pub fn forwarder_config(plan: &[DirectionPlan], stats_socket: PathBuf) -> ForwarderConfig {
    ForwarderConfig {
        stats_socket,
        directions: plan
            .iter()
            .map(|d| ForwardDirection {
                name: d.name(),
                tun: d.tun.clone(),
                delay_us: (d.delay_ms * 1e3).round() as u64,
                jitter_us: (d.jitter_ms * 1e3).round() as u64,
                loss: d.loss,
                rate_bps: d.rate_mbit.map(|r| (r * 1e6).round() as u64),
                queue_bytes: d.queue_bytes,
                max_held_bytes: MAX_HELD_BYTES,
                seed: None,
            })
            .collect(),
    }
}

/// The forwarder's files in a lab's state directory.
pub fn config_path(state_dir: &Path) -> PathBuf {
    state_dir.join("wan.json")
}
pub fn stats_socket(state_dir: &Path) -> PathBuf {
    state_dir.join("wan.sock")
}
pub fn log_path(state_dir: &Path) -> PathBuf {
    state_dir.join("wan.log")
}

// ---------------------------------------------------------------------------------------
// Random draws, jitter, release times (pure).

/// splitmix64: small, fast, good enough for loss and jitter draws (not for secrets).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// A packet lost with probability `p` (never for 0, always for 1).
    pub fn lose(&mut self, p: f64) -> bool {
        p > 0.0 && self.next_f64() < p
    }
}

/// The period between the jitter curve's random points: 4 × jitter (slope within ±0.5), at
/// least [`MIN_JITTER_PERIOD`].
pub fn jitter_period(jitter: Duration) -> Duration {
    (jitter * 4).max(MIN_JITTER_PERIOD)
}

/// The jitter curve: piecewise linear between random points in `[-amp, +amp]` every
/// `period`, evaluated at non-decreasing times (nanoseconds since the direction started).
#[derive(Debug, Clone)]
pub struct Jitter {
    amp: f64,
    period: u64,
    knot: u64,
    v0: f64,
    v1: f64,
}

impl Jitter {
    pub fn new(amp: Duration, rng: &mut Rng) -> Self {
        let amp_ns = amp.as_nanos() as f64;
        let mut j = Self {
            amp: amp_ns,
            period: jitter_period(amp).as_nanos() as u64,
            knot: 0,
            v0: 0.0,
            v1: 0.0,
        };
        j.v0 = j.draw(rng);
        j.v1 = j.draw(rng);
        j
    }

    fn draw(&self, rng: &mut Rng) -> f64 {
        if self.amp == 0.0 {
            0.0
        } else {
            (rng.next_f64() * 2.0 - 1.0) * self.amp
        }
    }

    /// The extra delay (ns, within ±amp) at time `t` (ns; never earlier than the last call).
    pub fn at(&mut self, t: u64, rng: &mut Rng) -> f64 {
        if self.amp == 0.0 {
            return 0.0;
        }
        let t = t.max(self.knot);
        let behind = (t - self.knot) / self.period;
        if behind >= 2 {
            // Idle for a while: start afresh in the period that holds `t`.
            self.knot += behind * self.period;
            self.v0 = self.draw(rng);
            self.v1 = self.draw(rng);
        } else if behind == 1 {
            self.knot += self.period;
            self.v0 = self.v1;
            self.v1 = self.draw(rng);
        }
        let w = (t - self.knot) as f64 / self.period as f64;
        self.v0 + (self.v1 - self.v0) * w
    }
}

/// The rate limit of a direction: a line that serialises `rate` bytes per ns behind a
/// buffer of `queue_bytes`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Line {
    /// Bytes per nanosecond.
    pub rate: f64,
    pub queue_bytes: u64,
}

impl Line {
    pub fn new(rate_bps: u64, queue_bytes: u64) -> Self {
        Self {
            rate: rate_bps as f64 / 8.0 / 1e9,
            queue_bytes,
        }
    }
}

/// What happens to a packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Written back at this time (ns).
    Release(u64),
    /// The bottleneck's buffer was full.
    QueueFull,
    /// The loss draw.
    Lost,
}

/// One direction's link: a line (serialisation at the rate, a bounded buffer), the loss draw,
/// then the delay with its jitter; release times never before the previous packet's (FIFO).
#[derive(Debug, Clone)]
pub struct Schedule {
    delay: u64,
    jitter: Jitter,
    rng: Rng,
    loss: f64,
    line: Option<Line>,
    /// When the line has serialised everything admitted so far (ns, fractional).
    free_at: f64,
    last: u64,
}

impl Schedule {
    pub fn new(
        delay: Duration,
        jitter: Duration,
        loss: f64,
        line: Option<Line>,
        seed: u64,
    ) -> Self {
        let mut rng = Rng::new(seed);
        let jitter = Jitter::new(jitter, &mut rng);
        Self {
            delay: delay.as_nanos() as u64,
            jitter,
            rng,
            loss,
            line,
            free_at: 0.0,
            last: 0,
        }
    }

    /// What happens to a packet of `len` bytes that arrived at `t` (ns; arrivals in order).
    pub fn admit(&mut self, t: u64, len: usize) -> Fate {
        let tf = t as f64;
        let sent = match self.line {
            None => tf,
            Some(line) => {
                let backlog = (self.free_at - tf).max(0.0) * line.rate;
                if backlog + len as f64 > line.queue_bytes as f64 {
                    return Fate::QueueFull;
                }
                self.free_at = self.free_at.max(tf) + len as f64 / line.rate;
                self.free_at
            }
        };
        // Lost on the wire: after it took its time on the line.
        if self.rng.lose(self.loss) {
            return Fate::Lost;
        }
        let j = self.jitter.at(sent as u64, &mut self.rng);
        let r = (sent + self.delay as f64 + j).max(sent) as u64;
        self.last = self.last.max(r);
        Fate::Release(self.last)
    }
}

// ---------------------------------------------------------------------------------------
// Counters.

/// One direction's counters, as the forwarder reports them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirectionCounters {
    /// `a→b`.
    pub name: String,
    pub tun: String,
    /// Packets read from the TUN device.
    pub rx_packets: u64,
    pub rx_bytes: u64,
    /// Dropped because the bottleneck's buffer was full (more offered than the rate).
    pub queue_drops: u64,
    /// Dropped by the link's loss draw.
    pub lost_packets: u64,
    /// Dropped because the forwarder already held `max_held_bytes`.
    pub overflow_packets: u64,
    /// Written back after their delay.
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Refused by the kernel when written back.
    pub write_errors: u64,
    /// How late packets were written back after their due time (the forwarder's own
    /// timing error): summed (ns), the most, and how many more than 1 ms late.
    pub late_ns_total: u64,
    pub late_ns_max: u64,
    pub late_over_1ms: u64,
    /// Bytes held (queued or delayed) now, and at most so far.
    pub held_bytes: u64,
    pub held_bytes_peak: u64,
    /// Dropped by the kernel before the forwarder read them: the TUN device's queue was full
    /// (its transmit drops in /proc/net/dev).
    pub ring_drops: u64,
}

#[derive(Debug, Default)]
struct Counters {
    rx_packets: AtomicU64,
    rx_bytes: AtomicU64,
    queue_drops: AtomicU64,
    lost_packets: AtomicU64,
    overflow_packets: AtomicU64,
    tx_packets: AtomicU64,
    tx_bytes: AtomicU64,
    write_errors: AtomicU64,
    late_ns_total: AtomicU64,
    late_ns_max: AtomicU64,
    late_over_1ms: AtomicU64,
    held_bytes: AtomicU64,
    held_bytes_peak: AtomicU64,
}

impl Counters {
    fn snapshot(&self, d: &ForwardDirection, ring_drops: u64) -> DirectionCounters {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        DirectionCounters {
            name: d.name.clone(),
            tun: d.tun.clone(),
            rx_packets: g(&self.rx_packets),
            rx_bytes: g(&self.rx_bytes),
            queue_drops: g(&self.queue_drops),
            lost_packets: g(&self.lost_packets),
            overflow_packets: g(&self.overflow_packets),
            tx_packets: g(&self.tx_packets),
            tx_bytes: g(&self.tx_bytes),
            write_errors: g(&self.write_errors),
            late_ns_total: g(&self.late_ns_total),
            late_ns_max: g(&self.late_ns_max),
            late_over_1ms: g(&self.late_over_1ms),
            held_bytes: g(&self.held_bytes),
            held_bytes_peak: g(&self.held_bytes_peak),
            ring_drops,
        }
    }
}

/// Transmit drops of `dev` in /proc/net/dev text.
pub fn tx_dropped(proc_net_dev: &str, dev: &str) -> Option<u64> {
    proc_net_dev.lines().skip(2).find_map(|l| {
        let (name, rest) = l.split_once(':')?;
        if name.trim() != dev {
            return None;
        }
        // rx: bytes packets errs drop fifo frame compressed multicast; tx: bytes packets errs drop
        rest.split_whitespace().nth(11)?.parse().ok()
    })
}

/// What the forwarder answers on its socket.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForwarderStats {
    pub pid: u32,
    pub directions: Vec<DirectionCounters>,
}

/// Asks the forwarder behind `socket` for its counters.
pub fn query_stats(socket: &Path) -> io::Result<ForwarderStats> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    serde_json::from_str(&text).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

// ---------------------------------------------------------------------------------------
// The forwarder process.

#[derive(Debug, thiserror::Error)]
pub enum ForwarderError {
    #[error("reading the forwarder's configuration {path}: {source}")]
    Config { path: PathBuf, source: io::Error },
    #[error("opening TUN device {tun}: {source}")]
    Tun { tun: String, source: io::Error },
    #[error("serving counters on {path}: {source}")]
    Socket { path: PathBuf, source: io::Error },
    #[error("direction {name} ({tun}): {source}")]
    Direction {
        name: String,
        tun: String,
        source: io::Error,
    },
}

/// `TUNSETIFF` (`_IOW('T', 202, int)`).
const TUNSETIFF: libc::Ioctl = 0x4004_54ca;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Attaches to the persistent TUN device `name` (IPv4 packets, no packet information),
/// non-blocking.
fn open_tun(name: &str) -> io::Result<OwnedFd> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "bad interface name",
        ));
    }
    // SAFETY: open(2) with a NUL-terminated constant path.
    let fd = unsafe {
        libc::open(
            c"/dev/net/tun".as_ptr(),
            libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: open just returned this fd; we own it.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TUN | libc::IFF_NO_PI) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq` (40 bytes, as IfReq) that lives
    // for the duration of the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

/// Runs the forwarder until killed: one thread per direction, the counters served on the
/// configured socket (bound once every TUN device is open: a connection that answers means
/// the forwarder is ready).
pub fn run_forwarder(config: &Path) -> Result<(), ForwarderError> {
    let cfg: ForwarderConfig = std::fs::read(config)
        .and_then(|b| {
            serde_json::from_slice(&b).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
        })
        .map_err(|source| ForwarderError::Config {
            path: config.to_owned(),
            source,
        })?;
    let mut fds = Vec::new();
    for d in &cfg.directions {
        let fd = open_tun(&d.tun).map_err(|source| ForwarderError::Tun {
            tun: d.tun.clone(),
            source,
        })?;
        fds.push(fd);
    }
    let counters: Vec<Arc<Counters>> = cfg
        .directions
        .iter()
        .map(|_| Arc::new(Counters::default()))
        .collect();
    let (tx, rx) = std::sync::mpsc::channel::<ForwarderError>();
    for ((d, fd), c) in cfg.directions.iter().zip(fds).zip(&counters) {
        let spawn_failed = |source| ForwarderError::Direction {
            name: d.name.clone(),
            tun: d.tun.clone(),
            source,
        };
        let (d, c, tx) = (d.clone(), Arc::clone(c), tx.clone());
        let seed = d.seed.unwrap_or_else(random_seed);
        std::thread::Builder::new()
            .name(format!("wan {}", d.tun))
            .spawn(move || {
                tracing::info!(
                    direction = %d.name, tun = %d.tun, delay_us = d.delay_us,
                    jitter_us = d.jitter_us, loss = d.loss, rate_bps = d.rate_bps,
                    queue_bytes = d.queue_bytes, "forwarding"
                );
                if let Err(source) = forward(&d, &fd, &c, seed) {
                    let _ = tx.send(ForwarderError::Direction {
                        name: d.name.clone(),
                        tun: d.tun.clone(),
                        source,
                    });
                }
            })
            .map_err(spawn_failed)?;
    }
    let path = cfg.stats_socket.clone();
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).map_err(|source| ForwarderError::Socket {
        path: path.clone(),
        source,
    })?;
    let dirs = cfg.directions.clone();
    std::thread::Builder::new()
        .name("wan stats".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut s) = stream else { continue };
                // This process lives in the router's namespace: its /proc/self/net is the
                // router's.
                let dev = std::fs::read_to_string("/proc/self/net/dev").unwrap_or_default();
                let stats = ForwarderStats {
                    pid: std::process::id(),
                    directions: dirs
                        .iter()
                        .zip(&counters)
                        .map(|(d, c)| c.snapshot(d, tx_dropped(&dev, &d.tun).unwrap_or(0)))
                        .collect(),
                };
                let text = serde_json::to_string(&stats).expect("counters serialise");
                let _ = s.write_all(text.as_bytes());
            }
        })
        .map_err(|source| ForwarderError::Socket {
            path: path.clone(),
            source,
        })?;
    tracing::info!(directions = cfg.directions.len(), socket = %path.display(), "wan forwarder ready");
    // A direction that fails ends the process (its link would be silently cut otherwise).
    match rx.recv() {
        Ok(e) => Err(e),
        Err(_) => Ok(()),
    }
}

fn random_seed() -> u64 {
    let mut b = [0u8; 8];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .is_err()
    {
        return std::process::id() as u64 ^ Instant::now().elapsed().as_nanos() as u64;
    }
    u64::from_le_bytes(b)
}

/// Real-time scheduling for this thread ([`RT_PRIORITY`], SCHED_FIFO), so that a busy machine
/// does not delay its wake-ups: it only ever blocks (in ppoll) or forwards what is due. Without
/// the privilege the thread stays as it is (and says so).
fn realtime(d: &ForwardDirection) {
    let param = libc::sched_param {
        sched_priority: RT_PRIORITY,
    };
    // SAFETY: sched_setscheduler(2) on the calling thread (0) with a valid sched_param.
    if unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) } != 0 {
        let e = io::Error::last_os_error();
        tracing::warn!(direction = %d.name, error = %e, "no real-time scheduling: delays will vary more on a busy machine");
    }
}

/// One direction: read, draw the loss, hold, write back when due.
fn forward(d: &ForwardDirection, fd: &OwnedFd, c: &Counters, seed: u64) -> io::Result<()> {
    // Wake-ups within 1 µs of the timer (the default slack is 50 µs).
    // SAFETY: prctl(2) with PR_SET_TIMERSLACK and a plain integer.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1000u64) };
    realtime(d);
    let base = Instant::now();
    let now_ns = || base.elapsed().as_nanos() as u64;
    let line = d
        .rate_bps
        .map(|r| Line::new(r, d.queue_bytes.unwrap_or(MIN_QUEUE_BYTES)));
    let mut sched = Schedule::new(
        Duration::from_micros(d.delay_us),
        Duration::from_micros(d.jitter_us),
        d.loss,
        line,
        seed,
    );
    let mut held: VecDeque<(u64, Vec<u8>)> = VecDeque::new();
    let mut held_bytes: u64 = 0;
    let mut pool: Vec<Vec<u8>> = Vec::new();
    let mut buf = vec![0u8; 65536];
    let raw = fd.as_raw_fd();
    loop {
        // Release what is due.
        let now = now_ns();
        while held.front().is_some_and(|(r, _)| *r <= now) {
            let (due, pkt) = held.pop_front().expect("front exists");
            let late = now - due;
            c.late_ns_total.fetch_add(late, Ordering::Relaxed);
            if late > c.late_ns_max.load(Ordering::Relaxed) {
                c.late_ns_max.store(late, Ordering::Relaxed);
            }
            if late > 1_000_000 {
                c.late_over_1ms.fetch_add(1, Ordering::Relaxed);
            }
            // SAFETY: write(2) from a live buffer of pkt.len() bytes.
            let n = unsafe { libc::write(raw, pkt.as_ptr().cast(), pkt.len()) };
            if n < 0 {
                c.write_errors.fetch_add(1, Ordering::Relaxed);
            } else {
                c.tx_packets.fetch_add(1, Ordering::Relaxed);
                c.tx_bytes.fetch_add(pkt.len() as u64, Ordering::Relaxed);
            }
            held_bytes -= pkt.len() as u64;
            pool.push(pkt);
        }
        c.held_bytes.store(held_bytes, Ordering::Relaxed);

        // Sleep until a packet comes or the next one is due.
        let timeout = held.front().map(|(r, _)| {
            let left = r.saturating_sub(now_ns());
            libc::timespec {
                tv_sec: (left / 1_000_000_000) as libc::time_t,
                tv_nsec: (left % 1_000_000_000) as libc::c_long,
            }
        });
        let mut pfd = libc::pollfd {
            fd: raw,
            events: libc::POLLIN,
            revents: 0,
        };
        let ts = timeout.as_ref().map_or(std::ptr::null(), |t| t as *const _);
        // SAFETY: one valid pollfd, an optional timespec that outlives the call, no sigmask.
        let rc = unsafe { libc::ppoll(&mut pfd, 1, ts, std::ptr::null()) };
        if rc < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if rc == 0 {
            continue;
        }

        // Read what is there (a bounded batch, so releases are not starved).
        for _ in 0..256 {
            // SAFETY: read(2) into a live buffer of buf.len() bytes.
            let n = unsafe { libc::read(raw, buf.as_mut_ptr().cast(), buf.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::WouldBlock => break,
                    io::ErrorKind::Interrupted => continue,
                    _ => return Err(e),
                }
            }
            let n = n as usize;
            if n == 0 {
                break;
            }
            let t = now_ns();
            c.rx_packets.fetch_add(1, Ordering::Relaxed);
            c.rx_bytes.fetch_add(n as u64, Ordering::Relaxed);
            if held_bytes + n as u64 > d.max_held_bytes {
                c.overflow_packets.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let release = match sched.admit(t, n) {
                Fate::Release(r) => r,
                Fate::QueueFull => {
                    c.queue_drops.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                Fate::Lost => {
                    c.lost_packets.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            };
            let mut pkt = pool.pop().unwrap_or_else(|| Vec::with_capacity(2048));
            pkt.clear();
            pkt.extend_from_slice(&buf[..n]);
            held_bytes += n as u64;
            held.push_back((release, pkt));
        }
        c.held_bytes.store(held_bytes, Ordering::Relaxed);
        if held_bytes > c.held_bytes_peak.load(Ordering::Relaxed) {
            c.held_bytes_peak.store(held_bytes, Ordering::Relaxed);
        }
    }
}

/// One direction of a lab's link: what it is and what its forwarder counted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DirectionStats {
    #[serde(flatten)]
    pub plan: DirectionPlan,
    pub forwarder: DirectionCounters,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::Topology;

    const TOPO: &str = r#"
[[clouds]]
name = "a"
subnet = "198.18.1.0/24"
[[clouds]]
name = "b"
subnet = "198.18.2.0/24"
[[clouds]]
name = "c"
subnet = "198.18.3.0/24"
[[hosts]]
name = "a1"
cloud = "a"
[[hosts]]
name = "b1"
cloud = "b"
[[links]]
between = ["a", "b"]
profile = "wan"
[[links]]
between = ["c", "b"]
delay_ms = 1.5
"#;

    fn topo() -> LabTopology {
        Topology::parse(TOPO).unwrap().resolve().unwrap()
    }

    /// Release times of packets of `len` bytes arriving every `gap` ns for `span` ns.
    fn stream(s: &mut Schedule, len: usize, gap: u64, span: u64) -> Vec<(u64, Fate)> {
        (0..span / gap)
            .map(|i| (i * gap, s.admit(i * gap, len)))
            .collect()
    }

    #[test]
    fn plan_has_both_directions_of_every_link() {
        let p = plan(&topo());
        let got: Vec<_> = p
            .iter()
            .map(|d| (d.name(), d.tun.as_str(), d.table, d.from_bridge.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("a→b".to_owned(), "wl0-0", 1000, "br-a"),
                ("b→a".to_owned(), "wl0-1", 1001, "br-b"),
                ("c→b".to_owned(), "wl1-0", 1002, "br-c"),
                ("b→c".to_owned(), "wl1-1", 1003, "br-b"),
            ]
        );
        assert_eq!(p[1].to_subnet.to_string(), "198.18.1.0/24");
        // wan: 200 Mbit/s = 25 MB/s; one round trip (60 ms) of buffer.
        assert_eq!(p[0].queue_bytes, Some(1_500_000));
        assert_eq!((p[2].rate_mbit, p[2].queue_bytes), (None, None));
        for d in &p {
            assert!(d.tun.len() < libc::IFNAMSIZ);
        }
    }

    #[test]
    fn batch_routes_only_cross_cloud_traffic_into_the_tun_devices() {
        let p = plan(&topo());
        let ip = ip_batch(&p);
        assert!(ip.contains("tuntap add dev wl0-0 mode tun\n"), "{ip}");
        assert!(
            ip.contains("link set dev wl0-0 txqueuelen 10000 up\n"),
            "{ip}"
        );
        assert!(
            ip.contains("rule add pref 1000 iif br-a to 198.18.2.0/24 table 1000\n"),
            "{ip}"
        );
        assert!(
            ip.contains("route add 198.18.2.0/24 dev wl0-0 table 1000\n"),
            "{ip}"
        );
        assert!(
            ip.contains("rule add pref 1003 iif br-b to 198.18.3.0/24 table 1003\n"),
            "{ip}"
        );
        assert_eq!(ip.matches("rule add").count(), 4);
        let cfg = forwarder_config(&p, "/x/wan.sock".into());
        let d = &cfg.directions[0];
        assert_eq!((d.delay_us, d.jitter_us, d.loss), (30_000, 2_000, 0.0001));
        assert_eq!(
            (d.rate_bps, d.queue_bytes),
            (Some(200_000_000), Some(1_500_000))
        );
        assert_eq!(cfg.directions[2].delay_us, 1_500);
        assert_eq!(cfg.directions[2].rate_bps, None);
        assert_eq!(cfg.directions[3].name, "b→c");
        let back: ForwarderConfig =
            serde_json::from_str(&serde_json::to_string(&cfg).unwrap()).unwrap();
        assert_eq!(back, cfg);
    }

    #[test]
    fn loss_draws_follow_the_probability() {
        let mut r = Rng::new(7);
        let n = 1_000_000;
        let lost = (0..n).filter(|_| r.lose(0.01)).count() as f64;
        assert!((lost / n as f64 - 0.01).abs() < 0.001, "{lost}");
        assert!(!(0..1000).any(|_| r.lose(0.0)));
        assert!((0..1000).all(|_| r.lose(1.0)));
        let mean = (0..100_000).map(|_| r.next_f64()).sum::<f64>() / 1e5;
        assert!((mean - 0.5).abs() < 0.01, "{mean}");
        // Through a schedule: about 1 % of a stream is lost, the rest released.
        let mut s = Schedule::new(Duration::from_millis(1), Duration::ZERO, 0.01, None, 3);
        let fates = stream(&mut s, 100, 1000, 100_000_000);
        let lost = fates.iter().filter(|(_, f)| *f == Fate::Lost).count();
        assert!((800..1200).contains(&lost), "{lost} of {}", fates.len());
    }

    /// Release times: never before arrival + delay − jitter nor after arrival + delay +
    /// jitter, always in arrival order, mean delay as configured.
    #[test]
    fn schedule_keeps_order_and_bounds_and_the_mean() {
        let delay = Duration::from_millis(30);
        let jitter = Duration::from_millis(2);
        let mut s = Schedule::new(delay, jitter, 0.0, None, 42);
        let (d, j) = (30_000_000f64, 2_000_000f64);
        let mut last = 0;
        let mut sum = 0.0;
        let mut sumsq = 0.0;
        let mut n = 0.0;
        // Back-to-back packets every 50 µs for 20 s (a 240 Mbit/s stream).
        let mut t: u64 = 0;
        while t < 20_000_000_000 {
            let Fate::Release(r) = s.admit(t, 1500) else {
                panic!("dropped without loss or rate")
            };
            assert!(r >= last, "reordered at t={t}");
            let delay_ns = (r - t) as f64;
            assert!(
                delay_ns >= d - j - 1.0 && delay_ns <= d + j + 1.0,
                "delay {delay_ns} at t={t}"
            );
            sum += delay_ns;
            sumsq += delay_ns * delay_ns;
            n += 1.0;
            last = r;
            t += 50_000;
        }
        let mean = sum / n;
        let sd = (sumsq / n - mean * mean).sqrt();
        assert!((mean - d).abs() < 0.05 * j, "mean {mean}");
        // Piecewise linear between uniform points: sd = amp × √(2/9) ≈ 0.47 amp.
        assert!((sd / j - (2.0f64 / 9.0).sqrt()).abs() < 0.05, "sd {sd}");
        // After a long idle time the curve goes on (no catch-up loop, still bounded).
        let t = t + 1_000_000_000_000;
        let Fate::Release(r) = s.admit(t, 1500) else {
            panic!()
        };
        let delay_ns = (r - t) as f64;
        assert!(delay_ns >= d - j - 1.0 && delay_ns <= d + j + 1.0);
    }

    #[test]
    fn no_jitter_means_an_exact_delay() {
        let mut s = Schedule::new(Duration::from_millis(5), Duration::ZERO, 0.0, None, 1);
        for t in [0u64, 10, 1_000_000, 7_000_000_000] {
            assert_eq!(s.admit(t, 1500), Fate::Release(t + 5_000_000));
        }
        assert_eq!(jitter_period(Duration::ZERO), MIN_JITTER_PERIOD);
        assert_eq!(
            jitter_period(Duration::from_millis(5)),
            Duration::from_millis(20)
        );
    }

    /// The line delivers exactly its rate when offered more, drops what does not fit in its
    /// buffer, and holds a packet no longer than the buffer takes to drain plus the delay.
    #[test]
    fn the_line_delivers_its_rate_and_drops_what_its_buffer_cannot_hold() {
        // 100 Mbit/s = 12.5 bytes/µs; a 1250-byte packet takes 100 µs; 10 ms of buffer.
        let line = Line::new(100_000_000, 12_500 * 10);
        let mut s = Schedule::new(
            Duration::from_millis(10),
            Duration::ZERO,
            0.0,
            Some(line),
            5,
        );
        // A packet alone: 100 µs on the line, then the delay.
        assert_eq!(s.admit(0, 1250), Fate::Release(10_100_000));
        // 1 s offered at twice the rate (a 1250-byte packet every 50 µs).
        let start = 1_000_000_000u64;
        let fates: Vec<(u64, Fate)> = (0..20_000u64)
            .map(|i| {
                let t = start + i * 50_000;
                (t, s.admit(t, 1250))
            })
            .collect();
        let released: Vec<(u64, u64)> = fates
            .iter()
            .filter_map(|(t, f)| match f {
                Fate::Release(r) => Some((*t, *r)),
                _ => None,
            })
            .collect();
        let full = fates.iter().filter(|(_, f)| *f == Fate::QueueFull).count();
        // Half gets through (plus the buffer's worth), the rest is dropped at the buffer.
        assert!(
            (10_000..=10_110).contains(&released.len()),
            "{}",
            released.len()
        );
        assert_eq!(full + released.len(), 20_000);
        // Back-to-back on the line: successive releases exactly 100 µs apart once queued.
        for w in released.windows(2).skip(200) {
            assert_eq!(w[1].1 - w[0].1, 100_000, "{w:?}");
        }
        // Nobody waits longer than the buffer (10 ms) plus its own 100 µs plus the delay.
        for (t, r) in &released {
            assert!(r - t <= 10_000_000 + 100_000 + 10_000_000 + 1, "{t} {r}");
        }
        // Idle again: no backlog left.
        let t = start + 10_000_000_000;
        assert_eq!(s.admit(t, 1250), Fate::Release(t + 10_100_000));
    }

    #[test]
    fn tun_drops_come_from_proc_net_dev() {
        let dev = "Inter-|   Receive                                                |  Transmit\n \
             face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n\
                 lo:       0       0    0    0    0     0          0         0        0       0    0    0    0     0       0          0\n\
              wl0-0: 3010288  205791    0    0    0     0          0         0  3010288  205791    0   17    0     0       0          0\n";
        assert_eq!(tx_dropped(dev, "wl0-0"), Some(17));
        assert_eq!(tx_dropped(dev, "lo"), Some(0));
        assert_eq!(tx_dropped(dev, "wl0-1"), None);
    }
}
