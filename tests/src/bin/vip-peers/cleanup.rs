//! Leaving nothing behind when the run does not end normally. A panic unwinds through the
//! labs' `Drop`s; SIGINT/SIGTERM and a hang do not, so a signal watcher and a watchdog
//! remove by name what this process made: namespaces `vt<tag>…` (killing what runs in
//! them), temporary directories and bpffs pins carrying the tag, then exit.

use std::{
    process::Command,
    sync::atomic::{AtomicI32, Ordering},
    time::Duration,
};

/// The whole run (both sections) takes ~15 minutes; three times that is a hang.
const WATCHDOG: Duration = Duration::from_secs(45 * 60);

/// The prefix of every tag `tests::netns::unique_tag` makes in this process.
fn tag_prefix() -> String {
    format!("{}x", std::process::id() % 100_000)
}

/// Deletes every namespace, directory and pin this process made.
fn sweep() {
    let prefix = tag_prefix();
    let listed = Command::new("ip").args(["netns", "list"]).output().map(|o| o.stdout).unwrap_or_default();
    for name in String::from_utf8_lossy(&listed).lines().filter_map(|l| l.split_whitespace().next()) {
        if !name.starts_with(&format!("vt{prefix}")) {
            continue;
        }
        let pids = Command::new("ip").args(["netns", "pids", name]).output().map(|o| o.stdout).unwrap_or_default();
        for pid in String::from_utf8_lossy(&pids).split_whitespace().filter_map(|p| p.parse::<i32>().ok()) {
            // SAFETY: plain kill(2) on a process inside one of our own namespaces.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = Command::new("ip").args(["netns", "del", name]).status();
    }
    for dir in [std::env::temp_dir(), "/run/vip-test-bpffs".into()] {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            // vip-lab-<tag>, vip-peers-<tag>, vip-peers-keepalived-<tag>, <tag>-… pins.
            if name.starts_with(&prefix) || name.contains(&format!("-{prefix}")) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// The signal that asked us to stop (0: none yet); set by [`on_signal`].
static SIGNALLED: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    SIGNALLED.store(sig, Ordering::SeqCst);
}

/// Installs SIGINT/SIGTERM handlers and the watchdog. A handler only records the signal
/// (the signal mask is left alone: children inherit a blocked mask, and an agent that
/// inherited a blocked SIGTERM would never stop; handlers, unlike masks, do not survive
/// `exec`); a thread watching for it, and the watchdog, sweep and exit.
pub fn install() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: on_signal is async-signal-safe (one atomic store).
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
    std::thread::spawn(|| loop {
        let sig = SIGNALLED.load(Ordering::SeqCst);
        if sig != 0 {
            eprintln!("vip-peers: signal {sig}: removing the lab and exiting");
            sweep();
            std::process::exit(128 + sig);
        }
        std::thread::sleep(Duration::from_millis(100));
    });
    std::thread::spawn(|| {
        std::thread::sleep(WATCHDOG);
        eprintln!("vip-peers: still running after {} min: removing the lab and exiting", WATCHDOG.as_secs() / 60);
        sweep();
        std::process::exit(1);
    });
}
