//! UDP datagrams waiting in a container's sockets at the checkpoint.
//!
//! CRIU saves a UDP socket but not its receive queue: whatever had arrived and was not yet
//! read when the tasks were seized is gone after the restore, and under a 100 Mbit/s stream
//! the socket also overflows between CRIU's seize and the freeze's switch to the hold (a few
//! tens of milliseconds: 150–314 datagrams per move, lost without a counter). So:
//! - before the dump the source agent widens every UDP socket of the tree ([`widen_tree`]),
//!   so that window queues instead of overflowing;
//! - after the dump it reads every queue of the stopped tree *without consuming it*
//!   ([`peek_tree`]: `SO_PEEK_OFF` and `MSG_PEEK`; a rolled-back tree reads its queue as if
//!   nothing happened) and sends the datagrams with the images ([`FILE`]);
//! - the destination writes them back into the restored container's sockets before the
//!   release ([`inject`]: a raw socket in the container's namespace, each datagram from its
//!   original sender, over `lo`), so they come before the held datagrams the release
//!   delivers, in arrival order; then the restored sockets get their own sizes back
//!   ([`narrow_tree`] by address), as the source's do if its tree runs again (by inode).
//!
//! The file format is hand-written (a 16-byte record header per datagram): nothing else in
//! the image stream is serde, and a record is three fields.

use std::{
    io,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd as _, OwnedFd},
    os::unix::fs::MetadataExt as _,
    path::Path,
    sync::atomic::{AtomicU64, Ordering},
};

/// The file in the image directory that carries the datagrams.
pub const FILE: &str = "ferry-udp-queue.bin";
/// The file's magic: "FUDPQ" and a format version.
const MAGIC: &[u8; 8] = b"FUDPQ\0\0\x02";
/// At most this much payload is carried (a receive buffer is bounded by `rmem_max`; this
/// bounds a file that could be forged or damaged).
pub const MAX_BYTES: usize = 64 << 20;
const SO_PEEK_OFF: libc::c_int = 42;

/// This agent's datagram counts since it started (`ferry_udp_carry_datagrams_total`): a
/// process-wide tally, as the events come from the checkpoint and restore tasks.
static CARRIED: AtomicU64 = AtomicU64::new(0);
static NOT_CARRIED: AtomicU64 = AtomicU64::new(0);
static WRITTEN_BACK: AtomicU64 = AtomicU64::new(0);
static LOST: AtomicU64 = AtomicU64::new(0);

/// Counts `n` datagrams under `event` (see [`counters`]).
pub fn count(event: Event, n: usize) {
    let c = match event {
        Event::Carried => &CARRIED,
        Event::NotCarried => &NOT_CARRIED,
        Event::WrittenBack => &WRITTEN_BACK,
        Event::Lost => &LOST,
    };
    c.fetch_add(n as u64, Ordering::Relaxed);
}

/// What happened to a datagram of a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    Carried,
    NotCarried,
    WrittenBack,
    Lost,
}

/// The counts by event label, for the metrics.
pub fn counters() -> [(&'static str, u64); 4] {
    [
        ("carried", CARRIED.load(Ordering::Relaxed)),
        ("not_carried", NOT_CARRIED.load(Ordering::Relaxed)),
        ("written_back", WRITTEN_BACK.load(Ordering::Relaxed)),
        ("lost", LOST.load(Ordering::Relaxed)),
    ]
}

/// One datagram as it arrived: who sent it, to which address of the container, what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Datagram {
    pub src: SocketAddrV4,
    pub dst: SocketAddrV4,
    pub payload: Vec<u8>,
}

/// What was read, and what could not be (never silent: reported with the run).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Peeked {
    pub datagrams: Vec<Datagram>,
    /// UDP sockets looked at.
    pub sockets: usize,
    /// Sockets whose queue could not be read (each with why).
    pub errors: Vec<String>,
    /// Datagrams left out because [`MAX_BYTES`] was reached.
    pub over_limit: usize,
    /// Datagrams left out because they came over IPv6 (the overlay carries IPv4 only).
    pub not_ipv4: usize,
}

impl Peeked {
    pub fn bytes(&self) -> usize {
        self.datagrams.iter().map(|d| d.payload.len()).sum()
    }
}

/// What travels with the images: the datagrams, and the receive buffer size each socket
/// had before the checkpoint widened it ([`widen_tree`]), by the socket's local address.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Carried {
    pub sockets: Vec<(SocketAddrV4, u32)>,
    pub datagrams: Vec<Datagram>,
}

/// `c` as the file's bytes: the magic, a socket count and 12-byte socket records, then one
/// 16-byte header plus payload per datagram.
pub fn encode(c: &Carried) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        MAGIC.len()
            + 4
            + 12 * c.sockets.len()
            + c.datagrams
                .iter()
                .map(|d| 16 + d.payload.len())
                .sum::<usize>(),
    );
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(c.sockets.len() as u32).to_be_bytes());
    for (a, rcvbuf) in &c.sockets {
        out.extend_from_slice(&a.ip().octets());
        out.extend_from_slice(&a.port().to_be_bytes());
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&rcvbuf.to_be_bytes());
    }
    for d in &c.datagrams {
        out.extend_from_slice(&d.src.ip().octets());
        out.extend_from_slice(&d.src.port().to_be_bytes());
        out.extend_from_slice(&d.dst.ip().octets());
        out.extend_from_slice(&d.dst.port().to_be_bytes());
        out.extend_from_slice(&(d.payload.len() as u32).to_be_bytes());
        out.extend_from_slice(&d.payload);
    }
    out
}

/// The file's bytes; refuses anything malformed or over [`MAX_BYTES`].
pub fn decode(b: &[u8]) -> Result<Carried, String> {
    let mut rest = b
        .strip_prefix(MAGIC.as_slice())
        .ok_or("not a ferry UDP queue file (bad magic)")?;
    let ip = |r: &[u8], o: usize| Ipv4Addr::new(r[o], r[o + 1], r[o + 2], r[o + 3]);
    let port = |r: &[u8], o: usize| u16::from_be_bytes([r[o], r[o + 1]]);
    let u32_at = |r: &[u8], o: usize| u32::from_be_bytes([r[o], r[o + 1], r[o + 2], r[o + 3]]);
    if rest.len() < 4 {
        return Err("truncated socket count".into());
    }
    let nsock = u32_at(rest, 0) as usize;
    rest = &rest[4..];
    if nsock > 65_536 || rest.len() < 12 * nsock {
        return Err(format!(
            "truncated socket table ({nsock} sockets announced)"
        ));
    }
    let mut c = Carried::default();
    for k in 0..nsock {
        let r = &rest[12 * k..12 * k + 12];
        c.sockets
            .push((SocketAddrV4::new(ip(r, 0), port(r, 4)), u32_at(r, 8)));
    }
    rest = &rest[12 * nsock..];
    let mut total = 0usize;
    while !rest.is_empty() {
        if rest.len() < 16 {
            return Err(format!("truncated record header ({} bytes)", rest.len()));
        }
        let src = SocketAddrV4::new(ip(rest, 0), port(rest, 4));
        let dst = SocketAddrV4::new(ip(rest, 6), port(rest, 10));
        let len = u32_at(rest, 12) as usize;
        if len > 65_507 {
            return Err(format!(
                "datagram of {len} bytes (UDP carries at most 65507)"
            ));
        }
        total += len;
        if total > MAX_BYTES {
            return Err(format!("more than {MAX_BYTES} bytes of datagrams"));
        }
        let body = rest
            .get(16..16 + len)
            .ok_or_else(|| format!("truncated datagram ({len} bytes announced)"))?;
        c.datagrams.push(Datagram {
            src,
            dst,
            payload: body.to_vec(),
        });
        rest = &rest[16 + len..];
    }
    Ok(c)
}

/// IPv4 header + UDP header + payload, as a raw socket with `IP_HDRINCL` sends it (the
/// kernel fills the IP checksum, the ID and the total length; a zero UDP checksum means
/// none, which IPv4 allows).
pub fn packet(d: &Datagram) -> Vec<u8> {
    let udp_len = 8 + d.payload.len();
    let total = 20 + udp_len;
    let mut p = Vec::with_capacity(total);
    p.extend_from_slice(&[0x45, 0]);
    p.extend_from_slice(&(total as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0, 0x40, 0]); // ID (filled), don't fragment
    p.extend_from_slice(&[64, libc::IPPROTO_UDP as u8, 0, 0]);
    p.extend_from_slice(&d.src.ip().octets());
    p.extend_from_slice(&d.dst.ip().octets());
    p.extend_from_slice(&d.src.port().to_be_bytes());
    p.extend_from_slice(&d.dst.port().to_be_bytes());
    p.extend_from_slice(&(udp_len as u16).to_be_bytes());
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(&d.payload);
    p
}

fn int_opt(fd: &OwnedFd, level: libc::c_int, name: libc::c_int) -> io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: v is a c_int and len says so.
    let r = unsafe { libc::getsockopt(fd.as_raw_fd(), level, name, (&raw mut v).cast(), &mut len) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v)
}

fn set_int_opt(
    fd: &OwnedFd,
    level: libc::c_int,
    name: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    // SAFETY: a c_int option value.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&raw const v).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// An IPv4 address, or an IPv6 socket's IPv4-mapped one (`::ffff:a.b.c.d`: a dual-stack
/// socket's IPv4 traffic); None for anything else.
fn v4_of(sa: &libc::sockaddr_storage) -> Option<SocketAddrV4> {
    match i32::from(sa.ss_family) {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let a: &libc::sockaddr_in = unsafe { &*(std::ptr::from_ref(sa).cast()) };
            Some(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            ))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let a: &libc::sockaddr_in6 = unsafe { &*(std::ptr::from_ref(sa).cast()) };
            let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
            let v4 = if ip.is_unspecified() {
                Some(Ipv4Addr::UNSPECIFIED)
            } else {
                ip.to_ipv4_mapped()
            };
            v4.map(|v4| SocketAddrV4::new(v4, u16::from_be(a.sin6_port)))
        }
        _ => None,
    }
}

/// The socket's local address as IPv4 (see [`v4_of`]), or None.
fn local_v4(fd: &OwnedFd) -> io::Result<Option<SocketAddrV4>> {
    // SAFETY: zeroed sockaddr_storage is a valid value; len says its size.
    let mut sa: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: sa is a sockaddr_storage of len bytes.
    let r = unsafe { libc::getsockname(fd.as_raw_fd(), (&raw mut sa).cast(), &mut len) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(v4_of(&sa))
}

/// Every datagram in `fd`'s receive queue, left in place (peeked from offset 0).
fn peek_queue(
    fd: &OwnedFd,
    dst: SocketAddrV4,
    budget: &mut usize,
    out: &mut Peeked,
) -> io::Result<()> {
    let before = int_opt(fd, libc::SOL_SOCKET, SO_PEEK_OFF)?;
    set_int_opt(fd, libc::SOL_SOCKET, SO_PEEK_OFF, 0)?;
    let mut buf = vec![0u8; 65_536];
    let result = (|| loop {
        // SAFETY: zeroed sockaddr_storage is a valid value.
        let mut from: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: zeroed msghdr is valid; its pointers are set to live buffers below.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = (&raw mut from).cast();
        msg.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        msg.msg_iov = &raw mut iov;
        msg.msg_iovlen = 1;
        // SAFETY: msg points at buffers that outlive the call.
        let n = unsafe {
            libc::recvmsg(
                fd.as_raw_fd(),
                &raw mut msg,
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock => Ok(()),
                _ => Err(e),
            };
        }
        let n = n as usize;
        let Some(src) = v4_of(&from) else {
            out.not_ipv4 += 1; // the overlay carries IPv4 only
            continue;
        };
        if *budget < n {
            out.over_limit += 1;
            continue;
        }
        *budget -= n;
        out.datagrams.push(Datagram {
            src,
            dst,
            payload: buf[..n].to_vec(),
        });
    })();
    // The application's own peek offset (normally -1: off) comes back whatever happened.
    let restored = set_int_opt(fd, libc::SOL_SOCKET, SO_PEEK_OFF, before);
    result.and(restored)
}

/// A UDP socket of the tree (IPv4, or dual-stack IPv6 carrying IPv4; iperf3's server is
/// one): a descriptor of our own, its inode, its local address (the wildcard replaced by
/// `container`).
struct UdpSocket {
    sock: OwnedFd,
    ino: u64,
    local: SocketAddrV4,
    at: String,
}

/// Every UDP socket of the tree whose init is `init`, each once. Sockets that cannot be
/// looked at are left out with why (`errors`).
fn udp_sockets(
    init: i32,
    container: Ipv4Addr,
    errors: &mut Vec<String>,
) -> io::Result<Vec<UdpSocket>> {
    let mut out = Vec::new();
    let mut seen = std::collections::BTreeSet::new();
    for pid in super::resume::tree(init)? {
        let Ok(pidfd) = super::resume::pidfd_open(pid) else {
            continue; // gone meanwhile
        };
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for e in fds.flatten() {
            let Some(fd) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
                continue;
            };
            let link = std::fs::read_link(e.path()).unwrap_or_default();
            if !link.to_string_lossy().starts_with("socket:") {
                continue;
            }
            let Ok(sock) = super::resume::pidfd_getfd(&pidfd, fd) else {
                continue;
            };
            // fstat through a duplicate (File closes it); one unreadable socket skips itself.
            let Ok(ino) = sock
                .try_clone()
                .and_then(|d| std::fs::File::from(d).metadata())
                .map(|m| m.ino())
            else {
                continue;
            };
            if !seen.insert(ino) {
                continue; // the same socket through another descriptor or process
            }
            let is_udp = matches!(
                int_opt(&sock, libc::SOL_SOCKET, libc::SO_DOMAIN),
                Ok(libc::AF_INET | libc::AF_INET6)
            ) && int_opt(&sock, libc::SOL_SOCKET, libc::SO_PROTOCOL).ok()
                == Some(libc::IPPROTO_UDP);
            if !is_udp {
                continue;
            }
            let at = format!("socket inode {ino} (pid {pid} fd {fd})");
            let local = match local_v4(&sock) {
                Ok(Some(a)) if a.ip().is_unspecified() => SocketAddrV4::new(container, a.port()),
                Ok(Some(a)) => a,
                Ok(None) => continue, // IPv6 only: the overlay carries IPv4
                Err(err) => {
                    errors.push(format!("{at}: {err}"));
                    continue;
                }
            };
            out.push(UdpSocket {
                sock,
                ino,
                local,
                at,
            });
        }
    }
    Ok(out)
}

/// How large a receive buffer the checkpoint gives each UDP socket ([`widen_tree`]): room
/// for what arrives between CRIU's seize and the freeze's switch to the hold (tens of
/// milliseconds; 8 MiB is 0.6 s at 100 Mbit/s).
pub const WIDE_RCVBUF: libc::c_int = 4 << 20; // the kernel doubles it

/// A socket the checkpoint widened: its inode and local address, and `SO_RCVBUF` before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Widened {
    pub ino: u64,
    pub local: SocketAddrV4,
    pub rcvbuf: u32,
}

fn set_rcvbuf(fd: &OwnedFd, reported: u32) -> io::Result<()> {
    // getsockopt reports twice what was set (the kernel's bookkeeping overhead).
    let v = libc::c_int::try_from(reported / 2).unwrap_or(libc::c_int::MAX);
    set_int_opt(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, v)
}

/// Before the dump: every UDP socket of the tree gets a receive buffer of at least
/// [`WIDE_RCVBUF`], so what arrives while CRIU has the tasks seized and the hold has not
/// begun waits in the socket (and travels, [`peek_tree`]) instead of overflowing it.
/// Returns the sockets widened, with their sizes before.
pub fn widen_tree(init: i32, container: Ipv4Addr) -> (Vec<Widened>, Vec<String>) {
    let mut errors = Vec::new();
    let socks = match udp_sockets(init, container, &mut errors) {
        Ok(s) => s,
        Err(e) => return (Vec::new(), vec![format!("listing the sockets: {e}")]),
    };
    let mut widened = Vec::new();
    for s in socks {
        let before = match int_opt(&s.sock, libc::SOL_SOCKET, libc::SO_RCVBUF) {
            Ok(v) => v.max(0) as u32,
            Err(e) => {
                errors.push(format!("{}: SO_RCVBUF: {e}", s.at));
                continue;
            }
        };
        if before >= 2 * WIDE_RCVBUF as u32 {
            continue;
        }
        match set_int_opt(&s.sock, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, WIDE_RCVBUF) {
            Ok(()) => widened.push(Widened {
                ino: s.ino,
                local: s.local,
                rcvbuf: before,
            }),
            Err(e) => errors.push(format!("{}: SO_RCVBUFFORCE: {e}", s.at)),
        }
    }
    (widened, errors)
}

/// [`narrow_tree`] for a tree that runs on here (a failed dump, a rollback), with what it did
/// logged. Blocks: call it off the tokio workers.
pub fn give_back(init: i32, container: Ipv4Addr, widened: &[Widened]) {
    if widened.is_empty() {
        return;
    }
    let (n, errors) = narrow_tree(init, container, widened, false);
    for e in &errors {
        tracing::warn!(container = %container, error = %e, "giving a UDP socket its receive buffer back");
    }
    tracing::info!(container = %container, sockets = n, "UDP receive buffers given back");
}

/// Gives the widened sockets of the tree whose init is `init` their sizes back, found by
/// inode (the source, after the dump) or, with `by_address`, by local address (the restored
/// copy, whose sockets CRIU recreated with the widened size). A socket's queue above its
/// size stays; new datagrams wait until it is read below it. Returns how many were set.
pub fn narrow_tree(
    init: i32,
    container: Ipv4Addr,
    widened: &[Widened],
    by_address: bool,
) -> (usize, Vec<String>) {
    let mut errors = Vec::new();
    let socks = match udp_sockets(init, container, &mut errors) {
        Ok(s) => s,
        Err(e) => return (0, vec![format!("listing the sockets: {e}")]),
    };
    let mut n = 0;
    for s in socks {
        let w = widened.iter().find(|w| {
            if by_address {
                w.local == s.local
            } else {
                w.ino == s.ino
            }
        });
        let Some(w) = w else { continue };
        match set_rcvbuf(&s.sock, w.rcvbuf) {
            Ok(()) => n += 1,
            Err(e) => errors.push(format!(
                "{}: SO_RCVBUFFORCE back to {}: {e}",
                s.at, w.rcvbuf
            )),
        }
    }
    (n, errors)
}

/// Peeks every UDP socket's queue (IPv4, or IPv6 carrying IPv4) in the stopped tree whose
/// init is `init`; `container` stands for sockets bound to the wildcard address.
pub fn peek_tree(init: i32, container: Ipv4Addr) -> io::Result<Peeked> {
    let mut out = Peeked::default();
    let mut budget = MAX_BYTES;
    let mut errors = Vec::new();
    let socks = udp_sockets(init, container, &mut errors)?;
    out.errors = errors;
    for s in socks {
        out.sockets += 1;
        if let Err(err) = peek_queue(&s.sock, s.local, &mut budget, &mut out) {
            out.errors.push(format!("{} ({}): {err}", s.at, s.local));
        }
    }
    Ok(out)
}

/// Writes `datagrams` into the sockets of the namespace `netns` (each from its sender, to
/// its address, over `lo`), in order. Blocks (a thread in the namespace): call it off the
/// tokio workers. Returns how many were sent, and the failure that ended it early, if one
/// did.
pub fn inject(netns: &Path, datagrams: Vec<Datagram>) -> (usize, Option<io::Error>) {
    let r = ferry_overlay::netns::run_in(netns, move || -> (usize, Option<io::Error>) {
        // SAFETY: plain socket(2); the result is checked and owned below.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
        if fd < 0 {
            return (0, Some(io::Error::last_os_error()));
        }
        // SAFETY: the kernel just returned this descriptor to us.
        let raw: OwnedFd = unsafe { std::os::fd::FromRawFd::from_raw_fd(fd) };
        for (sent, d) in datagrams.iter().enumerate() {
            let p = packet(d);
            // SAFETY: zeroed sockaddr_in is valid; family and address are set.
            let mut to: libc::sockaddr_in = unsafe { std::mem::zeroed() };
            to.sin_family = libc::AF_INET as libc::sa_family_t;
            to.sin_addr.s_addr = u32::from(*d.dst.ip()).to_be();
            // SAFETY: p and to are live for the call.
            let n = unsafe {
                libc::sendto(
                    raw.as_raw_fd(),
                    p.as_ptr().cast(),
                    p.len(),
                    0,
                    (&raw const to).cast(),
                    size_of::<libc::sockaddr_in>() as libc::socklen_t,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                return (
                    sent,
                    Some(io::Error::other(format!(
                        "after {sent} of {} datagrams: {e}",
                        datagrams.len()
                    ))),
                );
            }
        }
        (datagrams.len(), None)
    });
    r.unwrap_or_else(|e| (0, Some(io::Error::other(e))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(src: &str, dst: &str, payload: &[u8]) -> Datagram {
        Datagram {
            src: src.parse().unwrap(),
            dst: dst.parse().unwrap(),
            payload: payload.to_vec(),
        }
    }

    #[test]
    fn datagrams_and_socket_sizes_survive_the_file_in_order() {
        let c = Carried {
            sockets: vec![
                ("10.244.1.10:5201".parse().unwrap(), 212_992),
                ("10.244.1.10:33333".parse().unwrap(), 425_984),
            ],
            datagrams: vec![
                d("203.0.113.10:40000", "10.244.1.10:5201", b"first"),
                d("203.0.113.10:40000", "10.244.1.10:5201", b""),
                d("198.51.100.7:53", "10.244.1.10:33333", &[0xff; 1472]),
            ],
        };
        assert_eq!(decode(&encode(&c)).unwrap(), c);
        assert_eq!(
            decode(&encode(&Carried::default())).unwrap(),
            Carried::default()
        );
    }

    #[test]
    fn a_damaged_or_forged_file_is_refused() {
        let good = encode(&Carried {
            sockets: vec![("10.0.0.1:6".parse().unwrap(), 1000)],
            datagrams: vec![d("1.2.3.4:5", "10.0.0.1:6", b"abc")],
        });
        assert!(decode(b"nope").unwrap_err().contains("magic"));
        assert!(
            decode(&good[..MAGIC.len() + 2])
                .unwrap_err()
                .contains("socket count")
        );
        assert!(
            decode(&good[..MAGIC.len() + 10])
                .unwrap_err()
                .contains("socket table")
        );
        assert!(
            decode(&good[..good.len() - 1])
                .unwrap_err()
                .contains("truncated")
        );
        assert!(
            decode(&good[..good.len() - 10])
                .unwrap_err()
                .contains("truncated")
        );
        let mut huge = MAGIC.to_vec();
        huge.extend_from_slice(&0u32.to_be_bytes());
        huge.extend_from_slice(&[0; 12]);
        huge.extend_from_slice(&(70_000u32).to_be_bytes());
        assert!(decode(&huge).unwrap_err().contains("65507"));
        let mut many = MAGIC.to_vec();
        many.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode(&many).unwrap_err().contains("socket table"));
    }

    #[test]
    fn the_packet_is_an_ipv4_udp_datagram_from_its_sender() {
        let p = packet(&d("203.0.113.10:40000", "10.244.1.10:5201", b"hi"));
        assert_eq!(p.len(), 20 + 8 + 2);
        assert_eq!(p[0], 0x45);
        assert_eq!(u16::from_be_bytes([p[2], p[3]]), 30);
        assert_eq!(p[9], 17);
        assert_eq!(&p[12..16], &[203, 0, 113, 10]);
        assert_eq!(&p[16..20], &[10, 244, 1, 10]);
        assert_eq!(u16::from_be_bytes([p[20], p[21]]), 40000);
        assert_eq!(u16::from_be_bytes([p[22], p[23]]), 5201);
        assert_eq!(u16::from_be_bytes([p[24], p[25]]), 10);
        assert_eq!(&p[28..], b"hi");
    }
}
