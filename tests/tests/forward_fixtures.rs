//! Kernel fixture tests of VIP forwarding: the real XDP object through `BPF_PROG_RUN`,
//! map state installed by the agent's own balancer (Maglev tables, backends, services).
//! Expected output frames are built field by field; where Maglev picks the backend, the
//! expectation comes from the agent-side Maglev table and the shared flow hash, so these
//! tests also prove the kernel and the agent agree on where a flow lands.
//!
//! Needs root.

use std::{
    net::Ipv4Addr,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use tests::{
    fixture::{
        check_a_cached_flow_follows_a_re_pin_made_on_another_cpu,
        check_a_draining_backend_keeps_the_connections_this_node_never_pinned,
        check_a_syn_reusing_a_flow_pinned_to_a_draining_backend_is_balanced_afresh, dst_mac_on_cpu, pass,
        run_and_check, with_health, Expect, Health,
    },
    frames::{
        flow_of, icmp_unreachable, ipip, ipv4, predict, tcp, Frame, Ip4, Mac, ETH_P_8021AD, ETH_P_8021Q, ETH_P_IPV4,
        TCP_ACK, TCP_SYN,
    },
    lab::FibLab,
    xdp,
};
use vip_agent::{
    balancer::{BackendSpec, Balancer, ServiceSpec},
    dataplane::{Dataplane, Program},
};
use vip_common::{Config, ForwardMode, HealthReason, PeerKey, Reason, VipState};

const NODE_MAC: Mac = [0x02, 0, 0, 0, 0, 0x01];
const CLIENT_MAC: Mac = [0x02, 0, 0, 0, 0, 0xc1];
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);
const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
const PORT: u16 = 6443;
const M: u32 = 65537;

/// The verdict for an IPIP frame whose outer header is stripped: passed up the stack as
/// `frame`.
fn decapsulated(frame: Frame) -> Expect {
    Expect { action: xdp::PASS, reason: Reason::IpipDecap, output: Some(frame.bytes()) }
}

fn backend_ip(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 0, 10 + i)
}

fn backend_mac(i: u8) -> Mac {
    [0x02, 0, 0, 0, 0, 0x10 + i]
}

fn backend(i: u8) -> BackendSpec {
    BackendSpec::up(backend_ip(i), backend_mac(i))
}

/// Another load-balancing node on the segment (a peer): it balances too, so what it
/// sends here was balanced already.
const PEER_MAC: Mac = [0x02, 0, 0, 0, 0, 0x0e];
const PEER_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 50);

fn seed_peer(dp: &mut Dataplane) {
    dp.maps_mut().set_peers(&[PeerKey::mac(PEER_MAC), PeerKey::ipv4(PEER_IP.octets())].into()).unwrap();
}

// ---- setup ------------------------------------------------------------------------------

fn load() -> (Dataplane, Balancer) {
    let mut dp = Dataplane::load().expect("loading the XDP object (tests need root)");
    dp.maps_mut().set_config(&Config::new(NODE_MAC, NODE_IP.octets())).unwrap();
    // Only the leader balances (a follower delivers what the leader sends it).
    dp.maps_mut().set_vip(VIP, VipState::leader_until(VipState::FOREVER)).unwrap();
    seed_peer(&mut dp);
    (dp, Balancer::new(Duration::from_millis(1)))
}

fn service(mode: ForwardMode, backends: Vec<BackendSpec>) -> ServiceSpec {
    ServiceSpec { vip: VIP.into(), port: PORT, mode, m: M, backends }
}

/// Installs `spec` and forgets every pinned flow; returns the live table.
fn install(dp: &mut Dataplane, lb: &mut Balancer, spec: &ServiceSpec) -> Vec<u32> {
    let applied = lb.apply(dp.maps_mut(), spec).expect("apply service");
    dp.maps_mut().clear_conns().unwrap();
    applied.table
}

// ---- inputs -----------------------------------------------------------------------------

fn tcp_frame(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16, flags: u8) -> Frame {
    Frame::new(NODE_MAC, CLIENT_MAC, ETH_P_IPV4, ipv4(src, dst, 6, &tcp(sport, dport, flags)))
}

fn syn(sport: u16) -> Frame {
    tcp_frame(CLIENT_IP, sport, VIP, PORT, TCP_SYN)
}

/// A leaving node's answer to a peer's VIP-path probe (a SYN from `PEER_IP:sport`, the
/// `tcp` helper's sequence number 1, in a frame from `PEER_MAC`): a RST from VIP:PORT
/// acknowledging 2, sequence number 0, window `REFUSAL_WINDOW` (what tells it from the
/// host's own RST, window 0), the TCP checksum valid, the IPv4 header as the probe's
/// with the addresses swapped, back to the peer's MAC.
fn refusal(sport: u16) -> Vec<u8> {
    let mut t = tcp(PORT, sport, 0x14);
    t[4..8].copy_from_slice(&0u32.to_be_bytes());
    t[8..12].copy_from_slice(&2u32.to_be_bytes());
    t[14..16].copy_from_slice(&vip_common::REFUSAL_WINDOW.to_be_bytes());
    let mut pseudo = VIP.octets().to_vec();
    pseudo.extend(PEER_IP.octets());
    pseudo.extend([0, 6, 0, 20]);
    pseudo.extend(&t);
    let check = tests::frames::inet_checksum(&pseudo);
    t[16..18].copy_from_slice(&check.to_be_bytes());
    Frame::new(PEER_MAC, NODE_MAC, ETH_P_IPV4, ipv4(VIP, PEER_IP, 6, &t)).bytes()
}

/// `frame` as DSR must send it to backend `i`: MACs rewritten, nothing else.
fn dsr_to(frame: &Frame, i: u8) -> Vec<u8> {
    Frame { dst: backend_mac(i), src: NODE_MAC, ..frame.clone() }.bytes()
}

/// Which backend (1-based, as named by `backend(i)`) a backend id is, given the spec.
fn index_of(lb: &Balancer, id: u32) -> u8 {
    (1..=9).find(|&i| lb.backend_id(backend_ip(i)) == Some(id)).expect("id of a known backend")
}

// ---- check ------------------------------------------------------------------------------

/// Verdicts only the XDP program gives: growing or shrinking the frame (IPIP, the ICMP
/// error it builds) is XDP's, and the agent refuses `--forward ipip` at tcx.
const XDP_ONLY: [Reason; 8] = [
    Reason::ForwardedIpip,
    Reason::IpipDecap,
    Reason::IpipFailed,
    Reason::IpipFragNeeded,
    Reason::IpipTooBig,
    Reason::IpipNoNeigh,
    Reason::IpipNoRoute,
    Reason::IpipForwardingDisabled,
];

#[test]
fn forwarding_fixture_table() {
    forwarding_fixture_table_of(Program::Vip);
}

/// The same table through the tcx program (`--attach tcx`), run as an skb, its verdicts
/// in XDP's terms (see `Runner::run`): every row but the XDP-only ones ([`XDP_ONLY`])
/// gets the same verdict, counter and output frame.
#[test]
fn forwarding_fixture_table_at_tcx() {
    forwarding_fixture_table_of(Program::Tcx);
}

fn forwarding_fixture_table_of(program: Program) {
    use Reason::*;
    let (mut dp, mut lb) = load();
    if program == Program::Tcx {
        dp.load_tcx().expect("loading the tcx program");
    }
    let three = || vec![backend(1), backend(2), backend(3)];
    let mut failures = Vec::new();
    let mut check = |dp: &Dataplane, name: &str, input: Vec<u8>, want: Expect| {
        // BPF_PROG_RUN refuses an IPv4 skb shorter than an IPv4 header (EINVAL), so those
        // rows cannot run at tcx through it.
        let runt = want.reason == IpMalformed && input.len() < 14 + 20;
        if program == Program::Tcx && (XDP_ONLY.contains(&want.reason) || runt) {
            return;
        }
        if let Err(e) = run_and_check(dp, program, name, &input, &want).map(drop) {
            failures.push(e);
        }
    };

    // DSR, one backend: the output is fully determined.
    install(&mut dp, &mut lb, &service(ForwardMode::Dsr, vec![backend(1)]));
    let s = syn(40000);
    check(
        &dp,
        "SYN to the VIP, DSR",
        s.bytes(),
        Expect { action: xdp::TX, reason: ForwardedDsr, output: Some(dsr_to(&s, 1)) },
    );
    check(
        &dp,
        "802.1Q-tagged SYN for an untagged VIP: another segment, passed",
        syn(40001).vlan(ETH_P_8021Q, 42).bytes(),
        pass(OtherSegment),
    );
    check(
        &dp,
        "QinQ SYN for an untagged VIP: another segment, passed",
        syn(40002).vlan(ETH_P_8021AD, 1).vlan(ETH_P_8021Q, 2).bytes(),
        pass(OtherSegment),
    );
    let prio = syn(40001).vlan(ETH_P_8021Q, 0x6000);
    check(
        &dp,
        "priority-tagged SYN (VID 0) is untagged: DSR, tag kept",
        prio.bytes(),
        Expect { action: xdp::TX, reason: ForwardedDsr, output: Some(dsr_to(&prio, 1)) },
    );
    dp.maps_mut().set_vip(VIP, VipState::leader_until(VipState::FOREVER).on_segment(42)).unwrap();
    let tagged = syn(40051).vlan(ETH_P_8021Q, 42);
    check(
        &dp,
        "SYN tagged 42 for a VIP on VLAN 42, DSR: tag kept",
        tagged.bytes(),
        Expect { action: xdp::TX, reason: ForwardedDsr, output: Some(dsr_to(&tagged, 1)) },
    );
    check(&dp, "untagged SYN for a VIP on VLAN 42: passed", syn(40052).bytes(), pass(UntaggedAtXdp));
    dp.maps_mut().set_vip(VIP, VipState::leader_until(VipState::FOREVER)).unwrap();
    // Only frames sent to us; what we send carries our MAC.
    check(
        &dp,
        "SYN to the VIP addressed to another host's MAC: not ours",
        Frame { dst: [0x02, 0, 0, 0, 0, 0x77], ..syn(40053) }.bytes(),
        pass(NotForUs),
    );
    check(
        &dp,
        "SYN to the VIP addressed to broadcast: not forwarded",
        Frame { dst: [0xff; 6], ..syn(40054) }.bytes(),
        pass(NotForUs),
    );
    check(
        &dp,
        "new flow from a peer's MAC (it balanced it already): delivered here",
        Frame { src: PEER_MAC, ..syn(40055) }.bytes(),
        pass(BalancedByPeer),
    );
    // This node's agent is leaving: the peers' VIP-path probes (SYNs from their own
    // address) are refused so they drain it; clients are served as before.
    let mut leaving = dp.maps().config().unwrap();
    leaving.flags |= Config::F_LEAVING;
    dp.maps_mut().set_config(&leaving).unwrap();
    check(
        &dp,
        "leaving: a peer's VIP-path probe is answered with a RST",
        Frame { src: PEER_MAC, ..tcp_frame(PEER_IP, 40056, VIP, PORT, TCP_SYN) }.bytes(),
        Expect { action: xdp::TX, reason: ProbeRefusedLeaving, output: Some(refusal(40056)) },
    );
    check(
        &dp,
        "leaving: other TCP from a peer to the VIP is dropped",
        Frame { src: PEER_MAC, ..tcp_frame(PEER_IP, 40059, VIP, PORT, TCP_ACK) }.bytes(),
        Expect { action: xdp::DROP, reason: ProbeRefusedLeaving, output: None },
    );
    // With the VIP on a VLAN the probes still come untagged (from the peers' own
    // addresses, on their segment): refused all the same.
    dp.maps_mut().set_vip(VIP, VipState::leader_until(VipState::FOREVER).on_segment(42)).unwrap();
    check(
        &dp,
        "leaving, VIP on VLAN 42: a peer's untagged VIP-path probe is answered with a RST",
        Frame { src: PEER_MAC, ..tcp_frame(PEER_IP, 40058, VIP, PORT, TCP_SYN) }.bytes(),
        Expect { action: xdp::TX, reason: ProbeRefusedLeaving, output: Some(refusal(40058)) },
    );
    dp.maps_mut().set_vip(VIP, VipState::leader_until(VipState::FOREVER)).unwrap();
    let s = syn(40057);
    check(
        &dp,
        "leaving: a client's SYN is still forwarded",
        s.bytes(),
        Expect { action: xdp::TX, reason: ForwardedDsr, output: Some(dsr_to(&s, 1)) },
    );
    dp.maps_mut().set_config(&Config::new(NODE_MAC, NODE_IP.octets())).unwrap();
    // IPv4 options do not change where a packet goes: forwarded like any other.
    let opts = Frame::new(
        NODE_MAC,
        CLIENT_MAC,
        ETH_P_IPV4,
        Ip4 {
            options: vec![0x94, 0x04, 0, 0], // Router Alert
            ..Ip4::new(CLIENT_IP, VIP, 6)
        }
        .packet(&tcp(40003, PORT, TCP_SYN)),
    );
    check(
        &dp,
        "IPv4 with options, DSR",
        opts.bytes(),
        Expect { action: xdp::TX, reason: ForwardedDsr, output: Some(dsr_to(&opts, 1)) },
    );
    let first_frag = Frame::new(
        NODE_MAC,
        CLIENT_MAC,
        ETH_P_IPV4,
        Ip4 { frags: 0x2000, ..Ip4::new(CLIENT_IP, VIP, 6) }.packet(&tcp(40004, PORT, TCP_ACK)),
    );
    check(&dp, "first fragment to the VIP", first_frag.bytes(), pass(Fragment));
    let later_frag = Frame::new(
        NODE_MAC,
        CLIENT_MAC,
        ETH_P_IPV4,
        Ip4 { frags: 0x0005, ..Ip4::new(CLIENT_IP, VIP, 6) }.packet(&[0; 24]),
    );
    check(&dp, "non-first fragment to the VIP", later_frag.bytes(), pass(Fragment));
    let icmp = Frame::new(NODE_MAC, CLIENT_MAC, ETH_P_IPV4, ipv4(CLIENT_IP, VIP, 1, &[8, 0, 0xf7, 0xff, 0, 0, 0, 0]));
    check(&dp, "ICMP echo to the VIP", icmp.bytes(), pass(VipIcmp));
    let udp =
        Frame::new(NODE_MAC, CLIENT_MAC, ETH_P_IPV4, ipv4(CLIENT_IP, VIP, 17, &[0x9c, 0x40, 0x19, 0x2b, 0, 8, 0, 0]));
    check(&dp, "UDP to the VIP service port", udp.bytes(), pass(VipNotTcp));
    check(
        &dp,
        "TCP to another port of the VIP",
        tcp_frame(CLIENT_IP, 40005, VIP, 22, TCP_SYN).bytes(),
        pass(VipOtherPort),
    );
    check(&dp, "reply sourced from the VIP", tcp_frame(VIP, PORT, CLIENT_IP, 40006, TCP_ACK).bytes(), pass(NotVip));
    check(&dp, "TCP to a non-VIP address", tcp_frame(CLIENT_IP, 40007, NODE_IP, PORT, TCP_SYN).bytes(), pass(NotVip));
    let full = syn(40008).bytes();
    let l4 = 14 + 20;
    for len in [l4, l4 + 1, l4 + 10, l4 + 19] {
        check(&dp, &format!("TCP header truncated to {} bytes", len - l4), full[..len].to_vec(), pass(TcpMalformed));
    }
    for len in [14, 15, 20, 33] {
        check(&dp, &format!("IPv4 header truncated to {} bytes", len - 14), full[..len].to_vec(), pass(IpMalformed));
    }
    let mut bad_ihl = full.clone();
    bad_ihl[14] = 0x44;
    check(&dp, "IPv4 IHL below 5", bad_ihl, pass(IpMalformed));
    let mut bad_version = full.clone();
    bad_version[14] = 0x65;
    check(&dp, "IPv4 ethertype with version 6", bad_version, pass(IpMalformed));

    // Three backends: Maglev picks; the agent-side table says which.
    let table = install(&mut dp, &mut lb, &service(ForwardMode::Dsr, three()));
    for sport in [50000u16, 50001, 50002, 50003] {
        let f = syn(sport);
        let want = index_of(&lb, predict(&table, &flow_of(&f.bytes()).unwrap()));
        check(
            &dp,
            &format!("SYN from port {sport}, 3 backends"),
            f.bytes(),
            Expect { action: xdp::TX, reason: ForwardedDsr, output: Some(dsr_to(&f, want)) },
        );
    }

    // A follower (or a leader past its deadline) does not balance: the leader sent this
    // frame here by DSR, so it goes up the local stack instead of being balanced again.
    for (name, state) in [
        ("SYN on a follower: delivered locally", VipState::follower()),
        ("SYN on a leader past its deadline: delivered locally", VipState::leader_until(1)),
    ] {
        dp.maps_mut().set_vip(VIP, state).unwrap();
        check(&dp, name, syn(40009).bytes(), pass(NotBalancing));
    }
    // A leader whose deadline passed with nothing rewriting it (its agent was killed, or
    // hangs) balances its clients' new flows for VipState::BALANCE_GRACE_NS more, by its
    // last table, as the next leader will: clients reach it until the next leader's
    // gratuitous ARP. A frame from a peer is still not balanced again.
    let second = 1_000_000_000;
    let lapsed = vip_agent::clock::boot_ns() - second;
    dp.maps_mut().set_vip(VIP, VipState::leader_until(lapsed)).unwrap();
    let late = syn(40040);
    let want = index_of(&lb, predict(&table, &flow_of(&late.bytes()).unwrap()));
    check(
        &dp,
        "SYN 1 s past an unrenewed deadline: balanced by the last table (grace)",
        late.bytes(),
        Expect { action: xdp::TX, reason: ForwardedDsr, output: Some(dsr_to(&late, want)) },
    );
    check(
        &dp,
        "SYN from a peer 1 s past an unrenewed deadline: delivered here",
        Frame { src: PEER_MAC, ..syn(40041) }.bytes(),
        pass(BalancedByPeer),
    );
    let long_ago = vip_agent::clock::boot_ns() - VipState::BALANCE_GRACE_NS - second;
    dp.maps_mut().set_vip(VIP, VipState::leader_until(long_ago)).unwrap();
    check(&dp, "SYN past the deadline and the grace: delivered locally", syn(40042).bytes(), pass(NotBalancing));
    dp.maps_mut().set_vip(VIP, VipState::leader_until(VipState::FOREVER)).unwrap();

    // A flow pinned while this node balanced keeps its backend after the node stops
    // balancing (deadline passed, or handed over): clients not yet moved keep their
    // connections. New flows are delivered locally.
    let pinned = syn(40030);
    let owner = index_of(&lb, predict(&table, &flow_of(&pinned.bytes()).unwrap()));
    check(
        &dp,
        "SYN while leading: pinned",
        pinned.bytes(),
        Expect { action: xdp::TX, reason: ForwardedDsr, output: Some(dsr_to(&pinned, owner)) },
    );
    dp.maps_mut().set_vip(VIP, VipState::leader_until(1)).unwrap();
    let ack = tcp_frame(CLIENT_IP, 40030, VIP, PORT, TCP_ACK);
    check(
        &dp,
        "pinned flow after the deadline: still forwarded",
        ack.bytes(),
        Expect { action: xdp::TX, reason: ForwardedDsr, output: Some(dsr_to(&ack, owner)) },
    );
    check(&dp, "new flow after the deadline: delivered locally", syn(40031).bytes(), pass(NotBalancing));
    dp.maps_mut().set_vip(VIP, VipState::leader_until(VipState::FOREVER)).unwrap();

    // A pin holds for the flow as the client sends it. The same flow arriving from a
    // peer was balanced there: delivered here, never sent on (no DSR loop between a
    // node whose pin names a peer and a peer whose table names this node).
    let looped = syn(40032);
    let owner = index_of(&lb, predict(&table, &flow_of(&looped.bytes()).unwrap()));
    check(
        &dp,
        "SYN from the client: pinned",
        looped.bytes(),
        Expect { action: xdp::TX, reason: ForwardedDsr, output: Some(dsr_to(&looped, owner)) },
    );
    let from_peer = Frame { src: PEER_MAC, ..tcp_frame(CLIENT_IP, 40032, VIP, PORT, TCP_ACK) };
    check(
        &dp,
        "pinned flow arriving from a peer: delivered here, not sent on",
        from_peer.bytes(),
        pass(BalancedByPeer),
    );
    dp.maps_mut().set_vip(VIP, VipState::follower()).unwrap();
    check(&dp, "pinned flow from a peer on a follower: delivered here", from_peer.bytes(), pass(BalancedByPeer));
    dp.maps_mut().set_vip(VIP, VipState::leader_until(VipState::FOREVER)).unwrap();
    let moved_client = Frame { src: [0x02, 0, 0, 0, 0, 0xc2], ..tcp_frame(CLIENT_IP, 40032, VIP, PORT, TCP_ACK) };
    check(
        &dp,
        "pinned flow from another non-peer MAC (a second router): still by its pin",
        moved_client.bytes(),
        Expect { action: xdp::TX, reason: ForwardedDsr, output: Some(dsr_to(&moved_client, owner)) },
    );

    // ICMP errors about VIP flows go to the flow's backend: a router between a backend
    // and a client tells the VIP (the source of the backend's DSR answers) that the path
    // MTU is lower; the backend holding the connection must learn it.
    let answer = |sport: u16, dport: u16| ipv4(VIP, CLIENT_IP, 6, &tcp(sport, dport, TCP_ACK));
    let icmp_from_router = |quote: &[u8]| {
        Frame::new(
            NODE_MAC,
            [0x02, 0, 0, 0, 0, 0xfe],
            ETH_P_IPV4,
            ipv4(Ipv4Addr::new(10, 0, 0, 254), VIP, 1, &icmp_unreachable(4, 1400, quote)),
        )
    };
    let pinned_error = icmp_from_router(&answer(PORT, 40032)[..28]);
    check(
        &dp,
        "frag-needed quoting a pinned flow (IP header + 8 bytes): to its backend",
        pinned_error.bytes(),
        Expect { action: xdp::TX, reason: IcmpToBackend, output: Some(dsr_to(&pinned_error, owner)) },
    );
    let unpinned = icmp_from_router(&answer(PORT, 40777)[..28]);
    let reversed = flow_of(&tcp_frame(CLIENT_IP, 40777, VIP, PORT, TCP_ACK).bytes()).unwrap();
    let maglev_owner = index_of(&lb, predict(&table, &reversed));
    check(
        &dp,
        "frag-needed quoting an unpinned flow: Maglev on the reversed tuple",
        unpinned.bytes(),
        Expect { action: xdp::TX, reason: IcmpToBackend, output: Some(dsr_to(&unpinned, maglev_owner)) },
    );
    check(
        &dp,
        "frag-needed with a quote of 20 bytes: dropped",
        icmp_from_router(&answer(PORT, 40032)[..20]).bytes(),
        Expect { action: xdp::DROP, reason: IcmpQuoteTruncated, output: None },
    );
    check(
        &dp,
        "frag-needed with a quote of 24 bytes (no ports): dropped",
        icmp_from_router(&answer(PORT, 40032)[..23]).bytes(),
        Expect { action: xdp::DROP, reason: IcmpQuoteTruncated, output: None },
    );
    check(
        &dp,
        "unreachable quoting another port of the VIP: local stack",
        icmp_from_router(&answer(22, 40032)[..28]).bytes(),
        pass(VipIcmp),
    );
    check(
        &dp,
        "unreachable quoting a packet not from the VIP: local stack",
        icmp_from_router(&ipv4(CLIENT_IP, VIP, 6, &tcp(40032, PORT, TCP_ACK))[..28]).bytes(),
        pass(VipIcmp),
    );
    check(
        &dp,
        "frag-needed for a VIP flow sent by a peer (it balanced it here): local stack",
        Frame { src: PEER_MAC, ..pinned_error.clone() }.bytes(),
        pass(BalancedByPeer),
    );

    // The chosen backend is this node.
    install(&mut dp, &mut lb, &service(ForwardMode::Dsr, vec![BackendSpec { local: true, ..backend(1) }]));
    check(&dp, "backend is this node", syn(40010).bytes(), pass(LocalBackend));

    // Local mode: no load balancing at all.
    install(&mut dp, &mut lb, &service(ForwardMode::Local, three()));
    check(&dp, "service in local mode", syn(40011).bytes(), pass(LocalMode));

    // No healthy backend.
    let down = vec![BackendSpec { healthy: false, ..backend(1) }, BackendSpec { healthy: false, ..backend(2) }];
    install(&mut dp, &mut lb, &service(ForwardMode::Dsr, down));
    check(&dp, "no healthy backend", syn(40012).bytes(), pass(NoBackend));

    // IPIP decapsulation on a backend: the inner packet for a VIP goes up the stack.
    let inner = ipv4(CLIENT_IP, VIP, 6, &tcp(40013, PORT, TCP_SYN));
    let encapsulated = Frame::new(NODE_MAC, PEER_MAC, ETH_P_IPV4, ipip(PEER_IP, NODE_IP, &inner));
    check(
        &dp,
        "IPIP for a VIP: decapsulated",
        encapsulated.bytes(),
        decapsulated(Frame::new(NODE_MAC, PEER_MAC, ETH_P_IPV4, inner.clone())),
    );
    dp.maps_mut().set_vip(VIP, VipState::leader_until(VipState::FOREVER).on_segment(7)).unwrap();
    let tagged_encap = encapsulated.clone().vlan(ETH_P_8021Q, 7);
    check(
        &dp,
        "IPIP tagged 7 for a VIP on VLAN 7: decapsulated, tag kept",
        tagged_encap.bytes(),
        decapsulated(Frame::new(NODE_MAC, PEER_MAC, ETH_P_IPV4, inner).vlan(ETH_P_8021Q, 7)),
    );
    // A peer's VIP-path probe (inner SYN from its own address) comes untagged whatever
    // the VIP's VLAN, as by DSR: taken. A client's flow untagged for that VIP is not.
    let vlan_probe = ipv4(PEER_IP, VIP, 6, &tcp(40020, PORT, TCP_SYN));
    check(
        &dp,
        "untagged IPIP probe from a peer for a VIP on VLAN 7: decapsulated",
        Frame::new(NODE_MAC, PEER_MAC, ETH_P_IPV4, ipip(PEER_IP, NODE_IP, &vlan_probe)).bytes(),
        decapsulated(Frame::new(NODE_MAC, PEER_MAC, ETH_P_IPV4, vlan_probe.clone())),
    );
    let client_untagged = ipv4(CLIENT_IP, VIP, 6, &tcp(40021, PORT, TCP_SYN));
    check(
        &dp,
        "untagged IPIP from a client for a VIP on VLAN 7: untouched",
        Frame::new(NODE_MAC, PEER_MAC, ETH_P_IPV4, ipip(PEER_IP, NODE_IP, &client_untagged)).bytes(),
        pass(IpipNotOurs),
    );
    dp.maps_mut().set_vip(VIP, VipState::leader_until(VipState::FOREVER)).unwrap();
    // This node's agent is leaving: a peer's VIP-path probe by IPIP (the inner SYN from
    // the peer's own address) is refused, so the peers drain it as by DSR; a client's
    // flow is decapsulated as before.
    let mut leaving = dp.maps().config().unwrap();
    leaving.flags |= Config::F_LEAVING;
    dp.maps_mut().set_config(&leaving).unwrap();
    let probe_inner = ipv4(PEER_IP, VIP, 6, &tcp(40018, PORT, TCP_SYN));
    // (At tcx, which cannot strip the outer header, it is dropped: still refused.)
    check(
        &dp,
        "leaving: a peer's VIP-path probe by IPIP is answered with a RST, unencapsulated",
        Frame::new(NODE_MAC, PEER_MAC, ETH_P_IPV4, ipip(PEER_IP, NODE_IP, &probe_inner)).bytes(),
        match program {
            Program::Tcx => Expect { action: xdp::DROP, reason: ProbeRefusedLeaving, output: None },
            _ => Expect { action: xdp::TX, reason: ProbeRefusedLeaving, output: Some(refusal(40018)) },
        },
    );
    let client_inner = ipv4(CLIENT_IP, VIP, 6, &tcp(40019, PORT, TCP_SYN));
    check(
        &dp,
        "leaving: a client's flow by IPIP is still decapsulated",
        Frame::new(NODE_MAC, PEER_MAC, ETH_P_IPV4, ipip(PEER_IP, NODE_IP, &client_inner)).bytes(),
        decapsulated(Frame::new(NODE_MAC, PEER_MAC, ETH_P_IPV4, client_inner.clone())),
    );
    dp.maps_mut().set_config(&Config::new(NODE_MAC, NODE_IP.octets())).unwrap();
    let encap = |outer_src: Ipv4Addr, outer_dst: Ipv4Addr, inner: &[u8]| {
        Frame::new(NODE_MAC, PEER_MAC, ETH_P_IPV4, ipip(outer_src, outer_dst, inner))
    };
    let syn_inner = ipv4(CLIENT_IP, VIP, 6, &tcp(40014, PORT, TCP_SYN));
    for (name, frame) in [
        (
            "IPIP for another address: untouched",
            encap(PEER_IP, NODE_IP, &ipv4(CLIENT_IP, Ipv4Addr::new(10, 0, 0, 99), 6, &tcp(1, PORT, TCP_SYN))),
        ),
        ("IPIP from a host that is not a peer: untouched", encap(Ipv4Addr::new(10, 0, 0, 66), NODE_IP, &syn_inner)),
        ("IPIP to another outer address: untouched", encap(PEER_IP, Ipv4Addr::new(10, 0, 0, 2), &syn_inner)),
        (
            "IPIP with inner UDP to the VIP (a wildcard listener): untouched",
            encap(PEER_IP, NODE_IP, &ipv4(CLIENT_IP, VIP, 17, &[0x15, 0xb3, 0x15, 0xb3, 0, 8, 0, 0])),
        ),
        (
            "IPIP with inner TCP to another port of the VIP: untouched",
            encap(PEER_IP, NODE_IP, &ipv4(CLIENT_IP, VIP, 6, &tcp(40015, 10250, TCP_SYN))),
        ),
        (
            "IPIP with an inner fragment: untouched",
            encap(
                PEER_IP,
                NODE_IP,
                &Ip4 { frags: 0x2000, ..Ip4::new(CLIENT_IP, VIP, 6) }.packet(&tcp(40016, PORT, TCP_ACK)),
            ),
        ),
        (
            "IPIP with a truncated inner TCP header: untouched",
            encap(PEER_IP, NODE_IP, &ipv4(CLIENT_IP, VIP, 6, &tcp(40017, PORT, TCP_SYN)[..12])),
        ),
        (
            "IPIP addressed to another host's MAC: untouched",
            Frame { dst: [0x02, 0, 0, 0, 0, 0x77], ..encap(PEER_IP, NODE_IP, &syn_inner) },
        ),
        ("IPIP tagged 7 for an untagged VIP: untouched", encap(PEER_IP, NODE_IP, &syn_inner).vlan(ETH_P_8021Q, 7)),
    ] {
        check(&dp, name, frame.bytes(), pass(IpipNotOurs));
    }

    assert!(failures.is_empty(), "{} fixtures failed:\n{}", failures.len(), failures.join("\n"));
}

/// Every flow lands where the agent's Maglev table and the shared flow hash say.
#[test]
fn kernel_and_agent_agree_on_every_flows_backend() {
    let (mut dp, mut lb) = load();
    let table = install(&mut dp, &mut lb, &service(ForwardMode::Dsr, (1..=5).map(backend).collect()));
    let mut per_backend = [0usize; 6];
    for i in 0..5000u32 {
        let src = Ipv4Addr::from(0x0a01_0000 + i);
        let f = tcp_frame(src, 1024 + (i % 50000) as u16, VIP, PORT, TCP_SYN);
        let want = index_of(&lb, predict(&table, &flow_of(&f.bytes()).unwrap()));
        let out = dp.test_run(Program::Vip, &f.bytes()).unwrap();
        assert_eq!(out.action, xdp::TX);
        assert_eq!(out.frame, dsr_to(&f, want), "flow {i}");
        per_backend[want as usize] += 1;
    }
    // And Maglev spreads them: each of 5 backends gets 20 % ± 3 points of 5000 flows.
    for (i, &n) in per_backend.iter().enumerate().skip(1) {
        assert!((850..=1150).contains(&n), "backend {i} got {n} of 5000 flows");
    }
}

/// An established flow stays on its backend after the backend set changes, even when the
/// new table would send it elsewhere; a new flow on the same slot follows the new table.
#[test]
fn established_flow_stays_on_its_backend_when_the_set_changes() {
    let (mut dp, mut lb) = load();
    let old = install(&mut dp, &mut lb, &service(ForwardMode::Dsr, vec![backend(1), backend(2), backend(3)]));
    // Adding backends 4 and 5 moves about 40 % of the slots: find a flow that moves.
    let new_spec = service(ForwardMode::Dsr, (1..=5).map(backend).collect());
    let (first, moved_to) = {
        let mut preview = Balancer::new(Duration::ZERO);
        let mut scratch = Dataplane::load().unwrap();
        let new_table = preview.apply(scratch.maps_mut(), &new_spec).unwrap().table;
        (40000u16..)
            .map(syn)
            .map(|f| {
                let flow = flow_of(&f.bytes()).unwrap();
                let before = backend_ip_of(&lb, predict(&old, &flow));
                let after = backend_ip_of(&preview, predict(&new_table, &flow));
                (f, before, after)
            })
            // To a joining backend (a move between the others would be held).
            .find(|(_, before, after)| before != after && [backend_ip(4), backend_ip(5)].contains(after))
            .map(|(f, _, after)| (f, after))
            .unwrap()
    };
    let flow = flow_of(&first.bytes()).unwrap();
    let out = dp.test_run(Program::Vip, &first.bytes()).unwrap();
    let pinned = out.frame[0..6].to_vec();
    assert_eq!(
        dp.maps().conn(&flow).unwrap().map(|c| c.backend_ip),
        Some(backend_ip_of(&lb, predict(&old, &flow)).octets())
    );

    let new_table = lb.apply(dp.maps_mut(), &new_spec).unwrap().table;
    assert_eq!(backend_ip_of(&lb, predict(&new_table, &flow)), moved_to, "preview and live tables differ");
    let ack = tcp_frame(CLIENT_IP, u16::from_be_bytes(flow.sport), VIP, PORT, TCP_ACK);
    let out = dp.test_run(Program::Vip, &ack.bytes()).unwrap();
    assert_eq!(out.action, xdp::TX);
    assert_eq!(out.frame[0..6], pinned[..], "established flow left its backend");

    // The same 5-tuple without its connection-table entry follows the new table: a
    // backend that joins takes its slots from nobody's connections, so none are held
    // (see `a_returning_backend_leaves_the_connections_opened_without_it_where_they_are`).
    dp.maps_mut().clear_conns().unwrap();
    let out = dp.test_run(Program::Vip, &ack.bytes()).unwrap();
    assert_eq!(out.frame[0..6], backend_mac(index_of(&lb, predict(&new_table, &flow)))[..]);
}

/// A backend that returns (or joins) takes back slots from backends that still serve the
/// connections opened in them while it was away. Those hold the slots for the hold: a
/// packet of such a connection that reaches this node without a pin here (balanced by
/// another node, then moved here by the router's ECMP or a failover: a BGP trial saw 3 of
/// 30 reset when a node returned) goes where the connection is, and a SYN goes to the
/// returning backend; after the hold, the slots are its alone. A balancer told not to
/// hold yielded slots (a node whose first checks are not all in) holds nothing.
#[test]
fn a_returning_backend_leaves_the_connections_opened_without_it_where_they_are() {
    for holds in [true, false] {
        let (mut dp, _) = load();
        let hold = Duration::from_millis(300);
        let mut lb = Balancer::new(Duration::from_millis(1)).with_hold(hold);
        lb.hold_yielded(holds);
        let all: Vec<BackendSpec> = (1..=3).map(backend).collect();
        let full = install(&mut dp, &mut lb, &service(ForwardMode::Dsr, all.clone()));
        let away = lb.apply(dp.maps_mut(), &service(ForwardMode::Dsr, with_health(all.clone(), 2, Health::Down)));
        let away = away.unwrap().table;
        let in_slot_of = |table: &[u32], port| index_of(&lb, predict(table, &flow_of(&syn(port).bytes()).unwrap()));
        // Flows in backend 3's slots, which the other two took while it was away.
        let ports: Vec<u16> = (48000..).filter(|&p| in_slot_of(&full, p) == 3).take(3).collect();
        let ack = |port| tcp_frame(CLIENT_IP, port, VIP, PORT, TCP_ACK).bytes();
        let opened_meanwhile = backend_mac(in_slot_of(&away, ports[0])).to_vec();
        // Backend 3 returns.
        lb.apply(dp.maps_mut(), &service(ForwardMode::Dsr, all.clone())).unwrap();
        let want = if holds { opened_meanwhile } else { backend_mac(3).to_vec() };
        assert_eq!(
            dst_mac_on_cpu(&dp, 0, &ack(ports[0])),
            want,
            "holding {holds}: a connection opened while 3 was away"
        );
        assert_eq!(dst_mac_on_cpu(&dp, 0, &syn(ports[1]).bytes()), backend_mac(3).to_vec(), "a new connection");
        if holds {
            std::thread::sleep(hold);
            assert_eq!(lb.expired_holds().len(), 2, "both backends that gave slots up held them");
            assert!(lb.apply(dp.maps_mut(), &service(ForwardMode::Dsr, all.clone())).unwrap().flipped);
            assert_eq!(dst_mac_on_cpu(&dp, 0, &ack(ports[2])), backend_mac(3).to_vec(), "held after the hold");
        }
    }
}

/// A flood of new flows (spoofed SYNs), twice the connection table's size, leaves the pin
/// of a live connection in place, older than the flood's pins it evicts: the flow's later
/// packets come from the per-CPU flow cache, but its first ACK read the pin from the
/// table and so marked it used, and the kernel's LRU evicts entries never used since
/// they were made (the flood's) first. Were the cache filled when the pin is made (tried:
/// this test fails), the table would never see the flow used, the flood would evict its
/// pin, and the connection would move at the next table change. One CPU throughout, as
/// one NIC queue would have it.
#[test]
fn a_flood_of_new_flows_does_not_evict_a_live_connections_pin() {
    let (mut dp, mut lb) = load();
    install(&mut dp, &mut lb, &service(ForwardMode::Dsr, vec![backend(1), backend(2), backend(3)]));
    let live = syn(50000);
    let flow = flow_of(&live.bytes()).unwrap();
    let ack = tcp_frame(CLIENT_IP, 50000, VIP, PORT, TCP_ACK).bytes();
    let flood = 2 * vip_common::MAX_CONNS;
    let spoofed = |i: u32| tcp_frame(Ipv4Addr::from(0x0b00_0000 + i), 1024 + (i % 60000) as u16, VIP, PORT, TCP_SYN);
    std::thread::scope(|s| {
        s.spawn(|| {
            tests::run_on_cpu(0);
            let pinned = dp.test_run(Program::Vip, &live.bytes()).unwrap().frame;
            for i in 0..flood {
                if i % 1000 < 2 {
                    // The connection stays alive: two ACKs every thousand flood frames.
                    assert_eq!(dp.test_run(Program::Vip, &ack).unwrap().frame[0..6], pinned[0..6]);
                }
                assert_eq!(dp.test_run(Program::Vip, &spoofed(i).bytes()).unwrap().action, xdp::TX);
            }
        });
    });
    let first_pins_kept =
        (0..1000).filter(|&i| dp.maps().conn(&flow_of(&spoofed(i).bytes()).unwrap()).unwrap().is_some()).count();
    assert_eq!(
        first_pins_kept, 0,
        "the flood's first pins, newer than the live one, were not evicted: not the case this tests"
    );
    assert!(dp.maps().conn(&flow).unwrap().is_some(), "the live connection's pin was evicted by {flood} new flows");
}

fn backend_ip_of(lb: &Balancer, id: u32) -> Ipv4Addr {
    (1..=9).map(backend_ip).find(|ip| lb.backend_id(*ip) == Some(id)).expect("known backend")
}

/// A flow whose backend is removed, or turns unhealthy, moves to the new table's choice
/// and is pinned there.
#[test]
fn flow_whose_backend_goes_away_moves() {
    for removal in ["removed", "unhealthy"] {
        let (mut dp, mut lb) = load();
        let table = install(&mut dp, &mut lb, &service(ForwardMode::Dsr, vec![backend(1), backend(2), backend(3)]));
        let f = syn(41000);
        let flow = flow_of(&f.bytes()).unwrap();
        let gone = index_of(&lb, predict(&table, &flow));
        assert_eq!(dp.test_run(Program::Vip, &f.bytes()).unwrap().frame, dsr_to(&f, gone));

        let rest: Vec<BackendSpec> = (1..=3u8)
            .filter_map(|i| match (i == gone, removal) {
                (false, _) => Some(backend(i)),
                (true, "unhealthy") => Some(BackendSpec { healthy: false, ..backend(i) }),
                (true, _) => None,
            })
            .collect();
        let new_table = lb.apply(dp.maps_mut(), &service(ForwardMode::Dsr, rest)).unwrap().table;
        let ack = tcp_frame(CLIENT_IP, 41000, VIP, PORT, TCP_ACK);
        let out = dp.test_run(Program::Vip, &ack.bytes()).unwrap();
        let now = index_of(&lb, predict(&new_table, &flow));
        assert_ne!(now, gone, "{removal}");
        assert_eq!(out.frame, dsr_to(&ack, now), "{removal}: flow must move to the new table's backend");
        assert_eq!(
            dp.maps().conn(&flow).unwrap().map(|c| c.backend_ip),
            Some(backend_ip(now).octets()),
            "{removal}: re-pinned"
        );
    }
}

/// Per-backend counters count the frames and bytes sent to each backend.
#[test]
fn per_backend_counters_count_packets_and_bytes() {
    let (mut dp, mut lb) = load();
    install(&mut dp, &mut lb, &service(ForwardMode::Dsr, vec![backend(1)]));
    let id = lb.backend_id(backend_ip(1)).unwrap();
    let before = dp.maps().backend_stats(id).unwrap();
    let f = syn(42000).bytes();
    for _ in 0..7 {
        dp.test_run(Program::Vip, &f).unwrap();
    }
    let after = dp.maps().backend_stats(id).unwrap();
    assert_eq!(after.packets - before.packets, 7);
    assert_eq!(after.bytes - before.bytes, 7 * f.len() as u64);
}

/// IPIP in a namespace with a real FIB: the backend sits behind a gateway, so the outer
/// destination MAC must be the gateway's, from the neighbour table; the outer source MAC
/// is the ingress interface's. Every other FIB answer has its own counter: no route, no
/// neighbour yet, forwarding disabled (passed intact), and too big once encapsulated
/// (answered with ICMP fragmentation needed, built here field by field).
#[test]
fn ipip_encapsulates_towards_the_fib_next_hop() {
    let fib = FibLab::new().unwrap();
    let lbns = &fib.lb;
    let gw_mac = FibLab::GATEWAY_MAC;
    let far = FibLab::FAR;
    let unroutable = Ipv4Addr::new(192, 0, 2, 9);
    // A route whose gateway has no neighbour entry.
    let unresolved = Ipv4Addr::new(10, 78, 0, 12);
    lbns.ip(&["route", "add", "10.78.0.0/24", "via", "10.0.0.253"]).unwrap();

    lbns.within(|| {
        let (mut dp, mut lb) = load();
        let ifindex = vip_agent::netdev::lookup("lb0").unwrap().ifindex;
        let to = |ip: Ipv4Addr| BackendSpec { mac: [0; 6], ..BackendSpec::up(ip, [0; 6]) };
        install(&mut dp, &mut lb, &service(ForwardMode::Ipip, vec![to(far)]));
        let run = |dp: &Dataplane, frame: &[u8]| dp.runner().run_opts(Program::Vip, frame, 1, Some(ifindex)).unwrap();
        let inner = Ip4 { tos: 0x10, ..Ip4::new(CLIENT_IP, VIP, 6) }.packet(&tcp(43000, PORT, TCP_SYN));
        let frame = Frame::new(NODE_MAC, CLIENT_MAC, ETH_P_IPV4, inner.clone());
        let expected = Frame::new(gw_mac, NODE_MAC, ETH_P_IPV4, ipip(NODE_IP, far, &inner));
        let out = run(&dp, &frame.bytes());
        assert_eq!(xdp::name(out.action), "XDP_TX");
        assert_eq!(out.frame, expected.bytes());
        assert_eq!(tests::frames::inet_checksum(&out.frame[14..34]), 0, "outer checksum");
        assert_eq!(dp.maps().counter(Reason::ForwardedIpip).unwrap(), 1);

        // Too big once encapsulated: 1500 bytes of IPv4 on a 1500-byte MTU.
        let big_inner = Ip4::new(CLIENT_IP, VIP, 6).packet(&[tcp(43001, PORT, TCP_ACK), vec![0xab; 1460]].concat());
        assert_eq!(big_inner.len(), 1500);
        let big = Frame::new(NODE_MAC, CLIENT_MAC, ETH_P_IPV4, big_inner.clone());
        let out = run(&dp, &big.bytes());
        assert_eq!(xdp::name(out.action), "XDP_TX", "too big: answered");
        let mut icmp = vec![3, 4, 0, 0, 0, 0];
        icmp.extend(1480u16.to_be_bytes());
        icmp.extend(&big_inner[..28]);
        let csum = tests::frames::inet_checksum(&icmp);
        icmp[2..4].copy_from_slice(&csum.to_be_bytes());
        let want = Frame::new(
            CLIENT_MAC,
            NODE_MAC,
            ETH_P_IPV4,
            Ip4 { tos: 0xc0, id: 0, frags: 0, ..Ip4::new(VIP, CLIENT_IP, 1) }.packet(&icmp),
        );
        assert_eq!(out.frame, want.bytes(), "ICMP fragmentation needed, next-hop MTU 1480");
        assert_eq!(tests::frames::inet_checksum(&out.frame[34..]), 0, "ICMP checksum");
        assert_eq!(dp.maps().counter(Reason::IpipFragNeeded).unwrap(), 1);
        let no_df = Frame::new(NODE_MAC, CLIENT_MAC, ETH_P_IPV4, {
            let mut p = big_inner.clone();
            p[6] = 0;
            p[10..12].copy_from_slice(&[0, 0]);
            let c = tests::frames::inet_checksum(&p[..20]);
            p[10..12].copy_from_slice(&c.to_be_bytes());
            p
        });
        let out = run(&dp, &no_df.bytes());
        assert_eq!(xdp::name(out.action), "XDP_DROP", "too big without DF: dropped, never to the local stack");
        assert_eq!(dp.maps().counter(Reason::IpipTooBig).unwrap(), 1);

        // The ICMP budget: at most IcmpBudget::PER_SECOND errors per CPU and second.
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
        let sent_before = dp.maps().counter(Reason::IpipFragNeeded).unwrap();
        let n = 100 * cpus + 150;
        for _ in 0..n {
            run(&dp, &big.bytes());
        }
        let sent = dp.maps().counter(Reason::IpipFragNeeded).unwrap() - sent_before;
        assert!(sent <= u64::from(vip_common::IcmpBudget::PER_SECOND) * cpus, "{sent} ICMP errors in under a second");
        assert!(dp.maps().counter(Reason::IpipTooBig).unwrap() >= n - sent, "the rest dropped");

        for (name, backend, reason) in [
            ("no route: passed intact", unroutable, Reason::IpipNoRoute),
            ("next hop not resolved yet: passed intact", unresolved, Reason::IpipNoNeigh),
        ] {
            install(&mut dp, &mut lb, &service(ForwardMode::Ipip, vec![to(backend)]));
            let before = dp.maps().counter(reason).unwrap();
            let out = run(&dp, &frame.bytes());
            assert_eq!((xdp::name(out.action), out.frame), ("XDP_PASS", frame.bytes()), "{name}");
            assert_eq!(dp.maps().counter(reason).unwrap(), before + 1, "{name}");
        }
    })
    .unwrap();
    // Forwarding off on the interface: the FIB refuses output lookups.
    lbns.sysctl("net.ipv4.conf.lb0.forwarding", "0").unwrap();
    lbns.within(|| {
        let (mut dp, mut lb) = load();
        let ifindex = vip_agent::netdev::lookup("lb0").unwrap().ifindex;
        install(&mut dp, &mut lb, &service(ForwardMode::Ipip, vec![BackendSpec::up(far, [0; 6])]));
        let frame = Frame::new(NODE_MAC, CLIENT_MAC, ETH_P_IPV4, ipv4(CLIENT_IP, VIP, 6, &tcp(43002, PORT, TCP_SYN)));
        let out = dp.runner().run_opts(Program::Vip, &frame.bytes(), 1, Some(ifindex)).unwrap();
        assert_eq!((xdp::name(out.action), out.frame), ("XDP_PASS", frame.bytes()));
        assert_eq!(dp.maps().counter(Reason::IpipForwardingDisabled).unwrap(), 1);
    })
    .unwrap();
}

/// IPIP with the next hop the agent resolved (`Netlink::nexthop`: `ip route get`, then
/// the neighbour table) kept in the backend entry: encapsulated towards that MAC with no
/// FIB lookup (the backend here has no route at all, so a lookup would pass the frame);
/// a packet larger than the entry's MTU still takes the FIB path and is answered with
/// fragmentation needed.
#[test]
fn ipip_uses_the_agent_resolved_next_hop_without_a_fib_lookup() {
    use vip_agent::netlink::{Netlink, Nexthop};
    let fib = FibLab::new().unwrap();
    let lbns = &fib.lb;
    lbns.ip(&["route", "add", "10.78.0.0/24", "via", "10.0.0.253"]).unwrap();
    lbns.within(|| {
        let ifindex = vip_agent::netdev::lookup("lb0").unwrap().ifindex;
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let resolve =
            |ip: Ipv4Addr| rt.block_on(async { Netlink::connect().unwrap().nexthop(ifindex, ip).await.unwrap() });
        let gateway = Nexthop { mac: FibLab::GATEWAY_MAC, mtu: 1500 };
        assert_eq!(resolve(FibLab::FAR), Some(gateway), "behind the gateway: its MAC, the interface's MTU");
        assert_eq!(resolve(Ipv4Addr::new(10, 78, 0, 12)), None, "gateway without a neighbour entry");
        assert_eq!(resolve(Ipv4Addr::new(192, 0, 2, 9)), None, "no route");

        let (mut dp, mut lb) = load();
        let run = |dp: &Dataplane, frame: &[u8]| dp.runner().run_opts(Program::Vip, frame, 1, Some(ifindex)).unwrap();
        let unroutable = Ipv4Addr::new(192, 0, 2, 9);
        let cached = |ip| BackendSpec { nexthop: Some(gateway), ..BackendSpec::up(ip, [0; 6]) };
        install(&mut dp, &mut lb, &service(ForwardMode::Ipip, vec![cached(unroutable)]));
        let inner = Ip4::new(CLIENT_IP, VIP, 6).packet(&tcp(43100, PORT, TCP_SYN));
        let out = run(&dp, &Frame::new(NODE_MAC, CLIENT_MAC, ETH_P_IPV4, inner.clone()).bytes());
        assert_eq!(xdp::name(out.action), "XDP_TX");
        assert_eq!(
            out.frame,
            Frame::new(FibLab::GATEWAY_MAC, NODE_MAC, ETH_P_IPV4, ipip(NODE_IP, unroutable, &inner)).bytes()
        );
        assert_eq!(dp.maps().counter(Reason::ForwardedIpip).unwrap(), 1);
        assert_eq!(dp.maps().counter(Reason::IpipNoRoute).unwrap(), 0, "no FIB lookup");

        install(&mut dp, &mut lb, &service(ForwardMode::Ipip, vec![cached(FibLab::FAR)]));
        let big_inner = Ip4::new(CLIENT_IP, VIP, 6).packet(&[tcp(43101, PORT, TCP_ACK), vec![0xab; 1460]].concat());
        let out = run(&dp, &Frame::new(NODE_MAC, CLIENT_MAC, ETH_P_IPV4, big_inner).bytes());
        assert_eq!(xdp::name(out.action), "XDP_TX", "too big for the cached MTU: the FIB answers");
        assert_eq!(dp.maps().counter(Reason::IpipFragNeeded).unwrap(), 1);
    })
    .unwrap();
}

/// IPIP keeps a tagged frame's L2: the outer header goes between the tag and the inner
/// packet, the tag (its TPID and TCI, priority bits included) as it came, the MACs
/// rewritten. An untagged frame's Ethernet header is written afresh (its own path in the
/// data plane); a tagged one's is saved and written back.
#[test]
fn ipip_keeps_the_vlan_tag_of_a_tagged_frame() {
    use vip_agent::netlink::Nexthop;
    let (mut dp, mut lb) = load();
    let far = Ipv4Addr::new(10, 77, 0, 10);
    let gateway = Nexthop { mac: [0x02, 0, 0, 0, 0, 0xfe], mtu: 1500 };
    install(
        &mut dp,
        &mut lb,
        &service(ForwardMode::Ipip, vec![BackendSpec { nexthop: Some(gateway), ..BackendSpec::up(far, [0; 6]) }]),
    );
    let inner = Ip4 { tos: 0x28, ..Ip4::new(CLIENT_IP, VIP, 6) }.packet(&tcp(43200, PORT, TCP_SYN));
    let run = |dp: &Dataplane, name: &str, frame: Frame, want: Frame| {
        let out = dp.runner().run(Program::Vip, &frame.bytes()).unwrap();
        assert_eq!((xdp::name(out.action), out.frame), ("XDP_TX", want.bytes()), "{name}");
    };
    let encapsulated = || Frame::new(gateway.mac, NODE_MAC, ETH_P_IPV4, ipip(NODE_IP, far, &inner));
    let frame = || Frame::new(NODE_MAC, CLIENT_MAC, ETH_P_IPV4, inner.clone());
    run(&dp, "untagged", frame(), encapsulated());
    run(
        &dp,
        "priority-tagged (VID 0, PCP 3): an untagged VIP's, tag kept",
        frame().vlan(ETH_P_8021Q, 0x6000),
        encapsulated().vlan(ETH_P_8021Q, 0x6000),
    );
    dp.maps_mut().set_vip(VIP, VipState::leader_until(VipState::FOREVER).on_segment(42)).unwrap();
    run(
        &dp,
        "tagged 42 for a VIP on VLAN 42: tag kept",
        frame().vlan(ETH_P_8021Q, 0xa02a),
        encapsulated().vlan(ETH_P_8021Q, 0xa02a),
    );
    assert_eq!(dp.maps().counter(Reason::ForwardedIpip).unwrap(), 3);
}

/// The flow hash is seeded per cluster: with a seed configured, flows land where the
/// seeded hash says, and a different seed moves them.
#[test]
fn the_flow_hash_is_seeded_from_the_config() {
    let (mut dp, mut lb) = load();
    let table = install(&mut dp, &mut lb, &service(ForwardMode::Dsr, (1..=5).map(backend).collect()));
    let seed = 0x5eed_cafe;
    dp.maps_mut().set_config(&Config::new(NODE_MAC, NODE_IP.octets()).with_seed(seed)).unwrap();
    let mut moved = 0;
    for i in 0..200u16 {
        let f = syn(44000 + i);
        let flow = flow_of(&f.bytes()).unwrap();
        let want = index_of(&lb, tests::frames::predict_seeded(&table, &flow, seed));
        let out = dp.test_run(Program::Vip, &f.bytes()).unwrap();
        assert_eq!(out.frame, dsr_to(&f, want), "flow {i}");
        moved += usize::from(predict(&table, &flow) != tests::frames::predict_seeded(&table, &flow, seed));
    }
    assert!(moved > 100, "the seed moved only {moved} of 200 flows");
}

/// A draining backend (apiserver not ready but still serving) takes no new flows but
/// keeps the ones pinned to it; a backend that is down loses them at once.
#[test]
fn a_draining_backend_keeps_its_flows_and_takes_no_new_ones() {
    let (mut dp, mut lb) = load();
    let table = install(&mut dp, &mut lb, &service(ForwardMode::Dsr, (1..=3).map(backend).collect()));
    // A flow on each backend, pinned.
    let mut pinned = Vec::new();
    for sport in 45000u16.. {
        let f = syn(sport);
        let owner = index_of(&lb, predict(&table, &flow_of(&f.bytes()).unwrap()));
        if owner == 2 && pinned.len() < 20 {
            dp.test_run(Program::Vip, &f.bytes()).unwrap();
            pinned.push(sport);
        }
        if pinned.len() == 20 {
            break;
        }
    }
    let draining = BackendSpec { healthy: false, draining: true, reason: HealthReason::NotReady, ..backend(2) };
    let new_table =
        lb.apply(dp.maps_mut(), &service(ForwardMode::Dsr, vec![backend(1), draining, backend(3)])).unwrap().table;
    assert!(!new_table.contains(&lb.backend_id(backend_ip(2)).unwrap()), "a draining backend leaves the table");
    for &sport in &pinned {
        let ack = tcp_frame(CLIENT_IP, sport, VIP, PORT, TCP_ACK);
        assert_eq!(dp.test_run(Program::Vip, &ack.bytes()).unwrap().frame, dsr_to(&ack, 2), "pinned flow kept");
    }
    for sport in 46000u16..46100 {
        let out = dp.test_run(Program::Vip, &syn(sport).bytes()).unwrap();
        assert_ne!(out.frame[0..6], backend_mac(2), "a new flow went to the draining backend");
    }
    let down = BackendSpec { healthy: false, reason: HealthReason::Connect, ..backend(2) };
    lb.apply(dp.maps_mut(), &service(ForwardMode::Dsr, vec![backend(1), down, backend(3)])).unwrap();
    for &sport in &pinned {
        let ack = tcp_frame(CLIENT_IP, sport, VIP, PORT, TCP_ACK);
        assert_ne!(dp.test_run(Program::Vip, &ack.bytes()).unwrap().frame[0..6], backend_mac(2), "down: re-hashed");
    }
    let id = lb.backend_id(backend_ip(2)).unwrap();
    assert_eq!(dp.maps().backend(id).unwrap().reason, HealthReason::Connect as u8);
}

/// A client that reuses the addresses and ports of a flow pinned to a backend that now
/// drains opens a new connection: its SYN is balanced afresh (the draining backend would
/// refuse it once it stops serving), and the rest of the new connection follows the new
/// pin. Found by the failover benchmark: after thousands of connections the client's
/// ports wrapped, and SYNs followed pins to the node that had just stopped.
#[test]
fn a_syn_reusing_a_flow_pinned_to_a_draining_backend_is_balanced_afresh() {
    let (mut dp, mut lb) = load();
    let table = install(&mut dp, &mut lb, &service(ForwardMode::Dsr, (1..=3).map(backend).collect()));
    let f = syn(47100);
    let b = index_of(&lb, predict(&table, &flow_of(&f.bytes()).unwrap()));
    let ack = tcp_frame(CLIENT_IP, 47100, VIP, PORT, TCP_ACK);
    check_a_syn_reusing_a_flow_pinned_to_a_draining_backend_is_balanced_afresh(
        &mut dp,
        &f.bytes(),
        &ack.bytes(),
        backend_mac(b),
        |dp, health| {
            let specs = with_health((1..=3).map(backend).collect(), usize::from(b - 1), health);
            lb.apply(dp.maps_mut(), &service(ForwardMode::Dsr, specs)).unwrap();
        },
    );
}

/// A connection balanced before its backend started draining, by a node that then lost
/// the VIP, reaches the node that took over with no pin there: it goes to the backend
/// that holds it, not to the one that now takes its slot's new flows (which would reset
/// it). Found by `a_leader_stopping_for_good_loses_no_request`, which lost one request in
/// a few hundred now and then: the new leader had drained the old one while a connection
/// the old leader served itself was still open.
#[test]
fn a_draining_backend_keeps_the_connections_this_node_never_pinned() {
    let (mut dp, mut lb) = load();
    let table = install(&mut dp, &mut lb, &service(ForwardMode::Dsr, (1..=3).map(backend).collect()));
    let b = index_of(&lb, predict(&table, &flow_of(&syn(47100).bytes()).unwrap()));
    let ports = (47100..).filter(|&p| index_of(&lb, predict(&table, &flow_of(&syn(p).bytes()).unwrap())) == b);
    check_a_draining_backend_keeps_the_connections_this_node_never_pinned(
        &mut dp,
        |port, flags| tcp_frame(CLIENT_IP, port, VIP, PORT, flags).bytes(),
        ports.take(4).collect::<Vec<_>>().try_into().unwrap(),
        backend_mac(b),
        |dp, health| {
            let specs = with_health((1..=3).map(backend).collect(), usize::from(b - 1), health);
            lb.apply(dp.maps_mut(), &service(ForwardMode::Dsr, specs)).unwrap();
        },
    );
}

/// A draining backend holds the slots it had when it started draining, whatever else
/// changes while it drains: here a backend joins, and the new-flow table moves, but a
/// connection from before the drain still reaches its holder.
#[test]
fn a_draining_backend_keeps_its_slots_while_other_backends_change() {
    let (mut dp, mut lb) = load();
    let table = install(&mut dp, &mut lb, &service(ForwardMode::Dsr, (1..=3).map(backend).collect()));
    let b = index_of(&lb, predict(&table, &flow_of(&syn(47100).bytes()).unwrap()));
    let draining = with_health((1..=3).map(backend).collect(), usize::from(b - 1), Health::Draining);
    lb.apply(dp.maps_mut(), &service(ForwardMode::Dsr, draining.clone())).unwrap();
    let joined = lb.apply(dp.maps_mut(), &service(ForwardMode::Dsr, [draining, vec![backend(4)]].concat())).unwrap();
    let port = (47100..)
        .find(|&p| {
            let flow = flow_of(&syn(p).bytes()).unwrap();
            index_of(&lb, predict(&table, &flow)) == b && index_of(&lb, predict(&joined.table, &flow)) == 4
        })
        .unwrap();
    let ack = tcp_frame(CLIENT_IP, port, VIP, PORT, TCP_ACK);
    assert_eq!(dst_mac_on_cpu(&dp, 0, &ack.bytes()), backend_mac(b).to_vec(), "the holder lost its slot");
}

/// A draining backend holds its slots for a bounded time only: once its hold is over
/// (its connections from before the drain are gone), the table is rewritten without it,
/// and a packet with no pin goes where new flows go. The balancer says when that is due.
#[test]
fn a_draining_backend_holds_its_slots_for_a_bounded_time() {
    let (mut dp, _) = load();
    let hold = Duration::from_millis(300);
    let mut lb = Balancer::new(Duration::from_millis(1)).with_hold(hold);
    let table = install(&mut dp, &mut lb, &service(ForwardMode::Dsr, (1..=3).map(backend).collect()));
    let b = index_of(&lb, predict(&table, &flow_of(&syn(47100).bytes()).unwrap()));
    let ports: Vec<u16> = (47100..)
        .filter(|&p| index_of(&lb, predict(&table, &flow_of(&syn(p).bytes()).unwrap())) == b)
        .take(2)
        .collect();
    let ack = |port| tcp_frame(CLIENT_IP, port, VIP, PORT, TCP_ACK).bytes();
    let draining =
        service(ForwardMode::Dsr, with_health((1..=3).map(backend).collect(), usize::from(b - 1), Health::Draining));
    lb.apply(dp.maps_mut(), &draining).unwrap();
    assert!(lb.expired_holds().is_empty(), "a hold just begun is over");
    assert_eq!(dst_mac_on_cpu(&dp, 0, &ack(ports[0])), backend_mac(b).to_vec(), "not held");
    std::thread::sleep(hold);
    // (The others hold the few slots Maglev moved between them when b left: see
    // `a_returning_backend_leaves_the_connections_opened_without_it_where_they_are`.)
    assert!(lb.expired_holds().contains(&backend_ip(b)), "the hold is over, and the balancer does not say so");
    assert!(lb.apply(dp.maps_mut(), &draining).unwrap().flipped, "the table was not rewritten");
    assert!(lb.expired_holds().is_empty(), "still due after the rewrite");
    assert_ne!(dst_mac_on_cpu(&dp, 0, &ack(ports[1])), backend_mac(b).to_vec(), "held after its hold");
}

/// No packet ever sees a mix of two tables. A writer flips the service between tables of
/// different backend sets *and sizes* as fast as the grace period allows, while this
/// thread runs a stream of new flows. Each verdict must be the owner of the flow's slot in
/// a table that was live at some point during that run (the generation counter brackets
/// it). Changing M makes a torn read visible: a packet that took `(active, m)` from one
/// table and slot contents from another lands on a backend no live table names there.
#[test]
fn table_flips_are_atomic_for_readers() {
    let (mut dp, _) = load();
    // Backend sets with different members, and four different prime sizes.
    let sets: [&[u8]; 4] = [&[1, 2, 3], &[4, 5, 6], &[1, 5, 7], &[2, 4, 8]];
    let sizes: Vec<u32> = (3..=M).rev().filter(|&m| vip_agent::maglev::validate_size(m).is_ok()).take(4).collect();
    let gen_spec = |g: u64| {
        let set = sets[(g % 4) as usize];
        ServiceSpec {
            m: sizes[(g % 4) as usize],
            ..service(ForwardMode::Dsr, set.iter().map(|&i| backend(i)).collect())
        }
    };
    // The owner of every slot, by backend MAC, per generation class.
    let owners: Vec<Vec<Mac>> = (0..4u64)
        .map(|g| {
            let set = sets[g as usize];
            let names: Vec<String> = set.iter().map(|&i| backend_ip(i).to_string()).collect();
            let w: Vec<_> = names.iter().map(|n| vip_agent::maglev::Weighted { name: n, weight: 1 }).collect();
            vip_agent::maglev::build(&w, sizes[g as usize])
                .unwrap()
                .iter()
                .map(|&e| backend_mac(set[e as usize]))
                .collect()
        })
        .collect();
    let owner = |g: u64, flow: &vip_common::FlowKey| {
        let t = &owners[(g % 4) as usize];
        t[(vip_common::flow_hash(flow, 0) % t.len() as u32) as usize]
    };
    let generation = AtomicU64::new(0);
    const FLIPS: u64 = 120;
    let (runner, maps) = dp.split();
    let mut lb = Balancer::new(Duration::from_millis(2));
    lb.apply(maps, &gen_spec(0)).unwrap();
    let (mut checked, mut straddled) = (0u64, 0u64);
    std::thread::scope(|s| {
        let generation = &generation;
        let gen_spec = &gen_spec;
        s.spawn(move || {
            for g in 1..=FLIPS {
                lb.apply(maps, &gen_spec(g)).unwrap();
                generation.store(g, Ordering::SeqCst);
            }
        });
        let mut i = 0u32;
        loop {
            let before = generation.load(Ordering::SeqCst);
            if before >= FLIPS {
                break;
            }
            // A fresh flow each time: a connection-table miss, so the table decides.
            let src = Ipv4Addr::from(0x0b00_0000 + i);
            let f = tcp_frame(src, 1024 + (i % 60000) as u16, VIP, PORT, TCP_SYN).bytes();
            let flow = flow_of(&f).unwrap();
            let out = runner.run(Program::Vip, &f).unwrap();
            let after = generation.load(Ordering::SeqCst);
            assert_eq!(xdp::name(out.action), "XDP_TX", "flow {i}: every packet must find a backend");
            let got: Mac = out.frame[0..6].try_into().unwrap();
            let allowed: Vec<Mac> = (before..=after + 1).map(|g| owner(g, &flow)).collect();
            assert!(
                allowed.contains(&got),
                "flow {i} (generations {before}..={after}): sent to {got:02x?}, allowed {allowed:02x?}"
            );
            checked += 1;
            straddled += u64::from(after != before);
            i += 1;
        }
    });
    assert!(checked > 1000, "only {checked} packets ran during the flips");
    eprintln!("{checked} packets checked across {FLIPS} flips ({straddled} straddled a flip)");
}

/// The per-CPU flow cache never sends a flow back to a backend the connection table no
/// longer names for it: pinned to B on CPU 0, re-pinned to another backend on CPU 1
/// while B was down, the flow stays there on CPU 0 once B is back (a backend's state
/// change invalidates every CPU's cache).
#[test]
fn a_flow_cached_on_one_cpu_follows_a_re_pin_made_on_another() {
    let (mut dp, mut lb) = load();
    let three = || vec![backend(1), backend(2), backend(3)];
    let table = install(&mut dp, &mut lb, &service(ForwardMode::Dsr, three()));
    let f = syn(47000);
    let b = index_of(&lb, predict(&table, &flow_of(&f.bytes()).unwrap()));
    let ack = tcp_frame(CLIENT_IP, 47000, VIP, PORT, TCP_ACK);
    check_a_cached_flow_follows_a_re_pin_made_on_another_cpu(
        &mut dp,
        &f.bytes(),
        &ack.bytes(),
        backend_mac(b),
        |dp, down| {
            let specs = (1..=3u8).map(|i| BackendSpec { healthy: !(down && i == b), ..backend(i) }).collect();
            lb.apply(dp.maps_mut(), &service(ForwardMode::Dsr, specs)).unwrap();
        },
    );
}

/// The agent applies all its services at once: a backend going down waits out the grace
/// period once for every service together, not once per service (with 16 VIPs that was
/// 16 waits, 170 ms with the default grace, on the runtime the election shares). Every
/// service still ends with the backend down and out of its table.
#[test]
fn several_services_wait_out_the_grace_period_once() {
    let grace = Duration::from_millis(100);
    let mut dp = Dataplane::load().expect("loading the XDP object (tests need root)");
    let mut lb = Balancer::new(grace);
    let specs = |down: bool| -> Vec<ServiceSpec> {
        (0..8u8)
            .map(|i| ServiceSpec {
                vip: Ipv4Addr::new(10, 99, 0, 1 + i).into(),
                port: PORT,
                mode: ForwardMode::Dsr,
                m: M,
                backends: vec![BackendSpec { healthy: !down, ..backend(1) }, backend(2), backend(3)],
            })
            .collect()
    };
    lb.apply_all(dp.maps_mut(), &specs(false)).unwrap();
    std::thread::sleep(grace);
    let t = std::time::Instant::now();
    let applied = lb.apply_all(dp.maps_mut(), &specs(true)).unwrap();
    let took = t.elapsed();
    assert!(took >= grace, "no grace period before marking the backend down ({took:?})");
    // Per service would be 8 graces or more; once is two plus the tables' work (a debug
    // build writing 8 tables of 65,537 slots, on a loaded CI machine: up to ~2 graces).
    assert!(took < grace * 5, "8 services took {took:?}: the grace period was waited per service");
    let down = applied[0].ids[0];
    assert!(applied.iter().all(|a| a.flipped && !a.table.contains(&down)), "a table still names the down backend");
    let flags = dp.maps().backends().unwrap().into_iter().find(|(id, _)| *id == down).unwrap().1.flags;
    assert_eq!(flags & vip_common::Backend::F_UP, 0, "the backend is not marked down");
}

/// An agent moving to tcx by DSR re-pins the flows a previous one pinned under IPIP
/// (XDP's alone) to the same backend by DSR: the tcx program then sends the flow's next
/// segment to that backend's MAC, as the table would not if it had changed since.
#[test]
fn flows_pinned_under_ipip_move_to_dsr_with_their_backend() {
    let (mut dp, mut lb) = load();
    dp.load_tcx().expect("loading the tcx program");
    // The table after the move: three backends by DSR. A flow it sends elsewhere than
    // backend 1 is pinned to backend 1 before, by IPIP.
    let mut after = Balancer::new(Duration::ZERO);
    let (mut scratch, _) = load();
    let table = after.apply(scratch.maps_mut(), &service(ForwardMode::Dsr, vec![backend(2), backend(1), backend(3)]));
    let table = table.unwrap().table;
    let sport = (41010..41100)
        .find(|&p| index_of(&after, predict(&table, &flow_of(&syn(p).bytes()).unwrap())) != 1)
        .expect("a flow the new table sends elsewhere");
    install(&mut dp, &mut lb, &service(ForwardMode::Ipip, vec![backend(1)]));
    dp.test_run(Program::Vip, &syn(sport).bytes()).unwrap();
    // The service moves to DSR with the new table (not `install`, which forgets every pin).
    lb.apply(dp.maps_mut(), &service(ForwardMode::Dsr, vec![backend(2), backend(1), backend(3)])).unwrap();
    assert_eq!(dp.maps_mut().convert_conns_mode(ForwardMode::Ipip, ForwardMode::Dsr).unwrap(), 1);
    let flow = vip_common::FlowKey::new(CLIENT_IP.octets(), VIP.octets(), sport.to_be_bytes(), PORT.to_be_bytes(), 6);
    let pin = dp.maps().conn(&flow).unwrap().expect("still pinned");
    assert_eq!((pin.mode, pin.backend_ip), (ForwardMode::Dsr as u8, backend_ip(1).octets()));
    let ack = tcp_frame(CLIENT_IP, sport, VIP, PORT, TCP_ACK);
    let out = dp.test_run(Program::Tcx, &ack.bytes()).unwrap();
    assert_eq!((out.action, out.frame), (3, dsr_to(&ack, 1)), "the next segment goes to its backend by DSR");
}

/// An agent moving to tcx without DSR forgets the flows a previous one pinned under IPIP
/// (XDP's alone), and only those: a DSR flow keeps its pin.
#[test]
fn flows_pinned_under_ipip_are_forgotten_and_only_those() {
    let (mut dp, mut lb) = load();
    // Two services of the VIP: PORT by IPIP, PORT + 1 by DSR.
    install(&mut dp, &mut lb, &service(ForwardMode::Ipip, vec![backend(1)]));
    install(&mut dp, &mut lb, &ServiceSpec { port: PORT + 1, ..service(ForwardMode::Dsr, vec![backend(1)]) });
    dp.test_run(Program::Vip, &syn(41000).bytes()).unwrap();
    dp.test_run(Program::Vip, &tcp_frame(CLIENT_IP, 41001, VIP, PORT + 1, TCP_SYN).bytes()).unwrap();
    assert_eq!(dp.maps().conn_count(), 2, "both flows pinned");
    assert_eq!(dp.maps_mut().remove_conns_with_mode(ForwardMode::Ipip).unwrap(), 1);
    assert_eq!(dp.maps().conn_count(), 1);
    let flow =
        vip_common::FlowKey::new(CLIENT_IP.octets(), VIP.octets(), 41001u16.to_be_bytes(), (PORT + 1).to_be_bytes(), 6);
    assert_eq!(dp.maps().conn(&flow).unwrap().map(|c| c.mode), Some(ForwardMode::Dsr as u8), "the DSR pin went too");
}

/// Every backend the data plane can hold may be a peer, by address and by MAC: the peer
/// map takes them all, and then a wholly different set (a full map replaced, not added
/// to). It once held 256 keys, and 130 discovered apiservers failed every table update.
#[test]
fn the_peer_map_holds_a_peer_for_every_backend_and_takes_a_new_set() {
    let (mut dp, _) = load();
    let set = |base: u8| -> std::collections::BTreeSet<PeerKey> {
        (0..vip_common::MAX_BACKENDS)
            .flat_map(|i| {
                let [_, _, a, b] = i.to_be_bytes();
                [PeerKey::ipv4([10, base, a, b]), PeerKey::mac([0x02, base, 0, 0, a, b])]
            })
            .collect()
    };
    let first = set(1);
    assert_eq!(first.len() as u32, vip_common::MAX_PEERS);
    dp.maps_mut().set_peers(&first).unwrap();
    dp.maps_mut().set_peers(&set(2)).expect("a full map takes a wholly new set");
    assert_eq!(dp.maps().peers().unwrap().len() as u32, vip_common::MAX_PEERS);
}

/// The agent's table of map layouts (what it checks a previous agent's pins against
/// before adopting them, and which maps it pins at all) lists every map of the object it
/// loads, with the object's key and value sizes and entries: a map missing from it would
/// be neither pinned nor checked, a changed value size adopted with the old one. (aya-log's
/// ring buffer and the program's global data are the program's own, never pinned.)
#[test]
fn layouts_match_the_object() {
    use vip_agent::dataplane::maps::{check_pinned_layout, LAYOUTS};
    let object = aya_obj::Object::parse(vip_agent::dataplane::object()).expect("parsing the object");
    let mut in_object: Vec<(String, u32, u32, u32)> = object
        .maps
        .iter()
        .filter(|(name, _)| !name.starts_with('.') && !name.starts_with("AYA_"))
        .map(|(name, m)| (name.clone(), m.key_size(), m.value_size(), m.max_entries()))
        .collect();
    in_object.sort();
    let mut listed: Vec<(String, u32, u32, u32)> =
        LAYOUTS.iter().map(|&(name, key, value, max)| (name.to_owned(), key, value, max)).collect();
    listed.sort();
    assert_eq!(in_object, listed, "the object's maps vs the agent's layout table");
    // And the loader pins exactly these, with these layouts.
    let pins = tests::agent::pin_dir(&format!("{}-layouts", tests::netns::unique_tag())).unwrap();
    let (dp, adopted) = Dataplane::open_pinned(&pins).expect("loading the data plane with pins");
    assert!(!adopted);
    let mut pinned: Vec<String> =
        std::fs::read_dir(&*pins).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    pinned.sort();
    assert_eq!(pinned, listed.iter().map(|l| l.0.clone()).collect::<Vec<_>>(), "maps pinned by the loader");
    for (name, ..) in LAYOUTS {
        check_pinned_layout(name, &pins.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    drop(dp);
}
