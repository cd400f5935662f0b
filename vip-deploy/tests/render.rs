//! `render` as a user meets it: what each kind holds, which flags each needs, what is
//! refused, and that every document is a complete k8s-openapi object (it parses back
//! into its type and re-serializes to the same value, so no field is unknown or lost).

mod common;

use common::{all_lines, documents, parse, render};
use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{Pod, ServiceAccount},
        rbac::v1::{Role, RoleBinding},
    },
    serde::{de::DeserializeOwned, Serialize},
};
use serde_yaml::Value;
use vip_deploy::{cilium::CiliumValues, Kind};

fn round_trip<T: DeserializeOwned + Serialize>(doc: &Value) -> Value {
    let typed: T = serde_yaml::from_value(doc.clone()).unwrap_or_else(|e| panic!("{e}: {doc:?}"));
    serde_yaml::to_value(&typed).unwrap()
}

fn kind_of(doc: &Value) -> &str {
    doc.get("kind").and_then(Value::as_str).unwrap_or("")
}

#[test]
fn every_document_parses_back_into_its_type_unchanged() {
    for line in all_lines() {
        let line: Vec<&str> = line.iter().map(String::as_str).collect();
        let yaml = render(&line);
        for doc in documents(&yaml) {
            let back = match kind_of(&doc) {
                "DaemonSet" => round_trip::<DaemonSet>(&doc),
                "Pod" => round_trip::<Pod>(&doc),
                "ServiceAccount" => round_trip::<ServiceAccount>(&doc),
                "Role" => round_trip::<Role>(&doc),
                "RoleBinding" => round_trip::<RoleBinding>(&doc),
                "" if line[0] == "cilium-values" => round_trip::<CiliumValues>(&doc),
                other => panic!("{line:?}: unexpected kind {other:?}"),
            };
            assert_eq!(back, doc, "{line:?}: a field was lost or changed in the round trip");
        }
    }
}

#[test]
fn each_kind_holds_its_objects_in_apply_order() {
    let kinds = |line: &[&str]| documents(&render(line)).iter().map(|d| kind_of(d).to_owned()).collect::<Vec<_>>();
    let rbac = ["ServiceAccount", "Role", "RoleBinding", "Role", "RoleBinding"];
    let mut daemonset = rbac.to_vec();
    daemonset.push("DaemonSet");
    assert_eq!(kinds(&["daemonset", "--vip=192.0.2.100", "--interface=eth0"]), daemonset);
    assert_eq!(kinds(&["k3s", "--vip=192.0.2.100", "--interface=eth0"]), daemonset);
    assert_eq!(kinds(&["rbac"]), rbac);
    assert_eq!(kinds(&["pod", "--vip=192.0.2.100", "--interface=eth0"]), ["Pod"]);
    // No election, no Lease Role; no discovery, no EndpointSlice Role.
    assert_eq!(kinds(&["rbac", "--election=none", "--discover=none"]), ["ServiceAccount"]);
    // BGP mode has no election: every ready node advertises the VIP.
    let bgp = ["rbac", "--mode=bgp", "--bgp-local-as=65010", "--bgp-peer=10.0.0.1:65000", "--discover=none"];
    assert_eq!(kinds(&bgp), ["ServiceAccount"]);
}

#[test]
fn rbac_grants_one_lease_and_the_default_endpointslices_only() {
    let docs = documents(&render(&["rbac", "--namespace=vip-system", "--lease-name=cp-vip"]));
    let roles: Vec<Role> =
        docs.iter().filter(|d| kind_of(d) == "Role").map(|d| serde_yaml::from_value(d.clone()).unwrap()).collect();
    let lease = &roles[0];
    assert_eq!(lease.metadata.namespace.as_deref(), Some("vip-system"));
    let rules = lease.rules.as_ref().unwrap();
    assert_eq!(rules[0].verbs, ["get", "update"]);
    assert_eq!(rules[0].resource_names.as_deref(), Some(&["cp-vip".to_owned()][..]));
    assert_eq!(rules[1].verbs, ["create"]);
    assert_eq!(rules[1].resource_names, None);
    let discovery = &roles[1];
    assert_eq!(discovery.metadata.namespace.as_deref(), Some("default"));
    let rule = &discovery.rules.as_ref().unwrap()[0];
    assert_eq!(rule.api_groups.as_deref(), Some(&["discovery.k8s.io".to_owned()][..]));
    assert_eq!(rule.verbs, ["list", "watch"]);
    for doc in docs.iter().filter(|d| kind_of(d) == "RoleBinding") {
        let binding: RoleBinding = serde_yaml::from_value(doc.clone()).unwrap();
        let subject = &binding.subjects.unwrap()[0];
        assert_eq!((subject.name.as_str(), subject.namespace.as_deref()), ("vip-agent", Some("vip-system")));
    }
    let yaml = render(&["rbac"]);
    assert!(!yaml.contains("ClusterRole"), "no cluster-wide rights: {yaml}");
}

#[test]
fn cilium_values_point_at_the_first_vip() {
    let docs = documents(&render(&["cilium-values", "--vip=192.0.2.100,192.0.2.101", "--port=8443"]));
    let values: CiliumValues = serde_yaml::from_value(docs[0].clone()).unwrap();
    assert!(values.kube_proxy_replacement);
    assert_eq!(values.k8s_service_host, "192.0.2.100");
    assert_eq!(values.k8s_service_port, 8443);
    assert_eq!(values.load_balancer.acceleration, "disabled");
}

/// An IPv6 backend is named as such, not taken for an IPv4 address with a bad port.
#[test]
fn an_ipv6_backend_is_refused_as_such() {
    let e = common::clap_error(&["daemonset", "--vip=fd00::1", "--interface=eth0", "--backend=fd00::11"]);
    assert!(e.contains("\"fd00::11\": backends are IPv4"), "{e}");
}

/// A dual-stack control plane: both VIPs reach the agent, in the order given.
#[test]
fn a_daemonset_carries_vips_of_both_families() {
    let yaml = render(&["daemonset", "--vip=192.0.2.100,2001:db8::100", "--interface=eth0"]);
    let docs = documents(&yaml);
    let ds: DaemonSet =
        serde_yaml::from_value(docs.iter().find(|d| kind_of(d) == "DaemonSet").unwrap().clone()).unwrap();
    let env = ds.spec.unwrap().template.spec.unwrap().containers[0].env.clone().unwrap_or_default();
    let vip = env.iter().find(|e| e.name == "VIP_VIP").and_then(|e| e.value.clone());
    assert_eq!(vip.as_deref(), Some("192.0.2.100,2001:db8::100"), "{yaml}");
}

/// VIPs on a VLAN of a trunk: the VID reaches the agent; without the flag nothing is set.
#[test]
fn a_daemonset_carries_the_vips_vlan() {
    let vlan_of = |line: &[&str]| {
        let docs = documents(&render(line));
        let ds: DaemonSet =
            serde_yaml::from_value(docs.iter().find(|d| kind_of(d) == "DaemonSet").unwrap().clone()).unwrap();
        let env = ds.spec.unwrap().template.spec.unwrap().containers[0].env.clone().unwrap_or_default();
        env.iter().find(|e| e.name == "VIP_VLAN").and_then(|e| e.value.clone())
    };
    assert_eq!(vlan_of(&["daemonset", "--vip=192.0.2.100", "--interface=eth0", "--vlan=100"]).as_deref(), Some("100"));
    assert_eq!(vlan_of(&["daemonset", "--vip=192.0.2.100", "--interface=eth0"]), None);
}

/// With vip at tcx, Cilium's XDP acceleration may have the interface's XDP hook.
#[test]
fn cilium_values_turn_acceleration_on_only_with_attach_tcx() {
    let docs = documents(&render(&["cilium-values", "--vip=192.0.2.100", "--attach=tcx"]));
    let values: CiliumValues = serde_yaml::from_value(docs[0].clone()).unwrap();
    assert_eq!(values.load_balancer.acceleration, "native");
    let yaml = render(&["daemonset", "--vip=192.0.2.100", "--interface=eth0", "--attach=tcx"]);
    assert!(yaml.contains("name: VIP_ATTACH\n          value: tcx"), "{yaml}");
    let yaml = render(&["daemonset", "--vip=192.0.2.100", "--interface=eth0"]);
    assert!(!yaml.contains("VIP_ATTACH"), "the default is not written: {yaml}");
}

#[test]
fn output_starts_with_a_comment_saying_what_it_is() {
    let yaml = render(&["k3s", "--vip=192.0.2.100", "--interface=eth0"]);
    assert!(yaml.starts_with("# vip-agent for K3s"), "{yaml}");
    assert!(yaml.contains("/var/lib/rancher/k3s/server/manifests/vip.yaml"));
}

/// Renders and returns the error message.
fn refused(line: &[&str]) -> String {
    let (kind, args) = parse(line);
    match vip_deploy::render(kind, &args) {
        Ok(yaml) => panic!("{line:?} rendered:\n{yaml}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn missing_and_bad_values_are_named() {
    for (line, needle) in [
        (&["daemonset", "--interface=eth0"][..], "`daemonset` needs --vip"),
        (&["cilium-values"], "`cilium-values` needs --vip"),
        (&["pod", "--vip=192.0.2.100"], "`pod` needs --interface"),
        (&["daemonset", "--vip=224.0.0.1", "--interface=eth0"], "--vip 224.0.0.1: a multicast address"),
        (&["daemonset", "--vip=127.0.0.1", "--interface=eth0"], "loopback"),
        (&["daemonset", "--vip=192.0.2.1,192.0.2.1", "--interface=eth0"], "--vip 192.0.2.1 is given twice"),
        (&["daemonset", "--vip=10.0.0.1", "--interface=eth0", "--vlan=4095"], "--vlan 4095: must be 1 to 4094 (0 and"),
        // The flag's range, not its type's (a new-user trial), as the agent says it.
        (&["daemonset", "--vip=10.0.0.1", "--interface=eth0", "--vlan=-1"], "--vlan -1: must be 1 to 4094 (0 and"),
        (&["daemonset", "--vip=10.0.0.1", "--interface=eth0", "--port=70000"], "--port 70000: must be 1 to 65535"),
        (
            &[
                "daemonset",
                "--vip=10.0.0.1",
                "--interface=eth0",
                "--vlan=100",
                "--mode=bgp",
                "--bgp-local-as=65001",
                "--bgp-peer=10.0.0.1:65000",
            ],
            "--vlan \"100\": is for ARP mode",
        ),
        (&["daemonset", "--vip=fe80::1", "--interface=eth0"], "--vip fe80::1: a link-local address"),
        (
            &[
                "daemonset",
                "--vip=2001:db8::1",
                "--interface=eth0",
                "--mode=bgp",
                "--bgp-local-as=65001",
                "--bgp-peer=10.0.0.1:65000",
            ],
            "--vip 2001:db8::1: BGP mode advertises IPv4 VIPs only",
        ),
        (
            &["daemonset", "--vip=10.0.0.1,2001:db8::1", "--interface=eth0", "--forward=ipip"],
            "--vip 2001:db8::1: --forward ipip carries IPv4 VIPs only",
        ),
        (&["daemonset", "--vip=192.0.2.1", "--interface=eth0/1"], "--interface \"eth0/1\""),
        (
            &["daemonset", "--vip=192.0.2.1", "--interface=eth0", "--backend=0.0.0.0"],
            "the unspecified address is no host",
        ),
        (
            &["daemonset", "--vip=192.0.2.1", "--interface=eth0", "--backend=224.0.0.1"],
            "a multicast address is no host",
        ),
        (&["daemonset", "--vip=192.0.2.1", "--interface=eth0", "--image="], "an image reference is not empty"),
        (
            &[
                "daemonset",
                "--vip=192.0.2.1",
                "--interface=eth0",
                "--mode=bgp",
                "--bgp-local-as=65001",
                "--bgp-peer=10.0.0.1:65000",
                "--bgp-router-id=0.0.0.0",
            ],
            "--bgp-router-id \"0.0.0.0\": a BGP identifier is not zero",
        ),
        (
            &[
                "pod",
                "--vip=192.0.2.1",
                "--interface=eth0",
                "--mode=bgp",
                "--bgp-local-as=65001",
                "--bgp-peer=10.0.0.1:65000",
                "--bgp-router-id=192.0.2.1",
            ],
            "--bgp-router-id \"192.0.2.1\": is a VIP, which every node carries",
        ),
        (
            &[
                "daemonset",
                "--vip=192.0.2.1",
                "--interface=eth0",
                "--mode=bgp",
                "--bgp-local-as=65001",
                "--bgp-peer=10.0.0.1:65000",
                "--bgp-router-id=10.0.0.7",
            ],
            "--bgp-router-id \"10.0.0.7\": would be every node's",
        ),
        (
            &["pod", "--vip=192.0.2.1", "--interface=eth0", "--health-ca=ca.pem"],
            "--health-ca \"ca.pem\": must be an absolute path",
        ),
        (&["daemonset", "--vip=192.0.2.1", "--interface=averyveryverylongname"], "1 to 15 bytes"),
        (&["daemonset", "--vip=192.0.2.1", "--interface=eth0", "--port=0"], "--port 0"),
        (
            &["daemonset", "--vip=192.0.2.1", "--interface=eth0", "--attach=tcx", "--forward=ipip"],
            "--attach tcx cannot --forward ipip",
        ),
        (&["daemonset", "--vip=192.0.2.1", "--interface=eth0", "--backend=192.0.2.1"], "--backend 192.0.2.1 is a VIP"),
        (
            &["daemonset", "--vip=192.0.2.1", "--interface=eth0", "--backend=10.0.0.1,10.0.0.1:6443"],
            "--backend 10.0.0.1:6443 is given twice",
        ),
        (&["rbac", "--namespace=Kube_System"], "--namespace \"Kube_System\": not a DNS-1123 label"),
        (&["rbac", "--lease-name=-x"], "--lease-name \"-x\""),
        (&["pod", "--vip=192.0.2.1", "--interface=eth0", "--kubeconfig-path=admin.conf"], "must be an absolute path"),
        // Flags the output would drop are refused, not ignored.
        (
            &["daemonset", "--vip=192.0.2.1", "--interface=eth0", "--kubeconfig-path=/etc/k.conf"],
            "--kubeconfig-path does not apply to `daemonset`",
        ),
        (&["pod", "--vip=192.0.2.1", "--interface=eth0", "--binary=/bin/vip"], "--binary does not apply to `pod`"),
        (
            &[
                "systemd",
                "--vip=192.0.2.1",
                "--interface=eth0",
                "--election=none",
                "--discover=none",
                "--backend=10.0.0.11",
                "--health-check=tcp",
                "--kubeconfig-path=/etc/k.conf",
            ],
            "--kubeconfig-path \"/etc/k.conf\": nothing would read it",
        ),
        // Every node of a DaemonSet would answer ARP for the VIP.
        (&["daemonset", "--vip=192.0.2.1", "--interface=eth0", "--election=none"], "`daemonset` with --election none"),
        (&["k3s", "--vip=192.0.2.1", "--interface=eth0", "--election=none"], "`k3s` with --election none"),
        (&["daemonset", "--vip=192.0.2.1", "--interface=eth0", "--image=a b"], "--image \"a b\""),
        (
            &["daemonset", "--vip=192.0.2.1", "--interface=eth0", "--bgp-local-as=65000"],
            "--bgp-local-as is for --mode bgp",
        ),
        (&["daemonset", "--vip=192.0.2.1", "--interface=eth0", "--mode=bgp"], "--mode bgp needs --bgp-local-as"),
        (
            &["daemonset", "--vip=192.0.2.1", "--interface=eth0", "--mode=bgp", "--bgp-local-as=65000"],
            "--mode bgp needs --bgp-peer, --bgp-peer-file or --bgp-peer-secret",
        ),
        (
            &[
                "daemonset",
                "--vip=192.0.2.1",
                "--interface=eth0",
                "--mode=bgp",
                "--bgp-local-as=0",
                "--bgp-peer=10.0.0.1:1",
            ],
            "--bgp-local-as 0: reserved",
        ),
        (
            &[
                "daemonset",
                "--vip=192.0.2.1",
                "--interface=eth0",
                "--mode=bgp",
                "--bgp-local-as=23456",
                "--bgp-peer=10.0.0.1:1",
            ],
            "--bgp-local-as 23456: reserved",
        ),
        (
            &[
                "daemonset",
                "--vip=192.0.2.1",
                "--interface=eth0",
                "--mode=bgp",
                "--bgp-local-as=65000",
                "--bgp-peer=[2001:db8::1]:65001",
            ],
            "--bgp-peer 2001:db8::1: IPv6 peers are not supported by the agent yet",
        ),
        (
            &[
                "daemonset",
                "--vip=192.0.2.1",
                "--interface=eth0",
                "--mode=bgp",
                "--bgp-local-as=65000",
                "--bgp-peer=10.0.0.1:65001,10.0.0.1:65002",
            ],
            "--bgp-peer 10.0.0.1: is given twice",
        ),
        (
            &[
                "daemonset",
                "--vip=192.0.2.1",
                "--interface=eth0",
                "--mode=bgp",
                "--bgp-local-as=65000",
                "--bgp-peer=10.0.0.1:1",
                "--bgp-hold-time=2s",
            ],
            "--bgp-hold-time 2s: 0 or 3s to 65535s, whole seconds (RFC 4271)",
        ),
        (
            &[
                "daemonset",
                "--vip=192.0.2.1",
                "--interface=eth0",
                "--mode=bgp",
                "--bgp-local-as=65000",
                "--bgp-peer=10.0.0.1:1",
                "--bgp-hold-time=9s",
                "--bgp-keepalive=4s",
            ],
            "--bgp-keepalive 4s: above zero and at most a third of the hold time (9s)",
        ),
        (
            &[
                "daemonset",
                "--vip=192.0.2.1",
                "--interface=eth0",
                "--mode=bgp",
                "--bgp-local-as=65000",
                "--bgp-peer=10.0.0.1:1",
                "--bgp-hold-time=3500ms",
            ],
            "--bgp-hold-time 3500ms: 0 or 3s to 65535s, whole seconds",
        ),
        (
            &[
                "pod",
                "--vip=192.0.2.1",
                "--interface=eth0",
                "--mode=bgp",
                "--bgp-local-as=65000",
                "--bgp-peer-secret=vip-bgp",
            ],
            "a static pod or a systemd unit cannot reference a Secret",
        ),
    ] {
        let err = refused(line);
        assert!(err.contains(needle), "{line:?}: {err}");
    }
}

/// The keepalive interval stays on the node (only the hold time goes on the wire), so a
/// sub-second one renders, as `vip-agent run` accepts it.
#[test]
fn a_sub_second_keepalive_is_rendered_as_the_agent_accepts_it() {
    let (kind, args) = parse(&[
        "daemonset",
        "--vip=192.0.2.1",
        "--interface=eth0",
        "--mode=bgp",
        "--bgp-local-as=65000",
        "--bgp-peer=10.0.0.1:65001",
        "--bgp-hold-time=3s",
        "--bgp-keepalive=500ms",
    ]);
    let yaml = vip_deploy::render(kind, &args).unwrap();
    let at = yaml.find("name: VIP_BGP_KEEPALIVE").expect("the keepalive is rendered");
    assert!(yaml[at..].lines().nth(1).is_some_and(|l| l.trim() == "value: 500ms"), "{}", &yaml[at..at + 80]);
}

/// A TCP-MD5 password is refused in every kind: each output is readable by others (the
/// API shows a DaemonSet, and a static pod's mirror Pod; `systemctl show` shows a unit's
/// environment to every user). A root-only file on the node (`--bgp-peer-file`) is
/// mounted into the pods, and named in the unit.
#[test]
fn a_bgp_password_is_never_written_where_others_can_read_it() {
    let bgp = ["--vip=192.0.2.1", "--interface=eth0", "--mode=bgp", "--bgp-local-as=65000"];
    for (kind, by) in
        [("daemonset", "the DaemonSet"), ("k3s", "the DaemonSet"), ("pod", "mirror Pod"), ("systemd", "systemctl show")]
    {
        let line: Vec<&str> =
            [kind].iter().chain(&bgp).chain(&["--bgp-peer=10.0.0.1:65001:hunter2"]).copied().collect();
        let err = refused(&line);
        assert!(err.contains("--bgp-peer-file") && err.contains(by), "{kind}: {err}");
        assert!(!err.contains("hunter2"), "the error shows the password: {err}");
    }
    let file = "--bgp-peer-file=/etc/vip/bgp-peers";
    let pod = render(&[&["pod"][..], &bgp, &[file]].concat());
    assert!(pod.contains("name: VIP_BGP_PEER_FILE") && pod.contains("value: /etc/vip/bgp-peers"), "{pod}");
    assert!(pod.contains("mountPath: /etc/vip/bgp-peers") && pod.contains("path: /etc/vip/bgp-peers"), "{pod}");
    let unit = render(&[&["systemd"][..], &bgp, &[file]].concat());
    assert!(unit.contains("Environment=VIP_BGP_PEER_FILE=/etc/vip/bgp-peers"), "{unit}");
    let relative = refused(&[&["pod"][..], &bgp, &["--bgp-peer-file=peers"]].concat());
    assert!(relative.contains("--bgp-peer-file \"peers\": must be an absolute path"), "{relative}");
}

#[test]
fn the_peer_list_and_the_peer_secret_exclude_each_other() {
    let err = common::clap_error(&[
        "daemonset",
        "--vip=192.0.2.1",
        "--interface=eth0",
        "--mode=bgp",
        "--bgp-peer=10.0.0.1:1",
        "--bgp-peer-secret=vip-bgp",
    ]);
    assert!(err.contains("cannot be used with"), "{err}");
}

#[test]
fn kind_names_are_the_cli_contract() {
    use clap::ValueEnum;
    let names: Vec<String> =
        Kind::value_variants().iter().map(|k| k.to_possible_value().unwrap().get_name().to_owned()).collect();
    assert_eq!(names, ["daemonset", "pod", "k3s", "rbac", "cilium-values", "systemd"]);
    for k in Kind::value_variants() {
        assert_eq!(k.to_string(), k.to_possible_value().unwrap().get_name());
    }
}
