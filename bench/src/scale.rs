//! `ferry-lab bench scale`: the client's gap against the container's memory, side by side, in
//! one run: container memory (`--memory-mb`, default 1, 64, 512 and 2048 MiB) × the link
//! between the clouds (`--links`: lab profiles, default lan and wan) × how the memory moves
//! (`--memory-modes`: copy, lazy) × how packets are kept (`--locks`: hold, criu-lock).
//!
//! One lab per link profile (clouds a and b joined by it). In it the container runs
//! `ferry-workload serve --memory-mb N`: a server whose N MiB working set a thread checks and
//! rewrites without end (at `--write-mb-per-s`), under a client on the internet side through
//! the public address. Per cell: a client of its own (its samples give each migration's gap),
//! `--runs` migrations a1 ↔ b1, then the workload checks every page of its memory (`MEM`).
//!
//! Per cell: client gap p50/p99 (the longest silence of any connection inside the run's
//! window), the time the container ran nowhere (`frozen`, the run's `stopped_ms`), the time
//! from the run's start until the last page was at the destination (copy: the transfer's end;
//! lazy: the `pages` phase's end), the bytes of memory and images over the link (images +
//! pages), resets, bytes lost (requests never answered × their size), and whether the memory
//! checked clean. A table for people, an SVG plot of gap against memory, one JSON object with
//! `--json`. `--quick`: 1 and 64 MiB on lan, copy and lazy under hold, one run each (CI).

use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use clap::Args;
use ferry_api::run::{MemoryMode, PAGES_PHASE, RunReport, RunState};
use ferry_lab::{Lab, LabOptions, Topology, bins::find_binary, leftovers, topology};
use plotters::prelude::*;
use serde::Serialize;
use serde_json::Value;

use crate::{
    BenchError, Progress,
    handoff::{PAYLOAD_BYTES, request_bytes},
    migrate::{CONTAINER, HOST_A, HOST_B, PORT, PUBLIC, arrivals, gap_in_window, migrate_run},
    print_report,
    samples::read_samples,
    stats::percentile_of,
    workload::Workload,
};

/// `ferry-lab bench scale`.
#[derive(Debug, Clone, Args)]
pub struct ScaleArgs {
    /// Container memory sizes, MiB (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,64,512,2048")]
    pub memory_mb: Vec<u64>,
    /// Link profiles between the two clouds (lan, wan, intercontinental).
    #[arg(long, value_delimiter = ',', default_value = "lan,wan")]
    pub links: Vec<String>,
    /// How the memory moves (copy, lazy).
    #[arg(long, value_delimiter = ',', default_value = "copy,lazy")]
    pub memory_modes: Vec<String>,
    /// How packets are kept while the container is stopped (hold, criu-lock).
    #[arg(long, value_delimiter = ',', default_value = "hold,criu-lock")]
    pub locks: Vec<String>,
    /// Migrations per cell (a1 → b1, b1 → a1, ...).
    #[arg(long, default_value_t = 2)]
    pub runs: u32,
    /// How fast the workload rewrites its memory, MiB/s.
    #[arg(long, default_value_t = 16)]
    pub write_mb_per_s: u32,
    /// Client connections and the interval between requests on each.
    #[arg(long, default_value_t = 2)]
    pub connections: u64,
    #[arg(long, default_value_t = 10)]
    pub interval_ms: u64,
    /// CI-sized: 1 and 64 MiB on lan, copy and lazy under hold, one run each.
    #[arg(long)]
    pub quick: bool,
    /// Where the plot goes.
    #[arg(long, default_value = "ferry-scale.svg")]
    pub svg: PathBuf,
    /// One JSON object on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// One cell of the matrix.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Row {
    pub memory_mb: u64,
    pub link: String,
    pub memory_mode: String,
    pub lock: String,
    pub gap_ms_p50: Option<f64>,
    pub gap_ms_p99: Option<f64>,
    pub frozen_ms_p50: Option<f64>,
    pub last_page_ms: Option<f64>,
    pub link_bytes: u64,
    pub resets: u64,
    pub bytes_lost: u64,
    /// Migrations released / asked for.
    pub released: u32,
    pub runs: u32,
    /// The workload's check of every page after the cell: none wrong.
    pub memory_ok: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The JSON document.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub rows: Vec<Row>,
}

/// What one cell asks for.
#[derive(Debug, Clone, PartialEq)]
pub struct Cell {
    pub memory_mb: u64,
    pub link: String,
    pub memory: MemoryMode,
    pub lock: &'static str,
}

impl ScaleArgs {
    /// The cells, grouped by link then memory (the order they run in). Unknown names are an
    /// error naming the choices.
    pub fn cells(&self) -> Result<Vec<Cell>, String> {
        let (mems, links, modes, locks, _) = self.plan();
        let mut modes_ok = Vec::new();
        for m in &modes {
            modes_ok.push(match m.as_str() {
                "copy" => MemoryMode::Copy,
                "lazy" => MemoryMode::Lazy,
                other => return Err(format!("memory mode {other:?}: want copy or lazy")),
            });
        }
        let mut locks_ok = Vec::new();
        for l in &locks {
            locks_ok.push(match l.as_str() {
                "hold" => "hold",
                "criu-lock" => "criu-lock",
                other => return Err(format!("lock {other:?}: want hold or criu-lock")),
            });
        }
        for l in &links {
            if topology::profile(l).is_none() {
                return Err(format!(
                    "link {l:?}: want a profile (lan, wan, intercontinental)"
                ));
            }
        }
        if let Some(m) = mems.iter().find(|m| **m == 0 || **m > 16 * 1024) {
            return Err(format!("memory {m} MiB: want 1..=16384"));
        }
        let mut cells = Vec::new();
        for link in &links {
            for &memory_mb in &mems {
                for &memory in &modes_ok {
                    for &lock in &locks_ok {
                        cells.push(Cell {
                            memory_mb,
                            link: link.clone(),
                            memory,
                            lock,
                        });
                    }
                }
            }
        }
        Ok(cells)
    }

    /// (memory sizes, links, modes, locks, runs), `--quick` applied.
    fn plan(&self) -> (Vec<u64>, Vec<String>, Vec<String>, Vec<String>, u32) {
        if self.quick {
            (
                vec![1, 64],
                vec!["lan".into()],
                vec!["copy".into(), "lazy".into()],
                vec!["hold".into()],
                1,
            )
        } else {
            (
                self.memory_mb.clone(),
                self.links.clone(),
                self.memory_modes.clone(),
                self.locks.clone(),
                self.runs.max(1),
            )
        }
    }
}

/// Until the last page was at the destination, from the run's start: the `pages` phase's end
/// (lazy), else the transfer's.
pub fn last_page_ms(r: &RunReport) -> Option<f64> {
    let p = r.phase(PAGES_PHASE).or_else(|| r.phase("transfer"))?;
    Some(p.start_unix_ms + p.ms - r.started_unix_ms)
}

/// Memory and images over the link: the images plus the pages served lazily.
pub fn link_bytes(r: &RunReport) -> u64 {
    r.image_bytes + r.phase(PAGES_PHASE).and_then(|p| p.bytes).unwrap_or(0)
}

/// The workload's `MEM` answer, asked through the public address from the internet side.
fn memory_report(lab: &Lab) -> Option<Value> {
    let script =
        format!("exec 3<>/dev/tcp/{PUBLIC}/{PORT} && echo MEM >&3 && timeout 20 head -1 <&3");
    let out = lab
        .exec("inet", &["timeout", "30", "bash", "-c", &script])
        .ok()?;
    let line = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(line.trim().strip_prefix("MEM ")?).ok()?;
    (!v.is_null()).then_some(v)
}

fn memory_clean(v: &Value) -> bool {
    v["bad_now"].as_u64() == Some(0) && v["bad_pages"].as_u64() == Some(0)
}

/// Runs the matrix. Exit code 0 when every migration was released with no reset, no byte
/// lost and the memory clean; 1 otherwise (the report still prints).
pub fn run(args: &ScaleArgs) -> Result<i32, BenchError> {
    let p = Progress(Instant::now());
    let cells = args.cells().map_err(BenchError::failed)?;
    let runs = args.plan().4;
    let bin = find_binary("ferry-workload", "ferry-workload")?;
    let bin = bin.canonicalize().unwrap_or(bin);
    find_binary("ferry", "ferry-cli")?;
    let mut rows = Vec::new();
    let mut links: Vec<&str> = cells.iter().map(|c| c.link.as_str()).collect();
    links.dedup();
    for link in links {
        let mine: Vec<&Cell> = cells.iter().filter(|c| c.link == link).collect();
        rows.extend(run_link(&p, args, runs, link, &mine, &bin));
    }
    let report = Report { rows };
    match gap_svg(&report.rows) {
        Ok(svg) => match std::fs::write(&args.svg, svg) {
            Ok(()) => p.say(format!("plot: {}", args.svg.display())),
            Err(e) => p.say(format!("plot {}: {e}", args.svg.display())),
        },
        Err(e) => p.say(format!("plot: {e}")),
    }
    print_report(args.json, &report, || table(&report.rows))?;
    let bad = report.rows.iter().any(|r| {
        r.error.is_some()
            || r.released != r.runs
            || r.resets > 0
            || r.bytes_lost > 0
            || r.memory_ok != Some(true)
    });
    Ok(i32::from(bad))
}

/// One link profile's lab and its cells.
fn run_link(
    p: &Progress,
    args: &ScaleArgs,
    runs: u32,
    link: &str,
    cells: &[&Cell],
    bin: &Path,
) -> Vec<Row> {
    let failed = |cells: &[&Cell], e: String| -> Vec<Row> {
        cells
            .iter()
            .map(|c| empty_row(c, runs, Some(e.clone())))
            .collect()
    };
    p.say(format!(
        "{link}: bringing up a lab (clouds a and b joined by {link})"
    ));
    let topology = match crate::links::with_link(Topology::default_lab(), "a", "b", link) {
        Ok(t) => t,
        Err(e) => return failed(cells, e.to_string()),
    };
    let lab = match Lab::up(LabOptions {
        topology,
        start_agents: true,
        ..LabOptions::default()
    }) {
        Ok(l) => l,
        Err(e) => return failed(cells, format!("lab up: {e}")),
    };
    let prefix = lab.prefix().to_owned();
    let c: Ipv4Addr = CONTAINER.parse().expect("valid");
    let setup = lab
        .add_container(HOST_A, c)
        .and_then(|_| {
            lab.ferry_json(&[
                "public",
                "add",
                "--public",
                PUBLIC,
                "--container",
                CONTAINER,
            ])
        })
        .and_then(|_| lab.sync());
    let mut rows = Vec::new();
    match setup {
        Err(e) => rows = failed(cells, format!("lab setup: {e}")),
        Ok(()) => {
            let mut mems: Vec<u64> = cells.iter().map(|c| c.memory_mb).collect();
            mems.dedup();
            for mb in mems {
                let mine: Vec<&Cell> = cells
                    .iter()
                    .copied()
                    .filter(|c| c.memory_mb == mb)
                    .collect();
                rows.extend(run_memory(p, args, runs, &lab, mb, &mine, bin));
            }
        }
    }
    p.say(format!("{link}: tearing the lab down"));
    if let Err(e) = lab.down() {
        p.say(format!("{link}: teardown: {e}"));
    }
    let left = leftovers(&prefix);
    if !left.is_empty() {
        p.say(format!("{link}: left behind: {}", left.join(", ")));
    }
    rows
}

fn empty_row(c: &Cell, runs: u32, error: Option<String>) -> Row {
    Row {
        memory_mb: c.memory_mb,
        link: c.link.clone(),
        memory_mode: c.memory.as_str().into(),
        lock: c.lock.into(),
        gap_ms_p50: None,
        gap_ms_p99: None,
        frozen_ms_p50: None,
        last_page_ms: None,
        link_bytes: 0,
        resets: 0,
        bytes_lost: 0,
        released: 0,
        runs,
        memory_ok: None,
        error,
    }
}

/// One memory size: the server with its working set, then each of its cells.
fn run_memory(
    p: &Progress,
    args: &ScaleArgs,
    runs: u32,
    lab: &Lab,
    mb: u64,
    cells: &[&Cell],
    bin: &Path,
) -> Vec<Row> {
    let c: Ipv4Addr = CONTAINER.parse().expect("valid");
    let bin_s = bin.to_string_lossy().into_owned();
    let (mb_s, rate) = (mb.to_string(), args.write_mb_per_s.to_string());
    let started = lab.start_process(
        c,
        &[
            &bin_s,
            "serve",
            "--port",
            &PORT.to_string(),
            "--memory-mb",
            &mb_s,
            "--memory-mb-per-s",
            &rate,
        ],
    );
    if let Err(e) = started {
        return cells
            .iter()
            .map(|c| empty_row(c, runs, Some(format!("starting the server: {e}"))))
            .collect();
    }
    // The working set filled (resident) before anything moves.
    let deadline = Instant::now() + Duration::from_secs(120);
    while memory_report(lab).is_none() {
        if Instant::now() > deadline {
            let _ = lab.stop_process(c);
            return cells
                .iter()
                .map(|c| {
                    empty_row(
                        c,
                        runs,
                        Some(format!("the {mb} MiB working set never filled")),
                    )
                })
                .collect();
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    p.say(format!("{mb} MiB: server up, working set filled"));
    let mut rows = Vec::new();
    for cell in cells {
        let mut row = run_cell(p, args, runs, lab, cell, bin);
        let check = memory_report(lab);
        row.memory_ok = check.as_ref().map(memory_clean);
        if row.memory_ok != Some(true) && row.error.is_none() {
            row.error = Some(format!("memory check: {check:?}"));
        }
        p.say(format!(
            "{} MiB {} {} {}: gap p50 {} ms, frozen p50 {} ms, last page {} ms, {} B over the \
             link, {} resets, {} B lost, memory {}",
            cell.memory_mb,
            cell.link,
            cell.memory,
            cell.lock,
            fmt(row.gap_ms_p50),
            fmt(row.frozen_ms_p50),
            fmt(row.last_page_ms),
            row.link_bytes,
            row.resets,
            row.bytes_lost,
            match row.memory_ok {
                Some(true) => "clean",
                Some(false) => "WRONG",
                None => "unchecked",
            }
        ));
        rows.push(row);
    }
    if let Err(e) = lab.stop_process(c) {
        p.say(format!("{mb} MiB: stopping the server: {e}"));
    }
    rows
}

/// One cell: a client of its own, `runs` migrations, the figures.
fn run_cell(p: &Progress, args: &ScaleArgs, runs: u32, lab: &Lab, cell: &Cell, bin: &Path) -> Row {
    let mut row = empty_row(cell, runs, None);
    let name = format!(
        "{} MiB {} {} {}",
        cell.memory_mb, cell.link, cell.memory, cell.lock
    );
    let samples_path = lab.state_dir().join(format!(
        "bench-scale-{}-{}-{}.csv",
        cell.memory_mb, cell.memory, cell.lock
    ));
    let samples_arg = samples_path.to_string_lossy().into_owned();
    let client_args = crate::workload::client_args(
        &format!("{PUBLIC}:{PORT}"),
        args.connections,
        args.interval_ms,
        &["--samples", &samples_arg],
    );
    let client_args: Vec<&str> = client_args.iter().map(String::as_str).collect();
    let client = match Workload::start_connected(bin, &lab.netns("inet"), &client_args, |_, _| {}) {
        Ok(c) => c,
        Err(e) => {
            row.error = Some(format!("client: {e}"));
            return row;
        }
    };
    std::thread::sleep(Duration::from_millis(300));
    let c: Ipv4Addr = CONTAINER.parse().expect("valid");
    let mut reports = Vec::new();
    for i in 0..runs {
        let here = lab.endpoint_host(c).unwrap_or_else(|_| HOST_A.into());
        let to = if here == HOST_A { HOST_B } else { HOST_A };
        let run_args = [
            "--quiet",
            "--container",
            CONTAINER,
            "--to",
            to,
            "--lock",
            cell.lock,
            "--memory",
            cell.memory.as_str(),
        ];
        match migrate_run(lab, &run_args) {
            Ok(r) => {
                p.say(format!(
                    "{name}: {}/{runs}: {}->{}: {} in {:.0} ms (stopped {:.0} ms, last page {} ms; {}){}",
                    i + 1,
                    r.from,
                    r.to,
                    r.state.as_str(),
                    r.total_ms,
                    r.stopped_ms,
                    fmt(last_page_ms(&r)),
                    phases_line(&r),
                    r.error.as_ref().map_or(String::new(), |e| format!(": {e}"))
                ));
                if r.state == RunState::Released {
                    row.released += 1;
                } else {
                    row.error.get_or_insert(format!(
                        "{}: {}",
                        r.state.as_str(),
                        r.error.clone().unwrap_or_default()
                    ));
                }
                reports.push(r);
            }
            Err(e) => {
                p.say(format!("{name}: {}/{runs}: FAILED: {e}", i + 1));
                row.error.get_or_insert(e.to_string());
            }
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let (summary, ended) = match client.finish(Duration::from_secs(30)) {
        Ok(s) => s,
        Err(e) => {
            row.error.get_or_insert(format!("client: {e}"));
            return row;
        }
    };
    let samples = read_samples(&samples_path).unwrap_or_default();
    let arr = arrivals(&samples, Some(ended));
    let gaps: Vec<f64> = reports
        .iter()
        .filter_map(|r| gap_in_window(&arr, r.started_unix_ms, r.started_unix_ms + r.total_ms))
        .map(|g| g.ms)
        .collect();
    let frozen: Vec<f64> = reports
        .iter()
        .filter(|r| r.stopped_ms > 0.0)
        .map(|r| r.stopped_ms)
        .collect();
    let last: Vec<f64> = reports.iter().filter_map(last_page_ms).collect();
    row.gap_ms_p50 = percentile_of(&gaps, 50.0);
    row.gap_ms_p99 = percentile_of(&gaps, 99.0);
    row.frozen_ms_p50 = percentile_of(&frozen, 50.0);
    row.last_page_ms = percentile_of(&last, 50.0);
    let bytes: Vec<f64> = reports.iter().map(|r| link_bytes(r) as f64).collect();
    row.link_bytes = percentile_of(&bytes, 50.0).unwrap_or(0.0) as u64;
    let n = |k: &str| summary[k].as_u64().unwrap_or(0);
    row.resets = n("resets");
    let max_seq = n("requests");
    row.bytes_lost = (n("unanswered") + n("mismatches")) * request_bytes(max_seq, PAYLOAD_BYTES);
    if n("alive") != args.connections {
        row.error.get_or_insert(format!(
            "client: {} of {} connections alive",
            n("alive"),
            args.connections
        ));
    }
    row
}

/// The run's phases for the progress line: `prepare 7, freeze 11, ...` (ms).
fn phases_line(r: &RunReport) -> String {
    let mut line = r
        .phases
        .iter()
        .map(|ph| {
            format!(
                "{} {:.0}@{:.0}",
                ph.name,
                ph.ms,
                ph.start_unix_ms - r.started_unix_ms
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    if let Some(c) = &r.criu {
        let _ = write!(line, ", criu frozen {:.0}", c.frozen_ms);
    }
    let _ = write!(line, "; images {} B", r.image_bytes);
    if r.image_bytes_during_dump > 0 {
        let _ = write!(line, " ({} B during the dump)", r.image_bytes_during_dump);
    }
    line
}

fn fmt(v: Option<f64>) -> String {
    v.map_or("-".into(), |v| format!("{v:.0}"))
}

/// The table for people.
pub fn table(rows: &[Row]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "| memory MiB | link | memory | lock | gap p50 ms | gap p99 ms | frozen p50 ms | last page ms | bytes over link | resets | bytes lost | released | memory |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {}/{} | {} |",
            r.memory_mb,
            r.link,
            r.memory_mode,
            r.lock,
            fmt(r.gap_ms_p50),
            fmt(r.gap_ms_p99),
            fmt(r.frozen_ms_p50),
            fmt(r.last_page_ms),
            r.link_bytes,
            r.resets,
            r.bytes_lost,
            r.released,
            r.runs,
            match (r.memory_ok, &r.error) {
                (_, Some(e)) => format!("error: {e}"),
                (Some(true), None) => "clean".into(),
                (Some(false), None) => "WRONG".into(),
                (None, None) => "-".into(),
            }
        );
    }
    s
}

/// Gap p50 against memory (both log scales), a line per (link, memory mode, lock).
pub fn gap_svg(rows: &[Row]) -> Result<String, String> {
    let e = |e: &dyn std::fmt::Display| e.to_string();
    let pts: Vec<(&Row, f64)> = rows
        .iter()
        .filter_map(|r| r.gap_ms_p50.map(|g| (r, g.max(1.0))))
        .collect();
    let x_max = rows.iter().map(|r| r.memory_mb).max().unwrap_or(1).max(2) as f64 * 2.0;
    let y_max = pts.iter().map(|p| p.1).fold(10.0, f64::max) * 2.0;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (900, 560)).into_drawing_area();
        root.fill(&WHITE).map_err(|x| e(&x))?;
        let mut chart = ChartBuilder::on(&root)
            .caption(
                "client gap p50 against container memory",
                ("sans-serif", 20),
            )
            .margin(16)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d((0.5f64..x_max).log_scale(), (1f64..y_max).log_scale())
            .map_err(|x| e(&x))?;
        chart
            .configure_mesh()
            .x_desc("container memory (MiB, log)")
            .y_desc("client gap p50 (ms, log)")
            .draw()
            .map_err(|x| e(&x))?;
        let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
        for (r, g) in &pts {
            let key = format!("{} {} {}", r.link, r.memory_mode, r.lock);
            let point = (r.memory_mb as f64, *g);
            match series.iter_mut().find(|(k, _)| *k == key) {
                Some((_, v)) => v.push(point),
                None => series.push((key, vec![point])),
            }
        }
        for (i, (key, mut v)) in series.into_iter().enumerate() {
            v.sort_by(|a, b| a.0.total_cmp(&b.0));
            let colour = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(v.clone(), colour.stroke_width(2)))
                .map_err(|x| e(&x))?
                .label(key)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], colour));
            chart
                .draw_series(v.into_iter().map(|p| Circle::new(p, 3, colour.filled())))
                .map_err(|x| e(&x))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|x| e(&x))?;
        root.present().map_err(|x| e(&x))?;
    }
    Ok(svg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;
    use ferry_api::run::{LockMode, PhaseTiming};

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ScaleArgs,
    }

    fn parse(a: &[&str]) -> ScaleArgs {
        Cli::try_parse_from(std::iter::once("scale").chain(a.iter().copied()))
            .unwrap()
            .args
    }

    #[test]
    fn the_matrix_is_every_combination_and_quick_is_small() {
        let full = parse(&[]).cells().unwrap();
        assert_eq!(full.len(), 4 * 2 * 2 * 2);
        assert_eq!(full[0].link, "lan");
        assert_eq!(full[0].memory_mb, 1);
        assert_eq!(full.last().unwrap().memory_mb, 2048);
        let quick = parse(&["--quick"]).cells().unwrap();
        let names: Vec<(u64, &str, &str)> = quick
            .iter()
            .map(|c| (c.memory_mb, c.memory.as_str(), c.lock))
            .collect();
        assert_eq!(
            names,
            [
                (1, "copy", "hold"),
                (1, "lazy", "hold"),
                (64, "copy", "hold"),
                (64, "lazy", "hold")
            ]
        );
        let e = parse(&["--links", "moon"]).cells().unwrap_err();
        assert!(e.contains("lan, wan, intercontinental"), "{e}");
        let e = parse(&["--memory-modes", "eager"]).cells().unwrap_err();
        assert!(e.contains("copy or lazy"), "{e}");
        let e = parse(&["--locks", "drop"]).cells().unwrap_err();
        assert!(e.contains("hold or criu-lock"), "{e}");
        assert!(parse(&["--memory-mb", "0"]).cells().is_err());
    }

    fn report(phases: &[(&str, f64, f64, Option<u64>)], image_bytes: u64) -> RunReport {
        RunReport {
            id: "m1".into(),
            container: CONTAINER.parse().unwrap(),
            from: "a1".into(),
            to: "b1".into(),
            lock: LockMode::Hold,
            memory: MemoryMode::Lazy,
            state: RunState::Released,
            started_unix_ms: 1000.0,
            total_ms: 5000.0,
            stopped_ms: 300.0,
            phases: phases
                .iter()
                .map(|(n, s, ms, b)| PhaseTiming {
                    name: (*n).into(),
                    start_unix_ms: *s,
                    ms: *ms,
                    bytes: *b,
                })
                .collect(),
            events: vec![],
            criu: None,
            image_bytes,
            image_bytes_during_dump: 0,
            error: None,
        }
    }

    #[test]
    fn the_last_page_and_the_bytes_come_from_the_phases() {
        let copy = report(&[("transfer", 1200.0, 800.0, Some(9000))], 9000);
        assert_eq!(last_page_ms(&copy), Some(1000.0));
        assert_eq!(link_bytes(&copy), 9000);
        let lazy = report(
            &[
                ("transfer", 1200.0, 100.0, Some(500)),
                (PAGES_PHASE, 1500.0, 3000.0, Some(1 << 20)),
            ],
            500,
        );
        assert_eq!(last_page_ms(&lazy), Some(3500.0));
        assert_eq!(link_bytes(&lazy), 500 + (1 << 20));
        assert_eq!(last_page_ms(&report(&[], 0)), None);
    }

    #[test]
    fn the_table_and_the_plot_show_every_row() {
        let row = |mb, mode: &str, gap| Row {
            memory_mb: mb,
            link: "lan".into(),
            memory_mode: mode.into(),
            lock: "hold".into(),
            gap_ms_p50: gap,
            gap_ms_p99: gap,
            frozen_ms_p50: gap,
            last_page_ms: Some(1.0),
            link_bytes: 1,
            resets: 0,
            bytes_lost: 0,
            released: 1,
            runs: 1,
            memory_ok: Some(true),
            error: None,
        };
        let rows = vec![
            row(1, "copy", Some(50.0)),
            row(64, "copy", Some(400.0)),
            row(64, "lazy", None),
        ];
        let t = table(&rows);
        assert_eq!(t.lines().count(), 2 + 3, "{t}");
        assert!(t.contains("| 64 | lan | lazy | hold | - |"), "{t}");
        let svg = gap_svg(&rows).unwrap();
        assert!(svg.starts_with("<svg"), "{svg}");
        assert!(svg.contains("lan copy hold"), "{svg}");
        let v = serde_json::to_value(Report { rows }).unwrap();
        assert_eq!(v["rows"][0]["memory_mode"], "copy");
        assert_eq!(v["rows"][2]["gap_ms_p50"], Value::Null);
    }
}
