//! Helm values for Cilium in kube-proxy-free mode, pointed at the VIP.
//!
//! Without kube-proxy nothing implements the `kubernetes` Service until Cilium runs, so
//! Cilium's agents must reach the API some other way: `k8sServiceHost`. The VIP is the
//! address that survives the loss of any control-plane node. The order is vip first,
//! then Cilium, and it cannot deadlock: vip's pods are hostNetwork, reach their node's
//! apiserver on 127.0.0.1 with a projected token, tolerate the not-ready and
//! `node.cilium.io/agent-not-ready` taints, and so depend on nothing Cilium provides.

use serde::{Deserialize, Serialize};

use crate::{args::Attach, settings::Settings};

/// The values vip needs set; everything else stays Cilium's default.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CiliumValues {
    /// Cilium implements Services itself (kube-proxy is not installed).
    pub kube_proxy_replacement: bool,
    /// The API address Cilium's agents and operator use: the first VIP.
    pub k8s_service_host: String,
    pub k8s_service_port: u16,
    pub load_balancer: LoadBalancer,
}

#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancer {
    /// With vip at XDP (`--attach xdp`, the default): `disabled`, so Cilium's service
    /// load balancing stays at tc. An interface has one XDP slot and vip's program holds
    /// it on the client-facing interface; Cilium's `native` acceleration would fail to
    /// attach there (vip refuses to replace a foreign program in the same way). Said
    /// explicitly so that nobody turns it on without reading this.
    ///
    /// With `--attach tcx`: `native`. vip runs first at tcx ingress, after Cilium's XDP
    /// program, which passes the VIP's traffic (not a Cilium service) up to it.
    pub acceleration: String,
}

/// The values for `s`: the first VIP and the port.
pub fn values(s: &Settings) -> CiliumValues {
    CiliumValues {
        kube_proxy_replacement: true,
        // `Settings` guarantees at least one VIP for this kind.
        k8s_service_host: s.vips.first().map(ToString::to_string).unwrap_or_default(),
        k8s_service_port: s.port,
        load_balancer: LoadBalancer {
            acceleration: match s.attach {
                Attach::Xdp => "disabled",
                Attach::Tcx => "native",
            }
            .into(),
        },
    }
}
