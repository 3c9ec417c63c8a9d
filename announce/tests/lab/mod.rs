//! A tiny L2 lab for the announcement tests: one "switch" namespace holding a Linux bridge
//! `br0`, and one namespace per station, each wired to a bridge port by a veth pair
//! (`p-<station>` on the bridge, `eth0` in the station).
//!
//! Names carry a unique prefix `fan<hex>-`; every namespace is deleted on drop, also when the
//! test panics. The only processes started are `ip`, `bridge` and `sysctl`, each waited for.

#![allow(dead_code)] // each test binary uses a different part

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Whether the kernel tests can run here. Without root: panics under `CI=true`, else prints
/// SKIP and returns `false`.
pub fn can_run(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    let tools = ["ip", "bridge", "sysctl"]
        .iter()
        .all(|t| Command::new(t).arg("-V").output().is_ok());
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    match (root, tools) {
        (true, true) => true,
        _ if ci => panic!("{test}: needs root and ip/bridge/sysctl (root={root}, tools={tools})"),
        _ => {
            eprintln!("SKIP {test}: needs root and iproute2 (root={root}, tools={tools})");
            false
        }
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn random_hex() -> String {
    let mut b = [0u8; 4];
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .expect("read /dev/urandom");
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub struct Lab {
    pub prefix: String,
    created: Vec<String>,
}

pub const SWITCH: &str = "sw";

impl Lab {
    /// The switch namespace with `br0` (no STP, forwarding at once, default 300 s ageing,
    /// multicast snooping off), plus one namespace per station. IPv6 is off in the switch
    /// namespace, and in stations unless `ipv6` is set, so that no station sends anything by
    /// itself (no DAD, MLD or router solicitation that would teach the bridge on its own).
    pub fn new(stations: &[&str], ipv6: bool) -> Lab {
        let mut lab = Lab {
            prefix: format!("fan{}-", random_hex()),
            created: Vec::new(),
        };
        lab.add_ns(SWITCH, false);
        lab.ip(
            SWITCH,
            &[
                "link",
                "add",
                "br0",
                "type",
                "bridge",
                "stp_state",
                "0",
                "forward_delay",
                "0",
                "ageing_time",
                "30000",
                "mcast_snooping",
                "0",
            ],
        );
        lab.ip(SWITCH, &["link", "set", "br0", "up"]);
        for s in stations {
            lab.add_ns(s, ipv6);
            let port = format!("p-{s}");
            let ns = lab.ns(s);
            lab.ip(
                SWITCH,
                &[
                    "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns,
                ],
            );
            lab.ip(SWITCH, &["link", "set", &port, "master", "br0", "up"]);
            if !ipv6 {
                lab.sysctl(s, "net.ipv6.conf.eth0.disable_ipv6", "1");
            }
        }
        lab
    }

    fn add_ns(&mut self, role: &str, ipv6: bool) {
        let name = self.ns(role);
        run(Command::new("ip").args(["netns", "add", &name]));
        self.created.push(name);
        self.ip(role, &["link", "set", "lo", "up"]);
        let off = if ipv6 { "0" } else { "1" };
        self.sysctl(role, "net.ipv6.conf.all.disable_ipv6", off);
        self.sysctl(role, "net.ipv6.conf.default.disable_ipv6", off);
    }

    pub fn ns(&self, role: &str) -> String {
        format!("{}{role}", self.prefix)
    }

    pub fn path(&self, role: &str) -> PathBuf {
        PathBuf::from("/run/netns").join(self.ns(role))
    }

    /// `ip -n <ns> args…`, asserting success.
    pub fn ip(&self, role: &str, args: &[&str]) -> String {
        run(Command::new("ip").arg("-n").arg(self.ns(role)).args(args))
    }

    pub fn sysctl(&self, role: &str, key: &str, value: &str) {
        run(Command::new("ip").args([
            "netns",
            "exec",
            &self.ns(role),
            "sysctl",
            "-qw",
            &format!("{key}={value}"),
        ]));
    }

    /// Sets the MAC of a station's `eth0`, adds `addrs` (CIDR) and brings it up.
    pub fn configure(&self, role: &str, mac: &str, addrs: &[&str]) {
        self.ip(role, &["link", "set", "eth0", "address", mac]);
        for a in addrs {
            let mut args = vec!["addr", "add", a, "dev", "eth0"];
            if a.contains(':') {
                args.push("nodad");
            }
            self.ip(role, &args);
        }
        self.ip(role, &["link", "set", "eth0", "up"]);
    }

    /// Waits until the bridge port of `role` forwards (carrier up, STP-less bridge).
    pub fn wait_port_forwarding(&self, role: &str) {
        let port = format!("p-{role}");
        wait_for(
            &format!("{port} forwarding"),
            Duration::from_secs(5),
            || {
                let out = run(Command::new("bridge").args([
                    "-n",
                    &self.ns(SWITCH),
                    "-j",
                    "link",
                    "show",
                    "dev",
                    &port,
                ]));
                out.contains("\"forwarding\"")
            },
        );
    }

    /// The bridge ports on which `mac` is learned (not the bridge's own permanent entries).
    pub fn fdb_ports(&self, mac: &str) -> Vec<String> {
        let out = run(Command::new("bridge").args([
            "-n",
            &self.ns(SWITCH),
            "-j",
            "fdb",
            "show",
            "br",
            "br0",
        ]));
        let v: Value = serde_json::from_str(&out).expect("bridge -j fdb output");
        v.as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["mac"].as_str() == Some(mac) && e["vlan"].is_null())
            .filter(|e| e["state"].as_str() != Some("permanent"))
            .filter_map(|e| e["ifname"].as_str().map(str::to_owned))
            .collect()
    }

    /// Packets the bridge has sent out of the port of `role` (the port's tx counter).
    pub fn port_tx_packets(&self, role: &str) -> u64 {
        let out = self.ip(SWITCH, &["-j", "-s", "link", "show", &format!("p-{role}")]);
        let v: Value = serde_json::from_str(&out).expect("ip -j -s link output");
        v[0]["stats64"]["tx"]["packets"]
            .as_u64()
            .expect("tx packets")
    }

    /// `role`'s neighbour entry for `addr` on eth0: (lladdr, states), or `None` if absent.
    pub fn neighbour(&self, role: &str, addr: IpAddr) -> Option<(Option<String>, Vec<String>)> {
        let family = if addr.is_ipv4() { "-4" } else { "-6" };
        let out = self.ip(
            role,
            &[
                family,
                "-j",
                "neigh",
                "show",
                &addr.to_string(),
                "dev",
                "eth0",
            ],
        );
        let v: Value = serde_json::from_str(&out).expect("ip -j neigh output");
        let e = v.as_array()?.first()?;
        let lladdr = e["lladdr"].as_str().map(str::to_owned);
        let states = e["state"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_owned))
            .collect();
        Some((lladdr, states))
    }

    /// A UDP socket bound to `addr` inside `role`'s namespace.
    pub fn udp(&self, role: &str, addr: SocketAddr) -> UdpSocket {
        ferry_announce::in_netns(&self.path(role), || UdpSocket::bind(addr))
            .expect("enter netns")
            .unwrap_or_else(|e| panic!("bind {addr} in {role}: {e}"))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for name in self.created.iter().rev() {
            let ok = Command::new("ip")
                .args(["netns", "del", name])
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                eprintln!("warning: could not delete netns {name}");
            }
        }
    }
}

/// Whether `sock` receives `want` within `timeout` (other datagrams are skipped).
pub fn receives(sock: &UdpSocket, want: &[u8], timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 256];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        sock.set_read_timeout(Some(left)).expect("set timeout");
        match sock.recv_from(&mut buf) {
            Ok((n, _)) if &buf[..n] == want => return true,
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                return false;
            }
            Err(e) => panic!("recv: {e}"),
        }
    }
}

/// Polls `cond` every 10 ms until it holds, or panics after `timeout`.
pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Polls `cond` for `timeout`; true as soon as it holds.
pub fn becomes(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
