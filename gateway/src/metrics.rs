//! The gateway's Prometheus metrics (`GET /metrics`, OpenMetrics text from prometheus-client):
//! registry gauges set at each scrape, the coordinator's step counters and apply-time
//! histogram, and the API's request counter. Names and labels are what dashboards, the lab
//! and the tests read (`ferry_gateway_*`; counters end in `_total`).

use std::{sync::atomic::AtomicU64, time::Instant};

use ferry_api::{MigrationPhase, MigrationStepKind};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry as Prometheus,
};

/// Upper bounds (seconds) of the step apply-time histogram.
const APPLY_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Results counted by `ferry_gateway_migration_steps_total`.
pub const RESULTS: [&str; 6] = [
    "ok",
    "unchanged",
    "refused",
    "rolled_back",
    "needs_attention",
    "error",
];

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnectionLabel {
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepResult {
    step: &'static str,
    result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepLabel {
    step: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteStatus {
    route: String,
    status: u16,
}

/// The registry's state at a scrape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RegistryGauges {
    pub hosts: usize,
    pub endpoints: usize,
    pub public_mappings: usize,
    pub version: u64,
    pub hosts_in_sync: usize,
    pub hosts_connected: usize,
    /// Live migrations in the snapshot, by phase (prepared, frozen, released).
    pub migrations: [(MigrationPhase, usize); 3],
}

/// Every metric of the gateway, in the order they are exposed.
#[derive(Debug)]
pub struct Metrics {
    registry: Prometheus,
    started: Instant,
    uptime: Gauge<f64, AtomicU64>,
    hosts: Gauge,
    endpoints: Gauge,
    public_mappings: Gauge,
    version: Gauge,
    hosts_in_sync: Gauge,
    hosts_connected: Gauge,
    migrations: Family<PhaseLabel, Gauge>,
    steps: Family<StepResult, Counter>,
    apply: Family<StepLabel, Histogram, fn() -> Histogram>,
    requests: Family<RouteStatus, Counter>,
    connections: Family<ConnectionLabel, Counter>,
    watch_answers: Family<KindLabel, Counter>,
    watch_bytes: Family<KindLabel, Counter>,
    /// Store outcomes of changes: conflict (another gateway won the version), unavailable,
    /// remote (another gateway's change applied here).
    store_events: Family<KindLabel, Counter>,
    /// Seconds since this gateway last heard etcd's quorum, once it counts as cut off (0:
    /// in touch, or the file store).
    cut_off: Gauge<f64, AtomicU64>,
}

/// `ferry_gateway_store_events_total{kind}`.
pub const STORE_EVENTS: [&str; 6] = [
    "conflict",
    "unavailable",
    "remote",
    "cut_off",
    "handed_over",
    "sent_away",
];

/// The kinds of watch answers (`ferry_gateway_watch_answers_total{kind}`).
pub const WATCH_KINDS: [&str; 2] = ["snapshot", "delta"];

fn apply_histogram() -> Histogram {
    Histogram::new(APPLY_BUCKETS)
}

fn count(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut m = Self {
            registry: Prometheus::with_prefix("ferry_gateway"),
            started: Instant::now(),
            uptime: Gauge::default(),
            hosts: Gauge::default(),
            endpoints: Gauge::default(),
            public_mappings: Gauge::default(),
            version: Gauge::default(),
            hosts_in_sync: Gauge::default(),
            hosts_connected: Gauge::default(),
            migrations: Family::default(),
            steps: Family::default(),
            apply: Family::new_with_constructor(apply_histogram),
            requests: Family::default(),
            connections: Family::default(),
            watch_answers: Family::default(),
            watch_bytes: Family::default(),
            store_events: Family::default(),
            cut_off: Gauge::default(),
        };
        let r = &mut m.registry;
        r.register(
            "uptime_seconds",
            "Seconds since the gateway started",
            m.uptime.clone(),
        );
        for (name, help, gauge) in [
            ("hosts", "Registered hosts", &m.hosts),
            ("endpoints", "Registered container endpoints", &m.endpoints),
            ("public_mappings", "Public mappings", &m.public_mappings),
            (
                "registry_version",
                "Registry version (one more per change)",
                &m.version,
            ),
            (
                "hosts_in_sync",
                "Registered hosts whose agent reported the current registry version as applied",
                &m.hosts_in_sync,
            ),
            (
                "hosts_connected",
                "Registered hosts whose agent holds a watch open",
                &m.hosts_connected,
            ),
        ] {
            r.register(name, help, gauge.clone());
        }
        r.register(
            "migrations",
            "Migrations the agents act on, by phase (released: still forwarding)",
            m.migrations.clone(),
        );
        r.register(
            "migration_steps",
            "Migration steps answered, by step and result (ok, unchanged, refused, rolled_back, \
             needs_attention, error)",
            m.steps.clone(),
        );
        r.register(
            "migration_step_apply_seconds",
            "Time from persisting a migration step to its agents reporting it applied \
             (successful steps that changed something)",
            m.apply.clone(),
        );
        r.register(
            "api_requests",
            "API requests answered, by route (method and path pattern) and HTTP status",
            m.requests.clone(),
        );
        r.register(
            "api_connections",
            "API connections accepted, and refused (closed at once) because their peer had too \
             many open (refused_per_peer) or the server had (refused_total), plain HTTP on the TLS \
             port (refused_plaintext), a failed TLS handshake (refused_tls)",
            m.connections.clone(),
        );
        r.register(
            "watch_answers",
            "Watch answers sent to agents, by kind (snapshot: the whole registry; delta: what \
             changed since the agent's version)",
            m.watch_answers.clone(),
        );
        r.register(
            "store_events",
            "The registry's store (etcd): changes another gateway made first (conflict: this \
             one caught up and tried again), changes refused because the store was unavailable, \
             changes of other gateways applied here (remote); while this gateway was cut off \
             from etcd's quorum: changes refused at once (cut_off), runs it stopped driving \
             (handed_over), agents' heartbeats answered with a refusal that sends them to \
             another gateway (sent_away)",
            m.store_events.clone(),
        );
        r.register(
            "store_cut_off_seconds",
            "Seconds since this gateway last heard etcd's quorum, while it counts as cut off \
             (its lease may have lapsed: it drives no run, refuses changes, sends its agents \
             away); 0 while in touch and with the file store",
            m.cut_off.clone(),
        );
        for kind in STORE_EVENTS {
            drop(m.store_events.get_or_create(&KindLabel { kind }));
        }
        r.register(
            "watch_bytes",
            "Bytes of watch answers (JSON bodies) sent to agents, by kind",
            m.watch_bytes.clone(),
        );
        for kind in WATCH_KINDS {
            drop(m.watch_answers.get_or_create(&KindLabel { kind }));
            drop(m.watch_bytes.get_or_create(&KindLabel { kind }));
        }
        // Every step's series exist from the start, at 0.
        for step in MigrationStepKind::ALL {
            for result in RESULTS {
                drop(m.steps.get_or_create(&StepResult {
                    step: step.as_str(),
                    result,
                }));
            }
            drop(m.apply.get_or_create(&StepLabel {
                step: step.as_str(),
            }));
        }
        m
    }

    /// A migration step answered with `result` (one of [`RESULTS`]).
    pub fn count_step(&self, step: MigrationStepKind, result: &'static str) {
        self.steps
            .get_or_create(&StepResult {
                step: step.as_str(),
                result,
            })
            .inc();
    }

    /// How long the agents took to apply a step that changed something.
    pub fn observe_apply(&self, step: MigrationStepKind, seconds: f64) {
        self.apply
            .get_or_create(&StepLabel {
                step: step.as_str(),
            })
            .observe(seconds);
    }

    /// A watch answered with `bytes` of kind `kind` (one of [`WATCH_KINDS`]).
    pub fn count_store(&self, kind: &'static str) {
        self.store_events.get_or_create(&KindLabel { kind }).inc();
    }

    pub fn count_watch(&self, kind: &'static str, bytes: usize) {
        self.watch_answers.get_or_create(&KindLabel { kind }).inc();
        self.watch_bytes
            .get_or_create(&KindLabel { kind })
            .inc_by(u64::try_from(bytes).unwrap_or(u64::MAX));
    }

    /// An API request answered.
    pub fn count_request(&self, route: String, status: u16) {
        self.requests
            .get_or_create(&RouteStatus { route, status })
            .inc();
    }

    /// Brings the connection counters up to the server's `stats`.
    pub fn count_connections(&self, stats: &ferry_api::serve::Stats) {
        for (result, n) in stats.by_result() {
            let c = self.connections.get_or_create(&ConnectionLabel { result });
            c.inc_by(n.saturating_sub(c.get()));
        }
    }

    /// How long this gateway has been cut off from etcd's quorum (`None`: it is not).
    pub fn set_cut_off(&self, since: Option<std::time::Duration>) {
        self.cut_off.set(since.map_or(0.0, |d| d.as_secs_f64()));
    }

    /// The exposition, with the registry's gauges set to `g`.
    pub fn render(&self, g: &RegistryGauges) -> String {
        self.uptime.set(self.started.elapsed().as_secs_f64());
        self.hosts.set(count(g.hosts));
        self.endpoints.set(count(g.endpoints));
        self.public_mappings.set(count(g.public_mappings));
        self.version
            .set(i64::try_from(g.version).unwrap_or(i64::MAX));
        self.hosts_in_sync.set(count(g.hosts_in_sync));
        self.hosts_connected.set(count(g.hosts_connected));
        for (phase, n) in g.migrations {
            self.migrations
                .get_or_create(&PhaseLabel {
                    phase: phase.to_string(),
                })
                .set(count(n));
        }
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_labels_and_values_render() {
        let m = Metrics::new();
        m.count_step(MigrationStepKind::Freeze, "ok");
        m.count_step(MigrationStepKind::Freeze, "ok");
        m.count_step(MigrationStepKind::Prepare, "rolled_back");
        m.observe_apply(MigrationStepKind::Freeze, 0.02);
        m.observe_apply(MigrationStepKind::Freeze, 100.0);
        m.count_request("POST /v1/hosts".into(), 201);
        let out = m.render(&RegistryGauges {
            hosts: 3,
            endpoints: 0,
            public_mappings: 1,
            version: 7,
            hosts_in_sync: 2,
            hosts_connected: 1,
            migrations: [
                (MigrationPhase::Prepared, 1),
                (MigrationPhase::Frozen, 0),
                (MigrationPhase::Released, 2),
            ],
        });
        for want in [
            "# TYPE ferry_gateway_uptime_seconds gauge\n",
            "ferry_gateway_hosts 3\n",
            "ferry_gateway_endpoints 0\n",
            "ferry_gateway_registry_version 7\n",
            "ferry_gateway_migrations{phase=\"prepared\"} 1\n",
            "ferry_gateway_migrations{phase=\"frozen\"} 0\n",
            "ferry_gateway_migrations{phase=\"released\"} 2\n",
            "ferry_gateway_migration_steps_total{step=\"freeze\",result=\"ok\"} 2\n",
            "ferry_gateway_migration_steps_total{step=\"prepare\",result=\"rolled_back\"} 1\n",
            "ferry_gateway_migration_steps_total{step=\"abort\",result=\"error\"} 0\n",
            "ferry_gateway_migration_step_apply_seconds_bucket{le=\"0.01\",step=\"freeze\"} 0\n",
            "ferry_gateway_migration_step_apply_seconds_bucket{le=\"0.025\",step=\"freeze\"} 1\n",
            "ferry_gateway_migration_step_apply_seconds_bucket{le=\"30.0\",step=\"freeze\"} 1\n",
            "ferry_gateway_migration_step_apply_seconds_bucket{le=\"+Inf\",step=\"freeze\"} 2\n",
            "ferry_gateway_migration_step_apply_seconds_count{step=\"freeze\"} 2\n",
            "ferry_gateway_migration_step_apply_seconds_sum{step=\"freeze\"} 100.02\n",
            "ferry_gateway_migration_step_apply_seconds_count{step=\"abort\"} 0\n",
            "ferry_gateway_api_requests_total{route=\"POST /v1/hosts\",status=\"201\"} 1\n",
        ] {
            assert!(out.contains(want), "{want:?} missing from\n{out}");
        }
        assert!(out.ends_with("# EOF\n"), "{out}");
    }
}
