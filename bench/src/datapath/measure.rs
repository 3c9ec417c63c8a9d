//! Measurements between the two containers of a [`Pair`]: single-stream TCP throughput with
//! iperf3 (server in B, client in A) and a TCP request/response ping-pong done in-process (the
//! sockets are created inside the containers' namespaces, then driven from ordinary threads).
//! Every process started here is killed by PID when its guard drops.

use std::{
    io::{self, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::{Child, Command, ExitStatus, Stdio},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use ferry_overlay::netns::{command_in, run_in};

use super::{BenchError, Pair};
use crate::stats::percentile;
use ferry_lab::clock::wait_until;

/// How long iperf3's server gets to listen.
const SERVER_READY_TIMEOUT: Duration = Duration::from_secs(5);
/// Extra time the iperf3 client gets beyond the test's duration.
const CLIENT_GRACE: Duration = Duration::from_secs(15);
/// A request/response exchange that takes longer than this fails the measurement.
const RR_IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Fresh TCP ports for successive measurements (so a closing connection never meets a new one).
#[derive(Debug)]
pub struct Ports(u16);

impl Default for Ports {
    fn default() -> Self {
        Self(5201)
    }
}

impl Ports {
    pub fn take(&mut self) -> u16 {
        let p = self.0;
        self.0 = if p >= 5999 { 5201 } else { p + 1 };
        p
    }
}

/// Fails unless `iperf3` can be run.
pub fn check_iperf3() -> Result<(), BenchError> {
    match Command::new("iperf3")
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(_) => Ok(()),
        Err(e) => Err(BenchError::io(
            "running iperf3 (install it: apt-get install iperf3)",
            e,
        )),
    }
}

/// A child process, killed (by PID, before it is reaped, so the PID cannot have been reused)
/// and reaped when the guard drops.
pub struct ProcGuard {
    child: Child,
    what: String,
}

impl ProcGuard {
    pub fn spawn(mut cmd: Command, what: impl Into<String>) -> Result<Self, BenchError> {
        let what = what.into();
        let child = cmd
            .spawn()
            .map_err(|e| BenchError::io(format!("starting {what}"), e))?;
        Ok(Self { child, what })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The exit status, if the process exits before `deadline`.
    pub fn wait_until(&mut self, deadline: Instant) -> Result<Option<ExitStatus>, BenchError> {
        let timeout = deadline.saturating_duration_since(Instant::now());
        wait_until(timeout, Duration::from_millis(5), || self.try_wait())
    }

    fn try_wait(&mut self) -> Result<Option<ExitStatus>, BenchError> {
        self.child
            .try_wait()
            .map_err(|e| BenchError::io(format!("waiting for {}", self.what), e))
    }

    /// Its whole stdout and stderr and its status, if it exits before `deadline` (else it is
    /// killed and this fails).
    pub fn output_until(
        &mut self,
        deadline: Instant,
    ) -> Result<(ExitStatus, String, String), BenchError> {
        let out = self.child.stdout.take().map(read_all);
        let err = self.child.stderr.take().map(read_all);
        let status = self.wait_until(deadline)?;
        let Some(status) = status else {
            self.kill();
            return Err(BenchError::failed(format!(
                "{} (PID {}) did not finish in time: killed",
                self.what,
                self.pid()
            )));
        };
        let join = |h: Option<JoinHandle<String>>| {
            h.map(|h| h.join().unwrap_or_default()).unwrap_or_default()
        };
        Ok((status, join(out), join(err)))
    }

    /// Whatever it wrote on stderr (piped), once it has exited or been killed.
    pub fn stderr_after_exit(&mut self) -> String {
        self.kill();
        let mut s = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut s);
        }
        s.trim().to_owned()
    }

    fn kill(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

impl Drop for ProcGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

fn read_all<R: Read + Send + 'static>(mut r: R) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Is a TCP socket listening on `port` in this `/proc/net/tcp` (or `tcp6`) text?
pub fn is_listening(proc_net_tcp: &str, port: u16) -> bool {
    let want = format!("{port:04X}");
    proc_net_tcp.lines().skip(1).any(|l| {
        let mut f = l.split_whitespace();
        let local = f.nth(1).unwrap_or("");
        let state = f.nth(1).unwrap_or("");
        state == "0A" && local.rsplit(':').next() == Some(want.as_str())
    })
}

/// Does something listen on TCP `port` inside namespace `ns`?
pub fn listening_in(ns: &Path, port: u16) -> Result<bool, BenchError> {
    Ok(run_in(ns, move || {
        ["tcp", "tcp6"].iter().any(|f| {
            std::fs::read_to_string(format!("/proc/thread-self/net/{f}"))
                .map(|t| is_listening(&t, port))
                .unwrap_or(false)
        })
    })?)
}

/// What was wrong with `iperf3 -J`'s output.
#[derive(Debug, thiserror::Error)]
pub enum Iperf3Error {
    #[error("iperf3's output is not JSON: {0}")]
    NotJson(#[source] serde_json::Error),
    #[error("iperf3: {0}")]
    Reported(String),
    #[error("iperf3's JSON has no end.sum_received.bits_per_second")]
    NoRate,
    #[error("iperf3 received at {0} bit/s")]
    BadRate(f64),
}

/// `end.sum_received.bits_per_second` of `iperf3 -c ... -J` output. iperf3 reports errors
/// in the JSON's `error` (and may still exit 0).
pub fn parse_iperf3(json: &str) -> Result<f64, Iperf3Error> {
    let v: serde_json::Value = serde_json::from_str(json).map_err(Iperf3Error::NotJson)?;
    if let Some(e) = v.get("error").and_then(|e| e.as_str()) {
        return Err(Iperf3Error::Reported(e.to_owned()));
    }
    let bps = v
        .pointer("/end/sum_received/bits_per_second")
        .and_then(serde_json::Value::as_f64)
        .ok_or(Iperf3Error::NoRate)?;
    if bps.is_finite() && bps > 0.0 {
        Ok(bps)
    } else {
        Err(Iperf3Error::BadRate(bps))
    }
}

/// Single-stream TCP throughput from A to B (bits per second, as received by B): `iperf3 -s
/// -1` in B, `iperf3 -c` in A for `duration`, each pinned where `placement` says (`-A`).
pub fn throughput(
    pair: &Pair,
    port: u16,
    duration: Duration,
    placement: RrPlacement,
) -> Result<f64, BenchError> {
    let ip = pair.b.ip.to_string();
    let port_s = port.to_string();
    let (client_cpu, server_cpu) = placement.cpus()?;
    let mut cmd = Command::new("iperf3");
    cmd.args(["-s", "-1", "-B", &ip, "-p", &port_s])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(c) = server_cpu {
        cmd.arg("-A").arg(c.to_string());
    }
    command_in(&mut cmd, &pair.b.netns)?;
    let mut server = ProcGuard::spawn(cmd, format!("iperf3 server on {ip}:{port}"))?;
    let ready = wait_until(SERVER_READY_TIMEOUT, Duration::from_millis(10), || {
        if listening_in(&pair.b.netns, port)? {
            return Ok(Some(()));
        }
        match server.try_wait()? {
            Some(status) => Err(BenchError::failed(format!(
                "iperf3 server on {ip}:{port} exited ({status}): {}",
                server.stderr_after_exit()
            ))),
            None => Ok(None),
        }
    })?;
    if ready.is_none() {
        return Err(BenchError::failed(format!(
            "iperf3 server on {ip}:{port} did not listen within {} s",
            SERVER_READY_TIMEOUT.as_secs()
        )));
    }

    let mut cmd = Command::new("iperf3");
    cmd.args(["-c", &ip, "-p", &port_s, "-J", "--connect-timeout", "3000"])
        .arg("-t")
        .arg(duration.as_secs().max(1).to_string())
        .args(
            client_cpu
                .map(|c| ["-A".to_owned(), c.to_string()])
                .into_iter()
                .flatten(),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command_in(&mut cmd, &pair.a.netns)?;
    let mut client = ProcGuard::spawn(cmd, format!("iperf3 client to {ip}:{port}"))?;
    let (status, stdout, stderr) = client.output_until(Instant::now() + duration + CLIENT_GRACE)?;
    let result = parse_iperf3(&stdout).map_err(|e| {
        BenchError::failed(format!(
            "{e} (client exit {status}{})",
            if stderr.trim().is_empty() {
                String::new()
            } else {
                format!(", stderr: {}", stderr.trim())
            }
        ))
    });
    // The one-off server exits after the test; the guard kills it otherwise.
    let _ = server.wait_until(Instant::now() + Duration::from_secs(2));
    result
}

/// Latencies of a request/response run (over the timed round trips only).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RrResult {
    pub p50_us: f64,
    pub p99_us: f64,
    pub count: usize,
}

/// Round trips before the timed ones.
pub fn warmup_count(count: usize) -> usize {
    (count / 10).clamp(100, 2000)
}

/// TCP request/response between A (client) and B (server): `count` timed round trips of
/// `size` bytes each way, after a warm-up, TCP_NODELAY on both ends.
pub fn request_response(
    pair: &Pair,
    port: u16,
    count: usize,
    size: usize,
    placement: RrPlacement,
) -> Result<RrResult, BenchError> {
    let cpus = placement.cpus()?;
    let mut lat = ping_pong(
        pair,
        port,
        (warmup_count(count), count),
        size,
        RR_IO_TIMEOUT,
        cpus,
    )?;
    lat.sort_unstable();
    let us = |p: f64| percentile(&lat, p).map_or(f64::NAN, |ns| ns as f64 / 1000.0);
    Ok(RrResult {
        p50_us: us(50.0),
        p99_us: us(99.0),
        count: lat.len(),
    })
}

/// Can A reach B? An ICMP ping (3 tries, 1 s each), then a few TCP round trips.
pub fn check_connectivity(pair: &Pair, port: u16) -> Result<(), BenchError> {
    let (from, to) = (pair.a.ip, pair.b.ip);
    if !ping(&pair.a.netns, to)? {
        return Err(BenchError::failed(format!(
            "{from} cannot ping {to} (3 tries, from namespace {})",
            pair.a.netns.display()
        )));
    }
    ping_pong(
        pair,
        port,
        (0, 10),
        64,
        Duration::from_secs(2),
        (None, None),
    )
    .map(drop)
    .map_err(|e| BenchError::failed(format!("{from} pings {to} but TCP fails: {e}")))
}

fn ping(ns: &Path, to: std::net::IpAddr) -> Result<bool, BenchError> {
    for _ in 0..3 {
        let mut cmd = Command::new("ping");
        cmd.args(["-n", "-q", "-c", "1", "-W", "1", &to.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        command_in(&mut cmd, ns)?;
        let mut p = ProcGuard::spawn(cmd, format!("ping {to}"))?;
        if let Some(status) = p.wait_until(Instant::now() + Duration::from_secs(3))?
            && status.success()
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// `warmup` then `count` timed exchanges; the latency of each timed one in ns. The client and
/// server threads run on `cpus` (client, server) when given.
fn ping_pong(
    pair: &Pair,
    port: u16,
    (warmup, count): (usize, usize),
    size: usize,
    io_timeout: Duration,
    (client_cpu, server_cpu): (Option<usize>, Option<usize>),
) -> Result<Vec<u64>, BenchError> {
    let b_ip = pair.b.ip;
    let addr = SocketAddr::from((b_ip, port));
    let listener = run_in(&pair.b.netns, move || TcpListener::bind(addr))?
        .map_err(|e| BenchError::io(format!("listening on {addr} in B's namespace"), e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| BenchError::io("making the listener non-blocking", e))?;
    let server = std::thread::Builder::new()
        .name("rr-server".into())
        .spawn(move || {
            if let Some(cpu) = server_cpu {
                pin_to_cpu(cpu)?;
            }
            serve(listener, size, io_timeout)
        })
        .map_err(|e| BenchError::io("spawning the rr server thread", e))?;

    let client = run_in(&pair.a.netns, move || {
        TcpStream::connect_timeout(&addr, io_timeout)
    })?;
    let result = client
        .map_err(|e| BenchError::io(format!("connecting to {addr} from A's namespace"), e))
        .and_then(|s| {
            std::thread::scope(|sc| {
                sc.spawn(|| {
                    if let Some(cpu) = client_cpu {
                        pin_to_cpu(cpu)
                            .map_err(|e| BenchError::io(format!("pinning to CPU {cpu}"), e))?;
                    }
                    exchange(s, warmup, count, size, io_timeout)
                })
                .join()
                .unwrap_or_else(|_| Err(BenchError::failed("rr client panicked")))
            })
        });
    // The client's socket is closed by now: the server sees EOF (or times out on accept).
    let served = server
        .join()
        .map_err(|_| BenchError::failed("the rr server thread panicked"))?;
    let lat = result?;
    served.map_err(|e| BenchError::io(format!("rr server on {addr}"), e))?;
    Ok(lat)
}

/// Moves the calling thread onto `cpu`.
fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data (all zeroes is the empty set); CPU_SET stays within it
    // (cpu < CPU_SETSIZE is checked); sched_setaffinity(0, ..) only affects the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if cpu >= libc::CPU_SETSIZE as usize {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("CPU {cpu} is out of range"),
            ));
        }
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The CPUs this process may run on.
fn allowed_cpus() -> io::Result<Vec<usize>> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills it; CPU_ISSET reads within it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect())
    }
}

/// Where the two ends of a measurement run: the request/response client and server threads,
/// or iperf3's client and server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum RrPlacement {
    /// Both on one CPU (the first this process may use): every round trip is handled
    /// serially on one CPU, so it measures the datapath's cost without cross-CPU wake-ups,
    /// which are slow and erratic in VMs. The most stable figures.
    #[default]
    SameCpu,
    /// Client and server on two different CPUs (cross-CPU wake-ups on every message).
    Split,
    /// Wherever the scheduler puts them (the figures flip between the two cases above).
    Any,
}

impl RrPlacement {
    /// Its name on the command line.
    pub fn name(self) -> &'static str {
        match self {
            RrPlacement::SameCpu => "same-cpu",
            RrPlacement::Split => "split",
            RrPlacement::Any => "any",
        }
    }

    /// (client CPU, server CPU).
    fn cpus(self) -> Result<(Option<usize>, Option<usize>), BenchError> {
        if self == RrPlacement::Any {
            return Ok((None, None));
        }
        let cpus = allowed_cpus().map_err(|e| BenchError::io("reading our CPU affinity", e))?;
        match (self, cpus.as_slice()) {
            (RrPlacement::SameCpu, [c, ..]) => Ok((Some(*c), Some(*c))),
            (RrPlacement::Split, [c, d, ..]) => Ok((Some(*c), Some(*d))),
            _ => Err(BenchError::failed(format!(
                "rr placement {self:?} needs more CPUs than the {} this process may use",
                cpus.len()
            ))),
        }
    }
}

fn exchange(
    mut s: TcpStream,
    warmup: usize,
    count: usize,
    size: usize,
    io_timeout: Duration,
) -> Result<Vec<u64>, BenchError> {
    let setup = |s: &TcpStream| -> io::Result<()> {
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(io_timeout))?;
        s.set_write_timeout(Some(io_timeout))
    };
    setup(&s).map_err(|e| BenchError::io("setting up the rr client socket", e))?;
    let req = vec![0x5a_u8; size];
    let mut resp = vec![0_u8; size];
    let mut lat = Vec::with_capacity(count);
    for i in 0..warmup + count {
        let t = Instant::now();
        s.write_all(&req)
            .and_then(|()| s.read_exact(&mut resp))
            .map_err(|e| {
                BenchError::io(
                    format!(
                        "round trip {} of {} (incl. {warmup} warm-up; timeout {} s)",
                        i + 1,
                        warmup + count,
                        io_timeout.as_secs()
                    ),
                    e,
                )
            })?;
        if i >= warmup {
            lat.push(u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX));
        }
    }
    Ok(lat)
}

/// Accepts one connection (within `io_timeout`) and echoes `size`-byte messages until EOF.
fn serve(listener: TcpListener, size: usize, io_timeout: Duration) -> io::Result<()> {
    let accepted = wait_until(io_timeout, Duration::from_millis(1), || {
        match listener.accept() {
            Ok((s, _)) => Ok(Some(s)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    })?;
    let mut s =
        accepted.ok_or_else(|| io::Error::new(io::ErrorKind::TimedOut, "no client connected"))?;
    drop(listener);
    s.set_nonblocking(false)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(io_timeout))?;
    s.set_write_timeout(Some(io_timeout))?;
    let mut buf = vec![0_u8; size];
    loop {
        match s.read_exact(&mut buf) {
            Ok(()) => s.write_all(&buf)?,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = include_str!("testdata/iperf3_client.json");

    #[test]
    fn iperf3_json_gives_the_received_rate() {
        let bps = parse_iperf3(SAMPLE).unwrap();
        assert!((bps - 22_521_520_672.263_53).abs() < 1.0, "{bps}");
    }

    #[test]
    fn iperf3_errors_are_reported() {
        // What iperf3 3.12 prints (exit status 0!) when the server is not there.
        let j = r#"{"start": {"connected": [], "version": "iperf 3.12"}, "intervals": [],
            "end": {}, "error": "unable to connect to server: Connection refused"}"#;
        assert_eq!(
            parse_iperf3(j).unwrap_err().to_string(),
            "iperf3: unable to connect to server: Connection refused"
        );
        assert!(matches!(parse_iperf3(""), Err(Iperf3Error::NotJson(_))));
        assert!(matches!(
            parse_iperf3(r#"{"end": {}}"#),
            Err(Iperf3Error::NoRate)
        ));
    }

    #[test]
    fn listening_sockets_are_found() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   \
            0: 0202F50A:1451 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 12345 1 0 100 0 0 10 0\n   \
            1: 0202F50A:1452 0102F50A:9C40 01 00000000:00000000 00:00000000 00000000     0        0 12346 1 0 100 0 0 10 0\n";
        assert!(is_listening(tcp, 5201));
        assert!(!is_listening(tcp, 5202), "established, not listening");
        assert!(!is_listening(tcp, 80));
        let tcp6 = "  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   \
            0: 00000000000000000000000000000000:1451 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0\n";
        assert!(is_listening(tcp6, 5201));
    }

    #[test]
    fn ports_and_warmup() {
        let mut p = Ports::default();
        assert_eq!((p.take(), p.take()), (5201, 5202));
        let mut p = Ports(5999);
        assert_eq!((p.take(), p.take()), (5999, 5201));
        assert_eq!(warmup_count(20_000), 2000);
        assert_eq!(warmup_count(10), 100);
        assert_eq!(warmup_count(5_000), 500);
    }

    #[test]
    fn placement_names_match_the_cli() {
        use clap::ValueEnum as _;
        for p in RrPlacement::value_variants() {
            assert_eq!(p.to_possible_value().unwrap().get_name(), p.name());
        }
    }

    /// The ping-pong in our own namespace over loopback (no root needed).
    #[test]
    fn ping_pong_over_loopback() {
        let me = Path::new("/proc/self/ns/net").to_owned();
        // Entering our own namespace needs CAP_SYS_ADMIN; skip where we do not have it.
        if run_in(&me, || ()).is_err() {
            return;
        }
        let ep = |ip| super::super::Endpoint {
            netns: me.clone(),
            ip,
        };
        let pair = Pair {
            a: ep(std::net::Ipv4Addr::LOCALHOST.into()),
            b: ep(std::net::Ipv4Addr::LOCALHOST.into()),
        };
        let port = 20_000 + (std::process::id() % 20_000) as u16;
        let r = request_response(&pair, port, 500, 64, RrPlacement::Any).unwrap();
        assert_eq!(r.count, 500);
        assert!(r.p50_us > 0.0 && r.p50_us <= r.p99_us, "{r:?}");
        let r = request_response(&pair, port + 1, 500, 64, RrPlacement::SameCpu).unwrap();
        assert_eq!(r.count, 500);
        assert!(r.p50_us > 0.0 && r.p50_us <= r.p99_us, "{r:?}");
    }
}
