//! How clients find the VIP: one concern, one implementation per mode.
//!
//! - [`arp`]: one node answers ARP for the VIP — the one the Lease elects, or this node
//!   without an election — and announces it with gratuitous ARP when it starts.
//! - [`bgp`]: every node that can carry the VIP advertises VIP/32 to its routers.
//!
//! The agent tells the announcer whether this node can carry the VIP (its apiserver
//! ready, its link up, no foreign host answering for the VIP); the announcer decides
//! whether it is announced, and reports back through [`AnnounceEvent`]s.

pub mod arp;
pub mod bgp;

use std::{net::IpAddr, time::Duration};

use crate::{dataplane::Dataplane, election::ElectionEvent, live::PeersReader};

/// What the announcer's tasks report to the agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AnnounceEvent {
    /// From the election (or the holder of the VIP without one).
    Election(ElectionEvent),
    /// Another host said it has `vip`, at `mac` (a gratuitous ARP, an ARP reply).
    ForeignClaim { vip: IpAddr, mac: [u8; 6] },
}

/// The announcer of this node's mode.
pub enum Announcer {
    Arp(arp::ArpAnnounce),
    Bgp(bgp::BgpAnnounce),
}

impl Announcer {
    /// Whether this node can carry the VIPs now (apiserver ready, link up, no foreign
    /// claimant).
    pub fn set_eligible(&mut self, eligible: bool) {
        match self {
            Announcer::Arp(a) => a.set_eligible(eligible),
            Announcer::Bgp(b) => b.set_eligible(eligible),
        }
    }

    /// An event from the ARP mode's election (none in BGP mode).
    pub fn on_election(&mut self, event: &ElectionEvent) {
        if let Announcer::Arp(a) = self {
            a.on_election(event);
        }
    }

    /// The link came back (maybe as a new interface).
    pub fn on_link_up(&mut self) {
        if let Announcer::Arp(a) = self {
            a.on_link_up();
        }
    }

    /// A foreign host claimed `vip`: (a conflict, defended).
    pub fn on_foreign_claim(&mut self, vip: IpAddr, mac: [u8; 6]) -> (bool, bool) {
        match self {
            Announcer::Arp(a) => a.on_foreign_claim(vip, mac),
            Announcer::Bgp(_) => (false, false),
        }
    }

    /// ARP mode: whether a foreign claim makes this node yield rather than defend (it
    /// holds the VIP without a Lease).
    pub fn yields_to_claims(&self) -> bool {
        match self {
            Announcer::Arp(a) => a.yields_to_claims(),
            Announcer::Bgp(_) => false,
        }
    }

    /// BGP mode: whether the VIPs are advertised.
    pub fn advertised(&self) -> Option<bool> {
        match self {
            Announcer::Arp(_) => None,
            Announcer::Bgp(b) => Some(b.advertised()),
        }
    }

    /// BGP mode: a reader of every peer's session, as it is when read.
    pub fn peers_reader(&self) -> Option<PeersReader> {
        match self {
            Announcer::Arp(_) => None,
            Announcer::Bgp(b) => Some(b.peers_reader()),
        }
    }

    /// Stops announcing: hands over (ARP) or withdraws and leaves the sessions (BGP),
    /// then keeps balancing what still arrives for `drain`. With `keep_forwarding` an
    /// ARP leader keeps answering for the next agent; BGP sessions always end (the
    /// routers drop the routes until the next agent advertises them again).
    pub async fn stop(self, keep_forwarding: bool, dp: &mut Dataplane, budget: Duration, drain: Duration) {
        match self {
            Announcer::Arp(a) => a.stop(keep_forwarding, dp, budget, drain).await,
            Announcer::Bgp(b) => b.stop(budget, drain).await,
        }
    }
}
