//! The host's network configuration through rtnetlink: the VIP on `lo`, the MAC of a
//! backend from the neighbour table, link state changes; and the ARP sysctls DSR needs.
//!
//! Everything this module changes it records, so that stopping undoes exactly what was
//! done and nothing an operator had configured before.

use std::{
    fs, io,
    net::{IpAddr, Ipv4Addr},
};

use futures::{StreamExt, TryStreamExt};
use rtnetlink::{
    packet_core::NetlinkPayload,
    packet_route::{
        address::AddressAttribute,
        link::{LinkAttribute, LinkFlags, LinkMessage},
        neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState},
        AddressFamily, RouteNetlinkMessage,
    },
    Handle, MulticastGroup,
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
    #[error("writing sysctl {path} failed")]
    Sysctl {
        path: String,
        #[source]
        source: io::Error,
    },
}

/// The label of the VIP addresses vip-agent puts on `lo` (labels must start with the
/// interface name).
pub const VIP_LABEL: &str = "lo:vip";

/// A connection to rtnetlink (its I/O runs as a task on the current runtime).
#[derive(Clone)]
pub struct Netlink {
    handle: Handle,
}

fn request(op: impl Into<String>) -> impl FnOnce(rtnetlink::Error) -> NetlinkError {
    let op = op.into();
    move |source| NetlinkError::Request { op, source }
}

fn loopback_index() -> Result<u32, NetlinkError> {
    crate::netdev::ifindex("lo").ok_or(NetlinkError::NoLoopback)
}

impl Netlink {
    pub fn connect() -> Result<Self, NetlinkError> {
        let (conn, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Socket)?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    /// The label (if any) of `vip`/32 on `lo`, or `None` if `lo` does not hold it.
    async fn vip_label_on_lo(&self, vip: Ipv4Addr) -> Result<Option<String>, NetlinkError> {
        let lo = loopback_index()?;
        let mut addrs =
            self.handle.address().get().set_link_index_filter(lo).set_address_filter(IpAddr::V4(vip)).execute();
        let Some(msg) = addrs.try_next().await.map_err(request(format!("listing addresses of lo for {vip}")))? else {
            return Ok(None);
        };
        let label = msg.attributes.iter().find_map(|a| match a {
            AddressAttribute::Label(l) => Some(l.clone()),
            _ => None,
        });
        Ok(Some(label.unwrap_or_default()))
    }

    /// Makes sure `lo` holds `vip`/32. An address vip-agent adds carries the label
    /// [`VIP_LABEL`], so that whichever agent stops last (after a hitless restart, not
    /// the one that added it) knows it may remove it, and an address an operator put
    /// there (no such label) is never touched. Returns whether the VIP is vip-agent's.
    pub async fn add_vip_to_lo(&self, vip: Ipv4Addr) -> Result<bool, NetlinkError> {
        if let Some(label) = self.vip_label_on_lo(vip).await? {
            debug!(%vip, %label, "VIP already on lo");
            return Ok(label == VIP_LABEL);
        }
        let lo = loopback_index()?;
        let mut add = self.handle.address().add(lo, IpAddr::V4(vip), 32);
        add.message_mut().attributes.push(AddressAttribute::Label(VIP_LABEL.to_owned()));
        add.execute().await.map_err(request(format!("adding {vip}/32 to lo")))?;
        info!(%vip, "VIP added to lo");
        Ok(true)
    }

    /// Removes `vip`/32 from `lo` if it is there.
    pub async fn remove_vip_from_lo(&self, vip: Ipv4Addr) -> Result<(), NetlinkError> {
        let lo = loopback_index()?;
        let mut addrs =
            self.handle.address().get().set_link_index_filter(lo).set_address_filter(IpAddr::V4(vip)).execute();
        while let Some(msg) = addrs.try_next().await.map_err(request(format!("listing addresses of lo for {vip}")))? {
            let is_vip =
                msg.attributes.iter().any(|a| matches!(a, AddressAttribute::Address(IpAddr::V4(a)) if *a == vip));
            if is_vip && msg.header.prefix_len == 32 {
                self.handle
                    .address()
                    .del(msg)
                    .execute()
                    .await
                    .map_err(request(format!("removing {vip}/32 from lo")))?;
                info!(%vip, "VIP removed from lo");
            }
        }
        Ok(())
    }

    /// Whether `ip` is an address of this host (on any interface): a backend with such an
    /// address is this node.
    pub async fn has_address(&self, ip: Ipv4Addr) -> Result<bool, NetlinkError> {
        let mut addrs = self.handle.address().get().set_address_filter(IpAddr::V4(ip)).execute();
        Ok(addrs.try_next().await.map_err(request(format!("looking up local address {ip}")))?.is_some())
    }

    /// The MAC address the neighbour table holds for `ip` on interface `ifindex`, if it
    /// has a usable entry (not failed or incomplete).
    pub async fn neighbour_mac(&self, ifindex: u32, ip: Ipv4Addr) -> Result<Option<[u8; 6]>, NetlinkError> {
        let mut neighbours = self.handle.neighbours().get().set_address_family(AddressFamily::Inet).execute();
        while let Some(msg) =
            neighbours.try_next().await.map_err(request(format!("reading the neighbour table for {ip}")))?
        {
            if msg.header.ifindex != ifindex
                || matches!(
                    msg.header.state,
                    NeighbourState::Failed | NeighbourState::Incomplete | NeighbourState::None
                )
            {
                continue;
            }
            let dest = msg.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(d)) => Some(*d),
                _ => None,
            });
            if dest != Some(ip) {
                continue;
            }
            let mac = msg.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::LinkLayerAddress(l) => <[u8; 6]>::try_from(l.as_slice()).ok(),
                _ => None,
            });
            if mac.is_some() {
                return Ok(mac);
            }
        }
        Ok(None)
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

/// Watches the interface named `name` and sends a [`LinkEvent`] on every change of its
/// usable state (not on every netlink message). Ends when the receiver is dropped.
pub fn watch_link(name: String) -> Result<mpsc::Receiver<LinkEvent>, NetlinkError> {
    let (conn, _handle, mut messages) =
        rtnetlink::new_multicast_connection(&[MulticastGroup::Link]).map_err(NetlinkError::Socket)?;
    tokio::spawn(conn);
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let mut last: Option<LinkEvent> = None;
        while let Some((msg, _)) = messages.next().await {
            let NetlinkPayload::InnerMessage(inner) = msg.payload else { continue };
            let event = match &inner {
                RouteNetlinkMessage::NewLink(link) if link_name(link) == Some(name.as_str()) => {
                    let up =
                        link.header.flags.contains(LinkFlags::Up) && link.header.flags.contains(LinkFlags::LowerUp);
                    if up {
                        LinkEvent::Up { ifindex: link.header.index }
                    } else {
                        LinkEvent::Down
                    }
                }
                RouteNetlinkMessage::DelLink(link) if link_name(link) == Some(name.as_str()) => LinkEvent::Gone,
                _ => continue,
            };
            if last.as_ref() != Some(&event) {
                debug!(interface = %name, ?event, "link state changed");
                last = Some(event.clone());
                if tx.send(event).await.is_err() {
                    return;
                }
            }
        }
        warn!(interface = %name, "link watch ended");
    });
    Ok(rx)
}

fn link_name(link: &LinkMessage) -> Option<&str> {
    link.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.as_str()),
        _ => None,
    })
}

/// ARP sysctls set for DSR, with the values they replaced.
#[derive(Debug, Default)]
pub struct ArpSysctls {
    saved: Vec<(String, String)>,
}

impl ArpSysctls {
    /// Sets `arp_ignore=1` and `arp_announce=2` for `all` and `interface`, so the kernel
    /// never answers ARP for (or announces) the VIP it holds on `lo`: only the data
    /// plane's leader does. Records the previous values.
    pub fn apply(interface: &str) -> Result<Self, NetlinkError> {
        let mut me = Self::default();
        for scope in ["all", interface] {
            for (key, value) in [("arp_ignore", "1"), ("arp_announce", "2")] {
                let path = format!("/proc/sys/net/ipv4/conf/{scope}/{key}");
                let err = |source| NetlinkError::Sysctl { path: path.clone(), source };
                let old = fs::read_to_string(&path).map_err(err)?.trim().to_owned();
                if old != value {
                    fs::write(&path, value).map_err(err)?;
                    me.saved.push((path.clone(), old));
                }
            }
        }
        Ok(me)
    }

    /// Puts back what [`ArpSysctls::apply`] changed.
    pub fn restore(&mut self) -> Result<(), NetlinkError> {
        for (path, old) in self.saved.drain(..).rev() {
            fs::write(&path, &old).map_err(|source| NetlinkError::Sysctl { path: path.clone(), source })?;
        }
        Ok(())
    }
}
