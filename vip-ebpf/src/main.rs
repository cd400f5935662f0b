//! vip's data plane, at XDP (or, with `--attach tcx`, at tcx ingress).
//!
//! The entry point is deliberately thin: parse the L2 header, hand the frame to the
//! handler for its protocol, count the verdict under its reason, return it. Every module
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
mod icmp;
mod icmp6;
mod lb;
mod log;
mod maps;
mod ndp;
mod parse;
mod stats;
mod verdict;

use aya_ebpf::{
    bindings::{tcx_action_base::TCX_NEXT, xdp_action, TC_ACT_SHOT},
    helpers::bpf_redirect,
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use vip_common::Reason;

use crate::{ctx::Packet, parse::EtherKind, verdict::Verdict};

/// The data plane: ARP for the VIPs, load balancing of VIP services, everything else
/// passes.
#[xdp]
pub fn vip_xdp(ctx: XdpContext) -> u32 {
    let verdict = process(&ctx);
    stats::count(verdict.reason);
    log::rare(&ctx, verdict.reason);
    verdict.action
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
    // Never more than the skb holds; a pull that fails anyway (no memory) leaves the
    // frame as it is, and the parsers bound every read by what is linear.
    let _ = ctx.pull_data(TCX_PULL.min(ctx.len()));
    let verdict = process(&ctx);
    stats::count(verdict.reason);
    log::rare(&ctx, verdict.reason);
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

#[inline(always)]
fn process(ctx: &impl Packet) -> Verdict {
    let l2 = match parse::ethernet(ctx) {
        Ok(l2) => l2,
        Err(reason) => return Verdict::pass(reason),
    };
    match l2.kind {
        EtherKind::Arp => arp::handle(ctx, &l2),
        EtherKind::Ipv4 => forward::handle(ctx, &l2),
        EtherKind::Ipv6 => forward6::handle(ctx, &l2),
        EtherKind::Other => Verdict::pass(Reason::NotArpPassed),
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
