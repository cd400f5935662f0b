//! `cargo xtask bench`: per-packet cost of the data plane through `BPF_PROG_RUN`, beside
//! a trivial `XDP_PASS` program measured in the same run as the floor.
//!
//! Two measurements per path:
//! - *single*: the median of many one-frame runs. Works for every path, including those
//!   that rewrite the frame (the kernel does not restore it between repeats).
//! - *repeat*: the kernel's own average over `REPEAT` runs of one frame, for paths whose
//!   output equals their input (drop, pass), where it is the more precise figure.

use std::net::Ipv4Addr;

use tests::frames::{ipv4, tcp, Arp, Frame, BROADCAST, ETH_P_IPV4};
use vip_agent::dataplane::{Dataplane, Program};
use vip_common::{Config, VipState};

const SINGLE_RUNS: usize = 20_000;
const REPEAT: u32 = 1_000_000;

struct Row {
    name: &'static str,
    program: Program,
    frame: Vec<u8>,
    /// The path leaves the frame as it found it, so `repeat` is meaningful.
    idempotent: bool,
    expect_action: u32,
}

fn median_single(dp: &Dataplane, row: &Row) -> Result<f64, String> {
    let mut ns = Vec::with_capacity(SINGLE_RUNS);
    for _ in 0..SINGLE_RUNS {
        let out = dp
            .test_run(row.program, &row.frame)
            .map_err(|e| format!("{}: {e:?}", row.name))?;
        if out.action != row.expect_action {
            return Err(format!(
                "{}: action {} want {}",
                row.name, out.action, row.expect_action
            ));
        }
        ns.push(out.duration.as_nanos() as u64);
    }
    ns.sort_unstable();
    Ok(ns[ns.len() / 2] as f64)
}

fn repeated(dp: &Dataplane, row: &Row) -> Result<Option<f64>, String> {
    if !row.idempotent {
        return Ok(None);
    }
    let out = dp
        .test_run_repeat(row.program, &row.frame, REPEAT)
        .map_err(|e| format!("{}: {e:?}", row.name))?;
    Ok(Some(out.duration.as_nanos() as f64))
}

fn main() -> Result<(), String> {
    let node_mac = [0x02, 0, 0, 0, 0, 1];
    let client_mac = [0x02, 0, 0, 0, 0, 0xc1];
    let vip = Ipv4Addr::new(10, 0, 0, 100);
    let followed = Ipv4Addr::new(10, 0, 0, 101);
    let client = Ipv4Addr::new(10, 0, 0, 10);

    let mut dp = Dataplane::load().map_err(|e| format!("{e:#?} (the benchmark needs root)"))?;
    dp.maps_mut()
        .set_config(&Config::new(node_mac, [0; 4]))
        .map_err(|e| e.to_string())?;
    dp.maps_mut()
        .set_vip(vip, VipState::leader_until(VipState::FOREVER))
        .map_err(|e| e.to_string())?;
    dp.maps_mut()
        .set_vip(followed, VipState::follower())
        .map_err(|e| e.to_string())?;

    let arp_for = |tpa| {
        Frame::arp(
            BROADCAST,
            client_mac,
            &Arp::request(client_mac, client, tpa),
        )
        .padded()
    };
    let tcp_frame = Frame::new(
        node_mac,
        client_mac,
        ETH_P_IPV4,
        ipv4(client, vip, 6, &tcp(40000, 443, 0x10)),
    )
    .bytes();
    let rows = [
        Row {
            name: "xdp_pass (floor)",
            program: Program::Pass,
            frame: arp_for(vip),
            idempotent: true,
            expect_action: 2,
        },
        Row {
            name: "ARP reply (leader)",
            program: Program::Vip,
            frame: arp_for(vip),
            idempotent: false,
            expect_action: 3,
        },
        Row {
            name: "ARP drop (follower)",
            program: Program::Vip,
            frame: arp_for(followed),
            idempotent: true,
            expect_action: 1,
        },
        Row {
            name: "non-ARP pass (IPv4 TCP)",
            program: Program::Vip,
            frame: tcp_frame,
            idempotent: true,
            expect_action: 2,
        },
    ];

    let mut results = Vec::new();
    for row in &rows {
        results.push((row.name, median_single(&dp, row)?, repeated(&dp, row)?));
    }
    let (floor_single, floor_repeat) = (results[0].1, results[0].2.unwrap_or(f64::NAN));

    println!(
        "XDP per-packet cost via BPF_PROG_RUN ({} CPUs, kernel {})",
        nproc(),
        kernel()
    );
    println!("single = median of {SINGLE_RUNS} one-frame runs; repeat = kernel average over {REPEAT} runs of one frame");
    println!(
        "{:<26} {:>11} {:>9} {:>11} {:>9}",
        "path", "single ns", "x floor", "repeat ns", "x floor"
    );
    for (name, single, repeat) in &results {
        let (rep, rep_ratio) = match repeat {
            Some(r) => (format!("{r:.1}"), format!("{:.2}", r / floor_repeat)),
            None => ("-".into(), "-".into()),
        };
        println!(
            "{name:<26} {single:>11.1} {:>9.2} {rep:>11} {rep_ratio:>9}",
            single / floor_single
        );
    }
    Ok(())
}

fn nproc() -> usize {
    std::thread::available_parallelism()
        .map(usize::from)
        .unwrap_or(1)
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}
