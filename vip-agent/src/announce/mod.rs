//! How clients find the VIP: one concern, one implementation per mode.
//!
//! - [`arp`]: one node answers ARP for the VIP — the one the Lease elects, or this node
//!   without an election — and announces it with gratuitous ARP when it starts.
//!
//! The agent tells the announcer whether this node can carry the VIP (its apiserver
//! ready, its link up, no foreign host answering for the VIP); the announcer decides
//! whether it is announced, and reports back through [`AnnounceEvent`]s.

pub mod arp;

use std::net::Ipv4Addr;

use crate::election::ElectionEvent;

/// What the announcer's tasks report to the agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AnnounceEvent {
    /// From the election (or the holder of the VIP without one).
    Election(ElectionEvent),
    /// Another host said it has `vip`, at `mac` (a gratuitous ARP, an ARP reply).
    ForeignClaim { vip: Ipv4Addr, mac: [u8; 6] },
}
