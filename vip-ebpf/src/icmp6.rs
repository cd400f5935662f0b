//! ICMPv6 Packet Too Big (RFC 4443 §3.2) for IPv6 VIP flows: path MTU discovery through
//! the VIP, as [`crate::icmp`] does for IPv4's fragmentation needed.
//!
//! A backend answers a client by DSR from the VIP, so when a router on the way back
//! finds the answer too big, its Packet Too Big goes to the VIP, which here means to the
//! leader, not to the backend whose TCP stack must lower its MSS. An error quoting a VIP
//! service's own segment to a client is steered to the backend of that flow: the
//! connection table first, then — on the node that balances — the live Maglev table on
//! the reversed tuple (never pinned: an error makes no flow). Everything else ICMPv6 to
//! the VIP goes up the local stack; a quote too short to name a flow is dropped.
//! [`crate::forward6`] runs these steps on the path of the flow's own segments (one
//! stack frame for both: the verifier allows the whole program 512 bytes).

use network_types::ip::Ipv6Hdr;
use vip_common::{flow_hash6, Backend, FlowKey6, ForwardMode, Reason, ServiceKey6, IPPROTO_TCP};

use crate::{
    ctx::Packet,
    forward::is_peer_mac,
    lb,
    maps::SERVICES6,
    parse::{ptr_at, L2},
    verdict::Verdict,
};

/// ICMPv6 type of Packet Too Big.
pub const ICMPV6_PKT_TOOBIG: u8 = 2;
/// ICMPv6 header before the quote: type, code, checksum, MTU.
const ICMPV6_HDR_LEN: usize = 8;
/// What a quote must hold to name a flow: the IPv6 header and the TCP ports.
const QUOTE_LEN: usize = Ipv6Hdr::LEN + 4;

/// The client's flow a Packet Too Big to `vip` quotes (the flow as the client sends
/// it, the reverse of the quoted answer), or the verdict when it names none: a quote
/// shorter than the IPv6 header and the TCP ports is dropped, anything but the VIP's own
/// TCP segment (no extension headers) goes up the local stack.
#[inline(always)]
pub fn quoted_flow(ctx: &impl Packet, l2: &L2, vip: &[u8; 16]) -> Result<FlowKey6, Verdict> {
    let Some(q) = ptr_at::<[u8; QUOTE_LEN]>(ctx, l2.l3_off + Ipv6Hdr::LEN + ICMPV6_HDR_LEN) else {
        return Err(Verdict::drop(Reason::IcmpQuoteTruncated));
    };
    // SAFETY: bounds-checked by ptr_at.
    let q = unsafe { &*q };
    if q[0] >> 4 != 6 || q[6] != IPPROTO_TCP || !quoted_is(q, 8, vip) {
        return Err(Verdict::pass(Reason::VipIcmp));
    }
    let mut flow = FlowKey6::new([0; 16], *vip, [q[42], q[43]], [q[40], q[41]], IPPROTO_TCP);
    let mut i = 0;
    while i < 16 {
        flow.src[i] = q[24 + i];
        i += 1;
    }
    Ok(flow)
}

/// The backend (id, entry, forward mode) of the client's `flow` an error is about: its
/// pin, else — if this node `leads` the VIP — the live Maglev table's (never pinned: an
/// error makes no flow). The verdict instead when the error is not ours to steer: no such
/// service (local stack), `local` mode, sent by a peer (it steered it here, the
/// backend), a follower without a pin, no healthy backend.
#[inline(always)]
pub fn backend_of(
    flow: &FlowKey6,
    seed: u32,
    generation: u32,
    leads: bool,
    src_mac: u64,
) -> Result<(u32, Backend, u8), Verdict> {
    let key = ServiceKey6 { vip: flow.dst, port: flow.dport, proto: IPPROTO_TCP, _pad: 0 };
    // SAFETY: copied out at once.
    let Some(svc) = (unsafe { SERVICES6.get(&key) }).copied() else {
        return Err(Verdict::pass(Reason::VipIcmp));
    };
    if svc.mode != ForwardMode::Dsr as u8 {
        return Err(Verdict::pass(Reason::LocalMode));
    }
    if is_peer_mac(src_mac) {
        return Err(Verdict::pass(Reason::BalancedByPeer));
    }
    // An ICMP error opens no connection.
    let key = flow.words();
    if let Some(pin) = lb::pinned6(flow, key, vip_common::cache_slot6(key, seed), generation, || false) {
        return Ok((pin.id, pin.backend, pin.mode));
    }
    if !leads {
        return Err(Verdict::pass(Reason::NotBalancing));
    }
    match lb::maglev_slot(flow_hash6(flow, seed), &svc, || false) {
        Some((id, backend)) => Ok((id, backend, svc.mode)),
        None => Err(Verdict::pass(Reason::NoBackend)),
    }
}

/// Whether the 16 bytes of the quote `q` at `off` are `addr`: the differences OR-ed
/// together over constant indices (a slice compare would be a call into a byte loop).
#[inline(always)]
fn quoted_is(q: &[u8; QUOTE_LEN], off: usize, addr: &[u8; 16]) -> bool {
    let mut diff = 0u8;
    let mut i = 0;
    while i < 16 {
        diff |= q[off + i] ^ addr[i];
        i += 1;
    }
    diff == 0
}
