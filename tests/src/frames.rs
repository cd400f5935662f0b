//! Frame builders, and a reference model of the ARP responder written from the RFC
//! rather than from the XDP code, used as the oracle of the random-frame test.

use std::net::{Ipv4Addr, Ipv6Addr};

pub type Mac = [u8; 6];

pub const BROADCAST: Mac = [0xff; 6];
pub const ETH_P_ARP: u16 = 0x0806;
pub const ETH_P_IPV4: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_P_8021AD: u16 = 0x88A8;
pub const ARPOP_REQUEST: u16 = 1;
pub const ARPOP_REPLY: u16 = 2;

/// The fields of an Ethernet/IPv4 ARP packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arp {
    pub htype: u16,
    pub ptype: u16,
    pub hlen: u8,
    pub plen: u8,
    pub oper: u16,
    pub sha: Mac,
    pub spa: Ipv4Addr,
    pub tha: Mac,
    pub tpa: Ipv4Addr,
}

impl Arp {
    /// "Who has `tpa`? Tell `spa`", as a host sends it.
    pub fn request(sha: Mac, spa: Ipv4Addr, tpa: Ipv4Addr) -> Self {
        Self { htype: 1, ptype: ETH_P_IPV4, hlen: 6, plen: 4, oper: ARPOP_REQUEST, sha, spa, tha: [0; 6], tpa }
    }

    /// "`spa` is at `sha`", addressed to `tha`/`tpa`.
    pub fn reply(sha: Mac, spa: Ipv4Addr, tha: Mac, tpa: Ipv4Addr) -> Self {
        Self { htype: 1, ptype: ETH_P_IPV4, hlen: 6, plen: 4, oper: ARPOP_REPLY, sha, spa, tha, tpa }
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(28);
        b.extend(self.htype.to_be_bytes());
        b.extend(self.ptype.to_be_bytes());
        b.extend([self.hlen, self.plen]);
        b.extend(self.oper.to_be_bytes());
        b.extend(self.sha);
        b.extend(self.spa.octets());
        b.extend(self.tha);
        b.extend(self.tpa.octets());
        b
    }
}

/// An Ethernet frame under construction.
#[derive(Clone, Debug)]
pub struct Frame {
    pub dst: Mac,
    pub src: Mac,
    /// VLAN tags, outermost first: (TPID, TCI).
    pub vlans: Vec<(u16, u16)>,
    pub ethertype: u16,
    pub payload: Vec<u8>,
}

impl Frame {
    pub fn new(dst: Mac, src: Mac, ethertype: u16, payload: Vec<u8>) -> Self {
        Self { dst, src, vlans: Vec::new(), ethertype, payload }
    }

    pub fn arp(dst: Mac, src: Mac, arp: &Arp) -> Self {
        Self::new(dst, src, ETH_P_ARP, arp.bytes())
    }

    pub fn vlan(mut self, tpid: u16, tci: u16) -> Self {
        self.vlans.push((tpid, tci));
        self
    }

    pub fn bytes(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(18 + self.payload.len());
        b.extend(self.dst);
        b.extend(self.src);
        for (tpid, tci) in &self.vlans {
            b.extend(tpid.to_be_bytes());
            b.extend(tci.to_be_bytes());
        }
        b.extend(self.ethertype.to_be_bytes());
        b.extend(&self.payload);
        b
    }

    /// The bytes padded with zeros to Ethernet's 60-byte minimum, as a NIC delivers a
    /// short frame.
    pub fn padded(&self) -> Vec<u8> {
        let mut b = self.bytes();
        if b.len() < 60 {
            b.resize(60, 0);
        }
        b
    }
}

/// An IPv4 header under construction.
#[derive(Clone, Debug)]
pub struct Ip4 {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    pub tos: u8,
    pub id: u16,
    /// Flags and fragment offset, host order (0x4000 = DF, 0x2000 = MF).
    pub frags: u16,
    pub ttl: u8,
    /// Options, a multiple of 4 bytes.
    pub options: Vec<u8>,
}

impl Ip4 {
    pub fn new(src: Ipv4Addr, dst: Ipv4Addr, proto: u8) -> Self {
        Self { src, dst, proto, tos: 0, id: 1, frags: 0x4000, ttl: 64, options: Vec::new() }
    }

    /// The header (with a correct checksum) followed by `payload`.
    pub fn packet(&self, payload: &[u8]) -> Vec<u8> {
        assert_eq!(self.options.len() % 4, 0, "IPv4 options come in 4-byte words");
        let hlen = 20 + self.options.len();
        let total = (hlen + payload.len()) as u16;
        let mut h = vec![0x40 | (hlen / 4) as u8, self.tos];
        h.extend(total.to_be_bytes());
        h.extend(self.id.to_be_bytes());
        h.extend(self.frags.to_be_bytes());
        h.extend([self.ttl, self.proto, 0, 0]);
        h.extend(self.src.octets());
        h.extend(self.dst.octets());
        h.extend(&self.options);
        let csum = inet_checksum(&h);
        h[10..12].copy_from_slice(&csum.to_be_bytes());
        h.extend(payload);
        h
    }
}

/// An IPv4 packet (20-byte header, DF, TTL 64, id 1) with a correct checksum.
pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8]) -> Vec<u8> {
    Ip4::new(src, dst, proto).packet(payload)
}

/// `inner` (an IPv4 packet) inside the outer header the data plane builds for IPIP:
/// DF, TTL 64, id 0, the inner TOS, protocol 4.
pub fn ipip(outer_src: Ipv4Addr, outer_dst: Ipv4Addr, inner: &[u8]) -> Vec<u8> {
    Ip4 { tos: inner[1], id: 0, ..Ip4::new(outer_src, outer_dst, 4) }.packet(inner)
}

/// A minimal IPv6 header followed by `payload`.
pub fn ipv6(next_header: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0x60, 0, 0, 0];
    h.extend((payload.len() as u16).to_be_bytes());
    h.extend([next_header, 64]);
    h.extend([0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]);
    h.extend([0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2]);
    h.extend(payload);
    h
}

/// A 20-byte TCP header (checksum left zero: the data plane does not verify it).
pub fn tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut t = Vec::with_capacity(20);
    t.extend(sport.to_be_bytes());
    t.extend(dport.to_be_bytes());
    t.extend(1u32.to_be_bytes());
    t.extend(0u32.to_be_bytes());
    t.extend([0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    t
}

pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

/// The 5-tuple of an Ethernet frame carrying IPv4/TCP (after up to two VLAN tags), as
/// the data plane keys its connection table.
pub fn flow_of(frame: &[u8]) -> Option<vip_common::FlowKey> {
    let mut off = 12;
    loop {
        let et = u16::from_be_bytes(frame.get(off..off + 2)?.try_into().ok()?);
        if et == ETH_P_8021Q || et == ETH_P_8021AD {
            off += 4;
            continue;
        }
        if et != ETH_P_IPV4 {
            return None;
        }
        off += 2;
        break;
    }
    let ip = frame.get(off..off + 20)?;
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let tcp = frame.get(off + ihl..off + ihl + 4)?;
    Some(vip_common::FlowKey::new(
        ip[12..16].try_into().ok()?,
        ip[16..20].try_into().ok()?,
        [tcp[0], tcp[1]],
        [tcp[2], tcp[3]],
        ip[9],
    ))
}

/// Where the Maglev `table` sends `flow` with the flow hash seeded by `seed`
/// (`Config::hash_seed`; `Config::new` leaves it 0): what the data plane must pick on a
/// miss.
pub fn predict_seeded(table: &[u32], flow: &vip_common::FlowKey, seed: u32) -> u32 {
    table[(vip_common::flow_hash(flow, seed) % table.len() as u32) as usize]
}

/// [`predict_seeded`] with seed 0, what `Config::new` configures.
pub fn predict(table: &[u32], flow: &vip_common::FlowKey) -> u32 {
    predict_seeded(table, flow, 0)
}

/// The L2 headers of a frame as the models see them: the offset of L3, the EtherType
/// after at most two VLAN tags, and the segment (0 untagged or priority-tagged, the VID
/// of a single tag, `SEGMENT_NONE` for stacked tags). `None` if truncated.
fn l2_of(frame: &[u8]) -> Option<(usize, u16, u16)> {
    let mut off = 12;
    let mut tags = 0;
    let mut outer_vid = 0;
    loop {
        let et = u16::from_be_bytes(frame.get(off..off + 2)?.try_into().ok()?);
        if (et == ETH_P_8021Q || et == ETH_P_8021AD) && tags < 2 {
            if tags == 0 {
                outer_vid = u16::from_be_bytes(frame.get(off + 2..off + 4)?.try_into().ok()?) & 0x0fff;
            }
            off += 4;
            tags += 1;
            continue;
        }
        let segment = match tags {
            0 => 0,
            1 => outer_vid,
            _ => vip_common::SEGMENT_NONE,
        };
        return Some((off + 2, et, segment));
    }
}

/// Whether `mac` is a group (broadcast or multicast) address.
pub fn is_group(mac: &[u8]) -> bool {
    mac.first().is_some_and(|b| b & 1 != 0)
}

/// The Internet checksum (RFC 1071) of `data`.
pub fn inet_checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// What the node's data plane state says about one VIP, for the reference model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Leader,
    Follower,
}

/// The reference model's verdict for one frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expected {
    /// Send back out with exactly these bytes (an ARP reply, a forwarded frame).
    Tx(Vec<u8>),
    /// Drop (an ARP request for a VIP this node follows).
    Drop,
    /// Leave to the kernel, unchanged.
    Pass,
    /// Leave to the kernel as exactly these bytes (a decapsulated IPIP packet).
    PassAs(Vec<u8>),
}

/// The ARP responder as specified: for an Ethernet frame (with up to two 802.1Q/802.1ad
/// tags) carrying a complete Ethernet/IPv4 ARP *request* for a VIP, from a sender other
/// than the VIP itself (not gratuitous), on the VIP's segment (untagged here) and sent
/// to us (broadcast, multicast, or our MAC), the leader answers in place — to the
/// sender hardware address, as Linux does — and a follower drops. Everything else
/// passes unchanged.
pub fn arp_model(frame: &[u8], vips: &[(Ipv4Addr, Role)], node_mac: Mac) -> Expected {
    let Some((off, et, segment)) = l2_of(frame) else {
        return Expected::Pass;
    };
    if et != ETH_P_ARP {
        return Expected::Pass;
    }
    let Some(arp) = frame.get(off..off + 28) else {
        return Expected::Pass;
    };
    if arp[0..2] != [0, 1] || arp[2..4] != [8, 0] || arp[4] != 6 || arp[5] != 4 || arp[6..8] != [0, 1] {
        return Expected::Pass;
    }
    let sha: Mac = arp[8..14].try_into().expect("6 bytes");
    let spa = Ipv4Addr::new(arp[14], arp[15], arp[16], arp[17]);
    let tpa = Ipv4Addr::new(arp[24], arp[25], arp[26], arp[27]);
    let Some(&(_, role)) = vips.iter().find(|(v, _)| *v == tpa) else {
        return Expected::Pass;
    };
    if spa == tpa || segment != 0 || (!is_group(&frame[0..6]) && frame[0..6] != node_mac) {
        return Expected::Pass;
    }
    if role == Role::Follower {
        return Expected::Drop;
    }
    let mut out = frame.to_vec();
    out[0..6].copy_from_slice(&sha);
    out[6..12].copy_from_slice(&node_mac);
    let reply = Arp::reply(node_mac, tpa, sha, spa).bytes();
    out[off..off + 28].copy_from_slice(&reply);
    Expected::Tx(out)
}

/// What the forwarding model needs to know about the data plane's state.
pub struct ForwardState<'a> {
    /// Every VIP in the VIP map (led or not: forwarding does not depend on leadership),
    /// all on the untagged segment.
    pub vips: &'a [Ipv4Addr],
    /// This node: its MAC (the only destination it forwards, the source of what it
    /// sends) and address (the only outer destination it decapsulates).
    pub node_mac: Mac,
    pub node_ip: Ipv4Addr,
    /// The other load-balancing nodes, by MAC and by address.
    pub peer_macs: &'a [Mac],
    pub peer_ips: &'a [Ipv4Addr],
    /// The one DSR service: VIP, port, live Maglev table (backend ids).
    pub service: (Ipv4Addr, u16),
    pub table: &'a [u32],
    /// MAC of each backend id.
    pub mac_of: &'a dyn Fn(u32) -> Mac,
}

/// VIP forwarding as specified, for IPv4 frames (with up to two VLAN tags): IPIP from a
/// peer to this node carrying a TCP segment (first fragment, whole header) for the
/// service, on the VIP's segment, is decapsulated; a complete, unfragmented TCP segment
/// to the service, sent to our MAC on the VIP's segment by anyone but a peer, is sent by
/// DSR (our MAC as source) to the Maglev owner of its flow (with a fixed table, the
/// connection table pins every flow to exactly that owner, and a pin never applies to a
/// peer's frame); all else passes unchanged. Frames that are not IPv4 are left to
/// [`arp_model`].
pub fn forward_model(frame: &[u8], st: &ForwardState<'_>) -> Option<Expected> {
    let (off, et, segment) = l2_of(frame)?;
    if et != ETH_P_IPV4 {
        return None;
    }
    let Some(ip) = frame.get(off..off + 20) else {
        return Some(Expected::Pass);
    };
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    if ip[0] >> 4 != 4 || ihl < 20 {
        return Some(Expected::Pass);
    }
    let for_us = frame[0..6] == st.node_mac;
    let frags = |h: &[u8]| u16::from_be_bytes([h[6], h[7]]) & 0x3fff;
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    if ip[9] == 4 {
        let outer_src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
        let inner_off = off + ihl;
        let ours = (|| {
            if !for_us || dst != st.node_ip || frags(ip) != 0 || !st.peer_ips.contains(&outer_src) || segment != 0 {
                return None;
            }
            let inner = frame.get(inner_off..inner_off + 20)?;
            let inner_ihl = usize::from(inner[0] & 0x0f) * 4;
            if inner[0] >> 4 != 4 || inner_ihl < 20 || inner[9] != 6 || frags(inner) != 0 {
                return None;
            }
            let tcp = frame.get(inner_off + inner_ihl..inner_off + inner_ihl + 20)?;
            let inner_dst = Ipv4Addr::new(inner[16], inner[17], inner[18], inner[19]);
            ((inner_dst, u16::from_be_bytes([tcp[2], tcp[3]])) == st.service).then_some(())
        })();
        return Some(match ours {
            Some(()) => {
                let mut out = frame[..off].to_vec();
                out.extend(&frame[inner_off..]);
                Expected::PassAs(out)
            }
            None => Expected::Pass,
        });
    }
    if !st.vips.contains(&dst) || frags(ip) != 0 || !for_us || segment != 0 {
        return Some(Expected::Pass);
    }
    let src_mac: Mac = frame[6..12].try_into().ok()?;
    let dsr_to = |flow: &vip_common::FlowKey| {
        let mut out = frame.to_vec();
        out[0..6].copy_from_slice(&(st.mac_of)(predict(st.table, flow)));
        out[6..12].copy_from_slice(&st.node_mac);
        Expected::Tx(out)
    };
    match ip[9] {
        6 => {
            let Some(tcp) = frame.get(off + ihl..off + ihl + 20) else {
                return Some(Expected::Pass);
            };
            if (dst, u16::from_be_bytes([tcp[2], tcp[3]])) != st.service || st.peer_macs.contains(&src_mac) {
                return Some(Expected::Pass);
            }
            Some(dsr_to(&flow_of(frame)?))
        }
        1 => Some(icmp_error_model(frame, off + ihl, dst, src_mac, st, dsr_to)),
        _ => Some(Expected::Pass),
    }
}

/// ICMP to a VIP: a destination unreachable quoting the VIP service's own TCP segment to
/// a client (IPv4 header and at least the ports) goes by DSR to the flow's backend, the
/// Maglev owner of the reversed tuple; a quote too short to name a flow is dropped;
/// anything else (echo, other quotes, from a peer) goes to the local stack.
fn icmp_error_model(
    frame: &[u8],
    icmp_off: usize,
    vip: Ipv4Addr,
    src_mac: Mac,
    st: &ForwardState<'_>,
    dsr_to: impl Fn(&vip_common::FlowKey) -> Expected,
) -> Expected {
    let Some(icmp) = frame.get(icmp_off..icmp_off + 8) else { return Expected::Pass };
    if icmp[0] != 3 {
        return Expected::Pass;
    }
    let quote = icmp_off + 8;
    let Some(q) = frame.get(quote..quote + 20) else { return Expected::Drop };
    let q_ihl = usize::from(q[0] & 0x0f) * 4;
    let q_src = Ipv4Addr::new(q[12], q[13], q[14], q[15]);
    if q[0] >> 4 != 4 || q_ihl < 20 || q[9] != 6 || q_src != vip {
        return Expected::Pass;
    }
    let Some(ports) = frame.get(quote + q_ihl..quote + q_ihl + 4) else { return Expected::Drop };
    if (q_src, u16::from_be_bytes([ports[0], ports[1]])) != st.service || st.peer_macs.contains(&src_mac) {
        return Expected::Pass;
    }
    let flow = vip_common::FlowKey::new(
        [q[16], q[17], q[18], q[19]],
        vip.octets(),
        [ports[2], ports[3]],
        [ports[0], ports[1]],
        6,
    );
    dsr_to(&flow)
}

/// An ICMP destination unreachable (code `code`, next-hop MTU `mtu`) quoting `quote`,
/// with a correct checksum.
pub fn icmp_unreachable(code: u8, mtu: u16, quote: &[u8]) -> Vec<u8> {
    let mut m = vec![3, code, 0, 0, 0, 0];
    m.extend(mtu.to_be_bytes());
    m.extend(quote);
    let c = inet_checksum(&m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

// ---- IPv6 Neighbor Discovery (RFC 4861) --------------------------------------------------

/// ICMPv6 types of a Neighbor Solicitation and a Neighbor Advertisement.
pub const ND_NS: u8 = 135;
pub const ND_NA: u8 = 136;
/// All-nodes multicast, and its Ethernet group.
pub const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
pub const ALL_NODES_MAC: Mac = [0x33, 0x33, 0, 0, 0, 1];

/// The solicited-node group of `addr` (RFC 4291 §2.7.1) and its Ethernet group (RFC 2464
/// §7).
pub fn solicited_node(addr: Ipv6Addr) -> Ipv6Addr {
    let o = addr.octets();
    Ipv6Addr::from([0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, o[13], o[14], o[15]])
}

pub fn ipv6_multicast_mac(group: Ipv6Addr) -> Mac {
    let o = group.octets();
    [0x33, 0x33, o[12], o[13], o[14], o[15]]
}

/// An IPv6 packet from `src` to `dst` with hop limit `hop`, carrying `message` as ICMPv6
/// with its checksum computed over the pseudo-header (RFC 8200 §8.1) by
/// [`inet_checksum`].
pub fn icmpv6(src: Ipv6Addr, dst: Ipv6Addr, hop: u8, message: &[u8]) -> Vec<u8> {
    let mut pseudo = Vec::with_capacity(40 + message.len());
    pseudo.extend(src.octets());
    pseudo.extend(dst.octets());
    pseudo.extend((message.len() as u32).to_be_bytes());
    pseudo.extend([0, 0, 0, 58]);
    pseudo.extend(message);
    let sum = inet_checksum(&pseudo);
    let mut p = vec![0x60, 0, 0, 0];
    p.extend((message.len() as u16).to_be_bytes());
    p.extend([58, hop]);
    p.extend(src.octets());
    p.extend(dst.octets());
    p.extend(message);
    p[40 + 2..40 + 4].copy_from_slice(&sum.to_be_bytes());
    p
}

/// A Neighbor Solicitation message for `target`, with the given options (each a full
/// option: type, length in 8-byte units, value).
pub fn ns_message(target: Ipv6Addr, options: &[&[u8]]) -> Vec<u8> {
    let mut m = vec![ND_NS, 0, 0, 0, 0, 0, 0, 0];
    m.extend(target.octets());
    for o in options {
        m.extend(*o);
    }
    m
}

/// A source (type 1) or target (type 2) link-layer address option.
pub fn ll_option(kind: u8, mac: Mac) -> [u8; 8] {
    [kind, 1, mac[0], mac[1], mac[2], mac[3], mac[4], mac[5]]
}

/// A Neighbor Advertisement message for `target` at `mac`, with the Solicited and
/// Override flags as given (Router clear), and the target link-layer option.
pub fn na_message(target: Ipv6Addr, mac: Mac, solicited: bool) -> Vec<u8> {
    let flags = if solicited { 0x60 } else { 0x20 };
    let mut m = vec![ND_NA, 0, 0, 0, flags, 0, 0, 0];
    m.extend(target.octets());
    m.extend(ll_option(2, mac));
    m
}

/// Whether the ND options from `from` to `end` (or the end of the frame) hold a source
/// link-layer address option (type 1). Options are type, length in 8-byte units
/// (RFC 4861 §4.6); a zero length ends the walk.
fn has_source_ll_option(frame: &[u8], from: usize, end: usize) -> bool {
    let mut off = from;
    while off + 2 <= end {
        let Some(&[ty, len]) = frame.get(off..off + 2).map(|o| <&[u8; 2]>::try_from(o).expect("2 bytes")) else {
            return false;
        };
        if len == 0 {
            return false;
        }
        if ty == 1 {
            return true;
        }
        off += usize::from(len) * 8;
    }
    false
}

/// The Neighbor Discovery responder as specified (RFC 4861 §7.1.1, §7.2.4), for the
/// model tests: `None` unless the frame is IPv6 (after at most two tags). For a complete
/// version-6 header carrying ICMPv6 whose message is a solicitation (24 bytes present)
/// for one of `vips`, valid (hop limit 255, code 0, payload length ≥ 24; a DAD probe,
/// from `::`, sent to the target's solicited-node group and without a source link-layer
/// address option), on the untagged segment and sent to us (group or our
/// MAC): the leader answers in place — to the sender's MAC and address, Solicited and
/// Override set; a DAD probe to all-nodes, Override only — and a follower drops.
/// Everything else IPv6 passes unchanged.
pub fn ndp_model(frame: &[u8], vips: &[(Ipv6Addr, Role)], node_mac: Mac) -> Option<Expected> {
    let (off, et, segment) = l2_of(frame)?;
    if et != ETH_P_IPV6 {
        return None;
    }
    let pass = Some(Expected::Pass);
    let Some(ip) = frame.get(off..off + 40) else { return pass };
    if ip[0] >> 4 != 6 || ip[6] != 58 {
        return pass;
    }
    let Some(ns) = frame.get(off + 40..off + 64) else { return pass };
    if ns[0] != ND_NS {
        return pass;
    }
    let target = Ipv6Addr::from(<[u8; 16]>::try_from(&ns[8..24]).expect("16 bytes"));
    let Some(&(_, role)) = vips.iter().find(|(v, _)| *v == target) else { return pass };
    let payload_len = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
    let src = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[8..24]).expect("16 bytes"));
    let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[24..40]).expect("16 bytes"));
    let dad = src.is_unspecified();
    if ip[7] != 255 || ns[1] != 0 || payload_len < 24 {
        return pass;
    }
    if dad && (dst != solicited_node(target) || has_source_ll_option(frame, off + 64, off + 40 + payload_len)) {
        return pass;
    }
    if segment != 0 || (!is_group(&frame[0..6]) && frame[0..6] != node_mac) {
        return pass;
    }
    if role == Role::Follower {
        return Some(Expected::Drop);
    }
    let (to, to_mac) = if dad { (ALL_NODES, ALL_NODES_MAC) } else { (src, frame[6..12].try_into().expect("6 bytes")) };
    let mut out = frame[..off].to_vec();
    out[0..6].copy_from_slice(&to_mac);
    out[6..12].copy_from_slice(&node_mac);
    out.extend(icmpv6(target, to, 255, &na_message(target, node_mac, !dad)));
    Some(Expected::Tx(out))
}

/// IPv6 VIP forwarding as specified, for the model tests: `None` unless the frame is a
/// version-6 packet (after at most two tags) carrying TCP or an ICMPv6 Packet Too Big
/// (other ICMPv6 is [`ndp_model`]'s). `vips6` are every IPv6 VIP in the VIP map (the
/// first the led one, the service's; the others followed, without a service).
///
/// TCP: a complete TCP header to the service `(vips6[0], st.service.1)`, sent to our MAC
/// on the untagged segment by anyone but a peer, goes by DSR to the Maglev owner of its
/// flow (the flow hash over the folded tuple). Packet Too Big to a VIP, sent to us on
/// the segment: a quote shorter than the IPv6 header and the TCP ports is dropped; one
/// of the service's own segments (from the VIP and its port, TCP right after the
/// header), not from a peer, goes by DSR to the owner of the client's flow. Everything
/// else passes unchanged.
pub fn forward6_model(frame: &[u8], st: &ForwardState<'_>, vips6: &[Ipv6Addr]) -> Option<Expected> {
    let (off, et, segment) = l2_of(frame)?;
    let ip = frame.get(off..off + 40)?;
    if et != ETH_P_IPV6 || ip[0] >> 4 != 6 {
        return None;
    }
    let ptb = ip[6] == 58 && frame.get(off + 40) == Some(&2);
    if ip[6] != 6 && !ptb {
        return None;
    }
    let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[24..40]).expect("16 bytes"));
    let src_mac: Mac = frame[6..12].try_into().ok()?;
    if !vips6.contains(&dst) || frame[0..6] != st.node_mac || segment != 0 {
        return Some(Expected::Pass);
    }
    let dsr_to = |flow: vip_common::FlowKey6| {
        let mut out = frame.to_vec();
        out[0..6].copy_from_slice(&(st.mac_of)(predict(st.table, &flow.folded())));
        out[6..12].copy_from_slice(&st.node_mac);
        Expected::Tx(out)
    };
    if ptb {
        let Some(q) = frame.get(off + 48..off + 48 + 44) else { return Some(Expected::Drop) };
        let ours = q[0] >> 4 == 6 && q[6] == 6 && q[8..24] == dst.octets();
        let port = u16::from_be_bytes([q[40], q[41]]);
        if !ours || dst != vips6[0] || port != st.service.1 || st.peer_macs.contains(&src_mac) {
            return Some(Expected::Pass);
        }
        let client: [u8; 16] = q[24..40].try_into().expect("16 bytes");
        return Some(dsr_to(vip_common::FlowKey6::new(client, dst.octets(), [q[42], q[43]], [q[40], q[41]], 6)));
    }
    let Some(tcp) = frame.get(off + 40..off + 60) else { return Some(Expected::Pass) };
    if dst != vips6[0] || u16::from_be_bytes([tcp[2], tcp[3]]) != st.service.1 || st.peer_macs.contains(&src_mac) {
        return Some(Expected::Pass);
    }
    Some(dsr_to(vip_common::FlowKey6::new(
        ip[8..24].try_into().expect("16 bytes"),
        dst.octets(),
        [tcp[0], tcp[1]],
        [tcp[2], tcp[3]],
        6,
    )))
}
