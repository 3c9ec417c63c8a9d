//! Public mappings (a public IP, or IP:PORT/PROTO, to a container).

use ferry_api::{ErrorCode, PublicKey, PublicSpec, validate::non_unicast_reason};
use ferry_common::MAX_PUBLIC;

use super::{Change, Registry, RegistryError, fail};
impl Registry {
    /// `require_container`: the container must be a current endpoint (always, except when
    /// reloading a state whose endpoint was removed while its mappings were kept).
    pub(crate) fn add_public(
        &mut self,
        spec: PublicSpec,
        require_container: bool,
    ) -> Result<Change, RegistryError> {
        if !self
            .net
            .public_cidrs
            .iter()
            .any(|c| c.contains(&spec.public))
        {
            let allowed = if self.net.public_cidrs.is_empty() {
                "no public_cidrs are configured".to_string()
            } else {
                let list: Vec<String> = self
                    .net
                    .public_cidrs
                    .iter()
                    .map(|c| c.to_string())
                    .collect();
                format!("public_cidrs are {}", list.join(", "))
            };
            return fail(
                ErrorCode::InvalidAddress,
                format!("public {} is outside public_cidrs ({allowed})", spec.public),
            );
        }
        if let Some(why) = non_unicast_reason(spec.public) {
            return fail(
                ErrorCode::InvalidAddress,
                format!("public {} is {why}: want a unicast address", spec.public),
            );
        }
        let opt = |v: Option<String>| v.unwrap_or_else(|| "absent".into());
        let shape = (spec.public_port, spec.container_port, spec.proto);
        match shape {
            (None, None, None) | (Some(_), Some(_), Some(_)) => {}
            _ => {
                return fail(
                    ErrorCode::BadRequest,
                    format!(
                        "public_port, container_port and proto must all be set (a port mapping) \
                         or all be absent (a whole-IP mapping): got public_port {}, \
                         container_port {}, proto {}",
                        opt(spec.public_port.map(|p| p.to_string())),
                        opt(spec.container_port.map(|p| p.to_string())),
                        opt(spec.proto.map(|p| p.to_string())),
                    ),
                );
            }
        }
        for (field, port) in [
            ("public_port", spec.public_port),
            ("container_port", spec.container_port),
        ] {
            if port == Some(0) {
                return fail(
                    ErrorCode::BadRequest,
                    format!("{field} 0 is not a port: want 1–65535"),
                );
            }
        }
        if let Some(h) = self.host_with_overlay_ip(spec.container) {
            return fail(
                ErrorCode::Conflict,
                format!(
                    "container {} is host {}'s overlay_ip, not an endpoint",
                    spec.container, h.name
                ),
            );
        }
        if require_container && !self.endpoints.contains_key(&spec.container) {
            return fail(
                ErrorCode::UnknownEndpoint,
                format!("container {} is not a registered endpoint", spec.container),
            );
        }
        let key = spec.public_key();
        let target = |p: &PublicSpec| match p.container_port {
            Some(port) => format!("{}:{port}", p.container),
            None => p.container.to_string(),
        };
        if let Some(p) = self.public.get(&key) {
            return fail(
                ErrorCode::DuplicatePublic,
                format!("public endpoint {key} already exists (→ {})", target(p)),
            );
        }
        for p in self.public.values() {
            if p.public == spec.public && (p.is_whole_ip() || spec.is_whole_ip()) {
                let msg = if p.is_whole_ip() {
                    format!(
                        "public address {} is already mapped whole to {}: it cannot also carry \
                         port mappings",
                        p.public, p.container
                    )
                } else {
                    format!(
                        "public address {} already carries port mapping {} (→ {}): a whole-IP \
                         mapping needs the address alone",
                        p.public,
                        p.key(),
                        target(p)
                    )
                };
                return fail(ErrorCode::Conflict, msg);
            }
            if p.container == spec.container {
                if p.is_whole_ip() && spec.is_whole_ip() {
                    return fail(
                        ErrorCode::Conflict,
                        format!(
                            "container {} already has whole-IP mapping {}: its outgoing \
                             traffic could not be translated to two public addresses",
                            spec.container, p.public
                        ),
                    );
                }
                if !p.is_whole_ip()
                    && p.container_port == spec.container_port
                    && p.proto == spec.proto
                {
                    return fail(
                        ErrorCode::Conflict,
                        format!(
                            "container port {}/{} is already published as {}: replies could \
                             not be translated unambiguously",
                            target(&spec),
                            spec.proto.map(|p| p.to_string()).unwrap_or_default(),
                            p.key()
                        ),
                    );
                }
            }
        }
        Self::check_capacity("public mappings", self.public.len(), 1, MAX_PUBLIC)?;
        self.public.insert(key, spec.clone());
        Ok(Change::PublicAdded(spec))
    }

    pub(crate) fn remove_public(&mut self, key: PublicKey) -> Result<Change, RegistryError> {
        match self.public.remove(&key) {
            Some(p) => Ok(Change::PublicRemoved(p)),
            None => fail(
                ErrorCode::UnknownPublic,
                format!("no public mapping has key {key}"),
            ),
        }
    }
}

#[cfg(test)]
mod tests {

    use ferry_api::{ErrorCode, Proto};

    use crate::registry::{Change, Request};

    use crate::registry::testutil::*;

    #[test]
    fn public_validation() {
        let mut r = populated();
        r.apply(Request::AddPublic(whole("203.0.113.130", "10.244.1.5")))
            .unwrap();
        r.apply(Request::AddPublic(port(
            "203.0.113.131",
            80,
            "10.244.2.5",
            8080,
            Proto::Tcp,
        )))
        .unwrap();
        use ErrorCode::*;
        let mut shape = port("203.0.113.140", 80, "10.244.2.5", 80, Proto::Tcp);
        shape.container_port = None;
        let mut no_proto = port("203.0.113.140", 80, "10.244.2.5", 80, Proto::Tcp);
        no_proto.proto = None;
        let cases = [
            (
                whole("203.0.113.1", "10.244.2.5"),
                InvalidAddress,
                "public 203.0.113.1 is outside public_cidrs (public_cidrs are 203.0.113.128/25)",
            ),
            (
                shape,
                BadRequest,
                "got public_port 80, container_port absent, proto tcp",
            ),
            (no_proto, BadRequest, "must all be set"),
            (
                port("203.0.113.140", 0, "10.244.2.5", 80, Proto::Tcp),
                BadRequest,
                "public_port 0 is not a port",
            ),
            (
                port("203.0.113.140", 80, "10.244.2.5", 0, Proto::Tcp),
                BadRequest,
                "container_port 0 is not a port",
            ),
            (
                whole("203.0.113.140", "10.244.9.9"),
                UnknownEndpoint,
                "container 10.244.9.9 is not a registered endpoint",
            ),
            (
                whole("203.0.113.140", "10.244.255.1"),
                Conflict,
                "container 10.244.255.1 is host a1's overlay_ip",
            ),
            // Exact duplicates.
            (
                whole("203.0.113.130", "10.244.2.5"),
                DuplicatePublic,
                "public endpoint 203.0.113.130 already exists (→ 10.244.1.5)",
            ),
            (
                port("203.0.113.131", 80, "10.244.1.5", 81, Proto::Tcp),
                DuplicatePublic,
                "public endpoint 203.0.113.131:80/tcp already exists (→ 10.244.2.5:8080)",
            ),
            // A whole-IP address cannot carry ports, and vice versa.
            (
                port("203.0.113.130", 443, "10.244.2.5", 443, Proto::Tcp),
                Conflict,
                "public address 203.0.113.130 is already mapped whole to 10.244.1.5",
            ),
            (
                whole("203.0.113.131", "10.244.2.5"),
                Conflict,
                "already carries port mapping 203.0.113.131:80/tcp",
            ),
            // Reverse direction must be unambiguous.
            (
                whole("203.0.113.140", "10.244.1.5"),
                Conflict,
                "container 10.244.1.5 already has whole-IP mapping 203.0.113.130",
            ),
            (
                port("203.0.113.141", 81, "10.244.2.5", 8080, Proto::Tcp),
                Conflict,
                "container port 10.244.2.5:8080/tcp is already published as 203.0.113.131:80/tcp",
            ),
        ];
        for (spec, code, want) in cases {
            refused(&mut r, Request::AddPublic(spec), code, want);
        }
        // What is allowed: another proto or port on the same public address, the same
        // container port with another protocol, a port mapping to a container that also has a
        // whole-IP mapping.
        let v = r.version();
        for ok in [
            port("203.0.113.131", 80, "10.244.2.5", 8080, Proto::Udp),
            port("203.0.113.131", 81, "10.244.2.5", 8081, Proto::Tcp),
            port("203.0.113.132", 80, "10.244.1.5", 80, Proto::Tcp),
            whole("203.0.113.133", "10.244.2.5"),
        ] {
            assert_eq!(
                r.apply(Request::AddPublic(ok.clone())).unwrap(),
                Change::PublicAdded(ok)
            );
        }
        assert_eq!(r.version(), v + 4);
    }

    #[test]
    fn public_addresses_are_unicast() {
        // A configuration whose public_cidrs reach into multicast and broadcast space.
        let mut r = crate::registry::Registry::new(crate::registry::NetConfig {
            public_cidrs: vec![
                "224.0.0.0/24".parse().unwrap(),
                "255.255.255.255/32".parse().unwrap(),
            ],
            ..net()
        });
        r.apply(Request::RegisterHost(host(
            "a1",
            "198.18.1.10",
            "10.244.255.1",
        )))
        .unwrap();
        r.apply(Request::AddEndpoints(vec![ep("10.244.1.5", "a1")]))
            .unwrap();
        for (public, want) in [
            ("224.0.0.9", "public 224.0.0.9 is a multicast address"),
            (
                "255.255.255.255",
                "public 255.255.255.255 is the broadcast address",
            ),
        ] {
            refused(
                &mut r,
                Request::AddPublic(whole(public, "10.244.1.5")),
                ErrorCode::InvalidAddress,
                want,
            );
        }
    }

    #[test]
    fn public_removal() {
        let mut r = populated();
        r.apply(Request::AddPublic(port(
            "203.0.113.131",
            80,
            "10.244.2.5",
            8080,
            Proto::Tcp,
        )))
        .unwrap();
        refused(
            &mut r,
            Request::RemovePublic("203.0.113.131".parse().unwrap()),
            ErrorCode::UnknownPublic,
            "no public mapping has key 203.0.113.131",
        );
        refused(
            &mut r,
            Request::RemovePublic("203.0.113.131:80/udp".parse().unwrap()),
            ErrorCode::UnknownPublic,
            "203.0.113.131:80/udp",
        );
        let v = r.version();
        r.apply(Request::RemovePublic(
            "203.0.113.131:80/tcp".parse().unwrap(),
        ))
        .unwrap();
        assert_eq!((r.public_count(), r.version()), (0, v + 1));
    }
}
