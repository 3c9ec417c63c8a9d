//! A `ferry-workload` process (client or server) run in a namespace for a test: its stdout
//! (the summary) is collected, its stderr lines arrive on a channel; SIGKILLed (by PID) and
//! reaped when dropped.

use std::{
    io::{BufRead as _, BufReader, Read as _},
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{KillOnDrop, wait_for, workspace_binary};

pub struct Workload {
    child: KillOnDrop,
    out: mpsc::Receiver<String>,
    err: mpsc::Receiver<String>,
    name: String,
}

impl Workload {
    /// `ferry-workload ARGS` inside `ns`.
    pub fn start(ns: &Path, args: &[&str]) -> Self {
        let mut cmd = Command::new(workspace_binary("ferry-workload"));
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        ferry_overlay::netns::command_in(&mut cmd, ns).unwrap();
        let mut child = cmd.spawn().expect("spawning ferry-workload");
        let (otx, out) = mpsc::channel();
        let mut stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stdout.read_to_string(&mut s);
            let _ = otx.send(s);
        });
        let (etx, err) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = etx.send(line);
            }
        });
        Self {
            child: KillOnDrop(child),
            out,
            err,
            name: format!("ferry-workload {}", args.first().unwrap_or(&"")),
        }
    }

    /// `ferry-workload client` in `ns`: `connections` connections to `to`, a request every
    /// 5 ms each, until the test stops it ([`Self::stop`]); returns once all are connected.
    pub fn client(ns: &Path, to: &str, connections: usize) -> Self {
        let n = connections.to_string();
        let w = Self::start(
            ns,
            &[
                "client",
                "--to",
                to,
                "--connections",
                &n,
                "--interval-ms",
                "5",
                "--duration-ms",
                "600000",
                "--json",
            ],
        );
        w.connected(Duration::from_secs(10));
        w
    }

    /// Waits for the `{"event":"connected",..}` line.
    pub fn connected(&self, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .err
                .recv_timeout(left)
                .unwrap_or_else(|e| panic!("{}: not connected within {timeout:?}: {e}", self.name));
            match serde_json::from_str::<Value>(&line) {
                Ok(v) if v["event"] == "connected" => return v,
                _ => eprintln!("{}: {line}", self.name),
            }
        }
    }

    /// Its PID.
    pub fn pid(&self) -> i32 {
        self.child.0.id() as i32
    }

    /// Still running?
    pub fn running(&mut self) -> bool {
        self.child.0.try_wait().unwrap().is_none()
    }

    /// Ends it now (SIGTERM: it stops sending, drains what is owed and reports), then
    /// [`Self::finish`]. A test whose workload must outlast what it measures starts it with a
    /// duration far beyond that and stops it here, rather than guessing how long things take.
    pub fn stop(self, timeout: Duration) -> (i32, Value) {
        // SAFETY: kill(2) on the PID of the child this value owns (not yet reaped).
        let r = unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        assert_eq!(r, 0, "SIGTERM to {}", self.name);
        self.finish(timeout)
    }

    /// Waits for the end: exit code and summary.
    pub fn finish(mut self, timeout: Duration) -> (i32, Value) {
        let name = self.name.clone();
        let status = wait_for(&format!("{name} to exit"), timeout, || {
            self.child.0.try_wait().unwrap()
        });
        let stdout = self.out.recv_timeout(Duration::from_secs(5)).unwrap();
        while let Ok(line) = self.err.try_recv() {
            eprintln!("{}: {line}", self.name);
        }
        let summary: Value = serde_json::from_str(stdout.trim())
            .unwrap_or_else(|e| panic!("{}: {status:?}, summary {stdout:?}: {e}", self.name));
        eprintln!("{} ({status:?}): {summary}", self.name);
        (status.code().unwrap_or(-1), summary)
    }
}

/// Waits (10 s at most) until something listens on TCP `port` in `ns`.
pub fn wait_listening(lab: &ferry_lab::Lab, ns: &Path, port: impl std::fmt::Display) {
    wait_for(
        &format!("something listens on :{port}"),
        Duration::from_secs(10),
        || {
            let out = lab
                .exec_in(ns, &["ss", "-Hltn", &format!("sport = :{port}")])
                .unwrap();
            (!String::from_utf8_lossy(&out.stdout).trim().is_empty()).then_some(())
        },
    );
}

/// A number of a `ferry-workload client` summary.
pub fn num(s: &Value, k: &str) -> u64 {
    s[k].as_u64()
        .unwrap_or_else(|| panic!("no number {k} in {s}"))
}

/// The `ferry-workload client` checks after a move: exit 0, nothing reset, lost or wrong, some
/// requests, every reply, `connections` alive. `what` names the client in the messages.
pub fn assert_client_clean(what: &str, code: i32, s: &Value, connections: u64) {
    assert_eq!(num(s, "resets"), 0, "{what}: {s}");
    assert_eq!(num(s, "mismatches"), 0, "{what}: {s}");
    assert_eq!(num(s, "unanswered"), 0, "{what}: {s}");
    assert_eq!(num(s, "replies"), num(s, "requests"), "{what}: {s}");
    assert!(num(s, "requests") > 0, "{what}: {s}");
    assert_eq!(num(s, "alive"), connections, "{what}: {s}");
    assert_eq!(code, 0, "{what}: {s}");
}
