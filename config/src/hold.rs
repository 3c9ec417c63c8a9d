//! `[hold]`: what happens to the packets of an endpoint held during a migration.

use serde::{Deserialize, Serialize};

/// What happens to a held endpoint's packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HoldMode {
    /// Queue them and release them in order (ferry's design).
    #[default]
    Hold,
    /// Drop them (counted as `dropped`), as a network lock does today: peers wait out their
    /// retransmission back-off. For comparisons (`ferry-lab bench handoff`).
    Drop,
}

/// Limits of one endpoint's queue (configurable in the agent's TOML, `[hold]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HoldLimits {
    #[serde(default)]
    pub mode: HoldMode,
    /// Most packets queued per endpoint.
    #[serde(default = "default_max_packets")]
    pub max_packets: usize,
    /// Most bytes (whole frames) queued per endpoint.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: usize,
    /// Longest a release to this host waits for room in a container's UDP receive buffers
    /// before it writes the rest of the held datagrams anyway (milliseconds; 0: no pacing,
    /// every held datagram is written back at once). See docs/migration.md, "The paced
    /// release".
    #[serde(default = "default_udp_pace_ms")]
    pub udp_pace_ms: u64,
}

fn default_max_packets() -> usize {
    16_384
}
fn default_max_bytes() -> usize {
    32 << 20
}
fn default_udp_pace_ms() -> u64 {
    1_000
}

impl Default for HoldLimits {
    fn default() -> Self {
        Self {
            mode: HoldMode::Hold,
            max_packets: default_max_packets(),
            max_bytes: default_max_bytes(),
            udp_pace_ms: default_udp_pace_ms(),
        }
    }
}
