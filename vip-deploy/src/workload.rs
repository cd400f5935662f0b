//! The agent's pod: one container, hostNetwork, on the control-plane nodes, as a
//! DaemonSet (service account) or a kubeadm static pod (the host's kubeconfig).

use std::{collections::BTreeMap, net::IpAddr};

use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, DaemonSetSpec, DaemonSetUpdateStrategy, RollingUpdateDaemonSet},
        core::v1::{
            Affinity, Capabilities, Container, ContainerPort, EnvVar, EnvVarSource, HTTPGetAction,
            HostPathVolumeSource, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm,
            ObjectFieldSelector, Pod, PodSpec, PodTemplateSpec, Probe, ResourceRequirements, SecretKeySelector,
            SecurityContext, Toleration, Volume, VolumeMount,
        },
    },
    apimachinery::pkg::{
        api::resource::Quantity,
        apis::meta::v1::{LabelSelector, ObjectMeta},
        util::intstr::IntOrString,
    },
};

use crate::{
    args::{Attach, Discover, Election, Forward, HealthCheck, Mode},
    rbac::{labels, NAME},
    settings::{BgpPeers, Settings},
};

/// The Linux capabilities the agent container gets, and nothing else (every other one
/// is dropped; no `privileged`). The minimum, found by running the agent binary as uid 0
/// with exactly this set, no_new_privs and read-only /proc/sys and /sys, in a network
/// namespace on Linux 6.18, then with each one removed (`tests/capabilities.rs` does it
/// again on every test run):
///
/// - `NET_ADMIN`: XDP is a networking program type, so loading it needs `NET_ADMIN` as
///   well as `BPF` (without it `BPF_PROG_LOAD` fails with EPERM); also the attach to the
///   interface and the VIP on `lo` over rtnetlink.
/// - `NET_RAW`: the `AF_PACKET` sockets for gratuitous ARP, the RFC 5227 claim probe,
///   the foreign-claim watch and the VIP-path probe. Without it the agent starts but
///   announces nothing (it logs warnings), so clients keep a failed leader's MAC until
///   their ARP caches expire.
/// - `BPF`: `bpf()` itself: maps, program load, pins (and `vip-agent status`).
/// - `PERFMON`: the verifier allows pointer-from-pointer subtraction (the program's
///   packet offsets) only to a loader with it: without, `pointer -= pointer prohibited`.
///
/// Not needed: `SYS_ADMIN` (kernels since 5.8 split `bpf()` rights into `BPF` and
/// `PERFMON`) and `SYS_RESOURCE` (kernels since 5.11 charge BPF memory to the cgroup, not
/// to `RLIMIT_MEMLOCK`).
pub const CAPABILITIES: &[&str] = &["NET_ADMIN", "NET_RAW", "BPF", "PERFMON"];

/// The capabilities the agent needs with `s`: [`CAPABILITIES`], without `NET_RAW` in
/// BGP mode forwarding to the local stack (nothing to announce by ARP, no backend to
/// probe): what is not needed is not granted.
pub fn capabilities(s: &Settings) -> Vec<&'static str> {
    let raw_unused = s.mode == Mode::Bgp && s.forward == Forward::Local;
    CAPABILITIES.iter().copied().filter(|c| !(raw_unused && *c == "NET_RAW")).collect()
}

/// Where bpffs is mounted on the host and in the container: the agent pins its maps and
/// XDP link under `/sys/fs/bpf/vip`, so the next pod adopts them.
const BPFFS: &str = "/sys/fs/bpf";
/// This node's apiserver, where the agent goes (never the `kubernetes` Service), on the
/// VIP's port (`--port`: DSR cannot change ports, so the apiservers listen on it).
fn local_apiserver(s: &Settings) -> String {
    format!("https://127.0.0.1:{}", s.port)
}
/// The kubelet sets `KUBERNETES_SERVICE_HOST`/`_PORT` to the `kubernetes` Service, which
/// nothing implements before the CNI (Cilium without kube-proxy) is up, and Cilium
/// needs the VIP first. Pointing them at the local apiserver keeps any in-cluster
/// client in the pod (a `kubectl exec` tool, `--apiserver in-cluster`) off the Service.
const SERVICE_HOST: &str = "127.0.0.1";
/// SIGTERM to SIGKILL. The agent's stop with the default timers takes about 2.5 s: stop
/// answering ARP, release the Lease (bounded by 2 × renew-deadline = 1.2 s), drain while
/// clients follow the new leader's gratuitous ARP (2 × retry-period + 300 ms = 0.7 s),
/// and meanwhile let the other nodes drain it as a backend (health interval + timeout +
/// half an interval = 2.5 s); then detach or leave the pinned data plane. 10 s is four
/// times that, for a loaded API server, and still short enough not to slow a rolling
/// update.
pub(crate) const TERMINATION_GRACE_SECONDS: i64 = 10;
/// A new pod counts as available this long after it is ready, before the DaemonSet
/// restarts the next node's: time to adopt the pinned data plane, pass `--rise` (2)
/// health checks at `--health-interval` (1 s) and join the election, so the nodes left
/// can take the VIP.
const MIN_READY_SECONDS: i32 = 5;
/// The probe asks the metrics endpoint, which answers once the agent runs; a scrape
/// reads the pinned maps, so give it a generous timeout.
const PROBE_PERIOD_SECONDS: i32 = 5;
const PROBE_TIMEOUT_SECONDS: i32 = 3;
/// Requests only, no limits: throttling or OOM-killing the process that fences the VIP
/// (it must renew every 200 ms or stop answering) is worse than it using more. The
/// figures are the agent's measured idle use with margin: one thread, Maglev tables of
/// 65537 entries per VIP.
const CPU_REQUEST: &str = "50m";
const MEMORY_REQUEST: &str = "64Mi";
/// `node-role.kubernetes.io/control-plane`: kubeadm labels it `""`, K3s `"true"`, hence
/// `Exists` in the affinity.
const CONTROL_PLANE_LABEL: &str = "node-role.kubernetes.io/control-plane";

/// The DaemonSet on every control-plane node.
pub fn daemon_set(s: &Settings) -> DaemonSet {
    let mut pod = pod_spec(s);
    pod.service_account_name = Some(NAME.into());
    pod.node_selector = Some(BTreeMap::from([("kubernetes.io/os".to_owned(), "linux".to_owned())]));
    pod.affinity = Some(control_plane_affinity());
    pod.tolerations = Some(tolerations());
    DaemonSet {
        metadata: ObjectMeta {
            name: Some(NAME.into()),
            namespace: Some(s.namespace.clone()),
            labels: Some(labels()),
            ..ObjectMeta::default()
        },
        spec: Some(DaemonSetSpec {
            selector: LabelSelector { match_labels: Some(labels()), ..LabelSelector::default() },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta { labels: Some(labels()), ..ObjectMeta::default() }),
                spec: Some(pod),
            },
            // One node at a time, never two pods on a node: the new pod adopts the pinned
            // data plane of the old one, and the other nodes keep the VIP meanwhile.
            update_strategy: Some(DaemonSetUpdateStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDaemonSet {
                    max_unavailable: Some(IntOrString::Int(1)),
                    max_surge: Some(IntOrString::Int(0)),
                }),
            }),
            min_ready_seconds: Some(MIN_READY_SECONDS),
            ..DaemonSetSpec::default()
        }),
        status: None,
    }
}

/// The kubeadm static pod: the host's kubeconfig instead of a service account (a static
/// pod may not use one), so it runs on the `kubeadm init` node before RBAC exists.
pub fn static_pod(s: &Settings) -> Pod {
    let mut pod = pod_spec(s);
    let container = &mut pod.containers[0];
    if s.needs_kubeconfig() {
        container.env.get_or_insert_with(Vec::new).push(env("VIP_KUBECONFIG", &s.kubeconfig_path));
    }
    if s.uses_api() {
        // The kubeconfig's server is the control-plane endpoint, which is the VIP: the
        // agent that brings the VIP up must not need it.
        container.env.get_or_insert_with(Vec::new).push(env("VIP_APISERVER", &local_apiserver(s)));
    }
    if s.election == Election::Kubernetes && s.mode == Mode::Arp {
        // During `kubeadm init` admin.conf has no RBAC yet (1.29+): until the Lease API
        // answers, the agent holds the VIP if its ARP probe finds nobody else answering,
        // so neither super-admin.conf nor a manifest switch is needed.
        container.env.get_or_insert_with(Vec::new).push(env("VIP_BOOTSTRAP", "true"));
    }
    if s.needs_kubeconfig() {
        // Not FileOrCreate: an empty file in its place would make kubeadm refuse to write
        // the real one. The kubelet retries until kubeadm has written it.
        mount_host_file(&mut pod, "kubeconfig", &s.kubeconfig_path);
    }
    Pod {
        metadata: ObjectMeta {
            name: Some(NAME.into()),
            namespace: Some(s.namespace.clone()),
            labels: Some(labels()),
            ..ObjectMeta::default()
        },
        spec: Some(pod),
        status: None,
    }
}

/// Mounts the host's file `path` read-only at the same path in the pod's container, as
/// volume `name` (`File`: the kubelet waits for it rather than create an empty one).
fn mount_host_file(pod: &mut PodSpec, name: &str, path: &str) {
    pod.containers[0].volume_mounts.get_or_insert_with(Vec::new).push(VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: Some(true),
        ..VolumeMount::default()
    });
    pod.volumes.get_or_insert_with(Vec::new).push(Volume {
        name: name.into(),
        host_path: Some(HostPathVolumeSource { path: path.into(), type_: Some("File".into()) }),
        ..Volume::default()
    });
}

/// What both forms share.
fn pod_spec(s: &Settings) -> PodSpec {
    let mut pod = pod_spec_base(s);
    if let Some(ca) = &s.health_ca {
        mount_host_file(&mut pod, "health-ca", ca);
    }
    if let Some(BgpPeers::File(path)) = s.bgp.as_ref().map(|b| &b.peers) {
        mount_host_file(&mut pod, "bgp-peer", path);
    }
    pod
}

fn pod_spec_base(s: &Settings) -> PodSpec {
    PodSpec {
        containers: vec![container(s)],
        host_network: Some(true),
        // The node's resolvers, not cluster DNS: ClusterFirstWithHostNet would send
        // lookups to CoreDNS's Service, which needs the CNI. The agent resolves nothing
        // (it dials 127.0.0.1 and IP backends), so this only keeps `kubectl exec` tools
        // working before the CNI is up.
        dns_policy: Some("Default".into()),
        // No Service variables: they name ClusterIPs that may not work yet.
        enable_service_links: Some(false),
        priority_class_name: Some("system-node-critical".into()),
        termination_grace_period_seconds: Some(TERMINATION_GRACE_SECONDS),
        volumes: Some(vec![Volume {
            name: "bpffs".into(),
            host_path: Some(HostPathVolumeSource { path: BPFFS.into(), type_: Some("DirectoryOrCreate".into()) }),
            ..Volume::default()
        }]),
        ..PodSpec::default()
    }
}

fn container(s: &Settings) -> Container {
    let (probe_host, probe_port) = probe_target(s);
    Container {
        name: NAME.into(),
        image: Some(s.image.clone()),
        image_pull_policy: Some("IfNotPresent".into()),
        // Said here, not left to the image, so another build of the image works too.
        command: Some(vec!["/vip-agent".into(), "run".into()]),
        env: Some(agent_env(s)),
        ports: Some(vec![ContainerPort {
            name: Some("metrics".into()),
            container_port: i32::from(s.metrics_addr.port()),
            protocol: Some("TCP".into()),
            ..ContainerPort::default()
        }]),
        readiness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                // The kubelet probes from the host's network namespace, which a hostNetwork
                // pod shares: a loopback-only metrics address is reachable.
                host: Some(probe_host),
                path: Some("/metrics".into()),
                port: IntOrString::Int(probe_port),
                scheme: Some("HTTP".into()),
                ..HTTPGetAction::default()
            }),
            period_seconds: Some(PROBE_PERIOD_SECONDS),
            timeout_seconds: Some(PROBE_TIMEOUT_SECONDS),
            ..Probe::default()
        }),
        resources: Some(ResourceRequirements {
            requests: Some(BTreeMap::from([
                ("cpu".to_owned(), Quantity(CPU_REQUEST.into())),
                ("memory".to_owned(), Quantity(MEMORY_REQUEST.into())),
            ])),
            ..ResourceRequirements::default()
        }),
        security_context: Some(security_context(s)),
        // The agent's last line on a failed start (one line naming the bad value) shows in
        // `kubectl describe pod`.
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        volume_mounts: Some(vec![VolumeMount {
            name: "bpffs".into(),
            mount_path: BPFFS.into(),
            // bpffs mounted on the host after the pod started (by Cilium's init, say)
            // still shows up in the container.
            mount_propagation: Some("HostToContainer".into()),
            ..VolumeMount::default()
        }]),
        ..Container::default()
    }
}

fn security_context(s: &Settings) -> SecurityContext {
    SecurityContext {
        capabilities: Some(Capabilities {
            add: Some(capabilities(s).iter().map(|c| (*c).to_owned()).collect()),
            drop: Some(vec!["ALL".into()]),
        }),
        privileged: Some(false),
        // No setuid binaries in the image, nothing to escalate to.
        allow_privilege_escalation: Some(false),
        // The agent writes only to bpffs (and /proc/sys, read-only in any case).
        read_only_root_filesystem: Some(true),
        // Root, because the kernel checks bpffs and /proc/sys file permissions against the
        // uid, and added capabilities are effective only for uid 0 (no ambient
        // capabilities in Kubernetes).
        run_as_user: Some(0),
        run_as_group: Some(0),
        run_as_non_root: Some(false),
        ..SecurityContext::default()
    }
}

/// Where the kubelet sends the readiness probe: the metrics address, or loopback when it
/// listens on every address.
fn probe_target(s: &Settings) -> (String, i32) {
    let host = match s.metrics_addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => "127.0.0.1".to_owned(),
        IpAddr::V6(ip) if ip.is_unspecified() => "::1".to_owned(),
        ip => ip.to_string(),
    };
    (host, i32::from(s.metrics_addr.port()))
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar { name: name.into(), value: Some(value.into()), value_from: None }
}

fn env_from(name: &str, source: EnvVarSource) -> EnvVar {
    EnvVar { name: name.into(), value: None, value_from: Some(source) }
}

fn joined<T: ToString>(items: &[T]) -> String {
    items.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
}

/// The agent's flags as its `VIP_*` variables, values written as its `run` parses them
/// (lists comma-separated). Settings that tie objects together (the Lease's name and
/// namespace, which the RBAC names) are always written in ARP mode, defaults included;
/// BGP mode has no Lease.
fn agent_env(s: &Settings) -> Vec<EnvVar> {
    let mut vars = vec![
        env("VIP_INTERFACE", s.interface()),
        env("VIP_VIP", &joined(&s.vips)),
        env("VIP_PORT", &s.port.to_string()),
        env(
            "VIP_MODE",
            match s.mode {
                Mode::Arp => "arp",
                Mode::Bgp => "bgp",
            },
        ),
        env(
            "VIP_FORWARD",
            match s.forward {
                Forward::Dsr => "dsr",
                Forward::Ipip => "ipip",
                Forward::Local => "local",
            },
        ),
        // The Lease holder: the node's name as the API knows it (the hostname may differ).
        env_from(
            "VIP_NODE_NAME",
            EnvVarSource {
                field_ref: Some(ObjectFieldSelector { field_path: "spec.nodeName".into(), api_version: None }),
                ..EnvVarSource::default()
            },
        ),
    ];
    // Only when not the default, so manifests rendered before the flag existed stay the same.
    if s.attach == Attach::Tcx {
        vars.push(env("VIP_ATTACH", "tcx"));
    }
    if let Some(vid) = s.vlan {
        vars.push(env("VIP_VLAN", &vid.to_string()));
    }
    // BGP mode has no election: no Lease settings.
    if s.mode == Mode::Arp {
        let election = match s.election {
            Election::Kubernetes => "kubernetes",
            Election::None => "none",
        };
        vars.insert(5, env("VIP_ELECTION", election));
        vars.insert(6, env("VIP_LEASE_NAME", &s.lease_name));
        vars.insert(7, env("VIP_LEASE_NAMESPACE", &s.namespace));
    }
    if s.discover {
        vars.push(env("VIP_DISCOVER", discover_value(Discover::Kubernetes)));
    }
    // Only when not the default, so manifests rendered before the flags existed stay the
    // same.
    if s.health_check == HealthCheck::Tcp {
        vars.push(env("VIP_HEALTH_CHECK", "tcp"));
    }
    if let Some(ca) = &s.health_ca {
        vars.push(env("VIP_HEALTH_CA", ca));
    }
    if !s.backends.is_empty() {
        vars.push(env("VIP_BACKEND", &joined(&s.backends)));
    }
    vars.push(env("VIP_METRICS_ADDR", &s.metrics_addr.to_string()));
    vars.push(env("VIP_KEEP_FORWARDING_ON_EXIT", if s.keep_forwarding_on_exit { "true" } else { "false" }));
    if let Some(bgp) = &s.bgp {
        vars.push(env("VIP_BGP_LOCAL_AS", &bgp.local_as.to_string()));
        if let Some(id) = bgp.router_id {
            vars.push(env("VIP_BGP_ROUTER_ID", &id.to_string()));
        }
        vars.push(match &bgp.peers {
            BgpPeers::Inline(peers) => env("VIP_BGP_PEER", &joined(peers)),
            BgpPeers::File(path) => env("VIP_BGP_PEER_FILE", path),
            BgpPeers::Secret(name) => env_from(
                "VIP_BGP_PEER",
                EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector {
                        name: name.clone(),
                        key: BGP_PEER_SECRET_KEY.into(),
                        optional: Some(false),
                    }),
                    ..EnvVarSource::default()
                },
            ),
        });
        if let Some(hold) = bgp.hold_time {
            vars.push(env("VIP_BGP_HOLD_TIME", &hold.to_string()));
        }
        if let Some(keepalive) = bgp.keepalive {
            vars.push(env("VIP_BGP_KEEPALIVE", &keepalive.to_string()));
        }
    }
    vars.push(env("KUBERNETES_SERVICE_HOST", SERVICE_HOST));
    vars.push(env("KUBERNETES_SERVICE_PORT", &s.port.to_string()));
    vars
}

/// The key of `--bgp-peer-secret`'s Secret that holds `IP:AS[:PASSWORD],...`.
pub const BGP_PEER_SECRET_KEY: &str = "bgp-peer";

fn discover_value(d: Discover) -> &'static str {
    match d {
        Discover::Kubernetes => "kubernetes",
        Discover::None => "none",
    }
}

/// Only control-plane nodes, whatever the label's value.
fn control_plane_affinity() -> Affinity {
    Affinity {
        node_affinity: Some(NodeAffinity {
            required_during_scheduling_ignored_during_execution: Some(NodeSelector {
                node_selector_terms: vec![NodeSelectorTerm {
                    match_expressions: Some(vec![NodeSelectorRequirement {
                        key: CONTROL_PLANE_LABEL.into(),
                        operator: "Exists".into(),
                        values: None,
                    }]),
                    ..NodeSelectorTerm::default()
                }],
            }),
            ..NodeAffinity::default()
        }),
        ..Affinity::default()
    }
}

/// The taints a control-plane node carries before and while the VIP is needed, each
/// tolerated with any effect.
fn tolerations() -> Vec<Toleration> {
    [
        // kubeadm's control-plane taint.
        CONTROL_PLANE_LABEL,
        // K3s's documented taint for servers that run only critical add-ons.
        "CriticalAddonsOnly",
        // No CNI yet (the VIP comes first), or the node briefly unreachable: keep running.
        "node.kubernetes.io/not-ready",
        "node.kubernetes.io/unreachable",
        "node.kubernetes.io/network-unavailable",
        // Cilium taints nodes until its agent runs, and its agent needs the VIP.
        "node.cilium.io/agent-not-ready",
    ]
    .into_iter()
    .map(|key| Toleration { key: Some(key.into()), operator: Some("Exists".into()), ..Toleration::default() })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{args::ManifestArgs, Kind};
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ManifestArgs,
    }

    fn settings(kind: Kind, flags: &[&str]) -> Settings {
        let args = Cli::try_parse_from(["manifest"].iter().chain(flags)).unwrap().args;
        Settings::new(kind, &args).unwrap()
    }

    fn value_of<'a>(vars: &'a [EnvVar], name: &str) -> Option<&'a str> {
        vars.iter().find(|v| v.name == name).and_then(|v| v.value.as_deref())
    }

    #[test]
    fn env_carries_lists_comma_separated_and_keeps_apiserver_clients_off_the_service() {
        let s = settings(
            Kind::Daemonset,
            &["--vip", "192.0.2.10,192.0.2.11", "--interface", "eth0", "--backend", "10.0.0.11:6443,10.0.0.12"],
        );
        let vars = agent_env(&s);
        assert_eq!(value_of(&vars, "VIP_VIP"), Some("192.0.2.10,192.0.2.11"));
        assert_eq!(value_of(&vars, "VIP_BACKEND"), Some("10.0.0.11:6443,10.0.0.12"));
        assert_eq!(value_of(&vars, "VIP_DISCOVER"), Some("kubernetes"));
        assert_eq!(value_of(&vars, "KUBERNETES_SERVICE_HOST"), Some("127.0.0.1"));
        assert_eq!(value_of(&vars, "KUBERNETES_SERVICE_PORT"), Some("6443"));
        assert_eq!(value_of(&vars, "VIP_KEEP_FORWARDING_ON_EXIT"), Some("true"));
        let node = vars.iter().find(|v| v.name == "VIP_NODE_NAME").unwrap();
        assert_eq!(node.value_from.as_ref().unwrap().field_ref.as_ref().unwrap().field_path, "spec.nodeName");
        // The DaemonSet uses its service account against 127.0.0.1 (the agent's default).
        assert_eq!(value_of(&vars, "VIP_KUBECONFIG"), None);
    }

    #[test]
    fn static_pod_mounts_the_kubeconfig_and_talks_to_the_local_apiserver() {
        let s = settings(
            Kind::Pod,
            &["--vip", "192.0.2.10", "--interface", "eth0", "--kubeconfig-path", "/etc/kubernetes/super-admin.conf"],
        );
        let pod = static_pod(&s).spec.unwrap();
        let c = &pod.containers[0];
        let vars = c.env.as_deref().unwrap();
        assert_eq!(value_of(vars, "VIP_KUBECONFIG"), Some("/etc/kubernetes/super-admin.conf"));
        assert_eq!(value_of(vars, "VIP_APISERVER"), Some("https://127.0.0.1:6443"));
        let mount = c.volume_mounts.as_ref().unwrap().iter().find(|m| m.name == "kubeconfig").unwrap();
        assert_eq!(mount.mount_path, "/etc/kubernetes/super-admin.conf");
        let volume = pod.volumes.unwrap().into_iter().find(|v| v.name == "kubeconfig").unwrap();
        assert_eq!(volume.host_path.unwrap().type_.as_deref(), Some("File"));
        assert_eq!(pod.service_account_name, None, "a static pod may not name a service account");
    }

    #[test]
    fn bgp_peers_come_from_the_secret_when_asked() {
        let s = settings(
            Kind::Daemonset,
            &[
                "--vip=192.0.2.10",
                "--interface=eth0",
                "--mode=bgp",
                "--bgp-local-as=65010",
                "--bgp-peer-secret=vip-bgp",
                "--bgp-hold-time=9s",
            ],
        );
        let vars = agent_env(&s);
        let peer = vars.iter().find(|v| v.name == "VIP_BGP_PEER").unwrap();
        let key = peer.value_from.as_ref().unwrap().secret_key_ref.as_ref().unwrap();
        assert_eq!((key.name.as_str(), key.key.as_str()), ("vip-bgp", BGP_PEER_SECRET_KEY));
        assert_eq!(value_of(&vars, "VIP_BGP_HOLD_TIME"), Some("9s"));
        assert_eq!(value_of(&vars, "VIP_MODE"), Some("bgp"));
    }

    /// `--keep-forwarding-on-exit` is written as `run` takes it: alone means true.
    #[test]
    fn keep_forwarding_is_written_as_run_takes_it() {
        let keep = |extra: &[&str]| {
            let mut flags = vec!["--vip=192.0.2.10", "--interface=eth0"];
            flags.extend(extra);
            value_of(&agent_env(&settings(Kind::Daemonset, &flags)), "VIP_KEEP_FORWARDING_ON_EXIT").map(str::to_owned)
        };
        assert_eq!(keep(&[]).as_deref(), Some("true"));
        assert_eq!(keep(&["--keep-forwarding-on-exit"]).as_deref(), Some("true"));
        assert_eq!(keep(&["--keep-forwarding-on-exit=false"]).as_deref(), Some("false"));
    }

    /// `NET_RAW` only where something uses it: not in BGP mode forwarding to the local
    /// stack (no ARP, no backend probed), which a new-user trial ran under
    /// `capsh --drop=cap_net_raw`.
    #[test]
    fn net_raw_is_granted_only_where_it_is_used() {
        let caps = |extra: &[&str]| {
            let mut flags = vec!["--vip=192.0.2.10", "--interface=eth0"];
            flags.extend(extra);
            let s = settings(Kind::Daemonset, &flags);
            security_context(&s).capabilities.unwrap().add.unwrap()
        };
        let bgp = ["--mode=bgp", "--bgp-local-as=65010", "--bgp-peer-secret=vip-bgp"];
        assert!(caps(&[]).contains(&"NET_RAW".to_owned()));
        assert!(caps(&bgp).contains(&"NET_RAW".to_owned()), "BGP with DSR probes its backends");
        let local = caps(&[&bgp[..], &["--forward=local"]].concat());
        assert_eq!(local, ["NET_ADMIN", "BPF", "PERFMON"]);
    }

    #[test]
    fn probe_goes_to_loopback_when_metrics_listen_everywhere() {
        let s = settings(Kind::Daemonset, &["--vip=192.0.2.10", "--interface=eth0", "--metrics-addr=0.0.0.0:9470"]);
        assert_eq!(probe_target(&s), ("127.0.0.1".to_owned(), 9470));
        let s = settings(Kind::Daemonset, &["--vip=192.0.2.10", "--interface=eth0", "--metrics-addr=10.0.0.5:9469"]);
        assert_eq!(probe_target(&s), ("10.0.0.5".to_owned(), 9469));
    }

    #[test]
    fn daemonset_never_has_two_nodes_down_and_tolerates_a_missing_cni() {
        let ds = daemon_set(&settings(Kind::Daemonset, &["--vip=192.0.2.10", "--interface=eth0"])).spec.unwrap();
        let rolling = ds.update_strategy.unwrap().rolling_update.unwrap();
        assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(1)));
        assert_eq!(rolling.max_surge, Some(IntOrString::Int(0)));
        let pod = ds.template.spec.unwrap();
        let keys: Vec<_> = pod.tolerations.unwrap().into_iter().filter_map(|t| t.key).collect();
        for key in ["node.kubernetes.io/not-ready", "node.cilium.io/agent-not-ready", CONTROL_PLANE_LABEL] {
            assert!(keys.iter().any(|k| k == key), "{key} not tolerated");
        }
        let sc = pod.containers[0].security_context.clone().unwrap();
        assert_eq!(sc.privileged, Some(false));
        assert_eq!(sc.capabilities.unwrap().drop, Some(vec!["ALL".to_owned()]));
    }
}
