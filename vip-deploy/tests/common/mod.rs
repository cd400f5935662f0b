//! What the integration tests share: parsing flags as `vip-agent manifest` will, and
//! the sets of flags every kind is rendered with.

#![allow(dead_code)] // Each test binary uses its own part.

use std::path::PathBuf;

use clap::Parser;
use vip_deploy::{Kind, ManifestArgs};

/// `vip-agent manifest KIND` as the agent wires it: the kind, then the flags.
#[derive(Parser)]
#[command(name = "manifest")]
pub struct Cli {
    #[arg(value_enum)]
    pub kind: Kind,
    #[command(flatten)]
    pub args: ManifestArgs,
}

/// Parses `kind flags...` (panics on a flag clap refuses: these are fixtures).
pub fn parse(line: &[&str]) -> (Kind, ManifestArgs) {
    let cli = Cli::try_parse_from(std::iter::once("manifest").chain(line.iter().copied()))
        .unwrap_or_else(|e| panic!("{line:?}: {e}"));
    (cli.kind, cli.args)
}

/// clap's message for `kind flags...`, which it must refuse.
pub fn clap_error(line: &[&str]) -> String {
    match Cli::try_parse_from(std::iter::once("manifest").chain(line.iter().copied())) {
        Ok(_) => panic!("{line:?} was accepted"),
        Err(e) => e.to_string(),
    }
}

/// Renders `kind flags...`.
pub fn render(line: &[&str]) -> String {
    let (kind, args) = parse(line);
    vip_deploy::render(kind, &args).unwrap_or_else(|e| panic!("{line:?}: {e}"))
}

/// Flag sets covering every option: defaults, several VIPs with static backends and no
/// discovery or election, and BGP with peers inline or from a Secret, at tcx.
pub const FLAG_SETS: &[&[&str]] = &[
    &["--vip", "192.0.2.100", "--interface", "eth0"],
    &[
        "--vip=192.0.2.100,192.0.2.101",
        "--vip=192.0.2.102",
        "--interface=bond0.42",
        "--port=8443",
        "--forward=ipip",
        "--election=none",
        "--discover=none",
        "--backend=10.0.0.11,10.0.0.12:6443",
        "--namespace=vip-system",
        "--lease-name=cp-vip",
        "--metrics-addr=0.0.0.0:9470",
        "--keep-forwarding-on-exit=false",
        "--image=registry.example/vip-agent:dev",
        "--health-ca=/etc/vip/apiserver-ca.pem",
    ],
    &[
        "--vip=192.0.2.100",
        "--interface=eth0",
        "--mode=bgp",
        "--bgp-local-as=65010",
        "--bgp-peer-secret=vip-bgp",
        "--bgp-hold-time=9s",
        "--bgp-keepalive=3s",
        "--attach=tcx",
        "--health-check=tcp",
    ],
];

/// Kinds that every flag set renders (the static pod refuses --bgp-peer-secret; the
/// DaemonSets refuse --election none, which would make every node answer ARP).
pub fn kinds_for(flags: &[&str]) -> Vec<Kind> {
    let secret = flags.iter().any(|f| f.starts_with("--bgp-peer-secret"));
    let unelected = flags.contains(&"--election=none");
    [Kind::Daemonset, Kind::Pod, Kind::K3s, Kind::Rbac, Kind::CiliumValues]
        .into_iter()
        .filter(|k| !(secret && *k == Kind::Pod))
        .filter(|k| !(unelected && matches!(k, Kind::Daemonset | Kind::K3s)))
        .collect()
}

/// Every (kind, flags) line the object tests run over, plus a static pod with inline
/// BGP peers (no password: none is allowed inline) and one with its peers in a file and
/// its own router id (a DaemonSet refuses one: every node would share it).
pub fn all_lines() -> Vec<Vec<String>> {
    let mut lines: Vec<Vec<String>> = Vec::new();
    for flags in FLAG_SETS {
        for kind in kinds_for(flags) {
            let mut line = vec![kind.to_string()];
            line.extend(flags.iter().map(|f| (*f).to_owned()));
            lines.push(line);
        }
    }
    for peers in ["--bgp-peer=10.0.0.1:65000,10.0.0.2:65000", "--bgp-peer-file=/etc/vip/bgp-peers"] {
        let mut line = ["pod", "--vip=192.0.2.100", "--interface=eth0", "--mode=bgp", "--bgp-local-as=65010", peers]
            .map(str::to_owned)
            .to_vec();
        if peers.starts_with("--bgp-peer-file") {
            line.push("--bgp-router-id=10.0.0.11".to_owned());
        }
        lines.push(line);
    }
    lines
}

/// The YAML documents of a stream, as values.
pub fn documents(yaml: &str) -> Vec<serde_yaml::Value> {
    use serde::Deserialize;
    serde_yaml::Deserializer::from_str(yaml).map(|d| serde_yaml::Value::deserialize(d).expect("valid YAML")).collect()
}

/// The workspace root.
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}
