//! Real BGP routers for the BGP lab, run by hand inside a namespace (no systemd):
//! FRR 8.4's zebra and bgpd (Debian's `frr`), configured through vtysh, and BIRD 2
//! (Debian's `bird2`) with a config file of its own. Each is a child of the test (so it
//! is reaped) and is killed when dropped.

use std::{
    fs::File,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::{agent::wait_until, netns::Netns};

const FRR_DIR: &str = "/usr/lib/frr";

/// Runs `program args`, returning stdout, or stderr and stdout as the error.
fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program).args(args).output().map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{program} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        ))
    }
}

/// One neighbor (a vip node) as a router sees it.
#[derive(Clone, Debug)]
pub struct Neighbor {
    pub ip: Ipv4Addr,
    pub asn: u32,
    pub password: Option<String>,
}

/// FRR's zebra and bgpd in a namespace.
pub struct Frr {
    dir: PathBuf,
    daemons: Vec<Child>,
}

impl Frr {
    /// Starts zebra and bgpd in `ns` and configures `router bgp asn` with `router_id`,
    /// the neighbors, ECMP over up to `maximum_paths`, and no eBGP policy requirement.
    pub fn start(
        ns: &Netns,
        dir: &Path,
        asn: u32,
        router_id: Ipv4Addr,
        neighbors: &[Neighbor],
    ) -> Result<Self, String> {
        let mut commands = vec![
            format!("router bgp {asn}"),
            format!("bgp router-id {router_id}"),
            "no bgp ebgp-requires-policy".to_owned(),
            "bgp bestpath as-path multipath-relax".to_owned(),
        ];
        for n in neighbors {
            commands.push(format!("neighbor {} remote-as {}", n.ip, n.asn));
            if let Some(p) = &n.password {
                commands.push(format!("neighbor {} password {p}", n.ip));
            }
        }
        commands.extend(["address-family ipv4 unicast".to_owned(), "maximum-paths 16".to_owned()]);
        Self::start_with(ns, dir, &commands)
    }

    /// Starts zebra and bgpd in `ns` and applies `commands` in configure mode.
    pub fn start_with(ns: &Netns, dir: &Path, commands: &[String]) -> Result<Self, String> {
        if !Path::new(FRR_DIR).join("bgpd").exists() {
            return Err(format!("FRR is not installed ({FRR_DIR}/bgpd missing): cargo xtask setup installs it"));
        }
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        run("chown", &["frr:frr", &dir.to_string_lossy()])?;
        let mut me = Self { dir: dir.to_owned(), daemons: Vec::new() };
        me.start_daemon(ns, "zebra")?;
        me.start_daemon(ns, "bgpd")?;
        me.configure(commands)?;
        Ok(me)
    }

    /// Sends `signal` to bgpd (as a node speaker's stop or death).
    pub fn signal_bgpd(&self, signal: i32) {
        if let Some(bgpd) = self.daemons.get(1) {
            // SAFETY: plain kill(2) on our own child.
            unsafe { libc::kill(bgpd.id() as i32, signal) };
        }
    }

    fn start_daemon(&mut self, ns: &Netns, name: &str) -> Result<(), String> {
        let dir = self.dir.to_string_lossy().into_owned();
        let log = File::create(self.dir.join(format!("{name}.log"))).map_err(|e| e.to_string())?;
        let child = ns
            .cmd(&format!("{FRR_DIR}/{name}"))
            .args(["-P", "0", "-u", "frr", "-g", "frr", "-f", "/dev/null"])
            .args(["-i", &format!("{dir}/{name}.pid"), "-z", &format!("{dir}/zserv.api"), "--vty_socket", &dir])
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting {name}: {e}"))?;
        self.daemons.push(child);
        let socket = self.dir.join(format!("{name}.vty"));
        if wait_until(Duration::from_secs(10), || socket.exists()) {
            Ok(())
        } else {
            Err(format!("{name} did not start; see {}", self.dir.join(format!("{name}.log")).display()))
        }
    }

    /// Runs vtysh commands; returns their output.
    pub fn vtysh(&self, commands: &[String]) -> Result<String, String> {
        let mut args = vec!["--vty_socket".to_owned(), self.dir.to_string_lossy().into_owned()];
        for c in commands {
            args.extend(["-c".to_owned(), c.clone()]);
        }
        run("vtysh", &args.iter().map(String::as_str).collect::<Vec<_>>())
    }

    /// `configure terminal` then `commands`.
    pub fn configure(&self, commands: &[String]) -> Result<String, String> {
        let mut all = vec!["configure terminal".to_owned()];
        all.extend_from_slice(commands);
        self.vtysh(&all)
    }

    /// A `show ... json` command's output.
    pub fn show_json(&self, command: &str) -> Result<serde_json::Value, String> {
        let text = self.vtysh(&[command.to_owned()])?;
        serde_json::from_str(&text).map_err(|e| format!("{command}: {e}: {text}"))
    }

    /// FRR's state of the session with `neighbor` ("Established", "Active", ...).
    pub fn state(&self, neighbor: Ipv4Addr) -> String {
        self.show_json("show ip bgp summary json")
            .ok()
            .and_then(|s| s["ipv4Unicast"]["peers"][neighbor.to_string()]["state"].as_str().map(str::to_owned))
            .unwrap_or_default()
    }
}

impl Drop for Frr {
    fn drop(&mut self) {
        for d in self.daemons.iter_mut() {
            let _ = d.kill();
            let _ = d.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// BIRD 2 in a namespace, importing the vip nodes' routes into the kernel with ECMP.
pub struct Bird {
    dir: PathBuf,
    daemon: Child,
}

impl Bird {
    pub fn start(
        ns: &Netns,
        dir: &Path,
        asn: u32,
        router_id: Ipv4Addr,
        neighbors: &[Neighbor],
    ) -> Result<Self, String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let mut conf = format!(
            "router id {router_id};\nprotocol device {{}}\n\
             protocol kernel {{ ipv4 {{ export all; }}; merge paths on; }}\n"
        );
        for (i, n) in neighbors.iter().enumerate() {
            let password = n.password.as_ref().map_or(String::new(), |p| format!("  password \"{p}\";\n"));
            conf.push_str(&format!(
                "protocol bgp node{i} {{\n  local as {asn};\n  neighbor {} as {};\n{password}  \
                 ipv4 {{ import all; export none; }};\n}}\n",
                n.ip, n.asn
            ));
        }
        let conf_path = dir.join("bird.conf");
        std::fs::write(&conf_path, conf).map_err(|e| e.to_string())?;
        let ctl = dir.join("bird.ctl");
        let log = File::create(dir.join("bird.log")).map_err(|e| e.to_string())?;
        let daemon = ns
            .cmd("bird")
            .args(["-f", "-c"])
            .arg(&conf_path)
            .arg("-s")
            .arg(&ctl)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting bird: {e}"))?;
        let me = Self { dir: dir.to_owned(), daemon };
        if wait_until(Duration::from_secs(10), || ctl.exists()) {
            Ok(me)
        } else {
            Err(format!("bird did not start; see {}", dir.join("bird.log").display()))
        }
    }

    /// `birdc show protocols` output.
    pub fn protocols(&self) -> String {
        run("birdc", &["-s", &self.dir.join("bird.ctl").to_string_lossy(), "show", "protocols"]).unwrap_or_default()
    }
}

impl Drop for Bird {
    fn drop(&mut self) {
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The nexthops of the kernel route for `dst` in `ns` (empty if there is none).
pub fn nexthops(ns: &Netns, dst: Ipv4Addr) -> Vec<Ipv4Addr> {
    let Ok(out) = ns.ip(&["-j", "route", "show", &format!("{dst}/32")]) else { return Vec::new() };
    let Ok(routes) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else { return Vec::new() };
    let mut hops = Vec::new();
    for r in routes.as_array().into_iter().flatten() {
        if let Some(g) = r["gateway"].as_str().and_then(|g| g.parse().ok()) {
            hops.push(g);
        }
        for h in r["nexthops"].as_array().into_iter().flatten() {
            if let Some(g) = h["gateway"].as_str().and_then(|g| g.parse().ok()) {
                hops.push(g);
            }
        }
    }
    hops.sort();
    hops
}
