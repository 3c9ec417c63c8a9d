//! The gateway daemon's HTTP API (routes and semantics: the `ferry-api` crate's documentation).
//!
//! Concurrency: the registry is an immutable `Arc<Registry>` that readers clone cheaply. A
//! change runs on a blocking thread under one writer lock: clone, apply, persist, then publish
//! the new `Arc` and the new version (which wakes the watches). Running it off the request's
//! future means a client that disconnects cannot cancel a change half-way (persisted but not
//! published).
//!
//! The migration routes (and the waiting for agents they do) are in
//! [`crate::migration::coordinator`]; start-up is in [`crate::daemon`].

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock},
    time::Duration,
};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{
        DefaultBodyLimit, FromRequest, FromRequestParts, MatchedPath, Path as AxPath, Query,
        Request as HttpRequest, State,
        rejection::{JsonRejection, QueryRejection},
    },
    http::{HeaderValue, Method, StatusCode, Uri, header, request::Parts},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{delete, get},
};
use ferry_api::{
    API_VERSION, EndpointsRequest, ErrorBody, ErrorCode, Health, HostInfo, HostRole, HostStatus,
    IpamAllocateRequest, IpamRelease, IpamReleaseRequest, IpamStatus, MigrationFailure, PublicKey,
    PublicSpec, RegistryVersion, WatchQuery,
};
use serde::{Serialize, de::DeserializeOwned};
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use crate::{
    auth,
    metrics::{Metrics, RegistryGauges},
    migration::coordinator,
    registry::{Change, Registry, RegistryError, Request},
    store::{Backend, StoreError},
};

/// Largest request body: a batch of 65,536 endpoints is about 5 MB.
const MAX_REQUEST_BODY: usize = 64 * 1024 * 1024;

// ---------------------------------------------------------------------------------------------
// Errors as answers

/// An error answer: status, code and message, sent as [`ErrorBody`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiFailure {
    pub status: StatusCode,
    pub code: ErrorCode,
    pub message: String,
    /// With `rolled_back` / `needs_attention`: where the failed migration step left things.
    pub migration: Option<Box<MigrationFailure>>,
}

impl ApiFailure {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            status: StatusCode::from_u16(code.http_status())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            code,
            message: message.into(),
            migration: None,
        }
    }

    pub(crate) fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    pub(crate) fn with_migration(mut self, failure: MigrationFailure) -> Self {
        self.migration = Some(Box::new(failure));
        self
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }
}

impl From<RegistryError> for ApiFailure {
    fn from(e: RegistryError) -> Self {
        Self::new(e.code, e.message)
    }
}

impl IntoResponse for ApiFailure {
    fn into_response(self) -> Response {
        let mut body = ErrorBody::new(self.code.as_str(), self.message);
        body.error.migration = self.migration;
        let mut r = (self.status, Json(body)).into_response();
        if self.code == ErrorCode::Unauthorized {
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

/// `Json` whose rejections are [`ErrorBody`] answers with code `bad_request`.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiFailure;

    async fn from_request(req: HttpRequest, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Self(v)),
            Err(r) => Err(json_rejection(r)),
        }
    }
}

fn json_rejection(r: JsonRejection) -> ApiFailure {
    let text = r.body_text();
    match r {
        JsonRejection::JsonDataError(_) => ApiFailure::bad_request(format!(
            "invalid request body: {}",
            strip(
                &text,
                "Failed to deserialize the JSON body into the target type: "
            )
        )),
        JsonRejection::JsonSyntaxError(_) => ApiFailure::bad_request(format!(
            "request body is not valid JSON: {}",
            strip(&text, "Failed to parse the request body as JSON: ")
        )),
        JsonRejection::MissingJsonContentType(_) => {
            ApiFailure::bad_request("want a JSON body with `Content-Type: application/json`")
                .with_status(StatusCode::UNSUPPORTED_MEDIA_TYPE)
        }
        other => {
            let status = other.status();
            ApiFailure::bad_request(format!("reading the request body: {text}")).with_status(status)
        }
    }
}

fn strip<'a>(text: &'a str, prefix: &str) -> &'a str {
    text.strip_prefix(prefix).unwrap_or(text)
}

/// `Query` whose rejections are [`ErrorBody`] answers with code `bad_request`.
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiFailure;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(v)) => Ok(Self(v)),
            Err(r) => Err(query_rejection(r)),
        }
    }
}

fn query_rejection(r: QueryRejection) -> ApiFailure {
    ApiFailure::bad_request(format!(
        "invalid query: {}",
        strip(&r.body_text(), "Failed to deserialize query string: ")
    ))
}

/// One path parameter as a string (parsed by the handler, which names it in its errors).
pub struct PathParam(pub String);

impl<S: Send + Sync> FromRequestParts<S> for PathParam {
    type Rejection = ApiFailure;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match AxPath::<String>::from_request_parts(parts, state).await {
            Ok(AxPath(v)) => Ok(Self(v)),
            Err(r) => Err(ApiFailure::bad_request(format!(
                "invalid path: {}",
                r.body_text()
            ))),
        }
    }
}

/// A host name from a path or a query (`field` names where), checked before it is looked up.
pub(crate) fn host_name_param(field: &str, name: &str) -> Result<(), ApiFailure> {
    ferry_api::validate::validate_host_name(name)
        .map_err(|e| ApiFailure::bad_request(format!("{field}: {e}")))
}

/// A migration id from a path (`m<n>`), checked before it is looked up.
pub(crate) fn migration_id_param(id: &str) -> Result<(), ApiFailure> {
    ferry_api::validate::validate_migration_id(id)
        .map(drop)
        .map_err(|e| ApiFailure::bad_request(format!("path: {e}")))
}

// ---------------------------------------------------------------------------------------------
// Shared state

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct HostRuntime {
    pub(crate) applied_version: u64,
    pub(crate) last_seen_unix_ms: u64,
    pub(crate) open_watches: u32,
    /// When a watch of this host last opened or ended (0: never since the gateway started).
    pub(crate) last_watch_unix_ms: u64,
}

impl HostRuntime {
    /// The newest of each fact of two reports of one agent.
    pub(crate) fn merge(&self, other: &HostRuntime) -> HostRuntime {
        HostRuntime {
            applied_version: self.applied_version.max(other.applied_version),
            last_seen_unix_ms: self.last_seen_unix_ms.max(other.last_seen_unix_ms),
            open_watches: self.open_watches + other.open_watches,
            last_watch_unix_ms: self.last_watch_unix_ms.max(other.last_watch_unix_ms),
        }
    }
}

/// The cached delta from `from` (> 0) if it is the one to `version` and still exact at `now`.
fn delta_hit(
    cache: &Option<(u64, CachedSnapshot)>,
    from: u64,
    version: u64,
    now: u64,
) -> Option<Bytes> {
    match cache {
        Some((f, (v, until, b))) if from > 0 && *f == from && *v == version && now < *until => {
            Some(b.clone())
        }
        _ => None,
    }
}

/// How long a change's caller waits at most for its answer: inside the clients' default
/// timeout (10 s), so a store that hangs gets a clear answer, not a timeout.
pub const CHANGE_ANSWER: Duration = Duration::from_secs(8);

/// A serialised snapshot: its version, and until when (unix ms) it stays exact (the next end
/// of a forwarding grace in it).
type CachedSnapshot = (u64, u64, Bytes);

pub struct Gateway {
    current: RwLock<Arc<Registry>>,
    /// Serialises changes (held on a blocking thread across the fsyncs).
    writer: Mutex<()>,
    pub(crate) store: Backend,
    pub(crate) runtime: Mutex<HashMap<String, HostRuntime>>,
    /// What other gateways on the same etcd report of the agents they serve, by (host,
    /// gateway) (see [`crate::cluster`]).
    pub(crate) remote_runtime: Mutex<HashMap<(String, String), HostRuntime>>,
    /// This gateway's etcd lease and its contact with etcd's quorum, kept up by
    /// [`crate::cluster`]: its presence reports and the runs it drives
    /// ([`crate::migration::takeover`]) hang on the lease; without contact it is cut off.
    pub(crate) quorum: crate::cluster::Quorum,
    pub(crate) version_tx: watch::Sender<u64>,
    pub(crate) shutdown_tx: watch::Sender<bool>,
    /// Ticks whenever an agent reports an applied version (wakes the coordinator's waits).
    pub(crate) applied_tx: watch::Sender<u64>,
    token: String,
    watch_timeout: Duration,
    /// How long a migration step waits for the agents by default.
    pub(crate) step_timeout: Duration,
    pub(crate) metrics: Metrics,
    /// The newest snapshot, serialised once for every watch that answers it.
    snapshot_cache: Mutex<Option<CachedSnapshot>>,
    /// What each recent version touched (the delta watch).
    changelog: Mutex<crate::watch::ChangeLog>,
    /// The newest delta, serialised once for every watch from the same version: (from,
    /// version, valid until, bytes).
    delta_cache: Mutex<Option<(u64, CachedSnapshot)>>,
    /// Whole-container migrations (`ferry migrate run`).
    pub(crate) runs: crate::migration::runs::Runs,
    /// What the API's bounded server accepted and refused (exported as metrics).
    pub connections: Arc<ferry_api::serve::Stats>,
    /// The gateway's client identity (its calls to the agents' peer APIs and to itself);
    /// `None`: plain HTTP.
    client_tls: RwLock<Option<Arc<rustls::ClientConfig>>>,
}

/// Why one attempt at a change did not go through.
enum Retry {
    /// Another gateway made this version first: catch up and try again.
    Conflict(u64),
    Failed(ApiFailure),
}

/// A store's failure as the API answers it.
fn store_failure(e: &StoreError) -> ApiFailure {
    if e.outcome_unknown() {
        ApiFailure::new(
            ErrorCode::StoreUnavailable,
            format!(
                "{e}; the change's outcome is unknown: this gateway shows it once it reads it \
                 back from the store"
            ),
        )
    } else if e.unavailable() {
        ApiFailure::new(
            ErrorCode::StoreUnavailable,
            format!("{e}; the change was not applied (reads are still served)"),
        )
    } else {
        ApiFailure::new(
            ErrorCode::Internal,
            format!("{e}; the change was not applied"),
        )
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Gateway {
    pub fn new(
        registry: Registry,
        store: Backend,
        token: String,
        watch_timeout: Duration,
        step_timeout: Duration,
    ) -> Arc<Self> {
        let (version_tx, _) = watch::channel(registry.version());
        let (shutdown_tx, _) = watch::channel(false);
        let (applied_tx, _) = watch::channel(0);
        Arc::new(Self {
            current: RwLock::new(Arc::new(registry)),
            writer: Mutex::new(()),
            store,
            runtime: Mutex::new(HashMap::new()),
            remote_runtime: Mutex::new(HashMap::new()),
            quorum: crate::cluster::Quorum::default(),
            version_tx,
            shutdown_tx,
            applied_tx,
            token,
            watch_timeout,
            step_timeout,
            metrics: Metrics::new(),
            snapshot_cache: Mutex::new(None),
            changelog: Mutex::default(),
            delta_cache: Mutex::new(None),
            runs: crate::migration::runs::Runs::default(),
            connections: Arc::default(),
            client_tls: RwLock::new(None),
        })
    }

    /// Makes the gateway's own requests (to agents, to itself) over TLS with this identity.
    pub fn set_client_tls(&self, tls: Option<Arc<rustls::ClientConfig>>) {
        *self
            .client_tls
            .write()
            .unwrap_or_else(PoisonError::into_inner) = tls;
    }

    /// See [`Gateway::set_client_tls`].
    pub(crate) fn client_tls(&self) -> Option<Arc<rustls::ClientConfig>> {
        self.client_tls
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The API's bearer token (the gateway's own client uses it).
    pub(crate) fn token(&self) -> &str {
        &self.token
    }

    /// The gateway's own API address and the agents' peer API port, for runs.
    /// Where runs call the gateway and the agents; with `dir`, their reports are persisted
    /// there and the runs that were running are resumed.
    pub fn configure_runs(
        self: &Arc<Self>,
        listen: SocketAddr,
        agent_api_port: u16,
        dir: Option<std::path::PathBuf>,
    ) {
        self.runs.configure(listen, agent_api_port, dir);
        if self.store.etcd().is_some() {
            // Gateways sharing a registry: reports in etcd, and runs whose driver is gone
            // (this gateway before a restart included) taken over by whichever gateway
            // claims them first.
            if let Some(w) = crate::migration::takeover::ReportWriter::start(self) {
                self.runs.configure_etcd(w);
            }
            tokio::spawn(crate::migration::takeover::watch_orphans(
                self.clone(),
                self.runs.me(),
            ));
            return;
        }
        let mut running = self.runs.load();
        // A run whose report was never written (the gateway died during its prepare) is
        // still marked in the registry: resume it too.
        running.extend(crate::migration::runs::unreported(self));
        for id in running {
            crate::migration::runs::resume(self, id, "the gateway restarted during the run");
        }
    }

    /// The current registry.
    pub fn current(&self) -> Arc<Registry> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Ends open watches (they answer the current snapshot) and refuses to start new waits.
    pub fn begin_shutdown(&self) {
        self.shutdown_tx.send_replace(true);
    }

    /// Applies a change: validated, persisted, published, logged. Runs to completion even if
    /// the caller goes away. The caller is answered within [`CHANGE_ANSWER`], or as soon as
    /// this gateway counts itself cut off from etcd's quorum: a store that has not confirmed
    /// the change by then gets an answer saying the outcome is unknown, while the change goes
    /// on being resolved.
    pub(crate) async fn change(
        self: &Arc<Self>,
        req: Request,
    ) -> Result<(Change, u64), ApiFailure> {
        let g = self.clone();
        let task = tokio::task::spawn_blocking(move || g.change_blocking(req));
        // This gateway found itself cut off from etcd's quorum while the change waited on it:
        // etcd will not answer soon, so neither does the change.
        // (Cut off already: the change is refused at once, `cut_off`, not raced.)
        let cut_off_before = self.cut_off().is_some();
        let cut_off = async {
            if cut_off_before {
                return std::future::pending().await;
            }
            while self.cut_off().is_none() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        let answered = tokio::select! {
            done = tokio::time::timeout(CHANGE_ANSWER, task) => done.ok(),
            () = cut_off => None,
        };
        match answered {
            Some(done) => done.map_err(|e| {
                ApiFailure::new(ErrorCode::Internal, format!("change task failed: {e}"))
            })?,
            None => {
                self.metrics.count_store("unavailable");
                warn!(
                    cut_off = self.cut_off().is_some(),
                    "the store has not confirmed a change in time; answering that its outcome is unknown"
                );
                let why = match self.cut_off() {
                    Some(d) => format!(
                        "this gateway has not heard etcd's quorum for {} ms (cut off), and",
                        d.as_millis()
                    ),
                    None => String::new(),
                };
                Err(ApiFailure::new(
                    ErrorCode::StoreUnavailable,
                    format!(
                        "{why} {} has not confirmed the change: its outcome is unknown (it may \
                         or may not be applied); this gateway shows it once it reads it back \
                         from the store",
                        self.store.describe(),
                    )
                    .trim_start()
                    .to_owned(),
                ))
            }
        }
    }

    /// How long this gateway has been out of touch with etcd's quorum (`None`: in touch, or
    /// the file store, which this process is).
    pub(crate) fn cut_off(&self) -> Option<Duration> {
        self.store.etcd()?;
        self.quorum.cut_off()
    }

    /// The refusal of what a gateway cut off from etcd's quorum cannot do (`what`: the
    /// request), or `None` while it is in touch.
    pub(crate) fn refuse_if_cut_off(&self, what: &str) -> Option<ApiFailure> {
        let since = self.cut_off()?;
        Some(ApiFailure::new(
            ErrorCode::CutOff,
            format!(
                "this gateway has not heard etcd's quorum for {} ms (cut off from the other \
                 members?), so what it holds may be behind: {what}; another gateway serves it, \
                 or this one once it is back in touch",
                since.as_millis()
            ),
        ))
    }

    fn change_blocking(&self, req: Request) -> Result<(Change, u64), ApiFailure> {
        // Before queueing behind a change whose answer etcd lost (resolved for up to 15 s):
        // a cut-off gateway refuses at once (and again below, for one that waited).
        if let Some(f) = self.refuse_if_cut_off("the change was not applied") {
            self.metrics.count_store("cut_off");
            return Err(f);
        }
        let began = std::time::Instant::now();
        let writer = lock(&self.writer);
        // Another gateway may win the version this change was made on (etcd): read what won,
        // apply it, and make the change again on the newer registry (which may refuse it).
        let mut attempts = 0;
        loop {
            attempts += 1;
            match self.change_once(&writer, req.clone()) {
                // Its caller may have been told the outcome is unknown (this gateway was cut
                // off meanwhile): not made again on a newer registry.
                Err(Retry::Conflict(version))
                    if self.store.etcd().is_some() && self.quorum.cut_off_since(began) =>
                {
                    self.metrics.count_store("conflict");
                    return Err(ApiFailure::new(
                        ErrorCode::StoreUnavailable,
                        format!(
                            "another gateway changed the registry to version {version} first, \
                             and this one was cut off from etcd's quorum meanwhile: the change \
                             was not applied, nor made again"
                        ),
                    ));
                }
                Err(Retry::Conflict(version)) if attempts < 16 => {
                    self.metrics.count_store("conflict");
                    info!(
                        version,
                        attempts, "another gateway changed the registry first; catching up"
                    );
                    if let Err(e) = self.catch_up(&writer) {
                        return Err(store_failure(&e));
                    }
                }
                Err(Retry::Conflict(version)) => {
                    return Err(ApiFailure::new(
                        ErrorCode::StoreUnavailable,
                        format!(
                            "other gateways kept changing the registry (version {version}) \
                             faster than this one could catch up; the change was not applied"
                        ),
                    ));
                }
                Err(Retry::Failed(f)) => return Err(f),
                Ok(done) => return Ok(done),
            }
        }
    }

    fn change_once(
        &self,
        _writer: &MutexGuard<'_, ()>,
        req: Request,
    ) -> Result<(Change, u64), Retry> {
        let t0 = std::time::Instant::now();
        let old = self.current();
        let mut next = (*old).clone();
        let cloned = t0.elapsed();
        let change = match next.apply(req) {
            Ok(c) => c,
            Err(e) => {
                info!(code = %e.code, message = %e.message, "request refused");
                return Err(Retry::Failed(e.into()));
            }
        };
        let version = next.version();
        if change.changes_state() {
            // Made on what may be behind, and etcd would not take it anyway: refused at once
            // rather than after a transaction's timeout.
            if let Some(f) = self.refuse_if_cut_off("the change was not applied") {
                self.metrics.count_store("cut_off");
                return Err(Retry::Failed(f));
            }
            let applied = t0.elapsed();
            let touched = crate::watch::touched(&old, &next);
            let record = next.journal_record(&old, &touched);
            let diffed = t0.elapsed();
            match self
                .store
                .append(version, record.as_ref(), || next.to_persisted())
            {
                Ok(()) => {}
                Err(StoreError::Conflict { version }) => return Err(Retry::Conflict(version)),
                Err(e) => {
                    if e.unavailable() {
                        self.metrics.count_store("unavailable");
                    }
                    error!(error = %e, "persisting the registry failed");
                    return Err(Retry::Failed(store_failure(&e)));
                }
            }
            let persisted = t0.elapsed();
            let keys = touched.len();
            self.publish(next, touched);
            let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
            info!(
                version,
                keys,
                clone_ms = ms(cloned),
                apply_ms = ms(applied - cloned),
                diff_ms = ms(diffed - applied),
                persist_ms = ms(persisted - diffed),
                journaled = record.is_some(),
                "change published"
            );
        }
        log_change(&change, version);
        Ok((change, version))
    }

    /// Makes `next` current: its keys logged (before it is published: a watch that sees the
    /// version finds its keys), then the registry and its version.
    fn publish(&self, next: Registry, touched: crate::watch::Touched) {
        let version = next.version();
        lock(&self.changelog).record(version, touched);
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(next);
        self.version_tx.send_replace(version);
    }

    /// Applies what other gateways logged after the current version (etcd), now.
    fn catch_up_now(&self) -> Result<(), StoreError> {
        let writer = lock(&self.writer);
        self.catch_up(&writer)
    }

    /// Applies what other gateways logged after the current version (etcd).
    fn catch_up(&self, _writer: &MutexGuard<'_, ()>) -> Result<(), StoreError> {
        let Some(store) = self.store.etcd() else {
            return Ok(());
        };
        let (entries, revision) = store.entries_after(self.current().version(), 0)?;
        for (v, e) in entries {
            self.adopt_entry(store, v, e, revision)?;
        }
        Ok(())
    }

    fn adopt_entry(
        &self,
        store: &crate::etcd_store::EtcdStore,
        version: u64,
        entry: crate::etcd_store::LogEntry,
        revision: i64,
    ) -> Result<(), StoreError> {
        let old = self.current();
        if version <= old.version() {
            return Ok(());
        }
        if version != old.version() + 1 {
            // A gap (this gateway missed versions): read the registry whole.
            return self.reload_locked(store).map(|_| ());
        }
        let t0 = std::time::Instant::now();
        let next = store.apply_entry(&old, version, entry, revision)?;
        let touched = crate::watch::touched(&old, &next);
        info!(
            version = next.version(),
            keys = touched.len(),
            apply_ms = t0.elapsed().as_secs_f64() * 1e3,
            "change of another gateway applied"
        );
        self.metrics.count_store("remote");
        self.publish(next, touched);
        Ok(())
    }

    /// The follower's step: the entry of `version` that another gateway (or this one) logged
    /// at etcd `revision`, applied if it is new here.
    pub(crate) fn follow(
        &self,
        version: u64,
        entry: crate::etcd_store::LogEntry,
        revision: i64,
    ) -> Result<(), StoreError> {
        let Some(store) = self.store.etcd() else {
            return Ok(());
        };
        let _writer = lock(&self.writer);
        self.adopt_entry(store, version, entry, revision)
    }

    /// Reads the registry whole from etcd and makes it current if it is newer (the
    /// follower, after its watch's revision was compacted away).
    pub(crate) fn reload(&self) -> Result<i64, StoreError> {
        let Some(store) = self.store.etcd() else {
            return Ok(0);
        };
        let _writer = lock(&self.writer);
        self.reload_locked(store)
    }

    /// [`Gateway::reload`] with the writer lock held: the etcd revision it read at.
    fn reload_locked(&self, store: &crate::etcd_store::EtcdStore) -> Result<i64, StoreError> {
        let (state, revision) = store.load()?;
        let old = self.current();
        if let Some(s) = state.filter(|s| s.version > old.version()) {
            let next = store.registry(old.net(), s)?;
            let touched = crate::watch::touched(&old, &next);
            info!(
                version = next.version(),
                keys = touched.len(),
                "registry read whole from etcd"
            );
            self.metrics.count_store("remote");
            self.publish(next, touched);
        }
        Ok(revision)
    }

    fn host_status(&self, info: HostInfo) -> HostStatus {
        let rt = self
            .runtime_view()
            .get(&info.name)
            .copied()
            .unwrap_or_default();
        HostStatus {
            info,
            applied_version: rt.applied_version,
            last_seen_unix_ms: rt.last_seen_unix_ms,
            connected: rt.open_watches > 0,
        }
    }

    /// What this gateway knows of each host's agent: its own watches and heartbeats merged
    /// with what other gateways on the same etcd report (the newest of each fact; an agent
    /// connected anywhere is connected).
    pub(crate) fn runtime_view(&self) -> HashMap<String, HostRuntime> {
        let mut all = lock(&self.runtime).clone();
        for ((host, _), r) in lock(&self.remote_runtime).iter() {
            let e = all.entry(host.clone()).or_default();
            *e = e.merge(r);
        }
        all
    }

    fn touch(&self, host: &str) {
        lock(&self.runtime)
            .entry(host.to_string())
            .or_default()
            .last_seen_unix_ms = ferry_api::unix_ms();
    }

    /// The current snapshot as JSON, serialised once per version (on a blocking thread: with
    /// 65,536 endpoints it is megabytes, and many watches wake at once). With `delta_from`
    /// (the watch asked for a delta from that version): a [`ferry_api::WatchUpdate`], the
    /// delta when the change log still covers that version (never from 0), else the whole
    /// snapshot.
    /// The delta from `from` to the current version if it is already serialised (every
    /// watcher at `from` after the first): a lock and a reference count, answered on the
    /// runtime's worker rather than a blocking thread (a thousand watchers woken by one
    /// change would otherwise each take a trip through the blocking pool).
    fn cached_delta(&self, from: u64) -> Option<Bytes> {
        let version = self.current().version();
        delta_hit(
            &lock(&self.delta_cache),
            from,
            version,
            ferry_api::unix_ms(),
        )
    }

    fn watch_answer(&self, kind: &'static str, b: Bytes) -> Response {
        self.metrics.count_watch(kind, b.len());
        (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            b,
        )
            .into_response()
    }

    async fn snapshot_response(self: &Arc<Self>, delta_from: Option<u64>) -> Response {
        if let Some(b) = delta_from.and_then(|f| self.cached_delta(f)) {
            return self.watch_answer("delta", b);
        }
        let g = self.clone();
        let bytes = tokio::task::spawn_blocking(move || {
            let reg = g.current();
            let now = ferry_api::unix_ms();
            let valid_until = reg.next_expiry_after(now).unwrap_or(u64::MAX);
            if let Some(from) = delta_from.filter(|f| *f > 0) {
                let mut cache = lock(&g.delta_cache);
                if let Some(b) = delta_hit(&cache, from, reg.version(), now) {
                    return Ok(("delta", b));
                }
                // Nothing new (the long poll timed out): an empty delta, not the registry.
                let touched = if from == reg.version() {
                    Some(crate::watch::Touched::default())
                } else {
                    lock(&g.changelog).since(from, reg.version())
                };
                if let Some(t) = touched {
                    let d = ferry_api::WatchUpdate::Delta(crate::watch::delta(&reg, from, &t, now));
                    let b = Bytes::from(serde_json::to_vec(&d)?);
                    *cache = Some((from, (reg.version(), valid_until, b.clone())));
                    return Ok(("delta", b));
                }
            }
            let mut cache = lock(&g.snapshot_cache);
            let b = match &*cache {
                Some((v, until, b)) if *v == reg.version() && now < *until => b.clone(),
                _ => {
                    let b = Bytes::from(serde_json::to_vec(&reg.snapshot(now))?);
                    *cache = Some((reg.version(), valid_until, b.clone()));
                    b
                }
            };
            if delta_from.is_some() {
                // {"snapshot": …} around the cached bytes, without serialising them again.
                let mut wrapped = Vec::with_capacity(b.len() + 14);
                wrapped.extend_from_slice(b"{\"snapshot\":");
                wrapped.extend_from_slice(&b);
                wrapped.push(b'}');
                return Ok(("snapshot", Bytes::from(wrapped)));
            }
            Ok::<_, serde_json::Error>(("snapshot", b))
        })
        .await;
        match bytes {
            Ok(Ok((kind, b))) => self.watch_answer(kind, b),
            Ok(Err(e)) => ApiFailure::new(
                ErrorCode::Internal,
                format!("serialising the snapshot: {e}"),
            )
            .into_response(),
            Err(e) => ApiFailure::new(ErrorCode::Internal, format!("snapshot task failed: {e}"))
                .into_response(),
        }
    }

    fn metrics_text(&self) -> String {
        let reg = self.current();
        let version = reg.version();
        let (in_sync, connected) = {
            let rt = self.runtime_view();
            let get = |n: &str| rt.get(n).copied().unwrap_or_default();
            (
                reg.hosts()
                    .filter(|h| get(&h.name).applied_version == version)
                    .count(),
                reg.hosts()
                    .filter(|h| get(&h.name).open_watches > 0)
                    .count(),
            )
        };
        self.metrics.count_connections(&self.connections);
        self.metrics.set_cut_off(self.cut_off());
        self.metrics.render(&RegistryGauges {
            hosts: reg.host_count(),
            endpoints: reg.endpoint_count(),
            public_mappings: reg.public_count(),
            version,
            hosts_in_sync: in_sync,
            hosts_connected: connected,
            migrations: reg.migration_counts(ferry_api::unix_ms()),
        })
    }
}

/// Counts an open watch of a host; on drop (answered, or the client went away) it is closed.
struct WatchGuard<'a> {
    gateway: &'a Gateway,
    host: String,
}

impl<'a> WatchGuard<'a> {
    fn open(gateway: &'a Gateway, host: &str, applied: u64) -> Self {
        {
            let mut rt = lock(&gateway.runtime);
            let e = rt.entry(host.to_string()).or_default();
            e.applied_version = applied;
            e.last_seen_unix_ms = ferry_api::unix_ms();
            e.last_watch_unix_ms = e.last_seen_unix_ms;
            e.open_watches += 1;
        }
        gateway.applied_tx.send_modify(|n| *n = n.wrapping_add(1));
        Self {
            gateway,
            host: host.to_string(),
        }
    }
}

impl Drop for WatchGuard<'_> {
    fn drop(&mut self) {
        if let Some(e) = lock(&self.gateway.runtime).get_mut(&self.host) {
            e.open_watches = e.open_watches.saturating_sub(1);
            e.last_seen_unix_ms = ferry_api::unix_ms();
            e.last_watch_unix_ms = e.last_seen_unix_ms;
        }
    }
}

pub(crate) fn role(r: HostRole) -> &'static str {
    match r {
        HostRole::Host => "host",
        HostRole::Gateway => "gateway",
    }
}

fn target(p: &PublicSpec) -> String {
    match p.container_port {
        Some(port) => format!("{}:{port}", p.container),
        None => p.container.to_string(),
    }
}

fn log_change(change: &Change, version: u64) {
    match change {
        Change::HostAdded(h) => info!(
            host = %h.name, vtep = %h.vtep, overlay_ip = %h.overlay_ip, role = role(h.role), version,
            "host registered"
        ),
        Change::HostUpdated { old, new } => info!(
            host = %new.name, vtep = %new.vtep, overlay_ip = %new.overlay_ip, role = role(new.role),
            old_vtep = %old.vtep, old_overlay_ip = %old.overlay_ip, old_role = role(old.role), version,
            "host updated"
        ),
        Change::HostUnchanged(h) => {
            debug!(host = %h.name, version, "host re-registered unchanged")
        }
        Change::HostRemoved {
            host,
            ended_migrations,
        } => {
            info!(host = %host.name, version, "host removed");
            coordinator::log_ended(ended_migrations, version);
        }
        Change::EndpointsAdded(eps) => {
            for e in eps.iter().take(16) {
                info!(endpoint = %e.ip, host = %e.host, mac = %e.mac, version, "endpoint added");
            }
            if eps.len() > 16 {
                info!(
                    count = eps.len(),
                    version, "endpoints added (first 16 logged)"
                );
            }
        }
        Change::EndpointRemoved {
            endpoint,
            kept_public,
            ended_migrations,
        } => {
            let kept: Vec<String> = kept_public.iter().map(|p| p.key()).collect();
            info!(
                endpoint = %endpoint.ip, host = %endpoint.host, version,
                kept_public = ?kept,
                "endpoint removed; its public mappings are kept (re-add the endpoint to move it)"
            );
            coordinator::log_ended(ended_migrations, version);
        }
        Change::PublicAdded(p) => info!(
            public = %p.key(), container = %target(p), version, "public mapping added"
        ),
        Change::PublicRemoved(p) => {
            info!(public = %p.key(), container = %target(p), version, "public mapping removed")
        }
        Change::Allocated(a) => match (&a.lease, &a.migration) {
            (Some(l), _) if a.changed => info!(
                ip = %a.ip, host = %l.host, container = %l.container_id, ifname = %l.ifname,
                version, "address allocated"
            ),
            (_, Some(m)) => info!(
                ip = %a.ip, migration = %m, version,
                "address asked for by the destination of its migration"
            ),
            _ => debug!(ip = %a.ip, version, "address allocation repeated"),
        },
        Change::Released(r) => {
            if r.lease.is_none() && r.endpoint.is_none() {
                debug!(ip = %r.ip, version, "release: nothing held");
            } else {
                info!(
                    ip = %r.ip,
                    container = r.lease.as_ref().map(|l| l.container_id.as_str()),
                    endpoint_host = r.endpoint.as_ref().map(|e| e.host.as_str()),
                    version,
                    "address released"
                );
            }
            coordinator::log_ended(&r.ended_migrations, version);
        }
        Change::MigrationPrepared { .. }
        | Change::MigrationStepped { .. }
        | Change::MigrationUnchanged(_)
        | Change::MigrationsExpired(_) => coordinator::log_change(change, version),
    }
}

// ---------------------------------------------------------------------------------------------
// Handlers

pub(crate) type Shared = State<Arc<Gateway>>;

async fn health() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        api: API_VERSION.into(),
        version: env!("CARGO_PKG_VERSION").into(),
    })
}

async fn metrics(State(g): Shared) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        )],
        g.metrics_text(),
    )
}

async fn version(State(g): Shared) -> Json<RegistryVersion> {
    Json(RegistryVersion {
        version: g.current().version(),
    })
}

pub(crate) fn created<T: Serialize>(yes: bool, body: T) -> Response {
    let status = if yes {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    (status, Json(body)).into_response()
}

async fn register_host(
    State(g): Shared,
    caller: Option<axum::Extension<ferry_api::serve::Caller>>,
    ApiJson(info): ApiJson<HostInfo>,
) -> Result<Response, ApiFailure> {
    // A host registers itself only (the route is open to hosts: see `auth::permit`).
    body_permit(&caller, "register host", [info.name.as_str()])?;
    let (change, _) = g.change(Request::RegisterHost(info)).await?;
    let (info, new) = match change {
        Change::HostAdded(h) => (h, true),
        Change::HostUpdated { new, .. } => (new, false),
        Change::HostUnchanged(h) => (h, false),
        other => unreachable!("register answered {other:?}"),
    };
    g.touch(&info.name);
    Ok(created(new, g.host_status(info)))
}

/// `POST /v1/hosts/{name}/heartbeat`: the agent is alive (every 250 ms, also while it applies
/// a snapshot and holds no watch open): what fast failure detection reads.
async fn heartbeat(
    State(g): Shared,
    PathParam(name): PathParam,
) -> Result<Json<HostStatus>, ApiFailure> {
    host_name_param("host name in the path", &name)?;
    // An agent that follows a gateway cut off from etcd would miss what the others change:
    // the refusal sends it to another gateway (it moves on a `cut_off` heartbeat).
    if let Some(f) = g.refuse_if_cut_off("follow another gateway") {
        g.metrics.count_store("sent_away");
        return Err(f);
    }
    let info = g.current().host(&name).cloned().ok_or_else(|| {
        ApiFailure::new(
            ErrorCode::UnknownHost,
            format!("host {name:?} is not registered"),
        )
    })?;
    g.touch(&name);
    Ok(Json(g.host_status(info)))
}

async fn list_hosts(State(g): Shared) -> Json<Vec<HostStatus>> {
    let reg = g.current();
    Json(reg.hosts().map(|h| g.host_status(h.clone())).collect())
}

async fn remove_host(
    State(g): Shared,
    PathParam(name): PathParam,
) -> Result<Json<HostStatus>, ApiFailure> {
    host_name_param("host name in the path", &name)?;
    let (change, _) = g.change(Request::RemoveHost(name)).await?;
    let Change::HostRemoved { host: h, .. } = change else {
        unreachable!("remove host answered {change:?}")
    };
    let status = g.host_status(h);
    lock(&g.runtime).remove(&status.info.name);
    Ok(Json(status))
}

/// The caller's TLS identity, if the request came over TLS.
pub(crate) type CallerExt = Option<axum::Extension<ferry_api::serve::Caller>>;

/// [`auth::permit_body`] as a 403.
fn body_permit<'a>(
    caller: &CallerExt,
    what: &str,
    named: impl IntoIterator<Item = &'a str>,
) -> Result<(), ApiFailure> {
    let identity = caller.as_ref().and_then(|c| c.0.identity.as_ref());
    auth::permit_body(identity, what, named).map_err(|why| {
        warn!(caller = ?identity, reason = %why, "forbidden request");
        ApiFailure::new(ErrorCode::Forbidden, why)
    })
}

async fn add_endpoints(
    State(g): Shared,
    caller: CallerExt,
    ApiJson(req): ApiJson<EndpointsRequest>,
) -> Result<Response, ApiFailure> {
    body_permit(
        &caller,
        "register an endpoint on host",
        req.endpoints.iter().map(|e| e.host.as_str()),
    )?;
    let (change, _) = g.change(Request::AddEndpoints(req.endpoints)).await?;
    let Change::EndpointsAdded(added) = change else {
        unreachable!("add endpoints answered {change:?}")
    };
    Ok(created(true, added))
}

async fn list_endpoints(State(g): Shared) -> Response {
    let reg = g.current();
    Json(reg.endpoints().collect::<Vec<_>>()).into_response()
}

async fn remove_endpoint(
    State(g): Shared,
    PathParam(ip): PathParam,
) -> Result<Response, ApiFailure> {
    let ip = ip.parse().map_err(|_| {
        ApiFailure::bad_request(format!(
            "endpoint {ip:?} in the path is not an IPv4 address"
        ))
    })?;
    let (change, _) = g.change(Request::RemoveEndpoint(ip)).await?;
    let Change::EndpointRemoved { endpoint, .. } = change else {
        unreachable!("remove endpoint answered {change:?}")
    };
    Ok(Json(endpoint).into_response())
}

/// `POST /v1/ipam/allocate`.
async fn ipam_allocate(
    State(g): Shared,
    caller: CallerExt,
    ApiJson(req): ApiJson<IpamAllocateRequest>,
) -> Result<Response, ApiFailure> {
    body_permit(&caller, "allocate an address on host", [req.host.as_str()])?;
    let (change, _) = g.change(Request::Allocate(req)).await?;
    let Change::Allocated(a) = change else {
        unreachable!("allocate answered {change:?}")
    };
    Ok(created(a.changed, a))
}

/// `POST /v1/ipam/release`.
async fn ipam_release(
    State(g): Shared,
    caller: CallerExt,
    ApiJson(req): ApiJson<IpamReleaseRequest>,
) -> Result<Json<IpamRelease>, ApiFailure> {
    body_permit(&caller, "release an address on host", [req.host.as_str()])?;
    let (change, version) = g.change(Request::Release(req)).await?;
    let Change::Released(r) = change else {
        unreachable!("release answered {change:?}")
    };
    let changed = r.lease.is_some() || r.endpoint.is_some();
    Ok(Json(IpamRelease {
        ip: r.ip,
        lease: r.lease,
        endpoint: r.endpoint,
        changed,
        version,
    }))
}

/// `POST /v1/public/takeover`: a host may ask only for itself (its agent saw the host facing
/// the internet fall silent).
async fn public_takeover(
    State(g): Shared,
    caller: CallerExt,
    ApiJson(req): ApiJson<ferry_api::PublicTakeoverRequest>,
) -> Result<Json<ferry_api::PublicTakeover>, ApiFailure> {
    body_permit(
        &caller,
        "take the internet side over as host",
        [req.host.as_str()],
    )?;
    let (change, version) = g
        .change(Request::TakeOverPublic {
            host: req.host,
            from: req.from,
        })
        .await?;
    let host = match change {
        Change::HostUpdated { new, .. } | Change::HostUnchanged(new) => new,
        other => unreachable!("a takeover answered {other:?}"),
    };
    tracing::info!(host = %host.name, version, "the internet side is this host's now");
    Ok(Json(ferry_api::PublicTakeover { host, version }))
}

async fn ipam_status(State(g): Shared) -> Json<IpamStatus> {
    Json(g.current().ipam_status())
}

async fn add_public(
    State(g): Shared,
    ApiJson(spec): ApiJson<PublicSpec>,
) -> Result<Response, ApiFailure> {
    let (change, _) = g.change(Request::AddPublic(spec)).await?;
    let Change::PublicAdded(p) = change else {
        unreachable!("add public answered {change:?}")
    };
    Ok(created(true, p))
}

async fn list_public(State(g): Shared) -> Response {
    let reg = g.current();
    Json(reg.public().collect::<Vec<_>>()).into_response()
}

async fn remove_public(
    State(g): Shared,
    PathParam(key): PathParam,
) -> Result<Response, ApiFailure> {
    let key: PublicKey = key
        .parse()
        .map_err(|e: ferry_api::validate::PublicKeyError| {
            ApiFailure::bad_request(format!("public key in the path: {e}"))
        })?;
    let (change, _) = g.change(Request::RemovePublic(key)).await?;
    let Change::PublicRemoved(p) = change else {
        unreachable!("remove public answered {change:?}")
    };
    Ok(Json(p).into_response())
}

async fn watch_snapshot(
    State(g): Shared,
    ApiQuery(q): ApiQuery<WatchQuery>,
) -> Result<Response, ApiFailure> {
    host_name_param("host", &q.host)?;
    // Subscribe before reading the version: a change in between is not missed.
    let mut versions = g.version_tx.subscribe();
    let mut shutdown = g.shutdown_tx.subscribe();
    let reg = g.current();
    if reg.host(&q.host).is_none() {
        return Err(ApiFailure::new(
            ErrorCode::UnknownHost,
            format!("host {:?} is not registered", q.host),
        ));
    }
    let mut current = reg.version();
    drop(reg);
    // Gateways on etcd: an agent ahead of this gateway moved here from one that is not behind
    // (this one missed changes: it was cut off, or its watch of the log lags). Caught up
    // first; never sent an older registry than the one it applied.
    if q.after > current && g.store.etcd().is_some() {
        let g2 = g.clone();
        let caught = tokio::task::spawn_blocking(move || g2.catch_up_now()).await;
        current = g.current().version();
        if q.after > current {
            let why = match caught {
                Ok(Err(e)) => format!(": {e}"),
                _ => String::new(),
            };
            return Err(ApiFailure::new(
                ErrorCode::StoreUnavailable,
                format!(
                    "this gateway is at version {current}, behind host {}'s {} (catching up \
                     from etcd{why}): ask again, or another gateway",
                    q.host, q.after
                ),
            ));
        }
    }
    let applied = if q.after > current {
        warn!(
            host = %q.host, after = q.after, version = current,
            "agent reports a version newer than the registry's (state reset?): sending the current snapshot"
        );
        0
    } else {
        q.after
    };
    let _open = WatchGuard::open(&g, &q.host, applied);
    if current == q.after && !*shutdown.borrow() {
        debug!(host = %q.host, after = q.after, "watch waiting");
        tokio::select! {
            _ = versions.wait_for(|v| *v != q.after) => {}
            _ = tokio::time::sleep(g.watch_timeout) => {}
            _ = shutdown.wait_for(|s| *s) => {}
        }
    }
    // A delta needs a version the agent holds (0: none; newer than ours: a reset registry,
    // `applied` is 0 then): otherwise the whole snapshot, in a `WatchUpdate` all the same.
    let delta_from = q.delta.then_some(applied);
    Ok(g.snapshot_response(delta_from).await)
}

async fn not_found(method: Method, uri: Uri) -> ApiFailure {
    ApiFailure::new(
        ErrorCode::NotFound,
        format!("no route {method} {}", uri.path()),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiFailure {
    ApiFailure::bad_request(format!("method {method} is not allowed on {}", uri.path()))
        .with_status(StatusCode::METHOD_NOT_ALLOWED)
}

/// The protected routes' gate: the bearer token, then (over TLS) whether the caller's
/// identity may make this request ([`auth::permit`]).
async fn require_token(
    State(g): Shared,
    params: axum::extract::RawPathParams,
    req: HttpRequest,
    next: Next,
) -> Response {
    let header = req
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes());
    if let Err(why) = auth::check_bearer(header, &g.token) {
        warn!(method = %req.method(), path = %req.uri().path(), reason = why, "unauthorized request");
        return ApiFailure::new(ErrorCode::Unauthorized, why).into_response();
    }
    let caller = req.extensions().get::<ferry_api::serve::Caller>();
    if let Some(ferry_api::serve::Caller {
        addr,
        identity: Some(identity),
    }) = caller
    {
        let route = req
            .extensions()
            .get::<MatchedPath>()
            .map_or("", |p| p.as_str());
        let watch_host = (route == "/v1/watch")
            .then(|| Query::<WatchQuery>::try_from_uri(req.uri()).ok())
            .flatten()
            .map(|q| q.0.host);
        let ask = auth::Ask {
            method: req.method().as_str(),
            route,
            param: params.iter().next().map(|(_, v)| v),
            watch_host: watch_host.as_deref(),
        };
        let registry = g.current();
        if let Err(why) = auth::permit(identity, ask, &*registry) {
            warn!(caller = %identity, peer = %addr, method = %req.method(), %route, reason = %why, "forbidden request");
            return ApiFailure::new(ErrorCode::Forbidden, why).into_response();
        }
    }
    next.run(req).await
}

async fn count_requests(State(g): Shared, req: HttpRequest, next: Next) -> Response {
    let route = match req.extensions().get::<MatchedPath>() {
        Some(p) => format!("{} {}", req.method(), p.as_str()),
        None => "unmatched".to_string(),
    };
    let mut resp = next.run(req).await;
    let status = resp.status().as_u16();
    debug!(%route, status, "answered");
    g.metrics.count_request(route, status);
    // Cut off from etcd's quorum: every answer says since when (clients with other gateways
    // read from those first).
    if let Some(d) = g.cut_off() {
        resp.headers_mut().insert(
            ferry_api::client::CUT_OFF_HEADER,
            HeaderValue::from(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
        );
    }
    resp
}

/// The API.
pub fn router(g: Arc<Gateway>) -> Router {
    let protected = Router::new()
        .route("/v1/version", get(version))
        .route("/v1/hosts", get(list_hosts).post(register_host))
        .route("/v1/hosts/{name}", delete(remove_host))
        .route("/v1/hosts/{name}/heartbeat", axum::routing::post(heartbeat))
        .route("/v1/endpoints", get(list_endpoints).post(add_endpoints))
        .route("/v1/endpoints/{ip}", delete(remove_endpoint))
        .route("/v1/ipam", get(ipam_status))
        .route("/v1/ipam/allocate", axum::routing::post(ipam_allocate))
        .route("/v1/ipam/release", axum::routing::post(ipam_release))
        .route("/v1/public/takeover", axum::routing::post(public_takeover))
        .route("/v1/public", get(list_public).post(add_public))
        .route("/v1/public/{*key}", delete(remove_public))
        .route("/v1/watch", get(watch_snapshot))
        .merge(coordinator::routes())
        .merge(crate::migration::runs::routes())
        .route_layer(middleware::from_fn_with_state(g.clone(), require_token));
    Router::new()
        .route("/v1/health", get(health))
        .route("/metrics", get(metrics))
        .merge(protected)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_REQUEST_BODY))
        .layer(middleware::from_fn_with_state(g.clone(), count_requests))
        .with_state(g)
}
