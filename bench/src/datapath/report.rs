//! The datapath benchmark's report: medians, percentiles, ratios, the table and the JSON.
//! Pure: no lab, no kernel.

use std::fmt::Write as _;

use serde::Serialize;

use crate::stats::{median, ratio, round_to};

/// What one mode measured, one value per round (plus why it stopped, if it failed).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ModeSamples {
    pub gbps: Vec<f64>,
    pub rr_p50_us: Vec<f64>,
    pub rr_p99_us: Vec<f64>,
    /// Reported in the mode's summary, not among the samples.
    #[serde(skip)]
    pub error: Option<String>,
    /// With `--ebpf-stats`: ferry's programs' (name, run time, runs) summed over the
    /// throughput rounds (zero for the baselines, which run none).
    #[serde(skip)]
    pub ebpf: Vec<(&'static str, u64, u64)>,
}

impl ModeSamples {
    /// Adds what each program ran between two readings of the statistics.
    pub fn add_ebpf(
        &mut self,
        before: &[ferry_overlay::datapath::ProgramStats],
        after: &[ferry_overlay::datapath::ProgramStats],
    ) {
        for (b, a) in before.iter().zip(after) {
            let (ns, runs) = (
                a.run_ns.saturating_sub(b.run_ns),
                a.runs.saturating_sub(b.runs),
            );
            match self.ebpf.iter_mut().find(|e| e.0 == a.name) {
                Some(e) => (e.1, e.2) = (e.1 + ns, e.2 + runs),
                None => self.ebpf.push((a.name, ns, runs)),
            }
        }
    }
}

/// One program's cost during a mode's throughput rounds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EbpfCost {
    pub program: &'static str,
    /// Mean time per run, ns.
    pub ns_per_run: Option<f64>,
    /// Runs per round (each run is one skb: with GSO/GRO, many MTU-sized packets).
    pub runs_per_round: f64,
}

fn ebpf_costs(s: &ModeSamples) -> Vec<EbpfCost> {
    let rounds = s.gbps.len().max(1) as f64;
    s.ebpf
        .iter()
        .filter(|e| e.2 > 0)
        .map(|&(program, ns, runs)| EbpfCost {
            program,
            ns_per_run: Some(round_to(ns as f64 / runs as f64, 1)),
            runs_per_round: round_to(runs as f64 / rounds, 0),
        })
        .collect()
}

/// The run's parameters, echoed in the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    pub rounds: u32,
    pub duration_secs: u64,
    pub rr_count: u64,
    pub rr_size: u64,
    /// Where the request/response threads ran (`same-cpu`, `split`, `any`).
    pub rr_placement: &'static str,
    /// Where iperf3's client and server ran (same names).
    pub iperf_placement: &'static str,
}

/// Medians over the rounds; `None` (JSON `null`) when the mode was not measured.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ModeSummary {
    pub gbps: Option<f64>,
    pub rr_p50_us: Option<f64>,
    pub rr_p99_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ThroughputSummary {
    pub gbps: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Throughput ratios of each mode's best round. On this VM every mode's rounds fall on two or
/// three levels (which CPUs a flow's hops are steered to depends on its hash, new each round:
/// docs/benchmarks.md), so medians of a few rounds land on either level by chance; the best
/// rounds compare the modes at the same, favourable placement.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct BestRatios {
    pub ferry_vs_kernel_vxlan_gbps: Option<f64>,
    pub ferry_vs_routed_gbps: Option<f64>,
    pub ferry_direct_vs_routed_gbps: Option<f64>,
    pub ferry_full_vs_small_gbps: Option<f64>,
    pub ferry_ipv6_vs_ipv4_gbps: Option<f64>,
}

/// Ratios of medians; `None` when either side is missing.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Ratios {
    /// ferry Gbps / kernel_vxlan Gbps (> 1: ferry is faster).
    pub ferry_vs_kernel_vxlan_gbps: Option<f64>,
    /// ferry rr p50 / kernel_vxlan rr p50 (< 1: ferry has lower latency).
    pub ferry_vs_kernel_vxlan_rr_p50: Option<f64>,
    /// ferry Gbps / routed Gbps (the cost of the overlay).
    pub ferry_vs_routed_gbps: Option<f64>,
    /// ferry_full_map Gbps / ferry Gbps (the cost of a full endpoint map).
    pub ferry_full_vs_small_gbps: Option<f64>,
    /// ferry_ipv6 Gbps / ferry Gbps (IPv6 against IPv4 through the same datapath).
    pub ferry_ipv6_vs_ipv4_gbps: Option<f64>,
    /// ferry_ipv6 rr p50 / ferry rr p50.
    pub ferry_ipv6_vs_ipv4_rr_p50: Option<f64>,
    /// ferry_direct Gbps / routed Gbps (the no-tunnel mode against routed veths).
    pub ferry_direct_vs_routed_gbps: Option<f64>,
    /// ferry_direct rr p50 / routed rr p50.
    pub ferry_direct_vs_routed_rr_p50: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ThroughputSamples {
    pub gbps: Vec<f64>,
}

/// Raw per-round values of every mode.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Samples {
    pub ferry: ModeSamples,
    pub ferry_ipv6: ModeSamples,
    pub ferry_direct: ModeSamples,
    pub kernel_vxlan: ModeSamples,
    pub routed: ModeSamples,
    pub ferry_full_map: ThroughputSamples,
}

/// The report: one JSON object with `--json`, else [`Report::table`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub ferry: ModeSummary,
    /// ferry between the same containers over IPv6.
    pub ferry_ipv6: ModeSummary,
    /// ferry's no-tunnel mode between the same hosts (a second lab).
    pub ferry_direct: ModeSummary,
    pub kernel_vxlan: ModeSummary,
    pub routed: ModeSummary,
    pub ferry_full_map: ThroughputSummary,
    pub ratios: Ratios,
    /// Ratios of the best rounds (see [`BestRatios`]).
    pub ratios_best: BestRatios,
    pub rounds: u32,
    pub duration_secs: u64,
    pub rr_count: u64,
    pub rr_size: u64,
    pub rr_placement: &'static str,
    pub iperf_placement: &'static str,
    pub samples: Samples,
    /// With `--ebpf-stats`: ferry's programs during its throughput rounds, per mode.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ebpf: Option<EbpfReport>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EbpfReport {
    pub ferry: Vec<EbpfCost>,
    pub ferry_ipv6: Vec<EbpfCost>,
}

fn rounded(v: &[f64], decimals: i32) -> Vec<f64> {
    v.iter().map(|x| round_to(*x, decimals)).collect()
}

fn summary(s: &ModeSamples) -> ModeSummary {
    ModeSummary {
        gbps: median(&s.gbps),
        rr_p50_us: median(&s.rr_p50_us),
        rr_p99_us: median(&s.rr_p99_us),
        error: s.error.clone(),
    }
}

fn rounded_summary(s: &ModeSummary) -> ModeSummary {
    ModeSummary {
        gbps: s.gbps.map(|x| round_to(x, 3)),
        rr_p50_us: s.rr_p50_us.map(|x| round_to(x, 1)),
        rr_p99_us: s.rr_p99_us.map(|x| round_to(x, 1)),
        error: s.error.clone(),
    }
}

fn rounded_samples(s: &ModeSamples) -> ModeSamples {
    ModeSamples {
        gbps: rounded(&s.gbps, 3),
        rr_p50_us: rounded(&s.rr_p50_us, 1),
        rr_p99_us: rounded(&s.rr_p99_us, 1),
        error: s.error.clone(),
        ebpf: Vec::new(),
    }
}

impl Report {
    /// Medians and ratios from the raw samples (ratios from unrounded medians; everything
    /// shown is rounded: Gbps to 3 decimals, µs to 1, ratios to 3).
    pub fn build(
        params: Params,
        ferry: &ModeSamples,
        ferry_ipv6: &ModeSamples,
        ferry_direct: &ModeSamples,
        kernel_vxlan: &ModeSamples,
        routed: &ModeSamples,
        ferry_full_map: &ModeSamples,
    ) -> Self {
        let (f, k, r) = (summary(ferry), summary(kernel_vxlan), summary(routed));
        let f6 = summary(ferry_ipv6);
        let fd = summary(ferry_direct);
        let full = median(&ferry_full_map.gbps);
        let r3 = |x: Option<f64>| x.map(|v| round_to(v, 3));
        let ratios = Ratios {
            ferry_vs_kernel_vxlan_gbps: r3(ratio(f.gbps, k.gbps)),
            ferry_vs_kernel_vxlan_rr_p50: r3(ratio(f.rr_p50_us, k.rr_p50_us)),
            ferry_vs_routed_gbps: r3(ratio(f.gbps, r.gbps)),
            ferry_full_vs_small_gbps: r3(ratio(full, f.gbps)),
            ferry_ipv6_vs_ipv4_gbps: r3(ratio(f6.gbps, f.gbps)),
            ferry_ipv6_vs_ipv4_rr_p50: r3(ratio(f6.rr_p50_us, f.rr_p50_us)),
            ferry_direct_vs_routed_gbps: r3(ratio(fd.gbps, r.gbps)),
            ferry_direct_vs_routed_rr_p50: r3(ratio(fd.rr_p50_us, r.rr_p50_us)),
        };
        let best = |s: &ModeSamples| s.gbps.iter().copied().reduce(f64::max);
        let ratios_best = BestRatios {
            ferry_vs_kernel_vxlan_gbps: r3(ratio(best(ferry), best(kernel_vxlan))),
            ferry_vs_routed_gbps: r3(ratio(best(ferry), best(routed))),
            ferry_direct_vs_routed_gbps: r3(ratio(best(ferry_direct), best(routed))),
            ferry_full_vs_small_gbps: r3(ratio(best(ferry_full_map), best(ferry))),
            ferry_ipv6_vs_ipv4_gbps: r3(ratio(best(ferry_ipv6), best(ferry))),
        };
        Self {
            ferry: rounded_summary(&f),
            ferry_ipv6: rounded_summary(&f6),
            ferry_direct: rounded_summary(&fd),
            kernel_vxlan: rounded_summary(&k),
            routed: rounded_summary(&r),
            ferry_full_map: ThroughputSummary {
                gbps: r3(full),
                error: ferry_full_map.error.clone(),
            },
            ratios,
            ratios_best,
            rounds: params.rounds,
            duration_secs: params.duration_secs,
            rr_count: params.rr_count,
            rr_size: params.rr_size,
            rr_placement: params.rr_placement,
            iperf_placement: params.iperf_placement,
            ebpf: (!ferry.ebpf.is_empty() || !ferry_ipv6.ebpf.is_empty()).then(|| EbpfReport {
                ferry: ebpf_costs(ferry),
                ferry_ipv6: ebpf_costs(ferry_ipv6),
            }),
            samples: Samples {
                ferry: rounded_samples(ferry),
                ferry_ipv6: rounded_samples(ferry_ipv6),
                ferry_direct: rounded_samples(ferry_direct),
                kernel_vxlan: rounded_samples(kernel_vxlan),
                routed: rounded_samples(routed),
                ferry_full_map: ThroughputSamples {
                    gbps: rounded(&ferry_full_map.gbps, 3),
                },
            },
        }
    }

    /// (mode, error) of every mode that failed.
    pub fn errors(&self) -> Vec<(&'static str, &str)> {
        [
            ("ferry", &self.ferry.error),
            ("ferry_ipv6", &self.ferry_ipv6.error),
            ("ferry_direct", &self.ferry_direct.error),
            ("kernel_vxlan", &self.kernel_vxlan.error),
            ("routed", &self.routed.error),
            ("ferry_full_map", &self.ferry_full_map.error),
        ]
        .into_iter()
        .filter_map(|(m, e)| Some((m, e.as_deref()?)))
        .collect()
    }

    /// Every mode measured.
    pub fn ok(&self) -> bool {
        self.errors().is_empty()
    }

    /// The table for people: one row per mode, medians over the rounds, Gbps ratios against
    /// routed and kernel_vxlan.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let routed = self.routed.gbps;
        let kv = self.kernel_vxlan.gbps;
        let _ = writeln!(
            s,
            "{:<16} {:>8} {:>11} {:>11} {:>15} {:>21}",
            "mode", "Gbps", "rr p50 µs", "rr p99 µs", "Gbps vs routed", "Gbps vs kernel_vxlan"
        );
        let full = ModeSummary {
            gbps: self.ferry_full_map.gbps,
            error: self.ferry_full_map.error.clone(),
            ..ModeSummary::default()
        };
        let rows: [(&str, &ModeSummary); 6] = [
            ("ferry", &self.ferry),
            ("ferry_ipv6", &self.ferry_ipv6),
            ("ferry_direct", &self.ferry_direct),
            ("kernel_vxlan", &self.kernel_vxlan),
            ("routed", &self.routed),
            ("ferry_full_map", &full),
        ];
        for (mode, m) in rows {
            let num = |x: Option<f64>, d: usize| x.map_or("-".to_owned(), |v| format!("{v:.d$}"));
            let times = |x: Option<f64>| x.map_or("-".to_owned(), |v| format!("{v:.2}x"));
            let _ = write!(
                s,
                "{:<16} {:>8} {:>11} {:>11} {:>15} {:>21}",
                mode,
                num(m.gbps, 2),
                num(m.rr_p50_us, 1),
                num(m.rr_p99_us, 1),
                times(ratio(m.gbps, routed)),
                times(ratio(m.gbps, kv)),
            );
            match &m.error {
                Some(e) => {
                    let _ = writeln!(s, "  FAILED: {e}");
                }
                None => s.push('\n'),
            }
        }
        let times = |x: Option<f64>| x.map_or("-".to_owned(), |v| format!("{v:.2}x"));
        let _ = writeln!(
            s,
            "rr p50 ferry vs kernel_vxlan: {}; full map vs small map (Gbps): {}; IPv6 vs IPv4 \
             (Gbps, rr p50): {}, {}",
            times(self.ratios.ferry_vs_kernel_vxlan_rr_p50),
            times(self.ratios.ferry_full_vs_small_gbps),
            times(self.ratios.ferry_ipv6_vs_ipv4_gbps),
            times(self.ratios.ferry_ipv6_vs_ipv4_rr_p50),
        );
        let _ = writeln!(
            s,
            "best rounds (Gbps): ferry vs kernel_vxlan {}, vs routed {}; ferry_direct vs routed \
             {}; full map vs small {}; IPv6 vs IPv4 {}",
            times(self.ratios_best.ferry_vs_kernel_vxlan_gbps),
            times(self.ratios_best.ferry_vs_routed_gbps),
            times(self.ratios_best.ferry_direct_vs_routed_gbps),
            times(self.ratios_best.ferry_full_vs_small_gbps),
            times(self.ratios_best.ferry_ipv6_vs_ipv4_gbps),
        );
        let _ = writeln!(
            s,
            "medians of {} round(s): single-stream iperf3 for {} s (client and server: {}); {} \
             TCP round trips of {} B (client and server threads: {})",
            self.rounds,
            self.duration_secs,
            self.iperf_placement,
            self.rr_count,
            self.rr_size,
            self.rr_placement
        );
        if let Some(e) = &self.ebpf {
            for (mode, costs) in [("ferry", &e.ferry), ("ferry_ipv6", &e.ferry_ipv6)] {
                let line: Vec<String> = costs
                    .iter()
                    .map(|c| {
                        format!(
                            "{} {} ns x {}",
                            c.program,
                            c.ns_per_run.map_or("-".into(), |v| format!("{v:.0}")),
                            c.runs_per_round
                        )
                    })
                    .collect();
                let _ = writeln!(s, "eBPF per run ({mode}, per round): {}", line.join(", "));
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> Params {
        Params {
            rounds: 3,
            duration_secs: 5,
            rr_count: 20_000,
            rr_size: 64,
            rr_placement: "same-cpu",
            iperf_placement: "any",
        }
    }

    fn samples(gbps: &[f64], p50: &[f64], p99: &[f64]) -> ModeSamples {
        ModeSamples {
            gbps: gbps.to_vec(),
            rr_p50_us: p50.to_vec(),
            rr_p99_us: p99.to_vec(),
            error: None,
            ebpf: Vec::new(),
        }
    }

    #[test]
    fn ebpf_costs_are_per_run_and_per_round() {
        use ferry_overlay::datapath::ProgramStats;
        let st = |name, run_ns, runs| ProgramStats { name, run_ns, runs };
        let mut f = samples(&[9.0, 8.0], &[40.0, 42.0], &[60.0, 70.0]);
        f.add_ebpf(&[st("to_overlay", 100, 10)], &[st("to_overlay", 1_100, 20)]);
        f.add_ebpf(
            &[st("to_overlay", 1_100, 20)],
            &[st("to_overlay", 4_100, 40)],
        );
        let none = samples(&[1.0], &[1.0], &[1.0]);
        let r = Report::build(params(), &f, &none, &none, &none, &none, &none);
        let e = r.ebpf.clone().expect("costs reported");
        assert_eq!(
            e.ferry,
            [EbpfCost {
                program: "to_overlay",
                ns_per_run: Some(133.3),
                runs_per_round: 15.0
            }]
        );
        assert!(e.ferry_ipv6.is_empty());
        assert!(
            r.table().contains("to_overlay 133 ns x 15"),
            "{}",
            r.table()
        );
        // Without statistics the report has no `ebpf` key.
        let plain = Report::build(params(), &none, &none, &none, &none, &none, &none);
        assert!(serde_json::to_value(&plain).unwrap().get("ebpf").is_none());
    }

    #[test]
    fn report_has_the_documented_shape() {
        let ferry = samples(&[9.0, 8.0, 10.0], &[40.0, 42.0, 41.0], &[60.0, 70.0, 65.0]);
        let kv = samples(&[6.0, 5.0, 7.0], &[50.0, 51.0, 49.0], &[80.0, 81.0, 79.0]);
        let routed = samples(
            &[12.0, 11.0, 13.0],
            &[30.0, 31.0, 29.0],
            &[45.0, 46.0, 44.0],
        );
        let full = samples(&[8.0, 8.5, 9.5], &[], &[]);
        let ferry6 = samples(&[8.5, 9.0, 8.0], &[41.0, 43.0, 42.0], &[60.0, 61.0, 62.0]);
        let direct = samples(
            &[11.0, 12.0, 11.5],
            &[31.0, 32.0, 30.0],
            &[45.0, 47.0, 46.0],
        );
        let r = Report::build(params(), &ferry, &ferry6, &direct, &kv, &routed, &full);
        assert!(r.ok());
        let j = serde_json::to_value(&r).unwrap();
        let obj = j.as_object().unwrap();
        let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "duration_secs",
                "ferry",
                "ferry_direct",
                "ferry_full_map",
                "ferry_ipv6",
                "iperf_placement",
                "kernel_vxlan",
                "ratios",
                "ratios_best",
                "rounds",
                "routed",
                "rr_count",
                "rr_placement",
                "rr_size",
                "samples"
            ]
        );
        assert_eq!(
            j["ferry"],
            serde_json::json!({"gbps": 9.0, "rr_p50_us": 41.0, "rr_p99_us": 65.0})
        );
        assert_eq!(
            j["kernel_vxlan"],
            serde_json::json!({"gbps": 6.0, "rr_p50_us": 50.0, "rr_p99_us": 80.0})
        );
        assert_eq!(j["routed"]["gbps"], 12.0);
        assert_eq!(j["ferry_full_map"], serde_json::json!({"gbps": 8.5}));
        assert_eq!(
            j["ratios"],
            serde_json::json!({
                "ferry_vs_kernel_vxlan_gbps": 1.5,
                "ferry_vs_kernel_vxlan_rr_p50": 0.82,
                "ferry_vs_routed_gbps": 0.75,
                "ferry_full_vs_small_gbps": 0.944,
                "ferry_ipv6_vs_ipv4_gbps": 0.944,
                "ferry_ipv6_vs_ipv4_rr_p50": 1.024,
                "ferry_direct_vs_routed_gbps": 0.958,
                "ferry_direct_vs_routed_rr_p50": 1.033,
            })
        );
        assert_eq!(j["rounds"], 3);
        assert_eq!(j["duration_secs"], 5);
        assert_eq!(j["rr_placement"], "same-cpu");
        assert_eq!(
            j["samples"]["ferry"],
            serde_json::json!({
                "gbps": [9.0, 8.0, 10.0],
                "rr_p50_us": [40.0, 42.0, 41.0],
                "rr_p99_us": [60.0, 70.0, 65.0],
            })
        );
        assert_eq!(
            j["samples"]["ferry_full_map"],
            serde_json::json!({"gbps": [8.0, 8.5, 9.5]})
        );
        let t = r.table();
        assert_eq!(
            j["ratios_best"],
            serde_json::json!({
                "ferry_vs_kernel_vxlan_gbps": 1.429,
                "ferry_vs_routed_gbps": 0.769,
                "ferry_direct_vs_routed_gbps": 0.923,
                "ferry_full_vs_small_gbps": 0.95,
                "ferry_ipv6_vs_ipv4_gbps": 0.9,
            })
        );
        assert_eq!(t.lines().count(), 10, "{t}");
        assert!(t.contains("ferry_direct"), "{t}");
        assert!(t.contains("ferry_ipv6"), "{t}");
        assert!(t.contains("kernel_vxlan"));
        assert!(!t.contains("FAILED"));
    }

    #[test]
    fn failed_modes_are_null_with_their_error() {
        let ferry = ModeSamples {
            error: Some("setup: ferry mode not wired yet".into()),
            ..ModeSamples::default()
        };
        let kv = samples(&[6.0], &[50.0], &[80.0]);
        let routed = samples(&[12.0], &[30.0], &[45.0]);
        let full = ModeSamples {
            error: Some("skipped: ferry failed".into()),
            ..ModeSamples::default()
        };
        let ferry6 = ModeSamples {
            error: Some("setup: ferry's containers were not set up".into()),
            ..ModeSamples::default()
        };
        let direct = samples(&[11.0], &[31.0], &[46.0]);
        let r = Report::build(params(), &ferry, &ferry6, &direct, &kv, &routed, &full);
        assert!(!r.ok());
        assert_eq!(
            r.errors(),
            [
                ("ferry", "setup: ferry mode not wired yet"),
                ("ferry_ipv6", "setup: ferry's containers were not set up"),
                ("ferry_full_map", "skipped: ferry failed")
            ]
        );
        let j = serde_json::to_value(&r).unwrap();
        assert_eq!(
            j["ferry"],
            serde_json::json!({
                "gbps": null, "rr_p50_us": null, "rr_p99_us": null,
                "error": "setup: ferry mode not wired yet"
            })
        );
        assert_eq!(j["ratios"]["ferry_vs_routed_gbps"], serde_json::Value::Null);
        assert_eq!(j["samples"]["ferry"]["gbps"], serde_json::json!([]));
        let t = r.table();
        assert!(t.contains("FAILED: setup: ferry mode not wired yet"), "{t}");
        assert!(t.contains("0.50x"), "kernel_vxlan vs routed: {t}");
    }
}
