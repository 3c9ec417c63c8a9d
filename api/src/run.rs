//! Whole-container migration with CRIU (`ferry migrate run`): the report the gateway keeps for
//! each run, and the agents' API types for checkpoint, image transfer and restore.
//!
//! Gateway routes:
//!
//! | method | path | body → answer |
//! |---|---|---|
//! | POST | /v1/runs | [`RunRequest`] → [`RunReport`] (202: the run goes on in the gateway; poll it) |
//! | GET | /v1/runs/{id} | → [`RunReport`] (`id` is the migration's id) |
//! | POST | /v1/runs/{id}/events | [`RunEvent`] → `{"ok":true}` (agents' progress, appended to the report; refused once the run is finished) |
//!
//! Agents' peer API (`api_listen`, same bearer token):
//!
//! | method | path | body → answer |
//! |---|---|---|
//! | POST | /v1/containers/{ip}/start | [`StartRequest`] → [`ContainerProcess`] (201) |
//! | GET | /v1/containers/{ip} | → [`ContainerProcess`] |
//! | DELETE | /v1/containers/{ip}/process | → [`ContainerProcess`] (stopped) |
//! | POST | /v1/checkpoint/{migration} | [`CheckpointRequest`] → one [`CheckpointAnswer`] at the end (progress goes to the gateway's `/v1/runs/{id}/events`) |
//! | POST | /v1/images/{migration} | image stream ([`crate::run`] framing, see the agent) → [`RestoreAnswer`] |

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// The phases of a run, in order.
pub const PHASES: [&str; 6] = [
    "prepare", "freeze", "dump", "transfer", "restore", "release",
];

/// The phase after the release of a lazy-memory run ([`MemoryMode::Lazy`]): from the
/// destination's restore to the last page of the container's memory arriving there (the
/// container ran there meanwhile); `bytes` are the pages' bytes.
pub const PAGES_PHASE: &str = "pages";

/// Body of `POST /v1/runs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunRequest {
    pub container: Ipv4Addr,
    pub to: String,
    /// How the source's packets are kept while the container is frozen: `hold` (ferry's hold,
    /// the default) or `criu-lock` (CRIU's own nftables network lock at the source, the
    /// endpoint switched only after the restore: the baseline a CRIU user has today).
    #[serde(default)]
    pub lock: LockMode,
    /// Fault injection for tests and drills: `dump` or `restore` fails on purpose (after
    /// the container was frozen), so the rollback can be watched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fail: Option<FailAt>,
    /// The runtime the caller expects the container to run under (`agent`, `runc`): the
    /// source refuses the checkpoint, before freezing anything, if the container runs under
    /// another one. Absent: whichever runs it (the agent records each container's runtime).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<RuntimeKind>,
    /// How the container's memory moves: `copy` (all of it in the frozen window, the
    /// default) or `lazy` (post-copy: the container runs at the destination once everything
    /// but its memory moved; the pages follow on demand and in the background).
    #[serde(default, skip_serializing_if = "MemoryMode::is_copy")]
    pub memory: MemoryMode,
}

/// How a container's memory moves (see docs/migration.md, "Memory: copy or lazy").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MemoryMode {
    /// Stop-and-copy: every page is dumped, moved and restored while the container is stopped.
    #[default]
    Copy,
    /// Post-copy: CRIU's lazy pages. The source's `criu dump --lazy-pages` serves the pages
    /// (TLS when the hosts have certificates) until the destination's `criu lazy-pages` has
    /// pulled every one; the restored tasks fault the missing ones in through userfaultfd.
    Lazy,
}

impl MemoryMode {
    pub const fn as_str(self) -> &'static str {
        match self {
            MemoryMode::Copy => "copy",
            MemoryMode::Lazy => "lazy",
        }
    }

    pub fn is_copy(&self) -> bool {
        *self == MemoryMode::Copy
    }
}

impl std::fmt::Display for MemoryMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which runtime runs a container's process tree on its agent (see the agent's
/// `runtime::driver`): `agent` (the agent's own: a process tree in the host's file system)
/// or `runc` (an OCI container with its own root file system, started and checkpointed
/// through runc).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RuntimeKind {
    #[default]
    Agent,
    Runc,
    /// A Podman container (started with `podman run --network <a ferry-cni network>`),
    /// checkpointed and restored through Podman (`podman container checkpoint --export` /
    /// `restore --import`).
    Podman,
}

impl RuntimeKind {
    pub const ALL: [RuntimeKind; 3] = [RuntimeKind::Agent, RuntimeKind::Runc, RuntimeKind::Podman];

    pub const fn as_str(self) -> &'static str {
        match self {
            RuntimeKind::Agent => "agent",
            RuntimeKind::Runc => "runc",
            RuntimeKind::Podman => "podman",
        }
    }

    pub fn is_agent(&self) -> bool {
        *self == RuntimeKind::Agent
    }
}

impl std::fmt::Display for RuntimeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A runtime name that is not one of [`RuntimeKind::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown runtime {0:?}: want agent, runc or podman")]
pub struct UnknownRuntime(pub String);

impl std::str::FromStr for RuntimeKind {
    type Err = UnknownRuntime;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RuntimeKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| UnknownRuntime(s.to_owned()))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LockMode {
    #[default]
    Hold,
    CriuLock,
}

impl LockMode {
    pub const fn as_str(self) -> &'static str {
        match self {
            LockMode::Hold => "hold",
            LockMode::CriuLock => "criu-lock",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailAt {
    Dump,
    Restore,
}

/// One phase's timing. Times are Unix milliseconds (fractional, from the gateway's clock
/// for prepare/freeze/release and the agents' clocks for dump/transfer/restore).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhaseTiming {
    /// One of [`PHASES`].
    pub name: String,
    pub start_unix_ms: f64,
    pub ms: f64,
    /// Bytes moved in this phase (transfer: image bytes), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
}

/// CRIU's own figures (from `--display-stats`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CriuStats {
    /// How long the container's processes were stopped at the source (CRIU's "Frozen time").
    pub frozen_ms: f64,
    pub freezing_ms: f64,
    pub memory_dump_ms: f64,
    pub memory_write_ms: f64,
    pub pages_written: u64,
    /// CRIU's "Restore time" at the destination.
    pub restore_ms: f64,
    pub pages_restored: u64,
}

/// Where a run is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Running,
    /// Done: the container runs at `to`.
    Released,
    /// Failed and rolled back: the container runs at `from`.
    RolledBack,
    /// Failed and not (known to be) rolled back; see `error`.
    NeedsAttention,
}

impl RunState {
    pub const fn as_str(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Released => "released",
            RunState::RolledBack => "rolled_back",
            RunState::NeedsAttention => "needs_attention",
        }
    }

    pub const fn finished(self) -> bool {
        !matches!(self, RunState::Running)
    }
}

/// `ferry migrate run`'s report (also `GET /v1/runs/{id}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    /// The migration's id (`m<n>`).
    pub id: String,
    pub container: Ipv4Addr,
    pub from: String,
    pub to: String,
    pub lock: LockMode,
    /// How the memory moved (absent: `copy`).
    #[serde(default, skip_serializing_if = "MemoryMode::is_copy")]
    pub memory: MemoryMode,
    pub state: RunState,
    pub started_unix_ms: f64,
    /// From the start of prepare to the end of release (or of the rollback).
    pub total_ms: f64,
    /// How long the container ran nowhere: from CRIU seizing the source's tasks to the
    /// destination's tasks running (0 if it did not get that far).
    #[serde(default)]
    pub stopped_ms: f64,
    /// Phases done so far, in order.
    pub phases: Vec<PhaseTiming>,
    /// Progress lines (human-readable), oldest first.
    pub events: Vec<RunEvent>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub criu: Option<CriuStats>,
    /// Bytes of CRIU images moved from source to destination.
    pub image_bytes: u64,
    /// Of those, the bytes of memory (page files) that crossed while the dump was still
    /// writing them (the rest crossed after the dump, with the container stopped).
    #[serde(default)]
    pub image_bytes_during_dump: u64,
    /// Why it failed (state rolled_back / needs_attention).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl RunReport {
    pub fn phase(&self, name: &str) -> Option<&PhaseTiming> {
        self.phases.iter().find(|p| p.name == name)
    }
}

/// A progress event (also the lines an agent streams back from a checkpoint). The body of
/// `POST /v1/runs/{id}/events`: unknown fields are refused like every request's (the struct
/// never lost a field, so persisted reports still load).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RunEvent {
    pub unix_ms: f64,
    /// `phase` (a phase finished: `phase` has its timing), `progress` (bytes so far),
    /// `info`, `done`, `failed`.
    pub kind: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<PhaseTiming>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub criu: Option<CriuStats>,
}

/// Body of an agent's `POST /v1/checkpoint/{migration}` (the gateway to the source agent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointRequest {
    pub container: Ipv4Addr,
    /// The destination host's name, and its agent's peer API.
    pub to: String,
    pub to_api: std::net::SocketAddr,
    pub lock: LockMode,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fail: Option<FailAt>,
    /// The runtime the run expects (see [`RunRequest::runtime`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<RuntimeKind>,
    /// See [`RunRequest::memory`].
    #[serde(default, skip_serializing_if = "MemoryMode::is_copy")]
    pub memory: MemoryMode,
}

/// A destination agent's answer to an image stream: the container was restored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RestoreAnswer {
    pub pid: i32,
    /// When the restored tasks were resumed (Unix ms, from CRIU's log).
    pub resumed_unix_ms: f64,
    /// The release (hold mode) or the switch (freeze + release, criu-lock mode) the
    /// destination asked the gateway for, once the tasks ran.
    pub release: Option<PhaseTiming>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub release_error: Option<String>,
    pub bytes: u64,
    pub files: u32,
    pub transfer: PhaseTiming,
    pub restore: PhaseTiming,
    pub criu_restore_ms: f64,
    pub pages_restored: u64,
}

/// Body of an agent's `POST /v1/containers/{ip}/start`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    /// The program (absolute path) and its arguments.
    pub argv: Vec<String>,
    /// Extra environment (the process otherwise gets only `PATH`).
    #[serde(default)]
    pub env: Vec<(String, String)>,
    /// Which runtime starts it (default `agent`).
    #[serde(default, skip_serializing_if = "RuntimeKind::is_agent")]
    pub runtime: RuntimeKind,
    /// `runc` only (and required there): the container's root file system, the name of an
    /// image in the agent's images directory (`[runtime] images_dir`, default
    /// /var/cache/ferry/rootfs), e.g. `redis-1a2b3c4d5e6f7a8b` as `ferry-lab image build redis`
    /// makes it. The same image must exist on every host the container may move to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

/// A container's process tree, as its agent knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerProcess {
    pub container: Ipv4Addr,
    /// Host PID of the tree's root (PID 1 of the container's PID namespace).
    pub pid: i32,
    pub argv: Vec<String>,
    /// `started` (by this agent), `restored` (by CRIU on this agent) or `adopted` (found
    /// running in the container's namespace by a restarted agent, with no record of it).
    pub origin: String,
    pub running: bool,
    /// The exit status if it ended (`exited N` / `killed by SIGNAME`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended: Option<String>,
    /// Set while the tree is a stopped copy that is not (or not yet) the container's owner:
    /// it may neither run nor emit until the registry decides (see docs/migration.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fenced: Option<Fence>,
    /// The runtime that runs it (`agent` if absent).
    #[serde(default, skip_serializing_if = "RuntimeKind::is_agent")]
    pub runtime: RuntimeKind,
    /// Its root file system (an image name), for `runc`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

/// A stopped copy of a migrating container, kept until the registry's decision reaches its
/// host: the source's dumped tree (resumed if the migration is aborted, killed once the
/// destination runs) or the destination's restored tree (resumed once the migration is
/// released, killed if it is aborted).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fence {
    pub migration: String,
    pub side: FenceSide,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FenceSide {
    Source,
    Destination,
}

impl FenceSide {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Source => "source",
            Self::Destination => "destination",
        }
    }
}

/// `GET /v1/restores/{migration}` on a destination agent: how far the migration's restore
/// got there (the gateway asks when it lost the source agent, to choose between waiting for
/// the release and aborting).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RestoreStatus {
    pub migration: String,
    /// `none` (nothing received), `receiving`, `restoring`, `restored` (the tree exists,
    /// stopped, waiting for the decision), `failed`.
    pub state: String,
    /// Image bytes received so far.
    pub bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A source agent's answer to `POST /v1/checkpoint/{migration}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointAnswer {
    /// The container runs at the destination (released there).
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The source's tree runs again (a failure after which the migration must be aborted).
    pub resumed: bool,
    /// dump, transfer, restore, release (those that happened).
    pub phases: Vec<PhaseTiming>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub criu: Option<CriuStats>,
    pub image_bytes: u64,
    /// See [`RunReport::image_bytes_during_dump`].
    #[serde(default)]
    pub image_bytes_during_dump: u64,
    /// From the source's tasks being seized to the destination's tasks running again (CRIU's
    /// logs), Unix ms: the time the container ran nowhere.
    #[serde(default)]
    pub stopped_from_unix_ms: f64,
    #[serde(default)]
    pub stopped_until_unix_ms: f64,
}
