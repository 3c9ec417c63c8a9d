//! The agent's view of what its datapath holds, and the one place that changes it: `apply`
//! moves the datapath from what it holds to a [`Desired`] state, make-before-break, and keeps
//! going past errors (each is reported; what failed is retried with the next apply).

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    sync::{Arc, Mutex},
};

use ferry_common::{Config, Endpoint, NatKey, NatValue, Vtep, ipv4_be};
use ferry_overlay::{datapath::Datapath, netlink::Netlink};
use serde::Serialize;
use tracing::{info, warn};

use crate::{
    containers::{Built, HostSide},
    plan::{self, Desired, LocalContainer},
};

/// What has been applied to the datapath.
#[derive(Debug, Default)]
pub struct Applied {
    pub endpoints: BTreeMap<Ipv4Addr, Endpoint>,
    pub vteps: BTreeMap<Ipv4Addr, Vtep>,
    pub public: BTreeMap<NatKey, NatValue>,
    pub snat: BTreeMap<NatKey, NatValue>,
    pub containers: BTreeMap<Ipv4Addr, (LocalContainer, Built)>,
    pub egress_vtep: Option<Ipv4Addr>,
    /// The registry version applied without errors (0: none yet).
    pub version: u64,
}

/// Summary for `/v1/status`.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub host: String,
    pub applied_version: u64,
    pub endpoints: usize,
    pub vteps: usize,
    pub public: usize,
    pub snat: usize,
    pub egress_vtep: Option<Ipv4Addr>,
    pub containers: Vec<Built>,
}

pub struct Node {
    pub host: String,
    pub nl: Netlink,
    pub datapath: Arc<Mutex<Datapath>>,
    /// The datapath configuration without the parts the registry decides (egress VTEP).
    pub base_config: Config,
    pub netns_prefix: String,
    pub container_mtu: u32,
    pub overlay_ip: Ipv4Addr,
    pub applied: Applied,
}

impl Node {
    pub fn status(&self) -> Status {
        let a = &self.applied;
        Status {
            host: self.host.clone(),
            applied_version: a.version,
            endpoints: a.endpoints.len(),
            vteps: a.vteps.len(),
            public: a.public.len(),
            snat: a.snat.len(),
            egress_vtep: a.egress_vtep,
            containers: a.containers.values().map(|(_, b)| b.clone()).collect(),
        }
    }

    /// Applies `want`. Returns the errors met (empty: the datapath now matches `want`, and
    /// its version is recorded as applied).
    pub async fn apply(&mut self, want: &Desired) -> Vec<String> {
        let mut errors = Vec::new();
        let datapath = Arc::clone(&self.datapath);
        let dp = || datapath.lock().unwrap_or_else(|p| p.into_inner());
        for ip in &want.orphans {
            warn!(%ip, "endpoint placed on a host the registry does not list; ignored");
        }

        // 1. Allow new peers before anything may send to them.
        let vteps = plan::diff(&self.applied.vteps, &want.vteps);
        for (ip, v) in &vteps.upsert {
            match dp().allow_vtep(*ip, *v) {
                Ok(()) => {
                    self.applied.vteps.insert(*ip, *v);
                }
                Err(e) => errors.push(format!("allowing vtep {ip}: {e}")),
            }
        }

        // 2. Containers leaving, then arriving.
        let have: BTreeMap<Ipv4Addr, LocalContainer> = self
            .applied
            .containers
            .iter()
            .map(|(ip, (c, _))| (*ip, *c))
            .collect();
        let (create, delete) = plan::container_changes(&have, &want.containers);
        for ip in delete {
            // Stop delivering to the veth before it goes.
            if self.applied.endpoints.remove(&ip).is_some()
                && let Err(e) = dp().remove_endpoint(ip)
            {
                errors.push(format!("removing endpoint {ip}: {e}"));
            }
            let side = self.host_side();
            if let Err(e) = side.delete(ip).await {
                errors.push(e.to_string());
            }
            self.applied.containers.remove(&ip);
            info!(%ip, "container removed");
        }
        for c in create {
            let side = self.host_side();
            match side.create(&c).await {
                Ok(built) => {
                    self.applied.containers.insert(c.ip, (c, built));
                }
                Err(e) => errors.push(e.to_string()),
            }
        }

        // 3. Endpoint entries: registry-placed ones plus LOCAL for every built container.
        let mut endpoints = want.endpoints.clone();
        for (ip, (c, built)) in &self.applied.containers {
            endpoints.insert(*ip, plan::local_entry(c, built.ifindex));
        }
        let eps = plan::diff(&self.applied.endpoints, &endpoints);
        for (ip, ep) in &eps.upsert {
            match dp().set_endpoint(*ip, *ep) {
                Ok(()) => {
                    self.applied.endpoints.insert(*ip, *ep);
                }
                Err(e) => errors.push(format!("setting endpoint {ip}: {e}")),
            }
        }
        for ip in &eps.remove {
            match dp().remove_endpoint(*ip) {
                Ok(()) => {
                    self.applied.endpoints.remove(ip);
                }
                Err(e) => errors.push(format!("removing endpoint {ip}: {e}")),
            }
        }

        // 4. Public translation (gateway only; empty elsewhere).
        let public = plan::diff(&self.applied.public, &want.public);
        for (k, v) in &public.upsert {
            match dp().set_public(*k, *v) {
                Ok(()) => {
                    self.applied.public.insert(*k, *v);
                }
                Err(e) => errors.push(format!("setting public entry {k:?}: {e}")),
            }
        }
        for k in &public.remove {
            match dp().remove_public(k) {
                Ok(()) => {
                    self.applied.public.remove(k);
                }
                Err(e) => errors.push(format!("removing public entry {k:?}: {e}")),
            }
        }
        let snat = plan::diff(&self.applied.snat, &want.snat);
        for (k, v) in &snat.upsert {
            match dp().set_snat(*k, *v) {
                Ok(()) => {
                    self.applied.snat.insert(*k, *v);
                }
                Err(e) => errors.push(format!("setting snat entry {k:?}: {e}")),
            }
        }
        for k in &snat.remove {
            match dp().remove_snat(k) {
                Ok(()) => {
                    self.applied.snat.remove(k);
                }
                Err(e) => errors.push(format!("removing snat entry {k:?}: {e}")),
            }
        }

        // 5. Where non-overlay traffic goes.
        if self.applied.egress_vtep != want.egress_vtep {
            let mut cfg = self.base_config;
            cfg.egress_vtep_be = want.egress_vtep.map_or(0, |v| ipv4_be(v.octets()));
            match dp().set_config(cfg) {
                Ok(()) => {
                    info!(egress_vtep = ?want.egress_vtep, "egress gateway set");
                    self.applied.egress_vtep = want.egress_vtep;
                }
                Err(e) => errors.push(format!("setting config: {e}")),
            }
        }

        // 6. Forget peers last.
        for ip in &vteps.remove {
            match dp().disallow_vtep(*ip) {
                Ok(()) => {
                    self.applied.vteps.remove(ip);
                }
                Err(e) => errors.push(format!("disallowing vtep {ip}: {e}")),
            }
        }

        if errors.is_empty() {
            self.applied.version = want.version;
        }
        info!(
            version = want.version,
            endpoints = self.applied.endpoints.len(),
            containers = self.applied.containers.len(),
            vteps = self.applied.vteps.len(),
            public = self.applied.public.len(),
            errors = errors.len(),
            "datapath reconciled"
        );
        errors
    }

    fn host_side(&self) -> HostSide<'_> {
        HostSide {
            nl: &self.nl,
            datapath: &self.datapath,
            netns_prefix: &self.netns_prefix,
            mtu: self.container_mtu,
            host_overlay_ip: self.overlay_ip,
        }
    }

    /// Removes every container this agent built (at shutdown). Keeps going on errors.
    pub async fn remove_containers(&mut self) {
        let ips: Vec<Ipv4Addr> = self.applied.containers.keys().copied().collect();
        for ip in ips {
            let side = self.host_side();
            if let Err(e) = side.delete(ip).await {
                warn!(error = %e, "removing container at shutdown");
            }
            self.applied.containers.remove(&ip);
        }
    }
}
