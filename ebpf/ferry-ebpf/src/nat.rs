//! Stateless address and port translation with incremental checksum updates (RFC 1624, via the
//! kernel's csum helpers), and the gateway's two directions: public → container (DNAT) and
//! container → public (SNAT).

use aya_ebpf::programs::TcContext;
use ferry_common::{NatKey, NatValue, Reason};

use crate::{
    maps::{public_entry, snat_entry},
    packet::{IPV4_CSUM_OFF, IPV4_DST_OFF, IPV4_SRC_OFF, L4},
};

/// `BPF_F_PSEUDO_HDR`: the changed field is part of the transport pseudo-header.
const BPF_F_PSEUDO_HDR: u64 = 1 << 4;
/// `BPF_F_MARK_MANGLED_0`: a UDP checksum of 0 means "none" and must stay 0.
const BPF_F_MARK_MANGLED_0: u64 = 1 << 5;

/// Which address of the IPv4 header to rewrite.
#[derive(Clone, Copy)]
pub enum Field {
    Src,
    Dst,
}

#[inline(always)]
fn l4_flags(l4: &L4, size: u64) -> u64 {
    if l4.is_udp() {
        size | BPF_F_MARK_MANGLED_0
    } else {
        size
    }
}

/// Rewrites an address and fixes the IPv4 and (if present) TCP/UDP checksums.
#[inline(always)]
pub fn set_addr(
    ctx: &TcContext,
    field: Field,
    old_be: u32,
    new_be: u32,
    l4: &Option<L4>,
) -> Result<(), Reason> {
    if let Some(l4) = l4 {
        ctx.l4_csum_replace(
            l4.csum_off,
            u64::from(old_be),
            u64::from(new_be),
            l4_flags(l4, 4) | BPF_F_PSEUDO_HDR,
        )
        .map_err(|_| Reason::DropRewriteFailed)?;
    }
    ctx.l3_csum_replace(IPV4_CSUM_OFF, u64::from(old_be), u64::from(new_be), 4)
        .map_err(|_| Reason::DropRewriteFailed)?;
    let off = match field {
        Field::Src => IPV4_SRC_OFF,
        Field::Dst => IPV4_DST_OFF,
    };
    ctx.store(off, &new_be, 0)
        .map_err(|_| Reason::DropRewriteFailed)
}

/// Rewrites a port (source or destination) and fixes the transport checksum.
#[inline(always)]
pub fn set_port(
    ctx: &TcContext,
    l4: &L4,
    field: Field,
    old_be: u16,
    new_be: u16,
) -> Result<(), Reason> {
    ctx.l4_csum_replace(
        l4.csum_off,
        u64::from(old_be),
        u64::from(new_be),
        l4_flags(l4, 2),
    )
    .map_err(|_| Reason::DropRewriteFailed)?;
    let off = match field {
        Field::Src => l4.off,
        Field::Dst => l4.off + 2,
    };
    ctx.store(off, &new_be, 0)
        .map_err(|_| Reason::DropRewriteFailed)
}

#[inline(always)]
const fn key(addr_be: u32, port_be: u16, proto: u8) -> NatKey {
    NatKey {
        addr_be,
        port_be,
        proto,
        _pad: 0,
    }
}

/// Which translation table.
#[derive(Clone, Copy)]
enum Table {
    Public,
    Snat,
}

#[inline(always)]
fn get(table: Table, k: &NatKey) -> Option<NatValue> {
    match table {
        Table::Public => public_entry(k),
        Table::Snat => snat_entry(k),
    }
}

/// The mapping for a packet: its port mapping if there is one, else the whole-IP mapping.
#[inline(always)]
fn lookup(table: Table, addr_be: u32, port_be: Option<(u16, u8)>) -> Option<NatValue> {
    if let Some((port, proto)) = port_be
        && let Some(v) = get(table, &key(addr_be, port, proto))
    {
        return Some(v);
    }
    get(table, &key(addr_be, 0, 0))
}

/// Public → container: rewrites the destination. `Ok(None)` if `dst_be` is not a public
/// address at all; `Err(DropNoPublicMapping)` if it is, but nothing maps this packet.
#[inline(always)]
pub fn dnat(ctx: &TcContext, dst_be: u32, l4: &Option<L4>) -> Result<Option<u32>, Reason> {
    if public_entry(&NatKey::presence(dst_be)).is_none() {
        return Ok(None);
    }
    let v = lookup(Table::Public, dst_be, l4.map(|l| (l.dport_be, l.proto)))
        .ok_or(Reason::DropNoPublicMapping)?;
    set_addr(ctx, Field::Dst, dst_be, v.addr_be, l4)?;
    if v.port_be != 0
        && let Some(l) = l4
    {
        set_port(ctx, l, Field::Dst, l.dport_be, v.port_be)?;
    }
    Ok(Some(v.addr_be))
}

/// Container → public: rewrites the source. `Ok(false)` if the container has no public
/// address for this packet.
#[inline(always)]
pub fn snat(ctx: &TcContext, src_be: u32, l4: &Option<L4>) -> Result<bool, Reason> {
    let Some(v) = lookup(Table::Snat, src_be, l4.map(|l| (l.sport_be, l.proto))) else {
        return Ok(false);
    };
    set_addr(ctx, Field::Src, src_be, v.addr_be, l4)?;
    if v.port_be != 0
        && let Some(l) = l4
    {
        set_port(ctx, l, Field::Src, l.sport_be, v.port_be)?;
    }
    Ok(true)
}
