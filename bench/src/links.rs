//! `ferry-lab bench links` and `ferry-lab links check`: what a lab's shaped links deliver
//! against what they are configured to.
//!
//! For each link, from the first host of `between[0]`'s cloud to the first host of
//! `between[1]`'s (underlay addresses: what crosses the link is the hosts' own traffic):
//! - **RTT**: `ping` every 20 ms. The lab's own path (veths, bridges, the router) is measured
//!   first, as the RTT to the far cloud's router address (not shaped: the router answers it
//!   itself); the expected RTT is 2 × delay plus that. The median is checked (a shared
//!   machine's scheduling makes rare outliers; the mean, min, p99 and max are reported), and
//!   the spread (the interquartile range / 1.349, robust to those outliers) against the
//!   jitter curve's sd (each direction's extra delay moves linearly between uniform points in
//!   ±jitter: its sd is jitter × √(2/9); two independent directions make the RTT's
//!   jitter × 2/3, and their sum is close to normal);
//! - **rate**: iperf3 UDP offered at 1.25 × the rate; what the link delivered against the
//!   rate: what the server received in its full one-second intervals past the first (the
//!   first holds the start and the link's delay, the last the end and the buffer's drain),
//!   plus what the server's socket dropped (`UdpRcvbufErrors` in its namespace: drops after
//!   the link; its buffer is raised to 4 MB so that there are few). The rate limit counts IP packets,
//!   iperf3 counts payload: the expected figure is the rate × 1400/1428 × (1 − loss);
//! - **loss**: the forwarder's counters over the UDP run (packets read, lost by the draw)
//!   against the configured probability, within 4 standard deviations of the binomial;
//! - **TCP**: one iperf3 flow, reported against the rate's TCP payload (rate × 1448/1500):
//!   not checked, a single flow's throughput is its congestion control's business.
//!
//! Tolerances: [`RTT_TOLERANCE`] with [`RTT_FLOOR_MS`], [`sd_tolerance`], [`RATE_TOLERANCE`];
//! loss within 4 standard deviations of the binomial.

use std::{
    fmt::Write as _,
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use clap::Args;
use serde::Serialize;

use ferry_lab::{
    Lab, LabOptions, Link, LinkSpec, Topology, leftovers,
    wan::{DirectionStats, tun_name},
};
use ferry_overlay::netns::command_in;

use crate::{
    BenchError, Progress,
    datapath::measure::{ProcGuard, check_iperf3, listening_in},
    print_report,
    stats::{percentile_of, round_to},
};

/// The RTT's median may be off by this fraction of the expected RTT, or by [`RTT_FLOOR_MS`],
/// whichever is more.
pub const RTT_TOLERANCE: f64 = 0.05;
/// Absolute slack on the RTT's median and sd: the forwarder's own wake-ups (about 0.1 ms per
/// direction) and scheduling on a busy machine.
pub const RTT_FLOOR_MS: f64 = 0.5;
/// The RTT's spread may be off by this fraction of the expected sd (or by [`RTT_FLOOR_MS`]),
/// and by more with few samples: [`sd_tolerance`].
pub const RTT_SD_TOLERANCE: f64 = 0.5;
/// The UDP rate received may be off by this fraction of the expected one.
pub const RATE_TOLERANCE: f64 = 0.05;
/// iperf3's UDP payload (the rate limit sees 28 bytes more per datagram: IP and UDP headers).
pub const UDP_PAYLOAD: u64 = 1400;
/// Echo requests to the far cloud's router (the lab's own path, without the link).
pub const BASE_PINGS: u32 = 20;
/// Interval between echo requests.
pub const PING_INTERVAL: Duration = Duration::from_millis(20);
/// TCP's payload per 1500-byte packet (MSS with timestamps).
const TCP_MSS: f64 = 1448.0;

#[derive(Debug, Clone, Args)]
pub struct CheckArgs {
    /// Echo requests per link (one every 20 ms).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(5..=100_000))]
    pub pings: u32,
    /// Seconds of each iperf3 run (UDP, then TCP; the UDP rate is taken from the server's
    /// full seconds past the first: at least 3); 0: no throughput runs.
    #[arg(long, default_value_t = 5, value_parser = parse_seconds)]
    pub seconds: u64,
    /// Only the link between these two clouds (`A,B`); default: every link.
    #[arg(long, value_name = "A,B")]
    pub link: Option<String>,
}

fn parse_seconds(s: &str) -> Result<u64, String> {
    match s.parse::<u64>() {
        Ok(n) if n == 0 || (3..=600).contains(&n) => Ok(n),
        Ok(n) => Err(format!("{n}: want 0 (no throughput runs) or 3 to 600")),
        Err(e) => Err(e.to_string()),
    }
}

impl Default for CheckArgs {
    fn default() -> Self {
        Self {
            pings: 100,
            seconds: 5,
            link: None,
        }
    }
}

#[derive(Debug, Clone, Args)]
pub struct LinksArgs {
    /// Topology file with `[[links]]`; default: the built-in topology with one link between
    /// clouds a and b of profile `--profile`.
    pub topology: Option<PathBuf>,
    /// The profile of the a–b link without a topology file: lan, wan or intercontinental.
    #[arg(long, default_value = "wan")]
    pub profile: String,
    /// Print exactly one JSON object on stdout instead of the table (progress stays on stderr).
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub check: CheckArgs,
}

/// The whole measurement.
#[derive(Debug, Clone, Serialize)]
pub struct LinksReport {
    pub lab: String,
    pub links: Vec<LinkReport>,
    /// Every checked figure within its tolerance.
    pub ok: bool,
    /// What the lab left behind (the bench tears its lab down; empty for `links check`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub leftovers: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LinkReport {
    /// `a–b`.
    pub link: String,
    /// The hosts measured from and to.
    pub from_host: String,
    pub to_host: String,
    pub configured: Link,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rtt: Option<RttFigures>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub udp: Option<RateFigures>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss: Option<LossFigures>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpFigures>,
    /// Packets dropped over the UDP run, by reason (direction from → to).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drops: Option<Drops>,
    /// The forwarder's own timing error over the throughput runs (direction from → to).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timing: Option<Timing>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    pub ok: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct RttFigures {
    pub pings: u32,
    pub replies: u32,
    /// Median RTT of the lab's own path (to the far cloud's router address, not shaped).
    pub base_ms: f64,
    /// 2 × delay + base.
    pub expected_ms: f64,
    pub p50_ms: f64,
    /// (p50 − expected) / expected.
    pub error: f64,
    pub mean_ms: f64,
    pub min_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub expected_sd_ms: f64,
    /// The spread: the interquartile range / 1.349 (a normal distribution's sd with that
    /// IQR; robust to rare outliers).
    pub sd_ms: f64,
    pub sd_error: Option<f64>,
    pub ok: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct RateFigures {
    pub offered_mbit: f64,
    /// What iperf3's client managed to send.
    pub sent_mbit: f64,
    pub expected_mbit: f64,
    /// What the link delivered: received by the server + dropped by its socket.
    pub measured_mbit: f64,
    /// What the server received (its full intervals past the first, see [`UdpRun`]).
    pub received_mbit: f64,
    /// Datagrams the server's socket dropped (its buffer was full: after the link).
    pub receiver_drops: u64,
    /// (measured − expected) / expected.
    pub error: f64,
    pub ok: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct LossFigures {
    pub configured: f64,
    /// Packets that reached the loss draw (read by the forwarder and not dropped at the
    /// bottleneck's buffer), and those it lost (direction from → to, over the UDP run).
    pub packets: u64,
    pub lost: u64,
    pub measured: f64,
    pub expected_lost: f64,
    /// |lost − expected| allowed: 4 standard deviations of the binomial, plus one packet.
    pub tolerance_packets: f64,
    pub ok: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct TcpFigures {
    pub measured_mbit: f64,
    /// The rate's TCP payload (rate × 1448/1500), if rate-limited.
    pub payload_rate_mbit: Option<f64>,
    /// (measured − payload rate) / payload rate.
    pub error: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Drops {
    /// At the bottleneck's full buffer (UDP is offered above the rate: expected).
    pub queue: u64,
    /// By the kernel before the forwarder read them: it fell behind (should be 0).
    pub ring: u64,
    /// By the forwarder's holding limit (should be 0).
    pub overflow: u64,
    /// Written back but refused by the kernel (should be 0).
    pub write_errors: u64,
}

/// How late the forwarder wrote packets back after their due time, and what it cost.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Timing {
    /// CPU the forwarder used over the throughput runs, in % of one core (the kernel's work
    /// for the packets it writes back — routing, the bridge, the receiver's stack — runs in
    /// its context and is included).
    pub cpu_percent: f64,
    pub packets: u64,
    pub mean_late_us: f64,
    /// The most since the lab came up.
    pub max_late_us: f64,
    pub late_over_1ms: u64,
}

/// Expected RTT sd for a one-way `jitter_ms`: two independent directions, each linear between
/// uniform points in ±jitter (sd jitter × √(2/9)).
pub fn expected_rtt_sd_ms(jitter_ms: f64) -> f64 {
    jitter_ms * (4.0f64 / 9.0).sqrt()
}

/// The UDP payload rate the link should deliver (Mbit/s).
pub fn expected_udp_mbit(rate_mbit: f64, loss: f64) -> f64 {
    rate_mbit * UDP_PAYLOAD as f64 / (UDP_PAYLOAD + 28) as f64 * (1.0 - loss)
}

/// RTTs (ms) from `ping -n` output, one per reply.
pub fn parse_ping(out: &str) -> Vec<f64> {
    out.lines()
        .filter_map(|l| {
            let rest = &l[l.find("time=")? + 5..];
            rest.split_whitespace().next()?.parse().ok()
        })
        .collect()
}

/// The relative tolerance on the spread of `n` samples: [`RTT_SD_TOLERANCE`], or 3 standard
/// errors of the IQR-based estimate (1.17 / √n of a normal distribution's sd) when that is
/// more (fewer than about 50 samples).
pub fn sd_tolerance(n: usize) -> f64 {
    RTT_SD_TOLERANCE.max(3.0 * 1.17 / (n.max(1) as f64).sqrt())
}

/// The interquartile range of a normal distribution, in standard deviations.
const IQR_PER_SD: f64 = 1.349;

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// The RTT figures of `samples` for a link with `delay_ms` / `jitter_ms` on a path whose
/// own RTT is `base_ms`.
pub fn rtt_figures(
    pings: u32,
    samples: &[f64],
    base_ms: f64,
    delay_ms: f64,
    jitter_ms: f64,
) -> RttFigures {
    let expected = 2.0 * delay_ms + base_ms;
    let expected_sd = expected_rtt_sd_ms(jitter_ms);
    let p = |q: f64| percentile_of(samples, q).unwrap_or(f64::NAN);
    let mean = if samples.is_empty() {
        f64::NAN
    } else {
        mean(samples)
    };
    // The spread as the sd of a normal distribution with the same interquartile range: a
    // busy machine's rare late wake-ups do not move it (the sum of the two directions' jitter
    // is close to normal: its IQR / 1.349 is within a few % of its sd).
    let sd = (p(75.0) - p(25.0)) / IQR_PER_SD;
    let p99 = p(99.0);
    let p50 = p(50.0);
    let p50_ok = (p50 - expected).abs() <= (RTT_TOLERANCE * expected).max(RTT_FLOOR_MS);
    let sd_ok =
        (sd - expected_sd).abs() <= (sd_tolerance(samples.len()) * expected_sd).max(RTT_FLOOR_MS);
    RttFigures {
        pings,
        replies: samples.len() as u32,
        base_ms: round_to(base_ms, 3),
        expected_ms: round_to(expected, 3),
        p50_ms: p50,
        error: round_to(rel(p50, expected), 4),
        mean_ms: round_to(mean, 3),
        min_ms: p(0.0),
        p99_ms: p99,
        max_ms: p(100.0),
        expected_sd_ms: round_to(expected_sd, 3),
        sd_ms: round_to(sd, 3),
        sd_error: (expected_sd > 0.0).then(|| round_to(rel(sd, expected_sd), 4)),
        ok: !samples.is_empty() && p50_ok && sd_ok,
    }
}

/// (measured − expected) / expected; 0 when both are 0.
fn rel(measured: f64, expected: f64) -> f64 {
    if expected == 0.0 {
        if measured == 0.0 { 0.0 } else { f64::INFINITY }
    } else {
        (measured - expected) / expected
    }
}

/// The loss figures for `lost` of `packets` at probability `p`.
pub fn loss_figures(p: f64, packets: u64, lost: u64) -> LossFigures {
    let n = packets as f64;
    let expected = n * p;
    let tolerance = 4.0 * (n * p * (1.0 - p)).sqrt() + 1.0;
    LossFigures {
        configured: p,
        packets,
        lost,
        measured: if packets == 0 { 0.0 } else { lost as f64 / n },
        expected_lost: round_to(expected, 2),
        tolerance_packets: round_to(tolerance, 2),
        ok: (lost as f64 - expected).abs() <= tolerance,
    }
}

/// Measures every link of `lab` (or the one `args.link` names).
pub fn check(lab: &Lab, args: &CheckArgs) -> Result<LinksReport, BenchError> {
    let p = Progress(Instant::now());
    if args.seconds > 0 {
        check_iperf3()?;
    }
    let wanted: Option<(String, String)> = match &args.link {
        None => None,
        Some(s) => {
            let mut it = s.split(',').map(str::trim);
            match (it.next(), it.next(), it.next()) {
                (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() => {
                    Some((a.to_owned(), b.to_owned()))
                }
                _ => {
                    return Err(BenchError::failed(format!(
                        "--link {s:?}: want two cloud names, e.g. --link a,b"
                    )));
                }
            }
        }
    };
    let links: Vec<(usize, Link)> = lab
        .links()
        .iter()
        .cloned()
        .enumerate()
        .filter(|(_, l)| wanted.as_ref().is_none_or(|(a, b)| l.joins(a, b)))
        .collect();
    if links.is_empty() {
        return Err(BenchError::failed(match wanted {
            Some((a, b)) => format!("lab {} has no link between {a} and {b}", lab.prefix()),
            None => format!(
                "lab {} has no shaped links (its topology has no [[links]])",
                lab.prefix()
            ),
        }));
    }
    let mut reports = Vec::new();
    for (k, link) in links {
        p.say(format!("link {}: measuring", link.name()));
        let r = check_link(lab, k, &link, args, &p);
        if let Some(e) = &r.error {
            p.say(format!("link {}: FAILED: {e}", link.name()));
        }
        reports.push(r);
    }
    Ok(LinksReport {
        lab: lab.prefix().to_owned(),
        ok: reports.iter().all(|r| r.ok),
        links: reports,
        leftovers: Vec::new(),
    })
}

fn first_host(lab: &Lab, cloud: &str) -> Option<String> {
    lab.topology()
        .hosts
        .iter()
        .find(|h| h.cloud == cloud)
        .map(|h| h.name.clone())
}

fn check_link(lab: &Lab, k: usize, link: &Link, args: &CheckArgs, p: &Progress) -> LinkReport {
    let mut r = LinkReport {
        link: link.name(),
        from_host: String::new(),
        to_host: String::new(),
        configured: link.clone(),
        rtt: None,
        udp: None,
        loss: None,
        tcp: None,
        drops: None,
        timing: None,
        error: None,
        ok: false,
    };
    let (Some(from), Some(to)) = (
        first_host(lab, &link.between[0]),
        first_host(lab, &link.between[1]),
    ) else {
        r.error = Some(format!(
            "clouds {} and {} need a host each to be measured",
            link.between[0], link.between[1]
        ));
        return r;
    };
    r.from_host = from.clone();
    r.to_host = to.clone();
    match measure_link(lab, k, link, &from, &to, args, p, &mut r) {
        Ok(()) => {
            r.ok = r.rtt.as_ref().is_some_and(|x| x.ok)
                && r.udp.as_ref().is_none_or(|x| x.ok)
                && r.loss.as_ref().is_none_or(|x| x.ok)
                && r.drops
                    .as_ref()
                    .is_none_or(|d| d.ring == 0 && d.overflow == 0 && d.write_errors == 0);
        }
        Err(e) => r.error = Some(e.to_string()),
    }
    r
}

#[allow(clippy::too_many_arguments)]
fn measure_link(
    lab: &Lab,
    k: usize,
    link: &Link,
    from: &str,
    to: &str,
    args: &CheckArgs,
    p: &Progress,
    r: &mut LinkReport,
) -> Result<(), BenchError> {
    let to_ip = lab
        .host(to)
        .ok_or_else(|| BenchError::failed(format!("no host {to}")))?
        .address
        .to_string();

    // RTT: the lab's own path first (the far cloud's router address: not shaped), then
    // across the link.
    let router_ip = lab
        .topology()
        .cloud(&link.between[1])
        .ok_or_else(|| BenchError::failed(format!("no cloud {}", link.between[1])))?
        .router
        .to_string();
    let base = ping(lab, from, &router_ip, BASE_PINGS, 0.0)?;
    let base_ms = percentile_of(&base, 50.0).unwrap_or(0.0);
    p.say(format!(
        "  {from} → {to}: {} pings (the lab's own path: {base_ms:.3} ms)",
        args.pings
    ));
    let samples = ping(lab, from, &to_ip, args.pings, link.delay_ms)?;
    r.rtt = Some(rtt_figures(
        args.pings,
        &samples,
        base_ms,
        link.delay_ms,
        link.jitter_ms,
    ));
    if args.seconds == 0 {
        return Ok(());
    }

    // UDP above the rate: what arrives, and the loss draws on the way.
    let tun = tun_name(k, 0);
    let forwarder_pid = lab
        .forwarder_pid()?
        .ok_or_else(|| BenchError::failed("the lab has no links' forwarder"))?;
    let cpu = || {
        ferry_lab::procs::cpu_seconds(forwarder_pid)
            .map_err(|e| BenchError::io("reading the forwarder's CPU time", e))
    };
    let (cpu0, t0) = (cpu()?, Instant::now());
    let before = direction_stats(lab, &tun)?;
    let seconds = Duration::from_secs(args.seconds);
    let port = 5301 + 2 * k as u16;
    if let Some(rate) = link.rate_mbit {
        let offered = rate * 1.25;
        p.say(format!(
            "  {from} → {to}: UDP at {offered:.1} Mbit/s for {} s",
            args.seconds
        ));
        let rcvbuf_before = udp_rcvbuf_errors(lab, to)?;
        let json = iperf3(
            lab,
            from,
            to,
            &to_ip,
            port,
            &[
                "-u",
                "-b",
                &format!("{}", (offered * 1e6).round() as u64),
                "-l",
                &UDP_PAYLOAD.to_string(),
                // The server's socket buffer (up to net.core.rmem_max): so that a busy
                // machine's scheduling does not drop datagrams after the link.
                "-w",
                "4M",
                "--get-server-output",
            ],
            seconds,
        )?;
        let receiver_drops = udp_rcvbuf_errors(lab, to)?.saturating_sub(rcvbuf_before);
        let u = parse_udp(&json)?;
        let received = u.steady_mbit;
        let measured = u.delivered_mbit(receiver_drops);
        let expected = expected_udp_mbit(rate, link.loss);
        let error = rel(measured, expected);
        r.udp = Some(RateFigures {
            offered_mbit: round_to(offered, 2),
            sent_mbit: round_to(u.sent_mbit, 2),
            expected_mbit: round_to(expected, 2),
            measured_mbit: round_to(measured, 2),
            received_mbit: round_to(received, 2),
            receiver_drops,
            error: round_to(error, 4),
            ok: error.abs() <= RATE_TOLERANCE,
        });
    } else {
        // No rate limit: a modest UDP stream only to count the loss draws.
        p.say(format!(
            "  {from} → {to}: UDP at 50 Mbit/s for {} s (no rate limit: loss only)",
            args.seconds
        ));
        iperf3(
            lab,
            from,
            to,
            &to_ip,
            port,
            &["-u", "-b", "50000000", "-l", &UDP_PAYLOAD.to_string()],
            seconds,
        )?;
    }
    let after = direction_stats(lab, &tun)?;
    let (a, b) = (&after.forwarder, &before.forwarder);
    // The loss draw comes after the buffer: packets the buffer dropped never reached it.
    let drawn = (a.rx_packets - b.rx_packets)
        - (a.queue_drops - b.queue_drops)
        - (a.overflow_packets - b.overflow_packets);
    r.loss = Some(loss_figures(
        link.loss,
        drawn,
        a.lost_packets - b.lost_packets,
    ));
    r.drops = Some(Drops {
        queue: a.queue_drops - b.queue_drops,
        ring: a.ring_drops - b.ring_drops,
        overflow: a.overflow_packets - b.overflow_packets,
        write_errors: a.write_errors - b.write_errors,
    });

    // One TCP flow.
    p.say(format!(
        "  {from} → {to}: one TCP flow for {} s",
        args.seconds
    ));
    let json = iperf3(lab, from, to, &to_ip, port + 1, &[], seconds)?;
    let end = direction_stats(lab, &tun)?;
    let cpu_percent = (cpu()? - cpu0) / t0.elapsed().as_secs_f64() * 100.0;
    let (e, b) = (&end.forwarder, &before.forwarder);
    let packets = e.tx_packets - b.tx_packets;
    r.timing = Some(Timing {
        cpu_percent: round_to(cpu_percent, 1),
        packets,
        mean_late_us: if packets == 0 {
            0.0
        } else {
            round_to(
                (e.late_ns_total - b.late_ns_total) as f64 / packets as f64 / 1e3,
                1,
            )
        },
        max_late_us: round_to(e.late_ns_max as f64 / 1e3, 1),
        late_over_1ms: e.late_over_1ms - b.late_over_1ms,
    });
    let measured = crate::datapath::measure::parse_iperf3(&json)
        .map_err(|e| BenchError::failed(format!("TCP: {e}")))?
        / 1e6;
    let payload_rate = link.rate_mbit.map(|r| r * TCP_MSS / 1500.0);
    r.tcp = Some(TcpFigures {
        measured_mbit: round_to(measured, 2),
        payload_rate_mbit: payload_rate.map(|x| round_to(x, 2)),
        error: payload_rate.map(|x| round_to(rel(measured, x), 4)),
    });
    Ok(())
}

fn direction_stats(lab: &Lab, tun: &str) -> Result<DirectionStats, BenchError> {
    lab.link_stats()?
        .into_iter()
        .find(|s| s.plan.tun == tun)
        .ok_or_else(|| BenchError::failed(format!("no counters for {tun}")))
}

/// A UDP run as iperf3 reports it (the client's JSON with the server's output).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UdpRun {
    /// What the client sent.
    pub sent_mbit: f64,
    /// What the server received in its full one-second intervals after the first (which
    /// holds the link's delay and the start) and before the last (partial: the end and the
    /// buffer's drain).
    pub steady_mbit: f64,
    /// How many seconds that covers.
    pub steady_seconds: f64,
    /// The server's whole run.
    pub server_seconds: f64,
}

impl UdpRun {
    /// What reached the server's host: received, plus `socket_drops` datagrams its socket
    /// dropped (spread over the server's run).
    pub fn delivered_mbit(&self, socket_drops: u64) -> f64 {
        self.steady_mbit
            + socket_drops as f64 * UDP_PAYLOAD as f64 * 8.0 / self.server_seconds / 1e6
    }
}

/// The figures of a UDP run from `iperf3 -c ... -u -J --get-server-output`.
pub fn parse_udp(json: &str) -> Result<UdpRun, BenchError> {
    let v: serde_json::Value = serde_json::from_str(json)
        .map_err(|e| BenchError::failed(format!("iperf3's output is not JSON: {e}")))?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        return Err(BenchError::failed(format!("iperf3: {e}")));
    }
    let server = v.get("server_output_json").ok_or_else(|| {
        BenchError::failed("iperf3's JSON has no server_output_json (--get-server-output)")
    })?;
    let intervals: Vec<(f64, f64)> = server["intervals"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|i| {
                    let s = &i["sum"];
                    Some((s["bits_per_second"].as_f64()?, s["seconds"].as_f64()?))
                })
                .collect()
        })
        .unwrap_or_default();
    let steady: Vec<(f64, f64)> = match intervals.len() {
        0..=2 => Vec::new(),
        n => intervals[1..n - 1]
            .iter()
            .copied()
            .filter(|(_, secs)| *secs >= 0.5)
            .collect(),
    };
    let steady_seconds: f64 = steady.iter().map(|(_, s)| s).sum();
    if steady_seconds <= 0.0 {
        return Err(BenchError::failed(format!(
            "iperf3's server reported no full interval past the first ({} intervals): run at least 3 s",
            intervals.len()
        )));
    }
    Ok(UdpRun {
        sent_mbit: v
            .pointer("/end/sum_sent/bits_per_second")
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(0.0)
            / 1e6,
        steady_mbit: steady.iter().map(|(b, s)| b * s).sum::<f64>() / steady_seconds / 1e6,
        steady_seconds,
        server_seconds: server
            .pointer("/end/sum/seconds")
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(steady_seconds)
            .max(steady_seconds),
    })
}

/// `RcvbufErrors` of the `Udp:` lines of /proc/net/snmp.
pub fn parse_rcvbuf_errors(snmp: &str) -> Option<u64> {
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (udp.next()?, udp.next()?);
    let i = names.split_whitespace().position(|n| n == "RcvbufErrors")?;
    values.split_whitespace().nth(i)?.parse().ok()
}

/// UDP datagrams dropped by full socket buffers in `host`'s namespace so far.
fn udp_rcvbuf_errors(lab: &Lab, host: &str) -> Result<u64, BenchError> {
    let snmp = ferry_overlay::netns::run_in(&lab.netns(host), || {
        std::fs::read_to_string("/proc/thread-self/net/snmp")
    })?
    .map_err(|e| BenchError::io(format!("reading /proc/net/snmp in {host}"), e))?;
    parse_rcvbuf_errors(&snmp).ok_or_else(|| {
        BenchError::failed(format!("no Udp RcvbufErrors in {host}'s /proc/net/snmp"))
    })
}

/// RTTs (ms) of `count` echo requests from `from` to `ip`, every [`PING_INTERVAL`].
fn ping(
    lab: &Lab,
    from: &str,
    ip: &str,
    count: u32,
    delay_ms: f64,
) -> Result<Vec<f64>, BenchError> {
    let deadline = (f64::from(count) * PING_INTERVAL.as_secs_f64() + 4.0 * delay_ms / 1e3 + 10.0)
        .ceil()
        .to_string();
    let out = lab.exec(
        from,
        &[
            "ping",
            "-n",
            "-c",
            &count.to_string(),
            "-i",
            &format!("{:.3}", PING_INTERVAL.as_secs_f64()),
            "-W",
            "5",
            "-w",
            &deadline,
            ip,
        ],
    )?;
    let samples = parse_ping(&String::from_utf8_lossy(&out.stdout));
    if samples.is_empty() {
        return Err(BenchError::failed(format!(
            "no echo reply from {ip} to {from}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(samples)
}

/// Runs `iperf3 -c` on `from` against a one-off server on `to`; returns the client's JSON.
#[allow(clippy::too_many_arguments)]
fn iperf3(
    lab: &Lab,
    from: &str,
    to: &str,
    to_ip: &str,
    port: u16,
    extra: &[&str],
    seconds: Duration,
) -> Result<String, BenchError> {
    let port_s = port.to_string();
    let mut cmd = Command::new("iperf3");
    cmd.args(["-s", "-1", "-J", "-B", to_ip, "-p", &port_s])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    command_in(&mut cmd, &lab.netns(to))?;
    let mut server = ProcGuard::spawn(cmd, format!("iperf3 server on {to} ({to_ip}:{port})"))?;
    let ready = ferry_lab::clock::wait_until(
        Duration::from_secs(5),
        Duration::from_millis(10),
        || -> Result<Option<()>, BenchError> {
            if listening_in(&lab.netns(to), port)? {
                return Ok(Some(()));
            }
            if server
                .wait_until(Instant::now())
                .map_err(|e| BenchError::failed(e.to_string()))?
                .is_some()
            {
                return Err(BenchError::failed(format!(
                    "iperf3 server on {to} exited: {}",
                    server.stderr_after_exit()
                )));
            }
            Ok(None)
        },
    )?;
    if ready.is_none() {
        return Err(BenchError::failed(format!(
            "iperf3 server on {to} ({to_ip}:{port}) did not listen within 5 s"
        )));
    }
    let mut cmd = Command::new("iperf3");
    cmd.args([
        "-c",
        to_ip,
        "-p",
        &port_s,
        "-J",
        "--connect-timeout",
        "5000",
    ])
    .arg("-t")
    .arg(seconds.as_secs().max(1).to_string())
    .args(extra)
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    command_in(&mut cmd, &lab.netns(from))?;
    let mut client = ProcGuard::spawn(cmd, format!("iperf3 client on {from}"))?;
    let (_, stdout, _) = client.output_until(Instant::now() + seconds + Duration::from_secs(20))?;
    let _ = server.wait_until(Instant::now() + Duration::from_secs(2));
    Ok(stdout)
}

/// `ferry-lab bench links`: a lab of its own, every link measured, the lab torn down.
pub fn run(args: &LinksArgs) -> Result<i32, BenchError> {
    let p = Progress(Instant::now());
    let topology = match &args.topology {
        Some(path) => Topology::load(path).map_err(ferry_lab::LabError::from)?,
        None => with_link(Topology::default_lab(), "a", "b", &args.profile)
            .map_err(ferry_lab::LabError::from)?,
    };
    if topology.links.is_empty() {
        return Err(BenchError::failed(
            "the topology has no [[links]]: nothing to measure",
        ));
    }
    p.say("bringing up the lab (no agents)");
    let lab = Lab::up(LabOptions {
        topology,
        start_agents: false,
        ..LabOptions::default()
    })?;
    let prefix = lab.prefix().to_owned();
    p.say(format!(
        "lab {prefix} up in {} ms",
        lab.up_duration().as_millis()
    ));
    let result = check(&lab, &args.check);
    p.say("tearing the lab down");
    let mut code = 0;
    if let Err(e) = lab.down() {
        p.say(format!("teardown: {e}"));
        code = 1;
    }
    let mut report = result?;
    report.leftovers = leftovers(&prefix);
    if !report.leftovers.is_empty() {
        p.say(format!("left behind: {}", report.leftovers.join(", ")));
        code = 1;
    }
    if !report.ok {
        code = 1;
    }
    print(args.json, &report)?;
    Ok(code)
}

/// `t` with a link of profile `profile` between clouds `a` and `b` (checked).
pub fn with_link(
    mut t: Topology,
    a: &str,
    b: &str,
    profile: &str,
) -> Result<Topology, ferry_lab::TopologyError> {
    t.links.push(LinkSpec {
        between: vec![a.to_owned(), b.to_owned()],
        profile: Some(profile.to_owned()),
        delay_ms: None,
        jitter_ms: None,
        loss: None,
        rate_mbit: None,
        queue_ms: None,
    });
    t.resolve()?;
    Ok(t)
}

/// Prints the report: one JSON object with `json`, else the table.
pub fn print(json: bool, report: &LinksReport) -> Result<(), BenchError> {
    print_report(json, report, || report.table())
}

fn pct(x: f64) -> String {
    format!("{:+.1} %", x * 100.0)
}

fn yes(ok: bool) -> &'static str {
    if ok { "ok" } else { "OUT OF TOLERANCE" }
}

impl LinksReport {
    /// The table for people.
    pub fn table(&self) -> String {
        let mut s = String::new();
        for l in &self.links {
            let c = &l.configured;
            let _ = writeln!(
                s,
                "link {} ({}), measured {} → {}",
                l.link,
                c.profile.as_deref().unwrap_or("custom"),
                l.from_host,
                l.to_host
            );
            let _ = writeln!(
                s,
                "  {:<14} {:>16} {:>16} {:>9}",
                "", "configured", "measured", "error"
            );
            if let Some(r) = &l.rtt {
                let _ = writeln!(
                    s,
                    "  {:<14} {:>13.2} ms {:>13.2} ms {:>9}  {} (2 × delay + the lab's own {:.3} ms; mean {:.2}, p99 {:.2}, min {:.2}, max {:.2} ms; {} of {} replies)",
                    "RTT p50",
                    r.expected_ms,
                    r.p50_ms,
                    pct(r.error),
                    yes(r.ok),
                    r.base_ms,
                    r.mean_ms,
                    r.p99_ms,
                    r.min_ms,
                    r.max_ms,
                    r.replies,
                    r.pings
                );
                let _ = writeln!(
                    s,
                    "  {:<14} {:>13.2} ms {:>13.2} ms {:>9}",
                    "RTT sd",
                    r.expected_sd_ms,
                    r.sd_ms,
                    r.sd_error.map(pct).unwrap_or_default(),
                );
            }
            if let Some(u) = &l.udp {
                let _ = writeln!(
                    s,
                    "  {:<14} {:>9.1} Mbit/s {:>9.1} Mbit/s {:>9}  {} (offered {:.1}, sent {:.1}, received {:.1} Mbit/s; {} dropped by the receiver's socket)",
                    "UDP rate",
                    u.expected_mbit,
                    u.measured_mbit,
                    pct(u.error),
                    yes(u.ok),
                    u.offered_mbit,
                    u.sent_mbit,
                    u.received_mbit,
                    u.receiver_drops
                );
            }
            if let Some(x) = &l.loss {
                let _ = writeln!(
                    s,
                    "  {:<14} {:>16.2e} {:>16.2e} {:>9}  {} ({} lost of {}, {:.1} ± {:.1} expected)",
                    "loss",
                    x.configured,
                    x.measured,
                    "",
                    yes(x.ok),
                    x.lost,
                    x.packets,
                    x.expected_lost,
                    x.tolerance_packets
                );
            }
            if let Some(t) = &l.tcp {
                let _ = writeln!(
                    s,
                    "  {:<14} {:>16} {:>9.1} Mbit/s {:>9}  (not checked: one flow's congestion control)",
                    "TCP, 1 flow",
                    t.payload_rate_mbit
                        .map(|r| format!("{r:.1} Mbit/s"))
                        .unwrap_or_else(|| "-".into()),
                    t.measured_mbit,
                    t.error.map(pct).unwrap_or_default(),
                );
            }
            if let Some(d) = &l.drops {
                let _ = writeln!(
                    s,
                    "  drops during the runs: full bottleneck buffer {} (UDP offered above the rate); forwarder behind {}, overflow {}, write errors {} (must be 0)",
                    d.queue, d.ring, d.overflow, d.write_errors
                );
            }
            if let Some(t) = &l.timing {
                let _ = writeln!(
                    s,
                    "  forwarder: packets written back {:.1} µs late on average, at most {:.1} µs; {} of {} more than 1 ms late; CPU {:.0} % of a core",
                    t.mean_late_us, t.max_late_us, t.late_over_1ms, t.packets, t.cpu_percent
                );
            }
            if let Some(e) = &l.error {
                let _ = writeln!(s, "  FAILED: {e}");
            }
        }
        let _ = writeln!(
            s,
            "{}",
            if self.ok {
                "every figure within its tolerance"
            } else {
                "SOME FIGURES OUT OF TOLERANCE"
            }
        );
        s
    }
}

/// `ferry-lab links show`: each direction's properties and counters.
pub fn show_table(links: &[Link], stats: &[DirectionStats]) -> String {
    let mut s = String::new();
    if links.is_empty() {
        s.push_str("no shaped links (the topology has no [[links]])\n");
        return s;
    }
    let _ = writeln!(
        s,
        "{:<16} {:<7} {:>8} {:>9} {:>8} {:>9} {:>10} {:>10} {:>8} {:>8} {:>10} {:>9}",
        "direction",
        "tun",
        "delay ms",
        "jitter ms",
        "loss",
        "rate Mbit",
        "read",
        "queue drop",
        "lost",
        "other",
        "forwarded",
        "held B"
    );
    for d in stats {
        let f = &d.forwarder;
        let _ = writeln!(
            s,
            "{:<16} {:<7} {:>8} {:>9} {:>8} {:>9} {:>10} {:>10} {:>8} {:>8} {:>10} {:>9}",
            d.plan.name(),
            d.plan.tun,
            d.plan.delay_ms,
            d.plan.jitter_ms,
            d.plan.loss,
            d.plan
                .rate_mbit
                .map(|r| r.to_string())
                .unwrap_or_else(|| "-".into()),
            f.rx_packets,
            f.queue_drops,
            f.lost_packets,
            f.ring_drops + f.overflow_packets + f.write_errors,
            f.tx_packets,
            f.held_bytes,
        );
    }
    s.push_str("(other: dropped by the kernel before the forwarder read them, over its holding cap, or refused when written back)\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_output_gives_one_rtt_per_reply() {
        let out = "PING 198.18.2.10 (198.18.2.10) 56(84) bytes of data.\n\
                   64 bytes from 198.18.2.10: icmp_seq=1 ttl=62 time=60.3 ms\n\
                   64 bytes from 198.18.2.10: icmp_seq=2 ttl=62 time=61 ms\n\
                   \n--- 198.18.2.10 ping statistics ---\n\
                   3 packets transmitted, 2 received, 33.3333% packet loss, time 40ms\n\
                   rtt min/avg/max/mdev = 60.300/60.650/61.000/0.350 ms\n";
        assert_eq!(parse_ping(out), [60.3, 61.0]);
        assert!(parse_ping("").is_empty());
    }

    #[test]
    fn rtt_figures_check_median_and_spread() {
        // Evenly spread samples around 60.1 ms, 2.698 ms wide: an IQR of 1.349 ms (sd 1).
        let v: Vec<f64> = (0..101)
            .map(|i| 60.1 + (f64::from(i) - 50.0) / 100.0 * 2.698)
            .collect();
        let f = rtt_figures(101, &v, 0.1, 30.0, 1.5);
        assert_eq!(f.expected_ms, 60.1);
        assert_eq!(f.expected_sd_ms, 1.0);
        assert!(f.ok, "{f:?}");
        assert!(f.error.abs() < 0.02, "{f:?}");
        assert!((f.sd_ms - 1.0).abs() < 0.03, "{f:?}");
        // 10 % slow: out of tolerance.
        let f = rtt_figures(2, &[66.0, 66.0], 0.0, 30.0, 0.0);
        assert!(!f.ok);
        assert_eq!(f.error, 0.1);
        // A tiny delay: the absolute floor applies.
        let f = rtt_figures(2, &[1.2, 1.2], 0.05, 0.5, 0.0);
        assert!(f.ok, "{f:?}");
        // Outliers (5 in 100) move the mean, not the median nor the spread.
        let mut v = vec![60.0; 95];
        v.extend([70.0, 80.0, 90.0, 100.0, 110.0]);
        let f = rtt_figures(100, &v, 0.0, 30.0, 0.0);
        assert!(f.ok, "{f:?}");
        assert_eq!(
            (f.p50_ms, f.sd_ms, f.mean_ms, f.max_ms),
            (60.0, 0.0, 61.5, 110.0)
        );
        // No jitter configured but 2 ms of spread: out of tolerance.
        let v: Vec<f64> = (0..100)
            .map(|i| if i % 2 == 0 { 58.0 } else { 62.0 })
            .collect();
        assert!(!rtt_figures(100, &v, 0.0, 30.0, 0.0).ok);
        // No reply at all.
        assert!(!rtt_figures(3, &[], 0.1, 30.0, 2.0).ok);
        assert_eq!(sd_tolerance(100), RTT_SD_TOLERANCE);
        assert!((sd_tolerance(20) - 0.785).abs() < 0.001);
    }

    #[test]
    fn expected_figures() {
        assert!((expected_rtt_sd_ms(3.0) - 2.0).abs() < 1e-12);
        assert!((expected_udp_mbit(200.0, 0.0) - 196.078).abs() < 0.001);
        assert!((expected_udp_mbit(200.0, 0.5) - 98.039).abs() < 0.001);
    }

    #[test]
    fn loss_within_four_sigma() {
        let f = loss_figures(1e-4, 100_000, 12);
        assert!(f.ok, "{f:?}");
        assert_eq!(f.expected_lost, 10.0);
        assert!(!loss_figures(1e-4, 100_000, 40).ok);
        assert!(loss_figures(0.0, 100_000, 0).ok);
        assert!(!loss_figures(0.0, 100_000, 2).ok);
        assert_eq!(loss_figures(0.0, 0, 0).measured, 0.0);
    }

    #[test]
    fn udp_rate_is_what_reached_the_server_in_steady_state() {
        let json = r#"{"end":{"sum_sent":{"bits_per_second":125e6}},
            "server_output_json":{"end":{"sum":{"seconds":5.0}},"intervals":[
              {"sum":{"bits_per_second":83e6,"seconds":1.0}},
              {"sum":{"bits_per_second":98e6,"seconds":1.0}},
              {"sum":{"bits_per_second":97e6,"seconds":1.0}},
              {"sum":{"bits_per_second":99e6,"seconds":1.0}},
              {"sum":{"bits_per_second":10e6,"seconds":0.3}}]}}"#;
        let u = parse_udp(json).unwrap();
        assert_eq!(u.sent_mbit, 125.0);
        assert!((u.steady_mbit - 98.0).abs() < 1e-9, "{u:?}");
        assert_eq!((u.steady_seconds, u.server_seconds), (3.0, 5.0));
        // 500 datagrams of 1400 bytes dropped by the socket over 5 s: 1.12 Mbit/s more.
        assert!((u.delivered_mbit(500) - 99.12).abs() < 1e-9);
        assert!(parse_udp(r#"{"error":"unable to connect"}"#).is_err());
        assert!(parse_udp(r#"{"end":{}}"#).is_err());
        // Too short a run: no steady interval.
        let short = r#"{"server_output_json":{"intervals":[
              {"sum":{"bits_per_second":83e6,"seconds":1.0}},
              {"sum":{"bits_per_second":10e6,"seconds":0.3}}]}}"#;
        assert!(
            parse_udp(short)
                .unwrap_err()
                .to_string()
                .contains("at least 3 s")
        );
    }

    #[test]
    fn rcvbuf_errors_from_snmp() {
        let snmp = "Ip: Forwarding DefaultTTL\nIp: 1 64\n\
                    Udp: InDatagrams NoPorts InErrors OutDatagrams RcvbufErrors SndbufErrors InCsumErrors IgnoredMulti MemErrors\n\
                    Udp: 104630 0 551 12 551 0 0 0 0\n\
                    UdpLite: InDatagrams NoPorts\nUdpLite: 0 0\n";
        assert_eq!(parse_rcvbuf_errors(snmp), Some(551));
        assert_eq!(parse_rcvbuf_errors("Ip: x\nIp: 1\n"), None);
    }

    #[test]
    fn the_default_bench_topology_has_the_profile_link() {
        let t = with_link(Topology::default_lab(), "a", "b", "intercontinental").unwrap();
        let r = t.resolve().unwrap();
        assert_eq!(r.links.len(), 1);
        assert_eq!(r.links[0].profile.as_deref(), Some("intercontinental"));
        let e = with_link(Topology::default_lab(), "a", "b", "moon")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown profile \"moon\""), "{e}");
    }
}
