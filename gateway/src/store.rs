//! Persistence of the registry: `STATE_DIR/registry.json`, a whole state replaced atomically
//! (write a temporary file, fsync it, rename it over the old one, fsync the directory), and
//! `STATE_DIR/registry.journal`, the changes since, one JSON line each ([`JournalRecord`]:
//! the entries a change touched, not the registry), appended and fsynced before the change
//! is answered. A change costs what it touched, not the registry's size; every
//! [`COMPACT_RECORDS`] changes (or [`COMPACT_BYTES`] of journal) the state is written whole
//! and the journal emptied.
//!
//! Crashes: a rename leaves the old or the new `registry.json`, never a mix; a journal line
//! cut short by a crash (no newline: its change was never answered) is ignored when read and
//! cut off when the gateway starts; records at or below `registry.json`'s version (a crash
//! between writing it and emptying the journal) are skipped. A journal that does not follow
//! on (a gap, a line that does not parse) is corruption: the gateway refuses to start and
//! names the file and line.
//!
//! A state file that does not parse is never overwritten: the gateway refuses to start and
//! names it. `STATE_DIR/lock` (an advisory lock held while the daemon runs) keeps two gateways
//! from sharing one state directory.

use std::{
    collections::BTreeMap,
    fs::{self, File, OpenOptions},
    io::{self, Write as _},
    net::Ipv4Addr,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    sync::Mutex,
};

use ferry_api::{Endpoint, HostInfo, IpamLease, Migration, PublicMapping};
use serde::{Deserialize, Serialize};

use crate::registry::LiveMigration;

pub const STATE_FILE: &str = "registry.json";
pub const JOURNAL_FILE: &str = "registry.journal";
/// Changes kept in the journal before the state is written whole.
pub const COMPACT_RECORDS: usize = 1024;
/// Bytes of journal before the state is written whole.
pub const COMPACT_BYTES: u64 = 16 << 20;
const LOCK_FILE: &str = "lock";

/// What is on disk. Runtime facts (applied versions, connections) are not persisted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PersistedState {
    pub format: u32,
    pub version: u64,
    pub hosts: Vec<HostInfo>,
    pub endpoints: Vec<Endpoint>,
    pub public: Vec<PublicMapping>,
    /// Live migrations (prepared, frozen, released and maybe still forwarding). Absent in files
    /// written before migrations existed.
    #[serde(default)]
    pub migrations: Vec<LiveMigration>,
    /// Finished migrations, oldest first.
    #[serde(default)]
    pub migration_history: Vec<Migration>,
    /// The number of the next migration id.
    #[serde(default = "first_migration")]
    pub next_migration: u64,
    /// IPAM leases (absent in files written before the CNI plugin).
    #[serde(default)]
    pub ipam: Vec<IpamLease>,
    /// Where the next address search starts (an offset in the pool).
    #[serde(default)]
    pub ipam_next: u64,
}

fn first_migration() -> u64 {
    1
}

impl PersistedState {
    pub const FORMAT: u32 = 1;

    /// The registry at version 0.
    pub fn empty() -> Self {
        Self {
            format: Self::FORMAT,
            version: 0,
            hosts: Vec::new(),
            endpoints: Vec::new(),
            public: Vec::new(),
            migrations: Vec::new(),
            migration_history: Vec::new(),
            next_migration: first_migration(),
            ipam: Vec::new(),
            ipam_next: 0,
        }
    }

    /// Applies the change of version `self.version + 1`.
    pub fn apply(&mut self, r: JournalRecord) -> Result<(), String> {
        if Some(r.version) != self.version.checked_add(1) {
            return Err(format!(
                "record of version {} does not follow version {}",
                r.version, self.version
            ));
        }
        fn merge<K: Ord, V>(
            have: &mut Vec<V>,
            key: impl Fn(&V) -> K,
            removed: impl IntoIterator<Item = K>,
            set: Vec<V>,
        ) {
            let removed: Vec<K> = removed.into_iter().collect();
            // A record of a few entries is edited in by binary search (a restart replays up
            // to COMPACT_RECORDS of them onto a state of any size); a large one, or a list
            // out of order (a state file edited by hand), is merged.
            if removed.len() + set.len() <= 64 && have.is_sorted_by(|a, b| key(a) < key(b)) {
                for k in removed {
                    if let Ok(i) = have.binary_search_by(|v| key(v).cmp(&k)) {
                        have.remove(i);
                    }
                }
                for v in set {
                    let k = key(&v);
                    match have.binary_search_by(|x| key(x).cmp(&k)) {
                        Ok(i) => have[i] = v,
                        Err(i) => have.insert(i, v),
                    }
                }
                return;
            }
            let mut m: BTreeMap<K, V> = std::mem::take(have)
                .into_iter()
                .map(|v| (key(&v), v))
                .collect();
            for k in removed {
                m.remove(&k);
            }
            m.extend(set.into_iter().map(|v| (key(&v), v)));
            *have = m.into_values().collect();
        }
        merge(
            &mut self.hosts,
            |h: &HostInfo| h.name.clone(),
            r.hosts_removed,
            r.hosts,
        );
        merge(
            &mut self.endpoints,
            |e: &Endpoint| e.ip,
            r.endpoints_removed,
            r.endpoints,
        );
        let removed: Vec<ferry_api::PublicKey> = r
            .public_removed
            .iter()
            .map(|k| k.parse().map_err(|e| format!("public key {k:?}: {e}")))
            .collect::<Result<_, _>>()?;
        merge(
            &mut self.public,
            PublicMapping::public_key,
            removed,
            r.public,
        );
        merge(&mut self.ipam, |l: &IpamLease| l.ip, r.ipam_removed, r.ipam);
        self.migrations = r.migrations;
        self.migration_history.extend(r.history_push);
        let extra = self.migration_history.len().saturating_sub(r.history_len);
        self.migration_history.drain(..extra);
        self.next_migration = r.next_migration;
        self.ipam_next = r.ipam_next;
        self.version = r.version;
        Ok(())
    }
}

/// One change in the journal: what it touched, as it is after the change (hosts, endpoints,
/// public mappings and leases set or removed), the live migrations (a handful) whole, the
/// migrations it moved to the history, and the counters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JournalRecord {
    pub version: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<HostInfo>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts_removed: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<Endpoint>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints_removed: Vec<Ipv4Addr>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub public: Vec<PublicMapping>,
    /// Keys ([`PublicMapping::key`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub public_removed: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ipam: Vec<IpamLease>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ipam_removed: Vec<Ipv4Addr>,
    #[serde(default)]
    pub migrations: Vec<LiveMigration>,
    /// Appended to the history, whose length is then `history_len` (the oldest dropped).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history_push: Vec<Migration>,
    pub history_len: usize,
    pub next_migration: u64,
    pub ipam_next: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state dir {}: {source}", path.display())]
    Dir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "state dir {} is in use by another gateway (its lock file {} is locked)",
        path.display(),
        path.join(LOCK_FILE).display()
    )]
    Locked { path: PathBuf },
    #[error("reading {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{} is not a valid registry state: {source}; the file was left untouched: repair or \
         move it away",
        path.display()
    )]
    Corrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("writing {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{} line {line}: {problem}; the journal was left untouched: repair or move it (and \
         {STATE_FILE}) away",
        path.display()
    )]
    Journal {
        path: PathBuf,
        line: usize,
        problem: String,
    },
    #[error("the registry's store: {0}")]
    Etcd(#[source] crate::etcd::EtcdError),
    #[error(
        "the registry in {at} is not valid: {problem}; it was left untouched: repair it or \
         import a good state (ferry gateway --import)"
    )]
    EtcdCorrupt { at: String, problem: String },
    /// Another gateway made version `version` first (nothing was written).
    #[error("another gateway changed the registry to version {version} first")]
    Conflict { version: u64 },
    /// etcd lost the answer to version `version`'s change, then said it was not applied; it
    /// was not sent again (this gateway was cut off from etcd's quorum meanwhile).
    #[error(
        "etcd lost the answer to the change to version {version} and then said it was not \
         applied; it was not sent again, this gateway having been cut off from etcd's quorum \
         meanwhile"
    )]
    NotResent { version: u64 },
}

impl StoreError {
    /// The change may have been persisted (the store's answer was lost).
    pub fn outcome_unknown(&self) -> bool {
        matches!(
            self,
            StoreError::Etcd(crate::etcd::EtcdError::Unknown { .. })
        )
    }
    /// The store could not be reached or refused (not a local disk or corruption problem).
    pub fn unavailable(&self) -> bool {
        matches!(self, StoreError::Etcd(_) | StoreError::NotResent { .. })
    }
}

/// Where the registry is kept: the file store (one gateway), or etcd (any number).
#[derive(Debug)]
pub enum Backend {
    File(Store),
    Etcd(crate::etcd_store::EtcdStore),
}

impl Backend {
    /// Persists the change to `version` (see [`Store::append`], [`crate::etcd_store::EtcdStore::append`]).
    pub fn append(
        &self,
        version: u64,
        record: Option<&JournalRecord>,
        full: impl FnOnce() -> PersistedState,
    ) -> Result<(), StoreError> {
        match self {
            Backend::File(s) => s.append(record, full),
            Backend::Etcd(s) => s.append(version, record, full),
        }
    }

    /// Where it is (logs).
    pub fn describe(&self) -> String {
        match self {
            Backend::File(s) => s.path().display().to_string(),
            Backend::Etcd(s) => s.describe(),
        }
    }

    pub fn etcd(&self) -> Option<&crate::etcd_store::EtcdStore> {
        match self {
            Backend::Etcd(s) => Some(s),
            Backend::File(_) => None,
        }
    }
}

/// What the journal holds now (for when to write the state whole).
#[derive(Debug, Default)]
struct JournalLen {
    records: usize,
    bytes: u64,
    /// A failed append may have left part of a line: the next change writes the state whole
    /// (which empties the journal).
    dirty: bool,
}

/// The state directory, locked for this process.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    _lock: File,
    journal: Mutex<JournalLen>,
    compact_records: usize,
}

impl Store {
    /// Creates the directory if needed and takes its lock.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let dir_err = |source| StoreError::Dir {
            path: dir.to_path_buf(),
            source,
        };
        ferry_api::private::create_dir(dir).map_err(dir_err)?;
        let lock = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(dir.join(LOCK_FILE))
            .map_err(dir_err)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                return Err(StoreError::Locked {
                    path: dir.to_path_buf(),
                });
            }
            Err(fs::TryLockError::Error(e)) => return Err(dir_err(e)),
        }
        let store = Self {
            dir: dir.to_path_buf(),
            _lock: lock,
            journal: Mutex::default(),
            compact_records: COMPACT_RECORDS,
        };
        store.cut_torn_tail()?;
        Ok(store)
    }

    /// The same, writing the state whole every `n` changes (tests).
    pub fn with_compaction(mut self, n: usize) -> Self {
        self.compact_records = n.max(1);
        self
    }

    fn journal_path(&self) -> PathBuf {
        self.dir.join(JOURNAL_FILE)
    }

    /// Cuts a last journal line that a crash left without its newline (its change was never
    /// answered), and counts what the journal holds.
    fn cut_torn_tail(&self) -> Result<(), StoreError> {
        let path = self.journal_path();
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(source) => return Err(StoreError::Read { path, source }),
        };
        let good = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        if good < bytes.len() {
            tracing::warn!(
                journal = %path.display(), cut = bytes.len() - good,
                "cutting a journal line a crash left unfinished (its change was never answered)"
            );
            let f = OpenOptions::new()
                .write(true)
                .open(&path)
                .map_err(|source| StoreError::Write {
                    path: path.clone(),
                    source,
                })?;
            f.set_len(good as u64)
                .and_then(|()| f.sync_all())
                .map_err(|source| StoreError::Write {
                    path: path.clone(),
                    source,
                })?;
        }
        let mut j = self.journal.lock().unwrap_or_else(|e| e.into_inner());
        j.records = bytes[..good].iter().filter(|b| **b == b'\n').count();
        j.bytes = good as u64;
        Ok(())
    }

    /// Persists one change: appended to the journal (and fsynced), or, when the journal is
    /// due (or has no base yet), the whole state `full()` written and the journal emptied.
    pub fn append(
        &self,
        record: Option<&JournalRecord>,
        full: impl FnOnce() -> PersistedState,
    ) -> Result<(), StoreError> {
        let mut j = self.journal.lock().unwrap_or_else(|e| e.into_inner());
        let due = j.dirty
            || j.records >= self.compact_records
            || j.bytes >= COMPACT_BYTES
            || !self.path().exists();
        let Some(record) = record.filter(|_| !due) else {
            drop(j);
            return self.save(&full());
        };
        let path = self.journal_path();
        let mut line = serde_json::to_vec(record).map_err(|e| StoreError::Write {
            path: path.clone(),
            source: io::Error::other(e),
        })?;
        line.push(b'\n');
        let written = (|| {
            let mut f = OpenOptions::new()
                .append(true)
                .create(true)
                .mode(0o600)
                .open(&path)?;
            f.write_all(&line)?;
            f.sync_data()
        })();
        if let Err(source) = written {
            // Take back what may have been written; if even that fails, the next change
            // writes the state whole (and empties the journal).
            let back = OpenOptions::new()
                .write(true)
                .open(&path)
                .and_then(|f| f.set_len(j.bytes).and_then(|()| f.sync_all()));
            j.dirty = back.is_err();
            return Err(StoreError::Write { path, source });
        }
        j.records += 1;
        j.bytes += line.len() as u64;
        Ok(())
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    pub fn load(&self) -> Result<Option<PersistedState>, StoreError> {
        read_state(&self.dir)
    }

    /// Writes the state whole, then empties the journal (a crash in between leaves records
    /// at or below the state's version, which reading skips).
    pub fn save(&self, state: &PersistedState) -> Result<(), StoreError> {
        let path = self.path();
        let mut bytes = serde_json::to_vec(state).map_err(|e| StoreError::Write {
            path: path.clone(),
            source: io::Error::other(e),
        })?;
        bytes.push(b'\n');
        write_atomic(&path, &bytes).map_err(|source| StoreError::Write { path, source })?;
        let mut j = self.journal.lock().unwrap_or_else(|e| e.into_inner());
        let journal = self.journal_path();
        let emptied = match OpenOptions::new().write(true).open(&journal) {
            Ok(f) => f.set_len(0).and_then(|()| f.sync_all()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        };
        match emptied {
            Ok(()) => *j = JournalLen::default(),
            // The state on disk is the new one; the journal's records are all at or below
            // it (skipped when read): harmless, emptied by the next whole write.
            Err(e) => {
                tracing::error!(journal = %journal.display(), error = %e, "emptying the journal");
                j.dirty = true;
            }
        }
        Ok(())
    }
}

/// Reads `dir/registry.json` and the journal's changes since, without locking (also for
/// `--check`; a last line without its newline is ignored). `None`: no state yet.
pub fn read_state(dir: &Path) -> Result<Option<PersistedState>, StoreError> {
    let path = dir.join(STATE_FILE);
    let journal_path = dir.join(JOURNAL_FILE);
    let journal = match fs::read(&journal_path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(source) => {
            return Err(StoreError::Read {
                path: journal_path,
                source,
            });
        }
    };
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if journal.contains(&b'\n') {
                return Err(StoreError::Journal {
                    path: journal_path,
                    line: 1,
                    problem: format!("changes without their base {STATE_FILE}"),
                });
            }
            return Ok(None);
        }
        Err(source) => return Err(StoreError::Read { path, source }),
    };
    let mut state: PersistedState =
        serde_json::from_slice(&bytes).map_err(|source| StoreError::Corrupt { path, source })?;
    let good = journal
        .iter()
        .rposition(|b| *b == b'\n')
        .map_or(0, |i| i + 1);
    for (i, line) in journal[..good].split(|b| *b == b'\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        let bad = |problem: String| StoreError::Journal {
            path: journal_path.clone(),
            line: i + 1,
            problem,
        };
        let record: JournalRecord = serde_json::from_slice(line).map_err(|e| bad(e.to_string()))?;
        if record.version <= state.version {
            continue;
        }
        state.apply(record).map_err(bad)?;
    }
    Ok(Some(state))
}

/// Replaces `path` with `bytes` atomically and durably. On error the old file is untouched.
///
/// Once the rename has happened the new content is what a reader (and a restart) sees, so a
/// failure to fsync the directory afterwards is logged, not returned: returning it would make
/// the caller keep the old state in memory while the new one is on disk.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    let written = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        if tmp.is_file() {
            let _ = fs::remove_file(&tmp);
        }
        return Err(e);
    }
    if let Err(e) = File::open(dir).and_then(|d| d.sync_all()) {
        tracing::error!(
            dir = %dir.display(), error = %e,
            "fsync of the state directory failed: the new state is in place but may not survive a crash"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_api::{HostRole, MacAddr};

    fn state(version: u64) -> PersistedState {
        PersistedState {
            format: PersistedState::FORMAT,
            version,
            hosts: vec![HostInfo {
                name: "a1".into(),
                vtep: "198.18.1.10".parse().unwrap(),
                overlay_ip: "10.244.255.1".parse().unwrap(),
                role: HostRole::Host,
                active_since: None,
            }],
            endpoints: vec![Endpoint {
                ip: "10.244.1.5".parse().unwrap(),
                host: "a1".into(),
                mac: MacAddr::for_container("10.244.1.5".parse().unwrap()),
            }],
            public: vec![],
            migrations: vec![],
            migration_history: vec![],
            next_migration: 1,
            ipam: vec![],
            ipam_next: 0,
        }
    }

    #[test]
    fn files_without_migrations_still_load() {
        let dir = tempfile::tempdir().unwrap();
        let json = r#"{"format":1,"version":1,"hosts":[{"name":"a1","vtep":"198.18.1.10","overlay_ip":"10.244.255.1","role":"host"}],"endpoints":[],"public":[]}"#;
        fs::write(dir.path().join(STATE_FILE), json).unwrap();
        let s = read_state(dir.path()).unwrap().unwrap();
        assert!(s.migrations.is_empty() && s.migration_history.is_empty());
        assert_eq!(s.next_migration, 1);
        assert!(s.ipam.is_empty() && s.ipam_next == 0);
    }

    #[test]
    fn round_trip_and_no_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("state");
        let store = Store::open(&sub).unwrap();
        assert_eq!(store.load().unwrap(), None);
        store.save(&state(2)).unwrap();
        assert_eq!(store.load().unwrap(), Some(state(2)));
        store.save(&state(3)).unwrap();
        assert_eq!(read_state(&sub).unwrap(), Some(state(3)));
        let mut names: Vec<String> = fs::read_dir(&sub)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["lock", "registry.json"]);
        use std::os::unix::fs::PermissionsExt as _;
        let mode = fs::metadata(store.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn failed_write_leaves_the_old_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.save(&state(1)).unwrap();
        let before = fs::read(store.path()).unwrap();
        // Make the temporary file impossible to create.
        fs::create_dir(dir.path().join("registry.json.tmp")).unwrap();
        let e = store.save(&state(2)).unwrap_err();
        assert!(e.to_string().contains("registry.json"), "{e}");
        assert_eq!(fs::read(store.path()).unwrap(), before);
        assert_eq!(store.load().unwrap(), Some(state(1)));
    }

    #[test]
    fn corrupt_file_is_refused_and_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(STATE_FILE);
        for garbage in [
            &b"{\"format\":1,\"version\":3,"[..],
            b"not json",
            b"{\"format\":1,\"version\":3,\"hosts\":[],\"endpoints\":[],\"public\":[],\"x\":1}",
        ] {
            fs::write(&path, garbage).unwrap();
            let store = Store::open(dir.path()).unwrap();
            let e = store.load().unwrap_err();
            assert!(matches!(e, StoreError::Corrupt { .. }), "{e}");
            let msg = e.to_string();
            assert!(msg.contains(&path.display().to_string()), "{msg}");
            assert!(msg.contains("line 1 column"), "{msg}");
            assert_eq!(fs::read(&path).unwrap(), garbage);
        }
    }

    use crate::registry::{
        Registry,
        testutil::{Dice, net, random_request},
    };

    /// The state as the gateway would load it: the file and the journal, checked by the
    /// registry's own rules.
    fn loaded(dir: &Path) -> PersistedState {
        let s = read_state(dir).unwrap().expect("a state");
        Registry::from_persisted(net(), s)
            .expect("a state the registry accepts")
            .to_persisted()
    }

    /// Random changes (hosts, endpoints, mappings, leases, migrations into the history),
    /// persisted as a gateway persists them (journal, whole every 7 changes): after each,
    /// what a restart would load is exactly the registry in memory.
    #[test]
    fn the_journal_replays_to_the_registry_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap().with_compaction(7);
        let mut d = Dice(0x2545_f491_4f6c_dd1d);
        let mut r = Registry::new(net());
        let (mut journaled, mut whole) = (0, 0);
        for i in 0..1200u64 {
            let now = 1_000 + i * 500;
            let mut next = r.clone();
            let Ok(change) = next.apply(random_request(&r, &mut d, now)) else {
                continue;
            };
            if !change.changes_state() {
                continue;
            }
            let t = crate::watch::touched(&r, &next);
            let rec = next.journal_record(&r, &t);
            let records_before = store.journal.lock().unwrap().records;
            store.append(rec.as_ref(), || next.to_persisted()).unwrap();
            if store.journal.lock().unwrap().records > records_before {
                journaled += 1;
            } else {
                whole += 1;
            }
            r = next;
            assert_eq!(
                loaded(dir.path()),
                r.to_persisted(),
                "after version {}",
                r.version
            );
        }
        assert!(r.version > 250, "changes: {}", r.version);
        assert!(
            journaled > 150 && whole > 20,
            "journaled {journaled}, whole {whole}"
        );
        assert!(r.history_len() > 0, "migrations reached the history");
    }

    /// What a follower gateway does with each record another gateway logged
    /// (`Registry::apply_record`, at the cost of the record): over random changes, the
    /// registry before a change with its record applied is exactly the registry after it,
    /// indexes included. A record that does not fit is refused.
    #[test]
    fn a_record_applied_to_the_registry_before_gives_the_registry_after() {
        let mut d = Dice(0x9e37_79b9_7f4a_7c15);
        let mut r = Registry::new(net());
        let mut applied = 0;
        for i in 0..1500u64 {
            let mut next = r.clone();
            let Ok(change) = next.apply(random_request(&r, &mut d, 1_000 + i * 500)) else {
                continue;
            };
            if !change.changes_state() {
                continue;
            }
            let t = crate::watch::touched(&r, &next);
            if let Some(rec) = next.journal_record(&r, &t) {
                let mut followed = r.clone();
                followed.apply_record(rec.clone()).unwrap();
                assert_eq!(followed, next, "record {rec:?}");
                let mut twice = next.clone();
                assert!(twice.apply_record(rec).is_err(), "a record applied twice");
                applied += 1;
            }
            r = next;
        }
        assert!(applied > 300, "records applied: {applied}");
        let host = r.hosts().next().expect("a host").name.clone();
        let mut rec = JournalRecord {
            version: r.version + 1,
            hosts: Vec::new(),
            hosts_removed: Vec::new(),
            endpoints: vec![ferry_api::Endpoint {
                ip: "10.244.77.7".parse().unwrap(),
                host: "nowhere".into(),
                mac: ferry_api::MacAddr::for_container("10.244.77.7".parse().unwrap()),
            }],
            endpoints_removed: Vec::new(),
            public: Vec::new(),
            public_removed: Vec::new(),
            ipam: Vec::new(),
            ipam_removed: Vec::new(),
            migrations: r.migrations.values().cloned().collect(),
            history_push: Vec::new(),
            history_len: r.history_len(),
            next_migration: r.next_migration,
            ipam_next: r.ipam_next,
        };
        let e = r.clone().apply_record(rec.clone()).unwrap_err();
        assert!(e.to_string().contains("not registered"), "{e}");
        rec.endpoints[0].host = host;
        r.clone().apply_record(rec.clone()).unwrap();
        rec.endpoints[0].ip = "192.0.2.1".parse().unwrap();
        let e = r.clone().apply_record(rec.clone()).unwrap_err();
        assert!(e.to_string().contains("outside overlay_cidr"), "{e}");
        // A host removed while an endpoint stays on it.
        let on = r.endpoints().next().expect("an endpoint").clone();
        rec.endpoints.clear();
        rec.hosts_removed = vec![on.host.clone()];
        let e = r.clone().apply_record(rec.clone()).unwrap_err();
        assert!(e.to_string().contains("is still on it"), "{e}");
    }

    #[test]
    fn a_torn_last_line_is_ignored_then_cut_and_a_gap_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = Registry::new(net());
        let store = Store::open(dir.path()).unwrap();
        let mut d = Dice(7);
        let mut versions = 0;
        while versions < 5 {
            let mut next = r.clone();
            match next.apply(random_request(&r, &mut d, 1_000)) {
                Ok(c) if c.changes_state() => {}
                _ => continue,
            }
            let t = crate::watch::touched(&r, &next);
            store
                .append(next.journal_record(&r, &t).as_ref(), || next.to_persisted())
                .unwrap();
            r = next;
            versions += 1;
        }
        let journal = dir.path().join(JOURNAL_FILE);
        let good = fs::read(&journal).unwrap();
        assert_eq!(
            good.iter().filter(|b| **b == b'\n').count(),
            4,
            "the first change is whole"
        );
        // A crash in the middle of an append: half a record, no newline.
        let mut torn = good.clone();
        torn.extend_from_slice(br#"{"version":99,"hosts":[{"na"#);
        fs::write(&journal, &torn).unwrap();
        assert_eq!(
            loaded(dir.path()),
            r.to_persisted(),
            "the torn line is ignored"
        );
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(
            fs::read(&journal).unwrap(),
            good,
            "and cut when the gateway starts"
        );
        drop(store);

        // A crash after the whole state was written but before the journal was emptied:
        // the records at or below its version are skipped.
        fs::write(
            dir.path().join(STATE_FILE),
            serde_json::to_vec(&r.to_persisted()).unwrap(),
        )
        .unwrap();
        assert_eq!(loaded(dir.path()), r.to_persisted());

        // A record that does not follow on is corruption, named with its line.
        let mut lines: Vec<&[u8]> = good
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .collect();
        lines.remove(1);
        let mut gap = lines.join(&b'\n');
        gap.push(b'\n');
        fs::write(&journal, &gap).unwrap();
        let base: PersistedState = {
            let mut s = r.to_persisted();
            s.version -= 4;
            s
        };
        fs::write(
            dir.path().join(STATE_FILE),
            serde_json::to_vec(&base).unwrap(),
        )
        .unwrap();
        let e = read_state(dir.path()).unwrap_err();
        assert!(
            matches!(e, StoreError::Journal { line: 2, .. })
                && e.to_string().contains("registry.journal"),
            "{e}"
        );
    }

    #[test]
    fn one_gateway_per_state_dir() {
        let dir = tempfile::tempdir().unwrap();
        let first = Store::open(dir.path()).unwrap();
        let e = Store::open(dir.path()).unwrap_err();
        assert!(matches!(e, StoreError::Locked { .. }), "{e}");
        drop(first);
        Store::open(dir.path()).unwrap();
    }
}
