//! `cargo xtask bench -- katran`: builds Katran's XDP balancer at the commit the issue
//! measured, for `vip-katran` to run beside vip's data plane.
//!
//! Katran is GPL-2.0 and lives on GitHub; nothing of it is kept in this repository. Its
//! source comes from `KATRAN_SRC` (any git repository holding the commit: a local clone,
//! a bare mirror, a URL), by default from GitHub, into `target/bench/katran/`. The object
//! is built as Katran's own `katran/lib/Makefile-bpf` builds it: clang to LLVM IR with
//! its flags, then `llc -march=bpf`.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use crate::{root, setup, status, Result};

/// The Katran commit measured (`vip-katran` prints it as well).
pub const COMMIT: &str = "19f08fec";
const DEFAULT_SOURCE: &str = "https://github.com/facebookincubator/katran";

/// Fetches and builds Katran's balancer; returns the object's path.
pub fn build() -> Result<PathBuf> {
    let clang = format!("clang-{}", setup::LLVM_MAJOR);
    let llc = format!("/usr/lib/llvm-{}/bin/llc", setup::LLVM_MAJOR);
    setup::apt_install(&[clang.as_str(), "bpftool"])?;
    let dir = root().join("target/bench/katran");
    let repo = dir.join("repo.git");
    let source = std::env::var("KATRAN_SRC").unwrap_or_else(|_| DEFAULT_SOURCE.to_owned());
    if !repo.exists() {
        println!("katran: cloning {source}");
        status(Command::new("git").args(["clone", "--quiet", "--bare", &source]).arg(&repo))?;
    }
    let git = |args: &[&str]| {
        let mut cmd = Command::new("git");
        cmd.arg("--git-dir").arg(&repo).args(args);
        cmd
    };
    let commit = format!("{COMMIT}^{{commit}}");
    if !git(&["cat-file", "-e", &commit]).status().is_ok_and(|s| s.success()) {
        status(&mut git(&["fetch", "--quiet", &source]))?;
    }
    let src = dir.join("src");
    let _ = std::fs::remove_dir_all(&src);
    std::fs::create_dir_all(&src).map_err(|e| format!("{}: {e}", src.display()))?;
    let archive = git(&["archive", COMMIT, "katran/lib/bpf", "katran/lib/linux_includes"])
        .output()
        .map_err(|e| format!("git archive: {e}"))?;
    if !archive.status.success() {
        return Err(format!("git archive {COMMIT}: {}", String::from_utf8_lossy(&archive.stderr).trim()));
    }
    untar(&archive.stdout, &src)?;
    // Makefile-bpf's include path has the linux_includes headers at `include/` too.
    let include = src.join("include");
    std::fs::create_dir_all(&include).map_err(|e| e.to_string())?;
    let headers = src.join("katran/lib/linux_includes");
    for entry in std::fs::read_dir(&headers).map_err(|e| format!("{}: {e}", headers.display()))?.flatten() {
        std::fs::copy(entry.path(), include.join(entry.file_name())).map_err(|e| e.to_string())?;
    }
    let ir = dir.join("balancer.bc");
    let object = dir.join("balancer.o");
    println!("katran: building balancer.bpf.c at {COMMIT} ({clang}, llc -march=bpf)");
    status(
        Command::new(&clang)
            .current_dir(&src)
            .args(["-I.", "-Iinclude", "-DDEBUG", "-D__KERNEL__"])
            .args(["-Wno-unused-value", "-Wno-pointer-sign", "-Wno-compare-distinct-pointer-types"])
            .args(["-O2", "-emit-llvm", "-c", "-g", "katran/lib/bpf/balancer.bpf.c", "-o"])
            .arg(&ir),
    )?;
    status(Command::new(&llc).args(["-march=bpf", "-filetype=obj", "-o"]).arg(&object).arg(&ir))?;
    Ok(object)
}

fn untar(tar: &[u8], into: &Path) -> Result<()> {
    use std::io::Write;
    let mut child = Command::new("tar")
        .arg("-x")
        .arg("-C")
        .arg(into)
        .stdin(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("tar: {e}"))?;
    child.stdin.take().ok_or("tar: no stdin")?.write_all(tar).map_err(|e| format!("tar: {e}"))?;
    let st = child.wait().map_err(|e| format!("tar: {e}"))?;
    if st.success() {
        Ok(())
    } else {
        Err(format!("tar failed: {st}"))
    }
}
