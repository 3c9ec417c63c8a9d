//! Start-up: `ferry gateway --config F` ([`serve`]) and its `--check` ([`check`]): config, token,
//! stored state (checked against the config), then the HTTP API until SIGTERM or SIGINT.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::Serialize;
use tracing::{info, warn};

use crate::{
    auth::{self, TokenError},
    config::{Config, ConfigError, StoreSpec},
    migration::coordinator::expire_released,
    registry::{LoadError, Registry},
    server::{Gateway, router},
    store::{self, Backend, Store, StoreError},
};

/// Why the daemon did not start (or stopped serving).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("TLS: {0}")]
    Tls(#[from] ferry_tls::TlsError),
    #[error(
        "TLS: {} names {found}, not the gateway (issue one with ferry certs issue gateway --ip ADDR)",
        cert.display()
    )]
    NotTheGateway {
        cert: PathBuf,
        found: ferry_tls::Identity,
    },
    #[error(
        "{}: the stored registry does not fit config {}: {source}; the file was left untouched",
        state_file.display(),
        config.display()
    )]
    StateMismatch {
        state_file: PathBuf,
        config: PathBuf,
        #[source]
        source: LoadError,
    },
    #[error("{name} handler: {source}")]
    Signal {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("serving: {0}")]
    Serve(#[source] std::io::Error),
    #[error("--store {0}")]
    StoreSpec(String),
    #[error("--import: {0}")]
    Import(String),
}

/// What `--check` found.
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    pub config: PathBuf,
    pub listen: SocketAddr,
    /// Where the registry is kept (a file, or etcd's members and prefix).
    pub store: String,
    pub state_file: PathBuf,
    pub state_exists: bool,
    pub version: u64,
    pub hosts: usize,
    pub endpoints: usize,
    pub public: usize,
    /// Live migrations (prepared, frozen, or released and maybe still forwarding).
    pub migrations: usize,
}

/// What the daemon starts from: config, token, TLS identity, store (with the etcd revision
/// the registry was read at), registry.
struct Prepared {
    config: Config,
    token: String,
    tls: Option<ferry_tls::Tls>,
    store: Option<Backend>,
    revision: i64,
    registry: Registry,
    /// Where the registry was read from (errors, `--check`).
    source: String,
}

/// The config with `--store` applied (`file:PATH` also moves `state_dir`).
fn load_config(config_path: &Path, store: Option<&str>) -> Result<Config, StartError> {
    let mut config = Config::load(config_path)?;
    if let Some(spec) = store {
        match spec.parse::<StoreSpec>().map_err(StartError::StoreSpec)? {
            StoreSpec::File(Some(dir)) => {
                config.state_dir = dir;
                config.store = "file".into();
            }
            _ => config.store = spec.to_owned(),
        }
    }
    Ok(config)
}

fn etcd_store(
    config: &Config,
    members: crate::etcd::Members,
) -> Result<crate::etcd_store::EtcdStore, StartError> {
    let kv = std::sync::Arc::new(crate::etcd::HttpKv::new(members, etcd_tls(config)?));
    Ok(crate::etcd_store::EtcdStore::new(kv, &config.etcd_prefix))
}

/// The gateway's client identity towards etcd (`[etcd_tls]`), checked at start like `[tls]`.
fn etcd_tls(config: &Config) -> Result<Option<std::sync::Arc<rustls::ClientConfig>>, StartError> {
    let Some(files) = &config.etcd_tls else {
        return Ok(None);
    };
    let tls = ferry_tls::Tls::load(files)?;
    Ok(Some(tls.client_config()))
}

/// Loads what the daemon needs, in the daemon's order: config, token, TLS identity, stored
/// state (checked against the config). `lock`: take the state directory (the daemon) or only
/// read it (`--check`, which must not create anything).
fn prepare(config_path: &Path, store: Option<&str>, lock: bool) -> Result<Prepared, StartError> {
    let config = load_config(config_path, store)?;
    let token = auth::load_server_token(&config.token_file)?;
    let tls = match &config.tls {
        Some(files) => {
            let tls = ferry_tls::Tls::load(files)?;
            if tls.identity() != &ferry_tls::Identity::Gateway {
                return Err(StartError::NotTheGateway {
                    cert: files.cert.clone(),
                    found: tls.identity().clone(),
                });
            }
            Some(tls)
        }
        None => None,
    };
    let (store, state, revision, source) = match config.store_spec() {
        StoreSpec::File(_) => {
            let store = if lock {
                Some(Backend::File(Store::open(&config.state_dir)?))
            } else {
                None
            };
            let state = store::read_state(&config.state_dir)?;
            let source = config
                .state_dir
                .join(store::STATE_FILE)
                .display()
                .to_string();
            (store, state, 0, source)
        }
        StoreSpec::Etcd(members) => {
            let s = etcd_store(&config, members)?;
            let (state, revision) = s.load()?;
            let source = s.describe();
            (Some(Backend::Etcd(s)), state, revision, source)
        }
    };
    let registry = match state {
        None => Registry::new(config.net()),
        Some(s) => Registry::from_persisted(config.net(), s).map_err(|source_err| {
            StartError::StateMismatch {
                state_file: PathBuf::from(&source),
                config: config_path.to_path_buf(),
                source: source_err,
            }
        })?,
    };
    Ok(Prepared {
        config,
        token,
        tls,
        store,
        revision,
        registry,
        source,
    })
}

/// `ferry gateway --config F --check`.
pub fn check(config_path: &Path, store: Option<&str>) -> Result<CheckReport, StartError> {
    let p = prepare(config_path, store, false)?;
    let (config, registry) = (p.config, p.registry);
    let state_file = config.state_dir.join(store::STATE_FILE);
    let state_exists = match config.store_spec() {
        StoreSpec::File(_) => state_file.exists(),
        StoreSpec::Etcd(_) => registry.version() > 0,
    };
    Ok(CheckReport::of(
        config_path,
        &config,
        p.source,
        state_file,
        state_exists,
        &registry,
    ))
}

impl CheckReport {
    fn of(
        config_path: &Path,
        config: &Config,
        store: String,
        state_file: PathBuf,
        state_exists: bool,
        registry: &Registry,
    ) -> Self {
        Self {
            config: config_path.to_path_buf(),
            listen: config.listen,
            store,
            state_file,
            state_exists,
            version: registry.version(),
            hosts: registry.host_count(),
            endpoints: registry.endpoint_count(),
            public: registry.public_count(),
            migrations: registry.live_migrations().count(),
        }
    }
}

/// `ferry gateway --config F --store etcd:URLS --import DIR`: copies the file store in DIR
/// into etcd (refused if etcd already holds a registry).
pub fn import(
    config_path: &Path,
    store: Option<&str>,
    dir: &Path,
) -> Result<CheckReport, StartError> {
    let config = load_config(config_path, store)?;
    let StoreSpec::Etcd(members) = config.store_spec() else {
        return Err(StartError::Import(
            "the store to import into must be etcd (--store etcd:URLS or store = \"etcd:...\")"
                .into(),
        ));
    };
    let Some(state) = store::read_state(dir)? else {
        return Err(StartError::Import(format!(
            "{} holds no registry",
            dir.join(store::STATE_FILE).display()
        )));
    };
    let registry = Registry::from_persisted(config.net(), state.clone()).map_err(|source| {
        StartError::StateMismatch {
            state_file: dir.join(store::STATE_FILE),
            config: config_path.to_path_buf(),
            source,
        }
    })?;
    let s = etcd_store(&config, members)?;
    let absent = crate::etcd::Compare::Absent(format!("{}head", config.etcd_prefix).into_bytes());
    match s.checkpoint(&state, absent) {
        Ok(()) => {}
        Err(StoreError::Conflict { .. }) => {
            let have = s.load()?.0.map_or(0, |s| s.version);
            return Err(StartError::Import(format!(
                "{} already holds a registry (version {have}); nothing was written",
                s.describe()
            )));
        }
        Err(e) => return Err(e.into()),
    }
    info!(from = %dir.display(), to = %s.describe(), version = state.version, "registry imported");
    Ok(CheckReport::of(
        config_path,
        &config,
        s.describe(),
        dir.join(store::STATE_FILE),
        true,
        &registry,
    ))
}

/// `ferry gateway --config F`: serves until SIGTERM or SIGINT.
pub async fn serve(config_path: &Path, store: Option<&str>) -> Result<(), StartError> {
    use tokio::signal::unix::{SignalKind, signal};
    let handler = |name: &'static str, kind| {
        signal(kind).map_err(|source| StartError::Signal { name, source })
    };
    let mut term = handler("SIGTERM", SignalKind::terminate())?;
    let mut int = handler("SIGINT", SignalKind::interrupt())?;

    let Prepared {
        config,
        token,
        tls,
        store,
        revision,
        registry,
        ..
    } = {
        // Reading etcd blocks: not on a runtime worker.
        let (path, store) = (config_path.to_path_buf(), store.map(str::to_owned));
        tokio::task::spawn_blocking(move || prepare(&path, store.as_deref(), true))
            .await
            .map_err(|e| StartError::Serve(std::io::Error::other(e)))??
    };
    if tls.is_none() {
        warn!(
            listen = %config.listen,
            "insecure_plaintext: the API is plain HTTP; the token and every request cross the network in clear"
        );
    }
    let store = store.expect("prepare(lock) opens the store");
    let (hosts, endpoints, public, version) = (
        registry.host_count(),
        registry.endpoint_count(),
        registry.public_count(),
        registry.version(),
    );
    let dangling = registry.dangling_public();
    if !dangling.is_empty() {
        info!(containers = ?dangling, "public mappings kept for containers that are not endpoints now");
    }
    for l in registry.live_migrations() {
        let m = &l.migration;
        info!(
            migration = %m.id, container = %m.container, from = %m.from, to = %m.to,
            phase = %m.phase,
            "migration in progress kept as it is: agents re-sync through their watch; continue or abort it"
        );
    }
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| StartError::Listen {
            addr: config.listen,
            source,
        })?;
    let g = Gateway::new(
        registry,
        store,
        token,
        config.watch_timeout(),
        config.step_timeout(),
    );
    g.set_client_tls(tls.as_ref().map(|t| t.client_config()));
    if let Some(store) = g.store.etcd() {
        // A change etcd lost the answer to is sent again only while its caller still waits.
        let weak = std::sync::Arc::downgrade(&g);
        store.set_resend_gate(Box::new(move |began| {
            weak.upgrade()
                .is_some_and(|g| !g.quorum.cut_off_since(began))
        }));
    }
    if let StoreSpec::Etcd(members) = config.store_spec() {
        crate::cluster::spawn(
            g.clone(),
            members.0,
            etcd_tls(&config)?,
            revision,
            config.listen.to_string(),
        );
    }
    g.configure_runs(
        config.listen,
        config.agent_api_port,
        Some(config.state_dir.join("runs")),
    );
    let expiry = tokio::spawn(expire_released(g.clone()));
    info!(
        listen = %config.listen, store = %g.store.describe(), version, hosts, endpoints,
        public, overlay_cidr = %config.overlay_cidr, vni = config.vni,
        "gateway listening"
    );
    let app = router(g.clone());
    let g2 = g.clone();
    ferry_api::serve::serve(
        listener,
        app,
        ferry_api::serve::Limits {
            per_peer: config.max_connections_per_peer,
            total: config.max_connections,
            ..ferry_api::serve::Limits::default()
        },
        tls.as_ref().map(|t| t.server_config()),
        g.connections.clone(),
        async move {
            tokio::select! {
                _ = term.recv() => info!("SIGTERM: shutting down"),
                _ = int.recv() => info!("SIGINT: shutting down"),
            }
            g2.begin_shutdown();
        },
        std::time::Duration::from_secs(10),
    )
    .await
    .map_err(StartError::Serve)?;
    g.begin_shutdown();
    let _ = expiry.await;
    info!(version = g.current().version(), "gateway stopped");
    Ok(())
}
