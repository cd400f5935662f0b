//! An announce-only BGP-4 speaker: it connects to routers (never listens on port 179),
//! advertises the VIP /32 prefixes it is given with the node as next hop, withdraws them
//! on request, and on shutdown leaves with a Cease so the routers drop its routes at once.
//!
//! - [`codec`]: the RFC 4271 wire format, decoded strictly and never panicking (fuzzed:
//!   `vip-bgp/fuzz`), cross-checked against netgauze-bgp-pkt in the tests.
//! - [`session`]: the RFC 4271 §8 finite state machine for one peer, without I/O.
//! - [`speaker`]: tokio tasks driving one session per peer over TCP with TCP-MD5 and
//!   `TCP_USER_TIMEOUT`, retrying with backoff, behind a [`speaker::SpeakerHandle`].
//!
//! What we advertise and accept:
//! - OPEN: version 4, Multiprotocol IPv4 unicast (RFC 4760) and 4-octet AS (RFC 6793)
//!   capabilities; deliberately no Graceful Restart (RFC 4724), so a router drops our
//!   routes as soon as the session ends, and no Route Refresh, Extended Message or
//!   ADD-PATH. Extended optional parameters (RFC 9072) are refused as unsupported.
//! - A peer without the 4-octet AS capability is accepted: our AS_PATH is then written
//!   with 2-octet ASes, [`codec::AS_TRANS`] standing in for an AS above 65535, whose real
//!   value goes in AS4_PATH (RFC 6793 §4.2.2).
//! - UPDATEs from the router are checked for framing (section lengths, attribute and
//!   prefix encoding) and dropped: we keep no Adj-RIB-In.

pub mod codec;
pub mod session;
pub mod speaker;

mod backoff;
