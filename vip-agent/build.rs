//! Builds the XDP object (crate `vip-ebpf`) for bpfel-unknown-none with nightly and
//! `-Z build-std=core`, and leaves it in OUT_DIR for `include_bytes_aligned!`.
//!
//! `VIPBUILD_EBPF_TOOLCHAIN` names the rustup toolchain to build it with (default `nightly`);
//! `cargo xtask setup` picks one whose LLVM matches bpf-linker's and exports it.

use std::path::Path;

use aya_build::{Package, Toolchain};

fn main() -> aya_build::Result<()> {
    println!("cargo:rerun-if-env-changed=VIPBUILD_EBPF_TOOLCHAIN");
    commit_id();
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR")?;
    let root = Path::new(&manifest_dir).parent().ok_or_else(|| aya_build_error("no parent"))?;
    let ebpf_dir = root.join("vip-ebpf");
    // aya-build tracks vip-ebpf's own directory; the shared types live next door.
    println!("cargo:rerun-if-changed={}", root.join("vip-common/src").display());
    let toolchain_name = std::env::var("VIPBUILD_EBPF_TOOLCHAIN").ok();
    let toolchain = match toolchain_name.as_deref() {
        Some(name) if !name.is_empty() => Toolchain::Custom(name),
        _ => Toolchain::Nightly,
    };
    let ebpf_dir = ebpf_dir.to_str().ok_or_else(|| aya_build_error("non-UTF-8 path"))?;
    aya_build::build_ebpf([Package { name: "vip-ebpf", root_dir: ebpf_dir, ..Default::default() }], toolchain)
}

/// Exports `VIP_BUILD_COMMIT` (the abbreviated commit id, or `unknown` outside a git
/// checkout) for `--version` and the start line: two builds of one version number are
/// otherwise told apart by nothing (an upgrade trial could not say which node ran which).
fn commit_id() {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .map(|s| s.trim().to_owned())
    };
    let commit = git(&["rev-parse", "--short=12", "HEAD"]).unwrap_or_else(|| "unknown".into());
    println!("cargo:rustc-env=VIP_BUILD_COMMIT={commit}");
    // Again when HEAD moves: HEAD itself, and the branch it names.
    if let Some(dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        println!("cargo:rerun-if-changed={dir}/HEAD");
        if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) {
            println!("cargo:rerun-if-changed={dir}/{branch}");
        }
    }
}

fn aya_build_error(what: &str) -> std::io::Error {
    std::io::Error::other(format!("vip-agent build script: {what}"))
}
