//! A stand-in for a backend server. Two modes:
//! - plain TCP (default): greets every connection with its name on one line, then echoes
//!   each line it receives;
//! - HTTPS (`--tls-cert`/`--tls-key`): an apiserver stand-in. `GET /readyz` answers 200
//!   `ok` (500 while `--unready-file` exists); a request with a body answers 200 with
//!   the name and the body's length (`n2 1048576`); any other answers 200 with the
//!   name. Connections are kept alive. With `--token TOKEN`, `/readyz` without
//!   `Authorization: Bearer TOKEN` answers 401, as K3s's apiserver does (it runs with
//!   `--anonymous-auth=false`).
//!
//! usage: vip-standin --name NAME [--listen ADDR:PORT] [--tls-cert PEM --tls-key PEM]
//!                    [--unready-file PATH] [--token TOKEN]

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{TcpListener, TcpStream},
    path::PathBuf,
    sync::Arc,
};

use rustls::{
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    ServerConfig, ServerConnection, StreamOwned,
};

fn serve_tcp(stream: TcpStream, name: &str) -> std::io::Result<()> {
    let mut out = stream.try_clone()?;
    writeln!(out, "{name}")?;
    for line in BufReader::new(stream).lines() {
        writeln!(out, "{}", line?)?;
    }
    Ok(())
}

/// What the HTTPS stand-in answers from: its name, the unready file, the token `/readyz`
/// requires.
struct Http {
    name: String,
    unready: Option<PathBuf>,
    token: Option<String>,
}

fn serve_http<S: Read + Write>(stream: S, http: &Http) -> std::io::Result<()> {
    let Http { name, unready, token } = http;
    let mut stream = BufReader::new(stream);
    loop {
        let mut request = String::new();
        if stream.read_line(&mut request)? == 0 {
            return Ok(());
        }
        let mut close = false;
        let mut len = 0usize;
        let mut bearer = None;
        loop {
            let mut h = String::new();
            if stream.read_line(&mut h)? == 0 {
                return Ok(());
            }
            let h = h.trim_end();
            if let Some(t) =
                h.strip_prefix("Authorization: Bearer ").or_else(|| h.strip_prefix("authorization: Bearer "))
            {
                bearer = Some(t.to_owned());
            }
            let h = h.to_ascii_lowercase();
            if h.is_empty() {
                break;
            }
            if h == "connection: close" {
                close = true;
            }
            if let Some(v) = h.strip_prefix("content-length:") {
                len = v.trim().parse().unwrap_or(0);
            }
        }
        if len > 0 {
            std::io::copy(&mut (&mut stream).take(len as u64), &mut std::io::sink())?;
        }
        let path = request.split_whitespace().nth(1).unwrap_or("/");
        let (status, body) = if len > 0 {
            ("200 OK", format!("{name} {len}\n"))
        } else if path == "/readyz" {
            if token.is_some() && bearer != *token {
                ("401 Unauthorized", "Unauthorized\n".to_string())
            } else if unready.as_ref().is_some_and(|f| f.exists()) {
                ("500 Internal Server Error", "not ready\n".to_string())
            } else {
                ("200 OK", "ok".to_string())
            }
        } else {
            ("200 OK", format!("{name}\n"))
        };
        let response =
            format!("HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}", body.len());
        stream.get_mut().write_all(response.as_bytes())?;
        stream.get_mut().flush()?;
        if close {
            return Ok(());
        }
    }
}

fn tls_config(cert: &str, key: &str) -> Result<Arc<ServerConfig>, String> {
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{cert}: {e}"))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{key}: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| e.to_string())?;
    Ok(Arc::new(config))
}

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    let flag = |f: &str| args.iter().position(|a| a == f).and_then(|i| args.get(i + 1)).cloned();
    let name =
        flag("--name").ok_or("usage: vip-standin --name NAME [--listen ADDR:PORT] [--tls-cert PEM --tls-key PEM]")?;
    let listen = flag("--listen").unwrap_or_else(|| "0.0.0.0:6443".into());
    let http = Arc::new(Http {
        name: name.clone(),
        unready: flag("--unready-file").map(PathBuf::from),
        token: flag("--token"),
    });
    let tls = match (flag("--tls-cert"), flag("--tls-key")) {
        (Some(c), Some(k)) => Some(tls_config(&c, &k)?),
        (None, None) => None,
        _ => return Err("--tls-cert and --tls-key go together".into()),
    };
    let listener = TcpListener::bind(&listen).map_err(|e| format!("bind {listen}: {e}"))?;
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let (name, tls, http) = (name.clone(), tls.clone(), http.clone());
        std::thread::spawn(move || match tls {
            None => serve_tcp(stream, &name),
            Some(config) => {
                let conn = ServerConnection::new(config).map_err(std::io::Error::other)?;
                serve_http(StreamOwned::new(conn, stream), &http)
            }
        });
    }
    Ok(())
}
