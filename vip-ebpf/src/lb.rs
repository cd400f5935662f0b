//! Backend selection: the connection table first, Maglev on a miss.

use vip_common::{flow_hash, Backend, Conn, FlowKey, Service, MAGLEV_MAX_M, MAGLEV_ROW, NO_BACKEND};

use crate::maps::{BACKENDS, CONNS, MAGLEV};

/// A pinned flow: its backend and how it was pinned.
pub struct Pin {
    pub id: u32,
    pub backend: Backend,
    /// The forward mode the flow was pinned under.
    pub mode: u8,
    /// Source MAC of the frame that pinned it.
    pub from_mac: [u8; 6],
}

/// The backend `flow` is pinned to, while that backend still serves its connections and
/// has the same address. One hash lookup and one array lookup: an established flow
/// needs nothing else.
#[inline(always)]
pub fn pinned(flow: &FlowKey) -> Option<Pin> {
    // SAFETY: the value is copied out at once; LRU elements are replaced whole.
    let conn = unsafe { CONNS.get(flow) }.copied()?;
    let id = conn.backend as u32;
    let b = BACKENDS.get(id)?;
    if b.ip == conn.backend_ip && b.flags & Backend::F_SERVING != 0 {
        Some(Pin { id, backend: *b, mode: conn.mode, from_mac: conn.from_mac })
    } else {
        None
    }
}

/// The live Maglev table's backend for `flow` of service `svc` (hash seeded with
/// `seed`), which is then pinned for frames from `from_mac`. `None`: the table has no
/// (healthy) backend for this flow.
#[inline(always)]
pub fn choose(flow: &FlowKey, svc: &Service, seed: u32, from_mac: [u8; 6]) -> Option<(u32, Backend)> {
    let m = svc.m;
    if m == 0 || m > MAGLEV_MAX_M {
        return None;
    }
    let slot = flow_hash(flow, seed) % m;
    let row = Service::first_row(svc.slot, svc.active) + slot / MAGLEV_ROW;
    let id = MAGLEV.get(row)?.ids[(slot % MAGLEV_ROW) as usize];
    if id == NO_BACKEND {
        return None;
    }
    let backend = *BACKENDS.get(id)?;
    if backend.flags & Backend::F_UP == 0 {
        return None;
    }
    let conn = Conn { backend: id as u16, mode: svc.mode, _pad: 0, backend_ip: backend.ip, from_mac, _pad2: [0; 2] };
    // A failed insert only means the next packet looks the flow up again.
    let _ = CONNS.insert(flow, &conn, 0);
    Some((id, backend))
}
