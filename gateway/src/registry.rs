//! The registry: hosts, container endpoints, public mappings and migrations, and a version that
//! increases by one with every change. A pure state machine: [`Registry::apply`] validates a
//! whole request against the configuration and the current state and either changes the state
//! and says what changed, or changes nothing and says why (with the API error code). No I/O and
//! no clock here (requests that need the time carry it); the server persists the new state
//! before it answers.
//!
//! Migrations (the coordinator's state): a migration is *live* while agents must act on it —
//! `prepared`, `frozen`, and `released` until its forwarding grace ends — and then joins the
//! history (the last [`MIGRATION_HISTORY`] finished ones); an abort sends it there at once.
//! Rules:
//! - prepare: the container is an endpoint, `to` a registered host other than the endpoint's
//!   host (any role: a migration may go wherever an endpoint may be added, the gateway host
//!   included); at most one active (`prepared`/`frozen`) migration per container. Preparing a
//!   new migration of a container whose previous one is `released` and still forwarding ends
//!   that grace early (it leaves the snapshot in the same change), so the snapshot holds at
//!   most one migration per container.
//! - steps go prepare → freeze → release; abort from `prepared` or `frozen`. Repeating the
//!   current step answers the migration unchanged (no new version); any other step out of
//!   order is refused with `bad_phase`.
//! - release moves the endpoint (`host` becomes `to`, same IP and MAC) in the same change.
//! - an endpoint or host with an active migration cannot be removed (`conflict`); removing one
//!   that a released migration still forwards for ends that migration's grace.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    net::Ipv4Addr,
};

use ferry_api::{
    Endpoint, EndpointSpec, ErrorCode, HostInfo, HostRole, MacAddr, Migration, MigrationPhase,
    MigrationStepKind, PublicKey, PublicMapping, PublicSpec, Snapshot, migration_seq,
    validate::{non_unicast_reason, validate_host_name},
};
use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::store::PersistedState;

/// What the registry is checked against (from the config).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    pub overlay_cidr: Ipv4Net,
    pub vni: u32,
    pub public_cidrs: Vec<Ipv4Net>,
    /// How long a released migration's source keeps forwarding (ms).
    pub forward_grace_ms: u64,
}

/// How many finished migrations (aborted, or released and past their grace) are kept.
pub const MIGRATION_HISTORY: usize = 1000;

/// A migration the agents must act on, with the registry versions the coordinator needs to
/// know who has applied what.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LiveMigration {
    pub migration: Migration,
    /// The version the prepare step produced: a host that reported it (or a later one) may
    /// have acted on the migration, so a rollback waits for it.
    pub prepared_version: u64,
    /// The version that put the migration in its current phase.
    pub phase_version: u64,
}

/// Why a request was refused. Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} ({code})")]
pub struct RegistryError {
    pub code: ErrorCode,
    pub message: String,
}

fn fail<T>(code: ErrorCode, message: impl Into<String>) -> Result<T, RegistryError> {
    Err(RegistryError {
        code,
        message: message.into(),
    })
}

/// Whether a live migration belongs in the snapshot at `now_ms`.
fn in_snapshot(m: &Migration, now_ms: u64) -> bool {
    m.phase != MigrationPhase::Released || now_ms < m.forward_until_unix_ms
}

/// Why `step` does not apply to `m` in its phase.
fn bad_phase(m: &Migration, step: MigrationStepKind) -> String {
    use MigrationPhase as P;
    use MigrationStepKind as S;
    let id = &m.id;
    match (m.phase, step) {
        (P::Prepared, S::Release) => {
            format!("migration {id} is prepared: freeze it before release")
        }
        (P::Frozen, S::Prepare) => {
            format!("migration {id} is frozen: it is already prepared (release or abort it)")
        }
        (P::Released, S::Abort) => {
            format!("migration {id} is released: too late to abort; migrate back instead")
        }
        (P::Released, _) => format!(
            "migration {id} is released: it is over (to move {} again, prepare a new migration)",
            m.container
        ),
        (P::Aborted, _) => format!(
            "migration {id} is aborted: it is over (to retry, prepare a new migration of {})",
            m.container
        ),
        (phase, step) => format!("migration {id} is {phase}: {step} does not apply"),
    }
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
}

impl Change {
    /// Whether the state (and so the version) changed.
    pub fn changes_state(&self) -> bool {
        match self {
            Change::HostUnchanged(_) | Change::MigrationUnchanged(_) => false,
            Change::MigrationsExpired(v) => !v.is_empty(),
            _ => true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registry {
    net: NetConfig,
    version: u64,
    hosts: BTreeMap<String, HostInfo>,
    endpoints: BTreeMap<Ipv4Addr, Endpoint>,
    /// Index: MAC → endpoint IP.
    macs: BTreeMap<MacAddr, Ipv4Addr>,
    public: BTreeMap<PublicKey, PublicMapping>,
    /// Live migrations (in the snapshot), by the number of their id.
    migrations: BTreeMap<u64, LiveMigration>,
    /// Finished migrations, oldest first (at most [`MIGRATION_HISTORY`]).
    history: VecDeque<Migration>,
    /// The number of the next migration id (ids are never reused).
    next_migration: u64,
}

impl Registry {
    /// An empty registry at version 0.
    pub fn new(net: NetConfig) -> Self {
        Self {
            net,
            version: 0,
            hosts: BTreeMap::new(),
            endpoints: BTreeMap::new(),
            macs: BTreeMap::new(),
            public: BTreeMap::new(),
            migrations: BTreeMap::new(),
            history: VecDeque::new(),
            next_migration: 1,
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

    /// Live migrations (active, or released and maybe still forwarding), oldest first.
    pub fn live_migrations(&self) -> impl Iterator<Item = &LiveMigration> {
        self.migrations.values()
    }

    /// A live migration by id.
    pub fn live_migration(&self, id: &str) -> Option<&LiveMigration> {
        self.migrations.get(&migration_seq(id)?)
    }

    /// A migration by id, live or in the history.
    pub fn migration(&self, id: &str) -> Option<&Migration> {
        match self.live_migration(id) {
            Some(l) => Some(&l.migration),
            None => self.history.iter().find(|m| m.id == id),
        }
    }

    /// Every migration the registry knows (live and history), oldest (smallest id) first.
    pub fn all_migrations(&self) -> Vec<&Migration> {
        let mut all: Vec<&Migration> = self
            .history
            .iter()
            .chain(self.migrations.values().map(|l| &l.migration))
            .collect();
        all.sort_by_key(|m| m.seq().unwrap_or(0));
        all
    }

    /// The container's active (`prepared` or `frozen`) migration.
    pub fn active_migration(&self, container: Ipv4Addr) -> Option<&LiveMigration> {
        self.migrations
            .values()
            .find(|l| l.migration.container == container && l.migration.phase.is_active())
    }

    /// When the next released migration's grace ends (the timer's next deadline).
    pub fn next_expiry(&self) -> Option<u64> {
        self.migrations
            .values()
            .filter(|l| l.migration.phase == MigrationPhase::Released)
            .map(|l| l.migration.forward_until_unix_ms)
            .min()
    }

    /// The first end of a forwarding grace after `now_ms`: until then, the snapshot at any
    /// time is the same as at `now_ms` (for a given version).
    pub fn next_expiry_after(&self, now_ms: u64) -> Option<u64> {
        self.migrations
            .values()
            .filter(|l| l.migration.phase == MigrationPhase::Released)
            .map(|l| l.migration.forward_until_unix_ms)
            .filter(|t| *t > now_ms)
            .min()
    }

    /// Live migrations in the snapshot at `now_ms`, counted by phase (prepared, frozen,
    /// released).
    pub fn migration_counts(&self, now_ms: u64) -> [(MigrationPhase, usize); 3] {
        let mut counts = [
            (MigrationPhase::Prepared, 0),
            (MigrationPhase::Frozen, 0),
            (MigrationPhase::Released, 0),
        ];
        for l in self.migrations.values() {
            if in_snapshot(&l.migration, now_ms)
                && let Some(c) = counts.iter_mut().find(|(p, _)| *p == l.migration.phase)
            {
                c.1 += 1;
            }
        }
        counts
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
            } => self.prepare_migration(container, to, now_ms)?,
            Request::StepMigration {
                id,
                step,
                now_ms,
                expect,
            } => self.step_migration(&id, step, now_ms, expect)?,
            Request::ExpireMigrations { now_ms } => self.expire_migrations(now_ms),
        };
        if change.changes_state() {
            self.version += 1;
        }
        Ok(change)
    }

    // ---- checks shared by several requests

    /// `ip` is a usable address inside the overlay (not its network or broadcast address).
    fn check_overlay_ip(&self, field: &str, ip: Ipv4Addr) -> Result<(), RegistryError> {
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

    fn host_with_overlay_ip(&self, ip: Ipv4Addr) -> Option<&HostInfo> {
        self.hosts.values().find(|h| h.overlay_ip == ip)
    }

    // ---- hosts

    fn register_host(&mut self, h: HostInfo) -> Result<Change, RegistryError> {
        validate_host_name(&h.name).map_err(|m| RegistryError {
            code: ErrorCode::BadRequest,
            message: format!("name: {m}"),
        })?;
        if let Some(why) = non_unicast_reason(h.vtep) {
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
        self.check_overlay_ip("overlay_ip", h.overlay_ip)?;

        let old = self.hosts.get(&h.name).cloned();
        if old.as_ref() == Some(&h) {
            return Ok(Change::HostUnchanged(h));
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
            if h.role == HostRole::Gateway && other.role == HostRole::Gateway {
                return fail(
                    ErrorCode::Conflict,
                    format!(
                        "host {} already has role gateway: there can be only one gateway",
                        other.name
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

    fn remove_host(&mut self, name: &str) -> Result<Change, RegistryError> {
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
        let host = self.hosts.remove(name).expect("checked above");
        let ended_migrations = self.end_live(|m| m.from == name || m.to == name);
        Ok(Change::HostRemoved {
            host,
            ended_migrations,
        })
    }

    // ---- endpoints

    fn add_endpoints(&mut self, specs: Vec<EndpointSpec>) -> Result<Change, RegistryError> {
        if specs.is_empty() {
            return fail(
                ErrorCode::BadRequest,
                "endpoints: the list is empty: give at least one endpoint",
            );
        }
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
            if mac.is_zero() {
                return fail(
                    ErrorCode::InvalidAddress,
                    at(format!("mac {mac} of endpoint {} is all zeros", s.ip)),
                );
            }
            if !mac.is_unicast() {
                return fail(
                    ErrorCode::InvalidAddress,
                    at(format!(
                        "mac {mac} of endpoint {} is a multicast address: want a unicast MAC",
                        s.ip
                    )),
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

    fn remove_endpoint(&mut self, ip: Ipv4Addr) -> Result<Change, RegistryError> {
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

    // ---- migrations

    /// Moves the live (released: the callers refuse while one is active) migrations matching
    /// `which` to the history.
    fn end_live(&mut self, which: impl Fn(&Migration) -> bool) -> Vec<Migration> {
        let seqs: Vec<u64> = self
            .migrations
            .iter()
            .filter(|(_, l)| which(&l.migration))
            .map(|(s, _)| *s)
            .collect();
        let mut ended = Vec::with_capacity(seqs.len());
        for s in seqs {
            let l = self.migrations.remove(&s).expect("listed above");
            debug_assert_eq!(l.migration.phase, MigrationPhase::Released);
            ended.push(l.migration.clone());
            self.push_history(l.migration);
        }
        ended
    }

    fn push_history(&mut self, m: Migration) {
        self.history.push_back(m);
        while self.history.len() > MIGRATION_HISTORY {
            self.history.pop_front();
        }
    }

    fn prepare_migration(
        &mut self,
        container: Ipv4Addr,
        to: String,
        now_ms: u64,
    ) -> Result<Change, RegistryError> {
        let Some(endpoint) = self.endpoints.get(&container) else {
            return fail(
                ErrorCode::UnknownEndpoint,
                format!("container {container} is not a registered endpoint"),
            );
        };
        if !self.hosts.contains_key(&to) {
            return fail(
                ErrorCode::UnknownHost,
                format!("host {to:?} (destination of {container}) is not registered"),
            );
        }
        if let Some(l) = self.active_migration(container) {
            let m = &l.migration;
            if m.to != to {
                return fail(
                    ErrorCode::Conflict,
                    format!(
                        "container {container} is already being migrated: migration {} ({}, \
                         {} → {}); abort or finish it first",
                        m.id, m.phase, m.from, m.to
                    ),
                );
            }
            return match m.phase {
                MigrationPhase::Prepared => Ok(Change::MigrationUnchanged(m.clone())),
                _ => fail(
                    ErrorCode::BadPhase,
                    bad_phase(m, MigrationStepKind::Prepare),
                ),
            };
        }
        if endpoint.host == to {
            return fail(
                ErrorCode::BadRequest,
                format!("container {container} is already on host {to}: nothing to migrate"),
            );
        }
        let seq = self.next_migration;
        let migration = Migration {
            id: format!("m{seq}"),
            container,
            from: endpoint.host.clone(),
            to,
            phase: MigrationPhase::Prepared,
            created_unix_ms: now_ms,
            updated_unix_ms: now_ms,
            frozen_unix_ms: 0,
            released_unix_ms: 0,
            forward_until_unix_ms: 0,
        };
        let ended = self.end_live(|m| m.container == container).pop();
        self.next_migration += 1;
        let version = self.version + 1;
        self.migrations.insert(
            seq,
            LiveMigration {
                migration: migration.clone(),
                prepared_version: version,
                phase_version: version,
            },
        );
        Ok(Change::MigrationPrepared { migration, ended })
    }

    fn step_migration(
        &mut self,
        id: &str,
        step: MigrationStepKind,
        now_ms: u64,
        expect: Option<MigrationPhase>,
    ) -> Result<Change, RegistryError> {
        let unknown = || {
            fail(
                ErrorCode::UnknownMigration,
                format!("no migration has id {id:?}"),
            )
        };
        let Some(seq) = migration_seq(id) else {
            return unknown();
        };
        let Some(current) = self.migration(id) else {
            return unknown();
        };
        if let Some(p) = expect
            && current.phase != p
        {
            return fail(
                ErrorCode::BadPhase,
                format!(
                    "migration {id} is {} now, not {p}: it changed meanwhile",
                    current.phase
                ),
            );
        }
        use MigrationPhase as P;
        use MigrationStepKind as S;
        let target = match (step, current.phase) {
            (S::Prepare, _) => {
                return fail(
                    ErrorCode::BadRequest,
                    format!(
                        "migration {id}: prepare is POST /v1/migrations, not a step of an existing migration"
                    ),
                );
            }
            (S::Freeze, P::Frozen) | (S::Release, P::Released) | (S::Abort, P::Aborted) => {
                return Ok(Change::MigrationUnchanged(current.clone()));
            }
            (S::Freeze, P::Prepared) => P::Frozen,
            (S::Release, P::Frozen) => P::Released,
            (S::Abort, P::Prepared | P::Frozen) => P::Aborted,
            _ => return fail(ErrorCode::BadPhase, bad_phase(current, step)),
        };
        // Only live migrations get here (finished ones are released or aborted).
        let version = self.version + 1;
        let live = self
            .migrations
            .get_mut(&seq)
            .expect("an active migration is live");
        let old = live.migration.phase;
        let m = &mut live.migration;
        m.phase = target;
        m.updated_unix_ms = now_ms;
        match target {
            P::Frozen => m.frozen_unix_ms = now_ms,
            P::Released => {
                m.released_unix_ms = now_ms;
                m.forward_until_unix_ms = now_ms.saturating_add(self.net.forward_grace_ms);
            }
            _ => {}
        }
        live.phase_version = version;
        let migration = m.clone();
        match target {
            P::Released => {
                let e = self
                    .endpoints
                    .get_mut(&migration.container)
                    .expect("an endpoint with an active migration cannot be removed");
                e.host = migration.to.clone();
            }
            P::Aborted => {
                self.migrations.remove(&seq);
                self.push_history(migration.clone());
            }
            _ => {}
        }
        Ok(Change::MigrationStepped { old, migration })
    }

    fn expire_migrations(&mut self, now_ms: u64) -> Change {
        Change::MigrationsExpired(
            self.end_live(|m| {
                m.phase == MigrationPhase::Released && m.forward_until_unix_ms <= now_ms
            }),
        )
    }

    // ---- public mappings

    /// `require_container`: the container must be a current endpoint (always, except when
    /// reloading a state whose endpoint was removed while its mappings were kept).
    fn add_public(
        &mut self,
        spec: PublicSpec,
        require_container: bool,
    ) -> Result<Change, RegistryError> {
        if !self
            .net
            .public_cidrs
            .iter()
            .any(|c| c.contains(&spec.public))
        {
            let allowed = if self.net.public_cidrs.is_empty() {
                "no public_cidrs are configured".to_string()
            } else {
                let list: Vec<String> = self
                    .net
                    .public_cidrs
                    .iter()
                    .map(|c| c.to_string())
                    .collect();
                format!("public_cidrs are {}", list.join(", "))
            };
            return fail(
                ErrorCode::InvalidAddress,
                format!("public {} is outside public_cidrs ({allowed})", spec.public),
            );
        }
        let opt = |v: Option<String>| v.unwrap_or_else(|| "absent".into());
        let shape = (spec.public_port, spec.container_port, spec.proto);
        match shape {
            (None, None, None) | (Some(_), Some(_), Some(_)) => {}
            _ => {
                return fail(
                    ErrorCode::BadRequest,
                    format!(
                        "public_port, container_port and proto must all be set (a port mapping) \
                         or all be absent (a whole-IP mapping): got public_port {}, \
                         container_port {}, proto {}",
                        opt(spec.public_port.map(|p| p.to_string())),
                        opt(spec.container_port.map(|p| p.to_string())),
                        opt(spec.proto.map(|p| p.to_string())),
                    ),
                );
            }
        }
        for (field, port) in [
            ("public_port", spec.public_port),
            ("container_port", spec.container_port),
        ] {
            if port == Some(0) {
                return fail(
                    ErrorCode::BadRequest,
                    format!("{field} 0 is not a port: want 1–65535"),
                );
            }
        }
        if let Some(h) = self.host_with_overlay_ip(spec.container) {
            return fail(
                ErrorCode::Conflict,
                format!(
                    "container {} is host {}'s overlay_ip, not an endpoint",
                    spec.container, h.name
                ),
            );
        }
        if require_container && !self.endpoints.contains_key(&spec.container) {
            return fail(
                ErrorCode::UnknownEndpoint,
                format!("container {} is not a registered endpoint", spec.container),
            );
        }
        let key = spec.public_key();
        let target = |p: &PublicSpec| match p.container_port {
            Some(port) => format!("{}:{port}", p.container),
            None => p.container.to_string(),
        };
        if let Some(p) = self.public.get(&key) {
            return fail(
                ErrorCode::DuplicatePublic,
                format!("public endpoint {key} already exists (→ {})", target(p)),
            );
        }
        for p in self.public.values() {
            if p.public == spec.public && (p.is_whole_ip() || spec.is_whole_ip()) {
                let msg = if p.is_whole_ip() {
                    format!(
                        "public address {} is already mapped whole to {}: it cannot also carry \
                         port mappings",
                        p.public, p.container
                    )
                } else {
                    format!(
                        "public address {} already carries port mapping {} (→ {}): a whole-IP \
                         mapping needs the address alone",
                        p.public,
                        p.key(),
                        target(p)
                    )
                };
                return fail(ErrorCode::Conflict, msg);
            }
            if p.container == spec.container {
                if p.is_whole_ip() && spec.is_whole_ip() {
                    return fail(
                        ErrorCode::Conflict,
                        format!(
                            "container {} already has whole-IP mapping {}: its outgoing \
                             traffic could not be translated to two public addresses",
                            spec.container, p.public
                        ),
                    );
                }
                if !p.is_whole_ip()
                    && p.container_port == spec.container_port
                    && p.proto == spec.proto
                {
                    return fail(
                        ErrorCode::Conflict,
                        format!(
                            "container port {}/{} is already published as {}: replies could \
                             not be translated unambiguously",
                            target(&spec),
                            spec.proto.map(|p| p.to_string()).unwrap_or_default(),
                            p.key()
                        ),
                    );
                }
            }
        }
        self.public.insert(key, spec.clone());
        Ok(Change::PublicAdded(spec))
    }

    fn remove_public(&mut self, key: PublicKey) -> Result<Change, RegistryError> {
        match self.public.remove(&key) {
            Some(p) => Ok(Change::PublicRemoved(p)),
            None => fail(
                ErrorCode::UnknownPublic,
                format!("no public mapping has key {key}"),
            ),
        }
    }

    // ---- persistence

    /// The state to persist.
    pub fn to_persisted(&self) -> PersistedState {
        PersistedState {
            format: PersistedState::FORMAT,
            version: self.version,
            hosts: self.hosts.values().cloned().collect(),
            endpoints: self.endpoints.values().cloned().collect(),
            public: self.public.values().cloned().collect(),
            migrations: self.migrations.values().cloned().collect(),
            migration_history: self.history.iter().cloned().collect(),
            next_migration: self.next_migration,
        }
    }

    /// Rebuilds a registry from a persisted state, checking it against `net` with the same
    /// rules as the API (a config change can make a stored state invalid).
    pub fn from_persisted(net: NetConfig, s: PersistedState) -> Result<Self, String> {
        if s.format != PersistedState::FORMAT {
            return Err(format!(
                "unknown format {} (this gateway reads format {})",
                s.format,
                PersistedState::FORMAT
            ));
        }
        let mut r = Registry::new(net);
        for h in s.hosts {
            let name = h.name.clone();
            r.register_host(h)
                .map_err(|e| format!("host {name}: {}", e.message))?;
        }
        if !s.endpoints.is_empty() {
            let specs = s
                .endpoints
                .into_iter()
                .map(|e| EndpointSpec {
                    ip: e.ip,
                    host: e.host,
                    mac: Some(e.mac),
                })
                .collect();
            r.add_endpoints(specs).map_err(|e| e.message)?;
        }
        for p in s.public {
            let key = p.key();
            r.add_public(p, false)
                .map_err(|e| format!("public {key}: {}", e.message))?;
        }
        r.load_migrations(
            s.version,
            s.migrations,
            s.migration_history,
            s.next_migration,
        )?;
        let entries = r.hosts.len() + r.endpoints.len() + r.public.len() + r.migrations.len();
        if s.version == 0 && entries > 0 {
            // Agents start from version 0: they would never be sent these entries.
            return Err(format!(
                "version is 0 but the state holds {entries} entries"
            ));
        }
        r.version = s.version;
        Ok(r)
    }

    /// Checks and installs persisted migrations (after the hosts and endpoints).
    fn load_migrations(
        &mut self,
        version: u64,
        live: Vec<LiveMigration>,
        history: Vec<Migration>,
        next: u64,
    ) -> Result<(), String> {
        let mut seen = BTreeSet::new();
        let mut max_seq = 0;
        let mut check_id = |m: &Migration| {
            let seq = m
                .seq()
                .ok_or_else(|| format!("migration id {:?} is not m<number>", m.id))?;
            if !seen.insert(seq) {
                return Err(format!("migration {} appears twice", m.id));
            }
            max_seq = max_seq.max(seq);
            Ok(seq)
        };
        let mut containers = BTreeSet::new();
        for l in live {
            let m = &l.migration;
            let seq = check_id(m)?;
            let at = |why: String| format!("migration {}: {why}", m.id);
            if !self.hosts.contains_key(&m.from) || !self.hosts.contains_key(&m.to) {
                return Err(at(format!("host {} or {} is not registered", m.from, m.to)));
            }
            if m.from == m.to {
                return Err(at(format!("from and to are both {}", m.from)));
            }
            let Some(e) = self.endpoints.get(&m.container) else {
                return Err(at(format!("container {} is not an endpoint", m.container)));
            };
            let want_host = match m.phase {
                MigrationPhase::Prepared | MigrationPhase::Frozen => &m.from,
                MigrationPhase::Released => &m.to,
                MigrationPhase::Aborted => {
                    return Err(at("an aborted migration is listed as live".into()));
                }
            };
            if &e.host != want_host {
                return Err(at(format!(
                    "{} but endpoint {} is on host {} (want {want_host})",
                    m.phase, m.container, e.host
                )));
            }
            if !containers.insert(m.container) {
                return Err(at(format!(
                    "container {} has another live migration",
                    m.container
                )));
            }
            if l.prepared_version == 0
                || l.prepared_version > l.phase_version
                || l.phase_version > version
            {
                return Err(at(format!(
                    "versions out of order: prepared {} phase {} registry {version}",
                    l.prepared_version, l.phase_version
                )));
            }
            self.migrations.insert(seq, l);
        }
        for m in history {
            check_id(&m)?;
            if m.phase.is_active() {
                return Err(format!(
                    "migration {} in the history is {}: want released or aborted",
                    m.id, m.phase
                ));
            }
            self.push_history(m);
        }
        if next <= max_seq {
            return Err(format!(
                "next_migration {next} is not above the largest migration id m{max_seq}"
            ));
        }
        self.next_migration = next;
        Ok(())
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
    use super::*;
    use ferry_api::Proto;

    fn net() -> NetConfig {
        NetConfig {
            overlay_cidr: "10.244.0.0/16".parse().unwrap(),
            vni: 4242,
            public_cidrs: vec!["203.0.113.128/25".parse().unwrap()],
            forward_grace_ms: 2000,
        }
    }

    fn host(name: &str, vtep: &str, overlay: &str) -> HostInfo {
        HostInfo {
            name: name.into(),
            vtep: vtep.parse().unwrap(),
            overlay_ip: overlay.parse().unwrap(),
            role: HostRole::Host,
        }
    }

    fn gw(name: &str, vtep: &str, overlay: &str) -> HostInfo {
        HostInfo {
            role: HostRole::Gateway,
            ..host(name, vtep, overlay)
        }
    }

    fn ep(ip: &str, host: &str) -> EndpointSpec {
        EndpointSpec {
            ip: ip.parse().unwrap(),
            host: host.into(),
            mac: None,
        }
    }

    fn ep_mac(ip: &str, host: &str, mac: &str) -> EndpointSpec {
        EndpointSpec {
            mac: Some(mac.parse().unwrap()),
            ..ep(ip, host)
        }
    }

    fn whole(public: &str, container: &str) -> PublicSpec {
        PublicSpec {
            public: public.parse().unwrap(),
            public_port: None,
            container: container.parse().unwrap(),
            container_port: None,
            proto: None,
        }
    }

    fn port(public: &str, pp: u16, container: &str, cp: u16, proto: Proto) -> PublicSpec {
        PublicSpec {
            public: public.parse().unwrap(),
            public_port: Some(pp),
            container: container.parse().unwrap(),
            container_port: Some(cp),
            proto: Some(proto),
        }
    }

    /// Two hosts a1, b1 and a gateway gw; endpoints .1.5 on a1 and .2.5 on b1.
    fn populated() -> Registry {
        let mut r = Registry::new(net());
        for h in [
            host("a1", "198.18.1.10", "10.244.255.1"),
            host("b1", "198.18.2.10", "10.244.255.3"),
            gw("gw", "198.18.0.10", "10.244.255.254"),
        ] {
            r.apply(Request::RegisterHost(h)).unwrap();
        }
        r.apply(Request::AddEndpoints(vec![
            ep("10.244.1.5", "a1"),
            ep("10.244.2.5", "b1"),
        ]))
        .unwrap();
        assert_eq!(r.version(), 4);
        r
    }

    /// Applies a request that must fail with `code` and a message containing `want`, and
    /// checks that nothing changed.
    #[track_caller]
    fn refused(r: &mut Registry, req: Request, code: ErrorCode, want: &str) {
        let before = r.clone();
        let e = r.apply(req.clone()).unwrap_err();
        assert_eq!(e.code, code, "{req:?}: {e}");
        assert!(
            e.message.contains(want),
            "{req:?}: {:?} lacks {want:?}",
            e.message
        );
        assert_eq!(*r, before, "a refused request changed the registry");
    }

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
            ..host("b1", "198.18.2.10", "10.244.255.3")
        };
        refused(
            &mut r,
            Request::RegisterHost(promoted),
            ErrorCode::Conflict,
            "host gw already has role gateway",
        );
        r.apply(Request::RegisterHost(gw(
            "gw",
            "198.18.0.10",
            "10.244.255.254",
        )))
        .unwrap();
        assert_eq!(r.version(), v + 1, "gateway re-registration unchanged");
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
            (
                gw("c1", "198.18.9.1", "10.244.255.9"),
                Conflict,
                "host gw already has role gateway",
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

    #[test]
    fn public_validation() {
        let mut r = populated();
        r.apply(Request::AddPublic(whole("203.0.113.130", "10.244.1.5")))
            .unwrap();
        r.apply(Request::AddPublic(port(
            "203.0.113.131",
            80,
            "10.244.2.5",
            8080,
            Proto::Tcp,
        )))
        .unwrap();
        use ErrorCode::*;
        let mut shape = port("203.0.113.140", 80, "10.244.2.5", 80, Proto::Tcp);
        shape.container_port = None;
        let mut no_proto = port("203.0.113.140", 80, "10.244.2.5", 80, Proto::Tcp);
        no_proto.proto = None;
        let cases = [
            (
                whole("203.0.113.1", "10.244.2.5"),
                InvalidAddress,
                "public 203.0.113.1 is outside public_cidrs (public_cidrs are 203.0.113.128/25)",
            ),
            (
                shape,
                BadRequest,
                "got public_port 80, container_port absent, proto tcp",
            ),
            (no_proto, BadRequest, "must all be set"),
            (
                port("203.0.113.140", 0, "10.244.2.5", 80, Proto::Tcp),
                BadRequest,
                "public_port 0 is not a port",
            ),
            (
                port("203.0.113.140", 80, "10.244.2.5", 0, Proto::Tcp),
                BadRequest,
                "container_port 0 is not a port",
            ),
            (
                whole("203.0.113.140", "10.244.9.9"),
                UnknownEndpoint,
                "container 10.244.9.9 is not a registered endpoint",
            ),
            (
                whole("203.0.113.140", "10.244.255.1"),
                Conflict,
                "container 10.244.255.1 is host a1's overlay_ip",
            ),
            // Exact duplicates.
            (
                whole("203.0.113.130", "10.244.2.5"),
                DuplicatePublic,
                "public endpoint 203.0.113.130 already exists (→ 10.244.1.5)",
            ),
            (
                port("203.0.113.131", 80, "10.244.1.5", 81, Proto::Tcp),
                DuplicatePublic,
                "public endpoint 203.0.113.131:80/tcp already exists (→ 10.244.2.5:8080)",
            ),
            // A whole-IP address cannot carry ports, and vice versa.
            (
                port("203.0.113.130", 443, "10.244.2.5", 443, Proto::Tcp),
                Conflict,
                "public address 203.0.113.130 is already mapped whole to 10.244.1.5",
            ),
            (
                whole("203.0.113.131", "10.244.2.5"),
                Conflict,
                "already carries port mapping 203.0.113.131:80/tcp",
            ),
            // Reverse direction must be unambiguous.
            (
                whole("203.0.113.140", "10.244.1.5"),
                Conflict,
                "container 10.244.1.5 already has whole-IP mapping 203.0.113.130",
            ),
            (
                port("203.0.113.141", 81, "10.244.2.5", 8080, Proto::Tcp),
                Conflict,
                "container port 10.244.2.5:8080/tcp is already published as 203.0.113.131:80/tcp",
            ),
        ];
        for (spec, code, want) in cases {
            refused(&mut r, Request::AddPublic(spec), code, want);
        }
        // What is allowed: another proto or port on the same public address, the same
        // container port with another protocol, a port mapping to a container that also has a
        // whole-IP mapping.
        let v = r.version();
        for ok in [
            port("203.0.113.131", 80, "10.244.2.5", 8080, Proto::Udp),
            port("203.0.113.131", 81, "10.244.2.5", 8081, Proto::Tcp),
            port("203.0.113.132", 80, "10.244.1.5", 80, Proto::Tcp),
            whole("203.0.113.133", "10.244.2.5"),
        ] {
            assert_eq!(
                r.apply(Request::AddPublic(ok.clone())).unwrap(),
                Change::PublicAdded(ok)
            );
        }
        assert_eq!(r.version(), v + 4);
    }

    #[test]
    fn public_removal() {
        let mut r = populated();
        r.apply(Request::AddPublic(port(
            "203.0.113.131",
            80,
            "10.244.2.5",
            8080,
            Proto::Tcp,
        )))
        .unwrap();
        refused(
            &mut r,
            Request::RemovePublic("203.0.113.131".parse().unwrap()),
            ErrorCode::UnknownPublic,
            "no public mapping has key 203.0.113.131",
        );
        refused(
            &mut r,
            Request::RemovePublic("203.0.113.131:80/udp".parse().unwrap()),
            ErrorCode::UnknownPublic,
            "203.0.113.131:80/udp",
        );
        let v = r.version();
        r.apply(Request::RemovePublic(
            "203.0.113.131:80/tcp".parse().unwrap(),
        ))
        .unwrap();
        assert_eq!((r.public_count(), r.version()), (0, v + 1));
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

    #[test]
    fn persisted_round_trip_including_kept_mappings() {
        let mut r = populated();
        r.apply(Request::AddPublic(whole("203.0.113.130", "10.244.1.5")))
            .unwrap();
        r.apply(Request::AddEndpoints(vec![ep_mac(
            "10.244.1.9",
            "a1",
            "02:11:22:33:44:55",
        )]))
        .unwrap();
        r.apply(Request::RemoveEndpoint("10.244.1.5".parse().unwrap()))
            .unwrap();
        let back = Registry::from_persisted(net(), r.to_persisted()).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.version(), 7);
    }

    #[test]
    fn persisted_state_must_fit_the_config() {
        let r = populated();
        let mut other = net();
        other.overlay_cidr = "10.250.0.0/16".parse().unwrap();
        let e = Registry::from_persisted(other, r.to_persisted()).unwrap_err();
        assert!(
            e.contains("host a1: overlay_ip 10.244.255.1 is outside overlay_cidr 10.250.0.0/16"),
            "{e}"
        );

        let mut s = r.to_persisted();
        s.version = 0;
        let e = Registry::from_persisted(net(), s).unwrap_err();
        assert!(
            e.contains("version is 0 but the state holds 5 entries"),
            "{e}"
        );

        let mut s = r.to_persisted();
        s.format = 99;
        assert!(
            Registry::from_persisted(net(), s)
                .unwrap_err()
                .contains("format 99")
        );

        let mut s = r.to_persisted();
        s.endpoints.push(s.endpoints[0].clone());
        let e = Registry::from_persisted(net(), s).unwrap_err();
        assert!(e.contains("appears twice"), "{e}");
    }

    // ---- migrations

    const T0: u64 = 1_000_000;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    fn prepare(c: &str, to: &str, now_ms: u64) -> Request {
        Request::PrepareMigration {
            container: ip(c),
            to: to.into(),
            now_ms,
        }
    }

    fn step(id: &str, step: MigrationStepKind, now_ms: u64) -> Request {
        Request::StepMigration {
            id: id.into(),
            step,
            now_ms,
            expect: None,
        }
    }

    fn freeze(id: &str, now_ms: u64) -> Request {
        step(id, MigrationStepKind::Freeze, now_ms)
    }
    fn release(id: &str, now_ms: u64) -> Request {
        step(id, MigrationStepKind::Release, now_ms)
    }
    fn abort(id: &str, now_ms: u64) -> Request {
        step(id, MigrationStepKind::Abort, now_ms)
    }

    /// Applies a request that must change the registry by exactly one version; its migration.
    #[track_caller]
    fn changed(r: &mut Registry, req: Request) -> Migration {
        let v = r.version();
        let c = r.apply(req.clone()).unwrap();
        assert_eq!(r.version(), v + 1, "{req:?}: {c:?}");
        match c {
            Change::MigrationPrepared { migration, .. }
            | Change::MigrationStepped { migration, .. } => migration,
            other => panic!("{req:?}: {other:?}"),
        }
    }

    /// Applies a request that must answer the migration unchanged: registry untouched.
    #[track_caller]
    fn unchanged(r: &mut Registry, req: Request) -> Migration {
        let before = r.clone();
        let c = r.apply(req.clone()).unwrap();
        assert_eq!(*r, before, "{req:?} changed the registry");
        match c {
            Change::MigrationUnchanged(m) => m,
            other => panic!("{req:?}: {other:?}"),
        }
    }

    fn snap_ids(r: &Registry, now: u64) -> Vec<String> {
        r.snapshot(now)
            .migrations
            .into_iter()
            .map(|m| m.id)
            .collect()
    }

    /// `populated` plus host c1 (no endpoints) and endpoint .1.6 on a1.
    fn with_c1() -> Registry {
        let mut r = populated();
        r.apply(Request::RegisterHost(host(
            "c1",
            "198.18.3.10",
            "10.244.255.5",
        )))
        .unwrap();
        r.apply(Request::AddEndpoints(vec![ep("10.244.1.6", "a1")]))
            .unwrap();
        r
    }

    #[test]
    fn a_migration_goes_prepare_freeze_release_then_leaves_the_snapshot() {
        let mut r = populated();
        let v0 = r.version();
        let m = changed(&mut r, prepare("10.244.1.5", "b1", T0));
        assert_eq!(
            m,
            Migration {
                id: "m1".into(),
                container: ip("10.244.1.5"),
                from: "a1".into(),
                to: "b1".into(),
                phase: MigrationPhase::Prepared,
                created_unix_ms: T0,
                updated_unix_ms: T0,
                frozen_unix_ms: 0,
                released_unix_ms: 0,
                forward_until_unix_ms: 0,
            }
        );
        let l = r.live_migration("m1").unwrap();
        assert_eq!((l.prepared_version, l.phase_version), (v0 + 1, v0 + 1));
        assert_eq!(r.snapshot(T0).migrations, vec![m.clone()]);
        assert_eq!(r.active_migration(ip("10.244.1.5")).unwrap().migration, m);
        // The endpoint stays on the source until release.
        assert_eq!(r.snapshot(T0).endpoints[0].host, "a1");

        let m = changed(&mut r, freeze("m1", T0 + 100));
        assert_eq!(m.phase, MigrationPhase::Frozen);
        assert_eq!((m.frozen_unix_ms, m.updated_unix_ms), (T0 + 100, T0 + 100));
        let l = r.live_migration("m1").unwrap();
        assert_eq!((l.prepared_version, l.phase_version), (v0 + 1, v0 + 2));
        assert_eq!(r.snapshot(T0).endpoints[0].host, "a1");

        let m = changed(&mut r, release("m1", T0 + 300));
        assert_eq!(m.phase, MigrationPhase::Released);
        assert_eq!(m.released_unix_ms, T0 + 300);
        assert_eq!(m.forward_until_unix_ms, T0 + 300 + 2000);
        // The endpoint moved in the same change: same IP and MAC, host b1.
        let s = r.snapshot(T0 + 300);
        assert_eq!(s.version, v0 + 3);
        assert_eq!(
            s.endpoints[0],
            Endpoint {
                ip: ip("10.244.1.5"),
                host: "b1".into(),
                mac: MacAddr::for_container(ip("10.244.1.5")),
            }
        );
        assert_eq!(s.migrations, vec![m.clone()]);
        assert!(r.active_migration(ip("10.244.1.5")).is_none());
        assert_eq!(r.next_expiry(), Some(T0 + 2300));

        // In the snapshot until forward_until (exclusive), whatever the version.
        assert_eq!(snap_ids(&r, T0 + 2299), ["m1"]);
        assert!(snap_ids(&r, T0 + 2300).is_empty());
        // The timer: nothing to do before the deadline (no new version), then one version.
        let before = r.clone();
        assert_eq!(
            r.apply(Request::ExpireMigrations { now_ms: T0 + 2299 })
                .unwrap(),
            Change::MigrationsExpired(vec![])
        );
        assert_eq!(r, before);
        assert_eq!(
            r.apply(Request::ExpireMigrations { now_ms: T0 + 2300 })
                .unwrap(),
            Change::MigrationsExpired(vec![m.clone()])
        );
        assert_eq!(r.version(), v0 + 4);
        assert!(r.snapshot(T0).migrations.is_empty(), "gone at any time now");
        assert_eq!(r.next_expiry(), None);
        // History: still listed, still answerable.
        assert_eq!(r.all_migrations(), vec![&m]);
        assert_eq!(r.migration("m1"), Some(&m));
        assert!(r.live_migration("m1").is_none());
        assert_eq!(unchanged(&mut r, release("m1", T0 + 5000)), m);
    }

    #[test]
    fn prepare_rules() {
        let mut r = populated();
        use ErrorCode::*;
        for (req, code, want) in [
            (
                prepare("10.244.9.9", "b1", T0),
                UnknownEndpoint,
                "container 10.244.9.9 is not a registered endpoint",
            ),
            (
                prepare("10.244.1.5", "zz", T0),
                UnknownHost,
                "host \"zz\" (destination of 10.244.1.5) is not registered",
            ),
            (
                prepare("10.244.1.5", "a1", T0),
                BadRequest,
                "container 10.244.1.5 is already on host a1: nothing to migrate",
            ),
        ] {
            refused(&mut r, req, code, want);
        }
        let m1 = changed(&mut r, prepare("10.244.1.5", "b1", T0));
        // Repeating the prepare: unchanged (same migration, same version).
        assert_eq!(unchanged(&mut r, prepare("10.244.1.5", "b1", T0 + 50)), m1);
        // At most one active migration per container, whatever the destination.
        refused(
            &mut r,
            prepare("10.244.1.5", "gw", T0),
            Conflict,
            "container 10.244.1.5 is already being migrated: migration m1 (prepared, a1 → b1)",
        );
        // Other containers are independent; the gateway host may be a destination (an
        // endpoint may live there too).
        let m2 = changed(&mut r, prepare("10.244.2.5", "gw", T0));
        assert_eq!((m2.id.as_str(), m2.from.as_str()), ("m2", "b1"));
        changed(&mut r, freeze("m1", T0 + 1));
        refused(
            &mut r,
            prepare("10.244.1.5", "b1", T0),
            BadPhase,
            "migration m1 is frozen: it is already prepared (release or abort it)",
        );
        refused(
            &mut r,
            prepare("10.244.1.5", "gw", T0),
            Conflict,
            "migration m1 (frozen, a1 → b1)",
        );
        // After an abort, a new migration (ids are never reused).
        changed(&mut r, abort("m1", T0 + 2));
        let m3 = changed(&mut r, prepare("10.244.1.5", "b1", T0 + 3));
        assert_eq!(m3.id, "m3");
    }

    #[test]
    fn steps_out_of_order_are_refused_and_change_nothing() {
        let mut r = populated();
        use ErrorCode::*;
        use MigrationStepKind as S;
        changed(&mut r, prepare("10.244.1.5", "b1", T0));
        refused(
            &mut r,
            release("m1", T0),
            BadPhase,
            "migration m1 is prepared: freeze it before release",
        );
        refused(
            &mut r,
            abort("m9", T0),
            UnknownMigration,
            "no migration has id \"m9\"",
        );
        refused(&mut r, freeze("bogus", T0), UnknownMigration, "\"bogus\"");
        refused(
            &mut r,
            step("m1", S::Prepare, T0),
            BadRequest,
            "prepare is POST /v1/migrations",
        );
        // The coordinator's guarded abort: only from the phase it expects.
        refused(
            &mut r,
            Request::StepMigration {
                id: "m1".into(),
                step: S::Abort,
                now_ms: T0,
                expect: Some(MigrationPhase::Frozen),
            },
            BadPhase,
            "migration m1 is prepared now, not frozen: it changed meanwhile",
        );
        changed(&mut r, freeze("m1", T0 + 1));
        unchanged(&mut r, freeze("m1", T0 + 2));
        changed(&mut r, release("m1", T0 + 3));
        unchanged(&mut r, release("m1", T0 + 4));
        refused(
            &mut r,
            freeze("m1", T0),
            BadPhase,
            "migration m1 is released: it is over (to move 10.244.1.5 again, prepare a new migration)",
        );
        refused(
            &mut r,
            abort("m1", T0),
            BadPhase,
            "migration m1 is released: too late to abort; migrate back instead",
        );
        // After an abort, only the abort repeats.
        let m2 = changed(&mut r, prepare("10.244.2.5", "a1", T0));
        let aborted = changed(&mut r, abort(&m2.id, T0 + 10));
        assert_eq!(aborted.phase, MigrationPhase::Aborted);
        assert_eq!(aborted.updated_unix_ms, T0 + 10);
        assert_eq!(unchanged(&mut r, abort("m2", T0 + 11)), aborted);
        for (req, want) in [
            (freeze("m2", T0), "migration m2 is aborted: it is over"),
            (release("m2", T0), "migration m2 is aborted: it is over"),
        ] {
            refused(&mut r, req, BadPhase, want);
        }
    }

    #[test]
    fn abort_from_prepared_and_frozen_leaves_everything_on_the_source() {
        for frozen in [false, true] {
            let mut r = populated();
            let before = r.snapshot(T0);
            changed(&mut r, prepare("10.244.1.5", "b1", T0));
            if frozen {
                changed(&mut r, freeze("m1", T0 + 1));
            }
            let m = changed(&mut r, abort("m1", T0 + 2));
            assert_eq!(m.phase, MigrationPhase::Aborted);
            assert_eq!(m.frozen_unix_ms != 0, frozen);
            let after = r.snapshot(T0);
            assert_eq!(
                after.endpoints, before.endpoints,
                "the endpoint stays on a1"
            );
            assert!(
                after.migrations.is_empty(),
                "an aborted migration leaves the snapshot"
            );
            assert!(r.live_migrations().next().is_none());
            assert_eq!(r.all_migrations(), vec![&m]);
            assert_eq!(r.history_len(), 1);
        }
    }

    #[test]
    fn removals_are_refused_while_a_migration_is_active() {
        let mut r = with_c1();
        use ErrorCode::*;
        changed(&mut r, prepare("10.244.1.5", "c1", T0));
        refused(
            &mut r,
            Request::RemoveEndpoint(ip("10.244.1.5")),
            Conflict,
            "endpoint 10.244.1.5 is being migrated (migration m1, prepared, a1 → c1): abort or \
             finish the migration first",
        );
        refused(
            &mut r,
            Request::RemoveHost("c1".into()),
            Conflict,
            "host c1 is the destination of migration m1 (10.244.1.5, prepared, a1 → c1)",
        );
        refused(
            &mut r,
            Request::RemoveHost("a1".into()),
            Conflict,
            "host a1 is the source of migration m1",
        );
        changed(&mut r, freeze("m1", T0 + 1));
        refused(
            &mut r,
            Request::RemoveEndpoint(ip("10.244.1.5")),
            Conflict,
            "frozen",
        );
        // Other endpoints are not concerned.
        r.apply(Request::RemoveEndpoint(ip("10.244.1.6"))).unwrap();
        // Released and forwarding: the endpoint (now on c1) may go; its migration ends early.
        let m = changed(&mut r, release("m1", T0 + 2));
        assert_eq!(snap_ids(&r, T0 + 2), ["m1"]);
        let c = r.apply(Request::RemoveEndpoint(ip("10.244.1.5"))).unwrap();
        let Change::EndpointRemoved {
            ended_migrations, ..
        } = c
        else {
            panic!("{c:?}")
        };
        assert_eq!(ended_migrations, vec![m]);
        assert!(r.snapshot(T0 + 2).migrations.is_empty());
        assert_eq!(r.history_len(), 1);
        r.apply(Request::RemoveHost("c1".into())).unwrap();
    }

    #[test]
    fn removing_the_forwarding_source_ends_the_grace() {
        let mut r = with_c1();
        r.apply(Request::RemoveEndpoint(ip("10.244.1.6"))).unwrap();
        changed(&mut r, prepare("10.244.1.5", "c1", T0));
        changed(&mut r, freeze("m1", T0));
        let m = changed(&mut r, release("m1", T0));
        // a1 has no endpoints left: it may go, and its forwarding with it.
        let c = r.apply(Request::RemoveHost("a1".into())).unwrap();
        assert_eq!(
            c,
            Change::HostRemoved {
                host: host("a1", "198.18.1.10", "10.244.255.1"),
                ended_migrations: vec![m],
            }
        );
        assert!(r.snapshot(T0).migrations.is_empty());
    }

    #[test]
    fn a_new_migration_ends_the_previous_grace_of_its_container() {
        let mut r = populated();
        changed(&mut r, prepare("10.244.1.5", "b1", T0));
        changed(&mut r, freeze("m1", T0));
        let m1 = changed(&mut r, release("m1", T0));
        // Back to a1 within the grace: a1 is the destination now, b1 the source.
        let v = r.version();
        let c = r.apply(prepare("10.244.1.5", "a1", T0 + 10)).unwrap();
        assert_eq!(r.version(), v + 1);
        let Change::MigrationPrepared { migration, ended } = c else {
            panic!("{c:?}")
        };
        assert_eq!(ended, Some(m1));
        assert_eq!(
            (migration.from.as_str(), migration.to.as_str()),
            ("b1", "a1")
        );
        assert_eq!(snap_ids(&r, T0 + 10), ["m2"], "one migration per container");
        assert_eq!(r.next_expiry(), None);
    }

    #[test]
    fn snapshots_are_deterministic_and_sorted() {
        let build = || {
            let mut r = with_c1();
            for (c, to) in [
                ("10.244.1.5", "b1"),
                ("10.244.2.5", "c1"),
                ("10.244.1.6", "gw"),
            ] {
                changed(&mut r, prepare(c, to, T0));
            }
            changed(&mut r, freeze("m2", T0 + 5));
            changed(&mut r, freeze("m3", T0 + 5));
            changed(&mut r, release("m3", T0 + 10));
            r
        };
        let (a, b) = (build(), build());
        assert_eq!(a, b);
        for t in [T0, T0 + 2009, T0 + 2010, T0 + 99_999] {
            assert_eq!(a.snapshot(t), b.snapshot(t));
            assert_eq!(a.snapshot(t), a.snapshot(t));
        }
        assert_eq!(snap_ids(&a, T0 + 2009), ["m1", "m2", "m3"]);
        assert_eq!(snap_ids(&a, T0 + 2010), ["m1", "m2"]);
        assert_eq!(
            a.migration_counts(T0 + 2009),
            [
                (MigrationPhase::Prepared, 1),
                (MigrationPhase::Frozen, 1),
                (MigrationPhase::Released, 1)
            ]
        );
        assert_eq!(
            a.migration_counts(T0 + 2010)[2],
            (MigrationPhase::Released, 0)
        );
        assert_eq!(a.next_expiry_after(T0 + 2009), Some(T0 + 2010));
        assert_eq!(a.next_expiry_after(T0 + 2010), None);
        // Numeric order, not text order: m10 after m9.
        let mut r = populated();
        for i in 0..10u64 {
            changed(&mut r, prepare("10.244.1.5", "b1", T0 + i));
            changed(&mut r, abort(&format!("m{}", i + 1), T0 + i));
        }
        changed(&mut r, prepare("10.244.1.5", "b1", T0 + 20));
        let ids: Vec<&str> = r.all_migrations().iter().map(|m| m.id.as_str()).collect();
        assert_eq!(ids.last(), Some(&"m11"));
        assert_eq!(ids[8..10], ["m9", "m10"]);
    }

    #[test]
    fn history_keeps_the_last_finished_migrations() {
        let mut r = populated();
        let n = MIGRATION_HISTORY as u64 + 5;
        for i in 1..=n {
            r.apply(prepare("10.244.1.5", "b1", T0)).unwrap();
            r.apply(abort(&format!("m{i}"), T0)).unwrap();
        }
        assert_eq!(r.history_len(), MIGRATION_HISTORY);
        assert!(r.migration("m5").is_none());
        assert!(r.migration("m6").is_some());
        let m = changed(&mut r, prepare("10.244.1.5", "b1", T0));
        assert_eq!(m.id, format!("m{}", n + 1));
        // Persisted and reloaded: the cap and the id counter survive.
        let back = Registry::from_persisted(net(), r.to_persisted()).unwrap();
        assert_eq!(back, r);
    }

    /// One migration in each phase: m1 released (forwarding), m2 aborted, m3 prepared,
    /// m4 frozen.
    fn every_phase() -> Registry {
        let mut r = with_c1();
        changed(&mut r, prepare("10.244.1.6", "c1", T0));
        changed(&mut r, freeze("m1", T0 + 1));
        changed(&mut r, release("m1", T0 + 2));
        changed(&mut r, prepare("10.244.2.5", "c1", T0 + 3));
        changed(&mut r, abort("m2", T0 + 4));
        changed(&mut r, prepare("10.244.1.5", "b1", T0 + 5));
        changed(&mut r, prepare("10.244.2.5", "gw", T0 + 6));
        changed(&mut r, freeze("m4", T0 + 7));
        r
    }

    #[test]
    fn persisted_round_trip_with_migrations_in_every_phase() {
        let r = every_phase();
        let phases: Vec<(String, MigrationPhase)> = r
            .all_migrations()
            .iter()
            .map(|m| (m.id.clone(), m.phase))
            .collect();
        use MigrationPhase::*;
        assert_eq!(
            phases,
            [
                ("m1".into(), Released),
                ("m2".into(), Aborted),
                ("m3".into(), Prepared),
                ("m4".into(), Frozen)
            ]
        );
        let p = r.to_persisted();
        assert_eq!(p.next_migration, 5);
        // Through the file format too.
        let json = serde_json::to_string(&p).unwrap();
        let p2: PersistedState = serde_json::from_str(&json).unwrap();
        assert_eq!(p2, p);
        let mut back = Registry::from_persisted(net(), p2).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.snapshot(T0 + 10), r.snapshot(T0 + 10));
        for id in ["m1", "m3", "m4"] {
            assert_eq!(back.live_migration(id), r.live_migration(id));
        }
        // And it goes on where it stopped: release the frozen one, abort the prepared one.
        changed(&mut back, release("m4", T0 + 20));
        changed(&mut back, abort("m3", T0 + 21));
        assert_eq!(
            changed(&mut back, prepare("10.244.1.5", "c1", T0 + 22)).id,
            "m5"
        );
    }

    #[test]
    fn persisted_migrations_must_be_consistent() {
        let r = every_phase();
        type Spoil = Box<dyn Fn(&mut PersistedState)>;
        let cases: Vec<(Spoil, &str)> = vec![
            (
                Box::new(|s| s.next_migration = 4),
                "next_migration 4 is not above the largest migration id m4",
            ),
            (
                Box::new(|s| s.migrations[1].migration.id = "m1".into()),
                "migration m1 appears twice",
            ),
            (
                Box::new(|s| s.migrations[1].migration.id = "x3".into()),
                "migration id \"x3\" is not m<number>",
            ),
            (
                Box::new(|s| s.migrations[1].migration.from = "c1".into()),
                "migration m3: prepared but endpoint 10.244.1.5 is on host a1 (want c1)",
            ),
            (
                Box::new(|s| s.migrations[0].migration.to = "nope".into()),
                "migration m1: host a1 or nope is not registered",
            ),
            (
                Box::new(|s| s.migrations[1].migration.phase = MigrationPhase::Aborted),
                "migration m3: an aborted migration is listed as live",
            ),
            (
                Box::new(|s| s.migration_history[0].phase = MigrationPhase::Frozen),
                "migration m2 in the history is frozen",
            ),
            (
                Box::new(|s| s.migrations[2].phase_version = s.version + 1),
                "migration m4: versions out of order",
            ),
            (
                Box::new(|s| {
                    let mut m = s.migrations[1].clone();
                    m.migration.id = "m9".into();
                    s.next_migration = 10;
                    s.migrations.push(m);
                }),
                "migration m9: container 10.244.1.5 has another live migration",
            ),
        ];
        for (spoil, want) in cases {
            let mut s = r.to_persisted();
            spoil(&mut s);
            let e = Registry::from_persisted(net(), s).unwrap_err();
            assert!(e.contains(want), "{e:?} lacks {want:?}");
        }
    }
}
