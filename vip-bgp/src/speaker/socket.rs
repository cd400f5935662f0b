//! The TCP connection to a peer: TCP-MD5 signatures (RFC 2385) and `TCP_USER_TIMEOUT`
//! set on the socket before connecting, Nagle off.
//!
//! The socket is created in the network namespace of the thread that calls [`connect`]
//! (the one polling the peer's task).

use std::{
    io,
    mem::{size_of, zeroed},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    os::fd::{AsRawFd, RawFd},
    time::Duration,
};

use tokio::net::{TcpSocket, TcpStream};

use super::config::TCP_MD5_MAX_KEY_LEN;

/// Why a connection attempt failed; each variant's text is short enough for a status
/// line ("connect: connection refused").
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("socket: {}", short(.0))]
    Socket(#[source] io::Error),
    /// The kernel refused the TCP-MD5 key (no `CONFIG_TCP_MD5SIG`, or a bad key).
    #[error("setting the TCP-MD5 password: {}", short(.0))]
    Md5Signature(#[source] io::Error),
    #[error("setting TCP_USER_TIMEOUT: {}", short(.0))]
    UserTimeout(#[source] io::Error),
    #[error("{}", short(.0))]
    Connect(#[source] io::Error),
}

/// An OS error as "connection refused": its description without the "(os error N)"
/// suffix, lowercase first.
fn short(err: &io::Error) -> String {
    let text = err.to_string();
    let text = text.split(" (os error").next().unwrap_or(&text);
    let mut chars = text.chars();
    chars.next().map(|c| c.to_lowercase().chain(chars).collect()).unwrap_or_default()
}

/// Connects to `peer`, signing every segment with `password` if given and aborting the
/// connection when sent data stays unacknowledged for `user_timeout` (not set when zero,
/// leaving the kernel's retransmission limit).
pub async fn connect(
    peer: SocketAddrV4,
    password: Option<&str>,
    user_timeout: Duration,
) -> Result<TcpStream, ConnectError> {
    let socket = TcpSocket::new_v4().map_err(ConnectError::Socket)?;
    if let Some(password) = password {
        set_md5_signature(socket.as_raw_fd(), *peer.ip(), password.as_bytes()).map_err(ConnectError::Md5Signature)?;
    }
    if !user_timeout.is_zero() {
        set_user_timeout(socket.as_raw_fd(), user_timeout).map_err(ConnectError::UserTimeout)?;
    }
    // Our messages are small and each should leave at once (a withdrawal most of all).
    socket.set_nodelay(true).map_err(ConnectError::Socket)?;
    socket.connect(SocketAddr::V4(peer)).await.map_err(ConnectError::Connect)
}

/// `struct tcp_md5sig` (include/uapi/linux/tcp.h): the peer's address, flags, prefix
/// length, key length, interface index, key.
#[repr(C)]
struct TcpMd5Sig {
    addr: libc::sockaddr_storage,
    flags: u8,
    prefix_len: u8,
    key_len: u16,
    ifindex: libc::c_int,
    key: [u8; TCP_MD5_MAX_KEY_LEN],
}

/// `setsockopt(IPPROTO_TCP, TCP_MD5SIG)`: sign segments to and from `peer` with `key`.
/// Must precede `connect`, since the SYN is signed too.
fn set_md5_signature(fd: RawFd, peer: Ipv4Addr, key: &[u8]) -> io::Result<()> {
    if key.is_empty() || key.len() > TCP_MD5_MAX_KEY_LEN {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    // SAFETY: TcpMd5Sig is plain old data (integers and byte arrays); all zeros is valid.
    let mut sig: TcpMd5Sig = unsafe { zeroed() };
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(peer.octets()) },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in; both are POD.
    unsafe { std::ptr::write((&mut sig.addr as *mut libc::sockaddr_storage).cast::<libc::sockaddr_in>(), sin) };
    sig.key_len = key.len() as u16; // at most 80, checked above
    sig.key[..key.len()].copy_from_slice(key);
    setsockopt(fd, libc::TCP_MD5SIG, &sig)
}

/// `setsockopt(IPPROTO_TCP, TCP_USER_TIMEOUT)` in milliseconds (RFC 5482).
fn set_user_timeout(fd: RawFd, timeout: Duration) -> io::Result<()> {
    let millis = libc::c_uint::try_from(timeout.as_millis()).unwrap_or(libc::c_uint::MAX);
    setsockopt(fd, libc::TCP_USER_TIMEOUT, &millis)
}

fn setsockopt<T>(fd: RawFd, name: libc::c_int, value: &T) -> io::Result<()> {
    // SAFETY: `value` points to a live, initialised T of the size passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            name,
            (value as *const T).cast::<libc::c_void>(),
            size_of::<T>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_md5_option_matches_the_kernels_struct_size() {
        // 128 (sockaddr_storage) + 1 + 1 + 2 + 4 + 80.
        assert_eq!(size_of::<TcpMd5Sig>(), 216);
    }

    #[test]
    fn connect_errors_read_like_a_status_line() {
        let refused = io::Error::from_raw_os_error(libc::ECONNREFUSED);
        assert_eq!(ConnectError::Connect(refused).to_string(), "connection refused");
    }

    #[tokio::test]
    async fn a_refused_connection_is_reported_as_such() {
        // A port nothing listens on: bind one, note it, close it.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let err = connect(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port), None, Duration::from_secs(9)).await;
        assert_eq!(err.unwrap_err().to_string(), "connection refused");
    }

    #[tokio::test]
    async fn the_options_are_accepted_by_the_kernel_and_a_signed_connection_to_a_signed_listener_works() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = match listener.local_addr().unwrap() {
            SocketAddr::V4(addr) => addr,
            SocketAddr::V6(_) => unreachable!("bound to IPv4"),
        };
        set_md5_signature(listener.as_raw_fd(), Ipv4Addr::LOCALHOST, b"secret").unwrap();
        let (stream, accepted) = tokio::join!(connect(addr, Some("secret"), Duration::from_secs(9)), listener.accept());
        let stream = stream.unwrap();
        accepted.unwrap();
        assert!(stream.nodelay().unwrap());
    }
}
