//! The peer benchmark's backend: a fast HTTP/1.1 responder that answers every request
//! with a short `200` naming this backend, then closes the connection (one request per
//! connection, so every request is a new TCP connection, as `vip-peers` measures).
//!
//! Blocking accept loops on one listener, one per thread: the per-connection work is a
//! read, a write and a close, so threads are cheaper here than an event loop and keep the
//! responder off the critical path. Closing first leaves TIME_WAIT on the backend, not on
//! the client, which is what a busy apiserver sees too.
//!
//! usage: vip-responder --name NAME [--listen ADDR:PORT] [--threads N]

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    time::Duration,
};

/// Accept loops: two per backend is enough for the lab's 2-core machine (the client
/// saturates long before); more only adds context switches.
const DEFAULT_THREADS: usize = 2;
/// A client that sends nothing for this long is dropped, so a stuck peer cannot hold an
/// accept loop.
const READ_TIMEOUT: Duration = Duration::from_secs(2);
/// Requests larger than this are not expected (the load generator sends ~60 bytes).
const MAX_REQUEST: usize = 4096;

/// Reads until the end of the request headers, answers, and lets the drop close.
fn serve(mut stream: TcpStream, response: &[u8]) -> std::io::Result<()> {
    stream.set_read_timeout(Some(READ_TIMEOUT))?;
    stream.set_nodelay(true)?;
    let mut buf = [0u8; MAX_REQUEST];
    let mut len = 0;
    while !buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
        if len == buf.len() {
            return Err(std::io::Error::other("request too large"));
        }
        match stream.read(&mut buf[len..])? {
            0 => return Ok(()),
            n => len += n,
        }
    }
    stream.write_all(response)
}

fn main() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let (mut name, mut listen, mut threads) = (None, "0.0.0.0:6443".to_owned(), DEFAULT_THREADS);
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--name" => name = Some(value()?),
            "--listen" => listen = value()?,
            "--threads" => threads = value()?.parse().map_err(|e| format!("--threads: {e}"))?,
            _ => return Err(format!("unknown flag {flag}; usage: vip-responder --name NAME [--listen ADDR:PORT]")),
        }
    }
    let name = name.ok_or("--name is required")?;
    let body = format!("{name}\n");
    let response =
        format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).into_bytes();
    let listener = TcpListener::bind(&listen).map_err(|e| format!("listen on {listen}: {e}"))?;
    std::thread::scope(|s| {
        for _ in 0..threads.max(1) {
            s.spawn(|| loop {
                if let Ok((stream, _)) = listener.accept() {
                    // A client that gave up mid-request is its own business.
                    let _ = serve(stream, &response);
                }
            });
        }
    });
    Ok(())
}
