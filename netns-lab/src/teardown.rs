//! Tearing labs down (by prefix, from any process), finding what a lab left behind, listing
//! labs, their status, and the reaper that cleans up after a dead owner.

use std::{
    collections::{BTreeSet, HashSet},
    ffi::CString,
    os::unix::ffi::OsStrExt,
    path::{Path, PathBuf},
};

use ferry_overlay::netns::{NETNS_RUN_DIR, netns_path, run_in};
use serde::Serialize;

use crate::{
    LabError, TeardownError,
    lab::{container_netns_prefix, netns_name},
    procs::{self, ProcRecord, TERM_GRACE, Target},
    state::{self, BPFFS_ROOT, LabState, STATE_ROOT},
    topology::Host,
};

/// Namespace names in /run/netns that belong to lab `prefix`.
fn existing_namespaces(prefix: &str) -> Vec<String> {
    let want = format!("{prefix}-");
    let Ok(dir) = std::fs::read_dir(NETNS_RUN_DIR) else {
        return Vec::new();
    };
    let mut v: Vec<String> = dir
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with(&want))
        .collect();
    v.sort();
    v
}

/// Entries of /sys/fs/bpf/ferry whose name starts with the prefix.
fn bpffs_entries(prefix: &str) -> Vec<PathBuf> {
    let Ok(dir) = std::fs::read_dir(BPFFS_ROOT) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = dir
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .map(|e| e.path())
        .collect();
    v.sort();
    v
}

/// Tears lab `prefix` down completely, whatever state it is in: stops the processes it
/// started (PID + start time checked), then anything else still inside its namespaces,
/// deletes the namespaces, its bpffs pins and its state directory. Keeps going on errors and
/// reports all of them.
pub fn teardown(prefix: &str) -> Result<(), TeardownError> {
    let mut errors = Vec::new();
    if !state::is_prefix(prefix) {
        return Err(TeardownError {
            prefix: prefix.to_owned(),
            errors: vec![LabError::BadPrefix(prefix.to_owned()).to_string()],
        });
    }
    let _span = tracing::info_span!("teardown", %prefix).entered();
    let t0 = std::time::Instant::now();
    let st = match LabState::load(prefix) {
        Ok(s) => s,
        Err(e) => {
            errors.push(e.to_string());
            None
        }
    };

    // 1. The processes the lab started.
    if let Some(st) = &st {
        let targets: Vec<Target> = st
            .processes
            .iter()
            .map(|p| Target {
                pid: p.pid,
                start_time: Some(p.start_time),
            })
            .collect();
        errors.extend(procs::stop_all(&targets, TERM_GRACE));
    }

    // 1b. Podman's containers on the lab's hosts (Podman unmounts their storage and removes
    //     the namespaces it made; what it leaves is found below).
    if let Some(st) = &st {
        let hosts: Vec<String> = st.topology.hosts.iter().map(|h| h.name.clone()).collect();
        errors.extend(crate::podman::teardown_podman(prefix, &hosts));
    }

    // 2. Whatever else still runs inside the lab's namespaces: containers' processes first
    //    (SIGKILL at once: a stopped agent leaves its containers running, and a container's
    //    PID 1 ignores SIGTERM without a handler), then anything else in the hosts' and other
    //    nodes' namespaces (SIGTERM, grace, SIGKILL). By PID through a pidfd, found by their
    //    namespace (a scan of /proc/*/ns/net), whoever started them.
    let mut names: BTreeSet<String> = existing_namespaces(prefix).into_iter().collect();
    if let Some(st) = &st {
        names.extend(st.namespaces.iter().cloned());
    }
    let container_prefixes: Vec<String> = match &st {
        Some(st) => st
            .topology
            .hosts
            .iter()
            .map(|h| container_netns_prefix(prefix, &h.name))
            .collect(),
        None => Vec::new(),
    };
    // Without a state file the hosts are unknown: their agents' `-c-` naming tells.
    let is_container = |n: &str| {
        if container_prefixes.is_empty() {
            n.contains("-c-")
        } else {
            container_prefixes.iter().any(|p| n.starts_with(p.as_str()))
        }
    };
    let (containers, nodes): (Vec<&String>, Vec<&String>) =
        names.iter().partition(|n| is_container(n));
    for (group, grace) in [(containers, std::time::Duration::ZERO), (nodes, TERM_GRACE)] {
        let ids: HashSet<(u64, u64)> = group
            .iter()
            .filter_map(|n| procs::ns_id(&netns_path(n)).ok())
            .collect();
        let stragglers: Vec<Target> = procs::pids_in_netns(&ids)
            .into_iter()
            .map(|pid| Target {
                pid,
                start_time: procs::start_time(pid).ok(),
            })
            .collect();
        if stragglers.is_empty() {
            continue;
        }
        tracing::info!(
            pids = ?stragglers.iter().map(|t| (t.pid, procs::comm(t.pid))).collect::<Vec<_>>(),
            containers = grace.is_zero(),
            "stopping processes still inside the lab's namespaces"
        );
        if grace.is_zero() {
            errors.extend(procs::kill_all(&stragglers));
        } else {
            errors.extend(procs::stop_all(&stragglers, grace));
        }
    }

    // 2b. The cgroups of the lab's runc containers (`ferry/<container namespace>` under the
    //     agents' own cgroups: runc leaves them if its `delete` never ran, e.g. an agent
    //     killed with its containers), now that their processes are gone.
    errors.extend(remove_runc_cgroups(prefix));

    // 3. The namespaces (what `ip netns del` does: detach the bind mount, remove the file).
    for name in &names {
        let path = netns_path(name);
        if !path.exists() {
            continue;
        }
        if let Err(e) = delete_netns(&path) {
            errors.push(format!("deleting namespace {name}: {e}"));
        }
    }

    // 4. bpffs pins of the lab's agents.
    for entry in bpffs_entries(prefix) {
        let r = if entry.is_dir() {
            std::fs::remove_dir_all(&entry)
        } else {
            std::fs::remove_file(&entry)
        };
        if let Err(e) = r {
            errors.push(format!("removing {}: {e}", entry.display()));
        }
    }

    // 5. The state directory, after whatever was mounted under it (a harness's small tmpfs
    // standing for a full disk, say).
    let dir = state::state_dir(prefix);
    for m in mounts_under(&dir) {
        if let Err(e) = detach_mount(&m) {
            errors.push(format!("unmounting {}: {e}", m.display()));
        }
    }
    keep_logs(prefix, &dir);
    if let Err(e) = std::fs::remove_dir_all(&dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        errors.push(format!("removing {}: {e}", dir.display()));
    }
    // 6. The images in RAM (`state::SHM_ROOT`), after whatever was mounted under them.
    let shm = state::shm_dir(prefix);
    for m in mounts_under(&shm) {
        if let Err(e) = detach_mount(&m) {
            errors.push(format!("unmounting {}: {e}", m.display()));
        }
    }
    if let Err(e) = std::fs::remove_dir_all(&shm)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        errors.push(format!("removing {}: {e}", shm.display()));
    }

    tracing::info!(
        elapsed_ms = t0.elapsed().as_millis() as u64,
        errors = errors.len(),
        "lab torn down"
    );
    if errors.is_empty() {
        Ok(())
    } else {
        Err(TeardownError {
            prefix: prefix.to_owned(),
            errors,
        })
    }
}

/// Mount points at or below `dir` (from /proc/self/mountinfo), deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = ferry_overlay::sys::mountinfo()
        .unwrap_or_default()
        .into_iter()
        .map(|m| m.mount_point)
        .filter(|m| m.starts_with(dir))
        .collect();
    v.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    v.dedup();
    v
}

/// `umount -l PATH`.
pub fn detach_mount(path: &Path) -> std::io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: umount2(2) with a valid NUL-terminated path that outlives the call.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn delete_netns(path: &Path) -> std::io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: umount2(2) with a valid NUL-terminated path that outlives the call.
    let rc = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        // EINVAL: not a mount point (a half-created namespace file): still remove the file.
        if e.raw_os_error() != Some(libc::EINVAL) {
            return Err(e);
        }
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Everything of lab `prefix` still present on the machine: namespaces, links in the root
/// namespace whose name contains the prefix, bpffs entries, processes inside its namespaces or
/// whose command line names the lab, its state directory. Empty after a clean teardown.
pub fn leftovers(prefix: &str) -> Vec<String> {
    let mut found = Vec::new();
    let namespaces = existing_namespaces(prefix);
    for n in &namespaces {
        found.push(format!("namespace {n}"));
    }
    match root_links() {
        Ok(links) => found.extend(
            links
                .into_iter()
                .filter(|l| l.contains(prefix))
                .map(|l| format!("link {l} in the root namespace")),
        ),
        Err(e) => found.push(format!("(cannot list root namespace links: {e})")),
    }
    for e in bpffs_entries(prefix) {
        found.push(format!("bpffs {}", e.display()));
    }
    let ids: HashSet<(u64, u64)> = namespaces
        .iter()
        .filter_map(|n| procs::ns_id(&netns_path(n)).ok())
        .collect();
    let mut pids: BTreeSet<i32> = procs::pids_in_netns(&ids).into_iter().collect();
    for (pid, _) in procs::pids_with_cmdline(prefix) {
        pids.insert(pid);
    }
    for pid in pids {
        // A process that exited between the scan and now is not a leftover.
        if let Ok((state, _)) = procs::stat(pid)
            && state != 'Z'
        {
            found.push(format!("process {pid} ({})", procs::comm(pid)));
        }
    }
    for c in runc_cgroups(prefix) {
        found.push(format!("cgroup {}", c.display()));
    }
    let dir = state::state_dir(prefix);
    for m in mounts_under(&dir) {
        found.push(format!("mount {}", m.display()));
    }
    if dir.exists() {
        found.push(format!("state directory {}", dir.display()));
    }
    let shm = state::shm_dir(prefix);
    for m in mounts_under(&shm) {
        found.push(format!("mount {}", m.display()));
    }
    if shm.exists() {
        found.push(format!("images directory {}", shm.display()));
    }
    found
}

/// The directories the lab's runc containers may have cgroups in: `<mount>/<our own cgroup in
/// that hierarchy>/ferry` for every cgroup mount (runc makes a container's relative
/// `cgroupsPath` relative to its own cgroups, which are the agent's, which are the lab's), and
/// `<mount>/ferry`. Pure: from /proc/self/cgroup and /proc/self/mountinfo.
pub fn runc_cgroup_parents(proc_cgroup: &str, mountinfo: &str) -> Vec<PathBuf> {
    let own: Vec<(Vec<&str>, &str)> = proc_cgroup
        .lines()
        .filter_map(|l| {
            let mut p = l.splitn(3, ':');
            let (_, ctrl, path) = (p.next()?, p.next()?, p.next()?);
            Some((ctrl.split(',').filter(|c| !c.is_empty()).collect(), path))
        })
        .collect();
    let mut v = Vec::new();
    for line in mountinfo.lines() {
        let f: Vec<&str> = line.split(' ').collect();
        let Some(sep) = f.iter().position(|x| *x == "-") else {
            continue;
        };
        let (Some(mp), Some(fs), Some(opts)) = (f.get(4), f.get(sep + 1), f.get(sep + 3)) else {
            continue;
        };
        let path = match *fs {
            "cgroup2" => own.iter().find(|(c, _)| c.is_empty()).map(|(_, p)| *p),
            "cgroup" => {
                let opts: Vec<&str> = opts.split(',').collect();
                own.iter()
                    .find(|(c, _)| !c.is_empty() && c.iter().all(|c| opts.contains(c)))
                    .map(|(_, p)| *p)
            }
            _ => continue,
        };
        let mount = Path::new(mp);
        v.push(mount.join("ferry"));
        if let Some(p) = path.filter(|p| *p != "/") {
            v.push(mount.join(p.trim_start_matches('/')).join("ferry"));
        }
    }
    v.sort();
    v.dedup();
    v
}

/// Cgroup directories of lab `prefix`'s runc containers still present.
fn runc_cgroups(prefix: &str) -> Vec<PathBuf> {
    let (Ok(cg), Ok(mi)) = (
        std::fs::read_to_string("/proc/self/cgroup"),
        std::fs::read_to_string("/proc/self/mountinfo"),
    ) else {
        return Vec::new();
    };
    let want = format!("{prefix}-");
    let mut v = Vec::new();
    for parent in runc_cgroup_parents(&cg, &mi) {
        let Ok(dir) = std::fs::read_dir(&parent) else {
            continue;
        };
        v.extend(
            dir.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with(&want))
                .map(|e| e.path()),
        );
    }
    v.sort();
    v
}

/// Removes them (rmdir; a cgroup whose last task is still exiting is busy for a moment: tried
/// again for up to 2 s), and each `ferry` parent left empty.
fn remove_runc_cgroups(prefix: &str) -> Vec<String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    let mut left = runc_cgroups(prefix);
    let mut last = Vec::new();
    while !left.is_empty() {
        last.clear();
        for d in &left {
            if let Err(e) = std::fs::remove_dir(d)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                last.push(format!("removing cgroup {}: {e}", d.display()));
            }
        }
        left = runc_cgroups(prefix);
        if left.is_empty() || std::time::Instant::now() >= deadline {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    if let (Ok(cg), Ok(mi)) = (
        std::fs::read_to_string("/proc/self/cgroup"),
        std::fs::read_to_string("/proc/self/mountinfo"),
    ) {
        for parent in runc_cgroup_parents(&cg, &mi) {
            // Only if empty (other labs' containers may be in it).
            let _ = std::fs::remove_dir(parent);
        }
    }
    if left.is_empty() { Vec::new() } else { last }
}

/// Interface names in the root network namespace: that of PID 1 if we may enter it, else our
/// own (the namespace the lab was started from, which it must not touch either).
fn root_links() -> std::io::Result<Vec<String>> {
    let text = match run_in(Path::new("/proc/1/ns/net"), || {
        std::fs::read_to_string("/proc/thread-self/net/dev")
    }) {
        Ok(r) => r?,
        Err(_) => std::fs::read_to_string("/proc/self/net/dev")?,
    };
    Ok(text
        .lines()
        .skip(2)
        .filter_map(|l| Some(l.split(':').next()?.trim().to_owned()))
        .collect())
}

/// Labs present on this machine: state directories plus namespaces that look like a lab's.
pub fn list_labs() -> Vec<String> {
    let mut labs = BTreeSet::new();
    if let Ok(dir) = std::fs::read_dir(STATE_ROOT) {
        for e in dir.filter_map(Result::ok) {
            if let Some(n) = e.file_name().to_str()
                && state::is_prefix(n)
            {
                labs.insert(n.to_owned());
            }
        }
    }
    if let Ok(dir) = std::fs::read_dir(NETNS_RUN_DIR) {
        for e in dir.filter_map(Result::ok) {
            if let Some(n) = e.file_name().to_str()
                && let Some((p, _)) = n.split_once('-')
                && state::is_prefix(p)
            {
                labs.insert(p.to_owned());
            }
        }
    }
    labs.into_iter().collect()
}

/// The one lab present, or an error naming the choices.
pub fn only_lab() -> Result<String, LabError> {
    let labs = list_labs();
    match labs.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(LabError::Ambiguous("no lab is present".to_owned())),
        many => Err(LabError::Ambiguous(format!(
            "{} labs are present ({}): choose one with --lab",
            many.len(),
            many.join(", ")
        ))),
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct LabStatus {
    pub prefix: String,
    pub persistent: Option<bool>,
    pub owner_pid: Option<i32>,
    pub namespaces: Vec<NamespaceStatus>,
    pub hosts: Vec<HostStatus>,
    pub internet_client: Option<String>,
    /// Shaped links between clouds (see `ferry-lab links show` for their counters).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<crate::topology::Link>,
    pub processes: Vec<ProcessStatus>,
}

#[derive(Debug, Clone, Serialize)]
pub struct NamespaceStatus {
    pub name: String,
    pub exists: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct HostStatus {
    pub namespace: String,
    #[serde(flatten)]
    pub host: Host,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProcessStatus {
    #[serde(flatten)]
    pub process: ProcRecord,
    pub alive: bool,
}

/// What is known of lab `prefix`: its namespaces (and whether each exists), hosts and
/// addresses, the processes it started and whether they are alive.
pub fn status(prefix: &str) -> Result<LabStatus, LabError> {
    state::check_prefix(prefix)?;
    let st = LabState::load(prefix)?;
    let existing = existing_namespaces(prefix);
    if st.is_none() && existing.is_empty() {
        return Err(LabError::NoSuchLab(prefix.to_owned()));
    }
    let mut names: BTreeSet<String> = existing.iter().cloned().collect();
    if let Some(s) = &st {
        names.extend(s.namespaces.iter().cloned());
    }
    let order: Vec<String> = match &st {
        // Creation order first, then anything unrecorded.
        Some(s) => s
            .namespaces
            .iter()
            .cloned()
            .chain(names.iter().filter(|n| !s.namespaces.contains(n)).cloned())
            .collect(),
        None => names.into_iter().collect(),
    };
    Ok(LabStatus {
        prefix: prefix.to_owned(),
        persistent: st.as_ref().map(|s| s.persistent),
        owner_pid: st.as_ref().map(|s| s.owner_pid),
        namespaces: order
            .into_iter()
            .map(|name| NamespaceStatus {
                exists: netns_path(&name).exists(),
                name,
            })
            .collect(),
        hosts: st
            .as_ref()
            .map(|s| {
                s.topology
                    .hosts
                    .iter()
                    .map(|h| HostStatus {
                        namespace: netns_name(prefix, &h.name),
                        host: h.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default(),
        internet_client: st
            .as_ref()
            .and_then(|s| s.topology.internet.as_ref())
            .map(|i| format!("{}/{}", i.client, i.subnet.prefix_len())),
        links: st
            .as_ref()
            .map(|s| s.topology.links.clone())
            .unwrap_or_default(),
        processes: st
            .map(|s| {
                s.processes
                    .into_iter()
                    .map(|p| ProcessStatus {
                        alive: p.alive(),
                        process: p,
                    })
                    .collect()
            })
            .unwrap_or_default(),
    })
}

/// The reaper: waits for the owner process to exit, then tears the lab down if its state
/// directory still exists (the owner did not do it). Runs detached (`ferry-lab reap`).
pub fn reap(prefix: &str, owner: i32, owner_start: Option<u64>) -> Result<(), LabError> {
    state::check_prefix(prefix)?;
    procs::wait_for_exit(owner, owner_start);
    if state::state_dir(prefix).exists() || !existing_namespaces(prefix).is_empty() {
        tracing::info!(%prefix, owner, "owner exited without tearing the lab down: reaping");
        teardown(prefix)?;
    }
    Ok(())
}

/// With `FERRY_LAB_KEEP_LOGS=DIR`, the lab's daemon logs (every `*.log` under its state
/// directory) are copied to `DIR/<prefix>/` before the state goes, for a post-mortem of a
/// failed test. Best effort.
const KEEP_LOGS_ENV: &str = "FERRY_LAB_KEEP_LOGS";

fn keep_logs(prefix: &str, state: &Path) {
    let Some(to) = std::env::var_os(KEEP_LOGS_ENV).map(|d| PathBuf::from(d).join(prefix)) else {
        return;
    };
    fn walk(dir: &Path, rel: &Path, to: &Path) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let (path, name) = (e.path(), e.file_name());
            match e.file_type() {
                Ok(t) if t.is_dir() => walk(&path, &rel.join(&name), to),
                Ok(t) if t.is_file() && path.extension().is_some_and(|x| x == "log") => {
                    let _ = std::fs::create_dir_all(to.join(rel));
                    let _ = std::fs::copy(&path, to.join(rel).join(&name));
                }
                _ => {}
            }
        }
    }
    walk(state, Path::new(""), &to);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runc_cgroups_are_looked_for_under_our_own_cgroups() {
        let cgroup = "9:name=systemd:/\n6:freezer:/\n4:memory:/sandbox/x\n1:cpu,cpuacct:/\n0::/\n";
        let mountinfo = "30 25 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n\
            31 30 0:27 / /sys/fs/cgroup/systemd rw - cgroup cgroup rw,xattr,name=systemd\n\
            36 30 0:32 / /sys/fs/cgroup/freezer rw - cgroup cgroup rw,freezer\n\
            37 30 0:33 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n\
            38 30 0:34 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n\
            40 30 0:36 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n\
            41 30 0:37 / /proc rw - proc proc rw\n";
        let got: Vec<String> = runc_cgroup_parents(cgroup, mountinfo)
            .into_iter()
            .map(|p| p.display().to_string())
            .collect();
        assert_eq!(
            got,
            [
                "/sys/fs/cgroup/cpu,cpuacct/ferry",
                "/sys/fs/cgroup/freezer/ferry",
                "/sys/fs/cgroup/memory/ferry",
                "/sys/fs/cgroup/memory/sandbox/x/ferry",
                "/sys/fs/cgroup/systemd/ferry",
                "/sys/fs/cgroup/unified/ferry",
            ]
        );
    }
}
