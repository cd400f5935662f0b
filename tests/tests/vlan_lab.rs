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

use serde_json::json;
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
    // And the node's "NIC" does not strip either (on a veth it is the sender's choice;
    // the agent reads the receiver's setting, as it must on a NIC).
    tests::netns::run(lab.ns(0).cmd("ethtool").args(["-K", "eth0", "rxvlan", "off"])).unwrap();
    let (attached, counters, log) = on_vlan_100(lab, &[], "skb");
    assert!(log.contains("the NIC leaves VLAN tags in the frame"), "{log}");
    assert_eq!(attached, json!([xdp("skb"), companion()]));
    // Exactly once each: XDP decided the tagged requests itself (VLAN 200's on another
    // segment) and handed the untagged ones, marked, to the companion, which found them
    // on no VLAN (another segment); it took nothing else.
    assert_eq!(counters["untagged_at_xdp"], 2, "{counters}");
    assert_eq!(counters["other_segment"], 4, "{counters}");
    assert_eq!((&counters["arp_replied"], &counters["ns_replied"]), (&json!(1), &json!(1)), "{counters}");
}

/// At XDP, with the tag stripped into the skb (the veth's default, as most NICs'): XDP
/// cannot read it and passes every untagged frame for a VIP on a VLAN, marked in its
/// metadata; the tcx companion beside it reads the tag from the skb and answers on VLAN
/// 100 alone, tagged. Native XDP, as on a NIC (the metadata takes the driver's path).
#[test]
fn at_xdp_vips_on_vlan_100_are_answered_with_the_tag_stripped_by_the_nic() {
    if !tests::kernel_has_tcx() {
        return;
    }
    let lab = ApiLab::new([10, 110, 0], 1, &[0]).unwrap().with_ipv6().unwrap();
    let (attached, counters, log) = on_vlan_100(lab, &[], "native");
    assert!(log.contains("the NIC strips VLAN tags: VIP traffic on the VLAN is handled at tcx"), "{log}");
    assert_eq!(attached, json!([xdp("native"), companion()]));
    // Every request (VLAN 100, 200, untagged; ARP and NS) looked untagged at XDP and was
    // handed over once: at tcx VLAN 100's were answered, the others were on another
    // segment.
    assert_eq!(counters["untagged_at_xdp"], 6, "{counters}");
    assert_eq!(counters["other_segment"], 4, "{counters}");
    assert_eq!((&counters["arp_replied"], &counters["ns_replied"]), (&json!(1), &json!(1)), "{counters}");
}

fn xdp(mode: &str) -> serde_json::Value {
    json!({ "interface": "eth0", "hook": "xdp", "mode": mode })
}

fn companion() -> serde_json::Value {
    json!({ "interface": "eth0", "hook": "tcx", "mode": "vlan_stripped" })
}

/// At tcx, with the tag stripped into the skb (the veth's default, as most NICs'): tc
/// reads it there, and the answer leaves tagged.
#[test]
fn at_tcx_vips_on_vlan_100_are_answered_with_the_tag_stripped_by_the_nic() {
    if !tests::kernel_has_tcx() {
        return;
    }
    let lab = ApiLab::new([10, 98, 0], 1, &[0]).unwrap().with_ipv6().unwrap();
    let (attached, counters, log) = on_vlan_100(lab, &["--attach", "tcx"], "skb");
    // At tcx every tag is read: nothing to say about the NIC's stripping.
    assert!(!log.contains("strips VLAN tags") && !log.contains("leaves VLAN tags"), "{log}");
    assert_eq!(attached, json!([{ "interface": "eth0", "hook": "tcx", "mode": "ingress" }]));
    assert_eq!(counters["other_segment"], 4, "{counters}");
    assert_eq!(counters["untagged_at_xdp"], json!(null), "{counters}");
}

/// The agent with `--vlan 100` (and `extra`) on the lab's one node, an IPv4 and an IPv6
/// VIP: announced, and answered, on VLAN 100 only, with XDP in `xdp_mode` where it runs.
/// Returns what `status` says is attached, the data plane's counters and the agent's log.
fn on_vlan_100(lab: ApiLab, extra: &[&str], xdp_mode: &str) -> (serde_json::Value, serde_json::Value, String) {
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
    // The lab's agents run generic XDP (`--xdp-mode skb`); `native` swaps it.
    let args: Vec<String> = lab
        .agent_args(0, &args)
        .unwrap()
        .into_iter()
        .map(|a| if a == "skb" { xdp_mode.to_owned() } else { a })
        .collect();
    let mut agent = tests::agent::Agent::spawn(lab.ns(0), &args).unwrap();
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

    let status = lab.status(0).unwrap();
    // The veth carries XDP metadata: the mark was never refused.
    assert_eq!(status["vlan_handoff_no_metadata"], false, "{status}");
    let (exit, log) = agent.stop(libc::SIGTERM, Duration::from_secs(10)).unwrap();
    assert!(exit.success(), "{log}");
    // Stopped for good: nothing left attached at either hook (the kernel releases an
    // unpinned link from a work queue: shortly, not at once).
    let chain = || lab.ns(0).within(|| vip_agent::dataplane::tcx_ingress_programs("eth0")).unwrap().unwrap();
    assert!(wait_until(Duration::from_secs(2), || chain().is_empty()), "left at tcx: {:?}", chain());
    let link = || {
        let out = tests::netns::run(lab.ns(0).cmd("ip").args(["link", "show", "eth0"])).unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(wait_until(Duration::from_secs(2), || !link().contains("xdp")), "left at XDP: {}", link());
    (status["attached"].clone(), status["counters"].clone(), log)
}

/// `--interface eth0.100`: a VLAN device has no XDP hook of its own, so `--xdp-mode auto`
/// falls back to generic (SKB) XDP, and `status` and the metrics say so. This kernel has no
/// 8021q; a bridge, also without a native hook, stands in: the node's address moves from
/// `eth0` to `br0`, which enslaves `eth0`. The VIP is answered and served through it.
#[test]
fn on_an_interface_without_native_xdp_the_agent_falls_back_to_generic_and_says_so() {
    let lab = ApiLab::new([10, 111, 0], 1, &[0]).unwrap();
    let node = lab.ns(0);
    let addr = format!("{}/24", lab.nodes[0].ip);
    for args in [
        &["link", "add", "br0", "type", "bridge"][..],
        &["link", "set", "eth0", "master", "br0"],
        &["addr", "del", &addr, "dev", "eth0"],
        &["addr", "add", &addr, "dev", "br0"],
        &["link", "set", "br0", "up"],
    ] {
        tests::netns::run(node.cmd("ip").args(args)).unwrap();
    }
    let args: Vec<String> = lab
        .agent_args(0, &[])
        .unwrap()
        .into_iter()
        .map(|a| match a.as_str() {
            "eth0" => "br0".to_owned(),
            "skb" => "auto".to_owned(),
            _ => a,
        })
        .collect();
    let mut agent = tests::agent::Agent::spawn(node, &args).unwrap();
    lab.wait_all_healthy(0).unwrap();
    let status = lab.status(0).unwrap();
    assert_eq!(status["attached"], json!([{ "interface": "br0", "hook": "xdp", "mode": "skb" }]), "{status}");
    assert_eq!(lab.metric(0, "vip_attached{hook=\"xdp\",mode=\"skb\"}"), Some(1.0));
    let text = tests::netns::run(
        node.cmd(tests::agent::agent_bin().to_str().unwrap())
            .args(["status", "--pin-path"])
            .arg(lab.pin_path(0).unwrap()),
    )
    .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("attached  br0 at xdp (generic/SKB mode)"), "{text}");

    let (served, errors) = lab.requests(5);
    assert_eq!(served.values().sum::<usize>(), 5, "served {served:?}, errors {errors:?}");
    // ARP for the VIP is answered by the program (the kernel would not: arp_ignore).
    let (client_mac, client_ip) = (tests::netns::mac_of(lab.client_ns(), "eth0").unwrap(), lab.lab.host("cli").ip);
    let request = Frame::arp(BROADCAST, client_mac, &Arp::request(client_mac, client_ip, lab.vip)).bytes();
    let heard = exchange(&lab, ETH_P_ARP, 0, Some(request), Duration::from_millis(300));
    // (The agent's gratuitous burst may be heard too: replies of the same MAC.)
    let replies = arp_replies(&heard, lab.vip);
    let br0 = tests::netns::mac_of(node, "br0").unwrap();
    assert!(!replies.is_empty() && replies.iter().all(|m| *m == br0), "{replies:02x?}");
    let counters = &lab.status(0).unwrap()["counters"];
    assert!(counters["arp_replied"].as_u64().unwrap_or(0) >= 1, "not answered at XDP: {counters}");
    let (exit, log) = agent.stop(libc::SIGTERM, Duration::from_secs(10)).unwrap();
    assert!(exit.success(), "{log}");
}

/// A hitless restart with `--vlan` at XDP takes the pinned companion over (one
/// `vip_tcx_vlan` in the chain, not two), and still answers on VLAN 100 with the tag
/// stripped; an agent started without `--vlan` removes it.
#[test]
fn a_restart_takes_the_vlan_companion_over_and_one_without_vlan_removes_it() {
    if !tests::kernel_has_tcx() {
        return;
    }
    let lab = ApiLab::new([10, 112, 0], 1, &[0]).unwrap();
    let chain = || lab.ns(0).within(|| vip_agent::dataplane::tcx_ingress_programs("eth0")).unwrap().unwrap();
    let led = || wait_until(Duration::from_secs(5), || lab.status(0).is_ok_and(|s| s["vips"][0]["leader"] == true));
    let stop = |mut agent: tests::agent::Agent| {
        let (exit, log) = agent.stop(libc::SIGTERM, Duration::from_secs(10)).unwrap();
        assert!(exit.success(), "{log}");
    };
    let old = lab.spawn_agent(0, &["--vlan", "100", "--keep-forwarding-on-exit"]).unwrap();
    assert!(led(), "never led");
    stop(old);
    assert_eq!(chain(), ["vip_tcx_vlan"], "the companion did not outlive the agent");

    let new = lab.spawn_agent(0, &["--vlan", "100"]).unwrap();
    assert!(led(), "never led after the restart");
    assert_eq!(chain(), ["vip_tcx_vlan"], "the companion was not taken over");
    let (vip, client_ip) = (lab.vip, lab.lab.host("cli").ip);
    let client_mac = tests::netns::mac_of(lab.client_ns(), "eth0").unwrap();
    let request = Frame::arp(BROADCAST, client_mac, &Arp::request(client_mac, client_ip, vip)).bytes();
    let heard = exchange(&lab, ETH_P_ARP, 100, Some(tagged(&request, 100).into_owned()), Duration::from_millis(300));
    assert!(!arp_replies(&heard, vip).is_empty(), "not answered on VLAN 100 after the restart");
    stop(new);

    // An agent without --vlan, on a data plane left attached: the companion goes.
    let kept = lab.spawn_agent(0, &["--vlan", "100", "--keep-forwarding-on-exit"]).unwrap();
    assert!(led(), "never led");
    stop(kept);
    let untagged = lab.spawn_agent(0, &[]).unwrap();
    assert!(led(), "never led without --vlan");
    // The kernel releases an unpinned link from a work queue: shortly, not at once.
    assert!(wait_until(Duration::from_secs(2), || chain().is_empty()), "the companion outlived --vlan: {:?}", chain());
    stop(untagged);
}
