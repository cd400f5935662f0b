//! The maps the agent fills and the program reads. Names and value layouts come from
//! `vip-common`, the only crate both sides share.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, PerCpuArray},
};
use vip_common::{Config, Reason, VipKey, VipState, MAX_VIPS};

/// This node's MAC on the attached interface. One entry (index 0). An array, not a hash,
/// because the lookup can never miss and costs one bounds check.
#[map(name = "VIP_CONFIG")]
pub static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

/// VIP → leadership state. A hash keyed by address because the set is small and sparse;
/// the kernel replaces a hash element atomically, so a reader sees the old or the new
/// state of a VIP, never a mix.
#[map(name = "VIP_VIPS")]
pub static VIPS: HashMap<VipKey, VipState> = HashMap::with_max_entries(MAX_VIPS, 0);

/// One counter per [`Reason`], per CPU so the hot path never contends on a cache line.
/// The agent sums the CPUs when it reads them.
#[map(name = "VIP_STATS")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Reason::SLOTS, 0);
