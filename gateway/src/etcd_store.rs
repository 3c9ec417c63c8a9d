//! The registry on etcd, for several gateways sharing one registry.
//!
//! Layout under the prefix (default [`PREFIX`]):
//! - `head`: the registry's version (decimal). Every change is a transaction that compares
//!   `head` with the version it was made on (absent for the first), so of two gateways that
//!   make a change on the same version exactly one wins; the other reads what won, applies
//!   it, and tries its request again on the newer registry (where the reducer may refuse it).
//! - `log/<version, 20 digits>`: a [`LogEntry`] per version: the change's
//!   [`JournalRecord`] (what it touched, as the file store journals it), or a checkpoint.
//! - `snap`: the [`Pointer`] to the newest checkpoint; `snap/<id>/<chunk>`: the whole state in
//!   chunks under etcd's request size. A checkpoint is written every [`COMPACT_RECORDS`]
//!   changes, and for any change whose record would be too large for one request (a batch of
//!   65,536 endpoints): its chunks first (harmless until pointed to), then one transaction
//!   that moves `head` and `snap`, and deletes the log and the chunks it replaces.
//!
//! Reading is done at one etcd revision (the pointer, its chunks and the log after it), so a
//! checkpoint written meanwhile cannot mix in. Other gateways' changes arrive through a watch
//! of `log/` ([`crate::server::Gateway`]'s follower) and are applied in version order; a gap
//! (or a compacted revision) means reading everything again.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::{
    etcd::{Compare, EtcdError, Kv, Op, Txn, prefix_end},
    registry::Registry,
    store::{JournalRecord, PersistedState, StoreError},
};

pub const PREFIX: &str = "/ferry/registry/";
/// Changes between checkpoints.
pub const COMPACT_RECORDS: usize = 1024;
/// Largest value written in one request (etcd's default --max-request-bytes is 1.5 MiB).
pub const CHUNK: usize = 768 << 10;
/// How long a change whose answer etcd lost is resolved (a leader elected meanwhile)
/// before the change is reported as of unknown outcome.
const RESOLVE_FOR: std::time::Duration = std::time::Duration::from_secs(15);
/// How long a member gets to answer a change before its answer counts as lost (and the log
/// is read to find out). A change a follower forwarded to a leader that just died is dropped
/// by etcd without a word: the caller would otherwise wait out the request's whole timeout
/// (3 s) while the members elect a new leader in about one election timeout (1 s by
/// default). Above that, so that the read which follows finds a leader, and far above a
/// healthy change (a few round trips and an fsync). A change that was only slow is found
/// applied, never made twice (the compare).
const CHANGE_TXN_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(1500);
/// Log entries read per range.
const PAGE: i64 = 256;

/// Where a checkpoint is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pointer {
    pub version: u64,
    pub id: String,
    pub chunks: usize,
    pub bytes: usize,
}

/// One version in the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum LogEntry {
    Record(Box<JournalRecord>),
    /// The state at this version is the checkpoint.
    Checkpoint(Pointer),
}

/// The registry's store on etcd.
/// Whether a change that etcd says was not applied, after losing the answer to it, may be sent
/// again: given when the change began (see [`EtcdStore::set_resend_gate`]).
pub type ResendGate = Box<dyn Fn(std::time::Instant) -> bool + Send + Sync>;

pub struct EtcdStore {
    kv: Arc<dyn Kv>,
    prefix: String,
    /// Changes logged since the last checkpoint.
    since_checkpoint: Mutex<usize>,
    compact_records: usize,
    resend: std::sync::OnceLock<ResendGate>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("kv", &self.kv.describe())
            .field("prefix", &self.prefix)
            .finish()
    }
}

fn etcd(e: EtcdError) -> StoreError {
    StoreError::Etcd(e)
}

impl EtcdStore {
    pub fn new(kv: Arc<dyn Kv>, prefix: &str) -> Self {
        Self {
            kv,
            prefix: prefix.to_owned(),
            since_checkpoint: Mutex::new(0),
            compact_records: COMPACT_RECORDS,
            resend: std::sync::OnceLock::new(),
        }
    }

    /// A change whose answer etcd lost and that etcd then says was not applied is sent again
    /// only while `gate(began)` holds (the gateway: it has not been cut off from etcd's
    /// quorum since the change began, so its caller is still waiting for the answer). Else it
    /// is reported not applied: a caller already told "outcome unknown" must not find it
    /// applied later. Without a gate, it is sent again.
    pub fn set_resend_gate(&self, gate: ResendGate) {
        let _ = self.resend.set(gate);
    }

    /// The same, writing a checkpoint every `n` changes (tests).
    pub fn with_compaction(mut self, n: usize) -> Self {
        self.compact_records = n.max(1);
        self
    }

    pub fn describe(&self) -> String {
        format!("{} (prefix {})", self.kv.describe(), self.prefix)
    }

    pub fn kv(&self) -> &Arc<dyn Kv> {
        &self.kv
    }

    fn key(&self, k: &str) -> Vec<u8> {
        format!("{}{k}", self.prefix).into_bytes()
    }
    fn head_key(&self) -> Vec<u8> {
        self.key("head")
    }
    /// Where gateways publish what they know of their agents ([`crate::cluster`]).
    pub fn agents_prefix(&self) -> Vec<u8> {
        self.key("agents/")
    }
    /// Who drives container `c`'s run (a key on the driving gateway's lease).
    pub fn driver_key(&self, c: std::net::Ipv4Addr) -> Vec<u8> {
        self.key(&format!("drivers/{c}"))
    }
    /// The runs whose report says running: `running/<id>` → the container.
    pub fn running_prefix(&self) -> Vec<u8> {
        self.key("running/")
    }
    /// Run `id`'s report.
    pub fn report_key(&self, id: &str) -> Vec<u8> {
        self.key(&format!("runs/{id}"))
    }
    pub fn log_prefix(&self) -> Vec<u8> {
        self.key("log/")
    }
    fn log_key(&self, v: u64) -> Vec<u8> {
        self.key(&format!("log/{v:020}"))
    }
    fn snap_key(&self) -> Vec<u8> {
        self.key("snap")
    }
    fn chunk_prefix(&self, id: &str) -> Vec<u8> {
        self.key(&format!("snap/{id}/"))
    }

    /// The version a log key names.
    pub fn log_version(&self, key: &[u8]) -> Option<u64> {
        let rest = key.strip_prefix(self.log_prefix().as_slice())?;
        std::str::from_utf8(rest).ok()?.parse().ok()
    }

    /// `head` holds `version - 1` (is absent for version 1).
    fn follows(&self, version: u64) -> Compare {
        match version.saturating_sub(1) {
            0 => Compare::Absent(self.head_key()),
            prev => Compare::Value(self.head_key(), prev.to_string().into_bytes()),
        }
    }

    /// Persists the change to `version`: its record in the log, or (when a checkpoint is due
    /// or the record is too large or missing) the whole state `full()` as a checkpoint.
    /// [`StoreError::Conflict`]: another gateway changed the registry first (nothing written).
    pub fn append(
        &self,
        version: u64,
        record: Option<&JournalRecord>,
        full: impl FnOnce() -> PersistedState,
    ) -> Result<(), StoreError> {
        let mut since = self
            .since_checkpoint
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let entry = record
            .filter(|_| *since < self.compact_records)
            .map(|r| {
                serde_json::to_vec(&LogEntry::Record(Box::new(r.clone())))
                    .expect("records serialise")
            })
            .filter(|b| b.len() <= CHUNK);
        let Some(entry) = entry else {
            drop(since);
            return self.checkpoint(&full(), self.follows(version));
        };
        let txn = Txn {
            compare: vec![self.follows(version)],
            success: vec![
                Op::Put(self.log_key(version), entry.clone()),
                Op::Put(self.head_key(), version.to_string().into_bytes()),
            ],
        };
        let began = std::time::Instant::now();
        let deadline = began + RESOLVE_FOR;
        let mut lost = None;
        let mut sent = false;
        loop {
            // The answer to the last try was lost: find out what etcd holds before anything
            // else (the compare makes a second try harmless either way).
            if let Some(e) = lost.take() {
                match self.outcome(version, &entry) {
                    Ok(Some(true)) => break,
                    Ok(Some(false)) => return Err(StoreError::Conflict { version }),
                    Ok(None) if self.resend.get().is_some_and(|gate| !gate(began)) => {
                        tracing::warn!(
                            version,
                            "etcd did not apply a change whose answer it lost; not sending it again (its caller may have been told its outcome is unknown)"
                        );
                        return Err(StoreError::NotResent { version });
                    }
                    Ok(None) => {}
                    Err(_) if std::time::Instant::now() < deadline => {
                        lost = Some(e);
                        std::thread::sleep(std::time::Duration::from_millis(100));
                        continue;
                    }
                    Err(_) => return Err(etcd(e)),
                }
            }
            let resent = sent;
            sent = true;
            match self.kv.txn_within(&txn, CHANGE_TXN_TIMEOUT) {
                Ok(r) if r.succeeded => break,
                // Sent again after a lost answer: the first try may have been slow, not lost,
                // and be what now fails the compare.
                Ok(_) if resent => match self.outcome(version, &entry) {
                    Ok(Some(true)) => break,
                    Ok(_) => return Err(StoreError::Conflict { version }),
                    Err(e) => return Err(etcd(e)),
                },
                Ok(_) => return Err(StoreError::Conflict { version }),
                Err(e @ EtcdError::Unknown { .. }) if std::time::Instant::now() < deadline => {
                    tracing::warn!(version, error = %e, "etcd lost the answer to a change; finding out whether it was applied");
                    lost = Some(e);
                }
                Err(e) => return Err(etcd(e)),
            }
        }
        *since += 1;
        Ok(())
    }

    /// Whether the log holds `entry` at `version` (`Some(true)`), another change there
    /// (`Some(false)`), or nothing yet (`None`: etcd's linearizable read says the change was
    /// not applied, and a leader elected since will never apply it).
    fn outcome(&self, version: u64, entry: &[u8]) -> Result<Option<bool>, EtcdError> {
        let r = self.kv.range(&self.log_key(version), None, 0, 0)?;
        Ok(r.kvs.first().map(|kv| kv.value == entry))
    }

    /// Writes `state` whole as the checkpoint of its version if `expect` holds: chunks, then
    /// one transaction (head, pointer, the log's marker; the older log and chunks deleted).
    pub fn checkpoint(&self, state: &PersistedState, expect: Compare) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(state).expect("states serialise");
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        // Ids sort by version, so "every chunk below this id" is every older checkpoint.
        let id = format!("{:020}-{nanos:x}", state.version);
        let chunks: Vec<&[u8]> = bytes.chunks(CHUNK).collect();
        for (i, c) in chunks.iter().enumerate() {
            let mut key = self.chunk_prefix(&id);
            key.extend_from_slice(format!("{i:06}").as_bytes());
            self.kv
                .txn(&Txn {
                    compare: vec![],
                    success: vec![Op::Put(key, c.to_vec())],
                })
                .map_err(etcd)?;
        }
        let pointer = Pointer {
            version: state.version,
            id: id.clone(),
            chunks: chunks.len(),
            bytes: bytes.len(),
        };
        let marker =
            serde_json::to_vec(&LogEntry::Checkpoint(pointer.clone())).expect("pointers serialise");
        let txn = Txn {
            compare: vec![expect],
            success: vec![
                Op::DeleteRange(self.log_prefix(), self.log_key(state.version)),
                Op::Put(self.log_key(state.version), marker),
                Op::Put(
                    self.snap_key(),
                    serde_json::to_vec(&pointer).expect("pointers serialise"),
                ),
                Op::DeleteRange(self.key("snap/"), self.chunk_prefix(&id)),
                Op::Put(self.head_key(), state.version.to_string().into_bytes()),
            ],
        };
        let won = self.kv.txn(&txn);
        if !matches!(won, Ok(r) if r.succeeded) {
            // Ours were never pointed to: take them back (a failure leaves garbage that the
            // next checkpoint deletes).
            let prefix = self.chunk_prefix(&id);
            let _ = self.kv.txn(&Txn {
                compare: vec![],
                success: vec![Op::DeleteRange(prefix.clone(), prefix_end(&prefix))],
            });
            return match won {
                Err(e) => Err(etcd(e)),
                Ok(_) => Err(StoreError::Conflict {
                    version: state.version,
                }),
            };
        }
        *self
            .since_checkpoint
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = 0;
        Ok(())
    }

    /// Reads a checkpoint's chunks at `revision`.
    pub fn read_checkpoint(
        &self,
        p: &Pointer,
        revision: i64,
    ) -> Result<PersistedState, StoreError> {
        let prefix = self.chunk_prefix(&p.id);
        let mut bytes = Vec::with_capacity(p.bytes);
        for i in 0..p.chunks {
            let mut key = prefix.clone();
            key.extend_from_slice(format!("{i:06}").as_bytes());
            let r = self.kv.range(&key, None, revision, 0).map_err(etcd)?;
            let Some(kv) = r.kvs.into_iter().next() else {
                return Err(self.corrupt(format!(
                    "checkpoint {} lacks chunk {i} of {}",
                    p.id, p.chunks
                )));
            };
            bytes.extend_from_slice(&kv.value);
        }
        serde_json::from_slice(&bytes)
            .map_err(|e| self.corrupt(format!("checkpoint {}: {e}", p.id)))
    }

    fn corrupt(&self, problem: String) -> StoreError {
        StoreError::EtcdCorrupt {
            at: self.describe(),
            problem,
        }
    }

    /// Log entries after `version`, read at `revision` (0: the newest), with the revision
    /// read at.
    pub fn entries_after(
        &self,
        version: u64,
        revision: i64,
    ) -> Result<(Vec<(u64, LogEntry)>, i64), StoreError> {
        let end = prefix_end(&self.log_prefix());
        let mut from = self.log_key(version + 1);
        let mut out = Vec::new();
        let mut at = revision;
        loop {
            let r = self.kv.range(&from, Some(&end), at, PAGE).map_err(etcd)?;
            if at == 0 {
                at = r.revision;
            }
            for kv in &r.kvs {
                let v = self.log_version(&kv.key).ok_or_else(|| {
                    self.corrupt(format!("log key {:?}", String::from_utf8_lossy(&kv.key)))
                })?;
                let e: LogEntry = serde_json::from_slice(&kv.value)
                    .map_err(|e| self.corrupt(format!("log entry {v}: {e}")))?;
                out.push((v, e));
            }
            match (r.more, r.kvs.last()) {
                (true, Some(last)) => {
                    from = last.key.clone();
                    from.push(0);
                }
                _ => return Ok((out, at)),
            }
        }
    }

    /// The whole registry (`None`: etcd holds none) and the revision it was read at.
    pub fn load(&self) -> Result<(Option<PersistedState>, i64), StoreError> {
        let head = self.kv.range(&self.head_key(), None, 0, 0).map_err(etcd)?;
        let revision = head.revision;
        let Some(head) = head.kvs.into_iter().next() else {
            return Ok((None, revision));
        };
        let head: u64 = std::str::from_utf8(&head.value)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| self.corrupt("head is not a version".into()))?;
        let snap = self
            .kv
            .range(&self.snap_key(), None, revision, 0)
            .map_err(etcd)?;
        let mut state = match snap.kvs.into_iter().next() {
            Some(kv) => {
                let p: Pointer = serde_json::from_slice(&kv.value)
                    .map_err(|e| self.corrupt(format!("snap pointer: {e}")))?;
                self.read_checkpoint(&p, revision)?
            }
            None => PersistedState::empty(),
        };
        let (entries, _) = self.entries_after(state.version, revision)?;
        for (v, e) in entries {
            state = self.apply_state(state, v, e, revision)?;
        }
        if state.version != head {
            return Err(self.corrupt(format!(
                "the log ends at version {} but head says {head}",
                state.version
            )));
        }
        *self
            .since_checkpoint
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = 0;
        Ok((Some(state), revision))
    }

    fn apply_state(
        &self,
        mut state: PersistedState,
        version: u64,
        entry: LogEntry,
        revision: i64,
    ) -> Result<PersistedState, StoreError> {
        match entry {
            LogEntry::Record(r) => {
                if r.version != version {
                    return Err(
                        self.corrupt(format!("log key {version} holds version {}", r.version))
                    );
                }
                state
                    .apply(*r)
                    .map_err(|p| self.corrupt(format!("log entry {version}: {p}")))?;
                Ok(state)
            }
            LogEntry::Checkpoint(p) => self.read_checkpoint(&p, revision),
        }
    }

    /// `reg` with the entry of `version` (the next one) applied; a checkpoint read at
    /// `revision`.
    pub fn apply_entry(
        &self,
        reg: &Registry,
        version: u64,
        entry: LogEntry,
        revision: i64,
    ) -> Result<Registry, StoreError> {
        match entry {
            // The record alone: the cost of the change, not of the registry.
            LogEntry::Record(r) => {
                if r.version != version {
                    return Err(
                        self.corrupt(format!("log key {version} holds version {}", r.version))
                    );
                }
                let mut next = reg.clone();
                next.apply_record(*r)
                    .map_err(|e| self.corrupt(format!("log entry {version}: {e}")))?;
                Ok(next)
            }
            LogEntry::Checkpoint(p) => {
                let state = self.read_checkpoint(&p, revision)?;
                self.registry(reg.net(), state)
            }
        }
    }

    /// `state` as a registry under `net` (one that does not load is corruption of the store).
    pub fn registry(
        &self,
        net: &crate::registry::NetConfig,
        state: PersistedState,
    ) -> Result<Registry, StoreError> {
        let version = state.version;
        Registry::from_persisted(net.clone(), state)
            .map_err(|e| self.corrupt(format!("version {version} does not load: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        etcd::fake::FakeKv,
        registry::testutil::{Dice, ep, host, net, random_request},
    };

    /// What a gateway does per change, against `store`: apply, diff, append; on a conflict,
    /// catch up and try again.
    fn change(store: &EtcdStore, reg: &mut Registry, req: crate::registry::Request) -> bool {
        CONFLICTS.with(|c| c.set(c.get()));
        for attempt in 0..4 {
            if attempt > 0 {
                CONFLICTS.with(|c| c.set(c.get() + 1));
            }
            let mut next = reg.clone();
            if next.apply(req.clone()).is_err() {
                return false;
            }
            if next.version() == reg.version() {
                return false;
            }
            let touched = crate::watch::touched(reg, &next);
            let record = next.journal_record(reg, &touched);
            match store.append(next.version(), record.as_ref(), || next.to_persisted()) {
                Ok(()) => {
                    *reg = next;
                    return true;
                }
                Err(StoreError::Conflict { .. }) => catch_up(store, reg),
                Err(e) => panic!("{e}"),
            }
        }
        panic!("no progress");
    }

    thread_local! {
        static CONFLICTS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    fn catch_up(store: &EtcdStore, reg: &mut Registry) {
        let (entries, rev) = store.entries_after(reg.version(), 0).unwrap();
        for (v, e) in entries {
            *reg = store.apply_entry(reg, v, e, rev).unwrap();
        }
    }

    #[test]
    fn random_changes_through_two_gateways_load_as_the_registry_in_memory() {
        let kv: Arc<dyn Kv> = Arc::new(FakeKv::default());
        let a = EtcdStore::new(kv.clone(), PREFIX).with_compaction(9);
        let b = EtcdStore::new(kv.clone(), PREFIX).with_compaction(13);
        let (mut ra, mut rb) = (Registry::new(net()), Registry::new(net()));
        let mut dice = Dice(0x9e37_79b9_7f4a_7c15);
        let mut won = 0;
        for i in 0..600 {
            let req = random_request(&ra, &mut dice, 1_000_000 + i);
            // Both gateways make the same request on the same version: at most one wins.
            catch_up(&a, &mut ra);
            catch_up(&b, &mut rb);
            assert_eq!(ra, rb);
            let before = ra.version();
            let wa = change(&a, &mut ra, req.clone());
            let wb = change(&b, &mut rb, req);
            catch_up(&a, &mut ra);
            catch_up(&b, &mut rb);
            assert_eq!(ra, rb, "after change {i}");
            won += usize::from(wa || wb);
            let (loaded, _) = a.load().unwrap();
            let loaded = loaded.map(|s| Registry::from_persisted(net(), s).unwrap());
            let expect = (ra.version() > 0).then(|| ra.clone());
            assert_eq!(
                loaded, expect,
                "a restart after change {i} loads what is in memory"
            );
            assert!(ra.version() >= before);
        }
        let conflicts = CONFLICTS.with(|c| c.get());
        assert!(won > 100, "only {won} changes applied");
        assert!(
            conflicts >= won,
            "{conflicts} conflicts for {won} changes: the second gateway never lost"
        );
    }

    /// Version 1 (a1 registered) and its journal record.
    fn first_change() -> (Registry, Option<JournalRecord>) {
        first_host_change("a1", "198.18.1.10", "10.244.255.1")
    }

    /// Version 1 (host `name` registered) and its journal record.
    fn first_host_change(
        name: &str,
        underlay: &str,
        gateway: &str,
    ) -> (Registry, Option<JournalRecord>) {
        let reg = Registry::new(net());
        let mut next = reg.clone();
        next.apply(crate::registry::Request::RegisterHost(host(
            name, underlay, gateway,
        )))
        .unwrap();
        let t = crate::watch::touched(&reg, &next);
        let rec = next.journal_record(&reg, &t);
        (next, rec)
    }

    /// A change whose answer etcd lost, and that etcd then says it did not apply, is sent
    /// again only while the gate allows (the gateway was not cut off meanwhile: its caller
    /// still waits); else it is reported not applied and never applied later.
    #[test]
    fn a_lost_change_is_sent_again_only_while_its_caller_still_waits() {
        let one = |gate: Option<bool>| {
            let fake = Arc::new(FakeKv::default());
            let kv: Arc<dyn Kv> = fake.clone();
            let s = EtcdStore::new(kv, PREFIX);
            if let Some(open) = gate {
                s.set_resend_gate(Box::new(move |_| open));
            }
            let (next, rec) = first_change();
            fake.lose_next_txn
                .store(true, std::sync::atomic::Ordering::Relaxed);
            let r = s.append(1, rec.as_ref(), || next.to_persisted());
            let stored = s.load().unwrap().0.map(|p| p.version);
            (r, stored)
        };
        let (r, stored) = one(None);
        assert!(r.is_ok(), "no gate: sent again: {r:?}");
        assert_eq!(stored, Some(1));
        let (r, stored) = one(Some(true));
        assert!(r.is_ok(), "gate open: sent again: {r:?}");
        assert_eq!(stored, Some(1));
        let (r, stored) = one(Some(false));
        let e = r.expect_err("gate closed: not sent again");
        assert!(matches!(e, StoreError::NotResent { version: 1 }), "{e}");
        assert!(
            e.unavailable() && !e.outcome_unknown(),
            "reported not applied: {e}"
        );
        assert_eq!(stored, None, "and not applied");
    }

    /// A change whose answer was lost because it was slow, not dropped: the log read after
    /// it does not see it yet, it is sent again, and the second try fails the compare because
    /// the first one has since been applied. That is this change's success, not a conflict.
    #[test]
    fn a_slow_change_sent_again_is_found_applied_not_taken_for_a_conflict() {
        let fake = Arc::new(FakeKv::default());
        let kv: Arc<dyn Kv> = fake.clone();
        let s = EtcdStore::new(kv.clone(), PREFIX);
        let (next, rec) = first_change();
        fake.late_next_txn
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let r = s.append(1, rec.as_ref(), || next.to_persisted());
        assert!(r.is_ok(), "{r:?}");
        assert_eq!(s.load().unwrap().0.map(|p| p.version), Some(1));
        // Another gateway's different change at the same version, its answer lost too: the
        // log holds the first one there, so it conflicts.
        let other = EtcdStore::new(kv, PREFIX);
        let (next, rec) = first_host_change("b1", "198.18.2.10", "10.244.255.2");
        fake.late_next_txn
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let lost = other.append(1, rec.as_ref(), || next.to_persisted());
        assert!(
            matches!(lost, Err(StoreError::Conflict { version: 1 })),
            "{lost:?}"
        );
    }

    #[test]
    fn the_same_change_on_the_same_version_wins_once() {
        let kv: Arc<dyn Kv> = Arc::new(FakeKv::default());
        let a = EtcdStore::new(kv.clone(), PREFIX);
        let b = EtcdStore::new(kv.clone(), PREFIX);
        let (next, rec) = first_change();
        a.append(1, rec.as_ref(), || next.to_persisted()).unwrap();
        let lost = b.append(1, rec.as_ref(), || next.to_persisted());
        assert!(
            matches!(lost, Err(StoreError::Conflict { version: 1 })),
            "{lost:?}"
        );
        assert_eq!(a.load().unwrap().0.unwrap().version, 1);
    }

    #[test]
    fn a_record_too_large_for_one_request_becomes_a_checkpoint_and_loads() {
        let fake = Arc::new(FakeKv::default());
        *fake.max_request.lock().unwrap() = Some(CHUNK + 4096);
        let kv: Arc<dyn Kv> = fake.clone();
        let s = EtcdStore::new(kv, PREFIX);
        let mut reg = Registry::new(net());
        let h = host("a1", "198.18.1.10", "10.244.255.1");
        assert!(change(
            &s,
            &mut reg,
            crate::registry::Request::RegisterHost(h)
        ));
        let specs = (0..40_000u32)
            .map(|i| {
                let ip =
                    std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 244, 1, 0)) + i);
                ep(&ip.to_string(), "a1")
            })
            .collect();
        assert!(change(
            &s,
            &mut reg,
            crate::registry::Request::AddEndpoints(specs)
        ));
        let (loaded, _) = s.load().unwrap();
        let loaded = Registry::from_persisted(net(), loaded.unwrap()).unwrap();
        assert_eq!(loaded, reg);
        assert_eq!(loaded.endpoint_count(), 40_000);
    }

    #[test]
    fn etcd_down_refuses_the_change_and_writes_nothing() {
        let fake = Arc::new(FakeKv::default());
        let kv: Arc<dyn Kv> = fake.clone();
        let s = EtcdStore::new(kv, PREFIX);
        let (next, _) = first_change();
        fake.down.store(true, std::sync::atomic::Ordering::Relaxed);
        let e = s.append(1, None, || next.to_persisted()).unwrap_err();
        assert!(e.to_string().contains("etcd unreachable"), "{e}");
        fake.down.store(false, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(s.load().unwrap().0, None);
        assert_eq!(fake.revision(), 0);
    }
}
