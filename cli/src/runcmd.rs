//! `ferry migrate run` (the whole sequence, run by the gateway, with progress) and
//! `ferry action-script` (CRIU's `--action-script`: its hooks mapped to ferry's steps).

use std::{fmt::Write as _, time::Duration};

use ferry_api::{
    Client, MigrationStepKind,
    run::{PAGES_PHASE, PHASES, PhaseTiming, RunEvent, RunReport, RunRequest, RunState},
};

use crate::commands::{CliError, Outcome};

/// Runs a migration and follows it until it ends. Progress goes to stderr (unless `quiet`).
pub async fn run(c: &Client, req: RunRequest, quiet: bool) -> Result<Outcome, CliError> {
    let container = req.container;
    let asked = ferry_api::unix_ms();
    let mut report = match c.start_run(&req).await {
        Ok(r) => r,
        // No answer (the gateway went away while it prepared): the run may exist anyway
        // (the registry marks migrations the gateway runs, and a restarted gateway resumes
        // them). Find it and follow it instead of reporting a failure that may not be one.
        Err(e) if !matches!(e, ferry_api::ApiError::Http { .. }) => {
            match find_run(c, container, asked).await {
                Some(r) => {
                    if !quiet {
                        eprintln!(
                            "[ferry] the gateway did not answer ({e}); following run {}",
                            r.id
                        );
                    }
                    r
                }
                None => return Err(e.into()),
            }
        }
        Err(e) => return Err(e.into()),
    };
    let id = report.id.clone();
    if !quiet {
        eprintln!(
            "[ferry] migration {id}: {} {} → {} ({} mode, memory {})",
            report.container,
            report.from,
            report.to,
            req.lock.as_str(),
            req.memory.as_str()
        );
    }
    let mut shown = 0;
    let t0 = report.started_unix_ms;
    let mut failing_since: Option<std::time::Instant> = None;
    loop {
        for e in report.events.iter().skip(shown) {
            if !quiet {
                eprintln!("[ferry] {:>8.1} ms  {}", e.unix_ms - t0, e.message);
            }
        }
        shown = report.events.len();
        if report.state.finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        match c.run(&id).await {
            Ok(r) => {
                report = r;
                failing_since = None;
            }
            Err(e) => {
                // The gateway may be restarting: it resumes the run (its report is on disk).
                let since = *failing_since.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() > LOST_AFTER {
                    return Err(CliError::new(
                        "needs_attention",
                        format!(
                            "lost track of run {id}: {e}; see `ferry migrate status --container {container}`"
                        ),
                    ));
                }
            }
        }
    }
    let exit = match report.state {
        RunState::Released => 0,
        RunState::RolledBack => 3,
        _ => 4,
    };
    let text = phase_table(&report);
    let mut o = Outcome::new(&report, text)?;
    o.exit = exit;
    Ok(o)
}

/// The per-phase report for people.
pub fn phase_table(r: &RunReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "migration {}: {} {} → {} ({}): {}",
        r.id,
        r.container,
        r.from,
        r.to,
        r.lock.as_str(),
        r.state.as_str()
    );
    if let Some(e) = &r.error {
        let _ = writeln!(out, "  error: {e}");
    }
    let _ = writeln!(
        out,
        "  {:<9} {:>9} {:>10}  bytes",
        "phase", "at ms", "took ms"
    );
    // The lazy-memory run's last phase (the pages, after the release) only when it has one.
    let pages = r.phase(PAGES_PHASE).map(|_| PAGES_PHASE);
    for name in PHASES.into_iter().chain(pages) {
        match r.phase(name) {
            Some(PhaseTiming {
                start_unix_ms,
                ms,
                bytes,
                ..
            }) => {
                let b = bytes.map(|b| b.to_string()).unwrap_or_default();
                let _ = writeln!(
                    out,
                    "  {name:<9} {:>9.1} {ms:>10.1}  {b}",
                    start_unix_ms - r.started_unix_ms
                );
            }
            None => {
                let _ = writeln!(out, "  {name:<9} {:>9} {:>10}", "-", "-");
            }
        }
    }
    if let Some(s) = &r.criu {
        let _ = writeln!(
            out,
            "  CRIU: frozen {:.1} ms at the source (dump), restore {:.1} ms, {} pages",
            s.frozen_ms, s.restore_ms, s.pages_written
        );
    }
    let overlap = if r.image_bytes_during_dump > 0 {
        format!(" ({} while the dump ran)", r.image_bytes_during_dump)
    } else {
        String::new()
    };
    let _ = writeln!(
        out,
        "  container stopped {:.1} ms (seized at the source → running at the destination); \
         images {} bytes{overlap}; total {:.1} ms",
        r.stopped_ms, r.image_bytes, r.total_ms
    );
    out
}

/// What CRIU asked, and on which side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Dump,
    Restore,
}

/// The step a CRIU hook maps to, if any.
pub fn hook_step(action: &str, side: Side) -> Option<MigrationStepKind> {
    match (action, side) {
        // The dump froze the tasks and is about to dump sockets: hold from here.
        ("network-lock", Side::Dump) => Some(MigrationStepKind::Freeze),
        // At dump, network-unlock comes only when the dump failed (or --leave-running): the
        // tasks run on at the source.
        ("network-unlock", Side::Dump) => Some(MigrationStepKind::Abort),
        // At restore, network-unlock comes while the sockets are still in repair mode; the
        // held packets are released once the tasks run (post-resume).
        ("post-resume", Side::Restore) => Some(MigrationStepKind::Release),
        _ => None,
    }
}

/// Which side a hook runs on: `FERRY_CRIU_SIDE`, else the parent `criu` process's command.
fn side() -> Option<Side> {
    let from_env = std::env::var("FERRY_CRIU_SIDE").ok();
    let word = match from_env {
        Some(w) => w,
        None => {
            // SAFETY: getppid cannot fail.
            let ppid = unsafe { libc::getppid() };
            let cmdline = std::fs::read(format!("/proc/{ppid}/cmdline")).unwrap_or_default();
            let args: Vec<String> = cmdline
                .split(|b| *b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            side_word(&args).unwrap_or_default()
        }
    };
    match word.as_str() {
        "dump" => Some(Side::Dump),
        "restore" => Some(Side::Restore),
        _ => None,
    }
}

/// The CRIU command among a process's arguments: `criu dump …` (ferry's runs), or the title
/// CRIU gives itself under runc's RPC (`criu: dump --rpc -t PID`, one argument).
fn side_word(args: &[String]) -> Option<String> {
    args.iter()
        .flat_map(|a| a.split_whitespace())
        .find(|w| *w == "dump" || *w == "restore")
        .map(str::to_owned)
}

/// With this variable (a cgroup directory), CRIU's `pre-dump` hook freezes the cgroup.
pub const FREEZER_ENV: &str = "FERRY_FREEZER";
/// How long `pre-dump` waits for the cgroup to be frozen.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(2);

/// Freezes cgroup `dir` (v1: `freezer.state` = FROZEN; v2: `cgroup.freeze` = 1) and waits,
/// polling every 0.5 ms, until it is (v1 `freezer.state` reads FROZEN, v2 `cgroup.events`
/// says `frozen 1`). On a timeout it thaws the cgroup again and fails.
///
/// Why: CRIU freezes a container through the cgroup runc names (`freeze_cgroup` over RPC),
/// and checks whether the freezer is done right after writing FROZEN, then every 100 ms; the
/// first check comes too early, so every dump of a runc container stood 100 ms longer with
/// its tasks frozen (this machine's hybrid hierarchy, cgroup v1 freezer). A cgroup already
/// frozen when CRIU looks is taken as it is (and left frozen: the agent thaws it after the
/// dump, when the tasks stop on the SIGSTOP `leave-stopped` sent them).
pub fn freeze_cgroup(dir: &std::path::Path, timeout: Duration) -> Result<(), String> {
    let v2 = dir.join("cgroup.freeze").exists() && !dir.join("freezer.state").exists();
    let (file, frozen, thawed) = if v2 {
        ("cgroup.freeze", "1", "0")
    } else {
        ("freezer.state", "FROZEN", "THAWED")
    };
    let write = |v: &str| {
        std::fs::write(dir.join(file), v)
            .map_err(|e| format!("writing {v} to {}: {e}", dir.join(file).display()))
    };
    let done = || -> bool {
        if v2 {
            std::fs::read_to_string(dir.join("cgroup.events"))
                .is_ok_and(|t| t.lines().any(|l| l.trim() == "frozen 1"))
        } else {
            std::fs::read_to_string(dir.join("freezer.state")).is_ok_and(|t| t.trim() == "FROZEN")
        }
    };
    write(frozen)?;
    let deadline = std::time::Instant::now() + timeout;
    while !done() {
        if std::time::Instant::now() >= deadline {
            let _ = write(thawed);
            return Err(format!(
                "cgroup {} not frozen after {} ms (thawed again)",
                dir.display(),
                timeout.as_millis()
            ));
        }
        std::thread::sleep(Duration::from_micros(500));
    }
    Ok(())
}

/// `ferry action-script` (also `ferry` with no arguments and `CRTOOLS_SCRIPT_ACTION` set).
/// Prints nothing on stdout (CRIU's stdout carries its statistics).
///
/// The gateway and the container come from `FERRY_*` (ferry's own runs set them), else from
/// the hook configuration (under runc or Podman, see [`crate::hook`]).
pub async fn action_script(
    env_client: impl FnOnce() -> Result<Client, CliError>,
) -> Result<Option<Outcome>, CliError> {
    let Ok(action) = std::env::var("CRTOOLS_SCRIPT_ACTION") else {
        return Err(CliError::new(
            "usage",
            "action-script runs under CRIU (--action-script), which sets CRTOOLS_SCRIPT_ACTION",
        ));
    };
    // Under an orchestrator (no `FERRY_*`: the hook configuration says where the gateway is),
    // the container's cgroup is the one of CRIU's `CRTOOLS_INIT_PID`.
    let orchestrated = std::env::var_os("FERRY_MIGRATION").is_none()
        && std::env::var_os("FERRY_CONTAINER").is_none()
        && std::env::var_os(FREEZER_ENV).is_none()
        && crate::hook::config_path().ok().flatten().is_some();
    let init_freezer = || {
        std::env::var("CRTOOLS_INIT_PID")
            .ok()
            .and_then(|p| p.parse::<i32>().ok())
            .and_then(ferry_api::cgroup::freezer_of)
    };
    let freezer = match std::env::var_os(FREEZER_ENV) {
        Some(dir) => Some(std::path::PathBuf::from(dir)),
        None if orchestrated => init_freezer(),
        None => None,
    };
    if action == "pre-dump"
        && let Some(dir) = freezer
    {
        // The runtime's container is frozen through its cgroup now, so CRIU finds it frozen
        // (see `freeze_cgroup`). Who thaws it: the agent after the dump (its runs), runc as it
        // destroys a dumped container (an orchestrator's checkpoint), or this hook at
        // network-unlock when the dump failed (below).
        tokio::task::spawn_blocking(move || freeze_cgroup(&dir, FREEZE_TIMEOUT))
            .await
            .map_err(|e| CliError::new("internal", e.to_string()))?
            .map_err(|e| CliError::new("freeze_failed", e))?;
        return Ok(None);
    }
    if action == "post-restore"
        && ferry_api::faultpoint::take(ferry_api::faultpoint::FAIL_POST_RESTORE)
    {
        return Err(CliError::new(
            "injected",
            "CRIU's post-restore: fault injected (--fail restore)",
        ));
    }
    let Some(side) = side() else {
        return Ok(None);
    };
    let Some(step) = hook_step(&action, side) else {
        return Ok(None);
    };
    if step == MigrationStepKind::Abort
        && orchestrated
        && let Some(dir) = init_freezer()
    {
        // The dump failed and CRIU lets the tasks run again: a cgroup the pre-dump hook froze
        // stays frozen unless thawed here (no agent follows an orchestrator's checkpoint).
        if let Err(e) = ferry_api::cgroup::thaw(&dir) {
            eprintln!("ferry: thawing {}: {e}", dir.display());
        }
    }
    let from_env = std::env::var_os("FERRY_MIGRATION").is_some()
        || std::env::var_os("FERRY_CONTAINER").is_some();
    let configured = if from_env {
        None
    } else {
        crate::hook::config_path()?
    };
    let (client, hooked, init_pid) = match configured {
        Some(path) => {
            let cfg = crate::hook::HookConfig::load(&path)?;
            let host = cfg.pick(crate::hook::own_netns(), |p| {
                std::fs::metadata(p).ok().map(|m| {
                    (
                        std::os::unix::fs::MetadataExt::dev(&m),
                        std::os::unix::fs::MetadataExt::ino(&m),
                    )
                })
            })?;
            let pid: i32 = std::env::var("CRTOOLS_INIT_PID")
                .ok()
                .and_then(|p| p.parse().ok())
                .ok_or_else(|| {
                    CliError::new("usage", format!("CRIU's {action}: no CRTOOLS_INIT_PID"))
                })?;
            (host.client()?, Some(host.container_of(pid)?), Some(pid))
        }
        None => (env_client()?, None, None),
    };
    let c = &client;
    let id = match std::env::var("FERRY_MIGRATION") {
        Ok(id) => id,
        Err(_) => {
            let ip: std::net::Ipv4Addr = hooked
                .or_else(|| {
                    std::env::var("FERRY_CONTAINER")
                        .ok()
                        .and_then(|s| s.parse().ok())
                })
                .ok_or_else(|| {
                    CliError::new(
                        "usage",
                        format!(
                            "CRIU's {action}: set FERRY_MIGRATION (the migration id) or \
                             FERRY_CONTAINER (its container IP) for ferry's action script"
                        ),
                    )
                })?;
            let active = c.active_migration(ip).await?;
            if step == MigrationStepKind::Release
                && let Some(pid) = hooked.and(init_pid)
            {
                // Under an orchestrator CRIU restored the tree stopped (`leave-stopped` in
                // its configuration file): it runs once the migration is decided. A run of
                // ferry's own (`ferry migrate run --runtime podman`) is the agent's to release
                // and resume; otherwise the hook releases (if a migration is still active:
                // none is when an orchestrator restores a container on its source after an
                // abort) and resumes the tree itself.
                if active.as_ref().is_some_and(|m| m.run) {
                    return Ok(None);
                }
                if let Some(m) = &active {
                    c.migration_step(&m.id, step, None).await?;
                }
                let n = crate::hook::continue_tree(pid).map_err(|e| {
                    CliError::new(
                        "resume_failed",
                        format!("CRIU's {action}: continuing the tree of PID {pid}: {e}"),
                    )
                })?;
                eprintln!(
                    "ferry: {} container {ip}: {n} task(s) continued",
                    if active.is_some() {
                        "released"
                    } else {
                        "no migration is active for"
                    }
                );
                return Ok(None);
            }
            match active {
                Some(m) => m.id,
                None => {
                    return Err(CliError::new(
                        "unknown_migration",
                        format!(
                            "CRIU's {action}: container {ip} has no active migration (run \
                             `ferry migrate prepare` before the dump)"
                        ),
                    ));
                }
            }
        }
    };
    let start = ferry_api::unix_ms_f64();
    let t = std::time::Instant::now();
    c.migration_step(&id, step, None).await?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    // Tell a run (if ferry runs this migration) when the step happened.
    let phase = (step == MigrationStepKind::Freeze).then(|| PhaseTiming {
        name: "freeze".into(),
        start_unix_ms: start,
        ms,
        bytes: None,
    });
    let event = RunEvent {
        unix_ms: ferry_api::unix_ms_f64(),
        kind: if phase.is_some() { "phase" } else { "info" }.into(),
        message: format!("{step}: {ms:.1} ms (CRIU {action} on the {side:?} side)").to_lowercase(),
        phase,
        bytes: None,
        criu: None,
    };
    // Only to the gateway the hook uses: asking the others would lengthen the freeze.
    let _ = c.run_event_here(&id, &event).await;
    if step == MigrationStepKind::Freeze {
        // The tasks are frozen and CRIU dumps: a harness may land a fault here.
        ferry_api::faultpoint::pause("dump", &id).await;
    }
    Ok(None)
}

/// How long `migrate run` keeps polling a gateway that does not answer before it reports
/// `needs_attention`.
const LOST_AFTER: Duration = Duration::from_secs(30);

/// How long `migrate run` looks for a run whose start was not answered.
const FIND_RUN_FOR: Duration = Duration::from_secs(30);

/// The run the gateway started for `container` at or after `asked_ms` (a migration marked
/// `run` in the registry), once the gateway answers again; `None` if there is none.
async fn find_run(c: &Client, container: std::net::Ipv4Addr, asked_ms: u64) -> Option<RunReport> {
    let deadline = tokio::time::Instant::now() + FIND_RUN_FOR;
    while tokio::time::Instant::now() < deadline {
        if let Ok(all) = c.migrations().await {
            let m = all
                .into_iter()
                .filter(|m| m.container == container && m.run)
                .filter(|m| m.created_unix_ms + 1000 >= asked_ms)
                .max_by_key(|m| m.seq().unwrap_or(0))?;
            if let Ok(r) = c.run(&m.id).await {
                return Some(r);
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_side_is_read_from_criu_s_command_line_or_its_title() {
        let v = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            side_word(&v(&["criu", "dump", "--tree", "5"])).as_deref(),
            Some("dump")
        );
        assert_eq!(
            side_word(&v(&["criu: restore --rpc "])).as_deref(),
            Some("restore")
        );
        assert_eq!(
            side_word(&v(&["criu: dump --rpc -t 12066 "])).as_deref(),
            Some("dump")
        );
        assert_eq!(side_word(&v(&["criu", "swrk", "3"])), None);
        assert_eq!(side_word(&v(&["/usr/bin/dumpster"])), None);
    }

    #[test]
    fn hooks_map_to_steps() {
        assert_eq!(
            hook_step("network-lock", Side::Dump),
            Some(MigrationStepKind::Freeze)
        );
        assert_eq!(
            hook_step("network-unlock", Side::Dump),
            Some(MigrationStepKind::Abort)
        );
        assert_eq!(
            hook_step("post-resume", Side::Restore),
            Some(MigrationStepKind::Release)
        );
        for (a, s) in [
            ("network-unlock", Side::Restore),
            ("network-lock", Side::Restore),
            ("pre-dump", Side::Dump),
            ("post-dump", Side::Dump),
            ("pre-restore", Side::Restore),
            ("setup-namespaces", Side::Restore),
            ("post-resume", Side::Dump),
        ] {
            assert_eq!(hook_step(a, s), None, "{a} {s:?}");
        }
    }

    /// A cgroup stand-in (plain files): v1 reads FROZEN at once; v2 waits for
    /// `cgroup.events`; one that never freezes is thawed again and reported.
    #[test]
    fn freezing_a_cgroup_waits_until_it_is_frozen() {
        let dir = std::env::temp_dir().join(format!("ferry-freeze-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("freezer.state"), "THAWED\n").unwrap();
        freeze_cgroup(&dir, Duration::from_secs(1)).unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("freezer.state")).unwrap(),
            "FROZEN"
        );
        std::fs::remove_file(dir.join("freezer.state")).unwrap();
        std::fs::write(dir.join("cgroup.freeze"), "0").unwrap();
        std::fs::write(dir.join("cgroup.events"), "populated 1\nfrozen 0\n").unwrap();
        let e = freeze_cgroup(&dir, Duration::from_millis(20)).unwrap_err();
        assert!(e.contains("not frozen after 20 ms (thawed again)"), "{e}");
        assert_eq!(
            std::fs::read_to_string(dir.join("cgroup.freeze")).unwrap(),
            "0"
        );
        let events = dir.join("cgroup.events");
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(30));
            std::fs::write(events, "populated 1\nfrozen 1\n").unwrap();
        });
        freeze_cgroup(&dir, Duration::from_secs(5)).unwrap();
        t.join().unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("cgroup.freeze")).unwrap(),
            "1"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_phase_table_lists_every_phase() {
        let r = RunReport {
            id: "m3".into(),
            container: "10.244.1.10".parse().expect("ip"),
            from: "a1".into(),
            to: "b1".into(),
            lock: ferry_api::run::LockMode::Hold,
            memory: Default::default(),
            state: RunState::Released,
            started_unix_ms: 1000.0,
            total_ms: 150.0,
            stopped_ms: 90.0,
            phases: vec![PhaseTiming {
                name: "dump".into(),
                start_unix_ms: 1020.0,
                ms: 60.5,
                bytes: None,
            }],
            events: vec![],
            criu: None,
            image_bytes: 4096,
            image_bytes_during_dump: 0,
            error: None,
        };
        let t = phase_table(&r);
        for p in PHASES {
            assert!(t.contains(p), "{t}");
        }
        assert!(t.contains("  dump           20.0       60.5"), "{t}");
        assert!(t.contains("released"), "{t}");
    }
}
