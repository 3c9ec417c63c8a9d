//! Fencing: at most one copy of a container runs, and it is the registry's owner.
//!
//! A migration leaves a stopped copy on each side for a while: the source's dumped tree (CRIU
//! `--leave-stopped`) and the destination's restored tree (`criu restore --leave-stopped`).
//! The runtime marks each one fenced ([`ferry_api::run::Fence`]). Neither side resumes or
//! kills a fenced copy on its own; this module does, and only on the registry's decision as
//! this host has applied it:
//!
//! | side | the registry says | action |
//! |---|---|---|
//! | both | the migration is still `prepared`/`frozen` | wait |
//! | source | anything, while CRIU still serves the dumped tree's pages (lazy memory) | wait |
//! | destination | the endpoint is here (released) | SIGCONT: it owns the container |
//! | destination | the endpoint is elsewhere (aborted) | SIGKILL |
//! | source | the endpoint is here (aborted) | repair off, SIGCONT: it owns the container again |
//! | source | the endpoint is elsewhere, migration released | SIGKILL once the destination says its copy runs (its peer API) |
//! | source | the endpoint is elsewhere, migration gone (its grace over) | SIGKILL |
//!
//! Because the decision is one persisted registry transition (released xor aborted), the two
//! sides can never both resume. Because each acts only on what it applied, a host that was
//! down or cut off acts when it catches up. [`reconcile`] runs after every applied snapshot
//! (before the agent reports the version, so "applied release" means "the copy runs") and
//! every [`TICK`] (the source's confirmation, trees left stopped by a dead agent).

use std::{net::Ipv4Addr, sync::Arc, time::Duration};

use ferry_api::{
    MigrationPhase, Snapshot,
    run::{ContainerProcess, FenceSide},
    transport::Request,
};
use tokio::sync::Mutex;
use tracing::{info, warn};

use crate::{node::Node, runtime::Runtime};

/// How often fenced copies are looked at without a new snapshot.
pub const TICK: Duration = Duration::from_millis(200);

/// Is `pid` stopped by a signal (`T` in /proc/PID/stat; not `t`, a tracer's stop: CRIU may
/// still be dumping it)?
fn stopped(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|t| {
            t.rfind(')')
                .map(|i| t[i + 1..].trim_start().starts_with('T'))
        })
        .unwrap_or(false)
}

/// What to do with one fenced copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Undecided, or decided but not yet applied here.
    Wait,
    /// This copy owns the container: run it.
    Resume,
    /// Another host owns it: kill this copy now.
    Kill,
    /// Another host owns it: kill this copy once that host says its copy runs.
    KillWhenRunsOn { host: String, vtep: Ipv4Addr },
}

/// The decision for a fenced copy of `p.container` on host `me`, from the snapshot this host
/// has applied (pure).
pub fn verdict(me: &str, p: &ContainerProcess, snap: &Snapshot) -> Verdict {
    let Some(fence) = &p.fenced else {
        return Verdict::Wait;
    };
    let ip = p.container;
    if snap
        .migrations
        .iter()
        .any(|m| m.container == ip && m.phase.is_active() && m.id == fence.migration)
    {
        return Verdict::Wait;
    }
    let owner = snap.endpoints.iter().find(|e| e.ip == ip).map(|e| &e.host);
    if owner.is_some_and(|h| h == me) {
        // Released to this destination, or aborted back to this source.
        return Verdict::Resume;
    }
    match (fence.side, owner) {
        (FenceSide::Destination, _) | (FenceSide::Source, None) => Verdict::Kill,
        (FenceSide::Source, Some(owner)) => {
            let released = snap.migrations.iter().any(|m| {
                m.id == fence.migration && m.phase == MigrationPhase::Released && &m.to == owner
            });
            let vtep = snap.hosts.iter().find(|h| &h.name == owner).map(|h| h.vtep);
            match (released, vtep) {
                (true, Some(vtep)) => Verdict::KillWhenRunsOn {
                    host: owner.clone(),
                    vtep,
                },
                _ => Verdict::Kill,
            }
        }
    }
}

/// Whether a fenced copy resumes before this host applies `snap` ([`Fencing::resume_before_release`]):
/// a destination's copy that `snap` makes the owner (its migration released here). Its entry
/// still says `HOLD` for the moment until the apply releases it; an aborted source's copy
/// waits for its apply as before (its sockets are in repair mode until its entry is `LOCAL`
/// again).
pub fn resumes_before_release(me: &str, p: &ContainerProcess, snap: &Snapshot) -> bool {
    p.fenced
        .as_ref()
        .is_some_and(|f| f.side == FenceSide::Destination)
        && verdict(me, p, snap) == Verdict::Resume
}

/// What [`reconcile`] needs.
pub struct Fencing {
    pub host: String,
    pub node: Arc<Mutex<Node>>,
    pub runtime: Runtime,
    /// The peer API's port (the same on every agent) and token, to ask an owner whether its
    /// copy runs.
    pub peer_port: u16,
    pub token: Option<String>,
}

impl Fencing {
    /// Acts on every fenced copy whose decision this host has applied. Never holds the node
    /// lock across a system call that waits.
    pub async fn reconcile(&self) {
        let fenced = self.runtime.fenced();
        let snap = {
            let node = self.node.lock().await;
            match &node.registry {
                // Only a snapshot this host applied: a resumed copy must find its entry LOCAL.
                Some(s) if node.applied.version == s.version => s.clone(),
                _ => return,
            }
        };
        self.resume_stranded(&snap).await;
        // A fenced copy is past its CRIU operation (fenced after the dump, after the restore),
        // so a claim still held (the source still streaming images to a destination that is
        // cut off) does not delay the decision.
        for p in fenced {
            // A dumped tree whose memory CRIU still serves (lazy memory) is CRIU's until the
            // last page went: killing it or resuming it now would take pages from the copy
            // that runs.
            if self.runtime.is_serving_pages(p.container) {
                continue;
            }
            let v = verdict(&self.host, &p, &snap);
            if v != Verdict::Wait {
                self.act(&p, v).await;
            }
        }
    }

    /// Whether any copy here is fenced (a registry change may then make it the owner).
    pub fn any_fenced(&self) -> bool {
        !self.runtime.fenced().is_empty()
    }

    /// Resumes the destination copies that `snap` releases here, before the apply that
    /// releases them (called without the node lock): the held packets are then written back
    /// to a copy that runs and reads its sockets. Released the other way round, the copy
    /// stayed stopped for the rest of the apply and the reconcile (about 10 ms), while its
    /// `LOCAL` entry already let live datagrams in: at 100 Mbit/s, enough to overrun a UDP
    /// socket's default buffer before the first read (docs/migration.md, "The paced
    /// release"). Its entry says `HOLD` until the apply, without `DROP_EGRESS` (lifted
    /// here): what it sends goes out, what is sent to it waits in the hold, in order.
    pub async fn resume_before_release(&self, snap: &Snapshot) {
        for p in self.runtime.fenced() {
            if resumes_before_release(&self.host, &p, snap) {
                self.act(&p, Verdict::Resume).await;
            }
        }
    }

    async fn act(&self, p: &ContainerProcess, v: Verdict) {
        let (ip, pid) = (p.container, p.pid);
        let Some(fence) = p.fenced.clone() else {
            return;
        };
        let (migration, side) = (fence.migration.as_str(), fence.side.as_str());
        match v {
            Verdict::Wait => {}
            Verdict::Resume => {
                let source = fence.side == FenceSide::Source;
                {
                    let mut node = self.node.lock().await;
                    node.fence_egress(ip, false);
                    if source {
                        node.mark_dumped(ip, false);
                        node.silence_on_freeze(ip, false);
                    }
                }
                // Through its runtime: the source's sockets are still in repair mode (the
                // dump), the destination's tree only waits for SIGCONT.
                match self.runtime.resume_fenced(ip).await {
                    Ok((tasks, conns)) => {
                        self.runtime.unfence(ip);
                        info!(container = %ip, pid, migration, side, runtime = %p.runtime, tasks, connections = conns, "fenced copy resumed: it owns the container");
                    }
                    Err(e) => {
                        warn!(container = %ip, pid, migration, side, error = %e, "resuming the fenced copy failed")
                    }
                }
            }
            Verdict::KillWhenRunsOn { host, vtep } => {
                if self.runs_on(ip, &host, vtep).await {
                    self.kill(ip, pid, migration, side, &format!("it runs on {host}"))
                        .await;
                }
            }
            Verdict::Kill => {
                self.kill(ip, pid, migration, side, "another host owns the container")
                    .await;
                if fence.side == FenceSide::Destination {
                    self.node.lock().await.fence_egress(ip, false);
                }
            }
        }
    }

    /// A tree left stopped by a dump whose agent died before it could fence it (CRIU went on
    /// without it): not fenced, but stopped (`T`) on the host that owns the container, with
    /// no migration of it under way and no CRIU operation on it. The dump's migration was
    /// aborted (the endpoint is here), so it resumes (repair off, SIGCONT).
    async fn resume_stranded(&self, snap: &Snapshot) {
        for p in self.runtime.list() {
            let ip = p.container;
            if !p.running || p.fenced.is_some() || self.runtime.busy(ip) {
                continue;
            }
            let owner = snap
                .endpoints
                .iter()
                .any(|e| e.ip == ip && e.host == self.host);
            let migrating = snap
                .migrations
                .iter()
                .any(|m| m.container == ip && m.phase.is_active());
            // Stopped by a signal, or (a runc container) frozen by the pre-dump hook of a
            // dump whose agent was not there to thaw it.
            let frozen = p.runtime == ferry_api::run::RuntimeKind::Runc
                && crate::runtime::runc::frozen(p.pid);
            if !owner || migrating || !(stopped(p.pid) || frozen) {
                continue;
            }
            let pid = p.pid;
            {
                let mut node = self.node.lock().await;
                node.mark_dumped(ip, false);
                node.silence_on_freeze(ip, false);
            }
            // Through its runtime (repair off, SIGCONT, and a runc container's cgroup thawed).
            match self.runtime.resume_fenced(ip).await {
                Ok((tasks, conns)) => {
                    warn!(container = %ip, pid, tasks, connections = conns, "a stopped tree of a container this host owns, left by an interrupted dump, resumed")
                }
                Err(e) => {
                    warn!(container = %ip, pid, error = %e, "resuming a stranded stopped tree failed")
                }
            }
        }
    }

    async fn kill(&self, ip: Ipv4Addr, pid: i32, migration: &str, side: &str, why: &str) {
        self.runtime.remember_udp_widened(ip, Vec::new());
        match self.runtime.kill_fenced(ip).await {
            Ok(()) => {
                info!(container = %ip, pid, migration, side, why, "fenced copy killed")
            }
            Err(e) => {
                warn!(container = %ip, pid, migration, side, error = %e, "killing the fenced copy")
            }
        }
    }

    /// Does `host`'s agent say container `ip` runs there (not fenced)?
    async fn runs_on(&self, ip: Ipv4Addr, host: &str, vtep: Ipv4Addr) -> bool {
        let addr = std::net::SocketAddr::new(vtep.into(), self.peer_port);
        let mut req = Request::get(format!("/v1/containers/{ip}")).timeout(Duration::from_secs(1));
        if let Some(t) = &self.token {
            req = req.token(t);
        }
        match req.send(addr).await {
            Ok(r) if r.is_success() => serde_json::from_slice::<ContainerProcess>(&r.body)
                .is_ok_and(|c| c.running && c.fenced.is_none()),
            Ok(_) => false,
            Err(e) => {
                tracing::debug!(%host, error = %e, "asking the owner whether the container runs");
                false
            }
        }
    }

    /// Reconciles every [`TICK`] until the task is dropped.
    pub async fn run(self: Arc<Self>) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.reconcile().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_api::{Endpoint, HostInfo, HostRole, MacAddr, Migration, run::Fence};

    const IP: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);

    fn host(name: &str, last: u8) -> HostInfo {
        HostInfo {
            name: name.into(),
            vtep: Ipv4Addr::new(192, 168, 0, last),
            overlay_ip: Ipv4Addr::new(10, 244, 0, last),
            role: HostRole::Host,
            active_since: None,
        }
    }

    fn snap(owner: &str, phase: Option<MigrationPhase>) -> Snapshot {
        Snapshot {
            version: 7,
            overlay_cidr: "10.244.0.0/16".parse().unwrap(),
            overlay6_cidr: None,
            vni: 42,
            hosts: vec![host("a1", 1), host("b1", 2)],
            endpoints: vec![Endpoint {
                ip: IP,
                host: owner.into(),
                mac: MacAddr([0x02, 0, 0, 0, 0, 1]),
            }],
            public: vec![],
            migrations: phase
                .map(|phase| Migration {
                    created_unix_ms: 1,
                    updated_unix_ms: 1,
                    ..Migration::new("m1", IP, "a1", "b1", phase)
                })
                .into_iter()
                .collect(),
        }
    }

    fn copy(side: FenceSide) -> ContainerProcess {
        ContainerProcess {
            container: IP,
            pid: 100,
            argv: vec![],
            origin: "restored".into(),
            running: true,
            ended: None,
            fenced: Some(Fence {
                migration: "m1".into(),
                side,
            }),
            runtime: Default::default(),
            image: None,
        }
    }

    #[test]
    fn only_a_released_destination_resumes_before_its_apply() {
        let released = snap("b1", Some(MigrationPhase::Released));
        assert!(resumes_before_release(
            "b1",
            &copy(FenceSide::Destination),
            &released
        ));
        // Undecided: nobody.
        let frozen = snap("a1", Some(MigrationPhase::Frozen));
        assert!(!resumes_before_release(
            "b1",
            &copy(FenceSide::Destination),
            &frozen
        ));
        // Aborted: the source resumes, but only after its apply; the destination is killed.
        let aborted = snap("a1", None);
        assert!(!resumes_before_release(
            "a1",
            &copy(FenceSide::Source),
            &aborted
        ));
        assert!(!resumes_before_release(
            "b1",
            &copy(FenceSide::Destination),
            &aborted
        ));
        let mut unfenced = copy(FenceSide::Destination);
        unfenced.fenced = None;
        assert!(!resumes_before_release("b1", &unfenced, &released));
    }

    #[test]
    fn undecided_copies_wait_on_both_sides() {
        for phase in [MigrationPhase::Prepared, MigrationPhase::Frozen] {
            let s = snap("a1", Some(phase));
            assert_eq!(verdict("a1", &copy(FenceSide::Source), &s), Verdict::Wait);
            assert_eq!(
                verdict("b1", &copy(FenceSide::Destination), &s),
                Verdict::Wait
            );
        }
    }

    #[test]
    fn released_runs_the_destination_and_kills_the_source_once_confirmed() {
        let s = snap("b1", Some(MigrationPhase::Released));
        assert_eq!(
            verdict("b1", &copy(FenceSide::Destination), &s),
            Verdict::Resume
        );
        assert_eq!(
            verdict("a1", &copy(FenceSide::Source), &s),
            Verdict::KillWhenRunsOn {
                host: "b1".into(),
                vtep: Ipv4Addr::new(192, 168, 0, 2)
            }
        );
        // The grace over, the migration left the snapshot: no need to ask any more.
        let s = snap("b1", None);
        assert_eq!(verdict("a1", &copy(FenceSide::Source), &s), Verdict::Kill);
        assert_eq!(
            verdict("b1", &copy(FenceSide::Destination), &s),
            Verdict::Resume
        );
    }

    #[test]
    fn aborted_runs_the_source_and_kills_the_destination() {
        // An aborted migration leaves the snapshot at once; the endpoint stayed on a1.
        let s = snap("a1", None);
        assert_eq!(verdict("a1", &copy(FenceSide::Source), &s), Verdict::Resume);
        assert_eq!(
            verdict("b1", &copy(FenceSide::Destination), &s),
            Verdict::Kill
        );
    }

    #[test]
    fn never_both_resume() {
        // Whatever the registry says, at most one of the two copies gets Resume.
        let phases = [
            None,
            Some(MigrationPhase::Prepared),
            Some(MigrationPhase::Frozen),
            Some(MigrationPhase::Released),
            Some(MigrationPhase::Aborted),
        ];
        for owner in ["a1", "b1", "c1"] {
            for phase in phases {
                let s = snap(owner, phase);
                let a = verdict("a1", &copy(FenceSide::Source), &s) == Verdict::Resume;
                let b = verdict("b1", &copy(FenceSide::Destination), &s) == Verdict::Resume;
                assert!(!(a && b), "owner {owner}, phase {phase:?}");
            }
        }
    }

    #[test]
    fn a_copy_of_an_older_migration_is_not_kept_by_a_newer_one() {
        // m1 aborted; m2 of the same container is being prepared to b1: b1's m1 copy goes.
        let mut s = snap("a1", Some(MigrationPhase::Prepared));
        s.migrations[0].id = "m2".into();
        assert_eq!(
            verdict("b1", &copy(FenceSide::Destination), &s),
            Verdict::Kill
        );
    }

    #[test]
    fn an_unfenced_tree_is_left_alone() {
        let mut p = copy(FenceSide::Source);
        p.fenced = None;
        assert_eq!(verdict("b1", &p, &snap("a1", None)), Verdict::Wait);
    }
}
