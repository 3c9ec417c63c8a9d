//! runc as one of the agent's runtimes: an OCI container with its own root file system
//! (read-only), its own mount, PID, IPC and UTS namespaces and cgroups, in the network
//! namespace the agent built for it, checkpointed and restored with `runc checkpoint` /
//! `runc restore` (runc drives CRIU through its RPC).
//!
//! **Layout.** Everything of this agent's runc containers is under `<state_dir>/runc/`:
//! `state/` is runc's `--root` (one per agent: several agents share a machine in the lab),
//! `bundles/<id>/` each container's bundle (`config.json`, `criu.conf`, runc's log). The
//! container id is the name of the container's network namespace (derived from its address,
//! unique per agent). The root file system is an image directory (`[runtime] images_dir`),
//! shared read-only by every container of that image.
//!
//! **The bundle** ([`bundle_config`]): the image as a read-only root; tmpfs on `/dev` and
//! `/tmp` (also a server's data directory: written, and moved with the container, CRIU
//! dumps a tmpfs's contents); a fresh `/proc`; the network namespace by path (the
//! agent's); new mount, PID, IPC and UTS namespaces; cgroups `ferry/<id>` relative to the
//! agent's own (cgroupfs, this machine's hybrid v1 hierarchy); no new privileges; capability
//! sets of `CAP_NET_BIND_SERVICE` only; the uid of the agent runtime's containers (0 by
//! default: see [`super::isolation`] on prlimit and CAP_SYS_RESOURCE); no rlimits (raising
//! one fails without CAP_SYS_RESOURCE); stdio on /dev/null (CRIU cannot dump a host file as
//! stdout); the annotation `org.criu.config` naming the bundle's `criu.conf`.
//!
//! **CRIU's options through runc.** runc 1.1.5 gives CRIU no way to leave a dumped tree
//! stopped (`runc checkpoint` kills it, or with `--leave-running` lets it run on), nor to
//! restore one stopped, nor an action script or `--network-lock skip`. It does hand CRIU the
//! configuration file the annotation names, and CRIU applies that file's options *over* the
//! ones runc sends over RPC (its log says "Would overwrite RPC settings with values from
//! …"). So before each checkpoint and restore the agent writes `criu.conf`
//! ([`criu_config`]): `leave-stopped` (overrides runc's `leave_running`: the dumped tree stays
//! stopped with its sockets in repair mode, exactly as `criu dump --leave-stopped` leaves the
//! agent runtime's; and a restored tree stays stopped, fenced, until the release),
//! `network-lock skip` (the hold is the lock) and, at dump in hold mode, `action-script` =
//! `ferry` (network-lock → freeze, network-unlock on a failed dump → abort). Verified with
//! runc 1.1.5 and CRIU 4.2.1; see docs/migration.md, "Migrating a runc container".
//! `runc checkpoint` is called with `--leave-running` (else runc destroys the container after
//! CRIU returns, whatever CRIU did).

use std::{
    ffi::OsString,
    io,
    net::Ipv4Addr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use ferry_api::run::{CriuStats, FenceSide, LockMode, RuntimeKind, StartRequest};
use serde_json::{Value, json};
use tracing::{debug, info, warn};

use super::{
    Entry, Isolation, RuntimeError,
    driver::{Checkpoint, Driver, Invocation, Restore, RuncRecord, Started, Stats},
};
use crate::criu::resume;

/// The annotation runc reads the CRIU configuration file's path from.
pub const CRIU_CONFIG_ANNOTATION: &str = "org.criu.config";
/// Capabilities a runc container keeps (bounding, effective, permitted).
pub const CAPABILITIES: &[&str] = &["CAP_NET_BIND_SERVICE"];
/// tmpfs mounts of a container: (where, options). `/tmp` is also where a server keeps its
/// data (e.g. `redis-server --dir /tmp`): one tmpfs, because CRIU dumps and restores each
/// with a `tar` of its own, about 5 ms and 7 ms inside the container's stopped time.
pub const TMPFS: &[(&str, &str)] = &[
    ("/dev", "nosuid,strictatime,mode=755,size=65536k"),
    ("/tmp", "nosuid,nodev,mode=1777,size=262144k"),
];
/// Longest image name.
pub const MAX_IMAGE_NAME: usize = 128;
/// The variable that tells ferry's pre-dump hook which cgroup to freeze (the CLI's
/// `runcmd::FREEZER_ENV`).
pub const FREEZER_ENV: &str = "FERRY_FREEZER";

pub use ferry_api::cgroup::{freezer_dir, freezer_of, frozen, thaw};

/// Where runc is and where its containers' files go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub binary: PathBuf,
    pub images_dir: PathBuf,
    /// `<state_dir>/runc`.
    pub dir: PathBuf,
}

/// An image name: a plain directory name in the images directory. Pure.
pub fn valid_image_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_IMAGE_NAME {
        return Err(format!(
            "image {name:?}: want 1 to {MAX_IMAGE_NAME} characters"
        ));
    }
    if name.starts_with('.')
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(format!(
            "image {name:?}: want the name of a directory in the images directory (letters, \
             digits, `-`, `_`, `.`; not starting with `.`), e.g. redis-1a2b3c4d5e6f7a8b"
        ));
    }
    Ok(())
}

/// The container id: the network namespace's name (a runc id is `[A-Za-z0-9_+.-]+`). Pure.
pub fn container_id(netns: &Path) -> Result<String, String> {
    let id = netns
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| format!("{} names no namespace", netns.display()))?;
    if id.is_empty()
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'+' | b'.'))
    {
        return Err(format!("{id:?} cannot be a runc container id"));
    }
    Ok(id.to_owned())
}

/// What a bundle's config.json is made of.
#[derive(Debug, Clone)]
pub struct BundleSpec<'a> {
    pub ip: Ipv4Addr,
    pub id: &'a str,
    pub rootfs: &'a Path,
    pub argv: &'a [String],
    pub env: &'a [(String, String)],
    pub netns: &'a Path,
    pub uid: u32,
    pub criu_config: &'a Path,
}

/// The OCI runtime configuration (config.json) of a container; see the module's doc. Pure.
pub fn bundle_config(b: &BundleSpec<'_>) -> Value {
    let caps: Vec<&str> = CAPABILITIES.to_vec();
    let env: Vec<String> = b.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let o = b.ip.octets();
    let mut mounts = vec![json!({
        "destination": "/proc", "type": "proc", "source": "proc",
        "options": ["nosuid", "noexec", "nodev"]
    })];
    for (dest, opts) in TMPFS {
        mounts.push(json!({
            "destination": dest, "type": "tmpfs", "source": "tmpfs",
            "options": opts.split(',').collect::<Vec<_>>()
        }));
    }
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": b.uid, "gid": b.uid},
            "args": b.argv,
            "env": env,
            "cwd": "/",
            "capabilities": {
                "bounding": caps, "effective": caps, "permitted": caps,
                "inheritable": [], "ambient": []
            },
            "noNewPrivileges": true
        },
        "root": {"path": b.rootfs, "readonly": true},
        "hostname": format!("c-{}-{}-{}-{}", o[0], o[1], o[2], o[3]),
        "mounts": mounts,
        "annotations": {CRIU_CONFIG_ANNOTATION: b.criu_config},
        "linux": {
            "cgroupsPath": format!("ferry/{}", b.id),
            "resources": {"devices": [{"allow": false, "access": "rwm"}]},
            "namespaces": [
                {"type": "pid"},
                {"type": "network", "path": b.netns},
                {"type": "ipc"},
                {"type": "uts"},
                {"type": "mount"}
            ],
            "maskedPaths": [
                "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys",
                "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                "/proc/sched_debug", "/proc/scsi", "/sys/firmware"
            ],
            "readonlyPaths": [
                "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"
            ]
        }
    })
}

/// The CRIU configuration file runc hands CRIU (see the module's doc): `action_script` at
/// dump in hold mode only. Pure.
pub fn criu_config(lock: LockMode, action_script: Option<&Path>) -> String {
    let mut s = String::from(
        "# Written by ferry-agent before each checkpoint and restore of this container. runc\n\
         # hands it to CRIU (annotation org.criu.config); its options override runc's.\n\
         tcp-established\n\
         leave-stopped\n",
    );
    s.push_str(match lock {
        LockMode::Hold => "network-lock skip\n",
        LockMode::CriuLock => "network-lock nftables\n",
    });
    if let Some(script) = action_script {
        s.push_str(&format!("action-script {}\n", script.display()));
    }
    s
}

/// `runc [global] checkpoint …` (after the binary). Pure.
pub fn checkpoint_args(
    root: &Path,
    log: &Path,
    criu: &Path,
    id: &str,
    dir: &Path,
) -> Vec<OsString> {
    let mut a = global_args(root, log, Some(criu));
    // runc destroys the container after CRIU returns unless told to leave it running; what
    // CRIU leaves it as (stopped) is criu.conf's `leave-stopped`.
    for s in [
        "checkpoint".as_ref(),
        "--leave-running".as_ref(),
        "--tcp-established".as_ref(),
        "--image-path".as_ref(),
        dir.as_os_str(),
        "--work-path".as_ref(),
        dir.as_os_str(),
        id.as_ref(),
    ] {
        a.push(std::ffi::OsStr::to_owned(s));
    }
    a
}

/// `runc [global] restore …` (after the binary). Pure.
pub fn restore_args(
    root: &Path,
    log: &Path,
    criu: &Path,
    id: &str,
    dir: &Path,
    bundle: &Path,
    pidfile: &Path,
) -> Vec<OsString> {
    let mut a = global_args(root, log, Some(criu));
    for s in [
        "restore".as_ref(),
        "--detach".as_ref(),
        "--tcp-established".as_ref(),
        "--image-path".as_ref(),
        dir.as_os_str(),
        "--work-path".as_ref(),
        dir.as_os_str(),
        "--bundle".as_ref(),
        bundle.as_os_str(),
        "--pid-file".as_ref(),
        pidfile.as_os_str(),
        id.as_ref(),
    ] {
        a.push(std::ffi::OsStr::to_owned(s));
    }
    a
}

fn global_args(root: &Path, log: &Path, criu: Option<&Path>) -> Vec<OsString> {
    let mut a: Vec<OsString> = vec![
        "--root".into(),
        root.into(),
        "--log".into(),
        log.into(),
        "--log-format".into(),
        "json".into(),
    ];
    if let Some(c) = criu {
        a.extend(["--criu".into(), c.into()]);
    }
    a
}

/// The error messages runc logged (its `--log-format json` lines at level error). Pure.
pub fn log_errors(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["level"] == "error" || v["level"] == "fatal")
        .filter_map(|v| v["msg"].as_str().map(str::to_owned))
        .collect()
}

/// Reads CRIU's statistics image (`stats-dump` or `stats-restore`: two magic words, a
/// 32-bit length, a protobuf `StatsEntry { dump = 1, restore = 2 }`) into `stats` (times in
/// µs → ms). Returns false if it is not one. Pure.
pub fn parse_stats_image(bytes: &[u8], stats: &mut CriuStats) -> bool {
    let Some(len) = bytes
        .get(8..12)
        .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize)
    else {
        return false;
    };
    let Some(entry) = bytes.get(12..12 + len) else {
        return false;
    };
    let Some(fields) = proto_fields(entry) else {
        return false;
    };
    for (field, value) in fields {
        let Proto::Bytes(inner) = value else {
            continue;
        };
        let Some(inner) = proto_fields(inner) else {
            return false;
        };
        for (n, v) in inner {
            let Proto::Varint(x) = v else { continue };
            let ms = x as f64 / 1e3;
            match (field, n) {
                (1, 1) => stats.freezing_ms = ms,
                (1, 2) => stats.frozen_ms = ms,
                (1, 3) => stats.memory_dump_ms = ms,
                (1, 4) => stats.memory_write_ms = ms,
                (1, 7) => stats.pages_written = x,
                (2, 4) => stats.restore_ms = ms,
                (2, 5) => stats.pages_restored = x,
                _ => {}
            }
        }
    }
    true
}

enum Proto<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

/// The fields of a protobuf message (numbers and values); `None` if malformed.
fn proto_fields(mut b: &[u8]) -> Option<Vec<(u64, Proto<'_>)>> {
    fn varint(b: &mut &[u8]) -> Option<u64> {
        let mut x = 0u64;
        for shift in (0..64).step_by(7) {
            let (&byte, rest) = b.split_first()?;
            *b = rest;
            x |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(x);
            }
        }
        None
    }
    let mut v = Vec::new();
    while !b.is_empty() {
        let key = varint(&mut b)?;
        let value = match key & 7 {
            0 => Proto::Varint(varint(&mut b)?),
            1 | 5 => {
                let n = if key & 7 == 1 { 8 } else { 4 };
                b = b.get(n..)?;
                Proto::Fixed
            }
            2 => {
                let n = usize::try_from(varint(&mut b)?).ok()?;
                let (bytes, rest) = (b.get(..n)?, b.get(n..)?);
                b = rest;
                Proto::Bytes(bytes)
            }
            _ => return None,
        };
        v.push((key >> 3, value));
    }
    Some(v)
}

/// The runc runtime.
#[derive(Debug, Clone)]
pub struct RuncDriver {
    pub host: String,
    pub settings: Settings,
    pub isolation: Isolation,
}

impl RuncDriver {
    fn root(&self) -> PathBuf {
        self.settings.dir.join("state")
    }

    fn bundle(&self, id: &str) -> PathBuf {
        self.settings.dir.join("bundles").join(id)
    }

    /// The image directory of `name`, if it is there.
    pub fn image(&self, name: &str) -> Result<PathBuf, RuntimeError> {
        valid_image_name(name).map_err(RuntimeError::BadRequest)?;
        let path = self.settings.images_dir.join(name);
        if !path.is_dir() {
            return Err(RuntimeError::NoImage {
                image: name.to_owned(),
                dir: self.settings.images_dir.clone(),
                host: self.host.clone(),
            });
        }
        Ok(path)
    }

    /// Runs `runc` with `args` (global options included), stdio on /dev/null; its errors
    /// come from its log (`log`, the part written by this run). `what` names the command.
    fn runc(&self, what: &str, args: &[OsString], log: &Path) -> Result<(), String> {
        let before = std::fs::metadata(log).map(|m| m.len()).unwrap_or(0);
        let status = Command::new(&self.settings.binary)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map_err(|e| format!("running {}: {e}", self.settings.binary.display()))?;
        if status.success() {
            return Ok(());
        }
        let text = std::fs::read(log)
            .map(|b| String::from_utf8_lossy(b.get(before as usize..).unwrap_or(&b)).into_owned())
            .unwrap_or_default();
        let errors = log_errors(&text);
        Err(format!(
            "runc {what} failed ({status}){}",
            if errors.is_empty() {
                String::new()
            } else {
                format!(": {}", errors.join(" | "))
            }
        ))
    }

    /// `runc delete --force ID`: kills what is left of the container and removes its state
    /// and cgroups; nothing to do (no exec) if runc has no state of it.
    fn delete(&self, id: &str, log: &Path) {
        if !self.root().join(id).exists() {
            return;
        }
        let mut a = global_args(&self.root(), log, None);
        a.extend(["delete".into(), "--force".into(), id.into()]);
        if let Err(e) = self.runc("delete", &a, log) {
            debug!(id, error = %e, "runc delete (nothing to delete?)");
        }
    }

    /// A fresh bundle directory with `config.json` and `criu.conf` (root only: it names the
    /// action script's environment… and is the agent's).
    fn write_bundle(
        &self,
        spec: &BundleSpec<'_>,
        bundle: &Path,
        criu_conf: &str,
    ) -> Result<(), String> {
        let _ = std::fs::remove_dir_all(bundle);
        std::fs::create_dir_all(bundle)
            .and_then(|()| std::fs::set_permissions(bundle, std::fs::Permissions::from_mode(0o700)))
            .map_err(|e| format!("creating {}: {e}", bundle.display()))?;
        let config = serde_json::to_vec_pretty(&bundle_config(spec)).expect("JSON");
        std::fs::write(bundle.join("config.json"), config)
            .and_then(|()| std::fs::write(spec.criu_config, criu_conf))
            .map_err(|e| format!("writing the bundle {}: {e}", bundle.display()))
    }

    fn record<'a>(&self, entry: &'a Entry) -> io::Result<&'a RuncRecord> {
        entry.runc.as_ref().ok_or_else(|| {
            io::Error::other(format!(
                "container {} has no runc record (not a runc container?)",
                entry.proc.container
            ))
        })
    }
}

impl Driver for RuncDriver {
    fn kind(&self) -> RuntimeKind {
        RuntimeKind::Runc
    }

    fn validate(
        &self,
        _ip: Ipv4Addr,
        req: &StartRequest,
    ) -> Result<Vec<(String, String)>, RuntimeError> {
        let Some(image) = &req.image else {
            return Err(RuntimeError::BadRequest(format!(
                "runtime runc needs an image: the name of a root file system in {} on host {} \
                 (`ferry-lab image build redis` makes one)",
                self.settings.images_dir.display(),
                self.host
            )));
        };
        let env = super::validate(req)?;
        self.image(image)?;
        Ok(env)
    }

    fn start(
        &self,
        ip: Ipv4Addr,
        netns: &Path,
        req: &StartRequest,
        env: Vec<(String, String)>,
    ) -> Result<Started, RuntimeError> {
        let failed = |what: &'static str, e: String| RuntimeError::SpawnFailed {
            ip,
            program: req.argv[0].clone(),
            what,
            source: io::Error::other(e),
        };
        if !netns.exists() {
            return Err(RuntimeError::NotLocal {
                ip,
                host: self.host.clone(),
            });
        }
        let image = req.image.as_deref().unwrap_or_default();
        let rootfs = self.image(image)?;
        let id = container_id(netns).map_err(|e| failed("naming the container", e))?;
        let bundle = self.bundle(&id);
        let criu_conf = bundle.join("criu.conf");
        let spec = BundleSpec {
            ip,
            id: &id,
            rootfs: &rootfs,
            argv: &req.argv,
            env: &env,
            netns,
            uid: self.isolation.uid(ip),
            criu_config: &criu_conf,
        };
        self.write_bundle(&spec, &bundle, &criu_config(LockMode::Hold, None))
            .map_err(|e| failed("writing the bundle", e))?;
        let log = bundle.join("runc.log");
        // A container of that id left over (ended, its state kept): gone first.
        self.delete(&id, &log);
        let pidfile = bundle.join("pid");
        let mut a = global_args(&self.root(), &log, None);
        for s in [
            "run".as_ref(),
            "--detach".as_ref(),
            "--bundle".as_ref(),
            bundle.as_os_str(),
            "--pid-file".as_ref(),
            pidfile.as_os_str(),
            id.as_ref(),
        ] {
            a.push(std::ffi::OsStr::to_owned(s));
        }
        if let Err(e) = self.runc("run", &a, &log) {
            self.delete(&id, &log);
            let _ = std::fs::remove_dir_all(&bundle);
            return Err(failed("runc run", e));
        }
        let pid = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
            .ok_or_else(|| failed("runc run", format!("no PID in {}", pidfile.display())))?;
        info!(container = %ip, pid, id, image, "runc container started");
        Ok(Started {
            pid,
            runc: Some(RuncRecord { id, bundle }),
        })
    }

    fn checkpoint(&self, c: &Checkpoint<'_>) -> Result<Invocation, RuntimeError> {
        let rec = self
            .record(c.entry)
            .map_err(|e| RuntimeError::BadRequest(e.to_string()))?;
        let script = (c.lock == LockMode::Hold).then_some(c.action_script);
        // The options CRIU applies over runc's: written for this very dump.
        std::fs::write(rec.bundle.join("criu.conf"), criu_config(c.lock, script)).map_err(|e| {
            RuntimeError::SpawnFailed {
                ip: c.entry.proc.container,
                program: "runc".into(),
                what: "writing criu.conf",
                source: e,
            }
        })?;
        Ok(Invocation {
            name: "runc checkpoint",
            program: self.settings.binary.clone(),
            args: checkpoint_args(
                &self.root(),
                &rec.bundle.join("runc.log"),
                c.criu,
                &rec.id,
                c.dir,
            ),
            netns_fd: false,
            log: c.dir.join("dump.log"),
            stats: Stats::Image(c.dir.join("stats-dump")),
            pidfile: None,
            capture: true,
            // ferry's pre-dump hook freezes the cgroup before CRIU does (see
            // `ferry_cli::runcmd::freeze_cgroup`: CRIU's own freezing costs 100 ms here).
            env: match (script, freezer_of(c.entry.proc.pid)) {
                (Some(_), Some(dir)) => vec![(FREEZER_ENV.into(), dir.display().to_string())],
                _ => Vec::new(),
            },
        })
    }

    fn checkpointed(&self, entry: &Entry, dumped: bool) -> Result<(), String> {
        let pid = entry.proc.pid;
        // CRIU leaves a cgroup it found frozen (the pre-dump hook's) frozen, after a dump and
        // after a failed one alike. Thawed now: after a dump the tasks stop on the SIGSTOP
        // `leave-stopped` sent them before they run a single instruction; after a failed dump
        // they run again (CRIU unseized them alive; its network-unlock hook asked for the
        // abort).
        if let Some(dir) = freezer_of(pid) {
            thaw(&dir).map_err(|e| format!("thawing {}: {e}", dir.display()))?;
        }
        if dumped {
            resume::wait_stopped(pid, std::time::Duration::from_secs(1)).map_err(|e| {
                format!(
                    "the tree runs on after the dump ({e}): CRIU's configuration file \
                     (leave-stopped) was not applied"
                )
            })?;
        }
        Ok(())
    }

    fn restore(&self, r: &Restore<'_>) -> Result<(Invocation, Option<RuncRecord>), RuntimeError> {
        let failed = |what: &'static str, e: String| RuntimeError::SpawnFailed {
            ip: r.ip,
            program: "runc".into(),
            what,
            source: io::Error::other(e),
        };
        let Some(image) = r.image else {
            return Err(RuntimeError::BadRequest(
                "a runc container's images came without its image name".into(),
            ));
        };
        let rootfs = self.image(image)?;
        let id = container_id(r.netns).map_err(|e| failed("naming the container", e))?;
        let bundle = self.bundle(&id);
        let criu_conf = bundle.join("criu.conf");
        let spec = BundleSpec {
            ip: r.ip,
            id: &id,
            rootfs: &rootfs,
            argv: r.argv,
            env: &[],
            netns: r.netns,
            uid: self.isolation.uid(r.ip),
            criu_config: &criu_conf,
        };
        // The restored tree stays stopped (criu.conf: leave-stopped) until the release; no
        // action script: the agent asks for the release itself.
        self.write_bundle(&spec, &bundle, &criu_config(r.lock, None))
            .map_err(|e| failed("writing the bundle", e))?;
        let log = bundle.join("runc.log");
        self.delete(&id, &log);
        let pidfile = bundle.join("restored.pid");
        Ok((
            Invocation {
                name: "runc restore",
                program: self.settings.binary.clone(),
                args: restore_args(&self.root(), &log, r.criu, &id, r.dir, &bundle, &pidfile),
                netns_fd: false,
                log: r.dir.join("restore.log"),
                stats: Stats::Image(r.dir.join("stats-restore")),
                pidfile: Some(pidfile),
                capture: false,
                env: Vec::new(),
            },
            Some(RuncRecord { id, bundle }),
        ))
    }

    fn restore_failed(&self, record: Option<&RuncRecord>) {
        if let Some(rec) = record {
            self.delete(&rec.id, &rec.bundle.join("runc.log"));
            let _ = std::fs::remove_dir_all(&rec.bundle);
        }
    }

    fn resume(&self, entry: &Entry, side: FenceSide) -> io::Result<(usize, usize)> {
        resume::resume_container(entry.proc.pid, side)
    }

    fn kill(&self, entry: &Entry) -> io::Result<()> {
        let rec = self.record(entry)?;
        // First the tree itself, at once (its sockets are in repair mode: nothing is sent),
        // then what runc keeps of it.
        match super::signal_pid(entry.proc.pid, entry.start_time, libc::SIGKILL) {
            Err(e) if e.raw_os_error() != Some(libc::ESRCH) => return Err(e),
            _ => {}
        }
        self.delete(&rec.id, &rec.bundle.join("runc.log"));
        let _ = std::fs::remove_dir_all(&rec.bundle);
        Ok(())
    }

    fn remove(&self, entry: &Entry) {
        let Ok(rec) = self.record(entry) else {
            return;
        };
        self.delete(&rec.id, &rec.bundle.join("runc.log"));
        if let Err(e) = std::fs::remove_dir_all(&rec.bundle)
            && e.kind() != io::ErrorKind::NotFound
        {
            warn!(container = %entry.proc.container, bundle = %rec.bundle.display(), error = %e, "removing the bundle");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_json() -> Value {
        let argv = vec![
            "/usr/bin/redis-server".to_string(),
            "--port".into(),
            "6379".into(),
        ];
        let env = vec![("PATH".to_string(), "/usr/bin".to_string())];
        bundle_config(&BundleSpec {
            ip: Ipv4Addr::new(10, 244, 1, 10),
            id: "ferry-c-10-244-1-10",
            rootfs: Path::new("/var/cache/ferry/rootfs/redis-0011223344556677"),
            argv: &argv,
            env: &env,
            netns: Path::new("/run/netns/ferry-c-10-244-1-10"),
            uid: 0,
            criu_config: Path::new("/run/ferry/agent/runc/bundles/x/criu.conf"),
        })
    }

    /// The bundle: own read-only root, the agent's network namespace by path and new mount,
    /// PID, IPC, UTS namespaces, cgroups under the agent's, tmpfs for /tmp and /data, no new
    /// privileges, one capability, no rlimits, no terminal, CRIU's configuration named.
    #[test]
    fn the_bundle_isolates_and_names_what_criu_needs() {
        let c = spec_json();
        assert_eq!(c["root"]["readonly"], true);
        assert_eq!(
            c["root"]["path"],
            "/var/cache/ferry/rootfs/redis-0011223344556677"
        );
        let ns: Vec<(String, Option<String>)> = c["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| {
                (
                    n["type"].as_str().unwrap().to_owned(),
                    n["path"].as_str().map(str::to_owned),
                )
            })
            .collect();
        assert_eq!(
            ns,
            [
                ("pid".to_string(), None),
                (
                    "network".to_string(),
                    Some("/run/netns/ferry-c-10-244-1-10".to_string())
                ),
                ("ipc".to_string(), None),
                ("uts".to_string(), None),
                ("mount".to_string(), None),
            ]
        );
        assert_eq!(c["linux"]["cgroupsPath"], "ferry/ferry-c-10-244-1-10");
        let p = &c["process"];
        assert_eq!(p["terminal"], false);
        assert_eq!(p["noNewPrivileges"], true);
        assert!(p.get("rlimits").is_none(), "rlimits are never raised");
        assert_eq!(p["user"], json!({"uid": 0, "gid": 0}));
        for set in ["bounding", "effective", "permitted"] {
            assert_eq!(
                p["capabilities"][set],
                json!(["CAP_NET_BIND_SERVICE"]),
                "{set}"
            );
        }
        assert_eq!(p["capabilities"]["ambient"], json!([]));
        assert_eq!(p["args"][0], "/usr/bin/redis-server");
        assert_eq!(p["env"], json!(["PATH=/usr/bin"]));
        let mounts: Vec<(&str, &str)> = c["mounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["destination"].as_str().unwrap(),
                    m["type"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            mounts,
            [("/proc", "proc"), ("/dev", "tmpfs"), ("/tmp", "tmpfs")]
        );
        assert_eq!(
            c["annotations"][CRIU_CONFIG_ANNOTATION],
            "/run/ferry/agent/runc/bundles/x/criu.conf"
        );
        assert_eq!(c["hostname"], "c-10-244-1-10");
        // The uid follows the isolation's.
        let argv = vec!["/bin/sh".to_string()];
        let other = bundle_config(&BundleSpec {
            uid: 1_000_266,
            argv: &argv,
            ..BundleSpec {
                ip: Ipv4Addr::new(10, 244, 1, 10),
                id: "x",
                rootfs: Path::new("/r"),
                argv: &[],
                env: &[],
                netns: Path::new("/run/netns/x"),
                uid: 0,
                criu_config: Path::new("/c"),
            }
        });
        assert_eq!(
            other["process"]["user"],
            json!({"uid": 1_000_266, "gid": 1_000_266})
        );
    }

    #[test]
    fn criu_config_leaves_trees_stopped_and_hands_the_lock_to_ferry() {
        let dump = criu_config(LockMode::Hold, Some(Path::new("/usr/local/bin/ferry")));
        let lines: Vec<&str> = dump.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(
            lines,
            [
                "tcp-established",
                "leave-stopped",
                "network-lock skip",
                "action-script /usr/local/bin/ferry"
            ]
        );
        let restore = criu_config(LockMode::Hold, None);
        assert!(!restore.contains("action-script"), "{restore}");
        assert!(restore.contains("\nleave-stopped\n"), "{restore}");
        let lock = criu_config(LockMode::CriuLock, None);
        assert!(lock.contains("\nnetwork-lock nftables\n"), "{lock}");
    }

    #[test]
    fn command_lines() {
        let s = |a: Vec<OsString>| {
            a.into_iter()
                .map(|s| s.into_string().unwrap())
                .collect::<Vec<_>>()
                .join(" ")
        };
        let c = s(checkpoint_args(
            Path::new("/st"),
            Path::new("/b/runc.log"),
            Path::new("/usr/local/sbin/criu"),
            "id1",
            Path::new("/w/m1-dump"),
        ));
        assert_eq!(
            c,
            "--root /st --log /b/runc.log --log-format json --criu /usr/local/sbin/criu \
             checkpoint --leave-running --tcp-established --image-path /w/m1-dump \
             --work-path /w/m1-dump id1"
        );
        let r = s(restore_args(
            Path::new("/st"),
            Path::new("/b/runc.log"),
            Path::new("/criu"),
            "id2",
            Path::new("/w/m1-restore"),
            Path::new("/b"),
            Path::new("/b/restored.pid"),
        ));
        assert_eq!(
            r,
            "--root /st --log /b/runc.log --log-format json --criu /criu restore --detach \
             --tcp-established --image-path /w/m1-restore --work-path /w/m1-restore --bundle /b \
             --pid-file /b/restored.pid id2"
        );
    }

    #[test]
    fn names_are_checked() {
        valid_image_name("redis-0011223344556677").unwrap();
        for bad in ["", ".hidden", "../etc", "a/b", "a b", &"x".repeat(200)] {
            let e = valid_image_name(bad).unwrap_err();
            assert!(e.contains("image"), "{bad:?}: {e}");
        }
        assert_eq!(
            container_id(Path::new("/run/netns/fl12ab34-a1-c-10-244-1-10")).unwrap(),
            "fl12ab34-a1-c-10-244-1-10"
        );
        assert!(container_id(Path::new("/run/netns/a b")).is_err());
        assert!(container_id(Path::new("/")).is_err());
    }

    #[test]
    fn the_freezer_cgroup_is_found_in_either_hierarchy() {
        let cgroup =
            "9:name=systemd:/ferry/x\n6:freezer:/ferry/x\n4:memory:/a/ferry/x\n0::/ferry/x\n";
        let mountinfo = "30 25 0:26 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n\
            36 30 0:32 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer\n\
            37 30 0:33 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n\
            40 30 0:36 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(
            freezer_dir(cgroup, mountinfo),
            Some(PathBuf::from("/sys/fs/cgroup/freezer/ferry/x"))
        );
        // A unified-only host: the cgroup2 mount.
        let mountinfo2 = "40 30 0:36 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        assert_eq!(
            freezer_dir("0::/ferry/x\n", mountinfo2),
            Some(PathBuf::from("/sys/fs/cgroup/ferry/x"))
        );
        assert_eq!(freezer_dir("0::/x\n", "nothing"), None);
    }

    #[test]
    fn runc_errors_come_from_its_json_log() {
        let log = r#"{"level":"info","msg":"ok","time":"t"}
{"level":"error","msg":"container does not exist","time":"t"}
not json
{"level":"fatal","msg":"criu failed: type NOTIFY errno 0","time":"t"}
"#;
        assert_eq!(
            log_errors(log),
            [
                "container does not exist",
                "criu failed: type NOTIFY errno 0"
            ]
        );
    }

    /// Bytes of a real `stats-dump` (CRIU 4.2.1 under runc 1.1.5) and a made-up restore one.
    #[test]
    fn stats_images_are_read() {
        let dump: &[u8] = &[
            0x40, 0x59, 0x10, 0x55, 0x06, 0x33, 0x09, 0x57, 0x25, 0x00, 0x00, 0x00, 0x0a, 0x23,
            0x08, 0xb4, 0x03, 0x10, 0xfb, 0x87, 0x06, 0x18, 0x81, 0x16, 0x20, 0xf8, 0x0a, 0x28,
            0xda, 0x05, 0x30, 0x00, 0x38, 0xe0, 0x04, 0x40, 0x00, 0x48, 0x00, 0x50, 0x08, 0x58,
            0x08, 0x60, 0x00, 0x68, 0x00, 0x70, 0x00,
        ];
        let mut s = CriuStats::default();
        assert!(parse_stats_image(dump, &mut s));
        assert_eq!(s.freezing_ms, 0.436);
        assert_eq!(s.frozen_ms, 99.323);
        assert_eq!(s.memory_dump_ms, 2.817);
        assert_eq!(s.memory_write_ms, 1.400);
        assert_eq!(s.pages_written, 608);
        // restore = 2 { pages_compared 1: 0, skipped 2: 0, forking 3: 5, restore_time 4: 4089, pages_restored 5: 57 }
        let restore: &[u8] = &[
            0x40, 0x59, 0x10, 0x55, 0x06, 0x33, 0x09, 0x57, 0x0d, 0x00, 0x00, 0x00, 0x12, 0x0b,
            0x08, 0x00, 0x10, 0x00, 0x18, 0x05, 0x20, 0xf9, 0x1f, 0x28, 0x39,
        ];
        assert!(parse_stats_image(restore, &mut s));
        assert_eq!(s.restore_ms, 4.089);
        assert_eq!(s.pages_restored, 57);
        // Truncated or garbage: not read, nothing changed.
        let before = s.clone();
        assert!(!parse_stats_image(&dump[..20], &mut s));
        assert!(!parse_stats_image(b"", &mut s));
        assert!(!parse_stats_image(
            &[0, 0, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 0xff, 0xff, 0xff],
            &mut s
        ));
        assert_eq!(s, before);
    }
}
