//! The registry: hosts, container endpoints and public mappings, and a version that increases
//! by one with every change. A pure state machine: [`Registry::apply`] validates a whole
//! request against the configuration and the current state and either changes the state and
//! says what changed, or changes nothing and says why (with the API error code). No I/O here;
//! the server persists the new state before it answers.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
};

use ferry_api::{
    Endpoint, EndpointSpec, ErrorCode, HostInfo, HostRole, MacAddr, PublicKey, PublicMapping,
    PublicSpec, Snapshot,
    validate::{non_unicast_reason, validate_host_name},
};
use ipnet::Ipv4Net;

use crate::store::PersistedState;

/// What the registry is checked against (from the config).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    pub overlay_cidr: Ipv4Net,
    pub vni: u32,
    pub public_cidrs: Vec<Ipv4Net>,
}

/// Why a request was refused. Nothing changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message} ({code})")]
pub struct RegistryError {
    pub code: ErrorCode,
    pub message: String,
}

fn fail<T>(code: ErrorCode, message: impl Into<String>) -> Result<T, RegistryError> {
    Err(RegistryError {
        code,
        message: message.into(),
    })
}

/// A request that may change the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    RegisterHost(HostInfo),
    RemoveHost(String),
    AddEndpoints(Vec<EndpointSpec>),
    RemoveEndpoint(Ipv4Addr),
    AddPublic(PublicSpec),
    RemovePublic(PublicKey),
}

/// What a successful request did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    HostAdded(HostInfo),
    HostUpdated {
        old: HostInfo,
        new: HostInfo,
    },
    /// Re-registration with identical information: nothing changed, the version stays.
    HostUnchanged(HostInfo),
    HostRemoved(HostInfo),
    EndpointsAdded(Vec<Endpoint>),
    /// The endpoint's public mappings (`kept_public`) stay, so the endpoint can be re-added
    /// elsewhere without losing them.
    EndpointRemoved {
        endpoint: Endpoint,
        kept_public: Vec<PublicMapping>,
    },
    PublicAdded(PublicMapping),
    PublicRemoved(PublicMapping),
}

impl Change {
    /// Whether the state (and so the version) changed.
    pub fn changes_state(&self) -> bool {
        !matches!(self, Change::HostUnchanged(_))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registry {
    net: NetConfig,
    version: u64,
    hosts: BTreeMap<String, HostInfo>,
    endpoints: BTreeMap<Ipv4Addr, Endpoint>,
    /// Index: MAC → endpoint IP.
    macs: BTreeMap<MacAddr, Ipv4Addr>,
    public: BTreeMap<PublicKey, PublicMapping>,
}

impl Registry {
    /// An empty registry at version 0.
    pub fn new(net: NetConfig) -> Self {
        Self {
            net,
            version: 0,
            hosts: BTreeMap::new(),
            endpoints: BTreeMap::new(),
            macs: BTreeMap::new(),
            public: BTreeMap::new(),
        }
    }

    pub fn net(&self) -> &NetConfig {
        &self.net
    }
    pub fn version(&self) -> u64 {
        self.version
    }
    pub fn host(&self, name: &str) -> Option<&HostInfo> {
        self.hosts.get(name)
    }
    /// Hosts by name.
    pub fn hosts(&self) -> impl Iterator<Item = &HostInfo> {
        self.hosts.values()
    }
    /// Endpoints by IP.
    pub fn endpoints(&self) -> impl Iterator<Item = &Endpoint> {
        self.endpoints.values()
    }
    /// Public mappings by key (address, then whole IP before ports).
    pub fn public(&self) -> impl Iterator<Item = &PublicMapping> {
        self.public.values()
    }
    pub fn host_count(&self) -> usize {
        self.hosts.len()
    }
    pub fn endpoint_count(&self) -> usize {
        self.endpoints.len()
    }
    pub fn public_count(&self) -> usize {
        self.public.len()
    }

    /// Everything an agent needs, sorted deterministically.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            version: self.version,
            overlay_cidr: self.net.overlay_cidr,
            vni: self.net.vni,
            hosts: self.hosts.values().cloned().collect(),
            endpoints: self.endpoints.values().cloned().collect(),
            public: self.public.values().cloned().collect(),
        }
    }

    /// Validates `req` as a whole; if it is acceptable, applies it (bumping the version when
    /// something changed). On error nothing has changed.
    pub fn apply(&mut self, req: Request) -> Result<Change, RegistryError> {
        let change = match req {
            Request::RegisterHost(h) => self.register_host(h)?,
            Request::RemoveHost(name) => self.remove_host(&name)?,
            Request::AddEndpoints(specs) => self.add_endpoints(specs)?,
            Request::RemoveEndpoint(ip) => self.remove_endpoint(ip)?,
            Request::AddPublic(spec) => self.add_public(spec, true)?,
            Request::RemovePublic(key) => self.remove_public(key)?,
        };
        if change.changes_state() {
            self.version += 1;
        }
        Ok(change)
    }

    // ---- checks shared by several requests

    /// `ip` is a usable address inside the overlay (not its network or broadcast address).
    fn check_overlay_ip(&self, field: &str, ip: Ipv4Addr) -> Result<(), RegistryError> {
        let c = self.net.overlay_cidr;
        if !c.contains(&ip) {
            return fail(
                ErrorCode::InvalidAddress,
                format!("{field} {ip} is outside overlay_cidr {c}"),
            );
        }
        if ip == c.network() || ip == c.broadcast() {
            let which = if ip == c.network() {
                "network"
            } else {
                "broadcast"
            };
            return fail(
                ErrorCode::InvalidAddress,
                format!("{field} {ip} is the {which} address of overlay_cidr {c}"),
            );
        }
        Ok(())
    }

    fn host_with_overlay_ip(&self, ip: Ipv4Addr) -> Option<&HostInfo> {
        self.hosts.values().find(|h| h.overlay_ip == ip)
    }

    // ---- hosts

    fn register_host(&mut self, h: HostInfo) -> Result<Change, RegistryError> {
        validate_host_name(&h.name).map_err(|m| RegistryError {
            code: ErrorCode::BadRequest,
            message: format!("name: {m}"),
        })?;
        if let Some(why) = non_unicast_reason(h.vtep) {
            return fail(
                ErrorCode::InvalidAddress,
                format!(
                    "vtep {} is {why}: want the host's unicast underlay address",
                    h.vtep
                ),
            );
        }
        if self.net.overlay_cidr.contains(&h.vtep) {
            return fail(
                ErrorCode::InvalidAddress,
                format!(
                    "vtep {} is inside overlay_cidr {}: want the host's underlay address",
                    h.vtep, self.net.overlay_cidr
                ),
            );
        }
        self.check_overlay_ip("overlay_ip", h.overlay_ip)?;

        let old = self.hosts.get(&h.name).cloned();
        if old.as_ref() == Some(&h) {
            return Ok(Change::HostUnchanged(h));
        }
        for other in self.hosts.values().filter(|o| o.name != h.name) {
            if other.vtep == h.vtep {
                return fail(
                    ErrorCode::Conflict,
                    format!("vtep {} is already host {}'s vtep", h.vtep, other.name),
                );
            }
            if other.overlay_ip == h.overlay_ip {
                return fail(
                    ErrorCode::Conflict,
                    format!(
                        "overlay_ip {} is already host {}'s overlay_ip",
                        h.overlay_ip, other.name
                    ),
                );
            }
            if h.role == HostRole::Gateway && other.role == HostRole::Gateway {
                return fail(
                    ErrorCode::Conflict,
                    format!(
                        "host {} already has role gateway: there can be only one gateway",
                        other.name
                    ),
                );
            }
        }
        if let Some(e) = self.endpoints.get(&h.overlay_ip) {
            return fail(
                ErrorCode::Conflict,
                format!(
                    "overlay_ip {} is the address of endpoint {} on host {}",
                    h.overlay_ip, e.ip, e.host
                ),
            );
        }
        if let Some(p) = self.public.values().find(|p| p.container == h.overlay_ip) {
            return fail(
                ErrorCode::Conflict,
                format!(
                    "overlay_ip {} is the container address of public mapping {}",
                    h.overlay_ip,
                    p.key()
                ),
            );
        }
        self.hosts.insert(h.name.clone(), h.clone());
        Ok(match old {
            None => Change::HostAdded(h),
            Some(old) => Change::HostUpdated { old, new: h },
        })
    }

    fn remove_host(&mut self, name: &str) -> Result<Change, RegistryError> {
        if !self.hosts.contains_key(name) {
            return fail(
                ErrorCode::UnknownHost,
                format!("host {name:?} is not registered"),
            );
        }
        let on_it: Vec<Ipv4Addr> = self
            .endpoints
            .values()
            .filter(|e| e.host == name)
            .map(|e| e.ip)
            .collect();
        if !on_it.is_empty() {
            let mut list: Vec<String> = on_it.iter().take(5).map(|ip| ip.to_string()).collect();
            if on_it.len() > 5 {
                list.push("…".into());
            }
            return fail(
                ErrorCode::Conflict,
                format!(
                    "host {name} still has {} endpoint(s) ({}): remove or move them first",
                    on_it.len(),
                    list.join(", ")
                ),
            );
        }
        let h = self.hosts.remove(name).expect("checked above");
        Ok(Change::HostRemoved(h))
    }

    // ---- endpoints

    fn add_endpoints(&mut self, specs: Vec<EndpointSpec>) -> Result<Change, RegistryError> {
        if specs.is_empty() {
            return fail(
                ErrorCode::BadRequest,
                "endpoints: the list is empty: give at least one endpoint",
            );
        }
        let batch = specs.len() > 1;
        let mut seen_ip: BTreeMap<Ipv4Addr, usize> = BTreeMap::new();
        let mut seen_mac: BTreeMap<MacAddr, usize> = BTreeMap::new();
        let mut new = Vec::with_capacity(specs.len());
        for (i, s) in specs.into_iter().enumerate() {
            let at = |m: String| {
                if batch {
                    format!("endpoints[{i}]: {m}")
                } else {
                    m
                }
            };
            let wrap = |e: RegistryError| RegistryError {
                code: e.code,
                message: at(e.message),
            };
            self.check_overlay_ip("ip", s.ip).map_err(wrap)?;
            if let Some(h) = self.host_with_overlay_ip(s.ip) {
                return fail(
                    ErrorCode::Conflict,
                    at(format!("ip {} is host {}'s overlay_ip", s.ip, h.name)),
                );
            }
            if !self.hosts.contains_key(&s.host) {
                return fail(
                    ErrorCode::UnknownHost,
                    at(format!(
                        "host {:?} (of endpoint {}) is not registered",
                        s.host, s.ip
                    )),
                );
            }
            if let Some(e) = self.endpoints.get(&s.ip) {
                return fail(
                    ErrorCode::DuplicateEndpoint,
                    at(format!(
                        "endpoint {} already exists on host {}",
                        s.ip, e.host
                    )),
                );
            }
            if let Some(j) = seen_ip.insert(s.ip, i) {
                return fail(
                    ErrorCode::DuplicateEndpoint,
                    at(format!(
                        "ip {} appears twice in the request (also endpoints[{j}])",
                        s.ip
                    )),
                );
            }
            let mac = s.mac.unwrap_or_else(|| MacAddr::for_container(s.ip));
            if mac.is_zero() {
                return fail(
                    ErrorCode::InvalidAddress,
                    at(format!("mac {mac} of endpoint {} is all zeros", s.ip)),
                );
            }
            if !mac.is_unicast() {
                return fail(
                    ErrorCode::InvalidAddress,
                    at(format!(
                        "mac {mac} of endpoint {} is a multicast address: want a unicast MAC",
                        s.ip
                    )),
                );
            }
            if let Some(other) = self.macs.get(&mac) {
                return fail(
                    ErrorCode::Conflict,
                    at(format!(
                        "mac {mac} of endpoint {} is already endpoint {other}'s",
                        s.ip
                    )),
                );
            }
            if let Some(j) = seen_mac.insert(mac, i) {
                return fail(
                    ErrorCode::Conflict,
                    at(format!(
                        "mac {mac} appears twice in the request (also endpoints[{j}])"
                    )),
                );
            }
            new.push(Endpoint {
                ip: s.ip,
                host: s.host,
                mac,
            });
        }
        for e in &new {
            self.macs.insert(e.mac, e.ip);
            self.endpoints.insert(e.ip, e.clone());
        }
        Ok(Change::EndpointsAdded(new))
    }

    fn remove_endpoint(&mut self, ip: Ipv4Addr) -> Result<Change, RegistryError> {
        let Some(endpoint) = self.endpoints.remove(&ip) else {
            return fail(
                ErrorCode::UnknownEndpoint,
                format!("no endpoint has ip {ip}"),
            );
        };
        self.macs.remove(&endpoint.mac);
        let kept_public = self
            .public
            .values()
            .filter(|p| p.container == ip)
            .cloned()
            .collect();
        Ok(Change::EndpointRemoved {
            endpoint,
            kept_public,
        })
    }

    // ---- public mappings

    /// `require_container`: the container must be a current endpoint (always, except when
    /// reloading a state whose endpoint was removed while its mappings were kept).
    fn add_public(
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
        self.public.insert(key, spec.clone());
        Ok(Change::PublicAdded(spec))
    }

    fn remove_public(&mut self, key: PublicKey) -> Result<Change, RegistryError> {
        match self.public.remove(&key) {
            Some(p) => Ok(Change::PublicRemoved(p)),
            None => fail(
                ErrorCode::UnknownPublic,
                format!("no public mapping has key {key}"),
            ),
        }
    }

    // ---- persistence

    /// The state to persist.
    pub fn to_persisted(&self) -> PersistedState {
        PersistedState {
            format: PersistedState::FORMAT,
            version: self.version,
            hosts: self.hosts.values().cloned().collect(),
            endpoints: self.endpoints.values().cloned().collect(),
            public: self.public.values().cloned().collect(),
        }
    }

    /// Rebuilds a registry from a persisted state, checking it against `net` with the same
    /// rules as the API (a config change can make a stored state invalid).
    pub fn from_persisted(net: NetConfig, s: PersistedState) -> Result<Self, String> {
        if s.format != PersistedState::FORMAT {
            return Err(format!(
                "unknown format {} (this gateway reads format {})",
                s.format,
                PersistedState::FORMAT
            ));
        }
        let mut r = Registry::new(net);
        for h in s.hosts {
            let name = h.name.clone();
            r.register_host(h)
                .map_err(|e| format!("host {name}: {}", e.message))?;
        }
        if !s.endpoints.is_empty() {
            let specs = s
                .endpoints
                .into_iter()
                .map(|e| EndpointSpec {
                    ip: e.ip,
                    host: e.host,
                    mac: Some(e.mac),
                })
                .collect();
            r.add_endpoints(specs).map_err(|e| e.message)?;
        }
        for p in s.public {
            let key = p.key();
            r.add_public(p, false)
                .map_err(|e| format!("public {key}: {}", e.message))?;
        }
        let entries = r.hosts.len() + r.endpoints.len() + r.public.len();
        if s.version == 0 && entries > 0 {
            // Agents start from version 0: they would never be sent these entries.
            return Err(format!(
                "version is 0 but the state holds {entries} entries"
            ));
        }
        r.version = s.version;
        Ok(r)
    }

    /// IPs of the public mappings' containers that are not endpoints (kept after a removal).
    pub fn dangling_public(&self) -> BTreeSet<Ipv4Addr> {
        self.public
            .values()
            .map(|p| p.container)
            .filter(|ip| !self.endpoints.contains_key(ip))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_api::Proto;

    fn net() -> NetConfig {
        NetConfig {
            overlay_cidr: "10.244.0.0/16".parse().unwrap(),
            vni: 4242,
            public_cidrs: vec!["203.0.113.128/25".parse().unwrap()],
        }
    }

    fn host(name: &str, vtep: &str, overlay: &str) -> HostInfo {
        HostInfo {
            name: name.into(),
            vtep: vtep.parse().unwrap(),
            overlay_ip: overlay.parse().unwrap(),
            role: HostRole::Host,
        }
    }

    fn gw(name: &str, vtep: &str, overlay: &str) -> HostInfo {
        HostInfo {
            role: HostRole::Gateway,
            ..host(name, vtep, overlay)
        }
    }

    fn ep(ip: &str, host: &str) -> EndpointSpec {
        EndpointSpec {
            ip: ip.parse().unwrap(),
            host: host.into(),
            mac: None,
        }
    }

    fn ep_mac(ip: &str, host: &str, mac: &str) -> EndpointSpec {
        EndpointSpec {
            mac: Some(mac.parse().unwrap()),
            ..ep(ip, host)
        }
    }

    fn whole(public: &str, container: &str) -> PublicSpec {
        PublicSpec {
            public: public.parse().unwrap(),
            public_port: None,
            container: container.parse().unwrap(),
            container_port: None,
            proto: None,
        }
    }

    fn port(public: &str, pp: u16, container: &str, cp: u16, proto: Proto) -> PublicSpec {
        PublicSpec {
            public: public.parse().unwrap(),
            public_port: Some(pp),
            container: container.parse().unwrap(),
            container_port: Some(cp),
            proto: Some(proto),
        }
    }

    /// Two hosts a1, b1 and a gateway gw; endpoints .1.5 on a1 and .2.5 on b1.
    fn populated() -> Registry {
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
    fn refused(r: &mut Registry, req: Request, code: ErrorCode, want: &str) {
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

    #[test]
    fn every_change_bumps_the_version_by_one() {
        let mut r = Registry::new(net());
        assert_eq!(r.version(), 0);
        let steps = [
            Request::RegisterHost(host("a1", "198.18.1.10", "10.244.255.1")),
            Request::AddEndpoints(vec![ep("10.244.1.5", "a1"), ep("10.244.1.6", "a1")]),
            Request::AddPublic(whole("203.0.113.130", "10.244.1.5")),
            Request::RemovePublic("203.0.113.130".parse().unwrap()),
            Request::RemoveEndpoint("10.244.1.5".parse().unwrap()),
            Request::RemoveEndpoint("10.244.1.6".parse().unwrap()),
            Request::RemoveHost("a1".into()),
        ];
        for (i, req) in steps.into_iter().enumerate() {
            r.apply(req).unwrap();
            assert_eq!(r.version(), i as u64 + 1);
        }
        assert_eq!(r.host_count() + r.endpoint_count() + r.public_count(), 0);
    }

    #[test]
    fn host_registration_is_idempotent_and_updates_bump() {
        let mut r = populated();
        let v = r.version();
        let same = host("a1", "198.18.1.10", "10.244.255.1");
        assert_eq!(
            r.apply(Request::RegisterHost(same.clone())).unwrap(),
            Change::HostUnchanged(same.clone())
        );
        assert_eq!(r.version(), v, "identical re-registration must not bump");

        let moved = host("a1", "198.18.1.11", "10.244.255.2");
        assert_eq!(
            r.apply(Request::RegisterHost(moved.clone())).unwrap(),
            Change::HostUpdated {
                old: same,
                new: moved.clone()
            }
        );
        assert_eq!(r.version(), v + 1);
        assert_eq!(r.host("a1"), Some(&moved));
        // Endpoints stay on the updated host.
        assert_eq!(r.endpoints().filter(|e| e.host == "a1").count(), 1);

        // Role change is an update too.
        let promoted = HostInfo {
            role: HostRole::Gateway,
            ..host("b1", "198.18.2.10", "10.244.255.3")
        };
        refused(
            &mut r,
            Request::RegisterHost(promoted),
            ErrorCode::Conflict,
            "host gw already has role gateway",
        );
        r.apply(Request::RegisterHost(gw(
            "gw",
            "198.18.0.10",
            "10.244.255.254",
        )))
        .unwrap();
        assert_eq!(r.version(), v + 1, "gateway re-registration unchanged");
        r.apply(Request::RegisterHost(host(
            "gw",
            "198.18.0.10",
            "10.244.255.254",
        )))
        .unwrap();
        r.apply(Request::RegisterHost(gw(
            "b1",
            "198.18.2.10",
            "10.244.255.3",
        )))
        .unwrap();
        assert_eq!(r.version(), v + 3);
    }

    #[test]
    fn host_validation() {
        let mut r = populated();
        use ErrorCode::*;
        let cases = [
            (
                host("A1", "198.18.9.1", "10.244.255.9"),
                BadRequest,
                "name: host name \"A1\"",
            ),
            (
                host("-x", "198.18.9.1", "10.244.255.9"),
                BadRequest,
                "starts with '-'",
            ),
            (host("", "198.18.9.1", "10.244.255.9"), BadRequest, "empty"),
            (
                host(&"x".repeat(33), "198.18.9.1", "10.244.255.9"),
                BadRequest,
                "33 characters",
            ),
            (
                host("c1", "0.0.0.0", "10.244.255.9"),
                InvalidAddress,
                "vtep 0.0.0.0 is the unspecified",
            ),
            (
                host("c1", "127.0.0.1", "10.244.255.9"),
                InvalidAddress,
                "vtep 127.0.0.1 is a loopback",
            ),
            (
                host("c1", "239.1.1.1", "10.244.255.9"),
                InvalidAddress,
                "vtep 239.1.1.1 is a multicast",
            ),
            (
                host("c1", "255.255.255.255", "10.244.255.9"),
                InvalidAddress,
                "the broadcast address",
            ),
            (
                host("c1", "10.244.7.7", "10.244.255.9"),
                InvalidAddress,
                "vtep 10.244.7.7 is inside overlay_cidr 10.244.0.0/16",
            ),
            (
                host("c1", "198.18.9.1", "10.245.0.1"),
                InvalidAddress,
                "overlay_ip 10.245.0.1 is outside overlay_cidr 10.244.0.0/16",
            ),
            (
                host("c1", "198.18.9.1", "10.244.0.0"),
                InvalidAddress,
                "overlay_ip 10.244.0.0 is the network address",
            ),
            (
                host("c1", "198.18.9.1", "10.244.255.255"),
                InvalidAddress,
                "overlay_ip 10.244.255.255 is the broadcast address",
            ),
            (
                host("c1", "198.18.1.10", "10.244.255.9"),
                Conflict,
                "vtep 198.18.1.10 is already host a1's vtep",
            ),
            (
                host("c1", "198.18.9.1", "10.244.255.1"),
                Conflict,
                "overlay_ip 10.244.255.1 is already host a1's overlay_ip",
            ),
            (
                host("c1", "198.18.9.1", "10.244.1.5"),
                Conflict,
                "overlay_ip 10.244.1.5 is the address of endpoint 10.244.1.5 on host a1",
            ),
            (
                gw("c1", "198.18.9.1", "10.244.255.9"),
                Conflict,
                "host gw already has role gateway",
            ),
            // An update of a1 must not collide with b1 either.
            (
                host("a1", "198.18.2.10", "10.244.255.1"),
                Conflict,
                "vtep 198.18.2.10 is already host b1's vtep",
            ),
        ];
        for (h, code, want) in cases {
            refused(&mut r, Request::RegisterHost(h), code, want);
        }
    }

    #[test]
    fn host_removal() {
        let mut r = populated();
        refused(
            &mut r,
            Request::RemoveHost("nope".into()),
            ErrorCode::UnknownHost,
            "host \"nope\" is not registered",
        );
        refused(
            &mut r,
            Request::RemoveHost("a1".into()),
            ErrorCode::Conflict,
            "host a1 still has 1 endpoint(s) (10.244.1.5)",
        );
        let v = r.version();
        assert_eq!(
            r.apply(Request::RemoveHost("gw".into())).unwrap(),
            Change::HostRemoved(gw("gw", "198.18.0.10", "10.244.255.254"))
        );
        assert_eq!(r.version(), v + 1);
        assert!(r.host("gw").is_none());
    }

    #[test]
    fn endpoint_validation() {
        let mut r = populated();
        use ErrorCode::*;
        let one = |s: EndpointSpec| Request::AddEndpoints(vec![s]);
        let cases = [
            (
                one(ep("10.245.1.1", "a1")),
                InvalidAddress,
                "ip 10.245.1.1 is outside overlay_cidr 10.244.0.0/16",
            ),
            (
                one(ep("10.244.0.0", "a1")),
                InvalidAddress,
                "ip 10.244.0.0 is the network address",
            ),
            (
                one(ep("10.244.255.255", "a1")),
                InvalidAddress,
                "ip 10.244.255.255 is the broadcast address",
            ),
            (
                one(ep("10.244.255.3", "a1")),
                Conflict,
                "ip 10.244.255.3 is host b1's overlay_ip",
            ),
            (
                one(ep("10.244.1.9", "zz")),
                UnknownHost,
                "host \"zz\" (of endpoint 10.244.1.9) is not registered",
            ),
            (
                one(ep("10.244.1.5", "b1")),
                DuplicateEndpoint,
                "endpoint 10.244.1.5 already exists on host a1",
            ),
            (
                one(ep_mac("10.244.1.9", "a1", "00:00:00:00:00:00")),
                InvalidAddress,
                "mac 00:00:00:00:00:00 of endpoint 10.244.1.9 is all zeros",
            ),
            (
                one(ep_mac("10.244.1.9", "a1", "01:00:5e:00:00:01")),
                InvalidAddress,
                "is a multicast address",
            ),
            (
                one(ep_mac("10.244.1.9", "a1", "0e:fc:0a:f4:01:05")),
                Conflict,
                "mac 0e:fc:0a:f4:01:05 of endpoint 10.244.1.9 is already endpoint 10.244.1.5's",
            ),
            (
                Request::AddEndpoints(vec![]),
                BadRequest,
                "the list is empty",
            ),
        ];
        for (req, code, want) in cases {
            refused(&mut r, req, code, want);
        }
    }

    #[test]
    fn endpoint_batches_are_all_or_nothing() {
        let mut r = populated();
        // The bad entry is last: the good ones before it must not be applied.
        refused(
            &mut r,
            Request::AddEndpoints(vec![
                ep("10.244.1.6", "a1"),
                ep("10.244.1.7", "b1"),
                ep("10.244.1.8", "nope"),
            ]),
            ErrorCode::UnknownHost,
            "endpoints[2]: host \"nope\"",
        );
        refused(
            &mut r,
            Request::AddEndpoints(vec![
                ep("10.244.1.6", "a1"),
                ep("10.244.1.7", "b1"),
                ep("10.244.1.6", "b1"),
            ]),
            ErrorCode::DuplicateEndpoint,
            "endpoints[2]: ip 10.244.1.6 appears twice in the request (also endpoints[0])",
        );
        refused(
            &mut r,
            Request::AddEndpoints(vec![
                ep_mac("10.244.1.6", "a1", "0e:00:00:00:00:01"),
                ep_mac("10.244.1.7", "a1", "0e:00:00:00:00:01"),
            ]),
            ErrorCode::Conflict,
            "endpoints[1]: mac 0e:00:00:00:00:01 appears twice in the request (also endpoints[0])",
        );
        // A default MAC colliding with an explicit one in the same batch.
        refused(
            &mut r,
            Request::AddEndpoints(vec![
                ep_mac("10.244.1.6", "a1", "0e:fc:0a:f4:01:07"),
                ep("10.244.1.7", "a1"),
            ]),
            ErrorCode::Conflict,
            "appears twice",
        );

        let v = r.version();
        let added = r
            .apply(Request::AddEndpoints(vec![
                ep("10.244.1.6", "a1"),
                ep_mac("10.244.1.7", "b1", "02:00:00:00:00:07"),
            ]))
            .unwrap();
        assert_eq!(r.version(), v + 1, "one batch is one version");
        let Change::EndpointsAdded(added) = added else {
            panic!("{added:?}")
        };
        assert_eq!(
            added[0].mac,
            MacAddr::for_container("10.244.1.6".parse().unwrap())
        );
        assert_eq!(added[1].mac.to_string(), "02:00:00:00:00:07");
        assert_eq!(r.endpoint_count(), 4);
    }

    #[test]
    fn endpoint_removal_keeps_public_mappings_and_frees_the_mac() {
        let mut r = populated();
        r.apply(Request::AddPublic(whole("203.0.113.130", "10.244.1.5")))
            .unwrap();
        refused(
            &mut r,
            Request::RemoveEndpoint("10.244.1.99".parse().unwrap()),
            ErrorCode::UnknownEndpoint,
            "no endpoint has ip 10.244.1.99",
        );
        let c = r
            .apply(Request::RemoveEndpoint("10.244.1.5".parse().unwrap()))
            .unwrap();
        let Change::EndpointRemoved {
            endpoint,
            kept_public,
        } = c
        else {
            panic!("{c:?}")
        };
        assert_eq!(endpoint.host, "a1");
        assert_eq!(kept_public, vec![whole("203.0.113.130", "10.244.1.5")]);
        assert_eq!(r.public_count(), 1);
        assert_eq!(
            r.dangling_public(),
            BTreeSet::from(["10.244.1.5".parse().unwrap()])
        );
        // Move: re-add on another host, with the same (default) MAC.
        r.apply(Request::AddEndpoints(vec![ep("10.244.1.5", "b1")]))
            .unwrap();
        assert!(r.dangling_public().is_empty());
        // A host may not take the overlay address a kept mapping points to.
        r.apply(Request::RemoveEndpoint("10.244.1.5".parse().unwrap()))
            .unwrap();
        refused(
            &mut r,
            Request::RegisterHost(host("c1", "198.18.9.1", "10.244.1.5")),
            ErrorCode::Conflict,
            "container address of public mapping 203.0.113.130",
        );
    }

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

    #[test]
    fn snapshot_is_sorted_and_complete() {
        let mut r = Registry::new(net());
        for h in [
            host("zz", "198.18.3.1", "10.244.255.9"),
            host("a1", "198.18.1.10", "10.244.255.1"),
        ] {
            r.apply(Request::RegisterHost(h)).unwrap();
        }
        r.apply(Request::AddEndpoints(vec![
            ep("10.244.10.1", "zz"),
            ep("10.244.9.1", "a1"),
            ep("10.244.1.200", "a1"),
        ]))
        .unwrap();
        for p in [
            port("203.0.113.200", 80, "10.244.9.1", 80, Proto::Tcp),
            whole("203.0.113.150", "10.244.10.1"),
            port("203.0.113.150", 0, "10.244.9.1", 80, Proto::Tcp),
            port("203.0.113.200", 53, "10.244.9.1", 53, Proto::Udp),
        ] {
            let _ = r.apply(Request::AddPublic(p));
        }
        let s = r.snapshot();
        assert_eq!(s.version, r.version());
        assert_eq!((s.vni, s.overlay_cidr), (4242, net().overlay_cidr));
        let names: Vec<&str> = s.hosts.iter().map(|h| h.name.as_str()).collect();
        assert_eq!(names, ["a1", "zz"]);
        let ips: Vec<String> = s.endpoints.iter().map(|e| e.ip.to_string()).collect();
        assert_eq!(ips, ["10.244.1.200", "10.244.9.1", "10.244.10.1"]);
        let keys: Vec<String> = s.public.iter().map(|p| p.key()).collect();
        assert_eq!(
            keys,
            [
                "203.0.113.150",
                "203.0.113.200:53/udp",
                "203.0.113.200:80/tcp"
            ]
        );
    }

    #[test]
    fn persisted_round_trip_including_kept_mappings() {
        let mut r = populated();
        r.apply(Request::AddPublic(whole("203.0.113.130", "10.244.1.5")))
            .unwrap();
        r.apply(Request::AddEndpoints(vec![ep_mac(
            "10.244.1.9",
            "a1",
            "02:11:22:33:44:55",
        )]))
        .unwrap();
        r.apply(Request::RemoveEndpoint("10.244.1.5".parse().unwrap()))
            .unwrap();
        let back = Registry::from_persisted(net(), r.to_persisted()).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.version(), 7);
    }

    #[test]
    fn persisted_state_must_fit_the_config() {
        let r = populated();
        let mut other = net();
        other.overlay_cidr = "10.250.0.0/16".parse().unwrap();
        let e = Registry::from_persisted(other, r.to_persisted()).unwrap_err();
        assert!(
            e.contains("host a1: overlay_ip 10.244.255.1 is outside overlay_cidr 10.250.0.0/16"),
            "{e}"
        );

        let mut s = r.to_persisted();
        s.version = 0;
        let e = Registry::from_persisted(net(), s).unwrap_err();
        assert!(
            e.contains("version is 0 but the state holds 5 entries"),
            "{e}"
        );

        let mut s = r.to_persisted();
        s.format = 99;
        assert!(
            Registry::from_persisted(net(), s)
                .unwrap_err()
                .contains("format 99")
        );

        let mut s = r.to_persisted();
        s.endpoints.push(s.endpoints[0].clone());
        let e = Registry::from_persisted(net(), s).unwrap_err();
        assert!(e.contains("appears twice"), "{e}");
    }
}
