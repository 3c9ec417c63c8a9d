//! A small client of the API: JSON over [`crate::transport`] (hyper, one connection per
//! request, a deadline on every request).

use std::{
    io,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use serde::{Serialize, de::DeserializeOwned};

use crate::{
    transport::{HttpError, ProtocolError, Request},
    types::*,
    validate::percent_encode,
};

/// Default deadline of one request (connect and complete answer).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// The header a gateway cut off from the registry's store (etcd's quorum out of reach) puts
/// on every answer: milliseconds since it last heard the quorum. What it answers is true of
/// some version, maybe not the newest: a client with other gateways reads from them first.
pub const CUT_OFF_HEADER: &str = "ferry-cut-off-ms";
/// Largest answer body accepted: a snapshot of 65,536 endpoints is about 6 MB, of 262,144
/// (the agents' endpoint map) about 24 MB.
pub const MAX_BODY: usize = 64 * 1024 * 1024;

/// Everything that can go wrong talking to the gateway.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("connecting to gateway {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("gateway {addr}: {what}: no complete answer within {timeout:?}")]
    Timeout {
        addr: SocketAddr,
        what: String,
        timeout: Duration,
    },
    #[error("gateway {addr}: {what}: {source}")]
    Io {
        addr: SocketAddr,
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("gateway {addr}: {what}: invalid HTTP answer: {source}")]
    Protocol {
        addr: SocketAddr,
        what: String,
        #[source]
        source: ProtocolError,
    },
    /// The gateway answered with an error status. `code` is the API error code when the body
    /// was an [`ErrorBody`]; `message` is its message, or else the raw body.
    #[error("{message} ({}, HTTP {status})", code.as_deref().unwrap_or("no error code"))]
    Http {
        status: u16,
        code: Option<String>,
        message: String,
        /// With `rolled_back` / `needs_attention`: where the failed migration step left things.
        migration: Option<Box<MigrationFailure>>,
    },
    #[error("decoding {what}: {source}")]
    Decode {
        what: String,
        #[source]
        source: serde_json::Error,
    },
    /// The TLS handshake failed or the gateway refused this client's certificate.
    #[error("gateway {addr}: TLS: {reason}{hint}")]
    Tls {
        addr: SocketAddr,
        reason: String,
        hint: &'static str,
    },
    #[error("token file {}: {source}", path.display())]
    TokenFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl ApiError {
    /// The API error code, for an error answered by the gateway.
    pub fn code(&self) -> Option<&str> {
        match self {
            ApiError::Http { code, .. } => code.as_deref(),
            _ => None,
        }
    }

    /// Where a failed migration step left things (`rolled_back`, `needs_attention`).
    pub fn migration_failure(&self) -> Option<&MigrationFailure> {
        match self {
            ApiError::Http { migration, .. } => migration.as_deref(),
            _ => None,
        }
    }

    /// The HTTP status, for an error answered by the gateway.
    pub fn status(&self) -> Option<u16> {
        match self {
            ApiError::Http { status, .. } => Some(*status),
            _ => None,
        }
    }
}

impl From<HttpError> for ApiError {
    fn from(e: HttpError) -> Self {
        match e {
            HttpError::Connect { addr, source } => ApiError::Connect { addr, source },
            HttpError::Tls { addr, reason, hint } => ApiError::Tls { addr, reason, hint },
            HttpError::Timeout {
                addr,
                what,
                timeout,
            } => ApiError::Timeout {
                addr,
                what,
                timeout,
            },
            HttpError::Io { addr, what, source } => ApiError::Io { addr, what, source },
            HttpError::Protocol { addr, what, source } => ApiError::Protocol { addr, what, source },
            // A token or path that cannot be sent (e.g. a control character in a token
            // given to `Client::new`).
            HttpError::Request { addr, what, source } => ApiError::Io {
                addr,
                what,
                source: io::Error::new(io::ErrorKind::InvalidInput, source),
            },
            HttpError::Runtime { addr, source } => ApiError::Io {
                addr,
                what: "starting a runtime".into(),
                source,
            },
        }
    }
}

/// Reads a bearer token file: surrounding whitespace is trimmed, an empty file is an error.
pub fn read_token_file(path: &Path) -> Result<String, ApiError> {
    let err = |source| ApiError::TokenFile {
        path: path.to_path_buf(),
        source,
    };
    let text = std::fs::read_to_string(path).map_err(err)?;
    let token = text.trim();
    if token.is_empty() {
        return Err(err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the file is empty (want a bearer token)",
        )));
    }
    if let Some(c) = token.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("the token contains {c:?}: want printable ASCII without spaces"),
        )));
    }
    Ok(token.to_string())
}

/// A client of a gateway, or of several serving one registry (etcd): requests go to the one
/// that answered last; one that cannot be reached is passed over for the next (a request
/// that reached none is never half-sent: only connection failures, and for reads any
/// transport failure, move on).
#[derive(Clone)]
pub struct Client {
    addr: SocketAddr,
    /// Every gateway, `addr` first (empty: `addr` alone).
    all: Arc<[SocketAddr]>,
    /// Index in `all` of the gateway that answered last.
    current: Arc<std::sync::atomic::AtomicUsize>,
    token: Option<String>,
    timeout: Duration,
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("addr", &self.addr)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("timeout", &self.timeout)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

impl Client {
    pub fn new(addr: SocketAddr, token: Option<String>) -> Self {
        Self {
            addr,
            all: Arc::from(Vec::new()),
            current: Arc::default(),
            token,
            timeout: DEFAULT_TIMEOUT,
            tls: None,
        }
    }

    /// Speaks TLS with this client configuration (`ferry_tls::Tls::client_config`); `None`:
    /// plain HTTP.
    pub fn with_tls(mut self, tls: Option<Arc<rustls::ClientConfig>>) -> Self {
        self.tls = tls;
        self
    }

    /// The TLS configuration requests are made with.
    pub fn tls(&self) -> Option<Arc<rustls::ClientConfig>> {
        self.tls.clone()
    }

    /// A client whose token is read from `path` (see [`read_token_file`]).
    pub fn with_token_file(addr: SocketAddr, path: &Path) -> Result<Self, ApiError> {
        Ok(Self::new(addr, Some(read_token_file(path)?)))
    }

    /// Sets the deadline of each request (except [`Client::watch`], which takes its own).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Also these gateways (serving the same registry), tried in order when the one that
    /// answered last cannot be reached.
    pub fn with_fallbacks(mut self, others: &[SocketAddr]) -> Self {
        let mut all = vec![self.addr];
        all.extend(others.iter().filter(|a| **a != self.addr));
        self.all = Arc::from(all);
        self.current = Arc::default();
        self
    }

    /// The gateway requests go to now (the one that answered last).
    pub fn addr(&self) -> SocketAddr {
        if self.all.is_empty() {
            return self.addr;
        }
        self.all[self.current.load(std::sync::atomic::Ordering::Relaxed) % self.all.len()]
    }

    /// Moves this client (and its clones) off `addr` to the next gateway if `addr` is still
    /// the one in use: for a caller that saw it fail to answer in time (a host that died
    /// answers nothing, not even a refusal). Returns whether it moved.
    pub fn move_on_from(&self, addr: SocketAddr) -> bool {
        let n = self.all.len();
        if n < 2 {
            return false;
        }
        use std::sync::atomic::Ordering::Relaxed;
        let now = self.current.load(Relaxed);
        // Only from the value read: a clone that moved meanwhile is not moved twice.
        self.all[now % n] == addr
            && self
                .current
                .compare_exchange(now, (now % n + 1) % n, Relaxed, Relaxed)
                .is_ok()
    }

    /// Every gateway this client knows, the first configured first.
    pub fn addrs(&self) -> Vec<SocketAddr> {
        if self.all.is_empty() {
            vec![self.addr]
        } else {
            self.all.to_vec()
        }
    }

    pub async fn health(&self) -> Result<Health, ApiError> {
        self.get("/v1/health").await
    }

    /// The registry version (`GET /v1/version`).
    pub async fn version(&self) -> Result<u64, ApiError> {
        let v: RegistryVersion = self.get("/v1/version").await?;
        Ok(v.version)
    }

    pub async fn register_host(&self, host: &HostInfo) -> Result<HostStatus, ApiError> {
        self.send("POST", "/v1/hosts", Some(host), self.timeout)
            .await
    }

    /// `POST /v1/hosts/{name}/heartbeat`: tells the gateway this host's agent is alive.
    pub async fn heartbeat(&self, name: &str) -> Result<HostStatus, ApiError> {
        let path = format!("/v1/hosts/{}/heartbeat", percent_encode(name));
        self.send::<(), _>("POST", &path, None, self.timeout).await
    }

    pub async fn hosts(&self) -> Result<Vec<HostStatus>, ApiError> {
        self.get("/v1/hosts").await
    }

    pub async fn remove_host(&self, name: &str) -> Result<HostStatus, ApiError> {
        let path = format!("/v1/hosts/{}", percent_encode(name));
        self.send::<(), _>("DELETE", &path, None, self.timeout)
            .await
    }

    /// Adds endpoints, all or none.
    pub async fn add_endpoints(&self, specs: &[EndpointSpec]) -> Result<Vec<Endpoint>, ApiError> {
        let body = EndpointsRequest {
            endpoints: specs.to_vec(),
        };
        self.send("POST", "/v1/endpoints", Some(&body), self.timeout)
            .await
    }

    pub async fn endpoints(&self) -> Result<Vec<Endpoint>, ApiError> {
        self.get("/v1/endpoints").await
    }

    pub async fn remove_endpoint(&self, ip: Ipv4Addr) -> Result<Endpoint, ApiError> {
        self.send::<(), _>("DELETE", &format!("/v1/endpoints/{ip}"), None, self.timeout)
            .await
    }

    /// An address from the gateway's IPAM pool (see [`IpamAllocateRequest`]).
    pub async fn ipam_allocate(
        &self,
        req: &IpamAllocateRequest,
    ) -> Result<IpamAllocation, ApiError> {
        self.send("POST", "/v1/ipam/allocate", Some(req), self.timeout)
            .await
    }

    /// Frees a container's address, and its endpoint on that host (see
    /// [`IpamReleaseRequest`]).
    pub async fn ipam_release(&self, req: &IpamReleaseRequest) -> Result<IpamRelease, ApiError> {
        self.send("POST", "/v1/ipam/release", Some(req), self.timeout)
            .await
    }

    /// `host` (role gateway) takes the internet side over from `from` (see
    /// [`crate::PublicTakeoverRequest`]).
    pub async fn public_takeover(
        &self,
        host: &str,
        from: &str,
    ) -> Result<crate::PublicTakeover, ApiError> {
        let req = crate::PublicTakeoverRequest {
            host: host.to_owned(),
            from: from.to_owned(),
        };
        self.send("POST", "/v1/public/takeover", Some(&req), self.timeout)
            .await
    }

    /// The pool and its leases.
    pub async fn ipam(&self) -> Result<IpamStatus, ApiError> {
        self.get("/v1/ipam").await
    }

    pub async fn add_public(&self, spec: &PublicSpec) -> Result<PublicMapping, ApiError> {
        self.send("POST", "/v1/public", Some(spec), self.timeout)
            .await
    }

    pub async fn public(&self) -> Result<Vec<PublicMapping>, ApiError> {
        self.get("/v1/public").await
    }

    /// Removes a public mapping by key (`203.0.113.130` or `203.0.113.130:8080/tcp`).
    pub async fn remove_public(&self, key: &str) -> Result<PublicMapping, ApiError> {
        let path = format!("/v1/public/{}", percent_encode(key));
        self.send::<(), _>("DELETE", &path, None, self.timeout)
            .await
    }

    /// The prepare step: creates a migration of `container` to host `to` (or, repeated while
    /// it is prepared, answers it unchanged). `timeout`: how long the gateway waits for the
    /// agents (default: its `step_timeout_ms`). See [`Client::step_deadline`].
    pub async fn prepare_migration(
        &self,
        container: Ipv4Addr,
        to: &str,
        timeout: Option<Duration>,
    ) -> Result<MigrationStep, ApiError> {
        let body = MigrationRequest {
            container,
            to: to.to_string(),
            run: false,
        };
        let path = format!("/v1/migrations{}", step_query(timeout));
        self.send("POST", &path, Some(&body), self.step_deadline(timeout))
            .await
    }

    /// Prepare, marked as run by the gateway ([`Migration::run`]): what the gateway's own
    /// runs send.
    pub async fn prepare_run_migration(
        &self,
        container: Ipv4Addr,
        to: &str,
    ) -> Result<MigrationStep, ApiError> {
        let body = MigrationRequest {
            container,
            to: to.to_string(),
            run: true,
        };
        self.send(
            "POST",
            "/v1/migrations",
            Some(&body),
            self.step_deadline(None),
        )
        .await
    }

    /// The freeze step of migration `id`.
    pub async fn freeze_migration(
        &self,
        id: &str,
        timeout: Option<Duration>,
    ) -> Result<MigrationStep, ApiError> {
        self.migration_step(id, MigrationStepKind::Freeze, timeout)
            .await
    }

    /// The release step of migration `id`.
    pub async fn release_migration(
        &self,
        id: &str,
        timeout: Option<Duration>,
    ) -> Result<MigrationStep, ApiError> {
        self.migration_step(id, MigrationStepKind::Release, timeout)
            .await
    }

    /// Aborts migration `id`.
    pub async fn abort_migration(
        &self,
        id: &str,
        timeout: Option<Duration>,
    ) -> Result<MigrationStep, ApiError> {
        self.migration_step(id, MigrationStepKind::Abort, timeout)
            .await
    }

    /// `freeze`, `release` or `abort` of migration `id` (`prepare` is
    /// [`Client::prepare_migration`]).
    pub async fn migration_step(
        &self,
        id: &str,
        step: MigrationStepKind,
        timeout: Option<Duration>,
    ) -> Result<MigrationStep, ApiError> {
        let path = format!(
            "/v1/migrations/{}/{step}{}",
            percent_encode(id),
            step_query(timeout)
        );
        self.send::<(), _>("POST", &path, None, self.step_deadline(timeout))
            .await
    }

    /// Starts a whole-container migration (`POST /v1/runs`); it goes on in the gateway.
    pub async fn start_run(
        &self,
        req: &crate::run::RunRequest,
    ) -> Result<crate::run::RunReport, ApiError> {
        self.send("POST", "/v1/runs", Some(req), self.timeout).await
    }

    /// A run's report so far (`GET /v1/runs/{id}`).
    pub async fn run(&self, id: &str) -> Result<crate::run::RunReport, ApiError> {
        self.get(&format!("/v1/runs/{}", percent_encode(id))).await
    }

    /// A progress event for run `id` (agents, during a checkpoint). With several gateways
    /// the run is driven by one of them, not necessarily the one this client follows: a
    /// gateway that does not hold the run answers `unknown_migration` (nothing appended) and
    /// the next one is asked.
    pub async fn run_event(&self, id: &str, event: &crate::run::RunEvent) -> Result<(), ApiError> {
        self.post_run_event(id, event, Elsewhere::OrUnknownRun)
            .await
    }

    /// [`Self::run_event`] to the gateway this client uses only: for a caller that cannot
    /// wait on the others (CRIU's hook, while the container is frozen).
    pub async fn run_event_here(
        &self,
        id: &str,
        event: &crate::run::RunEvent,
    ) -> Result<(), ApiError> {
        self.post_run_event(id, event, Elsewhere::CutOff).await
    }

    async fn post_run_event(
        &self,
        id: &str,
        event: &crate::run::RunEvent,
        elsewhere: Elsewhere,
    ) -> Result<(), ApiError> {
        let path = format!("/v1/runs/{}/events", percent_encode(id));
        let _: serde_json::Value = self
            .send_with("POST", &path, Some(event), self.timeout, elsewhere)
            .await?;
        Ok(())
    }

    /// The deadline of a step request: the gateway may wait `timeout` for the agents, and as
    /// long again for an automatic abort, so `2 × timeout` plus the client's own timeout
    /// (without a timeout: 2 × 60 s, the largest `step_timeout_ms` a gateway accepts).
    pub fn step_deadline(&self, timeout: Option<Duration>) -> Duration {
        timeout
            .unwrap_or(Duration::from_millis(MAX_CONFIG_STEP_TIMEOUT_MS))
            .saturating_mul(2)
            .saturating_add(self.timeout)
    }

    /// Every migration the gateway knows (active, released and still forwarding, and the
    /// history of finished ones), oldest first.
    pub async fn migrations(&self) -> Result<Vec<Migration>, ApiError> {
        self.get("/v1/migrations").await
    }

    /// The migrations of one container, oldest first; `active_only`: only a `prepared` or
    /// `frozen` one.
    pub async fn container_migrations(
        &self,
        container: Ipv4Addr,
        active_only: bool,
    ) -> Result<Vec<Migration>, ApiError> {
        let mut path = format!("/v1/migrations?container={container}");
        if active_only {
            path.push_str("&active=true");
        }
        self.get(&path).await
    }

    /// The container's active (`prepared` or `frozen`) migration, if any.
    pub async fn active_migration(
        &self,
        container: Ipv4Addr,
    ) -> Result<Option<Migration>, ApiError> {
        Ok(self
            .container_migrations(container, true)
            .await?
            .into_iter()
            .next_back())
    }

    /// The container's active migration, or else its most recent one (what a repeated step
    /// refers to: `ferry migrate release --container IP` after the release).
    pub async fn latest_migration(
        &self,
        container: Ipv4Addr,
    ) -> Result<Option<Migration>, ApiError> {
        let all = self.container_migrations(container, false).await?;
        Ok(all
            .iter()
            .rev()
            .find(|m| m.phase.is_active())
            .or(all.last())
            .cloned())
    }

    /// One migration by id.
    pub async fn migration(&self, id: &str) -> Result<Migration, ApiError> {
        self.get(&format!("/v1/migrations/{}", percent_encode(id)))
            .await
    }

    /// Long-polls for a snapshot newer than `after`. `timeout` bounds the whole request: make it
    /// longer than the gateway's `watch_timeout_ms`.
    pub async fn watch(
        &self,
        host: &str,
        after: u64,
        timeout: Duration,
    ) -> Result<Snapshot, ApiError> {
        self.send::<(), _>("GET", &watch_path(host, after, false), None, timeout)
            .await
    }

    /// [`Client::watch`], answered as a delta from `after` when the gateway can (the caller
    /// must hold the snapshot of version `after` to apply it).
    pub async fn watch_update(
        &self,
        host: &str,
        after: u64,
        timeout: Duration,
    ) -> Result<crate::WatchUpdate, ApiError> {
        self.send::<(), _>("GET", &watch_path(host, after, true), None, timeout)
            .await
    }

    async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ApiError> {
        self.send::<(), _>("GET", path, None, self.timeout).await
    }

    /// A watch of its own that keeps its connection open between long polls ([`Watcher`]).
    pub fn watcher(&self) -> Watcher {
        Watcher {
            client: self.clone(),
            conn: None,
        }
    }

    /// `method path` with this client's identity (TLS, token) and `timeout`.
    fn request(&self, method: &str, path: &str, timeout: Duration) -> Request {
        let mut request = Request::new(method, path)
            .tls(self.tls.clone())
            .header("Accept", "application/json")
            .timeout(timeout);
        if let Some(t) = &self.token {
            request = request.token(t.as_str());
        }
        if self.all.len() > 1 {
            request = request.connect_timeout(FALLBACK_CONNECT_TIMEOUT);
        }
        request
    }

    async fn send<B: Serialize, T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&B>,
        timeout: Duration,
    ) -> Result<T, ApiError> {
        self.send_with(method, path, body, timeout, Elsewhere::CutOff)
            .await
    }

    async fn send_with<B: Serialize, T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&B>,
        timeout: Duration,
        elsewhere: Elsewhere,
    ) -> Result<T, ApiError> {
        let mut request = self.request(method, path, timeout);
        if let Some(body) = body {
            let body = serde_json::to_vec(body).map_err(|source| ApiError::Decode {
                what: format!("the body of {}", request.what()),
                source,
            })?;
            request = request.json(body);
        }
        let what = request.what();
        if self.all.len() < 2 {
            return request.send(self.addr).await?.json(&what);
        }
        // (A gateway whose host died answers nothing: `request` gives up its connect after a
        // second and the next one is tried, rather than after the whole request's timeout.)
        // Several gateways: from the one that answered last, each in turn while the failure
        // says the request did not reach a gateway (or, for a read, whatever it says, and a
        // gateway's answer that it cannot vouch for what it holds).
        let n = self.all.len();
        let first = self.current.load(std::sync::atomic::Ordering::Relaxed) % n;
        let read = method == "GET";
        let mut last = None;
        let mut refused = None;
        let mut not_here = false;
        for i in 0..n {
            let at = (first + i) % n;
            let copy = request.try_clone().expect("the client's bodies are whole");
            match copy.send(self.all[at]).await {
                // A gateway cut off from its store: it refused the request (`cut_off`: nothing
                // was applied, any request may go to the next one), or answered a read with
                // what it holds, maybe behind. The next one is asked; this answer is the one
                // given if no gateway does better.
                Ok(r)
                    if (read && r.headers.contains_key(CUT_OFF_HEADER))
                        || (r.status == 503 && r.error().code() == Some("cut_off"))
                        || (elsewhere == Elsewhere::OrUnknownRun
                            && r.error().code() == Some("unknown_migration")) =>
                {
                    let better =
                        refused
                            .as_ref()
                            .is_none_or(|p: &(usize, crate::transport::Response)| {
                                !p.1.is_success() && r.is_success()
                            });
                    if r.error().code() == Some("unknown_migration") {
                        not_here = true;
                    }
                    if better {
                        refused = Some((at, r));
                    }
                }
                Ok(r) => {
                    // A request that went on to where its run is (not where the client's
                    // other requests go) leaves the client where it was.
                    if !not_here {
                        self.current.store(at, std::sync::atomic::Ordering::Relaxed);
                    }
                    return r.json(&what);
                }
                Err(e) => {
                    let unsent = matches!(e, crate::transport::HttpError::Connect { .. });
                    if !(unsent || read) {
                        return Err(e.into());
                    }
                    last = Some(e);
                }
            }
        }
        if let Some((at, r)) = refused {
            if r.is_success() {
                self.current.store(at, std::sync::atomic::Ordering::Relaxed);
            }
            return r.json(&what);
        }
        Err(last.expect("at least two gateways tried").into())
    }
}

/// Which gateways' answers send a request on to the next gateway (with several).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Elsewhere {
    /// Only a gateway cut off from its store (`cut_off`, or a read marked as maybe behind).
    CutOff,
    /// Those, and a gateway that does not hold the request's run (`unknown_migration`):
    /// the run is driven by another gateway.
    OrUnknownRun,
}

/// `GET /v1/watch` for `host` from version `after`, answered as a delta when `delta`.
fn watch_path(host: &str, after: u64, delta: bool) -> String {
    let delta = if delta { "&delta=true" } else { "" };
    format!(
        "/v1/watch?host={}&after={after}{delta}",
        percent_encode(host)
    )
}

/// A watch that keeps its connection to the gateway open between long polls (HTTP/1.1
/// keep-alive, [`crate::transport::KeptConnection`]): an agent follows the registry with one
/// TCP connection and one TLS handshake instead of one per change. The connection follows the
/// client: when the client moved to another gateway, the next poll connects there; a
/// gateway that cannot be reached is left as the client leaves it (each gateway in turn).
#[derive(Debug)]
pub struct Watcher {
    client: Client,
    conn: Option<crate::transport::KeptConnection>,
}

impl Watcher {
    /// [`Client::watch`] on the kept connection.
    pub async fn watch(
        &mut self,
        host: &str,
        after: u64,
        timeout: Duration,
    ) -> Result<Snapshot, ApiError> {
        self.get(&watch_path(host, after, false), timeout).await
    }

    /// [`Client::watch_update`] on the kept connection.
    pub async fn watch_update(
        &mut self,
        host: &str,
        after: u64,
        timeout: Duration,
    ) -> Result<crate::WatchUpdate, ApiError> {
        self.get(&watch_path(host, after, true), timeout).await
    }

    /// Whether a connection is open for the next poll (tests).
    pub fn is_connected(&self) -> bool {
        self.conn.as_ref().is_some_and(|c| !c.is_closed())
    }

    async fn get<T: DeserializeOwned>(
        &mut self,
        path: &str,
        timeout: Duration,
    ) -> Result<T, ApiError> {
        let addr = self.client.addr();
        let request = self.client.request("GET", path, timeout);
        let what = request.what();
        let kept = self
            .conn
            .take()
            .filter(|c| c.addr() == addr && !c.is_closed());
        if let Some(conn) = kept {
            let again = request.try_clone().expect("a watch has no body");
            match request.send_kept(conn).await {
                (Ok(answer), back) => {
                    self.conn = back;
                    return answer.json(&what);
                }
                (Err(e @ crate::transport::HttpError::Timeout { .. }), _) => return Err(e.into()),
                // The server closed the kept connection as the poll went out (its idle
                // timeout, a restart): a watch may be asked again, on a new connection.
                (Err(e), _) => {
                    tracing::debug!(gateway = %addr, error = %e, "the kept watch connection failed; polling on a new one");
                    return self.get_fresh(again, addr, path, timeout).await;
                }
            }
        }
        self.get_fresh(request, addr, path, timeout).await
    }

    /// The poll on a new kept connection to `addr`.
    async fn get_fresh<T: DeserializeOwned>(
        &mut self,
        request: Request,
        addr: SocketAddr,
        path: &str,
        timeout: Duration,
    ) -> Result<T, ApiError> {
        let what = request.what();
        let conn = match request.open_kept(addr).await {
            Ok(c) => c,
            // Not reachable: the client's own way, each gateway in turn (the next poll
            // connects to the one that answered).
            Err(_) if self.client.all.len() > 1 => {
                return self.client.send::<(), T>("GET", path, None, timeout).await;
            }
            Err(e) => return Err(e.into()),
        };
        let (answer, back) = request.send_kept(conn).await;
        self.conn = back;
        answer?.json(&what)
    }
}

/// With fallback gateways: how long a gateway may take to accept a connection before the next
/// is tried (a lost SYN is retransmitted after 1 s: a slower answer is a dead or partitioned
/// host as often as not, and another gateway serves the same registry).
pub const FALLBACK_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// Largest `step_timeout_ms` in a gateway's configuration.
pub const MAX_CONFIG_STEP_TIMEOUT_MS: u64 = 60_000;

fn step_query(timeout: Option<Duration>) -> String {
    match timeout {
        Some(t) => format!("?timeout_ms={}", t.as_millis()),
        None => String::new(),
    }
}

/// Turns an error answer into [`ApiError::Http`], decoding an [`ErrorBody`] if it is one.
pub fn http_error(status: u16, body: &[u8]) -> ApiError {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(e) => ApiError::Http {
            status,
            code: Some(e.error.code),
            message: e.error.message,
            migration: e.error.migration,
        },
        Err(_) => {
            let text = String::from_utf8_lossy(body);
            let mut message: String = text.trim().chars().take(1000).collect();
            if message.is_empty() {
                message = format!("HTTP {status} with an empty body");
            }
            ApiError::Http {
                status,
                code: None,
                message,
                migration: None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[test]
    fn error_bodies_are_decoded_or_kept_raw() {
        let e = http_error(
            409,
            br#"{"error":{"code":"duplicate_endpoint","message":"10.244.1.5 is already on a1"}}"#,
        );
        assert_eq!(e.code(), Some("duplicate_endpoint"));
        assert_eq!(e.status(), Some(409));
        assert_eq!(
            e.to_string(),
            "10.244.1.5 is already on a1 (duplicate_endpoint, HTTP 409)"
        );
        let e = http_error(502, b"  Bad Gateway\n");
        assert_eq!(e.code(), None);
        assert!(e.to_string().starts_with("Bad Gateway"), "{e}");
        let e = http_error(500, b"");
        assert!(e.to_string().contains("empty body"), "{e}");
    }

    #[test]
    fn token_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("token");
        std::fs::write(&p, "  abc123\n").unwrap();
        assert_eq!(read_token_file(&p).unwrap(), "abc123");
        std::fs::write(&p, " \n\t").unwrap();
        let e = read_token_file(&p).unwrap_err();
        assert!(e.to_string().contains("empty"), "{e}");
        std::fs::write(&p, "ab c").unwrap();
        assert!(read_token_file(&p).is_err());
        let e = Client::with_token_file("127.0.0.1:1".parse().unwrap(), &dir.path().join("nope"))
            .unwrap_err();
        assert!(matches!(e, ApiError::TokenFile { .. }));
        assert!(e.to_string().contains("nope"), "{e}");
    }

    /// A one-shot server answering `answer` in two writes, recording the request.
    async fn one_shot(answer: &'static [u8]) -> (SocketAddr, tokio::task::JoinHandle<Vec<u8>>) {
        crate::transport::tests::server(answer, 0).await
    }

    #[tokio::test]
    async fn requests_carry_token_and_answers_decode() {
        let (addr, h) = one_shot(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 22\r\n\r\n{\"version\":7}         ",
        )
        .await;
        let c = Client::new(addr, Some("tok".into()));
        assert_eq!(c.version().await.unwrap(), 7);
        let req = String::from_utf8(h.await.unwrap()).unwrap();
        assert!(req.starts_with("GET /v1/version HTTP/1.1\r\n"), "{req}");
        assert!(
            req.to_lowercase().contains("authorization: bearer tok\r\n"),
            "{req}"
        );
    }

    /// A watcher's polls share one connection while the server keeps it open; a server that
    /// closes it (`connection: close`, or a restart) gets a new one at the next poll.
    #[tokio::test]
    async fn a_watcher_keeps_its_connection_between_polls() {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (accepted, served) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (a, sv) = (accepted.clone(), served.clone());
        tokio::spawn(async move {
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                a.fetch_add(1, SeqCst);
                let sv = sv.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    loop {
                        let mut chunk = [0u8; 1024];
                        let n = s.read(&mut chunk).await.unwrap_or(0);
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            let head = String::from_utf8_lossy(&buf[..end]).to_lowercase();
                            buf.drain(..end + 4);
                            assert!(!head.contains("connection: close"), "{head}");
                            // The third answer closes the connection; the fifth request
                            // is not answered, its connection dropped without a word (a
                            // server closing an idle connection as the poll goes out).
                            let n = sv.fetch_add(1, SeqCst);
                            if n == 4 {
                                return;
                            }
                            let third = n == 2;
                            let body = r#"{"delta":{"from":1,"version":2,"overlay_cidr":"10.244.0.0/16","vni":1,"migrations":[]}}"#;
                            let answer = format!(
                                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{}\r\n{body}",
                                body.len(),
                                if third { "connection: close\r\n" } else { "" }
                            );
                            s.write_all(answer.as_bytes()).await.unwrap();
                            if third {
                                return;
                            }
                        }
                    }
                });
            }
        });
        let mut w = Client::new(addr, None).watcher();
        for _ in 0..3 {
            let u = w
                .watch_update("a1", 1, Duration::from_secs(5))
                .await
                .unwrap();
            assert_eq!(u.version(), 2);
        }
        assert_eq!(accepted.load(SeqCst), 1, "three polls, one connection");
        assert!(!w.is_connected(), "the server closed it");
        w.watch_update("a1", 1, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(accepted.load(SeqCst), 2);
        assert_eq!(served.load(SeqCst), 4);
        // The next poll's connection fails under it: asked again on a new one, the caller
        // sees the answer.
        let u = w
            .watch_update("a1", 1, Duration::from_secs(5))
            .await
            .unwrap();
        assert_eq!(u.version(), 2);
        assert_eq!(accepted.load(SeqCst), 3);
        assert_eq!(served.load(SeqCst), 6);
        assert!(w.is_connected());
    }

    /// With several gateways, a run's event goes on past gateways that do not hold the run
    /// (`unknown_migration`) to the one that drives it, and the client stays where it was;
    /// another request does not go on for `unknown_migration`.
    #[tokio::test]
    async fn a_run_event_goes_on_to_the_gateway_that_holds_the_run() {
        fn answer(status: &str, body: &str) -> &'static [u8] {
            let a = format!(
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            Box::leak(a.into_bytes().into_boxed_slice())
        }
        let unknown = answer(
            "404 Not Found",
            r#"{"error":{"code":"unknown_migration","message":"no run has id m1"}}"#,
        );
        let ok = answer("200 OK", r#"{"ok":true}"#);
        let event = crate::run::RunEvent {
            unix_ms: 1.0,
            kind: "info".into(),
            message: "dumped".into(),
            phase: None,
            bytes: None,
            criu: None,
        };
        let (not_here, h1) = one_shot(unknown).await;
        let (driver, h2) = one_shot(ok).await;
        let c = Client::new(not_here, None).with_fallbacks(&[driver]);
        c.run_event("m1", &event).await.unwrap();
        for h in [h1, h2] {
            let req = String::from_utf8(h.await.unwrap()).unwrap();
            assert!(
                req.starts_with("POST /v1/runs/m1/events HTTP/1.1\r\n"),
                "{req}"
            );
        }
        assert_eq!(c.addr(), not_here, "the client stays with its gateway");

        // No gateway holds the run: the caller is told so.
        let (a, _h1) = one_shot(unknown).await;
        let (b, _h2) = one_shot(unknown).await;
        let e = Client::new(a, None)
            .with_fallbacks(&[b])
            .run_event("m1", &event)
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some("unknown_migration"), "{e}");

        // Any other request takes `unknown_migration` as the answer.
        let (a, _h1) = one_shot(unknown).await;
        let (b, h2) = one_shot(ok).await;
        let e = Client::new(a, None)
            .with_fallbacks(&[b])
            .run("m1")
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some("unknown_migration"), "{e}");
        drop(h2);
    }

    #[tokio::test]
    async fn error_answer_becomes_http_error() {
        let (addr, _h) = one_shot(
            b"HTTP/1.1 404 Not Found\r\ncontent-length: 62\r\n\r\n{\"error\":{\"code\":\"unknown_host\",\"message\":\"no host named x1\"}}",
        )
        .await;
        let e = Client::new(addr, None).remove_host("x1").await.unwrap_err();
        assert_eq!(e.code(), Some("unknown_host"), "{e}");
        assert_eq!(e.status(), Some(404));
    }

    #[tokio::test]
    async fn migration_steps_send_their_timeout_and_decode_failures() {
        let body = r#"{"error":{"code":"rolled_back","message":"b1 did not apply","migration":{"step":"freeze","migration":{"id":"m3","container":"10.244.1.5","from":"a1","to":"b1","phase":"aborted","created_unix_ms":1,"updated_unix_ms":2},"version":7,"lagging":[{"host":"b1","applied_version":5,"wanted_version":6,"connected":false}],"waited_ms":250}}}"#;
        let answer = format!(
            "HTTP/1.1 504 Gateway Timeout\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        );
        let (addr, h) = one_shot(Box::leak(answer.into_bytes().into_boxed_slice())).await;
        let c = Client::new(addr, None);
        let e = c
            .freeze_migration("m3", Some(Duration::from_millis(250)))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Some("rolled_back"), "{e}");
        let f = e.migration_failure().expect("failure detail");
        assert_eq!(f.migration.phase, MigrationPhase::Aborted);
        assert_eq!(f.lagging[0].host, "b1");
        let req = String::from_utf8(h.await.unwrap()).unwrap();
        assert!(
            req.starts_with("POST /v1/migrations/m3/freeze?timeout_ms=250 HTTP/1.1\r\n"),
            "{req}"
        );
        assert_eq!(
            c.step_deadline(Some(Duration::from_secs(1))),
            Duration::from_secs(12)
        );
        assert_eq!(c.step_deadline(None), Duration::from_secs(130));
    }

    #[tokio::test]
    async fn undecodable_answer_is_a_decode_error() {
        let (addr, _h) = one_shot(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n[]").await;
        let e = Client::new(addr, None).health().await.unwrap_err();
        assert!(matches!(e, ApiError::Decode { .. }), "{e}");
        assert!(e.to_string().contains("GET /v1/health"), "{e}");
    }

    #[tokio::test]
    async fn silent_server_times_out() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let _keep = tokio::spawn(async move {
            let (_s, _) = l.accept().await.unwrap();
            tokio::time::sleep(Duration::from_secs(30)).await;
        });
        let e = Client::new(addr, None)
            .timeout(Duration::from_millis(100))
            .endpoints()
            .await
            .unwrap_err();
        assert!(matches!(e, ApiError::Timeout { .. }), "{e}");
        assert!(e.to_string().contains("GET /v1/endpoints"), "{e}");
    }

    #[tokio::test]
    async fn refused_connection_is_a_connect_error() {
        let addr = {
            let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
            l.local_addr().unwrap()
        };
        let e = Client::new(addr, None).health().await.unwrap_err();
        assert!(matches!(e, ApiError::Connect { .. }), "{e}");
        assert!(e.to_string().starts_with("connecting to gateway"), "{e}");
    }

    #[tokio::test]
    async fn truncated_answer_is_a_protocol_error() {
        let (addr, _h) =
            one_shot(b"HTTP/1.1 200 OK\r\ncontent-length: 50\r\n\r\n{\"status\"").await;
        let e = Client::new(addr, None).health().await.unwrap_err();
        assert!(matches!(e, ApiError::Protocol { .. }), "{e}");
    }
}
