//! rtnetlink operations on the host's network namespace: the external-mode VXLAN device, its
//! overlay address and the overlay route. One [`Netlink`] per namespace: open it from a thread
//! that is in the namespace (the socket stays bound to it afterwards).

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
};

use futures::TryStreamExt as _;
use ipnet::Ipv4Net;
use netlink_packet_route::{
    address::AddressAttribute,
    link::{InfoKind, LinkAttribute, LinkInfo, State},
    neighbour::NeighbourState,
    route::{RouteAddress, RouteAttribute, RouteHeader, RouteScope},
};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, LinkVxlan, RouteMessageBuilder};

use crate::netns::{self, NetNsError};

/// Name of the container's end of its veth, unless the container asks for another one (a CNI
/// runtime's `CNI_IFNAME`: [`ContainerLink::ifname`]).
pub const CONTAINER_IF: &str = "eth0";
/// The container's default gateway: link-local, never on any wire. Every host's side of every
/// container veth answers ARP for it with the same MAC, so it is valid on any host.
pub const CONTAINER_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The container's IPv6 default gateway (dual-stack overlay): link-local too, with a permanent
/// neighbour entry for the same gateway MAC, so no neighbour solicitation is ever needed.
pub const CONTAINER_GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);

/// How long a new container veth may take to become operationally up (carrier on and the
/// qdisc attached by the kernel's linkwatch, which can lag up to a second behind `set up`).
const LINK_UP_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);

/// A container's link: a veth pair, one end in the host's namespace (`host_if`, the
/// well-known gateway MAC), the other `ifname` (normally [`CONTAINER_IF`]) in the container's
/// namespace.
#[derive(Debug, Clone)]
pub struct ContainerLink {
    /// The container's network namespace (a file such as /run/netns/NAME).
    pub netns: PathBuf,
    pub host_if: String,
    /// The container's end, inside its namespace.
    pub ifname: String,
    pub ip: Ipv4Addr,
    /// Dual-stack: the container's IPv6 address (a /128 on `ifname`, no duplicate address
    /// detection: it is usable at once, which a restored socket bound to it needs).
    pub ip6: Option<Ipv6Addr>,
    pub mac: [u8; 6],
    pub gateway_mac: [u8; 6],
    pub mtu: u32,
    /// Source address the host uses towards the container.
    pub host_overlay_ip: Ipv4Addr,
}

/// MAC of a host's VXLAN device, derived from its overlay address (locally administered, unique
/// per host). The device is NOARP: the host stack addresses overlay frames to its own device
/// MAC, and the receiving datapath marks them PACKET_HOST. No ARP ever crosses the overlay.
/// (The MACs must differ between hosts: the kernel's VXLAN receive path drops frames whose
/// inner source MAC equals its own device MAC, as loops.)
pub fn vxlan_mac(overlay_ip: Ipv4Addr) -> [u8; 6] {
    let o = overlay_ip.octets();
    [0x0e, 0xfe, o[0], o[1], o[2], o[3]]
}

fn fmt_mac(m: &[u8]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
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
    #[error("link {what} not operationally up after {waited:?} (operstate {state})")]
    NotUp {
        what: String,
        waited: std::time::Duration,
        state: String,
    },
    #[error(transparent)]
    NetNs(#[from] NetNsError),
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

    /// Opens a netlink socket inside the network namespace at `path` (on a short-lived thread
    /// that enters it, waited for off the tokio workers); the socket stays bound to that
    /// namespace. Needs a tokio runtime.
    pub async fn open_in(path: &Path) -> Result<Self, NetlinkError> {
        let rt = tokio::runtime::Handle::current();
        let p = path.to_owned();
        let (conn, handle, _) = tokio::task::spawn_blocking(move || {
            netns::run_in(&p, move || {
                let _rt = rt.enter();
                rtnetlink::new_connection()
            })
        })
        .await
        .map_err(|_| NetNsError::Panicked {
            path: path.to_owned(),
        })??
        .map_err(NetlinkError::Connect)?;
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

    /// One attribute of a link, picked by `pick` (None: no such link or no such attribute).
    async fn link_attr<T>(
        &self,
        index: u32,
        pick: impl Fn(LinkAttribute) -> Option<T>,
    ) -> Result<Option<T>, NetlinkError> {
        let mut links = self.handle.link().get().match_index(index).execute();
        let msg = links.try_next().await.map_err(|source| NetlinkError::Op {
            op: "get link",
            what: index.to_string(),
            source,
        })?;
        Ok(msg.and_then(|m| m.attributes.into_iter().find_map(pick)))
    }

    pub async fn link_mac(&self, index: u32) -> Result<Option<Vec<u8>>, NetlinkError> {
        self.link_attr(index, |a| match a {
            LinkAttribute::Address(mac) => Some(mac),
            _ => None,
        })
        .await
    }

    /// Packets the kernel dropped while transmitting on a link (`tx_dropped`): for the hold
    /// device, frames its queue could not take before the agent read them.
    pub async fn link_tx_dropped(&self, index: u32) -> Result<Option<u64>, NetlinkError> {
        self.link_attr(index, |a| match a {
            LinkAttribute::Stats64(s) => Some(s.tx_dropped),
            _ => None,
        })
        .await
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

    /// The external (collect_md) VXLAN device, its overlay address and the overlay route
    /// through it. A device of that name that is a VXLAN device with this host's MAC and the
    /// MTU (an earlier agent's: the datapath's pinned links are attached to it) is kept as it
    /// is, so traffic never stops across an agent restart; anything else of that name is
    /// replaced. The address and route are (re)applied either way. Returns the ifindex and
    /// whether the device was kept.
    pub async fn ensure_vxlan(&self, spec: &VxlanSpec) -> Result<(u32, bool), NetlinkError> {
        if let Some(index) = self.link_index(&spec.name).await?
            && self.is_our_vxlan(index, spec).await?
        {
            self.vxlan_address_and_route(index, spec).await?;
            return Ok((index, true));
        }
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
        self.vxlan_address_and_route(index, spec).await?;
        Ok((index, false))
    }

    /// Is link `index` a VXLAN device with the MAC and MTU `spec` gives it?
    async fn is_our_vxlan(&self, index: u32, spec: &VxlanSpec) -> Result<bool, NetlinkError> {
        let mut links = self.handle.link().get().match_index(index).execute();
        let Some(msg) = links.try_next().await.map_err(|source| NetlinkError::Op {
            op: "get link",
            what: spec.name.clone(),
            source,
        })?
        else {
            return Ok(false);
        };
        let (mut vxlan, mut mac, mut mtu) = (false, false, false);
        for a in msg.attributes {
            match a {
                LinkAttribute::LinkInfo(infos) => {
                    vxlan = infos
                        .iter()
                        .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Vxlan)));
                }
                LinkAttribute::Address(m) => mac = m == vxlan_mac(spec.overlay_ip),
                LinkAttribute::Mtu(m) => mtu = m == spec.mtu,
                _ => {}
            }
        }
        Ok(vxlan && mac && mtu)
    }

    /// The overlay address on the VXLAN device (kept if present), the device up, the overlay
    /// route through it (replaced).
    async fn vxlan_address_and_route(
        &self,
        index: u32,
        spec: &VxlanSpec,
    ) -> Result<(), NetlinkError> {
        match self
            .handle
            .address()
            .add(index, spec.overlay_ip.into(), 32)
            .execute()
            .await
        {
            Ok(()) => {}
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => {}
            Err(source) => {
                return Err(NetlinkError::Op {
                    op: "add address",
                    what: format!("{}/32 on {}", spec.overlay_ip, spec.name),
                    source,
                });
            }
        }
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
        Ok(())
    }

    /// The interface that holds `ip` and the prefix length it has there: (ifindex, prefix
    /// length, interface name).
    pub async fn address_owner(
        &self,
        ip: Ipv4Addr,
    ) -> Result<Option<(u32, u8, String)>, NetlinkError> {
        let mut addrs = self.handle.address().get().execute();
        while let Some(a) = addrs.try_next().await.map_err(|source| NetlinkError::Op {
            op: "get addresses",
            what: ip.to_string(),
            source,
        })? {
            let holds = a.attributes.iter().any(|at| {
                matches!(at, AddressAttribute::Local(x) | AddressAttribute::Address(x) if *x == IpAddr::V4(ip))
            });
            if holds {
                let index = a.header.index;
                let name = self.link_name(index).await?.unwrap_or_default();
                return Ok(Some((index, a.header.prefix_len, name)));
            }
        }
        Ok(None)
    }

    /// Holds (`hold`) or gives up `ip`/128 on link `index` (`name`), without duplicate address
    /// detection: an address that moves between hosts (the next hop the internet routes the
    /// overlay's public IPv6 prefix to). Idempotent; returns whether it changed anything.
    pub async fn hold_address6(
        &self,
        index: u32,
        name: &str,
        ip: Ipv6Addr,
        hold: bool,
    ) -> Result<bool, NetlinkError> {
        let what = || format!("{ip}/128 on {name}");
        let mut found = None;
        let mut addrs = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute();
        while let Some(a) = addrs.try_next().await.map_err(|source| NetlinkError::Op {
            op: "get addresses",
            what: what(),
            source,
        })? {
            let holds = a.attributes.iter().any(|at| {
                matches!(at, AddressAttribute::Local(x) | AddressAttribute::Address(x) if *x == IpAddr::V6(ip))
            });
            if holds {
                found = Some(a);
                break;
            }
        }
        match (hold, found) {
            (true, Some(_)) | (false, None) => Ok(false),
            (true, None) => {
                let mut add = self.handle.address().add(index, ip.into(), 128);
                add.message_mut().header.flags |=
                    netlink_packet_route::address::AddressHeaderFlags::Nodad;
                match add.execute().await {
                    Ok(()) => Ok(true),
                    Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => {
                        Ok(false)
                    }
                    Err(source) => Err(NetlinkError::Op {
                        op: "add address",
                        what: what(),
                        source,
                    }),
                }
            }
            (false, Some(msg)) => match self.handle.address().del(msg).execute().await {
                Ok(()) => Ok(true),
                Err(rtnetlink::Error::NetlinkError(e))
                    if e.raw_code() == -libc::EADDRNOTAVAIL || e.raw_code() == -libc::ENOENT =>
                {
                    Ok(false)
                }
                Err(source) => Err(NetlinkError::Op {
                    op: "delete address",
                    what: what(),
                    source,
                }),
            },
        }
    }

    /// The name of link `index`.
    pub async fn link_name(&self, index: u32) -> Result<Option<String>, NetlinkError> {
        self.link_attr(index, |a| match a {
            LinkAttribute::IfName(n) => Some(n),
            _ => None,
        })
        .await
    }

    /// `ip -6 route replace PREFIX dev DEV` (a dual-stack gateway's way back into the overlay).
    pub async fn replace_route6(
        &self,
        prefix: ipnet::Ipv6Net,
        index: u32,
        dev: &str,
    ) -> Result<(), NetlinkError> {
        let route = RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(prefix.network(), prefix.prefix_len())
            .output_interface(index)
            .build();
        Self::op(
            self.handle.route().add(route).replace().execute(),
            "add route",
            || format!("{prefix} dev {dev}"),
        )
        .await
    }

    /// Brings the hold device (a TAP the caller opened) up with the largest MTU and a long
    /// transmit queue (it buffers between the agent's reads). Returns its ifindex.
    pub async fn configure_hold_device(&self, name: &str, mtu: u32) -> Result<u32, NetlinkError> {
        let index = self
            .link_index(name)
            .await?
            .ok_or_else(|| NetlinkError::NoSuchLink(name.to_owned()))?;
        Self::op(
            self.handle
                .link()
                .set(
                    LinkUnspec::new_with_index(index)
                        .mtu(mtu)
                        .txqueuelen(10_000)
                        .arp(false)
                        .up()
                        .build(),
                )
                .execute(),
            "configure hold device",
            || name.to_owned(),
        )
        .await?;
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

    /// The operational state of a link (`IFLA_OPERSTATE`).
    pub async fn link_oper_state(&self, index: u32) -> Result<Option<State>, NetlinkError> {
        self.link_attr(index, |a| match a {
            LinkAttribute::OperState(s) => Some(s),
            _ => None,
        })
        .await
    }

    /// Whether a link is operationally up.
    pub async fn is_oper_up(&self, index: u32) -> Result<bool, NetlinkError> {
        Ok(self.link_oper_state(index).await? == Some(State::Up))
    }

    /// Waits until a link is operationally up. A veth sends nothing before that: until the
    /// kernel's linkwatch has seen the carrier and attached the real qdisc, the device's
    /// qdisc is `noop`, which drops every frame — a container's first ARP or first packet
    /// would be lost, and the kernel retries ARP only after a second.
    pub async fn wait_oper_up(&self, index: u32, name: &str) -> Result<(), NetlinkError> {
        let start = tokio::time::Instant::now();
        loop {
            let state = self.link_oper_state(index).await?;
            if state == Some(State::Up) {
                return Ok(());
            }
            if start.elapsed() >= LINK_UP_DEADLINE {
                return Err(NetlinkError::NotUp {
                    what: name.to_owned(),
                    waited: start.elapsed(),
                    state: format!("{state:?}"),
                });
            }
            // Polled: linkwatch sends no event we could wait on for the qdisc itself.
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }

    /// A permanent neighbour entry (`ip neigh replace IP lladdr MAC nud permanent dev IDX`).
    pub async fn add_permanent_neighbour(
        &self,
        index: u32,
        ip: IpAddr,
        mac: [u8; 6],
        dev: &str,
    ) -> Result<(), NetlinkError> {
        Self::op(
            self.handle
                .neighbours()
                .add(index, ip)
                .link_layer_address(&mac)
                .state(NeighbourState::Permanent)
                .replace()
                .execute(),
            "add neighbour",
            || format!("{ip} dev {dev}"),
        )
        .await
    }

    async fn op<T>(
        fut: impl std::future::Future<Output = Result<T, rtnetlink::Error>>,
        op: &'static str,
        what: impl FnOnce() -> String,
    ) -> Result<T, NetlinkError> {
        fut.await.map_err(|source| NetlinkError::Op {
            op,
            what: what(),
            source,
        })
    }

    /// Creates a container's veth pair (self: the host's namespace): the host end gets the
    /// gateway MAC and a /32 route to the container; the container end becomes `eth0` with
    /// the container's MAC and address, a link route to [`CONTAINER_GATEWAY`] and the default
    /// route through it. A stale host end from an earlier run is replaced. Returns the host
    /// end's ifindex.
    pub async fn create_container_link(&self, spec: &ContainerLink) -> Result<u32, NetlinkError> {
        self.delete_link(&spec.host_if).await?;
        let peer_tmp = format!("{}p", spec.host_if);
        self.delete_link(&peer_tmp).await?;
        let msg = LinkMessageBuilder::<LinkVeth>::new(&spec.host_if, &peer_tmp)
            .mtu(spec.mtu)
            .address(spec.gateway_mac.to_vec())
            .build();
        Self::op(self.handle.link().add(msg).execute(), "create veth", || {
            spec.host_if.clone()
        })
        .await?;
        let host_idx = self
            .link_index(&spec.host_if)
            .await?
            .ok_or_else(|| NetlinkError::NoSuchLink(spec.host_if.clone()))?;
        let peer_idx = self
            .link_index(&peer_tmp)
            .await?
            .ok_or_else(|| NetlinkError::NoSuchLink(peer_tmp.clone()))?;
        let ns = netns::open(&spec.netns)?;
        Self::op(
            self.handle
                .link()
                .set(
                    LinkUnspec::new_with_index(peer_idx)
                        .setns_by_fd(ns.as_raw_fd())
                        .build(),
                )
                .execute(),
            "move veth",
            || format!("{peer_tmp} to {}", spec.netns.display()),
        )
        .await?;
        drop(ns);

        let inner = Netlink::open_in(&spec.netns).await?;
        let inner_idx = inner.configure_container_end(spec, &peer_tmp).await?;

        self.set_up(host_idx, &spec.host_if).await?;
        self.host_side_reach(spec, host_idx).await?;
        // Reported built only once both ends can carry frames (see `wait_oper_up`).
        self.wait_oper_up(host_idx, &spec.host_if).await?;
        inner.wait_oper_up(inner_idx, &spec.ifname).await?;
        Ok(host_idx)
    }

    /// Moves the container's end of an existing container link (self: the host's namespace)
    /// from the namespace at `from`, where it is called `current`, into the namespace at
    /// `spec.netns`, and configures it there as [`Self::create_container_link`] does (name
    /// `spec.ifname`, MAC, MTU, address, routes, the gateway's neighbour entry: a move loses
    /// all but the MAC). The host end stays (same ifindex: the datapath's entries keep
    /// pointing at it). Returns once both ends are operationally up again.
    pub async fn move_container_end(
        &self,
        spec: &ContainerLink,
        from: &Path,
        current: &str,
    ) -> Result<(), NetlinkError> {
        let old = Netlink::open_in(from).await?;
        let idx = old
            .link_index(current)
            .await?
            .ok_or_else(|| NetlinkError::NoSuchLink(format!("{current} in {}", from.display())))?;
        let target = netns::open(&spec.netns)?;
        Self::op(
            old.handle
                .link()
                .set(
                    LinkUnspec::new_with_index(idx)
                        .setns_by_fd(target.as_raw_fd())
                        .build(),
                )
                .execute(),
            "move veth",
            || format!("{current} to {}", spec.netns.display()),
        )
        .await?;
        drop(target);
        let inner = Netlink::open_in(&spec.netns).await?;
        let inner_idx = inner.configure_container_end(spec, current).await?;
        let host_idx = self
            .link_index(&spec.host_if)
            .await?
            .ok_or_else(|| NetlinkError::NoSuchLink(spec.host_if.clone()))?;
        self.host_side_reach(spec, host_idx).await?;
        self.wait_oper_up(host_idx, &spec.host_if).await?;
        inner.wait_oper_up(inner_idx, &spec.ifname).await?;
        Ok(())
    }

    /// What differs, inside the container's namespace (self), from what
    /// [`Self::create_container_link`] made: `spec.ifname` exists and is up with the container's
    /// MAC, has the address as a /32, and the default route goes via [`CONTAINER_GATEWAY`] on
    /// it. Empty: all as built.
    pub async fn container_end_problems(
        &self,
        spec: &ContainerLink,
    ) -> Result<Vec<String>, NetlinkError> {
        let name = &spec.ifname;
        let Some(idx) = self.link_index(name).await? else {
            return Ok(vec![format!("no interface {name}")]);
        };
        let mut problems = Vec::new();
        let mac = self.link_mac(idx).await?;
        if mac.as_deref() != Some(&spec.mac[..]) {
            problems.push(format!(
                "{name} has MAC {}, not {}",
                mac.as_deref().map_or_else(|| "none".into(), fmt_mac),
                fmt_mac(&spec.mac)
            ));
        }
        let state = self.link_oper_state(idx).await?;
        if state != Some(State::Up) {
            problems.push(format!("{name} is not up (operstate {state:?})"));
        }
        let mut addrs = self
            .handle
            .address()
            .get()
            .set_link_index_filter(idx)
            .execute();
        let mut has_ip = false;
        while let Some(a) = addrs.try_next().await.map_err(|source| NetlinkError::Op {
            op: "get addresses",
            what: name.clone(),
            source,
        })? {
            has_ip |= a.header.prefix_len == 32
                && a.attributes.iter().any(|at| {
                    matches!(at, AddressAttribute::Local(ip) | AddressAttribute::Address(ip) if *ip == std::net::IpAddr::V4(spec.ip))
                });
        }
        if !has_ip {
            problems.push(format!("{name} lacks {}/32", spec.ip));
        }
        let mut routes = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute();
        let mut default_ok = false;
        while let Some(r) = routes.try_next().await.map_err(|source| NetlinkError::Op {
            op: "get routes",
            what: name.clone(),
            source,
        })? {
            let default = r.header.destination_prefix_length == 0
                && r.header.table == RouteHeader::RT_TABLE_MAIN;
            let via_gw = r.attributes.iter().any(|a| {
                matches!(a, RouteAttribute::Gateway(RouteAddress::Inet(g)) if *g == CONTAINER_GATEWAY)
            });
            let on_it = r.attributes.contains(&RouteAttribute::Oif(idx));
            default_ok |= default && via_gw && on_it;
        }
        if !default_ok {
            problems.push(format!(
                "no default route via {CONTAINER_GATEWAY} dev {name}"
            ));
        }
        Ok(problems)
    }

    /// An existing container link that matches `spec` (an earlier agent's): the host end
    /// `host_if` exists with the gateway MAC and is up, and inside the container's namespace
    /// `eth0` has the container's MAC. Then its host-side route and neighbour entry are
    /// re-applied (both are replaces: harmless) and the host end's ifindex is returned;
    /// `None` if anything differs (the caller rebuilds). Nothing is removed here.
    pub async fn adopt_container_link(
        &self,
        spec: &ContainerLink,
    ) -> Result<Option<u32>, NetlinkError> {
        let Some(host_idx) = self.link_index(&spec.host_if).await? else {
            return Ok(None);
        };
        if self.link_mac(host_idx).await?.as_deref() != Some(&spec.gateway_mac[..]) {
            return Ok(None);
        }
        let inner = Netlink::open_in(&spec.netns).await?;
        let Some(inner_idx) = inner.link_index(&spec.ifname).await? else {
            return Ok(None);
        };
        if inner.link_mac(inner_idx).await?.as_deref() != Some(&spec.mac[..]) {
            return Ok(None);
        }
        if self.link_oper_state(host_idx).await? != Some(State::Up) {
            return Ok(None);
        }
        self.host_side_reach(spec, host_idx).await?;
        Ok(Some(host_idx))
    }

    /// The host's way to the container: a permanent neighbour entry (its own traffic needs
    /// no ARP either) and the /32 route by the host end. Both are replaces: harmless again.
    async fn host_side_reach(
        &self,
        spec: &ContainerLink,
        host_idx: u32,
    ) -> Result<(), NetlinkError> {
        self.add_permanent_neighbour(host_idx, spec.ip.into(), spec.mac, &spec.host_if)
            .await?;
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(spec.ip, 32)
            .output_interface(host_idx)
            .pref_source(spec.host_overlay_ip)
            .scope(RouteScope::Link)
            .build();
        Self::op(
            self.handle.route().add(route).replace().execute(),
            "add route",
            || format!("{}/32 dev {}", spec.ip, spec.host_if),
        )
        .await?;
        Ok(())
    }

    /// Inside the container's namespace: `lo` up, the veth end (now called `current`) renamed
    /// `spec.ifname` with the container's MAC, address and routes, and a permanent neighbour
    /// entry for the gateway (its MAC is the same on every host by design, so the container
    /// never has to ARP for it: no first packet waits on an ARP, and a restored container's
    /// entry is valid on any host). Every step may be repeated. Returns the interface's
    /// ifindex.
    async fn configure_container_end(
        &self,
        spec: &ContainerLink,
        current: &str,
    ) -> Result<u32, NetlinkError> {
        let name = spec.ifname.as_str();
        if let Some(lo) = self.link_index("lo").await? {
            self.set_up(lo, "lo").await?;
        }
        let idx = self
            .link_index(current)
            .await?
            .ok_or_else(|| NetlinkError::NoSuchLink(current.to_owned()))?;
        Self::op(
            self.handle
                .link()
                .set(
                    LinkUnspec::new_with_index(idx)
                        .name(name.to_owned())
                        .address(spec.mac.to_vec())
                        .mtu(spec.mtu)
                        .build(),
                )
                .execute(),
            "rename veth",
            || format!("{current} to {name}"),
        )
        .await?;
        self.set_up(idx, name).await?;
        match self
            .handle
            .address()
            .add(idx, spec.ip.into(), 32)
            .execute()
            .await
        {
            Ok(()) => {}
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => {}
            Err(source) => {
                return Err(NetlinkError::Op {
                    op: "add address",
                    what: format!("{}/32 on {name}", spec.ip),
                    source,
                });
            }
        }
        let gw_route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(CONTAINER_GATEWAY, 32)
            .output_interface(idx)
            .scope(RouteScope::Link)
            .build();
        Self::op(
            self.handle.route().add(gw_route).replace().execute(),
            "add route",
            || format!("{CONTAINER_GATEWAY} dev {name}"),
        )
        .await?;
        self.add_permanent_neighbour(idx, CONTAINER_GATEWAY.into(), spec.gateway_mac, name)
            .await?;
        let default = RouteMessageBuilder::<Ipv4Addr>::new()
            .output_interface(idx)
            .gateway(CONTAINER_GATEWAY)
            .build();
        Self::op(
            self.handle.route().add(default).replace().execute(),
            "add route",
            || format!("default via {CONTAINER_GATEWAY}"),
        )
        .await?;
        if let Some(ip6) = spec.ip6 {
            self.configure_container_ipv6(spec, idx, ip6).await?;
        }
        Ok(idx)
    }

    /// The IPv6 side of a dual-stack container's end: its address as a /128 without duplicate
    /// address detection, the gateway's permanent neighbour entry and the default route via
    /// [`CONTAINER_GATEWAY6`]. (The namespace's IPv6 sysctls are the caller's: enabled, no
    /// router advertisements, no link-local address.)
    async fn configure_container_ipv6(
        &self,
        spec: &ContainerLink,
        idx: u32,
        ip6: Ipv6Addr,
    ) -> Result<(), NetlinkError> {
        let name = spec.ifname.as_str();
        let mut add = self.handle.address().add(idx, ip6.into(), 128);
        add.message_mut().header.flags |= netlink_packet_route::address::AddressHeaderFlags::Nodad;
        match add.execute().await {
            Ok(()) => {}
            Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => {}
            Err(source) => {
                return Err(NetlinkError::Op {
                    op: "add address",
                    what: format!("{ip6}/128 on {name}"),
                    source,
                });
            }
        }
        self.add_permanent_neighbour(idx, CONTAINER_GATEWAY6.into(), spec.gateway_mac, name)
            .await?;
        let default = RouteMessageBuilder::<Ipv6Addr>::new()
            .output_interface(idx)
            .gateway(CONTAINER_GATEWAY6)
            .build();
        Self::op(
            self.handle.route().add(default).replace().execute(),
            "add route",
            || format!("default via {CONTAINER_GATEWAY6} dev {name}"),
        )
        .await
    }
}
