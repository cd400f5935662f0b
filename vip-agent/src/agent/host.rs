//! Host state the agent sets up and owns: the VIPs on `lo` (every node delivers VIP
//! traffic through its own stack), the interface's ARP sysctls (the kernel must never
//! answer ARP for the VIPs it holds: only the data plane's leader does), and forwarding
//! on the interface in IPIP mode (the FIB refuses output lookups without it).
//!
//! Applied at start, watched (netlink) and re-checked (every tick), and put back when
//! something else changed it — a network manager removing addresses, a sysctl reset —
//! each repair logged and counted; undone on stop, leaving what an operator had
//! configured before.

use std::{fs, io, net::IpAddr};

use tracing::{debug, error, info, warn};

use crate::netlink::{Netlink, NetlinkError};

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
    #[error("sysctl {path}")]
    Sysctl {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "--vip {vip} is already an address of interface {interface} on this host: a VIP must be an address no host has"
    )]
    VipIsHostAddress { vip: IpAddr, interface: String },
    #[error(
        "net.ipv4.conf.all.arp_ignore is {value}: the kernel would answer ARP for the VIPs it holds on lo; \
         set it to 0, 1 or 2"
    )]
    ArpIgnoreAll { value: String },
}

/// What a repair put back: the label of `vip_host_repairs_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Repair {
    VipAddress,
    ArpSysctl,
    Forwarding,
}

impl Repair {
    pub const fn name(self) -> &'static str {
        match self {
            Repair::VipAddress => "vip_address",
            Repair::ArpSysctl => "arp_sysctl",
            Repair::Forwarding => "forwarding",
        }
    }
}

/// A sysctl rule: which values of (`all`, the interface) are acceptable, and what to
/// write to the interface's when they are not.
struct Rule {
    key: &'static str,
    /// The setting's `IPV4_DEVCONF_*` index (include/uapi/linux/ip.h), for writing it over
    /// rtnetlink when `/proc/sys` is read-only.
    devconf: u16,
    ok: fn(u32, u32) -> bool,
    want: &'static str,
    repair: Repair,
}

/// `arp_ignore`: the kernel uses max(all, interface). 1 (reply only for addresses of the
/// interface), 2 (and only from its subnet) and 8 (never) all keep it from answering for
/// the VIPs on `lo`; 0, 3 (any global address) and the reserved 4–7 do not.
const ARP_IGNORE: Rule = Rule {
    key: "arp_ignore",
    devconf: 19,
    ok: |all, dev| matches!(all.max(dev), 1 | 2 | 8),
    want: "1",
    repair: Repair::ArpSysctl,
};
/// `arp_announce`: max(all, interface) must be 2, so requests the node sends never
/// carry a VIP as their source.
const ARP_ANNOUNCE: Rule =
    Rule { key: "arp_announce", devconf: 18, ok: |all, dev| all.max(dev) >= 2, want: "2", repair: Repair::ArpSysctl };
/// `forwarding` of the interface (IPIP): `bpf_fib_lookup` answers FWD_DISABLED without it.
const FORWARDING: Rule =
    Rule { key: "forwarding", devconf: 1, ok: |_, dev| dev == 1, want: "1", repair: Repair::Forwarding };

/// Where each rule's original value sits in [`Host::saved_code`]: shift, width.
const SAVED_FIELDS: [(u8, u8, &Rule); 3] = [(0, 4, &ARP_IGNORE), (4, 2, &ARP_ANNOUNCE), (6, 2, &FORWARDING)];

fn path(scope: &str, key: &str) -> String {
    format!("/proc/sys/net/ipv4/conf/{scope}/{key}")
}

fn read(path: &str) -> Result<String, HostError> {
    fs::read_to_string(path)
        .map(|v| v.trim().to_owned())
        .map_err(|source| HostError::Sysctl { path: path.to_owned(), source })
}

/// The name of interface `ifindex`.
fn ifname(ifindex: u32) -> String {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf has IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return format!("#{ifindex}");
    }
    // SAFETY: on success buf holds a NUL-terminated name.
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned()
}

/// The host state the agent owns.
pub struct Host {
    nl: Netlink,
    interface: String,
    vips: Vec<IpAddr>,
    ipip: bool,
    /// VIPs on `lo` under vip-agent's mark: removed on stop.
    owned: Vec<IpAddr>,
    /// Sysctls this agent changed (path, `IPV4_DEVCONF_*` index), with the values they
    /// replaced.
    saved: Vec<(String, u16, String)>,
}

impl Host {
    pub fn new(nl: Netlink, interface: &str, vips: &[IpAddr], ipip: bool) -> Self {
        Self { nl, interface: interface.to_owned(), vips: vips.to_vec(), ipip, owned: Vec::new(), saved: Vec::new() }
    }

    /// Refuses, before anything changes, what would take a host's address or leave the
    /// kernel answering for the VIPs: a VIP that is an address of this host (but a VIP
    /// vip-agent itself put on `lo`), an `all.arp_ignore` no interface value can fix.
    pub async fn preflight(&self) -> Result<(), HostError> {
        let lo = crate::netdev::ifindex("lo");
        for &vip in &self.vips {
            for (ifindex, ours) in self.nl.holders_of(vip).await? {
                if Some(ifindex) == lo && ours {
                    continue;
                }
                return Err(HostError::VipIsHostAddress { vip, interface: ifname(ifindex) });
            }
        }
        let all = read(&path("all", ARP_IGNORE.key))?;
        if !(ARP_IGNORE.ok)(all.parse().unwrap_or(0), 1) {
            return Err(HostError::ArpIgnoreAll { value: all });
        }
        Ok(())
    }

    fn rules(&self) -> Vec<&'static Rule> {
        let mut r = vec![&ARP_IGNORE, &ARP_ANNOUNCE];
        if self.ipip {
            r.push(&FORWARDING);
        }
        r
    }

    /// Puts `rule` right; returns whether it had to write.
    async fn ensure(&mut self, rule: &Rule) -> Result<bool, HostError> {
        let all: u32 = read(&path("all", rule.key))?.parse().unwrap_or(0);
        let p = path(&self.interface, rule.key);
        let old = read(&p)?;
        if (rule.ok)(all, old.parse().unwrap_or(0)) {
            return Ok(false);
        }
        self.set(&p, rule.devconf, rule.want).await?;
        if !self.saved.iter().any(|(s, ..)| *s == p) {
            self.saved.push((p.clone(), rule.devconf, old.clone()));
        }
        info!(sysctl = %p, from = %old, to = rule.want, "sysctl set");
        Ok(true)
    }

    /// Writes the interface's setting at `path` (`devconf` index): through `/proc/sys`,
    /// or, where that is read-only (a container), through rtnetlink.
    async fn set(&self, path: &str, devconf: u16, value: &str) -> Result<(), HostError> {
        match fs::write(path, value) {
            Ok(()) => Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EROFS) => {
                let ifindex = crate::netdev::ifindex(&self.interface)
                    .ok_or_else(|| HostError::Sysctl { path: path.to_owned(), source: e })?;
                let v: u32 = value.parse().unwrap_or(0);
                Ok(self.nl.set_ipv4_devconf(ifindex, devconf, v).await?)
            }
            Err(source) => Err(HostError::Sysctl { path: path.to_owned(), source }),
        }
    }

    /// Sets the sysctls, then makes sure `lo` holds every VIP (recording which are
    /// vip-agent's to remove on stop). Records what it changed before any later step can
    /// fail, so a failed start undoes exactly that.
    pub async fn apply(&mut self) -> Result<(), HostError> {
        for rule in self.rules() {
            if self.ensure(rule).await? && rule.repair == Repair::Forwarding {
                info!(interface = %self.interface, "IPIP: forwarding enabled on the interface (the FIB refuses output lookups without it)");
            }
        }
        for vip in self.vips.clone() {
            if self.nl.add_vip_to_lo(vip).await? && !self.owned.contains(&vip) {
                self.owned.push(vip);
            }
        }
        Ok(())
    }

    /// Removes VIPs a previous agent put on `lo` that this one does not serve.
    pub async fn remove_stale_vips(&mut self) -> Result<(), HostError> {
        for addr in self.nl.labelled_vips().await? {
            if !self.vips.contains(&addr) {
                info!(vip = %addr, "VIP on lo no longer configured: removing it");
                self.nl.remove_vip_from_lo(addr).await?;
            }
        }
        Ok(())
    }

    /// Checks everything this agent set up and puts back what changed.
    pub async fn repair(&mut self) -> Vec<Repair> {
        let mut done = Vec::new();
        for rule in self.rules() {
            match self.ensure(rule).await {
                Ok(true) => {
                    warn!(sysctl = %path(&self.interface, rule.key), "sysctl was changed behind the agent: put back");
                    done.push(rule.repair);
                }
                Ok(false) => {}
                Err(e) => error!(error = %e, "checking a sysctl failed"),
            }
        }
        for vip in self.owned.clone() {
            if let Some(r) = self.restore_vip(vip).await {
                done.push(r);
            }
        }
        done
    }

    /// `addr` left `lo`: if it is one of our VIPs, put it back at once.
    pub async fn on_lo_address_removed(&mut self, addr: IpAddr) -> Option<Repair> {
        if !self.owned.contains(&addr) {
            return None;
        }
        self.restore_vip(addr).await
    }

    async fn restore_vip(&mut self, vip: IpAddr) -> Option<Repair> {
        match self.nl.has_vip_on_lo(vip).await {
            Ok(true) => None,
            Ok(false) => match self.nl.add_vip_to_lo(vip).await {
                Ok(_) => {
                    warn!(%vip, "the VIP was removed from lo behind the agent: put back");
                    Some(Repair::VipAddress)
                }
                Err(e) => {
                    error!(error = %e, %vip, "putting the VIP back on lo failed");
                    None
                }
            },
            Err(e) => {
                error!(error = %e, %vip, "checking the VIP on lo failed");
                None
            }
        }
    }

    /// The interface sysctls changed on this node, with the values they replaced, packed
    /// into one byte for the next agent ([`vip_common::Config::host_saved`]): each rule
    /// its original value plus one in its field (0: not changed), `arp_ignore` in bits
    /// 0–3, `arp_announce` in 4–5, `forwarding` in 6–7. Every value a rule replaces fits
    /// (it replaces only values that fail it: `arp_ignore` 0 or 3–7, `arp_announce` 0–1,
    /// `forwarding` 0); one that does not is left out, and not restored after a kept
    /// restart.
    pub fn saved_code(&self) -> u8 {
        let mut code = 0u8;
        for (shift, bits, rule) in SAVED_FIELDS {
            let p = path(&self.interface, rule.key);
            let Some((.., old)) = self.saved.iter().find(|(s, ..)| *s == p) else { continue };
            match old.parse::<u8>().ok().map(|v| v + 1).filter(|v| *v < 1 << bits) {
                Some(v) => code |= v << shift,
                None => debug!(sysctl = %p, value = %old, "original value not carried to the next agent"),
            }
        }
        code
    }

    /// Takes over the originals a previous agent on this interface recorded
    /// ([`Host::saved_code`]), before [`Host::apply`]: the values it finds were that
    /// agent's, and a clean stop restores the ones the first agent found.
    pub fn inherit(&mut self, code: u8) {
        for (shift, bits, rule) in SAVED_FIELDS {
            let v = (code >> shift) & ((1 << bits) - 1);
            let p = path(&self.interface, rule.key);
            if v != 0 && !self.saved.iter().any(|(s, ..)| *s == p) {
                info!(sysctl = %p, original = v - 1, "the previous agent's original value, restored on a clean stop");
                self.saved.push((p, rule.devconf, (v - 1).to_string()));
            }
        }
    }

    /// Undoes what [`Host::apply`] did: VIPs it added, sysctls it changed.
    pub async fn undo(&mut self) {
        for vip in std::mem::take(&mut self.owned) {
            if let Err(e) = self.nl.remove_vip_from_lo(vip).await {
                error!(error = %e, %vip, "removing the VIP from lo failed");
            }
        }
        for (p, devconf, old) in std::mem::take(&mut self.saved).into_iter().rev() {
            match self.set(&p, devconf, &old).await {
                Ok(()) => info!(sysctl = %p, to = %old, "sysctl restored"),
                Err(e) => error!(error = %e, sysctl = %p, "restoring a sysctl failed"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A host on `eth0` (netlink is not used by the code under test; a handle still
    /// needs a socket, and a runtime for its connection).
    fn host() -> Host {
        Host::new(Netlink::connect().unwrap(), "eth0", &[], true)
    }

    /// What a kept agent changed reaches the next one whole, which restores the first
    /// agent's originals: each field round-trips, nothing is invented, and a value that
    /// does not fit is left out rather than carried wrong.
    #[tokio::test(flavor = "current_thread")]
    async fn changed_sysctls_are_carried_to_the_next_agent() {
        let mut first = host();
        first.saved = vec![
            (path("eth0", "arp_ignore"), 19, "0".into()),
            (path("eth0", "arp_announce"), 18, "1".into()),
            (path("eth0", "forwarding"), 1, "0".into()),
        ];
        let code = first.saved_code();
        let mut next = host();
        next.inherit(code);
        assert_eq!(next.saved, first.saved);
        assert_eq!(next.saved_code(), code);
        let mut none = host();
        none.inherit(0);
        assert!(none.saved.is_empty(), "nothing changed, nothing restored");
        first.saved =
            vec![(path("eth0", "arp_ignore"), 19, "7".into()), (path("eth0", "arp_announce"), 18, "9".into())];
        let mut next = host();
        next.inherit(first.saved_code());
        assert_eq!(next.saved, vec![(path("eth0", "arp_ignore"), 19, "7".into())], "arp_announce 9 does not fit");
    }

    #[test]
    fn arp_ignore_values_that_keep_the_kernel_quiet() {
        for (all, dev, ok) in [(0, 0, false), (0, 1, true), (2, 0, true), (0, 8, true), (3, 1, false), (5, 0, false)] {
            assert_eq!((ARP_IGNORE.ok)(all, dev), ok, "all={all} dev={dev}");
        }
        assert!((ARP_ANNOUNCE.ok)(2, 0));
        assert!(!(ARP_ANNOUNCE.ok)(1, 1));
    }
}
