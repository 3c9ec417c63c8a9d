//! The socket hand-off's wire format (`ferry_workload::wire`, the agent's async side in
//! `ferry_agent::handoff::wire`): what a process sends its agent on the hand-off socket.

use std::{io::Write as _, os::unix::net::UnixStream};

use ferry_agent::handoff::{MAX_STATE_LEN, wire};
use ferry_fuzz::{config, largest_allocation, mutated, replay};
use ferry_workload::wire::{
    MAX_HEADER_LEN, WireError, decode_header, encode_header, header_len, recv_message, send_message,
};
use proptest::prelude::*;
use serde_json::{Map, Value, json};

const TARGET: &str = "handoff_wire";
const TOKENS: &[&[u8]] = &[
    b"\"state_len\":",
    b"\"fds\":",
    b"\"op\":\"export\",",
    b"null",
    b"1e308",
    b"-0",
    b"\xff\xff\xff\xff",
    b"\0",
];

/// What one read of a message gives, comparable across the two implementations.
#[derive(Debug, PartialEq)]
enum Read {
    Message {
        header: Value,
        fds: usize,
        payload: Vec<u8>,
    },
    Refused(String),
}

fn outcome(r: Result<wire::Message, WireError>) -> Read {
    match r {
        Ok(m) => Read::Message {
            header: m.header,
            fds: m.fds.len(),
            payload: m.payload,
        },
        Err(e) => {
            let text = e.to_string();
            assert!(!text.is_empty());
            Read::Refused(text)
        }
    }
}

/// A peer that writes `bytes` and closes its side.
fn peer(bytes: Vec<u8>) -> (UnixStream, std::thread::JoinHandle<()>) {
    let (a, b) = UnixStream::pair().expect("socketpair");
    let writer = std::thread::spawn(move || {
        let mut a = a;
        // The reader may refuse and close early: a failed write is expected then.
        let _ = a.write_all(&bytes);
    });
    (b, writer)
}

/// Reads one message from `bytes` with the client's blocking reader and the agent's async
/// one; both must agree, and neither may allocate beyond the payload limit.
fn read_both(rt: &tokio::runtime::Runtime, bytes: &[u8]) -> Read {
    let (sock, writer) = peer(bytes.to_vec());
    let (blocking, largest) = largest_allocation(|| outcome(recv_message(&sock, MAX_STATE_LEN)));
    drop(sock);
    writer.join().expect("writer");
    assert!(
        largest <= MAX_STATE_LEN.max(4 * MAX_HEADER_LEN) + 2 * bytes.len(),
        "an allocation of {largest} bytes"
    );

    let (sock, writer) = peer(bytes.to_vec());
    sock.set_nonblocking(true).expect("nonblocking");
    let (agent, largest) = largest_allocation(|| {
        rt.block_on(async {
            let sock = tokio::net::UnixStream::from_std(sock).expect("tokio socket");
            outcome(wire::recv(&sock, MAX_STATE_LEN).await)
        })
    });
    writer.join().expect("writer");
    assert!(
        largest <= MAX_STATE_LEN.max(4 * MAX_HEADER_LEN) + 2 * bytes.len(),
        "an allocation of {largest} bytes in the agent's reader"
    );
    assert_eq!(
        blocking, agent,
        "the client's and the agent's readers disagree"
    );
    blocking
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .expect("runtime")
}

#[test]
fn the_corpus_is_read_as_its_names_say() {
    let rt = runtime();
    replay(TARGET, |bytes| match read_both(&rt, bytes) {
        Read::Message { .. } => Ok(()),
        Read::Refused(e) => Err(e),
    });
}

#[test]
fn a_length_field_of_4_gb_is_refused_before_allocating() {
    let (e, largest) = largest_allocation(|| header_len([0xff; 4]).unwrap_err());
    assert!(matches!(e, WireError::HeaderTooLong(0xffff_ffff)), "{e}");
    assert!(largest < 4096, "{largest}");
    let (e, largest) =
        largest_allocation(|| decode_header(br#"{"state_len":4294967296}"#, MAX_STATE_LEN));
    let e = e.unwrap_err();
    assert!(
        e.to_string()
            .contains("state_len 4294967296 is more than the"),
        "{e}"
    );
    assert!(largest < 4096, "{largest}");
}

/// JSON leaves; no floats: serde_json (without `float_roundtrip`) may change a float's last
/// digit, and no count is a float.
fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<u64>().prop_map(|n| json!(n)),
        ".{0,24}".prop_map(Value::String),
    ]
}

fn header() -> impl Strategy<Value = Map<String, Value>> {
    let value = leaf().prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            proptest::collection::btree_map(".{0,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    });
    proptest::collection::btree_map("[a-z_]{1,10}|.{0,10}", value, 0..6)
        .prop_map(|m| m.into_iter().filter(|(k, _)| k != "fds").collect())
}

proptest! {
    #![proptest_config(config())]

    /// Any bytes: both readers agree, refuse with a typed error or read exactly what the
    /// header announces, without panicking or allocating more than the limit.
    #[test]
    fn any_bytes_are_read_alike_by_both_readers_or_refused(bytes in mutated(TARGET, TOKENS)) {
        let rt = runtime();
        if let Read::Message { header, payload, .. } = read_both(&rt, &bytes) {
            prop_assert!(header.is_object());
            let announced = header.get("state_len").and_then(Value::as_u64).unwrap_or(0);
            prop_assert_eq!(payload.len() as u64, announced);
            prop_assert!(payload.len() <= MAX_STATE_LEN);
        }
    }

    /// encode → decode is the identity for any header object and payload.
    #[test]
    fn messages_round_trip(mut h in header(), payload in proptest::collection::vec(any::<u8>(), 0..2048)) {
        h.insert("state_len".into(), json!(payload.len()));
        let h = Value::Object(h);
        let head = encode_header(&h).expect("a small header encodes");
        let len = header_len(head[..4].try_into().expect("4 bytes")).expect("length");
        prop_assert_eq!(len, head.len() - 4);
        let (back, fds, state_len) = decode_header(&head[4..], MAX_STATE_LEN).expect("decodes");
        prop_assert_eq!(&back, &h);
        prop_assert_eq!((fds, state_len), (0, payload.len()));

        let (a, b) = UnixStream::pair().expect("socketpair");
        let sent = h.clone();
        let p = payload.clone();
        let writer = std::thread::spawn(move || send_message(&a, &sent, &[], &p).map_err(|e| e.to_string()));
        let m = recv_message(&b, MAX_STATE_LEN).expect("a sent message is received");
        writer.join().expect("writer").expect("sent");
        prop_assert_eq!(m.header, h);
        prop_assert_eq!(m.payload, payload);
        prop_assert!(m.fds.is_empty());
    }
}
