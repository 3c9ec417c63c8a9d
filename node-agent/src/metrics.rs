//! Prometheus text exposition of the agent's counters.

use std::fmt::Write as _;

use ferry_overlay::datapath::ReasonCount;

/// Renders datapath counters and map sizes in Prometheus text format (version 0.0.4).
pub fn render(host: &str, counters: &[ReasonCount], endpoints: usize, vteps: usize) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# HELP ferry_datapath_packets_total Packets seen by the eBPF datapath, by verdict reason."
    );
    let _ = writeln!(out, "# TYPE ferry_datapath_packets_total counter");
    for c in counters {
        let _ = writeln!(
            out,
            "ferry_datapath_packets_total{{host=\"{host}\",reason=\"{}\",verdict=\"{}\"}} {}",
            c.reason.name(),
            verdict(c),
            c.packets
        );
    }
    let _ = writeln!(
        out,
        "# HELP ferry_datapath_bytes_total Bytes seen by the eBPF datapath, by verdict reason."
    );
    let _ = writeln!(out, "# TYPE ferry_datapath_bytes_total counter");
    for c in counters {
        let _ = writeln!(
            out,
            "ferry_datapath_bytes_total{{host=\"{host}\",reason=\"{}\",verdict=\"{}\"}} {}",
            c.reason.name(),
            verdict(c),
            c.bytes
        );
    }
    let _ = writeln!(out, "# HELP ferry_endpoints Entries in the endpoint map.");
    let _ = writeln!(out, "# TYPE ferry_endpoints gauge");
    let _ = writeln!(out, "ferry_endpoints{{host=\"{host}\"}} {endpoints}");
    let _ = writeln!(out, "# HELP ferry_vteps Entries in the VTEP allow-list.");
    let _ = writeln!(out, "# TYPE ferry_vteps gauge");
    let _ = writeln!(out, "ferry_vteps{{host=\"{host}\"}} {vteps}");
    out
}

fn verdict(c: &ReasonCount) -> &'static str {
    if c.reason.is_drop() { "drop" } else { "pass" }
}

/// Parses `ferry_datapath_packets_total` samples back out of the text (used by tests and the
/// lab's status): returns (reason, packets) pairs.
pub fn parse_packets(text: &str) -> Vec<(String, u64)> {
    text.lines()
        .filter(|l| l.starts_with("ferry_datapath_packets_total{"))
        .filter_map(|l| {
            let reason = l.split("reason=\"").nth(1)?.split('"').next()?.to_owned();
            let value = l.rsplit(' ').next()?.parse().ok()?;
            Some((reason, value))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_common::Reason;

    #[test]
    fn renders_every_reason_and_parses_back() {
        let counters: Vec<_> = Reason::ALL
            .iter()
            .enumerate()
            .map(|(i, &reason)| ReasonCount {
                reason,
                packets: i as u64 * 10,
                bytes: i as u64 * 1000,
            })
            .collect();
        let text = render("a1", &counters, 3, 2);
        assert!(text.contains("ferry_endpoints{host=\"a1\"} 3"));
        assert!(text.contains("reason=\"unknown_vtep\",verdict=\"drop\"} 50"));
        assert!(text.contains("reason=\"overlay_encap\",verdict=\"pass\"} 10"));
        let parsed = parse_packets(&text);
        assert_eq!(parsed.len(), Reason::ALL.len());
        assert_eq!(parsed[5], ("unknown_vtep".to_owned(), 50));
    }
}
