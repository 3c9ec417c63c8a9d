//! CRIU's command lines, its statistics, and running it.

use std::{
    ffi::OsString,
    os::fd::{AsRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    process::Stdio,
    time::Instant,
};

use ferry_api::run::{CriuStats, LockMode};

/// The key that names the container's network namespace in the images: dumped as external
/// (`--external net[INODE]:KEY`), given back at restore (`--inherit-fd fd[N]:KEY`).
pub const NETNS_KEY: &str = "ferry-net";
/// The descriptor number the destination's namespace is passed to `criu restore` on.
pub const NETNS_FD: i32 = 10;
/// CRIU's own fault injection (`CRIU_FAULT`): pages dump fails (after the network lock),
/// and a restore fails after the tasks were restored (they are killed again).
pub const FAULT_DUMP_PAGES: &str = "3";
pub const FAULT_POST_RESTORE: &str = "6";

/// One `criu dump`.
#[derive(Debug, Clone)]
pub struct Dump<'a> {
    pub pid: i32,
    pub dir: &'a Path,
    /// Inode of the container's network namespace (`stat -L /proc/PID/ns/net`).
    pub netns_inode: u64,
    pub lock: LockMode,
    /// The `ferry` binary, as CRIU's action script (hold mode only).
    pub action_script: &'a Path,
}

impl Dump<'_> {
    /// The arguments after the binary. The tree is left *stopped*, not killed: the agent
    /// kills it once the destination restored it, or resumes it if anything after the dump
    /// fails, so a failed transfer or restore still rolls back.
    pub fn args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec![
            "dump".into(),
            "--tree".into(),
            self.pid.to_string().into(),
            "--images-dir".into(),
            self.dir.into(),
            "--log-file".into(),
            "dump.log".into(),
            "-v4".into(),
            "--display-stats".into(),
            "--tcp-established".into(),
            "--leave-stopped".into(),
            "--external".into(),
            format!("net[{}]:{NETNS_KEY}", self.netns_inode).into(),
        ];
        match self.lock {
            LockMode::Hold => {
                a.extend([
                    "--network-lock".into(),
                    "skip".into(),
                    "--action-script".into(),
                    self.action_script.into(),
                ]);
            }
            LockMode::CriuLock => a.extend(["--network-lock".into(), "nftables".into()]),
        }
        a
    }
}

/// One `criu restore`, with the destination's namespace on [`NETNS_FD`].
#[derive(Debug, Clone)]
pub struct Restore<'a> {
    pub dir: &'a Path,
    pub lock: LockMode,
    pub action_script: &'a Path,
}

impl Restore<'_> {
    pub fn pidfile(&self) -> PathBuf {
        self.dir.join("restored.pid")
    }

    /// The arguments after the binary. `--restore-sibling` makes the agent the parent of the
    /// restored tree; `--restore-detached` lets `criu` exit once the tasks exist;
    /// `--leave-stopped` keeps them stopped (fenced) until the registry's release reaches this
    /// host (the fencing's SIGCONT), so a copy that is not the owner never runs. `--root /`:
    /// the tree's private mount namespace (see `runtime::isolation`) is rebuilt on this
    /// host's root file system (the hosts share it).
    pub fn args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = vec![
            "restore".into(),
            "--images-dir".into(),
            self.dir.into(),
            "--root".into(),
            "/".into(),
            "--log-file".into(),
            "restore.log".into(),
            "-v4".into(),
            "--display-stats".into(),
            "--tcp-established".into(),
            "--restore-detached".into(),
            "--restore-sibling".into(),
            "--leave-stopped".into(),
            "--inherit-fd".into(),
            format!("fd[{NETNS_FD}]:{NETNS_KEY}").into(),
            "--pidfile".into(),
            self.pidfile().into(),
        ];
        match self.lock {
            LockMode::Hold => {
                a.extend([
                    "--network-lock".into(),
                    "skip".into(),
                    "--action-script".into(),
                    self.action_script.into(),
                ]);
            }
            LockMode::CriuLock => a.extend(["--network-lock".into(), "nftables".into()]),
        }
        a
    }
}

/// Parses `--display-stats` output (dump or restore) into `stats`, keeping what it has.
pub fn parse_stats(text: &str, stats: &mut CriuStats) {
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let mut words = value.split_whitespace();
        let (Some(n), unit) = (words.next(), words.next()) else {
            continue;
        };
        let as_ms = |n: &str| -> Option<f64> {
            let v: f64 = n.parse().ok()?;
            Some(match unit {
                Some("us") => v / 1e3,
                Some("ms") => v,
                Some("s") => v * 1e3,
                _ => return None,
            })
        };
        let count = |n: &str| n.parse::<u64>().ok();
        match key.trim() {
            "Freezing time" => stats.freezing_ms = as_ms(n).unwrap_or(stats.freezing_ms),
            "Frozen time" => stats.frozen_ms = as_ms(n).unwrap_or(stats.frozen_ms),
            "Memory dump time" => stats.memory_dump_ms = as_ms(n).unwrap_or(stats.memory_dump_ms),
            "Memory write time" => {
                stats.memory_write_ms = as_ms(n).unwrap_or(stats.memory_write_ms)
            }
            "Memory pages written" => stats.pages_written = count(n).unwrap_or(stats.pages_written),
            "Restore time" => stats.restore_ms = as_ms(n).unwrap_or(stats.restore_ms),
            "Pages restored" => stats.pages_restored = count(n).unwrap_or(stats.pages_restored),
            _ => {}
        }
    }
}

/// The error lines of a CRIU log (at most `max`, the last ones), for messages.
pub fn log_errors(log: &str, max: usize) -> Vec<String> {
    let errors: Vec<String> = log
        .lines()
        .filter(|l| l.contains("Error (") || l.contains("Error:"))
        // CRIU reports this on every run as root in a user namespace-less setup; noise.
        .filter(|l| !l.contains("RLIMIT_NOFILE"))
        .map(|l| {
            // "(00.048722) Error (criu/sockets.c:628): sockets: Can't get ..." → from "Error".
            l.find("Error").map_or(l, |i| &l[i..]).trim().to_owned()
        })
        .collect();
    let skip = errors.len().saturating_sub(max);
    errors.into_iter().skip(skip).collect()
}

/// The time (ms since CRIU started, from its log's `(SS.uuuuuu)` stamps) of the first line
/// containing `needle`.
pub fn log_offset_ms(log: &str, needle: &str) -> Option<f64> {
    let line = log.lines().find(|l| l.contains(needle))?;
    let stamp = line.strip_prefix('(')?.split(')').next()?;
    let secs: f64 = stamp.trim().parse().ok()?;
    Some(secs * 1e3)
}

/// CRIU's log lines the agent times the container's stop by.
pub const LOG_SEIZED: &str = "Seized task";
pub const LOG_RESUMED: &str = "Tasks resumed";

/// How a `criu` run went.
#[derive(Debug)]
pub struct Outcome {
    pub ok: bool,
    pub status: String,
    pub stdout: String,
    pub ms: f64,
    /// Error lines from the log when it failed.
    pub errors: Vec<String>,
}

impl Outcome {
    /// `<what> failed (<status>): <errors>`, `what` naming the command (`criu dump`, `runc
    /// checkpoint`, …).
    pub fn failure(&self, what: &str) -> String {
        let why = if self.errors.is_empty() {
            String::new()
        } else {
            format!(": {}", self.errors.join(" | "))
        };
        format!("{what} failed ({}){why}", self.status)
    }
}

/// Runs `criu` (or the runtime that runs it: runc) with `args` and `env`; `netns` (criu
/// restore) is handed over on [`NETNS_FD`]. `log` is the log file CRIU writes (read back
/// for errors on failure). `capture`: stdout and stderr are read (else /dev/null, for a
/// process whose stdio a detached container would inherit).
pub async fn run(
    binary: &Path,
    args: &[OsString],
    env: &[(String, String)],
    netns: Option<&OwnedFd>,
    log: &Path,
    capture: bool,
) -> std::io::Result<Outcome> {
    let mut cmd = tokio::process::Command::new(binary);
    let out = || {
        if capture {
            Stdio::piped()
        } else {
            Stdio::null()
        }
    };
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(out())
        .stderr(out())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    if let Some(fd) = netns {
        let raw = fd.as_raw_fd();
        // SAFETY: between fork and exec only async-signal-safe calls (dup2, fcntl).
        unsafe {
            cmd.pre_exec(move || {
                if raw == NETNS_FD {
                    let flags = libc::fcntl(raw, libc::F_GETFD);
                    if flags < 0 || libc::fcntl(raw, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                } else if libc::dup2(raw, NETNS_FD) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let t = Instant::now();
    let out = cmd.output().await?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    let ok = out.status.success();
    let errors = if ok {
        Vec::new()
    } else {
        let mut e = log_errors(&std::fs::read_to_string(log).unwrap_or_default(), 4);
        if e.is_empty() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            e = stderr
                .lines()
                .rev()
                .take(3)
                .map(str::to_owned)
                .collect::<Vec<_>>();
            e.reverse();
        }
        e
    };
    Ok(Outcome {
        ok,
        status: out.status.to_string(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        ms,
        errors,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(a: Vec<OsString>) -> Vec<String> {
        a.into_iter()
            .map(|s| s.into_string().expect("utf-8"))
            .collect()
    }

    #[test]
    fn dump_hold_uses_the_action_script_and_skips_criu_lock() {
        let d = Dump {
            pid: 42,
            dir: Path::new("/run/x"),
            netns_inode: 4026532000,
            lock: LockMode::Hold,
            action_script: Path::new("/usr/local/bin/ferry"),
        };
        let a = strings(d.args()).join(" ");
        assert!(a.starts_with("dump --tree 42 --images-dir /run/x"), "{a}");
        assert!(a.contains("--tcp-established --leave-stopped"), "{a}");
        assert!(a.contains("--external net[4026532000]:ferry-net"), "{a}");
        assert!(
            a.ends_with("--network-lock skip --action-script /usr/local/bin/ferry"),
            "{a}"
        );
    }

    #[test]
    fn criu_lock_mode_uses_nftables_and_no_script() {
        let d = Dump {
            pid: 1,
            dir: Path::new("/d"),
            netns_inode: 1,
            lock: LockMode::CriuLock,
            action_script: Path::new("/f"),
        };
        let a = strings(d.args()).join(" ");
        assert!(a.ends_with("--network-lock nftables"), "{a}");
        assert!(!a.contains("--action-script"), "{a}");
        let r = Restore {
            dir: Path::new("/d"),
            lock: LockMode::CriuLock,
            action_script: Path::new("/f"),
        };
        let a = strings(r.args()).join(" ");
        assert!(a.contains("--inherit-fd fd[10]:ferry-net"), "{a}");
        assert!(a.starts_with("restore --images-dir /d --root / "), "{a}");
        assert!(a.contains("--pidfile /d/restored.pid"), "{a}");
        assert!(a.ends_with("--network-lock nftables"), "{a}");
    }

    #[test]
    fn stats_are_parsed_in_milliseconds() {
        let dump = "Displaying dump stats:\nFreezing time: 901 us\nFrozen time: 30588 us\n\
                    Memory dump time: 745 us\nMemory write time: 187 us\nIRMAP resolve time: 0 us\n\
                    Memory pages scanned: 76 (0x4c)\nMemory pages written: 57 (0x39)\n";
        let restore = "Displaying restore stats:\nPages compared: 0 (0x0)\n\
                       Pages restored: 57 (0x39)\nRestore time: 4089 us\nForking time: 2 us\n";
        let mut s = CriuStats::default();
        parse_stats(dump, &mut s);
        parse_stats(restore, &mut s);
        assert_eq!(s.freezing_ms, 0.901);
        assert_eq!(s.frozen_ms, 30.588);
        assert_eq!(s.memory_dump_ms, 0.745);
        assert_eq!(s.memory_write_ms, 0.187);
        assert_eq!(s.pages_written, 57);
        assert_eq!(s.pages_restored, 57);
        assert_eq!(s.restore_ms, 4.089);
        // Garbage changes nothing.
        let before = s.clone();
        parse_stats("Frozen time: lots\nnonsense\n:\nFrozen time:\n", &mut s);
        assert_eq!(s, before);
    }

    #[test]
    fn log_offsets() {
        let log = "(00.000000) Version: 4.2.1\n(00.038015) Seized task 15343, state 1\n\
                   (01.500000) Restore finished successfully. Tasks resumed.\n";
        assert_eq!(log_offset_ms(log, LOG_SEIZED), Some(38.015));
        assert_eq!(log_offset_ms(log, LOG_RESUMED), Some(1500.0));
        assert_eq!(log_offset_ms(log, "nothing"), None);
    }

    #[test]
    fn log_errors_keeps_the_last_ones() {
        let log = "(00.01) ok\n(00.02) Error (a.c:1): first\n(00.03) Error (b.c:2): second\n\
                   (00.04) Error (c.c:3): third\n";
        assert_eq!(
            log_errors(log, 2),
            vec!["Error (b.c:2): second", "Error (c.c:3): third"]
        );
        assert!(log_errors("(0) fine\n", 3).is_empty());
    }
}
