//! `ferry-lab bench handoff`: what a client on the internet side sees while a stateful server
//! moves between clouds with the socket hand-off, with ferry's hold queues (`hold`) and with
//! the network lock users have today (`drop`: what arrives while frozen is dropped and peers
//! wait out TCP's retransmission back-off).
//!
//! Per mode, a lab of its own (default topology, agents; `drop` with
//! `HoldMode::Drop`), container 10.244.1.10 on `a1` published as 203.0.113.130, and
//! `ferry-workload serve` in it. For every `--freezes` value the server moves a1 → b1 and back
//! b1 → a1: `migrate prepare`, `migrate freeze`, the extra freeze (a sleep standing for a long
//! memory copy), the workload's export (`export HOST` on its stdin), `ferry-workload claim` in
//! the destination's prepared namespace, `migrate release`. Each move gets a fresh
//! `ferry-workload client` (N connections through the public address, a numbered request per
//! connection every interval) started before the prepare and stopped once the move is over:
//! the client only reports at its end, and a client per move makes its largest gap the move's.
//!
//! Progress on stderr; stdout carries the table, or one JSON object (`--json`). Labs are torn
//! down at the end of each mode (and on drop). A failed move is reported for its mode and
//! freeze; the command then exits non-zero.

use std::{
    fmt::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::ExitStatus,
    time::{Duration, Instant},
};

use clap::Args;
use ferry_config::{HoldLimits, HoldMode};
use serde::{Serialize, Serializer, ser::SerializeMap as _};
use serde_json::Value;

use crate::{
    BenchError, Progress, print_report,
    stats::median,
    workload::{Stream, Workload, WorkloadError},
};
use ferry_lab::{
    Lab, LabError, LabOptions,
    bins::find_binary,
    clock::{ms, unix_ms, wait_until},
    leftovers,
};

/// The moving container.
pub const CONTAINER: &str = "10.244.1.10";
/// Its public address (the client connects to it from the `inet` namespace).
pub const PUBLIC: &str = "203.0.113.130";
/// The server's port.
pub const PORT: u16 = 7000;
/// Host in cloud A the container starts on (and comes back to).
pub const HOST_A: &str = "a1";
/// Host in cloud B it moves to.
pub const HOST_B: &str = "b1";
/// Payload bytes per request (`ferry-workload client --payload-bytes`).
pub const PAYLOAD_BYTES: usize = 16;
/// The client's steady run before a move starts.
const WARM_UP: Duration = Duration::from_millis(500);
/// How long the client runs on after a release (plus the network-frozen window: in drop mode
/// the next retransmission can come that much later).
const SETTLE: Duration = Duration::from_millis(1000);
/// How long a previous move's copy of the container may linger on the destination.
const GONE_TIMEOUT: Duration = Duration::from_secs(15);

/// Why a mode's set-up or a move failed (reported in the mode's summary).
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error(transparent)]
    Workload(#[from] WorkloadError),
    #[error("ferry {args}: {source}")]
    Ferry { args: String, source: Box<LabError> },
    #[error("container on {host}: {source}")]
    Container {
        host: &'static str,
        source: Box<LabError>,
    },
    #[error("{what}: {source}")]
    Lab {
        what: &'static str,
        source: Box<LabError>,
    },
    #[error("{what}: {got}")]
    Unexpected { what: &'static str, got: Value },
    #[error("{host} still has {netns} after {timeout:?}", netns = .netns.display())]
    NotGone {
        host: String,
        netns: PathBuf,
        timeout: Duration,
    },
    #[error("metrics of {host}: {source}")]
    MetricsExec { host: String, source: Box<LabError> },
    #[error("metrics of {host}: curl {status}")]
    Metrics { host: String, status: ExitStatus },
    #[error("the source server exited non-zero after {exported}")]
    SourceFailed { exported: Value },
    #[error("client: {alive} of {connections} connections alive, {errors} errors/closed")]
    ClientLost {
        alive: u64,
        connections: u64,
        errors: u64,
    },
}

#[derive(Debug, Clone, Args)]
pub struct HandoffArgs {
    /// Print exactly one JSON object on stdout instead of the table (progress stays on stderr).
    #[arg(long)]
    pub json: bool,
    /// Extra freezes (ms slept between `migrate freeze` and the workload's export), one
    /// A→B and one B→A move each.
    #[arg(long, value_delimiter = ',', default_value = "0,100,500,1000",
          value_parser = clap::value_parser!(u64).range(0..=60_000))]
    pub freezes: Vec<u64>,
    /// Client connections through the public address.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub connections: u64,
    /// Milliseconds between two requests on a connection.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub interval_ms: u64,
}

/// The two modes, each in a lab of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Hold,
    Drop,
}

impl Mode {
    pub const ALL: [Mode; 2] = [Mode::Hold, Mode::Drop];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Hold => "hold",
            Mode::Drop => "drop",
        }
    }

    fn hold_limits(self) -> HoldLimits {
        match self {
            Mode::Hold => HoldLimits::default(),
            Mode::Drop => HoldLimits {
                mode: HoldMode::Drop,
                ..Default::default()
            },
        }
    }
}

/// One move, as measured.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct MoveSample {
    /// `a1->b1` or `b1->a1`.
    pub direction: String,
    /// The client's largest gap between two replies on one connection (worst connection).
    pub gap_ms: f64,
    /// The smallest of the per-connection largest gaps (every connection was silent at
    /// least that long).
    pub gap_ms_min_connection: f64,
    /// `migrate freeze` returned → `migrate release` returned (the bench's clock).
    pub frozen_ms: f64,
    /// `migrate freeze` called → `migrate release` called (both steps' latencies on the
    /// other side of the window).
    pub frozen_calls_ms: f64,
    /// The workload's clock: the source stopped serving → the destination serves.
    pub process_frozen_ms: f64,
    pub freeze_step_ms: f64,
    pub release_step_ms: f64,
    /// The workload's export (source) and claim (destination) as they report them.
    pub export_ms: f64,
    pub claim_ms: f64,
    /// When the worst gap began, relative to `migrate freeze` being called (negative:
    /// before), and when it ended relative to `migrate release` returning (ms resolution).
    pub gap_start_after_freeze_call_ms: f64,
    pub gap_end_after_release_ms: f64,
    pub held: u64,
    pub released: u64,
    pub dropped: u64,
    pub overflow: u64,
    pub stragglers: u64,
    /// Replies out of order, twice, or with a discontinuous counter (the client's
    /// `mismatches`).
    pub reordered: u64,
    pub resets: u64,
    pub client_retransmits: u64,
    pub unanswered: u64,
    pub bytes_lost: u64,
    pub requests: u64,
    pub replies: u64,
    /// Segments the destination's own TCP stack dropped (backlog, receive queue,
    /// out-of-order queue, zero window; `nstat` in the container's namespace): losses a
    /// re-injected burst could cause above ferry, which ferry's counters cannot see.
    pub server_stack_drops: u64,
    /// Frames the destination's hold device itself dropped (its queue full before the agent
    /// read them).
    pub hold_device_dropped: u64,
}

/// One mode and freeze: the two moves and their summary.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct FreezeSummary {
    /// Median (of 2: the mean) and maximum over the moves of the client's largest gap.
    pub gap_ms_p50: Option<f64>,
    pub gap_ms_max: Option<f64>,
    /// Median of the network-frozen windows (`migrate freeze` returned → `migrate release`
    /// returned).
    pub frozen_ms: Option<f64>,
    /// Median of the workload's own frozen windows (stopped serving → serving again).
    pub process_frozen_ms: Option<f64>,
    /// Median over the moves of gap − frozen.
    pub stall_overhead_ms: Option<f64>,
    pub stall_overhead_ms_max: Option<f64>,
    /// Median of `migrate freeze` called → `migrate release` called, and of gap − that.
    pub frozen_calls_ms: Option<f64>,
    pub stall_overhead_calls_ms: Option<f64>,
    pub freeze_step_ms: Option<f64>,
    pub release_step_ms: Option<f64>,
    /// Sums over the moves.
    pub held: u64,
    pub released: u64,
    pub dropped: u64,
    pub reordered: u64,
    pub resets: u64,
    pub client_retransmits: u64,
    pub bytes_lost: u64,
    pub moves: Vec<MoveSample>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl FreezeSummary {
    pub fn build(moves: Vec<MoveSample>, error: Option<String>) -> Self {
        let med = |f: fn(&MoveSample) -> f64| median(&moves.iter().map(f).collect::<Vec<_>>());
        let max = |f: fn(&MoveSample) -> f64| {
            moves
                .iter()
                .map(f)
                .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))))
        };
        let sum = |f: fn(&MoveSample) -> u64| moves.iter().map(f).sum();
        Self {
            gap_ms_p50: med(|m| m.gap_ms),
            gap_ms_max: max(|m| m.gap_ms),
            frozen_ms: med(|m| m.frozen_ms),
            process_frozen_ms: med(|m| m.process_frozen_ms),
            stall_overhead_ms: med(|m| m.gap_ms - m.frozen_ms),
            stall_overhead_ms_max: max(|m| m.gap_ms - m.frozen_ms),
            frozen_calls_ms: med(|m| m.frozen_calls_ms),
            stall_overhead_calls_ms: med(|m| m.gap_ms - m.frozen_calls_ms),
            freeze_step_ms: med(|m| m.freeze_step_ms),
            release_step_ms: med(|m| m.release_step_ms),
            held: sum(|m| m.held),
            released: sum(|m| m.released),
            dropped: sum(|m| m.dropped),
            reordered: sum(|m| m.reordered),
            resets: sum(|m| m.resets),
            client_retransmits: sum(|m| m.client_retransmits),
            bytes_lost: sum(|m| m.bytes_lost),
            error,
            moves,
        }
    }
}

/// Freeze value → summary, serialised as a JSON object in the order of `--freezes`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ByFreeze(pub Vec<(u64, FreezeSummary)>);

impl Serialize for ByFreeze {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            m.serialize_entry(&k.to_string(), v)?;
        }
        m.end()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Params {
    pub freezes_ms: Vec<u64>,
    pub connections: u64,
    pub interval_ms: u64,
    pub payload_bytes: usize,
    pub moves_per_freeze: u32,
    pub container: &'static str,
    pub public: &'static str,
    pub hosts: [&'static str; 2],
    pub client: &'static str,
    pub frozen_ms_clock: &'static str,
    pub gap: &'static str,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub hold: ByFreeze,
    pub drop: ByFreeze,
    pub params: Params,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.errors().is_empty()
    }

    /// (mode, freeze, error) of every failed freeze.
    pub fn errors(&self) -> Vec<(&'static str, u64, String)> {
        [("hold", &self.hold), ("drop", &self.drop)]
            .into_iter()
            .flat_map(|(mode, by)| {
                by.0.iter()
                    .filter_map(move |(f, s)| s.error.clone().map(|e| (mode, *f, e)))
            })
            .collect()
    }

    /// The table for people.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{:<5} {:>9} {:>10} {:>10} {:>10} {:>13} {:>7} {:>8} {:>7} {:>12}",
            "mode",
            "freeze ms",
            "gap p50",
            "gap max",
            "frozen",
            "stall overh.",
            "held",
            "dropped",
            "resets",
            "retransmits"
        );
        for (mode, by) in [("hold", &self.hold), ("drop", &self.drop)] {
            for (freeze, r) in &by.0 {
                let num = |x: Option<f64>| x.map_or("-".to_owned(), |v| format!("{v:.1}"));
                let _ = write!(
                    s,
                    "{:<5} {:>9} {:>10} {:>10} {:>10} {:>13} {:>7} {:>8} {:>7} {:>12}",
                    mode,
                    freeze,
                    num(r.gap_ms_p50),
                    num(r.gap_ms_max),
                    num(r.frozen_ms),
                    num(r.stall_overhead_ms),
                    r.held,
                    r.dropped,
                    r.resets,
                    r.client_retransmits,
                );
                match &r.error {
                    Some(e) => {
                        let _ = writeln!(s, "  FAILED: {e}");
                    }
                    None => s.push('\n'),
                }
            }
        }
        let _ = writeln!(
            s,
            "ms; {} connections, a request every {} ms; 2 moves per row ({HOST_A}->{HOST_B}, \
             {HOST_B}->{HOST_A}): gap p50 = median (mean of 2), counts summed; frozen = \
             `migrate freeze` returned -> `migrate release` returned; stall overh. = gap - frozen",
            self.params.connections, self.params.interval_ms
        );
        s
    }
}

/// TCP segments dropped by the stack in `ns` (absolute counters of a namespace made for this
/// move), summed over the kinds of drop a burst can cause.
fn stack_drops(lab: &Lab, ns: &Path) -> u64 {
    const KINDS: [&str; 5] = [
        "TcpExtTCPBacklogDrop",
        "TcpExtTCPRcvQDrop",
        "TcpExtTCPOFODrop",
        "TcpExtTCPZeroWindowDrop",
        "TcpExtTCPMinTTLDrop",
    ];
    let mut args = vec!["nstat", "-az"];
    args.extend(KINDS);
    let Ok(out) = lab.exec_in(ns, &args) else {
        return 0;
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let (k, v) = (w.next()?, w.next()?);
            KINDS.contains(&k).then(|| v.parse::<u64>().ok()).flatten()
        })
        .sum()
}

fn f(v: &Value, k: &str) -> f64 {
    v.get(k).and_then(Value::as_f64).unwrap_or(0.0)
}

fn u(v: &Value, k: &str) -> u64 {
    v.get(k).and_then(Value::as_u64).unwrap_or(0)
}

/// `ferry_hold_packets_total{event}` of a host's agent, by event.
fn hold_counters(lab: &Lab, host: &str) -> Result<Vec<(String, u64)>, HandoffError> {
    let out = lab
        .exec(host, &["curl", "-sf", "http://127.0.0.1:9464/metrics"])
        .map_err(|source| HandoffError::MetricsExec {
            host: host.to_owned(),
            source: Box::new(source),
        })?;
    if !out.status.success() {
        return Err(HandoffError::Metrics {
            host: host.to_owned(),
            status: out.status,
        });
    }
    Ok(parse_hold_counters(&String::from_utf8_lossy(&out.stdout)))
}

/// The `ferry_hold_packets_total{..,event="E"} N` lines of a Prometheus text.
pub fn parse_hold_counters(text: &str) -> Vec<(String, u64)> {
    text.lines()
        .filter(|l| l.starts_with("ferry_hold_packets_total{"))
        .filter_map(|l| {
            let event = l.split("event=\"").nth(1)?.split('"').next()?.to_owned();
            let n = l.rsplit(' ').next()?.parse().ok()?;
            Some((event, n))
        })
        .collect()
}

fn delta(before: &[(String, u64)], after: &[(String, u64)], event: &str) -> u64 {
    let get = |v: &[(String, u64)]| v.iter().find(|(e, _)| e == event).map_or(0, |(_, n)| *n);
    get(after).saturating_sub(get(before))
}

/// Bytes of the client's request `REQ <seq> <payload>\n` (seq as large as it got: an upper
/// bound for the requests lost).
pub fn request_bytes(max_seq: u64, payload: usize) -> u64 {
    (4 + max_seq.max(1).to_string().len() + 1 + payload + 1) as u64
}

/// What a mode's run needs.
struct Ctx<'a> {
    lab: &'a Lab,
    p: &'a Progress,
    bin: PathBuf,
    args: &'a HandoffArgs,
    mode: Mode,
}

impl Ctx<'_> {
    fn step(&self, args: &[&str]) -> Result<Value, HandoffError> {
        self.lab
            .ferry_json(args)
            .map_err(|source| HandoffError::Ferry {
                args: args.join(" "),
                source: Box::new(source),
            })
    }

    fn c(&self) -> Ipv4Addr {
        CONTAINER.parse().expect("valid address")
    }

    fn serve_args(&self, cmd: &'static str, host: &str) -> Vec<String> {
        let sock = self.lab.handoff_socket(host);
        let mut v = vec![
            cmd.to_owned(),
            "--port".into(),
            PORT.to_string(),
            "--handoff-socket".into(),
            sock.to_string_lossy().into_owned(),
            "--container".into(),
            CONTAINER.into(),
        ];
        if cmd == "claim" {
            v.extend(["--timeout-ms".into(), "5000".into()]);
        }
        v
    }

    fn start_server(&self, cmd: &'static str, host: &str) -> Result<Workload, WorkloadError> {
        let args = self.serve_args(cmd, host);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Workload::start(
            &self.bin,
            &self.lab.container_netns(host, self.c()),
            &args,
            true,
        )
    }

    /// Waits until `host` has no copy of the container (a previous migration's forwarding
    /// grace is over there).
    fn wait_gone(&self, host: &str) -> Result<(), HandoffError> {
        let netns = self.lab.container_netns(host, self.c());
        let gone = wait_until(GONE_TIMEOUT, Duration::from_millis(50), || {
            Ok::<_, HandoffError>((!netns.exists()).then_some(()))
        })?;
        gone.ok_or_else(|| HandoffError::NotGone {
            host: host.to_owned(),
            netns,
            timeout: GONE_TIMEOUT,
        })
    }

    /// One move of the server from `from` to `to`. `server` is the running server on `from`;
    /// on success it is replaced by the one on `to`.
    fn one_move(
        &self,
        server: &mut Workload,
        from: &str,
        to: &str,
        extra: Duration,
    ) -> Result<(MoveSample, Workload), HandoffError> {
        let p = self.p;
        let name = self.mode.name();
        self.wait_gone(to)?;
        let client_args = crate::workload::client_args(
            &format!("{PUBLIC}:{PORT}"),
            self.args.connections,
            self.args.interval_ms,
            &[],
        );
        let client_args: Vec<&str> = client_args.iter().map(String::as_str).collect();
        let client = Workload::start(&self.bin, &self.lab.netns("inet"), &client_args, false)?;
        let connected = client.next_json(Stream::Stderr, Duration::from_secs(15))?;
        if u(&connected, "connections") != self.args.connections {
            return Err(HandoffError::Unexpected {
                what: "client",
                got: connected,
            });
        }
        std::thread::sleep(WARM_UP);
        let before = hold_counters(self.lab, to)?;

        // Until the export succeeded the server is still on `from`: a failure aborts the
        // migration (the server serves on there).
        let mut before_export = || -> Result<_, HandoffError> {
            self.step(&["migrate", "prepare", "--container", CONTAINER, "--to", to])?;
            let t_freeze_call = Instant::now();
            let freeze_call_unix = unix_ms();
            self.step(&["migrate", "freeze", "--container", CONTAINER])?;
            let t_frozen = Instant::now();
            std::thread::sleep(extra);
            server.say(&format!("export {to}"))?;
            let exported = server.next_json(Stream::Stdout, Duration::from_secs(30))?;
            if exported["ok"] != true {
                return Err(HandoffError::Unexpected {
                    what: "export",
                    got: exported,
                });
            }
            Ok((t_freeze_call, freeze_call_unix, t_frozen, exported))
        };
        let (t_freeze_call, freeze_call_unix, t_frozen, exported) =
            before_export().inspect_err(|_| {
                if let Err(e) = self.step(&["migrate", "abort", "--container", CONTAINER]) {
                    p.say(format!("  {name}: abort: {e}"));
                }
            })?;
        if !server.wait(Duration::from_secs(5))? {
            return Err(HandoffError::SourceFailed { exported });
        }
        let dest = self.start_server("claim", to)?;
        let claimed = dest.next_json(Stream::Stdout, Duration::from_secs(15))?;
        if claimed["ok"] != true {
            return Err(HandoffError::Unexpected {
                what: "claim",
                got: claimed,
            });
        }
        let t_release_call = Instant::now();
        self.step(&["migrate", "release", "--container", CONTAINER])?;
        let t_released = Instant::now();
        let released_unix = unix_ms();
        let listening = dest.next_json(Stream::Stdout, Duration::from_secs(5))?;
        if listening["event"] != "listening" {
            return Err(HandoffError::Unexpected {
                what: "claimed server",
                got: listening,
            });
        }
        let frozen = t_released - t_frozen;
        std::thread::sleep(SETTLE + frozen);
        client.signal(libc::SIGTERM)?;
        let summary = client.next_json(Stream::Stdout, Duration::from_secs(20))?;
        let after = hold_counters(self.lab, to)?;
        let server_stack_drops = stack_drops(self.lab, &self.lab.container_netns(to, self.c()));

        let per_conn: Vec<f64> = summary["max_gap_ms_per_connection"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default();
        let gap = f(&summary, "max_gap_ms");
        let gap_end = f(&summary, "max_gap_end_unix_ms");
        let requests = u(&summary, "requests");
        let unanswered = u(&summary, "unanswered");
        let max_seq = requests / self.args.connections.max(1) + 1;
        let sample = MoveSample {
            direction: format!("{from}->{to}"),
            gap_ms: gap,
            gap_ms_min_connection: per_conn.iter().copied().fold(f64::INFINITY, f64::min),
            frozen_ms: ms(frozen),
            frozen_calls_ms: ms(t_release_call - t_freeze_call),
            process_frozen_ms: f(&claimed, "serving_unix_ms") - f(&exported, "stopped_unix_ms"),
            freeze_step_ms: ms(t_frozen - t_freeze_call),
            release_step_ms: ms(t_released - t_release_call),
            export_ms: f(&exported, "export_ms"),
            claim_ms: f(&claimed, "claim_ms"),
            gap_start_after_freeze_call_ms: gap_end - gap - freeze_call_unix,
            gap_end_after_release_ms: gap_end - released_unix,
            held: delta(&before, &after, "held"),
            released: delta(&before, &after, "released"),
            dropped: delta(&before, &after, "dropped"),
            overflow: delta(&before, &after, "overflow"),
            stragglers: delta(&before, &after, "straggler"),
            reordered: u(&summary, "mismatches"),
            resets: u(&summary, "resets"),
            client_retransmits: u(&summary, "retransmits"),
            unanswered,
            bytes_lost: unanswered * request_bytes(max_seq, PAYLOAD_BYTES),
            requests,
            replies: u(&summary, "replies"),
            server_stack_drops,
            hold_device_dropped: delta(&before, &after, "device_dropped"),
        };
        p.say(format!(
            "  {name}: {from}->{to}: gap {:.1} ms, frozen {:.1} ms (freeze step {:.1}, release \
             step {:.1}, process frozen {:.1}), held {}, dropped {}, resets {}, retransmits {}, \
             unanswered {}, mismatches {}, server stack drops {}, hold device drops {}",
            sample.gap_ms,
            sample.frozen_ms,
            sample.freeze_step_ms,
            sample.release_step_ms,
            sample.process_frozen_ms,
            sample.held,
            sample.dropped,
            sample.resets,
            sample.client_retransmits,
            sample.unanswered,
            sample.reordered,
            sample.server_stack_drops,
            sample.hold_device_dropped,
        ));
        let errors = u(&summary, "errors") + u(&summary, "closed_by_server");
        if errors > 0 || u(&summary, "alive") != self.args.connections {
            return Err(HandoffError::ClientLost {
                alive: u(&summary, "alive"),
                connections: self.args.connections,
                errors,
            });
        }
        Ok((sample, dest))
    }
}

/// One mode in a lab of its own: the summaries per freeze (in `--freezes` order).
fn run_mode(p: &Progress, args: &HandoffArgs, mode: Mode, bin: &Path, code: &mut i32) -> ByFreeze {
    let name = mode.name();
    let all_failed = |e: String| {
        ByFreeze(
            args.freezes
                .iter()
                .map(|f| (*f, FreezeSummary::build(Vec::new(), Some(e.clone()))))
                .collect(),
        )
    };
    p.say(format!("{name}: bringing up a lab with agents"));
    let lab = match Lab::up(LabOptions {
        start_agents: true,
        hold_limits: mode.hold_limits(),
        ..LabOptions::default()
    }) {
        Ok(lab) => lab,
        Err(e) => return all_failed(format!("lab up: {e}")),
    };
    let prefix = lab.prefix().to_owned();
    let ctx = Ctx {
        lab: &lab,
        p,
        bin: bin.to_owned(),
        args,
        mode,
    };
    let set_up = || -> Result<Workload, HandoffError> {
        lab.add_container(HOST_A, ctx.c())
            .map_err(|source| HandoffError::Container {
                host: HOST_A,
                source: Box::new(source),
            })?;
        ctx.step(&[
            "public",
            "add",
            "--public",
            PUBLIC,
            "--container",
            CONTAINER,
        ])?;
        lab.sync().map_err(|source| HandoffError::Lab {
            what: "sync",
            source: Box::new(source),
        })?;
        let server = ctx.start_server("serve", HOST_A)?;
        let ev = server.next_json(Stream::Stdout, Duration::from_secs(5))?;
        if ev["event"] != "listening" {
            return Err(HandoffError::Unexpected {
                what: "server",
                got: ev,
            });
        }
        Ok(server)
    };
    let mut out = Vec::new();
    match set_up() {
        Err(e) => {
            p.say(format!("{name}: FAILED: set-up: {e}"));
            out = all_failed(format!("set-up: {e}")).0;
        }
        Ok(mut server) => {
            p.say(format!(
                "{name}: lab {prefix} up; {CONTAINER} on {HOST_A} as {PUBLIC}, serving"
            ));
            let mut broken: Option<String> = None;
            for &freeze in &args.freezes {
                if let Some(why) = &broken {
                    out.push((
                        freeze,
                        FreezeSummary::build(Vec::new(), Some(format!("skipped: {why}"))),
                    ));
                    continue;
                }
                let mut moves = Vec::new();
                let mut error = None;
                for (from, to) in [(HOST_A, HOST_B), (HOST_B, HOST_A)] {
                    p.say(format!(
                        "{name}: extra freeze {freeze} ms: moving {from} -> {to}"
                    ));
                    match ctx.one_move(&mut server, from, to, Duration::from_millis(freeze)) {
                        Ok((sample, dest)) => {
                            moves.push(sample);
                            server = dest;
                        }
                        Err(e) => {
                            p.say(format!("{name}: {freeze} ms: {from}->{to}: FAILED: {e}"));
                            error = Some(format!("{from}->{to}: {e}"));
                            // A failed A->B leaves the server on A (aborted) and the next
                            // freeze starts there again; not so a failed B->A, or a server
                            // lost after its export.
                            if !server.alive() {
                                broken = Some(format!("the server was lost in {from}->{to}"));
                            } else if from != HOST_A {
                                broken = Some(format!("the server stayed on {from}"));
                            }
                            break;
                        }
                    }
                }
                let s = FreezeSummary::build(moves, error);
                if s.resets > 0 || s.bytes_lost > 0 || s.reordered > 0 {
                    *code = 1;
                }
                out.push((freeze, s));
            }
            drop(server);
        }
    }
    p.say(format!("{name}: tearing the lab down"));
    if let Err(e) = lab.down() {
        p.say(format!("{name}: teardown: {e}"));
        *code = 1;
    }
    let left = leftovers(&prefix);
    if !left.is_empty() {
        p.say(format!("{name}: left behind: {}", left.join(", ")));
        *code = 1;
    }
    ByFreeze(out)
}

pub fn run(args: &HandoffArgs) -> Result<i32, BenchError> {
    let p = Progress(Instant::now());
    let bin = find_binary("ferry-workload", "ferry-workload")?;
    find_binary("ferry", "ferry-cli")?;
    let mut code = 0;
    let mut hold = ByFreeze::default();
    let mut drop_ = ByFreeze::default();
    for mode in Mode::ALL {
        let r = run_mode(&p, args, mode, &bin, &mut code);
        match mode {
            Mode::Hold => hold = r,
            Mode::Drop => drop_ = r,
        }
    }
    let report = Report {
        hold,
        drop: drop_,
        params: Params {
            freezes_ms: args.freezes.clone(),
            connections: args.connections,
            interval_ms: args.interval_ms,
            payload_bytes: PAYLOAD_BYTES,
            moves_per_freeze: 2,
            container: CONTAINER,
            public: PUBLIC,
            hosts: [HOST_A, HOST_B],
            client: "a fresh ferry-workload client per move, in the inet namespace",
            frozen_ms_clock: "bench: `migrate freeze` returned -> `migrate release` returned; \
                              process_frozen_ms: the workload's clock (stopped -> serving)",
            gap: "client max_gap_ms: the longest interval between two replies on one \
                  connection (worst connection)",
        },
    };
    if !report.ok() {
        code = 1;
    }
    print_report(args.json, &report, || report.table())?;
    for (mode, freeze, error) in report.errors() {
        p.say(format!("{mode} {freeze} ms failed: {error}"));
    }
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_summaries() {
        let m = |gap, frozen, held| MoveSample {
            gap_ms: gap,
            frozen_ms: frozen,
            held,
            ..MoveSample::default()
        };
        let s = FreezeSummary::build(vec![m(110.0, 100.0, 5), m(106.0, 104.0, 7)], None);
        assert_eq!(s.gap_ms_p50, Some(108.0));
        assert_eq!(s.gap_ms_max, Some(110.0));
        assert_eq!(s.frozen_ms, Some(102.0));
        assert_eq!(s.stall_overhead_ms, Some(6.0));
        assert_eq!(s.stall_overhead_ms_max, Some(10.0));
        assert_eq!(s.held, 12);
    }

    #[test]
    fn hold_counters_are_parsed() {
        let text = "# TYPE ferry_hold_packets_total counter\n\
                    ferry_hold_packets_total{host=\"b1\",event=\"held\"} 42\n\
                    ferry_hold_packets_total{host=\"b1\",event=\"dropped\"} 0\n\
                    ferry_other{event=\"held\"} 9\n";
        let c = parse_hold_counters(text);
        assert_eq!(c, vec![("held".into(), 42), ("dropped".into(), 0)]);
        assert_eq!(delta(&[], &c, "held"), 42);
    }

    #[test]
    fn json_keeps_the_freeze_order() {
        let by = ByFreeze(vec![
            (0, FreezeSummary::default()),
            (1000, FreezeSummary::default()),
            (500, FreezeSummary::default()),
        ]);
        let text = serde_json::to_string(&by).unwrap();
        let i = |k: &str| text.find(k).unwrap();
        assert!(i("\"0\"") < i("\"1000\"") && i("\"1000\"") < i("\"500\""));
        assert_eq!(request_bytes(123, 16), 4 + 3 + 1 + 16 + 1);
    }
}
