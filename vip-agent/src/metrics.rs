//! Prometheus metrics on `--metrics-addr`.
//!
//! Two sources: the agent's own state (health-check latency, table rebuilds), kept in
//! prometheus-client metrics the agent updates; and the data plane's, read from the
//! pinned maps at scrape time (leadership, backend health and table share, per-backend
//! and per-reason counters), so a scrape always shows what the kernel is doing.

use std::{
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
        gauge::ConstGauge,
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
use vip_common::{Backend, VipState};

use crate::dataplane::Maps;

/// The agent-side metrics.
#[derive(Clone)]
pub struct AgentMetrics {
    pub health_latency: Family<Vec<(String, String)>, Histogram>,
    pub table_rebuilds: Counter,
}

impl AgentMetrics {
    pub fn observe_check(&self, backend: Ipv4Addr, seconds: f64) {
        self.health_latency.get_or_create(&vec![("backend".to_owned(), backend.to_string())]).observe(seconds);
    }
}

/// Builds the registry: agent metrics plus a collector over the pinned maps.
pub fn registry(maps: Maps) -> (Registry, AgentMetrics) {
    let mut registry = Registry::default();
    let metrics = AgentMetrics {
        health_latency: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.0005, 2.0, 14))),
        table_rebuilds: Counter::default(),
    };
    registry.register(
        "vip_health_check_duration_seconds",
        "Time a backend health check took, successful or not",
        metrics.health_latency.clone(),
    );
    registry.register("vip_table_rebuilds", "Maglev tables rebuilt and made live", metrics.table_rebuilds.clone());
    registry.register_collector(Box::new(MapsCollector { maps: Mutex::new(maps) }));
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
            let mut f =
                family(&mut encoder, "vip_is_leader", "1 if this node answers ARP for the VIP", MetricType::Gauge)?;
            for (vip, state) in vips {
                let v = i64::from(VipState::leads_at(&state, now));
                ConstGauge::new(v).encode(f.encode_family(&[("vip", vip.to_string())])?)?;
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

/// Binds the metrics listener (before anything else is set up, so a taken port fails
/// the start cleanly).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves `GET /metrics` until the task is dropped.
pub async fn serve(listener: TcpListener, registry: Arc<Registry>) {
    loop {
        let (mut stream, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(error) => {
                warn!(%error, "metrics accept failed");
                continue;
            }
        };
        let registry = registry.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut len = 0;
            while len < buf.len() {
                match stream.read(&mut buf[len..]).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => len += n,
                }
                if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            let head = String::from_utf8_lossy(&buf[..len]);
            let path = head.split_whitespace().nth(1).unwrap_or("");
            let (status, ctype, body) = if path == "/metrics" || path.starts_with("/metrics?") {
                let mut body = String::new();
                match prometheus_client::encoding::text::encode(&mut body, &registry) {
                    Ok(()) => ("200 OK", "application/openmetrics-text; version=1.0.0; charset=utf-8", body),
                    Err(_) => ("500 Internal Server Error", "text/plain", "encoding failed\n".into()),
                }
            } else {
                ("404 Not Found", "text/plain", "try /metrics\n".into())
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            if let Err(error) = stream.write_all(response.as_bytes()).await {
                debug!(%peer, %error, "metrics write failed");
            }
        });
    }
}
