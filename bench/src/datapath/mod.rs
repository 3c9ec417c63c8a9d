//! `ferry-lab bench datapath`: TCP throughput and request/response latency between two
//! containers on different hosts of the same cloud (a1 → a2), for ferry's eBPF overlay and two
//! baselines built in the same lab: a kernel-VXLAN + bridge overlay (flannel's vxlan backend)
//! and plain routed veths (Calico-style, no overlay).
//!
//! All modes are measured in one run, interleaved round by round (the order rotates every
//! round), and each mode reports the median of its rounds: the machine is noisy, the ratios
//! between modes are what matters. `ferry_full_map` is ferry's throughput again after its
//! endpoint map was filled with 65 536 entries, measured after the ferry rounds. `ferry_ipv6`
//! is ferry between the same two containers over their IPv6 addresses (the lab is dual-stack),
//! interleaved with the rest.
//!
//! Progress goes to stderr; stdout carries the table, or exactly one JSON object (`--json`).
//! The lab is always torn down (the [`Lab`] handle does it on drop, and its reaper if we die).

pub mod baseline;
pub mod ferry_mode;
pub mod measure;
pub mod report;

use std::{
    net::IpAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use clap::Args;

use ferry_lab::{Lab, LabOptions, Topology, leftovers};
use report::{ModeSamples, Params, Report};

// Children name these as `super::...`.
use crate::{BenchError, Progress, print_report, run_checked};

/// Host of container A (the client side of every measurement).
pub const HOST_A: &str = "a1";
/// Host of container B (the server side); same cloud as [`HOST_A`], another host.
pub const HOST_B: &str = "a2";
/// The bench lab's overlay (room for the 65,536 filler endpoints).
pub const BENCH_OVERLAY: &str = "10.64.0.0/12";
/// Entries in ferry's endpoint map for `ferry_full_map`.
pub const FULL_MAP_ENTRIES: usize = 65_536;

#[derive(Debug, Clone, Args)]
pub struct DatapathArgs {
    /// Print exactly one JSON object on stdout instead of the table (progress stays on stderr).
    #[arg(long)]
    pub json: bool,
    /// Length of each iperf3 run, in seconds.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub duration_secs: u64,
    /// Rounds per mode (modes are interleaved round by round; medians are reported).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    pub rounds: u32,
    /// Timed request/response round trips per round (after a warm-up).
    #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub rr_count: u64,
    /// Bytes of each request and of each response.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=1_048_576))]
    pub rr_size: u64,
    /// Where the request/response client and server threads run.
    #[arg(long, value_enum, default_value_t = measure::RrPlacement::SameCpu)]
    pub rr_placement: measure::RrPlacement,
    /// Where iperf3's client and server run (`iperf3 -A`).
    #[arg(long, value_enum, default_value_t = measure::RrPlacement::Any)]
    pub iperf_placement: measure::RrPlacement,
    /// Turn the kernel's eBPF run-time statistics on for the run and report ferry's time per
    /// program run during its throughput rounds (costs ferry two clock reads per run: off by
    /// default, so that the ratios compare like with like).
    #[arg(long)]
    pub ebpf_stats: bool,
}

/// One end of a measurement: a container's network namespace and its address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Path of the namespace (e.g. `/run/netns/<prefix>-a1-kv`).
    pub netns: PathBuf,
    pub ip: IpAddr,
}

/// Two containers on different hosts: `a` (on [`HOST_A`]) runs the clients, `b` (on
/// [`HOST_B`]) the servers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pair {
    pub a: Endpoint,
    pub b: Endpoint,
}

/// The modes measured in rounds (`ferry_full_map` comes after them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Ferry,
    /// ferry's no-tunnel mode (`direct_routing`) between the same hosts, in a second lab.
    FerryDirect,
    /// ferry's containers over their IPv6 addresses (set up after `Ferry`, whose pair it uses).
    FerryIpv6,
    KernelVxlan,
    Routed,
}

impl Mode {
    pub const ALL: [Mode; 5] = [
        Mode::Ferry,
        Mode::FerryIpv6,
        Mode::FerryDirect,
        Mode::KernelVxlan,
        Mode::Routed,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Ferry => "ferry",
            Mode::FerryIpv6 => "ferry_ipv6",
            Mode::FerryDirect => "ferry_direct",
            Mode::KernelVxlan => "kernel_vxlan",
            Mode::Routed => "routed",
        }
    }
}

/// A mode's state during the run.
struct ModeRun {
    mode: Mode,
    pair: Option<Pair>,
    samples: ModeSamples,
}

impl ModeRun {
    fn fail(&mut self, p: &Progress, error: String) {
        p.say(format!("{}: FAILED: {error}", self.mode.name()));
        self.samples.error = Some(error);
        self.pair = None;
    }
}

/// Runs the benchmark; returns the exit code (non-zero if any mode failed).
pub fn run(args: &DatapathArgs) -> Result<i32, BenchError> {
    let p = Progress(Instant::now());
    measure::check_iperf3()?;
    let duration = Duration::from_secs(args.duration_secs);
    let rr_count = usize::try_from(args.rr_count).unwrap_or(usize::MAX);
    let rr_size = usize::try_from(args.rr_size).unwrap_or(usize::MAX);

    p.say("bringing up the default lab with agents");
    // A /12 overlay: 65,536 filler endpoints do not fit in the default /16 next to the hosts.
    let lab = Lab::up(LabOptions {
        topology: Topology {
            overlay_cidr: BENCH_OVERLAY.parse().expect("valid CIDR"),
            ..Topology::default_lab()
        },
        start_agents: true,
        ..LabOptions::default()
    })?;
    let prefix = lab.prefix().to_owned();
    p.say(format!(
        "lab {prefix} up in {} ms",
        lab.up_duration().as_millis()
    ));
    // The no-tunnel mode needs its agents configured so: a second lab, measured interleaved.
    p.say("bringing up a second lab in no-tunnel mode (direct_routing)");
    let lab_direct = Lab::up(LabOptions {
        topology: Topology {
            overlay_cidr: BENCH_OVERLAY.parse().expect("valid CIDR"),
            direct_routing: true,
            ..Topology::default_lab()
        },
        start_agents: true,
        ..LabOptions::default()
    });
    let prefix_direct = lab_direct.as_ref().map(|l| l.prefix().to_owned()).ok();

    let _stats = if args.ebpf_stats {
        Some(
            ferry_overlay::datapath::enable_run_time_stats()
                .map_err(|e| BenchError::io("enabling eBPF run-time statistics", e))?,
        )
    } else {
        None
    };
    let mut ports = measure::Ports::default();
    let mut runs: Vec<ModeRun> = Vec::new();
    for mode in Mode::ALL {
        p.say(format!(
            "{}: setting up containers on {HOST_A} and {HOST_B}",
            mode.name()
        ));
        let mut run = ModeRun {
            mode,
            pair: None,
            samples: ModeSamples::default(),
        };
        let set_up = match mode {
            Mode::Ferry => ferry_mode::setup(&lab),
            Mode::FerryDirect => match &lab_direct {
                Ok(l) => ferry_mode::setup(l),
                Err(e) => Err(BenchError::failed(format!("the no-tunnel lab: {e}"))),
            },
            Mode::FerryIpv6 => runs
                .iter()
                .find(|r| r.mode == Mode::Ferry)
                .and_then(|r| r.pair.clone())
                .ok_or_else(|| BenchError::failed("ferry's containers were not set up"))
                .and_then(|pair| ferry_mode::ipv6_pair(&lab, &pair)),
            Mode::KernelVxlan => baseline::kernel_vxlan(&lab, HOST_A, HOST_B),
            Mode::Routed => baseline::routed(&lab, HOST_A, HOST_B),
        };
        match set_up {
            Err(e) => run.fail(&p, format!("setup: {e}")),
            Ok(pair) => match measure::check_connectivity(&pair, ports.take()) {
                Err(e) => run.fail(&p, format!("no connectivity: {e}")),
                Ok(()) => {
                    p.say(format!(
                        "{}: {} ({HOST_A}) reaches {} ({HOST_B})",
                        mode.name(),
                        pair.a.ip,
                        pair.b.ip
                    ));
                    run.pair = Some(pair);
                }
            },
        }
        runs.push(run);
    }

    for round in 0..args.rounds as usize {
        // Rotate the order so that no mode always runs first (or right after another one).
        let n = runs.len();
        for k in 0..n {
            let run = &mut runs[(round + k) % n];
            let Some(pair) = run.pair.clone() else {
                continue;
            };
            let name = run.mode.name();
            p.say(format!(
                "round {}/{}: {name}: iperf3 {} s",
                round + 1,
                args.rounds,
                args.duration_secs
            ));
            let before = args.ebpf_stats.then(ferry_overlay::datapath::program_stats);
            match measure::throughput(&pair, ports.take(), duration, args.iperf_placement) {
                Ok(bps) => {
                    p.say(format!("  {name}: {:.2} Gbit/s", bps / 1e9));
                    run.samples.gbps.push(bps / 1e9);
                    if let Some(before) = before {
                        run.samples
                            .add_ebpf(&before, &ferry_overlay::datapath::program_stats());
                    }
                }
                Err(e) => {
                    run.fail(&p, format!("round {}: throughput: {e}", round + 1));
                    continue;
                }
            }
            p.say(format!(
                "round {}/{}: {name}: {rr_count} round trips of {rr_size} B",
                round + 1,
                args.rounds
            ));
            match measure::request_response(
                &pair,
                ports.take(),
                rr_count,
                rr_size,
                args.rr_placement,
            ) {
                Ok(rr) => {
                    p.say(format!(
                        "  {name}: p50 {:.1} µs, p99 {:.1} µs",
                        rr.p50_us, rr.p99_us
                    ));
                    run.samples.rr_p50_us.push(rr.p50_us);
                    run.samples.rr_p99_us.push(rr.p99_us);
                }
                Err(e) => run.fail(&p, format!("round {}: request/response: {e}", round + 1)),
            }
        }
    }

    // ferry again, with a full endpoint map.
    let mut full = ModeSamples::default();
    let ferry = runs.iter().find(|r| r.mode == Mode::Ferry);
    match ferry.and_then(|r| r.pair.clone()) {
        None => {
            let why = ferry
                .and_then(|r| r.samples.error.clone())
                .unwrap_or_else(|| "not measured".to_owned());
            full.error = Some(format!("skipped: ferry failed ({why})"));
            p.say("ferry_full_map: skipped (ferry failed)");
        }
        Some(pair) => {
            p.say(format!(
                "ferry_full_map: filling ferry's endpoint map with {FULL_MAP_ENTRIES} entries"
            ));
            match ferry_mode::fill_map(&lab, FULL_MAP_ENTRIES) {
                Err(e) => {
                    full.error = Some(format!("filling the map: {e}"));
                    p.say(format!("ferry_full_map: FAILED: filling the map: {e}"));
                }
                Ok(()) => {
                    for round in 0..args.rounds {
                        p.say(format!(
                            "round {}/{}: ferry_full_map: iperf3 {} s",
                            round + 1,
                            args.rounds,
                            args.duration_secs
                        ));
                        match measure::throughput(
                            &pair,
                            ports.take(),
                            duration,
                            args.iperf_placement,
                        ) {
                            Ok(bps) => {
                                p.say(format!("  ferry_full_map: {:.2} Gbit/s", bps / 1e9));
                                full.gbps.push(bps / 1e9);
                            }
                            Err(e) => {
                                let e = format!("round {}: throughput: {e}", round + 1);
                                p.say(format!("ferry_full_map: FAILED: {e}"));
                                full.error = Some(e);
                                break;
                            }
                        }
                    }
                }
            }
        }
    }

    let by_mode = |m: Mode| {
        runs.iter()
            .find(|r| r.mode == m)
            .map(|r| r.samples.clone())
            .unwrap_or_default()
    };
    let report = Report::build(
        Params {
            rounds: args.rounds,
            duration_secs: args.duration_secs,
            rr_count: args.rr_count,
            rr_size: args.rr_size,
            rr_placement: args.rr_placement.name(),
            iperf_placement: args.iperf_placement.name(),
        },
        &by_mode(Mode::Ferry),
        &by_mode(Mode::FerryIpv6),
        &by_mode(Mode::FerryDirect),
        &by_mode(Mode::KernelVxlan),
        &by_mode(Mode::Routed),
        &full,
    );

    p.say("tearing the labs down");
    let mut code = if report.ok() { 0 } else { 1 };
    if let Err(e) = lab.down() {
        p.say(format!("teardown: {e}"));
        code = 1;
    }
    if let Ok(l) = lab_direct
        && let Err(e) = l.down()
    {
        p.say(format!("teardown of the no-tunnel lab: {e}"));
        code = 1;
    }
    for pre in std::iter::once(&prefix).chain(prefix_direct.as_ref()) {
        let left = leftovers(pre);
        if !left.is_empty() {
            p.say(format!("left behind: {}", left.join(", ")));
            code = 1;
        }
    }

    print_report(args.json, &report, || report.table())?;
    for (mode, error) in report.errors() {
        p.say(format!("{mode} failed: {error}"));
    }
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    use crate::BenchCmd;

    /// `ferry-lab bench` as the binary declares it.
    #[derive(Debug, Parser)]
    struct Bench {
        #[command(subcommand)]
        what: BenchCmd,
    }

    fn parse(args: &[&str]) -> Result<DatapathArgs, clap::Error> {
        let mut argv = vec!["bench", "datapath"];
        argv.extend_from_slice(args);
        match Bench::try_parse_from(argv)?.what {
            BenchCmd::Datapath(a) => Ok(a),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn cli_defaults_and_options() {
        let a = parse(&[]).unwrap();
        assert!(!a.json);
        assert_eq!(
            (a.duration_secs, a.rounds, a.rr_count, a.rr_size),
            (5, 3, 20_000, 64)
        );
        assert_eq!(a.rr_placement, measure::RrPlacement::SameCpu);
        assert_eq!(a.iperf_placement, measure::RrPlacement::Any);
        let a = parse(&[
            "--json",
            "--duration-secs",
            "2",
            "--rounds",
            "1",
            "--rr-count",
            "100",
            "--rr-size",
            "1",
            "--rr-placement",
            "split",
            "--iperf-placement",
            "same-cpu",
        ])
        .unwrap();
        assert!(a.json);
        assert_eq!(
            (a.duration_secs, a.rounds, a.rr_count, a.rr_size),
            (2, 1, 100, 1)
        );
        assert_eq!(a.rr_placement, measure::RrPlacement::Split);
        assert_eq!(a.iperf_placement, measure::RrPlacement::SameCpu);
        assert!(parse(&["--rounds", "0"]).is_err());
        assert!(parse(&["--rr-size", "0"]).is_err());
        assert!(parse(&["--duration-secs", "0"]).is_err());
    }
}
