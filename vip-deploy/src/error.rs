//! Why a manifest cannot be rendered. Every variant names the flag and the value at
//! fault (never a BGP password), so the one-line message is enough to fix the command.

use std::net::IpAddr;

use crate::Kind;

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("`{kind}` needs {flag}")]
    Missing { kind: Kind, flag: &'static str },
    #[error("--vip {vip}: {why}")]
    BadVip { vip: IpAddr, why: &'static str },
    #[error("--vip {vip} is given twice")]
    DuplicateVip { vip: IpAddr },
    #[error("{count} VIPs given, the data plane serves at most {max}")]
    TooManyVips { count: usize, max: u32 },
    #[error("--backend {backend} {why}")]
    BadBackend { backend: String, why: &'static str },
    #[error("--attach tcx cannot --forward ipip (encapsulation needs XDP): use --forward dsr, or --attach xdp")]
    TcxIpip,
    /// An integer flag out of its range (read as `i64`, so that a negative or too large
    /// value is told the flag's range, not its type's).
    #[error("--{flag} {value}: must be {range}")]
    Range { flag: &'static str, value: i64, range: &'static str },
    #[error("--{flag} {value:?}: {why}")]
    BadName { flag: &'static str, value: String, why: &'static str },
    #[error("--{flag} is for --mode bgp")]
    BgpFlagWithoutBgp { flag: &'static str },
    #[error("--bgp-local-as {asn}: reserved (RFC 7607, RFC 6793, RFC 7300)")]
    ReservedAs { asn: u32 },
    #[error("--bgp-peer {peer}: {why}")]
    BgpPeer { peer: IpAddr, why: &'static str },
    #[error("--mode bgp needs {flag}")]
    BgpMissing { flag: &'static str },
    #[error("--{flag} {value}: {why}")]
    BgpTimer { flag: &'static str, value: String, why: String },
    #[error(
        "--bgp-peer {peer}: a password in a `{kind}` manifest is readable by {by}; put the peers in a \
         root-only file on each node and give --bgp-peer-file (or, for a DaemonSet, a Secret and \
         --bgp-peer-secret)"
    )]
    PasswordReadable { kind: Kind, peer: IpAddr, by: &'static str },
    #[error("--bgp-peer-secret: a static pod or a systemd unit cannot reference a Secret; give --bgp-peer-file")]
    SecretInStaticPod,
    #[error("--{flag} does not apply to `{kind}` (nothing in its output would read it)")]
    NotForKind { flag: &'static str, kind: Kind },
    #[error(
        "`{kind}` with --election none: the DaemonSet runs on every control-plane node, and each would \
         answer ARP for the VIP; use --election kubernetes, or run one node alone with `pod` or `systemd`"
    )]
    UnelectedEverywhere { kind: Kind },
    #[error("--binary {path:?}: must be an absolute path on the host")]
    RelativeBinary { path: String },
    #[error("--kubeconfig-path {path:?}: must be an absolute path on the host")]
    RelativeKubeconfig { path: String },
    #[error("rendering {what} as YAML")]
    Yaml {
        what: &'static str,
        #[source]
        source: serde_yaml::Error,
    },
}
