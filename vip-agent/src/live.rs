//! What the running agent knows that the pinned maps do not: its mode, whether this
//! node can carry the VIPs (and if not, why), and in BGP mode every peer's session.
//! The node updates it; the metrics endpoint serves it as JSON on `/status` (what
//! `vip-agent status` shows beside the maps) and as metrics.

use std::sync::{Arc, Mutex};

use serde::Serialize;

/// One BGP peer, as the speaker last reported it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PeerView {
    pub address: String,
    pub remote_as: u32,
    /// RFC 4271 state name: Idle, Connect, Active, OpenSent, OpenConfirm, Established.
    pub state: String,
    /// Seconds the session has been Established.
    pub uptime_s: Option<u64>,
    pub messages_received: u64,
    pub messages_sent: u64,
    pub last_error: Option<String>,
    /// Negotiated hold time, seconds.
    pub hold_time_s: Option<u16>,
    /// Our prefixes the router has.
    pub advertised: Vec<String>,
}

/// The agent's live state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LiveView {
    /// `arp` or `bgp`.
    pub mode: &'static str,
    /// The hook the data plane runs at: `xdp` or `tcx`.
    pub hook: &'static str,
    /// At XDP, how the kernel reports the program attached: `native`, or `skb` (generic
    /// XDP, where the driver has no XDP hook of its own: a VLAN device, a bridge).
    pub xdp_mode: Option<&'static str>,
    /// The VIPs are on a VLAN at XDP: the tcx companion for frames whose tag the NIC
    /// stripped runs too.
    pub vlan_companion: bool,
    /// This node can carry the VIPs now.
    pub eligible: bool,
    /// Why not, when not: `apiserver not ready`, `link down`, `foreign host answers`.
    pub not_eligible_because: Vec<&'static str>,
    /// BGP mode: the VIPs are being advertised.
    pub advertised: Option<bool>,
    pub bgp_peers: Vec<PeerView>,
}

/// The view shared between the node and the metrics endpoint.
pub type SharedView = Arc<Mutex<LiveView>>;

/// The view, or its default if a writer panicked while holding it.
pub fn snapshot(view: &SharedView) -> LiveView {
    view.lock().map(|v| v.clone()).unwrap_or_default()
}
