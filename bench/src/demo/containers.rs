//! The containers part of the demo: three containers placed through the gateway's registry
//! (as an orchestrator would, with the `ferry` CLI), TCP between them across hosts and clouds,
//! and the internet client reaching two of them through public addresses (whole IP and a port
//! mapping). Then `web`'s test server stops and leaves its port to the workload that the live
//! migration moves (`super::migration`).

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use ferry_overlay::netns::run_in;

use ferry_lab::{Lab, LabError};

use super::step;

/// The port every container serves on (also the workload's, on `web`).
pub const PORT: u16 = 7000;
/// `web`: the container the live migration moves, its host and its public address.
pub const WEB: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
pub const WEB_HOST: &str = "a1";
pub const WEB_PUBLIC: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 130);
const ROUNDS: usize = 200;

#[derive(Debug, serde::Serialize)]
pub struct ContainersReport {
    /// name → (host, address).
    pub containers: BTreeMap<String, (String, Ipv4Addr)>,
    /// "from->to" → median TCP request/response time in µs (`None`: failed).
    pub rr_us: BTreeMap<String, Option<u64>>,
    /// public address → (container, the address the container saw the client as, ok).
    pub public: BTreeMap<String, PublicCheck>,
    /// `web`, live-migrated to another cloud, answered at its public address there (filled
    /// in by the migration part: replies sent between the two runs).
    pub moved_reachable: bool,
}

#[derive(Debug, serde::Serialize)]
pub struct PublicCheck {
    pub container: String,
    pub client_seen_as: Option<String>,
    pub ok: bool,
}

impl ContainersReport {
    pub fn ok(&self) -> bool {
        self.rr_us.values().all(Option::is_some) && self.public.values().all(|p| p.ok)
    }
}

/// A ping-pong server in a container's namespace; records its peers; stops (and closes its
/// listener) on drop.
struct Server {
    stop: Arc<AtomicBool>,
    peers: Arc<std::sync::Mutex<Vec<SocketAddr>>>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    fn start(ns: &Path) -> Result<Self, LabError> {
        let listener = run_in(ns, || TcpListener::bind((Ipv4Addr::UNSPECIFIED, PORT)))?
            .map_err(|e| LabError::io(format!("listening in {}", ns.display()), e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| LabError::io("nonblocking listener", e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let peers = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (st, pe) = (stop.clone(), peers.clone());
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((mut s, peer)) => {
                        pe.lock().unwrap_or_else(|p| p.into_inner()).push(peer);
                        std::thread::spawn(move || {
                            let _ = s.set_nonblocking(false);
                            let _ = s.set_nodelay(true);
                            let mut buf = [0u8; 64];
                            while let Ok(n) = s.read(&mut buf) {
                                if n == 0 || s.write_all(&buf[..n]).is_err() {
                                    break;
                                }
                            }
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        Ok(Self {
            stop,
            peers,
            thread: Some(thread),
        })
    }

    fn last_peer(&self) -> Option<SocketAddr> {
        self.peers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last()
            .copied()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Median request/response time (64-byte ping-pong, `ROUNDS` times) from `ns` to `to`.
fn rr_us(ns: &Path, to: SocketAddrV4) -> Option<u64> {
    let mut s = run_in(ns, move || {
        TcpStream::connect_timeout(&to.into(), Duration::from_secs(2))
    })
    .ok()?
    .ok()?;
    s.set_nodelay(true).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let mut times = Vec::with_capacity(ROUNDS);
    let msg = [0x5au8; 64];
    let mut back = [0u8; 64];
    for _ in 0..ROUNDS {
        let t = Instant::now();
        s.write_all(&msg).ok()?;
        s.read_exact(&mut back).ok()?;
        if back != msg {
            return None;
        }
        times.push(t.elapsed().as_micros() as u64);
    }
    times.sort_unstable();
    Some(times[times.len() / 2])
}

fn ferry(lab: &Lab, json: bool, args: &[&str]) -> Result<(), LabError> {
    if !json {
        eprintln!("  $ ferry {}", args.join(" "));
    }
    lab.ferry_json(args).map(|_| ())
}

pub fn run(lab: &Lab, json: bool, t0: Instant) -> Result<ContainersReport, LabError> {
    let plan: [(&str, &str, Ipv4Addr); 3] = [
        ("web", WEB_HOST, WEB),
        ("api", "a2", Ipv4Addr::new(10, 244, 2, 10)),
        ("db", "b1", Ipv4Addr::new(10, 244, 3, 10)),
    ];
    step(
        json,
        t0,
        "placing containers through the gateway's registry (agents build netns + veth)",
    );
    let mut ns: BTreeMap<&str, PathBuf> = BTreeMap::new();
    for (name, host, ip) in plan {
        ferry(
            lab,
            json,
            &["endpoint", "add", "--ip", &ip.to_string(), "--host", host],
        )?;
        ns.insert(name, lab.container_netns(host, ip));
    }
    ferry(
        lab,
        json,
        &[
            "public",
            "add",
            "--public",
            &WEB_PUBLIC.to_string(),
            "--container",
            &WEB.to_string(),
        ],
    )?;
    ferry(
        lab,
        json,
        &[
            "public",
            "add",
            "--public",
            "203.0.113.131:80/tcp",
            "--container",
            &format!("10.244.3.10:{PORT}"),
        ],
    )?;
    lab.sync()?;
    let mut servers: BTreeMap<&str, Server> = BTreeMap::new();
    for (name, _, _) in plan {
        servers.insert(name, Server::start(&ns[name])?);
    }

    step(
        json,
        t0,
        "containers talk over TCP (median of 200 round trips)",
    );
    let mut rr = BTreeMap::new();
    for (from, to, what) in [
        ("web", "api", "across hosts"),
        ("web", "db", "across clouds"),
        ("db", "api", "across clouds"),
    ] {
        let ip = plan
            .iter()
            .find(|p| p.0 == to)
            .map(|p| p.2)
            .expect("planned");
        let us = rr_us(&ns[from], SocketAddrV4::new(ip, PORT));
        if !json {
            match us {
                Some(us) => eprintln!("  {from:>4} → {to:<4} {what:<14} {us:>6} µs"),
                None => eprintln!("  {from:>4} → {to:<4} {what:<14} FAILED"),
            }
        }
        rr.insert(format!("{from}->{to}"), us);
    }

    step(
        json,
        t0,
        "the internet client reaches containers at their public addresses",
    );
    let inet = lab.netns(ferry_lab::INET);
    let mut public = BTreeMap::new();
    for (addr, container) in [
        (SocketAddrV4::new(WEB_PUBLIC, PORT), "web"),
        (SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 131), 80), "db"),
    ] {
        let ok = rr_us(&inet, addr).is_some();
        let seen = servers[container].last_peer().map(|p| p.ip().to_string());
        if !json {
            eprintln!(
                "  client → {addr:<21} → {container:<4} {} (the container sees the client as {})",
                if ok { "ok" } else { "FAILED" },
                seen.as_deref().unwrap_or("-")
            );
        }
        public.insert(
            addr.to_string(),
            PublicCheck {
                container: container.into(),
                client_seen_as: seen,
                ok,
            },
        );
    }

    // The live migration's workload takes web's port.
    drop(servers);
    Ok(ContainersReport {
        containers: plan
            .iter()
            .map(|(n, h, ip)| ((*n).to_owned(), ((*h).to_owned(), *ip)))
            .collect(),
        rr_us: rr,
        public,
        moved_reachable: false,
    })
}
