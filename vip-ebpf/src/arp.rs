//! The ARP responder.
//!
//! The leader answers ARP requests for its VIPs in place (`XDP_TX`); a follower drops
//! them, because every node holds the VIPs on `lo` and its kernel would answer otherwise,
//! except other hosts' ARP probes while its own agent probes for the VIP (the agent must
//! see them: two nodes claiming at once both back off).
//! Only requests on the VIP's own segment (VLAN), sent to us (broadcast, or unicast to
//! our MAC, as a cache refresh is), are ours. Gratuitous ARPs, replies, and ARP for
//! other addresses pass to the kernel (and to the agent, which watches for other hosts
//! claiming a VIP).

use aya_ebpf::helpers::bpf_ktime_get_boot_ns;
use network_types::arp::ArpHdr;
use vip_common::{Reason, VipKey, VipState};

use crate::{
    ctx::Packet,
    maps::{vip, CONFIG, VIPS},
    parse::{is_group, load_mac, ptr_at, store_mac, L2},
    verdict::Verdict,
};

/// ARP hardware type for Ethernet.
const ARPHRD_ETHER: [u8; 2] = 1u16.to_be_bytes();
/// ARP protocol type for IPv4 (same value as the IPv4 EtherType).
const PTYPE_IPV4: [u8; 2] = 0x0800u16.to_be_bytes();
/// `oper` of a request and of a reply.
const ARPOP_REQUEST: [u8; 2] = 1u16.to_be_bytes();
const ARPOP_REPLY: [u8; 2] = 2u16.to_be_bytes();

#[inline(always)]
pub fn handle(ctx: &impl Packet, l2: &L2) -> Verdict {
    let Some(arp) = ptr_at::<ArpHdr>(ctx, l2.l3_off) else {
        return Verdict::pass(Reason::ArpMalformed);
    };
    // SAFETY: ptr_at checked the whole ARP header lies inside the frame.
    let arp = unsafe { &mut *arp };
    if arp.htype != ARPHRD_ETHER || arp.ptype != PTYPE_IPV4 || arp.hlen != 6 || arp.plen != 4 {
        return Verdict::pass(Reason::ArpMalformed);
    }
    let tpa = arp.tpa;
    // Membership and segment from the flat list (an inlined array lookup and a scan);
    // the state in the VIPS hash unless the list says it is not needed.
    let Some(vip) = vip(tpa) else {
        return Verdict::pass(Reason::ArpNotVip);
    };
    if arp.oper != ARPOP_REQUEST {
        return Verdict::pass(Reason::ArpNotRequest);
    }
    if arp.spa == tpa {
        return Verdict::pass(Reason::ArpGratuitous);
    }
    if l2.segment != vip.segment {
        return Verdict::pass(l2.other_segment(ctx, vip.segment));
    }
    // An all-zero MAC means "not configured yet" and matches no frame's destination.
    let mac = CONFIG.get(0).map_or(0, |cfg| cfg.mac_word());
    // SAFETY: l2.eth was bounds-checked by the L2 parser; headers are 2-byte aligned.
    let (eth, dst) = unsafe { (&mut *l2.eth, load_mac(&(*l2.eth).dst_addr)) };
    // Linux's arp_rcv() ignores requests addressed to another host's MAC
    // (PACKET_OTHERHOST); so do we, leader or follower.
    if !is_group(dst) && dst != mac {
        return Verdict::pass(Reason::NotForUs);
    }
    // Neither leading nor probing (`VipSet::ARP_SKIP` never hides a flag the hash
    // holds): a follower drops the request without the hash lookup.
    if vip.arp_skip {
        return Verdict::drop(Reason::ArpFollowerDropped);
    }
    // Leading until the list's deadline (`VipSet::ARP_ANSWER` never answers where the
    // hash would not): answered without the hash lookup. Past it, the hash decides.
    if vip.arp_answer && leads_until(vip.balance_until) {
        return answer(eth, arp, mac, tpa);
    }
    // SAFETY: the value is copied out at once; a concurrent update replaces the element
    // as a whole (hash map), so we read either the old or the new state.
    let Some(state) = (unsafe { VIPS.get(VipKey::new(tpa)) }).copied() else {
        // In the list but not (yet, or any more) in the hash: added or removed just now.
        return Verdict::pass(Reason::ArpNotVip);
    };
    // A follower needs no clock.
    if state.flags & VipState::F_LEADER == 0 || !leads_until(state.leader_until_ns) {
        // Our agent probes for the VIP too: let it see another host's probe.
        if state.flags & VipState::F_PROBING != 0 && arp.spa == [0; 4] {
            return Verdict::pass(Reason::ArpProbeWhileProbing);
        }
        return Verdict::drop(Reason::ArpFollowerDropped);
    }
    answer(eth, arp, mac, tpa)
}

/// Whether a leader whose deadline is `until_ns` (kernel boot-time ns) still leads: a
/// deadline that never passes skips the clock.
#[inline(always)]
pub fn leads_until(until_ns: u64) -> bool {
    // SAFETY (the helper): no preconditions.
    until_ns == VipState::FOREVER || unsafe { bpf_ktime_get_boot_ns() } < until_ns
}

/// The leader's answer to a request for `vip`: the reply from `mac`, or a drop while
/// this node's MAC is not configured.
#[inline(always)]
fn answer(eth: &mut network_types::eth::EthHdr, arp: &mut ArpHdr, mac: u64, vip: [u8; 4]) -> Verdict {
    if mac == 0 {
        return Verdict::drop(Reason::ArpNoConfig);
    }
    reply_in_place(eth, arp, mac, vip);
    Verdict::tx(Reason::ArpReplied)
}

/// Turns a request for `vip` into the reply from `mac`, reusing the frame (and any VLAN
/// tags, so the reply leaves on the VLAN the request came from). As Linux's
/// arp_process() does, the reply goes to the sender hardware address of the request,
/// and a probe (sender IP 0.0.0.0, RFC 5227 §2.1.1) gets a reply whose target IP is
/// 0.0.0.0.
#[inline(always)]
fn reply_in_place(eth: &mut network_types::eth::EthHdr, arp: &mut ArpHdr, mac: u64, vip: [u8; 4]) {
    // SAFETY: every field is inside the bounds-checked headers, 2-byte aligned.
    unsafe {
        let sha = load_mac(&arp.sha);
        store_mac(&mut eth.dst_addr, sha);
        store_mac(&mut eth.src_addr, mac);
        store_mac(&mut arp.tha, sha);
        store_mac(&mut arp.sha, mac);
    }
    arp.oper = ARPOP_REPLY;
    arp.tpa = arp.spa;
    arp.spa = vip;
}
