//! The frame and its metadata, whichever hook runs the data plane: XDP (the fast path,
//! before the kernel allocates anything) or tcx ingress (`--attach tcx`, beside programs
//! such as Cilium's that own the interface's XDP hook). Every handler is written once,
//! against [`Packet`]; each entry point maps the [`crate::verdict::Verdict`] to its own
//! return codes.
//!
//! What differs between the hooks, and why:
//! - at tc ingress the kernel has already moved the outer VLAN tag out of the frame into
//!   `skb->vlan_tci` (`skb_vlan_untag()` in `__netif_receive_skb_core`), so the segment a
//!   frame arrived on comes partly from metadata ([`Packet::offloaded_vid`]); a frame
//!   sent back keeps that metadata and leaves on the same VLAN;
//! - moving the start of the frame (IPIP encapsulation, decapsulation) is written for
//!   XDP's `bpf_xdp_adjust_head` only: under tcx those paths fail cleanly
//!   ([`Packet::adjust_head`] refuses) and the agent refuses `--forward ipip` with
//!   `--attach tcx`; moving its end (the Neighbor Advertisement, the ICMP error we
//!   build) works at both, through `bpf_skb_change_tail` at tc.

use aya_ebpf::{
    helpers::{bpf_skb_change_tail, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::{TcContext, XdpContext},
    EbpfContext,
};

/// The frame as the handlers see it.
pub trait Packet: EbpfContext {
    /// Address of the first byte of the frame (its Ethernet header).
    fn data(&self) -> usize;
    /// Address one past the last byte of the frame's linear part.
    fn data_end(&self) -> usize;
    /// The interface the frame arrived on.
    fn ingress_ifindex(&self) -> u32;
    /// Whether the hook can read a VLAN tag the NIC or the kernel took out of the frame
    /// ([`Packet::offloaded_vid`]): tc can, XDP cannot. Where it cannot, an untagged
    /// frame may have been tagged on the wire.
    const SEES_OFFLOADED_TAG: bool;
    /// The VLAN ID the kernel already took out of the frame (tc), if any.
    fn offloaded_vid(&self) -> Option<u16>;
    /// What the frame stands for on the wire: packets and bytes. One frame at XDP; at tc
    /// a GRO skb holds several segments, of which the linear part is only the start.
    fn wire_size(&self) -> (u64, u64);
    /// Moves the start of the frame by `delta` bytes (negative: grow). Every packet
    /// pointer is invalid afterwards.
    fn adjust_head(&self, delta: i32) -> Result<(), ()>;
    /// Moves the end of the frame's linear part by `delta` bytes (negative: shrink). Every
    /// packet pointer is invalid afterwards.
    fn adjust_tail(&self, delta: i32) -> Result<(), ()>;
}

impl Packet for XdpContext {
    const SEES_OFFLOADED_TAG: bool = false;

    #[inline(always)]
    fn data(&self) -> usize {
        XdpContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        XdpContext::data_end(self)
    }

    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        XdpContext::ingress_ifindex(self) as u32
    }

    /// XDP sees the frame as it came off the wire: a tag the NIC stripped would need the
    /// rx-metadata kfunc of a device-bound program, which this program is not.
    #[inline(always)]
    fn offloaded_vid(&self) -> Option<u16> {
        None
    }

    #[inline(always)]
    fn wire_size(&self) -> (u64, u64) {
        (1, (XdpContext::data_end(self) - XdpContext::data(self)) as u64)
    }

    #[inline(always)]
    fn adjust_head(&self, delta: i32) -> Result<(), ()> {
        // SAFETY: the helper checks the new head lies within the frame's headroom.
        if unsafe { bpf_xdp_adjust_head(self.ctx, delta) } == 0 {
            Ok(())
        } else {
            Err(())
        }
    }

    #[inline(always)]
    fn adjust_tail(&self, delta: i32) -> Result<(), ()> {
        // SAFETY: the helper checks the new tail lies within the frame's buffer.
        if unsafe { bpf_xdp_adjust_tail(self.ctx, delta) } == 0 {
            Ok(())
        } else {
            Err(())
        }
    }
}

impl Packet for TcContext {
    const SEES_OFFLOADED_TAG: bool = true;

    #[inline(always)]
    fn data(&self) -> usize {
        TcContext::data(self)
    }

    #[inline(always)]
    fn data_end(&self) -> usize {
        TcContext::data_end(self)
    }

    #[inline(always)]
    fn ingress_ifindex(&self) -> u32 {
        // SAFETY: the context is the kernel's __sk_buff for this run.
        unsafe { (*self.skb.skb).ifindex }
    }

    #[inline(always)]
    fn offloaded_vid(&self) -> Option<u16> {
        // SAFETY: as above.
        let (present, tci) = unsafe { ((*self.skb.skb).vlan_present, (*self.skb.skb).vlan_tci) };
        (present != 0).then_some((tci & 0x0fff) as u16)
    }

    #[inline(always)]
    fn wire_size(&self) -> (u64, u64) {
        // SAFETY: the context is the kernel's __sk_buff for this run.
        let (len, segs) = unsafe { ((*self.skb.skb).len, (*self.skb.skb).gso_segs) };
        (u64::from(segs.max(1)), u64::from(len))
    }

    #[inline(always)]
    fn adjust_head(&self, _delta: i32) -> Result<(), ()> {
        Err(())
    }

    #[inline(always)]
    fn adjust_tail(&self, delta: i32) -> Result<(), ()> {
        // From the linear part, which is what the caller measured (the handlers resize
        // only frames they parsed whole): the skb's length may count more.
        let linear = core::hint::black_box(TcContext::data_end(self) - TcContext::data(self));
        let new_len = (linear as i64 + i64::from(delta)) as u32;
        // SAFETY: the helper checks the new length; it makes the skb writable and linear
        // up to its end first, and recomputes the data pointers.
        if unsafe { bpf_skb_change_tail(self.skb.skb, new_len, 0) } == 0 {
            Ok(())
        } else {
            Err(())
        }
    }
}
