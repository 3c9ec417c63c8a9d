//! Bounded fuzzing of ferry's parsers of untrusted bytes, as ordinary `cargo test` tests (so
//! `scripts/test.sh` and CI run them): property tests (proptest) whose inputs are either built
//! from the parser's own types or mutations of a corpus kept in the repository
//! (`fuzz/corpus/<target>/`), plus a replay of every corpus file as it is.
//!
//! - [`cases`]: how many cases each property runs: [`DEFAULT_CASES`], or `FERRY_FUZZ_CASES`
//!   for a longer run (`FERRY_FUZZ_CASES=100000 cargo test -p ferry-fuzz --release`).
//! - [`corpus`] / [`replay`]: a corpus file named `ok-*` must be accepted, `bad-*` refused.
//! - [`mutated`]: a seed from a corpus with a few edits (bit flips, inserted tokens, boundary
//!   numbers written over length fields, truncation, duplication).
//! - [`CountingAlloc`] / [`largest_allocation`]: the largest single allocation a parser made,
//!   so a test can assert that a length field announcing 4 GB is refused before allocating.
//!
//! The test binary is `fuzz/tests/parsers.rs`, one module per target.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    cell::Cell,
    path::{Path, PathBuf},
};

use proptest::prelude::*;
use proptest::test_runner::Config;

/// Cases per property in an ordinary `cargo test` run (the whole set stays within seconds in
/// a debug build).
pub const DEFAULT_CASES: u32 = 512;

/// Cases per property: `FERRY_FUZZ_CASES` if set (a positive number), else [`DEFAULT_CASES`].
pub fn cases() -> u32 {
    std::env::var("FERRY_FUZZ_CASES")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or(DEFAULT_CASES)
}

/// The proptest configuration of every property: [`cases`] cases; a failure is shrunk and its
/// seed saved in `fuzz/tests/proptest-regressions/<target>.txt` (proptest's regression files,
/// replayed first by the next run: commit them).
pub fn config() -> Config {
    Config {
        cases: cases(),
        ..Config::default()
    }
}

/// One corpus file.
#[derive(Debug, Clone)]
pub struct Seed {
    pub name: String,
    pub bytes: Vec<u8>,
}

impl Seed {
    /// What the file's name promises: `Some(true)` for `ok-*` (accepted), `Some(false)` for
    /// `bad-*` (refused), `None` for anything else (only: no panic).
    pub fn expect_ok(&self) -> Option<bool> {
        if self.name.starts_with("ok-") {
            Some(true)
        } else if self.name.starts_with("bad-") {
            Some(false)
        } else {
            None
        }
    }
}

/// `fuzz/corpus/<target>`.
pub fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target)
}

/// Every file of `fuzz/corpus/<target>`, by name. Panics if the directory is missing or
/// empty: a target without a corpus is a mistake.
pub fn corpus(target: &str) -> Vec<Seed> {
    let dir = corpus_dir(target);
    let mut seeds: Vec<Seed> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()))
        .map(|e| {
            let e = e.expect("corpus entry");
            Seed {
                name: e.file_name().to_string_lossy().into_owned(),
                bytes: std::fs::read(e.path()).expect("corpus file"),
            }
        })
        .filter(|s| !s.name.starts_with('.') && s.name != "README.md")
        .collect();
    assert!(!seeds.is_empty(), "corpus {} is empty", dir.display());
    seeds.sort_by(|a, b| a.name.cmp(&b.name));
    seeds
}

/// Runs `parse` on every corpus file of `target` as it is and checks what the file's name
/// promises (`ok-*` accepted, `bad-*` refused with the error's message shown). `parse` itself
/// asserts the target's properties (it may panic).
pub fn replay<E: std::fmt::Display>(target: &str, mut parse: impl FnMut(&[u8]) -> Result<(), E>) {
    let mut wrong = Vec::new();
    for seed in corpus(target) {
        let outcome = parse(&seed.bytes);
        match (seed.expect_ok(), outcome) {
            (Some(false), Ok(())) => wrong.push(format!("{}: accepted", seed.name)),
            (Some(true), Err(e)) => wrong.push(format!("{}: refused: {e}", seed.name)),
            (_, Err(e)) => assert!(
                !e.to_string().trim().is_empty(),
                "{}: an error without a message",
                seed.name
            ),
            _ => {}
        }
    }
    assert!(wrong.is_empty(), "corpus {target}:\n{}", wrong.join("\n"));
}

/// Numbers that break length fields and bounds.
pub const BOUNDARIES: &[u64] = &[
    0,
    1,
    0x7f,
    0x80,
    0xff,
    0x100,
    0x7fff,
    0xffff,
    0x1_0000,
    0x1_0001,
    0x10_0000,
    0x7fff_ffff,
    0xffff_ffff,
    0x1_0000_0000,
    i64::MAX as u64,
    u64::MAX,
];

/// One edit of a seed. Positions are taken modulo the input's length (plus one).
#[derive(Debug, Clone)]
pub enum Edit {
    Flip {
        at: usize,
        bit: u8,
    },
    Set {
        at: usize,
        byte: u8,
    },
    Insert {
        at: usize,
        bytes: Vec<u8>,
    },
    Remove {
        at: usize,
        len: usize,
    },
    Truncate {
        at: usize,
    },
    /// A boundary number written big- or little-endian over `width` bytes at `at`.
    Number {
        at: usize,
        value: u64,
        width: u8,
        big: bool,
    },
    /// A boundary number inserted as decimal text (for JSON, TOML, RESP).
    Decimal {
        at: usize,
        value: u64,
        negative: bool,
    },
    /// One of the target's tokens inserted (field names, keywords, separators).
    Token {
        at: usize,
        token: &'static [u8],
    },
    /// Bytes `at..at+len` repeated right after themselves.
    Duplicate {
        at: usize,
        len: usize,
    },
}

impl Edit {
    pub fn apply(&self, b: &mut Vec<u8>) {
        let pos = |at: usize, b: &Vec<u8>| at % (b.len() + 1);
        match *self {
            Edit::Flip { at, bit } if !b.is_empty() => {
                let i = at % b.len();
                b[i] ^= 1 << (bit % 8);
            }
            Edit::Set { at, byte } if !b.is_empty() => {
                let i = at % b.len();
                b[i] = byte;
            }
            Edit::Insert { at, ref bytes } => {
                let i = pos(at, b);
                b.splice(i..i, bytes.iter().copied());
            }
            Edit::Remove { at, len } => {
                let i = pos(at, b);
                let end = (i + len).min(b.len());
                b.drain(i..end);
            }
            Edit::Truncate { at } => {
                let i = pos(at, b);
                b.truncate(i);
            }
            Edit::Number {
                at,
                value,
                width,
                big,
            } => {
                let width = [1usize, 2, 4, 8][usize::from(width % 4)];
                let bytes = if big {
                    value.to_be_bytes()[8 - width..].to_vec()
                } else {
                    value.to_le_bytes()[..width].to_vec()
                };
                let i = pos(at, b);
                let end = (i + width).min(b.len());
                b.splice(i..end, bytes);
            }
            Edit::Decimal {
                at,
                value,
                negative,
            } => {
                let text = if negative {
                    format!("-{value}")
                } else {
                    value.to_string()
                };
                let i = pos(at, b);
                b.splice(i..i, text.into_bytes());
            }
            Edit::Token { at, token } => {
                let i = pos(at, b);
                b.splice(i..i, token.iter().copied());
            }
            Edit::Duplicate { at, len } => {
                let i = pos(at, b);
                let end = (i + len).min(b.len());
                let copy = b[i..end].to_vec();
                b.splice(end..end, copy);
            }
            Edit::Flip { .. } | Edit::Set { .. } => {}
        }
    }
}

fn edit(tokens: &'static [&'static [u8]]) -> impl Strategy<Value = Edit> {
    let at = any::<usize>();
    let boundary = proptest::sample::select(BOUNDARIES);
    let token = if tokens.is_empty() {
        Just(&b""[..]).boxed()
    } else {
        proptest::sample::select(tokens).boxed()
    };
    prop_oneof![
        (at, any::<u8>()).prop_map(|(at, bit)| Edit::Flip { at, bit }),
        (at, any::<u8>()).prop_map(|(at, byte)| Edit::Set { at, byte }),
        (at, proptest::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(at, bytes)| Edit::Insert { at, bytes }),
        (at, 1..16usize).prop_map(|(at, len)| Edit::Remove { at, len }),
        at.prop_map(|at| Edit::Truncate { at }),
        (at, boundary.clone(), any::<u8>(), any::<bool>()).prop_map(|(at, value, width, big)| {
            Edit::Number {
                at,
                value,
                width,
                big,
            }
        }),
        (at, boundary, any::<bool>()).prop_map(|(at, value, negative)| {
            Edit::Decimal {
                at,
                value,
                negative,
            }
        }),
        (at, token).prop_map(|(at, token)| Edit::Token { at, token }),
        (at, 1..64usize).prop_map(|(at, len)| Edit::Duplicate { at, len }),
    ]
}

/// A corpus file of `target` with up to six edits (tokens from `tokens`), or, one time in
/// eight, arbitrary bytes.
pub fn mutated(
    target: &str,
    tokens: &'static [&'static [u8]],
) -> impl Strategy<Value = Vec<u8>> + use<> {
    let seeds: Vec<Vec<u8>> = corpus(target).into_iter().map(|s| s.bytes).collect();
    let edited = (
        proptest::sample::select(seeds),
        proptest::collection::vec(edit(tokens), 0..6),
    )
        .prop_map(|(mut bytes, edits)| {
            for e in &edits {
                e.apply(&mut bytes);
            }
            bytes
        });
    prop_oneof![
        7 => edited,
        1 => proptest::collection::vec(any::<u8>(), 0..512),
    ]
}

/// A global allocator that records, per thread, the largest single allocation requested
/// (install it with `#[global_allocator]` in a test binary). Hand-written: a dozen lines over
/// `System`, where allocation-tracking crates count totals, not the largest request.
pub struct CountingAlloc;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // `try_with`: during thread teardown the slot may be gone; nothing to record then.
    let _ = LARGEST.try_with(|l| {
        if size > l.get() {
            l.set(size);
        }
    });
}

// SAFETY: every call is forwarded unchanged to `System`; only the requested size is recorded
// (in a const-initialized thread local, which never allocates).
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's contract for `alloc` is passed on to `System`.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: `ptr` and `layout` come from this allocator, i.e. from `System`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` and `layout` come from this allocator, i.e. from `System`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// Runs `f` and returns its result with the largest single allocation it made on this thread
/// (0 unless [`CountingAlloc`] is the global allocator).
pub fn largest_allocation<R>(f: impl FnOnce() -> R) -> (R, usize) {
    LARGEST.with(|l| l.set(0));
    let r = f();
    (r, LARGEST.with(Cell::get))
}
