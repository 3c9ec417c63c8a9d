//! The delta watch: what changed between registry versions, so that a change reaches every
//! agent as the few entries it touched instead of the whole registry.
//!
//! Each change's keys (hosts, endpoints, public mappings that were added, changed or removed)
//! are found by comparing the registry before and after it ([`touched`]: the change was made on
//! a clone whose maps share their unchanged chunks with the old registry's, so the comparison
//! skips them and costs what the change copied, see [`crate::shared_map`]) and kept in a bounded [`ChangeLog`]. A watch from version N is answered with
//! the union of the keys of versions N+1..=current, each looked up in the current registry:
//! present → sent whole, absent → sent as removed ([`delta`]). The answer's size follows the
//! changes since N, not the registry; an agent the log no longer covers (too far behind, or
//! the gateway restarted) gets the whole snapshot.
//!
//! Pure functions and a plain struct: tested without a server (see the tests below, which
//! check `delta(N→M)` applied to `snapshot(N)` against `snapshot(M)` over random changes).

use std::{
    collections::{BTreeSet, VecDeque},
    net::Ipv4Addr,
};

use ferry_api::{PublicKey, SnapshotDelta};

use crate::{migration::transitions::in_snapshot, registry::Registry, shared_map::SharedMap};

/// Versions the log keeps (a watch further behind gets the whole snapshot).
pub const LOG_VERSIONS: usize = 4096;
/// Keys the log keeps, all versions together (bounds its memory whatever the changes' size).
pub const LOG_KEYS: usize = 1 << 20;

/// The keys one or more changes touched.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Touched {
    pub hosts: BTreeSet<String>,
    pub endpoints: BTreeSet<Ipv4Addr>,
    pub public: BTreeSet<PublicKey>,
}

impl Touched {
    pub fn len(&self) -> usize {
        self.hosts.len() + self.endpoints.len() + self.public.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn extend(&mut self, other: &Touched) {
        self.hosts.extend(other.hosts.iter().cloned());
        self.endpoints.extend(other.endpoints.iter().copied());
        self.public.extend(other.public.iter().copied());
    }
}

/// What a change from `old` to `new` touched.
pub fn touched(old: &Registry, new: &Registry) -> Touched {
    let mut t = Touched::default();
    SharedMap::diff_keys(&old.hosts, &new.hosts, &mut t.hosts);
    SharedMap::diff_keys(&old.endpoints, &new.endpoints, &mut t.endpoints);
    SharedMap::diff_keys(&old.public, &new.public, &mut t.public);
    t
}

/// The keys each recent version touched, oldest first; versions are contiguous.
#[derive(Debug, Default)]
pub struct ChangeLog {
    entries: VecDeque<(u64, Touched)>,
    keys: usize,
}

impl ChangeLog {
    /// Records what version `version` touched. A version that does not follow the last one
    /// (a gap: nothing can span it) starts the log over.
    pub fn record(&mut self, version: u64, t: Touched) {
        if self
            .entries
            .back()
            .is_some_and(|(v, _)| v.checked_add(1) != Some(version))
        {
            self.entries.clear();
            self.keys = 0;
        }
        self.keys += t.len();
        self.entries.push_back((version, t));
        while self.entries.len() > LOG_VERSIONS || (self.keys > LOG_KEYS && self.entries.len() > 1)
        {
            if let Some((_, old)) = self.entries.pop_front() {
                self.keys -= old.len();
            }
        }
    }

    /// Everything versions `after+1..=current` touched, if the log holds every one of them.
    pub fn since(&self, after: u64, current: u64) -> Option<Touched> {
        if after == 0 || after >= current {
            return None;
        }
        let first = self.entries.front()?.0;
        if first > after + 1 {
            return None;
        }
        let mut t = Touched::default();
        let mut last = after;
        for (v, keys) in &self.entries {
            if *v <= after || *v > current {
                continue;
            }
            t.extend(keys);
            last = *v;
        }
        (last == current).then_some(t)
    }

    /// Versions held: (oldest, newest).
    pub fn span(&self) -> Option<(u64, u64)> {
        Some((self.entries.front()?.0, self.entries.back()?.0))
    }
}

/// The delta from version `from` to `reg`'s, given what changed since (`t`), at `now_ms` (the
/// migrations are those of `reg.snapshot(now_ms)`).
pub fn delta(reg: &Registry, from: u64, t: &Touched, now_ms: u64) -> SnapshotDelta {
    let Changed {
        hosts,
        hosts_removed,
        endpoints,
        endpoints_removed,
        public,
        public_removed,
    } = t.entries(reg);
    SnapshotDelta {
        from,
        version: reg.version,
        overlay_cidr: reg.net.overlay_cidr,
        overlay6_cidr: reg.net.overlay6_cidr,
        vni: reg.net.vni,
        hosts,
        hosts_removed,
        endpoints,
        endpoints_removed,
        public,
        public_removed,
        migrations: reg
            .migrations
            .values()
            .filter(|l| in_snapshot(&l.migration, now_ms))
            .map(|l| l.migration.clone())
            .collect(),
    }
}

/// What touched keys stand for in a registry: the entries as they are now, and the keys it
/// no longer holds (what a delta and a journal record both carry).
pub(crate) struct Changed {
    pub hosts: Vec<ferry_api::HostInfo>,
    pub hosts_removed: Vec<String>,
    pub endpoints: Vec<ferry_api::Endpoint>,
    pub endpoints_removed: Vec<Ipv4Addr>,
    pub public: Vec<ferry_api::PublicMapping>,
    /// Keys as text ([`ferry_api::PublicMapping::key`]).
    pub public_removed: Vec<String>,
}

impl Touched {
    /// These keys' entries in `reg`.
    pub(crate) fn entries(&self, reg: &Registry) -> Changed {
        let (hosts, hosts_removed) = split(&reg.hosts, &self.hosts, String::clone);
        let (endpoints, endpoints_removed) = split(&reg.endpoints, &self.endpoints, |ip| *ip);
        let (public, public_removed) = split(&reg.public, &self.public, PublicKey::to_string);
        Changed {
            hosts,
            hosts_removed,
            endpoints,
            endpoints_removed,
            public,
            public_removed,
        }
    }
}

/// The entries of `map` at `keys` as they are now, and (written by `removed`) the keys it no
/// longer holds.
pub(crate) fn split<K: Ord, V: Clone, R>(
    map: &SharedMap<K, V>,
    keys: &BTreeSet<K>,
    removed: impl Fn(&K) -> R,
) -> (Vec<V>, Vec<R>) {
    let (mut set, mut gone) = (Vec::new(), Vec::new());
    for k in keys {
        match map.get(k) {
            Some(v) => set.push(v.clone()),
            None => gone.push(removed(k)),
        }
    }
    (set, gone)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use ferry_api::{PublicSpec, Snapshot};

    use super::*;
    use crate::registry::{
        Request,
        testutil::{Dice, ep, host, net, random_request, whole},
    };

    /// Over random changes (hosts, endpoints, mappings, migrations moving endpoints), the
    /// delta from every earlier version the log covers, applied to that version's snapshot,
    /// is exactly the current snapshot; and it carries only what changed.
    #[test]
    fn a_delta_applied_to_an_old_snapshot_gives_the_current_one() {
        let mut d = Dice(0x9e37_79b9_7f4a_7c15);
        let mut r = Registry::new(net());
        let mut log = ChangeLog::default();
        let mut snapshots: BTreeMap<u64, Snapshot> = BTreeMap::new();
        let now = 1_000;
        snapshots.insert(0, r.snapshot(now));
        let mut deltas = 0;
        for _ in 0..1500 {
            let req = random_request(&r, &mut d, now);
            let mut next = r.clone();
            let Ok(change) = next.apply(req) else {
                continue;
            };
            if !change.changes_state() {
                continue;
            }
            log.record(next.version, touched(&r, &next));
            r = next;
            let current = r.snapshot(now);
            // The last 40 versions (every distance a lagging agent might be at).
            for (v, old) in snapshots.range(r.version.saturating_sub(40)..) {
                if let Some(t) = log.since(*v, r.version) {
                    let delta = delta(&r, *v, &t, now);
                    assert_eq!(
                        delta.apply_to(old).unwrap(),
                        current,
                        "delta {v} → {}",
                        r.version
                    );
                    deltas += 1;
                }
            }
            snapshots.insert(r.version, current);
        }
        assert!(
            r.version > 300,
            "the dice changed the registry often: {}",
            r.version
        );
        assert!(deltas > 5_000, "many deltas checked: {deltas}");
    }

    #[test]
    fn a_delta_carries_only_the_change() {
        let mut r = Registry::new(net());
        r.apply(Request::RegisterHost(host(
            "a1",
            "198.18.1.10",
            "10.244.255.1",
        )))
        .unwrap();
        let specs: Vec<_> = (0..2000u32)
            .map(|i| {
                ep(
                    &Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 244, 8, 0)) + i).to_string(),
                    "a1",
                )
            })
            .collect();
        r.apply(Request::AddEndpoints(specs)).unwrap();
        let before = r.clone();
        r.apply(Request::AddEndpoints(vec![ep("10.244.1.10", "a1")]))
            .unwrap();
        r.apply(Request::AddPublic(PublicSpec {
            public: "203.0.113.130".parse().unwrap(),
            public_port: None,
            container: "10.244.8.1".parse().unwrap(),
            container_port: None,
            proto: None,
        }))
        .unwrap();
        let mut log = ChangeLog::default();
        let mut prev = before.clone();
        // Replay the two changes into the log.
        for req in [
            Request::AddEndpoints(vec![ep("10.244.1.10", "a1")]),
            Request::AddPublic(whole("203.0.113.130", "10.244.8.1")),
        ] {
            let mut next = prev.clone();
            next.apply(req).unwrap();
            log.record(next.version, touched(&prev, &next));
            prev = next;
        }
        let t = log.since(before.version, r.version).unwrap();
        assert_eq!(
            (t.endpoints.len(), t.public.len(), t.hosts.len()),
            (1, 1, 0)
        );
        let d = delta(&r, before.version, &t, 0);
        let (full, small) = (
            serde_json::to_vec(&r.snapshot(0)).unwrap().len(),
            serde_json::to_vec(&d).unwrap().len(),
        );
        assert!(small * 100 < full, "delta {small} B, snapshot {full} B");
        assert_eq!(d.apply_to(&before.snapshot(0)).unwrap(), r.snapshot(0));
    }

    #[test]
    fn the_log_answers_only_what_it_covers() {
        let mut log = ChangeLog::default();
        let t = |ip: &str| Touched {
            endpoints: [ip.parse().unwrap()].into(),
            ..Touched::default()
        };
        assert_eq!(log.since(1, 2), None, "empty: nothing covered");
        log.record(5, t("10.0.0.5"));
        log.record(6, t("10.0.0.6"));
        assert_eq!(log.since(4, 6).unwrap().endpoints.len(), 2);
        assert_eq!(log.since(5, 6).unwrap().endpoints.len(), 1);
        assert_eq!(log.since(3, 6), None, "version 4 is not in the log");
        assert_eq!(
            log.since(0, 6),
            None,
            "0: the agent has nothing to apply a delta to"
        );
        assert_eq!(log.since(6, 6), None, "nothing new");
        assert_eq!(log.since(5, 7), None, "7 not recorded yet");
        // A gap starts over.
        log.record(9, t("10.0.0.9"));
        assert_eq!(log.span(), Some((9, 9)));
        assert_eq!(log.since(5, 9), None);
        for v in 10..10 + LOG_VERSIONS as u64 + 5 {
            log.record(v, t("10.0.0.1"));
        }
        let (first, last) = log.span().unwrap();
        assert_eq!(last - first + 1, LOG_VERSIONS as u64, "bounded");
    }
}
