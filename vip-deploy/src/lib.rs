//! Kubernetes manifests for `vip-agent`, rendered from typed k8s-openapi objects (never
//! from string templates), for `vip-agent manifest daemonset|pod|k3s|rbac|cilium-values|systemd`.
//!
//! ```text
//! ManifestArgs ──Settings::new(kind)──▶ Settings ──▶ rbac / workload / cilium ──▶ yaml ──▶ String
//!   (clap flags)     (checked per kind)                (k8s-openapi objects)     (documents)
//! ```
//!
//! What every agent container gets (module `workload`): hostNetwork, the agent's flags as
//! `VIP_*` variables, `KUBERNETES_SERVICE_HOST=127.0.0.1` so that nothing in the pod
//! depends on the `kubernetes` Service (the CNI may need the VIP to come up: K3s with
//! Cilium replacing kube-proxy), the smallest capability set that runs the agent, and
//! bpffs from the host for the pinned data plane.

pub mod args;
pub mod cilium;
pub mod error;
pub mod names;
mod rbac;
mod settings;
mod systemd;
pub mod vips;
mod workload;
mod yaml;

use std::fmt;

pub use args::{ManifestArgs, DEFAULT_IMAGE};
pub use error::RenderError;
pub use workload::CAPABILITIES;

use settings::Settings;

/// What `vip-agent manifest` renders.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// ServiceAccount, Roles and RoleBindings, and the DaemonSet on the control-plane nodes.
    Daemonset,
    /// A kubeadm static pod (`/etc/kubernetes/manifests/vip-agent.yaml`) that reaches the
    /// API with the host's kubeconfig, so it runs before any RBAC exists.
    Pod,
    /// The DaemonSet and its RBAC as one K3s auto-deploy manifest
    /// (`/var/lib/rancher/k3s/server/manifests/vip.yaml`).
    K3s,
    /// The ServiceAccount, Roles and RoleBindings alone.
    Rbac,
    /// Helm values that point Cilium's kube-proxy replacement at the VIP.
    CiliumValues,
    /// A systemd unit (`/etc/systemd/system/vip-agent.service`) for a host whose vip is
    /// not run by the kubelet: the static pod's settings, as a service.
    Systemd,
}

impl Kind {
    /// Whether the output runs the agent (and so needs `--interface`).
    fn runs_agent(self) -> bool {
        matches!(self, Kind::Daemonset | Kind::Pod | Kind::K3s | Kind::Systemd)
    }

    /// Who, besides root on the node, can read what the kind's output holds: a
    /// DaemonSet is in the API; so is a static pod, whose mirror Pod the kubelet creates
    /// with its whole spec; a unit's `Environment=` lines are shown to every user by
    /// `systemctl show`.
    fn readable_by(self) -> &'static str {
        match self {
            Kind::Daemonset | Kind::K3s => "anyone who can read the DaemonSet",
            Kind::Pod => "anyone who can read pods in its namespace (the kubelet's mirror Pod)",
            Kind::Systemd => "every user on the node (systemctl show)",
            Kind::Rbac | Kind::CiliumValues => "nobody (it holds no peers)",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Daemonset => "daemonset",
            Kind::Pod => "pod",
            Kind::K3s => "k3s",
            Kind::Rbac => "rbac",
            Kind::CiliumValues => "cilium-values",
            Kind::Systemd => "systemd",
        })
    }
}

/// Renders `kind` for `args` as YAML (several `---`-separated documents for the kinds
/// that hold several objects), with a comment on top saying what it is and where it
/// goes.
///
/// # Errors
/// A [`RenderError`] naming the flag at fault when `args` lacks what `kind` needs
/// (`--vip`, `--interface`, BGP settings for `--mode bgp`), holds a value the agent would
/// refuse (a multicast VIP, a duplicate backend, a bad name), or would store a BGP
/// password in the API.
pub fn render(kind: Kind, args: &ManifestArgs) -> Result<String, RenderError> {
    let s = Settings::new(kind, args)?;
    if kind == Kind::Systemd {
        let comment: String = header(&s).lines().map(|l| format!("# {l}\n")).collect();
        return Ok(comment + &systemd::unit(&s));
    }
    let mut out = yaml::Documents::new(&header(&s));
    match kind {
        Kind::Daemonset | Kind::K3s => {
            rbac::push(&s, &mut out)?;
            out.push("DaemonSet", &workload::daemon_set(&s))?;
        }
        Kind::Pod => out.push("Pod", &workload::static_pod(&s))?,
        Kind::Rbac => rbac::push(&s, &mut out)?,
        Kind::CiliumValues => out.push("Cilium values", &cilium::values(&s))?,
        Kind::Systemd => {}
    }
    Ok(out.finish())
}

/// The comment on top of each kind's output: what it is, where it goes, and for the
/// kinds that run the agent, the host mount it relies on.
fn header(s: &Settings) -> String {
    let local = format!("127.0.0.1:{}", s.port);
    let what = match s.kind {
        Kind::Daemonset => &format!(
            "vip-agent on every control-plane node: RBAC, then the DaemonSet.\n\
             Apply with `kubectl apply -f`; the agent reaches its node's apiserver on {local}."
        ),
        Kind::Pod if !s.uses_api() => {
            "vip-agent as a kubeadm static pod: put this file in /etc/kubernetes/manifests/ on each\n\
             control-plane node. It uses no Kubernetes API (no election, static backends)."
        }
        Kind::Pod => {
            "vip-agent as a kubeadm static pod: put this file in /etc/kubernetes/manifests/ on each\n\
             control-plane node. It reaches the API with the host's kubeconfig, so it runs before RBAC exists."
        }
        Kind::K3s => {
            "vip-agent for K3s: save as /var/lib/rancher/k3s/server/manifests/vip.yaml on a server\n\
             (K3s applies it at start, before any CNI). For a server started with\n\
             --disable-kube-proxy --flannel-backend=none and Cilium: install Cilium after the VIP answers."
        }
        Kind::Rbac => {
            "RBAC of vip-agent: the Lease it is elected with, and the EndpointSlices of\n\
             default/kubernetes it discovers the apiservers from. Nothing else."
        }
        Kind::Systemd if !s.uses_api() => {
            "vip-agent as a systemd service: save as /etc/systemd/system/vip-agent.service on each\n\
             node, then `systemctl daemon-reload && systemctl enable --now vip-agent`.\n\
             It uses no Kubernetes API (no election, static backends)."
        }
        Kind::Systemd => &format!(
            "vip-agent as a systemd service: save as /etc/systemd/system/vip-agent.service on each\n\
             control-plane node, then `systemctl daemon-reload && systemctl enable --now vip-agent`.\n\
             It reaches the API with the host's kubeconfig on {local}, so it runs before RBAC exists."
        ),
        Kind::CiliumValues => {
            "Helm values for Cilium without kube-proxy: its agents reach the API through the VIP.\n\
             Order: vip first (the VIP must answer), then `helm install cilium cilium/cilium -n kube-system -f THIS`.\n\
             No deadlock: vip reaches the API on 127.0.0.1 and needs nothing Cilium provides."
        }
    };
    let mut text = what.to_owned();
    if s.kind.runs_agent() {
        // The ARP sysctls need no presetting: the agent writes them over rtnetlink
        // (IFLA_INET_CONF), which a read-only /proc/sys does not stop.
        text.push_str("\nEach node first needs bpffs on /sys/fs/bpf (systemd mounts it).");
    }
    text
}
