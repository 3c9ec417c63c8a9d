//! The registry: hosts, container endpoints, public mappings and migrations, and a version that
//! increases by one with every change. A pure state machine: [`Registry::apply`] validates a
//! whole request against the configuration and the current state and either changes the state
//! and says what changed, or changes nothing and says why (with the API error code). No I/O and
//! no clock here (requests that need the time carry it); the server persists the new state
//! before it answers.
//!
//! One module per concern, each an `impl Registry` block with its unit tests: `hosts`,
//! `endpoints`, `public` (mappings), `persist` (the stored state, checked on load); the
//! migrations' transitions are in [`crate::migration::transitions`], with the rest of the
//! gateway's side of a migration. Here: the types, the queries, the snapshot and the version.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    net::Ipv4Addr,
};

use ferry_api::{
    Endpoint, EndpointSpec, ErrorCode, HostInfo, IpamAllocateRequest, IpamAllocation, IpamLease,
    IpamReleaseRequest, MacAddr, Migration, MigrationPhase, MigrationStepKind, PublicKey,
    PublicMapping, PublicSpec, Snapshot,
};
use ipnet::Ipv4Net;

pub use crate::migration::transitions::{LiveMigration, MIGRATION_HISTORY};
use crate::{migration::transitions::in_snapshot, shared_map::SharedMap};

mod endpoints;
mod hosts;
mod ipam;
mod persist;
mod public;
#[cfg(test)]
pub(crate) mod testutil;

pub use ipam::{IpamPool, Released};
pub use persist::LoadError;

/// What the registry is checked against (from the config).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    pub overlay_cidr: Ipv4Net,
    /// Dual-stack: the overlay's IPv6 /96 (handed to the agents in every snapshot).
    pub overlay6_cidr: Option<ipnet::Ipv6Net>,
    pub vni: u32,
    pub public_cidrs: Vec<Ipv4Net>,
    /// How long a released migration's source keeps forwarding (ms).
    pub forward_grace_ms: u64,
    /// The CNI plugin's addresses.
    pub ipam: IpamPool,
}

/// Why a request was refused. Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} ({code})")]
pub struct RegistryError {
    pub code: ErrorCode,
    pub message: String,
}

pub(crate) fn fail<T>(code: ErrorCode, message: impl Into<String>) -> Result<T, RegistryError> {
    Err(RegistryError {
        code,
        message: message.into(),
    })
}

/// A request that may change the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    RegisterHost(HostInfo),
    RemoveHost(String),
    AddEndpoints(Vec<EndpointSpec>),
    RemoveEndpoint(Ipv4Addr),
    AddPublic(PublicSpec),
    RemovePublic(PublicKey),
    /// The prepare step (`POST /v1/migrations`).
    PrepareMigration {
        container: Ipv4Addr,
        to: String,
        now_ms: u64,
        /// Run by the gateway (see `Migration::run`).
        run: bool,
    },
    /// `freeze`, `release` or `abort` of a migration. `expect`: refuse (`bad_phase`) unless the
    /// migration is in this phase (the coordinator's automatic abort uses it, so it never
    /// undoes a step someone else made meanwhile).
    StepMigration {
        id: String,
        step: MigrationStepKind,
        now_ms: u64,
        expect: Option<MigrationPhase>,
    },
    /// Moves released migrations whose grace ended by `now_ms` to the history.
    ExpireMigrations {
        now_ms: u64,
    },
    /// The second half of a freeze (see `transitions::switch_migration`).
    SwitchMigration {
        id: String,
        now_ms: u64,
    },
    /// `POST /v1/ipam/allocate` (see `ipam`).
    Allocate(IpamAllocateRequest),
    /// `POST /v1/ipam/release`.
    Release(IpamReleaseRequest),
    /// `POST /v1/public/takeover`.
    TakeOverPublic {
        host: String,
        from: String,
    },
}

/// What a successful request did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    HostAdded(HostInfo),
    HostUpdated {
        old: HostInfo,
        new: HostInfo,
    },
    /// Re-registration with identical information: nothing changed, the version stays.
    HostUnchanged(HostInfo),
    /// `ended_migrations`: released migrations that forwarded from this host, ended early.
    HostRemoved {
        host: HostInfo,
        ended_migrations: Vec<Migration>,
    },
    EndpointsAdded(Vec<Endpoint>),
    /// The endpoint's public mappings (`kept_public`) stay, so the endpoint can be re-added
    /// elsewhere without losing them. `ended_migrations`: a released migration of it whose
    /// grace was still running, ended early.
    EndpointRemoved {
        endpoint: Endpoint,
        kept_public: Vec<PublicMapping>,
        ended_migrations: Vec<Migration>,
    },
    PublicAdded(PublicMapping),
    PublicRemoved(PublicMapping),
    /// A new migration; `ended`: the container's previous (released) migration, whose grace
    /// this ended early.
    MigrationPrepared {
        migration: Migration,
        ended: Option<Migration>,
    },
    /// freeze, release or abort moved the migration from phase `old`.
    MigrationStepped {
        old: MigrationPhase,
        migration: Migration,
    },
    /// The step repeated the current one: nothing changed, the version stays.
    MigrationUnchanged(Migration),
    /// Released migrations whose grace ended (may be empty: then nothing changed).
    MigrationsExpired(Vec<Migration>),
    /// An address given (`changed`: a new lease), repeated, or a migrating container's.
    Allocated(IpamAllocation),
    /// A lease freed and the host's endpoint removed (both `None`: nothing to do).
    Released(Released),
}

impl Change {
    /// Whether the state (and so the version) changed.
    pub fn changes_state(&self) -> bool {
        match self {
            Change::HostUnchanged(_) | Change::MigrationUnchanged(_) => false,
            Change::MigrationsExpired(v) => !v.is_empty(),
            Change::Allocated(a) => a.changed,
            Change::Released(r) => r.lease.is_some() || r.endpoint.is_some(),
            _ => true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registry {
    pub(crate) net: NetConfig,
    pub(crate) version: u64,
    pub(crate) hosts: SharedMap<String, HostInfo>,
    pub(crate) endpoints: SharedMap<Ipv4Addr, Endpoint>,
    /// Index: MAC → endpoint IP.
    pub(crate) macs: SharedMap<MacAddr, Ipv4Addr>,
    pub(crate) public: SharedMap<PublicKey, PublicMapping>,
    /// Live migrations (in the snapshot), by the number of their id.
    pub(crate) migrations: BTreeMap<u64, LiveMigration>,
    /// Finished migrations, oldest first (at most [`MIGRATION_HISTORY`]).
    pub(crate) history: VecDeque<Migration>,
    /// The number of the next migration id (ids are never reused).
    pub(crate) next_migration: u64,
    /// IPAM leases, by address.
    pub(crate) leases: SharedMap<Ipv4Addr, IpamLease>,
    /// Where the next address search starts (an offset in the pool: round robin).
    pub(crate) ipam_next: u64,
}

impl Registry {
    /// An empty registry at version 0.
    pub fn new(net: NetConfig) -> Self {
        Self {
            net,
            version: 0,
            hosts: SharedMap::new(),
            endpoints: SharedMap::new(),
            macs: SharedMap::new(),
            public: SharedMap::new(),
            migrations: BTreeMap::new(),
            history: VecDeque::new(),
            next_migration: 1,
            leases: SharedMap::new(),
            ipam_next: 0,
        }
    }

    pub fn net(&self) -> &NetConfig {
        &self.net
    }
    pub fn version(&self) -> u64 {
        self.version
    }
    pub fn host(&self, name: &str) -> Option<&HostInfo> {
        self.hosts.get(name)
    }
    /// Hosts by name.
    pub fn hosts(&self) -> impl Iterator<Item = &HostInfo> {
        self.hosts.values()
    }
    /// Endpoints by IP.
    pub fn endpoints(&self) -> impl Iterator<Item = &Endpoint> {
        self.endpoints.values()
    }
    /// Public mappings by key (address, then whole IP before ports).
    pub fn public(&self) -> impl Iterator<Item = &PublicMapping> {
        self.public.values()
    }
    pub fn host_count(&self) -> usize {
        self.hosts.len()
    }
    pub fn endpoint_count(&self) -> usize {
        self.endpoints.len()
    }
    pub fn public_count(&self) -> usize {
        self.public.len()
    }

    /// Everything an agent needs at time `now_ms`, sorted deterministically: the same state
    /// and time give the same snapshot. A released migration is in it while
    /// `now_ms < forward_until_unix_ms` (the gateway's timer then moves it to the history with
    /// a new version; until that happens, the time alone drops it).
    pub fn snapshot(&self, now_ms: u64) -> Snapshot {
        Snapshot {
            version: self.version,
            overlay_cidr: self.net.overlay_cidr,
            overlay6_cidr: self.net.overlay6_cidr,
            vni: self.net.vni,
            hosts: self.hosts.values().cloned().collect(),
            endpoints: self.endpoints.values().cloned().collect(),
            public: self.public.values().cloned().collect(),
            migrations: self
                .migrations
                .values()
                .filter(|l| in_snapshot(&l.migration, now_ms))
                .map(|l| l.migration.clone())
                .collect(),
        }
    }

    /// Validates `req` as a whole; if it is acceptable, applies it (bumping the version when
    /// something changed). On error nothing has changed.
    pub fn apply(&mut self, req: Request) -> Result<Change, RegistryError> {
        let change = match req {
            Request::RegisterHost(h) => self.register_host(h)?,
            Request::RemoveHost(name) => self.remove_host(&name)?,
            Request::AddEndpoints(specs) => self.add_endpoints(specs)?,
            Request::RemoveEndpoint(ip) => self.remove_endpoint(ip)?,
            Request::AddPublic(spec) => self.add_public(spec, true)?,
            Request::RemovePublic(key) => self.remove_public(key)?,
            Request::PrepareMigration {
                container,
                to,
                now_ms,
                run,
            } => self.prepare_migration(container, to, now_ms, run)?,
            Request::StepMigration {
                id,
                step,
                now_ms,
                expect,
            } => self.step_migration(&id, step, now_ms, expect)?,
            Request::ExpireMigrations { now_ms } => self.expire_migrations(now_ms),
            Request::SwitchMigration { id, now_ms } => self.switch_migration(&id, now_ms)?,
            Request::Allocate(req) => self.allocate(req)?,
            Request::Release(req) => self.release(req)?,
            Request::TakeOverPublic { host, from } => self.take_over_public(&host, &from)?,
        };
        if change.changes_state() {
            self.version += 1;
        }
        Ok(change)
    }

    // ---- checks shared by several requests

    /// `ip` is a usable address inside the overlay (not its network or broadcast address).
    pub(crate) fn check_overlay_ip(&self, field: &str, ip: Ipv4Addr) -> Result<(), RegistryError> {
        let c = self.net.overlay_cidr;
        if !c.contains(&ip) {
            return fail(
                ErrorCode::InvalidAddress,
                format!("{field} {ip} is outside overlay_cidr {c}"),
            );
        }
        if ip == c.network() || ip == c.broadcast() {
            let which = if ip == c.network() {
                "network"
            } else {
                "broadcast"
            };
            return fail(
                ErrorCode::InvalidAddress,
                format!("{field} {ip} is the {which} address of overlay_cidr {c}"),
            );
        }
        Ok(())
    }

    /// Refuses a change that would make `count + adding` entries of what an agent's (or the
    /// gateway's) map holds at most `max` of: beyond that the agents could not apply the
    /// snapshot at all.
    pub(crate) fn check_capacity(
        what: &str,
        count: usize,
        adding: usize,
        max: u32,
    ) -> Result<(), RegistryError> {
        if count.saturating_add(adding) > max as usize {
            return fail(
                ErrorCode::Conflict,
                format!(
                    "the registry holds {count} {what}: {adding} more would exceed {max}, the \
                     size of the agents' map"
                ),
            );
        }
        Ok(())
    }

    pub(crate) fn host_with_overlay_ip(&self, ip: Ipv4Addr) -> Option<&HostInfo> {
        self.hosts.values().find(|h| h.overlay_ip == ip)
    }

    /// Finished migrations kept in the history.
    pub fn history_len(&self) -> usize {
        self.history.len()
    }

    /// IPs of the public mappings' containers that are not endpoints (kept after a removal).
    pub fn dangling_public(&self) -> BTreeSet<Ipv4Addr> {
        self.public
            .values()
            .map(|p| p.container)
            .filter(|ip| !self.endpoints.contains_key(ip))
            .collect()
    }
}

#[cfg(test)]
mod tests {

    use ferry_api::Proto;

    use crate::registry::{Registry, Request};

    use super::testutil::*;

    #[test]
    fn every_change_bumps_the_version_by_one() {
        let mut r = Registry::new(net());
        assert_eq!(r.version(), 0);
        let steps = [
            Request::RegisterHost(host("a1", "198.18.1.10", "10.244.255.1")),
            Request::AddEndpoints(vec![ep("10.244.1.5", "a1"), ep("10.244.1.6", "a1")]),
            Request::AddPublic(whole("203.0.113.130", "10.244.1.5")),
            Request::RemovePublic("203.0.113.130".parse().unwrap()),
            Request::RemoveEndpoint("10.244.1.5".parse().unwrap()),
            Request::RemoveEndpoint("10.244.1.6".parse().unwrap()),
            Request::RemoveHost("a1".into()),
        ];
        for (i, req) in steps.into_iter().enumerate() {
            r.apply(req).unwrap();
            assert_eq!(r.version(), i as u64 + 1);
        }
        assert_eq!(r.host_count() + r.endpoint_count() + r.public_count(), 0);
    }

    #[test]
    fn snapshot_is_sorted_and_complete() {
        let mut r = Registry::new(net());
        for h in [
            host("zz", "198.18.3.1", "10.244.255.9"),
            host("a1", "198.18.1.10", "10.244.255.1"),
        ] {
            r.apply(Request::RegisterHost(h)).unwrap();
        }
        r.apply(Request::AddEndpoints(vec![
            ep("10.244.10.1", "zz"),
            ep("10.244.9.1", "a1"),
            ep("10.244.1.200", "a1"),
        ]))
        .unwrap();
        for p in [
            port("203.0.113.200", 80, "10.244.9.1", 80, Proto::Tcp),
            whole("203.0.113.150", "10.244.10.1"),
            port("203.0.113.150", 0, "10.244.9.1", 80, Proto::Tcp),
            port("203.0.113.200", 53, "10.244.9.1", 53, Proto::Udp),
        ] {
            let _ = r.apply(Request::AddPublic(p));
        }
        let s = r.snapshot(0);
        assert_eq!(s.version, r.version());
        assert_eq!((s.vni, s.overlay_cidr), (4242, net().overlay_cidr));
        assert!(s.migrations.is_empty());
        let names: Vec<&str> = s.hosts.iter().map(|h| h.name.as_str()).collect();
        assert_eq!(names, ["a1", "zz"]);
        let ips: Vec<String> = s.endpoints.iter().map(|e| e.ip.to_string()).collect();
        assert_eq!(ips, ["10.244.1.200", "10.244.9.1", "10.244.10.1"]);
        let keys: Vec<String> = s.public.iter().map(|p| p.key()).collect();
        assert_eq!(
            keys,
            [
                "203.0.113.150",
                "203.0.113.200:53/udp",
                "203.0.113.200:80/tcp"
            ]
        );
    }
}
