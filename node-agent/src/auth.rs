//! The agents' peer API (`api_listen`): its bearer-token check and its error answer, shared by
//! every route served there (hand-off packages, the runtime, CRIU).

use axum::{
    Json,
    http::{HeaderMap, StatusCode, header::AUTHORIZATION},
    response::{IntoResponse, Response},
};
use ferry_api::ErrorBody;
use subtle::ConstantTimeEq as _;

/// An error answer: `{"error":{"code","message"}}` with a status.
#[derive(Debug)]
pub struct Refusal(pub StatusCode, pub &'static str, pub String);

impl Refusal {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self(status, code, message.into())
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorBody::new(self.1, self.2))).into_response()
    }
}

/// The peer API's bearer-token check: `Authorization: Bearer <token>`, compared in constant
/// time. No token (an agent without `[gateway]`): every request is refused.
pub fn authorize(token: Option<&str>, headers: &HeaderMap) -> Result<(), Refusal> {
    let unauthorized = |m: &str| Refusal::new(StatusCode::UNAUTHORIZED, "unauthorized", m);
    let token = token.ok_or_else(|| unauthorized("this agent has no token"))?;
    let given = headers
        .get(AUTHORIZATION)
        .map(|v| v.as_bytes())
        .ok_or_else(|| unauthorized("missing Authorization header: want `Bearer <token>`"))?;
    let given = given
        .strip_prefix(b"Bearer ")
        .ok_or_else(|| unauthorized("the Authorization header is not `Bearer <token>`"))?;
    if bool::from(given.trim_ascii().ct_eq(token.as_bytes())) {
        Ok(())
    } else {
        Err(unauthorized("wrong bearer token"))
    }
}

/// What a peer-API request asks for, as far as [`permit`] needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAsk<'a> {
    pub method: &'a str,
    /// The matched route (`/v1/images/{migration}`).
    pub route: &'a str,
    /// Its one parameter (a migration id or a container address), if any.
    pub param: Option<&'a str>,
}

/// Whether `caller` may make `ask` on host `me`'s peer API, given the migrations in `me`'s
/// registry snapshot. The gateway may call everything; the operator the runtime's routes
/// (start, look at, stop a workload: what an orchestrator does on a host); another host only
/// what the peer of a migration does, and only for a migration between it and `me`: send the
/// images and hand-off packages of a migration *to* `me`, and ask whether a container of a
/// migration between the two runs here (fencing). `Err` is the 403's message.
pub fn permit(
    me: &str,
    caller: &ferry_tls::Identity,
    ask: PeerAsk<'_>,
    migrations: &[ferry_api::Migration],
) -> Result<(), String> {
    use ferry_tls::Identity;
    let peer = match caller {
        Identity::Gateway => return Ok(()),
        Identity::Operator => {
            return if ask.route.starts_with("/v1/containers/") {
                Ok(())
            } else {
                Err(format!(
                    "the operator may not call {} {} on a peer API: only the gateway and the \
                     peer of a migration may",
                    ask.method, ask.route
                ))
            };
        }
        Identity::Host(h) if h == me => {
            return Err(format!("host {h} may not call its own peer API"));
        }
        Identity::Host(h) => h.as_str(),
    };
    let param = ask.param.unwrap_or_default();
    let container = || param.parse::<std::net::Ipv4Addr>().ok();
    let (found, what) = match (ask.method, ask.route) {
        ("POST", "/v1/images/{migration}") => (
            migrations
                .iter()
                .any(|m| m.id == param && m.from == peer && m.to == me),
            "send images",
        ),
        ("POST" | "DELETE", "/v1/handoff/{container}") => (
            migrations
                .iter()
                .any(|m| Some(m.container) == container() && m.from == peer && m.to == me),
            "hand off sockets",
        ),
        ("GET", "/v1/containers/{ip}") => (
            migrations.iter().any(|m| {
                Some(m.container) == container()
                    && ((m.from == peer && m.to == me) || (m.from == me && m.to == peer))
            }),
            "ask about a container",
        ),
        (m, r) => {
            return Err(format!(
                "host {peer} may not call {m} {r} on {me}: only the gateway may"
            ));
        }
    };
    if found {
        Ok(())
    } else {
        Err(format!(
            "host {peer} may not {what} ({param}) on {me}: no migration between them names it"
        ))
    }
}

/// A container's address in a request path.
pub fn container_ip(s: &str) -> Result<std::net::Ipv4Addr, Refusal> {
    s.parse().map_err(|_| {
        Refusal::bad_request(format!(
            "{s:?} in the path is not an IPv4 container address"
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bearer(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(AUTHORIZATION, v.parse().unwrap());
        h
    }

    #[test]
    fn a_peer_may_only_do_what_the_peer_of_a_migration_does() {
        use ferry_tls::Identity;
        let m = |id: &str, c: [u8; 4], from: &str, to: &str| {
            ferry_api::Migration::new(id, c.into(), from, to, ferry_api::MigrationPhase::Frozen)
        };
        // On b1: m1 moves 10.244.1.10 from a1 to b1; m2 moves 10.244.2.10 from b1 to c1.
        let ms = [
            m("m1", [10, 244, 1, 10], "a1", "b1"),
            m("m2", [10, 244, 2, 10], "b1", "c1"),
        ];
        let ask = |method, route, param| PeerAsk {
            method,
            route,
            param,
        };
        let a1 = Identity::Host("a1".into());
        let c1 = Identity::Host("c1".into());
        let images = ask("POST", "/v1/images/{migration}", Some("m1"));
        let handoff = ask("POST", "/v1/handoff/{container}", Some("10.244.1.10"));
        let look = ask("GET", "/v1/containers/{ip}", Some("10.244.2.10"));
        let start = ask("POST", "/v1/containers/{ip}/start", Some("10.244.1.10"));
        let checkpoint = ask("POST", "/v1/checkpoint/{migration}", Some("m2"));
        for a in [images, handoff] {
            assert_eq!(permit("b1", &a1, a, &ms), Ok(()), "{a:?}");
            assert!(
                permit("b1", &c1, a, &ms)
                    .unwrap_err()
                    .contains("no migration")
            );
            assert!(permit("b1", &Identity::Operator, a, &ms).is_err());
        }
        // The source of m2 is b1: c1 (its destination) may look, a1 may not.
        assert_eq!(permit("b1", &c1, look, &ms), Ok(()));
        assert!(permit("b1", &a1, look, &ms).is_err());
        // Only the gateway checkpoints; the operator runs workloads; nobody calls itself.
        for who in [&a1, &c1, &Identity::Operator] {
            assert!(permit("b1", who, checkpoint, &ms).is_err(), "{who}");
        }
        assert_eq!(permit("b1", &Identity::Gateway, checkpoint, &ms), Ok(()));
        assert_eq!(permit("b1", &Identity::Operator, start, &ms), Ok(()));
        assert!(
            permit("b1", &a1, start, &ms)
                .unwrap_err()
                .contains("only the gateway")
        );
        assert!(permit("b1", &Identity::Host("b1".into()), images, &ms).is_err());
        // With the migration gone from the snapshot, its source may send nothing more.
        assert!(permit("b1", &a1, images, &ms[1..]).is_err());
    }

    #[test]
    fn only_the_right_bearer_token_passes() {
        assert!(authorize(Some("s3cret"), &bearer("Bearer s3cret")).is_ok());
        assert!(authorize(Some("s3cret"), &bearer("Bearer s3cret \t")).is_ok());
        for (token, headers) in [
            (Some("s3cret"), bearer("Bearer s3cre")),
            (Some("s3cret"), bearer("Bearer s3cret2")),
            (Some("s3cret"), bearer("Basic s3cret")),
            (Some("s3cret"), HeaderMap::new()),
            (None, bearer("Bearer s3cret")),
        ] {
            let e = authorize(token, &headers).unwrap_err();
            assert_eq!((e.0, e.1), (StatusCode::UNAUTHORIZED, "unauthorized"));
        }
    }
}
