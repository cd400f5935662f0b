//! What makes an address usable as a VIP: one rule for the manifests and the agent's own
//! `--vip`, so a manifest is never rendered with a VIP the agent would refuse (it would
//! crash-loop on every node).

use std::{
    net::{IpAddr, Ipv6Addr},
    time::Duration,
};

/// Why `vip` cannot be a VIP, or `None` if it can: it must be a unicast address clients
/// resolve (ARP, or Neighbor Discovery for IPv6) and reach beyond the link's own
/// addresses.
pub fn vip_problem(vip: IpAddr) -> Option<&'static str> {
    match vip {
        _ if vip.is_unspecified() => Some("the unspecified address cannot be a VIP"),
        _ if vip.is_loopback() => Some("a loopback address cannot be a VIP"),
        _ if vip.is_multicast() => Some("a multicast address cannot be a VIP"),
        IpAddr::V4(v4) if v4.is_broadcast() => Some("the broadcast address cannot be a VIP"),
        // As fe80::/10 for IPv6: every host may pick one for itself (RFC 3927), and
        // routers do not forward it.
        IpAddr::V4(v4) if v4.is_link_local() => Some("a link-local address cannot be a VIP (169.254.0.0/16)"),
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

/// Why `id` cannot be the BGP router id of a node serving `vips`: a BGP Identifier is a
/// non-zero 32-bit number (RFC 6286 §2.1; peers refuse an OPEN carrying zero), unique
/// within the AS (§2.1), which a VIP is not: every node carries it, and each of them would
/// claim the same identifier.
pub fn router_id_problem(id: std::net::Ipv4Addr, vips: &[IpAddr]) -> Option<&'static str> {
    if id.is_unspecified() {
        Some("a BGP identifier is not zero (RFC 6286)")
    } else if vips.contains(&IpAddr::V4(id)) {
        Some("is a VIP, which every node carries: each would claim the same BGP identifier (RFC 6286: unique within the AS); leave it out to use the node's own address")
    } else {
        None
    }
}

/// The hold time the agent offers when `--bgp-hold-time` is not given (RFC 4271 suggests
/// 90 s; a control-plane VIP wants a dead node's routes gone sooner).
pub const DEFAULT_BGP_HOLD_TIME: Duration = Duration::from_secs(9);

/// A BGP timer flag the agent would refuse: the flag, its value, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BgpTimerProblem {
    pub flag: &'static str,
    pub value: Duration,
    pub why: String,
}

/// Why `--bgp-hold-time hold` / `--bgp-keepalive keepalive` cannot be, or `None`: the
/// hold time goes on the wire in an OPEN as 16-bit seconds, 0 (no keepalives) or 3 to
/// 65535 (RFC 4271 §4.2); the keepalive interval stays local, so any duration above zero
/// and at most a third of the hold time (RFC 4271 §10 suggests a third; the agent insists
/// on it), sub-second ones included. The rule `vip-agent run` and the manifests share.
pub fn bgp_timers_problem(hold: Option<Duration>, keepalive: Option<Duration>) -> Option<BgpTimerProblem> {
    let held = hold.unwrap_or(DEFAULT_BGP_HOLD_TIME);
    let on_the_wire = held.subsec_nanos() == 0 && (held.is_zero() || (3..=65535).contains(&held.as_secs()));
    if !on_the_wire {
        let why = "0 or 3s to 65535s, whole seconds (RFC 4271)".to_owned();
        return Some(BgpTimerProblem { flag: "bgp-hold-time", value: held, why });
    }
    match keepalive {
        Some(k) if !held.is_zero() && (k.is_zero() || k > held / 3) => Some(BgpTimerProblem {
            flag: "bgp-keepalive",
            value: k,
            why: format!("above zero and at most a third of the hold time ({})", crate::args::Dur(held)),
        }),
        _ => None,
    }
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
    fn bgp_timers_refuse_what_the_wire_cannot_carry_and_allow_sub_second_keepalives() {
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        for (hold, keepalive) in [
            (None, None),
            (Some(s(0)), None),
            (Some(s(3)), Some(s(1))),
            (None, Some(ms(500))),
            (Some(s(0)), Some(s(60))),
        ] {
            assert_eq!(bgp_timers_problem(hold, keepalive), None, "{hold:?} {keepalive:?}");
        }
        for (hold, keepalive, flag) in [
            (Some(s(2)), None, "bgp-hold-time"),
            (Some(s(65536)), None, "bgp-hold-time"),
            (Some(ms(3500)), None, "bgp-hold-time"),
            (None, Some(s(4)), "bgp-keepalive"),
            (Some(s(9)), Some(s(0)), "bgp-keepalive"),
        ] {
            assert_eq!(bgp_timers_problem(hold, keepalive).map(|p| p.flag), Some(flag), "{hold:?} {keepalive:?}");
        }
        let p = bgp_timers_problem(None, Some(s(4))).unwrap();
        assert_eq!(p.why, "above zero and at most a third of the hold time (9s)");
    }

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
            ("169.254.1.1", "link-local"),
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
