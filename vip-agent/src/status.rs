//! `vip-agent status`: what the data plane is doing, from the pinned maps, readable at a
//! glance (or as JSON).

use std::{fmt::Write as _, net::Ipv4Addr, path::Path};

use serde_json::{json, Value};
use vip_common::{Backend, ForwardMode, HealthReason, MAGLEV_MAX_M, NO_BACKEND};

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

/// Everything `status` shows, as JSON (the table is rendered from it).
pub fn collect(pin_path: &Path) -> Result<Value, StatusError> {
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
            json!({ "vip": vip.to_string(), "leader": leader, "lease_deadline_ms": deadline_ms })
        })
        .collect();
    let backends = maps.backends()?;
    let mut services = Vec::new();
    for (key, svc) in maps.services()? {
        let m = svc.m.min(MAGLEV_MAX_M);
        let table = maps.read_table(svc.slot, svc.active, m)?;
        let mut shares: Vec<Value> = Vec::new();
        for (id, b) in &backends {
            let slots = table.iter().filter(|&&e| e == *id).count();
            let stats = maps.backend_stats(*id)?;
            shares.push(json!({
                "backend": Ipv4Addr::from(b.ip).to_string(),
                "healthy": b.flags & Backend::F_UP != 0,
                "state": crate::metrics::backend_state(b),
                "reason": HealthReason::from_u8(b.reason).name(),
                "local": b.flags & Backend::F_LOCAL != 0,
                "table_share": slots as f64 / f64::from(m.max(1)),
                "packets": stats.packets,
                "bytes": stats.bytes,
            }));
        }
        let empty = table.iter().filter(|&&e| e == NO_BACKEND).count();
        services.push(json!({
            "vip": Ipv4Addr::from(key.vip).to_string(),
            "port": u16::from_be_bytes(key.port),
            "forward": ForwardMode::from_u8(svc.mode).map_or("?", ForwardMode::name),
            "table_size": m,
            "unowned_slots": empty,
            "backends": shares,
        }));
    }
    let counters: serde_json::Map<String, Value> =
        maps.counters()?.into_iter().filter(|(_, n)| *n > 0).map(|(r, n)| (r.name().to_owned(), json!(n))).collect();
    let mac = config.mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
    Ok(json!({
        "pin_path": pin_path.display().to_string(),
        "mac": mac,
        "node_ip": Ipv4Addr::from(config.ip).to_string(),
        "vips": vips,
        "services": services,
        "counters": counters,
        "connections_tracked": maps.conn_count(),
    }))
}

/// The human-readable table.
pub fn render(s: &Value) -> String {
    let mut out = String::new();
    let str_of = |v: &Value| v.as_str().unwrap_or("?").to_owned();
    let _ =
        writeln!(out, "node      {} {}   (pins {})", str_of(&s["node_ip"]), str_of(&s["mac"]), str_of(&s["pin_path"]));
    for v in s["vips"].as_array().into_iter().flatten() {
        let role = match (v["leader"].as_bool(), v["lease_deadline_ms"].as_u64()) {
            (Some(true), Some(ms)) => format!("LEADER (lease valid {ms} ms more)"),
            (Some(true), None) => "LEADER".to_owned(),
            _ => "follower".to_owned(),
        };
        let _ = writeln!(out, "vip       {:<16} {role}", str_of(&v["vip"]));
    }
    for svc in s["services"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "\nservice   {}:{}  forward={}  maglev M={}",
            str_of(&svc["vip"]),
            svc["port"],
            str_of(&svc["forward"]),
            svc["table_size"]
        );
        let _ = writeln!(out, "  {:<16} {:<20} {:>7} {:>12} {:>14}", "BACKEND", "HEALTH", "SHARE", "PACKETS", "BYTES");
        for b in svc["backends"].as_array().into_iter().flatten() {
            let state = str_of(&b["state"]);
            let health = match (state.as_str(), b["local"].as_bool(), b["reason"].as_str()) {
                ("up", Some(true), _) => "up,local".to_owned(),
                ("up", _, _) => "up".to_owned(),
                (s, _, Some(r)) if !r.is_empty() => format!("{}({r})", s.to_uppercase()),
                (s, _, _) => s.to_uppercase(),
            };
            let share = b["table_share"].as_f64().unwrap_or(0.0) * 100.0;
            let _ = writeln!(
                out,
                "  {:<16} {:<20} {:>6.1}% {:>12} {:>14}",
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
    let _ = writeln!(out, "\nconnections tracked: {}", s["connections_tracked"]);
    let _ = writeln!(out, "counters:");
    for (k, v) in s["counters"].as_object().into_iter().flatten() {
        let _ = writeln!(out, "  {k:<22} {:>12}", v.as_u64().unwrap_or(0));
    }
    out
}
