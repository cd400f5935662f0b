//! IPv4: classify the packet, and forward VIP service traffic to its backend.
//!
//! At most one load-balancing hop: a node forwards a VIP frame only if it came from a
//! client (or its router), never one another load-balancing node (a peer) already
//! balanced to it. Peers are known by MAC (the agent fills [`crate::maps::PEERS`]); a
//! pin records the MAC of the frame that made it, so a pinned flow arriving from a peer
//! is delivered here instead of being sent on, even if the pin names another node.

use aya_ebpf::helpers::bpf_ktime_get_boot_ns;
use network_types::{ip::Ipv4Hdr, tcp::TcpHdr};
use vip_common::{
    flow_hash_words, Backend, Config, FlowKey, ForwardMode, PeerKey, Reason, ServiceKey, VipState, IPPROTO_TCP,
};

use crate::{
    ctx::Packet,
    encap, icmp, lb,
    maps::{is_peer, vip, CONFIG, SERVICES},
    parse::{load_ipv4, load_ipv4_word, load_mac, load_u16_word, ptr_at, store_mac, L2},
    refuse, stats,
    verdict::Verdict,
};

/// ICMP, whose errors about VIP flows are steered to the flow's backend.
pub const IPPROTO_ICMP: u8 = 1;
/// IPv4-in-IPv4.
pub const IPPROTO_IPIP: u8 = 4;
/// The "more fragments" flag and the fragment offset, in host order of the `frags` field.
pub const IP_MF_AND_OFFSET: u16 = 0x3fff;

#[inline(always)]
pub fn handle(ctx: &impl Packet, l2: &L2) -> Verdict {
    let Some(iph) = ptr_at::<Ipv4Hdr>(ctx, l2.l3_off) else {
        return Verdict::pass(Reason::IpMalformed);
    };
    // SAFETY: ptr_at checked the 20-byte header is inside the frame.
    let iph = unsafe { &*iph };
    let ihl = ((iph.vihl & 0x0f) as usize) * 4;
    if iph.vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN {
        return Verdict::pass(Reason::IpMalformed);
    }
    if iph.proto == IPPROTO_IPIP {
        return encap::decap(ctx, l2, ihl);
    }
    // SAFETY: inside the bounds-checked header, 2-byte aligned.
    let dst_word = unsafe { load_ipv4_word(&iph.dst_addr) };
    let dst = dst_word.to_le_bytes();
    let Some(vip) = vip(dst) else {
        return Verdict::pass(Reason::NotVip);
    };
    // One 2-byte load, tested against the mask in wire order.
    // SAFETY: inside the bounds-checked header, 2-byte aligned.
    if unsafe { load_u16_word(&iph.frags) } & IP_MF_AND_OFFSET.to_be() != 0 {
        return Verdict::pass(Reason::Fragment);
    }
    let Some(cfg) = CONFIG.get(0) else {
        return Verdict::pass(Reason::NotForUs);
    };
    // SAFETY: l2.eth was bounds-checked by the L2 parser; every header is 2-byte
    // aligned (see `load_mac`); `cfg` is a map value.
    let (eth, our_mac, dst_mac) = unsafe { (&mut *l2.eth, cfg.mac_word(), load_mac(&(*l2.eth).dst_addr)) };
    // Read where it is used: loaded here, it would live (spilled) across the whole path.
    // SAFETY: as above.
    let src_mac = || unsafe { load_mac(&(*l2.eth).src_addr) };
    // Only frames sent to us are ours to forward (a promiscuous NIC or a flooding switch
    // shows us others'), and only on the VIP's own segment.
    if dst_mac != our_mac {
        return Verdict::pass(Reason::NotForUs);
    }
    if l2.segment != vip.segment {
        // A leaving node refuses the peers' VIP-path probes (see below) on any segment:
        // they come from the peers' own addresses, untagged, when the VIP is on a VLAN.
        // SAFETY: inside the bounds-checked header, 2-byte aligned.
        let src = unsafe { load_ipv4(&iph.src_addr) };
        if cfg.flags & Config::F_LEAVING != 0 && iph.proto == IPPROTO_TCP && is_peer(&PeerKey::ipv4(src)) {
            return refused(ctx, l2.l3_off);
        }
        return Verdict::pass(l2.other_segment(ctx, vip.segment));
    }
    match iph.proto {
        IPPROTO_TCP => {}
        IPPROTO_ICMP => return icmp::to_backend(ctx, l2, ihl, dst, &vip, src_mac(), our_mac),
        _ => return Verdict::pass(Reason::VipNotTcp),
    }
    let Some(tcp) = ptr_at::<TcpHdr>(ctx, l2.l3_off + ihl) else {
        return Verdict::pass(Reason::TcpMalformed);
    };
    // The key in registers (see `FlowKey::words`), hashed from there.
    // SAFETY: ptr_at checked the 20-byte IPv4 and TCP headers are inside the frame;
    // 2-byte aligned fields.
    let words = unsafe {
        [
            u64::from(load_ipv4_word(&iph.src_addr)) | u64::from(dst_word) << 32,
            u64::from(load_u16_word(&(*tcp).source))
                | u64::from(load_u16_word(&(*tcp).dest)) << 16
                | u64::from(IPPROTO_TCP) << 32,
        ]
    };
    let flow = FlowKey::from_words(words);
    // A flow this node pinned keeps its backend, which holds the connection, even after
    // this node stopped balancing (a leader whose deadline passed, or that handed over):
    // clients that have not moved yet keep their connections. The pin holds for the flow
    // as the client sends it; the same flow from a peer was balanced there already.
    let slot = vip_common::cache_slot(words, cfg.hash_seed);
    // SAFETY: the flags byte is inside the bounds-checked TCP header.
    let opens = || is_syn(unsafe { *(tcp as *const u8).add(TCP_FLAGS_OFFSET) });
    let (id, backend, mode) = match lb::pinned(&flow, words, slot, cfg.generation, opens) {
        Some(pin) if pin.from_mac == src_mac() || !is_peer_mac(src_mac()) => (pin.id, pin.backend, pin.mode),
        Some(_) => return Verdict::pass(Reason::BalancedByPeer),
        None => {
            // A leaving node refuses the other nodes' VIP-path probes (from their own
            // addresses), so they drain it before its VIP leaves `lo`.
            if cfg.flags & Config::F_LEAVING != 0 && is_peer(&PeerKey::ipv4(flow.src)) {
                return refused(ctx, l2.l3_off);
            }
            // New flow on a node that does not balance this VIP (a follower): the leader
            // sent it here by DSR; deliver it rather than balance it with a table that
            // may be stale (see `balances` for a leader whose deadline just passed).
            if !balances(vip.balance_until) {
                return Verdict::pass(Reason::NotBalancing);
            }
            if is_peer_mac(src_mac()) {
                return Verdict::pass(Reason::BalancedByPeer);
            }
            let key = ServiceKey { vip: dst, port: flow.dport, proto: IPPROTO_TCP, _pad: 0 };
            // SAFETY: copied out at once.
            let Some(svc) = (unsafe { SERVICES.get(key) }).copied() else {
                return Verdict::pass(Reason::VipOtherPort);
            };
            if svc.mode == ForwardMode::Local as u8 {
                return Verdict::pass(Reason::LocalMode);
            }
            let hash = flow_hash_words(words, cfg.hash_seed);
            let Some((id, backend)) = lb::choose(&flow, hash, &svc, src_mac(), opens) else {
                return Verdict::pass(Reason::NoBackend);
            };
            (id, backend, svc.mode)
        }
    };
    stats::count_backend(id, ctx.wire_size());
    if backend.flags & Backend::F_LOCAL != 0 {
        return Verdict::pass(Reason::LocalBackend);
    }
    if mode == ForwardMode::Ipip as u8 {
        return encap::ipip(ctx, l2, cfg, &backend);
    }
    dsr(eth, our_mac, &backend);
    Verdict::tx(Reason::ForwardedDsr)
}

/// A peer's VIP-path probe to a leaving node: answered with a RST if it is one (see
/// [`refuse`]), anything else the peer sends the VIP dropped.
#[inline(always)]
pub fn refused(ctx: &impl Packet, l3_off: usize) -> Verdict {
    if refuse::reset(ctx, l3_off) {
        Verdict::tx(Reason::ProbeRefusedLeaving)
    } else {
        Verdict::drop(Reason::ProbeRefusedLeaving)
    }
}

/// Whether this node balances a VIP's new flows now, its balancing deadline being
/// `balance_until` (boot-time ns): always ([`VipState::FOREVER`], which skips the
/// clock), never (0: a follower, or a leader that stepped down), or until the deadline
/// plus [`VipState::BALANCE_GRACE_NS`] (a leader whose agent stopped renewing it).
#[inline(always)]
pub fn balances(balance_until: u64) -> bool {
    match balance_until {
        VipState::FOREVER => true,
        0 => false,
        // SAFETY: helper without preconditions.
        until => (unsafe { bpf_ktime_get_boot_ns() }) < until.saturating_add(VipState::BALANCE_GRACE_NS),
    }
}

/// Offset of the flags byte (CWR … FIN) in a TCP header (RFC 9293 §3.1).
pub const TCP_FLAGS_OFFSET: usize = 13;
/// SYN and ACK in the flags byte.
const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// Whether TCP flags `flags` open a connection: SYN without ACK.
#[inline(always)]
pub fn is_syn(flags: u8) -> bool {
    flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// DSR: our MAC as the source, the backend's as the destination. IP and what it carries
/// stay as they are.
#[inline(always)]
pub fn dsr(eth: &mut network_types::eth::EthHdr, our_mac: u64, backend: &Backend) {
    // SAFETY: 2-byte aligned header fields and map values (see `load_mac`).
    unsafe {
        store_mac(&mut eth.src_addr, our_mac);
        store_mac(&mut eth.dst_addr, load_mac(&backend.mac));
    }
}

/// Whether `mac` ([`load_mac`]'s form) is another load-balancing node's.
#[inline(always)]
pub fn is_peer_mac(mac: u64) -> bool {
    let b = mac.to_le_bytes();
    is_peer(&PeerKey::mac([b[0], b[1], b[2], b[3], b[4], b[5]]))
}
