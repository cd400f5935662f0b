//! Types shared by the XDP program (`vip-ebpf`) and the agent (`vip-agent`).
//!
//! Every map key and value is `#[repr(C)]` with explicit padding, so the kernel and user
//! space agree byte for byte, and each type carries a compile-time size assertion: a
//! layout change breaks the build instead of corrupting a map. Byte order is stated per
//! field: addresses are kept in network order (as they sit in the packet) so the data
//! plane compares them without swapping; counters and clocks are in host order.
//!
//! With the `user` feature the types implement [`aya::Pod`] so the agent can read and
//! write them through `aya::maps`.
#![no_std]

/// Map names, as they appear in the ELF object and under the pin path.
///
/// They are the contract between the agent's map layer and the XDP program: a rename on
/// one side only makes `Ebpf::map` fail at load time, never silently.
pub mod map_names {
    /// `Array<Config>`, one entry: this node's identity on the attached interface.
    pub const CONFIG: &str = "VIP_CONFIG";
    /// `HashMap<VipKey, VipState>`: the VIPs this node serves and whether it leads them.
    pub const VIPS: &str = "VIP_VIPS";
    /// `PerCpuArray<u64>` indexed by [`crate::Reason`]: one counter per verdict reason.
    pub const STATS: &str = "VIP_STATS";
}

/// Program names in the ELF object.
pub mod program_names {
    /// The data plane: ARP responder and VIP forwarding.
    pub const VIP: &str = "vip_xdp";
    /// A program that returns `XDP_PASS` and nothing else. It is the floor the benchmarks
    /// measure against, and the program a test attaches to the peer of a veth so that
    /// native-mode `XDP_TX` is delivered (veth drops it otherwise).
    pub const PASS: &str = "xdp_pass";
}

/// How many VIPs the [`map_names::VIPS`] map holds.
///
/// A control plane needs one VIP; operators also put the ingress or a second API VIP on
/// the same nodes. 64 leaves room for that and costs nothing: a hash map's memory is
/// allocated per entry in use.
pub const MAX_VIPS: u32 = 64;

/// This node's identity on the interface the program is attached to.
///
/// Written by the agent before any VIP is marked as led, read by the XDP program for
/// every ARP reply it builds.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// MAC address of the attached interface, in wire order. All zero means "not
    /// configured yet": the program then answers no ARP at all.
    pub mac: [u8; 6],
    /// Explicit padding to an 8-byte multiple; always zero.
    pub _pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<Config>() == 8);

/// Key of the [`map_names::VIPS`] map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VipKey {
    /// The VIP's IPv4 address in network byte order (as in the ARP and IP headers).
    pub addr: [u8; 4],
}
const _: () = assert!(core::mem::size_of::<VipKey>() == 4);

impl VipKey {
    pub const fn new(addr: [u8; 4]) -> Self {
        Self { addr }
    }
}

/// Value of the [`map_names::VIPS`] map: whether this node answers for the VIP, and
/// until when.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipState {
    /// Deadline of this node's leadership on the `bpf_ktime_get_ns()` clock
    /// (CLOCK_MONOTONIC, nanoseconds, host order). The program answers ARP for the VIP
    /// only while `now < leader_until_ns` and [`VipState::F_LEADER`] is set. The agent
    /// pushes it forward on every successful lease renewal, so an agent that crashes,
    /// hangs or is cut off stops answering by itself before its lease can expire.
    /// [`VipState::FOREVER`] means no deadline (`--election none`).
    pub leader_until_ns: u64,
    /// Bit set of `F_*` flags, host order.
    pub flags: u32,
    /// Explicit padding to an 8-byte multiple; always zero.
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<VipState>() == 16);

impl VipState {
    /// This node leads the VIP: answer ARP requests for it (until the deadline).
    pub const F_LEADER: u32 = 1 << 0;
    /// Deadline that never passes.
    pub const FOREVER: u64 = u64::MAX;

    /// A VIP this node leads until `until_ns` on the kernel's monotonic clock.
    pub const fn leader_until(until_ns: u64) -> Self {
        Self {
            leader_until_ns: until_ns,
            flags: Self::F_LEADER,
            _pad: 0,
        }
    }

    /// A VIP this node serves but does not lead: ARP requests for it are dropped.
    pub const fn follower() -> Self {
        Self {
            leader_until_ns: 0,
            flags: 0,
            _pad: 0,
        }
    }

    /// Whether this node answers ARP for the VIP at `now_ns` (kernel monotonic clock).
    #[inline(always)]
    pub const fn leads_at(&self, now_ns: u64) -> bool {
        self.flags & Self::F_LEADER != 0 && now_ns < self.leader_until_ns
    }
}

/// Why the program returned the verdict it did: the index of a per-CPU counter in
/// [`map_names::STATS`]. Every verdict the program computes is counted under exactly one
/// reason, so the counters add up to the number of frames seen.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Reason {
    /// ARP request for a VIP this node leads: answered in place, `XDP_TX`.
    ArpReplied = 0,
    /// ARP request for a VIP this node does not lead (or whose deadline passed):
    /// `XDP_DROP`, so the kernel, which holds the VIP on `lo`, cannot answer either.
    ArpFollowerDropped = 1,
    /// Gratuitous ARP (sender IP == target IP) for a VIP: `XDP_PASS`, so the kernel
    /// learns who announced it.
    ArpGratuitous = 2,
    /// ARP reply or other operation naming a VIP: `XDP_PASS`.
    ArpNotRequest = 3,
    /// Well-formed ARP for an address that is not a VIP: `XDP_PASS`.
    ArpNotVip = 4,
    /// ARP that is truncated or not Ethernet/IPv4 (htype, ptype, hlen, plen): `XDP_PASS`,
    /// the kernel's own ARP code validates and drops it.
    ArpMalformed = 5,
    /// ARP request for a led VIP while no MAC is configured: `XDP_DROP`.
    ArpNoConfig = 6,
    /// Frame shorter than its Ethernet (and VLAN) headers: `XDP_PASS`.
    EthMalformed = 7,
    /// Anything that is not ARP: `XDP_PASS`.
    NotArpPassed = 8,
}

impl Reason {
    /// Number of counter slots. Larger than the number of reasons so later reasons do not
    /// resize the map.
    pub const SLOTS: u32 = 32;

    /// Every reason, in index order: what the agent's status and metrics iterate over.
    pub const ALL: [Reason; 9] = [
        Reason::ArpReplied,
        Reason::ArpFollowerDropped,
        Reason::ArpGratuitous,
        Reason::ArpNotRequest,
        Reason::ArpNotVip,
        Reason::ArpMalformed,
        Reason::ArpNoConfig,
        Reason::EthMalformed,
        Reason::NotArpPassed,
    ];

    /// Stable name for logs, metrics labels and `vip-agent status`.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::ArpReplied => "arp_replied",
            Reason::ArpFollowerDropped => "arp_follower_dropped",
            Reason::ArpGratuitous => "arp_gratuitous",
            Reason::ArpNotRequest => "arp_not_request",
            Reason::ArpNotVip => "arp_not_vip",
            Reason::ArpMalformed => "arp_malformed",
            Reason::ArpNoConfig => "arp_no_config",
            Reason::EthMalformed => "eth_malformed",
            Reason::NotArpPassed => "not_arp_passed",
        }
    }
}
const _: () = assert!((Reason::ALL.len() as u32) <= Reason::SLOTS);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)], contain only integers and byte arrays, and
    // have explicit padding fields, so every bit pattern is valid and there are no
    // uninitialised bytes.
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::VipKey {}
    unsafe impl aya::Pod for super::VipState {}
}
