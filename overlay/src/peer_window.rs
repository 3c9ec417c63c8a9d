//! The agents' own TCP connections start with larger windows: `ferry_peer_window`
//! (ebpf/ferry-ebpf/src/sockops.rs, a sock_ops program) attached to the agent's cgroup v2.
//!
//! A connection whose local or remote port is the agents' API port begins with a congestion
//! window and an advertised receive window of `window` segments (the kernel's are 10). The
//! images of a frozen container cross such a connection, opened moments before: across a WAN
//! its first round trips would otherwise carry 14 KB, then 28, 56… while the container waits.
//! Only the agent's cgroup is affected (where the agent runs under a service manager, its
//! own), and in it only connections to or from that port. Detached when the returned
//! [`PeerWindow`] is dropped, or when the agent dies (a BPF link held by its descriptor).

use std::path::{Path, PathBuf};

use aya::{
    EbpfLoader,
    programs::{CgroupAttachMode, SockOps},
};

static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ferry-sockops"));

/// The program's name in the object.
pub const PROGRAM: &str = "ferry_peer_window";
/// Where cgroup v2 is mounted: a pure v2 machine, or a hybrid one's unified tree.
const CGROUP2_MOUNTS: [&str; 2] = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"];
/// Largest window accepted, in segments (the kernel clamps the congestion window to
/// `snd_cwnd_clamp` anyway; past a few hundred a first flight is a burst no WAN buffer takes).
pub const MAX_WINDOW: u32 = 1024;

#[derive(Debug, thiserror::Error)]
pub enum PeerWindowError {
    #[error("initial window {0} segments: want 1–{MAX_WINDOW}")]
    Window(u32),
    #[error("port 0 is not a port")]
    Port,
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("this process has no cgroup v2 path in /proc/self/cgroup")]
    NoCgroup2,
    #[error("no cgroup v2 mount holds {0}")]
    NoMount(String),
    #[error("opening cgroup {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("loading the sock_ops object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("{PROGRAM}: {0}")]
    Program(#[from] aya::programs::ProgramError),
    #[error("{PROGRAM} is missing from the object or is not sock_ops")]
    Missing,
}

/// The attached program; detached when dropped.
pub struct PeerWindow {
    /// Owns the program and its link.
    _ebpf: aya::Ebpf,
    cgroup: PathBuf,
}

impl std::fmt::Debug for PeerWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerWindow")
            .field("cgroup", &self.cgroup)
            .finish()
    }
}

impl PeerWindow {
    /// Attaches to the cgroup v2 this process runs in.
    pub fn attach_own(port: u16, window: u32) -> Result<Self, PeerWindowError> {
        let path = Path::new("/proc/self/cgroup");
        let text = std::fs::read_to_string(path).map_err(|source| PeerWindowError::Read {
            path: path.to_owned(),
            source,
        })?;
        let rel = cgroup2_path(&text).ok_or(PeerWindowError::NoCgroup2)?;
        let dir = CGROUP2_MOUNTS
            .iter()
            .map(|m| Path::new(m).join(rel.trim_start_matches('/')))
            .find(|d| is_cgroup2(d))
            .ok_or_else(|| PeerWindowError::NoMount(rel.to_owned()))?;
        Self::attach(&dir, port, window)
    }

    /// Attaches to the cgroup v2 directory `cgroup`.
    pub fn attach(cgroup: &Path, port: u16, window: u32) -> Result<Self, PeerWindowError> {
        if window == 0 || window > MAX_WINDOW {
            return Err(PeerWindowError::Window(window));
        }
        if port == 0 {
            return Err(PeerWindowError::Port);
        }
        let port = u32::from(port);
        let mut ebpf = EbpfLoader::new()
            .override_global("PEER_PORT", &port, true)
            .override_global("INIT_WINDOW", &window, true)
            .load(OBJECT)?;
        let prog: &mut SockOps = ebpf
            .program_mut(PROGRAM)
            .ok_or(PeerWindowError::Missing)?
            .try_into()
            .map_err(|_| PeerWindowError::Missing)?;
        prog.load()?;
        let file = std::fs::File::open(cgroup).map_err(|source| PeerWindowError::Open {
            path: cgroup.to_owned(),
            source,
        })?;
        // A BPF link (kernels ≥ 5.7, what aya uses): always one of many on the cgroup, and the
        // kernel refuses link flags there, so `Single` (flags 0) — `AllowMultiple` would send
        // BPF_F_ALLOW_MULTI and get EINVAL. Other programs on the cgroup stay.
        prog.attach(file, CgroupAttachMode::Single)?;
        Ok(Self {
            _ebpf: ebpf,
            cgroup: cgroup.to_owned(),
        })
    }

    /// The cgroup it is attached to.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }
}

/// The cgroup v2 path (`0::/path`) in a `/proc/PID/cgroup` text.
pub fn cgroup2_path(text: &str) -> Option<&str> {
    text.lines().find_map(|l| l.strip_prefix("0::"))
}

/// Is `dir` a directory of a cgroup v2 tree (it has `cgroup.procs` and `cgroup.controllers`)?
fn is_cgroup2(dir: &Path) -> bool {
    dir.join("cgroup.controllers").exists() && dir.join("cgroup.procs").exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_v2_path_is_the_0_line() {
        let hybrid = "9:name=systemd:/\n4:memory:/process_api/d1\n0::/\n";
        assert_eq!(cgroup2_path(hybrid), Some("/"));
        assert_eq!(
            cgroup2_path("0::/system.slice/ferry-agent.service\n"),
            Some("/system.slice/ferry-agent.service")
        );
        assert_eq!(cgroup2_path("4:memory:/x\n"), None);
    }

    #[test]
    fn a_window_or_port_out_of_range_is_refused_before_loading() {
        let dir = Path::new("/nonexistent");
        assert!(matches!(
            PeerWindow::attach(dir, 7401, 0),
            Err(PeerWindowError::Window(0))
        ));
        assert!(matches!(
            PeerWindow::attach(dir, 7401, MAX_WINDOW + 1),
            Err(PeerWindowError::Window(_))
        ));
        assert!(matches!(
            PeerWindow::attach(dir, 0, 64),
            Err(PeerWindowError::Port)
        ));
    }
}
