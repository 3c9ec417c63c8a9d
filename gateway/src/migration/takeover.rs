//! Runs when gateways share a registry on etcd: exactly one gateway drives a container's run,
//! and another takes it over when that one dies.
//!
//! - **Claim.** Before its prepare, the gateway that starts a run creates
//!   `<prefix>drivers/<container>` on its lease ([`crate::cluster::LEASE_TTL_SECS`]), in a
//!   transaction that requires the key absent: of two gateways starting a run of one
//!   container, one gets it and the other refuses (`conflict`). The run's end deletes it.
//! - **Reports** go to `<prefix>runs/<id>` (in order, from a thread of their own), so any
//!   gateway answers `GET /v1/runs/{id}` and a taking-over gateway continues the story.
//! - **Takeover.** Every gateway looks, every [`SCAN`], for runs the registry says are active
//!   (a migration made by a run, not decided) whose container has no driver: the driver's
//!   lease ended with it. It claims the container the same way and resumes the run from the
//!   registry ([`super::runs::resume`]: the destination's word decides, as after a restart).
//!
//! **Fencing.** A driver that is alive but cut off from etcd loses its lease like a dead one,
//! and stops acting before etcd can let the lease go: each run's rest races
//! [`crate::cluster::Quorum`]'s view of the lease its claim is on, and when that may have
//! lapsed the run is handed over (the gateway stops driving it and writes nothing more of
//! it). Its report writes and its claim's release compare the claim's value, which names the
//! lease: a write queued before the hand-over cannot overwrite the report of the gateway that
//! took over. The registry's compare-and-swap still decides the migration itself (release
//! and abort exclude each other).

use std::{net::Ipv4Addr, sync::Arc, time::Duration};

use ferry_api::{ErrorCode, run::RunReport};
use serde::{Deserialize, Serialize};
use tracing::{error, info, warn};

use crate::{
    etcd::{Compare, Op, Txn},
    server::{ApiFailure, Gateway, lock},
};

/// How often a gateway looks for runs nobody drives.
pub const SCAN: Duration = Duration::from_millis(500);
/// How long a claim waits for a lease this gateway is about to take (just started, or back
/// in touch with etcd's quorum).
const LEASE_WAIT: Duration = Duration::from_secs(2);

/// What a driver key holds: which gateway drives the run, on which of its leases.
#[derive(Debug, Serialize, Deserialize)]
struct Driver {
    gateway: String,
    #[serde(default)]
    lease: i64,
}

fn value(me: &str, lease: i64) -> Vec<u8> {
    serde_json::to_vec(&Driver {
        gateway: me.to_owned(),
        lease,
    })
    .expect("serialises")
}

/// The outcome of a claim.
pub(crate) enum Claimed {
    /// The file store: one gateway, nothing to claim.
    NotShared,
    /// This gateway's, on this lease.
    Ours(i64),
    /// This gateway's own claim from an earlier lease (it was restarted, or cut off from
    /// etcd), taken again on this lease.
    OursAgain(i64),
    /// Driven by this gateway (its API address).
    Theirs(String),
}

/// Claims container `c`'s run for this gateway (`me`).
pub(crate) async fn claim(g: &Arc<Gateway>, c: Ipv4Addr, me: &str) -> Result<Claimed, ApiFailure> {
    if g.store.etcd().is_none() {
        return Ok(Claimed::NotShared);
    }
    // A gateway back in touch takes a new lease within a tick of its publisher: worth a
    // moment's wait rather than a refusal.
    let mut lease = g.quorum.fresh_lease();
    let until = tokio::time::Instant::now() + LEASE_WAIT;
    while lease.is_none() && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
        lease = g.quorum.fresh_lease();
    }
    let Some(lease) = lease else {
        return Err(ApiFailure::new(
            ErrorCode::StoreUnavailable,
            "this gateway holds no etcd lease it can vouch for (is etcd's quorum reachable?): \
             it cannot drive a run; nothing was changed",
        ));
    };
    let (g2, me) = (g.clone(), me.to_owned());
    let claimed = tokio::task::spawn_blocking(move || {
        let store = g2.store.etcd().expect("checked");
        let key = store.driver_key(c);
        let won = store.kv().txn(&Txn {
            compare: vec![Compare::Absent(key.clone())],
            success: vec![Op::PutLeased(key.clone(), value(&me, lease), lease)],
        })?;
        if won.succeeded {
            return Ok(Claimed::Ours(lease));
        }
        let held = store.kv().range(&key, None, 0, 0)?.kvs.into_iter().next();
        let driver = held
            .as_ref()
            .and_then(|kv| serde_json::from_slice::<Driver>(&kv.value).ok());
        // This gateway's own claim on a lease it no longer acts on (it handed the run over
        // while cut off, and was back before etcd let the lease go): taken again on the
        // current lease, or nobody could ever drive the run.
        if let (Some(kv), Some(d)) = (&held, &driver)
            && d.gateway == me
            && d.lease != lease
            && !g2.runs.drives(c)
        {
            let again = store.kv().txn(&Txn {
                compare: vec![Compare::Value(key.clone(), kv.value.clone())],
                success: vec![Op::PutLeased(key.clone(), value(&me, lease), lease)],
            })?;
            if again.succeeded {
                return Ok(Claimed::OursAgain(lease));
            }
        }
        Ok(Claimed::Theirs(driver.map_or_else(
            || "another gateway".to_owned(),
            |d| d.gateway,
        )))
    })
    .await
    .map_err(|e| ApiFailure::new(ErrorCode::Internal, format!("claim task: {e}")))?
    .map_err(|e: crate::etcd::EtcdError| {
        ApiFailure::new(
            ErrorCode::StoreUnavailable,
            format!("claiming container {c}'s run: {e}; nothing was changed"),
        )
    })?;
    if let Claimed::Ours(lease) | Claimed::OursAgain(lease) = claimed {
        g.runs.claimed(c, lease);
    }
    Ok(claimed)
}

/// Gives container `c`'s run up (its end; best effort: the lease would end it anyway).
/// With reports in etcd, after the reports written before it (a gateway that claims the
/// container next must find the run's end, not a report that still says running).
pub(crate) fn release(g: &Arc<Gateway>, c: Ipv4Addr, me: &str) {
    if g.store.etcd().is_none() {
        return;
    }
    let Some(lease) = g.runs.unclaimed(c) else {
        return;
    };
    if g.runs.release_after_reports(c, me, lease) {
        return;
    }
    let (g, me) = (g.clone(), me.to_owned());
    tokio::task::spawn_blocking(move || unclaim(&g, c, &me, lease));
}

fn unclaim(g: &Gateway, c: Ipv4Addr, me: &str, lease: i64) {
    let Some(store) = g.store.etcd() else { return };
    let key = store.driver_key(c);
    let mut end = key.clone();
    end.push(0);
    if let Err(e) = store.kv().txn(&Txn {
        compare: vec![Compare::Value(key.clone(), value(me, lease))],
        success: vec![Op::DeleteRange(key, end)],
    }) {
        warn!(container = %c, error = %e, "giving up the run's claim (its lease ends it)");
    }
}

/// What the report writer does, in order.
enum Write {
    /// A report, written only while the run's container is claimed on this lease.
    Report(Box<RunReport>, i64),
    /// Give container's claim (on this lease) up, after the reports before it.
    Release(Ipv4Addr, String, i64),
}

/// Writes reports to etcd in the order they come, the newest of each run when several wait.
pub(crate) struct ReportWriter {
    tx: std::sync::mpsc::Sender<Write>,
}

impl ReportWriter {
    pub(crate) fn start(g: &Arc<Gateway>) -> Option<Self> {
        g.store.etcd()?;
        let (tx, rx) = std::sync::mpsc::channel::<Write>();
        let g = g.clone();
        let spawned = std::thread::Builder::new()
            .name("etcd-reports".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut batch = vec![first];
                    batch.extend(rx.try_iter());
                    // The newest of each run, in the order runs first appear; releases after.
                    let mut newest: Vec<(RunReport, i64)> = Vec::new();
                    let mut releases = Vec::new();
                    for w in batch {
                        match w {
                            Write::Report(r, lease) => {
                                match newest.iter_mut().find(|(n, _)| n.id == r.id) {
                                    Some(n) => *n = (*r, lease),
                                    None => newest.push((*r, lease)),
                                }
                            }
                            Write::Release(c, me, lease) => releases.push((c, me, lease)),
                        }
                    }
                    let Some(store) = g.store.etcd() else { return };
                    let me = g.runs.me();
                    for (r, lease) in newest {
                        // The report, and the index of running runs (what the takeover scans).
                        let mut running = store.running_prefix();
                        running.extend_from_slice(r.id.as_bytes());
                        let index = if r.state == ferry_api::run::RunState::Running {
                            Op::Put(running, r.container.to_string().into_bytes())
                        } else {
                            let mut end = running.clone();
                            end.push(0);
                            Op::DeleteRange(running, end)
                        };
                        // Only while the claim is still this one: a gateway that took the run
                        // over writes its story, and this one's late writes do not undo it.
                        let put = Txn {
                            compare: vec![Compare::Value(
                                store.driver_key(r.container),
                                value(&me, lease),
                            )],
                            success: vec![
                                Op::Put(
                                    store.report_key(&r.id),
                                    serde_json::to_vec(&r).expect("serialises"),
                                ),
                                index,
                            ],
                        };
                        match store.kv().txn(&put) {
                            Ok(t) if t.succeeded => {}
                            Ok(_) => {
                                warn!(migration = %r.id, container = %r.container, "run report not written: the run is no longer this gateway's to drive");
                            }
                            Err(e) => {
                                error!(migration = %r.id, error = %e, "persisting the run report in etcd");
                            }
                        }
                    }
                    for (c, me, lease) in releases {
                        unclaim(&g, c, &me, lease);
                    }
                }
            });
        match spawned {
            Ok(_) => Some(Self { tx }),
            Err(e) => {
                error!(error = %e, "no thread for the run reports: they stay in memory");
                None
            }
        }
    }

    pub(crate) fn save(&self, r: &RunReport, lease: i64) {
        let _ = self.tx.send(Write::Report(Box::new(r.clone()), lease));
    }

    pub(crate) fn release(&self, c: Ipv4Addr, me: &str, lease: i64) {
        let _ = self.tx.send(Write::Release(c, me.to_owned(), lease));
    }
}

/// Run `id`'s report as etcd holds it.
pub(crate) async fn read_report(g: &Arc<Gateway>, id: &str) -> Option<RunReport> {
    g.store.etcd()?;
    let (g, id) = (g.clone(), id.to_owned());
    tokio::task::spawn_blocking(move || {
        let store = g.store.etcd()?;
        let r = store.kv().range(&store.report_key(&id), None, 0, 0).ok()?;
        serde_json::from_slice(&r.kvs.first()?.value).ok()
    })
    .await
    .ok()
    .flatten()
}

/// The runs etcd's index says are running: (id, container).
async fn running(g: &Arc<Gateway>) -> Vec<(String, Ipv4Addr)> {
    let g = g.clone();
    tokio::task::spawn_blocking(move || {
        let store = g.store.etcd()?;
        let prefix = store.running_prefix();
        let r = store
            .kv()
            .range(&prefix, Some(&crate::etcd::prefix_end(&prefix)), 0, 0)
            .ok()?;
        Some(
            r.kvs
                .iter()
                .filter_map(|kv| {
                    let id = std::str::from_utf8(kv.key.strip_prefix(prefix.as_slice())?).ok()?;
                    let c = std::str::from_utf8(&kv.value).ok()?.parse().ok()?;
                    Some((id.to_owned(), c))
                })
                .collect(),
        )
    })
    .await
    .ok()
    .flatten()
    .unwrap_or_default()
}

/// How long after its decision a run is looked at for a missing report.
const DECIDED_RECENTLY_MS: u64 = 10 * 60 * 1000;

/// Decided runs (released, aborted) of the last [`DECIDED_RECENTLY_MS`] not in `checked`.
fn decided_runs(
    g: &Gateway,
    checked: &std::collections::HashSet<String>,
) -> Vec<(String, Ipv4Addr)> {
    let reg = g.current();
    let since = ferry_api::unix_ms().saturating_sub(DECIDED_RECENTLY_MS);
    reg.all_migrations()
        .into_iter()
        .filter(|m| m.run && !m.phase.is_active() && m.updated_unix_ms >= since)
        .filter(|m| !checked.contains(&m.id))
        .map(|m| (m.id.clone(), m.container))
        .collect()
}

/// Takes over, every [`SCAN`], the unfinished runs whose driver is gone; until shutdown.
/// Also the decided runs without any report in etcd: a step through another gateway decided
/// them (a freeze not applied in time, a release) while their driver was cut off before its
/// first report reached etcd, and nobody else would write their end.
pub(crate) async fn watch_orphans(g: Arc<Gateway>, me: String) {
    let mut shutdown = g.shutdown_tx.subscribe();
    // Decided runs whose report etcd holds.
    let mut checked = std::collections::HashSet::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(SCAN) => {}
            _ = shutdown.wait_for(|s| *s) => return,
        }
        // Cut off from etcd's quorum: no claim could be made, and what it would read may be
        // behind.
        if g.cut_off().is_some() {
            continue;
        }
        // Runs whose report says running (decided or not: a run decided after its driver
        // died still needs its end written), and active run migrations without a report
        // (the driver died during its start).
        let indexed = running(&g).await;
        let orphans: Vec<(String, Ipv4Addr)> = {
            let reg = g.current();
            let reports = lock(&g.runs.reports);
            let mut all: Vec<(String, Ipv4Addr)> = reg
                .live_migrations()
                .map(|l| &l.migration)
                .filter(|m| m.run && m.phase.is_active())
                .map(|m| (m.id.clone(), m.container))
                .collect();
            for (id, c) in indexed {
                if !all.iter().any(|(i, _)| *i == id) {
                    all.push((id, c));
                }
            }
            // Not the runs this gateway drives (those it handed over are anyone's).
            all.retain(|(id, _)| {
                !reports
                    .get(id)
                    .is_some_and(|r| r.state == ferry_api::run::RunState::Running)
                    || g.runs.handed_over(id)
            });
            all
        };
        let mut orphans = orphans;
        for (id, c) in decided_runs(&g, &checked) {
            if lock(&g.runs.reports).contains_key(&id) && !g.runs.handed_over(&id) {
                checked.insert(id);
                continue;
            }
            match read_report(&g, &id).await {
                Some(_) => {
                    checked.insert(id);
                }
                None if !orphans.iter().any(|(i, _)| *i == id) => orphans.push((id, c)),
                None => {}
            }
        }
        for (id, c) in orphans {
            let again = match claim(&g, c, &me).await {
                Ok(Claimed::Ours(_)) => false,
                Ok(Claimed::OursAgain(_)) => true,
                Ok(_) => continue,
                Err(e) => {
                    warn!(migration = %id, error = %e.message, "looking for runs nobody drives");
                    continue;
                }
            };
            // Still a run to finish (it may have ended while we claimed).
            let report = read_report(&g, &id).await;
            // Without any report, a run the registry knows needs one written: resumed, it
            // ends at once if it was decided.
            let unfinished = match &report {
                Some(r) => r.state == ferry_api::run::RunState::Running,
                None => g.current().migration(&id).is_some_and(|m| m.run),
            };
            if !unfinished {
                release(&g, c, &me);
                continue;
            }
            let why = if again {
                "this gateway drove the run before it was restarted or cut off: it takes the run up again"
            } else {
                "the gateway driving the run is gone: another one takes it over"
            };
            info!(migration = %id, container = %c, gateway = %me, why, "taking over a run");
            super::runs::adopt(&g, &id, report);
            super::runs::resume(&g, id, why);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Driver, value};

    #[test]
    fn a_claim_names_its_lease_and_one_written_before_leases_were_named_still_reads() {
        // The value is what report writes and the claim's release compare: one per lease.
        assert_ne!(value("198.18.0.10:7400", 1), value("198.18.0.10:7400", 2));
        assert_eq!(value("g", 5), value("g", 5));
        let d: Driver = serde_json::from_slice(&value("g", 5)).unwrap();
        assert_eq!((d.gateway.as_str(), d.lease), ("g", 5));
        let old: Driver = serde_json::from_slice(br#"{"gateway":"g"}"#).unwrap();
        assert_eq!(old.lease, 0);
    }
}
