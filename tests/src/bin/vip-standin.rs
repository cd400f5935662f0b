//! A stand-in for a backend server: listens on TCP, greets every connection with its
//! name on one line, then echoes each line it receives. Tests and the demo run one per
//! backend namespace to see which backend a connection through the VIP reached, and
//! whether an open connection keeps working.
//!
//! usage: vip-standin --name NAME [--listen ADDR:PORT]   (default 0.0.0.0:6443)

use std::{
    io::{BufRead, BufReader, Write},
    net::{TcpListener, TcpStream},
};

fn serve(stream: TcpStream, name: &str) -> std::io::Result<()> {
    let mut out = stream.try_clone()?;
    writeln!(out, "{name}")?;
    for line in BufReader::new(stream).lines() {
        writeln!(out, "{}", line?)?;
    }
    Ok(())
}

fn main() -> Result<(), String> {
    let args: Vec<String> = std::env::args().collect();
    let flag = |f: &str| args.iter().position(|a| a == f).and_then(|i| args.get(i + 1)).cloned();
    let name = flag("--name").ok_or("usage: vip-standin --name NAME [--listen ADDR:PORT]")?;
    let listen = flag("--listen").unwrap_or_else(|| "0.0.0.0:6443".into());
    let listener = TcpListener::bind(&listen).map_err(|e| format!("bind {listen}: {e}"))?;
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let name = name.clone();
        std::thread::spawn(move || serve(stream, &name));
    }
    Ok(())
}
