//! The flags of `vip-agent manifest KIND`: what a user says about their cluster, as clap
//! parses it. Nothing here is checked against the kind being rendered; `render`
//! does that and resolves the per-kind defaults.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    str::FromStr,
    time::Duration,
};

use clap::{ArgAction, Args, ValueEnum};

/// The image the manifests run unless `--image` says otherwise: the project's registry
/// path, tagged with this crate's version (the workspace version, so the agent and its
/// manifests move together). The README ("Before any install") says how to push an image there.
pub const DEFAULT_IMAGE: &str = concat!("ghcr.io/vip-project/vip-agent:", env!("CARGO_PKG_VERSION"));

/// How clients find the VIP (the agent's `--mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// The elected leader answers ARP for the VIP.
    Arp,
    /// Every healthy node advertises the VIP /32 to its BGP peers.
    Bgp,
}

/// How VIP traffic reaches a backend on another node (the agent's `--forward`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Forward {
    /// Direct server return: rewrite the destination MAC (backends share the L2).
    Dsr,
    /// Encapsulate in IPv4 to the backend (routed backends).
    Ipip,
    /// No load balancing: the leader's own apiserver takes all traffic.
    Local,
}

/// The hook the data plane runs at (the agent's `--attach`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum Attach {
    /// XDP: the fast path; needs the interface's XDP hook to itself.
    #[default]
    Xdp,
    /// tcx ingress, first: beside another program's XDP (Cilium's acceleration).
    Tcx,
}

/// Leader election (the agent's `--election`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Election {
    /// A coordination.k8s.io/v1 Lease elects the node that answers ARP.
    Kubernetes,
    /// No election: every node running the agent leads (single node only).
    None,
}

/// How the agent checks an apiserver (the agent's `--health-check`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum HealthCheck {
    /// HTTPS `GET /readyz`, the certificate verified (CA from `--health-ca`, else the
    /// kubeconfig's cluster CA).
    #[default]
    Https,
    /// A TCP connect only (no CA needed).
    Tcp,
}

/// Where backends come from besides `--backend`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Discover {
    /// The EndpointSlices of `default/kubernetes`, where the apiservers register.
    Kubernetes,
    /// Only the `--backend` list (the agent's flag is then left out).
    None,
}

/// The flags of `vip-agent manifest`. None reads the environment: a `VIP_*` variable
/// meant for the agent must not leak into the manifests rendered on an operator's shell.
#[derive(Clone, Debug, PartialEq, Eq, Args)]
pub struct ManifestArgs {
    /// Virtual IP to serve, IPv4 or IPv6. Repeat the flag (or separate with commas) for
    /// several. Needed by every kind but `rbac`.
    #[arg(long = "vip", value_name = "IP", value_parser = listed::<IpAddr>)]
    pub vip_values: Vec<Listed<IpAddr>>,
    /// Interface that faces the clients, the same name on every control-plane node.
    /// Needed by `daemonset`, `pod`, `k3s` and `systemd`.
    #[arg(long, value_name = "IF")]
    pub interface: Option<String>,
    /// TCP port of the apiservers behind the VIP.
    #[arg(long, allow_hyphen_values = true, default_value_t = 6443)]
    pub port: i64,
    /// How clients find the VIP.
    #[arg(long, value_enum, default_value_t = Mode::Arp)]
    pub mode: Mode,
    /// How VIP traffic reaches a backend on another node.
    #[arg(long, value_enum, default_value_t = Forward::Dsr)]
    pub forward: Forward,
    /// The hook the data plane runs at: xdp, or tcx to share the interface with Cilium's
    /// XDP acceleration (`cilium-values` then turns it on).
    #[arg(long, value_enum, default_value_t = Attach::Xdp)]
    pub attach: Attach,
    /// The VLAN (1 to 4094) the VIPs live on, when the interface is a trunk.
    #[arg(long, allow_hyphen_values = true, value_name = "VID")]
    pub vlan: Option<i64>,
    /// Leader election: a Kubernetes Lease, or none (single node).
    #[arg(long, value_enum, default_value_t = Election::Kubernetes)]
    pub election: Election,
    /// Static backend (an apiserver): IPv4, and optionally the port its health check
    /// uses. Repeat the flag (or separate with commas).
    #[arg(long = "backend", value_name = "IP[:PORT]", value_parser = listed::<Backend>)]
    pub backend_values: Vec<Listed<Backend>>,
    /// Discover the apiservers from `default/kubernetes` (default: kubernetes).
    #[arg(long, value_enum)]
    pub discover: Option<Discover>,
    /// How the agent checks the apiservers.
    #[arg(long, value_enum, default_value_t = HealthCheck::Https)]
    pub health_check: HealthCheck,
    /// PEM file on the host of the CA that signs the apiservers' certificates (mounted
    /// into the pods). Without it the HTTPS checks use the kubeconfig's cluster CA.
    #[arg(long, value_name = "PATH")]
    pub health_ca: Option<String>,
    /// BGP: this node's AS number (`--mode bgp`).
    #[arg(long, value_name = "AS")]
    pub bgp_local_as: Option<u32>,
    /// BGP: the router id (default: chosen by the agent).
    #[arg(long, value_name = "IP")]
    pub bgp_router_id: Option<Ipv4Addr>,
    /// BGP peer: address, AS and an optional TCP-MD5 password (no commas in it). Repeat
    /// the flag (or separate with commas). A password is refused in every kind (each is
    /// readable by others: the API shows a DaemonSet and a static pod's mirror Pod,
    /// `systemctl show` a unit's environment): use --bgp-peer-file or --bgp-peer-secret.
    #[arg(long = "bgp-peer", value_name = "IP:AS[:PASSWORD]", value_delimiter = ',', value_parser = BgpPeerParser)]
    pub bgp_peers: Vec<BgpPeer>,
    /// BGP hold time, whole seconds (e.g. `9s`).
    #[arg(long, value_name = "DUR")]
    pub bgp_hold_time: Option<Dur>,
    /// BGP keepalive interval, whole seconds (e.g. `3s`).
    #[arg(long, value_name = "DUR")]
    pub bgp_keepalive: Option<Dur>,
    /// Take the BGP peers (`IP:AS[:PASSWORD]`, comma-separated) from the key `bgp-peer`
    /// of this Secret in --namespace instead of --bgp-peer.
    #[arg(long, value_name = "NAME", conflicts_with = "bgp_peers")]
    pub bgp_peer_secret: Option<String>,
    /// Take the BGP peers (`IP:AS[:PASSWORD]`, one per line or comma-separated) from this
    /// root-only file on the host (mounted into the pods) instead of --bgp-peer.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["bgp_peers", "bgp_peer_secret"])]
    pub bgp_peer_file: Option<String>,
    /// Container image of the agent.
    #[arg(long, value_name = "NAME:TAG", default_value = DEFAULT_IMAGE)]
    pub image: String,
    /// Namespace of the agent, its ServiceAccount and its Lease.
    #[arg(long, default_value = "kube-system")]
    pub namespace: String,
    /// Name of the Lease that elects the leader.
    #[arg(long, default_value = "vip-control-plane")]
    pub lease_name: String,
    /// Kubeconfig on the host that the static pod mounts and the unit names (`pod` and
    /// `systemd`; default `/etc/kubernetes/admin.conf`). `admin.conf` works during
    /// `kubeadm init` too: the static pod runs with `--bootstrap` (README, "Install on
    /// kubeadm"). Refused where nothing would read it.
    #[arg(long, value_name = "PATH")]
    pub kubeconfig_path: Option<String>,
    /// The agent's binary on the host (`systemd` only; default `/usr/local/bin/vip-agent`).
    #[arg(long, value_name = "PATH")]
    pub binary: Option<String>,
    /// Where the agent serves Prometheus metrics; the readiness probe asks there.
    #[arg(long, default_value = "127.0.0.1:9469")]
    pub metrics_addr: SocketAddr,
    /// Leave the data plane attached and pinned when the agent stops, so the next pod
    /// adopts it without a gap (the README's "Upgrades" section gives the trade-off).
    /// Written as `run` takes it: alone for true, `=false` or `=true` with a value.
    #[arg(
        long,
        value_name = "BOOL",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "true",
        action = ArgAction::Set,
        default_value_t = true
    )]
    pub keep_forwarding_on_exit: bool,
}

/// `--backend IP[:PORT]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backend {
    pub ip: Ipv4Addr,
    /// The port its health check uses (traffic keeps the VIP's port).
    pub port: Option<u16>,
}

impl FromStr for Backend {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        // An IPv6 backend (with or without brackets) would otherwise read as a bad port.
        if s.starts_with('[') || s.matches(':').count() > 1 {
            return Err(format!(
                "{s:?}: backends are IPv4 (an IPv6 VIP is balanced to the same IPv4-known apiservers)"
            ));
        }
        let (ip, port) = match s.split_once(':') {
            Some((ip, port)) => match port.parse::<u16>() {
                Ok(0) | Err(_) => return Err(format!("{s:?}: bad port {port:?}")),
                Ok(port) => (ip, Some(port)),
            },
            None => (s, None),
        };
        let ip = ip.parse().map_err(|_| format!("{s:?}: {ip:?} is not an IPv4 address"))?;
        Ok(Self { ip, port })
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(port) => write!(f, "{}:{port}", self.ip),
            None => write!(f, "{}", self.ip),
        }
    }
}

/// The longest TCP-MD5 key Linux accepts (`TCP_MD5SIG_MAXKEYLEN`), as the agent checks.
const TCP_MD5_MAX_KEY: usize = 80;

/// `--bgp-peer IP:AS[:PASSWORD]`; an IPv6 address goes in brackets (`[2001:db8::1]:65000`).
#[derive(Clone, PartialEq, Eq)]
pub struct BgpPeer {
    pub ip: IpAddr,
    pub asn: u32,
    /// TCP-MD5 password (RFC 2385); never printed by `Debug`.
    pub password: Option<String>,
}

impl fmt::Debug for BgpPeer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BgpPeer")
            .field("ip", &self.ip)
            .field("asn", &self.asn)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Parses `--bgp-peer` as [`BgpPeer`]'s `FromStr` does, with its error alone: clap's own
/// error quotes the whole value, password included.
#[derive(Clone)]
struct BgpPeerParser;

impl clap::builder::TypedValueParser for BgpPeerParser {
    type Value = BgpPeer;

    fn parse_ref(
        &self,
        _cmd: &clap::Command,
        _arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<BgpPeer, clap::Error> {
        let invalid = |why: &str| {
            clap::Error::raw(clap::error::ErrorKind::ValueValidation, format!("invalid --bgp-peer: {why}\n"))
        };
        value.to_str().ok_or_else(|| invalid("not UTF-8"))?.parse().map_err(|why: String| invalid(&why))
    }
}

impl FromStr for BgpPeer {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        // Never echo the input: it may hold a password.
        let (ip, rest) = match s.strip_prefix('[') {
            Some(v6) => v6.split_once("]:").ok_or("a bracketed IPv6 peer is written [IP]:AS[:PASSWORD]")?,
            None => s.split_once(':').ok_or("a BGP peer is written IP:AS[:PASSWORD]")?,
        };
        let ip: IpAddr = ip.parse().map_err(|_| format!("BGP peer: {ip:?} is not an IP address"))?;
        let (asn, password) = match rest.split_once(':') {
            Some((asn, password)) => (asn, Some(password.to_owned())),
            None => (rest, None),
        };
        let asn: u32 = asn.parse().map_err(|_| format!("BGP peer {ip}: {asn:?} is not an AS number"))?;
        if asn == 0 || asn == u32::MAX {
            return Err(format!("BGP peer {ip}: AS {asn} is reserved (RFC 7607, RFC 7300)"));
        }
        if password.as_deref() == Some("") {
            return Err(format!("BGP peer {ip}: empty password (leave out the second ':' for none)"));
        }
        if password.as_ref().is_some_and(|p| p.len() > TCP_MD5_MAX_KEY) {
            return Err(format!("BGP peer {ip}: a TCP-MD5 password has at most {TCP_MD5_MAX_KEY} bytes"));
        }
        Ok(Self { ip, asn, password })
    }
}

impl fmt::Display for BgpPeer {
    /// The form the agent parses back: `IP:AS[:PASSWORD]`, IPv6 in brackets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.ip {
            IpAddr::V4(ip) => write!(f, "{ip}:{}", self.asn)?,
            IpAddr::V6(ip) => write!(f, "[{ip}]:{}", self.asn)?,
        }
        match &self.password {
            Some(password) => write!(f, ":{password}"),
            None => Ok(()),
        }
    }
}

/// The entries of one value of a flag that takes several, separated by commas (`--vip
/// 10.0.0.100,fd00::100`; the flag may be repeated too). Parsed whole by [`listed`], so
/// that an error names the value as given: clap's own splitting (`value_delimiter`)
/// named the piece, and `--vip fd00::1,` was refused as the invalid value `''`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed<T>(pub Vec<T>);

/// Parses `s` as comma-separated entries of `T`. An empty entry (a comma with nothing on
/// one side) is an error; so is an entry `T` refuses, whose error is prefixed with the
/// entry when `s` holds several and the error does not already name it.
pub fn listed<T>(s: &str) -> Result<Listed<T>, String>
where
    T: FromStr,
    T::Err: fmt::Display,
{
    let several = s.contains(',');
    s.split(',')
        .map(|entry| {
            if entry.trim().is_empty() {
                return Err("an empty entry (a comma with nothing before or after it)".to_owned());
            }
            entry.parse::<T>().map_err(|e| {
                let why = e.to_string();
                if several && !why.contains(entry) {
                    format!("{entry}: {why}")
                } else {
                    why
                }
            })
        })
        .collect::<Result<Vec<T>, String>>()
        .map(Listed)
}

/// `value` as a `T`, if it lies in `lo..=hi`. Integer flags with a range are read as
/// `i64` and checked by this (in `run` and `manifest` alike), so that a negative or too
/// large value gets the flag's own range in its error, not the range of the type that
/// holds it (`--vlan -1` was refused as "not in 0..=65535").
pub fn in_range<T: TryFrom<i64>>(value: i64, lo: i64, hi: i64) -> Option<T> {
    (lo..=hi).contains(&value).then(|| T::try_from(value).ok()).flatten()
}

/// Every entry of every value of a repeated, comma-separated flag, in the order given.
pub fn entries<T: Clone>(values: &[Listed<T>]) -> Vec<T> {
    values.iter().flat_map(|l| l.0.iter().cloned()).collect()
}

/// A duration with a unit, as the agent writes them: `500ms`, `2s`, `1.5s`, `1m`, `1h`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl FromStr for Dur {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        // Zero is zero in every unit: "0" needs none (as Go's ParseDuration has it), and
        // the help of `--bgp-hold-time` says "0, or 3s to 65535s".
        if s == "0" {
            return Ok(Dur(Duration::ZERO));
        }
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(|| format!("{s:?} has no unit (write e.g. 500ms, 2s, 1m)"))?;
        let (num, unit) = s.split_at(split);
        let n: f64 = num.parse().map_err(|_| format!("{s:?} is not a duration"))?;
        let secs = match unit {
            "ms" => n / 1000.0,
            "s" => n,
            "m" => n * 60.0,
            "h" => n * 3600.0,
            _ => return Err(format!("{s:?}: unknown unit {unit:?} (use ms, s, m or h)")),
        };
        Duration::try_from_secs_f64(secs).map(Dur).map_err(|_| format!("{s:?} is out of range"))
    }
}

impl fmt::Display for Dur {
    /// In the largest unit that holds it whole (`2h`, `61m`, `90s`, `500ms`), else in
    /// fractional milliseconds (`0.001ms`): what an operator wrote comes back as written
    /// (`2h` is not shown as `7200s`, a microsecond not as `0ms`), and parses back
    /// unchanged.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const NS_PER_MS: u128 = 1_000_000;
        let ns = self.0.as_nanos();
        if ns == 0 {
            return f.write_str("0s");
        }
        let units =
            [(3_600_000 * NS_PER_MS, "h"), (60_000 * NS_PER_MS, "m"), (1_000 * NS_PER_MS, "s"), (NS_PER_MS, "ms")];
        match units.iter().find(|&&(size, _)| ns.is_multiple_of(size)) {
            Some(&(size, unit)) => write!(f, "{}{unit}", ns / size),
            None => write!(f, "{}ms", ns as f64 / NS_PER_MS as f64),
        }
    }
}

impl ManifestArgs {
    /// Every `--vip`, in the order given.
    pub fn vips(&self) -> Vec<IpAddr> {
        entries(&self.vip_values)
    }

    /// Every `--backend`, in the order given.
    pub fn backends(&self) -> Vec<Backend> {
        entries(&self.backend_values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bgp_peers_parse_with_and_without_password_and_print_back() {
        for text in ["192.0.2.1:65001", "192.0.2.1:4200000000:s3cr:et", "[2001:db8::1]:65001:pw"] {
            let peer: BgpPeer = text.parse().unwrap();
            assert_eq!(peer.to_string(), text);
        }
        let peer: BgpPeer = "192.0.2.1:65001:s3cr:et".parse().unwrap();
        assert_eq!(peer.password.as_deref(), Some("s3cr:et"));
        assert!(!format!("{peer:?}").contains("s3cr"), "Debug must not show the password");
        let long = format!("192.0.2.1:65001:{}", "x".repeat(81));
        assert!(long.parse::<BgpPeer>().unwrap_err().contains("at most 80 bytes"));
    }

    #[test]
    fn bad_bgp_peers_are_refused_without_echoing_the_password() {
        for (text, needle) in [
            ("192.0.2.1", "IP:AS[:PASSWORD]"),
            ("192.0.2.x:65001:hunter2", "not an IP address"),
            ("192.0.2.1:AS1:hunter2", "not an AS number"),
            ("192.0.2.1:0:hunter2", "AS 0 is reserved"),
            ("192.0.2.1:4294967295:hunter2", "AS 4294967295 is reserved"),
            ("192.0.2.1:65001:", "empty password"),
            ("[2001:db8::1:65001", "[IP]:AS"),
        ] {
            let err = text.parse::<BgpPeer>().unwrap_err();
            assert!(err.contains(needle), "{text}: {err}");
            assert!(!err.contains("hunter2"), "{text}: the error shows the password: {err}");
        }
    }

    /// Through the command line too: clap's own error quoted the whole value.
    #[test]
    fn a_bad_bgp_peer_flag_is_refused_without_echoing_the_password() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            args: ManifestArgs,
        }
        for peer in ["192.0.2.x:65001:hunter2", "192.0.2.1:AS1:hunter2"] {
            let argv = ["manifest", "--vip", "192.0.2.100", "--bgp-peer", peer];
            let err = Cli::try_parse_from(argv).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains("--bgp-peer"), "{peer}: {err}");
            assert!(!err.contains("hunter2"), "{peer}: the error shows the password: {err}");
        }
    }

    #[test]
    fn durations_print_in_the_largest_whole_unit_and_parse_back() {
        for (text, shown) in [
            ("2h", "2h"),
            ("61m", "61m"),
            ("120s", "2m"),
            ("90s", "90s"),
            ("1.5s", "1500ms"),
            ("500ms", "500ms"),
            ("0.001ms", "0.001ms"),
            ("0s", "0s"),
            ("0", "0s"),
        ] {
            let d: Dur = text.parse().unwrap();
            assert_eq!(d.to_string(), shown, "{text}");
            assert_eq!(shown.parse::<Dur>().unwrap(), d, "{shown} parses back");
        }
        assert!("9".parse::<Dur>().unwrap_err().contains("no unit"));
        assert!("9d".parse::<Dur>().unwrap_err().contains("unknown unit"));
    }

    #[test]
    fn backends_take_an_optional_port() {
        assert_eq!("10.0.0.11".parse::<Backend>().unwrap(), Backend { ip: Ipv4Addr::new(10, 0, 0, 11), port: None });
        assert_eq!("10.0.0.11:8443".parse::<Backend>().unwrap().to_string(), "10.0.0.11:8443");
        assert!("10.0.0.11:0".parse::<Backend>().unwrap_err().contains("bad port"));
        assert!("fe80::1".parse::<Backend>().is_err());
    }
}
