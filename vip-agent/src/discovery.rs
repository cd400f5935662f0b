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

use crate::apiclient::{ClientSource, Rebuilds};

/// The label the EndpointSlice controller puts on the slices of a Service.
const SERVICE_LABEL: &str = "kubernetes.io/service-name=kubernetes";

/// A discovered apiserver: its address and the port it serves on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    pub port: u16,
}

/// The ready IPv4 endpoints of one slice (`conditions.ready` absent counts as ready, as
/// the API defines) that are hosts: an unspecified, loopback, multicast or broadcast
/// address is left out, as `--backend` refuses it (the slice is written by whoever may
/// update EndpointSlices in `default`, not checked by the API).
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
        .filter(|ip| !(ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() || ip.is_broadcast()))
        .map(|ip| Endpoint { ip, port })
        .collect()
}

/// How often a failing watch is logged at warn level.
const UNANSWERED_LOG_EVERY: Duration = Duration::from_secs(30);

/// Watches the slices and sends the union of their ready endpoints on every change,
/// except to none. A watch refused with 401 builds the client again from `source`
/// (where `client` came from; see [`Rebuilds`]) and starts over, as the Lease client
/// does. Ends when the receiver is dropped.
pub fn watch(client: kube::Client, source: ClientSource) -> mpsc::Receiver<BTreeSet<Endpoint>> {
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(async move {
        let rebuilds = Rebuilds::new(source);
        let mut client = client;
        let mut slices = Slices::default();
        let mut failure_logged: Option<Instant> = None;
        loop {
            let api: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
            let mut events = watcher(api, watcher::Config::default().labels(SERVICE_LABEL)).default_backoff().boxed();
            // The watcher's stream never ends by itself: the loop ends with a new client
            // after a 401, or the task when the receiver is gone.
            client = loop {
                let event = match events.next().await {
                    Some(Ok(event)) => event,
                    Some(Err(e)) => {
                        log_failure(&e, &mut failure_logged);
                        if !is_unauthorized(&e) {
                            continue;
                        }
                        match rebuilds.after_unauthorized("the EndpointSlice watch").await {
                            Some(fresh) => break fresh,
                            None => continue,
                        }
                    }
                    None => return,
                };
                let Some(now) = slices.apply(event) else { continue };
                if tx.send(now).await.is_err() {
                    return;
                }
            };
            // The new watcher starts with a relist (`Init`), which replaces whatever
            // relist the refused one had begun.
        }
    });
    rx
}

/// Whether the watcher failed because the API refused this node's credentials.
fn is_unauthorized(e: &watcher::Error) -> bool {
    match e {
        watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => s.code == 401,
        watcher::Error::WatchError(s) => s.code == 401,
        _ => false,
    }
}

/// Logs a failed watch: each try at debug, and at warn once per [`UNANSWERED_LOG_EVERY`]
/// (the watcher retries with backoff, about once a second at first: an API that is down,
/// as during `kubeadm init`, would flood the log).
fn log_failure(e: &watcher::Error, logged: &mut Option<Instant>) {
    // With its causes: kube's outer message alone reads the same for a refused
    // connection and an untrusted certificate.
    let error = crate::election::error_chain(e);
    debug!(%error, "watching the EndpointSlices failed");
    if logged.is_none_or(|t: Instant| t.elapsed() >= UNANSWERED_LOG_EVERY) {
        warn!(%error, every = ?UNANSWERED_LOG_EVERY, "watching the kubernetes EndpointSlices failed; retrying (logged again while it lasts)");
        *logged = Some(Instant::now());
    }
}

/// The slices as the watch has shown them, and the endpoint set last sent.
#[derive(Default)]
struct Slices {
    /// Slice name → its ready endpoints.
    current: BTreeMap<String, Vec<Endpoint>>,
    /// A relist in progress (between `Init` and `InitDone`): replaces `current` whole.
    relist: Option<BTreeMap<String, Vec<Endpoint>>>,
    last: Option<BTreeSet<Endpoint>>,
}

impl Slices {
    /// Takes in one watch event; the set of ready endpoints to send if it changed.
    fn apply(&mut self, event: watcher::Event<EndpointSlice>) -> Option<BTreeSet<Endpoint>> {
        match event {
            watcher::Event::Init => self.relist = Some(BTreeMap::new()),
            watcher::Event::InitApply(s) => {
                if let Some(r) = self.relist.as_mut() {
                    r.insert(s.metadata.name.clone().unwrap_or_default(), endpoints_of(&s));
                }
            }
            watcher::Event::InitDone => {
                if let Some(r) = self.relist.take() {
                    self.current = r;
                }
            }
            watcher::Event::Apply(s) => {
                self.current.insert(s.metadata.name.clone().unwrap_or_default(), endpoints_of(&s));
            }
            watcher::Event::Delete(s) => {
                self.current.remove(&s.metadata.name.clone().unwrap_or_default());
            }
        }
        if self.relist.is_some() {
            return None;
        }
        let now: BTreeSet<Endpoint> = self.current.values().flatten().copied().collect();
        // No ready apiserver at all is a moment of the API (the slice deleted and
        // recreated, every endpoint briefly not ready), not a cluster without
        // apiservers: taken literally, it would empty the table and invalidate every
        // pin to another node. The agent keeps the apiservers it has, health-checked.
        if now.is_empty() {
            warn!("no ready apiserver in the EndpointSlices: keeping the ones known");
            return None;
        }
        if self.last.as_ref() == Some(&now) {
            debug!("EndpointSlice event without a change of endpoints");
            return None;
        }
        info!(apiservers = ?now.iter().map(|e| e.ip).collect::<Vec<_>>(), "discovered apiservers");
        self.last = Some(now.clone());
        Some(now)
    }
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

    #[test]
    fn addresses_that_are_no_host_are_left_out() {
        let eps = ["0.0.0.0", "127.0.0.1", "224.0.0.5", "255.255.255.255", "10.0.0.11"].map(|ip| (ip, None));
        assert_eq!(endpoints_of(&slice(&eps, 6443)), vec![Endpoint { ip: "10.0.0.11".parse().unwrap(), port: 6443 }]);
    }
}
