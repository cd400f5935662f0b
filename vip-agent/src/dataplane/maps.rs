//! Typed access to the data plane's maps. This is the only module that touches
//! `aya::maps`: everything else speaks in `vip-common` types and std addresses.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::{
    maps::{Array, HashMap, Map, MapData, PerCpuArray, PerCpuValues},
    util::nr_cpus,
    Ebpf,
};
use vip_common::{
    map_names, Backend, BackendStats, CachedFlow, CachedFlow6, Config, Conn, FlowKey, FlowKey6, IcmpBudget, MaglevRow,
    PeerKey, Reason, Service, ServiceKey, ServiceKey6, Vip6Key, Vip6State, VipKey, VipSet, VipSet6, VipState,
    MAGLEV_ROW, MAGLEV_ROWS_PER_TABLE, NO_BACKEND,
};

#[derive(Debug, thiserror::Error)]
pub enum MapError {
    #[error("the eBPF object has no map named {name:?}")]
    Missing { name: &'static str },
    #[error("map {name:?} has an unexpected type or layout")]
    Type {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error(
        "pinned map {path} has layout (key, value, entries) {found:?} but this agent needs {want:?}: \
         it was left by an incompatible version; stop that agent and remove the pin path"
    )]
    Incompatible { name: &'static str, path: String, found: (u32, u32, u32), want: (u32, u32, u32) },
    #[error("opening pinned map {path}")]
    Pin {
        path: String,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("cannot add VIP {vip}: this node already serves {max} VIPs")]
    VipsFull { vip: IpAddr, max: u32 },
    #[error("counting possible CPUs for a per-CPU map failed")]
    PerCpu {
        #[source]
        source: std::io::Error,
    },
    #[error("{op} on map {name:?} failed")]
    Op {
        name: &'static str,
        op: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
}

/// Every map: name, key size, value size, max entries. A pinned map left by another
/// version of the agent is adopted only if it matches; `layouts_match_the_object` (a
/// kernel test) keeps this table honest against the ELF object.
pub const LAYOUTS: [(&str, u32, u32, u32); 21] = {
    use std::mem::size_of;
    use vip_common::{FLOW_CACHE_SLOTS, MAGLEV_ROWS, MAX_BACKENDS, MAX_CONNS, MAX_PEERS, MAX_SERVICES, MAX_VIPS};
    [
        (map_names::CONFIG, 4, size_of::<Config>() as u32, 1),
        (map_names::VIPS, size_of::<VipKey>() as u32, size_of::<VipState>() as u32, MAX_VIPS),
        (map_names::VIPS6, size_of::<Vip6Key>() as u32, size_of::<Vip6State>() as u32, MAX_VIPS),
        (map_names::VIP_SET, 4, size_of::<VipSet>() as u32, 1),
        (map_names::STATS, 4, 8, Reason::SLOTS),
        (map_names::SERVICES, size_of::<ServiceKey>() as u32, size_of::<Service>() as u32, MAX_SERVICES),
        (map_names::BACKENDS, 4, size_of::<Backend>() as u32, MAX_BACKENDS),
        (map_names::MAGLEV, 4, size_of::<MaglevRow>() as u32, MAGLEV_ROWS),
        (map_names::CONNS, size_of::<FlowKey>() as u32, size_of::<Conn>() as u32, MAX_CONNS),
        (map_names::SERVICES6, size_of::<ServiceKey6>() as u32, size_of::<Service>() as u32, MAX_SERVICES),
        (map_names::CONNS6, size_of::<FlowKey6>() as u32, size_of::<Conn>() as u32, MAX_CONNS),
        // Program arrays are pinned too: the kernel empties one when no file descriptor or
        // pin holds it any more, and a data plane left forwarding by an agent that exited
        // must keep its IPv6 tail call.
        (vip_common::tail_calls::PROGS_XDP, 4, 4, 1),
        (vip_common::tail_calls::PROGS_TCX, 4, 4, 1),
        (vip_common::tail_calls::PROGS_TCX_VLAN, 4, 4, 1),
        (map_names::BACKEND_STATS, 4, size_of::<BackendStats>() as u32, MAX_BACKENDS),
        (map_names::PEERS, size_of::<PeerKey>() as u32, 4, MAX_PEERS),
        (map_names::ICMP_BUDGET, 4, size_of::<IcmpBudget>() as u32, 1),
        (map_names::FLOW_CACHE, 4, size_of::<CachedFlow>() as u32, FLOW_CACHE_SLOTS),
        (map_names::FLOW_CACHE6, 4, size_of::<CachedFlow6>() as u32, FLOW_CACHE_SLOTS),
        (map_names::HANDOFF_NO_META, 4, 4, 1),
        (map_names::VIP_SET6, 4, size_of::<VipSet6>() as u32, 1),
    ]
};

/// Checks a pinned map against [`LAYOUTS`].
pub fn check_pinned_layout(name: &'static str, path: &std::path::Path) -> Result<(), MapError> {
    let Some(&(_, key, value, max)) = LAYOUTS.iter().find(|l| l.0 == name) else {
        return Err(MapError::Missing { name });
    };
    let info = aya::maps::MapInfo::from_pin(path).map_err(op(name, "read pinned map info"))?;
    let found = (info.key_size(), info.value_size(), info.max_entries());
    if found != (key, value, max) {
        return Err(MapError::Incompatible { name, path: path.display().to_string(), found, want: (key, value, max) });
    }
    Ok(())
}

/// A load-balanced service's key, of either family: the key of [`map_names::SERVICES`]
/// or of [`map_names::SERVICES6`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ServiceId {
    V4(ServiceKey),
    V6(ServiceKey6),
}

impl ServiceId {
    /// TCP to `vip`:`port`.
    pub fn tcp(vip: IpAddr, port: u16) -> Self {
        match vip {
            IpAddr::V4(v) => Self::V4(ServiceKey::tcp(v.octets(), port)),
            IpAddr::V6(v) => Self::V6(ServiceKey6::tcp(v.octets(), port)),
        }
    }

    pub fn vip(&self) -> IpAddr {
        match self {
            Self::V4(k) => Ipv4Addr::from(k.vip).into(),
            Self::V6(k) => Ipv6Addr::from(k.vip).into(),
        }
    }

    pub fn port(&self) -> u16 {
        match self {
            Self::V4(k) => u16::from_be_bytes(k.port),
            Self::V6(k) => u16::from_be_bytes(k.port),
        }
    }
}

/// Opens one pinned map after checking its layout.
fn open_pinned(dir: &std::path::Path, name: &'static str) -> Result<Map, MapError> {
    let path = dir.join(name);
    check_pinned_layout(name, &path)?;
    let pin = |source| MapError::Pin { path: path.display().to_string(), source };
    Map::from_map_data(MapData::from_pin(&path).map_err(pin)?).map_err(pin)
}

/// Only the VIP maps of a pinned data plane, read-only: whether this node answers for a
/// VIP right now. What every gratuitous ARP and unsolicited advertisement checks before
/// it is sent.
pub struct VipStates {
    vips: HashMap<MapData, VipKey, VipState>,
    vips6: HashMap<MapData, Vip6Key, Vip6State>,
}

impl VipStates {
    pub fn from_pins(dir: &std::path::Path) -> Result<Self, MapError> {
        let ty = |name| move |source| MapError::Type { name, source };
        Ok(Self {
            vips: HashMap::try_from(open_pinned(dir, map_names::VIPS)?).map_err(ty(map_names::VIPS))?,
            vips6: HashMap::try_from(open_pinned(dir, map_names::VIPS6)?).map_err(ty(map_names::VIPS6))?,
        })
    }

    /// Whether the data plane answers ARP (or Neighbor Solicitations) for `vip` now.
    pub fn leads(&self, vip: IpAddr) -> bool {
        let state = match vip {
            IpAddr::V4(v) => self.vips.get(&VipKey::new(v.octets()), 0),
            IpAddr::V6(v) => self.vips6.get(&Vip6Key::new(v.octets()), 0).map(|v| v.state),
        };
        state.is_ok_and(|s| s.leads_at(crate::clock::boot_ns()))
    }
}

/// The data plane's maps, owned.
pub struct Maps {
    config: Array<MapData, Config>,
    vips: HashMap<MapData, VipKey, VipState>,
    vips6: HashMap<MapData, Vip6Key, Vip6State>,
    vip_set: Array<MapData, VipSet>,
    stats: PerCpuArray<MapData, u64>,
    services: HashMap<MapData, ServiceKey, Service>,
    backends: Array<MapData, Backend>,
    maglev: Array<MapData, MaglevRow>,
    conns: HashMap<MapData, FlowKey, Conn>,
    services6: HashMap<MapData, ServiceKey6, Service>,
    conns6: HashMap<MapData, FlowKey6, Conn>,
    backend_stats: PerCpuArray<MapData, BackendStats>,
    peers: HashMap<MapData, PeerKey, u32>,
    /// `None` for pins an agent older than the VLAN companion left.
    handoff_no_meta: Option<Array<MapData, u32>>,
    /// `None` for pins an agent older than the IPv6 VIP list left (status reads them).
    vip_set6: Option<Array<MapData, VipSet6>>,
    /// While set, no VIP is given a fast-path bit ([`Maps::defer_fast_path`]).
    fast_path_deferred: bool,
}

/// Serialises every write of a VIP's state, process-wide: the node and the election's
/// fence each hold a `Maps`. Each write is several steps (the list's read-modify-write, a
/// hash element, the fast-path bits, often a read of the state first), and two
/// interleaved would lose one's change (a deadline, a bit) or leave a bit over a state it
/// does not fit (the fence writing "leader" between the node's "follower" and its skip
/// bit).
/// Held by every public method that writes one (see [`vip_writes`]).
static VIP_SET_WRITES: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Takes [`VIP_SET_WRITES`]. A writer that panicked left each map element whole (each is
/// written by one syscall): the lock's poison carries nothing to recover.
fn vip_writes() -> std::sync::MutexGuard<'static, ()> {
    VIP_SET_WRITES.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Which fast path a VIP's list entry gives the ARP (or NS) path: the fast-path bits
/// ([`VipSet::FAST_PATH`]) as [`Maps::fast_path`] reads them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FastPath {
    /// No bit: the VIPS (VIPS6) hash decides.
    Lookup,
    /// [`VipSet::ARP_SKIP`]: neither leading nor probing, a request is dropped.
    Drop,
    /// [`VipSet::ARP_ANSWER`]: leading until the slot's deadline, a request is answered.
    Answer,
}

/// The fast-path bits a list entry keeps when the state and deadline of its VIP are
/// rewritten (list first, then the hash): those it has (`entry`, the slot's deadline
/// `old_until`) if `same` VIP and they fit both the hash's state meanwhile (the old one,
/// which they fit already) and `state`, under the new deadline `new_until`. An answer
/// bit fits the old state under the new deadline only if the deadline is unchanged: a
/// renewal clears it until its hash write, rather than answer until a deadline the hash
/// does not yet hold.
fn kept_fast_path(same: bool, entry: u16, old_until: u64, state: &VipState, new_until: u64) -> u16 {
    let bits = entry & VipSet::FAST_PATH;
    let fits =
        bits == VipSet::fast_path_bits(state, new_until) && (bits != VipSet::ARP_ANSWER || old_until == new_until);
    if same && fits {
        bits
    } else {
        0
    }
}

/// The slot of `vip` in a VIP list: `found` (where it is already), else the first free
/// one (all-zero address).
fn slot_for<const N: usize>(found: Option<usize>, addrs: &[[u8; N]], vip: IpAddr) -> Result<usize, MapError> {
    found
        .or_else(|| addrs.iter().position(|a| *a == [0; N]))
        .ok_or(MapError::VipsFull { vip, max: vip_common::MAX_VIPS })
}

fn op(name: &'static str, op: &'static str) -> impl FnOnce(aya::maps::MapError) -> MapError {
    move |source| MapError::Op { name, op, source }
}

fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<Map, MapError> {
    ebpf.take_map(name).ok_or(MapError::Missing { name })
}

impl Maps {
    /// Opens the maps a running (or kept-forwarding) agent pinned under `dir`: what
    /// `vip-agent status` and the metrics endpoint read.
    pub fn from_pins(dir: &std::path::Path) -> Result<Self, MapError> {
        let open = open_pinned;
        let ty = |name| move |source| MapError::Type { name, source };
        Ok(Self {
            config: Array::try_from(open(dir, map_names::CONFIG)?).map_err(ty(map_names::CONFIG))?,
            vips: HashMap::try_from(open(dir, map_names::VIPS)?).map_err(ty(map_names::VIPS))?,
            vips6: HashMap::try_from(open(dir, map_names::VIPS6)?).map_err(ty(map_names::VIPS6))?,
            vip_set: Array::try_from(open(dir, map_names::VIP_SET)?).map_err(ty(map_names::VIP_SET))?,
            stats: PerCpuArray::try_from(open(dir, map_names::STATS)?).map_err(ty(map_names::STATS))?,
            services: HashMap::try_from(open(dir, map_names::SERVICES)?).map_err(ty(map_names::SERVICES))?,
            backends: Array::try_from(open(dir, map_names::BACKENDS)?).map_err(ty(map_names::BACKENDS))?,
            maglev: Array::try_from(open(dir, map_names::MAGLEV)?).map_err(ty(map_names::MAGLEV))?,
            conns: HashMap::try_from(open(dir, map_names::CONNS)?).map_err(ty(map_names::CONNS))?,
            services6: HashMap::try_from(open(dir, map_names::SERVICES6)?).map_err(ty(map_names::SERVICES6))?,
            conns6: HashMap::try_from(open(dir, map_names::CONNS6)?).map_err(ty(map_names::CONNS6))?,
            backend_stats: PerCpuArray::try_from(open(dir, map_names::BACKEND_STATS)?)
                .map_err(ty(map_names::BACKEND_STATS))?,
            peers: HashMap::try_from(open(dir, map_names::PEERS)?).map_err(ty(map_names::PEERS))?,
            handoff_no_meta: open(dir, map_names::HANDOFF_NO_META).ok().and_then(|m| Array::try_from(m).ok()),
            vip_set6: open(dir, map_names::VIP_SET6).ok().and_then(|m| Array::try_from(m).ok()),
            fast_path_deferred: false,
        })
    }

    /// Takes ownership of the maps out of a loaded object.
    pub fn take_from(ebpf: &mut Ebpf) -> Result<Self, MapError> {
        let ty = |name| move |source| MapError::Type { name, source };
        Ok(Self {
            config: Array::try_from(take(ebpf, map_names::CONFIG)?).map_err(ty(map_names::CONFIG))?,
            vips: HashMap::try_from(take(ebpf, map_names::VIPS)?).map_err(ty(map_names::VIPS))?,
            vips6: HashMap::try_from(take(ebpf, map_names::VIPS6)?).map_err(ty(map_names::VIPS6))?,
            vip_set: Array::try_from(take(ebpf, map_names::VIP_SET)?).map_err(ty(map_names::VIP_SET))?,
            stats: PerCpuArray::try_from(take(ebpf, map_names::STATS)?).map_err(ty(map_names::STATS))?,
            services: HashMap::try_from(take(ebpf, map_names::SERVICES)?).map_err(ty(map_names::SERVICES))?,
            backends: Array::try_from(take(ebpf, map_names::BACKENDS)?).map_err(ty(map_names::BACKENDS))?,
            maglev: Array::try_from(take(ebpf, map_names::MAGLEV)?).map_err(ty(map_names::MAGLEV))?,
            conns: HashMap::try_from(take(ebpf, map_names::CONNS)?).map_err(ty(map_names::CONNS))?,
            services6: HashMap::try_from(take(ebpf, map_names::SERVICES6)?).map_err(ty(map_names::SERVICES6))?,
            conns6: HashMap::try_from(take(ebpf, map_names::CONNS6)?).map_err(ty(map_names::CONNS6))?,
            backend_stats: PerCpuArray::try_from(take(ebpf, map_names::BACKEND_STATS)?)
                .map_err(ty(map_names::BACKEND_STATS))?,
            peers: HashMap::try_from(take(ebpf, map_names::PEERS)?).map_err(ty(map_names::PEERS))?,
            handoff_no_meta: Some(
                Array::try_from(take(ebpf, map_names::HANDOFF_NO_META)?).map_err(ty(map_names::HANDOFF_NO_META))?,
            ),
            vip_set6: Some(Array::try_from(take(ebpf, map_names::VIP_SET6)?).map_err(ty(map_names::VIP_SET6))?),
            fast_path_deferred: false,
        })
    }

    /// Whether XDP found the driver cannot carry the mark it leaves its VLAN companion in a
    /// frame's metadata (`VIP_HANDOFF_NO_META` raised): the companion then decides every
    /// frame whose tag the NIC stripped, some of them a second time.
    pub fn handoff_no_meta(&self) -> Result<bool, MapError> {
        match &self.handoff_no_meta {
            Some(flag) => Ok(flag.get(&0, 0).map_err(op(map_names::HANDOFF_NO_META, "get"))? != 0),
            None => Ok(false),
        }
    }

    pub fn set_config(&mut self, config: &Config) -> Result<(), MapError> {
        self.config.set(0, config, 0).map_err(|source| MapError::Op { name: map_names::CONFIG, op: "set", source })
    }

    pub fn config(&self) -> Result<Config, MapError> {
        self.config.get(&0, 0).map_err(|source| MapError::Op { name: map_names::CONFIG, op: "get", source })
    }

    /// Marks this node as leaving ([`Config::F_LEAVING`]): the other nodes' VIP-path
    /// probes are refused from now on, so they drain it.
    pub fn set_leaving(&mut self) -> Result<(), MapError> {
        let mut c = self.config()?;
        c.flags |= Config::F_LEAVING;
        self.set_config(&c)
    }

    /// Invalidates every per-CPU flow-cache entry (bumps [`Config::generation`]): after a
    /// backend's flags changed, or the connection table was cleared.
    pub fn invalidate_flow_cache(&mut self) -> Result<(), MapError> {
        let mut c = self.config()?;
        c.generation = c.generation.wrapping_add(1).max(1);
        self.set_config(&c)
    }

    /// Inserts or replaces the state of `vip`. The kernel swaps the element whole. A new
    /// VIP enters the membership list first, so the data plane never holds state for a
    /// VIP it would not recognise.
    pub fn set_vip(&mut self, vip: impl Into<IpAddr>, state: VipState) -> Result<(), MapError> {
        // The leader balances until its fencing deadline; a follower never.
        let until = if state.flags & VipState::F_LEADER != 0 { state.leader_until_ns } else { 0 };
        self.set_vip_with_balancing(vip, state, until)
    }

    /// Inserts or replaces the state of `vip`, balancing its new flows until
    /// `balance_until_ns` (kernel boot-time clock; [`VipState::FOREVER`]: always)
    /// whatever the ARP role: in BGP mode every node balances and none answers ARP.
    pub fn set_vip_with_balancing(
        &mut self,
        vip: impl Into<IpAddr>,
        state: VipState,
        balance_until_ns: u64,
    ) -> Result<(), MapError> {
        let _writes = vip_writes();
        let addr = vip.into();
        if let IpAddr::V6(v) = addr {
            if self.vip6(v)?.is_none() && self.vips6.keys().count() >= vip_common::MAX_VIPS as usize {
                return Err(MapError::VipsFull { vip: addr, max: vip_common::MAX_VIPS });
            }
        }
        // An answer bit that will not stay goes in a write of its own, under the deadline
        // it was set for: the kernel copies a list element in place, so a reader in the
        // middle of the full write below could see the old bit with the new deadline.
        self.set_fast_path(addr, |entry, until| match entry & VipSet::FAST_PATH {
            VipSet::ARP_ANSWER => kept_fast_path(true, entry, until, &state, balance_until_ns),
            bits => bits,
        })?;
        let vip = match addr {
            IpAddr::V4(vip) => vip,
            IpAddr::V6(vip) => {
                // The list first: the forwarding path never meets a VIP Neighbor Discovery
                // knows and it does not. Its fast-path bits as for IPv4 below.
                self.update_vip_set6(|set| {
                    let slot = slot_for(set.slot(&vip.octets()), &set.addrs, vip.into())?;
                    let same = set.addrs[slot] == vip.octets();
                    let bits =
                        kept_fast_path(same, set.segments[slot], set.balance_until_ns[slot], &state, balance_until_ns);
                    let entry = (vip.octets(), balance_until_ns, state.segment & VipSet::SEGMENT | bits);
                    let changed = (set.addrs[slot], set.balance_until_ns[slot], set.segments[slot]) != entry;
                    (set.addrs[slot], set.balance_until_ns[slot], set.segments[slot]) = entry;
                    Ok(changed)
                })?;
                return self.write_vip6_state(vip, Vip6State { state, balance_until_ns });
            }
        };
        self.update_vip_set(|set| {
            let slot = slot_for(set.slot(vip.octets()), &set.addrs, vip.into())?;
            // The fast-path bits are cleared here, before the state, unless they fit both
            // the state the hash holds now and the new one (`kept_fast_path`); set only
            // after the state (`write_vip_state`). A new VIP starts without them.
            let same = set.addrs[slot] == vip.octets();
            let bits = kept_fast_path(same, set.segments[slot], set.balance_until_ns[slot], &state, balance_until_ns);
            let segment = state.segment & VipSet::SEGMENT | bits;
            let changed = set.addrs[slot] != vip.octets()
                || set.balance_until_ns[slot] != balance_until_ns
                || set.segments[slot] != segment;
            set.addrs[slot] = vip.octets();
            set.balance_until_ns[slot] = balance_until_ns;
            set.segments[slot] = segment;
            Ok(changed)
        })?;
        self.write_vip_state(vip, state)
    }

    /// Writes the state of `vip` in its family's map, and its fast-path bits
    /// ([`VipSet::FAST_PATH`]): cleared before the state unless they fit it, set only
    /// after it, so a bit never drops or answers where the hash would not. Nothing else
    /// (an IPv6 VIP keeps its balancing deadline).
    fn put_vip(&mut self, vip: IpAddr, state: VipState) -> Result<(), MapError> {
        self.set_fast_path(vip, |entry, balance_until_ns| {
            let bits = entry & VipSet::FAST_PATH;
            if bits == VipSet::fast_path_bits(&state, balance_until_ns) {
                bits
            } else {
                0
            }
        })?;
        match vip {
            IpAddr::V4(v) => self.write_vip_state(v, state),
            IpAddr::V6(v) => {
                let balance_until_ns = self.vip6(v)?.map_or(0, |s| s.balance_until_ns);
                self.write_vip6_state(v, Vip6State { state, balance_until_ns })
            }
        }
    }

    fn put_vip6(&mut self, vip: Ipv6Addr, state: Vip6State) -> Result<(), MapError> {
        self.vips6.insert(Vip6Key::new(vip.octets()), state, 0).map_err(op(map_names::VIPS6, "insert"))
    }

    fn vip6(&self, vip: Ipv6Addr) -> Result<Option<Vip6State>, MapError> {
        match self.vips6.get(&Vip6Key::new(vip.octets()), 0) {
            Ok(s) => Ok(Some(s)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(MapError::Op { name: map_names::VIPS6, op: "get", source }),
        }
    }

    /// The state of `vip`, if it is in the map.
    pub fn vip(&self, vip: impl Into<IpAddr>) -> Result<Option<VipState>, MapError> {
        let v = match vip.into() {
            IpAddr::V4(v) => v,
            IpAddr::V6(v) => return Ok(self.vip6(v)?.map(|s| s.state)),
        };
        match self.vips.get(&VipKey::new(v.octets()), 0) {
            Ok(s) => Ok(Some(s)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(MapError::Op { name: map_names::VIPS, op: "get", source }),
        }
    }

    /// Stops answering ARP (or NS) for `vip` at once; new flows keep being balanced until
    /// the balancing deadline already set (at most the renew deadline of the last
    /// renewal), for clients that have not moved yet.
    pub fn stop_answering(&mut self, vip: impl Into<IpAddr>) -> Result<(), MapError> {
        let _writes = vip_writes();
        self.stop_answering_locked(vip.into())
    }

    /// [`Maps::stop_answering`], [`vip_writes`] held.
    fn stop_answering_locked(&mut self, vip: IpAddr) -> Result<(), MapError> {
        let segment = self.vip(vip)?.map_or(0, |s| s.segment);
        self.put_vip(vip, VipState::follower().on_segment(segment))
    }

    /// Sets or clears [`VipState::F_PROBING`] on `vip`, keeping the rest of its state: while
    /// set, a follower passes other hosts' ARP probes (and DAD probes) for it to the
    /// agent's probe. A VIP not in the map is left alone.
    pub fn set_probing(&mut self, vip: impl Into<IpAddr>, probing: bool) -> Result<(), MapError> {
        let _writes = vip_writes();
        let vip = vip.into();
        let Some(mut state) = self.vip(vip)? else { return Ok(()) };
        if probing {
            state.flags |= VipState::F_PROBING;
        } else {
            state.flags &= !VipState::F_PROBING;
        }
        self.put_vip(vip, state)
    }

    /// Hands `vip` over: stop answering ARP for it, but keep balancing the traffic that
    /// still reaches this node until `balance_until_ns` (kernel monotonic clock), while
    /// clients move to the new leader. `vip` must already be set.
    pub fn hand_over_vip(&mut self, vip: impl Into<IpAddr>, balance_until_ns: u64) -> Result<(), MapError> {
        let _writes = vip_writes();
        let vip = vip.into();
        self.stop_answering_locked(vip)?;
        let vip = match vip {
            IpAddr::V4(v) => v,
            IpAddr::V6(v) => {
                let state = self.vip6(v)?.map_or(VipState::follower(), |s| s.state);
                self.update_vip_set6(|set| {
                    let Some(slot) = set.slot(&v.octets()) else { return Ok(false) };
                    set.balance_until_ns[slot] = balance_until_ns;
                    Ok(true)
                })?;
                return self.put_vip6(v, Vip6State { state, balance_until_ns });
            }
        };
        // The state no longer leads: `stop_answering_locked` cleared the slot's answer
        // bit, in a write of its own, before the new deadline is written here.
        self.update_vip_set(|set| {
            let Some(slot) = set.slot(vip.octets()) else { return Ok(false) };
            set.balance_until_ns[slot] = balance_until_ns;
            Ok(true)
        })
    }

    /// Removes `vip` (fast-path bits first, then state, then membership); removing one
    /// that is not there is not an error.
    pub fn remove_vip(&mut self, vip: impl Into<IpAddr>) -> Result<(), MapError> {
        let _writes = vip_writes();
        let vip = vip.into();
        // A leader's bit would answer for the VIP between its state's removal and its
        // slot's.
        self.set_fast_path(vip, |_, _| 0)?;
        let vip = match vip {
            IpAddr::V4(v) => v,
            IpAddr::V6(v) => {
                match self.vips6.remove(&Vip6Key::new(v.octets())) {
                    Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                    Err(source) => return Err(MapError::Op { name: map_names::VIPS6, op: "remove", source }),
                }
                return self.update_vip_set6(|set| {
                    let Some(slot) = set.slot(&v.octets()) else { return Ok(false) };
                    (set.addrs[slot], set.balance_until_ns[slot], set.segments[slot]) = ([0; 16], 0, 0);
                    Ok(true)
                });
            }
        };
        match self.vips.remove(&VipKey::new(vip.octets())) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(source) => return Err(MapError::Op { name: map_names::VIPS, op: "remove", source }),
        }
        self.update_vip_set(|set| {
            let Some(slot) = set.slot(vip.octets()) else { return Ok(false) };
            set.addrs[slot] = [0; 4];
            set.balance_until_ns[slot] = 0;
            set.segments[slot] = 0;
            Ok(true)
        })
    }

    /// Writes the VIPS hash state of `vip`, whose fast-path bits the caller has cleared
    /// unless they fit `state`, then gives it the bits that do.
    fn write_vip_state(&mut self, vip: Ipv4Addr, state: VipState) -> Result<(), MapError> {
        self.vips.insert(VipKey::new(vip.octets()), state, 0).map_err(op(map_names::VIPS, "insert"))?;
        self.set_fast_path_after(vip.into(), state)
    }

    /// [`Maps::write_vip_state`] for an IPv6 VIP.
    fn write_vip6_state(&mut self, vip: Ipv6Addr, state: Vip6State) -> Result<(), MapError> {
        self.put_vip6(vip, state)?;
        self.set_fast_path_after(vip.into(), state.state)
    }

    /// After `state` is written for `vip`: the fast-path bits that fit it
    /// ([`VipSet::fast_path_bits`] with the slot's deadline), unless an adopted program may
    /// still run.
    fn set_fast_path_after(&mut self, vip: IpAddr, state: VipState) -> Result<(), MapError> {
        if self.fast_path_deferred {
            return Ok(());
        }
        self.set_fast_path(vip, |_, balance_until_ns| VipSet::fast_path_bits(&state, balance_until_ns))
    }

    /// Puts every IPv6 VIP of the Neighbor Discovery hash that the IPv6 list lacks into
    /// the list, with the hash's balancing deadline and segment (no fast-path bit). For pins of
    /// an agent older than the list: the loader creates the list empty, and a VIP this
    /// agent adopts as it is (a leader keeps its state) is not written again until the
    /// announcer or the election next writes its state; until then, missing from the
    /// list, it would be neither answered nor forwarded. Leaves listed VIPs alone.
    pub fn restore_vip_set6(&mut self) -> Result<(), MapError> {
        let _writes = vip_writes();
        let mut hash = Vec::new();
        for entry in self.vips6.iter() {
            hash.push(entry.map_err(op(map_names::VIPS6, "iterate"))?);
        }
        for (key, state) in hash {
            let vip = Ipv6Addr::from(key.addr);
            self.update_vip_set6(|set| {
                if set.slot(&key.addr).is_some() {
                    return Ok(false);
                }
                let slot = slot_for(None, &set.addrs, vip.into())?;
                let entry = (key.addr, state.balance_until_ns, state.state.segment & VipSet::SEGMENT);
                (set.addrs[slot], set.balance_until_ns[slot], set.segments[slot]) = entry;
                Ok(true)
            })?;
        }
        Ok(())
    }

    /// Gives no VIP a fast-path bit ([`VipSet::FAST_PATH`], the same bits in
    /// [`VipSet6`]) until [`Maps::resume_fast_path`]: while the program running is an
    /// adopted one, which may be an older agent's that reads a segment entry whole (a bit
    /// would make it see every VIP frame as another segment's).
    pub fn defer_fast_path(&mut self) {
        self.fast_path_deferred = true;
    }

    /// Ends [`Maps::defer_fast_path`] once this agent's program runs: every VIP gets the
    /// bits that fit its state.
    pub fn resume_fast_path(&mut self) -> Result<(), MapError> {
        let _writes = vip_writes();
        self.fast_path_deferred = false;
        for (vip, state) in self.vips()? {
            self.set_fast_path_after(vip, state)?;
        }
        Ok(())
    }

    /// Which fast path `vip`'s list entry gives its ARP (or NS) answers, if it is in its
    /// family's list.
    pub fn fast_path(&self, vip: impl Into<IpAddr>) -> Result<Option<FastPath>, MapError> {
        // As the program reads them: the drop bit first (an agent from before the answer
        // bit, adopting this one's pins, may leave both set).
        let of = |entry: u16| match entry & VipSet::FAST_PATH {
            e if e & VipSet::ARP_SKIP != 0 => FastPath::Drop,
            VipSet::ARP_ANSWER => FastPath::Answer,
            _ => FastPath::Lookup,
        };
        match vip.into() {
            IpAddr::V4(v) => {
                let set = self.vip_set()?;
                Ok(set.slot(v.octets()).map(|i| of(set.segments[i])))
            }
            IpAddr::V6(v) => {
                let Some(map) = self.vip_set6.as_ref() else { return Ok(None) };
                let set = map.get(&0, 0).map_err(op(map_names::VIP_SET6, "get"))?;
                Ok(set.slot(&v.octets()).map(|i| of(set.segments[i])))
            }
        }
    }

    /// Replaces the fast-path bits of `vip`'s list entry with `bits(entry, deadline)` (its
    /// segment entry and the slot's balancing deadline), if it is in its family's list;
    /// written only if they change ([`VipSet6`]'s bits are [`VipSet`]'s).
    fn set_fast_path(&mut self, vip: IpAddr, bits: impl Fn(u16, u64) -> u16) -> Result<(), MapError> {
        // Whether the entry changed.
        let update = |entry: &mut u16, balance_until_ns: u64| {
            let new = *entry & !VipSet::FAST_PATH | bits(*entry, balance_until_ns) & VipSet::FAST_PATH;
            let changed = new != *entry;
            *entry = new;
            changed
        };
        match vip {
            IpAddr::V4(v) => self.update_vip_set(|set| {
                Ok(set.slot(v.octets()).is_some_and(|i| update(&mut set.segments[i], set.balance_until_ns[i])))
            }),
            IpAddr::V6(v) => self.update_vip_set6(|set| {
                Ok(set.slot(&v.octets()).is_some_and(|i| update(&mut set.segments[i], set.balance_until_ns[i])))
            }),
        }
    }

    fn vip_set(&self) -> Result<VipSet, MapError> {
        self.vip_set.get(&0, 0).map_err(op(map_names::VIP_SET, "get"))
    }

    /// [`Maps::update_vip_set`] for the IPv6 list. Pins of an agent older than the list
    /// have none: nothing to keep in step.
    fn update_vip_set6(&mut self, change: impl FnOnce(&mut VipSet6) -> Result<bool, MapError>) -> Result<(), MapError> {
        let Some(map) = self.vip_set6.as_mut() else { return Ok(()) };
        let mut set = map.get(&0, 0).map_err(op(map_names::VIP_SET6, "get"))?;
        if change(&mut set)? {
            map.set(0, set, 0).map_err(op(map_names::VIP_SET6, "set"))?;
        }
        Ok(())
    }

    /// Reads the VIP list, lets `change` edit it (returning whether it changed), and
    /// writes it back if so. The caller holds [`vip_writes`] (a public method writing a
    /// VIP's state), so no other `Maps` interleaves.
    fn update_vip_set(&mut self, change: impl FnOnce(&mut VipSet) -> Result<bool, MapError>) -> Result<(), MapError> {
        let mut set = self.vip_set()?;
        if change(&mut set)? {
            self.vip_set.set(0, set, 0).map_err(op(map_names::VIP_SET, "set"))?;
        }
        Ok(())
    }

    /// Every VIP and its state: IPv4 first, each family sorted by address.
    pub fn vips(&self) -> Result<Vec<(IpAddr, VipState)>, MapError> {
        let mut out = Vec::new();
        for entry in self.vips.iter() {
            let (key, state) = entry.map_err(|source| MapError::Op { name: map_names::VIPS, op: "iterate", source })?;
            out.push((IpAddr::V4(Ipv4Addr::from(key.addr)), state));
        }
        for entry in self.vips6.iter() {
            let (key, state) =
                entry.map_err(|source| MapError::Op { name: map_names::VIPS6, op: "iterate", source })?;
            out.push((IpAddr::V6(Ipv6Addr::from(key.addr)), state.state));
        }
        out.sort_by_key(|(addr, _)| *addr);
        Ok(out)
    }

    /// The counter of `reason`, summed over CPUs.
    pub fn counter(&self, reason: Reason) -> Result<u64, MapError> {
        let per_cpu = self.stats.get(&(reason as u32), 0).map_err(|source| MapError::Op {
            name: map_names::STATS,
            op: "get",
            source,
        })?;
        Ok(per_cpu.iter().sum())
    }

    /// Every reason's counter, summed over CPUs, in [`Reason::ALL`] order.
    pub fn counters(&self) -> Result<Vec<(Reason, u64)>, MapError> {
        Reason::ALL.iter().map(|&r| Ok((r, self.counter(r)?))).collect()
    }

    /// Inserts or replaces a service. Replacing is how tables flip: one element update,
    /// atomic for readers.
    pub fn set_service(&mut self, id: ServiceId, svc: Service) -> Result<(), MapError> {
        match id {
            ServiceId::V4(key) => self.services.insert(key, svc, 0).map_err(op(map_names::SERVICES, "insert")),
            ServiceId::V6(key) => self.services6.insert(key, svc, 0).map_err(op(map_names::SERVICES6, "insert")),
        }
    }

    /// Removes a service; removing one that is not there is not an error.
    pub fn remove_service(&mut self, id: &ServiceId) -> Result<(), MapError> {
        let (name, removed) = match id {
            ServiceId::V4(key) => (map_names::SERVICES, self.services.remove(key)),
            ServiceId::V6(key) => (map_names::SERVICES6, self.services6.remove(key)),
        };
        match removed {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(MapError::Op { name, op: "remove", source }),
        }
    }

    /// Makes the peer map hold exactly `peers` (other load-balancing nodes by MAC and by
    /// address): new ones are inserted before stale ones are removed.
    pub fn set_peers(&mut self, peers: &std::collections::BTreeSet<PeerKey>) -> Result<(), MapError> {
        // Stale keys go first, so that a full map can take a new set.
        let stale: Vec<PeerKey> = self
            .peers
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(op(map_names::PEERS, "iterate"))?
            .into_iter()
            .filter(|k| !peers.contains(k))
            .collect();
        for k in stale {
            match self.peers.remove(&k) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(source) => return Err(MapError::Op { name: map_names::PEERS, op: "remove", source }),
            }
        }
        for p in peers {
            self.peers.insert(p, 1, 0).map_err(op(map_names::PEERS, "insert"))?;
        }
        Ok(())
    }

    /// The peer map's keys.
    pub fn peers(&self) -> Result<Vec<PeerKey>, MapError> {
        self.peers.keys().collect::<Result<_, _>>().map_err(op(map_names::PEERS, "iterate"))
    }

    pub fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<(), MapError> {
        self.backends.set(id, backend, 0).map_err(op(map_names::BACKENDS, "set"))
    }

    pub fn backend(&self, id: u32) -> Result<Backend, MapError> {
        self.backends.get(&id, 0).map_err(op(map_names::BACKENDS, "get"))
    }

    /// Writes `table` (backend ids, or [`NO_BACKEND`]) as table `half` of service slot
    /// `slot`: one 1 KiB row per 256 slots. The caller must make sure no packet can be
    /// reading this half (it is the inactive one, and a grace period has passed since it
    /// was last live).
    pub fn write_table(&mut self, slot: u16, half: u8, table: &[u32]) -> Result<(), MapError> {
        let first = Service::first_row(slot, half);
        for (i, chunk) in table.chunks(MAGLEV_ROW as usize).enumerate() {
            let mut row = MaglevRow { ids: [NO_BACKEND; MAGLEV_ROW as usize] };
            row.ids[..chunk.len()].copy_from_slice(chunk);
            self.maglev.set(first + i as u32, row, 0).map_err(op(map_names::MAGLEV, "set"))?;
        }
        Ok(())
    }

    /// Reads back the first `m` slots of table `half` of service slot `slot`.
    pub fn read_table(&self, slot: u16, half: u8, m: u32) -> Result<Vec<u32>, MapError> {
        let first = Service::first_row(slot, half);
        let mut out = Vec::with_capacity(m as usize);
        for i in 0..m.div_ceil(MAGLEV_ROW).min(MAGLEV_ROWS_PER_TABLE) {
            let row = self.maglev.get(&(first + i), 0).map_err(op(map_names::MAGLEV, "get"))?;
            out.extend_from_slice(&row.ids);
        }
        out.truncate(m as usize);
        Ok(out)
    }

    /// Packets and bytes sent to backend `id`, summed over CPUs.
    pub fn backend_stats(&self, id: u32) -> Result<BackendStats, MapError> {
        let per_cpu = self.backend_stats.get(&id, 0).map_err(op(map_names::BACKEND_STATS, "get"))?;
        Ok(per_cpu.iter().fold(BackendStats::default(), |acc, s| BackendStats {
            packets: acc.packets + s.packets,
            bytes: acc.bytes + s.bytes,
        }))
    }

    /// Zeroes backend `id`'s counters (when the id is given to a new backend).
    pub fn reset_backend_stats(&mut self, id: u32) -> Result<(), MapError> {
        let cpus = nr_cpus().map_err(|(_, source)| MapError::PerCpu { source })?;
        let zeros = PerCpuValues::try_from(vec![BackendStats::default(); cpus])
            .map_err(|source| MapError::PerCpu { source })?;
        self.backend_stats.set(id, zeros, 0).map_err(op(map_names::BACKEND_STATS, "reset"))
    }

    /// The backend a flow is pinned to, if any.
    pub fn conn(&self, flow: &FlowKey) -> Result<Option<Conn>, MapError> {
        match self.conns.get(flow, 0) {
            Ok(c) => Ok(Some(c)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(MapError::Op { name: map_names::CONNS, op: "get", source }),
        }
    }

    /// The IPv6 flow's pin, if any.
    pub fn conn6(&self, flow: &FlowKey6) -> Result<Option<Conn>, MapError> {
        match self.conns6.get(flow, 0) {
            Ok(c) => Ok(Some(c)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(source) => Err(MapError::Op { name: map_names::CONNS6, op: "get", source }),
        }
    }

    /// Forgets every pinned flow of both families (and every cached one).
    pub fn clear_conns(&mut self) -> Result<(), MapError> {
        self.invalidate_flow_cache()?;
        let keys: Vec<FlowKey> =
            self.conns.keys().collect::<Result<_, _>>().map_err(op(map_names::CONNS, "iterate"))?;
        for k in keys {
            match self.conns.remove(&k) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(source) => return Err(MapError::Op { name: map_names::CONNS, op: "remove", source }),
            }
        }
        let keys: Vec<FlowKey6> =
            self.conns6.keys().collect::<Result<_, _>>().map_err(op(map_names::CONNS6, "iterate"))?;
        for k in keys {
            match self.conns6.remove(&k) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(source) => return Err(MapError::Op { name: map_names::CONNS6, op: "remove", source }),
            }
        }
        Ok(())
    }

    /// Forgets the flows pinned under forward mode `mode` (and the flow caches); returns
    /// how many. A flow that changes backend later re-hashes as a new one would.
    pub fn remove_conns_with_mode(&mut self, mode: vip_common::ForwardMode) -> Result<usize, MapError> {
        let mut doomed = Vec::new();
        for entry in self.conns.iter() {
            let (key, conn) = entry.map_err(op(map_names::CONNS, "iterate"))?;
            if conn.mode == mode as u8 {
                doomed.push(key);
            }
        }
        if doomed.is_empty() {
            return Ok(0);
        }
        self.invalidate_flow_cache()?;
        for k in &doomed {
            match self.conns.remove(k) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(source) => return Err(MapError::Op { name: map_names::CONNS, op: "remove", source }),
            }
        }
        Ok(doomed.len())
    }

    /// Re-pins every IPv4 flow pinned under forward mode `from` to the same backend under
    /// `to` (IPIP only: IPv6 flows are never pinned under it). Returns how many. Each
    /// entry is rewritten whole, so a reader sees the old pin or the new one.
    pub fn convert_conns_mode(
        &mut self,
        from: vip_common::ForwardMode,
        to: vip_common::ForwardMode,
    ) -> Result<usize, MapError> {
        let mut moved = Vec::new();
        for entry in self.conns.iter() {
            let (key, conn) = entry.map_err(op(map_names::CONNS, "iterate"))?;
            if conn.mode == from as u8 {
                moved.push((key, Conn { mode: to as u8, ..conn }));
            }
        }
        if moved.is_empty() {
            return Ok(0);
        }
        for (k, conn) in &moved {
            match self.conns.insert(k, conn, 0) {
                Ok(()) => {}
                Err(source) => return Err(MapError::Op { name: map_names::CONNS, op: "update", source }),
            }
        }
        // After the rewrite: a CPU that cached an old pin meanwhile (the previous program
        // still runs) must not keep it.
        self.invalidate_flow_cache()?;
        Ok(moved.len())
    }

    /// How many flows are pinned, both families.
    pub fn conn_count(&self) -> usize {
        self.conns.keys().filter(Result::is_ok).count() + self.conns6.keys().filter(Result::is_ok).count()
    }

    /// Every service and its live state: IPv4 first, each family sorted.
    pub fn services(&self) -> Result<Vec<(ServiceId, Service)>, MapError> {
        let mut out = Vec::new();
        for entry in self.services.iter() {
            let (k, v) = entry.map_err(op(map_names::SERVICES, "iterate"))?;
            out.push((ServiceId::V4(k), v));
        }
        for entry in self.services6.iter() {
            let (k, v) = entry.map_err(op(map_names::SERVICES6, "iterate"))?;
            out.push((ServiceId::V6(k), v));
        }
        out.sort_by_key(|(k, _)| *k);
        Ok(out)
    }

    /// Every backend id in use (non-zero address) and its entry.
    pub fn backends(&self) -> Result<Vec<(u32, Backend)>, MapError> {
        let mut out = Vec::new();
        for id in 0..vip_common::MAX_BACKENDS {
            let b = self.backend(id)?;
            if b.ip != [0; 4] {
                out.push((id, b));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use vip_common::{VipSet, VipState};

    use super::kept_fast_path;

    const T1: u64 = 1_000_000_000;
    const T2: u64 = 2_000_000_000;

    /// The bits a list entry may carry, by the state its hash holds and the slot's
    /// deadline: a drop bit for a follower that does not probe, whatever the deadline; an
    /// answer bit for a leader until exactly the slot's deadline; none otherwise.
    #[test]
    fn fast_path_bits_fit_the_state_and_the_slots_deadline() {
        let probing = VipState { flags: VipState::F_PROBING, ..VipState::follower() };
        let leader_probing = VipState { flags: VipState::F_LEADER | VipState::F_PROBING, ..VipState::leader_until(T1) };
        for (name, state, until, want) in [
            ("follower", VipState::follower(), 0, VipSet::ARP_SKIP),
            ("follower, balancing (BGP)", VipState::follower(), VipState::FOREVER, VipSet::ARP_SKIP),
            ("follower, probing", probing, 0, 0),
            ("leader until the slot's deadline", VipState::leader_until(T1), T1, VipSet::ARP_ANSWER),
            ("leader, probing", leader_probing, T1, VipSet::ARP_ANSWER),
            ("leader for ever", VipState::leader_until(VipState::FOREVER), VipState::FOREVER, VipSet::ARP_ANSWER),
            ("leader balancing past its deadline", VipState::leader_until(T1), VipState::FOREVER, 0),
            ("leader balancing less", VipState::leader_until(T2), T1, 0),
        ] {
            assert_eq!(VipSet::fast_path_bits(&state, until), want, "{name}");
        }
    }

    /// What a rewrite of the list (before the hash's) keeps: only bits that fit both the
    /// state the hash still holds and the new one, which for an answer bit means the
    /// same deadline (a renewal answers with the hash's deadline or not at all).
    #[test]
    fn a_rewrite_keeps_only_the_bits_that_fit_the_old_and_the_new_state() {
        let (answer, skip) = (VipSet::ARP_ANSWER | 7, VipSet::ARP_SKIP | 7);
        let leader = |t| VipState::leader_until(t);
        for (name, same, entry, old_until, state, new_until, want) in [
            ("leader rewritten as it is", true, answer, T1, leader(T1), T1, VipSet::ARP_ANSWER),
            ("renewal", true, answer, T1, leader(T2), T2, 0),
            ("leader to follower", true, answer, T1, VipState::follower(), 0, 0),
            ("follower to leader", true, skip, 0, leader(T1), T1, 0),
            ("follower rewritten, a new balancing deadline", true, skip, 0, VipState::follower(), T2, VipSet::ARP_SKIP),
            ("another VIP's slot", false, skip, 0, VipState::follower(), 0, 0),
            ("no bit", true, 7, T1, leader(T1), T1, 0),
        ] {
            assert_eq!(kept_fast_path(same, entry, old_until, &state, new_until), want, "{name}");
        }
    }
}
