//! The steps of [`Node::apply`], in the order it runs them: peers, build, entries, hold /
//! release / drain, announcements, cleanup. Each step's doc comment says the ordering rule it
//! keeps. Every step keeps going past errors and adds each to `errors`; what failed is not
//! recorded as applied, so the next apply retries it.

use std::{
    collections::BTreeMap,
    fmt::{Debug, Display},
    net::Ipv4Addr,
};

use ferry_common::{Endpoint, config_flags, flags, ipv4_be, kind};
use tracing::{info, warn};

use super::{
    Node, entry_flags,
    pace::{self, UdpHeld},
    seams::{Announcer, ContainerNet, Datapath, HoldDevice},
};
use crate::{
    containers::Built,
    plan::{self, Desired, LocalContainer},
};

/// The UDP datagrams of a release set aside for the paced release, and their sockets'
/// buffers (opened while the entry still held).
pub(super) type Paced<B> = (UdpHeld, B);

/// Most rounds of writing a held queue back before its entry changes: a queue that keeps
/// refilling (a flood) must not stall the apply; what is left follows the new entry.
const MAX_DRAIN_ROUNDS: usize = 65;

impl<D: Datapath, H: HoldDevice, N: ContainerNet, A: Announcer> Node<D, H, N, A> {
    /// Peers first: a new peer's VTEP is allowed before anything may send to it or receive
    /// from it.
    pub(super) fn allow_peers(&mut self, want: &Desired, errors: &mut Vec<String>) {
        let upsert = plan::diff(&self.applied.vteps, &want.vteps).upsert;
        upsert_each(
            &mut self.applied.vteps,
            upsert,
            "allowing vtep",
            errors,
            |ip, v| self.datapath.allow_vtep(ip, v),
        );
    }

    /// Build: recreated containers (same address, new MAC) are removed first; then every new
    /// container's namespace and veth are built and from-container attached to it — before
    /// any entry points at it (entries are written later, and only for containers built).
    /// One container failing does not stop the others. Returns the departing containers: they
    /// are removed only once their entries point elsewhere ([`Self::remove_departed`]).
    pub(super) async fn build_containers(
        &mut self,
        want: &Desired,
        errors: &mut Vec<String>,
    ) -> Vec<Ipv4Addr> {
        // A namespace that vanished under a container still wanted here (a runtime's
        // namespace, deleted with its copy after a checkpoint, and the container migrates
        // back within the forwarding grace): built again below.
        let vanished: Vec<Ipv4Addr> = self
            .applied
            .containers
            .iter()
            .filter(|(ip, (_, b))| want.containers.contains_key(ip) && self.net.vanished(b))
            .map(|(ip, _)| *ip)
            .collect();
        for ip in vanished {
            info!(%ip, "its namespace is gone: building the container again");
            self.remove_container(ip, errors).await;
        }
        let have: BTreeMap<Ipv4Addr, LocalContainer> = self
            .applied
            .containers
            .iter()
            .map(|(ip, (c, _))| (*ip, *c))
            .collect();
        let (create, delete) = plan::container_changes(&have, &want.containers);
        let (recreate, departing): (Vec<Ipv4Addr>, Vec<Ipv4Addr>) = delete
            .into_iter()
            .partition(|ip| want.containers.contains_key(ip));
        for ip in recreate {
            self.remove_container(ip, errors).await;
        }
        for c in create {
            if let Some(built) = self.build_container(&c, errors).await {
                self.applied.containers.insert(c.ip, (c, built));
            }
        }
        departing
    }

    /// One container: adopted as an earlier agent left it if it matches (same namespace,
    /// veth and ifindex: its processes and connections go on, and from-container is attached
    /// already or again); otherwise afresh: whatever an earlier run left under its names is
    /// torn down (its processes killed), the namespace and veth are built (both ends up),
    /// then from-container is attached to the host end; if attaching fails, the network side
    /// is removed again.
    async fn build_container(&self, c: &LocalContainer, errors: &mut Vec<String>) -> Option<Built> {
        match self.net.adopt(c).await {
            Ok(Some(built)) => {
                // Normally attached already (the pinned link was adopted at start).
                if !self.datapath.container_attached(&built.host_if)
                    && let Err(e) = self.datapath.attach_container(&built.host_if)
                {
                    errors.push(format!(
                        "container {}: attaching from-container to adopted {}: {e}",
                        c.ip, built.host_if
                    ));
                    return None;
                }
                return Some(built);
            }
            Ok(None) => {}
            Err(e) => {
                warn!(ip = %c.ip, error = %e, "checking for a container to adopt; building afresh")
            }
        }
        for e in self.teardown(c.ip).await {
            warn!(ip = %c.ip, error = %e, "removing a stale container before creating it");
        }
        let built = match self.net.create(c).await {
            Ok(b) => b,
            Err(e) => {
                errors.push(e.to_string());
                return None;
            }
        };
        if let Err(e) = self.datapath.attach_container(&built.host_if) {
            errors.push(format!(
                "container {}: attaching from-container to {}: {e}",
                c.ip, built.host_if
            ));
            if let Err(e2) = self.net.delete(c.ip).await {
                warn!(ip = %c.ip, error = %e2, "cleaning up after a failed create");
            }
            return None;
        }
        Some(built)
    }

    /// Entries: the registry-placed ones (this host, remote endpoints) plus one for every
    /// built container still wanted here — `LOCAL`, `HOLD` or `FORWARD` (see
    /// [`plan::local_entry`]), a `FORWARD` one with `DROP_EGRESS` while the old copy is
    /// dumped or silenced. A container whose build failed gets none. A dumped copy is
    /// forgotten once this host no longer forwards for it.
    ///
    /// A patched plan ([`Desired::touched`]) after an apply that met no error: only the
    /// addresses it touched, plus every address with local state (containers built or
    /// wanted, held, drained, dumped, silenced, fenced), are compared: the rest of the map
    /// holds what the last plan wanted, which the patch left as it was.
    pub(super) fn endpoint_entries(&mut self, want: &Desired) -> Entries {
        let scope = want
            .touched
            .as_ref()
            .filter(|_| self.applied.complete)
            .map(|t| {
                let a = &self.applied;
                let mut scope = t.endpoints.clone();
                scope.extend(want.containers.keys());
                scope.extend(a.containers.keys());
                scope.extend(a.dumped.iter().chain(&a.silenced).chain(&a.fenced));
                scope.extend(a.draining.keys());
                if let Some(h) = &self.hold {
                    scope.extend(h.held());
                }
                scope
            });
        let mut endpoints = match &scope {
            None => want.endpoints.clone(),
            Some(scope) => scope
                .iter()
                .filter_map(|ip| want.endpoints.get(ip).map(|e| (*ip, *e)))
                .collect(),
        };
        for (ip, (c, built)) in &self.applied.containers {
            if want.containers.contains_key(ip) && !want.staged.contains(ip) {
                let mut e = plan::local_entry(want, c, built.ifindex);
                e.flags |= entry_flags(&self.applied, *ip, e.kind);
                endpoints.insert(*ip, e);
            }
        }
        self.applied
            .dumped
            .retain(|ip| endpoints.get(ip).is_some_and(|e| e.kind == kind::FORWARD));
        // A drain ends when the entry stops being LOCAL (the freeze's switch): the new entry
        // has no HOLD_SYN, and the held SYNs are released (`releasing`) to follow it.
        self.applied
            .draining
            .retain(|ip, _| endpoints.get(ip).is_some_and(|e| e.kind == kind::LOCAL));
        Entries {
            map: endpoints,
            scope,
        }
    }

    /// Hold: queueing starts before any entry says `HOLD`, so the first held packet is
    /// queued.
    pub(super) fn start_holding(&self, want: &Desired) {
        if let Some(h) = &self.hold {
            for ip in &want.hold {
                h.hold(*ip);
            }
        }
    }

    /// The endpoints held until now that `want` holds no more: released (their entry becomes
    /// `LOCAL`) or aborted (it points at another host); and containers drained here whose
    /// entry the freeze's switch makes `FORWARD` (their held SYNs follow it). A container
    /// still being drained keeps its queue.
    pub(super) fn releasing(&self, want: &Desired) -> Vec<Ipv4Addr> {
        self.hold.as_ref().map_or_else(Vec::new, |h| {
            h.held()
                .into_iter()
                .filter(|ip| !want.hold.contains(ip) && !self.applied.draining.contains_key(ip))
                .collect()
        })
    }

    /// Release, first half — drain while the entry still says `HOLD`: the queue is written
    /// back, in order, round after round until it is empty (from-hold delivers by a `HOLD`
    /// entry to the container; packets arriving meanwhile queue behind and go in the next
    /// round); only then may the entry change ([`Self::write_endpoints`]). Towards another
    /// host (an abort; or a drained source at the freeze's switch), the entry first says
    /// `HOLD` with the target's VTEP (and its `DROP_EGRESS`: a frozen source stays silent),
    /// so what is drained goes there, still ahead of what queues behind it. A release to
    /// `LOCAL` lifts a fenced copy's `DROP_EGRESS` first: the registry made it the owner, and
    /// its kernel's answers to what is written back (ACKs, a SYN's SYN-ACK) must go out.
    ///
    /// A release to `LOCAL` of a container built here sets its UDP datagrams aside for the
    /// paced release ([`Self::end_holds`], [`pace`]); the rest is written at once, in order.
    pub(super) async fn drain_held(
        &mut self,
        releasing: &[Ipv4Addr],
        endpoints: &BTreeMap<Ipv4Addr, Endpoint>,
        errors: &mut Vec<String>,
    ) -> BTreeMap<Ipv4Addr, Paced<N::Buffers>> {
        let mut udp = BTreeMap::new();
        let Some(h) = self.hold.clone() else {
            return udp;
        };
        for ip in releasing {
            let target = endpoints.get(ip).copied();
            if let Some(t) = target
                && (t.kind == kind::REMOTE || t.kind == kind::FORWARD)
            {
                let mut draining = self.applied.endpoints.get(ip).copied().unwrap_or_default();
                draining.kind = kind::HOLD;
                draining.vtep_be = t.vtep_be;
                draining.vni = t.vni;
                draining.flags =
                    (draining.flags & !flags::HOLD_SYN) | (t.flags & flags::DROP_EGRESS);
                match self.datapath.set_endpoint(*ip, draining) {
                    Ok(()) => {
                        self.applied.endpoints.insert(*ip, draining);
                    }
                    Err(e) => errors.push(format!("draining {ip}: {e}")),
                }
            }
            if let Some(t) = target
                && t.kind == kind::LOCAL
                && let Some(mut held) = self.applied.endpoints.get(ip).copied()
                && held.kind == kind::HOLD
                && held.flags & flags::DROP_EGRESS != 0
            {
                held.flags &= !flags::DROP_EGRESS;
                match self.datapath.set_endpoint(*ip, held) {
                    Ok(()) => {
                        self.applied.endpoints.insert(*ip, held);
                    }
                    Err(e) => errors.push(format!("releasing {ip}: {e}")),
                }
            }
            if !matches!(
                target.map(|e| e.kind),
                Some(kind::LOCAL | kind::REMOTE | kind::FORWARD)
            ) {
                continue;
            }
            let mut paced = self
                .paces(*ip, target)
                .then(|| self.applied.containers.get(ip))
                .flatten()
                .map(|(_, built)| (UdpHeld::default(), self.net.udp_buffers(built)));
            for _ in 0..MAX_DRAIN_ROUNDS {
                h.pull();
                let frames = h.drain(*ip);
                if frames.is_empty() {
                    break;
                }
                let n = frames.len();
                let frames = match &mut paced {
                    Some((held, _)) => held.split(frames),
                    None => frames.into(),
                };
                let failed = reinject(&*h, frames);
                // While the entry holds, the sockets get what fits in them, in order; the
                // rest waits for the paced release after the switch.
                if let Some((held, buffers)) = &mut paced {
                    pace::write_fitting(&*h, buffers, *ip, held).await;
                }
                info!(%ip, packets = n, failed, "released held packets");
            }
            if let Some(p) = paced {
                udp.insert(*ip, p);
            }
        }
        udp
    }

    /// Whether a release of `ip` towards `target` paces its UDP datagrams: to `LOCAL`, of a
    /// container built here, with pacing on.
    fn paces(&self, ip: Ipv4Addr, target: Option<Endpoint>) -> bool {
        !self.udp_pace.is_zero()
            && target.is_some_and(|t| t.kind == kind::LOCAL)
            && self.applied.containers.contains_key(&ip)
    }

    /// Entries, make-before-break: every new or changed entry is written before any stale one
    /// is removed, so a packet meets the old entry or the new one, never none.
    pub(super) fn write_endpoints(&mut self, entries: &Entries, errors: &mut Vec<String>) {
        let d = match &entries.scope {
            None => plan::diff(&self.applied.endpoints, &entries.map),
            Some(scope) => {
                let mut d = plan::Diff {
                    upsert: Vec::new(),
                    remove: Vec::new(),
                };
                for ip in scope {
                    match (self.applied.endpoints.get(ip), entries.map.get(ip)) {
                        (have, Some(want)) if have != Some(want) => d.upsert.push((*ip, *want)),
                        (Some(_), None) => d.remove.push(*ip),
                        _ => {}
                    }
                }
                d
            }
        };
        let applied = &mut self.applied.endpoints;
        upsert_each(applied, d.upsert, "setting endpoint", errors, |ip, e| {
            self.datapath.set_endpoint(ip, e)
        });
        remove_each(applied, d.remove, "removing endpoint", errors, |ip| {
            self.datapath.remove_endpoint(*ip)
        });
    }

    /// Release, second half — after the switch: holding stops, and what was queued in the
    /// meantime (in flight to the device while the entry changed) is written back to follow
    /// the new entry: to the container (release), or to the source host (abort). Later
    /// stragglers are passed on by the hold device's reader. Returns the containers released
    /// to a `LOCAL` entry here.
    ///
    /// The UDP datagrams set aside ([`Self::drain_held`]) and those among the last frames go
    /// to a paced release of their own ([`pace::release_udp`], in a task: the restored copy
    /// runs, and reads its sockets, only once this apply is done), bounded by `udp_pace`.
    pub(super) fn end_holds(
        &mut self,
        releasing: &[Ipv4Addr],
        endpoints: &BTreeMap<Ipv4Addr, Endpoint>,
        mut udp: BTreeMap<Ipv4Addr, Paced<N::Buffers>>,
    ) -> Vec<Ipv4Addr> {
        let Some(h) = self.hold.clone() else {
            return Vec::new();
        };
        self.pacers.retain(|p| !p.is_finished());
        let mut arrived = Vec::new();
        // What reached the device before the switch and is not read yet goes first.
        h.pull();
        for ip in releasing {
            let frames = h.release(*ip);
            let n = frames.len();
            let target = endpoints.get(ip).copied();
            let frames = match udp.get_mut(ip) {
                Some((held, _)) if self.paces(*ip, target) => held.split(frames),
                _ => frames.into(),
            };
            let failed = reinject(&*h, frames);
            let to = target.map(|e| e.kind);
            info!(%ip, packets = n, failed, ?to, "hold ended");
            if to == Some(kind::LOCAL) && self.applied.containers.contains_key(ip) {
                arrived.push(*ip);
            }
            if let Some((held, mut buffers)) = udp.remove(ip).filter(|(u, _)| !u.is_empty()) {
                info!(%ip, datagrams = held.len(), pace_ms = self.udp_pace.as_millis() as u64, "releasing held UDP datagrams as their sockets have room");
                let (hold, ip, deadline) = (h.clone(), *ip, self.udp_pace);
                self.pacers.push(tokio::spawn(async move {
                    pace::release_udp(&*hold, &mut buffers, ip, held, deadline, pace::POLL).await
                }));
            }
        }
        arrived
    }

    /// Announcements: "I am here now" for the containers released here, only once their
    /// entry is `LOCAL` and every held packet has been written back or handed to the paced
    /// release ([`Self::end_holds`]).
    pub(super) fn announce_arrivals(&self, arrived: &[Ipv4Addr]) {
        for ip in arrived {
            if let Some((c, built)) = self.applied.containers.get(ip) {
                self.announcer.announce(c, built);
            }
        }
    }

    /// Cleanup: departing containers go only now, when no entry points at their veths any
    /// more (the entries were switched above).
    pub(super) async fn remove_departed(
        &mut self,
        departing: Vec<Ipv4Addr>,
        errors: &mut Vec<String>,
    ) {
        for ip in departing {
            self.remove_container(ip, errors).await;
        }
    }

    /// Removes a container: its entry first (if it still points at its veth), then its
    /// network side ([`Self::teardown`]) — no packet is sent to a veth that is going.
    async fn remove_container(&mut self, ip: Ipv4Addr, errors: &mut Vec<String>) {
        let ifindex = self.applied.containers.get(&ip).map(|(_, b)| b.ifindex);
        let points_here = self
            .applied
            .endpoints
            .get(&ip)
            .is_some_and(|e| Some(e.ifindex) == ifindex && e.kind != kind::REMOTE);
        if points_here {
            self.applied.endpoints.remove(&ip);
            if let Err(e) = self.datapath.remove_endpoint(ip) {
                errors.push(format!("removing endpoint {ip}: {e}"));
            }
        }
        errors.extend(self.teardown(ip).await);
        self.applied.containers.remove(&ip);
        info!(%ip, "container removed");
    }

    /// A container's network side goes: from-container detached from the veth first (if
    /// attached), then the veth and the namespace deleted. Keeps going past errors and
    /// returns every one.
    pub(super) async fn teardown(&self, ip: Ipv4Addr) -> Vec<String> {
        let mut errors = Vec::new();
        let host_if = plan::container_host_if(ip);
        if self.datapath.container_attached(&host_if)
            && let Err(e) = self.datapath.detach_container(&host_if)
        {
            errors.push(format!(
                "container {ip}: detaching from-container from {host_if}: {e}"
            ));
        }
        if let Err(e) = self.net.delete(ip).await {
            errors.push(e.to_string());
        }
        errors
    }

    /// What an earlier agent left that the applied state does not have (the apply that
    /// precedes this one wrote everything wanted): map entries — endpoints, VTEPs,
    /// translations — then containers (no entry points at them any more: their processes
    /// killed, then from-container, veth and namespace).
    /// Keeps going past errors and returns them.
    pub(super) async fn sweep_leftovers(&mut self) -> Vec<String> {
        let mut errors = Vec::new();
        let have = self.datapath.installed();
        for ip in have.endpoints {
            if !self.applied.endpoints.contains_key(&ip) {
                info!(%ip, "endpoint entry nobody wants any more: removed");
                if let Err(e) = self.datapath.remove_endpoint(ip) {
                    errors.push(format!("removing stale endpoint {ip}: {e}"));
                }
            }
        }
        for ip in have.vteps {
            if !self.applied.vteps.contains_key(&ip)
                && let Err(e) = self.datapath.disallow_vtep(ip)
            {
                errors.push(format!("disallowing stale vtep {ip}: {e}"));
            }
        }
        for k in have.public {
            if !self.applied.public.contains_key(&k)
                && let Err(e) = self.datapath.remove_public(&k)
            {
                errors.push(format!("removing stale public entry {k:?}: {e}"));
            }
        }
        for k in have.snat {
            if !self.applied.snat.contains_key(&k)
                && let Err(e) = self.datapath.remove_snat(&k)
            {
                errors.push(format!("removing stale snat entry {k:?}: {e}"));
            }
        }
        for ip in self.net.existing().await {
            if !self.applied.containers.contains_key(&ip) {
                info!(%ip, "container left by an earlier agent and not wanted here: removed");
                errors.extend(self.teardown(ip).await);
            }
        }
        errors
    }

    /// Public translation (gateway only; empty elsewhere), both directions: new and changed
    /// entries before stale ones are removed.
    pub(super) fn write_translations(&mut self, want: &Desired, errors: &mut Vec<String>) {
        // A patched plan that left them alone, after an apply that wrote them all.
        if self.applied.complete && want.touched.as_ref().is_some_and(|t| !t.translations) {
            return;
        }
        let d = plan::diff(&self.applied.public, &want.public);
        let applied = &mut self.applied.public;
        upsert_each(applied, d.upsert, "setting public entry", errors, |k, v| {
            self.datapath.set_public(k, v)
        });
        remove_each(applied, d.remove, "removing public entry", errors, |k| {
            self.datapath.remove_public(k)
        });
        let d = plan::diff(&self.applied.snat, &want.snat);
        let applied = &mut self.applied.snat;
        upsert_each(applied, d.upsert, "setting snat entry", errors, |k, v| {
            self.datapath.set_snat(k, v)
        });
        remove_each(applied, d.remove, "removing snat entry", errors, |k| {
            self.datapath.remove_snat(k)
        });
    }

    /// What the registry decides in the configuration: where traffic for outside the overlay
    /// goes (the VTEP of the gateway facing the internet) and, on a gateway-role host, whether
    /// it stands by. A gateway-role host that starts facing the internet announces every
    /// public address from its public interface at once (the internet side's neighbours still
    /// point at the host it takes over from).
    pub(super) fn write_egress(&mut self, want: &Desired, errors: &mut Vec<String>) {
        self.write_public6(want);
        if self.applied.egress_vtep == want.egress_vtep
            && self.applied.public_standby == want.public_standby
        {
            return;
        }
        let mut cfg = self.base_config;
        cfg.egress_vtep_be = want.egress_vtep.map_or(0, |v| ipv4_be(v.octets()));
        if want.public_standby {
            cfg.flags |= config_flags::PUBLIC_STANDBY;
        }
        let took_over = self.applied.public_standby && !want.public_standby;
        match self.datapath.set_config(cfg) {
            Ok(()) => {
                info!(
                    egress_vtep = ?want.egress_vtep,
                    public_standby = want.public_standby,
                    "egress gateway set"
                );
                self.applied.egress_vtep = want.egress_vtep;
                self.applied.public_standby = want.public_standby;
            }
            Err(e) => {
                errors.push(format!("setting config: {e}"));
                return;
            }
        }
        if took_over && cfg.flags & config_flags::GATEWAY != 0 {
            let mut ips: Vec<Ipv4Addr> = want
                .public
                .keys()
                .filter(|k| k.proto == plan::PRESENCE_PROTO)
                .map(|k| Ipv4Addr::from(ferry_common::ipv4_from_be(k.addr_be)))
                .collect();
            ips.sort_unstable();
            ips.dedup();
            info!(
                addresses = ips.len(),
                "facing the internet now: announcing the public addresses"
            );
            self.announcer.announce_public(cfg.public_mac, ips);
        }
    }

    /// Gateway role with a moving IPv6 next hop (`public6_next_hop`): the host facing the
    /// internet holds it (and announces it when it starts to), a standby gives it up, so the
    /// internet's router sends the overlay's public IPv6 to whichever faces it.
    fn write_public6(&mut self, want: &Desired) {
        let Some(addr) = self.announcer.public6_next_hop() else {
            return;
        };
        if self.base_config.flags & config_flags::GATEWAY == 0 {
            return;
        }
        let hold = !want.public_standby;
        if self.applied.public6_held == Some(hold) {
            return;
        }
        info!(address = %addr, hold, "the public IPv6 prefix's next hop: {}", if hold { "held here" } else { "left to the host facing the internet" });
        self.announcer
            .hold_public6(self.base_config.public_mac, addr, hold);
        self.applied.public6_held = Some(hold);
    }

    /// Peers last: a VTEP is disallowed only once no entry points at it any more.
    pub(super) fn forget_peers(&mut self, want: &Desired, errors: &mut Vec<String>) {
        let remove = plan::diff(&self.applied.vteps, &want.vteps).remove;
        remove_each(
            &mut self.applied.vteps,
            remove,
            "disallowing vtep",
            errors,
            |ip| self.datapath.disallow_vtep(*ip),
        );
    }

    /// The version counts as applied only when every step succeeded; otherwise the next
    /// apply retries what failed (the differences are computed again from what was applied).
    pub(super) fn record_version(&mut self, want: &Desired, errors: &[String]) {
        if errors.is_empty() {
            self.applied.version = want.version;
        }
        self.applied.complete = errors.is_empty();
        info!(
            version = want.version,
            endpoints = self.applied.endpoints.len(),
            containers = self.applied.containers.len(),
            vteps = self.applied.vteps.len(),
            public = self.applied.public.len(),
            errors = errors.len(),
            "datapath reconciled"
        );
    }
}

/// The endpoint entries an apply wants ([`Node::endpoint_entries`]).
pub(super) struct Entries {
    /// Every entry wanted (`scope` None), or those of the addresses in `scope`.
    pub map: BTreeMap<Ipv4Addr, Endpoint>,
    /// The addresses compared with what is applied; None: every one.
    pub scope: Option<std::collections::BTreeSet<Ipv4Addr>>,
}

/// Writes frames back through the hold device, in order. Returns how many failed.
pub(super) fn reinject<H: HoldDevice + ?Sized>(
    hold: &H,
    frames: impl IntoIterator<Item = Vec<u8>>,
) -> usize {
    let mut failed = 0;
    for f in frames {
        if let Err(e) = hold.write_frame(&f) {
            failed += 1;
            warn!(error = %e, "re-injecting a held packet");
        }
    }
    failed
}

/// Writes each entry with `write`; records it in `applied` once written, or reports
/// "`doing` `key`: error".
fn upsert_each<K: Ord + Copy + Debug, V: Copy, E: Display>(
    applied: &mut BTreeMap<K, V>,
    upsert: Vec<(K, V)>,
    doing: &str,
    errors: &mut Vec<String>,
    mut write: impl FnMut(K, V) -> Result<(), E>,
) {
    for (k, v) in upsert {
        match write(k, v) {
            Ok(()) => {
                applied.insert(k, v);
            }
            Err(e) => errors.push(format!("{doing} {k:?}: {e}")),
        }
    }
}

/// Removes each key with `remove`; forgets it in `applied` once removed, or reports
/// "`doing` `key`: error".
fn remove_each<K: Ord + Debug, V, E: Display>(
    applied: &mut BTreeMap<K, V>,
    keys: Vec<K>,
    doing: &str,
    errors: &mut Vec<String>,
    mut remove: impl FnMut(&K) -> Result<(), E>,
) {
    for k in keys {
        match remove(&k) {
            Ok(()) => {
                applied.remove(&k);
            }
            Err(e) => errors.push(format!("{doing} {k:?}: {e}")),
        }
    }
}
