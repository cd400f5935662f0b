//! The maps the agent fills and the program reads. Names and value layouts come from
//! `vip-common`, the only crate both sides share.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use vip_common::{
    Backend, BackendStats, Config, Conn, FlowKey, MaglevRow, Reason, Service, ServiceKey, VipKey, VipSet, VipState,
    MAGLEV_ROWS, MAX_BACKENDS, MAX_CONNS, MAX_SERVICES, MAX_VIPS,
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

/// Packets and bytes per backend, per CPU.
#[map(name = "VIP_BACKEND_STATS")]
pub static BACKEND_STATS: PerCpuArray<BackendStats> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// Whether `addr` is one of this node's VIPs (the IPv4 path's membership test).
#[inline(always)]
pub fn is_vip(addr: [u8; 4]) -> bool {
    VIP_SET.get(0).is_some_and(|set| set.contains(addr))
}

/// For a VIP: `Some(until)`, the time (kernel monotonic ns) until which this node
/// load-balances it. `None` if `addr` is not a VIP.
#[inline(always)]
pub fn vip_balance_until(addr: [u8; 4]) -> Option<u64> {
    let set = VIP_SET.get(0)?;
    let i = set.slot(addr)?;
    set.balance_until_ns.get(i).copied()
}
