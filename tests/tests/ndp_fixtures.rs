//! Kernel fixture tests of the Neighbor Discovery responder (IPv6 VIPs): the real XDP
//! object (and the tcx program) runs on each input frame through `BPF_PROG_RUN`, with
//! map state seeded through the agent's own map layer. Each row names the input, the
//! state, and the exact verdict, counter and output frame expected; the expected
//! advertisements are built by `tests::frames` from RFC 4861, and every advertisement
//! the program sent is checked again by scapy, an implementation independent of both
//! (checksum recomputed, fields parsed).
//!
//! Needs root (CAP_BPF, CAP_NET_ADMIN) and python3-scapy (`cargo xtask setup`).

use std::{
    io::Write,
    net::{Ipv4Addr, Ipv6Addr},
    process::{Command, Stdio},
};

use tests::{
    fixture::{run_and_check, walk_fast_path, Expect, WalkFrames},
    frames::{
        icmpv6, ipv6_multicast_mac, ll_option, na_message, ns_message, solicited_node, tcp, Frame, Mac, ALL_NODES,
        ALL_NODES_MAC, ETH_P_8021Q, ETH_P_IPV6,
    },
    xdp,
};
use vip_agent::dataplane::{Dataplane, FastPath, Program};
use vip_common::{Config, Reason, VipState};

const NODE_MAC: Mac = [0x02, 0, 0, 0, 0, 0x01];
const CLIENT_MAC: Mac = [0x02, 0, 0, 0, 0, 0xc1];
const OTHER_MAC: Mac = [0x02, 0, 0, 0, 0, 0x0e];
const VIP: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x100);
const VIP2: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x101);
const CLIENT: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x10);
const OTHER: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x50);
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
/// A DAD nonce option (RFC 7527: type 14, length 1, 6 bytes), as Linux sends.
const NONCE: [u8; 8] = [14, 1, 1, 2, 3, 4, 5, 6];

// ---- setup: named map-seeding helpers -------------------------------------------------

#[derive(Clone, Copy)]
enum State {
    /// This node leads VIP (no deadline) and follows VIP2.
    Leader,
    /// This node serves VIP but does not lead it.
    Follower,
    /// This node led VIP but its deadline passed.
    LeaderExpired,
    /// Follows VIP while its agent probes for it.
    FollowerProbing,
    /// Leads VIP but no MAC is configured yet.
    LeaderNoMac,
    /// Leads VIP, which lives on VLAN 100.
    LeaderOnVlan100,
}

fn seed_vip(dp: &mut Dataplane, vip: Ipv6Addr, state: VipState) {
    dp.maps_mut().set_vip(vip, state).expect("set vip");
}

fn setup(dp: &mut Dataplane, state: State) {
    for (vip, _) in dp.maps().vips().expect("list vips") {
        dp.maps_mut().remove_vip(vip).expect("remove vip");
    }
    let mac = if matches!(state, State::LeaderNoMac) { [0; 6] } else { NODE_MAC };
    dp.maps_mut().set_config(&Config::new(mac, NODE_IP.octets())).expect("set config");
    seed_vip(dp, VIP2, VipState::follower());
    let vip_state = match state {
        State::Leader | State::LeaderNoMac => VipState::leader_until(VipState::FOREVER),
        State::Follower => VipState::follower(),
        State::LeaderExpired => VipState::leader_until(1),
        State::FollowerProbing => VipState::follower().probing(),
        State::LeaderOnVlan100 => VipState::leader_until(VipState::FOREVER).on_segment(100),
    };
    seed_vip(dp, VIP, vip_state);
}

// ---- inputs ---------------------------------------------------------------------------

/// A solicitation from the client for `target`, to its solicited-node group, with the
/// client's source link-layer option: what a host resolving the VIP sends.
fn ns_for(target: Ipv6Addr) -> Frame {
    let group = solicited_node(target);
    let msg = ns_message(target, &[&ll_option(1, CLIENT_MAC)]);
    Frame::new(ipv6_multicast_mac(group), CLIENT_MAC, ETH_P_IPV6, icmpv6(CLIENT, group, 255, &msg))
}

/// A solicitation with everything chosen by the row.
fn ns(dst_mac: Mac, src: Ipv6Addr, dst: Ipv6Addr, hop: u8, msg: &[u8]) -> Frame {
    Frame::new(dst_mac, CLIENT_MAC, ETH_P_IPV6, icmpv6(src, dst, hop, msg))
}

/// A DAD probe for `target` from `mac`, with the given options.
fn dad(mac: Mac, target: Ipv6Addr, options: &[&[u8]]) -> Frame {
    let group = solicited_node(target);
    let msg = ns_message(target, options);
    Frame::new(ipv6_multicast_mac(group), mac, ETH_P_IPV6, icmpv6(Ipv6Addr::UNSPECIFIED, group, 255, &msg))
}

/// The advertisement the leader must send to the client for `target`, field by field.
fn na_to_client(target: Ipv6Addr) -> Frame {
    Frame::new(CLIENT_MAC, NODE_MAC, ETH_P_IPV6, icmpv6(target, CLIENT, 255, &na_message(target, NODE_MAC, true)))
}

/// The advertisement answering a DAD probe: to all-nodes, Solicited clear.
fn na_to_all_nodes(target: Ipv6Addr) -> Frame {
    Frame::new(
        ALL_NODES_MAC,
        NODE_MAC,
        ETH_P_IPV6,
        icmpv6(target, ALL_NODES, 255, &na_message(target, NODE_MAC, false)),
    )
}

// ---- check ----------------------------------------------------------------------------

struct Fixture {
    name: &'static str,
    state: State,
    input: Vec<u8>,
    action: u32,
    reason: Reason,
    /// `None`: the frame must come out unchanged.
    output: Option<Vec<u8>>,
}

fn fx(
    name: &'static str,
    state: State,
    input: Vec<u8>,
    action: u32,
    reason: Reason,
    output: Option<Vec<u8>>,
) -> Fixture {
    Fixture { name, state, input, action, reason, output }
}

/// Runs one row; returns the frame the program produced.
fn check(dp: &mut Dataplane, program: Program, f: &Fixture) -> Result<Vec<u8>, String> {
    setup(dp, f.state);
    let want = Expect { action: f.action, reason: f.reason, output: f.output.clone() };
    run_and_check(dp, program, f.name, &f.input, &want)
}

fn fixture_table() -> Vec<Fixture> {
    use Reason::*;
    use State::*;
    let group = solicited_node(VIP);
    let group_mac = ipv6_multicast_mac(group);
    let sllao = ll_option(1, CLIENT_MAC);
    let with_hop = |hop| ns(group_mac, CLIENT, group, hop, &ns_message(VIP, &[&sllao])).bytes();
    let mut code1 = ns_message(VIP, &[&sllao]);
    code1[1] = 1;
    let mut short_len = icmpv6(CLIENT, group, 255, &ns_message(VIP, &[]));
    short_len[4..6].copy_from_slice(&16u16.to_be_bytes());
    let mut version4 = ns_for(VIP).bytes();
    version4[14] = 0x40;
    let tagged_na = |f: Frame| f.vlan(ETH_P_8021Q, 100).bytes();
    vec![
        fx("NS for the VIP, leader", Leader, ns_for(VIP).bytes(), xdp::TX, NsReplied, Some(na_to_client(VIP).bytes())),
        fx(
            "NS unicast to our MAC and the VIP (reachability probe), leader",
            Leader,
            ns(NODE_MAC, CLIENT, VIP, 255, &ns_message(VIP, &[&sllao])).bytes(),
            xdp::TX,
            NsReplied,
            Some(na_to_client(VIP).bytes()),
        ),
        fx(
            "NS without options, leader: the frame grows by the target option",
            Leader,
            ns(group_mac, CLIENT, group, 255, &ns_message(VIP, &[])).bytes(),
            xdp::TX,
            NsReplied,
            Some(na_to_client(VIP).bytes()),
        ),
        fx(
            "NS with a source option and a nonce, leader: the frame is cut to the NA",
            Leader,
            ns(group_mac, CLIENT, group, 255, &ns_message(VIP, &[&sllao, &NONCE])).bytes(),
            xdp::TX,
            NsReplied,
            Some(na_to_client(VIP).bytes()),
        ),
        fx(
            "DAD probe from another host, leader: answered to all-nodes, Solicited clear",
            Leader,
            dad(OTHER_MAC, VIP, &[]).bytes(),
            xdp::TX,
            NsReplied,
            Some(na_to_all_nodes(VIP).bytes()),
        ),
        fx(
            "DAD probe with a nonce (as Linux sends), leader",
            Leader,
            dad(OTHER_MAC, VIP, &[&NONCE]).bytes(),
            xdp::TX,
            NsReplied,
            Some(na_to_all_nodes(VIP).bytes()),
        ),
        fx("NS for the VIP, follower", Follower, ns_for(VIP).bytes(), xdp::DROP, NsFollowerDropped, None),
        fx("NS for the followed VIP of two", Leader, ns_for(VIP2).bytes(), xdp::DROP, NsFollowerDropped, None),
        fx(
            "NS for the VIP, leader past its deadline",
            LeaderExpired,
            ns_for(VIP).bytes(),
            xdp::DROP,
            NsFollowerDropped,
            None,
        ),
        fx(
            "DAD probe from another host while our agent probes: passed to the agent",
            FollowerProbing,
            dad(OTHER_MAC, VIP, &[]).bytes(),
            xdp::PASS,
            NsProbeWhileProbing,
            None,
        ),
        fx(
            "ordinary NS while our agent probes: still dropped",
            FollowerProbing,
            ns_for(VIP).bytes(),
            xdp::DROP,
            NsFollowerDropped,
            None,
        ),
        fx("NS for another address, leader", Leader, ns_for(OTHER).bytes(), xdp::PASS, NsNotVip, None),
        fx("NS with hop limit 64 (crossed a router), leader", Leader, with_hop(64), xdp::PASS, NdpMalformed, None),
        fx(
            "NS with code 1, leader",
            Leader,
            ns(group_mac, CLIENT, group, 255, &code1).bytes(),
            xdp::PASS,
            NdpMalformed,
            None,
        ),
        fx(
            "DAD probe to all-nodes instead of the solicited-node group",
            Leader,
            ns(ALL_NODES_MAC, Ipv6Addr::UNSPECIFIED, ALL_NODES, 255, &ns_message(VIP, &[])).bytes(),
            xdp::PASS,
            NdpMalformed,
            None,
        ),
        fx(
            "DAD probe with a nonce, then a source link-layer option",
            Leader,
            dad(OTHER_MAC, VIP, &[&NONCE, &ll_option(1, OTHER_MAC)]).bytes(),
            xdp::PASS,
            NdpMalformed,
            None,
        ),
        fx(
            "DAD probe with a source link-layer option",
            Leader,
            dad(OTHER_MAC, VIP, &[&ll_option(1, OTHER_MAC)]).bytes(),
            xdp::PASS,
            NdpMalformed,
            None,
        ),
        fx(
            "NS cut inside its target, leader",
            Leader,
            ns_for(VIP).bytes()[..14 + 40 + 20].to_vec(),
            xdp::PASS,
            NdpMalformed,
            None,
        ),
        fx(
            "NS whose payload length is below 24, leader",
            Leader,
            Frame::new(group_mac, CLIENT_MAC, ETH_P_IPV6, short_len).bytes(),
            xdp::PASS,
            NdpMalformed,
            None,
        ),
        fx(
            "NS to another host's MAC (flooded), leader",
            Leader,
            ns(OTHER_MAC, CLIENT, VIP, 255, &ns_message(VIP, &[&sllao])).bytes(),
            xdp::PASS,
            NotForUs,
            None,
        ),
        fx(
            "NS tagged VLAN 100 for the untagged VIP, leader",
            Leader,
            ns_for(VIP).vlan(ETH_P_8021Q, 100).bytes(),
            xdp::PASS,
            OtherSegment,
            None,
        ),
        fx(
            "NS tagged VLAN 100 for the VIP on VLAN 100, leader: answered on VLAN 100",
            LeaderOnVlan100,
            ns_for(VIP).vlan(ETH_P_8021Q, 100).bytes(),
            xdp::TX,
            NsReplied,
            Some(tagged_na(na_to_client(VIP))),
        ),
        fx("untagged NS for the VIP on VLAN 100", LeaderOnVlan100, ns_for(VIP).bytes(), xdp::PASS, UntaggedAtXdp, None),
        fx("NS for the VIP, leader without a MAC", LeaderNoMac, ns_for(VIP).bytes(), xdp::DROP, ArpNoConfig, None),
        fx(
            "NA for the VIP from another host: passed (the agent watches it)",
            Leader,
            Frame::new(
                ALL_NODES_MAC,
                OTHER_MAC,
                ETH_P_IPV6,
                icmpv6(VIP, ALL_NODES, 255, &na_message(VIP, OTHER_MAC, false)),
            )
            .bytes(),
            xdp::PASS,
            Ipv6Passed,
            None,
        ),
        fx(
            "echo request to the VIP: the leader's stack answers",
            Leader,
            ns(NODE_MAC, CLIENT, VIP, 64, &[128, 0, 0, 0, 0, 1, 0, 1]).bytes(),
            xdp::PASS,
            Ipv6Passed,
            None,
        ),
        fx(
            "TCP over IPv6 to an address that is not a VIP: passed",
            Leader,
            Frame::new(NODE_MAC, CLIENT_MAC, ETH_P_IPV6, tests::frames::ipv6(6, &tcp(40000, 6443, 0x02))).bytes(),
            xdp::PASS,
            Ipv6Passed,
            None,
        ),
        fx("NS with IP version 4 in an IPv6 frame", Leader, version4, xdp::PASS, Ipv6Passed, None),
        fx("IPv6 header cut short", Leader, ns_for(VIP).bytes()[..14 + 30].to_vec(), xdp::PASS, Ipv6Passed, None),
    ]
}

/// Checks each advertisement with scapy: parsed as Ethernet/IPv6/ICMPv6 NA, hop limit
/// 255, payload length 32, R clear, the target link-layer option our MAC, and the
/// checksum scapy computes equal to the one in the frame. Returns scapy's complaints.
fn scapy_verdicts(frames: &[Vec<u8>]) -> Vec<String> {
    const SCRIPT: &str = r#"
import sys
from scapy.all import Ether, IPv6, ICMPv6ND_NA, ICMPv6NDOptDstLLAddr, raw
node = sys.argv[1]
for line in sys.stdin:
    f = bytes.fromhex(line.strip())
    p = Ether(f)
    na = p.getlayer(ICMPv6ND_NA)
    if na is None or p[IPv6].hlim != 255 or p[IPv6].plen != 32 or na.R != 0:
        print("bad fields: " + p.summary()); continue
    opt = p.getlayer(ICMPv6NDOptDstLLAddr)
    if opt is None or opt.lladdr != node:
        print("bad target link-layer option: " + p.summary()); continue
    sent = na.cksum
    del na.cksum
    want = Ether(raw(p))[ICMPv6ND_NA].cksum
    print("ok" if sent == want else "checksum %#06x, scapy says %#06x" % (sent, want))
"#;
    let node = NODE_MAC.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
    let mut child = Command::new("/usr/bin/python3")
        .args(["-c", SCRIPT, &node])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 with scapy (cargo xtask setup installs python3-scapy)");
    let mut stdin = child.stdin.take().expect("stdin");
    for f in frames {
        let hex: String = f.iter().map(|b| format!("{b:02x}")).collect();
        writeln!(stdin, "{hex}").expect("write to scapy");
    }
    drop(stdin);
    let out = child.wait_with_output().expect("scapy");
    assert!(out.status.success(), "scapy failed");
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_owned).collect();
    assert_eq!(lines.len(), frames.len(), "scapy answered {lines:?}");
    lines.into_iter().filter(|l| l != "ok").collect()
}

fn run_table(program: Program) {
    let mut dp = Dataplane::load().expect("loading the XDP object (tests need root)");
    if program == Program::Tcx {
        dp.load_tcx().expect("loading the tcx program");
    }
    let table = fixture_table();
    let mut failures = Vec::new();
    let mut sent = Vec::new();
    for f in &table {
        // BPF_PROG_RUN refuses an IPv6 skb shorter than its header.
        if program == Program::Tcx && f.input.len() < 14 + 40 {
            continue;
        }
        match check(&mut dp, program, f) {
            Ok(out) if f.action == xdp::TX => sent.push(out),
            Ok(_) => {}
            Err(e) => failures.push(e),
        }
    }
    assert!(failures.is_empty(), "{} of {} fixtures failed:\n{}", failures.len(), table.len(), failures.join("\n"));
    assert!(sent.len() >= 7, "too few advertisements to check: {}", sent.len());
    let complaints = scapy_verdicts(&sent);
    assert!(complaints.is_empty(), "scapy disagrees: {complaints:?}");
}

#[test]
fn ndp_fixture_table() {
    run_table(Program::Vip);
}

/// The same rows through the tcx program, as skbs: the same verdicts, counters and
/// frames (the advertisement is resized with `bpf_skb_change_tail` there), but for the
/// runt, which BPF_PROG_RUN refuses as an skb.
#[test]
fn ndp_fixture_table_at_tcx() {
    run_table(Program::Tcx);
}

/// The Neighbor Discovery path decides from the IPv6 VIP list alone where it can, under
/// the ARP bits' rules (`VipSet6::NS_SKIP`: a follower that does not probe drops a
/// solicitation; `VipSet6::NS_ANSWER`: a leader advertises until the slot's deadline):
/// through every state change the agent's map layer makes, the list's fast path must be
/// the one that fits the state, and the program answers, passes or drops by the state,
/// the clock included.
#[test]
fn the_ns_fast_path_follows_every_state_change() {
    let mut dp = Dataplane::load().expect("loading the XDP object (tests need root)");
    setup(&mut dp, State::Follower);
    let expect = |action, reason, output: Option<Vec<u8>>| Expect { action, reason, output };
    let frames = WalkFrames {
        request: ns_for(VIP).bytes(),
        request_other: ns_for(VIP2).bytes(),
        probe: dad(OTHER_MAC, VIP, &[]).bytes(),
        answered: expect(xdp::TX, Reason::NsReplied, Some(na_to_client(VIP).bytes())),
        dropped: expect(xdp::DROP, Reason::NsFollowerDropped, None),
        probe_passed: expect(xdp::PASS, Reason::NsProbeWhileProbing, None),
        not_vip: expect(xdp::PASS, Reason::NsNotVip, None),
    };
    walk_fast_path(&mut dp, VIP.into(), VIP2.into(), &frames);
}

/// Pins of an agent from before the IPv6 VIP list have no list: the loader creates it
/// empty, and the adopting agent fills it from the Neighbor Discovery hash. An IPv6 VIP
/// it leads is adopted as it is (never rewritten without an election); missing from the
/// list, it would be neither answered nor forwarded (both read the list, as the tables
/// above show). The program is not attached here, so the IPv6 half it reaches by a tail
/// call at attach is not run: the list itself is checked.
#[test]
fn an_ipv6_vip_adopted_from_pins_without_the_list_is_listed_again() {
    let pins = tests::agent::pin_dir(&format!("{}-list6", tests::netns::unique_tag())).unwrap();
    {
        let (mut dp, adopted) = Dataplane::open_pinned(&pins).expect("loading with pins");
        assert!(!adopted);
        dp.maps_mut().set_config(&Config::new(NODE_MAC, NODE_IP.octets())).unwrap();
        dp.maps_mut().set_vip(VIP, VipState::leader_until(VipState::FOREVER)).unwrap();
    }
    // What an older agent's pins lack.
    std::fs::remove_file(pins.join(vip_common::map_names::VIP_SET6)).unwrap();
    let (mut dp, adopted) = Dataplane::open_pinned(&pins).expect("adopting the pins");
    assert!(adopted);
    assert_eq!(dp.maps().fast_path(VIP).unwrap(), None, "the list starts empty");
    dp.maps_mut().restore_vip_set6().unwrap();
    let again = "the leader's VIP is listed again, without a fast-path bit (the hash decides)";
    assert_eq!(dp.maps().fast_path(VIP).unwrap(), Some(FastPath::Lookup), "{again}");
    dp.maps_mut().restore_vip_set6().unwrap();
    assert_eq!(dp.maps().fast_path(VIP).unwrap(), Some(FastPath::Lookup), "restoring again changes nothing");
}

/// The checker itself: scapy rejects an advertisement whose checksum is off by one, so
/// the table's agreement means something.
#[test]
fn scapy_rejects_a_wrong_checksum() {
    let mut f = na_to_client(VIP).bytes();
    f[14 + 40 + 3] ^= 1;
    assert_eq!(scapy_verdicts(&[na_to_client(VIP).bytes()]), Vec::<String>::new());
    assert_eq!(scapy_verdicts(&[f]).len(), 1);
}
