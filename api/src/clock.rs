//! Wall-clock timestamps as the API carries them (`*_unix_ms` fields).

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 if the clock is before it), for the `u64` fields
/// (`created_unix_ms`, `last_seen_unix_ms`, …).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Milliseconds since the Unix epoch with a fractional part, for the run reports' `f64`
/// fields (`start_unix_ms`, `unix_ms`, …).
pub fn unix_ms_f64() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64() * 1e3)
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_clocks_agree_and_are_after_2020() {
        let (a, b) = (unix_ms(), unix_ms_f64());
        assert!(a > 1_577_836_800_000, "{a}");
        assert!((b - a as f64).abs() < 60_000.0, "{a} vs {b}");
    }
}
