//! A real etcd cluster for the gateway's tests: `n` members of Debian's etcd-server on free
//! loopback ports, data under a temporary directory, each killed (SIGKILL, by PID) on drop or
//! on demand, and restartable from its data.

use std::{
    fs,
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use super::free_port;

/// `etcd` on PATH; without it the test fails under `CI=true` (a green CI must not skip) and
/// is skipped (`false`) elsewhere.
pub fn require_etcd() -> bool {
    let found = std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("etcd").is_file()));
    if found {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("etcd is not on PATH: scripts/setup.sh installs Debian's etcd-server");
    }
    eprintln!("skipped: etcd is not on PATH (scripts/setup.sh installs etcd-server)");
    false
}

pub struct Member {
    pub name: String,
    pub client: SocketAddr,
    pub peer: SocketAddr,
    data: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub members: Vec<Member>,
    initial: String,
    token: String,
}

/// A free loopback port below the kernel's ephemeral range (32768 and up), for a server to
/// bind later: a port from [`free_port`] is released before etcd binds it, and any outgoing
/// connection (another test's etcd client, say) may take it meanwhile; below the range only
/// another bind can, and the start varies with the process and each call.
fn listen_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let seed = std::process::id().wrapping_mul(7919);
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = u16::try_from(LOW + (seed.wrapping_add(n.wrapping_mul(97))) % SPAN)
            .expect("below 32768");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

impl Cluster {
    /// Starts `n` members and waits until every one answers healthy (a leader is elected).
    pub fn start(n: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let members: Vec<Member> = (0..n)
            .map(|i| {
                let lo = |p| format!("127.0.0.1:{p}").parse().unwrap();
                Member {
                    name: format!("m{i}"),
                    client: lo(listen_port()),
                    peer: lo(listen_port()),
                    data: dir.path().join(format!("m{i}")),
                    log: dir.path().join(format!("m{i}.log")),
                    child: None,
                }
            })
            .collect();
        let initial = members
            .iter()
            .map(|m| format!("{}=http://{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");
        let mut c = Self {
            token: format!("ferry-test-{}-{}", std::process::id(), free_port()),
            dir,
            members,
            initial,
        };
        for i in 0..n {
            c.spawn(i);
        }
        c.wait_healthy(&(0..n).collect::<Vec<_>>());
        c
    }

    /// `etcd:http://...,...` for a gateway's `store`.
    pub fn store(&self) -> String {
        let urls: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("http://{}", m.client))
            .collect();
        format!("etcd:{}", urls.join(","))
    }

    fn spawn(&mut self, i: usize) {
        let m = &mut self.members[i];
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&m.log)
            .unwrap();
        let child = Command::new("etcd")
            .args(["--name", &m.name, "--data-dir"])
            .arg(&m.data)
            .args([
                "--listen-client-urls",
                &format!("http://{}", m.client),
                "--advertise-client-urls",
                &format!("http://{}", m.client),
                "--listen-peer-urls",
                &format!("http://{}", m.peer),
                "--initial-advertise-peer-urls",
                &format!("http://{}", m.peer),
                "--initial-cluster",
                &self.initial,
                "--initial-cluster-token",
                &self.token,
                "--initial-cluster-state",
                "new",
                // Loopback: elect within a second of losing a leader.
                "--heartbeat-interval",
                "50",
                "--election-timeout",
                "500",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting etcd: {e}"));
        m.child = Some(child);
    }

    /// Waits (at most 30 s) until each of `members` answers `GET /health` with true.
    pub fn wait_healthy(&self, members: &[usize]) {
        let deadline = Instant::now() + Duration::from_secs(30);
        for &i in members {
            let m = &self.members[i];
            loop {
                let r = ferry_api::transport::Request::get("/health")
                    .plain()
                    .timeout(Duration::from_secs(2))
                    .send_blocking(m.client);
                if let Ok(r) = &r
                    && r.is_success()
                    && String::from_utf8_lossy(&r.body).contains("\"true\"")
                {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "etcd member {} not healthy: {r:?}\n{}",
                    m.name,
                    fs::read_to_string(&m.log).unwrap_or_default()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// SIGKILLs member `i` (by PID) and reaps it.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts member `i` again from its data.
    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
