//! The control-plane lab: a client and N control-plane nodes on one bridge. Every node
//! runs an HTTPS apiserver stand-in on :6443 (`/readyz`, and a body naming the node),
//! with a certificate from the lab CA for its address and the VIP, not loopback, as
//! kubeadm issues them. Nodes that
//! do not run vip-agent hold the VIP on `lo` quietly, as DSR backends; vip-agent puts it
//! there itself on the nodes it runs on.
//!
//! Used by the end-to-end tests, `cargo xtask demo` and the benchmarks. Dropping it
//! kills the stand-ins and agents and removes every namespace and file it made.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use crate::{
    agent::{pin_dir, wait_until, Agent},
    https,
    lab::Lab,
    pki::Pki,
};

/// The lab's health-check timing: fast, so tests are quick and failover is visible.
pub const HEALTH_INTERVAL: Duration = Duration::from_millis(200);
pub const HEALTH_TIMEOUT: Duration = Duration::from_millis(150);
pub const RISE: u32 = 2;
pub const FALL: u32 = 2;

pub struct Node {
    pub name: String,
    pub ip: Ipv4Addr,
    standin: Option<Child>,
}

pub struct ApiLab {
    pub vip: Ipv4Addr,
    /// The lab's IPv6 VIP, `fd00:a:b:c::100` for prefix `a.b.c` (in the apiservers'
    /// certificates; on the wire once [`ApiLab::with_ipv6`] gave the hosts addresses).
    pub vip6: Ipv6Addr,
    pub nodes: Vec<Node>,
    /// The Lease API stand-in, once [`ApiLab::with_lease_api`] started it.
    lease_api: Option<Child>,
    /// Give agents every node as `--backend` (else they rely on discovery).
    pub static_backends: bool,
    pub client: https::Client,
    pub pki: Pki,
    pub lab: Lab,
}

impl ApiLab {
    /// `n` nodes at `prefix.11`, `.12`, …, a client at `prefix.2`, the VIP at
    /// `prefix.100`. `agent_nodes` lists (by index) the nodes that will run vip-agent.
    pub fn new(prefix: [u8; 3], n: usize, agent_nodes: &[usize]) -> Result<Self, String> {
        let mut lab = Lab::new(prefix)?;
        lab.add_host("cli", 2)?;
        Self::with_nodes(lab, prefix, n, agent_nodes, None)
    }

    /// The BGP lab: `n` nodes (all running vip-agent) at `prefix.11`, … on the switch
    /// with a router at `prefix.1` (host `rtr`, forwarding, layer-4 multipath hashing)
    /// that is their default gateway, and the client behind the router on a subnet of
    /// its own (`a.b.(c+100).2`, gateway `.1`), so it reaches the VIP (`prefix.100`) by
    /// routing only: the router's routes for it are what the nodes advertise.
    pub fn routed(prefix: [u8; 3], n: usize) -> Result<Self, String> {
        let mut lab = Lab::new(prefix)?;
        lab.add_host("rtr", 1)?;
        let rtr = &lab.host("rtr").ns;
        rtr.sysctl("net.ipv4.ip_forward", "1")?;
        rtr.sysctl("net.ipv4.fib_multipath_hash_policy", "1")?;
        let cli = crate::netns::Netns::new(&lab.tag, "cli")?;
        crate::netns::veth(&cli, "eth0", rtr, "eth1")?;
        let cnet = [prefix[0], prefix[1], prefix[2] + 100];
        rtr.ip(&["addr", "add", &format!("{}.{}.{}.1/24", cnet[0], cnet[1], cnet[2]), "dev", "eth1"])?;
        let cli_ip = Ipv4Addr::new(cnet[0], cnet[1], cnet[2], 2);
        cli.ip(&["addr", "add", &format!("{cli_ip}/24"), "dev", "eth0"])?;
        cli.ip(&["route", "add", "default", "via", &format!("{}.{}.{}.1", cnet[0], cnet[1], cnet[2])])?;
        let mac = crate::netns::mac_of(&cli, "eth0")?;
        lab.hosts.push(crate::lab::Host { ns: cli, dev: "eth0".into(), ip: cli_ip, mac });
        let gw = Ipv4Addr::new(prefix[0], prefix[1], prefix[2], 1);
        Self::with_nodes(lab, prefix, n, &(0..n).collect::<Vec<_>>(), Some(gw))
    }

    /// The router host of [`ApiLab::routed`].
    pub fn router_ns(&self) -> &crate::netns::Netns {
        &self.lab.host("rtr").ns
    }

    fn with_nodes(
        mut lab: Lab,
        prefix: [u8; 3],
        n: usize,
        agent_nodes: &[usize],
        gateway: Option<Ipv4Addr>,
    ) -> Result<Self, String> {
        let vip = Ipv4Addr::new(prefix[0], prefix[1], prefix[2], 100);
        let vip6 = ipv6_of(prefix, 0x100);
        let pki = Pki::new(&std::env::temp_dir().join(format!("vip-lab-{}", lab.tag)))?;
        let mut nodes = Vec::new();
        for i in 0..n {
            let name = format!("n{}", i + 1);
            let host = lab.add_host(&name, 11 + i as u8)?;
            if !agent_nodes.contains(&i) {
                host.hold_vip_quietly(vip)?;
            }
            if let Some(gw) = gateway {
                host.ns.ip(&["route", "add", "default", "via", &gw.to_string()])?;
            }
            let ip = host.ip;
            pki.server(&name, &[IpAddr::V4(ip), IpAddr::V4(vip), IpAddr::V6(vip6)])?;
            nodes.push(Node { name, ip, standin: None });
        }
        let client = https::Client::new(&pki.ca_path())?;
        let mut me = Self { vip, vip6, nodes, lease_api: None, static_backends: true, client, pki, lab };
        for i in 0..n {
            me.start_apiserver(i)?;
        }
        Ok(me)
    }

    pub fn ns(&self, node: usize) -> &crate::netns::Netns {
        &self.lab.host(&self.nodes[node].name).ns
    }

    pub fn client_ns(&self) -> &crate::netns::Netns {
        &self.lab.host("cli").ns
    }

    /// Gives every host of the segment an IPv6 address too, `fd00:a:b:c::<last octet of
    /// its IPv4 address>/64` (without duplicate address detection, so it is usable at
    /// once), and waits until no host has a tentative address left: its link-local one,
    /// made when the link came up, passes duplicate address detection about a second
    /// later. Until then it is not usable as a source (RFC 4862 §5.4), and the kernel
    /// solicits a neighbour from it whenever the packet waiting for the neighbour comes
    /// from an address that is not on the interface (an answer from the VIP, on `lo`):
    /// no Neighbor Solicitation goes out, the host's answers to the agents' IPv6 VIP-path
    /// probes wait a second, and the agents rightly drain it. A real node has been up for
    /// longer than that.
    pub fn with_ipv6(self) -> Result<Self, String> {
        for h in &self.lab.hosts {
            let ip6 = ipv6_of(self.lab.prefix, u16::from(h.ip.octets()[3]));
            h.ns.ip(&["-6", "addr", "add", &format!("{ip6}/64"), "dev", &h.dev, "nodad"])?;
        }
        for h in &self.lab.hosts {
            let settled = wait_until(Duration::from_secs(10), || {
                h.ns.ip(&["-6", "addr", "show", "dev", &h.dev, "tentative"]).is_ok_and(|out| out.stdout.is_empty())
            });
            if !settled {
                return Err(format!("{}: an IPv6 address on {} still tentative after 10 s", h.ip, h.dev));
            }
        }
        Ok(self)
    }

    /// Host `last`'s IPv6 address in the lab (see [`ApiLab::with_ipv6`]).
    pub fn ipv6_of(&self, last: u8) -> Ipv6Addr {
        ipv6_of(self.lab.prefix, u16::from(last))
    }

    /// The file whose existence makes node `i`'s `/readyz` answer 500.
    pub fn unready_file(&self, i: usize) -> PathBuf {
        self.pki.dir.join(format!("{}.unready", self.nodes[i].name))
    }

    /// Starts node `i`'s apiserver stand-in and waits until it answers on its address.
    pub fn start_apiserver(&mut self, i: usize) -> Result<(), String> {
        self.spawn_apiserver(i, "[::]:6443")?;
        self.wait_apiserver(i)
    }

    /// Starts node `i`'s apiserver stand-in listening on the node's address only (an
    /// apiserver's `--bind-address` set to it): VIP traffic reaching the node is reset by
    /// its host. Waits until it answers on that address.
    pub fn start_apiserver_on_node_address(&mut self, i: usize) -> Result<(), String> {
        self.spawn_apiserver(i, &format!("{}:6443", self.nodes[i].ip))?;
        self.wait_apiserver(i)
    }

    fn wait_apiserver(&self, i: usize) -> Result<(), String> {
        let addr = SocketAddr::from((self.nodes[i].ip, 6443));
        let client = self.client.clone();
        let up = wait_until(Duration::from_secs(10), || {
            self.client_ns().within(|| client.get(addr, "/readyz").is_ok()).unwrap_or(false)
        });
        if up {
            Ok(())
        } else {
            Err(format!("the {} stand-in never answered", self.nodes[i].name))
        }
    }

    /// Starts node `i`'s apiserver stand-in with a certificate the lab does not trust;
    /// waits until it accepts connections.
    pub fn start_apiserver_untrusted(&mut self, i: usize) -> Result<(), String> {
        self.spawn_apiserver(i, "[::]:6443")?;
        let addr = SocketAddr::from((self.nodes[i].ip, 6443));
        let up = wait_until(Duration::from_secs(10), || {
            self.client_ns()
                .within(|| std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok())
                .unwrap_or(false)
        });
        if up {
            Ok(())
        } else {
            Err(format!("the {} stand-in never listened", self.nodes[i].name))
        }
    }

    fn spawn_apiserver(&mut self, i: usize, listen: &str) -> Result<(), String> {
        let name = self.nodes[i].name.clone();
        let (cert, key) = (self.pki.dir.join(format!("{name}.pem")), self.pki.dir.join(format!("{name}-key.pem")));
        let unready = self.unready_file(i);
        let child = self
            .ns(i)
            .cmd(crate::agent::standin_bin().to_str().ok_or("path")?)
            // `[::]`, both families: the IPv6 VIP is balanced to the stand-ins too.
            .args(["--name", &name, "--listen", listen, "--unready-file"])
            .arg(&unready)
            .arg("--tls-cert")
            .arg(&cert)
            .arg("--tls-key")
            .arg(&key)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting the {name} stand-in: {e}"))?;
        self.nodes[i].standin = Some(child);
        Ok(())
    }

    /// Kills node `i`'s apiserver stand-in (connections to it are then refused).
    pub fn stop_apiserver(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].standin.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The Lease API host's address.
    pub fn lease_api_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(self.vip.octets()[0], self.vip.octets()[1], self.vip.octets()[2], 5)
    }

    /// The file the API stand-in builds the `default/kubernetes` EndpointSlice from.
    pub fn endpoints_file(&self) -> PathBuf {
        self.pki.dir.join("endpoints.json")
    }

    /// Registers exactly `nodes` (by index) as ready apiservers in the EndpointSlice.
    pub fn register_apiservers(&self, nodes: &[usize]) -> Result<(), String> {
        let eps: Vec<serde_json::Value> =
            nodes.iter().map(|&i| serde_json::json!({"ip": self.nodes[i].ip.to_string(), "ready": true})).collect();
        let doc = serde_json::json!({"port": 6443, "endpoints": eps});
        let tmp = self.pki.dir.join("endpoints.json.tmp");
        std::fs::write(&tmp, doc.to_string()).map_err(|e| e.to_string())?;
        std::fs::rename(&tmp, self.endpoints_file()).map_err(|e| e.to_string())
    }

    /// The file the Lease API stand-in logs every request to (`METHOD PATH` lines).
    pub fn requests_log(&self) -> PathBuf {
        self.pki.dir.join("requests.log")
    }

    /// The Lease as the API stand-in has it (`None` if it does not exist).
    pub fn lease(&self) -> Result<Option<serde_json::Value>, String> {
        let (status, body) = self.lease_call("GET", &[])?;
        match status {
            200 => serde_json::from_str(&body).map(Some).map_err(|e| e.to_string()),
            404 => Ok(None),
            s => Err(format!("GET lease: status {s}: {body}")),
        }
    }

    /// Deletes the Lease (as an operator would with kubectl).
    pub fn delete_lease(&self) -> Result<u16, String> {
        self.lease_call("DELETE", &[]).map(|(s, _)| s)
    }

    /// Replaces the Lease with `lease` (conditional on its resourceVersion, as kubectl
    /// edit does); returns the status.
    pub fn put_lease(&self, lease: &serde_json::Value) -> Result<u16, String> {
        self.lease_call("PUT", lease.to_string().as_bytes()).map(|(s, _)| s)
    }

    fn lease_call(&self, method: &str, body: &[u8]) -> Result<(u16, String), String> {
        let addr = SocketAddr::from((self.lease_api_ip(), 6443));
        let path = "/apis/coordination.k8s.io/v1/namespaces/kube-system/leases/vip-control-plane";
        let client = self.client.clone();
        let (method, body) = (method.to_owned(), body.to_vec());
        self.client_ns().within(move || client.connect(addr)?.request(&method, path, &body))?
    }

    /// The Prometheus text of node `i`'s agent (its metrics address on loopback).
    pub fn metrics(&self, i: usize) -> Result<String, String> {
        self.ns(i).within(|| {
            use std::io::{Read, Write};
            let mut s =
                std::net::TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], 9469)), Duration::from_secs(2))
                    .map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(Duration::from_secs(5))).map_err(|e| e.to_string())?;
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").map_err(|e| e.to_string())?;
            let mut out = String::new();
            s.read_to_string(&mut out).map_err(|e| e.to_string())?;
            Ok(out)
        })?
    }

    /// The value of the metric line starting with `prefix` (name and labels) in node
    /// `i`'s metrics, if present.
    pub fn metric(&self, i: usize, prefix: &str) -> Option<f64> {
        let text = self.metrics(i).ok()?;
        text.lines().find(|l| l.starts_with(prefix))?.rsplit(' ').next()?.parse().ok()
    }

    /// The file the Lease API stand-in reads its injected faults from.
    pub fn faults_file(&self) -> PathBuf {
        self.pki.dir.join("faults.json")
    }

    /// Starts the Lease API stand-in on host `api` (`.5`) and writes one kubeconfig per
    /// node pointing at it (with the lab CA), as `<node>.kubeconfig`.
    pub fn with_lease_api(mut self) -> Result<Self, String> {
        let ip = self.lease_api_ip();
        self.lab.add_host("api", 5)?;
        let (cert, key) = self.pki.server("api", &[IpAddr::V4(ip)])?;
        let child = self
            .lab
            .host("api")
            .ns
            .cmd(crate::agent::leaseapi_bin().to_str().ok_or("path")?)
            .args(["--listen", "0.0.0.0:6443", "--tls-cert"])
            .arg(&cert)
            .arg("--tls-key")
            .arg(&key)
            .arg("--faults")
            .arg(self.faults_file())
            .arg("--endpoints")
            .arg(self.endpoints_file())
            .arg("--requests-log")
            .arg(self.requests_log())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("starting the Lease API stand-in: {e}"))?;
        self.lease_api = Some(child);
        for n in &self.nodes {
            let kc = format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster:\n    server: https://{ip}:6443\n    certificate-authority: {}\nusers:\n- name: {}\n  user:\n    token: lab-token\ncontexts:\n- name: lab\n  context: {{cluster: lab, user: {}}}\ncurrent-context: lab\n",
                self.pki.ca_path().display(),
                n.name,
                n.name
            );
            std::fs::write(self.pki.dir.join(format!("{}.kubeconfig", n.name)), kc).map_err(|e| e.to_string())?;
        }
        let addr = SocketAddr::from((ip, 6443));
        let client = self.client.clone();
        let up = wait_until(Duration::from_secs(10), || {
            self.client_ns().within(|| client.connect(addr).is_ok()).unwrap_or(false)
        });
        if up {
            Ok(self)
        } else {
            Err("the Lease API stand-in never answered".into())
        }
    }

    /// Extra `run` flags for node `i` to take part in the Kubernetes election.
    pub fn election_args(&self, i: usize) -> Vec<String> {
        let kc = self.pki.dir.join(format!("{}.kubeconfig", self.nodes[i].name));
        ["--election", "kubernetes", "--node-name", &self.nodes[i].name, "--kubeconfig", &kc.display().to_string()]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    /// Gives every node a path to the Lease API that does not cross the switch (a link of
    /// its own to the API host, as an apiserver on loopback would be): losing the
    /// segment then leaves a node's Lease calls working.
    pub fn reach_api_out_of_band(&self) -> Result<(), String> {
        let api = &self.lab.host("api").ns;
        let api_ip = self.lease_api_ip();
        for (i, n) in self.nodes.iter().enumerate() {
            let ns = self.ns(i);
            let (mine, theirs) = (format!("10.250.{i}.1"), format!("10.250.{i}.2"));
            let api_dev = format!("mg{i}");
            crate::netns::veth(ns, "mg0", api, &api_dev)?;
            ns.ip(&["addr", "add", &format!("{mine}/30"), "dev", "mg0"])?;
            api.ip(&["addr", "add", &format!("{theirs}/30"), "dev", &api_dev])?;
            ns.ip(&["route", "add", &format!("{api_ip}/32"), "via", &theirs, "dev", "mg0", "src", &n.ip.to_string()])?;
            api.ip(&["route", "add", &format!("{}/32", n.ip), "via", &mine, "dev", &api_dev])?;
        }
        Ok(())
    }

    /// Cuts node `i` off from the Lease API (packets from it dropped), or heals it.
    pub fn partition_from_api(&self, i: usize, cut: bool) -> Result<(), String> {
        let ns = &self.lab.host("api").ns;
        let table = format!("part{}", i);
        if cut {
            let ip = self.nodes[i].ip.to_string();
            crate::netns::run(ns.cmd("nft").args(["add", "table", "inet", &table]))?;
            crate::netns::run(ns.cmd("nft").args([
                "add",
                "chain",
                "inet",
                &table,
                "input",
                "{ type filter hook input priority 0 ; }",
            ]))?;
            crate::netns::run(
                ns.cmd("nft").args(["add", "rule", "inet", &table, "input", "ip", "saddr", &ip, "drop"]),
            )?;
        } else {
            crate::netns::run(ns.cmd("nft").args(["delete", "table", "inet", &table]))?;
        }
        Ok(())
    }

    /// Which nodes' agents say they lead the VIP (from their status).
    pub fn leaders(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.status(i).is_ok_and(|s| s["vips"][0]["leader"] == serde_json::json!(true)))
            .collect()
    }

    /// `vip-agent run` arguments for node `i`: every node a backend, DSR, the lab's CA and
    /// health timing, SKB mode, pins in a directory of its own.
    pub fn agent_args(&self, i: usize, extra: &[&str]) -> Result<Vec<String>, String> {
        let backends: Vec<String> = self.nodes.iter().map(|n| n.ip.to_string()).collect();
        let pins = self.pin_path(i)?;
        let mut args: Vec<String> = [
            "run",
            "--interface",
            "eth0",
            "--vip",
            &self.vip.to_string(),
            "--election",
            "none",
            "--health-ca",
            &self.pki.ca_path().display().to_string(),
            "--health-interval",
            &format!("{}ms", HEALTH_INTERVAL.as_millis()),
            "--health-timeout",
            &format!("{}ms", HEALTH_TIMEOUT.as_millis()),
            "--rise",
            &RISE.to_string(),
            "--fall",
            &FALL.to_string(),
            "--xdp-mode",
            "skb",
            "--pin-path",
            &pins.display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if self.static_backends {
            args.extend(["--backend".to_string(), backends.join(",")]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        Ok(args)
    }

    /// The pin directory of node `i`'s agent (stable across restarts).
    pub fn pin_path(&self, i: usize) -> Result<PathBuf, String> {
        let dir = PathBuf::from("/run/vip-test-bpffs").join(format!("{}-{}", self.lab.tag, self.nodes[i].name));
        if !dir.exists() {
            // Mounts the bpffs if needed (and clears a stale directory of that name).
            pin_dir(&format!("{}-{}", self.lab.tag, self.nodes[i].name))?.keep();
        }
        Ok(dir)
    }

    /// Starts vip-agent on node `i` (without waiting for it). `extra` comes last, so it
    /// overrides any default (a flag given twice takes its last value).
    pub fn spawn_agent(&self, i: usize, extra: &[&str]) -> Result<Agent, String> {
        self.spawn_agent_logging(i, extra, None)
    }

    /// [`ApiLab::spawn_agent`] with `RUST_LOG` set to `filter` (`None`: the agent's
    /// default filter), e.g. to see what the default filter hides.
    pub fn spawn_agent_logging(&self, i: usize, extra: &[&str], filter: Option<&str>) -> Result<Agent, String> {
        let mut args = self.agent_args(i, &[])?;
        if self.lease_api.is_some() {
            args.extend(self.election_args(i));
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        Agent::spawn_with_log_filter(self.ns(i), &args, filter)
    }

    /// Waits until node `i`'s agent sees every node as a healthy backend.
    pub fn wait_all_healthy(&self, i: usize) -> Result<(), String> {
        let ok = wait_until(Duration::from_secs(15), || {
            self.status(i).is_ok_and(|s| {
                s["services"][0]["backends"].as_array().is_some_and(|b| {
                    b.len() == self.nodes.len() && b.iter().all(|b| b["healthy"] == serde_json::json!(true))
                })
            })
        });
        if ok {
            Ok(())
        } else {
            Err(format!("the agent on {} never saw every backend healthy: {:?}", self.nodes[i].name, self.status(i)))
        }
    }

    /// Starts vip-agent on node `i` and waits until every backend is healthy in its
    /// status (so the table holds them all). Nodes that run agents get the VIP on `lo`
    /// from them, and DSR backends must hold it: start those together with
    /// [`ApiLab::start_agents`].
    pub fn start_agent(&self, i: usize, extra: &[&str]) -> Result<Agent, String> {
        let mut agent = self.spawn_agent(i, extra)?;
        self.wait_healthy_or_log(i, &mut agent)?;
        Ok(agent)
    }

    /// [`ApiLab::wait_all_healthy`] for node `i` running `agent`; on failure the error also
    /// says whether the agent had exited, with everything it logged (it is stopped).
    pub fn wait_healthy_or_log(&self, i: usize, agent: &mut Agent) -> Result<(), String> {
        self.wait_all_healthy(i).map_err(|e| {
            let exited = !agent.running();
            let log = agent.stop(libc::SIGTERM, Duration::from_secs(5)).map_or_else(|e| e, |(_, log)| log);
            format!("{e}\nthe agent had {}exited; its log:\n{log}", if exited { "" } else { "not " })
        })
    }

    /// Starts vip-agent on every node in `nodes`, then waits until each sees every
    /// backend healthy.
    pub fn start_agents(&self, nodes: &[usize]) -> Result<Vec<Agent>, String> {
        let mut agents = nodes.iter().map(|&i| self.spawn_agent(i, &[])).collect::<Result<Vec<_>, _>>()?;
        for (&i, agent) in nodes.iter().zip(&mut agents) {
            self.wait_healthy_or_log(i, agent)?;
        }
        Ok(agents)
    }

    /// `vip-agent status --output json` of node `i`'s agent.
    pub fn status(&self, i: usize) -> Result<serde_json::Value, String> {
        let out = self
            .ns(i)
            .cmd(crate::agent::agent_bin().to_str().ok_or("path")?)
            .args(["status", "--output", "json", "--pin-path"])
            .arg(self.pin_path(i)?)
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
        }
        serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
    }

    /// Backend `ip`'s state (`up`, `draining`, `down`) and reason in the status of
    /// `agent_node`'s agent.
    pub fn backend_state(&self, agent_node: usize, ip: &str) -> Option<(String, String)> {
        let s = self.status(agent_node).ok()?;
        let b = s["services"][0]["backends"].as_array()?.iter().find(|b| b["backend"] == ip)?;
        Some((b["state"].as_str()?.to_owned(), b["reason"].as_str()?.to_owned()))
    }

    /// Whether backend `node` is healthy in the status of `agent_node`'s agent.
    pub fn backend_healthy(&self, agent_node: usize, node: usize) -> Option<bool> {
        let s = self.status(agent_node).ok()?;
        let ip = self.nodes[node].ip.to_string();
        s["services"][0]["backends"].as_array()?.iter().find(|b| b["backend"] == ip.as_str())?["healthy"].as_bool()
    }

    /// One HTTPS request through the VIP from the client, on a new connection; returns
    /// the name of the node that answered.
    pub fn request(&self) -> Result<String, String> {
        let addr = SocketAddr::from((self.vip, 6443));
        let client = self.client.clone();
        self.client_ns().within(move || match client.get(addr, "/") {
            Ok((200, body)) => Ok(body.trim().to_owned()),
            Ok((status, body)) => Err(format!("status {status}: {body}")),
            Err(e) => Err(e),
        })?
    }

    /// A kept-alive HTTPS connection through the VIP from the client, answered by a node
    /// whose name `wanted` accepts (the first of up to 64 connections; the others are
    /// reset), and that name.
    pub fn kept_alive_connection(&self, wanted: impl Fn(&str) -> bool + Send) -> Result<(https::Conn, String), String> {
        let addr = SocketAddr::from((self.vip, 6443));
        let client = self.client.clone();
        self.client_ns().within(move || {
            for _ in 0..64 {
                let mut conn = client.connect(addr)?;
                let (_, body) = conn.get("/")?;
                let name = body.trim().to_owned();
                if wanted(&name) {
                    return Ok((conn, name));
                }
                conn.reset();
            }
            Err("no connection of 64 was answered by a node wanted".to_owned())
        })?
    }

    /// `n` requests through the VIP; the count per answering node, and the errors.
    pub fn requests(&self, n: usize) -> (std::collections::BTreeMap<String, usize>, Vec<String>) {
        self.requests_to(self.vip.into(), n)
    }

    /// `n` requests through `vip` (the IPv4 or the IPv6 VIP); the count per answering
    /// node, and the errors.
    pub fn requests_to(&self, vip: IpAddr, n: usize) -> (std::collections::BTreeMap<String, usize>, Vec<String>) {
        let addr = SocketAddr::from((vip, 6443));
        let client = self.client.clone();
        self.client_ns()
            .within(move || {
                let mut counts = std::collections::BTreeMap::new();
                let mut errors = Vec::new();
                for _ in 0..n {
                    match client.get(addr, "/") {
                        Ok((200, body)) => *counts.entry(body.trim().to_owned()).or_insert(0) += 1,
                        Ok((status, _)) => errors.push(format!("status {status}")),
                        Err(e) => errors.push(e),
                    }
                }
                (counts, errors)
            })
            .unwrap_or_else(|e| (Default::default(), vec![e]))
    }

    /// Runs requests through the VIP on a background thread (each on a new connection)
    /// until the returned [`Stream`] is stopped.
    pub fn stream(&self) -> Stream {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let addr = SocketAddr::from((self.vip, 6443));
        let client = self.client.clone();
        let ns = self.client_ns().name.clone();
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut result = StreamResult::default();
            if let Err(e) = crate::netns::enter_by_name(&ns) {
                result.errors.push(e);
                return result;
            }
            while !flag.load(std::sync::atomic::Ordering::SeqCst) {
                let t = Instant::now();
                let ok = match client.get(addr, "/") {
                    Ok((200, body)) => {
                        *result.counts.entry(body.trim().to_owned()).or_insert(0) += 1;
                        true
                    }
                    Ok((status, _)) => {
                        result.errors.push(format!("status {status}"));
                        false
                    }
                    Err(e) => {
                        result.errors.push(e);
                        false
                    }
                };
                result.timeline.push((t, ok));
                result.max_latency = result.max_latency.max(t.elapsed());
                std::thread::sleep(Duration::from_millis(5));
            }
            result
        });
        Stream { stop, handle: Some(handle) }
    }
}

impl Drop for ApiLab {
    fn drop(&mut self) {
        if let Some(mut c) = self.lease_api.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for i in 0..self.nodes.len() {
            self.stop_apiserver(i);
        }
        for i in 0..self.nodes.len() {
            if let Ok(p) = self.pin_path(i) {
                let _ = std::fs::remove_dir_all(p);
            }
        }
    }
}

#[derive(Debug, Default)]
pub struct StreamResult {
    pub counts: std::collections::BTreeMap<String, usize>,
    pub errors: Vec<String>,
    pub max_latency: Duration,
    /// When each request started, and whether it succeeded.
    pub timeline: Vec<(Instant, bool)>,
}

impl StreamResult {
    /// From the first failed request to the first successful one after it (zero if none
    /// failed).
    pub fn outage(&self) -> Duration {
        let Some(first_fail) = self.timeline.iter().position(|(_, ok)| !ok) else { return Duration::ZERO };
        let start = self.timeline[first_fail].0;
        self.timeline[first_fail..]
            .iter()
            .find(|(_, ok)| *ok)
            .map_or_else(|| self.timeline.last().map_or(Duration::ZERO, |(t, _)| *t - start), |(t, _)| *t - start)
    }

    pub fn total(&self) -> usize {
        self.counts.values().sum::<usize>() + self.errors.len()
    }

    /// Panics, saying how many of how many failed and why (then `context`), if any
    /// request failed.
    #[track_caller]
    pub fn assert_none_failed(&self, context: &str) {
        assert!(
            self.errors.is_empty(),
            "{} of {} requests failed: {:?}\n{context}",
            self.errors.len(),
            self.total(),
            self.errors
        );
    }
}

/// A request stream running in the background.
pub struct Stream {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<StreamResult>>,
}

impl Stream {
    pub fn stop(mut self) -> StreamResult {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.handle.take().and_then(|h| h.join().ok()).unwrap_or_default()
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// `fd00:a:b:c::<host>` for lab prefix `a.b.c`.
fn ipv6_of(prefix: [u8; 3], host: u16) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, prefix[0].into(), prefix[1].into(), prefix[2].into(), 0, 0, 0, host)
}
