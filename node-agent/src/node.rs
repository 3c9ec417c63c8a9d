//! The agent's view of what its datapath holds, and the one place that changes it: `apply`
//! moves the datapath from what it holds to a [`Desired`] state, make-before-break, and keeps
//! going past errors (each is reported; what failed is retried with the next apply).

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    sync::{Arc, Mutex},
};

use ferry_common::{Config, Endpoint, NatKey, NatValue, Vtep, flags, ipv4_be, kind};
use ferry_overlay::{datapath::Datapath, netlink::Netlink, tap::Tap};
use serde::Serialize;
use tracing::{info, warn};

use crate::{
    containers::{Built, HostSide},
    hold::HoldQueues,
    plan::{self, Desired, LocalContainer},
};

/// The hold device and the queues behind it, shared with the task that reads the device.
pub struct Hold {
    pub tap: Tap,
    pub queues: Mutex<HoldQueues>,
}

impl Hold {
    fn queues(&self) -> std::sync::MutexGuard<'_, HoldQueues> {
        self.queues.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes frames back into the kernel through the hold device (from-hold delivers them by
    /// the endpoint's entry as it stands now). Returns how many failed.
    fn reinject(&self, frames: impl IntoIterator<Item = Vec<u8>>) -> usize {
        let mut failed = 0;
        for f in frames {
            if let Err(e) = self.tap.write_frame(&f) {
                failed += 1;
                warn!(error = %e, "re-injecting a held packet");
            }
        }
        failed
    }
}

/// What has been applied to the datapath.
#[derive(Debug, Default)]
pub struct Applied {
    pub endpoints: BTreeMap<Ipv4Addr, Endpoint>,
    pub vteps: BTreeMap<Ipv4Addr, Vtep>,
    pub public: BTreeMap<NatKey, NatValue>,
    pub snat: BTreeMap<NatKey, NatValue>,
    pub containers: BTreeMap<Ipv4Addr, (LocalContainer, Built)>,
    pub egress_vtep: Option<Ipv4Addr>,
    /// The registry version applied without errors (0: none yet).
    pub version: u64,
    /// Local containers whose connections have been dumped here (they left with a hand-off
    /// or a checkpoint): whatever the old copy still emits is stale and dropped.
    pub dumped: std::collections::BTreeSet<Ipv4Addr>,
    /// Local containers being checkpointed by CRIU here: their tasks are frozen before the
    /// migration's freeze, so from the freeze on what the old copy emits comes from the
    /// kernel's timers alone (delayed ACKs, window updates, retransmissions — even from
    /// sockets in repair mode), and it is all dropped from the FORWARD switch on. Such a
    /// segment carries a TCP timestamp newer than the one CRIU saves, and the peer would then
    /// discard the restored socket's segments (PAWS) until its RTO fired. Nothing is lost: a
    /// retransmission's data is in the dump (unacknowledged), and the restored socket sends it
    /// again.
    pub silenced: std::collections::BTreeSet<Ipv4Addr>,
}

/// A FORWARD entry drops the old copy's output once its connections are dumped, or from the
/// start while CRIU checkpoints it.
fn egress_flags(applied: &Applied, ip: Ipv4Addr) -> u32 {
    if applied.dumped.contains(&ip) || applied.silenced.contains(&ip) {
        flags::DROP_EGRESS
    } else {
        0
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

pub struct Node {
    pub host: String,
    pub nl: Netlink,
    pub datapath: Arc<Mutex<Datapath>>,
    /// The datapath configuration without the parts the registry decides (egress VTEP).
    pub base_config: Config,
    pub netns_prefix: String,
    pub container_mtu: u32,
    pub overlay_ip: Ipv4Addr,
    pub applied: Applied,
    pub hold: Option<Arc<Hold>>,
    /// ifindex of the hold device (0: none), for its drop counter.
    pub hold_ifindex: u32,
    /// Announcement schedule after a release.
    pub announce: ferry_announce::Schedule,
    /// The registry snapshot last received (applied or not; `applied.version` says). The
    /// hand-off reads hosts and migrations from it.
    pub registry: Option<Arc<ferry_api::Snapshot>>,
}

impl Node {
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

    /// Applies `want`. Returns the errors met (empty: the datapath now matches `want`, and
    /// its version is recorded as applied).
    pub async fn apply(&mut self, want: &Desired) -> Vec<String> {
        let mut errors = Vec::new();
        let datapath = Arc::clone(&self.datapath);
        let dp = || datapath.lock().unwrap_or_else(|p| p.into_inner());
        for ip in &want.orphans {
            warn!(%ip, "endpoint placed on a host the registry does not list; ignored");
        }

        // 1. Allow new peers before anything may send to them.
        let vteps = plan::diff(&self.applied.vteps, &want.vteps);
        for (ip, v) in &vteps.upsert {
            match dp().allow_vtep(*ip, *v) {
                Ok(()) => {
                    self.applied.vteps.insert(*ip, *v);
                }
                Err(e) => errors.push(format!("allowing vtep {ip}: {e}")),
            }
        }

        // 2. Containers leaving, then arriving.
        let have: BTreeMap<Ipv4Addr, LocalContainer> = self
            .applied
            .containers
            .iter()
            .map(|(ip, (c, _))| (*ip, *c))
            .collect();
        let (create, delete) = plan::container_changes(&have, &want.containers);
        // Recreated ones (same address, new MAC) go first; departing ones only after their
        // entry points elsewhere (step 3), so no packet meets a missing entry or a dead veth.
        let (recreate, departing): (Vec<Ipv4Addr>, Vec<Ipv4Addr>) = delete
            .into_iter()
            .partition(|ip| want.containers.contains_key(ip));
        for ip in recreate {
            self.remove_container(ip, &mut errors).await;
        }
        for c in create {
            let side = self.host_side();
            match side.create(&c).await {
                Ok(built) => {
                    self.applied.containers.insert(c.ip, (c, built));
                }
                Err(e) => errors.push(e.to_string()),
            }
        }

        // 3. Endpoint entries: registry-placed ones plus one for every built container.
        let mut endpoints = want.endpoints.clone();
        for (ip, (c, built)) in &self.applied.containers {
            if want.containers.contains_key(ip) {
                let mut e = plan::local_entry(want, c, built.ifindex);
                if e.kind == kind::FORWARD {
                    e.flags |= egress_flags(&self.applied, *ip);
                }
                endpoints.insert(*ip, e);
            }
        }
        // A dumped copy only matters while this host forwards for it.
        self.applied
            .dumped
            .retain(|ip| endpoints.get(ip).is_some_and(|e| e.kind == kind::FORWARD));
        // Holding starts before an entry says HOLD, so the first held packet is queued.
        if let Some(h) = &self.hold {
            for ip in &want.hold {
                h.queues().hold(*ip);
            }
        }
        // Release, in order: while the entry still says HOLD, write the queue back (from-hold
        // delivers HOLD entries to the container; new packets keep queueing behind), until it
        // is empty; only then does the entry become LOCAL. What was in flight to the device at
        // that moment is passed on as it is read.
        let releasing: Vec<Ipv4Addr> = match &self.hold {
            Some(h) => h
                .queues()
                .held()
                .into_iter()
                .filter(|ip| !want.hold.contains(ip))
                .collect(),
            None => Vec::new(),
        };
        if let Some(h) = &self.hold {
            for ip in &releasing {
                let target = endpoints.get(ip).copied();
                // Towards another host (an abort): the entry stays HOLD but carries the
                // target's VTEP, so what is drained goes there while newer packets keep
                // queueing behind it — the order is kept either way.
                if let Some(t) = target
                    && (t.kind == kind::REMOTE || t.kind == kind::FORWARD)
                {
                    let mut draining = self.applied.endpoints.get(ip).copied().unwrap_or_default();
                    draining.kind = kind::HOLD;
                    draining.vtep_be = t.vtep_be;
                    draining.vni = t.vni;
                    if let Err(e) = dp().set_endpoint(*ip, draining) {
                        errors.push(format!("draining {ip}: {e}"));
                    }
                    self.applied.endpoints.insert(*ip, draining);
                }
                if matches!(
                    target.map(|e| e.kind),
                    Some(kind::LOCAL | kind::REMOTE | kind::FORWARD)
                ) {
                    let mut rounds = 0;
                    loop {
                        let frames = h.queues().drain(*ip);
                        if frames.is_empty() || rounds > 64 {
                            break;
                        }
                        rounds += 1;
                        let n = frames.len();
                        let failed = h.reinject(frames);
                        info!(%ip, packets = n, failed, "released held packets");
                    }
                }
            }
        }
        let eps = plan::diff(&self.applied.endpoints, &endpoints);
        for (ip, ep) in &eps.upsert {
            match dp().set_endpoint(*ip, *ep) {
                Ok(()) => {
                    self.applied.endpoints.insert(*ip, *ep);
                }
                Err(e) => errors.push(format!("setting endpoint {ip}: {e}")),
            }
        }
        for ip in &eps.remove {
            match dp().remove_endpoint(*ip) {
                Ok(()) => {
                    self.applied.endpoints.remove(ip);
                }
                Err(e) => errors.push(format!("removing endpoint {ip}: {e}")),
            }
        }

        // Whatever is still queued for a released endpoint follows its new entry: the
        // container (release), or the source host (abort: the entry points there now).
        if let Some(h) = &self.hold {
            for ip in &releasing {
                let frames = h.queues().release(*ip);
                let n = frames.len();
                let failed = h.reinject(frames);
                info!(%ip, packets = n, failed, to = ?endpoints.get(ip).map(|e| e.kind), "hold ended");
                if let Some((c, built)) = self.applied.containers.get(ip)
                    && endpoints.get(ip).map(|e| e.kind) == Some(kind::LOCAL)
                {
                    self.announce(c, built);
                }
            }
        }

        // Departing containers: nothing points at their veths any more.
        for ip in departing {
            self.remove_container(ip, &mut errors).await;
        }

        // 4. Public translation (gateway only; empty elsewhere).
        let public = plan::diff(&self.applied.public, &want.public);
        for (k, v) in &public.upsert {
            match dp().set_public(*k, *v) {
                Ok(()) => {
                    self.applied.public.insert(*k, *v);
                }
                Err(e) => errors.push(format!("setting public entry {k:?}: {e}")),
            }
        }
        for k in &public.remove {
            match dp().remove_public(k) {
                Ok(()) => {
                    self.applied.public.remove(k);
                }
                Err(e) => errors.push(format!("removing public entry {k:?}: {e}")),
            }
        }
        let snat = plan::diff(&self.applied.snat, &want.snat);
        for (k, v) in &snat.upsert {
            match dp().set_snat(*k, *v) {
                Ok(()) => {
                    self.applied.snat.insert(*k, *v);
                }
                Err(e) => errors.push(format!("setting snat entry {k:?}: {e}")),
            }
        }
        for k in &snat.remove {
            match dp().remove_snat(k) {
                Ok(()) => {
                    self.applied.snat.remove(k);
                }
                Err(e) => errors.push(format!("removing snat entry {k:?}: {e}")),
            }
        }

        // 5. Where non-overlay traffic goes.
        if self.applied.egress_vtep != want.egress_vtep {
            let mut cfg = self.base_config;
            cfg.egress_vtep_be = want.egress_vtep.map_or(0, |v| ipv4_be(v.octets()));
            match dp().set_config(cfg) {
                Ok(()) => {
                    info!(egress_vtep = ?want.egress_vtep, "egress gateway set");
                    self.applied.egress_vtep = want.egress_vtep;
                }
                Err(e) => errors.push(format!("setting config: {e}")),
            }
        }

        // 6. Forget peers last.
        for ip in &vteps.remove {
            match dp().disallow_vtep(*ip) {
                Ok(()) => {
                    self.applied.vteps.remove(ip);
                }
                Err(e) => errors.push(format!("disallowing vtep {ip}: {e}")),
            }
        }

        if errors.is_empty() {
            self.applied.version = want.version;
        }
        info!(
            version = want.version,
            endpoints = self.applied.endpoints.len(),
            containers = self.applied.containers.len(),
            vteps = self.applied.vteps.len(),
            public = self.applied.public.len(),
            errors = errors.len(),
            "datapath reconciled"
        );
        errors
    }

    /// "I am here now", from the released container's own interface, on the configured
    /// schedule (first round at once), in the background.
    fn announce(&self, c: &LocalContainer, built: &Built) {
        let ann = ferry_announce::Announcement {
            interface: ferry_overlay::netlink::CONTAINER_IF.to_owned(),
            mac: c.mac.0,
            ipv4: vec![c.ip],
            ipv6: Vec::new(),
        };
        let (netns, schedule, ip) = (built.netns.clone(), self.announce.clone(), c.ip);
        tokio::task::spawn_blocking(move || {
            match ferry_announce::announce_in_netns(&netns, &ann, &schedule, None) {
                Ok(r) => info!(%ip, sent = ?r.sent, rounds = r.rounds_ok, "announced"),
                Err(e) => warn!(%ip, error = %e, "announcing"),
            }
        });
    }

    /// The connections of local container `ip` have been dumped (or are back, `false`): from
    /// now on what the old copy emits is dropped (`frozen_source`), at once.
    pub fn mark_dumped(&mut self, ip: Ipv4Addr, dumped: bool) {
        if dumped {
            self.applied.dumped.insert(ip);
        } else {
            self.applied.dumped.remove(&ip);
        }
        self.refresh_drop_egress(ip);
    }

    /// A FORWARD entry drops the old copy's output while it is dumped or silenced.
    fn refresh_drop_egress(&mut self, ip: Ipv4Addr) {
        let Some(mut e) = self.applied.endpoints.get(&ip).copied() else {
            return;
        };
        if e.kind != kind::FORWARD {
            return;
        }
        e.flags &= !flags::DROP_EGRESS;
        e.flags |= egress_flags(&self.applied, ip);
        let r = self
            .datapath
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .set_endpoint(ip, e);
        match r {
            Ok(()) => {
                self.applied.endpoints.insert(ip, e);
            }
            Err(err) => warn!(%ip, error = %err, "marking the old copy's output as stale"),
        }
    }

    /// Container `ip` is being checkpointed by CRIU here (`true`), or no longer is: see
    /// [`Applied::silenced`]. Takes effect on the next FORWARD entry (the freeze), or at once
    /// if the entry already forwards.
    pub fn silence_on_freeze(&mut self, ip: Ipv4Addr, on: bool) {
        if on {
            self.applied.silenced.insert(ip);
        } else {
            self.applied.silenced.remove(&ip);
        }
        self.refresh_drop_egress(ip);
    }

    /// Removes a container's entry (if it still points at it) and its network side.
    async fn remove_container(&mut self, ip: Ipv4Addr, errors: &mut Vec<String>) {
        let ifindex = self.applied.containers.get(&ip).map(|(_, b)| b.ifindex);
        let points_here = self
            .applied
            .endpoints
            .get(&ip)
            .is_some_and(|e| Some(e.ifindex) == ifindex && e.kind != kind::REMOTE);
        if points_here {
            self.applied.endpoints.remove(&ip);
            let r = self
                .datapath
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove_endpoint(ip);
            if let Err(e) = r {
                errors.push(format!("removing endpoint {ip}: {e}"));
            }
        }
        let side = self.host_side();
        if let Err(e) = side.delete(ip).await {
            errors.push(e.to_string());
        }
        self.applied.containers.remove(&ip);
        info!(%ip, "container removed");
    }

    fn host_side(&self) -> HostSide<'_> {
        HostSide {
            nl: &self.nl,
            datapath: &self.datapath,
            netns_prefix: &self.netns_prefix,
            mtu: self.container_mtu,
            host_overlay_ip: self.overlay_ip,
        }
    }

    /// Removes every container this agent built (at shutdown). Keeps going on errors.
    pub async fn remove_containers(&mut self) {
        let ips: Vec<Ipv4Addr> = self.applied.containers.keys().copied().collect();
        for ip in ips {
            let side = self.host_side();
            if let Err(e) = side.delete(ip).await {
                warn!(error = %e, "removing container at shutdown");
            }
            self.applied.containers.remove(&ip);
        }
    }
}
