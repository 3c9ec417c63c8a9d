//! The maps, and typed accessors over them.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, PerCpuArray},
};
use ferry_common::{
    Config, Counter, ENDPOINTS_MAP_FLAGS, Endpoint, MAX_ENDPOINTS, MAX_PUBLIC, MAX_VTEPS, NatKey,
    NatValue, Reason, Vtep,
};

#[map(name = "FERRY_COUNTERS")]
static COUNTERS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(Reason::COUNT, 0);

#[map(name = "FERRY_ENDPOINTS")]
static ENDPOINTS: HashMap<u32, Endpoint> =
    HashMap::with_max_entries(MAX_ENDPOINTS, ENDPOINTS_MAP_FLAGS);

#[map(name = "FERRY_VTEPS")]
static VTEPS: HashMap<u32, Vtep> = HashMap::with_max_entries(MAX_VTEPS, 0);

#[map(name = "FERRY_CONFIG")]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

/// Gateway: public address (and port) → container address (and port), plus a presence marker
/// per public address.
#[map(name = "FERRY_PUBLIC")]
static PUBLIC: HashMap<NatKey, NatValue> = HashMap::with_max_entries(MAX_PUBLIC, 0);

/// Gateway: container address (and port) → public address (and port).
#[map(name = "FERRY_SNAT")]
static SNAT: HashMap<NatKey, NatValue> = HashMap::with_max_entries(MAX_PUBLIC, 0);

#[inline(always)]
pub fn count(reason: Reason, len: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while the program runs.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += u64::from(len);
        }
    }
}

/// The configuration, read in place (not copied: the programs' stack is 512 bytes).
#[inline(always)]
pub fn config() -> Result<&'static Config, Reason> {
    match CONFIG.get(0) {
        Some(c) if c.vni != 0 => Ok(c),
        _ => Err(Reason::DropNoConfig),
    }
}

#[inline(always)]
pub fn endpoint(ip_be: u32) -> Option<Endpoint> {
    // SAFETY: the value is copied out at once; user space replaces entries whole.
    unsafe { ENDPOINTS.get(&ip_be).copied() }
}

#[inline(always)]
pub fn vtep(ip_be: u32) -> Option<Vtep> {
    // SAFETY: as above.
    unsafe { VTEPS.get(&ip_be).copied() }
}

#[inline(always)]
pub fn public_entry(key: &NatKey) -> Option<NatValue> {
    // SAFETY: as above.
    unsafe { PUBLIC.get(key).copied() }
}

#[inline(always)]
pub fn snat_entry(key: &NatKey) -> Option<NatValue> {
    // SAFETY: as above.
    unsafe { SNAT.get(key).copied() }
}
