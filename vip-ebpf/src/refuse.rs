//! A leaving node's answer to the other nodes' VIP-path probes (`vip-agent`'s
//! `vipprobe`), IPv4 and IPv6: a TCP RST from VIP:port, built in place from the probe's
//! SYN. The prober
//! learns that this node refuses VIP traffic because it is leaving: it drains it, its
//! connections kept. Silence, once this node has left, then means it is gone: the prober
//! takes it down and its connections' next packets are reset by the backend they are
//! hashed to, instead of hanging until the clients time out.

use vip_common::{PROBE6_WINDOW, REFUSAL_WINDOW};

use crate::{csum, ctx::Packet, parse::ptr_at};

/// RST and ACK in the TCP flags byte (RFC 9293 §3.1).
const TCP_RST_ACK: u8 = 0x14;
/// SYN and ACK in the TCP flags byte.
const TCP_SYN_ACK: u8 = 0x12;
/// SYN alone.
const TCP_SYN: u8 = 0x02;
/// The length of a probe: IPv4 and TCP headers without options, no payload.
const PROBE_LEN: u8 = 40;

/// Turns the frame (Ethernet at the start, the IPv4 header at `l3_off`) into the RST
/// that answers it, if it is a probe: a SYN without ACK, IPv4 and TCP without options,
/// no payload. Returns whether it did; anything else is left as it is. The answer, as
/// a closed port's (RFC 9293 §3.10.7.1): from the probed VIP:port to the prober,
/// `<SEQ=0><ACK=SEG.SEQ+1><CTL=RST,ACK>`, MACs swapped, but with the window
/// [`REFUSAL_WINDOW`] (a closed port's is 0); the IPv4 checksum is unchanged
/// (swapping the addresses keeps its sum), the TCP checksum is computed anew.
#[inline(always)]
pub fn reset(ctx: &impl Packet, l3_off: usize) -> bool {
    let (Some(macs), Some(p)) = (ptr_at::<[u8; 12]>(ctx, 0), ptr_at::<[u8; PROBE_LEN as usize]>(ctx, l3_off)) else {
        return false;
    };
    // SAFETY: both bounds-checked by ptr_at; byte arrays, so any alignment will do.
    let (macs, p) = unsafe { (&mut *macs, &mut *p) };
    let (ipv4_no_options, tcp_no_options) = (p[0] == 0x45, p[32] >> 4 == 5);
    if !ipv4_no_options || p[2] != 0 || p[3] != PROBE_LEN || p[9] != 6 || !tcp_no_options {
        return false;
    }
    if p[33] & TCP_SYN_ACK != TCP_SYN {
        return false;
    }
    // The IPv4 checksum is unchanged: swapping the addresses keeps its sum.
    answer_in_place(macs, p, 12, 4, 20);
    true
}

/// The length of an IPv6 probe: the IPv6 header and a TCP header without options, no
/// payload.
const PROBE6_LEN: usize = 60;

/// [`reset`] for an IPv6 probe (the IPv6 header at `l3_off`): a SYN without ACK, no
/// extension header, TCP without options, no payload (payload length 20), window
/// [`PROBE6_WINDOW`]. What tells it from a client's SYN the leader sent here by DSR (also
/// from a peer's MAC) is that window and shape. The answer, as [`reset`]'s:
/// addresses and ports swapped, `<SEQ=0><ACK=SEG.SEQ+1><CTL=RST,ACK>`, window
/// [`REFUSAL_WINDOW`], the TCP checksum computed anew over RFC 8200 §8.1's
/// pseudo-header; the hop limit as the probe's.
#[inline(always)]
pub fn reset6(ctx: &impl Packet, l3_off: usize) -> bool {
    let (Some(macs), Some(p)) = (ptr_at::<[u8; 12]>(ctx, 0), ptr_at::<[u8; PROBE6_LEN]>(ctx, l3_off)) else {
        return false;
    };
    // SAFETY: both bounds-checked by ptr_at; byte arrays, so any alignment will do.
    let (macs, p) = unsafe { (&mut *macs, &mut *p) };
    let tcp_no_options = p[52] >> 4 == 5;
    if p[4] != 0 || p[5] != 20 || p[6] != 6 || !tcp_no_options || p[53] & TCP_SYN_ACK != TCP_SYN {
        return false;
    }
    if u16::from_be_bytes([p[54], p[55]]) != PROBE6_WINDOW {
        return false;
    }
    answer_in_place(macs, p, 8, 16, 40);
    true
}

/// Turns a probe (`p`: its IP header and 20-byte TCP header, the two addresses of
/// `addr_len` bytes each at `addrs`, TCP at `tcp`; `macs`: the frame's two MACs) into
/// the RST that answers it, [`reset`]'s and [`reset6`]'s: MACs, addresses and ports
/// swapped, `<SEQ=0><ACK=SEG.SEQ+1><CTL=RST,ACK>`, window [`REFUSAL_WINDOW`] (what marks
/// the refusal as ours), urgent pointer zero, the TCP checksum over the pseudo-header
/// (the addresses, the TCP length 20 and protocol 6: RFC 9293 §3.1, RFC 8200 §8.1).
/// Called with constant offsets, so every index is checked at compile time.
#[inline(always)]
fn answer_in_place<const N: usize>(macs: &mut [u8; 12], p: &mut [u8; N], addrs: usize, addr_len: usize, tcp: usize) {
    for i in 0..6 {
        macs.swap(i, i + 6);
    }
    for i in 0..addr_len {
        p.swap(addrs + i, addrs + addr_len + i);
    }
    for i in 0..2 {
        p.swap(tcp + i, tcp + 2 + i);
    }
    let seq = tcp + 4;
    let ack = u32::from_be_bytes([p[seq], p[seq + 1], p[seq + 2], p[seq + 3]]).wrapping_add(1).to_be_bytes();
    for i in 0..4 {
        p[seq + i] = 0;
        p[seq + 4 + i] = ack[i];
    }
    p[tcp + 13] = TCP_RST_ACK;
    let window = REFUSAL_WINDOW.to_be_bytes();
    p[tcp + 14] = window[0];
    p[tcp + 15] = window[1];
    for i in 16..20 {
        p[tcp + i] = 0;
    }
    let sum = csum::sum16(&p[addrs..addrs + 2 * addr_len]) + 6 + 20 + csum::sum16(&p[tcp..tcp + 20]);
    let check = csum::fold(sum).to_be_bytes();
    p[tcp + 16] = check[0];
    p[tcp + 17] = check[1];
}
