//! A layer-2 lab: a switch namespace holding a bridge, and hosts (namespaces) each
//! plugged into it by a veth pair, with a fixed MAC and address. The forwarding tests,
//! the demo and the benchmarks build on it. Dropping the lab removes every namespace.

use std::net::Ipv4Addr;

use crate::netns::{veth, Netns};

/// One host on the lab's segment.
pub struct Host {
    pub ns: Netns,
    /// Its interface on the segment.
    pub dev: String,
    pub ip: Ipv4Addr,
    pub mac: [u8; 6],
}

impl Host {
    /// Holds `vip` on `lo` without ever answering ARP for it (`arp_ignore=1`,
    /// `arp_announce=2`): how a DSR backend receives traffic for the VIP.
    pub fn hold_vip_quietly(&self, vip: Ipv4Addr) -> Result<(), String> {
        for scope in ["all", &self.dev] {
            self.ns.sysctl(&format!("net.ipv4.conf.{scope}.arp_ignore"), "1")?;
            self.ns.sysctl(&format!("net.ipv4.conf.{scope}.arp_announce"), "2")?;
        }
        self.ns.ip(&["addr", "add", &format!("{vip}/32"), "dev", "lo"]).map(drop)
    }
}

/// A bridge in its own namespace, and the hosts plugged into it.
pub struct Lab {
    pub tag: String,
    pub prefix: [u8; 3],
    // Hosts drop before the switch: their veths go with them.
    pub hosts: Vec<Host>,
    pub switch: Netns,
}

impl Lab {
    /// A switch for the /24 `a.b.c.0`.
    pub fn new(prefix: [u8; 3]) -> Result<Self, String> {
        let tag = crate::netns::unique_tag();
        let switch = Netns::new(&tag, "sw")?;
        switch.ip(&["link", "add", "br0", "type", "bridge"])?;
        switch.ip(&["link", "set", "br0", "up"])?;
        Ok(Self { tag, prefix, hosts: Vec::new(), switch })
    }

    /// Adds host `role` with address `prefix.last`/24 and MAC `02:00:00:00:00:last`.
    pub fn add_host(&mut self, role: &str, last: u8) -> Result<&Host, String> {
        let ns = Netns::new(&self.tag, role)?;
        let dev = "eth0".to_string();
        let port = format!("p{last}");
        veth(&ns, &dev, &self.switch, &port)?;
        self.switch.ip(&["link", "set", &port, "master", "br0"])?;
        let mac = [0x02, 0, 0, 0, 0, last];
        let mac_s = mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
        ns.ip(&["link", "set", &dev, "address", &mac_s])?;
        let ip = Ipv4Addr::new(self.prefix[0], self.prefix[1], self.prefix[2], last);
        ns.ip(&["addr", "add", &format!("{ip}/24"), "dev", &dev])?;
        self.hosts.push(Host { ns, dev, ip, mac });
        Ok(self.hosts.last().expect("just pushed"))
    }

    pub fn host(&self, role: &str) -> &Host {
        self.hosts.iter().find(|h| h.ns.name.ends_with(&format!("-{role}"))).expect("host of that role")
    }
}

/// A load balancer namespace whose FIB reaches `10.77.0.0/24` through a gateway with a
/// permanent neighbour entry, so `bpf_fib_lookup` resolves IPIP next hops without any
/// traffic: interface `lb0` (MAC 02:00:00:00:00:01, 10.0.0.1/24, forwarding on),
/// gateway 10.0.0.254 at 02:00:00:00:00:fe. Used by the IPIP fixtures and benchmarks.
pub struct FibLab {
    pub lb: Netns,
    pub peer: Netns,
}

impl FibLab {
    pub const GATEWAY_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];
    pub const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
    pub const LB_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
    /// An address behind the gateway.
    pub const FAR: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 12);

    pub fn new() -> Result<Self, String> {
        let tag = crate::netns::unique_tag();
        let lb = Netns::new(&tag, "lb")?;
        let peer = Netns::new(&tag, "gw")?;
        veth(&lb, "lb0", &peer, "gw0")?;
        lb.ip(&["link", "set", "lb0", "address", "02:00:00:00:00:01"])?;
        lb.ip(&["addr", "add", "10.0.0.1/24", "dev", "lb0"])?;
        lb.ip(&["route", "add", "10.77.0.0/24", "via", "10.0.0.254"])?;
        lb.ip(&["neigh", "replace", "10.0.0.254", "lladdr", "02:00:00:00:00:fe", "dev", "lb0", "nud", "permanent"])?;
        lb.sysctl("net.ipv4.conf.all.forwarding", "1")?;
        lb.sysctl("net.ipv4.conf.lb0.forwarding", "1")?;
        Ok(Self { lb, peer })
    }
}
