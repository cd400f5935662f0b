//! `cargo xtask demo`: a client and a node namespace on one link, vip-agent on the node,
//! and what a client sees step by step. Everything it creates is removed at the end, on
//! failure, and on Ctrl-C.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use tests::{
    agent::{wait_until, Agent},
    netns::{arping, mac_of, unique_tag, veth, Netns},
};

const VIP: &str = "10.42.0.100";

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

fn show_replies(replies: &[[u8; 6]]) {
    if replies.is_empty() {
        println!("    no reply");
    }
    for r in replies {
        println!("    reply: {VIP} is-at {}", fmt_mac(r));
    }
}

fn demo() -> Result<(), String> {
    let tag = unique_tag();
    step(1, "building the lab: namespaces 'client' (10.42.0.2) and 'node' (10.42.0.1) on a veth link")?;
    let node = Netns::new(&tag, "node")?;
    let client = Netns::new(&tag, "cli")?;
    veth(&node, "vn0", &client, "vc0")?;
    node.ip(&["addr", "add", "10.42.0.1/24", "dev", "vn0"])?;
    client.ip(&["addr", "add", "10.42.0.2/24", "dev", "vc0"])?;
    let node_mac = mac_of(&node, "vn0")?;
    println!("    node MAC {}; namespaces {} and {}", fmt_mac(&node_mac), node.name, client.name);

    step(2, &format!("before vip-agent runs: client ARPs for the VIP {VIP}"))?;
    show_replies(&arping(&client, "vc0", VIP, 1, 1)?);

    step(3, "starting: vip-agent run --interface vn0 --vip 10.42.0.100 --election none --xdp-mode skb")?;
    let mut agent =
        Agent::spawn(&node, &["run", "--interface", "vn0", "--vip", VIP, "--election", "none", "--xdp-mode", "skb"])?;
    if !wait_until(Duration::from_secs(10), || node.has_xdp("vn0").unwrap_or(false)) {
        return Err("vip-agent did not attach within 10 s".into());
    }
    println!("    XDP program attached to vn0");

    step(4, "client ARPs for the VIP: the node's XDP program answers with the node's MAC")?;
    let replies = arping(&client, "vc0", VIP, 3, 3)?;
    show_replies(&replies);
    if replies != vec![node_mac; 3] {
        return Err("expected three replies from the node".into());
    }

    step(5, "SIGTERM to vip-agent: it stops answering and detaches")?;
    let (status, _log) = agent.stop(libc::SIGTERM, Duration::from_secs(5))?;
    println!("    vip-agent exited: {status}; XDP attached: {}", node.has_xdp("vn0")?);
    show_replies(&arping(&client, "vc0", VIP, 1, 1)?);

    step(6, "removing the lab")?;
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
