//! The capability set the manifests give the agent container ([`vip_deploy::CAPABILITIES`])
//! is enough, and each capability in it is needed. The real agent binary (`VIPLAB_AGENT_BIN`,
//! set by `cargo xtask test`, else the workspace's debug build) runs as a container
//! runtime would start it: uid 0, exactly those capabilities (bounding and inheritable
//! sets, so nothing else can be gained), no_new_privs (`allowPrivilegeEscalation:
//! false`), and /proc/sys and /sys read-only with bpffs still writable beneath, in a
//! network namespace of its own. Needs root (as every namespace test here does).

mod common;

use std::{
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    thread::sleep,
    time::{Duration, Instant},
};

use vip_deploy::CAPABILITIES;

/// How long the agent may take to start serving (it loads and verifies the XDP program,
/// then claims the VIP); generous for a loaded CI machine.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// A VIP inside the test's own namespace (TEST-NET-2, never routed).
const VIP: &str = "198.51.100.10";

fn agent() -> PathBuf {
    let path = std::env::var_os("VIPLAB_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| common::root().join("target/debug/vip-agent"));
    assert!(path.exists(), "{}: no agent binary (run `cargo xtask test`, or set VIPLAB_AGENT_BIN)", path.display());
    path
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(out.status.success(), "{cmd:?}: {}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    out
}

/// A network namespace whose `eth0` is a veth pair's end, the other end in a second
/// namespace (the clients' side: in the node's own namespace its kernel would answer the
/// agent's RFC 5227 probe for the VIP), and a bpffs pin directory; all removed on drop.
struct Node {
    ns: String,
    clients: String,
    pin: PathBuf,
}

impl Node {
    fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let ns = format!("vdep{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let clients = format!("{ns}c");
        run(Command::new("ip").args(["netns", "add", &ns]));
        run(Command::new("ip").args(["netns", "add", &clients]));
        let node = Node { pin: PathBuf::from(format!("/sys/fs/bpf/{ns}")), ns, clients };
        for args in [
            &["link", "set", "lo", "up"][..],
            &["link", "add", "eth0", "type", "veth", "peer", "name", "eth1", "netns", &node.clients],
            &["link", "set", "eth0", "up"],
        ] {
            run(Command::new("ip").args(["-n", &node.ns]).args(args));
        }
        run(Command::new("ip").args(["-n", &node.clients, "link", "set", "eth1", "up"]));
        node
    }

    fn netns_arg(&self) -> String {
        format!("--net=/run/netns/{}", self.ns)
    }

    /// `setpriv` and its arguments: uid 0 with exactly `caps`, as a container runtime sets
    /// a container up.
    fn setpriv(caps: &[&str]) -> Vec<String> {
        let set: String = std::iter::once("-all".to_owned())
            .chain(caps.iter().map(|c| format!("+{}", c.to_ascii_lowercase())))
            .collect::<Vec<_>>()
            .join(",");
        ["setpriv", "--reuid=0", "--regid=0", "--clear-groups", "--no-new-privs"]
            .into_iter()
            .map(str::to_owned)
            .chain([format!("--inh-caps={set}"), format!("--bounding-set={set}")])
            .collect()
    }

    /// Starts `vip-agent run` with `caps`, /proc/sys and /sys read-only. The child's pid
    /// is the agent's: unshare, nsenter and setpriv each exec the next.
    fn start(&self, caps: &[&str]) -> Child {
        let readonly = "mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys && \
                        mount --rbind /sys /sys && mount -o remount,bind,ro /sys && exec \"$@\"";
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", readonly, "sh", "nsenter"])
            .arg(self.netns_arg())
            .args(Self::setpriv(caps))
            .arg(agent())
            .args(["run", "--interface", "eth0", "--vip", VIP, "--election", "none", "--xdp-mode", "skb"])
            .arg("--pin-path")
            .arg(&self.pin)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("unshare")
    }

    /// `vip-agent status` with `caps`, if it succeeds.
    fn status(&self, caps: &[&str]) -> Option<String> {
        let out = Command::new("nsenter")
            .arg(self.netns_arg())
            .args(Self::setpriv(caps))
            .arg(agent())
            .arg("status")
            .arg("--pin-path")
            .arg(&self.pin)
            .output()
            .ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        for ns in [&self.ns, &self.clients] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = std::fs::remove_dir_all(&self.pin);
    }
}

/// What became of a started agent.
enum Outcome {
    /// It serves the VIP as leader; `status` works with the same capabilities.
    Serving { capabilities: u64 },
    /// It exited before serving, with this stderr.
    Failed(String),
}

/// Waits until the agent leads the VIP or exits.
fn outcome(node: &Node, child: &mut Child, caps: &[&str]) -> Outcome {
    let deadline = Instant::now() + START_TIMEOUT;
    while Instant::now() < deadline {
        if child.try_wait().expect("try_wait").is_some() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            return Outcome::Failed(err);
        }
        if node.status(caps).is_some_and(|s| s.contains("LEADER")) {
            let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap_or_default();
            let eff = status.lines().find_map(|l| l.strip_prefix("CapEff:")).unwrap_or("0").trim();
            return Outcome::Serving { capabilities: u64::from_str_radix(eff, 16).unwrap() };
        }
        sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    panic!("the agent neither served nor exited within {START_TIMEOUT:?}");
}

/// Stops a serving agent with SIGTERM (what the kubelet sends) and returns its stderr.
fn stop(mut child: Child) -> String {
    run(Command::new("kill").args(["-TERM", &child.id().to_string()]));
    let status = child.wait().unwrap();
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(status.success(), "the agent's stop failed ({status}):\n{err}");
    err
}

/// Linux capability numbers (`include/uapi/linux/capability.h`).
fn bit(cap: &str) -> u64 {
    1 << match cap {
        "NET_ADMIN" => 12,
        "NET_RAW" => 13,
        "PERFMON" => 38,
        "BPF" => 39,
        other => panic!("no bit known for {other}"),
    }
}

#[test]
fn agent_serves_with_exactly_the_manifest_capabilities() {
    let node = Node::new();
    let mut child = node.start(CAPABILITIES);
    match outcome(&node, &mut child, CAPABILITIES) {
        Outcome::Serving { capabilities } => {
            assert_eq!(capabilities, CAPABILITIES.iter().map(|c| bit(c)).fold(0, |a, b| a | b), "CapEff");
        }
        Outcome::Failed(err) => panic!("the agent failed with {CAPABILITIES:?}:\n{err}"),
    }
    let err = stop(child);
    assert!(err.contains("stopped cleanly"), "{err}");
    assert!(!err.contains("WARN") && !err.contains("ERROR"), "the agent warned with {CAPABILITIES:?}:\n{err}");
}

#[test]
fn each_manifest_capability_is_needed() {
    // What the agent does without each one: fail to start (with this in its error), or
    // start degraded (with this warning).
    let without: &[(&str, bool, &str)] = &[
        ("NET_ADMIN", false, "missing capability CAP_NET_ADMIN: add CAP_NET_ADMIN to the container's"),
        ("NET_RAW", false, "missing capability CAP_NET_RAW: add CAP_NET_RAW to the container's"),
        ("BPF", false, "missing capability CAP_BPF: add CAP_BPF to the container's"),
        ("PERFMON", false, "missing capability CAP_PERFMON: add CAP_PERFMON to the container's"),
    ];
    let covered: Vec<&str> = without.iter().map(|(c, _, _)| *c).collect();
    assert_eq!(covered, CAPABILITIES, "a capability without an expectation here");
    for (cap, starts, needle) in without {
        let caps: Vec<&str> = CAPABILITIES.iter().copied().filter(|c| c != cap).collect();
        let node = Node::new();
        let mut child = node.start(&caps);
        let err = match outcome(&node, &mut child, &caps) {
            Outcome::Serving { .. } if *starts => stop(child),
            Outcome::Serving { .. } => panic!("the agent served without {cap}"),
            Outcome::Failed(err) if !*starts => err,
            Outcome::Failed(err) => panic!("the agent failed without {cap} (expected a warning):\n{err}"),
        };
        assert!(err.contains(needle), "without {cap}, expected {needle:?} in:\n{err}");
    }
}

#[test]
fn agent_sets_the_arp_sysctls_itself_through_a_read_only_proc_sys() {
    // A container's /proc/sys is read-only; the agent writes the interface's ARP sysctls
    // over rtnetlink (IFLA_INET_CONF) instead, so nothing needs presetting on the host.
    let node = Node::new();
    let mut child = node.start(CAPABILITIES);
    match outcome(&node, &mut child, CAPABILITIES) {
        Outcome::Serving { .. } => {}
        Outcome::Failed(err) => panic!("the agent could not start with a read-only /proc/sys:\n{err}"),
    }
    let read = |name: &str| {
        let path = format!("/proc/sys/net/ipv4/conf/eth0/{name}");
        let out = run(Command::new("nsenter").arg(node.netns_arg()).args(["cat", &path]));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    assert_eq!((read("arp_ignore"), read("arp_announce")), ("1".to_owned(), "2".to_owned()));
    let err = stop(child);
    assert!(!err.contains("WARN") && !err.contains("ERROR"), "{err}");
    // Stopping puts back what was there.
    assert_eq!((read("arp_ignore"), read("arp_announce")), ("0".to_owned(), "0".to_owned()));
}
