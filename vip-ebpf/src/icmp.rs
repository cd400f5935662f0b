//! ICMP for VIP flows, both ways:
//! - errors the data plane sends itself: "fragmentation needed" for a VIP packet that no
//!   longer fits the egress MTU once encapsulated (RFC 792, RFC 1191 §4), so the client
//!   lowers its path MTU instead of the connection stalling or being reset. As Katran
//!   does; rate-limited per CPU (RFC 1812 §4.3.2.8);
//! - errors routers send to the VIP about its answers (which backends send straight to
//!   the clients, by DSR): steered to the backend holding the flow, which is the one
//!   whose TCP must lower its path MTU (Katran does the same).

use aya_ebpf::helpers::bpf_ktime_get_coarse_ns;
use network_types::ip::Ipv4Hdr;
use vip_common::{Backend, FlowKey, ForwardMode, IcmpBudget, Reason, ServiceKey, IPPROTO_TCP};

use crate::{
    csum,
    ctx::Packet,
    encap,
    forward::{balances, dsr, is_peer_mac},
    lb,
    maps::{VipInfo, CONFIG, ICMP_BUDGET, SERVICES},
    parse::{load_mac, ptr_at, store_mac, L2},
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
pub fn frag_needed(ctx: &impl Packet, l2: &L2, mtu: u16) -> Verdict {
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

    // SAFETY: l2.eth was bounds-checked by the L2 parser; 2-byte aligned fields.
    unsafe {
        let eth = &mut *l2.eth;
        store_mac(&mut eth.dst_addr, load_mac(&eth.src_addr));
        store_mac(&mut eth.src_addr, cfg.mac_word());
    }
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
    if ctx.adjust_tail(delta as i32).is_err() {
        return too_big;
    }
    Verdict::tx(Reason::IpipFragNeeded)
}

/// Steers an ICMP destination-unreachable to the VIP `vip_addr` whose quote is a VIP
/// service's answer to a client (the VIP's TCP segment: only its first 8 bytes, the
/// ports, are needed) to the backend holding that flow: the connection table first,
/// then — on a node that balances — the live Maglev table on the reversed tuple (never
/// pinned: an error makes no flow). Forwarded by the flow's mode (DSR or IPIP); a flow
/// whose backend is this node goes up the local stack. Echo requests and errors about
/// anything else go to the local stack too; a quote too short to name a flow is dropped.
/// `src_mac`/`our_mac` are in `load_mac`'s form; the frame is known to be for us.
#[inline(always)]
pub fn to_backend(
    ctx: &impl Packet,
    l2: &L2,
    ihl: usize,
    vip_addr: [u8; 4],
    vip: &VipInfo,
    src_mac: u64,
    our_mac: u64,
) -> Verdict {
    let local = Verdict::pass(Reason::VipIcmp);
    let Some(icmp) = ptr_at::<[u8; ICMP_HDR_LEN]>(ctx, l2.l3_off + ihl) else {
        return local;
    };
    // SAFETY: bounds-checked by ptr_at.
    if unsafe { (*icmp)[0] } != ICMP_DEST_UNREACH {
        return local;
    }
    let quote = l2.l3_off + ihl + ICMP_HDR_LEN;
    let Some(q) = ptr_at::<[u8; Ipv4Hdr::LEN]>(ctx, quote) else {
        return Verdict::drop(Reason::IcmpQuoteTruncated);
    };
    // SAFETY: bounds-checked by ptr_at.
    let q = unsafe { *q };
    let q_ihl = ((q[0] & 0x0f) as usize) * 4;
    let (q_src, q_dst) = ([q[12], q[13], q[14], q[15]], [q[16], q[17], q[18], q[19]]);
    // Ours: the VIP's own TCP segment, sent from this VIP.
    if q[0] >> 4 != 4 || q_ihl < Ipv4Hdr::LEN || q[9] != IPPROTO_TCP || q_src != vip_addr {
        return local;
    }
    let Some(ports) = ptr_at::<[u8; 4]>(ctx, quote + q_ihl) else {
        return Verdict::drop(Reason::IcmpQuoteTruncated);
    };
    // SAFETY: bounds-checked by ptr_at.
    let ports = unsafe { *ports };
    let (svc_port, client_port) = ([ports[0], ports[1]], [ports[2], ports[3]]);
    let key = ServiceKey { vip: vip_addr, port: svc_port, proto: IPPROTO_TCP, _pad: 0 };
    // SAFETY: copied out at once.
    let Some(svc) = (unsafe { SERVICES.get(key) }).copied() else {
        return local;
    };
    if svc.mode == ForwardMode::Local as u8 {
        return Verdict::pass(Reason::LocalMode);
    }
    // A peer sent it here (it balanced the error to this node, the backend): ours.
    if is_peer_mac(src_mac) {
        return Verdict::pass(Reason::BalancedByPeer);
    }
    // The flow as the client sends it.
    let flow = FlowKey::new(q_dst, vip_addr, client_port, svc_port, IPPROTO_TCP);
    let Some(cfg) = CONFIG.get(0) else { return local };
    let slot = vip_common::cache_slot(flow.words(), cfg.hash_seed);
    // An ICMP error opens no connection.
    let (backend, mode) = match lb::pinned(&flow, flow.words(), slot, cfg.generation, || false) {
        Some(pin) => (pin.backend, pin.mode),
        None => {
            if !balances(vip.balance_until) {
                return Verdict::pass(Reason::NotBalancing);
            }
            let Some((_, backend)) = lb::maglev(&flow, &svc, cfg.hash_seed) else {
                return Verdict::pass(Reason::NoBackend);
            };
            (backend, svc.mode)
        }
    };
    if backend.flags & Backend::F_LOCAL != 0 {
        return Verdict::pass(Reason::LocalBackend);
    }
    if mode == ForwardMode::Ipip as u8 {
        let v = encap::ipip(ctx, l2, cfg, &backend);
        return if v.reason == Reason::ForwardedIpip { Verdict::tx(Reason::IcmpToBackend) } else { v };
    }
    // SAFETY: l2.eth was bounds-checked by the L2 parser.
    dsr(unsafe { &mut *l2.eth }, our_mac, &backend);
    Verdict::tx(Reason::IcmpToBackend)
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
