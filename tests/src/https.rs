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
