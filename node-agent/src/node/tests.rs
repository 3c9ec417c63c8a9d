//! The order of `apply`'s steps, pinned with the recording fake (no root, no kernel).

use std::{net::Ipv4Addr, sync::Arc};

use ferry_api::MacAddr;
use ferry_common::{Config, Endpoint, Vtep, flags, ipv4_be, kind};

use super::{
    Applied, Node,
    fake::{Call, Delivery, Fake},
};
use crate::plan::{Desired, LocalContainer, container_host_if};

const A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 5);
const B: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 6);
/// Another host's VTEP (a migration's source or destination).
const PEER: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 11);
const VNI: u32 = 4242;

type FakeNode = Node<Fake, Fake, Fake, Fake>;

fn node() -> (FakeNode, Fake) {
    let f = Fake::default();
    let n = Node {
        host: "a1".into(),
        datapath: f.clone(),
        net: f.clone(),
        base_config: Config::default(),
        applied: Applied::default(),
        hold: Some(Arc::new(f.clone())),
        hold_ifindex: 0,
        announcer: f.clone(),
        registry: None,
        leftovers: Default::default(),
        udp_pace: std::time::Duration::from_secs(1),
        pacers: Vec::new(),
        facing_override: None,
        planned: None,
    };
    (n, f)
}

fn local(ip: Ipv4Addr) -> LocalContainer {
    LocalContainer {
        ip,
        mac: MacAddr::for_container(ip),
    }
}

fn remote() -> Endpoint {
    Endpoint {
        kind: kind::REMOTE,
        vtep_be: ipv4_be(PEER.octets()),
        vni: VNI,
        ..Endpoint::default()
    }
}

/// Version `version` of a plan with one peer and the local containers `here`.
fn want(version: u64, here: &[Ipv4Addr]) -> Desired {
    let mut d = Desired {
        version,
        vni: VNI,
        ..Desired::default()
    };
    d.vteps.insert(
        PEER,
        Vtep {
            vni: VNI,
            host_id: 2,
        },
    );
    for ip in here {
        d.containers.insert(*ip, local(*ip));
    }
    d
}

fn set(ip: Ipv4Addr, k: u32) -> impl Fn(&Call) -> bool {
    move |c| matches!(c, Call::SetEndpoint { ip: i, kind, .. } if *i == ip && *kind == k)
}

/// Index of the first call `m` matches (panics, with the log, if none does).
fn at(log: &[Call], m: impl Fn(&Call) -> bool) -> usize {
    log.iter()
        .position(m)
        .unwrap_or_else(|| panic!("call not found in {log:#?}"))
}

/// The frames written back through the hold device: (tag, where they went, index in the log).
fn writes(log: &[Call], ip: Ipv4Addr) -> Vec<(u8, Delivery, usize)> {
    log.iter()
        .enumerate()
        .filter_map(|(i, c)| match c {
            Call::Write { dst, tag, to } if *dst == ip => Some((*tag, *to, i)),
            _ => None,
        })
        .collect()
}

fn ifindex(n: &FakeNode, ip: Ipv4Addr) -> u32 {
    n.applied.containers[&ip].1.ifindex
}

/// Applies v1 with `A` built and held here (a migration's destination, prepared).
async fn holding_a() -> (FakeNode, Fake) {
    let (mut n, f) = node();
    let mut w = want(1, &[A]);
    w.hold.insert(A);
    assert!(n.apply(&w).await.is_empty());
    (n, f)
}

#[tokio::test]
async fn a_new_container_gets_its_entry_only_once_its_veth_exists_and_from_container_is_attached() {
    let (mut n, f) = node();
    let errors = n.apply(&want(1, &[A])).await;
    assert!(errors.is_empty(), "{errors:?}");
    let log = f.log();
    let created = at(&log, |c| *c == Call::CreateNet(A));
    let attached = at(&log, |c| *c == Call::Attach(container_host_if(A)));
    let entry = at(&log, set(A, kind::LOCAL));
    assert!(created < attached && attached < entry, "{log:#?}");
    assert_eq!(f.endpoint(A).map(|e| e.ifindex), Some(ifindex(&n, A)));
    assert_eq!(n.applied.version, 1);
}

#[tokio::test]
async fn peers_are_allowed_before_entries_use_them_and_forgotten_after() {
    let (mut n, f) = node();
    let mut w = want(1, &[]);
    w.endpoints.insert(B, remote());
    assert!(n.apply(&w).await.is_empty());
    let log = f.log();
    assert!(at(&log, |c| *c == Call::AllowVtep(PEER)) < at(&log, set(B, kind::REMOTE)));

    f.clear_log();
    assert!(n.apply(&Desired::default()).await.is_empty());
    let log = f.log();
    assert!(
        at(&log, |c| *c == Call::RemoveEndpoint(B)) < at(&log, |c| *c == Call::DisallowVtep(PEER))
    );
}

#[tokio::test]
async fn holding_starts_before_the_entry_says_hold() {
    let (n, f) = holding_a().await;
    let log = f.log();
    assert!(at(&log, |c| *c == Call::Hold(A)) < at(&log, set(A, kind::HOLD)));
    assert_eq!(f.endpoint(A).map(|e| e.kind), Some(kind::HOLD));
    assert!(
        !log.contains(&Call::Announce(A)),
        "nothing announced while held"
    );
    assert_eq!(n.applied.version, 1);
}

#[tokio::test]
async fn release_writes_every_held_frame_back_in_order_before_the_entry_becomes_local() {
    let (mut n, f) = holding_a().await;
    let veth = Delivery::Container(ifindex(&n, A));
    f.held_frames(A, 1..=3);
    // One more arrives (and queues behind) while the first is written back, and one is in
    // flight to the hold device when the entry switches.
    f.arrives_while_writing(A, 4);
    f.in_flight_at_switch(A, 5);
    f.clear_log();

    assert!(n.apply(&want(2, &[A])).await.is_empty());
    let log = f.log();
    let local = at(&log, set(A, kind::LOCAL));
    let w = writes(&log, A);
    let tags: Vec<u8> = w.iter().map(|(t, _, _)| *t).collect();
    assert_eq!(tags, vec![1, 2, 3, 4, 5], "in arrival order: {log:#?}");
    assert!(w.iter().all(|(_, to, _)| *to == veth), "{log:#?}");
    assert!(
        w[..4].iter().all(|(_, _, i)| *i < local),
        "held ones before the switch"
    );
    assert!(w[4].2 > local, "the straggler after it");
    let released = at(&log, |c| *c == Call::Release(A));
    assert!(local < released && released < w[4].2);
    // Announced last, once everything held has been delivered.
    assert_eq!(log.last(), Some(&Call::Announce(A)));
    assert_eq!(n.applied.version, 2);
}

#[tokio::test]
async fn abort_sends_held_frames_back_towards_the_source_then_removes_the_container() {
    let (mut n, f) = holding_a().await;
    f.held_frames(A, 1..=3);
    f.in_flight_at_switch(A, 4);
    f.clear_log();
    // Aborted: the container lives on the source again.
    let mut w = want(2, &[]);
    w.endpoints.insert(A, remote());
    assert!(n.apply(&w).await.is_empty());

    let log = f.log();
    let source = ipv4_be(PEER.octets());
    let draining = at(
        &log,
        |c| matches!(c, Call::SetEndpoint { ip, kind: kind::HOLD, vtep_be, .. } if *ip == A && *vtep_be == source),
    );
    let remote_entry = at(&log, set(A, kind::REMOTE));
    let w = writes(&log, A);
    assert_eq!(
        w.iter().map(|(t, _, _)| *t).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    assert!(
        w.iter().all(|(_, to, _)| *to == Delivery::Vtep(source)),
        "{log:#?}"
    );
    assert!(
        w[..3]
            .iter()
            .all(|(_, _, i)| draining < *i && *i < remote_entry)
    );
    assert!(w[3].2 > remote_entry);
    let detach = at(&log, |c| *c == Call::Detach(container_host_if(A)));
    let delete = at(&log, |c| *c == Call::DeleteNet(A));
    assert!(w[3].2 < detach && detach < delete);
    assert!(!log.contains(&Call::Announce(A)));
    assert!(n.applied.containers.is_empty());
}

/// The device's reader lags (a busy agent, CI's two loaded cores): frames wait in the hold
/// device unread when the release starts. They are the flow's oldest after the queued ones, so
/// they must be written back before the entry switches, or the flow's next packets, no longer
/// held, overtake them (hold.rs saw 36 datagrams reordered after an abort).
#[tokio::test]
async fn frames_not_read_from_the_device_yet_are_written_back_before_the_switch() {
    for abort in [false, true] {
        let (mut n, f) = holding_a().await;
        f.held_frames(A, 1..=3);
        f.unread_in_device(A, 4..=6);
        f.clear_log();
        let w = if abort {
            let mut w = want(2, &[]);
            w.endpoints.insert(A, remote());
            w
        } else {
            want(2, &[A])
        };
        assert!(n.apply(&w).await.is_empty());

        let log = f.log();
        let switch = at(&log, set(A, if abort { kind::REMOTE } else { kind::LOCAL }));
        let w = writes(&log, A);
        assert_eq!(
            w.iter().map(|(t, _, _)| *t).collect::<Vec<_>>(),
            vec![1, 2, 3, 4, 5, 6],
            "abort={abort}: every frame once, in order: {log:#?}"
        );
        assert!(
            w.iter().all(|(_, _, i)| *i < switch),
            "abort={abort}: all before the switch: {log:#?}"
        );
        assert_eq!(f.hold_counters().released, 6);
    }
}

#[tokio::test]
async fn a_removed_container_loses_its_entry_before_its_veth_and_is_detached_before_deletion() {
    let (mut n, f) = node();
    assert!(n.apply(&want(1, &[A])).await.is_empty());
    f.clear_log();
    assert!(n.apply(&want(2, &[])).await.is_empty());
    let log = f.log();
    let entry = at(&log, |c| *c == Call::RemoveEndpoint(A));
    let detach = at(&log, |c| *c == Call::Detach(container_host_if(A)));
    let delete = at(&log, |c| *c == Call::DeleteNet(A));
    assert!(entry < detach && detach < delete, "{log:#?}");
    assert!(!f.is_attached(&container_host_if(A)));
}

#[tokio::test]
async fn a_recreated_container_goes_entry_veth_then_comes_back_veth_entry() {
    let (mut n, f) = node();
    assert!(n.apply(&want(1, &[A])).await.is_empty());
    f.clear_log();
    let mut w = want(2, &[A]);
    w.containers.insert(
        A,
        LocalContainer {
            ip: A,
            mac: MacAddr([0x0e, 1, 2, 3, 4, 5]),
        },
    );
    assert!(n.apply(&w).await.is_empty());
    let log = f.log();
    let order = [
        at(&log, |c| *c == Call::RemoveEndpoint(A)),
        at(&log, |c| *c == Call::Detach(container_host_if(A))),
        at(&log, |c| *c == Call::DeleteNet(A)),
        at(&log, |c| *c == Call::CreateNet(A)),
        at(&log, |c| *c == Call::Attach(container_host_if(A))),
        at(&log, set(A, kind::LOCAL)),
    ];
    assert!(order.is_sorted(), "{log:#?}");
    assert_eq!(f.endpoint(A).map(|e| e.mac), Some([0x0e, 1, 2, 3, 4, 5]));
}

#[tokio::test]
async fn a_failing_step_leaves_the_version_unapplied_and_the_next_apply_retries_it() {
    let (mut n, f) = node();
    f.fail_once(set(A, kind::LOCAL));
    let errors = n.apply(&want(1, &[A])).await;
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(
        errors[0].contains("setting endpoint 10.244.1.5"),
        "{errors:?}"
    );
    assert!(set(A, kind::LOCAL)(&f.failures()[0]));
    assert_eq!(n.applied.version, 0);
    assert_eq!(f.endpoint(A), None);

    f.clear_log();
    assert!(n.apply(&want(1, &[A])).await.is_empty());
    assert_eq!(n.applied.version, 1);
    let log = f.log();
    at(&log, set(A, kind::LOCAL));
    assert!(
        !log.contains(&Call::CreateNet(A)),
        "only what failed is redone"
    );
}

#[tokio::test]
async fn errors_from_one_container_do_not_stop_the_others() {
    let (mut n, f) = node();
    f.fail_once(|c| *c == Call::CreateNet(A));
    let errors = n.apply(&want(1, &[A, B])).await;
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].contains("CreateNet(10.244.1.5)"), "{errors:?}");
    assert_eq!(f.endpoint(B).map(|e| e.kind), Some(kind::LOCAL));
    assert_eq!(f.endpoint(A), None, "no entry for a container not built");
    assert_eq!(n.applied.version, 0);

    assert!(n.apply(&want(1, &[A, B])).await.is_empty());
    assert_eq!(f.endpoint(A).map(|e| e.kind), Some(kind::LOCAL));
    assert_eq!(n.applied.version, 1);
}

#[tokio::test]
async fn a_failed_attach_removes_the_new_veth_and_sets_no_entry() {
    let (mut n, f) = node();
    f.fail_once(|c| *c == Call::Attach(container_host_if(A)));
    let errors = n.apply(&want(1, &[A])).await;
    assert_eq!(errors.len(), 1, "{errors:?}");
    let log = f.log();
    let created = at(&log, |c| *c == Call::CreateNet(A));
    let deleted = log.iter().rposition(|c| *c == Call::DeleteNet(A));
    assert!(deleted.is_some_and(|d| d > created), "{log:#?}");
    assert_eq!(f.endpoint(A), None);
    assert!(n.applied.containers.is_empty());
}

#[tokio::test]
async fn a_forward_entry_drops_the_output_of_a_silenced_or_dumped_copy() {
    let (mut n, f) = node();
    assert!(n.apply(&want(1, &[A])).await.is_empty());
    let forward = |version| {
        let mut w = want(version, &[A]);
        w.forward.insert(A, PEER);
        w
    };
    // Silenced while LOCAL: nothing changes yet; the freeze's FORWARD entry carries it.
    f.clear_log();
    n.silence_on_freeze(A, true);
    assert!(f.log().is_empty());
    assert!(n.apply(&forward(2)).await.is_empty());
    let e = f.endpoint(A).unwrap();
    assert_eq!((e.kind, e.flags), (kind::FORWARD, flags::DROP_EGRESS));
    assert_eq!(e.vtep_be, ipv4_be(PEER.octets()));

    // Not silenced any more: its output goes on, at once; dumped: dropped again, at once.
    n.silence_on_freeze(A, false);
    assert_eq!(f.endpoint(A).map(|e| e.flags), Some(0));
    n.mark_dumped(A, true);
    assert_eq!(f.endpoint(A).map(|e| e.flags), Some(flags::DROP_EGRESS));
    // A later apply keeps it.
    assert!(n.apply(&forward(3)).await.is_empty());
    assert_eq!(f.endpoint(A).map(|e| e.flags), Some(flags::DROP_EGRESS));

    // The grace period over: the container goes, and with it the dumped mark.
    assert!(n.apply(&want(4, &[])).await.is_empty());
    assert!(n.applied.dumped.is_empty());
    assert_eq!(f.endpoint(A), None);
}

#[tokio::test]
async fn shutdown_detaches_before_deleting_every_container() {
    let (mut n, f) = node();
    assert!(n.apply(&want(1, &[A, B])).await.is_empty());
    f.clear_log();
    n.remove_containers().await;
    let log = f.log();
    for ip in [A, B] {
        let detach = at(&log, |c| *c == Call::Detach(container_host_if(ip)));
        assert!(detach < at(&log, |c| *c == Call::DeleteNet(ip)), "{log:#?}");
    }
    assert!(n.applied.containers.is_empty());
}

/// A restarted agent (empty `Applied`, everything an earlier agent left still in place):
/// nothing is removed before the registry's first snapshot; then container `A`, still
/// wanted, is adopted as it is (no delete, no create, no re-attach; its entry rewritten with
/// the same ifindex), while `B`, which the snapshot no longer wants here, and an entry nobody
/// wrote are removed — the entry first, then the container.
#[tokio::test]
async fn a_restarted_agent_adopts_what_is_wanted_and_sweeps_the_rest_after_the_registry() {
    let (mut n, f) = node();
    n.leftovers = super::Leftovers::AfterRegistry;
    const STALE: Ipv4Addr = Ipv4Addr::new(10, 244, 9, 9);
    let local_entry = |ifindex| Endpoint {
        kind: kind::LOCAL,
        ifindex,
        ..Endpoint::default()
    };
    f.left_by_earlier_agent(&local(A), 7, &[(A, local_entry(7)), (STALE, remote())]);
    f.left_by_earlier_agent(&local(B), 8, &[(B, local_entry(8))]);

    // The static configuration alone (version 0): nothing goes.
    assert!(n.apply(&want(0, &[])).await.is_empty());
    assert_eq!(n.leftovers, super::Leftovers::AfterRegistry);
    assert!(f.has_net(A) && f.has_net(B));
    assert!(f.endpoint(STALE).is_some() && f.endpoint(A).is_some());
    assert!(!f.log().iter().any(|c| matches!(
        c,
        Call::DeleteNet(_) | Call::Detach(_) | Call::RemoveEndpoint(_)
    )));

    // The registry's snapshot: A adopted, B and the stale entry swept.
    f.clear_log();
    assert!(n.apply(&want(1, &[A])).await.is_empty());
    let log = f.log();
    assert!(log.contains(&Call::AdoptNet(A)), "{log:#?}");
    assert!(
        !log.iter().any(|c| matches!(
            c,
            Call::CreateNet(ip) | Call::DeleteNet(ip) if *ip == A
        )),
        "{log:#?}"
    );
    assert!(
        !log.contains(&Call::Attach(container_host_if(A))),
        "{log:#?}"
    );
    assert!(
        !log.contains(&Call::Detach(container_host_if(A))),
        "{log:#?}"
    );
    assert_eq!(ifindex(&n, A), 7);
    assert_eq!(
        f.endpoint(A).map(|e| (e.kind, e.ifindex)),
        Some((kind::LOCAL, 7))
    );
    let stale = at(&log, |c| *c == Call::RemoveEndpoint(STALE));
    let b_entry = at(&log, |c| *c == Call::RemoveEndpoint(B));
    let b_net = at(&log, |c| *c == Call::DeleteNet(B));
    assert!(stale < b_net && b_entry < b_net, "{log:#?}");
    assert!(
        log.contains(&Call::Detach(container_host_if(B))),
        "{log:#?}"
    );
    assert!(!f.has_net(B) && f.has_net(A));
    assert_eq!(n.leftovers, super::Leftovers::Swept);
}

/// A container whose MAC changed while no agent ran is not adopted: torn down (its
/// processes with it) and built afresh.
#[tokio::test]
async fn a_container_left_with_another_mac_is_rebuilt_not_adopted() {
    let (mut n, f) = node();
    let mut old = local(A);
    old.mac = MacAddr([0x02, 0, 0, 0, 0, 0x99]);
    f.left_by_earlier_agent(&old, 7, &[]);
    assert!(n.apply(&want(1, &[A])).await.is_empty());
    let log = f.log();
    assert!(!log.contains(&Call::AdoptNet(A)), "{log:#?}");
    let del = at(&log, |c| *c == Call::DeleteNet(A));
    let create = at(&log, |c| *c == Call::CreateNet(A));
    assert!(del < create, "{log:#?}");
    assert_ne!(ifindex(&n, A), 7);
}

/// A drain (before a checkpoint): the queue opens before the entry holds SYNs; an apply
/// meanwhile keeps both; the freeze's switch (FORWARD, the frozen copy silenced) writes the
/// held SYNs back through a HOLD entry carrying the destination's VTEP, in order and before
/// the FORWARD entry, and what was in flight at the switch after it: all to the destination.
#[tokio::test]
async fn a_drained_sources_held_syns_follow_the_switch_to_the_destination() {
    let (mut n, f) = node();
    assert!(n.apply(&want(1, &[A])).await.is_empty());
    f.clear_log();
    assert_eq!(n.start_drain(A), Ok(1));
    let log = f.log();
    let held = at(&log, |c| *c == Call::Hold(A));
    let entry = at(
        &log,
        |c| matches!(c, Call::SetEndpoint { ip, kind: kind::LOCAL, flags: fl, .. } if *ip == A && *fl == flags::HOLD_SYN),
    );
    assert!(held < entry, "{log:#?}");
    assert_eq!(
        n.start_drain(A),
        Err(super::DrainStartError::AlreadyDraining(A))
    );
    f.held_frames(A, 1..=2);

    // An unrelated apply (B arrives): A still drains, its queue kept.
    f.clear_log();
    assert!(n.apply(&want(2, &[A, B])).await.is_empty());
    assert_eq!(f.endpoint(A).map(|e| e.flags), Some(flags::HOLD_SYN));
    assert!(writes(&f.log(), A).is_empty(), "{:#?}", f.log());
    f.held_frames(A, [3]);
    f.in_flight_at_switch(A, 4);

    // The freeze: CRIU checkpoints A (silenced), the switch makes it FORWARD.
    n.silence_on_freeze(A, true);
    f.clear_log();
    let mut w = want(3, &[A, B]);
    w.forward.insert(A, PEER);
    assert!(n.apply(&w).await.is_empty());
    let log = f.log();
    let dest = ipv4_be(PEER.octets());
    let via_hold = at(
        &log,
        |c| matches!(c, Call::SetEndpoint { ip, kind: kind::HOLD, flags: fl, vtep_be } if *ip == A && *vtep_be == dest && *fl == flags::DROP_EGRESS),
    );
    let forward = at(
        &log,
        |c| matches!(c, Call::SetEndpoint { ip, kind: kind::FORWARD, flags: fl, .. } if *ip == A && *fl == flags::DROP_EGRESS),
    );
    let w = writes(&log, A);
    assert_eq!(
        w.iter().map(|(t, _, _)| *t).collect::<Vec<_>>(),
        vec![1, 2, 3, 4],
        "{log:#?}"
    );
    assert!(
        w.iter().all(|(_, to, _)| *to == Delivery::Vtep(dest)),
        "{log:#?}"
    );
    assert!(w[..3].iter().all(|(_, _, i)| via_hold < *i && *i < forward));
    assert!(w[3].2 > forward);
    assert!(n.applied.draining.is_empty());
    assert!(!log.contains(&Call::Announce(A)));
    // Ended by the switch: ending it again is nothing.
    f.clear_log();
    assert_eq!(n.end_drain(A), None);
    assert!(f.log().is_empty());
}

/// A drain that ends without a checkpoint (the run failed, or the queues never emptied): the
/// entry stops holding SYNs first, then the held ones go to the container here, in order
/// (never back into the hold device), and later applies leave the entry plain LOCAL.
#[tokio::test]
async fn a_drain_without_a_checkpoint_delivers_the_held_syns_here() {
    let (mut n, f) = node();
    assert!(n.apply(&want(1, &[A])).await.is_empty());
    let drain = n.start_drain(A).unwrap();
    f.held_frames(A, 1..=3);
    f.in_flight_at_switch(A, 4);
    f.clear_log();
    // Not this drain (an earlier one's owner, late): nothing.
    assert_eq!(n.end_drain_of(A, drain + 1), None);
    assert!(f.log().is_empty());
    assert_eq!(n.end_drain_of(A, drain), Some(4));
    let log = f.log();
    let plain = at(
        &log,
        |c| matches!(c, Call::SetEndpoint { ip, kind: kind::LOCAL, flags: 0, .. } if *ip == A),
    );
    let w = writes(&log, A);
    assert_eq!(
        w.iter().map(|(t, _, _)| *t).collect::<Vec<_>>(),
        vec![1, 2, 3, 4],
        "{log:#?}"
    );
    let veth = Delivery::Container(ifindex(&n, A));
    assert!(
        w.iter().all(|(_, to, i)| *to == veth && *i > plain),
        "{log:#?}"
    );
    assert!(!super::seams::HoldDevice::held(&f).contains(&A));
    f.clear_log();
    assert!(n.apply(&want(2, &[A])).await.is_empty());
    assert_eq!(
        f.endpoint(A).map(|e| (e.kind, e.flags)),
        Some((kind::LOCAL, 0))
    );
    assert!(writes(&f.log(), A).is_empty());
}

#[tokio::test]
async fn only_a_local_entry_can_be_drained() {
    let (mut n, _f) = holding_a().await;
    assert_eq!(
        n.start_drain(A),
        Err(super::DrainStartError::NotLocal {
            ip: A,
            kind: kind::HOLD
        })
    );
    assert_eq!(n.start_drain(B), Err(super::DrainStartError::NoEntry(B)));
    assert!(n.applied.draining.is_empty());
}

/// A fenced restored copy released here: its HOLD entry loses `DROP_EGRESS` before the held
/// frames are written back, so what its kernel answers (ACKs, SYN-ACKs) goes out.
#[tokio::test]
async fn a_release_lets_the_fenced_copy_answer_what_is_written_back() {
    let (mut n, f) = holding_a().await;
    n.fence_egress(A, true);
    assert_eq!(
        f.endpoint(A).map(|e| (e.kind, e.flags)),
        Some((kind::HOLD, flags::DROP_EGRESS))
    );
    f.held_frames(A, 1..=2);
    f.clear_log();
    assert!(n.apply(&want(2, &[A])).await.is_empty());
    let log = f.log();
    let unfenced = at(
        &log,
        |c| matches!(c, Call::SetEndpoint { ip, kind: kind::HOLD, flags: 0, .. } if *ip == A),
    );
    let w = writes(&log, A);
    assert_eq!(w.len(), 2, "{log:#?}");
    assert!(w.iter().all(|(_, _, i)| *i > unfenced), "{log:#?}");
    assert_eq!(
        f.endpoint(A).map(|e| (e.kind, e.flags)),
        Some((kind::LOCAL, 0))
    );
}

/// A release to `LOCAL`: while the entry still holds, TCP segments are written at once, in
/// order, and the UDP datagrams as far as the socket has room (16), in order; the rest (5)
/// after the switch by the paced release, as the socket gets room again — its reader (the
/// copy) runs only 30 ms later — so none is dropped; the apply does not wait for them.
#[tokio::test(start_paused = true)]
async fn a_release_writes_tcp_at_once_and_paces_udp_to_the_socket() {
    use super::{
        fake::{tcp_frame, udp_frame},
        pace::charge,
    };
    let (mut n, f) = holding_a().await;
    let one = charge(udp_frame(A, 5201, 0).len());
    f.udp_socket(5201, 16 * one, one, std::time::Duration::from_millis(30));
    f.held_raw([tcp_frame(A, 1), udp_frame(A, 5201, 2), tcp_frame(A, 3)]);
    f.held_raw((10..30).map(|t| udp_frame(A, 5201, t)));
    // A frame still in flight to the device when the entry switches.
    f.in_flight_at_switch(A, 4);
    f.clear_log();
    let t0 = tokio::time::Instant::now();
    assert!(n.apply(&want(2, &[A])).await.is_empty());
    assert_eq!(
        t0.elapsed(),
        std::time::Duration::ZERO,
        "the apply does not wait"
    );
    let reports = n.paced().await;
    assert_eq!(reports.len(), 1);
    assert_eq!((reports[0].paced, reports[0].late), (5, 0), "{reports:?}");

    let log = f.log();
    let local = at(&log, set(A, kind::LOCAL));
    let w = writes(&log, A);
    let tags: Vec<u8> = w.iter().map(|(t, _, _)| *t).collect();
    let mut udp_tags = vec![2];
    udp_tags.extend(10..30);
    assert_eq!(&tags[..2], [1, 3], "TCP first, in order: {log:#?}");
    assert_eq!(&tags[2..18], &udp_tags[..16], "what fits, in order");
    assert!(
        w[..18].iter().all(|(_, _, i)| *i < local),
        "before the switch"
    );
    assert_eq!(tags[18], 4, "the straggler at the switch, at once");
    assert_eq!(
        &tags[19..],
        &udp_tags[16..],
        "the rest in order, after the switch"
    );
    assert!(w[18..].iter().all(|(_, _, i)| *i > local));
    let socket = f.udp_socket_state(5201);
    assert_eq!(socket.drops, 0, "{socket:?}");
    assert_eq!(socket.got, udp_tags);
    assert_eq!(f.hold_counters().paced, 21);
    assert!(log.contains(&Call::Announce(A)));
}

mod patched {
    //! Plans patched from deltas ([`Node::plan_update`]) against plans made afresh.

    use ferry_api::{
        Endpoint as Record, HostInfo, HostRole, Migration, MigrationPhase, Snapshot, SnapshotDelta,
    };

    use super::*;
    use crate::{config::AgentConfig, node::seams::Datapath as _};

    fn cfg() -> AgentConfig {
        crate::plan::tests::cfg(HostRole::Host)
    }

    fn record(ip: Ipv4Addr, host: &str) -> Record {
        Record {
            ip,
            host: host.into(),
            mac: MacAddr::for_container(ip),
        }
    }

    fn base(cfg: &AgentConfig) -> Snapshot {
        let host = |name: &str, last: u8| HostInfo {
            name: name.into(),
            vtep: Ipv4Addr::new(198, 18, 1, last),
            overlay_ip: Ipv4Addr::new(10, 244, 255, last - 9),
            role: HostRole::Host,
            active_since: None,
        };
        let mut endpoints: Vec<Record> = (0..=255u8)
            .map(|i| record(Ipv4Addr::new(10, 244, 2, i), "a2"))
            .collect();
        endpoints.insert(0, record(A, "a1"));
        Snapshot {
            version: 1,
            overlay_cidr: cfg.overlay_cidr,
            overlay6_cidr: None,
            vni: cfg.vni,
            hosts: vec![host("a1", 10), host("a2", 11)],
            endpoints,
            public: Vec::new(),
            migrations: Vec::new(),
        }
    }

    fn delta(from: &Snapshot) -> SnapshotDelta {
        SnapshotDelta {
            from: from.version,
            version: from.version + 1,
            overlay_cidr: from.overlay_cidr,
            overlay6_cidr: from.overlay6_cidr,
            vni: from.vni,
            hosts: Vec::new(),
            hosts_removed: Vec::new(),
            endpoints: Vec::new(),
            endpoints_removed: Vec::new(),
            public: Vec::new(),
            public_removed: Vec::new(),
            migrations: from.migrations.clone(),
        }
    }

    /// One registry change, made to the delta.
    type Step = Box<dyn Fn(&mut SnapshotDelta)>;

    fn moving(phase: MigrationPhase, pending: bool) -> Vec<Migration> {
        vec![Migration {
            switch_pending: pending,
            ..Migration::new("m1", A, "a1", "a2", phase)
        }]
    }

    /// A registry that changes by deltas — remote endpoints come and go, a local container
    /// arrives, another migrates away through every phase — applied by one agent with plans
    /// patched and by another with plans made afresh: after every change both datapaths hold
    /// the same entries and containers. A write that fails makes the next apply compare
    /// everything (the failed entry is written then).
    #[tokio::test]
    async fn patched_plans_leave_the_datapath_as_plans_made_afresh() {
        let cfg = cfg();
        let (mut inc, fi) = node();
        let (mut full, ff) = node();
        let mut snap = base(&cfg);
        let mut steps: Vec<Step> = vec![
            Box::new(|d| d.endpoints.push(record(Ipv4Addr::new(10, 244, 3, 1), "a2"))),
            Box::new(|d| d.endpoints_removed.push(Ipv4Addr::new(10, 244, 2, 5))),
            Box::new(|d| d.endpoints.push(record(B, "a1"))),
            Box::new(|d| d.migrations = moving(MigrationPhase::Prepared, false)),
            Box::new(|d| d.migrations = moving(MigrationPhase::Frozen, true)),
            Box::new(|d| d.migrations = moving(MigrationPhase::Frozen, false)),
            Box::new(|d| {
                d.migrations = moving(MigrationPhase::Released, false);
                d.endpoints.push(record(A, "a2"));
            }),
            Box::new(|d| d.migrations = Vec::new()),
            Box::new(|d| d.endpoints.push(record(Ipv4Addr::new(10, 244, 3, 2), "a2"))),
            Box::new(|d| d.endpoints.push(record(Ipv4Addr::new(10, 244, 3, 3), "a2"))),
            Box::new(|d| d.endpoints_removed.push(B)),
        ];
        let first = inc.plan_update(&cfg, &snap, None);
        assert!(first.touched.is_none());
        assert!(inc.apply(&first).await.is_empty());
        inc.planned = Some(first);
        assert!(
            full.apply(&full.desired(&cfg, Some(&snap)))
                .await
                .is_empty()
        );
        for (i, step) in steps.drain(..).enumerate() {
            let mut d = delta(&snap);
            step(&mut d);
            let before = snap.migrations.clone();
            d.apply_in_place(&mut snap).unwrap();
            // The write of 10.244.3.2 fails once (the step that adds it).
            if i == 8 {
                fi.fail_once(set(Ipv4Addr::new(10, 244, 3, 2), kind::REMOTE));
            }
            let want = inc.plan_update(&cfg, &snap, Some((&d, &before)));
            // Patched, except right after the apply that failed.
            assert_eq!(want.touched.is_some(), i != 9, "step {i}");
            let errors = inc.apply(&want).await;
            assert_eq!(errors.is_empty(), i != 8, "step {i}: {errors:?}");
            inc.planned = Some(want);
            assert!(
                full.apply(&full.desired(&cfg, Some(&snap)))
                    .await
                    .is_empty()
            );
            let (ki, kf) = (fi.installed(), ff.installed());
            if i == 8 {
                assert!(!ki.endpoints.contains(&Ipv4Addr::new(10, 244, 3, 2)));
                continue;
            }
            // (Not assert_eq: 260 entries printed would bury the message.)
            assert!(inc.applied.endpoints == full.applied.endpoints, "step {i}");
            assert!(ki.endpoints == kf.endpoints, "step {i}");
            assert_eq!(
                inc.applied.containers.keys().collect::<Vec<_>>(),
                full.applied.containers.keys().collect::<Vec<_>>(),
                "step {i}"
            );
        }
        assert_eq!(
            fi.endpoint(A).map(|e| (e.kind, e.vtep_be)),
            Some((kind::REMOTE, ipv4_be(PEER.octets())))
        );
        assert_eq!(
            fi.endpoint(Ipv4Addr::new(10, 244, 3, 2)).map(|e| e.kind),
            Some(kind::REMOTE)
        );
        assert!(fi.endpoint(B).is_none() && !fi.has_net(B));
    }
}

/// A gateway-role host with a moving public IPv6 next hop holds it while it faces the
/// internet and gives it up when it stands by, once per change (not at every apply); a host
/// without one, or not of the gateway role, never touches it.
#[tokio::test]
async fn the_facing_gateway_holds_the_public_ipv6_next_hop_and_a_standby_gives_it_up() {
    let hop: std::net::Ipv6Addr = "2001:db8:ffff::1".parse().unwrap();
    let holds = |f: &Fake| -> Vec<bool> {
        f.log()
            .iter()
            .filter_map(|c| match c {
                Call::HoldPublic6(a, h) if *a == hop => Some(*h),
                _ => None,
            })
            .collect()
    };
    let (mut n, f) = node();
    n.base_config.flags |= ferry_common::config_flags::GATEWAY;
    f.set_public6_next_hop(hop);
    let mut w = want(1, &[]);
    assert!(n.apply(&w).await.is_empty());
    assert_eq!(holds(&f), [true], "facing: held");
    w.version = 2;
    assert!(n.apply(&w).await.is_empty());
    assert_eq!(holds(&f), [true], "unchanged: not again");
    w.version = 3;
    w.public_standby = true;
    assert!(n.apply(&w).await.is_empty());
    assert_eq!(holds(&f), [true, false], "standing by: given up");
    w.version = 4;
    w.public_standby = false;
    assert!(n.apply(&w).await.is_empty());
    assert_eq!(holds(&f), [true, false, true], "facing again: held");

    // Not a gateway-role host: nothing, next hop or not.
    let (mut n, f) = node();
    f.set_public6_next_hop(hop);
    assert!(n.apply(&want(1, &[])).await.is_empty());
    assert!(holds(&f).is_empty());
    // A gateway-role host without one: nothing.
    let (mut n, f) = node();
    n.base_config.flags |= ferry_common::config_flags::GATEWAY;
    assert!(n.apply(&want(1, &[])).await.is_empty());
    assert!(holds(&f).is_empty());
}
