//! Fault points: named places in a migration where a test harness can stop the process that
//! reached it, inject a fault (kill a process, cut a link, fill a disk) and let it go on, so a
//! fault lands in a chosen phase deterministically instead of after a guessed sleep.
//!
//! Off unless the environment sets `FERRY_FAULT_DIR`. A point `P` is armed while the file
//! `$FERRY_FAULT_DIR/P` exists. A process reaching an armed point writes
//! `$FERRY_FAULT_DIR/P.reached` (its PID and the migration, one line: `PID MIGRATION`), then
//! waits until `$FERRY_FAULT_DIR/P` is removed (at most [`MAX_PAUSE`]: a forgotten arm never
//! wedges a migration for good). The harness arms, waits for `.reached`, injects, disarms.
//!
//! | point | process | where |
//! |---|---|---|
//! | `prepare` | gateway | a run's prepare is persisted, before the agents are waited for |
//! | `dump` | `ferry` (CRIU's hook) | the freeze is applied, the tasks are frozen, CRIU dumps |
//! | `transfer` | source agent | the dump is on disk, before the images are streamed |
//! | `restore` | destination agent | the images arrived, before `criu restore` |
//! | `release` | destination agent | the tree is restored (stopped), before the release is asked for |
//! | `lazy-refused` | source agent | a lazy run: the destination refused the container, before the source ends its page server |
//! | `frozen` | gateway | the first half of a freeze (the destination holds) is persisted |
//! | `switched` | gateway | the second half of a freeze (everyone to the destination) is persisted |
//! | `released` | gateway | the release is persisted, before the agents are waited for |
//! | `aborted` | gateway | an abort is persisted, before the agents are waited for |
//!
//! One-shot faults ([`arm_once`], [`take`]): `fail-post-restore`, armed by the destination
//! agent for `--fail restore` under Podman (which passes CRIU no environment, so CRIU's own
//! `CRIU_FAULT` cannot reach it), taken by CRIU's hook at post-restore, which then fails: CRIU
//! kills the restored tasks and the restore fails, as `CRIU_FAULT=6` makes it.

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

/// The environment variable naming the directory of armed points.
pub const ENV: &str = "FERRY_FAULT_DIR";
/// Longest wait at one point.
pub const MAX_PAUSE: Duration = Duration::from_secs(600);
const POLL: Duration = Duration::from_millis(5);

/// The armed point's file, if the point is armed.
fn armed(point: &str) -> Option<PathBuf> {
    let dir = PathBuf::from(std::env::var_os(ENV)?);
    let f = dir.join(point);
    f.exists().then_some(f)
}

fn mark_reached(f: &std::path::Path, migration: &str) {
    let reached = f.with_extension("reached");
    // Best effort: a harness that cannot see it times out and says so.
    let _ = std::fs::write(&reached, format!("{} {migration}\n", std::process::id()));
}

/// Stops here while `point` is armed (see the module's doc). Returns at once when it is not.
pub async fn pause(point: &str, migration: &str) {
    let Some(f) = armed(point) else { return };
    mark_reached(&f, migration);
    let t = Instant::now();
    while f.exists() && t.elapsed() < MAX_PAUSE {
        tokio::time::sleep(POLL).await;
    }
}

/// [`pause`] for a synchronous caller (CRIU's action script).
pub fn pause_blocking(point: &str, migration: &str) {
    let Some(f) = armed(point) else { return };
    mark_reached(&f, migration);
    let t = Instant::now();
    while f.exists() && t.elapsed() < MAX_PAUSE {
        std::thread::sleep(POLL);
    }
}

/// The one-shot fault that makes CRIU's post-restore hook fail (see the module's doc).
pub const FAIL_POST_RESTORE: &str = "fail-post-restore";

/// Arms one-shot fault `name` (`$FERRY_FAULT_DIR/<name>`). Err if fault points are off.
pub fn arm_once(name: &str) -> std::io::Result<()> {
    let dir = std::env::var_os(ENV).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            format!("{ENV} is not set: fault points are off"),
        )
    })?;
    arm_once_in(std::path::Path::new(&dir), name)
}

/// Arms one-shot fault `name` in fault directory `dir` (a harness's side of [`arm_once`]).
pub fn arm_once_in(dir: &std::path::Path, name: &str) -> std::io::Result<()> {
    std::fs::write(dir.join(name), b"")
}

/// Takes one-shot fault `name` if it is armed (the file is removed): true when it was.
pub fn take(name: &str) -> bool {
    armed(name).is_some_and(|f| std::fs::remove_file(f).is_ok())
}
