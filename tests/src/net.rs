//! Real sockets in lab namespaces: echo servers and clients whose sockets are created inside a
//! given network namespace (a socket stays in the namespace it was created in, so the I/O
//! itself runs on ordinary test threads).

use std::{
    io::{self, Read as _, Write as _},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::Duration,
};

use ferry_overlay::netns::run_in;

fn in_ns<T: Send + 'static>(
    ns: &Path,
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    run_in(ns, f).map_err(io::Error::other)?
}

/// An echo server (TCP and UDP on the same port) inside a namespace. Records the address of
/// every peer it served; stops when dropped.
pub struct EchoServer {
    pub port: u16,
    stop: Arc<AtomicBool>,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    threads: Vec<JoinHandle<()>>,
}

impl EchoServer {
    /// Listens on [::]:`port` in `ns` (both families), or 0.0.0.0:`port` where the namespace
    /// has no IPv6.
    pub fn start(ns: &Path, port: u16) -> io::Result<Self> {
        let (tcp, udp) = in_ns(ns, move || {
            if let (Ok(tcp), Ok(udp)) = (
                TcpListener::bind((Ipv6Addr::UNSPECIFIED, port)),
                UdpSocket::bind((Ipv6Addr::UNSPECIFIED, port)),
            ) {
                return Ok((tcp, udp));
            }
            let tcp = TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))?;
            let udp = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, port))?;
            Ok((tcp, udp))
        })?;
        tcp.set_nonblocking(true)?;
        udp.set_read_timeout(Some(Duration::from_millis(50)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let peers = Arc::new(Mutex::new(Vec::new()));
        let mut threads = Vec::new();
        {
            let (stop, peers) = (stop.clone(), peers.clone());
            threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match tcp.accept() {
                        Ok((mut s, peer)) => {
                            peers.lock().unwrap().push(peer);
                            let stop = stop.clone();
                            std::thread::spawn(move || {
                                let _ = s.set_nonblocking(false);
                                let _ = s.set_read_timeout(Some(Duration::from_millis(100)));
                                let mut buf = vec![0u8; 65536];
                                while !stop.load(Ordering::Relaxed) {
                                    match s.read(&mut buf) {
                                        Ok(0) => break,
                                        Ok(n) => {
                                            if s.write_all(&buf[..n]).is_err() {
                                                break;
                                            }
                                        }
                                        Err(e)
                                            if matches!(
                                                e.kind(),
                                                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                                            ) => {}
                                        Err(_) => break,
                                    }
                                }
                            });
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(10));
                        }
                        Err(_) => break,
                    }
                }
            }));
        }
        {
            let (stop, peers) = (stop.clone(), peers.clone());
            threads.push(std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, peer)) = udp.recv_from(&mut buf) {
                        peers.lock().unwrap().push(peer);
                        let _ = udp.send_to(&buf[..n], peer);
                    }
                }
            }));
        }
        Ok(Self {
            port,
            stop,
            peers,
            threads,
        })
    }

    /// Addresses of the peers served so far (IPv4 peers as IPv4, not v4-mapped).
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers
            .lock()
            .unwrap()
            .iter()
            .map(|p| SocketAddr::new(p.ip().to_canonical(), p.port()))
            .collect()
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// A TCP connection made from inside `ns`.
pub fn tcp_connect(
    ns: &Path,
    to: impl Into<SocketAddr>,
    timeout: Duration,
) -> io::Result<TcpStream> {
    let to = to.into();
    let s = in_ns(ns, move || TcpStream::connect_timeout(&to, timeout))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    Ok(s)
}

/// Deterministic, position-dependent bytes (a shifted or lost chunk shows up as a mismatch).
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_be_bytes()[0] ^ seed)
        .collect()
}

/// Sends `payload` through an echo connection and checks every byte comes back in order.
pub fn echo_roundtrip(s: &mut TcpStream, payload: &[u8]) -> io::Result<()> {
    let mut writer = s.try_clone()?;
    let data = payload.to_vec();
    let w = std::thread::spawn(move || writer.write_all(&data));
    let mut back = vec![0u8; payload.len()];
    s.read_exact(&mut back)?;
    w.join()
        .map_err(|_| io::Error::other("writer panicked"))??;
    if back != payload {
        let at = back.iter().zip(payload).position(|(a, b)| a != b);
        return Err(io::Error::other(format!(
            "echoed bytes differ (first difference at {at:?})"
        )));
    }
    Ok(())
}

/// Connects, echoes `len` bytes, returns the connection's local address.
pub fn tcp_echo(ns: &Path, to: impl Into<SocketAddr>, len: usize) -> io::Result<SocketAddr> {
    let mut s = tcp_connect(ns, to, Duration::from_secs(3))?;
    echo_roundtrip(&mut s, &pattern(len, 7))?;
    s.local_addr()
}

/// One UDP datagram of `len` bytes to an echo server from inside `ns`, on a *connected*
/// socket: the kernel only delivers replies whose source is exactly `to`, so a reply proves
/// the answer came back from the address the client sent to. Retries up to 3 times.
pub fn udp_echo(ns: &Path, to: impl Into<SocketAddr>, len: usize) -> io::Result<()> {
    let to = to.into();
    let s = in_ns(ns, move || {
        let s = if to.is_ipv6() {
            UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0))?
        } else {
            UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?
        };
        s.connect(to)?;
        Ok(s)
    })?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    let payload = pattern(len, 3);
    let mut buf = vec![0u8; len + 16];
    for _ in 0..3 {
        s.send(&payload)?;
        match s.recv(&mut buf) {
            Ok(n) if buf[..n] == payload[..] => return Ok(()),
            Ok(n) => return Err(io::Error::other(format!("UDP echo of {n} bytes differs"))),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::new(
        io::ErrorKind::TimedOut,
        format!("no UDP echo from {to}"),
    ))
}
