//! `[runtime]`: how the agent's own container runtime isolates a container's processes.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `[runtime]` in the agent's config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Who a container's processes are (always without any capability, with `no_new_privs`,
    /// in a private mount namespace). 0 (the default): uid and gid 0. Otherwise uid = gid =
    /// `uid_base` + the container address's offset in `overlay_cidr` (one uid per container,
    /// the same on every host, so a migrated tree keeps it), e.g. 1000000 (above login users
    /// and the usual subordinate-uid ranges). CRIU can dump such a tree only with
    /// CAP_SYS_RESOURCE (it reads the tree's rlimits with prlimit(2), which another uid's
    /// process refuses without it): hosts (and sandboxes) without it need 0.
    #[serde(default)]
    pub uid_base: u32,
    /// Directories (or files) hidden from every container (an empty read-only mount over
    /// each), besides the ones the agent's own configuration names (`state_dir`,
    /// `[criu] work_dir`, the token file, the hand-off socket's directory). Default
    /// `/etc/ferry`, `/var/lib/ferry`, `/run/ferry`, `/run/ferry-lab`.
    #[serde(default = "default_hide")]
    pub hide: Vec<PathBuf>,
    /// The `runc` binary, for containers started with `runtime = runc` (an OCI container with
    /// its own root file system). Default `/usr/sbin/runc` (Debian's package; 1.1.5 is known
    /// to work, see docs/migration.md).
    #[serde(default = "default_runc")]
    pub runc: PathBuf,
    /// Where the root file systems of runc containers are (one directory per image, named
    /// by the start request's `image`; `ferry-lab image build` makes them). The same image
    /// must be on every host a container may move to. Default `/var/cache/ferry/rootfs`.
    #[serde(default = "default_images_dir")]
    pub images_dir: PathBuf,
    /// `[runtime.podman]`: the host's Podman, for containers Podman runs on a ferry-cni
    /// network (`ferry migrate run --runtime podman`).
    #[serde(default)]
    pub podman: PodmanConfig,
}

/// `[runtime.podman]`: how the agent runs the host's Podman.
///
/// The containers it moves must have been created with `--network <a ferry-cni network>` and
/// `--annotation org.criu.config=<file>` holding `action-script <ferry>`, `network-lock skip`
/// and `leave-stopped` (docs/migration.md, "Podman").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodmanConfig {
    /// Default `/usr/bin/podman` (Debian's package; 4.3.1 is known to work).
    #[serde(default = "default_podman")]
    pub binary: PathBuf,
    /// Podman's global options on this host, before the command (e.g. `--root`,
    /// `--runroot`, `--runtime-flag`), as the host's own `podman` is run. Default: none.
    #[serde(default)]
    pub args: Vec<String>,
    /// `CONTAINERS_CONF` for Podman, if the host's is not the default one.
    #[serde(default)]
    pub containers_conf: Option<PathBuf>,
}

impl Default for PodmanConfig {
    fn default() -> Self {
        Self {
            binary: default_podman(),
            args: Vec::new(),
            containers_conf: None,
        }
    }
}

fn default_podman() -> PathBuf {
    PathBuf::from("/usr/bin/podman")
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            uid_base: 0,
            hide: default_hide(),
            runc: default_runc(),
            images_dir: default_images_dir(),
            podman: PodmanConfig::default(),
        }
    }
}

/// Default [`RuntimeConfig::images_dir`].
pub const DEFAULT_IMAGES_DIR: &str = "/var/cache/ferry/rootfs";

fn default_runc() -> PathBuf {
    PathBuf::from("/usr/sbin/runc")
}

fn default_images_dir() -> PathBuf {
    PathBuf::from(DEFAULT_IMAGES_DIR)
}

fn default_hide() -> Vec<PathBuf> {
    [
        "/etc/ferry",
        "/var/lib/ferry",
        "/run/ferry",
        "/run/ferry-lab",
    ]
    .into_iter()
    .map(PathBuf::from)
    .collect()
}
