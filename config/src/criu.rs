//! `[criu]`: whole-container migration with CRIU.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `[criu]` in the agent's config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CriuConfig {
    /// The `criu` binary (>= 4.2 on kernels >= 6.16). Default `/usr/local/sbin/criu`.
    #[serde(default = "default_binary")]
    pub binary: PathBuf,
    /// Where images are written (dump) and received (restore), one directory per migration,
    /// removed afterwards. Put it on tmpfs. Default `/run/ferry/criu`.
    #[serde(default = "default_work_dir")]
    pub work_dir: PathBuf,
    /// The `ferry` binary, which CRIU runs as its `--action-script` at dump: network-lock →
    /// freeze (hold mode). (ferry's own runs release from the destination agent; `ferry` maps
    /// post-resume → release for orchestrators that drive CRIU themselves.) Default
    /// `/usr/local/bin/ferry`.
    #[serde(default = "default_action_script")]
    pub action_script: PathBuf,
    /// Keep the images and CRIU's logs of the last migration (for debugging).
    #[serde(default)]
    pub keep_images: bool,
    /// The drain before a dump: how long (milliseconds) the source waits, new connections
    /// held, for every listening TCP socket of the container to have an empty accept queue
    /// and no half-open connection. Not drained by then: the checkpoint fails before
    /// anything is frozen (the held SYNs are delivered, the container runs on). 0: no drain
    /// (CRIU then refuses a listener with queued connections). Default 2000.
    #[serde(default = "default_drain_timeout_ms")]
    pub drain_timeout_ms: u64,
    /// The initial congestion and receive windows, in segments, of the agents' own TCP
    /// connections (those to or from the agents' API port: the images of a frozen container
    /// cross one), set by a sock_ops program on the agent's cgroup. The kernel's are 10: across
    /// a WAN a fresh connection spends round trips growing them while the container waits.
    /// 0: the kernel's (nothing attached). At most 1024. Default 64.
    #[serde(default = "default_peer_initial_window")]
    pub peer_initial_window: u32,
}

impl CriuConfig {
    /// [`CriuConfig::drain_timeout_ms`] as a duration.
    pub fn drain_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.drain_timeout_ms)
    }
}

impl Default for CriuConfig {
    fn default() -> Self {
        Self {
            binary: default_binary(),
            work_dir: default_work_dir(),
            action_script: default_action_script(),
            keep_images: false,
            drain_timeout_ms: default_drain_timeout_ms(),
            peer_initial_window: default_peer_initial_window(),
        }
    }
}

fn default_drain_timeout_ms() -> u64 {
    2000
}
fn default_peer_initial_window() -> u32 {
    64
}
fn default_binary() -> PathBuf {
    PathBuf::from("/usr/local/sbin/criu")
}
fn default_work_dir() -> PathBuf {
    PathBuf::from("/run/ferry/criu")
}
fn default_action_script() -> PathBuf {
    PathBuf::from("/usr/local/bin/ferry")
}
