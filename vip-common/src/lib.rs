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
    /// `HashMap<Vip6Key, Vip6State>`: the IPv6 VIPs this node serves, whether it leads
    /// them (what the Neighbor Discovery responder reads) and until when it balances their
    /// new flows. A map of its own, so the IPv4
    /// key stays 4 bytes and maps pinned by an IPv4-only agent are adopted unchanged.
    pub const VIPS6: &str = "VIP_VIPS6";
    /// `Array<VipSet>`, one entry: the same VIPs as a flat list, for the IPv4 path's
    /// membership test.
    pub const VIP_SET: &str = "VIP_VIP_SET";
    /// `Array<VipSet6>`, one entry: the IPv6 VIPs as a flat list, for the IPv6
    /// forwarding path's membership test (Neighbor Discovery reads [`VIPS6`]).
    pub const VIP_SET6: &str = "VIP_VIP_SET6";
    /// `PerCpuArray<u64>` indexed by [`crate::Reason`]: one counter per verdict reason.
    pub const STATS: &str = "VIP_STATS";
    /// `HashMap<ServiceKey, Service>`: the VIP:port pairs that are load-balanced.
    pub const SERVICES: &str = "VIP_SERVICES";
    /// `Array<Backend>` indexed by backend id.
    pub const BACKENDS: &str = "VIP_BACKENDS";
    /// `Array<MaglevRow>`: every service's two Maglev tables, [`crate::MAGLEV_ROWS_PER_TABLE`]
    /// rows each, at row `(slot * 2 + half) * MAGLEV_ROWS_PER_TABLE`.
    pub const MAGLEV: &str = "VIP_MAGLEV";
    /// `LruHashMap<FlowKey, Conn>`: the connection table.
    pub const CONNS: &str = "VIP_CONNS";
    /// `HashMap<ServiceKey6, Service>`: the IPv6 VIP:port pairs that are load-balanced.
    /// Their tables are in [`MAGLEV`], in slots shared with the IPv4 services.
    pub const SERVICES6: &str = "VIP_SERVICES6";
    /// `LruHashMap<FlowKey6, Conn>`: the connection table of IPv6 flows.
    pub const CONNS6: &str = "VIP_CONNS6";
    /// `PerCpuArray<BackendStats>` indexed by backend id.
    pub const BACKEND_STATS: &str = "VIP_BACKEND_STATS";
    /// `HashMap<PeerKey, u32>`: the other load-balancing nodes of the segment, by MAC and
    /// by address: frames they already balanced are never balanced again, and only their
    /// IPIP is decapsulated.
    pub const PEERS: &str = "VIP_PEERS";
    /// `PerCpuArray<IcmpBudget>`, one entry: the rate limit of the ICMP errors the data
    /// plane generates.
    pub const ICMP_BUDGET: &str = "VIP_ICMP_BUDGET";
    /// `PerCpuArray<CachedFlow>` of [`crate::FLOW_CACHE_SLOTS`] entries: a direct-mapped
    /// per-CPU cache in front of the connection table.
    pub const FLOW_CACHE: &str = "VIP_FLOW_CACHE";
    /// `PerCpuArray<CachedFlow6>` of [`crate::FLOW_CACHE_SLOTS`] entries: the same in
    /// front of [`CONNS6`].
    pub const FLOW_CACHE6: &str = "VIP_FLOW_CACHE6";
    /// `Array<u32>`, one element: raised by XDP when the driver cannot carry the mark it
    /// leaves for its tcx companion in a frame's metadata.
    pub const HANDOFF_NO_META: &str = "VIP_HANDOFF_NO_META";
}

/// Tail-call targets: the IPv6 data plane is a program of its own ([`program_names::VIP6`],
/// [`program_names::TCX6`]) the IPv4 one jumps to, so that the IPv6 code does not share,
/// and slow, the IPv4 fast path's one function.
pub mod tail_calls {
    /// `ProgramArray` of `vip_xdp`'s targets. Pinned with the maps (the kernel empties a
    /// program array nothing in user space holds); every agent writes its own IPv6
    /// program into it when it loads the object, before attaching.
    pub const PROGS_XDP: &str = "VIP_PROGS_XDP";
    /// `ProgramArray` of `vip_tcx`'s targets, likewise.
    pub const PROGS_TCX: &str = "VIP_PROGS_TCX";
    /// The slot of the IPv6 program in both arrays.
    pub const IPV6: u32 = 0;
    /// `ProgramArray` of `vip_tcx_vlan`'s one target, `vip_tcx`, in slot [`TCX`]: the
    /// companion only reads the frame (see `vip-ebpf/src/handoff.rs`), and jumps to the
    /// data plane for the frames it takes. Pinned likewise.
    pub const PROGS_TCX_VLAN: &str = "VIP_PROGS_TCX_VLAN";
    /// The slot of `vip_tcx` in [`PROGS_TCX_VLAN`].
    pub const TCX: u32 = 0;
}

/// Neighbor Discovery's numbers (RFC 4861), for the data plane's responder and the
/// agent's announcements and probes alike.
pub mod nd {
    /// IPv6 next header of ICMPv6.
    pub const IPPROTO_ICMPV6: u8 = 58;
    /// ICMPv6 types of a solicitation and an advertisement (§4.3, §4.4).
    pub const NEIGHBOR_SOLICIT: u8 = 135;
    pub const NEIGHBOR_ADVERT: u8 = 136;
    /// Option types (§4.6.1): source and target link-layer address.
    pub const OPT_SOURCE_LL: u8 = 1;
    pub const OPT_TARGET_LL: u8 = 2;
    /// Hop limit of every ND message, sent and accepted (§7.1.1): a packet that crossed
    /// a router cannot have it, so ND cannot be spoofed from off-link.
    pub const HOP_LIMIT: u8 = 255;
    /// NA flags (the first byte after the checksum): Solicited and Override. Router stays
    /// clear: a VIP is a host address.
    pub const NA_FLAG_SOLICITED: u8 = 0x40;
    pub const NA_FLAG_OVERRIDE: u8 = 0x20;
    /// All-nodes multicast (ff02::1), network order, and its Ethernet group (RFC 2464 §7:
    /// 33:33 and the low 32 bits).
    pub const ALL_NODES: [u8; 16] = [0xff, 0x02, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
    pub const ALL_NODES_MAC: [u8; 6] = [0x33, 0x33, 0, 0, 0, 1];
}

/// Program names in the ELF object.
pub mod program_names {
    /// The data plane: ARP responder and VIP forwarding.
    pub const VIP: &str = "vip_xdp";
    /// A program that returns `XDP_PASS` and nothing else. It is the floor the benchmarks
    /// measure against, and the program a test attaches to the peer of a veth so that
    /// native-mode `XDP_TX` is delivered (veth drops it otherwise).
    pub const PASS: &str = "xdp_pass";
    /// The same data plane as [`VIP`], at tcx ingress (`--attach tcx`).
    pub const TCX: &str = "vip_tcx";
    /// The IPv6 part of [`VIP`] (Neighbor Discovery, IPv6 forwarding), which [`VIP`]
    /// tail-calls for every IPv6 frame.
    pub const VIP6: &str = "vip_xdp6";
    /// The IPv6 part of [`TCX`], likewise.
    pub const TCX6: &str = "vip_tcx6";
    /// [`TCX`] for the frames whose VLAN tag the NIC stripped, and for those only:
    /// attached at tcx ingress beside [`VIP`] at XDP when the VIPs are on a VLAN
    /// (`--vlan`), since XDP cannot read such a tag.
    pub const TCX_VLAN: &str = "vip_tcx_vlan";
    /// A tcx program that drops ICMP over IPv4 and hands everything else on: tests attach
    /// it after [`TCX`] as the stand-in for another project's tcx program.
    pub const TCX_DROP_ICMP: &str = "tcx_drop_icmp";
}

/// How many VIPs a node serves.
///
/// A control plane needs one VIP; operators also put the ingress or a second API VIP on
/// the same nodes. 16 leaves room for that, and keeps the addresses [`VipSet`] scans for
/// every IPv4 packet within one 64-byte cache line.
pub const MAX_VIPS: u32 = 16;

/// Every VIP of the node as a flat list, for the IPv4 path: membership by scanning the
/// addresses (one array lookup the verifier inlines, 16 compares in one cache line), and,
/// for a member, until when this node load-balances its traffic.
///
/// In ARP mode only the leader load-balances: a VIP frame reaching a follower was sent
/// to it by the leader (DSR) and must go up its own stack, not be balanced again. With
/// identical tables a second balancing would pick this node anyway, but a node whose
/// agent died keeps a stale table and would bounce traffic to backends that are gone.
/// The deadline is the leader's fencing deadline, so a dead leader stops balancing when
/// it stops answering ARP. The agent keeps this list in step with the VIPS hash, which
/// alone is replaced atomically (the kernel copies an array element in place) and which
/// the ARP path reads unless a fast-path bit ([`VipSet::FAST_PATH`]) decides.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipSet {
    /// VIP addresses, network order; `[0; 4]` marks a free slot (0.0.0.0 is never a VIP,
    /// and the data plane never treats a 0.0.0.0 destination as one).
    pub addrs: [[u8; 4]; MAX_VIPS as usize],
    /// Per slot: load-balance the VIP's traffic while `bpf_ktime_get_boot_ns() <` this
    /// (host order; 0: never, [`VipState::FOREVER`]: always).
    pub balance_until_ns: [u64; MAX_VIPS as usize],
    /// Per slot: the L2 segment the VIP lives on, as [`segment_of`] names a frame's
    /// (0: untagged), host order, in the low 12 bits ([`VipSet::SEGMENT`]); bit 15 is
    /// [`VipSet::ARP_SKIP`], bit 14 [`VipSet::ARP_ANSWER`]. VIP traffic arriving on
    /// another segment is not ours.
    pub segments: [u16; MAX_VIPS as usize],
}
const _: () = assert!(core::mem::size_of::<VipSet>() == 224);

impl VipSet {
    /// The slot of `addr`, if it is a VIP.
    #[inline(always)]
    pub fn slot(&self, addr: [u8; 4]) -> Option<usize> {
        if addr == [0; 4] {
            return None;
        }
        let mut i = 0;
        while i < MAX_VIPS as usize {
            if self.addrs[i] == addr {
                return Some(i);
            }
            i += 1;
        }
        None
    }

    #[inline(always)]
    pub fn contains(&self, addr: [u8; 4]) -> bool {
        self.slot(addr).is_some()
    }

    /// The segment bits of a [`VipSet::segments`] entry (a VID is 12 bits).
    pub const SEGMENT: u16 = 0x0fff;

    /// In a [`VipSet::segments`] entry: this node neither leads nor probes for the VIP,
    /// so a follower's ARP path drops a request for it without looking its state up in
    /// the VIPS hash (a hash lookup is most of that path's cost). Clear, the hash decides
    /// (or [`VipSet::ARP_ANSWER`], under its own rules). The agent clears the
    /// bit before it writes a state that leads or probes, and sets it only after writing
    /// one that does neither, so the bit never hides a flag the hash holds: a stale bit
    /// costs a lookup, never an answer. Kept in a segment entry's spare bits rather than
    /// a field of its own so that the list keeps its layout, and a data plane pinned by an
    /// older agent (which leaves the bit clear: the hash decides) is adopted as it is.
    pub const ARP_SKIP: u16 = 0x8000;

    /// In a [`VipSet::segments`] entry: this node leads the VIP until the slot's
    /// [`VipSet::balance_until_ns`], so the leader's ARP path answers a request for it
    /// without looking its state up in the VIPS hash while the clock is before that
    /// deadline (the hash lookup was 30 of the 40 ns the answer cost above the
    /// `XDP_PASS` floor). Past the deadline, the hash decides. The agent sets the bit only
    /// after writing a leader state whose deadline is the slot's, and clears it before
    /// writing any state that does not lead, before a renewal changes the deadline, and
    /// before removing the VIP, so the bit never
    /// answers where the hash would not; a stale clear bit costs a lookup. Cleared in a
    /// list write of its own, never in the write that changes the deadline: a reader in
    /// the middle of an in-place copy could see the old bit with the new deadline. Bit 14: a
    /// program from before it masks the segment with [`VipSet::SEGMENT`] and never sees
    /// it; one from before [`VipSet::ARP_SKIP`] reads the entry whole, which is why the
    /// agent gives no bit while such a program may run.
    pub const ARP_ANSWER: u16 = 0x4000;

    /// Both fast-path bits of a [`VipSet::segments`] entry.
    pub const FAST_PATH: u16 = Self::ARP_SKIP | Self::ARP_ANSWER;

    /// Whether a VIP whose [`VipState::flags`] are `flags` may carry
    /// [`VipSet::ARP_SKIP`]: neither leader nor probing.
    #[inline(always)]
    pub const fn arp_skips(flags: u32) -> bool {
        flags & (VipState::F_LEADER | VipState::F_PROBING) == 0
    }

    /// The fast-path bits ([`VipSet::FAST_PATH`]) a VIP whose hash state is `state` may
    /// carry when its slot's deadline is `balance_until_ns`: [`VipSet::ARP_SKIP`] if it
    /// neither leads nor probes, [`VipSet::ARP_ANSWER`] if it leads until exactly that
    /// deadline, none otherwise (the hash decides).
    #[inline(always)]
    pub const fn fast_path_bits(state: &VipState, balance_until_ns: u64) -> u16 {
        if Self::arp_skips(state.flags) {
            Self::ARP_SKIP
        } else if state.flags & VipState::F_LEADER != 0 && state.leader_until_ns == balance_until_ns {
            Self::ARP_ANSWER
        } else {
            0
        }
    }
}

/// The IPv6 VIPs as a flat list, for the IPv6 forwarding path, as [`VipSet`] is for
/// IPv4: a membership test by scanning (an inlined array lookup and two 8-byte compares
/// per slot) instead of a lookup of a 16-byte key in the [`map_names::VIPS6`] hash, which
/// cost about 35 ns of every IPv6 VIP packet. The hash keeps the Neighbor Discovery
/// state; the agent keeps the two in step, the list written first when a VIP is added and
/// last when it is removed.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VipSet6 {
    /// VIP addresses, network order; all zero marks a free slot (`::` is never a VIP).
    pub addrs: [[u8; 16]; MAX_VIPS as usize],
    /// Per slot: load-balance the VIP's new flows while `bpf_ktime_get_boot_ns() <` this
    /// (host order; 0: never, [`VipState::FOREVER`]: always).
    pub balance_until_ns: [u64; MAX_VIPS as usize],
    /// Per slot: the L2 segment the VIP lives on ([`segment_of`]; 0: untagged), host
    /// order, in the low 12 bits ([`VipSet::SEGMENT`]); bit 15 is [`VipSet6::NS_SKIP`], bit
    /// 14 [`VipSet6::NS_ANSWER`].
    pub segments: [u16; MAX_VIPS as usize],
}
const _: () = assert!(core::mem::size_of::<VipSet6>() == 416);

impl Default for VipSet6 {
    fn default() -> Self {
        Self {
            addrs: [[0; 16]; MAX_VIPS as usize],
            balance_until_ns: [0; MAX_VIPS as usize],
            segments: [0; MAX_VIPS as usize],
        }
    }
}

impl VipSet6 {
    /// In a [`VipSet6::segments`] entry: [`VipSet::ARP_SKIP`] for Neighbor Discovery. A
    /// follower drops a Neighbor Solicitation for the VIP without looking its state up in
    /// the VIPS6 hash (a 16-byte key: most of that path's cost); clear, the hash decides.
    /// Kept by the agent under the same rules as the ARP bit. Programs before this bit
    /// read the segment entry whole, so an agent that adopts one sets no bit until its
    /// own program runs.
    pub const NS_SKIP: u16 = VipSet::ARP_SKIP;

    /// In a [`VipSet6::segments`] entry: [`VipSet::ARP_ANSWER`] for Neighbor Discovery (the
    /// leader advertises without the VIPS6 hash lookup while the slot's deadline holds),
    /// kept by the agent under the same rules.
    pub const NS_ANSWER: u16 = VipSet::ARP_ANSWER;

    /// The slot of the address whose two 8-byte words (its bytes in memory order, read
    /// as little-endian words) are `addr`, if it is a VIP.
    #[inline(always)]
    pub fn slot_of_words(&self, addr: [u64; 2]) -> Option<usize> {
        if addr == [0; 2] {
            return None;
        }
        let mut i = 0;
        while i < MAX_VIPS as usize {
            // SAFETY: each address is 16 initialised bytes at an 8-byte aligned offset of
            // an 8-byte aligned value; on a little-endian machine these are its words16.
            #[cfg(target_endian = "little")]
            let words = unsafe { *(self.addrs[i].as_ptr() as *const [u64; 2]) };
            #[cfg(not(target_endian = "little"))]
            let words = words16(&self.addrs[i]);
            if words == addr {
                return Some(i);
            }
            i += 1;
        }
        None
    }

    /// The slot of `addr`, if it is a VIP.
    #[inline(always)]
    pub fn slot(&self, addr: &[u8; 16]) -> Option<usize> {
        self.slot_of_words(words16(addr))
    }
}

/// 16 bytes as two little-endian 8-byte words.
#[inline(always)]
pub const fn words16(a: &[u8; 16]) -> [u64; 2] {
    let (mut lo, mut hi) = ([0u8; 8], [0u8; 8]);
    let mut i = 0;
    while i < 8 {
        lo[i] = a[i];
        hi[i] = a[8 + i];
        i += 1;
    }
    [u64::from_le_bytes(lo), u64::from_le_bytes(hi)]
}

/// The inverse of [`words16`].
#[cfg(not(target_endian = "little"))]
#[inline(always)]
const fn bytes16([lo, hi]: [u64; 2]) -> [u8; 16] {
    let (l, h) = (lo.to_le_bytes(), hi.to_le_bytes());
    let mut a = [0u8; 16];
    let mut i = 0;
    while i < 8 {
        a[i] = l[i];
        a[8 + i] = h[i];
        i += 1;
    }
    a
}

/// This node's identity on the interface the program is attached to.
///
/// Written by the agent before any VIP is marked as led, read by the XDP program for
/// every ARP reply and every forwarded frame it builds.
// 8-byte aligned, so the data plane reads the MAC with word loads rather than byte by
// byte (the same for the other hot-path values below); the layout is unchanged.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// MAC address of the attached interface, in wire order. All zero means "not
    /// configured yet": the program then answers no ARP at all.
    pub mac: [u8; 6],
    /// The interface sysctls the agents on this node changed, with the values they
    /// replaced, packed by the agent (`agent::host::Host::saved_code`), so that across
    /// kept restarts the last agent restores the values the first one found. Not read by
    /// the data plane. 0: nothing changed (or written by an agent from before this
    /// field, when this byte was padding).
    pub host_saved: u8,
    /// Explicit padding; always zero.
    pub _pad: u8,
    /// This node's IPv4 address on the interface, network order: the outer source of
    /// IPIP-encapsulated frames, and the only outer destination decapsulated.
    pub ip: [u8; 4],
    /// Seed of [`flow_hash`], host order. The same on every node of a cluster (so every
    /// node maps a flow to the same Maglev slot) and unknown outside it (so nobody can
    /// aim connections at one backend by choosing ports).
    pub hash_seed: u32,
    /// The instance id of the agent process that wrote this (8 bytes, as in the Lease
    /// annotation `vip.dev/holder-instance` in hex): the next agent on this node takes
    /// over the Lease that instance holds. Not read by the data plane.
    pub agent_instance: [u8; 8],
    /// Bumped by the agent whenever a backend's flags change: per-CPU flow-cache
    /// entries ([`CachedFlow`]) from an older generation are not trusted. Host order.
    pub generation: u32,
    /// `F_*` flags, host order.
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<Config>() == 32);

impl Config {
    /// [`Config::mac`] as a number: its 6 bytes in memory order in the low 48 bits (the
    /// data plane's form of a MAC), read as one 8-byte word of the aligned value.
    #[inline(always)]
    pub fn mac_word(&self) -> u64 {
        // SAFETY: `mac`, `host_saved` and `_pad` are the first 8 bytes of an 8-byte
        // aligned value.
        let w = unsafe { *(self as *const Config as *const u64) };
        u64::from_le(w) & ((1 << 48) - 1)
    }

    pub const fn new(mac: [u8; 6], ip: [u8; 4]) -> Self {
        Self { mac, host_saved: 0, _pad: 0, ip, hash_seed: 0, agent_instance: [0; 8], generation: 1, flags: 0 }
    }

    /// This node's agent is stopping for good (the VIP will leave `lo`): VIP-path probes
    /// from the other load-balancing nodes (SYNs to a VIP from a peer's own address) are
    /// dropped, so those nodes stop sending this one new flows while it still serves
    /// them; clients' flows are served as before.
    pub const F_LEAVING: u32 = 1 << 0;

    pub const fn with_seed(mut self, hash_seed: u32) -> Self {
        self.hash_seed = hash_seed;
        self
    }
}

/// The TCP window of a leaving node's refusal of a VIP-path probe (`vip-ebpf`'s
/// `refuse`), in host order: "VR". A closed port's RST carries window 0 (RFC 9293
/// §3.10.7.1, which the refusal otherwise copies); a receiver ignores a RST's window
/// (§3.10.7.4 checks only its sequence number), so the refusal carries this mark instead,
/// and the prober tells "its node is leaving" (this window) from "nothing there accepts
/// VIP:port" (the host's own RST: an apiserver listening on its node's address only).
pub const REFUSAL_WINDOW: u16 = 0x5652;

/// The TCP window of an IPv6 VIP-path probe's SYN (`vip-agent`'s `vipprobe`), in host
/// order: "VP". What a leaving node's data plane refuses (`vip-ebpf`'s `refuse::reset6`)
/// is a SYN from a peer's MAC with this window, no option and no payload: by IPv6 the
/// peers are known by MAC only, and the leader's DSR frames carry its MAC too, so a
/// client's SYN it forwards must not look like a probe (IPv4 probes are known by the
/// peer's own address instead).
pub const PROBE6_WINDOW: u16 = 0x5650;

/// The L2 segment a frame arrived on, from its VLAN tags: 0 for an untagged or
/// priority-tagged (VID 0, IEEE 802.1Q §9.6) frame, the VID for one 802.1Q tag, and
/// [`SEGMENT_NONE`] for stacked tags, which no VIP is configured on.
#[inline(always)]
pub const fn segment_of(tags: usize, outer_vid: u16) -> u16 {
    match tags {
        0 => 0,
        1 => outer_vid & 0x0fff,
        _ => SEGMENT_NONE,
    }
}

/// A segment no VIP lives on (VIDs are 12 bits).
pub const SEGMENT_NONE: u16 = 0xffff;

/// How many load-balanced services (VIP:port pairs) the data plane holds. Each owns a
/// pair of Maglev table slots, so this bounds the table map's memory
/// (`MAX_SERVICES * 2 * MAGLEV_MAX_M * 4` bytes, 8.4 MB at the defaults).
pub const MAX_SERVICES: u32 = 16;
/// How many backends (across all services). Backend ids index arrays, so this is their
/// size; 1024 is far more than any control plane has and costs 24 KiB.
pub const MAX_BACKENDS: u32 = 1024;
/// How many peers (other load-balancing nodes) the peer map holds, by MAC and by
/// address: two entries per backend that is not this node, so every backend the data
/// plane can hold fits (a peer map that overflows would fail the whole table update).
pub const MAX_PEERS: u32 = 2 * MAX_BACKENDS;
/// Largest Maglev table size. The agent accepts any prime up to it; 65537 is the default
/// from the Maglev paper (small disruption, ≤ 1 % imbalance for hundreds of backends).
pub const MAGLEV_MAX_M: u32 = 65537;
/// Slots per map entry of the Maglev table map. Packing 256 slots in one 1 KiB value
/// makes a table write 257 syscalls instead of 65537, and the lookup stays one map
/// access plus a masked index.
pub const MAGLEV_ROW: u32 = 256;
/// Rows that hold one table of [`MAGLEV_MAX_M`] slots.
pub const MAGLEV_ROWS_PER_TABLE: u32 = MAGLEV_MAX_M.div_ceil(MAGLEV_ROW);
/// Total rows: two tables (double buffer) per service.
pub const MAGLEV_ROWS: u32 = MAX_SERVICES * 2 * MAGLEV_ROWS_PER_TABLE;
/// Table slot value meaning "no backend" (no healthy backend exists).
pub const NO_BACKEND: u32 = u32::MAX;

/// A Maglev slot's value, host order: the backend that takes the slot's new flows in its
/// low 16 bits ([`MaglevSlot::NONE`] there: none), and in its high 16 bits the slot's
/// *holder* plus one (0: none).
///
/// The holder is the backend the slot named when that backend started draining (not
/// ready, or its node leaving), or when it gave the slot up to another while still
/// serving (a backend returning or joining), as the agent's table had it then. A packet
/// that does not open a connection and that no pin on this node covers belongs to a flow
/// some other node balanced, most likely before the drain (the node that pinned it lost
/// the VIP, and the client moved here): it goes to the holder, which still serves the
/// connection, instead of to the new-flow backend, which would reset it. A SYN goes to the
/// new-flow backend. The agent carries holders from one table to the next: a backend
/// holds the slots it had when it started draining, while it drains, for the agent's
/// hold (a minute; see `vip_agent::balancer::DEFAULT_HOLD`). The cost:
/// a flow opened during the drain in a held slot whose pin is lost (evicted, or pinned
/// by a node that then lost the VIP) goes to the holder, which resets it.
/// A slot without a holder is the plain backend id or [`NO_BACKEND`],
/// the format before holders, so a program from before reads such tables unchanged.
///
/// Backend ids are below [`MAX_BACKENDS`], so both fit in 16 bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevSlot(pub u32);
const _: () = assert!(MAX_BACKENDS < 0xffff);

impl MaglevSlot {
    /// The low half of a slot without a new-flow backend.
    pub const NONE: u32 = 0xffff;

    /// A slot whose new flows go to `id` (a backend id, or [`NO_BACKEND`]), held by
    /// `holder` (the id of a draining backend, or of one that gave the slot up) if any.
    pub const fn new(id: u32, holder: Option<u32>) -> Self {
        match holder {
            None => Self(id),
            Some(h) => Self((id & Self::NONE) | (h + 1) << 16),
        }
    }

    /// The backend that takes the slot's new flows, or [`NO_BACKEND`].
    #[inline(always)]
    pub const fn id(self) -> u32 {
        match self.0 & Self::NONE {
            Self::NONE => NO_BACKEND,
            id => id,
        }
    }

    /// The backend that holds the slot's earlier flows, if any. One compare:
    /// the high half minus one is below [`MAX_BACKENDS`] only for a holder (0, no holder,
    /// wraps; `0xffff`, the high half of [`NO_BACKEND`], is far above).
    #[inline(always)]
    pub const fn holder(self) -> Option<u32> {
        let h = (self.0 >> 16).wrapping_sub(1);
        if h < MAX_BACKENDS {
            Some(h)
        } else {
            None
        }
    }
}
/// Capacity of the connection table. An LRU: when full, the least recently used flow is
/// forgotten and re-hashed through Maglev on its next packet, which lands it on the same
/// backend unless the backend set changed meanwhile (or, for a flow opened while a
/// backend drains, in a slot that backend holds: see [`MaglevSlot`]).
pub const MAX_CONNS: u32 = 131_072;
/// IP protocol number of TCP, the only protocol services forward.
pub const IPPROTO_TCP: u8 = 6;

/// Key of the [`map_names::SERVICES`] map: a VIP, port and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// VIP, network order.
    pub vip: [u8; 4],
    /// Destination port, network order (as in the TCP header).
    pub port: [u8; 2],
    /// IP protocol; only [`IPPROTO_TCP`] is forwarded.
    pub proto: u8,
    /// Explicit padding; always zero.
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 8);

impl ServiceKey {
    pub const fn tcp(vip: [u8; 4], port: u16) -> Self {
        Self { vip, port: port.to_be_bytes(), proto: IPPROTO_TCP, _pad: 0 }
    }
}

/// How a service's packets reach a backend on another node.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ForwardMode {
    /// Direct server return: rewrite the destination MAC to the backend's and `XDP_TX`.
    /// Backends share the L2 segment and hold the VIP on `lo`.
    Dsr = 0,
    /// Encapsulate in IPv4 (protocol 4) to the backend; next hop from `bpf_fib_lookup`.
    Ipip = 1,
    /// No load balancing: every packet goes to this node's own stack.
    Local = 2,
}

impl ForwardMode {
    pub const fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::Dsr),
            1 => Some(Self::Ipip),
            2 => Some(Self::Local),
            _ => None,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::Dsr => "dsr",
            Self::Ipip => "ipip",
            Self::Local => "local",
        }
    }
}

/// Value of the [`map_names::SERVICES`] map. The agent replaces it whole to switch
/// tables: one element update is atomic for readers, so a packet sees either the old
/// (`active`, `m`) or the new one, never a mix.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Service {
    /// Table slot of this service, `0..MAX_SERVICES`, host order.
    pub slot: u16,
    /// Which of the slot's two tables is live: 0 or 1.
    pub active: u8,
    /// A [`ForwardMode`] as `u8`.
    pub mode: u8,
    /// Maglev table size M (a prime ≤ [`MAGLEV_MAX_M`]), host order.
    pub m: u32,
}
const _: () = assert!(core::mem::size_of::<Service>() == 8);

impl Service {
    /// First row of table `half` of this service in [`map_names::MAGLEV`].
    #[inline(always)]
    pub const fn first_row(slot: u16, half: u8) -> u32 {
        (slot as u32 * 2 + (half & 1) as u32) * MAGLEV_ROWS_PER_TABLE
    }
}

/// One row of a Maglev table: [`MAGLEV_ROW`] consecutive slots, each a backend id (host
/// order) or [`NO_BACKEND`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevRow {
    pub ids: [u32; MAGLEV_ROW as usize],
}
const _: () = assert!(core::mem::size_of::<MaglevRow>() == 1024);

/// Value of the [`map_names::BACKENDS`] array.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    /// Backend IPv4 address, network order.
    pub ip: [u8; 4],
    /// MAC the DSR rewrite sends to, wire order (the backend's, on the shared L2).
    pub mac: [u8; 6],
    /// `F_*` flags, host order.
    pub flags: u16,
    /// Why the backend is not up: a [`HealthReason`] as `u8` (0 while up). Not read by
    /// the data plane; `status` shows it.
    pub reason: u8,
    /// Explicit padding; always zero.
    pub _pad: [u8; 3],
    /// IPIP: the MAC of the next hop towards the backend (the backend's own, or its
    /// router's), wire order, resolved by the agent from the kernel's route and neighbour
    /// tables and refreshed on every health check. Valid while [`Backend::nh_mtu`] is
    /// non-zero; it spares the data plane a `bpf_fib_lookup` per packet (Katran keeps its
    /// gateway MAC the same way).
    pub nh_mac: [u8; 6],
    /// IPIP: the MTU of the route to the backend (its `mtu` metric, else the interface's),
    /// host order; 0 when the next hop is not known, and for every other mode. An
    /// encapsulated packet larger than this takes the FIB path, which answers
    /// fragmentation-needed.
    pub nh_mtu: u16,
}
const _: () = assert!(core::mem::size_of::<Backend>() == 24);

impl Backend {
    /// The backend takes new flows (the live Maglev table may name it).
    pub const F_UP: u16 = 1 << 0;
    /// The backend is this node: deliver to the local stack (`XDP_PASS`).
    pub const F_LOCAL: u16 = 1 << 1;
    /// The backend still serves the connections it holds: connection-table hits on it
    /// are honoured. Set with [`Backend::F_UP`], and alone while it drains (its
    /// apiserver reports not ready but still serves). Without it a pinned flow is
    /// re-hashed at once.
    pub const F_SERVING: u16 = 1 << 2;
}

/// Why a backend is not up, as its last failed health check said. Stored in
/// [`Backend::reason`]; the names are what `status` and the metrics show.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum HealthReason {
    /// Up, or not checked yet.
    None = 0,
    /// TCP connect refused, unreachable or reset.
    Connect = 1,
    /// No answer within the check timeout.
    Timeout = 2,
    /// TLS handshake failed (certificate not trusted, wrong name, protocol error).
    Tls = 3,
    /// The apiserver answered, but not ready (HTTP status other than 200): draining.
    NotReady = 4,
    /// Ready, but a frame to it for VIP:port got no SYN-ACK (it does not hold the VIP).
    VipPath = 5,
    /// DSR backend whose MAC is not in the neighbour table.
    NoMac = 6,
    /// Malformed HTTP answer.
    Protocol = 7,
    /// No longer registered in the EndpointSlices (an apiserver shutting down removes
    /// itself), but still serving: it drains.
    Deregistered = 8,
}

impl HealthReason {
    /// Whether a backend failing for this reason still serves the connections it has
    /// (its apiserver answers "not ready", it stopped taking VIP traffic, or it left
    /// the EndpointSlices): it drains, rather than being down.
    pub const fn serves(self) -> bool {
        matches!(self, Self::NotReady | Self::VipPath | Self::Deregistered)
    }

    pub const fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Connect,
            2 => Self::Timeout,
            3 => Self::Tls,
            4 => Self::NotReady,
            5 => Self::VipPath,
            6 => Self::NoMac,
            7 => Self::Protocol,
            8 => Self::Deregistered,
            _ => Self::None,
        }
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::None => "",
            Self::Connect => "connect",
            Self::Timeout => "timeout",
            Self::Tls => "tls",
            Self::NotReady => "not_ready",
            Self::VipPath => "vip_path",
            Self::NoMac => "no_mac",
            Self::Protocol => "protocol",
            Self::Deregistered => "deregistered",
        }
    }
}

/// Key of the [`map_names::PEERS`] map: another load-balancing node, by MAC or by IPv4
/// address. Every other vip node of the segment is a peer (in a control plane every
/// node is both a load balancer and a backend).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerKey {
    /// [`PeerKey::MAC`] or [`PeerKey::IPV4`].
    pub kind: u8,
    /// Explicit padding; always zero.
    pub _pad: [u8; 3],
    /// The MAC (wire order, first 6 bytes) or the IPv4 address (network order, first 4
    /// bytes); the rest zero.
    pub addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<PeerKey>() == 20);

impl PeerKey {
    pub const MAC: u8 = 1;
    pub const IPV4: u8 = 2;

    #[inline(always)]
    pub const fn mac(mac: [u8; 6]) -> Self {
        let mut addr = [0u8; 16];
        let mut i = 0;
        while i < 6 {
            addr[i] = mac[i];
            i += 1;
        }
        Self { kind: Self::MAC, _pad: [0; 3], addr }
    }

    #[inline(always)]
    pub const fn ipv4(ip: [u8; 4]) -> Self {
        let mut addr = [0u8; 16];
        let mut i = 0;
        while i < 4 {
            addr[i] = ip[i];
            i += 1;
        }
        Self { kind: Self::IPV4, _pad: [0; 3], addr }
    }
}

/// Per-CPU token bucket of the ICMP errors the data plane sends (fragmentation
/// needed): at most [`IcmpBudget::PER_SECOND`] per CPU, so a flood of oversized
/// packets cannot turn the node into an ICMP generator (RFC 1812 §4.3.2.8).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IcmpBudget {
    /// Start of the current one-second window, `bpf_ktime_get_boot_ns()`, host order.
    pub window_ns: u64,
    /// Errors sent in the window, host order.
    pub sent: u32,
    /// Explicit padding; always zero.
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<IcmpBudget>() == 16);

impl IcmpBudget {
    /// Per CPU and second. Enough for every client of a control plane to learn its path
    /// MTU at once; small against a flood.
    pub const PER_SECOND: u32 = 100;
}

/// Key of the connection table: the flow's 5-tuple as it arrives.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Source and destination IPv4, network order.
    pub src: [u8; 4],
    pub dst: [u8; 4],
    /// Source and destination ports, network order.
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    /// IP protocol.
    pub proto: u8,
    /// Explicit padding; always zero. Two scalar fields rather than `[u8; 3]`, so building
    /// a key on the data plane's hot path is plain stores, not a call into `memset`.
    pub _pad: u8,
    pub _pad2: u16,
}
const _: () = assert!(core::mem::size_of::<FlowKey>() == 16);

impl FlowKey {
    #[inline(always)]
    pub const fn new(src: [u8; 4], dst: [u8; 4], sport: [u8; 2], dport: [u8; 2], proto: u8) -> Self {
        Self { src, dst, sport, dport, proto, _pad: 0, _pad2: 0 }
    }

    /// The key as its 16 bytes read as two little-endian 64-bit words: `src | dst << 32`
    /// and `sport | dport << 16 | proto << 32` (each field's bytes in wire order). The data
    /// plane builds a key in this form, in registers, from 16-bit header loads, and
    /// compares it with two word compares; building it byte by byte would store bytes the
    /// word loads after it then read back (a store-forwarding stall each).
    #[inline(always)]
    pub const fn words(&self) -> [u64; 2] {
        #[cfg(target_endian = "little")]
        // SAFETY: 16 initialised bytes, 8-byte aligned; a little-endian word's memory is
        // its little-endian bytes. Two word loads, not sixteen byte loads.
        return unsafe { core::mem::transmute::<FlowKey, [u64; 2]>(*self) };
        #[cfg(not(target_endian = "little"))]
        {
            let (s, d, sp, dp) = (self.src, self.dst, self.sport, self.dport);
            [
                u32::from_le_bytes(s) as u64 | (u32::from_le_bytes(d) as u64) << 32,
                u16::from_le_bytes(sp) as u64 | (u16::from_le_bytes(dp) as u64) << 16 | (self.proto as u64) << 32,
            ]
        }
    }

    /// The key whose [`FlowKey::words`] are `w`; bits 40–63 of `w[1]` (the padding) are
    /// ignored.
    #[inline(always)]
    pub const fn from_words(w: [u64; 2]) -> Self {
        const FIELDS: u64 = (1 << 40) - 1;
        #[cfg(target_endian = "little")]
        // SAFETY: any 16 bytes are a valid FlowKey (integer fields only), the padding
        // masked to zero; as in `words`. Two word stores.
        return unsafe { core::mem::transmute::<[u64; 2], FlowKey>([w[0], w[1] & FIELDS]) };
        #[cfg(not(target_endian = "little"))]
        {
            let (a, b) = (w[0].to_le_bytes(), (w[1] & FIELDS).to_le_bytes());
            Self::new([a[0], a[1], a[2], a[3]], [a[4], a[5], a[6], a[7]], [b[0], b[1]], [b[2], b[3]], b[4])
        }
    }
}

/// Key of the IPv6 connection table: the flow's 5-tuple as it arrives.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey6 {
    /// Source and destination IPv6, network order.
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// Source and destination ports, network order.
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    /// IP protocol (the IPv6 next header).
    pub proto: u8,
    /// Explicit padding; always zero (two scalars, as in [`FlowKey`]).
    pub _pad: u8,
    pub _pad2: u16,
}
const _: () = assert!(core::mem::size_of::<FlowKey6>() == 40);

impl FlowKey6 {
    #[inline(always)]
    pub const fn new(src: [u8; 16], dst: [u8; 16], sport: [u8; 2], dport: [u8; 2], proto: u8) -> Self {
        Self { src, dst, sport, dport, proto, _pad: 0, _pad2: 0 }
    }

    /// The key as five words: the source address in `w[0..2]`, the destination in
    /// `w[2..4]` (each as [`words16`]) and `sport | dport << 16 | proto << 32` in `w[4]`
    /// (each field's bytes in memory order). The data plane builds a key in registers
    /// this way and compares it with five word compares, as [`FlowKey::words`].
    #[inline(always)]
    pub const fn words(&self) -> [u64; 5] {
        #[cfg(target_endian = "little")]
        // SAFETY: 40 initialised bytes, 8-byte aligned (see `FlowKey::words`).
        return unsafe { core::mem::transmute::<FlowKey6, [u64; 5]>(*self) };
        #[cfg(not(target_endian = "little"))]
        {
            let ([s0, s1], [d0, d1]) = (words16(&self.src), words16(&self.dst));
            let (sp, dp) = (self.sport, self.dport);
            let w4 = u16::from_le_bytes(sp) as u64 | (u16::from_le_bytes(dp) as u64) << 16 | (self.proto as u64) << 32;
            [s0, s1, d0, d1, w4]
        }
    }

    /// The key whose [`FlowKey6::words`] are `w`; bits 40–63 of `w[4]` (the padding) are
    /// ignored.
    #[inline(always)]
    pub const fn from_words(w: [u64; 5]) -> Self {
        const FIELDS: u64 = (1 << 40) - 1;
        #[cfg(target_endian = "little")]
        // SAFETY: any 40 bytes are a valid FlowKey6 (integer fields only), the padding
        // masked to zero; as in `words`.
        return unsafe { core::mem::transmute::<[u64; 5], FlowKey6>([w[0], w[1], w[2], w[3], w[4] & FIELDS]) };
        #[cfg(not(target_endian = "little"))]
        {
            let b = (w[4] & FIELDS).to_le_bytes();
            Self::new(bytes16([w[0], w[1]]), bytes16([w[2], w[3]]), [b[0], b[1]], [b[2], b[3]], b[4])
        }
    }

    /// The same flow with each address folded to 4 bytes (the XOR of its four 32-bit
    /// words): what [`flow_hash6`] hashes. Every node folds alike, so every node maps an
    /// IPv6 flow to the same Maglev slot.
    #[inline(always)]
    pub const fn folded(&self) -> FlowKey {
        FlowKey::new(fold16(&self.src), fold16(&self.dst), self.sport, self.dport, self.proto)
    }
}

#[inline(always)]
const fn fold16(a: &[u8; 16]) -> [u8; 4] {
    [a[0] ^ a[4] ^ a[8] ^ a[12], a[1] ^ a[5] ^ a[9] ^ a[13], a[2] ^ a[6] ^ a[10] ^ a[14], a[3] ^ a[7] ^ a[11] ^ a[15]]
}

/// [`flow_hash`] of an IPv6 flow (over [`FlowKey6::folded`]).
#[inline(always)]
pub const fn flow_hash6(key: &FlowKey6, seed: u32) -> u32 {
    flow_hash(&key.folded(), seed)
}

/// Key of the [`map_names::SERVICES6`] map: an IPv6 VIP, port and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey6 {
    /// VIP, network order.
    pub vip: [u8; 16],
    /// Destination port, network order.
    pub port: [u8; 2],
    /// IP protocol; only [`IPPROTO_TCP`] is forwarded.
    pub proto: u8,
    /// Explicit padding; always zero.
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<ServiceKey6>() == 20);

impl ServiceKey6 {
    pub const fn tcp(vip: [u8; 16], port: u16) -> Self {
        Self { vip, port: port.to_be_bytes(), proto: IPPROTO_TCP, _pad: 0 }
    }
}

/// Value of the connection table: the backend a flow is pinned to, and how it is
/// forwarded there, so an established flow needs no service lookup. The address is kept
/// beside the id so that a flow never follows a recycled id to another backend.
///
/// A pin holds for the flow as it arrives from the client: `from_mac` is the source MAC
/// of the frame that pinned it (the client's, or its router's). The same 5-tuple
/// arriving from another load-balancing node was already balanced there and is never
/// forwarded again, so no frame makes more than one DSR hop.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Conn {
    /// Backend id (< [`MAX_BACKENDS`]), host order.
    pub backend: u16,
    /// The service's [`ForwardMode`] when the flow was pinned.
    pub mode: u8,
    /// Explicit padding; always zero.
    pub _pad: u8,
    /// The backend's IPv4 address when the flow was pinned, network order (for an IPv6
    /// flow too: backends are known by their IPv4 address).
    pub backend_ip: [u8; 4],
    /// Source MAC of the frame that pinned the flow, wire order.
    pub from_mac: [u8; 6],
    /// Explicit padding; always zero.
    pub _pad2: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<Conn>() == 16);

impl Conn {
    /// The entry as its 16 bytes read as two little-endian 64-bit words: `backend | mode
    /// << 16 | backend_ip << 32` and `from_mac` in bits 0–47 (each field's bytes in
    /// memory order). The data plane reads an entry as two word loads this way.
    #[inline(always)]
    pub const fn words(&self) -> [u64; 2] {
        #[cfg(target_endian = "little")]
        // SAFETY: 16 initialised bytes, 8-byte aligned (see `FlowKey::words`).
        return unsafe { core::mem::transmute::<Conn, [u64; 2]>(*self) };
        #[cfg(not(target_endian = "little"))]
        {
            let (ip, m) = (self.backend_ip, self.from_mac);
            [
                self.backend as u64 | (self.mode as u64) << 16 | (u32::from_le_bytes(ip) as u64) << 32,
                u64::from_le_bytes([m[0], m[1], m[2], m[3], m[4], m[5], 0, 0]),
            ]
        }
    }
}
const _: () = assert!(MAX_BACKENDS <= u16::MAX as u32);

/// Entries of the per-CPU flow cache, a power of two (the flow hash is masked). An
/// established flow's packets arrive on one CPU (RSS), so each CPU caches its own flows:
/// a hit costs an inlined array lookup and a key compare instead of a hash-table lookup
/// that also writes the shared LRU state.
pub const FLOW_CACHE_SLOTS: u32 = 4096;

/// One per-CPU flow-cache entry: a connection-table entry and the flow it is for, valid
/// while [`Config::generation`] is unchanged (a backend's flags changing invalidates
/// every entry, so a flow is never sent to a backend the connection table no longer
/// names for it).
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CachedFlow {
    pub key: FlowKey,
    pub conn: Conn,
    /// [`Config::generation`] when cached, host order; entries start invalid because the
    /// agent's first generation is 1.
    pub generation: u32,
    /// Explicit padding; always zero.
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<CachedFlow>() == 40);

/// [`CachedFlow`] of an IPv6 flow: an entry of the per-CPU cache in front of the IPv6
/// connection table, valid while [`Config::generation`] is unchanged.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CachedFlow6 {
    pub key: FlowKey6,
    pub conn: Conn,
    /// [`Config::generation`] when cached, host order.
    pub generation: u32,
    /// Explicit padding; always zero.
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<CachedFlow6>() == 64);

/// Per-backend counters (per CPU), host order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendStats {
    pub packets: u64,
    /// Bytes of the frames as received (L2 included).
    pub bytes: u64,
}
const _: () = assert!(core::mem::size_of::<BackendStats>() == 16);

/// The flow hash both sides agree on (the agent uses it in tests and tools to predict
/// where a flow lands). A Murmur3-style mix of the 5-tuple: cheap in BPF, no tables, and
/// the same on every node with the same `seed` ([`Config::hash_seed`]), so every node
/// maps a flow to the same Maglev slot.
#[inline(always)]
pub const fn flow_hash(key: &FlowKey, seed: u32) -> u32 {
    flow_hash_words(key.words(), seed)
}

/// [`flow_hash`] of the key whose [`FlowKey::words`] are `w`: what the data plane
/// computes, from registers.
#[inline(always)]
pub const fn flow_hash_words(w: [u64; 2], seed: u32) -> u32 {
    let a = w[0] as u32;
    let b = (w[0] >> 32) as u32;
    // The ports swapped: the source port's bytes in the high half.
    let c = (w[1] as u32).rotate_left(16);
    let mut h: u32 = 0x9747_b28c ^ seed ^ (w[1] >> 32) as u8 as u32;
    h = mix(h, a);
    h = mix(h, b);
    h = mix(h, c);
    fmix32(h ^ 12)
}

#[inline(always)]
const fn mix(h: u32, k: u32) -> u32 {
    let k = k.wrapping_mul(0xcc9e_2d51).rotate_left(15).wrapping_mul(0x1b87_3593);
    (h ^ k).rotate_left(13).wrapping_mul(5).wrapping_add(0xe654_6b64)
}

#[inline(always)]
const fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Multiplier of Fibonacci hashing, ⌊2⁶⁴/φ⌋ (Knuth, TAOCP vol. 3, §6.4): the top bits of
/// the product depend on every bit of the multiplicand.
const FIBONACCI: u64 = 0x9e37_79b9_7f4a_7c15;

/// The flow-cache slot of the flow whose [`FlowKey::words`] are `key` (`seed`: the
/// cluster's hash seed, so that nobody outside can aim flows at one slot): one multiply.
/// Not [`flow_hash`], whose serial Murmur rounds put about 10 ns on every
/// established packet: a slot needs spread on this CPU, not agreement between nodes
/// (that is the Maglev slot's job, and only a new flow needs it). A collision only
/// costs a connection-table lookup; the entry's key is compared whole.
#[inline(always)]
pub const fn cache_slot([w0, w1]: [u64; 2], seed: u32) -> u32 {
    // w1 holds the ports in bits 0–31 and the protocol above; the ports move up to vary
    // the other half of the product.
    let x = w0 ^ w1 << 32 ^ w1 >> 32 ^ seed as u64;
    (x.wrapping_mul(FIBONACCI) >> (64 - FLOW_CACHE_SLOTS.trailing_zeros())) as u32
}

/// [`cache_slot`] of an IPv6 flow given as its [`FlowKey6::words`]: the address words
/// folded by XOR.
#[inline(always)]
pub const fn cache_slot6(w: [u64; 5], seed: u32) -> u32 {
    cache_slot([w[0] ^ w[1] ^ w[2] ^ w[3], w[4]], seed)
}

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

/// Key of the [`map_names::VIPS6`] map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Vip6Key {
    /// The VIP's IPv6 address in network byte order (as in the IPv6 header and the
    /// Neighbor Solicitation's target field).
    pub addr: [u8; 16],
}
const _: () = assert!(core::mem::size_of::<Vip6Key>() == 16);

impl Vip6Key {
    pub const fn new(addr: [u8; 16]) -> Self {
        Self { addr }
    }
}

/// Value of the [`map_names::VIPS6`] map: an IPv6 VIP's [`VipState`] and, as
/// [`VipSet::balance_until_ns`] is for IPv4, until when this node load-balances its new
/// flows (a leader handing over keeps balancing while clients move).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Vip6State {
    pub state: VipState,
    /// Balance new flows while `bpf_ktime_get_boot_ns() <` this (host order; 0: never,
    /// [`VipState::FOREVER`]: always).
    pub balance_until_ns: u64,
}
const _: () = assert!(core::mem::size_of::<Vip6State>() == 24);

/// Value of the [`map_names::VIPS`] map (and part of [`Vip6State`]): whether this node
/// answers for the VIP (ARP, or Neighbor Solicitations for an IPv6 VIP), and until when.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipState {
    /// Deadline of this node's leadership on the `bpf_ktime_get_ns()` clock
    /// (CLOCK_BOOTTIME, nanoseconds, host order: it keeps counting while the host is
    /// suspended, so a resumed leader's deadline has passed). The program answers ARP for the VIP
    /// only while `now < leader_until_ns` and [`VipState::F_LEADER`] is set. The agent
    /// pushes it forward on every successful lease renewal, so an agent that crashes,
    /// hangs or is cut off stops answering by itself before its lease can expire.
    /// [`VipState::FOREVER`] means no deadline (`--election none`).
    pub leader_until_ns: u64,
    /// Bit set of `F_*` flags, host order.
    pub flags: u32,
    /// The L2 segment the VIP lives on ([`segment_of`]; 0: untagged), host order. ARP
    /// for the VIP on any other segment is not answered, nor dropped: it is not ours.
    pub segment: u16,
    /// Explicit padding to an 8-byte multiple; always zero.
    pub _pad: u16,
}
const _: () = assert!(core::mem::size_of::<VipState>() == 16);

impl VipState {
    /// This node leads the VIP: answer ARP requests for it (until the deadline).
    pub const F_LEADER: u32 = 1 << 0;
    /// This node's agent is probing for the VIP before claiming it (RFC 5227 §2.1.1): a
    /// follower passes other hosts' ARP probes for it (sender IP 0.0.0.0) instead of
    /// dropping them, so the agent sees a node that probes at the same time and both back
    /// off. (The kernel does not answer them: the VIP is on `lo` and the agent sets
    /// `arp_ignore` on the interface.) Cleared when the probe ends.
    pub const F_PROBING: u32 = 1 << 1;
    /// Deadline that never passes.
    pub const FOREVER: u64 = u64::MAX;
    /// How long past its balancing deadline a node goes on balancing its clients' new
    /// flows when nothing rewrote the deadline (its agent was killed or hangs; an agent
    /// that steps down writes a balancing deadline of 0, which ends balancing at once).
    /// Clients reach the old leader until the new one's gratuitous ARP, about a lease
    /// duration after the deadline. Delivered to the old leader's own stack unpinned, as
    /// before, such a flow moved with its client to the new leader, whose Maglev table
    /// sent it to another backend: reset. Balanced by the old leader's last table, the
    /// same as the new leader's while their health views agree, it keeps its backend.
    /// Frames from peers are never balanced again, in the grace as ever.
    pub const BALANCE_GRACE_NS: u64 = 5_000_000_000;

    /// A VIP this node leads until `until_ns` on the kernel's monotonic clock.
    pub const fn leader_until(until_ns: u64) -> Self {
        Self { leader_until_ns: until_ns, flags: Self::F_LEADER, segment: 0, _pad: 0 }
    }

    /// A VIP this node serves but does not lead: ARP requests for it are dropped.
    pub const fn follower() -> Self {
        Self { leader_until_ns: 0, flags: 0, segment: 0, _pad: 0 }
    }

    /// The same state with [`VipState::F_PROBING`] set.
    pub const fn probing(mut self) -> Self {
        self.flags |= Self::F_PROBING;
        self
    }

    /// The same state for a VIP on VLAN `segment` (see [`segment_of`]).
    pub const fn on_segment(mut self, segment: u16) -> Self {
        self.segment = segment;
        self
    }

    /// Whether this node answers ARP for the VIP at `now_ns` (kernel boot-time clock).
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
    /// ARP request or Neighbor Solicitation for a led VIP while no MAC is configured:
    /// `XDP_DROP`.
    ArpNoConfig = 6,
    /// Frame shorter than its Ethernet (and VLAN) headers: `XDP_PASS`.
    EthMalformed = 7,
    /// Anything that is neither ARP nor IP: `XDP_PASS`.
    NotArpPassed = 8,
    /// IPv4 to an address that is not a VIP: `XDP_PASS`.
    NotVip = 9,
    /// IPv4 header truncated or invalid (version, IHL): `XDP_PASS`.
    IpMalformed = 10,
    /// Fragment (first or not) to a VIP: `XDP_PASS`. Non-first fragments carry no ports
    /// to hash, so all fragments go to the local stack, which reassembles them.
    Fragment = 11,
    /// ICMP to a VIP that is not an error about a VIP service flow (echo, …): `XDP_PASS`
    /// to the local stack.
    VipIcmp = 12,
    /// Other non-TCP protocols to a VIP: `XDP_PASS`.
    VipNotTcp = 13,
    /// TCP to a VIP whose header is truncated: `XDP_PASS`, the kernel drops it.
    TcpMalformed = 14,
    /// TCP to a VIP on a port that is not a service: `XDP_PASS`.
    VipOtherPort = 15,
    /// Service in `local` mode: `XDP_PASS`.
    LocalMode = 16,
    /// No healthy backend in the table: `XDP_PASS`, so the local apiserver (if any) still
    /// answers and a client otherwise gets a prompt RST instead of a timeout.
    NoBackend = 17,
    /// The chosen backend is this node: `XDP_PASS`.
    LocalBackend = 18,
    /// Forwarded by DSR (MAC rewrite): `XDP_TX`.
    ForwardedDsr = 19,
    /// Forwarded in IPIP: `XDP_TX`.
    ForwardedIpip = 20,
    /// IPIP forwarding failed before the FIB was asked (no node address configured, no
    /// room for the header): `XDP_PASS` to the local stack, or `XDP_DROP` if the frame
    /// was already half rewritten.
    IpipFailed = 21,
    /// IPIP from a peer to this node whose inner packet is for a VIP service: outer
    /// header stripped, `XDP_PASS`.
    IpipDecap = 22,
    /// TCP to a VIP service on a node that does not balance it (a follower receiving
    /// DSR traffic from the leader): `XDP_PASS` to the local stack.
    NotBalancing = 23,
    /// A frame for a VIP (ARP or IPv4) addressed to another host's MAC, seen because the
    /// NIC is promiscuous or the switch flooded it: `XDP_PASS` untouched (the kernel
    /// drops it as `PACKET_OTHERHOST`). Never answered, never forwarded: what we send
    /// carries our own MAC, and only for frames sent to us.
    NotForUs = 24,
    /// ARP or traffic for a VIP arriving on another L2 segment (VLAN) than the VIP's:
    /// `XDP_PASS`, not ours.
    OtherSegment = 25,
    /// A new flow to a VIP service from another load-balancing node's MAC: that node
    /// already balanced it (DSR), so it goes up the local stack, never out again.
    BalancedByPeer = 26,
    /// IPIP that is not ours to decapsulate (outer source not a peer, outer destination
    /// not this node, inner packet not for a VIP service): `XDP_PASS` untouched.
    IpipNotOurs = 27,
    /// Too big for the egress MTU once encapsulated, DF set: answered with ICMP
    /// fragmentation needed (next-hop MTU = MTU − 20), `XDP_TX`.
    IpipFragNeeded = 28,
    /// Too big once encapsulated, and DF clear or the ICMP budget spent: `XDP_DROP`
    /// (handing it to the local stack, which holds the VIP, would reset the connection).
    IpipTooBig = 29,
    /// IPIP: the FIB has a route but no neighbour entry for the next hop yet:
    /// `XDP_PASS` (the kernel resolves it; the agent's checks keep it resolved).
    IpipNoNeigh = 30,
    /// IPIP: no usable route to the backend (unreachable, blackhole, prohibited): `XDP_PASS`.
    IpipNoRoute = 31,
    /// IPIP: forwarding is disabled on the interface, so the FIB refuses output
    /// lookups: `XDP_PASS` (the agent enables it in IPIP mode).
    IpipForwardingDisabled = 32,
    /// ICMP destination unreachable (fragmentation needed, …), or ICMPv6 Packet Too Big,
    /// quoting a VIP service flow (the VIP's answer to a client, sent by a backend by
    /// DSR): forwarded to the backend that holds the flow, by its forward mode, so path
    /// MTU discovery works through the VIP.
    IcmpToBackend = 33,
    /// ICMP destination unreachable (or ICMPv6 Packet Too Big) to a VIP whose quote is too
    /// short to name a flow (less than the IP header and the TCP ports): `XDP_DROP`.
    IcmpQuoteTruncated = 34,
    /// A VIP-path probe from another node while this node's agent leaves
    /// ([`Config::F_LEAVING`]): answered with a TCP RST from the VIP (`XDP_TX`; other TCP
    /// from that node to the VIP: `XDP_DROP`), so that node drains this one, and knows
    /// it gone once the answers stop.
    ProbeRefusedLeaving = 35,
    /// Another host's ARP probe (sender IP 0.0.0.0) for a VIP this node does not lead,
    /// while this node's agent probes for it too ([`VipState::F_PROBING`]): `XDP_PASS`,
    /// so the agent sees the simultaneous claim and backs off.
    ArpProbeWhileProbing = 36,
    /// Neighbor Solicitation for an IPv6 VIP this node leads: answered in place with a
    /// Neighbor Advertisement (RFC 4861 §7.2.4), `XDP_TX`.
    NsReplied = 37,
    /// Neighbor Solicitation for an IPv6 VIP this node does not lead (or whose deadline
    /// passed): `XDP_DROP`, as for ARP.
    NsFollowerDropped = 38,
    /// Neighbor Solicitation for an address that is not a VIP: `XDP_PASS`.
    NsNotVip = 39,
    /// Neighbor Solicitation for a VIP that fails RFC 4861 §7.1.1 validation (hop limit
    /// not 255, code not 0, shorter than 24 bytes, a DAD probe not sent to the
    /// solicited-node group or carrying a source link-layer option): `XDP_PASS`, the
    /// kernel validates and drops it. (A solicitation for a multicast target is not for a
    /// VIP; one after extension headers is not parsed.)
    NdpMalformed = 40,
    /// Another host's Duplicate Address Detection probe (source `::`) for a VIP this node
    /// does not lead, while this node's agent probes for it too ([`VipState::F_PROBING`]):
    /// `XDP_PASS`, so the agent sees the simultaneous claim (the IPv6 twin of
    /// [`Reason::ArpProbeWhileProbing`]).
    NsProbeWhileProbing = 41,
    /// IPv6 that is neither a Neighbor Solicitation for a VIP, nor TCP or a Packet Too Big
    /// to a VIP (ping, UDP, extension headers, other addresses): `XDP_PASS`. (Those are
    /// counted under the forwarding and ICMP reasons, as IPv4's are.)
    Ipv6Passed = 42,
    /// Neighbor Solicitation for a led VIP that the program could not grow into the
    /// advertisement (the driver left no tailroom): `XDP_PASS`, unanswered.
    NsNoTailroom = 43,
    /// A frame for a VIP on a VLAN (`--vlan`) that arrived at XDP with no tag in it:
    /// untagged on the wire, or tagged with the tag stripped into metadata by the NIC,
    /// which XDP cannot read. `XDP_PASS`: the tcx companion (`vip_tcx_vlan`) decides it
    /// with the tag from the skb (answered on the VIP's VLAN, else `other_segment`).
    UntaggedAtXdp = 44,
}

impl Reason {
    /// Number of counter slots. Larger than the number of reasons so later reasons do not
    /// resize the map.
    pub const SLOTS: u32 = 64;

    /// Reasons worth a log line when the data plane's debug log is on: malformed frames,
    /// a missing configuration or backend, every IPIP failure and refusal, truncated ICMP
    /// quotes. Each is off the established-flow path and, on a healthy node, rare; the
    /// frequent ones (replies, forwards, frames for others) never log.
    const RARE: u64 = 1 << Reason::ArpMalformed as u64
        | 1 << Reason::ArpNoConfig as u64
        | 1 << Reason::EthMalformed as u64
        | 1 << Reason::IpMalformed as u64
        | 1 << Reason::TcpMalformed as u64
        | 1 << Reason::NoBackend as u64
        | 1 << Reason::IpipFailed as u64
        | 1 << Reason::IpipNotOurs as u64
        | 1 << Reason::IpipFragNeeded as u64
        | 1 << Reason::IpipTooBig as u64
        | 1 << Reason::IpipNoNeigh as u64
        | 1 << Reason::IpipNoRoute as u64
        | 1 << Reason::IpipForwardingDisabled as u64
        | 1 << Reason::IcmpQuoteTruncated as u64
        | 1 << Reason::NdpMalformed as u64
        | 1 << Reason::NsNoTailroom as u64;
    // (ProbeRefusedLeaving is expected while an agent stops: not logged.)

    /// Whether a frame with this verdict is logged at debug level (see [`Reason::RARE`]).
    #[inline(always)]
    pub const fn is_rare(self) -> bool {
        Self::RARE & (1 << self as u64) != 0
    }

    /// Every reason, in index order: what the agent's status and metrics iterate over.
    pub const ALL: [Reason; 45] = [
        Reason::ArpReplied,
        Reason::ArpFollowerDropped,
        Reason::ArpGratuitous,
        Reason::ArpNotRequest,
        Reason::ArpNotVip,
        Reason::ArpMalformed,
        Reason::ArpNoConfig,
        Reason::EthMalformed,
        Reason::NotArpPassed,
        Reason::NotVip,
        Reason::IpMalformed,
        Reason::Fragment,
        Reason::VipIcmp,
        Reason::VipNotTcp,
        Reason::TcpMalformed,
        Reason::VipOtherPort,
        Reason::LocalMode,
        Reason::NoBackend,
        Reason::LocalBackend,
        Reason::ForwardedDsr,
        Reason::ForwardedIpip,
        Reason::IpipFailed,
        Reason::IpipDecap,
        Reason::NotBalancing,
        Reason::NotForUs,
        Reason::OtherSegment,
        Reason::BalancedByPeer,
        Reason::IpipNotOurs,
        Reason::IpipFragNeeded,
        Reason::IpipTooBig,
        Reason::IpipNoNeigh,
        Reason::IpipNoRoute,
        Reason::IpipForwardingDisabled,
        Reason::IcmpToBackend,
        Reason::IcmpQuoteTruncated,
        Reason::ProbeRefusedLeaving,
        Reason::ArpProbeWhileProbing,
        Reason::NsReplied,
        Reason::NsFollowerDropped,
        Reason::NsNotVip,
        Reason::NdpMalformed,
        Reason::NsProbeWhileProbing,
        Reason::Ipv6Passed,
        Reason::NsNoTailroom,
        Reason::UntaggedAtXdp,
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
            Reason::NotVip => "not_vip",
            Reason::IpMalformed => "ip_malformed",
            Reason::Fragment => "fragment",
            Reason::VipIcmp => "vip_icmp",
            Reason::VipNotTcp => "vip_not_tcp",
            Reason::TcpMalformed => "tcp_malformed",
            Reason::VipOtherPort => "vip_other_port",
            Reason::LocalMode => "local_mode",
            Reason::NoBackend => "no_backend",
            Reason::LocalBackend => "local_backend",
            Reason::ForwardedDsr => "forwarded_dsr",
            Reason::ForwardedIpip => "forwarded_ipip",
            Reason::IpipFailed => "ipip_failed",
            Reason::IpipDecap => "ipip_decap",
            Reason::NotBalancing => "not_balancing",
            Reason::NotForUs => "not_for_us",
            Reason::OtherSegment => "other_segment",
            Reason::BalancedByPeer => "balanced_by_peer",
            Reason::IpipNotOurs => "ipip_not_ours",
            Reason::IpipFragNeeded => "ipip_frag_needed",
            Reason::IpipTooBig => "ipip_too_big",
            Reason::IpipNoNeigh => "ipip_no_neigh",
            Reason::IpipNoRoute => "ipip_no_route",
            Reason::IpipForwardingDisabled => "ipip_forwarding_disabled",
            Reason::IcmpToBackend => "icmp_to_backend",
            Reason::IcmpQuoteTruncated => "icmp_quote_truncated",
            Reason::ProbeRefusedLeaving => "probe_refused_leaving",
            Reason::ArpProbeWhileProbing => "arp_probe_while_probing",
            Reason::NsReplied => "ns_replied",
            Reason::NsFollowerDropped => "ns_follower_dropped",
            Reason::NsNotVip => "ns_not_vip",
            Reason::NdpMalformed => "ndp_malformed",
            Reason::NsProbeWhileProbing => "ns_probe_while_probing",
            Reason::Ipv6Passed => "ipv6_passed",
            Reason::NsNoTailroom => "ns_no_tailroom",
            Reason::UntaggedAtXdp => "untagged_at_xdp",
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
    unsafe impl aya::Pod for super::Vip6Key {}
    unsafe impl aya::Pod for super::Vip6State {}
    unsafe impl aya::Pod for super::VipState {}
    unsafe impl aya::Pod for super::VipSet {}
    unsafe impl aya::Pod for super::VipSet6 {}
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::Service {}
    unsafe impl aya::Pod for super::MaglevRow {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowKey6 {}
    unsafe impl aya::Pod for super::ServiceKey6 {}
    unsafe impl aya::Pod for super::Conn {}
    unsafe impl aya::Pod for super::BackendStats {}
    unsafe impl aya::Pod for super::PeerKey {}
    unsafe impl aya::Pod for super::IcmpBudget {}
    unsafe impl aya::Pod for super::CachedFlow {}
    unsafe impl aya::Pod for super::CachedFlow6 {}
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Maglev slot keeps the format from before holders when it has none, and both
    /// halves round-trip for every id, with or without a new-flow backend.
    #[test]
    fn a_maglev_slot_holds_a_new_flow_backend_and_a_holder() {
        assert_eq!(MaglevSlot::new(7, None).0, 7);
        assert_eq!(MaglevSlot::new(NO_BACKEND, None).0, NO_BACKEND);
        assert_eq!((MaglevSlot(7).id(), MaglevSlot(7).holder()), (7, None));
        assert_eq!((MaglevSlot(NO_BACKEND).id(), MaglevSlot(NO_BACKEND).holder()), (NO_BACKEND, None));
        for id in [0, 1, 512, MAX_BACKENDS - 1, NO_BACKEND] {
            for holder in [0, 5, MAX_BACKENDS - 1] {
                let slot = MaglevSlot::new(id, Some(holder));
                assert_eq!((slot.id(), slot.holder()), (id, Some(holder)), "{id} held by {holder}: {:#x}", slot.0);
            }
        }
    }

    /// The fold of an IPv6 address is the XOR of its four 32-bit words, worked by hand:
    /// 2001:db8:0:1::10 is 20010db8 00000001 00000000 00000010, whose XOR is 20010da9.
    #[test]
    fn an_ipv6_flow_folds_each_address_to_the_xor_of_its_words() {
        let src = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0x10];
        let dst = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x01, 0x00];
        let flow = FlowKey6::new(src, dst, 40000u16.to_be_bytes(), 6443u16.to_be_bytes(), IPPROTO_TCP);
        let folded = flow.folded();
        assert_eq!(folded.src, [0x20, 0x01, 0x0d, 0xa9]);
        assert_eq!(folded.dst, [0xfd, 0x00, 0x01, 0x00]);
        assert_eq!((folded.sport, folded.dport, folded.proto), (flow.sport, flow.dport, IPPROTO_TCP));
        assert_eq!(flow_hash6(&flow, 7), flow_hash(&folded, 7));
        // Every word counts: clients that differ only in a high word hash apart.
        for word in 0..4 {
            let mut other = flow;
            other.src[word * 4] ^= 0x40;
            assert_ne!(flow_hash6(&other, 7), flow_hash6(&flow, 7), "word {word} ignored");
        }
    }

    /// The flow hash never changes between versions: nodes mid-upgrade must map every
    /// flow to the same Maglev slot. Known answers from the byte-wise definition (the
    /// data plane now hashes the key's words), worked out independently.
    #[test]
    fn the_flow_hash_keeps_its_known_answers() {
        let cases = [
            (([10, 0, 0, 1], [10, 0, 0, 100], 40000u16, 6443u16, IPPROTO_TCP, 0u32), 0x38f2_bc28u32),
            (([192, 168, 1, 20], [192, 168, 1, 5], 51234, 6443, IPPROTO_TCP, 0xdead_beef), 0x80c8_d6ce),
            (([172, 16, 5, 9], [10, 96, 0, 1], 1, 443, 17, 7), 0x1f0f_3aff),
        ];
        for ((src, dst, sport, dport, proto, seed), want) in cases {
            let key = FlowKey::new(src, dst, sport.to_be_bytes(), dport.to_be_bytes(), proto);
            assert_eq!(flow_hash(&key, seed), want, "{key:?} seed {seed:#x}");
            assert_eq!(FlowKey::from_words(key.words()), key);
            assert_eq!(flow_hash_words(key.words(), seed), want);
        }
    }

    /// The words the data plane builds in registers are the key's bytes, field by field.
    #[test]
    fn flow_key_and_conn_words_are_their_bytes_in_memory_order() {
        let key = FlowKey::new([1, 2, 3, 4], [5, 6, 7, 8], [9, 10], [11, 12], 13);
        assert_eq!(key.words(), [0x0807_0605_0403_0201, 0x0d_0c0b_0a09]);
        // Padding bits are dropped, not stored.
        assert_eq!(FlowKey::from_words([0, u64::MAX]).words(), [0, (1 << 40) - 1]);

        let src: [u8; 16] = core::array::from_fn(|i| i as u8 + 1);
        let key6 = FlowKey6::new(src, [0xfd; 16], [0x21, 0x22], [0x23, 0x24], 6);
        let want6 = [
            0x0807_0605_0403_0201,
            0x100f_0e0d_0c0b_0a09,
            0xfdfd_fdfd_fdfd_fdfd,
            0xfdfd_fdfd_fdfd_fdfd,
            0x06_2423_2221,
        ];
        assert_eq!(key6.words(), want6);
        assert_eq!(FlowKey6::from_words(want6), key6);
        assert_eq!(FlowKey6::from_words([0, 0, 0, 0, u64::MAX]).words(), [0, 0, 0, 0, (1 << 40) - 1]);
        let conn = Conn {
            backend: 0x0102,
            mode: 3,
            _pad: 0,
            backend_ip: [4, 5, 6, 7],
            from_mac: [8, 9, 10, 11, 12, 13],
            _pad2: [0; 2],
        };
        assert_eq!(conn.words(), [0x0706_0504_0003_0102, 0x0d0c_0b0a_0908]);
    }

    /// The per-CPU flow cache is direct-mapped: flows that vary only where real traffic
    /// varies (one client's source ports; many clients on one port) must spread over its
    /// slots, or they would evict each other on every packet.
    #[test]
    fn flows_spread_over_the_flow_cache_slots() {
        let n = FLOW_CACHE_SLOTS as usize;
        let distinct = |slots: &mut dyn Iterator<Item = u32>| {
            let mut seen = [false; FLOW_CACHE_SLOTS as usize];
            slots.filter(|&s| !core::mem::replace(&mut seen[s as usize], true)).count()
        };
        let vip = [10, 96, 0, 1];
        let by_port = (0..n as u32).map(|i| {
            let key = FlowKey::new([192, 168, 7, 9], vip, ((32768 + i) as u16).to_be_bytes(), 6443u16.to_be_bytes(), 6);
            cache_slot(key.words(), 0x5eed)
        });
        let by_client = (0..n as u32).map(|i| {
            let src = (0x0a00_0000 + i).to_be_bytes();
            cache_slot(FlowKey::new(src, vip, 40000u16.to_be_bytes(), 6443u16.to_be_bytes(), 6).words(), 0x5eed)
        });
        let by_client6 = (0..n as u32).map(|i| {
            let mut src = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
            src[12..].copy_from_slice(&i.to_be_bytes());
            let key = FlowKey6::new(src, [0xfd; 16], 40000u16.to_be_bytes(), 6443u16.to_be_bytes(), 6);
            cache_slot6(key.words(), 0x5eed)
        });
        // n random draws into n slots fill 1 - 1/e of them (63 %).
        for (what, count) in [
            ("ports", distinct(&mut by_port.clone())),
            ("clients", distinct(&mut by_client.clone())),
            ("clients6", distinct(&mut by_client6.clone())),
        ] {
            assert!(count > n / 2, "{what}: {count} of {n} slots");
        }
        assert!(by_port.chain(by_client).all(|s| s < FLOW_CACHE_SLOTS));
    }
}
