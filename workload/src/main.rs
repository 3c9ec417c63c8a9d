//! `ferry-workload serve|claim|client|redis-client`: see the library's docs.

use std::{collections::HashMap, net::Ipv4Addr, path::PathBuf, process::ExitCode, time::Duration};

use ferry_workload::{
    client, memory, redis,
    server::{self, HandoffTarget, Options, Outcome, Server},
};
use serde_json::json;

const USAGE: &str = "\
usage:
  ferry-workload serve  --port PORT [--handoff-socket PATH --container IP] [--export-to HOST]
                        [--memory-mb N [--memory-mb-per-s R]]
  ferry-workload claim  --port PORT --handoff-socket PATH --container IP [--timeout-ms MS] [--export-to HOST]
  ferry-workload client --to IP:PORT [--connections N] [--interval-ms MS] [--duration-ms MS]
                        [--payload-bytes N] [--samples FILE] [--progress-ms MS] [--json]
  ferry-workload redis-client --to IP:PORT [--connections N] [--interval-ms MS] [--duration-ms MS]
                        [--samples FILE] [--json]

serve: answers `REQ <seq> <payload>` with `RES <seq> <n>` (n: the connection's request count).
  SIGUSR1 (to --export-to) or `export HOST` on stdin hands every connection and the counters
  to the node agent and exits 0; a refused export is printed and serving goes on.
  --memory-mb N: also N MiB of memory that a thread checks and rewrites without end (R MiB/s,
  default 64); a `MEM` line is answered `MEM <json>` after checking every page there and then
  (bad_now) with the walk's figures (passes, pages_checked, bad_pages, first_bad).
claim: claims what was exported for the container on this host and serves on.
client: checks every reply (in order, exactly once, counters continuous); prints a summary;
  exit status 2 if a connection was reset or a reply was wrong. --samples FILE: one CSV line
  per request, `unix_ms,conn,seq,latency_ms` (sent at, fractional Unix ms; latency empty if
  never answered). --progress-ms MS: every MS a JSON line on stderr, event `progress`
  with requests, replies, alive and oldest_outstanding_ms.
redis-client: talks to an unmodified redis-server (default 2 connections, one command every
  5 ms on each, no pipelining): INCR must count on by one, GET must return what SET stored,
  STRLEN must match what APPEND built. Never reconnects; prints a summary; exit status 2 if a
  connection was reset or closed, or a reply was an error or wrong. --samples as for client.";

/// `--flag value` pairs and bare `--switch`es.
struct Args {
    values: HashMap<String, String>,
    switches: Vec<String>,
}

impl Args {
    fn parse(args: &[String], switches: &[&str], flags: &[&str]) -> Result<Self, String> {
        let mut values = HashMap::new();
        let mut on = Vec::new();
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let name = a
                .strip_prefix("--")
                .ok_or(format!("unexpected argument {a:?}"))?;
            if switches.contains(&name) {
                on.push(name.to_owned());
            } else if flags.contains(&name) {
                let v = it.next().ok_or(format!("--{name} needs a value"))?;
                values.insert(name.to_owned(), v.clone());
            } else {
                return Err(format!("unknown option --{name}"));
            }
        }
        Ok(Self {
            values,
            switches: on,
        })
    }

    fn get<T: std::str::FromStr>(&self, name: &str) -> Result<Option<T>, String>
    where
        T::Err: std::fmt::Display,
    {
        self.values
            .get(name)
            .map(|v| v.parse().map_err(|e| format!("--{name} {v:?}: {e}")))
            .transpose()
    }

    fn need<T: std::str::FromStr>(&self, name: &str) -> Result<T, String>
    where
        T::Err: std::fmt::Display,
    {
        self.get(name)?.ok_or(format!("--{name} is required"))
    }
}

fn server_options(a: &Args) -> Result<Options, String> {
    let socket: Option<PathBuf> = a.get("handoff-socket")?;
    let container: Option<Ipv4Addr> = a.get("container")?;
    let handoff = match (socket, container) {
        (Some(socket), Some(container)) => Some(HandoffTarget { socket, container }),
        (None, None) => None,
        _ => return Err("--handoff-socket and --container go together".into()),
    };
    Ok(Options {
        port: a.need("port")?,
        handoff,
        export_to: a.get("export-to")?,
    })
}

fn serve(mut s: Server) -> ExitCode {
    match s.run() {
        Ok(Outcome::Exported | Outcome::Stopped) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry-workload: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let Some((cmd, rest)) = argv.split_first() else {
        eprintln!("{USAGE}");
        return ExitCode::FAILURE;
    };
    let server_flags = [
        "port",
        "handoff-socket",
        "container",
        "export-to",
        "timeout-ms",
    ];
    let result = match cmd.as_str() {
        "serve" => Args::parse(
            rest,
            &[],
            &[
                "port",
                "handoff-socket",
                "container",
                "export-to",
                "memory-mb",
                "memory-mb-per-s",
            ],
        )
        .and_then(|a| {
            let opts = server_options(&a)?;
            // The working set first: its report exists once the server listens.
            if let Some(mb) = a.get::<usize>("memory-mb")? {
                let rate = a.get("memory-mb-per-s")?.unwrap_or(64);
                memory::start(mb, rate).map_err(|e| format!("--memory-mb: {e}"))?;
            }
            Server::start(opts).map_err(|e| format!("listening: {e}"))
        })
        .map(serve),
        "claim" => Args::parse(rest, &[], &server_flags).and_then(|a| {
            let timeout_ms = a.get("timeout-ms")?.unwrap_or(5000);
            let opts = server_options(&a)?;
            match Server::claim(opts, timeout_ms) {
                Ok((s, line)) => {
                    server::emit(&line);
                    Ok(serve(s))
                }
                Err(e) => {
                    server::emit(
                        &json!({"event": "claim_failed", "ok": false, "error": e.to_json()}),
                    );
                    Ok(ExitCode::FAILURE)
                }
            }
        }),
        "client" => Args::parse(
            rest,
            &["json"],
            &[
                "to",
                "connections",
                "interval-ms",
                "duration-ms",
                "payload-bytes",
                "samples",
                "progress-ms",
            ],
        )
        .and_then(|a| {
            let opts = client::Options {
                to: a.need("to")?,
                connections: a.get("connections")?.unwrap_or(50),
                interval: Duration::from_millis(a.get("interval-ms")?.unwrap_or(5)),
                duration: a.get("duration-ms")?.map(Duration::from_millis),
                payload_bytes: a.get("payload-bytes")?.unwrap_or(16),
                samples: a.get("samples")?,
                progress: a.get("progress-ms")?.map(Duration::from_millis),
            };
            let summary = client::run(&opts).map_err(|e| e.to_string())?;
            if a.switches.iter().any(|s| s == "json") {
                println!("{summary}");
            } else {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&summary).unwrap_or_default()
                );
            }
            Ok(if client::passed(&summary) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            })
        }),
        "redis-client" => Args::parse(
            rest,
            &["json"],
            &["to", "connections", "interval-ms", "duration-ms", "samples"],
        )
        .and_then(|a| {
            let opts = redis::Options {
                to: a.need("to")?,
                connections: a.get("connections")?.unwrap_or(2),
                interval: Duration::from_millis(a.get("interval-ms")?.unwrap_or(5)),
                duration: a.get("duration-ms")?.map(Duration::from_millis),
                samples: a.get("samples")?,
            };
            let summary = redis::run(&opts).map_err(|e| e.to_string())?;
            if a.switches.iter().any(|s| s == "json") {
                println!("{summary}");
            } else {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&summary).unwrap_or_default()
                );
            }
            Ok(if redis::passed(&summary) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            })
        }),
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        other => Err(format!("unknown command {other:?}")),
    };
    result.unwrap_or_else(|e| {
        eprintln!("ferry-workload: {e}\n\n{USAGE}");
        ExitCode::FAILURE
    })
}
