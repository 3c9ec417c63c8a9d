//! Counting a container's copies: every process tree, on any lab host, that descends from the
//! container's first process. The harness starts the container's process with an environment
//! variable ([`MARKER_VAR`]) naming the lab and the container; CRIU restores a process's
//! memory, environment included, so every restored copy carries it too, and nothing outside
//! the container's tree does. A copy is one PID namespace (the tree is PID 1 of its own); it is
//! *running* unless every process in it is stopped (`T`, `t`: CRIU's `--leave-stopped`, a
//! tree being dumped) or dead (`Z`, `X`). Its host is the lab host whose container namespace
//! it is in; a copy in a namespace no lab host names any more (its agent deleted the namespace
//! file while the tree still ran) is reported with no host.
//!
//! Finding copies by marker rather than by namespace name is deliberate: a copy left behind
//! in a namespace whose name was removed is exactly what a fault can produce, and it must be
//! counted.

use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
    os::unix::fs::MetadataExt,
    path::Path,
};

use ferry_lab::{lab::container_netns_prefix, procs};
use serde::Serialize;

/// The environment variable that marks a container's processes: `<lab prefix>/<container IP>`.
pub const MARKER_VAR: &str = "FERRY_FAULTS_COPY";

/// The marker's value for container `ip` of lab `prefix`.
pub fn marker(prefix: &str, ip: Ipv4Addr) -> String {
    format!("{prefix}/{ip}")
}

/// One copy of the container: a PID namespace holding marked processes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Copy {
    /// The lab host whose container namespace it runs in (`None`: an unnamed namespace).
    pub host: Option<String>,
    /// Its processes (host PIDs), lowest first.
    pub pids: Vec<i32>,
    /// Some process of it is neither stopped nor dead.
    pub running: bool,
}

/// What a scan found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Copies {
    pub all: Vec<Copy>,
}

impl Copies {
    pub fn running(&self) -> impl Iterator<Item = &Copy> {
        self.all.iter().filter(|c| c.running)
    }

    pub fn running_count(&self) -> u32 {
        self.running().count() as u32
    }

    pub fn stopped_count(&self) -> u32 {
        self.all.iter().filter(|c| !c.running).count() as u32
    }

    /// The hosts of the running copies (`?` for an unnamed namespace), in order.
    pub fn running_hosts(&self) -> Vec<String> {
        self.running()
            .map(|c| c.host.clone().unwrap_or_else(|| "?".into()))
            .collect()
    }

    /// The host of the one running copy, if exactly one runs and its host is known.
    pub fn single_host(&self) -> Option<&str> {
        let mut r = self.running();
        match (r.next(), r.next()) {
            (Some(c), None) => c.host.as_deref(),
            _ => None,
        }
    }
}

/// Is a process in state `s` (field 3 of /proc/PID/stat) running, for this count?
pub fn state_runs(s: char) -> bool {
    !matches!(s, 'T' | 't' | 'Z' | 'X')
}

/// Does an environment block (`/proc/PID/environ`: NUL-separated `K=V`) carry `var=value`?
pub fn environ_has(environ: &[u8], var: &str, value: &str) -> bool {
    let want = format!("{var}={value}");
    environ.split(|b| *b == 0).any(|e| e == want.as_bytes())
}

/// Groups marked processes `(pid, pid namespace, net namespace, state)` into copies, naming
/// each by the host whose container namespace (`netns_hosts`: namespace id → host) it is in.
pub fn group(
    procs: &[(i32, u64, (u64, u64), char)],
    netns_hosts: &HashMap<(u64, u64), String>,
) -> Copies {
    let mut by_ns: BTreeMap<u64, Copy> = BTreeMap::new();
    for &(pid, pidns, netns, state) in procs {
        let c = by_ns.entry(pidns).or_insert_with(|| Copy {
            host: netns_hosts.get(&netns).cloned(),
            pids: Vec::new(),
            running: false,
        });
        c.pids.push(pid);
        c.running |= state_runs(state);
        if c.host.is_none() {
            c.host = netns_hosts.get(&netns).cloned();
        }
    }
    let mut all: Vec<Copy> = by_ns.into_values().collect();
    for c in &mut all {
        c.pids.sort_unstable();
    }
    all.sort_by(|a, b| a.host.cmp(&b.host).then(a.pids.cmp(&b.pids)));
    Copies { all }
}

/// Scans /proc for the copies of container `ip` of lab `prefix` (hosts: the lab's hosts).
pub fn scan(prefix: &str, hosts: &[String], ip: Ipv4Addr) -> Copies {
    let value = marker(prefix, ip);
    let netns_hosts: HashMap<(u64, u64), String> = hosts
        .iter()
        .filter_map(|h| {
            let name = ferry_config::container_netns_name(&container_netns_prefix(prefix, h), ip);
            let id = procs::ns_id(&ferry_overlay::netns::netns_path(&name)).ok()?;
            Some((id, h.clone()))
        })
        .collect();
    let mut found = Vec::new();
    for pid in procs::all_pids() {
        let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
            continue;
        };
        if !environ_has(&env, MARKER_VAR, &value) {
            continue;
        }
        let Ok((state, _)) = procs::stat(pid) else {
            continue;
        };
        let pidns = std::fs::metadata(format!("/proc/{pid}/ns/pid")).map(|m| m.ino());
        let netns = procs::ns_id(Path::new(&format!("/proc/{pid}/ns/net")));
        if let (Ok(pidns), Ok(netns)) = (pidns, netns) {
            found.push((pid, pidns, netns, state));
        }
    }
    group(&found, &netns_hosts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_marker_is_matched_as_a_whole_entry() {
        let env = b"PATH=/bin\0FERRY_FAULTS_COPY=fl123456/10.244.1.10\0";
        assert!(environ_has(env, MARKER_VAR, "fl123456/10.244.1.10"));
        assert!(!environ_has(env, MARKER_VAR, "fl123456/10.244.1.1"));
        assert!(!environ_has(b"XFERRY_FAULTS_COPY=a\0", MARKER_VAR, "a"));
        assert!(!environ_has(b"", MARKER_VAR, "a"));
    }

    #[test]
    fn copies_are_pid_namespaces_and_stopped_ones_do_not_run() {
        let a1 = (1, 100);
        let b1 = (1, 200);
        let hosts: HashMap<(u64, u64), String> =
            [(a1, "a1".to_owned()), (b1, "b1".to_owned())].into();
        // a1: a stopped tree (dumped, --leave-stopped); b1: a restored, running tree of two
        // processes; and a running tree in a namespace whose name is gone.
        let procs = [
            (10, 7001, a1, 'T'),
            (11, 7001, a1, 't'),
            (20, 7002, b1, 'S'),
            (21, 7002, b1, 'R'),
            (30, 7003, (1, 999), 'S'),
        ];
        let c = group(&procs, &hosts);
        assert_eq!(c.all.len(), 3);
        assert_eq!(c.running_count(), 2);
        assert_eq!(c.stopped_count(), 1);
        assert_eq!(c.running_hosts(), ["?", "b1"]);
        assert_eq!(c.single_host(), None);
        let only_b1 = group(&procs[..4], &hosts);
        assert_eq!(only_b1.single_host(), Some("b1"));
        assert_eq!(only_b1.all[1].pids, [20, 21]);
        assert!(state_runs('D') && state_runs('S') && !state_runs('Z'));
    }
}
