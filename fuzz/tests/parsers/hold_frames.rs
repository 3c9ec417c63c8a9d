//! Packet parsing in user space: the frames the agent reads from the hold device
//! (`ferry_agent::hold`), and the hold queues a stopping agent saves for the next one.

use std::net::Ipv4Addr;

use ferry_agent::hold::{HoldLimits, HoldMode, HoldQueues, Verdict, frame_dst};
use ferry_fuzz::{config, largest_allocation, mutated, replay};
use proptest::prelude::*;

const HELD: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 10);
const TOKENS: &[&[u8]] = &[
    b"\x08\x00\x45",
    b"\x86\xdd\x60",
    b"\x0a\xf4\x01\x0a",
    b"FERRYHQ1",
];

fn limits() -> HoldLimits {
    HoldLimits {
        mode: HoldMode::Hold,
        max_packets: 64,
        max_bytes: 64 * 1024,
        ..HoldLimits::default()
    }
}

/// One frame into queues that hold [`HELD`]: the verdict agrees with the parsed destination.
fn push(frame: &[u8]) -> Result<Verdict, String> {
    let mut q = HoldQueues::new(limits());
    q.hold(HELD);
    let dst = frame_dst(frame);
    let (verdict, back) = q.push(frame.to_vec());
    match dst {
        None => assert_eq!(verdict, Verdict::Malformed),
        Some(ip) if ip == HELD => {
            assert_eq!(verdict, Verdict::Held);
            assert_eq!(q.release(HELD).pop_front().as_deref(), Some(frame));
        }
        Some(_) => {
            assert_eq!(verdict, Verdict::PassOn);
            assert_eq!(back.as_deref(), Some(frame));
        }
    }
    if let Some(ip) = dst {
        // The parsed address is the IPv4 header's destination field or the last 32 bits of
        // the IPv6 header's (the overlay's /96 ends in the endpoint's IPv4), nothing else.
        match frame[12..14] {
            [0x08, 0x00] => assert_eq!(ip.octets(), frame[30..34]),
            [0x86, 0xdd] => assert_eq!(ip.octets(), frame[50..54]),
            ref other => panic!("an address parsed from ethertype {other:02x?}"),
        }
    }
    match verdict {
        Verdict::Malformed => Err("neither an IPv4 nor an IPv6 frame".into()),
        v => Ok(v),
    }
}

/// Saved queues loaded into a fresh agent's queues; refusals change nothing.
fn load(bytes: &[u8]) -> Result<HoldQueues, String> {
    let mut q = HoldQueues::new(limits());
    let (outcome, largest) = largest_allocation(|| q.load(bytes));
    assert!(
        largest <= 4096 + 2 * bytes.len(),
        "an allocation of {largest} bytes for a {}-byte file",
        bytes.len()
    );
    match outcome {
        Ok(n) => {
            assert_eq!(q.total_packets(), n);
            // The loaded counters go on counting, whatever they start from.
            let mut after = HoldQueues::new(limits());
            after.load(bytes).expect("loads again");
            after.hold(HELD);
            let frame =
                std::fs::read(ferry_fuzz::corpus_dir("hold_frames").join("ok-ipv4-to-held.bin"))
                    .expect("frame");
            for f in [frame.clone(), frame, Vec::new()] {
                after.push(f);
            }
            for ip in after.held() {
                after.drain(ip);
                after.release(ip);
            }
            Ok(q)
        }
        Err(e) => {
            assert!(q.held().is_empty() && q.counters == Default::default());
            Err(e.to_string())
        }
    }
}

#[test]
fn the_corpora_are_read_as_their_names_say() {
    replay("hold_frames", |f| push(f).map(drop));
    replay("hold_saved", |b| load(b).map(drop));
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn any_frame_is_queued_passed_on_or_counted_malformed(frame in mutated("hold_frames", TOKENS)) {
        let _ = push(&frame);
    }

    /// Any saved file: refused whole or loaded; what is loaded saves back to a file that loads
    /// to the same queues.
    #[test]
    fn any_saved_queues_are_refused_or_round_trip(bytes in mutated("hold_saved", TOKENS)) {
        if let Ok(mut q) = load(&bytes) {
            let held = q.held();
            let depths: Vec<_> = held.iter().map(|ip| q.depth(*ip)).collect();
            let counters = q.counters;
            let again = q.save();
            let back = load(&again).expect("saved queues load");
            prop_assert_eq!(back.held(), held.clone());
            prop_assert_eq!(held.iter().map(|ip| back.depth(*ip)).collect::<Vec<_>>(), depths.clone());
            // The counters go on from the saved ones; what is queued again is counted once more.
            let total = depths.iter().map(|d| d.0 as u64).sum::<u64>();
            prop_assert_eq!(back.counters.held, counters.held);
            prop_assert_eq!(back.counters.overflow, counters.overflow);
            prop_assert_eq!(
                back.counters.kept_over_restart,
                counters.kept_over_restart.saturating_add(total)
            );
        }
    }
}
