//! Every raw call dump and restore make, behind the [`Sys`] trait: [`LibcSys`] is the real
//! implementation, `FakeSys` (unit tests, or the `fake` feature) a scripted model of one
//! socket that records the calls so tests can assert their order.
//!
//! Methods return `io::Error` with the errno; callers add the step and the option name
//! (see [`crate::Error`]).

use std::io;
use std::mem::{self, MaybeUninit};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

// Values from include/uapi/linux/tcp.h, sockios.h, asm-generic/socket.h.

/// TCP_REPAIR_QUEUE value: no queue selected.
pub const TCP_NO_QUEUE: i32 = 0;
/// TCP_REPAIR_QUEUE value: the receive queue.
pub const TCP_RECV_QUEUE: i32 = 1;
/// TCP_REPAIR_QUEUE value: the send queue.
pub const TCP_SEND_QUEUE: i32 = 2;
/// TCP_REPAIR value: on.
pub const TCP_REPAIR_ON: i32 = 1;
/// TCP_REPAIR value: off, and send a window probe so the peer answers with an ACK.
pub const TCP_REPAIR_OFF: i32 = 0;
/// TCP_REPAIR value: off without the window probe.
pub const TCP_REPAIR_OFF_NO_WP: i32 = -1;
/// TCP_REPAIR_OPTIONS code: MSS clamp.
pub const TCPOPT_MSS: u32 = 2;
/// TCP_REPAIR_OPTIONS code: window scale (`snd | rcv << 16`).
pub const TCPOPT_WINDOW: u32 = 3;
/// TCP_REPAIR_OPTIONS code: SACK permitted.
pub const TCPOPT_SACK_PERM: u32 = 4;
/// TCP_REPAIR_OPTIONS code: timestamps.
pub const TCPOPT_TIMESTAMP: u32 = 8;
/// `tcpi_options` bit: timestamps.
pub const TCPI_OPT_TIMESTAMPS: u8 = 1;
/// `tcpi_options` bit: SACK.
pub const TCPI_OPT_SACK: u8 = 2;
/// `tcpi_options` bit: window scaling.
pub const TCPI_OPT_WSCALE: u8 = 4;
const SIOCINQ: u64 = 0x541B; // = FIONREAD
const SIOCOUTQ: u64 = 0x5411; // = TIOCOUTQ
const SIOCOUTQNSD: u64 = 0x894B;
const TCP_REPAIR_WINDOW: i32 = 29;

/// Address family of a socket to create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// AF_INET
    V4,
    /// AF_INET6 (also for IPv4 peers through v4-mapped addresses).
    V6,
}

impl Family {
    /// The family of a socket bound to `addr`.
    pub fn of(addr: &SocketAddr) -> Family {
        match addr {
            SocketAddr::V4(_) => Family::V4,
            SocketAddr::V6(_) => Family::V6,
        }
    }
}

/// Integer socket options used by dump/restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntOpt {
    /// SOL_SOCKET/SO_DOMAIN (read only)
    Domain,
    /// SOL_SOCKET/SO_TYPE (read only)
    Type,
    /// SOL_SOCKET/SO_PROTOCOL (read only)
    Protocol,
    /// SOL_SOCKET/SO_ERROR (read only)
    SoError,
    /// SOL_SOCKET/SO_REUSEADDR
    ReuseAddr,
    /// SOL_SOCKET/SO_SNDBUF
    SndBuf,
    /// SOL_SOCKET/SO_RCVBUF
    RcvBuf,
    /// SOL_SOCKET/SO_SNDBUFFORCE (CAP_NET_ADMIN: ignores wmem_max)
    SndBufForce,
    /// SOL_SOCKET/SO_RCVBUFFORCE (CAP_NET_ADMIN: ignores rmem_max)
    RcvBufForce,
    /// SOL_IP/IP_FREEBIND
    IpFreebind,
    /// SOL_IPV6/IPV6_FREEBIND
    Ipv6Freebind,
    /// SOL_TCP/TCP_REPAIR
    Repair,
    /// SOL_TCP/TCP_REPAIR_QUEUE
    RepairQueue,
    /// SOL_TCP/TCP_QUEUE_SEQ (of the queue selected by TCP_REPAIR_QUEUE)
    QueueSeq,
    /// SOL_TCP/TCP_MAXSEG (the MSS clamp, when read in repair mode)
    MaxSeg,
    /// SOL_TCP/TCP_TIMESTAMP
    Timestamp,
}

impl IntOpt {
    /// `(level, optname)`.
    pub fn level_name(self) -> (i32, i32) {
        use libc::*;
        match self {
            IntOpt::Domain => (SOL_SOCKET, SO_DOMAIN),
            IntOpt::Type => (SOL_SOCKET, SO_TYPE),
            IntOpt::Protocol => (SOL_SOCKET, SO_PROTOCOL),
            IntOpt::SoError => (SOL_SOCKET, SO_ERROR),
            IntOpt::ReuseAddr => (SOL_SOCKET, SO_REUSEADDR),
            IntOpt::SndBuf => (SOL_SOCKET, SO_SNDBUF),
            IntOpt::RcvBuf => (SOL_SOCKET, SO_RCVBUF),
            IntOpt::SndBufForce => (SOL_SOCKET, SO_SNDBUFFORCE),
            IntOpt::RcvBufForce => (SOL_SOCKET, SO_RCVBUFFORCE),
            IntOpt::IpFreebind => (SOL_IP, IP_FREEBIND),
            IntOpt::Ipv6Freebind => (SOL_IPV6, IPV6_FREEBIND),
            IntOpt::Repair => (SOL_TCP, TCP_REPAIR),
            IntOpt::RepairQueue => (SOL_TCP, TCP_REPAIR_QUEUE),
            IntOpt::QueueSeq => (SOL_TCP, TCP_QUEUE_SEQ),
            IntOpt::MaxSeg => (SOL_TCP, TCP_MAXSEG),
            IntOpt::Timestamp => (SOL_TCP, TCP_TIMESTAMP),
        }
    }

    /// The option's C name, for error messages.
    pub fn name(self) -> &'static str {
        match self {
            IntOpt::Domain => "SO_DOMAIN",
            IntOpt::Type => "SO_TYPE",
            IntOpt::Protocol => "SO_PROTOCOL",
            IntOpt::SoError => "SO_ERROR",
            IntOpt::ReuseAddr => "SO_REUSEADDR",
            IntOpt::SndBuf => "SO_SNDBUF",
            IntOpt::RcvBuf => "SO_RCVBUF",
            IntOpt::SndBufForce => "SO_SNDBUFFORCE",
            IntOpt::RcvBufForce => "SO_RCVBUFFORCE",
            IntOpt::IpFreebind => "IP_FREEBIND",
            IntOpt::Ipv6Freebind => "IPV6_FREEBIND",
            IntOpt::Repair => "TCP_REPAIR",
            IntOpt::RepairQueue => "TCP_REPAIR_QUEUE",
            IntOpt::QueueSeq => "TCP_QUEUE_SEQ",
            IntOpt::MaxSeg => "TCP_MAXSEG",
            IntOpt::Timestamp => "TCP_TIMESTAMP",
        }
    }
}

/// Queue sizes read with ioctl.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueLen {
    /// SIOCINQ: unread received bytes (the peer's FIN not counted).
    Inq,
    /// SIOCOUTQ: `write_seq - snd_una`, unacknowledged + unsent (+ our FIN).
    Outq,
    /// SIOCOUTQNSD: `write_seq - snd_nxt`, never sent (+ our FIN if not sent).
    OutqNotSent,
}

impl QueueLen {
    /// The ioctl's C name.
    pub fn name(self) -> &'static str {
        match self {
            QueueLen::Inq => "SIOCINQ",
            QueueLen::Outq => "SIOCOUTQ",
            QueueLen::OutqNotSent => "SIOCOUTQNSD",
        }
    }

    fn request(self) -> u64 {
        match self {
            QueueLen::Inq => SIOCINQ,
            QueueLen::Outq => SIOCOUTQ,
            QueueLen::OutqNotSent => SIOCOUTQNSD,
        }
    }
}

/// `struct tcp_repair_opt`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RepairOpt {
    /// TCPOPT_*
    pub code: u32,
    /// Value (see [`TCPOPT_WINDOW`]).
    pub val: u32,
}

/// `struct tcp_repair_window` (the 20-byte layout every kernel since 4.8 accepts).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RepairWindow {
    /// snd_wl1
    pub snd_wl1: u32,
    /// snd_wnd
    pub snd_wnd: u32,
    /// max_window
    pub max_window: u32,
    /// rcv_wnd
    pub rcv_wnd: u32,
    /// rcv_wup
    pub rcv_wup: u32,
}

/// The fields of `struct tcp_info` this crate and its tests use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TcpInfo {
    /// tcpi_state
    pub state: u8,
    /// tcpi_options (TCPI_OPT_*)
    pub options: u8,
    /// tcpi_snd_wscale
    pub snd_wscale: u8,
    /// tcpi_rcv_wscale
    pub rcv_wscale: u8,
    /// tcpi_retransmits
    pub retransmits: u8,
    /// tcpi_snd_mss
    pub snd_mss: u32,
    /// tcpi_unacked (segments)
    pub unacked: u32,
    /// tcpi_total_retrans
    pub total_retrans: u32,
    /// tcpi_bytes_acked
    pub bytes_acked: u64,
    /// tcpi_bytes_received
    pub bytes_received: u64,
}

impl TcpInfo {
    /// Parses the kernel's `struct tcp_info` (at least the first 136 bytes).
    pub fn parse(raw: &[u8]) -> io::Result<TcpInfo> {
        if raw.len() < 136 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("tcp_info is {} bytes, expected at least 136", raw.len()),
            ));
        }
        let u32_at = |off: usize| u32::from_ne_bytes(raw[off..off + 4].try_into().unwrap());
        let u64_at = |off: usize| u64::from_ne_bytes(raw[off..off + 8].try_into().unwrap());
        // `__u8 tcpi_snd_wscale : 4, tcpi_rcv_wscale : 4;` — C bit-fields fill from the low bits
        // on little-endian ABIs and from the high bits on big-endian ones.
        let ws = raw[6];
        let (snd_wscale, rcv_wscale) = if cfg!(target_endian = "little") {
            (ws & 0xf, ws >> 4)
        } else {
            (ws >> 4, ws & 0xf)
        };
        Ok(TcpInfo {
            state: raw[0],
            retransmits: raw[2],
            options: raw[5],
            snd_wscale,
            rcv_wscale,
            snd_mss: u32_at(16),
            unacked: u32_at(24),
            total_retrans: u32_at(100),
            bytes_acked: u64_at(120),
            bytes_received: u64_at(128),
        })
    }
}

/// A FIN+ACK segment "from the peer" that restore injects over loopback so the restored
/// socket sees the peer's FIN again (CLOSE_WAIT). No payload, no options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FinSegment {
    /// The peer's address: the segment's source.
    pub from: SocketAddr,
    /// Our address: the segment's destination (must be local in this netns).
    pub to: SocketAddr,
    /// Sequence number: the peer's FIN (our `rcv_nxt` before it).
    pub seq: u32,
    /// Acknowledgment number: our `snd_una` (acknowledges nothing new).
    pub ack: u32,
    /// Window field, unscaled (the peer's window >> snd_wscale).
    pub window: u16,
}

impl FinSegment {
    /// The IP packet (IPv4 or IPv6 header + TCP header), checksums filled in. v4-mapped IPv6
    /// addresses give an IPv4 packet.
    pub fn packet(&self) -> Vec<u8> {
        let (src, dst) = (unmap(self.from.ip()), unmap(self.to.ip()));
        let mut tcp = [0u8; 20];
        tcp[0..2].copy_from_slice(&self.from.port().to_be_bytes());
        tcp[2..4].copy_from_slice(&self.to.port().to_be_bytes());
        tcp[4..8].copy_from_slice(&self.seq.to_be_bytes());
        tcp[8..12].copy_from_slice(&self.ack.to_be_bytes());
        tcp[12] = 5 << 4; // data offset: 5 words, no options
        tcp[13] = 0x11; // FIN | ACK
        tcp[14..16].copy_from_slice(&self.window.to_be_bytes());
        let mut pkt = Vec::with_capacity(60);
        let mut sum = Checksum::default();
        match (src, dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let mut ip = [0u8; 20];
                ip[0] = 0x45;
                ip[2..4].copy_from_slice(&40u16.to_be_bytes());
                ip[6] = 0x40; // DF
                ip[8] = 64; // TTL
                ip[9] = libc::IPPROTO_TCP as u8;
                ip[12..16].copy_from_slice(&s.octets());
                ip[16..20].copy_from_slice(&d.octets());
                let mut ipsum = Checksum::default();
                ipsum.add(&ip);
                ip[10..12].copy_from_slice(&ipsum.finish().to_be_bytes());
                sum.add(&s.octets());
                sum.add(&d.octets());
                sum.add(&[0, libc::IPPROTO_TCP as u8, 0, 20]);
                pkt.extend_from_slice(&ip);
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let mut ip = [0u8; 40];
                ip[0] = 0x60;
                ip[4..6].copy_from_slice(&20u16.to_be_bytes());
                ip[6] = libc::IPPROTO_TCP as u8;
                ip[7] = 64; // hop limit
                ip[8..24].copy_from_slice(&s.octets());
                ip[24..40].copy_from_slice(&d.octets());
                sum.add(&s.octets());
                sum.add(&d.octets());
                sum.add(&[0, 0, 0, 20, 0, 0, 0, libc::IPPROTO_TCP as u8]);
                pkt.extend_from_slice(&ip);
            }
            _ => unreachable!("FinSegment with mixed address families"),
        }
        sum.add(&tcp);
        tcp[16..18].copy_from_slice(&sum.finish().to_be_bytes());
        pkt.extend_from_slice(&tcp);
        pkt
    }
}

/// An IPv4 address inside a v4-mapped IPv6 address, else the address itself.
pub fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// RFC 1071 one's-complement sum.
#[derive(Default)]
struct Checksum(u32);

impl Checksum {
    fn add(&mut self, bytes: &[u8]) {
        for pair in bytes.chunks(2) {
            let word = u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]);
            self.0 += u32::from(word);
        }
    }

    fn finish(&self) -> u16 {
        let mut s = self.0;
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        !(s as u16)
    }
}

/// The raw calls of TCP repair. All take the socket's raw descriptor; none closes it.
pub trait Sys {
    /// `socket(family, SOCK_STREAM | SOCK_CLOEXEC, IPPROTO_TCP)`.
    fn socket(&self, family: Family) -> io::Result<OwnedFd>;
    /// `getsockopt` of an int option.
    fn get_int(&self, fd: RawFd, opt: IntOpt) -> io::Result<i32>;
    /// `setsockopt` of an int option.
    fn set_int(&self, fd: RawFd, opt: IntOpt, val: i32) -> io::Result<()>;
    /// `getsockopt(TCP_INFO)`.
    fn tcp_info(&self, fd: RawFd) -> io::Result<TcpInfo>;
    /// `setsockopt(TCP_REPAIR_OPTIONS)`.
    fn set_repair_options(&self, fd: RawFd, opts: &[RepairOpt]) -> io::Result<()>;
    /// `getsockopt(TCP_REPAIR_WINDOW)` (repair mode).
    fn repair_window(&self, fd: RawFd) -> io::Result<RepairWindow>;
    /// `setsockopt(TCP_REPAIR_WINDOW)` (repair mode).
    fn set_repair_window(&self, fd: RawFd, w: &RepairWindow) -> io::Result<()>;
    /// `ioctl(SIOCINQ | SIOCOUTQ | SIOCOUTQNSD)`.
    fn queue_len(&self, fd: RawFd, which: QueueLen) -> io::Result<u32>;
    /// `recv(MSG_PEEK | MSG_DONTWAIT)`: in repair mode, the queue selected by TCP_REPAIR_QUEUE.
    fn peek(&self, fd: RawFd, buf: &mut [u8]) -> io::Result<usize>;
    /// `send(MSG_DONTWAIT | MSG_NOSIGNAL)`: in repair mode, into the queue selected by
    /// TCP_REPAIR_QUEUE without transmitting anything.
    fn send(&self, fd: RawFd, buf: &[u8]) -> io::Result<usize>;
    /// `poll(POLLOUT)`: true if writable within `timeout`.
    fn wait_writable(&self, fd: RawFd, timeout: Duration) -> io::Result<bool>;
    /// `bind()`.
    fn bind(&self, fd: RawFd, addr: &SocketAddr) -> io::Result<()>;
    /// `connect()` (in repair mode: no SYN, the socket is ESTABLISHED at once).
    fn connect(&self, fd: RawFd, addr: &SocketAddr) -> io::Result<()>;
    /// `getsockname()`.
    fn local_addr(&self, fd: RawFd) -> io::Result<SocketAddr>;
    /// `getpeername()`.
    fn peer_addr(&self, fd: RawFd) -> io::Result<SocketAddr>;
    /// `shutdown(SHUT_WR)`.
    fn shutdown_write(&self, fd: RawFd) -> io::Result<()>;
    /// Sends `seg` through a raw socket (IPPROTO_RAW: we write the IP header) created in the
    /// calling thread's network namespace. Needs CAP_NET_RAW.
    fn inject_fin(&self, seg: &FinSegment) -> io::Result<()>;
}

/// The real system calls, through the `libc` crate.
#[derive(Debug, Clone, Copy, Default)]
pub struct LibcSys;

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn cvt_size(ret: libc::ssize_t) -> io::Result<usize> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as usize)
    }
}

/// A `sockaddr_storage` and its length for `addr`.
fn to_sockaddr(addr: &SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_storage is larger than and suitably aligned for sockaddr_in.
            unsafe { std::ptr::write((&raw mut ss).cast::<libc::sockaddr_in>(), sin) };
            mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: a.flowinfo(),
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: a.scope_id(),
            };
            // SAFETY: sockaddr_storage is larger than and suitably aligned for sockaddr_in6.
            unsafe { std::ptr::write((&raw mut ss).cast::<libc::sockaddr_in6>(), sin6) };
            mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (ss, len as libc::socklen_t)
}

fn from_sockaddr(ss: &libc::sockaddr_storage) -> io::Result<SocketAddr> {
    match ss.ss_family as i32 {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let sin =
                unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            Ok(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(sin.sin_addr.s_addr.to_ne_bytes()),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let sin6 =
                unsafe { &*(ss as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            Ok(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        f => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("unexpected address family {f}"),
        )),
    }
}

type NameFn =
    unsafe extern "C" fn(libc::c_int, *mut libc::sockaddr, *mut libc::socklen_t) -> libc::c_int;

fn sock_name(fd: RawFd, f: NameFn) -> io::Result<SocketAddr> {
    // SAFETY: plain old data, zero is valid.
    let mut ss: libc::sockaddr_storage = unsafe { mem::zeroed() };
    let mut len = mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: ss/len describe a writable buffer of the stated size.
    cvt(unsafe { f(fd, (&raw mut ss).cast(), &mut len) })?;
    from_sockaddr(&ss)
}

/// `setsockopt` with a typed value.
fn setsockopt_raw<T>(fd: RawFd, level: i32, name: i32, val: &T) -> io::Result<()> {
    // SAFETY: `val` points to size_of::<T>() readable bytes for the duration of the call.
    cvt(unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (val as *const T).cast(),
            mem::size_of::<T>() as libc::socklen_t,
        )
    })
    .map(drop)
}

impl Sys for LibcSys {
    fn socket(&self, family: Family) -> io::Result<OwnedFd> {
        let domain = match family {
            Family::V4 => libc::AF_INET,
            Family::V6 => libc::AF_INET6,
        };
        // SAFETY: socket() takes no pointers.
        let fd = cvt(unsafe {
            libc::socket(
                domain,
                libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
                libc::IPPROTO_TCP,
            )
        })?;
        // SAFETY: fd is a fresh descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    fn get_int(&self, fd: RawFd, opt: IntOpt) -> io::Result<i32> {
        let (level, name) = opt.level_name();
        let mut val: libc::c_int = 0;
        let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: val/len describe a writable c_int.
        cvt(unsafe { libc::getsockopt(fd, level, name, (&raw mut val).cast(), &mut len) })?;
        Ok(val)
    }

    fn set_int(&self, fd: RawFd, opt: IntOpt, val: i32) -> io::Result<()> {
        let (level, name) = opt.level_name();
        setsockopt_raw(fd, level, name, &val)
    }

    fn tcp_info(&self, fd: RawFd) -> io::Result<TcpInfo> {
        let mut buf = [0u8; 256];
        let mut len = buf.len() as libc::socklen_t;
        // SAFETY: buf/len describe a writable buffer of the stated size.
        cvt(unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_TCP,
                libc::TCP_INFO,
                buf.as_mut_ptr().cast(),
                &mut len,
            )
        })?;
        TcpInfo::parse(&buf[..len as usize])
    }

    fn set_repair_options(&self, fd: RawFd, opts: &[RepairOpt]) -> io::Result<()> {
        // SAFETY: `opts` is a slice of repr(C) tcp_repair_opt, readable for its byte length.
        cvt(unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_TCP,
                libc::TCP_REPAIR_OPTIONS,
                opts.as_ptr().cast(),
                mem::size_of_val(opts) as libc::socklen_t,
            )
        })
        .map(drop)
    }

    fn repair_window(&self, fd: RawFd) -> io::Result<RepairWindow> {
        let mut w = MaybeUninit::<RepairWindow>::zeroed();
        let mut len = mem::size_of::<RepairWindow>() as libc::socklen_t;
        // SAFETY: w/len describe a writable repr(C) struct of the stated size.
        cvt(unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_TCP,
                TCP_REPAIR_WINDOW,
                w.as_mut_ptr().cast(),
                &mut len,
            )
        })?;
        // SAFETY: zero-initialised plain integers, possibly overwritten by the kernel.
        Ok(unsafe { w.assume_init() })
    }

    fn set_repair_window(&self, fd: RawFd, w: &RepairWindow) -> io::Result<()> {
        setsockopt_raw(fd, libc::SOL_TCP, TCP_REPAIR_WINDOW, w)
    }

    fn queue_len(&self, fd: RawFd, which: QueueLen) -> io::Result<u32> {
        let mut val: libc::c_int = 0;
        // SAFETY: these ioctls write one c_int through the pointer.
        cvt(unsafe { libc::ioctl(fd, which.request() as libc::Ioctl, &mut val) })?;
        Ok(val as u32)
    }

    fn peek(&self, fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: buf is writable for its length.
        cvt_size(unsafe {
            libc::recv(
                fd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_PEEK | libc::MSG_DONTWAIT,
            )
        })
    }

    fn send(&self, fd: RawFd, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: buf is readable for its length.
        cvt_size(unsafe {
            libc::send(
                fd,
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        })
    }

    fn wait_writable(&self, fd: RawFd, timeout: Duration) -> io::Result<bool> {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLOUT,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd.
        let n = cvt(unsafe { libc::poll(&mut pfd, 1, ms) })?;
        Ok(n > 0 && pfd.revents & libc::POLLOUT != 0)
    }

    fn bind(&self, fd: RawFd, addr: &SocketAddr) -> io::Result<()> {
        let (ss, len) = to_sockaddr(addr);
        // SAFETY: ss holds a sockaddr of `len` bytes.
        cvt(unsafe { libc::bind(fd, (&raw const ss).cast(), len) }).map(drop)
    }

    fn connect(&self, fd: RawFd, addr: &SocketAddr) -> io::Result<()> {
        let (ss, len) = to_sockaddr(addr);
        // SAFETY: ss holds a sockaddr of `len` bytes.
        cvt(unsafe { libc::connect(fd, (&raw const ss).cast(), len) }).map(drop)
    }

    fn local_addr(&self, fd: RawFd) -> io::Result<SocketAddr> {
        sock_name(fd, libc::getsockname)
    }

    fn peer_addr(&self, fd: RawFd) -> io::Result<SocketAddr> {
        sock_name(fd, libc::getpeername)
    }

    fn shutdown_write(&self, fd: RawFd) -> io::Result<()> {
        // SAFETY: no pointers.
        cvt(unsafe { libc::shutdown(fd, libc::SHUT_WR) }).map(drop)
    }

    fn inject_fin(&self, seg: &FinSegment) -> io::Result<()> {
        let pkt = seg.packet();
        let dst = SocketAddr::new(unmap(seg.to.ip()), 0);
        let domain = match dst {
            SocketAddr::V4(_) => libc::AF_INET,
            SocketAddr::V6(_) => libc::AF_INET6,
        };
        // IPPROTO_RAW implies IP_HDRINCL / IPV6_HDRINCL: the packet carries its own IP header,
        // so its source can be the peer's (non-local) address.
        // SAFETY: socket() takes no pointers.
        let raw = cvt(unsafe {
            libc::socket(
                domain,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::IPPROTO_RAW,
            )
        })?;
        // SAFETY: raw is a fresh descriptor that nothing else owns.
        let raw = unsafe { OwnedFd::from_raw_fd(raw) };
        let (ss, len) = to_sockaddr(&dst);
        use std::os::fd::AsRawFd;
        // SAFETY: pkt is readable for its length; ss holds a sockaddr of `len` bytes.
        let n = cvt_size(unsafe {
            libc::sendto(
                raw.as_raw_fd(),
                pkt.as_ptr().cast(),
                pkt.len(),
                0,
                (&raw const ss).cast(),
                len,
            )
        })?;
        if n != pkt.len() {
            return Err(io::Error::other(format!(
                "raw send wrote {n} of {} bytes",
                pkt.len()
            )));
        }
        Ok(())
    }
}

#[cfg(any(test, feature = "fake"))]
pub use fake::{Call, FakeSocket, FakeSys};

#[cfg(any(test, feature = "fake"))]
mod fake {
    //! A model of one TCP socket with the kernel's repair-mode rules that matter for the order
    //! of operations (e.g. TCP_QUEUE_SEQ only before connect, TCP_REPAIR_OPTIONS only after).

    use super::*;
    use std::cell::RefCell;

    /// One recorded call.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum Call {
        /// socket()
        Socket(Family),
        /// getsockopt(int)
        GetInt(IntOpt),
        /// setsockopt(int)
        SetInt(IntOpt, i32),
        /// getsockopt(TCP_INFO)
        TcpInfo,
        /// setsockopt(TCP_REPAIR_OPTIONS)
        SetRepairOptions(Vec<RepairOpt>),
        /// getsockopt(TCP_REPAIR_WINDOW)
        GetRepairWindow,
        /// setsockopt(TCP_REPAIR_WINDOW)
        SetRepairWindow(RepairWindow),
        /// ioctl
        QueueLen(QueueLen),
        /// recv(MSG_PEEK) with this buffer length
        Peek(usize),
        /// send() of these bytes
        Send(Vec<u8>),
        /// poll(POLLOUT)
        WaitWritable,
        /// bind()
        Bind(SocketAddr),
        /// connect()
        Connect(SocketAddr),
        /// getsockname()
        LocalAddr,
        /// getpeername()
        PeerAddr,
        /// shutdown(SHUT_WR)
        ShutdownWrite,
        /// raw FIN injection
        InjectFin(FinSegment),
    }

    impl Call {
        /// True for calls that change the socket (anything but reads).
        pub fn mutates(&self) -> bool {
            !matches!(
                self,
                Call::GetInt(_)
                    | Call::TcpInfo
                    | Call::GetRepairWindow
                    | Call::QueueLen(_)
                    | Call::Peek(_)
                    | Call::LocalAddr
                    | Call::PeerAddr
                    | Call::WaitWritable
            )
        }
    }

    /// The modelled socket. Public so tests can set it up and inspect it.
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub struct FakeSocket {
        /// SO_DOMAIN
        pub domain: i32,
        /// SO_PROTOCOL
        pub protocol: i32,
        /// tcpi_state
        pub state: u8,
        /// tcpi_options
        pub options: u8,
        /// tcpi_snd_wscale
        pub snd_wscale: u8,
        /// tcpi_rcv_wscale
        pub rcv_wscale: u8,
        /// TCP_REPAIR
        pub repair: bool,
        /// TCP_REPAIR_QUEUE
        pub repair_queue: i32,
        /// write_seq
        pub write_seq: u32,
        /// rcv_nxt
        pub rcv_nxt: u32,
        /// unread received bytes
        pub recv_queue: Vec<u8>,
        /// sent, unacknowledged bytes
        pub unacked: Vec<u8>,
        /// never-sent bytes
        pub unsent: Vec<u8>,
        /// our FIN: None, Some(false) queued not sent, Some(true) sent or acked
        pub our_fin: Option<bool>,
        /// our FIN was acknowledged (FIN_WAIT2): not counted in SIOCOUTQ
        pub our_fin_acked: bool,
        /// peer's FIN received
        pub peer_fin: bool,
        /// TCP_MAXSEG in repair mode
        pub mss: u32,
        /// TCP_TIMESTAMP
        pub timestamp: u32,
        /// TCP_REPAIR_WINDOW
        pub window: RepairWindow,
        /// SO_SNDBUF
        pub sndbuf: i32,
        /// SO_RCVBUF
        pub rcvbuf: i32,
        /// SO_REUSEADDR
        pub reuse_addr: bool,
        /// bound address
        pub local: Option<SocketAddr>,
        /// connected address
        pub peer: Option<SocketAddr>,
        /// whether TCP_REPAIR_OPTIONS may still be set (no byte written to the send queue)
        pub bytes_sent: bool,
    }

    impl Default for FakeSocket {
        fn default() -> Self {
            FakeSocket {
                domain: libc::AF_INET,
                protocol: libc::IPPROTO_TCP,
                state: 7, // CLOSE
                options: 0,
                snd_wscale: 0,
                rcv_wscale: 0,
                repair: false,
                repair_queue: TCP_NO_QUEUE,
                write_seq: 0,
                rcv_nxt: 0,
                recv_queue: vec![],
                unacked: vec![],
                unsent: vec![],
                our_fin: None,
                our_fin_acked: false,
                peer_fin: false,
                mss: 0,
                timestamp: 0,
                window: RepairWindow::default(),
                sndbuf: 16384,
                rcvbuf: 131072,
                reuse_addr: false,
                local: None,
                peer: None,
                bytes_sent: false,
            }
        }
    }

    /// The fake: one [`FakeSocket`] (whatever the descriptor), a log of calls, and optionally
    /// one call that fails.
    #[derive(Debug, Default)]
    pub struct FakeSys {
        sock: RefCell<FakeSocket>,
        calls: RefCell<Vec<Call>>,
        fail: RefCell<Option<(Call, i32)>>,
    }

    fn errno(e: i32) -> io::Error {
        io::Error::from_raw_os_error(e)
    }

    impl FakeSys {
        /// A fake around `sock`.
        pub fn new(sock: FakeSocket) -> FakeSys {
            FakeSys {
                sock: RefCell::new(sock),
                ..FakeSys::default()
            }
        }

        /// Makes the first call equal to `call` fail with `errno`.
        pub fn fail_on(&self, call: Call, errno: i32) {
            *self.fail.borrow_mut() = Some((call, errno));
        }

        /// The calls made so far.
        pub fn calls(&self) -> Vec<Call> {
            self.calls.borrow().clone()
        }

        /// The socket's current state.
        pub fn socket_state(&self) -> FakeSocket {
            self.sock.borrow().clone()
        }

        fn record(&self, call: Call) -> io::Result<()> {
            let mut fail = self.fail.borrow_mut();
            let hit = matches!(&*fail, Some((c, _)) if *c == call);
            self.calls.borrow_mut().push(call);
            if hit {
                let (_, e) = fail.take().expect("checked");
                return Err(errno(e));
            }
            Ok(())
        }

        fn outq(s: &FakeSocket) -> u32 {
            (s.unacked.len() + s.unsent.len()) as u32
                + u32::from(s.our_fin.is_some() && !s.our_fin_acked)
        }
    }

    impl Sys for FakeSys {
        fn socket(&self, family: Family) -> io::Result<OwnedFd> {
            self.record(Call::Socket(family))?;
            let mut s = self.sock.borrow_mut();
            *s = FakeSocket {
                domain: match family {
                    Family::V4 => libc::AF_INET,
                    Family::V6 => libc::AF_INET6,
                },
                ..FakeSocket::default()
            };
            // Any descriptor will do: nothing but Drop touches it.
            Ok(std::fs::File::open("/dev/null")?.into())
        }

        fn get_int(&self, _fd: RawFd, opt: IntOpt) -> io::Result<i32> {
            self.record(Call::GetInt(opt))?;
            let s = self.sock.borrow();
            match opt {
                IntOpt::Domain => Ok(s.domain),
                IntOpt::Type => Ok(libc::SOCK_STREAM),
                IntOpt::Protocol => Ok(s.protocol),
                IntOpt::SoError => Ok(0),
                IntOpt::ReuseAddr => Ok(i32::from(s.reuse_addr)),
                IntOpt::SndBuf => Ok(s.sndbuf),
                IntOpt::RcvBuf => Ok(s.rcvbuf),
                IntOpt::MaxSeg => Ok(s.mss as i32),
                IntOpt::Timestamp => Ok(s.timestamp as i32),
                IntOpt::QueueSeq => match s.repair_queue {
                    TCP_SEND_QUEUE => Ok(s.write_seq as i32),
                    TCP_RECV_QUEUE => Ok(s.rcv_nxt as i32),
                    _ => Err(errno(libc::EINVAL)),
                },
                _ => Err(errno(libc::ENOPROTOOPT)),
            }
        }

        fn set_int(&self, _fd: RawFd, opt: IntOpt, val: i32) -> io::Result<()> {
            self.record(Call::SetInt(opt, val))?;
            let mut s = self.sock.borrow_mut();
            match opt {
                IntOpt::Repair => {
                    if s.state == 10 {
                        return Err(errno(libc::EPERM));
                    }
                    s.repair = val == TCP_REPAIR_ON;
                }
                IntOpt::RepairQueue => {
                    if !s.repair {
                        return Err(errno(libc::EPERM));
                    }
                    s.repair_queue = val;
                }
                IntOpt::QueueSeq => {
                    if s.state != 7 {
                        return Err(errno(libc::EPERM));
                    }
                    match s.repair_queue {
                        TCP_SEND_QUEUE => s.write_seq = val as u32,
                        TCP_RECV_QUEUE => s.rcv_nxt = val as u32,
                        _ => return Err(errno(libc::EINVAL)),
                    }
                }
                IntOpt::Timestamp => {
                    if !s.repair {
                        return Err(errno(libc::EPERM));
                    }
                    s.timestamp = val as u32;
                }
                IntOpt::ReuseAddr => s.reuse_addr = val != 0,
                IntOpt::SndBuf | IntOpt::SndBufForce => s.sndbuf = val.saturating_mul(2),
                IntOpt::RcvBuf | IntOpt::RcvBufForce => s.rcvbuf = val.saturating_mul(2),
                IntOpt::IpFreebind | IntOpt::Ipv6Freebind => {}
                IntOpt::MaxSeg => {
                    if val != 0 && !(88..=32767).contains(&val) {
                        return Err(errno(libc::EINVAL));
                    }
                }
                _ => return Err(errno(libc::ENOPROTOOPT)),
            }
            Ok(())
        }

        fn tcp_info(&self, _fd: RawFd) -> io::Result<TcpInfo> {
            self.record(Call::TcpInfo)?;
            let s = self.sock.borrow();
            Ok(TcpInfo {
                state: s.state,
                options: s.options,
                snd_wscale: s.snd_wscale,
                rcv_wscale: s.rcv_wscale,
                ..TcpInfo::default()
            })
        }

        fn set_repair_options(&self, _fd: RawFd, opts: &[RepairOpt]) -> io::Result<()> {
            self.record(Call::SetRepairOptions(opts.to_vec()))?;
            let mut s = self.sock.borrow_mut();
            if !s.repair {
                return Err(errno(libc::EINVAL));
            }
            if s.state != 1 || s.bytes_sent {
                return Err(errno(libc::EPERM));
            }
            for o in opts {
                match o.code {
                    TCPOPT_MSS => s.mss = o.val,
                    TCPOPT_WINDOW => {
                        s.snd_wscale = (o.val & 0xffff) as u8;
                        s.rcv_wscale = (o.val >> 16) as u8;
                        s.options |= TCPI_OPT_WSCALE;
                    }
                    TCPOPT_SACK_PERM => s.options |= TCPI_OPT_SACK,
                    TCPOPT_TIMESTAMP => s.options |= TCPI_OPT_TIMESTAMPS,
                    _ => {}
                }
            }
            Ok(())
        }

        fn repair_window(&self, _fd: RawFd) -> io::Result<RepairWindow> {
            self.record(Call::GetRepairWindow)?;
            let s = self.sock.borrow();
            if !s.repair {
                return Err(errno(libc::EPERM));
            }
            Ok(s.window)
        }

        fn set_repair_window(&self, _fd: RawFd, w: &RepairWindow) -> io::Result<()> {
            self.record(Call::SetRepairWindow(*w))?;
            let mut s = self.sock.borrow_mut();
            if !s.repair {
                return Err(errno(libc::EPERM));
            }
            if w.max_window < w.snd_wnd || (w.rcv_wup.wrapping_sub(s.rcv_nxt) as i32) > 0 {
                return Err(errno(libc::EINVAL));
            }
            s.window = *w;
            Ok(())
        }

        fn queue_len(&self, _fd: RawFd, which: QueueLen) -> io::Result<u32> {
            self.record(Call::QueueLen(which))?;
            let s = self.sock.borrow();
            Ok(match which {
                QueueLen::Inq => s.recv_queue.len() as u32,
                QueueLen::Outq => Self::outq(&s),
                QueueLen::OutqNotSent => {
                    s.unsent.len() as u32 + u32::from(s.our_fin == Some(false))
                }
            })
        }

        fn peek(&self, _fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
            self.record(Call::Peek(buf.len()))?;
            let s = self.sock.borrow();
            let data: Vec<u8> = match (s.repair, s.repair_queue) {
                (true, TCP_SEND_QUEUE) => [s.unacked.as_slice(), s.unsent.as_slice()].concat(),
                (true, TCP_RECV_QUEUE) | (false, _) => s.recv_queue.clone(),
                (true, _) => return Err(errno(libc::EINVAL)),
            };
            if data.is_empty() {
                return Err(errno(libc::EAGAIN));
            }
            let n = data.len().min(buf.len());
            buf[..n].copy_from_slice(&data[..n]);
            Ok(n)
        }

        fn send(&self, _fd: RawFd, buf: &[u8]) -> io::Result<usize> {
            self.record(Call::Send(buf.to_vec()))?;
            let mut s = self.sock.borrow_mut();
            let n = buf.len() as u32;
            if s.our_fin.is_some() {
                return Err(errno(libc::EPIPE));
            }
            match (s.repair, s.repair_queue) {
                (true, TCP_RECV_QUEUE) => {
                    s.recv_queue.extend_from_slice(buf);
                    s.rcv_nxt = s.rcv_nxt.wrapping_add(n);
                }
                (true, TCP_SEND_QUEUE) => {
                    s.unacked.extend_from_slice(buf);
                    s.write_seq = s.write_seq.wrapping_add(n);
                    s.bytes_sent = true;
                }
                (true, _) => return Err(errno(libc::EINVAL)),
                (false, _) => {
                    s.unsent.extend_from_slice(buf);
                    s.write_seq = s.write_seq.wrapping_add(n);
                }
            }
            Ok(buf.len())
        }

        fn wait_writable(&self, _fd: RawFd, _timeout: Duration) -> io::Result<bool> {
            self.record(Call::WaitWritable)?;
            Ok(true)
        }

        fn bind(&self, _fd: RawFd, addr: &SocketAddr) -> io::Result<()> {
            self.record(Call::Bind(*addr))?;
            self.sock.borrow_mut().local = Some(*addr);
            Ok(())
        }

        fn connect(&self, _fd: RawFd, addr: &SocketAddr) -> io::Result<()> {
            self.record(Call::Connect(*addr))?;
            let mut s = self.sock.borrow_mut();
            if !s.repair {
                return Err(errno(libc::EINPROGRESS));
            }
            s.peer = Some(*addr);
            s.state = 1;
            Ok(())
        }

        fn local_addr(&self, _fd: RawFd) -> io::Result<SocketAddr> {
            self.record(Call::LocalAddr)?;
            self.sock.borrow().local.ok_or_else(|| errno(libc::EINVAL))
        }

        fn peer_addr(&self, _fd: RawFd) -> io::Result<SocketAddr> {
            self.record(Call::PeerAddr)?;
            self.sock.borrow().peer.ok_or_else(|| errno(libc::ENOTCONN))
        }

        fn shutdown_write(&self, _fd: RawFd) -> io::Result<()> {
            self.record(Call::ShutdownWrite)?;
            let mut s = self.sock.borrow_mut();
            let sent_silently = s.repair && s.repair_queue == TCP_SEND_QUEUE;
            s.our_fin = Some(sent_silently || s.unsent.is_empty());
            s.write_seq = s.write_seq.wrapping_add(1);
            s.state = match s.state {
                1 => 4, // ESTABLISHED -> FIN_WAIT1
                8 => 9, // CLOSE_WAIT -> LAST_ACK
                other => other,
            };
            Ok(())
        }

        fn inject_fin(&self, seg: &FinSegment) -> io::Result<()> {
            self.record(Call::InjectFin(*seg))?;
            let mut s = self.sock.borrow_mut();
            if seg.seq != s.rcv_nxt {
                return Ok(()); // out of window: the kernel would drop it
            }
            s.peer_fin = true;
            s.rcv_nxt = s.rcv_nxt.wrapping_add(1);
            if s.state == 1 {
                s.state = 8; // CLOSE_WAIT
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_info_parses_wscale_nibbles() {
        let mut raw = [0u8; 232];
        raw[0] = 8;
        raw[5] = TCPI_OPT_WSCALE | TCPI_OPT_SACK;
        raw[6] = 0x97; // rcv 9, snd 7 on little-endian
        raw[100..104].copy_from_slice(&3u32.to_ne_bytes());
        raw[128..136].copy_from_slice(&12345u64.to_ne_bytes());
        let info = TcpInfo::parse(&raw).unwrap();
        assert_eq!(info.state, 8);
        if cfg!(target_endian = "little") {
            assert_eq!((info.snd_wscale, info.rcv_wscale), (7, 9));
        }
        assert_eq!(info.total_retrans, 3);
        assert_eq!(info.bytes_received, 12345);
        assert!(TcpInfo::parse(&raw[..100]).is_err());
    }

    fn verify(sum_over: &[&[u8]]) -> u16 {
        let mut c = Checksum::default();
        for b in sum_over {
            c.add(b);
        }
        c.finish()
    }

    #[test]
    fn fin_segment_v4_checksums_verify() {
        let seg = FinSegment {
            from: "10.99.0.1:40000".parse().unwrap(),
            to: "10.99.0.2:5000".parse().unwrap(),
            seq: 0xdead_beef,
            ack: 7,
            window: 512,
        };
        let p = seg.packet();
        assert_eq!(p.len(), 40);
        assert_eq!(verify(&[&p[..20]]), 0, "IPv4 header checksum");
        let pseudo = [&p[12..20], &[0, 6, 0, 20][..], &p[20..]];
        assert_eq!(verify(&pseudo), 0, "TCP checksum");
        assert_eq!(&p[20..22], &40000u16.to_be_bytes());
        assert_eq!(p[33], 0x11);
        assert_eq!(&p[24..28], &0xdead_beefu32.to_be_bytes());
    }

    #[test]
    fn fin_segment_v6_and_mapped() {
        let seg = FinSegment {
            from: "[fd99::1]:40000".parse().unwrap(),
            to: "[fd99::2]:5000".parse().unwrap(),
            seq: 1,
            ack: 2,
            window: 3,
        };
        let p = seg.packet();
        assert_eq!(p.len(), 60);
        let pseudo = [&p[8..40], &[0, 0, 0, 20, 0, 0, 0, 6][..], &p[40..]];
        assert_eq!(
            verify(&pseudo),
            0,
            "TCP checksum over the IPv6 pseudo-header"
        );

        let mapped = FinSegment {
            from: "[::ffff:10.99.0.1]:40000".parse().unwrap(),
            to: "[::ffff:10.99.0.2]:5000".parse().unwrap(),
            ..seg
        };
        assert_eq!(mapped.packet().len(), 40, "v4-mapped gives an IPv4 packet");
    }

    #[test]
    fn sockaddr_round_trip() {
        for a in ["10.99.0.2:5000", "[fd99::2]:5000", "[::ffff:10.0.0.1]:1"] {
            let a: SocketAddr = a.parse().unwrap();
            let (ss, _) = to_sockaddr(&a);
            assert_eq!(from_sockaddr(&ss).unwrap(), a);
        }
    }
}
