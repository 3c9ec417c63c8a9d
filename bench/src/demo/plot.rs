//! The demo's picture of a live migration as a client sees it: every request of
//! `ferry-workload client --samples` as a dot (x: when it was sent, y: its latency on a log
//! scale, one colour per connection), every migration run's phases as coloured vertical bands,
//! a label per run with the client-visible gap, and a legend. An SVG drawn with `plotters`.

use std::fmt::Write as _;

use ferry_api::run::{PHASES, RunReport, RunState};
use plotters::{coord::Shift, prelude::*};

use crate::samples::{Sample, client_gap_ms};

const WIDTH: u32 = 1000;
const HEIGHT: u32 = 560;
/// Height of the title and the legend above the chart.
const HEADER: u32 = 76;
/// Room above the chart's frame for the runs' labels (two rows).
const LABELS: u32 = 34;
/// The bottom of the latency axis, ms.
const Y_MIN_MS: f64 = 0.05;
const FONT: &str = "sans-serif";
/// Opacity of the phase bands (the dots show through).
const BAND_ALPHA: f64 = 0.55;

/// d3's category10: one colour per connection.
const CONN_COLOURS: [RGBColor; 10] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0xe3, 0x77, 0xc2),
    RGBColor(0x7f, 0x7f, 0x7f),
    RGBColor(0xbc, 0xbd, 0x22),
    RGBColor(0x17, 0xbe, 0xcf),
];
/// Connections named in the legend (the rest: "+N more").
const LEGEND_CONNS: usize = 8;

/// Drawing the plot failed (plotters' error, rendered: it is generic over the backend).
#[derive(Debug, thiserror::Error)]
#[error("drawing the latency plot: {0}")]
pub struct PlotError(String);

impl<E: std::error::Error + Send + Sync> From<DrawingAreaErrorKind<E>> for PlotError {
    fn from(e: DrawingAreaErrorKind<E>) -> Self {
        Self(e.to_string())
    }
}

/// A phase's band colour ([`PHASES`] order; anything else grey).
pub fn phase_colour(name: &str) -> RGBColor {
    match name {
        "prepare" => RGBColor(0x9e, 0xca, 0xe1),
        "freeze" => RGBColor(0xfd, 0xae, 0x6b),
        "dump" => RGBColor(0xfb, 0x6a, 0x4a),
        "transfer" => RGBColor(0xbc, 0x80, 0xbd),
        "restore" => RGBColor(0x74, 0xc4, 0x76),
        "release" => RGBColor(0xff, 0xd9, 0x2f),
        _ => RGBColor(0xbd, 0xbd, 0xbd),
    }
}

fn conn_colour(conn: u32) -> RGBColor {
    CONN_COLOURS[conn as usize % CONN_COLOURS.len()]
}

/// A number without needless zeros: 0.05, 0.1, 2, 150, 1.5.
fn short(v: f64) -> String {
    let s = format!("{v:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s.is_empty() || s == "-" {
        "0".into()
    } else {
        s.to_owned()
    }
}

/// What the axes span: time from the first request (or run) to the last reply (or phase),
/// latency up to a bit above the slowest reply.
struct Extent {
    t0_unix_ms: f64,
    t_max_s: f64,
    y_max_ms: f64,
}

impl Extent {
    fn new(samples: &[Sample], runs: &[RunReport]) -> Self {
        let t0_unix_ms = samples
            .iter()
            .map(|s| s.unix_ms)
            .reduce(f64::min)
            .or_else(|| runs.iter().map(|r| r.started_unix_ms).reduce(f64::min))
            .unwrap_or(0.0);
        let mut end = t0_unix_ms;
        for s in samples {
            end = end.max(s.reply_unix_ms().unwrap_or(s.unix_ms));
        }
        for r in runs {
            end = end.max(r.started_unix_ms + r.total_ms);
            for p in &r.phases {
                end = end.max(p.start_unix_ms + p.ms);
            }
        }
        let max_latency = samples
            .iter()
            .filter_map(|s| s.latency_ms)
            .fold(0.0f64, f64::max);
        Self {
            t0_unix_ms,
            t_max_s: ((end - t0_unix_ms) / 1e3).max(0.001),
            y_max_ms: (max_latency * 1.15).max(1.0),
        }
    }

    /// Seconds since the first request.
    fn t(&self, unix_ms: f64) -> f64 {
        (unix_ms - self.t0_unix_ms) / 1e3
    }

    fn latency(&self, ms: f64) -> f64 {
        ms.clamp(Y_MIN_MS, self.y_max_ms)
    }
}

/// The label above a run: `a1 → b1, gap 142 ms` (and the state if it did not release).
pub fn run_label(run: &RunReport, samples: &[Sample]) -> String {
    let mut s = format!("{} → {}", run.from, run.to);
    if samples.is_empty() {
        s.push_str(", no samples");
    } else {
        let gap = client_gap_ms(
            samples,
            run.started_unix_ms,
            run.started_unix_ms + run.total_ms,
        );
        let _ = write!(s, ", gap {gap:.0} ms");
    }
    if run.state != RunState::Released {
        let _ = write!(s, " ({})", run.state.as_str());
    }
    s
}

/// The plot (see the module docs) as a standalone SVG document.
pub fn latency_svg(
    samples: &[Sample],
    runs: &[RunReport],
    title: &str,
) -> Result<String, PlotError> {
    let ext = Extent::new(samples, runs);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE)?;
        let (header, body) = root.split_vertically(HEADER);
        header.draw_text(
            title,
            &(FONT, 20).into_font().style(FontStyle::Bold).color(&BLACK),
            (72, 8),
        )?;
        legend(&header, samples, runs)?;

        let mut chart = ChartBuilder::on(&body)
            .margin_top(LABELS)
            .margin_right(24)
            .x_label_area_size(44)
            .y_label_area_size(64)
            .build_cartesian_2d(0f64..ext.t_max_s, (Y_MIN_MS..ext.y_max_ms).log_scale())?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .light_line_style(RGBColor(0xee, 0xee, 0xee))
            .bold_line_style(RGBColor(0xd0, 0xd0, 0xd0))
            .x_labels(12)
            .x_label_formatter(&|v| short(*v))
            .y_label_formatter(&|v| short(*v))
            .x_desc("time since the first request (s)")
            .y_desc("latency per request (ms, log)")
            .label_style((FONT, 15))
            .axis_desc_style((FONT, 15))
            .draw()?;

        // Phase bands, at least a pixel wide.
        let px_s = ext.t_max_s / f64::from(chart.plotting_area().dim_in_pixel().0.max(1));
        for r in runs {
            // Phases overlap (freeze happens inside dump): the longest go underneath.
            let mut phases: Vec<_> = r.phases.iter().collect();
            phases.sort_by(|a, b| b.ms.total_cmp(&a.ms));
            chart.draw_series(phases.into_iter().map(|p| {
                let x0 = ext.t(p.start_unix_ms);
                let x1 = ext.t(p.start_unix_ms + p.ms).max(x0 + px_s);
                Rectangle::new(
                    [(x0, Y_MIN_MS), (x1, ext.y_max_ms)],
                    phase_colour(&p.name).mix(BAND_ALPHA).filled(),
                )
            }))?;
        }

        // The requests: answered ones at their latency, unanswered ones as crosses at the top.
        let top = ext.y_max_ms / 1.08;
        chart.draw_series(samples.iter().map(|s| {
            let colour = conn_colour(s.conn);
            let t = ext.t(s.unix_ms);
            match s.latency_ms {
                Some(l) => Circle::new((t, ext.latency(l)), 2, colour.mix(0.5).filled()).into_dyn(),
                None => Cross::new((t, top), 4, colour.stroke_width(2)).into_dyn(),
            }
        }))?;

        // A label above each run; one that would run into the previous goes on a second row.
        let (frame_top, label_style) = (
            chart.plotting_area().get_base_pixel().1,
            (FONT, 15).into_font().style(FontStyle::Bold).color(&BLACK),
        );
        let mut label_ends = [i32::MIN; 2];
        for r in runs {
            let label = run_label(r, samples);
            let (x, _) = chart.backend_coord(&(ext.t(r.started_unix_ms), ext.y_max_ms));
            let row = usize::from(x < label_ends[0] + 8 && label_ends[1] < label_ends[0]);
            label_ends[row] = x + 8 * label.chars().count() as i32;
            let y = frame_top - 18 - 15 * row as i32;
            root.draw_text(&label, &label_style, (x, y))?;
        }
    }
    Ok(svg)
}

/// Phases on one row (every known phase, then any other a run had), connections on the next.
fn legend(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    samples: &[Sample],
    runs: &[RunReport],
) -> Result<(), PlotError> {
    let text = (FONT, 15).into_font().color(&BLACK);
    let text_width = |s: &str| 8 * s.chars().count() as i32;
    let mut names: Vec<&str> = PHASES.to_vec();
    for r in runs {
        for p in &r.phases {
            if !names.contains(&p.name.as_str()) {
                names.push(&p.name);
            }
        }
    }
    let mut x = 72;
    for name in names {
        area.draw(&Rectangle::new(
            [(x, 38), (x + 12, 50)],
            phase_colour(name).mix(BAND_ALPHA).filled(),
        ))?;
        area.draw_text(name, &text, (x + 16, 37))?;
        x += 30 + text_width(name);
    }
    let mut conns: Vec<u32> = samples.iter().map(|s| s.conn).collect();
    conns.sort_unstable();
    conns.dedup();
    let mut x = 72;
    for &c in conns.iter().take(LEGEND_CONNS) {
        area.draw(&Circle::new((x + 5, 64), 4, conn_colour(c).filled()))?;
        area.draw_text(&format!("conn {c}"), &text, (x + 14, 57))?;
        x += 70;
    }
    if conns.len() > LEGEND_CONNS {
        let more = format!("+{} more", conns.len() - LEGEND_CONNS);
        area.draw_text(&more, &text, (x, 57))?;
        x += 70;
    }
    if samples.iter().any(|s| s.latency_ms.is_none()) {
        area.draw(&Cross::new((x + 5, 64), 4, RED.stroke_width(2)))?;
        area.draw_text("unanswered (at the top)", &text, (x + 14, 57))?;
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use std::net::Ipv4Addr;

    use ferry_api::run::{LockMode, PhaseTiming};

    use super::*;
    use crate::samples::tests::steady;

    pub(crate) fn run(
        id: &str,
        from: &str,
        to: &str,
        start: f64,
        phases: &[(&str, f64)],
    ) -> RunReport {
        let mut t = start;
        let phases: Vec<PhaseTiming> = phases
            .iter()
            .map(|(name, ms)| {
                let p = PhaseTiming {
                    name: (*name).into(),
                    start_unix_ms: t,
                    ms: *ms,
                    bytes: (*name == "transfer").then_some(5 << 20),
                };
                t += ms;
                p
            })
            .collect();
        RunReport {
            id: id.into(),
            container: Ipv4Addr::new(10, 244, 1, 10),
            from: from.into(),
            to: to.into(),
            lock: LockMode::Hold,
            memory: Default::default(),
            state: RunState::Released,
            started_unix_ms: start,
            total_ms: t - start,
            stopped_ms: 0.0,
            phases,
            events: Vec::new(),
            criu: None,
            image_bytes: 5 << 20,
            image_bytes_during_dump: 0,
            error: None,
        }
    }

    fn hex(c: RGBColor) -> String {
        format!("#{:02X}{:02X}{:02X}", c.0, c.1, c.2)
    }

    fn num(n: roxmltree::Node<'_, '_>, attr: &str) -> f64 {
        n.attribute(attr)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no number {attr} in {n:?}"))
    }

    fn texts(doc: &roxmltree::Document<'_>) -> Vec<String> {
        doc.descendants()
            .filter(|n| n.has_tag_name("text"))
            .map(|n| n.text().unwrap_or_default().trim().to_owned())
            .collect()
    }

    #[test]
    fn the_svg_shows_every_request_every_phase_and_a_legend() {
        let t0 = 1_700_000_000_000.0;
        let mut samples = steady(0, t0, Some((t0 + 2000.0, t0 + 2142.0)));
        samples.extend(steady(1, t0, None));
        samples.extend(steady(2, t0, None));
        samples[2 * 2000 + 10].latency_ms = None; // conn 2, one unanswered
        let runs = vec![
            run(
                "m1",
                "a1",
                "b1",
                t0 + 1900.0,
                &[
                    ("prepare", 50.0),
                    ("freeze", 50.0),
                    ("dump", 40.0),
                    ("transfer", 30.0),
                    ("restore", 20.0),
                    ("release", 10.0),
                ],
            ),
            run(
                "m2",
                "b1",
                "a1",
                t0 + 6000.0,
                &[("prepare", 10.0), ("freeze", 500.0), ("release", 1.0)],
            ),
        ];
        let title = "ferry demo: a1 → b1 → a1 <live> & \"quoted\"";
        let svg = latency_svg(&samples, &runs, title).unwrap();
        let doc = roxmltree::Document::parse(&svg).expect("well-formed SVG");
        assert!(doc.root_element().has_tag_name("svg"));
        let texts = texts(&doc);
        assert!(texts.iter().any(|t| t == title), "title escaped: {texts:?}");

        // One dot per answered request (and one per connection in the legend).
        let circles = doc.descendants().filter(|n| n.has_tag_name("circle"));
        assert_eq!(circles.count(), 3 * 2000 - 1 + 3);

        // A band per phase of each run (and a legend box per phase), in the phase's colour;
        // m1's freeze lies left of its dump, both inside the frame.
        let bands = |phase: &str| -> Vec<f64> {
            doc.descendants()
                .filter(|n| {
                    n.has_tag_name("rect") && n.attribute("fill") == Some(&hex(phase_colour(phase)))
                })
                .map(|n| num(n, "x"))
                .collect()
        };
        for (phase, n) in [
            ("prepare", 2),
            ("freeze", 2),
            ("dump", 1),
            ("transfer", 1),
            ("restore", 1),
            ("release", 2),
        ] {
            assert_eq!(bands(phase).len(), n + 1, "{phase}: bands and legend box");
        }
        let in_chart = |v: Vec<f64>| v.into_iter().filter(|x| *x > 72.0).collect::<Vec<_>>();
        let (freeze, dump) = (in_chart(bands("freeze")), in_chart(bands("dump")));
        assert!(
            freeze[0] < dump[0] && dump[0] < f64::from(WIDTH),
            "{freeze:?} {dump:?}"
        );

        // Labels with the client-visible gap (conn 0: replies at 1995.1 then 2142), a legend
        // entry per phase and per connection, and the unanswered marker.
        for want in ["a1 → b1, gap 147 ms", "b1 → a1, gap 5 ms"] {
            assert!(texts.iter().any(|t| t == want), "{want}: {texts:?}");
        }
        for p in PHASES {
            assert!(texts.iter().any(|t| t == p), "legend {p}");
        }
        for c in 0..3 {
            assert!(texts.iter().any(|t| *t == format!("conn {c}")));
        }
        assert!(texts.iter().any(|t| t == "unanswered (at the top)"));
        assert!(texts.iter().any(|t| t == "latency per request (ms, log)"));
    }

    #[test]
    fn latencies_are_on_a_log_scale() {
        let s: Vec<Sample> = [0.05, 1.0, 10.0, 100.0]
            .into_iter()
            .enumerate()
            .map(|(i, l)| Sample {
                unix_ms: 1000.0 * i as f64,
                conn: 0,
                seq: i as u64 + 1,
                latency_ms: Some(l),
            })
            .collect();
        let svg = latency_svg(&s, &[], "log").unwrap();
        let doc = roxmltree::Document::parse(&svg).unwrap();
        // The dots, left to right (the legend's dot is in the header).
        let mut dots: Vec<(f64, f64)> = doc
            .descendants()
            .filter(|n| n.has_tag_name("circle") && num(*n, "cy") > f64::from(HEADER))
            .map(|n| (num(n, "cx"), num(n, "cy")))
            .collect();
        dots.sort_by(|a, b| a.0.total_cmp(&b.0));
        let y: Vec<f64> = dots.iter().map(|d| d.1).collect();
        assert_eq!(y.len(), 4);
        assert!(y[0] > y[1] && y[1] > y[2] && y[2] > y[3], "{y:?}");
        // Decades are equally tall (to a pixel: plotters rounds to whole pixels).
        assert!(((y[1] - y[2]) - (y[2] - y[3])).abs() <= 1.0, "{y:?}");
        let texts = texts(&doc);
        for tick in ["0.1", "1", "10", "100"] {
            assert!(texts.iter().any(|t| t == tick), "tick {tick}: {texts:?}");
        }
        assert_eq!(short(0.05), "0.05");
        assert_eq!(short(150.0), "150");
        assert_eq!(short(1.5), "1.5");
    }

    #[test]
    fn an_empty_plot_is_still_a_document() {
        let svg = latency_svg(&[], &[], "empty").unwrap();
        roxmltree::Document::parse(&svg).expect("well-formed SVG");
    }
}
