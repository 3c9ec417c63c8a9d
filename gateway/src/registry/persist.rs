//! The state to persist, and a registry rebuilt from it (checked with the API's rules).

use std::collections::BTreeSet;

use ferry_api::{EndpointSpec, Migration, MigrationPhase, validate::MAX_ENDPOINTS_PER_REQUEST};

use super::{NetConfig, Registry, RegistryError};
use crate::migration::transitions::LiveMigration;
use crate::store::{JournalRecord, PersistedState};

/// Why a stored state does not fit (the config, or itself). Nothing was loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    #[error(
        "unknown format {found} (this gateway reads format {})",
        PersistedState::FORMAT
    )]
    Format { found: u32 },
    #[error("host {name}: {}", source.message)]
    Host {
        name: String,
        #[source]
        source: RegistryError,
    },
    #[error("{}", .0.message)]
    Endpoints(#[source] RegistryError),
    #[error("public {key}: {}", source.message)]
    Public {
        key: String,
        #[source]
        source: RegistryError,
    },
    #[error("version is 0 but the state holds {entries} entries")]
    VersionZero { entries: usize },
    #[error("migration id {id:?} is not m<number>")]
    MigrationId { id: String },
    #[error("migration {id} appears twice")]
    MigrationTwice { id: String },
    /// A live migration that does not fit the hosts, endpoints or versions (`why`).
    #[error("migration {id}: {why}")]
    Migration { id: String, why: String },
    #[error("migration {id} in the history is {phase}: want released or aborted")]
    ActiveInHistory { id: String, phase: MigrationPhase },
    #[error("next_migration {next} is not above the largest migration id m{max_seq}")]
    NextMigration { next: u64, max_seq: u64 },
    #[error("{}", .0.message)]
    Lease(#[source] RegistryError),
    /// A journal record that does not apply to the registry it follows.
    #[error("the record of version {version}: {what}")]
    Record { version: u64, what: String },
}

impl Registry {
    /// The journal's record of the change from `old` to `self` (`touched`: its keys, from
    /// [`crate::watch::touched`]). `None` if the history did not change by appending (then
    /// the state is written whole).
    pub fn journal_record(
        &self,
        old: &Registry,
        touched: &crate::watch::Touched,
    ) -> Option<crate::store::JournalRecord> {
        let crate::watch::Changed {
            hosts,
            hosts_removed,
            endpoints,
            endpoints_removed,
            public,
            public_removed,
        } = touched.entries(self);
        let mut leases = BTreeSet::new();
        crate::shared_map::SharedMap::diff_keys(&old.leases, &self.leases, &mut leases);
        let (ipam, ipam_removed) = crate::watch::split(&self.leases, &leases, |ip| *ip);
        let mut r = crate::store::JournalRecord {
            version: self.version,
            hosts,
            hosts_removed,
            endpoints,
            endpoints_removed,
            public,
            public_removed,
            ipam,
            ipam_removed,
            migrations: self.migrations.values().cloned().collect(),
            history_push: Vec::new(),
            history_len: self.history.len(),
            next_migration: self.next_migration,
            ipam_next: self.ipam_next,
        };
        // The history only grows at the back and drops at the front (ids are unique).
        let old_ids: BTreeSet<&str> = old.history.iter().map(|m| m.id.as_str()).collect();
        r.history_push = self
            .history
            .iter()
            .filter(|m| !old_ids.contains(m.id.as_str()))
            .cloned()
            .collect();
        let mut replayed: Vec<&Migration> = old.history.iter().collect();
        replayed.extend(r.history_push.iter());
        let extra = replayed.len().saturating_sub(r.history_len);
        let same = replayed[extra..].iter().copied().eq(self.history.iter());
        same.then_some(r)
    }

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
            ipam: self.leases.values().cloned().collect(),
            ipam_next: self.ipam_next,
        }
    }

    /// Rebuilds a registry from a persisted state, checking it against `net` with the same
    /// rules as the API (a config change can make a stored state invalid).
    pub fn from_persisted(net: NetConfig, s: PersistedState) -> Result<Self, LoadError> {
        if s.format != PersistedState::FORMAT {
            return Err(LoadError::Format { found: s.format });
        }
        let mut r = Registry::new(net);
        for h in s.hosts {
            let name = h.name.clone();
            r.register_host(h)
                .map_err(|source| LoadError::Host { name, source })?;
        }
        // In batches of what one request may carry: a registry holds up to MAX_ENDPOINTS.
        let mut endpoints = s.endpoints.into_iter().peekable();
        while endpoints.peek().is_some() {
            let specs = endpoints
                .by_ref()
                .take(MAX_ENDPOINTS_PER_REQUEST)
                .map(|e| EndpointSpec {
                    ip: e.ip,
                    host: e.host,
                    mac: Some(e.mac),
                })
                .collect();
            r.add_endpoints(specs).map_err(LoadError::Endpoints)?;
        }
        for p in s.public {
            let key = p.key();
            r.add_public(p, false)
                .map_err(|source| LoadError::Public { key, source })?;
        }
        r.load_migrations(
            s.version,
            s.migrations,
            s.migration_history,
            s.next_migration,
        )?;
        r.load_leases(s.ipam, s.ipam_next)
            .map_err(LoadError::Lease)?;
        let entries = r.hosts.len()
            + r.endpoints.len()
            + r.public.len()
            + r.migrations.len()
            + r.leases.len();
        if s.version == 0 && entries > 0 {
            // Agents start from version 0: they would never be sent these entries.
            return Err(LoadError::VersionZero { entries });
        }
        r.version = s.version;
        Ok(r)
    }

    /// Applies the journal record of the next version in place, at the cost of what it
    /// touched (a follower gateway, for each change another gateway logged in etcd). Each
    /// entry it sets is checked as far as it can be alone (addresses in the overlay, the
    /// endpoint's host registered, one endpoint per MAC); the live migrations and the
    /// history are checked whole (a bounded handful). A state that does not fit is corruption
    /// of the store: on error, `self` is left half-changed, so apply to a clone.
    pub fn apply_record(&mut self, r: JournalRecord) -> Result<(), LoadError> {
        let bad = |what: String| LoadError::Record {
            version: r.version,
            what,
        };
        if Some(r.version) != self.version.checked_add(1) {
            return Err(bad(format!("does not follow version {}", self.version)));
        }
        for name in &r.hosts_removed {
            self.hosts.remove(name.as_str());
        }
        for h in r.hosts {
            self.hosts.insert(h.name.clone(), h);
        }
        // A host goes only without endpoints (checked over the endpoints, once per removal:
        // rare).
        let gone: Vec<&String> = r
            .hosts_removed
            .iter()
            .filter(|n| !self.hosts.contains_key(n.as_str()))
            .collect();
        if !gone.is_empty() {
            let removed_here: BTreeSet<std::net::Ipv4Addr> =
                r.endpoints_removed.iter().copied().collect();
            if let Some(e) = self
                .endpoints
                .values()
                .find(|e| gone.contains(&&e.host) && !removed_here.contains(&e.ip))
            {
                return Err(bad(format!(
                    "host {} is removed but endpoint {} is still on it",
                    e.host, e.ip
                )));
            }
        }
        for ip in &r.endpoints_removed {
            if let Some(e) = self.endpoints.remove(ip) {
                self.macs.remove(&e.mac);
            }
        }
        // Old MACs of the endpoints set go first: two endpoints may swap theirs in one record.
        for e in &r.endpoints {
            if let Some(old) = self.endpoints.get(&e.ip)
                && old.mac != e.mac
            {
                let mac = old.mac;
                self.macs.remove(&mac);
            }
        }
        for e in r.endpoints {
            self.check_overlay_ip("endpoint", e.ip)
                .map_err(|x| bad(x.message))?;
            if !self.hosts.contains_key(e.host.as_str()) {
                return Err(bad(format!(
                    "endpoint {} is on host {}, which is not registered",
                    e.ip, e.host
                )));
            }
            if let Some(other) = self.macs.insert(e.mac, e.ip)
                && other != e.ip
            {
                return Err(bad(format!(
                    "mac {} of endpoint {} is also endpoint {other}'s",
                    e.mac, e.ip
                )));
            }
            self.endpoints.insert(e.ip, e);
        }
        for k in &r.public_removed {
            let key: ferry_api::PublicKey = k
                .parse()
                .map_err(|e| bad(format!("public key {k:?}: {e}")))?;
            self.public.remove(&key);
        }
        for p in r.public {
            self.check_overlay_ip("public mapping's container", p.container)
                .map_err(|x| bad(x.message))?;
            self.public.insert(p.public_key(), p);
        }
        for ip in &r.ipam_removed {
            self.leases.remove(ip);
        }
        for l in r.ipam {
            self.check_overlay_ip("lease", l.ip)
                .map_err(|x| bad(x.message))?;
            self.leases.insert(l.ip, l);
        }
        self.ipam_next = r.ipam_next;
        let mut history: Vec<Migration> = std::mem::take(&mut self.history).into();
        history.extend(r.history_push);
        let extra = history.len().saturating_sub(r.history_len);
        history.drain(..extra);
        self.migrations.clear();
        self.load_migrations(r.version, r.migrations, history, r.next_migration)?;
        self.version = r.version;
        Ok(())
    }

    /// Checks and installs persisted migrations (after the hosts and endpoints).
    pub(crate) fn load_migrations(
        &mut self,
        version: u64,
        live: Vec<LiveMigration>,
        history: Vec<Migration>,
        next: u64,
    ) -> Result<(), LoadError> {
        let mut seen = BTreeSet::new();
        let mut max_seq = 0;
        let mut check_id = |m: &Migration| {
            let seq = m
                .seq()
                .ok_or_else(|| LoadError::MigrationId { id: m.id.clone() })?;
            if !seen.insert(seq) {
                return Err(LoadError::MigrationTwice { id: m.id.clone() });
            }
            max_seq = max_seq.max(seq);
            Ok(seq)
        };
        let mut containers = BTreeSet::new();
        for l in live {
            let m = &l.migration;
            let seq = check_id(m)?;
            let at = |why: String| LoadError::Migration {
                id: m.id.clone(),
                why,
            };
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
                return Err(LoadError::ActiveInHistory {
                    id: m.id.clone(),
                    phase: m.phase,
                });
            }
            self.push_history(m);
        }
        if next <= max_seq {
            return Err(LoadError::NextMigration { next, max_seq });
        }
        self.next_migration = next;
        Ok(())
    }
}

#[cfg(test)]
mod tests {

    use ferry_api::MigrationPhase;

    use crate::registry::{Registry, Request};
    use crate::store::PersistedState;

    use crate::registry::testutil::*;

    /// A registry larger than one request may carry loads (it is built by several requests;
    /// loading it must not be refused by the per-request limit: a gateway restarting, or one
    /// reading the registry whole from etcd, once did).
    #[test]
    fn a_registry_larger_than_one_request_loads() {
        let mut cfg = net();
        cfg.overlay_cidr = "10.240.0.0/12".parse().unwrap();
        let mut r = Registry::new(cfg.clone());
        r.apply(Request::RegisterHost(host(
            "a1",
            "198.18.1.10",
            "10.244.255.1",
        )))
        .unwrap();
        let n = ferry_api::validate::MAX_ENDPOINTS_PER_REQUEST + 10;
        let base = u32::from(std::net::Ipv4Addr::new(10, 241, 0, 0));
        let ips: Vec<std::net::Ipv4Addr> = (0..n as u32).map(|i| (base + i).into()).collect();
        for batch in ips.chunks(ferry_api::validate::MAX_ENDPOINTS_PER_REQUEST) {
            let specs = batch
                .iter()
                .map(|ip| ferry_api::EndpointSpec {
                    ip: *ip,
                    host: "a1".into(),
                    mac: None,
                })
                .collect();
            r.apply(Request::AddEndpoints(specs)).unwrap();
        }
        assert!(r.endpoint_count() > ferry_api::validate::MAX_ENDPOINTS_PER_REQUEST);
        let back = Registry::from_persisted(cfg, r.to_persisted()).unwrap();
        assert_eq!(back, r);
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
        let e = Registry::from_persisted(other, r.to_persisted())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("host a1: overlay_ip 10.244.255.1 is outside overlay_cidr 10.250.0.0/16"),
            "{e}"
        );

        let mut s = r.to_persisted();
        s.version = 0;
        let e = Registry::from_persisted(net(), s).unwrap_err().to_string();
        assert!(
            e.contains("version is 0 but the state holds 5 entries"),
            "{e}"
        );

        let mut s = r.to_persisted();
        s.format = 99;
        assert!(
            Registry::from_persisted(net(), s)
                .unwrap_err()
                .to_string()
                .contains("format 99")
        );

        let mut s = r.to_persisted();
        s.endpoints.push(s.endpoints[0].clone());
        let e = Registry::from_persisted(net(), s).unwrap_err().to_string();
        assert!(e.contains("appears twice"), "{e}");
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
            let e = Registry::from_persisted(net(), s).unwrap_err().to_string();
            assert!(e.contains(want), "{e:?} lacks {want:?}");
        }
    }
}
