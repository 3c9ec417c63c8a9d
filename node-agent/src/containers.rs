//! The network side of local containers: a network namespace and a veth pair (from-container
//! on its host end is the datapath's part, see `node::steps`). The agent creates them when the
//! registry places an endpoint here and removes them when it leaves.
//!
//! A restarted agent adopts a container's network side that an earlier agent built (same
//! namespace, same veth: [`ContainerNet::adopt`]) instead of rebuilding it, and no namespace
//! is ever deleted with processes still inside: [`ContainerNet::delete`] SIGKILLs every
//! process whose network namespace it is first (found by scanning /proc, whoever started
//! them), so no container process outlives its namespace.

use std::{net::Ipv4Addr, path::PathBuf, time::Duration};

use ferry_overlay::{
    netlink::{ContainerLink, Netlink},
    netns, sys,
};
use serde::Serialize;
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
}

impl ContainerNet for HostNetwork {
    type Error = ContainerError;

    /// Creates the named namespace, then the veth pair (see
    /// [`Netlink::create_container_link`]). On failure, whatever was made is removed again.
    async fn create(&self, c: &LocalContainer) -> Result<Built, ContainerError> {
        let ip = c.ip;
        let name = container_netns_name(&self.netns_prefix, ip);
        let host_if = container_host_if(ip);
        let path = netns::create_named_async(&name)
            .await
            .map_err(|source| ContainerError::NetNs { ip, source })?;
        match self.build(c, &path, &host_if).await {
            Ok(ifindex) => {
                info!(%ip, mac = %c.mac, netns = %path.display(), %host_if, ifindex, "container network ready");
                Ok(Built {
                    ip,
                    mac: c.mac.to_string(),
                    netns: path,
                    host_if,
                    ifindex,
                })
            }
            Err(e) => {
                if let Err(e2) = self.delete(ip).await {
                    warn!(%ip, error = %e2, "cleaning up after a failed create");
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
        let host_if = container_host_if(ip);
        let spec = self.link_spec(c, &path, &host_if);
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
            }
        }))
    }

    /// Container namespaces of this agent's prefix that exist on the host.
    async fn existing(&self) -> Vec<Ipv4Addr> {
        let prefix = self.netns_prefix.clone();
        tokio::task::spawn_blocking(move || existing_containers(&prefix))
            .await
            .unwrap_or_default()
    }

    /// Kills every process inside the container's namespace, then deletes the veth (both
    /// ends) and the namespace's name. Keeps going on errors and reports the first.
    async fn delete(&self, ip: Ipv4Addr) -> Result<(), ContainerError> {
        let host_if = container_host_if(ip);
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
    fn link_spec(
        &self,
        c: &LocalContainer,
        path: &std::path::Path,
        host_if: &str,
    ) -> ContainerLink {
        ContainerLink {
            netns: path.to_owned(),
            host_if: host_if.to_owned(),
            ip: c.ip,
            mac: c.mac.0,
            gateway_mac: GATEWAY_MAC,
            mtu: self.mtu,
            host_overlay_ip: self.host_overlay_ip,
        }
    }

    async fn build(
        &self,
        c: &LocalContainer,
        path: &std::path::Path,
        host_if: &str,
    ) -> Result<u32, ContainerError> {
        let ip = c.ip;
        // IPv4 only for now: no router solicitations or MLD from the container. Its
        // processes run unprivileged (runtime::isolation): they may still bind any port and
        // ping, as in other container runtimes.
        netns::run_in_async(path, || -> std::io::Result<()> {
            sys::write_sysctl("net/ipv6/conf/all/disable_ipv6", "1")?;
            sys::write_sysctl("net/ipv6/conf/default/disable_ipv6", "1")?;
            sys::write_sysctl("net/ipv4/ip_unprivileged_port_start", "0")?;
            sys::write_sysctl("net/ipv4/ping_group_range", "0 2147483647")
        })
        .await
        .map_err(|source| ContainerError::NetNs { ip, source })?
        .map_err(|source| ContainerError::Sysctl { ip, source })?;
        let spec = self.link_spec(c, path, host_if);
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
