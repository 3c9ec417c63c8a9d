//! Prometheus text exposition of the agent's counters.

use std::fmt::Write as _;

use ferry_overlay::datapath::ReasonCount;

/// Map sizes and other gauges.
#[derive(Debug, Clone, Copy, Default)]
pub struct Gauges {
    pub endpoints: usize,
    pub vteps: usize,
    pub public: usize,
    pub snat: usize,
    pub containers: usize,
    pub applied_version: u64,
    /// Hold queues: counters, endpoints held now, packets queued now.
    pub hold: crate::hold::HoldCounters,
    pub held_endpoints: usize,
    pub held_packets: usize,
    /// Frames the hold device's own queue dropped before the agent read them.
    pub hold_device_dropped: u64,
}

/// Renders datapath counters and map sizes in Prometheus text format (version 0.0.4).
pub fn render(host: &str, counters: &[ReasonCount], g: &Gauges) -> String {
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
    for (name, help, value) in [
        (
            "ferry_endpoints",
            "Entries in the endpoint map.",
            g.endpoints as u64,
        ),
        (
            "ferry_vteps",
            "Entries in the VTEP allow-list.",
            g.vteps as u64,
        ),
        (
            "ferry_public_entries",
            "Entries in the public-address map (gateway).",
            g.public as u64,
        ),
        (
            "ferry_snat_entries",
            "Entries in the source-translation map (gateway).",
            g.snat as u64,
        ),
        (
            "ferry_containers",
            "Containers whose network side this agent runs.",
            g.containers as u64,
        ),
        (
            "ferry_registry_applied_version",
            "Registry version applied to the datapath without errors.",
            g.applied_version,
        ),
        (
            "ferry_hold_endpoints",
            "Endpoints whose packets are held now.",
            g.held_endpoints as u64,
        ),
        (
            "ferry_hold_queued_packets",
            "Packets waiting in hold queues now.",
            g.held_packets as u64,
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} gauge");
        let _ = writeln!(out, "{name}{{host=\"{host}\"}} {value}");
    }
    let _ = writeln!(
        out,
        "# HELP ferry_hold_packets_total Held packets by event (held, released, overflow drops, drop-mode drops, stragglers passed on, malformed drops, drops in the hold device's own queue)."
    );
    let _ = writeln!(out, "# TYPE ferry_hold_packets_total counter");
    let h = &g.hold;
    for (event, n) in [
        ("held", h.held),
        ("released", h.released),
        ("overflow", h.overflow),
        ("dropped", h.dropped),
        ("straggler", h.stragglers),
        ("malformed", h.malformed),
        ("device_dropped", g.hold_device_dropped),
    ] {
        let _ = writeln!(
            out,
            "ferry_hold_packets_total{{host=\"{host}\",event=\"{event}\"}} {n}"
        );
    }
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
        let g = Gauges {
            endpoints: 3,
            vteps: 2,
            public: 4,
            applied_version: 9,
            ..Gauges::default()
        };
        let text = render("a1", &counters, &g);
        assert!(text.contains("ferry_endpoints{host=\"a1\"} 3"));
        assert!(text.contains("ferry_public_entries{host=\"a1\"} 4"));
        assert!(text.contains("ferry_registry_applied_version{host=\"a1\"} 9"));
        assert!(text.contains("reason=\"public_snat\",verdict=\"pass\"} 190"));
        assert!(text.contains("reason=\"spoofed_source\",verdict=\"drop\"} 230"));
        assert!(text.contains("reason=\"unknown_vtep\",verdict=\"drop\"} 50"));
        assert!(text.contains("reason=\"overlay_encap\",verdict=\"pass\"} 10"));
        let parsed = parse_packets(&text);
        assert_eq!(parsed.len(), Reason::ALL.len());
        assert_eq!(parsed[5], ("unknown_vtep".to_owned(), 50));
    }
}
