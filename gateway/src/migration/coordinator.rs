//! The migration coordinator: the `/v1/migrations` routes, the wait for the agents after each
//! step, the automatic rollback of a step they did not apply in time, the timer that ends
//! forwarding graces (its metrics are in [`crate::metrics`]). The rules (phases, idempotency, conflicts)
//! are the registry's ([`crate::migration::transitions`]); the state reaches the agents only through the
//! snapshot and its watch.
//!
//! Who a step waits for (each must report, through its watch, a version ≥ the step's):
//! - prepare: the source and the destination;
//! - freeze, release: the source, the destination, and every registered host whose agent is
//!   connected (holds a watch open, or held one within [`LIVE_WINDOW_MS`]: an agent has none
//!   open while it applies a snapshot);
//! - abort (asked for, or automatic after a prepare or freeze that timed out): every host whose
//!   agent reported a version carrying the migration (≥ the prepare's version: it may have
//!   acted on it), and for an abort asked for, also the source and the destination if their
//!   agents are connected. A host that never applied the migration has nothing to undo: the
//!   snapshot it gets next no longer holds the migration.
//!
//! A repeated step (no change) waits the same way for the version that put the migration in
//! its phase, so a success always means "applied"; one whose migration is finished answers at
//! once.

use std::{
    collections::BTreeSet,
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    Json, Router,
    extract::State,
    response::Response,
    routing::{get, post},
};
use ferry_api::{
    ErrorCode, HostLag, MAX_STEP_TIMEOUT_MS, Migration, MigrationFailure, MigrationPhase,
    MigrationRequest, MigrationStep, MigrationStepKind, MigrationsQuery, StepQuery,
};
use tracing::{debug, error, info, warn};

use crate::{
    registry::{Change, Registry, Request},
    server::{
        ApiFailure, ApiJson, ApiQuery, Gateway, HostRuntime, PathParam, Shared, created,
        migration_id_param,
    },
};

/// An agent without an open watch still counts as connected this long after its last watch
/// (it has none open while it applies a snapshot). Registering alone does not count.
pub const LIVE_WINDOW_MS: u64 = 10_000;
/// An agent that watched before and was not heard from (watch or heartbeat, sent every
/// 250 ms) for this long is taken for dead: a migration step that
/// needs it fails at once instead of at its timeout, and waits for a rollback skip it (it
/// converges from the snapshot when it comes back).
pub const DEAD_AFTER_MS: u64 = 1_500;

// ---------------------------------------------------------------------------------------------
// Logging

fn describe(m: &Migration) -> String {
    format!(
        "migration {} ({}, {} → {})",
        m.id, m.container, m.from, m.to
    )
}

pub(crate) fn log_change(change: &Change, version: u64) {
    match change {
        Change::MigrationPrepared {
            migration: m,
            ended,
        } => {
            if let Some(e) = ended {
                info!(
                    migration = %e.id, container = %e.container, version,
                    "released migration's forwarding grace ended early: a new migration of its container starts"
                );
            }
            info!(
                migration = %m.id, container = %m.container, from = %m.from, to = %m.to, version,
                "migration prepared"
            );
        }
        Change::MigrationStepped { old, migration: m } => info!(
            migration = %m.id, container = %m.container, from = %m.from, to = %m.to,
            old_phase = %old, phase = %m.phase, forward_until_unix_ms = m.forward_until_unix_ms,
            version, "migration step"
        ),
        Change::MigrationUnchanged(m) => debug!(
            migration = %m.id, phase = %m.phase, version, "migration step repeated: unchanged"
        ),
        Change::MigrationsExpired(list) => {
            for m in list {
                info!(
                    migration = %m.id, container = %m.container, from = %m.from, to = %m.to,
                    version, "forwarding grace over: migration finished"
                );
            }
        }
        _ => {}
    }
}

pub(crate) fn log_ended(ended: &[Migration], version: u64) {
    for m in ended {
        info!(
            migration = %m.id, container = %m.container, from = %m.from, to = %m.to, version,
            "released migration's forwarding grace ended early (its endpoint or host was removed)"
        );
    }
}

fn lag_list(lagging: &[HostLag]) -> String {
    lagging
        .iter()
        .map(|l| {
            format!(
                "{} (applied {} of {}, {})",
                l.host,
                l.applied_version,
                l.wanted_version,
                if l.connected {
                    "connected"
                } else {
                    "not connected"
                }
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

// ---------------------------------------------------------------------------------------------
// Waiting for agents

/// How a wait for agents ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Wait {
    Applied,
    /// Deadline passed (or the gateway began shutting down) with these hosts behind.
    Lagging {
        lagging: Vec<HostLag>,
        shutting_down: bool,
    },
}

/// See [`DEAD_AFTER_MS`].
///
/// An open watch does not count: a watch whose agent was cut off stays "open" here until
/// its long poll ends, since nothing tells the gateway the connection is gone.
pub(crate) fn is_dead(rt: Option<&HostRuntime>, now: u64) -> bool {
    rt.is_some_and(|r| {
        r.last_watch_unix_ms != 0
            && now.saturating_sub(r.last_seen_unix_ms.max(r.last_watch_unix_ms)) > DEAD_AFTER_MS
    })
}

fn is_live(rt: Option<&HostRuntime>, now: u64) -> bool {
    rt.is_some_and(|r| {
        r.open_watches > 0
            || (r.last_watch_unix_ms != 0
                && now.saturating_sub(r.last_watch_unix_ms) <= LIVE_WINDOW_MS)
    })
}

impl Gateway {
    /// The hosts among `hosts` (still registered) whose agents have not reported `target`.
    fn lagging(&self, hosts: &[String], target: u64) -> Vec<HostLag> {
        let reg = self.current();
        let rt = self.runtime_view();
        hosts
            .iter()
            .filter(|h| reg.host(h).is_some())
            .filter_map(|h| {
                let r = rt.get(h.as_str()).copied().unwrap_or_default();
                (r.applied_version < target).then(|| HostLag {
                    host: h.clone(),
                    applied_version: r.applied_version,
                    wanted_version: target,
                    connected: r.open_watches > 0,
                })
            })
            .collect()
    }

    /// Is `host`'s agent taken for dead ([`DEAD_AFTER_MS`])?
    pub(crate) fn host_dead(&self, host: &str) -> bool {
        is_dead(self.runtime_view().get(host), ferry_api::unix_ms())
    }

    /// The version `host`'s agent last reported as applied.
    pub(crate) fn host_applied(&self, host: &str) -> u64 {
        self.runtime_view()
            .get(host)
            .map_or(0, |r| r.applied_version)
    }

    /// Waits until every host of `hosts` reported `target` (or later) as applied, the
    /// deadline, or the start of a shutdown. A dead agent ([`DEAD_AFTER_MS`]) among
    /// `critical` ends the wait at once (lagging); one that is not critical is not waited
    /// for (it converges from the snapshot when it comes back).
    pub(crate) async fn wait_applied(
        &self,
        hosts: &[String],
        target: u64,
        deadline: Instant,
        critical: &[String],
    ) -> Wait {
        let mut ticks = self.applied_tx.subscribe();
        let mut shutdown = self.shutdown_tx.subscribe();
        let deadline = tokio::time::Instant::from_std(deadline);
        loop {
            ticks.borrow_and_update();
            let lagging = self.lagging(hosts, target);
            let (dead, alive): (Vec<HostLag>, Vec<HostLag>) =
                lagging.into_iter().partition(|l| self.host_dead(&l.host));
            if alive.is_empty() && !dead.iter().any(|l| critical.contains(&l.host)) {
                if !dead.is_empty() {
                    warn!(dead = %lag_list(&dead), "not waiting for dead agents: they converge when they come back");
                }
                return Wait::Applied;
            }
            let shutting_down = *shutdown.borrow();
            let critical_dead = dead.iter().any(|l| critical.contains(&l.host));
            if shutting_down || critical_dead || tokio::time::Instant::now() >= deadline {
                let mut lagging = alive;
                lagging.extend(dead);
                return Wait::Lagging {
                    lagging,
                    shutting_down,
                };
            }
            // Liveness changes without an applied tick: look again every 100 ms.
            tokio::select! {
                _ = ticks.changed() => {}
                _ = tokio::time::sleep_until(deadline) => {}
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                _ = shutdown.wait_for(|s| *s) => {}
            }
        }
    }

    /// freeze/release (`all`) or prepare: who applies the migration's phase. The first half
    /// of a freeze changes the destination alone (it holds).
    fn step_hosts(&self, reg: &Registry, m: &Migration, all: bool) -> Vec<String> {
        if m.phase == MigrationPhase::Frozen && m.switch_pending {
            return vec![m.to.clone()];
        }
        let mut set = BTreeSet::from([m.from.clone(), m.to.clone()]);
        if all {
            let now = ferry_api::unix_ms();
            let rt = self.runtime_view();
            set.extend(
                reg.hosts()
                    .filter(|h| is_live(rt.get(&h.name), now))
                    .map(|h| h.name.clone()),
            );
        }
        set.into_iter().collect()
    }

    /// Who must apply an abort: hosts that reported a version ≥ `prepared_version`, and (for an
    /// abort asked for) the source and destination if their agents are connected.
    fn rollback_hosts(
        &self,
        reg: &Registry,
        m: &Migration,
        prepared_version: u64,
        live_ends: bool,
    ) -> Vec<String> {
        let now = ferry_api::unix_ms();
        let rt = self.runtime_view();
        let mut set: BTreeSet<String> = reg
            .hosts()
            .filter(|h| {
                rt.get(&h.name)
                    .is_some_and(|r| r.applied_version >= prepared_version)
            })
            .map(|h| h.name.clone())
            .collect();
        if live_ends {
            for h in [&m.from, &m.to] {
                if reg.host(h).is_some() && is_live(rt.get(h.as_str()), now) {
                    set.insert(h.clone());
                }
            }
        }
        set.into_iter().collect()
    }

    fn count_step(&self, step: MigrationStepKind, result: &'static str) {
        self.metrics.count_step(step, result);
    }
}

// ---------------------------------------------------------------------------------------------
// Routes

pub(crate) fn routes() -> Router<Arc<Gateway>> {
    Router::new()
        .route("/v1/migrations", get(list).post(prepare))
        .route("/v1/migrations/{id}", get(one))
        .route("/v1/migrations/{id}/freeze", post(freeze))
        .route("/v1/migrations/{id}/release", post(release))
        .route("/v1/migrations/{id}/abort", post(abort))
}

fn step_timeout(g: &Gateway, q: &StepQuery) -> Result<Duration, ApiFailure> {
    match q.timeout_ms {
        None => Ok(g.step_timeout),
        Some(t) if (1..=MAX_STEP_TIMEOUT_MS).contains(&t) => Ok(Duration::from_millis(t)),
        Some(t) => Err(ApiFailure::bad_request(format!(
            "timeout_ms {t} is out of range: want 1–{MAX_STEP_TIMEOUT_MS}"
        ))),
    }
}

async fn list(State(g): Shared, ApiQuery(q): ApiQuery<MigrationsQuery>) -> Json<Vec<Migration>> {
    let reg = g.current();
    Json(
        reg.all_migrations()
            .into_iter()
            .filter(|m| q.container.is_none_or(|c| m.container == c))
            .filter(|m| !q.active || m.phase.is_active())
            .cloned()
            .collect(),
    )
}

async fn one(State(g): Shared, PathParam(id): PathParam) -> Result<Json<Migration>, ApiFailure> {
    migration_id_param(&id)?;
    g.current()
        .migration(&id)
        .cloned()
        .map(Json)
        .ok_or_else(|| {
            ApiFailure::new(
                ErrorCode::UnknownMigration,
                format!("no migration has id {id:?}"),
            )
        })
}

async fn prepare(
    State(g): Shared,
    ApiQuery(q): ApiQuery<StepQuery>,
    ApiJson(req): ApiJson<MigrationRequest>,
) -> Result<Response, ApiFailure> {
    let step = MigrationStepKind::Prepare;
    let timeout = step_timeout(&g, &q).inspect_err(|_| g.count_step(step, "refused"))?;
    let r = g
        .change(Request::PrepareMigration {
            container: req.container,
            to: req.to,
            now_ms: ferry_api::unix_ms(),
            run: req.run,
        })
        .await;
    settle(&g, step, r, None, timeout).await
}

/// A freeze is two registry versions: the destination holds (`switch_pending`), and only once
/// it applied that does every other host point at it and the source forward to it — so no
/// packet reaches the destination before it holds, and its own containers are not cut off
/// from the migrating one during the prepared phase.
async fn freeze(
    State(g): Shared,
    PathParam(id): PathParam,
    ApiQuery(q): ApiQuery<StepQuery>,
) -> Result<Response, ApiFailure> {
    let step = MigrationStepKind::Freeze;
    migration_id_param(&id).inspect_err(|_| g.count_step(step, "refused"))?;
    let timeout = step_timeout(&g, &q).inspect_err(|_| g.count_step(step, "refused"))?;
    let prepared_version = g.current().live_migration(&id).map(|l| l.prepared_version);
    let half = g
        .change(Request::StepMigration {
            id: id.clone(),
            step,
            now_ms: ferry_api::unix_ms(),
            expect: None,
        })
        .await;
    let half_pending = matches!(&half, Ok((Change::MigrationStepped { migration, .. } | Change::MigrationUnchanged(migration), _)) if migration.switch_pending);
    let first = settle_counted(&g, step, half, prepared_version, timeout, !half_pending).await?;
    let pending = g
        .current()
        .live_migration(&id)
        .is_some_and(|l| l.migration.phase == MigrationPhase::Frozen && l.migration.switch_pending);
    if !pending {
        return Ok(first);
    }
    let r = g
        .change(Request::SwitchMigration {
            id,
            now_ms: ferry_api::unix_ms(),
        })
        .await;
    settle(&g, MigrationStepKind::Freeze, r, prepared_version, timeout).await
}

async fn release(
    State(g): Shared,
    PathParam(id): PathParam,
    ApiQuery(q): ApiQuery<StepQuery>,
) -> Result<Response, ApiFailure> {
    step(g, id, MigrationStepKind::Release, q).await
}

async fn abort(
    State(g): Shared,
    PathParam(id): PathParam,
    ApiQuery(q): ApiQuery<StepQuery>,
) -> Result<Response, ApiFailure> {
    step(g, id, MigrationStepKind::Abort, q).await
}

async fn step(
    g: Arc<Gateway>,
    id: String,
    step: MigrationStepKind,
    q: StepQuery,
) -> Result<Response, ApiFailure> {
    migration_id_param(&id).inspect_err(|_| g.count_step(step, "refused"))?;
    let timeout = step_timeout(&g, &q).inspect_err(|_| g.count_step(step, "refused"))?;
    let prepared_version = g.current().live_migration(&id).map(|l| l.prepared_version);
    let r = g
        .change(Request::StepMigration {
            id,
            step,
            now_ms: ferry_api::unix_ms(),
            expect: None,
        })
        .await;
    settle(&g, step, r, prepared_version, timeout).await
}

/// After a step was applied to the registry (or refused): waits for its agents and answers;
/// on a timeout, rolls back (prepare, freeze) or reports (release, abort).
async fn settle(
    g: &Arc<Gateway>,
    step: MigrationStepKind,
    result: Result<(Change, u64), ApiFailure>,
    prepared_version: Option<u64>,
    timeout: Duration,
) -> Result<Response, ApiFailure> {
    settle_counted(g, step, result, prepared_version, timeout, true).await
}

/// [`settle`]; `count_ok = false` for the first half of a freeze (the second counts it).
async fn settle_counted(
    g: &Arc<Gateway>,
    step: MigrationStepKind,
    result: Result<(Change, u64), ApiFailure>,
    prepared_version: Option<u64>,
    timeout: Duration,
    count_ok: bool,
) -> Result<Response, ApiFailure> {
    let persisted_at = Instant::now();
    let (change, version) = result.inspect_err(|e| {
        let r = if e.code == ErrorCode::Internal {
            "error"
        } else {
            "refused"
        };
        g.count_step(step, r);
    })?;
    let (migration, changed, created_new) = match change {
        Change::MigrationPrepared { migration, .. } => (migration, true, true),
        Change::MigrationStepped { migration, .. } => (migration, true, false),
        Change::MigrationUnchanged(m) => (m, false, false),
        other => unreachable!("a migration step answered {other:?}"),
    };
    let reg = g.current();
    let all = step != MigrationStepKind::Prepare;
    let plan = if changed {
        let hosts = if step == MigrationStepKind::Abort {
            g.rollback_hosts(&reg, &migration, prepared_version.unwrap_or(1), true)
        } else {
            g.step_hosts(&reg, &migration, all)
        };
        Some((hosts, version))
    } else {
        reg.live_migration(&migration.id)
            .map(|l| (g.step_hosts(&reg, &l.migration, all), l.phase_version))
    };
    let current_version = reg.version();
    drop(reg);
    let Some((hosts, target)) = plan else {
        // A repeated step of a finished migration: nothing to wait for.
        g.count_step(step, "unchanged");
        let answer = MigrationStep {
            migration,
            version: current_version,
            changed: false,
            hosts: vec![],
            applied_ms: 0,
        };
        return Ok(created(false, answer));
    };
    if changed {
        let point = match step {
            MigrationStepKind::Prepare => Some("prepare"),
            MigrationStepKind::Release => Some("released"),
            MigrationStepKind::Abort => Some("aborted"),
            MigrationStepKind::Freeze if migration.switch_pending => Some("frozen"),
            MigrationStepKind::Freeze => Some("switched"),
        };
        if let Some(p) = point {
            ferry_api::faultpoint::pause(p, &migration.id).await;
        }
    }
    // Whose death ends the wait at once: the ends for prepare and freeze (roll back now, the
    // source must not stay frozen), the destination for a release; an abort waits for the
    // live only.
    let critical: Vec<String> = match step {
        MigrationStepKind::Prepare | MigrationStepKind::Freeze => {
            vec![migration.from.clone(), migration.to.clone()]
        }
        MigrationStepKind::Release => vec![migration.to.clone()],
        MigrationStepKind::Abort => vec![],
    };
    match g
        .wait_applied(&hosts, target, persisted_at + timeout, &critical)
        .await
    {
        Wait::Applied => {
            let took = persisted_at.elapsed();
            if count_ok {
                g.metrics
                    .count_step(step, if changed { "ok" } else { "unchanged" });
                if changed {
                    g.metrics.observe_apply(step, took.as_secs_f64());
                }
            }
            info!(
                migration = %migration.id, %step, phase = %migration.phase, version = target,
                hosts = ?hosts, applied_ms = took.as_millis() as u64, changed,
                "migration step applied by its agents"
            );
            let answer = MigrationStep {
                migration,
                version: target,
                changed,
                hosts,
                applied_ms: took.as_millis() as u64,
            };
            Ok(created(created_new, answer))
        }
        Wait::Lagging {
            lagging,
            shutting_down,
        } => {
            let timeout_ms = timeout.as_millis();
            let what = format!(
                "{step} of {} is persisted (registry version {target})",
                describe(&migration)
            );
            let failure = |rollback_lagging: Vec<HostLag>| MigrationFailure {
                step,
                migration: migration.clone(),
                version: g.current().version(),
                lagging: lagging.clone(),
                rollback_lagging,
                waited_ms: persisted_at.elapsed().as_millis() as u64,
            };
            if shutting_down {
                g.count_step(step, "needs_attention");
                warn!(migration = %migration.id, %step, lagging = %lag_list(&lagging), "gateway shutting down during a migration step");
                return Err(ApiFailure::new(
                    ErrorCode::NeedsAttention,
                    format!(
                        "{what} but the gateway is shutting down before these agents applied it: \
                         {}; after the restart, repeat the step to confirm it, or abort",
                        lag_list(&lagging)
                    ),
                )
                .with_migration(failure(vec![])));
            }
            match step {
                MigrationStepKind::Prepare | MigrationStepKind::Freeze => {
                    auto_abort(g, step, &migration, lagging, timeout, persisted_at, target).await
                }
                MigrationStepKind::Release => {
                    g.count_step(step, "needs_attention");
                    error!(migration = %migration.id, lagging = %lag_list(&lagging), "release not applied in time");
                    Err(ApiFailure::new(
                        ErrorCode::NeedsAttention,
                        format!(
                            "{what}: the endpoint is on {} now, but these agents did not apply \
                             it within {timeout_ms} ms: {}. A release is not rolled back: check \
                             those agents (`ferry hosts`), then repeat the release to confirm it",
                            migration.to,
                            lag_list(&lagging)
                        ),
                    )
                    .with_migration(failure(vec![])))
                }
                MigrationStepKind::Abort => {
                    g.count_step(step, "needs_attention");
                    error!(migration = %migration.id, lagging = %lag_list(&lagging), "abort not applied in time");
                    Err(ApiFailure::new(
                        ErrorCode::NeedsAttention,
                        format!(
                            "{what}, but these agents did not apply it within {timeout_ms} ms: \
                             {}; the container stays on {}: check those agents (`ferry hosts`, \
                             `ferry sync`)",
                            lag_list(&lagging),
                            migration.from
                        ),
                    )
                    .with_migration(failure(vec![])))
                }
            }
        }
    }
}

/// A prepare or freeze that the agents did not apply in time: abort it (only if nobody moved it
/// meanwhile) and wait for the agents that may have acted on it to apply the abort.
async fn auto_abort(
    g: &Arc<Gateway>,
    step: MigrationStepKind,
    m: &Migration,
    lagging: Vec<HostLag>,
    timeout: Duration,
    persisted_at: Instant,
    step_version: u64,
) -> Result<Response, ApiFailure> {
    let prepared_version = g
        .current()
        .live_migration(&m.id)
        .map(|l| l.prepared_version);
    let dead: Vec<&str> = lagging
        .iter()
        .filter(|l| g.host_dead(&l.host))
        .map(|l| l.host.as_str())
        .collect();
    let why = if dead.is_empty() {
        format!(
            "{step} of {} (registry version {step_version}) was not applied within {} ms by {}",
            describe(m),
            timeout.as_millis(),
            lag_list(&lagging)
        )
    } else {
        format!(
            "{step} of {} (registry version {step_version}) was not applied by {}: {} not heard \
             from for {DEAD_AFTER_MS} ms (taken for dead after {} ms)",
            describe(m),
            lag_list(&lagging),
            dead.join(", "),
            persisted_at.elapsed().as_millis()
        )
    };
    warn!(migration = %m.id, %step, lagging = %lag_list(&lagging), "migration step not applied in time: aborting it");
    let failure = |migration: Migration, rollback_lagging: Vec<HostLag>| MigrationFailure {
        step,
        migration,
        version: g.current().version(),
        lagging: lagging.clone(),
        rollback_lagging,
        waited_ms: persisted_at.elapsed().as_millis() as u64,
    };
    let result = g
        .change(Request::StepMigration {
            id: m.id.clone(),
            step: MigrationStepKind::Abort,
            now_ms: ferry_api::unix_ms(),
            expect: Some(m.phase),
        })
        .await;
    let (aborted, abort_version) = match result {
        Ok((Change::MigrationStepped { migration, .. }, v)) => (migration, v),
        Ok((other, _)) => unreachable!("an abort answered {other:?}"),
        Err(e) => {
            let now = g.current().migration(&m.id).cloned();
            return match now {
                Some(cur) if cur.phase == MigrationPhase::Aborted => {
                    g.count_step(step, "rolled_back");
                    Err(ApiFailure::new(
                        ErrorCode::RolledBack,
                        format!("{why}; it was aborted meanwhile by another request"),
                    )
                    .with_migration(failure(cur, vec![])))
                }
                cur => {
                    g.count_step(step, "needs_attention");
                    error!(migration = %m.id, error = %e.message, "automatic abort failed");
                    Err(ApiFailure::new(
                        ErrorCode::NeedsAttention,
                        format!("{why}; the automatic abort failed: {}", e.message),
                    )
                    .with_migration(failure(cur.unwrap_or_else(|| m.clone()), vec![])))
                }
            };
        }
    };
    let reg = g.current();
    let hosts = g.rollback_hosts(&reg, &aborted, prepared_version.unwrap_or(1), false);
    drop(reg);
    match g
        .wait_applied(&hosts, abort_version, Instant::now() + timeout, &[])
        .await
    {
        Wait::Applied => {
            g.count_step(step, "rolled_back");
            let confirmed = if hosts.is_empty() {
                "no agent had applied the migration, so none had anything to undo".to_string()
            } else {
                format!("{} applied the abort", hosts.join(", "))
            };
            warn!(migration = %m.id, %step, version = abort_version, "migration rolled back");
            Err(ApiFailure::new(
                ErrorCode::RolledBack,
                format!(
                    "{why}: the gateway aborted the migration (registry version {abort_version}) \
                     and {confirmed}; the container stays on {}",
                    aborted.from
                ),
            )
            .with_migration(failure(aborted, vec![])))
        }
        Wait::Lagging {
            lagging: rollback_lagging,
            ..
        } => {
            g.count_step(step, "needs_attention");
            error!(migration = %m.id, lagging = %lag_list(&rollback_lagging), "automatic abort not applied in time");
            Err(ApiFailure::new(
                ErrorCode::NeedsAttention,
                format!(
                    "{why}: the gateway aborted the migration (registry version {abort_version}) \
                     but these agents did not apply the abort within {} ms: {}; check them \
                     (`ferry hosts`)",
                    timeout.as_millis(),
                    lag_list(&rollback_lagging)
                ),
            )
            .with_migration(failure(aborted, rollback_lagging)))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The forwarding-grace timer

/// Moves released migrations to the history when their grace ends (a new registry version, so
/// the agents drop their forwarding pointers), until the gateway shuts down.
pub(crate) async fn expire_released(g: Arc<Gateway>) {
    let mut versions = g.version_tx.subscribe();
    let mut shutdown = g.shutdown_tx.subscribe();
    loop {
        versions.borrow_and_update();
        if *shutdown.borrow() {
            return;
        }
        let next = g.current().next_expiry();
        let now = ferry_api::unix_ms();
        let wait = match next {
            Some(t) if t <= now => {
                match g.change(Request::ExpireMigrations { now_ms: now }).await {
                    Ok(_) => continue,
                    Err(e) => {
                        error!(error = %e.message, "ending forwarding graces failed; retrying in 1 s");
                        Duration::from_secs(1)
                    }
                }
            }
            Some(t) => Duration::from_millis(t - now),
            None => Duration::from_secs(3600),
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = versions.changed() => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveness() {
        let now = 100_000;
        assert!(!is_live(None, now));
        let mut r = HostRuntime {
            last_seen_unix_ms: now,
            ..Default::default()
        };
        assert!(!is_live(Some(&r), now), "registered, never watched");
        r.last_watch_unix_ms = now - LIVE_WINDOW_MS;
        assert!(is_live(Some(&r), now));
        r.last_watch_unix_ms = now - LIVE_WINDOW_MS - 1;
        assert!(!is_live(Some(&r), now));
        r.open_watches = 1;
        assert!(is_live(Some(&r), now));
    }

    #[test]
    fn death_is_silence_for_longer_than_dead_after() {
        let now = 100_000;
        assert!(!is_dead(None, now), "unknown");
        let mut r = HostRuntime {
            last_seen_unix_ms: now - DEAD_AFTER_MS - 1,
            ..Default::default()
        };
        assert!(
            !is_dead(Some(&r), now),
            "never watched: not an agent that died"
        );
        r.last_watch_unix_ms = now - DEAD_AFTER_MS - 1;
        assert!(is_dead(Some(&r), now));
        r.open_watches = 1;
        assert!(
            is_dead(Some(&r), now),
            "a watch left open by a cut-off agent does not keep it alive"
        );
        r.last_seen_unix_ms = now - DEAD_AFTER_MS;
        assert!(!is_dead(Some(&r), now), "a heartbeat in time");
    }

    #[test]
    fn lag_lists_read_well() {
        let l = vec![
            HostLag {
                host: "b1".into(),
                applied_version: 5,
                wanted_version: 6,
                connected: false,
            },
            HostLag {
                host: "gw".into(),
                applied_version: 6,
                wanted_version: 7,
                connected: true,
            },
        ];
        assert_eq!(
            lag_list(&l),
            "b1 (applied 5 of 6, not connected), gw (applied 6 of 7, connected)"
        );
    }
}
