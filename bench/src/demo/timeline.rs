//! Migration runs as text: a timeline per run (every phase's start, duration and bytes, CRIU's
//! own figures) and a markdown table of the phases over many runs (p50 and max).

use std::fmt::Write as _;

use ferry_api::run::{PHASES, RunReport, RunState};

use crate::stats::median;

/// Bytes for people: `812 B`, `3.4 KiB`, `5.2 MiB`, `1.1 GiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = UNITS[0];
    for u in &UNITS[1..] {
        if v < 1024.0 {
            break;
        }
        v /= 1024.0;
        unit = u;
    }
    format!("{v:.1} {unit}")
}

/// One block per run:
///
/// ```text
/// m1  10.244.1.10  a1 → b1  lock hold  released  total 412.3 ms
///   phase          start        ms       bytes
///   prepare      +1204.0      12.1
///   ...
///   transfer     +1290.5      45.6     5.2 MiB
///   CRIU frozen 120.4 ms (freezing 3.1, memory dump 20.2, write 8.0), images 5.2 MiB, total 412.3 ms
/// ```
///
/// Start offsets are ms since `t0_unix_ms` (e.g. the client's first request).
pub fn timeline(runs: &[RunReport], t0_unix_ms: f64) -> String {
    let mut o = String::new();
    for r in runs {
        let _ = writeln!(
            o,
            "{}  {}  {} → {}  lock {}  {}  total {:.1} ms",
            r.id,
            r.container,
            r.from,
            r.to,
            r.lock.as_str(),
            r.state.as_str(),
            r.total_ms
        );
        let _ = writeln!(
            o,
            "  {:<10} {:>10} {:>9} {:>11}",
            "phase", "start ms", "ms", "bytes"
        );
        for p in &r.phases {
            let line = format!(
                "  {:<10} {:>10} {:>9.1} {:>11}",
                p.name,
                format!("{:+.1}", p.start_unix_ms - t0_unix_ms),
                p.ms,
                p.bytes.map(human_bytes).unwrap_or_default()
            );
            let _ = writeln!(o, "{}", line.trim_end());
        }
        let mut last = String::from("  ");
        match &r.criu {
            Some(c) => {
                let _ = write!(
                    last,
                    "CRIU frozen {:.1} ms (freezing {:.1}, memory dump {:.1}, write {:.1}; {} pages), restore {:.1} ms",
                    c.frozen_ms,
                    c.freezing_ms,
                    c.memory_dump_ms,
                    c.memory_write_ms,
                    c.pages_written,
                    c.restore_ms
                );
            }
            None => last.push_str("CRIU frozen -"),
        }
        let _ = writeln!(
            o,
            "{last}, images {}, total {:.1} ms",
            human_bytes(r.image_bytes),
            r.total_ms
        );
        if let Some(e) = &r.error {
            let _ = writeln!(o, "  error: {e}");
        }
        if r.state != RunState::Released && r.error.is_none() {
            let _ = writeln!(o, "  (not released: {})", r.state.as_str());
        }
    }
    o
}

/// A markdown table of each phase's duration over `runs` (p50 and max, in [`PHASES`] order,
/// then any other phase), with the runs' totals and, when known, CRIU's frozen time.
pub fn phase_table(runs: &[RunReport]) -> String {
    let mut names: Vec<&str> = PHASES.to_vec();
    for r in runs {
        for p in &r.phases {
            if !names.contains(&p.name.as_str()) {
                names.push(&p.name);
            }
        }
    }
    let mut rows: Vec<(String, Vec<f64>)> = names
        .into_iter()
        .map(|n| {
            let v = runs
                .iter()
                .flat_map(|r| r.phases.iter().filter(|p| p.name == n).map(|p| p.ms))
                .collect();
            (n.to_owned(), v)
        })
        .filter(|(_, v): &(String, Vec<f64>)| !v.is_empty())
        .collect();
    if !runs.is_empty() {
        rows.push(("total".into(), runs.iter().map(|r| r.total_ms).collect()));
    }
    let frozen: Vec<f64> = runs
        .iter()
        .filter_map(|r| r.criu.as_ref().map(|c| c.frozen_ms))
        .collect();
    if !frozen.is_empty() {
        rows.push(("CRIU frozen".into(), frozen));
    }
    let mut o = String::from("| phase | p50 ms | max ms |\n|---|---:|---:|\n");
    for (name, v) in rows {
        let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let p50 = median(&v).unwrap_or_default();
        let _ = writeln!(o, "| {name} | {p50:.1} | {max:.1} |");
    }
    o
}

#[cfg(test)]
mod tests {
    use ferry_api::run::CriuStats;

    use super::*;
    use crate::demo::plot::tests::run;

    fn two_runs() -> Vec<RunReport> {
        let mut a = run(
            "m1",
            "a1",
            "b1",
            10_000.0,
            &[
                ("prepare", 10.0),
                ("freeze", 2.0),
                ("dump", 100.0),
                ("transfer", 40.0),
                ("restore", 60.0),
                ("release", 3.0),
            ],
        );
        a.criu = Some(CriuStats {
            frozen_ms: 180.5,
            freezing_ms: 1.5,
            memory_dump_ms: 20.0,
            memory_write_ms: 8.0,
            pages_written: 1234,
            restore_ms: 55.0,
            pages_restored: 1234,
        });
        let mut b = run(
            "m2",
            "b1",
            "a1",
            11_500.0,
            &[
                ("prepare", 20.0),
                ("freeze", 4.0),
                ("dump", 50.0),
                ("transfer", 20.0),
                ("restore", 80.0),
                ("release", 5.0),
            ],
        );
        b.image_bytes = 812;
        b.phases[3].bytes = Some(812);
        vec![a, b]
    }

    #[test]
    fn the_timeline_shows_every_phase_at_its_offset() {
        let t = timeline(&two_runs(), 9_000.0);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[0],
            "m1  10.244.1.10  a1 → b1  lock hold  released  total 215.0 ms"
        );
        assert!(lines[1].contains("phase") && lines[1].contains("start ms"));
        // prepare at 10 000 - 9 000 = +1000.0, freeze after it, transfer with its bytes.
        assert_eq!(
            lines[2].split_whitespace().collect::<Vec<_>>(),
            ["prepare", "+1000.0", "10.0"]
        );
        assert_eq!(
            lines[3].split_whitespace().collect::<Vec<_>>(),
            ["freeze", "+1010.0", "2.0"]
        );
        assert_eq!(
            lines[5].split_whitespace().collect::<Vec<_>>(),
            ["transfer", "+1112.0", "40.0", "5.0", "MiB"]
        );
        assert!(
            lines[8].starts_with(
                "  CRIU frozen 180.5 ms (freezing 1.5, memory dump 20.0, write 8.0; 1234 pages)"
            ),
            "{}",
            lines[8]
        );
        assert!(lines[8].ends_with(", images 5.0 MiB, total 215.0 ms"));
        assert!(lines[9].starts_with("m2  10.244.1.10  b1 → a1"));
        assert!(
            t.contains("  transfer      +2574.0      20.0       812 B\n"),
            "{t}"
        );
        assert!(
            t.contains("  CRIU frozen -, images 812 B, total 179.0 ms\n"),
            "{t}"
        );
    }

    #[test]
    fn a_failed_run_says_why() {
        let mut r = run("m3", "a1", "b1", 0.0, &[("prepare", 1.0), ("freeze", 1.0)]);
        r.state = RunState::RolledBack;
        r.error = Some("dump failed: injected".into());
        let t = timeline(&[r], -5.0);
        assert!(t.contains("rolled_back"));
        assert!(t.contains("  error: dump failed: injected\n"));
        assert!(t.contains("+5.0"));
    }

    #[test]
    fn the_phase_table_has_p50_and_max_per_phase() {
        let t = phase_table(&two_runs());
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "| phase | p50 ms | max ms |");
        assert_eq!(lines[1], "|---|---:|---:|");
        assert_eq!(lines[2], "| prepare | 15.0 | 20.0 |");
        assert_eq!(lines[3], "| freeze | 3.0 | 4.0 |");
        assert_eq!(lines[4], "| dump | 75.0 | 100.0 |");
        assert_eq!(lines[7], "| release | 4.0 | 5.0 |");
        assert_eq!(lines[8], "| total | 197.0 | 215.0 |");
        assert_eq!(lines[9], "| CRIU frozen | 180.5 | 180.5 |");
        assert_eq!(lines.len(), 10);
        assert_eq!(
            phase_table(&[]),
            "| phase | p50 ms | max ms |\n|---|---:|---:|\n"
        );
    }

    #[test]
    fn human_bytes_are_readable() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(5 << 20), "5.0 MiB");
        assert_eq!(human_bytes(3 << 30), "3.0 GiB");
    }
}
