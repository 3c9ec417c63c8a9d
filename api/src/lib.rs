//! ferry's control-plane API (version 1): the JSON types that `ferry` (CLI), `ferry gateway`
//! and `ferry-agent` exchange over HTTP, their validation, and a small HTTP client.
//!
//! Routes (all under `/v1`, JSON bodies, `Authorization: Bearer <token>` on everything except
//! `GET /v1/health`):
//!
//! | method | path | body → answer |
//! |---|---|---|
//! | GET | /v1/health | → [`Health`] |
//! | POST | /v1/hosts | [`HostInfo`] → [`HostStatus`] (an agent registers; idempotent) |
//! | GET | /v1/hosts | → `Vec<HostStatus>` |
//! | DELETE | /v1/hosts/{name} | → [`HostStatus`] (refused while endpoints live there) |
//! | POST | /v1/endpoints | [`EndpointsRequest`] → `Vec<Endpoint>` (all or nothing) |
//! | GET | /v1/endpoints | → `Vec<Endpoint>` |
//! | DELETE | /v1/endpoints/{ip} | → [`Endpoint`] |
//! | POST | /v1/public | [`PublicSpec`] → [`PublicMapping`] |
//! | GET | /v1/public | → `Vec<PublicMapping>` |
//! | DELETE | /v1/public/{key} | → [`PublicMapping`] (`key` as [`PublicMapping::key`]) |
//! | GET | /v1/watch?host=NAME&after=N | → [`Snapshot`] as soon as its version ≠ N (or after the long-poll timeout, the current one) |
//! | GET | /v1/version | → [`RegistryVersion`] (the registry's current version) |
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

pub mod client;
pub mod http;
pub mod types;
pub mod validate;

pub use client::{ApiError, Client};
pub use types::*;
pub use validate::{ContainerAddr, PublicKey};
