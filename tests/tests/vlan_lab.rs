//! VIPs on a VLAN of a trunk (`--vlan 100`): one node whose interface carries VLAN 100
//! tagged, and a client that speaks on the wire directly (this kernel has no 8021q, so
//! no VLAN devices): it sends tagged and untagged requests from a packet socket and
//! reads the answers through a socket filter that accepts one VLAN only (the kernel
//! moves a received tag out of the frame; the filter reads it where it went).
//!
//! Needs root.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use tests::{
    agent::wait_until,
    apilab::ApiLab,
    frames::{icmpv6, ipv6_multicast_mac, ll_option, ns_message, solicited_node, Arp, Frame, BROADCAST, ETH_P_IPV6},
};
use vip_agent::rawsock::{ethertype_only, on_vlan, tagged, RawSocket};

const ETH_P_ARP: u16 = 0x0806;

/// What the client hears on VLAN `vid` (0: untagged) of EtherType `ethertype` for
/// `listen`, after sending `frame`: every frame received, untagged as the kernel hands
/// them over.
fn exchange(lab: &ApiLab, ethertype: u16, vid: u16, frame: Option<Vec<u8>>, listen: Duration) -> Vec<Vec<u8>> {
    lab.client_ns()
        .within(move || {
            let dev = vip_agent::netdev::lookup("eth0").expect("the client's interface");
            let filter = on_vlan(vid, &ethertype_only(ethertype));
            let sock = RawSocket::open_filtered(dev.ifindex, &filter, Some(Duration::from_millis(20))).expect("socket");
            if let Some(f) = frame {
                sock.send(&f).expect("send");
            }
            let mut heard = Vec::new();
            let mut buf = [0u8; 256];
            let end = Instant::now() + listen;
            while Instant::now() < end {
                if let Ok(Some(n)) = sock.recv(&mut buf) {
                    heard.push(buf[..n].to_vec());
                }
            }
            heard
        })
        .expect("in the client's namespace")
}

/// ARP replies for `vip` among `frames`: the sender's MAC of each.
fn arp_replies(frames: &[Vec<u8>], vip: Ipv4Addr) -> Vec<[u8; 6]> {
    frames
        .iter()
        .filter(|f| f.len() >= 42 && f[12..14] == [8, 6] && f[20..22] == [0, 2] && f[28..32] == vip.octets())
        .map(|f| f[22..28].try_into().expect("6 bytes"))
        .collect()
}

/// Gratuitous ARPs for `vip` among `frames` (sender and target IP the VIP).
fn garps(frames: &[Vec<u8>], vip: Ipv4Addr) -> usize {
    frames
        .iter()
        .filter(|f| f.len() >= 42 && f[12..14] == [8, 6] && f[28..32] == vip.octets() && f[38..42] == vip.octets())
        .count()
}

/// Neighbor Advertisements for `vip` among `frames`.
fn advertisements(frames: &[Vec<u8>], vip: Ipv6Addr) -> usize {
    frames
        .iter()
        .filter(|f| f.len() >= 78 && f[12..14] == [0x86, 0xdd] && f[54] == 136 && f[62..78] == vip.octets())
        .count()
}

/// At XDP, with the tag in the frame. The bridge keeps a tag it forwards in the skb, not
/// in the frame, and the veth to the node would pass it on so, as a NIC that strips tags
/// does; XDP sees the frame only. So the node's port inserts the tag into the frame, as
/// a NIC with VLAN stripping off (`ethtool -K IF rxvlan off`) delivers it.
#[test]
fn vips_on_vlan_100_are_answered_and_announced_there_only() {
    let lab = ApiLab::new([10, 97, 0], 1, &[0]).unwrap().with_ipv6().unwrap();
    let port = format!("p{}", lab.nodes[0].ip.octets()[3]);
    tests::netns::run(lab.lab.switch.cmd("ethtool").args(["-K", &port, "txvlan", "off"])).unwrap();
    on_vlan_100(lab, &[]);
}

/// At tcx, with the tag stripped into the skb (the veth's default, as most NICs'): tc
/// reads it there, and the answer leaves tagged.
#[test]
fn at_tcx_vips_on_vlan_100_are_answered_with_the_tag_stripped_by_the_nic() {
    if !tests::kernel_has_tcx() {
        return;
    }
    let lab = ApiLab::new([10, 98, 0], 1, &[0]).unwrap().with_ipv6().unwrap();
    on_vlan_100(lab, &["--attach", "tcx"]);
}

/// The agent with `--vlan 100` (and `extra`) on the lab's one node, an IPv4 and an IPv6
/// VIP: announced, and answered, on VLAN 100 only.
fn on_vlan_100(lab: ApiLab, extra: &[&str]) {
    let (vip, vip6) = (lab.vip, lab.vip6);
    let node_mac = tests::netns::mac_of(lab.ns(0), "eth0").unwrap();
    let client_mac = tests::netns::mac_of(lab.client_ns(), "eth0").unwrap();
    let client_ip = lab.lab.host("cli").ip;

    // Listen on VLAN 100 and on the untagged segment while the agent starts: its
    // gratuitous ARPs go out on VLAN 100 alone.
    let lab = std::sync::Arc::new(lab);
    let (l100, l0) = (lab.clone(), lab.clone());
    // Long enough for the agent to lead and send its burst (within 5 s, as waited below).
    let on_100 = std::thread::spawn(move || exchange(&l100, ETH_P_ARP, 100, None, Duration::from_secs(6)));
    let untagged = std::thread::spawn(move || exchange(&l0, ETH_P_ARP, 0, None, Duration::from_secs(6)));
    std::thread::sleep(Duration::from_millis(300));
    let vip6_arg = vip6.to_string();
    let args: Vec<&str> = ["--vlan", "100", "--vip", &vip6_arg].into_iter().chain(extra.iter().copied()).collect();
    let mut agent = lab.spawn_agent(0, &args).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || lab.status(0).is_ok_and(|s| s["vips"][0]["leader"] == true)),
        "never led"
    );
    let (on_100, untagged) = (on_100.join().unwrap(), untagged.join().unwrap());
    assert!(garps(&on_100, vip) > 0, "no gratuitous ARP on VLAN 100");
    assert_eq!(garps(&untagged, vip), 0, "gratuitous ARP on the untagged segment");

    // The untagged listener hears untagged ARP at all: the node's own address is answered
    // there by its kernel.
    let node_ip = lab.nodes[0].ip;
    let for_node = Frame::arp(BROADCAST, client_mac, &Arp::request(client_mac, client_ip, node_ip)).bytes();
    let heard = exchange(&lab, ETH_P_ARP, 0, Some(for_node), Duration::from_millis(300));
    assert_eq!(arp_replies(&heard, node_ip), [node_mac], "the untagged listener hears nothing");

    // ARP: answered on VLAN 100 (the reply tagged 100), not untagged, not on VLAN 200.
    let request = Frame::arp(BROADCAST, client_mac, &Arp::request(client_mac, client_ip, vip)).bytes();
    for (vid, answered) in [(100u16, true), (0, false), (200, false)] {
        let heard =
            exchange(&lab, ETH_P_ARP, vid, Some(tagged(&request, vid).into_owned()), Duration::from_millis(300));
        let replies = arp_replies(&heard, vip);
        if answered {
            assert_eq!(replies, [node_mac], "ARP request on VLAN {vid}");
        } else {
            assert!(replies.is_empty(), "ARP request on VLAN {vid} answered: {replies:02x?}");
        }
    }

    // Neighbor Discovery likewise for the IPv6 VIP.
    let group = solicited_node(vip6);
    let client6 = lab.ipv6_of(2);
    let ns = icmpv6(client6, group, 255, &ns_message(vip6, &[&ll_option(1, client_mac)]));
    let ns = Frame::new(ipv6_multicast_mac(group), client_mac, ETH_P_IPV6, ns).bytes();
    for (vid, answered) in [(100u16, true), (0, false), (200, false)] {
        let heard = exchange(&lab, ETH_P_IPV6, vid, Some(tagged(&ns, vid).into_owned()), Duration::from_millis(300));
        let n = advertisements(&heard, vip6);
        assert_eq!(n > 0, answered, "NS on VLAN {vid}: {n} advertisements");
    }

    // The claim watch reads VLAN 100 only: another host announcing the VIP on VLAN 200 is
    // not a conflict, on VLAN 100 it is (counted, the foreign MAC logged).
    let claim = Frame::arp(BROADCAST, client_mac, &Arp::request(client_mac, vip, vip)).bytes();
    let conflicts = || lab.metric(0, &format!("vip_arp_conflicts_total{{vip=\"{vip}\"}}")).unwrap_or(0.0);
    exchange(&lab, ETH_P_ARP, 200, Some(tagged(&claim, 200).into_owned()), Duration::from_millis(500));
    assert_eq!(conflicts(), 0.0, "a claim on VLAN 200 taken for one on VLAN 100");
    exchange(&lab, ETH_P_ARP, 100, Some(tagged(&claim, 100).into_owned()), Duration::from_millis(100));
    assert!(wait_until(Duration::from_secs(3), || conflicts() >= 1.0), "a claim on VLAN 100 not seen");

    let counters = &lab.status(0).unwrap()["counters"];
    assert!(counters["other_segment"].as_u64().unwrap_or(0) >= 4, "{counters}");
    let (status, log) = agent.stop(libc::SIGTERM, Duration::from_secs(10)).unwrap();
    assert!(status.success(), "{log}");
}
