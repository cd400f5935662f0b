//! The host around the agent, as operators and other hosts change it: a network manager
//! removing the VIP from `lo` or resetting sysctls, a VIP that is the host's own
//! address, another host already answering for the VIP or claiming it later, a restart
//! with another VIP. One agent (`--election none`) on node n1 of the three-node lab.
//!
//! Needs root.

use std::{net::Ipv4Addr, time::Duration};

use tests::{
    agent::{run_to_exit, wait_until, Agent},
    apilab::ApiLab,
    netns::{arping, capture_arp, is_garp, mac_of},
};

fn leads(lab: &ApiLab) -> bool {
    lab.status(0).is_ok_and(|s| s["vips"][0]["leader"] == true)
}

/// `ip addr del VIP/32 dev lo` behind the agent's back (a network manager does this):
/// back within 1 s, logged, counted; requests keep working. The same for the
/// interface's `arp_ignore` reset to 0.
#[test]
fn host_state_changed_behind_the_agent_is_put_back_and_counted() {
    let lab = ApiLab::new([10, 86, 0], 3, &[0]).unwrap();
    let _agent = lab.start_agent(0, &[]).unwrap();
    let vip = lab.vip.to_string();
    lab.ns(0).ip(&["addr", "del", &format!("{vip}/32"), "dev", "lo"]).unwrap();
    let t = std::time::Instant::now();
    assert!(wait_until(Duration::from_secs(1), || lab.ns(0).addrs("lo").unwrap().contains(&vip)), "VIP not back on lo");
    eprintln!("VIP back on lo after {:?}", t.elapsed());
    assert!(wait_until(Duration::from_secs(2), || lab.metric(0, "vip_host_repairs_total{what=\"vip_address\"}")
        >= Some(1.0)));
    let (_, errors) = lab.requests(30);
    assert!(errors.is_empty(), "{errors:?}");

    lab.ns(0).sysctl("net.ipv4.conf.eth0.arp_ignore", "0").unwrap();
    let arp_ignore =
        || lab.ns(0).within(|| std::fs::read_to_string("/proc/sys/net/ipv4/conf/eth0/arp_ignore").unwrap()).unwrap();
    assert!(wait_until(Duration::from_secs(2), || arp_ignore().trim() == "1"), "arp_ignore not put back");
    assert!(wait_until(Duration::from_secs(2), || lab.metric(0, "vip_host_repairs_total{what=\"arp_sysctl\"}")
        >= Some(1.0)));
}

/// A VIP that is the interface's own address is refused at once, naming the address and
/// the interface; nothing is attached, the address is untouched, no pins are left.
#[test]
fn a_vip_that_is_the_hosts_own_address_is_refused_before_anything_changes() {
    let mut lab = ApiLab::new([10, 87, 0], 3, &[0]).unwrap();
    lab.static_backends = false;
    let own = lab.nodes[0].ip.to_string();
    let mut args = lab.agent_args(0, &[]).unwrap();
    let i = args.iter().position(|a| a == "--vip").unwrap();
    args[i + 1] = own.clone();
    let (status, log) = run_to_exit(lab.ns(0), &args, Duration::from_secs(10)).unwrap();
    assert!(!status.success());
    let first = log.lines().next().unwrap_or("");
    assert!(first.contains(&own) && first.contains("eth0"), "error should name {own} and eth0: {log}");
    assert_eq!(log.lines().filter(|l| !l.trim().is_empty()).count(), 1, "one line: {log}");
    assert!(!lab.ns(0).has_xdp("eth0").unwrap(), "XDP attached");
    assert!(lab.ns(0).addrs("eth0").unwrap().contains(&format!("{own}/24")), "the address was touched");
    assert!(!lab.pin_path(0).unwrap().exists(), "pins left");
}

/// Another host already has the VIP on its interface (and answers ARP for it): the agent
/// probes before claiming (RFC 5227), does not answer while the other host does, counts
/// and logs the conflict with the foreign MAC, and claims the VIP once it is free.
#[test]
fn a_vip_another_host_answers_for_is_not_claimed_until_it_is_free() {
    let mut lab = ApiLab::new([10, 88, 0], 3, &[0]).unwrap();
    let intruder_mac = {
        let h = lab.lab.add_host("intr", 77).unwrap();
        h.ns.ip(&["addr", "add", "10.88.0.100/24", "dev", "eth0"]).unwrap();
        h.mac
    };
    let mut agent = lab.spawn_agent(0, &[]).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || lab.metric(0, "vip_arp_conflicts_total{vip=\"10.88.0.100\"}")
            >= Some(1.0)),
        "no conflict counted"
    );
    assert!(!leads(&lab), "claimed a VIP another host answers for");
    assert_eq!(arping(lab.client_ns(), "eth0", "10.88.0.100", 3, 3).unwrap(), vec![intruder_mac; 3]);
    lab.lab.host("intr").ns.ip(&["addr", "del", "10.88.0.100/24", "dev", "eth0"]).unwrap();
    assert!(wait_until(Duration::from_secs(8), || leads(&lab)), "never claimed the VIP once it was free");
    let node_mac = mac_of(lab.ns(0), "eth0").unwrap();
    assert_eq!(arping(lab.client_ns(), "eth0", "10.88.0.100", 1, 2).unwrap(), vec![node_mac]);
    let (_, log) = agent.stop(libc::SIGTERM, Duration::from_secs(5)).unwrap();
    assert!(log.contains("02:00:00:00:00:4d"), "the foreign MAC is not in the log:\n{log}");
}

/// A gratuitous ARP request for an address from `mac`.
fn garp(mac: [u8; 6], ip: Ipv4Addr) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend(mac);
    f.extend([0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend(mac);
    f.extend(ip.octets());
    f.extend([0; 6]);
    f.extend(ip.octets());
    f
}

/// Sends `frame` from the client's eth0.
fn send_from_client(lab: &ApiLab, frame: Vec<u8>) {
    lab.client_ns()
        .within(move || {
            let dev = vip_agent::netdev::lookup("eth0").unwrap();
            vip_agent::rawsock::RawSocket::open(dev.ifindex, 0x0806, None).unwrap().send(&frame).unwrap();
        })
        .unwrap();
}

/// A foreign host claims the VIP with a gratuitous ARP while this node leads it: counted,
/// logged, and defended with one gratuitous ARP; a second claim within the defend
/// interval (RFC 5227 §2.4) is counted but not answered again.
#[test]
fn a_foreign_claim_while_leading_is_counted_and_defended_once() {
    let lab = ApiLab::new([10, 89, 0], 3, &[0]).unwrap();
    let mut agent = lab.start_agent(0, &[]).unwrap();
    assert!(wait_until(Duration::from_secs(5), || leads(&lab)));
    std::thread::sleep(Duration::from_secs(5)); // the start-up announcements are over
    let node_mac = mac_of(lab.ns(0), "eth0").unwrap();
    let foreign = [0x02, 0, 0, 0, 0, 0x99];
    let capture = capture_arp(lab.client_ns(), "eth0", Duration::from_millis(1500));
    send_from_client(&lab, garp(foreign, lab.vip));
    let frames = capture.join().unwrap().unwrap();
    let defences = frames.iter().filter(|f| is_garp(f, lab.vip, node_mac)).count();
    assert_eq!(defences, 2, "one defence (request and reply forms) expected, saw {defences} frames");
    let conflicts = "vip_arp_conflicts_total{vip=\"10.89.0.100\"}";
    assert!(wait_until(Duration::from_secs(2), || lab.metric(0, conflicts) == Some(1.0)));
    let capture = capture_arp(lab.client_ns(), "eth0", Duration::from_millis(1500));
    send_from_client(&lab, garp(foreign, lab.vip));
    let frames = capture.join().unwrap().unwrap();
    assert_eq!(frames.iter().filter(|f| is_garp(f, lab.vip, node_mac)).count(), 0, "defended twice within 10 s");
    assert!(wait_until(Duration::from_secs(2), || lab.metric(0, conflicts) == Some(2.0)));
    assert!(leads(&lab));
    let (_, log) = agent.stop(libc::SIGTERM, Duration::from_secs(5)).unwrap();
    assert!(log.contains("02:00:00:00:00:99"), "the foreign MAC is not in the log:\n{log}");
}

/// An agent restarted with another `--vip` (after `--keep-forwarding-on-exit`) serves
/// only the new one: the old VIP is no longer answered, listed or on `lo`.
#[test]
fn a_restart_with_another_vip_serves_only_the_new_one() {
    let lab = ApiLab::new([10, 90, 0], 3, &[0]).unwrap();
    let mut first = lab.start_agent(0, &["--keep-forwarding-on-exit"]).unwrap();
    assert!(wait_until(Duration::from_secs(5), || leads(&lab)));
    first.stop(libc::SIGTERM, Duration::from_secs(5)).unwrap();
    let mut args = lab.agent_args(0, &[]).unwrap();
    let i = args.iter().position(|a| a == "--vip").unwrap();
    args[i + 1] = "10.90.0.101".into();
    let _second = Agent::spawn(lab.ns(0), &args).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || lab
            .status(0)
            .is_ok_and(|s| s["vips"].as_array().is_some_and(|v| v.len() == 1 && v[0]["vip"] == "10.90.0.101"))),
        "status: {:?}",
        lab.status(0)
    );
    let s = lab.status(0).unwrap();
    let services: Vec<&str> = s["services"].as_array().unwrap().iter().filter_map(|v| v["vip"].as_str()).collect();
    assert_eq!(services, ["10.90.0.101"], "{s}");
    assert!(arping(lab.client_ns(), "eth0", "10.90.0.100", 2, 2).unwrap().is_empty(), "the old VIP is answered");
    assert!(!lab.ns(0).addrs("lo").unwrap().contains("10.90.0.100"), "the old VIP is on lo");
    assert!(wait_until(Duration::from_secs(5), || !arping(lab.client_ns(), "eth0", "10.90.0.101", 1, 1)
        .unwrap()
        .is_empty()));
}

/// Another program already on the interface's XDP hook (Cilium's acceleration, say): the
/// agent refuses at once, naming the program, and leaves it attached. Another vip-agent's
/// program (pinned elsewhere) is named as that, not as a foreign program to detach.
#[test]
fn a_foreign_xdp_program_is_named_and_left_alone() {
    for (program, prefix, named) in [
        (vip_agent::dataplane::Program::Pass, [10, 103, 0], "\"xdp_pass\""),
        (vip_agent::dataplane::Program::Vip, [10, 120, 0], "already served by another vip-agent"),
    ] {
        refused_beside(program, prefix, named);
    }
}

/// Starts an agent on an interface whose XDP hook holds `program`, attached by hand: it
/// must refuse with a first log line naming it (`named`), and leave it attached.
fn refused_beside(program: vip_agent::dataplane::Program, prefix: [u8; 3], named: &str) {
    let lab = ApiLab::new(prefix, 3, &[0]).unwrap();
    let ns = lab.ns(0).name.clone();
    let (attached_tx, attached) = std::sync::mpsc::channel();
    let (done_tx, done) = std::sync::mpsc::channel::<()>();
    let holder = std::thread::spawn(move || {
        tests::netns::enter_by_name(&ns).unwrap();
        let mut dp = vip_agent::dataplane::Dataplane::load().unwrap();
        let dev = vip_agent::netdev::lookup("eth0").unwrap();
        dp.attach(program, &dev, vip_agent::dataplane::AttachMode::Skb).unwrap();
        attached_tx.send(()).unwrap();
        let _ = done.recv();
    });
    attached.recv_timeout(Duration::from_secs(10)).unwrap();
    let args = lab.agent_args(0, &[]).unwrap();
    let (status, log) = run_to_exit(lab.ns(0), &args, Duration::from_secs(10)).unwrap();
    assert!(!status.success());
    let first = log.lines().next().unwrap_or("");
    assert!(first.contains("eth0") && first.contains(named) && first.contains("id "), "{log}");
    assert!(lab.ns(0).has_xdp("eth0").unwrap(), "the foreign program was detached");
    assert!(!lab.ns(0).addrs("lo").unwrap().contains(&lab.vip.to_string()), "the VIP was added");
    done_tx.send(()).unwrap();
    holder.join().unwrap();
}
