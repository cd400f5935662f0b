//! `vip-agent run`: the daemon for one node.
//!
//! Start-up is ordered so that bad input changes nothing: everything that can fail on a
//! wrong value (interface, CA, metrics address) is checked before the data plane is
//! touched; then the maps are filled before the program is attached, so it never runs on
//! empty state. Every change to the host is recorded and undone on stop (or on a failed
//! start) — except with `--keep-forwarding-on-exit`, which leaves the data plane
//! attached and pinned, and the VIP in place, for the next agent to adopt.
//!
//! Leadership: `--election none` makes this node the permanent leader. In DSR and IPIP
//! modes every node holds the VIP on `lo` (followers are backends too; only ARP
//! answering moves with leadership), with `arp_ignore=1`/`arp_announce=2` so its
//! kernel never claims it.

use std::{
    net::{Ipv4Addr, SocketAddr},
    sync::Arc,
};

use tokio::{
    signal::unix::{signal, SignalKind},
    sync::{mpsc, watch},
};
use tracing::{error, info, info_span, warn, Instrument};
use vip_common::{Backend, Config, ForwardMode, VipState};

use crate::{
    apiclient::{self, ApiClientError},
    arp,
    balancer::{BackendSpec, Balancer, BalancerError, ServiceSpec, DEFAULT_GRACE},
    config::{Election, HealthCheck, RunConfig},
    dataplane::{Attached, Dataplane, DataplaneError, MapError, Maps},
    election::{self, ElectionConfig, Elector, KubeLeases, Leadership},
    health::{self, CaSource, Health, Hysteresis, Probe, TlsError},
    kubeconfig, metrics,
    netdev::{self, Netdev, NetdevError},
    netlink::{ArpSysctls, LinkEvent, Netlink, NetlinkError},
};

/// Where a pod finds its service account's CA.
const SERVICE_ACCOUNT_CA: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Netdev(#[from] NetdevError),
    /// Boxed: aya's errors are large, and this is returned on every path.
    #[error(transparent)]
    Dataplane(Box<DataplaneError>),
    #[error(transparent)]
    Map(#[from] MapError),
    #[error(transparent)]
    Balancer(#[from] BalancerError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    ApiClient(#[from] ApiClientError),
    #[error("--metrics-addr {addr}: cannot listen")]
    Metrics {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("installing the {signal} handler failed")]
    Signal {
        signal: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl From<DataplaneError> for RunError {
    fn from(e: DataplaneError) -> Self {
        RunError::Dataplane(Box::new(e))
    }
}

/// One backend as the agent tracks it.
struct BackendState {
    /// Stable key: health reports name their backend by it.
    key: usize,
    checker: Option<tokio::task::JoinHandle<()>>,
    ip: Ipv4Addr,
    check_addr: SocketAddr,
    local: bool,
    mac: Option<[u8; 6]>,
    health: Hysteresis,
    warned_no_mac: bool,
}

/// What start-up changed on the host, to undo on stop.
#[derive(Default)]
struct Undo {
    vips_added_to_lo: Vec<Ipv4Addr>,
    sysctls: Option<ArpSysctls>,
}

/// The health probe, or `None` when there is no backend to check.
fn probe(cfg: &RunConfig) -> Result<Option<Probe>, RunError> {
    if cfg.backends.is_empty() && !cfg.discover {
        return Ok(None);
    }
    if cfg.health.check == HealthCheck::Tcp {
        return Ok(Some(Probe::Tcp));
    }
    let source = if cfg.health.insecure {
        CaSource::Insecure
    } else if let Some(ca) = &cfg.health.ca {
        CaSource::PemFile(ca)
    } else if let Some(kc) = &cfg.kubeconfig {
        kubeconfig::cluster_ca(kc)?
    } else if std::path::Path::new(SERVICE_ACCOUNT_CA).exists() {
        CaSource::PemFile(std::path::Path::new(SERVICE_ACCOUNT_CA))
    } else {
        return Err(TlsError::NoCa.into());
    };
    Ok(Some(Probe::Https { path: cfg.health.path.clone(), tls: health::tls_config(source)? }))
}

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(cfg: RunConfig) -> Result<(), RunError> {
    let span = info_span!("run", interface = %cfg.interface);
    async move {
        // Nothing below touches the host until the data plane is opened.
        let mut sigterm = signal(SignalKind::terminate())
            .map_err(|source| RunError::Signal { signal: "SIGTERM", source })?;
        let mut sigint = signal(SignalKind::interrupt())
            .map_err(|source| RunError::Signal { signal: "SIGINT", source })?;
        let dev = netdev::lookup(&cfg.interface)?;
        let probe = probe(&cfg)?;
        let listener = metrics::bind(cfg.metrics_addr)
            .await
            .map_err(|source| RunError::Metrics { addr: cfg.metrics_addr, source })?;
        let nl = Netlink::connect()?;
        let mut links = crate::netlink::watch_link(cfg.interface.clone())?;
        let kube = if cfg.election == Election::Kubernetes || cfg.discover {
            Some(apiclient::client(cfg.kubeconfig.as_deref(), cfg.apiserver.as_deref(), cfg.lease.renew_deadline).await?)
        } else {
            None
        };

        let (mut dp, adopted) = Dataplane::open_pinned(&cfg.pin_path)?;
        let mut undo = Undo::default();
        let started = start(&cfg, &dev, &nl, &mut dp, adopted, &mut undo).await;
        let (mut balancer, mut backends) = match started {
            Ok(s) => s,
            Err(e) => {
                error!(error = %e, "start-up failed; undoing");
                // A data plane adopted from a previous agent keeps forwarding: a failed
                // restart must not take it down. A fresh one is removed whole.
                stop(dp, &nl, &cfg, undo, adopted).await;
                return Err(e);
            }
        };

        let pinned_maps = match Maps::from_pins(&cfg.pin_path) {
            Ok(m) => m,
            Err(e) => {
                error!(error = %e, "opening the pinned maps for metrics failed; undoing");
                stop(dp, &nl, &cfg, undo, adopted).await;
                return Err(e.into());
            }
        };
        let (registry, agent_metrics) = metrics::registry(pinned_maps);
        let metrics_task = tokio::spawn(metrics::serve(listener, Arc::new(registry)));
        info!(addr = %cfg.metrics_addr, "metrics served");

        let (tx, mut reports) = mpsc::channel(64);
        let mut checkers = Vec::new();
        let mut check_ctx = probe.clone().map(|probe| CheckContext::new(probe, &dev, &nl, &cfg));
        if let Some(ctx) = &check_ctx {
            for b in backends.iter_mut() {
                spawn_checker(b, ctx, &cfg, &tx);
            }
        }
        // Keys 0..len are the configured backends; key len is the leadership gate's own
        // check (see Gate::new); discovered backends take keys from len + 1 on.
        let mut next_key = backends.len() + 1;
        let mut discovered = match (&kube, cfg.discover) {
            (Some(client), true) => Some(crate::discovery::watch(client.clone())),
            _ => None,
        };

        // Leadership. With --election none this node leads from the start; with a Lease,
        // it leads once elected, gated on its own apiserver being ready.
        let (gate_tx, gate_rx) = watch::channel(probe.is_none());
        let mut gate = Gate::new(&cfg, &dev, &backends, probe.clone(), tx.clone(), &mut checkers);
        let (stop_tx, stop_rx) = watch::channel(false);
        let (lead_tx, mut leadership) = mpsc::channel(16);
        let election_task = kube.filter(|_| cfg.election == Election::Kubernetes).map(|client| {
            let cfg_e = ElectionConfig {
                lease_name: cfg.lease.name.clone(),
                lease_namespace: cfg.lease.namespace.clone(),
                identity: node_name(&cfg),
                lease_duration: cfg.lease.duration,
                renew_deadline: cfg.lease.renew_deadline,
                retry_period: cfg.lease.retry_period,
            };
            info!(lease = %cfg_e.lease_name, namespace = %cfg_e.lease_namespace, identity = %cfg_e.identity, "joining the election");
            let leases = KubeLeases::new(client, &cfg_e.lease_namespace, &cfg_e.lease_name);
            tokio::spawn(election::run(Elector::new(leases, cfg_e), gate_rx, stop_rx, lead_tx))
        });
        let mut leading = cfg.election == Election::None;
        let mut announcer =
            leading.then(|| tokio::spawn(arp::announce(dev.ifindex, dev.mac.0, cfg.vips.clone())));
        let mut dev = dev;

        let signal_name = loop {
            tokio::select! {
                Some(report) = reports.recv() => {
                    if let Some(ready) = gate.observe(&report) {
                        info!(ready, "local apiserver readiness changed");
                        let _ = gate_tx.send(ready);
                    }
                    if !backends.iter().any(|b| b.key == report.backend) {
                        continue;
                    }
                    let changed = on_report(&cfg, &dev, &mut backends, report, &agent_metrics);
                    if changed {
                        update_table(&cfg, &mut dp, &mut balancer, &backends, &agent_metrics);
                    }
                }
                Some(event) = links.recv() => {
                    match event {
                        LinkEvent::Up { ifindex } => {
                            if ifindex != dev.ifindex {
                                match netdev::lookup(&cfg.interface) {
                                    Ok(new_dev) => {
                                        warn!(old = dev.ifindex, new = ifindex, "interface was recreated; attaching again");
                                        if let Err(e) = dp.attach_pinned(&new_dev, cfg.xdp_mode) {
                                            error!(error = %e, "re-attaching failed");
                                        }
                                        // Its MAC (ARP replies) and index (probes) may be new.
                                        let ip = new_dev.ipv4.map(|a| a.octets()).unwrap_or_default();
                                        if let Err(e) = dp.maps_mut().set_config(&Config::new(new_dev.mac.0, ip)) {
                                            error!(error = %e, "updating the interface in the data plane failed");
                                        }
                                        if let Some(ctx) = check_ctx.as_mut() {
                                            ctx.dsr = CheckContext::new(ctx.probe.clone(), &new_dev, &nl, &cfg).dsr;
                                            for b in backends.iter_mut() {
                                                if let Some(c) = b.checker.take() {
                                                    c.abort();
                                                }
                                                spawn_checker(b, ctx, &cfg, &tx);
                                            }
                                        }
                                        dev = new_dev;
                                    }
                                    Err(e) => error!(error = %e, "interface came back but cannot be resolved"),
                                }
                            }
                            // Only the leader may claim the VIP; a follower stays quiet.
                            if leading {
                                info!("link up: announcing the VIPs again");
                                restart_announcer(&mut announcer, &dev, &cfg);
                            }
                        }
                        LinkEvent::Down => warn!("link down"),
                        LinkEvent::Gone => warn!("interface deleted; waiting for it to come back"),
                    }
                }
                Some(found) = async { discovered.as_mut()?.recv().await } => {
                    let changed = merge_discovered(&cfg, &nl, &mut backends, &found, &mut next_key, check_ctx.as_ref(), &tx).await;
                    if changed {
                        update_table(&cfg, &mut dp, &mut balancer, &backends, &agent_metrics);
                    }
                }
                Some(l) = leadership.recv() => {
                    match l {
                        Leadership::Leading { until } => {
                            let state = VipState::leader_until(crate::clock::kernel_deadline(until));
                            for &vip in &cfg.vips {
                                if let Err(e) = dp.maps_mut().set_vip(vip, state) {
                                    error!(error = %e, %vip, "setting the leader deadline failed");
                                }
                            }
                            if !leading {
                                leading = true;
                                info!(vips = ?cfg.vips, "became leader: answering ARP, announcing");
                                restart_announcer(&mut announcer, &dev, &cfg);
                            }
                        }
                        Leadership::Following => {
                            for &vip in &cfg.vips {
                                if let Err(e) = dp.maps_mut().set_vip(vip, VipState::follower()) {
                                    error!(error = %e, %vip, "clearing leadership failed");
                                }
                            }
                            if leading {
                                leading = false;
                                warn!("no longer leader: stopped answering ARP");
                                if let Some(a) = announcer.take() { a.abort(); }
                            }
                        }
                    }
                }
                _ = sigterm.recv() => break "SIGTERM",
                _ = sigint.recv() => break "SIGINT",
            }
        };
        info!(signal = signal_name, keep_forwarding = cfg.keep_forwarding_on_exit, "stopping");
        if let Some(task) = election_task {
            if cfg.keep_forwarding_on_exit {
                // The next agent on this node has the same identity and renews the Lease
                // as its own; until then the XDP deadline keeps the fence.
                task.abort();
            } else {
                // Hand over: stop answering ARP (so a follower can take over without two
                // answerers), release the Lease, and keep balancing what still reaches
                // this node while clients move to the new leader on its gratuitous ARP:
                // established flows keep their backends. Then stop.
                let drain = cfg.lease.retry_period * 2 + std::time::Duration::from_millis(300);
                let release_budget = cfg.lease.renew_deadline * 2;
                let balance_until = if leading {
                    crate::clock::kernel_deadline(tokio::time::Instant::now() + release_budget + drain)
                } else {
                    0
                };
                for &vip in &cfg.vips {
                    let _ = dp.maps_mut().hand_over_vip(vip, balance_until);
                }
                let _ = stop_tx.send(true);
                let _ = tokio::time::timeout(release_budget, task).await;
                if leading {
                    info!(?drain, "released the VIP; draining before detaching");
                    tokio::time::sleep(drain).await;
                }
            }
        }
        for b in &mut backends {
            if let Some(c) = b.checker.take() {
                c.abort();
            }
        }
        for c in checkers {
            c.abort();
        }
        if let Some(a) = announcer {
            a.abort();
        }
        metrics_task.abort();
        stop(dp, &nl, &cfg, undo, cfg.keep_forwarding_on_exit).await;
        info!("stopped cleanly");
        Ok(())
    }
    .instrument(span)
    .await
}

/// Fills the maps, sets up the host and attaches. Records what it changed in `undo`.
async fn start(
    cfg: &RunConfig,
    dev: &Netdev,
    nl: &Netlink,
    dp: &mut Dataplane,
    adopted: bool,
    undo: &mut Undo,
) -> Result<(Balancer, Vec<BackendState>), RunError> {
    let node_ip = dev.ipv4.map(|a| a.octets()).unwrap_or_default();
    dp.maps_mut().set_config(&Config::new(dev.mac.0, node_ip))?;

    // Backends: health from a previous agent's maps when adopting (so a restart does
    // not drop them from the table while the first checks run), unknown otherwise.
    let previous: Vec<(u32, Backend)> = if adopted { dp.maps().backends()? } else { Vec::new() };
    let mut backends = Vec::new();
    for b in &cfg.backends {
        let local = Some(b.ip) == dev.ipv4 || nl.has_address(b.ip).await?;
        let old = previous.iter().find(|(_, e)| e.ip == b.ip.octets()).map(|(_, e)| *e);
        let initial = match old {
            Some(e) if e.flags & Backend::F_UP != 0 => Health::Up,
            _ => Health::Unknown,
        };
        backends.push(BackendState {
            key: backends.len(),
            checker: None,
            ip: b.ip,
            check_addr: SocketAddr::from((b.ip, b.port.unwrap_or(cfg.port))),
            local,
            mac: old.map(|e| e.mac).filter(|m| *m != [0; 6]),
            health: Hysteresis::new(cfg.health.rise, cfg.health.fall, initial),
            warned_no_mac: false,
        });
    }
    let mut balancer = if adopted { Balancer::adopt(dp.maps(), DEFAULT_GRACE)? } else { Balancer::new(DEFAULT_GRACE) };
    apply(cfg, dp, &mut balancer, &backends)?;

    let state = match cfg.election {
        Election::None => VipState::leader_until(VipState::FOREVER),
        // Followers until elected; an adopted leader state keeps its deadline as fence.
        Election::Kubernetes => VipState::follower(),
    };
    for &vip in &cfg.vips {
        dp.maps_mut().set_vip(vip, state)?;
    }

    // Every mode delivers VIP traffic for this node through its own stack, so the VIP
    // goes on lo; the sysctls keep the kernel from ever answering ARP for it.
    undo.sysctls = Some(ArpSysctls::apply(&cfg.interface)?);
    for &vip in &cfg.vips {
        if nl.add_vip_to_lo(vip).await? {
            undo.vips_added_to_lo.push(vip);
        }
    }

    let attached = dp.attach_pinned(dev, cfg.xdp_mode)?;
    match attached {
        Attached::New(mode) => info!(%mode, mac = %dev.mac, vips = ?cfg.vips, election = ?cfg.election, "serving"),
        Attached::Replaced => info!(mac = %dev.mac, vips = ?cfg.vips, "serving (took over from the previous agent)"),
    }
    Ok((balancer, backends))
}

/// Undoes what start-up did; with `keep`, leaves forwarding (and the VIP) as it is.
async fn stop(dp: Dataplane, nl: &Netlink, cfg: &RunConfig, mut undo: Undo, keep: bool) {
    if keep {
        if let Err(e) = dp.shutdown(true) {
            error!(error = %e, "leaving the data plane pinned failed");
        }
        return;
    }
    let mut dp = dp;
    // Stop answering ARP first, then detach: the kernel must not answer in between.
    for &vip in &cfg.vips {
        if let Err(e) = dp.maps_mut().set_vip(vip, VipState::follower()) {
            warn!(error = %e, %vip, "could not stop answering ARP before detaching");
        }
    }
    if let Err(e) = dp.shutdown(false) {
        error!(error = %e, "detaching failed");
    }
    for vip in undo.vips_added_to_lo.drain(..) {
        if let Err(e) = nl.remove_vip_from_lo(vip).await {
            error!(error = %e, %vip, "removing the VIP from lo failed");
        }
    }
    if let Some(mut s) = undo.sysctls.take() {
        if let Err(e) = s.restore() {
            error!(error = %e, "restoring ARP sysctls failed");
        }
    }
}

/// Records a health report; returns whether the table must change.
fn on_report(
    cfg: &RunConfig,
    dev: &Netdev,
    backends: &mut [BackendState],
    report: health::Report,
    m: &metrics::AgentMetrics,
) -> bool {
    let Some(b) = backends.iter_mut().find(|b| b.key == report.backend) else { return false };
    m.observe_check(b.ip, report.latency.as_secs_f64());
    let ok = report.result.is_ok();
    let mut changed = false;
    if let Some(mac) = report.mac {
        if b.mac != Some(mac) {
            b.mac = Some(mac);
            changed = b.health.state() == Health::Up;
        }
    } else if ok && cfg.forward == ForwardMode::Dsr && !b.local && b.mac.is_none() && !b.warned_no_mac {
        warn!(backend = %b.ip, interface = %dev.name, "no neighbour entry: is the backend on this L2? (else use --forward ipip)");
        b.warned_no_mac = true;
    }
    if let Some(new) = b.health.observe(ok) {
        match (&report.result, new) {
            (Err(e), _) => warn!(backend = %b.ip, state = ?new, error = %e, "backend health changed"),
            (Ok(()), _) => info!(backend = %b.ip, state = ?new, "backend health changed"),
        }
        changed = true;
    }
    changed
}

/// Pushes the current backend set into the data plane. Returns whether the table flipped.
fn apply(
    cfg: &RunConfig,
    dp: &mut Dataplane,
    balancer: &mut Balancer,
    backends: &[BackendState],
) -> Result<bool, RunError> {
    let specs: Vec<BackendSpec> = backends
        .iter()
        .map(|b| BackendSpec {
            ip: b.ip,
            mac: b.mac.unwrap_or_default(),
            weight: 1,
            local: b.local,
            healthy: b.health.state() == Health::Up && (b.local || cfg.forward != ForwardMode::Dsr || b.mac.is_some()),
            draining: false,
            reason: vip_common::HealthReason::None,
        })
        .collect();
    // Every other node is a peer: what it balanced is never balanced again here, and
    // only its IPIP is decapsulated.
    let peers: std::collections::BTreeSet<vip_common::PeerKey> = backends
        .iter()
        .filter(|b| !b.local)
        .flat_map(|b| {
            std::iter::once(vip_common::PeerKey::ipv4(b.ip.octets())).chain(b.mac.map(vip_common::PeerKey::mac))
        })
        .collect();
    dp.maps_mut().set_peers(&peers)?;
    let healthy = specs.iter().filter(|b| b.healthy).count();
    let mut flipped = false;
    for &vip in &cfg.vips {
        let spec = ServiceSpec { vip, port: cfg.port, mode: cfg.forward, m: cfg.maglev_size, backends: specs.clone() };
        flipped |= balancer.apply(dp.maps_mut(), &spec)?.flipped;
    }
    if flipped && healthy == 0 && !backends.is_empty() {
        warn!("no healthy backend: VIP traffic goes to this node's own stack (local apiserver, if any)");
    }
    Ok(flipped)
}

/// This node's identity in the election: `--node-name`, else the hostname.
fn node_name(cfg: &RunConfig) -> String {
    cfg.node_name.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_owned()).unwrap_or_default()
    })
}

/// Whether this node's own apiserver is ready: the gate on leadership. It drops on the
/// first failed check (a leader must stop answering at once) and comes back after
/// `rise` successes. It watches the backend that is this node, or, if none is, a
/// dedicated check of the apiserver on 127.0.0.1.
struct Gate {
    index: Option<usize>,
    health: Hysteresis,
}

impl Gate {
    fn new(
        cfg: &RunConfig,
        dev: &Netdev,
        backends: &[BackendState],
        probe: Option<Probe>,
        tx: mpsc::Sender<health::Report>,
        checkers: &mut Vec<tokio::task::JoinHandle<()>>,
    ) -> Self {
        let health = Hysteresis::new(cfg.health.rise, 1, Health::Unknown);
        if cfg.election != Election::Kubernetes {
            return Self { index: None, health };
        }
        let Some(probe) = probe else {
            warn!("no --backend: leadership is not gated on apiserver health");
            return Self { index: None, health };
        };
        if let (Some(b), false) = (backends.iter().find(|b| b.local), cfg.discover) {
            return Self { index: Some(b.key), health };
        }
        // Discovered backends come and go: the gate gets a check of its own, on this
        // node's address (which the apiserver's certificate names), else loopback.
        let index = backends.len();
        let addr = SocketAddr::from((dev.ipv4.unwrap_or(Ipv4Addr::LOCALHOST), cfg.port));
        info!(%addr, "checking this node's apiserver for the leadership gate");
        checkers.push(tokio::spawn(health::run_checker(
            index,
            addr,
            probe,
            cfg.health.interval,
            cfg.health.timeout,
            None,
            tx,
        )));
        Self { index: Some(index), health }
    }

    /// Feeds a report; returns the new readiness if it changed.
    fn observe(&mut self, report: &health::Report) -> Option<bool> {
        if Some(report.backend) != self.index {
            return None;
        }
        self.health.observe(report.result.is_ok()).map(|h| h == Health::Up)
    }
}

fn spawn_checker(b: &mut BackendState, ctx: &CheckContext, cfg: &RunConfig, tx: &mpsc::Sender<health::Report>) {
    // DSR backends on other nodes must also accept VIP traffic (hold the VIP).
    let dsr = (cfg.forward == ForwardMode::Dsr && !b.local).then(|| ctx.dsr.clone()).flatten();
    b.checker = Some(tokio::spawn(health::run_checker(
        b.key,
        b.check_addr,
        ctx.probe.clone(),
        cfg.health.interval,
        cfg.health.timeout,
        dsr,
        tx.clone(),
    )));
}

/// What every backend checker shares.
struct CheckContext {
    probe: Probe,
    /// The VIP-path probe of DSR backends (needs this node's IPv4 address).
    dsr: Option<health::DsrCheck>,
}

impl CheckContext {
    fn new(probe: Probe, dev: &Netdev, nl: &Netlink, cfg: &RunConfig) -> Self {
        let dsr = dev.ipv4.zip(cfg.vips.first()).map(|(src_ip, &vip)| health::DsrCheck {
            netlink: nl.clone(),
            probe: crate::vipprobe::VipProbe { ifindex: dev.ifindex, src_mac: dev.mac.0, src_ip, vip, port: cfg.port },
        });
        Self { probe, dsr }
    }
}

/// Makes the backend list the static `--backend`s plus the discovered apiservers: new
/// ones start unknown with a checker of their own, gone ones lose theirs. Returns
/// whether the list changed.
async fn merge_discovered(
    cfg: &RunConfig,
    nl: &Netlink,
    backends: &mut Vec<BackendState>,
    found: &std::collections::BTreeSet<crate::discovery::Endpoint>,
    next_key: &mut usize,
    ctx: Option<&CheckContext>,
    tx: &mpsc::Sender<health::Report>,
) -> bool {
    let wanted: Vec<(Ipv4Addr, u16)> = cfg
        .backends
        .iter()
        .map(|b| (b.ip, b.port.unwrap_or(cfg.port)))
        .chain(found.iter().map(|e| (e.ip, e.port)))
        .filter(|(ip, _)| !cfg.vips.contains(ip))
        .collect();
    let before = backends.len();
    let mut removed = 0;
    backends.retain_mut(|b| {
        let keep = wanted.iter().any(|(ip, _)| *ip == b.ip);
        if !keep {
            info!(backend = %b.ip, "apiserver no longer registered: removing it");
            if let Some(c) = b.checker.take() {
                c.abort();
            }
            removed += 1;
        }
        keep
    });
    let mut added = 0;
    for (ip, port) in wanted {
        if backends.iter().any(|b| b.ip == ip) {
            continue;
        }
        let local = nl.has_address(ip).await.unwrap_or(false);
        let mut b = BackendState {
            key: *next_key,
            checker: None,
            ip,
            check_addr: SocketAddr::from((ip, port)),
            local,
            mac: None,
            health: Hysteresis::new(cfg.health.rise, cfg.health.fall, Health::Unknown),
            warned_no_mac: false,
        };
        *next_key += 1;
        if let Some(c) = ctx {
            spawn_checker(&mut b, c, cfg, tx);
        }
        info!(backend = %ip, local, "apiserver discovered");
        backends.push(b);
        added += 1;
    }
    debug_assert!(backends.len() + removed == before + added);
    added > 0 || removed > 0
}

/// Pushes the backend set into the data plane, counting rebuilds; errors are logged (the
/// previous table stays live).
fn update_table(
    cfg: &RunConfig,
    dp: &mut Dataplane,
    balancer: &mut Balancer,
    backends: &[BackendState],
    m: &metrics::AgentMetrics,
) {
    match apply(cfg, dp, balancer, backends) {
        Ok(true) => {
            m.table_rebuilds.inc();
        }
        Ok(false) => {}
        Err(e) => error!(error = %e, "updating the data plane failed"),
    }
}

/// (Re)starts the gratuitous ARP burst and repeats for every VIP.
fn restart_announcer(announcer: &mut Option<tokio::task::JoinHandle<()>>, dev: &Netdev, cfg: &RunConfig) {
    if let Some(a) = announcer.take() {
        a.abort();
    }
    *announcer = Some(tokio::spawn(arp::announce(dev.ifindex, dev.mac.0, cfg.vips.clone())));
}
