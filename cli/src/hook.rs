//! Where CRIU's action script finds its gateway and its container when an orchestrator runs
//! CRIU (`runc checkpoint`, `podman container checkpoint|restore`).
//!
//! Under ferry's own runs the agent starts CRIU with `FERRY_*` in its environment. Under an
//! orchestrator CRIU's environment is runc's, which Podman and conmon do not pass on (seen
//! with Podman 4.3.1: a variable set on `podman container checkpoint` does not reach the
//! hook), and runc reads only a CRIU configuration file (annotation `org.criu.config`:
//! `action-script PATH`). So the hook reads a file instead: `FERRY_HOOK_CONFIG`, else
//! `/etc/ferry/hook.toml`, one `[[host]]` per ferry host on the machine (a lab has several,
//! each in its own network namespace; a real machine has one):
//!
//! ```toml
//! [[host]]
//! name = "a1"
//! netns = "/run/netns/lab-a1"        # only when the machine carries several hosts
//! gateway = "198.18.0.2:7400"
//! token_file = "/etc/ferry/token"
//! tls = { ca = "…/ca.pem", cert = "…/cert.pem", key = "…/key.pem" }
//! container_netns_prefix = "ferry-c-"
//! ```
//!
//! The host is the one whose namespace the hook runs in (CRIU runs in the host's network
//! namespace); the container is the one whose named namespace
//! (`/run/netns/<container_netns_prefix><ip>`, the agent's name for it, which the CNI plugin
//! binds to the runtime's namespace) is the namespace of `CRTOOLS_INIT_PID`.

use std::{
    net::{Ipv4Addr, SocketAddr},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

use ferry_api::Client;
use serde::Deserialize;

use crate::commands::CliError;

/// The configuration file's default place.
pub const DEFAULT_PATH: &str = "/etc/ferry/hook.toml";

/// Where the named network namespaces are.
const NETNS_DIR: &str = "/run/netns";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HookConfig {
    #[serde(rename = "host", default)]
    pub hosts: Vec<HookHost>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HookHost {
    pub name: String,
    /// The host's network namespace, when one machine carries several hosts.
    pub netns: Option<PathBuf>,
    pub gateway: SocketAddr,
    pub token_file: PathBuf,
    /// The host's TLS identity (`ferry certs issue host:NAME`); absent only with
    /// `insecure_plaintext = true`.
    pub tls: Option<ferry_tls::TlsFiles>,
    #[serde(default)]
    pub insecure_plaintext: bool,
    pub container_netns_prefix: String,
}

/// A namespace's identity: (device, inode) of its nsfs file.
pub type NsId = (u64, u64);

fn ns_id(path: &Path) -> Option<NsId> {
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// The configuration to use, if any: `FERRY_HOOK_CONFIG` (which must then exist), else the
/// default file when it exists.
pub fn config_path() -> Result<Option<PathBuf>, CliError> {
    match std::env::var_os("FERRY_HOOK_CONFIG") {
        Some(p) => {
            let p = PathBuf::from(p);
            if p.exists() {
                Ok(Some(p))
            } else {
                Err(CliError::new(
                    "usage",
                    format!(
                        "FERRY_HOOK_CONFIG names {}, which does not exist",
                        p.display()
                    ),
                ))
            }
        }
        None => Ok(Path::new(DEFAULT_PATH)
            .exists()
            .then(|| PathBuf::from(DEFAULT_PATH))),
    }
}

impl HookConfig {
    pub fn load(path: &Path) -> Result<Self, CliError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            CliError::new(
                "usage",
                format!("hook configuration {}: {e}", path.display()),
            )
        })?;
        let c: Self = toml::from_str(&text).map_err(|e| {
            CliError::new(
                "usage",
                format!("hook configuration {}: {e}", path.display()),
            )
        })?;
        if c.hosts.is_empty() {
            return Err(CliError::new(
                "usage",
                format!("hook configuration {}: no [[host]]", path.display()),
            ));
        }
        for h in &c.hosts {
            if h.tls.is_none() && !h.insecure_plaintext {
                return Err(CliError::new(
                    "usage",
                    format!(
                        "hook configuration {}: host {} has no tls (set tls = {{ca, cert, key}}, \
                         or insecure_plaintext = true)",
                        path.display(),
                        h.name
                    ),
                ));
            }
        }
        Ok(c)
    }

    /// The host this hook runs on: the only one, or the one whose `netns` is `own`.
    pub fn pick(
        &self,
        own: Option<NsId>,
        id_of: impl Fn(&Path) -> Option<NsId>,
    ) -> Result<&HookHost, CliError> {
        if let [only] = self.hosts.as_slice()
            && only.netns.is_none()
        {
            return Ok(only);
        }
        self.hosts
            .iter()
            .find(|h| {
                h.netns
                    .as_deref()
                    .and_then(&id_of)
                    .is_some_and(|id| Some(id) == own)
            })
            .ok_or_else(|| {
                CliError::new(
                    "usage",
                    format!(
                        "the hook runs in no network namespace its configuration names (hosts: {})",
                        self.hosts
                            .iter()
                            .map(|h| h.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )
            })
    }
}

impl HookHost {
    pub fn client(&self) -> Result<Client, CliError> {
        let tls = match (&self.tls, self.insecure_plaintext) {
            (_, true) => None,
            (Some(files), false) => Some(
                ferry_tls::Tls::load(files)
                    .map_err(|e| {
                        CliError::new("tls", format!("hook host {}: TLS: {e}", self.name))
                    })?
                    .client_config(),
            ),
            (None, false) => unreachable!("checked at load"),
        };
        Ok(Client::with_token_file(self.gateway, &self.token_file)
            .map_err(CliError::from)?
            .with_tls(tls))
    }

    /// The container whose namespace `pid` is in.
    pub fn container_of(&self, pid: i32) -> Result<Ipv4Addr, CliError> {
        let want = ns_id(Path::new(&format!("/proc/{pid}/ns/net"))).ok_or_else(|| {
            CliError::new(
                "unknown_container",
                format!("CRIU's task {pid}: no network namespace to read"),
            )
        })?;
        let names = std::fs::read_dir(NETNS_DIR)
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        find_container(&self.container_netns_prefix, &names, want, |n| {
            ns_id(&Path::new(NETNS_DIR).join(n))
        })
        .ok_or_else(|| {
            CliError::new(
                "unknown_container",
                format!(
                    "CRIU's task {pid} is in no container namespace of host {} ({NETNS_DIR}/{}<ip>): \
                     was the container started with ferry's CNI network?",
                    self.name, self.container_netns_prefix
                ),
            )
        })
    }
}

/// The container among `names` (namespace names) whose namespace is `want`.
pub fn find_container(
    prefix: &str,
    names: &[String],
    want: NsId,
    id_of: impl Fn(&str) -> Option<NsId>,
) -> Option<Ipv4Addr> {
    names.iter().find_map(|n| {
        let ip = ferry_config::parse_container_netns_name(prefix, n)?;
        (id_of(n) == Some(want)).then_some(ip)
    })
}

/// This process's network namespace.
pub fn own_netns() -> Option<NsId> {
    ns_id(Path::new("/proc/self/ns/net"))
}

/// Sends SIGCONT to every task in the PID namespace whose init is `init` (host PIDs): the
/// tree CRIU restored stopped (`leave-stopped`). Returns how many. Written here rather than
/// shared with the agent's copy (`ferry_node_agent::criu::resume::cont`): the CLI does not
/// link the agent.
pub fn continue_tree(init: i32) -> std::io::Result<usize> {
    let ns = std::fs::metadata(format!("/proc/{init}/ns/pid"))?.ino();
    let mut n = 0;
    for e in std::fs::read_dir("/proc")?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if std::fs::metadata(format!("/proc/{pid}/ns/pid")).is_ok_and(|m| m.ino() == ns) {
            // SAFETY: plain kill(2) on a task of the tree CRIU just restored.
            unsafe { libc::kill(pid, libc::SIGCONT) };
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(name: &str, netns: Option<&str>) -> HookHost {
        HookHost {
            name: name.into(),
            netns: netns.map(PathBuf::from),
            gateway: "127.0.0.1:7400".parse().expect("addr"),
            token_file: "/t".into(),
            tls: None,
            insecure_plaintext: true,
            container_netns_prefix: format!("{name}-c-"),
        }
    }

    #[test]
    fn the_host_is_the_namespace_the_hook_runs_in() {
        let c = HookConfig {
            hosts: vec![host("a1", Some("/n/a1")), host("b1", Some("/n/b1"))],
        };
        let id = |p: &Path| match p.to_str() {
            Some("/n/a1") => Some((1, 10)),
            Some("/n/b1") => Some((1, 20)),
            _ => None,
        };
        assert_eq!(c.pick(Some((1, 20)), id).expect("b1").name, "b1");
        assert_eq!(c.pick(Some((1, 10)), id).expect("a1").name, "a1");
        let e = c.pick(Some((1, 30)), id).expect_err("none");
        assert!(e.message.contains("a1, b1"), "{}", e.message);
        // One host without a namespace: that one, wherever the hook runs.
        let one = HookConfig {
            hosts: vec![host("solo", None)],
        };
        assert_eq!(one.pick(Some((9, 9)), id).expect("solo").name, "solo");
    }

    #[test]
    fn the_container_is_the_named_namespace_of_the_task() {
        let names: Vec<String> = [
            "a1-c-10-244-1-5",
            "a1-c-10-244-1-6",
            "b1-c-10-244-1-6",
            "netns-1234",
            "a1-c-bad",
        ]
        .map(String::from)
        .to_vec();
        let id = |n: &str| match n {
            "a1-c-10-244-1-5" => Some((1, 5)),
            "a1-c-10-244-1-6" => Some((1, 6)),
            "b1-c-10-244-1-6" => Some((1, 7)),
            "netns-1234" => Some((1, 6)),
            _ => None,
        };
        assert_eq!(
            find_container("a1-c-", &names, (1, 6), id),
            Some("10.244.1.6".parse().expect("ip"))
        );
        assert_eq!(find_container("b1-c-", &names, (1, 6), id), None);
        assert_eq!(find_container("a1-c-", &names, (1, 99), id), None);
    }

    #[test]
    fn configurations_are_checked() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path().join("hook.toml");
        std::fs::write(&p, "").expect("write");
        assert!(HookConfig::load(&p).is_err());
        std::fs::write(
            &p,
            "[[host]]\nname = \"a1\"\ngateway = \"10.0.0.1:7400\"\ntoken_file = \"/t\"\ncontainer_netns_prefix = \"c-\"\n",
        )
        .expect("write");
        let e = HookConfig::load(&p).expect_err("no tls");
        assert!(e.message.contains("insecure_plaintext"), "{}", e.message);
        std::fs::write(
            &p,
            "[[host]]\nname = \"a1\"\ngateway = \"10.0.0.1:7400\"\ntoken_file = \"/t\"\ncontainer_netns_prefix = \"c-\"\ninsecure_plaintext = true\n",
        )
        .expect("write");
        assert_eq!(HookConfig::load(&p).expect("ok").hosts[0].name, "a1");
    }
}
