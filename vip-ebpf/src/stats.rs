//! Per-CPU verdict counters.

use vip_common::Reason;

use crate::maps::{BACKEND_STATS, STATS};

/// Counts one frame under `reason`. Per-CPU, so a plain add is race-free.
#[inline(always)]
pub fn count(reason: Reason) {
    if let Some(slot) = STATS.get_ptr_mut(reason as u32) {
        // SAFETY: the pointer comes from a successful per-CPU array lookup and is only
        // touched by this CPU while the program runs.
        unsafe { *slot += 1 };
    }
}

/// Counts one frame of `bytes` bytes sent to backend `id`.
#[inline(always)]
pub fn count_backend(id: u32, (packets, bytes): (u64, u64)) {
    if let Some(slot) = BACKEND_STATS.get_ptr_mut(id) {
        // SAFETY: per-CPU value from a successful lookup, touched only by this CPU.
        unsafe {
            (*slot).packets += packets;
            (*slot).bytes += bytes;
        }
    }
}
