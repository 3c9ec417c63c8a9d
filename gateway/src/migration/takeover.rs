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
//! A driver that is alive but cut off from etcd loses its lease like a dead one; it is not
//! stopped from acting: the registry's compare-and-swap keeps the decision single (release
//! and abort exclude each other), not the drivers.

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

/// What a driver key holds.
#[derive(Debug, Serialize, Deserialize)]
struct Driver {
    gateway: String,
}

fn value(me: &str) -> Vec<u8> {
    serde_json::to_vec(&Driver {
        gateway: me.to_owned(),
    })
    .expect("serialises")
}

/// The outcome of a claim.
pub(crate) enum Claimed {
    /// The file store: one gateway, nothing to claim.
    NotShared,
    Ours,
    /// Driven by this gateway (its API address).
    Theirs(String),
}

/// Claims container `c`'s run for this gateway (`me`).
pub(crate) async fn claim(g: &Arc<Gateway>, c: Ipv4Addr, me: &str) -> Result<Claimed, ApiFailure> {
    if g.store.etcd().is_none() {
        return Ok(Claimed::NotShared);
    }
    let lease = g.lease.load(std::sync::atomic::Ordering::Relaxed);
    if lease == 0 {
        return Err(ApiFailure::new(
            ErrorCode::StoreUnavailable,
            "this gateway holds no etcd lease yet (is etcd reachable?): it cannot drive a run",
        ));
    }
    let (g2, me) = (g.clone(), me.to_owned());
    tokio::task::spawn_blocking(move || {
        let store = g2.store.etcd().expect("checked");
        let key = store.driver_key(c);
        let won = store.kv().txn(&Txn {
            compare: vec![Compare::Absent(key.clone())],
            success: vec![Op::PutLeased(key.clone(), value(&me), lease)],
        })?;
        if won.succeeded {
            return Ok(Claimed::Ours);
        }
        let who = store
            .kv()
            .range(&key, None, 0, 0)?
            .kvs
            .first()
            .and_then(|kv| serde_json::from_slice::<Driver>(&kv.value).ok())
            .map_or_else(|| "another gateway".to_owned(), |d| d.gateway);
        Ok(Claimed::Theirs(who))
    })
    .await
    .map_err(|e| ApiFailure::new(ErrorCode::Internal, format!("claim task: {e}")))?
    .map_err(|e: crate::etcd::EtcdError| {
        ApiFailure::new(
            ErrorCode::StoreUnavailable,
            format!("claiming container {c}'s run: {e}; nothing was changed"),
        )
    })
}

/// Gives container `c`'s run up (its end; best effort: the lease would end it anyway).
/// With reports in etcd, after the reports written before it (a gateway that claims the
/// container next must find the run's end, not a report that still says running).
pub(crate) fn release(g: &Arc<Gateway>, c: Ipv4Addr, me: &str) {
    if g.store.etcd().is_none() {
        return;
    }
    if g.runs.release_after_reports(c, me) {
        return;
    }
    let (g, me) = (g.clone(), me.to_owned());
    tokio::task::spawn_blocking(move || unclaim(&g, c, &me));
}

fn unclaim(g: &Gateway, c: Ipv4Addr, me: &str) {
    let Some(store) = g.store.etcd() else { return };
    let key = store.driver_key(c);
    let mut end = key.clone();
    end.push(0);
    if let Err(e) = store.kv().txn(&Txn {
        compare: vec![Compare::Value(key.clone(), value(me))],
        success: vec![Op::DeleteRange(key, end)],
    }) {
        warn!(container = %c, error = %e, "giving up the run's claim (its lease ends it)");
    }
}

/// What the report writer does, in order.
enum Write {
    Report(Box<RunReport>),
    /// Give container's claim up (after the reports before it).
    Release(Ipv4Addr, String),
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
                    let mut newest: Vec<RunReport> = Vec::new();
                    let mut releases = Vec::new();
                    for w in batch {
                        match w {
                            Write::Report(r) => match newest.iter_mut().find(|n| n.id == r.id) {
                                Some(n) => *n = *r,
                                None => newest.push(*r),
                            },
                            Write::Release(c, me) => releases.push((c, me)),
                        }
                    }
                    let Some(store) = g.store.etcd() else { return };
                    for r in newest {
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
                        let put = Txn {
                            compare: vec![],
                            success: vec![
                                Op::Put(
                                    store.report_key(&r.id),
                                    serde_json::to_vec(&r).expect("serialises"),
                                ),
                                index,
                            ],
                        };
                        if let Err(e) = store.kv().txn(&put) {
                            error!(migration = %r.id, error = %e, "persisting the run report in etcd");
                        }
                    }
                    for (c, me) in releases {
                        unclaim(&g, c, &me);
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

    pub(crate) fn save(&self, r: &RunReport) {
        let _ = self.tx.send(Write::Report(Box::new(r.clone())));
    }

    pub(crate) fn release(&self, c: Ipv4Addr, me: &str) {
        let _ = self.tx.send(Write::Release(c, me.to_owned()));
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

/// Takes over, every [`SCAN`], the unfinished runs whose driver is gone; until shutdown.
pub(crate) async fn watch_orphans(g: Arc<Gateway>, me: String) {
    let mut shutdown = g.shutdown_tx.subscribe();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(SCAN) => {}
            _ = shutdown.wait_for(|s| *s) => return,
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
            all.retain(|(id, _)| {
                !reports
                    .get(id)
                    .is_some_and(|r| r.state == ferry_api::run::RunState::Running)
            });
            all
        };
        for (id, c) in orphans {
            match claim(&g, c, &me).await {
                Ok(Claimed::Ours) => {}
                Ok(_) => continue,
                Err(e) => {
                    warn!(migration = %id, error = %e.message, "looking for runs nobody drives");
                    continue;
                }
            }
            // Still a run to finish (it may have ended while we claimed).
            let report = read_report(&g, &id).await;
            let unfinished = match &report {
                Some(r) => r.state == ferry_api::run::RunState::Running,
                None => g
                    .current()
                    .migration(&id)
                    .is_some_and(|m| m.run && m.phase.is_active()),
            };
            if !unfinished {
                release(&g, c, &me);
                continue;
            }
            info!(migration = %id, container = %c, gateway = %me, "taking over a run whose gateway is gone");
            super::runs::adopt(&g, &id, report);
            super::runs::resume(
                &g,
                id,
                "the gateway driving the run is gone: another one takes it over",
            );
        }
    }
}
