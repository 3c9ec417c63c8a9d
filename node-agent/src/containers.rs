//! The network side of local containers: a network namespace and a veth pair (from-container
//! on its host end is the datapath's part, see `node::steps`). The agent creates them when the
//! registry places an endpoint here and removes them when it leaves.
//!
//! A restarted agent adopts a container's network side that an earlier agent built (same
//! namespace, same veth: [`ContainerNet::adopt`]) instead of rebuilding it, and no namespace
//! is ever deleted with processes still inside: [`ContainerNet::delete`] SIGKILLs every
//! process whose network namespace it is first (found by scanning /proc, whoever started
//! them), so no container process outlives its namespace.
//!
//! A container wired by the CNI plugin ([`crate::cni`]) lives in a container runtime's
//! namespace instead: the agent's name for it (`/run/netns/<prefix><ip>`) is a bind mount of
//! the runtime's namespace, recorded as an [`Attachment`] before the endpoint is registered.
//! For such a container `create` builds the veth into that namespace (it creates none),
//! `adopt` checks it is still that namespace, and `delete` removes only the veth: the
//! namespace and its processes are the runtime's, and the name goes with the CNI `DEL`.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    os::fd::BorrowedFd,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use ferry_overlay::{
    netlink::{CONTAINER_IF, ContainerLink, Netlink},
    netns, sys,
};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::{
    node::seams::ContainerNet,
    plan::{LocalContainer, container_host_if, container_netns_name},
};

/// MAC of every host-side container veth (the container's default gateway), same on every
/// host; the datapath answers ARP with it too. Defined with the datapath's types.
pub use ferry_common::GATEWAY_MAC;

/// A container's network side as built on this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Built {
    pub ip: Ipv4Addr,
    pub mac: String,
    pub netns: PathBuf,
    pub host_if: String,
    pub ifindex: u32,
    /// The container's interface inside `netns` ([`CONTAINER_IF`] unless a CNI runtime named
    /// it otherwise).
    pub ifname: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("container {ip}: {source}")]
    NetNs {
        ip: Ipv4Addr,
        source: netns::NetNsError,
    },
    #[error("container {ip}: {source}")]
    Netlink {
        ip: Ipv4Addr,
        source: ferry_overlay::netlink::NetlinkError,
    },
    #[error("container {ip}: sysctl: {source}")]
    Sysctl {
        ip: Ipv4Addr,
        source: std::io::Error,
    },
    #[error("container {ip}: stopping the processes in {netns}: {source}")]
    Kill {
        ip: Ipv4Addr,
        netns: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "container {ip}: {netns} is no longer the namespace its CNI runtime attached (want \
         inode {want}, found {found})"
    )]
    NotAttached {
        ip: Ipv4Addr,
        netns: PathBuf,
        want: u64,
        found: String,
    },
    #[error("recording CNI attachments in {path}: {source}")]
    Record {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl ContainerError {
    /// A name (namespace, file) that had to be new exists already.
    pub fn is_already_exists(&self) -> bool {
        matches!(
            self,
            ContainerError::NetNs {
                source: netns::NetNsError::Create { source, .. },
                ..
            } if source.kind() == std::io::ErrorKind::AlreadyExists
        )
    }
}

/// A container runtime's network namespace made container `ip`'s by the CNI plugin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Attachment {
    pub ip: Ipv4Addr,
    /// The runtime's `CNI_CONTAINERID` and `CNI_IFNAME`.
    pub container_id: String,
    pub ifname: String,
    /// The CNI network's name.
    pub network: String,
    /// (device, inode) of the runtime's namespace: what the agent's name must still be.
    pub netns_dev: u64,
    pub netns_ino: u64,
    /// The runtime's path of it (for logs; it may be in a mount namespace the agent lacks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_netns: Option<PathBuf>,
}

impl Attachment {
    /// Whether the namespace at `path` is this attachment's.
    pub fn is_at(&self, path: &Path) -> bool {
        netns::ns_id(path).is_ok_and(|id| id == (self.netns_dev, self.netns_ino))
    }
}

/// This host's CNI attachments, by container address: shared by the CNI server (which adds
/// and removes them) and [`HostNetwork`] (which builds into them), and written to
/// `<state_dir>/cni.json` on every change, so a restarted agent never takes a runtime's
/// namespace for one of its own.
#[derive(Debug, Clone, Default)]
pub struct Attachments {
    inner: Arc<Mutex<BTreeMap<Ipv4Addr, Attachment>>>,
    file: Option<PathBuf>,
    /// Why building an attached container last failed (for the CNI answer).
    errors: Arc<Mutex<BTreeMap<Ipv4Addr, String>>>,
}

/// The attachments' file in the agent's state directory.
pub const ATTACHMENTS_FILE: &str = "cni.json";

impl Attachments {
    /// The attachments recorded in `file` (none if it is missing; an unreadable file is
    /// moved aside to `cni.json.corrupt` and said in the log).
    pub fn load(file: PathBuf) -> Self {
        let map = match std::fs::read(&file) {
            Ok(bytes) => match serde_json::from_slice::<Vec<Attachment>>(&bytes) {
                Ok(v) => v.into_iter().map(|a| (a.ip, a)).collect(),
                Err(e) => {
                    let aside = file.with_extension("json.corrupt");
                    warn!(path = %file.display(), error = %e, aside = %aside.display(), "CNI attachments unreadable: moved aside");
                    let _ = std::fs::rename(&file, &aside);
                    BTreeMap::new()
                }
            },
            Err(_) => BTreeMap::new(),
        };
        if !map.is_empty() {
            info!(
                attachments = map.len(),
                "CNI attachments of the previous agent"
            );
        }
        Self {
            inner: Arc::new(Mutex::new(map)),
            file: Some(file),
            errors: Arc::default(),
        }
    }

    /// Remembers why building attached container `ip` failed.
    pub fn set_error(&self, ip: Ipv4Addr, why: String) {
        self.errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(ip, why);
    }

    /// Why building attached container `ip` last failed, if it did (and forgets it).
    pub fn take_error(&self, ip: Ipv4Addr) -> Option<String> {
        self.errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&ip)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<Ipv4Addr, Attachment>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, ip: Ipv4Addr) -> Option<Attachment> {
        self.lock().get(&ip).cloned()
    }

    /// The attachment of a runtime's container interface.
    pub fn find(&self, container_id: &str, ifname: &str) -> Option<Attachment> {
        self.lock()
            .values()
            .find(|a| a.container_id == container_id && a.ifname == ifname)
            .cloned()
    }

    pub fn all(&self) -> Vec<Attachment> {
        self.lock().values().cloned().collect()
    }

    /// Records `a` (replacing one for the same address) and writes the file.
    pub fn insert(&self, a: Attachment) -> Result<(), ContainerError> {
        let mut m = self.lock();
        let before = m.insert(a.ip, a.clone());
        if let Err(e) = self.write(&m) {
            match before {
                Some(b) => m.insert(a.ip, b),
                None => m.remove(&a.ip),
            };
            return Err(e);
        }
        Ok(())
    }

    /// Forgets container `ip`'s attachment and writes the file.
    pub fn remove(&self, ip: Ipv4Addr) -> Result<Option<Attachment>, ContainerError> {
        let mut m = self.lock();
        let Some(a) = m.remove(&ip) else {
            return Ok(None);
        };
        if let Err(e) = self.write(&m) {
            m.insert(ip, a);
            return Err(e);
        }
        Ok(Some(a))
    }

    fn write(&self, m: &BTreeMap<Ipv4Addr, Attachment>) -> Result<(), ContainerError> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        let record = |source| ContainerError::Record {
            path: file.clone(),
            source,
        };
        if m.is_empty() {
            return match std::fs::remove_file(file) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(record(e)),
                _ => Ok(()),
            };
        }
        let v: Vec<&Attachment> = m.values().collect();
        let bytes = serde_json::to_vec_pretty(&v).map_err(|e| record(e.into()))?;
        crate::runtime::store::write_atomic(file, &bytes).map_err(record)
    }
}

/// How long the processes of a namespace being deleted get to die after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// The real [`ContainerNet`]: namespaces and veths in the host's network namespace, over
/// netlink (`nl` is bound to it).
pub struct HostNetwork {
    pub nl: Netlink,
    pub netns_prefix: String,
    pub mtu: u32,
    pub host_overlay_ip: Ipv4Addr,
    /// Dual-stack overlay: its /96 IPv6 prefix (a container's IPv6 address is the prefix
    /// followed by its IPv4 address).
    pub overlay6: Option<ipnet::Ipv6Net>,
    /// Containers that live in a CNI runtime's namespace.
    pub attached: Attachments,
}

impl ContainerNet for HostNetwork {
    type Error = ContainerError;
    type Buffers = crate::drain::NetnsUdpBuffers;

    fn udp_buffers(&self, built: &Built) -> Self::Buffers {
        crate::drain::NetnsUdpBuffers::new(built.netns.clone())
    }

    /// Creates the named namespace — or, for a CNI container, checks that the name is still
    /// its runtime's namespace — then the veth pair (see [`Netlink::create_container_link`]).
    /// On failure, whatever was made is removed again.
    async fn create(&self, c: &LocalContainer) -> Result<Built, ContainerError> {
        let ip = c.ip;
        let name = container_netns_name(&self.netns_prefix, ip);
        let host_if = container_host_if(ip);
        let attached = self.attached.get(ip);
        let path = match &attached {
            Some(a) => self.attached_path(a)?,
            None => netns::create_named_async(&name)
                .await
                .map_err(|source| ContainerError::NetNs { ip, source })?,
        };
        let ifname = attached.map_or_else(|| CONTAINER_IF.to_owned(), |a| a.ifname);
        match self.build(c, &path, &host_if, &ifname).await {
            Ok(ifindex) => {
                info!(%ip, mac = %c.mac, netns = %path.display(), %host_if, ifindex, %ifname, "container network ready");
                Ok(Built {
                    ip,
                    mac: c.mac.to_string(),
                    netns: path,
                    host_if,
                    ifindex,
                    ifname,
                })
            }
            Err(e) => {
                if let Err(e2) = self.delete(ip).await {
                    warn!(%ip, error = %e2, "cleaning up after a failed create");
                }
                if self.attached.get(ip).is_some() {
                    self.attached.set_error(ip, e.to_string());
                }
                Err(e)
            }
        }
    }

    /// Adopts what an earlier agent built for `c`: the namespace exists and its veth matches
    /// (see [`Netlink::adopt_container_link`]). `None`: nothing there, or something else.
    async fn adopt(&self, c: &LocalContainer) -> Result<Option<Built>, ContainerError> {
        let ip = c.ip;
        let path = netns::netns_path(&container_netns_name(&self.netns_prefix, ip));
        if !path.exists() {
            return Ok(None);
        }
        let attached = self.attached.get(ip);
        if let Some(a) = &attached
            && !a.is_at(&path)
        {
            return Ok(None);
        }
        let ifname = attached.map_or_else(|| CONTAINER_IF.to_owned(), |a| a.ifname);
        let host_if = container_host_if(ip);
        let spec = self.link_spec(c, &path, &host_if, &ifname);
        let adopted = self
            .nl
            .adopt_container_link(&spec)
            .await
            .map_err(|source| ContainerError::Netlink { ip, source })?;
        Ok(adopted.map(|ifindex| {
            let inode = netns::ns_id(&path).map(|(_, ino)| ino).unwrap_or_default();
            info!(%ip, mac = %c.mac, netns = %path.display(), netns_inode = inode, %host_if, ifindex, "container network adopted");
            Built {
                ip,
                mac: c.mac.to_string(),
                netns: path,
                host_if,
                ifindex,
                ifname,
            }
        }))
    }

    /// Container namespaces of this agent's prefix that exist on the host.
    fn vanished(&self, built: &Built) -> bool {
        !built.netns.exists()
    }

    async fn existing(&self) -> Vec<Ipv4Addr> {
        let prefix = self.netns_prefix.clone();
        tokio::task::spawn_blocking(move || existing_containers(&prefix))
            .await
            .unwrap_or_default()
    }

    /// Kills every process inside the container's namespace, then deletes the veth (both
    /// ends) and the namespace's name. Keeps going on errors and reports the first. A CNI
    /// container loses its veth only: its namespace and processes are its runtime's, and the
    /// name goes with the CNI `DEL` ([`HostNetwork::detach`]).
    async fn delete(&self, ip: Ipv4Addr) -> Result<(), ContainerError> {
        let host_if = container_host_if(ip);
        if self.attached.get(ip).is_some() {
            self.nl
                .delete_link(&host_if)
                .await
                .map_err(|source| ContainerError::Netlink { ip, source })?;
            return Ok(());
        }
        let mut first: Option<ContainerError> = None;
        if let Err(e) = kill_processes(&self.netns_prefix, ip).await {
            first.get_or_insert(e);
        }
        if let Err(source) = self.nl.delete_link(&host_if).await {
            first.get_or_insert(ContainerError::Netlink { ip, source });
        }
        let name = container_netns_name(&self.netns_prefix, ip);
        if let Err(source) = netns::delete_named_async(&name).await {
            first.get_or_insert(ContainerError::NetNs { ip, source });
        }
        match first {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }
}

/// Container addresses whose namespace (named with `prefix`) exists in /run/netns.
pub fn existing_containers(prefix: &str) -> Vec<Ipv4Addr> {
    let Ok(dir) = std::fs::read_dir(netns::NETNS_RUN_DIR) else {
        return Vec::new();
    };
    let mut v: Vec<Ipv4Addr> = dir
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            ferry_config::parse_container_netns_name(prefix, &name)
        })
        .collect();
    v.sort();
    v
}

/// SIGKILLs every process inside container `ip`'s namespace (if it exists) and waits for
/// them, on a blocking thread.
pub async fn kill_processes(prefix: &str, ip: Ipv4Addr) -> Result<Vec<i32>, ContainerError> {
    let path = netns::netns_path(&container_netns_name(prefix, ip));
    if !path.exists() {
        return Ok(Vec::new());
    }
    let p = path.clone();
    let killed = tokio::task::spawn_blocking(move || netns::kill_all_in(&p, KILL_WAIT))
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)))
        .map_err(|source| ContainerError::Kill {
            ip,
            netns: path.clone(),
            source,
        })?;
    if !killed.is_empty() {
        warn!(%ip, netns = %path.display(), pids = ?killed, "killed the processes left in the container's namespace before deleting it");
    }
    Ok(killed)
}

impl HostNetwork {
    /// The agent's name of CNI container `a`, checked to be still its runtime's namespace.
    fn attached_path(&self, a: &Attachment) -> Result<PathBuf, ContainerError> {
        let path = netns::netns_path(&container_netns_name(&self.netns_prefix, a.ip));
        if a.is_at(&path) {
            return Ok(path);
        }
        Err(ContainerError::NotAttached {
            ip: a.ip,
            netns: path.clone(),
            want: a.netns_ino,
            found: netns::ns_id(&path).map_or_else(|e| e.to_string(), |(_, i)| i.to_string()),
        })
    }

    /// Makes the runtime's namespace `fd` container `a.ip`'s: bind-mounts it at the agent's
    /// name for the container, then records `a` (with the namespace's identity). Fails if the
    /// name exists; leaves nothing behind on failure.
    pub async fn attach(
        &self,
        mut a: Attachment,
        fd: BorrowedFd<'_>,
    ) -> Result<Attachment, ContainerError> {
        let ip = a.ip;
        let name = container_netns_name(&self.netns_prefix, ip);
        let path = netns::attach_named(&name, fd)
            .map_err(|source| ContainerError::NetNs { ip, source })?;
        match netns::ns_id(&path) {
            Ok((dev, ino)) => (a.netns_dev, a.netns_ino) = (dev, ino),
            Err(e) => {
                let _ = netns::delete_named(&name);
                return Err(ContainerError::Sysctl { ip, source: e });
            }
        }
        if let Err(e) = self.attached.insert(a.clone()) {
            let _ = netns::delete_named(&name);
            return Err(e);
        }
        info!(%ip, container = %a.container_id, ifname = %a.ifname, netns = %path.display(), netns_inode = a.netns_ino, "CNI namespace attached");
        Ok(a)
    }

    /// Undoes [`Self::attach`]: the agent's name is unmounted (if it is still the runtime's
    /// namespace) and the attachment forgotten. The runtime's namespace itself is untouched.
    pub async fn detach(&self, ip: Ipv4Addr) -> Result<Option<Attachment>, ContainerError> {
        let Some(a) = self.attached.get(ip) else {
            return Ok(None);
        };
        let name = container_netns_name(&self.netns_prefix, ip);
        if a.is_at(&netns::netns_path(&name)) {
            netns::delete_named_async(&name)
                .await
                .map_err(|source| ContainerError::NetNs { ip, source })?;
        }
        let a = self.attached.remove(ip)?;
        info!(%ip, container = ?a.as_ref().map(|a| &a.container_id), "CNI namespace detached");
        Ok(a)
    }

    /// Re-points CNI container `ip`'s name at the runtime's namespace `fd` and moves its
    /// veth's container end there (from the namespace the name held: a migration's prepared
    /// one), as `ifname`, re-applying address, MAC, routes and the gateway's neighbour entry
    /// (see [`Netlink::move_container_end`]). The host end stays, so the datapath's entry (a
    /// `HOLD`) still names it and nothing is delivered before the release. On failure the
    /// veth and the name go back to the prepared namespace.
    pub async fn attach_prepared(
        &self,
        c: &LocalContainer,
        built: &Built,
        mut a: Attachment,
        fd: BorrowedFd<'_>,
    ) -> Result<Attachment, ContainerError> {
        let ip = c.ip;
        let name = container_netns_name(&self.netns_prefix, ip);
        let old =
            netns::open(&built.netns).map_err(|source| ContainerError::NetNs { ip, source })?;
        let old_path = netns::fd_path(std::os::fd::AsFd::as_fd(&old));
        let new_path = netns::fd_path(fd);
        let to_new = self.link_spec(c, &new_path, &built.host_if, &a.ifname);
        let netlink = |source| ContainerError::Netlink { ip, source };
        let sysctls = self.container_sysctls(ip, &new_path).await;
        let moved = match sysctls {
            Ok(()) => self
                .nl
                .move_container_end(&to_new, &old_path, &built.ifname)
                .await
                .map_err(netlink),
            Err(e) => Err(e),
        };
        let rebound = moved.and_then(|()| {
            netns::rebind_named(&name, fd).map_err(|source| ContainerError::NetNs { ip, source })
        });
        let recorded = rebound.and_then(|path| {
            let (dev, ino) =
                netns::ns_id(&path).map_err(|source| ContainerError::Sysctl { ip, source })?;
            (a.netns_dev, a.netns_ino) = (dev, ino);
            self.attached.insert(a.clone())
        });
        if let Err(e) = recorded {
            warn!(%ip, error = %e, "attaching to the prepared container failed: moving it back");
            self.undo_prepared(c, built, &name, &old, &new_path, &a.ifname)
                .await;
            return Err(e);
        }
        info!(%ip, container = %a.container_id, ifname = %a.ifname, netns_inode = a.netns_ino, "the prepared container now lives in the runtime's namespace");
        Ok(a)
    }

    /// Puts a half-done [`Self::attach_prepared`] back: the name on the prepared namespace,
    /// the veth's container end in it as `built.ifname`.
    async fn undo_prepared(
        &self,
        c: &LocalContainer,
        built: &Built,
        name: &str,
        old: &std::fs::File,
        new_path: &Path,
        ifname: &str,
    ) {
        let ip = c.ip;
        let fd = std::os::fd::AsFd::as_fd(old);
        if !netns::ns_id(&built.netns).is_ok_and(|id| netns::fd_ns_id(fd).is_ok_and(|o| o == id))
            && let Err(e) = netns::rebind_named(name, fd)
        {
            warn!(%ip, error = %e, "putting the prepared namespace's name back");
        }
        let back = self.link_spec(c, &netns::fd_path(fd), &built.host_if, &built.ifname);
        let inner = match Netlink::open_in(new_path).await {
            Ok(n) => n,
            Err(e) => return warn!(%ip, error = %e, "moving the veth back"),
        };
        if inner.link_index(ifname).await.ok().flatten().is_some()
            && let Err(e) = self.nl.move_container_end(&back, new_path, ifname).await
        {
            warn!(%ip, error = %e, "moving the veth back into the prepared namespace");
        }
    }

    /// What CHECK verifies of CNI container `a` (namespace `fd`): the agent's name is still
    /// that namespace, the host end is up, and inside it `a.ifname` is as built (see
    /// [`Netlink::container_end_problems`]). Empty: all as ADD left it.
    pub async fn check(
        &self,
        c: &LocalContainer,
        built: &Built,
        fd: BorrowedFd<'_>,
    ) -> Result<Vec<String>, ContainerError> {
        let ip = c.ip;
        let mut problems = Vec::new();
        let same = netns::fd_ns_id(fd)
            .ok()
            .zip(netns::ns_id(&built.netns).ok())
            .is_some_and(|(a, b)| a == b);
        if !same {
            problems.push(format!(
                "{} is not the namespace given (the container's network was attached elsewhere)",
                built.netns.display()
            ));
        }
        let netlink = |source| ContainerError::Netlink { ip, source };
        if !self.nl.is_oper_up(built.ifindex).await.map_err(netlink)? {
            problems.push(format!("host end {} is not up", built.host_if));
        }
        let path = netns::fd_path(fd);
        let inner = Netlink::open_in(&path).await.map_err(netlink)?;
        let spec = self.link_spec(c, &path, &built.host_if, &built.ifname);
        problems.extend(inner.container_end_problems(&spec).await.map_err(netlink)?);
        Ok(problems)
    }

    /// Unmounts every CNI container's name and forgets the attachments (teardown).
    pub async fn detach_all(&self) -> Vec<ContainerError> {
        let mut errors = Vec::new();
        for a in self.attached.all() {
            if let Err(e) = self.detach(a.ip).await {
                errors.push(e);
            }
        }
        errors
    }

    fn link_spec(
        &self,
        c: &LocalContainer,
        path: &std::path::Path,
        host_if: &str,
        ifname: &str,
    ) -> ContainerLink {
        ContainerLink {
            netns: path.to_owned(),
            host_if: host_if.to_owned(),
            ifname: ifname.to_owned(),
            ip: c.ip,
            ip6: self.overlay6.map(|p| ferry_config::overlay_ipv6(p, c.ip)),
            mac: c.mac.0,
            gateway_mac: GATEWAY_MAC,
            mtu: self.mtu,
            host_overlay_ip: self.host_overlay_ip,
        }
    }

    /// The container namespace's sysctls. IPv4-only overlay: IPv6 off (no router
    /// solicitations or MLD from the container). Dual-stack: IPv6 on, but no link-local
    /// address, no duplicate address detection and no router advertisements or solicitations
    /// (the addresses and the gateway are static; the veth's end arrives after these are set,
    /// so it takes them from `default`). Its processes run unprivileged (runtime::isolation):
    /// they may still bind any port and ping, as in other container runtimes.
    async fn container_sysctls(&self, ip: Ipv4Addr, path: &Path) -> Result<(), ContainerError> {
        let dual = self.overlay6.is_some();
        netns::run_in_async(path, move || -> std::io::Result<()> {
            if dual {
                sys::ipv6_static("all")?;
                sys::ipv6_static("default")?;
            } else {
                sys::write_sysctl("net/ipv6/conf/all/disable_ipv6", "1")?;
                sys::write_sysctl("net/ipv6/conf/default/disable_ipv6", "1")?;
            }
            sys::write_sysctl("net/ipv4/ip_unprivileged_port_start", "0")?;
            sys::write_sysctl("net/ipv4/ping_group_range", "0 2147483647")
        })
        .await
        .map_err(|source| ContainerError::NetNs { ip, source })?
        .map_err(|source| ContainerError::Sysctl { ip, source })
    }

    async fn build(
        &self,
        c: &LocalContainer,
        path: &std::path::Path,
        host_if: &str,
        ifname: &str,
    ) -> Result<u32, ContainerError> {
        let ip = c.ip;
        self.container_sysctls(ip, path).await?;
        let spec = self.link_spec(c, path, host_if, ifname);
        let ifindex = self
            .nl
            .create_container_link(&spec)
            .await
            .map_err(|source| ContainerError::Netlink { ip, source })?;
        sys::write_sysctl(&format!("net/ipv6/conf/{host_if}/disable_ipv6"), "1")
            .map_err(|source| ContainerError::Sysctl { ip, source })?;
        Ok(ifindex)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Attachments are written on every change and read back by the next agent; an
    /// unreadable file is moved aside, never trusted.
    #[test]
    fn attachments_survive_a_restart_and_a_corrupt_file_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(ATTACHMENTS_FILE);
        let a = |ip: &str, id: &str| Attachment {
            ip: ip.parse().unwrap(),
            container_id: id.into(),
            ifname: "eth0".into(),
            network: "ferry".into(),
            netns_dev: 3,
            netns_ino: 4026532000,
            runtime_netns: Some("/run/netns/x".into()),
        };
        let at = Attachments::load(file.clone());
        assert!(at.all().is_empty());
        at.insert(a("10.244.0.5", "c1")).unwrap();
        at.insert(a("10.244.0.6", "c2")).unwrap();
        let again = Attachments::load(file.clone());
        assert_eq!(again.all(), at.all());
        assert_eq!(
            again.find("c2", "eth0").unwrap().ip.to_string(),
            "10.244.0.6"
        );
        assert_eq!(again.find("c2", "eth1"), None);
        again.remove("10.244.0.5".parse().unwrap()).unwrap();
        again.remove("10.244.0.6".parse().unwrap()).unwrap();
        assert!(!file.exists(), "no attachments, no file");
        at.set_error("10.244.0.5".parse().unwrap(), "boom".into());
        assert_eq!(
            at.take_error("10.244.0.5".parse().unwrap()).as_deref(),
            Some("boom")
        );
        assert_eq!(at.take_error("10.244.0.5".parse().unwrap()), None);

        std::fs::write(&file, b"[{not json").unwrap();
        assert!(Attachments::load(file.clone()).all().is_empty());
        assert!(dir.path().join("cni.json.corrupt").exists());
    }

    /// The registry refuses endpoint MACs in ferry's reserved prefix; every MAC ferry gives its
    /// own interfaces must be in it (else a container could be given one).
    #[test]
    fn ferrys_own_macs_are_in_the_prefix_the_registry_refuses() {
        assert!(ferry_api::MacAddr(GATEWAY_MAC).is_ferry_reserved());
        for ip in ["10.244.255.1", "10.0.0.0", "255.255.255.255"] {
            let mac = ferry_overlay::netlink::vxlan_mac(ip.parse().unwrap());
            assert!(ferry_api::MacAddr(mac).is_ferry_reserved(), "{ip}");
        }
        let ip: Ipv4Addr = "10.244.1.5".parse().unwrap();
        assert!(!ferry_api::MacAddr::for_container(ip).is_ferry_reserved());
    }
}
