//! vip's data plane, at XDP (or, with `--attach tcx`, at tcx ingress).
//!
//! The entry point is deliberately thin: parse the L2 header, hand the frame to the
//! handler for its protocol, count the verdict under its reason, return it. IPv6 goes to
//! a second program by a tail call (`vip_xdp6`, `vip_tcx6`), so that its code does not
//! share the IPv4 fast path's one function (everything is inlined into it). Every module
//! below returns a [`Verdict`] that carries both the XDP action and the reason, so no
//! computed verdict is ever replaced by a generic one on the way out.
#![no_std]
#![no_main]

mod arp;
mod csum;
mod ctx;
mod encap;
mod forward;
mod forward6;
mod handoff;
mod icmp;
mod icmp6;
mod lb;
mod log;
mod maps;
mod ndp;
mod parse;
mod refuse;
mod stats;
mod verdict;

use aya_ebpf::{
    bindings::{tcx_action_base::TCX_NEXT, xdp_action, TC_ACT_SHOT},
    helpers::bpf_redirect,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use vip_common::{tail_calls, Reason};

use crate::{ctx::Packet, parse::EtherKind, verdict::Verdict};

/// The data plane: ARP for the VIPs, load balancing of VIP services, everything else
/// passes.
#[xdp]
pub fn vip_xdp(ctx: XdpContext) -> u32 {
    let verdict = match process(&ctx) {
        Next::Done(verdict) => verdict,
        Next::Ipv6 => {
            // SAFETY: a tail call to the IPv6 program; it returns only if the slot is
            // empty (an object whose agent has not filled it), and then the frame passes.
            unsafe { maps::PROGS_XDP.tail_call(&ctx, tail_calls::IPV6) };
            Verdict::pass(Reason::Ipv6Passed)
        }
    };
    xdp_action(&ctx, verdict)
}

/// Counts `verdict`, leaves the companion's mark on a frame it must decide, and returns
/// the action.
#[inline(always)]
fn xdp_action(ctx: &XdpContext, verdict: Verdict) -> u32 {
    stats::count(verdict.reason);
    log::rare(ctx, verdict.reason);
    if verdict.reason == Reason::UntaggedAtXdp {
        handoff::mark(ctx);
    }
    verdict.action
}

/// The IPv6 data plane at XDP, entered from [`vip_xdp`] by a tail call: a program of its
/// own, so that its code and stack do not weigh on the IPv4 paths.
#[xdp]
pub fn vip_xdp6(ctx: XdpContext) -> u32 {
    let verdict = process6(&ctx);
    xdp_action(&ctx, verdict)
}

/// How much of a frame tcx makes linear before parsing: Ethernet, two VLAN tags, then
/// the longest header chain a handler reads, an ICMP error quoting a VIP flow (IPv4 with
/// options, ICMP, the quoted IPv4 with options and 8 bytes of TCP: 14 + 8 + 60 + 8 + 60
/// + 8 = 158). An skb from a NIC that splits headers may hold less in its linear part;
/// XDP always sees the first buffer whole.
const TCX_PULL: u32 = 160;

/// The same data plane at tcx ingress (`--attach tcx`), for interfaces whose XDP hook
/// belongs to another program. Ordered first by the agent; what is not ours goes on to
/// the next program (`TCX_NEXT`: never `TC_ACT_OK`, which would skip the programs after
/// ours, Cilium's among them). A frame answered or forwarded leaves again by the same
/// interface (`bpf_redirect` to its egress: tc's `XDP_TX`).
#[classifier]
pub fn vip_tcx(ctx: TcContext) -> i32 {
    tcx(&ctx)
}

/// The companion of [`vip_xdp`] for VIPs on a VLAN (`--vlan` at XDP), at tcx ingress
/// after it: the frames XDP could not decide because their VLAN tag may be in metadata
/// (it passes them marked, [`Reason::UntaggedAtXdp`]: see [`handoff`]) are decided here
/// with the tag from the skb, exactly as [`vip_tcx`] decides them. Every other frame XDP
/// has decided already: handed on at once, not counted twice.
#[classifier]
pub fn vip_tcx_vlan(ctx: TcContext) -> i32 {
    if handoff::marked(&ctx) || (handoff::no_meta() && ctx.offloaded_vid().is_some()) {
        // SAFETY: a tail call to `vip_tcx`; it returns only if the slot is empty (an
        // agent that has not filled it), and then the frame goes on.
        unsafe { maps::PROGS_TCX_VLAN.tail_call(&ctx, tail_calls::TCX) };
    }
    TCX_NEXT
}

/// The tcx data plane of [`vip_tcx`].
#[inline(always)]
fn tcx(ctx: &TcContext) -> i32 {
    // Never more than the skb holds; a pull that fails anyway (no memory) leaves the
    // frame as it is, and the parsers bound every read by what is linear.
    let _ = ctx.pull_data(TCX_PULL.min(ctx.len()));
    let verdict = match process(ctx) {
        Next::Done(verdict) => verdict,
        Next::Ipv6 => {
            // SAFETY: as in `vip_xdp`.
            unsafe { maps::PROGS_TCX.tail_call(ctx, tail_calls::IPV6) };
            Verdict::pass(Reason::Ipv6Passed)
        }
    };
    tc_action(ctx, verdict)
}

/// The IPv6 data plane at tcx, entered from [`vip_tcx`] by a tail call (the headers are
/// pulled already).
#[classifier]
pub fn vip_tcx6(ctx: TcContext) -> i32 {
    let verdict = process6(&ctx);
    tc_action(&ctx, verdict)
}

/// Counts `verdict` and maps it to tc's return codes.
#[inline(always)]
fn tc_action(ctx: &TcContext, verdict: Verdict) -> i32 {
    stats::count(verdict.reason);
    log::rare(ctx, verdict.reason);
    match verdict.action {
        xdp_action::XDP_TX => {
            // SAFETY: helper without pointer arguments; returns TC_ACT_REDIRECT.
            unsafe { bpf_redirect(ctx.ingress_ifindex(), 0) as i32 }
        }
        xdp_action::XDP_DROP => TC_ACT_SHOT as i32,
        _ => TCX_NEXT,
    }
}

/// Returns `XDP_PASS` and does nothing else: the benchmark floor, and the program tests
/// attach to the peer of a veth so that native-mode `XDP_TX` gets delivered.
#[xdp]
pub fn xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Drops ICMP over untagged IPv4 and hands everything else on: the stand-in tests attach
/// after `vip_tcx` for another project's tcx program (Cilium's). A ping to the node's own
/// address is not ours, so it must reach this program (and be dropped), while VIP
/// traffic keeps being answered and forwarded before it.
#[classifier]
pub fn tcx_drop_icmp(ctx: TcContext) -> i32 {
    const IPPROTO_ICMP: u8 = 1;
    match parse::ethernet(&ctx) {
        Ok(l2) if l2.kind == EtherKind::Ipv4 => match parse::ptr_at::<network_types::ip::Ipv4Hdr>(&ctx, l2.l3_off) {
            // SAFETY: ptr_at checked the header lies inside the frame.
            Some(ip) if unsafe { (*ip).proto } == IPPROTO_ICMP => TC_ACT_SHOT as i32,
            _ => TCX_NEXT,
        },
        _ => TCX_NEXT,
    }
}

/// What the entry point does next with a frame.
enum Next {
    Done(Verdict),
    /// An IPv6 frame: the IPv6 program's.
    Ipv6,
}

#[inline(always)]
fn process(ctx: &impl Packet) -> Next {
    let l2 = match parse::ethernet(ctx) {
        Ok(l2) => l2,
        Err(reason) => return Next::Done(Verdict::pass(reason)),
    };
    Next::Done(match l2.kind {
        EtherKind::Arp => arp::handle(ctx, &l2),
        EtherKind::Ipv4 => forward::handle(ctx, &l2),
        EtherKind::Ipv6 => return Next::Ipv6,
        EtherKind::Other => Verdict::pass(Reason::NotArpPassed),
    })
}

/// The IPv6 program's body: the L2 headers parsed again (the tail call keeps only the
/// frame), then Neighbor Discovery and forwarding.
#[inline(always)]
fn process6(ctx: &impl Packet) -> Verdict {
    match parse::ethernet(ctx) {
        Ok(l2) if l2.kind == EtherKind::Ipv6 => forward6::handle(ctx, &l2),
        Ok(_) => Verdict::pass(Reason::NotArpPassed),
        Err(reason) => Verdict::pass(reason),
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any path that could reach a panic, so this is never called.
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
