//! Kernel fixture tests of the ARP responder: the real XDP object runs in the kernel on
//! each input frame through `BPF_PROG_RUN`, with map state seeded through the agent's own
//! map layer. Each row names the input, the state, and the exact verdict, counter and
//! output frame expected.
//!
//! Needs root (CAP_BPF, CAP_NET_ADMIN).

use std::net::Ipv4Addr;

use tests::{
    fixture::{run_and_check, walk_fast_path, Expect, WalkFrames},
    frames::{ipv4, ipv6, tcp, Arp, Frame, Mac, BROADCAST, ETH_P_8021AD, ETH_P_8021Q, ETH_P_IPV4, ETH_P_IPV6},
    xdp,
};
use vip_agent::dataplane::{Dataplane, Program};
use vip_common::{Config, Reason, VipState};

const NODE_MAC: Mac = [0x02, 0, 0, 0, 0, 0x01];
const CLIENT_MAC: Mac = [0x02, 0, 0, 0, 0, 0xc1];
const OTHER_MAC: Mac = [0x02, 0, 0, 0, 0, 0x0e];
const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
const VIP2: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 101);
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);
const OTHER_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 50);
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);

// ---- setup: named map-seeding helpers -------------------------------------------------

/// The map state a fixture runs against.
#[derive(Clone, Copy)]
enum State {
    /// This node leads VIP (no deadline).
    Leader,
    /// This node serves VIP but does not lead it.
    Follower,
    /// This node was leader but its deadline passed (a hung agent's fence).
    LeaderExpired,
    /// Leads VIP, follows VIP2.
    LeaderOfOne,
    /// Leads VIP but no MAC is configured yet.
    LeaderNoMac,
    /// Leads VIP, which lives on VLAN 100 of a trunk.
    LeaderOnVlan100,
    /// Follows VIP, which lives on VLAN 100.
    FollowerOnVlan100,
    /// Follows VIP while its agent probes for it before claiming it.
    FollowerProbing,
}

fn load() -> Dataplane {
    Dataplane::load().expect("loading the XDP object (tests need root)")
}

fn seed_config(dp: &mut Dataplane, mac: Mac) {
    dp.maps_mut().set_config(&Config::new(mac, NODE_IP.octets())).expect("set config");
}

fn seed_vip(dp: &mut Dataplane, vip: Ipv4Addr, state: VipState) {
    dp.maps_mut().set_vip(vip, state).expect("set vip");
}

fn clear_vips(dp: &mut Dataplane) {
    for (vip, _) in dp.maps().vips().expect("list vips") {
        dp.maps_mut().remove_vip(vip).expect("remove vip");
    }
}

fn setup(dp: &mut Dataplane, state: State) {
    clear_vips(dp);
    seed_config(dp, NODE_MAC);
    match state {
        State::Leader => seed_vip(dp, VIP, VipState::leader_until(VipState::FOREVER)),
        State::Follower => seed_vip(dp, VIP, VipState::follower()),
        // 1 ns after boot has long passed.
        State::LeaderExpired => seed_vip(dp, VIP, VipState::leader_until(1)),
        State::LeaderOfOne => {
            seed_vip(dp, VIP, VipState::leader_until(VipState::FOREVER));
            seed_vip(dp, VIP2, VipState::follower());
        }
        State::LeaderNoMac => {
            seed_config(dp, [0; 6]);
            seed_vip(dp, VIP, VipState::leader_until(VipState::FOREVER));
        }
        State::LeaderOnVlan100 => seed_vip(dp, VIP, VipState::leader_until(VipState::FOREVER).on_segment(100)),
        State::FollowerOnVlan100 => seed_vip(dp, VIP, VipState::follower().on_segment(100)),
        State::FollowerProbing => seed_vip(dp, VIP, VipState::follower().probing()),
    }
}

// ---- inputs ---------------------------------------------------------------------------

fn request_for(tpa: Ipv4Addr) -> Frame {
    Frame::arp(BROADCAST, CLIENT_MAC, &Arp::request(CLIENT_MAC, CLIENT_IP, tpa))
}

/// The reply the leader must send to `request_for(VIP)`, built field by field.
fn reply_from_node(vip: Ipv4Addr) -> Frame {
    Frame::arp(CLIENT_MAC, NODE_MAC, &Arp::reply(NODE_MAC, vip, CLIENT_MAC, CLIENT_IP))
}

fn with_arp(f: impl FnOnce(&mut Arp)) -> Vec<u8> {
    let mut arp = Arp::request(CLIENT_MAC, CLIENT_IP, VIP);
    f(&mut arp);
    Frame::arp(BROADCAST, CLIENT_MAC, &arp).bytes()
}

// ---- check ----------------------------------------------------------------------------

struct Fixture {
    name: String,
    state: State,
    input: Vec<u8>,
    action: u32,
    reason: Reason,
    /// `None`: the frame must come out unchanged.
    output: Option<Vec<u8>>,
}

fn fx(
    name: impl Into<String>,
    state: State,
    input: Vec<u8>,
    action: u32,
    reason: Reason,
    output: Option<Vec<u8>>,
) -> Fixture {
    Fixture { name: name.into(), state, input, action, reason, output }
}

fn check(dp: &mut Dataplane, program: Program, f: &Fixture) -> Result<(), String> {
    setup(dp, f.state);
    let want = Expect { action: f.action, reason: f.reason, output: f.output.clone() };
    run_and_check(dp, program, &f.name, &f.input, &want).map(drop)
}

fn fixture_table() -> Vec<Fixture> {
    use Reason::*;
    use State::*;
    let req = request_for(VIP);
    let mut t = vec![
        fx("request for the VIP, leader", Leader, req.bytes(), xdp::TX, ArpReplied, Some(reply_from_node(VIP).bytes())),
        fx(
            "request for the VIP padded to 60 bytes, leader: padding kept",
            Leader,
            req.padded(),
            xdp::TX,
            ArpReplied,
            Some(reply_from_node(VIP).padded()),
        ),
        fx("request for the VIP, follower", Follower, req.bytes(), xdp::DROP, ArpFollowerDropped, None),
        fx(
            "request for the VIP, leader past its deadline",
            LeaderExpired,
            req.bytes(),
            xdp::DROP,
            ArpFollowerDropped,
            None,
        ),
        fx("request for another IP, leader", Leader, request_for(OTHER_IP).bytes(), xdp::PASS, ArpNotVip, None),
        fx(
            "request for the led VIP of two",
            LeaderOfOne,
            req.bytes(),
            xdp::TX,
            ArpReplied,
            Some(reply_from_node(VIP).bytes()),
        ),
        fx(
            "request for the followed VIP of two",
            LeaderOfOne,
            request_for(VIP2).bytes(),
            xdp::DROP,
            ArpFollowerDropped,
            None,
        ),
        fx(
            "unicast request for the VIP (cache refresh), leader",
            Leader,
            Frame::arp(NODE_MAC, CLIENT_MAC, &Arp { tha: NODE_MAC, ..Arp::request(CLIENT_MAC, CLIENT_IP, VIP) })
                .bytes(),
            xdp::TX,
            ArpReplied,
            Some(reply_from_node(VIP).bytes()),
        ),
        fx(
            "request tagged 100 for a VIP on VLAN 100, leader: tag kept",
            LeaderOnVlan100,
            req.clone().vlan(ETH_P_8021Q, 0x2064).bytes(),
            xdp::TX,
            ArpReplied,
            Some(reply_from_node(VIP).vlan(ETH_P_8021Q, 0x2064).bytes()),
        ),
        fx(
            "request tagged 100 for a VIP on VLAN 100, follower",
            FollowerOnVlan100,
            req.clone().vlan(ETH_P_8021Q, 100).bytes(),
            xdp::DROP,
            ArpFollowerDropped,
            None,
        ),
        fx(
            "request tagged 200 for a VIP on VLAN 100: another segment, passed",
            LeaderOnVlan100,
            req.clone().vlan(ETH_P_8021Q, 200).bytes(),
            xdp::PASS,
            OtherSegment,
            None,
        ),
        fx(
            "untagged request for a VIP on VLAN 100: passed (at XDP the tag may be in metadata)",
            LeaderOnVlan100,
            req.bytes(),
            xdp::PASS,
            UntaggedAtXdp,
            None,
        ),
        fx(
            "request tagged 999 for an untagged VIP, leader: another segment, passed",
            Leader,
            req.clone().vlan(ETH_P_8021Q, 999).bytes(),
            xdp::PASS,
            OtherSegment,
            None,
        ),
        fx(
            "request tagged 999 for an untagged VIP, follower: not dropped either",
            Follower,
            req.clone().vlan(ETH_P_8021Q, 999).bytes(),
            xdp::PASS,
            OtherSegment,
            None,
        ),
        fx(
            "priority-tagged request (VID 0, PCP 5) is untagged: answered, tag kept",
            Leader,
            req.clone().vlan(ETH_P_8021Q, 0xa000).bytes(),
            xdp::TX,
            ArpReplied,
            Some(reply_from_node(VIP).vlan(ETH_P_8021Q, 0xa000).bytes()),
        ),
        fx(
            "QinQ-tagged request for an untagged VIP: another segment, passed",
            Leader,
            req.clone().vlan(ETH_P_8021AD, 10).vlan(ETH_P_8021Q, 20).bytes(),
            xdp::PASS,
            OtherSegment,
            None,
        ),
        fx(
            "request unicast to another host's MAC, leader: not ours",
            Leader,
            Frame::arp(OTHER_MAC, CLIENT_MAC, &Arp::request(CLIENT_MAC, CLIENT_IP, VIP)).bytes(),
            xdp::PASS,
            NotForUs,
            None,
        ),
        fx(
            "request unicast to another host's MAC, follower: not ours",
            Follower,
            Frame::arp(OTHER_MAC, CLIENT_MAC, &Arp::request(CLIENT_MAC, CLIENT_IP, VIP)).bytes(),
            xdp::PASS,
            NotForUs,
            None,
        ),
        fx(
            "request whose sender MAC differs from the Ethernet source: reply to the sender MAC, as Linux",
            Leader,
            Frame::arp(BROADCAST, OTHER_MAC, &Arp::request(CLIENT_MAC, CLIENT_IP, VIP)).bytes(),
            xdp::TX,
            ArpReplied,
            Some(reply_from_node(VIP).bytes()),
        ),
        fx(
            "request to a multicast MAC, leader: answered",
            Leader,
            Frame::arp([0x01, 0, 0x5e, 0, 0, 1], CLIENT_MAC, &Arp::request(CLIENT_MAC, CLIENT_IP, VIP)).bytes(),
            xdp::TX,
            ArpReplied,
            Some(reply_from_node(VIP).bytes()),
        ),
        fx(
            "three VLAN tags: not parsed, passed",
            Leader,
            req.clone().vlan(ETH_P_8021Q, 1).vlan(ETH_P_8021Q, 2).vlan(ETH_P_8021Q, 3).bytes(),
            xdp::PASS,
            NotArpPassed,
            None,
        ),
        fx(
            "gratuitous ARP request for the VIP from another node",
            Follower,
            Frame::arp(BROADCAST, OTHER_MAC, &Arp::request(OTHER_MAC, VIP, VIP)).bytes(),
            xdp::PASS,
            ArpGratuitous,
            None,
        ),
        fx(
            "gratuitous ARP request for the VIP, leader",
            Leader,
            Frame::arp(BROADCAST, OTHER_MAC, &Arp::request(OTHER_MAC, VIP, VIP)).bytes(),
            xdp::PASS,
            ArpGratuitous,
            None,
        ),
        fx(
            "gratuitous ARP reply for the VIP",
            Leader,
            Frame::arp(BROADCAST, OTHER_MAC, &Arp::reply(OTHER_MAC, VIP, BROADCAST, VIP)).bytes(),
            xdp::PASS,
            ArpNotRequest,
            None,
        ),
        fx(
            "ARP reply from another node claiming the VIP",
            Leader,
            Frame::arp(CLIENT_MAC, OTHER_MAC, &Arp::reply(OTHER_MAC, VIP, CLIENT_MAC, CLIENT_IP)).bytes(),
            xdp::PASS,
            ArpNotVip,
            None,
        ),
        fx(
            "ARP reply addressed to the VIP",
            Leader,
            Frame::arp(NODE_MAC, OTHER_MAC, &Arp::reply(OTHER_MAC, OTHER_IP, NODE_MAC, VIP)).bytes(),
            xdp::PASS,
            ArpNotRequest,
            None,
        ),
        fx("RARP-style operation 3 for the VIP", Leader, with_arp(|a| a.oper = 3), xdp::PASS, ArpNotRequest, None),
        fx(
            "ARP probe (sender 0.0.0.0) for the VIP, follower",
            Follower,
            Frame::arp(BROADCAST, OTHER_MAC, &Arp::request(OTHER_MAC, Ipv4Addr::UNSPECIFIED, VIP)).bytes(),
            xdp::DROP,
            ArpFollowerDropped,
            None,
        ),
        fx(
            "ARP probe (sender 0.0.0.0) for the VIP from another host while our agent probes: passed to it",
            FollowerProbing,
            Frame::arp(BROADCAST, OTHER_MAC, &Arp::request(OTHER_MAC, Ipv4Addr::UNSPECIFIED, VIP)).bytes(),
            xdp::PASS,
            ArpProbeWhileProbing,
            None,
        ),
        fx(
            "request for the VIP while our agent probes: still dropped",
            FollowerProbing,
            req.bytes(),
            xdp::DROP,
            ArpFollowerDropped,
            None,
        ),
        fx(
            "ARP probe (sender 0.0.0.0) for the VIP, leader defends it",
            Leader,
            Frame::arp(BROADCAST, OTHER_MAC, &Arp::request(OTHER_MAC, Ipv4Addr::UNSPECIFIED, VIP)).bytes(),
            xdp::TX,
            ArpReplied,
            Some(Frame::arp(OTHER_MAC, NODE_MAC, &Arp::reply(NODE_MAC, VIP, OTHER_MAC, Ipv4Addr::UNSPECIFIED)).bytes()),
        ),
        fx("leader without a configured MAC", LeaderNoMac, req.bytes(), xdp::DROP, ArpNoConfig, None),
        fx("wrong htype (IEEE 802)", Leader, with_arp(|a| a.htype = 6), xdp::PASS, ArpMalformed, None),
        fx("wrong ptype (IPv6)", Leader, with_arp(|a| a.ptype = 0x86dd), xdp::PASS, ArpMalformed, None),
        fx("wrong hlen (8)", Leader, with_arp(|a| a.hlen = 8), xdp::PASS, ArpMalformed, None),
        fx("wrong plen (16)", Leader, with_arp(|a| a.plen = 16), xdp::PASS, ArpMalformed, None),
        fx(
            "IPv4 TCP to the VIP, no service configured",
            Leader,
            Frame::new(NODE_MAC, CLIENT_MAC, ETH_P_IPV4, ipv4(CLIENT_IP, VIP, 6, &tcp(40000, 6443, 0x02))).bytes(),
            xdp::PASS,
            VipOtherPort,
            None,
        ),
        fx(
            "IPv6 TCP to an address that is not a VIP: passed",
            Leader,
            Frame::new(NODE_MAC, CLIENT_MAC, ETH_P_IPV6, ipv6(6, &tcp(40000, 6443, 0x02))).bytes(),
            xdp::PASS,
            Ipv6Passed,
            None,
        ),
        fx(
            "802.1Q-tagged IPv4 UDP to the untagged VIP: another segment",
            Leader,
            Frame::new(NODE_MAC, CLIENT_MAC, ETH_P_IPV4, ipv4(CLIENT_IP, VIP, 17, &[0; 8]))
                .vlan(ETH_P_8021Q, 5)
                .bytes(),
            xdp::PASS,
            OtherSegment,
            None,
        ),
        fx(
            "IPv4 UDP to the VIP",
            Leader,
            Frame::new(NODE_MAC, CLIENT_MAC, ETH_P_IPV4, ipv4(CLIENT_IP, VIP, 17, &[0; 8])).bytes(),
            xdp::PASS,
            VipNotTcp,
            None,
        ),
    ];
    // Every truncation of a request for the VIP that the kernel lets into XDP (it refuses
    // frames shorter than an Ethernet header, see `truncated_below_ethernet_header`).
    let full = req.bytes();
    assert_eq!(full.len(), 42);
    for len in 14..42 {
        t.push(fx(
            format!("request truncated to {len} bytes"),
            Leader,
            full[..len].to_vec(),
            xdp::PASS,
            ArpMalformed,
            None,
        ));
    }
    t.push(fx(
        "request of exactly 42 bytes",
        Leader,
        full.clone(),
        xdp::TX,
        ArpReplied,
        Some(reply_from_node(VIP).bytes()),
    ));
    // A VLAN-tagged request cut inside its tag: the L2 parser itself rejects it.
    let tagged = req.clone().vlan(ETH_P_8021Q, 9).bytes();
    for len in 14..18 {
        t.push(fx(
            format!("tagged request cut to {len} bytes"),
            Leader,
            tagged[..len].to_vec(),
            xdp::PASS,
            EthMalformed,
            None,
        ));
    }
    t
}

#[test]
fn arp_fixture_table() {
    let mut dp = load();
    let table = fixture_table();
    let failures: Vec<String> = table.iter().filter_map(|f| check(&mut dp, Program::Vip, f).err()).collect();
    assert!(failures.is_empty(), "{} of {} fixtures failed:\n{}", failures.len(), table.len(), failures.join("\n"));
}

/// The same table through the tcx program (`--attach tcx`), run as an skb: every row
/// gets the same verdict (in XDP's terms: `TCX_NEXT` as pass, `TC_ACT_SHOT` as drop, a
/// redirect back out as `XDP_TX`), the same counter and the same output frame. (A test
/// skb keeps its VLAN tags in the frame, as XDP sees them; tags the kernel moved into
/// the skb are the lab's `at_tcx_a_request_tagged_for_another_vlan_is_not_answered`.)
#[test]
fn arp_fixture_table_at_tcx() {
    let mut dp = load();
    dp.load_tcx().expect("loading the tcx program");
    let table = fixture_table();
    let failures: Vec<String> = table.iter().filter_map(|f| check(&mut dp, Program::Tcx, f).err()).collect();
    assert!(failures.is_empty(), "{} of {} fixtures failed:\n{}", failures.len(), table.len(), failures.join("\n"));
}

/// The VLAN companion (`vip_tcx_vlan`, at tcx beside XDP with `--vlan`) acts only on
/// frames whose tag the kernel moved into the skb: every row's frame (a test skb keeps
/// its tags in the frame, as XDP saw them) is handed on untouched and uncounted, XDP
/// having decided it already. (The frames it takes are the lab's
/// `at_xdp_vips_on_vlan_100_are_answered_with_the_tag_stripped_by_the_nic`.)
#[test]
fn the_vlan_companion_leaves_every_frame_without_a_stripped_tag_to_xdp() {
    let mut dp = load();
    dp.load_tcx().expect("loading the tcx programs");
    let total = |dp: &Dataplane| dp.maps().counters().expect("counters").iter().map(|c| c.1).sum::<u64>();
    for f in fixture_table() {
        setup(&mut dp, f.state);
        let before = total(&dp);
        let out = dp.test_run(Program::TcxVlan, &f.input).expect("BPF_PROG_RUN");
        assert_eq!((out.action, &out.frame), (xdp::PASS, &f.input), "{}", f.name);
        assert_eq!(total(&dp), before, "{}: counted", f.name);
    }
}

/// The ARP path decides from the VIP list alone where it can (`VipSet::ARP_SKIP`: a
/// follower that does not probe drops a request; `VipSet::ARP_ANSWER`: a leader answers
/// until the slot's deadline), without the VIPS hash lookup that was most of its cost.
/// Through every state change the agent's map layer makes, the list's fast path must be
/// the one that fits the state (a wrong bit drops or answers where the hash would not; a
/// missing one costs the lookup again), and the program answers, passes or drops by the
/// state, the clock included: a leader's bit past its deadline answers nothing.
#[test]
fn the_arp_fast_path_follows_every_state_change() {
    let mut dp = load();
    setup(&mut dp, State::Follower);
    let expect = |action, reason, output: Option<Vec<u8>>| Expect { action, reason, output };
    let frames = WalkFrames {
        request: request_for(VIP).bytes(),
        request_other: request_for(VIP2).bytes(),
        probe: with_arp(|a| a.spa = Ipv4Addr::UNSPECIFIED),
        answered: expect(xdp::TX, Reason::ArpReplied, Some(reply_from_node(VIP).bytes())),
        dropped: expect(xdp::DROP, Reason::ArpFollowerDropped, None),
        probe_passed: expect(xdp::PASS, Reason::ArpProbeWhileProbing, None),
        not_vip: expect(xdp::PASS, Reason::ArpNotVip, None),
    };
    walk_fast_path(&mut dp, VIP.into(), VIP2.into(), &frames);
}

/// Frames shorter than an Ethernet header never reach an XDP program (drivers drop
/// runts, and BPF_PROG_RUN refuses them with EINVAL); assert the kernel still does, so
/// the data plane's 14-byte minimum stays a kernel guarantee and not an assumption.
#[test]
fn truncated_below_ethernet_header_is_refused_by_the_kernel() {
    let dp = load();
    let full = request_for(VIP).bytes();
    for len in 0..14 {
        let res = dp.test_run(Program::Vip, &full[..len]);
        assert!(res.is_err(), "{len}-byte frame was accepted: {res:?}");
    }
}

#[test]
fn counters_add_up_to_frames_seen() {
    let mut dp = load();
    setup(&mut dp, State::LeaderOfOne);
    let sum = |dp: &Dataplane| -> u64 { dp.maps().counters().unwrap().iter().map(|(_, n)| n).sum() };
    let before = sum(&dp);
    let frames = [request_for(VIP).bytes(), request_for(VIP2).bytes(), request_for(OTHER_IP).bytes(), vec![0u8; 14]];
    for f in &frames {
        dp.test_run(Program::Vip, f).unwrap();
    }
    assert_eq!(sum(&dp) - before, frames.len() as u64);
}
