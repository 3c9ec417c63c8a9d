//! ferry as a CNI plugin: `ferry-cni` (the binary) is what a container runtime executes
//! (Podman's CNI backend, containerd, a script) with the CNI environment and the network
//! configuration on stdin; it asks the local `ferry-agent` over the agent's CNI socket to do
//! the work and prints the spec's result or error.
//!
//! - [`spec`]: the CNI specification's side (versions 1.0.0, 0.4.0, 0.3.1, 0.3.0): the
//!   environment, the network configuration, error codes, results — pure and unit-tested.
//! - [`proto`]: the plugin ↔ agent protocol (JSON + the namespace as `SCM_RIGHTS`), shared
//!   with the agent (`ferry_agent::cni`).
//! - [`plugin`]: one invocation, with the agent behind a trait.
//!
//! A network configuration (Podman: a `.conflist` in its `cni_config_dir`, the binary in one
//! of its `cni_plugin_dirs`):
//!
//! ```json
//! {
//!   "cniVersion": "1.0.0",
//!   "name": "ferry",
//!   "plugins": [{
//!     "type": "ferry-cni",
//!     "agent": "/run/ferry/cni.sock",
//!     "capabilities": {"ips": true, "mac": true}
//!   }]
//! }
//! ```
//!
//! The agent gives the container one IPv4 address from the gateway's cluster-wide pool (or
//! the one asked for through the `ips` capability, `args.cni.ips` or `CNI_ARGS` `IP=`), as a
//! /32 on `CNI_IFNAME` with the on-link default gateway 169.254.1.1 that every ferry host
//! answers for. See docs/architecture.md, "CNI".

pub mod plugin;
pub mod proto;
pub mod spec;

pub use spec::{CniError, ErrorCode};
