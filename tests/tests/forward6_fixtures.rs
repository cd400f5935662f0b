//! Kernel fixture tests of IPv6 VIP forwarding (DSR): the real XDP object (and the tcx
//! program) through `BPF_PROG_RUN`, map state installed by the agent's own balancer.
//! Expected output frames are built field by field; where Maglev picks the backend, the
//! expectation comes from the agent-side table and the shared flow hash over the folded
//! IPv6 tuple, so the kernel and the agent are shown to agree on where an IPv6 flow
//! lands.
//!
//! Needs root.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    time::Duration,
};

use tests::{
    fixture::{
        check_a_cached_flow_follows_a_re_pin_made_on_another_cpu,
        check_a_draining_backend_keeps_the_connections_this_node_never_pinned,
        check_a_syn_reusing_a_flow_pinned_to_a_draining_backend_is_balanced_afresh, pass, run_and_check, with_health,
        Expect,
    },
    frames::{icmpv6, predict, tcp, Frame, Mac, ETH_P_8021Q, ETH_P_IPV6, TCP_ACK, TCP_SYN},
    xdp,
};
use vip_agent::{
    balancer::{BackendSpec, Balancer, ServiceSpec},
    dataplane::{Dataplane, Program},
};
use vip_common::{Config, FlowKey6, ForwardMode, PeerKey, Reason, VipState, IPPROTO_TCP};

const NODE_MAC: Mac = [0x02, 0, 0, 0, 0, 0x01];
const CLIENT_MAC: Mac = [0x02, 0, 0, 0, 0, 0xc1];
const PEER_MAC: Mac = [0x02, 0, 0, 0, 0, 0x0e];
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x100);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x10);
const OTHER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x50);
/// The peer's own IPv6 address, the source of its VIP-path probes.
const PEER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x0e);
const PORT: u16 = 6443;
const M: u32 = 65537;

fn backend_ip(i: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 0, 10 + i)
}

fn backend_mac(i: u8) -> Mac {
    [0x02, 0, 0, 0, 0, 0x10 + i]
}

fn backend(i: u8) -> BackendSpec {
    BackendSpec::up(backend_ip(i), backend_mac(i))
}

// ---- setup ------------------------------------------------------------------------------

fn load(program: Program) -> (Dataplane, Balancer) {
    let mut dp = Dataplane::load().expect("loading the XDP object (tests need root)");
    if program == Program::Tcx {
        dp.load_tcx().expect("loading the tcx program");
    }
    dp.maps_mut().set_config(&Config::new(NODE_MAC, NODE_IP.octets())).unwrap();
    dp.maps_mut().set_vip(VIP6, VipState::leader_until(VipState::FOREVER)).unwrap();
    dp.maps_mut().set_peers(&[PeerKey::mac(PEER_MAC)].into()).unwrap();
    (dp, Balancer::new(Duration::from_millis(1)))
}

fn service(mode: ForwardMode, backends: Vec<BackendSpec>) -> ServiceSpec {
    ServiceSpec { vip: VIP6.into(), port: PORT, mode, m: M, backends }
}

/// Installs `spec` and forgets every pinned flow; returns the live table.
fn install(dp: &mut Dataplane, lb: &mut Balancer, spec: &ServiceSpec) -> Vec<u32> {
    let applied = lb.apply(dp.maps_mut(), spec).expect("apply service");
    dp.maps_mut().clear_conns().unwrap();
    applied.table
}

// ---- inputs -----------------------------------------------------------------------------

/// An IPv6 packet (hop limit 64) from `src` to `dst` carrying `payload` as `next`.
fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x60, 0, 0, 0];
    p.extend((payload.len() as u16).to_be_bytes());
    p.extend([next, 64]);
    p.extend(src.octets());
    p.extend(dst.octets());
    p.extend(payload);
    p
}

fn tcp6(src: Ipv6Addr, sport: u16, dst: Ipv6Addr, dport: u16, flags: u8) -> Frame {
    Frame::new(NODE_MAC, CLIENT_MAC, ETH_P_IPV6, ipv6(src, dst, IPPROTO_TCP, &tcp(sport, dport, flags)))
}

fn syn(sport: u16) -> Frame {
    tcp6(CLIENT6, sport, VIP6, PORT, TCP_SYN)
}

/// A client's SYN as TCP stacks send it, with options (MSS 1460): 24 bytes of TCP.
fn syn_with_options(sport: u16) -> Frame {
    let mut t = tcp(sport, PORT, TCP_SYN);
    t[12] = 0x60;
    t.extend([2, 4, 0x05, 0xb4]);
    Frame::new(NODE_MAC, CLIENT_MAC, ETH_P_IPV6, ipv6(CLIENT6, VIP6, IPPROTO_TCP, &t))
}

/// A peer's IPv6 VIP-path probe from `PEER6:sport`: a SYN without options, window
/// `PROBE6_WINDOW` (the `tcp` helper's sequence number 1).
fn probe6(sport: u16) -> Frame {
    let mut t = tcp(sport, PORT, TCP_SYN);
    t[14..16].copy_from_slice(&vip_common::PROBE6_WINDOW.to_be_bytes());
    Frame::new(NODE_MAC, CLIENT_MAC, ETH_P_IPV6, ipv6(PEER6, VIP6, IPPROTO_TCP, &t))
}

/// A leaving node's answer to a peer's IPv6 VIP-path probe (an option-less SYN from
/// `PEER6:sport`, the `tcp` helper's sequence number 1, from `PEER_MAC`): a RST from
/// VIP6:PORT acknowledging 2, sequence number 0, window `REFUSAL_WINDOW`, the TCP
/// checksum valid over the IPv6 pseudo-header, hop limit as the probe's, back to the
/// peer's MAC.
fn refusal6(sport: u16) -> Vec<u8> {
    let mut t = tcp(PORT, sport, 0x14);
    t[4..8].copy_from_slice(&0u32.to_be_bytes());
    t[8..12].copy_from_slice(&2u32.to_be_bytes());
    t[14..16].copy_from_slice(&vip_common::REFUSAL_WINDOW.to_be_bytes());
    let mut pseudo = VIP6.octets().to_vec();
    pseudo.extend(PEER6.octets());
    pseudo.extend([0, 0, 0, 20, 0, 0, 0, 6]);
    pseudo.extend(&t);
    let check = tests::frames::inet_checksum(&pseudo);
    t[16..18].copy_from_slice(&check.to_be_bytes());
    Frame::new(PEER_MAC, NODE_MAC, ETH_P_IPV6, ipv6(VIP6, PEER6, IPPROTO_TCP, &t)).bytes()
}

fn flow(sport: u16) -> FlowKey6 {
    FlowKey6::new(CLIENT6.octets(), VIP6.octets(), sport.to_be_bytes(), PORT.to_be_bytes(), IPPROTO_TCP)
}

/// An ICMPv6 Packet Too Big (MTU 1400) from a router to the VIP quoting the first
/// `cut` bytes of the VIP's answer from port `vip_port` to the client's port `sport`.
fn ptb(vip_port: u16, sport: u16, cut: usize) -> Frame {
    let mut quote = ipv6(VIP6, CLIENT6, IPPROTO_TCP, &tcp(vip_port, sport, TCP_ACK));
    quote.truncate(cut);
    let mut msg = vec![2, 0, 0, 0, 0, 0, 0x05, 0x78];
    msg.extend(quote);
    Frame::new(NODE_MAC, CLIENT_MAC, ETH_P_IPV6, icmpv6(OTHER6, VIP6, 64, &msg))
}

/// `frame` as DSR must send it to backend `i`: MACs rewritten, nothing else.
fn dsr_to(frame: &Frame, i: u8) -> Vec<u8> {
    Frame { dst: backend_mac(i), src: NODE_MAC, ..frame.clone() }.bytes()
}

fn index_of(lb: &Balancer, id: u32) -> u8 {
    (1..=9).find(|&i| lb.backend_id(backend_ip(i)) == Some(id)).expect("id of a known backend")
}

// ---- check ------------------------------------------------------------------------------

fn tx_to(frame: &Frame, i: u8) -> Expect {
    Expect { action: xdp::TX, reason: Reason::ForwardedDsr, output: Some(dsr_to(frame, i)) }
}

fn table_of(program: Program) {
    use Reason::*;
    let (mut dp, mut lb) = load(program);
    let mut failures = Vec::new();
    let mut check = |dp: &Dataplane, name: &str, input: Vec<u8>, want: Expect| {
        if let Err(e) = run_and_check(dp, program, name, &input, &want).map(drop) {
            failures.push(e);
        }
    };

    // One backend: the output is fully determined.
    install(&mut dp, &mut lb, &service(ForwardMode::Dsr, vec![backend(1)]));
    let s = syn(40000);
    check(&dp, "SYN to the IPv6 VIP, DSR", s.bytes(), tx_to(&s, 1));
    assert_eq!(dp.maps().conn6(&flow(40000)).unwrap().map(|c| c.backend_ip), Some(backend_ip(1).octets()));
    let a = tcp6(CLIENT6, 40000, VIP6, PORT, TCP_ACK);
    check(&dp, "the same flow's ACK: pinned, DSR", a.bytes(), tx_to(&a, 1));
    let tagged = syn(40001).vlan(ETH_P_8021Q, 42);
    check(&dp, "SYN tagged 42 for an untagged VIP: another segment", tagged.bytes(), pass(OtherSegment));
    check(
        &dp,
        "SYN addressed to another host's MAC: not ours",
        Frame { dst: [0x02, 0, 0, 0, 0, 0x77], ..syn(40002) }.bytes(),
        pass(NotForUs),
    );
    check(
        &dp,
        "new flow from a peer's MAC (balanced there already): delivered here",
        Frame { src: PEER_MAC, ..syn(40003) }.bytes(),
        pass(BalancedByPeer),
    );
    // This node's agent is leaving: the peers' VIP-path probes (option-less SYNs from a
    // peer's MAC) are refused, so they drain it before its VIPs leave `lo`; a client's SYN
    // the leader sent here (from the leader's MAC, with options) and the clients' own
    // are served as before.
    let mut leaving = dp.maps().config().unwrap();
    leaving.flags |= Config::F_LEAVING;
    dp.maps_mut().set_config(&leaving).unwrap();
    check(
        &dp,
        "leaving: a peer's IPv6 VIP-path probe is answered with a RST",
        Frame { src: PEER_MAC, ..probe6(40020) }.bytes(),
        Expect { action: xdp::TX, reason: ProbeRefusedLeaving, output: Some(refusal6(40020)) },
    );
    check(
        &dp,
        "leaving: an option-less client SYN from the leader's MAC (no probe's window): delivered here",
        Frame { src: PEER_MAC, ..tcp6(CLIENT6, 40025, VIP6, PORT, TCP_SYN) }.bytes(),
        pass(BalancedByPeer),
    );
    check(
        &dp,
        "leaving: a client's SYN (with options) from the leader's MAC: delivered here",
        Frame { src: PEER_MAC, ..syn_with_options(40021) }.bytes(),
        pass(BalancedByPeer),
    );
    check(
        &dp,
        "leaving: an ACK from a peer's MAC is no probe: delivered here",
        Frame { src: PEER_MAC, ..tcp6(PEER6, 40022, VIP6, PORT, TCP_ACK) }.bytes(),
        pass(BalancedByPeer),
    );
    let s = syn_with_options(40023);
    check(&dp, "leaving: a client's SYN is still forwarded", s.bytes(), tx_to(&s, 1));
    dp.maps_mut().set_config(&Config::new(NODE_MAC, NODE_IP.octets())).unwrap();
    check(
        &dp,
        "not leaving: a peer's IPv6 VIP-path probe is delivered here (the stack answers it)",
        Frame { src: PEER_MAC, ..probe6(40024) }.bytes(),
        pass(BalancedByPeer),
    );
    check(&dp, "SYN to another port of the VIP", tcp6(CLIENT6, 40004, VIP6, 22, TCP_SYN).bytes(), pass(VipOtherPort));
    check(
        &dp,
        "SYN to an address that is not a VIP",
        tcp6(CLIENT6, 40005, OTHER6, PORT, TCP_SYN).bytes(),
        pass(Ipv6Passed),
    );
    check(
        &dp,
        "UDP to the VIP: the leader's stack",
        Frame::new(NODE_MAC, CLIENT_MAC, ETH_P_IPV6, ipv6(CLIENT6, VIP6, 17, &[0; 8])).bytes(),
        pass(Ipv6Passed),
    );
    check(
        &dp,
        "a hop-by-hop header before TCP: passed",
        Frame::new(NODE_MAC, CLIENT_MAC, ETH_P_IPV6, ipv6(CLIENT6, VIP6, 0, &[6, 0, 1, 4, 0, 0, 0, 0])).bytes(),
        pass(Ipv6Passed),
    );
    check(
        &dp,
        "echo request to the VIP: the leader's stack",
        Frame::new(NODE_MAC, CLIENT_MAC, ETH_P_IPV6, icmpv6(CLIENT6, VIP6, 64, &[128, 0, 0, 0, 0, 1, 0, 1])).bytes(),
        pass(Ipv6Passed),
    );
    check(&dp, "TCP header cut short", syn(40006).bytes()[..14 + 40 + 12].to_vec(), pass(TcpMalformed));

    // Packet Too Big about the VIP's answers: to the flow's backend (path MTU discovery
    // through the VIP), whole quote or only the ports of TCP.
    let p = ptb(PORT, 40000, 80);
    check(
        &dp,
        "Packet Too Big quoting a pinned flow's answer: to its backend",
        p.bytes(),
        Expect { action: xdp::TX, reason: IcmpToBackend, output: Some(dsr_to(&p, 1)) },
    );
    let p = ptb(PORT, 40999, 44);
    check(
        &dp,
        "Packet Too Big quoting only the ports of an unpinned flow: to its Maglev backend",
        p.bytes(),
        Expect { action: xdp::TX, reason: IcmpToBackend, output: Some(dsr_to(&p, 1)) },
    );
    assert_eq!(dp.maps().conn6(&flow(40999)).unwrap(), None, "an error pinned a flow");
    let cut = ptb(PORT, 40000, 43);
    check(
        &dp,
        "Packet Too Big whose quote stops inside the ports",
        cut.bytes(),
        Expect { action: xdp::DROP, reason: IcmpQuoteTruncated, output: None },
    );
    check(&dp, "Packet Too Big quoting another port of the VIP", ptb(22, 40000, 80).bytes(), pass(VipIcmp));
    check(
        &dp,
        "Packet Too Big from a peer (it sent the error on to us, the backend)",
        Frame { src: PEER_MAC, ..ptb(PORT, 40000, 80) }.bytes(),
        pass(BalancedByPeer),
    );

    // A follower (or a leader past its deadline) balances no new flow, but honours pins.
    dp.maps_mut().set_vip(VIP6, VipState::leader_until(1)).unwrap();
    check(&dp, "new flow on a leader past its deadline: local stack", syn(40007).bytes(), pass(NotBalancing));
    check(&dp, "a pinned flow on that node: still to its backend", a.bytes(), tx_to(&a, 1));
    dp.maps_mut().set_vip(VIP6, VipState::follower()).unwrap();
    check(&dp, "new flow on a follower (the leader sent it): local stack", syn(40008).bytes(), pass(NotBalancing));
    // A deadline that passed 1 s ago with nothing rewriting it (the agent killed): still
    // balanced, for VipState::BALANCE_GRACE_NS (see forward_fixtures).
    dp.maps_mut().set_vip(VIP6, VipState::leader_until(vip_agent::clock::boot_ns() - 1_000_000_000)).unwrap();
    let late = syn(40009);
    check(&dp, "new flow 1 s past an unrenewed deadline: balanced (grace)", late.bytes(), tx_to(&late, 1));
    dp.maps_mut().set_vip(VIP6, VipState::leader_until(VipState::FOREVER)).unwrap();

    // Local mode, no healthy backend, the backend being this node.
    install(&mut dp, &mut lb, &service(ForwardMode::Local, vec![backend(1)]));
    check(&dp, "local mode", syn(40009).bytes(), pass(LocalMode));
    let down = BackendSpec { healthy: false, ..backend(1) };
    install(&mut dp, &mut lb, &service(ForwardMode::Dsr, vec![down]));
    check(&dp, "no healthy backend: local stack", syn(40010).bytes(), pass(NoBackend));
    let me = BackendSpec { local: true, ..backend(1) };
    install(&mut dp, &mut lb, &service(ForwardMode::Dsr, vec![me]));
    check(&dp, "the backend is this node: local stack", syn(40011).bytes(), pass(LocalBackend));

    // Three backends: each flow lands where the agent's table and the folded hash say.
    let table = install(&mut dp, &mut lb, &service(ForwardMode::Dsr, vec![backend(1), backend(2), backend(3)]));
    let mut seen = [0usize; 4];
    for sport in 41000..41300u16 {
        let want = index_of(&lb, predict(&table, &flow(sport).folded()));
        seen[usize::from(want)] += 1;
        let s = syn(sport);
        check(&dp, &format!("SYN from port {sport}, three backends"), s.bytes(), tx_to(&s, want));
    }
    assert!(seen[1..].iter().all(|&n| n > 50), "flows spread unevenly: {seen:?}");
    assert!(failures.is_empty(), "{} fixtures failed:\n{}", failures.len(), failures.join("\n"));
}

#[test]
fn ipv6_forwarding_fixture_table() {
    table_of(Program::Vip);
}

/// The same rows through the tcx program, as skbs.
#[test]
fn ipv6_forwarding_fixture_table_at_tcx() {
    table_of(Program::Tcx);
}

/// The per-CPU IPv6 flow cache never sends a flow back to a backend the connection table
/// no longer names for it: pinned to B and cached on CPU 0, re-pinned elsewhere on CPU 1
/// while B was down, the flow stays there on CPU 0 once B is back (a backend's state
/// change invalidates every CPU's cache of both families).
#[test]
fn an_ipv6_flow_cached_on_one_cpu_follows_a_re_pin_made_on_another() {
    let (mut dp, mut lb) = load(Program::Vip);
    let three = || vec![backend(1), backend(2), backend(3)];
    let table = install(&mut dp, &mut lb, &service(ForwardMode::Dsr, three()));
    let b = index_of(&lb, predict(&table, &flow(47000).folded()));
    let ack = tcp6(CLIENT6, 47000, VIP6, PORT, TCP_ACK);
    check_a_cached_flow_follows_a_re_pin_made_on_another_cpu(
        &mut dp,
        &syn(47000).bytes(),
        &ack.bytes(),
        backend_mac(b),
        |dp, down| {
            let specs = (1..=3u8).map(|i| BackendSpec { healthy: !(down && i == b), ..backend(i) }).collect();
            lb.apply(dp.maps_mut(), &service(ForwardMode::Dsr, specs)).unwrap();
        },
    );
}

/// An IPv6 SYN that reuses a flow pinned to a draining backend is balanced afresh, and
/// the new connection follows the new pin (as for IPv4).
#[test]
fn an_ipv6_syn_reusing_a_flow_pinned_to_a_draining_backend_is_balanced_afresh() {
    let (mut dp, mut lb) = load(Program::Vip);
    let table = install(&mut dp, &mut lb, &service(ForwardMode::Dsr, (1..=3).map(backend).collect()));
    let b = index_of(&lb, predict(&table, &flow(47100).folded()));
    let ack = tcp6(CLIENT6, 47100, VIP6, PORT, TCP_ACK);
    check_a_syn_reusing_a_flow_pinned_to_a_draining_backend_is_balanced_afresh(
        &mut dp,
        &syn(47100).bytes(),
        &ack.bytes(),
        backend_mac(b),
        |dp, health| {
            let specs = with_health((1..=3).map(backend).collect(), usize::from(b - 1), health);
            lb.apply(dp.maps_mut(), &service(ForwardMode::Dsr, specs)).unwrap();
        },
    );
}

/// IPv6 twin of `a_draining_backend_keeps_the_connections_this_node_never_pinned`.
#[test]
fn an_ipv6_draining_backend_keeps_the_connections_this_node_never_pinned() {
    let (mut dp, mut lb) = load(Program::Vip);
    let table = install(&mut dp, &mut lb, &service(ForwardMode::Dsr, (1..=3).map(backend).collect()));
    let b = index_of(&lb, predict(&table, &flow(47100).folded()));
    let ports = (47100..).filter(|&p| index_of(&lb, predict(&table, &flow(p).folded())) == b);
    check_a_draining_backend_keeps_the_connections_this_node_never_pinned(
        &mut dp,
        |port, flags| tcp6(CLIENT6, port, VIP6, PORT, flags).bytes(),
        ports.take(4).collect::<Vec<_>>().try_into().unwrap(),
        backend_mac(b),
        |dp, health| {
            let specs = with_health((1..=3).map(backend).collect(), usize::from(b - 1), health);
            lb.apply(dp.maps_mut(), &service(ForwardMode::Dsr, specs)).unwrap();
        },
    );
}

/// The IPv6 forwarding path knows its VIPs from the flat list (`VipSet6`), which the
/// agent's map layer keeps in step with the Neighbor Discovery hash: a VIP added is
/// forwarded, handed over it is still forwarded (its balancing deadline, not its ND
/// state, decides), removed it is not, and another VIP that takes its slot is.
#[test]
fn the_ipv6_vip_list_follows_the_vips() {
    let (mut dp, mut lb) = load(Program::Vip);
    install(&mut dp, &mut lb, &service(ForwardMode::Dsr, vec![backend(1)]));
    let run = |dp: &Dataplane| dp.test_run(Program::Vip, &syn(47100).bytes()).unwrap().action;
    assert_eq!(run(&dp), xdp::TX, "a VIP led: its new flow forwarded");
    dp.maps_mut().hand_over_vip(VIP6, VipState::FOREVER).unwrap();
    assert_eq!(run(&dp), xdp::TX, "handed over, balancing until its deadline");
    dp.maps_mut().remove_vip(VIP6).unwrap();
    let before = dp.maps().counter(Reason::Ipv6Passed).unwrap();
    assert_eq!(run(&dp), xdp::PASS, "removed: not a VIP any more");
    assert_eq!(dp.maps().counter(Reason::Ipv6Passed).unwrap(), before + 1);
    dp.maps_mut().set_vip(VIP6, VipState::leader_until(VipState::FOREVER)).unwrap();
    assert_eq!(run(&dp), xdp::TX, "added again, in the freed slot");
}
