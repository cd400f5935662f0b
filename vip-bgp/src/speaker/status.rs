//! What the speaker reports about each peer, for `vip-agent status`, metrics and logs.

use std::{net::Ipv4Addr, time::Duration};

use ipnet::Ipv4Net;
use tokio::time::Instant;

use crate::session::State;

/// One peer as seen at the moment [`super::SpeakerHandle::status`] was called.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerStatus {
    pub address: Ipv4Addr,
    pub remote_as: u32,
    /// RFC 4271 state; [`State::name`] gives "Idle", "Connect", "Active", "OpenSent",
    /// "OpenConfirm" or "Established".
    pub state: State,
    /// How long the current session has been Established; `None` when not Established.
    pub uptime: Option<Duration>,
    /// Whole messages received and sent over the speaker's lifetime, all connections.
    pub messages_received: u64,
    pub messages_sent: u64,
    /// The last reason a connection attempt or a session failed, e.g.
    /// "connect: connection refused" or "NOTIFICATION received 6/2 (Cease, Administrative
    /// Shutdown)". Kept after the session recovers.
    pub last_error: Option<String>,
    /// Negotiated hold time in seconds (0: no keepalives), while a connection has one.
    pub hold_time: Option<u16>,
    /// Our prefixes the peer currently has (empty unless Established).
    pub advertised: Vec<Ipv4Net>,
}

impl PeerStatus {
    pub(super) fn new(address: Ipv4Addr, remote_as: u32) -> Self {
        Self {
            address,
            remote_as,
            state: State::Idle,
            uptime: None,
            messages_received: 0,
            messages_sent: 0,
            last_error: None,
            hold_time: None,
            advertised: Vec::new(),
        }
    }

    /// True when the peer is Established and has at least one of our prefixes.
    pub fn is_advertising(&self) -> bool {
        self.state == State::Established && !self.advertised.is_empty()
    }
}

/// What a peer task publishes; the uptime is computed when read.
#[derive(Clone, Debug)]
pub(super) struct PeerSnapshot {
    pub status: PeerStatus,
    pub established_at: Option<Instant>,
}

impl PeerSnapshot {
    pub fn new(address: Ipv4Addr, remote_as: u32) -> Self {
        Self { status: PeerStatus::new(address, remote_as), established_at: None }
    }

    pub fn at(&self, now: Instant) -> PeerStatus {
        PeerStatus { uptime: self.established_at.map(|at| now.saturating_duration_since(at)), ..self.status.clone() }
    }
}
