//! Running the `vip-agent` binary inside a namespace.

use std::{
    io::Read,
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use crate::netns::Netns;

/// The agent binary: `VIPLAB_AGENT_BIN` (set by `cargo xtask test`), or the workspace's
/// debug build.
pub fn agent_bin() -> PathBuf {
    std::env::var_os("VIPLAB_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/vip-agent"))
}

/// The `vip-standin` binary: `VIPLAB_STANDIN_BIN`, or next to the running executable (or
/// one directory up, for test binaries in `target/*/deps`).
pub fn standin_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("VIPLAB_STANDIN_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().map(PathBuf::from).unwrap_or_default();
    [dir.join("vip-standin"), dir.join("../vip-standin")]
        .into_iter()
        .find(|p| p.exists())
        .unwrap_or_else(|| dir.join("vip-standin"))
}

/// The `vip-leaseapi` binary, found like [`standin_bin`].
pub fn leaseapi_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("VIPLAB_LEASEAPI_BIN") {
        return PathBuf::from(p);
    }
    standin_bin().with_file_name("vip-leaseapi")
}

/// A bpffs directory for one agent's pins, outside `/sys` (which `ip netns exec`
/// remounts, hiding `/sys/fs/bpf`): `/run/vip-test-bpffs/<name>`, emptied now and
/// removed with everything pinned in it when the guard drops (an agent killed with
/// SIGKILL, or a test that panics, would otherwise leave its maps and its XDP link
/// pinned for as long as the machine runs). The bpffs is mounted on first use.
pub fn pin_dir(name: &str) -> Result<PinDir, String> {
    pin_dir_path(name).map(PinDir)
}

/// A pin directory that [`pin_dir`] made: removed on drop. Derefs to its path.
#[derive(Debug)]
pub struct PinDir(PathBuf);

impl PinDir {
    /// Hands the directory's removal over to the caller (a lab that removes its nodes'
    /// pins itself, across agent restarts).
    pub fn keep(mut self) -> PathBuf {
        std::mem::take(&mut self.0)
    }
}

impl std::ops::Deref for PinDir {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl AsRef<std::ffi::OsStr> for PinDir {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.0.as_os_str()
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if !self.0.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn pin_dir_path(name: &str) -> Result<PathBuf, String> {
    let root = PathBuf::from("/run/vip-test-bpffs");
    let mounts = std::fs::read_to_string("/proc/mounts").map_err(|e| e.to_string())?;
    if !mounts.lines().any(|l| l.split_whitespace().nth(1) == Some("/run/vip-test-bpffs")) {
        std::fs::create_dir_all(&root).map_err(|e| e.to_string())?;
        crate::netns::run(Command::new("mount").args(["-t", "bpf", "bpf", "/run/vip-test-bpffs"]))?;
    }
    let dir = root.join(name);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(dir)
}

/// A `vip-agent` process inside a namespace; killed on drop if still running.
pub struct Agent {
    child: Option<Child>,
    /// The agent's log as read so far: a thread drains its stderr as it comes, so an
    /// agent that logs more than a pipe holds (64 KiB) never blocks on a write.
    log: Option<std::thread::JoinHandle<String>>,
}

impl Agent {
    /// Starts `vip-agent ARGS` in `ns`, logging to a pipe read back by [`Agent::stop`].
    pub fn spawn<S: AsRef<std::ffi::OsStr>>(ns: &Netns, args: &[S]) -> Result<Self, String> {
        Self::spawn_with_log_filter(ns, args, None)
    }

    /// [`Agent::spawn`] with `RUST_LOG` set to `filter`, or removed (the agent's default
    /// filter) for `None`.
    pub fn spawn_with_log_filter<S: AsRef<std::ffi::OsStr>>(
        ns: &Netns,
        args: &[S],
        filter: Option<&str>,
    ) -> Result<Self, String> {
        let bin = agent_bin();
        let mut cmd = ns.cmd(bin.to_str().ok_or("agent path is not UTF-8")?);
        match filter {
            Some(f) => cmd.env("RUST_LOG", f),
            None => cmd.env_remove("RUST_LOG"),
        };
        let mut child = cmd
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawning {}: {e}", bin.display()))?;
        let log = child.stderr.take().map(|mut err| {
            std::thread::spawn(move || {
                let mut log = String::new();
                let _ = err.read_to_string(&mut log);
                log
            })
        });
        Ok(Self { child: Some(child), log })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Sends `signal` without waiting for the agent to exit.
    pub fn signal(&self, signal: i32) {
        if let Some(c) = &self.child {
            // SAFETY: plain kill(2) on our own child.
            unsafe { libc::kill(c.id() as i32, signal) };
        }
    }

    /// Whether the agent is still running (it has not exited on its own).
    pub fn running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| c.try_wait().is_ok_and(|s| s.is_none()))
    }

    /// Sends `signal` and waits (at most `timeout`) for the exit; returns the status and
    /// everything the agent logged.
    pub fn stop(&mut self, signal: i32, timeout: Duration) -> Result<(ExitStatus, String), String> {
        let mut child = self.child.take().ok_or("agent already stopped")?;
        // `ip netns exec` execs the agent, so the child's pid is the agent's.
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, signal) };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
                let log = self.log.take().and_then(|t| t.join().ok()).unwrap_or_default();
                return Ok((status, log));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("agent did not exit within {timeout:?} of signal {signal}"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs `vip-agent ARGS` in `ns` to completion (for commands expected to fail fast).
pub fn run_to_exit<S: AsRef<std::ffi::OsStr>>(
    ns: &Netns,
    args: &[S],
    timeout: Duration,
) -> Result<(ExitStatus, String), String> {
    let mut agent = Agent::spawn(ns, args)?;
    let deadline = Instant::now() + timeout;
    loop {
        let child = agent.child.as_mut().ok_or("no child")?;
        if child.try_wait().map_err(|e| e.to_string())?.is_some() {
            return agent.stop(0, timeout);
        }
        if Instant::now() > deadline {
            return Err(format!("vip-agent still running after {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `cond` every 20 ms until it is true or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    cond()
}

/// A command in `ns` that runs without privileges (uid/gid nobody, every capability
/// dropped), to check how the agent reports missing privileges.
pub fn unprivileged(ns: &Netns) -> Command {
    let mut c = ns.cmd("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all"]);
    c
}
