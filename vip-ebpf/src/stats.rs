//! Per-CPU verdict counters.

use vip_common::Reason;

use crate::maps::STATS;

/// Counts one frame under `reason`. Per-CPU, so a plain add is race-free.
#[inline(always)]
pub fn count(reason: Reason) {
    if let Some(slot) = STATS.get_ptr_mut(reason as u32) {
        // SAFETY: the pointer comes from a successful per-CPU array lookup and is only
        // touched by this CPU while the program runs.
        unsafe { *slot += 1 };
    }
}
