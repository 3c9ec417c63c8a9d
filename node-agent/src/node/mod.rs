//! The agent's view of what its datapath holds, and the one place that changes it:
//! [`Node::apply`] moves the datapath from what it holds ([`Applied`]) to a [`Desired`] state,
//! make-before-break, and keeps going past errors (each is reported; what failed is retried
//! with the next apply).
//!
//! # A migration, as this host sees it
//!
//! The registry (gateway) decides the phase; [`plan::desired`] turns it into what this host's
//! datapath must hold, and `apply` gets there through the steps in [`steps`]:
//!
//! | phase | on the destination | on the source | elsewhere |
//! |---|---|---|---|
//! | prepared | build the container; entry `HOLD` (packets queue in the hold device) | `LOCAL` | `REMOTE` → source |
//! | frozen | `HOLD` | `FORWARD` → destination (`DROP_EGRESS` while CRIU checkpoints, or once the connections are dumped) | `REMOTE` → destination |
//! | released | release: held packets re-injected in order, then `LOCAL`, stragglers drained, announcements | `FORWARD` | `REMOTE` → destination |
//! | gone (grace over) | `LOCAL` | container removed (entry, then from-container, then veth) | `REMOTE` → destination |
//! | gone (aborted) | held packets drained back to the source, then container removed | `LOCAL` again | `REMOTE` → source |
//!
//! Before its checkpoint the source *drains* the container ([`Node::start_drain`], from
//! `crate::drain`): its `LOCAL` entry carries `HOLD_SYN`, so new connections' SYNs wait in
//! this host's hold device while the listener's queues empty. The drain ends either with the
//! freeze's switch (the entry becomes `FORWARD`: the apply writes the held SYNs back through
//! the same steps as a release, so they follow the entry to the destination, which holds
//! them until its release) or without a checkpoint ([`Node::end_drain`]: the flag goes, then
//! the SYNs are delivered here).
//!
//! The kernel-facing pieces are behind the traits in [`seams`], so the order of the steps is
//! pinned by unit tests with recording fakes (`node/tests.rs`).
//!
//! # A restarted agent
//!
//! It starts with an empty [`Applied`] on a host where an earlier agent left everything in
//! place (pinned maps and links, namespaces, veths). Building a container first tries to
//! adopt what is there ([`seams::ContainerNet::adopt`]: same namespace, same veth and ifindex,
//! so the entry it writes is the one already in the map); entries are rewritten with the
//! values they already have. What no snapshot wants any more is removed only once a
//! snapshot has been applied in full ([`Leftovers`]): containers (their processes killed
//! first) and map entries nobody wrote.

pub mod pace;
pub mod seams;
mod steps;

#[cfg(test)]
mod fake;
#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    sync::Arc,
};

use ferry_common::{Config, Endpoint, NatKey, NatValue, Vtep, flags, kind};
use serde::Serialize;
use tracing::{info, warn};

pub use seams::{Announcements, Hold, Installed, SharedDatapath};
use seams::{Announcer, ContainerNet, Datapath, HoldDevice};

use crate::{
    containers::{Built, HostNetwork},
    plan::{Desired, LocalContainer},
};

/// What has been applied to the datapath.
#[derive(Debug, Default)]
pub struct Applied {
    pub endpoints: BTreeMap<Ipv4Addr, Endpoint>,
    pub vteps: BTreeMap<Ipv4Addr, Vtep>,
    pub public: BTreeMap<NatKey, NatValue>,
    pub snat: BTreeMap<NatKey, NatValue>,
    pub containers: BTreeMap<Ipv4Addr, (LocalContainer, Built)>,
    pub egress_vtep: Option<Ipv4Addr>,
    /// Gateway role: another gateway-role host faces the internet (see `Desired`).
    pub public_standby: bool,
    /// Gateway role with a moving IPv6 next hop: whether this host holds it (None: not yet
    /// decided since the agent started).
    pub public6_held: Option<bool>,
    /// The registry version applied without errors (0: none yet).
    pub version: u64,
    /// Local containers whose connections have been dumped here (they left with a hand-off
    /// or a checkpoint): whatever the old copy still emits is stale and dropped.
    pub dumped: BTreeSet<Ipv4Addr>,
    /// Local containers being checkpointed by CRIU here: their tasks are frozen before the
    /// migration's freeze, so from the freeze on what the old copy emits comes from the
    /// kernel's timers alone (delayed ACKs, window updates, retransmissions — even from
    /// sockets in repair mode), and it is all dropped from the FORWARD switch on. Such a
    /// segment carries a TCP timestamp newer than the one CRIU saves, and the peer would then
    /// discard the restored socket's segments (PAWS) until its RTO fired. Nothing is lost: a
    /// retransmission's data is in the dump (unacknowledged), and the restored socket sends it
    /// again.
    pub silenced: BTreeSet<Ipv4Addr>,
    /// Containers restored here whose tree is fenced (stopped, not yet the owner): their
    /// `HOLD` entry drops whatever the stopped copy's kernel emits (a retransmission timer
    /// firing) until the release makes it `LOCAL`.
    pub fenced: BTreeSet<Ipv4Addr>,
    /// Local containers being drained before a checkpoint: their `LOCAL` entry carries
    /// `HOLD_SYN` (new connections wait in the hold device, whose queue for them is open).
    /// Agent-local: the registry knows nothing of it. Ends at the freeze's switch (the entry
    /// is no longer `LOCAL`) or with [`Node::end_drain`].
    pub draining: BTreeMap<Ipv4Addr, u64>,
    /// The last drain's number: each drain gets the next one ([`Node::start_drain`]), so
    /// whoever started a drain ends that drain and not a later one.
    pub drains: u64,
    /// The last apply met no error: the maps hold everything it wanted, so the next one may
    /// compare only what its plan touched ([`crate::plan::Touched`]).
    pub complete: bool,
}

/// The flags the agent adds to a local container's entry: a FORWARD entry drops the old
/// copy's output once its connections are dumped, or from the start while CRIU checkpoints
/// it; a HOLD entry drops a fenced restored copy's; a LOCAL entry of a container being
/// drained holds new connections' SYNs.
fn entry_flags(applied: &Applied, ip: Ipv4Addr, entry_kind: u32) -> u32 {
    match entry_kind {
        kind::FORWARD if applied.dumped.contains(&ip) || applied.silenced.contains(&ip) => {
            flags::DROP_EGRESS
        }
        kind::HOLD if applied.fenced.contains(&ip) => flags::DROP_EGRESS,
        kind::LOCAL if applied.draining.contains_key(&ip) => flags::HOLD_SYN,
        _ => 0,
    }
}

/// The flags [`entry_flags`] decides (the rest come from the plan).
const AGENT_FLAGS: u32 = flags::DROP_EGRESS | flags::HOLD_SYN;

/// Why a drain cannot start.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DrainStartError {
    #[error("container {0} has no endpoint entry on this host")]
    NoEntry(Ipv4Addr),
    #[error(
        "container {ip}'s entry is not LOCAL here (kind {kind}): it is not running here, or already migrating"
    )]
    NotLocal { ip: Ipv4Addr, kind: u32 },
    #[error("this agent has no hold device: new connections could not wait")]
    NoHoldDevice,
    #[error("container {0} is already being drained")]
    AlreadyDraining(Ipv4Addr),
    #[error("writing container {ip}'s entry: {error}")]
    Datapath { ip: Ipv4Addr, error: String },
}

fn mark(set: &mut BTreeSet<Ipv4Addr>, ip: Ipv4Addr, on: bool) {
    if on {
        set.insert(ip);
    } else {
        set.remove(&ip);
    }
}

/// When what an earlier agent left and no snapshot wants is removed (see the module's doc).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum Leftovers {
    /// Nothing to sweep (done, or never asked).
    #[default]
    Swept,
    /// After the first apply of a registry snapshot (the static configuration alone does not
    /// know the containers).
    AfterRegistry,
    /// After the next apply (no registry: the configuration is the whole truth).
    AfterNextApply,
}

impl Leftovers {
    /// Is the sweep due after applying `version` without errors?
    pub fn due(self, version: u64) -> bool {
        match self {
            Leftovers::Swept => false,
            Leftovers::AfterRegistry => version > 0,
            Leftovers::AfterNextApply => true,
        }
    }
}

/// Summary for `/v1/status`.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub host: String,
    pub applied_version: u64,
    pub endpoints: usize,
    pub vteps: usize,
    pub public: usize,
    pub snat: usize,
    pub egress_vtep: Option<Ipv4Addr>,
    pub containers: Vec<Built>,
}

/// One host's datapath state and the kernel-facing pieces that change it (the real ones by
/// default; the unit tests use fakes).
pub struct Node<D = SharedDatapath, H = Hold, N = HostNetwork, A = Announcements> {
    pub host: String,
    pub datapath: D,
    /// Containers' namespaces and veths.
    pub net: N,
    /// The datapath configuration without the parts the registry decides (egress VTEP).
    pub base_config: Config,
    pub applied: Applied,
    pub hold: Option<Arc<H>>,
    /// ifindex of the hold device (0: none), for its drop counter.
    pub hold_ifindex: u32,
    /// Announcements after a release.
    pub announcer: A,
    /// The registry snapshot last received (applied or not; `applied.version` says). The
    /// hand-off reads hosts and migrations from it.
    pub registry: Option<Arc<ferry_api::Snapshot>>,
    /// Whether an apply still has to sweep what an earlier agent left.
    pub leftovers: Leftovers,
    /// Longest a paced release of held UDP datagrams waits for room (zero: no pacing).
    pub udp_pace: std::time::Duration,
    /// Paced releases under way.
    pub pacers: Vec<tokio::task::JoinHandle<pace::PaceReport>>,
    /// Who faces the internet by this agent's own view, while the host the registry names is
    /// silent (`crate::public_ha`); None: the registry's.
    pub facing_override: Option<String>,
    /// The plan of the registry's last snapshot given to [`Node::apply`] by the watch: the
    /// next delta patches it ([`Node::plan_update`]).
    pub planned: Option<Desired>,
}

impl<D, H, N, A> Node<D, H, N, A> {
    /// The datapath's desired state for `snap` ([`crate::plan::desired`]), with this agent's
    /// own view of who faces the internet when it has one.
    pub fn desired(
        &self,
        cfg: &crate::config::AgentConfig,
        snap: Option<&ferry_api::Snapshot>,
    ) -> Desired {
        let mut d = crate::plan::desired(cfg, snap);
        if let (Some(f), Some(s)) = (&self.facing_override, snap) {
            crate::plan::set_facing(&mut d, cfg, s, Some(f));
        }
        d
    }

    /// The plan of `snap`: when `snap` is `delta` applied to the snapshot last planned and
    /// applied in full (`before`: that snapshot's migrations), the last plan patched
    /// ([`crate::plan::patch`]: only what the delta touches is computed again, and the apply
    /// compares only that); otherwise made afresh. Takes the last plan: give the result back
    /// to `planned` once applied.
    pub fn plan_update(
        &mut self,
        cfg: &crate::config::AgentConfig,
        snap: &ferry_api::Snapshot,
        delta: Option<(&ferry_api::SnapshotDelta, &[ferry_api::Migration])>,
    ) -> Desired {
        let last = self.planned.take();
        if let (Some((delta, before)), Some(mut d)) = (delta, last)
            && self.applied.complete
            && self.applied.version == delta.from
            && crate::plan::patch(&mut d, cfg, snap, delta, before)
        {
            if let Some(f) = &self.facing_override {
                crate::plan::set_facing(&mut d, cfg, snap, Some(f));
            }
            return d;
        }
        self.desired(cfg, Some(snap))
    }

    pub fn status(&self) -> Status {
        let a = &self.applied;
        Status {
            host: self.host.clone(),
            applied_version: a.version,
            endpoints: a.endpoints.len(),
            vteps: a.vteps.len(),
            public: a.public.len(),
            snat: a.snat.len(),
            egress_vtep: a.egress_vtep,
            containers: a.containers.values().map(|(_, b)| b.clone()).collect(),
        }
    }
}

impl<D: Datapath, H: HoldDevice, N: ContainerNet, A: Announcer> Node<D, H, N, A> {
    /// Sets (or clears) this agent's own view of who faces the internet and applies the public
    /// side at once — the egress VTEP, the standby flag and, on a host that starts facing it,
    /// the announcement of the public addresses: nothing else depends on it. Returns the
    /// errors met.
    pub fn set_facing_override(
        &mut self,
        cfg: &crate::config::AgentConfig,
        facing: Option<String>,
    ) -> Vec<String> {
        self.facing_override = facing;
        let Some(snap) = self.registry.clone() else {
            return Vec::new();
        };
        let want = self.desired(cfg, Some(&snap));
        let mut errors = Vec::new();
        self.write_egress(&want, &mut errors);
        errors
    }

    /// Applies `want`, step by step (each step's ordering rule is on its function in
    /// [`steps`]). Returns the errors met (empty: the datapath now matches `want`, and its
    /// version is recorded as applied).
    pub async fn apply(&mut self, want: &Desired) -> Vec<String> {
        let mut errors = Vec::new();
        for ip in &want.orphans {
            warn!(%ip, "endpoint placed on a host the registry does not list; ignored");
        }
        self.allow_peers(want, &mut errors);
        let departing = self.build_containers(want, &mut errors).await;
        let entries = self.endpoint_entries(want);
        self.start_holding(want);
        let releasing = self.releasing(want);
        let udp = self.drain_held(&releasing, &entries.map, &mut errors).await;
        self.write_endpoints(&entries, &mut errors);
        let arrived = self.end_holds(&releasing, &entries.map, udp);
        self.announce_arrivals(&arrived);
        self.remove_departed(departing, &mut errors).await;
        self.write_translations(want, &mut errors);
        self.write_egress(want, &mut errors);
        self.forget_peers(want, &mut errors);
        self.record_version(want, &errors);
        if errors.is_empty() && self.leftovers.due(want.version) {
            let swept = self.sweep_leftovers().await;
            if swept.is_empty() {
                self.leftovers = Leftovers::Swept;
            }
            // Not this version's errors: reported, and the sweep is tried again next time.
            for e in swept {
                warn!(error = %e, "removing what an earlier agent left");
            }
        }
        errors
    }

    /// The connections of local container `ip` have been dumped (or are back, `false`): from
    /// now on what the old copy emits is dropped (`frozen_source`), at once.
    pub fn mark_dumped(&mut self, ip: Ipv4Addr, dumped: bool) {
        mark(&mut self.applied.dumped, ip, dumped);
        self.refresh_drop_egress(ip);
    }

    /// Container `ip` is being checkpointed by CRIU here (`true`), or no longer is: see
    /// [`Applied::silenced`]. Takes effect on the next FORWARD entry (the freeze), or at once
    /// if the entry already forwards.
    pub fn silence_on_freeze(&mut self, ip: Ipv4Addr, on: bool) {
        mark(&mut self.applied.silenced, ip, on);
        self.refresh_drop_egress(ip);
    }

    /// Container `ip`'s restored tree here is fenced (`true`) or no longer is: see
    /// [`Applied::fenced`]. Takes effect at once on its `HOLD` entry.
    pub fn fence_egress(&mut self, ip: Ipv4Addr, on: bool) {
        mark(&mut self.applied.fenced, ip, on);
        self.refresh_drop_egress(ip);
    }

    /// A FORWARD entry drops the old copy's output while it is dumped or silenced, a HOLD
    /// entry a fenced copy's.
    fn refresh_drop_egress(&mut self, ip: Ipv4Addr) {
        if let Err(err) = self.refresh_flags(ip) {
            warn!(%ip, error = %err, "marking the old copy's output as stale");
        }
    }

    /// Rewrites `ip`'s entry if the flags the agent decides ([`entry_flags`]) changed.
    fn refresh_flags(&mut self, ip: Ipv4Addr) -> Result<(), D::Error> {
        let Some(mut e) = self.applied.endpoints.get(&ip).copied() else {
            return Ok(());
        };
        if !matches!(e.kind, kind::FORWARD | kind::HOLD | kind::LOCAL) {
            return Ok(());
        }
        let before = e.flags;
        e.flags &= !AGENT_FLAGS;
        e.flags |= entry_flags(&self.applied, ip, e.kind);
        if e.flags == before {
            return Ok(());
        }
        self.datapath.set_endpoint(ip, e)?;
        self.applied.endpoints.insert(ip, e);
        Ok(())
    }

    /// Starts draining local container `ip` before its checkpoint: its hold queue opens,
    /// then its `LOCAL` entry gets `HOLD_SYN` (in that order, so the first held SYN finds
    /// its queue). Everything else keeps flowing: the server runs and accepts what is queued.
    /// Returns the drain's number (for [`Node::end_drain_of`]).
    pub fn start_drain(&mut self, ip: Ipv4Addr) -> Result<u64, DrainStartError> {
        let e = *self
            .applied
            .endpoints
            .get(&ip)
            .ok_or(DrainStartError::NoEntry(ip))?;
        if e.kind != kind::LOCAL {
            return Err(DrainStartError::NotLocal { ip, kind: e.kind });
        }
        let hold = self.hold.clone().ok_or(DrainStartError::NoHoldDevice)?;
        if self.applied.draining.contains_key(&ip) {
            return Err(DrainStartError::AlreadyDraining(ip));
        }
        hold.hold(ip);
        self.applied.drains += 1;
        let number = self.applied.drains;
        self.applied.draining.insert(ip, number);
        if let Err(err) = self.refresh_flags(ip) {
            self.applied.draining.remove(&ip);
            // Nothing can have been held: the entry never said so.
            hold.release(ip);
            return Err(DrainStartError::Datapath {
                ip,
                error: err.to_string(),
            });
        }
        info!(%ip, drain = number, "draining: new connections wait in the hold device");
        Ok(number)
    }

    /// [`Node::end_drain`], if the drain on `ip` is still drain `number`.
    pub fn end_drain_of(&mut self, ip: Ipv4Addr, number: u64) -> Option<usize> {
        if self.applied.draining.get(&ip) != Some(&number) {
            return None;
        }
        self.end_drain(ip)
    }

    /// Ends the drain of `ip` if it is still on (no checkpoint took the container away: the
    /// run failed, or the freeze never came): `HOLD_SYN` goes first, then the held SYNs are
    /// written back, in order, to the container here (from-hold delivers by the entry, now
    /// plain `LOCAL`; stragglers in flight to the device are passed on by its reader).
    /// A drain the freeze's switch ended already (see `steps::endpoint_entries`) is left
    /// alone. Returns the frames written back (`None`: no drain was on).
    pub fn end_drain(&mut self, ip: Ipv4Addr) -> Option<usize> {
        self.applied.draining.remove(&ip)?;
        if let Err(err) = self.refresh_flags(ip) {
            // The entry keeps diverting SYNs: keep them queued rather than loop them through
            // the device; the next apply rewrites the entry without the flag and releases.
            warn!(%ip, error = %err, "ending the drain: the entry still holds SYNs");
            return Some(0);
        }
        let Some(h) = self.hold.clone() else {
            return Some(0);
        };
        h.pull();
        let frames = h.release(ip);
        let n = frames.len();
        let failed = steps::reinject(&*h, frames);
        info!(%ip, packets = n, failed, "drain ended here: held SYNs delivered to the container");
        Some(n)
    }

    /// Waits for the paced releases under way; their reports.
    pub async fn paced(&mut self) -> Vec<pace::PaceReport> {
        let mut out = Vec::new();
        for p in std::mem::take(&mut self.pacers) {
            match p.await {
                Ok(r) => out.push(r),
                Err(e) => warn!(error = %e, "a paced release"),
            }
        }
        out
    }

    /// Removes every container this agent built (at shutdown). Keeps going on errors.
    pub async fn remove_containers(&mut self) {
        let ips: Vec<Ipv4Addr> = self.applied.containers.keys().copied().collect();
        for ip in ips {
            for e in self.teardown(ip).await {
                warn!(error = %e, "removing container at shutdown");
            }
            self.applied.containers.remove(&ip);
        }
    }
}
