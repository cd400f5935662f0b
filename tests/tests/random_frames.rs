//! Seeded random frames through the real XDP program, each checked against the
//! reference models in `tests::frames` (written from the protocol rules, not from the XDP
//! code): ARP requests and replies, IPv6 Neighbor Solicitations (and other ICMPv6),
//! IPv4/TCP to the service and elsewhere, fragments, options, IPIP, VLAN tags, then
//! mutated, truncated or replaced by noise.
//!
//! Invariants: never `XDP_ABORTED`; `XDP_TX` only for a well-formed ARP request or
//! Neighbor Solicitation for a led VIP (with exactly the model's reply) or a complete
//! TCP segment to the service (sent to exactly the model's backend); `XDP_DROP` only for
//! a request or solicitation for a followed VIP; every
//! other frame passes unchanged, but IPIP from a peer for the service, which passes
//! decapsulated. Beside the models, checked on their own: never `XDP_TX` a frame whose
//! destination MAC is not ours (or a group address), never send one whose source MAC is
//! not ours, never decapsulate from an unknown outer source.
//!
//! `VIP_RANDOM_FRAMES` (default 100,000) and `VIP_RANDOM_SEED` override. Needs root.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use tests::{
    frames::{
        arp_model, forward6_model, forward_model, icmp_unreachable, icmpv6, ipip, ipv6, ipv6_multicast_mac, is_group,
        ll_option, ndp_model, ns_message, solicited_node, tcp, Arp, Expected, ForwardState, Frame, Ip4, Mac, Role,
        ALL_NODES, BROADCAST, ETH_P_8021AD, ETH_P_8021Q, ETH_P_ARP, ETH_P_IPV4, ETH_P_IPV6, TCP_ACK, TCP_SYN,
    },
    xdp, SplitMix64,
};
use vip_agent::{
    balancer::{BackendSpec, Balancer, ServiceSpec},
    dataplane::{Dataplane, Program},
};
use vip_common::{Config, ForwardMode, PeerKey, VipState};

const NODE_MAC: Mac = [0x02, 0, 0, 0, 0, 0x01];
const CLIENT_MAC: Mac = [0x02, 0, 0, 0, 0, 0xc1];
const OTHER_MAC: Mac = [0x02, 0, 0, 0, 0, 0x0f];
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
const VIP2: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 101);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);
const OTHER_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 51);
const PORT: u16 = 6443;

/// IPv6 VIPs: one led, one followed, and other addresses of the segment.
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x100);
const VIP6_2: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x101);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x10);
const OTHER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x50);

fn backend_mac(i: u8) -> Mac {
    [0x02, 0, 0, 0, 0, 0x10 + i]
}

/// Another load-balancing node (a peer), by MAC and address.
const PEER_MAC: Mac = [0x02, 0, 0, 0, 0, 0x0e];
const PEER_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 50);

fn arp_frame(rng: &mut SplitMix64) -> Frame {
    let targets = [VIP, VIP2, OTHER_IP, CLIENT_IP];
    let macs = [CLIENT_MAC, OTHER_MAC, NODE_MAC, BROADCAST, [0x02, 0, 0, 0, 0, 0x99]];
    let tpa = targets[rng.below(targets.len())];
    let spa = if rng.below(8) == 0 { tpa } else { targets[rng.below(targets.len())] };
    let sha = macs[rng.below(macs.len())];
    let mut arp = if rng.below(4) == 0 {
        Arp::reply(sha, spa, macs[rng.below(macs.len())], tpa)
    } else {
        Arp::request(sha, spa, tpa)
    };
    if rng.below(6) == 0 {
        arp.oper = rng.below(5) as u16;
    }
    Frame::arp(macs[rng.below(macs.len())], sha, &arp)
}

/// A solicitation (or, sometimes, another ICMPv6 message) for a VIP or another address:
/// ordinary or DAD, to the solicited-node group, all-nodes or unicast, with the option
/// combinations hosts send, and sometimes a hop limit that crossed a router.
fn nd_frame(rng: &mut SplitMix64) -> Frame {
    let targets = [VIP6, VIP6, VIP6_2, OTHER6];
    let target = targets[rng.below(targets.len())];
    let dad = rng.below(4) == 0;
    let src = if dad { Ipv6Addr::UNSPECIFIED } else { CLIENT6 };
    let dst = [solicited_node(target), solicited_node(target), ALL_NODES, target][rng.below(4)];
    let dst_mac = if dst.is_multicast() { ipv6_multicast_mac(dst) } else { [NODE_MAC, OTHER_MAC][rng.below(2)] };
    let sllao = ll_option(1, CLIENT_MAC);
    let nonce = [14, 1, 1, 2, 3, 4, 5, 6];
    let options: &[&[u8]] = match rng.below(5) {
        0 => &[],
        1 => &[&sllao],
        2 => &[&sllao, &nonce],
        3 => &[&nonce, &sllao],
        _ => &[&nonce],
    };
    let mut msg = ns_message(target, options);
    if rng.below(8) == 0 {
        msg[0] = [128, 129, 136, 133][rng.below(4)];
    }
    let hop = [255, 255, 255, 64][rng.below(4)];
    Frame::new(dst_mac, CLIENT_MAC, ETH_P_IPV6, icmpv6(src, dst, hop, &msg))
}

/// TCP over IPv6 to the IPv6 VIPs (the led one is a service) and elsewhere.
fn tcp6_frame(rng: &mut SplitMix64, dst_mac: Mac, src_mac: Mac) -> Frame {
    let dsts = [VIP6, VIP6, VIP6_2, OTHER6];
    let ports = [PORT, PORT, 22];
    let src = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0x63, rng.below(1 << 16) as u16);
    let mut p = vec![0x60, 0, 0, 0, 0, 20, 6, 64];
    p.extend(src.octets());
    p.extend(dsts[rng.below(dsts.len())].octets());
    let flags = [TCP_SYN, TCP_ACK, TCP_ACK | 0x08, 0x11][rng.below(4)];
    p.extend(tcp(1024 + rng.below(60000) as u16, ports[rng.below(ports.len())], flags));
    Frame::new(dst_mac, src_mac, ETH_P_IPV6, p)
}

/// An ICMPv6 Packet Too Big to an IPv6 VIP (or elsewhere) quoting one of the service's
/// answers to a client (or something else), cut at various lengths.
fn ptb_frame(rng: &mut SplitMix64, dst_mac: Mac, src_mac: Mac) -> Frame {
    let (qsrc, sport) = [(VIP6, PORT), (VIP6, PORT), (VIP6, 22), (OTHER6, PORT)][rng.below(4)];
    let mut quote = vec![0x60, 0, 0, 0, 0, 20, 6, 64];
    quote.extend(qsrc.octets());
    quote.extend(CLIENT6.octets());
    quote.extend(tcp(sport, 1024 + rng.below(60000) as u16, TCP_ACK));
    quote.truncate([60, 60, 48, 44, 40, 30][rng.below(6)]);
    let mut msg = vec![2, 0, 0, 0, 0, 0, 5, 0x78];
    msg.extend(quote);
    let dst = [VIP6, VIP6, VIP6_2, OTHER6][rng.below(4)];
    Frame::new(dst_mac, src_mac, ETH_P_IPV6, icmpv6(OTHER6, dst, 64, &msg))
}

fn tcp_packet(rng: &mut SplitMix64) -> Vec<u8> {
    let dsts = [VIP, VIP, VIP, VIP2, OTHER_IP, NODE_IP];
    let ports = [PORT, PORT, PORT, 22, 443];
    let mut ip = Ip4::new(Ipv4Addr::from(0x0a63_0000 + rng.below(1 << 16) as u32), dsts[rng.below(dsts.len())], 6);
    match rng.below(10) {
        0 => ip.options = vec![0x94, 0x04, 0, 0],
        1 => ip.frags = 0x2000,
        2 => ip.frags = rng.below(0x2000) as u16,
        3 => ip.proto = [1, 17, 47][rng.below(3)],
        _ => {}
    }
    let flags = [TCP_SYN, TCP_ACK, TCP_ACK | 0x08, 0x11][rng.below(4)];
    ip.packet(&tcp(1024 + rng.below(60000) as u16, ports[rng.below(ports.len())], flags))
}

/// Frames biased towards the interesting paths, then mutated, truncated or replaced.
fn random_frame(rng: &mut SplitMix64) -> Vec<u8> {
    // Mostly to us, sometimes to another host (a promiscuous NIC, a flooding switch).
    let dst = [NODE_MAC, NODE_MAC, NODE_MAC, OTHER_MAC][rng.below(4)];
    // Mostly from clients, sometimes from a peer that already balanced the flow.
    let src = [CLIENT_MAC, CLIENT_MAC, OTHER_MAC, PEER_MAC][rng.below(4)];
    let mut f = match rng.below(16) {
        0..=3 => arp_frame(rng),
        12..=13 => nd_frame(rng),
        14 => tcp6_frame(rng, dst, src),
        15 => ptb_frame(rng, dst, src),
        4..=6 => Frame::new(dst, src, ETH_P_IPV4, tcp_packet(rng)),
        7..=8 => {
            let outer_dst = [NODE_IP, NODE_IP, NODE_IP, OTHER_IP][rng.below(4)];
            let outer_src = [PEER_IP, PEER_IP, PEER_IP, OTHER_IP][rng.below(4)];
            Frame::new(dst, PEER_MAC, ETH_P_IPV4, ipip(outer_src, outer_dst, &tcp_packet(rng)))
        }
        9 if rng.below(2) == 0 => Frame::new(NODE_MAC, CLIENT_MAC, ETH_P_IPV6, ipv6(17, &[0; 8])),
        9 => {
            // An ICMP error about one of the VIP's answers (or about something else).
            let (qsrc, sport) = [(VIP, PORT), (VIP, PORT), (VIP, 22), (OTHER_IP, PORT)][rng.below(4)];
            let quote = Ip4::new(qsrc, CLIENT_IP, 6).packet(&tcp(sport, 1024 + rng.below(60000) as u16, TCP_ACK));
            let cut = [28, 28, 40, 20, 24][rng.below(5)];
            let error = icmp_unreachable([4, 3, 1][rng.below(3)], 1400, &quote[..cut]);
            Frame::new(dst, src, ETH_P_IPV4, Ip4::new(OTHER_IP, VIP, 1).packet(&error))
        }
        10 => {
            let ethertypes = [ETH_P_ARP, ETH_P_8021Q, ETH_P_8021AD, ETH_P_IPV4, rng.next_u64() as u16];
            let mut payload = vec![0u8; rng.below(80)];
            rng.fill(&mut payload);
            Frame::new(BROADCAST, CLIENT_MAC, ethertypes[rng.below(ethertypes.len())], payload)
        }
        _ => {
            let mut noise = vec![0u8; 14 + rng.below(100)];
            rng.fill(&mut noise);
            return noise;
        }
    };
    // Mostly untagged (the VIPs' segment), else up to three tags; priority tags (VID 0)
    // belong to the untagged segment, so half of the tags are those.
    let tags = [0, 0, 0, 0, 0, 1, 2, 3][rng.below(8)];
    for _ in 0..tags {
        let tci = if rng.below(2) == 0 { (rng.below(8) as u16) << 13 } else { rng.below(1 << 16) as u16 };
        f = f.vlan(if rng.below(2) == 0 { ETH_P_8021Q } else { ETH_P_8021AD }, tci);
    }
    let mut frame = if rng.below(2) == 0 { f.padded() } else { f.bytes() };
    // Flip a few bytes, sometimes in the headers that decide the verdict.
    for _ in 0..rng.below(4) {
        let i = rng.below(frame.len().min(60));
        frame[i] = rng.next_u64() as u8;
    }
    // Truncate sometimes, never below the kernel's 14-byte minimum.
    if rng.below(4) == 0 && frame.len() > 14 {
        let len = 14 + rng.below(frame.len() - 14);
        frame.truncate(len);
    }
    frame
}

/// The ICMPv6 type of a frame carrying ICMPv6 right after the IPv6 header (after up to
/// two VLAN tags).
fn icmpv6_type(frame: &[u8]) -> Option<u8> {
    let mut off = 12;
    for _ in 0..2 {
        if matches!(frame.get(off..off + 2), Some([0x81, 0x00]) | Some([0x88, 0xa8])) {
            off += 4;
        }
    }
    (frame.get(off + 2 + 6) == Some(&58)).then(|| frame.get(off + 2 + 40).copied()).flatten()
}

/// The EtherType after up to two VLAN tags.
fn ethertype(frame: &[u8]) -> Option<u16> {
    let mut off = 12;
    for _ in 0..2 {
        if matches!(frame.get(off..off + 2), Some([0x81, 0x00]) | Some([0x88, 0xa8])) {
            off += 4;
        }
    }
    frame.get(off..off + 2).map(|b| u16::from_be_bytes([b[0], b[1]]))
}

/// The outer source address of an IPv4 frame (after up to two VLAN tags).
fn flow_of_outer_src(frame: &[u8]) -> Option<Ipv4Addr> {
    let mut off = 12;
    for _ in 0..2 {
        if matches!(frame.get(off..off + 2), Some([0x81, 0x00]) | Some([0x88, 0xa8])) {
            off += 4;
        }
    }
    let src: [u8; 4] = frame.get(off + 2 + 12..off + 2 + 16)?.try_into().ok()?;
    Some(Ipv4Addr::from(src))
}

#[test]
fn random_frames_match_the_reference_models() {
    let count: usize = std::env::var("VIP_RANDOM_FRAMES").ok().and_then(|s| s.parse().ok()).unwrap_or(100_000);
    random_frames_through(Program::Vip, count);
}

/// The same models through the tcx program, run as skbs: what XDP decapsulates passes
/// untouched at tcx (IPIP is XDP's), the rest is the same. Fewer frames: the models are
/// the same, only the entry point differs.
#[test]
fn random_frames_match_the_reference_models_at_tcx() {
    let count: usize = std::env::var("VIP_RANDOM_FRAMES").ok().and_then(|s| s.parse().ok()).unwrap_or(100_000);
    random_frames_through(Program::Tcx, count / 5);
}

fn random_frames_through(program: Program, count: usize) {
    let seed: u64 = std::env::var("VIP_RANDOM_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5EED_0A12);
    let mut dp = Dataplane::load().expect("load (needs root)");
    if program == Program::Tcx {
        dp.load_tcx().expect("loading the tcx program");
    }
    dp.maps_mut().set_config(&Config::new(NODE_MAC, NODE_IP.octets())).unwrap();
    dp.maps_mut().set_vip(VIP, VipState::leader_until(VipState::FOREVER)).unwrap();
    dp.maps_mut().set_vip(VIP2, VipState::follower()).unwrap();
    dp.maps_mut().set_vip(VIP6, VipState::leader_until(VipState::FOREVER)).unwrap();
    dp.maps_mut().set_vip(VIP6_2, VipState::follower()).unwrap();
    let mut lb = Balancer::new(Duration::ZERO);
    let backends = (1..=3u8).map(|i| BackendSpec::up(Ipv4Addr::new(10, 0, 0, 10 + i), backend_mac(i))).collect();
    dp.maps_mut().set_peers(&[PeerKey::mac(PEER_MAC), PeerKey::ipv4(PEER_IP.octets())].into()).unwrap();
    let spec = ServiceSpec { vip: VIP.into(), port: PORT, mode: ForwardMode::Dsr, m: 65537, backends };
    let table = lb.apply(dp.maps_mut(), &spec).unwrap().table;
    // The same backends behind the led IPv6 VIP: the same names, so the same table.
    let spec6 = ServiceSpec { vip: VIP6.into(), ..spec.clone() };
    assert_eq!(lb.apply(dp.maps_mut(), &spec6).unwrap().table, table);
    let mac_of = |id: u32| {
        (1..=3u8).find(|&i| lb.backend_id(Ipv4Addr::new(10, 0, 0, 10 + i)) == Some(id)).map_or([0; 6], backend_mac)
    };
    let state = ForwardState {
        vips: &[VIP, VIP2],
        node_mac: NODE_MAC,
        node_ip: NODE_IP,
        peer_macs: &[PEER_MAC],
        peer_ips: &[PEER_IP],
        service: (VIP, PORT),
        table: &table,
        mac_of: &mac_of,
    };
    let arp_vips = [(VIP, Role::Leader), (VIP2, Role::Follower)];
    let nd_vips = [(VIP6, Role::Leader), (VIP6_2, Role::Follower)];

    let mut rng = SplitMix64(seed);
    let mut seen = std::collections::BTreeMap::<&str, usize>::new();
    for i in 0..count {
        let frame = random_frame(&mut rng);
        let out = match dp.test_run(program, &frame) {
            Ok(out) => out,
            // BPF_PROG_RUN refuses an untagged IPv4 or IPv6 skb shorter than its header.
            Err(_)
                if program == Program::Tcx
                    && match frame.get(12..14) {
                        Some([0x08, 0x00]) => frame.len() < 14 + 20,
                        Some([0x86, 0xdd]) => frame.len() < 14 + 40,
                        _ => false,
                    } =>
            {
                *seen.entry("refused runt").or_default() += 1;
                continue;
            }
            Err(e) => panic!("frame {i} {frame:02x?}: {e:?}"),
        };
        assert_ne!(out.action, xdp::ABORTED, "frame {i} (seed {seed:#x}) aborted: {frame:02x?}");
        let mut expected = forward_model(&frame, &state)
            .or_else(|| forward6_model(&frame, &state, &[VIP6, VIP6_2]))
            .or_else(|| ndp_model(&frame, &nd_vips, NODE_MAC))
            .unwrap_or_else(|| arp_model(&frame, &arp_vips, NODE_MAC));
        if program == Program::Tcx && matches!(expected, Expected::PassAs(_)) {
            expected = Expected::Pass;
        }
        let (ok, kind) = match &expected {
            Expected::Tx(want) => (out.action == xdp::TX && &out.frame == want, "tx"),
            Expected::Drop => (out.action == xdp::DROP && out.frame == frame, "drop"),
            Expected::Pass => (out.action == xdp::PASS && out.frame == frame, "pass"),
            Expected::PassAs(want) => (out.action == xdp::PASS && &out.frame == want, "decap"),
        };
        assert!(
            ok,
            "frame {i} (seed {seed:#x}): got {} {:02x?}\nexpected {expected:02x?}\ninput {frame:02x?}",
            xdp::name(out.action),
            out.frame
        );
        // The invariants on their own, whatever the models say.
        if out.action == xdp::TX {
            assert!(
                frame[0..6] == NODE_MAC || is_group(&frame[0..6]),
                "frame {i}: sent out a frame addressed to {:02x?}, not us",
                &frame[0..6]
            );
            assert_eq!(out.frame[6..12], NODE_MAC, "frame {i}: sent with a source MAC not ours");
        }
        if matches!(expected, Expected::PassAs(_)) {
            let outer_src = flow_of_outer_src(&frame);
            assert_eq!(outer_src, Some(PEER_IP), "frame {i}: decapsulated from an unknown source");
        }
        let kind = match (kind, ethertype(&frame)) {
            ("tx", Some(0x0806)) => "arp reply",
            ("tx", Some(0x86dd)) if icmpv6_type(&out.frame) == Some(136) => "nd reply",
            ("tx", Some(0x86dd)) => "forwarded v6",
            ("tx", _) => "forwarded",
            ("drop", Some(0x86dd)) if icmpv6_type(&frame) == Some(135) => "nd drop",
            ("drop", Some(0x86dd)) => "ipv6 drop",
            (k, _) => k,
        };
        *seen.entry(kind).or_default() += 1;
    }
    // The generator must reach every verdict often, or the test proves little.
    let kinds: &[&str] = match program {
        Program::Tcx => &["arp reply", "nd reply", "nd drop", "forwarded", "forwarded v6", "drop", "pass"],
        _ => &["arp reply", "nd reply", "nd drop", "forwarded", "forwarded v6", "drop", "pass", "decap"],
    };
    for &kind in kinds {
        let n = seen.get(kind).copied().unwrap_or(0);
        assert!(n > count / 500, "only {n} frames of kind {kind:?}: {seen:?}");
    }
    eprintln!("{count} random frames through {program:?} (seed {seed:#x}): {seen:?}");
}
