//! `--attach tcx`: the data plane at tcx ingress, for interfaces whose XDP hook belongs
//! to another program (Cilium's XDP acceleration). It runs first, answers and forwards
//! what is ours, and hands everything else to the next program (`TCX_NEXT`), which a
//! stand-in for Cilium's tcx program (`tcx_drop_icmp`: drops ICMP) must still see.
//!
//! Needs root.

use std::time::Duration;

use tests::{agent::wait_until, apilab::ApiLab, netns::Netns};
use vip_agent::{
    dataplane::{tcx_ingress_programs, Dataplane, Program},
    netdev,
};

/// One ping from the client to `ip`: whether it was answered within a second.
fn ping(client: &Netns, ip: std::net::Ipv4Addr) -> bool {
    client.cmd("ping").args(["-c", "1", "-W", "1", &ip.to_string()]).output().is_ok_and(|o| o.status.success())
}

/// The programs of node `i`'s eth0 tcx ingress chain, in order.
fn tcx_chain(lab: &ApiLab, i: usize) -> Vec<String> {
    lab.ns(i).within(|| tcx_ingress_programs("eth0").unwrap_or_default()).unwrap_or_default()
}

/// The data plane at tcx runs before another program's tcx program: the VIP is answered
/// and its requests spread over every apiserver by DSR, while traffic that is not ours (a
/// ping to the node's own address) reaches the program after ours. With `TC_ACT_OK`
/// instead of `TCX_NEXT` the ping would skip it and be answered.
#[test]
fn at_tcx_the_data_plane_runs_first_and_hands_everything_else_on() {
    if !tests::kernel_has_tcx() {
        return;
    }
    let lab = ApiLab::new([10, 107, 0], 3, &[0]).unwrap();
    let mut agent = lab.start_agent(0, &["--attach", "tcx"]).unwrap();
    assert!(!lab.ns(0).has_xdp("eth0").unwrap(), "--attach tcx attached XDP");
    assert_eq!(tcx_chain(&lab, 0), vec!["vip_tcx"]);
    let status = lab.status(0).unwrap();
    assert_eq!(
        status["attached"],
        serde_json::json!([{ "interface": "eth0", "hook": "tcx", "mode": "ingress" }]),
        "{status}"
    );
    assert_eq!(lab.metric(0, "vip_attached{hook=\"tcx\",mode=\"ingress\"}"), Some(1.0));
    let (counts, errors) = lab.requests(60);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(counts.len(), 3, "requests did not reach every apiserver: {counts:?}");
    let node_ip = lab.nodes[0].ip;
    assert!(ping(lab.client_ns(), node_ip), "the node does not answer ping before the stand-in is attached");

    // The stand-in for Cilium's program, after ours; it lives as long as `_cilium`.
    let _cilium = lab
        .ns(0)
        .within(|| {
            let mut dp = Dataplane::load().map_err(|e| e.to_string())?;
            let dev = netdev::lookup("eth0").map_err(|e| e.to_string())?;
            dp.attach_tcx_last(Program::TcxDropIcmp, &dev).map_err(|e| format!("{e:#}"))?;
            Ok::<_, String>(dp)
        })
        .unwrap()
        .unwrap();
    assert_eq!(tcx_chain(&lab, 0), vec!["vip_tcx", "tcx_drop_icmp"]);
    assert!(!ping(lab.client_ns(), node_ip), "a ping to the node skipped the program after ours");
    let (counts, errors) = lab.requests(60);
    assert!(errors.is_empty(), "VIP requests failed with the other program attached: {errors:?}");
    assert_eq!(counts.len(), 3, "{counts:?}");
    let arp = tests::netns::arping(lab.client_ns(), "eth0", &lab.vip.to_string(), 1, 1).unwrap();
    assert_eq!(arp, vec![tests::netns::mac_of(lab.ns(0), "eth0").unwrap()], "the VIP is not answered by the leader");

    let (status, log) = agent.stop(libc::SIGTERM, Duration::from_secs(5)).unwrap();
    assert!(status.success(), "{log}");
    assert!(log.contains("tcx detached"), "{log}");
    assert_eq!(tcx_chain(&lab, 0), vec!["tcx_drop_icmp"], "the agent left its program or took the other one");
}

/// Another program at XDP (Cilium's XDP acceleration, here `xdp_pass`) is no reason to
/// refuse with `--attach tcx`: the agent serves beside it and leaves it attached.
#[test]
fn at_tcx_another_xdp_program_is_left_alone() {
    if !tests::kernel_has_tcx() {
        return;
    }
    let lab = ApiLab::new([10, 108, 0], 3, &[0]).unwrap();
    let _foreign = lab
        .ns(0)
        .within(|| {
            let mut dp = Dataplane::load().map_err(|e| e.to_string())?;
            let dev = netdev::lookup("eth0").map_err(|e| e.to_string())?;
            dp.attach(Program::Pass, &dev, vip_agent::dataplane::AttachMode::Skb).map_err(|e| format!("{e:#}"))?;
            Ok::<_, String>(dp)
        })
        .unwrap()
        .unwrap();
    let args = lab.agent_args(0, &[]).unwrap();
    let (status, stderr) = tests::agent::run_to_exit(lab.ns(0), &args, Duration::from_secs(10)).unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("run beside it with --attach tcx"), "{stderr}");
    let mut agent = lab.start_agent(0, &["--attach", "tcx"]).unwrap();
    let (counts, errors) = lab.requests(30);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(counts.len(), 3, "{counts:?}");
    let (status, log) = agent.stop(libc::SIGTERM, Duration::from_secs(5)).unwrap();
    assert!(status.success(), "{log}");
    assert!(lab.ns(0).has_xdp("eth0").unwrap(), "the other XDP program was detached");
    assert!(tcx_chain(&lab, 0).is_empty(), "tcx left attached");
}

/// A restart that moves the data plane from XDP to tcx (an operator turning Cilium's XDP
/// acceleration on): the new agent attaches at tcx first, then drops the pinned XDP
/// link, and requests keep being served.
#[test]
fn a_restart_moves_the_data_plane_from_xdp_to_tcx() {
    if !tests::kernel_has_tcx() {
        return;
    }
    let lab = ApiLab::new([10, 109, 0], 3, &[0]).unwrap();
    let mut first = lab.start_agent(0, &["--keep-forwarding-on-exit"]).unwrap();
    assert!(lab.ns(0).has_xdp("eth0").unwrap());
    let (status, log) = first.stop(libc::SIGTERM, Duration::from_secs(5)).unwrap();
    assert!(status.success(), "{log}");
    let _second = lab.start_agent(0, &["--attach", "tcx"]).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || !lab.ns(0).has_xdp("eth0").unwrap_or(true)),
        "the XDP link of the previous agent is still attached"
    );
    assert_eq!(tcx_chain(&lab, 0), vec!["vip_tcx"]);
    let status = lab.status(0).unwrap();
    assert_eq!(
        status["attached"],
        serde_json::json!([{ "interface": "eth0", "hook": "tcx", "mode": "ingress" }]),
        "{status}"
    );
    let (counts, errors) = lab.requests(30);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(counts.len(), 3, "{counts:?}");
}

/// A restart from XDP forwarding by IPIP to tcx (DSR: tcx cannot encapsulate) keeps every
/// connection on its backend, also those whose pin the live table no longer matches (a
/// third apiserver joined after they were opened): the pins move to DSR with their
/// backends, whose MACs the new agent reads at start. Forgotten, the pins re-hashed, and
/// the flows the table now sends to the newcomer were reset (a new-user trial saw 8).
#[test]
fn a_move_from_ipip_at_xdp_to_tcx_keeps_every_connection_on_its_backend() {
    if !tests::kernel_has_tcx() {
        return;
    }
    let mut lab = ApiLab::new([10, 126, 0], 3, &[0, 1, 2]).unwrap();
    lab.stop_apiserver(2);
    // n1 claims the VIP first; the others find it answered and serve as backends.
    let mut first = lab.spawn_agent(0, &["--forward", "ipip", "--keep-forwarding-on-exit"]).unwrap();
    assert!(wait_until(Duration::from_secs(5), || lab.status(0).is_ok_and(|s| s["vips"][0]["leader"] == true)));
    let _others: Vec<_> = (1..3).map(|i| lab.spawn_agent(i, &["--forward", "ipip"]).unwrap()).collect();
    let up = |lab: &ApiLab, node: usize| lab.backend_healthy(0, node) == Some(true);
    assert!(wait_until(Duration::from_secs(10), || up(&lab, 0) && up(&lab, 1)), "{:?}", lab.status(0));
    let mut kept: Vec<_> = (0..24).map(|_| lab.kept_alive_connection(|_| true).unwrap()).collect();
    // n3 joins: the table changes under the pins.
    lab.start_apiserver(2).unwrap();
    assert!(wait_until(Duration::from_secs(10), || up(&lab, 2)), "{:?}", lab.status(0));
    let (status, log) = first.stop(libc::SIGTERM, Duration::from_secs(5)).unwrap();
    assert!(status.success(), "{log}");
    let _second = lab.start_agent(0, &["--attach", "tcx"]).unwrap();
    let ns = lab.client_ns().name.clone();
    let broken = std::thread::scope(|s| {
        s.spawn(|| {
            tests::netns::enter_by_name(&ns).unwrap();
            let answers = kept.iter_mut().map(|(conn, node)| (conn.get("/").map(|(_, b)| b.trim().to_owned()), node));
            answers.filter(|(a, node)| a.as_deref() != Ok(node.as_str())).map(|(a, n)| format!("{n}: {a:?}")).collect()
        })
        .join()
        .unwrap()
    });
    let broken: Vec<String> = broken;
    assert!(broken.is_empty(), "{} of 24 kept connections broke: {broken:?}", broken.len());
}
