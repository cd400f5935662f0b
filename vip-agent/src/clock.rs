//! The clock the data plane's deadlines are on.
//!
//! Fencing and balancing deadlines live in the XDP maps as nanoseconds of
//! `CLOCK_BOOTTIME`, what `bpf_ktime_get_boot_ns()` reads. Unlike `CLOCK_MONOTONIC`
//! (`bpf_ktime_get_ns()`), it keeps counting while the host is suspended: a leader
//! suspended in the middle of its renew deadline finds the deadline passed when it
//! resumes, instead of answering ARP for the rest of it while another node leads.

use tokio::time::Instant;

/// `CLOCK_BOOTTIME` now, in nanoseconds.
pub fn boot_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime fills ts; CLOCK_BOOTTIME exists on every kernel with BPF.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The data plane's time (boot-time nanoseconds) of a local instant: now plus what is
/// left until `until` (zero if it passed).
pub fn kernel_deadline(until: Instant) -> u64 {
    boot_ns().saturating_add(until.saturating_duration_since(Instant::now()).as_nanos() as u64)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_deadline_is_now_plus_what_is_left_on_the_boot_clock() {
        let before = boot_ns();
        let d = kernel_deadline(Instant::now() + Duration::from_millis(600));
        let after = boot_ns();
        assert!(d >= before + 599_000_000 && d <= after + 600_000_000, "{before} {d} {after}");
        assert!(kernel_deadline(Instant::now() - Duration::from_secs(1)) <= boot_ns(), "a past instant is now");
    }
}
