//! ICMP errors the data plane sends itself: "fragmentation needed" for a VIP packet that
//! no longer fits the egress MTU once encapsulated (RFC 792, RFC 1191 §4), so the
//! client lowers its path MTU instead of the connection stalling or being reset. As
//! Katran does; rate-limited per CPU (RFC 1812 §4.3.2.8).

use aya_ebpf::{
    helpers::{bpf_ktime_get_coarse_ns, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use network_types::ip::Ipv4Hdr;
use vip_common::{IcmpBudget, Reason};

use crate::{
    csum,
    maps::{CONFIG, ICMP_BUDGET},
    parse::{ptr_at, L2},
    verdict::Verdict,
};

const IPPROTO_ICMP: u8 = 1;
/// Destination unreachable, code fragmentation needed and DF set (RFC 792).
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
/// The ICMP header: type, code, checksum, unused, next-hop MTU (RFC 1191 §4).
const ICMP_HDR_LEN: usize = 8;
/// What an ICMP error quotes: the offending IP header and the first 64 bits of its
/// data (RFC 792), enough for the client to find the TCP connection.
const QUOTE_LEN: usize = Ipv4Hdr::LEN + 8;
/// Don't Fragment, in the host order of the `frags` field.
const IP_DF: u16 = 0x4000;
/// TOS of the error: precedence "internetwork control", as Linux's icmp_send() uses.
const TOS_INTERNETWORK_CONTROL: u8 = 0xc0;
/// TTL of the error.
const TTL: u8 = 64;
/// The smallest MTU an IPv4 host must accept (RFC 791): never advertise less.
const MIN_MTU: u16 = 68;
const SECOND_NS: u64 = 1_000_000_000;

/// Answers the IPv4 packet at `l2.l3_off` (sent to a VIP) with ICMP fragmentation
/// needed, advertising `mtu` (host order), from the VIP back to its source, in place:
/// `XDP_TX`. Only for a packet with DF set and no IP options (TCP sets DF, and options
/// are rare enough not to earn a variable-length quote); others, and errors over the
/// per-CPU budget, are dropped (the local stack, which holds the VIP, would reset the
/// connection).
#[inline(always)]
pub fn frag_needed(ctx: &XdpContext, l2: &L2, mtu: u16) -> Verdict {
    let too_big = Verdict::drop(Reason::IpipTooBig);
    let Some(orig) = ptr_at::<[u8; QUOTE_LEN]>(ctx, l2.l3_off) else {
        return too_big;
    };
    // SAFETY: ptr_at checked the quoted bytes lie inside the frame; copied out before
    // the frame is rewritten over them.
    let quote = unsafe { *orig };
    let frags = u16::from_be_bytes([quote[6], quote[7]]);
    if quote[0] != 0x45 || frags & IP_DF == 0 || !within_budget() {
        return too_big;
    }
    let Some(cfg) = CONFIG.get(0) else {
        return too_big;
    };
    let (client, vip) = ([quote[12], quote[13], quote[14], quote[15]], [quote[16], quote[17], quote[18], quote[19]]);

    let mut icmp = [0u8; ICMP_HDR_LEN + QUOTE_LEN];
    icmp[0] = ICMP_DEST_UNREACH;
    icmp[1] = ICMP_FRAG_NEEDED;
    icmp[6..8].copy_from_slice(&mtu.max(MIN_MTU).to_be_bytes());
    icmp[ICMP_HDR_LEN..].copy_from_slice(&quote);
    let sum = csum::fold(csum::sum16(&icmp));
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());

    // SAFETY: l2.eth was bounds-checked by the L2 parser.
    let eth = unsafe { &mut *l2.eth };
    eth.dst_addr = eth.src_addr;
    eth.src_addr = cfg.mac;
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, l2.l3_off) else {
        return too_big;
    };
    // SAFETY: bounds-checked by ptr_at.
    let ip = unsafe { &mut *ip };
    ip.vihl = 0x45;
    ip.tos = TOS_INTERNETWORK_CONTROL;
    ip.tot_len = ((Ipv4Hdr::LEN + ICMP_HDR_LEN + QUOTE_LEN) as u16).to_be_bytes();
    ip.id = [0; 2];
    ip.frags = [0; 2];
    ip.ttl = TTL;
    ip.proto = IPPROTO_ICMP;
    ip.check = [0; 2];
    ip.src_addr = vip;
    ip.dst_addr = client;
    ip.check = csum::ipv4_header(ip);
    let Some(body) = ptr_at::<[u8; ICMP_HDR_LEN + QUOTE_LEN]>(ctx, l2.l3_off + Ipv4Hdr::LEN) else {
        return too_big;
    };
    // SAFETY: bounds-checked by ptr_at.
    unsafe { *body = icmp };
    let new_len = l2.l3_off + Ipv4Hdr::LEN + ICMP_HDR_LEN + QUOTE_LEN;
    // The length as a plain number first: the verifier refuses arithmetic on the
    // packet-end pointer, which the compiler would otherwise fold this into.
    let len = core::hint::black_box(ctx.data_end() - ctx.data());
    let delta = new_len as i64 - len as i64;
    // SAFETY: shrinking the tail; on failure the frame keeps its length, which only
    // leaves trailing bytes after the complete error.
    if unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta as i32) } != 0 {
        return too_big;
    }
    Verdict::tx(Reason::IpipFragNeeded)
}

/// Takes one error from this CPU's budget of [`IcmpBudget::PER_SECOND`]; `false` when
/// it is spent.
#[inline(always)]
fn within_budget() -> bool {
    let Some(b) = ICMP_BUDGET.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    // SAFETY: a per-CPU value from a successful lookup, touched only by this CPU.
    let b = unsafe { &mut *b };
    if now.wrapping_sub(b.window_ns) >= SECOND_NS {
        b.window_ns = now;
        b.sent = 0;
    }
    if b.sent >= IcmpBudget::PER_SECOND {
        return false;
    }
    b.sent += 1;
    true
}
