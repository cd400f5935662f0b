//! `--discover kubernetes`: the agent learns the apiservers from the EndpointSlices of
//! `default/kubernetes` (served by the API stand-in, reached through the agent's normal
//! kubeconfig path), health-checks them, and keeps the table to registered and healthy
//! ones as registrations come and go.
//!
//! Needs root.

use std::time::Duration;

use tests::{
    agent::{wait_until, Agent},
    apilab::ApiLab,
};

fn table_backends(lab: &ApiLab) -> Vec<(String, bool)> {
    lab.status(0)
        .ok()
        .and_then(|s| {
            s["services"][0]["backends"].as_array().map(|b| {
                b.iter()
                    .map(|b| (b["backend"].as_str().unwrap_or("").to_owned(), b["healthy"].as_bool().unwrap_or(false)))
                    .collect()
            })
        })
        .unwrap_or_default()
}

fn healthy_set(lab: &ApiLab, nodes: &[usize]) -> bool {
    let mut want: Vec<String> = nodes.iter().map(|&i| lab.nodes[i].ip.to_string()).collect();
    want.sort();
    let mut got: Vec<String> = table_backends(lab).into_iter().filter(|(_, h)| *h).map(|(b, _)| b).collect();
    got.sort();
    got == want
}

#[test]
fn discovered_apiservers_follow_the_endpointslices() {
    let mut lab = ApiLab::new([10, 78, 0], 3, &[0]).unwrap().with_lease_api().unwrap();
    lab.static_backends = false;
    lab.register_apiservers(&[0, 1]).unwrap();
    let kc = lab.pki.dir.join("n1.kubeconfig").display().to_string();
    let args = lab.agent_args(0, &["--discover", "kubernetes", "--kubeconfig", &kc, "--drain-hold", "2s"]).unwrap();
    assert!(!args.iter().any(|a| a == "--backend"), "this test relies on discovery alone");
    let _agent = Agent::spawn(lab.ns(0), &args).unwrap();

    assert!(wait_until(Duration::from_secs(10), || healthy_set(&lab, &[0, 1])), "{:?}", table_backends(&lab));
    let (counts, errors) = lab.requests(60);
    assert!(errors.is_empty(), "{errors:?}");
    assert!(!counts.contains_key("n3") && counts.len() == 2, "{counts:?}");

    // A third apiserver registers: it joins the table.
    lab.register_apiservers(&[0, 1, 2]).unwrap();
    assert!(wait_until(Duration::from_secs(5), || healthy_set(&lab, &[0, 1, 2])), "{:?}", table_backends(&lab));
    let (counts, errors) = lab.requests(60);
    assert!(errors.is_empty() && counts.get("n3").copied().unwrap_or(0) > 0, "{counts:?} {errors:?}");

    // One deregisters, its apiserver still healthy: it drains (no new flows), and leaves
    // when --drain-hold (2 s here) ends.
    lab.register_apiservers(&[0, 2]).unwrap();
    let n2 = lab.nodes[1].ip.to_string();
    assert!(
        wait_until(Duration::from_secs(5), || lab.backend_state(0, &n2)
            == Some(("draining".into(), "deregistered".into()))),
        "{:?}",
        lab.backend_state(0, &n2)
    );
    assert!(
        wait_until(Duration::from_secs(5), || table_backends(&lab)
            .iter()
            .all(|(b, _)| *b != lab.nodes[1].ip.to_string())),
        "{:?}",
        table_backends(&lab)
    );
    let (counts, errors) = lab.requests(60);
    assert!(errors.is_empty() && !counts.contains_key("n2"), "{counts:?} {errors:?}");

    // None registered (the slice recreated, or every endpoint briefly not ready): the
    // agent keeps the ones it has rather than empty its table.
    lab.register_apiservers(&[]).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    assert!(healthy_set(&lab, &[0, 2]), "{:?}", table_backends(&lab));
    let (counts, errors) = lab.requests(60);
    assert!(errors.is_empty() && counts.get("n3").copied().unwrap_or(0) > 0, "{counts:?} {errors:?}");
}

/// An apiserver shutting down deregisters itself at the start of its shutdown delay, and
/// serves on: it drains (its connections kept, no new flows), and leaves the table once
/// it stops serving. Removed at once, every connection on it was reset (found by a
/// new-user trial).
#[test]
fn a_deregistered_apiserver_keeps_its_connections_until_it_stops_serving() {
    let mut lab = ApiLab::new([10, 122, 0], 3, &[0]).unwrap().with_lease_api().unwrap();
    lab.static_backends = false;
    lab.register_apiservers(&[0, 1, 2]).unwrap();
    let args = discovering(&lab, &[], false);
    let _agent = Agent::spawn(lab.ns(0), &args).unwrap();
    assert!(wait_until(Duration::from_secs(10), || healthy_set(&lab, &[0, 1, 2])), "{:?}", table_backends(&lab));
    let (mut conn, node) = lab.kept_alive_connection(|name| name != "n1").unwrap();
    let i = lab.nodes.iter().position(|n| n.name == node).unwrap();
    let ip = lab.nodes[i].ip.to_string();
    let others: Vec<usize> = (0..3).filter(|&j| j != i).collect();
    lab.register_apiservers(&others).unwrap();
    let draining = || lab.backend_state(0, &ip) == Some(("draining".into(), "deregistered".into()));
    assert!(wait_until(Duration::from_secs(5), draining), "{:?}", lab.backend_state(0, &ip));
    let ns = lab.client_ns().name.clone();
    let kept = std::thread::scope(|s| {
        s.spawn(|| {
            tests::netns::enter_by_name(&ns).unwrap();
            (0..5)
                .map(|_| {
                    std::thread::sleep(Duration::from_millis(100));
                    conn.get("/").map(|(_, b)| b.trim().to_owned())
                })
                .collect::<Vec<_>>()
        })
        .join()
        .unwrap()
    });
    assert!(kept.iter().all(|r| r.as_deref() == Ok(node.as_str())), "the kept connection broke: {kept:?}");
    let (counts, errors) = lab.requests(40);
    assert!(errors.is_empty() && !counts.contains_key(&node), "a new flow went to {node}: {counts:?} {errors:?}");
    assert!(draining(), "the drain ended early: {:?}", lab.backend_state(0, &ip));
    // It stops serving: it leaves the table.
    lab.stop_apiserver(i);
    assert!(
        wait_until(Duration::from_secs(6), || table_backends(&lab).iter().all(|(b, _)| *b != ip)),
        "{:?}",
        table_backends(&lab)
    );
}

/// A hitless restart under discovery (the kubeadm and K3s installs): the new agent's first
/// table, written before discovery answers and while the previous agent's program still
/// runs, keeps the apiservers the previous agent balanced to, as it had them. Without
/// that, the table is empty until discovery answers and the checks rise again, and every
/// pin goes with it: connections on other nodes are reset. The API answers 503 across
/// the restart, so discovery cannot answer early and hide the gap.
#[test]
fn a_hitless_restart_keeps_the_discovered_apiservers() {
    let mut lab = ApiLab::new([10, 115, 0], 3, &[0]).unwrap().with_lease_api().unwrap();
    lab.static_backends = false;
    lab.register_apiservers(&[0, 1, 2]).unwrap();
    let args = |extra: &[&str]| discovering(&lab, extra, false);
    let mut old = Agent::spawn(lab.ns(0), &args(&["--keep-forwarding-on-exit"])).unwrap();
    assert!(wait_until(Duration::from_secs(10), || healthy_set(&lab, &[0, 1, 2])), "{:?}", table_backends(&lab));
    // A kept-alive connection on another node (n1 serves its own share locally).
    let (mut conn, node) = lab.kept_alive_connection(|name| name != "n1").unwrap();
    let (status, log) = old.stop(libc::SIGTERM, Duration::from_secs(5)).unwrap();
    assert!(status.success(), "{log}");
    std::fs::write(lab.faults_file(), r#"{"status": 503}"#).unwrap();
    let mut new = Agent::spawn(lab.ns(0), &args(&[])).unwrap();
    let mut same = |when: &str| {
        assert!(healthy_set(&lab, &[0, 1, 2]), "{when}: {:?}", table_backends(&lab));
        let answer = conn.get("/").map(|(_, body)| body.trim().to_owned());
        assert_eq!(answer.as_deref(), Ok(node.as_str()), "{when}: the connection on {node} broke");
    };
    // Through the new agent's first table and its first checks, discovery failing (for
    // 3 s: several of the watcher's retries).
    for _ in 0..60 {
        same("after the restart, before discovery answered");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::fs::remove_file(lab.faults_file()).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    same("once the API answers again");
    // The failing watch was logged once, not at each retry.
    let (_, log) = new.stop(libc::SIGTERM, Duration::from_secs(5)).unwrap();
    let warned = log.lines().filter(|l| l.contains("WARN") && l.contains("EndpointSlices failed")).count();
    assert_eq!(warned, 1, "{log}");
}

/// The agent's command line with discovery (and, if `elected`, the Lease election) on
/// node n1; `extra` last.
fn discovering(lab: &ApiLab, extra: &[&str], elected: bool) -> Vec<String> {
    let kc = lab.pki.dir.join("n1.kubeconfig").display().to_string();
    let mut args = lab.agent_args(0, &["--discover", "kubernetes", "--kubeconfig", &kc]).unwrap();
    if elected {
        args.extend(lab.election_args(0));
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// After a hitless restart under discovery with an election, the leadership gate checks
/// this node's apiserver alone: the apiservers kept from the previous agent take their
/// own check keys (the gate's once was one of them, so another node's failing apiserver
/// made this one step down). Here the two other apiservers turn unready; n1, whose own
/// apiserver is ready, keeps the lead.
#[test]
fn after_a_restart_under_discovery_the_leadership_gate_checks_this_node_alone() {
    let mut lab = ApiLab::new([10, 116, 0], 3, &[0]).unwrap().with_lease_api().unwrap();
    lab.static_backends = false;
    lab.register_apiservers(&[0, 1, 2]).unwrap();
    let mut old = Agent::spawn(lab.ns(0), &discovering(&lab, &["--keep-forwarding-on-exit"], true)).unwrap();
    assert!(wait_until(Duration::from_secs(10), || lab.leaders() == [0] && healthy_set(&lab, &[0, 1, 2])));
    let (status, log) = old.stop(libc::SIGTERM, Duration::from_secs(5)).unwrap();
    assert!(status.success(), "{log}");
    let _new = Agent::spawn(lab.ns(0), &discovering(&lab, &[], true)).unwrap();
    assert!(wait_until(Duration::from_secs(10), || lab.leaders() == [0] && healthy_set(&lab, &[0, 1, 2])));
    for i in [1, 2] {
        std::fs::write(lab.unready_file(i), b"").unwrap();
    }
    assert!(
        wait_until(Duration::from_secs(5), || healthy_set(&lab, &[0])),
        "an unready apiserver stayed in the table (another check's results?): {:?}",
        table_backends(&lab)
    );
    std::thread::sleep(Duration::from_millis(1000));
    assert_eq!(lab.leaders(), [0], "n1 stepped down: its gate saw another apiserver's checks");
}

/// Credentials renewed on disk while the agent runs (`kubeadm certs renew` rewrites
/// `admin.conf`): once the API refuses the old ones (401), the discovery watch reads the
/// kubeconfig again and follows the EndpointSlices with the new ones, without a restart.
/// With the client it started with, the table stayed as it was for good.
#[test]
fn the_discovery_watch_reads_renewed_credentials_after_a_401() {
    let mut lab = ApiLab::new([10, 132, 0], 3, &[0]).unwrap().with_lease_api().unwrap();
    lab.static_backends = false;
    lab.register_apiservers(&[0, 1]).unwrap();
    let mut agent = Agent::spawn(lab.ns(0), &discovering(&lab, &[], false)).unwrap();
    assert!(wait_until(Duration::from_secs(10), || healthy_set(&lab, &[0, 1])), "{:?}", table_backends(&lab));
    std::fs::write(lab.faults_file(), r#"{"token": "renewed"}"#).unwrap();
    let kubeconfig = lab.pki.dir.join("n1.kubeconfig");
    let renewed = std::fs::read_to_string(&kubeconfig).unwrap().replace("token: lab-token", "token: renewed");
    std::fs::write(&kubeconfig, renewed).unwrap();
    lab.register_apiservers(&[0, 1, 2]).unwrap();
    let followed = wait_until(Duration::from_secs(20), || healthy_set(&lab, &[0, 1, 2]));
    let table = table_backends(&lab);
    let (_, log) = agent.stop(libc::SIGTERM, Duration::from_secs(5)).unwrap();
    assert!(followed, "the third apiserver was never discovered: {table:?}\n{log}");
    assert!(log.contains("the kubeconfig was read again"), "{log}");
}
