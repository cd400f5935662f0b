//! A stand-in for the Kubernetes API's Lease endpoints, for tests that cannot have a
//! kube-apiserver: HTTPS, HTTP/1.1 kept alive, and the semantics the elector relies on:
//! - `GET .../namespaces/NS/leases/NAME`: 200 with the Lease, or 404;
//! - `POST .../namespaces/NS/leases`: 201, or 409 AlreadyExists;
//! - `PUT .../namespaces/NS/leases/NAME`: 200 if `metadata.resourceVersion` matches the
//!   stored one, else 409 Conflict; 404 if missing;
//! - `DELETE .../namespaces/NS/leases/NAME`: 200, or 404.
//! Every write gets a new, cluster-wide increasing resourceVersion. Errors are `Status`
//! objects, as the real API returns them.
//!
//! Faults: `--faults FILE`, read on every request, holds JSON `{"latency_ms": N,
//! "status": S}`: each request is delayed N ms, and answered with status S if S > 0.
//!
//! usage: vip-leaseapi --listen ADDR:PORT --tls-cert PEM --tls-key PEM [--faults FILE]

use std::{
    collections::HashMap,
    io::{BufRead, BufReader, Read, Write},
    net::TcpListener,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use rustls::{
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer},
    ServerConfig, ServerConnection, StreamOwned,
};
use serde_json::{json, Value};

#[derive(Default)]
struct Store {
    rv: u64,
    leases: HashMap<(String, String), Value>,
}

fn status(code: u16, reason: &str, message: &str) -> (u16, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": message, "reason": reason, "code": code}),
    )
}

fn handle(store: &Mutex<Store>, method: &str, path: &str, body: &[u8]) -> (u16, Value) {
    let path = path.split('?').next().unwrap_or(path);
    let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (ns, name) = match parts.as_slice() {
        ["apis", "coordination.k8s.io", "v1", "namespaces", ns, "leases"] => (ns.to_string(), None),
        ["apis", "coordination.k8s.io", "v1", "namespaces", ns, "leases", name] => {
            (ns.to_string(), Some(name.to_string()))
        }
        _ => return status(404, "NotFound", &format!("no route for {path}")),
    };
    let Ok(mut st) = store.lock() else { return status(500, "InternalError", "store poisoned") };
    let parsed = || serde_json::from_slice::<Value>(body);
    match (method, name) {
        ("GET", Some(name)) => match st.leases.get(&(ns, name.clone())) {
            Some(l) => (200, l.clone()),
            None => status(404, "NotFound", &format!("leases.coordination.k8s.io \"{name}\" not found")),
        },
        ("POST", None) => {
            let Ok(mut lease) = parsed() else { return status(400, "BadRequest", "invalid JSON") };
            let name = lease["metadata"]["name"].as_str().unwrap_or_default().to_owned();
            if st.leases.contains_key(&(ns.clone(), name.clone())) {
                return status(409, "AlreadyExists", &format!("leases.coordination.k8s.io \"{name}\" already exists"));
            }
            st.rv += 1;
            lease["metadata"]["resourceVersion"] = json!(st.rv.to_string());
            lease["metadata"]["namespace"] = json!(ns);
            lease["metadata"]["uid"] = json!(format!("uid-{}", st.rv));
            lease["apiVersion"] = json!("coordination.k8s.io/v1");
            lease["kind"] = json!("Lease");
            st.leases.insert((ns, name), lease.clone());
            (201, lease)
        }
        ("PUT", Some(name)) => {
            let Ok(mut lease) = parsed() else { return status(400, "BadRequest", "invalid JSON") };
            let key = (ns, name.clone());
            let Some(current) = st.leases.get(&key).cloned() else {
                return status(404, "NotFound", &format!("leases.coordination.k8s.io \"{name}\" not found"));
            };
            if lease["metadata"]["resourceVersion"] != current["metadata"]["resourceVersion"] {
                return status(
                    409,
                    "Conflict",
                    &format!(
                        "Operation cannot be fulfilled on leases.coordination.k8s.io \"{name}\": the object has been modified; please apply your changes to the latest version and try again"
                    ),
                );
            }
            st.rv += 1;
            lease["metadata"]["resourceVersion"] = json!(st.rv.to_string());
            lease["metadata"]["uid"] = current["metadata"]["uid"].clone();
            lease["apiVersion"] = json!("coordination.k8s.io/v1");
            lease["kind"] = json!("Lease");
            st.leases.insert(key, lease.clone());
            (200, lease)
        }
        ("DELETE", Some(name)) => match st.leases.remove(&(ns, name.clone())) {
            Some(_) => status(200, "Success", "deleted"),
            None => status(404, "NotFound", &format!("leases.coordination.k8s.io \"{name}\" not found")),
        },
        _ => status(405, "MethodNotAllowed", &format!("{method} {path}")),
    }
}

fn faults(file: &Option<PathBuf>) -> (u64, u16) {
    let Some(v) =
        file.as_ref().and_then(|f| std::fs::read(f).ok()).and_then(|b| serde_json::from_slice::<Value>(&b).ok())
    else {
        return (0, 0);
    };
    (v["latency_ms"].as_u64().unwrap_or(0), v["status"].as_u64().unwrap_or(0) as u16)
}

fn serve<S: Read + Write>(stream: S, store: &Mutex<Store>, fault_file: &Option<PathBuf>) -> std::io::Result<()> {
    let mut stream = BufReader::new(stream);
    loop {
        let mut line = String::new();
        if stream.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut it = line.split_whitespace();
        let (method, path) = (it.next().unwrap_or("").to_owned(), it.next().unwrap_or("/").to_owned());
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            if stream.read_line(&mut h)? == 0 {
                return Ok(());
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0u8; len];
        stream.read_exact(&mut body)?;
        let (latency, forced) = faults(fault_file);
        if latency > 0 {
            std::thread::sleep(Duration::from_millis(latency));
        }
        let (code, value) = if forced > 0 {
            status(forced, "InternalError", "injected fault")
        } else {
            handle(store, &method, &path, &body)
        };
        let body = value.to_string();
        let reason = match code {
            200 => "OK",
            201 => "Created",
            404 => "Not Found",
            409 => "Conflict",
            _ => "Error",
        };
        let response = format!(
            "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.get_mut().write_all(response.as_bytes())?;
        stream.get_mut().flush()?;
    }
}

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    let flag = |f: &str| args.iter().position(|a| a == f).and_then(|i| args.get(i + 1)).cloned();
    let usage = "usage: vip-leaseapi --listen ADDR:PORT --tls-cert PEM --tls-key PEM [--faults FILE]";
    let listen = flag("--listen").ok_or(usage)?;
    let (cert, key) = (flag("--tls-cert").ok_or(usage)?, flag("--tls-key").ok_or(usage)?);
    let fault_file = flag("--faults").map(PathBuf::from);
    let certs = CertificateDer::pem_file_iter(&cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{cert}: {e}"))?;
    let key = PrivateKeyDer::from_pem_file(&key).map_err(|e| format!("{key}: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| e.to_string())?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let config = Arc::new(config);
    let store = Arc::new(Mutex::new(Store::default()));
    let listener = TcpListener::bind(&listen).map_err(|e| format!("bind {listen}: {e}"))?;
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let (config, store, fault_file) = (config.clone(), store.clone(), fault_file.clone());
        std::thread::spawn(move || -> std::io::Result<()> {
            let conn = ServerConnection::new(config).map_err(std::io::Error::other)?;
            serve(StreamOwned::new(conn, stream), &store, &fault_file)
        });
    }
    Ok(())
}
