//! The backends the agent tracks: the static `--backend`s and the apiservers discovery
//! finds, each with its health checker, its health (rise/fall hysteresis and the reason
//! of its last failure), and its MAC for DSR. Also this node's own apiserver readiness,
//! which gates leadership.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr},
};

use tokio::{sync::mpsc, task::JoinHandle};
use tracing::{info, warn};
use vip_common::{Backend, ForwardMode, HealthReason, PeerKey};

use crate::{
    balancer::BackendSpec,
    config::{Election, Mode, RunConfig},
    discovery::Endpoint,
    health::{self, CheckError, Health, Hysteresis, Probe, Report},
    metrics::AgentMetrics,
    netdev::Netdev,
    netlink::{Netlink, NetlinkError, Nexthop},
    vipprobe::VipProbe,
};

/// One backend as the agent tracks it.
struct Tracked {
    /// Stable key: health reports name their backend by it.
    key: usize,
    checker: Option<JoinHandle<()>>,
    ip: Ipv4Addr,
    check_addr: SocketAddr,
    /// The backend is this node.
    local: bool,
    mac: Option<[u8; 6]>,
    /// IPIP: the next hop towards it, as its last successful check resolved it.
    nexthop: Option<Nexthop>,
    /// Its last check found the apiserver answering but VIP traffic not accepted (the
    /// VIP-path probe failed: the node no longer holds the VIP, e.g. its agent stopped
    /// for good). New flows stop at once, without waiting for `fall` failures: each one
    /// sent there would be refused. Pinned flows stay (draining), so a lost probe costs
    /// no connection.
    vip_path_failed: bool,
    health: Hysteresis,
    /// Why its last check failed; `None` after a success.
    reason: HealthReason,
    warned_no_mac: bool,
    /// Its last VIP-path probe was refused (a RST from its data plane): its agent is
    /// leaving, and it drains.
    leaving: bool,
    /// Its VIP path went silent for good: `fall` probes in a row unanswered after
    /// refusals (the leaving node has gone: its VIP off `lo`, its program detached), or
    /// [`SILENT_WITHOUT_REFUSAL`] × `fall` with no refusal seen (its refusals were
    /// missed: this node's probes came late for the leaving node's drain window, or its
    /// RSTs were lost). It is down, so its pinned flows are re-hashed and their clients
    /// reset by the backend they reach, instead of sending into a node that drops them
    /// until the clients time out. Cleared by a probe answered again. Carried over by a
    /// restart (a backend the previous agent left down for its VIP path), so a new agent
    /// does not take it for draining again.
    left: bool,
    /// Probes unanswered (or reset by its host) in a row (see `left`); a refusal or an
    /// answer starts it again.
    silences: u32,
    /// `--fall`: how many of them make a leaving node gone, so one lost RST does not.
    fall: u32,
    /// When it left the EndpointSlices while still serving: it drains (no new flows, its
    /// connections kept) until it stops serving or `--drain-hold` ends, then leaves the
    /// list ([`Backends::expire_deregistered`]). An apiserver shutting down deregisters
    /// itself at the start of its shutdown delay: removed at once, every connection it
    /// still served was re-hashed and reset.
    deregistered: Option<std::time::Instant>,
}

impl Tracked {
    /// Backend `ip`, checked on `port` (key `key`), as a previous agent's data plane
    /// left it (`old`; `None`: not there, or no previous agent): up if it was up, so a
    /// restart keeps it in the table while the first checks run; draining if it was
    /// draining (its pins, and the slots it holds), rather than down; unknown otherwise.
    fn carried_over(key: usize, ip: Ipv4Addr, port: u16, local: bool, old: Option<Backend>, cfg: &RunConfig) -> Self {
        let initial = match old {
            Some(e) if e.flags & Backend::F_UP != 0 => Health::Up,
            _ => Health::Unknown,
        };
        let reason = old
            .filter(|e| e.flags & (Backend::F_UP | Backend::F_SERVING) == Backend::F_SERVING)
            .map(|e| HealthReason::from_u8(e.reason))
            .filter(|r| r.serves())
            .unwrap_or(HealthReason::None);
        // Down for its VIP path (not serving, reason vip_path) is what a node that left
        // is, and nothing else: a silent probe otherwise keeps a backend draining.
        let left = old.is_some_and(|e| {
            e.flags & (Backend::F_UP | Backend::F_SERVING) == 0
                && HealthReason::from_u8(e.reason) == HealthReason::VipPath
        });
        Self {
            key,
            checker: None,
            ip,
            check_addr: SocketAddr::from((ip, port)),
            local,
            mac: old.map(|e| e.mac).filter(|m| *m != [0; 6]),
            nexthop: None,
            vip_path_failed: false,
            health: Hysteresis::new(cfg.health.rise, cfg.health.fall, initial),
            reason: if left { HealthReason::VipPath } else { reason },
            warned_no_mac: false,
            leaving: left,
            left,
            silences: 0,
            fall: cfg.health.fall,
            deregistered: None,
        }
    }

    /// Records a check's `result`: the health hysteresis, the reason the backend shows,
    /// and what its VIP-path probe says of a leaving node.
    fn observe(&mut self, result: &Result<(), CheckError>) {
        self.health.observe(result.is_ok());
        self.reason = match result.as_ref().err() {
            Some(e) => e.reason(),
            // Answering again, not up yet (`--rise`): a backend that drained served all
            // along, and keeps draining, its pinned flows honoured, until it is up. Marked
            // down in between, its pins would be re-hashed: every connection it kept
            // through the drain reset as it recovers.
            None if self.health.state() != Health::Up && self.reason.serves() => self.reason,
            None => HealthReason::None,
        };
        self.vip_path_failed = self.reason == HealthReason::VipPath;
        match result {
            // Another VIP's path not accepted: the first one's was, so the node has not
            // left; it drains (it lacks that VIP).
            Ok(()) | Err(CheckError::VipMissing { .. }) => (self.leaving, self.left, self.silences) = (false, false, 0),
            Err(CheckError::VipPath { refused: true, .. }) => {
                (self.leaving, self.left, self.silences) = (true, false, 0)
            }
            Err(CheckError::VipPath { refused: false, why }) if !self.left => {
                self.silences += 1;
                if self.leaving && self.silences >= self.fall {
                    info!(backend = %self.ip, "a leaving node answers VIP traffic no more: gone, its connections re-hashed");
                    self.left = true;
                } else if self.silences >= SILENT_WITHOUT_REFUSAL * self.fall {
                    info!(
                        backend = %self.ip,
                        failed_probes = self.silences,
                        last = %why,
                        "a node's VIP path stays unanswered (or reset by its host) while its apiserver answers: gone, its connections re-hashed"
                    );
                    self.left = true;
                }
            }
            Err(_) => {}
        }
    }
}

/// How many times `--fall` VIP-path probes must go unanswered, with no refusal seen, for
/// a node to count as gone (see `Tracked::left`). Why more than `fall`: without the
/// refusal that says "leaving", silence is weaker evidence (a probe timing out on a loaded
/// prober, a VIP being put back on the peer's `lo`), and taking a node down re-hashes
/// every connection it holds. Why not never: a leaving node whose refusals this node
/// missed holds its connections in a hole until their clients time out (a loaded CI
/// run's leader probed too late for a stopping node's 600 ms window).
const SILENT_WITHOUT_REFUSAL: u32 = 3;

/// What every checker shares.
#[derive(Clone)]
struct Checks {
    probe: Probe,
    /// The VIP-path probe of DSR backends (the IPv4 VIPs' needs this node's IPv4 address,
    /// the IPv6 VIPs' its IPv6 one).
    dsr: Option<health::DsrCheck>,
    /// The next-hop lookup and VIP-path probe of IPIP backends.
    ipip: health::PathCheck,
    /// The check of this node's own IPv6 address, for the backend that is this node
    /// (with IPv6 VIPs).
    local6: Option<health::PathCheck>,
}

impl Checks {
    fn new(probe: Probe, dev: &Netdev, nl: &Netlink, cfg: &RunConfig) -> Self {
        let vip_probe = dev.ipv4.zip(cfg.vips4().first().copied()).map(|(src_ip, vip)| VipProbe {
            ifindex: dev.ifindex,
            src_mac: dev.mac.0,
            src_ip,
            vip,
            port: cfg.port,
        });
        let other_vips: Vec<Ipv4Addr> = cfg.vips4().into_iter().skip(1).collect();
        let vips6 = cfg.vips6();
        // This node's IPv6 address, read for every checker at once.
        let source6 = std::sync::Arc::new(health::Source6::default());
        let local6 = vips6.first().map(|&vip| {
            let (netlink, source6) = (nl.clone(), source6.clone());
            health::PathCheck::Local6(health::Local6Check { netlink, ifindex: dev.ifindex, vip, source6 })
        });
        let dsr = (vip_probe.is_some() || !vips6.is_empty()).then(|| health::DsrCheck {
            netlink: nl.clone(),
            ifindex: dev.ifindex,
            probe: vip_probe,
            other_vips: other_vips.clone(),
            vips6,
            src_mac: dev.mac.0,
            port: cfg.port,
            source6,
            fall: cfg.health.fall,
        });
        let ipip = health::PathCheck::Ipip { netlink: nl.clone(), ifindex: dev.ifindex, probe: vip_probe, other_vips };
        Self { probe, dsr, ipip, local6 }
    }
}

/// Whether this node's own apiserver is ready: a gate on leadership. It drops on the
/// first failed check (a leader must stop answering at once) and comes back after
/// `rise` successes. It watches the backend that is this node, or, if none is (or
/// backends are discovered), a dedicated check of the apiserver on this node's address.
struct Gate {
    key: Option<usize>,
    health: Hysteresis,
    checker: Option<JoinHandle<()>>,
}

/// What a health report changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReportOutcome {
    /// The data plane's view of the backend changed: push the table.
    pub table_changed: bool,
    /// The local apiserver's readiness changed to this.
    pub readiness: Option<bool>,
}

/// The tracked backends and the readiness gate.
pub struct Backends {
    list: Vec<Tracked>,
    /// The key of the gate's own check (see [`Backends::new`]).
    gate_key: usize,
    next_key: usize,
    gate: Gate,
    checks: Option<Checks>,
    tx: mpsc::Sender<Report>,
}

impl Backends {
    /// The static backends. `previous`: the backend entries of an adopted data plane, so
    /// a restart keeps healthy backends in the table while the first checks run.
    pub async fn new(
        cfg: &RunConfig,
        dev: &Netdev,
        nl: &Netlink,
        previous: &[(u32, Backend)],
        probe: Option<Probe>,
        tx: mpsc::Sender<Report>,
    ) -> Result<Self, NetlinkError> {
        let old = |ip: Ipv4Addr| previous.iter().find(|(_, e)| e.ip == ip.octets()).map(|(_, e)| *e);
        let mut list = Vec::new();
        for b in &cfg.backends {
            let local = Some(b.ip) == dev.ipv4 || nl.has_address(b.ip).await?;
            let port = b.port.unwrap_or(cfg.port);
            list.push(Tracked::carried_over(list.len(), b.ip, port, local, old(b.ip), cfg));
        }
        // Keys 0..len are the static backends; key len is the gate's own check;
        // discovered backends (and those kept below) take keys from len + 1 on.
        let gate_key = list.len();
        let mut next_key = gate_key + 1;
        // With discovery, the apiservers a previous agent balanced to stay, as it had
        // them, until the first discovery snapshot says which are still registered: the
        // first table, written before discovery answers (and while the previous agent's
        // program still runs), must not drop them, and their pins with them.
        if cfg.discover {
            for &(_, e) in previous {
                let ip = Ipv4Addr::from(e.ip);
                if list.iter().any(|b| b.ip == ip) || cfg.vips.contains(&ip.into()) {
                    continue;
                }
                // As `merge_discovered`: one more than the data plane holds would fail
                // every table update.
                if list.len() >= vip_common::MAX_BACKENDS as usize {
                    break;
                }
                let local = Some(ip) == dev.ipv4 || nl.has_address(ip).await?;
                info!(backend = %ip, "apiserver kept from the previous agent until discovery answers");
                list.push(Tracked::carried_over(next_key, ip, cfg.port, local, Some(e), cfg));
                next_key += 1;
            }
        }
        // By DSR a backend needs its MAC before it can be in the table. One carried over
        // without (the previous agent forwarded by IPIP, which does not learn it) is read
        // from the neighbour table now: else the first table has it down, and every flow
        // pinned to it re-hashes before its first check.
        if cfg.forward == ForwardMode::Dsr {
            for b in list.iter_mut().filter(|b| !b.local && b.mac.is_none()) {
                b.mac = nl.neighbour_mac(dev.ifindex, b.ip).await.ok().flatten();
            }
        }
        let gate = Gate { key: None, health: Hysteresis::new(cfg.health.rise, 1, Health::Unknown), checker: None };
        let checks = probe.map(|p| Checks::new(p, dev, nl, cfg));
        Ok(Self { list, gate_key, next_key, gate, checks, tx })
    }

    /// Whether leadership waits for this node's apiserver: with an election and
    /// something to check it with.
    pub fn gated(&self) -> bool {
        self.gate.key.is_some()
    }

    /// Starts every checker, and the readiness gate's: with an election (ARP mode) and
    /// in BGP mode, this node carries the VIP only while its own apiserver is ready.
    pub fn start_checks(&mut self, cfg: &RunConfig, dev: &Netdev) {
        let gated = cfg.mode == Mode::Bgp || cfg.election == Election::Kubernetes;
        let Some(checks) = self.checks.clone() else {
            if gated {
                warn!("no --backend: announcing the VIP is not gated on apiserver health");
            }
            return;
        };
        for b in self.list.iter_mut() {
            spawn_checker(b, &checks, cfg, &self.tx);
        }
        if !gated {
            return;
        }
        if let (Some(b), false) = (self.list.iter().find(|b| b.local), cfg.discover) {
            self.gate.key = Some(b.key);
            return;
        }
        // Discovered backends come and go: the gate gets a check of its own, on this
        // node's address, else loopback.
        let key = self.gate_key;
        let addr = SocketAddr::from((dev.ipv4.unwrap_or(Ipv4Addr::LOCALHOST), cfg.port));
        info!(%addr, "checking this node's apiserver for the leadership gate");
        self.gate.key = Some(key);
        self.gate.checker = Some(tokio::spawn(health::run_checker(
            key,
            addr,
            checks.probe,
            cfg.health.interval,
            cfg.health.timeout,
            None,
            self.tx.clone(),
        )));
    }

    /// The interface was recreated (new index, maybe a new MAC): checkers start over.
    pub fn relink(&mut self, cfg: &RunConfig, dev: &Netdev, nl: &Netlink) {
        let Some(checks) = self.checks.as_mut() else { return };
        *checks = Checks::new(checks.probe.clone(), dev, nl, cfg);
        let checks = checks.clone();
        for b in self.list.iter_mut() {
            if let Some(c) = b.checker.take() {
                c.abort();
            }
            spawn_checker(b, &checks, cfg, &self.tx);
        }
    }

    /// Whether other nodes likely balance to this one: it is a backend itself (its
    /// apiserver is in the table) beside remote ones.
    pub fn serves_peers(&self) -> bool {
        self.list.iter().any(|b| b.local) && self.list.iter().any(|b| !b.local)
    }

    /// Records a health report.
    pub fn on_report(&mut self, cfg: &RunConfig, dev: &Netdev, report: Report, m: &AgentMetrics) -> ReportOutcome {
        let mut out = ReportOutcome::default();
        if Some(report.backend) == self.gate.key {
            // The apiserver's readiness: this node lacking a VIP's path (its IPv6 address
            // gone) drains its own backend, it does not stop it leading (it still answers
            // for the VIPs and forwards their flows to the other backends).
            let ready = report.result.as_ref().err().is_none_or(|e| matches!(e, CheckError::VipMissing { .. }));
            out.readiness = self.gate.health.observe(ready).map(|h| h == Health::Up);
        }
        let Some(i) = self.list.iter().position(|b| b.key == report.backend) else { return out };
        let before = spec_of(&self.list[i], cfg);
        let b = &mut self.list[i];
        m.observe_check(b.ip, report.latency.as_secs_f64());
        if report.result.is_ok() {
            // Resolved, or not (any more): the data plane falls back to its FIB lookup.
            b.nexthop = report.nexthop;
        }
        if let Some(mac) = report.mac {
            b.mac = Some(mac);
        } else if report.result.is_ok()
            && cfg.forward == ForwardMode::Dsr
            && !b.local
            && b.mac.is_none()
            && !b.warned_no_mac
        {
            warn!(backend = %b.ip, interface = %dev.name, "no neighbour entry: is the backend on this L2? (else use --forward ipip)");
            b.warned_no_mac = true;
        }
        let first = b.health.state() == Health::Unknown;
        b.observe(&report.result);
        let after = spec_of(&self.list[i], cfg);
        // The state the data plane gives it (what `status` and the metrics show), not the
        // check's hysteresis: an apiserver answering "not ready" drains, it is not down.
        let (was, now) = (if first { "unknown" } else { state_name(&before) }, state_name(&after));
        if was != now {
            let (backend, reason) = (after.ip, after.reason.name());
            match &report.result {
                // A first state is news, not a change: nodes started together see each
                // other's VIP path not ready yet for a moment.
                Err(e) if first => info!(%backend, state = now, reason, error = %e, "backend's first state"),
                Err(e) => warn!(%backend, state = now, was, reason, error = %e, "backend state changed"),
                Ok(()) => info!(%backend, state = now, was, "backend state changed"),
            }
        } else if let (Err(e), false) = (&report.result, first) {
            // The same state for another reason (a route gone, then a gateway that does
            // not answer): what `status` and the metrics now show, so the log says it too.
            if after.reason != before.reason {
                let (backend, reason, was) = (after.ip, after.reason.name(), before.reason.name());
                info!(%backend, state = now, reason, was, error = %e, "backend's reason changed");
            }
        }
        out.table_changed = after != before;
        out
    }

    /// Makes the list the static `--backend`s plus the discovered apiservers: new ones
    /// start unknown with a checker of their own, gone ones lose theirs. Returns
    /// whether the list changed.
    pub async fn merge_discovered(&mut self, cfg: &RunConfig, nl: &Netlink, found: &BTreeSet<Endpoint>) -> bool {
        let wanted: Vec<(Ipv4Addr, u16)> = cfg
            .backends
            .iter()
            .map(|b| (b.ip, b.port.unwrap_or(cfg.port)))
            .chain(found.iter().map(|e| (e.ip, e.port)))
            .filter(|(ip, _)| !cfg.vips.contains(&(*ip).into()))
            .collect();
        let before = self.list.len();
        let mut drained = false;
        self.list.retain_mut(|b| {
            let registered = wanted.iter().any(|(ip, _)| *ip == b.ip);
            match (registered, b.deregistered) {
                (true, None) => true,
                (true, Some(_)) => {
                    info!(backend = %b.ip, "apiserver registered again");
                    b.deregistered = None;
                    drained = true;
                    true
                }
                (false, Some(_)) => true,
                (false, None) if serving(b) => {
                    info!(backend = %b.ip, "apiserver no longer registered: draining it until it stops serving or --drain-hold ends");
                    b.deregistered = Some(std::time::Instant::now());
                    drained = true;
                    true
                }
                (false, None) => {
                    info!(backend = %b.ip, "apiserver no longer registered: removing it");
                    if let Some(c) = b.checker.take() {
                        c.abort();
                    }
                    false
                }
            }
        });
        let mut changed = drained || self.list.len() != before;
        // An apiserver a previous agent left, kept (and checked on the VIP's port) until
        // discovery answered, is checked on its registered port from now on; it keeps its
        // health, its MAC and its place in the table meanwhile.
        for b in self.list.iter_mut().filter(|b| b.key > self.gate_key) {
            let Some(port) = found.iter().find(|e| e.ip == b.ip).map(|e| e.port) else { continue };
            if port != b.check_addr.port() {
                info!(backend = %b.ip, port, "checking the apiserver on its registered port");
                b.check_addr = SocketAddr::from((b.ip, port));
                if let Some(c) = b.checker.take() {
                    c.abort();
                    if let Some(checks) = &self.checks {
                        spawn_checker(b, checks, cfg, &self.tx);
                    }
                }
            }
        }
        for (ip, port) in wanted {
            if self.list.iter().any(|b| b.ip == ip) {
                continue;
            }
            // The data plane holds MAX_BACKENDS: one more would fail every table update,
            // taking all the others out with it.
            if self.list.len() >= vip_common::MAX_BACKENDS as usize {
                warn!(backend = %ip, max = vip_common::MAX_BACKENDS, "more apiservers registered than the data plane holds: not balancing to this one");
                continue;
            }
            let local = nl.has_address(ip).await.unwrap_or(false);
            let mut b = Tracked {
                key: self.next_key,
                checker: None,
                ip,
                check_addr: SocketAddr::from((ip, port)),
                local,
                mac: None,
                nexthop: None,
                vip_path_failed: false,
                health: Hysteresis::new(cfg.health.rise, cfg.health.fall, Health::Unknown),
                reason: HealthReason::None,
                warned_no_mac: false,
                leaving: false,
                left: false,
                silences: 0,
                fall: cfg.health.fall,
                deregistered: None,
            };
            self.next_key += 1;
            if let Some(c) = &self.checks {
                spawn_checker(&mut b, c, cfg, &self.tx);
            }
            info!(backend = %ip, local, "apiserver discovered");
            self.list.push(b);
            changed = true;
        }
        changed
    }

    /// Removes the deregistered backends that stopped serving, or whose drain has lasted
    /// `hold`; returns their addresses (the table is to be rebuilt without them).
    pub fn expire_deregistered(&mut self, hold: std::time::Duration) -> Vec<Ipv4Addr> {
        let mut gone = Vec::new();
        self.list.retain_mut(|b| {
            let Some(since) = b.deregistered else { return true };
            if serving(b) && since.elapsed() < hold {
                return true;
            }
            if let Some(c) = b.checker.take() {
                c.abort();
            }
            gone.push(b.ip);
            false
        });
        gone
    }

    /// What the balancer installs.
    pub fn specs(&self, cfg: &RunConfig) -> Vec<BackendSpec> {
        self.list.iter().map(|b| spec_of(b, cfg)).collect()
    }

    /// Every other node, by address and (when known) MAC: what they balanced is never
    /// balanced again here, and only their IPIP is decapsulated.
    pub fn peers(&self) -> BTreeSet<PeerKey> {
        self.list
            .iter()
            .filter(|b| !b.local)
            .flat_map(|b| std::iter::once(PeerKey::ipv4(b.ip.octets())).chain(b.mac.map(PeerKey::mac)))
            .collect()
    }

    /// The addresses of the backends in the list.
    pub fn ips(&self) -> BTreeSet<Ipv4Addr> {
        self.list.iter().map(|b| b.ip).collect()
    }

    /// Every backend has had its first check result (or was carried over up from a
    /// previous agent).
    pub fn all_checked(&self) -> bool {
        self.list.iter().all(|b| b.health.state() != Health::Unknown)
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// Stops every checker.
    pub fn stop(&mut self) {
        for b in self.list.iter_mut() {
            if let Some(c) = b.checker.take() {
                c.abort();
            }
        }
        if let Some(c) = self.gate.checker.take() {
            c.abort();
        }
    }
}

impl Drop for Backends {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Whether backend `b` still serves the connections it has: up, or draining (see
/// [`HealthReason::serves`]); not down, and not unknown.
fn serving(b: &Tracked) -> bool {
    b.health.state() == Health::Up || b.reason.serves()
}

/// The data-plane state of a backend as `status` names it: `up` (new flows), `draining`
/// (its connections only), `down`.
fn state_name(spec: &BackendSpec) -> &'static str {
    match (spec.healthy, spec.draining) {
        (true, _) => "up",
        (false, true) => "draining",
        (false, false) => "down",
    }
}

fn spec_of(b: &Tracked, cfg: &RunConfig) -> BackendSpec {
    let up = b.health.state() == Health::Up;
    let reachable = b.local || cfg.forward != ForwardMode::Dsr || b.mac.is_some();
    let healthy = up && reachable && !b.vip_path_failed && b.deregistered.is_none();
    let reason = match (healthy, up) {
        (true, _) => HealthReason::None,
        (false, true) if b.vip_path_failed => HealthReason::VipPath,
        (false, true) if b.deregistered.is_some() => HealthReason::Deregistered,
        (false, true) => HealthReason::NoMac,
        (false, false) => b.reason,
    };
    BackendSpec {
        ip: b.ip,
        mac: b.mac.unwrap_or_default(),
        nexthop: b.nexthop.filter(|_| cfg.forward == ForwardMode::Ipip && !b.local),
        weight: 1,
        local: b.local,
        healthy,
        // Its apiserver answered "not ready", or it stopped taking VIP traffic: it drains,
        // serving what it holds.
        draining: !healthy && reason.serves() && !b.left,
        reason,
    }
}

/// Worker threads of the checks' runtime.
const CHECK_THREADS: usize = 2;

/// The runtime health checks run on: their own, multi-threaded, so that their TLS
/// handshakes and probes never delay the election's renewals, the table updates or a
/// SIGTERM on the agent's (single-threaded) runtime, however many backends there are
/// (1,000 apiservers checked every second take half a core here: `cargo xtask bench --
/// discovery`). If it cannot be built, the agent's own runtime.
fn check_runtime() -> tokio::runtime::Handle {
    static RUNTIME: std::sync::OnceLock<Option<tokio::runtime::Runtime>> = std::sync::OnceLock::new();
    let rt = RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(CHECK_THREADS)
            .thread_name("vip-checks")
            .enable_all()
            .build()
            .inspect_err(|error| warn!(%error, "no runtime of their own for the health checks"))
            .ok()
    });
    rt.as_ref().map_or_else(tokio::runtime::Handle::current, |rt| rt.handle().clone())
}

fn spawn_checker(b: &mut Tracked, checks: &Checks, cfg: &RunConfig, tx: &mpsc::Sender<Report>) {
    // Backends on other nodes must also accept VIP traffic (hold the VIP, and, by IPIP,
    // decapsulate it); IPIP backends get their next hop resolved first.
    let path = match (cfg.forward, b.local) {
        (_, true) => checks.local6.clone(),
        (ForwardMode::Dsr, false) => checks.dsr.clone().map(health::PathCheck::Dsr),
        (ForwardMode::Ipip, false) => Some(checks.ipip.clone()),
        (ForwardMode::Local, false) => None,
    };
    b.checker = Some(check_runtime().spawn(health::run_checker(
        b.key,
        b.check_addr,
        checks.probe.clone(),
        cfg.health.interval,
        cfg.health.timeout,
        path,
        tx.clone(),
    )));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An up backend on another node, rise 2, fall 3.
    fn tracked() -> Tracked {
        let ip = Ipv4Addr::new(10, 0, 0, 12);
        Tracked {
            key: 0,
            checker: None,
            ip,
            check_addr: SocketAddr::from((ip, 6443)),
            local: false,
            mac: Some([2, 0, 0, 0, 0, 12]),
            nexthop: None,
            vip_path_failed: false,
            health: Hysteresis::new(2, 3, Health::Up),
            reason: HealthReason::None,
            warned_no_mac: false,
            leaving: false,
            left: false,
            silences: 0,
            fall: 3,
            deregistered: None,
        }
    }

    /// `vip-agent run` with its defaults (rise 2, fall 3, DSR).
    fn cfg() -> RunConfig {
        let argv = ["vip-agent", "run", "--interface", "eth0", "--vip", "10.0.0.100", "--election", "none"];
        let cli = crate::config::parse_args(argv.map(std::ffi::OsString::from).to_vec(), &|_| None).unwrap();
        let crate::config::Command::Run(run) = cli.command else { panic!("not run") };
        RunConfig::try_from(*run).unwrap()
    }

    /// A restarted agent takes a backend the previous one left down for its VIP path
    /// (a node that left) for gone, not for draining: its silent probes keep it down.
    /// One draining for its VIP path (still serving) stays draining.
    #[test]
    fn a_backend_that_left_is_still_gone_after_a_restart() {
        let ip = Ipv4Addr::new(10, 0, 0, 12);
        let entry =
            |flags| Backend { ip: ip.octets(), flags, reason: HealthReason::VipPath as u8, ..Default::default() };
        let mut gone = Tracked::carried_over(0, ip, 6443, false, Some(entry(0)), &cfg());
        assert!(gone.left && gone.leaving);
        gone.observe(&vip_path(false));
        assert!(gone.left, "a silent probe leaves it gone");
        let draining = Tracked::carried_over(0, ip, 6443, false, Some(entry(Backend::F_SERVING)), &cfg());
        assert!(!draining.left && !draining.leaving);
        assert_eq!(draining.reason, HealthReason::VipPath);
    }

    fn vip_path(refused: bool) -> Result<(), CheckError> {
        Err(CheckError::VipPath { why: String::new(), refused })
    }

    #[test]
    fn a_drained_backend_drains_until_it_has_risen_again() {
        let mut b = tracked();
        for _ in 0..3 {
            b.observe(&Err(CheckError::Status(503)));
        }
        assert_eq!((b.health.state(), b.reason), (Health::Down, HealthReason::NotReady));
        b.observe(&Ok(()));
        assert_eq!(b.reason, HealthReason::NotReady, "answering again, not risen yet: still draining");
        assert!(serving(&b));
        b.observe(&Ok(()));
        assert_eq!((b.health.state(), b.reason), (Health::Up, HealthReason::None));
    }

    #[test]
    fn a_leaving_node_that_falls_silent_has_left() {
        let mut b = tracked();
        b.observe(&vip_path(false));
        assert!(!b.leaving && !b.left, "silence alone is not leaving");
        b.observe(&vip_path(true));
        assert!(b.leaving && !b.left, "refused: leaving, draining");
        b.observe(&vip_path(false));
        b.observe(&vip_path(false));
        assert!(!b.left, "two silences (fall 3): a lost RST, perhaps");
        b.observe(&vip_path(true));
        b.observe(&vip_path(false));
        b.observe(&vip_path(false));
        assert!(!b.left, "a refusal in between starts the count again");
        b.observe(&vip_path(false));
        assert!(b.left, "fall silences after refusals: gone");
        b.observe(&Ok(()));
        assert!(!b.leaving && !b.left, "answered again: back");
        b.observe(&vip_path(true));
        for _ in 0..3 {
            b.observe(&vip_path(false));
        }
        assert!(b.left);
        b.observe(&Err(CheckError::VipMissing { vip: Ipv4Addr::new(10, 0, 0, 101).into(), why: String::new() }));
        assert!(!b.left, "its first VIP answered again: back, draining for the VIP it lacks");
        assert_eq!(state_name(&spec_of(&b, &cfg())), "draining");
    }

    /// A leaving node whose refusals this node missed (its probes came after the drain
    /// window) is gone after a longer silence, not draining for ever.
    #[test]
    fn a_node_silent_without_refusals_has_left_after_a_longer_silence() {
        let mut b = tracked();
        let fall = b.fall;
        for _ in 1..SILENT_WITHOUT_REFUSAL * fall {
            b.observe(&vip_path(false));
        }
        assert!(!b.left, "silence shorter than {SILENT_WITHOUT_REFUSAL} × fall: still draining");
        assert_eq!(state_name(&spec_of(&b, &cfg())), "draining");
        b.observe(&Ok(()));
        for _ in 1..SILENT_WITHOUT_REFUSAL * fall {
            b.observe(&vip_path(false));
        }
        assert!(!b.left, "an answer in between starts the count again");
        b.observe(&vip_path(false));
        assert!(b.left, "silent for {SILENT_WITHOUT_REFUSAL} × fall: gone");
        assert_eq!(state_name(&spec_of(&b, &cfg())), "down");
    }
}
