//! Announcing the VIPs on the wire when this node starts answering for them: gratuitous
//! ARP for IPv4 VIPs ([`crate::arp::frames`]), an unsolicited Neighbor Advertisement for
//! IPv6 ones ([`crate::ndp::unsolicited_na`]).
//!
//! First a burst, then spaced repeats for hosts that missed it (a switch port that was
//! still coming up, a client that was busy). Every announcement re-checks, right before
//! it is sent, that this node still answers for the VIP in the data plane: a leader
//! paused in the middle of its repeats and resumed after another node took over must
//! not pull clients back.

use std::{net::IpAddr, time::Duration};

use tracing::{debug, warn};

use crate::{
    arp, ndp, netdev,
    rawsock::{tagged, RawSocket, NONE},
};

/// Sends of each frame in the initial burst, and the gap between them.
pub const BURST: usize = 3;
pub const BURST_GAP: Duration = Duration::from_millis(50);
/// Delays of the repeats after the burst.
pub const REPEATS: [Duration; 3] = [Duration::from_secs(1), Duration::from_secs(2), Duration::from_secs(4)];

/// The sockets announcements leave by: one per family with a VIP to announce, each
/// receiving nothing (they only send); and the VLAN the frames are tagged with.
struct Wire {
    mac: [u8; 6],
    vlan: u16,
    arp: Option<RawSocket>,
    ipv6: Option<RawSocket>,
}

impl Wire {
    /// Opens the sockets `vips` need on `interface` (resolved now, so a recreated
    /// interface is found).
    fn open(interface: &str, vlan: u16, vips: &[IpAddr]) -> std::io::Result<Self> {
        let dev = netdev::lookup(interface).map_err(|e| std::io::Error::other(e.to_string()))?;
        // Send-only: unfiltered, a packet socket would copy every frame of its EtherType
        // (all the IPv6 traffic) for as long as the announcements last.
        let open = |ethertype| RawSocket::open_for(dev.ifindex, ethertype, 0, &NONE, None);
        let arp = vips.iter().any(IpAddr::is_ipv4).then(|| open(arp::ETH_P_ARP)).transpose()?;
        let ipv6 = vips.iter().any(IpAddr::is_ipv6).then(|| open(ndp::ETH_P_IPV6)).transpose()?;
        Ok(Self { mac: dev.mac.0, vlan, arp, ipv6 })
    }

    /// Sends one round for every VIP for which `leads` still holds: both gratuitous ARP
    /// forms, or the advertisement. Returns the frames sent.
    fn announce_once(&self, vips: &[IpAddr], leads: &dyn Fn(IpAddr) -> bool) -> usize {
        let mut sent = 0;
        for &vip in vips {
            if !leads(vip) {
                continue;
            }
            let (sock, frames): (_, Vec<Vec<u8>>) = match vip {
                IpAddr::V4(v) => (&self.arp, arp::frames(self.mac, v).iter().map(|f| f.to_vec()).collect()),
                IpAddr::V6(v) => (&self.ipv6, vec![ndp::unsolicited_na(self.mac, v)]),
            };
            let Some(sock) = sock else { continue };
            for f in frames {
                match sock.send(&tagged(&f, self.vlan)) {
                    Ok(()) => sent += 1,
                    Err(error) => warn!(%error, %vip, "announcing the VIP failed"),
                }
            }
        }
        sent
    }
}

/// The burst and the repeats, as a task, on interface `interface` (tagged with VLAN
/// `vlan` unless 0). `leads` is asked
/// before every send. Errors are logged, not fatal: a missed announcement only delays
/// how soon clients move.
pub async fn announce(interface: String, vlan: u16, vips: Vec<IpAddr>, leads: impl Fn(IpAddr) -> bool) {
    let wire = match Wire::open(&interface, vlan, &vips) {
        Ok(w) => w,
        Err(error) => {
            warn!(%error, %interface, "cannot open a raw socket to announce the VIPs");
            return;
        }
    };
    let mut sent = 0;
    for i in 0..BURST {
        if i > 0 {
            tokio::time::sleep(BURST_GAP).await;
        }
        sent += wire.announce_once(&vips, &leads);
    }
    debug!(?vips, sent, "announcement burst sent");
    let mut elapsed = Duration::ZERO;
    for at in REPEATS {
        tokio::time::sleep(at - elapsed).await;
        elapsed = at;
        wire.announce_once(&vips, &leads);
    }
}

/// One announcement round for `vip`, if `leads` (a defence, RFC 5227 §2.4 (b); for IPv6
/// the same answer to a conflicting advertisement). Returns the frames sent.
pub fn defend(interface: &str, vlan: u16, vip: IpAddr, leads: impl Fn(IpAddr) -> bool) -> std::io::Result<usize> {
    Ok(Wire::open(interface, vlan, &[vip])?.announce_once(&[vip], &leads))
}
