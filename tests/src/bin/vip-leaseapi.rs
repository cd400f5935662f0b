//! A stand-in for the Kubernetes API's Lease endpoints, for tests that cannot have a
//! kube-apiserver: HTTPS, HTTP/1.1 kept alive, and the semantics the elector relies on:
//! - `GET .../namespaces/NS/leases/NAME`: 200 with the Lease, or 404;
//! - `POST .../namespaces/NS/leases`: 201, or 409 AlreadyExists;
//! - `PUT .../namespaces/NS/leases/NAME`: 200 if `metadata.resourceVersion` matches the
//!   stored one, else 409 Conflict; 404 if missing;
//! - `DELETE .../namespaces/NS/leases/NAME`: 200, or 404.
//!
//! Every write gets a new, cluster-wide increasing resourceVersion. Errors are `Status`
//! objects, as the real API returns them.
//!
//! EndpointSlices: with `--endpoints FILE` (JSON `{"port": 6443, "endpoints": [{"ip":
//! "10.0.0.11", "ready": true}, ...]}`), `default/kubernetes` has one EndpointSlice built
//! from the file, and `GET .../namespaces/default/endpointslices` lists it or, with
//! `watch=true`, streams `MODIFIED` events (chunked) whenever the file changes. Each
//! change takes a new resourceVersion.
//!
//! Faults: `--faults FILE`, read on every request, holds JSON `{"latency_ms": N,
//! "status": S, "token": T}`: each request is delayed N ms, answered with status S if
//! S > 0, and with 401 unless it carries `Authorization: Bearer T` if T is given (the
//! credentials changed under a running client; an open watch without it ends).
//!
//! `--requests-log FILE`: every request's method and path is appended, one per line.
//!
//! `--token TOKEN`: every request must carry `Authorization: Bearer TOKEN`, else 401
//! Unauthorized (a `Status`, as the real API answers a bad service-account token).
//!
//! usage: vip-leaseapi --listen ADDR:PORT --tls-cert PEM --tls-key PEM [--faults FILE]
//!                     [--endpoints FILE] [--requests-log FILE] [--token TOKEN]

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
    /// The endpoints file as last read, and the resourceVersion of that content.
    slice_src: Option<Vec<u8>>,
    slice_rv: u64,
}

/// The `default/kubernetes` EndpointSlice from the endpoints file, with its
/// resourceVersion (bumped when the file's content changes).
fn current_slice(store: &Mutex<Store>, file: &Option<PathBuf>) -> (u64, Option<Value>) {
    let src = file.as_ref().and_then(|f| std::fs::read(f).ok());
    let Ok(mut st) = store.lock() else { return (0, None) };
    if src != st.slice_src {
        st.rv += 1;
        st.slice_rv = st.rv;
        st.slice_src = src.clone();
    }
    let rv = st.slice_rv;
    let Some(v) = src.and_then(|b| serde_json::from_slice::<Value>(&b).ok()) else { return (rv, None) };
    let endpoints: Vec<Value> = v["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| json!({"addresses": [e["ip"]], "conditions": {"ready": e["ready"].as_bool().unwrap_or(true)}}))
        .collect();
    let slice = json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "kubernetes", "namespace": "default", "resourceVersion": rv.to_string(),
                     "labels": {"kubernetes.io/service-name": "kubernetes"}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "https", "port": v["port"].as_u64().unwrap_or(6443), "protocol": "TCP"}],
    });
    (rv, Some(slice))
}

fn query_param<'a>(path: &'a str, key: &str) -> Option<&'a str> {
    path.split_once('?')?.1.split('&').find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

/// Streams watch events for the EndpointSlice until `timeoutSeconds`, the client goes, or
/// `authorized` says the request's credentials are no longer taken (a fault's new
/// token). A real apiserver checks credentials when a watch starts, and ends every watch
/// within minutes (`--min-request-timeout`), after which a client with expired
/// credentials is refused: ending it at once is that, without the wait.
fn watch_slices<S: Write>(
    out: &mut S,
    store: &Mutex<Store>,
    file: &Option<PathBuf>,
    path: &str,
    authorized: &dyn Fn() -> bool,
) -> std::io::Result<()> {
    let mut sent: u64 = query_param(path, "resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
    let timeout = query_param(path, "timeoutSeconds").and_then(|v| v.parse().ok()).unwrap_or(290u64);
    out.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")?;
    out.flush()?;
    let end = std::time::Instant::now() + Duration::from_secs(timeout);
    while std::time::Instant::now() < end && authorized() {
        let (rv, slice) = current_slice(store, file);
        if rv > sent {
            let event = match slice {
                Some(s) => json!({"type": "MODIFIED", "object": s}),
                None => {
                    json!({"type": "DELETED", "object": {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                    "metadata": {"name": "kubernetes", "namespace": "default", "resourceVersion": rv.to_string()},
                    "addressType": "IPv4", "endpoints": []}})
                }
            };
            let line = format!("{event}\n");
            write!(out, "{:x}\r\n{line}\r\n", line.len())?;
            out.flush()?;
            sent = rv;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    out.write_all(b"0\r\n\r\n")?;
    out.flush()
}

fn status(code: u16, reason: &str, message: &str) -> (u16, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": message, "reason": reason, "code": code}),
    )
}

fn handle(store: &Mutex<Store>, method: &str, path: &str, body: &[u8], endpoints: &Option<PathBuf>) -> (u16, Value) {
    let path = path.split('?').next().unwrap_or(path);
    if path == "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices" && method == "GET" {
        let (rv, slice) = current_slice(store, endpoints);
        return (
            200,
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSliceList",
                   "metadata": {"resourceVersion": rv.to_string()}, "items": slice.into_iter().collect::<Vec<_>>()}),
        );
    }
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

/// The injected faults: latency (ms), forced status, the token required.
fn faults(file: &Option<PathBuf>) -> (u64, u16, Option<String>) {
    let Some(v) =
        file.as_ref().and_then(|f| std::fs::read(f).ok()).and_then(|b| serde_json::from_slice::<Value>(&b).ok())
    else {
        return (0, 0, None);
    };
    (
        v["latency_ms"].as_u64().unwrap_or(0),
        v["status"].as_u64().unwrap_or(0) as u16,
        v["token"].as_str().map(str::to_owned),
    )
}

/// Appends `method path` to the requests log, if any.
fn log_request(log: &Option<PathBuf>, method: &str, path: &str) {
    if let Some(f) = log {
        if let Ok(mut out) = std::fs::OpenOptions::new().create(true).append(true).open(f) {
            let _ = writeln!(out, "{method} {path}");
        }
    }
}

/// What every connection shares: the store and the flags.
struct Shared {
    store: Mutex<Store>,
    fault_file: Option<PathBuf>,
    endpoints: Option<PathBuf>,
    requests_log: Option<PathBuf>,
    token: Option<String>,
}

fn serve<S: Read + Write>(stream: S, shared: &Shared) -> std::io::Result<()> {
    let Shared { store, fault_file, endpoints, requests_log, token } = shared;
    let mut stream = BufReader::new(stream);
    loop {
        let mut line = String::new();
        if stream.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let mut it = line.split_whitespace();
        let (method, path) = (it.next().unwrap_or("").to_owned(), it.next().unwrap_or("/").to_owned());
        let mut len = 0usize;
        let mut bearer = None;
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
                if k.eq_ignore_ascii_case("authorization") {
                    bearer = v.trim().strip_prefix("Bearer ").map(str::to_owned);
                }
            }
        }
        let mut body = vec![0u8; len];
        stream.read_exact(&mut body)?;
        log_request(requests_log, &method, &path);
        let (latency, forced, fault_token) = faults(fault_file);
        let token = &fault_token.or_else(|| token.clone());
        if latency > 0 {
            std::thread::sleep(Duration::from_millis(latency));
        }
        if forced == 0
            && (token.is_none() || bearer == *token)
            && path.starts_with("/apis/discovery.k8s.io/v1/namespaces/default/endpointslices?")
            && matches!(query_param(&path, "watch"), Some("true") | Some("1"))
        {
            let authorized = || faults(fault_file).2.is_none_or(|t| bearer.as_ref() == Some(&t));
            return watch_slices(stream.get_mut(), store, endpoints, &path, &authorized);
        }
        let authorized = token.is_none() || bearer == *token;
        let (code, value) = if !authorized {
            status(401, "Unauthorized", "Unauthorized")
        } else if forced > 0 {
            status(forced, "InternalError", "injected fault")
        } else {
            handle(store, &method, &path, &body, endpoints)
        };
        let body = value.to_string();
        let reason = match code {
            200 => "OK",
            201 => "Created",
            401 => "Unauthorized",
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
    let endpoints = flag("--endpoints").map(PathBuf::from);
    let requests_log = flag("--requests-log").map(PathBuf::from);
    let token = flag("--token");
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
    let shared = Arc::new(Shared { store: Mutex::new(Store::default()), fault_file, endpoints, requests_log, token });
    let listener = TcpListener::bind(&listen).map_err(|e| format!("bind {listen}: {e}"))?;
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let (config, shared) = (config.clone(), shared.clone());
        std::thread::spawn(move || -> std::io::Result<()> {
            let conn = ServerConnection::new(config).map_err(std::io::Error::other)?;
            serve(StreamOwned::new(conn, stream), &shared)
        });
    }
    Ok(())
}
