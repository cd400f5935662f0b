//! The node: everything the agent holds for one node, and one named handler per kind of
//! event. The event loop in [`super::run`] only dispatches.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use tokio::{sync::mpsc, task::JoinHandle, time::Instant};
use tracing::{error, info, warn};
use vip_common::{Config, VipState};

use super::{backends::Backends, host::Host, RunError};
use crate::{
    announce::{
        arp::{ArpAnnounce, ArpStart},
        bgp::BgpAnnounce,
        AnnounceEvent, Announcer,
    },
    balancer::{Balancer, ServiceSpec, DEFAULT_GRACE},
    clock::boot_ns,
    config::{Election, Mode, RunConfig},
    dataplane::{Attached, Dataplane, Maps},
    discovery::{self, Endpoint},
    election::{instance_hex, Compared, ElectionConfig, ElectionEvent, KubeLeases},
    health::{Probe, Report},
    live::{self, LiveView, SharedView},
    metrics::{self, AgentMetrics},
    netdev::{self, Netdev},
    netlink::{HostEvent, LinkEvent, Netlink},
};

/// After a foreign host answered the claim probe, how long before probing again.
pub const CONFLICT_HOLDOFF: Duration = Duration::from_secs(5);
/// How long the duplicate-identity gauge stays up after the last sign of a duplicate.
const DUPLICATE_MEMORY: Duration = Duration::from_secs(30);

/// Whether this node can carry the VIPs: every condition, not only its apiserver.
#[derive(Clone, Debug)]
struct Eligibility {
    /// Leadership waits for this node's apiserver.
    gated: bool,
    apiserver_ready: bool,
    /// The interface is up with carrier.
    link_up: bool,
    /// A foreign host answered for a VIP: no claim before then.
    conflict_until: Option<Instant>,
    /// A node that starts afresh (not an adopted leader): until every backend has its
    /// first check result (and, with discovery, the first snapshot is in), or this
    /// deadline passes. With a table of itself alone, a node that carries the VIPs sends
    /// every flow to its own stack, and resets the connections clients keep on the other
    /// backends: in BGP mode those the router moves to it from the other nodes; in ARP
    /// mode every connection the previous leader balanced elsewhere, when a node that
    /// just started finds the Lease free (every agent restarted at once, by a
    /// configuration tool or a power cut).
    settling_until: Option<Instant>,
}

impl Eligibility {
    /// Why this node cannot carry the VIPs now (empty: it can).
    fn obstacles(&self) -> Vec<&'static str> {
        let mut why = Vec::new();
        if self.gated && !self.apiserver_ready {
            why.push("apiserver not ready");
        }
        if !self.link_up {
            why.push("link down");
        }
        if self.conflict_until.is_some_and(|t| Instant::now() < t) {
            why.push("foreign host answers for the VIP");
        }
        if self.settling_until.is_some() {
            why.push("first health checks not in yet");
        }
        why
    }

    fn eligible(&self) -> bool {
        self.obstacles().is_empty()
    }
}

/// The event sources the loop waits on.
pub struct Inputs {
    pub reports: mpsc::Receiver<Report>,
    pub host: mpsc::Receiver<HostEvent>,
    pub discovered: Option<mpsc::Receiver<BTreeSet<Endpoint>>>,
    pub announce: mpsc::Receiver<AnnounceEvent>,
}

/// What start-up needs besides the configuration.
pub struct Start {
    pub dev: Netdev,
    pub nl: Netlink,
    pub dp: Dataplane,
    pub adopted: bool,
    pub host: Host,
    pub probe: Option<Probe>,
    pub hash_seed: u32,
    /// The Lease API's client, and where it came from (to build it again after a 401).
    pub lease_client: Option<(kube::Client, crate::apiclient::ClientSource)>,
    /// The EndpointSlice watch's client, and where it came from (as `lease_client`).
    pub watch_client: Option<(kube::Client, crate::apiclient::ClientSource)>,
    pub metrics_listener: tokio::net::TcpListener,
    pub host_events: mpsc::Receiver<HostEvent>,
}

/// The node's state.
pub struct Node {
    cfg: RunConfig,
    dev: Netdev,
    nl: Netlink,
    dp: Dataplane,
    balancer: Balancer,
    backends: Backends,
    host: Host,
    announce: Announcer,
    eligibility: Eligibility,
    live: SharedView,
    metrics: AgentMetrics,
    metrics_task: JoinHandle<()>,
    /// The last sign of another agent under this node's name, and its instance id.
    duplicate_seen: Option<(Instant, String)>,
    /// The Lease holder and its value, for each [`Compared`] (by position in
    /// [`Compared::ALL`]) while it is not this node's.
    leader_differs: [Option<(String, String)>; Compared::ALL.len()],
    /// The Lease's holder as the election last read it (`None`: none, or no election).
    lease_holder: Option<String>,
    /// This node's own values of each [`Compared`], as written to the Lease when it leads.
    compared: [String; Compared::ALL.len()],
    /// Discovery's first snapshot is in.
    discovered_once: bool,
    /// Whether the Lease API answers this node's election, since when, and its last
    /// error; `None` without an election, or before its first try.
    lease_api: Option<(bool, Instant, Option<String>)>,
    /// How the kernel reports the XDP program attached (`native`, `skb`), read after
    /// each attach; `None` at tcx.
    xdp_mode: Option<&'static str>,
    /// The data plane is attached to the interface as it is now: false from the
    /// interface's deletion until an attach to its successor succeeds.
    attached: bool,
    /// This process's instance id (see [`LiveView::instance`]).
    instance: String,
}

impl Node {
    /// Fills the maps, sets up the host and attaches, then starts checks, discovery and
    /// the announcer. On failure, undoes what it did: a fresh data plane is removed
    /// whole; an adopted one keeps forwarding (a failed restart must not take it down).
    pub async fn start(cfg: RunConfig, s: Start) -> Result<(Self, Inputs), RunError> {
        let Start { dev, nl, mut dp, adopted, mut host, probe, hash_seed, .. } = s;
        let (tx, reports) = mpsc::channel(64);
        let staged = stage(&cfg, &dev, &nl, &mut dp, adopted, &mut host, probe, hash_seed, tx).await;
        let (balancer, backends, instance, predecessor, initially_leading, first_flips) = match staged {
            Ok(x) => x,
            Err(e) => {
                error!(error = %e, "start-up failed; undoing");
                undo(dp, &mut host, &cfg.vips, cfg.vlan, adopted).await;
                return Err(e);
            }
        };
        let pinned = match Maps::from_pins(&cfg.pin_path) {
            Ok(m) => m,
            Err(e) => {
                error!(error = %e, "opening the pinned maps for metrics failed; undoing");
                undo(dp, &mut host, &cfg.vips, cfg.vlan, adopted).await;
                return Err(e.into());
            }
        };
        let live = SharedView::default();
        let (registry, metrics) = metrics::registry(pinned, live.clone());
        metrics.start_at_zero(
            &cfg.vips,
            match cfg.attach {
                crate::dataplane::Hook::Xdp => "xdp_attachment",
                crate::dataplane::Hook::Tcx => "tcx_attachment",
            },
        );
        // The first tables, written before the metrics existed, count as rebuilds too: the
        // counter then agrees with the "Maglev table flipped" lines.
        metrics.table_rebuilds.inc_by(first_flips);
        // The address bound (with port 0, the one the kernel picked).
        let addr = s.metrics_listener.local_addr().unwrap_or(cfg.metrics_addr);
        let metrics_task = tokio::spawn(metrics::serve(s.metrics_listener, Arc::new(registry), live.clone()));
        info!(%addr, "metrics served");

        let mut backends = backends;
        backends.start_checks(&cfg, &dev);
        let discovered =
            s.watch_client.filter(|_| cfg.discover).map(|(client, source)| discovery::watch(client, source));
        let (events, announce_rx) = mpsc::channel(32);
        // What the Lease holder writes and the followers compare, in `Compared::ALL`'s order.
        let compared = [
            {
                let mut vips: Vec<String> = cfg.vips.iter().map(ToString::to_string).collect();
                vips.sort();
                vips.join(",")
            },
            crate::maglev::placement(hash_seed, cfg.maglev_size),
        ];
        let election = s.lease_client.filter(|_| cfg.election == Election::Kubernetes).map(|(client, source)| {
            let e = ElectionConfig {
                lease_name: cfg.lease.name.clone(),
                lease_namespace: cfg.lease.namespace.clone(),
                identity: cfg.node_name.clone().unwrap_or_default(),
                instance: instance.clone(),
                predecessor: predecessor.clone(),
                lease_duration: cfg.lease.duration,
                renew_deadline: cfg.lease.renew_deadline,
                retry_period: cfg.lease.retry_period,
                bootstrap: cfg.bootstrap,
                vips: compared[Compared::Vips.index()].clone(),
                flow_placement: compared[Compared::FlowPlacement.index()].clone(),
            };
            (KubeLeases::new(client, &cfg.lease.namespace, &cfg.lease.name, source), e)
        });
        // An adopted leader's predecessor could carry the VIP until it stopped, moments
        // ago: that readiness stands until this node's first gate check (the gate starts
        // unknown, so its first result is always reported). Taken as not ready, the
        // announcer would step down, release the Lease and claim it again at once: a
        // failover at every restart.
        let eligibility = Eligibility {
            gated: backends.gated(),
            apiserver_ready: initially_leading,
            link_up: netdev::is_up(&cfg.interface),
            conflict_until: None,
            // An adopted leader keeps its predecessor's table and lead: waiting, it would
            // step down and fail over at every restart.
            settling_until: (!initially_leading)
                .then(|| Instant::now() + 2 * (cfg.health.interval + cfg.health.timeout)),
        };
        // An adopted leader's table is the one its clients have been using.
        let mut balancer = balancer;
        balancer.hold_yielded(eligibility.settling_until.is_none());
        let announce = match start_announcer(&cfg, &dev, election, initially_leading, eligibility.eligible(), events) {
            Ok(a) => a,
            Err(e) => {
                error!(error = %e, "starting the announcer failed; undoing");
                metrics_task.abort();
                undo(dp, &mut host, &cfg.vips, cfg.vlan, adopted).await;
                return Err(e);
            }
        };
        if let Some(reader) = announce.peers_reader() {
            live::read_peers_from(&live, reader);
        }
        let mut node = Self {
            cfg,
            dev,
            nl,
            dp,
            balancer,
            backends,
            host,
            announce,
            eligibility,
            live,
            metrics,
            metrics_task,
            duplicate_seen: None,
            leader_differs: Default::default(),
            lease_holder: None,
            compared,
            discovered_once: false,
            lease_api: None,
            xdp_mode: None,
            attached: true,
            instance,
        };
        node.read_xdp_mode().await;
        // Settled at once when nothing is left to check: no backends, or every one
        // carried over from a previous agent's table (no report would end the wait).
        node.check_settled();
        node.push_eligibility();
        let inputs = Inputs { reports, host: s.host_events, discovered, announce: announce_rx };
        Ok((node, inputs))
    }

    /// Reads how the XDP program got attached (a pinned link taken over keeps the mode
    /// its first agent got), for `status` and the metrics.
    async fn read_xdp_mode(&mut self) {
        if self.cfg.attach != crate::dataplane::Hook::Xdp || !self.attached {
            self.xdp_mode = None;
            return;
        }
        match self.nl.xdp_mode(self.dev.ifindex).await {
            Ok(mode) => {
                if mode == Some("skb") && self.cfg.xdp_mode == crate::dataplane::AttachMode::Auto {
                    info!(interface = %self.dev.name, "XDP runs in generic (SKB) mode: the driver has no XDP hook of its own");
                }
                if mode == Some("skb") && self.cfg.forward == vip_common::ForwardMode::Ipip {
                    warn_gro_under_generic_ipip(&self.dev.name);
                }
                self.xdp_mode = mode;
            }
            Err(error) => warn!(interface = %self.dev.name, %error, "cannot read the XDP attach mode"),
        }
    }

    fn push_eligibility(&mut self) {
        self.announce.set_eligible(self.eligibility.eligible());
        self.publish();
    }

    /// Refreshes the live view (`/status`, metrics).
    fn publish(&self) {
        let view = LiveView {
            mode: match self.cfg.mode {
                Mode::Arp => "arp",
                Mode::Bgp => "bgp",
            },
            hook: if self.attached { self.cfg.attach.name() } else { "" },
            xdp_mode: self.xdp_mode,
            vlan_companion: self.attached && self.dp.vlan_companion(),
            eligible: self.eligibility.eligible(),
            not_eligible_because: self.eligibility.obstacles(),
            advertised: self.announce.advertised(),
            // Read by the view itself when it is read (`live::read_peers_from`).
            bgp_peers: Vec::new(),
            instance: self.instance.clone(),
            lease_api: self.lease_api.as_ref().map(|(answering, since, error)| live::LeaseApiView {
                answering: *answering,
                since_s: since.elapsed().as_secs(),
                last_error: error.clone(),
            }),
            // A leader that holds the VIPs on its probe alone, no Lease yet (--bootstrap).
            bootstrap_hold: self.announce.yields_to_claims(),
            duplicate_instance: self.duplicate_seen.as_ref().map(|(_, other)| other.clone()),
            leader_vips_differ: self.leader_differs[Compared::Vips.index()].clone(),
            leader_flow_placement_differs: self.leader_differs[Compared::FlowPlacement.index()].clone(),
            lease_holder: self.lease_holder.clone(),
        };
        live::publish(&self.live, view);
    }

    /// The Lease holder differs from this node in `what` (its value `theirs`), or,
    /// `None`, agrees again: said in the log, the metric and `status`.
    fn on_leader_differs(&mut self, what: Compared, holder: String, theirs: Option<String>) {
        match (&theirs, what) {
            (Some(theirs), Compared::Vips) => warn!(
                %holder, leader_vips = %theirs, our_vips = %self.compared[what.index()],
                "the leader serves other VIPs than this node: a VIP it lacks goes unanswered (one Lease elects the leader of every VIP)"
            ),
            (Some(theirs), Compared::FlowPlacement) => warn!(
                %holder, leader_placement = %theirs, our_placement = %self.compared[what.index()],
                "the leader places flows otherwise than this node (another --flow-hash-seed or --maglev-size): its connections are reset if this node takes over; give every node the same"
            ),
            (None, Compared::Vips) => info!(%holder, "the leader serves this node's VIPs again"),
            (None, Compared::FlowPlacement) => info!(%holder, "the leader places flows as this node again"),
        }
        self.metrics.leader_differs(what, theirs.is_some());
        self.leader_differs[what.index()] = theirs.map(|theirs| (holder, theirs));
        self.publish();
    }

    /// Health checks' results, in the order they came: the table is updated once, after
    /// all of them.
    pub fn on_health_reports(&mut self, reports: Vec<Report>) {
        let mut table_changed = false;
        for report in reports {
            let out = self.backends.on_report(&self.cfg, &self.dev, report, &self.metrics);
            if let Some(ready) = out.readiness {
                info!(ready, "local apiserver readiness changed");
                self.eligibility.apiserver_ready = ready;
                self.push_eligibility();
            }
            table_changed |= out.table_changed;
        }
        if table_changed {
            self.update_table();
        }
        self.check_settled();
    }

    /// Ends a fresh node's wait for the first checks (see [`Eligibility::settling_until`])
    /// once every backend has a result and discovery (if on) has answered; the table was
    /// written with them before this runs.
    fn check_settled(&mut self) {
        if self.eligibility.settling_until.is_none() {
            return;
        }
        if self.backends.all_checked() && (!self.cfg.discover || self.discovered_once) {
            self.eligibility.settling_until = None;
            // Whether it can carry the VIPs now: settled is one condition of several.
            match self.eligibility.obstacles() {
                why if why.is_empty() => info!("every backend checked once: this node can carry the VIPs"),
                why => {
                    info!(cannot = why.join(", "), "every backend checked once; this node cannot carry the VIPs yet")
                }
            }
            self.settle_tables();
            self.push_eligibility();
        }
    }

    /// The interface or the host's addresses changed.
    pub async fn on_host_event(&mut self, event: HostEvent) {
        match event {
            HostEvent::Link(LinkEvent::Up { ifindex }) => {
                if ifindex != self.dev.ifindex {
                    self.on_interface_recreated(ifindex);
                    self.read_xdp_mode().await;
                    self.publish();
                    // The new interface has the kernel's default ARP sysctls: put ours
                    // back now rather than at the next tick.
                    self.repair_host().await;
                }
                info!("link up");
                self.eligibility.link_up = true;
                self.push_eligibility();
                self.announce.on_link_up();
            }
            HostEvent::Link(LinkEvent::Down) => {
                warn!("link down: this node cannot carry the VIP");
                self.eligibility.link_up = false;
                self.push_eligibility();
            }
            HostEvent::Link(LinkEvent::Gone) => {
                warn!("interface deleted; waiting for it to come back");
                self.eligibility.link_up = false;
                self.attached = false;
                self.xdp_mode = None;
                self.push_eligibility();
            }
            HostEvent::LoAddressRemoved(addr) => {
                if let Some(r) = self.host.on_lo_address_removed(addr).await {
                    self.metrics.repaired(r.name());
                }
            }
        }
    }

    fn on_interface_recreated(&mut self, ifindex: u32) {
        let new_dev = match netdev::lookup(&self.cfg.interface) {
            Ok(d) => d,
            Err(e) => {
                error!(error = %e, "interface came back but cannot be resolved");
                return;
            }
        };
        warn!(old = self.dev.ifindex, new = ifindex, "interface was recreated; attaching again");
        match self.dp.attach_pinned(&new_dev, self.cfg.attach, self.cfg.xdp_mode, self.cfg.vlan != 0) {
            Ok(_) => {
                self.attached = true;
                self.metrics.repaired(match self.cfg.attach {
                    crate::dataplane::Hook::Xdp => "xdp_attachment",
                    crate::dataplane::Hook::Tcx => "tcx_attachment",
                })
            }
            Err(e) => {
                // Not attached (status and metrics say so); the next link event retries.
                error!(interface = %new_dev.name, error = %e, "re-attaching failed");
                self.attached = false;
                return;
            }
        }
        // Its MAC (ARP replies, DSR source) and index (probes) may be new.
        let mut config = self.dp.maps().config().unwrap_or_default();
        config.mac = new_dev.mac.0;
        config.ip = new_dev.ipv4.map(|a| a.octets()).unwrap_or_default();
        if let Err(e) = self.dp.maps_mut().set_config(&config) {
            error!(error = %e, "updating the interface in the data plane failed");
        }
        self.backends.relink(&self.cfg, &new_dev, &self.nl);
        self.dev = new_dev;
    }

    /// Discovery's set of registered apiservers changed.
    pub async fn on_discovered(&mut self, found: BTreeSet<Endpoint>) {
        if self.backends.merge_discovered(&self.cfg, &self.nl, &found).await {
            self.update_table();
            self.metrics.forget_backends_except(&self.backends.ips());
        }
        self.discovered_once = true;
        self.check_settled();
    }

    /// The announcer reported.
    pub fn on_announce_event(&mut self, event: AnnounceEvent) {
        match event {
            AnnounceEvent::Election(e) => {
                self.announce.on_election(&e);
                match e {
                    ElectionEvent::Leading { .. } | ElectionEvent::Following => {}
                    ElectionEvent::ClaimRefused { mac, simultaneous } => {
                        for &vip in &self.cfg.vips {
                            self.metrics.arp_conflict(vip);
                        }
                        if simultaneous {
                            // RFC 5227 §2.1.1: both claimants back off a random while and
                            // probe again; the first back wins, the other finds it answering.
                            let wait = Duration::from_millis(u64::from(crate::election::random_bytes::<1>()[0]) * 4);
                            info!(foreign_mac = %netdev::MacAddr(mac), ?wait, "another host claims the VIP at the same moment: probing again after a random wait");
                            self.eligibility.conflict_until = Some(Instant::now() + wait);
                            self.push_eligibility();
                        } else {
                            warn!(
                                foreign_mac = %netdev::MacAddr(mac), holdoff = ?CONFLICT_HOLDOFF,
                                "a foreign host answers for the VIP: not leading while it does"
                            );
                            self.hold_off_after_conflict();
                        }
                    }
                    ElectionEvent::LeaderDiffers { what, holder, theirs } => {
                        self.on_leader_differs(what, holder, theirs)
                    }
                    ElectionEvent::Holder { holder } => {
                        self.lease_holder = holder;
                        self.publish();
                    }
                    ElectionEvent::LeaseApi { answering, error } => {
                        // "Since" counts from the change of state, not of the error.
                        let since = match &self.lease_api {
                            Some((was, since, _)) if *was == answering => *since,
                            _ => Instant::now(),
                        };
                        self.lease_api = Some((answering, since, error));
                        self.publish();
                    }
                    ElectionEvent::DuplicateIdentity { other_instance } => {
                        // Logged when first seen; the repeats only keep the gauge up.
                        if self.duplicate_seen.is_none() {
                            error!(
                                identity = self.cfg.node_name.as_deref().unwrap_or_default(), %other_instance,
                                "duplicate node identity: another agent runs under this node name"
                            );
                        }
                        self.metrics.duplicate_identity(true);
                        let first = self.duplicate_seen.is_none();
                        self.duplicate_seen = Some((Instant::now(), other_instance));
                        if first {
                            self.publish();
                        }
                    }
                }
            }
            AnnounceEvent::ForeignClaim { vip, mac } if self.announce.yields_to_claims() => {
                warn!(
                    %vip, foreign_mac = %netdev::MacAddr(mac), holdoff = ?CONFLICT_HOLDOFF,
                    "another host claims the VIP this node holds without a Lease (bootstrap): yielding"
                );
                self.metrics.arp_conflict(vip);
                self.hold_off_after_conflict();
            }
            AnnounceEvent::ForeignClaim { vip, mac } => {
                let (conflict, defended) = self.announce.on_foreign_claim(vip, mac);
                if conflict {
                    self.metrics.arp_conflict(vip);
                    if defended {
                        info!(%vip, "defended the VIP with a gratuitous ARP");
                    }
                }
            }
        }
    }

    /// Not eligible for [`CONFLICT_HOLDOFF`] plus a jitter of up to 2 s, so that two
    /// nodes that saw each other's probes or claims do not probe in step again
    /// (RFC 5227 §2.1.1).
    fn hold_off_after_conflict(&mut self) {
        let jitter = Duration::from_millis(u64::from(crate::election::random_bytes::<1>()[0]) * 8);
        self.eligibility.conflict_until = Some(Instant::now() + CONFLICT_HOLDOFF + jitter);
        self.push_eligibility();
    }

    /// Puts back whatever host state changed behind the agent, counting each repair.
    async fn repair_host(&mut self) {
        let repaired = self.host.repair().await;
        for r in &repaired {
            self.metrics.repaired(r.name());
        }
        if !repaired.is_empty() {
            if let Err(e) = record_host_saved(&mut self.dp, &self.host) {
                warn!(error = %e, "recording the changed sysctls for the next agent failed");
            }
        }
    }

    /// Every tick: re-check the host, expire conflicts, draining backends' holds on
    /// table slots and the duplicate memory.
    pub async fn on_tick(&mut self) {
        self.repair_host().await;
        if self.eligibility.conflict_until.is_some_and(|t| Instant::now() >= t) {
            self.eligibility.conflict_until = None;
            info!("conflict hold-off over: probing the VIP again");
        }
        if self.eligibility.settling_until.is_some_and(|t| Instant::now() >= t) {
            warn!("not every backend has answered its first check (or discovery has not): carrying the VIPs anyway");
            self.eligibility.settling_until = None;
            self.settle_tables();
        }
        self.push_eligibility();
        let expired = self.balancer.expired_holds();
        if !expired.is_empty() {
            info!(backends = ?expired, "a backend's hold on table slots (draining, or given up) is over: table rebuilt without it");
        }
        let gone = self.backends.expire_deregistered(self.cfg.drain_hold);
        if !gone.is_empty() {
            info!(backends = ?gone, "deregistered apiservers stopped serving or their drain ended: removed");
            self.metrics.forget_backends_except(&self.backends.ips());
        }
        if !expired.is_empty() || !gone.is_empty() {
            self.update_table();
        }
        if self.duplicate_seen.as_ref().is_some_and(|(t, _)| t.elapsed() >= DUPLICATE_MEMORY) {
            info!(after = ?DUPLICATE_MEMORY, "no more sign of another agent under this node name");
            self.duplicate_seen = None;
            self.metrics.duplicate_identity(false);
        }
        self.publish();
    }

    /// Once the first checks are in, slots the backends give up are held for them (see
    /// `Balancer::hold_yielded`).
    ///
    /// Not done: a node that starts afresh holding its own backend's slots for those the
    /// others gave them to while it was away. Whether they did depends on how long it was
    /// away, which it cannot know; nodes started together (or restarted within `--fall`
    /// checks) saw nothing, and holding then sent the connections on its own backend to
    /// another (bgp_lab's leaving test: 9 of 25 reset).
    fn settle_tables(&mut self) {
        self.balancer.hold_yielded(true);
    }

    /// Pushes the backend set into the data plane, counting rebuilds; errors are logged
    /// (the previous table stays live).
    fn update_table(&mut self) {
        match apply(&self.cfg, &mut self.dp, &mut self.balancer, &self.backends) {
            Ok(flips) => self.metrics.table_rebuilds.inc_by(flips),
            Err(e) => {
                error!(error = %e, "updating the data plane failed");
                0
            }
        };
    }

    /// Stops on `signal`: the announcer first (hand-over, unless keeping forwarding),
    /// then checks, then the data plane and the host state.
    pub async fn stop(mut self, signal: &'static str) {
        let keep = self.cfg.keep_forwarding_on_exit;
        info!(signal, keep_forwarding = keep, "stopping");
        let started = tokio::time::Instant::now();
        // Leaving for good: the other nodes balance to this one as a backend until their
        // VIP-path probe to it fails. Refuse those probes now, while the VIP is still on
        // `lo` and clients' flows are still served, and remove it only once every other
        // node has probed since (one check interval and timeout) and updated its table:
        // no new flow is sent here after the VIP is gone. The last part, a report
        // crossing the peer's runtime and a table rebuild, is not bounded by any setting:
        // half an interval, at least 250 ms, covers a loaded node.
        let health = &self.cfg.health;
        let backend_drain = (!keep && self.backends.serves_peers())
            .then(|| health.interval + health.timeout + (health.interval / 2).max(Duration::from_millis(250)));
        if backend_drain.is_some() {
            if let Err(e) = self.dp.maps_mut().set_leaving() {
                warn!(error = %e, "could not refuse the other nodes' probes; they notice at their next check");
            }
        }
        let drain = self.cfg.lease.retry_period * 2 + Duration::from_millis(300);
        let release_budget = self.cfg.lease.renew_deadline * 2;
        self.announce.stop(keep, &mut self.dp, release_budget, drain).await;
        if let Some(wait) = backend_drain.map(|d| d.saturating_sub(started.elapsed())).filter(|w| !w.is_zero()) {
            info!(?wait, "waiting for the other nodes to drain this backend");
            tokio::time::sleep(wait).await;
        }
        self.backends.stop();
        self.metrics_task.abort();
        undo(self.dp, &mut self.host, &self.cfg.vips, self.cfg.vlan, keep).await;
        info!("stopped cleanly");
    }
}

/// Generic (SKB) XDP runs after GRO (and the NIC's LRO), which merge a client's segments
/// into one frame larger than the MTU: by IPIP, which cannot carry it, the program
/// answers "fragmentation needed" for segments that fit, and a large upload stalls (found
/// by a new-user trial; native XDP sees frames as they arrived). Warns if either is on.
fn warn_gro_under_generic_ipip(interface: &str) {
    match crate::netdev::receive_merging(interface) {
        Ok(Some(m)) if m.gro || m.lro => {
            let on = match (m.gro, m.lro) {
                (true, true) => "GRO and LRO",
                (true, false) => "GRO",
                _ => "LRO",
            };
            warn!(
                interface,
                offloads = on,
                "IPIP with XDP in generic (SKB) mode and {on} on: merged frames are larger than the MTU, and large \
                 uploads through the VIP stall (counted ipip_frag_needed); turn GRO off (ethtool -K {interface} gro \
                 off lro off), on the devices below this one too"
            )
        }
        Ok(_) => {}
        Err(error) => warn!(interface, %error, "cannot read whether GRO is on"),
    }
}

/// Start-up up to the attach: config, backends, balancer (reconciled with an adopted
/// data plane), VIP states, host state, attach. Returns the balancer, the backends, this
/// process's instance id, the predecessor's (when adopting) and whether the adopted
/// data plane already answers for every VIP.
/// Writes what this node's agents changed on the host into the pinned configuration
/// ([`Config::host_saved`]), for the next agent after a kept restart.
fn record_host_saved(dp: &mut Dataplane, host: &Host) -> Result<(), crate::dataplane::MapError> {
    let mut config = dp.maps().config()?;
    config.host_saved = host.saved_code();
    dp.maps_mut().set_config(&config)
}

#[allow(clippy::too_many_arguments)]
async fn stage(
    cfg: &RunConfig,
    dev: &Netdev,
    nl: &Netlink,
    dp: &mut Dataplane,
    adopted: bool,
    host: &mut Host,
    probe: Option<Probe>,
    hash_seed: u32,
    tx: mpsc::Sender<Report>,
) -> Result<(Balancer, Backends, String, Option<String>, bool, u64), RunError> {
    // A fresh instance id: 64 random bits from the kernel.
    let id = crate::election::random_bytes::<8>();
    let instance = instance_hex(&id);
    let previous = if adopted { Some(dp.maps().config()?) } else { None };
    let predecessor =
        previous.map(|c| if c.agent_instance == [0; 8] { String::new() } else { instance_hex(&c.agent_instance) });
    let mut config = Config::new(dev.mac.0, dev.ipv4.map(|a| a.octets()).unwrap_or_default()).with_seed(hash_seed);
    // A new generation: flow-cache entries of the previous agent are not trusted.
    config.generation = previous.map_or(1, |c| c.generation.wrapping_add(1).max(1));
    config.agent_instance = id;
    dp.maps_mut().set_config(&config)?;

    // Backends: health from a previous agent's maps when adopting (so a restart does
    // not drop them from the table while the first checks run), unknown otherwise.
    let previous_backends = if adopted { dp.maps().backends()? } else { Vec::new() };
    let backends = Backends::new(cfg, dev, nl, &previous_backends, probe, tx).await?;
    let balancer = if adopted { Balancer::adopt(dp.maps(), DEFAULT_GRACE)? } else { Balancer::new(DEFAULT_GRACE) };
    let mut balancer = balancer.with_hold(cfg.drain_hold);
    // Until the first checks are in (`Eligibility::settling_until`), the tables name only
    // what is checked so far: what they give up as more come in was never served here.
    balancer.hold_yielded(false);
    // A held Maglev slot (a backend draining: see `vip_common::MaglevSlot`) reads as no
    // backend to a program older than holders, still attached until ours replaces it:
    // for those milliseconds, that slot's unpinned packets go to this node's stack. Only
    // while a backend drains during an upgrade; pinned flows are not affected.
    let first_flips = apply(cfg, dp, &mut balancer, &backends)?;
    if adopted && cfg.attach == crate::dataplane::Hook::Tcx {
        // IPIP is XDP's: flows a previous agent pinned under it would be reset at tcx. By
        // DSR they keep their backend, which must then be on this segment (its MAC known:
        // one that is not is down, and its flows re-hash); otherwise (local) they are
        // forgotten, and re-hash. Forgotten under DSR too, each flow whose pin no longer
        // matched the table was reset (a trial saw 8 of 594). Done after the first table,
        // whose services are in this agent's mode: no flow is pinned under IPIP after it.
        let (ipip, dsr) = (vip_common::ForwardMode::Ipip, vip_common::ForwardMode::Dsr);
        if cfg.forward == dsr {
            let moved = dp.maps_mut().convert_conns_mode(ipip, dsr)?;
            if moved > 0 {
                info!(flows = moved, "moving to tcx: flows pinned under IPIP keep their backends, by DSR");
            }
        } else {
            let forgotten = dp.maps_mut().remove_conns_with_mode(ipip)?;
            if forgotten > 0 {
                warn!(flows = forgotten, "moving to tcx: flows pinned under IPIP forgotten (IPIP needs XDP)");
            }
        }
    }
    // Reconcile what a previous agent left that this configuration does not have.
    let keys: Vec<_> = cfg.vips.iter().map(|&vip| crate::dataplane::ServiceId::tcp(vip, cfg.port)).collect();
    balancer.retain(dp.maps_mut(), &keys)?;
    for (vip, _) in dp.maps().vips()? {
        if !cfg.vips.contains(&vip) {
            info!(%vip, "VIP no longer configured: removed from the data plane");
            dp.maps_mut().remove_vip(vip)?;
        }
    }
    // A node starts as a follower; an adopted leader state is kept as the fence of the
    // Lease this agent takes over (or, without an election, as the permanent leader) —
    // unless it is on another VLAN than this configuration's.
    let now = boot_ns();
    let mut initially_leading = cfg.mode == Mode::Arp;
    if adopted {
        // The program still running may be an older agent's (see `defer_fast_path`).
        dp.maps_mut().defer_fast_path();
        // An older agent's pins may have had no IPv6 list (created empty on loading).
        dp.maps_mut().restore_vip_set6()?;
    }
    for &vip in &cfg.vips {
        match cfg.mode {
            Mode::Arp => {
                let leads = adopted && dp.maps().vip(vip)?.is_some_and(|s| s.leads_at(now) && s.segment == cfg.vlan);
                if !leads {
                    dp.maps_mut().set_vip(vip, VipState::follower().on_segment(cfg.vlan))?;
                    initially_leading = false;
                }
            }
            // Reached by routing: nobody answers ARP, every node balances.
            Mode::Bgp => {
                let state = VipState::follower().on_segment(cfg.vlan);
                dp.maps_mut().set_vip_with_balancing(vip, state, VipState::FOREVER)?
            }
        }
    }

    // Every mode delivers VIP traffic for this node through its own stack, so the VIP
    // goes on lo; the sysctls keep the kernel from ever answering ARP for it. What a
    // kept agent on this interface changed is restored by whichever agent stops cleanly.
    if let Some(prev) = previous.filter(|c| c.mac == dev.mac.0) {
        host.inherit(prev.host_saved);
    }
    host.apply().await?;
    record_host_saved(dp, host)?;
    if adopted {
        host.remove_stale_vips().await?;
    }
    // What decides who carries the VIPs: the election (ARP mode), or each node's own
    // health (BGP mode, which has no election).
    let carried_by = match cfg.mode {
        Mode::Arp => format!("election {:?}", cfg.election).to_lowercase(),
        Mode::Bgp => "bgp".to_owned(),
    };
    let version = crate::config::VERSION;
    match dp.attach_pinned(dev, cfg.attach, cfg.xdp_mode, cfg.vlan != 0)? {
        Attached::New(mode) => info!(%mode, mac = %dev.mac, vips = ?cfg.vips, %carried_by, version, "serving"),
        Attached::NewTcx => info!(hook = "tcx", mac = %dev.mac, vips = ?cfg.vips, %carried_by, version, "serving"),
        Attached::Replaced => {
            info!(mac = %dev.mac, vips = ?cfg.vips, version, "serving (took over from the previous agent)")
        }
    }
    if adopted {
        // A frame the replaced program took before the link update may still be in it
        // on another CPU: wait out such a run (microseconds; the balancer's table-flip
        // grace covers it) before setting bits that program would misread.
        tokio::time::sleep(DEFAULT_GRACE).await;
        dp.maps_mut().resume_fast_path()?;
    }
    if cfg.attach == crate::dataplane::Hook::Xdp && cfg.vlan != 0 {
        say_where_vlan_frames_go(cfg, dev, dp.vlan_companion());
    }
    Ok((balancer, backends, instance, predecessor, initially_leading, first_flips))
}

/// With `--vlan` at XDP: whether the NIC strips VLAN tags decides where the VIPs' frames
/// are handled (XDP cannot read a stripped tag), which the operator should know: said
/// once at start.
fn say_where_vlan_frames_go(cfg: &RunConfig, dev: &Netdev, companion: bool) {
    let strips = match netdev::strips_vlan_tags(&dev.name) {
        Ok(Some(strips)) => strips,
        Ok(None) => return,
        Err(error) => return warn!(interface = %dev.name, %error, "cannot read whether the NIC strips VLAN tags"),
    };
    match (strips, companion) {
        (false, _) => {
            info!(interface = %dev.name, vlan = cfg.vlan, "the NIC leaves VLAN tags in the frame: VIP traffic is handled at XDP")
        }
        (true, false) => error!(
            interface = %dev.name,
            vlan = cfg.vlan,
            "the NIC strips VLAN tags and there is no tcx companion: the VIPs are unreachable on the VLAN (ethtool -K IF rxvlan off)"
        ),
        (true, true) if cfg.forward == vip_common::ForwardMode::Ipip => warn!(
            interface = %dev.name,
            vlan = cfg.vlan,
            "the NIC strips VLAN tags: VIP traffic on the VLAN is handled at tcx, which cannot encapsulate, so it goes up this node's stack unbalanced (ethtool -K IF rxvlan off)"
        ),
        (true, true) => info!(
            interface = %dev.name,
            vlan = cfg.vlan,
            "the NIC strips VLAN tags: VIP traffic on the VLAN is handled at tcx, slower than at XDP (ethtool -K IF rxvlan off)"
        ),
    }
}

/// The announcer of the configured mode.
fn start_announcer(
    cfg: &RunConfig,
    dev: &Netdev,
    election: Option<(KubeLeases, ElectionConfig)>,
    initially_leading: bool,
    eligible: bool,
    events: mpsc::Sender<AnnounceEvent>,
) -> Result<Announcer, RunError> {
    match (&cfg.mode, &cfg.bgp) {
        (Mode::Bgp, Some(bgp)) => Ok(Announcer::Bgp(BgpAnnounce::start(bgp, dev.ipv4, &cfg.vips4())?)),
        _ => Ok(Announcer::Arp(ArpAnnounce::start(ArpStart {
            interface: cfg.interface.clone(),
            vips: cfg.vips.clone(),
            vlan: cfg.vlan,
            pin_path: cfg.pin_path.clone(),
            election,
            initially_leading,
            eligible,
            events,
        })?)),
    }
}

/// Undoes start-up; with `keep`, leaves forwarding (and the host state) as it is for
/// the next agent.
async fn undo(dp: Dataplane, host: &mut Host, vips: &[std::net::IpAddr], vlan: u16, keep: bool) {
    if keep {
        if let Err(e) = dp.shutdown(true) {
            error!(error = %e, "leaving the data plane pinned failed");
        }
        return;
    }
    let mut dp = dp;
    // Stop answering ARP first, then take the VIPs off `lo` and detach last: the kernel
    // must not answer ARP in between, nor (VIP still on `lo`, the program gone) answer a
    // peer's VIP-path probe that the program refused until then, which would tell the
    // peer this node serves again, just before it goes (the peer would then never take
    // it down, and its connections here would hang).
    for &vip in vips {
        if let Err(e) = dp.maps_mut().set_vip(vip, VipState::follower().on_segment(vlan)) {
            warn!(error = %e, %vip, "could not stop answering ARP before detaching");
        }
    }
    host.undo().await;
    if let Err(e) = dp.shutdown(false) {
        error!(error = %e, "detaching failed");
    }
}

/// Pushes the current backend set into the data plane: one service per VIP (of either
/// family, over the same backends), and the peers. Returns how many tables flipped.
fn apply(cfg: &RunConfig, dp: &mut Dataplane, balancer: &mut Balancer, backends: &Backends) -> Result<u64, RunError> {
    let specs = backends.specs(cfg);
    let healthy = specs.iter().filter(|b| b.healthy).count();
    dp.maps_mut().set_peers(&backends.peers())?;
    let services: Vec<ServiceSpec> = cfg
        .vips
        .iter()
        .map(|&vip| ServiceSpec { vip, port: cfg.port, mode: cfg.forward, m: cfg.maglev_size, backends: specs.clone() })
        .collect();
    let flips = balancer.apply_all(dp.maps_mut(), &services)?.iter().filter(|a| a.flipped).count() as u64;
    if flips > 0 && healthy == 0 && !backends.is_empty() {
        warn!("no healthy backend: VIP traffic goes to this node's own stack (local apiserver, if any)");
    }
    Ok(flips)
}
