//! The registry's migration transitions: prepare, freeze, release, abort and the end of a
//! released migration's forwarding grace, as pure functions of the registry (an `impl
//! Registry` block: no I/O, no clock; requests carry the time).
//!
//! Migrations (the coordinator's state): a migration is *live* while agents must act on it —
//! `prepared`, `frozen`, and `released` until its forwarding grace ends — and then joins the
//! history (the last [`MIGRATION_HISTORY`] finished ones); an abort sends it there at once.
//! Rules:
//! - prepare: the container is an endpoint, `to` a registered host other than the endpoint's
//!   host (any role: a migration may go wherever an endpoint may be added, the gateway host
//!   included); at most one active (`prepared`/`frozen`) migration per container. Preparing a
//!   new migration of a container whose previous one is `released` and still forwarding ends
//!   that grace early (it leaves the snapshot in the same change), so the snapshot holds at
//!   most one migration per container.
//! - steps go prepare → freeze → release; abort from `prepared` or `frozen`. Repeating the
//!   current step answers the migration unchanged (no new version); any other step out of
//!   order is refused with `bad_phase`.
//! - release moves the endpoint (`host` becomes `to`, same IP and MAC) in the same change.
//! - an endpoint or host with an active migration cannot be removed (`conflict`); removing one

use std::net::Ipv4Addr;

use ferry_api::{ErrorCode, Migration, MigrationPhase, MigrationStepKind, migration_seq};
use serde::{Deserialize, Serialize};

use crate::registry::{Change, Registry, RegistryError, fail};
/// How many finished migrations (aborted, or released and past their grace) are kept.
pub const MIGRATION_HISTORY: usize = 1000;

/// A migration the agents must act on, with the registry versions the coordinator needs to
/// know who has applied what.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LiveMigration {
    pub migration: Migration,
    /// The version the prepare step produced: a host that reported it (or a later one) may
    /// have acted on the migration, so a rollback waits for it.
    pub prepared_version: u64,
    /// The version that put the migration in its current phase.
    pub phase_version: u64,
}

/// Whether a live migration belongs in the snapshot at `now_ms`.
pub(crate) fn in_snapshot(m: &Migration, now_ms: u64) -> bool {
    m.phase != MigrationPhase::Released || now_ms < m.forward_until_unix_ms
}

/// Why `step` does not apply to `m` in its phase.
pub(crate) fn bad_phase(m: &Migration, step: MigrationStepKind) -> String {
    use MigrationPhase as P;
    use MigrationStepKind as S;
    let id = &m.id;
    match (m.phase, step) {
        (P::Prepared, S::Release) => {
            format!("migration {id} is prepared: freeze it before release")
        }
        (P::Frozen, S::Prepare) => {
            format!("migration {id} is frozen: it is already prepared (release or abort it)")
        }
        (P::Released, S::Abort) => {
            format!("migration {id} is released: too late to abort; migrate back instead")
        }
        (P::Released, _) => format!(
            "migration {id} is released: it is over (to move {} again, prepare a new migration)",
            m.container
        ),
        (P::Aborted, _) => format!(
            "migration {id} is aborted: it is over (to retry, prepare a new migration of {})",
            m.container
        ),
        (phase, step) => format!("migration {id} is {phase}: {step} does not apply"),
    }
}

impl Registry {
    /// Live migrations (active, or released and maybe still forwarding), oldest first.
    pub fn live_migrations(&self) -> impl Iterator<Item = &LiveMigration> {
        self.migrations.values()
    }

    /// A live migration by id.
    pub fn live_migration(&self, id: &str) -> Option<&LiveMigration> {
        self.migrations.get(&migration_seq(id)?)
    }

    /// A migration by id, live or in the history.
    pub fn migration(&self, id: &str) -> Option<&Migration> {
        match self.live_migration(id) {
            Some(l) => Some(&l.migration),
            None => self.history.iter().find(|m| m.id == id),
        }
    }

    /// Every migration the registry knows (live and history), oldest (smallest id) first.
    pub fn all_migrations(&self) -> Vec<&Migration> {
        let mut all: Vec<&Migration> = self
            .history
            .iter()
            .chain(self.migrations.values().map(|l| &l.migration))
            .collect();
        all.sort_by_key(|m| m.seq().unwrap_or(0));
        all
    }

    /// The container's active (`prepared` or `frozen`) migration.
    pub fn active_migration(&self, container: Ipv4Addr) -> Option<&LiveMigration> {
        self.migrations
            .values()
            .find(|l| l.migration.container == container && l.migration.phase.is_active())
    }

    /// When the next released migration's grace ends (the timer's next deadline).
    pub fn next_expiry(&self) -> Option<u64> {
        self.migrations
            .values()
            .filter(|l| l.migration.phase == MigrationPhase::Released)
            .map(|l| l.migration.forward_until_unix_ms)
            .min()
    }

    /// The first end of a forwarding grace after `now_ms`: until then, the snapshot at any
    /// time is the same as at `now_ms` (for a given version).
    pub fn next_expiry_after(&self, now_ms: u64) -> Option<u64> {
        self.migrations
            .values()
            .filter(|l| l.migration.phase == MigrationPhase::Released)
            .map(|l| l.migration.forward_until_unix_ms)
            .filter(|t| *t > now_ms)
            .min()
    }

    /// Live migrations in the snapshot at `now_ms`, counted by phase (prepared, frozen,
    /// released).
    pub fn migration_counts(&self, now_ms: u64) -> [(MigrationPhase, usize); 3] {
        let mut counts = [
            (MigrationPhase::Prepared, 0),
            (MigrationPhase::Frozen, 0),
            (MigrationPhase::Released, 0),
        ];
        for l in self.migrations.values() {
            if in_snapshot(&l.migration, now_ms)
                && let Some(c) = counts.iter_mut().find(|(p, _)| *p == l.migration.phase)
            {
                c.1 += 1;
            }
        }
        counts
    }

    // ---- migrations

    /// Moves the live (released: the callers refuse while one is active) migrations matching
    /// `which` to the history.
    pub(crate) fn end_live(&mut self, which: impl Fn(&Migration) -> bool) -> Vec<Migration> {
        let seqs: Vec<u64> = self
            .migrations
            .iter()
            .filter(|(_, l)| which(&l.migration))
            .map(|(s, _)| *s)
            .collect();
        let mut ended = Vec::with_capacity(seqs.len());
        for s in seqs {
            let l = self.migrations.remove(&s).expect("listed above");
            debug_assert_eq!(l.migration.phase, MigrationPhase::Released);
            ended.push(l.migration.clone());
            self.push_history(l.migration);
        }
        ended
    }

    pub(crate) fn push_history(&mut self, m: Migration) {
        self.history.push_back(m);
        while self.history.len() > MIGRATION_HISTORY {
            self.history.pop_front();
        }
    }

    pub(crate) fn prepare_migration(
        &mut self,
        container: Ipv4Addr,
        to: String,
        now_ms: u64,
        run: bool,
    ) -> Result<Change, RegistryError> {
        ferry_api::validate::validate_host_name(&to).map_err(|e| RegistryError {
            code: ErrorCode::BadRequest,
            message: format!("to: {e}"),
        })?;
        let Some(endpoint) = self.endpoints.get(&container) else {
            return fail(
                ErrorCode::UnknownEndpoint,
                format!("container {container} is not a registered endpoint"),
            );
        };
        if !self.hosts.contains_key(&to) {
            return fail(
                ErrorCode::UnknownHost,
                format!("host {to:?} (destination of {container}) is not registered"),
            );
        }
        if let Some(l) = self.active_migration(container) {
            let m = &l.migration;
            if m.to != to {
                return fail(
                    ErrorCode::Conflict,
                    format!(
                        "container {container} is already being migrated: migration {} ({}, \
                         {} → {}); abort or finish it first",
                        m.id, m.phase, m.from, m.to
                    ),
                );
            }
            return match m.phase {
                MigrationPhase::Prepared => Ok(Change::MigrationUnchanged(m.clone())),
                _ => fail(
                    ErrorCode::BadPhase,
                    bad_phase(m, MigrationStepKind::Prepare),
                ),
            };
        }
        if endpoint.host == to {
            return fail(
                ErrorCode::BadRequest,
                format!("container {container} is already on host {to}: nothing to migrate"),
            );
        }
        let seq = self.next_migration;
        let migration = Migration {
            created_unix_ms: now_ms,
            updated_unix_ms: now_ms,
            run,
            ..Migration::new(
                format!("m{seq}"),
                container,
                endpoint.host.clone(),
                to,
                MigrationPhase::Prepared,
            )
        };
        let ended = self.end_live(|m| m.container == container).pop();
        self.next_migration += 1;
        let version = self.version + 1;
        self.migrations.insert(
            seq,
            LiveMigration {
                migration: migration.clone(),
                prepared_version: version,
                phase_version: version,
            },
        );
        Ok(Change::MigrationPrepared { migration, ended })
    }

    pub(crate) fn step_migration(
        &mut self,
        id: &str,
        step: MigrationStepKind,
        now_ms: u64,
        expect: Option<MigrationPhase>,
    ) -> Result<Change, RegistryError> {
        let unknown = || {
            fail(
                ErrorCode::UnknownMigration,
                format!("no migration has id {id:?}"),
            )
        };
        let Some(seq) = migration_seq(id) else {
            return unknown();
        };
        let Some(current) = self.migration(id) else {
            return unknown();
        };
        if let Some(p) = expect
            && current.phase != p
        {
            return fail(
                ErrorCode::BadPhase,
                format!(
                    "migration {id} is {} now, not {p}: it changed meanwhile",
                    current.phase
                ),
            );
        }
        use MigrationPhase as P;
        use MigrationStepKind as S;
        let target = match (step, current.phase) {
            (S::Prepare, _) => {
                return fail(
                    ErrorCode::BadRequest,
                    format!(
                        "migration {id}: prepare is POST /v1/migrations, not a step of an existing migration"
                    ),
                );
            }
            (S::Freeze, P::Frozen) | (S::Release, P::Released) | (S::Abort, P::Aborted) => {
                return Ok(Change::MigrationUnchanged(current.clone()));
            }
            (S::Freeze, P::Prepared) => P::Frozen,
            (S::Release, P::Frozen) => P::Released,
            (S::Abort, P::Prepared | P::Frozen) => P::Aborted,
            _ => return fail(ErrorCode::BadPhase, bad_phase(current, step)),
        };
        // Only live migrations get here (finished ones are released or aborted).
        let version = self.version + 1;
        let live = self
            .migrations
            .get_mut(&seq)
            .expect("an active migration is live");
        let old = live.migration.phase;
        let m = &mut live.migration;
        m.phase = target;
        m.updated_unix_ms = now_ms;
        match target {
            P::Frozen => {
                m.frozen_unix_ms = now_ms;
                // The destination holds first; `switch_migration` then points everyone at it.
                m.switch_pending = true;
            }
            P::Released => {
                m.switch_pending = false;
                m.released_unix_ms = now_ms;
                m.forward_until_unix_ms = now_ms.saturating_add(self.net.forward_grace_ms);
            }
            _ => {}
        }
        live.phase_version = version;
        let migration = m.clone();
        match target {
            P::Released => {
                let e = self
                    .endpoints
                    .get_mut(&migration.container)
                    .expect("an endpoint with an active migration cannot be removed");
                e.host = migration.to.clone();
            }
            P::Aborted => {
                self.migrations.remove(&seq);
                self.push_history(migration.clone());
            }
            _ => {}
        }
        Ok(Change::MigrationStepped { old, migration })
    }

    /// The second half of a freeze: the destination holds (it applied the first), so every
    /// other host may now send to it and the source forward to it. Repeating it (or a
    /// migration already switched) answers unchanged.
    pub(crate) fn switch_migration(
        &mut self,
        id: &str,
        now_ms: u64,
    ) -> Result<Change, RegistryError> {
        let seq = migration_seq(id);
        let version = self.version + 1;
        let Some(live) = seq.and_then(|s| self.migrations.get_mut(&s)) else {
            return match self.migration(id) {
                Some(m) => fail(ErrorCode::BadPhase, bad_phase(m, MigrationStepKind::Freeze)),
                None => fail(
                    ErrorCode::UnknownMigration,
                    format!("no migration has id {id:?}"),
                ),
            };
        };
        let m = &mut live.migration;
        if m.phase != MigrationPhase::Frozen {
            let m = m.clone();
            return fail(
                ErrorCode::BadPhase,
                bad_phase(&m, MigrationStepKind::Freeze),
            );
        }
        if !m.switch_pending {
            return Ok(Change::MigrationUnchanged(m.clone()));
        }
        m.switch_pending = false;
        m.updated_unix_ms = now_ms;
        live.phase_version = version;
        Ok(Change::MigrationStepped {
            old: MigrationPhase::Frozen,
            migration: live.migration.clone(),
        })
    }

    pub(crate) fn expire_migrations(&mut self, now_ms: u64) -> Change {
        Change::MigrationsExpired(
            self.end_live(|m| {
                m.phase == MigrationPhase::Released && m.forward_until_unix_ms <= now_ms
            }),
        )
    }
}

#[cfg(test)]
mod tests;
