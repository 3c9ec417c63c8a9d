//! [`TcpState`]: everything needed to rebuild a TCP connection, serializable with serde.
//!
//! Queue bytes are serialized as standard base64 strings (RFC 4648, with padding): compact in
//! JSON (4 characters per 3 bytes, where an array of numbers costs up to 4 per byte) and still
//! readable by any tool. Binary serde formats get the same string.

use std::fmt;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result, Step};
use crate::sys::RepairWindow;

/// The kernel's TCP state (`tcpi_state`, `include/net/tcp_states.h`), for messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelState(pub u8);

impl KernelState {
    /// TCP_ESTABLISHED
    pub const ESTABLISHED: KernelState = KernelState(1);
    /// TCP_SYN_SENT
    pub const SYN_SENT: KernelState = KernelState(2);
    /// TCP_SYN_RECV
    pub const SYN_RECV: KernelState = KernelState(3);
    /// TCP_FIN_WAIT1
    pub const FIN_WAIT1: KernelState = KernelState(4);
    /// TCP_FIN_WAIT2
    pub const FIN_WAIT2: KernelState = KernelState(5);
    /// TCP_TIME_WAIT
    pub const TIME_WAIT: KernelState = KernelState(6);
    /// TCP_CLOSE
    pub const CLOSE: KernelState = KernelState(7);
    /// TCP_CLOSE_WAIT
    pub const CLOSE_WAIT: KernelState = KernelState(8);
    /// TCP_LAST_ACK
    pub const LAST_ACK: KernelState = KernelState(9);
    /// TCP_LISTEN
    pub const LISTEN: KernelState = KernelState(10);
    /// TCP_CLOSING
    pub const CLOSING: KernelState = KernelState(11);
    /// TCP_NEW_SYN_RECV
    pub const NEW_SYN_RECV: KernelState = KernelState(12);

    /// The kernel's name of the state.
    pub fn name(self) -> &'static str {
        match self.0 {
            1 => "ESTABLISHED",
            2 => "SYN_SENT",
            3 => "SYN_RECV",
            4 => "FIN_WAIT1",
            5 => "FIN_WAIT2",
            6 => "TIME_WAIT",
            7 => "CLOSE",
            8 => "CLOSE_WAIT",
            9 => "LAST_ACK",
            10 => "LISTEN",
            11 => "CLOSING",
            12 => "NEW_SYN_RECV",
            _ => "UNKNOWN",
        }
    }
}

impl fmt::Display for KernelState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}({})", self.name(), self.0)
    }
}

/// The TCP states that can be moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnState {
    /// Both directions open.
    Established,
    /// The peer sent a FIN and we acknowledged it; we can still send. Reading returns the
    /// queued bytes, then end of file.
    CloseWait,
    /// We shut down our sending side; our FIN is queued or in flight, not acknowledged. The
    /// peer can still send.
    FinWait1,
    /// We shut down our sending side and the peer acknowledged our FIN. The peer can still send.
    FinWait2,
}

impl ConnState {
    /// The movable state for a kernel state, or why it is refused.
    pub fn from_kernel(state: KernelState) -> std::result::Result<ConnState, &'static str> {
        match state {
            KernelState::ESTABLISHED => Ok(ConnState::Established),
            KernelState::CLOSE_WAIT => Ok(ConnState::CloseWait),
            KernelState::FIN_WAIT1 => Ok(ConnState::FinWait1),
            KernelState::FIN_WAIT2 => Ok(ConnState::FinWait2),
            KernelState::LISTEN => {
                Err("a listening socket has no connection to move (re-create it instead)")
            }
            KernelState::SYN_SENT | KernelState::SYN_RECV | KernelState::NEW_SYN_RECV => {
                Err("the handshake is not complete")
            }
            KernelState::CLOSING | KernelState::LAST_ACK => {
                Err("both sides sent a FIN and ours is not acknowledged: the connection is closing")
            }
            KernelState::TIME_WAIT => Err("the connection is closed (TIME_WAIT)"),
            KernelState::CLOSE => Err("the socket is closed or was reset"),
            _ => Err("unknown TCP state"),
        }
    }

    /// The kernel state a restored socket ends in (FIN_WAIT2 passes through FIN_WAIT1 until
    /// the peer acknowledges our FIN again, see the crate docs).
    pub fn kernel(self) -> KernelState {
        match self {
            ConnState::Established => KernelState::ESTABLISHED,
            ConnState::CloseWait => KernelState::CLOSE_WAIT,
            ConnState::FinWait1 => KernelState::FIN_WAIT1,
            ConnState::FinWait2 => KernelState::FIN_WAIT2,
        }
    }
}

/// Where our own FIN is, if we shut down our sending side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OurFin {
    /// No FIN: we can still send (ESTABLISHED, CLOSE_WAIT).
    None,
    /// Queued behind unsent data, never transmitted (FIN_WAIT1).
    Unsent,
    /// Transmitted, not acknowledged (FIN_WAIT1).
    Sent,
    /// Acknowledged by the peer (FIN_WAIT2).
    Acked,
}

/// Options negotiated in the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpOptions {
    /// MSS clamp (`TCP_MAXSEG` read in repair mode: the peer's announced MSS, clamped).
    pub mss: u32,
    /// SACK permitted.
    pub sack: bool,
    /// Timestamps (RFC 7323).
    pub timestamps: bool,
    /// Window scaling, if negotiated.
    pub wscale: Option<WindowScale>,
}

/// Window scale shifts of both directions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowScale {
    /// Shift the peer applies to the windows it announces (we apply it when reading them).
    pub snd: u8,
    /// Shift we apply to the windows we announce.
    pub rcv: u8,
}

/// Window state (`struct tcp_repair_window`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Window {
    /// Sequence number of the segment that last updated the send window.
    pub snd_wl1: u32,
    /// The peer's receive window (bytes, scaled).
    pub snd_wnd: u32,
    /// The largest window the peer ever announced.
    pub max_window: u32,
    /// Our receive window (bytes).
    pub rcv_wnd: u32,
    /// `rcv_nxt` when we last announced a window.
    pub rcv_wup: u32,
}

impl From<RepairWindow> for Window {
    fn from(w: RepairWindow) -> Self {
        Window {
            snd_wl1: w.snd_wl1,
            snd_wnd: w.snd_wnd,
            max_window: w.max_window,
            rcv_wnd: w.rcv_wnd,
            rcv_wup: w.rcv_wup,
        }
    }
}

impl From<Window> for RepairWindow {
    fn from(w: Window) -> Self {
        RepairWindow {
            snd_wl1: w.snd_wl1,
            snd_wnd: w.snd_wnd,
            max_window: w.max_window,
            rcv_wnd: w.rcv_wnd,
            rcv_wup: w.rcv_wup,
        }
    }
}

/// A dumped TCP connection.
///
/// Sequence numbers are the kernel's, as `TCP_QUEUE_SEQ` reports them: `send_seq` is
/// `write_seq`, the number after the last byte the application queued (after our FIN, if one
/// is queued); `recv_seq` is `rcv_nxt`, the next number expected from the peer (after the
/// peer's FIN, in CLOSE_WAIT). The first unacknowledged byte is
/// [`snd_una`](TcpState::snd_una), the first unread byte [`copied_seq`](TcpState::copied_seq).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpState {
    /// Format version, [`TcpState::VERSION`]. Restore refuses any other.
    pub version: u32,
    /// Which movable state the connection was in.
    pub state: ConnState,
    /// Our address (for an IPv6 socket talking IPv4, the v4-mapped IPv6 address).
    pub local: SocketAddr,
    /// The peer's address.
    pub peer: SocketAddr,
    /// `write_seq` (TCP_QUEUE_SEQ on the send queue).
    pub send_seq: u32,
    /// `rcv_nxt` (TCP_QUEUE_SEQ on the receive queue).
    pub recv_seq: u32,
    /// Bytes sent but not acknowledged by the peer (SIOCOUTQ − SIOCOUTQNSD, minus our FIN).
    #[serde(with = "b64")]
    pub unacked: Vec<u8>,
    /// Bytes queued but never sent (SIOCOUTQNSD, minus our FIN).
    #[serde(with = "b64")]
    pub unsent: Vec<u8>,
    /// Bytes received and acknowledged but not read by the application (SIOCINQ).
    #[serde(with = "b64")]
    pub recv_queue: Vec<u8>,
    /// Our FIN.
    pub our_fin: OurFin,
    /// The peer's FIN was received (it is counted in `recv_seq`).
    pub peer_fin: bool,
    /// Negotiated options.
    pub options: TcpOptions,
    /// `TCP_TIMESTAMP`: our current timestamp clock (with its random offset), if timestamps
    /// are on. Restored so the peer's PAWS check accepts our segments.
    pub timestamp: Option<u32>,
    /// Window state.
    pub window: Window,
    /// SO_SNDBUF as getsockopt reports it (twice the value set).
    pub sndbuf: u32,
    /// SO_RCVBUF as getsockopt reports it.
    pub rcvbuf: u32,
    /// SO_REUSEADDR of the original socket (re-applied after repair mode).
    pub reuse_addr: bool,
}

impl TcpState {
    /// The format version this build writes and reads.
    pub const VERSION: u32 = 1;

    /// Our FIN takes one sequence number in `send_seq`.
    fn our_fin_len(&self) -> u32 {
        u32::from(self.our_fin != OurFin::None)
    }

    /// The first unacknowledged sequence number (`snd_una`): where the restored send queue
    /// starts.
    pub fn snd_una(&self) -> u32 {
        self.send_seq
            .wrapping_sub(self.our_fin_len())
            .wrapping_sub(self.unsent.len() as u32)
            .wrapping_sub(self.unacked.len() as u32)
    }

    /// The first sequence number the application has not read (`copied_seq`): where the
    /// restored receive queue starts.
    pub fn copied_seq(&self) -> u32 {
        self.recv_seq
            .wrapping_sub(u32::from(self.peer_fin))
            .wrapping_sub(self.recv_queue.len() as u32)
    }

    /// Checks the version and that the fields agree with each other.
    pub fn validate(&self) -> Result<()> {
        if self.version != Self::VERSION {
            return Err(Error::UnsupportedVersion {
                step: Step::Validate,
                found: self.version,
                supported: Self::VERSION,
            });
        }
        let invalid = |msg: String| Err(Error::Invalid(msg));
        if self.local.is_ipv4() != self.peer.is_ipv4() {
            return invalid(format!(
                "local {} and peer {} are of different families",
                self.local, self.peer
            ));
        }
        let (fin_ok, peer_fin_ok) = match self.state {
            ConnState::Established => (self.our_fin == OurFin::None, !self.peer_fin),
            ConnState::CloseWait => (self.our_fin == OurFin::None, self.peer_fin),
            ConnState::FinWait1 => (
                matches!(self.our_fin, OurFin::Unsent | OurFin::Sent),
                !self.peer_fin,
            ),
            ConnState::FinWait2 => (self.our_fin == OurFin::Acked, !self.peer_fin),
        };
        if !fin_ok || !peer_fin_ok {
            return invalid(format!(
                "state {:?} with our_fin {:?} and peer_fin {}",
                self.state, self.our_fin, self.peer_fin
            ));
        }
        if matches!(self.our_fin, OurFin::Sent | OurFin::Acked) && !self.unsent.is_empty() {
            return invalid("unsent bytes behind a FIN that was already sent".into());
        }
        if self.our_fin == OurFin::Acked && !self.unacked.is_empty() {
            return invalid("unacknowledged bytes before an acknowledged FIN".into());
        }
        if self.window.max_window < self.window.snd_wnd {
            return invalid("window.max_window < window.snd_wnd".into());
        }
        if self.options.mss == 0 {
            return invalid("options.mss is 0".into());
        }
        if let Some(ws) = self.options.wscale
            && (ws.snd > 14 || ws.rcv > 14)
        {
            return invalid(format!("window scale {ws:?} above 14"));
        }
        if self.options.timestamps != self.timestamp.is_some() {
            return invalid("options.timestamps and timestamp disagree".into());
        }
        Ok(())
    }
}

/// serde helper: `Vec<u8>` as a standard base64 string.
mod b64 {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        STANDARD
            .decode(s.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
pub(crate) use tests::sample;

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> TcpState {
        TcpState {
            version: TcpState::VERSION,
            state: ConnState::Established,
            local: "10.99.0.2:5000".parse().unwrap(),
            peer: "10.99.0.1:40000".parse().unwrap(),
            send_seq: 1_000_100,
            recv_seq: 2_000_010,
            unacked: (0..60u8).collect(),
            unsent: (60..100u8).collect(),
            recv_queue: b"0123456789".to_vec(),
            our_fin: OurFin::None,
            peer_fin: false,
            options: TcpOptions {
                mss: 1448,
                sack: true,
                timestamps: true,
                wscale: Some(WindowScale { snd: 7, rcv: 7 }),
            },
            timestamp: Some(123_456),
            window: Window {
                snd_wl1: 2_000_000,
                snd_wnd: 65_536,
                max_window: 65_536,
                rcv_wnd: 65_536,
                rcv_wup: 2_000_010,
            },
            sndbuf: 87_040,
            rcvbuf: 131_072,
            reuse_addr: false,
        }
    }

    #[test]
    fn json_round_trip() {
        let mut st = sample();
        st.unsent = (0..=255u8).cycle().take(1000).collect();
        st.send_seq = st.send_seq.wrapping_add(960);
        let json = serde_json::to_string_pretty(&st).unwrap();
        assert!(json.contains("\"version\": 1"), "{json}");
        assert!(
            json.contains("\"recv_queue\": \"MDEyMzQ1Njc4OQ==\""),
            "{json}"
        );
        assert!(json.contains("\"state\": \"established\""), "{json}");
        let back: TcpState = serde_json::from_str(&json).unwrap();
        assert_eq!(back, st);
        back.validate().unwrap();
    }

    #[test]
    fn ipv6_and_mapped_addresses_round_trip() {
        let mut st = sample();
        st.local = "[fd99::2]:5000".parse().unwrap();
        st.peer = "[::ffff:10.99.0.1]:40000".parse().unwrap();
        let back: TcpState = serde_json::from_str(&serde_json::to_string(&st).unwrap()).unwrap();
        assert_eq!(back, st);
    }

    #[test]
    fn sequence_arithmetic_wraps() {
        let mut st = sample();
        st.send_seq = 50; // the queue started before the 2^32 wrap
        st.our_fin = OurFin::Unsent;
        st.state = ConnState::FinWait1;
        assert_eq!(st.snd_una(), 50u32.wrapping_sub(1 + 40 + 60));
        st.recv_seq = 3;
        st.peer_fin = false;
        assert_eq!(st.copied_seq(), 3u32.wrapping_sub(10));
    }

    #[test]
    fn validate_rejects_other_versions_and_contradictions() {
        let mut st = sample();
        st.version = 2;
        assert!(matches!(
            st.validate(),
            Err(Error::UnsupportedVersion { found: 2, .. })
        ));

        let mut st = sample();
        st.our_fin = OurFin::Sent;
        st.state = ConnState::FinWait1;
        assert!(
            matches!(st.validate(), Err(Error::Invalid(_))),
            "unsent behind a sent FIN"
        );

        let mut st = sample();
        st.peer_fin = true;
        assert!(
            matches!(st.validate(), Err(Error::Invalid(_))),
            "peer FIN in ESTABLISHED"
        );

        let mut st = sample();
        st.peer = "[fd99::1]:1".parse().unwrap();
        assert!(
            matches!(st.validate(), Err(Error::Invalid(_))),
            "mixed families"
        );
    }

    #[test]
    fn bad_base64_is_a_clear_error() {
        let mut v = serde_json::to_value(sample()).unwrap();
        v["unacked"] = serde_json::Value::String("not base64!".into());
        let err = serde_json::from_value::<TcpState>(v).unwrap_err();
        assert!(err.to_string().contains("Invalid"), "{err}");
    }
}
