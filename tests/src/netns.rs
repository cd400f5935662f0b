//! Network namespaces and veth pairs for tests, the demo and the benchmarks.
//!
//! Every namespace is named `vt<pid>-<n>-<role>` and deleted (with every process still
//! inside it killed) when its guard drops, also on panic. Interface names are kept under
//! the kernel's 15-byte limit.

use vip_agent::rawsock::RawSocket;

use std::{
    fs::File,
    io,
    os::fd::AsRawFd,
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A unique short tag for names made by this process: `<pid % 100000>x<n>`.
pub fn unique_tag() -> String {
    format!("{}x{}", std::process::id() % 100_000, NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Runs `cmd` and fails with its stderr if it fails.
pub fn run(cmd: &mut Command) -> Result<Output, String> {
    let shown = format!("{cmd:?}");
    let out = cmd.stdin(Stdio::null()).output().map_err(|e| format!("{shown}: {e}"))?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(format!("{shown} failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// `ip ARGS`, failing on error.
pub fn ip(args: &[&str]) -> Result<Output, String> {
    run(Command::new("ip").args(args))
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Creates `vt<tag>-<role>` with its loopback up.
    pub fn new(tag: &str, role: &str) -> Result<Self, String> {
        let name = format!("vt{tag}-{role}");
        ip(&["netns", "add", &name])?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n NAME ARGS`.
    pub fn ip(&self, args: &[&str]) -> Result<Output, String> {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// A command that runs `program` inside the namespace (`ip netns exec`).
    pub fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// `sysctl -w KEY=VALUE` inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<(), String> {
        run(self.cmd("sysctl").args(["-q", "-w", &format!("{key}={value}")])).map(drop)
    }

    /// Whether `dev` in this namespace has an XDP program attached (any mode).
    pub fn has_xdp(&self, dev: &str) -> Result<bool, String> {
        let out = self.ip(&["-d", "link", "show", "dev", dev])?;
        let text = String::from_utf8_lossy(&out.stdout);
        Ok(text.contains("prog/xdp") || text.contains(" xdp"))
    }

    /// Addresses on `dev`, as `ip -o addr` prints them.
    pub fn addrs(&self, dev: &str) -> Result<String, String> {
        let out = self.ip(&["-o", "-4", "addr", "show", "dev", dev])?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `f` on a new thread that has joined this namespace, and returns its result.
    /// Interface lookups, XDP attaches and sockets made by `f` belong to the namespace.
    pub fn within<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T, String> {
        std::thread::scope(|s| {
            s.spawn(|| {
                enter(&self.name)?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Moves the calling thread into this namespace (for threads that switch between
    /// namespaces; prefer [`Netns::within`]).
    pub fn enter(&self) -> Result<(), String> {
        enter(&self.name)
    }
}

/// Moves the calling thread into the namespace called `name`.
pub fn enter_by_name(name: &str) -> Result<(), String> {
    enter(name)
}

fn enter(name: &str) -> Result<(), String> {
    let path = format!("/run/netns/{name}");
    let f = File::open(&path).map_err(|e| format!("open {path}: {e}"))?;
    // SAFETY: f is an open namespace file; setns only changes this thread's namespace.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(format!("setns {name}: {}", io::Error::last_os_error()));
    }
    Ok(())
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Kill whatever still runs inside (an agent a failed test left behind), then
        // delete the namespace; both by name.
        let _ = Command::new("ip").args(["netns", "pids", &self.name]).output().map(|out| {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("kill").args(["-9", pid]).status();
            }
        });
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// Links namespace `a` (interface `a_dev`) to namespace `b` (interface `b_dev`) with a
/// veth pair and brings both ends up.
pub fn veth(a: &Netns, a_dev: &str, b: &Netns, b_dev: &str) -> Result<(), String> {
    ip(&["link", "add", a_dev, "netns", &a.name, "type", "veth", "peer", "name", b_dev, "netns", &b.name])?;
    a.ip(&["link", "set", a_dev, "up"])?;
    b.ip(&["link", "set", b_dev, "up"])?;
    Ok(())
}

/// The MAC address of `dev` in `ns`.
pub fn mac_of(ns: &Netns, dev: &str) -> Result<[u8; 6], String> {
    let out = ns.ip(&["-o", "link", "show", "dev", dev])?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mac = text
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .ok_or_else(|| format!("no MAC in {text:?}"))?;
    parse_mac(mac)
}

pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<u8> = s
        .split(':')
        .map(|p| u8::from_str_radix(p, 16).map_err(|e| format!("bad MAC {s:?}: {e}")))
        .collect::<Result<_, _>>()?;
    parts.try_into().map_err(|_| format!("bad MAC {s:?}"))
}

/// The result of `arping -c COUNT -w DEADLINE`: the MACs that answered, one per reply.
pub fn arping(from: &Netns, dev: &str, target: &str, count: u32, deadline_s: u32) -> Result<Vec<[u8; 6]>, String> {
    let out = from
        .cmd("arping")
        .args(["-c", &count.to_string(), "-w", &deadline_s.to_string(), "-I", dev, target])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("arping: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .filter(|l| l.contains("reply from"))
        .map(|l| {
            let start = l.find('[').ok_or_else(|| format!("no MAC in {l:?}"))?;
            let end = l.find(']').ok_or_else(|| format!("no MAC in {l:?}"))?;
            parse_mac(&l[start + 1..end].to_ascii_lowercase())
        })
        .collect()
}

/// Captures the ARP frames that arrive on `dev` in `ns` for `duration`, on a thread of
/// its own; join the handle for the frames.
pub fn capture_arp(
    ns: &Netns,
    dev: &str,
    duration: std::time::Duration,
) -> std::thread::JoinHandle<Result<Vec<Vec<u8>>, String>> {
    let (name, dev) = (ns.name.clone(), dev.to_owned());
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let handle = std::thread::spawn(move || {
        let result = capture_arp_here(&name, &dev, duration, &ready_tx);
        let _ = ready_tx.send(());
        result
    });
    // Return once the socket is listening, so nothing sent after this call is missed.
    let _ = ready_rx.recv_timeout(std::time::Duration::from_secs(5));
    handle
}

fn capture_arp_here(
    ns: &str,
    dev: &str,
    duration: std::time::Duration,
    ready: &std::sync::mpsc::Sender<()>,
) -> Result<Vec<Vec<u8>>, String> {
    enter(ns)?;
    let (sock, _) = arp_socket(dev, std::time::Duration::from_millis(50))?;
    let _ = ready.send(());
    let deadline = std::time::Instant::now() + duration;
    let mut frames = Vec::new();
    let mut buf = [0u8; 256];
    while std::time::Instant::now() < deadline {
        if let Some(n) = sock.recv(&mut buf).map_err(|e| e.to_string())? {
            frames.push(buf[..n].to_vec());
        }
    }
    Ok(frames)
}

/// A raw socket for ARP frames on `dev` (in the calling thread's namespace), and the
/// interface's MAC.
fn arp_socket(dev: &str, recv_timeout: std::time::Duration) -> Result<(RawSocket, [u8; 6]), String> {
    let netdev = vip_agent::netdev::lookup(dev).map_err(|e| e.to_string())?;
    let sock =
        RawSocket::open(netdev.ifindex, 0x0806, Some(recv_timeout)).map_err(|e| format!("ARP socket on {dev}: {e}"))?;
    Ok((sock, netdev.mac.0))
}

/// Whether `frame` is a gratuitous ARP (request or reply) announcing `ip` at `mac`.
pub fn is_garp(frame: &[u8], ip: std::net::Ipv4Addr, mac: [u8; 6]) -> bool {
    frame.len() >= 42
        && frame[12..14] == [0x08, 0x06]
        && frame[22..28] == mac
        && frame[28..32] == ip.octets()
        && frame[38..42] == ip.octets()
}

/// Sends `frame` (a whole Ethernet frame, its source MAC included) out of `dev` in `ns`
/// through a raw socket: for frames no tool would build, such as malformed ones.
pub fn send_raw_frame(ns: &str, dev: &str, frame: &[u8]) -> Result<(), String> {
    enter(ns)?;
    let (sock, _) = arp_socket(dev, std::time::Duration::from_millis(10))?;
    sock.send(frame).map_err(|e| format!("sending a frame on {dev}: {e}"))?;
    Ok(())
}

/// Sends one ARP request for `target` from `dev` in `ns` (sender `src_ip`, the
/// interface's MAC) and returns the MAC of every host that answered within `wait`.
pub fn arp_probe(
    ns: &str,
    dev: &str,
    src_ip: std::net::Ipv4Addr,
    target: std::net::Ipv4Addr,
    wait: std::time::Duration,
) -> Result<Vec<[u8; 6]>, String> {
    enter(ns)?;
    let (sock, mac) = arp_socket(dev, std::time::Duration::from_millis(10))?;
    let mut frame = Vec::with_capacity(42);
    frame.extend([0xff; 6]);
    frame.extend(mac);
    frame.extend([0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    frame.extend(mac);
    frame.extend(src_ip.octets());
    frame.extend([0; 6]);
    frame.extend(target.octets());
    sock.send(&frame).map_err(|e| format!("sending an ARP request: {e}"))?;
    let deadline = std::time::Instant::now() + wait;
    let mut macs: Vec<[u8; 6]> = Vec::new();
    let mut buf = [0u8; 128];
    while std::time::Instant::now() < deadline {
        let Some(n) = sock.recv(&mut buf).map_err(|e| e.to_string())? else { continue };
        if n >= 42 {
            let f = &buf[..n];
            // An ARP reply from `target` addressed to us.
            if f[20..22] == [0, 2] && f[28..32] == target.octets() && f[38..42] == src_ip.octets() {
                let m: [u8; 6] = f[22..28].try_into().unwrap_or_default();
                if !macs.contains(&m) {
                    macs.push(m);
                }
            }
        }
    }
    Ok(macs)
}
