//! The two baselines of the datapath benchmark, built in the lab next to ferry's own overlay.
//!
//! - `kernel_vxlan`: flannel's vxlan backend, device for device. On each host a VXLAN device
//!   `flannel.1` (VNI 1, UDP 8472, `nolearning`, MTU 1450) holding `172.30.N.0/32`, a bridge
//!   `cni0` holding `172.30.N.1/24`, the container (`172.30.N.2/24`, default via `.1`) on a veth
//!   in the bridge; for the peer's subnet a route via the peer's `flannel.1` address (`onlink`),
//!   a permanent neighbour entry with the peer device's MAC, and an FDB entry sending that MAC
//!   to the peer's underlay address.
//! - `routed`: Calico-style routed veths, no overlay, MTU 1500. The container holds
//!   `172.31.N.2/32` with a default route via `169.254.1.1` (`onlink`), which the host side of
//!   the veth answers by proxy ARP; the host routes the container's /32 to the veth and the
//!   peer's `172.31.M.0/24` to the peer's underlay address.
//!
//! The baselines' addresses (172.30/16, 172.31/16) stay out of ferry's overlay (in 10/8), so the
//! hosts' routes never mix; [`check_no_overlap`] refuses a lab whose overlay covers them.
//!
//! Containers are namespaces `<prefix>-<host>-kv` and `<prefix>-<host>-rt`, so the lab's
//! teardown removes them with everything in them. Host N is 1 for the first host, 2 for the
//! second.

use std::{net::Ipv4Addr, process::Command};

use ferry_overlay::netns::{netns_path, run_in};
use ipnet::Ipv4Net;

use super::{BenchError, Endpoint, Pair, run_checked};
use ferry_lab::{Lab, lab::HOST_IF, topology::Host};

/// flannel's VXLAN device, VNI and port (ferry's device uses 4789, so both coexist).
pub const FLANNEL_DEV: &str = "flannel.1";
pub const FLANNEL_VNI: u32 = 1;
pub const FLANNEL_PORT: u16 = 8472;
/// Underlay MTU 1500 minus the VXLAN overhead, as flannel computes it.
pub const FLANNEL_MTU: u32 = 1450;
/// The CNI bridge plugin's bridge.
pub const FLANNEL_BRIDGE: &str = "cni0";
/// Host side of a kernel_vxlan container's veth.
pub const KV_VETH: &str = "vethkv0";
/// Host side of a routed container's veth.
pub const RT_VETH: &str = "calirt0";
/// A container's interface.
pub const CONTAINER_IF: &str = "eth0";
/// The link-local gateway of Calico's containers (answered by proxy ARP).
pub const ROUTED_GW: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);

/// Container namespace suffixes.
pub const KV_SUFFIX: &str = "kv";
pub const RT_SUFFIX: &str = "rt";

/// `172.30.N.X`: kernel_vxlan addresses.
pub fn kv_addr(n: u8, x: u8) -> Ipv4Addr {
    Ipv4Addr::new(172, 30, n, x)
}

/// `172.31.N.X`: routed addresses.
pub fn rt_addr(n: u8, x: u8) -> Ipv4Addr {
    Ipv4Addr::new(172, 31, n, x)
}

/// Host side of kernel_vxlan on host `h` (number `n`): flannel.1, cni0 and the container's veth.
pub fn flannel_host_batch(h: &Host, n: u8, container_ns: &str) -> String {
    format!(
        "link add {FLANNEL_DEV} type vxlan id {FLANNEL_VNI} local {local} dev {HOST_IF} \
         dstport {FLANNEL_PORT} nolearning\n\
         link set {FLANNEL_DEV} mtu {FLANNEL_MTU}\n\
         addr add {vtep}/32 dev {FLANNEL_DEV}\n\
         link set {FLANNEL_DEV} up\n\
         link add {FLANNEL_BRIDGE} type bridge\n\
         link set {FLANNEL_BRIDGE} mtu {FLANNEL_MTU}\n\
         addr add {gw}/24 dev {FLANNEL_BRIDGE}\n\
         link set {FLANNEL_BRIDGE} up\n\
         link add {KV_VETH} type veth peer name {CONTAINER_IF} netns {container_ns}\n\
         link set {KV_VETH} mtu {FLANNEL_MTU}\n\
         link set {KV_VETH} master {FLANNEL_BRIDGE}\n\
         link set {KV_VETH} up\n",
        local = h.address,
        vtep = kv_addr(n, 0),
        gw = kv_addr(n, 1),
    )
}

/// Inside a kernel_vxlan container.
pub fn flannel_container_batch(n: u8) -> String {
    format!(
        "link set lo up\n\
         link set {CONTAINER_IF} mtu {FLANNEL_MTU}\n\
         addr add {ip}/24 dev {CONTAINER_IF}\n\
         link set {CONTAINER_IF} up\n\
         route add default via {gw}\n",
        ip = kv_addr(n, 2),
        gw = kv_addr(n, 1),
    )
}

/// What flannel adds on a host for a peer with subnet number `m` whose flannel.1 has `mac`
/// (the FDB entry is a separate `bridge` command).
pub fn flannel_peer_batch(m: u8, mac: &str) -> String {
    format!(
        "route add {net}/24 via {vtep} dev {FLANNEL_DEV} onlink\n\
         neigh add {vtep} lladdr {mac} dev {FLANNEL_DEV} nud permanent\n",
        net = kv_addr(m, 0),
        vtep = kv_addr(m, 0),
    )
}

/// Host side of routed on a host (number `n`) whose peer (number `m`) is at `peer_underlay`.
pub fn routed_host_batch(n: u8, container_ns: &str, m: u8, peer_underlay: Ipv4Addr) -> String {
    format!(
        "link add {RT_VETH} type veth peer name {CONTAINER_IF} netns {container_ns}\n\
         link set {RT_VETH} up\n\
         route add {ip}/32 dev {RT_VETH} scope link\n\
         route add {peer_net}/24 via {peer_underlay} dev {HOST_IF}\n",
        ip = rt_addr(n, 2),
        peer_net = rt_addr(m, 0),
    )
}

/// Inside a routed container.
pub fn routed_container_batch(n: u8) -> String {
    format!(
        "link set lo up\n\
         addr add {ip}/32 dev {CONTAINER_IF}\n\
         link set {CONTAINER_IF} up\n\
         route add default via {ROUTED_GW} dev {CONTAINER_IF} onlink\n",
        ip = rt_addr(n, 2),
    )
}

/// The `address` of the first link in `ip -j link show` output.
pub fn parse_link_mac(json: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(json).ok()?;
    let mac = v.get(0)?.get("address")?.as_str()?;
    (mac.len() == 17).then(|| mac.to_owned())
}

/// The /16 all kernel_vxlan addresses come from.
pub fn kv_net() -> Ipv4Net {
    Ipv4Net::new(kv_addr(0, 0), 16).expect("valid prefix")
}

/// The /16 all routed addresses come from.
pub fn rt_net() -> Ipv4Net {
    Ipv4Net::new(rt_addr(0, 0), 16).expect("valid prefix")
}

/// Fails if a baseline's addresses overlap the lab's overlay (the hosts' routes would mix).
pub fn check_no_overlap(mode: &str, net: Ipv4Net, overlay: Ipv4Net) -> Result<(), BenchError> {
    if net.contains(&overlay.network()) || overlay.contains(&net.network()) {
        return Err(BenchError::failed(format!(
            "{mode}'s addresses {net} overlap the lab's overlay {overlay}"
        )));
    }
    Ok(())
}

/// Builds kernel_vxlan between hosts `a` and `b`; returns the two containers.
pub fn kernel_vxlan(lab: &Lab, a: &str, b: &str) -> Result<Pair, BenchError> {
    check_no_overlap("kernel_vxlan", kv_net(), lab.topology().overlay_cidr)?;
    let hosts = [host(lab, a)?, host(lab, b)?];
    let cns = [
        container_ns(lab, a, KV_SUFFIX),
        container_ns(lab, b, KV_SUFFIX),
    ];
    add_netns(lab, KV_SUFFIX, &cns)?;
    let mut macs = Vec::new();
    for (i, h) in hosts.iter().enumerate() {
        let n = i as u8 + 1;
        let hns = lab.netns_name(&h.name);
        sysctls(&hns, &[("net/ipv4/ip_forward", "1")])?;
        ip_batch(
            lab,
            Some(&hns),
            &format!("{}-{KV_SUFFIX}", h.name),
            &flannel_host_batch(h, n, &cns[i]),
        )?;
        ip_batch(
            lab,
            Some(&cns[i]),
            &format!("{}-{KV_SUFFIX}-container", h.name),
            &flannel_container_batch(n),
        )?;
        macs.push(link_mac(&hns, FLANNEL_DEV)?);
    }
    for (i, h) in hosts.iter().enumerate() {
        let j = 1 - i;
        let m = j as u8 + 1;
        let hns = lab.netns_name(&h.name);
        ip_batch(
            lab,
            Some(&hns),
            &format!("{}-{KV_SUFFIX}-peer", h.name),
            &flannel_peer_batch(m, &macs[j]),
        )?;
        run_checked(Command::new("bridge").args([
            "-n",
            &hns,
            "fdb",
            "append",
            &macs[j],
            "dev",
            FLANNEL_DEV,
            "dst",
            &hosts[j].address.to_string(),
        ]))?;
    }
    Ok(Pair {
        a: Endpoint {
            netns: netns_path(&cns[0]),
            ip: kv_addr(1, 2).into(),
        },
        b: Endpoint {
            netns: netns_path(&cns[1]),
            ip: kv_addr(2, 2).into(),
        },
    })
}

/// Builds routed veths between hosts `a` and `b`; returns the two containers.
pub fn routed(lab: &Lab, a: &str, b: &str) -> Result<Pair, BenchError> {
    check_no_overlap("routed", rt_net(), lab.topology().overlay_cidr)?;
    let hosts = [host(lab, a)?, host(lab, b)?];
    let cns = [
        container_ns(lab, a, RT_SUFFIX),
        container_ns(lab, b, RT_SUFFIX),
    ];
    add_netns(lab, RT_SUFFIX, &cns)?;
    for (i, h) in hosts.iter().enumerate() {
        let (n, j) = (i as u8 + 1, 1 - i);
        let hns = lab.netns_name(&h.name);
        sysctls(&hns, &[("net/ipv4/ip_forward", "1")])?;
        ip_batch(
            lab,
            Some(&hns),
            &format!("{}-{RT_SUFFIX}", h.name),
            &routed_host_batch(n, &cns[i], j as u8 + 1, hosts[j].address),
        )?;
        sysctls(
            &hns,
            &[
                (&format!("net/ipv4/conf/{RT_VETH}/proxy_arp"), "1"),
                (&format!("net/ipv4/neigh/{RT_VETH}/proxy_delay"), "0"),
            ],
        )?;
        ip_batch(
            lab,
            Some(&cns[i]),
            &format!("{}-{RT_SUFFIX}-container", h.name),
            &routed_container_batch(n),
        )?;
    }
    Ok(Pair {
        a: Endpoint {
            netns: netns_path(&cns[0]),
            ip: rt_addr(1, 2).into(),
        },
        b: Endpoint {
            netns: netns_path(&cns[1]),
            ip: rt_addr(2, 2).into(),
        },
    })
}

fn host(lab: &Lab, name: &str) -> Result<Host, BenchError> {
    lab.host(name).cloned().ok_or_else(|| {
        BenchError::failed(format!(
            "lab {} has no host {name:?} (the benchmark needs the default topology)",
            lab.prefix()
        ))
    })
}

/// `<prefix>-<host>-<suffix>`: removed by the lab's teardown with the lab's other namespaces.
fn container_ns(lab: &Lab, host: &str, suffix: &str) -> String {
    format!("{}-{suffix}", lab.netns_name(host))
}

/// Writes an `ip` batch into the lab's state dir (kept for debugging, removed by teardown) and
/// runs it in namespace `ns` (the root namespace for `None`: only `netns add` goes there).
fn ip_batch(lab: &Lab, ns: Option<&str>, label: &str, text: &str) -> Result<(), BenchError> {
    let file = lab.state_dir().join(format!("bench-{label}.ip"));
    std::fs::write(&file, text)
        .map_err(|e| BenchError::io(format!("writing {}", file.display()), e))?;
    let mut cmd = Command::new("ip");
    if let Some(ns) = ns {
        cmd.arg("-n").arg(ns);
    }
    cmd.arg("-b").arg(&file);
    run_checked(&mut cmd).map(drop)
}

fn add_netns(lab: &Lab, label: &str, names: &[String]) -> Result<(), BenchError> {
    let prefix = format!("{}-", lab.prefix());
    if let Some(bad) = names.iter().find(|n| !n.starts_with(&prefix)) {
        return Err(BenchError::failed(format!(
            "namespace {bad} is not named with the lab's prefix"
        )));
    }
    let batch: String = names.iter().map(|n| format!("netns add {n}\n")).collect();
    ip_batch(lab, None, &format!("{label}-netns"), &batch)
}

/// Writes sysctls (`net/...` under /proc/sys) inside namespace `ns`.
fn sysctls(ns: &str, values: &[(&str, &str)]) -> Result<(), BenchError> {
    let values: Vec<(String, String)> = values
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    run_in(&netns_path(ns), move || -> Result<(), BenchError> {
        for (k, v) in &values {
            ferry_overlay::sys::write_sysctl(k, v)
                .map_err(|e| BenchError::io(format!("setting {k}={v}"), e))?;
        }
        Ok(())
    })?
    .map_err(|e| BenchError::failed(format!("in namespace {ns}: {e}")))
}

/// MAC address of `dev` in namespace `ns`.
fn link_mac(ns: &str, dev: &str) -> Result<String, BenchError> {
    let out = run_checked(Command::new("ip").args(["-j", "-n", ns, "link", "show", "dev", dev]))?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_link_mac(&text).ok_or_else(|| {
        BenchError::failed(format!(
            "no MAC address for {dev} in {ns} in `ip -j link show`: {}",
            text.trim()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_lab::topology::Topology;

    #[test]
    fn flannel_batches_match_flannels_devices() {
        let t = Topology::default_lab().resolve().unwrap();
        let a1 = t.host("a1").unwrap();
        let b = flannel_host_batch(a1, 1, "fl000000-a1-kv");
        assert!(b.starts_with(
            "link add flannel.1 type vxlan id 1 local 198.18.1.10 dev eth0 dstport 8472 nolearning\n"
        ));
        assert!(b.contains("addr add 172.30.1.0/32 dev flannel.1\n"));
        assert!(b.contains("addr add 172.30.1.1/24 dev cni0\n"));
        assert!(b.contains("peer name eth0 netns fl000000-a1-kv\n"));
        assert!(flannel_container_batch(2).contains("addr add 172.30.2.2/24 dev eth0\n"));
        assert_eq!(
            flannel_peer_batch(2, "aa:bb:cc:dd:ee:ff"),
            "route add 172.30.2.0/24 via 172.30.2.0 dev flannel.1 onlink\n\
             neigh add 172.30.2.0 lladdr aa:bb:cc:dd:ee:ff dev flannel.1 nud permanent\n"
        );
    }

    #[test]
    fn routed_batches() {
        let b = routed_host_batch(1, "fl000000-a1-rt", 2, Ipv4Addr::new(198, 18, 1, 11));
        assert!(b.contains("route add 172.31.1.2/32 dev calirt0 scope link\n"));
        assert!(b.contains("route add 172.31.2.0/24 via 198.18.1.11 dev eth0\n"));
        assert!(
            routed_container_batch(1)
                .contains("route add default via 169.254.1.1 dev eth0 onlink\n")
        );
    }

    #[test]
    fn overlapping_overlays_are_refused() {
        let o16: Ipv4Net = "10.244.0.0/16".parse().unwrap();
        let o15: Ipv4Net = "10.244.0.0/15".parse().unwrap();
        let o12: Ipv4Net = "10.240.0.0/12".parse().unwrap();
        let big: Ipv4Net = "172.16.0.0/12".parse().unwrap();
        for o in [o16, o15, o12] {
            assert!(check_no_overlap("kernel_vxlan", kv_net(), o).is_ok());
            assert!(check_no_overlap("routed", rt_net(), o).is_ok());
        }
        let e = check_no_overlap("kernel_vxlan", kv_net(), big).unwrap_err();
        assert_eq!(
            e.to_string(),
            "kernel_vxlan's addresses 172.30.0.0/16 overlap the lab's overlay 172.16.0.0/12"
        );
        assert!(check_no_overlap("routed", rt_net(), "172.31.7.0/24".parse().unwrap()).is_err());
    }

    #[test]
    fn mac_from_ip_json() {
        let j = r#"[{"ifindex":5,"ifname":"flannel.1","flags":["BROADCAST"],"mtu":1450,
            "link_type":"ether","address":"5e:2c:09:8a:41:07","broadcast":"ff:ff:ff:ff:ff:ff"}]"#;
        assert_eq!(parse_link_mac(j).as_deref(), Some("5e:2c:09:8a:41:07"));
        assert_eq!(parse_link_mac("[]"), None);
        assert_eq!(parse_link_mac("not json"), None);
    }
}
