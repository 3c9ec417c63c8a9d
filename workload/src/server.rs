//! `ferry-workload serve` and `ferry-workload claim`: a stateful TCP request/response server
//! that moves itself with the agent's socket hand-off.
//!
//! Protocol: a client sends lines `REQ <seq> <payload>\n` on a connection; the server answers
//! each with `RES <seq> <n>\n`, where `n` is that connection's request counter (1 for its first
//! request, +1 per request). Anything else is answered `ERR <reason>\n` and not counted. The
//! counters live only in this process's memory: they are the state a move has to carry.
//!
//! Moving: on SIGUSR1 (to `--export-to HOST`) or a line `export HOST` on stdin, the server stops
//! reading, tries once more to write the answers it owes, and exports every connection socket
//! plus its state (per connection: counter, bytes read but not yet a full line, answers not
//! yet written) to its agent. On success it prints one JSON line and exits 0: the sockets are
//! in repair mode and close silently. On a refusal nothing was changed: it prints the error
//! and goes on serving. `claim` is the other half, on the destination: it opens its listening
//! socket, claims the package, rebuilds the connections in the exported order and serves on.
//!
//! One thread, non-blocking sockets and poll(2); signals arrive through a signalfd.

use std::{
    fs::File,
    io::{self, Read as _, Write as _},
    net::{Ipv4Addr, TcpListener, TcpStream},
    os::fd::{AsFd, BorrowedFd, OwnedFd},
    path::PathBuf,
    time::Instant,
};

use serde_json::{Value, json};

use crate::{
    handoff::{self, HandoffError},
    sys::{self, SignalFd},
};

/// Longest request line.
pub const MAX_LINE: usize = 64 * 1024;
/// Version of the exported state.
pub const STATE_VERSION: u64 = 1;

/// Where the agent's hand-off socket is, and which container this process belongs to.
#[derive(Debug, Clone)]
pub struct HandoffTarget {
    pub socket: PathBuf,
    pub container: Ipv4Addr,
}

#[derive(Debug, Clone)]
pub struct Options {
    pub port: u16,
    pub handoff: Option<HandoffTarget>,
    /// The destination host SIGUSR1 exports to.
    pub export_to: Option<String>,
}

/// How [`Server::run`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Everything was handed to the agent.
    Exported,
    /// SIGTERM, SIGINT or `quit`.
    Stopped,
}

/// One client connection and its state.
struct Conn {
    stream: TcpStream,
    counter: u64,
    /// Bytes read that do not make a full line yet.
    input: Vec<u8>,
    /// Answers not written yet.
    output: Vec<u8>,
}

impl Conn {
    fn new(stream: TcpStream, counter: u64, input: Vec<u8>, output: Vec<u8>) -> io::Result<Self> {
        stream.set_nonblocking(true)?;
        stream.set_nodelay(true)?;
        Ok(Self {
            stream,
            counter,
            input,
            output,
        })
    }

    /// Answers every complete line of `input`. Returns the number answered (an over-long line
    /// is an error: the connection is dropped).
    fn answer_lines(&mut self) -> io::Result<u64> {
        let mut answered = 0;
        while let Some(end) = self.input.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.input.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line[..end]);
            let mut words = line.split_ascii_whitespace();
            match (words.next(), words.next().map(str::parse::<u64>)) {
                (Some("REQ"), Some(Ok(seq))) => {
                    self.counter += 1;
                    answered += 1;
                    self.output
                        .extend_from_slice(format!("RES {seq} {}\n", self.counter).as_bytes());
                }
                // The working set's figures (`crate::memory`); not a request: no count.
                (Some("MEM"), None) => self.output.extend_from_slice(
                    format!("MEM {}\n", crate::memory::last_report()).as_bytes(),
                ),
                _ => self
                    .output
                    .extend_from_slice(b"ERR want `REQ <seq> <payload>`\n"),
            }
        }
        if self.input.len() > MAX_LINE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "request line too long",
            ));
        }
        Ok(answered)
    }

    /// Reads what is there and answers it. `Ok(false)`: the peer closed.
    fn read(&mut self) -> io::Result<(bool, u64)> {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match self.stream.read(&mut buf) {
                Ok(0) => return Ok((false, 0)),
                Ok(n) => {
                    self.input.extend_from_slice(&buf[..n]);
                    if n < buf.len() {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        let answered = self.answer_lines()?;
        self.flush()?;
        Ok((true, answered))
    }

    /// Writes as much of `output` as the socket takes now.
    fn flush(&mut self) -> io::Result<()> {
        while !self.output.is_empty() {
            match self.stream.write(&self.output) {
                Ok(n) => {
                    self.output.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn to_json(&self) -> Value {
        json!({
            "counter": self.counter,
            "input": sys::hex(&self.input),
            "output": sys::hex(&self.output),
        })
    }

    fn from_json(v: &Value, fd: OwnedFd) -> Result<Self, ConnStateError> {
        let counter = v
            .get("counter")
            .and_then(Value::as_u64)
            .ok_or(ConnStateError::NoCounter)?;
        let bytes = |name: &'static str| {
            v.get(name)
                .and_then(Value::as_str)
                .and_then(sys::unhex)
                .ok_or(ConnStateError::NoBytes(name))
        };
        Self::new(
            TcpStream::from(fd),
            counter,
            bytes("input")?,
            bytes("output")?,
        )
        .map_err(ConnStateError::Socket)
    }
}

/// Why a claimed connection's state cannot be rebuilt.
#[derive(Debug, thiserror::Error)]
pub enum ConnStateError {
    #[error("a connection without `counter`")]
    NoCounter,
    #[error("a connection without hex `{0}`")]
    NoBytes(&'static str),
    #[error("setting up a claimed socket: {0}")]
    Socket(#[source] io::Error),
}

/// The server: its listening socket, its connections, and how it is told to move.
pub struct Server {
    opts: Options,
    listener: TcpListener,
    conns: Vec<Conn>,
    signals: SignalFd,
    stdin: Option<File>,
    stdin_buf: Vec<u8>,
    /// Requests answered by this process.
    served: u64,
}

/// Prints one JSON line on stdout.
pub fn emit(v: &Value) {
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{v}");
    let _ = out.flush();
}

impl Server {
    /// Blocks the signals it handles (call before any other thread starts) and listens on
    /// [::]:`port` (both families), or 0.0.0.0:`port` where IPv6 is off.
    pub fn start(opts: Options) -> io::Result<Self> {
        let signals = SignalFd::new(&[libc::SIGUSR1, libc::SIGTERM, libc::SIGINT])?;
        // Dual-stack where the namespace has IPv6 (IPv4 clients arrive v4-mapped), else IPv4.
        let listener = TcpListener::bind((std::net::Ipv6Addr::UNSPECIFIED, opts.port))
            .or_else(|_| TcpListener::bind((Ipv4Addr::UNSPECIFIED, opts.port)))?;
        listener.set_nonblocking(true)?;
        let stdin = io::stdin()
            .as_fd()
            .try_clone_to_owned()
            .ok()
            .map(File::from);
        Ok(Self {
            opts,
            listener,
            conns: Vec::new(),
            signals,
            stdin,
            stdin_buf: Vec::new(),
            served: 0,
        })
    }

    /// The destination's half: listens, claims the package exported for this container, and
    /// rebuilds its connections. Returns the server and the line to print.
    pub fn claim(opts: Options, timeout_ms: u64) -> Result<(Self, Value), HandoffError> {
        let local = |message: String| HandoffError {
            code: "workload".into(),
            message,
        };
        let target = opts
            .handoff
            .clone()
            .ok_or_else(|| local("claim needs --handoff-socket and --container".into()))?;
        let mut server =
            Self::start(opts).map_err(|e| local(format!("opening the listening socket: {e}")))?;
        let t0 = Instant::now();
        let claimed = handoff::claim(&target.socket, target.container, timeout_ms)?;
        let state: Value = serde_json::from_slice(&claimed.state)
            .map_err(|e| local(format!("the claimed state is not JSON: {e}")))?;
        if state.get("version").and_then(Value::as_u64) != Some(STATE_VERSION) {
            return Err(local(format!(
                "the claimed state has version {:?}, this build reads {STATE_VERSION}",
                state.get("version")
            )));
        }
        let conns = state
            .get("connections")
            .and_then(Value::as_array)
            .ok_or_else(|| local("the claimed state has no `connections`".into()))?;
        if conns.len() != claimed.fds.len() {
            return Err(local(format!(
                "the state lists {} connections, the agent handed over {} sockets",
                conns.len(),
                claimed.fds.len()
            )));
        }
        for (c, fd) in conns.iter().zip(claimed.fds) {
            let mut conn = Conn::from_json(c, fd).map_err(|e| local(e.to_string()))?;
            server.served += conn.answer_lines().unwrap_or(0);
            let _ = conn.flush();
            server.conns.push(conn);
        }
        let mut line = claimed.reply;
        if let Some(o) = line.as_object_mut() {
            o.insert("event".into(), "claimed".into());
            o.insert("connections".into(), server.conns.len().into());
            o.insert("claim_ms".into(), json!(t0.elapsed().as_secs_f64() * 1e3));
            o.insert("serving_unix_ms".into(), sys::unix_ms().into());
        }
        Ok((server, line))
    }

    /// Hands every connection and the state to the agent (see the module docs).
    pub fn export(&mut self, to: &str) -> Result<Value, HandoffError> {
        let Some(target) = self.opts.handoff.clone() else {
            return Err(HandoffError {
                code: "workload".into(),
                message: "started without --handoff-socket and --container: cannot export".into(),
            });
        };
        let stopped_unix_ms = sys::unix_ms();
        let t0 = Instant::now();
        for c in &mut self.conns {
            // What cannot be written now travels in the state.
            let _ = c.flush();
        }
        let state = json!({
            "version": STATE_VERSION,
            "port": self.opts.port,
            "connections": self.conns.iter().map(Conn::to_json).collect::<Vec<_>>(),
        });
        let state = serde_json::to_vec(&state).expect("JSON values serialise");
        let fds: Vec<BorrowedFd<'_>> = self.conns.iter().map(|c| c.stream.as_fd()).collect();
        let mut reply = handoff::export(&target.socket, target.container, to, &fds, &state)?;
        if let Some(o) = reply.as_object_mut() {
            o.insert("event".into(), "exported".into());
            o.insert("connections".into(), self.conns.len().into());
            o.insert("served".into(), self.served.into());
            o.insert("stopped_unix_ms".into(), stopped_unix_ms.into());
            o.insert("export_ms".into(), json!(t0.elapsed().as_secs_f64() * 1e3));
        }
        Ok(reply)
    }

    /// Tries to export; prints the outcome. True if this process is done.
    fn try_export(&mut self, to: Option<&str>) -> bool {
        let to = to
            .map(str::to_owned)
            .or_else(|| self.opts.export_to.clone());
        let Some(to) = to else {
            emit(&json!({"event": "export_failed", "ok": false, "error": {
                "code": "workload", "message": "no destination: `export HOST` or --export-to"}}));
            return false;
        };
        match self.export(&to) {
            Ok(line) => {
                emit(&line);
                true
            }
            Err(e) => {
                emit(
                    &json!({"event": "export_failed", "ok": false, "error": e.to_json(),
                    "resumed": true, "connections": self.conns.len()}),
                );
                false
            }
        }
    }

    /// Serves until exported or stopped.
    pub fn run(&mut self) -> io::Result<Outcome> {
        const SIG: usize = 0;
        const LISTENER: usize = 1;
        const STDIN: usize = 2;
        const CONNS: usize = 3;
        emit(
            &json!({"event": "listening", "port": self.opts.port, "pid": std::process::id(),
            "connections": self.conns.len()}),
        );
        loop {
            let mut pfds = vec![
                sys::pollfd(self.signals.as_fd(), libc::POLLIN),
                sys::pollfd(self.listener.as_fd(), libc::POLLIN),
                match &self.stdin {
                    Some(f) => sys::pollfd(f.as_fd(), libc::POLLIN),
                    // A negative descriptor is ignored by poll(2).
                    None => libc::pollfd {
                        fd: -1,
                        events: 0,
                        revents: 0,
                    },
                },
            ];
            for c in &self.conns {
                let mut ev = libc::POLLIN;
                if !c.output.is_empty() {
                    ev |= libc::POLLOUT;
                }
                pfds.push(sys::pollfd(c.stream.as_fd(), ev));
            }
            sys::poll(&mut pfds, -1)?;

            if pfds[SIG].revents != 0 {
                while let Some(sig) = self.signals.read()? {
                    if sig == libc::SIGUSR1 {
                        if self.try_export(None) {
                            return Ok(Outcome::Exported);
                        }
                    } else {
                        return Ok(Outcome::Stopped);
                    }
                }
                continue; // the connections' events may be stale after a refused export
            }
            if pfds[STDIN].revents != 0
                && let Some(outcome) = self.read_stdin()
            {
                return Ok(outcome);
            }
            let mut dead = Vec::new();
            for (i, c) in self.conns.iter_mut().enumerate() {
                let Some(p) = pfds.get(CONNS + i) else { break };
                if p.revents == 0 {
                    continue;
                }
                let alive = if p.revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) != 0 {
                    match c.read() {
                        Ok((alive, answered)) => {
                            self.served += answered;
                            alive
                        }
                        Err(_) => false,
                    }
                } else {
                    c.flush().is_ok()
                };
                if !alive {
                    dead.push(i);
                }
            }
            for i in dead.into_iter().rev() {
                self.conns.remove(i);
            }
            if pfds[LISTENER].revents != 0 {
                self.accept();
            }
        }
    }

    fn accept(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((s, _)) => match Conn::new(s, 0, Vec::new(), Vec::new()) {
                    Ok(c) => self.conns.push(c),
                    Err(e) => eprintln!("ferry-workload: setting up a connection: {e}"),
                },
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    eprintln!("ferry-workload: accept: {e}");
                    return;
                }
            }
        }
    }

    /// Commands on stdin: `export [HOST]`, `status`, `quit`. End of file stops reading stdin.
    fn read_stdin(&mut self) -> Option<Outcome> {
        let mut buf = [0u8; 1024];
        let n = match self.stdin.as_mut().map(|f| f.read(&mut buf)) {
            Some(Ok(n)) if n > 0 => n,
            _ => {
                self.stdin = None;
                return None;
            }
        };
        self.stdin_buf.extend_from_slice(&buf[..n]);
        while let Some(end) = self.stdin_buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.stdin_buf.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line).trim().to_owned();
            let mut words = line.split_ascii_whitespace();
            match (words.next(), words.next()) {
                (Some("export"), to) => {
                    if self.try_export(to) {
                        return Some(Outcome::Exported);
                    }
                }
                (Some("status"), None) => emit(&json!({"event": "status",
                    "connections": self.conns.len(), "served": self.served})),
                (Some("quit"), None) => return Some(Outcome::Stopped),
                (None, _) => {}
                _ => emit(&json!({"event": "error",
                    "message": format!("unknown command {line:?}: want `export [HOST]`, `status` or `quit`")})),
            }
        }
        None
    }
}
