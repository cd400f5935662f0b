//! The peers lab and the peers that take turns on its load-balancing node.
//!
//! One bridge (`tests::lab::Lab`): the client `.2`, the load-balancing node `lb` at `.10`,
//! three backends `.11`–`.13` each running `vip-responder` on :6443 and holding the VIP
//! (`.100`) quietly on `lo` (DSR backends). Every peer is reached at VIP:6443, except
//! `direct`, where the client connects to the three backends in turn (so the backends'
//! side does the same work as behind a load balancer).
//!
//! Lab choices, the same for every peer:
//! - The client's transmit checksum offload is off (`ethtool -K eth0 tx off`): a veth
//!   sender otherwise leaves TCP checksums partial, and a frame forwarded by native XDP
//!   (which drops that metadata) reaches the backend with a bad checksum. Real NICs
//!   deliver complete checksums, so this only removes a veth artefact.
//! - The LB node gets a core of its own (the last one), as a machine of its own would;
//!   the client and the backends share the others. On the LB's core: its interface's
//!   NAPI kernel thread (threaded NAPI; veth hands a frame to the peer's NAPI only when
//!   the sender does not segment, so TSO is off on both ends of its link), where its
//!   receive path runs (XDP, netfilter, TCP for HAProxy) and whose CPU time is read
//!   exactly; its bridge port's NAPI thread (the LB's transmit into the "switch"); the
//!   peer's processes. Both NAPI threads run SCHED_FIFO, so, like softirq work, they do
//!   not queue behind ordinary processes. Elsewhere: the load generator, the responders,
//!   and (by RPS on their interfaces) every frame they receive, so no client or backend
//!   work lands on the LB's core and none of the LB's on theirs.
//! - The bridge port carries a trivial `XDP_PASS` program in native mode: native-mode
//!   `XDP_TX` on a veth reaches the peer only when the peer has an XDP program (without
//!   one, forwarded frames sit in a queue until unrelated traffic flushes it, ~1 s).

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use tests::{agent::Agent, lab::Lab, netns::run};
use vip_agent::dataplane::{AttachMode, Dataplane, Program};

use crate::{cpu, loadgen};

pub const PREFIX: [u8; 3] = [10, 67, 0];
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 67, 0, 100);
pub const PORT: u16 = 6443;
const CLIENT: u8 = 2;
const LB: u8 = 10;
const BACKENDS: [u8; 3] = [11, 12, 13];
/// The bridge port of the LB (`Lab::add_host` names it after the host's last octet).
const LB_PORT: &str = "p10";
/// SCHED_FIFO priority of the LB's NAPI threads: that of threaded interrupt handlers
/// (`MAX_RT_PRIO / 2`), so they run as promptly as softirq work would.
const NAPI_PRIORITY: i32 = 50;
/// How long a peer may take to serve its first requests (vip-agent: attach, health
/// checks with rise 2 at the interval below; HAProxy: its first checks).
const READY_WITHIN: Duration = Duration::from_secs(20);
/// Requests in a row a peer must serve before it is measured: with three backends in
/// rotation, a backend that is not yet serving would break the streak.
const READY_STREAK: usize = 30;
/// vip-agent's health-check interval here: its default (1 s); the bench measures the
/// data plane, not health checking.
const AGENT_HEALTH_INTERVAL: &str = "1s";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Peer {
    Direct,
    /// vip-agent, native XDP (`true`) or generic/SKB mode (`false`).
    Vip {
        native: bool,
    },
    Haproxy,
    Nftables,
}

impl Peer {
    pub fn name(self) -> &'static str {
        match self {
            Peer::Direct => "direct",
            Peer::Vip { native: true } => "vip",
            Peer::Vip { native: false } => "vip-skb",
            Peer::Haproxy => "haproxy",
            Peer::Nftables => "nftables",
        }
    }
}

/// The programs the bench drives, with the Debian package that has each.
const TOOLS: &[(&str, &str)] =
    &[("haproxy", "haproxy"), ("keepalived", "keepalived"), ("nft", "nftables"), ("ethtool", "ethtool")];

/// Fails naming the Debian packages that hold whichever of `programs` is not on PATH.
pub fn require(programs: &[&str]) -> Result<(), String> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = |bin: &str| std::env::split_paths(&path).any(|d| d.join(bin).exists());
    let missing: Vec<&str> =
        TOOLS.iter().filter(|(bin, _)| programs.contains(bin) && !found(bin)).map(|(_, pkg)| *pkg).collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!("missing programs; install the Debian packages: apt-get install -y {}", missing.join(" ")))
    }
}

/// `vip-responder`: `VIPLAB_RESPONDER_BIN`, or next to this executable.
fn responder_bin() -> PathBuf {
    std::env::var_os("VIPLAB_RESPONDER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::current_exe().unwrap_or_default().with_file_name("vip-responder"))
}

pub struct PeersLab {
    responders: Vec<Child>,
    pub split: cpu::Split,
    /// Holds the `XDP_PASS` program on the LB's bridge port.
    _port_xdp: Dataplane,
    /// The LB interface's NAPI kernel thread.
    pub lb_napi: u32,
    /// Config files and pins of this run.
    pub dir: PathBuf,
    pub lab: Lab,
}

impl PeersLab {
    pub fn new() -> Result<Self, String> {
        let mut lab = Lab::new(PREFIX)?;
        lab.add_host("cli", CLIENT)?;
        lab.add_host("lb", LB)?;
        for (i, last) in BACKENDS.iter().enumerate() {
            lab.add_host(&format!("b{}", i + 1), *last)?;
        }
        let dir = std::env::temp_dir().join(format!("vip-peers-{}", lab.tag));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let port_xdp = lab.switch.within(|| -> Result<Dataplane, String> {
            let port = vip_agent::netdev::lookup(LB_PORT).map_err(|e| e.to_string())?;
            let mut dp = Dataplane::load().map_err(|e| format!("{e:#?}"))?;
            dp.attach(Program::Pass, &port, AttachMode::Native).map_err(|e| format!("{e:#?}"))?;
            Ok(dp)
        })??;
        let split = cpu::Split::of_this_machine();
        let mut me = Self { responders: Vec::new(), split, _port_xdp: port_xdp, lb_napi: 0, dir, lab };
        me.tune()?;
        me.start_responders()?;
        Ok(me)
    }

    pub fn client(&self) -> &tests::lab::Host {
        self.lab.host("cli")
    }

    pub fn lb(&self) -> &tests::lab::Host {
        self.lab.host("lb")
    }

    pub fn backends(&self) -> Vec<Ipv4Addr> {
        BACKENDS.iter().map(|l| Ipv4Addr::new(PREFIX[0], PREFIX[1], PREFIX[2], *l)).collect()
    }

    fn tune(&mut self) -> Result<(), String> {
        let cli = &self.client().ns;
        run(cli.cmd("ethtool").args(["-K", "eth0", "tx", "off"]))?;
        // The client never holds TIME_WAIT (the responder closes first), but a wide range
        // keeps port reuse far apart at 20k connections/s.
        cli.sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
        let lb = &self.lb().ns;
        lb.sysctl("net.ipv4.ip_forward", "1")?;
        // HAProxy's connections to the backends come from the LB's own ports.
        lb.sysctl("net.ipv4.ip_local_port_range", "1024 65535")?;
        // What kube-proxy sets for conntrack (its defaults: established 24 h, close-wait
        // 1 h); nf_conntrack_max is global (262144 here, above kube-proxy's 131072 floor).
        lb.sysctl("net.netfilter.nf_conntrack_tcp_timeout_established", "86400")?;
        lb.sysctl("net.netfilter.nf_conntrack_tcp_timeout_close_wait", "3600")?;
        self.lb_napi = threaded_napi(lb, "eth0")?;
        let port_napi = threaded_napi(&self.lab.switch, LB_PORT)?;
        for thread in [self.lb_napi, port_napi] {
            cpu::pin(thread, &[self.split.lb])?;
            cpu::realtime(thread, NAPI_PRIORITY)?;
        }
        let rest = cpu::Split::mask(&self.split.rest);
        for host in self.lab.hosts.iter().filter(|h| h.ip != self.lb().ip) {
            run(host.ns.cmd("sh").args(["-c", &format!("echo {rest} > /sys/class/net/eth0/queues/rx-0/rps_cpus")]))?;
        }
        for b in self.backends() {
            let host = self.lab.hosts.iter().find(|h| h.ip == b).ok_or("backend host")?;
            host.hold_vip_quietly(VIP)?;
        }
        Ok(())
    }

    fn start_responders(&mut self) -> Result<(), String> {
        let bin = responder_bin();
        for (i, ip) in self.backends().into_iter().enumerate() {
            let name = format!("b{}", i + 1);
            let child = self
                .lab
                .host(&name)
                .ns
                .cmd("taskset")
                .args(["-c", &cpu::Split::list(&self.split.rest)])
                .arg(&bin)
                .args(["--name", &name, "--listen", &format!("0.0.0.0:{PORT}")])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .map_err(|e| format!("starting {}: {e}", bin.display()))?;
            self.responders.push(child);
            let addr = SocketAddr::from((ip, PORT));
            let ns = self.client().ns.name.clone();
            if !wait_serving(&ns, addr, 1, 1, Duration::from_secs(10)) {
                return Err(format!("the responder on {name} never answered"));
            }
        }
        Ok(())
    }

    /// CPU time (ns) spent so far by the LB's NAPI thread and by `pids` (whole processes).
    pub fn lb_cpu_ns(&self, pids: &[u32]) -> Result<u64, String> {
        let mut total = cpu::thread_ns(self.lb_napi)?;
        for &p in pids {
            total += cpu::process_ns(p)?;
        }
        Ok(total)
    }

    /// Checks the LB's NAPI thread is still the one measured (a driver may recreate it).
    pub fn check_napi(&self) -> Result<(), String> {
        let comm = std::fs::read_to_string(format!("/proc/{}/comm", self.lb_napi)).unwrap_or_default();
        if comm.starts_with("napi/eth0-") {
            Ok(())
        } else {
            Err(format!("the LB's NAPI thread {} is gone (now {comm:?})", self.lb_napi))
        }
    }
}

impl Drop for PeersLab {
    fn drop(&mut self) {
        for c in &mut self.responders {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// NAPI (GRO on, TSO off) on `dev` in `ns`, polled by a kernel thread of its own; returns
/// that thread's pid (the one NAPI thread that appeared).
fn threaded_napi(ns: &tests::netns::Netns, dev: &str) -> Result<u32, String> {
    let before = cpu::napi_threads();
    run(ns.cmd("ethtool").args(["-K", dev, "gro", "on", "tso", "off"]))?;
    run(ns.cmd("sh").args(["-c", &format!("echo 1 > /sys/class/net/{dev}/threaded")]))?;
    let new: Vec<u32> = cpu::napi_threads().difference(&before).copied().collect();
    match new.as_slice() {
        [pid] => Ok(*pid),
        _ => Err(format!("expected one new NAPI thread for {dev}, found {new:?}")),
    }
}

/// Whether, within `within`, `n` requests in a row to `addr` succeed from namespace `ns`
/// and at least `backends` different backends have answered.
pub fn wait_serving(ns: &str, addr: SocketAddr, n: usize, backends: usize, within: Duration) -> bool {
    let ns = ns.to_owned();
    std::thread::spawn(move || {
        if tests::netns::enter_by_name(&ns).is_err() {
            return false;
        }
        let deadline = Instant::now() + within;
        let (mut streak, mut seen) = (0, std::collections::BTreeSet::new());
        while Instant::now() < deadline {
            match loadgen::request_named(addr) {
                Ok(name) => {
                    streak += 1;
                    seen.insert(name);
                    if streak >= n && seen.len() >= backends {
                        return true;
                    }
                }
                Err(_) => {
                    streak = 0;
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
        false
    })
    .join()
    .unwrap_or(false)
}

/// A peer running on the LB node; stopped (and its state on the LB removed) on drop.
pub struct Running<'a> {
    pub peer: Peer,
    /// Where the client connects, in turn: the VIP, or (`direct`) each backend.
    pub targets: Vec<SocketAddr>,
    /// Processes whose CPU counts as the LB's (besides its NAPI thread).
    pub pids: Vec<u32>,
    agent: Option<Agent>,
    haproxy: Option<Child>,
    lab: &'a PeersLab,
}

impl PeersLab {
    /// Starts `peer` on the LB node and waits until it serves.
    pub fn start(&self, peer: Peer) -> Result<Running<'_>, String> {
        let _ = self.client().ns.ip(&["neigh", "flush", "dev", "eth0"]);
        let vip = SocketAddr::from((VIP, PORT));
        let mut running = Running { peer, targets: vec![vip], pids: Vec::new(), agent: None, haproxy: None, lab: self };
        match peer {
            Peer::Direct => {
                running.targets = self.backends().into_iter().map(|b| SocketAddr::from((b, PORT))).collect()
            }
            Peer::Vip { native } => {
                let agent = self.start_agent(native)?;
                running.pids.extend(agent.pid());
                running.agent = Some(agent);
            }
            Peer::Haproxy => {
                self.lb().ns.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "eth0"])?;
                let child = self.start_haproxy()?;
                running.pids.push(child.id());
                running.haproxy = Some(child);
            }
            Peer::Nftables => {
                self.lb().ns.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "eth0"])?;
                let file = self.dir.join("kube-proxy.nft");
                std::fs::write(&file, nft_ruleset(&self.backends())).map_err(|e| e.to_string())?;
                run(self.lb().ns.cmd("nft").arg("-f").arg(&file))?;
            }
        }
        // Every backend must answer through the peer, and requests keep succeeding, before
        // it is measured.
        let backends = if peer == Peer::Direct { 1 } else { BACKENDS.len() };
        for &target in &running.targets {
            if !wait_serving(&self.client().ns.name, target, READY_STREAK, backends, READY_WITHIN) {
                return Err(format!(
                    "{} never served {READY_STREAK} requests in a row from all {backends} backends through {target}",
                    peer.name(),
                ));
            }
        }
        for &pid in &running.pids {
            cpu::pin_process(pid, &[self.split.lb])?;
        }
        self.check_napi()?;
        Ok(running)
    }

    fn start_agent(&self, native: bool) -> Result<Agent, String> {
        // Removed by the agent itself when it stops (SIGTERM), or by the sweep.
        let pins = tests::agent::pin_dir(&format!("{}-peers-lb", self.lab.tag))?.keep();
        let backends: Vec<String> = self.backends().iter().map(|b| b.to_string()).collect();
        let args = [
            "run",
            "--interface",
            "eth0",
            "--vip",
            &VIP.to_string(),
            "--election",
            "none",
            "--forward",
            "dsr",
            "--backend",
            &backends.join(","),
            "--health-check",
            "tcp",
            "--health-interval",
            AGENT_HEALTH_INTERVAL,
            "--xdp-mode",
            if native { "native" } else { "skb" },
            "--pin-path",
            &pins.display().to_string(),
        ];
        Agent::spawn(&self.lb().ns, &args)
    }

    fn start_haproxy(&self) -> Result<Child, String> {
        let cfg = self.dir.join("haproxy.cfg");
        std::fs::write(&cfg, haproxy_config(&self.backends())).map_err(|e| e.to_string())?;
        run(self.lb().ns.cmd("haproxy").args(["-c", "-q", "-f"]).arg(&cfg))?;
        // -db: foreground, no daemon, so the child is HAProxy itself (taskset execs it) and
        // its pid is ours. On the LB's one core HAProxy starts one thread (nbthread auto).
        self.lb()
            .ns
            .cmd("taskset")
            .args(["-c", &self.split.lb.to_string(), "haproxy", "-db", "-f"])
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting haproxy: {e}"))
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            // SIGTERM: the agent detaches, unpins and removes the VIP from lo itself.
            let _ = agent.stop(libc::SIGTERM, Duration::from_secs(10));
        }
        if let Some(mut c) = self.haproxy.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let lb = &self.lab.lb().ns;
        if self.peer == Peer::Nftables {
            let _ = run(lb.cmd("nft").args(["delete", "table", "ip", "kube-proxy"]));
        }
        if matches!(self.peer, Peer::Haproxy | Peer::Nftables) {
            let _ = lb.ip(&["addr", "del", &format!("{VIP}/32"), "dev", "eth0"]);
        }
    }
}

/// The kubeadm HA guide's haproxy.cfg ("haproxy configuration" in
/// https://github.com/kubernetes/kubeadm/blob/main/docs/ha-considerations.md), as written
/// there but for three changes:
/// - no `log` lines (and so no `option httplog`/`tcplog`): a log line per connection to
///   syslog would cost HAProxy CPU and flood the host's log; leaving it out favours HAProxy;
/// - no `option ssl-hello-chk`: the guide's backends speak TLS, ours plain HTTP; the
///   guide's `option httpchk GET /healthz` + `http-check expect status 200` stay;
/// - `daemon` left out: started in the foreground (`-db`) so the bench owns the process.
fn haproxy_config(backends: &[Ipv4Addr]) -> String {
    let servers: String =
        backends.iter().enumerate().map(|(i, b)| format!("    server b{} {b}:{PORT} check\n", i + 1)).collect();
    format!(
        "global
    # (the guide: log /dev/log local0, log /dev/log local1 notice, daemon)

defaults
    mode                    http
    option                  dontlognull
    option http-server-close
    option                  redispatch
    retries                 1
    timeout http-request    10s
    timeout queue           20s
    timeout connect         5s
    timeout client          20s
    timeout server          20s
    timeout http-keep-alive 10s
    timeout check           10s

frontend apiserver
    bind {VIP}:{PORT}
    mode tcp
    default_backend apiserverbackend

backend apiserverbackend
    option httpchk GET /healthz
    http-check expect status 200
    mode tcp
    balance     roundrobin
{servers}"
    )
}

/// What kube-proxy's nftables mode (`--proxy-mode nftables`, kubernetes/kubernetes
/// pkg/proxy/nftables) installs for one ClusterIP-like service with three endpoints:
/// `services` dispatches on address.protocol.port through a verdict map, the service
/// chain marks for masquerade and picks an endpoint with `numgen random mod 3`, each
/// endpoint chain DNATs, and postrouting masquerades marked packets `fully-random`
/// (what kube-proxy uses). Conntrack does the rest.
///
/// Measured here: at thousands of new connections/s, a random SNAT port often lands on
/// one of the backend's many TIME_WAIT sockets for the LB's address, the backend rejects
/// the SYN (PAWS, counted as `PAWSTimewait`) and the client retransmits it ~10 ms later:
/// nftables' p99 carries that. Plain `masquerade` (source port kept) does not show it.
fn nft_ruleset(backends: &[Ipv4Addr]) -> String {
    let endpoints: String = backends
        .iter()
        .map(|b| {
            format!(
                "    chain endpoint-{b} {{
        ip saddr {b} jump mark-for-masquerade
        meta l4proto tcp dnat to {b}:{PORT}
    }}
"
            )
        })
        .collect();
    let vmap: Vec<String> = backends.iter().enumerate().map(|(i, b)| format!("{i} : goto endpoint-{b}")).collect();
    // Chains are declared before anything refers to them: `nft -f` resolves in order.
    format!(
        "table ip kube-proxy {{
    chain mark-for-masquerade {{
        meta mark set meta mark or 0x4000
    }}
    chain masquerading {{
        meta mark & 0x4000 == 0 return
        meta mark set meta mark xor 0x4000
        masquerade fully-random
    }}
{endpoints}    chain service-apiserver {{
        ip daddr {VIP} tcp dport {PORT} jump mark-for-masquerade
        numgen random mod {} vmap {{ {} }}
    }}
    map service-ips {{
        type ipv4_addr . inet_proto . inet_service : verdict
        elements = {{ {VIP} . tcp . {PORT} : goto service-apiserver }}
    }}
    chain services {{
        ip daddr . meta l4proto . th dport vmap @service-ips
    }}
    chain nat-prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        jump services
    }}
    chain nat-postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        jump masquerading
    }}
}}
",
        backends.len(),
        vmap.join(", ")
    )
}
