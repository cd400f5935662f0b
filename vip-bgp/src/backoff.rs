//! Delay before the next connection attempt: exponential with jitter, reset once a
//! session reached Established.
//!
//! RFC 4271 §8.1.1 (DampPeerOscillations, IdleHoldTimer) allows a growing delay between
//! attempts; we use it for every failure so that a router refusing us (wrong AS, wrong
//! password, not configured) is retried often at first and then every 8 s, and
//! several nodes restarted together do not reconnect in lockstep.

use std::time::Duration;

/// First delay. A router that just closed on us is usually back within a second
/// (restart, configuration reload), and our routes are missing until we reconnect.
pub const INITIAL_DELAY: Duration = Duration::from_secs(1);
/// Largest delay before jitter. What it costs: a misconfigured peer gets one attempt
/// per 8 s (a SYN, maybe an OPEN refused). What it buys: a router back from a restart
/// gets our routes within 8 s; with a single router the VIP is unreachable until then
/// (a new-user trial measured 8–17 s with 30 s here, after a 45 s router outage).
pub const MAX_DELAY: Duration = Duration::from_secs(8);
/// Each delay is scaled by a factor drawn uniformly from 1 ± this many per mille (±20 %),
/// enough to spread the nodes of a cluster that restarted at once.
const JITTER_PER_MILLE: u64 = 200;

/// Attempt counter and the pseudo-random state for jitter (SplitMix64: no dependency,
/// and statistically plenty for spreading retries).
#[derive(Clone, Debug)]
pub struct Backoff {
    attempt: u32,
    rng: u64,
}

impl Backoff {
    /// `seed` picks the jitter sequence; distinct peers and nodes should use distinct seeds.
    pub fn new(seed: u64) -> Self {
        Self { attempt: 0, rng: seed }
    }

    /// The delay before the next attempt: [`INITIAL_DELAY`] doubled per failure since the
    /// last reset, capped at [`MAX_DELAY`], then jittered by ±20 %.
    pub fn next_delay(&mut self) -> Duration {
        let base = INITIAL_DELAY.saturating_mul(1u32 << self.attempt.min(16)).min(MAX_DELAY);
        self.attempt = self.attempt.saturating_add(1);
        let per_mille = 1000 - JITTER_PER_MILLE + self.next_random() % (2 * JITTER_PER_MILLE + 1);
        let millis = base.as_millis() as u64 * per_mille / 1000;
        Duration::from_millis(millis)
    }

    /// Back to [`INITIAL_DELAY`]: called when a session reaches Established.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    fn next_random(&mut self) -> u64 {
        self.rng = self.rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn within(delay: Duration, base_secs: u64) -> bool {
        let base = Duration::from_secs(base_secs);
        delay >= base.mul_f64(0.8) && delay <= base.mul_f64(1.2)
    }

    #[test]
    fn delays_double_from_one_second_up_to_thirty_within_twenty_percent() {
        let mut backoff = Backoff::new(7);
        for base in [1, 2, 4, 8, 8, 8] {
            let delay = backoff.next_delay();
            assert!(within(delay, base), "{delay:?} not within 20 % of {base} s");
        }
    }

    #[test]
    fn reset_starts_again_from_one_second() {
        let mut backoff = Backoff::new(7);
        for _ in 0..10 {
            backoff.next_delay();
        }
        backoff.reset();
        assert!(within(backoff.next_delay(), 1));
    }

    #[test]
    fn jitter_spreads_peers_with_different_seeds() {
        let delays: Vec<Duration> = (0..20).map(|seed| Backoff::new(seed).next_delay()).collect();
        let distinct: std::collections::BTreeSet<_> = delays.iter().collect();
        assert!(distinct.len() > 10, "{delays:?}");
        assert!(delays.iter().all(|d| within(*d, 1)));
    }

    #[test]
    fn many_failures_never_overflow() {
        let mut backoff = Backoff::new(1);
        for _ in 0..100 {
            assert!(backoff.next_delay() <= MAX_DELAY.mul_f64(1.2));
        }
    }
}
