//! The lab's control plane: the shared token, the cluster's TLS material (a CA and a
//! certificate per party, under `<state dir>/tls/`, keys 0600 in 0700 directories), the
//! gateway daemon (`ferry gateway`) on the gateway host, and ways for tests and benchmarks to
//! talk to it from inside the lab.

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
/// etcd's client and peer ports on a member host's underlay address (topology `etcd`).
pub const ETCD_CLIENT_PORT: u16 = 2379;
pub const ETCD_PEER_PORT: u16 = 2380;
/// How long the etcd members get to elect a leader and answer `/health`.
pub const ETCD_READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The etcd members of topology `t`: (host, client address).
pub fn etcd_members(t: &LabTopology) -> Vec<(String, SocketAddr)> {
    t.etcd
        .iter()
        .filter_map(|name| t.host(name))
        .map(|h| {
            (
                h.name.clone(),
                SocketAddr::new(h.address.into(), ETCD_CLIENT_PORT),
            )
        })
        .collect()
}

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
    /// The lab's other gateways (topology `extra_gateways`), which clients fall back to.
    pub fallbacks: Vec<SocketAddr>,
    /// The cluster's TLS material: `ca/` (the CA, kept by the lab), `operator/`, `gateway/`,
    /// `host-<name>/`. Absent in a plain-HTTP lab.
    pub tls_dir: PathBuf,
}

/// One party of the lab's cluster, for [`ControlPlane::tls_files`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Party<'a> {
    Operator,
    Gateway,
    Host(&'a str),
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
            fallbacks: t
                .extra_gateways
                .iter()
                .filter_map(|g| t.host(g))
                .map(|h| SocketAddr::new(h.address.into(), GATEWAY_API_PORT))
                .collect(),
            token_file: state::state_dir(prefix).join("token"),
            config: dir.join("gateway.toml"),
            state_dir: dir.join("state"),
            log: dir.join("gateway.log"),
            tls_dir: state::state_dir(prefix).join("tls"),
        })
    }

    /// The extra gateway daemon on `host` (topology `extra_gateways`): same token and TLS
    /// material, a state directory of its own.
    pub fn extra(prefix: &str, t: &LabTopology, host: &str) -> Option<Self> {
        if !t.extra_gateways.iter().any(|g| g == host) {
            return None;
        }
        let main = Self::of(prefix, t)?;
        let h = t.host(host)?;
        let dir = state::state_dir(prefix).join(format!("gateway-{host}"));
        let api = SocketAddr::new(h.address.into(), GATEWAY_API_PORT);
        let mut fallbacks = vec![main.api];
        fallbacks.extend(main.fallbacks.iter().filter(|a| **a != api));
        Some(Self {
            host: h.name.clone(),
            api,
            fallbacks,
            config: dir.join("gateway.toml"),
            state_dir: dir.join("state"),
            log: dir.join("gateway.log"),
            ..main
        })
    }

    /// Every gateway of the lab, the main one first.
    pub fn all(prefix: &str, t: &LabTopology) -> Vec<Self> {
        let mut all: Vec<Self> = Self::of(prefix, t).into_iter().collect();
        all.extend(
            t.extra_gateways
                .iter()
                .filter_map(|g| Self::extra(prefix, t, g)),
        );
        all
    }

    /// How `host`'s agent reaches the gateways: the one in its own cloud first (else the
    /// main one), the others as fallbacks.
    pub fn agent_link(
        prefix: &str,
        t: &LabTopology,
        host: &str,
    ) -> Option<ferry_config::GatewayLink> {
        let all = Self::all(prefix, t);
        let cloud = |h: &str| t.host(h).map(|h| h.cloud.clone());
        let mine = cloud(host);
        let first = all
            .iter()
            .position(|g| g.host != all[0].host && cloud(&g.host) == mine)
            .unwrap_or(0);
        let primary = all.get(first)?;
        Some(ferry_config::GatewayLink {
            address: primary.api,
            token_file: primary.token_file.clone(),
            fallbacks: all
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != first)
                .map(|(_, g)| g.api)
                .collect(),
        })
    }

    /// Does this lab speak TLS (did it make a CA)?
    pub fn is_tls(&self) -> bool {
        self.tls_dir.join("ca").join("ca.pem").exists()
    }

    /// A party's files; `None` in a plain-HTTP lab.
    pub fn tls_files(&self, party: Party<'_>) -> Option<ferry_tls::TlsFiles> {
        let dir = match party {
            Party::Operator => "operator".to_owned(),
            Party::Gateway => "gateway".to_owned(),
            Party::Host(h) => format!("host-{h}"),
        };
        self.is_tls()
            .then(|| ferry_tls::TlsFiles::in_dir(&self.tls_dir.join(dir)))
    }

    /// A party's client configuration (`None`: plain HTTP).
    pub fn client_tls(
        &self,
        party: Party<'_>,
    ) -> Result<Option<std::sync::Arc<rustls::ClientConfig>>, LabError> {
        self.tls_files(party)
            .map(|f| {
                ferry_tls::Tls::load(&f)
                    .map(|t| t.client_config())
                    .map_err(|e| {
                        LabError::io("loading the lab's TLS material", std::io::Error::other(e))
                    })
            })
            .transpose()
    }

    /// The environment that points the `ferry` CLI at this gateway as the operator.
    pub fn cli_env(&self) -> Vec<(&'static str, std::ffi::OsString)> {
        let all: Vec<String> = std::iter::once(self.api)
            .chain(self.fallbacks.iter().copied())
            .map(|a| a.to_string())
            .collect();
        let mut env = vec![
            ("FERRY_GATEWAY", all.join(",").into()),
            ("FERRY_TOKEN_FILE", self.token_file.clone().into()),
        ];
        match self.tls_files(Party::Operator) {
            Some(f) => {
                env.push(("FERRY_TLS_CA", f.ca.into()));
                env.push(("FERRY_TLS_CERT", f.cert.into()));
                env.push(("FERRY_TLS_KEY", f.key.into()));
            }
            None => env.push(("FERRY_INSECURE_PLAINTEXT", "true".into())),
        }
        env
    }

    /// Makes the lab's CA and every party's certificate: the operator, the gateway (its API
    /// address) and each host (its underlay address).
    fn write_tls(&self, t: &LabTopology) -> Result<(), LabError> {
        use ferry_tls::{Ca, Identity, Validity};
        let err = |e: ferry_tls::TlsError| {
            LabError::io("making the lab's TLS material", std::io::Error::other(e))
        };
        ferry_api::private::create_dir(&self.tls_dir)
            .map_err(|e| LabError::io(format!("creating {}", self.tls_dir.display()), e))?;
        let ca = Ca::generate("ferry lab CA", Validity::days(30)).map_err(err)?;
        ca.save(&self.tls_dir.join("ca")).map_err(err)?;
        let mut parties = vec![
            ("operator".to_owned(), Identity::Operator, vec![]),
            // One identity for every gateway of the lab: each one's address in it.
            ("gateway".to_owned(), Identity::Gateway, {
                let mut ips = vec![self.api.ip()];
                ips.extend(
                    t.extra_gateways
                        .iter()
                        .filter_map(|g| t.host(g))
                        .map(|h| std::net::IpAddr::from(h.address)),
                );
                ips
            }),
        ];
        for h in &t.hosts {
            parties.push((
                format!("host-{}", h.name),
                Identity::host(&h.name).map_err(err)?,
                vec![h.address.into()],
            ));
        }
        for (dir, id, ips) in parties {
            let issued = ca.issue(&id, &ips, Validity::days(30)).map_err(err)?;
            ferry_tls::write_party(&self.tls_dir.join(dir), &ca, &issued).map_err(err)?;
        }
        Ok(())
    }

    /// Writes a fresh random token (mode 0600), the TLS material (unless `plaintext`) and the
    /// gateway's configuration.
    pub fn write_files(&self, t: &LabTopology, plaintext: bool) -> Result<(), LabError> {
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
        if !plaintext {
            self.write_tls(t)?;
        }
        self.write_config(t, plaintext)
    }

    /// Writes this gateway's configuration (the token and TLS material are the lab's).
    pub fn write_config(&self, t: &LabTopology, plaintext: bool) -> Result<(), LabError> {
        let dir = self.config.parent().expect("config has a parent");
        ferry_api::private::create_dir(dir)
            .map_err(|e| LabError::io(format!("creating {}", dir.display()), e))?;
        let inet = t
            .internet
            .as_ref()
            .expect("a control plane implies an internet");
        let tls = if plaintext {
            "insecure_plaintext = true\n".to_owned()
        } else {
            let f = self.tls_files(Party::Gateway).expect("just written");
            format!(
                "\n[tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
                f.ca.display(),
                f.cert.display(),
                f.key.display()
            )
        };
        // The member of this gateway's own cloud first (the one it reaches fastest; the others
        // are tried when it does not answer).
        let cloud_of = |h: &str| {
            t.hosts
                .iter()
                .find(|x| x.name == h)
                .map(|x| x.cloud.clone())
        };
        let mut members = etcd_members(t);
        let own = cloud_of(&self.host);
        members.sort_by_key(|(h, _)| cloud_of(h) != own);
        // etcd's own TLS material (the lab writes it before starting the members).
        let etcd_dir = self.tls_dir.with_file_name("etcd-tls");
        let etcd_tls = etcd_dir.join("ca").join("ca.pem").exists();
        let scheme = if etcd_tls { "https" } else { "http" };
        let store = if members.is_empty() {
            String::new()
        } else {
            let urls: Vec<String> = members
                .iter()
                .map(|(_, a)| format!("{scheme}://{a}"))
                .collect();
            format!("store = \"etcd:{}\"\n", urls.join(","))
        };
        let store = match t.gateway_connections_per_peer {
            Some(n) => format!("{store}max_connections_per_peer = {n}\n"),
            None => store,
        };
        let config = format!(
            "listen = \"{}\"\n\
             state_dir = \"{}\"\n\
             token_file = \"{}\"\n\
             overlay_cidr = \"{}\"\n\
             {}\
             vni = {}\n\
             public_cidrs = [\"{}\"]\n\
             {store}\
             {tls}\
             {etcd_tls}",
            self.api,
            self.state_dir.display(),
            self.token_file.display(),
            t.overlay_cidr,
            t.overlay6_cidr
                .map_or_else(String::new, |p| format!("overlay6_cidr = \"{p}\"\n")),
            t.vni,
            inet.public_pool,
            etcd_tls = if etcd_tls && !members.is_empty() {
                let f = ferry_tls::TlsFiles::in_dir(&etcd_dir.join("gateway"));
                format!(
                    "\n[etcd_tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
                    f.ca.display(),
                    f.cert.display(),
                    f.key.display()
                )
            } else {
                String::new()
            },
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
            if http_ok(
                &ns,
                self.api,
                "/v1/health",
                self.client_tls(Party::Operator)?,
            ) {
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
pub(crate) fn http_ok(
    ns: &Path,
    addr: SocketAddr,
    path: &str,
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
) -> bool {
    let path = path.to_owned();
    run_in(ns, move || {
        ferry_api::transport::Request::get(path)
            .tls(tls)
            .timeout(Duration::from_secs(2))
            .send_blocking(addr)
            .map(|r| r.status == 200)
    })
    .ok()
    .and_then(Result::ok)
    .unwrap_or(false)
}
