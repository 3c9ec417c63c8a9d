//! CRIU's kernel-feature cache (`criu.kdat`), kept where CRIU can use it.
//!
//! Every `criu` process starts by probing the kernel (`kerndat_init`: sock_diag modules,
//! `iptables -L`, pagemap, vDSO, userfaultfd, ...). CRIU saves the result to `criu.kdat` and
//! later runs load it in well under a millisecond, but only if the file's directory is on a
//! tmpfs (so that a reboot into another kernel discards it): `Can't keep kdat cache on
//! non-tempfs`. Where `/run` is on disk, as on this project's machines, no run ever caches,
//! and every restore probes inside the container's frozen window: 53–77 ms before the restore
//! opens its first image on a loaded 2-core machine, against 0.6–7 ms with the cache
//! (`docs/migration.md`, "CRIU's kernel probes").
//!
//! ferry's set-up builds CRIU with `RUNDIR=/run/criu` (a directory of CRIU's own), and the
//! agent, at start, makes sure that directory is on a tmpfs: a directory on a tmpfs `/run`
//! already is; otherwise it mounts a small root-only tmpfs there. It never mounts over a
//! directory that is not CRIU's alone (a stock CRIU caches in `/run` itself): then it only
//! says why every run will probe. The cache file's path is read from the binary (CRIU
//! compiles it in), so the agent follows whichever CRIU it is configured with.

use std::{
    io,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    time::Duration,
};

/// The cache's file name, as CRIU compiles it in (`KERNDAT_CACHE_NAME`).
const CACHE_NAME: &[u8] = b"/criu.kdat";

/// A writer's temporary file older than this was left by a CRIU that died between creating
/// it and renaming it; while it exists, no CRIU writes the cache (`O_EXCL`).
const STALE_TMP: Duration = Duration::from_secs(30);

/// The tmpfs the agent mounts: the cache is one struct (a few KB).
const TMPFS_OPTIONS: &str = "size=1m,mode=0700";

/// The cache file a CRIU binary uses: the NUL-terminated absolute path ending in
/// `/criu.kdat` among its bytes (`None`: not found, e.g. not a CRIU binary).
pub fn cache_file_of(binary: &[u8]) -> Option<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    let mut from = 0;
    while let Some(i) = find(&binary[from..], CACHE_NAME).map(|i| i + from) {
        let end = i + CACHE_NAME.len();
        // The compiled-in path ends there (the .tmp name is built at run time).
        if binary.get(end) == Some(&0) {
            let start = binary[..i]
                .iter()
                .rposition(|&b| b == 0 || !(0x21..0x7f).contains(&b))
                .map_or(0, |p| p + 1);
            let s = &binary[start..end];
            if s.first() == Some(&b'/') {
                return Some(PathBuf::from(std::ffi::OsStr::from_bytes(s)));
            }
        }
        from = end;
    }
    None
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Where the cache stands after [`prepare`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KdatCache {
    /// The directory is on a tmpfs already: CRIU caches there.
    Ready { file: PathBuf },
    /// The agent mounted a tmpfs on CRIU's own directory.
    Mounted { file: PathBuf },
    /// CRIU cannot cache: every dump and restore probes the kernel.
    Unusable { file: Option<PathBuf>, why: String },
}

/// What [`prepare`] needs from the kernel (a fake in the tests).
pub trait Sys {
    /// Creates `dir` (root-only) if missing.
    fn create_dir(&self, dir: &Path) -> io::Result<()>;
    /// Runs `f` holding an exclusive lock on `dir` (agents of one machine start together).
    fn locked(&self, dir: &Path, f: &mut dyn FnMut() -> KdatCache) -> io::Result<KdatCache>;
    /// Whether `dir` is on a tmpfs.
    fn on_tmpfs(&self, dir: &Path) -> io::Result<bool>;
    /// Mounts a tmpfs on `dir`.
    fn mount_tmpfs(&self, dir: &Path) -> io::Result<()>;
    /// How long ago `file` was last modified (`None`: it does not exist).
    fn age(&self, file: &Path) -> Option<Duration>;
    fn remove(&self, file: &Path) -> io::Result<()>;
}

/// Puts CRIU's cache (`file`, from [`cache_file_of`]) on a tmpfs, as the module explains.
pub fn prepare(sys: &dyn Sys, file: Option<PathBuf>) -> KdatCache {
    let Some(file) = file else {
        return KdatCache::Unusable {
            file: None,
            why: "the CRIU binary names no criu.kdat (not CRIU, or one this agent cannot read)"
                .into(),
        };
    };
    let Some(dir) = file.parent().map(Path::to_path_buf) else {
        return KdatCache::Unusable {
            file: Some(file),
            why: "the cache has no directory".into(),
        };
    };
    // CRIU's alone: a directory named `criu` (never `/run` or another shared directory).
    let own = dir.file_name().is_some_and(|n| n == "criu");
    let unusable = |why: String| KdatCache::Unusable {
        file: Some(file.clone()),
        why,
    };
    if own && let Err(e) = sys.create_dir(&dir) {
        return unusable(format!("creating {}: {e}", dir.display()));
    }
    let mut decide = || -> KdatCache {
        let state = match sys.on_tmpfs(&dir) {
            Ok(true) => KdatCache::Ready { file: file.clone() },
            Ok(false) if own => match sys.mount_tmpfs(&dir) {
                Ok(()) => KdatCache::Mounted { file: file.clone() },
                Err(e) => return unusable(format!("mounting a tmpfs on {}: {e}", dir.display())),
            },
            Ok(false) => {
                return unusable(format!(
                    "{} is not on a tmpfs and is not CRIU's own directory (build CRIU with \
                     RUNDIR=/run/criu, as scripts/setup.sh does)",
                    dir.display()
                ));
            }
            Err(e) => return unusable(format!("{}: {e}", dir.display())),
        };
        // A writer that died left its temporary file: no CRIU would write the cache again.
        let tmp = PathBuf::from(format!("{}.tmp", file.display()));
        if sys.age(&file).is_none() && sys.age(&tmp).is_some_and(|a| a >= STALE_TMP) {
            let _ = sys.remove(&tmp);
        }
        state
    };
    match sys.locked(&dir, &mut decide) {
        Ok(s) => s,
        Err(e) => unusable(format!("locking {}: {e}", dir.display())),
    }
}

/// The kernel, for [`prepare`].
pub struct RealSys;

impl Sys for RealSys {
    fn create_dir(&self, dir: &Path) -> io::Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        match std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
        {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(e),
            _ => Ok(()),
        }
    }

    fn locked(&self, dir: &Path, f: &mut dyn FnMut() -> KdatCache) -> io::Result<KdatCache> {
        // flock on the directory itself: an agent that opens it after another mounted the
        // tmpfs opens the tmpfs (and finds it ready); one that opened it before waits here,
        // then sees the tmpfs by path. No two tmpfs stack.
        let d = std::fs::File::open(dir)?;
        // SAFETY: flock on a descriptor we own; the lock goes with it.
        if unsafe { libc::flock(d.as_raw_fd(), libc::LOCK_EX) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(f())
    }

    fn on_tmpfs(&self, dir: &Path) -> io::Result<bool> {
        let c = cstr(dir)?;
        // SAFETY: a plain C struct, valid when zeroed.
        let mut s: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: statfs into that struct, on a NUL-terminated path that outlives the call.
        if unsafe { libc::statfs(c.as_ptr(), &mut s) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(s.f_type == libc::TMPFS_MAGIC)
    }

    fn mount_tmpfs(&self, dir: &Path) -> io::Result<()> {
        let c = cstr(dir)?;
        let opts = std::ffi::CString::new(TMPFS_OPTIONS).expect("no NUL");
        // SAFETY: mount(2) with NUL-terminated strings that outlive the call.
        let rc = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                c.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                opts.as_ptr().cast(),
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn age(&self, file: &Path) -> Option<Duration> {
        let m = std::fs::metadata(file).ok()?.modified().ok()?;
        Some(m.elapsed().unwrap_or_default())
    }

    fn remove(&self, file: &Path) -> io::Result<()> {
        std::fs::remove_file(file)
    }
}

fn cstr(p: &Path) -> io::Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(p.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
}

/// [`prepare`] for the CRIU binary at `binary` (read here: a few MB, once at start).
pub fn prepare_for(binary: &Path) -> KdatCache {
    match std::fs::read(binary) {
        Ok(bytes) => prepare(&RealSys, cache_file_of(&bytes)),
        Err(e) => KdatCache::Unusable {
            file: None,
            why: format!("reading {}: {e}", binary.display()),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::{cell::RefCell, collections::BTreeMap};

    use super::*;

    #[test]
    fn the_cache_path_is_read_from_the_binary() {
        let bin = b"\x7fELF\0\0junk\0Stale %s file\0/run/criu/criu.kdat\0%s.tmp\0more".to_vec();
        assert_eq!(
            cache_file_of(&bin),
            Some(PathBuf::from("/run/criu/criu.kdat"))
        );
        // A stock CRIU: the file directly in /run.
        assert_eq!(
            cache_file_of(b"\0\0/run/criu.kdat\0"),
            Some(PathBuf::from("/run/criu.kdat"))
        );
        // The bare name (KERNDAT_CACHE_NAME, joined at run time) is skipped for the full path.
        assert_eq!(
            cache_file_of(b"x\0criu.kdat\0/var/run/x/criu.kdat\0"),
            Some(PathBuf::from("/var/run/x/criu.kdat"))
        );
        assert_eq!(cache_file_of(b"no cache here\0criu.kdat.tmp\0"), None);
        assert_eq!(cache_file_of(b"rel/criu.kdat\0"), None);
    }

    /// A file system: which directories are tmpfs, what was mounted, which files exist.
    #[derive(Default)]
    struct Fake {
        tmpfs: RefCell<Vec<PathBuf>>,
        mounted: RefCell<Vec<PathBuf>>,
        created: RefCell<Vec<PathBuf>>,
        files: RefCell<BTreeMap<PathBuf, Duration>>,
        mount_fails: bool,
    }

    impl Sys for Fake {
        fn create_dir(&self, dir: &Path) -> io::Result<()> {
            self.created.borrow_mut().push(dir.into());
            Ok(())
        }
        fn locked(&self, _: &Path, f: &mut dyn FnMut() -> KdatCache) -> io::Result<KdatCache> {
            Ok(f())
        }
        fn on_tmpfs(&self, dir: &Path) -> io::Result<bool> {
            Ok(self.tmpfs.borrow().iter().any(|t| dir.starts_with(t)))
        }
        fn mount_tmpfs(&self, dir: &Path) -> io::Result<()> {
            if self.mount_fails {
                return Err(io::Error::from_raw_os_error(libc::EPERM));
            }
            self.mounted.borrow_mut().push(dir.into());
            self.tmpfs.borrow_mut().push(dir.into());
            Ok(())
        }
        fn age(&self, file: &Path) -> Option<Duration> {
            self.files.borrow().get(file).copied()
        }
        fn remove(&self, file: &Path) -> io::Result<()> {
            self.files.borrow_mut().remove(file);
            Ok(())
        }
    }

    fn file(p: &str) -> Option<PathBuf> {
        Some(PathBuf::from(p))
    }

    #[test]
    fn crius_own_directory_off_tmpfs_gets_a_tmpfs() {
        let fs = Fake::default();
        let s = prepare(&fs, file("/run/criu/criu.kdat"));
        assert_eq!(
            s,
            KdatCache::Mounted {
                file: "/run/criu/criu.kdat".into()
            }
        );
        assert_eq!(*fs.created.borrow(), [PathBuf::from("/run/criu")]);
        assert_eq!(*fs.mounted.borrow(), [PathBuf::from("/run/criu")]);
        // Once mounted (a second agent), nothing more.
        let s = prepare(&fs, file("/run/criu/criu.kdat"));
        assert!(matches!(s, KdatCache::Ready { .. }), "{s:?}");
        assert_eq!(fs.mounted.borrow().len(), 1);
    }

    #[test]
    fn a_directory_on_tmpfs_is_used_as_it_is() {
        let fs = Fake::default();
        fs.tmpfs.borrow_mut().push("/run".into());
        let s = prepare(&fs, file("/run/criu/criu.kdat"));
        assert!(matches!(s, KdatCache::Ready { .. }), "{s:?}");
        assert!(fs.mounted.borrow().is_empty());
        // A stock CRIU on a tmpfs /run: ready, and /run is not created or mounted.
        let s = prepare(&fs, file("/run/criu.kdat"));
        assert!(matches!(s, KdatCache::Ready { .. }), "{s:?}");
        assert_eq!(fs.created.borrow().len(), 1);
    }

    #[test]
    fn a_shared_directory_is_never_mounted_over() {
        let fs = Fake::default();
        let s = prepare(&fs, file("/run/criu.kdat"));
        let KdatCache::Unusable { why, .. } = s else {
            panic!("{s:?}")
        };
        assert!(why.contains("RUNDIR=/run/criu"), "{why}");
        assert!(fs.mounted.borrow().is_empty());
        assert!(fs.created.borrow().is_empty());
    }

    #[test]
    fn a_failed_mount_or_no_path_says_why() {
        let fs = Fake {
            mount_fails: true,
            ..Fake::default()
        };
        let s = prepare(&fs, file("/run/criu/criu.kdat"));
        let KdatCache::Unusable { why, .. } = s else {
            panic!("{s:?}")
        };
        assert!(why.contains("mounting a tmpfs"), "{why}");
        assert!(matches!(
            prepare(&fs, None),
            KdatCache::Unusable { file: None, .. }
        ));
    }

    #[test]
    fn a_dead_writers_temporary_file_goes_only_when_stale_and_no_cache_exists() {
        let fs = Fake::default();
        fs.tmpfs.borrow_mut().push("/run".into());
        let (cache, tmp) = (
            PathBuf::from("/run/criu/criu.kdat"),
            PathBuf::from("/run/criu/criu.kdat.tmp"),
        );
        // A writer at work (a second old): kept.
        fs.files
            .borrow_mut()
            .insert(tmp.clone(), Duration::from_secs(1));
        prepare(&fs, Some(cache.clone()));
        assert!(fs.files.borrow().contains_key(&tmp));
        // Stale, but the cache exists: kept (harmless, CRIU only loads the cache).
        fs.files
            .borrow_mut()
            .insert(tmp.clone(), Duration::from_secs(600));
        fs.files.borrow_mut().insert(cache.clone(), Duration::ZERO);
        prepare(&fs, Some(cache.clone()));
        assert!(fs.files.borrow().contains_key(&tmp));
        // Stale and no cache: removed, so the next CRIU writes one.
        fs.files.borrow_mut().remove(&cache);
        prepare(&fs, Some(cache));
        assert!(!fs.files.borrow().contains_key(&tmp));
    }
}
