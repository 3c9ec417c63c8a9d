//! What the agent exports on `metrics_listen` (`GET /metrics`, Prometheus text): the metric
//! names its readers (tests, the lab, the benchmarks) look for, and a parser for the datapath's
//! packet counters.
//!
//! Every sample carries a `host` label. Counters (names ending in `_total`) carry `reason` and
//! `verdict` (datapath) or `event` (hold queues); gauges carry only `host`.

/// Packets seen by the eBPF datapath, by `reason` and `verdict`.
pub const DATAPATH_PACKETS: &str = "ferry_datapath_packets_total";
/// Bytes seen by the eBPF datapath, by `reason` and `verdict`.
pub const DATAPATH_BYTES: &str = "ferry_datapath_bytes_total";
/// Held packets by `event`.
pub const HOLD_PACKETS: &str = "ferry_hold_packets_total";
/// Connections to the agent's peer API, by result (accepted, refused_per_peer, refused_total).
pub const PEER_API_CONNECTIONS: &str = "ferry_peer_api_connections_total";
/// UDP datagrams waiting in a container's sockets at a checkpoint, by event: `carried`
/// (read at the source, sent with the images), `not_carried` (left out: over the size
/// limit, or IPv6), `written_back` (into the restored sockets), `lost` (the destination
/// could not read or write them back).
pub const UDP_CARRY_DATAGRAMS: &str = "ferry_udp_carry_datagrams_total";
/// Announcement frames sent from arrived containers' interfaces, by `kind`: `garp_request`,
/// `garp_reply`, `neighbour_advert` (IPv6 unsolicited NA), and `failed` (frames of rounds that
/// did not go out whole).
pub const ANNOUNCE_FRAMES: &str = "ferry_announce_frames_total";
/// Agent (gateway role): heartbeats and takeovers of the internet side, by `event`.
pub const PUBLIC_FAILOVER: &str = "ferry_public_failover_total";
/// Entries in the endpoint map.
pub const ENDPOINTS: &str = "ferry_endpoints";
/// Entries in the VTEP allow-list.
pub const VTEPS: &str = "ferry_vteps";
/// Entries in the public-address map (gateway).
pub const PUBLIC_ENTRIES: &str = "ferry_public_entries";
/// Entries in the source-translation map (gateway).
pub const SNAT_ENTRIES: &str = "ferry_snat_entries";
/// Containers whose network side this agent runs.
pub const CONTAINERS: &str = "ferry_containers";
/// Registry version applied to the datapath without errors.
pub const APPLIED_VERSION: &str = "ferry_registry_applied_version";
/// Endpoints whose packets are held now.
pub const HOLD_ENDPOINTS: &str = "ferry_hold_endpoints";
/// Packets waiting in hold queues now.
pub const HOLD_QUEUED_PACKETS: &str = "ferry_hold_queued_packets";

/// Parses `ferry_datapath_packets_total` samples back out of the text (used by tests and the
/// lab's status): returns (reason, packets) pairs.
pub fn parse_packets(text: &str) -> Vec<(String, u64)> {
    let prefix = format!("{DATAPATH_PACKETS}{{");
    text.lines()
        .filter(|l| l.starts_with(&prefix))
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

    #[test]
    fn parses_packet_counters_only() {
        let text = "# TYPE ferry_datapath_packets counter\n\
            ferry_datapath_packets_total{host=\"a1\",reason=\"overlay_encap\",verdict=\"pass\"} 10\n\
            ferry_datapath_bytes_total{host=\"a1\",reason=\"overlay_encap\",verdict=\"pass\"} 900\n\
            ferry_datapath_packets_total{host=\"a1\",reason=\"unknown_vtep\",verdict=\"drop\"} 5\n\
            # EOF\n";
        assert_eq!(
            parse_packets(text),
            [
                ("overlay_encap".to_owned(), 10),
                ("unknown_vtep".to_owned(), 5)
            ]
        );
    }
}
