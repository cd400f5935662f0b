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

/// Whether the Lease API answers the election (ARP mode with `--election kubernetes`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct LeaseApiView {
    pub answering: bool,
    /// Seconds since it last started or stopped answering (as of the last publication:
    /// the node publishes on every event and at least once a second).
    pub since_s: u64,
    /// The last failure, root cause included.
    pub last_error: Option<String>,
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
    /// BGP mode: the VIPs are advertised, as the node publishes it: it wants them
    /// advertised (eligible, not stopping); [`snapshot`] narrows it to whether a peer
    /// holds the routes (a session refused by a wrong AS or password advertises nothing).
    pub advertised: Option<bool>,
    pub bgp_peers: Vec<PeerView>,
    /// This agent process's instance id (16 hex digits), as it wrote it into the pinned
    /// configuration (`Config::agent_instance`): `status` shows this view beside the
    /// pins only if they match, so another agent answering at the address is not taken
    /// for the pins' own.
    pub instance: String,
    /// The Lease API, as the election last found it; `None` without an election (or
    /// before its first try).
    pub lease_api: Option<LeaseApiView>,
    /// This node leads without a Lease (`--bootstrap`, the Lease API not answering yet).
    pub bootstrap_hold: bool,
    /// Another agent process runs under this node's name: its instance id (as
    /// `vip_duplicate_identity`).
    pub duplicate_instance: Option<String>,
    /// The Lease holder serves other VIPs than this node: the holder and its VIPs (as
    /// `vip_leader_vips_differ`).
    pub leader_vips_differ: Option<(String, String)>,
    /// The Lease holder places flows otherwise than this node: the holder and its
    /// placement (as `vip_leader_flow_placement_differs`; see `maglev::placement`).
    pub leader_flow_placement_differs: Option<(String, String)>,
    /// The Lease's holder (`holderIdentity`) as the election last read it: on a follower,
    /// the node that leads (`None`: none holds it, or no election).
    pub lease_holder: Option<String>,
}

/// Reads every BGP peer's session as it is at the moment of the call.
pub type PeersReader = Arc<dyn Fn() -> Vec<PeerView> + Send + Sync>;

/// What the node publishes: the view, refreshed on the node's events, and the BGP
/// sessions, read when the view is (a session changes state on its own task, with no
/// event of the node's: a view refreshed only by the node showed a session in OpenSent
/// long after it was Established).
#[derive(Default)]
pub struct Published {
    view: LiveView,
    peers: Option<PeersReader>,
}

/// The view shared between the node and the metrics endpoint.
pub type SharedView = Arc<Mutex<Published>>;

/// Replaces the node's part of the view.
pub fn publish(shared: &SharedView, view: LiveView) {
    if let Ok(mut p) = shared.lock() {
        p.view = view;
    }
}

/// Sets where the BGP sessions are read from.
pub fn read_peers_from(shared: &SharedView, reader: PeersReader) {
    if let Ok(mut p) = shared.lock() {
        p.peers = Some(reader);
    }
}

/// The view with the BGP sessions as they are now, or the default view if a writer
/// panicked while holding it.
pub fn snapshot(shared: &SharedView) -> LiveView {
    let Ok(p) = shared.lock() else { return LiveView::default() };
    let mut view = p.view.clone();
    if let Some(read) = &p.peers {
        view.bgp_peers = read();
        if view.advertised == Some(true) {
            view.advertised = Some(view.bgp_peers.iter().any(|peer| !peer.advertised.is_empty()));
        }
    }
    view
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    /// A session's state reaches the view when the view is read, without the node
    /// publishing anything after it changed.
    #[test]
    fn bgp_sessions_are_read_when_the_view_is() {
        let shared = SharedView::default();
        publish(&shared, LiveView { mode: "bgp", ..LiveView::default() });
        let received = Arc::new(AtomicU64::new(0));
        let source = received.clone();
        read_peers_from(
            &shared,
            Arc::new(move || {
                let n = source.load(Ordering::SeqCst);
                let state = if n == 0 { "OpenSent" } else { "Established" };
                vec![PeerView { state: state.into(), messages_received: n, ..PeerView::default() }]
            }),
        );
        assert_eq!(snapshot(&shared).bgp_peers[0].state, "OpenSent");
        received.store(2, Ordering::SeqCst);
        let view = snapshot(&shared);
        assert_eq!(
            (view.mode, view.bgp_peers[0].state.as_str(), view.bgp_peers[0].messages_received),
            ("bgp", "Established", 2)
        );
    }

    /// "Advertised" is said only while a peer holds the routes: a node that wants them
    /// advertised but whose sessions are refused (a wrong AS, a wrong TCP-MD5 password)
    /// advertises nothing, and an alert on the gauge must see that.
    #[test]
    fn advertised_means_a_peer_holds_the_routes() {
        let shared = SharedView::default();
        let holds = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let source = holds.clone();
        read_peers_from(
            &shared,
            Arc::new(move || {
                let routes = if source.load(Ordering::SeqCst) { vec!["192.0.2.100/32".to_owned()] } else { vec![] };
                vec![PeerView { state: "Idle".into(), advertised: routes, ..PeerView::default() }]
            }),
        );
        publish(&shared, LiveView { mode: "bgp", advertised: Some(true), ..LiveView::default() });
        assert_eq!(snapshot(&shared).advertised, Some(false), "wanted, but no peer holds the routes");
        holds.store(true, Ordering::SeqCst);
        assert_eq!(snapshot(&shared).advertised, Some(true));
        publish(&shared, LiveView { mode: "bgp", advertised: Some(false), ..LiveView::default() });
        assert_eq!(snapshot(&shared).advertised, Some(false), "not wanted (withdrawn)");
    }
}
