//! Who may call what: the bearer token (loaded safely at start, checked in constant time per
//! request) and, over TLS, the caller's identity ([`permit`]).

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
};

use ferry_api::client::read_token_file;
use subtle::ConstantTimeEq as _;

/// Why the daemon's token file was refused.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("token file {}: {source}", path.display())]
    Stat {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("token file {} is not a regular file", path.display())]
    NotAFile { path: PathBuf },
    #[error(
        "token file {} has mode {mode:04o}: group and others must have no access \
         (chmod 600 {})",
        path.display(),
        path.display()
    )]
    Mode { path: PathBuf, mode: u32 },
    #[error(transparent)]
    Read(#[from] ferry_api::ApiError),
}

/// Reads the daemon's token file. Refuses a missing or empty file and one that group or others
/// may read or write (mode & 0o077 ≠ 0): the token is the only thing guarding the registry.
pub fn load_server_token(path: &Path) -> Result<String, TokenError> {
    let meta = std::fs::metadata(path).map_err(|source| TokenError::Stat {
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.is_file() {
        return Err(TokenError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(TokenError::Mode {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(read_token_file(path)?)
}

/// Checks an `Authorization` header value against `token`; the error is the 401's message.
pub fn check_bearer(header: Option<&[u8]>, token: &str) -> Result<(), &'static str> {
    let Some(value) = header else {
        return Err("missing Authorization header: want `Authorization: Bearer <token>`");
    };
    let Some(given) = value
        .strip_prefix(b"Bearer ")
        .or_else(|| value.strip_prefix(b"bearer "))
    else {
        return Err("the Authorization header is not `Bearer <token>`");
    };
    // In time that depends only on the lengths, not on where the bytes differ.
    if bool::from(given.trim_ascii().ct_eq(token.as_bytes())) {
        Ok(())
    } else {
        Err("wrong bearer token")
    }
}

/// What a request asks for, as far as [`permit`] needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ask<'a> {
    pub method: &'a str,
    /// The matched route (`/v1/hosts/{name}/heartbeat`).
    pub route: &'a str,
    /// `{name}` or `{id}` of the route, if it has one.
    pub param: Option<&'a str>,
    /// `?host=` of `/v1/watch`.
    pub watch_host: Option<&'a str>,
}

/// What [`permit`] may need to know of the registry.
pub trait Lookup {
    /// The source and destination of migration `id`.
    fn sides(&self, id: &str) -> Option<(String, String)>;
    /// The host endpoint `ip` (as written in the path) lives on.
    fn endpoint_host(&self, ip: &str) -> Option<String>;
}

impl Lookup for crate::registry::Registry {
    fn sides(&self, id: &str) -> Option<(String, String)> {
        self.migration(id).map(|m| (m.from.clone(), m.to.clone()))
    }
    fn endpoint_host(&self, ip: &str) -> Option<String> {
        let ip: std::net::Ipv4Addr = ip.parse().ok()?;
        self.endpoints()
            .find(|e| e.ip == ip)
            .map(|e| e.host.clone())
    }
}

/// Whether `caller` may make request `ask`. The operator and the gateway may make any; a host
/// only what an agent does, and only as itself: register itself, its heartbeat, its watch, the
/// version; the CNI plugin's work on itself — allocate and release addresses, register
/// endpoints, remove an endpoint that lives on it; for a migration it takes part in (`lookup`
/// names its source and destination), report run events, freeze and ask for an abort, and —
/// the destination only — the release; list migrations (its watch has them all). Routes whose body names the host (registration,
/// endpoints, IPAM) pass here and are checked by their handler with [`permit_body`]. `Err` is
/// the 403's message.
pub fn permit(
    caller: &ferry_tls::Identity,
    ask: Ask<'_>,
    lookup: &impl Lookup,
) -> Result<(), String> {
    use ferry_tls::Identity;
    let host = match caller {
        Identity::Operator | Identity::Gateway => return Ok(()),
        Identity::Host(h) => h.as_str(),
    };
    let as_itself = |named: Option<&str>, what: &str| match named {
        Some(n) if n == host => Ok(()),
        Some(n) => Err(format!("host {host} may not {what} as host {n}")),
        None => Err(format!("host {host} may not {what} without naming itself")),
    };
    match (ask.method, ask.route) {
        ("GET", "/v1/version")
        | ("POST", "/v1/hosts")
        | ("POST", "/v1/endpoints")
        | ("POST", "/v1/ipam/allocate")
        | ("POST", "/v1/ipam/release")
        // Checked by its handler: a host takes the internet side over only for itself.
        | ("POST", "/v1/public/takeover")
        // The migrations list (CRIU's hook under runc/Podman finds its container's active
        // migration): every host already has every migration in its watch snapshot.
        | ("GET", "/v1/migrations") => Ok(()),
        ("POST", "/v1/hosts/{name}/heartbeat") => as_itself(ask.param, "send a heartbeat"),
        ("GET", "/v1/watch") => as_itself(ask.watch_host, "watch the registry"),
        ("DELETE", "/v1/endpoints/{ip}") => {
            let ip = ask.param.unwrap_or_default();
            match lookup.endpoint_host(ip) {
                // Unknown: the handler answers 404.
                None => Ok(()),
                Some(h) if h == host => Ok(()),
                Some(h) => Err(format!(
                    "host {host} may not remove endpoint {ip}: it lives on host {h}"
                )),
            }
        }
        ("POST", "/v1/runs/{id}/events")
        | ("POST", "/v1/migrations/{id}/abort")
        | ("POST", "/v1/migrations/{id}/freeze")
        | ("POST", "/v1/migrations/{id}/release") => {
            let id = ask.param.unwrap_or_default();
            let Some((from, to)) = lookup.sides(id) else {
                return Err(format!(
                    "host {host} takes no part in a migration {id:?}: only the operator may \
                     call {} {}",
                    ask.method, ask.route
                ));
            };
            // The destination alone releases (after its restore); either side reports
            // events, asks for the abort, and freezes (the source's CRIU at network-lock; the
            // destination after its restore with CRIU's own lock).
            let (may, only) = match ask.route.rsplit('/').next() {
                Some("release") => (to == host, ("destination", &to)),
                _ => (from == host || to == host, ("", &from)),
            };
            if may {
                Ok(())
            } else if from == host || to == host {
                Err(format!(
                    "host {host} may not call {} {} of {id}: only its {} ({}) may",
                    ask.method, ask.route, only.0, only.1
                ))
            } else {
                Err(format!(
                    "host {host} takes no part in migration {id} ({from} → {to})"
                ))
            }
        }
        (m, r) => Err(format!(
            "host {host} may not call {m} {r}: only the operator (or the gateway) may"
        )),
    }
}

/// The body's part of [`permit`]: a host may `what` (`"register host"`) only for itself, so
/// every host the body names (`named`) must be the caller. The operator, the gateway and a caller without a TLS
/// identity (plain HTTP: the token alone decides) may name any. `Err` is the 403's message.
pub fn permit_body<'a>(
    caller: Option<&ferry_tls::Identity>,
    what: &str,
    named: impl IntoIterator<Item = &'a str>,
) -> Result<(), String> {
    let Some(ferry_tls::Identity::Host(me)) = caller else {
        return Ok(());
    };
    match named.into_iter().find(|n| *n != me.as_str()) {
        None => Ok(()),
        Some(other) => Err(format!("host {me} may not {what} {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn a_host_acts_only_as_itself_and_only_as_an_agent() {
        use ferry_tls::Identity;
        let b1 = Identity::Host("b1".into());
        let side = &Fake;
        let ask = |method, route, param, watch_host| Ask {
            method,
            route,
            param,
            watch_host,
        };
        let ok = [
            ask("GET", "/v1/version", None, None),
            ask("POST", "/v1/hosts", None, None),
            ask("POST", "/v1/hosts/{name}/heartbeat", Some("b1"), None),
            ask("GET", "/v1/watch", None, Some("b1")),
            ask("POST", "/v1/runs/{id}/events", Some("m1"), None),
            ask("POST", "/v1/migrations/{id}/abort", Some("m1"), None),
            ask("POST", "/v1/migrations/{id}/release", Some("m1"), None),
            // The CNI plugin's work: the handlers check the body (permit_body).
            ask("POST", "/v1/endpoints", None, None),
            ask("POST", "/v1/ipam/allocate", None, None),
            ask("POST", "/v1/ipam/release", None, None),
            ask("POST", "/v1/public/takeover", None, None),
            ask("DELETE", "/v1/endpoints/{ip}", Some("10.244.2.5"), None),
            ask("GET", "/v1/migrations", None, None),
            // Unknown: the handler answers 404.
            ask("DELETE", "/v1/endpoints/{ip}", Some("10.244.9.9"), None),
        ];
        for a in ok {
            assert_eq!(permit(&b1, a, side), Ok(()), "{a:?}");
            assert_eq!(permit(&Identity::Operator, a, side), Ok(()), "{a:?}");
        }
        let refused = [
            (
                ask("POST", "/v1/hosts/{name}/heartbeat", Some("a1"), None),
                "as host a1",
            ),
            (ask("GET", "/v1/watch", None, Some("a1")), "as host a1"),
            (ask("GET", "/v1/watch", None, None), "without naming itself"),
            (
                ask("POST", "/v1/migrations/{id}/abort", Some("m2"), None),
                "no part",
            ),
            (ask("POST", "/v1/public", None, None), "only the operator"),
            (
                ask("DELETE", "/v1/hosts/{name}", Some("b1"), None),
                "only the operator",
            ),
            (
                ask("DELETE", "/v1/endpoints/{ip}", Some("10.244.1.5"), None),
                "may not remove endpoint 10.244.1.5: it lives on host a1",
            ),
            (ask("GET", "/v1/ipam", None, None), "only the operator"),
            (ask("GET", "/v1/endpoints", None, None), "only the operator"),
            (
                ask("POST", "/v1/migrations", None, None),
                "only the operator",
            ),
            (ask("POST", "/v1/runs", None, None), "only the operator"),
            (ask("GET", "/v1/hosts", None, None), "only the operator"),
        ];
        for (a, why) in refused {
            let e = permit(&b1, a, side).unwrap_err();
            assert!(e.contains(why), "{a:?}: {e}");
            assert_eq!(permit(&Identity::Gateway, a, side), Ok(()), "{a:?}");
        }
        // The source may abort and report, but not release.
        let a1 = Identity::Host("a1".into());
        let release = ask("POST", "/v1/migrations/{id}/release", Some("m1"), None);
        assert!(
            permit(&a1, release, side)
                .unwrap_err()
                .contains("only its destination (b1)")
        );
        let freeze = ask("POST", "/v1/migrations/{id}/freeze", Some("m1"), None);
        assert_eq!(permit(&a1, freeze, side), Ok(()));
        assert_eq!(permit(&b1, freeze, side), Ok(()));
        let abort = ask("POST", "/v1/migrations/{id}/abort", Some("m1"), None);
        assert_eq!(permit(&a1, abort, side), Ok(()));
        let c1 = Identity::Host("c1".into());
        assert!(permit(&c1, freeze, side).is_err());
        assert!(
            permit(&c1, abort, side)
                .unwrap_err()
                .contains("no part in migration m1")
        );
    }

    /// Migration m1 (a1 → b1); endpoints .1.5 on a1 and .2.5 on b1.
    struct Fake;

    impl Lookup for Fake {
        fn sides(&self, id: &str) -> Option<(String, String)> {
            (id == "m1").then(|| ("a1".to_string(), "b1".to_string()))
        }
        fn endpoint_host(&self, ip: &str) -> Option<String> {
            match ip {
                "10.244.1.5" => Some("a1".into()),
                "10.244.2.5" => Some("b1".into()),
                _ => None,
            }
        }
    }

    #[test]
    fn a_host_names_only_itself_in_a_body() {
        use ferry_tls::Identity;
        let b1 = Identity::Host("b1".into());
        let cases: [(Option<&Identity>, &[&str], Option<&str>); 7] = [
            (Some(&b1), &["b1"], None),
            (Some(&b1), &["b1", "b1"], None),
            (Some(&b1), &[], None),
            (
                Some(&b1),
                &["b1", "a1"],
                Some("host b1 may not do it on host a1"),
            ),
            (Some(&Identity::Operator), &["a1", "b1"], None),
            (Some(&Identity::Gateway), &["a1"], None),
            // Plain HTTP: no identity, the token alone decides.
            (None, &["a1"], None),
        ];
        for (caller, named, want) in cases {
            let got = permit_body(caller, "do it on host", named.iter().copied());
            assert_eq!(got.err().as_deref(), want, "{caller:?} {named:?}");
        }
    }

    #[test]
    fn bearer_headers() {
        assert!(check_bearer(Some(b"Bearer s3cret"), "s3cret").is_ok());
        assert!(check_bearer(Some(b"Bearer s3cret "), "s3cret").is_ok());
        assert_eq!(
            check_bearer(Some(b"Bearer s3cre"), "s3cret"),
            Err("wrong bearer token")
        );
        assert!(check_bearer(Some(b"Bearer s3crets"), "s3cret").is_err());
        assert!(check_bearer(Some(b"Bearer "), "s3cret").is_err());
        assert!(check_bearer(Some(b"Basic czNjcmV0"), "s3cret").is_err());
        assert!(check_bearer(Some(b"s3cret"), "s3cret").is_err());
        assert!(
            check_bearer(None, "s3cret")
                .unwrap_err()
                .contains("missing Authorization")
        );
    }

    #[test]
    fn token_file_rules() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("token");
        let e = load_server_token(&p).unwrap_err().to_string();
        assert!(
            e.contains("token file") && e.contains("No such file"),
            "{e}"
        );

        fs::write(&p, "s3cret\n").unwrap();
        for mode in [0o644, 0o640, 0o604, 0o660, 0o601] {
            fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
            let e = load_server_token(&p).unwrap_err().to_string();
            assert!(e.contains(&format!("mode {mode:04o}")), "{e}");
            assert!(e.contains("chmod 600"), "{e}");
        }
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(load_server_token(&p).unwrap(), "s3cret");
        fs::set_permissions(&p, fs::Permissions::from_mode(0o400)).unwrap();
        assert_eq!(load_server_token(&p).unwrap(), "s3cret");

        fs::set_permissions(&p, fs::Permissions::from_mode(0o600)).unwrap();
        fs::write(&p, "\n  \n").unwrap();
        assert!(
            load_server_token(&p)
                .unwrap_err()
                .to_string()
                .contains("empty")
        );

        let e = load_server_token(dir.path()).unwrap_err().to_string();
        assert!(e.contains("not a regular file"), "{e}");
    }
}
