//! Backend discovery: the apiservers register themselves in the EndpointSlices of the
//! `default/kubernetes` Service. A kube-runtime watcher follows them (relisting and
//! backing off by itself when the API is unreachable); the agent gets the set of ready
//! IPv4 endpoints whenever it changes, and merges it with health checking.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use futures::StreamExt;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::{
    runtime::{watcher, WatchStreamExt},
    Api,
};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

/// The label the EndpointSlice controller puts on the slices of a Service.
const SERVICE_LABEL: &str = "kubernetes.io/service-name=kubernetes";

/// A discovered apiserver: its address and the port it serves on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    pub port: u16,
}

/// The ready IPv4 endpoints of one slice (`conditions.ready` absent counts as ready, as
/// the API defines).
pub fn endpoints_of(slice: &EndpointSlice) -> Vec<Endpoint> {
    if slice.address_type != "IPv4" {
        return Vec::new();
    }
    let port = slice
        .ports
        .as_ref()
        .and_then(|ports| {
            ports.iter().find(|p| p.name.as_deref() == Some("https")).or(ports.first()).and_then(|p| p.port)
        })
        .and_then(|p| u16::try_from(p).ok())
        .unwrap_or(6443);
    slice
        .endpoints
        .iter()
        .filter(|e| e.conditions.as_ref().and_then(|c| c.ready) != Some(false))
        .flat_map(|e| e.addresses.iter())
        .filter_map(|a| a.parse::<Ipv4Addr>().ok())
        .map(|ip| Endpoint { ip, port })
        .collect()
}

/// How often a failing watch is logged at warn level.
const UNANSWERED_LOG_EVERY: Duration = Duration::from_secs(30);

/// Watches the slices and sends the union of their ready endpoints on every change,
/// except to none.
/// Ends when the receiver is dropped.
pub fn watch(client: kube::Client) -> mpsc::Receiver<BTreeSet<Endpoint>> {
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(async move {
        let api: Api<EndpointSlice> = Api::namespaced(client, "default");
        let mut events = watcher(api, watcher::Config::default().labels(SERVICE_LABEL)).default_backoff().boxed();
        let mut slices: BTreeMap<String, Vec<Endpoint>> = BTreeMap::new();
        let mut init: Option<BTreeMap<String, Vec<Endpoint>>> = None;
        let mut last: Option<BTreeSet<Endpoint>> = None;
        let mut failure_logged: Option<Instant> = None;
        while let Some(event) = events.next().await {
            match event {
                Ok(watcher::Event::Init) => init = Some(BTreeMap::new()),
                Ok(watcher::Event::InitApply(s)) => {
                    if let Some(i) = init.as_mut() {
                        i.insert(s.metadata.name.clone().unwrap_or_default(), endpoints_of(&s));
                    }
                }
                Ok(watcher::Event::InitDone) => {
                    if let Some(i) = init.take() {
                        slices = i;
                    }
                }
                Ok(watcher::Event::Apply(s)) => {
                    slices.insert(s.metadata.name.clone().unwrap_or_default(), endpoints_of(&s));
                }
                Ok(watcher::Event::Delete(s)) => {
                    slices.remove(&s.metadata.name.clone().unwrap_or_default());
                }
                Err(e) => {
                    // The watcher retries with backoff (about once a second at first):
                    // an API that is down, as during `kubeadm init`, is logged once per
                    // UNANSWERED_LOG_EVERY, each try at debug.
                    // With its causes: kube's outer message alone reads the same for a
                    // refused connection and an untrusted certificate.
                    let error = crate::election::error_chain(&e);
                    debug!(%error, "watching the EndpointSlices failed");
                    if failure_logged.is_none_or(|t: Instant| t.elapsed() >= UNANSWERED_LOG_EVERY) {
                        warn!(%error, every = ?UNANSWERED_LOG_EVERY, "watching the kubernetes EndpointSlices failed; retrying (logged again while it lasts)");
                        failure_logged = Some(Instant::now());
                    }
                    continue;
                }
            }
            if init.is_some() {
                continue;
            }
            let now: BTreeSet<Endpoint> = slices.values().flatten().copied().collect();
            // No ready apiserver at all is a moment of the API (the slice deleted and
            // recreated, every endpoint briefly not ready), not a cluster without
            // apiservers: taken literally, it would empty the table and invalidate every
            // pin to another node. The agent keeps the apiservers it has, health-checked.
            if now.is_empty() {
                warn!("no ready apiserver in the EndpointSlices: keeping the ones known");
                continue;
            }
            if last.as_ref() != Some(&now) {
                info!(apiservers = ?now.iter().map(|e| e.ip).collect::<Vec<_>>(), "discovered apiservers");
                last = Some(now.clone());
                if tx.send(now).await.is_err() {
                    return;
                }
            } else {
                debug!("EndpointSlice event without a change of endpoints");
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::discovery::v1::{Endpoint as Ep, EndpointConditions, EndpointPort};

    use super::*;

    fn slice(eps: &[(&str, Option<bool>)], port: i32) -> EndpointSlice {
        EndpointSlice {
            address_type: "IPv4".into(),
            endpoints: eps
                .iter()
                .map(|(ip, ready)| Ep {
                    addresses: vec![ip.to_string()],
                    conditions: Some(EndpointConditions { ready: *ready, ..Default::default() }),
                    ..Default::default()
                })
                .collect(),
            ports: Some(vec![EndpointPort { name: Some("https".into()), port: Some(port), ..Default::default() }]),
            ..Default::default()
        }
    }

    #[test]
    fn ready_ipv4_endpoints_with_the_https_port() {
        let s = slice(&[("10.0.0.11", Some(true)), ("10.0.0.12", Some(false)), ("10.0.0.13", None)], 8443);
        let got = endpoints_of(&s);
        assert_eq!(
            got,
            vec![
                Endpoint { ip: "10.0.0.11".parse().unwrap(), port: 8443 },
                Endpoint { ip: "10.0.0.13".parse().unwrap(), port: 8443 }
            ]
        );
        let mut v6 = s.clone();
        v6.address_type = "IPv6".into();
        assert!(endpoints_of(&v6).is_empty());
    }
}
