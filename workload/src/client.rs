//! `ferry-workload client`: opens N connections to a `ferry-workload` server, sends a numbered
//! request on each every interval (pipelined: it does not wait for replies), and checks every
//! reply: the sequence number must be the oldest unanswered one (every reply exactly once, in
//! order) and the counter exactly one more than the previous reply's (the server's state went
//! on where it was). Per connection it records the largest gap between two replies; at the end
//! it reads each socket's retransmission count from TCP_INFO and prints a summary.
//!
//! Stops after `--duration-ms` or on SIGTERM/SIGINT, then waits up to [`DRAIN`] for the
//! replies still owed. Prints `{"event":"connected",..}` on stderr once every connection is
//! open, and the summary (one JSON object) on stdout at the end.
//!
//! With `--samples FILE` it also writes one CSV line per request ([`write_samples`]):
//! `unix_ms,conn,seq,latency_ms`, `unix_ms` when the request was sent (fractional Unix
//! milliseconds), `latency_ms` empty for a request never answered (or answered wrongly).

use std::{
    collections::VecDeque,
    io::{self, BufWriter, Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    os::fd::AsFd,
    path::PathBuf,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::{
    measure::{micros, ms, percentile_ms, total_retrans},
    sys::{self, SignalFd},
};

/// How long the client waits for outstanding replies after it stops sending.
pub const DRAIN: Duration = Duration::from_secs(3);
/// Unanswered requests per connection beyond which the client stops sending on it.
pub const MAX_OUTSTANDING: usize = 100_000;
/// Mismatch descriptions kept for the summary.
const EXAMPLES: usize = 10;

#[derive(Debug, Clone)]
pub struct Options {
    pub to: SocketAddr,
    pub connections: usize,
    pub interval: Duration,
    pub duration: Option<Duration>,
    pub payload_bytes: usize,
    /// Where to write the per-request samples (CSV, see [`write_samples`]).
    pub samples: Option<PathBuf>,
    /// Every so often, a `{"event":"progress",..}` line on stderr ([`progress`]): how a
    /// harness sees, while the client runs, whether it is being answered.
    pub progress: Option<Duration>,
}

/// One request as the client saw it (a line of `--samples`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// When the request was sent, fractional Unix milliseconds.
    pub unix_ms: f64,
    /// The connection's index (0-based).
    pub conn: u32,
    pub seq: u64,
    /// Send to reply; `None`: never answered (or answered wrongly).
    pub latency_ms: Option<f64>,
}

impl Sample {
    /// When the reply arrived, Unix milliseconds.
    pub fn reply_unix_ms(&self) -> Option<f64> {
        self.latency_ms.map(|l| self.unix_ms + l)
    }
}

/// The header line of the samples CSV.
pub const SAMPLES_HEADER: &str = "unix_ms,conn,seq,latency_ms";

/// Writes `samples` as CSV: [`SAMPLES_HEADER`], then one line per sample, times with µs
/// precision, an empty last field for an unanswered request.
pub fn write_samples(mut w: impl io::Write, samples: &[Sample]) -> io::Result<()> {
    writeln!(w, "{SAMPLES_HEADER}")?;
    for s in samples {
        match s.latency_ms {
            Some(l) => writeln!(w, "{:.3},{},{},{l:.3}", s.unix_ms, s.conn, s.seq)?,
            None => writeln!(w, "{:.3},{},{},", s.unix_ms, s.conn, s.seq)?,
        }
    }
    w.flush()
}

/// Why a connection ended early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    Reset,
    Eof,
    Error,
}

struct Conn {
    stream: TcpStream,
    next_seq: u64,
    /// Sequence numbers sent and not answered yet, with when they were sent (monotonic and
    /// Unix ms).
    outstanding: VecDeque<(u64, Instant, f64)>,
    last_n: u64,
    last_reply: Instant,
    max_gap: Duration,
    max_gap_end_unix_ms: u64,
    input: Vec<u8>,
    output: Vec<u8>,
    failure: Option<Failure>,
    retrans: u32,
}

/// What the client counts.
#[derive(Default)]
struct Tally {
    requests: u64,
    replies: u64,
    mismatches: u64,
    examples: Vec<String>,
    gaps_us: Vec<u32>,
    latencies_us: Vec<u32>,
    /// Per-request samples, kept only with `--samples`.
    samples: Option<Vec<Sample>>,
}

impl Tally {
    fn sample(&mut self, conn: usize, seq: u64, sent_unix_ms: f64, latency: Option<Duration>) {
        if let Some(v) = &mut self.samples {
            v.push(Sample {
                unix_ms: sent_unix_ms,
                conn: conn as u32,
                seq,
                latency_ms: latency.map(|d| d.as_secs_f64() * 1e3),
            });
        }
    }

    fn mismatch(&mut self, conn: usize, what: String) {
        self.mismatches += 1;
        if self.examples.len() < EXAMPLES {
            self.examples.push(format!("connection {conn}: {what}"));
        }
    }
}

impl Conn {
    fn fail(&mut self, e: &io::Error) {
        if self.failure.is_some() {
            return;
        }
        self.retrans = total_retrans(&self.stream);
        self.failure = Some(match e.kind() {
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted => Failure::Reset,
            io::ErrorKind::UnexpectedEof => Failure::Eof,
            _ => Failure::Error,
        });
    }

    fn flush(&mut self) {
        while !self.output.is_empty() && self.failure.is_none() {
            match self.stream.write(&self.output) {
                Ok(n) => {
                    self.output.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => self.fail(&e),
            }
        }
    }

    fn send(&mut self, payload: &str, tally: &mut Tally) {
        if self.failure.is_some() || self.outstanding.len() >= MAX_OUTSTANDING {
            return;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.output
            .extend_from_slice(format!("REQ {seq} {payload}\n").as_bytes());
        self.outstanding
            .push_back((seq, Instant::now(), sys::unix_ms_f64()));
        tally.requests += 1;
        self.flush();
    }

    fn read(&mut self, id: usize, tally: &mut Tally) {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => {
                    self.fail(&io::Error::from(io::ErrorKind::UnexpectedEof));
                    break;
                }
                Ok(n) => self.input.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.fail(&e);
                    break;
                }
            }
        }
        let now = Instant::now();
        while let Some(end) = self.input.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.input.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line[..end]).into_owned();
            self.check(id, &line, now, tally);
        }
    }

    fn check(&mut self, id: usize, line: &str, now: Instant, tally: &mut Tally) {
        let mut w = line.split_ascii_whitespace();
        let (Some("RES"), Some(Ok(seq)), Some(Ok(n))) = (
            w.next(),
            w.next().map(str::parse::<u64>),
            w.next().map(str::parse::<u64>),
        ) else {
            tally.mismatch(id, format!("unparseable reply {line:?}"));
            return;
        };
        tally.replies += 1;
        match self.outstanding.pop_front() {
            Some((want, sent, sent_unix_ms)) if want == seq => {
                tally.latencies_us.push(micros(now - sent));
                tally.sample(id, want, sent_unix_ms, Some(now - sent));
            }
            Some((want, _, sent_unix_ms)) => {
                tally.sample(id, want, sent_unix_ms, None);
                tally.mismatch(id, format!("reply to {seq} where {want} was due"));
            }
            None => tally.mismatch(id, format!("reply to {seq}, nothing was outstanding")),
        }
        if n != self.last_n + 1 {
            tally.mismatch(
                id,
                format!(
                    "counter {n} after {} (want {})",
                    self.last_n,
                    self.last_n + 1
                ),
            );
        }
        self.last_n = n;
        let gap = now - self.last_reply;
        tally.gaps_us.push(micros(gap));
        if gap > self.max_gap {
            self.max_gap = gap;
            self.max_gap_end_unix_ms = sys::unix_ms();
        }
        self.last_reply = now;
    }
}

/// A progress line: requests and replies so far, connections alive, and the age of the oldest
/// request still unanswered on a live connection (`oldest_outstanding_ms`, 0 if none: a
/// client being answered keeps it near its round-trip time).
fn progress(conns: &[Conn], tally: &Tally, now: Instant) -> Value {
    let live = conns.iter().filter(|c| c.failure.is_none());
    let oldest = live
        .clone()
        .filter_map(|c| c.outstanding.front().map(|(_, sent, _)| now - *sent))
        .max()
        .unwrap_or(Duration::ZERO);
    json!({
        "event": "progress",
        "unix_ms": sys::unix_ms(),
        "requests": tally.requests,
        "replies": tally.replies,
        "alive": live.count(),
        "oldest_outstanding_ms": ms(oldest),
    })
}

/// Runs the client and returns its summary (see the module docs).
pub fn run(opts: &Options) -> io::Result<Value> {
    let signals = SignalFd::new(&[libc::SIGTERM, libc::SIGINT])?;
    let t_connect = Instant::now();
    let mut conns = Vec::with_capacity(opts.connections);
    for i in 0..opts.connections {
        let s = TcpStream::connect_timeout(&opts.to, Duration::from_secs(5))
            .map_err(|e| io::Error::new(e.kind(), format!("connection {i} to {}: {e}", opts.to)))?;
        s.set_nodelay(true)?;
        s.set_nonblocking(true)?;
        conns.push(Conn {
            stream: s,
            next_seq: 1,
            outstanding: VecDeque::new(),
            last_n: 0,
            last_reply: Instant::now(),
            max_gap: Duration::ZERO,
            max_gap_end_unix_ms: 0,
            input: Vec::new(),
            output: Vec::new(),
            failure: None,
            retrans: 0,
        });
    }
    let connect_time = t_connect.elapsed();
    eprintln!(
        "{}",
        json!({"event": "connected", "connections": conns.len(), "unix_ms": sys::unix_ms()})
    );

    let payload = "p".repeat(opts.payload_bytes);
    let mut tally = Tally {
        samples: opts.samples.as_ref().map(|_| Vec::new()),
        ..Tally::default()
    };
    let start = Instant::now();
    for c in &mut conns {
        c.last_reply = start;
    }
    let deadline = opts.duration.map(|d| start + d);
    let mut next_progress = opts.progress.map(|p| start + p);
    let mut next_tick = start;
    let mut stop_at: Option<Instant> = None; // when sending stopped
    loop {
        let now = Instant::now();
        if stop_at.is_none() && deadline.is_some_and(|d| now >= d) {
            stop_at = Some(now);
        }
        if let Some(t) = stop_at {
            let owed = conns
                .iter()
                .any(|c| c.failure.is_none() && !c.outstanding.is_empty());
            if !owed || now >= t + DRAIN {
                break;
            }
        } else if now >= next_tick {
            for c in &mut conns {
                c.send(&payload, &mut tally);
            }
            next_tick += opts.interval;
            if next_tick < now {
                next_tick = now + opts.interval; // fell behind: skip, do not burst
            }
        }
        if let (Some(at), Some(every)) = (next_progress, opts.progress)
            && now >= at
        {
            eprintln!("{}", progress(&conns, &tally, now));
            next_progress = Some(now + every);
        }
        let wake = match stop_at {
            Some(t) => t + DRAIN,
            None => deadline.map_or(next_tick, |d| d.min(next_tick)),
        };
        let wake = next_progress.map_or(wake, |p| p.min(wake));
        let timeout = wake.saturating_duration_since(Instant::now());
        let mut pfds = vec![sys::pollfd(signals.as_fd(), libc::POLLIN)];
        for c in &conns {
            let mut ev = 0;
            if c.failure.is_none() {
                ev = libc::POLLIN;
                if !c.output.is_empty() {
                    ev |= libc::POLLOUT;
                }
            }
            pfds.push(sys::pollfd(c.stream.as_fd(), ev));
        }
        sys::poll(&mut pfds, timeout.as_millis().min(i32::MAX as u128) as i32)?;
        if pfds[0].revents != 0 && signals.read()?.is_some() && stop_at.is_none() {
            stop_at = Some(Instant::now());
        }
        for (i, c) in conns.iter_mut().enumerate() {
            let ev = pfds[i + 1].revents;
            if ev & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) != 0 {
                c.read(i, &mut tally);
            }
            if ev & libc::POLLOUT != 0 {
                c.flush();
            }
        }
    }
    let elapsed = start.elapsed();
    let end = Instant::now();

    let mut per_conn_gap = Vec::with_capacity(conns.len());
    let (mut resets, mut eofs, mut errors, mut retrans, mut unanswered) = (0, 0, 0, 0u64, 0u64);
    let mut worst = (Duration::ZERO, 0u64);
    for (i, c) in conns.iter_mut().enumerate() {
        for &(seq, _, sent_unix_ms) in &c.outstanding {
            tally.sample(i, seq, sent_unix_ms, None);
        }
        // A connection still owing replies has been silent since its last reply.
        if !c.outstanding.is_empty() {
            let open = end - c.last_reply;
            if open > c.max_gap {
                c.max_gap = open;
                c.max_gap_end_unix_ms = sys::unix_ms();
            }
        }
        unanswered += c.outstanding.len() as u64;
        match c.failure {
            Some(Failure::Reset) => resets += 1,
            Some(Failure::Eof) => eofs += 1,
            Some(Failure::Error) => errors += 1,
            None => c.retrans = total_retrans(&c.stream),
        }
        retrans += u64::from(c.retrans);
        per_conn_gap.push(ms(c.max_gap));
        if c.max_gap > worst.0 {
            worst = (c.max_gap, c.max_gap_end_unix_ms);
        }
    }
    let alive = conns.iter().filter(|c| c.failure.is_none()).count();
    let samples_written = match (&opts.samples, tally.samples.as_mut()) {
        (Some(path), Some(v)) => {
            v.sort_by(|a, b| a.unix_ms.total_cmp(&b.unix_ms).then(a.conn.cmp(&b.conn)));
            let f = std::fs::File::create(path).map_err(|e| {
                io::Error::new(e.kind(), format!("samples file {}: {e}", path.display()))
            })?;
            write_samples(BufWriter::new(f), v)?;
            Some(v.len())
        }
        _ => None,
    };
    let mut summary = json!({
        "to": opts.to.to_string(),
        "connections": conns.len(),
        "alive": alive,
        "requests": tally.requests,
        "replies": tally.replies,
        "unanswered": unanswered,
        "mismatches": tally.mismatches,
        "mismatch_examples": tally.examples,
        "resets": resets,
        "closed_by_server": eofs,
        "errors": errors,
        "retransmits": retrans,
        "max_gap_ms": ms(worst.0),
        "max_gap_end_unix_ms": worst.1,
        "p50_gap_ms": percentile_ms(&mut tally.gaps_us, 0.5),
        "p99_gap_ms": percentile_ms(&mut tally.gaps_us, 0.99),
        "p50_latency_ms": percentile_ms(&mut tally.latencies_us, 0.5),
        "max_latency_ms": percentile_ms(&mut tally.latencies_us, 1.0),
        "max_gap_ms_per_connection": per_conn_gap,
        "interval_ms": ms(opts.interval),
        "duration_ms": ms(elapsed),
        "connect_ms": ms(connect_time),
    });
    if let (Some(path), Some(n)) = (&opts.samples, samples_written) {
        summary["samples_file"] = json!(path.display().to_string());
        summary["samples"] = json!(n);
    }
    Ok(summary)
}

/// Did every connection survive with every reply right?
pub fn passed(summary: &Value) -> bool {
    let n = |k: &str| summary.get(k).and_then(Value::as_u64).unwrap_or(u64::MAX);
    n("resets") == 0
        && n("mismatches") == 0
        && n("errors") == 0
        && n("closed_by_server") == 0
        && n("unanswered") == 0
        && n("alive") == n("connections")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_written_as_csv_with_empty_latency_for_unanswered() {
        let samples = [
            Sample {
                unix_ms: 1_700_000_000_123.456_7,
                conn: 0,
                seq: 1,
                latency_ms: Some(0.0625),
            },
            Sample {
                unix_ms: 1_700_000_000_128.5,
                conn: 3,
                seq: 2,
                latency_ms: Some(142.0),
            },
            Sample {
                unix_ms: 1_700_000_000_133.0,
                conn: 1,
                seq: 7,
                latency_ms: None,
            },
        ];
        let mut out = Vec::new();
        write_samples(&mut out, &samples).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "unix_ms,conn,seq,latency_ms\n\
             1700000000123.457,0,1,0.062\n\
             1700000000128.500,3,2,142.000\n\
             1700000000133.000,1,7,\n"
        );
    }

    #[test]
    fn no_samples_is_just_the_header() {
        let mut out = Vec::new();
        write_samples(&mut out, &[]).unwrap();
        assert_eq!(out, b"unix_ms,conn,seq,latency_ms\n");
    }

    #[test]
    fn the_tally_keeps_samples_only_when_asked() {
        let mut off = Tally::default();
        off.sample(0, 1, 1.0, Some(Duration::from_micros(250)));
        assert!(off.samples.is_none());
        let mut on = Tally {
            samples: Some(Vec::new()),
            ..Tally::default()
        };
        on.sample(2, 5, 10.5, Some(Duration::from_micros(250)));
        on.sample(2, 6, 11.5, None);
        assert_eq!(
            on.samples.unwrap(),
            vec![
                Sample {
                    unix_ms: 10.5,
                    conn: 2,
                    seq: 5,
                    latency_ms: Some(0.25)
                },
                Sample {
                    unix_ms: 11.5,
                    conn: 2,
                    seq: 6,
                    latency_ms: None
                },
            ]
        );
    }
}
