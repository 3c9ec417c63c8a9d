//! The source tree after a dump: CRIU leaves it stopped (`--leave-stopped`) with its
//! established TCP sockets still in repair mode. Once the destination runs the container the
//! agent kills it (a socket closed in repair mode sends nothing: no FIN, no RST); if anything
//! after the dump failed it resumes it instead: repair mode off on every connection (through
//! `pidfd_getfd`, the process's own sockets), then SIGCONT to every task.

use std::{io, os::fd::FromRawFd as _, os::fd::OwnedFd, os::unix::fs::MetadataExt as _};

/// PIDs (host view) of every process in the PID namespace whose init is `init`.
pub fn tree(init: i32) -> io::Result<Vec<i32>> {
    let ns = std::fs::metadata(format!("/proc/{init}/ns/pid"))?.ino();
    let mut pids = Vec::new();
    for e in std::fs::read_dir("/proc")? {
        let Ok(e) = e else { continue };
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        match std::fs::metadata(format!("/proc/{pid}/ns/pid")) {
            Ok(m) if m.ino() == ns => pids.push(pid),
            _ => {}
        }
    }
    pids.sort_unstable();
    Ok(pids)
}

pub(crate) fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the result is a new descriptor we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

pub(crate) fn pidfd_getfd(pidfd: &OwnedFd, target: i32) -> io::Result<OwnedFd> {
    use std::os::fd::AsRawFd as _;
    // SAFETY: plain syscall; the result is a new descriptor we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), target, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel just returned this descriptor to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The TCP state of a socket, or None if it is not TCP.
fn tcp_state(fd: &OwnedFd) -> Option<u8> {
    use std::os::fd::AsRawFd as _;
    let mut info = [0u8; 8];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: info is a valid buffer of len bytes.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    (r == 0 && len >= 1).then_some(info[0])
}

const TCP_LISTEN: u8 = 10;
const TCP_CLOSE: u8 = 7;
const TCP_REPAIR_OFF: libc::c_int = 0;

/// Takes every connected TCP socket of `pid` out of repair mode; returns how many.
fn unrepair(pid: i32) -> io::Result<usize> {
    use std::os::fd::AsRawFd as _;
    let pidfd = pidfd_open(pid)?;
    let mut n = 0;
    for e in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let Ok(e) = e else { continue };
        let Some(fd) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let is_socket = std::fs::read_link(e.path())
            .map(|l| l.to_string_lossy().starts_with("socket:"))
            .unwrap_or(false);
        if !is_socket {
            continue;
        }
        let sock = match pidfd_getfd(&pidfd, fd) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(pid, fd, error = %e, "resuming: a socket of the tree could not be taken");
                continue;
            }
        };
        match tcp_state(&sock) {
            Some(s) if s != TCP_LISTEN && s != TCP_CLOSE => {}
            state => {
                tracing::debug!(pid, fd, ?state, "resuming: not a connected TCP socket");
                continue;
            }
        }
        let off = TCP_REPAIR_OFF;
        // SAFETY: a c_int option value.
        let r = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_REPAIR,
                (&raw const off).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        n += 1;
    }
    Ok(n)
}

/// Resumes a tree CRIU left stopped: repair off everywhere, then SIGCONT. Returns the
/// number of tasks and of connections.
pub fn resume(init: i32) -> io::Result<(usize, usize)> {
    let pids = tree(init)?;
    if pids.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no process left in the PID namespace of {init}"),
        ));
    }
    let mut conns = 0;
    for &p in &pids {
        conns += unrepair(p)?;
    }
    for &p in &pids {
        // SAFETY: plain kill(2).
        unsafe { libc::kill(p, libc::SIGCONT) };
    }
    Ok((pids.len(), conns))
}

/// Resumes a tree CRIU restored stopped (`--leave-stopped`): its sockets are already out of
/// repair mode, so only SIGCONT to every task. Returns the number of tasks.
pub fn cont(init: i32) -> io::Result<usize> {
    let pids = tree(init)?;
    if pids.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::NotFound,
            format!("no process left in the PID namespace of {init}"),
        ));
    }
    for &p in &pids {
        // SAFETY: plain kill(2).
        unsafe { libc::kill(p, libc::SIGCONT) };
    }
    Ok(pids.len())
}

/// Resumes a container's tree after a move under an OCI runtime (runc, Podman): on the
/// `Source`, stopped by CRIU's leave-stopped with its sockets in repair mode ([`resume`]); on
/// the `Destination`, restored stopped ([`cont`]). A cgroup that ferry's pre-dump hook froze
/// and no agent thawed (it died during the dump) is thawed last, the SIGCONT already pending.
pub fn resume_container(init: i32, side: ferry_api::run::FenceSide) -> io::Result<(usize, usize)> {
    let r = match side {
        ferry_api::run::FenceSide::Source => resume(init),
        ferry_api::run::FenceSide::Destination => cont(init).map(|n| (n, 0)),
    }?;
    if let Some(dir) = ferry_api::cgroup::freezer_of(init) {
        ferry_api::cgroup::thaw(&dir)?;
    }
    Ok(r)
}

/// Kills a tree (SIGKILL to the namespace's init kills every task in it).
pub fn kill(init: i32) -> io::Result<()> {
    // SAFETY: plain kill(2).
    if unsafe { libc::kill(init, libc::SIGKILL) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Waits until every task in the PID namespace of `init` is stopped by a signal (`T` in
/// /proc/PID/stat: CRIU's `leave-stopped` sends SIGSTOP as it detaches), up to `timeout`.
pub fn wait_stopped(init: i32, timeout: std::time::Duration) -> io::Result<()> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let pids = tree(init)?;
        let running: Vec<i32> = pids.iter().copied().filter(|p| !stopped(*p)).collect();
        if !pids.is_empty() && running.is_empty() {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            return Err(io::Error::other(format!(
                "tasks {running:?} of {init}'s tree are not stopped"
            )));
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// Is `pid` stopped by a signal (`T`; a vanished task counts as stopped)?
fn stopped(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(t) => t
            .rfind(')')
            .is_some_and(|i| t[i + 1..].trim_start().starts_with('T')),
        Err(_) => true,
    }
}
