//! VIP load balancing on a real kernel path: a client, the load-balancing node and three
//! DSR backends on one bridge. The node runs the data plane (leader for the VIP, DSR
//! service VIP:6443); each backend holds the VIP on `lo` without answering ARP for it and
//! serves a stand-in that greets every connection with its name.
//!
//! Needs root.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    process::{Child, Stdio},
    time::Duration,
};

use tests::{agent::wait_until, lab::Lab};
use vip_agent::{
    balancer::{BackendSpec, Balancer, ServiceSpec},
    dataplane::{AttachMode, Dataplane, Program},
    netdev,
};
use vip_common::{Config, ForwardMode, Reason, VipState};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 40, 0, 100);
const PORT: u16 = 6443;
const BACKENDS: [(&str, u8); 3] = [("b1", 11), ("b2", 12), ("b3", 13)];

/// Stand-in servers, killed on drop.
struct Servers(Vec<Child>);

impl Drop for Servers {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn build_lab() -> (Lab, Servers) {
    let mut lab = Lab::new([10, 40, 0]).unwrap();
    lab.add_host("cli", 2).unwrap();
    lab.add_host("node", 1).unwrap();
    let mut servers = Vec::new();
    for (name, last) in BACKENDS {
        let h = lab.add_host(name, last).unwrap();
        h.hold_vip_quietly(VIP).unwrap();
        servers.push(
            h.ns.cmd(env!("CARGO_BIN_EXE_vip-standin"))
                .args(["--name", name, "--listen", "0.0.0.0:6443"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
    }
    // Wait until every stand-in answers on its own address.
    let client = &lab.host("cli").ns;
    for (name, last) in BACKENDS {
        let addr = SocketAddr::from(([10, 40, 0, last], PORT));
        let up = wait_until(Duration::from_secs(10), || client.within(|| greet(addr).is_ok()).unwrap_or(false));
        assert!(up, "stand-in {name} never came up");
    }
    (lab, Servers(servers))
}

/// Connects and returns the server's greeting (its name) and the open stream.
fn greet(addr: SocketAddr) -> Result<(String, TcpStream), String> {
    let stream =
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| format!("connect {addr}: {e}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(stream.try_clone().map_err(|e| e.to_string())?)
        .read_line(&mut line)
        .map_err(|e| format!("greeting from {addr}: {e}"))?;
    Ok((line.trim().to_owned(), stream))
}

/// Sends a line on an open connection and expects it echoed.
fn echo(stream: &mut TcpStream, text: &str) -> Result<(), String> {
    writeln!(stream, "{text}").map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(stream.try_clone().map_err(|e| e.to_string())?).read_line(&mut line).map_err(|e| e.to_string())?;
    if line.trim() == text {
        Ok(())
    } else {
        Err(format!("echo {text:?} came back as {line:?}"))
    }
}

/// `n` connections through the VIP from the client; how many reached each backend.
fn spread(lab: &Lab, n: usize) -> BTreeMap<String, usize> {
    lab.host("cli")
        .ns
        .within(|| {
            let mut counts = BTreeMap::new();
            for i in 0..n {
                let (name, _) = greet(SocketAddr::from((VIP, PORT))).unwrap_or_else(|e| panic!("connection {i}: {e}"));
                *counts.entry(name).or_insert(0) += 1;
            }
            counts
        })
        .unwrap()
}

fn spec(down: Option<&str>) -> ServiceSpec {
    let backends = BACKENDS
        .iter()
        .map(|&(name, last)| BackendSpec {
            healthy: Some(name) != down,
            ..BackendSpec::up(Ipv4Addr::new(10, 40, 0, last), [0x02, 0, 0, 0, 0, last])
        })
        .collect();
    ServiceSpec { vip: VIP.into(), port: PORT, mode: ForwardMode::Dsr, m: 65537, backends }
}

#[test]
fn connections_spread_over_backends_and_survive_a_table_change() {
    let (lab, _servers) = build_lab();
    let node = lab.host("node");
    node.ns
        .within(|| {
            let mut dp = Dataplane::load().expect("load (needs root)");
            let dev = netdev::lookup(&node.dev).unwrap();
            dp.maps_mut().set_config(&Config::new(dev.mac.0, node.ip.octets())).unwrap();
            dp.maps_mut().set_vip(VIP, VipState::leader_until(VipState::FOREVER)).unwrap();
            let mut lb = Balancer::default();
            lb.apply(dp.maps_mut(), &spec(None)).unwrap();
            dp.attach(Program::Vip, &dev, AttachMode::Skb).unwrap();

            // 300 connections land on all three backends, each with 20–47 % of them.
            let counts = spread(&lab, 300);
            eprintln!("300 connections: {counts:?}");
            assert_eq!(counts.values().sum::<usize>(), 300);
            for (name, _) in BACKENDS {
                let n = counts.get(name).copied().unwrap_or(0);
                assert!((60..=141).contains(&n), "{name} got {n} of 300 connections: {counts:?}");
            }
            assert!(dp.maps().counter(Reason::ForwardedDsr).unwrap() >= 300 * 3, "not forwarded by XDP");

            // An open connection to a healthy backend keeps working while another backend
            // is marked down and the table changes under it.
            let (held_by, mut held) =
                lab.host("cli").ns.within(|| greet(SocketAddr::from((VIP, PORT)))).unwrap().unwrap();
            let victim = BACKENDS.iter().map(|(n, _)| *n).find(|n| *n != held_by).unwrap();
            echo(&mut held, "before").unwrap();
            let applied = lb.apply(dp.maps_mut(), &spec(Some(victim))).unwrap();
            assert!(applied.flipped);
            echo(&mut held, "after the table change").unwrap();

            // New connections avoid the backend marked down.
            let counts = spread(&lab, 100);
            eprintln!("100 connections with {victim} down: {counts:?}");
            assert_eq!(counts.get(victim), None, "{victim} is down but got connections: {counts:?}");
            assert_eq!(counts.values().sum::<usize>(), 100);
            echo(&mut held, "still").unwrap();

            // Back up: it takes connections again.
            lb.apply(dp.maps_mut(), &spec(None)).unwrap();
            let counts = spread(&lab, 100);
            assert!(counts.get(victim).copied().unwrap_or(0) > 0, "{victim} is back but gets nothing: {counts:?}");
        })
        .unwrap();
}
