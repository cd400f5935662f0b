//! `cargo xtask demo`: three control-plane nodes with HTTPS apiserver stand-ins and a
//! client on one bridge, vip-agent on node n1, and what the client sees step by step.
//! Everything it creates is removed at the end, on failure, and on Ctrl-C.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use tests::{
    agent::wait_until,
    apilab::{ApiLab, FALL, HEALTH_INTERVAL, RISE},
    netns::{arping, mac_of},
    routers::{nexthops, Frr, Neighbor},
};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn step(n: u32, text: &str) -> Result<(), String> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        return Err("interrupted".into());
    }
    println!("\n[{n}] {text}");
    Ok(())
}

fn fmt_mac(m: &[u8; 6]) -> String {
    m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

fn show_counts(counts: &std::collections::BTreeMap<String, usize>, errors: &[String]) {
    let per: Vec<String> = counts.iter().map(|(n, c)| format!("{n}: {c}")).collect();
    println!("    answered by {}; failed: {}", per.join(", "), errors.len());
}

fn demo() -> Result<(), String> {
    step(1, "building the lab: client 10.60.0.2 and nodes n1..n3 (10.60.0.11-13) on one bridge, each running an HTTPS apiserver stand-in on :6443")?;
    let mut lab = ApiLab::new([10, 60, 0], 3, &[0])?;
    println!("    VIP {}; the CA and certificates are in {}", lab.vip, lab.pki.dir.display());

    step(2, "starting vip-agent on n1: --election none, DSR, backends n1,n2,n3, /readyz checks every 200 ms (rise 2, fall 2)")?;
    let mut agent = lab.start_agent(0, &["--keep-forwarding-on-exit"])?;
    println!("    every backend healthy in `vip-agent status`");

    step(3, "the client ARPs for the VIP: n1's XDP program answers with n1's MAC")?;
    let n1_mac = mac_of(lab.ns(0), "eth0")?;
    for r in arping(lab.client_ns(), "eth0", &lab.vip.to_string(), 2, 2)? {
        println!("    {} is-at {}{}", lab.vip, fmt_mac(&r), if r == n1_mac { "  (n1)" } else { "" });
    }

    step(
        4,
        "100 HTTPS requests through the VIP, each on a new connection: Maglev spreads them over the three apiservers",
    )?;
    let (counts, errors) = lab.requests(100);
    show_counts(&counts, &errors);

    step(5, "stopping n3's apiserver while requests keep flowing")?;
    let stream = lab.stream();
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    lab.stop_apiserver(2);
    if !wait_until(Duration::from_secs(5), || lab.backend_healthy(0, 2) == Some(false)) {
        return Err("n3 was never taken out".into());
    }
    let out_after = t.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let during = stream.stop();
    println!(
        "    n3 taken out of the table {} ms after it stopped (bound: fall x interval + interval = {} ms)",
        out_after.as_millis(),
        (HEALTH_INTERVAL * (FALL + 1)).as_millis()
    );
    println!(
        "    requests meanwhile: {} ok, {} failed (connections hashed to n3 before it was taken out)",
        during.counts.values().sum::<usize>(),
        during.errors.len()
    );
    let (counts, errors) = lab.requests(60);
    print!("    60 more requests:");
    show_counts(&counts, &errors);

    step(6, "starting n3's apiserver again")?;
    let t = Instant::now();
    lab.start_apiserver(2)?;
    if !wait_until(Duration::from_secs(5), || lab.backend_healthy(0, 2) == Some(true)) {
        return Err("n3 was never taken back".into());
    }
    println!(
        "    n3 back in the table {} ms after it started (rise {RISE} x {} ms)",
        t.elapsed().as_millis(),
        HEALTH_INTERVAL.as_millis()
    );
    let (counts, errors) = lab.requests(60);
    print!("    60 requests:");
    show_counts(&counts, &errors);

    step(7, "hitless restart: SIGTERM to vip-agent (started with --keep-forwarding-on-exit), then a new vip-agent, during a request stream")?;
    let stream = lab.stream();
    std::thread::sleep(Duration::from_millis(300));
    let (status, _) = agent.stop(libc::SIGTERM, Duration::from_secs(5))?;
    println!("    old agent exited ({status}); XDP still attached: {}", lab.ns(0).has_xdp("eth0")?);
    std::thread::sleep(Duration::from_millis(300));
    let mut agent = lab.start_agent(0, &[])?;
    println!("    new agent adopted the pinned maps and replaced the program atomically");
    std::thread::sleep(Duration::from_millis(300));
    let result = stream.stop();
    println!(
        "    requests across the restart: {} ok, {} failed, slowest {} ms",
        result.counts.values().sum::<usize>(),
        result.errors.len(),
        result.max_latency.as_millis()
    );

    step(8, "`vip-agent status` on n1")?;
    let out = lab
        .ns(0)
        .cmd(tests::agent::agent_bin().to_str().ok_or("path")?)
        .args(["status", "--pin-path"])
        .arg(lab.pin_path(0)?)
        .output()
        .map_err(|e| e.to_string())?;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        println!("    {line}");
    }

    step(9, "SIGTERM to vip-agent: it stops answering ARP, detaches, removes the VIP and its pins")?;
    let (status, _) = agent.stop(libc::SIGTERM, Duration::from_secs(5))?;
    println!(
        "    agent exited ({status}); XDP attached: {}; VIP on lo: {}; pins left: {}",
        lab.ns(0).has_xdp("eth0")?,
        lab.ns(0).addrs("lo")?.contains(&lab.vip.to_string()),
        lab.pin_path(0)?.exists()
    );

    step(10, "removing the lab")?;
    drop(lab);
    failover()
}

/// The high-availability scene: vip-agent on all three nodes, elected through a Lease.
fn failover() -> Result<(), String> {
    step(
        11,
        "failover: a new lab with vip-agent on every node, --election kubernetes, a Lease API stand-in at 10.63.0.5, \
         and a second, IPv6 VIP",
    )?;
    let lab = ApiLab::new([10, 63, 0], 3, &[0, 1, 2])?.with_lease_api()?.with_ipv6()?;
    let vip6 = lab.vip6.to_string();
    let mut agents = Vec::new();
    for i in 0..3 {
        agents.push(Some(lab.spawn_agent(i, &["--vip", &vip6])?));
    }
    for i in 0..3 {
        lab.wait_all_healthy(i)?;
    }
    if !wait_until(Duration::from_secs(10), || lab.leaders().len() == 1) {
        return Err("no single leader".into());
    }
    let leader = lab.leaders()[0];
    println!("    leader: {} (the others follow and drop ARP for the VIP)", lab.nodes[leader].name);
    let nd = lab.client_ns().cmd("ndisc6").args(["-1", "-n", "-r", "3", "-w", "300", &vip6, "eth0"]).output();
    let answer = nd.ok().map(|o| String::from_utf8_lossy(&o.stdout).to_string()).unwrap_or_default();
    let answer = answer.lines().find_map(|l| l.trim().strip_prefix("Target link-layer address:")).unwrap_or("none");
    println!(
        "    IPv6 VIP {vip6}: the client's Neighbor Solicitation is answered by {} ({})",
        answer.trim(),
        lab.nodes[leader].name
    );
    let (counts, errors) = lab.requests_to(lab.vip6.into(), 30);
    print!("    30 requests to [{vip6}]:6443:");
    show_counts(&counts, &errors);

    step(12, &format!("SIGKILL to the leader's agent ({})", lab.nodes[leader].name))?;
    let t = Instant::now();
    if let Some(mut a) = agents[leader].take() {
        a.stop(libc::SIGKILL, Duration::from_secs(5))?;
    }
    let new = loop {
        if let Some(n) = lab.leaders().into_iter().find(|&l| l != leader) {
            break n;
        }
        if t.elapsed() > Duration::from_secs(8) {
            return Err("nobody took over".into());
        }
    };
    println!(
        "    {} leads {} ms later (the lease expires 1 s after the last renew was seen; the killed node's XDP deadline passed first)",
        lab.nodes[new].name,
        t.elapsed().as_millis()
    );
    let (counts, errors) = lab.requests(30);
    print!("    30 requests:");
    show_counts(&counts, &errors);
    let (counts, errors) = lab.requests_to(lab.vip6.into(), 30);
    print!("    30 requests to the IPv6 VIP:");
    show_counts(&counts, &errors);

    step(
        13,
        &format!(
            "SIGTERM to the new leader's agent ({}): it hands over (ARP, Lease), drains, leaves; its apiserver keeps running",
            lab.nodes[new].name
        ),
    )?;
    let t = Instant::now();
    // Signal without waiting: the agent hands over at once, then drains before it exits.
    let mut draining = agents[new].take();
    if let Some(pid) = draining.as_ref().and_then(tests::agent::Agent::pid) {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    }
    let third = loop {
        if let Some(n) = lab.leaders().into_iter().find(|&l| l != new && l != leader) {
            break n;
        }
        if t.elapsed() > Duration::from_secs(8) {
            return Err("nobody took over after SIGTERM".into());
        }
    };
    println!(
        "    {} leads {} ms later, without waiting for the lease to expire",
        lab.nodes[third].name,
        t.elapsed().as_millis()
    );
    if let Some(mut a) = draining.take() {
        a.stop(libc::SIGTERM, Duration::from_secs(5))?;
    }
    // Its apiserver still passes /readyz, but the node no longer holds the VIP: the
    // VIP-path probe takes it out of the table.
    if !wait_until(Duration::from_secs(5), || lab.backend_healthy(third, new) == Some(false)) {
        return Err("the stopped node never left the table".into());
    }
    println!(
        "    {} out of the table {} ms after the SIGTERM (its apiserver is ready, but it no longer accepts VIP traffic)",
        lab.nodes[new].name,
        t.elapsed().as_millis()
    );
    let (counts, errors) = lab.requests(30);
    print!("    30 requests:");
    show_counts(&counts, &errors);
    drop(agents);
    drop(lab);
    bgp_scene()?;
    step(19, "removing the lab")?;
    Ok(())
}

/// BGP mode: a router in front of the nodes, every ready node advertising the VIP, and
/// kept-alive connections surviving a node leaving.
fn bgp_scene() -> Result<(), String> {
    step(
        14,
        "BGP mode: a router (FRR bgpd, AS 65001, ECMP) in front of n1..n3 (10.64.0.11-13, AS 65000); the client (10.64.100.2) reaches the VIP only through it",
    )?;
    let lab = ApiLab::routed([10, 64, 0], 3)?;
    let router = std::net::Ipv4Addr::new(10, 64, 0, 1);
    let neighbors: Vec<Neighbor> =
        lab.nodes.iter().map(|n| Neighbor { ip: n.ip, asn: 65000, password: None }).collect();
    let frr = Frr::start(
        lab.router_ns(),
        &std::env::temp_dir().join(format!("vip-demo-frr-{}", lab.lab.tag)),
        65001,
        router,
        &neighbors,
    )?;
    let args = ["--mode", "bgp", "--bgp-local-as", "65000", "--bgp-peer", "10.64.0.1:65001", "--bgp-hold-time", "3s"];
    let mut agents: Vec<Option<tests::agent::Agent>> =
        (0..3).map(|i| lab.spawn_agent(i, &args).map(Some)).collect::<Result<_, _>>()?;
    if !wait_until(Duration::from_secs(15), || nexthops(lab.router_ns(), lab.vip).len() == 3) {
        return Err(format!("the router never got three paths: {:?}", nexthops(lab.router_ns(), lab.vip)));
    }
    for n in &lab.nodes {
        println!("    router: session with {} {}", n.ip, frr.state(n.ip));
    }
    println!("    router: {} via {:?}", lab.vip, nexthops(lab.router_ns(), lab.vip));

    step(15, "100 HTTPS requests through the VIP: the router spreads them over the nodes, each node's Maglev over the apiservers")?;
    for i in 0..3 {
        lab.wait_all_healthy(i)?;
    }
    let (counts, errors) = lab.requests(100);
    show_counts(&counts, &errors);

    step(16, "30 kept-alive connections through the VIP, then SIGTERM to n2's agent: it withdraws, sends a Cease, and the router moves its flows")?;
    let vip = std::net::SocketAddr::from((lab.vip, 6443));
    let client = lab.client.clone();
    let ns = lab.client_ns().name.clone();
    let mut conns = std::thread::scope(|s| {
        s.spawn(|| {
            tests::netns::enter_by_name(&ns)?;
            (0..30)
                .map(|_| {
                    let mut c = client.connect(vip)?;
                    let (_, body) = c.get("/")?;
                    Ok((c, body.trim().to_owned()))
                })
                .collect::<Result<Vec<_>, String>>()
        })
        .join()
        .map_err(|_| "client thread panicked".to_string())?
    })?;
    let t = Instant::now();
    if let Some(a) = agents[1].as_ref() {
        a.signal(libc::SIGTERM);
    }
    if !wait_until(Duration::from_secs(3), || nexthops(lab.router_ns(), lab.vip).len() == 2) {
        return Err("n2 was never withdrawn".into());
    }
    println!(
        "    router: {} via {:?}, {} ms after the SIGTERM",
        lab.vip,
        nexthops(lab.router_ns(), lab.vip),
        t.elapsed().as_millis()
    );
    if let Some(mut a) = agents[1].take() {
        a.stop(libc::SIGTERM, Duration::from_secs(10))?;
    }

    step(17, "one more request on each kept-alive connection whose apiserver is not n2's")?;
    let results = std::thread::scope(|s| {
        s.spawn(|| {
            tests::netns::enter_by_name(&ns)?;
            Ok::<_, String>(
                conns
                    .iter_mut()
                    .filter(|(_, b)| b != "n2")
                    .map(|(c, b)| (b.clone(), c.get("/").map(|(_, got)| got.trim().to_owned())))
                    .collect::<Vec<_>>(),
            )
        })
        .join()
        .map_err(|_| "client thread panicked".to_string())?
    })?;
    let ok = results.iter().filter(|(b, r)| r.as_ref().is_ok_and(|got| got == b)).count();
    println!(
        "    {ok} of {} kept-alive connections answered by the same apiserver as before (every node has the same Maglev table and forwards by DSR)",
        results.len()
    );
    step(18, "the remaining nodes still serve new connections")?;
    let (counts, errors) = lab.requests(30);
    print!("    30 requests:");
    show_counts(&counts, &errors);
    drop(agents);
    drop(frr);
    Ok(())
}

fn main() -> std::process::ExitCode {
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe { libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t) };
    match demo() {
        Ok(()) => {
            println!("\ndemo finished, everything removed");
            std::process::ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("\ndemo failed: {err} (everything it created has been removed)");
            std::process::ExitCode::FAILURE
        }
    }
}
