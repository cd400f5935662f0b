//! The result of processing one frame: what XDP does with it, and why.

use aya_ebpf::bindings::xdp_action;
use vip_common::Reason;

/// An XDP action together with the reason it was chosen. The reason selects the per-CPU
/// counter the entry point increments.
#[derive(Clone, Copy)]
pub struct Verdict {
    pub action: u32,
    pub reason: Reason,
}

impl Verdict {
    #[inline(always)]
    pub const fn pass(reason: Reason) -> Self {
        Self { action: xdp_action::XDP_PASS, reason }
    }

    #[inline(always)]
    pub const fn drop(reason: Reason) -> Self {
        Self { action: xdp_action::XDP_DROP, reason }
    }

    #[inline(always)]
    pub const fn tx(reason: Reason) -> Self {
        Self { action: xdp_action::XDP_TX, reason }
    }
}
