//! Per-lab state on disk: `/run/ferry-lab/<prefix>/state.json`, written progressively so a
//! half-built lab (or one whose owner died) can still be torn down by another process.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::{LabError, procs::ProcRecord, topology::LabTopology};

/// Where labs keep their state directories.
pub const STATE_ROOT: &str = "/run/ferry-lab";
/// Where agents pin their eBPF objects: `<BPFFS_ROOT>/<prefix>-<host>`.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf/ferry";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabState {
    pub prefix: String,
    /// `ferry-lab up` labs outlive their creator; library labs are reaped with their owner.
    pub persistent: bool,
    /// PID of the process that brought the lab up.
    pub owner_pid: i32,
    pub created_unix_secs: u64,
    pub agents: bool,
    /// The agents' hold-queue limits.
    #[serde(default)]
    pub hold_limits: ferry_config::HoldLimits,
    /// The control plane speaks plain HTTP (no TLS material).
    #[serde(default)]
    pub insecure_plaintext: bool,
    pub topology: LabTopology,
    /// Namespace names (not paths), recorded *before* each is created.
    pub namespaces: Vec<String>,
    /// Every process the lab started (agents, the reaper).
    pub processes: Vec<ProcRecord>,
}

pub fn state_dir(prefix: &str) -> PathBuf {
    Path::new(STATE_ROOT).join(prefix)
}

/// Where the lab's agents write CRIU's images: RAM (/dev/shm is tmpfs), not the state
/// directory, which is on disk on this machine kind (/run is ext4 here): hundreds of MB of
/// images written to disk stall in writeback.
pub const SHM_ROOT: &str = "/dev/shm/ferry-lab";

/// The lab's directory under [`SHM_ROOT`] (removed by the teardown).
pub fn shm_dir(prefix: &str) -> PathBuf {
    Path::new(SHM_ROOT).join(prefix)
}

/// A host's CRIU work directory in the lab (`/dev/shm/ferry-lab/<prefix>/<host>/criu`, made
/// 0700 by its agent, as every directory above it that it creates).
pub fn criu_work_dir(prefix: &str, host: &str) -> PathBuf {
    shm_dir(prefix).join(host).join("criu")
}

/// The lab's fault-point directory (`<state>/faults`): the gateway and every agent the lab
/// starts get it as `FERRY_FAULT_DIR` (see `ferry_api::faultpoint`); CRIU and its hook inherit
/// it from the agent. Nothing stops anywhere unless a file is created in it.
pub fn fault_dir(prefix: &str) -> PathBuf {
    state_dir(prefix).join("faults")
}

pub fn state_file(prefix: &str) -> PathBuf {
    state_dir(prefix).join("state.json")
}

impl LabState {
    /// Loads a lab's state; `Ok(None)` if it has none (never existed, or torn down).
    pub fn load(prefix: &str) -> Result<Option<Self>, LabError> {
        let path = state_file(prefix);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(LabError::io(format!("reading {}", path.display()), e)),
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| LabError::State {
                prefix: prefix.to_owned(),
                path,
                problem: e.to_string(),
            })
    }

    /// Writes the state atomically (temporary file + rename).
    pub fn save(&self) -> Result<(), LabError> {
        let path = state_file(&self.prefix);
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_string_pretty(self).expect("state always serialises");
        ferry_api::private::write_file(&tmp, text.as_bytes())
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|e| LabError::io(format!("writing {}", path.display()), e))
    }
}

/// Is `s` a lab prefix (`fl` + 6 lowercase hex digits)?
pub fn is_prefix(s: &str) -> bool {
    s.len() == 8
        && s.starts_with("fl")
        && s[2..]
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

pub fn check_prefix(s: &str) -> Result<(), LabError> {
    if is_prefix(s) {
        Ok(())
    } else {
        Err(LabError::BadPrefix(s.to_owned()))
    }
}

/// A fresh random prefix: `fl` + 6 hex digits from the kernel's random source.
pub fn random_prefix() -> Result<String, LabError> {
    use std::io::Read;
    let mut b = [0u8; 3];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(|e| LabError::io("reading /dev/urandom", e))?;
    Ok(format!("fl{:02x}{:02x}{:02x}", b[0], b[1], b[2]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes() {
        assert!(is_prefix("fl3a9c1e"));
        assert!(!is_prefix("fl3a9c1"));
        assert!(!is_prefix("fl3A9c1e"));
        assert!(!is_prefix("fx3a9c1e"));
        assert!(!is_prefix("fl3a9c1g"));
        assert!(!is_prefix("../../etc"));
        let p = random_prefix().unwrap();
        assert!(is_prefix(&p), "{p}");
        assert_ne!(p, random_prefix().unwrap());
    }
}
