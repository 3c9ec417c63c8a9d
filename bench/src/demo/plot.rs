//! The demo's picture of a live migration as a client sees it: every request of
//! `ferry-workload client --samples` as a dot (x: when it was sent, y: its latency on a log
//! scale, one colour per connection), every migration run's phases as coloured vertical bands,
//! and a label per run with the client-visible gap. A self-contained SVG written by hand.

use std::{collections::BTreeMap, fmt::Write as _, io, path::Path};

use ferry_api::run::{PHASES, RunReport, RunState};

/// One request as the client saw it (a line of `ferry-workload client --samples`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// When the request was sent, fractional Unix milliseconds.
    pub unix_ms: f64,
    pub conn: u32,
    pub seq: u64,
    /// `None`: never answered (or answered wrongly).
    pub latency_ms: Option<f64>,
}

impl Sample {
    /// When the reply arrived, Unix milliseconds.
    pub fn reply_unix_ms(&self) -> Option<f64> {
        self.latency_ms.map(|l| self.unix_ms + l)
    }
}

/// Reads a samples CSV (`unix_ms,conn,seq,latency_ms`, header first, empty latency: no reply).
pub fn read_samples(path: impl AsRef<Path>) -> io::Result<Vec<Sample>> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path)?;
    parse_samples(&text).map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

/// Parses the text of a samples CSV (see [`read_samples`]).
pub fn parse_samples(text: &str) -> io::Result<Vec<Sample>> {
    let bad = |line: usize, what: String| {
        io::Error::new(io::ErrorKind::InvalidData, format!("line {line}: {what}"))
    };
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || (i == 0 && line.starts_with("unix_ms")) {
            continue;
        }
        let f: Vec<&str> = line.split(',').map(str::trim).collect();
        let [unix_ms, conn, seq, latency] = f[..] else {
            return Err(bad(i + 1, format!("{} fields, want 4", f.len())));
        };
        let num = |name: &str, v: &str| {
            v.parse::<f64>()
                .ok()
                .filter(|x| x.is_finite())
                .ok_or_else(|| bad(i + 1, format!("{name} {v:?} is not a number")))
        };
        out.push(Sample {
            unix_ms: num("unix_ms", unix_ms)?,
            conn: conn
                .parse()
                .map_err(|e| bad(i + 1, format!("conn {conn:?}: {e}")))?,
            seq: seq
                .parse()
                .map_err(|e| bad(i + 1, format!("seq {seq:?}: {e}")))?,
            latency_ms: if latency.is_empty() {
                None
            } else {
                Some(num("latency_ms", latency)?)
            },
        });
    }
    Ok(out)
}

/// The client-visible gap around a window (a migration run): per connection, the longest
/// interval between consecutive reply arrivals (`unix_ms + latency`) that overlaps
/// `[from_unix_ms, to_unix_ms]`; the largest over connections, in ms (0 if none overlaps).
///
/// A connection's first request counts as its first "arrival" (silence from the first send
/// on is silence too), and a connection left with unanswered requests after its last reply
/// is silent until the end of the samples (the last send or reply of any connection).
pub fn client_gap_ms(samples: &[Sample], from_unix_ms: f64, to_unix_ms: f64) -> f64 {
    let end = samples
        .iter()
        .map(|s| s.reply_unix_ms().unwrap_or(s.unix_ms))
        .fold(f64::NEG_INFINITY, f64::max);
    // conn → (reply arrivals, first send, anything unanswered)
    let mut by_conn: BTreeMap<u32, (Vec<f64>, f64, bool)> = BTreeMap::new();
    for s in samples {
        let (points, first, unanswered) =
            by_conn
                .entry(s.conn)
                .or_insert((Vec::new(), f64::INFINITY, false));
        *first = first.min(s.unix_ms);
        match s.reply_unix_ms() {
            Some(t) => points.push(t),
            None => *unanswered = true,
        }
    }
    let mut gap = 0.0f64;
    for (mut points, first, unanswered) in by_conn.into_values() {
        points.push(first);
        points.sort_by(f64::total_cmp);
        if unanswered {
            points.push(end);
        }
        for w in points.windows(2) {
            let (a, b) = (w[0], w[1]);
            if a <= to_unix_ms && b >= from_unix_ms {
                gap = gap.max(b - a);
            }
        }
    }
    gap
}

// Layout (SVG user units = px).
const WIDTH: f64 = 1000.0;
const HEIGHT: f64 = 540.0;
const LEFT: f64 = 72.0;
const RIGHT: f64 = 24.0;
const TOP: f64 = 92.0;
const BOTTOM: f64 = 50.0;
const PLOT_W: f64 = WIDTH - LEFT - RIGHT;
const PLOT_H: f64 = HEIGHT - TOP - BOTTOM;
/// The bottom of the latency axis, ms.
const Y_MIN_MS: f64 = 0.05;

const CONN_COLOURS: [&str; 10] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf",
];
/// Connections named in the legend (the rest: "+N more").
const LEGEND_CONNS: usize = 8;

/// A phase's band colour ([`PHASES`] order; anything else grey).
fn phase_colour(name: &str) -> &'static str {
    match name {
        "prepare" => "#9ecae1",
        "freeze" => "#fdae6b",
        "dump" => "#fb6a4a",
        "transfer" => "#bc80bd",
        "restore" => "#74c476",
        "release" => "#ffd92f",
        _ => "#bdbdbd",
    }
}

fn conn_colour(conn: u32) -> &'static str {
    CONN_COLOURS[conn as usize % CONN_COLOURS.len()]
}

/// Escapes text for XML content and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if (c as u32) < 0x20 && c != '\n' && c != '\t' => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// Where things go: time (s since `t0`) → x, latency (ms, log) → y.
struct Frame {
    t0_unix_ms: f64,
    t_max_s: f64,
    y_max_ms: f64,
}

impl Frame {
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
        let t_max_s = ((end - t0_unix_ms) / 1e3).max(0.001);
        let max_latency = samples
            .iter()
            .filter_map(|s| s.latency_ms)
            .fold(0.0f64, f64::max);
        Self {
            t0_unix_ms,
            t_max_s,
            y_max_ms: (max_latency * 1.15).max(1.0),
        }
    }

    fn x_s(&self, t_s: f64) -> f64 {
        LEFT + (t_s / self.t_max_s).clamp(0.0, 1.0) * PLOT_W
    }

    fn x(&self, unix_ms: f64) -> f64 {
        self.x_s((unix_ms - self.t0_unix_ms) / 1e3)
    }

    fn y(&self, ms: f64) -> f64 {
        let (lo, hi) = (Y_MIN_MS.ln(), self.y_max_ms.ln());
        let f = (ms.clamp(Y_MIN_MS, self.y_max_ms).ln() - lo) / (hi - lo);
        TOP + (1.0 - f) * PLOT_H
    }
}

/// A "nice" tick step (1, 2 or 5 × 10^k) for about `target` ticks over `span`.
fn nice_step(span: f64, target: f64) -> f64 {
    let raw = (span / target).max(f64::MIN_POSITIVE);
    let mag = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw * 0.999)
        .unwrap_or(10.0 * mag)
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

/// Latency ticks: 1, 2, 5 × 10^k within [`Y_MIN_MS`, max]; `true` marks the decades.
fn log_ticks(max: f64) -> Vec<(f64, bool)> {
    let mut out = Vec::new();
    let mut k = Y_MIN_MS.log10().floor() as i32;
    while 10f64.powi(k) <= max {
        for m in [1.0, 2.0, 5.0] {
            let v = m * 10f64.powi(k);
            if v >= Y_MIN_MS * 0.999 && v <= max {
                out.push((v, m == 1.0));
            }
        }
        k += 1;
    }
    out
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
pub fn latency_svg(samples: &[Sample], runs: &[RunReport], title: &str) -> String {
    let f = Frame::new(samples, runs);
    let mut o = String::with_capacity(256 + samples.len() * 90);
    let _ = writeln!(o, r#"<?xml version="1.0" encoding="UTF-8"?>"#);
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(o, "<title>{}</title>", esc(title));
    let _ = writeln!(
        o,
        r##"<rect x="0" y="0" width="{WIDTH}" height="{HEIGHT}" fill="#ffffff"/>"##
    );
    let _ = writeln!(
        o,
        r#"<text x="{LEFT}" y="22" font-size="16" font-weight="bold">{}</text>"#,
        esc(title)
    );

    // Grid and y ticks.
    let _ = writeln!(o, r#"<g class="y-axis">"#);
    for (v, decade) in log_ticks(f.y_max_ms) {
        let y = f.y(v);
        let _ = writeln!(
            o,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{}" stroke-width="1"/>"##,
            LEFT + PLOT_W,
            if decade { "#d0d0d0" } else { "#eeeeee" }
        );
        let _ = writeln!(
            o,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"#,
            LEFT - 6.0,
            y + 4.0,
            short(v)
        );
    }
    let _ = writeln!(
        o,
        r#"<text x="18" y="{:.1}" text-anchor="middle" transform="rotate(-90 18 {:.1})">latency per request (ms, log)</text>"#,
        TOP + PLOT_H / 2.0,
        TOP + PLOT_H / 2.0
    );
    let _ = writeln!(o, "</g>");

    // x ticks.
    let step = nice_step(f.t_max_s, 10.0);
    let _ = writeln!(o, r#"<g class="x-axis">"#);
    let mut i = 0u32;
    loop {
        let t = f64::from(i) * step;
        if t > f.t_max_s * 1.0001 {
            break;
        }
        let x = f.x_s(t);
        let _ = writeln!(
            o,
            r##"<line x1="{x:.1}" y1="{:.1}" x2="{x:.1}" y2="{:.1}" stroke="#333333"/>"##,
            TOP + PLOT_H,
            TOP + PLOT_H + 5.0
        );
        let _ = writeln!(
            o,
            r#"<text x="{x:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            TOP + PLOT_H + 18.0,
            short(t)
        );
        i += 1;
    }
    let _ = writeln!(
        o,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">time since the first request (s)</text>"#,
        LEFT + PLOT_W / 2.0,
        HEIGHT - 10.0
    );
    let _ = writeln!(o, "</g>");

    // Phase bands and run labels.
    let _ = writeln!(o, r#"<g class="runs">"#);
    // Labels that would run into the previous one go on a second row.
    let mut label_ends = [f64::NEG_INFINITY; 2];
    for r in runs {
        // Phases overlap (freeze happens inside dump): the longest go underneath.
        let mut phases: Vec<_> = r.phases.iter().collect();
        phases.sort_by(|a, b| b.ms.total_cmp(&a.ms));
        for p in phases {
            let x = f.x(p.start_unix_ms);
            let w = (f.x(p.start_unix_ms + p.ms) - x).max(1.0);
            let _ = writeln!(
                o,
                r#"<rect class="phase phase-{}" data-run="{}" x="{x:.2}" y="{TOP}" width="{w:.2}" height="{PLOT_H}" fill="{}" fill-opacity="0.55"><title>{} {}: {:.1} ms</title></rect>"#,
                esc(&p.name),
                esc(&r.id),
                phase_colour(&p.name),
                esc(&r.id),
                esc(&p.name),
                p.ms
            );
        }
        let label = run_label(r, samples);
        let x = f.x(r.started_unix_ms);
        let row = usize::from(x < label_ends[0] + 8.0 && label_ends[1] < label_ends[0]);
        label_ends[row] = x + 7.5 * label.chars().count() as f64;
        let _ = writeln!(
            o,
            r#"<text class="run-label" data-run="{}" x="{x:.1}" y="{:.1}" font-weight="bold">{}</text>"#,
            esc(&r.id),
            TOP - 6.0 - 14.0 * row as f64,
            esc(&label)
        );
    }
    let _ = writeln!(o, "</g>");

    // The requests.
    let _ = writeln!(o, r#"<g class="samples" fill-opacity="0.5">"#);
    for s in samples {
        let x = f.x(s.unix_ms);
        match s.latency_ms {
            Some(l) => {
                let _ = writeln!(
                    o,
                    r#"<circle cx="{x:.1}" cy="{:.1}" r="1.6" fill="{}"/>"#,
                    f.y(l),
                    conn_colour(s.conn)
                );
            }
            None => {
                let y = TOP + 4.0;
                let _ = writeln!(
                    o,
                    r#"<path class="unanswered" d="M{:.1} {:.1}l6 6m0 -6l-6 6" stroke="{}" stroke-width="1.5"/>"#,
                    x - 3.0,
                    y - 3.0,
                    conn_colour(s.conn)
                );
            }
        }
    }
    let _ = writeln!(o, "</g>");

    // The frame.
    let _ = writeln!(
        o,
        r##"<rect x="{LEFT}" y="{TOP}" width="{PLOT_W}" height="{PLOT_H}" fill="none" stroke="#333333"/>"##
    );

    // Legend: phases on one row, connections on the next.
    let _ = writeln!(o, r#"<g class="legend">"#);
    let mut x = LEFT;
    let mut names: Vec<&str> = PHASES.to_vec();
    for r in runs {
        for p in &r.phases {
            if !names.contains(&p.name.as_str()) {
                names.push(&p.name);
            }
        }
    }
    for name in names {
        let _ = writeln!(
            o,
            r#"<rect x="{x:.1}" y="36" width="12" height="12" fill="{}" fill-opacity="0.55"/><text x="{:.1}" y="46">{}</text>"#,
            phase_colour(name),
            x + 16.0,
            esc(name)
        );
        x += 30.0 + 7.5 * name.chars().count() as f64;
    }
    let mut conns: Vec<u32> = samples.iter().map(|s| s.conn).collect();
    conns.sort_unstable();
    conns.dedup();
    let mut x = LEFT;
    for c in conns.iter().take(LEGEND_CONNS) {
        let _ = writeln!(
            o,
            r#"<circle cx="{:.1}" cy="60" r="4" fill="{}"/><text x="{:.1}" y="64">conn {c}</text>"#,
            x + 5.0,
            conn_colour(*c),
            x + 14.0
        );
        x += 70.0;
    }
    if conns.len() > LEGEND_CONNS {
        let _ = writeln!(
            o,
            r#"<text x="{x:.1}" y="64">+{} more</text>"#,
            conns.len() - LEGEND_CONNS
        );
        x += 70.0;
    }
    if samples.iter().any(|s| s.latency_ms.is_none()) {
        let _ = writeln!(
            o,
            r##"<path d="M{:.1} 57l6 6m0 -6l-6 6" stroke="#d62728" stroke-width="1.5"/><text x="{:.1}" y="64">unanswered (at the top)</text>"##,
            x + 2.0,
            x + 14.0
        );
    }
    let _ = writeln!(o, "</g>");
    o.push_str("</svg>\n");
    o
}

#[cfg(test)]
pub(crate) mod tests {
    use std::net::Ipv4Addr;

    use ferry_api::run::{LockMode, PhaseTiming};

    use super::*;

    /// Checks that `doc` is well-formed enough: tags balance, one root `svg`, attribute values
    /// quoted, and text and attributes use only known entities. Returns the element names.
    pub(crate) fn check_xml(doc: &str) -> Vec<String> {
        let mut stack: Vec<String> = Vec::new();
        let mut seen = Vec::new();
        let mut roots = 0;
        let mut rest = doc;
        let check_entities = |text: &str| {
            let mut t = text;
            while let Some(i) = t.find('&') {
                let after = &t[i..];
                assert!(
                    ["&amp;", "&lt;", "&gt;", "&quot;", "&#39;"]
                        .iter()
                        .any(|e| after.starts_with(e)),
                    "bare & in {text:?}"
                );
                t = &t[i + 1..];
            }
        };
        while let Some(i) = rest.find('<') {
            let text = &rest[..i];
            assert!(!text.contains('>'), "stray > in text {text:?}");
            check_entities(text);
            if !stack.is_empty() || text.trim().is_empty() {
            } else {
                panic!("text outside the root: {text:?}");
            }
            rest = &rest[i..];
            if let Some(r) = rest.strip_prefix("<?") {
                let end = r.find("?>").expect("unterminated <?");
                rest = &r[end + 2..];
                continue;
            }
            if let Some(r) = rest.strip_prefix("<!--") {
                let end = r.find("-->").expect("unterminated comment");
                rest = &r[end + 3..];
                continue;
            }
            let end = rest.find('>').expect("unterminated tag");
            let tag = &rest[1..end];
            rest = &rest[end + 1..];
            assert!(!tag.contains('<'), "< inside tag {tag:?}");
            if let Some(name) = tag.strip_prefix('/') {
                let open = stack
                    .pop()
                    .unwrap_or_else(|| panic!("</{name}> closes nothing"));
                assert_eq!(open, name.trim(), "</{name}> closes <{open}>");
                continue;
            }
            let self_closing = tag.ends_with('/');
            let tag = tag.trim_end_matches('/');
            let name = tag.split_ascii_whitespace().next().expect("a tag name");
            assert!(
                name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'),
                "bad tag name {name:?}"
            );
            // Attributes: name="value" pairs.
            let mut attrs = tag[name.len()..].trim();
            while !attrs.is_empty() {
                let eq = attrs
                    .find('=')
                    .unwrap_or_else(|| panic!("attribute without value in {tag:?}"));
                let q = attrs[eq + 1..].chars().next();
                assert_eq!(q, Some('"'), "unquoted attribute in {tag:?}");
                let v_end = attrs[eq + 2..].find('"').expect("unterminated attribute") + eq + 2;
                check_entities(&attrs[eq + 2..v_end]);
                attrs = attrs[v_end + 1..].trim_start();
            }
            if stack.is_empty() {
                roots += 1;
                assert_eq!(name, "svg", "the root is not svg");
            }
            seen.push(name.to_owned());
            if !self_closing {
                stack.push(name.to_owned());
            }
        }
        assert!(rest.trim().is_empty(), "text after the root: {rest:?}");
        assert!(stack.is_empty(), "unclosed: {stack:?}");
        assert_eq!(roots, 1);
        seen
    }

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
            state: RunState::Released,
            started_unix_ms: start,
            total_ms: t - start,
            stopped_ms: 0.0,
            phases,
            events: Vec::new(),
            criu: None,
            image_bytes: 5 << 20,
            error: None,
        }
    }

    /// One connection, a request every 5 ms from `t0` to `t0 + 10 s`, 0.1 ms each; the ones
    /// sent in `[stall_from, stall_to)` answered at `stall_to`.
    fn steady(conn: u32, t0: f64, stall: Option<(f64, f64)>) -> Vec<Sample> {
        (0..2000u32)
            .map(|i| {
                let sent = t0 + f64::from(i) * 5.0;
                let latency = match stall {
                    Some((a, b)) if sent >= a && sent < b => b - sent,
                    _ => 0.1,
                };
                Sample {
                    unix_ms: sent,
                    conn,
                    seq: u64::from(i) + 1,
                    latency_ms: Some(latency),
                }
            })
            .collect()
    }

    fn attr<'a>(elem: &'a str, name: &str) -> &'a str {
        let key = format!(" {name}=\"");
        let i = elem
            .find(&key)
            .unwrap_or_else(|| panic!("no {name} in {elem}"))
            + key.len();
        &elem[i..i + elem[i..].find('"').unwrap()]
    }

    #[test]
    fn samples_parse_with_and_without_a_reply() {
        let s = parse_samples("unix_ms,conn,seq,latency_ms\n1000.5,0,1,0.062\n1001.25,3,9,\n\n")
            .unwrap();
        assert_eq!(
            s,
            vec![
                Sample {
                    unix_ms: 1000.5,
                    conn: 0,
                    seq: 1,
                    latency_ms: Some(0.062)
                },
                Sample {
                    unix_ms: 1001.25,
                    conn: 3,
                    seq: 9,
                    latency_ms: None
                },
            ]
        );
        for bad in ["1,2,3", "x,0,1,1", "1,0,1,1,5", "1,-1,1,1", "1,0,1,nan"] {
            let e = parse_samples(bad).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{bad}: {e}");
            assert!(e.to_string().contains("line 1"), "{e}");
        }
        let dir = std::env::temp_dir().join(format!("ferry-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.csv");
        std::fs::write(&path, "unix_ms,conn,seq,latency_ms\n5,1,2,3\n").unwrap();
        assert_eq!(read_samples(&path).unwrap().len(), 1);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_gap_is_the_longest_silence_overlapping_the_window() {
        // conn 0 stalls 300 ms at 2 s; conn 1 stalls 120 ms at 2.05 s; conn 2 never stalls.
        let mut s = steady(0, 0.0, Some((2000.0, 2300.0)));
        s.extend(steady(1, 0.0, Some((2050.0, 2170.0))));
        s.extend(steady(2, 0.0, None));
        // Replies at 1995.1 then 2300 on conn 0: 304.9 ms.
        let g = client_gap_ms(&s, 1900.0, 2400.0);
        assert!((g - 304.9).abs() < 1e-6, "{g}");
        // A window that only touches the stall's end still sees it.
        let g = client_gap_ms(&s, 2299.0, 2299.5);
        assert!((g - 304.9).abs() < 1e-6, "{g}");
        // Far from the stall: the 5 ms cadence.
        let g = client_gap_ms(&s, 5000.0, 6000.0);
        assert!((g - 5.0).abs() < 1e-6, "{g}");
        // Only conn 1 stalls in a window that excludes conn 0's stall? No: conn 0's silence
        // spans it; a window after conn 0's stall but inside conn 1's does not exist here.
        // Without conn 0, conn 1's stall: replies at 2045.1 then 2170.
        let only1: Vec<_> = s.iter().copied().filter(|x| x.conn == 1).collect();
        let g = client_gap_ms(&only1, 2100.0, 2100.0);
        assert!((g - 124.9).abs() < 1e-6, "{g}");
        assert_eq!(client_gap_ms(&[], 0.0, 1.0), 0.0);
        assert_eq!(client_gap_ms(&s, 20_000.0, 30_000.0), 0.0);
    }

    #[test]
    fn unanswered_requests_leave_the_connection_silent_to_the_end() {
        let mut s = steady(0, 0.0, None); // last reply at 9995.1
        let mut dead = steady(1, 0.0, None);
        for x in dead.iter_mut().filter(|x| x.unix_ms >= 3000.0) {
            x.latency_ms = None;
        }
        s.extend(dead);
        // conn 1: last reply 2995.1, then silent until the end of the samples (9995.1).
        let g = client_gap_ms(&s, 4000.0, 4001.0);
        assert!((g - 7000.0).abs() < 1e-6, "{g}");
    }

    #[test]
    fn the_svg_is_well_formed_and_bands_sit_where_the_phases_were() {
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
                "m2<&>",
                "b1",
                "a1",
                t0 + 6000.0,
                &[("prepare", 10.0), ("freeze", 500.0), ("release", 1.0)],
            ),
        ];
        let svg = latency_svg(
            &samples,
            &runs,
            "ferry demo: a1 → b1 → a1 <live> & \"quoted\"",
        );
        let elems = check_xml(&svg);
        assert_eq!(
            elems.iter().filter(|e| *e == "circle").count(),
            3 * 2000 - 1 + 3
        );
        assert!(svg.contains("ferry demo: a1 → b1 → a1 &lt;live&gt; &amp; &quot;quoted&quot;"));
        assert_eq!(svg.matches(r#"class="unanswered""#).count(), 1);

        // Samples span t0 .. t0 + 9995 + 0.1 ms: x = LEFT + t / 9.9951 s × PLOT_W.
        let t_max = 9.9951;
        let x_at = |unix_ms: f64| LEFT + (unix_ms - t0) / 1e3 / t_max * PLOT_W;
        let bands: Vec<&str> = svg
            .lines()
            .filter(|l| l.contains(r#"class="phase "#))
            .collect();
        assert_eq!(bands.len(), 9);
        for r in &runs {
            for p in &r.phases {
                let b = bands
                    .iter()
                    .find(|b| {
                        attr(b, "class") == format!("phase phase-{}", p.name)
                            && attr(b, "data-run") == esc(&r.id)
                    })
                    .unwrap_or_else(|| panic!("no band for {} {}", r.id, p.name));
                let x: f64 = attr(b, "x").parse().unwrap();
                let w: f64 = attr(b, "width").parse().unwrap();
                assert!(
                    (x - x_at(p.start_unix_ms)).abs() < 0.01,
                    "{}: x {x}",
                    p.name
                );
                let want_w = (p.ms / 1e3 / t_max * PLOT_W).max(1.0);
                assert!(
                    (w - want_w).abs() < 0.01,
                    "{}: width {w} want {want_w}",
                    p.name
                );
                assert_eq!(attr(b, "fill"), phase_colour(&p.name));
            }
        }
        // Within a run, longer bands come first (short ones stay visible on top).
        let m2: Vec<&str> = bands
            .iter()
            .filter(|b| attr(b, "data-run") != "m1")
            .map(|b| attr(b, "class"))
            .collect();
        assert_eq!(
            m2,
            [
                "phase phase-freeze",
                "phase phase-prepare",
                "phase phase-release"
            ]
        );
        // The freeze band of m1 is left of its dump band, both inside the plot.
        let x_of = |run: &str, phase: &str| -> f64 {
            let b = bands
                .iter()
                .find(|b| attr(b, "data-run") == run && attr(b, "class").ends_with(phase))
                .unwrap();
            attr(b, "x").parse().unwrap()
        };
        assert!(LEFT < x_of("m1", "freeze") && x_of("m1", "freeze") < x_of("m1", "dump"));
        assert!(x_of("m2&lt;&amp;&gt;", "release") < LEFT + PLOT_W);

        // Labels with the client-visible gap (conn 0: replies at 1995.1 then 2142).
        assert!(svg.contains(">a1 → b1, gap 147 ms</text>"), "{svg}");
        assert!(svg.contains(">b1 → a1, gap 5 ms</text>"));
        // A legend entry per phase and per connection.
        for p in PHASES {
            assert!(svg.contains(&format!(">{p}</text>")), "legend {p}");
        }
        for c in 0..3 {
            assert!(svg.contains(&format!(">conn {c}</text>")));
        }
        assert!(svg.contains("unanswered (at the top)"));
    }

    #[test]
    fn dots_follow_a_log_scale_and_ticks_are_round() {
        let s = vec![
            Sample {
                unix_ms: 0.0,
                conn: 0,
                seq: 1,
                latency_ms: Some(0.05),
            },
            Sample {
                unix_ms: 1000.0,
                conn: 0,
                seq: 2,
                latency_ms: Some(100.0),
            },
        ];
        let f = Frame::new(&s, &[]);
        assert!((f.y(0.05) - (TOP + PLOT_H)).abs() < 1e-9);
        assert!((f.y(0.001) - (TOP + PLOT_H)).abs() < 1e-9, "clamped below");
        let (y1, y10, y100) = (f.y(1.0), f.y(10.0), f.y(100.0));
        assert!(
            ((y1 - y10) - (y10 - y100)).abs() < 1e-9,
            "decades are equal"
        );
        assert!(y100 > TOP && y100 < y10);
        let ticks: Vec<String> = log_ticks(f.y_max_ms).iter().map(|t| short(t.0)).collect();
        assert_eq!(
            ticks,
            [
                "0.05", "0.1", "0.2", "0.5", "1", "2", "5", "10", "20", "50", "100"
            ]
        );
        assert_eq!(nice_step(10.0, 10.0), 1.0);
        assert_eq!(nice_step(3.4, 10.0), 0.5);
        assert_eq!(nice_step(0.07, 10.0), 0.01);
        let svg = latency_svg(&[], &[], "empty");
        check_xml(&svg);
    }

    #[test]
    #[should_panic(expected = "closes")]
    fn the_checker_catches_unbalanced_tags() {
        check_xml("<svg><g></svg></g>");
    }
}
