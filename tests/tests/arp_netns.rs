//! The ARP responder on a real kernel path: a client namespace and a node namespace
//! joined by a veth pair, `arping` from the client.
//!
//! The node holds the VIP on `lo`, as every node does in DSR mode, so its kernel answers
//! ARP for it unless the data plane drops the request: the follower case proves the drop,
//! the leader case proves the XDP reply (counted by the program, carrying the node's MAC).
//!
//! Needs root. Every namespace is unique to the test and removed when it ends.

use std::time::Duration;

use tests::{
    agent::{pin_dir, run_to_exit, unprivileged, wait_until, Agent},
    netns::{arping, mac_of, veth, Netns},
};
use vip_agent::{
    dataplane::{AttachMode, Dataplane, Program},
    netdev,
};
use vip_common::{Config, Reason, VipState};

const VIP: &str = "10.31.0.100";
const NODE_DEV: &str = "vn0";
const CLIENT_DEV: &str = "vc0";

/// The issue-2 command on the node's veth (no backends: ARP only, VIP traffic to the
/// node's own stack), in SKB mode, pins in `pins`.
fn agent_args(pins: &std::path::Path) -> Vec<String> {
    ["run", "--interface", NODE_DEV, "--vip", VIP, "--election", "none", "--xdp-mode", "skb", "--pin-path"]
        .iter()
        .map(|s| s.to_string())
        .chain([pins.display().to_string()])
        .collect()
}

/// `vip-agent run` in BGP mode on the node's veth (AS 65000, `peers` as `--bgp-peer`
/// takes them), forwarding locally, pins in `pins`.
fn bgp_args<'a>(peers: &'a str, pins: &'a str) -> Vec<&'a str> {
    let mut args = vec!["run", "--interface", NODE_DEV, "--vip", VIP, "--mode", "bgp", "--bgp-local-as", "65000"];
    args.extend(["--bgp-peer", peers, "--forward", "local", "--pin-path", pins]);
    args
}

/// `vip-agent status --output json` against the pins of an agent in `ns`: the JSON, or
/// status's error.
fn try_status_json(ns: &Netns, pins: &std::path::Path) -> Result<serde_json::Value, String> {
    let out = ns
        .cmd(tests::agent::agent_bin().to_str().unwrap())
        .args(["status", "--output", "json", "--pin-path"])
        .arg(pins)
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
}

/// [`try_status_json`] once the agent is up.
fn status_json(ns: &Netns, pins: &std::path::Path) -> serde_json::Value {
    try_status_json(ns, pins).unwrap_or_else(|e| panic!("status failed: {e}"))
}

/// Whether the agent in `ns` has pinned all its maps and leads. (While it starts, its
/// maps are pinned one after the other and status may find only some of them.)
fn leads(ns: &Netns, pins: &std::path::Path) -> bool {
    try_status_json(ns, pins).is_ok_and(|s| s["vips"][0]["leader"] == true)
}

/// Nothing of an agent is left on the node: no program attached, `lo` as it was
/// (`lo_before`), no pins; `what` names the case in a failure.
fn assert_nothing_left(lab: &Lab, lo_before: &str, pins: &std::path::Path, what: &str) {
    assert!(!lab.node.has_xdp(NODE_DEV).unwrap(), "{what}: left XDP attached");
    assert_eq!(lab.node.addrs("lo").unwrap(), lo_before, "{what}: changed lo");
    assert!(!pins.exists(), "{what}: left pins behind");
}

struct Lab {
    // Field order is drop order: namespaces go last.
    client: Netns,
    node: Netns,
}

/// Client 10.31.0.2 and node 10.31.0.1 on one veth; the node holds `vip_on_lo` on `lo`.
fn lab(vip_on_lo: bool) -> Lab {
    let tag = tests::netns::unique_tag();
    let node = Netns::new(&tag, "node").unwrap();
    let client = Netns::new(&tag, "cli").unwrap();
    veth(&node, NODE_DEV, &client, CLIENT_DEV).unwrap();
    node.ip(&["addr", "add", "10.31.0.1/24", "dev", NODE_DEV]).unwrap();
    client.ip(&["addr", "add", "10.31.0.2/24", "dev", CLIENT_DEV]).unwrap();
    if vip_on_lo {
        node.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"]).unwrap();
    }
    Lab { client, node }
}

fn set_role(dp: &mut Dataplane, role: VipState) {
    dp.maps_mut().set_vip(VIP.parse::<std::net::IpAddr>().unwrap(), role).unwrap();
}

/// Loads the data plane in-process, attaches it to the node's veth in `mode` (and, for
/// native mode, the pass program to the client's veth so XDP_TX frames are delivered),
/// then flips the node between leader and follower through the map and checks what the
/// client sees each time.
fn leader_replies_and_follower_drops(mode: AttachMode) {
    let lab = lab(true);
    // Control: without the data plane, the node's kernel answers for the VIP on lo.
    let node_mac = mac_of(&lab.node, NODE_DEV).unwrap();
    assert_eq!(arping(&lab.client, CLIENT_DEV, VIP, 1, 2).unwrap(), vec![node_mac], "kernel should answer before XDP");

    let node = &lab.node;
    let client = &lab.client;
    node.within(|| {
        let mut dp = Dataplane::load().expect("load (needs root)");
        let dev = netdev::lookup(NODE_DEV).unwrap();
        assert_eq!(dev.mac.0, node_mac);
        dp.maps_mut().set_config(&Config::new(dev.mac.0, [0; 4])).unwrap();
        set_role(&mut dp, VipState::follower());
        if mode == AttachMode::Native {
            client.enter().unwrap();
            let peer = netdev::lookup(CLIENT_DEV).unwrap();
            dp.attach(Program::Pass, &peer, AttachMode::Native).unwrap();
            node.enter().unwrap();
        }
        dp.attach(Program::Vip, &dev, mode).unwrap();

        // Follower: the request is dropped before the kernel sees it.
        let dropped = dp.maps().counter(Reason::ArpFollowerDropped).unwrap();
        let replies = arping(client, CLIENT_DEV, VIP, 2, 2).unwrap();
        assert!(replies.is_empty(), "{mode}: follower must not answer, got {replies:02x?}");
        assert!(dp.maps().counter(Reason::ArpFollowerDropped).unwrap() >= dropped + 2);

        // Leader: XDP answers with the node's MAC.
        set_role(&mut dp, VipState::leader_until(VipState::FOREVER));
        let replied = dp.maps().counter(Reason::ArpReplied).unwrap();
        let replies = arping(client, CLIENT_DEV, VIP, 3, 3).unwrap();
        assert_eq!(replies, vec![node_mac; 3], "{mode}: leader must answer every request");
        assert!(dp.maps().counter(Reason::ArpReplied).unwrap() >= replied + 3, "{mode}: replies must come from XDP");

        // And back: leadership moves by a map write alone.
        set_role(&mut dp, VipState::follower());
        assert!(arping(client, CLIENT_DEV, VIP, 2, 2).unwrap().is_empty(), "{mode}: demoted node still answers");

        // A leader whose deadline has passed stops answering by itself (fencing).
        set_role(&mut dp, VipState::leader_until(1));
        assert!(arping(client, CLIENT_DEV, VIP, 2, 2).unwrap().is_empty(), "{mode}: expired leader still answers");
    })
    .unwrap();
    // The Dataplane dropped with the thread: nothing may stay attached.
    assert!(!lab.node.has_xdp(NODE_DEV).unwrap());
    assert!(!lab.client.has_xdp(CLIENT_DEV).unwrap());
}

#[test]
fn leader_replies_and_follower_drops_in_skb_mode() {
    leader_replies_and_follower_drops(AttachMode::Skb);
}

#[test]
fn leader_replies_and_follower_drops_in_native_mode() {
    leader_replies_and_follower_drops(AttachMode::Native);
}

#[test]
fn agent_answers_arp_until_sigterm_then_detaches() {
    // Nobody holds the VIP before the agent starts. The agent puts it on lo with
    // arp_ignore=1, so replies can only come from its XDP program (and it counts them).
    let lab = lab(false);
    let node_mac = mac_of(&lab.node, NODE_DEV).unwrap();
    assert!(arping(&lab.client, CLIENT_DEV, VIP, 1, 1).unwrap().is_empty(), "nobody should own the VIP yet");

    let pins = pin_dir(&lab.node.name).unwrap();
    let mut agent = Agent::spawn(&lab.node, &agent_args(&pins)).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || lab.node.has_xdp(NODE_DEV).unwrap_or(false)),
        "agent never attached"
    );
    // It claims the VIP once its ARP probe found nobody else answering.
    assert!(wait_until(Duration::from_secs(5), || leads(&lab.node, &pins)));
    assert_eq!(arping(&lab.client, CLIENT_DEV, VIP, 3, 3).unwrap(), vec![node_mac; 3]);

    assert!(lab.node.addrs("lo").unwrap().contains(VIP), "VIP not on lo while serving");
    let status = status_json(&lab.node, &pins);
    assert!(status["counters"]["arp_replied"].as_u64().unwrap_or(0) >= 3, "replies not from XDP: {status}");
    assert_eq!(status["vips"][0]["leader"], serde_json::json!(true), "{status}");

    let (status, log) = agent.stop(libc::SIGTERM, Duration::from_secs(5)).unwrap();
    assert!(status.success(), "agent exited with {status}: {log}");
    assert!(log.contains("stopped cleanly"), "{log}");
    assert!(!lab.node.has_xdp(NODE_DEV).unwrap(), "program left attached after SIGTERM");
    assert!(!lab.node.addrs("lo").unwrap().contains(VIP), "VIP left on lo after SIGTERM");
    assert!(!pins.exists(), "pins left behind after SIGTERM: {}", pins.display());
    assert!(arping(&lab.client, CLIENT_DEV, VIP, 1, 1).unwrap().is_empty(), "VIP still answered after stop");
}

#[test]
fn agent_stops_on_sigint_too() {
    let lab = lab(false);
    let pins = pin_dir(&lab.node.name).unwrap();
    let mut agent = Agent::spawn(&lab.node, &agent_args(&pins)).unwrap();
    assert!(wait_until(Duration::from_secs(10), || lab.node.has_xdp(NODE_DEV).unwrap_or(false)));
    let (status, log) = agent.stop(libc::SIGINT, Duration::from_secs(5)).unwrap();
    assert!(status.success(), "{log}");
    assert!(!lab.node.has_xdp(NODE_DEV).unwrap());
    assert!(!pins.exists());
}

/// Bad input: a clear error naming the bad value, a non-zero exit, nothing attached and
/// no address added.
#[test]
fn bad_input_fails_cleanly_and_leaves_nothing_behind() {
    let lab = lab(false);
    let lo_before = lab.node.addrs("lo").unwrap();
    let pins = pin_dir(&lab.node.name).unwrap();
    let pins_s = pins.display().to_string();
    let cases: &[(&[&str], i32, &str)] = &[
        (&["--interface", "nope0", "--vip", VIP, "--election", "none"], 1, "interface \"nope0\" not found"),
        (&["--interface", NODE_DEV, "--vip", "10.31.0.300", "--election", "none"], 2, "'10.31.0.300'"),
        (&["--interface", NODE_DEV, "--vip", "239.1.1.1", "--election", "none"], 1, "--vip 239.1.1.1"),
        (&["--interface", "lo", "--vip", VIP, "--election", "none"], 1, "interface \"lo\" is not an Ethernet"),
        (&["--interface", "a/b", "--vip", VIP, "--election", "none"], 1, "invalid interface name \"a/b\""),
        (&["--interface", NODE_DEV, "--vip", VIP, "--election", "sometimes"], 2, "'sometimes'"),
        (&["--interface", NODE_DEV, "--vip", VIP, "--election", "none", "--xdp-mode", "turbo"], 2, "'turbo'"),
        (
            &["--interface", NODE_DEV, "--vip", VIP, "--election", "none", "--maglev-size", "1000"],
            1,
            "1000 is not prime",
        ),
        (&["--interface", NODE_DEV, "--vip", VIP, "--election", "none", "--port", "0"], 1, "--port 0"),
        (&["--interface", NODE_DEV, "--vip", VIP, "--election", "none", "--backend", VIP], 1, "is the VIP itself"),
        (
            &["--interface", NODE_DEV, "--vip", VIP, "--election", "none", "--backend", "10.31.0.5,10.31.0.5"],
            1,
            "given twice",
        ),
        (
            &[
                "--interface",
                NODE_DEV,
                "--vip",
                VIP,
                "--election",
                "none",
                "--backend",
                "10.31.0.5",
                "--health-ca",
                "/nonexistent/ca.pem",
            ],
            1,
            "/nonexistent/ca.pem",
        ),
        (&["--interface", NODE_DEV, "--vip", VIP, "--election", "none", "--backend", "10.31.0.5"], 1, "need a CA"),
        (
            &[
                "--interface",
                NODE_DEV,
                "--vip",
                VIP,
                "--election",
                "none",
                "--forward",
                "local",
                "--metrics-addr",
                "10.99.99.99:1",
            ],
            1,
            "--metrics-addr 10.99.99.99:1",
        ),
        (
            &["--interface", NODE_DEV, "--vip", VIP, "--lease-name", "VIP"],
            1,
            "--lease-name \"VIP\": not a DNS-1123 subdomain",
        ),
        (
            &["--interface", NODE_DEV, "--vip", VIP, "--lease-namespace", "kube_system"],
            1,
            "--lease-namespace \"kube_system\": not a DNS-1123 label",
        ),
    ];
    for (args, code, needle) in cases {
        let mut full: Vec<&str> = vec!["run"];
        full.extend_from_slice(args);
        if !args.contains(&"--forward") && !args.contains(&"--backend") {
            full.extend_from_slice(&["--forward", "local"]);
        }
        full.extend_from_slice(&["--pin-path", &pins_s]);
        let args = &full;
        let (status, stderr) =
            run_to_exit(&lab.node, args, Duration::from_secs(10)).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        assert_eq!(status.code(), Some(*code), "{args:?}: {stderr}");
        let first = stderr.lines().next().unwrap_or_default();
        assert!(first.contains(needle), "{args:?}: first line {first:?} should name {needle:?}");
        if *code == 1 {
            assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: error should be one line: {stderr}");
        }
        assert_nothing_left(&lab, &lo_before, &pins, &format!("{args:?}"));
    }
    // BGP needs the interface's IPv4 address as next hop: refused before anything changes.
    lab.node.ip(&["addr", "del", "10.31.0.1/24", "dev", NODE_DEV]).unwrap();
    let bgp = bgp_args("10.31.0.2:65001", &pins_s);
    let (status, stderr) = run_to_exit(&lab.node, &bgp, Duration::from_secs(10)).unwrap();
    lab.node.ip(&["addr", "add", "10.31.0.1/24", "dev", NODE_DEV]).unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("no IPv4 address to use as next hop"), "{stderr}");
    assert_nothing_left(&lab, &lo_before, &pins, "BGP without IPv4");
    // A BGP peer that is this node's own address: refused, not retried for ever.
    let bgp = bgp_args("10.31.0.1:65001", &pins_s);
    let (status, stderr) = run_to_exit(&lab.node, &bgp, Duration::from_secs(10)).unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("--bgp-peer 10.31.0.1 is an address of this node"), "{stderr}");
    assert!(!lab.node.has_xdp(NODE_DEV).unwrap() && !pins.exists(), "a peer on this node left state behind");
}

/// BGP routes name the interface's address as their next hop, which a router reached
/// through another interface may not reach: such a peer is warned of at start, by
/// address; a peer on the interface's own link is not.
#[test]
fn a_bgp_peer_reached_through_another_interface_is_warned_of() {
    let lab = lab(false);
    lab.node.ip(&["link", "set", "lo", "up"]).unwrap();
    lab.node.ip(&["route", "add", "10.99.0.2/32", "dev", "lo"]).unwrap();
    let pins = pin_dir(&lab.node.name).unwrap();
    let pins_s = pins.display().to_string();
    let mut args = bgp_args("10.99.0.2:65001,10.31.0.2:65002", &pins_s);
    args.extend(["--xdp-mode", "skb"]);
    let mut agent = tests::agent::Agent::spawn(&lab.node, &args).unwrap();
    // The check runs before the data plane is opened: pins mean it is done.
    let started = tests::agent::wait_until(Duration::from_secs(10), || pins.exists());
    // With no backend to check, BGP's wait for the first checks ends at once (within a
    // second, not at its bound of two intervals and timeouts, 4 s).
    let eligible = tests::agent::wait_until(Duration::from_secs(1), || {
        try_status_json(&lab.node, &pins).is_ok_and(|s| s["agent"]["eligible"] == true)
    });
    let (_, log) = agent.stop(libc::SIGTERM, Duration::from_secs(10)).unwrap();
    assert!(started, "the agent never opened its data plane:\n{log}");
    assert!(eligible && !log.contains("carrying the VIPs anyway"), "waited for checks there are none of:\n{log}");
    let warned: Vec<&str> = log.lines().filter(|l| l.contains("reached through another interface")).collect();
    assert_eq!(warned.len(), 1, "one warning, for the off-link peer only:\n{log}");
    assert!(warned[0].contains("peer=10.99.0.2"), "{}", warned[0]);
}

/// Every flag reads `VIP_<FLAG>` too (manifests configure the agent that way): with the
/// interface, VIP, election and mode only in the environment, the agent serves. A
/// misspelled `VIP_` variable is warned of, by name (it was ignored without a word).
#[test]
fn flags_come_from_the_environment() {
    let lab = lab(false);
    let node_mac = mac_of(&lab.node, NODE_DEV).unwrap();
    let bin = tests::agent::agent_bin();
    let pins = pin_dir(&lab.node.name).unwrap();
    let log_path = std::env::temp_dir().join(format!("vip-env-{}.log", std::process::id()));
    let log_file = std::fs::File::create(&log_path).unwrap();
    let mut child = lab
        .node
        .cmd(bin.to_str().unwrap())
        .arg("run")
        .env("VIP_INTERFACE", NODE_DEV)
        .env("VIP_VIP", VIP)
        .env("VIP_ELECTION", "none")
        .env("VIP_XDP_MODE", "skb")
        .env("VIP_FORWARD", "local")
        .env("VIP_PIN_PATH", &pins)
        .env("VIP_HEALTH_INTERVL", "1s")
        .stderr(log_file)
        .spawn()
        .unwrap();
    let attached =
        wait_until(Duration::from_secs(10), || lab.node.has_xdp(NODE_DEV).unwrap_or(false) && leads(&lab.node, &pins));
    let replies = arping(&lab.client, CLIENT_DEV, VIP, 1, 2).unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    let _ = std::fs::remove_file(&log_path);
    assert!(attached, "agent configured from the environment never attached:\n{log}");
    assert_eq!(replies, vec![node_mac]);
    let warned: Vec<&str> = log.lines().filter(|l| l.contains("no flag reads this variable")).collect();
    assert_eq!(warned.len(), 1, "one warning, for the misspelled variable:\n{log}");
    assert!(warned[0].contains("VIP_HEALTH_INTERVL"), "{}", warned[0]);
}

/// A log reader that goes away (a closed pipe) does not stop the agent: it logs on
/// into nothing and, on SIGTERM, cleans up as always. It panicked at its next log line
/// (tracing-subscriber reports a failed write with `eprintln!`), leaving the VIP on
/// `lo`, the program attached and the pins (found by a new-user trial).
#[test]
fn a_closed_log_pipe_neither_stops_the_agent_nor_leaves_anything_behind() {
    let lab = lab(false);
    let lo_before = lab.node.addrs("lo").unwrap();
    let bin = tests::agent::agent_bin();
    let pins = pin_dir(&lab.node.name).unwrap();
    let mut child = lab
        .node
        .cmd(bin.to_str().unwrap())
        .args(agent_args(&pins))
        .args(["--forward", "local"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let serving = wait_until(Duration::from_secs(10), || leads(&lab.node, &pins));
    drop(child.stderr.take());
    // Lines it logs now go nowhere: an ARP conflict is one, and SIGTERM's hand-over more.
    std::thread::sleep(Duration::from_millis(300));
    let alive = child.try_wait().unwrap().is_none();
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let exited = wait_until(Duration::from_secs(10), || child.try_wait().unwrap().is_some());
    if !exited {
        let _ = child.kill();
    }
    let status = child.wait().unwrap();
    assert!(serving, "the agent never led");
    assert!(alive, "the agent died when its log pipe closed: {status:?}");
    assert!(status.success(), "{status:?}");
    assert_nothing_left(&lab, &lo_before, &pins, "after a closed log pipe");
}

/// Every signal that would end the agent by default ends it cleanly instead: SIGHUP
/// (the terminal of an agent run in the foreground closed) and SIGQUIT stop it as
/// SIGTERM does, leaving nothing behind; SIGUSR1 and SIGUSR2 are logged and ignored. A
/// new-user trial found SIGHUP killing the agent silently, its VIP left on `lo` and its
/// program answering ARP with nobody to fence it (`--election none`).
#[test]
fn a_hangup_stops_the_agent_cleanly_and_user_signals_are_ignored() {
    let lab = lab(false);
    let lo_before = lab.node.addrs("lo").unwrap();
    for stop in [libc::SIGHUP, libc::SIGQUIT] {
        let pins = pin_dir(&lab.node.name).unwrap();
        let mut agent = Agent::spawn(&lab.node, &agent_args(&pins)).unwrap();
        assert!(wait_until(Duration::from_secs(10), || leads(&lab.node, &pins)), "signal {stop}: never led");
        for ignored in [libc::SIGUSR1, libc::SIGUSR2] {
            let pid = agent.pid().unwrap() as i32;
            // SAFETY: plain kill(2) on our own child.
            unsafe { libc::kill(pid, ignored) };
        }
        std::thread::sleep(Duration::from_millis(300));
        assert!(agent.running() && leads(&lab.node, &pins), "a user signal stopped the agent");
        let (status, log) = agent.stop(stop, Duration::from_secs(10)).unwrap();
        assert!(status.success(), "signal {stop}: {status:?}\n{log}");
        assert_eq!(log.matches("ignored (it has no meaning here)").count(), 2, "{log}");
        assert!(log.contains("stopping"), "signal {stop}: no clean stop logged:\n{log}");
        assert_nothing_left(&lab, &lo_before, &pins, &format!("signal {stop}"));
    }
}

/// The ARP sysctls an agent changed are put back by whichever agent stops cleanly, even
/// after kept restarts in between: the values carried in the pins are the first agent's
/// originals, not the 1 and 2 the next agent found (a new-user trial saw them left at
/// 1 and 2 after an uninstall).
#[test]
fn the_original_sysctls_come_back_after_a_kept_restart_and_a_clean_stop() {
    let lab = lab(false);
    let sysctl = |key: &str| {
        let path = format!("/proc/sys/net/ipv4/conf/{NODE_DEV}/{key}");
        lab.node.within(|| std::fs::read_to_string(&path).unwrap().trim().to_owned()).unwrap()
    };
    lab.node.sysctl(&format!("net.ipv4.conf.{NODE_DEV}.arp_ignore"), "0").unwrap();
    lab.node.sysctl(&format!("net.ipv4.conf.{NODE_DEV}.arp_announce"), "1").unwrap();
    let pins = pin_dir(&lab.node.name).unwrap();
    let mut kept_args = agent_args(&pins);
    kept_args.push("--keep-forwarding-on-exit".into());
    for (args, kept) in [(&kept_args, true), (&kept_args, true), (&agent_args(&pins), false)] {
        let mut agent = Agent::spawn(&lab.node, args).unwrap();
        assert!(wait_until(Duration::from_secs(10), || leads(&lab.node, &pins)), "never led");
        assert_eq!((sysctl("arp_ignore"), sysctl("arp_announce")), ("1".into(), "2".into()));
        let (status, log) = agent.stop(libc::SIGTERM, Duration::from_secs(10)).unwrap();
        assert!(status.success(), "{log}");
        assert_eq!(pins.exists(), kept, "{log}");
    }
    assert_eq!((sysctl("arp_ignore"), sysctl("arp_announce")), ("0".into(), "1".into()), "not the originals");
}

#[test]
fn missing_privileges_fail_cleanly() {
    let lab = lab(false);
    let bin = tests::agent::agent_bin();
    let pins = pin_dir(&lab.node.name).unwrap();
    let out = unprivileged(&lab.node).arg(&bin).args(agent_args(&pins)).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("missing capabilities") && stderr.contains("CAP_BPF"), "{stderr}");
    assert!(!lab.node.has_xdp(NODE_DEV).unwrap());
}

/// The data plane's debug log: with `RUST_LOG` enabling debug for `vip_ebpf`, a rare
/// event (here an ARP request for the VIP with a protocol address length of 6) reaches
/// the agent's log, named by kind; with the default filter the program is loaded with its
/// log off and nothing is logged (the frame is still counted).
#[test]
fn rare_data_plane_events_reach_the_agent_log_only_when_asked() {
    for debug in [true, false] {
        let lab = lab(false);
        let pins = pin_dir(&lab.node.name).unwrap();
        let filter = debug.then_some("info,vip_ebpf=debug");
        let mut agent = Agent::spawn_with_log_filter(&lab.node, &agent_args(&pins), filter).unwrap();
        let leads = wait_until(Duration::from_secs(10), || agent.running() && leads(&lab.node, &pins));
        if !leads {
            let (_, log) = agent.stop(libc::SIGTERM, Duration::from_secs(5)).unwrap_or_default();
            panic!("never led (debug log {debug}):\n{log}");
        }
        let client_mac = mac_of(&lab.client, CLIENT_DEV).unwrap();
        let vip: std::net::Ipv4Addr = VIP.parse().unwrap();
        let mut frame = vec![0xff; 6];
        frame.extend(client_mac);
        // ARP, Ethernet/IPv4, hlen 6, plen 6 (wrong), request.
        frame.extend([0x08, 0x06, 0, 1, 0x08, 0, 6, 6, 0, 1]);
        frame.extend(client_mac);
        frame.extend([10, 31, 0, 2, 0, 0]);
        frame.extend([0; 6]);
        frame.extend(vip.octets());
        frame.extend([0, 0]);
        let (ns, dev) = (lab.client.name.clone(), CLIENT_DEV);
        std::thread::spawn(move || tests::netns::send_raw_frame(&ns, dev, &frame)).join().unwrap().unwrap();
        assert!(
            wait_until(Duration::from_secs(2), || status_json(&lab.node, &pins)["counters"]["arp_malformed"] == 1),
            "the malformed request was not counted"
        );
        std::thread::sleep(Duration::from_millis(300));
        let (_, log) = agent.stop(libc::SIGTERM, Duration::from_secs(5)).unwrap();
        let logged = log.lines().any(|l| l.contains("frame arp_malformed on ifindex"));
        assert_eq!(logged, debug, "debug log {debug}:\n{log}");
        assert!(log.contains(&format!("debug_log={debug}")), "{log}");
    }
}

/// At tcx the kernel has already moved a frame's outer VLAN tag into the skb when the
/// program runs: a request for the (untagged) VIP that arrived tagged 100 must still be
/// seen as VLAN 100's, counted as another segment's and never answered (read from the
/// frame alone it would look untagged, and be answered on VLAN 100).
#[test]
fn at_tcx_a_request_tagged_for_another_vlan_is_not_answered() {
    if !tests::kernel_has_tcx() {
        return;
    }
    let lab = lab(false);
    let pins = pin_dir(&lab.node.name).unwrap();
    let mut args = agent_args(&pins);
    args.extend(["--attach".into(), "tcx".into()]);
    let mut agent = Agent::spawn(&lab.node, &args).unwrap();
    assert!(wait_until(Duration::from_secs(10), || leads(&lab.node, &pins)), "never led");
    let node_mac = mac_of(&lab.node, NODE_DEV).unwrap();
    assert_eq!(arping(&lab.client, CLIENT_DEV, VIP, 1, 1).unwrap(), vec![node_mac], "untagged request not answered");

    let client_mac = mac_of(&lab.client, CLIENT_DEV).unwrap();
    let vip: std::net::Ipv4Addr = VIP.parse().unwrap();
    let mut frame = vec![0xff; 6];
    frame.extend(client_mac);
    // 802.1Q, VID 100, then an ARP request for the VIP from the client.
    frame.extend([0x81, 0x00, 0x00, 100, 0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    frame.extend(client_mac);
    frame.extend([10, 31, 0, 2]);
    frame.extend([0; 6]);
    frame.extend(vip.octets());
    let capture = tests::netns::capture_arp(&lab.client, CLIENT_DEV, Duration::from_millis(800));
    std::thread::sleep(Duration::from_millis(100));
    let (ns, dev) = (lab.client.name.clone(), CLIENT_DEV);
    std::thread::spawn(move || tests::netns::send_raw_frame(&ns, dev, &frame)).join().unwrap().unwrap();
    // Replies from the node to the client (its gratuitous ARPs go to broadcast).
    let replies: Vec<_> = capture
        .join()
        .unwrap()
        .unwrap()
        .into_iter()
        .filter(|f| f.len() >= 12 && f[0..6] == client_mac && f[6..12] == node_mac)
        .collect();
    assert!(replies.is_empty(), "answered a request tagged 100: {replies:02x?}");
    let status = status_json(&lab.node, &pins);
    assert_eq!(status["counters"]["other_segment"], 1, "{status}");
    let (exit, log) = agent.stop(libc::SIGTERM, Duration::from_secs(5)).unwrap();
    assert!(exit.success(), "{log}");
}
