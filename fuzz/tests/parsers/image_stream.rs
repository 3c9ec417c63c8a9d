//! The CRIU image stream between agents (`ferry_agent::criu::images`): `POST /v1/images/{id}`
//! from the source agent, parsed by the destination's [`Receiver`] as it arrives.

use std::{collections::BTreeMap, net::Ipv4Addr, path::Path};

use ferry_agent::criu::images::{Header, ImageError, Receiver, encode_stream, valid_name};
use ferry_api::run::{LockMode, RuntimeKind};
use ferry_fuzz::{config, largest_allocation, mutated, replay};
use proptest::prelude::*;

const TARGET: &str = "image_stream";
/// The receiver's byte limit in these tests (the agent's is `MAX_IMAGE_BYTES`).
const LIMIT: u64 = 1 << 20;
const TOKENS: &[&[u8]] = &[
    b"FERRYIMG2\n",
    b"\x01\0\x0bpages-1.img",
    b"\x02\0\x05a.img",
    b"\0\0\0\0\0\0\0\0",
    b"\0\0",
    b"\0\x0a",
    b"../",
    b"/",
    b"\"fail_restore\":true,",
    b"\"lock\":\"criu-lock\"",
    b"\"x\":1,",
];

/// Feeds `bytes` in chunks of `chunk` into a receiver writing into `root/images`, checks the
/// properties every outcome must have, and returns the outcome with the files written.
fn receive(
    root: &Path,
    bytes: &[u8],
    chunk: usize,
) -> (Result<Header, ImageError>, BTreeMap<String, Vec<u8>>) {
    let dir = root.join("images");
    std::fs::create_dir(&dir).expect("mkdir");
    let (outcome, largest) = largest_allocation(|| {
        let mut r = Receiver::new(&dir, LIMIT);
        for c in bytes.chunks(chunk.max(1)) {
            r.feed(c)?;
        }
        r.finish().cloned()
    });
    // Buffers are bounded by the format's own limits (64 KiB header), never by a length field.
    assert!(
        largest <= (256 << 10) + 2 * bytes.len(),
        "an allocation of {largest} bytes for a {}-byte stream",
        bytes.len()
    );
    if let Err(e) = &outcome {
        assert!(!e.to_string().is_empty());
    }
    // Nothing was written outside the directory, only plain names, within the limit.
    let outside: Vec<_> = std::fs::read_dir(root)
        .expect("root")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(outside, ["images"], "files outside the image directory");
    let mut files = BTreeMap::new();
    for e in std::fs::read_dir(&dir).expect("dir") {
        let e = e.expect("entry");
        let name = e.file_name().to_string_lossy().into_owned();
        assert!(valid_name(&name), "a file named {name:?} was written");
        assert!(e.file_type().expect("type").is_file());
        files.insert(name, std::fs::read(e.path()).expect("read"));
    }
    let total: usize = files.values().map(Vec::len).sum();
    assert!(
        total as u64 <= LIMIT,
        "{total} bytes written over the limit"
    );
    std::fs::remove_dir_all(&dir).expect("clean up");
    (outcome, files)
}

fn stream(h: &Header, files: &BTreeMap<String, Vec<u8>>) -> Vec<u8> {
    let files: Vec<(&str, &[u8])> = files
        .iter()
        .map(|(n, b)| (n.as_str(), b.as_slice()))
        .collect();
    encode_stream(h, &files)
}

fn header() -> impl Strategy<Value = Header> {
    (
        ".{0,16}",
        any::<u32>(),
        "[a-z0-9-]{0,12}",
        prop_oneof![Just(LockMode::Hold), Just(LockMode::CriuLock)],
        proptest::collection::vec(".{0,12}", 0..4),
        any::<bool>(),
        proptest::option::of("[a-z0-9-]{1,24}"),
    )
        .prop_map(
            |(migration, ip, from, lock, argv, fail_restore, image)| Header {
                migration,
                container: Ipv4Addr::from(ip),
                from,
                lock,
                argv,
                fail_restore,
                runtime: if image.is_some() {
                    RuntimeKind::Runc
                } else {
                    RuntimeKind::Agent
                },
                image,
                lazy: None,
            },
        )
}

fn files() -> impl Strategy<Value = BTreeMap<String, Vec<u8>>> {
    proptest::collection::btree_map(
        "[!-~]{1,40}".prop_filter("a valid file name", |n| valid_name(n)),
        proptest::collection::vec(any::<u8>(), 0..3000),
        0..5,
    )
}

#[test]
fn the_corpus_is_read_as_its_names_say() {
    let root = tempfile::tempdir().expect("tempdir");
    replay(TARGET, |bytes| {
        receive(root.path(), bytes, bytes.len()).0.map(drop)
    });
    // Byte by byte, the same outcomes.
    replay(TARGET, |bytes| receive(root.path(), bytes, 1).0.map(drop));
}

proptest! {
    #![proptest_config(config())]

    /// Any bytes, cut anywhere: a typed error or a complete stream, no panic, no allocation
    /// sized by a length field, nothing written outside the directory or over the limit.
    #[test]
    fn any_stream_is_refused_or_written_inside_its_directory(
        bytes in mutated(TARGET, TOKENS),
        chunk in 1..4096usize,
    ) {
        let root = tempfile::tempdir().expect("tempdir");
        let (whole, files) = receive(root.path(), &bytes, bytes.len());
        let (pieces, files_in_pieces) = receive(root.path(), &bytes, chunk);
        // How the bytes arrive does not change the outcome.
        prop_assert_eq!(whole.is_ok(), pieces.is_ok());
        if let (Ok(h), Ok(h2)) = (&whole, &pieces) {
            prop_assert_eq!(h, h2);
            prop_assert_eq!(&files, &files_in_pieces);
            // What was accepted encodes back to the same stream (files in name order).
            let again = stream(h, &files);
            let (back, back_files) = receive(root.path(), &again, again.len());
            prop_assert_eq!(back.as_ref().ok(), Some(h));
            prop_assert_eq!(back_files, files);
        }
    }

    /// encode → receive is the identity, however the stream is cut.
    #[test]
    fn streams_round_trip(h in header(), files in files(), chunk in 1..9000usize) {
        let root = tempfile::tempdir().expect("tempdir");
        let bytes = stream(&h, &files);
        let (got, got_files) = receive(root.path(), &bytes, chunk);
        prop_assert_eq!(got, Ok(h));
        prop_assert_eq!(got_files, files);
    }
}
