//! Backend selection: the connection table first, Maglev on a miss.

use vip_common::{
    flow_hash, Backend, CachedFlow, CachedFlow6, Conn, FlowKey, FlowKey6, MaglevSlot, Service, FLOW_CACHE_SLOTS,
    MAGLEV_MAX_M, MAGLEV_ROW, NO_BACKEND,
};

use crate::{
    maps::{BACKENDS, CONNS, CONNS6, FLOW_CACHE, FLOW_CACHE6, MAGLEV},
    parse::store_mac,
};

/// A pinned flow: its backend and how it was pinned.
pub struct Pin {
    pub id: u32,
    /// The backend's entry as [`backend`] copied it, before it was checked: what was
    /// checked is what the frame is sent with.
    pub backend: Backend,
    /// The forward mode the flow was pinned under.
    pub mode: u8,
    /// Source MAC of the frame that pinned it (`load_mac`'s form).
    pub from_mac: u64,
}

/// Bits 0–47 of [`Conn::words`]' second word: `from_mac`.
const FROM_MAC: u64 = (1 << 48) - 1;

/// The backend `flow` is pinned to, while that backend still serves its connections and
/// has the same address: this CPU's flow cache first (at `slot`, from
/// [`vip_common::cache_slot`]; `generation` the config's), then the connection table,
/// whose answer is cached.
/// `flow` and its [`FlowKey::words`] `key` are the same key: the words for the cache,
/// which compares and stores them from registers, the key in memory for the table.
///
/// A pin to a draining backend (it takes no new flows) is special twice:
/// - it does not carry a frame that opens a connection (`opens`: a SYN without ACK;
///   called only then). A client that reuses the addresses and ports of a flow pinned
///   long ago (ports wrap within minutes at a few hundred connections a second, and pins
///   live until the table evicts them) opens a new connection; sent to a draining
///   backend, it would be refused once that backend stops serving. It is balanced
///   afresh instead, as IPVS does for reused connections (`conn_reuse_mode`);
/// - it is read from the table, not this CPU's cache: that re-pin may have been made on
///   another CPU, and the cached copy would send the new connection to the old backend.
#[inline(always)]
pub fn pinned(flow: &FlowKey, key: [u64; 2], slot: u32, generation: u32, opens: impl FnOnce() -> bool) -> Option<Pin> {
    // SAFETY: a per-CPU entry from a successful lookup, touched only by this CPU.
    let cached = FLOW_CACHE.get_ptr_mut(slot & (FLOW_CACHE_SLOTS - 1)).map(|c| unsafe { &mut *c });
    if let Some(c) = cached.as_deref() {
        if c.generation == generation && c.key.words() == key {
            let pin = validate(c.conn.words())?;
            if pin.backend.flags & Backend::F_UP != 0 {
                return Some(pin);
            }
        }
    }
    // SAFETY: the value is copied out at once; LRU elements are replaced whole.
    let conn = unsafe { CONNS.get(flow) }.copied()?;
    if let Some(c) = cached {
        *c = CachedFlow { key: FlowKey::from_words(key), conn, generation, _pad: 0 };
    }
    validate(conn.words()).filter(|pin| pin.backend.flags & Backend::F_UP != 0 || !opens())
}

/// Backend `id`'s entry, copied by three volatile word loads. The agent rewrites an
/// entry in place (a health change, a new next hop, an id released and given to
/// another backend); a copy taken once, then checked and used, keeps the frame
/// consistent with the check, where fields read at each use could mix two entries (a
/// MAC of zeros after a release). Volatile, because the compiler, which assumes no
/// other writer, could otherwise read a plain copy's fields again where they are used.
#[inline(always)]
pub fn backend(id: u32) -> Option<Backend> {
    let w = BACKENDS.get(id)? as *const Backend as *const u64;
    // SAFETY: Backend is 24 initialised bytes, 8-byte aligned, and any 24 bytes are a
    // valid Backend (integer fields only).
    unsafe {
        let words = [w.read_volatile(), w.add(1).read_volatile(), w.add(2).read_volatile()];
        Some(core::mem::transmute::<[u64; 3], Backend>(words))
    }
}

/// The pin of a connection-table entry (its [`Conn::words`]), if its backend still
/// serves and has the address the flow was pinned to.
#[inline(always)]
fn validate([w0, w1]: [u64; 2]) -> Option<Pin> {
    let id = u32::from(w0 as u16);
    let b = backend(id)?;
    if u32::from_le_bytes(b.ip) == (w0 >> 32) as u32 && b.flags & Backend::F_SERVING != 0 {
        Some(Pin { id, backend: b, mode: (w0 >> 16) as u8, from_mac: w1 & FROM_MAC })
    } else {
        None
    }
}

/// The live Maglev table's backend for `flow` of service `svc` (`hash`: the flow's hash
/// with the cluster seed; `opens`: as [`maglev_slot`]'s), which is then pinned for frames
/// from `from_mac`. `None`: the table has no (healthy) backend for this flow. (A pin this
/// replaces may still be in a CPU's flow cache: only one to a draining backend is
/// replaced, and [`pinned`] reads such a pin from the table.)
#[inline(always)]
pub fn choose(
    flow: &FlowKey,
    hash: u32,
    svc: &Service,
    from_mac: u64,
    opens: impl FnOnce() -> bool,
) -> Option<(u32, Backend)> {
    let (id, backend) = maglev_slot(hash, svc, opens)?;
    // A failed insert only means the next packet looks the flow up again.
    let _ = CONNS.insert(flow, &new_conn(id, &backend, svc.mode, from_mac), 0);
    Some((id, backend))
}

/// The connection-table entry pinning a new flow to backend `id`.
#[inline(always)]
fn new_conn(id: u32, backend: &Backend, mode: u8, from_mac: u64) -> Conn {
    let mut conn = Conn { backend: id as u16, mode, backend_ip: backend.ip, ..Conn::default() };
    // SAFETY: a field of an 8-byte aligned value, at offset 8.
    unsafe { store_mac(&mut conn.from_mac, from_mac) };
    conn
}

/// Whether two IPv6 flow keys, given as their [`FlowKey6::words`], are equal: the
/// words' differences OR-ed, one branch (an array `==` may become a `bcmp` call, which
/// BPF does not have).
#[inline(always)]
fn same_words6(a: [u64; 5], b: [u64; 5]) -> bool {
    (a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3]) | (a[4] ^ b[4]) == 0
}

/// [`pinned`] for an IPv6 flow (`key`: its [`FlowKey6::words`]; `slot`: its
/// [`vip_common::cache_slot6`]): this CPU's flow cache first, compared and filled from
/// registers, then the IPv6 connection table, whose answer is cached; a pin to a
/// draining backend as there.
#[inline(always)]
pub fn pinned6(
    flow: &FlowKey6,
    key: [u64; 5],
    slot: u32,
    generation: u32,
    opens: impl FnOnce() -> bool,
) -> Option<Pin> {
    // SAFETY: a per-CPU entry from a successful lookup, touched only by this CPU.
    let cached = FLOW_CACHE6.get_ptr_mut(slot & (FLOW_CACHE_SLOTS - 1)).map(|c| unsafe { &mut *c });
    if let Some(c) = cached.as_deref() {
        if c.generation == generation && same_words6(c.key.words(), key) {
            let pin = validate(c.conn.words())?;
            if pin.backend.flags & Backend::F_UP != 0 {
                return Some(pin);
            }
        }
    }
    // SAFETY: the value is copied out at once; LRU elements are replaced whole.
    let conn = unsafe { CONNS6.get(flow) }.copied()?;
    if let Some(c) = cached {
        *c = CachedFlow6 { key: FlowKey6::from_words(key), conn, generation, _pad: 0 };
    }
    validate(conn.words()).filter(|pin| pin.backend.flags & Backend::F_UP != 0 || !opens())
}

/// [`choose`] for an IPv6 flow (`hash`: [`vip_common::flow_hash6`] with the cluster seed).
#[inline(always)]
pub fn choose6(
    flow: &FlowKey6,
    hash: u32,
    svc: &Service,
    from_mac: u64,
    opens: impl FnOnce() -> bool,
) -> Option<(u32, Backend)> {
    let (id, backend) = maglev_slot(hash, svc, opens)?;
    // A failed insert only means the next packet looks the flow up again.
    let _ = CONNS6.insert(flow, &new_conn(id, &backend, svc.mode, from_mac), 0);
    Some((id, backend))
}

/// The live Maglev table's backend for a packet about `flow` (hashed with `seed`) that
/// opens no connection (an ICMP error), without pinning it.
#[inline(always)]
pub fn maglev(flow: &FlowKey, svc: &Service, seed: u32) -> Option<(u32, Backend)> {
    maglev_slot(flow_hash(flow, seed), svc, || false)
}

/// The live Maglev table's backend for the flow hash `hash` of service `svc`: for a
/// packet that does not open a connection (`opens`: a SYN without ACK; called only for a
/// held slot), the slot's holder (a draining backend) while it still serves; else the
/// slot's healthy new-flow backend (see [`MaglevSlot`]).
#[inline(always)]
pub fn maglev_slot(hash: u32, svc: &Service, opens: impl FnOnce() -> bool) -> Option<(u32, Backend)> {
    let m = svc.m;
    if m == 0 || m > MAGLEV_MAX_M {
        return None;
    }
    let slot = hash % m;
    let row = Service::first_row(svc.slot, svc.active) + slot / MAGLEV_ROW;
    let entry = MaglevSlot(MAGLEV.get(row)?.ids[(slot % MAGLEV_ROW) as usize]);
    if let Some(holder) = entry.holder() {
        if !opens() {
            // Up as well only for the moment around a flip that ends or starts the drain.
            if let Some(b) = backend(holder).filter(|b| b.flags & Backend::F_SERVING != 0) {
                return Some((holder, b));
            }
        }
    }
    let id = entry.id();
    if id == NO_BACKEND {
        return None;
    }
    let backend = backend(id)?;
    if backend.flags & Backend::F_UP == 0 {
        return None;
    }
    Some((id, backend))
}
