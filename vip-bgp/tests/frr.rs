//! Interop with a real FRR bgpd (Debian's `frr`, 8.4), as root, in network namespaces of
//! our own: a router namespace (bridge `br0`, 10.201.0.1/24, zebra and bgpd in AS 65001)
//! and one namespace per node (10.201.0.11, .12, ... on `eth0`), where the speaker runs on
//! a tokio current-thread runtime owned by a thread that entered the namespace.
//!
//! Every lab deletes its namespaces and kills what runs in them when dropped, even when a
//! test panics. The host's own network is never touched.

use std::{
    fs::File,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpListener},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use ipnet::Ipv4Net;
use serde_json::Value;
use tokio::sync::oneshot;
use vip_bgp::{
    codec::{self, Message, Open},
    session::State,
    speaker::{PeerConfig, PeerStatus, Speaker, SpeakerConfig, SpeakerHandle},
};

const ROUTER: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 1);
const ROUTER_AS: u32 = 65001;
const NODE_AS: u32 = 65000;
const VIP: &str = "192.0.2.10/32";
const FRR_DIR: &str = "/usr/lib/frr";
/// Upper bound for anything that should happen "at once" on a veth pair.
const PROMPT: Duration = Duration::from_millis(500);
/// Upper bound for a session to come up: TCP, OPENs, KEEPALIVEs, FRR's processing.
const SESSION_UP: Duration = Duration::from_secs(10);

fn vip() -> Ipv4Net {
    VIP.parse().unwrap()
}

fn node_address(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 201, 0, 11 + index as u8)
}

/// Runs a command, returning stdout, or stderr as the error.
fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program).args(args).output().map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{program} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        ))
    }
}

fn ip(args: &[&str]) {
    if let Err(err) = run("ip", args) {
        panic!("{err}");
    }
}

/// Polls `probe` every 20 ms until it returns something or `limit` passes.
fn wait_for<T>(limit: Duration, mut probe: impl FnMut() -> Option<T>) -> Option<T> {
    let start = Instant::now();
    loop {
        if let Some(value) = probe() {
            return Some(value);
        }
        if start.elapsed() > limit {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Namespaces, links and (optionally) FRR, torn down on drop.
struct Lab {
    router_ns: String,
    node_ns: Vec<String>,
    dir: PathBuf,
    daemons: Vec<Child>,
}

impl Lab {
    /// A router namespace and `nodes` node namespaces, all on one bridge.
    fn new(nodes: usize) -> Self {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(unsafe { libc::geteuid() }, 0, "tests/frr.rs needs root (network namespaces, port 179)");
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let id = format!("vbgp{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::SeqCst));
        let dir = std::env::temp_dir().join(&id);
        let mut lab = Self { router_ns: format!("{id}-r"), node_ns: Vec::new(), dir, daemons: Vec::new() };
        std::fs::create_dir_all(&lab.dir).unwrap();
        ip(&["netns", "add", &lab.router_ns]);
        let r = lab.router_ns.clone();
        ip(&["-n", &r, "link", "set", "lo", "up"]);
        ip(&["-n", &r, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &r, "addr", "add", &format!("{ROUTER}/24"), "dev", "br0"]);
        ip(&["-n", &r, "link", "set", "br0", "up"]);
        for index in 0..nodes {
            let ns = format!("{id}-n{}", index + 1);
            ip(&["netns", "add", &ns]);
            lab.node_ns.push(ns.clone());
            let port = format!("vn{}", index + 1);
            ip(&["-n", &r, "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns]);
            ip(&["-n", &r, "link", "set", &port, "master", "br0", "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            ip(&["-n", &ns, "addr", "add", &format!("{}/24", node_address(index)), "dev", "eth0"]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        }
        lab
    }

    /// [`Lab::new`] with zebra and bgpd running in the router namespace, AS 65001, and
    /// one neighbor per node (remote AS 65000) with the given extra neighbor commands.
    fn with_frr(nodes: usize, neighbor_extra: impl Fn(usize) -> Vec<String>) -> Self {
        assert!(
            Path::new(FRR_DIR).join("bgpd").exists(),
            "FRR is not installed ({FRR_DIR}/bgpd missing): apt-get install frr (cargo xtask setup does it)"
        );
        let mut lab = Self::new(nodes);
        let frr = Command::new("chown").args(["frr:frr", &lab.dir.to_string_lossy()]).status().unwrap();
        assert!(frr.success(), "chown frr:frr {}", lab.dir.display());
        lab.start_daemon("zebra");
        lab.start_daemon("bgpd");
        let mut commands = vec![
            format!("router bgp {ROUTER_AS}"),
            format!("bgp router-id {ROUTER}"),
            "no bgp ebgp-requires-policy".to_owned(),
            "bgp bestpath as-path multipath-relax".to_owned(),
        ];
        for index in 0..nodes {
            let node = node_address(index);
            commands.push(format!("neighbor {node} remote-as {NODE_AS}"));
            commands.extend(neighbor_extra(index).into_iter().map(|c| format!("neighbor {node} {c}")));
        }
        commands.extend(["address-family ipv4 unicast".to_owned(), "maximum-paths 3".to_owned()]);
        lab.configure(&commands).unwrap();
        lab
    }

    /// Starts an FRR daemon in the foreground as our child (so it is reaped), in the
    /// router namespace, with its sockets in the lab directory; waits for its vty socket.
    fn start_daemon(&mut self, name: &str) {
        let dir = self.dir.to_string_lossy().into_owned();
        let log = File::create(self.dir.join(format!("{name}.log"))).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &self.router_ns, &format!("{FRR_DIR}/{name}")])
            .args(["-P", "0", "-u", "frr", "-g", "frr", "-f", "/dev/null"])
            .args(["-i", &format!("{dir}/{name}.pid"), "-z", &format!("{dir}/zserv.api"), "--vty_socket", &dir])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.daemons.push(child);
        let socket = self.dir.join(format!("{name}.vty"));
        wait_for(Duration::from_secs(10), || socket.exists().then_some(()))
            .unwrap_or_else(|| panic!("{name} did not start; see {}", self.dir.join(format!("{name}.log")).display()));
    }

    fn vtysh(&self, commands: &[String]) -> Result<String, String> {
        let dir = self.dir.to_string_lossy().into_owned();
        let mut args = vec!["--vty_socket".to_owned(), dir];
        for command in commands {
            args.extend(["-c".to_owned(), command.clone()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        run("vtysh", &args)
    }

    /// `conf t` followed by `commands`.
    fn configure(&self, commands: &[String]) -> Result<String, String> {
        let mut all = vec!["configure terminal".to_owned()];
        all.extend_from_slice(commands);
        self.vtysh(&all)
    }

    fn show_json(&self, command: &str) -> Value {
        let text = self.vtysh(&[command.to_owned()]).unwrap();
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{command}: {e}: {text}"))
    }

    /// FRR's state for a neighbor, e.g. "Established".
    fn frr_state(&self, neighbor: Ipv4Addr) -> String {
        let summary = self.show_json("show ip bgp summary json");
        summary["ipv4Unicast"]["peers"][neighbor.to_string()]["state"].as_str().unwrap_or("").to_owned()
    }

    fn frr_neighbor(&self, neighbor: Ipv4Addr) -> Value {
        self.show_json(&format!("show bgp neighbors {neighbor} json"))[neighbor.to_string()].clone()
    }

    /// Paths in FRR's BGP table for `prefix`.
    fn bgp_paths(&self, prefix: &str) -> usize {
        let table = self.show_json("show ip bgp json");
        table["routes"][prefix].as_array().map_or(0, Vec::len)
    }

    /// `ip route show PREFIX` in the router namespace: empty when there is no route.
    fn kernel_route(&self, prefix: &str) -> String {
        run("ip", &["-n", &self.router_ns, "route", "show", prefix]).unwrap().trim().to_owned()
    }

    /// A thread in node `index`'s namespace running a current-thread runtime.
    fn node(&self, index: usize) -> NodeRuntime {
        NodeRuntime::enter(&self.node_ns[index])
    }

    fn router_thread<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> thread::JoinHandle<T> {
        let ns = self.router_ns.clone();
        thread::spawn(move || {
            enter_netns(&ns);
            work()
        })
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for daemon in &mut self.daemons {
            // SAFETY: kill has no memory preconditions; the pid is our own child's.
            unsafe { libc::kill(daemon.id() as libc::pid_t, libc::SIGTERM) };
        }
        for daemon in &mut self.daemons {
            let exited = wait_for(Duration::from_secs(3), || daemon.try_wait().ok().flatten());
            if exited.is_none() {
                let _ = daemon.kill();
                let _ = daemon.wait();
            }
        }
        let own = std::process::id().to_string();
        for ns in std::iter::once(&self.router_ns).chain(&self.node_ns) {
            let pids = run("ip", &["netns", "pids", ns]).unwrap_or_default();
            for pid in pids.split_whitespace().filter(|p| *p != own) {
                let _ = run("kill", &["-9", pid]);
            }
            let _ = run("ip", &["netns", "del", ns]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn enter_netns(ns: &str) {
    let file = File::open(format!("/var/run/netns/{ns}")).unwrap();
    // SAFETY: a valid namespace fd; affects only this thread.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {ns}: {}", std::io::Error::last_os_error());
}

/// A tokio current-thread runtime driven by a thread inside a node's namespace, as the
/// agent runs it; futures given to [`NodeRuntime::run`] run there.
struct NodeRuntime {
    handle: tokio::runtime::Handle,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl NodeRuntime {
    fn enter(ns: &str) -> Self {
        let ns = ns.to_owned();
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = thread::spawn(move || {
            enter_netns(&ns);
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            handle_tx.send(runtime.handle().clone()).unwrap();
            let _ = runtime.block_on(stopped);
        });
        let handle = handle_rx.recv().unwrap();
        Self { handle, stop: Some(stop), thread: Some(thread) }
    }

    fn run<F>(&self, future: F) -> F::Output
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.handle.block_on(self.handle.spawn(future)).unwrap()
    }

    fn start_speaker(&self, peer: PeerConfig) -> SpeakerHandle {
        self.run(async move { Speaker::start(SpeakerConfig::new(vec![peer])).unwrap() })
    }
}

impl Drop for NodeRuntime {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn peer_config(index: usize) -> PeerConfig {
    let node = node_address(index);
    PeerConfig::new(ROUTER, ROUTER_AS, NODE_AS, node, node)
}

fn status(speaker: &SpeakerHandle) -> PeerStatus {
    speaker.status().remove(0)
}

/// Waits until both sides say Established.
fn wait_established(lab: &Lab, speaker: &SpeakerHandle, index: usize) {
    let up = wait_for(SESSION_UP, || {
        (status(speaker).state == State::Established && lab.frr_state(node_address(index)) == "Established")
            .then_some(())
    });
    assert!(up.is_some(), "no session: ours {:?}, FRR {:?}", status(speaker), lab.frr_state(node_address(index)));
}

/// Time until `ip route show VIP` in the router namespace satisfies `done`.
fn time_until_route(lab: &Lab, limit: Duration, done: impl Fn(&str) -> bool) -> Duration {
    let start = Instant::now();
    wait_for(limit, || done(&lab.kernel_route(VIP)).then_some(()))
        .unwrap_or_else(|| panic!("route for {VIP} still {:?} after {limit:?}", lab.kernel_route(VIP)));
    start.elapsed()
}

#[test]
fn the_vip_reaches_frrs_table_and_kernel_and_leaves_within_half_a_second_of_a_withdrawal() {
    let lab = Lab::with_frr(1, |_| vec![]);
    let node = lab.node(0);
    let speaker = node.start_speaker(peer_config(0));
    speaker.set_advertised([vip()]);
    wait_established(&lab, &speaker, 0);

    let installed = time_until_route(&lab, SESSION_UP, |route| route.contains("via 10.201.0.11"));
    eprintln!("route installed {installed:?} after both sides were Established");
    assert_eq!(lab.bgp_paths(VIP), 1);
    assert!(lab.kernel_route(VIP).contains("proto bgp"), "{}", lab.kernel_route(VIP));
    assert_eq!(status(&speaker).advertised, vec![vip()]);
    assert_eq!(status(&speaker).hold_time, Some(9));

    speaker.set_advertised([]);
    let withdrawn = time_until_route(&lab, PROMPT, str::is_empty);
    eprintln!("withdraw: kernel route gone after {withdrawn:?}");
    assert_eq!(lab.bgp_paths(VIP), 0);
    assert_eq!(status(&speaker).state, State::Established, "a withdrawal keeps the session");

    speaker.set_advertised([vip()]);
    time_until_route(&lab, PROMPT, |route| route.contains("via 10.201.0.11"));
    node.run(speaker.shutdown(Duration::from_secs(2)));
}

#[test]
fn graceful_shutdown_removes_the_route_within_half_a_second_and_frr_logs_an_administrative_shutdown() {
    let lab = Lab::with_frr(1, |_| vec![]);
    let node = lab.node(0);
    let speaker = node.start_speaker(peer_config(0));
    speaker.set_advertised([vip()]);
    wait_established(&lab, &speaker, 0);
    time_until_route(&lab, SESSION_UP, |route| route.contains("via 10.201.0.11"));

    let start = Instant::now();
    let shutdown = node.handle.spawn(speaker.shutdown(Duration::from_secs(3)));
    let gone = time_until_route(&lab, PROMPT, str::is_empty);
    eprintln!("shutdown: kernel route gone after {gone:?}");
    node.handle.block_on(shutdown).unwrap();
    let took = start.elapsed();
    assert!(took < Duration::from_secs(1), "FRR closes after our Cease, so shutdown returns early: {took:?}");

    let neighbor = lab.frr_neighbor(node_address(0));
    let reason = neighbor["lastNotificationReason"].as_str().unwrap_or_default().to_owned()
        + " "
        + neighbor["lastResetDueTo"].as_str().unwrap_or_default();
    assert!(reason.contains("Administrative Shutdown"), "FRR says: {neighbor}");
    assert_eq!(neighbor["lastShutdownDescription"], vip_bgp::speaker::DEFAULT_SHUTDOWN_COMMUNICATION, "{neighbor}");
    assert_ne!(lab.frr_state(node_address(0)), "Established");
}

#[test]
fn two_nodes_give_frr_two_equal_cost_paths_and_one_leaving_keeps_the_other() {
    let lab = Lab::with_frr(2, |_| vec![]);
    let (node1, node2) = (lab.node(0), lab.node(1));
    let speaker1 = node1.start_speaker(peer_config(0));
    let speaker2 = node2.start_speaker(peer_config(1));
    speaker1.set_advertised([vip()]);
    speaker2.set_advertised([vip()]);
    wait_established(&lab, &speaker1, 0);
    wait_established(&lab, &speaker2, 1);
    time_until_route(&lab, SESSION_UP, |route| route.contains("via 10.201.0.11") && route.contains("via 10.201.0.12"));
    assert_eq!(lab.bgp_paths(VIP), 2);

    speaker1.set_advertised([]);
    let moved =
        time_until_route(&lab, PROMPT, |route| !route.contains("via 10.201.0.11") && route.contains("10.201.0.12"));
    eprintln!("ECMP: node 1's next hop gone after {moved:?}");
    node1.run(speaker1.shutdown(Duration::from_secs(2)));
    node2.run(speaker2.shutdown(Duration::from_secs(2)));
}

#[test]
fn tcp_md5_establishes_with_the_right_password_and_not_with_a_wrong_one() {
    let lab = Lab::with_frr(2, |_| vec!["password s3cret-md5".to_owned()]);
    let (node1, node2) = (lab.node(0), lab.node(1));
    let right = PeerConfig { password: Some("s3cret-md5".into()), ..peer_config(0) };
    let wrong = PeerConfig {
        password: Some("not-the-password".into()),
        connect_timeout: Duration::from_secs(1),
        ..peer_config(1)
    };
    let speaker1 = node1.start_speaker(right);
    let speaker2 = node2.start_speaker(wrong);
    speaker1.set_advertised([vip()]);
    speaker2.set_advertised([vip()]);
    wait_established(&lab, &speaker1, 0);
    time_until_route(&lab, SESSION_UP, |route| route.contains("via 10.201.0.11"));

    // The router's kernel drops our unsigned-to-it SYNs: attempts time out, and the
    // session never gets past Connect/Active.
    let failed = wait_for(Duration::from_secs(5), || {
        let s = status(&speaker2);
        s.last_error.as_deref().is_some_and(|e| e.starts_with("connect:")).then_some(s)
    })
    .unwrap_or_else(|| panic!("no connect error: {:?}", status(&speaker2)));
    eprintln!("wrong TCP-MD5 password: {:?} / {:?}", failed.state, failed.last_error);
    assert!(matches!(failed.state, State::Connect | State::Active | State::Idle), "{failed:?}");
    assert_ne!(lab.frr_state(node_address(1)), "Established");
    assert!(!lab.kernel_route(VIP).contains("10.201.0.12"));
    node1.run(speaker1.shutdown(Duration::from_secs(2)));
    node2.run(speaker2.shutdown(Duration::from_secs(2)));
}

#[test]
fn frr_timers_1_3_negotiate_a_three_second_hold_time_that_our_keepalives_sustain() {
    let lab = Lab::with_frr(1, |_| vec!["timers 1 3".to_owned()]);
    let node = lab.node(0);
    let speaker = node.start_speaker(peer_config(0));
    wait_established(&lab, &speaker, 0);
    assert_eq!(status(&speaker).hold_time, Some(3));
    let neighbor = lab.frr_neighbor(node_address(0));
    assert_eq!(neighbor["bgpTimerHoldTimeMsecs"], 3000, "{neighbor}");

    // Longer than the hold time: keepalives every second (hold / 3, below our
    // configured 3 s) keep the session up.
    let keepalives = |lab: &Lab| lab.frr_neighbor(node_address(0))["messageStats"]["keepalivesRecv"].as_u64().unwrap();
    let (since, before) = (status(&speaker).uptime.unwrap(), keepalives(&lab));
    thread::sleep(Duration::from_secs(4));
    let later = status(&speaker);
    assert_eq!(later.state, State::Established);
    assert!(later.uptime.unwrap() >= since + Duration::from_secs(4), "{later:?}");
    let received = keepalives(&lab) - before;
    assert!((3..=5).contains(&received), "FRR received {received} KEEPALIVEs in 4 s");
    assert_eq!(lab.frr_neighbor(node_address(0))["connectionsEstablished"], 1);
    node.run(speaker.shutdown(Duration::from_secs(2)));
}

#[test]
fn frr_itself_refuses_to_be_configured_with_a_hold_time_of_two_seconds() {
    let lab = Lab::with_frr(1, |_| vec![]);
    let node = node_address(0);
    let refused = lab.configure(&[format!("router bgp {ROUTER_AS}"), format!("neighbor {node} timers 1 2")]);
    let err = refused.expect_err("FRR accepted a hold time of 2 s");
    assert!(err.contains("Invalid value"), "{err}");
}

#[test]
fn a_router_opening_with_a_hold_time_of_two_seconds_gets_unacceptable_hold_time() {
    // FRR cannot be made to send it (see above), so a scripted router on a real TCP
    // socket in the router namespace plays the part.
    let lab = Lab::new(1);
    let listener = lab.router_thread(|| {
        let listener = TcpListener::bind(SocketAddrV4::new(ROUTER, 179)).unwrap();
        let (mut stream, _) = listener.accept().unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let ours = read_message(&mut stream);
        let peer_open = Open::new(ROUTER_AS, 2, ROUTER);
        stream.write_all(&codec::encode(&Message::Open(peer_open)).unwrap()).unwrap();
        (ours, read_message(&mut stream))
    });
    let node = lab.node(0);
    // Give the listener a moment; a refused first attempt is retried after ~1 s anyway.
    thread::sleep(Duration::from_millis(100));
    let speaker = node.start_speaker(peer_config(0));
    let (ours, answer) = listener.join().unwrap();
    assert!(matches!(ours, Message::Open(open) if open.hold_time == 9));
    let Message::Notification(notification) = answer else { panic!("expected a NOTIFICATION, got {answer:?}") };
    assert_eq!((notification.code, notification.subcode), (2, 6));
    let s = wait_for(PROMPT, || status(&speaker).last_error.is_some().then(|| status(&speaker))).unwrap();
    assert!(s.last_error.unwrap().contains("Unacceptable Hold Time"));
    assert_ne!(s.state, State::Established);
    node.run(speaker.shutdown(Duration::from_millis(100)));
}

fn read_message(stream: &mut std::net::TcpStream) -> Message {
    let mut received = Vec::new();
    loop {
        if let Some((message, _)) = codec::decode(&received).unwrap() {
            return message;
        }
        let mut buf = [0u8; 4096];
        let n = stream.read(&mut buf).unwrap();
        assert!(n > 0, "connection closed before a whole message");
        received.extend_from_slice(&buf[..n]);
    }
}
