//! The hand-over from `vip_xdp` to its tcx companion `vip_tcx_vlan` (`--vlan` at XDP).
//!
//! XDP cannot read a VLAN tag the NIC stripped into metadata. So a frame for a VIP on a
//! VLAN that arrives at XDP untagged is passed ([`Reason::UntaggedAtXdp`]) with a mark in
//! the metadata area in front of it (`bpf_xdp_adjust_meta`). The kernel carries that area
//! into the skb (`skb_metadata_set`), where the companion finds the mark and has the
//! frame decided by the tcx data plane with the tag from the skb. Every other frame XDP
//! decided itself: the companion hands it on at once, uncounted, so no frame is decided
//! twice.
//!
//! The companion must only read the frame: a tc program that writes packet data gets a
//! prologue from the verifier that first makes the skb writable, and un-cloning an skb
//! (the agent's own packet sockets clone every frame on a VLAN trunk) drops its metadata.
//! So it tail-calls `vip_tcx` (which writes) only after reading the mark, and leaves the
//! mark where it is: the skb keeps it only as long as nothing un-clones it.
//!
//! A driver that cannot carry metadata makes the adjustment fail. XDP then raises
//! [`HANDOFF_NO_META`] and the companion decides every frame whose tag is in the skb,
//! as it must to answer on the VLAN at all: frames XDP passed with their tag in the
//! frame are then decided at both hooks (and counted at both).
//!
//! Source: the metadata area, `bpf_xdp_adjust_meta` and `__sk_buff.data_meta`
//! (Documentation/bpf, "XDP RX metadata"; include/uapi/linux/bpf.h).

use aya_ebpf::{
    helpers::bpf_xdp_adjust_meta,
    programs::{TcContext, XdpContext},
};

use crate::maps::HANDOFF_NO_META;

/// The mark: 4 bytes right in front of the frame, host order. A value other projects'
/// programs would not mistake for their own ("vip!" in ASCII).
const MARK: u32 = 0x7669_7021;
/// The size of the mark, and of the metadata area XDP asks for.
const MARK_LEN: usize = 4;

/// Leaves the mark in front of the frame, for the companion to decide it. Every packet
/// pointer is invalid afterwards.
#[inline(always)]
pub fn mark(ctx: &XdpContext) {
    // SAFETY: the helper checks the room in front of the frame (and that the driver
    // supports metadata); it moves only the metadata pointer.
    if unsafe { bpf_xdp_adjust_meta(ctx.ctx, -(MARK_LEN as i32)) } != 0 {
        raise_no_meta();
        return;
    }
    let (meta, data) = (ctx.metadata(), ctx.data());
    if meta + MARK_LEN > data {
        return;
    }
    // SAFETY: the verifier-checked range [meta, meta + 4) lies in the metadata area; it
    // is 4-byte aligned (the kernel aligns the area's start).
    unsafe { *(meta as *mut u32) = MARK };
}

fn raise_no_meta() {
    if let Some(flag) = HANDOFF_NO_META.get_ptr_mut(0) {
        // SAFETY: an array element; a plain store of the same value races harmlessly, and
        // reading first keeps the cache line shared once it is set.
        unsafe {
            if *flag == 0 {
                *flag = 1;
            }
        }
    }
}

/// Whether XDP marked this frame for the companion (a read: see the module docs).
#[inline(always)]
pub fn marked(ctx: &TcContext) -> bool {
    // SAFETY: the context is the kernel's __sk_buff for this run.
    let (meta, data) = unsafe { ((*ctx.skb.skb).data_meta as usize, (*ctx.skb.skb).data as usize) };
    if meta + MARK_LEN > data {
        return false;
    }
    // SAFETY: the verifier-checked range [meta, meta + 4) lies in the skb's metadata.
    unsafe { *(meta as *const u32) == MARK }
}

/// Whether XDP found, on any CPU, that the driver carries no metadata (see the module
/// docs).
#[inline(always)]
pub fn no_meta() -> bool {
    HANDOFF_NO_META.get(0).is_some_and(|v| *v != 0)
}
