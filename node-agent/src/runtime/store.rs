//! The runtime's state file (`<state_dir>/runtime.json`): every process tree the runtime
//! knows, written atomically (temporary file, fsync, rename, fsync of the directory) after
//! every change, so that a restarted agent re-adopts the trees still running.
//!
//! Writes happen on a thread of their own: a change only hands the serialized state over
//! (the latest one wins if several are waiting), so no tokio worker ever waits for a disk.
//! [`Store::flush`] waits until what was handed over is on disk (at agent exit).

use std::{
    io::{self, Write as _},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    sync::mpsc,
};

use serde::{Serialize, de::DeserializeOwned};
use tracing::warn;

/// File name of the runtime's state inside the agent's state directory.
pub const FILE: &str = "runtime.json";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("creating the state directory {path}: {source}")]
    Dir { path: PathBuf, source: io::Error },
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("writing {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
}

#[derive(Debug)]
enum Msg {
    Write(Vec<u8>),
    Flush(mpsc::Sender<()>),
}

/// The state file and its writer thread.
#[derive(Debug)]
pub struct Store {
    path: PathBuf,
    tx: mpsc::Sender<Msg>,
}

impl Store {
    /// Opens (creates) `dir` and starts the writer thread for `dir/runtime.json`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        ferry_api::private::create_dir(dir).map_err(|source| StoreError::Dir {
            path: dir.to_owned(),
            source,
        })?;
        let path = dir.join(FILE);
        let (tx, rx) = mpsc::channel::<Msg>();
        let p = path.clone();
        std::thread::Builder::new()
            .name("runtime-state".into())
            .spawn(move || writer(&p, rx))
            .map_err(|source| StoreError::Write {
                path: path.clone(),
                source,
            })?;
        Ok(Self { path, tx })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The state as last written, if there is a file. A file that cannot be parsed is moved
    /// aside (`runtime.json.corrupt`) with a warning and `None` is returned: the agent then
    /// adopts by scanning the containers' namespaces instead.
    pub fn load<T: DeserializeOwned>(&self) -> Result<Option<T>, StoreError> {
        load(&self.path)
    }

    /// Hands `state` over to be written (the call does not wait for the disk).
    pub fn save<T: Serialize>(&self, state: &T) {
        match serde_json::to_vec_pretty(state) {
            Ok(bytes) => {
                if self.tx.send(Msg::Write(bytes)).is_err() {
                    warn!(path = %self.path.display(), "the state writer is gone: not saved");
                }
            }
            Err(e) => {
                warn!(path = %self.path.display(), error = %e, "serializing the runtime's state")
            }
        }
    }

    /// Waits until everything handed over is written. Blocking.
    pub fn flush(&self) {
        let (ack, done) = mpsc::channel();
        if self.tx.send(Msg::Flush(ack)).is_ok() {
            let _ = done.recv();
        }
    }
}

/// Reads `path` as JSON; a corrupt file is moved aside (see [`Store::load`]).
pub fn load<T: DeserializeOwned>(path: &Path) -> Result<Option<T>, StoreError> {
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(StoreError::Read {
                path: path.to_owned(),
                source,
            });
        }
    };
    match serde_json::from_slice(&bytes) {
        Ok(v) => Ok(Some(v)),
        Err(e) => {
            let aside = path.with_extension("json.corrupt");
            warn!(path = %path.display(), error = %e, aside = %aside.display(), "unreadable runtime state: moved aside");
            let _ = std::fs::rename(path, &aside);
            Ok(None)
        }
    }
}

fn writer(path: &Path, rx: mpsc::Receiver<Msg>) {
    while let Ok(first) = rx.recv() {
        let mut latest: Option<Vec<u8>> = None;
        let mut acks = Vec::new();
        let mut take = |m: Msg| match m {
            Msg::Write(b) => latest = Some(b),
            Msg::Flush(a) => acks.push(a),
        };
        take(first);
        // Coalesce what queued meanwhile: only the newest state matters.
        while let Ok(m) = rx.try_recv() {
            take(m);
        }
        if let Some(bytes) = latest
            && let Err(e) = write_atomic(path, &bytes)
        {
            warn!(path = %path.display(), error = %e, "writing the runtime's state");
        }
        for a in acks {
            let _ = a.send(());
        }
    }
}

/// Writes `bytes` to `path` atomically: a temporary file beside it, fsync, rename over it,
/// fsync of the directory. A reader sees the old file or the new one, never a mix.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(ferry_api::private::FILE_MODE)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_atomically_and_moves_corrupt_files_aside() {
        let dir = std::env::temp_dir().join(format!("ferry-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::open(&dir).unwrap();
        assert_eq!(store.load::<Vec<u32>>().unwrap(), None);
        for i in 0..50u32 {
            store.save(&vec![i, i + 1]);
        }
        store.flush();
        assert_eq!(store.load::<Vec<u32>>().unwrap(), Some(vec![49, 50]));
        // No temporary file is left behind.
        let names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, [FILE]);
        // Root only: the directory 0700, the file 0600.
        use std::os::unix::fs::MetadataExt as _;
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o7777, 0o700);
        assert_eq!(
            std::fs::metadata(store.path()).unwrap().mode() & 0o7777,
            0o600
        );
        std::fs::write(store.path(), b"{ not json").unwrap();
        assert_eq!(store.load::<Vec<u32>>().unwrap(), None);
        assert!(dir.join("runtime.json.corrupt").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
