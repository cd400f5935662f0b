//! The maps the agent fills and the program reads. Names and value layouts come from
//! `vip-common`, the only crate both sides share.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, ProgramArray},
};
use vip_common::{
    Backend, BackendStats, CachedFlow, CachedFlow6, Config, Conn, FlowKey, FlowKey6, IcmpBudget, MaglevRow, PeerKey,
    Reason, Service, ServiceKey, ServiceKey6, Vip6Key, Vip6State, VipKey, VipSet, VipSet6, VipState, FLOW_CACHE_SLOTS,
    MAGLEV_ROWS, MAX_BACKENDS, MAX_CONNS, MAX_PEERS, MAX_SERVICES, MAX_VIPS,
};

/// This node's MAC on the attached interface. One entry (index 0). An array, not a hash,
/// because the lookup can never miss and costs one bounds check.
#[map(name = "VIP_CONFIG")]
pub static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

/// VIP → leadership state. A hash keyed by address because the set is small and sparse;
/// the kernel replaces a hash element atomically, so a reader sees the old or the new
/// state of a VIP, never a mix.
#[map(name = "VIP_VIPS")]
pub static VIPS: HashMap<VipKey, VipState> = HashMap::with_max_entries(MAX_VIPS, 0);

/// IPv6 VIP → leadership state (what the Neighbor Discovery responder reads, with the
/// same semantics as [`VIPS`]) and balancing deadline (as [`VIP_SET`]'s for IPv4). Apart
/// from [`VIPS`] so the IPv4 key stays 4 bytes.
#[map(name = "VIP_VIPS6")]
pub static VIPS6: HashMap<Vip6Key, Vip6State> = HashMap::with_max_entries(MAX_VIPS, 0);

/// `vip_xdp`'s tail-call targets (`vip_common::tail_calls`): the IPv6 program. Filled by
/// the agent when it loads the object; pinned with the other maps.
#[map(name = "VIP_PROGS_XDP")]
pub static PROGS_XDP: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// `vip_tcx`'s tail-call targets, likewise.
#[map(name = "VIP_PROGS_TCX")]
pub static PROGS_TCX: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// `vip_tcx_vlan`'s jump to `vip_tcx` (`vip_common::tail_calls::PROGS_TCX_VLAN`).
#[map(name = "VIP_PROGS_TCX_VLAN")]
pub static PROGS_TCX_VLAN: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// The VIPs as a flat list (one entry), for the IPv4 path's membership test.
#[map(name = "VIP_VIP_SET")]
pub static VIP_SET: Array<VipSet> = Array::with_max_entries(1, 0);

/// One counter per [`Reason`], per CPU so the hot path never contends on a cache line.
/// The agent sums the CPUs when it reads them.
#[map(name = "VIP_STATS")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Reason::SLOTS, 0);

/// VIP:port → service (table slot, live table, forward mode, M). A hash, replaced whole by
/// the agent to flip tables atomically.
#[map(name = "VIP_SERVICES")]
pub static SERVICES: HashMap<ServiceKey, Service> = HashMap::with_max_entries(MAX_SERVICES, 0);

/// Backend id → address, MAC, flags. An array: ids are dense and the lookup cannot miss.
#[map(name = "VIP_BACKENDS")]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);

/// Every service's two Maglev tables, 256 slots per entry (see `vip_common::MAGLEV_ROW`).
#[map(name = "VIP_MAGLEV")]
pub static MAGLEV: Array<MaglevRow> = Array::with_max_entries(MAGLEV_ROWS, 0);

/// Flow → backend. An LRU so the table never fills up: the coldest flow is forgotten
/// first, and a forgotten flow re-hashes to the same backend unless the set changed.
#[map(name = "VIP_CONNS")]
pub static CONNS: LruHashMap<FlowKey, Conn> = LruHashMap::with_max_entries(MAX_CONNS, 0);

/// IPv6 VIP:port → service, as [`SERVICES`]; the tables are in [`MAGLEV`].
#[map(name = "VIP_SERVICES6")]
pub static SERVICES6: HashMap<ServiceKey6, Service> = HashMap::with_max_entries(MAX_SERVICES, 0);

/// IPv6 flow → backend, as [`CONNS`], with [`FLOW_CACHE6`] in front.
#[map(name = "VIP_CONNS6")]
pub static CONNS6: LruHashMap<FlowKey6, Conn> = LruHashMap::with_max_entries(MAX_CONNS, 0);

/// Packets and bytes per backend, per CPU.
#[map(name = "VIP_BACKEND_STATS")]
pub static BACKEND_STATS: PerCpuArray<BackendStats> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// The other load-balancing nodes of the segment, by MAC and by IPv4 address. A hash:
/// looked up only off the established-flow path (new flows, IPIP decapsulation).
#[map(name = "VIP_PEERS")]
pub static PEERS: HashMap<PeerKey, u32> = HashMap::with_max_entries(MAX_PEERS, 0);

/// The IPv6 VIPs as a flat list (one entry), for the IPv6 forwarding path's membership
/// test and Neighbor Discovery's fast path; otherwise Neighbor Discovery reads
/// [`VIPS6`].
#[map(name = "VIP_VIP_SET6")]
pub static VIP_SET6: Array<VipSet6> = Array::with_max_entries(1, 0);

/// The per-CPU direct-mapped cache in front of [`CONNS`].
#[map(name = "VIP_FLOW_CACHE")]
pub static FLOW_CACHE: PerCpuArray<CachedFlow> = PerCpuArray::with_max_entries(FLOW_CACHE_SLOTS, 0);

/// Raised (1) by XDP when the driver cannot carry the companion's mark in the frame's
/// metadata (see `handoff`); one element, never lowered while the maps live.
#[map(name = "VIP_HANDOFF_NO_META")]
pub static HANDOFF_NO_META: Array<u32> = Array::with_max_entries(1, 0);

/// The per-CPU direct-mapped cache in front of [`CONNS6`]: an IPv6 flow's key is 40
/// bytes, whose hash-table lookup costs more than its fold and hash.
#[map(name = "VIP_FLOW_CACHE6")]
pub static FLOW_CACHE6: PerCpuArray<CachedFlow6> = PerCpuArray::with_max_entries(FLOW_CACHE_SLOTS, 0);

/// The budget of generated ICMP errors, per CPU (one entry).
#[map(name = "VIP_ICMP_BUDGET")]
pub static ICMP_BUDGET: PerCpuArray<IcmpBudget> = PerCpuArray::with_max_entries(1, 0);

/// What the IPv4 path needs to know about a VIP.
#[derive(Clone, Copy)]
pub struct VipInfo {
    /// Until when (kernel boot-time ns) this node load-balances the VIP's new flows.
    pub balance_until: u64,
    /// The L2 segment the VIP lives on.
    pub segment: u16,
    /// [`VipSet::ARP_SKIP`]: this node neither leads nor probes for the VIP.
    pub arp_skip: bool,
    /// [`VipSet::ARP_ANSWER`]: this node leads the VIP until `balance_until`.
    pub arp_answer: bool,
}

/// The VIP `addr`, if it is one of this node's (the IPv4 path's membership test).
#[inline(always)]
pub fn vip(addr: [u8; 4]) -> Option<VipInfo> {
    let set = VIP_SET.get(0)?;
    let i = set.slot(addr)?;
    let segment = *set.segments.get(i)?;
    Some(VipInfo {
        balance_until: *set.balance_until_ns.get(i)?,
        segment: segment & VipSet::SEGMENT,
        arp_skip: segment & VipSet::ARP_SKIP != 0,
        arp_answer: segment & VipSet::ARP_ANSWER != 0,
    })
}

/// What the IPv6 forwarding path needs to know about a VIP.
#[derive(Clone, Copy)]
pub struct Vip6Info {
    /// Until when (kernel boot-time ns) this node load-balances the VIP's new flows.
    pub balance_until: u64,
    /// The L2 segment the VIP lives on.
    pub segment: u16,
    /// [`VipSet6::NS_SKIP`]: this node neither leads nor probes for the VIP.
    pub ns_skip: bool,
    /// [`VipSet6::NS_ANSWER`]: this node leads the VIP until `balance_until`.
    pub ns_answer: bool,
}

/// The IPv6 VIP whose address is `addr` (`parse::load_ipv6_words`' form), if it is one
/// of this node's.
#[inline(always)]
pub fn vip6(addr: [u64; 2]) -> Option<Vip6Info> {
    let set = VIP_SET6.get(0)?;
    let i = set.slot_of_words(addr)?;
    let segment = *set.segments.get(i)?;
    Some(Vip6Info {
        balance_until: *set.balance_until_ns.get(i)?,
        segment: segment & VipSet::SEGMENT,
        ns_skip: segment & VipSet6::NS_SKIP != 0,
        ns_answer: segment & VipSet6::NS_ANSWER != 0,
    })
}

/// Whether `key` is another load-balancing node.
#[inline(always)]
pub fn is_peer(key: &PeerKey) -> bool {
    // SAFETY: only the presence of the key is read.
    unsafe { PEERS.get(key) }.is_some()
}
