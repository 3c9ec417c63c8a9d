//! What keeps a container's processes away from the host's secrets (the API token, keys,
//! state files, CRIU's images, the daemons' /proc entries) and from other containers.
//!
//! Each started tree gets, besides its PID namespace (see the runtime's doc):
//! - **a private mount namespace** (`CLONE_NEWNS`; every mount made private first, so nothing
//!   done in it reaches the host). In it the mounts a container has no business with are
//!   detached: the host's /proc and /dev, every tmpfs (the host's /run, /dev/shm, the cgroup
//!   v1 holder), nsfs (`/run/netns/*`), bpffs, devpts, the pseudo file systems of
//!   [`DETACHED_FS`], and anything at or under a hidden path. What is left (the root file
//!   system, /sys) is made read-only, nosuid and nodev. Then a fresh read-only /proc (of
//!   the tree's own PID namespace: no other process is visible, /proc/sys and
//!   /proc/sysrq-trigger cannot be written), a fresh /dev (a tmpfs with null, zero, full,
//!   random, urandom and tty only, and an empty /dev/shm), and an empty read-only tmpfs over
//!   every hidden directory ([`Isolation::hide`]; /dev/null over a hidden file).
//! - **no privileges**: no supplementary groups, an empty capability bounding set, empty
//!   permitted/effective/inheritable/ambient sets, `no_new_privs` (no set-uid or
//!   file-capability binary gives any back); uid and gid 0 by default, or one unprivileged
//!   uid per container (`[runtime] uid_base`).
//!
//! A process so placed cannot reach a secret of the host: the hidden paths are empty, the
//! daemons' /proc entries are not in its /proc, raw devices are not in its /dev, it cannot
//! unmount, mount, ptrace or setns (no capability), and cannot write the host's files (a
//! read-only view), so not its own way out either. Other containers: not in its /proc nor its
//! PID namespace, and their files are the same read-only host files.
//!
//! CRIU dumps and restores this mount namespace (`criu restore --root /`: the hosts share the
//! file system): detaching what it cannot dump (nsfs, bpffs) is what makes that possible, and
//! detaching the host's tmpfs mounts keeps their contents (which may hold secrets) out of the
//! images (the fresh /dev and /dev/shm are copied, they hold nothing of the host's).
//!
//! Why uid 0 by default: CRIU reads each task's rlimits with prlimit(2), which for a task of
//! another uid needs CAP_SYS_RESOURCE, which this machine's sandbox does not give root (criu
//! fails with `Can't get rlimit 0: Operation not permitted`); a user namespace instead is
//! refused by CRIU 4.2.1 because the container's network namespace (made by the agent) does
//! not belong to it (`One or more namespaces doesn't belong to the target user namespace`).
//! Without any capability and with a read-only view, uid 0 gives a container nothing the
//! owner bits would (root-owned 0600 files it can see are only the host's ordinary ones).
//!
//! What to hide ([`MountPlan`]) is computed by the agent before the clone (the child may not
//! allocate). What to detach is not: a mount made on the host between a table read before the
//! clone and the child's making its namespace private (another container's network namespace
//! bound under /run/netns, say) reaches the child's copy, and one nsfs mount left there makes
//! CRIU refuse the dump (`doesn't have a proper root mount`). So the child makes its namespace
//! private, tells the agent, and waits; the agent reads the child's own /proc/PID/mountinfo
//! (fixed from then on) and sends the mount points to detach ([`MountPlan::detach_message`]),
//! which the child reads into a buffer prepared before the clone ([`DETACH_CAP`]).

use std::{
    ffi::{CStr, CString, c_char, c_int},
    io,
    net::Ipv4Addr,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
};

use ferry_overlay::sys::Mount;
use ipnet::Ipv4Net;

/// File system types detached from a container's mount namespace (besides fuse.*): CRIU
/// cannot dump some (nsfs, bpf, autofs, fuse), tmpfs holds the host's runtime files, proc,
/// devtmpfs and devpts are replaced by fresh ones, the others expose the host's kernel state.
pub const DETACHED_FS: &[&str] = &[
    "tmpfs",
    "proc",
    "devtmpfs",
    "devpts",
    "nsfs",
    "bpf",
    "autofs",
    "debugfs",
    "tracefs",
    "securityfs",
    "configfs",
    "fusectl",
    "pstore",
    "efivarfs",
    "binfmt_misc",
    "hugetlbfs",
    "rpc_pipefs",
    "mqueue",
];

/// How the runtime isolates the trees it starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Isolation {
    /// The first uid (see [`ferry_config::container_uid`]).
    pub uid_base: u32,
    pub overlay: Ipv4Net,
    /// Paths no container may see.
    pub hide: Vec<PathBuf>,
}

impl Isolation {
    pub fn from_config(cfg: &ferry_config::AgentConfig) -> Self {
        Self {
            uid_base: cfg.runtime.uid_base,
            overlay: cfg.overlay_cidr,
            hide: cfg.container_hidden_paths(),
        }
    }

    /// The uid and gid of container `ip`'s processes.
    pub fn uid(&self, ip: Ipv4Addr) -> u32 {
        ferry_config::container_uid(self.uid_base, self.overlay, ip)
    }

    /// The mount plan for a tree started now (what to detach comes later, from the child's own
    /// table: [`MountPlan::detach_message`]).
    pub fn plan(&self) -> io::Result<MountPlan> {
        let hide = hidden_roots(&self.hide);
        let mut plan = MountPlan {
            hide_roots: hide.clone(),
            ..MountPlan::default()
        };
        for p in hide {
            // What does not exist (or lives on a tmpfs that is detached) is hidden already.
            match std::fs::metadata(&p) {
                Ok(m) if m.is_dir() => plan.hide_dirs.push(c_path(&p)?),
                Ok(_) => plan.hide_files.push(c_path(&p)?),
                Err(_) => {}
            }
        }
        Ok(plan)
    }
}

/// Most bytes of mount points the child can be sent to detach (its buffer is allocated before
/// the clone, zeroed lazily: only what a message uses is touched).
pub const DETACH_CAP: usize = 1 << 20;

/// What the child does to its copy of the agent's mount namespace (see the module's doc):
/// detach what [`MountPlan::detach_message`] names (deepest first), cover `hide_dirs` and
/// `hide_files`. C strings, ready before the clone.
#[derive(Debug, Default)]
pub struct MountPlan {
    hide_roots: Vec<PathBuf>,
    pub hide_dirs: Vec<CString>,
    pub hide_files: Vec<CString>,
}

impl MountPlan {
    /// What the child (PID `pid`, its namespace private already) is sent: the mount points to
    /// detach from its own table, each NUL-terminated, deepest first.
    pub fn detach_message(&self, pid: i32) -> io::Result<Vec<u8>> {
        let table = std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))?;
        detach_message(
            &ferry_overlay::sys::parse_mountinfo(&table),
            &self.hide_roots,
        )
    }

    /// The null-terminated pointer lists the child walks (they borrow the plan's strings).
    pub fn pointers(&self) -> PlanPointers<'_> {
        let list = |v: &[CString]| -> Vec<*const c_char> {
            v.iter()
                .map(|c| c.as_ptr())
                .chain(std::iter::once(std::ptr::null()))
                .collect()
        };
        PlanPointers {
            hide_dirs: list(&self.hide_dirs),
            hide_files: list(&self.hide_files),
            _plan: std::marker::PhantomData,
        }
    }
}

/// A [`MountPlan`] as pointer lists (see [`MountPlan::pointers`]).
pub struct PlanPointers<'a> {
    hide_dirs: Vec<*const c_char>,
    hide_files: Vec<*const c_char>,
    _plan: std::marker::PhantomData<&'a MountPlan>,
}

impl PlanPointers<'_> {
    /// What the child is given; valid while `self` and `detach_buf` live. `sync_fd`: the
    /// child's end of a stream socket pair whose other end the agent uses to hear that the
    /// namespace is private and to send what to detach.
    pub fn child_plan(&self, uid: u32, sync_fd: c_int, detach_buf: &mut [u8]) -> ChildPlan {
        ChildPlan {
            sync_fd,
            detach_buf: detach_buf.as_mut_ptr(),
            detach_cap: detach_buf.len(),
            hide_dirs: self.hide_dirs.as_ptr(),
            hide_files: self.hide_files.as_ptr(),
            uid,
        }
    }
}

/// The plan as the cloned child sees it: raw pointers into memory prepared before the clone
/// (without CLONE_VM the child writes into its own copy of `detach_buf`).
pub struct ChildPlan {
    sync_fd: c_int,
    detach_buf: *mut u8,
    detach_cap: usize,
    hide_dirs: *const *const c_char,
    hide_files: *const *const c_char,
    uid: libc::uid_t,
}

/// The byte the child sends once its mount namespace is private.
pub const PRIVATE_NOW: u8 = b'p';

/// The child's stages, reported with the errno (numbers after the runtime's own).
pub const FIRST_STAGE: i32 = 20;
const STAGE_PRIVATE: i32 = 20;
const STAGE_DETACH: i32 = 21;
const STAGE_READ_ONLY: i32 = 22;
const STAGE_PROC: i32 = 23;
const STAGE_DEV: i32 = 24;
const STAGE_HIDE: i32 = 25;
const STAGE_GROUPS: i32 = 26;
const STAGE_BOUNDING: i32 = 27;
const STAGE_IDS: i32 = 28;
const STAGE_CAPS: i32 = 29;
const STAGE_NNP: i32 = 30;
const STAGE_SYNC: i32 = 31;

pub fn stage_name(stage: i32) -> Option<&'static str> {
    Some(match stage {
        STAGE_PRIVATE => "making the mount namespace private",
        STAGE_DETACH => "detaching the host's mounts",
        STAGE_READ_ONLY => "making the host's file system read-only",
        STAGE_PROC => "mounting /proc",
        STAGE_DEV => "making /dev",
        STAGE_HIDE => "hiding the host's secrets",
        STAGE_GROUPS => "dropping the supplementary groups",
        STAGE_BOUNDING => "emptying the capability bounding set",
        STAGE_IDS => "switching to the container's uid and gid",
        STAGE_CAPS => "dropping every capability",
        STAGE_NNP => "setting no_new_privs",
        STAGE_SYNC => "waiting for the agent's list of mounts to detach",
        _ => return None,
    })
}

/// Highest capability number tried when emptying the bounding set (EINVAL past the kernel's).
const CAP_MAX: c_int = 63;

/// The device nodes of a container's /dev: name, major, minor.
const DEVICES: [(&CStr, u32, u32); 6] = [
    (c"/dev/null", 1, 3),
    (c"/dev/zero", 1, 5),
    (c"/dev/full", 1, 7),
    (c"/dev/random", 1, 8),
    (c"/dev/urandom", 1, 9),
    (c"/dev/tty", 5, 0),
];
const DEV_LINKS: [(&CStr, &CStr); 4] = [
    (c"/proc/self/fd", c"/dev/fd"),
    (c"/proc/self/fd/0", c"/dev/stdin"),
    (c"/proc/self/fd/1", c"/dev/stdout"),
    (c"/proc/self/fd/2", c"/dev/stderr"),
];

/// Walks a null-terminated list of C strings.
///
/// # Safety
/// `list` is a null-terminated array of valid C strings.
unsafe fn each(
    list: *const *const c_char,
    mut f: impl FnMut(*const c_char) -> Result<(), i32>,
) -> Result<(), i32> {
    let mut p = list;
    // SAFETY: the caller's contract: valid until the terminating null.
    unsafe {
        while !(*p).is_null() {
            f(*p)?;
            p = p.add(1);
        }
    }
    Ok(())
}

fn errno() -> c_int {
    // SAFETY: the calling thread's errno location is always valid.
    unsafe { *libc::__errno_location() }
}

fn set_errno(e: c_int) {
    // SAFETY: the calling thread's errno location is always valid.
    unsafe { *libc::__errno_location() = e }
}

/// Reads exactly `len` bytes from `fd` into `buf` (retrying EINTR); an early end is EPIPE.
///
/// # Safety
/// `buf` is valid for `len` bytes. Async-signal-safe.
unsafe fn read_exact(fd: c_int, buf: *mut u8, len: usize) -> Result<(), ()> {
    let mut got = 0;
    while got < len {
        // SAFETY: reads into the unread tail of `buf`.
        let n = unsafe { libc::read(fd, buf.add(got).cast(), len - got) };
        match n {
            0 => {
                set_errno(libc::EPIPE);
                return Err(());
            }
            n if n > 0 => got += n as usize,
            _ if errno() == libc::EINTR => {}
            _ => return Err(()),
        }
    }
    Ok(())
}

/// In the child: tells the agent its namespace is private, then reads what to detach (a
/// little-endian u64 length, then that many bytes of NUL-terminated paths) into its buffer.
/// Returns the message's length.
///
/// # Safety
/// Only in the child after clone(2). Async-signal-safe.
unsafe fn receive_detach(plan: &ChildPlan) -> Result<usize, i32> {
    // SAFETY: write(2)/read(2) on the socket and on memory prepared before the clone.
    unsafe {
        let byte = PRIVATE_NOW;
        let sent = loop {
            let n = libc::write(plan.sync_fd, (&raw const byte).cast(), 1);
            if n >= 0 || errno() != libc::EINTR {
                break n;
            }
        };
        if sent != 1 {
            return Err(STAGE_SYNC);
        }
        let mut len = [0u8; 8];
        read_exact(plan.sync_fd, len.as_mut_ptr(), len.len()).map_err(|()| STAGE_SYNC)?;
        let len = u64::from_le_bytes(len);
        if len > plan.detach_cap as u64 {
            set_errno(libc::E2BIG);
            return Err(STAGE_DETACH);
        }
        let len = len as usize;
        read_exact(plan.sync_fd, plan.detach_buf, len).map_err(|()| STAGE_SYNC)?;
        if len > 0 && *plan.detach_buf.add(len - 1) != 0 {
            set_errno(libc::EINVAL);
            return Err(STAGE_DETACH);
        }
        Ok(len)
    }
}

/// In the cloned child (new PID and mount namespaces, still privileged): the mount namespace
/// of the module's doc. Async-signal-safe system calls only. Err: the stage that failed
/// (errno set).
///
/// # Safety
/// Only in the child after clone(2), with `plan` from [`PlanPointers::child_plan`].
pub unsafe fn enter_mount_namespace(plan: &ChildPlan) -> Result<(), i32> {
    let none = std::ptr::null::<c_char>();
    let nodata = std::ptr::null::<libc::c_void>();
    let check = |rc: c_int, stage: i32| if rc < 0 { Err(stage) } else { Ok(()) };
    // SAFETY: mount(2)/umount2(2)/mknod(2)/symlink(2)/mkdir(2)/umask(2) and mount_setattr(2)
    // on C strings prepared before the clone (or literals); nothing allocates.
    unsafe {
        // Private first: nothing below may propagate to the host's namespace.
        check(
            libc::mount(
                none,
                c"/".as_ptr(),
                none,
                libc::MS_REC | libc::MS_PRIVATE,
                nodata,
            ),
            STAGE_PRIVATE,
        )?;
        // From here on nothing reaches this namespace: the agent reads its table.
        let len = receive_detach(plan)?;
        let mut at = 0;
        while at < len {
            let p = plan.detach_buf.add(at).cast::<c_char>();
            // Gone with a parent detached before it: fine.
            if libc::umount2(p, libc::MNT_DETACH) < 0
                && !matches!(errno(), libc::EINVAL | libc::ENOENT)
            {
                return Err(STAGE_DETACH);
            }
            at += libc::strlen(p) + 1;
        }
        let attr = libc::mount_attr {
            attr_set: libc::MOUNT_ATTR_RDONLY | libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV,
            attr_clr: 0,
            propagation: 0,
            userns_fd: 0,
        };
        check(
            libc::syscall(
                libc::SYS_mount_setattr,
                libc::AT_FDCWD,
                c"/".as_ptr(),
                libc::AT_RECURSIVE as libc::c_uint,
                &attr as *const libc::mount_attr,
                std::mem::size_of::<libc::mount_attr>(),
            ) as c_int,
            STAGE_READ_ONLY,
        )?;
        let hardened = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        check(
            libc::mount(
                c"proc".as_ptr(),
                c"/proc".as_ptr(),
                c"proc".as_ptr(),
                hardened | libc::MS_RDONLY,
                nodata,
            ),
            STAGE_PROC,
        )?;
        check(
            libc::mount(
                c"ferry-dev".as_ptr(),
                c"/dev".as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID | libc::MS_NOEXEC,
                c"mode=755,size=64k".as_ptr().cast(),
            ),
            STAGE_DEV,
        )?;
        let old_mask = libc::umask(0);
        for (path, major, minor) in DEVICES {
            check(
                libc::mknod(
                    path.as_ptr(),
                    libc::S_IFCHR | 0o666,
                    libc::makedev(major, minor),
                ),
                STAGE_DEV,
            )?;
        }
        for (target, link) in DEV_LINKS {
            check(libc::symlink(target.as_ptr(), link.as_ptr()), STAGE_DEV)?;
        }
        check(libc::mkdir(c"/dev/shm".as_ptr(), 0o1777), STAGE_DEV)?;
        libc::umask(old_mask);
        check(
            libc::mount(
                c"shm".as_ptr(),
                c"/dev/shm".as_ptr(),
                c"tmpfs".as_ptr(),
                hardened,
                c"mode=1777".as_ptr().cast(),
            ),
            STAGE_DEV,
        )?;
        each(plan.hide_dirs, |p| {
            let rc = libc::mount(
                c"ferry-hidden".as_ptr(),
                p,
                c"tmpfs".as_ptr(),
                hardened | libc::MS_RDONLY,
                c"mode=000,size=4k".as_ptr().cast(),
            );
            // Gone (it lived on a detached mount): hidden already.
            if rc < 0 && errno() != libc::ENOENT {
                return Err(STAGE_HIDE);
            }
            Ok(())
        })?;
        each(plan.hide_files, |p| {
            if libc::mount(c"/dev/null".as_ptr(), p, none, libc::MS_BIND, nodata) < 0 {
                return if errno() == libc::ENOENT {
                    Ok(())
                } else {
                    Err(STAGE_HIDE)
                };
            }
            check(
                libc::mount(
                    none,
                    p,
                    none,
                    libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | hardened,
                    nodata,
                ),
                STAGE_HIDE,
            )
        })
    }
}

/// In the cloned child, last before exec: no supplementary groups, an empty bounding set,
/// the container's uid/gid (if not 0), no capability left, `no_new_privs`. Raw system calls:
/// glibc's set*id wrappers signal the agent's other threads, which this copy does not have.
///
/// # Safety
/// Only in the child after clone(2).
pub unsafe fn drop_privileges(plan: &ChildPlan) -> Result<(), i32> {
    let uid = plan.uid;
    let check = |rc: libc::c_long, stage: i32| if rc < 0 { Err(stage) } else { Ok(()) };
    // SAFETY: system calls with integer arguments or pointers to locals.
    unsafe {
        check(
            libc::syscall(
                libc::SYS_setgroups,
                0 as libc::c_long,
                std::ptr::null::<libc::gid_t>(),
            ),
            STAGE_GROUPS,
        )?;
        for cap in 0..=CAP_MAX {
            if libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) < 0
                && errno() != libc::EINVAL
            {
                return Err(STAGE_BOUNDING);
            }
        }
        if uid != 0 {
            let id = uid as libc::c_long;
            check(libc::syscall(libc::SYS_setresgid, id, id, id), STAGE_IDS)?;
            check(libc::syscall(libc::SYS_setresuid, id, id, id), STAGE_IDS)?;
        }
        // capset(2) v3: two 32-bit words of effective, permitted, inheritable, all zero.
        let header = [0x2008_0522u32, 0];
        let data = [0u32; 6];
        check(
            libc::syscall(libc::SYS_capset, header.as_ptr(), data.as_ptr()),
            STAGE_CAPS,
        )?;
        check(
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
                0,
                0,
                0,
            ) as libc::c_long,
            STAGE_CAPS,
        )?;
        check(
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1 as libc::c_ulong, 0, 0, 0) as libc::c_long,
            STAGE_NNP,
        )
    }
}

fn c_path(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// The hidden paths without the ones inside another (covering the outer one hides them).
pub fn hidden_roots(hide: &[PathBuf]) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = Vec::new();
    for p in hide {
        if p.is_absolute() && !hide.iter().any(|o| o != p && p.starts_with(o)) && !v.contains(p) {
            v.push(p.clone());
        }
    }
    v
}

/// [`MountPlan::detach_message`] of a mount table already read.
pub fn detach_message(mounts: &[Mount], hide: &[PathBuf]) -> io::Result<Vec<u8>> {
    let mut m = Vec::new();
    for p in to_detach(mounts, hide) {
        m.extend_from_slice(c_path(&p)?.as_bytes_with_nul());
    }
    Ok(m)
}

/// The mount points to detach, deepest first (see the module's doc).
pub fn to_detach(mounts: &[Mount], hide: &[PathBuf]) -> Vec<PathBuf> {
    let mut v: Vec<&Mount> = mounts
        .iter()
        .filter(|m| {
            let p = &m.mount_point;
            if p == Path::new("/") {
                return false;
            }
            let fs = m.fs_type.as_str();
            fs.starts_with("fuse")
                || DETACHED_FS.contains(&fs)
                || hide.iter().any(|h| p.starts_with(h))
        })
        .collect();
    // Children before their parents; the same path twice (stacked mounts) stays in order:
    // each umount takes the top one.
    v.sort_by_key(|m| std::cmp::Reverse(m.mount_point.components().count()));
    v.into_iter().map(|m| m.mount_point.clone()).collect()
}

#[cfg(test)]
mod tests {
    use ferry_overlay::sys::parse_mountinfo;

    use super::*;

    const MOUNTINFO: &str = "\
24 1 254:0 / / rw,relatime - ext4 /dev/vda rw
25 24 0:5 / /dev rw,nosuid - devtmpfs devtmpfs rw
26 25 0:24 / /dev/shm rw - tmpfs tmpfs rw
27 24 0:22 / /proc rw - proc proc rw
28 24 0:23 / /sys rw - sysfs sysfs rw
29 28 0:26 / /sys/fs/cgroup ro - tmpfs tmpfs ro
30 29 0:27 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu
31 28 0:28 / /sys/fs/bpf rw - bpf bpf rw
32 24 254:0 /run/netns /run/netns rw shared:5 - ext4 /dev/vda rw
33 32 0:4 net:[4026532178] /run/netns/fl1-a1 rw shared:5 - nsfs nsfs rw
34 24 0:30 / /run/ferry-lab/fl1/tls rw - tmpfs tmpfs rw
35 24 254:0 /srv /srv/with\\040space rw - ext4 /dev/vda rw
36 24 254:0 /x /etc/ferry/keys rw - ext4 /dev/vda rw
";

    #[test]
    fn detaches_what_criu_cannot_dump_and_what_is_hidden_deepest_first() {
        let hide = hidden_roots(&[
            PathBuf::from("/etc/ferry"),
            PathBuf::from("/etc/ferry/keys"),
            PathBuf::from("/run/ferry-lab"),
            PathBuf::from("/etc/ferry"),
            PathBuf::from("relative"),
        ]);
        assert_eq!(hide, [Path::new("/etc/ferry"), Path::new("/run/ferry-lab")]);
        let d = to_detach(&parse_mountinfo(MOUNTINFO), &hide);
        let d: Vec<&str> = d.iter().map(|p| p.to_str().unwrap()).collect();
        assert_eq!(
            d,
            [
                "/run/ferry-lab/fl1/tls",
                "/sys/fs/cgroup",
                "/sys/fs/bpf",
                "/run/netns/fl1-a1",
                "/etc/ferry/keys",
                "/dev/shm",
                "/dev",
                "/proc",
            ]
        );
        // What the child is sent: the same, each NUL-terminated.
        let m = detach_message(&parse_mountinfo(MOUNTINFO), &hide).unwrap();
        let mut want = d.join("\0").into_bytes();
        want.push(0);
        assert_eq!(m, want);
        assert!(detach_message(&[], &hide).unwrap().is_empty());
    }

    #[test]
    fn uids_follow_the_address() {
        let iso = Isolation {
            uid_base: 1_000_000,
            overlay: "10.244.0.0/16".parse().unwrap(),
            hide: Vec::new(),
        };
        assert_eq!(iso.uid(Ipv4Addr::new(10, 244, 1, 10)), 1_000_266);
        assert_ne!(
            iso.uid(Ipv4Addr::new(10, 244, 1, 10)),
            iso.uid(Ipv4Addr::new(10, 244, 2, 10))
        );
    }
}
