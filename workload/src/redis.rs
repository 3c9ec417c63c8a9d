//! `ferry-workload redis-client`: a checking client for an unmodified `redis-server`, for tests
//! that move a live redis with CRIU while this client talks to it.
//!
//! Each of N connections owns the keys `ferry:<pid>:<conn>` (a counter), `ferry:<pid>:<conn>:log`
//! and `ferry:<pid>:<conn>:v<k>`. It first `DEL`s its counter and log, then every interval sends
//! one command and waits for its reply before the next (no pipelining), cycling through
//!
//! 1. `INCR ferry:<pid>:<conn>`: must be exactly the previous value + 1 (the server's memory
//!    went on where it was);
//! 2. `SET ferry:<pid>:<conn>:v<k> <payload k>`: must be `+OK`;
//! 3. `GET ferry:<pid>:<conn>:v<j>` with `j = (k + 1) / 2`, an earlier round's value (so values
//!    written before a move are read back after it): must equal what was set;
//! 4. `APPEND ferry:<pid>:<conn>:log "<k>,"`: must be the log's length so far plus the appended
//!    bytes;
//! 5. `STRLEN ferry:<pid>:<conn>:log`: must equal that length.
//!
//! A connection that fails (reset, end of stream, any other I/O error, a malformed reply) is
//! counted and closed, never reopened: a reconnect would hide a broken move, so `reconnects` is
//! always 0. The RESP2 codec is this module's own ([`encode`], [`RespReader`]), bounded by
//! [`Limits`].
//!
//! Stops after `--duration-ms` or on SIGTERM/SIGINT (or as soon as every connection has failed),
//! then waits up to [`DRAIN`] for the replies still owed. Prints `{"event":"connected",..}` on
//! stderr once every connection is open and the summary (one JSON object) on stdout at the end.
//! With `--samples FILE` it writes one CSV row `unix_ms,conn,seq,latency_ms` per request
//! (`unix_ms`: when the request was sent, fractional Unix ms; `latency_ms` empty for a request
//! never answered; times with µs precision), the same format as `client --samples`.

use std::{
    fmt,
    fs::File,
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
/// Mismatch and error descriptions kept for the summary.
const EXAMPLES: usize = 5;
/// Commands in one round (INCR, SET, GET, APPEND, STRLEN).
const ROUND: u64 = 5;

// ---------------------------------------------------------------------------------------------
// RESP2

/// One RESP2 reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// `+OK`
    Simple(Vec<u8>),
    /// `-ERR ...`
    Error(Vec<u8>),
    /// `:42`
    Integer(i64),
    /// `$3\r\nfoo`
    Bulk(Vec<u8>),
    /// `$-1`
    Nil,
    /// `*2\r\n...`
    Array(Vec<Reply>),
    /// `*-1`
    NilArray,
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        match self {
            Self::Simple(b) => write!(f, "+{}", s(b)),
            Self::Error(b) => write!(f, "-{}", s(b)),
            Self::Integer(n) => write!(f, ":{n}"),
            Self::Bulk(b) => write!(f, "{:?}", s(b)),
            Self::Nil => write!(f, "(nil)"),
            Self::Array(v) => write!(f, "(array of {})", v.len()),
            Self::NilArray => write!(f, "(nil array)"),
        }
    }
}

/// Why a byte stream is not RESP2 (or is more than this client accepts).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RespError {
    /// A first byte that is none of `+ - : $ *`.
    BadType(u8),
    /// A line ended by a bare `\n`, or a bulk string not followed by `\r\n`.
    BadTerminator,
    /// An integer, length or count that is not a decimal i64.
    BadNumber(String),
    /// A negative length other than -1.
    BadLength(i64),
    /// A line, bulk string, array or whole frame over the [`Limits`].
    Oversize(&'static str),
    /// Arrays nested deeper than the [`Limits`].
    TooDeep,
}

impl fmt::Display for RespError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BadType(b) => write!(f, "RESP: unknown type byte {b:#04x}"),
            Self::BadTerminator => write!(f, "RESP: missing CRLF"),
            Self::BadNumber(s) => write!(f, "RESP: bad number {s:?}"),
            Self::BadLength(n) => write!(f, "RESP: bad length {n}"),
            Self::Oversize(what) => write!(f, "RESP: {what} over the limit"),
            Self::TooDeep => write!(f, "RESP: arrays nested too deep"),
        }
    }
}

impl std::error::Error for RespError {}

impl From<RespError> for io::Error {
    fn from(e: RespError) -> Self {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

/// Bounds on what the reader accepts.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest simple string, error, integer or length line (without its CRLF).
    pub max_line: usize,
    /// Longest bulk string.
    pub max_bulk: usize,
    /// Most elements in one array.
    pub max_elements: usize,
    /// Deepest array nesting (1: arrays of scalars only).
    pub max_depth: usize,
    /// Most bytes buffered for one incomplete reply.
    pub max_frame: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_line: 64 * 1024,
            max_bulk: 1024 * 1024,
            max_elements: 1024,
            max_depth: 4,
            max_frame: 4 * 1024 * 1024,
        }
    }
}

/// A command as a RESP2 array of bulk strings.
pub fn encode<A: AsRef<[u8]>>(args: &[A]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        let a = a.as_ref();
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// The line starting at `pos` (without its CRLF) and the position after it; `None` if the CRLF
/// has not arrived yet.
fn line(buf: &[u8], pos: usize, max: usize) -> Result<Option<(&[u8], usize)>, RespError> {
    let rest = &buf[pos..];
    match rest.iter().take(max + 2).position(|b| *b == b'\n') {
        Some(0) => Err(RespError::BadTerminator),
        Some(nl) if rest[nl - 1] != b'\r' => Err(RespError::BadTerminator),
        Some(nl) => Ok(Some((&rest[..nl - 1], pos + nl + 1))),
        None if rest.len() >= max + 2 => Err(RespError::Oversize("line")),
        None => Ok(None),
    }
}

/// A strict decimal i64: an optional `-` and at least one digit.
fn number(s: &[u8]) -> Result<i64, RespError> {
    let bad = || RespError::BadNumber(String::from_utf8_lossy(s).into_owned());
    let digits = s.strip_prefix(b"-").unwrap_or(s);
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return Err(bad());
    }
    std::str::from_utf8(s)
        .ok()
        .and_then(|t| t.parse().ok())
        .ok_or_else(bad)
}

/// Parses one reply at `pos`: the reply and the position after it, or `None` if incomplete.
fn parse_at(
    buf: &[u8],
    pos: usize,
    depth: usize,
    lim: &Limits,
) -> Result<Option<(Reply, usize)>, RespError> {
    let Some(&kind) = buf.get(pos) else {
        return Ok(None);
    };
    if !matches!(kind, b'+' | b'-' | b':' | b'$' | b'*') {
        return Err(RespError::BadType(kind));
    }
    let Some((l, next)) = line(buf, pos + 1, lim.max_line)? else {
        return Ok(None);
    };
    match kind {
        b'+' => Ok(Some((Reply::Simple(l.to_vec()), next))),
        b'-' => Ok(Some((Reply::Error(l.to_vec()), next))),
        b':' => Ok(Some((Reply::Integer(number(l)?), next))),
        b'$' => match number(l)? {
            -1 => Ok(Some((Reply::Nil, next))),
            n if n < 0 => Err(RespError::BadLength(n)),
            n if n as u64 > lim.max_bulk as u64 => Err(RespError::Oversize("bulk string")),
            n => {
                let end = next + n as usize;
                if buf.len() < end + 2 {
                    return Ok(None);
                }
                if &buf[end..end + 2] != b"\r\n" {
                    return Err(RespError::BadTerminator);
                }
                Ok(Some((Reply::Bulk(buf[next..end].to_vec()), end + 2)))
            }
        },
        _ => match number(l)? {
            -1 => Ok(Some((Reply::NilArray, next))),
            n if n < 0 => Err(RespError::BadLength(n)),
            n if n as u64 > lim.max_elements as u64 => Err(RespError::Oversize("array")),
            _ if depth >= lim.max_depth => Err(RespError::TooDeep),
            n => {
                let mut items = Vec::with_capacity(n as usize);
                let mut at = next;
                for _ in 0..n {
                    let Some((r, after)) = parse_at(buf, at, depth + 1, lim)? else {
                        return Ok(None);
                    };
                    items.push(r);
                    at = after;
                }
                Ok(Some((Reply::Array(items), at)))
            }
        },
    }
}

/// Parses one complete reply from the start of `buf`: the reply and the bytes it used, `None`
/// if more bytes are needed.
pub fn parse(buf: &[u8], lim: &Limits) -> Result<Option<(Reply, usize)>, RespError> {
    parse_at(buf, 0, 0, lim)
}

/// Incremental RESP2 reader: feed it bytes as they arrive, take replies out.
#[derive(Debug, Default)]
pub struct RespReader {
    buf: Vec<u8>,
    start: usize,
    limits: Limits,
}

impl RespReader {
    pub fn new(limits: Limits) -> Self {
        Self {
            buf: Vec::new(),
            start: 0,
            limits,
        }
    }

    pub fn feed(&mut self, bytes: &[u8]) {
        if self.start > 0 && self.start >= self.buf.len() / 2 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete reply, `None` if it has not fully arrived. After an error the stream
    /// is out of step for good.
    pub fn next_reply(&mut self) -> Result<Option<Reply>, RespError> {
        let rest = &self.buf[self.start..];
        match parse(rest, &self.limits)? {
            Some((r, used)) => {
                self.start += used;
                Ok(Some(r))
            }
            None if rest.len() > self.limits.max_frame => Err(RespError::Oversize("reply")),
            None => Ok(None),
        }
    }

    /// Bytes received and not yet taken out as replies.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }
}

// ---------------------------------------------------------------------------------------------
// The client

#[derive(Debug, Clone)]
pub struct Options {
    pub to: SocketAddr,
    pub connections: usize,
    pub interval: Duration,
    pub duration: Option<Duration>,
    pub samples: Option<PathBuf>,
}

/// Why a connection ended early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    Reset,
    Eof,
    /// Another I/O error, or a reply that is not RESP2 / arrived unasked.
    Error,
}

/// What a reply must be.
#[derive(Debug, Clone)]
enum Expect {
    /// `DEL`: any integer.
    AnyInteger,
    /// `INCR`: exactly this.
    Counter(i64),
    /// `SET`: `+OK`.
    Ok,
    /// `GET`: exactly this value.
    Bulk(Vec<u8>),
    /// `APPEND`, `STRLEN`: exactly this length.
    Length(i64),
}

struct Pending {
    seq: u64,
    sent: Instant,
    sent_unix_ms: f64,
    what: String,
    expect: Expect,
}

struct Conn {
    id: usize,
    stream: TcpStream,
    key: String,
    log_key: String,
    pid: u32,
    next_seq: u64,
    pending: Option<Pending>,
    /// The last counter the server returned (0 after the DEL).
    counter: i64,
    /// What the log's length must be.
    log_len: i64,
    last_reply: Instant,
    max_gap: Duration,
    max_gap_end_unix_ms: u64,
    reader: RespReader,
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
    error_replies: u64,
    examples: Vec<String>,
    error_examples: Vec<String>,
    gaps_us: Vec<u32>,
    latencies_us: Vec<u32>,
    samples: Option<BufWriter<File>>,
    samples_error: Option<io::Error>,
}

impl Tally {
    fn mismatch(&mut self, conn: usize, what: String) {
        self.mismatches += 1;
        if self.examples.len() < EXAMPLES {
            self.examples.push(format!("connection {conn}: {what}"));
        }
    }

    fn error(&mut self, conn: usize, what: String) {
        if self.error_examples.len() < EXAMPLES {
            self.error_examples
                .push(format!("connection {conn}: {what}"));
        }
    }

    fn sample(&mut self, unix_ms: f64, conn: usize, seq: u64, latency: Option<Duration>) {
        let Some(w) = &mut self.samples else {
            return;
        };
        let lat = latency.map(|d| format!("{:.3}", ms(d))).unwrap_or_default();
        if let Err(e) = writeln!(w, "{unix_ms:.3},{conn},{seq},{lat}") {
            self.samples = None;
            self.samples_error = Some(e);
        }
    }
}

/// The value `SET` stores in round `k` of connection `conn` of process `pid`.
fn payload(pid: u32, conn: usize, k: u64) -> Vec<u8> {
    format!(
        "v{k}-{:016x}-{pid}-{conn}",
        k.wrapping_mul(0x9e37_79b9_7f4a_7c15)
    )
    .into_bytes()
}

impl Conn {
    fn fail(&mut self, e: &io::Error, tally: &mut Tally) {
        if self.failure.is_some() {
            return;
        }
        self.retrans = total_retrans(&self.stream);
        let failure = match e.kind() {
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted => Failure::Reset,
            io::ErrorKind::UnexpectedEof => Failure::Eof,
            _ => Failure::Error,
        };
        let what = match failure {
            Failure::Eof => "closed by the server".to_owned(),
            _ => e.to_string(),
        };
        tally.error(self.id, format!("{what} after {} requests", self.next_seq));
        self.failure = Some(failure);
        // Not reconnected, and not read or written again: close it now so a broken server
        // sees the close too.
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }

    fn flush(&mut self, tally: &mut Tally) {
        while !self.output.is_empty() && self.failure.is_none() {
            match self.stream.write(&self.output) {
                Ok(n) => {
                    self.output.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => self.fail(&e, tally),
            }
        }
    }

    /// The command for `seq` and what its reply must be.
    fn command(&self, seq: u64) -> (Vec<Vec<u8>>, Expect) {
        let b = |s: &str| s.as_bytes().to_vec();
        if seq == 0 {
            return (
                vec![b("DEL"), b(&self.key), b(&self.log_key)],
                Expect::AnyInteger,
            );
        }
        let k = (seq - 1) / ROUND + 1;
        match (seq - 1) % ROUND {
            0 => (
                vec![b("INCR"), b(&self.key)],
                Expect::Counter(self.counter + 1),
            ),
            1 => (
                vec![
                    b("SET"),
                    b(&format!("{}:v{k}", self.key)),
                    payload(self.pid, self.id, k),
                ],
                Expect::Ok,
            ),
            2 => {
                let j = k.div_ceil(2);
                (
                    vec![b("GET"), b(&format!("{}:v{j}", self.key))],
                    Expect::Bulk(payload(self.pid, self.id, j)),
                )
            }
            3 => {
                let entry = format!("{k},");
                let want = self.log_len + entry.len() as i64;
                (
                    vec![b("APPEND"), b(&self.log_key), b(&entry)],
                    Expect::Length(want),
                )
            }
            _ => (
                vec![b("STRLEN"), b(&self.log_key)],
                Expect::Length(self.log_len),
            ),
        }
    }

    fn send(&mut self, tally: &mut Tally) {
        if self.failure.is_some() || self.pending.is_some() {
            return;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let (args, expect) = self.command(seq);
        let what = args
            .iter()
            .take(2)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        self.output.extend_from_slice(&encode(&args));
        self.pending = Some(Pending {
            seq,
            sent: Instant::now(),
            sent_unix_ms: sys::unix_ms_f64(),
            what,
            expect,
        });
        tally.requests += 1;
        self.flush(tally);
    }

    fn read(&mut self, tally: &mut Tally) {
        let mut buf = [0u8; 16 * 1024];
        while self.failure.is_none() {
            match self.stream.read(&mut buf) {
                Ok(0) => self.fail(&io::Error::from(io::ErrorKind::UnexpectedEof), tally),
                Ok(n) => {
                    self.reader.feed(&buf[..n]);
                    self.take_replies(tally);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => self.fail(&e, tally),
            }
        }
    }

    fn take_replies(&mut self, tally: &mut Tally) {
        let now = Instant::now();
        while self.failure.is_none() {
            match self.reader.next_reply() {
                Ok(Some(r)) => self.check(r, now, tally),
                Ok(None) => break,
                Err(e) => self.fail(&e.into(), tally),
            }
        }
    }

    fn check(&mut self, reply: Reply, now: Instant, tally: &mut Tally) {
        let Some(p) = self.pending.take() else {
            tally.mismatch(self.id, format!("unasked reply {reply}"));
            let e = io::Error::new(io::ErrorKind::InvalidData, "reply nothing asked for");
            self.fail(&e, tally);
            return;
        };
        tally.replies += 1;
        let latency = now - p.sent;
        tally.latencies_us.push(micros(latency));
        tally.sample(p.sent_unix_ms, self.id, p.seq, Some(latency));
        let gap = now - self.last_reply;
        tally.gaps_us.push(micros(gap));
        if gap > self.max_gap {
            self.max_gap = gap;
            self.max_gap_end_unix_ms = sys::unix_ms();
        }
        self.last_reply = now;

        if let Reply::Error(msg) = &reply {
            tally.error_replies += 1;
            let msg = String::from_utf8_lossy(msg);
            tally.error(self.id, format!("{} (seq {}): -{msg}", p.what, p.seq));
            return;
        }
        let wrong = match (&p.expect, &reply) {
            (Expect::AnyInteger, Reply::Integer(_)) => None,
            (Expect::Counter(want), Reply::Integer(n)) => {
                self.counter = *n;
                (n != want).then(|| format!("counter {n} after {} (want {want})", want - 1))
            }
            (Expect::Ok, Reply::Simple(s)) if s == b"OK" => None,
            (Expect::Bulk(want), Reply::Bulk(got)) if got == want => None,
            (Expect::Length(want), Reply::Integer(n)) => {
                self.log_len = *n;
                (n != want).then(|| format!("length {n}, want {want}"))
            }
            (Expect::Bulk(want), got) => {
                Some(format!("{got}, want {:?}", String::from_utf8_lossy(want)))
            }
            (_, got) => Some(format!("unexpected reply {got}")),
        };
        if let Some(w) = wrong {
            tally.mismatch(self.id, format!("{} (seq {}): {w}", p.what, p.seq));
        }
    }
}

/// Runs the client and returns its summary (see the module docs).
pub fn run(opts: &Options) -> io::Result<Value> {
    let signals = SignalFd::new(&[libc::SIGTERM, libc::SIGINT])?;
    let mut tally = Tally::default();
    if let Some(path) = &opts.samples {
        let f = File::create(path)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        let mut w = BufWriter::new(f);
        writeln!(w, "unix_ms,conn,seq,latency_ms")?;
        tally.samples = Some(w);
    }
    let pid = std::process::id();
    let t_connect = Instant::now();
    let mut conns = Vec::with_capacity(opts.connections);
    for i in 0..opts.connections {
        let s = TcpStream::connect_timeout(&opts.to, Duration::from_secs(5))
            .map_err(|e| io::Error::new(e.kind(), format!("connection {i} to {}: {e}", opts.to)))?;
        s.set_nodelay(true)?;
        s.set_nonblocking(true)?;
        let key = format!("ferry:{pid}:{i}");
        conns.push(Conn {
            id: i,
            stream: s,
            log_key: format!("{key}:log"),
            key,
            pid,
            next_seq: 0,
            pending: None,
            counter: 0,
            log_len: 0,
            last_reply: Instant::now(),
            max_gap: Duration::ZERO,
            max_gap_end_unix_ms: 0,
            reader: RespReader::new(Limits::default()),
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

    let start = Instant::now();
    for c in &mut conns {
        c.last_reply = start;
    }
    let deadline = opts.duration.map(|d| start + d);
    let mut next_tick = start;
    let mut stop_at: Option<Instant> = None; // when sending stopped
    loop {
        let now = Instant::now();
        if stop_at.is_none()
            && (deadline.is_some_and(|d| now >= d) || conns.iter().all(|c| c.failure.is_some()))
        {
            stop_at = Some(now);
        }
        if let Some(t) = stop_at {
            let owed = conns
                .iter()
                .any(|c| c.failure.is_none() && c.pending.is_some());
            if !owed || now >= t + DRAIN {
                break;
            }
        } else if now >= next_tick {
            for c in &mut conns {
                c.send(&mut tally);
            }
            next_tick += opts.interval;
            if next_tick < now {
                next_tick = now + opts.interval; // fell behind: skip, do not burst
            }
        }
        let wake = match stop_at {
            Some(t) => t + DRAIN,
            None => deadline.map_or(next_tick, |d| d.min(next_tick)),
        };
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
        // Round up so a sub-millisecond wait does not spin.
        let timeout_ms = timeout.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
        sys::poll(&mut pfds, timeout_ms)?;
        if pfds[0].revents != 0 && signals.read()?.is_some() && stop_at.is_none() {
            stop_at = Some(Instant::now());
        }
        for (i, c) in conns.iter_mut().enumerate() {
            let ev = pfds[i + 1].revents;
            if c.failure.is_some() {
                continue;
            }
            if ev & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) != 0 {
                c.read(&mut tally);
            }
            if ev & libc::POLLOUT != 0 {
                c.flush(&mut tally);
            }
        }
    }
    let elapsed = start.elapsed();
    let end = Instant::now();

    let mut per_conn_gap = Vec::with_capacity(conns.len());
    let mut final_counter = Vec::with_capacity(conns.len());
    let (mut resets, mut eofs, mut io_errors, mut retrans, mut unanswered) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut worst = (Duration::ZERO, 0u64);
    for c in &mut conns {
        if let Some(p) = c.pending.take() {
            unanswered += 1;
            tally.sample(p.sent_unix_ms, c.id, p.seq, None);
            // A connection still owing a reply has been silent since its last reply.
            if c.failure.is_none() {
                let open = end - c.last_reply;
                if open > c.max_gap {
                    c.max_gap = open;
                    c.max_gap_end_unix_ms = sys::unix_ms();
                }
            }
        }
        match c.failure {
            Some(Failure::Reset) => resets += 1,
            Some(Failure::Eof) => eofs += 1,
            Some(Failure::Error) => io_errors += 1,
            None => c.retrans = total_retrans(&c.stream),
        }
        retrans += u64::from(c.retrans);
        per_conn_gap.push(ms(c.max_gap));
        final_counter.push(c.counter);
        if c.max_gap > worst.0 {
            worst = (c.max_gap, c.max_gap_end_unix_ms);
        }
    }
    if let Some(mut w) = tally.samples.take()
        && let Err(e) = w.flush()
    {
        tally.samples_error = Some(e);
    }
    if let Some(e) = tally.samples_error.take() {
        return Err(io::Error::new(e.kind(), format!("writing samples: {e}")));
    }
    let alive = conns.iter().filter(|c| c.failure.is_none()).count();
    Ok(json!({
        "to": opts.to.to_string(),
        "connections": conns.len(),
        "alive": alive,
        "reconnects": 0,
        "requests": tally.requests,
        "replies": tally.replies,
        "unanswered": unanswered,
        "errors": tally.error_replies + io_errors,
        "error_replies": tally.error_replies,
        "error_examples": tally.error_examples,
        "mismatches": tally.mismatches,
        "mismatch_examples": tally.examples,
        "resets": resets,
        "closed_by_server": eofs,
        "retransmits": retrans,
        "max_gap_ms": ms(worst.0),
        "max_gap_end_unix_ms": worst.1,
        "p50_gap_ms": percentile_ms(&mut tally.gaps_us, 0.5),
        "p99_gap_ms": percentile_ms(&mut tally.gaps_us, 0.99),
        "p50_latency_ms": percentile_ms(&mut tally.latencies_us, 0.5),
        "p99_latency_ms": percentile_ms(&mut tally.latencies_us, 0.99),
        "max_latency_ms": percentile_ms(&mut tally.latencies_us, 1.0),
        "max_gap_ms_per_connection": per_conn_gap,
        "final_counter": final_counter,
        "interval_ms": ms(opts.interval),
        "duration_ms": ms(elapsed),
        "connect_ms": ms(connect_time),
    }))
}

/// Did every connection survive with every reply right?
pub fn passed(summary: &Value) -> bool {
    let n = |k: &str| summary.get(k).and_then(Value::as_u64).unwrap_or(u64::MAX);
    n("resets") == 0
        && n("closed_by_server") == 0
        && n("errors") == 0
        && n("mismatches") == 0
        && n("unanswered") == 0
        && n("alive") == n("connections")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(bytes: &[u8]) -> Result<Option<(Reply, usize)>, RespError> {
        parse(bytes, &Limits::default())
    }

    #[test]
    fn encodes_commands() {
        assert_eq!(
            encode(&["SET", "k", ""]),
            b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$0\r\n\r\n"
        );
        assert_eq!(encode::<&str>(&[]), b"*0\r\n");
    }

    #[test]
    fn parses_every_type() {
        let cases: &[(&[u8], Reply)] = &[
            (b"+OK\r\n", Reply::Simple(b"OK".to_vec())),
            (b"+\r\n", Reply::Simple(Vec::new())),
            (
                b"-ERR wrong type\r\n",
                Reply::Error(b"ERR wrong type".to_vec()),
            ),
            (b":0\r\n", Reply::Integer(0)),
            (b":-17\r\n", Reply::Integer(-17)),
            (b":9223372036854775807\r\n", Reply::Integer(i64::MAX)),
            (b"$3\r\nfoo\r\n", Reply::Bulk(b"foo".to_vec())),
            (b"$0\r\n\r\n", Reply::Bulk(Vec::new())),
            (b"$4\r\na\r\nb\r\n", Reply::Bulk(b"a\r\nb".to_vec())),
            (b"$-1\r\n", Reply::Nil),
            (b"*-1\r\n", Reply::NilArray),
            (b"*0\r\n", Reply::Array(Vec::new())),
            (
                b"*3\r\n:1\r\n$-1\r\n*1\r\n+x\r\n",
                Reply::Array(vec![
                    Reply::Integer(1),
                    Reply::Nil,
                    Reply::Array(vec![Reply::Simple(b"x".to_vec())]),
                ]),
            ),
        ];
        for (bytes, want) in cases {
            let (got, used) = one(bytes).unwrap().unwrap();
            assert_eq!(&got, want, "{:?}", String::from_utf8_lossy(bytes));
            assert_eq!(used, bytes.len());
        }
    }

    #[test]
    fn every_prefix_is_incomplete_and_byte_by_byte_feeding_works() {
        let stream: &[u8] =
            b"+OK\r\n:42\r\n$5\r\nhello\r\n$-1\r\n-ERR x\r\n*2\r\n$1\r\na\r\n:-3\r\n$0\r\n\r\n";
        let want = vec![
            Reply::Simple(b"OK".to_vec()),
            Reply::Integer(42),
            Reply::Bulk(b"hello".to_vec()),
            Reply::Nil,
            Reply::Error(b"ERR x".to_vec()),
            Reply::Array(vec![Reply::Bulk(b"a".to_vec()), Reply::Integer(-3)]),
            Reply::Bulk(Vec::new()),
        ];
        // Each reply's strict prefixes are incomplete, never errors.
        let mut pos = 0;
        for w in &want {
            let (r, used) = one(&stream[pos..]).unwrap().unwrap();
            assert_eq!(&r, w);
            for cut in 0..used {
                assert_eq!(one(&stream[pos..pos + cut]), Ok(None), "{w:?} cut at {cut}");
            }
            pos += used;
        }
        assert_eq!(pos, stream.len());
        // Fed in every chunk size, the reader yields the same replies.
        for chunk in 1..=stream.len() {
            let mut r = RespReader::new(Limits::default());
            let mut got = Vec::new();
            for piece in stream.chunks(chunk) {
                r.feed(piece);
                while let Some(x) = r.next_reply().unwrap() {
                    got.push(x);
                }
            }
            assert_eq!(got, want, "chunk size {chunk}");
            assert_eq!(r.buffered(), 0);
        }
    }

    #[test]
    fn rejects_malformed_input() {
        assert_eq!(one(b"?x\r\n"), Err(RespError::BadType(b'?')));
        assert_eq!(one(b"OK\r\n"), Err(RespError::BadType(b'O')));
        assert_eq!(one(b"+OK\n"), Err(RespError::BadTerminator));
        assert_eq!(one(b"+\n"), Err(RespError::BadTerminator));
        assert_eq!(one(b"$3\r\nfooX\r\n"), Err(RespError::BadTerminator));
        assert_eq!(one(b"$3\r\nfoo\rX"), Err(RespError::BadTerminator));
        assert!(matches!(one(b":\r\n"), Err(RespError::BadNumber(_))));
        assert!(matches!(one(b":-\r\n"), Err(RespError::BadNumber(_))));
        assert!(matches!(one(b":+1\r\n"), Err(RespError::BadNumber(_))));
        assert!(matches!(one(b":1 \r\n"), Err(RespError::BadNumber(_))));
        assert!(matches!(one(b":1x\r\n"), Err(RespError::BadNumber(_))));
        assert!(matches!(
            one(b":99999999999999999999\r\n"),
            Err(RespError::BadNumber(_))
        ));
        assert!(matches!(one(b"$x\r\n"), Err(RespError::BadNumber(_))));
        assert_eq!(one(b"$-2\r\n"), Err(RespError::BadLength(-2)));
        assert_eq!(one(b"*-5\r\n"), Err(RespError::BadLength(-5)));
        // An error inside an array is an error even before the array is complete.
        assert!(matches!(
            one(b"*3\r\n:1\r\n:z\r\n"),
            Err(RespError::BadNumber(_))
        ));
    }

    #[test]
    fn enforces_limits() {
        let lim = Limits {
            max_line: 8,
            max_bulk: 10,
            max_elements: 3,
            max_depth: 2,
            max_frame: 64,
        };
        let p = |b: &[u8]| parse(b, &lim);
        // Lines: up to max_line bytes are fine, one more is not, even before its CRLF arrives.
        assert_eq!(
            p(b"+12345678\r\n").unwrap().unwrap().0,
            Reply::Simple(b"12345678".to_vec())
        );
        assert_eq!(p(b"+12345678"), Ok(None));
        assert_eq!(p(b"+123456789\r\n"), Err(RespError::Oversize("line")));
        assert_eq!(p(b"+1234567890"), Err(RespError::Oversize("line")));
        // Bulk strings: refused on the header, before the body is buffered.
        assert!(p(b"$10\r\n0123456789\r\n").unwrap().is_some());
        assert_eq!(p(b"$11\r\n"), Err(RespError::Oversize("bulk string")));
        assert_eq!(
            p(b"$9223372036854775807\r\n"),
            Err(RespError::Oversize("line"))
        );
        assert_eq!(
            parse(b"$9223372036854775807\r\n", &Limits::default()),
            Err(RespError::Oversize("bulk string"))
        );
        // Arrays: count and depth.
        assert!(p(b"*3\r\n:1\r\n:2\r\n:3\r\n").unwrap().is_some());
        assert_eq!(p(b"*4\r\n"), Err(RespError::Oversize("array")));
        assert!(p(b"*1\r\n*1\r\n:1\r\n").unwrap().is_some());
        assert_eq!(p(b"*1\r\n*1\r\n*1\r\n:1\r\n"), Err(RespError::TooDeep));
        // The reader bounds what it buffers for one incomplete reply.
        let mut r = RespReader::new(lim);
        r.feed(b"*3\r\n$10\r\n0123456789\r\n$10\r\n0123456789\r\n$10\r\n0123456789\r");
        assert_eq!(r.next_reply(), Ok(None));
        let lim = Limits {
            max_frame: 32,
            ..lim
        };
        let mut r = RespReader::new(lim);
        r.feed(b"*3\r\n$10\r\n0123456789\r\n$10\r\n0123456789\r\n");
        assert_eq!(r.next_reply(), Err(RespError::Oversize("reply")));
    }

    #[test]
    fn commands_cycle_and_check() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let mut c = Conn {
            id: 1,
            stream,
            key: "ferry:7:1".into(),
            log_key: "ferry:7:1:log".into(),
            pid: 7,
            next_seq: 0,
            pending: None,
            counter: 0,
            log_len: 0,
            last_reply: Instant::now(),
            max_gap: Duration::ZERO,
            max_gap_end_unix_ms: 0,
            reader: RespReader::default(),
            output: Vec::new(),
            failure: None,
            retrans: 0,
        };
        let names: Vec<String> = (0..11)
            .map(|s| String::from_utf8(c.command(s).0[0].clone()).unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "DEL", "INCR", "SET", "GET", "APPEND", "STRLEN", "INCR", "SET", "GET", "APPEND",
                "STRLEN"
            ]
        );
        // Round 4 reads round 2's value back.
        let (args, expect) = c.command(18);
        assert_eq!(args[1], b"ferry:7:1:v2");
        assert!(matches!(expect, Expect::Bulk(v) if v == payload(7, 1, 2)));

        // A simulated server: the right answers pass, a wrong one is a mismatch.
        let mut tally = Tally::default();
        let mut counter = 0;
        let mut log = 0;
        let mut values = std::collections::HashMap::new();
        for seq in 0..50u64 {
            c.send(&mut tally);
            let args = c.command(seq).0;
            let reply = match args[0].as_slice() {
                b"DEL" => Reply::Integer(0),
                b"INCR" => {
                    counter += 1;
                    Reply::Integer(counter)
                }
                b"SET" => {
                    values.insert(args[1].clone(), args[2].clone());
                    Reply::Simple(b"OK".to_vec())
                }
                b"GET" => values
                    .get(&args[1])
                    .cloned()
                    .map_or(Reply::Nil, Reply::Bulk),
                b"APPEND" => {
                    log += args[2].len() as i64;
                    Reply::Integer(log)
                }
                _ => Reply::Integer(log),
            };
            c.check(reply, Instant::now(), &mut tally);
        }
        assert_eq!(tally.mismatches, 0, "{:?}", tally.examples);
        assert_eq!(tally.replies, 50);
        assert_eq!(c.counter, 10);
        c.send(&mut tally); // seq 50: INCR
        c.check(Reply::Integer(12), Instant::now(), &mut tally);
        assert_eq!(tally.mismatches, 1);
        c.send(&mut tally); // SET
        c.check(Reply::Error(b"OOM".to_vec()), Instant::now(), &mut tally);
        assert_eq!(tally.error_replies, 1);
        c.send(&mut tally); // GET
        c.check(Reply::Nil, Instant::now(), &mut tally);
        assert_eq!(tally.mismatches, 2);
        // A reply nobody asked for ends the connection.
        c.check(Reply::Integer(1), Instant::now(), &mut tally);
        assert_eq!(c.failure, Some(Failure::Error));
    }

    #[test]
    fn verdict() {
        let ok = json!({"resets": 0, "closed_by_server": 0, "errors": 0, "mismatches": 0,
                        "unanswered": 0, "alive": 2, "connections": 2});
        assert!(passed(&ok));
        let mut bad = ok.clone();
        bad["closed_by_server"] = json!(1);
        assert!(!passed(&bad));
    }
}
