//! Harness of the gateway's integration tests: a temporary directory with a config, a token
//! (mode 0600) and a state dir; the real `ferry` binary started on a free loopback port and
//! killed on drop (only that process, by PID). The API is TLS: one CA per test process
//! ([`pki`]), the gateway's certificate for 127.0.0.1, and the operator's identity made this
//! process's default for every request.
#![allow(dead_code)]

use std::{
    fs,
    net::{SocketAddr, TcpListener},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    time::{Duration, Instant},
};

use ferry_api::{Client, HostInfo, HostRole};

pub mod etcd;
use serde_json::Value;

pub const TOKEN: &str = "t0ken-for-tests-0123456789abcdef";
pub const FERRY: &str = env!("CARGO_BIN_EXE_ferry");

/// The test process's cluster: a CA and the parties' directories, under the target's
/// temporary directory.
pub struct Pki {
    pub root: PathBuf,
    pub ca: ferry_tls::Ca,
}

impl Pki {
    /// A party's directory (issued on first use).
    pub fn party(&self, name: &str, id: ferry_tls::Identity, ips: &[std::net::IpAddr]) -> PathBuf {
        let dir = self.root.join(name);
        if !dir.join("key.pem").exists() {
            let issued = self
                .ca
                .issue(&id, ips, ferry_tls::Validity::days(1))
                .unwrap();
            ferry_tls::write_party(&dir, &self.ca, &issued).unwrap();
        }
        dir
    }

    pub fn operator(&self) -> PathBuf {
        self.root.join("operator")
    }

    /// A client configuration for the identity in `dir`.
    pub fn client(&self, dir: &Path) -> std::sync::Arc<rustls::ClientConfig> {
        ferry_tls::Tls::load_dir(dir).unwrap().client_config()
    }
}

/// See [`Pki`]; also makes the operator this process's identity.
pub fn pki() -> &'static Pki {
    static PKI: std::sync::OnceLock<Pki> = std::sync::OnceLock::new();
    PKI.get_or_init(|| {
        let root =
            Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("pki-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let ca = ferry_tls::Ca::generate("test CA", ferry_tls::Validity::days(1)).unwrap();
        let pki = Pki { root, ca };
        let lo = std::net::IpAddr::from([127, 0, 0, 1]);
        pki.party("gateway", ferry_tls::Identity::Gateway, &[lo]);
        let op = pki.party("operator", ferry_tls::Identity::Operator, &[]);
        ferry_api::transport::set_process_tls(pki.client(&op));
        pki
    })
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Runs a future on a fresh runtime (tests are plain threads).
pub fn block<F: std::future::Future>(f: F) -> F::Output {
    ferry_api::transport::block_on(f).unwrap()
}

pub struct Env {
    pub dir: tempfile::TempDir,
    pub addr: SocketAddr,
    pub config: PathBuf,
    pub token_file: PathBuf,
    pub state_dir: PathBuf,
}

impl Env {
    /// A config with the given `watch_timeout_ms`.
    pub fn new(watch_timeout_ms: u64) -> Self {
        Self::with_extra(watch_timeout_ms, "")
    }

    /// A config with the given `watch_timeout_ms` and extra TOML lines.
    pub fn with_extra(watch_timeout_ms: u64, extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let token_file = dir.path().join("token");
        fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
        fs::set_permissions(&token_file, fs::Permissions::from_mode(0o600)).unwrap();
        let state_dir = dir.path().join("state");
        let config = dir.path().join("gateway.toml");
        let gw = ferry_tls::TlsFiles::in_dir(&pki().root.join("gateway"));
        fs::write(
            &config,
            format!(
                "listen = \"{addr}\"\nstate_dir = \"{}\"\ntoken_file = \"{}\"\n\
                 overlay_cidr = \"10.244.0.0/16\"\nvni = 4242\n\
                 public_cidrs = [\"203.0.113.128/25\"]\nwatch_timeout_ms = {watch_timeout_ms}\n\
                 {extra}\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
                state_dir.display(),
                token_file.display(),
                gw.ca.display(),
                gw.cert.display(),
                gw.key.display(),
            ),
        )
        .unwrap();
        Self {
            dir,
            addr,
            config,
            token_file,
            state_dir,
        }
    }

    pub fn state_file(&self) -> PathBuf {
        self.state_dir.join("registry.json")
    }

    pub fn log(&self) -> PathBuf {
        self.dir.path().join("gateway.log")
    }

    /// Spawns the daemon without waiting for it.
    pub fn spawn(&self) -> Daemon {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log())
            .unwrap();
        let child = Command::new(FERRY)
            .args(["gateway", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Daemon {
            child: Some(child),
            log: self.log(),
        }
    }

    /// Starts the daemon and waits until it answers `/v1/health`.
    pub fn start(&self) -> Daemon {
        let mut d = self.spawn();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if block(Client::new(self.addr, None).health()).is_ok() {
                return d;
            }
            if let Some(st) = d.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "gateway exited with {st} before answering:\n{}",
                    d.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "gateway did not come up:\n{}",
                d.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn client(&self) -> Client {
        Client::new(self.addr, Some(TOKEN.into()))
    }

    /// Runs `ferry ARGS` against this gateway (address and token through the environment).
    pub fn ferry(&self, args: &[&str]) -> Output {
        Command::new(FERRY)
            .args(args)
            .env("FERRY_GATEWAY", self.addr.to_string())
            .env("FERRY_TOKEN_FILE", &self.token_file)
            .env("FERRY_TLS_DIR", pki().operator())
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// `ferry --json ARGS`: exit code and the one JSON document printed.
    pub fn ferry_json(&self, args: &[&str]) -> (i32, Value) {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.ferry(&all);
        let text = String::from_utf8(out.stdout).unwrap();
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| {
            panic!(
                "ferry {args:?}: stdout is not one JSON document ({e}): {text:?}\nstderr: {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
        (out.status.code().unwrap_or(-1), v)
    }

    /// `ferry --json ARGS` that must succeed.
    #[track_caller]
    pub fn ok(&self, args: &[&str]) -> Value {
        let (code, v) = self.ferry_json(args);
        assert_eq!(code, 0, "ferry {args:?}: {v}");
        v
    }

    /// `ferry --json ARGS` that must fail with exit 1 and this error code.
    #[track_caller]
    pub fn fails(&self, args: &[&str], code: &str) -> String {
        let (exit, v) = self.ferry_json(args);
        assert_eq!(exit, 1, "ferry {args:?}: {v}");
        assert_eq!(v["error"]["code"], code, "ferry {args:?}: {v}");
        v["error"]["message"].as_str().unwrap().to_string()
    }

    /// Registers the usual hosts: a1, b1 and the gateway host gw.
    pub fn register_hosts(&self) {
        let c = self.client();
        for (name, vtep, ov, role) in [
            ("a1", "198.18.1.10", "10.244.255.1", HostRole::Host),
            ("b1", "198.18.2.10", "10.244.255.3", HostRole::Host),
            ("gw", "198.18.0.10", "10.244.255.254", HostRole::Gateway),
        ] {
            block(c.register_host(&HostInfo {
                name: name.into(),
                vtep: vtep.parse().unwrap(),
                overlay_ip: ov.parse().unwrap(),
                role,
                active_since: None,
            }))
            .unwrap();
        }
    }

    pub fn version(&self) -> u64 {
        block(self.client().version()).unwrap()
    }
}

/// A running `ferry gateway`; killed (SIGKILL, by PID) on drop if still running.
pub struct Daemon {
    child: Option<Child>,
    log: PathBuf,
}

impl Daemon {
    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM to this process and waits (at most 10 s) for it to exit.
    pub fn terminate(mut self) -> ExitStatus {
        let pid = self.pid();
        // SAFETY: kill(2) on the PID of our own child, which has not been reaped yet (so the
        // PID cannot have been reused).
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let status = self.wait_exit(Duration::from_secs(10));
        self.child = None;
        status
    }

    /// Waits for the process to exit by itself.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        let child = self.child.as_mut().unwrap();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "gateway still running after {limit:?}:\n{}",
                fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One raw HTTP request (for what the client would never send); status and JSON body.
pub fn raw(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> (u16, Value, String) {
    let mut req = ferry_api::transport::Request::new(method, path).timeout(Duration::from_secs(30));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    if let Some(b) = body {
        req = req.body(b.to_owned());
    }
    let r = req.send_blocking(addr).unwrap();
    let mut head = format!("HTTP/1.1 {}\r\n", r.status);
    for (k, v) in &r.headers {
        head.push_str(&format!(
            "{k}: {}\r\n",
            String::from_utf8_lossy(v.as_bytes())
        ));
    }
    let v = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
    (r.status, v, head)
}

/// `GET /metrics` (no token): the Prometheus text.
pub fn metrics(addr: SocketAddr) -> String {
    let r = ferry_api::transport::Request::get("/metrics")
        .send_blocking(addr)
        .unwrap();
    assert_eq!(r.status, 200);
    String::from_utf8(r.body.to_vec()).unwrap()
}

/// One series' value in `env`'s metrics (0 if absent).
pub fn metric(env: &Env, series: &str) -> f64 {
    metrics(env.addr)
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

pub fn bearer() -> String {
    format!("Bearer {TOKEN}")
}

/// Authorised JSON request.
pub fn api(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> (u16, Value) {
    let auth = bearer();
    let mut h = vec![("Authorization", auth.as_str())];
    if body.is_some() {
        h.push(("Content-Type", "application/json"));
    }
    let (s, v, _) = raw(addr, method, path, &h, body);
    (s, v)
}

pub fn read(p: &Path) -> Vec<u8> {
    fs::read(p).unwrap()
}
