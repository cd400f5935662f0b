//! Backend health: an HTTPS `GET /readyz` (or a TCP connect) per backend, every
//! interval, with a timeout, and rise/fall hysteresis so one slow answer does not flap a
//! backend in and out of the table.
//!
//! The checker tasks only report raw results; [`Hysteresis`] (pure) turns them into
//! state changes, which the agent feeds into the Maglev table.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use crate::vipprobe::{Via, VipProbe6};
use rustls::{
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    pki_types::{pem::PemObject, CertificateDer, ServerName, UnixTime},
    ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::mpsc,
};
use tokio_rustls::TlsConnector;
use tracing::debug;
use vip_common::HealthReason;

/// A backend's health as the agent acts on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Health {
    /// No result yet.
    Unknown,
    Up,
    Down,
}

/// Rise/fall hysteresis. The first result decides at once (a fresh agent should not wait
/// `rise` intervals before serving); after that, `rise` consecutive successes bring a
/// down backend up and `fall` consecutive failures take an up backend down.
#[derive(Clone, Debug)]
pub struct Hysteresis {
    rise: u32,
    fall: u32,
    state: Health,
    streak: u32,
}

impl Hysteresis {
    pub fn new(rise: u32, fall: u32, initial: Health) -> Self {
        Self { rise: rise.max(1), fall: fall.max(1), state: initial, streak: 0 }
    }

    pub fn state(&self) -> Health {
        self.state
    }

    /// Records one result; returns the new state if it changed.
    pub fn observe(&mut self, ok: bool) -> Option<Health> {
        let next = match (self.state, ok) {
            (Health::Unknown, true) => Health::Up,
            (Health::Unknown, false) => Health::Down,
            (Health::Up, true) | (Health::Down, false) => {
                self.streak = 0;
                return None;
            }
            (Health::Up, false) => {
                self.streak += 1;
                if self.streak < self.fall {
                    return None;
                }
                Health::Down
            }
            (Health::Down, true) => {
                self.streak += 1;
                if self.streak < self.rise {
                    return None;
                }
                Health::Up
            }
        };
        self.streak = 0;
        self.state = next;
        Some(next)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading CA file {path}")]
    ReadCa {
        path: String,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("CA file {path} holds no usable certificate")]
    EmptyCa { path: String },
    #[error("kubeconfig {path}: {why}")]
    Kubeconfig { path: String, why: String },
    #[error(
        "HTTPS health checks need a CA to verify the apiservers: give --health-ca, --kubeconfig, \
         or (not recommended) --health-insecure"
    )]
    NoCa,
    #[error("building the TLS client")]
    Rustls(#[from] rustls::Error),
    #[error("--health-server-name {name:?}: not a DNS name or IP address")]
    ServerName { name: String },
}

/// Where the CA comes from.
pub enum CaSource<'a> {
    PemFile(&'a Path),
    PemBytes { origin: String, pem: Vec<u8> },
    Insecure,
}

/// The TLS client configuration of the HTTPS checks.
pub fn tls_config(ca: CaSource<'_>) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone()).with_safe_default_protocol_versions()?;
    let config = match ca {
        CaSource::Insecure => {
            builder.dangerous().with_custom_certificate_verifier(Arc::new(NoVerify(provider))).with_no_client_auth()
        }
        CaSource::PemFile(path) => {
            let shown = path.display().to_string();
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                .map_err(|source| TlsError::ReadCa { path: shown.clone(), source })?;
            builder.with_root_certificates(roots(certs, &shown)?).with_no_client_auth()
        }
        CaSource::PemBytes { origin, pem } => {
            let certs = CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|source| TlsError::ReadCa { path: origin.clone(), source })?;
            builder.with_root_certificates(roots(certs, &origin)?).with_no_client_auth()
        }
    };
    Ok(Arc::new(config))
}

/// SHA-256 of the first certificate (DER) of the CA: the same on every node whatever
/// file or kubeconfig it came from. `None` for [`CaSource::Insecure`] or an unreadable CA.
pub fn ca_fingerprint(ca: &CaSource<'_>) -> Option<[u8; 32]> {
    let first = match ca {
        CaSource::Insecure => return None,
        CaSource::PemFile(path) => CertificateDer::pem_file_iter(path).ok()?.next()?.ok()?,
        CaSource::PemBytes { pem, .. } => CertificateDer::pem_slice_iter(pem).next()?.ok()?,
    };
    ring::digest::digest(&ring::digest::SHA256, first.as_ref()).as_ref().try_into().ok()
}

fn roots(certs: Vec<CertificateDer<'static>>, origin: &str) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    let (added, _) = store.add_parsable_certificates(certs);
    if added == 0 {
        return Err(TlsError::EmptyCa { path: origin.to_owned() });
    }
    Ok(store)
}

/// Accepts any certificate: `--health-insecure`. Signatures are still checked so the
/// handshake is a real one.
#[derive(Debug)]
struct NoVerify(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// What a check does.
#[derive(Clone)]
pub enum Probe {
    /// `GET path` over TLS, the certificate verified for `server_name` (by default
    /// `kubernetes.default.svc`, which every kube-apiserver certificate lists), with
    /// `token` as bearer when there is one.
    Https {
        path: String,
        tls: Arc<ClientConfig>,
        server_name: ServerName<'static>,
        token: Option<Arc<TokenFile>>,
    },
    Tcp,
}

/// A bearer token read from a file (a pod's service-account token), read again every
/// [`TokenFile::REREAD`]: the kubelet rotates projected tokens in place. The checks
/// send it because K3s runs its apiserver with `--anonymous-auth=false`, where an
/// anonymous `/readyz` is 401 and no node would ever be ready; any authenticated user
/// may read `/readyz` (`system:public-info-viewer`). Sent only to apiservers of the
/// cluster, verified by its CA.
pub struct TokenFile {
    path: std::path::PathBuf,
    cached: std::sync::Mutex<Option<(std::time::Instant, String)>>,
}

impl TokenFile {
    /// How long a read token is used before the file is read again: well inside the
    /// kubelet's refresh (at 80 % of a token's lifetime, an hour at the least).
    pub const REREAD: Duration = Duration::from_secs(60);

    pub fn new(path: &std::path::Path) -> Self {
        Self { path: path.to_owned(), cached: std::sync::Mutex::new(None) }
    }

    /// The token, `None` if the file cannot be read (the check goes anonymous).
    pub fn get(&self) -> Option<String> {
        let mut cached = self.cached.lock().ok()?;
        if let Some((_, token)) = cached.as_ref().filter(|(at, _)| at.elapsed() < Self::REREAD) {
            return Some(token.clone());
        }
        let token = std::fs::read_to_string(&self.path).ok()?.trim().to_owned();
        *cached = Some((std::time::Instant::now(), token.clone()));
        Some(token)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("TLS: {0}")]
    Tls(std::io::Error),
    #[error("HTTP: {0}")]
    Io(std::io::Error),
    #[error("HTTP status {0}{hint}", hint = status_hint(*.0))]
    Status(u16),
    #[error("malformed HTTP response")]
    Malformed,
    #[error("apiserver ready but VIP traffic not accepted: {why}")]
    VipPath {
        why: String,
        /// Refused (its node is leaving: the refusal's mark), rather than unanswered or
        /// reset by its host (nothing listens on VIP:port there).
        refused: bool,
    },
    /// The first VIP's path is accepted, another VIP's is not (see [`judge`]).
    #[error("apiserver ready but traffic for VIP {vip} not accepted: {why}")]
    VipMissing { vip: IpAddr, why: String },
}

impl CheckError {
    /// The reason `status` and the metrics show for a backend that failed this way.
    pub fn reason(&self) -> HealthReason {
        match self {
            CheckError::Timeout(_) => HealthReason::Timeout,
            CheckError::Connect(_) | CheckError::Io(_) => HealthReason::Connect,
            CheckError::Tls(_) => HealthReason::Tls,
            CheckError::Status(_) => HealthReason::NotReady,
            CheckError::Malformed => HealthReason::Protocol,
            CheckError::VipPath { .. } | CheckError::VipMissing { .. } => HealthReason::VipPath,
        }
    }
}

/// What a status says beyond its number: 401 is an apiserver refusing anonymous checks.
fn status_hint(status: u16) -> &'static str {
    match status {
        401 => {
            " (the apiserver refuses anonymous checks, as K3s's does: run with a service account and without \
             --health-insecure, which sends no credentials, or with --health-check tcp)"
        }
        _ => "",
    }
}

/// One check of `addr`, bounded by `timeout`.
pub async fn check(probe: &Probe, addr: SocketAddr, timeout: Duration) -> Result<(), CheckError> {
    tokio::time::timeout(timeout, check_inner(probe, addr)).await.map_err(|_| CheckError::Timeout(timeout))?
}

async fn check_inner(probe: &Probe, addr: SocketAddr) -> Result<(), CheckError> {
    let tcp = TcpStream::connect(addr).await.map_err(CheckError::Connect)?;
    let (path, tls, name, token) = match probe {
        Probe::Tcp => return Ok(()),
        Probe::Https { path, tls, server_name, token } => (path, tls, server_name.clone(), token),
    };
    let _ = tcp.set_nodelay(true);
    let mut stream = TlsConnector::from(tls.clone()).connect(name, tcp).await.map_err(CheckError::Tls)?;
    let authorization =
        token.as_ref().and_then(|t| t.get()).map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: vip-agent\r\nAccept: */*\r\n{authorization}Connection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.map_err(CheckError::Io)?;
    // The status line is all we need; apiservers answer /readyz in one small segment.
    let mut buf = [0u8; 512];
    let mut len = 0;
    while len < buf.len() {
        let n = stream.read(&mut buf[len..]).await.map_err(CheckError::Io)?;
        if n == 0 || buf[..len + n].contains(&b'\n') {
            len += n;
            break;
        }
        len += n;
    }
    let line = std::str::from_utf8(&buf[..len]).ok().and_then(|t| t.lines().next()).ok_or(CheckError::Malformed)?;
    let status: u16 = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).ok_or(CheckError::Malformed)?;
    if status == 200 {
        Ok(())
    } else {
        Err(CheckError::Status(status))
    }
}

/// One check's outcome, as the checker tasks report it.
#[derive(Debug)]
pub struct Report {
    /// Key of the backend in the agent's list.
    pub backend: usize,
    pub result: Result<(), CheckError>,
    pub latency: Duration,
    /// The backend's MAC, for DSR backends, when the neighbour table has it.
    pub mac: Option<[u8; 6]>,
    /// The next hop towards the backend, for IPIP backends, when resolved.
    pub nexthop: Option<crate::netlink::Nexthop>,
}

/// For a DSR backend that is not this node: check, after the apiserver answered, that
/// it also accepts VIP traffic (see [`crate::vipprobe`]), resolving its MAC first.
#[derive(Clone)]
pub struct DsrCheck {
    pub netlink: crate::netlink::Netlink,
    pub ifindex: u32,
    /// The first IPv4 VIP's probe (`None`: IPv6 VIPs only).
    pub probe: Option<crate::vipprobe::VipProbe>,
    /// The other IPv4 VIPs, probed with `probe`'s (see [`judge`]).
    pub other_vips: Vec<Ipv4Addr>,
    /// The IPv6 VIPs, probed at the same time from this node's IPv6 address on the
    /// interface ([`Source6`]; without one, not probed: this node could not tell a
    /// backend's fault from its own).
    pub vips6: Vec<Ipv6Addr>,
    /// This node's MAC, and the VIPs' port, for the IPv6 probe.
    pub src_mac: [u8; 6],
    pub port: u16,
    /// Shared by every checker.
    pub source6: Arc<Source6>,
    /// `--fall`: unanswered IPv6 rounds in a row before they count ([`ipv6_silence_counts`]).
    pub fall: u32,
}

impl DsrCheck {
    /// Lets the IPv6 VIPs' unanswered probes of this round count only when this node's
    /// own IPv6 path is proven, from the `fall`-th round in a row ([`ipv6_silence_counts`]):
    /// a backend answered one of this node's IPv6 probes within `window` (an interval and
    /// a timeout: every backend is probed that often) and the source `src` is still this
    /// node's address (read again). Otherwise they read as answered. Without this, a
    /// fault of this node's own IPv6 (its address removed, a route) drained every backend
    /// for both families. `rounds`: the checker's count, updated.
    /// Returns whether it let the first VIP's silence pass (IPv6 VIPs only): then this
    /// round says nothing of the backend.
    async fn gate_ipv6(&self, probed: &mut [Probed], src: Ipv6Addr, rounds: &mut u32, window: Duration) -> bool {
        if probed.iter().any(|p| p.vip.is_ipv6() && p.answered) {
            self.source6.note_answer();
        }
        let unanswered = probed.iter().any(|p| p.vip.is_ipv6() && !p.answered);
        let proven = unanswered
            && self.source6.answered_within(window)
            && self.source6.get(&self.netlink, self.ifindex, Source6::MAX_AGE_AFTER_SILENCE).await == Some(src);
        if ipv6_silence_counts(unanswered, proven, rounds, self.fall) {
            return false;
        }
        for p in probed.iter_mut().filter(|p| p.vip.is_ipv6() && !p.answered) {
            p.outcome = Ok(());
        }
        probed.first().is_some_and(|p| p.vip.is_ipv6() && !p.answered)
    }

    /// The VIP-path check of backend `ip` (after its apiserver answered), within `left`:
    /// its MAC first (`mac`, kept between checks; unknown: no probe, the apiserver's answer
    /// stands), then
    /// every VIP's probe, IPv6 ones gated ([`DsrCheck::gate_ipv6`]: `rounds`, `window`).
    /// `None`: this round says nothing of the backend (its first VIP is IPv6 and went
    /// unanswered uncounted), rather than that it accepts VIP traffic: read as accepted,
    /// the backend's state (a leaving node draining, a node down) would be reset.
    async fn check_paths(
        &self,
        ip: Ipv4Addr,
        mac: &mut Option<[u8; 6]>,
        rounds: &mut u32,
        left: Duration,
        window: Duration,
    ) -> Option<Result<(), CheckError>> {
        if mac.is_none() {
            *mac = self.netlink.neighbour_mac(self.ifindex, ip).await.ok().flatten();
        }
        let Some(m) = *mac else { return Some(Ok(())) };
        let src6 = if self.vips6.is_empty() {
            None
        } else {
            self.source6.get(&self.netlink, self.ifindex, Source6::MAX_AGE).await
        };
        let v6 = src6.map(|src_ip| {
            let p = VipProbe6 { ifindex: self.ifindex, src_mac: self.src_mac, src_ip, port: self.port };
            (p, self.vips6.clone())
        });
        let mut probed = probe_paths(self.probe, &self.other_vips, v6, ip, Via::Dsr { mac: m }, left).await;
        if let Some(src) = src6 {
            if self.gate_ipv6(&mut probed, src, rounds, window).await {
                return None;
            }
        }
        Some(judge(probed))
    }
}

/// For the backend that is this node, when it serves IPv6 VIPs: its apiserver answers
/// their clients from this node, which needs its IPv6 address on the interface (the
/// connected route back to them). A node that had one and lost it (a network manager, a
/// link flap with `keep_addr_on_down=0`) drains its own backend, as the other nodes drain
/// it by their probes; one that never had one is not judged (its clients may be routed).
#[derive(Clone)]
pub struct Local6Check {
    pub netlink: crate::netlink::Netlink,
    pub ifindex: u32,
    /// The first IPv6 VIP, named in the failure.
    pub vip: Ipv6Addr,
    pub source6: Arc<Source6>,
}

impl Local6Check {
    /// `had`: this node has had an IPv6 address on the interface (kept between checks).
    async fn check(&self, had: &mut bool) -> Result<(), CheckError> {
        if self.source6.get(&self.netlink, self.ifindex, Source6::MAX_AGE).await.is_some() {
            *had = true;
            return Ok(());
        }
        if !*had {
            return Ok(());
        }
        let why =
            "this node's IPv6 address on the interface is gone: its apiserver cannot answer the IPv6 VIPs' clients";
        Err(CheckError::VipMissing { vip: IpAddr::V6(self.vip), why: why.to_owned() })
    }
}

/// This node's IPv6 address on the interface, the IPv6 probes' source
/// ([`crate::netlink::Netlink::probe_source6`]), shared by every checker: read again once
/// older than [`Source6::MAX_AGE`] (one address dump a second at most, however many
/// backends are checked; an address that goes or comes is seen within a second), by one
/// checker at a time while the others use the last read. And when a backend last answered
/// one of this node's IPv6 probes: what proves this node's own IPv6 path (see
/// [`DsrCheck::gate_ipv6`]).
#[derive(Default)]
pub struct Source6 {
    /// The address (`None`: none) and when it was read.
    read: std::sync::Mutex<Option<(Option<Ipv6Addr>, Instant)>>,
    /// A checker is reading it.
    refreshing: std::sync::atomic::AtomicBool,
    /// When a backend last answered an IPv6 probe (a SYN-ACK, a refusal, its host's reset).
    answered: std::sync::Mutex<Option<Instant>>,
}

/// Clears [`Source6::refreshing`] when the read ends, however it ends (a checker aborted
/// mid-read included).
struct Refreshing<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for Refreshing<'_> {
    fn drop(&mut self) {
        self.0.store(false, std::sync::atomic::Ordering::Release);
    }
}

impl Source6 {
    pub const MAX_AGE: Duration = Duration::from_secs(1);
    /// How old a read may be when an IPv6 probe went unanswered: the address may have
    /// just gone.
    pub const MAX_AGE_AFTER_SILENCE: Duration = Duration::from_millis(100);

    /// The address, read again if older than `max_age` unless another checker is reading
    /// it (then the last read). A failed read keeps the last address.
    pub async fn get(&self, netlink: &crate::netlink::Netlink, ifindex: u32, max_age: Duration) -> Option<Ipv6Addr> {
        let last = *self.read.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        match last {
            Some((addr, at)) if at.elapsed() < max_age => return addr,
            _ => {}
        }
        if self.refreshing.swap(true, std::sync::atomic::Ordering::Acquire) {
            return last.and_then(|(addr, _)| addr);
        }
        let _reading = Refreshing(&self.refreshing);
        let addr = match netlink.probe_source6(ifindex).await {
            Ok(addr) => addr,
            Err(_) => last.and_then(|(addr, _)| addr),
        };
        *self.read.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some((addr, Instant::now()));
        addr
    }

    /// A backend answered an IPv6 probe now.
    fn note_answer(&self) {
        *self.answered.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Instant::now());
    }

    /// Whether a backend answered an IPv6 probe within `window`.
    fn answered_within(&self, window: Duration) -> bool {
        self.answered.lock().unwrap_or_else(std::sync::PoisonError::into_inner).is_some_and(|t| t.elapsed() < window)
    }
}

/// One VIP's probe result, as [`judge`] reads it.
#[derive(Debug)]
struct Probed {
    vip: IpAddr,
    outcome: Result<(), String>,
    /// Refused by a leaving node's data plane.
    refused: bool,
    /// Something answered (a SYN-ACK, a refusal, the host's reset), rather than nothing
    /// or a probe that could not be sent.
    answered: bool,
}

/// Whether this node's unanswered IPv6 probes of one backend count against it:
/// `unanswered`, some IPv6 VIP went unanswered this round; `proven`, this node's own
/// IPv6 path is known to work (see [`DsrCheck::gate_ipv6`]); `rounds`, the counted
/// unanswered rounds in a row before this one (updated); `fall`, `--fall`. They count
/// from the `fall`-th such round in a row: where the IPv4 probe rides on the address the
/// apiserver check has just proven, the IPv6 one has a path of its own, which a fault on
/// this node's side breaks for every backend at once.
fn ipv6_silence_counts(unanswered: bool, proven: bool, rounds: &mut u32, fall: u32) -> bool {
    if !unanswered || !proven {
        *rounds = 0;
        return false;
    }
    *rounds += 1;
    *rounds >= fall.max(1)
}

/// What a checker does beyond asking the apiserver, by how the backend is reached.
#[derive(Clone)]
pub enum PathCheck {
    /// DSR to another node: the VIP-path probe.
    Dsr(DsrCheck),
    /// This node, serving IPv6 VIPs: its own IPv6 address.
    Local6(Local6Check),
    /// IPIP: resolve the next hop towards the backend after every successful check, so
    /// the data plane's copy follows route and neighbour changes within one interval;
    /// then, with a next hop known, the VIP-path probe through it, encapsulated (`probe`:
    /// `None` without an IPv4 address or VIP to probe from).
    Ipip {
        netlink: crate::netlink::Netlink,
        ifindex: u32,
        probe: Option<crate::vipprobe::VipProbe>,
        /// As [`DsrCheck::other_vips`].
        other_vips: Vec<Ipv4Addr>,
    },
}

/// Checks backend `backend` at `addr` every `interval` until the receiver goes away.
pub async fn run_checker(
    backend: usize,
    addr: SocketAddr,
    probe: Probe,
    interval: Duration,
    timeout: Duration,
    path: Option<PathCheck>,
    tx: mpsc::Sender<Report>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The backend's MAC, read from the neighbour table when unknown or after a VIP-path
    // probe to it failed (it may have changed), not on every check.
    let mut mac = None;
    // Unanswered IPv6 rounds in a row (see `DsrCheck::gate_ipv6`); whether this node has
    // had an IPv6 address (`Local6Check`); whether a report went out yet.
    let (mut ipv6_rounds, mut had6, mut reported) = (0, false, false);
    loop {
        ticker.tick().await;
        let start = Instant::now();
        let mut result = check(&probe, addr, timeout).await;
        let mut nexthop = None;
        if let (Ok(()), Some(path), std::net::IpAddr::V4(ip)) = (&result, &path, addr.ip()) {
            match path {
                PathCheck::Dsr(dsr) => {
                    let left = timeout.saturating_sub(start.elapsed()).max(Duration::from_millis(50));
                    match dsr.check_paths(ip, &mut mac, &mut ipv6_rounds, left, interval + timeout).await {
                        Some(r) => result = r,
                        // A round that says nothing: no report, but for the first
                        // (trusted, as without a probe).
                        None if reported => continue,
                        None => {}
                    }
                }
                PathCheck::Local6(local) => result = local.check(&mut had6).await,
                PathCheck::Ipip { netlink, ifindex, probe, other_vips: others } => {
                    nexthop = netlink.nexthop(*ifindex, ip).await.ok().flatten();
                    if let (Some(p), Some(hop)) = (probe, nexthop) {
                        let left = timeout.saturating_sub(start.elapsed()).max(Duration::from_millis(50));
                        let via = Via::Ipip { nexthop_mac: hop.mac };
                        result = judge(probe_paths(Some(*p), others, None, ip, via, left).await);
                    }
                }
            }
        }
        let latency = start.elapsed();
        if let Err(error) = &result {
            debug!(%addr, %error, "health check failed");
        }
        // After a failed VIP-path probe, look the MAC up again next time.
        let forget_mac = matches!(result, Err(CheckError::VipPath { .. }));
        if tx.send(Report { backend, result, latency, mac, nexthop }).await.is_err() {
            return;
        }
        reported = true;
        if forget_mac {
            mac = None;
        }
    }
}

/// The VIP-path probes of a backend on another node, for the first IPv4 VIP
/// (`probe.vip`), each of `others`, and each IPv6 VIP of `v6` (by DSR: IPIP carries none)
/// at once, within `left`, off the runtime (they block on raw sockets): each VIP's result,
/// the IPv4 VIPs' first, for [`judge`].
async fn probe_paths(
    probe: Option<crate::vipprobe::VipProbe>,
    others: &[Ipv4Addr],
    v6: Option<(VipProbe6, Vec<Ipv6Addr>)>,
    ip: Ipv4Addr,
    via: Via,
    left: Duration,
) -> Vec<Probed> {
    use crate::vipprobe::{probe as probe4, probe6, VipProbeError};
    type Outcome = Result<Vec<Result<(), VipProbeError>>, String>;
    let joined = |r: Result<Result<_, VipProbeError>, tokio::task::JoinError>| -> Outcome {
        r.map_err(|e| e.to_string()).and_then(|r| r.map_err(|e| e.to_string()))
    };
    // Each family's VIPs in probe order, and their probe, started before either is awaited.
    let v4 = probe.map(|p| {
        let vips: Vec<IpAddr> = std::iter::once(p.vip).chain(others.iter().copied()).map(IpAddr::V4).collect();
        let others = others.to_vec();
        (vips, tokio::task::spawn_blocking(move || probe4(&p, &others, ip, via, left)))
    });
    let v6 = match (v6, via) {
        (Some((p6, vips)), Via::Dsr { mac }) if !vips.is_empty() => {
            let list = vips.iter().copied().map(IpAddr::V6).collect();
            Some((list, tokio::task::spawn_blocking(move || probe6(&p6, &vips, ip, mac, left))))
        }
        _ => None,
    };
    let mut probed = Vec::new();
    for (vips, task) in v4.into_iter().chain(v6) {
        match joined(task.await) {
            Ok(outcome) => probed.extend(vips.into_iter().zip(outcome).map(|(vip, r)| {
                let refused = matches!(r, Err(VipProbeError::Refused { .. }));
                let answered = !matches!(r, Err(VipProbeError::NoAnswer { .. } | VipProbeError::Socket(_)));
                Probed { vip, outcome: r.map_err(|e| e.to_string()), refused, answered }
            })),
            // The probe itself failed (its socket): every VIP of the family unproven.
            Err(why) => probed.extend(vips.into_iter().map(|vip| Probed {
                vip,
                outcome: Err(why.clone()),
                refused: false,
                answered: false,
            })),
        }
    }
    probed
}

/// The check's result from its VIPs' probes ([`probe_paths`]): the first VIP's failure
/// (the first IPv4 VIP's; without one, the first IPv6 VIP's) is [`CheckError::VipPath`]
/// (refused: its node is leaving). A node that accepts the first and lacks another (a
/// rolling change of the VIP list that reached this node first; an IPv6 address its
/// network manager removed, so it cannot answer the IPv6 VIPs' clients) would get that
/// VIP's flows and drop them: it drains, as for its first VIP, but its silence there says
/// nothing of its leaving ([`CheckError::VipMissing`]).
fn judge(probed: Vec<Probed>) -> Result<(), CheckError> {
    let mut probed = probed.into_iter();
    if let Some(Probed { outcome: Err(why), refused, .. }) = probed.next() {
        return Err(CheckError::VipPath { why, refused });
    }
    match probed.find_map(|p| p.outcome.err().map(|why| (p.vip, why))) {
        Some((vip, why)) => Err(CheckError::VipMissing { vip, why }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(h: &mut Hysteresis, results: &[bool]) -> Vec<Option<Health>> {
        results.iter().map(|&ok| h.observe(ok)).collect()
    }

    #[test]
    fn first_result_decides_at_once() {
        assert_eq!(Hysteresis::new(2, 3, Health::Unknown).observe(true), Some(Health::Up));
        assert_eq!(Hysteresis::new(2, 3, Health::Unknown).observe(false), Some(Health::Down));
    }

    #[test]
    fn up_needs_fall_consecutive_failures_to_go_down() {
        let mut h = Hysteresis::new(2, 3, Health::Up);
        assert_eq!(run(&mut h, &[false, false, true, false, false]), [None, None, None, None, None]);
        assert_eq!(h.observe(false), Some(Health::Down));
    }

    #[test]
    fn down_needs_rise_consecutive_successes_to_come_back() {
        let mut h = Hysteresis::new(2, 3, Health::Down);
        assert_eq!(run(&mut h, &[true, false, true]), [None, None, None]);
        assert_eq!(h.observe(true), Some(Health::Up));
        assert_eq!(h.state(), Health::Up);
    }

    #[test]
    fn rise_and_fall_of_one_follow_every_result() {
        let mut h = Hysteresis::new(1, 1, Health::Up);
        assert_eq!(
            run(&mut h, &[false, true, true, false]),
            [Some(Health::Down), Some(Health::Up), None, Some(Health::Down)]
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn tcp_probe_sees_a_listener_and_its_absence() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        check(&Probe::Tcp, addr, Duration::from_secs(1)).await.unwrap();
        drop(listener);
        assert!(matches!(check(&Probe::Tcp, addr, Duration::from_secs(1)).await, Err(CheckError::Connect(_))));
    }

    /// Unanswered IPv6 probes count against a backend only while this node's own IPv6
    /// path is proven, from the `fall`-th round in a row; an answered round, or one this
    /// node cannot vouch for, starts the count again.
    #[test]
    fn unanswered_ipv6_probes_count_only_proven_and_from_the_fall_th_round() {
        let mut rounds = 0;
        let counts = |rounds: &mut u32, unanswered, proven| ipv6_silence_counts(unanswered, proven, rounds, 3);
        assert_eq!([counts(&mut rounds, true, true), counts(&mut rounds, true, true)], [false, false]);
        assert!(counts(&mut rounds, true, true), "the third round in a row counts");
        assert!(counts(&mut rounds, true, true), "and the next");
        assert!(!counts(&mut rounds, true, false), "not proven: not counted");
        assert_eq!(rounds, 0, "and the count starts again");
        assert!(!counts(&mut rounds, true, true));
        assert!(!counts(&mut rounds, false, true), "answered");
        assert_eq!(rounds, 0);
        assert!(ipv6_silence_counts(true, true, &mut 0, 1), "--fall 1: at once");
    }

    /// The first VIP's failure is the check's (refused or not); another VIP's makes the
    /// backend miss that VIP; none: the path is accepted.
    #[test]
    fn the_first_vips_failure_decides_and_another_is_a_missing_vip() {
        let p = |vip: &str, outcome: Result<(), &str>, refused| Probed {
            vip: vip.parse().unwrap(),
            outcome: outcome.map_err(str::to_owned),
            refused,
            answered: true,
        };
        let first = judge(vec![p("10.0.0.100", Err("refused"), true), p("fd00::100", Err("x"), false)]);
        assert!(matches!(first, Err(CheckError::VipPath { refused: true, .. })), "{first:?}");
        let other = judge(vec![p("10.0.0.100", Ok(()), false), p("fd00::100", Err("no SYN-ACK"), false)]);
        let vip: IpAddr = "fd00::100".parse().unwrap();
        assert!(matches!(other, Err(CheckError::VipMissing { vip: v, .. }) if v == vip), "{other:?}");
        assert!(judge(vec![p("10.0.0.100", Ok(()), false), p("fd00::100", Ok(()), false)]).is_ok());
        assert!(judge(Vec::new()).is_ok(), "nothing probed");
    }

    #[test]
    fn a_missing_ca_file_is_named() {
        let err = tls_config(CaSource::PemFile(Path::new("/nonexistent/ca.pem"))).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
    }
}
