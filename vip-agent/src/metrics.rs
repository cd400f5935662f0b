//! Prometheus metrics on `--metrics-addr`.
//!
//! Two sources: the agent's own state (health-check latency, table rebuilds), kept in
//! prometheus-client metrics the agent updates; and the data plane's, read from the
//! pinned maps at scrape time (leadership, backend health and table share, per-backend
//! and per-reason counters), so a scrape always shows what the kernel is doing.

use crate::election::Compared;
use std::{
    collections::BTreeSet,
    fmt,
    net::{Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
        histogram::{exponential_buckets, Histogram},
        MetricType,
    },
    registry::Registry,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};
use tracing::{debug, warn};
use vip_common::{Backend, HealthReason, VipState};

use crate::{
    dataplane::Maps,
    live::{snapshot, SharedView},
};

type Labels = Vec<(String, String)>;

fn backend_labels(backend: Ipv4Addr) -> Labels {
    vec![("backend".to_owned(), backend.to_string())]
}

/// The agent-side metrics.
#[derive(Clone)]
pub struct AgentMetrics {
    pub health_latency: Family<Labels, Histogram>,
    pub table_rebuilds: Counter,
    /// Host state put back after something else changed it, by what.
    pub host_repairs: Family<Labels, Counter>,
    /// Another host claiming a VIP while this node led it, or answering its claim probe.
    pub arp_conflicts: Family<Labels, Counter>,
    /// 1 while another agent process is seen running under this node's name.
    pub duplicate_identity: Gauge,
    /// 1 while the Lease holder serves other VIPs than this node.
    pub leader_vips_differ: Gauge,
    pub leader_flow_placement_differs: Gauge,
    /// The backends `health_latency` has a series for, so that a backend that left can
    /// lose its series (a Family cannot list its labels).
    checked: Arc<Mutex<BTreeSet<Ipv4Addr>>>,
}

impl AgentMetrics {
    /// Every metric at its start: no series yet, gauges at 0. Check durations in
    /// buckets from 0.5 ms doubling to about 4 s.
    fn new() -> Self {
        Self {
            health_latency: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.0005, 2.0, 14))),
            table_rebuilds: Counter::default(),
            host_repairs: Family::default(),
            arp_conflicts: Family::default(),
            duplicate_identity: Gauge::default(),
            leader_vips_differ: Gauge::default(),
            leader_flow_placement_differs: Gauge::default(),
            checked: Arc::default(),
        }
    }

    pub fn observe_check(&self, backend: Ipv4Addr, seconds: f64) {
        self.health_latency.get_or_create(&backend_labels(backend)).observe(seconds);
        if let Ok(mut checked) = self.checked.lock() {
            checked.insert(backend);
        }
    }

    /// Drops the check-duration series of every backend not in `current` (removed from
    /// the table): with discovery's churn, frozen series of gone apiservers would pile up.
    pub fn forget_backends_except(&self, current: &BTreeSet<Ipv4Addr>) {
        let Ok(mut checked) = self.checked.lock() else { return };
        for gone in checked.iter().filter(|ip| !current.contains(ip)) {
            self.health_latency.remove(&backend_labels(*gone));
        }
        checked.retain(|ip| current.contains(ip));
    }

    /// Every series this node can count, at 0 before its first event, so that an
    /// `increase(...) > 0` alert sees the first one: a repair of each kind, a conflict
    /// for each VIP.
    pub fn start_at_zero(&self, vips: &[std::net::IpAddr], attachment: &str) {
        for what in ["vip_address", "arp_sysctl", "forwarding", attachment] {
            let _ = self.host_repairs.get_or_create(&vec![("what".to_owned(), what.to_owned())]);
        }
        for vip in vips {
            let _ = self.arp_conflicts.get_or_create(&vec![("vip".to_owned(), vip.to_string())]);
        }
    }

    pub fn repaired(&self, what: &str) {
        self.host_repairs.get_or_create(&vec![("what".to_owned(), what.to_owned())]).inc();
    }

    pub fn arp_conflict(&self, vip: std::net::IpAddr) {
        self.arp_conflicts.get_or_create(&vec![("vip".to_owned(), vip.to_string())]).inc();
    }

    pub fn duplicate_identity(&self, seen: bool) {
        self.duplicate_identity.set(i64::from(seen));
    }

    /// Sets the gauge of `what` ([`Compared`]): 1 while the Lease holder differs from
    /// this node in it.
    pub fn leader_differs(&self, what: Compared, differ: bool) {
        let gauge = match what {
            Compared::Vips => &self.leader_vips_differ,
            Compared::FlowPlacement => &self.leader_flow_placement_differs,
        };
        gauge.set(i64::from(differ));
    }
}

/// Builds the registry: agent metrics plus a collector over the pinned maps.
pub fn registry(maps: Maps, live: SharedView) -> (Registry, AgentMetrics) {
    let mut registry = Registry::default();
    let metrics = AgentMetrics::new();
    registry.register(
        "vip_health_check_duration_seconds",
        "Time a backend health check took, successful or not",
        metrics.health_latency.clone(),
    );
    registry.register("vip_table_rebuilds", "Maglev tables rebuilt and made live", metrics.table_rebuilds.clone());
    registry.register(
        "vip_host_repairs",
        "Host state (VIP on lo, ARP sysctls, forwarding) put back after something else changed it",
        metrics.host_repairs.clone(),
    );
    registry.register(
        "vip_arp_conflicts",
        "Another host claimed a VIP this node leads, or answered its claim probe",
        metrics.arp_conflicts.clone(),
    );
    registry.register(
        "vip_duplicate_identity",
        "1 while another vip-agent process is seen running under this node's name",
        metrics.duplicate_identity.clone(),
    );
    registry.register(
        "vip_leader_vips_differ",
        "1 while the Lease holder serves other VIPs than this node (a VIP only the followers carry goes unanswered)",
        metrics.leader_vips_differ.clone(),
    );
    registry.register(
        "vip_leader_flow_placement_differs",
        "1 while the Lease holder places flows otherwise than this node (another flow-hash seed or Maglev size): connections it balanced are reset if this node takes over",
        metrics.leader_flow_placement_differs.clone(),
    );
    registry.register_collector(Box::new(MapsCollector { maps: Mutex::new(maps) }));
    registry.register_collector(Box::new(LiveCollector { live }));
    (registry, metrics)
}

struct MapsCollector {
    maps: Mutex<Maps>,
}

impl fmt::Debug for MapsCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MapsCollector")
    }
}

fn family<'a>(
    encoder: &'a mut DescriptorEncoder<'_>,
    name: &'a str,
    help: &str,
    ty: MetricType,
) -> Result<prometheus_client::encoding::MetricEncoder<'a>, fmt::Error> {
    encoder.encode_descriptor(name, help, None, ty)
}

impl Collector for MapsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let Ok(maps) = self.maps.lock() else { return Ok(()) };
        let now = crate::clock::boot_ns();
        if let Ok(vips) = maps.vips() {
            let mut f = family(
                &mut encoder,
                "vip_is_leader",
                "1 if this node answers for the VIP (ARP, or Neighbor Discovery for IPv6)",
                MetricType::Gauge,
            )?;
            for (vip, state) in vips {
                let v = i64::from(VipState::leads_at(&state, now));
                let family = if vip.is_ipv4() { "ipv4" } else { "ipv6" };
                ConstGauge::new(v)
                    .encode(f.encode_family(&[("vip", vip.to_string()), ("family", family.to_owned())])?)?;
            }
        }
        let backends = maps.backends().unwrap_or_default();
        {
            let mut f = family(
                &mut encoder,
                "vip_backend_up",
                "1 if the backend is healthy and in the table",
                MetricType::Gauge,
            )?;
            for (_, b) in &backends {
                let up = i64::from(b.flags & Backend::F_UP != 0);
                ConstGauge::new(up).encode(f.encode_family(&[("backend", Ipv4Addr::from(b.ip).to_string())])?)?;
            }
        }
        {
            let mut f = family(
                &mut encoder,
                "vip_backend_state",
                "1 for the backend's state (up, draining, down) and the reason it is not up",
                MetricType::Gauge,
            )?;
            for (_, b) in &backends {
                let labels = [
                    ("backend", Ipv4Addr::from(b.ip).to_string()),
                    ("state", backend_state(b).to_owned()),
                    ("reason", HealthReason::from_u8(b.reason).name().to_owned()),
                ];
                ConstGauge::new(1).encode(f.encode_family(&labels)?)?;
            }
        }
        {
            let mut f =
                family(&mut encoder, "vip_backend_packets", "Packets sent to the backend", MetricType::Counter)?;
            for (id, b) in &backends {
                if let Ok(s) = maps.backend_stats(*id) {
                    ConstCounter::new(s.packets)
                        .encode(f.encode_family(&[("backend", Ipv4Addr::from(b.ip).to_string())])?)?;
                }
            }
        }
        {
            let mut f = family(&mut encoder, "vip_backend_bytes", "Bytes sent to the backend", MetricType::Counter)?;
            for (id, b) in &backends {
                if let Ok(s) = maps.backend_stats(*id) {
                    ConstCounter::new(s.bytes)
                        .encode(f.encode_family(&[("backend", Ipv4Addr::from(b.ip).to_string())])?)?;
                }
            }
        }
        if let Ok(counters) = maps.counters() {
            let mut f = family(
                &mut encoder,
                "vip_packets",
                "Frames seen by the data plane, by verdict reason",
                MetricType::Counter,
            )?;
            for (reason, n) in counters {
                ConstCounter::new(n).encode(f.encode_family(&[("reason", reason.name())])?)?;
            }
        }
        Ok(())
    }
}

/// The agent's live state: eligibility, and in BGP mode the announcement and sessions.
struct LiveCollector {
    live: SharedView,
}

impl fmt::Debug for LiveCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("LiveCollector")
    }
}

impl Collector for LiveCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let v = snapshot(&self.live);
        ConstGauge::new(i64::from(v.eligible)).encode(family(
            &mut encoder,
            "vip_eligible",
            "1 if this node can carry the VIPs (apiserver ready, link up, no foreign claimant)",
            MetricType::Gauge,
        )?)?;
        if !v.hook.is_empty() {
            let mut f = family(
                &mut encoder,
                "vip_attached",
                "1 for each hook the data plane runs at: xdp (mode native or skb) or tcx (mode ingress), \
                 and the tcx companion beside XDP for VLAN tags the NIC stripped (mode vlan_stripped)",
                MetricType::Gauge,
            )?;
            let mode = match v.hook {
                "xdp" => v.xdp_mode.unwrap_or("unknown"),
                _ => "ingress",
            };
            ConstGauge::new(1).encode(f.encode_family(&[("hook", v.hook.to_owned()), ("mode", mode.to_owned())])?)?;
            if v.vlan_companion {
                ConstGauge::new(1)
                    .encode(f.encode_family(&[("hook", "tcx".to_owned()), ("mode", "vlan_stripped".to_owned())])?)?;
            }
        }
        if let Some(api) = &v.lease_api {
            ConstGauge::new(i64::from(api.answering)).encode(family(
                &mut encoder,
                "vip_lease_api_answering",
                "1 while the Lease API answers this node's election (0: no node can take or renew the Lease through it)",
                MetricType::Gauge,
            )?)?;
        }
        if let Some(adv) = v.advertised {
            ConstGauge::new(i64::from(adv)).encode(family(
                &mut encoder,
                "vip_bgp_advertised",
                "1 if this node's routes to the VIPs were sent to at least one Established BGP peer (its import policy may still refuse them)",
                MetricType::Gauge,
            )?)?;
        }
        if v.bgp_peers.is_empty() {
            return Ok(());
        }
        {
            let mut f = family(
                &mut encoder,
                "vip_bgp_session_state",
                "1 for the BGP session's current state (RFC 4271 FSM), 0 for the others",
                MetricType::Gauge,
            )?;
            // Every state, 0 but the current one: an alert on `state="Established"} == 0`
            // must see a session that is down (a trial found the series gone instead).
            for p in &v.bgp_peers {
                for state in vip_bgp::session::State::ALL.map(vip_bgp::session::State::name) {
                    ConstGauge::new(i64::from(p.state == state))
                        .encode(f.encode_family(&[("peer", p.address.clone()), ("state", state.to_owned())])?)?;
                }
            }
        }
        /// A per-peer counter: metric name, help, and how to read it.
        type PeerCounter = (&'static str, &'static str, fn(&crate::live::PeerView) -> u64);
        let counters: [PeerCounter; 2] = [
            ("vip_bgp_messages_received", "BGP messages received from the peer", |p| p.messages_received),
            ("vip_bgp_messages_sent", "BGP messages sent to the peer", |p| p.messages_sent),
        ];
        for (name, help, get) in counters {
            let mut f = family(&mut encoder, name, help, MetricType::Counter)?;
            for p in &v.bgp_peers {
                ConstCounter::new(get(p)).encode(f.encode_family(&[("peer", p.address.clone())])?)?;
            }
        }
        let mut f = family(
            &mut encoder,
            "vip_bgp_session_uptime_seconds",
            "How long the BGP session has been Established (0 when it is not)",
            MetricType::Gauge,
        )?;
        for p in &v.bgp_peers {
            ConstGauge::new(p.uptime_s.unwrap_or(0) as i64).encode(f.encode_family(&[("peer", p.address.clone())])?)?;
        }
        Ok(())
    }
}

/// A backend's state as the data plane has it: up (takes new flows), draining (keeps
/// its pinned flows only), down.
pub fn backend_state(b: &Backend) -> &'static str {
    if b.flags & Backend::F_UP != 0 {
        "up"
    } else if b.flags & Backend::F_SERVING != 0 {
        "draining"
    } else {
        "down"
    }
}

/// Binds the metrics listener (before anything else is set up, so a taken port fails
/// the start cleanly).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// How long a scraper may take to send its request.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// How long one exchange may take in all, the answer's write included: a client that
/// sends its request and never reads would otherwise hold its descriptor for ever.
const EXCHANGE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// Clients served at once; one more is closed as soon as it is accepted. Why: the
/// endpoint answers anyone who can reach it (loopback by default: every local user, and
/// every host-network pod), and the agent's descriptors are the ones its health checks,
/// Lease calls and raw sockets need. Prometheus scrapes with one connection at a time.
pub const MAX_CLIENTS: usize = 32;
/// The pause after a failed accept (out of descriptors, say): without it the loop would
/// spin on the runtime the election shares.
const ACCEPT_BACKOFF: std::time::Duration = std::time::Duration::from_millis(100);

/// Serves `GET /metrics` and `GET /status` until the task is dropped, to at most
/// [`MAX_CLIENTS`] clients at once, each bounded by [`EXCHANGE_TIMEOUT`]. A scrape
/// reads the pinned maps (up to a thousand syscalls): it runs on a blocking thread,
/// never on the runtime the election shares.
pub async fn serve(listener: TcpListener, registry: Arc<Registry>, live: SharedView) {
    serve_at_most(listener, registry, live, MAX_CLIENTS).await
}

async fn serve_at_most(listener: TcpListener, registry: Arc<Registry>, live: SharedView, clients: usize) {
    let slots = Arc::new(tokio::sync::Semaphore::new(clients));
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(error) => {
                warn!(%error, "metrics accept failed");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!(%peer, limit = clients, "metrics client refused: too many at once");
            continue;
        };
        let (registry, live) = (registry.clone(), live.clone());
        tokio::spawn(async move {
            if tokio::time::timeout(EXCHANGE_TIMEOUT, answer(stream, peer, registry, live)).await.is_err() {
                debug!(%peer, "metrics exchange too slow: closed");
            }
            drop(slot);
        });
    }
}

/// One client's exchange: its request read (within [`REQUEST_TIMEOUT`]), answered, and
/// the connection closed.
async fn answer(mut stream: tokio::net::TcpStream, peer: SocketAddr, registry: Arc<Registry>, live: SharedView) {
    let Ok(Some(head)) = tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut stream)).await else {
        debug!(%peer, "metrics request incomplete or too slow");
        return;
    };
    let mut words = head.split_whitespace();
    let (method, path) = (words.next().unwrap_or("").to_owned(), words.next().unwrap_or("").to_owned());
    let (status, ctype, body) = if method != "GET" && method != "HEAD" {
        ("405 Method Not Allowed\r\nAllow: GET, HEAD", "text/plain", "GET or HEAD only\n".into())
    } else if path == "/metrics" || path.starts_with("/metrics?") {
        let encoded = tokio::task::spawn_blocking(move || {
            let mut body = String::new();
            prometheus_client::encoding::text::encode(&mut body, &registry).map(|()| body)
        })
        .await;
        match encoded {
            Ok(Ok(body)) => ("200 OK", "application/openmetrics-text; version=1.0.0; charset=utf-8", body),
            _ => ("500 Internal Server Error", "text/plain", "encoding failed\n".into()),
        }
    } else if path == "/status" {
        match serde_json::to_string(&snapshot(&live)) {
            Ok(json) => ("200 OK", "application/json", json),
            Err(_) => ("500 Internal Server Error", "text/plain", "encoding failed\n".into()),
        }
    } else {
        ("404 Not Found", "text/plain", "try /metrics or /status\n".into())
    };
    // HEAD: the headers GET would have, without the body (RFC 9110 §9.3.2).
    let shown = if method == "HEAD" { "" } else { body.as_str() };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{shown}",
        body.len()
    );
    if let Err(error) = stream.write_all(response.as_bytes()).await {
        debug!(%peer, %error, "metrics write failed");
    }
}

/// Reads an HTTP request head (up to 4 KiB); `None` if the client closed first.
async fn read_head(stream: &mut tokio::net::TcpStream) -> Option<String> {
    let mut buf = vec![0u8; 4096];
    let mut len = 0;
    while len < buf.len() {
        match stream.read(&mut buf[len..]).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => len += n,
        }
        if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    Some(String::from_utf8_lossy(&buf[..len]).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> (Registry, AgentMetrics) {
        let m = AgentMetrics::new();
        let mut r = Registry::default();
        r.register("check", "", m.health_latency.clone());
        r.register("repairs", "", m.host_repairs.clone());
        r.register("conflicts", "", m.arp_conflicts.clone());
        (r, m)
    }

    fn text(r: &Registry) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, r).unwrap();
        out
    }

    /// Clients that connect and send nothing take at most the endpoint's slots: one more
    /// is closed at once (it held a descriptor for ever, and a thousand of them starved
    /// the agent's checks and Lease calls), and a scrape is answered again as soon as
    /// a slot is free.
    #[tokio::test]
    async fn idle_clients_beyond_the_limit_are_closed_and_scrapes_go_on() {
        use tokio::net::TcpStream;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve_at_most(listener, Arc::new(Registry::default()), SharedView::default(), 4));
        let mut idle = Vec::new();
        for _ in 0..4 {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        let mut extra = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(std::time::Duration::from_secs(2), extra.read(&mut buf)).await;
        assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "the client over the limit was not closed: {read:?}");
        drop(idle);
        // The slots come free as the server sees the idle clients go.
        let mut answer = String::new();
        for _ in 0..40 {
            let mut scrape = TcpStream::connect(addr).await.unwrap();
            answer.clear();
            if scrape.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await.is_ok()
                && scrape.read_to_string(&mut answer).await.is_ok()
                && !answer.is_empty()
            {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        assert!(answer.starts_with("HTTP/1.1 200 OK"), "no scrape answered once the idle clients went: {answer:?}");
        server.abort();
    }

    /// A backend that left the table loses its check-duration series; the others keep
    /// theirs.
    #[test]
    fn a_removed_backend_loses_its_check_series() {
        let (r, m) = metrics();
        let (a, b) = (Ipv4Addr::new(10, 0, 0, 11), Ipv4Addr::new(10, 0, 0, 12));
        m.observe_check(a, 0.001);
        m.observe_check(b, 0.001);
        m.forget_backends_except(&BTreeSet::from([a]));
        let out = text(&r);
        assert!(out.contains("check_count{backend=\"10.0.0.11\"} 1"), "{out}");
        assert!(!out.contains("10.0.0.12"), "{out}");
    }

    /// `GET` gets the body, `HEAD` the same headers without it, anything else 405.
    #[tokio::test(flavor = "current_thread")]
    async fn only_get_and_head_are_answered() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (registry, m) = metrics();
        m.start_at_zero(&[], "xdp_attachment");
        tokio::spawn(serve(listener, Arc::new(registry), SharedView::default()));
        let ask = |method: &'static str| async move {
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(format!("{method} /metrics HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        };
        let get = ask("GET").await;
        assert!(get.starts_with("HTTP/1.1 200 OK") && get.contains("repairs_total"), "{get}");
        let head = ask("HEAD").await;
        assert!(head.starts_with("HTTP/1.1 200 OK") && head.ends_with("\r\n\r\n"), "{head}");
        let post = ask("POST").await;
        assert!(post.starts_with("HTTP/1.1 405 Method Not Allowed\r\nAllow: GET, HEAD"), "{post}");
    }

    /// Every repair kind and every VIP's conflicts are shown at 0 before the first event.
    #[test]
    fn counters_exist_at_zero_before_their_first_event() {
        let (r, m) = metrics();
        m.start_at_zero(&["10.0.0.100".parse().unwrap()], "xdp_attachment");
        let out = text(&r);
        for line in [
            "repairs_total{what=\"vip_address\"} 0",
            "repairs_total{what=\"xdp_attachment\"} 0",
            "conflicts_total{vip=\"10.0.0.100\"} 0",
        ] {
            assert!(out.contains(line), "{line} missing:\n{out}");
        }
    }
}
