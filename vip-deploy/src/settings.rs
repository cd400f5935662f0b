//! [`ManifestArgs`] checked for one [`Kind`] and resolved into [`Settings`]: what every
//! object builder reads. The checks are the agent's own where a wrong value would only
//! show up as a crash-looping pod on every control-plane node (a bad VIP, a duplicate
//! backend), plus what only a manifest can get wrong (a password stored in the API).

use std::net::{IpAddr, SocketAddr};

use crate::{
    args::{Attach, Backend, BgpPeer, Discover, Dur, Election, Forward, HealthCheck, ManifestArgs, Mode},
    error::RenderError,
    names::NameRule,
    Kind,
};

/// The longest interface name Linux accepts (`IFNAMSIZ` - 1).
const IFNAME_MAX: usize = 15;
/// The kubeconfig a static pod mounts and a unit names: kubeadm's, which works from
/// `kubeadm init` on (`--bootstrap`).
const DEFAULT_KUBECONFIG: &str = "/etc/kubernetes/admin.conf";
/// Where the README installs the static binary.
const DEFAULT_BINARY: &str = "/usr/local/bin/vip-agent";
/// AS numbers no speaker may use as its own: 0 (RFC 7607), AS_TRANS (RFC 6793), 2³²-1
/// (RFC 7300). The agent refuses them too.
const RESERVED_AS: [u32; 3] = [0, 23456, u32::MAX];

/// Everything the builders need, validated for one kind.
#[derive(Clone, Debug)]
pub struct Settings {
    pub kind: Kind,
    pub vips: Vec<IpAddr>,
    /// `None` only for kinds that do not run the agent (`rbac`, `cilium-values`).
    pub interface: Option<String>,
    pub port: u16,
    pub mode: Mode,
    pub forward: Forward,
    pub attach: Attach,
    /// The VIPs' VLAN, if they live on one.
    pub vlan: Option<u16>,
    pub election: Election,
    pub backends: Vec<Backend>,
    /// Follow `default/kubernetes` (and grant the RBAC for it).
    pub discover: bool,
    pub health_check: HealthCheck,
    /// `--health-ca`: an absolute path on the host.
    pub health_ca: Option<String>,
    pub bgp: Option<Bgp>,
    pub image: String,
    pub namespace: String,
    pub lease_name: String,
    pub kubeconfig_path: String,
    /// The agent's binary on the host (systemd unit).
    pub binary: String,
    pub metrics_addr: SocketAddr,
    pub keep_forwarding_on_exit: bool,
}

/// The BGP settings of `--mode bgp`.
#[derive(Clone, Debug)]
pub struct Bgp {
    pub local_as: u32,
    pub router_id: Option<std::net::Ipv4Addr>,
    pub peers: BgpPeers,
    pub hold_time: Option<Dur>,
    pub keepalive: Option<Dur>,
}

/// Where the agent's `VIP_BGP_PEER` comes from.
#[derive(Clone, Debug)]
pub enum BgpPeers {
    /// Written into the manifest.
    Inline(Vec<BgpPeer>),
    /// The `bgp-peer` key of this Secret (in the agent's namespace).
    Secret(String),
    /// This root-only file on the host (an absolute path).
    File(String),
}

/// `value` of integer flag `--{flag}` as a `T`, if in `lo..=hi` (`range`, as the error
/// says it): see [`crate::args::in_range`].
fn ranged<T: TryFrom<i64>>(
    flag: &'static str,
    value: i64,
    lo: i64,
    hi: i64,
    range: &'static str,
) -> Result<T, RenderError> {
    crate::args::in_range(value, lo, hi).ok_or(RenderError::Range { flag, value, range })
}

impl Settings {
    /// Checks `args` for `kind`. Errors name the flag and value at fault.
    pub fn new(kind: Kind, args: &ManifestArgs) -> Result<Self, RenderError> {
        let runs_agent = kind.runs_agent();
        if args.vip_values.is_empty() && kind != Kind::Rbac {
            return Err(RenderError::Missing { kind, flag: "--vip" });
        }
        let vips = args.vips();
        check_vips(&vips)?;
        let family_rules = [
            (args.mode == Mode::Bgp, crate::vips::bgp_problem as fn(IpAddr) -> Option<&'static str>),
            (args.forward == Forward::Ipip, crate::vips::ipip_problem),
        ];
        for (applies, rule) in family_rules {
            if !applies {
                continue;
            }
            if let Some((vip, why)) = vips.iter().find_map(|&v| rule(v).map(|w| (v, w))) {
                return Err(RenderError::BadVip { vip, why });
            }
        }
        let interface = match (&args.interface, runs_agent) {
            (Some(name), _) => Some(check_interface(name)?),
            (None, true) => return Err(RenderError::Missing { kind, flag: "--interface" }),
            (None, false) => None,
        };
        let port = ranged("port", args.port, 1, 65535, "1 to 65535")?;
        let backends = args.backends();
        check_backends(&backends, &vips)?;
        check_name("namespace", &args.namespace, NameRule::Label)?;
        check_name("lease-name", &args.lease_name, NameRule::Subdomain)?;
        check_image(&args.image)?;
        let kubeconfig_path = args.kubeconfig_path.clone().unwrap_or_else(|| DEFAULT_KUBECONFIG.to_owned());
        if !kubeconfig_path.starts_with('/') {
            return Err(RenderError::RelativeKubeconfig { path: kubeconfig_path });
        }
        let binary = args.binary.clone().unwrap_or_else(|| DEFAULT_BINARY.to_owned());
        if !binary.starts_with('/') {
            return Err(RenderError::RelativeBinary { path: binary });
        }
        // A flag the output would silently drop is refused: the operator meant something.
        let host_files = [
            ("kubeconfig-path", args.kubeconfig_path.is_some(), matches!(kind, Kind::Pod | Kind::Systemd)),
            ("binary", args.binary.is_some(), kind == Kind::Systemd),
        ];
        if let Some(&(flag, _, _)) = host_files.iter().find(|&&(_, given, applies)| given && !applies) {
            return Err(RenderError::NotForKind { flag, kind });
        }
        // A DaemonSet runs on every control-plane node: unelected, each would answer ARP
        // for the VIP at once. (BGP mode elects nobody: every ready node advertises.)
        if matches!(kind, Kind::Daemonset | Kind::K3s) && args.election == Election::None && args.mode == Mode::Arp {
            return Err(RenderError::UnelectedEverywhere { kind });
        }
        if let Some(ca) = &args.health_ca {
            check_absolute("health-ca", ca)?;
        }
        if let (Some(vid), Mode::Bgp) = (args.vlan, args.mode) {
            let why = "is for ARP mode: BGP routes the VIPs to the node's own address";
            return Err(RenderError::BadName { flag: "vlan", value: vid.to_string(), why });
        }
        let vlan = match args.vlan {
            Some(vid) => Some(ranged("vlan", vid, 1, 4094, "1 to 4094 (0 and 4095 are reserved)")?),
            None => None,
        };
        if args.attach == Attach::Tcx && args.forward == Forward::Ipip {
            return Err(RenderError::TcxIpip);
        }
        let bgp = bgp(kind, args)?;
        let settings = Self {
            kind,
            vips,
            interface,
            port,
            mode: args.mode,
            forward: args.forward,
            attach: args.attach,
            vlan,
            election: args.election,
            backends,
            // On unless asked otherwise, for every kind: every control-plane node can read
            // `default/kubernetes` (the RBAC here grants it to the DaemonSet; a static pod
            // reads it with its admin kubeconfig), and without it the agent balances only
            // over --backend.
            discover: args.discover != Some(Discover::None),
            health_check: args.health_check,
            health_ca: args.health_ca.clone(),
            bgp,
            image: args.image.clone(),
            namespace: args.namespace.clone(),
            lease_name: args.lease_name.clone(),
            kubeconfig_path,
            binary,
            metrics_addr: args.metrics_addr,
            keep_forwarding_on_exit: args.keep_forwarding_on_exit,
        };
        if let Some(path) = args.kubeconfig_path.as_ref().filter(|_| !settings.needs_kubeconfig()) {
            let why =
                "nothing would read it: no Lease, no discovery, and the checks have their CA (--health-ca) or are TCP";
            return Err(RenderError::BadName { flag: "kubeconfig-path", value: path.clone(), why });
        }
        Ok(settings)
    }

    /// The interface, for kinds that run the agent (checked present by [`Settings::new`]).
    pub fn interface(&self) -> &str {
        self.interface.as_deref().unwrap_or_default()
    }

    /// Whether the agent needs a Lease (and so the RBAC for one): elected ARP mode. In
    /// BGP mode every ready node advertises the VIP and the agent never reads a Lease.
    pub fn elects(&self) -> bool {
        self.election == Election::Kubernetes && self.mode == Mode::Arp
    }

    /// Whether the agent talks to the Kubernetes API: for the Lease, or to discover the
    /// apiservers. Without either it needs no API server URL.
    pub fn uses_api(&self) -> bool {
        self.elects() || self.discover
    }

    /// Whether the agent needs the host's kubeconfig (static pod, systemd): to reach the
    /// API, or for the CA its HTTPS checks verify with when `--health-ca` is not given.
    /// A unit for static backends without a cluster (`--election none --discover none`)
    /// with TCP checks or its own CA must not name a kubeconfig the host may not have.
    pub fn needs_kubeconfig(&self) -> bool {
        self.uses_api() || (self.health_check == HealthCheck::Https && self.health_ca.is_none())
    }
}

fn check_vips(vips: &[IpAddr]) -> Result<(), RenderError> {
    if vips.len() > vip_common::MAX_VIPS as usize {
        return Err(RenderError::TooManyVips { count: vips.len(), max: vip_common::MAX_VIPS });
    }
    for (i, &vip) in vips.iter().enumerate() {
        if let Some(why) = crate::vips::vip_problem(vip) {
            return Err(RenderError::BadVip { vip, why });
        }
        if vips[..i].contains(&vip) {
            return Err(RenderError::DuplicateVip { vip });
        }
    }
    Ok(())
}

fn check_interface(name: &str) -> Result<String, RenderError> {
    let why = if name.is_empty() || name.len() > IFNAME_MAX {
        "an interface name has 1 to 15 bytes"
    } else if name == "." || name == ".." || name.contains(|c: char| c == '/' || c == ':' || c.is_whitespace()) {
        "not a valid interface name"
    } else {
        return Ok(name.to_owned());
    };
    Err(RenderError::BadName { flag: "interface", value: name.to_owned(), why })
}

fn check_backends(backends: &[Backend], vips: &[IpAddr]) -> Result<(), RenderError> {
    for (i, b) in backends.iter().enumerate() {
        let why = if vips.contains(&IpAddr::V4(b.ip)) {
            "is a VIP"
        } else if backends[..i].iter().any(|o| o.ip == b.ip) {
            "is given twice"
        } else if let Some(why) = crate::vips::backend_problem(b.ip) {
            why
        } else {
            continue;
        };
        return Err(RenderError::BadBackend { backend: b.to_string(), why });
    }
    Ok(())
}

/// A file the pods mount from the host, and the unit names: an absolute path.
fn check_absolute(flag: &'static str, path: &str) -> Result<(), RenderError> {
    if path.starts_with('/') {
        return Ok(());
    }
    Err(RenderError::BadName { flag, value: path.to_owned(), why: "must be an absolute path on the host" })
}

fn check_name(flag: &'static str, value: &str, rule: NameRule) -> Result<(), RenderError> {
    rule.check(value).map_err(|why| RenderError::BadName { flag, value: value.to_owned(), why })
}

fn check_image(image: &str) -> Result<(), RenderError> {
    let why = if image.is_empty() {
        "an image reference is not empty"
    } else if image.contains(char::is_whitespace) {
        "an image reference has no whitespace"
    } else {
        return Ok(());
    };
    Err(RenderError::BadName { flag: "image", value: image.to_owned(), why })
}

fn bgp(kind: Kind, args: &ManifestArgs) -> Result<Option<Bgp>, RenderError> {
    let given: [(&'static str, bool); 7] = [
        ("bgp-local-as", args.bgp_local_as.is_some()),
        ("bgp-router-id", args.bgp_router_id.is_some()),
        ("bgp-peer", !args.bgp_peers.is_empty()),
        ("bgp-hold-time", args.bgp_hold_time.is_some()),
        ("bgp-keepalive", args.bgp_keepalive.is_some()),
        ("bgp-peer-secret", args.bgp_peer_secret.is_some()),
        ("bgp-peer-file", args.bgp_peer_file.is_some()),
    ];
    if args.mode != Mode::Bgp {
        return match given.iter().find(|(_, set)| *set) {
            Some((flag, _)) => Err(RenderError::BgpFlagWithoutBgp { flag }),
            None => Ok(None),
        };
    }
    let local_as = match args.bgp_local_as {
        Some(asn) if RESERVED_AS.contains(&asn) => return Err(RenderError::ReservedAs { asn }),
        Some(asn) => asn,
        None => return Err(RenderError::BgpMissing { flag: "--bgp-local-as" }),
    };
    if let Some((id, why)) =
        args.bgp_router_id.and_then(|id| crate::vips::router_id_problem(id, &args.vips()).map(|w| (id, w)))
    {
        return Err(RenderError::BadName { flag: "bgp-router-id", value: id.to_string(), why });
    }
    if let (Some(id), Kind::Daemonset | Kind::K3s) = (args.bgp_router_id, kind) {
        let why = "would be every node's (a DaemonSet runs one agent per node with the same flags; RFC 6286: unique within the AS): leave it out to use each node's own address";
        return Err(RenderError::BadName { flag: "bgp-router-id", value: id.to_string(), why });
    }
    let peers = match (&args.bgp_peer_file, &args.bgp_peer_secret, args.bgp_peers.as_slice()) {
        (Some(path), _, _) => {
            check_absolute("bgp-peer-file", path)?;
            BgpPeers::File(path.clone())
        }
        (None, Some(_), _) if matches!(kind, Kind::Pod | Kind::Systemd) => return Err(RenderError::SecretInStaticPod),
        (None, Some(secret), _) => {
            check_name("bgp-peer-secret", secret, NameRule::Subdomain)?;
            BgpPeers::Secret(secret.clone())
        }
        (None, None, []) => {
            return Err(RenderError::BgpMissing { flag: "--bgp-peer, --bgp-peer-file or --bgp-peer-secret" })
        }
        (None, None, peers) => {
            for (i, p) in peers.iter().enumerate() {
                if p.ip.is_ipv6() {
                    return Err(RenderError::BgpPeer {
                        peer: p.ip,
                        why: "IPv6 peers are not supported by the agent yet",
                    });
                }
                if peers[..i].iter().any(|o| o.ip == p.ip) {
                    return Err(RenderError::BgpPeer { peer: p.ip, why: "is given twice" });
                }
            }
            if let Some(p) = peers.iter().find(|p| p.password.is_some()) {
                return Err(RenderError::PasswordReadable { kind, peer: p.ip, by: kind.readable_by() });
            }
            BgpPeers::Inline(peers.to_vec())
        }
    };
    let timers = crate::vips::bgp_timers_problem(args.bgp_hold_time.map(|d| d.0), args.bgp_keepalive.map(|d| d.0));
    if let Some(crate::vips::BgpTimerProblem { flag, value, why }) = timers {
        return Err(RenderError::BgpTimer { flag, value: Dur(value).to_string(), why });
    }
    Ok(Some(Bgp {
        local_as,
        router_id: args.bgp_router_id,
        peers,
        hold_time: args.bgp_hold_time,
        keepalive: args.bgp_keepalive,
    }))
}
