//! Raw system calls ferry makes outside netlink and bpf(2): the one place `libc` is called for
//! namespaces and sysctls. Everything here is thin and returns `io::Error` with the errno.

use std::{
    fs::File,
    io,
    os::fd::{AsRawFd, BorrowedFd},
    path::Path,
};

/// `setns(fd, CLONE_NEWNET)` for the calling thread.
pub fn setns_net(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: setns only reads the fd; the kernel validates it. It affects the calling thread.
    let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The calling thread's current network namespace, as an open fd.
pub fn current_netns() -> io::Result<File> {
    File::open("/proc/thread-self/ns/net")
}

/// Writes a sysctl under /proc/sys of the *calling thread's* network namespace
/// (e.g. `net/ipv6/conf/ferry_vx/disable_ipv6`). /proc/sys/net follows the namespace of the
/// opener, so call it from a thread that is in the target namespace.
pub fn write_sysctl(key: &str, value: &str) -> io::Result<()> {
    let path = Path::new("/proc/sys").join(key);
    std::fs::write(&path, value)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

/// Reads a sysctl of the calling thread's network namespace.
pub fn read_sysctl(key: &str) -> io::Result<String> {
    let path = Path::new("/proc/sys").join(key);
    Ok(std::fs::read_to_string(path)?.trim().to_owned())
}
