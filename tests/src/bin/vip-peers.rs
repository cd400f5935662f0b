//! `vip-peers`: vip beside its peers, measured on this machine in one run.
//!
//! Section `peers`: a client, a load-balancing node and three backends (network
//! namespaces on one bridge; see `peers.rs`). The LB node runs in turn vip-agent (DSR,
//! native XDP, and generic/SKB XDP), HAProxy with the kubeadm HA guide's configuration,
//! kube-proxy-style nftables DNAT+masquerade, and nothing (`direct`: the client talks to
//! the three backends in turn). The same load generator measures each (one request per
//! new connection): connections/s at saturation, p50/p99 latency at a fixed offered load
//! and at saturation, and the LB's CPU time per 1,000 connections: its interface's NAPI
//! kernel thread (every packet the LB receives is processed there: XDP, netfilter, TCP)
//! plus the peer's own processes (vip-agent, HAProxy).
//!
//! Section `failover`: keepalived beside vip-agent `--election kubernetes`, three nodes,
//! a paced request stream, the VIP holder struck by SIGKILL, SIGTERM and node loss (see
//! `failover.rs`).
//!
//! Writes tables to stdout, `target/bench/{peers,failover}.csv`, SVG plots and the
//! measured tables into `docs/bench/`. Needs root and the Debian packages haproxy,
//! keepalived, nftables and ethtool.
//!
//! usage: vip-peers [peers] [failover] [--rounds N] [--conns N] [--trials N] [--peers a,b,...]
//! (the flags are for exploring: the defaults are what the published figures use)

#[path = "vip-peers/bench.rs"]
mod bench;
#[path = "vip-peers/cleanup.rs"]
mod cleanup;
#[path = "vip-peers/cpu.rs"]
mod cpu;
#[path = "vip-peers/failover.rs"]
mod failover;
#[path = "vip-peers/loadgen.rs"]
mod loadgen;
#[path = "vip-peers/peers.rs"]
mod peers;
#[path = "vip-peers/plots.rs"]
mod plots;
#[path = "vip-peers/report.rs"]
mod report;

use bench::PeerResult;
use failover::{EventResult, System};
use peers::Peer;
use report::Context;

/// Rounds per peer (median connections/s, pooled latencies): three, so one disturbed
/// round on a shared machine shows as an outlier instead of the result.
const ROUNDS: usize = 3;
/// The peers in the order measured; `vip` (native XDP) is the CSV's vip row.
const PEERS: [Peer; 5] =
    [Peer::Direct, Peer::Vip { native: true }, Peer::Vip { native: false }, Peer::Haproxy, Peer::Nftables];
/// The CSV's rows: exactly these peers.
const CSV_PEERS: [&str; 4] = ["vip", "haproxy", "nftables", "direct"];
const PEERS_CSV_HEADER: &str = "peer,connections_per_s,p50_us,p99_us,lb_cpu_ms_per_1k";
const PEERS_COLUMNS: [&str; 13] = [
    "peer",
    "conn/s (sat.)",
    "p50 µs",
    "p99 µs",
    "p50 µs (sat.)",
    "p99 µs (sat.)",
    "LB CPU ms/1k conn (sat.)",
    "LB CPU ms/1k (fixed)",
    "of which XDP program ms/1k (sat.)",
    "LB core busy (sat.)",
    "other cores busy (sat.)",
    "IPIs/conn (sat.)",
    "failed",
];
const FAILOVER_CSV_HEADER: &str = "system,event,new_answer_ms,outage_ms,failed_requests";
const FAILOVER_COLUMNS: [&str; 6] = [
    "system",
    "event",
    "new ARP answer ms",
    "outage ms",
    "failed requests",
    "trials: answer/outage ms, failed of sent",
];

/// A Markdown table, also what stdout shows.
fn table(columns: &[&str], rows: &[Vec<String>]) -> String {
    let line = |cells: Vec<String>| format!("| {} |\n", cells.join(" | "));
    let mut out = line(columns.iter().map(|c| c.to_string()).collect());
    out += &line(columns.iter().enumerate().map(|(i, _)| if i == 0 { "---" } else { "---:" }.to_owned()).collect());
    for r in rows {
        out += &line(r.clone());
    }
    out
}

fn opt<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or("-".into(), |v| v.to_string())
}

/// One peer's table row and CSV row (`None` for peers outside the CSV), and notes.
fn peer_rows(r: &PeerResult) -> (Vec<String>, Option<String>, Vec<String>) {
    let name = r.peer.name();
    let in_csv = CSV_PEERS.contains(&name);
    let (Some(sat), Some(fixed), Some(rate), None) =
        (PeerResult::merged(&r.saturation), PeerResult::merged(&r.fixed), r.conns_per_s(), &r.error)
    else {
        let why = r.error.clone().unwrap_or_else(|| "no measurement".into());
        let mut row = vec![name.to_owned(), format!("failed: {why}")];
        row.resize(PEERS_COLUMNS.len(), String::new());
        return (row, in_csv.then(|| format!("{name},,,,")), vec![]);
    };
    let (p50, p99) = (opt(fixed.run.quantile_us(0.5)), opt(fixed.run.quantile_us(0.99)));
    let row = vec![
        name.to_owned(),
        format!("{rate:.0}"),
        p50.clone(),
        p99.clone(),
        opt(sat.run.quantile_us(0.5)),
        opt(sat.run.quantile_us(0.99)),
        format!("{:.2}", sat.cpu_ms_per_1k()),
        format!("{:.2}", fixed.cpu_ms_per_1k()),
        if sat.xdp_ns > 0 { format!("{:.2}", sat.xdp_ms_per_1k()) } else { "-".into() },
        format!("{:.0}%", sat.lb_core_busy * 100.0),
        format!("{:.0}%", sat.rest_busy * 100.0),
        format!("{:.1}", sat.ipis_per_conn()),
        (sat.run.failed + fixed.run.failed).to_string(),
    ];
    let csv = in_csv.then(|| format!("{name},{rate:.0},{p50},{p99},{:.3}", sat.cpu_ms_per_1k()));
    let mut notes = Vec::new();
    if let Some(e) = sat.run.first_error.as_ref().or(fixed.run.first_error.as_ref()) {
        notes.push(format!("{name}: first failure: {e}"));
    }
    if fixed.run.late > 0 {
        let n = fixed.run.latencies_us.len();
        notes.push(format!("{name}: {} of {n} fixed-load requests started over 1 ms late", fixed.run.late));
    }
    (row, csv, notes)
}

fn peers_section(peers: &[Peer], rounds: usize, conns: usize) -> Result<(), String> {
    peers::require(&["haproxy", "nft", "ethtool"])?;
    let ctx = Context::now();
    let results = bench::run(peers, rounds, conns)?;
    let (mut rows, mut csv, mut notes) = (Vec::new(), format!("{PEERS_CSV_HEADER}\n"), Vec::new());
    for r in &results {
        let (row, csv_row, n) = peer_rows(r);
        rows.push(row);
        csv.extend(csv_row.map(|l| l + "\n"));
        notes.extend(n);
    }
    let text = format!(
        "One HTTP request per new connection; {rounds} rounds per peer, round-robin, a fresh lab each; \
         saturation: {conns} connections in flight (median of the rounds); p50/p99: at a fixed {} conn/s \
         unless marked sat. (pooled over the rounds); LB CPU: the LB interface's NAPI thread plus the peer's \
         processes. Measured {}.\n\n{}{}",
        bench::FIXED_RATE,
        ctx.line(),
        table(&PEERS_COLUMNS, &rows),
        notes.iter().map(|n| format!("\n- {n}")).collect::<String>(),
    );
    println!("\n{text}");
    let csv_path = report::write_target_bench("peers.csv", &csv)?;
    peers_plots(&results, conns, &ctx)?;
    let readme = report::update_readme("peers", &text)?;
    println!("\nwrote {}, {} and the SVGs beside it", csv_path.display(), readme.display());
    Ok(())
}

fn peers_plots(results: &[PeerResult], conns: usize, ctx: &Context) -> Result<(), String> {
    let docs = report::docs_dir()?;
    let (mut fixed, mut sat, mut rates) = (Vec::new(), Vec::new(), Vec::new());
    for r in results.iter().filter(|r| r.error.is_none()) {
        let (Some(f), Some(s), Some(rate)) =
            (PeerResult::merged(&r.fixed), PeerResult::merged(&r.saturation), r.conns_per_s())
        else {
            continue;
        };
        fixed.push((r.peer.name(), f.run.latencies_us));
        sat.push((r.peer.name(), s.run.latencies_us));
        rates.push((r.peer.name(), rate));
    }
    let foot = ctx.line();
    let title = format!("Latency per new connection at {} conn/s", bench::FIXED_RATE);
    plots::latency_cdf(&docs.join("peers-latency-cdf.svg"), &title, &foot, &fixed)?;
    let title = format!("Latency per new connection at saturation ({conns} in flight)");
    plots::latency_cdf(&docs.join("peers-latency-cdf-saturation.svg"), &title, &foot, &sat)?;
    let title = "New connections per second at saturation";
    plots::bars(&docs.join("peers-connections.svg"), title, "connections/s", &foot, &rates)
}

/// One system and event's table row and CSV row.
fn event_rows(r: &EventResult) -> (Vec<String>, String) {
    let mut trials: Vec<String> = r
        .trials
        .iter()
        .map(|t| {
            let answer = t.new_answer.map_or("never".into(), |d| d.as_millis().to_string());
            format!("{answer}/{}, {} of {}", t.outage.as_millis(), t.failed, t.requests)
        })
        .collect();
    trials.extend(r.error.as_ref().map(|e| format!("failed: {e}")));
    let row = vec![
        r.system.name().to_owned(),
        r.event.name().to_owned(),
        opt(r.new_answer_ms()),
        opt(r.outage_ms()),
        opt(r.failed()),
        trials.join("; "),
    ];
    let blank = |v: Option<String>| v.unwrap_or_default();
    let csv = format!(
        "{},{},{},{},{}",
        r.system.name(),
        r.event.name(),
        blank(r.new_answer_ms().map(|v| v.to_string())),
        blank(r.outage_ms().map(|v| v.to_string())),
        blank(r.failed().map(|v| v.to_string())),
    );
    (row, csv)
}

fn failover_section(trials: usize) -> Result<(), String> {
    peers::require(&["keepalived"])?;
    let ctx = Context::now();
    let mut results: Vec<EventResult> = Vec::new();
    for system in [System::Keepalived, System::Vip] {
        results.extend(failover::run(system, trials)?);
    }
    let (mut rows, mut csv, mut timelines) = (Vec::new(), format!("{FAILOVER_CSV_HEADER}\n"), Vec::new());
    for r in &results {
        let (row, csv_row) = event_rows(r);
        rows.push(row);
        csv += &(csv_row + "\n");
        if let Some(t) = r.median_trial() {
            timelines.push((format!("{} {}", r.system.name(), r.event.name()), t.timeline.clone()));
        }
    }
    let text = format!(
        "Three nodes; a new HTTPS connection to the VIP every 5 ms, each allowed 300 ms; {trials} trials per row \
         (medians; failed requests: median per trial). New ARP answer: from the strike until another node \
         answers the client's ARP for the VIP. Outage: from the first failed request to the first success \
         after the last failure. Measured {}.\n\n{}",
        ctx.line(),
        table(&FAILOVER_COLUMNS, &rows)
    );
    println!("\n{text}");
    let csv_path = report::write_target_bench("failover.csv", &csv)?;
    let svg = report::docs_dir()?.join("failover-timelines.svg");
    let title = "Requests through the VIP around the event (median trial of each row)";
    plots::timelines(&svg, title, &ctx.line(), &timelines)?;
    let readme = report::update_readme("failover", &text)?;
    println!("\nwrote {}, {} and {}", csv_path.display(), readme.display(), svg.display());
    Ok(())
}

/// The command line: sections to run (both by default) and the exploring flags.
struct Args {
    sections: Vec<String>,
    peers: Vec<Peer>,
    rounds: usize,
    conns: usize,
    trials: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        sections: vec![],
        peers: PEERS.to_vec(),
        rounds: ROUNDS,
        conns: bench::SAT_CONNS,
        trials: failover::TRIALS,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        let number = |v: String| v.parse().ok().filter(|&n: &usize| n > 0).ok_or(format!("bad number {v:?}"));
        match arg.as_str() {
            "peers" | "failover" => a.sections.push(arg),
            "--rounds" => a.rounds = number(value()?)?,
            "--conns" => a.conns = number(value()?)?,
            "--trials" => a.trials = number(value()?)?,
            "--peers" => {
                a.peers = value()?
                    .split(',')
                    .map(|n| PEERS.iter().copied().find(|p| p.name() == n).ok_or(format!("unknown peer {n:?}")))
                    .collect::<Result<_, _>>()?
            }
            _ => {
                return Err(format!(
                    "unknown argument {arg:?}; usage: vip-peers [peers] [failover] [--rounds N] [--conns N] \
                     [--trials N] [--peers direct,vip,vip-skb,haproxy,nftables]"
                ))
            }
        }
    }
    Ok(a)
}

fn main() -> Result<(), String> {
    cleanup::install();
    let args = parse_args()?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("vip-peers needs root (network namespaces, XDP)".into());
    }
    let run = |name: &str| args.sections.is_empty() || args.sections.iter().any(|s| s == name);
    if run("peers") {
        peers_section(&args.peers, args.rounds, args.conns)?;
    }
    if run("failover") {
        failover_section(args.trials)?;
    }
    Ok(())
}
