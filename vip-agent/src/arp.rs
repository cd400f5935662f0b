//! Gratuitous ARP: on becoming leader (and when the link comes back), announce that the
//! VIP is at this node's MAC so switches and clients move at once instead of waiting for
//! their caches to expire.
//!
//! Both forms are sent, since implementations differ in which they honour: a request
//! (who-has VIP tell VIP) and a reply (VIP is-at MAC), each to the broadcast address.
//! First a burst, then spaced repeats for hosts that missed it (a switch port that was
//! still coming up, a client that was busy).

use std::{net::Ipv4Addr, time::Duration};

use tracing::{debug, warn};

use crate::rawsock::RawSocket;

/// Sends of each form in the initial burst, and the gap between them.
pub const BURST: usize = 3;
pub const BURST_GAP: Duration = Duration::from_millis(50);
/// Delays of the repeats after the burst.
pub const REPEATS: [Duration; 3] = [Duration::from_secs(1), Duration::from_secs(2), Duration::from_secs(4)];

const ETH_P_ARP: u16 = 0x0806;

/// The two gratuitous ARP frames for `vip` at `mac`: request form, then reply form.
pub fn frames(mac: [u8; 6], vip: Ipv4Addr) -> [[u8; 42]; 2] {
    let mut out = [[0u8; 42]; 2];
    for (op, f) in [1u16, 2].into_iter().zip(out.iter_mut()) {
        f[0..6].copy_from_slice(&[0xff; 6]);
        f[6..12].copy_from_slice(&mac);
        f[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
        f[14..16].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
        f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
        f[18] = 6;
        f[19] = 4;
        f[20..22].copy_from_slice(&op.to_be_bytes());
        f[22..28].copy_from_slice(&mac);
        f[28..32].copy_from_slice(&vip.octets());
        // Target MAC: zero in a request, broadcast in the reply form (RFC 5227 §3).
        f[32..38].copy_from_slice(if op == 1 { &[0; 6] } else { &[0xff; 6] });
        f[38..42].copy_from_slice(&vip.octets());
    }
    out
}

/// Sends one round (both forms) for every VIP.
pub fn announce_once(sock: &RawSocket, mac: [u8; 6], vips: &[Ipv4Addr]) -> std::io::Result<()> {
    for &vip in vips {
        for f in frames(mac, vip) {
            sock.send(&f)?;
        }
    }
    Ok(())
}

/// The burst and the repeats, as a task. Errors are logged, not fatal: a missed
/// announcement only delays how soon clients move.
pub async fn announce(ifindex: u32, mac: [u8; 6], vips: Vec<Ipv4Addr>) {
    let sock = match RawSocket::open(ifindex, ETH_P_ARP, None) {
        Ok(s) => s,
        Err(error) => {
            warn!(%error, ifindex, "cannot open a raw socket for gratuitous ARP");
            return;
        }
    };
    let mut sent = 0;
    for i in 0..BURST {
        if i > 0 {
            tokio::time::sleep(BURST_GAP).await;
        }
        match announce_once(&sock, mac, &vips) {
            Ok(()) => sent += 1,
            Err(error) => warn!(%error, "gratuitous ARP failed"),
        }
    }
    debug!(?vips, sent, "gratuitous ARP burst sent");
    let mut elapsed = Duration::ZERO;
    for at in REPEATS {
        tokio::time::sleep(at - elapsed).await;
        elapsed = at;
        if let Err(error) = announce_once(&sock, mac, &vips) {
            warn!(%error, "gratuitous ARP repeat failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_gratuitous_requests_and_replies() {
        let mac = [2, 0, 0, 0, 0, 9];
        let vip = Ipv4Addr::new(10, 0, 0, 100);
        let [req, rep] = frames(mac, vip);
        for f in [&req, &rep] {
            assert_eq!(f[0..6], [0xff; 6], "broadcast");
            assert_eq!(f[6..12], mac);
            assert_eq!(f[12..14], [0x08, 0x06]);
            assert_eq!(f[22..28], mac, "sender MAC");
            assert_eq!(f[28..32], vip.octets(), "sender IP");
            assert_eq!(f[38..42], vip.octets(), "target IP = sender IP");
        }
        assert_eq!(req[20..22], [0, 1]);
        assert_eq!(rep[20..22], [0, 2]);
    }
}
