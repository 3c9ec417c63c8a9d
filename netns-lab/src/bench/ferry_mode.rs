//! The `ferry` mode of the datapath benchmark: two containers created by ferry's agents, one on
//! [`HOST_A`](super::HOST_A), one on [`HOST_B`](super::HOST_B). The rest of the benchmark only
//! sees the [`Pair`] (two namespace paths and addresses) and calls [`fill_map`] once, after
//! the ferry rounds.
//!
//! Not wired yet: both functions fail, and the benchmark reports ferry (and ferry_full_map)
//! as failed while still measuring the baselines.

use super::{BenchError, Pair};
use crate::Lab;

/// Creates (through the lab's agents) container A on `HOST_A` and container B on `HOST_B`
/// and returns their namespaces and overlay addresses. Anything created must live in the lab's
/// namespaces or under its prefix, so that the lab's teardown removes it.
pub fn setup(lab: &Lab) -> Result<Pair, BenchError> {
    let _ = lab;
    Err(BenchError::failed("ferry mode not wired yet"))
}

/// Fills ferry's endpoint map on the hosts of the [`setup`] pair with `n` entries in total
/// (dummy endpoints that never match the measured traffic), keeping the pair's own entries.
pub fn fill_map(lab: &Lab, n: usize) -> Result<(), BenchError> {
    let _ = (lab, n);
    Err(BenchError::failed("ferry mode not wired yet"))
}
