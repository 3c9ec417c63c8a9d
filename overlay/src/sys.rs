//! Raw system calls ferry makes outside netlink and bpf(2): the one place `libc` is called for
//! namespaces and sysctls. Everything here is thin and returns `io::Error` with the errno.

use std::{
    fs::File,
    io,
    os::fd::{AsRawFd, BorrowedFd},
    path::{Path, PathBuf},
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

/// `unshare(CLONE_NEWNET)`: the calling thread moves into a new, empty network namespace.
pub fn unshare_net() -> io::Result<()> {
    // SAFETY: plain system call affecting only the calling thread.
    let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn cstr(p: &Path) -> io::Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt as _;
    std::ffi::CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// `mount --bind src dst`.
pub fn bind_mount(src: &Path, dst: &Path) -> io::Result<()> {
    let (s, d) = (cstr(src)?, cstr(dst)?);
    // SAFETY: both are valid NUL-terminated strings that outlive the call; no data argument.
    let rc = unsafe {
        libc::mount(
            s.as_ptr(),
            d.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `umount -l path` (MNT_DETACH).
pub fn umount_detach(path: &Path) -> io::Result<()> {
    let p = cstr(path)?;
    // SAFETY: valid NUL-terminated string that outlives the call.
    let rc = unsafe { libc::umount2(p.as_ptr(), libc::MNT_DETACH) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// One line of /proc/self/mountinfo: where, and what file system type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub mount_point: PathBuf,
    pub fs_type: String,
}

/// The calling process's mounts, parents before their children.
pub fn mountinfo() -> io::Result<Vec<Mount>> {
    Ok(parse_mountinfo(&std::fs::read_to_string(
        "/proc/self/mountinfo",
    )?))
}

/// Mount points and types of a mountinfo text, in its order. (Hand-written: two fields of one
/// kernel table do not call for a procfs crate.)
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let mount_point = fields.get(4)?;
            let sep = fields.iter().position(|f| *f == "-")?;
            Some(Mount {
                mount_point: PathBuf::from(unescape_mountinfo(mount_point)),
                fs_type: (*fields.get(sep + 1)?).to_owned(),
            })
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` (octal).
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && let Some(c) = std::str::from_utf8(&b[i + 1..i + 4])
                .ok()
                .and_then(|o| u8::from_str_radix(o, 8).ok())
        {
            out.push(c);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// IPv6 on for `scope` (an interface, or `all` / `default`) with static addresses only: no
/// link-local address, no duplicate address detection, no router advertisements or
/// solicitations. What ferry's dual-stack interfaces need (their addresses and gateway are
/// configured, and a restored socket must never meet a tentative address).
pub fn ipv6_static(scope: &str) -> std::io::Result<()> {
    for (key, value) in [
        ("addr_gen_mode", "1"),
        ("accept_dad", "0"),
        ("accept_ra", "0"),
        ("router_solicitations", "0"),
        ("disable_ipv6", "0"),
    ] {
        write_sysctl(&format!("net/ipv6/conf/{scope}/{key}"), value)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_is_parsed_and_unescaped() {
        assert_eq!(unescape_mountinfo(r"/run/a\040b/c"), "/run/a b/c");
        assert_eq!(unescape_mountinfo(r"/plain"), "/plain");
        assert_eq!(unescape_mountinfo(r"/odd\04"), r"/odd\04");
        let m = parse_mountinfo(
            "24 1 254:0 / / rw - ext4 /dev/vda rw\n\
             33 32 0:4 net:[1] /run/netns/a\\040b rw shared:5 - nsfs nsfs rw\n",
        );
        assert_eq!(m.len(), 2);
        assert_eq!(m[1].mount_point, Path::new("/run/netns/a b"));
        assert_eq!(m[1].fs_type, "nsfs");
    }
}
