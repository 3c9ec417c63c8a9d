//! The workload client's RESP2 reader (`ferry_workload::redis`): replies from a server under
//! test, read by the benchmark's Redis client.

use ferry_fuzz::{config, largest_allocation, mutated, replay};
use ferry_workload::redis::{Limits, Reply, RespReader, encode, parse};
use proptest::prelude::*;

const TARGET: &str = "redis_resp";
const TOKENS: &[&[u8]] = &[b"\r\n", b"*", b"$", b":", b"+", b"-", b"-1", b"\n"];

fn read(bytes: &[u8]) -> Result<Reply, String> {
    let lim = Limits::default();
    let (outcome, largest) = largest_allocation(|| parse(bytes, &lim));
    assert!(
        largest <= 64 * 1024 + 2 * bytes.len(),
        "an allocation of {largest} bytes for {} bytes",
        bytes.len()
    );
    match outcome {
        Ok(Some((reply, used))) => {
            assert!(used <= bytes.len());
            Ok(reply)
        }
        Ok(None) => Err("incomplete".into()),
        Err(e) => Err(e.to_string()),
    }
}

#[test]
fn the_corpus_is_read_as_its_names_say() {
    replay(TARGET, |b| read(b).map(drop));
}

proptest! {
    #![proptest_config(config())]

    /// Any bytes, fed in pieces: the incremental reader gives the same first reply as a
    /// whole parse, or an error, without panicking.
    #[test]
    fn any_bytes_are_parsed_alike_whole_or_in_pieces(bytes in mutated(TARGET, TOKENS), cut in any::<usize>()) {
        let whole = read(&bytes);
        let mut r = RespReader::new(Limits::default());
        let cut = cut % (bytes.len() + 1);
        r.feed(&bytes[..cut]);
        let first = match r.next_reply() {
            Ok(Some(reply)) => Ok(reply),
            Ok(None) => {
                r.feed(&bytes[cut..]);
                r.next_reply().map_err(|e| e.to_string()).and_then(|o| o.ok_or_else(|| "incomplete".to_owned()))
            }
            Err(e) => Err(e.to_string()),
        };
        prop_assert_eq!(first, whole);
    }

    /// encode → parse is the identity for a command.
    #[test]
    fn commands_round_trip(args in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..16)) {
        let bytes = encode(&args);
        prop_assert_eq!(read(&bytes), Ok(Reply::Array(args.into_iter().map(Reply::Bulk).collect())));
    }
}
