//! A minimal container runtime: the container's process tree, in a shape CRIU can checkpoint
//! and restore.
//!
//! A started process is PID 1 of a new PID namespace, inside the container's network namespace
//! (entered with setns(2) on a dedicated thread, never across an `.await`), in a private mount
//! namespace that hides the host's secrets, without any privilege ([`isolation`]: CRIU dumps
//! and restores that namespace), a session leader, with stdin/stdout/stderr on /dev/null, cwd
//! `/`, and an environment of `PATH` plus what the request adds. The agent is its parent.
//!
//! The agent is also a child subreaper (`PR_SET_CHILD_SUBREAPER`): a tree CRIU restores with
//! `--restore-detached`, CRIU run as the agent's child, is orphaned when CRIU exits and so
//! reparented to the agent, which then reaps it ([`Runtime::adopt`]).
//!
//! Reaping: tokio::process reaps its own children, so this runtime never waits for "any
//! child": only `waitpid(pid, WNOHANG)` for the PIDs it knows, on every SIGCHLD and on a slow
//! periodic sweep.
//!
//! Restarts: every entry (the whole [`Entry`], serialized, so fields added later persist too)
//! is written to `<state_dir>/runtime.json` after every change ([`store`]). A new agent loads
//! it and re-adopts every tree whose PID still has the recorded start time; such a tree is no
//! longer its child (it was reparented when the old agent died), so its exit is noticed by
//! the start-time check ([`try_reap`]: a PID that is gone, reused, or a zombie has ended). A
//! process found inside a container's namespace that no record names (the agent died between
//! a spawn and the write) is adopted too, with origin `adopted` ([`Runtime::adopt_found`]).
//! An agent that stops (SIGTERM) leaves every tree running ([`Runtime::detach`]); only the
//! explicit teardown kills them ([`Runtime::shutdown`]).

pub mod api;
pub mod driver;
pub mod isolation;
pub mod podman;
pub mod runc;
pub mod store;

use std::{
    collections::{BTreeMap, HashMap},
    ffi::{CString, c_char, c_int, c_void},
    io,
    net::Ipv4Addr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard, Weak},
    time::Duration,
};

use ferry_api::run::{ContainerProcess, Fence, FenceSide, RuntimeKind, StartRequest};
use serde::{Deserialize, Serialize};
use tokio::{
    signal::unix::{SignalKind, signal},
    task::JoinHandle,
};
use tracing::{info, warn};

pub use driver::{Driver, RuncRecord};
pub use isolation::{Isolation, MountPlan};

/// `PATH` of every started process (the request may add variables, or replace this one).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// How often known PIDs are checked even without a SIGCHLD (a safety net).
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(2);
/// How long [`Runtime::stop`] and [`Runtime::shutdown`] wait for a SIGKILLed root to be reaped.
pub const KILL_WAIT: Duration = Duration::from_secs(5);
/// Largest argv / env, in elements.
pub const MAX_ARGS: usize = 4096;
/// Longest argument, variable name or value: the kernel's `MAX_ARG_STRLEN` (32 pages), past
/// which execve fails with E2BIG.
pub const MAX_ARG_LEN: usize = 128 * 1024;
/// Stack of the cloned child before it execs (it only makes a handful of system calls).
const CHILD_STACK: usize = 64 * 1024;

pub const ORIGIN_STARTED: &str = "started";
pub const ORIGIN_RESTORED: &str = "restored";
/// A Podman container's tree, found by its address when it was first moved.
pub const ORIGIN_PODMAN: &str = "podman";
/// Found running inside a container's namespace at start, with no record of it.
pub const ORIGIN_ADOPTED: &str = "adopted";
/// What an entry's `ended` says when its tree ended while no agent watched it.
pub const ENDED_UNWATCHED: &str = "ended while the agent was down (exit status unknown)";

/// Why the runtime refused or failed. [`RuntimeError::code`] is the API error code.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("container {ip} is not built on host {host}")]
    NotLocal { ip: Ipv4Addr, host: String },
    #[error("container {ip} already has a running process (PID {pid}, {origin}) on host {host}")]
    Conflict {
        ip: Ipv4Addr,
        pid: i32,
        origin: String,
        host: String,
    },
    #[error("container {ip} is being started on host {host}")]
    Starting { ip: Ipv4Addr, host: String },
    #[error("{0}")]
    BadRequest(String),
    #[error("container {ip} has no process on host {host}")]
    NoProcess { ip: Ipv4Addr, host: String },
    #[error("starting {program} in container {ip}: {what}: {source}")]
    SpawnFailed {
        ip: Ipv4Addr,
        program: String,
        what: &'static str,
        source: io::Error,
    },
    #[error(
        "image {image} is not on host {host} (no directory {image} in {}): build it there \
         (`ferry-lab image build`)",
        dir.display()
    )]
    NoImage {
        image: String,
        dir: PathBuf,
        host: String,
    },
    #[error("runtime {runtime} is not available on host {host}: {why}")]
    Unavailable {
        runtime: RuntimeKind,
        host: String,
        why: String,
    },
}

impl RuntimeError {
    /// The API error code.
    pub fn code(&self) -> &'static str {
        match self {
            RuntimeError::NotLocal { .. } => "not_local",
            RuntimeError::Conflict { .. } | RuntimeError::Starting { .. } => "conflict",
            RuntimeError::BadRequest(_) => "bad_request",
            RuntimeError::NoProcess { .. } => "no_process",
            RuntimeError::SpawnFailed { .. } => "spawn_failed",
            RuntimeError::NoImage { .. } => "no_image",
            RuntimeError::Unavailable { .. } => "runtime_unavailable",
        }
    }

    /// The HTTP status the API answers this error with.
    pub fn http_status(&self) -> u16 {
        match self {
            RuntimeError::NotLocal { .. }
            | RuntimeError::NoProcess { .. }
            | RuntimeError::NoImage { .. } => 404,
            RuntimeError::Conflict { .. } | RuntimeError::Starting { .. } => 409,
            RuntimeError::BadRequest(_) => 400,
            RuntimeError::SpawnFailed { .. } => 500,
            RuntimeError::Unavailable { .. } => 501,
        }
    }
}

/// Checks a start request: argv non-empty, an absolute program path, no NUL bytes anywhere,
/// environment names non-empty without `=`. Returns the environment to exec with: `PATH`
/// first (replaced if the request sets it), then the request's variables in order (a name
/// given twice: the last value wins).
pub fn validate(req: &StartRequest) -> Result<Vec<(String, String)>, RuntimeError> {
    let bad = |m: String| Err(RuntimeError::BadRequest(m));
    let Some(program) = req.argv.first() else {
        return bad("argv is empty: want the program's absolute path and its arguments".into());
    };
    if req.argv.len() > MAX_ARGS || req.env.len() > MAX_ARGS {
        return bad(format!(
            "at most {MAX_ARGS} arguments and {MAX_ARGS} variables"
        ));
    }
    if !program.starts_with('/') {
        return bad(format!(
            "argv[0] {program:?} is not an absolute path (the runtime does not search PATH)"
        ));
    }
    if let Some(i) = req.argv.iter().position(|a| a.contains('\0')) {
        return bad(format!("argv[{i}] contains a NUL byte"));
    }
    if let Some(i) = req.argv.iter().position(|a| a.len() >= MAX_ARG_LEN) {
        return bad(format!(
            "argv[{i}] is {} bytes long: at most {} (the kernel's limit)",
            req.argv[i].len(),
            MAX_ARG_LEN - 1
        ));
    }
    if let Some(i) = req
        .env
        .iter()
        .position(|(k, v)| k.len() + 1 + v.len() >= MAX_ARG_LEN)
    {
        return bad(format!(
            "env[{i}] ({}) is too long: NAME=value at most {} bytes (the kernel's limit)",
            req.env[i].0.chars().take(32).collect::<String>(),
            MAX_ARG_LEN - 1
        ));
    }
    let mut env: Vec<(String, String)> = vec![("PATH".into(), DEFAULT_PATH.into())];
    for (i, (k, v)) in req.env.iter().enumerate() {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return bad(format!(
                "env[{i}]: the name {k:?} is empty or contains `=` or a NUL byte"
            ));
        }
        if v.contains('\0') {
            return bad(format!("env[{i}] ({k}): the value contains a NUL byte"));
        }
        match env.iter_mut().find(|(n, _)| n == k) {
            Some(slot) => slot.1 = v.clone(),
            None => env.push((k.clone(), v.clone())),
        }
    }
    Ok(env)
}

/// How a wait status reads in [`ContainerProcess::ended`]: `exited N` / `killed by SIGNAME`.
pub fn describe_status(status: c_int) -> String {
    if libc::WIFEXITED(status) {
        format!("exited {}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        let core = if libc::WCOREDUMP(status) {
            " (core dumped)"
        } else {
            ""
        };
        format!("killed by {}{core}", signal_name(libc::WTERMSIG(status)))
    } else {
        format!("wait status {status:#x}")
    }
}

/// `SIGKILL` for 9, …; `signal N` for the ones without a name here.
pub fn signal_name(sig: c_int) -> String {
    let name = match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGSTKFLT => "SIGSTKFLT",
        libc::SIGCHLD => "SIGCHLD",
        libc::SIGCONT => "SIGCONT",
        libc::SIGSTOP => "SIGSTOP",
        libc::SIGTSTP => "SIGTSTP",
        libc::SIGTTIN => "SIGTTIN",
        libc::SIGTTOU => "SIGTTOU",
        libc::SIGURG => "SIGURG",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGXFSZ => "SIGXFSZ",
        libc::SIGVTALRM => "SIGVTALRM",
        libc::SIGPROF => "SIGPROF",
        libc::SIGWINCH => "SIGWINCH",
        libc::SIGIO => "SIGIO",
        libc::SIGPWR => "SIGPWR",
        libc::SIGSYS => "SIGSYS",
        other => return format!("signal {other}"),
    };
    name.to_owned()
}

/// One known process tree. Persisted whole (see the module's doc): a field added here is
/// carried across agent restarts too (give it `#[serde(default)]` so older files still load).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub proc: ContainerProcess,
    /// Field 22 of /proc/PID/stat when it became known: a PID that no longer has this start
    /// time is not ours any more.
    #[serde(default)]
    pub start_time: Option<u64>,
    /// A stop was asked for: its exit is expected.
    #[serde(default)]
    pub stopping: bool,
    /// A runc container: its id and bundle (`proc.runtime` says runc).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runc: Option<RuncRecord>,
}

/// Which runtime runs a tree, and on what.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Kind {
    pub runtime: RuntimeKind,
    pub image: Option<String>,
    pub runc: Option<RuncRecord>,
}

impl Entry {
    /// A running tree rooted at `pid` in container `ip`, known since `start_time`.
    fn running(
        ip: Ipv4Addr,
        pid: i32,
        argv: Vec<String>,
        origin: &str,
        start_time: Option<u64>,
        kind: Kind,
    ) -> Self {
        Self {
            proc: ContainerProcess {
                container: ip,
                pid,
                argv,
                origin: origin.into(),
                running: true,
                ended: None,
                fenced: None,
                runtime: kind.runtime,
                image: kind.image,
            },
            start_time,
            stopping: false,
            runc: kind.runc,
        }
    }

    /// Which runtime runs it.
    pub fn kind(&self) -> Kind {
        Kind {
            runtime: self.proc.runtime,
            image: self.proc.image.clone(),
            runc: self.runc.clone(),
        }
    }
}

#[derive(Default)]
struct State {
    procs: BTreeMap<Ipv4Addr, Entry>,
    /// Containers with a start in progress (their slot is reserved).
    starting: std::collections::BTreeSet<Ipv4Addr>,
    /// Trees CRIU dumped and killed, forgotten but still to be reaped: PID → container.
    checkpointed: CheckpointedTrees,
    /// Containers with a CRIU operation (checkpoint or restore) in progress.
    busy: std::collections::BTreeSet<Ipv4Addr>,
    /// Dumped trees whose memory CRIU still serves to a destination (lazy memory): seized by
    /// CRIU, neither resumed nor killed until it is done (see `crate::fencing`).
    serving_pages: std::collections::BTreeSet<Ipv4Addr>,
    /// Dumped trees whose UDP sockets the checkpoint widened (`crate::criu::udpq`): given
    /// their sizes back if the tree runs again here (a rollback), forgotten otherwise.
    udp_widened: BTreeMap<Ipv4Addr, Vec<crate::criu::udpq::Widened>>,
}

/// PID → (container, start time) of trees CRIU dumped and killed.
type CheckpointedTrees = HashMap<i32, (Ipv4Addr, Option<u64>)>;

/// A tree CRIU dumped and killed, still to be reaped (persisted form).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpointed {
    pub pid: i32,
    pub container: Ipv4Addr,
    #[serde(default)]
    pub start_time: Option<u64>,
}

/// The runtime's state file (`runtime.json`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Saved {
    #[serde(default)]
    pub host: String,
    #[serde(default)]
    pub procs: BTreeMap<Ipv4Addr, Entry>,
    #[serde(default)]
    pub checkpointed: Vec<Checkpointed>,
}

impl State {
    fn saved(&self, host: &str) -> Saved {
        let mut checkpointed: Vec<Checkpointed> = self
            .checkpointed
            .iter()
            .map(|(pid, (ip, start))| Checkpointed {
                pid: *pid,
                container: *ip,
                start_time: *start,
            })
            .collect();
        checkpointed.sort_by_key(|c| c.pid);
        Saved {
            host: host.to_owned(),
            procs: self.procs.clone(),
            checkpointed,
        }
    }
}

/// What a new agent makes of a saved state: every running entry whose process is still the
/// same (`alive(pid, start_time)`) stays running (re-adopted); the others are marked ended
/// ([`ENDED_UNWATCHED`]). Checkpointed trees already gone are forgotten. Pure, for tests.
pub fn readopt(
    saved: Saved,
    alive: impl Fn(i32, Option<u64>) -> bool,
) -> (BTreeMap<Ipv4Addr, Entry>, CheckpointedTrees) {
    let mut procs = saved.procs;
    for e in procs.values_mut() {
        if e.proc.running && !alive(e.proc.pid, e.start_time) {
            e.proc.running = false;
            e.proc.ended = Some(ENDED_UNWATCHED.into());
        }
    }
    let checkpointed = saved
        .checkpointed
        .into_iter()
        .filter(|c| alive(c.pid, c.start_time))
        .map(|c| (c.pid, (c.container, c.start_time)))
        .collect();
    (procs, checkpointed)
}

/// A process found in a container's namespace: PID, parent PID, start time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    pub pid: i32,
    pub ppid: i32,
    pub start_time: u64,
}

/// The root of the tree among the processes found in one namespace: one whose parent is not
/// among them (the oldest if several). Pure, for tests.
pub fn pick_root(found: &[Found]) -> Option<Found> {
    found
        .iter()
        .filter(|f| !found.iter().any(|o| o.pid == f.ppid))
        .min_by_key(|f| (f.start_time, f.pid))
        .copied()
}

struct Inner {
    host: String,
    state: Mutex<State>,
    reaper: Mutex<Option<JoinHandle<()>>>,
    /// Where the state is kept across restarts (`None`: in memory only).
    store: Option<store::Store>,
    agent: driver::AgentDriver,
    /// The runc runtime, or why it is not available.
    runc: Result<runc::RuncDriver, String>,
    /// The Podman runtime, or why it is not available.
    podman: Result<podman::PodmanDriver, String>,
}

/// Where runc is and what it runs, and the host's Podman (the agent's `[runtime]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuncOptions {
    pub binary: PathBuf,
    pub images_dir: PathBuf,
    /// `[runtime.podman]` (`None`: no Podman runtime).
    pub podman: Option<podman::Settings>,
}

impl RuncOptions {
    pub fn from_config(cfg: &ferry_config::AgentConfig) -> Self {
        let p = &cfg.runtime.podman;
        Self {
            binary: cfg.runtime.runc.clone(),
            images_dir: cfg.runtime.images_dir.clone(),
            podman: Some(podman::Settings {
                binary: p.binary.clone(),
                args: p.args.clone(),
                containers_conf: p.containers_conf.clone(),
            }),
        }
    }
}

/// The agent's container runtime. Cheap to clone (an `Arc` inside).
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime")
            .field("host", &self.inner.host)
            .field("processes", &self.list().len())
            .finish()
    }
}

/// What one `waitpid(pid, WNOHANG)` found.
enum Reaped {
    Running,
    Ended(String),
}

/// Reaps `pid` if it has ended. A PID that is not (or not yet) our child is checked by its
/// start time instead: gone (or reused) means ended, status unknown.
fn try_reap(pid: i32, start_time: Option<u64>) -> Reaped {
    let mut status: c_int = 0;
    loop {
        // SAFETY: waitpid on one specific PID; `status` is a valid out pointer.
        let rc = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if rc == pid {
            return Reaped::Ended(describe_status(status));
        }
        if rc == 0 {
            return Reaped::Running;
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            // Not our child (a restored tree whose CRIU has not exited yet, or never
            // reparented): alive as long as the same process holds the PID.
            Some(libc::ECHILD) => {
                return if same_process(pid, start_time) {
                    Reaped::Running
                } else {
                    Reaped::Ended("ended (not a child of this agent: exit status unknown)".into())
                };
            }
            _ => return Reaped::Ended(format!("ended (waitpid: {e})")),
        }
    }
}

/// Field 22 (starttime) of /proc/PID/stat.
fn start_time(pid: i32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm may contain anything: fields are counted after its closing parenthesis.
    let rest = &text[text.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

/// State (field 3) of /proc/PID/stat.
fn proc_state(pid: i32) -> Option<char> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    text[text.rfind(')')? + 1..]
        .split_whitespace()
        .next()?
        .chars()
        .next()
}

/// Does `pid` still name the (living: not a zombie) process that had `start_time`?
fn same_process(pid: i32, start: Option<u64>) -> bool {
    let same = match (start_time(pid), start) {
        (Some(now), Some(then)) => now == then,
        (Some(_), None) => true,
        (None, _) => false,
    };
    same && !matches!(proc_state(pid), Some('Z' | 'X') | None)
}

/// Sends `sig` to `pid` if it is still the same process. Err(ESRCH) if it is gone.
fn signal_pid(pid: i32, start: Option<u64>, sig: c_int) -> io::Result<()> {
    if !same_process(pid, start) {
        return Err(io::Error::from_raw_os_error(libc::ESRCH));
    }
    // SAFETY: kill(2) with a positive PID (checked by the callers' bookkeeping) and a signal.
    if unsafe { libc::kill(pid, sig) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

impl Runtime {
    /// Makes the agent a child subreaper and starts the reaper task. With `state_dir`, the
    /// runtime's state is kept in `state_dir/runtime.json`, and the trees recorded there that
    /// still run are re-adopted now. Call inside the tokio runtime.
    pub fn new(
        host: &str,
        state_dir: Option<&Path>,
        isolation: Isolation,
        runc: Option<RuncOptions>,
    ) -> anyhow::Result<Self> {
        // SAFETY: prctl with integer arguments; affects only this process.
        let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1 as libc::c_ulong, 0, 0, 0) };
        if rc != 0 {
            anyhow::bail!(
                "prctl(PR_SET_CHILD_SUBREAPER): {}",
                io::Error::last_os_error()
            );
        }
        let mut sigchld = signal(SignalKind::child())?;
        let store = state_dir.map(store::Store::open).transpose()?;
        let mut state = State::default();
        if let Some(saved) = store
            .as_ref()
            .map(|s| s.load::<Saved>())
            .transpose()?
            .flatten()
        {
            let (procs, checkpointed) = readopt(saved, same_process);
            for (ip, e) in &procs {
                if e.proc.running {
                    info!(container = %ip, pid = e.proc.pid, origin = %e.proc.origin, "process tree re-adopted from the state file");
                } else if e.proc.ended.as_deref() == Some(ENDED_UNWATCHED) {
                    warn!(container = %ip, pid = e.proc.pid, origin = %e.proc.origin, "process tree ended while no agent ran");
                }
            }
            state.procs = procs;
            state.checkpointed = checkpointed;
        }
        let podman = match runc.as_ref().and_then(|o| o.podman.clone()) {
            None => Err("not configured".to_owned()),
            Some(p) if !p.binary.exists() => Err(format!(
                "{} is missing (install Debian's podman)",
                p.binary.display()
            )),
            Some(settings) => Ok(podman::PodmanDriver {
                host: host.to_owned(),
                settings,
            }),
        };
        let runc = match (runc, state_dir) {
            (None, _) => Err("not configured".to_owned()),
            (Some(_), None) => Err("the runtime has no state directory".to_owned()),
            (Some(o), Some(_)) if !o.binary.exists() => Err(format!(
                "{} is missing (install Debian's runc)",
                o.binary.display()
            )),
            (Some(o), Some(dir)) => Ok(runc::RuncDriver {
                host: host.to_owned(),
                settings: runc::Settings {
                    binary: o.binary,
                    images_dir: o.images_dir,
                    dir: dir.join("runc"),
                },
                isolation: isolation.clone(),
            }),
        };
        let inner = Arc::new(Inner {
            host: host.to_owned(),
            state: Mutex::new(state),
            reaper: Mutex::new(None),
            store,
            agent: driver::AgentDriver {
                host: host.to_owned(),
                isolation,
            },
            runc,
            podman,
        });
        let weak: Weak<Inner> = Arc::downgrade(&inner);
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = sigchld.recv() => {}
                    _ = tick.tick() => {}
                }
                match weak.upgrade() {
                    Some(inner) => Runtime { inner }.sweep(),
                    None => return,
                }
            }
        });
        *inner.reaper.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
        let rt = Self { inner };
        rt.save(&rt.lock());
        Ok(rt)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands the state over to be written (after every change; see the module's doc).
    fn save(&self, st: &State) {
        if let Some(store) = &self.inner.store {
            store.save(&st.saved(&self.inner.host));
        }
    }

    /// Waits until the state file holds the latest state (off the tokio workers).
    async fn flush(&self) {
        let inner = self.inner.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(store) = &inner.store {
                store.flush();
            }
        })
        .await;
    }

    /// Container `ip`'s namespace holds processes the runtime has no running entry for (the
    /// agent restarted between a spawn and the state's write, or something else started
    /// them): the root of their tree ([`pick_root`]) is recorded with origin `adopted`, so
    /// it is watched, stopped and persisted like any other. Returns it, if one was adopted.
    pub fn adopt_found(&self, ip: Ipv4Addr, pids: &[i32]) -> Option<ContainerProcess> {
        let found: Vec<Found> = pids
            .iter()
            .filter_map(|&pid| {
                let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
                let rest: Vec<&str> = text[text.rfind(')')? + 1..].split_whitespace().collect();
                Some(Found {
                    pid,
                    ppid: rest.get(1)?.parse().ok()?,
                    start_time: rest.get(19)?.parse().ok()?,
                })
            })
            .collect();
        let mut st = self.lock();
        if let Some(e) = st.procs.get(&ip).filter(|e| e.proc.running)
            && pids.contains(&e.proc.pid)
        {
            return None;
        }
        let root = pick_root(&found)?;
        let argv: Vec<String> = std::fs::read(format!("/proc/{}/cmdline", root.pid))
            .map(|raw| {
                raw.split(|b| *b == 0)
                    .filter(|a| !a.is_empty())
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect()
            })
            .unwrap_or_default();
        let entry = Entry::running(
            ip,
            root.pid,
            argv,
            ORIGIN_ADOPTED,
            Some(root.start_time),
            Kind::default(),
        );
        let proc = entry.proc.clone();
        st.procs.insert(ip, entry);
        self.save(&st);
        drop(st);
        warn!(container = %ip, pid = root.pid, argv = ?proc.argv, "unrecorded process tree found in the container's namespace: adopted");
        Some(proc)
    }

    /// The host this runtime runs on (for messages).
    pub fn host(&self) -> &str {
        &self.inner.host
    }

    /// Checks every known PID once: records exits, reaps what ended.
    fn sweep(&self) {
        let mut st = self.lock();
        let State {
            procs,
            checkpointed,
            ..
        } = &mut *st;
        let mut changed = false;
        for (ip, e) in procs.iter_mut().filter(|(_, e)| e.proc.running) {
            if let Reaped::Ended(how) = try_reap(e.proc.pid, e.start_time) {
                changed = true;
                let p = &mut e.proc;
                p.running = false;
                p.ended = Some(how.clone());
                if e.stopping {
                    info!(container = %ip, pid = p.pid, origin = %p.origin, status = %how, "container process stopped");
                } else {
                    warn!(container = %ip, pid = p.pid, origin = %p.origin, status = %how, "container process ended");
                }
            }
        }
        checkpointed.retain(|pid, (ip, start)| match try_reap(*pid, *start) {
            Reaped::Running => true,
            Reaped::Ended(how) => {
                changed = true;
                info!(container = %ip, pid, status = %how, "checkpointed process tree ended, as expected");
                false
            }
        });
        if changed {
            self.save(&st);
        }
    }

    /// The driver of runtime `kind` (netavark's `get_network_driver`): refused with why if
    /// this agent cannot run it.
    pub fn driver(&self, kind: RuntimeKind) -> Result<&dyn Driver, RuntimeError> {
        match kind {
            RuntimeKind::Agent => Ok(&self.inner.agent),
            RuntimeKind::Runc => match &self.inner.runc {
                Ok(d) => Ok(d),
                Err(why) => Err(RuntimeError::Unavailable {
                    runtime: kind,
                    host: self.inner.host.clone(),
                    why: why.clone(),
                }),
            },
            RuntimeKind::Podman => match &self.inner.podman {
                Ok(d) => Ok(d),
                Err(why) => Err(RuntimeError::Unavailable {
                    runtime: kind,
                    host: self.inner.host.clone(),
                    why: why.clone(),
                }),
            },
        }
    }

    /// A container Podman runs on this host (on a ferry-cni network, address `ip`) that the
    /// runtime does not know yet: adopted (origin `podman`), so the CRIU path can move it.
    /// `Ok(None)`: Podman is not configured here, or runs no container with that address.
    /// Blocking (runs Podman).
    pub fn adopt_podman(&self, ip: Ipv4Addr) -> Result<Option<Entry>, RuntimeError> {
        let Ok(driver) = &self.inner.podman else {
            return Ok(None);
        };
        if let Some(e) = self.entry(ip).filter(|e| e.proc.running) {
            return Ok(Some(e));
        }
        let found = driver.find(ip).map_err(|e| RuntimeError::SpawnFailed {
            ip,
            program: "podman".into(),
            what: "listing Podman's containers",
            source: e,
        })?;
        let Some(f) = found.filter(|f| f.running && f.pid > 1) else {
            return Ok(None);
        };
        let start = start_time(f.pid);
        let kind = Kind {
            runtime: RuntimeKind::Podman,
            image: f.image,
            runc: Some(RuncRecord {
                id: f.id,
                bundle: f.static_dir,
            }),
        };
        let mut st = self.lock();
        if st.starting.contains(&ip) || st.procs.get(&ip).is_some_and(|e| e.proc.running) {
            return Ok(st.procs.get(&ip).cloned());
        }
        let entry = Entry::running(ip, f.pid, f.argv, ORIGIN_PODMAN, start, kind);
        st.procs.insert(ip, entry.clone());
        self.save(&st);
        info!(container = %ip, pid = f.pid, origin = ORIGIN_PODMAN, "Podman container adopted");
        Ok(Some(entry))
    }

    /// Starts `req.argv` in container `ip`, inside its network namespace `netns`, under the
    /// runtime the request names: the agent's own (PID 1 of a new PID namespace, see the
    /// module's doc) or runc (an OCI container on an image).
    pub async fn start(
        &self,
        ip: Ipv4Addr,
        netns: &Path,
        req: &StartRequest,
    ) -> Result<ContainerProcess, RuntimeError> {
        let env = self.driver(req.runtime)?.validate(ip, req)?;
        {
            let mut st = self.lock();
            if let Some(e) = st.procs.get(&ip).filter(|e| e.proc.running) {
                return Err(RuntimeError::Conflict {
                    ip,
                    pid: e.proc.pid,
                    origin: e.proc.origin.clone(),
                    host: self.inner.host.clone(),
                });
            }
            if !st.starting.insert(ip) {
                return Err(RuntimeError::Starting {
                    ip,
                    host: self.inner.host.clone(),
                });
            }
        }
        let rt = self.clone();
        let (ns, r) = (netns.to_owned(), req.clone());
        let started =
            tokio::task::spawn_blocking(move || rt.driver(r.runtime)?.start(ip, &ns, &r, env))
                .await
                .unwrap_or_else(|e| {
                    Err(RuntimeError::SpawnFailed {
                        ip,
                        program: req.argv[0].clone(),
                        what: "the start task",
                        source: io::Error::other(e),
                    })
                });
        let mut st = self.lock();
        st.starting.remove(&ip);
        let started = started?;
        let pid = started.pid;
        let kind = Kind {
            runtime: req.runtime,
            image: req.image.clone(),
            runc: started.runc,
        };
        let entry = Entry::running(
            ip,
            pid,
            req.argv.clone(),
            ORIGIN_STARTED,
            start_time(pid),
            kind,
        );
        let proc = entry.proc.clone();
        st.procs.insert(ip, entry);
        self.save(&st);
        drop(st);
        info!(container = %ip, pid, origin = ORIGIN_STARTED, runtime = %req.runtime, argv = ?req.argv, "container process started");
        // A SIGCHLD that came before the PID was known found nothing to reap.
        self.sweep();
        Ok(self.get(ip).unwrap_or(proc))
    }

    /// The directory of runc image `name` on this host (refused if runc is not available or
    /// the image is not there).
    pub fn has_image(&self, name: &str) -> Result<PathBuf, RuntimeError> {
        match &self.inner.runc {
            Ok(d) => d.image(name),
            Err(why) => Err(RuntimeError::Unavailable {
                runtime: RuntimeKind::Runc,
                host: self.inner.host.clone(),
                why: why.clone(),
            }),
        }
    }

    /// The whole entry of container `ip` (for the CRIU path: which runtime, which tree).
    pub fn entry(&self, ip: Ipv4Addr) -> Option<Entry> {
        self.lock().procs.get(&ip).cloned()
    }

    /// The container's process (running or ended), if the runtime knows one.
    pub fn get(&self, ip: Ipv4Addr) -> Option<ContainerProcess> {
        self.lock().procs.get(&ip).map(|e| e.proc.clone())
    }

    /// Every known process, by container address.
    pub fn list(&self) -> Vec<ContainerProcess> {
        self.lock().procs.values().map(|e| e.proc.clone()).collect()
    }

    /// PID of the container's root process, while it runs (a fenced copy does not count:
    /// it is stopped and waits for the registry's decision).
    pub fn pid(&self, ip: Ipv4Addr) -> Option<i32> {
        self.lock()
            .procs
            .get(&ip)
            .filter(|e| e.proc.running && e.proc.fenced.is_none())
            .map(|e| e.proc.pid)
    }

    /// The container's tree is now a stopped copy waiting for the registry's decision
    /// ([`Fence`]). Returns false if the runtime knows no live tree for it.
    pub fn fence(&self, ip: Ipv4Addr, fence: Fence) -> bool {
        let mut st = self.lock();
        let Some(e) = st.procs.get_mut(&ip).filter(|e| e.proc.running) else {
            return false;
        };
        info!(container = %ip, pid = e.proc.pid, migration = %fence.migration, side = fence.side.as_str(), "process tree fenced: stopped until the registry decides");
        e.proc.fenced = Some(fence);
        self.save(&st);
        true
    }

    /// The fenced tree of `ip` became the owner and runs again.
    pub fn unfence(&self, ip: Ipv4Addr) {
        let mut st = self.lock();
        if let Some(e) = st.procs.get_mut(&ip)
            && let Some(f) = e.proc.fenced.take()
        {
            info!(container = %ip, pid = e.proc.pid, migration = %f.migration, side = f.side.as_str(), "process tree runs: it owns the container");
            self.save(&st);
        }
    }

    /// Fenced trees that are still alive.
    pub fn fenced(&self) -> Vec<ContainerProcess> {
        self.sweep();
        self.lock()
            .procs
            .values()
            .filter(|e| e.proc.running && e.proc.fenced.is_some())
            .map(|e| e.proc.clone())
            .collect()
    }

    /// A fenced copy that will never own the container: killed by its runtime (SIGKILL to
    /// its root, which kills its PID namespace; a socket closed in repair mode sends
    /// nothing; runc's state and cgroups go too), then forgotten like a checkpointed tree
    /// (its exit is still reaped).
    pub async fn kill_fenced(&self, ip: Ipv4Addr) -> io::Result<()> {
        let Some(entry) = self
            .entry(ip)
            .filter(|e| e.proc.running && e.proc.fenced.is_some())
        else {
            return Ok(());
        };
        let rt = self.clone();
        tokio::task::spawn_blocking(move || {
            rt.driver(entry.proc.runtime)
                .map_err(io::Error::other)?
                .kill(&entry)
        })
        .await
        .map_err(io::Error::other)??;
        self.checkpointed(ip);
        Ok(())
    }

    /// A fenced copy that owns the container runs again, through its runtime (the source's:
    /// repair mode off on every connection, then SIGCONT; the destination's: SIGCONT).
    /// Returns (tasks, connections). The caller unfences it once it runs.
    pub async fn resume_fenced(&self, ip: Ipv4Addr) -> io::Result<(usize, usize)> {
        let Some(entry) = self.entry(ip).filter(|e| e.proc.running) else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("container {ip} has no live tree here"),
            ));
        };
        let side = entry
            .proc
            .fenced
            .as_ref()
            .map_or(FenceSide::Source, |f| f.side);
        let widened = self.lock().udp_widened.remove(&ip).unwrap_or_default();
        let rt = self.clone();
        tokio::task::spawn_blocking(move || {
            // A source that runs again: its UDP sockets get their own sizes back (their
            // queues, which the widened buffers let grow meanwhile, stay to be read).
            if side == FenceSide::Source {
                crate::criu::udpq::give_back(entry.proc.pid, ip, &widened);
            }
            rt.driver(entry.proc.runtime)
                .map_err(io::Error::other)?
                .resume(&entry, side)
        })
        .await
        .map_err(io::Error::other)?
    }

    /// What the runtime kept of `entry`'s tree, which ended (runc: state, cgroups, bundle),
    /// removed off the tokio workers.
    async fn remove(&self, entry: Entry) {
        if entry.proc.runtime == RuntimeKind::Agent {
            return;
        }
        let rt = self.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if let Ok(d) = rt.driver(entry.proc.runtime) {
                d.remove(&entry);
            }
        })
        .await;
    }

    /// Claims `ip` for one CRIU operation (checkpoint or restore); released when the guard
    /// drops. `None`: one is already in progress.
    pub fn claim(&self, ip: Ipv4Addr) -> Option<Claim> {
        self.lock().busy.insert(ip).then(|| Claim {
            runtime: self.clone(),
            ip,
        })
    }

    /// Is a CRIU operation on `ip` in progress?
    pub fn busy(&self, ip: Ipv4Addr) -> bool {
        self.lock().busy.contains(&ip)
    }

    /// The UDP sockets the checkpoint of `ip` widened (see [`State::udp_widened`]).
    pub fn remember_udp_widened(&self, ip: Ipv4Addr, widened: Vec<crate::criu::udpq::Widened>) {
        let mut st = self.lock();
        if widened.is_empty() {
            st.udp_widened.remove(&ip);
        } else {
            st.udp_widened.insert(ip, widened);
        }
    }

    /// CRIU serves (or stopped serving) the dumped tree's memory of `ip` (lazy memory).
    pub fn serving_pages(&self, ip: Ipv4Addr, serving: bool) {
        let mut st = self.lock();
        if serving {
            st.serving_pages.insert(ip);
        } else {
            st.serving_pages.remove(&ip);
        }
    }

    /// Is CRIU still serving the memory of `ip`'s dumped tree?
    pub fn is_serving_pages(&self, ip: Ipv4Addr) -> bool {
        self.lock().serving_pages.contains(&ip)
    }

    /// A tree CRIU restored on this host (origin `restored`) under the runtime `kind`
    /// says: reaped from now on.
    pub fn adopt(
        &self,
        ip: Ipv4Addr,
        pid: i32,
        argv: Vec<String>,
        kind: Kind,
    ) -> Result<(), RuntimeError> {
        if pid <= 1 {
            return Err(RuntimeError::BadRequest(format!(
                "PID {pid} cannot be a container's root"
            )));
        }
        let start = start_time(pid);
        if start.is_none() {
            return Err(RuntimeError::NoProcess {
                ip,
                host: self.inner.host.clone(),
            });
        }
        {
            let mut st = self.lock();
            if let Some(e) = st.procs.get(&ip).filter(|e| e.proc.running) {
                return Err(RuntimeError::Conflict {
                    ip,
                    pid: e.proc.pid,
                    origin: e.proc.origin.clone(),
                    host: self.inner.host.clone(),
                });
            }
            if st.starting.contains(&ip) {
                return Err(RuntimeError::Starting {
                    ip,
                    host: self.inner.host.clone(),
                });
            }
            let runtime = kind.runtime;
            st.procs.insert(
                ip,
                Entry::running(ip, pid, argv, ORIGIN_RESTORED, start, kind),
            );
            self.save(&st);
            info!(container = %ip, pid, origin = ORIGIN_RESTORED, %runtime, "restored process tree adopted");
        }
        self.sweep();
        Ok(())
    }

    /// CRIU dumped this container's tree and killed it: forget it; its exit is expected (and
    /// still reaped).
    pub fn checkpointed(&self, ip: Ipv4Addr) {
        let mut st = self.lock();
        let Some(e) = st.procs.remove(&ip) else {
            return;
        };
        info!(container = %ip, pid = e.proc.pid, origin = %e.proc.origin, running = e.proc.running, "process tree checkpointed: forgotten");
        if e.proc.running {
            st.checkpointed.insert(e.proc.pid, (ip, e.start_time));
        }
        self.save(&st);
        drop(st);
        self.sweep();
    }

    /// Stops the container's process: SIGTERM to the root, SIGKILL after `grace` (which kills
    /// its whole PID namespace), reaped. An already ended process is answered as it is.
    pub async fn stop(
        &self,
        ip: Ipv4Addr,
        grace: Duration,
    ) -> Result<ContainerProcess, RuntimeError> {
        let (pid, start) = {
            let mut st = self.lock();
            let Some(e) = st.procs.get_mut(&ip) else {
                return Err(RuntimeError::NoProcess {
                    ip,
                    host: self.inner.host.clone(),
                });
            };
            if !e.proc.running {
                return Ok(e.proc.clone());
            }
            e.stopping = true;
            let target = (e.proc.pid, e.start_time);
            self.save(&st);
            target
        };
        info!(container = %ip, pid, grace_ms = grace.as_millis() as u64, "stopping the container process");
        let _ = signal_pid(pid, start, libc::SIGTERM);
        if !self.wait_ended(ip, pid, grace).await {
            info!(container = %ip, pid, "still running after the grace period: SIGKILL");
            let _ = signal_pid(pid, start, libc::SIGKILL);
            if !self.wait_ended(ip, pid, KILL_WAIT).await {
                warn!(container = %ip, pid, "not reaped {} s after SIGKILL", KILL_WAIT.as_secs());
            }
        }
        if let Some(e) = self.entry(ip).filter(|e| !e.proc.running) {
            self.remove(e).await;
        }
        self.get(ip).ok_or(RuntimeError::NoProcess {
            ip,
            host: self.inner.host.clone(),
        })
    }

    /// Polls (10 ms) until the entry of `ip` with `pid` is no longer running, or `timeout`.
    async fn wait_ended(&self, ip: Ipv4Addr, pid: i32, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            self.sweep();
            let ended = self
                .lock()
                .procs
                .get(&ip)
                .is_none_or(|e| e.proc.pid != pid || !e.proc.running);
            if ended {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// An agent that stops without tearing down (SIGTERM: an upgrade or a restart): every
    /// tree keeps running; the reaper stops and the state file is brought up to date, for the
    /// next agent to re-adopt.
    pub async fn detach(&self) {
        self.sweep();
        self.stop_reaper_and_save().await;
        let running = self.list().iter().filter(|p| p.running).count();
        info!(
            running,
            "runtime detached: process trees left running for the next agent"
        );
    }

    /// The explicit teardown (or a failed start): SIGKILLs every known root (which kills its
    /// PID namespace) and reaps them; stops the reaper.
    pub async fn shutdown(&self) {
        let targets: Vec<(Ipv4Addr, i32, Option<u64>)> = {
            let mut st = self.lock();
            let mut v = Vec::new();
            for (ip, e) in st.procs.iter_mut().filter(|(_, e)| e.proc.running) {
                e.stopping = true;
                v.push((*ip, e.proc.pid, e.start_time));
            }
            v.extend(st.checkpointed.iter().map(|(pid, (ip, s))| (*ip, *pid, *s)));
            v
        };
        for (ip, pid, start) in &targets {
            info!(container = %ip, pid, "agent shutting down: SIGKILL to the container's process tree");
            let _ = signal_pid(*pid, *start, libc::SIGKILL);
        }
        let deadline = tokio::time::Instant::now() + KILL_WAIT;
        loop {
            self.sweep();
            let left: Vec<i32> = {
                let st = self.lock();
                st.procs
                    .values()
                    .filter(|e| e.proc.running)
                    .map(|e| e.proc.pid)
                    .chain(st.checkpointed.keys().copied())
                    .collect()
            };
            if left.is_empty() {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                warn!(pids = ?left, "container processes not reaped at shutdown");
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let others: Vec<Entry> = self
            .lock()
            .procs
            .values()
            .filter(|e| e.proc.runtime != RuntimeKind::Agent)
            .cloned()
            .collect();
        for e in others {
            self.remove(e).await;
        }
        self.stop_reaper_and_save().await;
    }

    /// Stops the reaper task and brings the state file up to date.
    async fn stop_reaper_and_save(&self) {
        let task = self
            .inner
            .reaper
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(t) = task {
            t.abort();
            let _ = t.await;
        }
        self.save(&self.lock());
        self.flush().await;
    }
}

/// One CRIU operation on a container's tree (see [`Runtime::claim`]).
pub struct Claim {
    runtime: Runtime,
    ip: Ipv4Addr,
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.runtime.lock().busy.remove(&self.ip);
    }
}

/// What the cloned child is given: only pointers to memory prepared before the clone (the
/// child is a copy of this one thread of a multi-threaded process, so it must not allocate
/// or take locks).
struct ChildArgs {
    path: *const c_char,
    argv: *const *const c_char,
    envp: *const *const c_char,
    status_fd: c_int,
    empty_mask: libc::sigset_t,
    plan: isolation::ChildPlan,
}

/// Stages the child reports, with the errno, on the status pipe (the isolation's own are
/// numbered from [`isolation::FIRST_STAGE`]).
const STAGE_SETSID: i32 = 1;
const STAGE_DUP2: i32 = 2;
const STAGE_CHDIR: i32 = 3;
const STAGE_EXEC: i32 = 4;
const STAGE_DEVNULL: i32 = 5;

fn stage_name(stage: i32) -> &'static str {
    match stage {
        STAGE_SETSID => "setsid",
        STAGE_DUP2 => "redirecting stdio to /dev/null",
        STAGE_CHDIR => "chdir /",
        STAGE_EXEC => "execve",
        STAGE_DEVNULL => "opening /dev/null",
        s => isolation::stage_name(s).unwrap_or("the child"),
    }
}

/// The child after clone(2): async-signal-safe system calls only, then execve.
extern "C" fn child_main(arg: *mut c_void) -> c_int {
    // SAFETY: `arg` points at the ChildArgs the parent keeps alive across clone(2); the child
    // has its own copy of that memory. Every call below is an async-signal-safe system call
    // wrapper on pointers and fds prepared before the clone; nothing allocates.
    unsafe {
        let a = &*(arg as *const ChildArgs);
        let fail = |stage: i32| -> ! {
            let report = [stage, *libc::__errno_location()];
            libc::write(
                a.status_fd,
                report.as_ptr().cast(),
                std::mem::size_of_val(&report),
            );
            libc::_exit(127)
        };
        // Signals: nothing blocked, nothing ignored (Rust ignores SIGPIPE; ignored
        // dispositions survive execve).
        libc::sigprocmask(libc::SIG_SETMASK, &a.empty_mask, std::ptr::null_mut());
        for sig in 1..65 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        if libc::setsid() < 0 {
            fail(STAGE_SETSID);
        }
        // The private mount namespace, then no privileges (see `isolation`).
        if let Err(stage) = isolation::enter_mount_namespace(&a.plan) {
            fail(stage);
        }
        // Opened in the new namespace: CRIU resolves an fd's mount in the tree's own.
        let devnull = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if devnull < 0 {
            fail(STAGE_DEVNULL);
        }
        for fd in 0..3 {
            if libc::dup2(devnull, fd) < 0 {
                fail(STAGE_DUP2);
            }
        }
        if devnull > 2 {
            libc::close(devnull);
        }
        if libc::chdir(c"/".as_ptr()) < 0 {
            fail(STAGE_CHDIR);
        }
        if let Err(stage) = isolation::drop_privileges(&a.plan) {
            fail(stage);
        }
        // No descriptor of the agent's leaks into the container (CRIU would have to dump it).
        libc::syscall(
            libc::SYS_close_range,
            3 as libc::c_uint,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC as libc::c_uint,
        );
        libc::execve(a.path, a.argv, a.envp);
        fail(STAGE_EXEC)
    }
}

/// Clones a child in new PID and mount namespaces (in the calling thread's network
/// namespace) that applies `plan`, becomes `uid`, and execs `argv` with `env`; returns its
/// PID once the exec succeeded. On failure: which step, and the error (the failed child is
/// reaped).
fn spawn_in_current_netns(
    argv: &[String],
    env: &[(String, String)],
    uid: u32,
    plan: &MountPlan,
) -> Result<i32, (&'static str, io::Error)> {
    let invalid = |what| (what, io::Error::from(io::ErrorKind::InvalidInput));
    // Everything the child touches, prepared now.
    let c_argv: Vec<CString> = argv
        .iter()
        .map(|a| CString::new(a.as_str()))
        .collect::<Result<_, _>>()
        .map_err(|_| invalid("argv"))?;
    let c_env: Vec<CString> = env
        .iter()
        .map(|(k, v)| CString::new(format!("{k}={v}")))
        .collect::<Result<_, _>>()
        .map_err(|_| invalid("env"))?;
    let mut argv_ptrs: Vec<*const c_char> = c_argv.iter().map(|c| c.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let mut env_ptrs: Vec<*const c_char> = c_env.iter().map(|c| c.as_ptr()).collect();
    env_ptrs.push(std::ptr::null());
    let lists = plan.pointers();
    // The agent's end and the child's (both close-on-exec): the child says its namespace is
    // private, the agent sends what to detach from it (see `isolation`).
    let (sync, child_sync) =
        std::os::unix::net::UnixStream::pair().map_err(|e| ("socketpair", e))?;
    let mut detach_buf = vec![0u8; isolation::DETACH_CAP];
    let mut fds = [0 as c_int; 2];
    // SAFETY: pipe2 writes two fds into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(("pipe2", io::Error::last_os_error()));
    }
    // SAFETY: both fds were just created by pipe2 and are owned by nobody else.
    let (status_r, status_w) =
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: sigemptyset initialises the set it is given.
    let empty_mask = unsafe {
        let mut m = std::mem::MaybeUninit::<libc::sigset_t>::uninit();
        libc::sigemptyset(m.as_mut_ptr());
        m.assume_init()
    };
    let args = ChildArgs {
        path: c_argv[0].as_ptr(),
        argv: argv_ptrs.as_ptr(),
        envp: env_ptrs.as_ptr(),
        status_fd: status_w.as_raw_fd(),
        empty_mask,
        plan: lists.child_plan(uid, child_sync.as_raw_fd(), &mut detach_buf),
    };
    let mut stack = vec![0u8; CHILD_STACK];
    // The stack grows down: its top, 16-byte aligned.
    let top = ((stack.as_mut_ptr() as usize + CHILD_STACK) & !15) as *mut c_void;
    // SAFETY: without CLONE_VM the child runs on its own copy of `stack` and of `args`, both
    // alive here until clone returns; child_main never returns (execve or _exit).
    let pid = unsafe {
        libc::clone(
            child_main,
            top,
            libc::CLONE_NEWPID | libc::CLONE_NEWNS | libc::SIGCHLD,
            &args as *const ChildArgs as *mut c_void,
        )
    };
    if pid < 0 {
        return Err((
            "clone(CLONE_NEWPID | CLONE_NEWNS)",
            io::Error::last_os_error(),
        ));
    }
    drop(status_w);
    drop(child_sync);
    drop(stack);
    drop(detach_buf);
    if let Err(e) = send_detach(sync, pid, plan) {
        // The child is waiting for the list (or gone): it must not run undetached.
        // SAFETY: signals our own child, not yet reaped (so its PID is not reused).
        unsafe { libc::kill(pid, libc::SIGKILL) };
        wait_for_child(pid);
        return Err(("reading the container's mount table", e));
    }
    // Until EOF: nothing means the exec succeeded (the pipe closed on exec).
    let mut report = [0u8; 8];
    let mut got = 0;
    while got < report.len() {
        // SAFETY: reads into the unread tail of `report`.
        let n = unsafe {
            libc::read(
                status_r.as_raw_fd(),
                report[got..].as_mut_ptr().cast(),
                report.len() - got,
            )
        };
        match n {
            0 => break,
            n if n > 0 => got += n as usize,
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    break;
                }
            }
        }
    }
    if got == 0 {
        return Ok(pid);
    }
    // The child failed before or at exec, and exits 127: reap it (the runtime never knew it).
    let status = wait_for_child(pid);
    if got < report.len() {
        return Err((
            "the child",
            io::Error::other(format!("failed ({})", describe_status(status))),
        ));
    }
    let stage = i32::from_ne_bytes(report[..4].try_into().expect("4 bytes"));
    let errno = i32::from_ne_bytes(report[4..].try_into().expect("4 bytes"));
    Err((stage_name(stage), io::Error::from_raw_os_error(errno)))
}

/// Reaps our own child `pid`, which has ended or is about to (blocking for the moment it takes
/// to exit); its wait status.
fn wait_for_child(pid: i32) -> c_int {
    let mut status = 0;
    // SAFETY: waits for our own child; `status` is a valid out pointer.
    while unsafe { libc::waitpid(pid, &mut status, 0) } < 0
        && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted
    {}
    status
}

/// The agent's side of the child's mount set-up: once the child says its namespace is
/// private, its own table gives what to detach. Ok also when the child failed before saying so
/// (its status pipe tells why); Err only when the table could not be read or sent to a child
/// that is waiting for it.
fn send_detach(
    mut sync: std::os::unix::net::UnixStream,
    pid: i32,
    plan: &MountPlan,
) -> io::Result<()> {
    use std::io::{Read as _, Write as _};
    let mut byte = [0u8; 1];
    loop {
        match sync.read(&mut byte) {
            // The child failed (or exited) before: its report says why.
            Ok(0) => return Ok(()),
            Ok(_) if byte[0] == isolation::PRIVATE_NOW => break,
            Ok(_) => return Err(io::Error::other("unexpected byte from the child")),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    let message = plan.detach_message(pid)?;
    let mut framed = (message.len() as u64).to_le_bytes().to_vec();
    framed.extend_from_slice(&message);
    match sync.write_all(&framed) {
        // The child died meanwhile: its status says why (or that it was killed).
        Err(e) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        r => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(argv: &[&str], env: &[(&str, &str)]) -> StartRequest {
        StartRequest {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            runtime: RuntimeKind::Agent,
            image: None,
        }
    }

    #[test]
    fn argv_is_checked() {
        let code = |r: &StartRequest| validate(r).err().map(|e| e.code());
        assert_eq!(code(&req(&[], &[])), Some("bad_request"));
        assert_eq!(code(&req(&["sleep", "1"], &[])), Some("bad_request"));
        assert_eq!(code(&req(&["./sleep"], &[])), Some("bad_request"));
        assert_eq!(code(&req(&["/bin/sleep", "1\0"], &[])), Some("bad_request"));
        assert_eq!(code(&req(&["/bin/sl\0eep"], &[])), Some("bad_request"));
        assert_eq!(code(&req(&["/bin/sleep", "", "x y"], &[])), None);
        let msg = validate(&req(&["sleep"], &[])).unwrap_err().to_string();
        assert!(msg.contains("absolute"), "{msg}");
        let long = "x".repeat(MAX_ARG_LEN);
        let msg = validate(&req(&["/bin/echo", &long], &[]))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("argv[1] is 131072 bytes long"), "{msg}");
        let msg = validate(&req(&["/bin/true"], &[("A", &long)]))
            .unwrap_err()
            .to_string();
        assert!(msg.contains("env[0] (A) is too long"), "{msg}");
        let fits = "x".repeat(MAX_ARG_LEN - 3);
        assert_eq!(code(&req(&["/bin/echo", &fits], &[("A", &fits)])), None);
    }

    #[test]
    fn env_is_path_plus_the_request() {
        let env = validate(&req(&["/bin/true"], &[])).unwrap();
        assert_eq!(env, vec![("PATH".to_string(), DEFAULT_PATH.to_string())]);
        let env = validate(&req(&["/bin/true"], &[("A", "1"), ("B", ""), ("A", "2")])).unwrap();
        assert_eq!(
            env,
            vec![
                ("PATH".to_string(), DEFAULT_PATH.to_string()),
                ("A".to_string(), "2".to_string()),
                ("B".to_string(), String::new()),
            ]
        );
        let env = validate(&req(&["/bin/true"], &[("PATH", "/opt/bin")])).unwrap();
        assert_eq!(env, vec![("PATH".to_string(), "/opt/bin".to_string())]);
        for bad in [("", "x"), ("A=B", "x"), ("A\0", "x"), ("A", "x\0y")] {
            let e = validate(&req(&["/bin/true"], &[bad])).unwrap_err();
            assert_eq!(e.code(), "bad_request", "{bad:?}");
        }
    }

    #[test]
    fn statuses_read_well() {
        assert_eq!(describe_status(0), "exited 0");
        assert_eq!(describe_status(3 << 8), "exited 3");
        assert_eq!(describe_status(libc::SIGKILL), "killed by SIGKILL");
        assert_eq!(
            describe_status(libc::SIGSEGV | 0x80),
            "killed by SIGSEGV (core dumped)"
        );
        assert_eq!(signal_name(40), "signal 40");
    }

    #[test]
    fn error_codes() {
        let ip = Ipv4Addr::new(10, 244, 1, 10);
        let host = "a1".to_string();
        let cases: [(RuntimeError, &str, u16); 5] = [
            (
                RuntimeError::NotLocal {
                    ip,
                    host: host.clone(),
                },
                "not_local",
                404,
            ),
            (
                RuntimeError::Conflict {
                    ip,
                    pid: 5,
                    origin: "started".into(),
                    host: host.clone(),
                },
                "conflict",
                409,
            ),
            (RuntimeError::BadRequest("x".into()), "bad_request", 400),
            (RuntimeError::NoProcess { ip, host }, "no_process", 404),
            (
                RuntimeError::SpawnFailed {
                    ip,
                    program: "/x".into(),
                    what: "execve",
                    source: io::Error::from_raw_os_error(libc::ENOENT),
                },
                "spawn_failed",
                500,
            ),
        ];
        for (e, code, status) in cases {
            assert_eq!((e.code(), e.http_status()), (code, status), "{e}");
        }
    }

    fn entry(ip: [u8; 4], pid: i32, start: u64, running: bool) -> (Ipv4Addr, Entry) {
        let ip = Ipv4Addr::from(ip);
        (
            ip,
            Entry {
                proc: ContainerProcess {
                    container: ip,
                    pid,
                    argv: vec!["/bin/sleep".into(), "1000".into()],
                    origin: ORIGIN_STARTED.into(),
                    running,
                    ended: (!running).then(|| "exited 0".into()),
                    fenced: None,
                    runtime: RuntimeKind::Agent,
                    image: None,
                },
                start_time: Some(start),
                stopping: false,
                runc: None,
            },
        )
    }

    /// The state file round-trips every field of every entry, and a file of an older agent
    /// that lacks fields still loads.
    #[test]
    fn saved_state_round_trips() {
        let mut st = State::default();
        st.procs.extend([entry([10, 244, 1, 10], 100, 5000, true)]);
        st.procs.extend([entry([10, 244, 1, 11], 101, 5001, false)]);
        st.procs
            .get_mut(&Ipv4Addr::new(10, 244, 1, 10))
            .unwrap()
            .stopping = true;
        st.checkpointed
            .insert(77, (Ipv4Addr::new(10, 244, 1, 12), Some(4000)));
        let saved = st.saved("a1");
        let text = serde_json::to_string(&saved).unwrap();
        let back: Saved = serde_json::from_str(&text).unwrap();
        assert_eq!(back, saved);
        assert_eq!(back.procs, st.procs);
        assert_eq!(back.checkpointed[0].pid, 77);
        let old = r#"{"procs":{"10.244.1.10":{"proc":{"container":"10.244.1.10","pid":5,
            "argv":["/x"],"origin":"started","running":true}}}}"#;
        let back: Saved = serde_json::from_str(old).unwrap();
        let e = &back.procs[&Ipv4Addr::new(10, 244, 1, 10)];
        assert_eq!((e.start_time, e.stopping), (None, false));
    }

    /// Re-adoption: a running entry whose PID still has its start time stays running; one
    /// whose process is gone (or whose PID was reused) is marked ended; ended entries stay as
    /// they were; checkpointed trees that are gone are forgotten.
    #[test]
    fn readoption_keeps_only_the_same_processes() {
        let saved = Saved {
            host: "a1".into(),
            procs: [
                entry([10, 244, 1, 10], 100, 5000, true),
                entry([10, 244, 1, 11], 101, 5001, true),
                entry([10, 244, 1, 12], 102, 5002, false),
            ]
            .into(),
            checkpointed: vec![
                Checkpointed {
                    pid: 200,
                    container: Ipv4Addr::new(10, 244, 1, 13),
                    start_time: Some(6000),
                },
                Checkpointed {
                    pid: 201,
                    container: Ipv4Addr::new(10, 244, 1, 14),
                    start_time: Some(6001),
                },
            ],
        };
        // PID 100 and 200 are still the same processes; 101 was reused (another start time).
        let alive = |pid: i32, start: Option<u64>| {
            matches!((pid, start), (100, Some(5000)) | (200, Some(6000)))
        };
        let (procs, checkpointed) = readopt(saved, alive);
        let get = |d: u8| procs[&Ipv4Addr::new(10, 244, 1, d)].proc.clone();
        assert!(get(10).running && get(10).ended.is_none());
        assert!(!get(11).running);
        assert_eq!(get(11).ended.as_deref(), Some(ENDED_UNWATCHED));
        assert_eq!(get(12).ended.as_deref(), Some("exited 0"));
        assert_eq!(checkpointed.keys().copied().collect::<Vec<_>>(), [200]);
    }

    #[test]
    fn the_root_of_a_found_tree_is_the_one_without_a_parent_among_them() {
        let f = |pid, ppid, start_time| Found {
            pid,
            ppid,
            start_time,
        };
        // 50 (parent 1, outside) → 51 → 52; 60 joined later from outside (parent 2).
        let found = [f(52, 51, 12), f(51, 50, 11), f(50, 1, 10), f(60, 2, 20)];
        assert_eq!(pick_root(&found).map(|r| r.pid), Some(50));
        assert_eq!(pick_root(&[f(60, 2, 20)]).map(|r| r.pid), Some(60));
        assert_eq!(pick_root(&[]), None);
    }

    /// A state file written by one runtime is re-adopted by the next: our own process (alive,
    /// same start time) stays running, a made-up PID is marked ended. No root needed.
    #[tokio::test]
    async fn a_new_runtime_readopts_what_the_state_file_records() {
        let dir = std::env::temp_dir().join(format!("ferry-rt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let me = std::process::id() as i32;
        let saved = Saved {
            host: "t".into(),
            procs: [
                entry([10, 244, 1, 10], me, start_time(me).unwrap(), true),
                entry([10, 244, 1, 11], me, start_time(me).unwrap() + 1, true),
            ]
            .into(),
            checkpointed: Vec::new(),
        };
        std::fs::create_dir_all(&dir).unwrap();
        store::write_atomic(&dir.join(store::FILE), &serde_json::to_vec(&saved).unwrap()).unwrap();
        let rt = Runtime::new("t", Some(&dir), isolation(Vec::new()), None).unwrap();
        let p = rt.get(Ipv4Addr::new(10, 244, 1, 10)).unwrap();
        assert!(p.running, "{p:?}");
        let q = rt.get(Ipv4Addr::new(10, 244, 1, 11)).unwrap();
        assert!(
            !q.running && q.ended.as_deref() == Some(ENDED_UNWATCHED),
            "{q:?}"
        );
        rt.detach().await;
        let back: Saved = store::load(&dir.join(store::FILE)).unwrap().unwrap();
        assert!(back.procs[&Ipv4Addr::new(10, 244, 1, 10)].proc.running);
        assert!(!back.procs[&Ipv4Addr::new(10, 244, 1, 11)].proc.running);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The runtime a request names picks its driver (netavark's driver by name): runc is
    /// refused as unavailable without its binary or a state directory; each driver checks
    /// what it needs before anything is reserved. No root needed (nothing is started).
    #[tokio::test]
    async fn the_request_chooses_the_runtime() {
        let dir = std::env::temp_dir().join(format!("ferry-rt-choice-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let images = dir.join("images");
        std::fs::create_dir_all(images.join("redis-00aa")).unwrap();
        let ip = Ipv4Addr::new(10, 244, 1, 10);
        let runc_req = |image: Option<&str>, argv: &[&str]| StartRequest {
            runtime: RuntimeKind::Runc,
            image: image.map(str::to_owned),
            ..req(argv, &[])
        };

        let rt = Runtime::new("h1", None, isolation(Vec::new()), None).unwrap();
        assert_eq!(
            rt.driver(RuntimeKind::Agent).unwrap().kind(),
            RuntimeKind::Agent
        );
        let e = rt.driver(RuntimeKind::Runc).unwrap_err();
        assert_eq!((e.code(), e.http_status()), ("runtime_unavailable", 501));
        assert!(
            e.to_string()
                .contains("runtime runc is not available on host h1"),
            "{e}"
        );
        let e = rt
            .start(
                ip,
                Path::new("/nonexistent"),
                &runc_req(Some("redis-00aa"), &["/x"]),
            )
            .await
            .unwrap_err();
        assert_eq!(e.code(), "runtime_unavailable");
        assert!(rt.get(ip).is_none());
        rt.detach().await;

        let missing = RuncOptions {
            binary: dir.join("no-runc"),
            images_dir: images.clone(),
            podman: None,
        };
        let rt = Runtime::new(
            "h1",
            Some(&dir.join("s1")),
            isolation(Vec::new()),
            Some(missing),
        )
        .unwrap();
        let e = rt.driver(RuntimeKind::Runc).unwrap_err();
        assert!(e.to_string().contains("no-runc is missing"), "{e}");
        rt.detach().await;

        let present = RuncOptions {
            binary: PathBuf::from("/bin/true"),
            images_dir: images.clone(),
            podman: None,
        };
        let rt = Runtime::new(
            "h1",
            Some(&dir.join("s2")),
            isolation(Vec::new()),
            Some(present),
        )
        .unwrap();
        let runc = rt.driver(RuntimeKind::Runc).unwrap();
        assert_eq!(runc.kind(), RuntimeKind::Runc);
        let code = |d: &dyn Driver, r: &StartRequest| d.validate(ip, r).err().map(|e| e.code());
        assert_eq!(
            code(
                runc,
                &runc_req(Some("redis-00aa"), &["/usr/bin/redis-server"])
            ),
            None
        );
        assert_eq!(code(runc, &runc_req(None, &["/x"])), Some("bad_request"));
        assert_eq!(
            code(runc, &runc_req(Some("redis-ffff"), &["/x"])),
            Some("no_image")
        );
        assert_eq!(
            code(runc, &runc_req(Some("../images"), &["/x"])),
            Some("bad_request")
        );
        assert_eq!(
            code(runc, &runc_req(Some("redis-00aa"), &["x"])),
            Some("bad_request")
        );
        let e = runc.validate(ip, &runc_req(None, &["/x"])).unwrap_err();
        assert!(e.to_string().contains("runtime runc needs an image"), "{e}");
        let e = runc
            .validate(ip, &runc_req(Some("redis-ffff"), &["/x"]))
            .unwrap_err();
        assert!(
            e.to_string().contains("image redis-ffff is not on host h1"),
            "{e}"
        );
        assert_eq!(e.http_status(), 404);
        let agent = rt.driver(RuntimeKind::Agent).unwrap();
        let with_image = StartRequest {
            image: Some("redis-00aa".into()),
            ..req(&["/x"], &[])
        };
        assert_eq!(code(agent, &with_image), Some("bad_request"));
        assert_eq!(code(agent, &req(&["/x"], &[])), None);
        assert!(rt.has_image("redis-00aa").unwrap().ends_with("redis-00aa"));
        assert_eq!(rt.has_image("nope").unwrap_err().code(), "no_image");
        rt.detach().await;
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn isolation(hide: Vec<PathBuf>) -> Isolation {
        Isolation {
            uid_base: 1_000_000,
            overlay: "10.244.0.0/16".parse().unwrap(),
            hide,
        }
    }

    /// Root, or a skip (a failure under `CI=true`: CI runs as root).
    fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() == 0 };
        assert!(
            root || std::env::var("CI").as_deref() != Ok("true"),
            "CI=true: this test needs root"
        );
        root
    }

    /// Root only: a mount made on the host after the plan was computed (another container's
    /// network namespace bound under /run/netns while this one starts, as happens when two
    /// labs or two containers start together) is detached from the child's namespace too. Left
    /// there, CRIU refuses to dump the tree (`doesn't have a proper root mount`).
    #[test]
    fn a_mount_made_after_the_plan_is_detached_too() {
        if !is_root() {
            eprintln!("SKIP: needs root");
            return;
        }
        struct Bound(PathBuf);
        impl Drop for Bound {
            fn drop(&mut self) {
                let c = CString::new(self.0.as_os_str().as_encoded_bytes()).unwrap();
                // SAFETY: unmounts what this test bound.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
                let _ = std::fs::remove_dir_all(self.0.parent().unwrap());
            }
        }
        let plan = isolation(Vec::new()).plan().unwrap();
        let dir = std::env::temp_dir().join(format!("ferry-rt-late-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let target = dir.join("ns");
        std::fs::write(&target, "").unwrap();
        let bound = Bound(target.clone());
        let c_target = CString::new(target.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: bind-mounts this thread's network namespace file on a file of our own.
        let rc = unsafe {
            libc::mount(
                c"/proc/thread-self/ns/net".as_ptr(),
                c_target.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND,
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        let host = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let mark = format!(" {} ", target.display());
        assert!(host.contains(&mark) && host.contains(" nsfs "), "{host}");
        let argv = ["/bin/sleep".to_string(), "30".to_string()];
        let pid = spawn_in_current_netns(&argv, &[], 0, &plan).unwrap();
        let inside = std::fs::read_to_string(format!("/proc/{pid}/mountinfo"));
        // SAFETY: kills and reaps our own child.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
        drop(bound);
        let inside = inside.unwrap();
        assert!(!inside.contains(&mark), "{inside}");
        assert!(!inside.contains(" nsfs "), "{inside}");
    }

    /// Root only (a PID namespace): start in our own network namespace, exec failure, stop.
    #[tokio::test]
    async fn starts_stops_and_reports_exec_failures() {
        if !is_root() {
            eprintln!("SKIP: needs root");
            return;
        }
        let secrets = std::env::temp_dir().join(format!("ferry-rt-secrets-{}", std::process::id()));
        std::fs::create_dir_all(&secrets).unwrap();
        std::fs::write(secrets.join("token"), "s3cret").unwrap();
        let rt = Runtime::new("test", None, isolation(vec![secrets.clone()]), None).unwrap();
        let ip = Ipv4Addr::new(10, 244, 9, 9);
        let ns = Path::new("/proc/self/ns/net");
        let missing = rt
            .start(ip, ns, &req(&["/nonexistent/program"], &[]))
            .await
            .unwrap_err();
        assert_eq!(missing.code(), "spawn_failed", "{missing}");
        assert!(missing.to_string().contains("No such file"), "{missing}");
        assert!(rt.get(ip).is_none());
        let p = rt
            .start(ip, ns, &req(&["/bin/sleep", "30"], &[]))
            .await
            .unwrap();
        assert!(p.running && p.pid > 1, "{p:?}");
        let status = std::fs::read_to_string(format!("/proc/{}/status", p.pid)).unwrap();
        let nspid = status.lines().find(|l| l.starts_with("NSpid:")).unwrap();
        assert!(nspid.trim_end().ends_with("\t1"), "{nspid}");
        // Isolated: its own uid (1000000 + 9 * 256 + 9) and mount namespace, no capability,
        // no_new_privs, the hidden directory empty, its own /proc.
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
                .unwrap()
        };
        assert_eq!(field("Uid:"), "1002313 1002313 1002313 1002313");
        assert_eq!(field("Gid:"), "1002313 1002313 1002313 1002313");
        assert_eq!(field("Groups:"), "");
        assert_eq!(field("CapEff:"), "0000000000000000");
        assert_eq!(field("CapPrm:"), "0000000000000000");
        assert_eq!(field("CapBnd:"), "0000000000000000");
        assert_eq!(field("NoNewPrivs:"), "1");
        let mnt = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap();
        assert_ne!(mnt(&p.pid.to_string()), mnt("self"));
        let root = PathBuf::from(format!("/proc/{}/root", p.pid));
        assert!(secrets.join("token").exists());
        let inside = root.join(secrets.strip_prefix("/").unwrap());
        assert_eq!(std::fs::read_dir(&inside).unwrap().count(), 0, "{inside:?}");
        let procs: Vec<String> = std::fs::read_dir(root.join("proc"))
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.parse::<u32>().is_ok())
            .collect();
        assert_eq!(procs, ["1"], "its /proc shows only its own PID namespace");
        let mut dev: Vec<String> = std::fs::read_dir(root.join("dev"))
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect();
        dev.sort();
        assert_eq!(
            dev,
            [
                "fd", "full", "null", "random", "shm", "stderr", "stdin", "stdout", "tty",
                "urandom", "zero"
            ]
        );
        let mounts = std::fs::read_to_string(format!("/proc/{}/mountinfo", p.pid)).unwrap();
        let root_mount = mounts
            .lines()
            .find(|l| l.split(' ').nth(4) == Some("/"))
            .unwrap();
        assert!(root_mount.contains(" ro,"), "{root_mount}");
        assert!(
            !mounts.contains(" nsfs ") && !mounts.contains(" bpf "),
            "{mounts}"
        );
        let again = rt
            .start(ip, ns, &req(&["/bin/sleep", "30"], &[]))
            .await
            .unwrap_err();
        assert_eq!(again.code(), "conflict");
        // sleep as PID 1 of its namespace has no SIGTERM handler: SIGKILL after the grace.
        let stopped = rt.stop(ip, Duration::from_millis(200)).await.unwrap();
        assert!(!stopped.running);
        assert_eq!(stopped.ended.as_deref(), Some("killed by SIGKILL"));
        assert!(rt.pid(ip).is_none());
        assert!(!Path::new(&format!("/proc/{}", p.pid)).exists());
        // A process that exits on its own.
        let p = rt.start(ip, ns, &req(&["/bin/true"], &[])).await.unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while rt.get(ip).unwrap().running {
            assert!(std::time::Instant::now() < deadline, "not reaped");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(rt.get(ip).unwrap().ended.as_deref(), Some("exited 0"));
        assert_eq!(rt.get(ip).unwrap().pid, p.pid);
        rt.shutdown().await;
        std::fs::remove_dir_all(&secrets).unwrap();
    }
}
