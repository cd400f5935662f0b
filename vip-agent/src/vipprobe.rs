//! Does a backend on another node accept traffic for the VIP? An apiserver can pass
//! `/readyz` on its own address while its node no longer holds the VIP on `lo` (its
//! agent was stopped), and DSR delivers VIP traffic there unchanged: it would be
//! dropped. IPIP needs the node's data plane besides, to decapsulate (a node whose
//! agent stopped, or that runs at tcx, does not). So, for backends that are not this
//! node, health also requires this probe: a TCP SYN to VIP:port, from this node's
//! address, sent as the data plane sends VIP traffic there ([`Via`]: in a frame to the
//! backend's MAC, or encapsulated to its address), answered by a SYN-ACK from VIP:port.
//! The probe then resets the half-open connection itself: the SYN-ACK comes from the
//! VIP, which this node also holds on `lo`, so its kernel drops it silently instead of
//! resetting, and every probe would leave a SYN-RECV socket on the backend.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, Instant},
};

use vip_common::{PROBE6_WINDOW, REFUSAL_WINDOW};

use crate::rawsock::{cbpf, insn, RawSocket};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
/// IPv4-in-IPv4 (RFC 2003).
const IPPROTO_IPIP: u8 = 4;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// Everything a probe needs.
#[derive(Clone, Copy, Debug)]
pub struct VipProbe {
    pub ifindex: u32,
    pub src_mac: [u8; 6],
    pub src_ip: Ipv4Addr,
    pub vip: Ipv4Addr,
    pub port: u16,
}

/// Everything an IPv6 VIP's probe needs (DSR only: IPIP carries no IPv6 VIP): this
/// node's IPv6 address on the interface, which the backend answers by its routes, as it
/// answers the clients of the IPv6 VIPs.
#[derive(Clone, Copy, Debug)]
pub struct VipProbe6 {
    pub ifindex: u32,
    pub src_mac: [u8; 6],
    pub src_ip: Ipv6Addr,
    pub port: u16,
}

/// How the probe reaches the backend: as the data plane sends it VIP traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// DSR: the SYN in a frame to the backend's MAC.
    Dsr { mac: [u8; 6] },
    /// IPIP: the SYN inside an outer IPv4 header (protocol 4, DF) from this node's
    /// address to the backend's, in a frame to the next hop's MAC.
    Ipip { nexthop_mac: [u8; 6] },
}

#[derive(Debug, thiserror::Error)]
pub enum VipProbeError {
    #[error("raw socket: {0}")]
    Socket(io::Error),
    #[error("no SYN-ACK from {vip}:{port} through {backend} within {timeout:?}")]
    NoAnswer { vip: IpAddr, port: u16, backend: Ipv4Addr, timeout: Duration },
    /// The backend's data plane answered with a RST: its agent is leaving (it refuses
    /// VIP traffic so the others drain it), where silence means no data plane at all.
    #[error("{vip}:{port} through {backend} refused: its node is leaving")]
    Refused { vip: IpAddr, port: u16, backend: Ipv4Addr },
    /// The backend's host answered with its own RST (not a leaving node's: no
    /// [`REFUSAL_WINDOW`]): it holds the VIP, but nothing there listens on VIP:port.
    #[error(
        "{vip}:{port} through {backend} reset by its host: nothing there accepts VIP traffic on port {port} \
         (an apiserver listening on its node's address only? it must listen on every address, or the VIP's)"
    )]
    Reset { vip: IpAddr, port: u16, backend: Ipv4Addr },
}

/// One's-complement sum of 16-bit words.
fn sum16(data: &[u8], mut acc: u32) -> u32 {
    for c in data.chunks(2) {
        acc += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    !(acc as u16)
}

/// The SYN frame: Ethernet to `dst_mac`, IPv4 `p.src_ip` → VIP, TCP `sport` → port.
pub fn syn_frame(p: &VipProbe, dst_mac: [u8; 6], sport: u16, seq: u32) -> Vec<u8> {
    segment(p, dst_mac, sport, seq, TCP_SYN)
}

/// The RST that closes the probe's half-open connection: sequence number = the
/// SYN-ACK's acknowledgement (our SYN's + 1), RFC 9293 §3.10.7.3.
pub fn rst_frame(p: &VipProbe, dst_mac: [u8; 6], sport: u16, seq: u32) -> Vec<u8> {
    segment(p, dst_mac, sport, seq.wrapping_add(1), TCP_RST)
}

fn segment(p: &VipProbe, dst_mac: [u8; 6], sport: u16, seq: u32, flags: u8) -> Vec<u8> {
    let mut tcp = Vec::with_capacity(20);
    tcp.extend(sport.to_be_bytes());
    tcp.extend(p.port.to_be_bytes());
    tcp.extend(seq.to_be_bytes());
    tcp.extend(0u32.to_be_bytes());
    let window: [u8; 2] = if flags == TCP_RST { [0, 0] } else { [0xfa, 0xf0] };
    tcp.extend([0x50, flags, window[0], window[1], 0, 0, 0, 0]);
    let mut pseudo = Vec::with_capacity(12);
    pseudo.extend(p.src_ip.octets());
    pseudo.extend(p.vip.octets());
    pseudo.extend([0, 6, 0, 20]);
    let csum = fold(sum16(&tcp, sum16(&pseudo, 0)));
    tcp[16..18].copy_from_slice(&csum.to_be_bytes());
    let mut ip = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0];
    ip.extend(p.src_ip.octets());
    ip.extend(p.vip.octets());
    let csum = fold(sum16(&ip, 0));
    ip[10..12].copy_from_slice(&csum.to_be_bytes());
    let mut f = Vec::with_capacity(54);
    f.extend(dst_mac);
    f.extend(p.src_mac);
    f.extend(ETH_P_IP.to_be_bytes());
    f.extend(ip);
    f.extend(tcp);
    f
}

/// `frame` (Ethernet, then an IPv4 packet) with that packet inside an outer IPv4
/// header from `p.src_ip` to `backend` (RFC 2003; DF, as the data plane sends).
pub fn encapsulated(p: &VipProbe, backend: Ipv4Addr, frame: &[u8]) -> Vec<u8> {
    let (eth, packet) = frame.split_at(14);
    let total = u16::try_from(20 + packet.len()).unwrap_or(u16::MAX);
    let mut outer = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, IPPROTO_IPIP, 0, 0];
    outer[2..4].copy_from_slice(&total.to_be_bytes());
    outer.extend(p.src_ip.octets());
    outer.extend(backend.octets());
    let csum = fold(sum16(&outer, 0));
    outer[10..12].copy_from_slice(&csum.to_be_bytes());
    let mut f = Vec::with_capacity(frame.len() + 20);
    f.extend(eth);
    f.extend(outer);
    f.extend(packet);
    f
}

/// The IPv6 SYN (`rst`: the RST after it) for VIP `vip`: Ethernet to `dst_mac`, IPv6
/// `p.src_ip` → `vip` (hop limit 64, no extension header), TCP `sport` → port, no
/// option, the SYN's window [`PROBE6_WINDOW`], the checksum over RFC 8200 §8.1's
/// pseudo-header.
pub fn segment6(p: &VipProbe6, vip: Ipv6Addr, dst_mac: [u8; 6], sport: u16, seq: u32, rst: bool) -> Vec<u8> {
    // The SYN's window marks it as a probe for a leaving node's data plane (see
    // `PROBE6_WINDOW`).
    let (seq, flags, window) =
        if rst { (seq.wrapping_add(1), TCP_RST, [0, 0]) } else { (seq, TCP_SYN, PROBE6_WINDOW.to_be_bytes()) };
    let mut tcp = Vec::with_capacity(20);
    tcp.extend(sport.to_be_bytes());
    tcp.extend(p.port.to_be_bytes());
    tcp.extend(seq.to_be_bytes());
    tcp.extend(0u32.to_be_bytes());
    tcp.extend([0x50, flags, window[0], window[1], 0, 0, 0, 0]);
    let mut pseudo = Vec::with_capacity(40);
    pseudo.extend(p.src_ip.octets());
    pseudo.extend(vip.octets());
    pseudo.extend([0, 0, 0, 20, 0, 0, 0, 6]);
    let csum = fold(sum16(&tcp, sum16(&pseudo, 0)));
    tcp[16..18].copy_from_slice(&csum.to_be_bytes());
    let mut f = Vec::with_capacity(74);
    f.extend(dst_mac);
    f.extend(p.src_mac);
    f.extend(ETH_P_IPV6.to_be_bytes());
    f.extend([0x60, 0, 0, 0, 0, 20, 6, 64]);
    f.extend(p.src_ip.octets());
    f.extend(vip.octets());
    f.extend(tcp);
    f
}

/// The TCP flags and window of `frame` if it answers our IPv6 SYN to `vip` from `sport`
/// (sequence number `seq`): IPv6 TCP (no extension header) from `vip`:port to this
/// node's address and `sport`, acknowledging `seq + 1`.
fn answer6(frame: &[u8], p: &VipProbe6, vip: Ipv6Addr, sport: u16, seq: u32) -> Option<(u8, u16)> {
    if frame.len() < 74 || frame[12..14] != ETH_P_IPV6.to_be_bytes() || frame[14] >> 4 != 6 || frame[20] != 6 {
        return None;
    }
    if frame[22..38] != vip.octets() || frame[38..54] != p.src_ip.octets() {
        return None;
    }
    tcp_answer(&frame[54..74], p.port, sport, seq)
}

/// The TCP flags and window of TCP header `tcp` if it is from `port` to `sport` and
/// acknowledges `seq + 1`.
fn tcp_answer(tcp: &[u8], port: u16, sport: u16, seq: u32) -> Option<(u8, u16)> {
    let ours = tcp.len() >= 20
        && tcp[0..2] == port.to_be_bytes()
        && tcp[2..4] == sport.to_be_bytes()
        && tcp[8..12] == seq.wrapping_add(1).to_be_bytes();
    ours.then(|| (tcp[13], u16::from_be_bytes([tcp[14], tcp[15]])))
}

/// The filter of an IPv6 probe's socket: IPv6 TCP (no extension header) from one of
/// `vips` (1 to [`MAX_PROBED_VIPS`]) to port `sport`, nothing else (see
/// [`syn_ack_filter`]).
pub fn syn_ack_filter6(vips: &[Ipv6Addr], sport: u16) -> Vec<libc::sock_filter> {
    use cbpf::*;
    let n = vips.len().clamp(1, MAX_PROBED_VIPS);
    // Instructions: 0–3 the EtherType and next header, then 8 per VIP (its four source
    // words, each loaded and compared), then the port (2), accept, drop. A jump counts
    // the instructions it skips: at most 8 × 16 + 3, within a byte.
    let port = 4 + 8 * n;
    let drop = port + 3;
    let skip = |from: usize, to: usize| (to - from - 1) as u8;
    let mut prog = vec![
        insn(LD | H | ABS, 0, 0, 12),                                 // 0: EtherType
        insn(JMP | JEQ | K, 0, skip(1, drop), u32::from(ETH_P_IPV6)), // 1
        insn(LD | B | ABS, 0, 0, 14 + 6),                             // 2: next header
        insn(JMP | JEQ | K, 0, skip(3, drop), 6),                     // 3: TCP
    ];
    for (k, vip) in vips.iter().take(n).enumerate() {
        // Each word that differs tries the next VIP (after the last, drop); all four
        // equal go to the port test.
        let next = if k + 1 == n { drop } else { 4 + 8 * (k + 1) };
        for (w, word) in vip.octets().chunks(4).enumerate() {
            let at = prog.len() + 1;
            let on_match = if w == 3 { skip(at, port) } else { 0 };
            prog.push(insn(LD | W | ABS, 0, 0, (14 + 8 + 4 * w) as u32));
            prog.push(insn(
                JMP | JEQ | K,
                on_match,
                skip(at, next),
                u32::from_be_bytes([word[0], word[1], word[2], word[3]]),
            ));
        }
    }
    prog.extend([
        insn(LD | H | ABS, 0, 0, 14 + 40 + 2), // TCP destination port
        insn(JMP | JEQ | K, 0, skip(port + 1, drop), u32::from(sport)), //
        insn(RET | K, 0, 0, 0xffff),           // accept
        insn(RET | K, 0, 0, 0),                // drop
    ]);
    prog
}

/// The probe's SYN (`rst`: its RST) to `backend`, sent `via`.
fn probe_frame(p: &VipProbe, backend: Ipv4Addr, via: Via, sport: u16, seq: u32, rst: bool) -> Vec<u8> {
    let build = if rst { rst_frame } else { syn_frame };
    match via {
        Via::Dsr { mac } => build(p, mac, sport, seq),
        Via::Ipip { nexthop_mac } => encapsulated(p, backend, &build(p, nexthop_mac, sport, seq)),
    }
}

/// The TCP flags and window of `frame` if it answers our SYN from `sport` (sequence
/// number `seq`): IPv4 TCP from VIP:port to this node's `sport`, acknowledging `seq + 1`.
fn answer(frame: &[u8], p: &VipProbe, sport: u16, seq: u32) -> Option<(u8, u16)> {
    if frame.len() < 54 || frame[12..14] != ETH_P_IP.to_be_bytes() || frame[14] >> 4 != 4 || frame[23] != 6 {
        return None;
    }
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    let tcp = frame.get(14 + ihl..14 + ihl + 20)?;
    if frame[26..30] != p.vip.octets() || frame[30..34] != p.src_ip.octets() {
        return None;
    }
    tcp_answer(tcp, p.port, sport, seq)
}

/// The filter of a probe's socket: IPv4 TCP from one of `vips` (1 to
/// [`MAX_PROBED_VIPS`]) to port `sport`, nothing else. Without it every probe's socket
/// copies every IPv4 frame of the interface, which with hundreds of backends probed at
/// once is most of the node's CPU. `answer` still checks the rest.
pub fn syn_ack_filter(vips: &[Ipv4Addr], sport: u16) -> Vec<libc::sock_filter> {
    use cbpf::*;
    let n = vips.len().clamp(1, MAX_PROBED_VIPS);
    // Instructions: 0–4 the EtherType, protocol and source loads and tests, 5.. one
    // source compare per VIP, then the port (3), accept, drop. Jumps count the
    // instructions they skip (n ≤ MAX_PROBED_VIPS keeps them within a byte).
    let drop = 9 + n;
    let to_drop = |from: usize| (drop - from - 1) as u8;
    let mut prog = vec![
        insn(LD | H | ABS, 0, 0, 12),                            // 0: EtherType
        insn(JMP | JEQ | K, 0, to_drop(1), u32::from(ETH_P_IP)), // 1
        insn(LD | B | ABS, 0, 0, 14 + 9),                        // 2: IPv4 protocol
        insn(JMP | JEQ | K, 0, to_drop(3), 6),                   // 3: TCP
        insn(LD | W | ABS, 0, 0, 14 + 12),                       // 4: IPv4 source
    ];
    for (k, vip) in vips.iter().take(n).enumerate() {
        // A match jumps to the port test; a miss tries the next VIP, after the last drops.
        let miss = if k + 1 == n { to_drop(5 + k) } else { 0 };
        prog.push(insn(JMP | JEQ | K, (n - k - 1) as u8, miss, u32::from(*vip)));
    }
    prog.extend([
        insn(LDX | B | MSH, 0, 0, 14),                            // X = IPv4 header length
        insn(LD | H | IND, 0, 0, 14 + 2),                         // TCP destination port
        insn(JMP | JEQ | K, 0, to_drop(7 + n), u32::from(sport)), //
        insn(RET | K, 0, 0, 0xffff),                              // accept
        insn(RET | K, 0, 0, 0),                                   // drop
    ]);
    prog
}

/// What a frame on a probe's socket says of one VIP's probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    SynAck,
    /// A leaving node's data plane refused it ([`REFUSAL_WINDOW`]).
    Refused,
    /// The backend's host reset it: nothing listens on VIP:port there.
    Reset,
}

/// The answer that TCP flags `flags` and window `window` of a frame answering a probe
/// give.
fn classify(flags: u8, window: u16) -> Option<Answer> {
    if flags & TCP_RST != 0 {
        Some(if window == REFUSAL_WINDOW { Answer::Refused } else { Answer::Reset })
    } else if flags & (TCP_SYN | TCP_ACK) == (TCP_SYN | TCP_ACK) {
        Some(Answer::SynAck)
    } else {
        None
    }
}

/// What a frame on a probe's socket says of one VIP's probe ([`Answer`]; `None`: not
/// about it).
type Reads<'a> = Box<dyn Fn(&[u8]) -> Option<Answer> + 'a>;

/// One VIP's probe in either family, for [`exchange`].
struct Probed<'a> {
    vip: IpAddr,
    port: u16,
    /// The SYN (`true`: the RST after it).
    frame: Box<dyn Fn(bool) -> Vec<u8> + 'a>,
    reads: Reads<'a>,
}

/// Sends every probe's SYN on `sock`, waits up to `timeout` for their answers, and
/// resets each connection it opened (on a timeout too: see [`probe`]). The result of
/// each, in order.
fn exchange(
    sock: &RawSocket,
    probes: &[Probed<'_>],
    backend: Ipv4Addr,
    timeout: Duration,
) -> Result<Vec<Result<(), VipProbeError>>, VipProbeError> {
    for q in probes {
        sock.send(&(q.frame)(false)).map_err(VipProbeError::Socket)?;
    }
    // `None` while a VIP's answer is awaited.
    let mut results: Vec<Option<Result<(), VipProbeError>>> = probes.iter().map(|_| None).collect();
    let deadline = Instant::now() + timeout;
    let mut buf = [0u8; 256];
    while results.iter().any(Option::is_none) && Instant::now() < deadline {
        let Some(n) = sock.recv(&mut buf).map_err(VipProbeError::Socket)? else { continue };
        for (q, result) in probes.iter().zip(results.iter_mut()).filter(|(_, r)| r.is_none()) {
            let (vip, port) = (q.vip, q.port);
            *result = match (q.reads)(&buf[..n]) {
                Some(Answer::SynAck) => {
                    sock.send(&(q.frame)(true)).map_err(VipProbeError::Socket)?;
                    Some(Ok(()))
                }
                Some(Answer::Refused) => Some(Err(VipProbeError::Refused { vip, port, backend })),
                Some(Answer::Reset) => Some(Err(VipProbeError::Reset { vip, port, backend })),
                None => None,
            };
        }
    }
    let mut outcome = Vec::with_capacity(probes.len());
    for (q, result) in probes.iter().zip(results) {
        outcome.push(match result {
            Some(r) => r,
            None => {
                sock.send(&(q.frame)(true)).map_err(VipProbeError::Socket)?;
                Err(VipProbeError::NoAnswer { vip: q.vip, port: q.port, backend, timeout })
            }
        });
    }
    Ok(outcome)
}

/// A random source port (40000–59999) and sequence number for one check (RFC 6528's
/// reason): from the time and the pid (1 in a container), a host on the segment could
/// guess them and answer for a backend, keeping a dead one up or draining a live one
/// with a forged RST.
fn port_and_sequence() -> (u16, u32) {
    let [p0, p1, s0, s1, s2, s3] = crate::election::random_bytes::<6>();
    (40000 + u16::from_be_bytes([p0, p1]) % 20000, u32::from_be_bytes([s0, s1, s2, s3]))
}

/// How many VIPs one probe covers: every VIP a node serves (`vip_common::MAX_VIPS`).
pub const MAX_PROBED_VIPS: usize = vip_common::MAX_VIPS as usize;

/// Sends a SYN to `backend` `via` DSR or IPIP for `p.vip` and each of `others`, from one
/// socket and port, waits up to `timeout` for their SYN-ACKs (which come back
/// unencapsulated either way: the backend answers the client, here this node, directly),
/// and resets each connection it opened. The result of each VIP, `p.vip`'s first: the
/// VIPs are probed together, so a check costs one socket and one round trip however many
/// VIPs the node serves (one socket each, in turn, made 16 VIPs over 1,000 backends take
/// 2.6 times the CPU and 10 times as long to see a change). Only the first
/// [`MAX_PROBED_VIPS`] are probed.
///
/// The resets go out on a timeout too: a SYN-ACK that comes late (a loaded backend)
/// still left a SYN-RECV socket there, and a reset with sequence number ISN+1 closes it;
/// where there is none, a reset is never answered. Blocking: run it on a blocking thread.
pub fn probe(
    p: &VipProbe,
    others: &[Ipv4Addr],
    backend: Ipv4Addr,
    via: Via,
    timeout: Duration,
) -> Result<Vec<Result<(), VipProbeError>>, VipProbeError> {
    let (sport, seq) = port_and_sequence();
    let vips: Vec<Ipv4Addr> = std::iter::once(p.vip).chain(others.iter().copied()).take(MAX_PROBED_VIPS).collect();
    // Untagged even for VIPs on a VLAN (`--vlan`): the probe comes from this node's own
    // address, which the backend answers by its routes, on the segment of that address;
    // what it proves is the backend's taking VIP traffic, which the VLAN does not change.
    let sock =
        RawSocket::open_for(p.ifindex, ETH_P_IP, 0, &syn_ack_filter(&vips, sport), Some(Duration::from_millis(20)))
            .map_err(VipProbeError::Socket)?;
    let probes: Vec<VipProbe> = vips.iter().map(|&vip| VipProbe { vip, ..*p }).collect();
    let probed: Vec<Probed<'_>> = probes
        .iter()
        .map(|q| Probed {
            vip: q.vip.into(),
            port: q.port,
            frame: Box::new(move |rst| probe_frame(q, backend, via, sport, seq, rst)),
            reads: Box::new(move |f| answer(f, q, sport, seq).and_then(|(fl, w)| classify(fl, w))),
        })
        .collect();
    exchange(&sock, &probed, backend, timeout)
}

/// [`probe`] for IPv6 VIPs `vips` (the first [`MAX_PROBED_VIPS`]), by DSR to `mac`, the
/// backend's (`backend`: its IPv4 address, which names it in errors). A leaving node's
/// data plane refuses them as it refuses IPv4 ones (`vip-ebpf`'s `refuse::reset6`).
pub fn probe6(
    p: &VipProbe6,
    vips: &[Ipv6Addr],
    backend: Ipv4Addr,
    mac: [u8; 6],
    timeout: Duration,
) -> Result<Vec<Result<(), VipProbeError>>, VipProbeError> {
    let (sport, seq) = port_and_sequence();
    let vips = &vips[..vips.len().min(MAX_PROBED_VIPS)];
    let sock =
        RawSocket::open_for(p.ifindex, ETH_P_IPV6, 0, &syn_ack_filter6(vips, sport), Some(Duration::from_millis(20)))
            .map_err(VipProbeError::Socket)?;
    let probed: Vec<Probed<'_>> = vips
        .iter()
        .map(|&vip| Probed {
            vip: vip.into(),
            port: p.port,
            frame: Box::new(move |rst| segment6(p, vip, mac, sport, seq, rst)),
            reads: Box::new(move |f| answer6(f, p, vip, sport, seq).and_then(|(fl, w)| classify(fl, w))),
        })
        .collect();
    exchange(&sock, &probed, backend, timeout)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rawsock::tests::run_cbpf;

    /// What `frame` says of our IPv4 SYN to `p.vip` from `sport` (sequence number `seq`).
    fn answered(frame: &[u8], p: &VipProbe, sport: u16, seq: u32) -> Option<Answer> {
        answer(frame, p, sport, seq).and_then(|(flags, window)| classify(flags, window))
    }

    fn probe_cfg() -> VipProbe {
        VipProbe {
            ifindex: 2,
            src_mac: [2, 0, 0, 0, 0, 1],
            src_ip: Ipv4Addr::new(10, 0, 0, 1),
            vip: Ipv4Addr::new(10, 0, 0, 100),
            port: 6443,
        }
    }

    #[test]
    fn syn_has_valid_checksums_and_addresses() {
        let p = probe_cfg();
        let f = syn_frame(&p, [2, 0, 0, 0, 0, 0x12], 40001, 7);
        assert_eq!(f.len(), 54);
        assert_eq!(f[0..6], [2, 0, 0, 0, 0, 0x12]);
        assert_eq!(fold(sum16(&f[14..34], 0)), 0, "IPv4 header checksum");
        let mut pseudo = f[26..34].to_vec();
        pseudo.extend([0, 6, 0, 20]);
        assert_eq!(fold(sum16(&f[34..54], sum16(&pseudo, 0))), 0, "TCP checksum");
        assert_eq!(f[47], TCP_SYN);
    }

    #[test]
    fn the_reset_follows_the_syn_with_valid_checksums() {
        let p = probe_cfg();
        let f = rst_frame(&p, [2, 0, 0, 0, 0, 0x12], 40001, 7);
        assert_eq!(f[47], TCP_RST);
        assert_eq!(f[38..42], 8u32.to_be_bytes(), "seq = SYN's + 1");
        assert_eq!(fold(sum16(&f[14..34], 0)), 0, "IPv4 header checksum");
        let mut pseudo = f[26..34].to_vec();
        pseudo.extend([0, 6, 0, 20]);
        assert_eq!(fold(sum16(&f[34..54], sum16(&pseudo, 0))), 0, "TCP checksum");
    }

    /// By IPIP, the probe is the DSR SYN's IPv4 packet inside an outer header from this
    /// node to the backend (protocol 4, DF, valid checksum), in a frame to the next hop.
    #[test]
    fn the_ipip_probe_carries_the_syn_to_the_backends_address() {
        let p = probe_cfg();
        let backend = Ipv4Addr::new(10, 0, 0, 12);
        let hop = [2, 0, 0, 0, 0, 0xfe];
        let f = probe_frame(&p, backend, Via::Ipip { nexthop_mac: hop }, 40001, 7, false);
        let inner = syn_frame(&p, hop, 40001, 7);
        assert_eq!(f.len(), inner.len() + 20);
        assert_eq!(f[..14], inner[..14], "Ethernet to the next hop, from us");
        let outer = &f[14..34];
        assert_eq!(outer[0], 0x45);
        assert_eq!(u16::from_be_bytes([outer[2], outer[3]]), 60, "total length: 20 + 40");
        assert_eq!(outer[6], 0x40, "DF");
        assert_eq!(outer[9], IPPROTO_IPIP);
        assert_eq!(outer[12..16], p.src_ip.octets());
        assert_eq!(outer[16..20], backend.octets());
        assert_eq!(fold(sum16(outer, 0)), 0, "outer header checksum");
        assert_eq!(f[34..], inner[14..], "the SYN's IPv4 packet, unchanged");
        let rst = probe_frame(&p, backend, Via::Ipip { nexthop_mac: hop }, 40001, 7, true);
        assert_eq!((rst.len(), rst[23], rst[34 + 9]), (74, IPPROTO_IPIP, 6), "the RST goes the same way");
        assert_eq!((rst[54 + 13], &rst[58..62]), (TCP_RST, &8u32.to_be_bytes()[..]), "RST, sequence SYN's + 1");
        assert_eq!(probe_frame(&p, backend, Via::Dsr { mac: hop }, 40001, 7, false), inner);
    }

    /// The backend's answer to our SYN from `sport` with sequence number 7: its
    /// addresses and ports swapped, acknowledging 8.
    fn syn_ack_to(p: &VipProbe, sport: u16) -> Vec<u8> {
        let mut ack = syn_frame(p, [2; 6], sport, 7);
        ack[26..30].copy_from_slice(&p.vip.octets());
        ack[30..34].copy_from_slice(&p.src_ip.octets());
        ack[34..36].copy_from_slice(&p.port.to_be_bytes());
        ack[36..38].copy_from_slice(&sport.to_be_bytes());
        ack[42..46].copy_from_slice(&8u32.to_be_bytes());
        ack[47] = TCP_SYN | TCP_ACK;
        ack
    }

    #[test]
    fn recognises_only_the_matching_syn_ack() {
        let p = probe_cfg();
        let syn = syn_frame(&p, [2; 6], 40001, 7);
        let ack = syn_ack_to(&p, 40001);
        assert_eq!(answered(&ack, &p, 40001, 7), Some(Answer::SynAck));
        assert_eq!(answered(&ack, &p, 40002, 7), None, "other port");
        assert_eq!(answered(&ack, &p, 40001, 8), None, "other sequence");
        assert_eq!(answered(&syn, &p, 40001, 7), None, "our own SYN");
        let mut rst = ack.clone();
        rst[47] = 0x14;
        rst[48..50].copy_from_slice(&REFUSAL_WINDOW.to_be_bytes());
        assert_eq!(answered(&rst, &p, 40001, 7), Some(Answer::Refused), "a RST with the mark: a refusal");
        assert_eq!(answered(&rst, &p, 40002, 7), None, "another probe's");
        assert_eq!(answered(&rst, &p, 40001, 8), None, "another sequence");
        // A closed port's RST, window 0: the host's, not a leaving node's data plane.
        let mut closed = rst.clone();
        closed[48..50].copy_from_slice(&[0, 0]);
        assert_eq!(answered(&closed, &p, 40001, 7), Some(Answer::Reset), "the host's reset");
        assert_eq!(answered(&closed, &p, 40002, 7), None, "another probe's");
    }

    /// With several VIPs (up to every VIP a node serves), the filter passes the SYN-ACK
    /// from each of them to the probe's port, and none from another address.
    #[test]
    fn the_socket_filter_passes_the_syn_acks_of_every_probed_vip() {
        for n in [1u8, 2, 3, 16] {
            let vips: Vec<Ipv4Addr> = (0..n).map(|k| Ipv4Addr::new(10, 0, 0, 100 + k)).collect();
            let prog = syn_ack_filter(&vips, 40001);
            for &vip in &vips {
                let ack = syn_ack_to(&VipProbe { vip, ..probe_cfg() }, 40001);
                assert!(run_cbpf(&prog, &ack) > 0, "{n} VIPs: the SYN-ACK from {vip}");
                let mut other_port = ack.clone();
                other_port[36..38].copy_from_slice(&40002u16.to_be_bytes());
                assert_eq!(run_cbpf(&prog, &other_port), 0, "{n} VIPs: {vip} to another port");
            }
            for other in [Ipv4Addr::new(10, 0, 0, 99), Ipv4Addr::new(10, 0, 0, 100 + n)] {
                let ack = syn_ack_to(&VipProbe { vip: other, ..probe_cfg() }, 40001);
                assert_eq!(run_cbpf(&prog, &ack), 0, "{n} VIPs: from {other}, no VIP");
            }
        }
    }

    #[test]
    fn the_socket_filter_passes_only_the_probes_syn_ack() {
        let p = probe_cfg();
        let prog = syn_ack_filter(&[p.vip], 40001);
        let syn = syn_frame(&p, [2; 6], 40001, 7);
        let ack = syn_ack_to(&p, 40001);
        assert!(run_cbpf(&prog, &ack) > 0, "the SYN-ACK");
        // The same with 4 bytes of IPv4 options (IHL 6): the port is found after them.
        let mut with_options = ack[..34].to_vec();
        with_options[14] = 0x46;
        with_options.extend([1, 1, 1, 0]);
        with_options.extend(&ack[34..]);
        assert!(run_cbpf(&prog, &with_options) > 0, "the SYN-ACK with IPv4 options");
        let mut other_port = ack.clone();
        other_port[36..38].copy_from_slice(&40002u16.to_be_bytes());
        assert_eq!(run_cbpf(&prog, &other_port), 0, "another probe's port");
        let mut other_src = ack.clone();
        other_src[26..30].copy_from_slice(&[10, 0, 0, 99]);
        assert_eq!(run_cbpf(&prog, &other_src), 0, "not from the VIP");
        let mut udp = ack.clone();
        udp[23] = 17;
        assert_eq!(run_cbpf(&prog, &udp), 0, "UDP");
        let mut arp = ack.clone();
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(run_cbpf(&prog, &arp), 0, "ARP");
        assert_eq!(run_cbpf(&prog, &ack[..30]), 0, "truncated");
        assert_eq!(run_cbpf(&prog, &syn), 0, "our own SYN (from us, to the VIP)");
    }

    fn probe6_cfg() -> VipProbe6 {
        VipProbe6 { ifindex: 2, src_mac: [2, 0, 0, 0, 0, 1], src_ip: "fd00::1".parse().unwrap(), port: 6443 }
    }

    /// The backend's answer to our IPv6 SYN to `vip` from `sport` with sequence number 7:
    /// addresses and ports swapped, acknowledging 8, flags `flags`, window `window`.
    fn answer6_to(p: &VipProbe6, vip: Ipv6Addr, sport: u16, flags: u8, window: u16) -> Vec<u8> {
        let mut a = segment6(p, vip, [2; 6], sport, 7, false);
        a[22..38].copy_from_slice(&vip.octets());
        a[38..54].copy_from_slice(&p.src_ip.octets());
        a[54..56].copy_from_slice(&p.port.to_be_bytes());
        a[56..58].copy_from_slice(&sport.to_be_bytes());
        a[62..66].copy_from_slice(&8u32.to_be_bytes());
        a[67] = flags;
        a[68..70].copy_from_slice(&window.to_be_bytes());
        a
    }

    /// The IPv6 SYN: 74 bytes, IPv6 from this node's address to the VIP (payload 20, TCP,
    /// hop limit 64), window `PROBE6_WINDOW`, the TCP checksum valid over the IPv6
    /// pseudo-header; its RST follows it (sequence + 1, no window).
    #[test]
    fn the_ipv6_syn_and_its_reset_have_valid_checksums() {
        let p = probe6_cfg();
        let vip: Ipv6Addr = "fd00::100".parse().unwrap();
        for (rst, flags, seq, window) in [(false, TCP_SYN, 7u32, PROBE6_WINDOW), (true, TCP_RST, 8, 0)] {
            let f = segment6(&p, vip, [2, 0, 0, 0, 0, 0x12], 40001, 7, rst);
            assert_eq!(f.len(), 74);
            assert_eq!((&f[0..6], &f[12..14]), (&[2, 0, 0, 0, 0, 0x12][..], &ETH_P_IPV6.to_be_bytes()[..]));
            assert_eq!(f[14..22], [0x60, 0, 0, 0, 0, 20, 6, 64], "version, payload length, TCP, hop limit");
            assert_eq!((&f[22..38], &f[38..54]), (&p.src_ip.octets()[..], &vip.octets()[..]));
            let mut pseudo = f[22..54].to_vec();
            pseudo.extend([0, 0, 0, 20, 0, 0, 0, 6]);
            assert_eq!(fold(sum16(&f[54..74], sum16(&pseudo, 0))), 0, "TCP checksum");
            assert_eq!((f[67], &f[58..62]), (flags, &seq.to_be_bytes()[..]));
            assert_eq!(f[68..70], window.to_be_bytes(), "the SYN's window marks a probe");
        }
    }

    #[test]
    fn recognises_only_the_matching_ipv6_answer() {
        let p = probe6_cfg();
        let vip: Ipv6Addr = "fd00::100".parse().unwrap();
        let ack = answer6_to(&p, vip, 40001, TCP_SYN | TCP_ACK, 0xffff);
        let class = |f: &[u8], vip, sport, seq| answer6(f, &p, vip, sport, seq).and_then(|(fl, w)| classify(fl, w));
        assert_eq!(class(&ack, vip, 40001, 7), Some(Answer::SynAck));
        assert_eq!(class(&ack, "fd00::101".parse().unwrap(), 40001, 7), None, "another VIP");
        assert_eq!(class(&ack, vip, 40002, 7), None, "another port");
        assert_eq!(class(&ack, vip, 40001, 8), None, "another sequence");
        assert_eq!(class(&segment6(&p, vip, [2; 6], 40001, 7, false), vip, 40001, 7), None, "our own SYN");
        let closed = answer6_to(&p, vip, 40001, 0x14, 0);
        assert_eq!(class(&closed, vip, 40001, 7), Some(Answer::Reset), "the host's RST");
    }

    /// The IPv6 filter passes the SYN-ACK from each probed VIP (1 to 16) to the probe's
    /// port, and nothing from another address, to another port, or of another kind.
    #[test]
    fn the_ipv6_socket_filter_passes_the_syn_acks_of_every_probed_vip() {
        let p = probe6_cfg();
        let vip = |k: u16| Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 1, 0x100 + k);
        for n in [1u16, 2, 3, 16] {
            let vips: Vec<Ipv6Addr> = (0..n).map(vip).collect();
            let prog = syn_ack_filter6(&vips, 40001);
            for &v in &vips {
                let ack = answer6_to(&p, v, 40001, TCP_SYN | TCP_ACK, 0xffff);
                assert!(run_cbpf(&prog, &ack) > 0, "{n} VIPs: the SYN-ACK from {v}");
                let mut other_port = ack.clone();
                other_port[56..58].copy_from_slice(&40002u16.to_be_bytes());
                assert_eq!(run_cbpf(&prog, &other_port), 0, "{n} VIPs: {v} to another port");
                let mut udp = ack.clone();
                udp[20] = 17;
                assert_eq!(run_cbpf(&prog, &udp), 0, "{n} VIPs: UDP");
            }
            // One word off in each position, and the next VIP along.
            for w in 0..4 {
                let mut near = vip(0).octets();
                near[4 * w + 1] ^= 1;
                let ack = answer6_to(&p, Ipv6Addr::from(near), 40001, TCP_SYN | TCP_ACK, 0xffff);
                assert_eq!(run_cbpf(&prog, &ack), 0, "{n} VIPs: word {w} differs");
            }
            let ack = answer6_to(&p, vip(n), 40001, TCP_SYN | TCP_ACK, 0xffff);
            assert_eq!(run_cbpf(&prog, &ack), 0, "{n} VIPs: from {}, no VIP", vip(n));
        }
        let v4 = syn_ack_to(&probe_cfg(), 40001);
        assert_eq!(run_cbpf(&syn_ack_filter6(&[vip(0)], 40001), &v4), 0, "IPv4");
    }
}
