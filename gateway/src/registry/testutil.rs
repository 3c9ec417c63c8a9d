//! Helpers of the registry's and the migration transitions' unit tests.
#![allow(dead_code)]

use std::net::Ipv4Addr;

use ferry_api::{
    EndpointSpec, ErrorCode, HostInfo, HostRole, Migration, MigrationStepKind, Proto, PublicSpec,
};

use super::{Change, IpamPool, NetConfig, Registry, Request};

pub(crate) fn net() -> NetConfig {
    NetConfig {
        overlay_cidr: "10.244.0.0/16".parse().unwrap(),
        overlay6_cidr: None,
        vni: 4242,
        public_cidrs: vec!["203.0.113.128/25".parse().unwrap()],
        forward_grace_ms: 2000,
        ipam: IpamPool::whole("10.244.0.0/16".parse().unwrap()),
    }
}

pub(crate) fn host(name: &str, vtep: &str, overlay: &str) -> HostInfo {
    HostInfo {
        name: name.into(),
        vtep: vtep.parse().unwrap(),
        overlay_ip: overlay.parse().unwrap(),
        role: HostRole::Host,
        active_since: None,
    }
}

pub(crate) fn gw(name: &str, vtep: &str, overlay: &str) -> HostInfo {
    HostInfo {
        role: HostRole::Gateway,
        active_since: None,
        ..host(name, vtep, overlay)
    }
}

pub(crate) fn ep(ip: &str, host: &str) -> EndpointSpec {
    EndpointSpec {
        ip: ip.parse().unwrap(),
        host: host.into(),
        mac: None,
    }
}

pub(crate) fn ep_mac(ip: &str, host: &str, mac: &str) -> EndpointSpec {
    EndpointSpec {
        mac: Some(mac.parse().unwrap()),
        ..ep(ip, host)
    }
}

pub(crate) fn whole(public: &str, container: &str) -> PublicSpec {
    PublicSpec {
        public: public.parse().unwrap(),
        public_port: None,
        container: container.parse().unwrap(),
        container_port: None,
        proto: None,
    }
}

pub(crate) fn port(public: &str, pp: u16, container: &str, cp: u16, proto: Proto) -> PublicSpec {
    PublicSpec {
        public: public.parse().unwrap(),
        public_port: Some(pp),
        container: container.parse().unwrap(),
        container_port: Some(cp),
        proto: Some(proto),
    }
}

/// Two hosts a1, b1 and a gateway gw; endpoints .1.5 on a1 and .2.5 on b1.
pub(crate) fn populated() -> Registry {
    let mut r = Registry::new(net());
    for h in [
        host("a1", "198.18.1.10", "10.244.255.1"),
        host("b1", "198.18.2.10", "10.244.255.3"),
        gw("gw", "198.18.0.10", "10.244.255.254"),
    ] {
        r.apply(Request::RegisterHost(h)).unwrap();
    }
    r.apply(Request::AddEndpoints(vec![
        ep("10.244.1.5", "a1"),
        ep("10.244.2.5", "b1"),
    ]))
    .unwrap();
    assert_eq!(r.version(), 4);
    r
}

/// Applies a request that must fail with `code` and a message containing `want`, and
/// checks that nothing changed.
#[track_caller]
pub(crate) fn refused(r: &mut Registry, req: Request, code: ErrorCode, want: &str) {
    let before = r.clone();
    let e = r.apply(req.clone()).unwrap_err();
    assert_eq!(e.code, code, "{req:?}: {e}");
    assert!(
        e.message.contains(want),
        "{req:?}: {:?} lacks {want:?}",
        e.message
    );
    assert_eq!(*r, before, "a refused request changed the registry");
}

// ---- migrations

pub(crate) const T0: u64 = 1_000_000;

pub(crate) fn ip(s: &str) -> Ipv4Addr {
    s.parse().unwrap()
}

pub(crate) fn prepare(c: &str, to: &str, now_ms: u64) -> Request {
    Request::PrepareMigration {
        container: ip(c),
        to: to.into(),
        now_ms,
        run: false,
    }
}

pub(crate) fn step(id: &str, step: MigrationStepKind, now_ms: u64) -> Request {
    Request::StepMigration {
        id: id.into(),
        step,
        now_ms,
        expect: None,
    }
}

pub(crate) fn freeze(id: &str, now_ms: u64) -> Request {
    step(id, MigrationStepKind::Freeze, now_ms)
}
pub(crate) fn release(id: &str, now_ms: u64) -> Request {
    step(id, MigrationStepKind::Release, now_ms)
}
pub(crate) fn abort(id: &str, now_ms: u64) -> Request {
    step(id, MigrationStepKind::Abort, now_ms)
}

/// Applies a request that must change the registry by exactly one version; its migration.
#[track_caller]
pub(crate) fn changed(r: &mut Registry, req: Request) -> Migration {
    let v = r.version();
    let c = r.apply(req.clone()).unwrap();
    assert_eq!(r.version(), v + 1, "{req:?}: {c:?}");
    match c {
        Change::MigrationPrepared { migration, .. }
        | Change::MigrationStepped { migration, .. } => migration,
        other => panic!("{req:?}: {other:?}"),
    }
}

/// Applies a request that must answer the migration unchanged: registry untouched.
#[track_caller]
pub(crate) fn unchanged(r: &mut Registry, req: Request) -> Migration {
    let before = r.clone();
    let c = r.apply(req.clone()).unwrap();
    assert_eq!(*r, before, "{req:?} changed the registry");
    match c {
        Change::MigrationUnchanged(m) => m,
        other => panic!("{req:?}: {other:?}"),
    }
}

pub(crate) fn snap_ids(r: &Registry, now: u64) -> Vec<String> {
    r.snapshot(now)
        .migrations
        .into_iter()
        .map(|m| m.id)
        .collect()
}

/// `populated` plus host c1 (no endpoints) and endpoint .1.6 on a1.
pub(crate) fn with_c1() -> Registry {
    let mut r = populated();
    r.apply(Request::RegisterHost(host(
        "c1",
        "198.18.3.10",
        "10.244.255.5",
    )))
    .unwrap();
    r.apply(Request::AddEndpoints(vec![ep("10.244.1.6", "a1")]))
        .unwrap();
    r
}

/// One migration in each phase: m1 released (forwarding), m2 aborted, m3 prepared,
/// m4 frozen.
pub(crate) fn every_phase() -> Registry {
    let mut r = with_c1();
    changed(&mut r, prepare("10.244.1.6", "c1", T0));
    changed(&mut r, freeze("m1", T0 + 1));
    changed(&mut r, release("m1", T0 + 2));
    changed(&mut r, prepare("10.244.2.5", "c1", T0 + 3));
    changed(&mut r, abort("m2", T0 + 4));
    changed(&mut r, prepare("10.244.1.5", "b1", T0 + 5));
    changed(&mut r, prepare("10.244.2.5", "gw", T0 + 6));
    changed(&mut r, freeze("m4", T0 + 7));
    r
}

/// A deterministic pseudo-random sequence (xorshift; no crate needed for a test's dice).
pub(crate) struct Dice(pub(crate) u64);
impl Dice {
    pub(crate) fn roll(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// A random request over three hosts, twelve addresses, four public addresses and the
/// migrations it made (many are refused: the caller skips those).
pub(crate) fn random_request(r: &Registry, d: &mut Dice, now: u64) -> Request {
    let hosts = ["a1", "a2", "b1"];
    let h = hosts[d.roll(3) as usize];
    let ip = format!("10.244.1.{}", 10 + d.roll(12));
    let container = format!("c{}", d.roll(6));
    match d.roll(11) {
        9 => {
            return Request::Allocate(ferry_api::IpamAllocateRequest {
                host: h.to_owned(),
                container_id: container,
                ifname: "eth0".into(),
                ip: (d.roll(2) == 0).then(|| ip.parse().unwrap()),
            });
        }
        10 => {
            return Request::Release(ferry_api::IpamReleaseRequest {
                host: h.to_owned(),
                container_id: container,
                ip: ip.parse().unwrap(),
            });
        }
        _ => {}
    }
    match d.roll(9) {
        0 => Request::RegisterHost(host(
            h,
            &format!("198.18.1.{}", 10 + d.roll(3)),
            &format!("10.244.255.{}", 1 + d.roll(3)),
        )),
        1 => Request::RemoveHost(h.to_owned()),
        2 | 3 => Request::AddEndpoints(vec![ep(&ip, h)]),
        4 => Request::RemoveEndpoint(ip.parse().unwrap()),
        5 => Request::AddPublic(if d.roll(2) == 0 {
            whole(&format!("203.0.113.{}", 130 + d.roll(4)), &ip)
        } else {
            port(
                &format!("203.0.113.{}", 130 + d.roll(4)),
                80,
                &ip,
                80,
                Proto::Tcp,
            )
        }),
        6 => {
            let keys: Vec<_> = r.public.keys().copied().collect();
            match keys.get(d.roll(keys.len().max(1) as u64) as usize) {
                Some(k) => Request::RemovePublic(*k),
                None => Request::RemoveEndpoint(ip.parse().unwrap()),
            }
        }
        7 => Request::PrepareMigration {
            container: ip.parse().unwrap(),
            to: h.to_owned(),
            now_ms: now,
            run: false,
        },
        _ => {
            let ids: Vec<String> = r
                .migrations
                .values()
                .map(|l| l.migration.id.clone())
                .collect();
            match ids.get(d.roll(ids.len().max(1) as u64) as usize) {
                Some(id) => Request::StepMigration {
                    id: id.clone(),
                    step: [
                        MigrationStepKind::Freeze,
                        MigrationStepKind::Release,
                        MigrationStepKind::Abort,
                    ][d.roll(3) as usize],
                    now_ms: now,
                    expect: None,
                },
                None => Request::ExpireMigrations { now_ms: now },
            }
        }
    }
}
