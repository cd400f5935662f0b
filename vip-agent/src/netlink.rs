//! The host's network configuration through rtnetlink: the VIP on `lo`, the addresses
//! of the host, the MAC of a backend from the neighbour table, and the changes of the
//! watched interface and of the VIP addresses.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use futures::{StreamExt, TryStreamExt};
use rtnetlink::packet_core::DefaultNla;
use rtnetlink::{
    packet_core::NetlinkPayload,
    packet_route::{
        address::{AddressAttribute, AddressProtocol, CacheInfo},
        link::{AfSpecInet, AfSpecUnspec, LinkAttribute, LinkFlags, LinkMessage, LinkXdp},
        neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState},
        route::{RouteAddress, RouteAttribute, RouteMetric},
        AddressFamily, RouteNetlinkMessage,
    },
    Handle, LinkUnspec, MulticastGroup, RouteMessageBuilder,
};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("opening a netlink socket failed")]
    Socket(#[source] io::Error),
    #[error("{op} failed")]
    Request {
        op: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("interface \"lo\" not found")]
    NoLoopback,
    #[error("{op}: no answer within {timeout:?}")]
    Timeout { op: String, timeout: std::time::Duration },
    #[error(
        "the kernel kept no address protocol on {vip}/128 (IFA_PROTO, Linux 6.1): vip-agent could not tell \
         its IPv6 VIP from an operator's address later; IPv6 VIPs need Linux 6.1 or later"
    )]
    Unmarked { vip: IpAddr },
}

/// Dumps (neighbour, route, address tables) in flight at once on one connection. Each
/// health check may ask for one; with hundreds of backends they would all be answered
/// at once into one socket buffer (whose overflow loses answers).
const MAX_DUMPS: usize = 4;
/// How long one request may take before it fails instead of hanging its caller.
const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// The label of the VIP addresses vip-agent puts on `lo` (labels must start with the
/// interface name).
pub const VIP_LABEL: &str = "lo:vip";

/// The address protocol (`IFA_PROTO`, Linux 6.1) vip-agent marks its IPv6 VIPs on `lo`
/// with: IPv6 addresses have no labels. The kernel's own values are 1 to 3
/// (`IFAPROT_KERNEL_*`); the rest are left to users.
pub const VIP_ADDR_PROTO: u8 = 0xa7;

/// Whether an address's attributes carry vip-agent's mark: the label [`VIP_LABEL`]
/// (IPv4) or the protocol [`VIP_ADDR_PROTO`] (IPv6).
fn is_ours(attributes: &[AddressAttribute]) -> bool {
    attributes.iter().any(|a| match a {
        AddressAttribute::Label(l) => l == VIP_LABEL,
        AddressAttribute::Protocol(p) => u8::from(*p) == VIP_ADDR_PROTO,
        _ => false,
    })
}

/// The prefix length of a host address: /32 or /128.
fn host_prefix(ip: IpAddr) -> u8 {
    if ip.is_ipv4() {
        32
    } else {
        128
    }
}

/// A connection to rtnetlink (its I/O runs as a task on the current runtime).
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
    /// Bounds the dumps in flight ([`MAX_DUMPS`]).
    dumps: std::sync::Arc<tokio::sync::Semaphore>,
}

fn request(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    let op = op.into();
    move |source| NetlinkError::Request { op, source }
}

/// The first item of a netlink response `stream` that `pick` maps to a value, the
/// response read to its end. A response dropped before its end (a dump, or a filtered
/// one: rtnetlink filters addresses after the kernel dumps them) makes netlink-proto warn
/// once per message it can no longer deliver ("failed to forward response back to the
/// handle"): hundreds a minute with the per-check neighbour lookups of IPIP.
async fn first_match<T, U>(
    stream: impl futures::Stream<Item = Result<T, rtnetlink::Error>>,
    op: impl Fn() -> String,
    mut pick: impl FnMut(T) -> Option<U>,
) -> Result<Option<U>, NetlinkError> {
    futures::pin_mut!(stream);
    let mut found = None;
    while let Some(item) = stream.try_next().await.map_err(request(op()))? {
        if found.is_none() {
            found = pick(item);
        }
    }
    Ok(found)
}

fn loopback_index() -> Result<u32, NetlinkError> {
    crate::netdev::ifindex("lo").ok_or(NetlinkError::NoLoopback)
}

impl Netlink {
    pub fn connect() -> Result<Self, NetlinkError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Socket)?;
        tokio::spawn(conn);
        Ok(Self { handle, dumps: std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_DUMPS)) })
    }

    /// Runs the dump `fut` once fewer than [`MAX_DUMPS`] are in flight, failing after
    /// [`REQUEST_TIMEOUT`].
    async fn bounded<T>(
        &self,
        op: impl Fn() -> String,
        fut: impl std::future::Future<Output = Result<T, NetlinkError>>,
    ) -> Result<T, NetlinkError> {
        let timeout = REQUEST_TIMEOUT;
        let run = async {
            let _permit = self.dumps.acquire().await.map_err(|_| NetlinkError::Timeout { op: op(), timeout })?;
            fut.await
        };
        tokio::time::timeout(timeout, run).await.map_err(|_| NetlinkError::Timeout { op: op(), timeout })?
    }

    /// Whether `lo` holds `vip` (`None`: it does not), and if so whether vip-agent put
    /// it there ([`is_ours`]).
    async fn vip_on_lo(&self, vip: IpAddr) -> Result<Option<bool>, NetlinkError> {
        let lo = loopback_index()?;
        let addrs = self.handle.address().get().set_link_index_filter(lo).set_address_filter(vip).execute();
        first_match(addrs, || format!("listing addresses of lo for {vip}"), |msg| Some(is_ours(&msg.attributes))).await
    }

    /// Whether `lo` holds `vip`.
    pub async fn has_vip_on_lo(&self, vip: IpAddr) -> Result<bool, NetlinkError> {
        Ok(self.vip_on_lo(vip).await?.is_some())
    }

    /// Makes sure `lo` holds `vip` as a host address (/32, /128). An address vip-agent
    /// adds carries its mark ([`VIP_LABEL`] on IPv4, [`VIP_ADDR_PROTO`] on IPv6), so that
    /// whichever agent stops last (after a hitless restart, not the one that added it)
    /// knows it may remove it, and an address an operator put there (unmarked) is never
    /// touched. Returns whether the VIP is vip-agent's.
    pub async fn add_vip_to_lo(&self, vip: IpAddr) -> Result<bool, NetlinkError> {
        if let Some(ours) = self.vip_on_lo(vip).await? {
            debug!(%vip, ours, "VIP already on lo");
            return Ok(ours);
        }
        let lo = loopback_index()?;
        let mut add = self.handle.address().add(lo, vip, host_prefix(vip));
        let attributes = &mut add.message_mut().attributes;
        match vip {
            IpAddr::V4(_) => attributes.push(AddressAttribute::Label(VIP_LABEL.to_owned())),
            IpAddr::V6(_) => {
                attributes.push(AddressAttribute::Protocol(AddressProtocol::Other(VIP_ADDR_PROTO)));
                // Deprecated from the start (preferred lifetime 0, valid forever): the
                // node never picks the VIP as the source of its own connections (RFC 6724
                // rule 3), which on a node whose interface has no global IPv6 address it
                // otherwise would, and the answers would go to the leader. Traffic to the
                // VIP, and the answers of connections made to it, are not affected.
                let mut lifetimes = CacheInfo::default();
                lifetimes.ifa_preferred = 0;
                lifetimes.ifa_valid = u32::MAX;
                attributes.push(AddressAttribute::CacheInfo(lifetimes));
            }
        }
        add.execute().await.map_err(request(format!("adding {vip}/{} to lo", host_prefix(vip))))?;
        if vip.is_ipv6() && self.vip_on_lo(vip).await? != Some(true) {
            self.remove_vip_from_lo(vip).await?;
            return Err(NetlinkError::Unmarked { vip });
        }
        info!(%vip, "VIP added to lo");
        Ok(true)
    }

    /// Removes `vip` (as a host address) from `lo` if it is there.
    pub async fn remove_vip_from_lo(&self, vip: IpAddr) -> Result<(), NetlinkError> {
        let lo = loopback_index()?;
        let prefix = host_prefix(vip);
        let mut addrs = self.handle.address().get().set_link_index_filter(lo).set_address_filter(vip).execute();
        while let Some(msg) = addrs.try_next().await.map_err(request(format!("listing addresses of lo for {vip}")))? {
            let is_vip = msg.attributes.iter().any(|a| matches!(a, AddressAttribute::Address(a) if *a == vip));
            if is_vip && msg.header.prefix_len == prefix {
                self.handle
                    .address()
                    .del(msg)
                    .execute()
                    .await
                    .map_err(request(format!("removing {vip}/{prefix} from lo")))?;
                info!(%vip, "VIP removed from lo");
            }
        }
        Ok(())
    }

    /// The interfaces that hold `ip` (index), and whether vip-agent put it there.
    pub async fn holders_of(&self, ip: IpAddr) -> Result<Vec<(u32, bool)>, NetlinkError> {
        let mut addrs = self.handle.address().get().set_address_filter(ip).execute();
        let mut out = Vec::new();
        while let Some(msg) = addrs.try_next().await.map_err(request(format!("looking up local address {ip}")))? {
            out.push((msg.header.index, is_ours(&msg.attributes)));
        }
        Ok(out)
    }

    /// The addresses on `lo` that carry vip-agent's mark ([`is_ours`]).
    pub async fn labelled_vips(&self) -> Result<Vec<IpAddr>, NetlinkError> {
        let lo = loopback_index()?;
        let mut addrs = self.handle.address().get().set_link_index_filter(lo).execute();
        let mut out = Vec::new();
        while let Some(msg) = addrs.try_next().await.map_err(request("listing addresses of lo"))? {
            let addr = msg.attributes.iter().find_map(|a| match a {
                AddressAttribute::Address(a) => Some(*a),
                _ => None,
            });
            if let (true, Some(a)) = (is_ours(&msg.attributes), addr) {
                out.push(a);
            }
        }
        Ok(out)
    }

    /// The id of the XDP program attached to interface `ifindex`, if any (any mode).
    pub async fn xdp_program(&self, ifindex: u32) -> Result<Option<u32>, NetlinkError> {
        self.xdp_attribute(ifindex, |x| match x {
            LinkXdp::ProgId(id) if *id != 0 => Some(*id),
            _ => None,
        })
        .await
    }

    /// How the XDP program on interface `ifindex` is attached (`IFLA_XDP_ATTACHED`):
    /// `native` (the driver's hook), `skb` (generic XDP: the driver has none, as a VLAN
    /// device, a bridge or a VXLAN device), `hw`, or `None` with no program.
    pub async fn xdp_mode(&self, ifindex: u32) -> Result<Option<&'static str>, NetlinkError> {
        use rtnetlink::packet_route::link::XdpAttached;
        self.xdp_attribute(ifindex, |x| match x {
            LinkXdp::Attached(XdpAttached::Driver) => Some("native"),
            LinkXdp::Attached(XdpAttached::SocketBuffer) => Some("skb"),
            LinkXdp::Attached(XdpAttached::Hardware) => Some("hw"),
            LinkXdp::Attached(XdpAttached::Multiple) => Some("multiple"),
            _ => None,
        })
        .await
    }

    /// The first of interface `ifindex`'s `IFLA_XDP` attributes `pick` maps to a value.
    async fn xdp_attribute<T>(
        &self,
        ifindex: u32,
        pick: impl Fn(&LinkXdp) -> Option<T>,
    ) -> Result<Option<T>, NetlinkError> {
        let mut links = self.handle.link().get().match_index(ifindex).execute();
        let op = || format!("reading the XDP attachment of interface #{ifindex}");
        let Some(link) = links.try_next().await.map_err(request(op()))? else { return Ok(None) };
        Ok(link.attributes.iter().find_map(|a| match a {
            LinkAttribute::Xdp(xdp) => xdp.iter().find_map(&pick),
            _ => None,
        }))
    }

    /// Sets one IPv4 setting of interface `ifindex` (`net.ipv4.conf.<if>.*`, index from
    /// the kernel's `IPV4_DEVCONF_*`) through rtnetlink: `RTM_SETLINK` with
    /// `IFLA_AF_SPEC/AF_INET/IFLA_INET_CONF`, which needs only CAP_NET_ADMIN — the way
    /// when `/proc/sys` is read-only, as it is in a container.
    pub async fn set_ipv4_devconf(&self, ifindex: u32, index: u16, value: u32) -> Result<(), NetlinkError> {
        /// `IFLA_INET_CONF` (include/uapi/linux/if_link.h), nested.
        const IFLA_INET_CONF_NESTED: u16 = 1 | 0x8000;
        let mut inner = Vec::with_capacity(8);
        inner.extend(8u16.to_ne_bytes());
        inner.extend(index.to_ne_bytes());
        inner.extend(value.to_ne_bytes());
        let conf = DefaultNla::new(IFLA_INET_CONF_NESTED, inner);
        let attr = LinkAttribute::AfSpecUnspec(vec![AfSpecUnspec::Inet(vec![AfSpecInet::Other(conf)])]);
        let msg = LinkUnspec::new_with_index(ifindex).append_extra_attribute(attr).build();
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(request(format!("setting IPv4 setting {index} of interface #{ifindex} to {value}")))
    }

    /// Whether `ip` is an address of this host (on any interface): a backend with such an
    /// address is this node.
    pub async fn has_address(&self, ip: Ipv4Addr) -> Result<bool, NetlinkError> {
        let op = || format!("looking up local address {ip}");
        self.bounded(op, async {
            let addrs = self.handle.address().get().set_address_filter(IpAddr::V4(ip)).execute();
            Ok(first_match(addrs, op, Some).await?.is_some())
        })
        .await
    }

    /// This node's IPv6 address on interface `ifindex` to send VIP-path probes from: a
    /// global one (scope universe) that is usable (neither tentative nor failed
    /// duplicate address detection), one still preferred if there is one. `None`: no such
    /// address (an IPv4-only interface, or one whose address a network manager removed).
    pub async fn probe_source6(&self, ifindex: u32) -> Result<Option<Ipv6Addr>, NetlinkError> {
        use rtnetlink::packet_route::address::{AddressFlags, AddressScope};
        let op = || format!("listing the IPv6 addresses of interface #{ifindex}");
        self.bounded(op, async {
            let addrs = self.handle.address().get().set_link_index_filter(ifindex).execute();
            futures::pin_mut!(addrs);
            // (address, preferred) of the best seen so far.
            let mut best: Option<(Ipv6Addr, bool)> = None;
            while let Some(msg) = addrs.try_next().await.map_err(request(op()))? {
                if msg.header.family != AddressFamily::Inet6 || msg.header.scope != AddressScope::Universe {
                    continue;
                }
                let flags = msg.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Flags(f) => Some(*f),
                    _ => None,
                });
                let flags = flags.unwrap_or_else(|| AddressFlags::from_bits_truncate(msg.header.flags.bits().into()));
                if flags.intersects(AddressFlags::Tentative | AddressFlags::Dadfailed) {
                    continue;
                }
                let addr = msg.attributes.iter().find_map(|a| match a {
                    AddressAttribute::Address(IpAddr::V6(ip)) => Some(*ip),
                    _ => None,
                });
                let preferred = !flags.contains(AddressFlags::Deprecated);
                if let Some(ip) = addr {
                    if best.is_none_or(|(_, was)| preferred && !was) {
                        best = Some((ip, preferred));
                    }
                }
            }
            Ok(best.map(|(ip, _)| ip))
        })
        .await
    }

    /// The MAC address the neighbour table holds for `ip` on interface `ifindex`, if it
    /// has a usable entry (not failed or incomplete).
    pub async fn neighbour_mac(&self, ifindex: u32, ip: Ipv4Addr) -> Result<Option<[u8; 6]>, NetlinkError> {
        self.bounded(|| format!("reading the neighbour table for {ip}"), self.neighbour_mac_unbounded(ifindex, ip))
            .await
    }

    async fn neighbour_mac_unbounded(&self, ifindex: u32, ip: Ipv4Addr) -> Result<Option<[u8; 6]>, NetlinkError> {
        let neighbours = self.handle.neighbours().get().set_address_family(AddressFamily::Inet).execute();
        let usable = |msg: &rtnetlink::packet_route::neighbour::NeighbourMessage| {
            msg.header.ifindex == ifindex
                && !matches!(
                    msg.header.state,
                    NeighbourState::Failed | NeighbourState::Incomplete | NeighbourState::None
                )
                && msg
                    .attributes
                    .iter()
                    .any(|a| matches!(a, NeighbourAttribute::Destination(NeighbourAddress::Inet(d)) if *d == ip))
        };
        let mac_of = |msg: rtnetlink::packet_route::neighbour::NeighbourMessage| {
            msg.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::LinkLayerAddress(l) => <[u8; 6]>::try_from(l.as_slice()).ok(),
                _ => None,
            })
        };
        let op = || format!("reading the neighbour table for {ip}");
        first_match(neighbours, op, |msg| if usable(&msg) { mac_of(msg) } else { None }).await
    }
}

/// Where this node sends packets for an IPIP backend: the next hop's MAC on the
/// interface (the backend's, or its router's) and the route's MTU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Nexthop {
    pub mac: [u8; 6],
    /// The route's `mtu` metric, else the interface's MTU.
    pub mtu: u16,
}

impl Netlink {
    /// The next hop towards `ip` out of interface `ifindex`, as `ip route get IP oif IF`
    /// and the neighbour table say: `None` when the route leaves by another interface or
    /// the next hop's MAC is not resolved (yet).
    pub async fn nexthop(&self, ifindex: u32, ip: Ipv4Addr) -> Result<Option<Nexthop>, NetlinkError> {
        self.bounded(|| format!("resolving the next hop to {ip}"), self.nexthop_unbounded(ifindex, ip)).await
    }

    async fn nexthop_unbounded(&self, ifindex: u32, ip: Ipv4Addr) -> Result<Option<Nexthop>, NetlinkError> {
        let query = RouteMessageBuilder::<Ipv4Addr>::new().destination_prefix(ip, 32).output_interface(ifindex).build();
        let mut routes = self.handle.route().get(query).execute();
        let Some(route) = routes.try_next().await.map_err(request(format!("looking up the route to {ip}")))? else {
            return Ok(None);
        };
        let mut via = ip;
        let (mut oif, mut mtu) = (None, None);
        for attr in &route.attributes {
            match attr {
                RouteAttribute::Gateway(RouteAddress::Inet(g)) => via = *g,
                RouteAttribute::Oif(i) => oif = Some(*i),
                RouteAttribute::Metrics(m) => {
                    mtu = m.iter().find_map(|m| match m {
                        RouteMetric::Mtu(v) if *v > 0 => Some(*v),
                        _ => None,
                    })
                }
                _ => {}
            }
        }
        if oif != Some(ifindex) {
            return Ok(None);
        }
        let mtu = match mtu {
            Some(m) => m,
            None => match self.link_mtu(ifindex).await? {
                Some(m) => m,
                None => return Ok(None),
            },
        };
        let Some(mac) = self.neighbour_mac(ifindex, via).await? else { return Ok(None) };
        Ok(Some(Nexthop { mac, mtu: u16::try_from(mtu).unwrap_or(u16::MAX) }))
    }

    /// The interface the route to `ip` leaves by (`ip route get IP`'s `dev`), if there is
    /// a route.
    pub async fn route_interface(&self, ip: Ipv4Addr) -> Result<Option<u32>, NetlinkError> {
        let lookup = async {
            let query = RouteMessageBuilder::<Ipv4Addr>::new().destination_prefix(ip, 32).build();
            let mut routes = self.handle.route().get(query).execute();
            let route = routes.try_next().await.map_err(request(format!("looking up the route to {ip}")))?;
            Ok(route.and_then(|r| {
                r.attributes.iter().find_map(|a| match a {
                    RouteAttribute::Oif(i) => Some(*i),
                    _ => None,
                })
            }))
        };
        self.bounded(|| format!("looking up the route to {ip}"), lookup).await
    }

    /// The MTU of interface `ifindex`.
    async fn link_mtu(&self, ifindex: u32) -> Result<Option<u32>, NetlinkError> {
        let mut links = self.handle.link().get().match_index(ifindex).execute();
        let Some(link) = links.try_next().await.map_err(request(format!("reading the MTU of interface #{ifindex}")))?
        else {
            return Ok(None);
        };
        Ok(link.attributes.iter().find_map(|a| match a {
            LinkAttribute::Mtu(m) => Some(*m),
            _ => None,
        }))
    }
}

/// A change of the watched interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkEvent {
    /// The link is up with carrier (`IFF_UP` and `IFF_LOWER_UP`); `ifindex` may differ
    /// from before if the interface was recreated.
    Up { ifindex: u32 },
    /// The link lost `IFF_UP` or carrier.
    Down,
    /// The interface was deleted.
    Gone,
}

/// A change the agent watches the host for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostEvent {
    /// The watched interface's usable state changed.
    Link(LinkEvent),
    /// An address was removed from `lo` (a network manager, an operator).
    LoAddressRemoved(IpAddr),
}

/// Watches the interface named `name` (a [`HostEvent::Link`] on every change of its
/// usable state, not on every netlink message) and the addresses removed from `lo`. Ends when the receiver is dropped.
pub fn watch_host(name: String) -> Result<mpsc::Receiver<HostEvent>, NetlinkError> {
    let (conn, _handle, mut messages) = rtnetlink::new_multicast_connection(&[
        MulticastGroup::Link,
        MulticastGroup::Ipv4Ifaddr,
        MulticastGroup::Ipv6Ifaddr,
    ])
    .map_err(NetlinkError::Socket)?;
    tokio::spawn(conn);
    let lo = loopback_index()?;
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let mut last: Option<LinkEvent> = None;
        while let Some((msg, _)) = messages.next().await {
            let NetlinkPayload::InnerMessage(inner) = msg.payload else { continue };
            let event = match &inner {
                RouteNetlinkMessage::NewLink(link) if link_name(link) == Some(name.as_str()) => {
                    let up =
                        link.header.flags.contains(LinkFlags::Up) && link.header.flags.contains(LinkFlags::LowerUp);
                    let e = if up { LinkEvent::Up { ifindex: link.header.index } } else { LinkEvent::Down };
                    if last.as_ref() == Some(&e) {
                        continue;
                    }
                    last = Some(e.clone());
                    HostEvent::Link(e)
                }
                RouteNetlinkMessage::DelLink(link) if link_name(link) == Some(name.as_str()) => {
                    last = Some(LinkEvent::Gone);
                    HostEvent::Link(LinkEvent::Gone)
                }
                RouteNetlinkMessage::DelAddress(a) if a.header.index == lo => {
                    let Some(addr) = a.attributes.iter().find_map(|x| match x {
                        AddressAttribute::Address(v) => Some(*v),
                        _ => None,
                    }) else {
                        continue;
                    };
                    HostEvent::LoAddressRemoved(addr)
                }
                _ => continue,
            };
            debug!(interface = %name, ?event, "host changed");
            if tx.send(event).await.is_err() {
                return;
            }
        }
        warn!(interface = %name, "host watch ended");
    });
    Ok(rx)
}

fn link_name(link: &LinkMessage) -> Option<&str> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}
