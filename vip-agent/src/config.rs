//! Command-line contract (see `shared/design.md`) and its validation.
//!
//! Every `run` flag can come from three places, in this order of precedence: the command
//! line, the environment (`VIP_` + the flag in upper snake case, e.g. `VIP_HEALTH_INTERVAL`),
//! and a YAML file named by `--config` whose keys are the flag names (`health-interval: 2s`,
//! `backend: [10.0.0.11, 10.0.0.12]`). Durations are written `500ms`, `2s`, `1m`.

use std::{
    collections::BTreeSet,
    ffi::OsString,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    str::FromStr,
    time::Duration,
};

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use vip_common::ForwardMode;

use crate::{
    dataplane::{AttachMode, Hook},
    maglev, netdev,
};

/// The version `--version` and the `serving` log line show: the crate's version and the
/// commit it was built from (see build.rs).
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("VIP_BUILD_COMMIT"), ")");

#[derive(Debug, Parser)]
#[command(name = "vip-agent", version = VERSION, about = "Highly-available VIP for the Kubernetes control plane")]
// A flag given twice takes its last value (lists still accumulate): wrappers and
// manifests can append overrides.
#[command(args_override_self = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Load the data plane on an interface and serve the VIP until SIGINT/SIGTERM.
    Run(Box<RunArgs>),
    /// Show leadership, VIPs, backends with health, table share and counters, from the
    /// pinned maps of a running (or kept-forwarding) agent.
    Status(StatusArgs),
    /// Print Kubernetes YAML (a DaemonSet with its RBAC, a kubeadm static pod, a K3s
    /// auto-deploy manifest, the RBAC alone, Cilium values pointing at the VIP) or a
    /// systemd unit.
    Manifest(Box<ManifestCommand>),
}

#[derive(Debug, Args)]
pub struct ManifestCommand {
    /// What to render.
    #[arg(value_enum)]
    pub kind: vip_deploy::Kind,
    #[command(flatten)]
    pub args: vip_deploy::ManifestArgs,
}

/// How this node decides whether it leads the VIP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Election {
    /// A coordination.k8s.io/v1 Lease elects the node that answers ARP.
    Kubernetes,
    /// No election: this node is the permanent leader (single node, bare metal, tests).
    None,
}

/// Where backends come from besides `--backend`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Discover {
    /// The EndpointSlices of `default/kubernetes`, where the apiservers register.
    Kubernetes,
}

/// How clients find the VIP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// One node (the Lease leader, or this one without an election) answers ARP for the
    /// VIP.
    Arp,
    /// Every node whose apiserver is ready advertises VIP/32 to its BGP routers, which
    /// spread clients over the nodes (ECMP); no election.
    Bgp,
}

/// `--bgp-peer IP:AS[:PASSWORD]`: a router, its AS, and an optional TCP-MD5 password
/// (everything after the second colon).
#[derive(Clone, PartialEq, Eq)]
pub struct BgpPeerArg {
    pub ip: Ipv4Addr,
    pub asn: u32,
    pub password: Option<String>,
}

impl fmt::Debug for BgpPeerArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The password is never printed.
        write!(f, "{}:{}{}", self.ip, self.asn, if self.password.is_some() { ":<password>" } else { "" })
    }
}

impl FromStr for BgpPeerArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut parts = s.splitn(3, ':');
        let (ip, asn) = (parts.next().unwrap_or(""), parts.next());
        let ip = ip.parse().map_err(|_| match address_like(ip) {
            true => format!("{ip:?} is not an IPv4 address (write IP:AS[:PASSWORD])"),
            false => NOT_A_PEER.to_owned(),
        })?;
        let asn = asn.ok_or_else(|| format!("{s:?}: the peer's AS is missing (write IP:AS[:PASSWORD])"))?;
        let asn: u32 = asn.parse().map_err(|_| format!("AS {asn:?} is not a number from 1 to 4294967294"))?;
        if asn == 0 || asn == u32::MAX {
            return Err(format!("AS {asn} is reserved"));
        }
        let password = parts.next().map(str::to_owned);
        if password.as_ref().is_some_and(|p| p.is_empty() || p.len() > 80) {
            return Err("a TCP-MD5 password has 1 to 80 characters".into());
        }
        Ok(Self { ip, asn, password })
    }
}

/// Parses `--bgp-peer` as [`BgpPeerArg`] does, with errors that never show the
/// password: clap's own error quotes the whole value, and a value from `VIP_BGP_PEER`
/// (the DaemonSet reads it from a Secret) would put the password in the pod's log.
#[derive(Clone)]
struct BgpPeerParser;

impl clap::builder::TypedValueParser for BgpPeerParser {
    type Value = BgpPeerArg;

    fn parse_ref(
        &self,
        _cmd: &clap::Command,
        _arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<BgpPeerArg, clap::Error> {
        let invalid = |shown: &str, why: &str| {
            clap::Error::raw(
                clap::error::ErrorKind::ValueValidation,
                format!("invalid value '{shown}' for '--bgp-peer <IP:AS[:PASSWORD]>': {why}\n"),
            )
        };
        let text = value.to_str().ok_or_else(|| invalid("(not UTF-8)", "not UTF-8"))?;
        text.parse().map_err(|why: String| invalid(&without_password(text), &why))
    }
}

/// What a peer entry whose first field is no address is called, without showing it:
/// it may be the tail of a password that held a comma, which separates entries.
const NOT_A_PEER: &str = "an entry that is not IP:AS[:PASSWORD] (a password may not contain ',': it separates peers)";

/// Whether `field` looks like an address someone meant (a digit first, a dot, letters
/// and digits: `10.0.0.x`), so an error may show it; anything else may be part of a
/// password.
fn address_like(field: &str) -> bool {
    field.starts_with(|c: char| c.is_ascii_digit())
        && field.contains('.')
        && field.chars().all(|c| c.is_ascii_alphanumeric() || c == '.')
}

/// `IP:AS[:PASSWORD]` with the password, if any, replaced by `<password>`; an entry
/// whose first field is no address is not shown at all (see [`NOT_A_PEER`]).
fn without_password(peer: &str) -> String {
    let mut parts = peer.splitn(3, ':');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(ip), _, _) if !address_like(ip) => "<not shown>".to_owned(),
        (Some(ip), Some(asn), Some(_)) => format!("{ip}:{asn}:<password>"),
        _ => peer.to_owned(),
    }
}

/// `--forward`, as the user writes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Forward {
    /// Direct server return: rewrite the destination MAC (backends share the L2).
    Dsr,
    /// Encapsulate in IPv4 to the backend (routed backends).
    Ipip,
    /// No load balancing: this node's own apiserver takes all traffic.
    Local,
}

impl From<Forward> for ForwardMode {
    fn from(f: Forward) -> Self {
        match f {
            Forward::Dsr => ForwardMode::Dsr,
            Forward::Ipip => ForwardMode::Ipip,
            Forward::Local => ForwardMode::Local,
        }
    }
}

/// How a backend's health is checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum HealthCheck {
    /// HTTPS GET of `--health-path`; healthy on status 200.
    Https,
    /// A TCP connect; healthy when it is accepted.
    Tcp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

/// A duration written with a unit: `250ms`, `2s`, `1.5s`, `1m`; the manifests write
/// them, so both sides share one parser.
pub use vip_deploy::args::Dur;
use vip_deploy::args::{entries, listed, Listed};
use vip_deploy::names::NameRule;

/// `--backend IP[:PORT]`: the address traffic is sent to, and the port its health check
/// uses (traffic keeps the VIP's port: DSR and IPIP do not rewrite it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendArg {
    pub ip: Ipv4Addr,
    pub port: Option<u16>,
}

impl FromStr for BackendArg {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        // An IPv6 backend (with or without brackets) would otherwise read as a bad port.
        if s.starts_with('[') || s.matches(':').count() > 1 {
            return Err(format!(
                "{s:?}: backends are IPv4 (an IPv6 VIP is balanced to the same IPv4-known apiservers)"
            ));
        }
        let (ip, port) = match s.split_once(':') {
            Some((ip, port)) => {
                let port: u16 = port.parse().map_err(|_| format!("{s:?}: bad port {port:?}"))?;
                if port == 0 {
                    return Err(format!("{s:?}: port 0"));
                }
                (ip, Some(port))
            }
            None => (s, None),
        };
        let ip = ip.parse().map_err(|_| format!("{s:?}: {ip:?} is not an IPv4 address"))?;
        Ok(Self { ip, port })
    }
}

/// `run`'s flags. Those taking a number, a duration or a name take `allow_hyphen_values`:
/// `--rise -1` is then refused as a bad value of `--rise`, not as an unknown argument
/// `-1` that names no flag.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// YAML file with flag values (keys are flag names); the command line and the
    /// environment take precedence over it.
    #[arg(long, env = "VIP_CONFIG", value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Interface that faces the clients (the one ARP and Neighbor Discovery for the VIPs
    /// arrive on; with --vlan, the trunk that carries the VLAN).
    #[arg(long, env = "VIP_INTERFACE", value_name = "IF")]
    pub interface: String,
    /// Virtual IP to serve, IPv4 or IPv6. Repeat the flag (or separate with commas) for
    /// several, of both families (IPv6: announced by Neighbor Discovery, balanced by DSR
    /// or local, never IPIP).
    #[arg(long = "vip", env = "VIP_VIP", value_name = "IP", required = true, value_parser = listed::<IpAddr>)]
    pub vip_values: Vec<Listed<IpAddr>>,
    /// TCP port of the service behind the VIP.
    #[arg(long, env = "VIP_PORT", allow_hyphen_values = true, default_value_t = 6443)]
    pub port: i64,
    /// Backend (an apiserver): IP, and optionally the port its health check uses.
    /// Repeat the flag (or separate with commas). Without any, the node only answers ARP
    /// and VIP traffic goes to its own stack.
    #[arg(long = "backend", env = "VIP_BACKEND", value_name = "IP[:PORT]", value_parser = listed::<BackendArg>)]
    pub backend_values: Vec<Listed<BackendArg>>,
    /// Discover the apiservers (merged with any --backend).
    #[arg(long, env = "VIP_DISCOVER", value_enum)]
    pub discover: Option<Discover>,
    /// How clients find the VIP: `arp` (one node answers ARP) or `bgp` (every ready node
    /// advertises VIP/32 to its routers).
    #[arg(long, env = "VIP_MODE", value_enum, default_value_t = Mode::Arp)]
    pub mode: Mode,
    /// BGP mode: this node's AS.
    #[arg(long, env = "VIP_BGP_LOCAL_AS", allow_hyphen_values = true, value_name = "AS")]
    pub bgp_local_as: Option<u32>,
    /// BGP mode: the BGP identifier (default: the interface's IPv4 address).
    #[arg(long, env = "VIP_BGP_ROUTER_ID", value_name = "IP")]
    pub bgp_router_id: Option<Ipv4Addr>,
    /// BGP mode: a router to advertise to, its AS, and an optional TCP-MD5 password.
    /// Repeat the flag (or separate with commas) for several.
    #[arg(
        long = "bgp-peer",
        env = "VIP_BGP_PEER",
        value_name = "IP:AS[:PASSWORD]",
        value_delimiter = ',',
        value_parser = BgpPeerParser
    )]
    pub bgp_peers: Vec<BgpPeerArg>,
    /// BGP mode: the peers, as --bgp-peer writes them (one per line, or separated by
    /// commas), from a file readable by root alone: where a password must stay out of
    /// the process's environment, a unit file or a static pod (whose mirror Pod the API
    /// shows).
    #[arg(long, env = "VIP_BGP_PEER_FILE", value_name = "PATH", conflicts_with = "bgp_peers")]
    pub bgp_peer_file: Option<PathBuf>,
    /// BGP mode: the hold time proposed to the routers (0, or 3s to 65535s, whole
    /// seconds; default 9s): how long a router keeps the routes of a node that went
    /// silent.
    #[arg(long, env = "VIP_BGP_HOLD_TIME", allow_hyphen_values = true)]
    pub bgp_hold_time: Option<Dur>,
    /// BGP mode: time between KEEPALIVEs (default: a third of the hold time).
    #[arg(long, env = "VIP_BGP_KEEPALIVE", allow_hyphen_values = true)]
    pub bgp_keepalive: Option<Dur>,
    /// How VIP traffic reaches a backend on another node.
    #[arg(long, env = "VIP_FORWARD", value_enum, default_value_t = Forward::Dsr)]
    pub forward: Forward,
    /// Leader election: a Kubernetes Lease, or none (this node always leads).
    #[arg(long, env = "VIP_ELECTION", value_enum, default_value_t = Election::Kubernetes)]
    pub election: Election,
    /// API server to talk to: a URL (default `https://127.0.0.1:6443`, the apiserver of
    /// this node, or the kubeconfig's server when --kubeconfig is given), or `in-cluster`
    /// for the `kubernetes` Service (only if asked: it needs the CNI).
    #[arg(long, env = "VIP_APISERVER", value_name = "URL")]
    pub apiserver: Option<String>,
    /// Name of the Lease (a Kubernetes object name).
    #[arg(long, env = "VIP_LEASE_NAME", allow_hyphen_values = true, default_value = "vip-control-plane")]
    pub lease_name: String,
    /// Namespace of the Lease.
    #[arg(long, env = "VIP_LEASE_NAMESPACE", allow_hyphen_values = true, default_value = "kube-system")]
    pub lease_namespace: String,
    /// How long the Lease stays valid after a change was observed: 1s to 300s, whole
    /// seconds (the Lease object counts seconds).
    #[arg(long, env = "VIP_LEASE_DURATION", allow_hyphen_values = true, default_value = "1s")]
    pub lease_duration: Dur,
    /// A leader that cannot renew for this long stops answering (fencing deadline): 100ms
    /// to 300s, below --lease-duration.
    #[arg(long, env = "VIP_RENEW_DEADLINE", allow_hyphen_values = true, default_value = "600ms")]
    pub renew_deadline: Dur,
    /// Time between two tries to acquire or renew: 10ms to 60s, below --renew-deadline.
    #[arg(long, env = "VIP_RETRY_PERIOD", allow_hyphen_values = true, default_value = "200ms")]
    pub retry_period: Dur,
    /// This node's name (defaults to the hostname).
    #[arg(long, env = "VIP_NODE_NAME", allow_hyphen_values = true)]
    pub node_name: Option<String>,
    /// For the node that runs `kubeadm init`: until the Lease API first answers (the
    /// apiserver is not up, or its RBAC not there yet), hold the VIP if no other host
    /// answers for it, then let the Lease decide. Needs --election kubernetes.
    #[arg(long, env = "VIP_BOOTSTRAP")]
    pub bootstrap: bool,
    /// Kubeconfig for the Lease election and discovery (its credentials and server;
    /// default: the pod's service account), whose cluster CA also verifies the health
    /// checks when --health-ca is not given.
    #[arg(long, env = "VIP_KUBECONFIG", value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// Health check kind.
    #[arg(long, env = "VIP_HEALTH_CHECK", value_enum, default_value_t = HealthCheck::Https)]
    pub health_check: HealthCheck,
    /// Path the HTTPS health check requests.
    #[arg(long, env = "VIP_HEALTH_PATH", default_value = "/readyz")]
    pub health_path: String,
    /// Time between two checks of a backend: 10ms to 1h.
    #[arg(long, env = "VIP_HEALTH_INTERVAL", allow_hyphen_values = true, default_value = "1s")]
    pub health_interval: Dur,
    /// Time a check may take before it counts as failed: 10ms to 1h.
    #[arg(long, env = "VIP_HEALTH_TIMEOUT", allow_hyphen_values = true, default_value = "1s")]
    pub health_timeout: Dur,
    /// Consecutive successes that bring a down backend back: 1 to 100.
    #[arg(long, env = "VIP_RISE", allow_hyphen_values = true, default_value_t = 2)]
    pub rise: i64,
    /// Consecutive failures that take a backend out: 1 to 100.
    #[arg(long, env = "VIP_FALL", allow_hyphen_values = true, default_value_t = 3)]
    pub fall: i64,
    /// PEM file of the CA that signs the backends' certificates.
    #[arg(long, env = "VIP_HEALTH_CA", value_name = "PATH")]
    pub health_ca: Option<PathBuf>,
    /// Name the apiservers' certificates are verified against. Every kube-apiserver
    /// serving certificate lists `kubernetes.default.svc`; its node IP is optional.
    #[arg(long, env = "VIP_HEALTH_SERVER_NAME", default_value = "kubernetes.default.svc")]
    pub health_server_name: String,
    /// Do not verify backend certificates (only when asked: prefer --health-ca). Not
    /// with --health-ca: which of the two was meant is the operator's to say.
    #[arg(long, env = "VIP_HEALTH_INSECURE")]
    pub health_insecure: bool,
    /// XDP attach mode (with --attach xdp).
    #[arg(long, env = "VIP_XDP_MODE", value_enum, default_value_t = AttachMode::Auto)]
    pub xdp_mode: AttachMode,
    /// The hook the data plane runs at: xdp (fastest; needs the interface's XDP hook to
    /// itself) or tcx (first in the tc ingress chain, beside another program's XDP, such
    /// as Cilium's XDP acceleration; DSR and local forwarding only).
    #[arg(long, env = "VIP_ATTACH", value_enum, default_value_t = Hook::Xdp)]
    pub attach: Hook,
    /// The VLAN (802.1Q VID, 1 to 4094) the VIPs live on, when --interface is a trunk
    /// that carries it tagged: ARP and Neighbor Discovery are answered, and VIP traffic
    /// balanced, only on that VLAN, and the agent's announcements and probes are tagged
    /// with it. Without it the VIPs live on the untagged segment.
    #[arg(long, env = "VIP_VLAN", allow_hyphen_values = true, value_name = "VID")]
    pub vlan: Option<i64>,
    /// Where Prometheus metrics are served.
    #[arg(long, env = "VIP_METRICS_ADDR", default_value = "127.0.0.1:9469")]
    pub metrics_addr: SocketAddr,
    /// bpffs directory for the pinned maps and XDP link.
    #[arg(long, env = "VIP_PIN_PATH", default_value = "/sys/fs/bpf/vip")]
    pub pin_path: PathBuf,
    /// On exit, leave the data plane attached and pinned (and the VIP in place), so a
    /// restarted or upgraded agent takes over without interrupting forwarding.
    /// `--keep-forwarding-on-exit`, `=true` or `=false`.
    #[arg(
        long,
        env = "VIP_KEEP_FORWARDING_ON_EXIT",
        value_name = "BOOL",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        action = clap::ArgAction::Set,
        default_value_t = false
    )]
    pub keep_forwarding_on_exit: bool,
    /// Maglev table size (a prime up to 65537).
    #[arg(long, env = "VIP_MAGLEV_SIZE", allow_hyphen_values = true, default_value_t = maglev::DEFAULT_M.into())]
    pub maglev_size: i64,
    /// How long a draining backend keeps the table slots it had, and one that still
    /// serves the slots it gave up to a backend returning, so that their connections still
    /// reach them from a node that never pinned them (the VIP moving, or the router's
    /// ECMP): 0s (never) to 1h. Make it longer than the apiservers' shutdown delay plus
    /// their request timeout (60s).
    #[arg(long, env = "VIP_DRAIN_HOLD", allow_hyphen_values = true, default_value = "1m")]
    pub drain_hold: Dur,
    /// Seed of the flow hash (32 bits, decimal or 0x-hex), the same on every node. By
    /// default derived from the cluster CA, which every node has and outsiders do not.
    #[arg(long, env = "VIP_FLOW_HASH_SEED", allow_hyphen_values = true, value_name = "SEED", value_parser = parse_seed)]
    pub flow_hash_seed: Option<u32>,
    /// Log format.
    #[arg(long, env = "VIP_LOG_FORMAT", value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// bpffs directory of the agent's pinned maps.
    #[arg(long, env = "VIP_PIN_PATH", default_value = "/sys/fs/bpf/vip")]
    pub pin_path: PathBuf,
    /// The agent's metrics address, where its live state (mode, eligibility, BGP
    /// sessions) is read from.
    #[arg(long, env = "VIP_METRICS_ADDR", default_value = "127.0.0.1:9469")]
    pub metrics_addr: SocketAddr,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Table)]
    pub output: OutputFormat,
}

/// A validated `run` configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunConfig {
    pub interface: String,
    /// Every VIP, in the order given; [`RunConfig::vips4`] and [`RunConfig::vips6`] split
    /// them by family.
    pub vips: Vec<IpAddr>,
    pub port: u16,
    pub backends: Vec<BackendArg>,
    /// Follow the apiservers registered in `default/kubernetes`.
    pub discover: bool,
    pub forward: ForwardMode,
    pub election: Election,
    pub node_name: Option<String>,
    /// Hold the VIP until the Lease API first answers (see [`RunArgs::bootstrap`]).
    pub bootstrap: bool,
    pub kubeconfig: Option<PathBuf>,
    pub apiserver: Option<String>,
    pub lease: LeaseTiming,
    pub health: HealthConfig,
    pub xdp_mode: AttachMode,
    pub attach: Hook,
    /// The VIPs' VLAN ([`vip_common::segment_of`]'s segment: 0 untagged).
    pub vlan: u16,
    pub metrics_addr: SocketAddr,
    pub pin_path: PathBuf,
    pub keep_forwarding_on_exit: bool,
    pub maglev_size: u32,
    /// How long a draining backend holds its Maglev slots (`balancer::DEFAULT_HOLD` by
    /// default).
    pub drain_hold: Duration,
    pub flow_hash_seed: Option<u32>,
    pub log_format: LogFormat,
    pub mode: Mode,
    /// BGP mode's settings (`None` in ARP mode).
    pub bgp: Option<BgpConfig>,
}

impl RunConfig {
    /// The IPv4 VIPs: ARP, BGP, the VIP-path probe.
    pub fn vips4(&self) -> Vec<Ipv4Addr> {
        split_vips(&self.vips).0
    }

    /// The IPv6 VIPs: Neighbor Discovery.
    pub fn vips6(&self) -> Vec<Ipv6Addr> {
        split_vips(&self.vips).1
    }
}

/// `vips` by family, each in the order given.
pub fn split_vips(vips: &[IpAddr]) -> (Vec<Ipv4Addr>, Vec<Ipv6Addr>) {
    let mut split = (Vec::new(), Vec::new());
    for vip in vips {
        match *vip {
            IpAddr::V4(v) => split.0.push(v),
            IpAddr::V6(v) => split.1.push(v),
        }
    }
    split
}

/// BGP mode's settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BgpConfig {
    pub local_as: u32,
    /// `None`: the interface's IPv4 address.
    pub router_id: Option<Ipv4Addr>,
    pub peers: Vec<BgpPeerArg>,
    pub hold_time: Duration,
    pub keepalive: Option<Duration>,
    /// `--bgp-peer-file`, if the peers came from one.
    pub peer_file: Option<PathBuf>,
}

/// Lease name and timers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseTiming {
    pub name: String,
    pub namespace: String,
    pub duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthConfig {
    pub check: HealthCheck,
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    pub ca: Option<PathBuf>,
    pub insecure: bool,
    /// The name certificates are verified against.
    pub server_name: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("--vip {vip}: {why}")]
    BadVip { vip: IpAddr, why: &'static str },
    #[error("--vip {vip} is given twice")]
    DuplicateVip { vip: IpAddr },
    #[error("{count} VIPs given, at most {max} are supported")]
    TooManyVips { count: usize, max: u32 },
    #[error("--backend {ip} is given twice")]
    DuplicateBackend { ip: Ipv4Addr },
    #[error("--backend {ip} is the VIP itself")]
    BackendIsVip { ip: Ipv4Addr },
    #[error("--backend {ip}: {why}")]
    BadBackend { ip: Ipv4Addr, why: &'static str },
    // Not a #[source]: the message already says it all, and a chain would repeat it.
    #[error("--maglev-size: {0}")]
    Maglev(maglev::MaglevError),
    #[error("--health-path {path:?} must start with '/'")]
    HealthPath { path: String },
    #[error("{why}")]
    Timing { why: String },
    #[error("--apiserver {url:?}: expected an https:// URL or in-cluster")]
    Apiserver { url: String },
    #[error("--apiserver {url:?}: plain HTTP would send the service account token in clear; use https://")]
    PlainHttp { url: String },
    #[error("--{flag} {value}: must be {range}")]
    Range { flag: &'static str, value: String, range: &'static str },
    #[error("--node-name {name:?}: {why}")]
    NodeName { name: String, why: &'static str },
    #[error("--{flag} {name:?}: {why}")]
    ObjectName { flag: &'static str, name: String, why: &'static str },
    #[error("--health-server-name {name:?}: not a DNS name or IP address")]
    ServerName { name: String },
    #[error("--mode bgp: {why}")]
    Bgp { why: String },
    #[error("{flag} given without --mode bgp")]
    BgpWithoutMode { flag: &'static str },
    #[error("--attach tcx cannot --forward ipip (encapsulation grows the frame, which only XDP does here): use --forward dsr, or --attach xdp")]
    TcxIpip,
    #[error("--bootstrap needs --mode arp --election kubernetes (it bridges the time before the Lease API answers)")]
    Bootstrap,
    #[error("--interface: {0}")]
    Interface(#[from] netdev::NetdevError),
    #[error("--config {path}: {why}")]
    File { path: String, why: String },
    /// Checked on the values, not by clap's `conflicts_with`, which counts a variable
    /// set to false (`VIP_HEALTH_INSECURE=false`, as templated units write) as given.
    #[error("--health-insecure cannot be used with --health-ca: which of the two was meant is the operator's to say")]
    InsecureWithCa,
}

/// `value` of integer flag `--{flag}` as a `T`, if in `lo..=hi` (`range`, as the error
/// says it): see [`vip_deploy::args::in_range`].
fn ranged<T: TryFrom<i64>>(
    flag: &'static str,
    value: i64,
    lo: i64,
    hi: i64,
    range: &'static str,
) -> Result<T, ConfigError> {
    vip_deploy::args::in_range(value, lo, hi).ok_or_else(|| ConfigError::Range {
        flag,
        value: value.to_string(),
        range,
    })
}

impl TryFrom<RunArgs> for RunConfig {
    type Error = ConfigError;

    fn try_from(args: RunArgs) -> Result<Self, ConfigError> {
        netdev::validate_name(&args.interface)?;
        let (vips, backends) = (entries(&args.vip_values), entries(&args.backend_values));
        if vips.len() > vip_common::MAX_VIPS as usize {
            return Err(ConfigError::TooManyVips { count: vips.len(), max: vip_common::MAX_VIPS });
        }
        let mut seen = BTreeSet::new();
        for &vip in &vips {
            check_vip(vip)?;
            if !seen.insert(vip) {
                return Err(ConfigError::DuplicateVip { vip });
            }
        }
        let port = ranged("port", args.port, 1, 65535, "1 to 65535")?;
        let mut seen = BTreeSet::new();
        for b in &backends {
            if vips.contains(&IpAddr::V4(b.ip)) {
                return Err(ConfigError::BackendIsVip { ip: b.ip });
            }
            if let Some(why) = vip_deploy::vips::backend_problem(b.ip) {
                return Err(ConfigError::BadBackend { ip: b.ip, why });
            }
            if !seen.insert(b.ip) {
                return Err(ConfigError::DuplicateBackend { ip: b.ip });
            }
        }
        let maglev_size = ranged("maglev-size", args.maglev_size, 0, u32::MAX.into(), "a prime from 3 to 65537")?;
        maglev::validate_size(maglev_size).map_err(ConfigError::Maglev)?;
        if args.health_insecure && args.health_ca.is_some() {
            return Err(ConfigError::InsecureWithCa);
        }
        for (flag, value, ok, range) in [
            ("health-interval", args.health_interval, in_range(args.health_interval, 10, 3_600_000), "10ms to 1h"),
            ("health-timeout", args.health_timeout, in_range(args.health_timeout, 10, 3_600_000), "10ms to 1h"),
            ("lease-duration", args.lease_duration, in_range(args.lease_duration, 1_000, 300_000), "1s to 300s"),
            ("renew-deadline", args.renew_deadline, in_range(args.renew_deadline, 100, 300_000), "100ms to 300s"),
            ("retry-period", args.retry_period, in_range(args.retry_period, 10, 60_000), "10ms to 60s"),
            ("drain-hold", args.drain_hold, in_range(args.drain_hold, 0, 3_600_000), "0s to 1h"),
        ] {
            if !ok {
                return Err(ConfigError::Range { flag, value: value.to_string(), range });
            }
        }
        if args.vlan.is_some() && args.mode == Mode::Bgp {
            return Err(ConfigError::Bgp {
                why: "--vlan is for ARP mode: BGP routes the VIPs to the node's own address".into(),
            });
        }
        let vlan = match args.vlan {
            Some(vid) => ranged("vlan", vid, 1, 4094, "1 to 4094 (0 and 4095 are reserved)")?,
            None => 0,
        };
        let rise = ranged("rise", args.rise, 1, 100, "1 to 100")?;
        let fall = ranged("fall", args.fall, 1, 100, "1 to 100")?;
        let (lease, renew, retry) = (args.lease_duration.0, args.renew_deadline.0, args.retry_period.0);
        if lease.subsec_millis() != 0 {
            return Err(ConfigError::Timing {
                why: format!(
                    "--lease-duration {}: the Lease API counts whole seconds (write e.g. 1s, 2s)",
                    args.lease_duration
                ),
            });
        }
        if renew >= lease {
            return Err(ConfigError::Timing {
                why: format!(
                    "--renew-deadline {} must be shorter than --lease-duration {} (the fencing margin)",
                    args.renew_deadline, args.lease_duration
                ),
            });
        }
        if retry >= renew {
            return Err(ConfigError::Timing {
                why: format!(
                    "--retry-period {} must be shorter than --renew-deadline {}",
                    args.retry_period, args.renew_deadline
                ),
            });
        }
        if let Some(url) = &args.apiserver {
            if url.starts_with("http://") {
                return Err(ConfigError::PlainHttp { url: url.clone() });
            }
            if url != "in-cluster" && !url.starts_with("https://") {
                return Err(ConfigError::Apiserver { url: url.clone() });
            }
        }
        if rustls::pki_types::ServerName::try_from(args.health_server_name.as_str()).is_err() {
            return Err(ConfigError::ServerName { name: args.health_server_name });
        }
        let bgp = bgp_config(&args, &vips)?;
        if args.attach == Hook::Tcx && args.forward == Forward::Ipip {
            return Err(ConfigError::TcxIpip);
        }
        if args.forward == Forward::Ipip {
            if let Some((vip, why)) = vips.iter().find_map(|&v| vip_deploy::vips::ipip_problem(v).map(|w| (v, w))) {
                return Err(ConfigError::BadVip { vip, why });
            }
        }
        if args.bootstrap && (args.election != Election::Kubernetes || args.mode != Mode::Arp) {
            return Err(ConfigError::Bootstrap);
        }
        check_object_name("lease-name", &args.lease_name, NameRule::Subdomain)?;
        check_object_name("lease-namespace", &args.lease_namespace, NameRule::Label)?;
        let node_name = match (&args.node_name, args.election) {
            (Some(name), _) => Some(validate_node_name(name)?),
            (None, Election::Kubernetes) => Some(validate_node_name(&hostname())?),
            (None, Election::None) => None,
        };
        if !args.health_path.starts_with('/') {
            return Err(ConfigError::HealthPath { path: args.health_path });
        }
        Ok(RunConfig {
            interface: args.interface,
            vips,
            port,
            backends,
            discover: args.discover.is_some(),
            forward: args.forward.into(),
            election: args.election,
            node_name,
            bootstrap: args.bootstrap,
            kubeconfig: args.kubeconfig,
            apiserver: args.apiserver,
            lease: LeaseTiming {
                name: args.lease_name,
                namespace: args.lease_namespace,
                duration: args.lease_duration.0,
                renew_deadline: args.renew_deadline.0,
                retry_period: args.retry_period.0,
            },
            health: HealthConfig {
                check: args.health_check,
                path: args.health_path,
                interval: args.health_interval.0,
                timeout: args.health_timeout.0,
                rise,
                fall,
                ca: args.health_ca,
                insecure: args.health_insecure,
                server_name: args.health_server_name,
            },
            xdp_mode: args.xdp_mode,
            attach: args.attach,
            vlan,
            metrics_addr: args.metrics_addr,
            pin_path: args.pin_path,
            keep_forwarding_on_exit: args.keep_forwarding_on_exit,
            maglev_size,
            drain_hold: args.drain_hold.0,
            flow_hash_seed: args.flow_hash_seed,
            log_format: args.log_format,
            mode: args.mode,
            bgp,
        })
    }
}

/// BGP mode's settings, checked: an AS, at least one peer (each once), a hold time of 0
/// or 3 to 65535 whole seconds (RFC 4271 §4.2), a keepalive within a third of it. BGP
/// flags without `--mode bgp` are refused rather than ignored.
fn bgp_config(args: &RunArgs, vips: &[IpAddr]) -> Result<Option<BgpConfig>, ConfigError> {
    let err = |why: String| ConfigError::Bgp { why };
    if args.mode != Mode::Bgp {
        let given = [
            ("--bgp-local-as", args.bgp_local_as.is_some()),
            ("--bgp-peer", !args.bgp_peers.is_empty()),
            ("--bgp-peer-file", args.bgp_peer_file.is_some()),
            ("--bgp-router-id", args.bgp_router_id.is_some()),
            ("--bgp-hold-time", args.bgp_hold_time.is_some()),
            ("--bgp-keepalive", args.bgp_keepalive.is_some()),
        ];
        if let Some((flag, _)) = given.iter().find(|(_, g)| *g) {
            return Err(ConfigError::BgpWithoutMode { flag });
        }
        return Ok(None);
    }
    if let Some((vip, why)) = vips.iter().find_map(|&v| vip_deploy::vips::bgp_problem(v).map(|w| (v, w))) {
        return Err(err(format!("--vip {vip}: {why}")));
    }
    if let Some((id, why)) =
        args.bgp_router_id.and_then(|id| vip_deploy::vips::router_id_problem(id, vips).map(|w| (id, w)))
    {
        return Err(err(format!("--bgp-router-id {id}: {why}")));
    }
    let local_as = args.bgp_local_as.ok_or_else(|| err("--bgp-local-as is required".into()))?;
    if local_as == 0 || local_as == u32::MAX || local_as == 23456 {
        return Err(err(format!("--bgp-local-as {local_as} is reserved")));
    }
    let peers = match &args.bgp_peer_file {
        Some(path) => peers_from_file(path).map_err(err)?,
        None => args.bgp_peers.clone(),
    };
    if peers.is_empty() {
        return Err(err("at least one --bgp-peer IP:AS is required".into()));
    }
    let mut seen = BTreeSet::new();
    for p in &peers {
        if !seen.insert(p.ip) {
            return Err(err(format!("--bgp-peer {} is given twice", p.ip)));
        }
        let ip = p.ip;
        if ip.is_loopback() || ip.is_unspecified() || ip.is_multicast() || ip.is_broadcast() {
            return Err(err(format!("--bgp-peer {ip}: not a router's address (loopback, unspecified or multicast)")));
        }
        if vips.contains(&IpAddr::V4(ip)) {
            return Err(err(format!("--bgp-peer {ip} is a VIP: a BGP peer is a router")));
        }
    }
    let (hold, keepalive) = (args.bgp_hold_time.map(|d| d.0), args.bgp_keepalive.map(|d| d.0));
    if let Some(vip_deploy::vips::BgpTimerProblem { flag, value, why }) =
        vip_deploy::vips::bgp_timers_problem(hold, keepalive)
    {
        return Err(err(format!("--{flag} {}: {why}", Dur(value))));
    }
    let hold = hold.unwrap_or(vip_deploy::vips::DEFAULT_BGP_HOLD_TIME);
    Ok(Some(BgpConfig {
        local_as,
        router_id: args.bgp_router_id,
        peers,
        hold_time: hold,
        keepalive,
        peer_file: args.bgp_peer_file.clone(),
    }))
}

/// The peers of `--bgp-peer-file`: `IP:AS[:PASSWORD]` entries, one per line or separated
/// by commas; blank lines and lines starting with `#` are skipped. Errors name the file
/// (and the line), never a password.
fn peers_from_file(path: &Path) -> Result<Vec<BgpPeerArg>, String> {
    let shown = path.display();
    let text = std::fs::read_to_string(path).map_err(|e| format!("--bgp-peer-file {shown}: {e}"))?;
    let mut peers = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        for entry in line.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            peers.push(entry.parse().map_err(|why| format!("--bgp-peer-file {shown}, line {}: {why}", n + 1))?);
        }
    }
    Ok(peers)
}

/// Whether `d` lies in `[min_ms, max_ms]`.
fn in_range(d: Dur, min_ms: u64, max_ms: u64) -> bool {
    (Duration::from_millis(min_ms)..=Duration::from_millis(max_ms)).contains(&d.0)
}

/// `--flow-hash-seed`: decimal or `0x` hexadecimal, 32 bits.
fn parse_seed(s: &str) -> Result<u32, String> {
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    parsed.map_err(|_| format!("{s:?} is not a 32-bit number (decimal or 0x-hex)"))
}

/// This host's name, as the kernel has it (empty if unreadable).
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_owned()).unwrap_or_default()
}

/// A node name as Kubernetes accepts it (RFC 1123 subdomain): the Lease holder. An empty
/// one would read as "nobody holds the Lease".
pub fn validate_node_name(name: &str) -> Result<String, ConfigError> {
    let err = |why| Err(ConfigError::NodeName { name: name.to_owned(), why });
    if name.is_empty() {
        return err("empty (is the hostname set?)");
    }
    match NameRule::Subdomain.check(name) {
        Err(why) => err(why),
        Ok(()) => Ok(name.to_owned()),
    }
}

/// `--lease-name` and `--lease-namespace` as the API will check them, so a bad one is
/// refused at start instead of by every Lease call.
fn check_object_name(flag: &'static str, name: &str, rule: NameRule) -> Result<(), ConfigError> {
    rule.check(name).map_err(|why| ConfigError::ObjectName { flag, name: name.to_owned(), why })
}

/// A VIP must be a unicast address clients can resolve: the rule the manifests share
/// ([`vip_deploy::vips`]).
fn check_vip(vip: IpAddr) -> Result<(), ConfigError> {
    match vip_deploy::vips::vip_problem(vip) {
        Some(why) => Err(ConfigError::BadVip { vip, why }),
        None => Ok(()),
    }
}

/// Parses the command line, folding in the `--config` file: each key of the file
/// becomes `--key value` (a list becomes one flag per item) unless the same flag is on
/// the command line or its `VIP_` variable is set. Returns clap's own error (with its
/// exit code) for bad flags, and [`ConfigError::File`] for a bad file.
pub fn parse_args(argv: Vec<OsString>, env: &dyn Fn(&str) -> Option<String>) -> Result<Cli, ParseError> {
    let cli = Cli::try_parse_from(&argv).map_err(ParseError::Clap);
    let file = match &cli {
        Ok(Cli { command: Command::Run(run) }) => run.config.clone(),
        // The file may be what supplies required flags: look for it by hand.
        Err(_) => config_flag(&argv, env),
        Ok(_) => None,
    };
    let Some(path) = file else { return cli };
    let injected = file_args(&path, &argv, env)?;
    // Insert the file's flags right after `run`, before the user's own.
    let run_at = argv.iter().position(|a| a == "run").map_or(argv.len(), |i| i + 1);
    let mut merged = argv[..run_at].to_vec();
    merged.extend(injected);
    merged.extend_from_slice(&argv[run_at..]);
    Cli::try_parse_from(merged).map_err(ParseError::Clap)
}

/// The `VIP_` variables among `names` that no flag of `run` reads: a misspelled one
/// (`VIP_HEALTH_INTERVL`) would otherwise be ignored without a word, where a misspelled
/// key of the `--config` file is refused. (The manifests turn the kubelet's service
/// links off, so no `VIP_SERVICE_HOST` of a Service named `vip` appears.)
pub fn unknown_variables(names: impl Iterator<Item = String>) -> Vec<String> {
    let cli = Cli::command();
    let known: BTreeSet<String> = cli
        .find_subcommand("run")
        .into_iter()
        .flat_map(|run| run.get_arguments())
        .filter_map(|a| a.get_env())
        .map(|e| e.to_string_lossy().into_owned())
        .collect();
    names.filter(|n| n.starts_with("VIP_") && !known.contains(n)).collect()
}

/// Where the value of the flag an error message names first (`--drain-hold 2h: …`) came
/// from, when not the command line: its `VIP_` variable, or the `--config` file (the
/// precedence of [`parse_args`]). `None` when the flag is on the command line, or named
/// nowhere (a default). An operator reading "--drain-hold" looks for it on the command
/// line; a unit's `Environment=` or a config file is where it is.
pub fn origin_of(message: &str, argv: &[OsString], env: &dyn Fn(&str) -> Option<String>) -> Option<String> {
    let at = message.find("--")? + 2;
    let flag: String =
        message[at..].chars().take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-').collect();
    let long = format!("--{flag}");
    let on_cli = argv.iter().map(|a| a.to_string_lossy()).any(|a| a == long || a.starts_with(&format!("{long}=")));
    if flag.is_empty() || on_cli {
        return None;
    }
    let var = format!("VIP_{}", flag.replace('-', "_").to_uppercase());
    if env(&var).is_some() {
        return Some(var);
    }
    let path = config_flag(argv, env)?;
    let text = std::fs::read_to_string(&path).ok()?;
    let serde_yaml::Value::Mapping(map) = serde_yaml::from_str(&text).ok()? else { return None };
    let in_file = map.keys().filter_map(|k| k.as_str()).any(|k| k.replace('_', "-") == flag);
    in_file.then(|| format!("--config {}", path.display()))
}

#[derive(Debug)]
pub enum ParseError {
    Clap(clap::Error),
    Config(ConfigError),
}

impl From<ConfigError> for ParseError {
    fn from(e: ConfigError) -> Self {
        ParseError::Config(e)
    }
}

fn config_flag(argv: &[OsString], env: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
    let args: Vec<String> = argv.iter().map(|a| a.to_string_lossy().into_owned()).collect();
    args.iter()
        .enumerate()
        .find_map(|(i, a)| {
            a.strip_prefix("--config=")
                .map(PathBuf::from)
                .or_else(|| (a == "--config").then(|| args.get(i + 1).map(PathBuf::from)).flatten())
        })
        .or_else(|| env("VIP_CONFIG").map(PathBuf::from))
}

fn file_args(
    path: &PathBuf,
    argv: &[OsString],
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Vec<OsString>, ConfigError> {
    let shown = path.display().to_string();
    let err = |why: String| ConfigError::File { path: shown.clone(), why };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    let doc: serde_yaml::Value = serde_yaml::from_str(&text).map_err(|e| err(e.to_string()))?;
    let map = match doc {
        serde_yaml::Value::Mapping(map) => map,
        // An empty file, or one of comments only (every line commented out for now).
        serde_yaml::Value::Null => serde_yaml::Mapping::new(),
        _ => return Err(err("expected a mapping of flag names to values".into())),
    };
    let run = Cli::command();
    let run = run.find_subcommand("run").ok_or_else(|| err("no run command".into()))?;
    let known: Vec<String> = run.get_arguments().filter_map(|a| a.get_long().map(str::to_owned)).collect();
    let on_cli: Vec<String> = argv.iter().map(|a| a.to_string_lossy().into_owned()).collect();
    let mut out = Vec::new();
    for (key, value) in map {
        let serde_yaml::Value::String(key) = key else {
            return Err(err(format!("key {key:?} is not a string")));
        };
        let flag = key.replace('_', "-");
        if flag == "config" || !known.contains(&flag) {
            return Err(err(format!("unknown key {key:?}")));
        }
        let env_name = format!("VIP_{}", flag.replace('-', "_").to_uppercase());
        let long = format!("--{flag}");
        if env(&env_name).is_some() || on_cli.iter().any(|a| *a == long || a.starts_with(&format!("{long}="))) {
            continue;
        }
        let values = match value {
            serde_yaml::Value::Sequence(items) => items,
            other => vec![other],
        };
        for v in values {
            let v = match v {
                serde_yaml::Value::String(s) => s,
                serde_yaml::Value::Number(n) => n.to_string(),
                serde_yaml::Value::Bool(true) => {
                    out.push(long.clone().into());
                    continue;
                }
                serde_yaml::Value::Bool(false) => continue,
                other => return Err(err(format!("key {key:?}: unsupported value {other:?}"))),
            };
            out.push(format!("{long}={v}").into());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_with(args: &[&str], env: &[(&str, &str)]) -> Result<RunConfig, String> {
        let argv: Vec<OsString> = ["vip-agent", "run"].iter().chain(args).map(OsString::from).collect();
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let lookup = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        // As main shows them: the value's origin after the message.
        let shown = |msg: String| match origin_of(&msg, &argv, &lookup) {
            Some(origin) => format!("{msg} (from {origin})"),
            None => msg,
        };
        let cli = parse_args(argv.clone(), &lookup).map_err(|e| match e {
            ParseError::Clap(e) => shown(e.to_string()),
            ParseError::Config(e) => e.to_string(),
        })?;
        let Command::Run(run) = cli.command else { return Err("not run".into()) };
        RunConfig::try_from(*run).map_err(|e| shown(e.to_string()))
    }

    fn parse(args: &[&str]) -> Result<RunConfig, String> {
        parse_with(args, &[])
    }

    const BASE: [&str; 8] =
        ["--interface", "eth0", "--vip", "10.0.0.1", "--election", "none", "--backend", "10.0.0.11"];

    fn with(extra: &[&str]) -> Vec<&'static str> {
        let mut v: Vec<&str> = BASE.to_vec();
        v.extend(extra.iter().map(|s| -> &'static str { Box::leak(s.to_string().into_boxed_str()) }));
        v
    }

    #[test]
    fn parses_repeated_and_comma_separated_lists() {
        let cfg = parse(&[
            "--interface",
            "eth0",
            "--vip",
            "10.0.0.1,10.0.0.2",
            "--vip",
            "10.0.0.3",
            "--election",
            "none",
            "--backend",
            "10.0.0.11,10.0.0.12:8443",
            "--backend",
            "10.0.0.13",
        ])
        .unwrap();
        assert_eq!(cfg.vips, ["10.0.0.1", "10.0.0.2", "10.0.0.3"].map(|s| s.parse::<Ipv4Addr>().unwrap()));
        assert_eq!(cfg.backends[1], BackendArg { ip: "10.0.0.12".parse().unwrap(), port: Some(8443) });
        assert_eq!(cfg.xdp_mode, AttachMode::Auto);
        assert_eq!(cfg.forward, ForwardMode::Dsr);
        assert_eq!(cfg.health.interval, Duration::from_secs(1));
        assert_eq!(cfg.port, 6443);
        assert_eq!(cfg.drain_hold, crate::balancer::DEFAULT_HOLD);
    }

    #[test]
    fn vips_of_both_families_are_kept_in_order_and_split_by_family() {
        let cfg = parse(&[
            "--interface",
            "eth0",
            "--vip",
            "fd00::100,10.0.0.1",
            "--vip",
            "2001:db8::5",
            "--election",
            "none",
        ])
        .unwrap();
        let v6: Vec<Ipv6Addr> = ["fd00::100", "2001:db8::5"].iter().map(|s| s.parse().unwrap()).collect();
        assert_eq!(cfg.vips4(), ["10.0.0.1".parse::<Ipv4Addr>().unwrap()]);
        assert_eq!(cfg.vips6(), v6);
        assert_eq!(cfg.vips[0], v6[0], "the order given");
        let bgp = ["--mode", "bgp", "--bgp-local-as", "65001", "--bgp-peer", "10.0.0.254:65000"];
        let err = parse(&[&["--interface", "eth0", "--vip", "fd00::100", "--election", "none"][..], &bgp].concat())
            .unwrap_err();
        assert!(err.contains("--vip fd00::100: BGP mode advertises IPv4 VIPs only"), "{err}");
        let err =
            parse(&["--interface", "eth0", "--vip", "10.0.0.1,fd00::100", "--election", "none", "--forward", "ipip"])
                .unwrap_err();
        assert!(err.contains("--vip fd00::100: --forward ipip carries IPv4 VIPs only"), "{err}");
    }

    #[test]
    fn durations_take_units() {
        assert_eq!("500ms".parse::<Dur>().unwrap().0, Duration::from_millis(500));
        assert_eq!("2s".parse::<Dur>().unwrap().0, Duration::from_secs(2));
        assert_eq!("1.5s".parse::<Dur>().unwrap().0, Duration::from_millis(1500));
        assert_eq!("1m".parse::<Dur>().unwrap().0, Duration::from_secs(60));
        assert!("5".parse::<Dur>().unwrap_err().contains("no unit"));
        assert!("5d".parse::<Dur>().unwrap_err().contains("unknown unit"));
        assert_eq!("1h".parse::<Dur>().unwrap().0, Duration::from_secs(3600));
        let cfg = parse(&with(&["--health-interval", "250ms", "--health-timeout", "100ms"])).unwrap();
        assert_eq!(cfg.health.interval, Duration::from_millis(250));
    }

    #[test]
    fn bad_values_are_named_in_the_error() {
        let cases: &[(&[&str], &str)] = &[
            (&["--interface", "eth0", "--vip", "10.0.0.300", "--election", "none"], "10.0.0.300"),
            (
                &["--interface", "eth0", "--vip", "224.0.0.1", "--election", "none", "--backend", "10.0.0.11"],
                "--vip 224.0.0.1: a multicast",
            ),
            (&["--interface", "eth0", "--vip", "fe80::1", "--election", "none"], "--vip fe80::1: a link-local"),
            (
                &["--interface", "eth0", "--vip", "10.0.0.1", "--election", "none", "--vlan", "0"],
                "--vlan 0: must be 1 to 4094",
            ),
            (
                &["--interface", "eth0", "--vip", "fd00::1", "--election", "none", "--backend", "fd00::11"],
                "\"fd00::11\": backends are IPv4",
            ),
            (
                &[
                    "--interface",
                    "eth0",
                    "--vip",
                    "10.0.0.1",
                    "--election",
                    "none",
                    "--vlan",
                    "100",
                    "--mode",
                    "bgp",
                    "--bgp-local-as",
                    "65001",
                    "--bgp-peer",
                    "10.0.0.254:65000",
                ],
                "--vlan is for ARP mode",
            ),
            (&["--interface", "eth0", "--vip", "ff02::1", "--election", "none"], "--vip ff02::1: a multicast"),
            (&["--interface", "eth0", "--vip", "::1", "--election", "none"], "--vip ::1: a loopback"),
            (&["--interface", "eth0", "--vip", "::", "--election", "none"], "--vip ::: the unspecified"),
            (
                &["--interface", "eth0", "--vip", "::ffff:10.0.0.1", "--election", "none"],
                "--vip ::ffff:10.0.0.1: an IPv4-mapped",
            ),
            (
                &["--interface", "eth0", "--vip", "fd00::1,fd00:0::1", "--election", "none"],
                "--vip fd00::1 is given twice",
            ),
            (
                &["--interface", "eth0", "--vip", "10.0.0.1,10.0.0.1", "--election", "none", "--backend", "10.0.0.11"],
                "--vip 10.0.0.1 is given twice",
            ),
            (
                &["--interface", "eth/0", "--vip", "10.0.0.1", "--election", "none", "--backend", "10.0.0.11"],
                "\"eth/0\"",
            ),
            (&["--vip", "10.0.0.1", "--election", "none"], "--interface"),
        ];
        for (args, needle) in cases {
            let err = parse(args).unwrap_err();
            assert!(err.contains(needle), "{args:?}: {err}");
        }
        for (extra, needle) in [
            (&["--port", "0"][..], "--port 0"),
            (&["--backend", "10.0.0.11"], "--backend 10.0.0.11 is given twice"),
            (&["--backend", "10.0.0.1"], "--backend 10.0.0.1 is the VIP itself"),
            (&["--backend", "0.0.0.0"], "--backend 0.0.0.0: the unspecified address is no host"),
            (&["--backend", "255.255.255.255"], "--backend 255.255.255.255: the broadcast address is no host"),
            (&["--backend", "224.0.0.1"], "--backend 224.0.0.1: a multicast address is no host"),
            (&["--backend", "10.0.0.12:0"], "port 0"),
            (&["--backend", "10.0.0.x"], "not an IPv4 address"),
            (&["--maglev-size", "65536"], "--maglev-size: Maglev table size 65536 is not prime"),
            (&["--rise", "0"], "--rise 0: must be 1 to 100"),
            (&["--fall", "1000"], "--fall 1000: must be 1 to 100"),
            (&["--health-interval", "0s"], "--health-interval 0s: must be 10ms to 1h"),
            (&["--health-interval", "0.001ms"], "--health-interval 0.001ms: must be 10ms to 1h"),
            (&["--health-timeout", "61m"], "--health-timeout 61m: must be 10ms to 1h"),
            (&["--health-path", "readyz"], "must start with '/'"),
            (&["--lease-duration", "500ms"], "--lease-duration 500ms: must be 1s to 300s"),
            (&["--lease-duration", "1500ms"], "--lease-duration 1500ms: the Lease API counts whole seconds"),
            (&["--lease-duration", "4294967297s"], "--lease-duration 4294967297s: must be 1s to 300s"),
            (&["--lease-duration", "3000000000s"], "must be 1s to 300s"),
            (&["--renew-deadline", "1s"], "--renew-deadline 1s must be shorter than --lease-duration 1s"),
            (&["--retry-period", "700ms"], "--retry-period 700ms must be shorter"),
            (&["--retry-period", "0.001ms"], "--retry-period 0.001ms: must be 10ms to 60s"),
            (&["--drain-hold", "61m"], "--drain-hold 61m: must be 0s to 1h"),
            (&["--apiserver", "10.0.0.1:6443"], "expected an https:// URL"),
            (&["--apiserver", "http://127.0.0.1:8080"], "plain HTTP would send the service account token in clear"),
            (&["--node-name", ""], "--node-name \"\": empty"),
            (&["--node-name", "Node_1"], "--node-name \"Node_1\": not a DNS-1123 subdomain"),
            (&["--lease-name", "VIP"], "--lease-name \"VIP\": not a DNS-1123 subdomain"),
            (&["--lease-name", ""], "--lease-name \"\": not a DNS-1123 subdomain"),
            (&["--lease-namespace", "kube.system"], "--lease-namespace \"kube.system\": not a DNS-1123 label"),
            (&["--health-server-name", "not a name"], "--health-server-name \"not a name\""),
            (&["--flow-hash-seed", "0x1_0000_0000"], "is not a 32-bit number"),
            (&["--bootstrap"], "--bootstrap needs --mode arp --election kubernetes"),
            (&["--attach", "tcx", "--forward", "ipip"], "--attach tcx cannot --forward ipip"),
            (&["--attach", "tc"], "'tc'"),
            (&["--bgp-peer", "10.0.0.254:65001"], "--bgp-peer given without --mode bgp"),
            (&["--bgp-hold-time", "10s"], "--bgp-hold-time given without --mode bgp"),
            (&["--bgp-keepalive", "3s"], "--bgp-keepalive given without --mode bgp"),
            (&["--mode", "bgp", "--bgp-peer", "10.0.0.254:65001"], "--mode bgp: --bgp-local-as is required"),
            (&["--mode", "bgp", "--bgp-local-as", "65000"], "--mode bgp: at least one --bgp-peer IP:AS is required"),
            (&["--mode", "bgp", "--bgp-local-as", "65000", "--bgp-peer", "10.0.0.254"], "the peer's AS is missing"),
            (&["--mode", "bgp", "--bgp-local-as", "65000", "--bgp-peer", "10.0.0.x:1"], "is not an IPv4 address"),
            (
                &["--mode", "bgp", "--bgp-local-as", "65000", "--bgp-peer", "10.0.0.254:1", "--bgp-hold-time", "2s"],
                "--bgp-hold-time 2s: 0 or 3s to 65535s",
            ),
            (
                &["--mode", "bgp", "--bgp-local-as", "65000", "--bgp-peer", "10.0.0.254:1", "--bgp-keepalive", "4s"],
                "--bgp-keepalive 4s: above zero and at most a third",
            ),
            (
                &[
                    "--mode",
                    "bgp",
                    "--bgp-local-as",
                    "65000",
                    "--bgp-peer",
                    "10.0.0.254:1",
                    "--bgp-router-id",
                    "0.0.0.0",
                ],
                "--mode bgp: --bgp-router-id 0.0.0.0: a BGP identifier is not zero",
            ),
            (
                &[
                    "--mode",
                    "bgp",
                    "--bgp-local-as",
                    "65000",
                    "--bgp-peer",
                    "10.0.0.254:1",
                    "--bgp-router-id",
                    "10.0.0.1",
                ],
                "--mode bgp: --bgp-router-id 10.0.0.1: is a VIP, which every node carries",
            ),
            (&["--election", "maybe"], "'maybe'"),
            (&["--xdp-mode", "turbo"], "'turbo'"),
        ] {
            let err = parse(&with(extra)).unwrap_err();
            assert!(err.contains(needle), "{extra:?}: {err}");
        }
        assert_eq!(parse(&with(&["--flow-hash-seed", "0xdeadbeef"])).unwrap().flow_hash_seed, Some(0xdead_beef));
        let bgp = parse(&with(&[
            "--mode",
            "bgp",
            "--bgp-local-as",
            "65000",
            "--bgp-peer",
            "10.0.0.254:65001:s3cr:et,10.0.0.253:4200000000",
        ]))
        .unwrap()
        .bgp
        .unwrap();
        assert_eq!(bgp.peers[0].password.as_deref(), Some("s3cr:et"));
        assert_eq!(bgp.peers[1].asn, 4_200_000_000);
        assert_eq!(bgp.hold_time, Duration::from_secs(9));
        assert!(!format!("{:?}", bgp.peers[0]).contains("s3cr"), "passwords are never printed");
        // Only the hold time goes on the wire: a sub-second keepalive is the node's own
        // (`vip-agent manifest` renders it too).
        let fast =
            ["--mode", "bgp", "--bgp-local-as", "65000", "--bgp-peer", "10.0.0.254:1", "--bgp-keepalive", "500ms"];
        assert_eq!(parse(&with(&fast)).unwrap().bgp.unwrap().keepalive, Some(Duration::from_millis(500)));
        assert_eq!(parse(&with(&["--node-name", "cp-1.example"])).unwrap().node_name.as_deref(), Some("cp-1.example"));
        // No backend: ARP only, VIP traffic to this node's own stack.
        assert!(parse(&["--interface", "eth0", "--vip", "10.0.0.1", "--election", "none"])
            .unwrap()
            .backends
            .is_empty());
    }

    /// `--bgp-peer-file`: the peers from a root-only file, as `--bgp-peer` writes them;
    /// errors name the file and the line, never a password; not with `--bgp-peer`.
    #[test]
    fn bgp_peers_come_from_a_file() {
        let dir = std::env::temp_dir().join(format!("vip-peer-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("peers");
        let f = file.to_str().unwrap();
        let bgp_with = |peers: &str| {
            std::fs::write(&file, peers).unwrap();
            let line = ["--mode", "bgp", "--bgp-local-as", "65000", "--bgp-peer-file", f];
            parse(&with(&line)).map(|c| c.bgp.unwrap())
        };
        let bgp = bgp_with("# routers\n10.0.0.254:65001:s3cr:et\n\n10.0.0.253:65002, 10.0.0.252:65003\n").unwrap();
        let peers: Vec<_> = bgp.peers.iter().map(|p| (p.ip.to_string(), p.asn, p.password.clone())).collect();
        assert_eq!(
            peers,
            [
                ("10.0.0.254".to_owned(), 65001, Some("s3cr:et".to_owned())),
                ("10.0.0.253".to_owned(), 65002, None),
                ("10.0.0.252".to_owned(), 65003, None)
            ]
        );
        let bad = bgp_with("10.0.0.254:65001:s3cret\n10.0.0.x:65002:hunter2\n").unwrap_err();
        assert!(bad.contains(&format!("--bgp-peer-file {f}, line 2: \"10.0.0.x\" is not an IPv4 address")), "{bad}");
        assert!(!bad.contains("s3cret") && !bad.contains("hunter2"), "a password in an error: {bad}");
        assert!(bgp_with("# none yet\n").unwrap_err().contains("at least one --bgp-peer"));
        std::fs::remove_file(&file).unwrap();
        let missing = parse(&with(&["--mode", "bgp", "--bgp-local-as", "65000", "--bgp-peer-file", f])).unwrap_err();
        assert!(missing.contains(&format!("--bgp-peer-file {f}: No such file")), "{missing}");
        let both = ["--mode", "bgp", "--bgp-local-as", "1", "--bgp-peer", "10.0.0.1:2", "--bgp-peer-file", f];
        assert!(parse(&with(&both)).unwrap_err().contains("cannot be used with"));
        std::fs::remove_dir(&dir).unwrap();
    }

    /// A `VIP_` variable no flag reads is found; the flags' own, and others, are not.
    #[test]
    fn a_misspelled_variable_is_found() {
        let names = ["VIP_HEALTH_INTERVL", "VIP_RISE", "VIP_CONFIG", "VIP_KEEP_FORWARDING_ON_EXIT", "PATH"];
        assert_eq!(unknown_variables(names.iter().map(|n| n.to_string())), ["VIP_HEALTH_INTERVL"]);
    }

    /// A bad `--bgp-peer` is named without its password, wherever it came from (clap's
    /// own error quoted the whole value, which the DaemonSet reads from a Secret).
    #[test]
    fn a_bad_bgp_peer_is_named_without_its_password() {
        let bgp = ["--mode", "bgp", "--bgp-local-as", "65000", "--bgp-peer"];
        for (peer, says) in [
            ("10.0.0.1:6500x:s3cret", "'10.0.0.1:6500x:<password>'"),
            ("10.0.0.1:65001:", "'10.0.0.1:65001:<password>'"),
            ("10.0.0.1:0:s3cret", "AS 0 is reserved"),
            ("host:65001:s3cret", "'<not shown>'"),
            ("10.0.0.300:65001:s3cret", "\"10.0.0.300\" is not an IPv4 address"),
            // A password with a comma: the tail is taken for the next peer, and not shown.
            ("10.0.0.2:65001:s3cret,zq9x", "a password may not contain ','"),
            ("10.0.0.1", "the peer's AS is missing"),
            ("127.0.0.1:65001:s3cret", "--bgp-peer 127.0.0.1: not a router's address"),
            ("10.0.0.1:65001:s3cret", "--bgp-peer 10.0.0.1 is a VIP"),
        ] {
            let mut args = bgp.to_vec();
            args.push(peer);
            let e = parse(&with(&args)).unwrap_err();
            assert!(e.contains(says) && e.contains("--bgp-peer"), "{peer}: {e}");
            assert!(!e.contains("s3cret") && !e.contains("zq9x"), "a password in an error: {e}");
        }
    }

    /// A file of comments only (everything commented out for now) adds nothing; it is
    /// not refused as "not a mapping".
    #[test]
    fn an_empty_config_file_adds_nothing() {
        let dir = std::env::temp_dir().join(format!("vip-config-empty-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("vip.yaml");
        for text in ["", "# nothing yet\n", "---\n"] {
            std::fs::write(&file, text).unwrap();
            let cfg = parse(&with(&["--config", file.to_str().unwrap()])).unwrap();
            assert_eq!(cfg.health.rise, 2, "{text:?}");
        }
        std::fs::write(&file, "- a list\n").unwrap();
        assert!(parse(&with(&["--config", file.to_str().unwrap()])).unwrap_err().contains("expected a mapping"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn flags_come_from_the_environment_and_the_file_in_that_order() {
        let dir = std::env::temp_dir().join(format!("vip-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("vip.yaml");
        std::fs::write(
            &file,
            "interface: fileif0\nvip: 10.9.9.9\nelection: none\nbackend: [10.9.9.11, '10.9.9.12:8443']\n\
             health_interval: 3s\nrise: 5\nhealth-insecure: true\nfall: 4\n",
        )
        .unwrap();
        let f = file.to_str().unwrap();
        // File only.
        let cfg = parse(&["--config", f]).unwrap();
        assert_eq!(cfg.interface, "fileif0");
        assert_eq!(cfg.backends.len(), 2);
        assert_eq!(cfg.health.interval, Duration::from_secs(3));
        assert!(cfg.health.insecure);
        // The command line beats the file. A flag whose VIP_ variable is set is not taken
        // from the file (clap then reads the variable itself, which a binary test
        // checks); here the fake environment only hides the file's values, so the
        // defaults stand.
        let cfg =
            parse_with(&["--config", f, "--rise", "7"], &[("VIP_HEALTH_INTERVAL", "9s"), ("VIP_FALL", "6")]).unwrap();
        assert_eq!(cfg.health.rise, 7);
        assert_eq!(cfg.health.fall, 3);
        assert_eq!(cfg.health.interval, Duration::from_secs(1));
        // Unknown keys are named.
        std::fs::write(&file, "interface: eth0\nhealth-intervall: 1s\n").unwrap();
        assert_eq!(parse(&["--config", f]).unwrap_err(), format!("--config {f}: unknown key \"health-intervall\""));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
