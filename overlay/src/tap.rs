//! The hold device: a TAP the agent owns. The datapath redirects packets for `HOLD` endpoints
//! to it (the agent reads them from the file descriptor and queues them); at release the agent
//! writes them back, and the TAP's ingress program (from-hold) delivers them.
//!
//! No `IFF_VNET_HDR`: the kernel segments GSO packets before they reach the TAP, so every read
//! is one wire-size frame, and every write is one frame. The MTU is the maximum so that no
//! full-size packet is refused.
//!
//! The agent makes the device persistent (`TUNSETPERSIST`): it outlives the agent's fd, so a
//! restarted agent re-opens the same device (same ifindex, from-hold still attached) instead of
//! making a new one. While no fd is open the kernel drops what is sent to it (counted in the
//! device's `tx_dropped`). [`Tap::remove`] is the explicit teardown.

use std::{
    ffi::CString,
    fs::File,
    io::{self, Read as _, Write as _},
    os::fd::{AsFd, AsRawFd, BorrowedFd},
};

/// Largest frame the device carries.
pub const HOLD_MTU: u32 = 65_521;

/// An open TAP device (the interface lives as long as the file descriptor).
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// `TUNSETIFF` = `_IOW('T', 202, int)`.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// `TUNSETPERSIST` = `_IOW('T', 203, int)`.
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;

impl Tap {
    /// Creates (or attaches to) TAP `name` in the calling thread's network namespace, in
    /// non-blocking mode.
    pub fn open(name: &str) -> io::Result<Self> {
        let cname = CString::new(name)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in interface name"))?;
        if cname.as_bytes().len() >= libc::IFNAMSIZ {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("interface name {name:?} is too long"),
            ));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")?;
        let mut req = IfReq {
            name: [0; libc::IFNAMSIZ],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short,
            _pad: [0; 22],
        };
        for (d, s) in req.name.iter_mut().zip(cname.as_bytes()) {
            *d = *s as libc::c_char;
        }
        // SAFETY: TUNSETIFF reads and writes a struct ifreq, which `req` lays out (name,
        // flags, padding to the union's size); the fd is a tun fd we own.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            file,
            name: name.to_owned(),
        })
    }

    /// [`Tap::open`], then made persistent: the device stays when this fd closes.
    pub fn open_persistent(name: &str) -> io::Result<Self> {
        let tap = Self::open(name)?;
        tap.set_persist(true)?;
        Ok(tap)
    }

    /// Makes the device outlive its fds (`true`) or go with the last one (`false`).
    pub fn set_persist(&self, on: bool) -> io::Result<()> {
        // SAFETY: TUNSETPERSIST takes its argument by value; the fd is a tun fd we own.
        let rc = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                TUNSETPERSIST as _,
                libc::c_ulong::from(on),
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Removes TAP `name` (persistent or not) from the calling thread's network namespace: it
    /// is opened, made non-persistent, and closed. A device that does not exist is fine
    /// (`Ok(false)`); the caller must not hold it open elsewhere.
    pub fn remove(name: &str, exists: bool) -> io::Result<bool> {
        if !exists {
            return Ok(false);
        }
        let tap = Self::open(name)?;
        tap.set_persist(false)?;
        drop(tap);
        Ok(true)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame; `WouldBlock` when none is waiting.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Writes one frame (it enters the kernel as received on the TAP).
    pub fn write_frame(&self, frame: &[u8]) -> io::Result<()> {
        let n = (&self.file).write(frame)?;
        if n == frame.len() {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("short write to the hold device: {n} of {}", frame.len()),
            ))
        }
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }
}

use std::os::unix::fs::OpenOptionsExt as _;
