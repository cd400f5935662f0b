//! AF_PACKET sockets bound to one interface and one EtherType: how the agent sends
//! gratuitous ARPs and VIP-path probes (and reads the answers), and how the tests listen
//! on the wire.

use std::{
    io, mem,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Duration,
};

/// A raw Ethernet socket on one interface, for one EtherType.
pub struct RawSocket {
    fd: OwnedFd,
    ifindex: u32,
    ethertype: u16,
}

impl RawSocket {
    /// Opens and binds the socket. With `recv_timeout`, [`RawSocket::recv`] returns
    /// `Ok(None)` after that long without a frame.
    pub fn open(ifindex: u32, ethertype: u16, recv_timeout: Option<Duration>) -> io::Result<Self> {
        // SAFETY: plain socket(2); the result is checked and owned below.
        let raw =
            unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, i32::from(ethertype.to_be())) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: raw is a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let me = Self { fd, ifindex, ethertype };
        let addr = me.addr([0; 6]);
        // SAFETY: valid fd; addr is a properly sized sockaddr_ll.
        if unsafe { libc::bind(me.fd.as_raw_fd(), (&addr as *const libc::sockaddr_ll).cast(), sll_len()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        if let Some(t) = recv_timeout {
            let tv =
                libc::timeval { tv_sec: t.as_secs() as libc::time_t, tv_usec: t.subsec_micros() as libc::suseconds_t };
            // SAFETY: valid fd; tv is a timeval of the size given.
            let rc = unsafe {
                libc::setsockopt(
                    me.fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&tv as *const libc::timeval).cast(),
                    mem::size_of::<libc::timeval>() as u32,
                )
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
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
        // SAFETY: valid fd; prog points to `len` instructions that outlive the call (the
        // kernel copies them).
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ATTACH_FILTER,
                (&prog as *const libc::sock_fprog).cast(),
                mem::size_of::<libc::sock_fprog>() as u32,
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
        // SAFETY: sockaddr_ll is plain data; all-zero is valid before we fill it.
        let mut a: libc::sockaddr_ll = unsafe { mem::zeroed() };
        a.sll_family = libc::AF_PACKET as u16;
        a.sll_protocol = self.ethertype.to_be();
        a.sll_ifindex = self.ifindex as i32;
        a.sll_halen = 6;
        a.sll_addr[..6].copy_from_slice(&dst);
        a
    }

    /// Sends a whole Ethernet frame (its first six bytes are the destination MAC).
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        let dst: [u8; 6] = frame.get(..6).and_then(|d| d.try_into().ok()).ok_or(io::ErrorKind::InvalidInput)?;
        let addr = self.addr(dst);
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
