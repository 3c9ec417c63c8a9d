//! Prometheus text exposition of the agent's counters (prometheus-client's encoder; the
//! metric names readers use are in [`ferry_config::metrics`]).

use std::{borrow::Cow, fmt};

use ferry_config::metrics as names;
use ferry_overlay::datapath::ReasonCount;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _, prometheus_text},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};

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
    /// Peer API connections by result (`ferry_api::serve::Stats::by_result`).
    pub peer_connections: [(&'static str, u64); 5],
    /// UDP datagrams of checkpointed queues by event (`crate::criu::udpq::counters`).
    pub udp_carry: [(&'static str, u64); 4],
    /// Announcement frames by kind (`crate::node::seams::announce_counters`).
    pub announce: [(&'static str, u64); 4],
    /// Heartbeats and takeovers between gateway-role hosts (`crate::public_ha::counters`).
    pub public_failover: [(&'static str, u64); 6],
}

/// The `Content-Type` of [`render`]'s text.
pub use prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Renders datapath counters and map sizes in Prometheus text format (version 0.0.4); every
/// sample is labelled with `host`.
pub fn render(host: &str, counters: &[ReasonCount], g: &Gauges) -> String {
    let mut registry =
        Registry::with_labels([(Cow::Borrowed("host"), Cow::Owned(host.to_owned()))].into_iter());
    registry.register_collector(Box::new(Scrape {
        counters: counters.to_vec(),
        gauges: *g,
    }));
    let mut out = String::new();
    prometheus_text::encode(&mut out, &registry).expect("writing to a String cannot fail");
    out
}

/// One scrape's values: read from the datapath and the hold queues when asked for, so they
/// are exported as constant metrics.
#[derive(Debug)]
struct Scrape {
    counters: Vec<ReasonCount>,
    gauges: Gauges,
}

/// prometheus-client appends `_total` to a counter's name; the names readers look for have it.
fn counter_name(total: &'static str) -> &'static str {
    total.strip_suffix("_total").unwrap_or(total)
}

/// A datapath counter: its name, its help, and the number of a [`ReasonCount`] it exports.
type DatapathCounter = (&'static str, &'static str, fn(&ReasonCount) -> u64);

impl Collector for Scrape {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> fmt::Result {
        let reason = |c: &ReasonCount| [("reason", c.reason.name()), ("verdict", verdict(c))];
        let datapath: [DatapathCounter; 2] = [
            (
                names::DATAPATH_PACKETS,
                "Packets seen by the eBPF datapath, by verdict reason.",
                |c| c.packets,
            ),
            (
                names::DATAPATH_BYTES,
                "Bytes seen by the eBPF datapath, by verdict reason.",
                |c| c.bytes,
            ),
        ];
        for (name, help, value) in datapath {
            let mut m =
                enc.encode_descriptor(counter_name(name), help, None, MetricType::Counter)?;
            for c in &self.counters {
                ConstCounter::new(value(c)).encode(m.encode_family(&reason(c))?)?;
            }
        }
        let g = &self.gauges;
        for (name, help, value) in [
            (
                names::ENDPOINTS,
                "Entries the agent wrote to the endpoint map.",
                g.endpoints as u64,
            ),
            (
                names::VTEPS,
                "Entries the agent wrote to the VTEP allow-list.",
                g.vteps as u64,
            ),
            (
                names::PUBLIC_ENTRIES,
                "Entries the agent wrote to the public-address map (gateway).",
                g.public as u64,
            ),
            (
                names::SNAT_ENTRIES,
                "Entries the agent wrote to the source-translation map (gateway).",
                g.snat as u64,
            ),
            (
                names::CONTAINERS,
                "Containers whose network side this agent runs.",
                g.containers as u64,
            ),
            (
                names::APPLIED_VERSION,
                "Registry version applied to the datapath without errors.",
                g.applied_version,
            ),
            (
                names::HOLD_ENDPOINTS,
                "Endpoints whose packets are held now.",
                g.held_endpoints as u64,
            ),
            (
                names::HOLD_QUEUED_PACKETS,
                "Packets waiting in hold queues now.",
                g.held_packets as u64,
            ),
        ] {
            let m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(value).encode(m)?;
        }
        let mut m = enc.encode_descriptor(
            counter_name(names::HOLD_PACKETS),
            "Held packets by event (held, released, overflow drops, drop-mode drops, stragglers \
             passed on, malformed drops, carried over an agent restart, drops in the hold device's \
             own queue; UDP datagrams of the paced release: paced, pace_late, pace_unbound, and \
             pace_socket_dropped: what the sockets dropped meanwhile, live datagrams included).",
            None,
            MetricType::Counter,
        )?;
        let h = &g.hold;
        for (event, n) in [
            ("held", h.held),
            ("released", h.released),
            ("overflow", h.overflow),
            ("dropped", h.dropped),
            ("straggler", h.stragglers),
            ("malformed", h.malformed),
            ("kept_over_restart", h.kept_over_restart),
            ("device_dropped", g.hold_device_dropped),
            ("paced", h.paced),
            ("pace_late", h.pace_late),
            ("pace_unbound", h.pace_unbound),
            ("pace_socket_dropped", h.pace_socket_drops),
        ] {
            ConstCounter::new(n).encode(m.encode_family(&[("event", event)])?)?;
        }
        let mut m = enc.encode_descriptor(
            counter_name(names::PEER_API_CONNECTIONS),
            "Connections to the peer API: accepted, and closed at once because their peer had \
             too many open (refused_per_peer) or the server had (refused_total), plain HTTP on \
             the TLS port (refused_plaintext), a failed TLS handshake (refused_tls).",
            None,
            MetricType::Counter,
        )?;
        for &(result, n) in &g.peer_connections {
            ConstCounter::new(n).encode(m.encode_family(&[("result", result)])?)?;
        }
        let mut m = enc.encode_descriptor(
            counter_name(names::UDP_CARRY_DATAGRAMS),
            "UDP datagrams waiting in a container's sockets at a checkpoint: carried with the \
             images, not_carried (over the size limit, or IPv6), written_back into the restored \
             sockets, lost (the destination could not read or write them back).",
            None,
            MetricType::Counter,
        )?;
        for &(event, n) in &g.udp_carry {
            ConstCounter::new(n).encode(m.encode_family(&[("event", event)])?)?;
        }
        let mut m = enc.encode_descriptor(
            counter_name(names::ANNOUNCE_FRAMES),
            "Announcements sent from arrived containers' interfaces: gratuitous ARP requests and \
             replies, IPv6 unsolicited neighbour advertisements, and rounds that failed.",
            None,
            MetricType::Counter,
        )?;
        for &(kind, n) in &g.announce {
            ConstCounter::new(n).encode(m.encode_family(&[("kind", kind)])?)?;
        }
        let mut m = enc.encode_descriptor(
            counter_name(names::PUBLIC_FAILOVER),
            "Gateway-role hosts watching the one facing the internet: heartbeats sent, heard and \
             ignored (not from a gateway-role host's VTEP); takeovers won, lost to another \
             standby, and failed (registry unreachable).",
            None,
            MetricType::Counter,
        )?;
        for &(event, n) in &g.public_failover {
            ConstCounter::new(n).encode(m.encode_family(&[("event", event)])?)?;
        }
        Ok(())
    }
}

fn verdict(c: &ReasonCount) -> &'static str {
    if c.reason.is_drop() { "drop" } else { "pass" }
}

/// Parses `ferry_datapath_packets_total` samples back out of the text (used by tests and the
/// lab's status): returns (reason, packets) pairs.
pub use ferry_config::metrics::parse_packets;

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
        // The names and labels every reader (tests, the lab, the benchmarks) looks for.
        for line in [
            "# TYPE ferry_datapath_packets_total counter\n",
            "# TYPE ferry_datapath_bytes_total counter\n",
            "# TYPE ferry_hold_packets_total counter\n",
            "# TYPE ferry_endpoints gauge\n",
            "\nferry_hold_packets_total{host=\"a1\",event=\"device_dropped\"} 0\n",
            "\nferry_hold_queued_packets{host=\"a1\"} 0\n",
            "\nferry_datapath_bytes_total{host=\"a1\",reason=\"overlay_encap\",verdict=\"pass\"} 1000\n",
        ] {
            assert!(text.contains(line), "{line:?} missing from\n{text}");
        }
        assert!(!text.contains("EOF"), "{text}");
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
