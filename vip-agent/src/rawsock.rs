//! AF_PACKET sockets bound to one interface (and one EtherType, or every one behind a
//! filter when a VLAN must be read): how the agent sends gratuitous ARPs, advertisements
//! and probes (and reads the answers), and how the tests listen on the wire.

use std::{
    io, mem,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Duration,
};

/// Classic BPF opcodes (linux/bpf_common.h): instruction classes, sizes, modes; and the
/// ancillary offsets (linux/filter.h) through which a filter reads the VLAN tag the
/// kernel moved out of the frame.
pub mod cbpf {
    pub const LD: u16 = 0x00;
    pub const LDX: u16 = 0x01;
    pub const ALU: u16 = 0x04;
    pub const JMP: u16 = 0x05;
    pub const RET: u16 = 0x06;
    pub const W: u16 = 0x00;
    pub const H: u16 = 0x08;
    pub const B: u16 = 0x10;
    pub const ABS: u16 = 0x20;
    pub const IND: u16 = 0x40;
    pub const MSH: u16 = 0xa0;
    pub const JEQ: u16 = 0x10;
    pub const AND: u16 = 0x50;
    pub const K: u16 = 0x00;
    /// `SKF_AD_OFF + SKF_AD_VLAN_TAG`: the frame's VLAN TCI.
    pub const AD_VLAN_TAG: u32 = 0xffff_f000 + 44;
    /// `SKF_AD_OFF + SKF_AD_VLAN_TAG_PRESENT`: whether the frame had a tag.
    pub const AD_VLAN_TAG_PRESENT: u32 = 0xffff_f000 + 48;
}

pub fn insn(code: u16, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter { code, jt, jf, k }
}

/// `rest` (a filter that ends in its own returns), run only for frames on VLAN `vid`
/// (0: untagged or priority-tagged); others are dropped. A packet socket sees a tagged
/// frame with its tag moved out by the kernel (`skb_vlan_untag`), so the tag is read
/// through the ancillary loads and `rest` keeps its untagged offsets.
pub fn on_vlan(vid: u16, rest: &[libc::sock_filter]) -> Vec<libc::sock_filter> {
    use cbpf::*;
    // The drop comes before `rest`, so every jump is a small constant whatever its length.
    let mut prog = vec![
        insn(LD | W | ABS, 0, 0, AD_VLAN_TAG_PRESENT),           // 0
        insn(JMP | JEQ | K, if vid == 0 { 4 } else { 3 }, 0, 0), // 1: untagged: rest, or drop
        insn(LD | W | ABS, 0, 0, AD_VLAN_TAG),                   // 2
        insn(ALU | AND | K, 0, 0, 0x0fff),                       // 3: the VID
        insn(JMP | JEQ | K, 1, 0, u32::from(vid)),               // 4: ours: rest
        insn(RET | K, 0, 0, 0),                                  // 5: drop
    ];
    prog.extend_from_slice(rest);
    prog
}

/// Accepts every frame (the `rest` of [`on_vlan`] for a socket that wants them all).
pub const ACCEPT: [libc::sock_filter; 1] = [libc::sock_filter { code: cbpf::RET | cbpf::K, jt: 0, jf: 0, k: 0xffff }];
/// Accepts the frames of EtherType `ethertype` (the `rest` of [`on_vlan`] for a socket of
/// one protocol, opened with [`RawSocket::open_filtered`]).
pub fn ethertype_only(ethertype: u16) -> [libc::sock_filter; 4] {
    use cbpf::*;
    [
        insn(LD | H | ABS, 0, 0, 12),
        insn(JMP | JEQ | K, 0, 1, u32::from(ethertype)),
        insn(RET | K, 0, 0, 0xffff),
        insn(RET | K, 0, 0, 0),
    ]
}

/// Accepts none: for a socket that only sends.
pub const NONE: [libc::sock_filter; 1] = [libc::sock_filter { code: cbpf::RET | cbpf::K, jt: 0, jf: 0, k: 0 }];

/// `frame` (untagged Ethernet) as sent on VLAN `vid`: an 802.1Q tag (priority 0) after
/// the MAC addresses; unchanged for 0.
pub fn tagged(frame: &[u8], vid: u16) -> std::borrow::Cow<'_, [u8]> {
    if vid == 0 || frame.len() < 12 {
        return std::borrow::Cow::Borrowed(frame);
    }
    let mut f = Vec::with_capacity(frame.len() + 4);
    f.extend_from_slice(&frame[..12]);
    f.extend_from_slice(&[0x81, 0x00]);
    f.extend_from_slice(&(vid & 0x0fff).to_be_bytes());
    f.extend_from_slice(&frame[12..]);
    std::borrow::Cow::Owned(f)
}

/// A raw Ethernet socket on one interface, for one EtherType.
pub struct RawSocket {
    fd: OwnedFd,
    ifindex: u32,
    ethertype: u16,
}

/// Every EtherType: what a socket that must see VLAN tags binds to (see
/// [`RawSocket::open_filtered`]).
const ETH_P_ALL: u16 = 0x0003;

impl RawSocket {
    /// Opens and binds the socket. With `recv_timeout`, [`RawSocket::recv`] returns
    /// `Ok(None)` after that long without a frame.
    pub fn open(ifindex: u32, ethertype: u16, recv_timeout: Option<Duration>) -> io::Result<Self> {
        Self::open_with(ifindex, ethertype, None, recv_timeout)
    }

    /// Opens a socket for the frames of EtherType `ethertype` on VLAN `vlan` (0: untagged)
    /// that `rest` (which checks the EtherType too) accepts: with a VLAN, one of every
    /// EtherType behind [`on_vlan`] ([`RawSocket::open_filtered`]); without, a socket of
    /// that EtherType with `rest` alone, which costs the host nothing for other frames.
    pub fn open_for(
        ifindex: u32,
        ethertype: u16,
        vlan: u16,
        rest: &[libc::sock_filter],
        recv_timeout: Option<Duration>,
    ) -> io::Result<Self> {
        if vlan == 0 {
            Self::open_with(ifindex, ethertype, Some(rest), recv_timeout)
        } else {
            Self::open_filtered(ifindex, &on_vlan(vlan, rest), recv_timeout)
        }
    }

    /// Opens a socket that receives the frames `filter` accepts, of every EtherType (the
    /// filter checks it; see [`on_vlan`]), bound only once the filter is in place so that
    /// nothing unfiltered is ever queued.
    ///
    /// Why every EtherType: the kernel moves a received VLAN tag out of the frame, and
    /// clears it before it hands the frame to the sockets of one EtherType; only the
    /// sockets of all of them still see it, which a socket serving a VIP on a VLAN must.
    /// What this node sends itself is not received.
    pub fn open_filtered(
        ifindex: u32,
        filter: &[libc::sock_filter],
        recv_timeout: Option<Duration>,
    ) -> io::Result<Self> {
        Self::open_with(ifindex, ETH_P_ALL, Some(filter), recv_timeout)
    }

    fn open_with(
        ifindex: u32,
        ethertype: u16,
        filter: Option<&[libc::sock_filter]>,
        recv_timeout: Option<Duration>,
    ) -> io::Result<Self> {
        // Protocol 0 until bound: a packet socket receives nothing before.
        // SAFETY: plain socket(2); the result is checked and owned below.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: raw is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let me = Self { fd, ifindex, ethertype };
        if let Some(filter) = filter {
            me.attach_filter(filter)?;
            me.set_option(libc::SOL_PACKET, libc::PACKET_IGNORE_OUTGOING, &(1 as libc::c_int))?;
        }
        let addr = me.addr([0; 6]);
        // SAFETY: valid fd; addr is a properly sized sockaddr_ll.
        if unsafe { libc::bind(me.fd.as_raw_fd(), (&addr as *const libc::sockaddr_ll).cast(), sll_len()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        if let Some(t) = recv_timeout {
            let tv =
                libc::timeval { tv_sec: t.as_secs() as libc::time_t, tv_usec: t.subsec_micros() as libc::suseconds_t };
            me.set_option(libc::SOL_SOCKET, libc::SO_RCVTIMEO, &tv)?;
        }
        Ok(me)
    }

    /// Attaches a classic BPF filter (`SO_ATTACH_FILTER`, kernel
    /// Documentation/networking/filter.rst): the socket then queues only the frames the
    /// program accepts. Frames queued before the call stay queued.
    pub fn attach_filter(&self, program: &[libc::sock_filter]) -> io::Result<()> {
        let prog = libc::sock_fprog {
            len: u16::try_from(program.len()).map_err(|_| io::ErrorKind::InvalidInput)?,
            filter: program.as_ptr().cast_mut(),
        };
        // (prog points to `len` instructions that outlive the call: the kernel copies them.)
        self.set_option(libc::SOL_SOCKET, libc::SO_ATTACH_FILTER, &prog)
    }

    /// `setsockopt(2)` of option `name` at `level` to `value`, a plain C value of the
    /// type the option takes.
    fn set_option<T>(&self, level: libc::c_int, name: libc::c_int, value: &T) -> io::Result<()> {
        // SAFETY: valid fd; value is a live T of the size given, which the kernel copies.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                level,
                name,
                (value as *const T).cast(),
                mem::size_of::<T>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Makes [`RawSocket::recv`] return `Ok(None)` at once when no frame is queued, for
    /// use with [`tokio::io::unix::AsyncFd`].
    pub fn set_nonblocking(&self) -> io::Result<()> {
        // SAFETY: fcntl on a descriptor we own.
        let flags = unsafe { libc::fcntl(self.fd.as_raw_fd(), libc::F_GETFL) };
        if flags < 0 || unsafe { libc::fcntl(self.fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn addr(&self, dst: [u8; 6]) -> libc::sockaddr_ll {
        self.addr_for(dst, self.ethertype)
    }

    fn addr_for(&self, dst: [u8; 6], ethertype: u16) -> libc::sockaddr_ll {
        // SAFETY: sockaddr_ll is plain data; all-zero is valid before we fill it.
        let mut a: libc::sockaddr_ll = unsafe { mem::zeroed() };
        a.sll_family = libc::AF_PACKET as u16;
        a.sll_protocol = ethertype.to_be();
        a.sll_ifindex = self.ifindex as i32;
        a.sll_halen = 6;
        a.sll_addr[..6].copy_from_slice(&dst);
        a
    }

    /// Sends a whole Ethernet frame (its first six bytes are the destination MAC), as the
    /// protocol its own EtherType names (a tagged frame's is 802.1Q's).
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        let dst: [u8; 6] = frame.get(..6).and_then(|d| d.try_into().ok()).ok_or(io::ErrorKind::InvalidInput)?;
        let ethertype = frame.get(12..14).map_or(self.ethertype, |t| u16::from_be_bytes([t[0], t[1]]));
        let addr = self.addr_for(dst, ethertype);
        // SAFETY: frame and addr are valid for the lengths given.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&addr as *const libc::sockaddr_ll).cast(),
                sll_len(),
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Receives one frame into `buf`: its length, or `None` when the timeout passed.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        // SAFETY: buf is valid for its length.
        let n = unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n >= 0 {
            return Ok(Some(n as usize));
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted => Ok(None),
            _ => Err(e),
        }
    }
}

impl AsRawFd for RawSocket {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

fn sll_len() -> u32 {
    mem::size_of::<libc::sockaddr_ll>() as u32
}

/// Reads `sock` as frames arrive (it is made non-blocking and registered with the
/// runtime) and sends what `parse` finds in each on `tx`, until the receiver is dropped
/// or the socket fails (logged as `what` on `interface`). The future to run the watch.
pub fn watch<T: Send + 'static>(
    sock: RawSocket,
    interface: String,
    what: &'static str,
    parse: impl Fn(&[u8]) -> Option<T> + Send + 'static,
    tx: tokio::sync::mpsc::Sender<T>,
) -> io::Result<impl std::future::Future<Output = ()>> {
    sock.set_nonblocking()?;
    // SAFETY: the socket owns its descriptor and moves into the AsyncFd, so it stays
    // open for as long as the registration.
    let fd = unsafe { tokio::io::unix::AsyncFd::register(sock) }?;
    Ok(async move {
        let mut buf = [0u8; 256];
        loop {
            let Ok(mut ready) = fd.readable().await else { return };
            match ready.get_inner().recv(&mut buf) {
                Ok(Some(n)) => {
                    if let Some(found) = parse(&buf[..n]) {
                        if tx.send(found).await.is_err() {
                            return;
                        }
                    }
                }
                Ok(None) => ready.clear_ready(),
                Err(error) => {
                    tracing::warn!(%error, %interface, "{what} watch failed");
                    return;
                }
            }
        }
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A classic BPF interpreter for the instructions the agent's filters use (kernel
    /// Documentation/networking/filter.rst semantics: loads are big-endian, out of
    /// bounds rejects; the ancillary VLAN loads read `vlan`, the tag the kernel moved out
    /// of the frame): the filter's accepted length for `frame`.
    pub(crate) fn run_cbpf_on(prog: &[libc::sock_filter], frame: &[u8], vlan: Option<u16>) -> u32 {
        use cbpf::*;
        let (mut a, mut x, mut pc) = (0u32, 0u32, 0usize);
        let load = |off: usize, n: usize| -> Option<u32> {
            frame.get(off..off + n).map(|b| b.iter().fold(0u32, |acc, &v| acc << 8 | u32::from(v)))
        };
        loop {
            let i = prog[pc];
            let size = match i.code & 0x18 {
                H => 2,
                B => 1,
                _ => 4,
            };
            match (i.code & 0x07, i.code & 0xe0) {
                (LD, ABS) if i.k == AD_VLAN_TAG_PRESENT => a = u32::from(vlan.is_some()),
                (LD, ABS) if i.k == AD_VLAN_TAG => a = u32::from(vlan.unwrap_or(0)),
                (LD, ABS) => match load(i.k as usize, size) {
                    Some(v) => a = v,
                    None => return 0,
                },
                (LD, IND) => match load(x as usize + i.k as usize, size) {
                    Some(v) => a = v,
                    None => return 0,
                },
                (LDX, MSH) => match load(i.k as usize, 1) {
                    Some(v) => x = (v & 0xf) * 4,
                    None => return 0,
                },
                (ALU, _) if i.code & 0xf0 == AND => a &= i.k,
                (JMP, _) if i.code & 0xf0 == JEQ => {
                    pc += usize::from(if a == i.k { i.jt } else { i.jf });
                }
                (RET, _) => return i.k,
                other => panic!("instruction {other:?} not interpreted"),
            }
            pc += 1;
        }
    }

    /// [`run_cbpf_on`] for an untagged frame.
    pub(crate) fn run_cbpf(prog: &[libc::sock_filter], frame: &[u8]) -> u32 {
        run_cbpf_on(prog, frame, None)
    }

    #[test]
    fn a_vlan_filter_passes_its_vlan_only_and_then_runs_the_rest() {
        let frame = [0u8; 60];
        let on_100 = on_vlan(100, &ACCEPT);
        assert!(run_cbpf_on(&on_100, &frame, Some(100)) > 0);
        assert!(run_cbpf_on(&on_100, &frame, Some(0x6000 | 100)) > 0, "priority bits are not the VID");
        assert_eq!(run_cbpf_on(&on_100, &frame, Some(200)), 0, "another VLAN");
        assert_eq!(run_cbpf_on(&on_100, &frame, None), 0, "untagged");
        let untagged = on_vlan(0, &ACCEPT);
        assert!(run_cbpf_on(&untagged, &frame, None) > 0);
        assert!(run_cbpf_on(&untagged, &frame, Some(0x6000)) > 0, "priority-tagged is untagged");
        assert_eq!(run_cbpf_on(&untagged, &frame, Some(100)), 0, "a VLAN");
        // The rest still decides: a rest that refuses, and a longer one (an EtherType
        // check) on both sides of its answer and of the VLAN's.
        assert_eq!(run_cbpf_on(&on_vlan(100, &NONE), &frame, Some(100)), 0);
        let mut arp = [0u8; 60];
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        let arp_on_100 = on_vlan(100, &ethertype_only(0x0806));
        assert!(run_cbpf_on(&arp_on_100, &arp, Some(100)) > 0);
        assert_eq!(run_cbpf_on(&arp_on_100, &frame, Some(100)), 0, "not ARP");
        assert_eq!(run_cbpf_on(&arp_on_100, &arp, Some(200)), 0, "ARP on another VLAN");
        assert_eq!(run_cbpf_on(&arp_on_100, &arp, None), 0, "untagged ARP");
        let arp_untagged = on_vlan(0, &ethertype_only(0x0806));
        assert!(run_cbpf_on(&arp_untagged, &arp, None) > 0);
        assert_eq!(run_cbpf_on(&arp_untagged, &arp, Some(100)), 0, "tagged ARP");
    }

    #[test]
    fn a_tag_goes_after_the_mac_addresses() {
        let frame: Vec<u8> = (0..20).collect();
        let t = tagged(&frame, 100);
        assert_eq!(t[..12], frame[..12]);
        assert_eq!(t[12..16], [0x81, 0x00, 0x00, 100]);
        assert_eq!(t[16..], frame[12..]);
        assert_eq!(&*tagged(&frame, 0), &frame[..]);
    }
}
