//! What both clients (the line-protocol client and the redis client) measure: latencies in
//! microseconds, percentiles, and the kernel's retransmission count of a connection.

use std::{net::TcpStream, os::fd::AsFd as _, time::Duration};

use crate::sys;

/// A duration in whole microseconds, saturating at `u32::MAX` (about 71 minutes).
pub fn micros(d: Duration) -> u32 {
    d.as_micros().min(u128::from(u32::MAX)) as u32
}

/// The connection's `tcpi_total_retrans` (0 if TCP_INFO cannot be read).
pub fn total_retrans(s: &TcpStream) -> u32 {
    sys::tcp_info(s.as_fd())
        .map(|i| i.tcpi_total_retrans)
        .unwrap_or(0)
}

/// The `p` percentile (0..=1, nearest rank) of latencies in µs, in ms; 0 for none. Sorts `v`.
pub fn percentile_ms(v: &mut [u32], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_unstable();
    let i = ((v.len() - 1) as f64 * p).round() as usize;
    f64::from(v[i]) / 1e3
}

/// A duration in ms, rounded to the µs.
pub fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_and_units() {
        let mut v = vec![3000, 1000, 2000, 4000, 5000];
        assert_eq!(percentile_ms(&mut v, 0.5), 3.0);
        assert_eq!(percentile_ms(&mut v, 1.0), 5.0);
        assert_eq!(percentile_ms(&mut [], 0.5), 0.0);
        assert_eq!(micros(Duration::from_millis(2)), 2000);
        assert_eq!(micros(Duration::from_secs(1 << 40)), u32::MAX);
        assert_eq!(ms(Duration::from_micros(1500)), 1.5);
    }
}
