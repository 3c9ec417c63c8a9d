//! Persistence of the registry: `STATE_DIR/registry.json`, replaced atomically after every
//! change (write a temporary file, fsync it, rename it over the old one, fsync the directory),
//! so a crash at any point leaves either the old or the new state, never a mix.
//!
//! A state file that does not parse is never overwritten: the gateway refuses to start and
//! names it. `STATE_DIR/lock` (an advisory lock held while the daemon runs) keeps two gateways
//! from sharing one state directory.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use ferry_api::{Endpoint, HostInfo, IpamLease, Migration, PublicMapping};
use serde::{Deserialize, Serialize};

use crate::registry::LiveMigration;

pub const STATE_FILE: &str = "registry.json";
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
}

/// The state directory, locked for this process.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    _lock: File,
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
        Ok(Self {
            dir: dir.to_path_buf(),
            _lock: lock,
        })
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    pub fn load(&self) -> Result<Option<PersistedState>, StoreError> {
        read_state(&self.dir)
    }

    pub fn save(&self, state: &PersistedState) -> Result<(), StoreError> {
        let path = self.path();
        let mut bytes = serde_json::to_vec(state).map_err(|e| StoreError::Write {
            path: path.clone(),
            source: io::Error::other(e),
        })?;
        bytes.push(b'\n');
        write_atomic(&path, &bytes).map_err(|source| StoreError::Write { path, source })
    }
}

/// Reads `dir/registry.json` without locking (also for `--check`). `None`: no state yet.
pub fn read_state(dir: &Path) -> Result<Option<PersistedState>, StoreError> {
    let path = dir.join(STATE_FILE);
    let bytes = match fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(StoreError::Read { path, source }),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|source| StoreError::Corrupt { path, source })
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
