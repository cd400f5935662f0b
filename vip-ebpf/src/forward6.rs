//! IPv6: Neighbor Discovery for the VIPs ([`crate::ndp`]), forwarding of IPv6 VIP
//! service traffic to its backend by DSR, as [`crate::forward`] does for IPv4, and
//! Packet Too Big about those flows to their backends ([`crate::icmp6`]).
//!
//! The same rules as IPv4's: frames sent to us, on the VIP's segment; a pinned flow keeps
//! its backend while it serves (even on a node that stopped balancing); a new flow is
//! balanced only by the node that leads the VIP (its deadline passed: the local stack),
//! never when it arrives from another load-balancing node (at most one hop). A backend
//! is the same entry as for IPv4 (known by its IPv4 address and MAC): DSR needs only its
//! MAC, and it holds the IPv6 VIP on `lo` as every vip node does. IPv6 is not
//! encapsulated (the agent refuses `--forward ipip` with an IPv6 VIP). What follows the
//! fixed header must be TCP or ICMPv6: a packet with extension headers passes.

use network_types::{ip::Ipv6Hdr, tcp::TcpHdr};
use vip_common::{flow_hash6, Backend, Config, FlowKey6, ForwardMode, Reason, ServiceKey6, IPPROTO_TCP};

use crate::{
    ctx::Packet,
    forward::{balances, dsr, is_peer_mac, is_syn, TCP_FLAGS_OFFSET},
    icmp6, lb,
    maps::{vip6, CONFIG, SERVICES6},
    ndp,
    parse::{load_ipv6_words, load_mac, load_u16_word, ptr_at, L2},
    refuse, stats,
    verdict::Verdict,
};

/// IPv6 next header of ICMPv6.
const IPPROTO_ICMPV6: u8 = 58;

#[inline(always)]
pub fn handle(ctx: &impl Packet, l2: &L2) -> Verdict {
    let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, l2.l3_off) else {
        return Verdict::pass(Reason::Ipv6Passed);
    };
    // SAFETY: ptr_at checked the 40-byte header lies inside the frame.
    let ip = unsafe { &*ip };
    if ip.vcf[0] >> 4 != 6 {
        return Verdict::pass(Reason::Ipv6Passed);
    }
    // A Packet Too Big about a VIP flow takes the same path as the flow's own segments,
    // with the flow read from its quote.
    let error = match ip.next_hdr {
        IPPROTO_TCP => false,
        IPPROTO_ICMPV6 => match ptr_at::<u8>(ctx, l2.l3_off + Ipv6Hdr::LEN) {
            // SAFETY: bounds-checked by ptr_at.
            Some(ty) if unsafe { *ty } == icmp6::ICMPV6_PKT_TOOBIG => true,
            _ => return ndp::handle(ctx, l2, ip),
        },
        _ => return Verdict::pass(Reason::Ipv6Passed),
    };
    let dst = ip.dst_addr;
    // SAFETY: inside the bounds-checked header, 2-byte aligned.
    let dst_words = unsafe { load_ipv6_words(&ip.dst_addr) };
    let Some(vip) = vip6(dst_words) else {
        return Verdict::pass(Reason::Ipv6Passed);
    };
    let Some(cfg) = CONFIG.get(0) else {
        return Verdict::pass(Reason::NotForUs);
    };
    // SAFETY: l2.eth was bounds-checked by the L2 parser; 2-byte aligned fields (see
    // `load_mac`); `cfg` is a map value.
    let (eth, our_mac, dst_mac, src_mac) =
        unsafe { (&mut *l2.eth, cfg.mac_word(), load_mac(&(*l2.eth).dst_addr), load_mac(&(*l2.eth).src_addr)) };
    if dst_mac != our_mac {
        return Verdict::pass(Reason::NotForUs);
    }
    // A leaving node refuses the other nodes' VIP-path probes, so they drain it before
    // its VIP leaves `lo` (as IPv4's, on any segment: they come untagged). Known by the
    // peer's MAC and the probe's shape (`refuse::reset6`), not its address: the peers'
    // IPv6 addresses are not in `PEERS`.
    if !error && cfg.flags & Config::F_LEAVING != 0 && is_peer_mac(src_mac) && refuse::reset6(ctx, l2.l3_off) {
        return Verdict::tx(Reason::ProbeRefusedLeaving);
    }
    if l2.segment != vip.segment {
        return Verdict::pass(l2.other_segment(ctx, vip.segment));
    }
    // The flow, its words (see `FlowKey6::words`), and for TCP its flags byte (0 for an
    // ICMP error). A TCP flow's key is built in registers, as IPv4's (`forward::handle`).
    let (flow, words, tcp_flags) = if error {
        match icmp6::quoted_flow(ctx, l2, &dst) {
            Ok(flow) => (flow, flow.words(), 0),
            Err(verdict) => return verdict,
        }
    } else {
        let Some(tcp) = ptr_at::<TcpHdr>(ctx, l2.l3_off + Ipv6Hdr::LEN) else {
            return Verdict::pass(Reason::TcpMalformed);
        };
        // SAFETY: ptr_at checked the IPv6 and TCP headers are inside the frame; 2-byte
        // aligned fields.
        let (words, flags) = unsafe {
            let [s0, s1] = load_ipv6_words(&ip.src_addr);
            let ports = u64::from(load_u16_word(&(*tcp).source)) | u64::from(load_u16_word(&(*tcp).dest)) << 16;
            (
                [s0, s1, dst_words[0], dst_words[1], ports | u64::from(IPPROTO_TCP) << 32],
                *(tcp as *const u8).add(TCP_FLAGS_OFFSET),
            )
        };
        (FlowKey6::from_words(words), words, flags)
    };
    // Only the leader balances new flows (errors included), until its balancing deadline
    // (its fencing deadline, or the end of a hand-over; see `forward::balances`).
    let leads = balances(vip.balance_until);
    let (id, backend, mode) = if error {
        match icmp6::backend_of(&flow, cfg.hash_seed, cfg.generation, leads, src_mac) {
            Ok(b) => b,
            Err(verdict) => return verdict,
        }
    } else {
        let slot = vip_common::cache_slot6(words, cfg.hash_seed);
        match lb::pinned6(&flow, words, slot, cfg.generation, || is_syn(tcp_flags)) {
            Some(pin) if pin.from_mac == src_mac || !is_peer_mac(src_mac) => (pin.id, pin.backend, pin.mode),
            Some(_) => return Verdict::pass(Reason::BalancedByPeer),
            None => {
                if !leads {
                    return Verdict::pass(Reason::NotBalancing);
                }
                if is_peer_mac(src_mac) {
                    return Verdict::pass(Reason::BalancedByPeer);
                }
                let key = ServiceKey6 { vip: dst, port: flow.dport, proto: IPPROTO_TCP, _pad: 0 };
                // SAFETY: copied out at once.
                let Some(svc) = (unsafe { SERVICES6.get(&key) }).copied() else {
                    return Verdict::pass(Reason::VipOtherPort);
                };
                if svc.mode != ForwardMode::Dsr as u8 {
                    return Verdict::pass(Reason::LocalMode);
                }
                let hash = flow_hash6(&flow, cfg.hash_seed);
                let Some((id, backend)) = lb::choose6(&flow, hash, &svc, src_mac, || is_syn(tcp_flags)) else {
                    return Verdict::pass(Reason::NoBackend);
                };
                (id, backend, svc.mode)
            }
        }
    };
    if !error {
        stats::count_backend(id, ctx.wire_size());
    }
    if backend.flags & Backend::F_LOCAL != 0 || mode != ForwardMode::Dsr as u8 {
        return Verdict::pass(Reason::LocalBackend);
    }
    dsr(eth, our_mac, &backend);
    Verdict::tx(if error { Reason::IcmpToBackend } else { Reason::ForwardedDsr })
}
