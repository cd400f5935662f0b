//! `cargo xtask bench`: the data plane's per-packet cost through `BPF_PROG_RUN`, beside
//! a trivial `XDP_PASS` program measured in the same run as the floor, and the agent's
//! Maglev table build time.
//!
//! Two per-packet figures:
//! - *single*: the mean of the middle half of many one-frame runs (each syscall's own
//!   kernel timing, which includes the timer's overhead, the same for every row; see
//!   `tests::perpacket`). Works for every path.
//! - *repeat*: the kernel's average over `REPEAT` runs of one frame. The kernel does not
//!   restore the frame between runs, so this is only given for paths whose output is a
//!   fixed point: drop and pass leave the frame alone, and an established DSR flow's
//!   output, run again, is rewritten to itself (same flow, same backend MACs).

use std::{
    borrow::Cow,
    net::{Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use tests::{
    frames::{
        icmpv6, ipv4, ipv6_multicast_mac, ll_option, ns_message, solicited_node, tcp, Arp, Frame, BROADCAST,
        ETH_P_IPV4, ETH_P_IPV6, TCP_ACK, TCP_SYN,
    },
    lab::FibLab,
    perpacket::{fixed_point_repeat_beside, single_ns, Beside, REPEAT, REPEAT_ROUNDS, SINGLE_RUNS},
};
use vip_agent::{
    balancer::{BackendSpec, Balancer, ServiceSpec},
    dataplane::{Dataplane, Program, RunOutcome, Runner},
    maglev::{self, Weighted},
};
use vip_common::{Config, ForwardMode, VipState};

const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xc1];
const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
const FOLLOWED: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 101);
/// A second led VIP, whose service forwards by IPIP.
const VIP_IPIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 102);
/// A led VIP forwarding by IPIP to backends whose next hop the agent resolved.
const VIP_IPIP_NH: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 104);
/// A VIP led through a Lease: a finite deadline, so the data plane checks the clock.
const VIP_LEASED: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 103);
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);
/// IPv6 VIPs, one led and one followed, and the client's IPv6 address.
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x100);
const FOLLOWED6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x101);
const CLIENT6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x10);
const PORT: u16 = 6443;

/// How a row produces its frames.
#[derive(Clone)]
enum Frames {
    /// The same frame every run.
    Same(Vec<u8>),
    /// A different flow every run (connection-table misses).
    NewFlows,
}

#[derive(Clone)]
struct Row {
    name: &'static str,
    program: Program,
    frames: Frames,
    /// The output is a fixed point, so `repeat` is meaningful.
    fixed_point: bool,
    expect_action: u32,
    ingress: Option<u32>,
}

fn syn_from(i: u32) -> Vec<u8> {
    let src = Ipv4Addr::from(0x0a10_0000 + i);
    Frame::new(NODE_MAC, CLIENT_MAC, ETH_P_IPV4, ipv4(src, VIP, 6, &tcp(1024 + (i % 60000) as u16, PORT, TCP_SYN)))
        .bytes()
}

/// `row`'s program run on a frame, `repeat` times.
fn runs<'r>(runner: &'r Runner<'_>, row: &'r Row) -> impl Fn(&[u8], u32) -> Result<RunOutcome, String> + 'r {
    move |frame, repeat| runner.run_opts(row.program, frame, repeat, row.ingress).map_err(|e| format!("{e:?}"))
}

fn single(runner: &Runner<'_>, row: &Row) -> Result<f64, String> {
    let frame_at = |i: usize| match &row.frames {
        Frames::Same(f) => Cow::Borrowed(&f[..]),
        Frames::NewFlows => Cow::Owned(syn_from(i as u32)),
    };
    single_ns(runs(runner, row), frame_at, row.expect_action).map_err(|e| format!("{}: {e}", row.name))
}

/// The kernel's averages over `REPEAT` runs of a row whose output is a fixed point, each
/// beside the floor's (`perpacket::Beside`); a row that claims one and is not fails, so
/// it never silently measures another path.
fn repeated(runner: &Runner<'_>, row: &Row) -> Result<Option<Beside>, String> {
    let floor = Row { program: Program::Pass, expect_action: 2, ingress: None, ..row.clone() };
    match (&row.frames, row.fixed_point) {
        (Frames::Same(frame), true) => {
            fixed_point_repeat_beside(runs(runner, row), runs(runner, &floor), frame, row.expect_action)
                .map_err(|e| format!("{}: {e}", row.name))?
                .map(Some)
                .ok_or_else(|| format!("{}: not a fixed point, `repeat` would measure another path", row.name))
        }
        _ => Ok(None),
    }
}

fn backends(n: u8, mac_base: u8) -> Vec<BackendSpec> {
    (1..=n)
        .map(|i| {
            BackendSpec::up(
                if mac_base == 0 { Ipv4Addr::new(10, 77, 0, 10 + i) } else { Ipv4Addr::new(10, 0, 0, 10 + i) },
                [0x02, 0, 0, 0, 0, mac_base + i],
            )
        })
        .collect()
}

/// Fills `dp`'s maps for the rows: this node's config, led and followed VIPs, a DSR
/// service, IPIP services with and without resolved next hops, a Lease-led VIP.
fn seed(dp: &mut Dataplane) -> Result<(), String> {
    let maps = dp.maps_mut();
    let e = |e: vip_agent::dataplane::MapError| e.to_string();
    maps.set_config(&Config::new(FibLab::LB_MAC, FibLab::LB_IP.octets())).map_err(e)?;
    maps.set_vip(VIP, VipState::leader_until(VipState::FOREVER)).map_err(e)?;
    maps.set_vip(FOLLOWED, VipState::follower()).map_err(e)?;
    maps.set_vip(VIP6, VipState::leader_until(VipState::FOREVER)).map_err(e)?;
    maps.set_vip(FOLLOWED6, VipState::follower()).map_err(e)?;
    maps.set_vip(VIP_IPIP, VipState::leader_until(VipState::FOREVER)).map_err(e)?;
    maps.set_vip(VIP_IPIP_NH, VipState::leader_until(VipState::FOREVER)).map_err(e)?;
    let hour_from_now = vip_agent::clock::boot_ns() + 3_600_000_000_000;
    maps.set_vip(VIP_LEASED, VipState::leader_until(hour_from_now)).map_err(e)?;
    let mut lb = Balancer::default();
    // The DSR backends' MAC is this node's own, so that an established flow's output,
    // run again, is the same frame through the same path: a fixed point for `repeat`
    // (the data plane forwards only frames addressed to it).
    let dsr_backends = backends(3, 0x10).into_iter().map(|b| BackendSpec { mac: FibLab::LB_MAC, ..b }).collect();
    let dsr = ServiceSpec { vip: VIP.into(), port: PORT, mode: ForwardMode::Dsr, m: 65537, backends: dsr_backends };
    lb.apply(maps, &dsr).map_err(|e| e.to_string())?;
    let ipip =
        ServiceSpec { vip: VIP_IPIP.into(), port: PORT, mode: ForwardMode::Ipip, m: 65537, backends: backends(3, 0) };
    lb.apply(maps, &ipip).map_err(|e| e.to_string())?;
    // The same backends with their next hop resolved (as the agent's checks do): no
    // FIB lookup per packet. Other addresses, since backend entries are per address.
    let gateway = vip_agent::netlink::Nexthop { mac: FibLab::GATEWAY_MAC, mtu: 1500 };
    let resolved = (1..=3)
        .map(|i| BackendSpec { nexthop: Some(gateway), ..BackendSpec::up(Ipv4Addr::new(10, 77, 0, 20 + i), [0; 6]) })
        .collect();
    let ipip_nh =
        ServiceSpec { vip: VIP_IPIP_NH.into(), port: PORT, mode: ForwardMode::Ipip, m: 65537, backends: resolved };
    lb.apply(maps, &ipip_nh).map_err(|e| e.to_string())?;
    let dsr6 = ServiceSpec { vip: VIP6.into(), ..dsr.clone() };
    lb.apply(maps, &dsr6).map_err(|e| e.to_string())?;
    let leased = ServiceSpec { vip: VIP_LEASED.into(), ..dsr };
    lb.apply(maps, &leased).map_err(|e| e.to_string())?;
    Ok(())
}

/// One result row: name, single ns, repeat ns.
type Measured = (&'static str, f64, Option<Beside>);

fn xdp_table() -> Result<(), String> {
    let fib = FibLab::new()?;
    // One CPU, the last, for every run: the figures move less, and Katran's are taken so.
    let cpu = nproc() - 1;
    let (out, logged) = fib.lb.within(|| -> Result<(Vec<Measured>, Vec<Measured>), String> {
        tests::run_on_cpu(cpu);
        let ifindex = vip_agent::netdev::lookup("lb0").map_err(|e| e.to_string())?.ifindex;
        let mut dp = Dataplane::load().map_err(|e| format!("{e:#?} (the benchmark needs root)"))?;
        dp.load_tcx().map_err(|e| format!("{e:#?}"))?;
        seed(&mut dp)?;
        let arp_for = |tpa| Frame::arp(BROADCAST, CLIENT_MAC, &Arp::request(CLIENT_MAC, CLIENT, tpa)).padded();
        // A solicitation as hosts send it: to the target's solicited-node group, with the
        // sender's link-layer address (the advertisement has the same length).
        let ns_for = |target| {
            let group = solicited_node(target);
            let msg = ns_message(target, &[&ll_option(1, CLIENT_MAC)]);
            Frame::new(ipv6_multicast_mac(group), CLIENT_MAC, ETH_P_IPV6, icmpv6(CLIENT6, group, 255, &msg)).bytes()
        };
        let to = |dst, flags| {
            Frame::new(NODE_MAC, CLIENT_MAC, ETH_P_IPV4, ipv4(CLIENT, dst, 6, &tcp(40000, PORT, flags))).bytes()
        };
        // An established flow's frame whose DSR output is itself: sent from the node's
        // own MAC (the source DSR writes) to it (the backends' MAC here), so every run
        // takes the connection-table hit of a flow pinned from that MAC.
        let established =
            |dst| Frame::new(NODE_MAC, NODE_MAC, ETH_P_IPV4, ipv4(CLIENT, dst, 6, &tcp(40000, PORT, TCP_ACK))).bytes();
        let established6 = {
            let mut p = vec![0x60, 0, 0, 0, 0, 20, 6, 64];
            p.extend(CLIENT6.octets());
            p.extend(VIP6.octets());
            p.extend(tcp(40000, PORT, TCP_ACK));
            Frame::new(NODE_MAC, NODE_MAC, ETH_P_IPV6, p).bytes()
        };
        let rows = [
            Row {
                name: "xdp_pass (floor)",
                program: Program::Pass,
                frames: Frames::Same(to(VIP, TCP_ACK)),
                fixed_point: true,
                expect_action: 2,
                ingress: None,
            },
            Row {
                name: "ARP reply (leader)",
                program: Program::Vip,
                frames: Frames::Same(arp_for(VIP)),
                fixed_point: false,
                expect_action: 3,
                ingress: None,
            },
            Row {
                name: "ARP drop (follower)",
                program: Program::Vip,
                frames: Frames::Same(arp_for(FOLLOWED)),
                fixed_point: true,
                expect_action: 1,
                ingress: None,
            },
            Row {
                name: "NS reply (IPv6 leader)",
                program: Program::Vip,
                frames: Frames::Same(ns_for(VIP6)),
                fixed_point: false,
                expect_action: 3,
                ingress: None,
            },
            Row {
                name: "NS drop (IPv6 follower)",
                program: Program::Vip,
                frames: Frames::Same(ns_for(FOLLOWED6)),
                fixed_point: true,
                expect_action: 1,
                ingress: None,
            },
            Row {
                name: "TCP pass, not a VIP",
                program: Program::Vip,
                frames: Frames::Same(to(Ipv4Addr::new(10, 0, 0, 1), TCP_ACK)),
                fixed_point: true,
                expect_action: 2,
                ingress: None,
            },
            Row {
                name: "SYN, new flow (DSR)",
                program: Program::Vip,
                frames: Frames::NewFlows,
                fixed_point: false,
                expect_action: 3,
                ingress: None,
            },
            Row {
                name: "established flow (DSR)",
                program: Program::Vip,
                frames: Frames::Same(established(VIP)),
                fixed_point: true,
                expect_action: 3,
                ingress: None,
            },
            Row {
                name: "established flow, IPv6 (DSR)",
                program: Program::Vip,
                frames: Frames::Same(established6.clone()),
                fixed_point: true,
                expect_action: 3,
                ingress: None,
            },
            Row {
                name: "established (Lease leader)",
                program: Program::Vip,
                frames: Frames::Same(established(VIP_LEASED)),
                fixed_point: true,
                expect_action: 3,
                ingress: None,
            },
            // The same paths through the tcx program (`--attach tcx`), run as an skb.
            Row {
                name: "ARP reply (leader), tcx",
                program: Program::Tcx,
                frames: Frames::Same(arp_for(VIP)),
                fixed_point: false,
                expect_action: 3,
                ingress: None,
            },
            Row {
                name: "TCP pass, not a VIP, tcx",
                program: Program::Tcx,
                frames: Frames::Same(to(Ipv4Addr::new(10, 0, 0, 1), TCP_ACK)),
                fixed_point: true,
                expect_action: 2,
                ingress: None,
            },
            Row {
                name: "established (DSR), tcx",
                program: Program::Tcx,
                frames: Frames::Same(established(VIP)),
                fixed_point: true,
                expect_action: 3,
                ingress: None,
            },
            Row {
                name: "IPIP, FIB lookup",
                program: Program::Vip,
                frames: Frames::Same(to(VIP_IPIP, TCP_ACK)),
                fixed_point: false,
                expect_action: 3,
                ingress: Some(ifindex),
            },
            Row {
                name: "IPIP, resolved next hop",
                program: Program::Vip,
                frames: Frames::Same(to(VIP_IPIP_NH, TCP_ACK)),
                fixed_point: false,
                expect_action: 3,
                ingress: Some(ifindex),
            },
        ];
        let runner = dp.runner();
        let mut results = Vec::new();
        for row in &rows {
            results.push((row.name, single(&runner, row)?, repeated(&runner, row)?));
        }
        // The same program loaded with its debug log on, a reader draining the records:
        // the established path has no log call, a rare verdict writes one record.
        let mut dp_log = Dataplane::load_with_log(true).map_err(|e| format!("{e:#?}"))?;
        seed(&mut dp_log)?;
        let mut log = dp_log.take_log().ok_or("the data plane's debug log is not available")?;
        let malformed = {
            let mut f = to(VIP, TCP_ACK);
            f.truncate(14 + 20 + 10);
            f[16..18].copy_from_slice(&30u16.to_be_bytes());
            let c = tests::frames::inet_checksum(&{
                let mut h = f[14..34].to_vec();
                h[10..12].copy_from_slice(&[0, 0]);
                h
            });
            f[24..26].copy_from_slice(&c.to_be_bytes());
            f
        };
        let log_rows = [
            Row {
                name: "established (DSR), log on",
                program: Program::Vip,
                frames: Frames::Same(established(VIP)),
                fixed_point: true,
                expect_action: 3,
                ingress: None,
            },
            Row {
                name: "TCP malformed, log off",
                program: Program::Vip,
                frames: Frames::Same(malformed.clone()),
                fixed_point: true,
                expect_action: 2,
                ingress: None,
            },
        ];
        let mut logged = Vec::new();
        for row in &log_rows[1..] {
            logged.push((row.name, single(&runner, row)?, repeated(&runner, row)?));
        }
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|scope| -> Result<(), String> {
            scope.spawn(|| {
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    log.flush();
                    std::thread::sleep(Duration::from_micros(200));
                }
            });
            let runner = dp_log.runner();
            let result = (|| {
                logged.push((log_rows[0].name, single(&runner, &log_rows[0])?, repeated(&runner, &log_rows[0])?));
                let on = Row { name: "TCP malformed, log on", fixed_point: false, ..log_rows[1].clone() };
                logged.push((on.name, single(&runner, &on)?, None));
                Ok(())
            })();
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            result
        })?;
        Ok((results, logged))
    })??;

    let floor_single = out[0].1;
    println!("XDP per-packet cost via BPF_PROG_RUN (on CPU {cpu} of {}, kernel {})", nproc(), kernel());
    println!(
        "single = mean of the middle half of {SINGLE_RUNS} one-frame runs; repeat = median of {REPEAT_ROUNDS} kernel averages over {REPEAT} runs of one frame; + floor = median of those averages minus the floor's taken just before each"
    );
    println!("{:<30} {:>10} {:>8} {:>10} {:>8}", "path", "single ns", "x floor", "repeat ns", "+ floor");
    for (name, single, repeat) in out.iter().chain(&logged) {
        let (rep, over) = match repeat {
            Some(r) => (format!("{:.1}", r.ns), format!("{:.1}", r.over_floor)),
            None => ("-".into(), "-".into()),
        };
        println!("{name:<30} {single:>10.1} {:>8.2} {rep:>10} {over:>8}", single / floor_single);
    }
    Ok(())
}

fn maglev_table() {
    println!("\nMaglev table build, M = 65537 (release build; Maglev paper: 1.8 ms at M = 65537)");
    println!("{:>10} {:>12} {:>12}", "backends", "median ms", "min ms");
    for n in [3usize, 7, 100, 1000] {
        let names: Vec<String> = (0..n).map(|i| format!("10.{}.{}.{}", i / 65536, (i / 256) % 256, i % 256)).collect();
        let w: Vec<Weighted<'_>> = names.iter().map(|name| Weighted { name, weight: 1 }).collect();
        let runs = if n >= 1000 { 15 } else { 41 };
        let mut ms: Vec<f64> = (0..runs)
            .map(|_| {
                let t = Instant::now();
                let table = maglev::build(&w, 65537).expect("valid input");
                let el = t.elapsed().as_secs_f64() * 1e3;
                std::hint::black_box(table);
                el
            })
            .collect();
        ms.sort_by(f64::total_cmp);
        println!("{n:>10} {:>12.3} {:>12.3}", ms[ms.len() / 2], ms[0]);
    }
}

/// The control plane at the data plane's limits: 16 services (the maximum) over N
/// backends, written by the Balancer into a loaded data plane (Maglev build, table write,
/// flip, grace periods: what the agent pays on a change), first from empty, then after
/// one backend went down (every service rebuilt).
fn scale_table() -> Result<(), String> {
    println!(
        "\nScale: 16 services x N backends through the Balancer into the maps (M = 65537, default grace; release)"
    );
    println!("{:>9} {:>16} {:>22} {:>14}", "backends", "first apply ms", "one backend down ms", "per service ms");
    for n in [3u32, 100, 1000] {
        let mut dp = Dataplane::load().map_err(|e| format!("{e:#?} (the benchmark needs root)"))?;
        let mut lb = Balancer::default();
        let mut backends: Vec<BackendSpec> = (0..n)
            .map(|i| {
                let ip = Ipv4Addr::new(10, 200, (i / 256) as u8, (i % 256) as u8);
                BackendSpec::up(ip, [0x02, 0, 0, 0, (i / 256) as u8, (i % 256) as u8])
            })
            .collect();
        let services = |backends: &[BackendSpec]| -> Vec<ServiceSpec> {
            (0..16u8)
                .map(|s| ServiceSpec {
                    vip: Ipv4Addr::new(10, 255, 0, 1 + s).into(),
                    port: PORT,
                    mode: ForwardMode::Dsr,
                    m: 65537,
                    backends: backends.to_vec(),
                })
                .collect()
        };
        let apply_all = |dp: &mut Dataplane, lb: &mut Balancer, specs: &[ServiceSpec]| -> Result<f64, String> {
            // As the agent applies its services: all at once, each grace period once.
            let t = Instant::now();
            lb.apply_all(dp.maps_mut(), specs).map_err(|e| e.to_string())?;
            Ok(t.elapsed().as_secs_f64() * 1e3)
        };
        let first = apply_all(&mut dp, &mut lb, &services(&backends))?;
        backends[0].healthy = false;
        let change = apply_all(&mut dp, &mut lb, &services(&backends))?;
        println!("{n:>9} {first:>16.1} {change:>22.1} {:>14.1}", change / 16.0);
    }
    Ok(())
}

/// Resident memory (KiB) and CPU ticks (user + system) of process `pid`.
fn proc_usage(pid: u32) -> Result<(u64, u64), String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| e.to_string())?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or("no VmRSS")?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| e.to_string())?;
    let after = stat.rsplit_once(')').ok_or("bad stat")?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = f.get(11).and_then(|u| u.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
    Ok((rss, ticks))
}

/// Process `pid`'s resident memory (KiB) at the end of `window`, and its CPU over the
/// window in % of one core, after `settle`.
fn steady_usage(pid: u32, settle: Duration, window: Duration) -> Result<(u64, f64), String> {
    std::thread::sleep(settle);
    let (_, t0) = proc_usage(pid)?;
    std::thread::sleep(window);
    let (rss, t1) = proc_usage(pid)?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok((rss, (t1 - t0) as f64 / hz / window.as_secs_f64() * 100.0))
}

fn agent_table() -> Result<(), String> {
    use tests::{
        agent::wait_until,
        apilab::{ApiLab, FALL, HEALTH_INTERVAL},
    };
    println!("\nvip-agent on a node (3 backends, HTTPS /readyz checks, DSR; release build)");
    let mut lab = ApiLab::new([10, 61, 0], 3, &[0])?;
    // Default timing (1 s interval, rise 2, fall 3) for the idle figures.
    let mut agent = lab.start_agent(0, &["--health-interval", "1s", "--health-timeout", "1s", "--fall", "3"])?;
    let pid = agent.pid().ok_or("no pid")?;
    let window = Duration::from_secs(20);
    let (rss, cpu) = steady_usage(pid, Duration::from_secs(2), window)?;
    println!("{:<44} {:>10}", "resident memory (VmRSS)", format!("{:.1} MiB", rss as f64 / 1024.0));
    println!("{:<44} {:>10}", format!("idle CPU over {} s (1 s checks)", window.as_secs()), format!("{cpu:.2} %"));
    agent.stop(libc::SIGTERM, Duration::from_secs(5))?;

    // Removal time with the lab's fast timing, median of 5 trials.
    let _agent = lab.start_agent(0, &[])?;
    let mut ms = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        lab.stop_apiserver(2);
        if !wait_until(Duration::from_secs(5), || lab.backend_healthy(0, 2) == Some(false)) {
            return Err("backend never left the table".into());
        }
        ms.push(t.elapsed().as_millis());
        lab.start_apiserver(2)?;
        if !wait_until(Duration::from_secs(5), || lab.backend_healthy(0, 2) == Some(true)) {
            return Err("backend never came back".into());
        }
    }
    ms.sort_unstable();
    println!(
        "{:<44} {:>10}   (interval {} ms, fall {FALL}: bound {} ms; trials {:?})",
        "stopped apiserver out of the table, median",
        format!("{} ms", ms[2]),
        HEALTH_INTERVAL.as_millis(),
        (HEALTH_INTERVAL * (FALL + 1)).as_millis(),
        ms
    );
    Ok(())
}

/// The agent with many discovered apiservers: `n` endpoints in the EndpointSlice of
/// `default/kubernetes`, every one healthy (node n2 answers on `n - 3` extra addresses of
/// a second subnet besides the three nodes'), HTTPS checks every second with their
/// VIP-path probes, DSR. Reports the time from the slice to a live table holding them
/// all, the agent's memory and CPU in that steady state, and the time a change to the
/// slice (one endpoint out, one in) takes to reach the live table.
fn discovery_table(n: usize, vips: u8) -> Result<(), String> {
    use tests::{agent::wait_until, apilab::ApiLab};
    println!(
        "\nvip-agent with {vips} VIPs and {n} discovered apiservers (HTTPS checks every 1 s, rise 2, DSR; release build)"
    );
    let mut lab = ApiLab::new([10, 63, 0], 3, &[0])?.with_lease_api()?;
    lab.static_backends = false;
    // The lab's VIP and 10.63.0.101 on: a service each, and every backend probed on each
    // VIP's path, so the backends hold them all on `lo`.
    let more_vips: Vec<String> = (1..vips).map(|k| format!("10.63.0.{}", 100 + k)).collect();
    for i in 1..3 {
        for vip in &more_vips {
            lab.ns(i).ip(&["addr", "add", &format!("{vip}/32"), "dev", "lo"])?;
        }
    }
    // 10.63.4.0/22 beside the lab's /24 on every node; n2 holds the extra addresses.
    for i in 0..3 {
        lab.ns(i).ip(&["addr", "add", &format!("10.63.4.{}/22", i + 1), "dev", "eth0"])?;
    }
    let extra: Vec<std::net::Ipv4Addr> = (0..n.saturating_sub(3))
        .map(|k| std::net::Ipv4Addr::from(u32::from_be_bytes([10, 63, 4, 10]) + k as u32))
        .collect();
    let batch: String = extra.iter().map(|a| format!("addr add {a}/32 dev eth0\n")).collect();
    let batch_file = lab.pki.dir.join("extra-addrs.batch");
    std::fs::write(&batch_file, batch).map_err(|e| e.to_string())?;
    lab.ns(1).ip(&["-batch", &batch_file.display().to_string()])?;
    let write_slice = |addrs: &[std::net::Ipv4Addr]| -> Result<(), String> {
        let eps: Vec<serde_json::Value> = lab
            .nodes
            .iter()
            .map(|node| node.ip)
            .chain(addrs.iter().copied())
            .map(|ip| serde_json::json!({"ip": ip.to_string(), "ready": true}))
            .collect();
        let tmp = lab.pki.dir.join("endpoints.json.tmp");
        std::fs::write(&tmp, serde_json::json!({"port": 6443, "endpoints": eps}).to_string())
            .map_err(|e| e.to_string())?;
        std::fs::rename(&tmp, lab.endpoints_file()).map_err(|e| e.to_string())
    };
    let healthy = |lab: &ApiLab| -> Vec<String> {
        lab.status(0)
            .ok()
            .and_then(|s| {
                s["services"][0]["backends"].as_array().map(|bs| {
                    bs.iter()
                        .filter(|b| b["healthy"] == true)
                        .filter_map(|b| b["backend"].as_str().map(str::to_owned))
                        .collect()
                })
            })
            .unwrap_or_default()
    };
    write_slice(&extra)?;
    let kc = lab.pki.dir.join("n1.kubeconfig").display().to_string();
    let mut flags =
        vec!["--discover", "kubernetes", "--kubeconfig", &kc, "--health-interval", "1s", "--health-timeout", "1s"];
    for vip in &more_vips {
        flags.extend(["--vip", vip.as_str()]);
    }
    let args = lab.agent_args(0, &flags)?;
    let t = Instant::now();
    let mut agent = tests::agent::Agent::spawn(lab.ns(0), &args)?;
    let pid = agent.pid().ok_or("no pid")?;
    if !wait_until(Duration::from_secs(120), || healthy(&lab).len() == n) {
        let count = healthy(&lab).len();
        let mut reasons = std::collections::BTreeMap::<String, usize>::new();
        if let Ok(s) = lab.status(0) {
            for b in s["services"][0]["backends"].as_array().into_iter().flatten() {
                *reasons.entry(format!("{}/{}", b["state"], b["reason"])).or_default() += 1;
            }
        }
        let stopped = Instant::now();
        let exit = agent.stop(libc::SIGTERM, Duration::from_secs(60)).map(|(st, _)| st);
        return Err(format!(
            "only {count} of {n} backends healthy after 120 s: {reasons:?}; stop took {:?} ({exit:?})",
            stopped.elapsed()
        ));
    }
    let all_in = t.elapsed();
    let window = Duration::from_secs(20);
    let (rss, cpu) = steady_usage(pid, Duration::from_secs(3), window)?;
    // One endpoint leaves the slice, then a new one joins it. Seen in its
    // `vip_backend_up` series: `status` lists every service's backends (4.9 MB with 16
    // VIPs, up to a second to produce), which made the wait for it most of the figure.
    let gone = extra[0].to_string();
    let up = format!("vip_backend_up{{backend=\"{gone}\"}}");
    let t = Instant::now();
    write_slice(&extra[1..])?;
    if !wait_until(Duration::from_secs(30), || lab.metric(0, &up) != Some(1.0)) {
        return Err("the deregistered endpoint never left the table".into());
    }
    let out_ms = t.elapsed().as_millis();
    let t = Instant::now();
    write_slice(&extra)?;
    if !wait_until(Duration::from_secs(30), || lab.metric(0, &up) == Some(1.0)) {
        return Err("the registered endpoint never joined the table".into());
    }
    let in_ms = t.elapsed().as_millis();
    agent.stop(libc::SIGTERM, Duration::from_secs(10))?;
    println!(
        "{:<52} {:>10}",
        "slice written -> all in the live table (start, rise 2)",
        format!("{:.1} s", all_in.as_secs_f64())
    );
    println!("{:<52} {:>10}", "resident memory (VmRSS)", format!("{:.1} MiB", rss as f64 / 1024.0));
    println!(
        "{:<52} {:>10}",
        format!("CPU over {} s ({n} checks/s, % of one core)", window.as_secs()),
        format!("{cpu:.1} %")
    );
    println!("{:<52} {:>10}", "endpoint removed from the slice -> out of the table", format!("{out_ms} ms"));
    println!("{:<52} {:>10}", "endpoint added to the slice -> healthy in the table", format!("{in_ms} ms"));
    Ok(())
}

/// The first time `mac` answered ARP for `vip` from the client, polling from `from`.
fn wait_arp_answer(lab: &tests::apilab::ApiLab, mac: [u8; 6], from: Instant) -> Option<Duration> {
    let ns = lab.client_ns().name.clone();
    let vip = lab.vip;
    let src = Ipv4Addr::new(vip.octets()[0], vip.octets()[1], vip.octets()[2], 2);
    let deadline = from + Duration::from_secs(8);
    while Instant::now() < deadline {
        let t = Instant::now();
        let ns2 = ns.clone();
        let macs =
            std::thread::spawn(move || tests::netns::arp_probe(&ns2, "eth0", src, vip, Duration::from_millis(20)))
                .join()
                .ok()?
                .ok()?;
        if macs.contains(&mac) {
            return Some(t - from);
        }
    }
    None
}

fn failover_table() -> Result<(), String> {
    use tests::{agent::wait_until, apilab::ApiLab};
    println!("\nfailover with --election kubernetes (defaults: lease 1s, renew deadline 600ms, retry 200ms), 3 nodes");
    println!(
        "ARP = until the new leader answers ARP; outage = first failed to first successful request through the VIP"
    );
    println!("{:<34} {:>12} {:>12} {:>10}   trials (ARP ms)", "event", "ARP median", "outage med", "failed");
    let lab = ApiLab::new([10, 62, 0], 3, &[0, 1, 2])?.with_lease_api()?;
    let mut agents: Vec<Option<tests::agent::Agent>> = lab.start_agents(&[0, 1, 2])?.into_iter().map(Some).collect();
    let single_leader = |lab: &ApiLab| wait_until(Duration::from_secs(10), || lab.leaders().len() == 1);
    for event in
        ["SIGKILL of the agent", "SIGTERM of the agent", "apiserver unready", "node loss (SIGKILL + link down)"]
    {
        let (mut arp, mut outage, mut failed) = (Vec::new(), Vec::new(), 0usize);
        let mut first_error: Option<String> = None;
        for _ in 0..5 {
            if !single_leader(&lab) {
                return Err(format!("{event}: no single leader"));
            }
            let old = lab.leaders()[0];
            let stream = lab.stream();
            std::thread::sleep(Duration::from_millis(300));
            let t = Instant::now();
            match event {
                "apiserver unready" => std::fs::write(lab.unready_file(old), b"").map_err(|e| e.to_string())?,
                _ => {
                    let signal = if event.starts_with("SIGTERM") { libc::SIGTERM } else { libc::SIGKILL };
                    if event.starts_with("node loss") {
                        lab.ns(old).ip(&["link", "set", "eth0", "down"])?;
                    }
                    // Signal without waiting: a SIGTERMed agent drains before it exits,
                    // and the takeover must be measured meanwhile.
                    if let Some(pid) = agents[old].as_ref().and_then(tests::agent::Agent::pid) {
                        // SAFETY: plain kill(2) on our own child.
                        unsafe { libc::kill(pid as i32, signal) };
                    }
                }
            }
            let new = loop {
                if let Some(n) = lab.leaders().into_iter().find(|&l| l != old) {
                    break n;
                }
                if t.elapsed() > Duration::from_secs(8) {
                    return Err(format!("{event}: nobody took over"));
                }
            };
            let new_mac = tests::netns::mac_of(lab.ns(new), "eth0")?;
            arp.push(wait_arp_answer(&lab, new_mac, t).ok_or("the new leader never answered ARP")?.as_millis());
            std::thread::sleep(Duration::from_millis(1500));
            let r = stream.stop();
            outage.push(r.outage().as_millis());
            failed += r.errors.len();
            if let Some(e) = r.errors.first() {
                first_error.get_or_insert_with(|| e.clone());
            }
            // Reap the signalled agent (it has exited, or is finishing its drain).
            if event != "apiserver unready" {
                if let Some(mut a) = agents[old].take() {
                    a.stop(0, Duration::from_secs(5))?;
                }
            }
            // Put the old leader back as a follower.
            match event {
                "apiserver unready" => std::fs::remove_file(lab.unready_file(old)).map_err(|e| e.to_string())?,
                _ => {
                    if event.starts_with("node loss") {
                        lab.ns(old).ip(&["link", "set", "eth0", "up"])?;
                        let _ = std::fs::remove_dir_all(lab.pin_path(old)?);
                    }
                    agents[old] = Some(lab.start_agent(old, &[])?);
                }
            }
        }
        let med = |v: &mut Vec<u128>| {
            v.sort_unstable();
            v[v.len() / 2]
        };
        let trials = arp.clone();
        println!("{event:<34} {:>9} ms {:>9} ms {failed:>10}   {trials:?}", med(&mut arp), med(&mut outage));
        if let Some(e) = first_error {
            println!("{:<34} first failure: {e}", "");
        }
    }
    Ok(())
}

/// One node's BGP speaker in the BGP bench: vip-agent, or FRR's bgpd announcing the
/// VIP with local delivery only (what kube-vip and MetalLB do in BGP mode).
enum NodeSpeaker {
    Vip(tests::agent::Agent),
    Plain(tests::routers::Frr),
}

impl NodeSpeaker {
    fn terminate(&self) {
        match self {
            NodeSpeaker::Vip(a) => a.signal(libc::SIGTERM),
            NodeSpeaker::Plain(f) => f.signal_bgpd(libc::SIGTERM),
        }
    }
}

fn start_speaker(lab: &tests::apilab::ApiLab, i: usize, vip_agent: bool) -> Result<NodeSpeaker, String> {
    let peer = "10.65.0.1";
    if vip_agent {
        let args =
            ["--mode", "bgp", "--bgp-local-as", "65000", "--bgp-peer", "10.65.0.1:65001", "--bgp-hold-time", "3s"];
        return lab.spawn_agent(i, &args).map(NodeSpeaker::Vip);
    }
    let commands: Vec<String> = [
        "router bgp 65000".to_owned(),
        format!("bgp router-id {}", lab.nodes[i].ip),
        "no bgp ebgp-requires-policy".to_owned(),
        format!("neighbor {peer} remote-as 65001"),
        format!("neighbor {peer} timers 1 3"),
        "address-family ipv4 unicast".to_owned(),
        format!("network {}/32", lab.vip),
    ]
    .into();
    let dir = std::env::temp_dir().join(format!("vip-bench-frr-{}-{i}", lab.lab.tag));
    tests::routers::Frr::start_with(lab.ns(i), &dir, &commands).map(NodeSpeaker::Plain)
}

/// BGP mode beside a plain speaker, in one run: withdraw time at the router after a
/// speaker's SIGTERM and after the apiserver turns unready, and what clients see when a
/// node is cut off (requests failing while the router waits for the hold time, kept-alive
/// connections to surviving apiservers broken).
fn bgp_table() -> Result<(), String> {
    use tests::{
        agent::wait_until,
        apilab::ApiLab,
        routers::{nexthops, Frr, Neighbor},
    };
    println!(
        "
BGP: FRR 8.4 router (ECMP, layer-4 hash) in front of 3 nodes, hold time 3 s; 40 kept-alive connections"
    );
    println!(
        "{:<44} {:>10} {:>10} {:>10} {:>8} {:>14}",
        "node speaker", "SIGTERM", "unready", "node lost", "failed", "broken (alive)"
    );
    for vip_agent in [true, false] {
        let lab = ApiLab::routed([10, 65, 0], 3)?;
        let neighbors: Vec<Neighbor> =
            lab.nodes.iter().map(|n| Neighbor { ip: n.ip, asn: 65000, password: None }).collect();
        let router_dir = std::env::temp_dir().join(format!("vip-bench-router-{}", lab.lab.tag));
        let router = Frr::start(lab.router_ns(), &router_dir, 65001, Ipv4Addr::new(10, 65, 0, 1), &neighbors)?;
        if !vip_agent {
            for n in &lab.nodes {
                lab.lab.host(&n.name).hold_vip_quietly(lab.vip)?;
            }
        }
        let mut speakers: Vec<Option<NodeSpeaker>> =
            (0..3).map(|i| start_speaker(&lab, i, vip_agent).map(Some)).collect::<Result<_, _>>()?;
        let hops = |n: usize, within: Duration| wait_until(within, || nexthops(lab.router_ns(), lab.vip).len() == n);
        if !hops(3, Duration::from_secs(20)) {
            return Err(format!(
                "three paths never came up: {:?}\n{}",
                nexthops(lab.router_ns(), lab.vip),
                router.vtysh(&["show ip bgp summary".to_owned(), "show ip bgp".to_owned()]).unwrap_or_else(|e| e)
            ));
        }
        if vip_agent {
            for i in 0..3 {
                lab.wait_all_healthy(i)?;
            }
        }
        // Unready apiserver: only vip-agent gates its announcement on it.
        let unready = if vip_agent {
            let t = Instant::now();
            std::fs::write(lab.unready_file(0), b"").map_err(|e| e.to_string())?;
            let took = hops(2, Duration::from_secs(5)).then(|| format!("{} ms", t.elapsed().as_millis()));
            std::fs::remove_file(lab.unready_file(0)).map_err(|e| e.to_string())?;
            hops(3, Duration::from_secs(10));
            took.unwrap_or_else(|| "never".into())
        } else {
            "not gated".to_owned()
        };
        // SIGTERM of node 1's speaker.
        let t = Instant::now();
        if let Some(s) = &speakers[1] {
            s.terminate();
        }
        let sigterm = hops(2, Duration::from_secs(5)).then(|| t.elapsed().as_millis());
        speakers[1] = None;
        std::thread::sleep(Duration::from_millis(500));
        speakers[1] = Some(start_speaker(&lab, 1, vip_agent)?);
        hops(3, Duration::from_secs(20));
        if vip_agent {
            lab.wait_all_healthy(1)?;
        }
        // Node 2 cut off: kept-alive connections and a stream of new ones.
        let vip = std::net::SocketAddr::from((lab.vip, 6443));
        let mut client = lab.client.clone();
        client.timeout = Duration::from_secs(10);
        let ns = lab.client_ns().name.clone();
        let mut conns = std::thread::scope(|s| {
            s.spawn(|| -> Result<Vec<_>, String> {
                tests::netns::enter_by_name(&ns)?;
                (0..40)
                    .map(|_| {
                        let mut c = client.connect(vip)?;
                        let (_, body) = c.get("/")?;
                        Ok((c, body.trim().to_owned()))
                    })
                    .collect()
            })
            .join()
            .map_err(|_| "client thread panicked".to_string())?
        })?;
        let stream = lab.stream();
        let t = Instant::now();
        lab.lab.switch.ip(&["link", "set", "p13", "down"])?;
        let lost = hops(2, Duration::from_secs(8)).then(|| t.elapsed().as_millis());
        std::thread::sleep(Duration::from_millis(1000));
        let failed = stream.stop().errors.len();
        let results = std::thread::scope(|s| {
            s.spawn(|| -> Result<Vec<bool>, String> {
                tests::netns::enter_by_name(&ns)?;
                Ok(conns
                    .iter_mut()
                    .filter(|(_, b)| b != "n3")
                    .map(|(c, b)| c.get("/").is_ok_and(|(_, got)| got.trim() == b))
                    .collect())
            })
            .join()
            .map_err(|_| "client thread panicked".to_string())?
        })?;
        let broken = results.iter().filter(|ok| !**ok).count();
        let name = if vip_agent {
            "vip-agent --mode bgp (DSR, same Maglev everywhere)"
        } else {
            "FRR bgpd per node (local delivery)"
        };
        let ms = |v: Option<u128>| v.map_or("never".to_owned(), |m| format!("{m} ms"));
        println!(
            "{name:<44} {:>10} {unready:>10} {:>10} {failed:>8} {:>14}",
            ms(sigterm),
            ms(lost),
            format!("{broken} of {}", results.len())
        );
        drop(speakers);
    }
    Ok(())
}

fn main() -> Result<(), String> {
    // `cargo xtask bench -- [xdp] [maglev] [agent] [failover] [bgp] [scale] [discovery]`: the sections to run
    // (all by default).
    let only: Vec<String> = std::env::args().skip(1).collect();
    let run = |name: &str| only.is_empty() || only.iter().any(|o| o == name);
    if run("xdp") {
        xdp_table()?;
    }
    if run("maglev") {
        maglev_table();
    }
    if run("agent") {
        agent_table()?;
    }
    if run("failover") {
        failover_table()?;
    }
    if run("bgp") {
        bgp_table()?;
    }
    if run("scale") {
        scale_table()?;
    }
    if run("discovery") {
        let n = std::env::var("VIPBENCH_DISCOVERED").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
        // 16: as many as a node serves (`vip_common::MAX_VIPS`).
        let vips = std::env::var("VIPBENCH_VIPS").ok().and_then(|v| v.parse().ok()).unwrap_or(16);
        discovery_table(n, vips)?;
    }
    Ok(())
}

fn nproc() -> usize {
    std::thread::available_parallelism().map(usize::from).unwrap_or(1)
}

fn kernel() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_owned()).unwrap_or_default()
}
