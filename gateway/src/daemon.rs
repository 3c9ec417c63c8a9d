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
    config::{Config, ConfigError},
    migration::coordinator::expire_released,
    registry::{LoadError, Registry},
    server::{Gateway, router},
    store::{self, Store, StoreError},
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
}

/// What `--check` found.
#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    pub config: PathBuf,
    pub listen: SocketAddr,
    pub state_file: PathBuf,
    pub state_exists: bool,
    pub version: u64,
    pub hosts: usize,
    pub endpoints: usize,
    pub public: usize,
    /// Live migrations (prepared, frozen, or released and maybe still forwarding).
    pub migrations: usize,
}

/// What the daemon starts from: config, token, TLS identity, store, registry.
type Prepared = (
    Config,
    String,
    Option<ferry_tls::Tls>,
    Option<Store>,
    Registry,
);

/// Loads what the daemon needs, in the daemon's order: config, token, TLS identity, stored
/// state (checked against the config). `lock`: take the state directory (the daemon) or only
/// read it (`--check`, which must not create anything).
fn prepare(config_path: &Path, lock: bool) -> Result<Prepared, StartError> {
    let config = Config::load(config_path)?;
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
    let store = if lock {
        Some(Store::open(&config.state_dir)?)
    } else {
        None
    };
    let state = store::read_state(&config.state_dir)?;
    let registry = match state {
        None => Registry::new(config.net()),
        Some(s) => Registry::from_persisted(config.net(), s).map_err(|source| {
            StartError::StateMismatch {
                state_file: config.state_dir.join(store::STATE_FILE),
                config: config_path.to_path_buf(),
                source,
            }
        })?,
    };
    Ok((config, token, tls, store, registry))
}

/// `ferry gateway --config F --check`.
pub fn check(config_path: &Path) -> Result<CheckReport, StartError> {
    let (config, _, _, _, registry) = prepare(config_path, false)?;
    let state_file = config.state_dir.join(store::STATE_FILE);
    Ok(CheckReport {
        config: config_path.to_path_buf(),
        listen: config.listen,
        state_exists: state_file.exists(),
        state_file,
        version: registry.version(),
        hosts: registry.host_count(),
        endpoints: registry.endpoint_count(),
        public: registry.public_count(),
        migrations: registry.live_migrations().count(),
    })
}

/// `ferry gateway --config F`: serves until SIGTERM or SIGINT.
pub async fn serve(config_path: &Path) -> Result<(), StartError> {
    use tokio::signal::unix::{SignalKind, signal};
    let handler = |name: &'static str, kind| {
        signal(kind).map_err(|source| StartError::Signal { name, source })
    };
    let mut term = handler("SIGTERM", SignalKind::terminate())?;
    let mut int = handler("SIGINT", SignalKind::interrupt())?;

    let (config, token, tls, store, registry) = prepare(config_path, true)?;
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
    g.configure_runs(
        config.listen,
        config.agent_api_port,
        Some(config.state_dir.join("runs")),
    );
    let expiry = tokio::spawn(expire_released(g.clone()));
    info!(
        listen = %config.listen, state = %g.store.path().display(), version, hosts, endpoints,
        public, overlay_cidr = %config.overlay_cidr, vni = config.vni,
        "gateway listening"
    );
    let app = router(g.clone());
    let g2 = g.clone();
    ferry_api::serve::serve(
        listener,
        app,
        ferry_api::serve::Limits::default(),
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
