//! The network side of local containers: a network namespace and a veth pair (from-container
//! on its host end is the datapath's part, see `node::steps`). The agent creates them when the
//! registry places an endpoint here and removes them when it leaves.

use std::{net::Ipv4Addr, path::PathBuf};

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
}

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

    /// Deletes the veth (both ends) and the namespace's name. Keeps going on errors and
    /// reports the first.
    async fn delete(&self, ip: Ipv4Addr) -> Result<(), ContainerError> {
        let host_if = container_host_if(ip);
        let mut first: Option<ContainerError> = None;
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

impl HostNetwork {
    async fn build(
        &self,
        c: &LocalContainer,
        path: &std::path::Path,
        host_if: &str,
    ) -> Result<u32, ContainerError> {
        let ip = c.ip;
        // IPv4 only for now: no router solicitations or MLD from the container.
        netns::run_in_async(path, || -> std::io::Result<()> {
            sys::write_sysctl("net/ipv6/conf/all/disable_ipv6", "1")?;
            sys::write_sysctl("net/ipv6/conf/default/disable_ipv6", "1")
        })
        .await
        .map_err(|source| ContainerError::NetNs { ip, source })?
        .map_err(|source| ContainerError::Sysctl { ip, source })?;
        let spec = ContainerLink {
            netns: path.to_owned(),
            host_if: host_if.to_owned(),
            ip,
            mac: c.mac.0,
            gateway_mac: GATEWAY_MAC,
            mtu: self.mtu,
            host_overlay_ip: self.host_overlay_ip,
        };
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
