//! vip's XDP data plane.
//!
//! The entry point is deliberately thin: parse the L2 header, hand the frame to the
//! handler for its protocol, count the verdict under its reason, return it. Every module
//! below returns a [`Verdict`] that carries both the XDP action and the reason, so no
//! computed verdict is ever replaced by a generic one on the way out.
#![no_std]
#![no_main]

mod arp;
mod csum;
mod encap;
mod forward;
mod icmp;
mod lb;
mod log;
mod maps;
mod parse;
mod stats;
mod verdict;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use vip_common::Reason;

use crate::{parse::EtherKind, verdict::Verdict};

/// The data plane: ARP for the VIPs, load balancing of VIP services, everything else
/// passes.
#[xdp]
pub fn vip_xdp(ctx: XdpContext) -> u32 {
    let verdict = process(&ctx);
    stats::count(verdict.reason);
    log::rare(&ctx, verdict.reason);
    verdict.action
}

/// Returns `XDP_PASS` and does nothing else: the benchmark floor, and the program tests
/// attach to the peer of a veth so that native-mode `XDP_TX` gets delivered.
#[xdp]
pub fn xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[inline(always)]
fn process(ctx: &XdpContext) -> Verdict {
    let l2 = match parse::ethernet(ctx) {
        Ok(l2) => l2,
        Err(reason) => return Verdict::pass(reason),
    };
    match l2.kind {
        EtherKind::Arp => arp::handle(ctx, &l2),
        EtherKind::Ipv4 => forward::handle(ctx, &l2),
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
