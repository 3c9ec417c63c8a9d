//! ferry-lab: labs of network namespaces that stand for hosts, clouds, a gateway and the
//! internet.
//!
//! A lab has a unique prefix (`fl` + 6 hex digits); every node is a namespace
//! `<prefix>-<node>`: one per host, `<prefix>-router` (one bridge per cloud, forwarding
//! between clouds) and `<prefix>-inet` (a client on the internet side of the gateway).
//! Nothing is ever added to the root namespace. State lives in `/run/ferry-lab/<prefix>/`.
//!
//! - [`topology`]: what a lab is made of (TOML), checked and resolved to addresses;
//! - [`lab`]: bringing a lab up (namespaces, router, veths, routes, agents) and using it;
//! - [`control`]: the lab's control plane (token, the gateway daemon the agents talk to);
//! - [`teardown`]: tearing labs down (keeps going on errors, reports all of them), what a lab
//!   left behind, listing labs, and [`reap`]: the reaper, a `ferry-lab reap` process (binary
//!   of package `ferry-lab-cli`) that tears a lab down when its owner dies;
//! - [`procs`]: process identity (PID + start time), stopping processes through pidfds;
//! - [`state`]: what a lab recorded under `/run/ferry-lab/<prefix>/`;
//! - [`image`]: root file systems for runc containers from the host's Debian packages, cached;
//! - [`wan`]: shaped links between clouds (delay, jitter, loss, rate) without netem: TUN
//!   devices and a forwarder process in the router namespace;
//! - [`bins`]: finding the workspace's binaries;
//! - [`clock`]: the wall clock in ms, and waiting on a condition with a deadline.
//!
//! The demo and the benchmarks are in `ferry-bench`; the `ferry-lab` command in `ferry-lab-cli`.
//!
//! ```no_run
//! use ferry_lab::{Lab, LabOptions, Topology};
//! let lab = Lab::up(LabOptions { topology: Topology::default_lab(), ..LabOptions::default() })?;
//! let b1 = lab.host("b1").unwrap().address.to_string();
//! assert!(lab.ping("a1", &b1));
//! lab.down()?;
//! # Ok::<(), ferry_lab::LabError>(())
//! ```
pub mod bins;
pub mod clock;
pub mod control;
mod error;
pub mod image;
pub mod lab;
pub mod podman;
pub mod procs;
pub mod state;
pub mod teardown;
pub mod topology;
pub mod wan;

pub use error::{LabError, TeardownError};
pub use lab::{INET, Lab, LabOptions, ROUTER, netns_name};
pub use teardown::{LabStatus, leftovers, list_labs, reap, status, teardown};
pub use topology::{Host, LabTopology, Link, LinkProps, LinkSpec, Role, Topology, TopologyError};
