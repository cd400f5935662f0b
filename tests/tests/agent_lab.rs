//! End-to-end tests of `vip-agent run` on a node: three control-plane nodes with HTTPS
//! apiserver stand-ins, a client, vip-agent on node n1 (`--election none`, DSR, every
//! node a backend). What the client sees through the VIP, what `status` and `/metrics`
//! report, and what the host looks like after the agent stops.
//!
//! Needs root.

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::{Duration, Instant},
};

use tests::{
    agent::wait_until,
    apilab::{ApiLab, FALL, HEALTH_INTERVAL, RISE},
    netns::{capture_arp, is_garp, mac_of},
};

fn http_get_plain(ns: &tests::netns::Netns, addr: &str, path: &str) -> String {
    let (addr, path) = (addr.to_owned(), path.to_owned());
    ns.within(move || {
        let mut s = TcpStream::connect(&addr).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    })
    .unwrap()
}

#[test]
fn requests_spread_over_every_apiserver_and_are_reported() {
    let lab = ApiLab::new([10, 51, 0], 3, &[0]).unwrap();
    let _agent = lab.start_agent(0, &[]).unwrap();
    let (counts, errors) = lab.requests(150);
    assert!(errors.is_empty(), "failed requests: {errors:?}");
    for node in ["n1", "n2", "n3"] {
        let n = counts.get(node).copied().unwrap_or(0);
        assert!(n >= 20, "{node} answered {n} of 150: {counts:?}");
    }

    // status: leader, three healthy backends sharing the table, forwarded counters.
    let s = lab.status(0).unwrap();
    assert_eq!(s["vips"][0]["leader"], serde_json::json!(true), "{s}");
    let backends = s["services"][0]["backends"].as_array().unwrap();
    let share: f64 = backends.iter().map(|b| b["table_share"].as_f64().unwrap()).sum();
    assert!((share - 1.0).abs() < 1e-9, "shares add up to {share}");
    assert!(s["counters"]["forwarded_dsr"].as_u64().unwrap_or(0) > 0, "{s}");
    assert!(s["counters"]["local_backend"].as_u64().unwrap_or(0) > 0, "n1 serves its share locally: {s}");
    let table = std::process::Command::new(tests::agent::agent_bin())
        .args(["status", "--pin-path"])
        .arg(lab.pin_path(0).unwrap())
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("LEADER") && table.contains("10.51.0.12") && table.contains("up"), "{table}");

    // /metrics on the node's loopback.
    let metrics = http_get_plain(lab.ns(0), "127.0.0.1:9469", "/metrics");
    for needle in [
        "vip_is_leader{vip=\"10.51.0.100\",family=\"ipv4\"} 1",
        "vip_backend_up{backend=\"10.51.0.12\"} 1",
        "vip_packets_total{reason=\"forwarded_dsr\"}",
        "vip_backend_packets_total{backend=\"10.51.0.13\"}",
        "vip_health_check_duration_seconds_bucket",
        "vip_table_rebuilds_total",
    ] {
        assert!(metrics.contains(needle), "/metrics lacks {needle:?}:\n{metrics}");
    }
}

/// `vip_table_rebuilds_total` counts every table made live, the first ones at start-up
/// included: it equals the log's "Maglev table flipped" lines (a new-user trial found it
/// one behind them).
#[test]
fn the_rebuild_counter_counts_every_table_the_log_shows_flipped() {
    let mut lab = ApiLab::new([10, 138, 0], 3, &[0]).unwrap();
    let mut agent = lab.spawn_agent_logging(0, &[], Some("info")).unwrap();
    lab.wait_healthy_or_log(0, &mut agent).unwrap();
    lab.stop_apiserver(1);
    assert!(wait_until(Duration::from_secs(5), || lab.backend_healthy(0, 1) == Some(false)));
    // Read once the tables have settled (two reads alike), and compared with the flips
    // logged before the agent was told to stop.
    let mut rebuilds = lab.metric(0, "vip_table_rebuilds_total").expect("the counter");
    let settled = wait_until(Duration::from_secs(5), || {
        std::thread::sleep(Duration::from_millis(300));
        let again = lab.metric(0, "vip_table_rebuilds_total").expect("the counter");
        std::mem::replace(&mut rebuilds, again) == again
    });
    assert!(settled, "the tables never settled");
    let (_, log) = agent.stop(libc::SIGTERM, Duration::from_secs(5)).unwrap();
    let before_stop = log.split("stopping signal").next().unwrap_or_default();
    let flips = before_stop.matches("Maglev table flipped").count();
    assert!(flips >= 2, "a first table and one without n2: {flips}\n{log}");
    assert_eq!(rebuilds, flips as f64, "counter {rebuilds}, {flips} flips logged:\n{log}");
}

/// A backend that stays down for another reason (connection refused, then its packets
/// dropped: a timeout) shows the new reason in `status`, and the log says so too: an
/// operator reading the log is not left with the old cause (found by a new-user trial).
#[test]
fn a_down_backend_failing_for_another_reason_is_logged() {
    let mut lab = ApiLab::new([10, 139, 0], 3, &[0]).unwrap();
    let mut agent = lab.spawn_agent_logging(0, &[], Some("info")).unwrap();
    lab.wait_healthy_or_log(0, &mut agent).unwrap();
    let n2 = lab.nodes[1].ip.to_string();
    lab.stop_apiserver(1);
    let refused = wait_until(Duration::from_secs(5), || lab.backend_state(0, &n2).is_some_and(|(_, r)| r == "connect"));
    assert!(refused, "{:?}", lab.backend_state(0, &n2));
    let nft = "table inet t { chain i { type filter hook input priority 0; tcp dport 6443 drop; }; }";
    tests::netns::run(lab.ns(1).cmd("nft").arg(nft)).unwrap();
    let dropped = wait_until(Duration::from_secs(5), || lab.backend_state(0, &n2).is_some_and(|(_, r)| r == "timeout"));
    assert!(dropped, "{:?}", lab.backend_state(0, &n2));
    let (_, log) = agent.stop(libc::SIGTERM, Duration::from_secs(5)).unwrap();
    let changed = log.lines().find(|l| l.contains("backend's reason changed") && l.contains(&n2));
    let line = changed.unwrap_or_else(|| panic!("no reason change logged:\n{log}"));
    assert!(line.contains("reason=\"timeout\"") && line.contains("was=\"connect\""), "{line}");
}

/// A node whose leadership waits for its own apiserver (here by Lease election), not
/// ready when its first checks are in, says it cannot carry the VIPs yet, and why, where
/// it said it could (`status` said it could not; found by a new-user trial).
#[test]
fn settling_with_the_own_apiserver_not_ready_does_not_claim_the_node_can_lead() {
    let lab = ApiLab::new([10, 140, 0], 3, &[0]).unwrap().with_lease_api().unwrap();
    std::fs::write(lab.unready_file(0), b"").unwrap();
    let election = lab.election_args(0);
    let election: Vec<&str> = election.iter().map(String::as_str).collect();
    let mut agent = lab.spawn_agent_logging(0, &election, Some("info")).unwrap();
    let checked = wait_until(Duration::from_secs(10), || {
        lab.backend_healthy(0, 1) == Some(true)
            && lab.backend_healthy(0, 2) == Some(true)
            && lab.backend_state(0, &lab.nodes[0].ip.to_string()).is_some_and(|(_, r)| r == "not_ready")
    });
    let s = lab.status(0).unwrap();
    assert!(checked, "{s}");
    let (_, log) = agent.stop(libc::SIGTERM, Duration::from_secs(5)).unwrap();
    assert!(!log.contains("this node can carry the VIPs"), "{log}");
    let settled = log.lines().find(|l| l.contains("this node cannot carry the VIPs yet"));
    assert!(settled.is_some_and(|l| l.contains("apiserver not ready")), "{log}");
}

/// A stopped apiserver leaves the table within fall × interval + one interval, after
/// which every request succeeds without it; restarted, it comes back within
/// rise × interval + one interval. An apiserver whose /readyz fails leaves too.
#[test]
fn an_unhealthy_apiserver_leaves_the_table_in_time_and_comes_back() {
    let mut lab = ApiLab::new([10, 52, 0], 3, &[0]).unwrap();
    let _agent = lab.start_agent(0, &[]).unwrap();
    // Status polling adds up to ~30 ms per round; allow 150 ms on top of the bound.
    let out_bound = HEALTH_INTERVAL * (FALL + 1) + Duration::from_millis(150);
    let in_bound = HEALTH_INTERVAL * (RISE + 1) + Duration::from_millis(150);

    let t = Instant::now();
    lab.stop_apiserver(1);
    assert!(wait_until(Duration::from_secs(5), || lab.backend_healthy(0, 1) == Some(false)));
    let took = t.elapsed();
    assert!(took <= out_bound, "n2 left the table after {took:?}, bound {out_bound:?}");
    let (counts, errors) = lab.requests(60);
    assert!(errors.is_empty(), "requests failed with n2 out: {errors:?}");
    assert!(!counts.contains_key("n2"), "{counts:?}");

    let t = Instant::now();
    lab.start_apiserver(1).unwrap();
    assert!(wait_until(Duration::from_secs(5), || lab.backend_healthy(0, 1) == Some(true)));
    let took = t.elapsed();
    assert!(
        took <= in_bound + Duration::from_millis(300),
        "n2 came back after {took:?}, bound {in_bound:?} + start-up"
    );
    let (counts, errors) = lab.requests(90);
    assert!(errors.is_empty(), "{errors:?}");
    assert!(counts.get("n2").copied().unwrap_or(0) > 0, "n2 back but unused: {counts:?}");

    // /readyz failing (the apiserver still accepts connections) takes n3 out too.
    std::fs::write(lab.unready_file(2), b"").unwrap();
    assert!(wait_until(out_bound + Duration::from_secs(1), || lab.backend_healthy(0, 2) == Some(false)));
    let (counts, errors) = lab.requests(40);
    assert!(errors.is_empty() && !counts.contains_key("n3"), "{counts:?} {errors:?}");
    std::fs::remove_file(lab.unready_file(2)).unwrap();
    assert!(wait_until(in_bound + Duration::from_secs(1), || lab.backend_healthy(0, 2) == Some(true)));

    // Every backend down: as documented, VIP traffic goes to this node's own stack. n1's
    // apiserver fails /readyz but still serves, so requests keep working through it.
    lab.stop_apiserver(1);
    lab.stop_apiserver(2);
    std::fs::write(lab.unready_file(0), b"").unwrap();
    assert!(wait_until(Duration::from_secs(5), || (0..3).all(|i| lab.backend_healthy(0, i) == Some(false))));
    let (counts, errors) = lab.requests(20);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(counts.get("n1"), Some(&20), "{counts:?}");
    assert!(lab.status(0).unwrap()["counters"]["no_backend"].as_u64().unwrap_or(0) > 0);
}

/// An agent stopped with --keep-forwarding-on-exit and a new one started in its place:
/// a continuous stream of requests through the VIP sees no failure, an open connection
/// keeps working across the restart, and the new agent keeps the lead without stepping
/// down.
#[test]
fn hitless_restart_drops_no_request() {
    let lab = ApiLab::new([10, 53, 0], 3, &[0]).unwrap();
    let mut old = lab.start_agent(0, &["--keep-forwarding-on-exit"]).unwrap();
    let vip = std::net::SocketAddr::from((lab.vip, 6443));
    let client = lab.client.clone();
    let mut held = lab.client_ns().within(move || client.connect(vip)).unwrap().unwrap();
    let (_, first) = held.get("/").unwrap();

    let stream = lab.stream();
    std::thread::sleep(Duration::from_millis(500));
    let (status, log) = old.stop(libc::SIGTERM, Duration::from_secs(5)).unwrap();
    assert!(status.success(), "{log}");
    assert!(lab.ns(0).has_xdp("eth0").unwrap(), "the old agent detached despite --keep-forwarding-on-exit");
    // The gap between two agents: forwarding goes on by itself.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(held.get("/").unwrap().1, first, "open connection broke while no agent ran");
    let mut new = lab.start_agent(0, &[]).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let result = stream.stop();
    result.assert_none_failed("");
    assert!(result.total() > 50, "only {} requests ran", result.total());
    assert_eq!(held.get("/").unwrap().1, first, "open connection broke across the restart");

    let (status, log) = new.stop(libc::SIGTERM, Duration::from_secs(5)).unwrap();
    assert!(status.success(), "{log}");
    assert!(log.contains("took over"), "the new agent did not adopt the pinned link:\n{log}");
    assert!(log.contains("adopted pinned balancer state"), "{log}");
    // It adopted the lead as well: stepping down (its eligibility not known yet) stopped
    // ARP answers until it claimed the VIP again, probe included.
    assert!(!log.contains("stepped down"), "the new agent stepped down:\n{log}");
}

/// SIGTERM (without --keep-forwarding-on-exit) leaves no program, no VIP, no pin and no
/// changed sysctl behind.
#[test]
fn sigterm_leaves_nothing_behind() {
    let lab = ApiLab::new([10, 54, 0], 3, &[0]).unwrap();
    let ns = lab.ns(0);
    let sysctl = |k: &str| std::fs::read_to_string(format!("/proc/sys/net/ipv4/conf/{k}/arp_ignore"));
    let before = ns.within(|| sysctl("eth0").unwrap()).unwrap();
    let mut agent = lab.start_agent(0, &["--log-format", "json"]).unwrap();
    assert!(ns.addrs("lo").unwrap().contains("10.54.0.100"));
    assert_eq!(ns.within(|| sysctl("eth0").unwrap()).unwrap().trim(), "1");
    let (status, log) = agent.stop(libc::SIGTERM, Duration::from_secs(5)).unwrap();
    assert!(status.success(), "{log}");
    // --log-format json: every line is a JSON object with a message.
    for line in log.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["fields"]["message"].is_string(), "{line}");
    }
    assert!(log.contains("stopped cleanly"));
    assert!(!ns.has_xdp("eth0").unwrap(), "XDP left attached");
    assert!(!ns.addrs("lo").unwrap().contains("10.54.0.100"), "VIP left on lo");
    assert!(!lab.pin_path(0).unwrap().exists(), "pins left behind");
    assert_eq!(ns.within(|| sysctl("eth0").unwrap()).unwrap(), before, "arp_ignore not restored");
    // Nothing answers for the VIP any more.
    assert!(lab.request().is_err());
}

/// The agent announces the VIP with gratuitous ARPs when it starts, and again when its
/// link comes back up.
#[test]
fn gratuitous_arp_on_start_and_after_a_link_flap() {
    let lab = ApiLab::new([10, 55, 0], 3, &[0]).unwrap();
    let mac = mac_of(lab.ns(0), "eth0").unwrap();
    let capture = capture_arp(lab.client_ns(), "eth0", Duration::from_secs(3));
    let _agent = lab.start_agent(0, &[]).unwrap();
    let frames = capture.join().unwrap().unwrap();
    let garps = frames.iter().filter(|f| is_garp(f, lab.vip, mac)).count();
    // The burst: 3 rounds of request + reply, then a repeat at 1 s and 2 s.
    assert!(garps >= 6, "{garps} gratuitous ARPs seen on start");

    std::thread::sleep(Duration::from_secs(5)); // let the start-up repeats finish
    let capture = capture_arp(lab.client_ns(), "eth0", Duration::from_secs(2));
    lab.ns(0).ip(&["link", "set", "eth0", "down"]).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    lab.ns(0).ip(&["link", "set", "eth0", "up"]).unwrap();
    let frames = capture.join().unwrap().unwrap();
    let garps = frames.iter().filter(|f| is_garp(f, lab.vip, mac)).count();
    assert!(garps >= 2, "{garps} gratuitous ARPs after the link came back");
    // And it still serves.
    assert!(wait_until(Duration::from_secs(5), || lab.request().is_ok()));
}

/// A DSR backend whose node no longer holds the VIP (its agent was stopped) cannot accept
/// VIP traffic, even though its apiserver still passes /readyz: the VIP-path probe takes
/// it out of the table within fall x interval + interval, and no request fails after.
#[test]
fn a_backend_that_lost_the_vip_leaves_the_table() {
    let lab = ApiLab::new([10, 56, 0], 3, &[0]).unwrap();
    let _agent = lab.start_agent(0, &[]).unwrap();
    let out_bound = HEALTH_INTERVAL * (FALL + 1) + Duration::from_millis(250);
    let t = Instant::now();
    lab.ns(1).ip(&["addr", "del", "10.56.0.100/32", "dev", "lo"]).unwrap();
    assert!(wait_until(Duration::from_secs(5), || lab.backend_healthy(0, 1) == Some(false)), "n2 stayed in the table");
    let took = t.elapsed();
    assert!(took <= out_bound, "n2 left the table after {took:?}, bound {out_bound:?}");
    let (counts, errors) = lab.requests(60);
    assert!(errors.is_empty(), "{errors:?}");
    assert!(!counts.contains_key("n2"), "{counts:?}");
    // Given the VIP back, it returns.
    lab.ns(1).ip(&["addr", "add", "10.56.0.100/32", "dev", "lo"]).unwrap();
    assert!(wait_until(Duration::from_secs(5), || lab.backend_healthy(0, 1) == Some(true)), "n2 never came back");
}

/// The interface is deleted and created again (new index, here a new MAC too): the agent
/// attaches again, answers ARP with the new MAC, and its health checks (VIP-path probes
/// included) go out of the new interface.
#[test]
fn a_recreated_interface_is_attached_again() {
    let lab = ApiLab::new([10, 57, 0], 3, &[0]).unwrap();
    let _agent = lab.start_agent(0, &[]).unwrap();
    let node = lab.ns(0);
    let attached = |lab: &ApiLab| lab.metric(0, "vip_attached{hook=\"xdp\",mode=\"skb\"}");
    assert_eq!(attached(&lab), Some(1.0), "not attached at start");
    node.ip(&["link", "del", "eth0"]).unwrap();
    // Gone with its interface: the metrics no longer claim an attachment.
    assert!(wait_until(Duration::from_secs(3), || attached(&lab).is_none()), "still attached to a deleted interface");
    tests::netns::ip(&[
        "link",
        "add",
        "eth0",
        "netns",
        &node.name,
        "type",
        "veth",
        "peer",
        "name",
        "p11",
        "netns",
        &lab.lab.switch.name,
    ])
    .unwrap();
    lab.lab.switch.ip(&["link", "set", "p11", "master", "br0"]).unwrap();
    lab.lab.switch.ip(&["link", "set", "p11", "up"]).unwrap();
    node.ip(&["link", "set", "eth0", "address", "02:00:00:00:00:aa"]).unwrap();
    node.ip(&["addr", "add", "10.57.0.11/24", "dev", "eth0"]).unwrap();
    node.ip(&["link", "set", "eth0", "up"]).unwrap();

    // Until the agent has attached again the new interface has the kernel's default ARP
    // settings, and the kernel itself may answer for the VIP on `lo`: wait for the
    // attachment first, then check the answer is ours.
    assert!(
        wait_until(Duration::from_secs(10), || node.has_xdp("eth0").unwrap_or(false)),
        "no XDP program on the new eth0"
    );
    let new_mac = [0x02, 0, 0, 0, 0, 0xaa];
    assert!(
        wait_until(Duration::from_secs(5), || {
            tests::netns::arping(lab.client_ns(), "eth0", "10.57.0.100", 1, 1).is_ok_and(|m| m == vec![new_mac])
        }),
        "the VIP is not answered with the new MAC"
    );
    assert!(wait_until(Duration::from_secs(3), || attached(&lab) == Some(1.0)), "the re-attachment is not shown");
    lab.wait_all_healthy(0).unwrap();
    let (counts, errors) = lab.requests(60);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(counts.len(), 3, "{counts:?}");
}

/// On a veth the default `--xdp-mode auto` attaches in SKB mode, and the VIP is served:
/// native XDP on a veth takes the program, but every frame it sends back (`XDP_TX`: the
/// ARP answers, the DSR frames) is dropped unless the peer runs XDP as well, so the VIP
/// looked served (`status` showed the leader, its counters counted answers) and was not.
#[test]
fn on_a_veth_auto_mode_attaches_generic_xdp_and_the_vip_is_served() {
    let lab = ApiLab::new([10, 119, 0], 3, &[0]).unwrap();
    // The lab's agents run `--xdp-mode skb`; this one runs the default.
    let args: Vec<String> =
        lab.agent_args(0, &[]).unwrap().into_iter().map(|a| if a == "skb" { "auto".to_owned() } else { a }).collect();
    let mut agent = tests::agent::Agent::spawn(lab.ns(0), &args).unwrap();
    lab.wait_all_healthy(0).unwrap();
    let s = lab.status(0).unwrap();
    assert_eq!(s["attached"][0]["mode"], "skb", "{s}");
    // The live view is this agent's (its instance is the pins'), so it is shown.
    assert!(s["agent"]["instance"].as_str().is_some_and(|i| i.len() == 16), "{s}");
    let (counts, errors) = lab.requests(30);
    assert!(errors.is_empty(), "{errors:?}");
    assert!(counts.len() > 1, "not balanced over the nodes by DSR: {counts:?}");
    let (status, log) = agent.stop(libc::SIGTERM, Duration::from_secs(5)).unwrap();
    assert!(status.success(), "{log}");
    assert!(log.contains("a veth: using SKB mode"), "{log}");
}
