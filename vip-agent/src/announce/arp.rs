//! ARP mode: one node answers ARP for the VIPs (and Neighbor Solicitations for the IPv6
//! ones). With `--election kubernetes` the Lease elects it ([`crate::election`]); with
//! `--election none` this node holds the VIPs whenever it can carry them. Either way:
//!
//! - the data plane's VIP state is the fence: [`MapFence`] writes it, from the task that
//!   decides leadership, so a step-down is in the kernel before anything else happens;
//! - before claiming a VIP the node probes for it (ARP, RFC 5227 §2.1; DAD, RFC 4862
//!   §5.4) and refuses to lead while another host answers;
//! - when it starts answering, gratuitous ARP (an unsolicited NA for IPv6) moves clients
//!   at once; each announcement re-checks the data plane first;
//! - every node joins the IPv6 VIPs' solicited-node groups on the interface, so that
//!   solicitations reach it at all ([`ndp::SolicitedNodeGroups`]);
//! - while it leads, a foreign host claiming a VIP is counted, logged and answered with
//!   one gratuitous ARP at most every [`DEFEND_INTERVAL`] (RFC 5227 §2.4 (b)).

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv6Addr},
    path::PathBuf,
    time::Duration,
};

use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
    time::Instant,
};
use tracing::{debug, error, info, warn};
use vip_common::VipState;

use super::AnnounceEvent;
use crate::{
    announcement, arp,
    clock::kernel_deadline,
    dataplane::{Dataplane, Maps, VipStates},
    election::{self, ClaimConflict, ElectionConfig, ElectionEvent, Elector, Fence, KubeLeases},
    ndp,
    netdev::{self, MacAddr},
};

/// RFC 5227 §2.4: at most one defence per this interval.
pub const DEFEND_INTERVAL: Duration = Duration::from_secs(10);

/// The fence in the data plane: the VIP state in the pinned maps.
pub struct MapFence {
    maps: Maps,
    interface: String,
    vips: Vec<IpAddr>,
    /// The VIPs' VLAN (0: untagged): part of every state written, and of every probe.
    vlan: u16,
}

impl MapFence {
    pub fn open(
        pin_path: &std::path::Path,
        interface: &str,
        vips: &[IpAddr],
        vlan: u16,
    ) -> Result<Self, crate::dataplane::MapError> {
        Ok(Self { maps: Maps::from_pins(pin_path)?, interface: interface.to_owned(), vips: vips.to_vec(), vlan })
    }

    fn set_probing(&mut self, probing: bool) {
        for &vip in &self.vips {
            if let Err(e) = self.maps.set_probing(vip, probing) {
                error!(error = %e, %vip, probing, "writing the VIP's probing flag failed");
            }
        }
    }

    fn set_all(&mut self, state: VipState) {
        let state = state.on_segment(self.vlan);
        for &vip in &self.vips {
            if let Err(e) = self.maps.set_vip(vip, state) {
                error!(error = %e, %vip, "writing the VIP state failed");
            }
        }
    }

    /// Answer with no deadline (`--election none`).
    pub fn lead_forever(&mut self) {
        self.set_all(VipState::leader_until(VipState::FOREVER));
    }
}

impl Fence for MapFence {
    fn lead_until(&mut self, until: Instant) {
        self.set_all(VipState::leader_until(kernel_deadline(until)));
    }

    fn step_down(&mut self) {
        for &vip in &self.vips {
            if let Err(e) = self.maps.stop_answering(vip) {
                error!(error = %e, %vip, "could not stop answering ARP");
            }
        }
    }

    async fn claim(&mut self) -> Result<(), ClaimConflict> {
        let (v4, v6) = crate::config::split_vips(&self.vips);
        // Without it our own data plane would drop the probe of a node claiming at the
        // same moment, and both would lead.
        self.set_probing(true);
        // Both families at once: the claim waits one probe time, not two.
        let (i4, i6, vlan) = (self.interface.clone(), self.interface.clone(), self.vlan);
        let arp = tokio::task::spawn_blocking(move || arp::probe(&i4, vlan, &v4, arp::PROBE_WAIT));
        let dad = tokio::task::spawn_blocking(move || ndp::probe(&i6, vlan, &v6, arp::PROBE_WAIT));
        let (arp, dad) = tokio::join!(arp, dad);
        self.set_probing(false);
        // A conflict in either family is the answer; otherwise the first failure.
        let conflict = |r: &Result<std::io::Result<Result<(), arp::ProbeConflict>>, _>| matches!(r, Ok(Ok(Err(_))));
        let probed = if conflict(&dad) && !conflict(&arp) { dad } else { arp };
        match probed {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(arp::ProbeConflict { vip, mac, simultaneous: true }))) => {
                warn!(%vip, mac = %MacAddr(mac), "another host probes for the VIP at the same moment: backing off");
                Err(ClaimConflict { mac, simultaneous: true })
            }
            Ok(Ok(Err(arp::ProbeConflict { vip, mac, simultaneous: false }))) => {
                warn!(%vip, mac = %MacAddr(mac), "probe answered: another host has the VIP");
                Err(ClaimConflict { mac, simultaneous: false })
            }
            // A probe that cannot be sent proves nothing either way; the watch catches a
            // conflict later.
            Ok(Err(e)) => {
                warn!(error = %e, "probe failed; claiming without it");
                Ok(())
            }
            Err(e) => {
                warn!(error = %e, "probe task failed; claiming without it");
                Ok(())
            }
        }
    }
}

/// Holds the VIPs without an election: leads whenever eligible (after a clean probe),
/// steps down when not.
async fn hold(
    mut fence: MapFence,
    mut eligible: watch::Receiver<bool>,
    mut stop: watch::Receiver<bool>,
    tx: mpsc::Sender<AnnounceEvent>,
    mut leading: bool,
) {
    loop {
        if *stop.borrow() {
            return;
        }
        let want = *eligible.borrow();
        if want && !leading {
            match fence.claim().await {
                Ok(()) => {
                    fence.lead_forever();
                    leading = true;
                    info!("leading the VIP (no election)");
                    let _ = tx.send(AnnounceEvent::Election(ElectionEvent::Leading { bootstrap: false })).await;
                }
                Err(ClaimConflict { mac, simultaneous }) => {
                    let event = ElectionEvent::ClaimRefused { mac, simultaneous };
                    let _ = tx.send(AnnounceEvent::Election(event)).await;
                }
            }
        } else if !want && leading {
            fence.step_down();
            leading = false;
            warn!("stepped down: this node can no longer carry the VIP");
            let _ = tx.send(AnnounceEvent::Election(ElectionEvent::Following)).await;
        }
        tokio::select! {
            r = eligible.changed() => if r.is_err() { return },
            r = stop.changed() => if r.is_err() { return },
        }
    }
}

/// Forwards election events into the agent's announce channel.
async fn forward(mut rx: mpsc::Receiver<ElectionEvent>, tx: mpsc::Sender<AnnounceEvent>) {
    while let Some(e) = rx.recv().await {
        if tx.send(AnnounceEvent::Election(e)).await.is_err() {
            return;
        }
    }
}

/// How ARP mode starts.
pub struct ArpStart {
    pub interface: String,
    pub vips: Vec<IpAddr>,
    /// The VIPs' VLAN (0: untagged).
    pub vlan: u16,
    pub pin_path: PathBuf,
    /// The Lease election, or `None` to hold the VIPs without one.
    pub election: Option<(KubeLeases, ElectionConfig)>,
    /// The adopted data plane already answers for the VIPs (a restart of a leader).
    pub initially_leading: bool,
    /// Whether this node can carry the VIPs as start-up knows it: what the leadership
    /// task acts on until the node's first update. (Starting from "no", a restarted
    /// leader stepped down before that update came.)
    pub eligible: bool,
    pub events: mpsc::Sender<AnnounceEvent>,
}

/// ARP mode's state: the leadership task, the gratuitous ARP and the conflict watch.
pub struct ArpAnnounce {
    interface: String,
    vips: Vec<IpAddr>,
    vlan: u16,
    pin_path: PathBuf,
    eligible: watch::Sender<bool>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
    elected: bool,
    leading: bool,
    /// Leading without a Lease (bootstrap): yields to another host's claim.
    bootstrap_hold: bool,
    garp: Option<JoinHandle<()>>,
    watch: Option<JoinHandle<()>>,
    /// The IPv6 VIPs' solicited-node groups, joined on the interface (none without IPv6
    /// VIPs); joined again with the watch when the link comes back.
    groups: Option<ndp::SolicitedNodeGroups>,
    events: mpsc::Sender<AnnounceEvent>,
    last_defence: BTreeMap<IpAddr, Instant>,
}

impl ArpAnnounce {
    pub fn start(s: ArpStart) -> Result<Self, crate::dataplane::MapError> {
        let fence = MapFence::open(&s.pin_path, &s.interface, &s.vips, s.vlan)?;
        let (eligible, eligible_rx) = watch::channel(s.eligible);
        let (stop, stop_rx) = watch::channel(false);
        let elected = s.election.is_some();
        let task = match s.election {
            Some((leases, cfg)) => {
                info!(
                    lease = %cfg.lease_name, namespace = %cfg.lease_namespace, identity = %cfg.identity,
                    instance = %cfg.instance, "joining the election"
                );
                let (tx, rx) = mpsc::channel(16);
                tokio::spawn(forward(rx, s.events.clone()));
                tokio::spawn(election::run(
                    Elector::new(leases, cfg),
                    fence,
                    eligible_rx,
                    stop_rx,
                    tx,
                    s.initially_leading,
                ))
            }
            None => tokio::spawn(hold(fence, eligible_rx, stop_rx, s.events.clone(), s.initially_leading)),
        };
        let mut me = Self {
            interface: s.interface,
            vips: s.vips,
            vlan: s.vlan,
            pin_path: s.pin_path,
            eligible,
            stop,
            task: Some(task),
            elected,
            leading: s.initially_leading,
            bootstrap_hold: false,
            garp: None,
            watch: None,
            groups: None,
            events: s.events,
            last_defence: BTreeMap::new(),
        };
        me.restart_watch();
        Ok(me)
    }

    pub fn leading(&self) -> bool {
        self.leading
    }

    /// Whether this node can carry the VIPs now.
    pub fn set_eligible(&mut self, eligible: bool) {
        self.eligible.send_if_modified(|e| std::mem::replace(e, eligible) != eligible);
    }

    pub fn on_election(&mut self, event: &ElectionEvent) {
        match *event {
            // The Lease now backs a bootstrap hold: nothing changes on the wire.
            ElectionEvent::Leading { bootstrap: false } if self.leading && self.bootstrap_hold => {
                self.bootstrap_hold = false;
            }
            ElectionEvent::Leading { bootstrap } => {
                self.leading = true;
                self.bootstrap_hold = bootstrap;
                self.announce();
            }
            ElectionEvent::Following | ElectionEvent::ClaimRefused { .. } => {
                self.leading = false;
                self.bootstrap_hold = false;
                if let Some(g) = self.garp.take() {
                    g.abort();
                }
            }
            ElectionEvent::DuplicateIdentity { .. }
            | ElectionEvent::Holder { .. }
            | ElectionEvent::LeaseApi { .. }
            | ElectionEvent::LeaderDiffers { .. } => {}
        }
    }

    /// Whether a foreign claim makes this node stop answering (RFC 5227 §2.4 (a)) rather
    /// than defend: it holds the VIP without a Lease (bootstrap), so only its probe
    /// backs the claim, and two nodes that probed at the same moment may both hold it.
    /// Both yield, and their jittered hold-offs let one claim first.
    pub fn yields_to_claims(&self) -> bool {
        self.leading && self.bootstrap_hold
    }

    /// The link is back (possibly as a new interface): only a leader announces again.
    pub fn on_link_up(&mut self) {
        self.restart_watch();
        if self.leading {
            info!("link up: announcing the VIPs again");
            self.announce();
        }
    }

    /// A foreign host claimed `vip`. Returns whether it was a conflict (this node leads)
    /// and whether it was defended. A bootstrap holder does not defend: see
    /// [`ArpAnnounce::yields_to_claims`].
    pub fn on_foreign_claim(&mut self, vip: IpAddr, mac: [u8; 6]) -> (bool, bool) {
        if !self.leading {
            return (false, false);
        }
        if self.bootstrap_hold {
            return (true, false);
        }
        // Its deadline passed (a leader paused, or cut off from the API, that has not yet
        // heard the Lease moved): the data plane answers no more, and the claim is the
        // new leader's, not a conflict. Counted, it raised false conflict alerts at an
        // ordinary failover (found by a new-user trial: a SIGSTOPped leader resumed).
        if !self.leader_check()(vip) {
            debug!(%vip, foreign_mac = %MacAddr(mac), "a claim for a VIP whose lead has lapsed here: the new leader's");
            return (false, false);
        }
        // Logged at warn once per defence, as it is counted every time
        // (`vip_arp_conflicts_total`): a host claiming it every few milliseconds would
        // flood the log.
        let due = self.last_defence.get(&vip).is_none_or(|t| t.elapsed() >= DEFEND_INTERVAL);
        if !due {
            debug!(%vip, foreign_mac = %MacAddr(mac), "another host claims the VIP this node leads (defended lately)");
            return (true, false);
        }
        warn!(%vip, foreign_mac = %MacAddr(mac), every = ?DEFEND_INTERVAL, "another host claims the VIP this node leads: defending it");
        self.last_defence.insert(vip, Instant::now());
        let leads = self.leader_check();
        match announcement::defend(&self.interface, self.vlan, vip, leads) {
            Ok(n) => (true, n > 0),
            Err(error) => {
                warn!(%error, %vip, "defending the VIP failed");
                (true, false)
            }
        }
    }

    /// What every announcement asks first: does the data plane answer for the VIP now?
    fn leader_check(&self) -> impl Fn(IpAddr) -> bool + Send + 'static {
        let states = VipStates::from_pins(&self.pin_path);
        if let Err(e) = &states {
            error!(error = %e, "cannot read the VIP state: not announcing");
        }
        move |vip| states.as_ref().is_ok_and(|s| s.leads(vip))
    }

    fn announce(&mut self) {
        if let Some(g) = self.garp.take() {
            g.abort();
        }
        let leads = self.leader_check();
        let (interface, vips) = (self.interface.clone(), self.vips.clone());
        self.garp = Some(tokio::spawn(announcement::announce(interface, self.vlan, vips, leads)));
    }

    /// (Re)starts the conflict watches (ARP, and ND for IPv6 VIPs) and joins the IPv6
    /// VIPs' solicited-node groups, on the interface as it is now.
    fn restart_watch(&mut self) {
        if let Some(w) = self.watch.take() {
            w.abort();
        }
        let (v4, v6) = crate::config::split_vips(&self.vips);
        self.join_groups(&v6);
        let (tx, mut rx) = mpsc::channel(16);
        let events = self.events.clone();
        let arp = (!v4.is_empty()).then(|| arp::watch_claims(self.interface.clone(), self.vlan, v4, tx.clone()));
        let nd = (!v6.is_empty()).then(|| ndp::watch_claims(self.interface.clone(), self.vlan, v6, tx));
        let arp = match arp.transpose() {
            Ok(w) => w,
            Err(error) => {
                warn!(%error, interface = %self.interface, "cannot watch ARP for conflicting claims");
                None
            }
        };
        let nd = match nd.transpose() {
            Ok(w) => w,
            Err(error) => {
                warn!(%error, interface = %self.interface, "cannot watch Neighbor Discovery for conflicting claims");
                None
            }
        };
        self.watch = Some(tokio::spawn(async move {
            let pump = async move {
                while let Some((vip, mac)) = rx.recv().await {
                    if events.send(AnnounceEvent::ForeignClaim { vip, mac }).await.is_err() {
                        return;
                    }
                }
            };
            let arp = async move {
                if let Some(w) = arp {
                    w.await
                }
            };
            let nd = async move {
                if let Some(w) = nd {
                    w.await
                }
            };
            tokio::join!(arp, nd, pump);
        }));
    }

    /// Joins the groups on the interface as it is now. Memberships already held on the
    /// same interface are kept: leaving and joining again would send an MLD Done, and a
    /// snooping switch may stop forwarding the group to this node until the next query.
    fn join_groups(&mut self, v6: &[Ipv6Addr]) {
        if v6.is_empty() {
            self.groups = None;
            return;
        }
        let ifindex = match netdev::lookup(&self.interface) {
            Ok(dev) => dev.ifindex,
            Err(error) => {
                error!(%error, interface = %self.interface, "cannot join the IPv6 VIPs' solicited-node groups");
                self.groups = None;
                return;
            }
        };
        if self.groups.as_ref().is_some_and(|g| g.ifindex == ifindex) {
            return;
        }
        self.groups = None;
        let joined = ndp::SolicitedNodeGroups::join(ifindex, v6);
        match joined {
            Ok(g) => {
                info!(interface = %self.interface, groups = ?g.groups, "joined the IPv6 VIPs' solicited-node groups");
                self.groups = Some(g);
            }
            Err(error) => error!(
                %error, interface = %self.interface,
                "cannot join the IPv6 VIPs' solicited-node groups: solicitations may not reach this node"
            ),
        }
    }

    /// Stops announcing. With `keep_forwarding` the data plane keeps answering as it is
    /// (the next agent adopts it; a Lease stays held for it). Otherwise, if elected,
    /// hands over: stop answering, release the Lease, and keep balancing what still
    /// arrives for `drain` while clients move to the new leader; without an election,
    /// just stop answering.
    pub async fn stop(mut self, keep_forwarding: bool, dp: &mut Dataplane, release_budget: Duration, drain: Duration) {
        for t in [self.garp.take(), self.watch.take()].into_iter().flatten() {
            t.abort();
        }
        let Some(task) = self.task.take() else { return };
        if keep_forwarding {
            task.abort();
            return;
        }
        let was_leading = self.leading;
        if self.elected && was_leading {
            let balance_until = kernel_deadline(Instant::now() + release_budget + drain);
            for &vip in &self.vips {
                if let Err(e) = dp.maps_mut().hand_over_vip(vip, balance_until) {
                    warn!(error = %e, %vip, "could not hand the VIP over");
                }
            }
        }
        let _ = self.stop.send(true);
        if tokio::time::timeout(release_budget, task).await.is_err() {
            warn!("the election did not stop in time");
        }
        if self.elected && was_leading {
            info!(?drain, "released the VIP; draining before detaching");
            tokio::time::sleep(drain).await;
        }
    }
}

impl Drop for ArpAnnounce {
    fn drop(&mut self) {
        for t in [self.garp.take(), self.watch.take(), self.task.take()].into_iter().flatten() {
            t.abort();
        }
    }
}
