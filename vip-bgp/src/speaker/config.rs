//! Speaker and per-peer configuration, checked once when the speaker starts so that a
//! bad value is a clear error at startup rather than a session that never comes up.

use std::{collections::BTreeSet, fmt, net::Ipv4Addr, time::Duration};

use crate::codec::AS_TRANS;
use crate::session::SessionConfig;

/// BGP's TCP port (RFC 4271 §8.2.1.2 Note); we connect to it and never listen.
pub const BGP_PORT: u16 = 179;
/// Default hold time: a router drops the routes of a node that died within 9 s, with
/// keepalives every 3 s (the design's default; RFC 4271's 90 s is far too slow for a VIP).
pub const DEFAULT_HOLD_TIME: Duration = Duration::from_secs(9);
/// Default bound on one TCP connection attempt. A directly connected router answers a
/// SYN within milliseconds; 5 s covers the first two SYN retransmissions (1 s, 3 s) and
/// keeps a silent peer (wrong TCP-MD5 password, firewall) from delaying the next attempt.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest TCP-MD5 key Linux accepts (`TCP_MD5SIG_MAXKEYLEN`, include/uapi/linux/tcp.h).
pub const TCP_MD5_MAX_KEY_LEN: usize = 80;
/// Sent in the Cease we leave with (RFC 8203), so the router's log says who left and why.
pub const DEFAULT_SHUTDOWN_COMMUNICATION: &str = "vip-bgp: speaker shutting down";

/// One BGP peer (a router) and how we present ourselves to it.
#[derive(Clone, PartialEq, Eq)]
pub struct PeerConfig {
    /// The router's IPv4 address; we connect to it.
    pub address: Ipv4Addr,
    /// The router's TCP port, [`BGP_PORT`] unless a test says otherwise.
    pub port: u16,
    /// The AS the router must open with.
    pub remote_as: u32,
    /// TCP-MD5 (RFC 2385) password, 1 to 80 octets; `None` for no signature.
    pub password: Option<String>,
    pub local_as: u32,
    /// Our BGP Identifier; conventionally the node's IPv4 address.
    pub router_id: Ipv4Addr,
    /// Hold time we propose: 0 (no keepalives) or 3 to 65535 whole seconds. Also the
    /// socket's `TCP_USER_TIMEOUT`.
    pub hold_time: Duration,
    /// Interval between KEEPALIVEs; `None` for a third of the hold time. Lowered to a
    /// third of the negotiated hold time if above it.
    pub keepalive: Option<Duration>,
    /// NEXT_HOP of our announcements: the node's IPv4 address on the link to the router.
    pub next_hop: Ipv4Addr,
    pub connect_timeout: Duration,
}

impl PeerConfig {
    /// A peer on port 179 with the defaults: hold time 9 s, keepalive 3 s, no password.
    pub fn new(address: Ipv4Addr, remote_as: u32, local_as: u32, router_id: Ipv4Addr, next_hop: Ipv4Addr) -> Self {
        Self {
            address,
            port: BGP_PORT,
            remote_as,
            password: None,
            local_as,
            router_id,
            hold_time: DEFAULT_HOLD_TIME,
            keepalive: None,
            next_hop,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
        }
    }

    /// Checks every field and returns what the session state machine needs.
    pub fn session_config(&self) -> Result<SessionConfig, ConfigError> {
        let peer = self.address;
        for asn in [self.local_as, self.remote_as] {
            // AS 0 is reserved (RFC 7607); AS_TRANS is no real AS (RFC 6793 §9).
            if asn == 0 || asn == u32::from(AS_TRANS) {
                return Err(ConfigError::ReservedAs { peer, asn });
            }
        }
        if self.router_id.is_unspecified() {
            return Err(ConfigError::RouterId { peer });
        }
        let hold_time =
            hold_time_secs(self.hold_time).ok_or(ConfigError::HoldTime { peer, hold_time: self.hold_time })?;
        let keepalive = self.keepalive.unwrap_or(self.hold_time / 3);
        if hold_time != 0 && keepalive.is_zero() {
            return Err(ConfigError::Keepalive { peer, keepalive });
        }
        if let Some(password) = &self.password {
            if password.is_empty() || password.len() > TCP_MD5_MAX_KEY_LEN {
                return Err(ConfigError::PasswordLength { peer, length: password.len() });
            }
        }
        if self.connect_timeout.is_zero() {
            return Err(ConfigError::ConnectTimeout { peer });
        }
        Ok(SessionConfig {
            local_as: self.local_as,
            remote_as: self.remote_as,
            router_id: self.router_id,
            hold_time,
            keepalive,
            next_hop: self.next_hop,
            connect_timeout: self.connect_timeout,
            tcp_md5: self.password.is_some(),
        })
    }
}

/// Whole seconds, 0 or 3..=65535 (RFC 4271 §4.2).
fn hold_time_secs(hold_time: Duration) -> Option<u16> {
    if hold_time.subsec_nanos() != 0 {
        return None;
    }
    let secs = u16::try_from(hold_time.as_secs()).ok()?;
    (secs == 0 || secs >= 3).then_some(secs)
}

/// The password is never printed.
impl fmt::Debug for PeerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PeerConfig")
            .field("address", &self.address)
            .field("port", &self.port)
            .field("remote_as", &self.remote_as)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("local_as", &self.local_as)
            .field("router_id", &self.router_id)
            .field("hold_time", &self.hold_time)
            .field("keepalive", &self.keepalive)
            .field("next_hop", &self.next_hop)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

/// Everything the speaker runs with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpeakerConfig {
    pub peers: Vec<PeerConfig>,
    /// Text of the Cease / Administrative Shutdown sent on shutdown (RFC 8203); cut to
    /// 255 octets, empty for none.
    pub shutdown_communication: String,
}

impl SpeakerConfig {
    pub fn new(peers: Vec<PeerConfig>) -> Self {
        Self { peers, shutdown_communication: DEFAULT_SHUTDOWN_COMMUNICATION.to_owned() }
    }

    /// Every peer's session configuration, in order; peers must be distinct.
    pub fn session_configs(&self) -> Result<Vec<SessionConfig>, ConfigError> {
        let mut seen = BTreeSet::new();
        self.peers
            .iter()
            .map(|peer| {
                if !seen.insert((peer.address, peer.port)) {
                    return Err(ConfigError::DuplicatePeer { peer: peer.address });
                }
                peer.session_config()
            })
            .collect()
    }
}

/// A configuration value the speaker cannot run with; each names the peer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("BGP peer {peer}: AS {asn} is reserved (0, or AS_TRANS 23456)")]
    ReservedAs { peer: Ipv4Addr, asn: u32 },
    #[error("BGP peer {peer}: router id 0.0.0.0 is not a valid BGP identifier")]
    RouterId { peer: Ipv4Addr },
    #[error("BGP peer {peer}: hold time {hold_time:?} must be 0 or 3 to 65535 whole seconds")]
    HoldTime { peer: Ipv4Addr, hold_time: Duration },
    #[error("BGP peer {peer}: keepalive {keepalive:?} must be above zero when the hold time is not zero")]
    Keepalive { peer: Ipv4Addr, keepalive: Duration },
    #[error("BGP peer {peer}: TCP-MD5 password of {length} octets must have 1 to 80")]
    PasswordLength { peer: Ipv4Addr, length: usize },
    #[error("BGP peer {peer}: connect timeout must be above zero")]
    ConnectTimeout { peer: Ipv4Addr },
    #[error("BGP peer {peer} is configured twice")]
    DuplicatePeer { peer: Ipv4Addr },
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTER: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 1);
    const NODE: Ipv4Addr = Ipv4Addr::new(10, 201, 0, 2);

    fn peer() -> PeerConfig {
        PeerConfig::new(ROUTER, 65001, 65000, NODE, NODE)
    }

    #[test]
    fn defaults_are_hold_nine_seconds_and_keepalive_three() {
        let session = peer().session_config().unwrap();
        assert_eq!((session.hold_time, session.keepalive), (9, Duration::from_secs(3)));
        assert_eq!(peer().port, 179);
    }

    #[test]
    fn hold_times_of_one_or_two_or_fractional_seconds_are_refused() {
        for secs in [1.0, 2.0, 3.5, 65536.0] {
            let config = PeerConfig { hold_time: Duration::from_secs_f64(secs), ..peer() };
            assert!(matches!(config.session_config(), Err(ConfigError::HoldTime { .. })), "{secs}");
        }
        let zero = PeerConfig { hold_time: Duration::ZERO, ..peer() };
        assert_eq!(zero.session_config().unwrap().hold_time, 0);
    }

    #[test]
    fn a_zero_keepalive_with_a_hold_time_is_refused() {
        let config = PeerConfig { keepalive: Some(Duration::ZERO), ..peer() };
        assert_eq!(config.session_config(), Err(ConfigError::Keepalive { peer: ROUTER, keepalive: Duration::ZERO }));
    }

    #[test]
    fn passwords_must_fit_the_kernels_tcp_md5_key() {
        let long = PeerConfig { password: Some("x".repeat(81)), ..peer() };
        assert_eq!(long.session_config(), Err(ConfigError::PasswordLength { peer: ROUTER, length: 81 }));
        let empty = PeerConfig { password: Some(String::new()), ..peer() };
        assert!(empty.session_config().is_err());
        let ok = PeerConfig { password: Some("x".repeat(80)), ..peer() };
        assert!(ok.session_config().is_ok());
    }

    #[test]
    fn reserved_ases_and_a_zero_router_id_are_refused() {
        assert!(PeerConfig { local_as: 0, ..peer() }.session_config().is_err());
        assert!(PeerConfig { remote_as: 23456, ..peer() }.session_config().is_err());
        let no_id = PeerConfig { router_id: Ipv4Addr::UNSPECIFIED, ..peer() };
        assert_eq!(no_id.session_config(), Err(ConfigError::RouterId { peer: ROUTER }));
    }

    #[test]
    fn the_same_peer_twice_is_refused() {
        let config = SpeakerConfig::new(vec![peer(), peer()]);
        assert_eq!(config.session_configs(), Err(ConfigError::DuplicatePeer { peer: ROUTER }));
    }

    #[test]
    fn debug_output_never_shows_the_password() {
        let config = PeerConfig { password: Some("s3cret".into()), ..peer() };
        let text = format!("{config:?}");
        assert!(!text.contains("s3cret") && text.contains("<redacted>"), "{text}");
    }
}
