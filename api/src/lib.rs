//! ferry's control-plane API (version 1): the JSON types that `ferry` (CLI), `ferry gateway`
//! and `ferry-agent` exchange over HTTP, their validation, and the HTTP client both sides use
//! ([`Client`] for the gateway's API, [`transport`] for any request, e.g. the agents' peer
//! APIs).
//!
//! Routes (all under `/v1`, JSON bodies, `Authorization: Bearer <token>` on everything except
//! `GET /v1/health`):
//!
//! | method | path | body → answer |
//! |---|---|---|
//! | GET | /v1/health | → [`Health`] |
//! | POST | /v1/hosts | [`HostInfo`] → [`HostStatus`] (an agent registers; idempotent) |
//! | GET | /v1/hosts | → `Vec<HostStatus>` |
//! | POST | /v1/hosts/{name}/heartbeat | → [`HostStatus`] (an agent is alive; every 250 ms) |
//! | DELETE | /v1/hosts/{name} | → [`HostStatus`] (refused while endpoints live there) |
//! | POST | /v1/endpoints | [`EndpointsRequest`] → `Vec<Endpoint>` (all or nothing) |
//! | GET | /v1/endpoints | → `Vec<Endpoint>` |
//! | DELETE | /v1/endpoints/{ip} | → [`Endpoint`] |
//! | POST | /v1/public | [`PublicSpec`] → [`PublicMapping`] |
//! | GET | /v1/public | → `Vec<PublicMapping>` |
//! | DELETE | /v1/public/{key} | → [`PublicMapping`] (`key` as [`PublicMapping::key`]) |
//! | GET | /v1/watch?host=NAME&after=N | → [`Snapshot`] as soon as its version ≠ N (or after the long-poll timeout, the current one) |
//! | GET | /v1/watch?host=NAME&after=N&delta=true | → [`WatchUpdate`]: the same, as a [`SnapshotDelta`] from N when the gateway still has what changed since N |
//! | GET | /v1/version | → [`RegistryVersion`] (the registry's current version) |
//! | POST | /v1/migrations[?timeout_ms=N] | [`MigrationRequest`] → [`MigrationStep`] (prepare: 201 new, 200 repeated) |
//! | POST | /v1/migrations/{id}/freeze[?timeout_ms=N] | → [`MigrationStep`] |
//! | POST | /v1/migrations/{id}/release[?timeout_ms=N] | → [`MigrationStep`] |
//! | POST | /v1/migrations/{id}/abort[?timeout_ms=N] | → [`MigrationStep`] |
//! | GET | /v1/migrations[?container=IP][&active=true] | → `Vec<Migration>` (live and history, oldest first) |
//! | GET | /v1/migrations/{id} | → [`Migration`] |
//! | POST | /v1/ipam/allocate | [`IpamAllocateRequest`] → [`IpamAllocation`] (201 new lease, 200 repeated or a migration's address) |
//! | POST | /v1/ipam/release | [`IpamReleaseRequest`] → [`IpamRelease`] (the lease and the host's endpoint, in one change) |
//! | GET | /v1/ipam | → [`IpamStatus`] |
//! | POST | /v1/public/takeover | [`PublicTakeoverRequest`] → [`PublicTakeover`] (another gateway-role host faces the internet; 200 also when it already does) |
//!
//! Errors are `{"error": {"code": "...", "message": "..."}}` ([`ErrorBody`]) with a 4xx/5xx
//! status ([`ErrorCode`] lists the codes); a rejected request changes nothing.
//!
//! Details:
//! - Creating answers 201 (a new host, endpoints, a public mapping); re-registering a host
//!   answers 200 (unchanged: the version does not move; changed vtep/overlay_ip/role: it does).
//! - Every successful change increases the registry version by exactly one and is on disk before
//!   the answer is sent.
//! - `GET /v1/version` is how `ferry sync` and `ferry hosts` learn the version that
//!   [`HostStatus::applied_version`] is compared with (a host is in sync when they are equal).
//! - `watch`: `after` is the version the agent has applied; the gateway records it as the host's
//!   `applied_version` (0 if `after` is newer than the registry — the registry was reset and the
//!   agent has applied nothing of it), then answers at once if the registry's version differs
//!   from `after`, else when it changes, at the long-poll timeout, or at shutdown.
//! - `DELETE /v1/endpoints/{ip}` keeps the public mappings of that IP, so an endpoint can be
//!   moved by removing it and adding it again on another host.
//! - `DELETE /v1/public/{key}`: the key's `/` may be sent as is or as `%2F`.
//! - `GET /metrics` (no token): Prometheus text.
//!
//! IPAM (the CNI plugin's addresses; see docs/architecture.md, "CNI"):
//! - The pool is the gateway's `[ipam] pool` (default: `overlay_cidr`) minus `[ipam] reserved`,
//!   the pool's and the overlay's network and broadcast addresses and every host's overlay
//!   address; an address is free unless a lease, an endpoint or a public mapping holds it. A
//!   new address is the next free one after the last given (round robin, so a freed address is
//!   not handed out again at once). Leases are persisted with the registry.
//! - allocate refuses: an address outside the pool or reserved (400 `invalid_address`), one
//!   held by another container or endpoint or migrating to another host (409 `conflict`,
//!   naming the holder), an exhausted pool (409 `conflict`), an unknown host (404
//!   `unknown_host`).
//! - A host's identity may allocate, register endpoints (`POST /v1/endpoints`), remove them
//!   (`DELETE /v1/endpoints/{ip}`) and release only on itself (403 `forbidden` otherwise); the
//!   operator anything. `GET /v1/ipam` is the operator's.
//!
//! Migrations (the coordinator; the agents learn everything from [`Snapshot::migrations`]):
//! - A migration moves one container endpoint from its host (`from`) to another registered
//!   host (`to`, any role: wherever an endpoint may live, the gateway host included) in steps
//!   prepare → freeze → release, or prepare [→ freeze] → abort. Ids are `m<n>`, never reused.
//!   Each step that changes something is one new registry version, persisted before anything
//!   else happens; release also moves the endpoint (`host` becomes `to`, same IP and MAC) in
//!   that same version.
//! - prepare refuses: an unknown container (404 `unknown_endpoint`), an unknown `to` (404
//!   `unknown_host`), `to` = the endpoint's host (400 `bad_request`), a container that already
//!   has an active (`prepared`/`frozen`) migration to another host (409 `conflict`, naming
//!   it). Preparing while the container's previous migration is `released` and still
//!   forwarding ends that grace early (the snapshot holds at most one migration per
//!   container).
//! - Repeating the current step (prepare with the same container and `to` while prepared,
//!   freeze while frozen, release while released, abort while aborted) answers 200 with the
//!   migration unchanged (`changed: false`, no new version). Any other step out of order is
//!   409 `bad_phase` ("migration m3 is prepared: freeze it before release", "released: too
//!   late to abort; migrate back instead", anything after an abort) and changes nothing;
//!   unknown ids are 404 `unknown_migration`.
//! - While a migration is active, `DELETE /v1/endpoints/{ip}` of its container and
//!   `DELETE /v1/hosts/{name}` of its source or destination are 409 `conflict`.
//! - Waiting: after persisting, a step answers only once the agents concerned report (their
//!   watch's `after`) a version ≥ the step's: prepare — `from` and `to`; freeze and release —
//!   `from`, `to` and every host whose agent is connected (a watch open, or one within the
//!   last 10 s); abort — every host that reported a version carrying the migration, plus
//!   `from` and `to` if connected. At most `timeout_ms` (1–600000; default the gateway's
//!   `step_timeout_ms`, 5000). [`MigrationStep::applied_ms`] says how long it took. A repeated
//!   step waits the same way for the version of the migration's current phase.
//! - Timeouts (504, the body's `error.migration` is a [`MigrationFailure`] naming the lagging
//!   hosts): a prepare or freeze is aborted automatically (persisted), then the hosts that had
//!   applied a version carrying the migration must apply the abort within the same timeout:
//!   `rolled_back` if they do (the step failed, everything went back to `from`),
//!   `needs_attention` if not. A release that times out is `needs_attention` (a release is
//!   never rolled back: the endpoint is on `to`), as is an abort that times out, and a step
//!   whose wait is cut short by the gateway shutting down (the step stays persisted).
//! - Released migrations stay in the snapshot while `now < forward_until_unix_ms`
//!   (`released_unix_ms + forward_grace_ms`, gateway config, default 2000); then a timer in
//!   the gateway moves them to the history with a new version. The snapshot is a function of
//!   the state and the time: one the timer has not caught up with yet already omits them.
//!   Aborted migrations leave the snapshot at once. `GET /v1/migrations` also lists the
//!   history (the last 1000 finished ones).
//! - Restarts: migrations are persisted with the registry. A restarted gateway keeps active
//!   migrations as they are (it neither aborts nor completes them); agents re-sync through
//!   their watch, and the orchestrator continues (freeze, release) or aborts.
//!
//! `ferry migrate prepare|freeze|release|abort|status` (the CLI) exits with: 0 success (the
//! step is in effect, or already was); 1 error with nothing changed (bad input, unknown
//! container/host/migration, `bad_phase`, `conflict`, unreachable gateway, …); 2 usage; 3
//! `rolled_back`; 4 `needs_attention` (also when a step's answer was lost after it was sent:
//! its outcome is unknown).

pub mod cgroup;
pub mod client;
pub mod clock;
pub mod faultpoint;
pub mod private;
pub mod run;
pub mod serve;
pub mod transport;
pub mod types;
pub mod validate;

pub use client::{ApiError, Client, Watcher};
pub use clock::{unix_ms, unix_ms_f64};
pub use types::*;
pub use validate::{ContainerAddr, PublicKey};
