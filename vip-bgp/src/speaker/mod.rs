//! The speaker: one tokio task per peer, each driving its own [`Session`], all
//! advertising the same set of prefixes, behind a [`SpeakerHandle`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), vip_bgp::speaker::StartError> {
//! use std::{net::Ipv4Addr, time::Duration};
//! use vip_bgp::speaker::{PeerConfig, Speaker, SpeakerConfig};
//!
//! let node = Ipv4Addr::new(10, 201, 0, 2);
//! let peer = PeerConfig::new(Ipv4Addr::new(10, 201, 0, 1), 65001, 65000, node, node);
//! let speaker = Speaker::start(SpeakerConfig::new(vec![peer]))?;
//! speaker.set_advertised(["192.0.2.10/32".parse().unwrap()]);
//! // ... on SIGTERM:
//! speaker.shutdown(Duration::from_secs(2)).await;
//! # Ok(()) }
//! ```
//!
//! Sockets are created by the peer tasks, so they live in the network namespace of the
//! thread running the runtime the speaker was started on.

mod config;
mod peer;
mod socket;
mod status;

use std::{
    collections::BTreeSet,
    net::SocketAddrV4,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use ipnet::Ipv4Net;
use tokio::{net::TcpStream, sync::watch, task::JoinHandle, time::Instant};
use tracing::{info_span, warn, Instrument};

use crate::codec::ShutdownCommunication;
use crate::session::Session;

pub use config::{
    ConfigError, PeerConfig, SpeakerConfig, BGP_PORT, DEFAULT_CONNECT_TIMEOUT, DEFAULT_HOLD_TIME,
    DEFAULT_SHUTDOWN_COMMUNICATION, TCP_MD5_MAX_KEY_LEN,
};
pub use peer::Connector;
pub use socket::ConnectError;
pub use status::PeerStatus;

use peer::{PeerTask, ShutdownRequest};
use status::PeerSnapshot;

/// Why the speaker did not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// [`Speaker::start`] spawns tasks and must be called from within a tokio runtime.
    #[error("the BGP speaker must be started from within a tokio runtime")]
    NoRuntime,
}

/// Starts speakers.
pub struct Speaker;

impl Speaker {
    /// Validates `config` and spawns one task per peer on the current tokio runtime
    /// (current-thread is fine); each starts connecting at once and advertises nothing
    /// until [`SpeakerHandle::set_advertised`] says otherwise.
    pub fn start(config: SpeakerConfig) -> Result<SpeakerHandle, StartError> {
        Self::start_with(config, TcpConnector::new)
    }

    /// [`Speaker::start`] with another way of opening connections (tests).
    pub fn start_with<C: Connector>(
        config: SpeakerConfig,
        connector: impl Fn(&PeerConfig) -> C,
    ) -> Result<SpeakerHandle, StartError> {
        let sessions = config.session_configs()?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| StartError::NoRuntime)?;
        let (routes, _) = watch::channel(BTreeSet::new());
        let (shutdown, _) = watch::channel(None);
        let communication = ShutdownCommunication::new(&config.shutdown_communication);
        let peers = config
            .peers
            .iter()
            .zip(sessions)
            .map(|(peer, session)| {
                let (status_tx, status) = watch::channel(PeerSnapshot::new(peer.address, peer.remote_as));
                let session = Session::new(session, jitter_seed(peer));
                let task = PeerTask::new(connector(peer), session, routes.subscribe(), shutdown.subscribe(), status_tx);
                let span = info_span!("bgp_peer", peer = %peer.address, remote_as = peer.remote_as);
                PeerHandle { status, task: runtime.spawn(task.run().instrument(span)) }
            })
            .collect();
        Ok(SpeakerHandle { routes, shutdown, communication, peers })
    }
}

/// Distinct per peer, node and start, so that nodes restarted together spread their
/// retries.
fn jitter_seed(peer: &PeerConfig) -> u64 {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    nanos
        ^ (u64::from(u32::from(peer.address)) << 32)
        ^ u64::from(u32::from(peer.router_id))
        ^ u64::from(std::process::id())
}

/// Reads every peer's status as the peer tasks last published it (see
/// [`SpeakerHandle::status_reader`]); cheap to clone and to read.
#[derive(Clone, Debug)]
pub struct StatusReader(Vec<watch::Receiver<PeerSnapshot>>);

impl StatusReader {
    /// Every peer, in configuration order, as now.
    pub fn status(&self) -> Vec<PeerStatus> {
        let now = Instant::now();
        self.0.iter().map(|p| p.borrow().at(now)).collect()
    }
}

struct PeerHandle {
    status: watch::Receiver<PeerSnapshot>,
    task: JoinHandle<()>,
}

/// Controls a running speaker. Dropping it makes every peer leave at once (Cease sent,
/// no waiting for the routers to close); prefer [`SpeakerHandle::shutdown`].
pub struct SpeakerHandle {
    routes: watch::Sender<BTreeSet<Ipv4Net>>,
    shutdown: watch::Sender<Option<ShutdownRequest>>,
    communication: ShutdownCommunication,
    peers: Vec<PeerHandle>,
}

impl SpeakerHandle {
    /// The prefixes to advertise to every peer (host bits cleared, duplicates ignored).
    /// Established sessions get UPDATEs for the difference at once (withdrawals, then
    /// announcements); sessions established later get the whole set. Setting the same
    /// set again sends nothing; an empty set withdraws everything.
    pub fn set_advertised(&self, prefixes: impl IntoIterator<Item = Ipv4Net>) {
        let prefixes: BTreeSet<Ipv4Net> = prefixes.into_iter().map(|p| p.trunc()).collect();
        self.routes.send_if_modified(|current| {
            let changed = *current != prefixes;
            *current = prefixes;
            changed
        });
    }

    /// Every peer, in configuration order.
    pub fn status(&self) -> Vec<PeerStatus> {
        self.status_reader().status()
    }

    /// A reader of every peer's status, for code that does not own the handle (a status
    /// endpoint): it reads the sessions as they are when asked.
    pub fn status_reader(&self) -> StatusReader {
        StatusReader(self.peers.iter().map(|p| p.status.clone()).collect())
    }

    /// Leaves every peer gracefully, all at once: withdraws our prefixes, sends Cease /
    /// Administrative Shutdown (6/2) with the configured communication, half-closes and
    /// reads until the router closes or `timeout` passes. Tasks still running after
    /// `timeout` (plus a small margin) are aborted.
    pub async fn shutdown(mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let request = ShutdownRequest { deadline, communication: self.communication.clone() };
        self.shutdown.send_replace(Some(request));
        // Margin for the tasks to notice the deadline and finish.
        let abort_at = deadline + Duration::from_millis(100);
        for peer in &mut self.peers {
            if tokio::time::timeout_at(abort_at, &mut peer.task).await.is_err() {
                warn!("BGP peer task did not stop in time; aborting it");
                peer.task.abort();
            }
        }
    }
}

/// Opens real TCP connections, with TCP-MD5 and `TCP_USER_TIMEOUT` = hold time.
#[derive(Clone, Debug)]
pub struct TcpConnector {
    peer: SocketAddrV4,
    password: Option<String>,
    user_timeout: Duration,
}

impl TcpConnector {
    pub fn new(config: &PeerConfig) -> Self {
        Self {
            peer: SocketAddrV4::new(config.address, config.port),
            password: config.password.clone(),
            user_timeout: config.hold_time,
        }
    }
}

impl Connector for TcpConnector {
    type Stream = TcpStream;

    fn connect(&self) -> impl std::future::Future<Output = Result<TcpStream, String>> + Send + 'static {
        let this = self.clone();
        async move {
            socket::connect(this.peer, this.password.as_deref(), this.user_timeout).await.map_err(|e| e.to_string())
        }
    }
}

#[cfg(test)]
mod tests;
