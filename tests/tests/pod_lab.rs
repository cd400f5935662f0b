//! The agent as the DaemonSet runs it, with the kubelet's part played by the test: the
//! container's environment is taken from `vip-agent manifest daemonset` (the real
//! rendered YAML), the service account's token, CA and namespace are laid out in
//! `/var/run/secrets/kubernetes.io/serviceaccount` on a tmpfs of the container's own, the
//! process runs with exactly the manifest's capabilities, no_new_privs, and /proc/sys
//! and /sys read-only. The node's namespace has what a control-plane node has: an
//! apiserver (stand-in) on its address serving `/readyz` with a certificate from the
//! cluster CA, only to the service account's bearer token (401 otherwise, as K3s's
//! apiserver answers), and the API (the Lease/EndpointSlice stand-in) on `127.0.0.1:6443` only,
//! requiring the service account's bearer token.
//!
//! Two deviations from the manifest, both for the lab: the pins go to a directory of the
//! test's own (`VIP_PIN_PATH`), and XDP runs in SKB mode (`VIP_XDP_MODE=skb`: native
//! `XDP_TX` on a veth needs a program on the peer).
//!
//! Needs root.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use tests::{
    agent::{agent_bin, leaseapi_bin, standin_bin, wait_until},
    netns::{arping, mac_of, run, unique_tag, veth, Netns},
    pki::Pki,
};

const NODE_NAME: &str = "cp-0";
const NODE_IP: &str = "10.79.0.1";
const CLIENT_IP: &str = "10.79.0.2";
const VIP: &str = "10.79.0.100";
const TOKEN: &str = "sa-token-of-vip-agent";

/// The container's environment from the rendered DaemonSet: each `env` entry's value,
/// `spec.nodeName` resolved as the kubelet resolves a `fieldRef`.
fn manifest_env() -> Vec<(String, String)> {
    let out = run(Command::new(agent_bin()).args(["manifest", "daemonset", "--vip", VIP, "--interface", "eth0"]))
        .expect("vip-agent manifest daemonset");
    let yaml = String::from_utf8_lossy(&out.stdout).into_owned();
    let daemonset = serde_yaml::Deserializer::from_str(&yaml)
        .map(|d| serde::Deserialize::deserialize(d).expect("YAML"))
        .find(|d: &serde_yaml::Value| d["kind"] == "DaemonSet")
        .expect("a DaemonSet in the output");
    let container = &daemonset["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["command"][0], "/vip-agent");
    container["env"]
        .as_sequence()
        .expect("env")
        .iter()
        .map(|e| {
            let name = e["name"].as_str().expect("name").to_owned();
            let value = match (&e["value"], &e["valueFrom"]["fieldRef"]["fieldPath"]) {
                (serde_yaml::Value::String(v), _) => v.clone(),
                (_, f) if f == "spec.nodeName" => NODE_NAME.to_owned(),
                other => panic!("env {name}: no value the test can resolve: {other:?}"),
            };
            (name, value)
        })
        .collect()
}

/// The manifest's capabilities, as `setpriv` takes them.
fn caps() -> String {
    std::iter::once("-all".to_owned())
        .chain(vip_deploy::CAPABILITIES.iter().map(|c| format!("+{}", c.to_ascii_lowercase())))
        .collect::<Vec<_>>()
        .join(",")
}

/// A control-plane node: its namespace, a client namespace on the same segment, the
/// apiserver and API stand-ins, and the service account's files.
struct Node {
    ns: Netns,
    clients: Netns,
    pki: Pki,
    pins: PathBuf,
    sa: PathBuf,
    requests_log: PathBuf,
    servers: Vec<Child>,
}

impl Node {
    fn new() -> Self {
        let tag = unique_tag();
        let ns = Netns::new(&tag, "cp").unwrap();
        let clients = Netns::new(&tag, "cl").unwrap();
        veth(&ns, "eth0", &clients, "eth1").unwrap();
        ns.ip(&["addr", "add", &format!("{NODE_IP}/24"), "dev", "eth0"]).unwrap();
        clients.ip(&["addr", "add", &format!("{CLIENT_IP}/24"), "dev", "eth1"]).unwrap();
        let dir = std::env::temp_dir().join(format!("vip-pod-{tag}"));
        let pki = Pki::new(&dir.join("pki")).unwrap();
        let sa = dir.join("serviceaccount");
        std::fs::create_dir_all(&sa).unwrap();
        std::fs::copy(pki.ca_path(), sa.join("ca.crt")).unwrap();
        std::fs::write(sa.join("token"), TOKEN).unwrap();
        std::fs::write(sa.join("namespace"), "kube-system").unwrap();
        let endpoints = dir.join("endpoints.json");
        std::fs::write(&endpoints, format!(r#"{{"port": 6443, "endpoints": [{{"ip": "{NODE_IP}", "ready": true}}]}}"#))
            .unwrap();
        let node_ip: IpAddr = NODE_IP.parse().unwrap();
        // kubeadm's SANs: the node's address and the `kubernetes` names, never 127.0.0.1,
        // where the agent reaches the API (it verifies the apiserver by name there).
        let (cert, key) = pki.server("apiserver", &[node_ip]).unwrap();
        let apiserver = ns
            .cmd(standin_bin().to_str().unwrap())
            // As K3s's: anonymous `/readyz` is 401 (`--anonymous-auth=false`), so the
            // pod's checks must carry its service account's token.
            .args(["--name", NODE_NAME, "--listen", &format!("{NODE_IP}:6443"), "--token", TOKEN, "--tls-cert"])
            .arg(&cert)
            .arg("--tls-key")
            .arg(&key)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let requests_log = dir.join("requests.log");
        let api = ns
            .cmd(leaseapi_bin().to_str().unwrap())
            .args(["--listen", "127.0.0.1:6443", "--token", TOKEN, "--tls-cert"])
            .arg(&cert)
            .arg("--tls-key")
            .arg(&key)
            .arg("--endpoints")
            .arg(&endpoints)
            .arg("--requests-log")
            .arg(&requests_log)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // `nsenter` keeps the host's /sys (`ip netns exec` would remount it): the pins
        // live on the host's bpffs, as the DaemonSet's hostPath puts them.
        let pins = PathBuf::from(format!("/sys/fs/bpf/vip-pod-{tag}"));
        Self { ns, clients, pki, pins, sa, requests_log, servers: vec![apiserver, api] }
    }

    /// Starts the agent as the kubelet would start the DaemonSet's container.
    fn start_pod(&self) -> Child {
        let script = "set -e
            mount -t tmpfs -o mode=0755 tmpfs /run
            mkdir -p /var/run/secrets/kubernetes.io/serviceaccount
            cp \"$SA\"/ca.crt \"$SA\"/token \"$SA\"/namespace /var/run/secrets/kubernetes.io/serviceaccount/
            mount -o remount,ro /run
            mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys
            mount --rbind /sys /sys && mount -o remount,bind,ro /sys
            exec \"$@\"";
        let caps = caps();
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.ns.name))
            .args(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh"])
            .args(["setpriv", "--reuid=0", "--regid=0", "--clear-groups", "--no-new-privs"])
            .arg(format!("--inh-caps={caps}"))
            .arg(format!("--bounding-set={caps}"))
            .arg(agent_bin())
            .arg("run")
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("SA", &self.sa)
            .envs(manifest_env())
            .env("VIP_PIN_PATH", &self.pins)
            .env("VIP_XDP_MODE", "skb")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        cmd.spawn().expect("nsenter")
    }

    /// `vip-agent status --output json` from the pins.
    fn status(&self) -> Option<serde_json::Value> {
        let out = Command::new(agent_bin())
            .args(["status", "--output", "json", "--pin-path"])
            .arg(&self.pins)
            .output()
            .ok()?;
        out.status.success().then(|| serde_json::from_slice(&out.stdout).ok())?
    }

    fn requests(&self) -> String {
        std::fs::read_to_string(&self.requests_log).unwrap_or_default()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        for s in &mut self.servers {
            let _ = s.kill();
            let _ = s.wait();
        }
        let _ = std::fs::remove_dir_all(&self.pins);
        let _ = std::fs::remove_dir_all(self.pki.dir.parent().unwrap_or(Path::new("/nonexistent")));
    }
}

/// Stops the pod as the kubelet does (SIGTERM) and returns its log.
fn stop(mut pod: Child) -> String {
    let _ = Command::new("kill").args(["-TERM", &pod.id().to_string()]).status();
    let _ = pod.wait();
    let mut log = String::new();
    if let Some(mut err) = pod.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut err, &mut log);
    }
    log
}

#[test]
fn the_daemonset_pod_leads_through_its_service_account_on_the_local_apiserver() {
    let node = Node::new();
    let pod = node.start_pod();
    let leads = wait_until(Duration::from_secs(20), || {
        node.status().is_some_and(|s| {
            s["vips"][0]["leader"] == true
                && s["services"][0]["backends"]
                    .as_array()
                    .is_some_and(|b| b.len() == 1 && b[0]["backend"] == NODE_IP && b[0]["healthy"] == true)
        })
    });
    if !leads {
        let log = stop(pod);
        panic!("the pod never led with its apiserver discovered and healthy: {:?}\n{log}", node.status());
    }
    // The API only listens on 127.0.0.1:6443 and refuses requests without the service
    // account's token: the Lease was taken, and the EndpointSlices watched, through it.
    let requests = node.requests();
    assert!(requests.contains("PUT /apis/coordination.k8s.io/v1/namespaces/kube-system/leases/"), "{requests}");
    assert!(requests.contains("/apis/discovery.k8s.io/v1/namespaces/default/endpointslices"), "{requests}");
    let macs = arping(&node.clients, "eth1", VIP, 2, 3).unwrap();
    assert_eq!(macs, vec![mac_of(&node.ns, "eth0").unwrap(); 2], "ARP for the VIP from the segment");
    // The sysctls went in over rtnetlink, through the read-only /proc/sys.
    let arp_ignore = node.ns.within(|| std::fs::read_to_string("/proc/sys/net/ipv4/conf/eth0/arp_ignore")).unwrap();
    assert_eq!(arp_ignore.unwrap().trim(), "1");
    let log = stop(pod);
    assert!(!log.contains("ERROR"), "{log}");
}

#[test]
fn a_pod_whose_token_the_api_refuses_never_leads() {
    let node = Node::new();
    std::fs::write(node.sa.join("token"), "a-revoked-token").unwrap();
    let pod = node.start_pod();
    std::thread::sleep(Duration::from_secs(4));
    let status = node.status();
    let log = stop(pod);
    assert!(node.requests().contains("/leases/"), "the pod never asked the local API: {log}");
    assert!(status.is_some_and(|s| s["vips"][0]["leader"] == false), "led without a Lease:\n{log}");
    assert_eq!(arping(&node.clients, "eth1", VIP, 1, 1).unwrap(), Vec::<[u8; 6]>::new(), "answered ARP:\n{log}");
}
