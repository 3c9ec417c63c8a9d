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
