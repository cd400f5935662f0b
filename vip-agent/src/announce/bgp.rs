//! BGP mode: every node whose apiserver is ready advertises VIP/32 to its routers, which
//! spread clients over the nodes by ECMP. No election: the announcement follows this
//! node's eligibility (apiserver ready, link up) directly — advertised while eligible,
//! withdrawn at once when not. On stop: withdraw, Cease / Administrative Shutdown,
//! half-close and drain ([`vip_bgp::speaker::SpeakerHandle::shutdown`]).
//!
//! The data plane does not answer ARP for the VIPs (they are reached by routing) and
//! every node balances: each holds the same Maglev table, so a flow the router moves to
//! another node still reaches the same backend (DSR), and established connections
//! survive the loss of a load-balancing node.

use std::{net::Ipv4Addr, sync::Arc, time::Duration};

use ipnet::Ipv4Net;
use tracing::{info, warn};
use vip_bgp::speaker::{PeerConfig, PeerStatus, Speaker, SpeakerConfig, SpeakerHandle, StartError};

use crate::{
    config::BgpConfig,
    live::{PeerView, PeersReader},
};

#[derive(Debug, thiserror::Error)]
pub enum BgpError {
    #[error("--mode bgp: the interface has no IPv4 address to use as next hop (and router id); add one or choose another --interface")]
    NoNextHop,
    #[error("--bgp-peer {peer} is an address of this node: a BGP peer is a router")]
    PeerIsThisNode { peer: Ipv4Addr },
    #[error("--mode bgp: starting the BGP speaker")]
    Start(#[source] StartError),
}

/// BGP mode's state.
pub struct BgpAnnounce {
    speaker: Option<SpeakerHandle>,
    vips: Vec<Ipv4Net>,
    advertised: bool,
}

impl BgpAnnounce {
    /// Starts a session per peer (on the current runtime: the sockets live in this
    /// thread's network namespace); nothing is advertised until this node is eligible.
    pub fn start(cfg: &BgpConfig, node_ip: Option<Ipv4Addr>, vips: &[Ipv4Addr]) -> Result<Self, BgpError> {
        let next_hop = node_ip.ok_or(BgpError::NoNextHop)?;
        let router_id = cfg.router_id.unwrap_or(next_hop);
        let peers = cfg
            .peers
            .iter()
            .map(|p| PeerConfig {
                password: p.password.clone(),
                hold_time: cfg.hold_time,
                keepalive: cfg.keepalive,
                ..PeerConfig::new(p.ip, p.asn, cfg.local_as, router_id, next_hop)
            })
            .collect();
        let speaker = Speaker::start(SpeakerConfig::new(peers)).map_err(BgpError::Start)?;
        info!(local_as = cfg.local_as, %router_id, %next_hop, peers = cfg.peers.len(), "BGP speaker started");
        let vips = vips.iter().filter_map(|v| Ipv4Net::new(*v, 32).ok()).collect();
        Ok(Self { speaker: Some(speaker), vips, advertised: false })
    }

    /// Advertises the VIPs while this node can carry them; withdraws them at once when
    /// it cannot.
    pub fn set_eligible(&mut self, eligible: bool) {
        let Some(speaker) = &self.speaker else { return };
        if eligible == self.advertised {
            return;
        }
        self.advertised = eligible;
        if eligible {
            info!(vips = ?self.vips, "advertising the VIPs: sent on every session as it reaches Established");
            speaker.set_advertised(self.vips.clone());
        } else {
            warn!(vips = ?self.vips, "withdrawing the VIPs: this node cannot carry them");
            speaker.set_advertised([]);
        }
    }

    pub fn advertised(&self) -> bool {
        self.advertised
    }

    /// A reader of every peer's session as it is when read, for status and metrics
    /// (after a stop, what each session reported last).
    pub fn peers_reader(&self) -> PeersReader {
        let reader = self.speaker.as_ref().map(|s| s.status_reader());
        Arc::new(move || reader.as_ref().map(|r| r.status().iter().map(view).collect()).unwrap_or_default())
    }

    /// Withdraws, leaves every peer with a Cease, waits for the routers to close (at
    /// most `timeout`), then keeps balancing what still arrives for `drain` while the
    /// routers converge.
    pub async fn stop(mut self, timeout: Duration, drain: Duration) {
        if let Some(speaker) = self.speaker.take() {
            info!("withdrawing the VIPs and leaving the BGP sessions");
            speaker.shutdown(timeout).await;
            tokio::time::sleep(drain).await;
        }
    }
}

fn view(p: &PeerStatus) -> PeerView {
    PeerView {
        address: p.address.to_string(),
        remote_as: p.remote_as,
        state: p.state.name().to_owned(),
        uptime_s: p.uptime.map(|d| d.as_secs()),
        messages_received: p.messages_received,
        messages_sent: p.messages_sent,
        last_error: p.last_error.clone(),
        hold_time_s: p.hold_time,
        advertised: p.advertised.iter().map(|n| n.to_string()).collect(),
    }
}
