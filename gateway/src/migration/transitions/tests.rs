//! The migration transitions' unit tests (no root, no I/O).

use ferry_api::{Endpoint, ErrorCode, MacAddr, Migration, MigrationPhase, MigrationStepKind};

use crate::migration::transitions::MIGRATION_HISTORY;
use crate::registry::testutil::*;
use crate::registry::{Change, Registry, Request};

#[test]
fn a_migration_goes_prepare_freeze_release_then_leaves_the_snapshot() {
    let mut r = populated();
    let v0 = r.version();
    let m = changed(&mut r, prepare("10.244.1.5", "b1", T0));
    assert_eq!(
        m,
        Migration {
            created_unix_ms: T0,
            updated_unix_ms: T0,
            ..Migration::new("m1", ip("10.244.1.5"), "a1", "b1", MigrationPhase::Prepared)
        }
    );
    let l = r.live_migration("m1").unwrap();
    assert_eq!((l.prepared_version, l.phase_version), (v0 + 1, v0 + 1));
    assert_eq!(r.snapshot(T0).migrations, vec![m.clone()]);
    assert_eq!(r.active_migration(ip("10.244.1.5")).unwrap().migration, m);
    // The endpoint stays on the source until release.
    assert_eq!(r.snapshot(T0).endpoints[0].host, "a1");

    let m = changed(&mut r, freeze("m1", T0 + 100));
    assert_eq!(m.phase, MigrationPhase::Frozen);
    assert_eq!((m.frozen_unix_ms, m.updated_unix_ms), (T0 + 100, T0 + 100));
    let l = r.live_migration("m1").unwrap();
    assert_eq!((l.prepared_version, l.phase_version), (v0 + 1, v0 + 2));
    assert_eq!(r.snapshot(T0).endpoints[0].host, "a1");

    let m = changed(&mut r, release("m1", T0 + 300));
    assert_eq!(m.phase, MigrationPhase::Released);
    assert_eq!(m.released_unix_ms, T0 + 300);
    assert_eq!(m.forward_until_unix_ms, T0 + 300 + 2000);
    // The endpoint moved in the same change: same IP and MAC, host b1.
    let s = r.snapshot(T0 + 300);
    assert_eq!(s.version, v0 + 3);
    assert_eq!(
        s.endpoints[0],
        Endpoint {
            ip: ip("10.244.1.5"),
            host: "b1".into(),
            mac: MacAddr::for_container(ip("10.244.1.5")),
        }
    );
    assert_eq!(s.migrations, vec![m.clone()]);
    assert!(r.active_migration(ip("10.244.1.5")).is_none());
    assert_eq!(r.next_expiry(), Some(T0 + 2300));

    // In the snapshot until forward_until (exclusive), whatever the version.
    assert_eq!(snap_ids(&r, T0 + 2299), ["m1"]);
    assert!(snap_ids(&r, T0 + 2300).is_empty());
    // The timer: nothing to do before the deadline (no new version), then one version.
    let before = r.clone();
    assert_eq!(
        r.apply(Request::ExpireMigrations { now_ms: T0 + 2299 })
            .unwrap(),
        Change::MigrationsExpired(vec![])
    );
    assert_eq!(r, before);
    assert_eq!(
        r.apply(Request::ExpireMigrations { now_ms: T0 + 2300 })
            .unwrap(),
        Change::MigrationsExpired(vec![m.clone()])
    );
    assert_eq!(r.version(), v0 + 4);
    assert!(r.snapshot(T0).migrations.is_empty(), "gone at any time now");
    assert_eq!(r.next_expiry(), None);
    // History: still listed, still answerable.
    assert_eq!(r.all_migrations(), vec![&m]);
    assert_eq!(r.migration("m1"), Some(&m));
    assert!(r.live_migration("m1").is_none());
    assert_eq!(unchanged(&mut r, release("m1", T0 + 5000)), m);
}

#[test]
fn prepare_rules() {
    let mut r = populated();
    use ErrorCode::*;
    for (req, code, want) in [
        (
            prepare("10.244.9.9", "b1", T0),
            UnknownEndpoint,
            "container 10.244.9.9 is not a registered endpoint",
        ),
        (
            prepare("10.244.1.5", "zz", T0),
            UnknownHost,
            "host \"zz\" (destination of 10.244.1.5) is not registered",
        ),
        (
            prepare("10.244.1.5", "a1", T0),
            BadRequest,
            "container 10.244.1.5 is already on host a1: nothing to migrate",
        ),
        (
            prepare("10.244.1.5", "../b1", T0),
            BadRequest,
            "to: host name \"../b1\" contains '.'",
        ),
        (
            prepare("10.244.1.5", "", T0),
            BadRequest,
            "to: host name is empty",
        ),
    ] {
        refused(&mut r, req, code, want);
    }
    let m1 = changed(&mut r, prepare("10.244.1.5", "b1", T0));
    // Repeating the prepare: unchanged (same migration, same version).
    assert_eq!(unchanged(&mut r, prepare("10.244.1.5", "b1", T0 + 50)), m1);
    // At most one active migration per container, whatever the destination.
    refused(
        &mut r,
        prepare("10.244.1.5", "gw", T0),
        Conflict,
        "container 10.244.1.5 is already being migrated: migration m1 (prepared, a1 → b1)",
    );
    // Other containers are independent; the gateway host may be a destination (an
    // endpoint may live there too).
    let m2 = changed(&mut r, prepare("10.244.2.5", "gw", T0));
    assert_eq!((m2.id.as_str(), m2.from.as_str()), ("m2", "b1"));
    changed(&mut r, freeze("m1", T0 + 1));
    refused(
        &mut r,
        prepare("10.244.1.5", "b1", T0),
        BadPhase,
        "migration m1 is frozen: it is already prepared (release or abort it)",
    );
    refused(
        &mut r,
        prepare("10.244.1.5", "gw", T0),
        Conflict,
        "migration m1 (frozen, a1 → b1)",
    );
    // After an abort, a new migration (ids are never reused).
    changed(&mut r, abort("m1", T0 + 2));
    let m3 = changed(&mut r, prepare("10.244.1.5", "b1", T0 + 3));
    assert_eq!(m3.id, "m3");
}

#[test]
fn steps_out_of_order_are_refused_and_change_nothing() {
    let mut r = populated();
    use ErrorCode::*;
    use MigrationStepKind as S;
    changed(&mut r, prepare("10.244.1.5", "b1", T0));
    refused(
        &mut r,
        release("m1", T0),
        BadPhase,
        "migration m1 is prepared: freeze it before release",
    );
    refused(
        &mut r,
        abort("m9", T0),
        UnknownMigration,
        "no migration has id \"m9\"",
    );
    refused(&mut r, freeze("bogus", T0), UnknownMigration, "\"bogus\"");
    refused(
        &mut r,
        step("m1", S::Prepare, T0),
        BadRequest,
        "prepare is POST /v1/migrations",
    );
    // The coordinator's guarded abort: only from the phase it expects.
    refused(
        &mut r,
        Request::StepMigration {
            id: "m1".into(),
            step: S::Abort,
            now_ms: T0,
            expect: Some(MigrationPhase::Frozen),
        },
        BadPhase,
        "migration m1 is prepared now, not frozen: it changed meanwhile",
    );
    changed(&mut r, freeze("m1", T0 + 1));
    unchanged(&mut r, freeze("m1", T0 + 2));
    changed(&mut r, release("m1", T0 + 3));
    unchanged(&mut r, release("m1", T0 + 4));
    refused(
        &mut r,
        freeze("m1", T0),
        BadPhase,
        "migration m1 is released: it is over (to move 10.244.1.5 again, prepare a new migration)",
    );
    refused(
        &mut r,
        abort("m1", T0),
        BadPhase,
        "migration m1 is released: too late to abort; migrate back instead",
    );
    // After an abort, only the abort repeats.
    let m2 = changed(&mut r, prepare("10.244.2.5", "a1", T0));
    let aborted = changed(&mut r, abort(&m2.id, T0 + 10));
    assert_eq!(aborted.phase, MigrationPhase::Aborted);
    assert_eq!(aborted.updated_unix_ms, T0 + 10);
    assert_eq!(unchanged(&mut r, abort("m2", T0 + 11)), aborted);
    for (req, want) in [
        (freeze("m2", T0), "migration m2 is aborted: it is over"),
        (release("m2", T0), "migration m2 is aborted: it is over"),
    ] {
        refused(&mut r, req, BadPhase, want);
    }
}

#[test]
fn abort_from_prepared_and_frozen_leaves_everything_on_the_source() {
    for frozen in [false, true] {
        let mut r = populated();
        let before = r.snapshot(T0);
        changed(&mut r, prepare("10.244.1.5", "b1", T0));
        if frozen {
            changed(&mut r, freeze("m1", T0 + 1));
        }
        let m = changed(&mut r, abort("m1", T0 + 2));
        assert_eq!(m.phase, MigrationPhase::Aborted);
        assert_eq!(m.frozen_unix_ms != 0, frozen);
        let after = r.snapshot(T0);
        assert_eq!(
            after.endpoints, before.endpoints,
            "the endpoint stays on a1"
        );
        assert!(
            after.migrations.is_empty(),
            "an aborted migration leaves the snapshot"
        );
        assert!(r.live_migrations().next().is_none());
        assert_eq!(r.all_migrations(), vec![&m]);
        assert_eq!(r.history_len(), 1);
    }
}

#[test]
fn removals_are_refused_while_a_migration_is_active() {
    let mut r = with_c1();
    use ErrorCode::*;
    changed(&mut r, prepare("10.244.1.5", "c1", T0));
    refused(
        &mut r,
        Request::RemoveEndpoint(ip("10.244.1.5")),
        Conflict,
        "endpoint 10.244.1.5 is being migrated (migration m1, prepared, a1 → c1): abort or \
         finish the migration first",
    );
    refused(
        &mut r,
        Request::RemoveHost("c1".into()),
        Conflict,
        "host c1 is the destination of migration m1 (10.244.1.5, prepared, a1 → c1)",
    );
    refused(
        &mut r,
        Request::RemoveHost("a1".into()),
        Conflict,
        "host a1 is the source of migration m1",
    );
    changed(&mut r, freeze("m1", T0 + 1));
    refused(
        &mut r,
        Request::RemoveEndpoint(ip("10.244.1.5")),
        Conflict,
        "frozen",
    );
    // Other endpoints are not concerned.
    r.apply(Request::RemoveEndpoint(ip("10.244.1.6"))).unwrap();
    // Released and forwarding: the endpoint (now on c1) may go; its migration ends early.
    let m = changed(&mut r, release("m1", T0 + 2));
    assert_eq!(snap_ids(&r, T0 + 2), ["m1"]);
    let c = r.apply(Request::RemoveEndpoint(ip("10.244.1.5"))).unwrap();
    let Change::EndpointRemoved {
        ended_migrations, ..
    } = c
    else {
        panic!("{c:?}")
    };
    assert_eq!(ended_migrations, vec![m]);
    assert!(r.snapshot(T0 + 2).migrations.is_empty());
    assert_eq!(r.history_len(), 1);
    r.apply(Request::RemoveHost("c1".into())).unwrap();
}

#[test]
fn removing_the_forwarding_source_ends_the_grace() {
    let mut r = with_c1();
    r.apply(Request::RemoveEndpoint(ip("10.244.1.6"))).unwrap();
    changed(&mut r, prepare("10.244.1.5", "c1", T0));
    changed(&mut r, freeze("m1", T0));
    let m = changed(&mut r, release("m1", T0));
    // a1 has no endpoints left: it may go, and its forwarding with it.
    let c = r.apply(Request::RemoveHost("a1".into())).unwrap();
    assert_eq!(
        c,
        Change::HostRemoved {
            host: host("a1", "198.18.1.10", "10.244.255.1"),
            ended_migrations: vec![m],
        }
    );
    assert!(r.snapshot(T0).migrations.is_empty());
}

#[test]
fn a_new_migration_ends_the_previous_grace_of_its_container() {
    let mut r = populated();
    changed(&mut r, prepare("10.244.1.5", "b1", T0));
    changed(&mut r, freeze("m1", T0));
    let m1 = changed(&mut r, release("m1", T0));
    // Back to a1 within the grace: a1 is the destination now, b1 the source.
    let v = r.version();
    let c = r.apply(prepare("10.244.1.5", "a1", T0 + 10)).unwrap();
    assert_eq!(r.version(), v + 1);
    let Change::MigrationPrepared { migration, ended } = c else {
        panic!("{c:?}")
    };
    assert_eq!(ended, Some(m1));
    assert_eq!(
        (migration.from.as_str(), migration.to.as_str()),
        ("b1", "a1")
    );
    assert_eq!(snap_ids(&r, T0 + 10), ["m2"], "one migration per container");
    assert_eq!(r.next_expiry(), None);
}

#[test]
fn snapshots_are_deterministic_and_sorted() {
    let build = || {
        let mut r = with_c1();
        for (c, to) in [
            ("10.244.1.5", "b1"),
            ("10.244.2.5", "c1"),
            ("10.244.1.6", "gw"),
        ] {
            changed(&mut r, prepare(c, to, T0));
        }
        changed(&mut r, freeze("m2", T0 + 5));
        changed(&mut r, freeze("m3", T0 + 5));
        changed(&mut r, release("m3", T0 + 10));
        r
    };
    let (a, b) = (build(), build());
    assert_eq!(a, b);
    for t in [T0, T0 + 2009, T0 + 2010, T0 + 99_999] {
        assert_eq!(a.snapshot(t), b.snapshot(t));
        assert_eq!(a.snapshot(t), a.snapshot(t));
    }
    assert_eq!(snap_ids(&a, T0 + 2009), ["m1", "m2", "m3"]);
    assert_eq!(snap_ids(&a, T0 + 2010), ["m1", "m2"]);
    assert_eq!(
        a.migration_counts(T0 + 2009),
        [
            (MigrationPhase::Prepared, 1),
            (MigrationPhase::Frozen, 1),
            (MigrationPhase::Released, 1)
        ]
    );
    assert_eq!(
        a.migration_counts(T0 + 2010)[2],
        (MigrationPhase::Released, 0)
    );
    assert_eq!(a.next_expiry_after(T0 + 2009), Some(T0 + 2010));
    assert_eq!(a.next_expiry_after(T0 + 2010), None);
    // Numeric order, not text order: m10 after m9.
    let mut r = populated();
    for i in 0..10u64 {
        changed(&mut r, prepare("10.244.1.5", "b1", T0 + i));
        changed(&mut r, abort(&format!("m{}", i + 1), T0 + i));
    }
    changed(&mut r, prepare("10.244.1.5", "b1", T0 + 20));
    let ids: Vec<&str> = r.all_migrations().iter().map(|m| m.id.as_str()).collect();
    assert_eq!(ids.last(), Some(&"m11"));
    assert_eq!(ids[8..10], ["m9", "m10"]);
}

#[test]
fn history_keeps_the_last_finished_migrations() {
    let mut r = populated();
    let n = MIGRATION_HISTORY as u64 + 5;
    for i in 1..=n {
        r.apply(prepare("10.244.1.5", "b1", T0)).unwrap();
        r.apply(abort(&format!("m{i}"), T0)).unwrap();
    }
    assert_eq!(r.history_len(), MIGRATION_HISTORY);
    assert!(r.migration("m5").is_none());
    assert!(r.migration("m6").is_some());
    let m = changed(&mut r, prepare("10.244.1.5", "b1", T0));
    assert_eq!(m.id, format!("m{}", n + 1));
    // Persisted and reloaded: the cap and the id counter survive.
    let back = Registry::from_persisted(net(), r.to_persisted()).unwrap();
    assert_eq!(back, r);
}
