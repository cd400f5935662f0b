//! From "service S has these backends, these of them healthy" to data plane state, and
//! from one state to the next without a packet ever seeing half a table.
//!
//! Each service owns two Maglev tables (a double buffer) in the table map; its entry in
//! the service map names the live one. An update:
//! 1. marks newly healthy backends up (so the new table may point at them),
//! 2. waits out a grace period since the last flip, so no packet can still be reading
//!    the inactive table (an XDP program run lasts microseconds; [`DEFAULT_GRACE`] is
//!    thousands of times that),
//! 3. writes the new table into the inactive half,
//! 4. flips: one replace of the service entry, atomic for readers (hash map element
//!    replacement is RCU-published),
//! 5. waits out the grace period again, then marks unhealthy backends down (so flows
//!    pinned to them re-hash into the new table, never into a table that still names
//!    them, and no packet that read the old table finds its backend gone) and frees
//!    removed ones.
//!
//! Backend ids are per backend address and shared by every service that uses it. A freed
//! id may be reused; the connection table stores the address beside the id, so a flow
//! never follows a recycled id to another backend.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use tracing::{debug, info};
use vip_common::{Backend, ForwardMode, HealthReason, MaglevSlot, Service, MAX_BACKENDS, MAX_SERVICES, NO_BACKEND};

use crate::{
    dataplane::{MapError, Maps, ServiceId},
    maglev::{self, MaglevError, Weighted},
    netlink::Nexthop,
};

/// Minimum time between a flip and the next write into the half it left.
pub const DEFAULT_GRACE: Duration = Duration::from_millis(10);

/// How long a draining backend holds the Maglev slots it had (see [`MaglevSlot`]). What a
/// holder protects is the connections in flight when the drain began, moving to a node
/// that never pinned them (the VIP changing hands mid-drain): a leaving node serves them
/// until its VIP leaves `lo` (seconds), an apiserver that turned not ready until it shuts
/// down (its shutdown delay, then at most its 60 s request timeout; watches are closed).
/// A backend may drain far longer (a node whose agent left for good drains as long as
/// its apiserver answers) while its slots' connections are gone, and a held slot would
/// only send the pins lost meanwhile to it.
/// An apiserver whose shutdown delay is longer keeps serving past the hold: its
/// connections then move to the new-flow backend, as before holders, if the VIP moves
/// (`--drain-hold` sets a longer one). An agent restart starts the hold again.
pub const DEFAULT_HOLD: Duration = Duration::from_secs(60);

/// One backend of a service as the agent knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendSpec {
    pub ip: Ipv4Addr,
    /// MAC for DSR (the backend's, on the shared segment); unused by IPIP and local.
    pub mac: [u8; 6],
    /// IPIP: the next hop towards the backend, when resolved (else the data plane asks
    /// the FIB per packet).
    pub nexthop: Option<Nexthop>,
    pub weight: u32,
    /// This backend is this node: packets for it go to the local stack.
    pub local: bool,
    /// Takes new flows: the table may name it.
    pub healthy: bool,
    /// Not healthy, but still serving the connections it holds (its apiserver reports
    /// not ready while it drains): flows pinned to it stay. Ignored when `healthy`.
    pub draining: bool,
    /// Why it is not healthy, for `status`.
    pub reason: HealthReason,
}

impl BackendSpec {
    /// A healthy remote backend of weight 1.
    pub fn up(ip: Ipv4Addr, mac: [u8; 6]) -> Self {
        Self {
            ip,
            mac,
            nexthop: None,
            weight: 1,
            local: false,
            healthy: true,
            draining: false,
            reason: HealthReason::None,
        }
    }
}

/// A service: VIP:port (TCP), how to forward, and its backends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceSpec {
    /// The VIP, of either family (an IPv6 service's backends are the same IPv4-known
    /// entries; DSR reaches them by MAC).
    pub vip: IpAddr,
    pub port: u16,
    pub mode: ForwardMode,
    /// Maglev table size (prime).
    pub m: u32,
    pub backends: Vec<BackendSpec>,
}

impl ServiceSpec {
    pub fn key(&self) -> ServiceId {
        ServiceId::tcp(self.vip, self.port)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BalancerError {
    #[error(transparent)]
    Maglev(#[from] MaglevError),
    #[error(transparent)]
    Map(#[from] MapError),
    #[error("no free service slot for {vip}:{port} (at most {max} services)")]
    TooManyServices { vip: IpAddr, port: u16, max: u32 },
    #[error("no free backend id for {ip} (at most {max} backends)")]
    TooManyBackends { ip: Ipv4Addr, max: u32 },
    #[error("backend {ip} is listed twice for {vip}:{port}")]
    DuplicateBackend { ip: Ipv4Addr, vip: IpAddr, port: u16 },
}

/// What an update did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    /// A new table was written and made live.
    pub flipped: bool,
    /// The live table: per slot, the backend id that takes its new flows, or
    /// [`NO_BACKEND`] (the holders of slots are in the written
    /// [`MaglevSlot`]s, not here).
    pub table: Vec<u32>,
    /// Backend id of each backend of the spec, in spec order.
    pub ids: Vec<u32>,
}

struct Installed {
    slot: u16,
    active: u8,
    mode: ForwardMode,
    m: u32,
    last_flip: Option<Instant>,
    /// The table as written: [`MaglevSlot`] values.
    table: Vec<u32>,
    /// The backends that hold slots in it.
    holders: BTreeSet<u32>,
    backends: BTreeSet<Ipv4Addr>,
}

/// One service's part of an update, before anything is written.
struct Plan {
    key: ServiceId,
    slot: u16,
    /// Backend id of each backend of the spec, in spec order.
    ids: Vec<u32>,
    /// [`MaglevSlot`] values.
    table: Vec<u32>,
    /// The table (or mode, or size) changed: write the inactive half and flip.
    flipped: bool,
    /// Backends the previous version of the service had and this one has not.
    removed: Vec<Ipv4Addr>,
    healthy: usize,
}

/// Owns the service, backend and table maps' contents.
pub struct Balancer {
    services: BTreeMap<ServiceId, Installed>,
    ids: BTreeMap<Ipv4Addr, u32>,
    /// The flags last written per backend: a change invalidates the data plane's
    /// per-CPU flow caches.
    flags: BTreeMap<Ipv4Addr, u16>,
    /// When each draining backend started draining: it holds slots for [`DEFAULT_HOLD`]
    /// (or `hold`) from then.
    draining_since: BTreeMap<Ipv4Addr, Instant>,
    /// When each backend that still serves last gave up slots to another (a backend
    /// returning, or joining): it holds them for `hold` from then, as a draining one holds
    /// its own (see [`yielded`]).
    yielded_since: BTreeMap<Ipv4Addr, Instant>,
    /// Whether slots a serving backend gives up are held (see [`Balancer::hold_yielded`]).
    holds_yielded: bool,
    /// Backends that have been up (written so, or adopted so): one of them taking slots
    /// returns; one that never was joins, and takes them from nobody's connections.
    ever_up: BTreeSet<Ipv4Addr>,

    grace: Duration,
    hold: Duration,
}

impl Default for Balancer {
    fn default() -> Self {
        Self::new(DEFAULT_GRACE)
    }
}

impl Balancer {
    pub fn new(grace: Duration) -> Self {
        Self {
            services: BTreeMap::new(),
            ids: BTreeMap::new(),
            flags: BTreeMap::new(),
            draining_since: BTreeMap::new(),
            yielded_since: BTreeMap::new(),
            holds_yielded: true,
            ever_up: BTreeSet::new(),
            grace,
            hold: DEFAULT_HOLD,
        }
    }

    /// The same, with draining backends holding their slots for `hold` instead of
    /// [`DEFAULT_HOLD`].
    pub fn with_hold(self, hold: Duration) -> Self {
        Self { hold, ..self }
    }

    /// Whether the slots a backend that still serves gives up are held for it (on by
    /// default). Off while a node that starts afresh gets its first check results: its
    /// first tables name only the backends checked so far, and the slots they give up as
    /// the others come in never carried a connection from this node; held, they would
    /// send the connections other nodes balanced there to the wrong backend.
    pub fn hold_yielded(&mut self, on: bool) {
        self.holds_yielded = on;
    }

    /// The backends a live table still names as holders though their hold is over
    /// (draining, or having yielded slots): the next [`Balancer::apply_all`] rewrites the
    /// table without them (the agent checks every tick). Empty: nothing to rewrite.
    pub fn expired_holds(&self) -> Vec<Ipv4Addr> {
        self.draining_since
            .iter()
            .chain(&self.yielded_since)
            .filter(|(_, since)| since.elapsed() >= self.hold)
            .filter_map(|(ip, _)| Some((*ip, *self.ids.get(ip)?)))
            .filter(|(_, id)| self.services.values().any(|s| s.holders.contains(id)))
            .map(|(ip, _)| ip)
            .collect()
    }

    /// Rebuilds the bookkeeping from maps a previous agent left pinned: backend ids,
    /// service slots, live halves and tables. The next [`Balancer::apply`] with the same
    /// healthy set then changes nothing (no flip, no new ids), so a restart moves no flow.
    pub fn adopt(maps: &Maps, grace: Duration) -> Result<Self, BalancerError> {
        let mut me = Self::new(grace);
        let mut by_id = BTreeMap::new();
        for (id, b) in maps.backends()? {
            let ip = Ipv4Addr::from(b.ip);
            me.ids.insert(ip, id);
            me.flags.insert(ip, b.flags);
            if b.flags & Backend::F_UP != 0 {
                me.ever_up.insert(ip);
            }
            by_id.insert(id, ip);
        }
        for (key, svc) in maps.services()? {
            let Some(mode) = ForwardMode::from_u8(svc.mode) else { continue };
            let table = maps.read_table(svc.slot, svc.active, svc.m)?;
            // A holder that still serves holds on, its hold started again (as a draining
            // backend's is): the first table then keeps its slots held, and flips nothing.
            for id in holders_of(&table) {
                if let Some(&ip) = by_id.get(&id) {
                    me.yielded_since.insert(ip, Instant::now());
                }
            }
            let backends = table
                .iter()
                .flat_map(|&e| [Some(MaglevSlot(e).id()), MaglevSlot(e).holder()])
                .filter_map(|id| by_id.get(&id?).copied())
                .collect();
            // Treat the adoption as a flip just now: the grace period protects readers
            // of the half the previous agent last left.
            me.services.insert(
                key,
                Installed {
                    slot: svc.slot,
                    active: svc.active,
                    mode,
                    m: svc.m,
                    last_flip: Some(Instant::now()),
                    holders: holders_of(&table),
                    table,
                    backends,
                },
            );
        }
        info!(services = me.services.len(), backends = me.ids.len(), "adopted pinned balancer state");
        Ok(me)
    }

    /// The backend id of `ip`, if it has one.
    pub fn backend_id(&self, ip: Ipv4Addr) -> Option<u32> {
        self.ids.get(&ip).copied()
    }

    /// Installs or updates a service. Idempotent: applying the same spec twice writes the
    /// backends' flags again but neither rebuilds nor flips the table.
    pub fn apply(&mut self, maps: &mut Maps, spec: &ServiceSpec) -> Result<Applied, BalancerError> {
        let mut applied = self.apply_all(maps, std::slice::from_ref(spec))?;
        Ok(applied.remove(0))
    }

    /// Installs or updates several services at once, in the steps of the module docs,
    /// each step for every service before the next: the grace periods are waited out once
    /// for all of them, not once per service (16 services would otherwise wait 16 times
    /// on a backend going down). Returns one [`Applied`] per spec, in order.
    pub fn apply_all(&mut self, maps: &mut Maps, specs: &[ServiceSpec]) -> Result<Vec<Applied>, BalancerError> {
        let mut plans = Vec::with_capacity(specs.len());
        let mut flags_changed = false;
        let at = Instant::now();
        let mut built = Built::default();
        for spec in specs {
            let plan = self.plan(maps, spec, at, &mut built)?;
            // 1. Healthy backends marked up before any table names them.
            for (b, &id) in spec.backends.iter().zip(&plan.ids) {
                if b.healthy {
                    flags_changed |= self.write_backend(maps, id, &entry(b, true))?;
                }
            }
            plans.push(plan);
        }
        // Noted once every service is planned: a backend up for the first time in this
        // update joins every service's table alike (none holds slots for it).
        self.ever_up.extend(specs.iter().flat_map(|s| &s.backends).filter(|b| b.healthy).map(|b| b.ip));
        // 2. Grace: readers that saw a half we are about to write as live are gone.
        let wait = plans
            .iter()
            .filter(|p| p.flipped)
            .filter_map(|p| self.services.get(&p.key).and_then(|s| s.last_flip))
            .map(|last| self.grace.saturating_sub(last.elapsed()))
            .max()
            .unwrap_or_default();
        if !wait.is_zero() {
            std::thread::sleep(wait);
        }
        // 3. Write the inactive halves, 4. flip.
        for (spec, plan) in specs.iter().zip(&plans) {
            if plan.flipped {
                let next_half = self.services.get(&plan.key).map_or(0, |s| s.active ^ 1);
                maps.write_table(plan.slot, next_half, &plan.table)?;
                maps.set_service(
                    plan.key,
                    Service { slot: plan.slot, active: next_half, mode: spec.mode as u8, m: spec.m },
                )?;
                info!(
                    vip = %spec.vip, port = spec.port, slot = plan.slot, half = next_half, m = spec.m,
                    healthy = plan.healthy, backends = spec.backends.len(), "Maglev table flipped"
                );
            }
        }
        // 5. Down and removed backends, now that no live table names them. A packet that
        //    read an old table just before its flip may still be about to look its
        //    backend up: wait out the grace period first (once), so it finds it up.
        let downs = specs
            .iter()
            .zip(&plans)
            .any(|(spec, p)| p.flipped && (spec.backends.iter().any(|b| !b.healthy) || !p.removed.is_empty()));
        if downs {
            std::thread::sleep(self.grace);
        }
        for (spec, plan) in specs.iter().zip(&plans) {
            for (b, &id) in spec.backends.iter().zip(&plan.ids) {
                if !b.healthy {
                    flags_changed |= self.write_backend(maps, id, &entry(b, false))?;
                }
            }
        }
        // A flow cached on some CPU must not go to a backend whose state changed since.
        if flags_changed {
            maps.invalidate_flow_cache()?;
        }
        let mut out = Vec::with_capacity(specs.len());
        for (spec, plan) in specs.iter().zip(plans) {
            let prev = self.services.get(&plan.key);
            let (active, last_flip) = match (prev, plan.flipped) {
                (Some(s), false) => (s.active, s.last_flip),
                (Some(s), true) => (s.active ^ 1, Some(Instant::now())),
                (None, _) => (0, Some(Instant::now())),
            };
            let now: BTreeSet<Ipv4Addr> = spec.backends.iter().map(|b| b.ip).collect();
            self.services.insert(
                plan.key,
                Installed {
                    slot: plan.slot,
                    active,
                    mode: spec.mode,
                    m: spec.m,
                    last_flip,
                    holders: holders_of(&plan.table),
                    table: plan.table.clone(),
                    backends: now,
                },
            );
            for ip in plan.removed {
                self.release_if_unused(maps, ip)?;
            }
            let table = plan.table.iter().map(|&e| MaglevSlot(e).id()).collect();
            out.push(Applied { flipped: plan.flipped, table, ids: plan.ids });
        }
        Ok(out)
    }

    /// Validates `spec`, assigns its slot and backend ids, and builds its table: what
    /// [`Balancer::apply_all`] then writes.
    fn plan(
        &mut self,
        maps: &mut Maps,
        spec: &ServiceSpec,
        now: Instant,
        built: &mut Built,
    ) -> Result<Plan, BalancerError> {
        maglev::validate_size(spec.m)?;
        let key = spec.key();
        let mut seen = BTreeSet::new();
        for b in &spec.backends {
            if !seen.insert(b.ip) {
                return Err(BalancerError::DuplicateBackend { ip: b.ip, vip: spec.vip, port: spec.port });
            }
        }
        let slot = match self.services.get(&key) {
            Some(s) => s.slot,
            None => self.free_slot().ok_or(BalancerError::TooManyServices {
                vip: spec.vip,
                port: spec.port,
                max: MAX_SERVICES,
            })?,
        };
        let ids = spec.backends.iter().map(|b| self.id_for(maps, b.ip)).collect::<Result<Vec<u32>, _>>()?;
        let new_flows = built.table(spec, &ids)?;
        let before = self.services.get(&key).filter(|p| p.m == spec.m).map(|p| p.table.as_slice());
        let returning: BTreeSet<u32> = spec
            .backends
            .iter()
            .zip(&ids)
            .filter(|(b, _)| b.healthy && self.ever_up.contains(&b.ip))
            .map(|(_, &id)| id)
            .collect();
        let gave_up = match before.filter(|_| self.holds_yielded) {
            Some(before) => yielded(before, &new_flows, &returning),
            None => BTreeSet::new(),
        };
        for (b, id) in spec.backends.iter().zip(&ids) {
            if b.healthy && gave_up.contains(id) {
                self.yielded_since.insert(b.ip, now);
            }
        }
        let holding = self.holding(spec, &ids, now);
        let prev = self.services.get(&key);
        let before = prev.filter(|p| p.m == spec.m).map(|p| p.table.as_slice());
        let table = with_holders(new_flows, &holding, &returning, before);
        let healthy = spec.backends.iter().filter(|b| b.healthy).count();
        let flipped = !prev.is_some_and(|s| s.table == table && s.mode == spec.mode && s.m == spec.m);
        let now: BTreeSet<Ipv4Addr> = spec.backends.iter().map(|b| b.ip).collect();
        let removed = prev.map(|s| s.backends.difference(&now).copied().collect()).unwrap_or_default();
        Ok(Plan { key, slot, ids, table, flipped, removed, healthy })
    }

    /// Removes every service not in `keep` (and frees the backends only they used): what
    /// an agent that adopted a previous agent's maps does with services its own
    /// configuration no longer has. Returns the removed keys.
    pub fn retain(&mut self, maps: &mut Maps, keep: &[ServiceId]) -> Result<Vec<ServiceId>, BalancerError> {
        let gone: Vec<ServiceId> = self.services.keys().filter(|k| !keep.contains(k)).copied().collect();
        for key in &gone {
            maps.remove_service(key)?;
            if let Some(svc) = self.services.remove(key) {
                info!(
                    vip = %key.vip(), port = key.port(), slot = svc.slot,
                    "service no longer configured: removed"
                );
                for ip in svc.backends {
                    self.release_if_unused(maps, ip)?;
                }
            }
        }
        // Backends a previous agent left that no remaining service names.
        let orphans: Vec<Ipv4Addr> =
            self.ids.keys().filter(|ip| !self.services.values().any(|s| s.backends.contains(ip))).copied().collect();
        for ip in orphans {
            self.release_if_unused(maps, ip)?;
        }
        Ok(gone)
    }

    /// The ids of `spec`'s backends (`ids`, in spec order) that still hold slots at `now`
    /// (one instant per update, so that every service agrees): draining backends within
    /// their hold (noting when each started draining), and those that still serve within
    /// the hold since they last yielded slots. A backend that is down holds nothing.
    fn holding(&mut self, spec: &ServiceSpec, ids: &[u32], now: Instant) -> Holding {
        let mut holding = Holding::default();
        for (b, &id) in spec.backends.iter().zip(ids) {
            if b.healthy || !b.draining {
                self.draining_since.remove(&b.ip);
            } else if now.saturating_duration_since(*self.draining_since.entry(b.ip).or_insert(now)) < self.hold {
                holding.draining.insert(id);
            }
            match self.yielded_since.get(&b.ip) {
                Some(since) if b.healthy && now.saturating_duration_since(*since) < self.hold => {
                    holding.yielded.insert(id);
                }
                Some(_) => {
                    self.yielded_since.remove(&b.ip);
                }
                None => {}
            }
        }
        holding
    }

    /// Writes a backend entry; returns whether its flags changed.
    fn write_backend(&mut self, maps: &mut Maps, id: u32, b: &Backend) -> Result<bool, BalancerError> {
        maps.set_backend(id, b)?;
        let ip = Ipv4Addr::from(b.ip);
        Ok(self.flags.insert(ip, b.flags) != Some(b.flags))
    }

    fn free_slot(&self) -> Option<u16> {
        let used: BTreeSet<u16> = self.services.values().map(|s| s.slot).collect();
        (0..MAX_SERVICES as u16).find(|s| !used.contains(s))
    }

    fn id_for(&mut self, maps: &mut Maps, ip: Ipv4Addr) -> Result<u32, BalancerError> {
        if let Some(&id) = self.ids.get(&ip) {
            return Ok(id);
        }
        let used: BTreeSet<u32> = self.ids.values().copied().collect();
        let id = (0..MAX_BACKENDS)
            .find(|i| !used.contains(i))
            .ok_or(BalancerError::TooManyBackends { ip, max: MAX_BACKENDS })?;
        maps.reset_backend_stats(id)?;
        self.ids.insert(ip, id);
        debug!(%ip, id, "backend id assigned");
        Ok(id)
    }

    fn release_if_unused(&mut self, maps: &mut Maps, ip: Ipv4Addr) -> Result<(), BalancerError> {
        if self.services.values().any(|s| s.backends.contains(&ip)) {
            return Ok(());
        }
        if let Some(id) = self.ids.remove(&ip) {
            self.flags.remove(&ip);
            self.draining_since.remove(&ip);
            self.yielded_since.remove(&ip);
            maps.set_backend(id, &Backend::default())?;
            maps.invalidate_flow_cache()?;
            debug!(%ip, id, "backend id released");
        }
        Ok(())
    }
}

/// The Maglev tables built during one update ([`Balancer::apply_all`]), by table size and
/// healthy backends (address and weight, in spec order; a backend's id follows from its
/// address): services over the same backends, every VIP of a control plane, share one
/// build. 16 services built one table each, most of the time an update of 1,000
/// backends took.
#[derive(Default)]
struct Built(HashMap<BuildKey, Vec<u32>>);

/// What a Maglev table of ids depends on: its size, and each healthy backend's address and
/// weight.
type BuildKey = (u32, Vec<(Ipv4Addr, u32)>);

impl Built {
    /// [`maglev_table`] of `spec`, built once per size and healthy set.
    fn table(&mut self, spec: &ServiceSpec, ids: &[u32]) -> Result<Vec<u32>, MaglevError> {
        let key = (spec.m, spec.backends.iter().filter(|b| b.healthy).map(|b| (b.ip, b.weight)).collect());
        if let Some(table) = self.0.get(&key) {
            return Ok(table.clone());
        }
        let table = maglev_table(spec, ids)?;
        self.0.insert(key, table.clone());
        Ok(table)
    }
}

/// The Maglev table of `spec` over its healthy backends, by address (the name every node
/// agrees on): a backend id (`ids`, in spec order) or [`NO_BACKEND`] per slot.
fn maglev_table(spec: &ServiceSpec, ids: &[u32]) -> Result<Vec<u32>, MaglevError> {
    let members: Vec<(usize, String)> =
        spec.backends.iter().enumerate().filter(|(_, b)| b.healthy).map(|(i, b)| (i, b.ip.to_string())).collect();
    let weighted: Vec<Weighted<'_>> =
        members.iter().map(|(i, name)| Weighted { name, weight: spec.backends[*i].weight }).collect();
    Ok(maglev::build(&weighted, spec.m)?
        .into_iter()
        .map(|e| if e == maglev::NONE { NO_BACKEND } else { ids[members[e as usize].0] })
        .collect())
}

/// The backends that hold slots in `table` ([`MaglevSlot`] values).
fn holders_of(table: &[u32]) -> BTreeSet<u32> {
    table.iter().filter_map(|&e| MaglevSlot(e).holder()).collect()
}

/// The backends that gave up slots in this change to a backend among `taking` (those that
/// had been up before: returning), still serving or not: those the installed table `prev`
/// named for a slot's new flows where `new_flows` (the same size) names one of `taking`.
/// A returning backend takes slots from backends that still serve the connections opened
/// in them meanwhile; whichever node balanced those has their pins, but a connection that
/// reaches another node later (moved by the router's ECMP when a node joins or leaves in
/// BGP mode, or by a failover) has none there, and the slot's new backend would reset it
/// (a BGP trial saw 3 of 30 such connections broken when a node returned). So a backend
/// that still serves holds the slots it gave up, as a draining one holds its own. A
/// backend up for the first time (joining, or late in a node's start) takes no holders:
/// a CI run saw a lab's connections, opened after every backend was up, reset when slots
/// held since one came up late were moved to another node.
fn yielded(prev: &[u32], new_flows: &[u32], taking: &BTreeSet<u32>) -> BTreeSet<u32> {
    prev.iter()
        .zip(new_flows)
        .map(|(&was, &id)| (MaglevSlot(was).id(), id))
        .filter(|&(was, id)| was != id && was != NO_BACKEND && taking.contains(&id))
        .map(|(was, _)| was)
        .collect()
}

/// The backends that hold slots in an update (see [`Balancer::holding`]).
#[derive(Default)]
struct Holding {
    /// Draining, within their hold.
    draining: BTreeSet<u32>,
    /// Still serving, within the hold since they last gave slots up ([`yielded`]).
    yielded: BTreeSet<u32>,
}

/// The new-flow table `new_flows` as [`MaglevSlot`] values, each slot held by the
/// backend (among `holding`) that had its connections: the one the table before, `prev`
/// (the installed one, of the same size), named there, for its new flows or as its holder, if the new table
/// names another. So a draining backend holds the slots it had when it started
/// draining, and one that still serves the slots it gave up, for as long as it holds,
/// whatever the other backends do meanwhile; a backend that drains without having been
/// in the table (an apiserver starting, not ready yet) holds nothing. Where two qualify,
/// in this order: the slot's new-flow backend that now drains (it took the slot's new
/// flows last), the slot's holder, the slot's new-flow backend that gave it up to one of
/// `returning` (see [`yielded`]). A table of another size holds nothing.
fn with_holders(new_flows: Vec<u32>, holding: &Holding, returning: &BTreeSet<u32>, prev: Option<&[u32]>) -> Vec<u32> {
    let Some(prev) = prev.filter(|_| !holding.draining.is_empty() || !holding.yielded.is_empty()) else {
        return new_flows;
    };
    // Each backend id's part, looked up by index: this runs for every slot of every
    // service (16 × 65,537), where set lookups cost most of an update.
    const DRAINS: u8 = 1;
    const YIELDED: u8 = 2;
    let mut part = vec![0u8; MAX_BACKENDS as usize];
    for &id in &holding.draining {
        if let Some(p) = part.get_mut(id as usize) {
            *p |= DRAINS;
        }
    }
    for &id in &holding.yielded {
        if let Some(p) = part.get_mut(id as usize) {
            *p |= YIELDED;
        }
    }
    let is = |h: u32, what: u8| part.get(h as usize).is_some_and(|p| p & what != 0);
    new_flows
        .into_iter()
        .zip(prev)
        .map(|(id, &was)| {
            let was = MaglevSlot(was);
            let holder = if was.id() != id && is(was.id(), DRAINS) {
                Some(was.id())
            } else if let Some(h) = was.holder().filter(|&h| h != id && is(h, DRAINS | YIELDED)) {
                Some(h)
            } else if was.id() != id && is(was.id(), YIELDED) && returning.contains(&id) {
                Some(was.id())
            } else {
                None
            };
            MaglevSlot::new(id, holder).0
        })
        .collect()
}

fn entry(b: &BackendSpec, up: bool) -> Backend {
    let mut flags = 0;
    if up {
        flags |= Backend::F_UP | Backend::F_SERVING;
    } else if b.draining {
        flags |= Backend::F_SERVING;
    }
    if b.local {
        flags |= Backend::F_LOCAL;
    }
    let reason = if up { HealthReason::None } else { b.reason };
    let (nh_mac, nh_mtu) = b.nexthop.map_or(([0; 6], 0), |n| (n.mac, n.mtu));
    Backend { ip: b.ip.octets(), mac: b.mac, flags, reason: reason as u8, _pad: [0; 3], nh_mac, nh_mtu }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(vip: [u8; 4], backends: &[(u8, bool)]) -> ServiceSpec {
        ServiceSpec {
            vip: Ipv4Addr::from(vip).into(),
            port: 6443,
            mode: ForwardMode::Dsr,
            m: 251,
            backends: backends
                .iter()
                .map(|&(i, healthy)| BackendSpec {
                    healthy,
                    ..BackendSpec::up(Ipv4Addr::new(10, 0, 0, i), [2, 0, 0, 0, 0, i])
                })
                .collect(),
        }
    }

    /// Services over the same healthy backends share one build (the same table as a
    /// build of their own); another healthy set, or another size, gets its own.
    #[test]
    fn services_over_the_same_backends_share_one_table_build() {
        let ids = [1, 2, 3];
        let mut built = Built::default();
        let a = spec([10, 0, 0, 100], &[(11, true), (12, true), (13, true)]);
        let b = spec([10, 0, 0, 101], &[(11, true), (12, true), (13, true)]);
        assert_eq!(built.table(&a, &ids).unwrap(), maglev_table(&a, &ids).unwrap());
        assert_eq!(built.table(&b, &ids).unwrap(), maglev_table(&b, &ids).unwrap());
        assert_eq!(built.0.len(), 1, "one build for both");
        let c = spec([10, 0, 0, 102], &[(11, true), (12, false), (13, true)]);
        assert_eq!(built.table(&c, &ids).unwrap(), maglev_table(&c, &ids).unwrap());
        let d = ServiceSpec { m: 257, ..a.clone() };
        assert_eq!(built.table(&d, &ids).unwrap(), maglev_table(&d, &ids).unwrap());
        assert_eq!(built.0.len(), 3, "another healthy set and another size are built apart");
    }
}
