//! Bounds-checked access to the frame and the L2 parser.
//!
//! Every read of the packet goes through [`ptr_at`], which proves to the verifier (and
//! to us) that the whole header lies inside `[data, data_end)`.

use core::mem;

use network_types::{eth::EthHdr, vlan::VlanHdr};
use vip_common::{segment_of, Reason};

use crate::ctx::Packet;

/// EtherType of ARP, network order on the wire.
pub const ETH_P_ARP: u16 = 0x0806;
/// EtherType of IPv4.
pub const ETH_P_IP: u16 = 0x0800;
/// EtherType of IPv6.
pub const ETH_P_IPV6: u16 = 0x86DD;
/// 802.1Q VLAN tag.
const ETH_P_8021Q: u16 = 0x8100;
/// 802.1ad service tag (QinQ outer tag).
const ETH_P_8021AD: u16 = 0x88A8;
/// How many VLAN tags we look through. Two covers QinQ; a frame with more is passed to
/// the kernel untouched rather than parsed in a loop the verifier would have to unroll.
const MAX_VLAN_TAGS: usize = 2;

/// A MAC address as a number: its 6 bytes, in memory order, in the low 48 bits. Read
/// with three 2-byte loads: every MAC the program handles (in a frame's Ethernet header,
/// in an ARP body after it, in a map value) is at least 2-byte aligned, and byte-wise
/// copies and compares of `[u8; 6]` would each cost a call into a byte loop.
///
/// # Safety
/// `p` points to 6 readable bytes, 2-byte aligned.
#[inline(always)]
pub unsafe fn load_mac(p: *const [u8; 6]) -> u64 {
    let w = p as *const u16;
    u64::from(*w) | u64::from(*w.add(1)) << 16 | u64::from(*w.add(2)) << 32
}

/// Writes a MAC from [`load_mac`]'s form.
///
/// # Safety
/// `p` points to 6 writable bytes, 2-byte aligned.
#[inline(always)]
pub unsafe fn store_mac(p: *mut [u8; 6], mac: u64) {
    let w = p as *mut u16;
    *w = mac as u16;
    *w.add(1) = (mac >> 16) as u16;
    *w.add(2) = (mac >> 32) as u16;
}

/// An IPv4 address read with two 2-byte loads (headers are 2-byte aligned).
///
/// # Safety
/// `p` points to 4 readable bytes, 2-byte aligned.
#[inline(always)]
pub unsafe fn load_ipv4(p: *const [u8; 4]) -> [u8; 4] {
    load_ipv4_word(p).to_le_bytes()
}

/// An IPv4 address as the little-endian word of its bytes (wire order in memory), read
/// with two 2-byte loads: the form [`vip_common::FlowKey::words`] is built from.
///
/// # Safety
/// As [`load_ipv4`].
#[inline(always)]
pub unsafe fn load_ipv4_word(p: *const [u8; 4]) -> u32 {
    let w = p as *const u16;
    u32::from(u16::from_le(*w)) | u32::from(u16::from_le(*w.add(1))) << 16
}

/// An IPv6 address as the two little-endian 8-byte words of its bytes (`vip_common::
/// words16`), read with eight 2-byte loads (headers are 2-byte aligned).
///
/// # Safety
/// `p` points to 16 readable bytes, 2-byte aligned.
#[inline(always)]
pub unsafe fn load_ipv6_words(p: *const [u8; 16]) -> [u64; 2] {
    let w = p as *const u16;
    let word = |i: usize| {
        u64::from(u16::from_le(*w.add(i)))
            | u64::from(u16::from_le(*w.add(i + 1))) << 16
            | u64::from(u16::from_le(*w.add(i + 2))) << 32
            | u64::from(u16::from_le(*w.add(i + 3))) << 48
    };
    [word(0), word(4)]
}

/// A 2-byte field as the little-endian word of its bytes (a port, wire order in memory).
///
/// # Safety
/// `p` points to 2 readable bytes, 2-byte aligned.
#[inline(always)]
pub unsafe fn load_u16_word(p: *const [u8; 2]) -> u16 {
    u16::from_le(*(p as *const u16))
}

/// Whether `dst` is a group address (broadcast or multicast: the I/G bit of the first
/// octet, IEEE 802-2014 §8.2).
#[inline(always)]
pub fn is_group(dst: u64) -> bool {
    dst & 1 != 0
}

/// Returns a pointer to a `T` at `offset` bytes into the frame, or `None` if any byte of
/// it lies past the end of the frame.
#[inline(always)]
pub fn ptr_at<T>(ctx: &impl Packet, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// What follows the Ethernet (and VLAN) headers.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum EtherKind {
    Arp,
    Ipv4,
    Ipv6,
    Other,
}

/// The parsed L2 header: where the network header starts and what it is.
pub struct L2 {
    /// The Ethernet header at the start of the frame, for handlers that rewrite MACs.
    pub eth: *mut EthHdr,
    /// Offset of the L3 header (after any VLAN tags).
    pub l3_off: usize,
    /// Number of VLAN tags in the frame between the Ethernet header and L3 (0..=2).
    pub tags: usize,
    /// The segment the frame arrived on (`vip_common::segment_of`), counting a tag the
    /// kernel moved into metadata ([`Packet::offloaded_vid`]): 0 untagged.
    pub segment: u16,
    pub kind: EtherKind,
}

impl L2 {
    /// Why a frame for a VIP on segment `vip_segment` is not ours, when this frame's
    /// segment differs: [`Reason::OtherSegment`], or, at a hook that cannot see a tag the
    /// NIC stripped (XDP) and for an untagged frame and a VIP on a VLAN,
    /// [`Reason::UntaggedAtXdp`] (the frame may belong to the VIP's VLAN after all:
    /// `vip_tcx_vlan` decides it with the tag from the skb).
    #[inline(always)]
    pub fn other_segment<P: Packet>(&self, _ctx: &P, vip_segment: u16) -> Reason {
        if !P::SEES_OFFLOADED_TAG && self.segment == 0 && vip_segment != 0 {
            Reason::UntaggedAtXdp
        } else {
            Reason::OtherSegment
        }
    }
}

/// What an EtherType (host order) carries.
#[inline(always)]
fn ether_kind(proto: u16) -> EtherKind {
    match proto {
        ETH_P_ARP => EtherKind::Arp,
        ETH_P_IP => EtherKind::Ipv4,
        ETH_P_IPV6 => EtherKind::Ipv6,
        _ => EtherKind::Other,
    }
}

/// Parses the Ethernet header and up to [`MAX_VLAN_TAGS`] VLAN tags.
#[inline(always)]
pub fn ethernet(ctx: &impl Packet) -> Result<L2, Reason> {
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(Reason::EthMalformed)?;
    // SAFETY: ptr_at checked the header is inside the frame.
    let mut proto = u16::from_be(unsafe { (*eth).ether_type });
    // An untagged frame, the common case, skips the tag loop and its bookkeeping.
    let kind = ether_kind(proto);
    if kind != EtherKind::Other {
        let segment = match ctx.offloaded_vid() {
            Some(vid) => segment_of(1, vid),
            None => 0,
        };
        return Ok(L2 { eth, l3_off: EthHdr::LEN, tags: 0, segment, kind });
    }
    let mut off = EthHdr::LEN;
    let mut tags = 0;
    let mut outer_vid = 0;
    for _ in 0..MAX_VLAN_TAGS {
        if proto != ETH_P_8021Q && proto != ETH_P_8021AD {
            break;
        }
        let vlan: *const VlanHdr = ptr_at(ctx, off).ok_or(Reason::EthMalformed)?;
        // SAFETY: as above.
        let (tci, next) = unsafe { ((*vlan).tci, (*vlan).ether_type) };
        if tags == 0 {
            outer_vid = u16::from_be_bytes(tci);
        }
        proto = u16::from_be(next);
        off += VlanHdr::LEN;
        tags += 1;
    }
    let kind = ether_kind(proto);
    // A tag the kernel took out of the frame (tc) was the outermost one.
    let segment = match ctx.offloaded_vid() {
        Some(vid) => segment_of(tags + 1, vid),
        None => segment_of(tags, outer_vid),
    };
    Ok(L2 { eth, l3_off: off, tags, segment, kind })
}
