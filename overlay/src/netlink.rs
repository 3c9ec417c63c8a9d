//! rtnetlink operations on the host's network namespace: the external-mode VXLAN device, its
//! overlay address and the overlay route. One [`Netlink`] per namespace: open it from a thread
//! that is in the namespace (the socket stays bound to it afterwards).

use std::net::Ipv4Addr;

use futures::TryStreamExt as _;
use ipnet::Ipv4Net;
use netlink_packet_route::link::LinkAttribute;
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVxlan, RouteMessageBuilder};

/// MAC of a host's VXLAN device, derived from its overlay address (locally administered, unique
/// per host). The device is NOARP: the host stack addresses overlay frames to its own device
/// MAC, and the receiving datapath marks them PACKET_HOST. No ARP ever crosses the overlay.
/// (The MACs must differ between hosts: the kernel's VXLAN receive path drops frames whose
/// inner source MAC equals its own device MAC, as loops.)
pub fn vxlan_mac(overlay_ip: Ipv4Addr) -> [u8; 6] {
    let o = overlay_ip.octets();
    [0x0e, 0xfe, o[0], o[1], o[2], o[3]]
}

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("opening a netlink socket: {0}")]
    Connect(std::io::Error),
    #[error("{op} {what}: {source}")]
    Op {
        op: &'static str,
        what: String,
        source: rtnetlink::Error,
    },
    #[error("link {0} not found")]
    NoSuchLink(String),
}

/// What the VXLAN device should look like.
#[derive(Debug, Clone)]
pub struct VxlanSpec {
    pub name: String,
    pub port: u16,
    pub mtu: u32,
    pub overlay_ip: Ipv4Addr,
    pub overlay_cidr: Ipv4Net,
}

pub struct Netlink {
    handle: Handle,
}

impl Netlink {
    /// Opens a netlink socket in the calling thread's network namespace and spawns its
    /// connection task on the current tokio runtime.
    pub fn open() -> Result<Self, NetlinkError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Connect)?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    pub async fn link_index(&self, name: &str) -> Result<Option<u32>, NetlinkError> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_owned())
            .execute();
        match links.try_next().await {
            Ok(Some(msg)) => Ok(Some(msg.header.index)),
            Ok(None) => Ok(None),
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::ENODEV => Ok(None),
            Err(source) => Err(NetlinkError::Op {
                op: "get link",
                what: name.to_owned(),
                source,
            }),
        }
    }

    pub async fn link_mac(&self, index: u32) -> Result<Option<Vec<u8>>, NetlinkError> {
        let mut links = self.handle.link().get().match_index(index).execute();
        let msg = links.try_next().await.map_err(|source| NetlinkError::Op {
            op: "get link",
            what: index.to_string(),
            source,
        })?;
        Ok(msg.and_then(|m| {
            m.attributes.into_iter().find_map(|a| match a {
                LinkAttribute::Address(mac) => Some(mac),
                _ => None,
            })
        }))
    }

    pub async fn delete_link(&self, name: &str) -> Result<bool, NetlinkError> {
        let Some(index) = self.link_index(name).await? else {
            return Ok(false);
        };
        self.handle
            .link()
            .del(index)
            .execute()
            .await
            .map_err(|source| NetlinkError::Op {
                op: "delete link",
                what: name.to_owned(),
                source,
            })?;
        Ok(true)
    }

    /// Creates the external (collect_md) VXLAN device afresh (a stale one from an earlier run
    /// is replaced), gives it the host's overlay address and routes the overlay through it.
    /// Returns its ifindex.
    pub async fn ensure_vxlan(&self, spec: &VxlanSpec) -> Result<u32, NetlinkError> {
        self.delete_link(&spec.name).await?;
        let msg = LinkMessageBuilder::<LinkVxlan>::new(&spec.name)
            .collect_metadata(true)
            .port(spec.port)
            .learning(false)
            .mtu(spec.mtu)
            .address(vxlan_mac(spec.overlay_ip).to_vec())
            .arp(false)
            .build();
        self.handle
            .link()
            .add(msg)
            .execute()
            .await
            .map_err(|source| NetlinkError::Op {
                op: "create vxlan",
                what: spec.name.clone(),
                source,
            })?;
        let index = self
            .link_index(&spec.name)
            .await?
            .ok_or_else(|| NetlinkError::NoSuchLink(spec.name.clone()))?;
        self.handle
            .address()
            .add(index, spec.overlay_ip.into(), 32)
            .execute()
            .await
            .map_err(|source| NetlinkError::Op {
                op: "add address",
                what: format!("{}/32 on {}", spec.overlay_ip, spec.name),
                source,
            })?;
        self.set_up(index, &spec.name).await?;
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(spec.overlay_cidr.network(), spec.overlay_cidr.prefix_len())
            .output_interface(index)
            .pref_source(spec.overlay_ip)
            .build();
        self.handle
            .route()
            .add(route)
            .replace()
            .execute()
            .await
            .map_err(|source| NetlinkError::Op {
                op: "add route",
                what: format!("{} dev {}", spec.overlay_cidr, spec.name),
                source,
            })?;
        Ok(index)
    }

    pub async fn set_up(&self, index: u32, name: &str) -> Result<(), NetlinkError> {
        self.handle
            .link()
            .set(LinkUnspec::new_with_index(index).up().build())
            .execute()
            .await
            .map_err(|source| NetlinkError::Op {
                op: "set up",
                what: name.to_owned(),
                source,
            })
    }
}
