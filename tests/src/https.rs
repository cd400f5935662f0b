//! A minimal HTTPS/1.1 client for the lab: what a kubectl would do through the VIP,
//! without a process per request.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    path::Path,
    sync::Arc,
    time::Duration,
};

use rustls::{
    pki_types::{pem::PemObject, CertificateDer, ServerName},
    ClientConfig, ClientConnection, RootCertStore, StreamOwned,
};

#[derive(Clone)]
pub struct Client {
    config: Arc<ClientConfig>,
    pub timeout: Duration,
}

impl Client {
    /// A client that trusts the CA in `ca_pem`.
    pub fn new(ca_pem: &Path) -> Result<Self, String> {
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca_pem).map_err(|e| e.to_string())? {
            roots.add(cert.map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Self { config: Arc::new(config), timeout: Duration::from_secs(2) })
    }

    /// Opens a TLS connection to `addr`, verifying the certificate for its IP.
    pub fn connect(&self, addr: SocketAddr) -> Result<Conn, String> {
        let tcp = TcpStream::connect_timeout(&addr, self.timeout).map_err(|e| format!("connect {addr}: {e}"))?;
        self.tls(tcp, addr)
    }

    /// [`Client::connect`] from local port `port` (bound with `SO_REUSEADDR`): a client
    /// that reuses its addresses and ports, as a busy one does once its ephemeral ports
    /// wrap. IPv4 only. std binds before connecting only through `TcpListener`, so the
    /// socket is made here.
    pub fn connect_from(&self, port: u16, addr: SocketAddr) -> Result<Conn, String> {
        use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
        let SocketAddr::V4(to) = addr else { return Err(format!("connect_from {addr}: IPv4 only")) };
        let os = |what: &str| format!("{what} from port {port} to {addr}: {}", std::io::Error::last_os_error());
        let sin = |ip: std::net::Ipv4Addr, port: u16| libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(ip.octets()) },
            sin_zero: [0; 8],
        };
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        // SAFETY: socket(2) without pointers; the descriptor is owned at once.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(os("socket"));
        }
        // SAFETY: a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let one: libc::c_int = 1;
        // connect(2) gives up after SO_SNDTIMEO.
        let timeout = libc::timeval { tv_sec: self.timeout.as_secs() as _, tv_usec: self.timeout.subsec_micros() as _ };
        let (local, remote) = (sin(std::net::Ipv4Addr::UNSPECIFIED, port), sin(*to.ip(), to.port()));
        // SAFETY: each call gets a valid descriptor and a pointer to a value of the length
        // given, live for the call.
        unsafe {
            let opt = |name, value: *const libc::c_void, len| {
                libc::setsockopt(fd.as_raw_fd(), libc::SOL_SOCKET, name, value, len)
            };
            if opt(libc::SO_REUSEADDR, &one as *const _ as *const _, std::mem::size_of_val(&one) as _) != 0
                || opt(libc::SO_SNDTIMEO, &timeout as *const _ as *const _, std::mem::size_of_val(&timeout) as _) != 0
            {
                return Err(os("setsockopt"));
            }
            if libc::bind(fd.as_raw_fd(), &local as *const _ as *const libc::sockaddr, len) != 0 {
                return Err(os("bind"));
            }
            if libc::connect(fd.as_raw_fd(), &remote as *const _ as *const libc::sockaddr, len) != 0 {
                return Err(os("connect"));
            }
        }
        self.tls(TcpStream::from(fd), addr)
    }

    /// TLS over a connected `tcp`, reads and writes bounded by the client's timeout.
    fn tls(&self, tcp: TcpStream, addr: SocketAddr) -> Result<Conn, String> {
        tcp.set_read_timeout(Some(self.timeout)).map_err(|e| e.to_string())?;
        tcp.set_write_timeout(Some(self.timeout)).map_err(|e| e.to_string())?;
        let conn = ClientConnection::new(self.config.clone(), ServerName::IpAddress(addr.ip().into()))
            .map_err(|e| e.to_string())?;
        Ok(Conn { stream: BufReader::new(StreamOwned::new(conn, tcp)), addr })
    }

    /// One request on a new connection: `(status, body)`.
    pub fn get(&self, addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
        self.connect(addr)?.get(path)
    }
}

/// A kept-alive HTTPS connection.
pub struct Conn {
    stream: BufReader<StreamOwned<ClientConnection, TcpStream>>,
    addr: SocketAddr,
}

impl Conn {
    /// Closes the connection with a reset (`SO_LINGER` 0), so that this side keeps no
    /// TIME_WAIT and its port can be used again at once.
    pub fn reset(self) {
        use std::os::fd::AsRawFd;
        let linger = libc::linger { l_onoff: 1, l_linger: 0 };
        // SAFETY: a valid descriptor and a pointer to a value of the length given.
        unsafe {
            libc::setsockopt(
                self.stream.get_ref().sock.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                &linger as *const _ as *const libc::c_void,
                std::mem::size_of_val(&linger) as libc::socklen_t,
            );
        }
    }

    /// One request on this connection: `(status, body)`.
    pub fn get(&mut self, path: &str) -> Result<(u16, String), String> {
        self.request("GET", path, &[])
    }

    /// One request with a body (`Content-Length` set when `body` is not empty).
    pub fn request(&mut self, method: &str, path: &str, body: &[u8]) -> Result<(u16, String), String> {
        let addr = self.addr;
        let err = |what: &str, e: std::io::Error| format!("{what} {addr}{path}: {e}");
        let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: keep-alive\r\n");
        if !body.is_empty() {
            req.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
        }
        req.push_str("\r\n");
        self.stream.get_mut().write_all(req.as_bytes()).map_err(|e| err("write", e))?;
        self.stream.get_mut().write_all(body).map_err(|e| err("write", e))?;
        let mut line = String::new();
        self.stream.read_line(&mut line).map_err(|e| err("read", e))?;
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| format!("bad status line {line:?}"))?;
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            self.stream.read_line(&mut h).map_err(|e| err("read", e))?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().map_err(|_| format!("bad content-length {v:?}"))?;
                }
            }
        }
        let mut body = vec![0u8; len];
        self.stream.read_exact(&mut body).map_err(|e| err("read body", e))?;
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}
