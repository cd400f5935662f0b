//! The Neighbor Discovery responder: ARP's IPv6 twin (RFC 4861).
//!
//! The leader answers Neighbor Solicitations (NS) for its IPv6 VIPs with a Neighbor
//! Advertisement (NA) built in place (`XDP_TX`); a follower drops them, except another
//! host's Duplicate Address Detection probe while its own agent probes for the VIP.
//! The kernel would not answer them anyway (it answers NS only for addresses on the
//! receiving interface, and the VIP is on `lo`), but a dropped solicitation makes the
//! follower's silence explicit and counted. Only solicitations on the VIP's own segment,
//! sent to us (a multicast group, or unicast to our MAC, as a reachability probe is),
//! are ours. Every other ICMPv6 message passes (an echo to a VIP goes up the leader's
//! own stack, which holds the VIP on `lo`).
//!
//! A solicitation is validated as RFC 4861 §7.1.1 asks before it is answered (hop
//! limit 255, code 0, at least 24 bytes, a DAD probe sent to the target's
//! solicited-node group without a source link-layer option). The ICMPv6 checksum of the
//! solicitation is not verified: a corrupted one is answered, which costs the sender
//! one advertisement it will check itself; the advertisement's checksum is computed in
//! full over the pseudo-header (RFC 4443 §2.3).

use network_types::ip::Ipv6Hdr;
use vip_common::{Reason, Vip6Key, VipState};

use crate::{
    arp::leads_until,
    csum,
    ctx::Packet,
    maps::{vip6, CONFIG, VIPS6},
    parse::{is_group, load_ipv6_words, load_mac, ptr_at, store_mac, L2},
    verdict::Verdict,
};

use vip_common::nd::{
    ALL_NODES, ALL_NODES_MAC, HOP_LIMIT as ND_HOP_LIMIT, IPPROTO_ICMPV6, NA_FLAG_OVERRIDE, NA_FLAG_SOLICITED,
    NEIGHBOR_ADVERT as ND_NEIGHBOR_ADVERT, NEIGHBOR_SOLICIT as ND_NEIGHBOR_SOLICIT, OPT_SOURCE_LL as ND_OPT_SOURCE_LL,
    OPT_TARGET_LL as ND_OPT_TARGET_LL,
};

/// Length of an NS or NA without options: type, code, checksum, 4 bytes of flags or
/// reserved, the 16-byte target.
const ND_LEN: usize = 24;
/// The advertisement this module sends: the NA and one target link-layer option (type,
/// length 1 in units of 8 bytes, the MAC).
const NA_LEN: usize = ND_LEN + 8;

/// The fixed part of an NS (and of an NA).
#[repr(C)]
struct NdMsg {
    ty: u8,
    code: u8,
    checksum: [u8; 2],
    /// Reserved in an NS; the R/S/O flags and reserved bits in an NA.
    flags: [u8; 4],
    target: [u8; 16],
}

/// Our advertisement: [`NdMsg`] and the target link-layer option.
#[repr(C)]
struct NaMsg {
    nd: NdMsg,
    opt_type: u8,
    opt_len: u8,
    opt_mac: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<NaMsg>() == NA_LEN);

/// Whether the 16 bytes at `a` are all zero (`::`), as eight 2-byte loads: a compare of
/// `[u8; 16]` would be a call into a byte loop.
///
/// # Safety
/// `a` points to 16 readable bytes, 2-byte aligned.
#[inline(always)]
unsafe fn is_unspecified(a: *const [u8; 16]) -> bool {
    let w = a as *const u16;
    (*w | *w.add(1) | *w.add(2) | *w.add(3) | *w.add(4) | *w.add(5) | *w.add(6) | *w.add(7)) == 0
}

/// Whether `dst` is the solicited-node group of `target` (RFC 4291 §2.7.1:
/// ff02::1:ff00:0/104 and the target's low 24 bits).
#[inline(always)]
fn is_solicited_node_of(dst: &[u8; 16], target: &[u8; 16]) -> bool {
    dst[0] == 0xff
        && dst[1] == 0x02
        && (dst[2] | dst[3] | dst[4] | dst[5] | dst[6] | dst[7] | dst[8] | dst[9] | dst[10]) == 0
        && dst[11] == 1
        && dst[12] == 0xff
        && dst[13] == target[13]
        && dst[14] == target[14]
        && dst[15] == target[15]
}

/// Handles an ICMPv6 packet whose (bounds-checked, version 6) header is `ip`.
#[inline(always)]
pub fn handle(ctx: &impl Packet, l2: &L2, ip: &Ipv6Hdr) -> Verdict {
    let icmp_off = l2.l3_off + Ipv6Hdr::LEN;
    let Some(ty) = ptr_at::<u8>(ctx, icmp_off) else {
        return Verdict::pass(Reason::Ipv6Passed);
    };
    // SAFETY: bounds-checked by ptr_at.
    if unsafe { *ty } != ND_NEIGHBOR_SOLICIT {
        return Verdict::pass(Reason::Ipv6Passed);
    }
    let Some(ns) = ptr_at::<NdMsg>(ctx, icmp_off) else {
        return Verdict::pass(Reason::NdpMalformed);
    };
    // SAFETY: bounds-checked by ptr_at.
    let ns = unsafe { &*ns };
    // Membership and segment from the flat list, as for ARP; the state in the VIPS6 hash
    // unless the list says it is not needed.
    // SAFETY: inside the bounds-checked message, 2-byte aligned (offset 8 of ICMPv6).
    let Some(vip) = vip6(unsafe { load_ipv6_words(&ns.target) }) else {
        return Verdict::pass(Reason::NsNotVip);
    };
    let target = ns.target;
    let payload_len = u16::from_be_bytes(ip.payload_len) as usize;
    // SAFETY: inside the bounds-checked header, 2-byte aligned.
    let dad = unsafe { is_unspecified(&ip.src_addr) };
    if ip.hop_limit != ND_HOP_LIMIT || ns.code != 0 || payload_len < ND_LEN {
        return Verdict::pass(Reason::NdpMalformed);
    }
    if dad && (!is_solicited_node_of(&ip.dst_addr, &target) || carries_source_ll(ctx, icmp_off, payload_len)) {
        return Verdict::pass(Reason::NdpMalformed);
    }
    if l2.segment != vip.segment {
        return Verdict::pass(l2.other_segment(ctx, vip.segment));
    }
    // An all-zero MAC means "not configured yet" and matches no frame's destination.
    let mac = CONFIG.get(0).map_or(0, |cfg| cfg.mac_word());
    // SAFETY: l2.eth was bounds-checked by the L2 parser; headers are 2-byte aligned.
    let (dst, src) = unsafe { (load_mac(&(*l2.eth).dst_addr), load_mac(&(*l2.eth).src_addr)) };
    if !is_group(dst) && dst != mac {
        return Verdict::pass(Reason::NotForUs);
    }
    // Neither leading nor probing (`VipSet6::NS_SKIP` never hides a flag the hash holds):
    // a follower drops the solicitation without the hash lookup.
    if vip.ns_skip {
        return Verdict::drop(Reason::NsFollowerDropped);
    }
    let to = if dad { ALL_NODES } else { ip.src_addr };
    let to_mac = if dad { load_mac_array(&ALL_NODES_MAC) } else { src };
    // Leading until the list's deadline (`VipSet6::NS_ANSWER`, under the ARP bit's
    // rules): advertised without the hash lookup. Past it, the hash decides.
    if vip.ns_answer && leads_until(vip.balance_until) {
        return advertise(ctx, l2, mac, to_mac, &to, &target, !dad);
    }
    // SAFETY: the value is copied out at once; a concurrent update replaces the element
    // whole (hash map).
    let Some(state) = (unsafe { VIPS6.get(&Vip6Key::new(target)) }).map(|v| v.state) else {
        // In the list but not (yet, or any more) in the hash: added or removed just now.
        return Verdict::pass(Reason::NsNotVip);
    };
    if state.flags & VipState::F_LEADER == 0 || !leads_until(state.leader_until_ns) {
        if state.flags & VipState::F_PROBING != 0 && dad {
            return Verdict::pass(Reason::NsProbeWhileProbing);
        }
        return Verdict::drop(Reason::NsFollowerDropped);
    }
    advertise(ctx, l2, mac, to_mac, &to, &target, !dad)
}

/// `load_mac`'s form of a constant MAC.
#[inline(always)]
const fn load_mac_array(m: &[u8; 6]) -> u64 {
    u64::from_ne_bytes([m[0], m[1], m[2], m[3], m[4], m[5], 0, 0])
}

/// How many options of a DAD probe are looked through for a source link-layer address.
/// A probe carries at most a nonce (RFC 7527); more than this many options is no probe
/// a host sends, and what follows them is not read.
const MAX_DAD_OPTIONS: usize = 4;

/// Whether a solicitation carries a source link-layer address option (what a DAD probe
/// must not carry, RFC 4861 §7.1.1) among its first [`MAX_DAD_OPTIONS`] options, within
/// the payload length and the frame.
#[inline(always)]
fn carries_source_ll(ctx: &impl Packet, icmp_off: usize, payload_len: usize) -> bool {
    let end = icmp_off + payload_len;
    let mut off = icmp_off + ND_LEN;
    for _ in 0..MAX_DAD_OPTIONS {
        let Some(opt) = ptr_at::<[u8; 2]>(ctx, off) else { return false };
        // SAFETY: bounds-checked by ptr_at.
        let [ty, len] = unsafe { *opt };
        if off + 2 > end || len == 0 {
            return false;
        }
        if ty == ND_OPT_SOURCE_LL {
            return true;
        }
        off += usize::from(len) * 8;
    }
    false
}

/// Turns the solicitation into the advertisement of `target` at `mac`, to `to` (its
/// sender, or all-nodes for a DAD probe) at `to_mac`, in place: the frame keeps its
/// Ethernet header and VLAN tags (so the answer leaves on the segment the question came
/// from) and is cut or grown to exactly the NA and its target link-layer option. A drop,
/// the frame untouched, while this node's MAC (`mac`) is not configured (zero).
#[inline(always)]
fn advertise(
    ctx: &impl Packet,
    l2: &L2,
    mac: u64,
    to_mac: u64,
    to: &[u8; 16],
    target: &[u8; 16],
    solicited: bool,
) -> Verdict {
    if mac == 0 {
        return Verdict::drop(Reason::ArpNoConfig);
    }
    let failed = Verdict::drop(Reason::NdpMalformed);
    let new_len = l2.l3_off + Ipv6Hdr::LEN + NA_LEN;
    // The length as a plain number first: the verifier refuses arithmetic on the
    // packet-end pointer, which the compiler would otherwise fold this into.
    let len = core::hint::black_box(ctx.data_end() - ctx.data());
    // Nothing is written yet: a frame that cannot take the advertisement's length goes
    // on untouched.
    if len != new_len && ctx.adjust_tail(new_len as i32 - len as i32).is_err() {
        return Verdict::pass(Reason::NsNoTailroom);
    }
    // Every pointer is derived again: resizing invalidates the old ones.
    let (Some(eth), Some(ip), Some(na)) = (
        ptr_at::<network_types::eth::EthHdr>(ctx, 0),
        ptr_at::<Ipv6Hdr>(ctx, l2.l3_off),
        ptr_at::<NaMsg>(ctx, l2.l3_off + Ipv6Hdr::LEN),
    ) else {
        return failed;
    };
    // SAFETY: each pointer was bounds-checked just above; headers are 2-byte aligned.
    unsafe {
        store_mac(&mut (*eth).dst_addr, to_mac);
        store_mac(&mut (*eth).src_addr, mac);
        let ip = &mut *ip;
        ip.vcf = [0x60, 0, 0, 0];
        ip.payload_len = (NA_LEN as u16).to_be_bytes();
        ip.next_hdr = IPPROTO_ICMPV6;
        ip.hop_limit = ND_HOP_LIMIT;
        ip.src_addr = *target;
        ip.dst_addr = *to;
        let na = &mut *na;
        na.nd.ty = ND_NEIGHBOR_ADVERT;
        na.nd.code = 0;
        na.nd.checksum = [0; 2];
        na.nd.flags = [if solicited { NA_FLAG_SOLICITED | NA_FLAG_OVERRIDE } else { NA_FLAG_OVERRIDE }, 0, 0, 0];
        na.nd.target = *target;
        na.opt_type = ND_OPT_TARGET_LL;
        na.opt_len = 1;
        store_mac(&mut na.opt_mac, mac);
    }
    // The checksum over the pseudo-header (source, destination, upper-layer length,
    // next header: RFC 8200 §8.1) and the message: the addresses and the message are
    // contiguous in the frame, from the source address on.
    let Some(covered) = ptr_at::<[u8; 32 + NA_LEN]>(ctx, l2.l3_off + 8) else {
        return failed;
    };
    // SAFETY: bounds-checked by ptr_at.
    let sum = csum::fold(csum::sum16(unsafe { &*covered }) + NA_LEN as u32 + IPPROTO_ICMPV6 as u32);
    // SAFETY: `na` is inside `covered`, which was checked.
    unsafe { (*na).nd.checksum = sum.to_be_bytes() };
    Verdict::tx(Reason::NsReplied)
}
