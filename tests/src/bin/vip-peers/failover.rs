//! Failover beside keepalived: three nodes share the VIP, a client sends a paced stream of
//! HTTPS requests to it (a new connection each, [`STREAM_INTERVAL`] apart, each allowed
//! [`REQUEST_TIMEOUT`]), and the node that answers for the VIP is struck:
//! - `SIGKILL`: the VIP's daemon (every keepalived process of the node; the agent);
//! - `SIGTERM`: the daemon is asked to stop (a planned restart);
//! - `node loss`: the node's link goes down and its daemon is killed (a dead node).
//!
//! Measured from the moment of the strike: `new answer`, until a node other than the old
//! one answers the client's ARP requests for the VIP (probed every ~20 ms); `outage`,
//! from the first failed request to the first successful one after the last failure;
//! `failed`, the requests that failed.
//!
//! keepalived runs with the kubeadm HA guide's configuration (VRRP, priorities 101/100/99,
//! advert every 1 s, keepalived's default and the guide's by omission); the guide's
//! `track_script` (an apiserver check every 3 s) is left out: none of these events involves
//! the apiserver. Traffic goes to the apiserver stand-in on the VIP holder, as with the
//! guide's haproxy on every node. vip-agent runs with `--election kubernetes` against the
//! Lease API stand-in, as vip-bench's failover section does (lease 1 s, renew deadline
//! 600 ms, retry 200 ms) and balances to every node (DSR).

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use tests::{
    agent::{wait_until, Agent},
    apilab::ApiLab,
    netns::{arp_probe, mac_of},
};

use crate::loadgen::Stream;

/// A new connection every 5 ms: 200 requests/s, "a few hundred per second".
const STREAM_INTERVAL: Duration = Duration::from_millis(5);
/// A request not answered within this counts as failed: long against a healthy request
/// (a few ms), short against a lost SYN (retransmitted after 1 s), so the timeline has
/// the stream's resolution rather than TCP's retransmission timer's.
const REQUEST_TIMEOUT: Duration = Duration::from_millis(300);
/// Stream threads: enough to keep the schedule while every request of the last
/// `REQUEST_TIMEOUT` x 2 (connect, then read) hangs: 600 ms / 5 ms = 120.
const STREAM_POOL: usize = 128;
/// Normal traffic before the strike, so the timeline shows a baseline.
const BEFORE: Duration = Duration::from_secs(1);
/// The stream keeps running at least this long after the strike...
const MIN_AFTER: Duration = Duration::from_secs(4);
/// ...and this long after the new node first answered ARP.
const AFTER_ANSWER: Duration = Duration::from_secs(2);
/// Giving up on a takeover: keepalived's is ~3.6 s, the Lease's ~1–2 s.
const ANSWER_WITHIN: Duration = Duration::from_secs(12);
/// The VIP holder must stay the same for this long before a trial starts: longer than
/// keepalived's master-down interval (3 adverts + skew, ~3.6 s), so a restarted node's
/// start-up timer and preemption are over before the next strike.
const STABLE: Duration = Duration::from_secs(5);
/// A SIGTERMed agent hands over, drains and exits within a few seconds (lease release
/// bounded by twice the renew deadline, then a drain of twice the retry period).
const EXIT_WITHIN: Duration = Duration::from_secs(10);
/// Trials per system and event: medians of five.
pub const TRIALS: usize = 5;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum System {
    Keepalived,
    Vip,
}

impl System {
    pub fn name(self) -> &'static str {
        match self {
            System::Keepalived => "keepalived",
            System::Vip => "vip",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Event {
    Kill,
    Term,
    NodeLoss,
}

pub const EVENTS: [Event; 3] = [Event::Kill, Event::Term, Event::NodeLoss];

impl Event {
    pub fn name(self) -> &'static str {
        match self {
            Event::Kill => "SIGKILL",
            Event::Term => "SIGTERM",
            Event::NodeLoss => "node loss",
        }
    }
}

/// One strike.
#[derive(Clone, Debug)]
pub struct Trial {
    pub new_answer: Option<Duration>,
    pub outage: Duration,
    pub failed: usize,
    pub requests: usize,
    /// Every request: its start in ms from the strike, and whether it succeeded.
    pub timeline: Vec<(i64, bool)>,
}

#[derive(Debug)]
pub struct EventResult {
    pub system: System,
    pub event: Event,
    pub trials: Vec<Trial>,
    pub error: Option<String>,
}

impl EventResult {
    fn median<T: Ord + Copy>(mut v: Vec<T>) -> Option<T> {
        v.sort_unstable();
        v.get(v.len() / 2).copied()
    }

    /// Median time to the new node's first ARP answer (trials where one answered).
    pub fn new_answer_ms(&self) -> Option<u128> {
        Self::median(self.trials.iter().filter_map(|t| t.new_answer).map(|d| d.as_millis()).collect())
    }

    pub fn outage_ms(&self) -> Option<u128> {
        Self::median(self.trials.iter().map(|t| t.outage.as_millis()).collect())
    }

    pub fn failed(&self) -> Option<usize> {
        Self::median(self.trials.iter().map(|t| t.failed).collect())
    }

    /// The trial whose outage is the median one (the one plotted).
    pub fn median_trial(&self) -> Option<&Trial> {
        let mut v: Vec<&Trial> = self.trials.iter().collect();
        v.sort_by_key(|t| t.outage);
        v.get(v.len() / 2).copied()
    }
}

/// Three nodes sharing the VIP under one system.
trait Cluster {
    fn api(&self) -> &ApiLab;
    /// The nodes that hold the VIP now.
    fn holders(&self) -> Vec<usize>;
    fn strike(&mut self, node: usize, event: Event) -> Result<(), String>;
    /// Brings a struck node back as a follower.
    fn heal(&mut self, node: usize, event: Event) -> Result<(), String>;
}

/// keepalived on every node, the guide's configuration.
struct Keepalived {
    daemons: Vec<Option<Child>>,
    dir: PathBuf,
    lab: ApiLab,
}

/// The kubeadm HA guide's keepalived.conf ("keepalived configuration" in
/// https://github.com/kubernetes/kubeadm/blob/main/docs/ha-considerations.md) for node
/// `i`: MASTER with priority 101 on the first node, BACKUP with 100, 99 on the others,
/// virtual router 51, auth pass 42. `advert_int 1` is keepalived's default, written out.
fn keepalived_conf(i: usize, vip: Ipv4Addr) -> String {
    let (state, priority) = if i == 0 { ("MASTER", 101) } else { ("BACKUP", 101 - i) };
    format!(
        "global_defs {{
    router_id LVS_DEVEL
}}
vrrp_instance VI_1 {{
    state {state}
    interface eth0
    virtual_router_id 51
    priority {priority}
    advert_int 1
    authentication {{
        auth_type PASS
        auth_pass 42
    }}
    virtual_ipaddress {{
        {vip}
    }}
}}
"
    )
}

impl Keepalived {
    fn new(prefix: [u8; 3]) -> Result<Self, String> {
        let lab = ApiLab::new(prefix, 3, &[0, 1, 2])?;
        let dir = std::env::temp_dir().join(format!("vip-peers-keepalived-{}", lab.lab.tag));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let mut me = Self { daemons: vec![None, None, None], dir, lab };
        for i in 0..3 {
            me.start(i)?;
        }
        Ok(me)
    }

    fn start(&mut self, i: usize) -> Result<(), String> {
        let conf = self.dir.join(format!("n{i}.conf"));
        std::fs::write(&conf, keepalived_conf(i, self.lab.vip)).map_err(|e| e.to_string())?;
        let pid = |what: &str| self.dir.join(format!("n{i}-{what}.pid"));
        // -n: no daemon (the child is keepalived's parent process); -P: VRRP only; -G: no
        // syslog (nothing of the lab reaches the host's log); pid files of its own.
        let child = self
            .lab
            .ns(i)
            .cmd("keepalived")
            .args(["-n", "-P", "-G", "-f"])
            .arg(&conf)
            .arg("-p")
            .arg(pid("main"))
            .arg("-r")
            .arg(pid("vrrp"))
            .arg("-c")
            .arg(pid("checkers"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting keepalived: {e}"))?;
        self.daemons[i] = Some(child);
        Ok(())
    }

    /// Every keepalived process in node `i`'s namespace (the parent and its VRRP child).
    fn pids(&self, i: usize) -> Vec<i32> {
        let listed = std::process::Command::new("ip").args(["netns", "pids", &self.lab.ns(i).name]).output();
        let text = listed.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
        text.split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
            .filter(|p| std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "keepalived"))
            .collect()
    }

    fn reap(&mut self, i: usize) -> Result<(), String> {
        let Some(mut child) = self.daemons[i].take() else { return Ok(()) };
        if !wait_until(Duration::from_secs(10), || child.try_wait().is_ok_and(|s| s.is_some())) {
            let _ = child.kill();
            let _ = child.wait();
            return Err("keepalived did not exit within 10 s".into());
        }
        // The VRRP child, if it outlived its parent.
        for p in self.pids(i) {
            // SAFETY: plain kill(2) on a process found in our own lab namespace.
            unsafe { libc::kill(p, libc::SIGKILL) };
        }
        Ok(())
    }
}

impl Cluster for Keepalived {
    fn api(&self) -> &ApiLab {
        &self.lab
    }

    fn holders(&self) -> Vec<usize> {
        let vip = format!(" {}/32 ", self.lab.vip);
        (0..3).filter(|&i| self.lab.ns(i).addrs("eth0").is_ok_and(|a| a.contains(&vip))).collect()
    }

    fn strike(&mut self, node: usize, event: Event) -> Result<(), String> {
        if event == Event::NodeLoss {
            self.lab.ns(node).ip(&["link", "set", "eth0", "down"])?;
        }
        match event {
            // The parent forwards SIGTERM to its VRRP child, which sends priority 0 and
            // removes the VIP: keepalived's planned stop.
            Event::Term => {
                let pid = self.daemons[node].as_ref().ok_or("keepalived not running")?.id();
                // SAFETY: plain kill(2) on our own child.
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            }
            // A crash of every keepalived process: the parent is frozen first (so it can
            // neither respawn its VRRP child nor tell it to clean up), then all killed.
            Event::Kill | Event::NodeLoss => {
                let parent = self.daemons[node].as_ref().ok_or("keepalived not running")?.id() as i32;
                let pids = self.pids(node);
                // SAFETY: plain kill(2) on our own child, then on processes found in our
                // own lab namespace.
                unsafe { libc::kill(parent, libc::SIGSTOP) };
                for p in pids.iter().filter(|&&p| p != parent).chain([&parent]) {
                    // SAFETY: as above.
                    unsafe { libc::kill(*p, libc::SIGKILL) };
                }
            }
        }
        Ok(())
    }

    fn heal(&mut self, node: usize, event: Event) -> Result<(), String> {
        self.reap(node)?;
        let ns = self.lab.ns(node);
        if event == Event::NodeLoss {
            ns.ip(&["link", "set", "eth0", "up"])?;
        }
        // A killed keepalived leaves the VIP behind; a rebooted node would not have it.
        let _ = ns.ip(&["addr", "del", &format!("{}/32", self.lab.vip), "dev", "eth0"]);
        self.start(node)
    }
}

impl Drop for Keepalived {
    fn drop(&mut self) {
        for i in 0..3 {
            // The parent by its handle (always ours to kill and reap), then whatever
            // keepalived is left in the namespace (its VRRP child); deleting the
            // namespace kills anything else.
            if let Some(mut c) = self.daemons[i].take() {
                let _ = c.kill();
                let _ = c.wait();
            }
            for p in self.pids(i) {
                // SAFETY: plain kill(2) on a process found in our own lab namespace.
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// vip-agent with `--election kubernetes` on every node.
struct VipCluster {
    agents: Vec<Option<Agent>>,
    lab: ApiLab,
}

impl VipCluster {
    fn new(prefix: [u8; 3]) -> Result<Self, String> {
        let lab = ApiLab::new(prefix, 3, &[0, 1, 2])?.with_lease_api()?;
        let agents = lab.start_agents(&[0, 1, 2])?.into_iter().map(Some).collect();
        Ok(Self { agents, lab })
    }
}

impl Cluster for VipCluster {
    fn api(&self) -> &ApiLab {
        &self.lab
    }

    fn holders(&self) -> Vec<usize> {
        self.lab.leaders()
    }

    fn strike(&mut self, node: usize, event: Event) -> Result<(), String> {
        if event == Event::NodeLoss {
            self.lab.ns(node).ip(&["link", "set", "eth0", "down"])?;
        }
        let signal = if event == Event::Term { libc::SIGTERM } else { libc::SIGKILL };
        // Signal without waiting: a SIGTERMed agent drains before it exits, and the
        // takeover is measured meanwhile.
        self.agents[node].as_ref().ok_or("agent not running")?.signal(signal);
        Ok(())
    }

    fn heal(&mut self, node: usize, event: Event) -> Result<(), String> {
        if let Some(mut a) = self.agents[node].take() {
            a.stop(0, EXIT_WITHIN)?;
        }
        if event == Event::NodeLoss {
            self.lab.ns(node).ip(&["link", "set", "eth0", "up"])?;
            // A dead node comes back without its pins (bpffs does not survive a reboot).
            let _ = std::fs::remove_dir_all(self.lab.pin_path(node)?);
        }
        self.agents[node] = Some(self.lab.start_agent(node, &[])?);
        Ok(())
    }
}

/// The node that alone has held the VIP for [`STABLE`].
fn stable_holder(c: &dyn Cluster) -> Result<usize, String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut holder, mut since) = (None, Instant::now());
    while Instant::now() < deadline {
        let now = match c.holders().as_slice() {
            [one] => Some(*one),
            _ => None,
        };
        if now != holder {
            (holder, since) = (now, Instant::now());
        }
        if let Some(h) = holder.filter(|_| since.elapsed() >= STABLE) {
            return Ok(h);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!("no single stable VIP holder within 30 s (holders now {:?})", c.holders()))
}

/// When (after `from`) a node other than `old_mac` first answered ARP for the VIP.
fn first_other_answer(lab: &ApiLab, old_mac: [u8; 6], from: Instant) -> Option<Duration> {
    let (ns, vip) = (lab.client_ns().name.clone(), lab.vip);
    let src = Ipv4Addr::new(vip.octets()[0], vip.octets()[1], vip.octets()[2], 2);
    std::thread::spawn(move || {
        while from.elapsed() < ANSWER_WITHIN {
            let sent = Instant::now();
            let macs = arp_probe(&ns, "eth0", src, vip, Duration::from_millis(20)).ok()?;
            if macs.iter().any(|m| *m != old_mac) {
                return Some(sent - from);
            }
        }
        None
    })
    .join()
    .ok()
    .flatten()
}

/// The paced request stream through the VIP, with the lab's HTTPS client.
fn stream(lab: &ApiLab) -> Stream {
    let mut client = lab.client.clone();
    client.timeout = REQUEST_TIMEOUT;
    let addr = SocketAddr::from((lab.vip, 6443));
    Stream::start(&lab.client_ns().name, STREAM_INTERVAL, STREAM_POOL, move || {
        matches!(client.get(addr, "/"), Ok((200, _)))
    })
}

/// From the first failure to the first success after the last failure (or the end).
fn outage(timeline: &[(i64, bool)]) -> Duration {
    let Some(first) = timeline.iter().position(|(_, ok)| !ok) else { return Duration::ZERO };
    let last = timeline.iter().rposition(|(_, ok)| !ok).unwrap_or(first);
    let end = timeline[last..].iter().find(|(_, ok)| *ok).or(timeline.last()).map_or(0, |(t, _)| *t);
    Duration::from_millis((end - timeline[first].0).max(0) as u64)
}

fn trial(c: &mut dyn Cluster, event: Event) -> Result<Trial, String> {
    let old = stable_holder(c)?;
    let old_mac = mac_of(c.api().ns(old), "eth0")?;
    let stream = stream(c.api());
    std::thread::sleep(BEFORE);
    let t = Instant::now();
    c.strike(old, event)?;
    let new_answer = first_other_answer(c.api(), old_mac, t);
    let end = t + MIN_AFTER.max(new_answer.unwrap_or(ANSWER_WITHIN) + AFTER_ANSWER);
    std::thread::sleep(end.saturating_duration_since(Instant::now()));
    let starts = stream.stop();
    let timeline: Vec<(i64, bool)> = starts
        .iter()
        .map(|(s, ok)| {
            let ms = match s.checked_duration_since(t) {
                Some(d) => d.as_millis() as i64,
                None => -((t - *s).as_millis() as i64),
            };
            (ms, *ok)
        })
        .collect();
    c.heal(old, event)?;
    Ok(Trial {
        new_answer,
        outage: outage(&timeline),
        failed: timeline.iter().filter(|(_, ok)| !ok).count(),
        requests: timeline.len(),
        timeline,
    })
}

/// Every event, [`TRIALS`] times, for one system in a lab of its own.
pub fn run(system: System, trials: usize) -> Result<Vec<EventResult>, String> {
    let mut cluster: Box<dyn Cluster> = match system {
        System::Keepalived => Box::new(Keepalived::new([10, 68, 0])?),
        System::Vip => Box::new(VipCluster::new([10, 69, 0])?),
    };
    let mut results = Vec::new();
    for event in EVENTS {
        let mut result = EventResult { system, event, trials: Vec::new(), error: None };
        for n in 0..trials {
            eprintln!("vip-peers: failover {} {} trial {}/{trials}", system.name(), event.name(), n + 1);
            match trial(cluster.as_mut(), event) {
                Ok(t) => result.trials.push(t),
                Err(e) => {
                    result.error = Some(e);
                    break;
                }
            }
        }
        let failed = result.error.is_some();
        results.push(result);
        if failed {
            // A cluster left mid-trial is in no state for the next event: a fresh one.
            cluster = match system {
                System::Keepalived => Box::new(Keepalived::new([10, 68, 0])?),
                System::Vip => Box::new(VipCluster::new([10, 69, 0])?),
            };
        }
    }
    Ok(results)
}
