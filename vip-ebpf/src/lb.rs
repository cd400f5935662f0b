//! Backend selection: the connection table first, Maglev on a miss.

use vip_common::{
    flow_hash, Backend, Conn, FlowKey, Service, MAGLEV_MAX_M, MAGLEV_ROW, NO_BACKEND,
};

use crate::maps::{BACKENDS, CONNS, MAGLEV};

/// Picks the backend for `flow` of service `svc`: the one the connection table pins it to
/// while that backend is up (and still the same address), else the live Maglev table's
/// choice, which is then pinned. `None`: the table has no backend for this flow.
#[inline(always)]
pub fn select(flow: &FlowKey, svc: &Service) -> Option<(u32, Backend)> {
    // SAFETY: values are copied out at once; LRU and array elements are replaced whole.
    if let Some(conn) = unsafe { CONNS.get(flow) }.copied() {
        if let Some(b) = BACKENDS.get(conn.backend) {
            if b.ip == conn.backend_ip && b.flags & Backend::F_UP != 0 {
                return Some((conn.backend, *b));
            }
        }
    }
    let m = svc.m;
    if m == 0 || m > MAGLEV_MAX_M {
        return None;
    }
    let slot = flow_hash(flow) % m;
    let row = Service::first_row(svc.slot, svc.active) + slot / MAGLEV_ROW;
    let id = MAGLEV.get(row)?.ids[(slot % MAGLEV_ROW) as usize];
    if id == NO_BACKEND {
        return None;
    }
    let backend = *BACKENDS.get(id)?;
    if backend.flags & Backend::F_UP == 0 {
        return None;
    }
    // A failed insert only means the next packet looks the flow up again.
    let _ = CONNS.insert(
        flow,
        &Conn {
            backend: id,
            backend_ip: backend.ip,
        },
        0,
    );
    Some((id, backend))
}
