//! `cargo xtask bench -- katran`: vip's data plane beside Katran's balancer, per packet,
//! in one run, on byte-identical frames, through `BPF_PROG_RUN` on the CPU the caller
//! pinned (xtask runs this under `taskset -c 1`).
//!
//! Katran is facebookincubator/katran at the commit xtask names (19f08fe), `katran/lib/bpf/balancer.bpf.c`
//! built by xtask as its `Makefile-bpf` builds it (clang `-O2`, `llc -march=bpf`), loaded
//! by `bpftool prog loadall` (it holds a map of maps, which our loader does not create),
//! and configured as `KatranLb` configures it: the default router's MAC in `ctl_array`,
//! each VIP in `vip_map`, the reals, a consistent-hash ring of [`RING_SIZE`] slots
//! (filled from our own Maglev table over the same backends, so both spread flows alike),
//! and a connection table (LRU) per forwarding core in `lru_mapping` (the global
//! `fallback_cache` is for unit tests only, says Katran). Katran forwards by IPIP only.
//!
//! Usage: `vip-katran KATRAN_OBJECT [COMMIT]` (root). Prints one table; asserts nothing.

use std::{
    borrow::Cow,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
};

use aya::{
    maps::{Array, HashMap, Map, MapData},
    programs::{TestRun, TestRunOptions, Xdp},
};
use aya_obj::programs::XdpAttachType;
use tests::{
    frames::{ipv4, tcp, Frame, ETH_P_IPV4, TCP_ACK, TCP_SYN},
    lab::FibLab,
    perpacket::{fixed_point_repeat, single_ns, REPEAT, REPEAT_ROUNDS, SINGLE_RUNS},
};
use vip_agent::{
    balancer::{BackendSpec, Balancer, ServiceSpec},
    dataplane::{Dataplane, Program, RunOutcome, Runner},
    maglev::{self, Weighted},
    netlink::Nexthop,
};
use vip_common::{Config, ForwardMode, VipState, MAX_CONNS};

/// Katran's consistent-hash ring per VIP (`RING_SIZE` in `balancer_consts.h`), which is
/// also our Maglev table size: M = 65537 on both sides.
const RING_SIZE: u32 = 65_537;
const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xc1];
const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 10);
/// A VIP balanced by DSR on vip's side; by IPIP on Katran's, its only mode.
const VIP_DSR: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);
/// A VIP balanced by IPIP on both sides, to backends behind the lab's gateway whose next
/// hop vip's agent resolved (Katran sends every IPIP packet to its default router).
const VIP_IPIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 104);
const PORT: u16 = 6443;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

/// Katran's `struct flow_key` (two 16-byte address unions, the ports, the protocol,
/// padded to 40) and `struct real_pos_lru` (`u32` position, `u64` access time): the
/// per-core LRUs' key and value sizes, which `lru_mapping`'s inner map fixes.
const FLOW_KEY_LEN: u32 = 40;
const REAL_POS_LRU_LEN: u32 = 16;

/// Katran's balancer, loaded and pinned under a directory of its own on bpffs (removed
/// on drop, with the maps and the per-core LRUs).
struct Katran {
    dir: PathBuf,
    prog: Xdp,
    /// The reals configured: every frame Katran sends must be encapsulated to one.
    reals: Vec<Ipv4Addr>,
}

impl Drop for Katran {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs `bpftool` with `args`; its stderr on failure.
fn bpftool(args: &[&str]) -> Result<(), String> {
    let out =
        Command::new("bpftool").args(args).output().map_err(|e| format!("bpftool: {e} (apt-get install bpftool)"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("bpftool {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl Katran {
    /// Loads `object` and gives each of `cpus` its connection table of `lru_entries` flows.
    fn load(object: &Path, cpus: &[usize], lru_entries: u32) -> Result<Self, String> {
        let dir = PathBuf::from(format!("/sys/fs/bpf/vip-katran-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).map_err(|e| format!("{}: {e} (is bpffs mounted on /sys/fs/bpf?)", dir.display()))?;
        let path = |p: &str| dir.join(p).display().to_string();
        let loaded = (|| {
            let object = object.to_str().ok_or("object path is not UTF-8")?;
            bpftool(&["prog", "loadall", object, &path("progs"), "type", "xdp", "pinmaps", &path("maps")])?;
            for &cpu in cpus {
                let lru = path(&format!("lru{cpu}"));
                let (key, value, entries) =
                    (FLOW_KEY_LEN.to_string(), REAL_POS_LRU_LEN.to_string(), lru_entries.to_string());
                let name = format!("katran_lru{cpu}");
                bpftool(&[
                    "map", "create", &lru, "type", "lru_hash", "key", &key, "value", &value, "entries", &entries,
                    "name", &name,
                ])?;
                let index: Vec<String> = (cpu as u32).to_le_bytes().iter().map(u8::to_string).collect();
                let mut args = vec!["map", "update", "pinned"];
                let mapping = path("maps/lru_mapping");
                args.push(&mapping);
                args.push("key");
                args.extend(index.iter().map(String::as_str));
                args.extend(["value", "pinned", &lru]);
                bpftool(&args)?;
            }
            Xdp::from_pin(path("progs/balancer_ingress"), XdpAttachType::Interface).map_err(|e| format!("{e:?}"))
        })();
        match loaded {
            Ok(prog) => Ok(Katran { dir, prog, reals: Vec::new() }),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }

    fn map(&self, name: &str) -> Result<Map, String> {
        let data = MapData::from_pin(self.dir.join("maps").join(name)).map_err(|e| format!("{name}: {e:?}"))?;
        Map::from_map_data(data).map_err(|e| format!("{name}: {e:?}"))
    }

    /// Configures it as `KatranLb` would: `gateway` as the default router's MAC
    /// (`ctl_array[0]`), each of `vips` as VIP number 0 (one ring), `reals` as real
    /// numbers 1.. (Katran keeps 0 unused), and the ring from `table` (indices into
    /// `reals`).
    fn configure(
        &mut self,
        gateway: [u8; 6],
        vips: &[Ipv4Addr],
        reals: &[Ipv4Addr],
        table: &[u32],
    ) -> Result<(), String> {
        self.reals = reals.to_vec();
        let e = |e: aya::maps::MapError| format!("{e:?}");
        let mut ctl: Array<_, [u8; 8]> = self.map("ctl_array")?.try_into().map_err(e)?;
        let mut mac = [0u8; 8];
        mac[..6].copy_from_slice(&gateway);
        ctl.set(0, mac, 0).map_err(e)?;
        // struct vip_definition { union { __be32 vip; __be32 vipv6[4]; }; __u16 port; __u8 proto; } (20)
        // -> struct vip_meta { __u32 flags; __u32 vip_num; }: no flags, ring 0.
        let mut vip_map: HashMap<_, [u8; 20], [u8; 8]> = self.map("vip_map")?.try_into().map_err(e)?;
        for vip in vips {
            let mut key = [0u8; 20];
            key[..4].copy_from_slice(&vip.octets());
            key[16..18].copy_from_slice(&PORT.to_be_bytes());
            key[18] = 6;
            vip_map.insert(key, [0u8; 8], 0).map_err(e)?;
        }
        // struct real_definition { union { __be32 dst; __be32 dstv6[4]; }; __u8 flags; } (20)
        let mut real_map: Array<_, [u8; 20]> = self.map("reals")?.try_into().map_err(e)?;
        for (i, real) in reals.iter().enumerate() {
            let mut value = [0u8; 20];
            value[..4].copy_from_slice(&real.octets());
            real_map.set(i as u32 + 1, value, 0).map_err(e)?;
        }
        let mut ring: Array<_, u32> = self.map("ch_rings")?.try_into().map_err(e)?;
        for (slot, &real) in table.iter().enumerate() {
            ring.set(slot as u32, real + 1, 0).map_err(e)?;
        }
        Ok(())
    }

    fn run(&self, frame: &[u8], repeat: u32) -> Result<RunOutcome, String> {
        // Room for the outer header Katran pushes.
        let mut out = vec![0u8; frame.len() + 256];
        let opts = TestRunOptions { data_in: Some(frame), data_out: Some(&mut out), repeat, ..Default::default() };
        let res = self.prog.test_run(opts).map_err(|e| format!("Katran BPF_PROG_RUN: {e:?}"))?;
        out.truncate(res.data_size_out as usize);
        // What it sends must be what it is measured for: IPv4-in-IPv4 to a real.
        if res.return_value == XDP_TX {
            let outer_dst = out.get(30..34).map(|d| Ipv4Addr::new(d[0], d[1], d[2], d[3]));
            let ipip = out.get(12..14) == Some(&[0x08, 0x00][..]) && out.get(23) == Some(&4);
            if !ipip || !outer_dst.is_some_and(|d| self.reals.contains(&d)) {
                return Err(format!(
                    "Katran sent a frame that is not IPIP to a real: {:02x?}",
                    &out[..out.len().min(40)]
                ));
            }
        }
        Ok(RunOutcome { action: res.return_value, frame: out, duration: res.duration, meta: 0 })
    }
}

/// Which program runs a row's frames.
#[derive(Clone, Copy)]
enum Side<'a> {
    Vip(&'a Runner<'a>, Program, Option<u32>),
    Katran(&'a Katran),
}

impl Side<'_> {
    fn run(&self, frame: &[u8], repeat: u32) -> Result<RunOutcome, String> {
        match self {
            Side::Vip(runner, program, ingress) => {
                runner.run_opts(*program, frame, repeat, *ingress).map_err(|e| format!("{e:?}"))
            }
            Side::Katran(k) => k.run(frame, repeat),
        }
    }
}

/// How a row produces its frames.
#[derive(Clone, Copy)]
enum Frames<'a> {
    /// The same frame every run (run once first: a connection-table hit afterwards).
    Same(&'a [u8]),
    /// A new flow (SYN from another source) to this VIP every run.
    NewFlows(Ipv4Addr),
    /// The flows [`Frames::NewFlows`] pinned, one after the other (an ACK each): more
    /// flows than vip's per-CPU flow cache holds, so both sides look their connection
    /// table up.
    PinnedFlows(Ipv4Addr),
}

fn syn_from(i: u32, vip: Ipv4Addr) -> Vec<u8> {
    segment_from(i, vip, TCP_SYN)
}

fn segment_from(i: u32, vip: Ipv4Addr, flags: u8) -> Vec<u8> {
    let src = Ipv4Addr::from(0x0a10_0000 + i);
    let seg = tcp(1024 + (i % 60000) as u16, PORT, flags);
    Frame::new(FibLab::LB_MAC, CLIENT_MAC, ETH_P_IPV4, ipv4(src, vip, 6, &seg)).bytes()
}

/// The single figure (`perpacket::single_ns`), and the kernel's average over [`REPEAT`]
/// runs where the output is a fixed point (checked: run again, the same output and
/// action).
fn measure(side: Side<'_>, frames: Frames<'_>, want: u32) -> Result<(f64, Option<f64>), String> {
    let run = |frame: &[u8], repeat| side.run(frame, repeat);
    if let Frames::Same(frame) = frames {
        run(frame, 1)?;
    }
    let frame_at = |i: usize| match frames {
        Frames::Same(f) => Cow::Borrowed(f),
        Frames::NewFlows(vip) => Cow::Owned(syn_from(i as u32, vip)),
        Frames::PinnedFlows(vip) => Cow::Owned(segment_from(i as u32, vip, TCP_ACK)),
    };
    let single = single_ns(run, frame_at, want)?;
    let repeat = match frames {
        Frames::Same(frame) => fixed_point_repeat(run, frame, want)?,
        Frames::NewFlows(_) | Frames::PinnedFlows(_) => None,
    };
    Ok((single, repeat))
}

/// Fills vip's maps: the node, both VIPs led, a DSR service whose backends' MAC is the
/// node's own (so an established flow's output is itself: a fixed point for `repeat`),
/// and an IPIP service whose backends' next hop (the gateway) is resolved.
fn seed_vip(dp: &mut Dataplane, reals: &[Ipv4Addr], far: &[Ipv4Addr]) -> Result<(), String> {
    let maps = dp.maps_mut();
    let e = |e: vip_agent::dataplane::MapError| e.to_string();
    maps.set_config(&Config::new(FibLab::LB_MAC, FibLab::LB_IP.octets())).map_err(e)?;
    maps.set_vip(VIP_DSR, VipState::leader_until(VipState::FOREVER)).map_err(e)?;
    maps.set_vip(VIP_IPIP, VipState::leader_until(VipState::FOREVER)).map_err(e)?;
    let mut lb = Balancer::default();
    let dsr = reals.iter().map(|&ip| BackendSpec::up(ip, FibLab::LB_MAC)).collect();
    let dsr = ServiceSpec { vip: VIP_DSR.into(), port: PORT, mode: ForwardMode::Dsr, m: RING_SIZE, backends: dsr };
    lb.apply(maps, &dsr).map_err(|e| e.to_string())?;
    let gateway = Nexthop { mac: FibLab::GATEWAY_MAC, mtu: 1500 };
    let ipip = far.iter().map(|&ip| BackendSpec { nexthop: Some(gateway), ..BackendSpec::up(ip, [0; 6]) }).collect();
    let ipip = ServiceSpec { vip: VIP_IPIP.into(), port: PORT, mode: ForwardMode::Ipip, m: RING_SIZE, backends: ipip };
    lb.apply(maps, &ipip).map_err(|e| e.to_string())?;
    Ok(())
}

/// Single ns and, for a fixed point, repeat ns.
type Figures = (f64, Option<f64>);
/// A measured row: the path, vip's figures, Katran's (None: not comparable).
type Measured = (&'static str, Figures, Option<Figures>);

/// One printed row: the path, vip's program and expected action, Katran's (None: not
/// comparable), the frames.
struct Row<'a> {
    name: &'static str,
    vip: (Program, u32, Option<u32>),
    katran: Option<u32>,
    frames: Frames<'a>,
}

fn main() -> Result<(), String> {
    let object = std::env::args().nth(1).ok_or("usage: vip-katran KATRAN_OBJECT [COMMIT]")?;
    let commit = std::env::args().nth(2).unwrap_or_else(|| "?".into());
    // The CPUs this process may run on (xtask pins it to one): each gets an LRU in
    // `lru_mapping` of the capacity of vip's connection table, as KatranLb gives its one
    // forwarding core; a CPU without one would use Katran's unit-test fallback.
    let cpus = allowed_cpus()?;
    let lru_entries = MAX_CONNS;
    let reals: Vec<Ipv4Addr> = (1..=3).map(|i| Ipv4Addr::new(10, 0, 0, 10 + i)).collect();
    let far: Vec<Ipv4Addr> = (1..=3).map(|i| Ipv4Addr::new(10, 77, 0, 20 + i)).collect();
    let names: Vec<String> = far.iter().map(Ipv4Addr::to_string).collect();
    let weighted: Vec<Weighted<'_>> = names.iter().map(|name| Weighted { name, weight: 1 }).collect();
    let table = maglev::build(&weighted, RING_SIZE).map_err(|e| e.to_string())?;

    let mut katran = Katran::load(Path::new(&object), &cpus, lru_entries)?;
    katran.configure(FibLab::GATEWAY_MAC, &[VIP_DSR, VIP_IPIP], &far, &table)?;
    let fib = FibLab::new()?;
    let rows = fib.lb.within(|| -> Result<Vec<Measured>, String> {
        let ifindex = vip_agent::netdev::lookup("lb0").map_err(|e| e.to_string())?.ifindex;
        let mut dp = Dataplane::load().map_err(|e| format!("{e:#?} (the benchmark needs root)"))?;
        seed_vip(&mut dp, &reals, &far)?;
        let to = |src_mac, dst: Ipv4Addr, flags| {
            Frame::new(FibLab::LB_MAC, src_mac, ETH_P_IPV4, ipv4(CLIENT, dst, 6, &tcp(40000, PORT, flags))).bytes()
        };
        // Sent from the node's own MAC: vip's DSR output of it is itself (see seed_vip).
        let established_dsr = to(FibLab::LB_MAC, VIP_DSR, TCP_ACK);
        let established_ipip = to(CLIENT_MAC, VIP_IPIP, TCP_ACK);
        let not_vip = to(CLIENT_MAC, Ipv4Addr::new(10, 0, 0, 50), TCP_ACK);
        let rows = [
            Row {
                name: "XDP_PASS (floor)",
                vip: (Program::Pass, XDP_PASS, None),
                katran: None,
                frames: Frames::Same(&not_vip),
            },
            Row {
                name: "TCP, not a VIP",
                vip: (Program::Vip, XDP_PASS, None),
                katran: Some(XDP_PASS),
                frames: Frames::Same(&not_vip),
            },
            Row {
                name: "SYN, new flow: vip DSR",
                vip: (Program::Vip, XDP_TX, None),
                katran: Some(XDP_TX),
                frames: Frames::NewFlows(VIP_DSR),
            },
            Row {
                name: "SYN, new flow: vip IPIP",
                vip: (Program::Vip, XDP_TX, Some(ifindex)),
                katran: Some(XDP_TX),
                frames: Frames::NewFlows(VIP_IPIP),
            },
            Row {
                name: "established: vip DSR",
                vip: (Program::Vip, XDP_TX, None),
                katran: Some(XDP_TX),
                frames: Frames::Same(&established_dsr),
            },
            Row {
                name: "established: vip IPIP",
                vip: (Program::Vip, XDP_TX, Some(ifindex)),
                katran: Some(XDP_TX),
                frames: Frames::Same(&established_ipip),
            },
            Row {
                name: "20k pinned flows: vip DSR",
                vip: (Program::Vip, XDP_TX, None),
                katran: Some(XDP_TX),
                frames: Frames::PinnedFlows(VIP_DSR),
            },
            Row {
                name: "20k pinned flows: vip IPIP",
                vip: (Program::Vip, XDP_TX, Some(ifindex)),
                katran: Some(XDP_TX),
                frames: Frames::PinnedFlows(VIP_IPIP),
            },
        ];
        let runner = dp.runner();
        let mut out = Vec::new();
        for (i, row) in rows.iter().enumerate() {
            let (program, want, ingress) = row.vip;
            let ours = || {
                measure(Side::Vip(&runner, program, ingress), row.frames, want)
                    .map_err(|e| format!("{}: vip: {e}", row.name))
            };
            let theirs = |want| {
                measure(Side::Katran(&katran), row.frames, want).map_err(|e| format!("{}: Katran: {e}", row.name))
            };
            // Alternate which side goes first, so neither always meets warm caches.
            let (ours, theirs) = match (row.katran, i % 2) {
                (None, _) => (ours()?, None),
                (Some(want), 0) => (ours()?, Some(theirs(want)?)),
                (Some(want), _) => {
                    let t = theirs(want)?;
                    (ours()?, Some(t))
                }
            };
            out.push((row.name, ours, theirs));
        }
        Ok(out)
    })??;
    print(&rows, &commit, &cpus, lru_entries);
    Ok(())
}

/// The CPUs this process may run on (`sched_getaffinity`).
fn allowed_cpus() -> Result<Vec<usize>, String> {
    // SAFETY: cpu_set_t is plain data, filled by the kernel for this thread.
    let set = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Err(format!("sched_getaffinity: {}", std::io::Error::last_os_error()));
        }
        set
    };
    // SAFETY: CPU_ISSET reads the set only.
    Ok((0..128).filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) }).collect())
}

fn print(rows: &[Measured], commit: &str, cpus: &[usize], lru: u32) {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!(
        "vip beside Katran ({commit}; IPIP; an LRU of {lru} flows on CPU {cpus:?}, as vip's connection table), \
         BPF_PROG_RUN, same frames, one run, the two sides alternating which goes first"
    );
    println!(
        "(kernel {}); single = mean of the middle half of {SINGLE_RUNS} one-frame runs, repeat = median of {REPEAT_ROUNDS} kernel averages over {REPEAT} runs",
        kernel.trim()
    );
    println!("net = single minus the floor's single; Katran answers every VIP by IPIP (its only mode)");
    println!(
        "{:<26} {:>10} {:>10} {:>8} {:>12} {:>12} {:>10}",
        "path", "vip single", "vip repeat", "vip net", "Katran single", "Katran repeat", "Katran net"
    );
    let floor = rows.first().map_or(0.0, |r| r.1 .0);
    let opt = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}"));
    for (name, (single, repeat), katran) in rows {
        let (ks, kr, kn) = match katran {
            Some((s, r)) => (format!("{s:.1}"), opt(*r), format!("{:.1}", s - floor)),
            None => ("-".into(), "-".into(), "-".into()),
        };
        println!("{name:<26} {single:>10.1} {:>10} {:>8.1} {ks:>12} {kr:>12} {kn:>10}", opt(*repeat), single - floor);
    }
}
