//! `vip-agent manifest systemd`: a unit systemd accepts, with the static pod's settings.

mod common;

use common::render;

/// The unit's `Environment=` assignments, unquoted.
fn environment(unit: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|l| l.strip_prefix("Environment="))
        .map(|v| v.trim_matches('"').replace("\\\"", "\"").replace("\\\\", "\\"))
        .collect()
}

#[test]
fn the_unit_carries_the_static_pods_settings() {
    let unit = render(&["systemd", "--vip=192.0.2.100", "--interface=eth0", "--attach=tcx"]);
    assert!(unit.starts_with("# vip-agent as a systemd service"), "{unit}");
    assert!(unit.contains("\nExecStart=/usr/local/bin/vip-agent run\n"), "{unit}");
    let env = environment(&unit);
    for want in [
        "VIP_INTERFACE=eth0",
        "VIP_VIP=192.0.2.100",
        "VIP_ELECTION=kubernetes",
        "VIP_KUBECONFIG=/etc/kubernetes/admin.conf",
        "VIP_APISERVER=https://127.0.0.1:6443",
        "VIP_BOOTSTRAP=true",
        "VIP_ATTACH=tcx",
        "VIP_KEEP_FORWARDING_ON_EXIT=true",
    ] {
        assert!(env.iter().any(|e| e == want), "{want} missing: {env:?}");
    }
    assert!(!env.iter().any(|e| e.starts_with("VIP_NODE_NAME")), "the node name is the hostname here: {env:?}");
    assert!(unit.contains("\nCapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW CAP_BPF CAP_PERFMON\n"), "{unit}");
    assert!(unit.contains("\nTimeoutStopSec=10s\n"), "{unit}");
    assert!(unit.contains("\nStartLimitIntervalSec=0\n"), "restarts until the kubeconfig exists: {unit}");
}

/// Static backends without a cluster (`--election none --discover none`): the unit names
/// no API server, and a kubeconfig only where the HTTPS checks take their CA from it.
/// With a kubeconfig named the host may not have, the agent refused to start, and
/// `Restart=always` restarted it for ever. `--port` reaches the API server URL too.
#[test]
fn a_unit_without_a_cluster_names_no_kubeconfig_it_does_not_need() {
    let no_cluster = ["systemd", "--vip=192.0.2.100", "--interface=eth0", "--election=none", "--discover=none"];
    let with = |extra: &[&str]| {
        let line: Vec<&str> = no_cluster.iter().chain(extra).copied().collect();
        let unit = render(&line);
        (environment(&unit), unit)
    };
    let has = |env: &[String], name: &str| env.iter().any(|e| e.starts_with(&format!("{name}=")));
    for (extra, kubeconfig) in [
        (&["--backend=10.0.0.11", "--health-check=tcp"][..], false),
        (&["--backend=10.0.0.11", "--health-ca=/etc/vip/ca.pem"], false),
        // HTTPS checks with no CA of their own verify with the kubeconfig's.
        (&["--backend=10.0.0.11"], true),
    ] {
        let (env, unit) = with(extra);
        assert!(!has(&env, "VIP_APISERVER"), "{extra:?}: {env:?}");
        assert_eq!(has(&env, "VIP_KUBECONFIG"), kubeconfig, "{extra:?}: {env:?}");
        assert!(unit.contains("It uses no Kubernetes API"), "{unit}");
    }
    let (env, _) = with(&["--backend=10.0.0.11", "--health-check=tcp", "--health-ca=/etc/vip/ca.pem"]);
    for want in ["VIP_HEALTH_CHECK=tcp", "VIP_HEALTH_CA=/etc/vip/ca.pem"] {
        assert!(env.iter().any(|e| e == want), "{want} missing: {env:?}");
    }
    let elected = render(&["systemd", "--vip=192.0.2.100", "--interface=eth0", "--port=7443"]);
    let env = environment(&elected);
    assert!(env.iter().any(|e| e == "VIP_APISERVER=https://127.0.0.1:7443"), "{env:?}");
    assert!(elected.contains("kubeconfig on 127.0.0.1:7443"), "{elected}");
}

#[test]
fn a_secret_cannot_be_referenced_and_the_binary_path_is_absolute() {
    let (kind, args) = common::parse(&[
        "systemd",
        "--vip=192.0.2.1",
        "--interface=eth0",
        "--mode=bgp",
        "--bgp-local-as=65000",
        "--bgp-peer-secret=vip-bgp",
    ]);
    let err = vip_deploy::render(kind, &args).unwrap_err().to_string();
    assert!(err.contains("a static pod or a systemd unit cannot reference a Secret"), "{err}");
    let (kind, args) = common::parse(&["systemd", "--vip=192.0.2.1", "--interface=eth0", "--binary=vip-agent"]);
    let err = vip_deploy::render(kind, &args).unwrap_err().to_string();
    assert!(err.contains("--binary \"vip-agent\": must be an absolute path"), "{err}");
}

/// systemd's own parser accepts the unit (`systemd-analyze verify`, offline), when it is
/// installed; the binary path must exist for it, so the unit names `/bin/true`.
#[test]
fn systemd_analyze_verifies_the_unit() {
    let Ok(probe) = std::process::Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!("systemd-analyze not installed: skipped");
        return;
    };
    assert!(probe.status.success());
    let unit = render(&[
        "systemd",
        "--vip=192.0.2.100",
        "--interface=eth0",
        "--binary=/bin/true",
        "--mode=bgp",
        "--bgp-local-as=65010",
        // A value that needs quoting: a space, a `%` specifier, a quote.
        "--bgp-peer-file=/etc/vip/bgp pe%er\"s",
    ]);
    let dir = std::env::temp_dir().join(format!("vip-systemd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("vip-agent.service");
    std::fs::write(&path, &unit).unwrap();
    let out = std::process::Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(&path).output().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}\n{unit}");
    assert!(!stderr.contains("vip-agent.service:"), "systemd complains about the unit: {stderr}");
    assert!(environment(&unit).iter().any(|e| e == "VIP_BGP_PEER_FILE=/etc/vip/bgp pe%%er\"s"), "{unit}");
}
