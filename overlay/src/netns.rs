//! Network namespaces: enter one for the current thread (restored on drop), or run a closure
//! in one on a dedicated thread. Never hold a [`NetNsGuard`] across an `.await`: the namespace
//! belongs to the OS thread, and an async task may move between threads.

use std::{
    fs::File,
    io,
    marker::PhantomData,
    os::fd::{AsFd, BorrowedFd},
    path::{Path, PathBuf},
};

use crate::sys;

/// Where `ip netns add NAME` puts its bind mounts.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// Path of a named network namespace.
pub fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_RUN_DIR).join(name)
}

#[derive(Debug, thiserror::Error)]
pub enum NetNsError {
    #[error("opening network namespace {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("entering network namespace {path}: {source}")]
    Enter { path: PathBuf, source: io::Error },
    #[error("returning to the original network namespace: {0}")]
    Restore(io::Error),
    #[error("creating network namespace {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("deleting network namespace {path}: {source}")]
    Delete { path: PathBuf, source: io::Error },
    #[error("the thread running in network namespace {path} panicked")]
    Panicked { path: PathBuf },
}

/// The calling thread is in another network namespace while this lives; dropping it moves the
/// thread back. `!Send`: it is bound to the thread that created it.
#[derive(Debug)]
pub struct NetNsGuard {
    original: File,
    _not_send: PhantomData<*const ()>,
}

impl NetNsGuard {
    pub fn enter(path: &Path) -> Result<Self, NetNsError> {
        let original = sys::current_netns().map_err(NetNsError::Restore)?;
        let target = File::open(path).map_err(|source| NetNsError::Open {
            path: path.to_owned(),
            source,
        })?;
        sys::setns_net(target.as_fd()).map_err(|source| NetNsError::Enter {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self {
            original,
            _not_send: PhantomData,
        })
    }
}

impl Drop for NetNsGuard {
    fn drop(&mut self) {
        if let Err(e) = sys::setns_net(self.original.as_fd()) {
            // A thread left in a foreign namespace would silently misdirect every later socket.
            panic!("failed to restore network namespace: {e}");
        }
    }
}

/// Runs `f` on a fresh OS thread inside the network namespace at `path` and returns its result.
/// The caller's thread never changes namespace.
pub fn run_in<T, F>(path: &Path, f: F) -> Result<T, NetNsError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let p = path.to_owned();
    let handle = std::thread::Builder::new()
        .name("netns".into())
        .spawn(move || -> Result<T, NetNsError> {
            let _guard = NetNsGuard::enter(&p)?;
            Ok(f())
        })
        .expect("spawning a thread");
    handle.join().map_err(|_| NetNsError::Panicked {
        path: path.to_owned(),
    })?
}

/// Runs a blocking namespace operation on tokio's blocking pool, so no runtime worker waits on
/// a thread join or an unmount (and none ever changes namespace). `path` names the namespace if
/// the operation panics.
async fn on_blocking_pool<T: Send + 'static>(
    path: PathBuf,
    op: impl FnOnce() -> Result<T, NetNsError> + Send + 'static,
) -> Result<T, NetNsError> {
    tokio::task::spawn_blocking(op)
        .await
        .map_err(|_| NetNsError::Panicked { path })?
}

/// [`run_in`] for async code.
pub async fn run_in_async<T, F>(path: &Path, f: F) -> Result<T, NetNsError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let p = path.to_owned();
    on_blocking_pool(path.to_owned(), move || run_in(&p, f)).await
}

/// [`create_named`] for async code.
pub async fn create_named_async(name: &str) -> Result<PathBuf, NetNsError> {
    let n = name.to_owned();
    on_blocking_pool(netns_path(name), move || create_named(&n)).await
}

/// [`delete_named`] for async code (unmounting can block).
pub async fn delete_named_async(name: &str) -> Result<bool, NetNsError> {
    let n = name.to_owned();
    on_blocking_pool(netns_path(name), move || delete_named(&n)).await
}

/// Opens a namespace file for later use by a child process (`pre_exec` + setns).
pub fn open(path: &Path) -> Result<File, NetNsError> {
    File::open(path).map_err(|source| NetNsError::Open {
        path: path.to_owned(),
        source,
    })
}

/// Makes `cmd` start inside the network namespace at `path` (the mount namespace stays the
/// caller's: unlike `ip netns exec`, /sys/fs/bpf and /proc stay visible, which the agent and
/// CRIU need). The namespace file is opened now, so errors surface here, not in the child.
pub fn command_in(cmd: &mut std::process::Command, path: &Path) -> Result<(), NetNsError> {
    use std::os::{fd::AsRawFd, unix::process::CommandExt};
    let ns = open(path)?;
    // SAFETY: the closure runs in the forked child before exec and only calls setns(2), which is
    // async-signal-safe; `ns` is moved into the closure and outlives it.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) == 0 {
                Ok(())
            } else {
                Err(io::Error::last_os_error())
            }
        });
    }
    Ok(())
}

/// Creates the named network namespace `/run/netns/NAME` (what `ip netns add` does: a new
/// namespace kept alive by a bind mount of its nsfs file). Fails if the name exists.
pub fn create_named(name: &str) -> Result<PathBuf, NetNsError> {
    let path = netns_path(name);
    let create_err = |source| NetNsError::Create {
        path: path.clone(),
        source,
    };
    std::fs::create_dir_all(NETNS_RUN_DIR).map_err(create_err)?;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(create_err)?;
    let target = path.clone();
    let made = std::thread::Builder::new()
        .name("netns-create".into())
        .spawn(move || -> io::Result<()> {
            // This thread's namespace changes for good; it ends right after.
            sys::unshare_net()?;
            sys::bind_mount(Path::new("/proc/thread-self/ns/net"), &target)
        })
        .expect("spawning a thread")
        .join()
        .unwrap_or_else(|_| Err(io::Error::other("netns thread panicked")));
    if let Err(source) = made {
        let _ = std::fs::remove_file(&path);
        return Err(NetNsError::Create { path, source });
    }
    Ok(path)
}

/// Deletes a named network namespace (what `ip netns del` does). The namespace itself goes
/// away once no process and no interface keeps it. Missing: `Ok(false)`.
pub fn delete_named(name: &str) -> Result<bool, NetNsError> {
    let path = netns_path(name);
    if !path.exists() {
        return Ok(false);
    }
    let del_err = |source| NetNsError::Delete {
        path: path.clone(),
        source,
    };
    match sys::umount_detach(&path) {
        Ok(()) => {}
        // Not a mount point (a half-created entry): just remove the file.
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
        Err(e) => return Err(del_err(e)),
    }
    std::fs::remove_file(&path).map_err(del_err)?;
    Ok(true)
}

/// `NS_GET_NSTYPE` (linux/nsfs.h: `_IO(0xb7, 0x3)`): the type of namespace an nsfs file is.
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

/// Whether `fd` is a network namespace (an nsfs file of type `CLONE_NEWNET`).
pub fn is_netns(fd: BorrowedFd<'_>) -> bool {
    use std::os::fd::AsRawFd as _;
    // SAFETY: an ioctl without argument on a descriptor we borrow; the kernel checks it.
    let t = unsafe { libc::ioctl(fd.as_raw_fd(), NS_GET_NSTYPE as _) };
    t == libc::CLONE_NEWNET
}

/// (device, inode) of the namespace `fd` refers to.
pub fn fd_ns_id(fd: BorrowedFd<'_>) -> io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let m = File::from(fd.try_clone_to_owned()?).metadata()?;
    Ok((m.dev(), m.ino()))
}

/// Gives the network namespace `fd` (e.g. a container runtime's, received over a socket) the
/// name `NAME` (`/run/netns/NAME`, a bind mount of it, as `ip netns attach` does). Fails if
/// the name exists or `fd` is not a network namespace; leaves nothing behind on failure.
pub fn attach_named(name: &str, fd: BorrowedFd<'_>) -> Result<PathBuf, NetNsError> {
    let path = netns_path(name);
    let err = |source| NetNsError::Create {
        path: path.clone(),
        source,
    };
    if !is_netns(fd) {
        return Err(err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the descriptor is not a network namespace",
        )));
    }
    std::fs::create_dir_all(NETNS_RUN_DIR).map_err(err)?;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(err)?;
    if let Err(e) = sys::bind_mount(&fd_path(fd), &path) {
        let _ = std::fs::remove_file(&path);
        return Err(err(e));
    }
    Ok(path)
}

/// Re-points the name `NAME` at the network namespace `fd` (unmount, then bind): what was
/// named before goes away unless something else keeps it.
pub fn rebind_named(name: &str, fd: BorrowedFd<'_>) -> Result<PathBuf, NetNsError> {
    let path = netns_path(name);
    let err = |source| NetNsError::Create {
        path: path.clone(),
        source,
    };
    if !is_netns(fd) {
        return Err(err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the descriptor is not a network namespace",
        )));
    }
    match sys::umount_detach(&path) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
        Err(e) => return Err(err(e)),
    }
    sys::bind_mount(&fd_path(fd), &path).map_err(err)?;
    Ok(path)
}

/// A path that opens what `fd` refers to, from any thread of this process.
pub fn fd_path(fd: BorrowedFd<'_>) -> PathBuf {
    use std::os::fd::AsRawFd as _;
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// (device, inode) of a namespace file: what identifies a namespace.
pub fn ns_id(path: &Path) -> io::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt as _;
    let m = std::fs::metadata(path)?;
    Ok((m.dev(), m.ino()))
}

/// Every PID whose network namespace is the one at `path` (what `ip netns pids` does: a scan
/// of /proc/*/ns/net, so it finds every process inside, whoever started it). A process that
/// has exited (a zombie) has no namespace any more and is not listed.
pub fn pids_in(path: &Path) -> io::Result<Vec<i32>> {
    let want = ns_id(path)?;
    let me = std::process::id() as i32;
    Ok(std::fs::read_dir("/proc")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| ns_id(Path::new(&format!("/proc/{pid}/ns/net"))).is_ok_and(|id| id == want))
        .collect())
}

/// SIGKILLs every process inside the network namespace at `path` and waits (up to `wait`)
/// until each has exited. Signals go through pidfds opened before the namespace is checked
/// again, so a PID recycled after the scan is never hit. Scans again until the namespace is
/// empty (a process may fork while it is being killed). Returns the PIDs killed. Blocking: call
/// it on a blocking thread.
pub fn kill_all_in(path: &Path, wait: std::time::Duration) -> io::Result<Vec<i32>> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    let want = ns_id(path)?;
    let deadline = std::time::Instant::now() + wait;
    let mut killed = Vec::new();
    loop {
        let pids = pids_in(path)?;
        if pids.is_empty() {
            return Ok(killed);
        }
        let mut fds = Vec::new();
        for pid in pids {
            // SAFETY: pidfd_open(2) with a PID and no flags; returns a new fd or -1.
            let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
            if fd < 0 {
                continue; // gone already
            }
            // SAFETY: the kernel just returned this fd; nothing else owns it.
            let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
            // Still the process that was in the namespace (the pidfd pins the PID now).
            if ns_id(Path::new(&format!("/proc/{pid}/ns/net"))).is_ok_and(|id| id == want) {
                // SAFETY: pidfd_send_signal(2) with a valid pidfd, SIGKILL, no siginfo, no flags.
                unsafe {
                    libc::syscall(
                        libc::SYS_pidfd_send_signal,
                        fd.as_raw_fd(),
                        libc::SIGKILL,
                        std::ptr::null::<libc::siginfo_t>(),
                        0,
                    )
                };
                killed.push(pid);
                fds.push(fd);
            }
        }
        for fd in &fds {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let mut pfd = libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        }
        if std::time::Instant::now() >= deadline {
            let left = pids_in(path)?;
            if left.is_empty() {
                return Ok(killed);
            }
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("processes {left:?} in {} survived SIGKILL", path.display()),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt as _;

    use super::*;

    fn thread_netns() -> Option<u64> {
        std::fs::metadata("/proc/thread-self/ns/net")
            .ok()
            .map(|m| m.ino())
    }

    /// The closure runs in the namespace asked for (here the caller's own, so no root-made
    /// namespace is needed) on a thread other than the caller's, and its value comes back.
    #[tokio::test(flavor = "current_thread")]
    async fn run_in_async_runs_off_the_worker() {
        let caller = std::thread::current().id();
        let (inode, thread) = run_in_async(Path::new("/proc/self/ns/net"), || {
            (thread_netns(), std::thread::current().id())
        })
        .await
        .expect("entering our own namespace");
        assert_ne!(thread, caller);
        assert_eq!(inode, thread_netns());
        let missing = run_in_async(Path::new("/nonexistent/ns"), || ()).await;
        assert!(
            matches!(missing, Err(NetNsError::Open { .. })),
            "{missing:?}"
        );
    }

    /// A namespace file is told from any other file (no root needed: our own namespace).
    #[test]
    fn network_namespaces_are_recognised() {
        let ns = File::open("/proc/self/ns/net").unwrap();
        assert!(is_netns(ns.as_fd()));
        assert_eq!(
            fd_ns_id(ns.as_fd()).unwrap(),
            ns_id(Path::new("/proc/self/ns/net")).unwrap()
        );
        let uts = File::open("/proc/self/ns/uts").unwrap();
        assert!(!is_netns(uts.as_fd()));
        let plain = File::open("/proc/self/status").unwrap();
        assert!(!is_netns(plain.as_fd()));
        let e = attach_named("ferry-test-never-created", plain.as_fd()).unwrap_err();
        assert!(e.to_string().contains("not a network namespace"), "{e}");
        assert!(!netns_path("ferry-test-never-created").exists());
    }
}
