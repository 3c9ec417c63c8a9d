//! Podman on the lab's hosts: one Podman per host, as on separate machines.
//!
//! Every host has its own storage (`--root`, `--runroot`), its own `containers.conf`
//! (runc, cgroupfs, file events, rlimits this machine can grant, Podman's CNI backend with
//! ferry's plugin) and its own CNI network `ferry` that talks to that host's agent. Podman runs
//! in the host's network namespace (`nsenter --net`, the mount namespace stays the machine's,
//! so the namespaces Podman makes under /run/netns are visible to the agent and the hook).
//!
//! CRIU under Podman runs ferry's hook through a CRIU configuration file
//! ([`HookFiles::criu_conf`], given to `podman run --annotation org.criu.config=…`): it runs
//! `<state>/ferry-hook`, which runs `ferry action-script` with the lab's hook configuration
//! (`<state>/hook.toml`: one `[[host]]` per host, chosen by the namespace the hook runs in).

use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
};

use ferry_overlay::netns::command_in;

use crate::{Lab, LabError, bins::find_binary, control::Party, lab::container_netns_prefix, state};

/// The CNI network every lab host's Podman has.
pub const NETWORK: &str = "ferry";

/// A host's Podman.
pub struct Podman<'a> {
    lab: &'a Lab,
    host: String,
}

/// The files CRIU's hook needs under Podman or runc.
pub struct HookFiles {
    /// CRIU configuration: `action-script` + `network-lock skip` + `leave-stopped`
    /// (annotation `org.criu.config`).
    pub criu_conf: PathBuf,
    /// The hook configuration `ferry action-script` reads (`FERRY_HOOK_CONFIG`).
    pub hook_config: PathBuf,
}

/// `<state>/podman/<host>`.
pub fn podman_dir(prefix: &str, host: &str) -> PathBuf {
    state::state_dir(prefix).join("podman").join(host)
}

/// Podman's global options on a lab host: its own storage (`--root`, `--runroot`) and its own
/// runc state (`--runtime-flag root=…`: Podman's default, /run/runc, is one per machine, and
/// a container kept stopped on its source while it is restored on its destination has the
/// same ID on both).
pub fn global_args(prefix: &str, host: &str) -> Vec<String> {
    let dir = podman_dir(prefix, host);
    vec![
        "--root".into(),
        dir.join("root").display().to_string(),
        "--runroot".into(),
        dir.join("run").display().to_string(),
        "--runtime-flag".into(),
        format!("root={}", dir.join("runc").display()),
    ]
}

/// The agent's `[runtime.podman]` on a lab host: the same Podman as [`Lab::podman`].
pub fn agent_config(prefix: &str, host: &str) -> ferry_config::PodmanConfig {
    ferry_config::PodmanConfig {
        args: global_args(prefix, host),
        containers_conf: Some(podman_dir(prefix, host).join("containers.conf")),
        ..Default::default()
    }
}

/// `podman` with a lab host's configuration and global options, in no namespace yet.
fn base_command(prefix: &str, host: &str) -> Command {
    let mut cmd = Command::new("podman");
    cmd.env(
        "CONTAINERS_CONF",
        podman_dir(prefix, host).join("containers.conf"),
    )
    .args(global_args(prefix, host))
    .stdin(Stdio::null());
    cmd
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LabError {
    let what = what.into();
    move |e| LabError::io(what, e)
}

impl Lab {
    /// `host`'s Podman (its configuration written on first use).
    pub fn podman(&self, host: &str) -> Result<Podman<'_>, LabError> {
        if self.host(host).is_none() {
            return Err(LabError::UnknownNode {
                prefix: self.prefix().to_owned(),
                name: host.to_owned(),
                known: self
                    .topology()
                    .hosts
                    .iter()
                    .map(|h| h.name.clone())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        let p = Podman {
            lab: self,
            host: host.to_owned(),
        };
        p.write_config()?;
        Ok(p)
    }

    /// Writes (once) the hook's files for CRIU under Podman and runc.
    pub fn hook_files(&self) -> Result<HookFiles, LabError> {
        let dir = self.state_dir();
        let files = HookFiles {
            criu_conf: dir.join("criu-ferry.conf"),
            hook_config: dir.join("hook.toml"),
        };
        if files.criu_conf.exists() {
            return Ok(files);
        }
        let cp = self.control().ok_or_else(|| LabError::Ferry {
            args: String::new(),
            message: "the hook needs a gateway (the topology has no [internet])".into(),
        })?;
        let mut toml = String::from("# written by ferry-lab: one [[host]] per lab host\n");
        for h in &self.topology().hosts {
            let tls = match cp.tls_files(Party::Host(&h.name)) {
                Some(f) => format!(
                    "tls = {{ ca = \"{}\", cert = \"{}\", key = \"{}\" }}\n",
                    f.ca.display(),
                    f.cert.display(),
                    f.key.display()
                ),
                None => "insecure_plaintext = true\n".into(),
            };
            toml.push_str(&format!(
                "\n[[host]]\nname = \"{}\"\nnetns = \"{}\"\ngateway = \"{}\"\ntoken_file = \"{}\"\n\
                 container_netns_prefix = \"{}\"\n{tls}",
                h.name,
                self.netns(&h.name).display(),
                cp.api,
                cp.token_file.display(),
                container_netns_prefix(self.prefix(), &h.name),
            ));
        }
        std::fs::write(&files.hook_config, toml).map_err(io("writing the hook configuration"))?;
        let ferry = find_binary("ferry", "ferry-cli")?;
        let script = dir.join("ferry-hook");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\n# CRIU's action script under Podman/runc (written by ferry-lab)\n\
                 FERRY_HOOK_CONFIG='{}' FERRY_FAULT_DIR='{}' exec '{}' action-script\n",
                files.hook_config.display(),
                self.fault_dir().display(),
                ferry.display()
            ),
        )
        .map_err(io("writing the hook script"))?;
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))
            .map_err(io("chmod the hook script"))?;
        std::fs::write(
            &files.criu_conf,
            format!(
                "# ferry's hook (written by ferry-lab): CRIU holds no lock of its own, and a\n\
                 # dumped or restored tree stays stopped until the migration is decided\n\
                 action-script {}\nnetwork-lock skip\nleave-stopped\n",
                script.display()
            ),
        )
        .map_err(io("writing the CRIU configuration"))?;
        Ok(files)
    }
}

impl Podman<'_> {
    /// `<state>/podman/<host>`.
    pub fn dir(&self) -> PathBuf {
        podman_dir(self.lab.prefix(), &self.host)
    }

    fn write_config(&self) -> Result<(), LabError> {
        let dir = self.dir();
        let conf = dir.join("containers.conf");
        if conf.exists() {
            return Ok(());
        }
        for d in ["root", "run", "runc", "tmp", "net"] {
            std::fs::create_dir_all(dir.join(d))
                .map_err(io(format!("creating {}", dir.display())))?;
        }
        let cni = find_binary("ferry-cni", "ferry-cni")?;
        let cni_dir = cni.parent().expect("a binary has a directory");
        std::fs::write(
            &conf,
            format!(
                "# {host}'s Podman (written by ferry-lab)\n\
                 [containers]\n\
                 # raising rlimits needs CAP_SYS_RESOURCE, which this machine lacks\n\
                 default_ulimits = [\"nofile=20000:20000\", \"nproc=4096:4096\"]\n\
                 [engine]\n\
                 runtime = \"runc\"\n\
                 cgroup_manager = \"cgroupfs\"\n\
                 events_logger = \"file\"\n\
                 events_logfile_path = \"{d}/events.log\"\n\
                 tmp_dir = \"{d}/tmp\"\n\
                 [network]\n\
                 network_backend = \"cni\"\n\
                 cni_plugin_dirs = [\"{cni}\"]\n\
                 network_config_dir = \"{d}/net\"\n",
                host = self.host,
                d = dir.display(),
                cni = cni_dir.display(),
            ),
        )
        .map_err(io("writing containers.conf"))?;
        // One configuration for every host of the lab, each agent named by its host's
        // namespace: Podman caches a container's configuration in /var/lib/cni, one per
        // machine, by network, container ID and interface, and a container keeps its ID on
        // every host it moves to.
        let agents: Vec<serde_json::Value> = self
            .lab
            .topology()
            .hosts
            .iter()
            .map(|h| {
                serde_json::json!({
                    "netns": self.lab.netns(&h.name),
                    "socket": self.lab.cni_socket(&h.name),
                })
            })
            .collect();
        let net = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": NETWORK,
            "plugins": [{
                "type": "ferry-cni",
                "agents": agents,
                "capabilities": {"ips": true, "mac": true},
            }],
        });
        std::fs::write(
            dir.join("net").join(format!("{NETWORK}.conflist")),
            serde_json::to_vec_pretty(&net).expect("json"),
        )
        .map_err(io("writing the CNI network"))
    }

    /// `podman ARGS` on this host, not yet run.
    pub fn command(&self, args: &[&str]) -> Result<Command, LabError> {
        let mut cmd = base_command(self.lab.prefix(), &self.host);
        cmd.args(args);
        command_in(&mut cmd, &self.lab.netns(&self.host))?;
        Ok(cmd)
    }

    /// Runs `podman ARGS` on this host; its stdout, or an error with its stderr.
    pub fn run(&self, args: &[&str]) -> Result<String, LabError> {
        let out: Output = self
            .command(args)?
            .output()
            .map_err(io(format!("running podman {args:?} on {}", self.host)))?;
        if !out.status.success() {
            return Err(LabError::Ferry {
                args: format!("podman {}", args.join(" ")),
                message: format!(
                    "on {}: {}",
                    self.host,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            });
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Loads an image archive (`podman save`): every host loads the same archive, so an
    /// image has the same ID everywhere, which `podman container restore --import` needs
    /// (it names the image of a checkpoint by ID).
    pub fn load(&self, archive: &Path) -> Result<(), LabError> {
        self.run(&["load", "-q", "-i", &archive.to_string_lossy()])
            .map(drop)
    }
}

/// Forgets runc's state of container `id` on `host` if Podman no longer has the container
/// there (lab only). Two lab hosts share one machine's cgroupfs hierarchy, and a container
/// keeps its ID (so its cgroup path `libpod_parent/libpod-<ID>`) on every host: when the
/// source's stopped copy is removed after the release, runc cannot remove that cgroup (the
/// destination's tree is in it), fails its `delete`, and keeps the container's state in the
/// host's runc root, which a later restore of the same container on that host then trips on
/// ("container with given ID already exists"). Separate machines share no cgroup. Returns
/// whether a stale state was removed.
pub fn forget_stale_runc_state(lab: &Lab, host: &str, id: &str) -> Result<bool, LabError> {
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(LabError::Ferry {
            args: format!("forget runc state {id:?}"),
            message: "not a container ID".into(),
        });
    }
    let state = podman_dir(lab.prefix(), host).join("runc").join(id);
    if !state.exists() {
        return Ok(false);
    }
    let known = lab
        .podman(host)?
        .command(&["container", "exists", id])?
        .status()
        .map_err(io("podman container exists"))?;
    if known.success() {
        return Ok(false);
    }
    std::fs::remove_dir_all(&state).map_err(io(format!("removing {}", state.display())))?;
    Ok(true)
}

/// After a run released container `id` away from `host` (lab only): waits (up to 5 s) until
/// `host`'s Podman no longer has it (its agent removes the source's copy as the release
/// reaches it), then [`forget_stale_runc_state`]. Returns whether a stale state was removed.
pub fn settle_source(lab: &Lab, host: &str, id: &str) -> Result<bool, LabError> {
    let gone = crate::clock::wait_until(
        std::time::Duration::from_secs(5),
        std::time::Duration::from_millis(20),
        || {
            let exists = lab
                .podman(host)?
                .command(&["container", "exists", id])?
                .status()
                .map_err(io("podman container exists"))?;
            Ok::<_, LabError>((!exists.success()).then_some(()))
        },
    )?;
    match gone {
        Some(()) => forget_stale_runc_state(lab, host, id),
        None => Ok(false),
    }
}

/// Removes every container of every host's Podman (best effort: teardown goes on and reports).
pub fn teardown_podman(prefix: &str, hosts: &[String]) -> Vec<String> {
    let mut errors = teardown_podman_hosts(prefix, hosts);
    errors.extend(forget_cni_cache(Path::new(CNI_CACHE), prefix));
    errors
}

/// Where Podman's CNI backend caches each attachment (one directory per machine).
pub const CNI_CACHE: &str = "/var/lib/cni/results";

/// Removes the entries of Podman's CNI cache (`dir`) whose network configuration names this
/// lab's state directory (`/run/ferry-lab/<prefix>/`: its agents' sockets), and only those.
/// Normally a container's removal takes its entry with it; a lab whose containers went without
/// Podman (a killed test, a failed restore) would otherwise leave them behind for good. Keeps
/// going past errors and reports each.
pub fn forget_cni_cache(dir: &Path, prefix: &str) -> Vec<String> {
    use base64::Engine as _;
    let mut errors = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return errors;
    };
    let mark = format!("{}/", state::state_dir(prefix).display());
    for e in entries.flatten() {
        let path = e.path();
        let ours = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .and_then(|v| {
                let conf = v["config"].as_str()?;
                base64::engine::general_purpose::STANDARD.decode(conf).ok()
            })
            .is_some_and(|conf| String::from_utf8_lossy(&conf).contains(&mark));
        if ours && let Err(err) = std::fs::remove_file(&path) {
            errors.push(format!("removing {}: {err}", path.display()));
        }
    }
    errors
}

fn teardown_podman_hosts(prefix: &str, hosts: &[String]) -> Vec<String> {
    let mut errors = Vec::new();
    for host in hosts {
        let dir = podman_dir(prefix, host);
        if !dir.join("containers.conf").exists() {
            continue;
        }
        let netns = crate::netns_name(prefix, host);
        let mut cmd = base_command(prefix, host);
        cmd.args(["rm", "-f", "-a", "-t", "0"]);
        let r = command_in(&mut cmd, &ferry_overlay::netns::netns_path(&netns))
            .map_err(|e| e.to_string())
            .and_then(|()| cmd.output().map_err(|e| e.to_string()));
        match r {
            Ok(o) if o.status.success() => {}
            Ok(o) => errors.push(format!(
                "podman rm on {host}: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => errors.push(format!("podman rm on {host}: {e}")),
        }
    }
    errors
}

/// A Podman image archive (`podman save`) of the root file system `rootfs`, tagged `tag`:
/// made once, cached beside the directory (`<rootfs>.podman.tar`, written to a temporary name
/// and renamed, so an interrupted build leaves nothing half made). Every host loads this same
/// archive ([`Podman::load`]), so the image has one ID everywhere.
pub fn image_archive(rootfs: &Path, tag: &str) -> Result<PathBuf, LabError> {
    let archive = PathBuf::from(format!("{}.podman.tar", rootfs.display()));
    if archive.exists() {
        return Ok(archive);
    }
    // Short: Podman refuses a runroot longer than 50 characters.
    let scratch = PathBuf::from(format!("/run/ferry-img-{}", std::process::id()));
    let result = (|| {
        std::fs::create_dir_all(&scratch).map_err(io("creating the image scratch directory"))?;
        let tar = scratch.join("rootfs.tar");
        run_tool(
            Command::new("tar")
                .arg("-C")
                .arg(rootfs)
                .arg("-cf")
                .arg(&tar)
                .arg("."),
            "tar of the root file system",
        )?;
        // vfs: no mounts to undo in the scratch storage.
        let podman = |args: &[&str]| {
            let mut c = Command::new("podman");
            c.arg("--root")
                .arg(scratch.join("root"))
                .arg("--runroot")
                .arg(scratch.join("run"))
                .args([
                    "--storage-driver",
                    "vfs",
                    "--cgroup-manager",
                    "cgroupfs",
                    "--events-backend",
                    "none",
                ])
                .args(args)
                .stdin(Stdio::null());
            c
        };
        run_tool(
            &mut podman(&["import", "-q", &tar.to_string_lossy(), tag]),
            "podman import",
        )?;
        let tmp = scratch.join("image.tar");
        run_tool(
            &mut podman(&["save", "-q", "-o", &tmp.to_string_lossy(), tag]),
            "podman save",
        )?;
        std::fs::rename(&tmp, &archive).map_err(io("moving the image archive in place"))
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    result.map(|()| archive)
}

fn run_tool(cmd: &mut Command, what: &str) -> Result<(), LabError> {
    let out = cmd.output().map_err(io(what.to_owned()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(LabError::Ferry {
            args: what.to_owned(),
            message: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use base64::Engine as _;

    use super::*;

    fn entry(dir: &Path, name: &str, conf: &str) -> PathBuf {
        let b64 = base64::engine::general_purpose::STANDARD.encode(conf);
        let p = dir.join(name);
        std::fs::write(
            &p,
            serde_json::json!({"kind": "cniCacheV1", "config": b64}).to_string(),
        )
        .unwrap();
        p
    }

    #[test]
    fn only_this_labs_cni_cache_entries_go() {
        let dir = std::env::temp_dir().join(format!("ferry-cni-cache-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = |p: &str| {
            format!(
                r#"{{"agent": "{}/a1/cni.sock"}}"#,
                state::state_dir(p).display()
            )
        };
        let ours = entry(&dir, "ferry-aa-eth0", &sock("flaaaaaa"));
        let other_lab = entry(&dir, "ferry-bb-eth0", &sock("flbbbbbb"));
        // A prefix of ours is not ours.
        let longer = entry(&dir, "ferry-cc-eth0", &sock("flaaaaaab"));
        let not_json = dir.join("garbage");
        std::fs::write(&not_json, "{").unwrap();
        let errors = forget_cni_cache(&dir, "flaaaaaa");
        assert!(errors.is_empty(), "{errors:?}");
        assert!(!ours.exists());
        assert!(other_lab.exists() && longer.exists() && not_json.exists());
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(
            forget_cni_cache(&dir, "flaaaaaa").is_empty(),
            "no cache: nothing to do"
        );
    }
}
