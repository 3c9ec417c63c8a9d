//! The CNI plugin's cluster-wide IPAM: leases of the pool's addresses, given out and freed by
//! the reducer like every other change (validated whole, persisted before the answer, no I/O
//! here), so an address is unique across all hosts by construction.
//!
//! - An address is *usable* if it is in the pool (`[ipam] pool`, default the overlay), not in
//!   `[ipam] reserved`, and not the pool's or the overlay's network or broadcast address.
//! - It is *free* if no lease, endpoint, host (overlay address) or public mapping holds it.
//! - A new address is the next free one after the last given (round robin over the pool), so
//!   an address freed a moment ago is not handed to the next container at once (peers may
//!   still hold connections or neighbour entries for it).
//! - A requested address is honoured if it is usable and free, or if it is the address of a
//!   container whose migration to the asking host is prepared or frozen: that container is
//!   arriving there (a runtime restoring a checkpoint asks for its old address), so the answer
//!   names the migration and nothing is allocated. A request without an address from the
//!   container id (and interface) that holds such a migrating container's lease is answered
//!   the same way: a runtime that restores without asking for the address (Podman's
//!   `--ignore-static-ip`) keeps the container's id.
//! - Releasing frees the lease and removes the container's endpoint in the same change — if
//!   the endpoint lives on the asking host and does not migrate. An endpoint that lives
//!   elsewhere (its container migrated away) or is migrating is refused: the registry entry of
//!   a container that runs on another host is never removed by the host it left.

use std::{collections::BTreeSet, net::Ipv4Addr};

use ferry_api::{
    Endpoint, ErrorCode, IpamAllocateRequest, IpamAllocation, IpamLease, IpamReleaseRequest,
    IpamStatus, Migration, PublicMapping,
};
use ipnet::Ipv4Net;

use super::{Change, Registry, RegistryError, fail};

/// Where the CNI plugin's addresses come from (the gateway's `[ipam]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IpamPool {
    pub pool: Ipv4Net,
    pub reserved: Vec<Ipv4Net>,
}

impl IpamPool {
    /// The whole overlay, nothing reserved (the default).
    pub fn whole(overlay: Ipv4Net) -> Self {
        Self {
            pool: overlay,
            reserved: Vec::new(),
        }
    }
}

/// What a release did (see [`Change::Released`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Released {
    pub ip: Ipv4Addr,
    pub lease: Option<IpamLease>,
    pub endpoint: Option<Endpoint>,
    /// The endpoint's public mappings (kept, as with any endpoint removal).
    pub kept_public: Vec<PublicMapping>,
    /// A released migration of it whose grace was still running, ended early.
    pub ended_migrations: Vec<Migration>,
}

fn bad_request(field: &str, e: String) -> RegistryError {
    RegistryError {
        code: ErrorCode::BadRequest,
        message: format!("{field}: {e}"),
    }
}

impl Registry {
    /// The leases, by address.
    pub fn leases(&self) -> impl Iterator<Item = &IpamLease> {
        self.leases.values()
    }

    pub fn lease_count(&self) -> usize {
        self.leases.len()
    }

    /// `GET /v1/ipam`.
    pub fn ipam_status(&self) -> IpamStatus {
        let held = self.held_addresses();
        let free = self
            .pool_addresses()
            .filter(|ip| self.unusable(*ip).is_none() && !held.contains(ip))
            .count() as u64;
        IpamStatus {
            pool: self.net.ipam.pool,
            reserved: self.net.ipam.reserved.clone(),
            leases: self.leases.values().cloned().collect(),
            free,
        }
    }

    /// Every address of the pool, in order.
    fn pool_addresses(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        let p = self.net.ipam.pool;
        (u32::from(p.network())..=u32::from(p.broadcast())).map(Ipv4Addr::from)
    }

    /// Why `ip` can never be given out, if it cannot.
    fn unusable(&self, ip: Ipv4Addr) -> Option<String> {
        let (pool, overlay) = (self.net.ipam.pool, self.net.overlay_cidr);
        if !pool.contains(&ip) {
            return Some(format!("is outside the IPAM pool {pool}"));
        }
        for (net, what) in [(pool, "the IPAM pool"), (overlay, "overlay_cidr")] {
            if ip == net.network() {
                return Some(format!("is the network address of {what} {net}"));
            }
            if ip == net.broadcast() {
                return Some(format!("is the broadcast address of {what} {net}"));
            }
        }
        self.net
            .ipam
            .reserved
            .iter()
            .find(|r| r.contains(&ip))
            .map(|r| format!("is reserved (ipam.reserved {r})"))
    }

    /// Who holds `ip`, if anyone: a lease, an endpoint, a host, a public mapping.
    fn holder(&self, ip: Ipv4Addr) -> Option<String> {
        if let Some(l) = self.leases.get(&ip) {
            return Some(format!(
                "is allocated to container {} ({}) on host {}",
                l.container_id, l.ifname, l.host
            ));
        }
        if let Some(e) = self.endpoints.get(&ip) {
            return Some(format!("is endpoint {} on host {}", e.ip, e.host));
        }
        if let Some(h) = self.host_with_overlay_ip(ip) {
            return Some(format!("is host {}'s overlay address", h.name));
        }
        self.public
            .values()
            .find(|p| p.container == ip)
            .map(|p| format!("is the container address of public mapping {}", p.key()))
    }

    /// Every address some lease, endpoint, host or public mapping holds.
    fn held_addresses(&self) -> BTreeSet<Ipv4Addr> {
        let mut held: BTreeSet<Ipv4Addr> = self.leases.keys().copied().collect();
        held.extend(self.endpoints.keys());
        held.extend(self.hosts.values().map(|h| h.overlay_ip));
        held.extend(self.public.values().map(|p| p.container));
        held
    }

    fn check_owner(
        &self,
        host: &str,
        container_id: &str,
        ifname: Option<&str>,
    ) -> Result<(), RegistryError> {
        ferry_cni::spec::validate_container_id(container_id)
            .map_err(|e| bad_request("container_id", e))?;
        if let Some(i) = ifname {
            ferry_cni::spec::validate_ifname(i).map_err(|e| bad_request("ifname", e))?;
        }
        if !self.hosts.contains_key(host) {
            return fail(
                ErrorCode::UnknownHost,
                format!("host {host:?} is not registered"),
            );
        }
        Ok(())
    }

    pub(crate) fn allocate(&mut self, req: IpamAllocateRequest) -> Result<Change, RegistryError> {
        self.check_owner(&req.host, &req.container_id, Some(&req.ifname))?;
        let same_owner = |l: &IpamLease| {
            l.host == req.host && l.container_id == req.container_id && l.ifname == req.ifname
        };
        let unchanged = |lease: &IpamLease| {
            Ok(Change::Allocated(IpamAllocation {
                ip: lease.ip,
                lease: Some(lease.clone()),
                migration: None,
                endpoint: None,
                changed: false,
            }))
        };
        let ip = match req.ip {
            Some(ip) => {
                // A container arriving with a migration asks for its own address.
                if let Some(l) = self.active_migration(ip) {
                    let m = &l.migration;
                    if m.to != req.host {
                        return fail(
                            ErrorCode::Conflict,
                            format!(
                                "ip {ip} is migrating from {} to {} (migration {}, {}), not to \
                                 {}",
                                m.from, m.to, m.id, m.phase, req.host
                            ),
                        );
                    }
                    return Ok(Change::Allocated(IpamAllocation {
                        ip,
                        lease: None,
                        migration: Some(m.id.clone()),
                        endpoint: self.endpoints.get(&ip).cloned(),
                        changed: false,
                    }));
                }
                if let Some(l) = self.leases.get(&ip)
                    && same_owner(l)
                {
                    return unchanged(l);
                }
                if let Some(why) = self.unusable(ip) {
                    return fail(ErrorCode::InvalidAddress, format!("ip {ip} {why}"));
                }
                if let Some(who) = self.holder(ip) {
                    return fail(ErrorCode::Conflict, format!("ip {ip} {who}"));
                }
                ip
            }
            None => {
                // A runtime restoring a checkpoint without asking for its address (Podman's
                // `--ignore-static-ip`) keeps its container id: the lease it held on the
                // source names it, and its migration comes here.
                // (Through the live migrations, a handful, not the leases.)
                let arriving = self
                    .migrations
                    .values()
                    .map(|l| &l.migration)
                    .filter(|m| m.phase.is_active() && m.to == req.host)
                    .filter_map(|m| {
                        let l = self.leases.get(&m.container)?;
                        (l.container_id == req.container_id && l.ifname == req.ifname)
                            .then_some((l.ip, m.id.clone()))
                    })
                    .min_by_key(|(ip, _)| *ip);
                if let Some((ip, id)) = arriving {
                    return Ok(Change::Allocated(IpamAllocation {
                        ip,
                        lease: None,
                        migration: Some(id),
                        endpoint: self.endpoints.get(&ip).cloned(),
                        changed: false,
                    }));
                }
                // A repeated request (its answer was lost) gets the same address.
                if let Some(l) = self.leases.values().find(|l| same_owner(l)) {
                    return unchanged(l);
                }
                self.next_free()?
            }
        };
        let lease = IpamLease {
            ip,
            host: req.host,
            container_id: req.container_id,
            ifname: req.ifname,
        };
        self.leases.insert(ip, lease.clone());
        if req.ip.is_none() {
            self.ipam_next = self.offset(ip).wrapping_add(1);
        }
        Ok(Change::Allocated(IpamAllocation {
            ip,
            lease: Some(lease),
            migration: None,
            endpoint: None,
            changed: true,
        }))
    }

    /// `ip`'s offset in the pool.
    fn offset(&self, ip: Ipv4Addr) -> u64 {
        u64::from(u32::from(ip) - u32::from(self.net.ipam.pool.network()))
    }

    /// The first usable, free address at or after the round-robin cursor (wrapping).
    fn next_free(&self) -> Result<Ipv4Addr, RegistryError> {
        let pool = self.net.ipam.pool;
        let size = 1u64 << (32 - pool.prefix_len());
        let base = u32::from(pool.network());
        // Leases and endpoints are looked up per candidate (the next one is usually free):
        // the cost follows the candidates tried, not the registry's size.
        let others: BTreeSet<Ipv4Addr> = self
            .hosts
            .values()
            .map(|h| h.overlay_ip)
            .chain(self.public.values().map(|p| p.container))
            .collect();
        let held = |ip: &Ipv4Addr| {
            self.leases.contains_key(ip) || self.endpoints.contains_key(ip) || others.contains(ip)
        };
        for i in 0..size {
            let off = (self.ipam_next + i) % size;
            let ip = Ipv4Addr::from(base + off as u32);
            if self.unusable(ip).is_none() && !held(&ip) {
                return Ok(ip);
            }
        }
        fail(
            ErrorCode::Conflict,
            format!(
                "the IPAM pool {pool} is exhausted: every usable address is held (release \
                 some, or widen ipam.pool)"
            ),
        )
    }

    pub(crate) fn release(&mut self, req: IpamReleaseRequest) -> Result<Change, RegistryError> {
        self.check_owner(&req.host, &req.container_id, None)?;
        let ip = req.ip;
        let mut out = Released {
            ip,
            lease: None,
            endpoint: None,
            kept_public: Vec::new(),
            ended_migrations: Vec::new(),
        };
        match self.endpoints.get(&ip) {
            Some(e) if e.host != req.host => {
                return fail(
                    ErrorCode::Conflict,
                    format!(
                        "endpoint {ip} lives on host {} now, not on {}: nothing released (a \
                         host never removes a container that runs elsewhere)",
                        e.host, req.host
                    ),
                );
            }
            Some(_) => {
                // Refused while it migrates (remove_endpoint says so): nothing changes.
                let Change::EndpointRemoved {
                    endpoint,
                    kept_public,
                    ended_migrations,
                } = self.remove_endpoint(ip)?
                else {
                    unreachable!("remove_endpoint answers EndpointRemoved")
                };
                out.endpoint = Some(endpoint);
                out.kept_public = kept_public;
                out.ended_migrations = ended_migrations;
                // The endpoint decides (the lease may name the host it was first given on).
                out.lease = self.leases.remove(&ip);
            }
            None => match self.leases.get(&ip) {
                Some(l) if l.host != req.host || l.container_id != req.container_id => {
                    return fail(
                        ErrorCode::Conflict,
                        format!(
                            "ip {ip} is allocated to container {} on host {}, not to {} on {}: \
                             nothing released",
                            l.container_id, l.host, req.container_id, req.host
                        ),
                    );
                }
                Some(_) => out.lease = self.leases.remove(&ip),
                None => {}
            },
        }
        Ok(Change::Released(out))
    }

    /// Checks and installs persisted leases (after the hosts and endpoints).
    pub(crate) fn load_leases(
        &mut self,
        leases: Vec<IpamLease>,
        next: u64,
    ) -> Result<(), RegistryError> {
        for l in leases {
            let at = |m: String| RegistryError {
                code: ErrorCode::Conflict,
                message: format!("lease {}: {m}", l.ip),
            };
            self.check_overlay_ip("ip", l.ip)
                .map_err(|e| at(e.message))?;
            if let Some(h) = self.host_with_overlay_ip(l.ip) {
                return Err(at(format!("is host {}'s overlay address", h.name)));
            }
            if self.leases.contains_key(&l.ip) {
                return Err(at("appears twice".into()));
            }
            self.leases.insert(l.ip, l);
        }
        self.ipam_next = next;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use ferry_api::{ErrorCode, IpamAllocateRequest, IpamReleaseRequest, MigrationStepKind};

    use crate::registry::{Change, NetConfig, Registry, Request, testutil::*};

    use super::IpamPool;

    fn alloc(host: &str, id: &str, ip: Option<&str>) -> Request {
        Request::Allocate(IpamAllocateRequest {
            host: host.into(),
            container_id: id.into(),
            ifname: "eth0".into(),
            ip: ip.map(|s| s.parse().unwrap()),
        })
    }

    fn release(host: &str, id: &str, ip: Ipv4Addr) -> Request {
        Request::Release(IpamReleaseRequest {
            host: host.into(),
            container_id: id.into(),
            ip,
        })
    }

    fn allocated(r: &mut Registry, req: Request) -> Ipv4Addr {
        match r.apply(req).unwrap() {
            Change::Allocated(a) => a.ip,
            c => panic!("{c:?}"),
        }
    }

    /// A /28 pool (14 usable) with a reserved /30, on the populated registry (a1, b1; host
    /// b1's overlay address is outside the pool).
    fn small() -> Registry {
        let mut r = Registry::new(NetConfig {
            ipam: IpamPool {
                pool: "10.244.7.0/28".parse().unwrap(),
                reserved: vec!["10.244.7.4/30".parse().unwrap()],
            },
            ..net()
        });
        r.apply(Request::RegisterHost(host(
            "a1",
            "198.18.1.10",
            "10.244.7.1",
        )))
        .unwrap();
        r.apply(Request::RegisterHost(host(
            "b1",
            "198.18.2.10",
            "10.244.255.3",
        )))
        .unwrap();
        r
    }

    #[test]
    fn addresses_are_unique_round_robin_and_skip_what_is_held_or_reserved() {
        let mut r = small();
        let v = r.version();
        // .0 network, .1 a1's overlay address, .4–.7 reserved, .15 broadcast.
        let got: Vec<String> = (0..6)
            .map(|i| {
                let host = if i % 2 == 0 { "a1" } else { "b1" };
                allocated(&mut r, alloc(host, &format!("c{i}"), None)).to_string()
            })
            .collect();
        assert_eq!(
            got,
            [
                "10.244.7.2",
                "10.244.7.3",
                "10.244.7.8",
                "10.244.7.9",
                "10.244.7.10",
                "10.244.7.11"
            ]
        );
        assert_eq!(r.version(), v + 6, "every new lease is one version");
        assert_eq!(r.ipam_status().free, 14 - 4 - 1 - 6);

        // The same container asking again (a lost answer) gets the same address, no change.
        let again = r.apply(alloc("b1", "c1", None)).unwrap();
        assert!(
            matches!(&again, Change::Allocated(a) if a.ip.to_string() == "10.244.7.3" && !a.changed)
        );
        assert_eq!(r.version(), v + 6);

        // Freed addresses come back only after the cursor went round.
        r.apply(release("a1", "c0", "10.244.7.2".parse().unwrap()))
            .unwrap();
        let next = allocated(&mut r, alloc("a1", "c6", None));
        assert_eq!(next.to_string(), "10.244.7.12");
        // An endpoint added by the operator holds its address too.
        r.apply(Request::AddEndpoints(vec![ep("10.244.7.13", "a1")]))
            .unwrap();
        assert_eq!(
            allocated(&mut r, alloc("a1", "c7", None)).to_string(),
            "10.244.7.14"
        );
        assert_eq!(
            allocated(&mut r, alloc("a1", "c8", None)).to_string(),
            "10.244.7.2"
        );
        crate::registry::testutil::refused(
            &mut r,
            alloc("a1", "c9", None),
            ErrorCode::Conflict,
            "the IPAM pool 10.244.7.0/28 is exhausted",
        );
    }

    #[test]
    fn a_requested_address_is_honoured_if_free_else_refused_by_name() {
        let mut r = small();
        assert_eq!(
            allocated(&mut r, alloc("a1", "c1", Some("10.244.7.9"))).to_string(),
            "10.244.7.9"
        );
        // A public mapping kept after its endpoint left holds the address too.
        r.apply(Request::AddEndpoints(vec![ep("10.244.7.12", "a1")]))
            .unwrap();
        r.apply(Request::AddPublic(whole("203.0.113.130", "10.244.7.12")))
            .unwrap();
        r.apply(Request::RemoveEndpoint("10.244.7.12".parse().unwrap()))
            .unwrap();
        let cases = [
            (
                alloc("b1", "c2", Some("10.244.7.9")),
                ErrorCode::Conflict,
                "ip 10.244.7.9 is allocated to container c1 (eth0) on host a1",
            ),
            (
                alloc("b1", "c2", Some("10.244.7.1")),
                ErrorCode::Conflict,
                "ip 10.244.7.1 is host a1's overlay address",
            ),
            (
                alloc("b1", "c2", Some("10.244.7.12")),
                ErrorCode::Conflict,
                "is the container address of public mapping 203.0.113.130",
            ),
            (
                alloc("b1", "c2", Some("10.244.7.5")),
                ErrorCode::InvalidAddress,
                "ip 10.244.7.5 is reserved (ipam.reserved 10.244.7.4/30)",
            ),
            (
                alloc("b1", "c2", Some("10.244.7.15")),
                ErrorCode::InvalidAddress,
                "is the broadcast address of the IPAM pool",
            ),
            (
                alloc("b1", "c2", Some("10.244.8.1")),
                ErrorCode::InvalidAddress,
                "ip 10.244.8.1 is outside the IPAM pool 10.244.7.0/28",
            ),
            (
                alloc("zz", "c2", None),
                ErrorCode::UnknownHost,
                "host \"zz\" is not registered",
            ),
            (
                alloc("a1", "-c", None),
                ErrorCode::BadRequest,
                "container_id: container id \"-c\"",
            ),
            (
                Request::Allocate(IpamAllocateRequest {
                    host: "a1".into(),
                    container_id: "c".into(),
                    ifname: "a/b".into(),
                    ip: None,
                }),
                ErrorCode::BadRequest,
                "ifname: interface name \"a/b\" contains '/'",
            ),
        ];
        for (req, code, want) in cases {
            refused(&mut r, req, code, want);
        }
        // An endpoint on a leased address is refused unless it is on the lease's host.
        refused(
            &mut r,
            Request::AddEndpoints(vec![ep("10.244.7.9", "b1")]),
            ErrorCode::Conflict,
            "ip 10.244.7.9 is allocated to container c1 (eth0) on host a1",
        );
        r.apply(Request::AddEndpoints(vec![ep("10.244.7.9", "a1")]))
            .unwrap();
        // The same owner asking for its address again is answered unchanged.
        let again = r.apply(alloc("a1", "c1", Some("10.244.7.9"))).unwrap();
        assert!(matches!(again, Change::Allocated(a) if !a.changed && a.lease.is_some()));
    }

    #[test]
    fn release_frees_the_lease_and_the_hosts_endpoint_but_never_another_hosts() {
        let mut r = small();
        let ip = allocated(&mut r, alloc("a1", "c1", None));
        r.apply(Request::AddEndpoints(vec![ep(&ip.to_string(), "a1")]))
            .unwrap();
        // Another container, another host: refused, nothing changes.
        let v = r.version();
        refused(
            &mut r,
            release("b1", "c1", ip),
            ErrorCode::Conflict,
            "endpoint 10.244.7.2 lives on host a1 now, not on b1",
        );
        assert_eq!(r.version(), v);
        let c = r.apply(release("a1", "c1", ip)).unwrap();
        let Change::Released(rel) = c else {
            panic!("{c:?}")
        };
        assert_eq!(rel.endpoint.unwrap().host, "a1");
        assert_eq!(rel.lease.unwrap().container_id, "c1");
        assert_eq!((r.endpoint_count(), r.lease_count()), (0, 0));
        assert_eq!(r.version(), v + 1, "lease and endpoint go in one change");
        // Twice: nothing to do, no change (a CNI DEL is idempotent).
        assert!(matches!(r.apply(release("a1", "c1", ip)).unwrap(),
            Change::Released(rel) if rel.lease.is_none() && rel.endpoint.is_none()));
        assert_eq!(r.version(), v + 1);

        // A pending lease (no endpoint yet) is freed by its own container only.
        let ip = allocated(&mut r, alloc("a1", "c2", None));
        refused(
            &mut r,
            release("a1", "c3", ip),
            ErrorCode::Conflict,
            "is allocated to container c2 on host a1, not to c3 on a1",
        );
        r.apply(release("a1", "c2", ip)).unwrap();
        assert_eq!(r.lease_count(), 0);
    }

    #[test]
    fn a_migrating_containers_address_goes_to_its_destination_only() {
        let mut r = small();
        let ip = allocated(&mut r, alloc("a1", "src", None));
        r.apply(Request::AddEndpoints(vec![ep(&ip.to_string(), "a1")]))
            .unwrap();
        let s = ip.to_string();
        // Without a migration, the address is the endpoint's: refused.
        refused(
            &mut r,
            alloc("b1", "dst", Some(&s)),
            ErrorCode::Conflict,
            "is allocated to container src",
        );
        r.apply(prepare(&s, "b1", 1)).unwrap();
        let v = r.version();
        // The destination's runtime asks for it (a restore): honoured, nothing allocated.
        let c = r.apply(alloc("b1", "dst", Some(&s))).unwrap();
        let Change::Allocated(a) = c else {
            panic!("{c:?}")
        };
        assert_eq!(
            (a.migration.as_deref(), a.changed, a.lease),
            (Some("m1"), false, None)
        );
        assert_eq!(a.endpoint.unwrap().host, "a1");
        assert_eq!(r.version(), v);
        // The same container id without an address (a restore that does not ask for it):
        // the same answer.
        let c = r
            .apply(Request::Allocate(IpamAllocateRequest {
                host: "b1".into(),
                container_id: "src".into(),
                ifname: "eth0".into(),
                ip: None,
            }))
            .unwrap();
        assert!(
            matches!(&c, Change::Allocated(a) if a.ip == ip && a.migration.as_deref() == Some("m1")),
            "{c:?}"
        );
        assert_eq!(r.version(), v);
        // Another container id without an address: a new one.
        let other = allocated(&mut r, alloc("b1", "dst2", None));
        assert_ne!(other, ip);
        r.apply(release("b1", "dst2", other)).unwrap();
        // Anyone else: refused, naming the migration.
        refused(
            &mut r,
            alloc("a1", "other", Some(&s)),
            ErrorCode::Conflict,
            "is migrating from a1 to b1 (migration m1, prepared), not to a1",
        );
        // The source's runtime deletes its copy (after a checkpoint): the entry stays.
        refused(
            &mut r,
            release("a1", "src", ip),
            ErrorCode::Conflict,
            "is being migrated",
        );
        r.apply(step("m1", MigrationStepKind::Freeze, 2)).unwrap();
        assert!(matches!(r.apply(alloc("b1", "dst", Some(&s))).unwrap(),
            Change::Allocated(a) if a.migration.is_some()));
        r.apply(step("m1", MigrationStepKind::Release, 3)).unwrap();
        // Released: the endpoint lives on b1. The source may not remove it...
        refused(
            &mut r,
            release("a1", "src", ip),
            ErrorCode::Conflict,
            "lives on host b1 now",
        );
        // ...the destination may, whatever container id its runtime gave it.
        let c = r.apply(release("b1", "dst", ip)).unwrap();
        assert!(
            matches!(c, Change::Released(rel) if rel.endpoint.is_some() && rel.lease.is_some())
        );
        assert_eq!((r.endpoint_count(), r.lease_count()), (0, 0));
    }

    #[test]
    fn leases_are_persisted_and_checked_on_load() {
        let mut r = small();
        allocated(&mut r, alloc("a1", "c1", None));
        allocated(&mut r, alloc("b1", "c2", Some("10.244.7.10")));
        let p = r.to_persisted();
        assert_eq!(p.ipam.len(), 2);
        let back = Registry::from_persisted(r.net().clone(), p.clone()).unwrap();
        assert_eq!(back, r);
        // The cursor survives: the next address is the same on both.
        let mut back = back;
        assert_eq!(
            allocated(&mut back, alloc("a1", "c3", None)),
            allocated(&mut r, alloc("a1", "c3", None))
        );
        let mut bad = p;
        bad.ipam[0].ip = "10.244.7.1".parse().unwrap();
        let e = Registry::from_persisted(r.net().clone(), bad)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("lease 10.244.7.1: is host a1's overlay address"),
            "{e}"
        );
        // A host may not take a leased address, nor leave with leases pending.
        refused(
            &mut r,
            Request::RegisterHost(host("c1", "198.18.3.1", "10.244.7.10")),
            ErrorCode::Conflict,
            "overlay_ip 10.244.7.10 is allocated to container c2",
        );
        refused(
            &mut r,
            Request::RemoveHost("b1".into()),
            ErrorCode::Conflict,
            "host b1 still holds 1 IPAM lease(s) (10.244.7.10)",
        );
    }
}
