//! `vip-agent status`: what the data plane is doing, from the pinned maps, readable at a
//! glance (or as JSON).

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::Path,
    time::Duration,
};

use serde_json::{json, Value};
use vip_common::{Backend, ForwardMode, HealthReason, MaglevSlot, MAGLEV_MAX_M, NO_BACKEND};

use crate::{
    clock::boot_ns,
    dataplane::{MapError, Maps},
};

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error("no vip-agent data plane is pinned at {path} (is the agent running, with this --pin-path?)")]
    NotRunning { path: String },
    #[error(transparent)]
    Map(#[from] MapError),
}

/// The most of an answer `status` reads from the metrics address (a live view is a few
/// KiB).
const MAX_ANSWER: u64 = 1 << 20;

/// The running agent's live state from its metrics address (`/status`), or why not.
fn live(addr: SocketAddr) -> Result<Value, String> {
    use std::io::{Read, Write};
    let timeout = Duration::from_secs(1);
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("{addr}: {e}"))?;
    s.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    s.write_all(b"GET /status HTTP/1.1\r\nHost: vip-agent\r\nConnection: close\r\n\r\n").map_err(|e| e.to_string())?;
    let mut text = String::new();
    // Bounded: whatever listens on that address answers here, perhaps not an agent.
    s.take(MAX_ANSWER).read_to_string(&mut text).map_err(|e| match e.kind() {
        // A read timeout is EAGAIN on Linux: "Resource temporarily unavailable" says
        // nothing of a hung (stopped, overloaded) agent.
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            format!("{addr}: no answer within {timeout:?}")
        }
        _ => e.to_string(),
    })?;
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).ok_or("malformed answer")?;
    serde_json::from_str(body).map_err(|e| e.to_string())
}

/// The live view `view` answered at `addr`, if it is the agent that wrote the pins
/// (instance `pinned`): two agents on one host, or a `--metrics-addr` that is another
/// agent's, would otherwise mix that agent's state into these pins'. A view without an
/// instance (an agent from before it was published) is taken as it is.
fn same_agent(view: Value, pinned: &str, addr: SocketAddr) -> Result<Value, String> {
    match view.get("instance").and_then(Value::as_str) {
        Some(live) if live != pinned => Err(format!(
            "{addr} answers for another agent (instance {live}; these pins are instance {pinned}'s): \
             give status that agent's --metrics-addr"
        )),
        _ => Ok(view),
    }
}

/// Everything `status` shows, as JSON (the table is rendered from it): the pinned maps,
/// and the running agent's live state from `agent_addr` when it answers.
pub fn collect(pin_path: &Path, agent_addr: SocketAddr) -> Result<Value, StatusError> {
    if !pin_path.join(vip_common::map_names::CONFIG).exists() {
        return Err(StatusError::NotRunning { path: pin_path.display().to_string() });
    }
    let maps = Maps::from_pins(pin_path)?;
    let now = boot_ns();
    let config = maps.config()?;
    let vips: Vec<Value> = maps
        .vips()?
        .into_iter()
        .map(|(vip, st)| {
            let leader = st.leads_at(now);
            let deadline_ms = (leader && st.leader_until_ns != vip_common::VipState::FOREVER)
                .then(|| (st.leader_until_ns - now) / 1_000_000);
            let family = if vip.is_ipv4() { "ipv4" } else { "ipv6" };
            json!({
                "vip": vip.to_string(),
                "family": family,
                "leader": leader,
                "lease_deadline_ms": deadline_ms,
            })
        })
        .collect();
    let backends = maps.backends()?;
    let mut services = Vec::new();
    for (key, svc) in maps.services()? {
        let m = svc.m.min(MAGLEV_MAX_M);
        let table = maps.read_table(svc.slot, svc.active, m)?.into_iter().map(MaglevSlot);
        // Per backend id: the slots whose new flows it takes, and those whose earlier
        // flows it keeps while it drains. One pass: a table has up to 65537 slots.
        let mut counts: std::collections::BTreeMap<u32, (usize, usize)> = Default::default();
        for e in table {
            counts.entry(e.id()).or_default().0 += 1;
            if let Some(h) = e.holder() {
                counts.entry(h).or_default().1 += 1;
            }
        }
        let mut shares: Vec<Value> = Vec::new();
        for (id, b) in &backends {
            let (slots, held) = counts.get(id).copied().unwrap_or_default();
            let stats = maps.backend_stats(*id)?;
            shares.push(json!({
                "backend": Ipv4Addr::from(b.ip).to_string(),
                "healthy": b.flags & Backend::F_UP != 0,
                "state": crate::metrics::backend_state(b),
                "reason": HealthReason::from_u8(b.reason).name(),
                "local": b.flags & Backend::F_LOCAL != 0,
                // IPIP: the next hop the agent resolved (else the data plane asks the FIB).
                "nexthop": (b.nh_mtu != 0).then(|| json!({ "mac": mac_string(&b.nh_mac), "mtu": b.nh_mtu })),
                "table_share": slots as f64 / f64::from(m.max(1)),
                "held_slots": held,
                "packets": stats.packets,
                "bytes": stats.bytes,
            }));
        }
        let empty = counts.get(&NO_BACKEND).map_or(0, |c| c.0);
        services.push(json!({
            "vip": key.vip().to_string(),
            "port": key.port(),
            "forward": ForwardMode::from_u8(svc.mode).map_or("?", ForwardMode::name),
            "table_size": m,
            "unowned_slots": empty,
            "backends": shares,
        }));
    }
    let counters: serde_json::Map<String, Value> =
        maps.counters()?.into_iter().filter(|(_, n)| *n > 0).map(|(r, n)| (r.name().to_owned(), json!(n))).collect();
    let mac = mac_string(&config.mac);
    let pinned_instance = crate::election::instance_hex(&config.agent_instance);
    let (agent, agent_error) = match live(agent_addr).and_then(|v| same_agent(v, &pinned_instance, agent_addr)) {
        Ok(v) => (v, Value::Null),
        Err(e) => (Value::Null, json!(e)),
    };
    Ok(json!({
        "agent": agent,
        "agent_error": agent_error,
        "attached": attached(pin_path, agent.get("xdp_mode").and_then(Value::as_str)),
        "pin_path": pin_path.display().to_string(),
        "mac": mac,
        "node_ip": Ipv4Addr::from(config.ip).to_string(),
        "vips": vips,
        "services": services,
        "counters": counters,
        "connections_tracked": maps.conn_count(),
        "vlan_handoff_no_metadata": maps.handoff_no_meta()?,
    }))
}

/// Where the data plane is attached, from the links pinned beside the maps:
/// `[{"interface": "eth0", "hook": "xdp", "mode": "native"}]`. The mode of an XDP link is
/// the running agent's word (`xdp_mode`: `native` or `skb`), `null` without one; at tcx
/// it is `ingress`, or `vlan_stripped` for the companion beside XDP that takes the frames
/// whose VLAN tag the NIC stripped.
fn attached(pin_path: &std::path::Path, xdp_mode: Option<&str>) -> Value {
    let mut out = Vec::new();
    let mut names: Vec<String> = std::fs::read_dir(pin_path)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    // XDP first, its companion after it, as they run.
    names.sort_by_key(|n| !n.starts_with("link_"));
    for name in names {
        let pins =
            [("link_", "xdp", xdp_mode), ("tcx_", "tcx", Some("ingress")), ("tcxvlan_", "tcx", Some("vlan_stripped"))];
        let hook = pins.into_iter().find_map(|(prefix, hook, mode)| {
            name.strip_prefix(prefix).map(|interface| json!({ "interface": interface, "hook": hook, "mode": mode }))
        });
        out.extend(hook);
    }
    Value::Array(out)
}

/// How `status` words an attachment's mode.
fn mode_words(mode: Option<&str>) -> &'static str {
    match mode {
        Some("native") => " (native)",
        Some("skb") => " (generic/SKB mode)",
        Some("vlan_stripped") => " (frames whose VLAN tag the NIC stripped)",
        _ => "",
    }
}

fn mac_string(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// The human-readable table.
pub fn render(s: &Value) -> String {
    let mut out = String::new();
    let str_of = |v: &Value| v.as_str().unwrap_or("?").to_owned();
    let _ =
        writeln!(out, "node      {} {}   (pins {})", str_of(&s["node_ip"]), str_of(&s["mac"]), str_of(&s["pin_path"]));
    for a in s["attached"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "attached  {} at {}{}",
            str_of(&a["interface"]),
            str_of(&a["hook"]),
            mode_words(a["mode"].as_str())
        );
    }
    if s["vlan_handoff_no_metadata"] == true {
        let _ = writeln!(
            out,
            "warning   the driver carries no XDP metadata: the tcx companion decides every frame whose VLAN \
             tag the NIC stripped, some twice (turn stripping off: ethtool -K IF rxvlan off)"
        );
    }
    match (&s["agent"], s["agent_error"].as_str()) {
        // Indexed as a Value (a missing key reads as null), never as a Map, which panics:
        // an older agent's /status lacks newer keys.
        (a @ Value::Object(_), _) => {
            let why: Vec<&str> =
                a["not_eligible_because"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
            let eligible =
                if why.is_empty() { "can carry the VIPs".to_owned() } else { format!("cannot: {}", why.join(", ")) };
            let _ = writeln!(out, "agent     mode {}, {eligible}", str_of(&a["mode"]));
            if let Value::Object(_) = &a["lease_api"] {
                let api = &a["lease_api"];
                let since = api["since_s"].as_u64().unwrap_or(0);
                let _ = match api["answering"].as_bool() {
                    Some(true) => writeln!(out, "lease API answering"),
                    _ => writeln!(
                        out,
                        "lease API NOT answering for {since}s: {}",
                        api["last_error"].as_str().unwrap_or("no answer")
                    ),
                };
            }
            if let Some(other) = a["duplicate_instance"].as_str() {
                let _ = writeln!(
                    out,
                    "warning   another vip-agent runs under this node's name (instance {other}): give each node a unique --node-name"
                );
            }
            if let (Some(holder), Some(vips)) =
                (a["leader_vips_differ"][0].as_str(), a["leader_vips_differ"][1].as_str())
            {
                let _ = writeln!(
                    out,
                    "warning   the leader, {holder}, serves other VIPs ({vips}): a VIP it lacks goes unanswered"
                );
            }
            if let (Some(holder), Some(placement)) =
                (a["leader_flow_placement_differs"][0].as_str(), a["leader_flow_placement_differs"][1].as_str())
            {
                let _ = writeln!(
                    out,
                    "warning   the leader, {holder}, places flows otherwise ({placement}): its connections are reset if this node takes over; give every node the same --flow-hash-seed and --maglev-size"
                );
            }
            if let Some(adv) = a["advertised"].as_bool() {
                let peers = a["bgp_peers"].as_array().map_or(&[][..], Vec::as_slice);
                let holding =
                    peers.iter().filter(|p| p["advertised"].as_array().is_some_and(|r| !r.is_empty())).count();
                let _ = if adv {
                    writeln!(out, "bgp       advertising the VIPs to {holding} of {} peers", peers.len())
                } else {
                    writeln!(out, "bgp       NOT advertising the VIPs")
                };
            }
            for p in a["bgp_peers"].as_array().into_iter().flatten() {
                let up = p["uptime_s"].as_u64().map_or(String::new(), |s| format!(" for {s}s"));
                let err = p["last_error"].as_str().map_or(String::new(), |e| format!("  (last error: {e})"));
                let _ = writeln!(
                    out,
                    "  peer {:<16} AS {:<10} {}{up}  msgs in/out {}/{}  advertised {}{err}",
                    str_of(&p["address"]),
                    p["remote_as"],
                    str_of(&p["state"]),
                    p["messages_received"],
                    p["messages_sent"],
                    p["advertised"].as_array().map_or(0, Vec::len),
                );
            }
        }
        (_, Some(e)) => {
            let _ = writeln!(out, "agent     not reachable ({e}): showing the pinned data plane only");
            let _ = writeln!(out, "          (backend states are as the agent last wrote them, not checked since)");
        }
        _ => {}
    }
    // BGP mode elects nobody: every ready node advertises, and no node answers ARP, so
    // "follower" would mislead.
    let bgp_advertised = match &s["agent"] {
        Value::Object(a) if a["mode"].as_str() == Some("bgp") => a["advertised"].as_bool(),
        _ => None,
    };
    let bootstrap = s["agent"]["bootstrap_hold"].as_bool() == Some(true);
    for v in s["vips"].as_array().into_iter().flatten() {
        let role = match (bgp_advertised, v["leader"].as_bool(), v["lease_deadline_ms"].as_u64()) {
            (Some(true), _, _) => "advertised by BGP".to_owned(),
            (Some(false), _, _) => "NOT advertised (BGP)".to_owned(),
            (None, Some(true), Some(ms)) if bootstrap => {
                format!("LEADER (bootstrap: no Lease yet; holding {ms} ms more unless renewed)")
            }
            (None, Some(true), Some(ms)) => format!("LEADER (lease valid {ms} ms more)"),
            (None, Some(true), None) => "LEADER".to_owned(),
            // Without a running agent the pins say only that this node does not answer.
            (None, _, _) if s["agent"].is_null() => "not answering ARP (as pinned; no agent reached)".to_owned(),
            (None, _, _) => match s["agent"]["lease_holder"].as_str() {
                Some(holder) => format!("follower (the Lease is held by {holder})"),
                None => "follower".to_owned(),
            },
        };
        let _ = writeln!(out, "vip       {:<24} {:<5} {role}", str_of(&v["vip"]), str_of(&v["family"]));
    }
    for svc in s["services"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "\nservice   {}  forward={}  maglev M={}",
            // `[v6]:port`, as a URL writes it.
            svc["vip"].as_str().and_then(|v| v.parse::<std::net::IpAddr>().ok()).map_or_else(
                || format!("{}:{}", str_of(&svc["vip"]), svc["port"]),
                |ip| std::net::SocketAddr::from((ip, svc["port"].as_u64().unwrap_or(0) as u16)).to_string()
            ),
            str_of(&svc["forward"]),
            svc["table_size"]
        );
        if svc["forward"].as_str() == Some("local") {
            let _ = writeln!(out, "  (every flow goes to this node's own apiserver: the shares below are not used)");
        }
        // HEALTH fits the longest, `DRAINING(deregistered),local`.
        let _ = writeln!(out, "  {:<16} {:<28} {:>7} {:>12} {:>14}", "BACKEND", "HEALTH", "SHARE", "PACKETS", "BYTES");
        for b in svc["backends"].as_array().into_iter().flatten() {
            let state = str_of(&b["state"]);
            let health = match (state.as_str(), b["reason"].as_str()) {
                ("up", _) => "up".to_owned(),
                (s, Some(r)) if !r.is_empty() => format!("{}({r})", s.to_uppercase()),
                (s, _) => s.to_uppercase(),
            };
            // This node's own apiserver, whatever its state.
            let health = if b["local"].as_bool() == Some(true) { format!("{health},local") } else { health };
            let share = b["table_share"].as_f64().unwrap_or(0.0) * 100.0;
            // A draining backend's slots from before its drain (see `MaglevSlot`).
            let held = match b["held_slots"].as_u64().unwrap_or(0) {
                0 => String::new(),
                n => format!("  holds {:.1}% of slots", n as f64 * 100.0 / svc["table_size"].as_f64().unwrap_or(1.0)),
            };
            // IPIP: the next hop the agent resolved (else the data plane's FIB lookup).
            let via = match (&b["nexthop"]["mac"], &b["nexthop"]["mtu"]) {
                (Value::String(mac), Value::Number(mtu)) => format!("  via {mac} mtu {mtu}"),
                _ => String::new(),
            };
            let _ = writeln!(
                out,
                "  {:<16} {:<28} {:>6.1}% {:>12} {:>14}{held}{via}",
                str_of(&b["backend"]),
                health,
                share,
                b["packets"].as_u64().unwrap_or(0),
                b["bytes"].as_u64().unwrap_or(0)
            );
        }
        if svc["unowned_slots"].as_u64().unwrap_or(0) > 0 {
            let _ = writeln!(out, "  no healthy backend: traffic goes to this node's own stack");
        }
    }
    if s["services"].as_array().is_some_and(|v| v.len() > 1) {
        // The data plane counts per backend, not per service (IPv4 and IPv6 VIPs share
        // their backends): the same figures under each service are not to be added up.
        let _ = writeln!(out, "\n(packets and bytes: each backend's, over all its services)");
    }
    // Pins are forgotten by eviction, not when a connection closes (an LRU, as
    // Katran's): the count is of flows seen lately, not of open connections.
    let _ = writeln!(
        out,
        "\nflows pinned: {} (closed ones stay until evicted; each family's table holds {})",
        s["connections_tracked"],
        vip_common::MAX_CONNS
    );
    let _ = writeln!(out, "counters:");
    for (k, v) in s["counters"].as_object().into_iter().flatten() {
        let _ = writeln!(out, "  {k:<22} {:>12}", v.as_u64().unwrap_or(0));
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::{render, same_agent};

    /// The live view is shown beside the pins only if the agent answering is the one
    /// that wrote them; a view from before the instance was published is taken as it is.
    #[test]
    fn another_agents_live_view_is_not_shown_beside_these_pins() {
        let addr = "127.0.0.1:9469".parse().unwrap();
        let ours = json!({ "mode": "arp", "instance": "00112233445566ff" });
        assert_eq!(same_agent(ours.clone(), "00112233445566ff", addr), Ok(ours));
        let theirs = json!({ "mode": "arp", "instance": "aabbccddeeff0011" });
        let refused = same_agent(theirs, "00112233445566ff", addr).unwrap_err();
        assert!(refused.contains("127.0.0.1:9469 answers for another agent (instance aabbccddeeff0011"), "{refused}");
        let older = json!({ "mode": "arp" });
        assert_eq!(same_agent(older.clone(), "00112233445566ff", addr), Ok(older));
    }

    /// The table names each attachment's mode, and warns when the driver carries no XDP
    /// metadata (the VLAN companion then decides some frames twice).
    #[test]
    fn the_table_shows_modes_and_the_metadata_warning() {
        let status = |no_meta: bool| {
            json!({
                "node_ip": "10.0.0.1", "mac": "02:00:00:00:00:01", "pin_path": "/sys/fs/bpf/vip",
                "attached": [
                    { "interface": "eth0", "hook": "xdp", "mode": "native" },
                    { "interface": "eth0", "hook": "tcx", "mode": "vlan_stripped" },
                ],
                "vlan_handoff_no_metadata": no_meta,
            })
        };
        let table = render(&status(false));
        assert!(table.contains("attached  eth0 at xdp (native)\n"), "{table}");
        assert!(table.contains("attached  eth0 at tcx (frames whose VLAN tag the NIC stripped)\n"), "{table}");
        assert!(!table.contains("no XDP metadata"), "{table}");
        assert!(render(&status(true)).contains("warning   the driver carries no XDP metadata"));
    }

    /// The Lease API's state is shown when it does not answer, with its error; a leader
    /// holding the VIP without a Lease (bootstrap) says so.
    #[test]
    fn a_silent_lease_api_and_a_bootstrap_hold_are_shown() {
        let status = json!({
            "agent": {
                "mode": "arp", "not_eligible_because": [], "bootstrap_hold": true,
                "lease_api": { "answering": false, "since_s": 12, "last_error": "Lease API answered 403: forbidden" },
            },
            "vips": [{ "vip": "10.0.0.100", "family": "ipv4", "leader": true, "lease_deadline_ms": 431 }],
        });
        let table = render(&status);
        assert!(table.contains("lease API NOT answering for 12s: Lease API answered 403: forbidden\n"), "{table}");
        assert!(table.contains("LEADER (bootstrap: no Lease yet;"), "{table}");
        let answering = json!({ "agent": { "mode": "arp", "lease_api": { "answering": true, "since_s": 3 } } });
        assert!(render(&answering).contains("lease API answering\n"));
    }

    /// A duplicate identity and a leader serving other VIPs or placing flows otherwise
    /// are shown, not only counted.
    #[test]
    fn what_the_election_warns_of_is_shown() {
        let status = json!({ "agent": { "mode": "arp", "duplicate_instance": "5b6f1807159b4094",
                                        "leader_vips_differ": ["n2", "10.0.0.100,10.0.0.101"],
                                        "leader_flow_placement_differs": ["n3", "maglev1 m=251 seed-check=a3f"] } });
        let table = render(&status);
        assert!(table.contains("another vip-agent runs under this node's name (instance 5b6f1807159b4094)"), "{table}");
        assert!(table.contains("the leader, n2, serves other VIPs (10.0.0.100,10.0.0.101)"), "{table}");
        assert!(table.contains("the leader, n3, places flows otherwise (maglev1 m=251 seed-check=a3f)"), "{table}");
        let quiet = render(&json!({ "agent": { "mode": "arp", "duplicate_instance": null, "leader_vips_differ": null,
                                               "leader_flow_placement_differs": null } }));
        assert!(!quiet.contains("warning"), "{quiet}");
    }

    /// A follower names the node holding the Lease (the leader), so finding it takes
    /// one `status`, not one per node.
    #[test]
    fn a_follower_names_the_lease_holder() {
        let row = |holder: serde_json::Value| {
            let status = json!({
                "agent": { "mode": "arp", "lease_holder": holder },
                "vips": [{ "vip": "10.0.0.100", "family": "ipv4", "leader": false }],
            });
            render(&status).lines().find(|l| l.starts_with("vip ")).unwrap_or_default().to_owned()
        };
        assert!(row(json!("n2")).ends_with("follower (the Lease is held by n2)"), "{}", row(json!("n2")));
        assert!(row(serde_json::Value::Null).ends_with(" follower"), "{}", row(serde_json::Value::Null));
    }

    /// In BGP mode a VIP's row says whether this node advertises it, not "follower".
    #[test]
    fn in_bgp_mode_a_vip_is_advertised_or_not_never_a_follower() {
        let status = |advertised: bool| {
            json!({
                "agent": { "mode": "bgp", "advertised": advertised, "bgp_peers": [] },
                "vips": [{ "vip": "10.0.0.100", "family": "ipv4", "leader": false }],
            })
        };
        let row = |table: String| table.lines().find(|l| l.starts_with("vip ")).unwrap_or_default().to_owned();
        assert!(row(render(&status(true))).ends_with("advertised by BGP"), "{}", render(&status(true)));
        assert!(row(render(&status(false))).ends_with("NOT advertised (BGP)"));
        let arp =
            json!({ "agent": { "mode": "arp" }, "vips": [{ "vip": "10.0.0.100", "family": "ipv4", "leader": false }] });
        assert!(row(render(&arp)).ends_with("follower"));
        // No agent answering: the pins say only that this node does not answer.
        let pinned_only = json!({ "vips": [{ "vip": "10.0.0.100", "family": "ipv4", "leader": false }],
                                  "agent_error": "127.0.0.1:9469: Connection refused" });
        assert!(row(render(&pinned_only)).ends_with("not answering ARP (as pinned; no agent reached)"));
        assert!(render(&pinned_only).contains("backend states are as the agent last wrote them"));
    }

    /// With `--forward local` the table's shares are said not to be used.
    #[test]
    fn a_local_service_says_its_shares_are_unused() {
        let service = |forward: &str| {
            json!({ "services": [{ "vip": "10.0.0.100", "port": 6443, "forward": forward, "table_size": 7,
                                   "unowned_slots": 0, "backends": [] }] })
        };
        assert!(render(&service("local")).contains("the shares below are not used"));
        assert!(!render(&service("dsr")).contains("not used"));
    }

    /// This node's own apiserver is marked local in every state, and the longest state
    /// keeps the columns in line.
    #[test]
    fn the_local_backend_is_marked_in_every_state() {
        let backend = |ip: &str, state: &str, reason: &str| {
            json!({ "backend": ip, "state": state, "reason": reason, "local": true,
                    "table_share": 0.0, "held_slots": 0, "packets": 0, "bytes": 0 })
        };
        let status = json!({
            "services": [{
                "vip": "10.0.0.100", "port": 6443, "forward": "dsr", "table_size": 7, "unowned_slots": 0,
                "backends": [backend("10.0.0.11", "up", ""), backend("10.0.0.12", "draining", "deregistered"),
                             backend("10.0.0.13", "down", "connect")],
            }],
        });
        let table = render(&status);
        let rows: Vec<&str> = table.lines().filter(|l| l.starts_with("  10.0.0.1")).collect();
        for (row, health) in rows.iter().zip(["up,local", "DRAINING(deregistered),local", "DOWN(connect),local"]) {
            assert!(row.contains(&format!(" {health} ")), "{health}: {table}");
        }
        let share_at: Vec<Option<usize>> = rows.iter().map(|r| r.find('%')).collect();
        assert!(share_at.windows(2).all(|w| w[0] == w[1]), "columns out of line:\n{table}");
    }

    /// A draining backend's row says how much of the table it still holds.
    #[test]
    fn a_draining_backend_shows_the_slots_it_holds() {
        let status = json!({
            "services": [{
                "vip": "10.0.0.100", "port": 6443, "forward": "dsr", "table_size": 7, "unowned_slots": 0,
                "backends": [
                    { "backend": "10.0.0.11", "state": "up", "reason": "", "local": false,
                      "table_share": 1.0, "held_slots": 0, "packets": 1, "bytes": 60 },
                    { "backend": "10.0.0.12", "state": "draining", "reason": "not_ready", "local": false,
                      "table_share": 0.0, "held_slots": 3, "packets": 2, "bytes": 120 },
                ],
            }],
        });
        let table = render(&status);
        let row = |ip: &str| table.lines().find(|l| l.contains(ip)).unwrap_or_default().to_owned();
        assert!(row("10.0.0.12").ends_with("  holds 42.9% of slots"), "{table}");
        assert!(!row("10.0.0.11").contains("holds"), "{table}");
        assert!(!row("10.0.0.11").contains("via"), "no next hop by DSR: {table}");
    }

    /// With several services, the table says its per-backend counters are not per
    /// service (the same figures show under each).
    #[test]
    fn per_backend_counters_are_said_to_span_the_services() {
        let service = |vip: &str| json!({ "vip": vip, "port": 6443, "forward": "dsr", "table_size": 7, "unowned_slots": 0, "backends": [] });
        let one = json!({ "services": [service("10.0.0.100")] });
        let two = json!({ "services": [service("10.0.0.100"), service("fd00::100")] });
        assert!(!render(&one).contains("over all its services"));
        assert!(render(&two).contains("(packets and bytes: each backend's, over all its services)"));
    }

    /// An IPIP backend's row names the next hop the agent resolved for it.
    #[test]
    fn an_ipip_backends_next_hop_is_shown() {
        let status = json!({
            "services": [{
                "vip": "10.0.0.100", "port": 6443, "forward": "ipip", "table_size": 7, "unowned_slots": 0,
                "backends": [
                    { "backend": "10.0.0.11", "state": "up", "reason": "", "local": false, "table_share": 1.0,
                      "held_slots": 0, "packets": 1, "bytes": 60,
                      "nexthop": { "mac": "02:00:00:00:00:fe", "mtu": 1500 } },
                ],
            }],
        });
        let table = render(&status);
        assert!(table.contains("  via 02:00:00:00:00:fe mtu 1500\n"), "{table}");
    }
}
