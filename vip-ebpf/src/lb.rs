//! Backend selection: the connection table first, Maglev on a miss.

use vip_common::{
    flow_hash, Backend, CachedFlow, CachedFlow6, Conn, FlowKey, FlowKey6, Service, FLOW_CACHE_SLOTS, MAGLEV_MAX_M,
    MAGLEV_ROW, NO_BACKEND,
};

use crate::{
    maps::{BACKENDS, CONNS, CONNS6, FLOW_CACHE, FLOW_CACHE6, MAGLEV},
    parse::{load_mac, store_mac},
};

/// A pinned flow: its backend and how it was pinned.
pub struct Pin {
    pub id: u32,
    pub backend: Backend,
    /// The forward mode the flow was pinned under.
    pub mode: u8,
    /// Source MAC of the frame that pinned it (`load_mac`'s form).
    pub from_mac: u64,
}

/// Whether two flow keys are equal, as two 8-byte compares (a byte-wise compare of the
/// `[u8; N]` fields would be a call into a byte loop).
#[inline(always)]
fn same_flow(a: &FlowKey, b: &FlowKey) -> bool {
    // SAFETY: FlowKey is 16 bytes, 8-byte aligned, all bytes initialised.
    unsafe {
        let (a, b) = (a as *const FlowKey as *const u64, b as *const FlowKey as *const u64);
        *a == *b && *a.add(1) == *b.add(1)
    }
}

/// The backend `flow` is pinned to, while that backend still serves its connections and
/// has the same address: this CPU's flow cache first (`hash` is the flow's hash,
/// `generation` the config's), then the connection table, whose answer is cached.
#[inline(always)]
pub fn pinned(flow: &FlowKey, hash: u32, generation: u32) -> Option<Pin> {
    let cached = FLOW_CACHE.get_ptr_mut(hash & (FLOW_CACHE_SLOTS - 1));
    // SAFETY: a per-CPU entry from a successful lookup, touched only by this CPU.
    let conn = match cached.map(|c| unsafe { &mut *c }) {
        Some(c) if c.generation == generation && same_flow(&c.key, flow) => c.conn,
        slot => {
            // SAFETY: the value is copied out at once; LRU elements are replaced whole.
            let conn = unsafe { CONNS.get(flow) }.copied()?;
            if let Some(c) = slot {
                *c = CachedFlow { key: *flow, conn, generation, _pad: 0 };
            }
            conn
        }
    };
    validate(conn)
}

#[inline(always)]
fn validate(conn: Conn) -> Option<Pin> {
    let id = conn.backend as u32;
    let b = BACKENDS.get(id)?;
    if b.ip == conn.backend_ip && b.flags & Backend::F_SERVING != 0 {
        // SAFETY: a field of an 8-byte aligned value, at offset 8.
        Some(Pin { id, backend: *b, mode: conn.mode, from_mac: unsafe { load_mac(&conn.from_mac) } })
    } else {
        None
    }
}

/// The live Maglev table's backend for `flow` of service `svc` (`hash`: the flow's hash
/// with the cluster seed), which is then pinned for frames from `from_mac`. `None`: the
/// table has no (healthy) backend for this flow.
#[inline(always)]
pub fn choose(flow: &FlowKey, hash: u32, svc: &Service, from_mac: u64) -> Option<(u32, Backend)> {
    let (id, backend) = maglev_slot(hash, svc)?;
    let mut conn = Conn { backend: id as u16, mode: svc.mode, backend_ip: backend.ip, ..Conn::default() };
    // SAFETY: a field of an 8-byte aligned value, at offset 8.
    unsafe { store_mac(&mut conn.from_mac, from_mac) };
    // A failed insert only means the next packet looks the flow up again.
    let _ = CONNS.insert(flow, &conn, 0);
    Some((id, backend))
}

/// Whether two IPv6 flow keys are equal, as five 8-byte compares.
#[inline(always)]
fn same_flow6(a: &FlowKey6, b: &FlowKey6) -> bool {
    // SAFETY: FlowKey6 is 40 bytes, 8-byte aligned, all bytes initialised.
    unsafe {
        let (a, b) = (a as *const FlowKey6 as *const u64, b as *const FlowKey6 as *const u64);
        *a == *b && *a.add(1) == *b.add(1) && *a.add(2) == *b.add(2) && *a.add(3) == *b.add(3) && *a.add(4) == *b.add(4)
    }
}

/// [`pinned`] for an IPv6 flow (`hash`: [`vip_common::flow_hash6`] with the cluster
/// seed): this CPU's flow cache first, then the IPv6 connection table, whose answer is
/// cached.
#[inline(always)]
pub fn pinned6(flow: &FlowKey6, hash: u32, generation: u32) -> Option<Pin> {
    let cached = FLOW_CACHE6.get_ptr_mut(hash & (FLOW_CACHE_SLOTS - 1));
    // SAFETY: a per-CPU entry from a successful lookup, touched only by this CPU.
    let conn = match cached.map(|c| unsafe { &mut *c }) {
        Some(c) if c.generation == generation && same_flow6(&c.key, flow) => c.conn,
        slot => {
            // SAFETY: the value is copied out at once; LRU elements are replaced whole.
            let conn = unsafe { CONNS6.get(flow) }.copied()?;
            if let Some(c) = slot {
                *c = CachedFlow6 { key: *flow, conn, generation, _pad: 0 };
            }
            conn
        }
    };
    validate(conn)
}

/// [`choose`] for an IPv6 flow (`hash`: [`vip_common::flow_hash6`] with the cluster seed).
#[inline(always)]
pub fn choose6(flow: &FlowKey6, hash: u32, svc: &Service, from_mac: u64) -> Option<(u32, Backend)> {
    let (id, backend) = maglev_slot(hash, svc)?;
    let mut conn = Conn { backend: id as u16, mode: svc.mode, backend_ip: backend.ip, ..Conn::default() };
    // SAFETY: a field of an 8-byte aligned value, at offset 8.
    unsafe { store_mac(&mut conn.from_mac, from_mac) };
    // A failed insert only means the next packet looks the flow up again.
    let _ = CONNS6.insert(flow, &conn, 0);
    Some((id, backend))
}

/// The live Maglev table's healthy backend for `flow` (hashed with `seed`), without
/// pinning it.
#[inline(always)]
pub fn maglev(flow: &FlowKey, svc: &Service, seed: u32) -> Option<(u32, Backend)> {
    maglev_slot(flow_hash(flow, seed), svc)
}

/// The live Maglev table's healthy backend for the flow hash `hash` of service `svc`.
#[inline(always)]
pub fn maglev_slot(hash: u32, svc: &Service) -> Option<(u32, Backend)> {
    let m = svc.m;
    if m == 0 || m > MAGLEV_MAX_M {
        return None;
    }
    let slot = hash % m;
    let row = Service::first_row(svc.slot, svc.active) + slot / MAGLEV_ROW;
    let id = MAGLEV.get(row)?.ids[(slot % MAGLEV_ROW) as usize];
    if id == NO_BACKEND {
        return None;
    }
    let backend = *BACKENDS.get(id)?;
    if backend.flags & Backend::F_UP == 0 {
        return None;
    }
    Some((id, backend))
}
