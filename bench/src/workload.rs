//! A `ferry-workload` process (a server or the client) that the demo or a benchmark started
//! inside a namespace: its stdout and stderr lines arrive on channels. It is SIGKILLed (by its
//! PID, which cannot be recycled before we reap it) and reaped when dropped.

use std::{
    fmt,
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc::{self, RecvTimeoutError},
    time::{Duration, Instant},
};

use ferry_lab::{
    clock::{unix_ms, wait_until},
    procs::PidFd,
};
use ferry_overlay::netns::NetNsError;
use serde_json::Value;

/// Which of the process's outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl fmt::Display for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("{name}: entering {netns}: {source}", netns = .netns.display())]
    Netns {
        name: String,
        netns: PathBuf,
        source: NetNsError,
    },
    #[error("spawning {name}: {source}")]
    Spawn {
        name: String,
        source: std::io::Error,
    },
    #[error("{name}: no JSON line on {stream} within {timeout:?} ({why})")]
    NoJson {
        name: String,
        stream: Stream,
        timeout: Duration,
        why: RecvTimeoutError,
    },
    #[error("{name} exited before {event:?}: {said}")]
    ExitedBefore {
        name: String,
        event: &'static str,
        said: String,
    },
    #[error("{name}: no {event:?} within {timeout:?}: {said}")]
    NoEvent {
        name: String,
        event: &'static str,
        timeout: Duration,
        said: String,
    },
    #[error("{name}: no JSON summary on stdout within {timeout:?}: {text:?}")]
    NoSummary {
        name: String,
        timeout: Duration,
        text: String,
    },
    #[error("{name}: writing {line:?}: {source}")]
    Write {
        name: String,
        line: String,
        source: std::io::Error,
    },
    #[error("{name}: signal {signal}: {source}")]
    Signal {
        name: String,
        signal: i32,
        source: std::io::Error,
    },
    #[error("{name}: waiting for its exit: {source}")]
    Wait {
        name: String,
        source: std::io::Error,
    },
    #[error("{name} did not exit within {timeout:?}")]
    NotExited { name: String, timeout: Duration },
}

pub struct Workload {
    child: Child,
    stdin: Option<ChildStdin>,
    out: mpsc::Receiver<String>,
    err: mpsc::Receiver<String>,
    name: String,
}

/// The lines of `r`, on a channel that closes at EOF.
fn lines(r: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

impl Workload {
    /// Starts `bin args..` in namespace `ns`; with `stdin`, [`Workload::say`] writes to it.
    pub fn start(bin: &Path, ns: &Path, args: &[&str], stdin: bool) -> Result<Self, WorkloadError> {
        let name = format!("ferry-workload {}", args.first().unwrap_or(&""));
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .stdin(if stdin { Stdio::piped() } else { Stdio::null() })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        ferry_overlay::netns::command_in(&mut cmd, ns).map_err(|source| WorkloadError::Netns {
            name: name.clone(),
            netns: ns.to_owned(),
            source,
        })?;
        let mut child = cmd.spawn().map_err(|source| WorkloadError::Spawn {
            name: name.clone(),
            source,
        })?;
        let out = lines(child.stdout.take().expect("stdout is piped"));
        let err = lines(child.stderr.take().expect("stderr is piped"));
        Ok(Self {
            stdin: child.stdin.take(),
            child,
            out,
            err,
            name,
        })
    }

    fn rx(&self, stream: Stream) -> &mpsc::Receiver<String> {
        match stream {
            Stream::Stdout => &self.out,
            Stream::Stderr => &self.err,
        }
    }

    /// The next JSON line on `stream`; other lines are passed on to our stderr.
    pub fn next_json(&self, stream: Stream, timeout: Duration) -> Result<Value, WorkloadError> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .rx(stream)
                .recv_timeout(left)
                .map_err(|why| WorkloadError::NoJson {
                    name: self.name.clone(),
                    stream,
                    timeout,
                    why,
                })?;
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                return Ok(v);
            }
            eprintln!("  {}: {line}", self.name);
        }
    }

    /// Waits for `{"event":EVENT,..}` on stderr. Other lines are not passed on: the first one
    /// says why the process failed (the usage text that follows does not) and goes into the
    /// error if it exits first or the time runs out.
    pub fn event(
        &mut self,
        event: &'static str,
        timeout: Duration,
    ) -> Result<Value, WorkloadError> {
        let deadline = Instant::now() + timeout;
        let mut said = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.err.recv_timeout(left) {
                Ok(line) => match serde_json::from_str::<Value>(&line) {
                    Ok(v) if v["event"] == event => return Ok(v),
                    _ => {
                        said.get_or_insert(line);
                    }
                },
                Err(RecvTimeoutError::Disconnected) => {
                    let _ = self.child.wait();
                    return Err(WorkloadError::ExitedBefore {
                        name: self.name.clone(),
                        event,
                        said: said.unwrap_or_default(),
                    });
                }
                Err(RecvTimeoutError::Timeout) => {
                    return Err(WorkloadError::NoEvent {
                        name: self.name.clone(),
                        event,
                        timeout,
                        said: said.unwrap_or_default(),
                    });
                }
            }
        }
    }

    /// A client that connected: started again (up to 30 times, 100 ms apart) while its
    /// server is not listening yet; `on_retry` hears why each attempt failed.
    pub fn start_connected(
        bin: &Path,
        ns: &Path,
        args: &[&str],
        mut on_retry: impl FnMut(u32, &WorkloadError),
    ) -> Result<Self, WorkloadError> {
        let mut tries = 0;
        loop {
            tries += 1;
            let mut client = Self::start(bin, ns, args, false)?;
            match client.event("connected", Duration::from_secs(10)) {
                Ok(_) => return Ok(client),
                Err(e) if tries < 30 => {
                    on_retry(tries, &e);
                    drop(client);
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Writes `line` to its stdin.
    pub fn say(&mut self, line: &str) -> Result<(), WorkloadError> {
        let write = |stdin: Option<&mut ChildStdin>| {
            let stdin = stdin.ok_or_else(|| std::io::Error::other("started without a stdin"))?;
            writeln!(stdin, "{line}")?;
            stdin.flush()
        };
        write(self.stdin.as_mut()).map_err(|source| WorkloadError::Write {
            name: self.name.clone(),
            line: line.to_owned(),
            source,
        })
    }

    /// Sends `signal` (nothing if it is gone already).
    pub fn signal(&self, signal: i32) -> Result<(), WorkloadError> {
        let pid = i32::try_from(self.child.id()).unwrap_or(i32::MAX);
        let sent = match PidFd::open(pid, None) {
            Ok(Some(fd)) => fd.signal(signal),
            Ok(None) => Ok(()),
            Err(e) => Err(e),
        };
        sent.map_err(|source| WorkloadError::Signal {
            name: self.name.clone(),
            signal,
            source,
        })
    }

    /// Waits for the process to exit; true if it exited 0.
    pub fn wait(&mut self, timeout: Duration) -> Result<bool, WorkloadError> {
        let status = wait_until(timeout, Duration::from_millis(5), || self.child.try_wait())
            .map_err(|source| WorkloadError::Wait {
                name: self.name.clone(),
                source,
            })?;
        match status {
            Some(s) => Ok(s.success()),
            None => Err(WorkloadError::NotExited {
                name: self.name.clone(),
                timeout,
            }),
        }
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, then the last JSON line of its stdout (the client's summary: it drains owed
    /// replies first) and when its stdout ended (Unix ms). Its stderr is passed on.
    pub fn finish(mut self, timeout: Duration) -> Result<(Value, f64), WorkloadError> {
        self.signal(libc::SIGTERM)?;
        let deadline = Instant::now() + timeout;
        let mut text = Vec::new();
        loop {
            match self
                .out
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(line) => text.push(line),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {
                    return Err(WorkloadError::NoSummary {
                        name: self.name.clone(),
                        timeout,
                        text: text.join("\n"),
                    });
                }
            }
        }
        let ended = unix_ms();
        let _ = self.child.wait();
        for line in self.err.try_iter().filter(|l| !is_progress(l)) {
            eprintln!("  {}: {line}", self.name);
        }
        text.iter()
            .rev()
            .find_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
            .map(|v| (v, ended))
            .ok_or_else(|| WorkloadError::NoSummary {
                name: self.name.clone(),
                timeout,
                text: text.join("\n"),
            })
    }
}

/// A client's `{"event":"progress",..}` line (`--progress-ms`): read by whoever asked for
/// them, never worth passing on.
fn is_progress(line: &str) -> bool {
    serde_json::from_str::<Value>(line).is_ok_and(|v| v["event"] == "progress")
}

impl Drop for Workload {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// The arguments of the benches' `ferry-workload client`: `connections` connections to `to`,
/// a numbered request of [`crate::handoff::PAYLOAD_BYTES`] every `interval_ms` on each, JSON
/// events; then `extra`.
pub fn client_args(to: &str, connections: u64, interval_ms: u64, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "client",
        "--to",
        to,
        "--connections",
        &connections.to_string(),
        "--interval-ms",
        &interval_ms.to_string(),
        "--payload-bytes",
        &crate::handoff::PAYLOAD_BYTES.to_string(),
        "--json",
    ]
    .map(str::to_owned)
    .to_vec();
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    args
}

#[cfg(test)]
mod tests {
    use super::*;

    const NS: &str = "/proc/self/ns/net";
    const LONG: Duration = Duration::from_secs(30);

    /// `sh -c SCRIPT` standing for a workload, in our own namespace (setns needs root).
    fn sh(script: &str, stdin: bool) -> Option<Workload> {
        if !ferry_lab::procs::is_root() {
            eprintln!("skipped: needs root");
            return None;
        }
        Some(Workload::start(Path::new("/bin/sh"), Path::new(NS), &["-c", script], stdin).unwrap())
    }

    #[test]
    fn events_lines_and_the_summary() {
        let Some(mut w) = sh(
            r#"trap 'echo "{\"summary\":1}"; exit 0' TERM
               echo 'usage: nothing' >&2; echo '{"event":"connected","n":2}' >&2
               read line; echo "not json"; echo "{\"got\":\"$line\"}"
               while :; do sleep 0.01; done"#,
            true,
        ) else {
            return;
        };
        assert_eq!(w.event("connected", LONG).unwrap()["n"], 2);
        w.say("hello").unwrap();
        assert_eq!(w.next_json(Stream::Stdout, LONG).unwrap()["got"], "hello");
        let (summary, ended) = w.finish(LONG).unwrap();
        assert_eq!(summary["summary"], 1);
        assert!(ended > 0.0);
    }

    #[test]
    fn a_process_that_exits_first_says_why() {
        let Some(mut w) = sh("echo 'no route to host' >&2; echo usage >&2; exit 3", false) else {
            return;
        };
        match w.event("connected", LONG) {
            Err(WorkloadError::ExitedBefore { said, .. }) => assert_eq!(said, "no route to host"),
            other => panic!("{other:?}"),
        }
        assert!(!w.wait(LONG).unwrap(), "exit 3 is a failure");
        assert!(matches!(w.say("x"), Err(WorkloadError::Write { .. })));
    }
}
