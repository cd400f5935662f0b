//! The ARP responder.
//!
//! The leader answers ARP requests for its VIPs in place (`XDP_TX`); a follower drops
//! them, because every node holds the VIPs on `lo` and its kernel would answer otherwise.
//! Gratuitous ARPs, replies, and ARP for other addresses pass to the kernel.

use aya_ebpf::{helpers::bpf_ktime_get_ns, programs::XdpContext};
use network_types::arp::ArpHdr;
use vip_common::{Reason, VipKey};

use crate::{
    maps::{CONFIG, VIPS},
    parse::{ptr_at, L2},
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
pub fn handle(ctx: &XdpContext, l2: &L2) -> Verdict {
    let Some(arp) = ptr_at::<ArpHdr>(ctx, l2.l3_off) else {
        return Verdict::pass(Reason::ArpMalformed);
    };
    // SAFETY: ptr_at checked the whole ARP header lies inside the frame.
    let arp = unsafe { &mut *arp };
    if arp.htype != ARPHRD_ETHER || arp.ptype != PTYPE_IPV4 || arp.hlen != 6 || arp.plen != 4 {
        return Verdict::pass(Reason::ArpMalformed);
    }
    let tpa = arp.tpa;
    // SAFETY: the value is copied out at once; a concurrent update replaces the element
    // as a whole (hash map), so we read either the old or the new state.
    let Some(state) = (unsafe { VIPS.get(VipKey::new(tpa)) }).copied() else {
        return Verdict::pass(Reason::ArpNotVip);
    };
    if arp.oper != ARPOP_REQUEST {
        return Verdict::pass(Reason::ArpNotRequest);
    }
    if arp.spa == tpa {
        return Verdict::pass(Reason::ArpGratuitous);
    }
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if !state.leads_at(now) {
        return Verdict::drop(Reason::ArpFollowerDropped);
    }
    let mac = match CONFIG.get(0) {
        Some(cfg) if cfg.mac != [0; 6] => cfg.mac,
        _ => return Verdict::drop(Reason::ArpNoConfig),
    };
    // SAFETY: l2.eth was bounds-checked by the L2 parser.
    let eth = unsafe { &mut *l2.eth };
    reply_in_place(eth, arp, mac, tpa);
    Verdict::tx(Reason::ArpReplied)
}

/// Turns a request for `vip` into the reply from `mac`, reusing the frame (and any VLAN
/// tags, so the reply leaves on the VLAN the request came from).
#[inline(always)]
fn reply_in_place(eth: &mut network_types::eth::EthHdr, arp: &mut ArpHdr, mac: [u8; 6], vip: [u8; 4]) {
    eth.dst_addr = eth.src_addr;
    eth.src_addr = mac;
    arp.oper = ARPOP_REPLY;
    arp.tha = arp.sha;
    arp.tpa = arp.spa;
    arp.sha = mac;
    arp.spa = vip;
}
