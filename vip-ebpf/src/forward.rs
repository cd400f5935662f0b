//! IPv4: classify the packet, and forward VIP service traffic to its backend.

use aya_ebpf::{helpers::bpf_ktime_get_coarse_ns, programs::XdpContext};
use network_types::{ip::Ipv4Hdr, tcp::TcpHdr};
use vip_common::{Backend, FlowKey, ForwardMode, Reason, ServiceKey, VipState, IPPROTO_TCP};

use crate::{
    encap, lb,
    maps::{vip_balance_until, SERVICES},
    parse::{ptr_at, L2},
    stats,
    verdict::Verdict,
};

const IPPROTO_ICMP: u8 = 1;
/// IPv4-in-IPv4.
pub const IPPROTO_IPIP: u8 = 4;
/// The "more fragments" flag and the fragment offset, in host order of the `frags` field.
const IP_MF_AND_OFFSET: u16 = 0x3fff;

#[inline(always)]
pub fn handle(ctx: &XdpContext, l2: &L2) -> Verdict {
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
    let dst = iph.dst_addr;
    let Some(balance_until) = vip_balance_until(dst) else {
        return Verdict::pass(Reason::NotVip);
    };
    if u16::from_be_bytes(iph.frags) & IP_MF_AND_OFFSET != 0 {
        return Verdict::pass(Reason::Fragment);
    }
    match iph.proto {
        IPPROTO_TCP => {}
        IPPROTO_ICMP => return Verdict::pass(Reason::VipIcmp),
        _ => return Verdict::pass(Reason::VipNotTcp),
    }
    let Some(tcp) = ptr_at::<TcpHdr>(ctx, l2.l3_off + ihl) else {
        return Verdict::pass(Reason::TcpMalformed);
    };
    // SAFETY: ptr_at checked the 20-byte TCP header is inside the frame.
    let (sport, dport) = unsafe { ((*tcp).source, (*tcp).dest) };
    let flow = FlowKey { src: iph.src_addr, dst, sport, dport, proto: IPPROTO_TCP, _pad: [0; 3] };
    // A flow this node pinned keeps its backend, which holds the connection, even after
    // this node stopped balancing (a leader whose deadline passed, or that handed over):
    // clients that have not moved yet keep their connections.
    let (id, backend, mode) = match lb::pinned(&flow) {
        Some(hit) => hit,
        None => {
            // New flow on a node that does not balance this VIP (a follower): the leader
            // sent it here by DSR; deliver it rather than balance it with a table that
            // may be stale. The coarse clock (same base, tick resolution) is enough
            // against a deadline with 400 ms of fencing margin; a deadline that never
            // passes skips the clock.
            // SAFETY: helper without preconditions.
            if balance_until != VipState::FOREVER && unsafe { bpf_ktime_get_coarse_ns() } >= balance_until {
                return Verdict::pass(Reason::NotBalancing);
            }
            let key = ServiceKey { vip: dst, port: dport, proto: IPPROTO_TCP, _pad: 0 };
            // SAFETY: copied out at once.
            let Some(svc) = (unsafe { SERVICES.get(key) }).copied() else {
                return Verdict::pass(Reason::VipOtherPort);
            };
            if svc.mode == ForwardMode::Local as u8 {
                return Verdict::pass(Reason::LocalMode);
            }
            let Some((id, backend)) = lb::choose(&flow, &svc) else {
                return Verdict::pass(Reason::NoBackend);
            };
            (id, backend, svc.mode)
        }
    };
    stats::count_backend(id, (ctx.data_end() - ctx.data()) as u64);
    if backend.flags & Backend::F_LOCAL != 0 {
        return Verdict::pass(Reason::LocalBackend);
    }
    if mode == ForwardMode::Ipip as u8 {
        return encap::ipip(ctx, l2, &backend);
    }
    // DSR: the frame was addressed to us, so its destination MAC is ours and becomes the
    // source; the backend's MAC becomes the destination. IP and TCP stay as they are.
    // SAFETY: l2.eth was bounds-checked by the L2 parser.
    let eth = unsafe { &mut *l2.eth };
    eth.src_addr = eth.dst_addr;
    eth.dst_addr = backend.mac;
    Verdict::tx(Reason::ForwardedDsr)
}
