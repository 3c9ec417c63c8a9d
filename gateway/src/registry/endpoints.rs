//! Container endpoints: batches added all or nothing, removal (public mappings are kept).

use std::{collections::BTreeMap, net::Ipv4Addr};

use ferry_api::{Endpoint, EndpointSpec, ErrorCode, MacAddr, validate::MAX_ENDPOINTS_PER_REQUEST};
use ferry_common::MAX_ENDPOINTS;

use super::{Change, Registry, RegistryError, fail};
impl Registry {
    pub(crate) fn add_endpoints(
        &mut self,
        specs: Vec<EndpointSpec>,
    ) -> Result<Change, RegistryError> {
        if specs.is_empty() {
            return fail(
                ErrorCode::BadRequest,
                "endpoints: the list is empty: give at least one endpoint",
            );
        }
        if specs.len() > MAX_ENDPOINTS_PER_REQUEST {
            return fail(
                ErrorCode::BadRequest,
                format!(
                    "endpoints: {} in one request: at most {MAX_ENDPOINTS_PER_REQUEST}",
                    specs.len()
                ),
            );
        }
        Self::check_capacity(
            "overlay addresses (hosts and endpoints)",
            self.hosts.len() + self.endpoints.len(),
            specs.len(),
            MAX_ENDPOINTS,
        )?;
        let batch = specs.len() > 1;
        let mut seen_ip: BTreeMap<Ipv4Addr, usize> = BTreeMap::new();
        let mut seen_mac: BTreeMap<MacAddr, usize> = BTreeMap::new();
        let mut new = Vec::with_capacity(specs.len());
        for (i, s) in specs.into_iter().enumerate() {
            let at = |m: String| {
                if batch {
                    format!("endpoints[{i}]: {m}")
                } else {
                    m
                }
            };
            let wrap = |e: RegistryError| RegistryError {
                code: e.code,
                message: at(e.message),
            };
            self.check_overlay_ip("ip", s.ip).map_err(wrap)?;
            if let Some(h) = self.host_with_overlay_ip(s.ip) {
                return fail(
                    ErrorCode::Conflict,
                    at(format!("ip {} is host {}'s overlay_ip", s.ip, h.name)),
                );
            }
            if !self.hosts.contains_key(&s.host) {
                return fail(
                    ErrorCode::UnknownHost,
                    at(format!(
                        "host {:?} (of endpoint {}) is not registered",
                        s.host, s.ip
                    )),
                );
            }
            if let Some(e) = self.endpoints.get(&s.ip) {
                return fail(
                    ErrorCode::DuplicateEndpoint,
                    at(format!(
                        "endpoint {} already exists on host {}",
                        s.ip, e.host
                    )),
                );
            }
            if let Some(l) = self.leases.get(&s.ip)
                && l.host != s.host
            {
                return fail(
                    ErrorCode::Conflict,
                    at(format!(
                        "ip {} is allocated to container {} ({}) on host {}",
                        s.ip, l.container_id, l.ifname, l.host
                    )),
                );
            }
            if let Some(j) = seen_ip.insert(s.ip, i) {
                return fail(
                    ErrorCode::DuplicateEndpoint,
                    at(format!(
                        "ip {} appears twice in the request (also endpoints[{j}])",
                        s.ip
                    )),
                );
            }
            let mac = s.mac.unwrap_or_else(|| MacAddr::for_container(s.ip));
            if let Some(why) = unusable_mac(mac) {
                return fail(
                    ErrorCode::InvalidAddress,
                    at(format!("mac {mac} of endpoint {} {why}", s.ip)),
                );
            }
            if let Some(other) = self.macs.get(&mac) {
                return fail(
                    ErrorCode::Conflict,
                    at(format!(
                        "mac {mac} of endpoint {} is already endpoint {other}'s",
                        s.ip
                    )),
                );
            }
            if let Some(j) = seen_mac.insert(mac, i) {
                return fail(
                    ErrorCode::Conflict,
                    at(format!(
                        "mac {mac} appears twice in the request (also endpoints[{j}])"
                    )),
                );
            }
            new.push(Endpoint {
                ip: s.ip,
                host: s.host,
                mac,
            });
        }
        for e in &new {
            self.macs.insert(e.mac, e.ip);
            self.endpoints.insert(e.ip, e.clone());
        }
        Ok(Change::EndpointsAdded(new))
    }

    pub(crate) fn remove_endpoint(&mut self, ip: Ipv4Addr) -> Result<Change, RegistryError> {
        if !self.endpoints.contains_key(&ip) {
            return fail(
                ErrorCode::UnknownEndpoint,
                format!("no endpoint has ip {ip}"),
            );
        }
        if let Some(l) = self.active_migration(ip) {
            let m = &l.migration;
            return fail(
                ErrorCode::Conflict,
                format!(
                    "endpoint {ip} is being migrated (migration {}, {}, {} → {}): abort or \
                     finish the migration first",
                    m.id, m.phase, m.from, m.to
                ),
            );
        }
        let endpoint = self.endpoints.remove(&ip).expect("checked above");
        self.macs.remove(&endpoint.mac);
        let kept_public = self
            .public
            .values()
            .filter(|p| p.container == ip)
            .cloned()
            .collect();
        let ended_migrations = self.end_live(|m| m.container == ip);
        Ok(Change::EndpointRemoved {
            endpoint,
            kept_public,
            ended_migrations,
        })
    }
}

/// Why an endpoint cannot have `mac` (whatever other endpoints have), if it cannot.
fn unusable_mac(mac: MacAddr) -> Option<&'static str> {
    if mac.is_zero() {
        Some("is all zeros")
    } else if !mac.is_unicast() {
        Some("is a multicast address: want a unicast MAC")
    } else if mac.is_ferry_reserved() {
        Some(
            "is reserved: ferry's gateway and VXLAN devices use 0e:fe:…; pick another (or \
             none, for 0e:fc: + the address)",
        )
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use ferry_api::{EndpointSpec, ErrorCode, MacAddr};

    use crate::registry::{Change, Request};

    use crate::registry::testutil::*;

    #[test]
    fn endpoint_validation() {
        let mut r = populated();
        use ErrorCode::*;
        let one = |s: EndpointSpec| Request::AddEndpoints(vec![s]);
        let cases = [
            (
                one(ep("10.245.1.1", "a1")),
                InvalidAddress,
                "ip 10.245.1.1 is outside overlay_cidr 10.244.0.0/16",
            ),
            (
                one(ep("10.244.0.0", "a1")),
                InvalidAddress,
                "ip 10.244.0.0 is the network address",
            ),
            (
                one(ep("10.244.255.255", "a1")),
                InvalidAddress,
                "ip 10.244.255.255 is the broadcast address",
            ),
            (
                one(ep("10.244.255.3", "a1")),
                Conflict,
                "ip 10.244.255.3 is host b1's overlay_ip",
            ),
            (
                one(ep("10.244.1.9", "zz")),
                UnknownHost,
                "host \"zz\" (of endpoint 10.244.1.9) is not registered",
            ),
            (
                one(ep("10.244.1.5", "b1")),
                DuplicateEndpoint,
                "endpoint 10.244.1.5 already exists on host a1",
            ),
            (
                one(ep_mac("10.244.1.9", "a1", "00:00:00:00:00:00")),
                InvalidAddress,
                "mac 00:00:00:00:00:00 of endpoint 10.244.1.9 is all zeros",
            ),
            (
                one(ep_mac("10.244.1.9", "a1", "01:00:5e:00:00:01")),
                InvalidAddress,
                "is a multicast address",
            ),
            (
                one(ep_mac("10.244.1.9", "a1", "0e:fe:00:00:00:01")),
                InvalidAddress,
                "mac 0e:fe:00:00:00:01 of endpoint 10.244.1.9 is reserved",
            ),
            (
                one(ep_mac("10.244.1.9", "a1", "0e:fe:0a:f4:ff:02")),
                InvalidAddress,
                "is reserved: ferry's gateway and VXLAN devices use 0e:fe:",
            ),
            (
                one(ep_mac("10.244.1.9", "a1", "0e:fc:0a:f4:01:05")),
                Conflict,
                "mac 0e:fc:0a:f4:01:05 of endpoint 10.244.1.9 is already endpoint 10.244.1.5's",
            ),
            (
                Request::AddEndpoints(vec![]),
                BadRequest,
                "the list is empty",
            ),
        ];
        for (req, code, want) in cases {
            refused(&mut r, req, code, want);
        }
    }

    /// `n` endpoints on a1 from `first` on (consecutive addresses).
    fn many(first: u32, n: usize) -> Vec<EndpointSpec> {
        (0..n as u32)
            .map(|i| ep(&std::net::Ipv4Addr::from(first + i).to_string(), "a1"))
            .collect()
    }

    #[test]
    fn requests_and_the_registry_are_bounded() {
        use ferry_api::validate::MAX_ENDPOINTS_PER_REQUEST;
        // A /13: room for more than the agents' map holds.
        let mut r = crate::registry::Registry::new(crate::registry::NetConfig {
            overlay_cidr: "10.240.0.0/13".parse().unwrap(),
            overlay6_cidr: None,
            ..net()
        });
        r.apply(Request::RegisterHost(host(
            "a1",
            "198.18.1.10",
            "10.247.255.1",
        )))
        .unwrap();
        let base = u32::from(std::net::Ipv4Addr::new(10, 240, 0, 1));
        let per = MAX_ENDPOINTS_PER_REQUEST;
        refused(
            &mut r,
            Request::AddEndpoints(many(base, per + 1)),
            ErrorCode::BadRequest,
            "endpoints: 65537 in one request: at most 65536",
        );
        // Three full batches: 1 host and 196,608 endpoints.
        for i in 0..3 {
            r.apply(Request::AddEndpoints(many(base + (i * per) as u32, per)))
                .unwrap();
        }
        let next = base + (3 * per) as u32;
        let room = ferry_common::MAX_ENDPOINTS as usize - 3 * per - 1;
        assert_eq!(room, 65_535);
        refused(
            &mut r,
            Request::AddEndpoints(many(next, room + 1)),
            ErrorCode::Conflict,
            "the registry holds 196609 overlay addresses (hosts and endpoints): 65536 more \
             would exceed 262144",
        );
        r.apply(Request::AddEndpoints(many(next, room))).unwrap();
        refused(
            &mut r,
            Request::RegisterHost(host("b1", "198.18.2.10", "10.247.255.2")),
            ErrorCode::Conflict,
            "1 more would exceed 262144",
        );
    }

    #[test]
    fn endpoint_batches_are_all_or_nothing() {
        let mut r = populated();
        // The bad entry is last: the good ones before it must not be applied.
        refused(
            &mut r,
            Request::AddEndpoints(vec![
                ep("10.244.1.6", "a1"),
                ep("10.244.1.7", "b1"),
                ep("10.244.1.8", "nope"),
            ]),
            ErrorCode::UnknownHost,
            "endpoints[2]: host \"nope\"",
        );
        refused(
            &mut r,
            Request::AddEndpoints(vec![
                ep("10.244.1.6", "a1"),
                ep("10.244.1.7", "b1"),
                ep("10.244.1.6", "b1"),
            ]),
            ErrorCode::DuplicateEndpoint,
            "endpoints[2]: ip 10.244.1.6 appears twice in the request (also endpoints[0])",
        );
        refused(
            &mut r,
            Request::AddEndpoints(vec![
                ep_mac("10.244.1.6", "a1", "0e:00:00:00:00:01"),
                ep_mac("10.244.1.7", "a1", "0e:00:00:00:00:01"),
            ]),
            ErrorCode::Conflict,
            "endpoints[1]: mac 0e:00:00:00:00:01 appears twice in the request (also endpoints[0])",
        );
        // A default MAC colliding with an explicit one in the same batch.
        refused(
            &mut r,
            Request::AddEndpoints(vec![
                ep_mac("10.244.1.6", "a1", "0e:fc:0a:f4:01:07"),
                ep("10.244.1.7", "a1"),
            ]),
            ErrorCode::Conflict,
            "appears twice",
        );

        let v = r.version();
        let added = r
            .apply(Request::AddEndpoints(vec![
                ep("10.244.1.6", "a1"),
                ep_mac("10.244.1.7", "b1", "02:00:00:00:00:07"),
            ]))
            .unwrap();
        assert_eq!(r.version(), v + 1, "one batch is one version");
        let Change::EndpointsAdded(added) = added else {
            panic!("{added:?}")
        };
        assert_eq!(
            added[0].mac,
            MacAddr::for_container("10.244.1.6".parse().unwrap())
        );
        assert_eq!(added[1].mac.to_string(), "02:00:00:00:00:07");
        assert_eq!(r.endpoint_count(), 4);
    }

    #[test]
    fn endpoint_removal_keeps_public_mappings_and_frees_the_mac() {
        let mut r = populated();
        r.apply(Request::AddPublic(whole("203.0.113.130", "10.244.1.5")))
            .unwrap();
        refused(
            &mut r,
            Request::RemoveEndpoint("10.244.1.99".parse().unwrap()),
            ErrorCode::UnknownEndpoint,
            "no endpoint has ip 10.244.1.99",
        );
        let c = r
            .apply(Request::RemoveEndpoint("10.244.1.5".parse().unwrap()))
            .unwrap();
        let Change::EndpointRemoved {
            endpoint,
            kept_public,
            ended_migrations,
        } = c
        else {
            panic!("{c:?}")
        };
        assert_eq!(endpoint.host, "a1");
        assert!(ended_migrations.is_empty());
        assert_eq!(kept_public, vec![whole("203.0.113.130", "10.244.1.5")]);
        assert_eq!(r.public_count(), 1);
        assert_eq!(
            r.dangling_public(),
            BTreeSet::from(["10.244.1.5".parse().unwrap()])
        );
        // Move: re-add on another host, with the same (default) MAC.
        r.apply(Request::AddEndpoints(vec![ep("10.244.1.5", "b1")]))
            .unwrap();
        assert!(r.dangling_public().is_empty());
        // A host may not take the overlay address a kept mapping points to.
        r.apply(Request::RemoveEndpoint("10.244.1.5".parse().unwrap()))
            .unwrap();
        refused(
            &mut r,
            Request::RegisterHost(host("c1", "198.18.9.1", "10.244.1.5")),
            ErrorCode::Conflict,
            "container address of public mapping 203.0.113.130",
        );
    }
}
