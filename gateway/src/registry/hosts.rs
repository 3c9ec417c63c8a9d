//! Hosts: registration (idempotent; updates bump the version) and removal.

use std::net::Ipv4Addr;

use ferry_api::{
    ErrorCode, HostInfo, HostRole,
    validate::{underlay_reason, validate_host_name},
};
use ferry_common::{MAX_ENDPOINTS, MAX_VTEPS};

use super::{Change, Registry, RegistryError, fail};
impl Registry {
    pub(crate) fn register_host(&mut self, h: HostInfo) -> Result<Change, RegistryError> {
        validate_host_name(&h.name).map_err(|m| RegistryError {
            code: ErrorCode::BadRequest,
            message: format!("name: {m}"),
        })?;
        if let Some(why) = underlay_reason(h.vtep) {
            return fail(
                ErrorCode::InvalidAddress,
                format!(
                    "vtep {} is {why}: want the host's unicast underlay address",
                    h.vtep
                ),
            );
        }
        if self.net.overlay_cidr.contains(&h.vtep) {
            return fail(
                ErrorCode::InvalidAddress,
                format!(
                    "vtep {} is inside overlay_cidr {}: want the host's underlay address",
                    h.vtep, self.net.overlay_cidr
                ),
            );
        }
        if let Some(c) = self.net.public_cidrs.iter().find(|c| c.contains(&h.vtep)) {
            return fail(
                ErrorCode::InvalidAddress,
                format!(
                    "vtep {} is inside public_cidrs {c}: the gateway translates those addresses \
                     to containers; want the host's underlay address",
                    h.vtep
                ),
            );
        }
        self.check_overlay_ip("overlay_ip", h.overlay_ip)?;

        let old = self.hosts.get(&h.name).cloned();
        // The registry's to set (a takeover), kept across re-registrations; a host that is
        // no gateway any more loses it.
        let mut h = h;
        h.active_since = old
            .as_ref()
            .and_then(|o| o.active_since)
            .filter(|_| h.role == HostRole::Gateway);
        if old.as_ref() == Some(&h) {
            return Ok(Change::HostUnchanged(h));
        }
        if old.is_none() {
            // A host is a VTEP and an overlay address in every agent's maps.
            Self::check_capacity("hosts", self.hosts.len(), 1, MAX_VTEPS)?;
            Self::check_capacity(
                "overlay addresses (hosts and endpoints)",
                self.hosts.len() + self.endpoints.len(),
                1,
                MAX_ENDPOINTS,
            )?;
        }
        for other in self.hosts.values().filter(|o| o.name != h.name) {
            if other.vtep == h.vtep {
                return fail(
                    ErrorCode::Conflict,
                    format!("vtep {} is already host {}'s vtep", h.vtep, other.name),
                );
            }
            if other.overlay_ip == h.overlay_ip {
                return fail(
                    ErrorCode::Conflict,
                    format!(
                        "overlay_ip {} is already host {}'s overlay_ip",
                        h.overlay_ip, other.name
                    ),
                );
            }
        }
        if let Some(e) = self.endpoints.get(&h.overlay_ip) {
            return fail(
                ErrorCode::Conflict,
                format!(
                    "overlay_ip {} is the address of endpoint {} on host {}",
                    h.overlay_ip, e.ip, e.host
                ),
            );
        }
        if let Some(l) = self.leases.get(&h.overlay_ip) {
            return fail(
                ErrorCode::Conflict,
                format!(
                    "overlay_ip {} is allocated to container {} ({}) on host {}",
                    h.overlay_ip, l.container_id, l.ifname, l.host
                ),
            );
        }
        if let Some(p) = self.public.values().find(|p| p.container == h.overlay_ip) {
            return fail(
                ErrorCode::Conflict,
                format!(
                    "overlay_ip {} is the container address of public mapping {}",
                    h.overlay_ip,
                    p.key()
                ),
            );
        }
        self.hosts.insert(h.name.clone(), h.clone());
        Ok(match old {
            None => Change::HostAdded(h),
            Some(old) => Change::HostUpdated { old, new: h },
        })
    }

    /// `host` (role gateway) takes the internet side over from `from`, the host facing it now
    /// ([`ferry_api::public_gateway`]). Refused if `from` is not that host (someone else took
    /// over first, or the caller's view is old); unchanged if `host` already faces it.
    pub(crate) fn take_over_public(
        &mut self,
        host: &str,
        from: &str,
    ) -> Result<Change, RegistryError> {
        let Some(h) = self.hosts.get(host).cloned() else {
            return fail(
                ErrorCode::UnknownHost,
                format!("host {host:?} is not registered"),
            );
        };
        if h.role != HostRole::Gateway {
            return fail(
                ErrorCode::BadRequest,
                format!(
                    "host {host} does not have role gateway: only a gateway-role host can face \
                     the internet"
                ),
            );
        }
        let now = ferry_api::public_gateway(self.hosts.values()).map(|g| g.name.clone());
        if now.as_deref() == Some(host) {
            return Ok(Change::HostUnchanged(h));
        }
        if now.as_deref() != Some(from) {
            return fail(
                ErrorCode::Conflict,
                format!(
                    "host {host} cannot take the internet side over from {from}: {} faces it",
                    now.as_deref().unwrap_or("no host")
                ),
            );
        }
        let mut new = h.clone();
        new.active_since = Some(self.version + 1);
        self.hosts.insert(new.name.clone(), new.clone());
        Ok(Change::HostUpdated { old: h, new })
    }

    pub(crate) fn remove_host(&mut self, name: &str) -> Result<Change, RegistryError> {
        if !self.hosts.contains_key(name) {
            return fail(
                ErrorCode::UnknownHost,
                format!("host {name:?} is not registered"),
            );
        }
        if let Some(l) = self.migrations.values().find(|l| {
            l.migration.phase.is_active() && (l.migration.from == name || l.migration.to == name)
        }) {
            let m = &l.migration;
            let role = if m.to == name {
                "destination"
            } else {
                "source"
            };
            return fail(
                ErrorCode::Conflict,
                format!(
                    "host {name} is the {role} of migration {} ({}, {}, {} → {}): abort or \
                     finish it first",
                    m.id, m.container, m.phase, m.from, m.to
                ),
            );
        }
        let on_it: Vec<Ipv4Addr> = self
            .endpoints
            .values()
            .filter(|e| e.host == name)
            .map(|e| e.ip)
            .collect();
        if !on_it.is_empty() {
            let mut list: Vec<String> = on_it.iter().take(5).map(|ip| ip.to_string()).collect();
            if on_it.len() > 5 {
                list.push("…".into());
            }
            return fail(
                ErrorCode::Conflict,
                format!(
                    "host {name} still has {} endpoint(s) ({}): remove or move them first",
                    on_it.len(),
                    list.join(", ")
                ),
            );
        }
        // Leases whose endpoint was never registered (or was removed) name the host they
        // were given on: its containers still hold them until their CNI DEL.
        let pending: Vec<Ipv4Addr> = self
            .leases
            .values()
            .filter(|l| l.host == name && !self.endpoints.contains_key(&l.ip))
            .map(|l| l.ip)
            .collect();
        if !pending.is_empty() {
            let list: Vec<String> = pending.iter().take(5).map(|ip| ip.to_string()).collect();
            return fail(
                ErrorCode::Conflict,
                format!(
                    "host {name} still holds {} IPAM lease(s) ({}): release them first \
                     (POST /v1/ipam/release)",
                    pending.len(),
                    list.join(", ")
                ),
            );
        }
        let host = self.hosts.remove(name).expect("checked above");
        let ended_migrations = self.end_live(|m| m.from == name || m.to == name);
        Ok(Change::HostRemoved {
            host,
            ended_migrations,
        })
    }
}

#[cfg(test)]
mod tests {

    use ferry_api::{ErrorCode, HostInfo, HostRole};

    use crate::registry::{Change, Request};

    use crate::registry::testutil::*;

    #[test]
    fn host_registration_is_idempotent_and_updates_bump() {
        let mut r = populated();
        let v = r.version();
        let same = host("a1", "198.18.1.10", "10.244.255.1");
        assert_eq!(
            r.apply(Request::RegisterHost(same.clone())).unwrap(),
            Change::HostUnchanged(same.clone())
        );
        assert_eq!(r.version(), v, "identical re-registration must not bump");

        let moved = host("a1", "198.18.1.11", "10.244.255.2");
        assert_eq!(
            r.apply(Request::RegisterHost(moved.clone())).unwrap(),
            Change::HostUpdated {
                old: same,
                new: moved.clone()
            }
        );
        assert_eq!(r.version(), v + 1);
        assert_eq!(r.host("a1"), Some(&moved));
        // Endpoints stay on the updated host.
        assert_eq!(r.endpoints().filter(|e| e.host == "a1").count(), 1);

        // Role change is an update too.
        let promoted = HostInfo {
            role: HostRole::Gateway,
            active_since: None,
            ..host("b1", "198.18.2.10", "10.244.255.3")
        };
        // A second gateway-role host is a standby for the internet side.
        r.apply(Request::RegisterHost(promoted)).unwrap();
        assert_eq!(r.version(), v + 2);
        r.apply(Request::RegisterHost(gw(
            "gw",
            "198.18.0.10",
            "10.244.255.254",
        )))
        .unwrap();
        assert_eq!(r.version(), v + 2, "gateway re-registration unchanged");
        r.apply(Request::RegisterHost(host(
            "gw",
            "198.18.0.10",
            "10.244.255.254",
        )))
        .unwrap();
        r.apply(Request::RegisterHost(gw(
            "b1",
            "198.18.2.10",
            "10.244.255.3",
        )))
        .unwrap();
        assert_eq!(r.version(), v + 3);
    }

    #[test]
    fn host_validation() {
        let mut r = populated();
        use ErrorCode::*;
        let cases = [
            (
                host("A1", "198.18.9.1", "10.244.255.9"),
                BadRequest,
                "name: host name \"A1\"",
            ),
            (
                host("-x", "198.18.9.1", "10.244.255.9"),
                BadRequest,
                "starts with '-'",
            ),
            (host("", "198.18.9.1", "10.244.255.9"), BadRequest, "empty"),
            (
                host(&"x".repeat(33), "198.18.9.1", "10.244.255.9"),
                BadRequest,
                "33 characters",
            ),
            (
                host("c1", "0.0.0.0", "10.244.255.9"),
                InvalidAddress,
                "vtep 0.0.0.0 is the unspecified",
            ),
            (
                host("c1", "127.0.0.1", "10.244.255.9"),
                InvalidAddress,
                "vtep 127.0.0.1 is a loopback",
            ),
            (
                host("c1", "239.1.1.1", "10.244.255.9"),
                InvalidAddress,
                "vtep 239.1.1.1 is a multicast",
            ),
            (
                host("c1", "255.255.255.255", "10.244.255.9"),
                InvalidAddress,
                "the broadcast address",
            ),
            (
                host("c1", "0.1.2.3", "10.244.255.9"),
                InvalidAddress,
                "vtep 0.1.2.3 is in 0.0.0.0/8",
            ),
            (
                host("c1", "169.254.10.1", "10.244.255.9"),
                InvalidAddress,
                "vtep 169.254.10.1 is a link-local address",
            ),
            (
                host("c1", "203.0.113.140", "10.244.255.9"),
                InvalidAddress,
                "vtep 203.0.113.140 is inside public_cidrs 203.0.113.128/25",
            ),
            (
                host("c1", "10.244.7.7", "10.244.255.9"),
                InvalidAddress,
                "vtep 10.244.7.7 is inside overlay_cidr 10.244.0.0/16",
            ),
            (
                host("c1", "198.18.9.1", "10.245.0.1"),
                InvalidAddress,
                "overlay_ip 10.245.0.1 is outside overlay_cidr 10.244.0.0/16",
            ),
            (
                host("c1", "198.18.9.1", "10.244.0.0"),
                InvalidAddress,
                "overlay_ip 10.244.0.0 is the network address",
            ),
            (
                host("c1", "198.18.9.1", "10.244.255.255"),
                InvalidAddress,
                "overlay_ip 10.244.255.255 is the broadcast address",
            ),
            (
                host("c1", "198.18.1.10", "10.244.255.9"),
                Conflict,
                "vtep 198.18.1.10 is already host a1's vtep",
            ),
            (
                host("c1", "198.18.9.1", "10.244.255.1"),
                Conflict,
                "overlay_ip 10.244.255.1 is already host a1's overlay_ip",
            ),
            (
                host("c1", "198.18.9.1", "10.244.1.5"),
                Conflict,
                "overlay_ip 10.244.1.5 is the address of endpoint 10.244.1.5 on host a1",
            ),
            // An update of a1 must not collide with b1 either.
            (
                host("a1", "198.18.2.10", "10.244.255.1"),
                Conflict,
                "vtep 198.18.2.10 is already host b1's vtep",
            ),
        ];
        for (h, code, want) in cases {
            refused(&mut r, Request::RegisterHost(h), code, want);
        }
    }

    #[test]
    fn at_most_max_vteps_hosts() {
        let mut r = populated();
        let n = ferry_common::MAX_VTEPS as usize - r.host_count();
        for i in 0..n {
            let h = host(
                &format!("h{i}"),
                &format!("198.19.{}.{}", i / 250, 1 + i % 250),
                &format!("10.244.{}.{}", 100 + i / 250, 1 + i % 250),
            );
            r.apply(Request::RegisterHost(h)).unwrap();
        }
        refused(
            &mut r,
            Request::RegisterHost(host("one-more", "198.20.0.1", "10.244.254.1")),
            ErrorCode::Conflict,
            "the registry holds 4096 hosts: 1 more would exceed 4096",
        );
        // Re-registering (or updating) a host that is there still works at the cap.
        r.apply(Request::RegisterHost(host(
            "a1",
            "198.18.1.11",
            "10.244.255.1",
        )))
        .unwrap();
    }

    #[test]
    fn host_removal() {
        let mut r = populated();
        refused(
            &mut r,
            Request::RemoveHost("nope".into()),
            ErrorCode::UnknownHost,
            "host \"nope\" is not registered",
        );
        refused(
            &mut r,
            Request::RemoveHost("a1".into()),
            ErrorCode::Conflict,
            "host a1 still has 1 endpoint(s) (10.244.1.5)",
        );
        let v = r.version();
        assert_eq!(
            r.apply(Request::RemoveHost("gw".into())).unwrap(),
            Change::HostRemoved {
                host: gw("gw", "198.18.0.10", "10.244.255.254"),
                ended_migrations: vec![],
            }
        );
        assert_eq!(r.version(), v + 1);
        assert!(r.host("gw").is_none());
    }

    #[test]
    fn a_standby_gateway_takes_the_internet_side_over_exactly_once() {
        let mut r = populated();
        let gw2 = gw("gw2", "198.18.2.20", "10.244.255.20");
        r.apply(Request::RegisterHost(gw2.clone())).unwrap();
        let facing = |r: &crate::registry::Registry| {
            ferry_api::public_gateway(r.hosts()).map(|h| h.name.clone())
        };
        // Before any takeover: the first by name.
        assert_eq!(facing(&r).as_deref(), Some("gw"));
        refused(
            &mut r,
            Request::TakeOverPublic {
                host: "a1".into(),
                from: "gw".into(),
            },
            ErrorCode::BadRequest,
            "host a1 does not have role gateway",
        );
        refused(
            &mut r,
            Request::TakeOverPublic {
                host: "nope".into(),
                from: "gw".into(),
            },
            ErrorCode::UnknownHost,
            "host \"nope\" is not registered",
        );
        let v = r.version();
        let take = Request::TakeOverPublic {
            host: "gw2".into(),
            from: "gw".into(),
        };
        let Change::HostUpdated { new, .. } = r.apply(take.clone()).unwrap() else {
            panic!("a takeover updates the host");
        };
        assert_eq!(new.active_since, Some(v + 1));
        assert_eq!(r.version(), v + 1);
        assert_eq!(facing(&r).as_deref(), Some("gw2"));
        // The same call again: unchanged.
        assert!(matches!(r.apply(take).unwrap(), Change::HostUnchanged(_)));
        assert_eq!(r.version(), v + 1);
        // The old one taking over from itself (an old view) is refused: one winner.
        refused(
            &mut r,
            Request::TakeOverPublic {
                host: "gw".into(),
                from: "gw".into(),
            },
            ErrorCode::Conflict,
            "host gw cannot take the internet side over from gw: gw2 faces it",
        );
        // The agent re-registering keeps what the registry decided.
        r.apply(Request::RegisterHost(gw2)).unwrap();
        assert_eq!(facing(&r).as_deref(), Some("gw2"));
        assert_eq!(r.version(), v + 1);
        // And back, from the one facing it now.
        r.apply(Request::TakeOverPublic {
            host: "gw".into(),
            from: "gw2".into(),
        })
        .unwrap();
        assert_eq!(facing(&r).as_deref(), Some("gw"));
    }
}
