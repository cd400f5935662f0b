//! ARP on the wire, as the agent speaks it for IPv4 VIPs: the gratuitous ARP frames
//! ([`crate::announcement`] sends them), the probe before it claims one (RFC 5227 §2.1),
//! and the watch for other hosts claiming a VIP this node leads (RFC 5227 §2.4). The IPv6
//! twin is [`crate::ndp`].
//!
//! Gratuitous ARP: both forms are sent, since implementations differ in which they
//! honour: a request (who-has VIP tell VIP) and a reply (VIP is-at MAC), each to the
//! broadcast address.

use std::{
    future::Future,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use tokio::sync::mpsc;

use crate::{
    netdev,
    rawsock::{ethertype_only, tagged, RawSocket},
};

/// How long a claim probe listens for an answer. RFC 5227 allows seconds; a host on the
/// segment answers within a millisecond, and failover time counts every millisecond.
pub const PROBE_WAIT: Duration = Duration::from_millis(100);

pub const ETH_P_ARP: u16 = 0x0806;
const ARPOP_REQUEST: u16 = 1;
const ARPOP_REPLY: u16 = 2;

/// An Ethernet/IPv4 ARP frame: `op` from `sha`/`spa` to `tha`/`tpa`, in an Ethernet
/// frame to `dst` from `sha`.
fn frame(dst: [u8; 6], op: u16, sha: [u8; 6], spa: Ipv4Addr, tha: [u8; 6], tpa: Ipv4Addr) -> [u8; 42] {
    let mut f = [0u8; 42];
    f[0..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&sha);
    f[12..14].copy_from_slice(&ETH_P_ARP.to_be_bytes());
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    f[16..18].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&op.to_be_bytes());
    f[22..28].copy_from_slice(&sha);
    f[28..32].copy_from_slice(&spa.octets());
    f[32..38].copy_from_slice(&tha);
    f[38..42].copy_from_slice(&tpa.octets());
    f
}

/// The two gratuitous ARP frames for `vip` at `mac`: request form, then reply form
/// (target MAC zero in the request, broadcast in the reply, RFC 5227 §3).
pub fn frames(mac: [u8; 6], vip: Ipv4Addr) -> [[u8; 42]; 2] {
    [frame([0xff; 6], ARPOP_REQUEST, mac, vip, [0; 6], vip), frame([0xff; 6], ARPOP_REPLY, mac, vip, [0xff; 6], vip)]
}

/// An ARP probe for `vip` from `mac` (RFC 5227 §2.1.1: sender IP 0.0.0.0, broadcast).
pub fn probe_frame(mac: [u8; 6], vip: Ipv4Addr) -> [u8; 42] {
    frame([0xff; 6], ARPOP_REQUEST, mac, Ipv4Addr::UNSPECIFIED, [0; 6], vip)
}

/// A host other than `mine` saying it has one of `vips`: a request or reply whose sender
/// IP is a VIP (a gratuitous ARP, an answer). Returns the VIP and the sender's MAC.
pub fn foreign_claim(f: &[u8], vips: &[Ipv4Addr], mine: [u8; 6]) -> Option<(Ipv4Addr, [u8; 6])> {
    if f.len() < 42 || f[12..14] != ETH_P_ARP.to_be_bytes() || f[14..20] != [0, 1, 8, 0, 6, 4] {
        return None;
    }
    let op = u16::from_be_bytes([f[20], f[21]]);
    if op != ARPOP_REQUEST && op != ARPOP_REPLY {
        return None;
    }
    let sha: [u8; 6] = f[22..28].try_into().ok()?;
    let spa = Ipv4Addr::new(f[28], f[29], f[30], f[31]);
    (sha != mine && f[6..12] != mine && vips.contains(&spa)).then_some((spa, sha))
}

/// An ARP socket on `ifindex` that receives the ARP of VLAN `vlan` (0: untagged) only.
fn arp_socket(ifindex: u32, vlan: u16, recv_timeout: Option<Duration>) -> std::io::Result<RawSocket> {
    RawSocket::open_for(ifindex, ETH_P_ARP, vlan, &ethertype_only(ETH_P_ARP), recv_timeout)
}

/// Another host probing for one of `vips` (RFC 5227 §2.1.1: sender IP 0.0.0.0, target
/// the VIP): it is about to claim it too.
pub fn foreign_probe(f: &[u8], vips: &[Ipv4Addr], mine: [u8; 6]) -> Option<(Ipv4Addr, [u8; 6])> {
    if f.len() < 42 || f[12..14] != ETH_P_ARP.to_be_bytes() || f[14..22] != [0, 1, 8, 0, 6, 4, 0, 1] {
        return None;
    }
    let sha: [u8; 6] = f[22..28].try_into().ok()?;
    let tpa = Ipv4Addr::new(f[38], f[39], f[40], f[41]);
    (sha != mine && f[28..32] == [0; 4] && vips.contains(&tpa)).then_some((tpa, sha))
}

/// What a claim probe found: another host at `mac` answers for `vip`, or (with
/// `simultaneous`) probes for it too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeConflict {
    pub vip: std::net::IpAddr,
    pub mac: [u8; 6],
    pub simultaneous: bool,
}

/// Probes every VIP (RFC 5227 §2.1.1) from `interface` and listens for `wait`: `Err` with
/// the first VIP another host answers for (any ARP whose sender IP is that VIP and whose
/// sender MAC is not ours), or probes for at the same time (both then back off; the
/// `bool` says which).
/// Blocking: run it on a blocking thread.
pub fn probe(
    interface: &str,
    vlan: u16,
    vips: &[Ipv4Addr],
    wait: Duration,
) -> std::io::Result<Result<(), ProbeConflict>> {
    let dev = netdev::lookup(interface).map_err(|e| std::io::Error::other(e.to_string()))?;
    let sock = arp_socket(dev.ifindex, vlan, Some(Duration::from_millis(10)))?;
    for &vip in vips {
        sock.send(&tagged(&probe_frame(dev.mac.0, vip), vlan))?;
    }
    let mine = dev.mac.0;
    await_conflict(&sock, wait, |frame| {
        let claim = foreign_claim(frame, vips, mine).map(|(vip, mac)| (vip, mac, false));
        claim.or_else(|| foreign_probe(frame, vips, mine).map(|(vip, mac)| (vip, mac, true)))
    })
}

/// Reads `sock` (opened with a receive timeout) for `wait`: the first conflict `classify`
/// finds in a frame (the VIP, the other host's MAC, and whether it only probes too), or
/// `Ok(())` when none came. What both claim probes, ARP and DAD, listen with.
pub fn await_conflict<A: Into<std::net::IpAddr>>(
    sock: &RawSocket,
    wait: Duration,
    classify: impl Fn(&[u8]) -> Option<(A, [u8; 6], bool)>,
) -> std::io::Result<Result<(), ProbeConflict>> {
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 256];
    while Instant::now() < deadline {
        if let Some(n) = sock.recv(&mut buf)? {
            if let Some((vip, mac, simultaneous)) = classify(&buf[..n]) {
                return Ok(Err(ProbeConflict { vip: vip.into(), mac, simultaneous }));
            }
        }
    }
    Ok(Ok(()))
}

/// Watches `interface` for other hosts claiming one of `vips` and sends each claim
/// (VIP, MAC) on `tx`, until the receiver is dropped. Frames the data plane answers or
/// drops never get here; gratuitous ARPs and replies pass to the kernel and to this.
pub fn watch_claims(
    interface: String,
    vlan: u16,
    vips: Vec<Ipv4Addr>,
    tx: mpsc::Sender<(std::net::IpAddr, [u8; 6])>,
) -> std::io::Result<impl Future<Output = ()>> {
    let dev = netdev::lookup(&interface).map_err(|e| std::io::Error::other(e.to_string()))?;
    let sock = arp_socket(dev.ifindex, vlan, None)?;
    let mac = dev.mac.0;
    let parse = move |f: &[u8]| foreign_claim(f, &vips, mac).map(|(vip, mac)| (vip.into(), mac));
    crate::rawsock::watch(sock, interface, "ARP", parse, tx)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [2, 0, 0, 0, 0, 9];
    const VIP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 100);

    #[test]
    fn frames_are_gratuitous_requests_and_replies() {
        let [req, rep] = frames(MAC, VIP);
        for f in [&req, &rep] {
            assert_eq!(f[0..6], [0xff; 6], "broadcast");
            assert_eq!(f[6..12], MAC);
            assert_eq!(f[12..14], [0x08, 0x06]);
            assert_eq!(f[22..28], MAC, "sender MAC");
            assert_eq!(f[28..32], VIP.octets(), "sender IP");
            assert_eq!(f[38..42], VIP.octets(), "target IP = sender IP");
        }
        assert_eq!(req[20..22], [0, 1]);
        assert_eq!(rep[20..22], [0, 2]);
    }

    #[test]
    fn a_probe_has_sender_ip_zero_and_asks_for_the_vip() {
        let p = probe_frame(MAC, VIP);
        assert_eq!(p[20..22], [0, 1]);
        assert_eq!(p[28..32], [0; 4]);
        assert_eq!(p[32..38], [0; 6]);
        assert_eq!(p[38..42], VIP.octets());
    }

    #[test]
    fn only_other_hosts_claiming_a_vip_are_claims() {
        let other = [2, 0, 0, 0, 0, 0x66];
        let [garp, reply] = frames(other, VIP);
        assert_eq!(foreign_claim(&garp, &[VIP], MAC), Some((VIP, other)));
        assert_eq!(foreign_claim(&reply, &[VIP], MAC), Some((VIP, other)));
        let [ours, _] = frames(MAC, VIP);
        assert_eq!(foreign_claim(&ours, &[VIP], MAC), None, "our own announcement");
        assert_eq!(foreign_claim(&probe_frame(other, VIP), &[VIP], MAC), None, "a probe claims nothing");
        assert_eq!(foreign_claim(&garp, &[Ipv4Addr::new(10, 0, 0, 101)], MAC), None, "another address");
        assert_eq!(foreign_claim(&garp[..41], &[VIP], MAC), None, "truncated");
    }

    #[test]
    fn another_hosts_probe_for_a_vip_is_seen_and_ours_is_not() {
        let other = [2, 0, 0, 0, 0, 0x66];
        assert_eq!(foreign_probe(&probe_frame(other, VIP), &[VIP], MAC), Some((VIP, other)));
        assert_eq!(foreign_probe(&probe_frame(MAC, VIP), &[VIP], MAC), None);
        assert_eq!(foreign_probe(&frames(other, VIP)[0], &[VIP], MAC), None, "an announcement is no probe");
    }
}
