//! The lab's control plane: the shared token, the gateway daemon (`ferry gateway`) on the
//! gateway host, and ways for tests and benchmarks to talk to it from inside the lab.

use std::{
    fs::File,
    io::{Read as _, Write as _},
    net::SocketAddr,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use ferry_overlay::netns::{command_in, netns_path, run_in};

use crate::{LabError, lab::netns_name, state, topology::LabTopology};

/// Port of the gateway's API on the gateway host's underlay address.
pub const GATEWAY_API_PORT: u16 = 7400;
/// How long the gateway gets to answer `/v1/health`.
pub const GATEWAY_READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the lab's control plane lives, derived from the topology.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlPlane {
    /// The gateway host's name.
    pub host: String,
    /// The gateway API's address (the gateway host's underlay address).
    pub api: SocketAddr,
    pub token_file: PathBuf,
    pub config: PathBuf,
    pub state_dir: PathBuf,
    pub log: PathBuf,
}

impl ControlPlane {
    /// `None` when the topology has no gateway (no internet side).
    pub fn of(prefix: &str, t: &LabTopology) -> Option<Self> {
        let inet = t.internet.as_ref()?;
        let gw = t.host(&inet.gateway)?;
        let dir = state::state_dir(prefix).join("gateway");
        Some(Self {
            host: gw.name.clone(),
            api: SocketAddr::new(gw.address.into(), GATEWAY_API_PORT),
            token_file: state::state_dir(prefix).join("token"),
            config: dir.join("gateway.toml"),
            state_dir: dir.join("state"),
            log: dir.join("gateway.log"),
        })
    }

    /// Writes a fresh random token (mode 0600) and the gateway's configuration.
    pub fn write_files(&self, t: &LabTopology) -> Result<(), LabError> {
        let dir = self.config.parent().expect("config has a parent");
        ferry_api::private::create_dir(dir)
            .map_err(|e| LabError::io(format!("creating {}", dir.display()), e))?;
        let mut raw = [0u8; 24];
        File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut raw))
            .map_err(|e| LabError::io("reading /dev/urandom", e))?;
        let token: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&self.token_file)
            .and_then(|mut f| f.write_all(token.as_bytes()))
            .map_err(|e| LabError::io(format!("writing {}", self.token_file.display()), e))?;
        let inet = t
            .internet
            .as_ref()
            .expect("a control plane implies an internet");
        let config = format!(
            "listen = \"{}\"\n\
             state_dir = \"{}\"\n\
             token_file = \"{}\"\n\
             overlay_cidr = \"{}\"\n\
             vni = {}\n\
             public_cidrs = [\"{}\"]\n",
            self.api,
            self.state_dir.display(),
            self.token_file.display(),
            t.overlay_cidr,
            t.vni,
            inet.public_pool,
        );
        std::fs::write(&self.config, config)
            .map_err(|e| LabError::io(format!("writing {}", self.config.display()), e))
    }

    /// Starts `ferry gateway` in the gateway host's namespace (own session, log appended).
    pub fn spawn(&self, prefix: &str, ferry: &Path) -> Result<Child, LabError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| LabError::io(format!("opening {}", self.log.display()), e))?;
        let log2 = log
            .try_clone()
            .map_err(|e| LabError::io("duplicating the log fd", e))?;
        let mut cmd = Command::new(ferry);
        cmd.arg("gateway")
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .env(ferry_api::faultpoint::ENV, state::fault_dir(prefix))
            .current_dir(self.config.parent().expect("config has a parent"))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2);
        command_in(&mut cmd, &netns_path(&netns_name(prefix, &self.host)))?;
        crate::lab::detach_session(&mut cmd);
        cmd.spawn()
            .map_err(|e| LabError::io(format!("spawning {} gateway", ferry.display()), e))
    }

    /// Waits until the gateway answers `GET /v1/health`, or its process exits.
    pub fn wait_ready(&self, prefix: &str, child: &mut Child) -> Result<(), LabError> {
        let ns = netns_path(&netns_name(prefix, &self.host));
        let deadline = Instant::now() + GATEWAY_READY_TIMEOUT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Err(LabError::GatewayFailed {
                    problem: format!("exited ({status}) before answering"),
                    tail: crate::lab::tail(&self.log, 40),
                    log: self.log.clone(),
                });
            }
            if http_ok(&ns, self.api, "/v1/health") {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(LabError::GatewayFailed {
                    problem: format!(
                        "no answer on {} within {} s",
                        self.api,
                        GATEWAY_READY_TIMEOUT.as_secs()
                    ),
                    tail: crate::lab::tail(&self.log, 40),
                    log: self.log.clone(),
                });
            }
            std::thread::sleep(Duration::from_millis(30));
        }
    }
}

/// Does `GET path` on `addr` from inside namespace `ns` answer 200?
pub(crate) fn http_ok(ns: &Path, addr: SocketAddr, path: &str) -> bool {
    let path = path.to_owned();
    run_in(ns, move || {
        ferry_api::transport::Request::get(path)
            .timeout(Duration::from_secs(2))
            .send_blocking(addr)
            .map(|r| r.status == 200)
    })
    .ok()
    .and_then(Result::ok)
    .unwrap_or(false)
}
