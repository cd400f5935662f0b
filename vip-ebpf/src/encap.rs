//! IPIP: encapsulate VIP traffic towards a backend on another subnet, and strip the
//! outer header of IPIP traffic for a VIP arriving at this node as a backend. No kernel
//! tunnel device is needed on either side.
//!
//! Only what this project encapsulated is decapsulated: from a peer (another
//! load-balancing node), to this node's address, carrying a TCP segment for a VIP
//! service. Anything else would let any host on the segment reach every wildcard
//! listener of the node through the VIP, with a spoofed inner source.

use core::mem;

use aya_ebpf::{
    bindings::{
        bpf_fib_lookup as FibParams, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_FWD_DISABLED,
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_OUTPUT,
    },
    helpers::bpf_fib_lookup,
};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, tcp::TcpHdr, vlan::VlanHdr};
use vip_common::{Backend, Config, PeerKey, Reason, ServiceKey, IPPROTO_TCP};

use crate::{
    csum,
    ctx::Packet,
    forward::{IPPROTO_IPIP, IP_MF_AND_OFFSET},
    icmp,
    maps::{is_peer, vip, CONFIG, SERVICES},
    parse::{load_mac, ptr_at, store_mac, L2},
    verdict::Verdict,
};

/// Address family of the FIB lookup.
const AF_INET: u8 = 2;
/// TTL of the outer header: the backend is at most a few routed hops away.
const OUTER_TTL: u8 = 64;
/// Don't Fragment, set on the outer header like the kernel's ipip tunnels with pmtudisc.
const IP_DF: [u8; 2] = 0x4000u16.to_be_bytes();

/// The L2 header (Ethernet and up to two VLAN tags) saved across `bpf_xdp_adjust_head`,
/// which invalidates every packet pointer.
struct SavedL2 {
    eth: EthHdr,
    vlans: [Option<VlanHdr>; 2],
}

#[inline(always)]
fn save_l2(ctx: &impl Packet, l2: &L2) -> Option<SavedL2> {
    // SAFETY: l2.eth was bounds-checked by the parser; the tags by ptr_at.
    let eth = unsafe { *l2.eth };
    let mut vlans = [None, None];
    if l2.tags >= 1 {
        vlans[0] = Some(unsafe { *ptr_at::<VlanHdr>(ctx, EthHdr::LEN)? });
    }
    if l2.tags >= 2 {
        vlans[1] = Some(unsafe { *ptr_at::<VlanHdr>(ctx, EthHdr::LEN + VlanHdr::LEN)? });
    }
    Some(SavedL2 { eth, vlans })
}

/// Writes `saved` at the (new) start of the frame; returns its Ethernet header.
#[inline(always)]
fn restore_l2(ctx: &impl Packet, saved: &SavedL2) -> Option<*mut EthHdr> {
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    // SAFETY: every pointer below was bounds-checked by ptr_at.
    unsafe {
        *eth = saved.eth;
        if let Some(tag) = saved.vlans[0] {
            *ptr_at::<VlanHdr>(ctx, EthHdr::LEN)? = tag;
        }
        if let Some(tag) = saved.vlans[1] {
            *ptr_at::<VlanHdr>(ctx, EthHdr::LEN + VlanHdr::LEN)? = tag;
        }
    }
    Some(eth)
}

/// Encapsulates the frame in IPv4 from this node to `backend` and sends it back out the
/// interface it came in on (`cfg`: this node's [`Config`]). The next hop's MAC is the one
/// the agent resolved into the backend entry when the packet fits that route's MTU;
/// otherwise (not resolved yet, or too big) the kernel's FIB and neighbour tables decide
/// (`bpf_fib_lookup`, output lookup restricted to this interface). Until a next hop is
/// known nothing is modified, so a failure passes the frame intact.
#[inline(always)]
pub fn ipip(ctx: &impl Packet, l2: &L2, cfg: &Config, backend: &Backend) -> Verdict {
    let fail = Verdict::pass(Reason::IpipFailed);
    let node_ip = cfg.ip;
    if node_ip == [0; 4] {
        return fail;
    }
    let Some(inner) = ptr_at::<Ipv4Hdr>(ctx, l2.l3_off) else {
        return fail;
    };
    // SAFETY: bounds-checked by ptr_at.
    let (inner_len, tos) = unsafe { (u16::from_be_bytes((*inner).tot_len), (*inner).tos) };
    let Some(outer_len) = inner_len.checked_add(Ipv4Hdr::LEN as u16) else {
        return fail;
    };
    let (dmac, smac) = if backend.nh_mtu != 0 && outer_len <= backend.nh_mtu {
        // SAFETY: both fields are 2-byte aligned in their align(8) map values.
        unsafe { (load_mac(&backend.nh_mac), cfg.mac_word()) }
    } else {
        match fib_next_hop(ctx, l2, node_ip, backend.ip, outer_len, tos) {
            Ok(macs) => macs,
            Err(verdict) => return verdict,
        }
    };
    prepend(ctx, l2, dmac, smac, &OuterIpv4 { tos, tot_len: outer_len, src: node_ip, dst: backend.ip })
}

/// EtherType IPv4 as the native word of its wire bytes.
const ETHERTYPE_IPV4_WORD: u16 = u16::from_ne_bytes(0x0800u16.to_be_bytes());

/// Grows the head by one IPv4 header and writes the L2 header and `outer` in front of
/// the inner packet. `bpf_xdp_adjust_head` invalidates every packet pointer, so a tagged
/// frame's L2 header (Ethernet and up to two tags) is saved across it and written back;
/// an untagged frame's is written afresh from registers (on this path its EtherType can
/// only be IPv4), with nothing saved.
#[inline(always)]
fn prepend(ctx: &impl Packet, l2: &L2, dmac: u64, smac: u64, outer: &OuterIpv4) -> Verdict {
    let saved = if l2.tags == 0 {
        None
    } else {
        match save_l2(ctx, l2) {
            Some(saved) => Some(saved),
            None => return Verdict::pass(Reason::IpipFailed),
        }
    };
    // SAFETY: growing the head by one IPv4 header; on failure the frame is unchanged.
    if ctx.adjust_head(-(Ipv4Hdr::LEN as i32)).is_err() {
        return Verdict::pass(Reason::IpipFailed);
    }
    // From here on the frame is half-built: a failure can only drop it.
    let broken = Verdict::drop(Reason::IpipFailed);
    let eth = match &saved {
        Some(saved) => restore_l2(ctx, saved),
        None => ptr_at::<EthHdr>(ctx, 0).inspect(|&eth| {
            // SAFETY: bounds-checked by ptr_at; a 2-byte aligned field.
            unsafe { *(&mut (*eth).ether_type as *mut _ as *mut u16) = ETHERTYPE_IPV4_WORD };
        }),
    };
    let (Some(eth), Some(ip)) = (eth, ptr_at::<Ipv4Hdr>(ctx, l2.l3_off)) else {
        return broken;
    };
    // SAFETY: bounds-checked by ptr_at (in restore_l2 for a tagged frame's `eth`); the
    // frame's start, both MAC fields and the IPv4 header are 2-byte aligned.
    unsafe {
        store_mac(&mut (*eth).dst_addr, dmac);
        store_mac(&mut (*eth).src_addr, smac);
        outer.store(ip);
    }
    Verdict::tx(Reason::ForwardedIpip)
}

/// The outer IPv4 header of an IPIP packet (RFC 2003 §3.1): version 4, no options, the
/// inner header's TOS, DF set, [`OUTER_TTL`], protocol 4.
struct OuterIpv4 {
    tos: u8,
    /// Total length, host order.
    tot_len: u16,
    /// Addresses, network order.
    src: [u8; 4],
    dst: [u8; 4],
}

impl OuterIpv4 {
    /// Writes the header to `h` as ten 2-byte stores of values built in registers, the
    /// checksum summed over the same native words: the one's-complement sum is byte-order
    /// independent (RFC 1071 §2(B)), so the native sum, folded and stored natively, is
    /// the checksum's wire bytes on either endianness.
    ///
    /// # Safety
    /// `h` points to 20 writable bytes, 2-byte aligned.
    #[inline(always)]
    unsafe fn store(&self, h: *mut Ipv4Hdr) {
        let word = |a: u8, b: u8| u16::from_ne_bytes([a, b]);
        let (s, d) = (self.src, self.dst);
        let mut words = [
            word(0x45, self.tos),
            self.tot_len.to_be(),
            0,
            u16::from_ne_bytes(IP_DF),
            word(OUTER_TTL, IPPROTO_IPIP),
            0,
            word(s[0], s[1]),
            word(s[2], s[3]),
            word(d[0], d[1]),
            word(d[2], d[3]),
        ];
        let mut sum = 0u32;
        for w in words {
            sum += u32::from(w);
        }
        words[5] = csum::fold(sum);
        let p = h as *mut u16;
        for (i, w) in words.into_iter().enumerate() {
            *p.add(i) = w;
        }
    }
}

/// The next hop's and this interface's MACs from the kernel (`bpf_fib_lookup`, output
/// lookup on the ingress interface), or the verdict for a packet the FIB will not route:
/// every answer has its own counter, and nothing too big is handed to the local stack
/// (it holds the VIP and would reset the connection).
#[inline(always)]
fn fib_next_hop(
    ctx: &impl Packet,
    l2: &L2,
    src: [u8; 4],
    dst: [u8; 4],
    outer_len: u16,
    tos: u8,
) -> Result<(u64, u64), Verdict> {
    // SAFETY: bpf_fib_lookup is plain data; all-zero is its documented initial state.
    let mut fib: FibParams = unsafe { mem::zeroed() };
    fib.family = AF_INET;
    fib.l4_protocol = IPPROTO_IPIP;
    fib.__bindgen_anon_1.tot_len = outer_len;
    fib.ifindex = ctx.ingress_ifindex();
    fib.__bindgen_anon_2.tos = tos;
    fib.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(src);
    fib.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(dst);
    // SAFETY: ctx is the program's context; fib is a valid, writable parameter block.
    let rc =
        unsafe { bpf_fib_lookup(ctx.as_ptr(), &mut fib, mem::size_of::<FibParams>() as i32, BPF_FIB_LOOKUP_OUTPUT) };
    match rc as u32 {
        // SAFETY: dmac and smac are at offsets 58 and 52 of the parameter block: 2-byte
        // aligned.
        BPF_FIB_LKUP_RET_SUCCESS => Ok(unsafe { (load_mac(&fib.dmac), load_mac(&fib.smac)) }),
        BPF_FIB_LKUP_RET_FRAG_NEEDED => {
            // SAFETY: on FRAG_NEEDED the kernel stored the route's MTU in the union.
            let mtu = unsafe { fib.__bindgen_anon_1.mtu_result };
            Err(icmp::frag_needed(ctx, l2, mtu.saturating_sub(Ipv4Hdr::LEN as u16)))
        }
        BPF_FIB_LKUP_RET_NO_NEIGH => Err(Verdict::pass(Reason::IpipNoNeigh)),
        BPF_FIB_LKUP_RET_FWD_DISABLED => Err(Verdict::pass(Reason::IpipForwardingDisabled)),
        _ => Err(Verdict::pass(Reason::IpipNoRoute)),
    }
}

/// Strips the outer header of an IPIP packet that this project's encapsulation made —
/// outer source a peer, outer destination this node, inner a TCP segment (first or
/// only fragment, complete header) for a VIP service — and passes the inner packet to
/// the local stack (this node is the backend). Every other IPIP packet passes untouched.
#[inline(always)]
pub fn decap(ctx: &impl Packet, l2: &L2, outer_ihl: usize) -> Verdict {
    let not_ours = Verdict::pass(Reason::IpipNotOurs);
    let (Some(outer), Some(cfg)) = (ptr_at::<Ipv4Hdr>(ctx, l2.l3_off), CONFIG.get(0)) else {
        return not_ours;
    };
    // SAFETY: bounds-checked by ptr_at; l2.eth by the L2 parser; 2-byte aligned fields.
    let (outer_src, outer_dst, outer_frags, eth_dst, our_mac) = unsafe {
        ((*outer).src_addr, (*outer).dst_addr, (*outer).frags, load_mac(&(*l2.eth).dst_addr), cfg.mac_word())
    };
    // Ours is never fragmented (DF), always to our address and MAC.
    if eth_dst != our_mac
        || outer_dst != cfg.ip
        || u16::from_be_bytes(outer_frags) & IP_MF_AND_OFFSET != 0
        || !is_peer(&PeerKey::ipv4(outer_src))
    {
        return not_ours;
    }
    let inner_off = l2.l3_off + outer_ihl;
    let Some(inner) = ptr_at::<Ipv4Hdr>(ctx, inner_off) else {
        return not_ours;
    };
    // SAFETY: bounds-checked by ptr_at.
    let (vihl, proto, frags, inner_src, inner_dst) =
        unsafe { ((*inner).vihl, (*inner).proto, (*inner).frags, (*inner).src_addr, (*inner).dst_addr) };
    let inner_ihl = ((vihl & 0x0f) as usize) * 4;
    if vihl >> 4 != 4 || inner_ihl < Ipv4Hdr::LEN || proto != IPPROTO_TCP {
        return not_ours;
    }
    // What we encapsulate are first fragments at most (fragments to a VIP are never
    // forwarded), with the whole TCP header.
    if u16::from_be_bytes(frags) & IP_MF_AND_OFFSET != 0 {
        return not_ours;
    }
    let Some(tcp) = ptr_at::<TcpHdr>(ctx, inner_off + inner_ihl) else {
        return not_ours;
    };
    // SAFETY: bounds-checked by ptr_at.
    let dport = unsafe { (*tcp).dest };
    let key = ServiceKey { vip: inner_dst, port: dport, proto: IPPROTO_TCP, _pad: 0 };
    // A peer's VIP-path probe: the inner SYN from its own (outer, peer) address. It comes
    // on the segment of the nodes' own addresses whatever the VIP's (a VIP on a VLAN:
    // untagged), as the DSR probe does, so it is taken on any segment.
    let probe = inner_src == outer_src;
    // SAFETY: only presence is read.
    if unsafe { SERVICES.get(key) }.is_none() || vip(inner_dst).is_none_or(|v| v.segment != l2.segment && !probe) {
        return not_ours;
    }
    // A leaving node refuses the peers' VIP-path probes, which IPIP carries too: they
    // drain it before its VIP leaves `lo`, as by DSR. The RST goes back unencapsulated,
    // as a backend answers: from the frame stripped of its outer header, as below. A
    // probe that cannot be stripped is dropped: refused all the same.
    let refusing = cfg.flags & Config::F_LEAVING != 0 && probe;
    let refused = Verdict::drop(Reason::ProbeRefusedLeaving);
    let Some(saved) = save_l2(ctx, l2) else {
        return if refusing { refused } else { not_ours };
    };
    // SAFETY: shrinking the head by the outer header; on failure the frame is unchanged.
    if ctx.adjust_head(outer_ihl as i32).is_err() {
        return if refusing { refused } else { Verdict::pass(Reason::IpipFailed) };
    }
    if restore_l2(ctx, &saved).is_none() {
        return if refusing { refused } else { Verdict::drop(Reason::IpipFailed) };
    }
    if refusing {
        return crate::forward::refused(ctx, l2.l3_off);
    }
    Verdict::pass(Reason::IpipDecap)
}
