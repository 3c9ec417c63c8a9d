//! cgroup freezer helpers shared by the agent (runc and Podman containers) and CRIU's hook
//! (`ferry action-script`, which freezes a container's cgroup at pre-dump): which cgroup
//! freezes a process, whether it is frozen, thawing it.

use std::{
    io,
    path::{Path, PathBuf},
};

/// The freezer cgroup directory of a process, from its /proc/PID/cgroup and the mount table:
/// the v1 freezer hierarchy's if there is one (this machine's hybrid mode; what runc and
/// CRIU use there), else the unified hierarchy's. Pure.
pub fn freezer_dir(proc_cgroup: &str, mountinfo: &str) -> Option<PathBuf> {
    let mounts: Vec<(String, String, String)> = mountinfo
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let sep = f.iter().position(|x| *x == "-")?;
            Some((
                f.get(4)?.to_string(),
                f.get(sep + 1)?.to_string(),
                f.get(sep + 3)?.to_string(),
            ))
        })
        .collect();
    let lines: Vec<(&str, &str)> = proc_cgroup
        .lines()
        .filter_map(|l| {
            let mut p = l.splitn(3, ':');
            let (_, ctrl, path) = (p.next()?, p.next()?, p.next()?);
            Some((ctrl, path))
        })
        .collect();
    let join = |mount: &str, path: &str| Path::new(mount).join(path.trim_start_matches('/'));
    if let Some((_, path)) = lines
        .iter()
        .find(|(c, _)| c.split(',').any(|c| c == "freezer"))
        && let Some((mp, _, _)) = mounts
            .iter()
            .find(|(_, t, opts)| t == "cgroup" && opts.split(',').any(|o| o == "freezer"))
    {
        return Some(join(mp, path));
    }
    let (_, path) = lines.iter().find(|(c, _)| c.is_empty())?;
    let (mp, _, _) = mounts.iter().find(|(_, t, _)| t == "cgroup2")?;
    Some(join(mp, path))
}

/// The freezer cgroup of a live process.
pub fn freezer_of(pid: i32) -> Option<PathBuf> {
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let mi = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    freezer_dir(&cg, &mi).filter(|d| d.is_dir())
}

/// Is `pid`'s freezer cgroup frozen (or freezing)?
pub fn frozen(pid: i32) -> bool {
    let Some(dir) = freezer_of(pid) else {
        return false;
    };
    match std::fs::read_to_string(dir.join("freezer.state")) {
        Ok(state) => state.trim() != "THAWED",
        Err(_) => std::fs::read_to_string(dir.join("cgroup.freeze")).is_ok_and(|v| v.trim() == "1"),
    }
}

/// Thaws a freezer cgroup if it is frozen.
pub fn thaw(dir: &Path) -> io::Result<()> {
    if dir.join("freezer.state").exists() {
        if std::fs::read_to_string(dir.join("freezer.state"))?.trim() != "THAWED" {
            std::fs::write(dir.join("freezer.state"), "THAWED")?;
        }
    } else if dir.join("cgroup.freeze").exists() {
        std::fs::write(dir.join("cgroup.freeze"), "0")?;
    }
    Ok(())
}
