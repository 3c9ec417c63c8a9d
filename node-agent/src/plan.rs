//! Pure: what the datapath maps must hold for a given configuration. Tested without root.

use std::net::Ipv4Addr;

use ferry_common::{Endpoint, Vtep, ipv4_be, kind};

use crate::config::AgentConfig;

/// Default TTL of the outer IPv4 header.
pub const TUNNEL_TTL: u32 = 64;

/// The desired content of the endpoint and VTEP maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapPlan {
    pub endpoints: Vec<(Ipv4Addr, Endpoint)>,
    pub vteps: Vec<(Ipv4Addr, Vtep)>,
}

/// This host's own overlay address is `HOST`; every peer's overlay address is `REMOTE` to its
/// VTEP; every peer's VTEP is allowed to send us VXLAN with our VNI.
pub fn plan(cfg: &AgentConfig) -> MapPlan {
    let mut endpoints = vec![(
        cfg.overlay_ip,
        Endpoint {
            kind: kind::HOST,
            ..Endpoint::default()
        },
    )];
    let mut vteps = Vec::new();
    for (i, peer) in cfg.peers.iter().enumerate() {
        endpoints.push((
            peer.overlay_ip,
            Endpoint {
                kind: kind::REMOTE,
                vtep_be: ipv4_be(peer.vtep.octets()),
                vni: cfg.vni,
                ..Endpoint::default()
            },
        ));
        vteps.push((
            peer.vtep,
            Vtep {
                vni: cfg.vni,
                host_id: u32::try_from(i + 1).unwrap_or(u32::MAX),
            },
        ));
    }
    MapPlan { endpoints, vteps }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Peer;

    fn cfg() -> AgentConfig {
        AgentConfig {
            host: "a1".into(),
            vtep: "198.18.1.10".parse().unwrap(),
            overlay_ip: "10.244.255.1".parse().unwrap(),
            overlay_cidr: "10.244.0.0/16".parse().unwrap(),
            vni: 77,
            vxlan_port: 4789,
            vxlan_device: "ferry_vx".into(),
            metrics_listen: "127.0.0.1:9464".parse().unwrap(),
            bpffs_dir: None,
            peers: vec![Peer {
                name: "b1".into(),
                vtep: "198.18.2.10".parse().unwrap(),
                overlay_ip: "10.244.255.3".parse().unwrap(),
            }],
        }
    }

    #[test]
    fn own_address_is_host_and_peers_are_remote() {
        let p = plan(&cfg());
        assert_eq!(p.endpoints.len(), 2);
        assert_eq!(
            p.endpoints[0].0,
            "10.244.255.1".parse::<Ipv4Addr>().unwrap()
        );
        assert_eq!(p.endpoints[0].1.kind, kind::HOST);
        let (ip, ep) = p.endpoints[1];
        assert_eq!(ip, "10.244.255.3".parse::<Ipv4Addr>().unwrap());
        assert_eq!(ep.kind, kind::REMOTE);
        assert_eq!(ep.vni, 77);
        assert_eq!(ep.vtep_be.to_ne_bytes(), [198, 18, 2, 10]);
        assert_eq!(
            p.vteps,
            vec![(
                "198.18.2.10".parse().unwrap(),
                Vtep {
                    vni: 77,
                    host_id: 1
                }
            )]
        );
    }

    #[test]
    fn no_peers_means_no_vtep_is_allowed() {
        let mut c = cfg();
        c.peers.clear();
        let p = plan(&c);
        assert!(p.vteps.is_empty());
        assert_eq!(p.endpoints.len(), 1);
    }
}
