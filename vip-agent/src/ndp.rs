//! Neighbor Discovery on the wire, as the agent speaks it for IPv6 VIPs (RFC 4861): the
//! unsolicited Neighbor Advertisement when this node starts answering, the Duplicate
//! Address Detection probe before it claims one (RFC 4862 §5.4), the watch for other
//! hosts advertising a VIP this node leads, and the solicited-node group membership that
//! makes the NIC (and an MLD-snooping switch) deliver the solicitations at all.
//!
//! The IPv4 twin is [`crate::arp`]; the data plane's responder is `vip-ebpf/src/ndp.rs`.
//! Frames are built as untagged Ethernet; with `--vlan` they are sent tagged
//! ([`crate::rawsock::tagged`]), and read untagged, the kernel having moved the tag out.

use std::{
    future::Future,
    net::{Ipv6Addr, UdpSocket},
    time::Duration,
};

use tokio::sync::mpsc;

use crate::{
    arp::ProbeConflict,
    netdev,
    rawsock::RawSocket,
    rawsock::{cbpf, insn, tagged},
};

pub const ETH_P_IPV6: u16 = 0x86DD;
// An unsolicited advertisement sets Override (RFC 4861 §4.4), so neighbours replace the
// MAC they have cached for the VIP; Solicited and Router stay clear.
use vip_common::nd::{
    HOP_LIMIT as ND_HOP_LIMIT, IPPROTO_ICMPV6, NA_FLAG_OVERRIDE, NEIGHBOR_ADVERT as ND_NEIGHBOR_ADVERT,
    NEIGHBOR_SOLICIT as ND_NEIGHBOR_SOLICIT, OPT_TARGET_LL as ND_OPT_TARGET_LL,
};
/// Offsets in an untagged frame: IPv6 header, its next-header field, the ICMPv6 message.
const IP6: usize = 14;
const ICMP6: usize = IP6 + 40;
/// Length of an advertisement with its target link-layer option, and of a probe.
pub const NA_FRAME_LEN: usize = ICMP6 + 32;
pub const DAD_FRAME_LEN: usize = ICMP6 + 24;

/// All-nodes (ff02::1), where unsolicited advertisements go (RFC 4861 §7.2.6).
pub const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);

/// The solicited-node multicast group of `addr` (RFC 4291 §2.7.1): ff02::1:ff00:0/104
/// and the address's low 24 bits. Solicitations for the VIP are sent there.
pub fn solicited_node(addr: Ipv6Addr) -> Ipv6Addr {
    let o = addr.octets();
    Ipv6Addr::from([0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, o[13], o[14], o[15]])
}

/// The Ethernet group of an IPv6 multicast address (RFC 2464 §7: 33:33 and its low 32
/// bits).
pub fn multicast_mac(group: Ipv6Addr) -> [u8; 6] {
    let o = group.octets();
    [0x33, 0x33, o[12], o[13], o[14], o[15]]
}

/// The ICMPv6 checksum of `message` (its checksum field zero) from `src` to `dst`: the
/// Internet checksum over the pseudo-header (RFC 8200 §8.1) and the message.
// Twelve lines of RFC 1071 arithmetic; no crate we already depend on exposes it.
pub fn icmpv6_checksum(src: Ipv6Addr, dst: Ipv6Addr, message: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut add = |bytes: &[u8]| {
        for pair in bytes.chunks(2) {
            sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
        }
    };
    add(&src.octets());
    add(&dst.octets());
    add(&(message.len() as u32).to_be_bytes());
    add(&[0, 0, 0, IPPROTO_ICMPV6]);
    add(message);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An ICMPv6 message from `src` to `dst` in an untagged Ethernet frame from `mac` to
/// `dst_mac`, hop limit 255, checksum filled in.
fn frame(dst_mac: [u8; 6], mac: [u8; 6], src: Ipv6Addr, dst: Ipv6Addr, message: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(ICMP6 + message.len());
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ETH_P_IPV6.to_be_bytes());
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&(message.len() as u16).to_be_bytes());
    f.extend_from_slice(&[IPPROTO_ICMPV6, ND_HOP_LIMIT]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(message);
    let sum = icmpv6_checksum(src, dst, message);
    f[ICMP6 + 2..ICMP6 + 4].copy_from_slice(&sum.to_be_bytes());
    f
}

/// The unsolicited advertisement of `vip` at `mac` (RFC 4861 §7.2.6): to all-nodes,
/// Override set, with the target link-layer option.
pub fn unsolicited_na(mac: [u8; 6], vip: Ipv6Addr) -> Vec<u8> {
    let mut m = vec![ND_NEIGHBOR_ADVERT, 0, 0, 0, NA_FLAG_OVERRIDE, 0, 0, 0];
    m.extend_from_slice(&vip.octets());
    m.extend_from_slice(&[ND_OPT_TARGET_LL, 1]);
    m.extend_from_slice(&mac);
    frame(multicast_mac(ALL_NODES), mac, vip, ALL_NODES, &m)
}

/// The Duplicate Address Detection probe for `vip` from `mac` (RFC 4862 §5.4.2): a
/// solicitation from `::` to the VIP's solicited-node group, without a source
/// link-layer option.
pub fn dad_probe(mac: [u8; 6], vip: Ipv6Addr) -> Vec<u8> {
    let group = solicited_node(vip);
    let mut m = vec![ND_NEIGHBOR_SOLICIT, 0, 0, 0, 0, 0, 0, 0];
    m.extend_from_slice(&vip.octets());
    frame(multicast_mac(group), mac, Ipv6Addr::UNSPECIFIED, group, &m)
}

/// The ICMPv6 type, target and Ethernet source of an untagged ND frame with hop limit
/// 255, if `f` is one.
fn nd_message(f: &[u8]) -> Option<(u8, Ipv6Addr, [u8; 6])> {
    if f.len() < ICMP6 + 24 || f[12..14] != ETH_P_IPV6.to_be_bytes() || f[IP6 + 6] != IPPROTO_ICMPV6 {
        return None;
    }
    if f[IP6 + 7] != ND_HOP_LIMIT || f[ICMP6 + 1] != 0 {
        return None;
    }
    let target: [u8; 16] = f[ICMP6 + 8..ICMP6 + 24].try_into().ok()?;
    Some((f[ICMP6], Ipv6Addr::from(target), f[6..12].try_into().ok()?))
}

/// A host other than `mine` advertising one of `vips` (a Neighbor Advertisement whose
/// target is a VIP). Returns the VIP and the advertised MAC (its target link-layer
/// option, else the frame's source).
pub fn foreign_advert(f: &[u8], vips: &[Ipv6Addr], mine: [u8; 6]) -> Option<(Ipv6Addr, [u8; 6])> {
    let (ty, target, src) = nd_message(f)?;
    if ty != ND_NEIGHBOR_ADVERT || src == mine || !vips.contains(&target) {
        return None;
    }
    let tlla = match f.get(ICMP6 + 24..ICMP6 + 32) {
        Some(o) if o[0] == ND_OPT_TARGET_LL && o[1] == 1 => o[2..8].try_into().ok(),
        _ => None,
    };
    let mac = tlla.unwrap_or(src);
    (mac != mine).then_some((target, mac))
}

/// Another host's DAD probe for one of `vips` (a solicitation from `::`): it is about to
/// claim it too.
pub fn foreign_probe(f: &[u8], vips: &[Ipv6Addr], mine: [u8; 6]) -> Option<(Ipv6Addr, [u8; 6])> {
    let (ty, target, src) = nd_message(f)?;
    let unspecified = f[IP6 + 8..IP6 + 24] == [0; 16];
    (ty == ND_NEIGHBOR_SOLICIT && unspecified && src != mine && vips.contains(&target)).then_some((target, src))
}

/// The socket filter of every ND socket: untagged IPv6, ICMPv6, type NS or NA. Without
/// it the socket would copy every IPv6 frame of the interface (the apiserver's traffic
/// included); the parsers above check the rest.
pub fn nd_filter() -> [libc::sock_filter; 9] {
    use cbpf::*;
    [
        insn(LD | H | ABS, 0, 0, 12),                              // 0: EtherType
        insn(JMP | JEQ | K, 0, 6, u32::from(ETH_P_IPV6)),          // 1: else drop (8)
        insn(LD | B | ABS, 0, 0, (IP6 + 6) as u32),                // 2: next header
        insn(JMP | JEQ | K, 0, 4, u32::from(IPPROTO_ICMPV6)),      // 3: else drop (8)
        insn(LD | B | ABS, 0, 0, ICMP6 as u32),                    // 4: ICMPv6 type
        insn(JMP | JEQ | K, 1, 0, u32::from(ND_NEIGHBOR_SOLICIT)), // 5: NS: accept (7)
        insn(JMP | JEQ | K, 0, 1, u32::from(ND_NEIGHBOR_ADVERT)),  // 6: NA: accept, else drop
        insn(RET | K, 0, 0, 0xffff),                               // 7: accept
        insn(RET | K, 0, 0, 0),                                    // 8: drop
    ]
}

/// Opens an ND socket on `ifindex` that receives the ND of VLAN `vlan` (0: untagged)
/// only ([`nd_filter`]).
pub fn nd_socket(ifindex: u32, vlan: u16, recv_timeout: Option<Duration>) -> std::io::Result<RawSocket> {
    RawSocket::open_for(ifindex, ETH_P_IPV6, vlan, &nd_filter(), recv_timeout)
}

/// Probes every VIP (RFC 4862 §5.4.2) from `interface` and listens for `wait`: `Err`
/// with the first VIP another host advertises, or probes for at the same time.
/// Blocking: run it on a blocking thread.
pub fn probe(
    interface: &str,
    vlan: u16,
    vips: &[Ipv6Addr],
    wait: Duration,
) -> std::io::Result<Result<(), ProbeConflict>> {
    let dev = netdev::lookup(interface).map_err(|e| std::io::Error::other(e.to_string()))?;
    let sock = nd_socket(dev.ifindex, vlan, Some(Duration::from_millis(10)))?;
    for &vip in vips {
        sock.send(&tagged(&dad_probe(dev.mac.0, vip), vlan))?;
    }
    let mine = dev.mac.0;
    crate::arp::await_conflict(&sock, wait, |frame| {
        let claim = foreign_advert(frame, vips, mine).map(|(vip, mac)| (vip, mac, false));
        claim.or_else(|| foreign_probe(frame, vips, mine).map(|(vip, mac)| (vip, mac, true)))
    })
}

/// Watches `interface` for other hosts advertising one of `vips` and sends each claim
/// (VIP, MAC) on `tx`, until the receiver is dropped. Advertisements pass the data
/// plane untouched; solicitations it answers or drops never get here.
pub fn watch_claims(
    interface: String,
    vlan: u16,
    vips: Vec<Ipv6Addr>,
    tx: mpsc::Sender<(std::net::IpAddr, [u8; 6])>,
) -> std::io::Result<impl Future<Output = ()>> {
    let dev = netdev::lookup(&interface).map_err(|e| std::io::Error::other(e.to_string()))?;
    let sock = nd_socket(dev.ifindex, vlan, None)?;
    let mac = dev.mac.0;
    let parse = move |f: &[u8]| foreign_advert(f, &vips, mac).map(|(vip, mac)| (vip.into(), mac));
    crate::rawsock::watch(sock, interface, "Neighbor Discovery", parse, tx)
}

/// Membership of the VIPs' solicited-node groups on one interface, held while the value
/// lives (the kernel leaves a group when the last socket in it closes).
///
/// Solicitations for the VIP go to its solicited-node group, and a NIC delivers only
/// the multicast groups the host joined (an MLD-snooping switch forwards only those
/// a host reported). The kernel joins the group of every address on an interface, but
/// the VIP is on `lo`, so the agent joins it on the interface itself. Every node joins,
/// the followers too: a new leader then answers its first solicitation at once, with no
/// MLD report to wait for.
pub struct SolicitedNodeGroups {
    _socket: UdpSocket,
    /// The interface the groups are joined on.
    pub ifindex: u32,
    pub groups: Vec<Ipv6Addr>,
}

impl SolicitedNodeGroups {
    /// Joins the solicited-node group of each of `vips` on interface `ifindex`.
    pub fn join(ifindex: u32, vips: &[Ipv6Addr]) -> std::io::Result<Self> {
        let socket = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0))?;
        let mut groups: Vec<Ipv6Addr> = vips.iter().map(|&v| solicited_node(v)).collect();
        groups.sort();
        groups.dedup();
        for g in &groups {
            socket.join_multicast_v6(g, ifindex)?;
        }
        Ok(Self { _socket: socket, ifindex, groups })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rawsock::tests::run_cbpf;

    const MAC: [u8; 6] = [2, 0, 0, 0, 0, 9];
    const OTHER: [u8; 6] = [2, 0, 0, 0, 0, 0x66];
    const VIP: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0x12, 0x3456);

    #[test]
    fn the_solicited_node_group_keeps_the_low_24_bits() {
        assert_eq!(solicited_node(VIP), "ff02::1:ff12:3456".parse::<Ipv6Addr>().unwrap());
        assert_eq!(multicast_mac(solicited_node(VIP)), [0x33, 0x33, 0xff, 0x12, 0x34, 0x56]);
        assert_eq!(multicast_mac(ALL_NODES), [0x33, 0x33, 0, 0, 0, 1]);
    }

    /// RFC 1071's property: a message with its checksum in place checks to zero. And one
    /// vector from an independent implementation: scapy 2.5.0's checksum of the NA
    /// fe80::1 → ff02::1 (O set) for fe80::1 at 02:00:00:00:00:01 is 0x579b.
    #[test]
    fn the_icmpv6_checksum_verifies_and_matches_scapys() {
        let f = unsolicited_na(MAC, VIP);
        let (src, dst) = (VIP, ALL_NODES);
        assert_eq!(icmpv6_checksum(src, dst, &f[ICMP6..]), 0, "a filled-in checksum checks to zero");
        let ll: Ipv6Addr = "fe80::1".parse().unwrap();
        let mut m = vec![ND_NEIGHBOR_ADVERT, 0, 0, 0, NA_FLAG_OVERRIDE, 0, 0, 0];
        m.extend_from_slice(&ll.octets());
        m.extend_from_slice(&[2, 1, 2, 0, 0, 0, 0, 1]);
        assert_eq!(icmpv6_checksum(ll, ALL_NODES, &m), 0x579b);
    }

    #[test]
    fn an_unsolicited_advertisement_goes_to_all_nodes_with_override_and_our_mac() {
        let f = unsolicited_na(MAC, VIP);
        assert_eq!(f.len(), NA_FRAME_LEN);
        assert_eq!(f[0..6], [0x33, 0x33, 0, 0, 0, 1]);
        assert_eq!(f[6..12], MAC);
        assert_eq!(f[12..14], [0x86, 0xdd]);
        assert_eq!(f[IP6 + 4..IP6 + 8], [0, 32, 58, 255], "payload length, ICMPv6, hop limit 255");
        assert_eq!(f[IP6 + 8..IP6 + 24], VIP.octets(), "from the VIP");
        assert_eq!(f[IP6 + 24..IP6 + 40], ALL_NODES.octets());
        assert_eq!(f[ICMP6..ICMP6 + 2], [136, 0]);
        assert_eq!(f[ICMP6 + 4], 0x20, "Override only: not solicited, not a router");
        assert_eq!(f[ICMP6 + 8..ICMP6 + 24], VIP.octets(), "target");
        assert_eq!(f[ICMP6 + 24..], [2, 1, 2, 0, 0, 0, 0, 9], "target link-layer option");
    }

    #[test]
    fn a_dad_probe_comes_from_the_unspecified_address_to_the_solicited_node_group() {
        let f = dad_probe(MAC, VIP);
        assert_eq!(f.len(), DAD_FRAME_LEN);
        assert_eq!(f[0..6], [0x33, 0x33, 0xff, 0x12, 0x34, 0x56]);
        assert_eq!(f[IP6 + 8..IP6 + 24], [0; 16]);
        assert_eq!(f[IP6 + 24..IP6 + 40], solicited_node(VIP).octets());
        assert_eq!(f[ICMP6], 135);
        assert_eq!(icmpv6_checksum(Ipv6Addr::UNSPECIFIED, solicited_node(VIP), &f[ICMP6..]), 0);
    }

    #[test]
    fn only_other_hosts_advertising_a_vip_are_claims() {
        let theirs = unsolicited_na(OTHER, VIP);
        assert_eq!(foreign_advert(&theirs, &[VIP], MAC), Some((VIP, OTHER)));
        assert_eq!(foreign_advert(&unsolicited_na(MAC, VIP), &[VIP], MAC), None, "our own");
        let other_vip: Ipv6Addr = "fd00::99".parse().unwrap();
        assert_eq!(foreign_advert(&theirs, &[other_vip], MAC), None, "another address");
        assert_eq!(foreign_advert(&dad_probe(OTHER, VIP), &[VIP], MAC), None, "a probe claims nothing");
        let mut hop = theirs.clone();
        hop[IP6 + 7] = 64;
        assert_eq!(foreign_advert(&hop, &[VIP], MAC), None, "not from the link (hop limit)");
        assert_eq!(foreign_advert(&theirs[..ICMP6 + 20], &[VIP], MAC), None, "truncated");
    }

    #[test]
    fn another_hosts_dad_probe_is_seen_and_ours_is_not() {
        assert_eq!(foreign_probe(&dad_probe(OTHER, VIP), &[VIP], MAC), Some((VIP, OTHER)));
        assert_eq!(foreign_probe(&dad_probe(MAC, VIP), &[VIP], MAC), None);
        assert_eq!(foreign_probe(&unsolicited_na(OTHER, VIP), &[VIP], MAC), None);
    }

    #[test]
    fn the_socket_filter_passes_solicitations_and_advertisements_only() {
        let prog = nd_filter();
        assert!(run_cbpf(&prog, &unsolicited_na(OTHER, VIP)) > 0, "NA");
        assert!(run_cbpf(&prog, &dad_probe(OTHER, VIP)) > 0, "NS");
        let mut echo = dad_probe(OTHER, VIP);
        echo[ICMP6] = 128;
        assert_eq!(run_cbpf(&prog, &echo), 0, "echo request");
        let mut tcp = dad_probe(OTHER, VIP);
        tcp[IP6 + 6] = 6;
        assert_eq!(run_cbpf(&prog, &tcp), 0, "TCP");
        let mut v4 = dad_probe(OTHER, VIP);
        v4[12..14].copy_from_slice(&[8, 0]);
        assert_eq!(run_cbpf(&prog, &v4), 0, "IPv4");
        assert_eq!(run_cbpf(&prog, &dad_probe(OTHER, VIP)[..ICMP6]), 0, "truncated before the type");
    }
}
