//! The peers section: every peer measured round-robin, so drift in the machine's load
//! spreads over all of them rather than landing on one, each round in a fresh lab: the
//! backends' TIME_WAIT sockets and the LB's conntrack entries of one peer would
//! otherwise meet the next peer's connections (an SNAT port reused with another
//! timestamp clock is refused by PAWS and costs the client a 1 s SYN retransmit).
//!
//! Per peer and round: a saturation run (closed loop, [`SAT_CONNS`] connections in
//! flight) and a fixed-load run ([`FIXED_RATE`] new connections per second); each has a
//! warm-up, then a measured window during which the LB's CPU time is read at both ends.

use std::time::{Duration, Instant};

use crate::{
    cpu,
    loadgen::{self, Run, Window},
    peers::{Peer, PeersLab},
};

/// Connections in flight at saturation: enough to keep the client's core busy through
/// every peer's latency (48 measured no higher here); more only adds scheduler contention.
pub const SAT_CONNS: usize = 16;
/// The fixed offered load (new connections/s): well below every peer's saturation
/// measured here (the slowest, HAProxy, saturates at ~2.5x this), so queueing barely
/// enters the latency.
pub const FIXED_RATE: u32 = 2_000;
/// Open-loop threads: a request takes ~0.1–0.5 ms, but a retransmitted SYN holds its
/// thread ~10 ms (nftables, see `peers.rs`); 32 threads at 62.5 slots/s each keep the
/// schedule through that.
const FIXED_THREADS: usize = 32;
/// Left out of every figure: connection setup, ARP, caches and CPU frequency settle.
const WARMUP: Duration = Duration::from_secs(1);
/// The measured part of each run: ~10,000 requests at the fixed load, enough for a p99.
const WINDOW: Duration = Duration::from_secs(5);
/// vip's data-plane programs (IPv4, and IPv6 behind a tail call), whose run time the
/// kernel counts while [`run`] holds run-time statistics on.
const VIP_PROGRAMS: [&str; 2] = ["vip_xdp", "vip_xdp6"];

/// One measured run, the LB's CPU time during its window, and how busy the machine's
/// cores were (fraction of the window; the LB's core, the client's and backends' cores).
#[derive(Clone, Debug)]
pub struct Measured {
    pub run: Run,
    pub lb_cpu_ns: u64,
    pub lb_core_busy: f64,
    pub rest_busy: f64,
    /// Inter-processor interrupts during the window.
    pub ipis: u64,
    /// Run time of vip's XDP programs during the window (kernel statistics), ns: what
    /// the data plane itself cost, within the LB's CPU time.
    pub xdp_ns: u64,
}

impl Measured {
    pub fn ipis_per_conn(&self) -> f64 {
        self.ipis as f64 / self.run.latencies_us.len().max(1) as f64
    }

    /// vip's XDP programs' run time per 1,000 completed connections, ms (the unit of
    /// [`Measured::cpu_ms_per_1k`], which includes it).
    pub fn xdp_ms_per_1k(&self) -> f64 {
        self.xdp_ns as f64 / 1e3 / self.run.latencies_us.len().max(1) as f64
    }

    /// LB CPU milliseconds per 1,000 completed connections.
    pub fn cpu_ms_per_1k(&self) -> f64 {
        let n = self.run.latencies_us.len().max(1) as f64;
        self.lb_cpu_ns as f64 / 1e6 / n * 1000.0
    }
}

/// Every round of one peer, or why it failed.
#[derive(Debug)]
pub struct PeerResult {
    pub peer: Peer,
    pub saturation: Vec<Measured>,
    pub fixed: Vec<Measured>,
    pub error: Option<String>,
}

impl PeerResult {
    /// Median connections/s over the saturation rounds.
    pub fn conns_per_s(&self) -> Option<f64> {
        let mut v: Vec<f64> = self.saturation.iter().map(|m| m.run.per_second()).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied()
    }

    /// All rounds merged into one run (latencies pooled) and their CPU added up.
    pub fn merged(runs: &[Measured]) -> Option<Measured> {
        if runs.is_empty() {
            return None;
        }
        let mut all = Measured {
            run: Run { window: Duration::ZERO, ..Run::default() },
            lb_cpu_ns: 0,
            lb_core_busy: 0.0,
            rest_busy: 0.0,
            ipis: 0,
            xdp_ns: 0,
        };
        for m in runs {
            all.lb_core_busy += m.lb_core_busy / runs.len() as f64;
            all.rest_busy += m.rest_busy / runs.len() as f64;
            all.run.latencies_us.extend(&m.run.latencies_us);
            all.run.failed += m.run.failed;
            all.run.late += m.run.late;
            all.run.window += m.run.window;
            all.lb_cpu_ns += m.lb_cpu_ns;
            all.ipis += m.ipis;
            all.xdp_ns += m.xdp_ns;
            if all.run.first_error.is_none() {
                all.run.first_error.clone_from(&m.run.first_error);
            }
        }
        Some(all)
    }
}

/// Runs `load` over a fresh window while reading the LB's CPU time at its two ends.
fn measured(
    lab: &PeersLab,
    pids: &[u32],
    load: impl FnOnce(Window) -> Result<Run, String>,
) -> Result<Measured, String> {
    let window = Window::after(WARMUP, WINDOW);
    std::thread::scope(|s| {
        let cpu = s.spawn(|| -> Result<(u64, Vec<u64>, u64, u64), String> {
            std::thread::sleep(window.open.saturating_duration_since(Instant::now()));
            let (a, busy_a, ipis_a) = (lab.lb_cpu_ns(pids)?, cpu::busy_ns_per_cpu(), cpu::ipis());
            let xdp_a = cpu::bpf_run_ns(&VIP_PROGRAMS);
            std::thread::sleep(window.close.saturating_duration_since(Instant::now()));
            let busy: Vec<u64> = cpu::busy_ns_per_cpu().iter().zip(&busy_a).map(|(b, a)| b - a).collect();
            let xdp_ns = cpu::bpf_run_ns(&VIP_PROGRAMS).saturating_sub(xdp_a);
            Ok((lab.lb_cpu_ns(pids)? - a, busy, cpu::ipis() - ipis_a, xdp_ns))
        });
        let run = load(window)?;
        let (lb_cpu_ns, busy, ipis, xdp_ns) = cpu.join().map_err(|_| "CPU sampler panicked".to_string())??;
        let share = |cpus: &[usize]| {
            let ns: u64 = cpus.iter().filter_map(|&c| busy.get(c)).sum();
            ns as f64 / (WINDOW.as_nanos() as f64 * cpus.len() as f64)
        };
        let (lb_core_busy, rest_busy) = (share(&[lab.split.lb]), share(&lab.split.rest));
        Ok(Measured { run, lb_cpu_ns, lb_core_busy, rest_busy, ipis, xdp_ns })
    })
}

/// One round of one peer: start it, saturate, then the fixed load; stop it.
fn round(lab: &PeersLab, peer: Peer, conns: usize) -> Result<(Measured, Measured), String> {
    let running = lab.start(peer)?;
    let client = loadgen::Client { ns: &lab.client().ns.name, cpus: &lab.split.rest };
    let targets = running.targets.clone();
    let sat = measured(lab, &running.pids, |w| loadgen::closed_loop(&client, &targets, conns, w))?;
    let fixed = measured(lab, &running.pids, |w| loadgen::open_loop(&client, &targets, FIXED_RATE, FIXED_THREADS, w))?;
    drop(running);
    Ok((sat, fixed))
}

/// Every peer, `rounds` times round-robin. A peer that fails once is not tried again.
pub fn run(peers: &[Peer], rounds: usize, conns: usize) -> Result<Vec<PeerResult>, String> {
    // On while the returned descriptor is open (BPF_ENABLE_STATS): every BPF program run
    // then also reads the clock twice, tens of ns against the µs a frame costs here.
    let _stats = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .map_err(|e| format!("turning on BPF run-time statistics: {e}"))?;
    let mut results: Vec<PeerResult> =
        peers.iter().map(|&peer| PeerResult { peer, saturation: vec![], fixed: vec![], error: None }).collect();
    for r in 0..rounds {
        for result in results.iter_mut().filter(|r| r.error.is_none()) {
            eprintln!("vip-peers: round {}/{rounds}: {}", r + 1, result.peer.name());
            match PeersLab::new().and_then(|lab| round(&lab, result.peer, conns)) {
                Ok((sat, fixed)) => {
                    eprintln!(
                        "vip-peers:   {:.0} conn/s at saturation (cores busy: LB {:.0}%, others {:.0}%; \
                         {:.1} IPIs/conn), fixed load p99 {} µs, {} failed",
                        sat.run.per_second(),
                        sat.lb_core_busy * 100.0,
                        sat.rest_busy * 100.0,
                        sat.ipis_per_conn(),
                        fixed.run.quantile_us(0.99).unwrap_or(0),
                        sat.run.failed + fixed.run.failed
                    );
                    result.saturation.push(sat);
                    result.fixed.push(fixed);
                }
                Err(e) => result.error = Some(e),
            }
        }
    }
    Ok(results)
}
