//! One interface over the runtimes that run a container's process tree, in the style of
//! netavark's network drivers (`validate` / `setup` / `teardown` behind one trait, the driver
//! chosen by name): [`Driver`], with [`AgentDriver`] (the agent's own runtime: a process
//! tree in the host's file system, [`super::isolation`]), [`super::runc::RuncDriver`] (OCI
//! containers with their own root file system, through runc) and
//! [`super::podman::PodmanDriver`] (containers Podman runs, moved with Podman's own
//! checkpoint and restore).
//!
//! The trait is shaped by what the CRIU path needs: **validate** a start request before
//! anything is reserved, **start** the tree in the container's network namespace,
//! **checkpoint** (the command that dumps it, leaving it *stopped* with its sockets in
//! repair mode until the registry decides), **restore** (the command that brings it back
//! stopped in the prepared namespace), **resume** a stopped copy that owns the container,
//! **kill** one that does not, and **remove** what the runtime kept of a tree that ended.
//! The bookkeeping (entries, fencing marks, persistence, reaping) stays in
//! [`super::Runtime`], the same for every driver; the CRIU path runs the commands
//! ([`crate::criu::cmd::run`]) and reads CRIU's figures where the driver says they are.
//!
//! Every method may block (processes, files): callers on the tokio runtime use the blocking
//! pool.

use std::{
    ffi::OsString,
    io,
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use ferry_api::run::{FenceSide, LockMode, RuntimeKind, StartRequest};
use ferry_overlay::netns::{self, NetNsError};
use serde::{Deserialize, Serialize};

use super::{Entry, Isolation, RuntimeError};
use crate::criu::{cmd, resume};

/// Where CRIU's statistics of one run are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stats {
    /// On its standard output (`--display-stats`).
    Stdout,
    /// In a stats image (`stats-dump`, `stats-restore`): CRIU under runc (RPC) prints none.
    Image(PathBuf),
    /// In Podman's `--print-stats` JSON on its standard output.
    PodmanJson,
}

/// A command the CRIU path runs for one checkpoint or restore.
#[derive(Debug, Clone)]
pub struct Invocation {
    /// What it is, for messages: `criu dump`, `runc checkpoint`, ….
    pub name: &'static str,
    pub program: PathBuf,
    pub args: Vec<OsString>,
    /// The prepared network namespace is handed over on [`cmd::NETNS_FD`].
    pub netns_fd: bool,
    /// CRIU's log (read back for its errors, and for the moments it seized and resumed).
    pub log: PathBuf,
    pub stats: Stats,
    /// Where the restored tree's root PID is written (restore).
    pub pidfile: Option<PathBuf>,
    /// Capture stdout and stderr. False: all three on /dev/null (a process whose stdio the
    /// restored container would inherit, `runc restore --detach`, must not hold a pipe the
    /// agent waits on; its errors are in its log files).
    pub capture: bool,
    /// Environment to add (it reaches CRIU's action script).
    pub env: Vec<(String, String)>,
}

/// What a runc or Podman container is known by (kept with its entry, persisted).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuncRecord {
    /// runc: the container id under this agent's runc root (the container namespace's name:
    /// derived from the address, unique per agent). Podman: Podman's container ID.
    pub id: String,
    /// runc: its bundle directory (config.json, the CRIU configuration file). Podman: the
    /// container's own directory (`StaticDir`).
    pub bundle: PathBuf,
}

/// A started tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Started {
    pub pid: i32,
    pub runc: Option<RuncRecord>,
}

/// One checkpoint of a tree.
#[derive(Debug, Clone)]
pub struct Checkpoint<'a> {
    pub entry: &'a Entry,
    /// Where the images (and CRIU's log) go.
    pub dir: &'a Path,
    /// Inode of the container's network namespace (dumped as external).
    pub netns_inode: u64,
    pub lock: LockMode,
    /// The `ferry` binary, CRIU's action script (hold mode: network-lock → freeze).
    pub action_script: &'a Path,
    /// The `criu` binary.
    pub criu: &'a Path,
}

/// One restore into a prepared namespace.
#[derive(Debug, Clone)]
pub struct Restore<'a> {
    pub ip: Ipv4Addr,
    /// The images (and CRIU's log).
    pub dir: &'a Path,
    /// The prepared network namespace (a path under /run/netns).
    pub netns: &'a Path,
    pub lock: LockMode,
    pub criu: &'a Path,
    /// The root file system (runc).
    pub image: Option<&'a str>,
    /// The tree's command line, as the source knew it.
    pub argv: &'a [String],
}

/// What a runtime must do for the agent's container API and its CRIU path.
pub trait Driver: Send + Sync + std::fmt::Debug {
    fn kind(&self) -> RuntimeKind;
    /// Checks a start request for this runtime, touching nothing. Returns the environment to
    /// start the tree with.
    fn validate(
        &self,
        ip: Ipv4Addr,
        req: &StartRequest,
    ) -> Result<Vec<(String, String)>, RuntimeError>;
    /// Starts the tree inside the network namespace `netns`.
    fn start(
        &self,
        ip: Ipv4Addr,
        netns: &Path,
        req: &StartRequest,
        env: Vec<(String, String)>,
    ) -> Result<Started, RuntimeError>;
    /// The command that dumps the tree and leaves it stopped, its established sockets in
    /// repair mode (so a kill sends nothing, and a resume needs repair off first).
    fn checkpoint(&self, c: &Checkpoint<'_>) -> Result<Invocation, RuntimeError>;
    /// After the checkpoint command returned (`dumped`: it succeeded): the tree as the fencing
    /// expects it, stopped after a dump (checked: an error means it is not), running after a
    /// failed one.
    fn checkpointed(&self, entry: &Entry, dumped: bool) -> Result<(), String>;
    /// Prepares and returns the command that restores a tree, stopped, into the prepared
    /// namespace, and what to record of it.
    fn restore(&self, r: &Restore<'_>) -> Result<(Invocation, Option<RuncRecord>), RuntimeError>;
    /// After a restore command succeeded: the restored tree's root PID and what to record of
    /// it. By default the PID file the command wrote (`pidfile`), and the record
    /// [`Driver::restore`] returned.
    fn restored(
        &self,
        inv: &Invocation,
        stdout: &str,
        record: Option<RuncRecord>,
    ) -> Result<(i32, Option<RuncRecord>), String> {
        let _ = stdout;
        inv.pidfile
            .as_ref()
            .and_then(|f| std::fs::read_to_string(f).ok())
            .and_then(|s| s.trim().parse().ok())
            .map(|pid| (pid, record))
            .ok_or_else(|| format!("{} wrote no PID file", inv.name))
    }
    /// The CRIU configuration written, a restore that failed: what it prepared goes.
    fn restore_failed(&self, record: Option<&RuncRecord>);
    /// Runs a stopped copy that owns the container: the source's dumped tree (sockets in
    /// repair mode) or the destination's restored one. Returns (tasks, connections).
    fn resume(&self, entry: &Entry, side: FenceSide) -> io::Result<(usize, usize)>;
    /// Kills a copy that will never own the container (its sockets in repair mode: closing
    /// them sends nothing). The runtime's own leftovers go too.
    fn kill(&self, entry: &Entry) -> io::Result<()>;
    /// What the runtime kept of a tree that ended (runc: its state, cgroups, bundle).
    fn remove(&self, entry: &Entry);
}

/// The agent's own runtime (see the runtime's module doc and [`super::isolation`]).
#[derive(Debug, Clone)]
pub struct AgentDriver {
    pub host: String,
    pub isolation: Isolation,
}

impl Driver for AgentDriver {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Agent
    }

    fn validate(
        &self,
        _ip: Ipv4Addr,
        req: &StartRequest,
    ) -> Result<Vec<(String, String)>, RuntimeError> {
        if let Some(image) = &req.image {
            return Err(RuntimeError::BadRequest(format!(
                "image {image:?}: the agent runtime runs in the host's file system; an image is \
                 for runtime runc"
            )));
        }
        super::validate(req)
    }

    fn start(
        &self,
        ip: Ipv4Addr,
        netns: &Path,
        req: &StartRequest,
        env: Vec<(String, String)>,
    ) -> Result<Started, RuntimeError> {
        let program = req.argv[0].clone();
        let failed = |what, source| RuntimeError::SpawnFailed {
            ip,
            program: program.clone(),
            what,
            source,
        };
        let plan = self
            .isolation
            .plan()
            .map_err(|e| failed("reading /proc/self/mountinfo", e))?;
        let uid = self.isolation.uid(ip);
        let argv = req.argv.clone();
        let joined = netns::run_in(netns, move || {
            super::spawn_in_current_netns(&argv, &env, uid, &plan)
        });
        match joined {
            Ok(Ok(pid)) => Ok(Started { pid, runc: None }),
            Ok(Err((what, e))) => Err(failed(what, e)),
            Err(NetNsError::Open { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
                Err(RuntimeError::NotLocal {
                    ip,
                    host: self.host.clone(),
                })
            }
            Err(e) => Err(failed(
                "entering the network namespace",
                io::Error::other(e),
            )),
        }
    }

    fn checkpoint(&self, c: &Checkpoint<'_>) -> Result<Invocation, RuntimeError> {
        let dump = cmd::Dump {
            pid: c.entry.proc.pid,
            dir: c.dir,
            netns_inode: c.netns_inode,
            lock: c.lock,
            action_script: c.action_script,
        };
        Ok(Invocation {
            name: "criu dump",
            program: c.criu.to_owned(),
            args: dump.args(),
            netns_fd: false,
            log: c.dir.join("dump.log"),
            stats: Stats::Stdout,
            pidfile: None,
            capture: true,
            env: Vec::new(),
        })
    }

    fn checkpointed(&self, _entry: &Entry, _dumped: bool) -> Result<(), String> {
        // `criu dump --leave-stopped` on the command line; CRIU resumes the tree itself
        // after a failed dump.
        Ok(())
    }

    fn restore(&self, r: &Restore<'_>) -> Result<(Invocation, Option<RuncRecord>), RuntimeError> {
        let restore = cmd::Restore {
            dir: r.dir,
            lock: r.lock,
            action_script: Path::new(""),
        };
        let mut args = restore.args();
        // The release is asked for by the agent once CRIU returned (its network-unlock hook
        // runs while the sockets are still in repair mode): no action script on this side.
        if let Some(i) = args.iter().position(|a| a == "--action-script") {
            args.drain(i..i + 2);
        }
        Ok((
            Invocation {
                name: "criu restore",
                program: r.criu.to_owned(),
                args,
                netns_fd: true,
                log: r.dir.join("restore.log"),
                stats: Stats::Stdout,
                pidfile: Some(restore.pidfile()),
                capture: true,
                env: Vec::new(),
            },
            None,
        ))
    }

    fn restore_failed(&self, _record: Option<&RuncRecord>) {}

    fn resume(&self, entry: &Entry, side: FenceSide) -> io::Result<(usize, usize)> {
        match side {
            // Its sockets are still in repair mode (the dump).
            FenceSide::Source => resume::resume(entry.proc.pid),
            FenceSide::Destination => resume::cont(entry.proc.pid).map(|n| (n, 0)),
        }
    }

    fn kill(&self, entry: &Entry) -> io::Result<()> {
        match super::signal_pid(entry.proc.pid, entry.start_time, libc::SIGKILL) {
            Err(e) if e.raw_os_error() != Some(libc::ESRCH) => Err(e),
            _ => Ok(()),
        }
    }

    fn remove(&self, _entry: &Entry) {}
}
