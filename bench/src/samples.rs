//! The client's samples: one line per request of `ferry-workload client --samples`
//! (`unix_ms,conn,seq,latency_ms`), and the gap a client saw around a migration.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

/// One request as the client saw it: the type the client writes the CSV from.
pub use ferry_workload::client::Sample;

/// A samples CSV that could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SamplesError {
    #[error("reading {path}: {source}", path = .path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}", path = .path.display())]
    In {
        path: PathBuf,
        source: Box<SamplesError>,
    },
    #[error("line {line}: {problem}")]
    BadLine { line: usize, problem: String },
}

/// Reads a samples CSV (`unix_ms,conn,seq,latency_ms`, header first, empty latency: no reply).
pub fn read_samples(path: impl AsRef<Path>) -> Result<Vec<Sample>, SamplesError> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|source| SamplesError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse_samples(&text).map_err(|e| SamplesError::In {
        path: path.to_owned(),
        source: Box::new(e),
    })
}

/// Parses the text of a samples CSV (see [`read_samples`]).
pub fn parse_samples(text: &str) -> Result<Vec<Sample>, SamplesError> {
    let bad = |line: usize, problem: String| SamplesError::BadLine { line, problem };
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// One connection, a request every 5 ms from `t0` to `t0 + 10 s`, 0.1 ms each; the ones
    /// sent in `[stall_from, stall_to)` answered at `stall_to`.
    pub(crate) fn steady(conn: u32, t0: f64, stall: Option<(f64, f64)>) -> Vec<Sample> {
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
            assert!(
                matches!(e, SamplesError::BadLine { line: 1, .. }),
                "{bad}: {e}"
            );
        }
        let dir = std::env::temp_dir().join(format!("ferry-samples-{}", std::process::id()));
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
}
