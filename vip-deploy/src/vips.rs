//! What makes an address usable as a VIP: one rule for the manifests and the agent's own
//! `--vip`, so a manifest is never rendered with a VIP the agent would refuse (it would
//! crash-loop on every node).

use std::net::{IpAddr, Ipv6Addr};

/// Why `vip` cannot be a VIP, or `None` if it can: it must be a unicast address clients
/// resolve (ARP, or Neighbor Discovery for IPv6) and reach beyond the link's own
/// addresses.
pub fn vip_problem(vip: IpAddr) -> Option<&'static str> {
    match vip {
        _ if vip.is_unspecified() => Some("the unspecified address cannot be a VIP"),
        _ if vip.is_loopback() => Some("a loopback address cannot be a VIP"),
        _ if vip.is_multicast() => Some("a multicast address cannot be a VIP"),
        IpAddr::V4(v4) if v4.is_broadcast() => Some("the broadcast address cannot be a VIP"),
        IpAddr::V4(_) => None,
        IpAddr::V6(v6) => ipv6_problem(v6),
    }
}

/// Why `ip` cannot be a backend (an apiserver): no host answers it. A loopback address is
/// left alone: it names the node itself. The rule `vip-agent run` and the manifests share.
pub fn backend_problem(ip: std::net::Ipv4Addr) -> Option<&'static str> {
    match ip {
        _ if ip.is_unspecified() => Some("the unspecified address is no host"),
        _ if ip.is_broadcast() => Some("the broadcast address is no host"),
        _ if ip.is_multicast() => Some("a multicast address is no host"),
        _ => None,
    }
}

/// Why `id` cannot be a BGP router id: a BGP Identifier is a non-zero 32-bit number
/// (RFC 6286 §2.1); peers refuse an OPEN carrying zero.
pub fn router_id_problem(id: std::net::Ipv4Addr) -> Option<&'static str> {
    id.is_unspecified().then_some("a BGP identifier is not zero (RFC 6286)")
}

/// IPv6 adds two refusals: a link-local VIP (fe80::/10) is ambiguous without a zone, and
/// every interface already has one; an IPv4-mapped address (::ffff:0:0/96) is IPv4 on
/// the wire, so the IPv4 VIP itself is what to give.
fn ipv6_problem(vip: Ipv6Addr) -> Option<&'static str> {
    if vip.is_unicast_link_local() {
        Some("a link-local address cannot be a VIP (use a global or unique local address)")
    } else if vip.to_ipv4_mapped().is_some() {
        Some("an IPv4-mapped address cannot be a VIP (give the IPv4 address itself)")
    } else {
        None
    }
}

/// Why `vip` cannot be a VIP in BGP mode: the speaker advertises IPv4 unicast routes only.
pub fn bgp_problem(vip: IpAddr) -> Option<&'static str> {
    vip.is_ipv6().then_some("BGP mode advertises IPv4 VIPs only (IPv6 VIPs need --mode arp)")
}

/// Why `vip` cannot be forwarded by IPIP: IPv4 in IPv4 carries IPv4 VIPs only.
pub fn ipip_problem(vip: IpAddr) -> Option<&'static str> {
    vip.is_ipv6().then_some("--forward ipip carries IPv4 VIPs only (IPv6 VIPs need --forward dsr or local)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unicast_addresses_of_both_families_are_vips_and_the_rest_are_named() {
        for ok in ["10.0.0.100", "192.0.2.1", "fd00::100", "2001:db8::1"] {
            assert_eq!(vip_problem(ok.parse().unwrap()), None, "{ok}");
        }
        for (bad, why) in [
            ("0.0.0.0", "unspecified"),
            ("127.0.0.1", "loopback"),
            ("224.0.0.1", "multicast"),
            ("255.255.255.255", "broadcast"),
            ("::", "unspecified"),
            ("::1", "loopback"),
            ("ff02::1", "multicast"),
            ("fe80::1", "link-local"),
            ("::ffff:10.0.0.1", "IPv4-mapped"),
        ] {
            assert!(vip_problem(bad.parse().unwrap()).is_some_and(|w| w.contains(why)), "{bad}");
        }
        assert!(bgp_problem("fd00::1".parse().unwrap()).is_some());
        assert!(bgp_problem("10.0.0.1".parse().unwrap()).is_none());
        assert!(ipip_problem("fd00::1".parse().unwrap()).is_some());
        assert!(ipip_problem("10.0.0.1".parse().unwrap()).is_none());
    }
}
