//! BGP mode end to end: a router namespace running FRR 8.4 bgpd (AS 65001, ECMP over the
//! nodes, layer-4 multipath hashing), three control-plane nodes running vip-agent
//! `--mode bgp` (AS 65000) with apiserver stand-ins, and a client reaching the VIP only
//! through the router. What the router's kernel route says, what the client sees, and
//! which connections survive a node leaving.
//!
//! Needs root, and Debian's `frr` and `bird2` (`cargo xtask setup` installs them).

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use tests::{
    agent::{wait_until, Agent},
    apilab::ApiLab,
    routers::{nexthops, Bird, Frr, Neighbor},
};

const ROUTER_AS: u32 = 65001;
const NODE_AS: u32 = 65000;

struct BgpLab {
    // Agents stop before the routers and the namespaces go.
    agents: Vec<Option<Agent>>,
    frr: Frr,
    lab: ApiLab,
}

impl BgpLab {
    fn router_ip(lab: &ApiLab) -> Ipv4Addr {
        let o = lab.vip.octets();
        Ipv4Addr::new(o[0], o[1], o[2], 1)
    }

    fn neighbors(lab: &ApiLab, password: Option<&str>) -> Vec<Neighbor> {
        lab.nodes.iter().map(|n| Neighbor { ip: n.ip, asn: NODE_AS, password: password.map(str::to_owned) }).collect()
    }

    /// The lab with FRR up, and agents on every node with `extra` flags.
    fn new(prefix: [u8; 3], router_password: Option<&str>, extra: &[&str]) -> Self {
        let lab = ApiLab::routed(prefix, 3).unwrap();
        let dir = std::env::temp_dir().join(format!("vip-frr-{}", lab.lab.tag));
        let frr = Frr::start(
            lab.router_ns(),
            &dir,
            ROUTER_AS,
            Self::router_ip(&lab),
            &Self::neighbors(&lab, router_password),
        )
        .unwrap();
        let mut me = Self { agents: Vec::new(), frr, lab };
        for i in 0..3 {
            let a = me.spawn(i, extra);
            me.agents.push(Some(a));
        }
        me
    }

    /// BGP flags for an agent peering with the router, with `password` if any.
    fn bgp_args(&self, password: Option<&str>) -> Vec<String> {
        let mut peer = format!("{}:{ROUTER_AS}", Self::router_ip(&self.lab));
        if let Some(p) = password {
            peer = format!("{peer}:{p}");
        }
        ["--mode", "bgp", "--bgp-local-as", &NODE_AS.to_string(), "--bgp-peer", &peer, "--bgp-hold-time", "3s"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    fn spawn(&self, i: usize, extra: &[&str]) -> Agent {
        self.spawn_with_password(i, None, extra)
    }

    fn spawn_with_password(&self, i: usize, password: Option<&str>, extra: &[&str]) -> Agent {
        let mut args = self.bgp_args(password);
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.lab.spawn_agent(i, &args).unwrap()
    }

    /// An agent whose peer (the router, with `password`) comes from a root-only file
    /// (`--bgp-peer-file`), as the manifests set it up; the file, for the test to remove.
    fn spawn_with_peer_file(&self, i: usize, password: &str) -> (Agent, std::path::PathBuf) {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::env::temp_dir().join(format!("vip-bgp-peers-{}-{i}", tests::netns::unique_tag()));
        let mut f =
            std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&file).unwrap();
        std::io::Write::write_all(
            &mut f,
            format!("# the router\n{}:{ROUTER_AS}:{password}\n", Self::router_ip(&self.lab)).as_bytes(),
        )
        .unwrap();
        let (asn, path) = (NODE_AS.to_string(), file.display().to_string());
        let args = ["--mode", "bgp", "--bgp-local-as", &asn, "--bgp-peer-file", &path, "--bgp-hold-time", "3s"];
        (self.lab.spawn_agent(i, &args).unwrap(), file)
    }

    fn hops(&self) -> Vec<Ipv4Addr> {
        nexthops(self.lab.router_ns(), self.lab.vip)
    }

    fn wait_hops(&self, n: usize, within: Duration) -> bool {
        wait_until(within, || self.hops().len() == n)
    }

    fn node_ip(&self, i: usize) -> Ipv4Addr {
        self.lab.nodes[i].ip
    }
}

/// Three sessions Established; the router's kernel route for the VIP has three
/// nexthops; requests through the VIP reach every apiserver; `status` shows the peer.
#[test]
fn every_ready_node_advertises_and_the_router_spreads_clients() {
    let lab = BgpLab::new([10, 96, 0], None, &[]);
    assert!(lab.wait_hops(3, Duration::from_secs(15)), "nexthops: {:?}", lab.hops());
    for i in 0..3 {
        assert_eq!(lab.frr.state(lab.node_ip(i)), "Established");
    }
    let (counts, errors) = lab.lab.requests(150);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(counts.len(), 3, "{counts:?}");
    let s = lab.lab.status(0).unwrap();
    assert_eq!(s["agent"]["mode"], "bgp", "{s}");
    assert_eq!(s["agent"]["advertised"], true, "{s}");
    assert_eq!(s["agent"]["bgp_peers"][0]["state"], "Established", "{s}");
    assert_eq!(s["vips"][0]["leader"], false, "BGP mode never answers ARP: {s}");
    let state = |name: &str| {
        let series = format!("vip_bgp_session_state{{peer=\"{}\",state=\"{name}\"}}", BgpLab::router_ip(&lab.lab));
        lab.lab.metric(0, &series)
    };
    assert_eq!(state("Established"), Some(1.0));
    // Every other state is there at 0, so an alert on Established == 0 sees a session down.
    assert_eq!(state("Active"), Some(0.0));
    assert_eq!(state("Idle"), Some(0.0));
}

/// A node whose apiserver turns unready withdraws within one check interval (the gate
/// falls at the first failure) plus slack; a SIGTERMed agent withdraws within 0.5 s
/// (Cease); a SIGKILLed one within the hold time (3 s).
#[test]
fn a_node_leaves_the_route_on_unready_sigterm_and_sigkill_in_time() {
    let mut lab = BgpLab::new([10, 97, 0], None, &[]);
    assert!(lab.wait_hops(3, Duration::from_secs(15)), "nexthops: {:?}", lab.hops());

    let t = Instant::now();
    std::fs::write(lab.lab.unready_file(0), b"").unwrap();
    assert!(lab.wait_hops(2, Duration::from_secs(3)));
    let unready = t.elapsed();
    assert!(!lab.hops().contains(&lab.node_ip(0)));
    let bound = tests::apilab::HEALTH_INTERVAL + Duration::from_millis(500);
    assert!(unready <= bound, "withdrawn {unready:?} after /readyz failed (bound {bound:?})");
    std::fs::remove_file(lab.lab.unready_file(0)).unwrap();
    assert!(lab.wait_hops(3, Duration::from_secs(5)), "n1 did not come back");

    let mut leaving = lab.agents[1].take().unwrap();
    let t = Instant::now();
    leaving.signal(libc::SIGTERM);
    assert!(lab.wait_hops(2, Duration::from_secs(2)));
    let sigterm = t.elapsed();
    let (status, log) = leaving.stop(libc::SIGTERM, Duration::from_secs(10)).unwrap();
    assert!(status.success(), "{log}");
    assert!(!lab.hops().contains(&lab.node_ip(1)));

    let t = Instant::now();
    lab.agents[2].take().unwrap().stop(libc::SIGKILL, Duration::from_secs(5)).unwrap();
    assert!(lab.wait_hops(1, Duration::from_secs(6)));
    let sigkill = t.elapsed();
    eprintln!("withdrawn after unready {unready:?}, SIGTERM {sigterm:?}, SIGKILL {sigkill:?}");
    assert!(sigterm <= Duration::from_millis(500), "SIGTERM: withdrawn after {sigterm:?}");
    assert!(sigkill <= Duration::from_millis(3500), "SIGKILL: gone after {sigkill:?} (hold time 3 s)");
    let (_, errors) = lab.lab.requests(20);
    assert!(errors.is_empty(), "the remaining node does not serve: {errors:?}");
}

/// A node that starts afresh (its pins gone: a reboot, a first install, a restart
/// without `--keep-forwarding-on-exit`) advertises only once every backend has its first
/// check result. Every node balances by its own table and the router moves flows
/// between nodes; advertised with a table of itself alone, it sent the flows it was
/// handed to its own stack, which reset connections kept on healthy backends (a
/// new-user trial: 14 of 100). Here node 0's checks of node 2 go unanswered until their
/// 1.5 s timeout; node 0 is back in the route only after that.
#[test]
fn a_node_that_starts_afresh_advertises_only_once_every_backend_is_checked() {
    let mut lab = BgpLab::new([10, 128, 0], None, &[]);
    assert!(lab.wait_hops(3, Duration::from_secs(15)), "nexthops: {:?}", lab.hops());
    let (status, log) = lab.agents[0].take().unwrap().stop(libc::SIGTERM, Duration::from_secs(10)).unwrap();
    assert!(status.success(), "{log}");
    assert!(lab.wait_hops(2, Duration::from_secs(3)));
    let (n2, from) = (lab.lab.ns(2), lab.node_ip(0).to_string());
    let nft = |args: &[&str]| tests::netns::run(n2.cmd("nft").args(args)).unwrap();
    nft(&["add", "table", "inet", "slow"]);
    nft(&["add", "chain", "inet", "slow", "input", "{ type filter hook input priority 0 ; }"]);
    nft(&["add", "rule", "inet", "slow", "input", "ip", "saddr", &from, "tcp", "dport", "6443", "drop"]);
    let t = Instant::now();
    let fresh = lab.spawn(0, &["--health-interval", "3s", "--health-timeout", "1500ms"]);
    lab.agents[0] = Some(fresh);
    assert!(lab.wait_hops(3, Duration::from_secs(10)), "node 0 never advertised again: {:?}", lab.hops());
    let back = t.elapsed();
    nft(&["delete", "table", "inet", "slow"]);
    let (_, log) = lab.agents[0].take().unwrap().stop(libc::SIGTERM, Duration::from_secs(10)).unwrap();
    assert!(
        back >= Duration::from_millis(1400),
        "advertised {back:?} after start, before its check of node 2 ended:\n{log}"
    );
    assert!(log.contains("every backend checked once"), "{log}");
}

/// TCP-MD5 (RFC 2385): with the router's password the sessions come up; with a wrong
/// one they do not, and `status` and the metrics say so.
#[test]
fn tcp_md5_with_the_right_password_establishes_and_a_wrong_one_does_not() {
    let prefix = [10, 98, 0];
    let lab = BgpLab::new(prefix, Some("s3cret"), &[]);
    // Agents above have no password: nothing may come up. Restart two with passwords.
    std::thread::sleep(Duration::from_secs(2));
    assert!(lab.hops().is_empty(), "a session without the password came up: {:?}", lab.hops());
    let mut lab = lab;
    // Node 1 reads its peer, the right password with it, from a file (`--bgp-peer-file`).
    lab.agents[0].take();
    let (agent, peer_file) = lab.spawn_with_peer_file(0, "s3cret");
    lab.agents[0] = Some(agent);
    lab.agents[1].take();
    lab.agents[1] = Some(lab.spawn_with_password(1, Some("wrong"), &[]));
    assert!(wait_until(Duration::from_secs(15), || lab.frr.state(lab.node_ip(0)) == "Established"));
    assert!(lab.wait_hops(1, Duration::from_secs(5)), "{:?}", lab.hops());
    assert_eq!(lab.hops(), vec![lab.node_ip(0)]);
    assert_ne!(lab.frr.state(lab.node_ip(1)), "Established");
    let s = lab.lab.status(1).unwrap();
    assert_ne!(s["agent"]["bgp_peers"][0]["state"], "Established", "{s}");
    // Nothing is advertised there, whatever the node wants: an alert on the gauge sees it.
    assert_eq!(s["agent"]["advertised"], false, "{s}");
    // The router drops the wrongly signed SYNs without a word: the error names the
    // password as a cause.
    let hinted =
        || lab.lab.status(1).ok().and_then(|s| s["agent"]["bgp_peers"][0]["last_error"].as_str().map(str::to_owned));
    assert!(
        wait_until(Duration::from_secs(10), || hinted().is_some_and(|e| e.contains("TCP-MD5 password differs"))),
        "{:?}",
        hinted()
    );
    assert_eq!(lab.lab.metric(1, "vip_bgp_advertised"), Some(0.0));
    assert_eq!(lab.lab.metric(0, "vip_bgp_advertised"), Some(1.0));
    std::fs::remove_file(peer_file).unwrap();
}

/// A second router running BIRD 2 peers with the same agents and installs the route.
#[test]
fn bird_peers_too() {
    let lab = ApiLab::routed([10, 99, 0], 3).unwrap();
    let dir = std::env::temp_dir().join(format!("vip-bird-{}", lab.lab.tag));
    let router = BgpLab::router_ip(&lab);
    let bird = Bird::start(lab.router_ns(), &dir, ROUTER_AS, router, &BgpLab::neighbors(&lab, None)).unwrap();
    let peer = format!("{router}:{ROUTER_AS}");
    let args = ["--mode", "bgp", "--bgp-local-as", "65000", "--bgp-peer", peer.as_str()];
    let _agents: Vec<Agent> = (0..3).map(|i| lab.spawn_agent(i, &args).unwrap()).collect();
    assert!(
        wait_until(Duration::from_secs(20), || nexthops(lab.router_ns(), lab.vip).len() == 3),
        "BIRD's kernel route: {:?}\n{}",
        nexthops(lab.router_ns(), lab.vip),
        bird.protocols()
    );
    let (counts, errors) = lab.requests(60);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(counts.len(), 3, "{counts:?}");
}

/// Kept-alive connections through the VIP while one node leaves (SIGTERM, then a node
/// cut off): the router moves the flows it carried to other nodes, which hold the same
/// Maglev table and forward by DSR to the same backend. Every connection whose backend
/// is still there keeps working, on the same backend: 0 broken, 0 moved.
#[test]
fn connections_survive_a_load_balancing_node_leaving() {
    for cut_off in [false, true] {
        let prefix = if cut_off { [10, 101, 0] } else { [10, 102, 0] };
        let mut lab = BgpLab::new(prefix, None, &["--keep-forwarding-on-exit"]);
        assert!(lab.wait_hops(3, Duration::from_secs(15)), "nexthops: {:?}", lab.hops());
        for i in 0..3 {
            lab.lab.wait_all_healthy(i).unwrap();
        }
        let vip = SocketAddr::from((lab.lab.vip, 6443));
        let mut client = lab.lab.client.clone();
        client.timeout = Duration::from_secs(10);
        let ns = lab.lab.client_ns().name.clone();
        // 40 connections; each learns its backend from its first answer.
        let mut conns = std::thread::scope(|s| {
            s.spawn(|| {
                tests::netns::enter_by_name(&ns).unwrap();
                (0..40)
                    .map(|_| {
                        let mut c = client.connect(vip).unwrap();
                        let (_, body) = c.get("/").unwrap();
                        (c, body.trim().to_owned())
                    })
                    .collect::<Vec<_>>()
            })
            .join()
            .unwrap()
        });
        let leaving = 1;
        if cut_off {
            lab.lab.lab.switch.ip(&["link", "set", "p12", "down"]).unwrap();
            // The router notices at the hold time.
            assert!(lab.wait_hops(2, Duration::from_secs(6)), "{:?}", lab.hops());
        } else {
            lab.agents[leaving].take().unwrap().stop(libc::SIGTERM, Duration::from_secs(10)).unwrap();
            assert!(lab.wait_hops(2, Duration::from_secs(2)), "{:?}", lab.hops());
        }
        let gone = &lab.lab.nodes[leaving].name;
        let results = std::thread::scope(|s| {
            s.spawn(|| {
                tests::netns::enter_by_name(&ns).unwrap();
                conns
                    .iter_mut()
                    .filter(|(_, backend)| backend != gone)
                    .map(|(c, backend)| (backend.clone(), c.get("/").map(|(_, b)| b.trim().to_owned())))
                    .collect::<Vec<_>>()
            })
            .join()
            .unwrap()
        });
        let broken: Vec<_> = results.iter().filter(|(_, r)| r.is_err()).collect();
        let moved: Vec<_> = results.iter().filter(|(b, r)| r.as_ref().is_ok_and(|got| got != b)).collect();
        eprintln!(
            "{} node leaving: {} connections to surviving backends, {} broken, {} moved",
            if cut_off { "cut-off" } else { "SIGTERMed" },
            results.len(),
            broken.len(),
            moved.len()
        );
        assert!(results.len() >= 15, "too few connections to surviving backends: {}", results.len());
        assert!(broken.is_empty(), "broken: {broken:?}");
        assert!(moved.is_empty(), "moved: {moved:?}");
    }
}
