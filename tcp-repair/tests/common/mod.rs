//! A two-namespace lab for the real-kernel tests: `<prefix>a` (the client, 10.99.0.1 and
//! fd99::1) and `<prefix>b` (the server, 10.99.0.2 and fd99::2) joined by a veth pair. The
//! prefix is `ftr` + random hex, so tests run side by side; the namespaces (and with them the
//! veths and nftables rules) are deleted when the [`Lab`] is dropped, also on panic.
//!
//! Each namespace gets an nftables table `inet ftr` that counts every RST and FIN in and out,
//! and a `hold` chain that, when filled, drops TCP arriving from the veth (ferry's hold, in
//! miniature; like ferry's hold it does not see loopback).

#![allow(dead_code)]

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::time::{Duration, Instant};

use ferry_tcp_repair::sys::{LibcSys, QueueLen, Sys, TcpInfo};

/// Runs a test only as root: without root it panics under CI=true and skips (prints SKIP)
/// otherwise. Same for the `ip` and `nft` tools.
pub fn require_root(test: &str) -> bool {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let tools = ["ip", "nft"].iter().all(|t| {
        Command::new(t)
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if root && tools {
        return true;
    }
    let why = if root {
        "needs the ip and nft tools (iproute2, nftables)"
    } else {
        "needs root"
    };
    if ci {
        panic!("{test}: {why} (CI=true)");
    }
    eprintln!("SKIP {test}: {why}");
    false
}

fn random_hex() -> String {
    let mut b = [0u8; 4];
    // SAFETY: b is writable for its length.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    assert_eq!(n, 4, "getrandom");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn run(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Which end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Namespace `a`: the client.
    Client,
    /// Namespace `b`: the server, whose socket is dumped and restored.
    Server,
}

/// The lab. Dropping it deletes both namespaces.
pub struct Lab {
    pub prefix: String,
    created: Vec<String>,
}

impl Lab {
    pub fn new() -> Lab {
        let prefix = format!("ftr{}", random_hex());
        let mut lab = Lab {
            prefix: prefix.clone(),
            created: vec![],
        };
        for side in [Side::Client, Side::Server] {
            let ns = lab.ns(side);
            run(&["ip", "netns", "add", &ns]);
            lab.created.push(ns);
        }
        let (a, b) = (lab.ns(Side::Client), lab.ns(Side::Server));
        let (va, vb) = (format!("{prefix}va"), format!("{prefix}vb"));
        run(&[
            "ip", "link", "add", &va, "netns", &a, "type", "veth", "peer", "name", &vb, "netns", &b,
        ]);
        for (ns, dev, v4, v6) in [
            (&a, &va, "10.99.0.1/24", "fd99::1/64"),
            (&b, &vb, "10.99.0.2/24", "fd99::2/64"),
        ] {
            let ip = |args: &[&str]| {
                let mut v = vec!["ip", "-n", ns.as_str()];
                v.extend_from_slice(args);
                run(&v);
            };
            ip(&["link", "set", "lo", "up"]);
            ip(&["addr", "add", v4, "dev", dev]);
            ip(&["addr", "add", v6, "dev", dev, "nodad"]);
            ip(&["link", "set", dev, "up"]);
            lab.nft(
                ns,
                "table inet ftr {
                   counter rst_in {}
                   counter rst_out {}
                   counter fin_in {}
                   counter fin_out {}
                   chain hold {}
                   chain input {
                     type filter hook input priority 0;
                     tcp flags & rst == rst counter name rst_in
                     tcp flags & fin == fin counter name fin_in
                     jump hold
                   }
                   chain output {
                     type filter hook output priority 0;
                     tcp flags & rst == rst counter name rst_out
                     tcp flags & fin == fin counter name fin_out
                   }
                 }
",
            );
        }
        // IPv6 neighbour discovery is not held (only TCP is), but wait for the link.
        lab.wait_ping();
        lab
    }

    pub fn ns(&self, side: Side) -> String {
        match side {
            Side::Client => format!("{}a", self.prefix),
            Side::Server => format!("{}b", self.prefix),
        }
    }

    pub fn addr(&self, side: Side, v6: bool) -> IpAddr {
        match (side, v6) {
            (Side::Client, false) => "10.99.0.1".parse().unwrap(),
            (Side::Server, false) => "10.99.0.2".parse().unwrap(),
            (Side::Client, true) => "fd99::1".parse().unwrap(),
            (Side::Server, true) => "fd99::2".parse().unwrap(),
        }
    }

    fn nft(&self, ns: &str, script: &str) {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, "nft", "-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn nft");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "nft: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Holds (drops) every TCP segment arriving in `side`'s namespace, or stops holding.
    pub fn hold(&self, side: Side, on: bool) {
        let ns = self.ns(side);
        if on {
            self.nft(
                &ns,
                "add rule inet ftr hold iifname != \"lo\" meta l4proto tcp drop\n",
            );
        } else {
            self.nft(&ns, "flush chain inet ftr hold\n");
        }
    }

    /// Packets counted by one of the counters (rst_in, rst_out, fin_in, fin_out).
    pub fn counter(&self, side: Side, name: &str) -> u64 {
        let out = run(&[
            "ip",
            "netns",
            "exec",
            &self.ns(side),
            "nft",
            "list",
            "counter",
            "inet",
            "ftr",
            name,
        ]);
        let packets = out
            .split_whitespace()
            .skip_while(|w| *w != "packets")
            .nth(1)
            .unwrap_or_else(|| panic!("no packets in {out}"));
        packets.parse().unwrap()
    }

    /// Asserts no RST went in or out of either namespace.
    pub fn assert_no_rst(&self) {
        for side in [Side::Client, Side::Server] {
            for c in ["rst_in", "rst_out"] {
                assert_eq!(self.counter(side, c), 0, "{side:?} {c}");
            }
        }
    }

    /// Runs `f` on a thread that entered `side`'s network namespace (sockets it creates live
    /// there, wherever they are used afterwards).
    pub fn in_ns<T: Send>(&self, side: Side, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.ns(side));
        std::thread::scope(|s| {
            let h = s.spawn(move || {
                let file = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
                // SAFETY: setns on this thread only, with a valid namespace descriptor.
                let r = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(r, 0, "setns {path}: {}", io::Error::last_os_error());
                f()
            });
            match h.join() {
                Ok(v) => v,
                Err(p) => std::panic::resume_unwind(p),
            }
        })
    }

    fn wait_ping(&self) {
        // The veth carrier comes up asynchronously; a connect before that only costs a SYN
        // retransmission, but be quick: wait for the link to report up.
        let deadline = Instant::now() + Duration::from_secs(5);
        let dev = format!("{}va", self.prefix);
        while Instant::now() < deadline {
            let out = run(&[
                "ip",
                "-n",
                &self.ns(Side::Client),
                "-o",
                "link",
                "show",
                &dev,
            ]);
            if out.contains("state UP") {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("veth {dev} did not come up");
    }

    /// A connected pair: (client in `a`, server in `b`, the server's listener).
    pub fn connect(&self, net: Net) -> (TcpStream, TcpStream, std::net::TcpListener) {
        let srv = self.addr(Side::Server, net == Net::V6);
        let listen_ip: IpAddr = match net {
            // A dual-stack listener: the accepted socket is AF_INET6 with v4-mapped addresses.
            Net::Mapped => "::".parse().unwrap(),
            _ => srv,
        };
        let listener = self.in_ns(Side::Server, || {
            std::net::TcpListener::bind(SocketAddr::new(listen_ip, 0)).unwrap()
        });
        let port = listener.local_addr().unwrap().port();
        let client = self.in_ns(Side::Client, || {
            TcpStream::connect_timeout(&SocketAddr::new(srv, port), Duration::from_secs(5)).unwrap()
        });
        let (server, _) = listener.accept().unwrap();
        for s in [&client, &server] {
            s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
            s.set_write_timeout(Some(Duration::from_secs(15))).unwrap();
        }
        (client, server, listener)
    }
}

/// Address family of a test connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Net {
    /// IPv4 sockets.
    V4,
    /// IPv6 sockets.
    V6,
    /// IPv4 client; the server's socket is IPv6 with v4-mapped addresses.
    Mapped,
}

impl Drop for Lab {
    fn drop(&mut self) {
        for ns in self.created.drain(..) {
            let ok = Command::new("ip")
                .args(["netns", "del", &ns])
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                eprintln!("warning: could not delete netns {ns}");
            }
        }
    }
}

/// Deterministic, non-periodic test bytes: byte `i` of stream `seed`.
pub fn pattern(seed: u8, offset: usize, len: usize) -> Vec<u8> {
    (offset..offset + len)
        .map(|i| {
            ((i as u64 ^ u64::from(seed) << 40).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8
        })
        .collect()
}

/// Reads exactly `n` bytes and checks them against `pattern(seed, offset, n)`.
pub fn expect_bytes(s: &mut TcpStream, seed: u8, offset: usize, n: usize) {
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf)
        .unwrap_or_else(|e| panic!("reading {n} bytes at offset {offset} of stream {seed}: {e}"));
    if buf != pattern(seed, offset, n) {
        let want = pattern(seed, offset, n);
        let first = buf.iter().zip(&want).position(|(a, b)| a != b).unwrap();
        panic!("stream {seed}: byte {} differs", offset + first);
    }
}

/// Reads until end of file and checks it came after exactly `n` bytes of the pattern.
pub fn expect_eof_after(s: &mut TcpStream, seed: u8, offset: usize, n: usize) {
    let mut buf = vec![];
    s.read_to_end(&mut buf)
        .unwrap_or_else(|e| panic!("reading to EOF of stream {seed}: {e}"));
    assert_eq!(buf.len(), n, "stream {seed}: bytes before EOF");
    assert!(buf == pattern(seed, offset, n), "stream {seed}: content");
    // End of file stays end of file.
    assert_eq!(s.read(&mut [0u8; 16]).unwrap(), 0);
}

/// Writes as much of `pattern(seed, offset, max)` as the socket takes without blocking.
pub fn write_nonblocking(s: &TcpStream, seed: u8, offset: usize, max: usize) -> usize {
    s.set_nonblocking(true).unwrap();
    let data = pattern(seed, offset, max);
    let mut off = 0;
    let mut w = s;
    while off < max {
        match w.write(&data[off..]) {
            Ok(n) => off += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("write: {e}"),
        }
    }
    s.set_nonblocking(false).unwrap();
    off
}

pub fn info(s: &impl AsRawFd) -> TcpInfo {
    LibcSys.tcp_info(s.as_raw_fd()).unwrap()
}

pub fn outq(s: &impl AsRawFd) -> u32 {
    LibcSys.queue_len(s.as_raw_fd(), QueueLen::Outq).unwrap()
}

pub fn so_error(s: &TcpStream) -> Option<io::Error> {
    s.take_error().unwrap()
}

/// Polls `cond` every millisecond until it holds, or panics after `secs`.
pub fn wait_until(what: &str, secs: u64, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A non-blocking connect that stays in SYN_SENT while the server holds.
pub fn connect_nonblocking(addr: SocketAddr) -> OwnedFd {
    let domain = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: no pointers.
    let fd = unsafe {
        libc::socket(
            domain,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    assert!(fd >= 0);
    // SAFETY: fresh descriptor.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let s = socket_addr_bytes(addr);
    // SAFETY: s holds a sockaddr of the given length.
    let r = unsafe { libc::connect(fd.as_raw_fd(), s.0.as_ptr().cast(), s.1) };
    assert!(r < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EINPROGRESS));
    fd
}

fn socket_addr_bytes(addr: SocketAddr) -> (Vec<u8>, libc::socklen_t) {
    match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            let len = std::mem::size_of_val(&sin);
            // SAFETY: reading the bytes of a plain C struct.
            let bytes = unsafe { std::slice::from_raw_parts((&raw const sin).cast::<u8>(), len) };
            (bytes.to_vec(), len as libc::socklen_t)
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            let len = std::mem::size_of_val(&sin6);
            // SAFETY: reading the bytes of a plain C struct.
            let bytes = unsafe { std::slice::from_raw_parts((&raw const sin6).cast::<u8>(), len) };
            (bytes.to_vec(), len as libc::socklen_t)
        }
    }
}
