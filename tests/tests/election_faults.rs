//! Leader election under the faults operators meet in the field, each replayed in the
//! three-node lab with the Lease API stand-in and the client's ARP sampler asserting at
//! every moment that at most one node answers for the VIP:
//! - two agents under one node name (a cloned VM);
//! - the Lease deleted, its holder rewritten or cleared, by hand;
//! - the leader's switch port losing carrier;
//! - a Lease API that turns slow, then very slow;
//! - a leader paused in the middle of its gratuitous-ARP repeats.
//!
//! Needs root.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use tests::{
    agent::{wait_until, Agent},
    apilab::ApiLab,
    netns::{capture_arp, is_garp, mac_of},
    sampler::{first_answer_by, Sampler},
};

fn lab(prefix: [u8; 3]) -> ApiLab {
    ApiLab::new(prefix, 3, &[0, 1, 2]).unwrap().with_lease_api().unwrap()
}

fn single_leader(lab: &ApiLab) -> usize {
    assert!(wait_until(Duration::from_secs(10), || lab.leaders().len() == 1), "no single leader: {:?}", lab.leaders());
    lab.leaders()[0]
}

/// A cloned host that kept its name: two agents with one `--node-name`. They are told
/// apart by their instance ids: never two answerers, and within 10 s both say so, in the
/// log and in `vip_duplicate_identity`.
#[test]
fn two_agents_under_one_node_name_never_both_answer_and_both_say_so() {
    let lab = lab([10, 81, 0]);
    let mut first = lab.spawn_agent(0, &[]).unwrap();
    assert_eq!(single_leader(&lab), 0);
    let sampler = Sampler::start(&lab);
    let mut clone = lab.spawn_agent(1, &["--node-name", "n1"]).unwrap();
    let _other = lab.spawn_agent(2, &[]).unwrap();
    let t = Instant::now();
    for i in 0..3 {
        lab.wait_all_healthy(i).unwrap();
    }
    let both_know = wait_until(Duration::from_secs(10), || {
        lab.metric(0, "vip_duplicate_identity ") == Some(1.0) && lab.metric(1, "vip_duplicate_identity ") == Some(1.0)
    });
    let shown = |i: usize| lab.status(i).is_ok_and(|s| s["agent"]["duplicate_instance"].is_string());
    assert!(shown(0) && shown(1), "status does not show the duplicate: {:?}", lab.status(0));
    let took = t.elapsed();
    std::thread::sleep(Duration::from_secs(1));
    let samples = sampler.finish();
    let clone_mac = mac_of(lab.ns(1), "eth0").unwrap();
    assert!(samples.iter().all(|(_, m)| !m.contains(&clone_mac)), "the clone answered while the first one led");
    assert!(both_know, "duplicate not reported by both within 10 s");
    eprintln!("duplicate identity detected by both after {took:?}");
    for (name, agent) in [("first", &mut first), ("clone", &mut clone)] {
        let (_, log) = agent.stop(libc::SIGTERM, Duration::from_secs(5)).unwrap();
        assert!(
            log.lines().any(|l| l.contains("ERROR") && l.contains("runs under this node name") && l.contains("n1")),
            "{name} did not log the duplicate identity:\n{log}"
        );
    }
}

/// The Lease deleted six times, then its holder rewritten to another node's name, then
/// cleared, by hand while the agents run: at no moment two answerers, and a leader in
/// the end.
#[test]
fn deleting_or_rewriting_the_lease_never_makes_two_answerers() {
    let lab = lab([10, 82, 0]);
    let _agents = lab.start_agents(&[0, 1, 2]).unwrap();
    single_leader(&lab);
    let sampler = Sampler::start(&lab);
    for _ in 0..6 {
        assert_eq!(lab.delete_lease().unwrap(), 200);
        std::thread::sleep(Duration::from_millis(1500));
    }
    let leader = single_leader(&lab);
    for holder in [Some(lab.nodes[(leader + 1) % 3].name.clone()), None, Some(String::new())] {
        // As `kubectl edit` does: read, change, write back conditionally; a renewal in
        // between is a conflict, so try again.
        let edited = (0..50).any(|_| {
            let mut lease = lab.lease().unwrap().expect("a Lease");
            lease["spec"]["holderIdentity"] = holder.clone().map_or(serde_json::Value::Null, serde_json::Value::String);
            lab.put_lease(&lease).unwrap() == 200
        });
        assert!(edited, "could not edit the Lease");
        std::thread::sleep(Duration::from_millis(2000));
    }
    let leader = single_leader(&lab);
    let settled = Instant::now();
    std::thread::sleep(Duration::from_millis(500));
    let samples = sampler.finish();
    // Safety first: after each edit nobody answers until earlier fences surely passed;
    // once the edits stop, the leader answers again.
    let mac = mac_of(lab.ns(leader), "eth0").unwrap();
    assert!(first_answer_by(&samples, mac, settled).is_some(), "the leader does not answer after the edits");
}

/// The leader's switch port loses carrier while its agent still reaches the Lease API
/// (each node has a path to it that does not cross the switch, as its own apiserver on
/// loopback would be): it must stop answering within 1 s of the event and release the
/// Lease, and another node must answer within 2 s. When the link returns, it does not
/// take the VIP back.
#[test]
fn a_leader_whose_link_loses_carrier_hands_over_and_does_not_take_it_back() {
    let lab = lab([10, 83, 0]);
    lab.reach_api_out_of_band().unwrap();
    let _agents = lab.start_agents(&[0, 1, 2]).unwrap();
    let old = single_leader(&lab);
    let sampler = Sampler::start(&lab);
    std::thread::sleep(Duration::from_millis(300));
    let port = format!("p{}", 11 + old);
    let t = Instant::now();
    lab.lab.switch.ip(&["link", "set", &port, "down"]).unwrap();
    let stopped = wait_until(Duration::from_secs(1), || !lab.leaders().contains(&old));
    let stopped_after = t.elapsed();
    assert!(wait_until(Duration::from_secs(3), || lab.leaders().iter().any(|&l| l != old)));
    let new = lab.leaders().into_iter().find(|&l| l != old).unwrap();
    lab.lab.switch.ip(&["link", "set", &port, "up"]).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    let samples = sampler.finish();
    assert!(stopped, "the leader still led 1 s after losing carrier");
    let took =
        first_answer_by(&samples, mac_of(lab.ns(new), "eth0").unwrap(), t).expect("the new leader never answered");
    eprintln!("carrier lost: old leader stopped after {stopped_after:?}, new leader answered after {took:?}");
    assert!(took <= Duration::from_secs(2), "another node answered {took:?} after the carrier loss");
    assert_eq!(lab.leaders(), vec![new], "leadership moved back when the link returned");
    let old_mac = mac_of(lab.ns(old), "eth0").unwrap();
    let back = t + Duration::from_millis(500);
    assert!(
        samples.iter().filter(|(s, _)| *s > back).all(|(_, m)| !m.contains(&old_mac)),
        "the old leader answered again"
    );
}

/// A Lease API that takes 200 ms per call (a third of the 600 ms renew deadline: a
/// leader renews with one write, client-go's optimistic renewal, and followers give a
/// read a whole renew deadline) changes nothing, and the VIP stays answered; one that
/// takes 2 s (past the renew deadline) makes the leader step down by the fencing rules —
/// no agent exits, nobody answers twice — and leadership comes back when the API does.
#[test]
fn a_slow_lease_api_never_makes_an_agent_exit_or_flap() {
    let lab = lab([10, 84, 0]);
    let mut agents: Vec<Agent> = lab.start_agents(&[0, 1, 2]).unwrap();
    let leader = single_leader(&lab);
    let sampler = Sampler::start(&lab);
    std::fs::write(lab.faults_file(), r#"{"latency_ms": 200}"#).unwrap();
    let slow = Instant::now();
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(lab.leaders(), vec![leader], "200 ms of API latency moved leadership");
    }
    for i in 0..3 {
        assert_eq!(lab.metric(i, "vip_lease_api_answering "), Some(1.0), "node {i} says the slow API does not answer");
    }
    let slow_for = slow.elapsed();
    std::fs::write(lab.faults_file(), r#"{"latency_ms": 2000}"#).unwrap();
    assert!(wait_until(Duration::from_secs(5), || lab.leaders().is_empty()), "a leader led without renewing");
    std::thread::sleep(Duration::from_secs(3));
    assert!(lab.leaders().is_empty(), "a node led although no call could finish in time");
    std::fs::remove_file(lab.faults_file()).unwrap();
    assert!(wait_until(Duration::from_secs(8), || lab.leaders().len() == 1), "no leader after the API recovered");
    let samples = sampler.finish();
    let mac = mac_of(lab.ns(leader), "eth0").unwrap();
    let answered: Vec<Instant> = samples
        .iter()
        .filter(|(t, m)| *t >= slow && *t < slow + slow_for && m.contains(&mac))
        .map(|(t, _)| *t)
        .collect();
    let gap =
        [slow].iter().chain(&answered).zip(answered.iter().chain([&(slow + slow_for)])).map(|(a, b)| *b - *a).max();
    assert!(gap < Some(Duration::from_millis(250)), "the VIP went unanswered for {gap:?} while the API was slow");
    for (i, a) in agents.iter_mut().enumerate() {
        assert!(a.running(), "agent {i} exited");
    }
}

/// A leader lost while the Lease API takes 200 ms per call is replaced, and the next
/// leader keeps the lead: its fence counts from its write, not from its read. Counted
/// from the read, the first renewal after an acquisition (a read, a write and the claim
/// probe) had under 100 ms left, and every new leader stepped down at once, for as long
/// as the API stayed slow (a chaos trial saw 9.5 s with nobody answering).
#[test]
fn a_leader_lost_while_the_lease_api_is_slow_is_replaced_for_good() {
    let lab = lab([10, 130, 0]);
    let mut agents: Vec<Option<Agent>> = lab.start_agents(&[0, 1, 2]).unwrap().into_iter().map(Some).collect();
    let old = single_leader(&lab);
    let sampler = Sampler::start(&lab);
    std::fs::write(lab.faults_file(), r#"{"latency_ms": 200}"#).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    if let Some(mut a) = agents[old].take() {
        a.stop(libc::SIGKILL, Duration::from_secs(5)).unwrap();
    }
    let killed = Instant::now();
    let replaced = wait_until(Duration::from_secs(6), || lab.leaders().iter().any(|&l| l != old));
    std::thread::sleep(Duration::from_secs(3));
    let leaders = lab.leaders();
    std::fs::remove_file(lab.faults_file()).unwrap();
    let samples = sampler.finish();
    assert!(replaced, "nobody took over from the killed leader while the API was slow");
    assert_eq!(leaders.len(), 1, "{leaders:?}");
    let new = leaders[0];
    let mac = mac_of(lab.ns(new), "eth0").unwrap();
    let first = first_answer_by(&samples, mac, killed).expect("the new leader never answered");
    let from = killed + first;
    let answered: Vec<Instant> = samples
        .iter()
        .filter(|(t, m)| *t >= from && *t < from + Duration::from_secs(2) && m.contains(&mac))
        .map(|(t, _)| *t)
        .collect();
    let gap = answered.windows(2).map(|w| w[1] - w[0]).max();
    assert!(gap < Some(Duration::from_millis(300)), "the new leader stopped answering for {gap:?}");
    eprintln!("a new leader answered {first:?} after the SIGKILL, at 200 ms per API call");
}

/// A leader paused (SIGSTOP) in the middle of its gratuitous-ARP repeats, and resumed
/// after another node took over, must not announce the VIP again: every announcement
/// re-checks the data plane first.
#[test]
fn a_leader_paused_mid_announcement_sends_nothing_once_resumed() {
    let lab = lab([10, 85, 0]);
    let mut agents: Vec<Option<Agent>> = lab.start_agents(&[0, 1, 2]).unwrap().into_iter().map(Some).collect();
    let first = single_leader(&lab);
    if let Some(mut a) = agents[first].take() {
        a.stop(libc::SIGKILL, Duration::from_secs(5)).unwrap();
    }
    // The next leader starts its announcements (a burst, then repeats at 1, 2, 4 s):
    // pause it inside the first second.
    assert!(wait_until(Duration::from_secs(5), || lab.leaders().iter().any(|&l| l != first)));
    let paused = lab.leaders().into_iter().find(|&l| l != first).unwrap();
    let pid = agents[paused].as_ref().and_then(Agent::pid).unwrap() as i32;
    // SAFETY: plain kill(2) on our own child.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let third = (0..3).find(|&i| i != first && i != paused).unwrap();
    assert!(
        wait_until(Duration::from_secs(6), || lab.status(third).is_ok_and(|s| s["vips"][0]["leader"] == true)),
        "nobody took over from the paused leader"
    );
    let capture = capture_arp(lab.client_ns(), "eth0", Duration::from_secs(6));
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let frames = capture.join().unwrap().unwrap();
    let mac = mac_of(lab.ns(paused), "eth0").unwrap();
    let garps = frames.iter().filter(|f| is_garp(f, lab.vip, mac)).count();
    assert_eq!(garps, 0, "the resumed former leader announced the VIP {garps} times");
    assert!(lab.status(third).is_ok_and(|s| s["vips"][0]["leader"] == true));
}

/// RFC 5227 §2.1.1: a node probing for the VIP while another host probes for it too
/// does not claim it. Its data plane drops ARP for the VIP while it follows (its kernel
/// would answer otherwise), so it must let other hosts' probes through while its own
/// agent probes, or two nodes claiming at the same moment both hold the VIP. Here
/// another host probes every 20 ms: the bootstrapping agent counts the conflict and never
/// answers; once that host is gone it holds the VIP after its hold-off.
#[test]
fn a_node_probing_at_the_same_moment_as_another_host_does_not_claim_the_vip() {
    use std::sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    };
    let lab = lab([10, 106, 0]);
    std::fs::write(lab.faults_file(), r#"{"status": 403}"#).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let prober = {
        let (ns, vip, stop) = (lab.client_ns().name.clone(), lab.vip, stop.clone());
        std::thread::spawn(move || {
            let mut answered = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let probe = tests::netns::arp_probe(&ns, "eth0", Ipv4Addr::UNSPECIFIED, vip, Duration::from_millis(20));
                answered.extend(probe.unwrap_or_default());
            }
            answered
        })
    };
    let mut agent = lab.spawn_agent(0, &["--bootstrap"]).unwrap();
    let counted =
        wait_until(Duration::from_secs(6), || lab.metric(0, "vip_arp_conflicts_total").is_some_and(|v| v >= 1.0));
    std::thread::sleep(Duration::from_secs(1));
    stop.store(true, Ordering::Relaxed);
    let answered = prober.join().unwrap();
    if !counted {
        let (_, log) = agent.stop(libc::SIGTERM, Duration::from_secs(5)).unwrap_or_default();
        panic!("the other host's probes were never seen:\n{log}");
    }
    assert!(answered.is_empty(), "probes answered while another host claimed the VIP: {answered:?}");
    assert!(
        wait_until(Duration::from_secs(12), || lab.leaders() == vec![0]),
        "never held the VIP once the other host was gone: {:?}",
        lab.leaders()
    );
}

/// `kubeadm init`: the Lease API refuses every call (403: RBAC not there yet). The node
/// started with `--bootstrap` — here two of them at once, the worst case — holds the VIP
/// after its ARP probe: exactly one answers, the others wait. When the API answers, the
/// Lease decides, and still at most one node answers at any moment.
#[test]
fn bootstrap_holds_the_vip_before_the_lease_api_answers_and_hands_it_to_the_lease() {
    let lab = lab([10, 104, 0]);
    std::fs::write(lab.faults_file(), r#"{"status": 403}"#).unwrap();
    let sampler = Sampler::start(&lab);
    let _agents: Vec<Agent> = [(0, true), (1, true), (2, false)]
        .iter()
        .map(|&(i, bootstrap)| lab.spawn_agent(i, if bootstrap { &["--bootstrap"] } else { &[] }).unwrap())
        .collect();
    assert!(
        wait_until(Duration::from_secs(15), || lab.leaders().len() == 1),
        "no bootstrap holder: {:?}",
        lab.leaders()
    );
    let holder = lab.leaders()[0];
    assert_ne!(holder, 2, "a node without --bootstrap held the VIP without a Lease");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(lab.leaders(), vec![holder], "the bootstrap holder changed while the API refused");
    assert!(lab.lease().is_err(), "the API was supposed to refuse");
    std::fs::remove_file(lab.faults_file()).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || lab
            .lease()
            .ok()
            .flatten()
            .is_some_and(|l| l["spec"]["holderIdentity"].as_str().is_some_and(|h| !h.is_empty()))),
        "nobody took the Lease after the API answered"
    );
    std::thread::sleep(Duration::from_secs(2));
    let leader = single_leader(&lab);
    let samples = sampler.finish();
    let lease = lab.lease().unwrap().unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], lab.nodes[leader].name.as_str());
    // From the bootstrap holder's first answer on (how long the agents take to start and
    // probe depends on the machine's load, and is not what this checks).
    let since_claim: Vec<_> = samples.iter().skip_while(|(_, m)| m.is_empty()).collect();
    let answered = since_claim.iter().filter(|(_, m)| !m.is_empty()).count();
    assert!(
        answered > since_claim.len() / 2,
        "after the first answer the VIP went unanswered most of the time: {answered} of {} samples ({} in all)",
        since_claim.len(),
        samples.len()
    );
}

/// Credentials renewed on disk while the agent runs (`kubeadm certs renew` rewrites
/// `admin.conf`): once the API refuses the old ones (401), the agent reads its
/// kubeconfig again and leads with the new ones, without a restart.
#[test]
fn renewed_credentials_are_read_again_after_a_401() {
    let lab = lab([10, 129, 0]);
    let mut agent = lab.spawn_agent(0, &[]).unwrap();
    assert_eq!(single_leader(&lab), 0);
    std::fs::write(lab.faults_file(), r#"{"token": "renewed"}"#).unwrap();
    assert!(wait_until(Duration::from_secs(5), || lab.leaders().is_empty()), "led with refused credentials");
    let kubeconfig = lab.pki.dir.join("n1.kubeconfig");
    let renewed = std::fs::read_to_string(&kubeconfig).unwrap().replace("token: lab-token", "token: renewed");
    std::fs::write(&kubeconfig, renewed).unwrap();
    let back = wait_until(Duration::from_secs(20), || lab.leaders() == vec![0]);
    let (_, log) = agent.stop(libc::SIGTERM, Duration::from_secs(5)).unwrap();
    assert!(back, "the renewed kubeconfig was never read:\n{log}");
    assert!(log.contains("the kubeconfig was read again"), "{log}");
}
