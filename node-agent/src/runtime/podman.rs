//! Podman as one of the agent's runtimes: containers Podman runs on a ferry-cni network,
//! moved by `ferry migrate run --runtime podman` with Podman's own checkpoint and restore
//! (`podman container checkpoint --export`, `podman container restore --import`), so Podman
//! keeps knowing its containers on both hosts.
//!
//! **Which container.** Podman starts the container, not the agent: the agent learns of it at
//! the first checkpoint ([`PodmanDriver::find`]: the Podman container whose ferry network
//! has the address) and adopts its tree then.
//!
//! **Exactly one copy.** As with runc, the dumped tree stays *stopped* at the source with its
//! sockets in repair mode until the registry decides, and the restored one stays stopped at
//! the destination until the release: `podman container checkpoint --leave-running` (Podman
//! then neither kills nor forgets the tree) with `leave-stopped` in the container's CRIU
//! configuration file (the annotation `org.criu.config`, fixed when the container was
//! created: checked before anything is frozen, [`check_criu_config`]). The agent resumes or
//! kills the stopped copy as for its other runtimes; killing goes through `podman rm -f`, so
//! Podman forgets that copy (its CNI DEL detaches the address locally only: the registry
//! entry is the other host's by then).
//!
//! **The network.** Podman makes its own network namespace at restore; its CNI ADD (the
//! address and MAC of the checkpoint, `CNI_ARGS IP=…;MAC=…`) attaches it to the prepared,
//! held endpoint. CRIU's action script (the hook, `ferry action-script` with
//! `/etc/ferry/hook.toml`: Podman passes CRIU no environment) freezes at network-lock; at
//! post-resume it leaves a run of ferry's own to the agent (release, then SIGCONT).

use std::{
    ffi::OsString,
    io,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use ferry_api::run::{CriuStats, FenceSide, LockMode, RuntimeKind, StartRequest};
use serde_json::Value;
use tracing::warn;

use super::{
    Entry, RuntimeError,
    driver::{Checkpoint, Driver, Invocation, Restore, RuncRecord, Started, Stats},
};
use crate::criu::resume;

/// The checkpoint archive's name in the images directory (the only file streamed).
pub const ARCHIVE: &str = "podman-checkpoint.tar";

/// How the agent runs the host's Podman (`[runtime.podman]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub binary: PathBuf,
    /// Global options, before the command.
    pub args: Vec<String>,
    pub containers_conf: Option<PathBuf>,
}

/// A Podman container as the agent needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub id: String,
    pub pid: i32,
    pub running: bool,
    pub argv: Vec<String>,
    pub image: Option<String>,
    /// Podman's per-container directory (`StaticDir`: CRIU's logs are written there).
    pub static_dir: PathBuf,
    /// The file `org.criu.config` names, if any.
    pub criu_config: Option<PathBuf>,
}

/// The container in `podman container inspect`'s JSON array whose network has `ip`. Pure.
pub fn find_in_inspect(inspect: &Value, ip: Ipv4Addr) -> Option<Found> {
    let want = ip.to_string();
    inspect.as_array()?.iter().find_map(|c| {
        let nets = c["NetworkSettings"]["Networks"].as_object()?;
        nets.values()
            .any(|n| n["IPAddress"].as_str() == Some(want.as_str()))
            .then(|| found(c))?
    })
}

fn found(c: &Value) -> Option<Found> {
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut argv: Vec<String> = c["Path"].as_str().map(str::to_owned).into_iter().collect();
    argv.extend(strings(&c["Args"]));
    Some(Found {
        id: c["Id"].as_str()?.to_owned(),
        pid: c["State"]["Pid"].as_i64().unwrap_or(0) as i32,
        running: c["State"]["Running"].as_bool().unwrap_or(false),
        argv,
        image: c["ImageName"].as_str().map(str::to_owned),
        static_dir: PathBuf::from(c["StaticDir"].as_str().unwrap_or_default()),
        criu_config: c["Config"]["Annotations"]["org.criu.config"]
            .as_str()
            .map(PathBuf::from),
    })
}

/// What a container's CRIU configuration file must say for ferry to move it, as problems
/// (empty: fine). Pure.
pub fn check_criu_config(text: &str, lock: LockMode) -> Vec<String> {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let has = |w: &str| {
        lines
            .iter()
            .any(|l| *l == w || l.starts_with(&format!("{w} ")))
    };
    let mut problems = Vec::new();
    if !has("leave-stopped") {
        problems.push(
            "no `leave-stopped` (a dumped tree must stay stopped until the migration is \
             decided, and a restored one until it is released)"
                .to_owned(),
        );
    }
    match lock {
        LockMode::Hold => {
            if !lines.contains(&"network-lock skip") {
                problems.push("no `network-lock skip` (ferry's hold is the lock)".to_owned());
            }
            if !has("action-script") {
                problems.push("no `action-script <ferry's hook>` (it freezes)".to_owned());
            }
        }
        LockMode::CriuLock => problems.push(
            "mode criu-lock: a Podman container's network lock is its CRIU configuration \
             file's; ferry moves Podman containers in hold mode"
                .to_owned(),
        ),
    }
    problems
}

/// The container ID `podman container checkpoint|restore --print-stats` reports, and CRIU's
/// figures from the same JSON. Pure.
pub fn parse_print_stats(stdout: &str, stats: &mut CriuStats) -> Option<String> {
    // Podman may print warnings before the JSON object.
    let json = &stdout[stdout.find('{')?..];
    let v: Value = serde_json::from_str(json).ok()?;
    let c = v["container_statistics"].as_array()?.first()?;
    let s = &c["criu_statistics"];
    let ms = |k: &str| s[k].as_f64().map(|us| us / 1e3);
    if let Some(x) = ms("freezing_time") {
        stats.freezing_ms = x;
    }
    if let Some(x) = ms("frozen_time") {
        stats.frozen_ms = x;
    }
    if let Some(x) = ms("memdump_time") {
        stats.memory_dump_ms = x;
    }
    if let Some(x) = ms("memwrite_time") {
        stats.memory_write_ms = x;
    }
    if let Some(x) = s["pages_written"].as_u64() {
        stats.pages_written = x;
    }
    if let Some(x) = ms("restore_time") {
        stats.restore_ms = x;
    }
    if let Some(x) = s["pages_restored"].as_u64() {
        stats.pages_restored = x;
    }
    c["Id"].as_str().map(str::to_owned)
}

/// The container ID a Podman checkpoint archive restores (its `config.dump`, Podman's
/// container configuration, field `id`). Runs `tar`.
pub fn archive_container_id(archive: &Path) -> io::Result<String> {
    let out = Command::new("tar")
        .arg("-xOf")
        .arg(archive)
        .arg("config.dump")
        .stdin(Stdio::null())
        .output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "tar -xOf {} config.dump: {}",
            archive.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    let v: Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| io::Error::other(format!("config.dump: {e}")))?;
    match v["id"].as_str() {
        Some(id) if !id.is_empty() && id.bytes().all(|b| b.is_ascii_hexdigit()) => {
            Ok(id.to_owned())
        }
        _ => Err(io::Error::other("config.dump names no container id")),
    }
}

/// `[global] container checkpoint …` (after the binary). Pure.
pub fn checkpoint_args(global: &[String], id: &str, dir: &Path) -> Vec<OsString> {
    let mut a: Vec<OsString> = global.iter().map(OsString::from).collect();
    for s in [
        "container",
        "checkpoint",
        // Podman neither kills nor forgets the tree; CRIU leaves it stopped (the
        // configuration file's `leave-stopped`).
        "--leave-running",
        "--tcp-established",
        // The images travel once, as they are (the rootfs is the image's, read-only).
        "--compress",
        "none",
        "--print-stats",
        "--export",
    ] {
        a.push(s.into());
    }
    a.push(dir.join(ARCHIVE).into());
    a.push(id.into());
    a
}

/// `[global] container restore --import …` (after the binary). Pure.
pub fn restore_args(global: &[String], dir: &Path) -> Vec<OsString> {
    let mut a: Vec<OsString> = global.iter().map(OsString::from).collect();
    for s in [
        "container",
        "restore",
        "--tcp-established",
        "--print-stats",
        "--import",
    ] {
        a.push(s.into());
    }
    a.push(dir.join(ARCHIVE).into());
    a
}

fn not_started_here() -> RuntimeError {
    RuntimeError::BadRequest(
        "Podman starts its containers itself: `podman run --network <a ferry-cni network> \
         --annotation org.criu.config=<file>`; the agent moves them"
            .into(),
    )
}

/// The Podman runtime.
#[derive(Debug, Clone)]
pub struct PodmanDriver {
    pub host: String,
    pub settings: Settings,
}

impl PodmanDriver {
    /// The environment every Podman command gets: its configuration file, if one is set.
    fn env(&self) -> Vec<(String, String)> {
        self.settings
            .containers_conf
            .iter()
            .map(|p| ("CONTAINERS_CONF".to_owned(), p.display().to_string()))
            .collect()
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(&self.settings.binary);
        c.envs(self.env())
            .args(&self.settings.args)
            .args(args)
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .stdout(Stdio::piped());
        c
    }

    fn output(&self, args: &[&str]) -> io::Result<String> {
        let out = self.command(args).output()?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "podman {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn inspect(&self, ids: &[&str]) -> io::Result<Value> {
        let mut args = vec!["container", "inspect"];
        args.extend_from_slice(ids);
        let out = self.output(&args)?;
        serde_json::from_str(&out)
            .map_err(|e| io::Error::other(format!("podman container inspect: {e}")))
    }

    /// The Podman container on this host whose ferry network has address `ip`.
    pub fn find(&self, ip: Ipv4Addr) -> io::Result<Option<Found>> {
        let ids = self.output(&["ps", "-a", "-q", "--no-trunc"])?;
        let ids: Vec<&str> = ids.split_whitespace().collect();
        if ids.is_empty() {
            return Ok(None);
        }
        Ok(find_in_inspect(&self.inspect(&ids)?, ip))
    }

    fn record<'a>(&self, entry: &'a Entry) -> io::Result<&'a RuncRecord> {
        entry.runc.as_ref().ok_or_else(|| {
            io::Error::other(format!(
                "container {} has no Podman record",
                entry.proc.container
            ))
        })
    }

    /// `podman rm -f` (Podman kills what is left of the tree: a stopped copy's sockets are
    /// in repair mode and send nothing), forgetting the copy.
    fn rm(&self, id: &str) -> io::Result<()> {
        match self.output(&["rm", "-f", "-t", "0", id]) {
            Ok(_) => Ok(()),
            Err(e) if e.to_string().contains("no such container") => Ok(()),
            Err(e) => Err(e),
        }
    }
}

impl Driver for PodmanDriver {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Podman
    }

    fn validate(
        &self,
        _ip: Ipv4Addr,
        _req: &StartRequest,
    ) -> Result<Vec<(String, String)>, RuntimeError> {
        Err(not_started_here())
    }

    fn start(
        &self,
        _ip: Ipv4Addr,
        _netns: &Path,
        _req: &StartRequest,
        _env: Vec<(String, String)>,
    ) -> Result<Started, RuntimeError> {
        Err(not_started_here())
    }

    fn checkpoint(&self, c: &Checkpoint<'_>) -> Result<Invocation, RuntimeError> {
        let bad = |m: String| RuntimeError::BadRequest(m);
        let rec = self.record(c.entry).map_err(|e| bad(e.to_string()))?;
        let ip = c.entry.proc.container;
        // Podman's view now: the same container, running, and a CRIU configuration that
        // keeps exactly one copy.
        let found = self
            .inspect(&[&rec.id])
            .map_err(|e| bad(e.to_string()))
            .and_then(|v| {
                v.as_array()
                    .and_then(|a| a.first())
                    .and_then(found)
                    .ok_or_else(|| bad(format!("Podman has no container {}", rec.id)))
            })?;
        if !found.running || found.pid != c.entry.proc.pid {
            return Err(bad(format!(
                "Podman container {} of {ip} is not running as PID {}",
                rec.id, c.entry.proc.pid
            )));
        }
        let Some(conf) = &found.criu_config else {
            return Err(bad(format!(
                "Podman container {} of {ip} has no annotation org.criu.config: create it with \
                 --annotation org.criu.config=<a file with action-script, network-lock skip, \
                 leave-stopped>",
                rec.id
            )));
        };
        let text = std::fs::read_to_string(conf)
            .map_err(|e| bad(format!("CRIU configuration {}: {e}", conf.display())))?;
        let problems = check_criu_config(&text, c.lock);
        if !problems.is_empty() {
            return Err(bad(format!(
                "Podman container {} of {ip}: CRIU configuration {}: {}",
                rec.id,
                conf.display(),
                problems.join("; ")
            )));
        }
        Ok(Invocation {
            name: "podman container checkpoint",
            program: self.settings.binary.clone(),
            args: checkpoint_args(&self.settings.args, &rec.id, c.dir),
            netns_fd: false,
            // Podman runs CRIU with its work directory in the container's own.
            log: rec.bundle.join("dump.log"),
            stats: Stats::PodmanJson,
            pidfile: None,
            capture: true,
            env: self.env(),
        })
    }

    fn checkpointed(&self, entry: &Entry, dumped: bool) -> Result<(), String> {
        // ferry's pre-dump hook froze the container's cgroup (CRIU's own v1 freezer poll costs
        // 100 ms) and CRIU left it frozen: thawed now, after a dump (the tasks then stop on
        // `leave-stopped`'s SIGSTOP) and after a failed one (they run on).
        if let Some(dir) = ferry_api::cgroup::freezer_of(entry.proc.pid) {
            ferry_api::cgroup::thaw(&dir).map_err(|e| format!("thawing {}: {e}", dir.display()))?;
        }
        if dumped {
            resume::wait_stopped(entry.proc.pid, std::time::Duration::from_secs(1)).map_err(
                |e| {
                    format!(
                        "the tree runs on after the dump ({e}): the container's CRIU \
                         configuration (leave-stopped) was not applied"
                    )
                },
            )?;
        }
        Ok(())
    }

    fn restore(&self, r: &Restore<'_>) -> Result<(Invocation, Option<RuncRecord>), RuntimeError> {
        if r.lock != LockMode::Hold {
            return Err(RuntimeError::BadRequest(
                "Podman containers move in hold mode only".into(),
            ));
        }
        // The container keeps its ID: known before the restore, so what a failed one leaves
        // in Podman goes ([`Driver::restore_failed`]).
        let id = archive_container_id(&r.dir.join(ARCHIVE))
            .map_err(|e| RuntimeError::BadRequest(format!("the checkpoint archive: {e}")))?;
        Ok((
            Invocation {
                name: "podman container restore",
                program: self.settings.binary.clone(),
                args: restore_args(&self.settings.args, r.dir),
                netns_fd: false,
                // Podman writes CRIU's restore.log into the new container's directory, unknown
                // until it exists: errors come from Podman's stderr.
                log: r.dir.join("restore.log"),
                stats: Stats::PodmanJson,
                pidfile: None,
                capture: true,
                env: self.env(),
            },
            Some(RuncRecord {
                id,
                bundle: PathBuf::new(),
            }),
        ))
    }

    fn restored(
        &self,
        inv: &Invocation,
        stdout: &str,
        _record: Option<RuncRecord>,
    ) -> Result<(i32, Option<RuncRecord>), String> {
        let mut stats = CriuStats::default();
        let id = parse_print_stats(stdout, &mut stats)
            .ok_or_else(|| format!("{} printed no container ID: {stdout:?}", inv.name))?;
        let v = self.inspect(&[&id]).map_err(|e| e.to_string())?;
        let f = v
            .as_array()
            .and_then(|a| a.first())
            .and_then(found)
            .ok_or_else(|| format!("Podman has no container {id} after its restore"))?;
        if f.pid <= 1 {
            // Not running: nothing to adopt; what Podman made goes.
            let _ = self.rm(&id);
            return Err(format!(
                "Podman container {id} does not run after its restore"
            ));
        }
        Ok((
            f.pid,
            Some(RuncRecord {
                id,
                bundle: f.static_dir,
            }),
        ))
    }

    fn restore_failed(&self, record: Option<&RuncRecord>) {
        if let Some(rec) = record
            && let Err(e) = self.rm(&rec.id)
        {
            warn!(id = %rec.id, error = %e, "removing the Podman container of a failed restore");
        }
    }

    fn resume(&self, entry: &Entry, side: FenceSide) -> io::Result<(usize, usize)> {
        resume::resume_container(entry.proc.pid, side)
    }

    fn kill(&self, entry: &Entry) -> io::Result<()> {
        // The tree at once (a stopped copy: nothing is sent), then Podman's record of it, on a
        // thread of its own: `podman rm` takes ~300 ms, and the kill is part of applying the
        // release on the source, which the release waits for.
        let id = self.record(entry)?.id.clone();
        match super::signal_pid(entry.proc.pid, entry.start_time, libc::SIGKILL) {
            Err(e) if e.raw_os_error() != Some(libc::ESRCH) => return Err(e),
            _ => {}
        }
        let (this, ip) = (self.clone(), entry.proc.container);
        std::thread::Builder::new()
            .name("podman-rm".into())
            .spawn(move || {
                if let Err(e) = this.rm(&id) {
                    warn!(container = %ip, %id, error = %e, "removing the killed copy from Podman");
                }
            })
            .map(drop)
    }

    fn remove(&self, _entry: &Entry) {
        // Podman's container: Podman's to remove (or restart) when its tree ends.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_container_is_found_by_its_address() {
        let v: Value = serde_json::json!([
            {"Id": "aaa", "State": {"Pid": 10, "Running": true}, "Path": "/bin/x", "Args": [],
             "StaticDir": "/s/aaa", "NetworkSettings": {"Networks": {"ferry": {"IPAddress": "10.244.0.2"}}},
             "Config": {"Annotations": {}}},
            {"Id": "bbb", "State": {"Pid": 11, "Running": true}, "Path": "/usr/bin/redis-server",
             "Args": ["--port", "6379"], "ImageName": "localhost/ferry-redis:latest",
             "StaticDir": "/s/bbb",
             "NetworkSettings": {"Networks": {"ferry": {"IPAddress": "10.244.0.1"}}},
             "Config": {"Annotations": {"org.criu.config": "/etc/ferry/criu.conf"}}}
        ]);
        let f = find_in_inspect(&v, "10.244.0.1".parse().unwrap()).unwrap();
        assert_eq!(f.id, "bbb");
        assert_eq!(f.pid, 11);
        assert_eq!(f.argv, ["/usr/bin/redis-server", "--port", "6379"]);
        assert_eq!(f.static_dir, Path::new("/s/bbb"));
        assert_eq!(
            f.criu_config.as_deref(),
            Some(Path::new("/etc/ferry/criu.conf"))
        );
        assert!(find_in_inspect(&v, "10.244.0.9".parse().unwrap()).is_none());
        assert!(find_in_inspect(&serde_json::json!({}), "10.244.0.1".parse().unwrap()).is_none());
    }

    #[test]
    fn the_criu_configuration_must_keep_one_copy_and_hand_the_lock_to_ferry() {
        let good =
            "# c\naction-script /usr/local/bin/ferry-hook\nnetwork-lock skip\nleave-stopped\n";
        assert!(check_criu_config(good, LockMode::Hold).is_empty());
        let p = check_criu_config("action-script /x\nnetwork-lock skip\n", LockMode::Hold);
        assert!(p.len() == 1 && p[0].contains("leave-stopped"), "{p:?}");
        let p = check_criu_config("leave-stopped\n", LockMode::Hold);
        assert_eq!(p.len(), 2, "{p:?}");
        let p = check_criu_config(good, LockMode::CriuLock);
        assert!(p[0].contains("hold mode"), "{p:?}");
        // A commented line does not count.
        let p = check_criu_config(
            "#leave-stopped\naction-script /x\nnetwork-lock skip",
            LockMode::Hold,
        );
        assert_eq!(p.len(), 1, "{p:?}");
    }

    #[test]
    fn print_stats_give_the_id_and_criu_s_figures() {
        let out = r#"time="x" level=warning msg="y"
{
    "podman_checkpoint_duration": 359806,
    "container_statistics": [
        {
            "Id": "8b8a",
            "runtime_checkpoint_duration": 290760,
            "criu_statistics": {"freezing_time": 101439, "frozen_time": 105149,
                "memdump_time": 4791, "memwrite_time": 2606, "pages_scanned": 798,
                "pages_written": 680}
        }
    ]
}"#;
        let mut s = CriuStats::default();
        assert_eq!(parse_print_stats(out, &mut s).as_deref(), Some("8b8a"));
        assert_eq!(s.pages_written, 680);
        assert!((s.frozen_ms - 105.149).abs() < 1e-9, "{s:?}");
        let mut s = CriuStats::default();
        assert_eq!(
            parse_print_stats(
                r#"{"podman_restore_duration": 1, "container_statistics": null}"#,
                &mut s
            ),
            None
        );
        assert_eq!(parse_print_stats("", &mut s), None);
    }

    #[test]
    fn command_lines() {
        let g = vec!["--root".to_string(), "/r".into()];
        let s = |a: Vec<OsString>| {
            a.into_iter()
                .map(|s| s.into_string().unwrap())
                .collect::<Vec<_>>()
                .join(" ")
        };
        assert_eq!(
            s(checkpoint_args(&g, "abc", Path::new("/w"))),
            "--root /r container checkpoint --leave-running --tcp-established --compress none \
             --print-stats --export /w/podman-checkpoint.tar abc"
        );
        assert_eq!(
            s(restore_args(&g, Path::new("/w"))),
            "--root /r container restore --tcp-established --print-stats --import \
             /w/podman-checkpoint.tar"
        );
    }
}
