//! Processes: identity (PID + start time, so a recycled PID is never mistaken for ours),
//! stopping them through pidfds, and finding the processes inside a network namespace.

use std::{
    collections::HashSet,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    os::unix::fs::MetadataExt,
    path::Path,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

/// How long a process gets between SIGTERM and SIGKILL.
pub const TERM_GRACE: Duration = Duration::from_secs(3);

/// A process the lab started, identified beyond its PID.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcRecord {
    pub pid: i32,
    /// Field 22 of /proc/PID/stat (clock ticks after boot).
    pub start_time: u64,
    /// What it is: "agent" or "reaper".
    pub kind: String,
    /// The lab host it serves, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
}

impl ProcRecord {
    /// Is this very process (same PID and start time) still running (not a zombie)?
    pub fn alive(&self) -> bool {
        matches!(stat(self.pid), Ok((state, start)) if start == self.start_time && state != 'Z' && state != 'X')
    }
}

/// (state, start time) of a process, from /proc/PID/stat.
pub fn stat(pid: i32) -> io::Result<(char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_stat(&text).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("/proc/{pid}/stat: unexpected format"),
        )
    })
}

fn parse_stat(text: &str) -> Option<(char, u64)> {
    // "PID (comm) S ppid ..." — comm may contain spaces and parentheses: split at the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); field 22 (starttime) is at index 22 - 3.
    let state = fields.first()?.chars().next()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((state, start))
}

/// CPU time a process has used (user + system, fields 14 and 15 of /proc/PID/stat), in
/// seconds.
pub fn cpu_seconds(pid: i32) -> io::Result<f64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let ticks = parse_cpu_ticks(&text).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("/proc/{pid}/stat: unexpected format"),
        )
    })?;
    // SAFETY: sysconf(3) with a valid name has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    Ok(ticks as f64 / if hz > 0 { hz as f64 } else { 100.0 })
}

fn parse_cpu_ticks(text: &str) -> Option<u64> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 (utime) and 15 (stime) are at indexes 11 and 12 of `rest`.
    let u: u64 = fields.get(11)?.parse().ok()?;
    let s: u64 = fields.get(12)?.parse().ok()?;
    Some(u + s)
}

/// Start time of a process (field 22 of /proc/PID/stat).
pub fn start_time(pid: i32) -> io::Result<u64> {
    stat(pid).map(|(_, s)| s)
}

/// An open pidfd: signals go to exactly the process it was opened on.
#[derive(Debug)]
pub struct PidFd(OwnedFd);

impl PidFd {
    /// Opens a pidfd for `pid`, then checks the start time when one is given: once the pidfd is
    /// open the PID cannot be recycled under us, so a matching start time proves identity.
    /// `Ok(None)`: the process is gone (or the PID now belongs to another process).
    pub fn open(pid: i32, expected_start: Option<u64>) -> io::Result<Option<Self>> {
        // SAFETY: pidfd_open(2) takes a PID and flags and returns a new fd or -1; no memory is
        // passed.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::ESRCH) => Ok(None),
                _ => Err(e),
            };
        }
        // SAFETY: the syscall just returned this fd, we own it and nobody else closes it.
        let pidfd = Self(unsafe { OwnedFd::from_raw_fd(fd as i32) });
        if let Some(expected) = expected_start {
            match stat(pid) {
                Ok((_, start)) if start == expected => {}
                Ok(_) => return Ok(None),
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(e) => return Err(e),
            }
        }
        Ok(Some(pidfd))
    }

    /// Sends `sig`; a process that already exited is not an error.
    pub fn signal(&self, sig: i32) -> io::Result<()> {
        // SAFETY: pidfd_send_signal(2) with a valid pidfd, a signal number, no siginfo (NULL)
        // and no flags.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.0.as_raw_fd(),
                sig,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ESRCH) => Ok(()),
            _ => Err(e),
        }
    }

    /// Waits until the process exits (zombie counts as exited) or `timeout` passes (`None`:
    /// forever). Returns whether it exited.
    pub fn wait_exit(&self, timeout: Option<Duration>) -> io::Result<bool> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let ms = match deadline {
                None => -1,
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    left.as_millis().min(i32::MAX as u128) as i32
                }
            };
            let mut pfd = libc::pollfd {
                fd: self.0.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, count 1, for the duration of the call.
            let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
            if rc > 0 {
                return Ok(true);
            }
            if rc == 0 {
                return Ok(false);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// A process to stop: PID and, when known, its start time.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    pub pid: i32,
    pub start_time: Option<u64>,
}

/// SIGTERM to every target at once, wait up to `grace` for all, SIGKILL the rest and wait for
/// them. Never signals our own PID. Returns one message per failure.
pub fn stop_all(targets: &[Target], grace: Duration) -> Vec<String> {
    let me = std::process::id() as i32;
    let mut errors = Vec::new();
    let mut open: Vec<(i32, PidFd)> = Vec::new();
    for t in targets {
        if t.pid == me || t.pid <= 1 {
            continue;
        }
        match PidFd::open(t.pid, t.start_time) {
            Ok(Some(fd)) => match fd.signal(libc::SIGTERM) {
                Ok(()) => open.push((t.pid, fd)),
                Err(e) => errors.push(format!("SIGTERM to PID {}: {e}", t.pid)),
            },
            Ok(None) => {}
            Err(e) => errors.push(format!("opening a pidfd for PID {}: {e}", t.pid)),
        }
    }
    let deadline = Instant::now() + grace;
    for (pid, fd) in &open {
        let left = deadline.saturating_duration_since(Instant::now());
        match fd.wait_exit(Some(left)) {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(pid, "still running {grace:?} after SIGTERM: SIGKILL");
                if let Err(e) = fd.signal(libc::SIGKILL) {
                    errors.push(format!("SIGKILL to PID {pid}: {e}"));
                    continue;
                }
                match fd.wait_exit(Some(Duration::from_secs(5))) {
                    Ok(true) => {}
                    Ok(false) => errors.push(format!("PID {pid} survived SIGKILL for 5 s")),
                    Err(e) => errors.push(format!("waiting for PID {pid}: {e}")),
                }
            }
            Err(e) => errors.push(format!("waiting for PID {pid}: {e}")),
        }
    }
    errors
}

/// SIGKILL to every target (PID and start time checked through a pidfd) and wait up to 5 s
/// for each. Never signals our own PID. Returns one message per failure.
pub fn kill_all(targets: &[Target]) -> Vec<String> {
    let me = std::process::id() as i32;
    let mut errors = Vec::new();
    let mut open = Vec::new();
    for t in targets {
        if t.pid == me || t.pid <= 1 {
            continue;
        }
        match PidFd::open(t.pid, t.start_time) {
            Ok(Some(fd)) => match fd.signal(libc::SIGKILL) {
                Ok(()) => open.push((t.pid, fd)),
                Err(e) => errors.push(format!("SIGKILL to PID {}: {e}", t.pid)),
            },
            Ok(None) => {}
            Err(e) => errors.push(format!("opening a pidfd for PID {}: {e}", t.pid)),
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    for (pid, fd) in &open {
        let left = deadline.saturating_duration_since(Instant::now());
        match fd.wait_exit(Some(left)) {
            Ok(true) => {}
            Ok(false) => errors.push(format!("PID {pid} survived SIGKILL for 5 s")),
            Err(e) => errors.push(format!("waiting for PID {pid}: {e}")),
        }
    }
    errors
}

/// (device, inode) of a namespace file: what identifies a namespace.
pub fn ns_id(path: &Path) -> io::Result<(u64, u64)> {
    let m = std::fs::metadata(path)?;
    Ok((m.dev(), m.ino()))
}

/// Every PID whose network namespace is one of `namespaces` (like `ip netns pids`).
pub fn pids_in_netns(namespaces: &HashSet<(u64, u64)>) -> Vec<i32> {
    if namespaces.is_empty() {
        return Vec::new();
    }
    all_pids()
        .into_iter()
        .filter(|pid| {
            ns_id(Path::new(&format!("/proc/{pid}/ns/net")))
                .map(|id| namespaces.contains(&id))
                .unwrap_or(false)
        })
        .collect()
}

/// Every PID whose command line contains `needle` (ourselves excluded).
pub fn pids_with_cmdline(needle: &str) -> Vec<(i32, String)> {
    let me = std::process::id() as i32;
    all_pids()
        .into_iter()
        .filter(|&pid| pid != me)
        .filter_map(|pid| {
            let raw = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
            let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
            cmd.contains(needle).then(|| (pid, cmd.trim().to_owned()))
        })
        .collect()
}

pub fn all_pids() -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// Short command name of a process.
pub fn comm(pid: i32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Blocks until process `pid` (with start time `start`, when known) has exited.
/// Uses a pidfd; falls back to polling /proc every 200 ms if pidfds are unavailable.
pub fn wait_for_exit(pid: i32, start: Option<u64>) {
    match PidFd::open(pid, start) {
        Ok(None) => {}
        Ok(Some(fd)) => {
            if fd.wait_exit(None).is_err() {
                poll_exit(pid, start);
            }
        }
        Err(_) => poll_exit(pid, start),
    }
}

fn poll_exit(pid: i32, start: Option<u64>) {
    loop {
        match stat(pid) {
            Ok((state, s)) if state != 'Z' && state != 'X' && start.is_none_or(|x| x == s) => {
                std::thread::sleep(Duration::from_millis(200));
            }
            _ => return,
        }
    }
}

/// Is the effective user root?
pub fn is_root() -> bool {
    // SAFETY: geteuid(2) has no arguments and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_awkward_comm() {
        let text = "1234 (a) b (c)) S 1 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 98765 1000 10 18446744073709551615";
        assert_eq!(parse_stat(text), Some(('S', 98765)));
        assert_eq!(parse_cpu_ticks(text), Some(3));
        assert!(cpu_seconds(std::process::id() as i32).unwrap() >= 0.0);
    }

    #[test]
    fn own_start_time_is_stable_and_we_are_alive() {
        let me = std::process::id() as i32;
        let a = start_time(me).unwrap();
        assert_eq!(a, start_time(me).unwrap());
        let rec = ProcRecord {
            pid: me,
            start_time: a,
            kind: "test".into(),
            host: None,
        };
        assert!(rec.alive());
        let wrong = ProcRecord {
            start_time: a + 1,
            ..rec
        };
        assert!(!wrong.alive());
    }

    #[test]
    fn stops_a_child_and_ignores_a_wrong_start_time() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let start = start_time(pid).unwrap();
        // A wrong start time: must not be touched.
        let errs = stop_all(
            &[Target {
                pid,
                start_time: Some(start + 1),
            }],
            Duration::from_millis(100),
        );
        assert!(errs.is_empty(), "{errs:?}");
        assert!(
            child.try_wait().unwrap().is_none(),
            "a PID with another start time was killed"
        );
        let errs = stop_all(
            &[Target {
                pid,
                start_time: Some(start),
            }],
            TERM_GRACE,
        );
        assert!(errs.is_empty(), "{errs:?}");
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGTERM));
    }
}
