//! `vip-agent run`: the daemon for one node.
//!
//! Start-up is ordered so that bad input changes nothing: everything that can fail on a
//! wrong value (interface, CA, metrics address, a VIP that is a host's address) is
//! checked before the data plane is touched; then the maps are filled before the
//! program is attached, so it never runs on empty state. Every change to the host is
//! recorded and undone on stop (or on a failed start) — except with
//! `--keep-forwarding-on-exit`, which leaves the data plane attached and pinned, and the
//! VIP in place, for the next agent to adopt.
//!
//! Then an event loop: each source of events — health reports, host changes (link,
//! addresses), discovery, the announcer, a periodic tick, signals — is dispatched to a
//! named handler of [`node::Node`], which holds the node's state. The concerns live in
//! their own modules: [`backends`] (tracked backends and the readiness gate), [`host`]
//! (host state the agent owns, repaired when changed), [`crate::announce`] (how clients
//! find the VIP).

mod backends;
mod host;
mod node;

use std::{net::SocketAddr, path::Path, time::Duration};

use tokio::{
    signal::unix::{signal, Signal, SignalKind},
    sync::mpsc,
};
use tracing::{info_span, warn, Instrument};
use vip_common::ForwardMode;

pub use self::host::HostError;
use self::{
    host::Host,
    node::{Node, Start},
};
use crate::{
    apiclient::{self, ApiClientError, Timeouts},
    balancer::BalancerError,
    config::{Election, HealthCheck, Mode, RunConfig},
    dataplane::{Dataplane, DataplaneError, MapError},
    health::{self, CaSource, Probe, TlsError},
    kubeconfig, metrics,
    netdev::{self, NetdevError},
    netlink::{self, Netlink, NetlinkError},
};

/// Where a pod finds its service account's CA.
const SERVICE_ACCOUNT_CA: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";
/// The pod's service-account token: the checks' bearer when the agent runs on it.
const SERVICE_ACCOUNT_TOKEN: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
/// How often host state is re-checked (and repaired) and eligibility re-evaluated.
const TICK: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Caps(#[from] crate::caps::CapsError),
    #[error(transparent)]
    Netdev(#[from] NetdevError),
    /// Boxed: aya's errors are large, and this is returned on every path.
    #[error(transparent)]
    Dataplane(Box<DataplaneError>),
    #[error(transparent)]
    Map(#[from] MapError),
    #[error(transparent)]
    Balancer(#[from] BalancerError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error(transparent)]
    Host(#[from] HostError),
    #[error(transparent)]
    ApiClient(#[from] ApiClientError),
    #[error(transparent)]
    Bgp(#[from] crate::announce::bgp::BgpError),
    #[error("--metrics-addr {addr}: cannot listen")]
    Metrics {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "interface {interface} already has an XDP program attached (id {id}, {name:?}) that vip-agent did not pin \
         at {pin_path}: it never replaces another program's XDP hook; run beside it with --attach tcx, \
         detach that one (ip link set dev {interface} xdp off), or use another interface"
    )]
    ForeignXdp { interface: String, id: u32, name: String, pin_path: String },
    #[error(
        "interface {interface} is already served by another vip-agent (its XDP program, id {id}, is not pinned at \
         {pin_path}): give this one that agent's --pin-path to take over from it (an agent that stopped with \
         --keep-forwarding-on-exit leaves its program attached), or stop that agent"
    )]
    OtherAgentXdp { interface: String, id: u32, pin_path: String },
    #[error("installing the {signal} handler failed")]
    Signal {
        signal: &'static str,
        #[source]
        source: std::io::Error,
    },
}

impl From<DataplaneError> for RunError {
    fn from(e: DataplaneError) -> Self {
        RunError::Dataplane(Box::new(e))
    }
}

/// Where the HTTPS checks' CA comes from: `--health-insecure`, `--health-ca`, the
/// kubeconfig's cluster CA, or the pod's service account.
fn ca_source(cfg: &RunConfig) -> Result<CaSource<'_>, TlsError> {
    if cfg.health.insecure {
        Ok(CaSource::Insecure)
    } else if let Some(ca) = &cfg.health.ca {
        Ok(CaSource::PemFile(ca))
    } else if let Some(kc) = &cfg.kubeconfig {
        kubeconfig::cluster_ca(kc)
    } else if Path::new(SERVICE_ACCOUNT_CA).exists() {
        Ok(CaSource::PemFile(Path::new(SERVICE_ACCOUNT_CA)))
    } else {
        Err(TlsError::NoCa)
    }
}

/// The token the HTTPS checks send: the pod's service-account token at `path`, when the
/// agent runs on it (no kubeconfig), as K3s refuses anonymous checks (see `TokenFile`).
/// Never to a server whose certificate is not verified (`--health-insecure`): whoever
/// answers at a backend's address would get a token that can write the Lease.
fn check_token(cfg: &RunConfig, path: &Path) -> Option<std::sync::Arc<health::TokenFile>> {
    (cfg.kubeconfig.is_none() && !cfg.health.insecure && path.exists())
        .then(|| std::sync::Arc::new(health::TokenFile::new(path)))
}

/// The health probe (`None` when there is nothing to check), and the flow-hash seed:
/// `--flow-hash-seed`, else derived from the cluster CA.
fn probe_and_seed(cfg: &RunConfig) -> Result<(Option<Probe>, u32), TlsError> {
    let balancing = !cfg.backends.is_empty() || cfg.discover;
    let probe = match (balancing, cfg.health.check) {
        (false, _) => None,
        (true, HealthCheck::Tcp) => Some(Probe::Tcp),
        (true, HealthCheck::Https) => {
            let server_name = rustls::pki_types::ServerName::try_from(cfg.health.server_name.clone())
                .map_err(|_| TlsError::ServerName { name: cfg.health.server_name.clone() })?;
            let token = check_token(cfg, Path::new(SERVICE_ACCOUNT_TOKEN));
            if cfg.health.insecure {
                warn!("--health-insecure: the checks accept any certificate, and send no credentials");
            }
            let tls = health::tls_config(ca_source(cfg)?)?;
            Some(Probe::Https { path: cfg.health.path.clone(), tls, server_name, token })
        }
    };
    let derived = ca_source(cfg)
        .ok()
        .and_then(|ca| health::ca_fingerprint(&ca))
        .map(|d| u32::from_be_bytes([d[0], d[1], d[2], d[3]]));
    let seed = match (cfg.flow_hash_seed, derived) {
        (Some(s), _) | (None, Some(s)) => s,
        (None, None) => {
            if balancing {
                warn!("no cluster CA to derive the flow-hash seed from: flows are predictable; give --flow-hash-seed");
            }
            0
        }
    };
    Ok((probe, seed))
}

/// Warns of each BGP peer whose route leaves by another interface than `dev`: the
/// routes name `dev`'s address as their next hop (RFC 4271 §5.1.3: on a shared subnet,
/// for a single-hop peer), which such a router may not reach directly, and then leaves
/// unused. A warning, not a refusal: a router reached through another link may still
/// route to this one.
async fn warn_off_link_peers(nl: &Netlink, dev: &netdev::Netdev, bgp: &crate::config::BgpConfig) {
    for peer in &bgp.peers {
        match nl.route_interface(peer.ip).await {
            Ok(Some(oif)) if oif != dev.ifindex => warn!(
                peer = %peer.ip,
                via_ifindex = oif,
                interface = %dev.name,
                next_hop = ?dev.ipv4,
                "the BGP peer is reached through another interface than --interface; the routes name this \
                 interface's address as next hop, which the router may not reach directly"
            ),
            Ok(_) => {}
            Err(e) => warn!(peer = %peer.ip, error = %e, "could not look up the route to the BGP peer"),
        }
    }
}

/// The peer file holds the TCP-MD5 passwords, so it should be readable by root alone
/// (`--bgp-peer-file`'s help says so). A warning, not a refusal: a Secret mounted as a
/// volume is 0644 unless its `defaultMode` says otherwise.
fn warn_readable_peer_file(bgp: &crate::config::BgpConfig) {
    if let Some((path, mode)) = readable_peer_file(bgp) {
        warn!(
            file = %path.display(), mode = format!("{mode:04o}"),
            "the BGP peer file, which holds passwords, is readable by other users than its owner: chmod 600 it"
        );
    }
}

/// The peer file and its mode, if it holds a password and others than its owner may
/// read it.
fn readable_peer_file(bgp: &crate::config::BgpConfig) -> Option<(&std::path::Path, u32)> {
    use std::os::unix::fs::PermissionsExt;
    let path = bgp.peer_file.as_deref()?;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o077 != 0 && bgp.peers.iter().any(|p| p.password.is_some())).then_some((path, mode))
}

/// The signals the agent handles: every one whose default action would end the process
/// and that can be caught, so that none ends it half-applied (a VIP left on `lo`, the
/// program attached and answering with nobody to fence it). SIGKILL cannot be caught:
/// the data plane's deadline fences a killed agent.
struct Signals {
    /// Stop as SIGTERM does: SIGTERM, SIGINT (Ctrl-C), SIGHUP (the terminal of an agent
    /// run in the foreground closed, e.g. a dropped SSH session), SIGQUIT (`Ctrl-\`).
    stop: [(&'static str, Signal); 4],
    /// Logged and ignored: SIGUSR1, SIGUSR2 (no meaning here; their default would kill).
    ignored: [(&'static str, Signal); 2],
}

/// What [`Signals::next`] received.
enum Next {
    Stop(&'static str),
    Ignored(&'static str),
}

impl Signals {
    fn install() -> Result<Self, RunError> {
        let one = |kind: SignalKind, name: &'static str| {
            signal(kind).map(|s| (name, s)).map_err(|source| RunError::Signal { signal: name, source })
        };
        Ok(Self {
            stop: [
                one(SignalKind::terminate(), "SIGTERM")?,
                one(SignalKind::interrupt(), "SIGINT")?,
                one(SignalKind::hangup(), "SIGHUP")?,
                one(SignalKind::quit(), "SIGQUIT")?,
            ],
            ignored: [one(SignalKind::user_defined1(), "SIGUSR1")?, one(SignalKind::user_defined2(), "SIGUSR2")?],
        })
    }

    /// The next signal received.
    async fn next(&mut self) -> Next {
        let [(term, t), (int, i), (hup, h), (quit, q)] = &mut self.stop;
        let [(usr1, u1), (usr2, u2)] = &mut self.ignored;
        tokio::select! {
            _ = t.recv() => Next::Stop(term),
            _ = i.recv() => Next::Stop(int),
            _ = h.recv() => Next::Stop(hup),
            _ = q.recv() => Next::Stop(quit),
            _ = u1.recv() => Next::Ignored(usr1),
            _ = u2.recv() => Next::Ignored(usr2),
        }
    }
}

/// Runs the agent until SIGTERM, or another signal that stops it ([`Signals`]).
pub async fn run(cfg: RunConfig) -> Result<(), RunError> {
    let span = info_span!("run", interface = %cfg.interface);
    async move {
        // Nothing below touches the host until the data plane is opened.
        crate::caps::check(cfg.mode == Mode::Arp || cfg.forward != ForwardMode::Local)?;
        let mut signals = Signals::install()?;
        let dev = netdev::lookup(&cfg.interface)?;
        if cfg.mode == Mode::Bgp && dev.ipv4.is_none() {
            return Err(crate::announce::bgp::BgpError::NoNextHop.into());
        }
        let (probe, hash_seed) = probe_and_seed(&cfg)?;
        let metrics_listener = metrics::bind(cfg.metrics_addr)
            .await
            .map_err(|source| RunError::Metrics { addr: cfg.metrics_addr, source })?;
        let nl = Netlink::connect()?;
        let host = Host::new(nl.clone(), &cfg.interface, &cfg.vips, cfg.forward == ForwardMode::Ipip);
        host.preflight().await?;
        refuse_foreign_xdp(&nl, &dev, &cfg).await?;
        if let Some(bgp) = &cfg.bgp {
            for peer in &bgp.peers {
                if nl.has_address(peer.ip).await? {
                    return Err(crate::announce::bgp::BgpError::PeerIsThisNode { peer: peer.ip }.into());
                }
            }
            warn_off_link_peers(&nl, &dev, bgp).await;
            warn_readable_peer_file(bgp);
        }
        let host_events = netlink::watch_host(cfg.interface.clone())?;
        // Each API client with where it came from, to build it again after a 401.
        let source = |timeouts| apiclient::ClientSource {
            kubeconfig: cfg.kubeconfig.clone(),
            apiserver: cfg.apiserver.clone(),
            server_name: cfg.health.server_name.clone(),
            timeouts,
        };
        let lease_client = match (cfg.mode, cfg.election) {
            (Mode::Arp, Election::Kubernetes) => {
                let source = source(Timeouts::Bounded(cfg.lease.renew_deadline));
                Some((source.build().await?, source))
            }
            _ => None,
        };
        let watch_client = match cfg.discover {
            true => {
                let source = source(Timeouts::Watch(cfg.lease.renew_deadline));
                Some((source.build().await?, source))
            }
            false => None,
        };

        let (mut dp, adopted) = Dataplane::open_pinned(&cfg.pin_path)?;
        if let Some(log) = dp.take_log() {
            tokio::spawn(log.run());
        }
        let start = Start {
            dev,
            nl,
            dp,
            adopted,
            host,
            probe,
            hash_seed,
            lease_client,
            watch_client,
            metrics_listener,
            host_events,
        };
        let (mut node, mut inputs) = Node::start(cfg, start).await?;
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let signal = loop {
            tokio::select! {
                Some(report) = inputs.reports.recv() => {
                    // Every report already queued, then one table update for them all:
                    // with many backends, a rebuild per report would fall behind them.
                    let mut batch = vec![report];
                    while batch.len() < REPORT_BATCH {
                        match inputs.reports.try_recv() {
                            Ok(r) => batch.push(r),
                            Err(_) => break,
                        }
                    }
                    node.on_health_reports(batch);
                }
                Some(event) = inputs.host.recv() => node.on_host_event(event).await,
                Some(found) = recv(&mut inputs.discovered) => node.on_discovered(found).await,
                Some(event) = inputs.announce.recv() => node.on_announce_event(event),
                _ = tick.tick() => node.on_tick().await,
                signal = signals.next() => match signal {
                    Next::Stop(name) => break name,
                    Next::Ignored(name) => tracing::info!(signal = name, "ignored (it has no meaning here)"),
                },
            }
        };
        node.stop(signal).await;
        Ok(())
    }
    .instrument(span)
    .await
}

/// The most health reports handled before the table is updated once for them.
const REPORT_BATCH: usize = 1024;

/// Refuses an interface whose XDP hook holds a program this agent (or its predecessor,
/// through the pinned link) did not attach: replacing it would silently disable, say,
/// Cilium's XDP acceleration.
async fn refuse_foreign_xdp(nl: &Netlink, dev: &netdev::Netdev, cfg: &RunConfig) -> Result<(), RunError> {
    // At tcx the data plane shares the interface with whatever runs at XDP.
    if cfg.attach == crate::dataplane::Hook::Tcx {
        return Ok(());
    }
    let Some(id) = nl.xdp_program(dev.ifindex).await? else { return Ok(()) };
    if Dataplane::link_pin(&cfg.pin_path, &cfg.interface).exists() {
        return Ok(());
    }
    let (interface, pin_path) = (cfg.interface.clone(), cfg.pin_path.display().to_string());
    let name = crate::dataplane::program_name(id).unwrap_or_else(|| "?".into());
    // Ours, under other pins: detaching it (what the foreign case suggests) would cut
    // that agent's data plane off.
    if name == vip_common::program_names::VIP {
        return Err(RunError::OtherAgentXdp { interface, id, pin_path });
    }
    Err(RunError::ForeignXdp { interface, id, name, pin_path })
}

/// Receives from an optional channel (pending forever without one).
async fn recv<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;
    use crate::config::{BgpConfig, BgpPeerArg};

    /// The checks send the service-account token only where it is verified: not with
    /// `--health-insecure`, and not with a kubeconfig (its own credentials).
    #[test]
    fn the_token_goes_only_to_verified_checks() {
        let token = std::env::temp_dir().join(format!("vip-check-token-{}", std::process::id()));
        std::fs::write(&token, "t0ken").unwrap();
        let cfg = |extra: &[&str]| {
            let mut argv = vec!["vip-agent", "run", "--interface", "eth0", "--vip", "10.0.0.100", "--election", "none"];
            argv.extend(extra);
            let cli =
                crate::config::parse_args(argv.into_iter().map(std::ffi::OsString::from).collect(), &|_| None).unwrap();
            let crate::config::Command::Run(run) = cli.command else { panic!("not run") };
            RunConfig::try_from(*run).unwrap()
        };
        assert!(check_token(&cfg(&[]), &token).is_some(), "on a service account");
        assert!(check_token(&cfg(&["--health-insecure"]), &token).is_none(), "sent unverified");
        assert!(check_token(&cfg(&["--kubeconfig", "/etc/kubernetes/admin.conf"]), &token).is_none());
        std::fs::remove_file(&token).unwrap();
        assert!(check_token(&cfg(&[]), &token).is_none(), "no token file");
    }

    /// A peer file with a password that others may read is warned of; a root-only one,
    /// or one without passwords, is not.
    #[test]
    fn a_peer_file_others_may_read_is_found_when_it_holds_a_password() {
        let file = std::env::temp_dir().join(format!("vip-peer-file-test-{}", std::process::id()));
        std::fs::write(&file, "10.0.0.1:65001:s3cret\n").unwrap();
        let peer = |password: Option<&str>| BgpPeerArg {
            ip: [10, 0, 0, 1].into(),
            asn: 65001,
            password: password.map(str::to_owned),
        };
        let bgp = |password| BgpConfig {
            local_as: 65000,
            router_id: None,
            peers: vec![peer(password)],
            hold_time: std::time::Duration::from_secs(9),
            keepalive: None,
            peer_file: Some(file.clone()),
        };
        for (mode, password, found) in
            [(0o644, Some("s3cret"), true), (0o600, Some("s3cret"), false), (0o644, None, false)]
        {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode)).unwrap();
            assert_eq!(
                readable_peer_file(&bgp(password)).map(|(_, m)| m),
                found.then_some(mode),
                "{mode:o} {password:?}"
            );
        }
        std::fs::remove_file(&file).unwrap();
    }
}
