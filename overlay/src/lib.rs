//! The kernel-facing side of ferry: network namespaces, netlink (VXLAN device, addresses,
//! routes), and the eBPF datapath (load, attach, typed map access). Nothing else in the
//! workspace calls the kernel directly.
pub mod datapath;
pub mod netlink;
pub mod netns;
pub mod nft;
pub mod peer_window;
pub mod sys;
pub mod tap;

pub use ferry_common as common;
