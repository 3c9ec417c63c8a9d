//! Every parser of untrusted bytes under bounded property tests and a replay of its corpus
//! (`fuzz/corpus/<target>/`). See the crate docs (`fuzz/src/lib.rs`) and docs/security.md,
//! "Fuzzed parsers".

#[global_allocator]
static ALLOC: ferry_fuzz::CountingAlloc = ferry_fuzz::CountingAlloc;

mod api_bodies;
mod cni_conf;
mod config_toml;
mod handoff_wire;
mod hold_frames;
mod image_stream;
mod redis_resp;
mod tcp_state;

/// The allocation bounds below mean something only if the counting allocator is in place.
#[test]
fn the_counting_allocator_sees_allocations() {
    let (v, largest) = ferry_fuzz::largest_allocation(|| vec![0u8; 3 << 20]);
    assert_eq!(v.len(), 3 << 20);
    assert!(largest >= 3 << 20, "largest allocation seen: {largest}");
    let ((), largest) = ferry_fuzz::largest_allocation(|| ());
    assert_eq!(largest, 0);
}
